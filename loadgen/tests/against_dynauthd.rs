//! loadgen against the real `dynauthd` on loopback (loadgen issue: "a short bounded run
//! against dynauthd"): every answer verified, counts add up (sent = answered + timed out +
//! expected discards), the mix's ACK/NAK split is what the server's session table implies.
//!
//! `dynauthd` is another package's binary: `cargo test --workspace` builds it (the engine's
//! own tests need it) into the same target folder as this test.

mod dynauthd;

use std::process::Command;

use dynauthd::start;

#[test]
fn bounded_run_against_dynauthd_verifies_every_answer() {
    let loadgen = env!("CARGO_BIN_EXE_loadgen");
    let dir = std::env::temp_dir().join(format!("loadgen-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sessions = dir.join("sessions.jsonl");
    let status = Command::new(loadgen)
        .args(["sessions", "--count", "2000", "--seed", "3", "--out"])
        .arg(&sessions)
        .status()
        .unwrap();
    assert!(status.success());

    for io in ["mmsg", "auto"] {
        let (_server, addr) = start(&[
            "--listen",
            "127.0.0.1:0",
            "--client",
            "127.0.0.1/32=e2e-secret",
            "--sessions",
            sessions.to_str().unwrap(),
            "--shards",
            "2",
            "--io",
            io,
        ]);
        let out = Command::new(loadgen)
            .args(["--target", &addr, "--secret", "e2e-secret", "--sessions"])
            .arg(&sessions)
            .args([
                "--mix",
                "disconnect=2,coa=5,unknown=2,bad-auth=1",
                "--message-authenticator",
                "--requests",
                "1000",
                "--window",
                "64",
                // Long enough for a loaded CI machine; the bad-authenticator share waits it out.
                "--timeout",
                "600",
                "--json",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let a = &json["answers"];
        assert_eq!(json["counts_add_up"], true, "{json}");
        assert_eq!(json["timeouts"], 0, "{io}: {json}");
        assert_eq!(json["expected_discards"], 100, "bad-auth share: no answers");
        assert_eq!(a["bad_response_authenticators"], 0);
        assert_eq!(a["bad_message_authenticators"], 0);
        assert_eq!(a["expectation_mismatches"], 0, "{json}");
        assert_eq!(a["ack_disconnect"], 200, "{json}");
        assert_eq!(a["ack_coa"], 500, "{json}");
        assert_eq!(a["nak_by_error_cause"]["503"], 200, "{json}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
