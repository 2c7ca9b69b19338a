//! Shared helpers for the tests that run the real `dynauthd` binary on loopback.
#![allow(dead_code)]

use std::io::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use dynauth_proto::auth::{self, Secret};
use dynauth_proto::codec::{Packet, PacketWriter};

pub const BIN: &str = env!("CARGO_BIN_EXE_dynauthd");

/// A running dynauthd; killed when dropped.
pub struct Daemon {
    child: Option<Child>,
    pub addrs: Vec<SocketAddr>,
    pub banner: String,
    stdout: mpsc::Receiver<String>,
    stderr: std::thread::JoinHandle<String>,
}

/// How a start ended.
pub enum Started {
    Running(Daemon),
    /// The process exited before listening; its stderr.
    Failed(String),
}

pub fn start(args: &[&str]) -> Started {
    start_env(args, &[])
}

/// [`start`] with more environment variables (e.g. NOTIFY_SOCKET).
pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Started {
    let mut command = Command::new(BIN);
    command.args(args).envs(env.iter().copied());
    start_command(command)
}

/// Starts `command` (dynauthd, or a shell that execs it with limits set) and waits for its
/// banner, as [`start`].
pub fn start_command(mut command: Command) -> Started {
    let mut child = command
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dynauthd");
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(line) if line.starts_with("dynauthd listening ") => {
            let addrs = line
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            Started::Running(Daemon {
                child: Some(child),
                addrs,
                banner: line,
                stdout: rx,
                stderr,
            })
        }
        other => {
            let _ = child.kill();
            let _ = child.wait();
            let err = stderr.join().unwrap_or_default();
            Started::Failed(format!("{other:?}\n{err}"))
        }
    }
}

pub fn start_ok(args: &[&str]) -> Daemon {
    match start(args) {
        Started::Running(d) => d,
        Started::Failed(e) => panic!("dynauthd did not start: {e}"),
    }
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// An address the banner names as `key=ADDR` (`metrics`, `accounting`).
    pub fn banner_addr(&self, key: &str) -> SocketAddr {
        let prefix = format!("{key}=");
        self.banner
            .split_whitespace()
            .find_map(|w| w.strip_prefix(prefix.as_str())?.parse().ok())
            .unwrap_or_else(|| panic!("the banner names {key}: {}", self.banner))
    }

    /// Sends `signal` (e.g. `-HUP`) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(signal)
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal}");
    }

    /// Waits (at most `limit`) for the process to exit by itself; its status, the rest of
    /// stdout and stderr. Panics (after killing it) when it does not exit in time.
    pub fn wait_exit(mut self, limit: Duration) -> (std::process::ExitStatus, String, String) {
        let mut child = self.child.take().unwrap();
        let deadline = std::time::Instant::now() + limit;
        let status = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("dynauthd did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut out = String::new();
        while let Ok(line) = self.stdout.recv_timeout(Duration::from_secs(2)) {
            out.push_str(&line);
            out.push('\n');
        }
        let err = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new))
            .join()
            .unwrap_or_default();
        (status, out, err)
    }

    /// SIGTERM, wait (bounded), and return the rest of stdout (the totals line) and stderr.
    pub fn stop(self) -> (String, String) {
        self.signal("-TERM");
        let (status, out, err) = self.wait_exit(Duration::from_secs(10));
        assert!(status.success(), "dynauthd exited with {status}:\n{err}");
        (out, err)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A unique temporary path for this test process.
pub fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dynauthd-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// dynauthd on 127.0.0.1 (one mmsg shard) for client 127.0.0.1 with `secret`, with a control
/// socket at `temp_path(socket)`, plus `extra` flags.
pub fn start_with_control(socket: &str, secret: &str, extra: &[&str]) -> (Daemon, PathBuf) {
    let path = temp_path(socket);
    let _ = std::fs::remove_file(&path);
    let client = format!("127.0.0.1/32={secret}");
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--client",
        &client,
        "--io",
        "mmsg",
        "--shards",
        "1",
        "--control",
        path.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let d = start_ok(&args);
    assert!(
        d.banner.contains(&format!("control={}", path.display())),
        "{}",
        d.banner
    );
    (d, path)
}

/// A signed request: Message-Authenticator first when asked, then `attrs` in order.
pub fn request(code: u8, id: u8, attrs: &[(u8, &[u8])], with_ma: bool, secret: &Secret) -> Vec<u8> {
    let mut buf = [0u8; 4096];
    let mut w = PacketWriter::new(&mut buf, code, id, &[0; 16]).unwrap();
    let ma = with_ma.then(|| w.push(80, &[0; 16]).unwrap());
    for (ty, value) in attrs {
        w.push(*ty, value).unwrap();
    }
    let packet = w.finish();
    auth::sign_request(packet, ma, secret);
    packet.to_vec()
}

/// Sends `req` and waits for one answer (bounded); None on timeout.
pub fn exchange(
    sock: &UdpSocket,
    to: SocketAddr,
    req: &[u8],
    wait: Duration,
) -> Option<(Vec<u8>, SocketAddr)> {
    sock.set_read_timeout(Some(wait)).unwrap();
    sock.send_to(req, to).unwrap();
    let mut buf = [0u8; 4096];
    match sock.recv_from(&mut buf) {
        Ok((n, from)) => Some((buf[..n].to_vec(), from)),
        Err(_) => None,
    }
}

/// The answer's checks every test wants: parses, same Identifier, authenticators valid.
/// Returns (code, Error-Cause, Proxy-State values).
pub fn check_answer(answer: &[u8], req: &[u8], secret: &Secret) -> (u8, Option<u32>, Vec<Vec<u8>>) {
    let a = Packet::parse(answer).expect("answer parses");
    let r = Packet::parse(req).unwrap();
    assert_eq!(a.identifier(), r.identifier(), "answer Identifier");
    assert_eq!(
        auth::verify_response(&a, r.authenticator(), secret),
        auth::ResponseCheck::Valid,
        "answer authenticators"
    );
    let mut cause = None;
    let mut proxy = Vec::new();
    let mut first = true;
    for attr in a.attributes() {
        let attr = attr.unwrap();
        if first {
            assert_eq!(attr.ty, 80, "Message-Authenticator comes first");
            first = false;
        }
        match attr.ty {
            101 => cause = Some(u32::from_be_bytes(attr.value.try_into().unwrap())),
            33 => proxy.push(attr.value.to_vec()),
            _ => {}
        }
    }
    (a.code(), cause, proxy)
}

/// Writes `n` synthetic sessions (seed 9) as JSON Lines; returns the path.
pub fn sessions_file(name: &str, n: u64) -> PathBuf {
    let path = temp_path(name);
    let mut text = String::new();
    for s in dynauth_proto::synth::sessions(9, n) {
        text.push_str(&serde_json::to_string(&s).unwrap());
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    path
}

pub fn radclient() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("radclient"))
            .find(|p| p.is_file())
    })
}

/// Runs FreeRADIUS's radclient once (one try, 2 s timeout) with `attrs` on stdin and returns
/// everything it printed. `kind` is `disconnect`, `coa` or `acct`. Panics with the install
/// hint when radclient is missing (callers that may skip check [`radclient`] first).
pub fn run_radclient(server: SocketAddr, kind: &str, secret: &str, attrs: &str) -> String {
    let bin = radclient()
        .expect("radclient not found: apt-get install freeradius-utils (.ci/run installs it)");
    let mut child = Command::new(bin)
        .args(["-x", "-r", "1", "-t", "2"])
        .arg(server.to_string())
        .arg(kind)
        .arg(secret)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn radclient");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(attrs.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One HTTP/1.0 GET of `/metrics` from `--metrics ADDR`; the whole response.
pub fn scrape(metrics: SocketAddr) -> String {
    let mut http = std::net::TcpStream::connect(metrics).unwrap();
    http.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    http.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    http.read_to_string(&mut body).unwrap();
    body
}

/// A Disconnect-Request (no Message-Authenticator) with `attrs` to `to`, signed with `secret`;
/// the checked answer's (code, Error-Cause).
pub fn disconnect(
    to: SocketAddr,
    secret: &str,
    id: u8,
    attrs: &[(u8, &[u8])],
) -> (u8, Option<u32>) {
    let secret = Secret::new(secret).unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let req = request(40, id, attrs, false, &secret);
    let (answer, _) = exchange(&sock, to, &req, Duration::from_secs(5)).expect("an answer");
    let (code, cause, _) = check_answer(&answer, &req, &secret);
    (code, cause)
}

/// A control-socket client (docs/CONTROL.md): one request line, one reply line.
pub struct Agent {
    writer: std::os::unix::net::UnixStream,
    reader: BufReader<std::os::unix::net::UnixStream>,
}

impl Agent {
    pub fn connect(path: &std::path::Path) -> Agent {
        let stream =
            std::os::unix::net::UnixStream::connect(path).expect("connect to the control socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Agent {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        }
    }

    pub fn send_line(&mut self, line: &str) -> serde_json::Value {
        writeln!(self.writer, "{line}").unwrap();
        let mut reply = String::new();
        self.reader.read_line(&mut reply).expect("a reply line");
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?} is JSON: {e}"))
    }

    pub fn send(&mut self, message: serde_json::Value) -> serde_json::Value {
        self.send_line(&message.to_string())
    }

    /// The reply, or None when the server is gone (it was killed).
    pub fn try_send(&mut self, message: &serde_json::Value) -> Option<serde_json::Value> {
        writeln!(self.writer, "{message}").ok()?;
        let mut reply = String::new();
        match self.reader.read_line(&mut reply) {
            Ok(n) if n > 0 => serde_json::from_str(&reply).ok(),
            _ => None,
        }
    }

    pub fn ok(&mut self, message: serde_json::Value) -> serde_json::Value {
        let reply = self.send(message.clone());
        assert_eq!(reply["ok"], serde_json::json!(true), "{message} -> {reply}");
        reply["result"].clone()
    }
}

/// A private redis-server on a free loopback port (no persistence); killed when dropped.
/// For the affinity tests (owners publishing) and the router tests (routers reading).
pub struct Redis {
    child: Option<Child>,
    port: u16,
}

impl Redis {
    /// Starts one on a free loopback port; returns once it answers PING (bounded).
    pub fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        Redis::start_on(port)
    }

    /// Starts one on `port` (a restart after `kill`: the same address, an empty store).
    pub fn start_on(port: u16) -> Redis {
        let dir = temp_path(&format!("redis-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", dir.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found: apt-get install redis-server");
        let mut redis = Redis {
            child: Some(child),
            port,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while redis.try_cli(&["PING"]).as_deref() != Some("PONG") {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server on port {port} did not answer PING within 10 s"
            );
            if let Some(c) = redis.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("redis-server on port {port} exited with {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `redis-cli --raw` with `args`: its stdout without the final newline (one line per
    /// element of an array reply). Panics when redis-cli fails.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|| panic!("redis-cli {args:?} on port {} failed", self.port))
    }

    /// The lines of `cli(args)`, sorted (HKEYS, KEYS, SMEMBERS).
    pub fn lines(&self, args: &[&str]) -> Vec<String> {
        let mut l: Vec<String> = self.cli(args).lines().map(str::to_owned).collect();
        l.sort();
        l
    }

    fn try_cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "--raw"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
        (out.status.success() && !text.starts_with("Could not connect")).then_some(text)
    }

    /// A connection of the redis crate (binary-safe commands, SUBSCRIBE).
    pub fn connection(&self) -> redis::Connection {
        let c = redis::Client::open(self.url()).unwrap();
        let con = c
            .get_connection_with_timeout(Duration::from_secs(5))
            .expect("connect to the test redis-server");
        con.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        con
    }

    /// SIGSTOP: Redis hangs (connections open, nothing answered) until `resume`.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after `pause`.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let ok = Command::new("kill")
                .arg(sig)
                .arg(c.id().to_string())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill {sig} redis-server");
        }
    }

    /// SIGKILL (an outage); `start_on(self.port())` brings an empty one back.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        // A paused one would not die of SIGKILL any slower, but resume it for tidiness.
        self.resume();
        self.kill();
    }
}

/// Polls `f` every 20 ms until it holds; panics with `what` after `within`.
pub fn wait_until(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
