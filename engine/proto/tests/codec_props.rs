//! Property tests for the codec and the authenticators (SPEC §2, §3).

mod common;

/// The store the shared test support runs the engine over (see `common`).
#[allow(dead_code)]
type StoreUnderTest = dynauth_proto::store::MemoryStore;

use common::*;
use dynauth_proto::Outcome;
use dynauth_proto::client::ClientPolicy;
use dynauth_proto::codec::{MAX_PACKET_LEN, Packet, PacketWriter, VendorSpecific};
use dynauth_proto::dict::attr;
use proptest::prelude::*;

fn attribute() -> impl Strategy<Value = (u8, Vec<u8>)> {
    (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..=253))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    /// Decoding arbitrary bytes never panics (SPEC §2: never a panic).
    #[test]
    fn decoding_arbitrary_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(p) = Packet::parse(&data) {
            prop_assert!(p.length() >= 20 && p.length() <= data.len());
            for a in p.attributes().flatten() {
                if let Some(v) = a.vendor_specific() {
                    for _ in v.sub_attributes() {}
                }
                let _ = VendorSpecific::parse(a.value);
            }
        }
        dynauth_proto::fuzzing::decode_and_decide(&data);
    }

    /// Arbitrary bytes with a plausible header (code 40/43, right Length) never panic either.
    #[test]
    fn plausible_headers_with_arbitrary_attributes_never_panic(
        code in prop_oneof![Just(40u8), Just(43u8)],
        body in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        let mut data = vec![code, 1, 0, 0];
        data.extend_from_slice(&[0; 16]);
        data.extend_from_slice(&body);
        let len = data.len() as u16;
        data[2..4].copy_from_slice(&len.to_be_bytes());
        resign_fuzz(&mut data);
        dynauth_proto::fuzzing::decode_and_decide(&data);
    }

    /// Building then parsing gives back the same header and attributes.
    #[test]
    fn build_then_parse_round_trips(
        code in any::<u8>(),
        id in any::<u8>(),
        authenticator in any::<[u8; 16]>(),
        attrs in proptest::collection::vec(attribute(), 0..12),
    ) {
        let mut buf = vec![0u8; MAX_PACKET_LEN];
        let mut w = PacketWriter::new(&mut buf, code, id, &authenticator).unwrap();
        let mut written = Vec::new();
        for (ty, v) in &attrs {
            if w.push(*ty, v).is_ok() {
                written.push((*ty, v.clone()));
            }
        }
        let bytes = w.finish().to_vec();
        let p = Packet::parse(&bytes).unwrap();
        prop_assert_eq!((p.code(), p.identifier(), p.length()), (code, id, bytes.len()));
        prop_assert_eq!(p.authenticator(), &authenticator);
        let back: Vec<_> = p.attributes().map(|a| a.map(|a| (a.ty, a.value.to_vec()))).collect::<Result<_, _>>().unwrap();
        prop_assert_eq!(back, written);
    }

    /// Flipping any single bit of a signed request makes it a silent discard (SPEC §2.4, §2.5).
    #[test]
    fn any_single_bit_flip_of_a_signed_request_is_discarded(
        with_ma in any::<bool>(),
        code in prop_oneof![Just(40u8), Just(43u8)],
        bit in any::<proptest::sample::Index>(),
        session in "[a-z0-9-]{1,24}",
    ) {
        let mut f = Fixture::new(ClientPolicy::default(), vec![common::session(&session)]);
        let p = request(code, 9, &[(attr::ACCT_SESSION_ID, session.as_bytes()), (attr::PROXY_STATE, b"x")], with_ma);
        let mut flipped = p.clone();
        let i = bit.index(p.len() * 8);
        flipped[i / 8] ^= 1 << (i % 8);
        let (outcome, reply) = f.handle(&flipped);
        prop_assert!(matches!(outcome, Outcome::Discard(_)), "bit {} gave {:?}", i, outcome);
        prop_assert!(reply.is_none());
        prop_assert_eq!(f.store.snapshot().len(), 1, "nothing changed");
        // The unflipped request is accepted: the flip alone made the difference.
        prop_assert!(f.answer(&p).code == code + 1);
    }
}

/// Signs with the fuzzing client's secret (Request Authenticator only).
fn resign_fuzz(data: &mut [u8]) {
    let secret = dynauth_proto::auth::Secret::new(dynauth_proto::fuzzing::FUZZ_SECRET).unwrap();
    data[4..20].fill(0);
    dynauth_proto::auth::sign_request(data, None, &secret);
}
