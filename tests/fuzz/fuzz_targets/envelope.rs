#![no_main]
//! See `tori_worker_fuzz::envelope` for what is checked.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tori_worker_fuzz::envelope(data));
