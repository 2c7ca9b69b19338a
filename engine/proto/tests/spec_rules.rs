//! One test (at least) per rule of SPEC.md, named after the rule and citing its RFC section.
//! Each drives the real `Engine` through `handle` and checks the bytes that come out.

pub(crate) mod common;

/// The store the shared test support runs the engine over (see `common`).
#[allow(dead_code)]
type StoreUnderTest = dynauth_proto::store::MemoryStore;

use common::*;
use dynauth_proto::auth::Secret;
use dynauth_proto::client::{AnswerSigning, Client, ClientPolicy, MultiSessionPolicy, NasIdentity};
use dynauth_proto::counters::{Discard, RequestKind};
use dynauth_proto::dict::{ErrorCause, attr, code, vendor};
use dynauth_proto::session::{KeyProfile, Session};
use dynauth_proto::store::SessionStore;
use dynauth_proto::{Now, Outcome};

const DM: u8 = code::DISCONNECT_REQUEST;
const COA: u8 = code::COA_REQUEST;

fn sess1() -> Vec<Session> {
    vec![Session {
        acct_session_id: Some("sess-1".into()),
        user_name: Some("alice".into()),
        framed_ip: Some("10.0.0.1".parse().unwrap()),
        ..Session::default()
    }]
}

fn default_fixture() -> Fixture {
    Fixture::new(ClientPolicy::default(), sess1())
}

fn dm_sess1(id: u8) -> Vec<u8> {
    request(DM, id, &[(attr::ACCT_SESSION_ID, b"sess-1")], false)
}

// ---------------------------------------------------------------- §2 silent discards

#[test]
fn spec_2_1_unknown_source_is_discarded_rfc5176_s6_1() {
    let mut f = default_fixture();
    let from = "127.0.0.2:40000".parse().unwrap();
    let (outcome, reply) = f.handle_at(&dm_sess1(1), from, NOW);
    assert_eq!(outcome, Outcome::Discard(Discard::UnknownClient));
    assert!(reply.is_none());
    assert_eq!(f.engine.counters().unknown_client, 1);
    assert_eq!(f.store.len(), 1, "nothing changed");
}

#[test]
fn spec_2_1_empty_client_list_admits_nobody() {
    let mut f = Fixture::with_clients(vec![], sess1(), NasIdentity::default());
    assert_eq!(f.discard(&dm_sess1(1)), Discard::UnknownClient);
}

#[test]
fn spec_2_2_short_datagrams_and_bad_length_fields_are_discarded_rfc2865_s3() {
    let mut f = default_fixture();
    let good = dm_sess1(1);
    assert_eq!(f.discard(&good[..19]), Discard::Malformed);
    let mut low = good.clone();
    low[2..4].copy_from_slice(&19u16.to_be_bytes());
    assert_eq!(f.discard(&low), Discard::Malformed);
    let mut high = good.clone();
    high[2..4].copy_from_slice(&4097u16.to_be_bytes());
    high.resize(4200, 0);
    assert_eq!(f.discard(&high), Discard::Malformed);
    assert_eq!(f.discard(&good[..good.len() - 1]), Discard::Malformed);
    let c = &f.engine.counters().per_client[0];
    assert_eq!(c.discarded(Discard::Malformed), 4);
}

#[test]
fn spec_2_2_octets_after_length_are_padding_rfc2865_s3() {
    let mut f = default_fixture();
    let mut padded = dm_sess1(1);
    padded.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    let reply = f.answer(&padded);
    assert_eq!(reply.code, code::DISCONNECT_ACK);
}

#[test]
fn spec_2_3_codes_other_than_40_and_43_are_discarded_rfc5176_s3() {
    let mut f = default_fixture();
    for c in [1u8, 2, 4, 5, 12, 41, 42, 44, 45, 255] {
        let p = request(c, 1, &[(attr::ACCT_SESSION_ID, b"sess-1")], false);
        assert_eq!(f.discard(&p), Discard::UnsupportedCode, "code {c}");
    }
    assert_eq!(f.store.len(), 1);
}

#[test]
fn spec_2_4_wrong_request_authenticator_is_discarded_rfc5176_s3_4() {
    let mut f = default_fixture();
    let p = request_with_secret(
        DM,
        1,
        &[(attr::ACCT_SESSION_ID, b"sess-1")],
        false,
        "testing124",
    );
    assert_eq!(f.discard(&p), Discard::BadRequestAuthenticator);
    let mut p = dm_sess1(2);
    p[7] ^= 1;
    assert_eq!(f.discard(&p), Discard::BadRequestAuthenticator);
    assert_eq!(f.store.len(), 1, "nothing changed");
}

#[test]
fn spec_2_5_wrong_message_authenticator_is_discarded_rfc3579_s3_2() {
    let mut f = default_fixture();
    let mut p = request(DM, 1, &[(attr::ACCT_SESSION_ID, b"sess-1")], true);
    // Corrupt the M-A value, then fix the Request Authenticator so only the M-A is wrong.
    p[22] ^= 0x80;
    p[4..20].fill(0);
    dynauth_proto::auth::sign_request(&mut p, None, &Secret::new(SECRET).unwrap());
    assert_eq!(f.discard(&p), Discard::BadMessageAuthenticator);
    assert_eq!(f.store.len(), 1);
}

#[test]
fn spec_2_5_message_authenticator_of_wrong_length_or_repeated_is_discarded() {
    let mut f = default_fixture();
    let p = request(
        DM,
        1,
        &[
            (attr::MESSAGE_AUTHENTICATOR, &[0; 15]),
            (attr::ACCT_SESSION_ID, b"sess-1"),
        ],
        false,
    );
    assert_eq!(f.discard(&p), Discard::BadMessageAuthenticator);
    let mut p = request(
        DM,
        2,
        &[
            (attr::ACCT_SESSION_ID, b"sess-1"),
            (attr::MESSAGE_AUTHENTICATOR, &[0; 16]),
        ],
        true,
    );
    resign(&mut p);
    assert_eq!(f.discard(&p), Discard::BadMessageAuthenticator);
}

#[test]
fn spec_2_5_missing_message_authenticator_when_required_is_discarded() {
    let policy = ClientPolicy {
        require_message_authenticator: true,
        ..ClientPolicy::default()
    };
    let mut f = Fixture::new(policy, sess1());
    assert_eq!(
        f.discard(&dm_sess1(1)),
        Discard::MissingMessageAuthenticator
    );
    let signed = request(DM, 2, &[(attr::ACCT_SESSION_ID, b"sess-1")], true);
    assert_eq!(f.answer(&signed).code, code::DISCONNECT_ACK);
}

#[test]
fn spec_2_5_message_authenticator_anywhere_in_the_request_verifies() {
    let mut f = default_fixture();
    let mut p = request(
        DM,
        3,
        &[
            (attr::ACCT_SESSION_ID, b"sess-1"),
            (attr::MESSAGE_AUTHENTICATOR, &[0; 16]),
        ],
        false,
    );
    resign(&mut p);
    assert_eq!(f.answer(&p).code, code::DISCONNECT_ACK);
}

fn with_timestamp(id: u8, ts: u32) -> Vec<u8> {
    request(
        DM,
        id,
        &[
            (attr::ACCT_SESSION_ID, b"sess-1"),
            (attr::EVENT_TIMESTAMP, &ts.to_be_bytes()),
        ],
        false,
    )
}

#[test]
fn spec_2_6_event_timestamp_outside_window_is_discarded_rfc5176_s3_4() {
    let mut f = default_fixture();
    let now = NOW.unix_secs as u32;
    assert_eq!(
        f.discard(&with_timestamp(1, now - 301)),
        Discard::EventTimestampOutsideWindow
    );
    assert_eq!(
        f.discard(&with_timestamp(2, now + 301)),
        Discard::EventTimestampOutsideWindow
    );
    assert_eq!(f.store.len(), 1);
    assert_eq!(
        f.answer(&with_timestamp(3, now - 300)).code,
        code::DISCONNECT_ACK
    );
}

#[test]
fn spec_2_6_window_is_configurable() {
    let policy = ClientPolicy {
        event_timestamp_window_secs: 10,
        ..ClientPolicy::default()
    };
    let mut f = Fixture::new(policy, sess1());
    let now = NOW.unix_secs as u32;
    assert_eq!(
        f.discard(&with_timestamp(1, now - 11)),
        Discard::EventTimestampOutsideWindow
    );
    assert_eq!(
        f.answer(&with_timestamp(2, now + 10)).code,
        code::DISCONNECT_ACK
    );
}

#[test]
fn spec_2_6_missing_event_timestamp_when_required_is_discarded() {
    let policy = ClientPolicy {
        require_event_timestamp: true,
        ..ClientPolicy::default()
    };
    let mut f = Fixture::new(policy, sess1());
    assert_eq!(f.discard(&dm_sess1(1)), Discard::MissingEventTimestamp);
    assert_eq!(
        f.answer(&with_timestamp(2, NOW.unix_secs as u32)).code,
        code::DISCONNECT_ACK
    );
}

#[test]
fn spec_2_6_malformed_event_timestamp_counts_as_missing_when_required_rfc5176_s3_4() {
    let malformed = |id: u8| {
        request(
            DM,
            id,
            &[
                (attr::ACCT_SESSION_ID, b"sess-1"),
                (attr::EVENT_TIMESTAMP, &[0x6a, 0x00, 0x00]),
            ],
            false,
        )
    };
    let required = ClientPolicy {
        require_event_timestamp: true,
        ..ClientPolicy::default()
    };
    let mut f = Fixture::new(required, sess1());
    assert_eq!(f.discard(&malformed(1)), Discard::MissingEventTimestamp);
    assert_eq!(f.store.len(), 1, "nothing changed");
    let c = &f.engine.counters().per_client[0];
    assert_eq!(c.discarded(Discard::MissingEventTimestamp), 1);
    assert_eq!(c.naks_total(RequestKind::Disconnect), 0);
    // Not required: a malformed value is a NAK 407 (SPEC §7), as before.
    let mut f = default_fixture();
    let reply = f.answer(&malformed(2));
    assert_eq!(reply.code, code::DISCONNECT_NAK);
    assert_eq!(reply.error_cause(), Some(ErrorCause::InvalidAttributeValue));
    assert_eq!(f.store.len(), 1);
}

#[test]
fn spec_2_discards_never_reveal_whether_the_secret_was_right() {
    // A wrong secret and an unknown code both give no answer at all; the counters tell them apart.
    let mut f = default_fixture();
    let wrong = request_with_secret(DM, 1, &[(attr::ACCT_SESSION_ID, b"x")], false, "nope");
    assert!(f.handle(&wrong).1.is_none());
    let c = &f.engine.counters().per_client[0];
    assert_eq!(c.discarded(Discard::BadRequestAuthenticator), 1);
    assert_eq!(c.acks, [0, 0]);
    assert_eq!(c.naks_total(RequestKind::Disconnect), 0);
}

// ---------------------------------------------------------------- §3 authenticators

#[test]
fn spec_3_answers_carry_message_authenticator_first_by_default_rfc5176_s3_5() {
    let mut f = default_fixture();
    let reply = f.answer(&dm_sess1(1));
    assert_eq!(reply.types().first(), Some(&attr::MESSAGE_AUTHENTICATOR));
    let nak = f.answer(&request(DM, 2, &[(attr::ACCT_SESSION_ID, b"nope")], false));
    assert_eq!(nak.types()[0], attr::MESSAGE_AUTHENTICATOR);
    assert_eq!(nak.error_cause(), Some(ErrorCause::SessionContextNotFound));
}

#[test]
fn spec_3_answer_signing_when_requested_follows_the_request() {
    let policy = ClientPolicy {
        answer_message_authenticator: AnswerSigning::WhenRequested,
        ..ClientPolicy::default()
    };
    let mut f = Fixture::new(policy, sess1());
    let plain = f.answer(&request(DM, 1, &[(attr::ACCT_SESSION_ID, b"x")], false));
    assert!(!plain.types().contains(&attr::MESSAGE_AUTHENTICATOR));
    let signed = f.answer(&request(DM, 2, &[(attr::ACCT_SESSION_ID, b"x")], true));
    assert_eq!(signed.types()[0], attr::MESSAGE_AUTHENTICATOR);
}

#[test]
fn spec_3_two_live_secrets_during_a_change_either_verifies() {
    let mut client = Client::new(
        "127.0.0.1/32".parse().unwrap(),
        Secret::new("new-secret").unwrap(),
    );
    client.previous_secret = Some(Secret::new(SECRET).unwrap());
    let mut f = Fixture::with_clients(vec![client], sess1(), NasIdentity::default());
    // Signed with the previous secret: accepted, and the answer is signed with it (checked
    // by the fixture, which verifies with SECRET).
    let reply = f.answer(&dm_sess1(1));
    assert_eq!(reply.code, code::DISCONNECT_ACK);
    // Signed with the new secret: accepted too (the fixture cannot verify the answer with
    // SECRET, so check the outcome only).
    let p = request_with_secret(DM, 2, &[(attr::ACCT_SESSION_ID, b"x")], false, "new-secret");
    let outcome = f
        .engine
        .handle(&p, source(), destination(), NOW, &mut f.out);
    assert!(matches!(outcome, Outcome::Answer(a) if a.code == code::DISCONNECT_NAK));
    let answer = dynauth_proto::codec::Packet::parse(
        &f.out[..match outcome {
            Outcome::Answer(a) => a.len,
            _ => 0,
        }],
    )
    .unwrap();
    let request_auth = dynauth_proto::codec::Packet::parse(&p).unwrap();
    assert_eq!(
        dynauth_proto::auth::verify_response(
            &answer,
            request_auth.authenticator(),
            &Secret::new("new-secret").unwrap()
        ),
        dynauth_proto::auth::ResponseCheck::Valid
    );
    // A third secret: discarded.
    let p = request_with_secret(DM, 3, &[(attr::ACCT_SESSION_ID, b"x")], false, "old-old");
    assert_eq!(f.discard(&p), Discard::BadRequestAuthenticator);
}

// ---------------------------------------------------------------- §4 duplicates

#[test]
fn spec_4_retransmitted_disconnect_gets_the_cached_ack_not_503_rfc5080_s2_2_2() {
    let mut f = default_fixture();
    let p = dm_sess1(7);
    let first = f.answer(&p);
    assert_eq!(first.code, code::DISCONNECT_ACK);
    let (outcome, second) = f.handle(&p);
    assert!(matches!(outcome, Outcome::Replay { .. }), "{outcome:?}");
    assert_eq!(second.unwrap().bytes, first.bytes, "byte for byte");
    assert_eq!(f.events(), vec!["removed sess-1"], "processed once");
    assert_eq!(f.engine.counters().per_client[0].duplicates[0], 1);
}

#[test]
fn spec_4_cached_answer_only_for_an_authenticated_copy_rfc5080_s2_2_2_rfc5176_s3_4() {
    let mut f = Fixture::new(ClientPolicy::default(), {
        let mut s = sess1();
        s.push(session("sess-2"));
        s
    });
    let p = dm_sess1(7);
    let first = f.answer(&p);
    assert_eq!(first.code, code::DISCONNECT_ACK);
    // The first 20 octets of the answered request (Code, Identifier, Length, Request
    // Authenticator) with another body of the same length: it does not authenticate, so it
    // must not be answered from the cache.
    let mut forged = p.clone();
    let other = request(DM, 7, &[(attr::ACCT_SESSION_ID, b"sess-2")], false);
    assert_eq!(other.len(), p.len());
    forged[20..].copy_from_slice(&other[20..]);
    assert_eq!(f.discard(&forged), Discard::BadRequestAuthenticator);
    // The same header with a longer body (Length left as it was: the extra octets are padding,
    // and the body inside Length still differs).
    let mut padded = forged.clone();
    padded.extend_from_slice(&[attr::ACCT_SESSION_ID, 8, b's', b'e', b's', b's', b'-', b'2']);
    assert_eq!(f.discard(&padded), Discard::BadRequestAuthenticator);
    assert_eq!(f.store.len(), 1, "sess-2 untouched");
    // The real retransmission still gets the identical cached bytes.
    let (outcome, again) = f.handle(&p);
    assert!(matches!(outcome, Outcome::Replay { .. }), "{outcome:?}");
    assert_eq!(again.unwrap().bytes, first.bytes, "byte for byte");
    assert_eq!(f.events(), vec!["removed sess-1"], "processed once");
    let c = &f.engine.counters().per_client[0];
    assert_eq!(c.requests[0], 4, "every datagram counts as a request");
    assert_eq!(
        c.duplicates[0], 1,
        "only the authenticated copy is a duplicate"
    );
    assert_eq!(c.discarded(Discard::BadRequestAuthenticator), 2);
}

#[test]
fn spec_4_same_identifier_with_new_authenticator_is_a_new_request() {
    let mut f = default_fixture();
    let first = f.answer(&dm_sess1(7));
    assert_eq!(first.code, code::DISCONNECT_ACK);
    // Same source, port, Identifier; an Event-Timestamp makes the authenticator differ.
    let again = f.answer(&with_timestamp(7, NOW.unix_secs as u32));
    assert_ne!(again.bytes, first.bytes);
    // SPEC §4: the late retry finds the tombstone: ACK with Error-Cause 201.
    assert_eq!(again.code, code::DISCONNECT_ACK);
    assert_eq!(
        again.error_cause(),
        Some(ErrorCause::ResidualSessionContextRemoved)
    );
}

#[test]
fn spec_4_duplicate_key_includes_source_port() {
    let mut f = default_fixture();
    let p = dm_sess1(7);
    assert_eq!(f.answer(&p).code, code::DISCONNECT_ACK);
    let other_port = "127.0.0.1:40001".parse().unwrap();
    let (outcome, reply) = f.handle_at(&p, other_port, NOW);
    assert!(
        matches!(outcome, Outcome::Answer(_)),
        "processed as new: {outcome:?}"
    );
    assert_eq!(
        reply.unwrap().error_cause(),
        Some(ErrorCause::ResidualSessionContextRemoved)
    );
}

#[test]
fn spec_4_cache_window_equals_event_timestamp_window() {
    let policy = ClientPolicy {
        event_timestamp_window_secs: 5,
        ..ClientPolicy::default()
    };
    let mut f = Fixture::new(policy, sess1());
    let p = request(
        COA,
        9,
        &[
            (attr::ACCT_SESSION_ID, b"sess-1"),
            (attr::SESSION_TIMEOUT, &60u32.to_be_bytes()),
        ],
        false,
    );
    assert_eq!(f.answer(&p).code, code::COA_ACK);
    let within = Now {
        monotonic_ms: NOW.monotonic_ms + 5_000,
        ..NOW
    };
    assert!(matches!(
        f.handle_at(&p, source(), within).0,
        Outcome::Replay { .. }
    ));
    let after = Now {
        monotonic_ms: NOW.monotonic_ms + 5_001,
        ..NOW
    };
    assert!(matches!(
        f.handle_at(&p, source(), after).0,
        Outcome::Answer(_)
    ));
    assert_eq!(f.events(), vec!["changed sess-1", "changed sess-1"]);
}

// SPEC §4.6 (RFC 5176 §3.5, Error-Cause 201): a tombstone answers a client's late retry for
// that client's replay window (its Event-Timestamp window, also its duplicate-cache window),
// not for the store's own 300 s: with a 10 s window, a retry 9 s after the removal gets ACK
// 201 and one 11 s after gets NAK 503 (the store alone would still say 201).
#[test]
fn spec_4_6_tombstone_window_follows_the_client_window_rfc5176_s3_5() {
    let policy = ClientPolicy {
        event_timestamp_window_secs: 10,
        ..ClientPolicy::default()
    };
    let mut f = Fixture::new(policy, sess1());
    assert_eq!(f.answer(&dm_sess1(1)).code, code::DISCONNECT_ACK);
    let at = |secs: u64| Now {
        unix_secs: NOW.unix_secs + secs,
        monotonic_ms: NOW.monotonic_ms + secs * 1000,
    };
    // New Identifiers: new requests, not copies from the duplicate cache.
    let (_, within) = f.handle_at(&dm_sess1(2), source(), at(9));
    let within = within.expect("an answer within the window");
    assert_eq!(within.code, code::DISCONNECT_ACK);
    assert_eq!(
        within.error_cause(),
        Some(ErrorCause::ResidualSessionContextRemoved)
    );
    let (_, after) = f.handle_at(&dm_sess1(3), source(), at(11));
    let after = after.expect("an answer after the window");
    assert_eq!(after.code, code::DISCONNECT_NAK);
    assert_eq!(
        after.error_cause(),
        Some(ErrorCause::SessionContextNotFound)
    );
}

// ---------------------------------------------------------------- §5 NAS identification

fn nas() -> NasIdentity {
    NasIdentity {
        identifiers: vec!["bng-1".into()],
        ipv4: vec!["192.0.2.1".parse().unwrap()],
        ipv6: vec!["2001:db8::1".parse().unwrap()],
    }
}

#[test]
fn spec_5_nas_identification_must_match_or_403_rfc5176_s3() {
    let mut f = Fixture::with_nas(ClientPolicy::default(), sess1(), nas());
    let cases: [(u8, Vec<u8>); 3] = [
        (attr::NAS_IP_ADDRESS, vec![192, 0, 2, 2]),
        (attr::NAS_IDENTIFIER, b"bng-2".to_vec()),
        (
            attr::NAS_IPV6_ADDRESS,
            "2001:db8::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
                .to_vec(),
        ),
    ];
    for (i, (ty, v)) in cases.iter().enumerate() {
        let p = request(
            DM,
            i as u8,
            &[(*ty, v), (attr::ACCT_SESSION_ID, b"sess-1")],
            false,
        );
        let reply = f.answer(&p);
        assert_eq!(reply.code, code::DISCONNECT_NAK);
        assert_eq!(
            reply.error_cause(),
            Some(ErrorCause::NasIdentificationMismatch),
            "attr {ty}"
        );
    }
    assert_eq!(f.store.len(), 1);
    let ok = request(
        DM,
        9,
        &[
            (attr::NAS_IP_ADDRESS, &[192, 0, 2, 1]),
            (attr::NAS_IDENTIFIER, b"bng-1"),
            (
                attr::NAS_IPV6_ADDRESS,
                &"2001:db8::1"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets(),
            ),
            (attr::ACCT_SESSION_ID, b"sess-1"),
        ],
        false,
    );
    assert_eq!(f.answer(&ok).code, code::DISCONNECT_ACK);
}

#[test]
fn spec_5_absent_nas_identification_means_this_nas_unless_required() {
    let mut f = Fixture::with_nas(ClientPolicy::default(), sess1(), nas());
    assert_eq!(f.answer(&dm_sess1(1)).code, code::DISCONNECT_ACK);
    let policy = ClientPolicy {
        require_nas_identification: true,
        ..ClientPolicy::default()
    };
    let mut f = Fixture::with_nas(policy, sess1(), nas());
    let reply = f.answer(&dm_sess1(1));
    assert_eq!(reply.error_cause(), Some(ErrorCause::MissingAttribute));
}

#[test]
fn spec_5_5_operator_name_is_accepted_and_not_checked_rfc8559_s3_1() {
    // Operator-Name (126) names the NAS's operator; a DAS has no operator name of its own to
    // compare, so it neither fails the request (401) nor counts as NAS identification for a
    // client that must send one (a router routes by it: docs/SCALE_OUT.md).
    let mut f = Fixture::with_nas(ClientPolicy::default(), sess1(), nas());
    let p = request(
        DM,
        1,
        &[
            (attr::OPERATOR_NAME, b"1example.net"),
            (attr::ACCT_SESSION_ID, b"sess-1"),
        ],
        false,
    );
    assert_eq!(f.answer(&p).code, code::DISCONNECT_ACK);
    // Malformed (empty): NAK 407, like any attribute with a bad value.
    let p = request(
        DM,
        2,
        &[
            (attr::OPERATOR_NAME, b""),
            (attr::ACCT_SESSION_ID, b"sess-1"),
        ],
        false,
    );
    assert_eq!(
        f.answer(&p).error_cause(),
        Some(ErrorCause::InvalidAttributeValue)
    );
}

// ---------------------------------------------------------------- §6 identification

#[test]
fn spec_6_1_every_identification_attribute_must_match_rfc5176_s3() {
    let mut f = default_fixture();
    let p = request(
        DM,
        1,
        &[
            (attr::ACCT_SESSION_ID, b"sess-1"),
            (attr::USER_NAME, b"alice"),
            (attr::FRAMED_IP_ADDRESS, &[10, 0, 0, 1]),
        ],
        false,
    );
    assert_eq!(f.answer(&p).code, code::DISCONNECT_ACK);
}

#[test]
fn spec_6_1_ipv6_prefix_compared_after_masking_rfc3162_s2_3() {
    let mut s = sess1();
    s[0].framed_ipv6_prefix = Some("2001:db8:2::/64".parse().unwrap());
    let mut f = Fixture::new(ClientPolicy::default(), s);
    // 16 prefix octets with host bits set (FreeRADIUS's form plus noise): still the same prefix.
    let mut v = vec![0u8, 64];
    v.extend_from_slice(
        &"2001:db8:2::ff"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    let p = request(DM, 1, &[(attr::FRAMED_IPV6_PREFIX, &v)], false);
    assert_eq!(f.answer(&p).code, code::DISCONNECT_ACK);
}

#[test]
fn spec_6_2_no_identification_attribute_is_nak_402_rfc5176_s3() {
    let mut f = default_fixture();
    let p = request(DM, 1, &[(attr::NAS_IP_ADDRESS, &[127, 0, 0, 1])], false);
    let reply = f.answer(&p);
    assert_eq!(reply.code, code::DISCONNECT_NAK);
    assert_eq!(reply.error_cause(), Some(ErrorCause::MissingAttribute));
    let coa = request(
        COA,
        2,
        &[(attr::SESSION_TIMEOUT, &5u32.to_be_bytes())],
        false,
    );
    assert_eq!(
        f.answer(&coa).error_cause(),
        Some(ErrorCause::MissingAttribute)
    );
}

fn two_bearers() -> Vec<Session> {
    ["001010000000001", "001010000000002"]
        .iter()
        .enumerate()
        .map(|(i, imsi)| Session {
            acct_session_id: Some(format!("bearer-{i}")),
            imsi: Some((*imsi).into()),
            nsapi: Some("5".into()),
            ..Session::default()
        })
        .collect()
}

#[test]
fn spec_6_2_nsapi_without_imsi_is_no_identification_nak_402_rfc5176_s3() {
    let mut f = Fixture::new(ClientPolicy::default(), two_bearers());
    let nsapi = vsa(vendor::THREE_GPP, vendor::THREE_GPP_NSAPI, b"5");
    let reply = f.answer(&request(DM, 1, &[(attr::VENDOR_SPECIFIC, &nsapi)], false));
    assert_eq!(reply.code, code::DISCONNECT_NAK);
    assert_eq!(reply.error_cause(), Some(ErrorCause::MissingAttribute));
    assert_eq!(f.store.len(), 2, "no session selected by NSAPI alone");
    assert!(f.events().is_empty());
    // With the IMSI, NSAPI narrows it (AND): a wrong NSAPI finds nothing, the right one
    // removes only that subscriber's bearer.
    let imsi = vsa(
        vendor::THREE_GPP,
        vendor::THREE_GPP_IMSI,
        b"001010000000002",
    );
    let nsapi6 = vsa(vendor::THREE_GPP, vendor::THREE_GPP_NSAPI, b"6");
    let wrong = f.answer(&request(
        DM,
        2,
        &[
            (attr::VENDOR_SPECIFIC, &imsi),
            (attr::VENDOR_SPECIFIC, &nsapi6),
        ],
        false,
    ));
    assert_eq!(wrong.code, code::DISCONNECT_NAK);
    assert_eq!(f.store.len(), 2);
    let right = f.answer(&request(
        DM,
        3,
        &[
            (attr::VENDOR_SPECIFIC, &imsi),
            (attr::VENDOR_SPECIFIC, &nsapi),
        ],
        false,
    ));
    assert_eq!(right.code, code::DISCONNECT_ACK);
    assert_eq!(f.events(), vec!["removed bearer-1"]);
}

#[test]
fn spec_6_3_smf_profile_needs_a_complete_combination() {
    let policy = ClientPolicy {
        key_profile: KeyProfile::Smf5g,
        ..ClientPolicy::default()
    };
    let sessions = vec![Session {
        imsi: Some("001010123456789".into()),
        nsapi: Some("5".into()),
        framed_ip: Some("10.9.9.9".parse().unwrap()),
        called_station_id: Some("ims".into()),
        acct_session_id: Some("smf-1".into()),
        ..Session::default()
    }];
    let mut f = Fixture::new(policy, sessions);
    let imsi = vsa(
        vendor::THREE_GPP,
        vendor::THREE_GPP_IMSI,
        b"001010123456789",
    );
    let nsapi = vsa(vendor::THREE_GPP, vendor::THREE_GPP_NSAPI, b"5");
    let imsi_only = request(DM, 1, &[(attr::VENDOR_SPECIFIC, &imsi)], false);
    assert_eq!(
        f.answer(&imsi_only).error_cause(),
        Some(ErrorCause::MissingAttribute)
    );
    let ip_only = request(DM, 2, &[(attr::FRAMED_IP_ADDRESS, &[10, 9, 9, 9])], false);
    assert_eq!(
        f.answer(&ip_only).error_cause(),
        Some(ErrorCause::MissingAttribute)
    );
    let user = request(DM, 3, &[(attr::USER_NAME, b"x")], false);
    assert_eq!(
        f.answer(&user).error_cause(),
        Some(ErrorCause::MissingAttribute)
    );
    let ip_apn = request(
        DM,
        4,
        &[
            (attr::CALLED_STATION_ID, b"ims"),
            (attr::FRAMED_IP_ADDRESS, &[10, 9, 9, 9]),
        ],
        false,
    );
    let reply = f.answer(&ip_apn);
    assert_eq!(
        reply.code,
        code::DISCONNECT_ACK,
        "{:?}",
        reply.error_cause()
    );
    // And the IMSI+NSAPI combination on a fresh copy.
    let mut f = Fixture::new(
        ClientPolicy {
            key_profile: KeyProfile::Smf5g,
            ..ClientPolicy::default()
        },
        vec![Session {
            imsi: Some("001010123456789".into()),
            nsapi: Some("5".into()),
            ..Session::default()
        }],
    );
    let both = request(
        DM,
        5,
        &[
            (attr::VENDOR_SPECIFIC, &imsi),
            (attr::VENDOR_SPECIFIC, &nsapi),
        ],
        false,
    );
    assert_eq!(f.answer(&both).code, code::DISCONNECT_ACK);
}

#[test]
fn spec_6_4_no_session_found_is_nak_503_rfc5176_s3_5() {
    let mut f = default_fixture();
    let reply = f.answer(&request(
        DM,
        1,
        &[(attr::ACCT_SESSION_ID, b"sess-9")],
        false,
    ));
    assert_eq!(reply.code, code::DISCONNECT_NAK);
    assert_eq!(
        reply.error_cause(),
        Some(ErrorCause::SessionContextNotFound)
    );
}

#[test]
fn spec_6_5_key_found_but_contradicted_is_nak_407() {
    let mut f = default_fixture();
    let p = request(
        DM,
        1,
        &[
            (attr::ACCT_SESSION_ID, b"sess-1"),
            (attr::USER_NAME, b"mallory"),
        ],
        false,
    );
    let reply = f.answer(&p);
    assert_eq!(reply.error_cause(), Some(ErrorCause::InvalidAttributeValue));
    assert_eq!(f.store.len(), 1);
}

fn two_of_alice() -> Vec<Session> {
    vec![
        Session {
            acct_session_id: Some("a1".into()),
            user_name: Some("alice".into()),
            ..Session::default()
        },
        Session {
            acct_session_id: Some("a2".into()),
            user_name: Some("alice".into()),
            ..Session::default()
        },
        Session {
            acct_session_id: Some("b1".into()),
            user_name: Some("bob".into()),
            ..Session::default()
        },
    ]
}

#[test]
fn spec_6_6_several_matches_apply_to_all_rfc5176_s3() {
    let mut f = Fixture::new(ClientPolicy::default(), two_of_alice());
    let reply = f.answer(&request(DM, 1, &[(attr::USER_NAME, b"alice")], false));
    assert_eq!(reply.code, code::DISCONNECT_ACK);
    assert_eq!(f.store.len(), 1);
    let mut events = f.events();
    events.sort();
    assert_eq!(events, vec!["removed a1", "removed a2"]);
    assert_eq!(f.engine.counters().per_client[0].sessions_removed, 2);
}

#[test]
fn spec_6_6_cap_or_single_policy_gives_508_and_changes_nothing() {
    for policy in [
        MultiSessionPolicy::Single,
        MultiSessionPolicy::All { cap: 1 },
    ] {
        let mut f = Fixture::new(
            ClientPolicy {
                multi_session: policy,
                ..ClientPolicy::default()
            },
            two_of_alice(),
        );
        let reply = f.answer(&request(DM, 1, &[(attr::USER_NAME, b"alice")], false));
        assert_eq!(
            reply.error_cause(),
            Some(ErrorCause::MultipleSessionSelectionUnsupported)
        );
        assert_eq!(f.store.len(), 3);
        let coa = request(
            COA,
            2,
            &[
                (attr::USER_NAME, b"alice"),
                (attr::SESSION_TIMEOUT, &1u32.to_be_bytes()),
            ],
            false,
        );
        assert_eq!(
            f.answer(&coa).error_cause(),
            Some(ErrorCause::MultipleSessionSelectionUnsupported)
        );
        assert!(
            f.store
                .sessions()
                .iter()
                .all(|s| s.authorization.session_timeout.is_none())
        );
        // One match is fine under either policy.
        assert_eq!(
            f.answer(&request(DM, 3, &[(attr::USER_NAME, b"bob")], false))
                .code,
            code::DISCONNECT_ACK
        );
    }
}

fn two_contexts() -> Vec<Session> {
    vec![
        Session {
            acct_session_id: Some("corp-1".into()),
            framed_ip: Some("10.0.0.1".parse().unwrap()),
            called_station_id: Some("corp".into()),
            vrf: Some("red".into()),
            ..Session::default()
        },
        Session {
            acct_session_id: Some("inet-1".into()),
            framed_ip: Some("10.0.0.1".parse().unwrap()),
            called_station_id: Some("internet".into()),
            vrf: Some("blue".into()),
            ..Session::default()
        },
    ]
}

#[test]
fn spec_6_7_called_station_id_scopes_an_address() {
    let mut f = Fixture::new(ClientPolicy::default(), two_contexts());
    let p = request(
        DM,
        1,
        &[
            (attr::CALLED_STATION_ID, b"internet"),
            (attr::FRAMED_IP_ADDRESS, &[10, 0, 0, 1]),
        ],
        false,
    );
    assert_eq!(f.answer(&p).code, code::DISCONNECT_ACK);
    assert_eq!(f.events(), vec!["removed inet-1"]);
}

#[test]
fn spec_6_7_client_vrf_scopes_an_address() {
    let policy = ClientPolicy {
        vrf: Some("red".into()),
        ..ClientPolicy::default()
    };
    let mut f = Fixture::new(policy, two_contexts());
    let p = request(DM, 1, &[(attr::FRAMED_IP_ADDRESS, &[10, 0, 0, 1])], false);
    assert_eq!(f.answer(&p).code, code::DISCONNECT_ACK);
    assert_eq!(f.events(), vec!["removed corp-1"]);
}

// ---------------------------------------------------------------- §7 Disconnect

#[test]
fn spec_7_disconnect_may_carry_the_listed_attributes_rfc5176_s3_table() {
    let mut f = default_fixture();
    let p = request(
        DM,
        1,
        &[
            (attr::ACCT_SESSION_ID, b"sess-1"),
            (attr::PROXY_STATE, b"ps"),
            (attr::REPLY_MESSAGE, b"bye"),
            (attr::CLASS, b"cls"),
            (attr::STATE, b"st"),
            (attr::EVENT_TIMESTAMP, &(NOW.unix_secs as u32).to_be_bytes()),
        ],
        true,
    );
    assert_eq!(f.answer(&p).code, code::DISCONNECT_ACK);
}

#[test]
fn spec_7_unsupported_attributes_in_disconnect_give_401() {
    let unknown_vsa = vsa(311, 1, b"x");
    let cisco_cmd = vsa(
        vendor::CISCO,
        vendor::CISCO_AVPAIR,
        b"subscriber:command=reauthenticate",
    );
    let cases: Vec<(u8, Vec<u8>)> = vec![
        (attr::SERVICE_TYPE, 17u32.to_be_bytes().to_vec()),
        (attr::FILTER_ID, b"f".to_vec()),
        (attr::SESSION_TIMEOUT, 5u32.to_be_bytes().to_vec()),
        (attr::VENDOR_SPECIFIC, unknown_vsa),
        (attr::VENDOR_SPECIFIC, cisco_cmd),
        (attr::ERROR_CAUSE, 503u32.to_be_bytes().to_vec()),
        (200, b"?".to_vec()),
    ];
    for (i, (ty, v)) in cases.iter().enumerate() {
        let mut f = default_fixture();
        let p = request(
            DM,
            i as u8,
            &[(attr::ACCT_SESSION_ID, b"sess-1"), (*ty, v)],
            false,
        );
        let reply = f.answer(&p);
        assert_eq!(reply.code, code::DISCONNECT_NAK, "attr {ty}");
        assert_eq!(
            reply.error_cause(),
            Some(ErrorCause::UnsupportedAttribute),
            "attr {ty}"
        );
        assert_eq!(f.store.len(), 1);
    }
}

#[test]
fn spec_7_malformed_values_give_407() {
    let cases: Vec<(u8, Vec<u8>)> = vec![
        (attr::FRAMED_IP_ADDRESS, vec![10, 0, 0]),
        (attr::NAS_PORT, vec![0, 1]),
        (attr::FRAMED_IPV6_PREFIX, vec![0, 129]),
        (attr::EVENT_TIMESTAMP, vec![1, 2, 3]),
        (attr::FRAMED_INTERFACE_ID, vec![1; 7]),
        (attr::VENDOR_SPECIFIC, vec![0, 0, 0, 9, 1, 40, b'x']),
        (
            attr::VENDOR_SPECIFIC,
            vsa(vendor::CISCO, vendor::CISCO_AVPAIR, b"no-equals-sign"),
        ),
    ];
    for (i, (ty, v)) in cases.iter().enumerate() {
        let mut f = default_fixture();
        let p = request(
            DM,
            i as u8,
            &[(attr::ACCT_SESSION_ID, b"sess-1"), (*ty, v)],
            false,
        );
        let reply = f.answer(&p);
        assert_eq!(
            reply.error_cause(),
            Some(ErrorCause::InvalidAttributeValue),
            "case {i}: attr {ty}"
        );
        assert_eq!(f.store.len(), 1);
    }
}

#[test]
fn spec_7_broken_attribute_framing_gives_404_once_authenticated() {
    let mut f = default_fixture();
    let mut p = request(
        DM,
        1,
        &[
            (attr::PROXY_STATE, b"keep"),
            (attr::ACCT_SESSION_ID, b"sess-1"),
        ],
        false,
    );
    // Make the Acct-Session-Id's length octet overrun the packet.
    let len_at = 20 + 6 + 1;
    p[len_at] = 60;
    resign(&mut p);
    let reply = f.answer(&p);
    assert_eq!(reply.code, code::DISCONNECT_NAK);
    assert_eq!(reply.error_cause(), Some(ErrorCause::InvalidRequest));
    assert_eq!(
        reply.values(attr::PROXY_STATE),
        vec![b"keep".to_vec()],
        "Proxy-State before the break is echoed"
    );
    assert_eq!(f.store.len(), 1);
    // Without a valid authenticator the same packet is silently discarded.
    p[5] ^= 1;
    assert_eq!(f.discard(&p), Discard::BadRequestAuthenticator);
}

#[test]
fn spec_7_repeated_single_valued_attribute_gives_404() {
    let mut f = default_fixture();
    let p = request(
        DM,
        1,
        &[
            (attr::ACCT_SESSION_ID, b"sess-1"),
            (attr::ACCT_SESSION_ID, b"sess-1"),
        ],
        false,
    );
    assert_eq!(f.answer(&p).error_cause(), Some(ErrorCause::InvalidRequest));
}

#[test]
fn spec_7_disconnect_removes_the_session_from_every_index() {
    let mut f = default_fixture();
    assert_eq!(f.answer(&dm_sess1(1)).code, code::DISCONNECT_ACK);
    assert_eq!(f.events(), vec!["removed sess-1"]);
    for (i, (ty, v)) in [
        (attr::USER_NAME, &b"alice"[..]),
        (attr::FRAMED_IP_ADDRESS, &[10, 0, 0, 1][..]),
    ]
    .iter()
    .enumerate()
    {
        let coa = request(
            COA,
            10 + i as u8,
            &[(*ty, v), (attr::SESSION_TIMEOUT, &1u32.to_be_bytes())],
            false,
        );
        assert_eq!(
            f.answer(&coa).error_cause(),
            Some(ErrorCause::SessionContextNotFound)
        );
    }
}

#[test]
fn spec_7_refused_removal_gives_504_and_changes_nothing() {
    let mut f = Fixture::new(ClientPolicy::default(), two_of_alice());
    *f.data_plane.refuse_removal_of.lock().unwrap() = Some("a2".into());
    let reply = f.answer(&request(DM, 1, &[(attr::USER_NAME, b"alice")], false));
    assert_eq!(
        reply.error_cause(),
        Some(ErrorCause::SessionContextNotRemovable)
    );
    assert_eq!(f.store.len(), 3);
    assert!(f.events().is_empty());
}

// ---------------------------------------------------------------- §8 CoA

#[test]
fn spec_8_coa_replaces_present_attributes_and_keeps_absent_ones_rfc5176_s2_2() {
    let mut s = sess1();
    s[0].authorization.filter_ids = vec!["old".into()];
    s[0].authorization.idle_timeout = Some(30);
    let mut f = Fixture::new(ClientPolicy::default(), s);
    let p = request(
        COA,
        1,
        &[
            (attr::ACCT_SESSION_ID, b"sess-1"),
            (attr::SESSION_TIMEOUT, &3600u32.to_be_bytes()),
            (attr::FILTER_ID, b"gold-in"),
            (attr::FILTER_ID, b"gold-out"),
            (attr::CLASS, b"c1"),
            (attr::ACCT_INTERIM_INTERVAL, &300u32.to_be_bytes()),
            (
                attr::VENDOR_SPECIFIC,
                &vsa(
                    vendor::CISCO,
                    vendor::CISCO_AVPAIR,
                    b"subscriber:service-name=gold",
                ),
            ),
        ],
        false,
    );
    let reply = f.answer(&p);
    assert_eq!(reply.code, code::COA_ACK);
    assert_eq!(reply.error_cause(), None, "ACK carries no Error-Cause");
    let a = &f.store.sessions()[0].authorization;
    assert_eq!(a.session_timeout, Some(3600));
    assert_eq!(a.idle_timeout, Some(30), "absent stays");
    assert_eq!(
        a.filter_ids,
        vec!["gold-in", "gold-out"],
        "present replaces all"
    );
    assert_eq!(a.classes, vec![b"c1".to_vec()]);
    assert_eq!(a.acct_interim_interval, Some(300));
    assert_eq!(a.cisco_policies, vec!["subscriber:service-name=gold"]);
    assert_eq!(
        f.store.sessions()[0].user_name.as_deref(),
        Some("alice"),
        "identification is not a change"
    );
}

#[test]
fn spec_8_cisco_subscriber_commands_reach_the_data_plane() {
    for (cmd, event) in [
        (
            &b"subscriber:command=reauthenticate"[..],
            "changed sess-1 reauthenticate",
        ),
        (
            b"subscriber:command=bounce-host-port",
            "changed sess-1 bounce-host-port",
        ),
        (
            b"subscriber:command=disable-host-port",
            "changed sess-1 disable-host-port",
        ),
    ] {
        let mut f = default_fixture();
        let p = request(
            COA,
            1,
            &[
                (attr::ACCT_SESSION_ID, b"sess-1"),
                (
                    attr::VENDOR_SPECIFIC,
                    &vsa(vendor::CISCO, vendor::CISCO_AVPAIR, cmd),
                ),
            ],
            false,
        );
        assert_eq!(f.answer(&p).code, code::COA_ACK);
        assert_eq!(f.events(), vec![event]);
    }
}

#[test]
fn spec_8_unknown_subscriber_command_gives_407_and_unknown_attribute_401() {
    let mut f = default_fixture();
    let p = request(
        COA,
        1,
        &[
            (attr::ACCT_SESSION_ID, b"sess-1"),
            (
                attr::VENDOR_SPECIFIC,
                &vsa(
                    vendor::CISCO,
                    vendor::CISCO_AVPAIR,
                    b"subscriber:command=self-destruct",
                ),
            ),
        ],
        false,
    );
    assert_eq!(
        f.answer(&p).error_cause(),
        Some(ErrorCause::InvalidAttributeValue)
    );
    let p = request(
        COA,
        2,
        &[
            (attr::ACCT_SESSION_ID, b"sess-1"),
            (attr::NAS_PORT_ID, b"x"),
            (7, &[0, 0, 0, 1]),
        ],
        false,
    );
    assert_eq!(
        f.answer(&p).error_cause(),
        Some(ErrorCause::UnsupportedAttribute)
    );
    assert!(f.events().is_empty());
}

#[test]
fn spec_8_authorize_only_gives_507_with_service_type_and_state_echoed_rfc5176_s3_2() {
    let mut f = default_fixture();
    let p = request(
        COA,
        1,
        &[
            (attr::ACCT_SESSION_ID, b"sess-1"),
            (attr::SERVICE_TYPE, &17u32.to_be_bytes()),
            (attr::STATE, b"state-42"),
        ],
        false,
    );
    let reply = f.answer(&p);
    assert_eq!(reply.code, code::COA_NAK);
    assert_eq!(reply.error_cause(), Some(ErrorCause::RequestInitiated));
    assert_eq!(
        reply.values(attr::SERVICE_TYPE),
        vec![17u32.to_be_bytes().to_vec()]
    );
    assert_eq!(reply.values(attr::STATE), vec![b"state-42".to_vec()]);
    assert_eq!(f.events(), vec!["reauthorize sess-1"]);
    assert_eq!(f.engine.counters().per_client[0].authorize_only_requests, 1);
}

#[test]
fn spec_8_authorize_only_disabled_or_other_service_type_gives_405() {
    let mut f = Fixture::new(
        ClientPolicy {
            authorize_only: false,
            ..ClientPolicy::default()
        },
        sess1(),
    );
    let p = request(
        COA,
        1,
        &[
            (attr::ACCT_SESSION_ID, b"sess-1"),
            (attr::SERVICE_TYPE, &17u32.to_be_bytes()),
        ],
        false,
    );
    assert_eq!(
        f.answer(&p).error_cause(),
        Some(ErrorCause::UnsupportedService)
    );
    let mut f = default_fixture();
    let p = request(
        COA,
        2,
        &[
            (attr::ACCT_SESSION_ID, b"sess-1"),
            (attr::SERVICE_TYPE, &2u32.to_be_bytes()),
        ],
        false,
    );
    assert_eq!(
        f.answer(&p).error_cause(),
        Some(ErrorCause::UnsupportedService)
    );
    assert!(f.events().is_empty());
}

#[test]
fn spec_8_authorize_only_with_changes_gives_401() {
    let mut f = default_fixture();
    let p = request(
        COA,
        1,
        &[
            (attr::ACCT_SESSION_ID, b"sess-1"),
            (attr::SERVICE_TYPE, &17u32.to_be_bytes()),
            (attr::SESSION_TIMEOUT, &5u32.to_be_bytes()),
        ],
        false,
    );
    assert_eq!(
        f.answer(&p).error_cause(),
        Some(ErrorCause::UnsupportedAttribute)
    );
}

#[test]
fn spec_8_coa_is_atomic_across_matched_sessions() {
    // A contradiction on one request changes nothing anywhere; a valid one changes all.
    let mut f = Fixture::new(ClientPolicy::default(), two_of_alice());
    let p = request(
        COA,
        1,
        &[
            (attr::USER_NAME, b"alice"),
            (attr::SESSION_TIMEOUT, &77u32.to_be_bytes()),
        ],
        false,
    );
    assert_eq!(f.answer(&p).code, code::COA_ACK);
    let snapshot = f.store.sessions();
    let alice: Vec<_> = snapshot
        .iter()
        .filter(|s| s.user_name.as_deref() == Some("alice"))
        .collect();
    assert_eq!(alice.len(), 2);
    assert!(
        alice
            .iter()
            .all(|s| s.authorization.session_timeout == Some(77))
    );
    assert!(
        snapshot
            .iter()
            .filter(|s| s.user_name.as_deref() == Some("bob"))
            .all(|s| s.authorization.session_timeout.is_none())
    );
    assert_eq!(f.engine.counters().per_client[0].sessions_changed, 2);
}

// ---------------------------------------------------------------- §9 every answer

#[test]
fn spec_9_proxy_state_echoed_in_order_after_other_attributes_rfc5176_s3_1() {
    let mut f = default_fixture();
    let p = request(
        DM,
        1,
        &[
            (attr::PROXY_STATE, &[0, 1, 2, 3]),
            (attr::ACCT_SESSION_ID, b"nope"),
            (attr::PROXY_STATE, b"ps-two"),
        ],
        false,
    );
    let reply = f.answer(&p);
    assert_eq!(
        reply.values(attr::PROXY_STATE),
        vec![vec![0, 1, 2, 3], b"ps-two".to_vec()]
    );
    let types = reply.types();
    assert_eq!(
        types,
        vec![
            attr::MESSAGE_AUTHENTICATOR,
            attr::ERROR_CAUSE,
            attr::PROXY_STATE,
            attr::PROXY_STATE
        ]
    );
}

#[test]
fn spec_9_proxy_state_count_is_capped() {
    let mut f = Fixture::new(
        ClientPolicy {
            max_proxy_states: 2,
            ..ClientPolicy::default()
        },
        sess1(),
    );
    let p = request(
        DM,
        1,
        &[
            (attr::PROXY_STATE, b"1"),
            (attr::PROXY_STATE, b"2"),
            (attr::PROXY_STATE, b"3"),
            (attr::ACCT_SESSION_ID, b"sess-1"),
        ],
        false,
    );
    assert_eq!(f.discard(&p), Discard::TooManyProxyStates);
    assert_eq!(f.store.len(), 1);
}

#[test]
fn spec_9_request_whose_answer_could_not_fit_is_discarded_before_any_change_rfc5176_s3_1() {
    let mut f = default_fixture();
    // 20 + 8 (Acct-Session-Id) + 4060 octets of Proxy-State = 4088 octets: a valid request,
    // but its ACK (20 + 18 Message-Authenticator + 4060 echoed) would need 4098.
    let full = [0x5a; 253];
    let last = [0xa5; 233];
    let mut attrs: Vec<(u8, &[u8])> = vec![(attr::ACCT_SESSION_ID, b"sess-1")];
    attrs.extend(std::iter::repeat_n((attr::PROXY_STATE, &full[..]), 15));
    attrs.push((attr::PROXY_STATE, &last[..]));
    let p = request(DM, 1, &attrs, false);
    assert_eq!(p.len(), 4088);
    assert_eq!(f.discard(&p), Discard::AnswerWouldNotFit);
    assert_eq!(f.store.len(), 1, "the session is still there");
    assert!(f.events().is_empty(), "nothing reached the data plane");
    let c = &f.engine.counters().per_client[0];
    assert_eq!(c.discarded(Discard::AnswerWouldNotFit), 1);
    // A following normal Disconnect still finds the session (a plain ACK, not 201).
    let ack = f.answer(&dm_sess1(2));
    assert_eq!(ack.code, code::DISCONNECT_ACK);
    assert_eq!(ack.error_cause(), None);
    assert_eq!(f.events(), vec!["removed sess-1"]);
}

#[test]
fn spec_9_state_echoed_unchanged_in_ack_and_nak() {
    let mut f = default_fixture();
    let ack = f.answer(&request(
        DM,
        1,
        &[
            (attr::ACCT_SESSION_ID, b"sess-1"),
            (attr::STATE, b"\x00st\xff"),
        ],
        false,
    ));
    assert_eq!(ack.values(attr::STATE), vec![b"\x00st\xff".to_vec()]);
    let nak = f.answer(&request(
        DM,
        2,
        &[(attr::ACCT_SESSION_ID, b"zz"), (attr::STATE, b"s2")],
        false,
    ));
    assert_eq!(nak.values(attr::STATE), vec![b"s2".to_vec()]);
}

#[test]
fn spec_9_every_state_echoed_in_order_even_in_the_404_for_repeats_rfc5176_s3_1() {
    let mut f = default_fixture();
    let nak = f.answer(&request(
        DM,
        1,
        &[
            (attr::STATE, b"first"),
            (attr::ACCT_SESSION_ID, b"sess-1"),
            (attr::PROXY_STATE, b"ps"),
            (attr::STATE, b"\x00second"),
        ],
        false,
    ));
    assert_eq!(nak.code, code::DISCONNECT_NAK);
    assert_eq!(nak.error_cause(), Some(ErrorCause::InvalidRequest));
    assert_eq!(
        nak.values(attr::STATE),
        vec![b"first".to_vec(), b"\x00second".to_vec()],
        "every State, in wire order"
    );
    assert_eq!(
        nak.types(),
        vec![
            attr::MESSAGE_AUTHENTICATOR,
            attr::ERROR_CAUSE,
            attr::STATE,
            attr::STATE,
            attr::PROXY_STATE
        ]
    );
    assert_eq!(f.store.len(), 1, "a 404 changes nothing");
}

#[test]
fn spec_9_nak_carries_exactly_one_error_cause_and_ack_none() {
    let mut f = default_fixture();
    // Several problems at once: still exactly one Error-Cause.
    let p = request(
        DM,
        1,
        &[
            (attr::SERVICE_TYPE, &1u32.to_be_bytes()),
            (attr::FRAMED_IP_ADDRESS, &[1, 2, 3]),
        ],
        false,
    );
    let reply = f.answer(&p);
    assert_eq!(reply.error_causes().len(), 1);
    assert_eq!(reply.error_cause(), Some(ErrorCause::UnsupportedAttribute));
    let ack = f.answer(&dm_sess1(2));
    assert!(ack.error_causes().is_empty());
}

#[test]
fn spec_9_optional_reply_message_reason() {
    let mut f = default_fixture();
    let reply = f.answer(&request(DM, 1, &[(attr::ACCT_SESSION_ID, b"zz")], false));
    assert!(
        reply.values(attr::REPLY_MESSAGE).is_empty(),
        "off by default"
    );
    let mut f = Fixture::new(
        ClientPolicy {
            reply_message_reasons: true,
            ..ClientPolicy::default()
        },
        sess1(),
    );
    let reply = f.answer(&request(DM, 1, &[(attr::ACCT_SESSION_ID, b"zz")], false));
    assert_eq!(
        reply.values(attr::REPLY_MESSAGE),
        vec![b"No Matching Session".to_vec()]
    );
    let ack = f.answer(&dm_sess1(2));
    assert!(
        ack.values(attr::REPLY_MESSAGE).is_empty(),
        "never on an ACK"
    );
}

// ---------------------------------------------------------------- §10 counters

#[test]
fn spec_10_counters_count_every_request_answer_and_discard_rfc4673() {
    let mut f = default_fixture();
    f.answer(&dm_sess1(1));
    f.answer(&request(DM, 2, &[(attr::ACCT_SESSION_ID, b"zz")], false));
    f.answer(&request(
        COA,
        3,
        &[
            (attr::ACCT_SESSION_ID, b"zz"),
            (attr::SESSION_TIMEOUT, &1u32.to_be_bytes()),
        ],
        false,
    ));
    f.handle(&dm_sess1(1)); // duplicate
    f.discard(&request_with_secret(
        DM,
        4,
        &[(attr::ACCT_SESSION_ID, b"zz")],
        false,
        "bad",
    ));
    let c = &f.engine.counters().per_client[0];
    assert_eq!(c.requests, [4, 1]);
    assert_eq!(c.acks, [1, 0]);
    assert_eq!(
        c.nak(RequestKind::Disconnect, ErrorCause::SessionContextNotFound),
        1
    );
    assert_eq!(
        c.nak(RequestKind::Coa, ErrorCause::SessionContextNotFound),
        1
    );
    assert_eq!(c.duplicates, [1, 0]);
    assert_eq!(c.discarded(Discard::BadRequestAuthenticator), 1);
    assert_eq!(c.sessions_removed, 1);
    let mut text = String::new();
    f.engine.counters().write_prometheus(&["lab"], &mut text);
    assert!(
        text.contains("dynauth_acks_total{client=\"lab\",kind=\"disconnect\"} 1"),
        "{text}"
    );
}

// ---------------------------------------------------------------- §9 overload

/// A store that has parsed nothing wrong but cannot act now (a refused scan, an overloaded
/// table).
struct Overloaded;

impl SessionStore for Overloaded {
    fn disconnect(
        &self,
        _: &dynauth_proto::store::Lookup<'_>,
    ) -> Result<dynauth_proto::store::Applied, dynauth_proto::store::Refusal> {
        Err(dynauth_proto::store::Refusal::Unavailable)
    }
    fn change(
        &self,
        _: &dynauth_proto::store::Lookup<'_>,
        _: &dynauth_proto::change::AuthorizationChange<'_>,
    ) -> Result<dynauth_proto::store::Applied, dynauth_proto::store::Refusal> {
        Err(dynauth_proto::store::Refusal::Unavailable)
    }
    fn select(
        &self,
        _: &dynauth_proto::store::Lookup<'_>,
        _: bool,
        _: &mut Vec<Session>,
    ) -> Result<dynauth_proto::store::Applied, dynauth_proto::store::Refusal> {
        Err(dynauth_proto::store::Refusal::Unavailable)
    }
    fn remove_sessions(
        &self,
        _: &[Session],
        _: bool,
        _: u64,
    ) -> Result<u32, dynauth_proto::store::Refusal> {
        Err(dynauth_proto::store::Refusal::Unavailable)
    }
    fn change_sessions(
        &self,
        _: &[Session],
        _: &dynauth_proto::change::AuthorizationChange<'_>,
        _: u64,
    ) -> Result<u32, dynauth_proto::store::Refusal> {
        Err(dynauth_proto::store::Refusal::Unavailable)
    }
    fn insert(&self, _: Session) -> bool {
        false
    }
    fn upsert(
        &self,
        _: Session,
        _: dynauth_proto::store::UpsertMode,
        _: u64,
    ) -> Result<dynauth_proto::store::Upserted, dynauth_proto::store::UpsertError> {
        Err(dynauth_proto::store::UpsertError::NoIdentification)
    }
    fn delete(&self, _: Option<&str>, _: &str, _: u64) -> bool {
        false
    }
    fn retain_nas(&self, _: Option<&str>, _: &mut dyn FnMut(&Session) -> bool, _: u64) -> usize {
        0
    }
    fn len(&self) -> usize {
        0
    }
}

// SPEC §9.8 (RFC 5176 §3.5, issue #14): a request shed under overload is authenticated, then
// answered NAK 506 without any store call or hand-off (the session is still there, the data
// plane saw nothing), and the 506 is not cached (after the overload the same request is
// decided afresh); an authenticated copy of an answered request still gets its cached
// answer; bytes that fail authentication get nothing.
#[test]
fn spec_9_8_a_shed_request_gets_506_without_touching_the_store_rfc5176_s3_5() {
    let mut sessions = sess1();
    sessions.push(session("sess-2"));
    let mut f = Fixture::new(ClientPolicy::default(), sessions);
    let answered = dm_sess1(1);
    let first = f.answer(&answered);
    assert_eq!(first.code, code::DISCONNECT_ACK);
    let events = f.events();
    f.shed = true;
    let (outcome, copy) = f.handle(&answered);
    assert!(matches!(outcome, Outcome::Replay { .. }), "{outcome:?}");
    assert_eq!(copy.unwrap().bytes, first.bytes);
    let dm2 = request(
        DM,
        2,
        &[
            (attr::ACCT_SESSION_ID, b"sess-2"),
            (attr::PROXY_STATE, b"ps1"),
            (attr::PROXY_STATE, b"ps2"),
        ],
        true,
    );
    let coa2 = request(
        COA,
        3,
        &[
            (attr::ACCT_SESSION_ID, b"sess-2"),
            (attr::SESSION_TIMEOUT, &60u32.to_be_bytes()),
        ],
        false,
    );
    for (packet, nak) in [(&dm2, code::DISCONNECT_NAK), (&coa2, code::COA_NAK)] {
        let reply = f.answer(packet);
        assert_eq!(reply.code, nak);
        assert_eq!(reply.error_cause(), Some(ErrorCause::ResourcesUnavailable));
        // The fixture checked the Identifier and the authenticators; the echo:
        assert_eq!(
            reply.values(attr::PROXY_STATE),
            if packet == &dm2 {
                vec![b"ps1".to_vec(), b"ps2".to_vec()]
            } else {
                vec![]
            }
        );
    }
    let mut forged = dm2.clone();
    forged[4] ^= 1;
    assert!(matches!(f.handle(&forged), (Outcome::Discard(_), None)));
    assert_eq!(f.events(), events, "the data plane saw nothing shed");
    assert!(
        f.store
            .sessions()
            .iter()
            .any(|s| s.acct_session_id.as_deref() == Some("sess-2")),
        "the shed Disconnect removed nothing"
    );
    // After the overload: the same request is decided afresh (the 506 was not cached), and
    // it removes the session (no tombstone was left by the shed one: an ACK without 201).
    f.shed = false;
    let later = f.answer(&dm2);
    assert_eq!(later.code, code::DISCONNECT_ACK);
    assert_eq!(later.error_cause(), None);
}

#[test]
fn spec_9_overload_gives_506_once_the_request_is_parsed_rfc5176_s3_5() {
    let mut f = default_fixture();
    let config = std::sync::Arc::new(f.engine.config().clone());
    f.engine = dynauth_proto::Engine::new(config, std::sync::Arc::new(Overloaded));
    for (code, answer) in [(DM, code::DISCONNECT_NAK), (COA, code::COA_NAK)] {
        let p = request(
            code,
            1,
            &[
                (attr::ACCT_SESSION_ID, b"sess-1"),
                (attr::PROXY_STATE, b"ps"),
            ],
            false,
        );
        let reply = f.answer(&p);
        assert_eq!(reply.code, answer);
        assert_eq!(reply.error_cause(), Some(ErrorCause::ResourcesUnavailable));
        assert_eq!(reply.values(attr::PROXY_STATE), vec![b"ps".to_vec()]);
    }
    // A request that fails parsing still gets its own cause, not 506.
    let p = request(
        DM,
        2,
        &[(attr::FILTER_ID, b"x"), (attr::ACCT_SESSION_ID, b"sess-1")],
        false,
    );
    assert_eq!(
        f.answer(&p).error_cause(),
        Some(ErrorCause::UnsupportedAttribute)
    );
}
