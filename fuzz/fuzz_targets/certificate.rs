#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tm_sidecar::fuzzing::certificate(data));
