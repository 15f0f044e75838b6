//! Fuzz target `crl`: see `securesmart_transport::fuzzing::crl` for the oracle.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    securesmart_transport::fuzzing::crl(data);
});
