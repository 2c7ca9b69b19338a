//! The generator tells the truth when the server does not behave: late answers that arrive
//! after their Identifier was reused are recognised as late (by their Response
//! Authenticator), not pinned as a bad authenticator on the request now holding the
//! Identifier; lost answers and requests never sent stay in the percentiles as timeouts, with
//! their share beside them; nothing answered is a failure of the process.
#![forbid(unsafe_code)]

mod common;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{SECRET, SECRET_ENV, args, delayed_engine_target, engine_target};
use dynauth_loadgen::run;

fn assert_adds_up(r: &dynauth_loadgen::Report) {
    assert!(r.counts_add_up, "{}", r.text());
    assert_eq!(
        r.requests,
        r.answered + r.timeouts + r.expected_discards,
        "{}",
        r.text()
    );
}

/// Late answers that arrive on a source socket with nothing outstanding any more are still
/// read and counted as late: the worker waits in ppoll on the sockets with requests out only,
/// but on every socket every 64th wait, so an idle one is not forgotten. 256 sockets and
/// --batch 1 for 200 requests: each request has a socket of its own, never reused, so a late
/// answer can only be read by such a wait (without them: none is).
#[test]
fn late_answers_on_idle_sockets_are_still_counted() {
    let (addr, _seen, stop, handle) = delayed_engine_target(
        1000,
        |n| {
            if n % 2 == 1 {
                Duration::from_millis(40)
            } else {
                Duration::ZERO
            }
        },
        Duration::from_millis(20),
    );
    let report = run(&args(
        addr,
        &[
            "--synthetic",
            "1000",
            "--mix",
            "coa=1",
            "--rate",
            "1000",
            "--requests",
            "200",
            "--sockets",
            "256",
            "--batch",
            "1",
            "--timeout",
            "20ms",
        ],
    ))
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    handle.join().unwrap();
    assert_adds_up(&report);
    assert_eq!(report.sockets, 256);
    assert_eq!(report.answered, 100, "{}", report.text());
    assert_eq!(report.timeouts, 100, "{}", report.text());
    let a = &report.answers;
    // Those of the last few tens of ms arrive after the run ends: not all are read.
    assert!(a.late >= 30, "{}", report.text());
    assert_eq!(
        a.stray + a.bad_response_authenticators,
        0,
        "{}",
        report.text()
    );
}

/// Every odd request is answered 100 to 300 ms late, after its 60 ms timeout; one source socket, so
/// at 2000/s its 256 Identifiers come round again every ~130 ms and late answers arrive
/// while a newer request holds their Identifier (the server counts those moments). Each late
/// answer must be counted as late, never as a bad authenticator, and must not resolve the
/// newer request: every even request is answered, every odd one times out.
#[test]
fn late_answers_after_identifier_reuse_are_late_not_bad() {
    let timeout = Duration::from_millis(60);
    let (addr, seen, stop, handle) = delayed_engine_target(
        1000,
        |n| {
            if n % 2 == 1 {
                // 100 to 299 ms: some land while the Identifier's next request is out.
                Duration::from_millis(100 + (n * 37) % 200)
            } else {
                Duration::ZERO
            }
        },
        timeout,
    );
    let report = run(&args(
        addr,
        &[
            "--synthetic",
            "1000",
            "--mix",
            "coa=1",
            "--rate",
            "2000",
            "--requests",
            "1200",
            "--sockets",
            "1",
            "--timeout",
            "60ms",
        ],
    ))
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    handle.join().unwrap();
    assert_adds_up(&report);
    let a = &report.answers;
    let landed = seen.landed_on_reused_id.load(Ordering::Relaxed);
    assert!(
        landed >= 20,
        "the scenario must make late answers meet reused Identifiers ({landed})"
    );
    assert_eq!(a.bad_response_authenticators, 0, "{}", report.text());
    assert_eq!(a.bad_message_authenticators, 0, "{}", report.text());
    assert_eq!(report.requests, 1200);
    assert_eq!(report.answered, 600, "{}", report.text());
    assert_eq!(report.timeouts, 600, "{}", report.text());
    assert_eq!(report.counters.acks, [0, 600]);
    // Late answers to requests that timed out within the run (the last ones arrive after
    // the final drain) are counted as late, and at least those that met a reused Identifier.
    assert!(a.late >= landed, "{} < {landed}: {}", a.late, report.text());
    assert!(a.late >= 400, "{}", report.text());
    assert_eq!(a.stray + a.duplicates + a.malformed, 0, "{}", report.text());
    // Every request has its sample: the timed-out half sits at or above the timeout.
    assert_eq!(report.latency.count, 1200);
    assert_eq!(report.latency.timeouts, 600);
    assert!(report.latency.p90_us >= 60_000.0, "{}", report.text());
    assert!(
        report.answered_latency.p99_us < 60_000.0,
        "{}",
        report.text()
    );
}

/// A server that drops 5% of the answers: the percentiles are over all 400 requests, the 20
/// timeouts at (at least) the timeout, so p99 is a timeout, not the 99th percentile of the
/// lucky ones; the share of timeouts is printed beside them, in text and JSON.
#[test]
fn dropped_answers_stay_in_the_percentiles_as_timeouts() {
    let mut n = 0u64;
    let hook = Box::new(move |_: &[u8], _: &mut Vec<u8>| {
        n += 1;
        !n.is_multiple_of(20)
    });
    let target = engine_target(1000, hook);
    let report = run(&args(
        target.addr,
        &[
            "--synthetic",
            "1000",
            "--mix",
            "coa=1",
            "--rate",
            "2000",
            "--requests",
            "400",
            "--timeout",
            "150ms",
        ],
    ))
    .unwrap();
    assert_adds_up(&report);
    assert_eq!(report.timeouts, 20, "{}", report.text());
    assert_eq!(report.answered, 380, "{}", report.text());
    let l = &report.latency;
    assert_eq!(l.count, 400, "timeouts are samples: {}", report.text());
    assert_eq!(l.timeouts, 20);
    assert!((l.timeout_share - 0.05).abs() < 1e-9, "{}", report.text());
    assert_eq!(l.timeout_us, 150_000.0);
    assert!(l.p99_us >= 150_000.0, "{}", report.text());
    assert!(l.max_us >= 150_000.0, "{}", report.text());
    assert!(l.p50_us < 150_000.0, "{}", report.text());
    // The answered-only view is still there for telling server time from loss.
    assert_eq!(report.answered_latency.count, 380);
    assert!(report.answered_latency.p99_us < 150_000.0);
    let text = report.text();
    assert!(text.contains("5.00% timeouts"), "{text}");
    assert!(
        text.contains("p99 ") && text.contains("(timeout)"),
        "{text}"
    );
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["latency"]["count"], 400);
    assert_eq!(json["latency"]["timeouts"], 20);
    assert!((json["latency"]["timeout_share"].as_f64().unwrap() - 0.05).abs() < 1e-9);
    assert!(json["latency"]["p99_us"].as_f64().unwrap() >= 150_000.0);
    assert_eq!(json["answered_latency"]["count"], 380);
}

/// Nobody answers and at most one request may be outstanding: at 1000/s for 300 ms with a
/// 100 ms timeout the generator falls behind; requests whose deadline (100 ms after their
/// intended send time) passed before they could leave are not sent, and those left at the
/// end are not either. Every one of the 300 intended requests is a sample at or above the
/// timeout, so the median is the timeout, not an empty histogram.
#[test]
fn unsent_requests_are_samples_too() {
    let nobody = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let started = Instant::now();
    let report = run(&args(
        nobody,
        &[
            "--synthetic",
            "10",
            "--mix",
            "coa=1",
            "--rate",
            "1000",
            "--duration",
            "300ms",
            "--max-outstanding",
            "1",
            "--timeout",
            "100ms",
        ],
    ))
    .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_adds_up(&report);
    assert_eq!(report.answered, 0);
    assert_eq!(report.requests + report.unsent, 300, "{}", report.text());
    // How many stay unsent depends on the scheduler's wake-ups (about 50 here: the requests
    // due at the end that the 50 ms grace after --duration could not send); what matters
    // is that there are some and that each is a sample below.
    assert!(report.unsent >= 10, "{}", report.text());
    let l = &report.latency;
    assert_eq!(
        l.count,
        report.requests + report.unsent,
        "{}",
        report.text()
    );
    assert_eq!(l.timeouts, l.count);
    assert!((l.timeout_share - 1.0).abs() < 1e-9);
    // (HdrHistogram reports the low end of the bucket: 3 significant figures.)
    assert!(l.min_us >= 99_900.0, "{}", report.text());
    assert!(l.p50_us >= 100_000.0, "{}", report.text());
    assert!(report.nothing_answered());
}

/// The binary: the secret from an environment variable or a file (never from the command
/// line); nothing answered exits non-zero, still printing its JSON report; a missing secret
/// source is an error that does not show the secret.
#[test]
fn binary_secret_sources_and_exit_status() {
    let exe = env!("CARGO_BIN_EXE_loadgen");
    let target = engine_target(100, common::untouched());
    let base = [
        "--target",
        &target.addr.to_string(),
        "--bind",
        "127.0.0.1",
        "--synthetic",
        "100",
        "--mix",
        "coa=1",
        "--requests",
        "50",
        "--window",
        "8",
        "--timeout",
        "500ms",
        "--json",
        "--quiet",
    ]
    .map(String::from);
    let out =
        common::loadgen_binary(&[&base[..], &["--secret-env".into(), SECRET_ENV.into()]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["answered"], 50);

    let dir = std::env::temp_dir().join(format!("loadgen-truth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("secret");
    std::fs::write(&file, format!("{SECRET}\n")).unwrap();
    let out = Command::new(exe)
        .args(&base)
        .arg("--secret-file")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["answered"], 50);

    // The wrong secret: the DAS discards everything, nothing is answered: exit non-zero,
    // with the JSON report on stdout all the same.
    std::fs::write(&file, "not-the-secret\n").unwrap();
    let out = Command::new(exe)
        .args(&base)
        .arg("--secret-file")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nothing was answered"), "{stderr}");
    assert!(!stderr.contains("not-the-secret"), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["answered"], 0);
    assert_eq!(json["timeouts"], 50);

    // A missing variable: refused before anything is sent.
    let out = Command::new(exe)
        .args(&base)
        .args(["--secret-env", "LOADGEN_TEST_NO_SUCH_VARIABLE"])
        .env_remove("LOADGEN_TEST_NO_SUCH_VARIABLE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("LOADGEN_TEST_NO_SUCH_VARIABLE"), "{stderr}");
    assert_eq!(target.stop().received.load(Ordering::Relaxed), 150);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A deliberately impossible offered rate (50 million/s for 200 ms against the echo server):
/// the generator cannot offer it, says so (`generator_bound`, with the reason and its own
/// estimated capacity), and a capacity search that starts there stops at once with outcome
/// `generator-bound`, not with a server figure.
#[test]
fn an_impossible_offered_rate_is_flagged_as_generator_bound() {
    let server = dynauth_loadgen::echo::EchoServer::loopback().unwrap();
    let flags = [
        "--expect",
        "echo",
        "--duration",
        "200ms",
        "--timeout",
        "100ms",
        "--source-ports",
        "64",
    ];
    let report = run(&args(
        server.local_addr(),
        &[&flags[..], &["--rate", "50000000"]].concat(),
    ))
    .unwrap();
    assert_adds_up(&report);
    assert!(report.generator_bound, "{}", report.text());
    assert!(
        report
            .generator_bound_reasons
            .iter()
            .any(|r| r.contains("offered rate not achieved")),
        "{:?}",
        report.generator_bound_reasons
    );
    assert!(report.unsent > report.requests, "{}", report.text());
    assert!(report.sent_rate_rps < 5e6, "{}", report.text());
    assert!(report.generator.capacity_rps > 0.0);
    assert!(
        report.text().contains("GENERATOR-BOUND"),
        "{}",
        report.text()
    );
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["generator_bound"], true);

    let search = dynauth_loadgen::capacity::run(
        &args(
            server.local_addr(),
            &[
                &flags[..],
                &[
                    "--slo-p99",
                    "50ms",
                    "--capacity-min",
                    "50000000",
                    "--capacity-max",
                    "100000000",
                ],
            ]
            .concat(),
        ),
        |_, _| {},
    )
    .unwrap();
    assert_eq!(
        search.outcome,
        dynauth_loadgen::capacity::Outcome::GeneratorBound,
        "{}",
        search.text()
    );
    assert_eq!(search.steps.len(), 1);
    assert!(search.steps[0].generator_bound && !search.steps[0].pass);
    assert_eq!(search.capacity_rps, None);
    assert_eq!(search.first_failing_rps, None, "not the server's failure");
    server.stop().unwrap();
}
