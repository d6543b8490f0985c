#![no_main]
//! See `tori_worker_fuzz::task_message` for what is checked.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|message: tori_worker_fuzz::Message| tori_worker_fuzz::task_message(&message));
