//! Actions to the data plane, ACK only after commit (RFC 5176 §2.1, §3.5; docs/CONTROL.md,
//! "Actions"), against the real dynauthd binary: a test agent on the control socket owns a
//! NAS, receives each Disconnect or CoA as an `action` line, and commits, refuses, answers
//! late or disconnects; the DAC (this test, or FreeRADIUS's radclient) gets the answer the
//! agent's result gives, and only after it.

mod daemon;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::net::UdpSocket;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use daemon::{check_answer, request};
use dynauth_proto::auth::Secret;
use serde_json::{Value, json};

const SECRET: &str = "actions-test-secret";

/// A gateway agent: replies to its own requests, and the server's action lines.
struct Agent {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    actions: VecDeque<(Value, Instant)>,
}

impl Agent {
    fn connect(path: &Path, nas: &str) -> Agent {
        let stream = UnixStream::connect(path).expect("connect to the control socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut agent = Agent {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
            actions: VecDeque::new(),
        };
        let hello = agent.ok(json!({"v": 1, "op": "hello", "agent": "bng-agent",
            "nas": [nas], "actions": true}));
        assert_eq!(hello["actions"], json!(true));
        agent
    }

    fn line(&mut self) -> Option<Value> {
        let mut text = String::new();
        match self.reader.read_line(&mut text) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&text).expect("a JSON line")),
        }
    }

    /// Sends a message and returns its reply line; action lines read meanwhile are kept.
    fn reply(&mut self, message: &Value) -> Value {
        writeln!(self.writer, "{message}").unwrap();
        loop {
            let line = self.line().expect("a reply");
            if line["type"] != json!("action") {
                return line;
            }
            self.actions.push_back((line, Instant::now()));
        }
    }

    /// Sends a request that must succeed; returns its result.
    fn ok(&mut self, message: Value) -> Value {
        let line = self.reply(&message);
        assert_eq!(line["ok"], json!(true), "{message} -> {line}");
        line["result"].clone()
    }

    /// Sends a message that must be refused; returns the error.
    fn refused(&mut self, message: Value) -> Value {
        let line = self.reply(&message);
        assert_eq!(line["ok"], json!(false), "{message} -> {line}");
        line["error"].clone()
    }

    /// The next action, waiting at most `wait`.
    fn action(&mut self, wait: Duration) -> Option<Value> {
        if let Some((a, _)) = self.actions.pop_front() {
            return Some(a);
        }
        self.writer.set_read_timeout(Some(wait)).unwrap();
        let got = self.line();
        self.writer
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let a = got?;
        assert_eq!(a["type"], json!("action"), "{a}");
        Some(a)
    }

    fn upsert(&mut self, nas: &str, seq: u64, session: Value) {
        self.ok(json!({"v": 1, "op": "upsert", "nas": nas, "seq": seq, "session": session}));
    }

    /// Answers every session of `action` with `result` (and `error_cause`, when given). An
    /// accepted `action_result` gets no reply line (docs/CONTROL.md).
    fn answer(&mut self, action: &Value, result: &str, error_cause: Option<u32>) {
        let results: Vec<Value> = action["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let mut r = json!({"index": s["index"], "result": result});
                if let Some(c) = error_cause {
                    r["error_cause"] = json!(c);
                }
                r
            })
            .collect();
        let line = json!({"v": 1, "op": "action_result", "action": action["action"],
            "results": results});
        writeln!(self.writer, "{line}").unwrap();
    }

    fn count(&mut self) -> u64 {
        self.ok(json!({"v": 1, "op": "sessions_count"}))["sessions"]
            .as_u64()
            .unwrap()
    }
}

fn server(name: &str, extra: &[&str]) -> (daemon::Daemon, PathBuf) {
    daemon::start_with_control(name, SECRET, extra)
}

/// A DAC socket and a signed Disconnect-Request by Acct-Session-Id.
fn dac(id: u8, acct_session_id: &str) -> (UdpSocket, Vec<u8>) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let req = request(
        40,
        id,
        &[(44, acct_session_id.as_bytes())],
        false,
        &Secret::new(SECRET).unwrap(),
    );
    (sock, req)
}

fn send(sock: &UdpSocket, to: std::net::SocketAddr, req: &[u8]) {
    sock.send_to(req, to).unwrap();
}

/// The next answer on `sock` within `wait`, checked, with the time it arrived.
fn receive(
    sock: &UdpSocket,
    req: &[u8],
    wait: Duration,
) -> Option<(u8, Option<u32>, Vec<u8>, Instant)> {
    sock.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = sock.recv_from(&mut buf).ok()?;
    let at = Instant::now();
    let (code, cause, _) = check_answer(&buf[..n], req, &Secret::new(SECRET).unwrap());
    Some((code, cause, buf[..n].to_vec(), at))
}

// RFC 5176 §2.1: the ACK arrives only after the agent committed; retransmissions while the
// action is pending produce no second action and no early answer; once answered, a
// retransmission gets the same bytes.
#[test]
fn rfc5176_s2_1_ack_only_after_the_agent_commits_one_action_per_request() {
    let (d, path) = server("commit.sock", &[]);
    let mut agent = Agent::connect(&path, "bng1");
    agent.upsert(
        "bng1",
        1,
        json!({"acct_session_id": "s-1", "user_name": "alice"}),
    );
    let (sock, req) = dac(1, "s-1");
    send(&sock, d.addr(), &req);
    let action = agent.action(Duration::from_secs(5)).expect("an action");
    assert_eq!(action["kind"], json!("disconnect"));
    assert_eq!(
        action["sessions"][0]["session"]["acct_session_id"],
        json!("s-1")
    );
    assert_eq!(action["sessions"][0]["session"]["nas"], json!("bng1"));
    // Pending: no answer yet, and two retransmissions make no second action.
    assert!(
        receive(&sock, &req, Duration::from_millis(300)).is_none(),
        "no answer before the commit"
    );
    send(&sock, d.addr(), &req);
    send(&sock, d.addr(), &req);
    assert!(
        agent.action(Duration::from_millis(300)).is_none(),
        "one action per request"
    );
    assert_eq!(agent.count(), 1, "the table changes only at the commit");
    let committed_at = Instant::now();
    agent.answer(&action, "committed", None);
    let (code, cause, first, acked_at) =
        receive(&sock, &req, Duration::from_secs(5)).expect("the ACK");
    assert_eq!((code, cause), (41, None), "Disconnect-ACK");
    assert!(acked_at >= committed_at, "the ACK follows the commit");
    assert_eq!(agent.count(), 0, "removed once committed");
    // Answered: a retransmission gets the cached bytes; nothing reaches the agent again.
    send(&sock, d.addr(), &req);
    let (_, _, again, _) = receive(&sock, &req, Duration::from_secs(5)).expect("the cached ACK");
    assert_eq!(again, first, "byte for byte");
    assert!(agent.action(Duration::from_millis(200)).is_none());
    // A new Disconnect for the removed session: ACK with 201 from its tombstone, no action.
    let (sock2, req2) = dac(2, "s-1");
    send(&sock2, d.addr(), &req2);
    let (code, cause, _, _) = receive(&sock2, &req2, Duration::from_secs(5)).expect("an answer");
    assert_eq!((code, cause), (41, Some(201)));
    d.stop();
}

// RFC 5176 §3.5: a refused teardown is NAK 504 and the session stays; a session the data
// plane does not know is NAK 503 and leaves the table (it was stale); a CoA refused with the
// agent's Error-Cause carries that cause.
#[test]
fn rfc5176_s3_5_refusals_give_504_503_and_the_agents_cause() {
    let (d, path) = server("refuse.sock", &[]);
    let mut agent = Agent::connect(&path, "bng1");
    agent.upsert("bng1", 1, json!({"acct_session_id": "s-1"}));
    agent.upsert("bng1", 2, json!({"acct_session_id": "s-2"}));
    let (sock, req) = dac(1, "s-1");
    send(&sock, d.addr(), &req);
    let action = agent.action(Duration::from_secs(5)).unwrap();
    // A malformed result is refused with its field named (and the action still waits).
    let error = agent.refused(
        json!({"v": 1, "op": "action_result", "action": action["action"],
        "results": [{"index": 0, "result": "maybe"}]}),
    );
    assert_eq!(error["field"], json!("results[0].result"), "{error}");
    agent.answer(&action, "failed", None);
    let (code, cause, _, _) = receive(&sock, &req, Duration::from_secs(5)).unwrap();
    assert_eq!((code, cause), (42, Some(504)));
    assert_eq!(agent.count(), 2, "a refused Disconnect removes nothing");
    let (sock, req) = dac(2, "s-2");
    send(&sock, d.addr(), &req);
    let action = agent.action(Duration::from_secs(5)).unwrap();
    agent.answer(&action, "not_found", None);
    let (code, cause, _, _) = receive(&sock, &req, Duration::from_secs(5)).unwrap();
    assert_eq!((code, cause), (42, Some(503)));
    assert_eq!(agent.count(), 1, "the stale session is gone");
    // CoA with a Filter-Id, refused by the agent with 501 (Administratively Prohibited).
    let secret = Secret::new(SECRET).unwrap();
    let coa = request(43, 3, &[(44, b"s-1"), (11, b"gold")], false, &secret);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    send(&sock, d.addr(), &coa);
    let action = agent.action(Duration::from_secs(5)).unwrap();
    assert_eq!(action["kind"], json!("change"));
    assert_eq!(
        action["sessions"][0]["steps"],
        json!([{"op": "add", "attribute": "filter_ids", "value": "gold"}])
    );
    agent.answer(&action, "failed", Some(501));
    let (code, cause, _, _) = receive(&sock, &coa, Duration::from_secs(5)).unwrap();
    assert_eq!((code, cause), (45, Some(501)));
    // Committed: CoA-ACK, and the table has the new authorization.
    let coa = request(43, 4, &[(44, b"s-1"), (11, b"gold")], false, &secret);
    send(&sock, d.addr(), &coa);
    let action = agent.action(Duration::from_secs(5)).unwrap();
    agent.answer(&action, "committed", None);
    let (code, cause, _, _) = receive(&sock, &coa, Duration::from_secs(5)).unwrap();
    assert_eq!((code, cause), (44, None));
    let r = agent.ok(json!({"v": 1, "op": "sessions_get", "query": {"acct_session_id": "s-1"}}));
    assert_eq!(
        r["sessions"][0]["authorization"]["filter_ids"],
        json!(["gold"])
    );
    d.stop();
}

// RFC 5176 §3.5 (Resources Unavailable): no answer by the deadline, an agent that
// disconnects mid-action, or no agent for the NAS: NAK 506, and the session stays.
#[test]
fn rfc5176_s3_5_late_gone_or_missing_agent_gives_506() {
    let (d, path) = server(
        "late.sock",
        &["--action-deadline", "400ms", "--metrics", "127.0.0.1:0"],
    );
    let metrics = d.banner_addr("metrics");
    let mut agent = Agent::connect(&path, "bng1");
    agent.upsert("bng1", 1, json!({"acct_session_id": "s-1"}));
    // Late: the agent sits on the action past the deadline.
    let (sock, req) = dac(1, "s-1");
    let sent = Instant::now();
    send(&sock, d.addr(), &req);
    let action = agent.action(Duration::from_secs(5)).unwrap();
    let (code, cause, _, at) = receive(&sock, &req, Duration::from_secs(5)).expect("NAK 506");
    assert_eq!((code, cause), (42, Some(506)));
    assert!(
        at.duration_since(sent) >= Duration::from_millis(350),
        "not before the deadline"
    );
    // Its late commit changes nothing: the request was answered 506.
    agent.answer(&action, "committed", None);
    assert_eq!(agent.count(), 1);
    // Gone: the agent disconnects holding an action; 506 comes before the deadline.
    let (sock, req) = dac(2, "s-1");
    send(&sock, d.addr(), &req);
    let _held = agent.action(Duration::from_secs(5)).unwrap();
    let (mut dac_wait, dropped_at) = (Duration::from_secs(5), Instant::now());
    drop(agent);
    let (code, cause, _, at) = receive(&sock, &req, dac_wait).expect("NAK 506");
    assert_eq!((code, cause), (42, Some(506)));
    assert!(at.duration_since(dropped_at) < Duration::from_millis(390));
    // Missing: nobody owns the NAS now.
    dac_wait = Duration::from_secs(5);
    let (sock, req) = dac(3, "s-1");
    send(&sock, d.addr(), &req);
    let (code, cause, _, _) = receive(&sock, &req, dac_wait).expect("NAK 506");
    assert_eq!((code, cause), (42, Some(506)));
    let text = daemon::scrape(metrics);
    for (name, at_least) in [
        ("dynauth_actions_timed_out_total", 1),
        ("dynauth_actions_agent_gone_total", 1),
        ("dynauth_actions_no_agent_total", 1),
        ("dynauth_actions_unexpected_results_total", 1),
    ] {
        let v: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} in {text}"))
            .parse()
            .unwrap();
        assert!(v >= at_least, "{name} = {v}");
    }
    d.stop();
}

// FreeRADIUS's radclient as the DAC: Disconnect-ACK through a committing agent.
#[test]
fn radclient_disconnect_through_a_committing_agent() {
    if daemon::radclient().is_none() {
        panic!("radclient not found: apt-get install freeradius-utils (.ci/run installs it)");
    }
    let (d, path) = server("radclient.sock", &[]);
    let mut agent = Agent::connect(&path, "bng1");
    agent.upsert(
        "bng1",
        1,
        json!({"acct_session_id": "r-1", "user_name": "bob"}),
    );
    let addr = d.addr();
    let dac = std::thread::spawn(move || {
        daemon::run_radclient(addr, "disconnect", SECRET, "Acct-Session-Id = \"r-1\"\n")
    });
    let action = agent.action(Duration::from_secs(5)).expect("an action");
    agent.answer(&action, "committed", None);
    let out = dac.join().unwrap();
    assert!(out.contains("Disconnect-ACK"), "{out}");
    assert_eq!(agent.count(), 0);
    d.stop();
}

// Two requests for one session are serialized, never dropped: the second waits for the
// first's action, then is decided on the table as it is then (here: ACK 201, the session was
// just removed), without a second action.
#[test]
fn two_requests_for_one_session_are_serialized() {
    let (d, path) = server("serial.sock", &[]);
    let mut agent = Agent::connect(&path, "bng1");
    agent.upsert("bng1", 1, json!({"acct_session_id": "s-1"}));
    let (first, req1) = dac(1, "s-1");
    let (second, req2) = dac(2, "s-1");
    send(&first, d.addr(), &req1);
    let action = agent.action(Duration::from_secs(5)).expect("an action");
    send(&second, d.addr(), &req2);
    assert!(
        agent.action(Duration::from_millis(300)).is_none(),
        "the second waits"
    );
    assert!(receive(&second, &req2, Duration::from_millis(100)).is_none());
    agent.answer(&action, "committed", None);
    let (code, cause, _, _) = receive(&first, &req1, Duration::from_secs(5)).unwrap();
    assert_eq!((code, cause), (41, None));
    let (code, cause, _, _) = receive(&second, &req2, Duration::from_secs(5)).unwrap();
    assert_eq!(
        (code, cause),
        (41, Some(201)),
        "decided after the first, from the tombstone"
    );
    assert!(
        agent.action(Duration::from_millis(200)).is_none(),
        "no second action"
    );
    d.stop();
}

// An operator's Disconnect on the control socket (dynauthctl disconnect) goes through the
// owning agent like a RADIUS one: it is answered after the agent committed, the table
// follows, and a refusal is reported as not committed.
#[test]
fn operator_disconnect_goes_through_the_owning_agent() {
    let (d, path) = server("operator.sock", &[]);
    let mut agent = Agent::connect(&path, "bng1");
    agent.upsert("bng1", 1, json!({"acct_session_id": "s-1"}));
    agent.upsert("bng1", 2, json!({"acct_session_id": "s-2"}));
    let operator = |id: &'static str| {
        let path = path.clone();
        std::thread::spawn(move || {
            let mut s = UnixStream::connect(&path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let m = json!({"v": 1, "op": "disconnect", "query": {"acct_session_id": id}});
            writeln!(s, "{m}").unwrap();
            let mut reply = String::new();
            BufReader::new(s).read_line(&mut reply).unwrap();
            serde_json::from_str::<Value>(&reply).unwrap()
        })
    };
    let op = operator("s-1");
    let action = agent.action(Duration::from_secs(5)).expect("an action");
    assert_eq!(action["kind"], json!("disconnect"));
    assert_eq!(agent.count(), 2, "nothing removed before the commit");
    agent.answer(&action, "committed", None);
    let reply = op.join().unwrap();
    assert_eq!(reply["ok"], json!(true), "{reply}");
    assert_eq!(reply["result"]["disconnected"], json!(1), "{reply}");
    assert_eq!(agent.count(), 1);
    let op = operator("s-2");
    let action = agent.action(Duration::from_secs(5)).expect("an action");
    agent.answer(&action, "failed", None);
    let reply = op.join().unwrap();
    assert_eq!(reply["ok"], json!(false), "{reply}");
    assert_eq!(reply["error"]["code"], json!("not_committed"), "{reply}");
    assert_eq!(agent.count(), 1, "a refused teardown leaves the session");
    let (_, stderr) = d.stop();
    assert!(stderr.contains("operator disconnect"), "audited: {stderr}");
    assert!(!stderr.contains(SECRET));
}

/// Answers each listed index of `action` with its own result.
fn answer_each(agent: &mut Agent, action: &Value, results: &[(u64, &str)]) {
    let results: Vec<Value> = results
        .iter()
        .map(|(i, r)| json!({"index": i, "result": r}))
        .collect();
    let line = json!({"v": 1, "op": "action_result", "action": action["action"],
        "results": results});
    writeln!(agent.writer, "{line}").unwrap();
}

// RFC 5176 §3 (multi-session, all or none) when the data plane splits: a Disconnect of two
// sessions where one is torn down and one refused is NAK 504, and the table follows the data
// plane (the torn-down one is gone, the other stays); a CoA of two sessions where one
// commits and one fails is a NAK, the table is unchanged, and the committed one gets a
// compensating action with the steps back.
#[test]
fn rfc5176_s3_a_split_multi_session_result_is_a_nak_and_a_coa_is_undone() {
    let (d, path) = server("split.sock", &[]);
    let mut agent = Agent::connect(&path, "bng1");
    for (seq, id) in [(1, "a-1"), (2, "a-2")] {
        agent.upsert(
            "bng1",
            seq,
            json!({"acct_session_id": id, "user_name": "alice"}),
        );
    }
    for (seq, id) in [(3, "b-1"), (4, "b-2")] {
        agent.upsert(
            "bng1",
            seq,
            json!({"acct_session_id": id, "user_name": "bob"}),
        );
    }
    let secret = Secret::new(SECRET).unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    // Disconnect by User-Name: two sessions, one torn down, one refused.
    let dm = request(40, 1, &[(1, b"alice")], false, &secret);
    send(&sock, d.addr(), &dm);
    let action = agent.action(Duration::from_secs(5)).unwrap();
    assert_eq!(action["sessions"].as_array().unwrap().len(), 2);
    answer_each(&mut agent, &action, &[(0, "committed"), (1, "failed")]);
    let (code, cause, _, _) = receive(&sock, &dm, Duration::from_secs(5)).unwrap();
    assert_eq!((code, cause), (42, Some(504)));
    let left = agent.ok(json!({"v": 1, "op": "sessions_get", "query": {"user_name": "alice"}}));
    let left = left["sessions"].as_array().unwrap();
    assert_eq!(
        left.len(),
        1,
        "the torn-down session left the table: {left:?}"
    );
    assert_eq!(
        left[0]["acct_session_id"], action["sessions"][1]["session"]["acct_session_id"],
        "the refused one stays"
    );
    // CoA by User-Name: one commits, one fails; the committed one is undone.
    let coa = request(43, 2, &[(1, b"bob"), (11, b"gold")], false, &secret);
    send(&sock, d.addr(), &coa);
    let action = agent.action(Duration::from_secs(5)).unwrap();
    answer_each(&mut agent, &action, &[(0, "committed"), (1, "failed")]);
    let (code, cause, _, _) = receive(&sock, &coa, Duration::from_secs(5)).unwrap();
    assert_eq!(
        (code, cause),
        (45, Some(506)),
        "a failure without a cause: 506"
    );
    let undo = agent
        .action(Duration::from_secs(5))
        .expect("a compensating action");
    assert_eq!(undo["compensation"], json!(true), "{undo}");
    assert_eq!(undo["kind"], json!("change"));
    let sessions = undo["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "only the committed session: {undo}");
    assert_eq!(sessions[0]["index"], json!(0));
    assert_eq!(
        sessions[0]["steps"],
        json!([{"op": "remove", "attribute": "filter_ids", "value": "gold"}])
    );
    let r = agent.ok(json!({"v": 1, "op": "sessions_get", "query": {"user_name": "bob"}}));
    for s in r["sessions"].as_array().unwrap() {
        assert!(
            s["authorization"]["filter_ids"].is_null(),
            "table unchanged: {s}"
        );
    }
    d.stop();
}

// The shard sends its settled answers itself (mmsg backend): the dispatcher hands them over
// and wakes the shard's eventfd, so an idle shard, waiting for datagrams with a 100 ms poll
// timeout, answers right after the agent's commit, not at the end of its wait. Twenty
// Disconnects one after another on an idle server: every ACK left from the shard (metric), and
// the median time from commit to ACK is far below the half-timeout (50 ms) that a missed
// wake-up would cost on average.
#[test]
fn an_idle_shard_is_woken_to_send_its_settled_answers_at_once() {
    let (d, path) = server("wake.sock", &["--metrics", "127.0.0.1:0"]);
    let metrics = d.banner_addr("metrics");
    let mut agent = Agent::connect(&path, "bng1");
    let rounds = 20u64;
    for n in 0..rounds {
        agent.upsert(
            "bng1",
            n + 1,
            json!({"acct_session_id": format!("w-{n}"), "user_name": format!("u{n}")}),
        );
    }
    let mut delays = Vec::new();
    for n in 0..rounds {
        let (sock, req) = dac(n as u8, &format!("w-{n}"));
        send(&sock, d.addr(), &req);
        let action = agent.action(Duration::from_secs(5)).expect("an action");
        // The shard is idle now (the request was decided long ago): it waits in poll.
        std::thread::sleep(Duration::from_millis(20));
        let committed_at = Instant::now();
        agent.answer(&action, "committed", None);
        let (code, _, _, acked_at) = receive(&sock, &req, Duration::from_secs(5)).expect("ACK");
        assert_eq!(code, 41);
        delays.push(acked_at.duration_since(committed_at));
    }
    delays.sort();
    let median = delays[delays.len() / 2];
    assert!(
        median < Duration::from_millis(25),
        "median commit-to-ACK {median:?} (all: {delays:?})"
    );
    // The shards publish their counters every 250 ms.
    let sent_by_shards = || {
        daemon::scrape(metrics)
            .lines()
            .find_map(|l| {
                l.strip_prefix("dynauth_settled_answers_sent_by_shards_total ")?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
    };
    daemon::wait_until(
        Duration::from_secs(5),
        "every ACK sent by the shard",
        || sent_by_shards() >= rounds,
    );
    d.stop();
}
