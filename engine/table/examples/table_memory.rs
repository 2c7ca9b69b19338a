//! Session-table measurements at scale: resident memory per session, lookup latency on one
//! core, lookup throughput with a concurrent writer, and JSON Lines load time.
//!
//! cargo run --release -p dynauth-table --example table_memory -- N [flat|papaya] [--load FILE]
//!
//! Phases: (1) insert N synthetic sessions (`synth::session`) and read VmRSS before/after;
//! (2) median lookup latency by Acct-Session-Id (random keys, batches of 64 timed);
//! (3) lookup throughput on one thread alone, then with a second thread removing and inserting
//! 100k sessions/s each; (4) with `--load FILE`: write N sessions to FILE as JSON Lines (if it
//! does not exist), load the file into a fresh table, report time and VmRSS. With the
//! environment variable ONLY_LOAD set, only phase (4) runs.
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dynauth_proto::session::SessionQuery;
use dynauth_proto::store::{Applied, Lookup, MatchScope, SessionStore};
use dynauth_proto::synth;
use dynauth_table::load::{load_jsonl_file, progress_bar, write_synthetic_jsonl};
use dynauth_table::{FlatIndex, KeyIndex, PapayaIndex, SessionTable, TableConfig};

const SEED: u64 = 1;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
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

/// CPU time of the calling thread (first field of /proc/thread-self/schedstat).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn id_bytes(i: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(synth::acct_session_id(SEED, i).as_bytes());
    out
}

fn run<I: KeyIndex + 'static>(n: u64, load: Option<String>) {
    if std::env::var_os("ONLY_LOAD").is_none() {
        measure_table::<I>(n);
    }
    if let Some(path) = load {
        load_file(n, path);
    }
}

fn measure_table<I: KeyIndex + 'static>(n: u64) {
    let rss0 = rss_kib();
    let t = Instant::now();
    let table = Arc::new(SessionTable::<I>::default());
    for s in synth::sessions(SEED, n) {
        assert!(table.insert(s));
    }
    let build = t.elapsed();
    let rss1 = rss_kib();
    let stats = table.stats();
    println!(
        "index={} sessions={n} insert_time={build:.2?} rss_before={rss0}KiB rss_after={rss1}KiB \
         bytes_per_session={:.1} record_bytes_per_session={:.1}",
        I::NAME,
        (rss1 - rss0) as f64 * 1024.0 / n as f64,
        stats.record_bytes as f64 / n as f64,
    );

    // Phase 2: median latency.
    let keys: Vec<[u8; 16]> = {
        let mut rng = Rng(0x1234_5678);
        (0..1_000_000).map(|_| id_bytes(rng.next(n))).collect()
    };
    let mut per_lookup = Vec::with_capacity(keys.len() / 64);
    for batch in keys.chunks_exact(64) {
        let t = Instant::now();
        for k in batch {
            let r = table.peek(&lookup(k));
            debug_assert_eq!(r, Ok(Applied::Sessions(1)));
            std::hint::black_box(r).ok();
        }
        per_lookup.push(t.elapsed().as_nanos() as f64 / 64.0);
    }
    per_lookup.sort_by(f64::total_cmp);
    let q = |p: f64| per_lookup[((per_lookup.len() - 1) as f64 * p) as usize];
    println!(
        "lookup_by_acct_session_id ns/lookup (batches of 64, random keys): median={:.0} p10={:.0} p90={:.0} p99={:.0}",
        q(0.5),
        q(0.1),
        q(0.9),
        q(0.99)
    );

    // Phase 3: throughput alone and with a writer.
    // (lookups per wall second, lookups per second of this thread's own CPU time): on a
    // shared machine the second isolates the table's own slowdown from CPU contention.
    let measure = |table: &Arc<SessionTable<I>>, secs: u64| {
        let cpu0 = thread_cpu_ns();
        let end = Instant::now() + Duration::from_secs(secs);
        let mut done = 0u64;
        let mut batches = keys.chunks_exact(256).cycle();
        while Instant::now() < end {
            for k in batches.next().unwrap_or_default() {
                std::hint::black_box(table.peek(&lookup(k))).ok();
            }
            done += 256;
        }
        let cpu = (thread_cpu_ns() - cpu0).max(1) as f64 / 1e9;
        (done as f64 / secs as f64, done as f64 / cpu)
    };
    let (alone, alone_cpu) = measure(&table, 3);
    let stop = Arc::new(AtomicBool::new(false));
    let churned = Arc::new(AtomicU64::new(0));
    let writer = {
        let (table, stop, churned) = (table.clone(), stop.clone(), churned.clone());
        std::thread::spawn(move || {
            // 100 removals + 100 inserts per millisecond; removes the oldest, inserts new.
            let start = Instant::now();
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..100 {
                    let id = id_bytes(k);
                    let r = table.disconnect(&lookup(&id));
                    debug_assert_eq!(r, Ok(Applied::Sessions(1)));
                    let r = table.insert(synth::session(SEED, n + k));
                    debug_assert!(r);
                    k += 1;
                }
                churned.store(k, Ordering::Relaxed);
                let due = start + Duration::from_micros(k * 10);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        })
    };
    let t = Instant::now();
    let (with_writer, with_writer_cpu) = measure(&table, 3);
    let rate = churned.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    writer.join().ok();
    // Lookups of removed keys (the first `churned`) answer AlreadyRemoved: same probe cost.
    println!(
        "throughput lookups/s: alone={alone:.0} with_writer={with_writer:.0} ({:+.1}%) writer_rate={rate:.0} removes/s + {rate:.0} inserts/s",
        (with_writer / alone - 1.0) * 100.0
    );
    println!(
        "throughput lookups per reader-CPU-second: alone={alone_cpu:.0} with_writer={with_writer_cpu:.0} ({:+.1}%)",
        (with_writer_cpu / alone_cpu - 1.0) * 100.0
    );
}

fn load_file(n: u64, path: String) {
    {
        let path = std::path::PathBuf::from(path);
        if !path.exists() {
            let t = Instant::now();
            let f = std::io::BufWriter::new(std::fs::File::create(&path).expect("create file"));
            write_synthetic_jsonl(f, SEED, n).expect("write file");
            println!("wrote {} in {:.2?}", path.display(), t.elapsed());
        }
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let bar = progress_bar(size, std::io::stderr().is_terminal());
        let rss0 = rss_kib();
        let (table, report) = load_jsonl_file(&path, TableConfig::default(), &mut |p| {
            if let Some(b) = &bar {
                b.set_position(p.bytes);
            }
        })
        .expect("load");
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let rss1 = rss_kib();
        println!(
            "{report}; rss_before={rss0}KiB rss_after={rss1}KiB bytes_per_session={:.1}",
            (rss1.saturating_sub(rss0)) as f64 * 1024.0 / table.len().max(1) as f64
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: u64 = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let index = args.get(1).map(String::as_str).unwrap_or("flat");
    let load = args
        .iter()
        .position(|a| a == "--load")
        .and_then(|i| args.get(i + 1).cloned());
    match index {
        "papaya" => run::<PapayaIndex>(n, load),
        _ => run::<FlatIndex>(n, load),
    }
}
