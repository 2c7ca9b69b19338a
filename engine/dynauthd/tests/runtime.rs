//! The real dynauthd on loopback, with each I/O backend and with 1 and 2 shards: Disconnect
//! and CoA requests from several source ports, every answer and its authenticators checked,
//! Proxy-State echoed, duplicates replayed byte for byte, unknown clients and bad
//! authenticators ignored, graceful shutdown with totals.
//!
//! The io_uring tests print a notice and pass without checking when this kernel or sandbox
//! refuses io_uring; the mmsg tests always run.

mod daemon;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use daemon::*;
use dynauth_proto::auth::Secret;
use dynauth_proto::synth;

const SECRET: &str = "runtime-test-secret";
const WAIT: Duration = Duration::from_secs(3);
const SILENCE: Duration = Duration::from_millis(400);

fn start_backend(io: &str, shards: &str, extra: &[&str], sessions: &str) -> Option<Daemon> {
    let file = sessions_file(&format!("{io}-{shards}-{sessions}.jsonl"), 200);
    let client = format!("127.0.0.0/24={SECRET}");
    let mut args = vec![
        "--io",
        io,
        "--shards",
        shards,
        "--client",
        &client,
        "--sessions",
        file.to_str().unwrap(),
        "--stats-interval",
        "1",
    ];
    args.extend_from_slice(extra);
    if !extra.contains(&"--batch") {
        args.extend_from_slice(&["--batch", "16"]);
    }
    if !extra.contains(&"--listen") {
        args.extend_from_slice(&["--listen", "127.0.0.1:0"]);
    }
    match start(&args) {
        Started::Running(d) => Some(d),
        Started::Failed(e)
            if io == "uring" && e.contains("io_uring was requested but is not available") =>
        {
            eprintln!("NOTICE: io_uring is not permitted here; skipping this io_uring test:\n{e}");
            None
        }
        Started::Failed(e) => panic!("dynauthd did not start: {e}"),
    }
}

fn exercise(io: &str, shards: &str) {
    let Some(daemon) = start_backend(io, shards, &[], "main") else {
        return;
    };
    assert!(
        daemon.banner.contains(&format!("shards={shards}")),
        "{}",
        daemon.banner
    );
    let server = daemon.addr();
    let secret = Secret::new(SECRET).unwrap();
    let mut sent = 0u64;
    // Several source ports (SO_REUSEPORT spreads them over the shards).
    let clients: Vec<UdpSocket> = (0..6)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    let mut session = 0u64;
    for (c, sock) in clients.iter().enumerate() {
        for round in 0..4u8 {
            let id = (c as u8) * 16 + round;
            let asid = synth::acct_session_id(9, session);
            session += 1;
            let with_ma = round % 2 == 0;
            let proxy_a = format!("proxy-{c}-{round}");
            // Disconnect an existing session, with two Proxy-States to echo in order.
            let req = request(
                40,
                id,
                &[
                    (44, asid.as_bytes()),
                    (33, proxy_a.as_bytes()),
                    (33, b"second"),
                ],
                with_ma,
                &secret,
            );
            let (answer, from) = exchange(sock, server, &req, WAIT).expect("Disconnect answered");
            sent += 1;
            assert_eq!(
                from, server,
                "answer leaves from the address the request went to"
            );
            let (code, cause, proxy) = check_answer(&answer, &req, &secret);
            assert_eq!((code, cause), (41, None), "Disconnect-ACK for {asid}");
            assert_eq!(proxy, vec![proxy_a.as_bytes().to_vec(), b"second".to_vec()]);
            // The retransmission gets the same bytes back (not a NAK 503).
            let (again, _) = exchange(sock, server, &req, WAIT).expect("duplicate answered");
            sent += 1;
            assert_eq!(again, answer, "duplicate replayed byte for byte");

            // CoA on another existing session: Session-Timeout change.
            let asid = synth::acct_session_id(9, 100 + session);
            let req = request(
                43,
                id.wrapping_add(100),
                &[(44, asid.as_bytes()), (27, &600u32.to_be_bytes())],
                !with_ma,
                &secret,
            );
            let (answer, _) = exchange(sock, server, &req, WAIT).expect("CoA answered");
            sent += 1;
            assert_eq!(check_answer(&answer, &req, &secret).0, 44, "CoA-ACK");
        }
        // No such session: NAK 503 for both kinds.
        for code in [40u8, 43] {
            let req = request(code, 200 + code, &[(44, b"no-such-session")], true, &secret);
            let (answer, _) = exchange(sock, server, &req, WAIT).expect("NAK answered");
            sent += 1;
            let (ans_code, cause, _) = check_answer(&answer, &req, &secret);
            assert_eq!((ans_code, cause), (code + 2, Some(503)));
        }
        // An unsupported attribute in a Disconnect: NAK 401.
        let req = request(40, 250, &[(44, b"x"), (11, b"filter")], false, &secret);
        let (answer, _) = exchange(sock, server, &req, WAIT).expect("NAK 401 answered");
        sent += 1;
        assert_eq!(check_answer(&answer, &req, &secret).1, Some(401));
    }
    // A wrong secret: silence.
    let wrong = Secret::new("not-the-secret").unwrap();
    let req = request(40, 1, &[(44, b"x")], false, &wrong);
    assert!(
        exchange(&clients[0], server, &req, SILENCE).is_none(),
        "bad authenticator answered"
    );
    sent += 1;
    // An unknown client (127.0.1.1 is outside 127.0.0.0/24): silence.
    if let Ok(stranger) = UdpSocket::bind("127.0.1.1:0") {
        let req = request(40, 2, &[(44, b"x")], false, &secret);
        assert!(
            exchange(&stranger, server, &req, SILENCE).is_none(),
            "unknown client answered"
        );
        sent += 1;
    }
    // Long enough for one stats line (--stats-interval 1).
    std::thread::sleep(Duration::from_millis(1300));
    let (out, err) = daemon.stop();
    let totals = out
        .lines()
        .find(|l| l.starts_with("dynauthd totals:"))
        .unwrap_or_else(|| panic!("no totals line: {out}\n{err}"));
    assert!(totals.contains(&format!("received {sent} ")), "{totals}");
    assert!(
        totals.contains("unknown_client:1") || !totals.contains("unknown"),
        "{totals}"
    );
    assert!(totals.contains("bad_request_authenticator:1"), "{totals}");
    assert!(err.contains("stats:"), "a stats line was logged: {err}");
    assert!(!err.contains(SECRET), "the secret reached a log line");
    assert!(
        !err.contains("did not complete"),
        "shutdown quiesced every backend: {err}"
    );
}

#[test]
fn mmsg_one_shard() {
    exercise("mmsg", "1");
}

#[test]
fn mmsg_two_shards() {
    exercise("mmsg", "2");
}

#[test]
fn uring_one_shard() {
    exercise("uring", "1");
}

#[test]
fn uring_two_shards() {
    exercise("uring", "2");
}

/// A socket bound to the wildcard answers from the exact loopback address each request was
/// sent to (IP_PKTINFO), here 127.0.0.1 and 127.0.0.2 on one port.
fn answers_leave_from_the_requested_address(io: &str) {
    let Some(daemon) = start_backend(io, "1", &["--listen", "0.0.0.0:0"], "pktinfo") else {
        return;
    };
    let port = daemon.addr().port();
    let secret = Secret::new(SECRET).unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    for (i, ip) in ["127.0.0.1", "127.0.0.2"].iter().enumerate() {
        let to: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let req = request(40, i as u8, &[(44, b"none")], true, &secret);
        let (answer, from) = exchange(&sock, to, &req, WAIT).expect("answered");
        assert_eq!(from, to, "the answer's source address");
        assert_eq!(check_answer(&answer, &req, &secret).1, Some(503));
    }
    daemon.stop();
}

#[test]
fn mmsg_pktinfo_source_address() {
    answers_leave_from_the_requested_address("mmsg");
}

#[test]
fn uring_pktinfo_source_address() {
    answers_leave_from_the_requested_address("uring");
}

/// IPv6 loopback, when this host has it.
#[test]
fn ipv6_loopback_both_backends() {
    if UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("NOTICE: no IPv6 loopback here; skipping");
        return;
    }
    for io in ["mmsg", "uring"] {
        let client = format!("::1/128={SECRET}");
        let Some(daemon) =
            start_backend(io, "1", &["--listen", "[::1]:0", "--client", &client], "v6")
        else {
            continue;
        };
        let secret = Secret::new(SECRET).unwrap();
        let sock = UdpSocket::bind("[::1]:0").unwrap();
        let asid = synth::acct_session_id(9, 7);
        let req = request(40, 9, &[(44, asid.as_bytes())], true, &secret);
        let (answer, from) =
            exchange(&sock, daemon.addr(), &req, WAIT).expect("answered over IPv6");
        assert_eq!(from, daemon.addr());
        assert_eq!(check_answer(&answer, &req, &secret).0, 41);
        daemon.stop();
    }
}

/// A burst far larger than the batch (and, for io_uring, than its send slots) is answered in
/// full: no request is lost or left waiting when buffers and slots run short.
fn burst(io: &str) {
    let Some(daemon) = start_backend(io, "1", &["--batch", "1"], "burst") else {
        return;
    };
    let secret = Secret::new(SECRET).unwrap();
    let socks: Vec<UdpSocket> = (0..4)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    let per_socket = 100u16;
    for sock in &socks {
        for i in 0..per_socket {
            let req = request(
                43,
                i as u8,
                &[(44, b"none"), (33, &i.to_be_bytes())],
                false,
                &secret,
            );
            sock.send_to(&req, daemon.addr()).unwrap();
        }
    }
    for sock in &socks {
        sock.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 4096];
        for _ in 0..per_socket {
            let (n, _) = sock
                .recv_from(&mut buf)
                .expect("every request of the burst answered");
            assert_eq!(buf[0], 45, "CoA-NAK");
            assert!(n >= 20);
        }
    }
    daemon.stop();
}

#[test]
fn mmsg_burst_larger_than_batch() {
    burst("mmsg");
}

#[test]
fn uring_burst_larger_than_batch() {
    burst("uring");
}

/// Kernel drops are counted (SO_RXQ_OVFL): with the server stopped (SIGSTOP) and a tiny
/// receive buffer, a burst overflows the socket; after SIGCONT the totals report the drops.
fn kernel_drops_counted(io: &str) {
    let Some(daemon) = start_backend(io, "1", &["--recv-buffer", "4096"], "drops") else {
        return;
    };
    let pid = daemon.pid().to_string();
    let secret = Secret::new(SECRET).unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let signal = |sig: &str| {
        assert!(
            std::process::Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    signal("-STOP");
    for i in 0..300u16 {
        let req = request(
            43,
            i as u8,
            &[(44, b"none"), (33, &i.to_be_bytes())],
            false,
            &secret,
        );
        let _ = sock.send_to(&req, daemon.addr());
    }
    signal("-CONT");
    std::thread::sleep(Duration::from_millis(300));
    // A datagram queued after the drops carries the socket's drop counter.
    let req = request(43, 7, &[(44, b"none"), (33, b"after")], false, &secret);
    sock.send_to(&req, daemon.addr()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (out, _) = daemon.stop();
    let drops: u64 = out
        .split("kernel_drops ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no kernel_drops in {out}"));
    assert!(drops > 100, "kernel drops counted: {out}");
}

#[test]
fn mmsg_kernel_drops_counted() {
    kernel_drops_counted("mmsg");
}

#[test]
fn uring_kernel_drops_counted() {
    kernel_drops_counted("uring");
}

/// UDP GSO (`--gso`, mmsg backend): a burst of same-size answers to one address goes out as
/// segmented messages and arrives as separate, valid datagrams.
#[test]
fn mmsg_gso_burst_arrives_as_separate_valid_answers() {
    let Some(daemon) = start_backend("mmsg", "1", &["--gso", "--batch", "64"], "gso") else {
        return;
    };
    let secret = Secret::new(SECRET).unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let reqs: Vec<Vec<u8>> = (0..200u16)
        .map(|i| {
            request(
                43,
                i as u8,
                &[(44, b"none"), (33, &i.to_be_bytes())],
                false,
                &secret,
            )
        })
        .collect();
    // Identifiers wrap at 256; the Proxy-State tells the answers apart. The server is
    // stopped while the burst queues, so it reads full batches.
    let pid = daemon.pid().to_string();
    let signal = |sig: &str| {
        assert!(
            std::process::Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    signal("-STOP");
    for req in &reqs {
        sock.send_to(req, daemon.addr()).unwrap();
    }
    signal("-CONT");
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut seen = vec![false; reqs.len()];
    let mut buf = [0u8; 4096];
    for _ in 0..reqs.len() {
        let (n, from) = sock.recv_from(&mut buf).expect("every answer arrives");
        assert_eq!(from, daemon.addr());
        let answer = &buf[..n];
        let p = dynauth_proto::codec::Packet::parse(answer).unwrap();
        let tag = p
            .attributes()
            .filter_map(Result::ok)
            .find(|a| a.ty == 33)
            .map(|a| u16::from_be_bytes(a.value.try_into().unwrap()))
            .expect("Proxy-State echoed");
        let req = &reqs[usize::from(tag)];
        assert_eq!(
            check_answer(answer, req, &secret),
            (45, Some(503), vec![tag.to_be_bytes().to_vec()])
        );
        seen[usize::from(tag)] = true;
    }
    assert!(seen.iter().all(|s| *s));
    let (out, err) = daemon.stop();
    assert!(
        !err.contains("GSO send failed") && !err.contains("not supported"),
        "{err}"
    );
    assert!(out.contains("send_errors 0"), "{out}");
    assert!(!out.contains("gso_messages 0"), "GSO was used: {out}");
}

/// `--metrics ADDR`: Prometheus text with the engine's and the runtime's counters.
#[test]
fn metrics_endpoint_serves_prometheus_text() {
    let Some(daemon) = start_backend("mmsg", "2", &["--metrics", "127.0.0.1:0"], "metrics") else {
        return;
    };
    let metrics = metrics_addr(&daemon);
    let secret = Secret::new(SECRET).unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let asid = synth::acct_session_id(9, 1);
    let req = request(40, 1, &[(44, asid.as_bytes())], true, &secret);
    exchange(&sock, daemon.addr(), &req, WAIT).expect("answered");
    // Shards publish their counters every 250 ms.
    std::thread::sleep(Duration::from_millis(600));
    let body = daemon::scrape(metrics);
    assert!(body.starts_with("HTTP/1.0 200 OK"), "{body}");
    assert!(
        body.contains("dynauth_acks_total{client=\"127.0.0.0/24\",kind=\"disconnect\"} 1"),
        "{body}"
    );
    assert!(body.contains("dynauth_kernel_drops_total 0"), "{body}");
    assert!(
        body.contains("dynauth_datagrams_received_total 1"),
        "{body}"
    );
    // Per shard (two here): the one datagram was read and answered by exactly one of them.
    let per_shard = |name: &str| -> Vec<u64> {
        (0..2)
            .map(|shard| {
                let prefix = format!("{name}{{shard=\"{shard}\"}} ");
                body.lines()
                    .find_map(|l| l.strip_prefix(prefix.as_str()))
                    .unwrap_or_else(|| panic!("{prefix} in {body}"))
                    .parse()
                    .unwrap()
            })
            .collect()
    };
    let mut received = per_shard("dynauth_shard_datagrams_received_total");
    received.sort();
    assert_eq!(received, vec![0, 1], "{body}");
    let mut sent = per_shard("dynauth_shard_answers_sent_total");
    sent.sort();
    assert_eq!(sent, vec![0, 1], "{body}");
    // SPEC §10: the decision-latency histogram counts the one datagram.
    assert!(
        body.contains("# TYPE dynauth_decision_seconds histogram"),
        "{body}"
    );
    assert!(
        body.contains("dynauth_decision_seconds_bucket{le=\"+Inf\"} 1"),
        "{body}"
    );
    assert!(body.contains("dynauth_decision_seconds_count 1"), "{body}");
    let (out, _) = daemon.stop();
    assert!(
        out.contains("decision p50 <="),
        "totals name the decision latency: {out}"
    );
}

/// Several listen addresses: each shard owns one socket per address, and every address
/// answers from itself (here two IPv4 loopback sockets, plus ::1 when the host has it).
#[test]
fn several_listen_addresses_each_answer() {
    let v6 = UdpSocket::bind("[::1]:0").is_ok();
    for io in ["mmsg", "uring"] {
        let mut extra = vec!["--listen", "127.0.0.1:0", "--listen", "127.0.0.2:0"];
        let v6_client = format!("::1/128={SECRET}");
        if v6 {
            extra.extend_from_slice(&["--listen", "[::1]:0", "--client", &v6_client]);
        }
        let Some(daemon) = start_backend(io, "2", &extra, "multi") else {
            continue;
        };
        assert_eq!(
            daemon.addrs.len(),
            if v6 { 3 } else { 2 },
            "{}",
            daemon.banner
        );
        let secret = Secret::new(SECRET).unwrap();
        for (i, addr) in daemon.addrs.iter().enumerate() {
            let sock = if addr.is_ipv6() {
                UdpSocket::bind("[::1]:0").unwrap()
            } else {
                UdpSocket::bind("127.0.0.1:0").unwrap()
            };
            let req = request(43, i as u8, &[(44, b"none")], true, &secret);
            let (answer, from) = exchange(&sock, *addr, &req, WAIT).expect("answered");
            assert_eq!(from, *addr);
            assert_eq!(
                check_answer(&answer, &req, &secret),
                (45, Some(503), vec![])
            );
        }
        daemon.stop();
    }
}

/// A datagram longer than 4096 octets (MSG_TRUNC on receive): RFC 2865 §3 makes the octets
/// past the Length field padding, so the request inside is answered, and the truncation is
/// counted (`dynauth_truncated_datagrams_total`).
fn oversized_datagram_is_answered_and_counted(io: &str) {
    let Some(daemon) = start_backend(io, "1", &["--metrics", "127.0.0.1:0"], "oversized") else {
        return;
    };
    let metrics = metrics_addr(&daemon);
    let secret = Secret::new(SECRET).unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let asid = synth::acct_session_id(9, 2);
    let mut req = request(40, 7, &[(44, asid.as_bytes())], true, &secret);
    let signed = req.clone();
    req.resize(5000, 0);
    let (answer, _) = exchange(&sock, daemon.addr(), &req, WAIT).expect("answered");
    assert_eq!(
        check_answer(&answer, &signed, &secret).0,
        41,
        "Disconnect-ACK"
    );
    std::thread::sleep(Duration::from_millis(600));
    let body = daemon::scrape(metrics);
    assert!(
        body.contains("dynauth_truncated_datagrams_total 1"),
        "{body}"
    );
    assert!(body.contains("dynauth_control_truncated_total 0"), "{body}");
    daemon.stop();
}

#[test]
fn mmsg_oversized_datagram_is_answered_and_counted() {
    oversized_datagram_is_answered_and_counted("mmsg");
}

#[test]
fn uring_oversized_datagram_is_answered_and_counted() {
    oversized_datagram_is_answered_and_counted("uring");
}

/// The `--metrics` address from the banner.
fn metrics_addr(daemon: &Daemon) -> SocketAddr {
    daemon.banner_addr("metrics")
}
