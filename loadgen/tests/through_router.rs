//! The bundled loadgen as the DAC of the routing tier (docs/SCALE_OUT.md): a real redis-server,
//! a real dynauthd owner that publishes its sessions there, a real dynauthd router; every
//! answer verified by loadgen with the DAC's secret, counts exact (RFC 5176 §3.1 proxying,
//! §3.5 502 for a session nobody owns).
//!
//! `dynauthd` is another package's binary: `cargo test --workspace` builds it into the same
//! target folder as this test.

mod dynauthd;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dynauthd::Killed;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "--raw"])
        .args(args)
        .output()
        .expect("redis-cli not found: apt-get install redis-server (.ci/run installs it)");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn run(loadgen: &str, router: &str, sessions: &PathBuf, mix: &str) -> serde_json::Value {
    let out = Command::new(loadgen)
        .args(["--target", router, "--secret", "dac-secret", "--sessions"])
        .arg(sessions)
        .args([
            "--mix",
            mix,
            "--message-authenticator",
            "--requests",
            "1000",
            "--window",
            "32",
            "--timeout",
            "2000",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn loadgen_through_a_router_every_answer_verified() {
    let loadgen = env!("CARGO_BIN_EXE_loadgen");
    let dir = std::env::temp_dir().join(format!("loadgen-router-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sessions = dir.join("sessions.jsonl");
    let status = Command::new(loadgen)
        .args(["sessions", "--count", "1500", "--seed", "5", "--out"])
        .arg(&sessions)
        .status()
        .unwrap();
    assert!(status.success());
    let secret_file = dir.join("owner.secret");
    std::fs::write(&secret_file, "owner-secret\n").unwrap();

    let rport = free_port();
    let _redis = Killed(
        Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &rport.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server not found: apt-get install redis-server (.ci/run installs it)"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis_cli(rport, &["PING"]) != "PONG" {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("redis://127.0.0.1:{rport}");
    let (_owner, owner_addr) = dynauthd::start(&[
        "--listen",
        "127.0.0.1:0",
        "--client",
        "127.0.0.1/32=owner-secret",
        "--sessions",
        sessions.to_str().unwrap(),
        "--shards",
        "1",
        "--affinity-redis",
        &url,
        "--owner-id",
        "lg-owner",
    ]);
    // Published: the owner's address, and the Acct-Session-Id of every session (the key
    // loadgen identifies sessions by).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let owner = redis_cli(rport, &["GET", "dynauth:owner:{lg-owner}"]);
        let keys: usize = redis_cli(
            rport,
            &[
                "EVAL",
                "return #redis.call('KEYS', 'dynauth:{k:acct_session_id=*')",
                "0",
            ],
        )
        .parse()
        .unwrap_or(0);
        if owner == owner_addr && keys == 1500 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "owner {owner:?}, {keys} of 1500 sessions published"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_router, router_addr) = dynauthd::start(&[
        "--role",
        "router",
        "--listen",
        "127.0.0.1:0",
        "--client",
        "127.0.0.1/32=dac-secret",
        "--affinity-redis",
        &url,
        "--owner-secret-file",
        secret_file.to_str().unwrap(),
        "--forward-bind",
        "127.0.0.1:0",
        "--shards",
        "1",
    ]);

    let json = run(
        loadgen,
        &router_addr,
        &sessions,
        "disconnect=2,coa=7,bad-auth=1",
    );
    let a = &json["answers"];
    assert_eq!(json["counts_add_up"], true, "{json}");
    assert_eq!(json["timeouts"], 0, "{json}");
    assert_eq!(
        json["expected_discards"], 100,
        "bad-auth: the router answers nothing"
    );
    assert_eq!(a["bad_response_authenticators"], 0, "{json}");
    assert_eq!(a["bad_message_authenticators"], 0, "{json}");
    assert_eq!(a["expectation_mismatches"], 0, "{json}");
    assert_eq!(a["ack_disconnect"], 200, "{json}");
    assert_eq!(a["ack_coa"], 700, "{json}");

    // Sessions nobody owns: the router's own NAK 502 (loadgen expects a DAS's 503, so these
    // count as expectation mismatches, and are checked by cause).
    let json = run(loadgen, &router_addr, &sessions, "unknown=1");
    assert_eq!(json["timeouts"], 0, "{json}");
    assert_eq!(json["answers"]["nak_by_error_cause"]["502"], 1000, "{json}");
    assert_eq!(json["answers"]["bad_response_authenticators"], 0);
    let _ = std::fs::remove_dir_all(&dir);
}
