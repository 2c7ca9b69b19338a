#![no_main]
//! Arbitrary datagrams through the decoder and the whole RFC 5176 decision path.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dynauth_proto::fuzzing::decode_and_decide(data);
});
