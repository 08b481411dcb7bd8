//! A STOW-RS request: Content-Type, body, and where the network splits it
//! (input layout: `konsil::fuzzing::stow_input`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = konsil::fuzzing::stow_input(data);
});
