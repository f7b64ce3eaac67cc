#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mailroute_relay::smtp::fuzzing::command_line(data));
