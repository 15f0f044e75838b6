//! Fuzzes the stream frame decoder: arbitrary bytes in arbitrary pieces, with a round-trip and
//! memory-bound oracle (see `securesmart_transport::fuzzing::frame_decode`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    securesmart_transport::fuzzing::frame_decode(data);
});
