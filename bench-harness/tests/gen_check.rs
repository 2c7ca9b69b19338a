//! The independent generator `mmsg-gen` and `bench-harness gen-check`, on loopback only and
//! bounded in count and time. Behaviour, not speed: every answer it sent comes back and is
//! matched exactly; a server that drops, duplicates and corrupts is counted to the datagram;
//! the run stops by itself; the check's report has both rates and the ratio. The check needs
//! `target/<profile>/loadgen` built (`cargo build --workspace`, or BENCH_HARNESS_LOADGEN).

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dynauth_loadgen::echo::EchoServer;
use serde_json::Value;

const MMSG_GEN: &str = env!("CARGO_BIN_EXE_mmsg-gen");

fn mmsg_gen(args: &[&str]) -> (bool, Value, Duration) {
    let started = Instant::now();
    let out = Command::new(MMSG_GEN)
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "mmsg-gen printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), json, elapsed)
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"))
}

#[test]
fn against_the_echo_server_every_request_is_answered_exactly_and_the_run_ends_by_itself() {
    let echo = EchoServer::loopback().unwrap();
    let target = echo.local_addr().to_string();
    for signed in [false, true] {
        let mut args = vec![
            "--target",
            &target,
            "--window",
            "32",
            "--requests",
            "20000",
            "--duration-ms",
            "20000",
        ];
        if signed {
            args.extend(["--secret", "testing123"]);
        }
        let (ok, r, elapsed) = mmsg_gen(&args);
        assert!(ok, "{r}");
        assert_eq!(n(&r, "sent"), 20_000, "{r}");
        assert_eq!(n(&r, "answered"), 20_000, "{r}");
        for k in [
            "lost",
            "stale",
            "corrupt",
            "foreign",
            "send_errors",
            "unresolved_at_end",
        ] {
            assert_eq!(n(&r, k), 0, "{k}: {r}");
        }
        assert_eq!(r["signed"], Value::Bool(signed));
        assert_eq!(n(&r, "datagram_octets"), 44);
        assert!(r["answered_rps"].as_f64().unwrap() > 0.0);
        // It stopped after its 20,000 requests, long before the 20 s duration.
        assert!(elapsed < Duration::from_secs(15), "took {elapsed:?}");
    }
    assert!(echo.stop().unwrap() >= 40_000);
}

/// What the misbehaving server did, datagram by datagram.
#[derive(Debug, Default)]
struct Misdeeds {
    received: u64,
    dropped: u64,
    duplicated: u64,
    corrupted: u64,
}

/// A loopback server that echoes, except: every 10th datagram is dropped, every 13th is
/// echoed with its last octet changed, every 7th other one is echoed twice.
fn misbehaving_server() -> (
    std::net::SocketAddr,
    std::thread::JoinHandle<Misdeeds>,
    Arc<AtomicBool>,
) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let addr = socket.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let handle = std::thread::spawn(move || {
        let mut m = Misdeeds::default();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(30);
        while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
            let Ok((len, from)) = socket.recv_from(&mut buf) else {
                continue;
            };
            let i = m.received;
            m.received += 1;
            if i % 10 == 9 {
                m.dropped += 1;
            } else if i % 13 == 12 {
                buf[len - 1] ^= 0x20;
                socket.send_to(&buf[..len], from).unwrap();
                m.corrupted += 1;
            } else {
                socket.send_to(&buf[..len], from).unwrap();
                if i % 7 == 6 {
                    socket.send_to(&buf[..len], from).unwrap();
                    m.duplicated += 1;
                }
            }
        }
        m
    });
    (addr, handle, stop)
}

#[test]
fn drops_duplicates_and_corruptions_are_each_counted_exactly() {
    let (addr, server, stop) = misbehaving_server();
    let target = addr.to_string();
    let (ok, r, elapsed) = mmsg_gen(&[
        "--target",
        &target,
        "--window",
        "8",
        "--requests",
        "3000",
        "--timeout-ms",
        "100",
        "--duration-ms",
        "20000",
    ]);
    stop.store(true, Ordering::Relaxed);
    let m = server.join().unwrap();
    assert!(ok, "{r}");
    assert_eq!(n(&r, "sent"), 3000, "{r}");
    assert_eq!(m.received, 3000, "{m:?}");
    // A dropped or corrupted request never gets its exact answer: lost after the timeout.
    assert_eq!(n(&r, "corrupt"), m.corrupted, "{r} {m:?}");
    assert_eq!(n(&r, "lost"), m.dropped + m.corrupted, "{r} {m:?}");
    assert_eq!(
        n(&r, "answered"),
        3000 - m.dropped - m.corrupted,
        "{r} {m:?}"
    );
    // The second copy names a request already answered.
    assert_eq!(n(&r, "stale"), m.duplicated, "{r} {m:?}");
    assert_eq!(n(&r, "foreign"), 0, "{r}");
    assert!(
        m.dropped > 0 && m.corrupted > 0 && m.duplicated > 0,
        "{m:?}"
    );
    // Bounded: 3000 requests, 8 in flight, each loss costing at most 100 ms.
    assert!(elapsed < Duration::from_secs(15), "took {elapsed:?}");
}

#[test]
fn with_nothing_listening_it_still_stops_in_time_and_says_so() {
    // A port that was free a moment ago: nothing answers there.
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let target = format!("127.0.0.1:{port}");
    let (ok, r, elapsed) = mmsg_gen(&[
        "--target",
        &target,
        "--duration-ms",
        "300",
        "--timeout-ms",
        "100",
    ]);
    assert!(!ok, "nothing answered: exit non-zero ({r})");
    assert_eq!(n(&r, "answered"), 0);
    assert_eq!(n(&r, "lost"), n(&r, "sent"), "{r}");
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
}

fn bin_dir() -> PathBuf {
    Path::new(MMSG_GEN).parent().unwrap().to_path_buf()
}

#[test]
fn the_check_reports_both_rates_and_the_ratio() {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("skipped: gen-check needs two CPUs (echo server and generators apart)");
        return;
    }
    let loadgen = std::env::var_os("BENCH_HARNESS_LOADGEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir().join("loadgen"));
    assert!(
        loadgen.is_file(),
        "{} not found: build the workspace first (`cargo build --workspace`), or set BENCH_HARNESS_LOADGEN",
        loadgen.display()
    );
    let json = std::env::temp_dir().join(format!("gen-check-{}.json", std::process::id()));
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_bench-harness"))
        .args(["gen-check", "--rounds", "1", "--duration-ms", "300"])
        .arg("--loadgen")
        .arg(&loadgen)
        .arg("--mmsg-gen")
        .arg(MMSG_GEN)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "gen-check failed:\n{stdout}\n{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    for line in [
        "round 1 (mmsg-gen, mmsg-gen --secret, loadgen): independent ",
        "median of 1 rounds [min–max]: independent ",
        "loadgen / independent: ",
        "loadgen / independent signed: ",
        "44-octet requests",
    ] {
        assert!(stdout.contains(line), "no `{line}` in:\n{stdout}");
    }
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    assert_eq!(r["datagram_octets"], 44);
    for k in ["independent", "independent_signed", "loadgen"] {
        assert!(r[k]["median"].as_f64().unwrap() > 0.0, "{k}: {r}");
        assert_eq!(r["rounds"][0][k]["exact"], Value::Bool(true), "{k}: {r}");
    }
    let ratio = r["ratio"].as_f64().unwrap();
    let expected =
        r["loadgen"]["median"].as_f64().unwrap() / r["independent"]["median"].as_f64().unwrap();
    assert!((ratio - expected).abs() < 1e-9, "{r}");
    assert!(r["ratio_signed"].as_f64().unwrap() > 0.0);
}
