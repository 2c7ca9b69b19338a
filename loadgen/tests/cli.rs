//! The `loadgen` binary itself: the `echo-server` subcommand, and a bounded `--json` run
//! against it whose output parses and adds up.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn binary_echo_server_and_json_report() {
    let exe = env!("CARGO_BIN_EXE_loadgen");
    let mut server = Command::new(exe)
        .args(["echo-server", "--listen", "127.0.0.1:0", "--duration", "20"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(server.stderr.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let addr = first
        .split_whitespace()
        .find(|w| w.starts_with("127.0.0.1:"))
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .to_string();
    let out = Command::new(exe)
        .args([
            "--target",
            &addr,
            "--expect",
            "echo",
            "--requests",
            "1000",
            "--window",
            "16",
            "--json",
        ])
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["requests"], 1000);
    assert_eq!(json["answers"]["echo_ok"], 1000);
    assert_eq!(json["counts_add_up"], true);
    assert_eq!(json["mode"], "closed-loop");
    for key in ["p50_us", "p90_us", "p99_us", "p999_us", "max_us"] {
        assert!(json["latency"][key].as_f64().unwrap() > 0.0, "{key}");
    }
    assert!(json["generator"]["cpu_ns_per_request"].as_f64().unwrap() > 0.0);

    // The sessions subcommand writes JSON Lines that parse as sessions.
    let out = Command::new(exe)
        .args(["sessions", "--count", "3", "--seed", "5"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3);
    let first: dynauth_proto::session::Session = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(first, dynauth_proto::synth::session(5, 0));

    // A bad flag is refused with a usage error, not a panic.
    let bad = Command::new(exe)
        .args(["--rate", "1", "--window", "2"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}
