#![no_main]
//! See `tori_worker_fuzz::canvas` for what is checked.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|step: tori_worker_fuzz::Step| tori_worker_fuzz::canvas(&step));
