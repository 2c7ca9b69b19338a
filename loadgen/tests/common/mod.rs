//! Loopback targets for the integration tests: a DAS built from `dynauth_proto::Engine` and
//! `MemoryStore` on a UDP socket in a thread (with a hook that can corrupt or drop answers),
//! and a slow echo responder.
#![forbid(unsafe_code)]
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dynauth_proto::auth::Secret;
use dynauth_proto::client::{Cidr, Client, ClientTable};
use dynauth_proto::store::MemoryStore;
use dynauth_proto::{Engine, EngineConfig, Now, Outcome, synth};

pub const SECRET: &str = "loadgen-test-secret";

/// What a target thread saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub received: AtomicU64,
    pub answered: AtomicU64,
}

/// A hook on every answer: gets the request and the answer, may change the answer; returns
/// false to drop it.
pub type Hook = Box<dyn FnMut(&[u8], &mut Vec<u8>) -> bool + Send>;

pub struct Target {
    pub addr: SocketAddr,
    pub store: Arc<MemoryStore>,
    pub seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Target {
    pub fn stop(mut self) -> Arc<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        Arc::clone(&self.seen)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An engine (and its store) with the first `sessions` synthetic sessions of seed 1, answering the client
/// 127.0.0.1 with [`SECRET`].
fn das_engine(sessions: u64) -> (Engine, Arc<MemoryStore>) {
    let store = Arc::new(MemoryStore::with_sessions(synth::sessions(1, sessions)));
    let client = Client::new(
        Cidr::host(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        Secret::new(SECRET).unwrap(),
    );
    let config = EngineConfig {
        clients: ClientTable::new([client]).unwrap(),
        ..EngineConfig::default()
    };
    let engine = Engine::new(
        Arc::new(config),
        Arc::clone(&store) as Arc<dyn dynauth_proto::SessionStore>,
    );
    (engine, store)
}

/// A DAS on 127.0.0.1 with the first `sessions` synthetic sessions of seed 1, answering the
/// client 127.0.0.1 with [`SECRET`]; `hook` sees every answer before it leaves.
pub fn engine_target(sessions: u64, mut hook: Hook) -> Target {
    let (mut engine, store) = das_engine(sessions);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let addr = socket.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Seen::default());
    let thread = {
        let stop = Arc::clone(&stop);
        let seen = Arc::clone(&seen);
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let mut buf = [0u8; 4096];
            let mut out = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                seen.received.fetch_add(1, Ordering::Relaxed);
                let now = Now {
                    unix_secs: SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap()
                        .as_secs(),
                    monotonic_ms: started.elapsed().as_millis() as u64 + 1,
                };
                let len = match engine.handle(&buf[..n], from, addr, now, &mut out) {
                    Outcome::Answer(a) => a.len,
                    Outcome::Replay { len } => len,
                    Outcome::Discard(_) | Outcome::Pending => continue,
                };
                let mut answer = out[..len].to_vec();
                if hook(&buf[..n], &mut answer) {
                    seen.answered.fetch_add(1, Ordering::Relaxed);
                    let _ = socket.send_to(&answer, from);
                }
            }
        })
    };
    Target {
        addr,
        store,
        seen,
        stop,
        thread: Some(thread),
    }
}

/// What [`delayed_engine_target`] saw, beyond [`Seen`].
#[derive(Debug, Default)]
pub struct DelaySeen {
    /// Answers held back on purpose.
    pub delayed: AtomicU64,
    /// Delayed answers sent while a newer request with the same Identifier, received less
    /// than `outstanding_for` earlier, was still unanswered: the moment a generator matching
    /// by Identifier alone would pin the late answer on the wrong request.
    pub landed_on_reused_id: AtomicU64,
}

/// A DAS like [`engine_target`] whose answers leave after `delay(n)` (n: the request's
/// number, from 0). A request is considered outstanding at the generator for
/// `outstanding_for` after it arrived (its timeout), for counting `landed_on_reused_id`.
pub fn delayed_engine_target(
    sessions: u64,
    mut delay: impl FnMut(u64) -> Duration + Send + 'static,
    outstanding_for: Duration,
) -> (SocketAddr, Arc<DelaySeen>, Arc<AtomicBool>, JoinHandle<()>) {
    let (mut engine, _store) = das_engine(sessions);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_micros(500)))
        .unwrap();
    let addr = socket.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(DelaySeen::default());
    let handle = {
        let stop = Arc::clone(&stop);
        let seen = Arc::clone(&seen);
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let mut buf = [0u8; 4096];
            let mut out = [0u8; 4096];
            let mut n = 0u64;
            // (due, arrived, Identifier, answer, to): answers waiting to leave.
            let mut queue: Vec<(Instant, Instant, u8, Vec<u8>, SocketAddr)> = Vec::new();
            // Identifier -> when its newest request arrived, and whether it is answered.
            let mut newest: HashMap<u8, (Instant, bool)> = HashMap::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok((len, from)) = socket.recv_from(&mut buf) {
                    let arrived = Instant::now();
                    let now = Now {
                        unix_secs: SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .unwrap()
                            .as_secs(),
                        monotonic_ms: started.elapsed().as_millis() as u64 + 1,
                    };
                    let answer_len = match engine.handle(&buf[..len], from, addr, now, &mut out) {
                        Outcome::Answer(a) => Some(a.len),
                        Outcome::Replay { len } => Some(len),
                        Outcome::Discard(_) | Outcome::Pending => None,
                    };
                    let id = buf[1];
                    newest.insert(id, (arrived, false));
                    if let Some(answer_len) = answer_len {
                        let d = delay(n);
                        if !d.is_zero() {
                            seen.delayed.fetch_add(1, Ordering::Relaxed);
                        }
                        queue.push((arrived + d, arrived, id, out[..answer_len].to_vec(), from));
                    }
                    n += 1;
                }
                let now = Instant::now();
                let mut i = 0;
                while i < queue.len() {
                    if queue[i].0 > now {
                        i += 1;
                        continue;
                    }
                    let (_, arrived, id, answer, to) = queue.swap_remove(i);
                    if let Some((newest_at, answered)) = newest.get_mut(&id) {
                        if *newest_at == arrived {
                            *answered = true;
                        } else if !*answered && now.duration_since(*newest_at) < outstanding_for {
                            seen.landed_on_reused_id.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    let _ = socket.send_to(&answer, to);
                }
            }
        })
    };
    (addr, seen, stop, handle)
}

/// A hook that answers at most `rate` requests per second and drops the rest: a token
/// bucket of `burst` tokens (full at the start and after idle time), refilled at `rate`.
/// Below the rate nothing is lost (a stall shorter than `burst / rate` included); above it,
/// about `1 - rate / offered` is, once the burst is spent.
pub fn rate_limit(rate: f64, burst: f64) -> Hook {
    let mut tokens = burst;
    let mut last = Instant::now();
    Box::new(move |_, _| {
        let now = Instant::now();
        tokens = (tokens + now.duration_since(last).as_secs_f64() * rate).min(burst);
        last = now;
        if tokens >= 1.0 {
            tokens -= 1.0;
            true
        } else {
            false
        }
    })
}

/// A hook that sends every answer unchanged.
pub fn untouched() -> Hook {
    Box::new(|_, _| true)
}

/// An echo responder that sleeps `delay` before answering each datagram (one at a time, so
/// requests queue behind each other like at a saturated server).
pub fn slow_echo(delay: Duration) -> (SocketAddr, Arc<AtomicBool>, JoinHandle<()>) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let addr = socket.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let handle = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
                let _ = socket.send_to(&buf[..n], from);
            }
        })
    };
    (addr, stop, handle)
}

/// An echo responder that stalls `stall` on the first datagram (a server pause: GC, a lock,
/// a full queue), then echoes everything immediately.
pub fn stalling_echo(stall: Duration) -> (SocketAddr, Arc<AtomicBool>, JoinHandle<()>) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let addr = socket.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let handle = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut first = true;
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if first {
                    std::thread::sleep(stall);
                    first = false;
                }
                let _ = socket.send_to(&buf[..n], from);
            }
        })
    };
    (addr, stop, handle)
}

/// The environment variable that [`loadgen_binary`] puts [`SECRET`] in (for
/// `--secret-env`).
pub const SECRET_ENV: &str = "LOADGEN_TEST_SECRET";

/// Runs the `loadgen` binary with `args`, [`SECRET`] in [`SECRET_ENV`], to the end.
pub fn loadgen_binary<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .env(SECRET_ENV, SECRET)
        .output()
        .unwrap()
}

/// Parses loadgen flags, pointing at `target` from 127.0.0.1 with the test secret.
pub fn args(target: SocketAddr, extra: &[&str]) -> dynauth_loadgen::RunArgs {
    let mut v = vec![
        "--target".to_string(),
        target.to_string(),
        "--bind".into(),
        "127.0.0.1".into(),
        "--secret".into(),
        SECRET.into(),
        "--quiet".into(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    dynauth_loadgen::RunArgs::from_args(v).unwrap()
}
