//! Criterion benchmarks of the engine's hot path on one core: decode, verify (with and without
//! Message-Authenticator) and the whole decide + encode path for a 100-octet
//! Disconnect-Request, the same path in a storm that keeps the duplicate cache full, and the
//! duplicate cache on its own.
//! Figures and the command go in docs/BENCHMARKS.md.
//!
//! Run: `cargo bench -p dynauth-proto --bench engine`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use dynauth_proto::auth::{self, Secret};
use dynauth_proto::change::AuthorizationChange;
use dynauth_proto::client::{AnswerSigning, Client, ClientTable};
use dynauth_proto::codec::{MAX_PACKET_LEN, Packet, PacketWriter};
use dynauth_proto::dedup::{DedupConfig, DuplicateCache, Seen};
use dynauth_proto::dict::{attr, code};
use dynauth_proto::session::Session;
use dynauth_proto::store::{
    Applied, Lookup, Refusal, SessionStore, UpsertError, UpsertMode, Upserted,
};
use dynauth_proto::verify::{self, Arrival};
use dynauth_proto::{Authenticated, Engine, EngineConfig, Now, Outcome};

const SECRET: &str = "bench-shared-secret";

/// A 100-octet Disconnect-Request (118 with a Message-Authenticator): Acct-Session-Id,
/// User-Name, NAS-IP-Address, Framed-IP-Address, Calling-Station-Id, NAS-Port.
fn disconnect_request(id: u8, variant: u32, with_ma: bool) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_PACKET_LEN];
    let mut w = PacketWriter::new(&mut buf, code::DISCONNECT_REQUEST, id, &[0; 16]).unwrap();
    let ma = with_ma.then(|| w.push(attr::MESSAGE_AUTHENTICATOR, &[0; 16]).unwrap());
    w.push(
        attr::ACCT_SESSION_ID,
        format!("0001{variant:012x}").as_bytes(),
    )
    .unwrap();
    w.push(attr::USER_NAME, b"user0000042@isp.example").unwrap();
    w.push(attr::NAS_IP_ADDRESS, &[127, 0, 0, 1]).unwrap();
    w.push(attr::FRAMED_IP_ADDRESS, &[10, 0, 0, 42]).unwrap();
    w.push(attr::CALLING_STATION_ID, b"02-00-00-00-00-2A")
        .unwrap();
    w.push_u32(attr::NAS_PORT, 42).unwrap();
    let len = w.finish().len();
    buf.truncate(len);
    auth::sign_request(&mut buf, ma, &Secret::new(SECRET).unwrap());
    buf
}

/// A store that finds exactly one session for any key and changes nothing: isolates the
/// engine's own cost from the session table's (benchmarked on its own).
struct OneSession;

impl SessionStore for OneSession {
    fn disconnect(&self, _: &Lookup<'_>) -> Result<Applied, Refusal> {
        Ok(Applied::Sessions(1))
    }
    fn change(&self, _: &Lookup<'_>, _: &AuthorizationChange<'_>) -> Result<Applied, Refusal> {
        Ok(Applied::Sessions(1))
    }
    fn select(&self, _: &Lookup<'_>, _: bool, _: &mut Vec<Session>) -> Result<Applied, Refusal> {
        Ok(Applied::Sessions(1))
    }
    fn remove_sessions(&self, _: &[Session], _: bool, _: u64) -> Result<u32, Refusal> {
        Ok(1)
    }
    fn change_sessions(
        &self,
        _: &[Session],
        _: &AuthorizationChange<'_>,
        _: u64,
    ) -> Result<u32, Refusal> {
        Ok(1)
    }
    fn insert(&self, _: Session) -> bool {
        true
    }
    fn upsert(&self, _: Session, _: UpsertMode, _: u64) -> Result<Upserted, UpsertError> {
        Ok(Upserted::Replaced)
    }
    fn delete(&self, _: Option<&str>, _: &str, _: u64) -> bool {
        true
    }
    fn retain_nas(&self, _: Option<&str>, _: &mut dyn FnMut(&Session) -> bool, _: u64) -> usize {
        0
    }
    fn len(&self) -> usize {
        1
    }
}

fn engine(signing: AnswerSigning) -> Engine {
    let mut client = Client::new(
        "127.0.0.1/32".parse().unwrap(),
        Secret::new(SECRET).unwrap(),
    );
    client.policy.answer_message_authenticator = signing;
    let config = EngineConfig {
        clients: ClientTable::new([client]).unwrap(),
        ..EngineConfig::default()
    };
    Engine::new(Arc::new(config), Arc::new(OneSession))
}

fn benches(c: &mut Criterion) {
    let plain = disconnect_request(1, 42, false);
    let signed = disconnect_request(1, 42, true);
    assert_eq!(plain.len(), 100);
    let secret = Secret::new(SECRET).unwrap();

    c.bench_function("decode/100B disconnect: parse + walk attributes", |b| {
        b.iter(|| {
            let p = Packet::parse(black_box(&plain)).unwrap();
            p.attributes().filter(|a| a.is_ok()).count()
        })
    });
    c.bench_function("verify/request authenticator (100B)", |b| {
        let p = Packet::parse(&plain).unwrap();
        b.iter(|| auth::request_authenticator_is_valid(black_box(&p), &secret))
    });
    c.bench_function("verify/request + message authenticator (118B)", |b| {
        let p = Packet::parse(&signed).unwrap();
        b.iter(|| {
            auth::request_authenticator_is_valid(black_box(&p), &secret)
                && auth::request_message_authenticator_is_valid(&p, 22, &secret)
        })
    });

    // The cryptographic floor of each decide+encode case below: exactly the MD5 and HMAC-MD5
    // work that path must do on the same octets, and nothing else. The report states the
    // engine's cost as a ratio to this, measured in the same run.
    let answer_unsigned = {
        let mut a = plain[..20].to_vec();
        a[0] = code::DISCONNECT_ACK;
        a[3] = 20;
        a
    };
    let answer_signed = {
        let mut a = answer_unsigned.clone();
        a[3] = 38;
        a.extend_from_slice(&[attr::MESSAGE_AUTHENTICATOR, 18]);
        a.extend_from_slice(&[0; 16]);
        a
    };
    let request_auth = *Packet::parse(&plain).unwrap().authenticator();
    c.bench_function(
        "floor/100B: request authenticator + response authenticator",
        |b| {
            let p = Packet::parse(&plain).unwrap();
            b.iter(|| {
                auth::request_authenticator_is_valid(black_box(&p), &secret);
                auth::md5_authenticator(black_box(&answer_unsigned), &request_auth, &secret)
            })
        },
    );
    c.bench_function("floor/100B: ... + answer Message-Authenticator", |b| {
        let p = Packet::parse(&plain).unwrap();
        b.iter(|| {
            auth::request_authenticator_is_valid(black_box(&p), &secret);
            auth::message_authenticator(black_box(&answer_signed), &request_auth, 22, &secret);
            auth::md5_authenticator(black_box(&answer_signed), &request_auth, &secret)
        })
    });
    c.bench_function("floor/118B: request RA + M-A, answer M-A + RA", |b| {
        let p = Packet::parse(&signed).unwrap();
        b.iter(|| {
            auth::request_authenticator_is_valid(black_box(&p), &secret);
            auth::request_message_authenticator_is_valid(&p, 22, &secret);
            auth::message_authenticator(black_box(&answer_signed), &request_auth, 22, &secret);
            auth::md5_authenticator(black_box(&answer_signed), &request_auth, &secret)
        })
    });

    // The whole path: client lookup, framing, duplicate check, authenticators, attribute rules,
    // decision, answer encoding and signing, duplicate-cache insert. 4096 distinct requests
    // (Identifier x source port); the clock jumps past the window each round so every request
    // is new to the duplicate cache.
    for (name, with_ma, signing) in [
        (
            "decide+encode/100B disconnect, no M-A, unsigned answer",
            false,
            AnswerSigning::WhenRequested,
        ),
        (
            "decide+encode/100B disconnect, no M-A, signed answer (default)",
            false,
            AnswerSigning::Always,
        ),
        (
            "decide+encode/118B disconnect, with M-A, signed answer",
            true,
            AnswerSigning::Always,
        ),
    ] {
        let requests: Vec<Vec<u8>> = (0..16u32)
            .map(|v| disconnect_request(v as u8, v, with_ma))
            .collect();
        let mut engine = engine(signing);
        let mut out = vec![0u8; MAX_PACKET_LEN];
        let destination = "127.0.0.1:3799".parse().unwrap();
        let mut n: u64 = 0;
        c.bench_function(name, |b| {
            b.iter(|| {
                n += 1;
                let req = &requests[(n % 16) as usize];
                let source = std::net::SocketAddr::from(([127, 0, 0, 1], 1024 + (n % 4096) as u16));
                let now = Now {
                    unix_secs: 1_795_263_234,
                    monotonic_ms: n * 400_000,
                };
                let outcome = engine.handle(black_box(req), source, destination, now, &mut out);
                debug_assert!(matches!(outcome, Outcome::Answer(_)));
                outcome
            })
        });
    }

    // A storm against the duplicate cache: every request is new, none expires (the clock
    // advances 1 ms per 1,000 requests, the window is 300 s), so from the 65,537th request on
    // the default 65,536-entry cache is full and every insert evicts the oldest answer. 256
    // Identifiers x 60,000 source ports: no key repeats within a run. The "replay" case
    // answers a retransmission of one of 65,536 answered requests (a probe that hits, then a
    // copy of the cached answer).
    let requests: Vec<Vec<u8>> = (0..256u32)
        .map(|v| disconnect_request(v as u8, v, false))
        .collect();
    let destination = "127.0.0.1:3799".parse().unwrap();
    let storm_source =
        |n: u64| std::net::SocketAddr::from(([127, 0, 0, 1], 1024 + ((n / 256) % 60_000) as u16));
    let storm_now = |n: u64| Now {
        unix_secs: 1_795_263_234,
        monotonic_ms: n / 1_000,
    };
    {
        let mut engine = engine(AnswerSigning::WhenRequested);
        let mut out = vec![0u8; MAX_PACKET_LEN];
        let mut n: u64 = 0;
        c.bench_function(
            "storm/100B disconnect, unsigned answer, full duplicate cache (evicts per insert)",
            |b| {
                b.iter(|| {
                    n += 1;
                    let req = &requests[(n % 256) as usize];
                    let outcome = engine.handle(
                        black_box(req),
                        storm_source(n),
                        destination,
                        storm_now(n),
                        &mut out,
                    );
                    debug_assert!(matches!(outcome, Outcome::Answer(_)));
                    outcome
                })
            },
        );
    }
    {
        let mut engine = engine(AnswerSigning::WhenRequested);
        let mut out = vec![0u8; MAX_PACKET_LEN];
        for n in 0..65_536u64 {
            let req = &requests[(n % 256) as usize];
            engine.handle(req, storm_source(n), destination, storm_now(0), &mut out);
        }
        let replay = engine.handle(
            &requests[7],
            storm_source(7),
            destination,
            storm_now(1),
            &mut out,
        );
        assert!(matches!(replay, Outcome::Replay { .. }), "{replay:?}");
        let mut n: u64 = 0;
        c.bench_function(
            "storm/100B disconnect, unsigned answer, replay of 1 of 65,536 cached",
            |b| {
                b.iter(|| {
                    // An odd stride visits every one of the 65,536 keys in a scattered order.
                    n = (n + 40_503) % 65_536;
                    let req = &requests[(n % 256) as usize];
                    let outcome = engine.handle(
                        black_box(req),
                        storm_source(n),
                        destination,
                        storm_now(1),
                        &mut out,
                    );
                    debug_assert!(matches!(outcome, Outcome::Replay { .. }));
                    outcome
                })
            },
        );
    }
}

/// A receive batch of 64 Disconnects (answers signed, the default), decided one by one
/// (`Engine::handle` signs each answer) and as a batch (`Engine::begin_batch`, `handle`,
/// `seal_batch`, `write_sealed`: the MD5s four at a time). Every request is new (the source
/// port moves on per batch); the store finds one session for any key. Reported per batch:
/// divide by 64 for a request.
fn batch_benches(c: &mut Criterion) {
    const BATCH: usize = 64;
    let requests: Vec<Vec<u8>> = (0..BATCH as u32)
        .map(|v| disconnect_request(v as u8, v, false))
        .collect();
    let destination = "127.0.0.1:3799".parse().unwrap();
    let source = |n: u64| std::net::SocketAddr::from(([127, 0, 0, 1], 1024 + (n % 60_000) as u16));
    let now = |n: u64| Now {
        unix_secs: 1_795_263_234,
        monotonic_ms: n,
    };
    let mut outs = vec![[0u8; MAX_PACKET_LEN]; BATCH];
    for batched in [false, true] {
        let mut engine = engine(AnswerSigning::Always);
        let mut n: u64 = 0;
        let name = if batched {
            "batch/64 disconnects, signed answers: as a batch (four-lane MD5)"
        } else {
            "batch/64 disconnects, signed answers: one by one"
        };
        c.bench_function(name, |b| {
            b.iter(|| {
                n += 1;
                let from = source(n);
                if batched {
                    engine.begin_batch(requests.iter().map(|r| (&r[..], from)));
                }
                let mut later = 0;
                for (req, out) in requests.iter().zip(&mut outs) {
                    let outcome = engine.handle(black_box(req), from, destination, now(n), out);
                    if let Outcome::Answer(a) = outcome {
                        later += usize::from(a.sealed_later);
                    }
                }
                if batched {
                    engine.seal_batch();
                    for out in &mut outs[..later] {
                        engine.write_sealed(out);
                    }
                }
                later
            })
        });
    }
}

/// The duplicate cache alone, through its public API, at storm rates: 131,072 distinct
/// authenticated requests (256 Identifiers x 512 source ports), twice the default cache, so
/// that once it is full every `complete` evicts the oldest answer; and a hit (`seen` finding
/// an answer) over 65,536 cached ones. The requests are verified once, outside the timing.
fn dedup_benches(c: &mut Criterion) {
    let client = Client::new(
        "127.0.0.1/32".parse().unwrap(),
        Secret::new(SECRET).unwrap(),
    );
    let clients = ClientTable::new([client]).unwrap();
    let packets: Vec<Vec<u8>> = (0..256u32)
        .map(|v| disconnect_request(v as u8, v, false))
        .collect();
    let now = Now {
        unix_secs: 1_795_263_234,
        monotonic_ms: 0,
    };
    let requests: Vec<Authenticated<'_>> = (0..512u16)
        .flat_map(|port| packets.iter().map(move |p| (port, p)))
        .map(|(port, p)| {
            let source = std::net::SocketAddr::from(([127, 0, 0, 1], 1024 + port));
            let (packet, kind) = verify::classify(p).unwrap();
            let (client_id, client) = clients.lookup(source.ip()).unwrap();
            let arrival = Arrival {
                packet,
                kind,
                source,
                client_id,
                client,
            };
            verify::authenticate(arrival, now, MAX_PACKET_LEN).unwrap()
        })
        .collect();
    let answer = [0u8; 20];
    let window_ms = 300_000;

    let mut cache = DuplicateCache::new(DedupConfig::default());
    let mut n = 0usize;
    c.bench_function("dedup/storm: seen (new) + complete, full cache", |b| {
        b.iter(|| {
            n += 1;
            let request = &requests[n % requests.len()];
            let t = (n / 1_000) as u64;
            let fresh = matches!(cache.seen(black_box(request), t), Seen::New);
            cache.complete(request, &answer, t, t + window_ms);
            fresh
        })
    });
    // Full once the bench ran (a filter may have skipped it).
    assert!(n == 0 || cache.len() == DedupConfig::default().max_entries);

    // Cached in a scattered order (an odd stride visits all 65,536), looked up in order: the
    // requests are read sequentially, the cache's memory at random.
    let mut cache = DuplicateCache::new(DedupConfig::default());
    for i in 0..65_536usize {
        cache.complete(&requests[i * 40_503 % 65_536], &answer, 0, window_ms);
    }
    let mut n = 0usize;
    c.bench_function("dedup/replay: seen (hit) over 65,536 cached", |b| {
        b.iter(|| {
            n = (n + 1) % 65_536;
            match cache.seen(black_box(&requests[n]), 1) {
                Seen::Answered(bytes) => bytes.len(),
                _ => 0,
            }
        })
    });
}

criterion_group! {
    name = engine_benches;
    config = Criterion::default().sample_size(50).measurement_time(std::time::Duration::from_secs(3)).warm_up_time(std::time::Duration::from_secs(1));
    targets = benches, dedup_benches, batch_benches
}
criterion_main!(engine_benches);
