//! Fuzz target `journal`: see `securesmart_consensus::fuzzing::journal`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    securesmart_consensus::fuzzing::journal(data);
});
