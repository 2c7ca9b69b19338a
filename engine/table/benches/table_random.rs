//! Lookups by Acct-Session-Id at random over a large table: what a Disconnect storm does
//! (the `table` bench cycles 4,096 keys, which stay in cache). The table is built once per
//! run, outside the timing; keys are drawn uniformly (splitmix64) from every session, so
//! nearly every lookup misses every cache and the TLB.
//!
//! DYNAUTH_BENCH_SESSIONS=10000000 cargo bench -p dynauth-table --bench table_random
//!
//! Sessions default to 1,000,000 (10M takes ~1.5 GB and a minute or more to build on a
//! 2-vCPU VM). Besides criterion's figures (the mean per lookup over each sample), one pass
//! times 200,000 lookups one by one and prints their percentiles to stderr; each of those
//! includes one `Instant::now()` pair (about 20-40 ns, also printed).
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use dynauth_proto::session::{Key, KeyValue, PrimaryKey, SessionQuery};
use dynauth_proto::store::{Lookup, MatchScope, SessionStore, Touch};
use dynauth_proto::synth;
use dynauth_table::SessionTable;

const SEED: u64 = 3;
/// Random keys cycled in the timed loop (read in order: 16 MiB, prefetched).
const KEYS: usize = 1 << 20;

fn sessions() -> u64 {
    std::env::var("DYNAUTH_BENCH_SESSIONS")
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(1_000_000)
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn lookup(id: &[u8]) -> Lookup<'_> {
    Lookup {
        query: SessionQuery {
            acct_session_id: Some(id),
            ..Default::default()
        },
        scope: MatchScope {
            vrf: None,
            max_sessions: 16,
            tombstone_window_ms: dynauth_proto::store::NO_CLIENT_WINDOW,
        },
        now_ms: 1,
    }
}

/// The `q`-quantile of sorted `v`.
fn quantile(v: &[u64], q: f64) -> u64 {
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn random_lookups(c: &mut Criterion) {
    let n = sessions();
    let t = Instant::now();
    let table: SessionTable = SessionTable::with_sessions(synth::sessions(SEED, n));
    eprintln!("table_random: {n} sessions built in {:.1?}", t.elapsed());
    let mut state = 0x5eed;
    let keys: Vec<[u8; 16]> = (0..KEYS)
        .map(|_| {
            let id = synth::acct_session_id(SEED, splitmix64(&mut state) % n);
            id.as_bytes().try_into().expect("16-octet Acct-Session-Id")
        })
        .collect();
    assert!(
        table.peek(&lookup(&keys[0])).is_ok(),
        "the keys are in the table"
    );

    // Per-lookup latencies, outside criterion (which reports sample means only).
    let mut clock = Vec::with_capacity(200_000);
    let mut lat = Vec::with_capacity(200_000);
    for (i, key) in keys.iter().cycle().skip(KEYS / 2).take(200_000).enumerate() {
        let start = Instant::now();
        if i % 2 == 0 {
            black_box(table.peek(&lookup(black_box(key)))).ok();
        }
        let ns = start.elapsed().as_nanos() as u64;
        if i % 2 == 0 { &mut lat } else { &mut clock }.push(ns);
    }
    lat.sort_unstable();
    clock.sort_unstable();
    eprintln!(
        "table_random: {n} sessions, one lookup timed at a time ({} lookups): p50 {} ns, \
         p90 {} ns, p99 {} ns, p99.9 {} ns, max {} ns; the timer alone: p50 {} ns, p99 {} ns",
        lat.len(),
        quantile(&lat, 0.5),
        quantile(&lat, 0.9),
        quantile(&lat, 0.99),
        quantile(&lat, 0.999),
        lat[lat.len() - 1],
        quantile(&clock, 0.5),
        quantile(&clock, 0.99),
    );

    let mut g = c.benchmark_group("table_random");
    g.measurement_time(Duration::from_secs(5));
    g.warm_up_time(Duration::from_secs(1));
    let mut k = 0usize;
    g.bench_function(format!("lookup_acct_session_id/{n}"), |b| {
        b.iter(|| {
            k = (k + 1) & (KEYS - 1);
            black_box(table.peek(&lookup(black_box(&keys[k]))))
        })
    });
    // The same lookups a receive batch at a time, as a shard does them: first the index
    // slot of every key of the batch is touched, then every record, then each is looked
    // up, so that the batch's cache misses overlap (`SessionStore::touch`; docs/
    // BENCHMARKS.md, "Batch touches"). Criterion's figure is per batch of 64: divide by 64
    // for a lookup.
    let mut k = 0usize;
    g.bench_function(format!("lookup_acct_session_id_batch_of_64/{n}"), |b| {
        b.iter(|| {
            k = (k + BATCH) & (KEYS - 1);
            let batch = &keys[k..k + BATCH];
            for step in [Touch::Index, Touch::Record] {
                for key in batch {
                    table.touch(
                        &PrimaryKey {
                            key: Key::AcctSessionId,
                            value: KeyValue::Text(key),
                        },
                        step,
                    );
                }
            }
            let mut found = 0usize;
            for key in batch {
                found += usize::from(table.peek(&lookup(black_box(key))).is_ok());
            }
            black_box(found)
        })
    });
    // The same, through `SessionStore::touch_all` (what the shard calls): the batch's keys
    // hashed first, then the index entries in one tight loop, then the records.
    let mut k = 0usize;
    g.bench_function(
        format!("lookup_acct_session_id_batch_of_64_touch_all/{n}"),
        |b| {
            b.iter(|| {
                k = (k + BATCH) & (KEYS - 1);
                let batch = &keys[k..k + BATCH];
                let primary: [PrimaryKey<'_>; BATCH] = std::array::from_fn(|i| PrimaryKey {
                    key: Key::AcctSessionId,
                    value: KeyValue::Text(&batch[i]),
                });
                table.touch_all(&primary);
                let mut found = 0usize;
                for key in batch {
                    found += usize::from(table.peek(&lookup(black_box(key))).is_ok());
                }
                black_box(found)
            })
        },
    );
    g.finish();
}

/// Keys per batch in the batched lookups (a full receive batch of the shard).
const BATCH: usize = 64;

criterion_group!(table_random, random_lookups);
criterion_main!(table_random);
