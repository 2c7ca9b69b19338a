//! Known-answer tests against datagrams made by FreeRADIUS 3.2.1 (radclient as DAC, the
//! server as DAS): our authenticators agree with another implementation in both directions,
//! and our engine reproduces FreeRADIUS's answers byte for byte wherever SPEC.md and
//! FreeRADIUS agree (RFC 5176 §3.4, §3.5; RFC 3579 §3.2; SPEC §3).
//!
//! The vectors are the repository's copy in `engine/proto/tests/vectors` (see its README.md).

mod common;

/// The store the shared test support runs the engine over (see `common`).
#[allow(dead_code)]
type StoreUnderTest = dynauth_proto::store::MemoryStore;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use dynauth_proto::auth::{self, ResponseCheck, Secret};
use dynauth_proto::client::{AnswerSigning, Client, ClientPolicy, ClientTable, NasIdentity};
use dynauth_proto::codec::{MAX_PACKET_LEN, Packet};
use dynauth_proto::dict::{ErrorCause, attr, code, vendor};
use dynauth_proto::session::Session;
use dynauth_proto::store::MemoryStore;
use dynauth_proto::{Engine, EngineConfig, Now, Outcome};

struct Vector {
    name: String,
    fields: BTreeMap<String, String>,
}

impl Vector {
    fn get(&self, key: &str) -> &str {
        self.fields
            .get(key)
            .unwrap_or_else(|| panic!("{}: no `{key}`", self.name))
    }

    fn hex(&self, key: &str) -> Vec<u8> {
        // `hex` is space-separated octets; `secret-hex` is one run of digits.
        let digits: String = self.get(key).split_whitespace().collect();
        (0..digits.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap())
            .collect()
    }

    fn secret(&self) -> Secret {
        Secret::new(self.hex("secret-hex")).unwrap()
    }

    fn is_request(&self) -> bool {
        self.get("direction") == "request"
    }
}

fn vector_dir() -> PathBuf {
    // The repository's own copy: the tests never read outside the repository.
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn load() -> Vec<Vector> {
    let dir = vector_dir();
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("txt") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut fields = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            if let Some((k, v)) = line.split_once(": ") {
                fields.insert(k.to_string(), v.to_string());
            }
        }
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        out.push(Vector { name, fields });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(
        out.len(),
        46,
        "the vector set has 46 files ({})",
        dir.display()
    );
    out
}

fn message_authenticator_offset(p: &Packet<'_>) -> Option<usize> {
    p.attributes()
        .map_while(Result::ok)
        .find(|a| a.ty == attr::MESSAGE_AUTHENTICATOR)
        .map(|a| a.value_offset())
}

/// RFC 5176 §3.4: every radclient request verifies (Request Authenticator and, where present,
/// Message-Authenticator) with its secret; the two negative ones fail.
#[test]
fn rfc5176_s3_4_request_authenticators_agree_with_radclient() {
    let mut valid = 0;
    let mut discard = 0;
    for v in load().iter().filter(|v| v.is_request()) {
        let bytes = v.hex("hex");
        let p = Packet::parse(&bytes).unwrap();
        let secret = v.secret();
        let ra = auth::request_authenticator_is_valid(&p, &secret);
        let ma = message_authenticator_offset(&p)
            .map(|off| auth::request_message_authenticator_is_valid(&p, off, &secret));
        if v.get("expect").starts_with("valid") {
            assert!(ra, "{}: Request Authenticator", v.name);
            assert_ne!(ma, Some(false), "{}: Message-Authenticator", v.name);
            valid += 1;
        } else {
            assert!(
                v.get("expect").starts_with("silently discard"),
                "{}",
                v.name
            );
            assert!(!ra || ma == Some(false), "{}: must not verify", v.name);
            // And with the secret it was really signed with, it does verify.
            let real = Secret::new(v.get("signed-with")).unwrap();
            assert!(
                auth::request_authenticator_is_valid(&p, &real),
                "{}",
                v.name
            );
            discard += 1;
        }
    }
    assert_eq!((valid, discard), (18, 2));
}

/// RFC 5176 §3.5 / SPEC §3: FreeRADIUS's answers (as radclient accepted them) verify with our
/// DAC-side check; the raw FreeRADIUS originals fail on the Message-Authenticator alone.
#[test]
fn rfc5176_s3_5_response_authenticators_agree_with_freeradius() {
    let mut valid = 0;
    let mut raw = 0;
    for v in load().iter().filter(|v| !v.is_request()) {
        let request = v.hex("request-hex");
        let request = Packet::parse(&request).unwrap();
        let answer_bytes = v.hex("hex");
        let answer = Packet::parse(&answer_bytes).unwrap();
        let check = auth::verify_response(&answer, request.authenticator(), &v.secret());
        if v.get("expect").starts_with("valid") {
            assert_eq!(check, ResponseCheck::Valid, "{}", v.name);
            valid += 1;
        } else {
            assert!(v.name.ends_with("-freeradius-raw"), "{}", v.name);
            assert_eq!(check, ResponseCheck::BadMessageAuthenticator, "{}", v.name);
            raw += 1;
        }
    }
    assert_eq!((valid, raw), (18, 8));
}

/// The session FreeRADIUS's capture policy treated as existing ("sess-1"), shaped after the
/// request so that AND semantics finds it (SPEC §6.1).
fn session_for(request: &Packet<'_>) -> Option<Session> {
    let mut s = Session::default();
    for a in request.attributes().map_while(Result::ok) {
        match a.ty {
            attr::ACCT_SESSION_ID => {
                s.acct_session_id = Some(String::from_utf8(a.value.to_vec()).ok()?)
            }
            attr::USER_NAME => s.user_name = Some(String::from_utf8(a.value.to_vec()).ok()?),
            attr::VENDOR_SPECIFIC => {
                let vsa = a.vendor_specific()?;
                for sub in vsa.sub_attributes().map_while(Result::ok) {
                    if vsa.vendor_id == vendor::CISCO
                        && let Some(id) = sub.value.strip_prefix(b"audit-session-id=")
                    {
                        s.audit_session_id = Some(String::from_utf8(id.to_vec()).ok()?);
                    }
                }
            }
            _ => {}
        }
    }
    (s.acct_session_id.as_deref() == Some("sess-1")).then_some(s)
}

fn engine_for(secret: Secret, sessions: Vec<Session>) -> Engine {
    let mut client = Client::new("192.0.2.10/32".parse().unwrap(), secret);
    client.policy = ClientPolicy {
        // FreeRADIUS signs an answer only when the request was signed.
        answer_message_authenticator: AnswerSigning::WhenRequested,
        ..ClientPolicy::default()
    };
    let config = EngineConfig {
        clients: ClientTable::new([client]).unwrap(),
        nas: NasIdentity {
            identifiers: vec!["bng-1".into()],
            ipv4: vec!["192.0.2.1".parse().unwrap()],
            ipv6: vec![],
        },
        ..EngineConfig::default()
    };
    Engine::new(
        Arc::new(config),
        Arc::new(MemoryStore::with_sessions(sessions)),
    )
}

/// Our engine, given each radclient request, emits FreeRADIUS's answer byte for byte (after
/// the RFC 5176 §3.5 Message-Authenticator correction), except where SPEC.md differs:
/// Service-Type in a Disconnect-Request gets Error-Cause 401 (SPEC §7).
#[test]
fn rfc5176_engine_reproduces_freeradius_answers_byte_for_byte() {
    let vectors = load();
    let mut compared = 0;
    for v in vectors
        .iter()
        .filter(|v| !v.is_request() && !v.name.ends_with("-freeradius-raw"))
    {
        let request_bytes = v.hex("request-hex");
        let request = Packet::parse(&request_bytes).unwrap();
        let sessions = session_for(&request).into_iter().collect();
        let mut engine = engine_for(v.secret(), sessions);
        // Event-Timestamp vectors carry the capture time: give the engine that clock.
        let unix_secs = request
            .attributes()
            .map_while(Result::ok)
            .find(|a| a.ty == attr::EVENT_TIMESTAMP)
            .map(|a| u64::from(u32::from_be_bytes(a.value.try_into().unwrap())))
            .unwrap_or(1_795_263_234);
        let (outcome, ours) = decide(&mut engine, &request_bytes, unix_secs);
        let Outcome::Answer(answer) = outcome else {
            panic!("{}: expected an answer, got {outcome:?}", v.name);
        };
        if v.name == "resp-dm-service-type" {
            // FreeRADIUS sends a bare NAK; SPEC §7 wants 401. The RFC/SPEC wins.
            assert_eq!(answer.code, code::DISCONNECT_NAK);
            assert_eq!(answer.error_cause, Some(ErrorCause::UnsupportedAttribute));
            continue;
        }
        assert_eq!(
            hex(&ours),
            hex(&v.hex("hex")),
            "{}: answer differs from FreeRADIUS's",
            v.name
        );
        compared += 1;
    }
    assert_eq!(compared, 17);
}

/// SPEC §2: both wrong-secret requests are silently discarded by our engine, as by FreeRADIUS.
#[test]
fn spec_2_4_and_2_5_wrong_secret_vectors_are_discarded() {
    for v in load()
        .iter()
        .filter(|v| v.is_request() && v.get("expect").starts_with("silently"))
    {
        let bytes = v.hex("hex");
        let mut engine = engine_for(v.secret(), vec![]);
        let (outcome, _) = decide(&mut engine, &bytes, 1_795_263_234);
        assert!(
            matches!(outcome, Outcome::Discard(_)),
            "{}: {outcome:?}",
            v.name
        );
    }
}

/// SPEC §2.6: the Event-Timestamp vector is discarded with a clock 301 s away.
#[test]
fn spec_2_6_event_timestamp_vector_outside_window_is_discarded() {
    let v = load()
        .into_iter()
        .find(|v| v.name == "req-dm-event-timestamp")
        .unwrap();
    let bytes = v.hex("hex");
    let mut engine = engine_for(v.secret(), vec![]);
    let (outcome, _) = decide(&mut engine, &bytes, 1_795_263_234 + 301);
    assert_eq!(
        outcome,
        Outcome::Discard(dynauth_proto::counters::Discard::EventTimestampOutsideWindow)
    );
}

/// Runs one datagram from the vector client (192.0.2.10) to the NAS (192.0.2.1) at `unix_secs`;
/// returns the outcome and the answer's octets.
fn decide(engine: &mut Engine, datagram: &[u8], unix_secs: u64) -> (Outcome, Vec<u8>) {
    let mut out = vec![0u8; MAX_PACKET_LEN];
    let outcome = engine.handle(
        datagram,
        "192.0.2.10:1812".parse().unwrap(),
        "192.0.2.1:3799".parse().unwrap(),
        Now {
            unix_secs,
            monotonic_ms: 0,
        },
        &mut out,
    );
    let len = match outcome {
        Outcome::Answer(a) => a.len,
        _ => 0,
    };
    out.truncate(len);
    (outcome, out)
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
