#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fanout_ws::fuzzing::cursor(data));
