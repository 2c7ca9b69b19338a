//! Session-table designs compared (docs/SESSION_TABLE.md): lookups by the most selective key,
//! a miss, and a remove + insert pair, for the flat atomic index and papaya.
//!
//! cargo bench -p dynauth-table --bench table
use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use dynauth_proto::session::SessionQuery;
use dynauth_proto::store::{Lookup, MatchScope, SessionStore};
use dynauth_proto::synth;
use dynauth_table::{FlatIndex, KeyIndex, PapayaIndex, SessionTable};

const N: u64 = 200_000;
const SEED: u64 = 3;

fn lookup(query: SessionQuery<'_>) -> Lookup<'_> {
    Lookup {
        query,
        scope: MatchScope {
            vrf: None,
            max_sessions: 16,
            tombstone_window_ms: dynauth_proto::store::NO_CLIENT_WINDOW,
        },
        now_ms: 1,
    }
}

fn design<I: KeyIndex>(c: &mut Criterion) {
    let table = SessionTable::<I>::with_sessions(synth::sessions(SEED, N));
    let ids: Vec<String> = (0..4096)
        .map(|i| synth::acct_session_id(SEED, (i * 7919) % N))
        .collect();
    let users: Vec<String> = (0..4096)
        .map(|i| synth::user_name((i * 7919) % N))
        .collect();
    let mut g = c.benchmark_group("table");
    g.measurement_time(Duration::from_secs(3));
    g.warm_up_time(Duration::from_secs(1));
    let mut k = 0usize;
    g.bench_function(BenchmarkId::new("lookup_acct_session_id", I::NAME), |b| {
        b.iter(|| {
            k = (k + 1) & 4095;
            let q = SessionQuery {
                acct_session_id: Some(ids[k].as_bytes()),
                ..Default::default()
            };
            black_box(table.peek(&lookup(q)))
        })
    });
    g.bench_function(BenchmarkId::new("lookup_user_name", I::NAME), |b| {
        b.iter(|| {
            k = (k + 1) & 4095;
            let q = SessionQuery {
                user_name: Some(users[k].as_bytes()),
                ..Default::default()
            };
            black_box(table.peek(&lookup(q)))
        })
    });
    g.bench_function(BenchmarkId::new("lookup_miss", I::NAME), |b| {
        b.iter(|| {
            let q = SessionQuery {
                acct_session_id: Some(b"no-such-session!"),
                ..Default::default()
            };
            black_box(table.peek(&lookup(q)))
        })
    });
    let mut next = N;
    let mut oldest = 0u64;
    g.bench_function(BenchmarkId::new("disconnect_plus_insert", I::NAME), |b| {
        b.iter(|| {
            let id = synth::acct_session_id(SEED, oldest);
            let q = SessionQuery {
                acct_session_id: Some(id.as_bytes()),
                ..Default::default()
            };
            black_box(table.disconnect(&lookup(q))).ok();
            black_box(table.insert(synth::session(SEED, next)));
            oldest += 1;
            next += 1;
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    design::<FlatIndex>(c);
    design::<PapayaIndex>(c);
}

criterion_group!(table, benches);
criterion_main!(table);
