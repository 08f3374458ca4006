#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fanout_api::routes::fuzz_batch(data));
