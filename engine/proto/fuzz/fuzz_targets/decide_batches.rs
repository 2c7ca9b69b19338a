#![no_main]
//! Sequences of datagrams (`decide_sequence`'s format) decided a receive batch at a time
//! through the batch engine API and one by one: the batches must send exactly what one-by-one
//! decisions send (`dynauth_proto::fuzzing::decide_batches`).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dynauth_proto::fuzzing::decide_batches(data);
});
