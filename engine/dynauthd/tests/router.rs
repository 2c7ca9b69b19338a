//! The routing tier (`dynauthd --role router`, docs/SCALE_OUT.md) against real parts on
//! loopback: owners are real dynauthd instances (table data plane), the affinity store is a
//! real redis-server started here, the DACs are this test's own signed requests and
//! FreeRADIUS's radclient. Cites RFC 5176 §3.1 (proxying, Proxy-State) and §3.5 (502, 505,
//! 508).

mod daemon;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use daemon::{Daemon, Redis, check_answer, exchange, request, scrape, start_ok, temp_path};
use dynauth_proto::auth::Secret;
use dynauth_proto::session::Session;

const DAC_SECRET: &str = "dac-secret";
const OWNER_SECRET: &str = "owner-secret";

fn dac_secret() -> Secret {
    Secret::new(DAC_SECRET).unwrap()
}

fn session(nas: &str, id: &str, user: &str) -> Session {
    Session {
        nas: Some(nas.into()),
        acct_session_id: Some(id.into()),
        user_name: Some(user.into()),
        ..Session::default()
    }
}

/// An owner: a dynauthd holding `sessions` (table data plane), reachable with the owner
/// secret from 127.0.0.1 (the routers' forwarding sockets), plus `extra` flags.
fn owner(name: &str, sessions: &[Session], extra: &[&str]) -> Daemon {
    let path = temp_path(&format!("{name}.jsonl"));
    let mut text = String::new();
    for s in sessions {
        text.push_str(&serde_json::to_string(s).unwrap());
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    let client = format!("127.0.0.1/32={OWNER_SECRET}");
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--client",
        &client,
        "--sessions",
        path.to_str().unwrap(),
        "--io",
        "mmsg",
        "--shards",
        "1",
        "--metrics",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    start_ok(&args)
}

/// An owner that publishes its own affinity (`--affinity-redis`, docs/SCALE_OUT.md), once
/// Redis has its address and every routing key of its sessions.
fn publishing_owner(name: &str, redis: &Redis, owner_id: &str, sessions: &[Session]) -> Daemon {
    let url = redis.url();
    let d = owner(
        name,
        sessions,
        &["--affinity-redis", &url, "--owner-id", owner_id],
    );
    let owner_key = dynauthd::affinity::owner_key("dynauth", owner_id);
    daemon::wait_until(
        Duration::from_secs(10),
        "the owner's affinity in Redis",
        || {
            let published = sessions.iter().all(|s| {
                dynauth_proto::route::session_route_keys(s).iter().all(|k| {
                    let key =
                        String::from_utf8(dynauthd::affinity::index_key("dynauth", k)).unwrap();
                    !redis.cli(&["HKEYS", &key]).is_empty()
                })
            });
            published && redis.cli(&["GET", &owner_key]) == d.addr().to_string()
        },
    );
    d
}

/// Writes what an owner publishes (docs/SCALE_OUT.md, "What is in Redis"), for the tests
/// that need a state no live owner would leave (a stale entry, a silent owner).
fn publish(redis: &Redis, owner_id: &str, addr: SocketAddr, sessions: &[Session]) {
    let mut c = redis.connection();
    let mut pipe = redis::pipe();
    pipe.cmd("SET")
        .arg(dynauthd::affinity::owner_key("dynauth", owner_id))
        .arg(addr.to_string());
    for s in sessions {
        let field = dynauthd::affinity::field(owner_id, &dynauth_proto::route::session_identity(s));
        for k in dynauth_proto::route::session_route_keys(s) {
            pipe.cmd("HSET")
                .arg(dynauthd::affinity::index_key("dynauth", &k))
                .arg(&field)
                .arg(1);
        }
    }
    let () = pipe.query(&mut c).unwrap();
}

/// Removes a session's fields for `owner_id` (what an owner does when it loses the session).
fn unpublish(redis: &Redis, owner_id: &str, s: &Session) {
    let mut c = redis.connection();
    let field = dynauthd::affinity::field(owner_id, &dynauth_proto::route::session_identity(s));
    for k in dynauth_proto::route::session_route_keys(s) {
        let _: i64 = redis::cmd("HDEL")
            .arg(dynauthd::affinity::index_key("dynauth", &k))
            .arg(&field)
            .query(&mut c)
            .unwrap();
    }
}

fn router(redis: &Redis, extra: &[&str]) -> Daemon {
    let secret_file = temp_path("owner.secret");
    std::fs::write(&secret_file, format!("{OWNER_SECRET}\n")).unwrap();
    let client = format!("127.0.0.1/32={DAC_SECRET}");
    let url = redis.url();
    let mut args = vec![
        "--role",
        "router",
        "--listen",
        "127.0.0.1:0",
        "--client",
        &client,
        "--affinity-redis",
        &url,
        "--owner-secret-file",
        secret_file.to_str().unwrap(),
        "--forward-bind",
        "127.0.0.1:0",
        "--io",
        "mmsg",
        "--shards",
        "1",
        "--metrics",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let d = start_ok(&args);
    assert!(d.banner.contains("role=router"), "{}", d.banner);
    // Following the invalidation channel (subscribing clears the cache: wait for that, so
    // a test's first lookups stay cached).
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&d, "dynauth_router_invalidations_followed") < 1.0 {
        assert!(Instant::now() < deadline, "the router never subscribed");
        std::thread::sleep(Duration::from_millis(10));
    }
    d
}

/// One counter or gauge from a daemon's metrics.
fn metric(d: &Daemon, name: &str) -> f64 {
    let body = scrape(d.banner_addr("metrics"));
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in the metrics:\n{body}"))
}

fn sessions_of(d: &Daemon) -> f64 {
    metric(d, "dynauth_sessions")
}

/// A Disconnect (40) or CoA (43) by Acct-Session-Id from the DAC, with a Proxy-State of the
/// DAC's own, through `to`; returns (code, Error-Cause, Proxy-States) of the verified answer.
fn ask(to: SocketAddr, code: u8, id: u8, acct: &str) -> Option<(u8, Option<u32>, Vec<Vec<u8>>)> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let req = request(
        code,
        id,
        &[(44, acct.as_bytes()), (33, b"dac-hop-1")],
        true,
        &dac_secret(),
    );
    let (answer, from) = exchange(&sock, to, &req, Duration::from_secs(3))?;
    assert_eq!(
        from, to,
        "the answer comes from the address the request went to"
    );
    Some(check_answer(&answer, &req, &dac_secret()))
}

#[test]
fn rfc5176_s3_1_disconnect_and_coa_reach_the_owner_through_either_router() {
    let redis = Redis::start();
    let a_sessions = [
        session("bng-a", "A1", "alice"),
        session("bng-a", "A2", "ann"),
    ];
    let b_sessions = [session("bng-b", "B1", "bob"), session("bng-b", "B2", "bea")];
    let owner_a = publishing_owner("owner-a", &redis, "own-a", &a_sessions);
    let owner_b = publishing_owner("owner-b", &redis, "own-b", &b_sessions);
    let r1 = router(&redis, &[]);
    let r2 = router(&redis, &[]);

    // Disconnect A1 through router 1: ACK, verified with the DAC's secret; the DAC's
    // Proxy-State comes back and the router's own does not (RFC 5176 §3.1).
    let (code, cause, proxy) = ask(r1.addr(), 40, 1, "A1").expect("an answer");
    assert_eq!((code, cause), (41, None));
    assert_eq!(proxy, [b"dac-hop-1".to_vec()]);
    assert_eq!(sessions_of(&owner_a), 1.0, "A1 left owner a");
    assert_eq!(sessions_of(&owner_b), 2.0, "owner b untouched");

    // CoA for B2 through router 2, by radclient.
    let out = daemon::run_radclient(
        r2.addr(),
        "coa",
        DAC_SECRET,
        "Acct-Session-Id = \"B2\"\nFilter-Id = \"gold\"\n",
    );
    assert!(out.contains("Received CoA-ACK"), "{out}");
    // Disconnect B1 through router 1, by radclient; then the same session again: the owner
    // answers from its tombstone (ACK with 201), relayed.
    let out = daemon::run_radclient(
        r1.addr(),
        "disconnect",
        DAC_SECRET,
        "Acct-Session-Id = \"B1\"\n",
    );
    assert!(out.contains("Received Disconnect-ACK"), "{out}");
    assert_eq!(sessions_of(&owner_b), 1.0, "B1 left owner b");
    let (code, cause, _) = ask(r2.addr(), 40, 2, "B1").expect("an answer");
    assert_eq!((code, cause), (41, Some(201)));

    assert!(metric(&r1, "dynauth_router_forwarded_total") >= 2.0);
    assert!(metric(&r1, "dynauth_router_relayed_total") >= 2.0);
    assert!(metric(&r2, "dynauth_router_relayed_total") >= 2.0);
}

#[test]
fn rfc5176_s3_5_unknown_session_is_502_and_two_owners_508() {
    let redis = Redis::start();
    // The same User-Name on two owners: a request by it alone cannot go to one owner.
    let a = [session("bng-a", "A1", "shared")];
    let b = [session("bng-b", "B1", "shared")];
    let owner_a = publishing_owner("o502-a", &redis, "own-a", &a);
    let owner_b = publishing_owner("o502-b", &redis, "own-b", &b);
    let r = router(&redis, &[]);
    let (code, cause, proxy) = ask(r.addr(), 40, 1, "nobody").expect("an answer");
    assert_eq!((code, cause), (42, Some(502)));
    assert_eq!(
        proxy,
        [b"dac-hop-1".to_vec()],
        "a router's own NAK echoes Proxy-State too"
    );
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let req = request(40, 2, &[(1, b"shared")], true, &dac_secret());
    let (answer, _) = exchange(&sock, r.addr(), &req, Duration::from_secs(3)).expect("answer");
    assert_eq!(check_answer(&answer, &req, &dac_secret()).1, Some(508));
    // User-Name together with Acct-Session-Id: the intersection is one owner.
    let req = request(40, 3, &[(1, b"shared"), (44, b"B1")], true, &dac_secret());
    let (answer, _) = exchange(&sock, r.addr(), &req, Duration::from_secs(3)).expect("answer");
    assert_eq!(check_answer(&answer, &req, &dac_secret()).0, 41);
    assert_eq!(sessions_of(&owner_b), 0.0);
    assert_eq!(sessions_of(&owner_a), 1.0);
    assert_eq!(metric(&r, "dynauth_router_not_routable_total"), 1.0);
    assert_eq!(metric(&r, "dynauth_router_multiple_owners_total"), 1.0);
}

#[test]
fn rfc5176_s3_5_owner_stopped_is_505() {
    let redis = Redis::start();
    let a = [
        session("bng-a", "A1", "alice"),
        session("bng-a", "A2", "ann"),
    ];
    let owner_a = publishing_owner("o505", &redis, "own-a", &a);
    let r = router(&redis, &["--forward-timeout", "400ms"]);
    assert_eq!(ask(r.addr(), 40, 1, "A1").unwrap().0, 41);
    // Killed (SIGKILL): its address is still published for up to 3 s (it had no time to
    // withdraw it), so the request is forwarded and times out.
    drop(owner_a);
    let started = Instant::now();
    let (code, cause, _) = ask(r.addr(), 40, 2, "A2").expect("an answer");
    assert_eq!((code, cause), (42, Some(505)));
    assert!(
        started.elapsed() >= Duration::from_millis(350),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(metric(&r, "dynauth_router_owner_timeouts_total"), 1.0);
    // Its address gone (it expires 3 s after the last heartbeat): NAK 505 at once. The
    // router trusts a read address for a second.
    daemon::wait_until(Duration::from_secs(5), "the owner key to expire", || {
        redis.cli(&["EXISTS", "dynauth:owner:{own-a}"]) == "0"
    });
    std::thread::sleep(Duration::from_millis(1_100));
    let started = Instant::now();
    let (code, cause, _) = ask(r.addr(), 40, 3, "A2").expect("an answer");
    assert_eq!((code, cause), (42, Some(505)));
    assert!(
        started.elapsed() < Duration::from_millis(350),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(metric(&r, "dynauth_router_owner_gone_total"), 1.0);
}

#[test]
fn owner_timeout_drop_lets_the_dac_retry_and_the_retry_is_forwarded_anew() {
    let redis = Redis::start();
    let a = [session("bng-a", "A1", "alice")];
    // A published owner address where nothing answers.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    publish(&redis, "own-a", silent.local_addr().unwrap(), &a);
    let r = router(
        &redis,
        &["--forward-timeout", "300ms", "--on-owner-timeout", "drop"],
    );
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let req = request(40, 9, &[(44, b"A1")], true, &dac_secret());
    assert!(
        exchange(&sock, r.addr(), &req, Duration::from_millis(800)).is_none(),
        "no answer: the DAC is to retry"
    );
    assert_eq!(
        metric(&r, "dynauth_router_owner_timeouts_dropped_total"),
        1.0
    );
    // The owner is back (a new instance publishes its address); the DAC's retransmission of
    // the same request is forwarded anew, not absorbed as a duplicate.
    let owner_a = owner("odrop", &a, &[]);
    publish(&redis, "own-a", owner_a.addr(), &a);
    std::thread::sleep(Duration::from_millis(1_100)); // past the router's address cache
    let (answer, _) = exchange(&sock, r.addr(), &req, Duration::from_secs(3)).expect("answer");
    assert_eq!(check_answer(&answer, &req, &dac_secret()).0, 41);
    assert_eq!(sessions_of(&owner_a), 0.0);
    assert_eq!(metric(&r, "dynauth_router_forwarded_total"), 2.0);
}

#[test]
fn retransmissions_make_one_forward_and_get_the_same_bytes() {
    let redis = Redis::start();
    let a = [session("bng-a", "A1", "alice")];
    let owner_a = owner("oretx", &a, &[]);
    publish(&redis, "own-a", owner_a.addr(), &a);
    let r = router(&redis, &[]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let req = request(40, 5, &[(44, b"A1")], true, &dac_secret());
    for _ in 0..3 {
        sock.send_to(&req, r.addr()).unwrap();
    }
    let mut buf = [0u8; 4096];
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    let first = buf[..n].to_vec();
    assert_eq!(check_answer(&first, &req, &dac_secret()).0, 41);
    // After the answer: the cached bytes, and still one forward.
    let (again, _) = exchange(&sock, r.addr(), &req, Duration::from_secs(3)).expect("replay");
    assert_eq!(again, first);
    assert_eq!(metric(&r, "dynauth_router_forwarded_total"), 1.0);
}

#[test]
fn rfc8559_nas_route_reaches_a_plain_das_whose_sessions_are_not_published() {
    let redis = Redis::start();
    // A NAS's own DAS (here a dynauthd that knows itself as bng-7), no affinity published.
    let nas = owner(
        "plain-das",
        &[session("bng-7", "N1", "nina")],
        &["--nas-identifier", "bng-7"],
    );
    let route = format!("nas_identifier=bng-7@{}", nas.addr());
    let r = router(&redis, &["--nas-route", &route]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let req = request(40, 1, &[(44, b"N1"), (32, b"bng-7")], true, &dac_secret());
    let (answer, _) = exchange(&sock, r.addr(), &req, Duration::from_secs(3)).expect("answer");
    assert_eq!(
        check_answer(&answer, &req, &dac_secret()),
        (41, None, vec![])
    );
    assert_eq!(sessions_of(&nas), 0.0);
    assert_eq!(metric(&r, "dynauth_router_nas_routed_total"), 1.0);
    // Another NAS, unknown: 502.
    let req = request(40, 2, &[(44, b"N1"), (32, b"bng-8")], true, &dac_secret());
    let (answer, _) = exchange(&sock, r.addr(), &req, Duration::from_secs(3)).expect("answer");
    assert_eq!(check_answer(&answer, &req, &dac_secret()).1, Some(502));
}

#[test]
fn a_stale_cached_owner_answering_503_is_looked_up_again() {
    let redis = Redis::start();
    let s = session("bng-a", "M1", "mover");
    let other = session("bng-a", "M0", "stays");
    let owner_a = owner("stale-a", std::slice::from_ref(&other), &[]);
    let owner_b = owner("stale-b", std::slice::from_ref(&s), &[]);
    // The router learns "M1 is on a" (stale: it is on b)...
    publish(&redis, "own-a", owner_a.addr(), &[s.clone(), other]);
    let r = router(&redis, &[]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let probe = request(43, 1, &[(44, b"M1"), (11, b"x")], true, &dac_secret());
    let (answer, _) = exchange(&sock, r.addr(), &probe, Duration::from_secs(3)).expect("answer");
    assert_eq!(check_answer(&answer, &probe, &dac_secret()).1, Some(503));
    // ...then Redis says b, with no invalidation heard: the cached a answers 503, and the
    // router asks Redis again and reaches b.
    unpublish(&redis, "own-a", &s);
    publish(&redis, "own-b", owner_b.addr(), std::slice::from_ref(&s));
    let req = request(40, 2, &[(44, b"M1")], true, &dac_secret());
    let (answer, _) = exchange(&sock, r.addr(), &req, Duration::from_secs(3)).expect("answer");
    assert_eq!(check_answer(&answer, &req, &dac_secret()).0, 41);
    assert_eq!(sessions_of(&owner_b), 0.0);
    assert_eq!(metric(&r, "dynauth_router_rerouted_total"), 1.0);
}

#[test]
fn invalidations_evict_and_redis_down_keeps_cached_routes() {
    let mut redis = Redis::start();
    let a = [
        session("bng-a", "C1", "c1"),
        session("bng-a", "C2", "c2"),
        session("bng-a", "C3", "c3"),
    ];
    let owner_a = owner("oinv", &a, &[]);
    publish(&redis, "own-a", owner_a.addr(), &a);
    let r = router(&redis, &["--forward-timeout", "500ms"]);
    let coa = |id: u8, acct: &str| {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let req = request(
            43,
            id,
            &[(44, acct.as_bytes()), (11, b"f")],
            true,
            &dac_secret(),
        );
        let (answer, _) = exchange(&sock, r.addr(), &req, Duration::from_secs(3)).expect("answer");
        check_answer(&answer, &req, &dac_secret())
    };
    assert_eq!(coa(1, "C1").0, 44);
    assert_eq!(coa(2, "C2").0, 44);
    assert_eq!(coa(3, "C1").0, 44);
    assert_eq!(metric(&r, "dynauth_router_cache_hits_total"), 1.0);
    // An owner's invalidation of C1's key: the next request for it asks Redis.
    let message = dynauthd::affinity::encode_invalidation(&[b"acct_session_id=C1".to_vec()]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&r, "dynauth_router_cache_invalidations_total") < 1.0 {
        let mut c = redis.connection();
        let _: i64 = redis::cmd("PUBLISH")
            .arg("dynauth:inv")
            .arg(&message)
            .query(&mut c)
            .unwrap();
        assert!(Instant::now() < deadline, "the invalidation never arrived");
        std::thread::sleep(Duration::from_millis(50));
    }
    let misses = metric(&r, "dynauth_router_cache_misses_total");
    assert_eq!(coa(4, "C1").0, 44);
    assert_eq!(
        metric(&r, "dynauth_router_cache_misses_total"),
        misses + 1.0
    );
    // Redis gone: a cached route still works (C2), an uncached key gets NAK 505.
    redis.kill();
    assert_eq!(coa(5, "C2").0, 44, "C2's route was cached");
    let (code, cause, _) = coa(15, "C3");
    assert_eq!((code, cause), (45, Some(505)), "C3 was never looked up");
    assert!(metric(&r, "dynauth_router_store_unavailable_total") >= 1.0);
    // Redis back on the same port: routing resumes.
    let _redis = Redis::start_on(redis.port());
    let port = _redis.port();
    publish(&_redis, "own-a", owner_a.addr(), &a);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut id = 6;
    loop {
        let (code, _, _) = coa(id, "C3");
        if code == 44 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "routing did not resume after redis came back on {port}"
        );
        id += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_router_killed_mid_storm_loses_nothing_the_dac_retries_to_the_other() {
    let redis = Redis::start();
    let n = 300usize;
    let sessions: Vec<Session> = (0..n)
        .map(|i| {
            session(
                if i % 2 == 0 { "bng-a" } else { "bng-b" },
                &format!("K{i}"),
                &format!("u{i}"),
            )
        })
        .collect();
    let (even, odd): (Vec<_>, Vec<_>) = sessions
        .iter()
        .cloned()
        .enumerate()
        .partition(|(i, _)| i % 2 == 0);
    let even: Vec<Session> = even.into_iter().map(|(_, s)| s).collect();
    let odd: Vec<Session> = odd.into_iter().map(|(_, s)| s).collect();
    let owner_a = publishing_owner("storm-a", &redis, "own-a", &even);
    let owner_b = publishing_owner("storm-b", &redis, "own-b", &odd);
    let r1 = router(&redis, &[]);
    let r2 = router(&redis, &[]);
    let (r1_addr, r2_addr) = (r1.addr(), r2.addr());
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    // Every request by its own Identifier/socket pair: Identifier i % 256 on a socket per 256.
    let socks: Vec<UdpSocket> = (0..n.div_ceil(256))
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let reqs: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            request(
                40,
                (i % 256) as u8,
                &[(44, format!("K{i}").as_bytes())],
                true,
                &dac_secret(),
            )
        })
        .collect();
    let mut answered: Vec<Option<(u8, Option<u32>)>> = vec![None; n];
    let mut r1 = Some(r1);
    let drain = |answered: &mut Vec<Option<(u8, Option<u32>)>>| {
        let mut buf = [0u8; 4096];
        for (si, s) in socks.iter().enumerate() {
            while let Ok((len, _)) = s.recv_from(&mut buf) {
                let id = buf[1] as usize;
                let i = si * 256 + id;
                if i < n && answered[i].is_none() {
                    let (code, cause, _) = check_answer(&buf[..len], &reqs[i], &dac_secret());
                    answered[i] = Some((code, cause));
                }
            }
        }
    };
    // The storm to router 1; it is killed (SIGKILL) a third of the way through.
    for (i, req) in reqs.iter().enumerate() {
        if i == n / 3 {
            drop(r1.take());
        }
        let _ = socks[i / 256].send_to(req, r1_addr);
        if i % 20 == 0 {
            std::thread::sleep(Duration::from_millis(2));
            drain(&mut answered);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    drain(&mut answered);
    let lost = answered.iter().filter(|a| a.is_none()).count();
    assert!(
        lost >= n / 2,
        "router 1 was killed early, yet only {lost} went unanswered"
    );
    // The DAC retries what went unanswered to router 2, until everything is answered.
    let deadline = Instant::now() + Duration::from_secs(20);
    while answered.iter().any(Option::is_none) {
        for (i, req) in reqs.iter().enumerate() {
            if answered[i].is_none() {
                let _ = socks[i / 256].send_to(req, r2_addr);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        drain(&mut answered);
        assert!(Instant::now() < deadline, "still unanswered after 20 s");
    }
    // Every one acknowledged: torn down now (ACK) or already, by a forward of router 1 whose
    // answer was lost with it (ACK with 201, from the owner's tombstone).
    for (i, a) in answered.iter().enumerate() {
        let (code, cause) = a.unwrap();
        assert!(
            code == 41 && matches!(cause, None | Some(201)),
            "K{i}: {code} {cause:?}"
        );
    }
    assert_eq!(sessions_of(&owner_a), 0.0);
    assert_eq!(sessions_of(&owner_b), 0.0);
    drop(sock);
}

#[test]
fn rfc5176_s3_5_an_owner_stopped_cleanly_is_505_at_once() {
    let redis = Redis::start();
    let a = [session("bng-a", "A1", "alice")];
    let owner_a = publishing_owner("o505-clean", &redis, "own-a", &a);
    let r = router(&redis, &["--forward-timeout", "2s"]);
    // SIGTERM: the owner withdraws its address before it exits.
    owner_a.stop();
    assert_eq!(redis.cli(&["EXISTS", "dynauth:owner:{own-a}"]), "0");
    let started = Instant::now();
    let (code, cause, _) = ask(r.addr(), 40, 1, "A1").expect("an answer");
    assert_eq!((code, cause), (42, Some(505)));
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "no forward to a withdrawn owner: {:?}",
        started.elapsed()
    );
    assert_eq!(metric(&r, "dynauth_router_owner_gone_total"), 1.0);
}

#[test]
fn rfc5176_s3_5_a_retried_disconnect_after_the_session_went_reaches_its_owner_201() {
    // The DAC's first answer was lost: the owner removed the session (and its affinity is
    // now a tombstone), the retry through a router still reaches it and gets ACK 201.
    let redis = Redis::start();
    let a = [session("bng-a", "T1", "tina")];
    let owner_a = publishing_owner("o201", &redis, "own-a", &a);
    let r = router(&redis, &["--affinity-cache-ttl", "0s"]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let direct = request(
        40,
        1,
        &[(44, b"T1")],
        true,
        &Secret::new(OWNER_SECRET).unwrap(),
    );
    let (answer, _) = exchange(&sock, owner_a.addr(), &direct, Duration::from_secs(3)).unwrap();
    assert_eq!(answer[0], 41, "removed at the owner");
    daemon::wait_until(
        Duration::from_secs(5),
        "the field to become a tombstone",
        || {
            redis
                .cli(&["HGET", "dynauth:{k:acct_session_id=T1}", "own-a|bng-a|a:T1"])
                .starts_with("t:")
        },
    );
    let (code, cause, _) = ask(r.addr(), 40, 2, "T1").expect("an answer");
    assert_eq!((code, cause), (41, Some(201)));
    // A CoA for it is the owner's 503, relayed (SPEC §4: a tombstone answers Disconnects).
    let (code, cause, _) = ask(r.addr(), 43, 3, "T1").expect("an answer");
    assert_eq!((code, cause), (45, Some(503)));
}

#[test]
fn rfc8559_sessions_learnt_from_accounting_go_to_their_nas_das() {
    // The zero-integration DAS proxy: a dynauthd learns sessions from the NASes' Accounting
    // (radclient here) and publishes them as owner "learner"; the router sends a Disconnect
    // for one (by Acct-Session-Id alone) to the DAS of the NAS that reported it.
    let redis = Redis::start();
    let nas_das = owner("nas-7-das", &[session("bng-7", "L1", "lena")], &[]);
    let url = redis.url();
    let learner = start_ok(&[
        "--listen",
        "127.0.0.1:0",
        "--client",
        "127.0.0.1/32=acct-secret",
        "--accounting-listen",
        "127.0.0.1:0",
        "--io",
        "mmsg",
        "--shards",
        "1",
        "--affinity-redis",
        &url,
        "--owner-id",
        "learner",
    ]);
    let out = daemon::run_radclient(
        learner.banner_addr("accounting"),
        "acct",
        "acct-secret",
        "Acct-Status-Type = Start\nAcct-Session-Id = \"L1\"\nUser-Name = \"lena\"\nNAS-Identifier = \"bng-7\"\n",
    );
    assert!(out.contains("Received Accounting-Response"), "{out}");
    daemon::wait_until(
        Duration::from_secs(5),
        "the learnt session in Redis",
        || {
            redis.cli(&[
                "HGET",
                "dynauth:{k:acct_session_id=L1}",
                "learner|bng-7|a:L1",
            ]) == "1"
        },
    );
    let route = format!("nas_identifier=bng-7@{}", nas_das.addr());
    let r = router(&redis, &["--learner", "learner", "--nas-route", &route]);
    let (code, cause, _) = ask(r.addr(), 40, 1, "L1").expect("an answer");
    assert_eq!((code, cause), (41, None));
    assert_eq!(sessions_of(&nas_das), 0.0, "the NAS's own DAS acted");
    assert_eq!(metric(&r, "dynauth_router_forwarded_total"), 1.0);
    // Without a route for that NAS: 502.
    let r2 = router(&redis, &["--learner", "learner"]);
    let (code, cause, _) = ask(r2.addr(), 40, 2, "L1").expect("an answer");
    assert_eq!((code, cause), (42, Some(502)));
}
