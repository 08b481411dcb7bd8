//! A C-STORE data set through the ingest pipeline's header parse and
//! structure walk. Input: byte 0 picks the transfer syntax, then the data set.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = konsil::fuzzing::dimse_data_set(data);
});
