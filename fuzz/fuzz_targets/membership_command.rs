//! Fuzz target `membership_command`: see `securesmart_membership::fuzzing::membership_command` for the oracle.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    securesmart_membership::fuzzing::membership_command(data);
});
