//! Operations, against the real dynauthd binary (docs/RUNNING.md): a reload without a restart
//! (SIGHUP, `dynauthctl reload`) with a secret rotation while traffic runs, a refused reload,
//! the JSON audit log, systemd's sd_notify messages, and the SIGTERM drain of a pending
//! action.

mod daemon;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use daemon::{check_answer, exchange, request, temp_path};
use dynauth_proto::auth::{self, Secret};
use dynauth_proto::codec::Packet;
use serde_json::{Value, json};

const CTL: &str = env!("CARGO_BIN_EXE_dynauthctl");

fn write_config(path: &Path, client: &str) {
    std::fs::write(
        path,
        format!("[[client]]\nnetwork = \"127.0.0.1/32\"\n{client}\n"),
    )
    .unwrap();
}

/// A Disconnect-Request for an unknown session signed with `secret`: answered NAK 503
/// when `secret` is live.
fn probe(id: u8, secret: &str) -> Vec<u8> {
    request(
        40,
        id,
        &[(44, b"no-such-session")],
        false,
        &Secret::new(secret).unwrap(),
    )
}

/// Which of `secrets` the answer verifies with.
fn verifying<'s>(answer: &[u8], req: &[u8], secrets: &[&'s str]) -> Option<&'s str> {
    let a = Packet::parse(answer).ok()?;
    let r = Packet::parse(req).ok()?;
    secrets.iter().copied().find(|s| {
        auth::verify_response(&a, r.authenticator(), &Secret::new(*s).unwrap())
            == auth::ResponseCheck::Valid
    })
}

/// Whether a request signed with `secret` is answered (with an answer signed with it).
fn answered_with(to: SocketAddr, secret: &str, id: u8) -> bool {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let req = probe(id, secret);
    match exchange(&sock, to, &req, Duration::from_millis(500)) {
        Some((answer, _)) => verifying(&answer, &req, &[secret]) == Some(secret),
        None => false,
    }
}

/// Polls until a request signed with `secret` is answered (a reload takes effect within a
/// batch of the signal being handled).
fn wait_answered(to: SocketAddr, secret: &str) -> bool {
    let until = Instant::now() + Duration::from_secs(5);
    let mut id = 200u8;
    while Instant::now() < until {
        if answered_with(to, secret, id) {
            return true;
        }
        id = id.wrapping_add(1);
    }
    false
}

fn ctl(control: &Path, args: &[&str]) -> std::process::Output {
    Command::new(CTL)
        .arg("--control")
        .arg(control)
        .args(args)
        .output()
        .expect("run dynauthctl")
}

fn reloads_metric(metrics: SocketAddr, result: &str) -> u64 {
    let body = daemon::scrape(metrics);
    let key = format!("dynauth_config_reloads_total{{result=\"{result}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(key.as_str()))
        .unwrap_or_else(|| panic!("no {key} in the metrics"))
        .trim()
        .parse()
        .unwrap()
}

// A secret rotation by SIGHUP while a DAC keeps sending: every request is answered, signed
// with the secret it was signed with (RFC 5176 §3.5, RFC 2865 §3); after the reload the new
// secret works and, with `previous_secret`, the old one too; without it, only the new one.
// A broken file is refused (SIGHUP and `dynauthctl reload`): logged, counted, and the old
// configuration keeps running.
#[test]
fn sighup_rotates_the_secret_under_traffic_and_refuses_a_broken_config() {
    let config = temp_path("reload.toml");
    let secret_file = temp_path("reload-new.secret");
    std::fs::write(&secret_file, "new-secret\n").unwrap();
    write_config(&config, "secret = \"old-secret\"");
    let control = temp_path("reload.sock");
    let _ = std::fs::remove_file(&control);
    let d = daemon::start_ok(&[
        "--config",
        config.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--io",
        "mmsg",
        "--shards",
        "1",
        "--metrics",
        "127.0.0.1:0",
        "--control",
        control.to_str().unwrap(),
        "--data-plane",
        "table",
    ]);
    let to = d.addr();
    let metrics = d.banner_addr("metrics");
    assert!(answered_with(to, "old-secret", 1));
    assert!(!answered_with(to, "new-secret", 2), "not live yet");

    // Traffic signed with the old secret, from another thread, across the reload.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            let (mut sent, mut unanswered, mut wrong) = (0u32, 0u32, 0u32);
            let mut id = 0u8;
            while !stop.load(Ordering::Relaxed) {
                id = id.wrapping_add(1);
                let req = probe(id, "old-secret");
                sent += 1;
                match exchange(&sock, to, &req, Duration::from_secs(2)) {
                    Some((answer, _)) => {
                        if verifying(&answer, &req, &["old-secret", "new-secret"]).is_none() {
                            wrong += 1;
                        }
                    }
                    None => unanswered += 1,
                }
            }
            (sent, unanswered, wrong)
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let file = secret_file.display();
    write_config(
        &config,
        &format!("secret_file = \"{file}\"\nprevious_secret = \"old-secret\""),
    );
    d.signal("-HUP");
    assert!(wait_answered(to, "new-secret"), "the new secret is live");
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let (sent, unanswered, wrong) = traffic.join().unwrap();
    assert!(sent > 10, "traffic ran ({sent} requests)");
    assert_eq!(unanswered, 0, "every request of {sent} answered");
    assert_eq!(wrong, 0, "every answer verifies");
    assert!(
        answered_with(to, "old-secret", 3),
        "previous_secret verifies"
    );
    assert_eq!(reloads_metric(metrics, "ok"), 1);

    // The rotation ends: only the new secret.
    write_config(&config, &format!("secret_file = \"{file}\""));
    let out = ctl(&control, &["reload"]);
    assert!(
        out.status.success(),
        "dynauthctl reload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration reloaded: 1 client"));
    assert!(
        !answered_with(to, "old-secret", 4),
        "the old secret is retired"
    );
    assert!(answered_with(to, "new-secret", 5));

    // A client without a secret: refused, with check-config's error; the old one runs on.
    write_config(&config, "name = \"broken\"");
    let check = Command::new(daemon::BIN)
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(2), "check-config: a config error");
    let check_error = String::from_utf8_lossy(&check.stderr)
        .trim()
        .trim_start_matches("dynauthd: error: ")
        .to_string();
    assert!(check_error.contains("has no secret"), "{check_error}");
    d.signal("-HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        answered_with(to, "new-secret", 6),
        "the old configuration runs on"
    );
    assert_eq!(reloads_metric(metrics, "rejected"), 1);
    let out = ctl(&control, &["reload"]);
    assert!(
        !out.status.success(),
        "dynauthctl reload reports the refusal"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&check_error),
        "{stderr} names {check_error}"
    );
    assert_eq!(reloads_metric(metrics, "rejected"), 2);
    assert!(answered_with(to, "new-secret", 7));
    let (_, log) = d.stop();
    assert!(
        log.contains("reload: the new configuration is refused, the old one keeps running")
            && log.contains("has no secret"),
        "{log}"
    );
    for secret in ["old-secret", "new-secret"] {
        assert!(!log.contains(secret), "the log shows no secret");
    }
}

// The audit log: one JSON line per decided request, naming its sessions and result (ACK,
// NAK 503), the DAC, the code and Identifier; an operator's disconnect too; never a secret.
#[test]
fn audit_log_lines_name_sessions_and_results_and_no_secret() {
    const SECRET: &str = "audit-test-secret";
    let log = temp_path("audit.jsonl");
    let _ = std::fs::remove_file(&log);
    let sessions = daemon::sessions_file("audit-sessions.jsonl", 3);
    let ids: Vec<String> = dynauth_proto::synth::sessions(9, 3)
        .map(|s| s.acct_session_id.unwrap())
        .collect();
    let (d, control) = daemon::start_with_control(
        "audit.sock",
        SECRET,
        &[
            "--data-plane",
            "table",
            "--sessions",
            sessions.to_str().unwrap(),
            "--audit-log",
            log.to_str().unwrap(),
        ],
    );
    let secret = Secret::new(SECRET).unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let dac = sock.local_addr().unwrap().to_string();
    let ack = request(40, 11, &[(44, ids[0].as_bytes())], true, &secret);
    let (answer, _) = exchange(&sock, d.addr(), &ack, Duration::from_secs(5)).unwrap();
    assert_eq!(check_answer(&answer, &ack, &secret).0, 41);
    let nak = request(40, 12, &[(44, b"gone-session")], true, &secret);
    let (answer, _) = exchange(&sock, d.addr(), &nak, Duration::from_secs(5)).unwrap();
    assert_eq!(check_answer(&answer, &nak, &secret).1, Some(503));
    // A retransmission is answered from the cache: not a new decision, no new line.
    let _ = exchange(&sock, d.addr(), &nak, Duration::from_secs(5)).unwrap();
    let mut op = daemon::Agent::connect(&control);
    op.ok(json!({"v": 1, "op": "disconnect", "query": {"acct_session_id": ids[1]}}));
    d.stop();
    let text = std::fs::read_to_string(&log).expect("the audit log");
    assert!(!text.contains(SECRET), "no secret in {text}");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?} is JSON: {e}")))
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    let time = lines[0]["time"].as_str().unwrap();
    assert!(
        time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
        "RFC 3339 UTC: {time}"
    );
    let (a, n, o) = (&lines[0], &lines[1], &lines[2]);
    assert_eq!(a["origin"], json!("radius"));
    assert_eq!(a["dac"], json!(dac));
    assert_eq!(a["request"], json!("Disconnect-Request"));
    assert_eq!(a["identifier"], json!(11));
    assert_eq!(a["sessions"][0]["acct_session_id"], json!(ids[0]));
    assert_eq!(a["result"], json!("ACK"));
    assert_eq!(a["changed"], json!(1));
    assert!(a.get("error_cause").is_none(), "{a}");
    assert_eq!(n["identifier"], json!(12));
    assert_eq!(n["sessions"][0]["acct_session_id"], json!("gone-session"));
    assert_eq!(n["result"], json!("NAK"));
    assert_eq!(n["error_cause"], json!(503));
    assert_eq!(o["origin"], json!("operator"));
    assert_eq!(o["sessions"][0]["acct_session_id"], json!(ids[1]));
    assert_eq!(o["result"], json!("ACK"));
    assert_eq!(o["changed"], json!(1));
}

// systemd Type=notify: READY=1 once the DAS answers (after the banner), WATCHDOG=1 at half
// of WATCHDOG_USEC, STOPPING=1 at shutdown, in that order.
#[test]
fn sd_notify_ready_watchdog_and_stopping() {
    let path = temp_path("notify.sock");
    let _ = std::fs::remove_file(&path);
    let notify = UnixDatagram::bind(&path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let started = daemon::start_env(
        &[
            "--listen",
            "127.0.0.1:0",
            "--client",
            "127.0.0.1/32=notify-secret",
            "--io",
            "mmsg",
            "--shards",
            "1",
        ],
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let d = match started {
        daemon::Started::Running(d) => d,
        daemon::Started::Failed(e) => panic!("dynauthd did not start: {e}"),
    };
    let mut buf = [0u8; 256];
    let mut next = || {
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next(), "READY=1", "the first notification");
    assert!(
        answered_with(d.addr(), "notify-secret", 1),
        "ready means answering"
    );
    assert_eq!(next(), "WATCHDOG=1", "a watchdog ping within 5 s");
    d.signal("-TERM");
    let mut last = String::new();
    while last != "STOPPING=1" {
        last = next();
        assert!(
            last == "WATCHDOG=1" || last == "STOPPING=1",
            "only pings before STOPPING=1: {last}"
        );
    }
    let (status, _, _) = d.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    let _ = std::fs::remove_file(&path);
}

/// A gateway agent on the control socket that takes actions for `nas`.
struct ActionAgent {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl ActionAgent {
    fn connect(path: &Path, nas: &str) -> ActionAgent {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut a = ActionAgent {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        };
        let hello = a.send(json!({"v": 1, "op": "hello", "agent": "bng-agent",
            "nas": [nas], "actions": true}));
        assert_eq!(hello["ok"], json!(true), "{hello}");
        a
    }

    fn send(&mut self, message: Value) -> Value {
        writeln!(self.writer, "{message}").unwrap();
        self.line()
    }

    fn line(&mut self) -> Value {
        let mut text = String::new();
        self.reader.read_line(&mut text).expect("a line");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }
}

// SIGTERM while a Disconnect waits for its agent: dynauthd stops reading, the agent's commit
// still reaches the DAC as a Disconnect-ACK, and then it exits 0.
#[test]
fn sigterm_drains_a_pending_action_then_exits_0() {
    const SECRET: &str = "drain-test-secret";
    let (d, path) = daemon::start_with_control("drain.sock", SECRET, &["--action-deadline", "5s"]);
    let mut agent = ActionAgent::connect(&path, "bng1");
    let up = agent.send(json!({"v": 1, "op": "upsert", "nas": "bng1", "seq": 1,
        "session": {"acct_session_id": "s-1"}}));
    assert_eq!(up["ok"], json!(true), "{up}");
    let secret = Secret::new(SECRET).unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let req = request(40, 9, &[(44, b"s-1")], false, &secret);
    sock.send_to(&req, d.addr()).unwrap();
    let action = agent.line();
    assert_eq!(action["type"], json!("action"), "{action}");
    d.signal("-TERM");
    // Shutting down: the agent answers a while later, as a slow data plane would.
    std::thread::sleep(Duration::from_millis(500));
    let result = json!({"v": 1, "op": "action_result", "action": action["action"],
        "results": [{"index": 0, "result": "committed"}]});
    writeln!(agent.writer, "{result}").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = sock
        .recv_from(&mut buf)
        .expect("the answer during the drain");
    let (code, cause, _) = check_answer(&buf[..n], &req, &secret);
    assert_eq!((code, cause), (41, None), "Disconnect-ACK after the commit");
    let (status, out, err) = d.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(out.contains("dynauthd totals:"), "{out}");
    assert!(err.contains("letting pending actions finish"), "{err}");
}
