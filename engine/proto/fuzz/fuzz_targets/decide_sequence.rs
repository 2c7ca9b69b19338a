#![no_main]
//! Sequences of datagrams and clock steps (several packets decoded from one input) through
//! one fresh engine: the oracle checks every answer's meaning, that a replay is the first
//! answer byte for byte, and that no answer is replayed after its window
//! (`dynauth_proto::fuzzing::decide_sequence`).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dynauth_proto::fuzzing::decide_sequence(data);
});
