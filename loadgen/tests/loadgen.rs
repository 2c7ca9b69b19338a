//! End-to-end tests of the generator on loopback, against in-process targets (see
//! `common`): every answer verified, the accounting adds up, open-loop latency includes
//! queueing delay, deliberately bad requests and corrupted answers are counted as such.
#![forbid(unsafe_code)]

mod common;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{SECRET, args, engine_target, slow_echo, untouched};
use dynauth_loadgen::run;
use dynauth_proto::auth::{Secret, md5_authenticator};
use dynauth_proto::dict::{ErrorCause, attr};
use dynauth_proto::synth;

fn assert_adds_up(r: &dynauth_loadgen::Report) {
    assert!(r.counts_add_up, "{}", r.text());
    assert_eq!(
        r.requests,
        r.answered + r.timeouts + r.expected_discards,
        "{}",
        r.text()
    );
}

/// (a) Closed loop against the engine: every answer authenticated (Response Authenticator and
/// Message-Authenticator), the ACK/NAK counts are exactly the mix, and the store agrees.
#[test]
fn closed_loop_against_engine_verifies_every_answer_and_matches_the_mix() {
    let target = engine_target(1000, untouched());
    let report = run(&args(
        target.addr,
        &[
            "--synthetic",
            "1000",
            "--requests",
            "500",
            "--window",
            "16",
            "--mix",
            "disconnect=2,coa=2,unknown=1",
            "--message-authenticator",
            "--event-timestamp",
            "--timeout",
            "3s",
        ],
    ))
    .unwrap();
    assert_adds_up(&report);
    let c = &report.counters;
    assert_eq!(report.requests, 500);
    assert_eq!(report.answered, 500, "{}", report.text());
    assert_eq!(report.timeouts, 0);
    assert_eq!(c.acks, [200, 200], "ACK disconnect, coa");
    assert_eq!(c.naks_with(ErrorCause::SessionContextNotFound), 100);
    assert_eq!(c.nak_total(), 100);
    assert_eq!(c.bad_authenticators(), 0);
    assert_eq!(
        c.unexpected_codes + c.expectation_mismatches + c.stray_answers,
        0
    );
    assert_eq!(report.latency.count, 500);
    assert!(report.latency.p50_us > 0.0);
    // The 200 disconnected sessions are gone from the DAS.
    assert_eq!(target.store.snapshot().len(), 800);
    let seen = target.stop();
    assert_eq!(seen.received.load(Ordering::Relaxed), 500);
}

/// (a) Open loop against the engine, several threads and sockets, with a histogram file.
#[test]
fn open_loop_against_engine_counts_add_up_and_writes_hgrm() {
    let target = engine_target(2000, untouched());
    let dir = std::env::temp_dir().join(format!("loadgen-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hgrm = dir.join("latency.hgrm");
    let report = run(&args(
        target.addr,
        &[
            "--synthetic",
            "2000",
            "--rate",
            "2000",
            "--requests",
            "400",
            "--threads",
            "2",
            "--sockets",
            "4",
            "--mix",
            "coa=3,unknown=1",
            "--timeout",
            "3s",
            "--histogram-file",
            hgrm.to_str().unwrap(),
        ],
    ))
    .unwrap();
    assert_adds_up(&report);
    assert_eq!(report.requests, 400);
    assert_eq!(report.answered, 400, "{}", report.text());
    assert_eq!(report.counters.acks, [0, 300]);
    assert_eq!(
        report
            .counters
            .naks_with(ErrorCause::SessionContextNotFound),
        100
    );
    assert!(report.schedule_lag.is_some());
    assert_eq!(report.mode, dynauth_loadgen::report::LoopMode::OpenLoop);
    let text = std::fs::read_to_string(&hgrm).unwrap();
    assert!(text.contains("Percentile"));
    assert!(text.contains("Total count    =          400]"), "{text}");
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["answers"]["nak_by_error_cause"]["503"], 100);
    assert!(json["generator"]["cpu_ns_per_request"].as_f64().unwrap() > 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}

fn p99_against_slow_echo(delay_ms: u64, rate: &str, requests: &str) -> dynauth_loadgen::Report {
    let (addr, stop, handle) = slow_echo(Duration::from_millis(delay_ms));
    let report = run(&args(
        addr,
        &[
            "--expect",
            "echo",
            "--rate",
            rate,
            "--requests",
            requests,
            "--timeout",
            "5s",
        ],
    ))
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    handle.join().unwrap();
    assert_adds_up(&report);
    assert_eq!(
        report.counters.echo_ok,
        report.requests,
        "{}",
        report.text()
    );
    report
}

/// (b) Open-loop latency includes queueing delay: a responder that sleeps D per packet shows
/// p99 >= D, above the D = 0 run; and offered above its capacity (5 ms per packet, 400/s
/// offered for 100 requests), the later requests wait behind the earlier ones, so latency
/// measured from the intended send time grows to a quarter of a second. A generator with
/// coordinated omission, or one timing from when the server got round to it, would not see
/// this.
#[test]
fn open_loop_latency_includes_queueing_delay() {
    let fast = p99_against_slow_echo(0, "200", "60");
    let slow = p99_against_slow_echo(5, "100", "60");
    assert!(slow.latency.p99_us >= 5_000.0, "{}", slow.text());
    assert!(
        slow.latency.p99_us > fast.latency.p99_us,
        "{} vs {}",
        slow.text(),
        fast.text()
    );
    let overload = p99_against_slow_echo(5, "400", "100");
    // The last request is intended at 0.25 s and served at about 0.5 s.
    assert!(overload.latency.max_us >= 200_000.0, "{}", overload.text());
    assert!(overload.latency.p99_us >= 150_000.0, "{}", overload.text());
    assert!(overload.latency.p50_us >= 60_000.0, "{}", overload.text());
}

/// (b) No coordinated omission: the server pauses 300 ms at the start while the generator
/// offers 2000/s with at most 100 requests outstanding. After 100 requests the generator
/// cannot send the next ones on time; they leave late, when answers free room. Latency is
/// still counted from their intended send time, so about 500 of the 1000 requests (those
/// intended in the first 250 ms) see at least 50 ms. A generator that timed from the actual
/// send would report a median near zero. The schedule lag shows the generator fell behind.
#[test]
fn open_loop_counts_latency_from_the_intended_send_time() {
    let (addr, stop, handle) = common::stalling_echo(Duration::from_millis(300));
    let report = run(&args(
        addr,
        &[
            "--expect",
            "echo",
            "--rate",
            "2000",
            "--requests",
            "1000",
            "--max-outstanding",
            "100",
            "--timeout",
            "5s",
        ],
    ))
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    handle.join().unwrap();
    assert_adds_up(&report);
    assert_eq!(report.counters.echo_ok, 1000, "{}", report.text());
    assert!(report.latency.p50_us >= 20_000.0, "{}", report.text());
    let lag = report.schedule_lag.clone().unwrap();
    assert!(lag.max_us >= 100_000.0, "{}", report.text());
}

/// (d) Requests with a deliberately bad authenticator get no answer from the DAS and are
/// counted as expected discards, not as timeouts.
#[test]
fn bad_authenticator_share_gets_no_answer_and_is_not_a_timeout() {
    let target = engine_target(100, untouched());
    let report = run(&args(
        target.addr,
        &[
            "--synthetic",
            "100",
            "--requests",
            "100",
            "--window",
            "20",
            "--mix",
            "coa=1,bad-auth=1",
            "--timeout",
            "800ms",
        ],
    ))
    .unwrap();
    assert_adds_up(&report);
    assert_eq!(report.expected_discards, 50, "{}", report.text());
    assert_eq!(report.timeouts, 0);
    assert_eq!(report.answered, 50);
    assert_eq!(report.counters.acks, [0, 50]);
    assert_eq!(report.counters.answered_discards, 0);
    let seen = target.stop();
    assert_eq!(seen.received.load(Ordering::Relaxed), 100);
    assert_eq!(seen.answered.load(Ordering::Relaxed), 50);
}

/// (e) Answers with a corrupted Response Authenticator, or a corrupted Message-Authenticator
/// under a recomputed (valid) Response Authenticator, are counted as bad authenticators and
/// never as ACKs; like a DAC, loadgen discards them, so their requests time out (and are
/// latency samples at the timeout).
#[test]
fn corrupted_answer_authenticators_are_counted() {
    let secret = Secret::new(SECRET).unwrap();
    let mut n = 0u64;
    let hook = Box::new(move |request: &[u8], answer: &mut Vec<u8>| {
        n += 1;
        if n % 2 == 1 {
            answer[7] ^= 0x01; // inside the Response Authenticator
        } else {
            // The engine puts the Message-Authenticator first: value at 22..38.
            assert_eq!(answer[20], attr::MESSAGE_AUTHENTICATOR);
            answer[30] ^= 0x80;
            let mut request_auth = [0u8; 16];
            request_auth.copy_from_slice(&request[4..20]);
            let ra = md5_authenticator(answer, &request_auth, &secret);
            answer[4..20].copy_from_slice(&ra);
        }
        true
    });
    let target = engine_target(200, hook);
    let report = run(&args(
        target.addr,
        &[
            "--synthetic",
            "200",
            "--requests",
            "100",
            "--window",
            "10",
            "--mix",
            "coa=1",
            "--timeout",
            "150ms",
        ],
    ))
    .unwrap();
    assert_adds_up(&report);
    let c = &report.counters;
    assert_eq!(c.bad_response_authenticators, 50, "{}", report.text());
    assert_eq!(c.bad_message_authenticators, 50, "{}", report.text());
    assert_eq!(c.ack_total() + c.nak_total(), 0);
    assert_eq!(report.answered, 0);
    assert_eq!(report.timeouts, 100);
    assert_eq!(c.late_answers + c.stray_answers, 0, "{}", report.text());
    assert_eq!(
        report.answered_latency.count, 0,
        "unauthenticated answers have no latency"
    );
    assert_eq!(report.latency.count, 100);
    assert!(report.latency.min_us >= 149_850.0, "{}", report.text());
}

/// Retransmissions: a DAS that loses the first copy of every request still answers the
/// retransmission (same packet, same Identifier), counted separately.
#[test]
fn retransmissions_resend_the_same_packet_and_are_counted() {
    let seen_first: Arc<Mutex<HashSet<Vec<u8>>>> = Arc::default();
    let copies = Arc::clone(&seen_first);
    let hook = Box::new(move |request: &[u8], _answer: &mut Vec<u8>| {
        // Drop the first copy; answer a byte-identical second copy.
        !copies.lock().unwrap().insert(request.to_vec())
    });
    let target = engine_target(100, hook);
    let report = run(&args(
        target.addr,
        &[
            "--synthetic",
            "100",
            "--requests",
            "40",
            "--window",
            "8",
            "--mix",
            "coa=1",
            "--retransmit-after",
            "50ms",
            "--retries",
            "2",
            "--timeout",
            "3s",
            "--event-timestamp",
            "--message-authenticator",
        ],
    ))
    .unwrap();
    assert_adds_up(&report);
    assert_eq!(report.answered, 40, "{}", report.text());
    assert_eq!(report.counters.acks, [0, 40]);
    assert_eq!(report.retransmissions, 40, "{}", report.text());
    assert_eq!(report.transmissions, 80);
    assert_eq!(seen_first.lock().unwrap().len(), 40);
}

/// Mass disconnect: every session of one NAS-Port-Id group disconnected exactly once.
#[test]
fn mass_disconnect_removes_exactly_one_group() {
    let target = engine_target(1000, untouched());
    let report = run(&args(
        target.addr,
        &[
            "--synthetic",
            "1000",
            "--profile",
            "mass-disconnect",
            "--group",
            "1",
            "--window",
            "64",
        ],
    ))
    .unwrap();
    assert_adds_up(&report);
    assert_eq!(report.requests, 256);
    assert_eq!(report.counters.acks, [256, 0], "{}", report.text());
    let left = target.store.snapshot();
    assert_eq!(left.len(), 1000 - 256);
    let prefix = synth::nas_port_group(1);
    assert!(
        left.iter()
            .all(|s| !s.nas_port_id.as_deref().unwrap().starts_with(&prefix))
    );
}

/// Echo mode: answers identical to the request succeed; a closed loop against the bundled
/// echo server completes a bounded run.
#[test]
fn echo_mode_against_the_bundled_echo_server() {
    let server = dynauth_loadgen::echo::EchoServer::loopback().unwrap();
    let report = run(&args(
        server.local_addr(),
        &["--expect", "echo", "--requests", "2000", "--window", "32"],
    ))
    .unwrap();
    assert_adds_up(&report);
    assert_eq!(report.counters.echo_ok, 2000, "{}", report.text());
    assert_eq!(server.stop().unwrap(), 2000);
}

/// Nobody listens: every request times out, the run still ends by itself within its bounds,
/// and the counts add up.
#[test]
fn no_server_every_request_times_out_and_the_run_ends() {
    let port = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let started = std::time::Instant::now();
    let report = run(&args(
        port,
        &[
            "--synthetic",
            "10",
            "--requests",
            "20",
            "--window",
            "4",
            "--mix",
            "coa=1",
            "--timeout",
            "200ms",
        ],
    ))
    .unwrap();
    assert_adds_up(&report);
    assert_eq!(report.requests, 20);
    assert_eq!(report.timeouts, 20, "{}", report.text());
    assert_eq!(report.answered, 0);
    assert!((report.loss_ratio - 1.0).abs() < 1e-9);
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Impossible combinations are refused before anything is sent.
#[test]
fn invalid_combinations_are_refused() {
    let target: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let refused = |extra: &[&str]| match run(&args(target, extra)) {
        Err(dynauth_loadgen::RunError::Invalid(msg)) => msg,
        Err(other) => panic!("{extra:?}: unexpected error {other}"),
        Ok(_) => panic!("{extra:?} was accepted"),
    };
    assert!(refused(&["--expect", "echo", "--mix", "coa=1,bad-auth=1"]).contains("bad"));
    assert!(
        refused(&["--window", "600", "--sockets", "2", "--synthetic", "1"]).contains("--sockets")
    );
    assert!(refused(&["--threads", "0"]).contains("--threads"));
    // Sessions are required when the mix targets existing ones.
    assert!(matches!(
        run(&args(target, &["--requests", "1"])),
        Err(dynauth_loadgen::RunError::Pool(_))
    ));
}

/// The time series shows a storm's shape: an echo server that stalls 400 ms on its first
/// datagram, under 1000 requests/s for 1 s. The requests intended in the first 100 ms wait
/// out the stall (p99 of that bucket at least 250 ms); once it is over, later buckets are
/// fast again. Every request is in exactly one bucket's samples, every send and answer in
/// one bucket's counts.
#[test]
fn the_time_series_shows_a_stall_and_its_recovery() {
    let (addr, stop, handle) = common::stalling_echo(Duration::from_millis(400));
    let report = run(&args(
        addr,
        &[
            "--expect",
            "echo",
            "--rate",
            "1000",
            "--duration",
            "1s",
            "--timeout",
            "2s",
        ],
    ))
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    handle.join().unwrap();
    assert_adds_up(&report);
    let ts = &report.time_series;
    assert_eq!(ts.bucket_ms, 100.0);
    assert!(ts.points.len() >= 10, "{ts:?}");
    let samples: u64 = ts.points.iter().map(|p| p.samples).sum();
    assert_eq!(samples, report.latency.count);
    let sent: f64 = ts.points.iter().map(|p| p.sent_rps * 0.1).sum();
    assert!((sent - report.requests as f64).abs() < 1e-6, "{ts:?}");
    let answered: f64 = ts.points.iter().map(|p| p.answered_rps * 0.1).sum();
    assert!((answered - report.answered as f64).abs() < 1e-6, "{ts:?}");
    assert!(ts.points[0].p99_us >= 250_000.0, "{:?}", ts.points[0]);
    let recovered = ts.points[6..10]
        .iter()
        .map(|p| p.p99_us)
        .fold(f64::INFINITY, f64::min);
    assert!(recovered < 100_000.0, "{ts:?}");
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["time_series"]["points"][0]["start_ms"], 0.0);
}

/// The default source ports spread over 16 SO_REUSEPORT shards: one thread sends from at
/// least 128 distinct ports (seen by the target, not just counted by loadgen), and the
/// arithmetic behind the default holds (every one of 16 shards gets a port with high
/// probability).
#[test]
fn the_default_source_ports_reach_sixteen_shards() {
    use dynauth_loadgen::cli::{DEFAULT_SOURCE_PORTS_TOTAL, source_ports_per_thread};
    // P(each of 16 shards gets at least one of n ports), by inclusion-exclusion.
    let all_shards = |n: usize| -> f64 {
        (0..=16u32)
            .map(|j| {
                let c = (0..j).fold(1.0, |c, i| c * f64::from(16 - i) / f64::from(i + 1));
                let sign = if j % 2 == 0 { 1.0 } else { -1.0 };
                sign * c * (1.0 - f64::from(j) / 16.0).powi(n as i32)
            })
            .sum()
    };
    assert!(all_shards(DEFAULT_SOURCE_PORTS_TOTAL) > 0.99);
    assert!(all_shards(16) < 0.01, "the old default of 16");
    for threads in 1..=32 {
        assert!(source_ports_per_thread(None, threads) * threads >= DEFAULT_SOURCE_PORTS_TOTAL);
    }
    assert_eq!(source_ports_per_thread(Some(3), 1), 3);

    // A probe socket as the target: it answers nothing and records who sent.
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    probe
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let target = probe.local_addr().unwrap();
    let ports = std::thread::spawn(move || {
        let mut ports = HashSet::new();
        let mut buf = [0u8; 4096];
        while let Ok((_, from)) = probe.recv_from(&mut buf) {
            ports.insert(from.port());
        }
        ports
    });
    // --batch 1: each request moves to the next socket, so 512 requests visit every one.
    let report = run(&args(
        target,
        &[
            "--synthetic",
            "100",
            "--rate",
            "20000",
            "--requests",
            "512",
            "--batch",
            "1",
            "--timeout",
            "50ms",
        ],
    ))
    .unwrap();
    assert_eq!(report.threads, 1);
    assert!(report.sockets >= 64, "{}", report.text());
    assert_eq!(report.sockets, DEFAULT_SOURCE_PORTS_TOTAL);
    let ports = ports.join().unwrap();
    assert_eq!(ports.len(), report.sockets, "distinct source ports seen");
}
