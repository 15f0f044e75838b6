//! Fuzz target `consensus_message`: see `securesmart_consensus::fuzzing::consensus_message`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    securesmart_consensus::fuzzing::consensus_message(data);
});
