//! The control socket (docs/CONTROL.md) against the real dynauthd binary: an agent feeds
//! sessions over the Unix socket, then Disconnect-Requests on UDP find them (RFC 5176 §3:
//! identification by the keys the agent sent), and every refusal names its field and line
//! without closing the connection.

mod daemon;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use daemon::Agent;
use serde_json::{Value, json};

const SECRET: &str = "control-test-secret";

fn server(name: &str) -> (daemon::Daemon, PathBuf) {
    // These tests are about the feed: the table carries out Disconnects (the agent path,
    // ACK after commit, is tests/actions.rs).
    daemon::start_with_control(name, SECRET, &["--data-plane", "table"])
}

/// Disconnect-Request by Acct-Session-Id: (code, Error-Cause).
fn disconnect(d: &daemon::Daemon, id: u8, acct_session_id: &str) -> (u8, Option<u32>) {
    daemon::disconnect(d.addr(), SECRET, id, &[(44, acct_session_id.as_bytes())])
}

#[test]
fn socket_is_created_mode_0600_and_removed_at_stop() {
    let (d, path) = server("mode.sock");
    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    d.stop();
    assert!(!path.exists(), "the socket file is removed at shutdown");
}

#[test]
fn a_second_server_on_the_same_socket_is_refused_and_a_stale_one_is_replaced() {
    let (d, path) = server("inuse.sock");
    let second = daemon::start(&[
        "--listen",
        "127.0.0.1:0",
        "--client",
        "127.0.0.1/32=x",
        "--control",
        path.to_str().unwrap(),
    ]);
    match second {
        daemon::Started::Failed(err) => assert!(err.contains("already listening"), "{err}"),
        daemon::Started::Running(_) => panic!("a second dynauthd took over a live control socket"),
    }
    drop(d); // SIGKILL: the socket file stays behind, stale.
    assert!(path.exists());
    let (again, _) = server("inuse.sock");
    let mut agent = Agent::connect(&path);
    agent.ok(json!({"v": 1, "op": "sessions_count"}));
    again.stop();
}

#[test]
fn agent_upserts_then_disconnect_finds_the_session_rfc5176_s3() {
    let (d, path) = server("feed.sock");
    let mut agent = Agent::connect(&path);
    let hello = agent.ok(json!({"v": 1, "op": "hello", "agent": "bng-agent", "nas": ["bng1"]}));
    assert_eq!(hello["owns"], json!(["bng1"]));
    // Before the feed: nobody is known (NAK 503).
    assert_eq!(disconnect(&d, 1, "s-1"), (42, Some(503)));
    let r = agent.ok(json!({"v": 1, "op": "upsert", "nas": "bng1", "seq": 1,
        "session": {"acct_session_id": "s-1", "user_name": "alice", "framed_ip": "10.0.0.1"}}));
    assert_eq!(r["upserted"], json!("inserted"));
    let r = agent.ok(json!({"v": 1, "op": "sessions_get", "query": {"user_name": "alice"}}));
    assert_eq!(r["sessions"][0]["acct_session_id"], json!("s-1"));
    assert_eq!(r["sessions"][0]["nas"], json!("bng1"));
    assert_eq!(disconnect(&d, 2, "s-1"), (41, None), "Disconnect-ACK");
    let r = agent.ok(json!({"v": 1, "op": "sessions_count"}));
    assert_eq!(r["sessions"], json!(0));
    // An old sequence number changes nothing and says so.
    let r = agent.ok(json!({"v": 1, "op": "upsert", "nas": "bng1", "seq": 1,
        "session": {"acct_session_id": "s-1"}}));
    assert_eq!(r["stale"], json!(true));
    assert_eq!(
        agent.ok(json!({"v": 1, "op": "sessions_count"}))["sessions"],
        json!(0)
    );
    d.stop();
}

#[test]
fn bad_messages_name_the_field_and_line_and_keep_the_connection() {
    let (d, path) = server("errors.sock");
    let mut agent = Agent::connect(&path);
    let r = agent.send_line("{not json");
    assert_eq!(r["ok"], json!(false));
    assert_eq!(r["error"]["code"], json!("bad_json"));
    assert_eq!(r["error"]["line"], json!(1));
    let r = agent.send(json!({"op": "sessions_count"}));
    assert_eq!(r["error"]["field"], json!("v"));
    let r = agent.send(json!({"v": 2, "op": "sessions_count", "id": 7}));
    assert_eq!(r["error"]["code"], json!("unsupported_version"));
    assert_eq!(r["id"], json!(7), "the id is echoed");
    let r = agent.send(json!({"v": 1, "op": "upsert", "nas": "n",
        "session": {"acct_session_id": "a", "framed_ip": "not-an-ip"}}));
    assert_eq!(r["error"]["field"], json!("session.framed_ip"), "{r}");
    assert_eq!(r["error"]["line"], json!(4));
    let r = agent.send(json!({"v": 1, "op": "upsert", "nas": "n", "session": {"colour": "red"}}));
    assert_eq!(r["error"]["field"], json!("session.colour"), "{r}");
    let r = agent.send(json!({"v": 1, "op": "batch", "events": [
        {"op": "upsert", "nas": "n", "session": {"acct_session_id": "a"}},
        {"op": "upsert", "nas": "n", "seq": "x", "session": {"acct_session_id": "b"}}]}));
    assert_eq!(r["error"]["field"], json!("events[1].seq"), "{r}");
    let r = agent.send(json!({"v": 1, "op": "batch", "events": [
        {"op": "upsert", "nas": "n", "session": {"acct_session_id": "a"}},
        {"op": "upsert", "nas": "n", "session": {"acct_session_id": "b"}},
        {"op": "upsert", "nas": "n", "session": {"acct_session_id": "c", "framed_ip": "x"}}]}));
    assert_eq!(
        r["error"]["field"],
        json!("events[2].session.framed_ip"),
        "{r}"
    );
    let r = agent.send(json!({"v": 1, "op": "batch", "events": [
        {"op": "upsert", "session": {"acct_session_id": "a"}}]}));
    assert_eq!(r["error"]["field"], json!("events[0].nas"), "{r}");
    assert_eq!(
        agent.ok(json!({"v": 1, "op": "sessions_count"}))["sessions"],
        json!(0),
        "a refused batch applies nothing"
    );
    let r = agent.send(json!({"v": 1, "op": "frobnicate"}));
    assert_eq!(r["error"]["code"], json!("unknown_op"));
    // Still the same connection, still working.
    let r = agent.ok(json!({"v": 1, "op": "batch", "events": [
        {"op": "upsert", "nas": "n", "seq": 1, "session": {"acct_session_id": "a"}},
        {"op": "upsert", "nas": "n", "seq": 2, "session": {"acct_session_id": "b"}}]}));
    assert_eq!(r["applied"], json!(2));
    d.stop();
}

#[test]
fn nas_ownership_resync_and_reset() {
    let (d, path) = server("owners.sock");
    let mut a = Agent::connect(&path);
    let mut b = Agent::connect(&path);
    a.ok(json!({"v": 1, "op": "hello", "agent": "a", "nas": ["n1"]}));
    let r = b.send(json!({"v": 1, "op": "hello", "agent": "b", "nas": ["n1", "n2"]}));
    assert_eq!(r["error"]["code"], json!("nas_owned"), "{r}");
    b.ok(json!({"v": 1, "op": "hello", "agent": "b", "nas": ["n2"]}));
    let r =
        b.send(json!({"v": 1, "op": "upsert", "nas": "n1", "session": {"acct_session_id": "x"}}));
    assert_eq!(r["error"]["code"], json!("nas_owned"), "{r}");
    // The same Acct-Session-Id on two NASes: two sessions (NASes reuse them).
    for (agent, nas) in [(&mut a, "n1"), (&mut b, "n2")] {
        for id in ["1", "2", "3"] {
            agent.ok(
                json!({"v": 1, "op": "upsert", "nas": nas, "session": {"acct_session_id": id}}),
            );
        }
    }
    assert_eq!(
        a.ok(json!({"v": 1, "op": "sessions_count"}))["sessions"],
        json!(6)
    );
    // Resync of n1 re-sends only "2": 1 and 3 go, n2 is untouched.
    a.ok(json!({"v": 1, "op": "sync_begin", "nas": "n1"}));
    a.ok(json!({"v": 1, "op": "upsert", "nas": "n1", "session": {"acct_session_id": "2"}}));
    let r = a.ok(json!({"v": 1, "op": "sync_end", "nas": "n1"}));
    assert_eq!(r["removed"], json!(2));
    assert_eq!(
        a.ok(json!({"v": 1, "op": "sessions_count"}))["sessions"],
        json!(4)
    );
    let r = b.ok(json!({"v": 1, "op": "nas_reset", "nas": "n2"}));
    assert_eq!(r["removed"], json!(3));
    assert_eq!(
        a.ok(json!({"v": 1, "op": "sessions_count"}))["sessions"],
        json!(1)
    );
    // When b goes, n2 is free for another agent.
    drop(b);
    std::thread::sleep(Duration::from_millis(500));
    let mut c = Agent::connect(&path);
    c.ok(json!({"v": 1, "op": "hello", "agent": "c", "nas": ["n2"]}));
    let stats = c.ok(json!({"v": 1, "op": "stats"}));
    assert_eq!(stats["feed"]["swept"], json!(5), "{stats}");
    d.stop();
}

#[test]
fn operator_disconnect_is_audited() {
    let (d, path) = server("audit.sock");
    let mut op = Agent::connect(&path);
    op.ok(json!({"v": 1, "op": "upsert", "nas": "n", "session": {"acct_session_id": "z", "user_name": "zed"}}));
    let r = op.ok(json!({"v": 1, "op": "disconnect", "query": {"user_name": "zed"}}));
    assert_eq!(r["disconnected"], json!(1));
    let r = op.send(json!({"v": 1, "op": "disconnect", "query": {"user_name": "nobody"}}));
    assert_eq!(r["ok"], json!(false));
    let (_, stderr) = d.stop();
    assert!(
        stderr.contains("operator disconnect") && stderr.contains("zed"),
        "{stderr}"
    );
    assert!(!stderr.contains(SECRET), "secrets never reach a log line");
}

const CTL: &str = env!("CARGO_BIN_EXE_dynauthctl");

fn ctl(path: &Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(CTL)
        .arg("--control")
        .arg(path)
        .args(args)
        .output()
        .expect("run dynauthctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn dynauthctl_loads_finds_disconnects_and_reports() {
    let (d, path) = server("ctl.sock");
    let file = daemon::sessions_file("ctl.jsonl", 2500);
    let (ok, out, err) = ctl(
        &path,
        &["sessions", "add", file.to_str().unwrap(), "--nas", "bng9"],
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("2500 session(s) upserted"), "{out}");
    let (_, count, _) = ctl(&path, &["sessions", "count"]);
    assert_eq!(count.trim(), "2500");
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let id = first["acct_session_id"].as_str().unwrap().to_owned();
    let (ok, out, err) = ctl(
        &path,
        &["sessions", "get", &format!("acct_session_id={id}")],
    );
    assert!(ok, "{err}");
    let got: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(got["nas"], json!("bng9"));
    // Loading the same file again replaces, never duplicates.
    let (ok, _, err) = ctl(
        &path,
        &["sessions", "add", file.to_str().unwrap(), "--nas", "bng9"],
    );
    assert!(ok, "{err}");
    assert_eq!(ctl(&path, &["sessions", "count"]).1.trim(), "2500");
    let (ok, out, err) = ctl(&path, &["disconnect", &format!("acct_session_id={id}")]);
    assert!(ok, "{err}");
    assert!(out.contains("1 session(s) disconnected"), "{out}");
    assert_eq!(
        disconnect(&d, 9, &id),
        (41, Some(201)),
        "the tombstone answers a late retry"
    );
    let (ok, _, err) = ctl(&path, &["sessions", "remove", "--nas", "bng9", &id]);
    assert!(!ok && err.contains("no live session"), "{err}");
    let (ok, out, _) = ctl(&path, &["stats"]);
    assert!(ok);
    let stats: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["sessions"], json!(2499));
    assert_eq!(stats["feed"]["upserts"], json!(5000));
    let (ok, _, err) = ctl(&path, &["disconnect", "user_name"]);
    assert!(!ok && err.contains("KEY=VALUE"), "{err}");
    d.stop();
    let (ok, _, err) = ctl(&path, &["sessions", "count"]);
    assert!(!ok && err.contains("is dynauthd running"), "{err}");
}
