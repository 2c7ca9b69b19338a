//! The accounting listener on loopback, driven by FreeRADIUS's radclient (Debian package
//! freeradius-utils, installed by .ci/run): Start, Interim-Update, Stop and Accounting-On
//! change a `MemoryStore` through a `Feed`, each answered with an Accounting-Response; the
//! same Acct-Session-Id on two NASes is two sessions; an Interim after a Stop does not
//! resurrect the session; Accounting-On wipes that NAS only; a retransmission is answered
//! byte for byte and applied once; a wrong secret gets no answer.

mod daemon;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use dynauth_proto::SessionStore;
use dynauth_proto::accounting::Refused;
use dynauth_proto::auth::{self, ResponseCheck, Secret};
use dynauth_proto::client::{Client, ClientTable};
use dynauth_proto::codec::{Packet, PacketWriter};
use dynauth_proto::dict::{acct_status, attr, code};
use dynauth_proto::session::Session;
use dynauth_proto::store::{MemoryStore, TombstonePolicy};
use dynauthd::accounting::{self, Listener};
use dynauthd::feed::SessionFeed;

const SECRET: &str = "acct-test-secret";

struct Setup {
    listener: Listener,
    store: Arc<MemoryStore>,
    feed: Arc<SessionFeed>,
}

fn setup() -> Setup {
    let client = Client::new("127.0.0.0/8".parse().unwrap(), Secret::new(SECRET).unwrap());
    let clients = Arc::new(ClientTable::new([client]).unwrap());
    let store = Arc::new(MemoryStore::new(TombstonePolicy::default()));
    let feed = Arc::new(SessionFeed::new(store.clone(), Instant::now()));
    let apply = accounting::through(Arc::clone(&feed));
    let listener = accounting::spawn(
        "127.0.0.1:0".parse().unwrap(),
        clients,
        apply,
        Arc::new(AtomicBool::new(false)),
    )
    .expect("bind the accounting listener");
    Setup {
        listener,
        store,
        feed,
    }
}

/// Runs radclient once (one try, bounded) and returns its output.
fn radclient(server: SocketAddr, secret: &str, attrs: &str) -> String {
    daemon::run_radclient(server, "acct", secret, attrs)
}

fn acct(server: SocketAddr, attrs: &str) {
    let out = radclient(server, SECRET, attrs);
    assert!(
        out.contains("Received Accounting-Response"),
        "no Accounting-Response for:\n{attrs}\nradclient said:\n{out}"
    );
}

/// The live sessions as (NAS, Acct-Session-Id), sorted.
fn sessions(store: &MemoryStore) -> Vec<(String, String)> {
    let mut v: Vec<_> = store
        .snapshot()
        .into_iter()
        .map(|s| {
            (
                s.nas.unwrap_or_default(),
                s.acct_session_id.unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}

fn find(store: &MemoryStore, nas: &str, id: &str) -> Session {
    store
        .snapshot()
        .into_iter()
        .find(|s| s.nas.as_deref() == Some(nas) && s.acct_session_id.as_deref() == Some(id))
        .unwrap_or_else(|| panic!("no session {id} on {nas}"))
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn radclient_start_interim_stop_accounting_on() {
    let Setup {
        listener,
        store,
        feed,
    } = setup();
    let s = listener.local_addr();

    // Start on bng-a, with every kind of key radclient can send.
    acct(
        s,
        "Acct-Status-Type = Start\n\
         Acct-Session-Id = \"sess-1\"\n\
         User-Name = \"alice@isp.example\"\n\
         Framed-IP-Address = 10.1.0.7\n\
         Framed-IPv6-Prefix = 2001:db8:1::/64\n\
         Calling-Station-Id = \"00-11-22-33-44-55\"\n\
         Called-Station-Id = \"internet\"\n\
         NAS-Port = 7\n\
         NAS-Port-Id = \"ge-0/0/1.100\"\n\
         Acct-Multi-Session-Id = \"multi-1\"\n\
         Chargeable-User-Identity = \"cui-1\"\n\
         Cisco-AVPair = \"audit-session-id=AUDIT1\"\n\
         Class = 0x676f6c64\n\
         Session-Timeout = 3600\n\
         NAS-Identifier = \"bng-a\"\n\
         NAS-IP-Address = 192.0.2.1\n",
    );
    assert_eq!(sessions(&store), pairs(&[("bng-a", "sess-1")]));
    let a = find(&store, "bng-a", "sess-1");
    assert_eq!(a.user_name.as_deref(), Some("alice@isp.example"));
    assert_eq!(a.framed_ip, Some(Ipv4Addr::new(10, 1, 0, 7)));
    assert_eq!(
        a.framed_ipv6_prefix.map(|p| p.to_string()).as_deref(),
        Some("2001:db8:1::/64")
    );
    assert_eq!(a.calling_station_id.as_deref(), Some("00-11-22-33-44-55"));
    assert_eq!(a.called_station_id.as_deref(), Some("internet"));
    assert_eq!(a.nas_port, Some(7));
    assert_eq!(a.nas_port_id.as_deref(), Some("ge-0/0/1.100"));
    assert_eq!(a.acct_multi_session_id.as_deref(), Some("multi-1"));
    assert_eq!(a.cui.as_deref(), Some("cui-1"));
    assert_eq!(a.audit_session_id.as_deref(), Some("AUDIT1"));
    assert_eq!(a.authorization.session_timeout, Some(3600));
    assert_eq!(a.authorization.classes, vec![b"gold".to_vec()]);

    // The same Acct-Session-Id on another NAS (known by its address only) is another
    // session; this one is signed with a Message-Authenticator, and so is its answer.
    acct(
        s,
        "Acct-Status-Type = Start\n\
         Acct-Session-Id = \"sess-1\"\n\
         User-Name = \"bob\"\n\
         NAS-IP-Address = 192.0.2.2\n\
         Message-Authenticator = 0x00\n",
    );
    assert_eq!(
        sessions(&store),
        pairs(&[("192.0.2.2", "sess-1"), ("bng-a", "sess-1")])
    );

    // Interim-Update refreshes the session with what it now carries.
    acct(
        s,
        "Acct-Status-Type = Interim-Update\n\
         Acct-Session-Id = \"sess-1\"\n\
         User-Name = \"alice@isp.example\"\n\
         Framed-IP-Address = 10.1.0.8\n\
         NAS-Identifier = \"bng-a\"\n",
    );
    assert_eq!(
        find(&store, "bng-a", "sess-1").framed_ip,
        Some(Ipv4Addr::new(10, 1, 0, 8))
    );
    assert_eq!(store.len(), 2);

    // Stop removes it from bng-a only.
    acct(
        s,
        "Acct-Status-Type = Stop\n\
         Acct-Session-Id = \"sess-1\"\n\
         Acct-Terminate-Cause = User-Request\n\
         NAS-Identifier = \"bng-a\"\n",
    );
    assert_eq!(sessions(&store), pairs(&[("192.0.2.2", "sess-1")]));

    // A late Interim after the Stop is answered but does not resurrect the session.
    acct(
        s,
        "Acct-Status-Type = Interim-Update\n\
         Acct-Session-Id = \"sess-1\"\n\
         User-Name = \"alice@isp.example\"\n\
         NAS-Identifier = \"bng-a\"\n",
    );
    assert_eq!(sessions(&store), pairs(&[("192.0.2.2", "sess-1")]));

    // Two more sessions on bng-a, then bng-a reboots: Accounting-On wipes bng-a only.
    for id in ["sess-2", "sess-3"] {
        acct(
            s,
            &format!(
                "Acct-Status-Type = Start\nAcct-Session-Id = \"{id}\"\n\
                 NAS-Identifier = \"bng-a\"\n"
            ),
        );
    }
    assert_eq!(store.len(), 3);
    acct(
        s,
        "Acct-Status-Type = Accounting-On\n\
         NAS-Identifier = \"bng-a\"\n",
    );
    assert_eq!(sessions(&store), pairs(&[("192.0.2.2", "sess-1")]));

    // Refused (no answer): a Start without Acct-Session-Id, and a wrong secret.
    let out = radclient(
        s,
        SECRET,
        "Acct-Status-Type = Start\nUser-Name = \"carol\"\nNAS-Identifier = \"bng-a\"\n",
    );
    assert!(
        !out.contains("Received"),
        "answered a Start without id:\n{out}"
    );
    let out = radclient(
        s,
        "not-the-secret",
        "Acct-Status-Type = Start\nAcct-Session-Id = \"x\"\nNAS-Identifier = \"bng-a\"\n",
    );
    assert!(!out.contains("Received"), "answered a wrong secret:\n{out}");
    assert_eq!(store.len(), 1);

    let stats = listener.stop();
    assert_eq!(
        (stats.starts, stats.interims, stats.stops, stats.nas_resets),
        (4, 2, 1, 1)
    );
    assert_eq!((stats.applied, stats.answered), (8, 8));
    assert_eq!(
        stats.refused[Refused::MissingAcctSessionId.index()],
        1,
        "{stats:?}"
    );
    assert_eq!(stats.refused[Refused::BadRequestAuthenticator.index()], 1);
    let feed = feed.stats();
    assert_eq!((feed.upserts, feed.deletes, feed.nas_resets), (6, 1, 1));
}

/// An Accounting-Request built and signed by hand (RFC 2866 §3).
fn hand_built(id: u8, attrs: &[(u8, &[u8])], secret: &Secret) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let mut w = PacketWriter::new(&mut buf, code::ACCOUNTING_REQUEST, id, &[0; 16]).unwrap();
    for (ty, value) in attrs {
        w.push(*ty, value).unwrap();
    }
    let out = w.finish();
    auth::sign_request(out, None, secret);
    out.to_vec()
}

#[test]
fn retransmission_is_answered_from_the_cache_and_applied_once() {
    let Setup {
        listener,
        store,
        feed,
    } = setup();
    let secret = Secret::new(SECRET).unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let start = hand_built(
        42,
        &[
            (attr::ACCT_STATUS_TYPE, &acct_status::START.to_be_bytes()),
            (attr::ACCT_SESSION_ID, b"retx-1"),
            (attr::USER_NAME, b"dave"),
            (attr::NAS_IDENTIFIER, b"bng-c"),
            (attr::PROXY_STATE, b"ps-1"),
        ],
        &secret,
    );
    let mut answers = Vec::new();
    for _ in 0..2 {
        socket.send_to(&start, listener.local_addr()).unwrap();
        let mut buf = [0u8; 4096];
        let (n, _) = socket.recv_from(&mut buf).expect("an Accounting-Response");
        answers.push(buf[..n].to_vec());
    }
    assert_eq!(answers[0], answers[1], "the copy gets the same bytes");
    let answer = Packet::parse(&answers[0]).unwrap();
    assert_eq!(
        (answer.code(), answer.identifier()),
        (code::ACCOUNTING_RESPONSE, 42)
    );
    let request = Packet::parse(&start).unwrap();
    assert_eq!(
        auth::verify_response(&answer, request.authenticator(), &secret),
        ResponseCheck::Valid
    );
    let echoed: Vec<_> = answer.attributes().map(|a| a.unwrap()).collect();
    assert_eq!(echoed.len(), 1);
    assert_eq!(
        (echoed[0].ty, echoed[0].value),
        (attr::PROXY_STATE, &b"ps-1"[..])
    );

    assert_eq!(sessions(&store), pairs(&[("bng-c", "retx-1")]));
    assert_eq!(feed.stats().upserts, 1, "applied once");
    let stats = listener.stop();
    assert_eq!((stats.received, stats.duplicates, stats.applied), (2, 1, 1));
}

#[test]
fn the_shared_stop_flag_ends_the_listener() {
    let clients = Arc::new(ClientTable::default());
    let store = Arc::new(MemoryStore::new(TombstonePolicy::default()));
    let feed = Arc::new(SessionFeed::new(store, Instant::now()));
    let stop = Arc::new(AtomicBool::new(false));
    let listener = accounting::spawn(
        "127.0.0.1:0".parse().unwrap(),
        clients,
        accounting::through(feed),
        Arc::clone(&stop),
    )
    .unwrap();
    let begun = Instant::now();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let stats = listener.join();
    assert!(begun.elapsed() < Duration::from_secs(2));
    assert_eq!(stats.received, 0);
}
