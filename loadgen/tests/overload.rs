//! Overload (RFC 5176 §3.5, issue #14 "Hostile and heavy input"): dynauthd offered twice
//! what it can do keeps answering at >= 80% of its capacity within a DAC's 1 s timeout,
//! sheds the rest (NAK 506, counted), keeps its memory bounded, does not crash, and
//! recovers at once: right after the overload a normal-rate run has no timeouts.
//!
//! Made conclusive on a small machine by a deliberately slowed server (the test-only
//! `--test-slow-decision-us`: each datagram decided in full costs 1 ms more, shed ones do
//! not), so the bundled generator can offer 2x its capacity. Loopback only, bounded: about
//! 20 s in all (2x for 10 s; `DYNAUTH_OVERLOAD_SECS` changes that, e.g. the 20 s figure in
//! docs/BENCHMARKS.md). `DYNAUTH_OVERLOAD_SHED_AFTER=0` runs it with shedding off, to see
//! it fail (every answer then waits behind seconds of queue and arrives late).
//!
//! `dynauthd` is another package's binary: `cargo test --workspace` builds it into the same
//! target folder as this test (`tests/dynauthd`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

mod dynauthd;

/// The server under test, killed when dropped.
struct Server(dynauthd::Killed);

impl Server {
    fn alive(&mut self) -> bool {
        matches!(self.0.0.try_wait(), Ok(None))
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0.0.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }
}

/// Starts dynauthd; returns it, its listen address and its metrics address.
fn start(args: &[&str]) -> (Server, String, SocketAddr) {
    let (child, addr, banner) = dynauthd::start_with_banner(args);
    let metrics = banner
        .split_whitespace()
        .find_map(|w| w.strip_prefix("metrics="))
        .unwrap_or_else(|| panic!("no metrics address in {banner:?}"))
        .parse()
        .unwrap();
    (Server(child), addr, metrics)
}

fn scrape(metrics: SocketAddr, name: &str) -> u64 {
    let mut s = TcpStream::connect(metrics).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in the metrics"))
}

/// One loadgen run; its JSON report.
fn loadgen(addr: &str, sessions: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args([
            "--target",
            addr,
            "--secret",
            "overload-secret",
            "--sessions",
        ])
        .arg(sessions)
        // Event-Timestamp: every request is new (else the pool repeats identical requests,
        // answered from the duplicate cache, which would flatter the figures).
        .args([
            "--mix",
            "coa=1",
            "--event-timestamp",
            "--timeout",
            "1000",
            "--json",
        ])
        .args(args)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "loadgen printed no report ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn n(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// Answers within the 1 s timeout that did the work (everything answered but NAK 506).
fn useful(report: &serde_json::Value) -> f64 {
    n(&report["answered"]) - n(&report["answers"]["nak_by_error_cause"]["506"])
}

#[test]
fn rfc5176_s3_5_twice_the_capacity_keeps_80_percent_answered_in_time_and_recovers() {
    let secs: u64 = std::env::var("DYNAUTH_OVERLOAD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let shed_after = std::env::var("DYNAUTH_OVERLOAD_SHED_AFTER").unwrap_or("500ms".into());
    let dir = std::env::temp_dir().join(format!("dynauth-overload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sessions = dir.join("sessions.jsonl");
    let status = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["sessions", "--count", "4096", "--seed", "5", "--out"])
        .arg(&sessions)
        .status()
        .unwrap();
    assert!(status.success());
    let (mut server, addr, metrics) = start(&[
        "--listen",
        "127.0.0.1:0",
        "--client",
        "127.0.0.1/32=overload-secret",
        "--sessions",
        sessions.to_str().unwrap(),
        "--shards",
        "1",
        "--io",
        "mmsg",
        "--metrics",
        "127.0.0.1:0",
        "--shed-after",
        &shed_after,
        "--test-slow-decision-us",
        "1000",
    ]);

    // Capacity: closed loop, what the slowed server answers per second.
    let capacity_run = loadgen(&addr, &sessions, &["--window", "64", "--duration", "3s"]);
    let capacity = n(&capacity_run["achieved_rate_rps"]);
    assert!(
        capacity > 200.0 && n(&capacity_run["timeouts"]) == 0.0,
        "capacity run: {capacity_run}"
    );
    let rss_before = server.rss_kib();

    // Twice that, open loop, for `secs` seconds.
    let offered = (2.0 * capacity).round();
    let overload = loadgen(
        &addr,
        &sessions,
        &[
            "--rate",
            &format!("{offered}"),
            "--duration",
            &format!("{secs}s"),
        ],
    );
    let seconds = n(&overload["send_seconds"]).max(1.0);
    let in_time = useful(&overload) / seconds;
    let shed_naks = n(&overload["answers"]["nak_by_error_cause"]["506"]);
    eprintln!(
        "capacity {capacity:.0}/s; offered {offered}/s for {seconds:.1} s: {in_time:.0}/s useful answers within 1 s ({:.0}% of capacity), {shed_naks} NAK 506, {} timeouts, {} late; RSS {rss_before} KiB before",
        100.0 * in_time / capacity,
        overload["timeouts"],
        overload["answers"]["late"],
    );
    assert!(server.alive(), "dynauthd survived the overload");
    // The generator did offer twice the capacity (else the test proves nothing).
    assert!(
        n(&overload["sent_rate_rps"]) >= 1.8 * capacity,
        "the generator fell behind: {overload}"
    );
    assert!(
        in_time >= 0.8 * capacity,
        "useful answers in time {in_time:.0}/s < 80% of capacity {capacity:.0}/s: {overload}"
    );
    let shed = scrape(metrics, "dynauth_shed_total{action=\"nak\"}");
    assert!(shed > 0, "the shed counter counts");
    let rss_after = server.rss_kib();
    eprintln!("RSS {rss_before} KiB before, {rss_after} KiB after; {shed} shed");
    assert!(
        rss_after <= rss_before + 64 * 1024,
        "memory bounded: {rss_before} KiB -> {rss_after} KiB"
    );

    // Recovery: at once, half the capacity has no timeouts.
    let recovery = loadgen(
        &addr,
        &sessions,
        &[
            "--rate",
            &format!("{}", (capacity / 2.0).round()),
            "--duration",
            "3s",
        ],
    );
    assert!(server.alive());
    assert_eq!(n(&recovery["timeouts"]), 0.0, "recovery run: {recovery}");
    assert!(n(&recovery["answered"]) > 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}
