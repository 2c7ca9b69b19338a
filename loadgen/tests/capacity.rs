//! The SLO capacity search against loopback servers with a known capacity: one that answers
//! at most a fixed rate and drops the rest (the answer must lie near that rate), and one
//! that answers everything a fixed delay late (every step fails a tighter p99 target and
//! passes a looser one). Bounded: a few short steps each, only to 127.0.0.1.
#![forbid(unsafe_code)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{SECRET_ENV, args, delayed_engine_target, engine_target, loadgen_binary, rate_limit};
use dynauth_loadgen::capacity::{self, Outcome};

/// A DAS that answers at most 2000 requests/s (token bucket of 200) and drops the rest. Steps
/// of 500 ms from 500/s, loss bound 1%: 500, 1000, 2000 pass; 4000 loses about half and
/// fails (twice: a failure is confirmed); the bisection ends between about 2250 and 2420/s (the bucket's burst lets a step
/// carry 200 answers above the rate). The assertion leaves room for noise on either side
/// but not for a search that does not search: the answer lies in [1500, 3000).
#[test]
fn capacity_lies_near_the_rate_above_which_the_server_drops() {
    const RATE: f64 = 2000.0;
    let target = engine_target(1000, rate_limit(RATE, 200.0));
    let mut printed = Vec::new();
    let report = capacity::run(
        &args(
            target.addr,
            &[
                "--synthetic",
                "1000",
                "--mix",
                "coa=1",
                "--slo-p99",
                "150ms",
                "--slo-loss",
                "1%",
                "--timeout",
                "200ms",
                "--duration",
                "500ms",
                "--capacity-min",
                "500",
                "--capacity-max",
                "16000",
                "--capacity-precision",
                "10%",
                "--capacity-steps",
                "16",
            ],
        ),
        |n, step| printed.push(step.line(n)),
    )
    .unwrap();
    let text = report.text();
    assert_eq!(report.outcome, Outcome::Found, "{text}");
    let c = report.capacity_rps.unwrap();
    let f = report.first_failing_rps.unwrap();
    assert!((1500.0..3000.0).contains(&c), "{text}");
    assert!(c < f && f <= 1.1 * c + 1e-9, "{text}");
    // At most 16 steps: the doubling, the bisection, and a second run of each failing rate.
    assert!(report.steps.len() <= 16);
    assert_eq!(printed.len(), report.steps.len(), "every step printed");
    // The first steps are the doubling from the minimum.
    let rates: Vec<f64> = report.steps.iter().map(|s| s.offered_rps).collect();
    assert_eq!(&rates[..2], &[500.0, 1000.0], "{text}");
    // Verdicts agree with the figures: a pass is under both bounds, a fail over one.
    for s in &report.steps {
        let under = s.p99_us < 150_000.0 && (s.loss_ratio == 0.0 || s.loss_ratio < 0.01);
        assert_eq!(s.pass, under, "{}", s.line(0));
    }
    // Far above the rate, about half is lost.
    let worst = report
        .steps
        .iter()
        .map(|s| s.loss_ratio)
        .fold(0.0, f64::max);
    assert!(worst > 0.05, "{text}");
    // The run at the answer is in the report and is the passing step's.
    let at = report.at_capacity.as_ref().unwrap();
    assert_eq!(at.offered_rate_rps, Some(c));
    assert!(at.latency.p99_us < 150_000.0);
    assert!(text.contains("PASS") && text.contains("FAIL") && text.contains("capacity: "));
}

/// Every answer leaves 30 ms late: with a 20 ms p99 target the first step fails (no
/// capacity, and the binary exits non-zero); with 100 ms every step passes up to the
/// maximum. Through the binary: the JSON report carries the steps and the answer first.
#[test]
fn a_fixed_delay_fails_a_tighter_target_and_passes_a_looser_one() {
    let (addr, _seen, stop, handle) =
        delayed_engine_target(1000, |_| Duration::from_millis(30), Duration::from_secs(1));
    let common = |slo: &str| {
        [
            "--target",
            &addr.to_string(),
            "--bind",
            "127.0.0.1",
            "--secret-env",
            SECRET_ENV,
            "--synthetic",
            "1000",
            "--mix",
            "coa=1",
            "--slo-p99",
            slo,
            "--timeout",
            "500ms",
            "--duration",
            "300ms",
            "--capacity-min",
            "200",
            "--capacity-max",
            "800",
            "--json",
            "--quiet",
        ]
        .map(String::from)
    };
    let out = loadgen_binary(&common("20ms"));
    assert!(!out.status.success(), "no rate met the target");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json["capacity_rps"].is_null(), "{json}");
    assert_eq!(json["outcome"], "below-minimum");
    // The failure and its confirmation at the same rate.
    assert_eq!(json["steps"].as_array().unwrap().len(), 2);
    assert_eq!(
        json["steps"][0]["offered_rps"],
        json["steps"][1]["offered_rps"]
    );
    let step = &json["steps"][0];
    assert_eq!(step["pass"], false);
    assert!(step["p99_us"].as_f64().unwrap() >= 30_000.0, "{step}");
    assert!(step["p99_us"].as_f64().unwrap() < 500_000.0, "{step}");

    let out = loadgen_binary(&common("100ms"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.trim_start()
            .starts_with("{\n  \"capacity_rps\": 800.0"),
        "the answer first: {text}"
    );
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["outcome"], "at-maximum");
    let rates: Vec<f64> = json["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["offered_rps"].as_f64().unwrap())
        .collect();
    assert_eq!(rates, [200.0, 400.0, 800.0]);
    assert!(
        json["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["pass"] == true)
    );
    assert_eq!(json["at_capacity"]["offered_rate_rps"], 800.0);
    stop.store(true, Ordering::Relaxed);
    handle.join().unwrap();
}

/// Flags a search cannot honour are refused before anything is sent.
#[test]
fn impossible_searches_are_refused() {
    let nobody = "127.0.0.1:9".parse().unwrap();
    for extra in [
        &["--capacity", "--rate", "100"][..],
        &["--capacity", "--window", "8"],
        &["--capacity", "--requests", "8"],
        &[
            "--capacity",
            "--profile",
            "mass-disconnect",
            "--synthetic",
            "10",
        ],
        &["--slo-p99", "2s", "--timeout", "1s"],
        &[
            "--capacity",
            "--capacity-min",
            "100",
            "--capacity-max",
            "50",
        ],
        &["--capacity", "--capacity-steps", "0"],
    ] {
        let err = capacity::run(&args(nobody, extra), |_, _| panic!("sent")).unwrap_err();
        assert!(
            matches!(err, dynauth_loadgen::RunError::Invalid(_)),
            "{extra:?}: {err}"
        );
    }
}
