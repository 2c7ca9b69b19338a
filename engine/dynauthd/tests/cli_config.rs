//! The command line and the config file: `check-config` says file, line and key; start-up
//! errors say what to do; flags from the issue's contract exist.

mod daemon;

use std::net::UdpSocket;
use std::process::Command;

use daemon::*;

fn check(name: &str, text: &str) -> (bool, String, String) {
    let path = temp_path(name);
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .env_remove("DYNAUTH_TEST_UNSET")
        .env("DYNAUTH_TEST_SECRET", "from-the-environment")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_accepts_a_full_file() {
    let secret = temp_path("bng-b.secret");
    std::fs::write(&secret, "file-secret\n").unwrap();
    let sessions = sessions_file("check.jsonl", 3);
    let text = format!(
        r#"
listen = ["127.0.0.1:3799", "[::1]:3799"]
shards = "auto"
cpus = "0-1"
io = "mmsg"
batch = 32
sessions = "{}"
recv_buffer_bytes = 33554432
send_buffer_bytes = 8388608
stats_interval_secs = 10
gso = false
metrics = "127.0.0.1:0"

[nas]
identifier = ["bng-1"]
ipv4 = ["192.0.2.1"]
ipv6 = ["2001:db8::1"]

[dedup]
max_entries = 1000
arena_bytes = 1048576
max_in_flight = 128

[overload]
shed_after_ms = 250
shed_action = "drop"

[tombstones]
max = 1000000

[[client]]
name = "bng-a"
network = "192.0.2.0/24"
secret_env = "DYNAUTH_TEST_SECRET"
previous_secret = "old"

[client.policy]
require_message_authenticator = true
key_profile = "5g-smf"
multi_session = {{ mode = "all", cap = 16 }}
answer_message_authenticator = "when-requested"

[[client]]
network = "2001:db8::/32"
secret_file = "{}"
"#,
        sessions.display(),
        secret.display()
    );
    let (ok, out, err) = check("good.toml", &text);
    assert!(ok, "{out}{err}");
    assert!(out.contains("OK: 2 client(s)"), "{out}");
    assert!(!out.contains("file-secret") && !err.contains("file-secret"));
}

#[test]
fn check_config_points_at_line_and_key() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "cidr.toml",
            "listen = [\"127.0.0.1:3799\"]\n\n[[client]]\nnetwork = \"10.0.0.0/33\"\nsecret = \"x\"\n",
            &["line 4", "network", "prefix length `33`"],
        ),
        (
            "typo.toml",
            "[[client]]\nnetwork = \"10.0.0.0/8\"\nsecret = \"x\"\n[client.policy]\nrequire_message_authenticatr = true\n",
            &["line 5", "unknown field `require_message_authenticatr`"],
        ),
        (
            "env.toml",
            "[[client]]\nnetwork = \"10.0.0.0/8\"\nsecret_env = \"DYNAUTH_TEST_UNSET\"\n",
            &[
                ":3: key `client[0].secret_env`",
                "DYNAUTH_TEST_UNSET is not set",
            ],
        ),
        (
            "nosecret.toml",
            "\n[[client]]\nnetwork = \"10.0.0.0/8\"\n",
            &[":3: key `client[0].secret`", "secret_file"],
        ),
        (
            "twosecrets.toml",
            "[[client]]\nnetwork = \"10.0.0.0/8\"\nsecret = \"a\"\nsecret_env = \"X\"\n",
            &["client[0].secret", "only one of"],
        ),
        (
            "file.toml",
            "[[client]]\nnetwork = \"10.0.0.0/8\"\nsecret_file = \"/nonexistent/dynauth.secret\"\n",
            &[":3: key `client[0].secret_file`", "cannot read secret file"],
        ),
        (
            "dup.toml",
            "[[client]]\nnetwork = \"10.0.0.0/8\"\nsecret = \"a\"\n[[client]]\nnetwork = \"10.0.0.0/8\"\nsecret = \"b\"\n",
            &[
                ":5: key `client[1].network`",
                "already configured by client[0]",
            ],
        ),
        ("shards.toml", "shards = 0\n", &["line 1", "shard count"]),
        (
            "io.toml",
            "io = \"epoll\"\n",
            &["line 1", "unknown variant `epoll`"],
        ),
        (
            "unknown.toml",
            "listen = []\nlisen = 3\n",
            &["line 2", "unknown field `lisen`"],
        ),
        ("syntax.toml", "listen = [\n", &["line"]),
        (
            "noclients.toml",
            "listen = [\"127.0.0.1:3799\"]\n",
            &["no clients configured", "--client"],
        ),
    ];
    for (name, text, wants) in cases {
        let (ok, out, err) = check(name, text);
        assert!(!ok, "{name} was accepted: {out}");
        assert!(err.contains(name), "{name}: error names the file: {err}");
        for want in *wants {
            assert!(err.contains(want), "{name}: wanted `{want}` in: {err}");
        }
    }
}

fn run_fail(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn startup_errors_say_what_to_do() {
    let err = run_fail(&["--demo", "--listen", "127.0.0.1:0", "--cpus", "4095"]);
    assert!(
        err.contains("no such CPU 4095") && err.contains("--cpus"),
        "{err}"
    );
    let err = run_fail(&["--client", "10.0.0.0/33=x"]);
    assert!(err.contains("prefix length"), "{err}");
    let err = run_fail(&["--listen", "127.0.0.1:0"]);
    assert!(err.contains("no clients configured"), "{err}");
    let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let err = run_fail(&["--demo", "--listen", &addr, "--io", "mmsg"]);
    assert!(
        err.contains("already in use") && err.contains("--listen"),
        "{err}"
    );
    let err = run_fail(&["--demo", "--listen", "192.0.2.77:0", "--io", "mmsg"]);
    assert!(err.contains("not configured on this host"), "{err}");
    let err = run_fail(&["--shards", "zero", "--demo"]);
    assert!(err.contains("shard count"), "{err}");
    let err = run_fail(&["--config", "/nonexistent/dynauthd.toml"]);
    assert!(err.contains("cannot read config file"), "{err}");
}

#[test]
fn help_lists_the_contract() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--listen",
        "--client",
        "--nas-identifier",
        "--nas-ip",
        "--nas-ipv6",
        "--sessions",
        "--shards",
        "--cpus",
        "--io",
        "--batch",
        "--demo",
        "check-config",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}: {help}");
    }
}

/// Flags override the file: the file's listen address is replaced by --listen, and --client
/// adds a client next to the file's.
#[test]
fn flags_override_the_file() {
    let path = temp_path("override.toml");
    std::fs::write(
        &path,
        "listen = [\"127.0.0.1:1\"]\nio = \"uring\"\nshards = 2\n[[client]]\nnetwork = \"10.9.0.0/16\"\nsecret = \"file-secret\"\n",
    )
    .unwrap();
    let d = start_ok(&[
        "--config",
        path.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--io",
        "mmsg",
        "--shards",
        "1",
        "--client",
        "127.0.0.1=flag-secret",
    ]);
    assert!(
        d.banner.contains("io=recvmmsg/sendmmsg shards=1"),
        "{}",
        d.banner
    );
    let secret = dynauth_proto::auth::Secret::new("flag-secret").unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let req = request(40, 1, &[(44, b"x")], true, &secret);
    let (answer, _) =
        exchange(&sock, d.addr(), &req, std::time::Duration::from_secs(3)).expect("answered");
    assert_eq!(check_answer(&answer, &req, &secret).1, Some(503));
    let (_, err) = d.stop();
    assert!(err.contains("2 client(s)"), "{err}");
}

#[test]
fn bad_session_file_names_the_line() {
    let path = temp_path("bad-sessions.jsonl");
    std::fs::write(
        &path,
        "{\"acct_session_id\":\"a\"}\n\n{\"acct_session_id\": 5}\n",
    )
    .unwrap();
    let err = run_fail(&[
        "--demo",
        "--listen",
        "127.0.0.1:0",
        "--sessions",
        path.to_str().unwrap(),
    ]);
    assert!(err.contains("line 3: field `acct_session_id`"), "{err}");
    assert!(err.contains("nothing was"), "all or nothing: {err}");
}

/// `--io auto` takes recvmmsg/sendmmsg, the backend measured faster (issue 13), and says
/// why; where io_uring is refused, `--io uring` fails with what to do. (The refusal is
/// simulated with DYNAUTH_DISABLE_URING.)
#[test]
fn io_auto_takes_the_faster_backend_and_io_uring_refusal_says_what_to_do() {
    let out = Command::new(BIN)
        .args(["--demo", "--listen", "127.0.0.1:0", "--io", "uring"])
        .env("DYNAUTH_DISABLE_URING", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("io_uring was requested but is not available") && err.contains("--io mmsg"),
        "{err}"
    );

    let mut child = std::process::Command::new(BIN)
        .args([
            "--demo",
            "--listen",
            "127.0.0.1:0",
            "--io",
            "auto",
            "--shards",
            "1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert!(line.contains("io=recvmmsg/sendmmsg"), "{line}");
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--io auto: the faster backend, with UDP GSO and pipelined commits"),
        "{err}"
    );
}
