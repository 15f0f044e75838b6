//! Fuzz target `enroll_request`: see `securesmart_membership::fuzzing::enroll_request` for the oracle.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    securesmart_membership::fuzzing::enroll_request(data);
});
