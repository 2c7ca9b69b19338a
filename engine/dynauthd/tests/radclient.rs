//! Interop with FreeRADIUS's radclient (Debian package freeradius-utils): Disconnect-Request
//! and CoA-Request, with and without Message-Authenticator, get the right ACK or NAK from
//! dynauthd on each backend. Skips with a notice where radclient is not installed (CI
//! installs it).

mod daemon;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use daemon::*;

/// Runs radclient once (one try, bounded) and returns its output.
fn radclient(server: SocketAddr, kind: &str, secret: &str, attrs: &str) -> String {
    daemon::run_radclient(server, kind, secret, attrs)
}

fn have_radclient() -> bool {
    if daemon::radclient().is_none() {
        eprintln!(
            "NOTICE: radclient not found; skipping the FreeRADIUS interop test \
             (apt-get install freeradius-utils; CI installs it)"
        );
        return false;
    }
    true
}

fn demo_interop(io: &str) {
    if !have_radclient() {
        return;
    }
    let daemon = match start(&[
        "--demo",
        "--listen",
        "127.0.0.1:0",
        "--io",
        io,
        "--shards",
        "1",
    ]) {
        Started::Running(d) => d,
        Started::Failed(e) if io == "uring" && e.contains("not available") => {
            eprintln!("NOTICE: io_uring is not permitted here; skipping: {e}");
            return;
        }
        Started::Failed(e) => panic!("{e}"),
    };
    let s = daemon.addr();
    let secret = "dynauth-demo-secret";
    let cases: &[(&str, &str, &[&str])] = &[
        // The README's command.
        (
            "disconnect",
            "Acct-Session-Id = \"demo-1\"",
            &["Received Disconnect-ACK"],
        ),
        (
            "disconnect",
            "Acct-Session-Id = \"demo-2\", Message-Authenticator = 0x00",
            &["Received Disconnect-ACK"],
        ),
        (
            "coa",
            "Acct-Session-Id = \"demo-3\", Session-Timeout = 60",
            &["Received CoA-ACK"],
        ),
        (
            "coa",
            "User-Name = \"user00000004@isp.example\", Filter-Id = \"gold\", Message-Authenticator = 0x00",
            &["Received CoA-ACK"],
        ),
        (
            "disconnect",
            "Acct-Session-Id = \"no-such-session\"",
            &["Received Disconnect-NAK", "Session-Context-Not-Found"],
        ),
        (
            "coa",
            "Acct-Session-Id = \"no-such-session\", Message-Authenticator = 0x00",
            &["Received CoA-NAK", "Session-Context-Not-Found"],
        ),
        (
            "disconnect",
            "Acct-Session-Id = \"demo-5\", Service-Type = Framed-User",
            &["Received Disconnect-NAK", "Unsupported-Attribute"],
        ),
        (
            "coa",
            "Acct-Session-Id = \"demo-6\", NAS-IP-Address = 192.0.2.1",
            &["Received CoA-NAK", "NAS-Identification-Mismatch"],
        ),
        // A retransmitted Disconnect within the window: ACK with 201, never NAK 503.
        (
            "disconnect",
            "Acct-Session-Id = \"demo-1\"",
            &["Received Disconnect-ACK"],
        ),
    ];
    for (kind, attrs, wants) in cases {
        let out = radclient(s, kind, secret, attrs);
        for want in *wants {
            assert!(
                out.contains(want),
                "{kind} {attrs}: wanted `{want}` in:\n{out}"
            );
        }
    }
    // A wrong secret: no answer.
    let out = radclient(
        s,
        "disconnect",
        "wrong-secret",
        "Acct-Session-Id = \"demo-7\"",
    );
    assert!(!out.contains("Received"), "wrong secret answered:\n{out}");
    daemon.stop();
}

#[test]
fn radclient_demo_mmsg() {
    demo_interop("mmsg");
}

#[test]
fn radclient_demo_uring() {
    demo_interop("uring");
}

/// A client that requires Message-Authenticator (config file policy): radclient's request
/// without one is dropped, with one it is answered.
#[test]
fn radclient_require_message_authenticator() {
    if !have_radclient() {
        return;
    }
    let sessions = sessions_file("radclient.jsonl", 10);
    let path = temp_path("require-ma.toml");
    std::fs::write(
        &path,
        format!(
            "listen = [\"127.0.0.1:0\"]\nio = \"mmsg\"\nshards = 1\nsessions = \"{}\"\n\n[[client]]\nname = \"strict\"\nnetwork = \"127.0.0.1/32\"\nsecret = \"strict-secret\"\n\n[client.policy]\nrequire_message_authenticator = true\n",
            sessions.display()
        ),
    )
    .unwrap();
    let daemon = start_ok(&["--config", path.to_str().unwrap()]);
    let asid = dynauth_proto::synth::acct_session_id(9, 3);
    let out = radclient(
        daemon.addr(),
        "disconnect",
        "strict-secret",
        &format!("Acct-Session-Id = \"{asid}\""),
    );
    assert!(
        !out.contains("Received"),
        "answered without Message-Authenticator:\n{out}"
    );
    let out = radclient(
        daemon.addr(),
        "disconnect",
        "strict-secret",
        &format!("Acct-Session-Id = \"{asid}\", Message-Authenticator = 0x00"),
    );
    assert!(out.contains("Received Disconnect-ACK"), "{out}");
    let (totals, _) = daemon.stop();
    assert!(
        totals.contains("missing_message_authenticator:1"),
        "{totals}"
    );
}

/// The README's first command, exactly: `dynauthd --demo` on 127.0.0.1:3799 and radclient's
/// Disconnect of demo-1. Skips with a notice when port 3799 is taken on this machine.
#[test]
fn readme_demo_command_on_port_3799() {
    if !have_radclient() {
        return;
    }
    let daemon = match start(&["--demo", "--io", "mmsg", "--shards", "1"]) {
        Started::Running(d) => d,
        Started::Failed(e) if e.contains("already in use") => {
            eprintln!("NOTICE: 127.0.0.1:3799 is in use here; skipping the README demo test");
            return;
        }
        Started::Failed(e) => panic!("{e}"),
    };
    assert_eq!(
        daemon.addr(),
        "127.0.0.1:3799".parse::<SocketAddr>().unwrap()
    );
    let bin = daemon::radclient().unwrap();
    let mut child = Command::new(bin)
        .args([
            "-r",
            "1",
            "-t",
            "2",
            "127.0.0.1:3799",
            "disconnect",
            "dynauth-demo-secret",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Acct-Session-Id = \"demo-1\"\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Received Disconnect-ACK"), "{text}");
    assert!(out.status.success(), "radclient exit status");
    daemon.stop();
}
