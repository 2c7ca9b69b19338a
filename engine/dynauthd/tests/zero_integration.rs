//! Zero-integration mode end to end: the real dynauthd learns sessions from FreeRADIUS
//! `radclient ... acct` (RFC 2866) on `--accounting-listen`, and Disconnect-Requests by the
//! learnt keys get the answers RFC 5176 §3 requires: ACK while the session lives, ACK with
//! Error-Cause 201 for a retry after Stop (tombstone), NAK 503 for a NAS that rebooted.

mod daemon;

use std::net::SocketAddr;

use daemon::start_ok;

const SECRET: &str = "zero-integration-secret";

fn acct(server: SocketAddr, attrs: &str) {
    let text = daemon::run_radclient(server, "acct", SECRET, attrs);
    assert!(
        text.contains("Received Accounting-Response"),
        "no Accounting-Response for:\n{attrs}\nradclient said:\n{text}"
    );
}

fn disconnect(to: SocketAddr, id: u8, attrs: &[(u8, &[u8])]) -> (u8, Option<u32>) {
    daemon::disconnect(to, SECRET, id, attrs)
}

#[test]
fn sessions_learnt_from_accounting_are_disconnected_by_their_keys() {
    let client = format!("127.0.0.1/32={SECRET}");
    let d = start_ok(&[
        "--listen",
        "127.0.0.1:0",
        "--accounting-listen",
        "127.0.0.1:0",
        "--client",
        &client,
        // A second client that sends nothing: it has no per-client accounting rows.
        "--client",
        "127.0.0.2/32=another-secret",
        "--io",
        "mmsg",
        "--shards",
        "1",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let accounting = d.banner_addr("accounting");
    let das = d.addr();
    let start = |id: &str, user: &str, ip: &str| {
        format!(
            "Acct-Status-Type = Start\nNAS-Identifier = \"bng1\"\nAcct-Session-Id = \"{id}\"\nUser-Name = \"{user}\"\nFramed-IP-Address = {ip}\n"
        )
    };
    acct(accounting, &start("A-1", "alice", "100.64.0.1"));
    acct(accounting, &start("A-2", "bob", "100.64.0.2"));
    acct(accounting, &start("A-3", "carol", "100.64.0.3"));
    // By the learnt User-Name: the session exists, Disconnect-ACK.
    assert_eq!(disconnect(das, 1, &[(1, b"alice")]), (41, None));
    // By Framed-IP-Address after an Interim-Update.
    acct(
        accounting,
        "Acct-Status-Type = Interim-Update\nNAS-Identifier = \"bng1\"\nAcct-Session-Id = \"A-2\"\nUser-Name = \"bob\"\nFramed-IP-Address = 100.64.0.2\n",
    );
    // The NAS ended A-2 itself (Stop): a Disconnect retry finds its tombstone (201).
    acct(
        accounting,
        "Acct-Status-Type = Stop\nNAS-Identifier = \"bng1\"\nAcct-Session-Id = \"A-2\"\n",
    );
    assert_eq!(
        disconnect(das, 2, &[(8, &[100, 64, 0, 2])]),
        (41, Some(201))
    );
    // An Interim after Stop does not bring it back.
    acct(
        accounting,
        "Acct-Status-Type = Interim-Update\nNAS-Identifier = \"bng1\"\nAcct-Session-Id = \"A-2\"\nUser-Name = \"bob\"\n",
    );
    assert_eq!(disconnect(das, 3, &[(1, b"bob")]), (41, Some(201)));
    // The NAS rebooted (Accounting-On): carol is gone; by a key no tombstone knows, 503.
    acct(
        accounting,
        "Acct-Status-Type = Accounting-On\nNAS-Identifier = \"bng1\"\n",
    );
    assert_eq!(disconnect(das, 4, &[(1, b"carol")]), (41, Some(201)));
    assert_eq!(disconnect(das, 5, &[(1, b"dave")]), (42, Some(503)));
    // Bytes that are no RADIUS packet, from the client's address: refused, and counted in
    // that client's row (RFC 4671 radiusAccClientExtMalformedRequests).
    let junk = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    junk.send_to(&[4, 1, 0], accounting).unwrap();
    // The feed and the accounting listener are in /metrics, the totals and per client.
    let metrics = d.banner_addr("metrics");
    let mut body = daemon::scrape(metrics);
    let malformed =
        "dynauth_accounting_client_refused_total{client=\"127.0.0.1/32\",reason=\"malformed\"} 1";
    for _ in 0..50 {
        if body.contains(malformed) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        body = daemon::scrape(metrics);
    }
    for line in [
        malformed,
        "dynauth_accounting_client_received_total{client=\"127.0.0.1/32\"} 8",
        "dynauth_accounting_client_applied_total{client=\"127.0.0.1/32\"} 7",
        "dynauth_accounting_client_requests_total{client=\"127.0.0.1/32\",status=\"start\"} 3",
        "dynauth_accounting_client_requests_total{client=\"127.0.0.1/32\",status=\"interim_update\"} 2",
        "dynauth_accounting_client_requests_total{client=\"127.0.0.1/32\",status=\"accounting_on_off\"} 1",
        "dynauth_accounting_applied_total 7",
        "dynauth_feed_upserts_total 5",
        "dynauth_feed_deletes_total 1",
        "dynauth_feed_nas_resets_total 1",
        "dynauth_sessions 0",
    ] {
        assert!(body.contains(line), "{line} in\n{body}");
    }
    assert!(
        !body
            .lines()
            .any(|l| l.starts_with("dynauth_accounting_client")
                && l.contains("client=\"127.0.0.2/32\"")),
        "a client that sent no accounting has no accounting rows:\n{body}"
    );
    d.stop();
}
