//! What tombstones cost (docs/RUNNING.md, "Tombstones"): resident memory of N sessions, then
//! after a Disconnect of every one (each becomes its tombstone in place: the FIFO entry is
//! the cost), then after N new sessions arrive while the tombstones wait (churn: the full
//! cost of a tombstone).
//!
//! cargo run --release -p dynauth-table --example tombstone_memory -- N
use dynauth_proto::session::SessionQuery;
use dynauth_proto::store::{Lookup, MatchScope, NO_CLIENT_WINDOW, SessionStore, TombstonePolicy};
use dynauth_proto::synth;
use dynauth_table::{SessionTable, TableConfig};

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

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let table: SessionTable = SessionTable::new(TableConfig {
        tombstones: TombstonePolicy {
            capacity: usize::try_from(n).unwrap_or(usize::MAX),
            ..TombstonePolicy::default()
        },
        ..TableConfig::default()
    });
    let start = rss_kib();
    for i in 0..n {
        table.insert(synth::session(1, i));
    }
    let live = rss_kib();
    for i in 0..n {
        let id = synth::acct_session_id(1, i);
        let lookup = Lookup {
            query: SessionQuery {
                acct_session_id: Some(id.as_bytes()),
                ..Default::default()
            },
            scope: MatchScope {
                vrf: None,
                max_sessions: 16,
                tombstone_window_ms: NO_CLIENT_WINDOW,
            },
            now_ms: 1,
        };
        table.disconnect(&lookup).expect("removed");
    }
    let buried = rss_kib();
    for i in n..2 * n {
        table.insert(synth::session(1, i));
    }
    let churn = rss_kib();
    let per = |kib: u64| kib as f64 * 1024.0 / n as f64;
    println!(
        "n={n} tombstones={} live={}: {:.1} B/session live; +{:.1} B per session turned into its tombstone; +{:.1} B per new session while the tombstones wait (a tombstone's full cost under churn)",
        table.stats().tombstones,
        table.stats().live,
        per(live - start),
        per(buried.saturating_sub(live)),
        per(churn - buried),
    );
}
