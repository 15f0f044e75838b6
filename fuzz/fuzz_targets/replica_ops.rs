//! Fuzz target `replica_ops`: see `securesmart_consensus::fuzzing::replica_ops`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    securesmart_consensus::fuzzing::replica_ops(data);
});
