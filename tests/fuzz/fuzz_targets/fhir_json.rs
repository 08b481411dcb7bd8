//! A FHIR JSON request body through the parser and the validator.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = konsil::fuzzing::fhir_resource(data);
});
