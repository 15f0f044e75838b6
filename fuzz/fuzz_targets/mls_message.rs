//! Fuzz target `mls_message`: see `securesmart_membership::fuzzing::mls_message` for the oracle.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    securesmart_membership::fuzzing::mls_message(data);
});
