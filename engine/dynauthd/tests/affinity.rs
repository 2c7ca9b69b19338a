//! Owners publishing session affinity (`--affinity-redis`, docs/SCALE_OUT.md) against the real
//! dynauthd binary and a real redis-server on loopback: the index follows the table through
//! upserts, moves, deletes, NAS resets and Disconnect-ACKs; invalidations are published;
//! an outage of Redis never fails the feed and is repaired by a resync; a clean shutdown
//! removes the owner key.

mod daemon;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use daemon::{Agent, Daemon, Redis, wait_until};
use serde_json::json;

const SECRET: &str = "affinity-test-secret";
const WAIT: Duration = Duration::from_secs(10);

/// An owner in table mode with a control socket and metrics, publishing to `redis`.
fn owner(redis: &Redis, socket: &str, id: &str, extra: &[&str]) -> (Daemon, std::path::PathBuf) {
    let url = redis.url();
    let mut args = vec![
        "--data-plane",
        "table",
        "--metrics",
        "127.0.0.1:0",
        "--affinity-redis",
        &url,
        "--owner-id",
        id,
    ];
    args.extend_from_slice(extra);
    daemon::start_with_control(socket, SECRET, &args)
}

fn upsert(agent: &mut Agent, nas: &str, seq: u64, session: serde_json::Value) {
    agent.ok(json!({"v": 1, "op": "upsert", "nas": nas, "seq": seq, "session": session}));
}

/// The fields of a routing key whose session is live (value `1`), sorted. A removed
/// session's field stays as a tombstone for the window ([`buried`]).
fn hkeys(redis: &Redis, route_key: &str) -> Vec<String> {
    fields_with(redis, route_key, |v| v == "1")
}

/// The tombstone fields of a routing key (value `t:MS`), sorted.
fn buried(redis: &Redis, route_key: &str) -> Vec<String> {
    fields_with(redis, route_key, |v| v.starts_with("t:"))
}

fn fields_with(redis: &Redis, route_key: &str, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let all = redis.cli(&["HGETALL", &format!("dynauth:{{k:{route_key}}}")]);
    let lines: Vec<&str> = all.lines().collect();
    let mut out: Vec<String> = lines
        .chunks_exact(2)
        .filter_map(|pair| match pair {
            [field, value] if keep(value) => Some(field.to_string()),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

fn metric(d: &Daemon, name: &str) -> u64 {
    let body = daemon::scrape(d.banner_addr("metrics"));
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} is in the metrics:\n{body}"))
}

/// Collects every invalidation message (decoded routing keys) on `channel`.
struct Subscriber {
    keys: mpsc::Receiver<Vec<String>>,
    stop: Arc<AtomicBool>,
}

impl Subscriber {
    fn start(redis: &Redis, channel: &str) -> Subscriber {
        let mut con = redis.connection();
        let (tx, keys) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let channel = channel.to_string();
        let (ready_tx, ready) = mpsc::channel();
        std::thread::spawn(move || {
            let mut ps = con.as_pubsub();
            ps.subscribe(&channel).unwrap();
            ps.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let _ = ready_tx.send(());
            while !stopped.load(Ordering::Relaxed) {
                if let Ok(msg) = ps.get_message() {
                    let payload: Vec<u8> = msg.get_payload_bytes().to_vec();
                    let decoded = decode(&payload);
                    if tx.send(decoded).is_err() {
                        break;
                    }
                }
            }
        });
        ready.recv_timeout(WAIT).expect("subscribed");
        Subscriber { keys, stop }
    }

    /// Every key received so far.
    fn received(&self) -> Vec<String> {
        self.keys.try_iter().flatten().collect()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The netstrings `LEN:BYTES` of an invalidation message (docs/SCALE_OUT.md).
fn decode(mut m: &[u8]) -> Vec<String> {
    let mut keys = Vec::new();
    while let Some(colon) = m.iter().position(|&b| b == b':') {
        let len: usize = std::str::from_utf8(&m[..colon]).unwrap().parse().unwrap();
        keys.push(String::from_utf8_lossy(&m[colon + 1..colon + 1 + len]).into_owned());
        m = &m[colon + 1 + len..];
    }
    keys
}

#[test]
fn the_index_follows_upserts_moves_deletes_resets_and_disconnects() {
    let redis = Redis::start();
    let sub = Subscriber::start(&redis, "dynauth:inv");
    let (d, path) = owner(&redis, "aff-follow.sock", "o1", &[]);
    // The owner key holds the DAS address (the first listen address as bound).
    wait_until(WAIT, "the owner key", || {
        redis.cli(&["GET", "dynauth:owner:{o1}"]) == d.addr().to_string()
    });
    let pttl: i64 = redis.cli(&["PTTL", "dynauth:owner:{o1}"]).parse().unwrap();
    assert!((1..=3000).contains(&pttl), "owner key PTTL {pttl}");
    let mut agent = Agent::connect(&path);
    agent.ok(json!({"v": 1, "op": "hello", "agent": "a", "nas": ["bng1", "bng2"]}));
    upsert(
        &mut agent,
        "bng1",
        1,
        json!({"acct_session_id": "s-1", "user_name": "alice", "framed_ip": "10.0.0.1"}),
    );
    upsert(
        &mut agent,
        "bng1",
        2,
        json!({"acct_session_id": "s-2", "user_name": "bob"}),
    );
    wait_until(WAIT, "s-1 and s-2 published", || {
        hkeys(&redis, "user_name=bob") == ["o1|bng1|a:s-2"]
            && hkeys(&redis, "user_name=alice") == ["o1|bng1|a:s-1"]
    });
    assert_eq!(hkeys(&redis, "framed_ip=10.0.0.1"), ["o1|bng1|a:s-1"]);
    assert_eq!(hkeys(&redis, "acct_session_id=s-1"), ["o1|bng1|a:s-1"]);
    let ttl: i64 = redis
        .cli(&["PTTL", "dynauth:{k:user_name=alice}"])
        .parse()
        .unwrap();
    assert!(
        (86_000_000..=86_400_000).contains(&ttl),
        "index entries expire a day after their last write: PTTL {ttl}"
    );
    // An upsert that changes User-Name moves exactly that entry.
    upsert(
        &mut agent,
        "bng1",
        3,
        json!({"acct_session_id": "s-1", "user_name": "carol", "framed_ip": "10.0.0.1"}),
    );
    wait_until(WAIT, "s-1 moved to carol", || {
        hkeys(&redis, "user_name=carol") == ["o1|bng1|a:s-1"]
    });
    assert_eq!(redis.cli(&["EXISTS", "dynauth:{k:user_name=alice}"]), "0");
    assert_eq!(hkeys(&redis, "framed_ip=10.0.0.1"), ["o1|bng1|a:s-1"]);
    // A Delete (an Accounting Stop is the same feed event) removes s-2's fields only.
    agent.ok(json!({"v": 1, "op": "delete", "nas": "bng1", "seq": 4, "acct_session_id": "s-2"}));
    wait_until(WAIT, "s-2 removed", || {
        hkeys(&redis, "user_name=bob").is_empty() && hkeys(&redis, "acct_session_id=s-2").is_empty()
    });
    // Removed, not forgotten: the fields are tombstones for the window, so a router still
    // sends a retried Disconnect here (ACK 201 from the owner's own tombstone).
    assert_eq!(buried(&redis, "user_name=bob"), ["o1|bng1|a:s-2"]);
    assert_eq!(buried(&redis, "acct_session_id=s-2"), ["o1|bng1|a:s-2"]);
    assert_eq!(hkeys(&redis, "user_name=carol"), ["o1|bng1|a:s-1"]);
    // A Disconnect-ACK (table mode) removes the session's fields.
    assert_eq!(
        daemon::disconnect(d.addr(), SECRET, 1, &[(1, b"carol")]),
        (41, None)
    );
    wait_until(WAIT, "s-1 removed by the Disconnect", || {
        hkeys(&redis, "user_name=carol").is_empty()
            && hkeys(&redis, "framed_ip=10.0.0.1").is_empty()
            && hkeys(&redis, "acct_session_id=s-1").is_empty()
    });
    // A NAS reset removes that NAS's sessions and nothing else.
    upsert(
        &mut agent,
        "bng1",
        5,
        json!({"acct_session_id": "s-3", "user_name": "dave"}),
    );
    upsert(
        &mut agent,
        "bng1",
        6,
        json!({"acct_session_id": "s-4", "user_name": "dave"}),
    );
    upsert(
        &mut agent,
        "bng2",
        1,
        json!({"acct_session_id": "s-5", "user_name": "dave"}),
    );
    wait_until(WAIT, "three sessions of dave", || {
        hkeys(&redis, "user_name=dave").len() == 3
    });
    agent.ok(json!({"v": 1, "op": "nas_reset", "nas": "bng1", "seq": 7}));
    wait_until(WAIT, "bng1 reset", || {
        hkeys(&redis, "user_name=dave") == ["o1|bng2|a:s-5"]
    });
    assert!(hkeys(&redis, "acct_session_id=s-3").is_empty());
    // The routers' caches heard of every key whose owners changed.
    let heard = sub.received();
    for key in [
        "acct_session_id=s-1",
        "user_name=alice",
        "user_name=carol",
        "user_name=bob",
        "acct_session_id=s-2",
        "framed_ip=10.0.0.1",
        "acct_session_id=s-3",
        "user_name=dave",
    ] {
        assert!(heard.iter().any(|k| k == key), "{key} in {heard:?}");
    }
    assert!(metric(&d, "dynauth_affinity_published_total") >= 10);
    assert!(metric(&d, "dynauth_affinity_removed_total") >= 8);
    assert_eq!(metric(&d, "dynauth_affinity_dropped_total"), 0);
    assert!(metric(&d, "dynauth_affinity_write_seconds_count") > 0);
    drop(agent);
    // A clean shutdown removes the owner key at once; the index entries stay.
    d.stop();
    assert_eq!(redis.cli(&["EXISTS", "dynauth:owner:{o1}"]), "0");
    assert_eq!(hkeys(&redis, "user_name=dave"), ["o1|bng2|a:s-5"]);
}

#[test]
fn two_owners_of_one_user_name_give_two_fields() {
    let redis = Redis::start();
    let (a, pa) = owner(&redis, "aff-two-a.sock", "bng-a", &[]);
    let (b, pb) = owner(
        &redis,
        "aff-two-b.sock",
        "bng-b",
        &["--affinity-ttl", "90m"],
    );
    for (p, nas) in [(&pa, "n-a"), (&pb, "n-b")] {
        let mut agent = Agent::connect(p);
        upsert(
            &mut agent,
            nas,
            1,
            json!({"acct_session_id": "S1", "user_name": "eve"}),
        );
    }
    wait_until(WAIT, "both owners published eve", || {
        hkeys(&redis, "user_name=eve") == ["bng-a|n-a|a:S1", "bng-b|n-b|a:S1"]
    });
    assert_eq!(
        redis.cli(&["GET", "dynauth:owner:{bng-b}"]),
        b.addr().to_string()
    );
    // One owner's session ending leaves the other's field alone.
    let mut agent = Agent::connect(&pb);
    agent.ok(json!({"v": 1, "op": "delete", "nas": "n-b", "seq": 2, "acct_session_id": "S1"}));
    wait_until(WAIT, "bng-b's field removed", || {
        hkeys(&redis, "user_name=eve") == ["bng-a|n-a|a:S1"]
    });
    a.stop();
    b.stop();
}

fn count_published(redis: &Redis, ids: impl Iterator<Item = u32>) -> usize {
    ids.filter(|i| !hkeys(redis, &format!("acct_session_id=r-{i}")).is_empty())
        .count()
}

#[test]
fn a_redis_outage_never_fails_the_feed_and_a_resync_repairs_the_index() {
    let mut redis = Redis::start();
    let (d, path) = owner(&redis, "aff-outage.sock", "o1", &[]);
    let mut agent = Agent::connect(&path);
    for i in 0..50u32 {
        upsert(
            &mut agent,
            "bng1",
            u64::from(i) + 1,
            json!({"acct_session_id": format!("r-{i}"), "user_name": format!("u{i}")}),
        );
    }
    wait_until(WAIT, "50 sessions published", || {
        count_published(&redis, 0..50) == 50
    });
    redis.kill();
    // The feed goes on while Redis is away: every event is applied and answered.
    for i in 50..100u32 {
        upsert(
            &mut agent,
            "bng1",
            u64::from(i) + 1,
            json!({"acct_session_id": format!("r-{i}"), "user_name": format!("u{i}")}),
        );
    }
    for i in 0..10u32 {
        let r = agent.ok(
            json!({"v": 1, "op": "delete", "nas": "bng1", "seq": 101 + i,
            "acct_session_id": format!("r-{i}")}),
        );
        assert_eq!(r["deleted"], json!(true));
    }
    std::thread::sleep(Duration::from_millis(300));
    let port = redis.port();
    let redis = Redis::start_on(port); // empty: everything it held is gone
    wait_until(Duration::from_secs(20), "the index complete again", || {
        count_published(&redis, 10..100) == 90
    });
    assert_eq!(
        count_published(&redis, 0..10),
        0,
        "deleted sessions stay out"
    );
    wait_until(WAIT, "the owner key again", || {
        redis.cli(&["GET", "dynauth:owner:{o1}"]) == d.addr().to_string()
    });
    assert!(metric(&d, "dynauth_affinity_errors_total") >= 1);
    assert!(metric(&d, "dynauth_affinity_resyncs_total") >= 2);
    let r = agent.ok(json!({"v": 1, "op": "sessions_count"}));
    assert_eq!(r["sessions"], json!(90));
    drop(agent);
    let (_, err) = d.stop();
    let outages = err.matches("affinity: Redis").count();
    assert!(
        (1..=3).contains(&outages),
        "an outage is logged once (plus its end), not per command: {err}"
    );
}

#[test]
fn a_restored_table_is_published_at_start() {
    let redis = Redis::start();
    let dir = daemon::temp_path("aff-state");
    let _ = std::fs::remove_dir_all(&dir);
    let state = dir.to_str().unwrap().to_string();
    let (d, path) = owner(&redis, "aff-state.sock", "o1", &["--state-dir", &state]);
    let mut agent = Agent::connect(&path);
    upsert(
        &mut agent,
        "bng1",
        1,
        json!({"acct_session_id": "k-1", "user_name": "kim"}),
    );
    drop(agent);
    d.stop();
    redis.cli(&["FLUSHALL"]);
    let (d, _) = owner(&redis, "aff-state.sock", "o1", &["--state-dir", &state]);
    wait_until(WAIT, "the restored session re-published", || {
        hkeys(&redis, "user_name=kim") == ["o1|bng1|a:k-1"]
    });
    d.stop();
    let _ = std::fs::remove_dir_all(Path::new(&state));
}

#[test]
fn owner_flags_are_checked_at_start() {
    let redis = Redis::start();
    let url = redis.url();
    match daemon::start(&[
        "--client",
        "127.0.0.1/32=x",
        "--listen",
        "0.0.0.0:0",
        "--affinity-redis",
        &url,
        "--owner-id",
        "o1",
    ]) {
        daemon::Started::Failed(err) => assert!(err.contains("--owner-address"), "{err}"),
        daemon::Started::Running(_) => panic!("an unspecified owner address was accepted"),
    }
    match daemon::start(&[
        "--client",
        "127.0.0.1/32=x",
        "--listen",
        "127.0.0.1:0",
        "--affinity-redis",
        "redis://:hunter2@127.0.0.1:1/0",
        "--owner-id",
        "o1",
    ]) {
        daemon::Started::Running(d) => {
            // Redis unreachable at start: the server runs, and the password never shows.
            let (_, err) = d.stop();
            assert!(!err.contains("hunter2"), "{err}");
            assert!(err.contains("redis://***@127.0.0.1:1/0"), "{err}");
        }
        daemon::Started::Failed(err) => panic!("an unreachable Redis stopped the start: {err}"),
    }
    match daemon::start(&[
        "--client",
        "127.0.0.1/32=x",
        "--listen",
        "127.0.0.1:0",
        "--affinity-redis",
        "nope://:hunter2@127.0.0.1:1",
        "--owner-id",
        "o1",
    ]) {
        daemon::Started::Failed(err) => {
            assert!(
                err.contains("--affinity-redis nope://***@127.0.0.1:1"),
                "{err}"
            );
            assert!(!err.contains("hunter2"), "{err}");
        }
        daemon::Started::Running(_) => panic!("a URL that is not redis:// was accepted"),
    }
}

#[test]
fn removals_dropped_by_a_full_queue_are_swept_after_the_resync() {
    let redis = Redis::start();
    let (d, path) = owner(&redis, "aff-drops.sock", "o1", &[]);
    let mut agent = Agent::connect(&path);
    for i in 0..10u32 {
        upsert(
            &mut agent,
            "bng1",
            u64::from(i) + 1,
            json!({"acct_session_id": format!("x-{i}"), "user_name": format!("gone{i}")}),
        );
    }
    wait_until(WAIT, "x-0..x-9 published", || {
        (0..10).all(|i| hkeys(&redis, &format!("user_name=gone{i}")).len() == 1)
    });
    // Redis hangs: the publisher's queue (65,536 changes) fills and overflows.
    redis.pause();
    let mut seq = 100u64;
    for chunk in 0..75u32 {
        let events: Vec<_> = (0..1000u32)
            .map(|i| {
                seq += 1;
                json!({"op": "upsert", "nas": "bng1", "seq": seq,
                    "session": {"acct_session_id": format!("f-{}", chunk * 1000 + i)}})
            })
            .collect();
        let r = agent.ok(json!({"v": 1, "op": "batch", "events": events}));
        assert_eq!(r["applied"], json!(1000));
    }
    // These removals find the queue full: dropped, and the index keeps their fields.
    for i in 0..10u32 {
        seq += 1;
        let r = agent.ok(json!({"v": 1, "op": "delete", "nas": "bng1", "seq": seq,
            "acct_session_id": format!("x-{i}")}));
        assert_eq!(r["deleted"], json!(true));
    }
    assert!(metric(&d, "dynauth_affinity_dropped_total") > 10);
    redis.resume();
    // The resync walk publishes every live session, then the sweep removes the stale fields.
    wait_until(Duration::from_secs(40), "the stale fields swept", || {
        (0..10).all(|i| {
            hkeys(&redis, &format!("user_name=gone{i}")).is_empty()
                && hkeys(&redis, &format!("acct_session_id=x-{i}")).is_empty()
        })
    });
    let (_, err) = d.stop();
    assert!(
        err.contains("stale field(s) of this owner removed"),
        "{err}"
    );
    for i in [0, 37_123, 74_999] {
        assert_eq!(
            hkeys(&redis, &format!("acct_session_id=f-{i}")),
            [format!("o1|bng1|a:f-{i}")]
        );
    }
    drop(agent);
}

#[test]
fn an_accounting_stop_and_an_agents_committed_disconnect_remove_their_fields() {
    use std::io::{BufRead as _, BufReader, Write as _};
    let redis = Redis::start();
    // Agent mode (the default with --control): a Disconnect removes what the agent committed.
    let url = redis.url();
    let (d, path) = daemon::start_with_control(
        "aff-agent.sock",
        SECRET,
        &[
            "--accounting-listen",
            "127.0.0.1:0",
            "--affinity-redis",
            &url,
            "--owner-id",
            "o1",
        ],
    );
    // Accounting: a Start publishes, the Stop removes.
    let acct = d.banner_addr("accounting");
    let session = "Acct-Session-Id = \"acct-1\"\nUser-Name = \"fay\"\nNAS-Identifier = \"bng-r\"\n";
    for status in ["Start", "Stop"] {
        let out = daemon::run_radclient(
            acct,
            "acct",
            SECRET,
            &format!("Acct-Status-Type = {status}\n{session}"),
        );
        assert!(out.contains("Received Accounting-Response"), "{out}");
        if status == "Start" {
            wait_until(WAIT, "the Start published", || {
                hkeys(&redis, "user_name=fay") == ["o1|bng-r|a:acct-1"]
            });
        }
    }
    wait_until(WAIT, "the Stop removed it", || {
        hkeys(&redis, "user_name=fay").is_empty()
            && hkeys(&redis, "acct_session_id=acct-1").is_empty()
    });
    // An agent that commits actions.
    let stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = |msg: Option<serde_json::Value>| -> serde_json::Value {
        if let Some(m) = msg {
            writeln!(writer, "{m}").unwrap();
        }
        let mut text = String::new();
        reader.read_line(&mut text).expect("a line");
        serde_json::from_str(&text).unwrap()
    };
    line(Some(
        json!({"v": 1, "op": "hello", "agent": "a", "nas": ["bng1"], "actions": true}),
    ));
    let r = line(Some(
        json!({"v": 1, "op": "upsert", "nas": "bng1", "seq": 1,
        "session": {"acct_session_id": "g-1", "user_name": "gus"}}),
    ));
    assert_eq!(r["ok"], json!(true), "{r}");
    wait_until(WAIT, "gus published", || {
        hkeys(&redis, "user_name=gus") == ["o1|bng1|a:g-1"]
    });
    let to = d.addr();
    let dac = std::thread::spawn(move || daemon::disconnect(to, SECRET, 9, &[(1, b"gus")]));
    let action = line(None);
    assert_eq!(action["type"], json!("action"), "{action}");
    assert_eq!(
        hkeys(&redis, "user_name=gus"),
        ["o1|bng1|a:g-1"],
        "nothing removed before the commit"
    );
    let results: Vec<_> = action["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| json!({"index": s["index"], "result": "committed"}))
        .collect();
    writeln!(
        writer,
        "{}",
        json!({"v": 1, "op": "action_result", "action": action["action"], "results": results})
    )
    .unwrap();
    assert_eq!(dac.join().unwrap(), (41, None), "Disconnect-ACK");
    wait_until(WAIT, "gus removed at the commit", || {
        hkeys(&redis, "user_name=gus").is_empty() && hkeys(&redis, "acct_session_id=g-1").is_empty()
    });
    d.stop();
}
