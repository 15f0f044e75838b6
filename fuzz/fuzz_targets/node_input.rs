//! Fuzz target `node_input`: see `securesmart::fuzzing::node_input`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    securesmart::fuzzing::node_input(data);
});
