//! Fuzz target `sealed_open`: see `securesmart_membership::fuzzing::sealed_open` for the oracle.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    securesmart_membership::fuzzing::sealed_open(data);
});
