//! Fuzz target `csr`: see `securesmart_membership::fuzzing::csr` for the oracle.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    securesmart_membership::fuzzing::csr(data);
});
