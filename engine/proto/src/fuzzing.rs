//! Support for the cargo-fuzz target (`engine/proto/fuzz`) and its corpus replay test: arbitrary
//! bytes through every decoder and the whole decision path, one datagram at a time
//! ([`decode_and_decide`]) or as a sequence with the clock moving ([`decide_sequence`]). Not
//! part of the public API.
//!
//! Owns: the fixed engine the fuzzer drives (one client at 127.0.0.1 with secret
//! `fuzz-secret`, a few sessions, every policy switch that widens the reachable code) and the
//! oracle, which checks meaning, not only shape: no answer to a request that fails
//! authentication; every answer parses, carries the request's Identifier, has the matching
//! ACK/NAK code, verifies with the secret (Response Authenticator and Message-Authenticator),
//! and echoes every State and every Proxy-State in order; a replayed answer is byte for byte
//! the first answer to that request, and never replayed once its window has passed.
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::sync::Arc;

use crate::auth::{self, ResponseCheck, Secret};
use crate::client::{Client, ClientTable, NasIdentity};
use crate::codec::{MAX_PACKET_LEN, Packet};
use crate::dict::attr;
use crate::engine::{Engine, EngineConfig, Now, Outcome};
use crate::store::MemoryStore;

/// The secret of the fuzzing client (corpus files signed with it reach the decisions).
pub const FUZZ_SECRET: &str = "fuzz-secret";

thread_local! {
    static ENGINE: RefCell<Engine> = RefCell::new(engine());
}

fn engine() -> Engine {
    let client = Client::new(
        "127.0.0.1/32".parse().expect("valid CIDR"),
        Secret::new(FUZZ_SECRET).expect("non-empty"),
    );
    let config = EngineConfig {
        clients: ClientTable::new([client]).expect("one client"),
        nas: NasIdentity {
            identifiers: vec!["bng-1".into()],
            ..NasIdentity::default()
        },
        dedup: crate::dedup::DedupConfig {
            max_entries: 64,
            arena_bytes: 16 << 10,
            max_in_flight: 8,
        },
        ..EngineConfig::default()
    };
    let store = MemoryStore::with_sessions(crate::synth::demo_sessions(1, 4));
    Engine::new(Arc::new(config), Arc::new(store))
}

/// Runs `data` through the decoders and the engine twice: as it is, and re-signed with
/// [`FUZZ_SECRET`] (Request Authenticator and any Message-Authenticator), so that mutated
/// attributes get past authentication and reach the decisions. Panics only on a broken
/// invariant.
pub fn decode_and_decide(data: &[u8]) {
    decide_once(data);
    let Ok(packet) = Packet::parse(data) else {
        return;
    };
    let mut ma_offset = None;
    for attribute in packet.attributes().flatten() {
        if let Some(vsa) = attribute.vendor_specific() {
            for _ in vsa.sub_attributes() {}
        }
        if attribute.ty == crate::dict::attr::MESSAGE_AUTHENTICATOR && attribute.value.len() == 16 {
            ma_offset.get_or_insert(attribute.value_offset());
        }
    }
    let mut signed = [0u8; MAX_PACKET_LEN];
    let Some(copy) = signed.get_mut(..packet.length()) else {
        return;
    };
    copy.copy_from_slice(packet.bytes());
    let secret = Secret::new(FUZZ_SECRET).expect("non-empty");
    crate::auth::sign_request(copy, ma_offset, &secret);
    decide_once(copy);
}

/// The time of the first datagram of every run.
const START: Now = Now {
    unix_secs: 1_795_263_234,
    monotonic_ms: 1_000,
};

/// The answer window of the fuzzing client (its Event-Timestamp window, the default).
const WINDOW_MS: u64 = 300_000;

fn decide_once(data: &[u8]) {
    ENGINE.with(|engine| {
        let mut out = [0u8; MAX_PACKET_LEN];
        let outcome = engine.borrow_mut().handle(
            data,
            "127.0.0.1:40000".parse().expect("valid address"),
            "127.0.0.1:3799".parse().expect("valid address"),
            START,
            &mut out,
        );
        check_outcome(data, outcome, &out);
    });
}

/// The bytes an outcome sends, after the oracle checked them against the request.
fn check_outcome<'o>(request: &[u8], outcome: Outcome, out: &'o [u8]) -> Option<&'o [u8]> {
    let len = match outcome {
        Outcome::Discard(_) | Outcome::Pending => return None,
        Outcome::Answer(a) => a.len,
        Outcome::Replay { len } => len,
    };
    let bytes = out.get(..len).unwrap_or_default();
    let answer = Packet::parse(bytes).expect("every answer is a well-formed packet");
    let request = Packet::parse(request).expect("only a well-formed request is answered");
    let secret = Secret::new(FUZZ_SECRET).expect("non-empty");
    assert!(
        auth::request_authenticator_is_valid(&request, &secret),
        "no answer to a request that fails authentication"
    );
    assert_eq!(answer.identifier(), request.identifier(), "same Identifier");
    assert!(
        answer.code() == request.code() + 1 || answer.code() == request.code() + 2,
        "ACK or NAK of the request's kind"
    );
    assert_eq!(
        auth::verify_response(&answer, request.authenticator(), &secret),
        ResponseCheck::Valid,
        "the answer verifies with the client's secret"
    );
    let echoed = |p: &Packet<'_>, ty: u8| -> Vec<Vec<u8>> {
        p.attributes()
            .map_while(Result::ok)
            .filter(|a| a.ty == ty)
            .map(|a| a.value.to_vec())
            .collect()
    };
    for ty in [attr::STATE, attr::PROXY_STATE] {
        assert_eq!(
            echoed(&answer, ty),
            echoed(&request, ty),
            "every State and Proxy-State echoed in order"
        );
    }
    Some(bytes)
}

/// Runs a sequence of datagrams through one fresh engine: each is a 2-octet big-endian
/// length, a 2-octet clock step in seconds (its top bit set: the datagram goes through the
/// overload path, `Engine::shed`), then that many octets (signed with [`FUZZ_SECRET`] when
/// they parse, so that sequences reach the decisions and the duplicate cache). Besides the
/// per-answer oracle, a replay must be the first answer's bytes and may come only within the
/// answer window, and a shed datagram's fresh answer is a NAK 506 that is never replayed.
/// Returns what happened, for tests that must know the sequence reached the cache.
pub fn decide_sequence(data: &[u8]) -> SequenceStats {
    let mut stats = SequenceStats::default();
    let mut engine = engine();
    let secret = Secret::new(FUZZ_SECRET).expect("non-empty");
    let mut now = START;
    let mut first_answers: Vec<(Vec<u8>, Vec<u8>, u64)> = Vec::new();
    for (request, step, shed) in sequence_datagrams(data, &secret) {
        now.unix_secs += step;
        now.monotonic_ms += step * 1000;
        let mut out = [0u8; MAX_PACKET_LEN];
        let (from, to) = (
            "127.0.0.1:40000".parse().expect("valid address"),
            "127.0.0.1:3799".parse().expect("valid address"),
        );
        let outcome = if shed {
            engine.shed(&request, from, to, now, &mut out)
        } else {
            engine.handle(&request, from, to, now, &mut out)
        };
        let replay = matches!(outcome, Outcome::Replay { .. });
        if shed && let Outcome::Answer(a) = outcome {
            assert_eq!(
                a.error_cause,
                Some(crate::dict::ErrorCause::ResourcesUnavailable),
                "a shed request is answered NAK 506"
            );
            assert_eq!(a.sessions, 0, "a shed request changes nothing");
        }
        let Some(bytes) = check_outcome(&request, outcome, &out) else {
            continue;
        };
        stats.answers += 1;
        stats.replays += usize::from(replay);
        let key = request.get(..20).unwrap_or_default();
        let earlier = first_answers
            .iter()
            .rev()
            .find(|(k, _, at)| k.as_slice() == key && at + WINDOW_MS >= now.monotonic_ms);
        if replay {
            let (_, first, _) =
                earlier.expect("a replay answers a request answered within its window");
            assert_eq!(
                bytes,
                first.as_slice(),
                "a replay is the first answer, byte for byte"
            );
        } else if !shed && first_answers.len() < 256 {
            first_answers.push((key.to_vec(), bytes.to_vec(), now.monotonic_ms));
        }
    }
    stats
}

/// The datagrams of a sequence input ([`decide_sequence`]'s format), each re-signed with
/// `secret` when it parses (cut to its Length), with its clock step in seconds and whether it
/// goes through the overload path.
fn sequence_datagrams(data: &[u8], secret: &Secret) -> Vec<(Vec<u8>, u64, bool)> {
    let mut datagrams = Vec::new();
    let mut rest = data;
    while let [l0, l1, s0, s1, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*l0, *l1])).min(tail.len());
        let step = u16::from_be_bytes([*s0, *s1]);
        let (datagram, after) = tail.split_at(len);
        rest = after;
        let mut request = datagram.to_vec();
        if let Ok(p) = Packet::parse(datagram) {
            let ma = p
                .attributes()
                .map_while(Result::ok)
                .find(|a| a.ty == attr::MESSAGE_AUTHENTICATOR && a.value.len() == 16)
                .map(|a| a.value_offset());
            request.truncate(p.length());
            auth::sign_request(&mut request, ma, secret);
        }
        datagrams.push((request, u64::from(step & 0x7fff), step & 0x8000 != 0));
    }
    datagrams
}

/// Datagrams per receive batch in [`decide_batches`] (a real batch is up to 64; eight keeps
/// same-batch retransmissions and batches with and without them frequent).
const FUZZ_BATCH: usize = 8;

/// [`decide_sequence`]'s format, decided twice on two fresh engines: one datagram at a time
/// (`Engine::handle`, `Engine::shed`), and [`FUZZ_BATCH`] at a time through the batch engine
/// API (`begin_batch`, the same calls, `seal_batch`, `write_sealed`), the clock read once
/// per batch in both. The oracle: every answer of both passes is checked as in
/// [`decide_sequence`]; the batch pass sends the same octets for every datagram, except that
/// a copy of an earlier datagram of the same batch, which one by one is replayed, is a
/// duplicate in flight there (its answer is not signed yet); and `write_sealed` accepts every
/// answer the batch pass left unsigned. Returns what the batch pass did.
pub fn decide_batches(data: &[u8]) -> SequenceStats {
    use crate::counters::Discard;
    let secret = Secret::new(FUZZ_SECRET).expect("non-empty");
    let datagrams = sequence_datagrams(data, &secret);
    let (from, to) = (
        "127.0.0.1:40000".parse().expect("valid address"),
        "127.0.0.1:3799".parse().expect("valid address"),
    );
    let (mut alone, mut batched) = (engine(), engine());
    let mut stats = SequenceStats::default();
    let mut now = START;
    let decide = |engine: &mut Engine, request: &[u8], shed: bool, now: Now, out: &mut [u8]| {
        if shed {
            engine.shed(request, from, to, now, out)
        } else {
            engine.handle(request, from, to, now, out)
        }
    };
    for batch in datagrams.chunks(FUZZ_BATCH) {
        for (_, step, _) in batch {
            now.unix_secs += step;
            now.monotonic_ms += step * 1000;
        }
        let mut outs = vec![[0u8; MAX_PACKET_LEN]; batch.len()];
        batched.begin_batch(batch.iter().map(|(r, _, _)| (&r[..], from)));
        let outcomes: Vec<Outcome> = batch
            .iter()
            .zip(&mut outs)
            .map(|((r, _, shed), out)| decide(&mut batched, r, *shed, now, out))
            .collect();
        batched.seal_batch();
        for (outcome, out) in outcomes.iter().zip(&mut outs) {
            if let Outcome::Answer(a) = outcome
                && a.sealed_later
            {
                assert!(
                    batched.write_sealed(out),
                    "every answer left unsigned is sealed, in order"
                );
                stats.sealed += 1;
            }
        }
        for (i, ((request, _, shed), (outcome, out))) in
            batch.iter().zip(outcomes.iter().zip(&outs)).enumerate()
        {
            let mut one = [0u8; MAX_PACKET_LEN];
            let single = decide(&mut alone, request, *shed, now, &mut one);
            let sent_alone = check_outcome(request, single, &one).map(<[u8]>::to_vec);
            let sent = check_outcome(request, *outcome, out);
            let earlier_copy = batch
                .get(..i)
                .unwrap_or_default()
                .iter()
                .any(|(r, _, _)| r.get(..20) == request.get(..20));
            match (single, outcome) {
                (Outcome::Replay { .. }, Outcome::Discard(Discard::DuplicateInFlight)) => {
                    assert!(
                        earlier_copy,
                        "only a copy of an earlier datagram of the batch is in flight"
                    );
                    stats.in_flight += 1;
                }
                _ => {
                    assert_eq!(
                        sent,
                        sent_alone.as_deref(),
                        "a batch sends what one-by-one decisions send"
                    );
                    if sent.is_none() {
                        assert_eq!(single, *outcome, "the same discard");
                    }
                }
            }
            if sent.is_some() {
                stats.answers += 1;
                stats.replays += usize::from(matches!(outcome, Outcome::Replay { .. }));
            }
        }
    }
    stats
}

/// What one [`decide_sequence`] run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SequenceStats {
    /// Datagrams answered (fresh or replayed).
    pub answers: usize,
    /// Of those, answers replayed from the duplicate cache.
    pub replays: usize,
    /// [`decide_batches`]: answers signed in lanes (`Engine::seal_batch`).
    pub sealed: usize,
    /// [`decide_batches`]: copies found in flight in their own batch.
    pub in_flight: usize,
}
