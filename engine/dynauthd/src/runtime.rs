//! The shard-per-core runtime: one pinned thread per shard, each with its own SO_REUSEPORT
//! socket per listen address, its own I/O backend and its own [`Engine`] (so its own
//! duplicate cache: the kernel sends one source address and port to one socket), all sharing
//! one session store. A stats line every few seconds; graceful shutdown on request.
//!
//! Owns: backend choice (probe, `auto`), CPU and shard layout, binding (with the errors an
//! operator can act on), the stats line and the totals. Must not touch: `unsafe` (that is
//! `sys`), decisions (the engine), configuration parsing (`config`).
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::actions::{Delivery, ShardLink, ShardNotice, ShardSends};
use crate::config::{IoChoice, Settings, Shards};
use arc_swap::ArcSwap;
use crossbeam::channel::Receiver;
use dynauth_proto::action::ActionSink;
use dynauth_proto::counters::{Counters, Discard, LatencyHistogram, RequestKind};
use dynauth_proto::dedup::DedupStats;
use dynauth_proto::dict::ErrorCause;
use dynauth_proto::store::SessionStore;
use dynauth_proto::{Engine, EngineConfig, Now, Outcome};
use dynauth_udp::AnswerBatch;
use dynauth_udp::{Backend, Batch, BufferSizes, Handler, IoStats, Listener};

/// A start-up failure, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "cannot listen on {addr}: the address is already in use (another dynauthd, or a DAS such \
         as FreeRADIUS, holds it): stop that process or choose another --listen"
    )]
    AddressInUse { addr: SocketAddr },
    #[error(
        "cannot listen on {addr}: permission denied: ports below 1024 need root or \
         CAP_NET_BIND_SERVICE (setcap cap_net_bind_service=+ep dynauthd), or use port 3799"
    )]
    PermissionDenied { addr: SocketAddr },
    #[error(
        "cannot listen on {addr}: the address is not configured on this host: check `ip addr` \
         or listen on 0.0.0.0 / [::]"
    )]
    AddressNotAvailable { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no such CPU {cpu}: this process may use CPUs {available}; fix --cpus (or `cpus` in the config file)"
    )]
    NoSuchCpu { cpu: usize, available: String },
    #[error(
        "io_uring was requested but is not available: {0}; run with --io mmsg, or --io auto to fall back by itself"
    )]
    UringRefused(String),
    #[error("shard {shard} could not start: {message}")]
    Shard { shard: usize, message: String },
}

/// The backend the runtime chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    Uring,
    Mmsg,
}

impl IoKind {
    pub fn name(self) -> &'static str {
        match self {
            IoKind::Uring => "io_uring",
            IoKind::Mmsg => "recvmmsg/sendmmsg",
        }
    }
}

/// Picks the backend: `auto` takes recvmmsg/sendmmsg (the one measured faster) and says why;
/// `uring` asks for io_uring and is refused with what to do where the probe fails.
pub fn choose_backend(choice: IoChoice) -> Result<IoKind, StartError> {
    match choice {
        IoChoice::Mmsg => Ok(IoKind::Mmsg),
        IoChoice::Uring => dynauth_udp::probe_uring()
            .map(|()| IoKind::Uring)
            .map_err(|e| StartError::UringRefused(e.0)),
        // Measured side by side (docs/BENCHMARKS.md, "Side by side"): recvmmsg/sendmmsg
        // with UDP GSO answers 1.3x what io_uring does on one shard, at 0.74x its CPU per
        // answer, and only it holds a durable batch's answers while the next is decided
        // (pipelined group commit). So `auto` takes it, on every kernel.
        IoChoice::Auto => {
            tracing::info!(
                "io backend: recvmmsg/sendmmsg (--io auto: the faster backend, with UDP GSO \
                 and pipelined commits; --io uring to choose io_uring)"
            );
            Ok(IoKind::Mmsg)
        }
    }
}

/// The configuration the shards run with: replaced whole by a reload, picked up by each
/// shard at the start of its next batch.
pub type SharedConfig = Arc<ArcSwap<EngineConfig>>;

/// What a shard publishes for the stats line.
#[derive(Debug, Clone, Default)]
pub struct ShardReport {
    /// The configuration whose client list indexes `counters.per_client`.
    pub config: Option<Arc<EngineConfig>>,
    pub counters: Counters,
    pub io: IoStats,
    pub dedup: DedupStats,
    /// Time to decide a datagram (SPEC §10 latency histogram): each batch's decision time
    /// (touches, MD5 lanes, decisions, signatures) shared evenly among its datagrams.
    pub decision_latency: LatencyHistogram,
    /// Requests shed under overload (`crate::overload`).
    pub shed: crate::overload::ShedStats,
}

/// Every shard's reports summed.
#[derive(Debug, Clone, Default)]
pub struct Totals {
    pub counters: Counters,
    pub io: IoStats,
    pub dedup: DedupStats,
    pub decision_latency: LatencyHistogram,
    pub shed: crate::overload::ShedStats,
    /// Shards that stopped on their own (a panic): the server then shuts down.
    pub failed_shards: usize,
}

impl Totals {
    fn add(&mut self, r: &ShardReport) {
        self.counters.merge(&r.counters);
        self.io.add(&r.io);
        self.dedup.stored += r.dedup.stored;
        self.dedup.expired += r.dedup.expired;
        self.dedup.evicted_early += r.dedup.evicted_early;
        self.dedup.too_large += r.dedup.too_large;
        self.dedup.in_flight_full += r.dedup.in_flight_full;
        self.decision_latency.merge(&r.decision_latency);
        self.shed.add(&r.shed);
    }

    /// One line: answers, NAKs by Error-Cause, discards by reason, kernel drops.
    pub fn summary(&self) -> String {
        let t = self.counters.totals();
        let acks: u64 = t.acks.iter().sum();
        let mut naks = String::new();
        let mut nak_total = 0;
        for cause in ErrorCause::ALL {
            let n = t.nak(RequestKind::Disconnect, cause) + t.nak(RequestKind::Coa, cause);
            if n > 0 {
                nak_total += n;
                let _ = write!(
                    naks,
                    "{}{}:{}",
                    if naks.is_empty() { "" } else { " " },
                    cause.value(),
                    n
                );
            }
        }
        let mut discards = String::new();
        let mut discard_total = self.counters.unknown_client;
        if self.counters.unknown_client > 0 {
            let _ = write!(discards, "unknown_client:{}", self.counters.unknown_client);
        }
        for d in Discard::ALL {
            let n = t.discarded(d);
            if n > 0 {
                discard_total += n;
                let _ = write!(
                    discards,
                    "{}{}:{}",
                    if discards.is_empty() { "" } else { " " },
                    d.name(),
                    n
                );
            }
        }
        let dups: u64 = t.duplicates.iter().sum();
        let bound = |q| match self.decision_latency.quantile_bound_ns(q) {
            Some(ns) => format!("<={}us", ns / 1000),
            None if self.decision_latency.count == 0 => "-".to_string(),
            None => ">100ms".to_string(),
        };
        format!(
            "received {} ack {} nak {} [{}] duplicates {} discards {} [{}] shed {} kernel_drops {} send_errors {} out_of_buffers {} gso_messages {} decision p50 {} p99 {}",
            self.io.received,
            acks,
            nak_total,
            naks,
            dups,
            discard_total,
            discards,
            self.shed.nak + self.shed.drop,
            self.io.kernel_drops,
            self.io.send_errors,
            self.io.out_of_buffers,
            self.io.gso_messages,
            bound(0.5),
            bound(0.99),
        )
    }
}

struct ShardHandler {
    engine: Engine,
    now: Now,
    base: Instant,
    decision_latency: LatencyHistogram,
    /// Answers to this shard's pending requests, settled by the action dispatcher.
    settled: Option<SettledQueue>,
    /// The current configuration (a reload stores a new one).
    config: SharedConfig,
    /// The one `engine` runs with (published with the counters it indexes).
    current: Arc<EngineConfig>,
    /// Where answers are audited (`--audit-log`); `None`: nothing is built per packet.
    audit: Option<Arc<crate::audit::AuditLog>>,
    /// Sheds requests that waited too long (`--shed-after`), before the engine sees them.
    shedder: crate::overload::Shedder,
    /// The journal points the backend's held batches wait for, oldest first (at most two:
    /// the held batch and the one being decided; allocated once).
    held: std::collections::VecDeque<crate::state::Durability>,
    /// Settled answers this shard could not send (counted with the backend's send errors),
    /// and those it sent.
    late_send_errors: u64,
    late_sent: u64,
    /// This batch's answers left for `Engine::seal_batch` (their positions in the batch).
    sealed_later: Vec<usize>,
}

/// The shard's side of the dispatcher's deliveries.
struct SettledQueue {
    notices: Receiver<ShardNotice>,
    /// `Some`: this shard sends the answers it is handed (`late`), woken by the dispatcher.
    sends: Option<Arc<ShardSends>>,
    late: Option<(dynauth_udp::AnswerSender, AnswerBatch)>,
}

impl ShardHandler {
    /// Records every answer the dispatcher settled since the last call (duplicate cache,
    /// counters), before any datagram is decided, so a retransmission of a settled request
    /// is answered from the cache; then sends those the shard was handed, in one
    /// `sendmmsg`, after their cache entries exist.
    fn take_settled(&mut self) {
        let Some(q) = &mut self.settled else {
            return;
        };
        while let Ok(notice) = q.notices.try_recv() {
            match notice {
                ShardNotice::Answered(s) => {
                    self.engine
                        .settle(&s.settled, &s.bytes, self.now.monotonic_ms);
                    if let Some((sender, batch)) = &mut q.late
                        && let Err(e) =
                            batch.push(sender, &s.bytes, s.settled.source, s.settled.destination)
                    {
                        self.late_send_errors += 1;
                        tracing::warn!("answer to {} not sent: {e}", s.settled.source);
                    }
                }
                ShardNotice::Abandoned(a) => self.engine.abandon(&a),
            }
        }
        if let Some((sender, batch)) = &mut q.late
            && !batch.is_empty()
        {
            let flushed = batch.flush(sender);
            self.late_send_errors += flushed.failed as u64;
            self.late_sent += flushed.sent as u64;
        }
    }

    /// The shard stops: the dispatcher sends answers from now on; what it handed over
    /// before is sent here.
    fn close_settled(&mut self) {
        if let Some(sends) = self.settled.as_ref().and_then(|q| q.sends.as_ref()) {
            sends.close();
        }
        self.take_settled();
    }
}

/// The shards' clock: wall-clock seconds and monotonic milliseconds since `base`.
pub fn clock(base: Instant) -> Now {
    Now {
        unix_secs: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        monotonic_ms: base.elapsed().as_millis() as u64,
    }
}

/// The smallest batch worth the two touch passes (below it there are few misses to overlap).
const TOUCH_BATCH_MIN: usize = 4;

impl Handler for ShardHandler {
    fn batch(&mut self, batch: &mut Batch<'_, '_>) {
        // One clock read per batch for the decisions, and one for the batch's timing.
        self.now = clock(self.base);
        let batch_started = Instant::now();
        // A reload between batches: the whole batch runs with one configuration (a load and
        // a pointer comparison when nothing changed).
        if !Arc::ptr_eq(&self.current, &*self.config.load()) {
            self.current = self.config.load_full();
            self.engine.set_config(Arc::clone(&self.current));
        }
        self.take_settled();
        // With a state directory, the store's changes of the whole batch are covered by one
        // journal point, and none of the batch's answers leaves before it is durable
        // (durable before acknowledged, docs/DURABILITY.md). The backend holds the answers
        // while this shard decides the next batch, so the fsync runs beside the decisions
        // instead of in front of them ("Pipelined group commit").
        // Two passes of hints before any decision: every request's index entry, then every
        // request's record, so that a storm's cache misses overlap across the batch instead
        // of stalling each decision in turn (docs/BENCHMARKS.md, "Batch touches").
        let together = batch.len() >= TOUCH_BATCH_MIN;
        if together {
            self.engine
                .touch_batch(batch.datagrams().iter().map(|d| d.data));
            // The batch's MD5s four at a time: the Request Authenticators now, the answers'
            // signatures after the decisions (`Engine::begin_batch`).
            self.engine
                .begin_batch(batch.datagrams().iter().map(|d| (d.data, d.source)));
        }
        self.sealed_later.clear();
        let scope = crate::state::defer_commits();
        self.shedder.start_batch(batch_started);
        let mut answered = false;
        let mut decided = 0u64;
        for (i, (d, answer)) in batch.iter_mut().enumerate() {
            // RFC 5176 §3.5 under overload: a request that waited past --shed-after is shed
            // here, before the engine or the store sees it (docs/RUNNING.md, "Overload").
            let started = if self.shedder.needs_clock() {
                Instant::now()
            } else {
                batch_started
            };
            let shed = self.shedder.should_shed(d, started);
            if shed && self.shedder.action == crate::overload::ShedAction::Drop {
                continue;
            }
            let outcome = if shed {
                self.engine
                    .shed(d.data, d.source, d.destination, self.now, answer.buffer())
            } else {
                self.engine
                    .handle(d.data, d.source, d.destination, self.now, answer.buffer())
            };
            decided += 1;
            match outcome {
                Outcome::Discard(_) | Outcome::Pending => {}
                Outcome::Answer(a) => {
                    if let Some(audit) = &self.audit {
                        audit.radius_answer(d.data, d.source, &a);
                    }
                    if a.sealed_later {
                        self.sealed_later.push(i);
                    }
                    answered = true;
                    answer.send(a.len)
                }
                Outcome::Replay { len } => {
                    answered = true;
                    answer.send(len)
                }
            }
        }
        self.shedder.end_batch();
        if together {
            self.engine.seal_batch();
            let mut next = self.sealed_later.iter().copied().peekable();
            for (i, (_, answer)) in batch.iter_mut().enumerate() {
                if next.next_if_eq(&i).is_some() && !self.engine.write_sealed(answer.buffer()) {
                    // Never reached while the engine and this loop agree; an answer
                    // without its signatures must not leave all the same.
                    tracing::error!("an answer of this batch was not signed: not sent");
                    answer.cancel();
                }
            }
        }
        // The batch's time (touches, the MD5 lanes, the decisions, the signatures) shared
        // evenly among the datagrams it decided: two clock reads per batch, not per datagram.
        let ns = u64::try_from(batch_started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if let Some(each) = ns.checked_div(decided) {
            self.decision_latency.record_n(each, decided);
        }
        // A batch without answers shows nobody anything: nothing to wait for.
        if let Some(durability) = scope.detach()
            && answered
        {
            if batch.hold() {
                self.held.push_back(durability);
            } else {
                durability.wait();
            }
        }
    }

    fn release_held(&mut self) {
        if let Some(durability) = self.held.pop_front() {
            durability.wait();
        }
    }

    fn held_ready(&mut self) -> bool {
        self.held.front().is_none_or(|d| d.is_durable())
    }
}

fn bind_error(addr: SocketAddr, e: std::io::Error) -> StartError {
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) => StartError::AddressInUse { addr },
        Some(libc::EACCES) => StartError::PermissionDenied { addr },
        Some(libc::EADDRNOTAVAIL) => StartError::AddressNotAvailable { addr },
        _ => StartError::Bind { addr, source: e },
    }
}

/// Whether something else already holds `addr`: a bind without SO_REUSEPORT fails then (our
/// own sockets use SO_REUSEPORT, which would otherwise silently share the port with another
/// dynauthd of the same user).
fn check_free(addr: SocketAddr) -> Result<(), StartError> {
    if addr.port() == 0 {
        return Ok(());
    }
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(|e| bind_error(addr, e))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true).map_err(|e| bind_error(addr, e))?;
    }
    socket.bind(&addr.into()).map_err(|e| bind_error(addr, e))
}

/// The CPUs shards are pinned to, in order (`None`: the platform cannot pin).
fn resolve_cpus(settings: &Settings) -> Result<Option<Vec<usize>>, StartError> {
    let available: Option<Vec<usize>> =
        core_affinity::get_core_ids().map(|ids| ids.into_iter().map(|c| c.id).collect());
    match (&settings.cpus, available) {
        (Some(list), Some(available)) => {
            if let Some(cpu) = list.0.iter().find(|c| !available.contains(c)) {
                return Err(StartError::NoSuchCpu {
                    cpu: *cpu,
                    available: format_cpu_list(&available),
                });
            }
            Ok(Some(list.0.clone()))
        }
        (Some(_), None) => {
            tracing::warn!("cannot read this process's CPU set: --cpus ignored, shards not pinned");
            Ok(None)
        }
        (None, available) => Ok(available),
    }
}

fn format_cpu_list(cpus: &[usize]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        let mut end = start;
        while i + 1 < cpus.len() && cpus[i + 1] == end + 1 {
            i += 1;
            end = cpus[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            let _ = write!(out, "{start}");
        } else {
            let _ = write!(out, "{start}-{end}");
        }
        i += 1;
    }
    out
}

/// More Prometheus text appended to every scrape (the session feed, accounting listeners).
pub type MetricsSource = Arc<dyn Fn(&mut String) + Send + Sync>;

/// The running server: its shards and where it listens.
pub struct Server {
    pub local_addrs: Vec<SocketAddr>,
    /// The instant the shards' monotonic clock counts from (the session feed uses it too,
    /// so tombstone times agree).
    pub base: Instant,
    pub io: IoKind,
    pub shards: usize,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
    reports: Vec<Arc<Mutex<ShardReport>>>,
    stats_interval: Duration,
    /// With actions: where settled answers go (each shard's queue, the sockets' handles).
    delivery: Option<Delivery>,
    /// The configuration every shard runs with ([`Server::config`]).
    config: SharedConfig,
}

/// Binds every socket and starts every shard. Returns once all shards are receiving.
/// With `actions`, every request that selects sessions is handed to it and answered when
/// it settles (the dispatcher takes the server's [`Server::delivery`]); without, the table is
/// the data plane.
pub fn start(
    settings: &Settings,
    config: Arc<EngineConfig>,
    store: Arc<dyn SessionStore>,
    actions: Option<Arc<dyn ActionSink>>,
) -> Result<Server, StartError> {
    start_at(settings, config, store, actions, None, None)
}

/// [`start`] with the monotonic clock counting from `base` (a server with a state
/// directory starts it a tombstone window early, so restored tombstones have times), and
/// fresh answers written to `audit` (`--audit-log`).
pub fn start_at(
    settings: &Settings,
    config: Arc<EngineConfig>,
    store: Arc<dyn SessionStore>,
    actions: Option<Arc<dyn ActionSink>>,
    base: Option<Instant>,
    audit: Option<Arc<crate::audit::AuditLog>>,
) -> Result<Server, StartError> {
    let io = choose_backend(settings.io)?;
    if settings.gso == crate::config::Gso::On && io == IoKind::Uring {
        tracing::warn!(
            "--gso is implemented for the mmsg backend only; io_uring sends answers one by one"
        );
    }
    let cpus = resolve_cpus(settings)?;
    let shards = match settings.shards {
        Shards::Count(n) => n,
        Shards::Auto => cpus
            .as_ref()
            .map(Vec::len)
            .unwrap_or_else(|| {
                thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            })
            .max(1),
    };
    let sizes = BufferSizes {
        recv: settings.recv_buffer,
        send: settings.send_buffer,
    };
    // listeners[shard][address]
    let mut listeners: Vec<Vec<Listener>> = (0..shards).map(|_| Vec::new()).collect();
    let mut local_addrs = Vec::new();
    for &addr in &settings.listen {
        check_free(addr)?;
        let mut bound = addr;
        for shard in listeners.iter_mut() {
            let l = dynauth_udp::bind_udp(bound, sizes).map_err(|e| bind_error(addr, e))?;
            // Port 0: every shard binds the port the first one got.
            bound = l.local;
            if l.recv_buffer < sizes.recv / 2
                && local_addrs.len() < settings.listen.len()
                && shard.is_empty()
            {
                tracing::warn!(
                    "{addr}: the kernel granted a {} octet receive buffer, not {}: raise net.core.rmem_max (sysctl -w net.core.rmem_max={}) or run with CAP_NET_ADMIN",
                    l.recv_buffer,
                    sizes.recv,
                    sizes.recv
                );
            }
            shard.push(l);
        }
        local_addrs.push(bound);
    }
    let base = base.unwrap_or_else(Instant::now);
    let shared_config: SharedConfig = Arc::new(ArcSwap::new(Arc::clone(&config)));
    let mut delivery = None;
    if actions.is_some() {
        let first = listeners.first().map(Vec::as_slice).unwrap_or_default();
        let sender = dynauth_udp::AnswerSender::new(first).map_err(|e| StartError::Shard {
            shard: 0,
            message: format!("duplicating a socket for settled answers: {e}"),
        })?;
        delivery = Some(Delivery::new(Vec::with_capacity(shards), sender));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::with_capacity(shards);
    let mut reports = Vec::with_capacity(shards);
    let mut readiness = Vec::with_capacity(shards);
    for (index, shard_listeners) in listeners.into_iter().enumerate() {
        let cpu = cpus
            .as_ref()
            .and_then(|c| c.get(index % c.len().max(1)).copied());
        let report = Arc::new(Mutex::new(ShardReport::default()));
        reports.push(Arc::clone(&report));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        readiness.push(ready_rx);
        let mut engine = Engine::new(Arc::clone(&config), Arc::clone(&store));
        let mut settled = None;
        if let (Some(sink), Some(d)) = (&actions, delivery.as_mut()) {
            engine = if settings.router.is_some() {
                engine.with_router(index, Arc::clone(sink))
            } else {
                engine.with_actions(index, Arc::clone(sink))
            };
            let (tx, rx) = crossbeam::channel::unbounded();
            // The mmsg backend polls an eventfd beside its sockets, so the shard can be
            // woken to send its settled answers itself (io_uring: the dispatcher sends them).
            let sends = match io {
                IoKind::Mmsg => {
                    let waker = dynauth_udp::Waker::new().map_err(|e| StartError::Shard {
                        shard: index,
                        message: format!("creating the eventfd for settled answers: {e}"),
                    })?;
                    Some(Arc::new(ShardSends::new(Arc::new(waker))))
                }
                IoKind::Uring => None,
            };
            d.shards.push(ShardLink {
                notices: tx,
                sends: sends.clone(),
            });
            settled = Some(SettledQueue {
                notices: rx,
                sends,
                late: None,
            });
        }
        let shard_stop = Arc::clone(&stop);
        let shard_config = Arc::clone(&shared_config);
        let shard_audit = audit.clone();
        let batch = settings.batch;
        let gso = settings.gso;
        let durable = settings.state.is_some();
        let shedder = crate::overload::Shedder::new(&settings.overload);
        let spawned = thread::Builder::new()
            .name(format!("dynauthd-shard-{index}"))
            .spawn(move || {
                if let Some(cpu) = cpu
                    && !core_affinity::set_for_current(core_affinity::CoreId { id: cpu })
                {
                    tracing::warn!(shard = index, cpu, "could not pin the shard to its CPU");
                }
                let mut settled = settled;
                let backend = match io {
                    IoKind::Mmsg => {
                        if let Some(q) = settled.as_mut()
                            && q.sends.is_some()
                        {
                            match dynauth_udp::AnswerSender::new(&shard_listeners) {
                                Ok(sender) => q.late = Some((sender, AnswerBatch::new())),
                                Err(e) => {
                                    let _ = ready_tx.send(Err(format!(
                                        "duplicating a socket for settled answers: {e}"
                                    )));
                                    return;
                                }
                            }
                        }
                        let mut b = dynauth_udp::MmsgBackend::new(shard_listeners, batch);
                        if let Some(sends) = settled.as_ref().and_then(|q| q.sends.as_ref()) {
                            b.set_waker(Arc::clone(&sends.waker));
                        }
                        if durable {
                            b.enable_holding();
                        }
                        if gso.wanted() && !b.enable_gso() {
                            if gso == crate::config::Gso::On {
                                tracing::warn!(
                                    shard = index,
                                    "UDP GSO is not supported here: answers go one by one"
                                );
                            } else {
                                tracing::info!(
                                    shard = index,
                                    "UDP GSO is not supported here: answers go one by one"
                                );
                            }
                        }
                        Ok(Backend::Mmsg(Box::new(b)))
                    }
                    IoKind::Uring => dynauth_udp::UringBackend::new(shard_listeners, batch)
                        .map(|b| Backend::Uring(Box::new(b)))
                        .map_err(|e| e.0),
                };
                let backend = match backend {
                    Ok(b) => {
                        let _ = ready_tx.send(Ok(()));
                        b
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let handler = ShardHandler {
                    engine,
                    now: clock(base),
                    base,
                    decision_latency: LatencyHistogram::default(),
                    settled,
                    current: shard_config.load_full(),
                    config: shard_config,
                    audit: shard_audit,
                    shedder,
                    held: std::collections::VecDeque::with_capacity(4),
                    late_send_errors: 0,
                    late_sent: 0,
                    sealed_later: Vec::new(),
                };
                run_shard(index, backend, handler, &shard_stop, &report);
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                stop.store(true, Ordering::SeqCst);
                return Err(StartError::Shard {
                    shard: index,
                    message: e.to_string(),
                });
            }
        }
    }
    for (shard, rx) in readiness.into_iter().enumerate() {
        let result = rx
            .recv()
            .unwrap_or_else(|_| Err("the shard thread exited during start".into()));
        if let Err(message) = result {
            stop.store(true, Ordering::SeqCst);
            for t in threads {
                let _ = t.join();
            }
            return Err(if io == IoKind::Uring {
                StartError::UringRefused(message)
            } else {
                StartError::Shard { shard, message }
            });
        }
    }
    Ok(Server {
        local_addrs,
        base,
        io,
        shards,
        stop,
        threads,
        reports,
        stats_interval: Duration::from_secs(settings.stats_interval_secs),
        delivery,
        config: shared_config,
    })
}

/// Every shard's report summed, per-client counters keyed by `current`'s client list (a
/// shard that has not yet picked up a reload publishes under the old list: its counters are
/// re-indexed by client network first).
fn totals_of(reports: &[Arc<Mutex<ShardReport>>], current: &EngineConfig) -> Totals {
    let mut totals = Totals::default();
    for r in reports {
        let r = r.lock().unwrap_or_else(|p| p.into_inner());
        match &r.config {
            Some(c) if !std::ptr::eq(&**c, current) => {
                let mut remapped = r.clone();
                remapped.counters = r.counters.reindexed(current.clients.len(), |i| {
                    c.clients
                        .get(dynauth_proto::client::ClientId(i as u32))
                        .and_then(|client| current.clients.position_of(client.network))
                        .map(|id| id.0 as usize)
                });
                totals.add(&remapped);
            }
            _ => totals.add(&r),
        }
    }
    totals
}

/// The per-client label values for `config`'s clients, and one for the counts of clients a
/// reload removed (the slot after the last client).
fn client_names(config: &EngineConfig) -> Vec<String> {
    config
        .clients
        .iter()
        .map(|c| c.name.clone())
        .chain(core::iter::once("(removed by a reload)".to_string()))
        .collect()
}

/// The engine's counters plus the runtime's I/O and duplicate-cache counters.
pub fn prometheus_text(totals: &Totals, client_names: &[&str]) -> String {
    let mut out = String::new();
    totals.counters.write_prometheus(client_names, &mut out);
    let io = &totals.io;
    let d = &totals.dedup;
    for (name, help, value) in [
        (
            "dynauth_datagrams_received_total",
            "Datagrams read from the sockets",
            io.received,
        ),
        (
            "dynauth_answers_sent_total",
            "Answers handed to the kernel",
            io.sent,
        ),
        (
            "dynauth_kernel_drops_total",
            "Datagrams the kernel dropped at a full socket (SO_RXQ_OVFL)",
            io.kernel_drops,
        ),
        (
            "dynauth_send_errors_total",
            "Answers the kernel refused to send",
            io.send_errors,
        ),
        (
            "dynauth_receive_errors_total",
            "Receive errors",
            io.recv_errors,
        ),
        (
            "dynauth_out_of_buffers_total",
            "io_uring provided-buffer ring exhaustions",
            io.out_of_buffers,
        ),
        (
            "dynauth_gso_messages_total",
            "UDP GSO messages sent",
            io.gso_messages,
        ),
        (
            "dynauth_settled_answers_sent_by_shards_total",
            "Answers settled by the data plane that their shard sent (woken by the dispatcher)",
            io.settled_sent,
        ),
        (
            "dynauth_truncated_datagrams_total",
            "Datagrams longer than 4096 octets (MSG_TRUNC; the excess is padding, RFC 2865 section 3)",
            io.truncated,
        ),
        (
            "dynauth_control_truncated_total",
            "Datagrams dropped because their control messages were cut (MSG_CTRUNC)",
            io.control_truncated,
        ),
        (
            "dynauth_unparsable_sources_total",
            "Datagrams dropped because their source address could not be read",
            io.unparsable,
        ),
        (
            "dynauth_dedup_evicted_early_total",
            "Cached answers dropped before their window ended",
            d.evicted_early,
        ),
        (
            "dynauth_dedup_in_flight_full_total",
            "Requests not marked in flight because that table was full",
            d.in_flight_full,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}.\n# TYPE {name} counter\n{name} {value}"
        );
    }
    totals.decision_latency.write_prometheus(
        "dynauth_decision_seconds",
        "Time to decide, encode and sign one datagram: each receive batch's time shared evenly among its datagrams",
        &mut out,
    );
    totals.shed.write_prometheus(&mut out);
    out
}

/// Each shard's datagrams and answers (`shard` label): how SO_REUSEPORT spread the load.
fn per_shard_prometheus(reports: &[Arc<Mutex<ShardReport>>], out: &mut String) {
    let io: Vec<IoStats> = reports
        .iter()
        .map(|r| r.lock().unwrap_or_else(|p| p.into_inner()).io)
        .collect();
    for (name, help, value) in [
        (
            "dynauth_shard_datagrams_received_total",
            "Datagrams read by each shard",
            (|s: &IoStats| s.received) as fn(&IoStats) -> u64,
        ),
        (
            "dynauth_shard_answers_sent_total",
            "Answers sent by each shard",
            |s: &IoStats| s.sent,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} counter");
        for (shard, stats) in io.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {}", value(stats));
        }
    }
}

fn answer_http(mut stream: std::net::TcpStream, body: &str) -> std::io::Result<()> {
    use std::io::{Read, Write};
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.set_write_timeout(Some(Duration::from_millis(500)))?;
    let mut request = [0u8; 1024];
    let _ = stream.read(&mut request);
    write!(
        stream,
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Binds the metrics listener (non-blocking: its thread polls its stop flag).
pub fn bind_metrics(addr: SocketAddr) -> Result<std::net::TcpListener, StartError> {
    let listener = std::net::TcpListener::bind(addr).map_err(|e| bind_error(addr, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| bind_error(addr, e))?;
    Ok(listener)
}

fn metrics_addr(listener: &std::net::TcpListener) -> Result<SocketAddr, StartError> {
    listener.local_addr().map_err(|e| StartError::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source: e,
    })
}

/// Answers every connection to `listener` with `body()` until `stop` is set.
fn serve_http(listener: &std::net::TcpListener, stop: &AtomicBool, body: impl Fn() -> String) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = answer_http(stream, &body());
            }
            // Idle: look again soon (a scrape waits at most this long to be accepted).
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// `/metrics` while the state directory is restored, before the server exists (no socket
/// is bound then, docs/DURABILITY.md "Restore"): `source` (the restore's progress) from a
/// thread of its own, on the listener the full metrics take over afterwards, so a scraper
/// sees one address throughout.
pub struct RestoreMetrics {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<std::net::TcpListener>,
    local: SocketAddr,
}

impl RestoreMetrics {
    pub fn serve(
        listener: std::net::TcpListener,
        source: MetricsSource,
    ) -> Result<RestoreMetrics, StartError> {
        let local = metrics_addr(&listener)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name("dynauthd-metrics".into())
            .spawn(move || {
                serve_http(&listener, &flag, || {
                    let mut body = String::new();
                    source(&mut body);
                    body
                });
                listener
            })
            .map_err(|e| StartError::Bind {
                addr: local,
                source: e,
            })?;
        Ok(RestoreMetrics {
            stop,
            thread,
            local,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Stops serving and hands the listener back (connections wait in its backlog meanwhile).
    pub fn finish(self) -> std::net::TcpListener {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.join() {
            Ok(listener) => listener,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

fn run_shard(
    index: usize,
    mut backend: Backend,
    mut handler: ShardHandler,
    stop: &AtomicBool,
    report: &Mutex<ShardReport>,
) {
    let publish = |handler: &ShardHandler, backend: &Backend| {
        let mut r = report.lock().unwrap_or_else(|p| p.into_inner());
        if !r
            .config
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, &handler.current))
        {
            r.config = Some(Arc::clone(&handler.current));
        }
        r.counters.clone_from(handler.engine.counters());
        r.io = backend.stats();
        r.io.send_errors += handler.late_send_errors;
        r.io.settled_sent = handler.late_sent;
        r.dedup = handler.engine.dedup_stats();
        r.decision_latency = handler.decision_latency;
        r.shed = handler.shedder.stats;
    };
    let mut last_publish = Instant::now();
    let mut errors = 0u32;
    while !stop.load(Ordering::Relaxed) {
        if let Err(e) = backend.poll_batch(Duration::from_millis(100), &mut handler) {
            errors += 1;
            if errors <= 10 || errors.is_power_of_two() {
                tracing::error!(shard = index, "I/O error (count {errors}): {e}");
            }
            thread::sleep(Duration::from_millis(10));
        }
        handler.take_settled();
        if last_publish.elapsed() >= Duration::from_millis(250) {
            publish(&handler, &backend);
            last_publish = Instant::now();
        }
    }
    handler.close_settled();
    if !backend.shutdown(&mut handler) {
        tracing::warn!(
            shard = index,
            "some I/O did not complete during shutdown; its buffers are left allocated"
        );
    }
    publish(&handler, &backend);
}

impl Server {
    /// Where the action dispatcher delivers settled answers (once; `None` without actions).
    pub fn take_delivery(&mut self) -> Option<Delivery> {
        self.delivery.take()
    }

    fn totals(&self) -> Totals {
        totals_of(&self.reports, &self.config.load())
    }

    /// The configuration the shards run with: a reload stores a new one here, and every
    /// shard picks it up at the start of its next batch.
    pub fn config(&self) -> SharedConfig {
        Arc::clone(&self.config)
    }

    /// Serves Prometheus text on `addr` (any path, HTTP/1.0) from a thread of its own until
    /// the server stops. Returns the bound address.
    pub fn serve_metrics(
        &self,
        addr: SocketAddr,
        extra: Vec<MetricsSource>,
    ) -> Result<SocketAddr, StartError> {
        self.serve_metrics_on(bind_metrics(addr)?, extra)
    }

    /// [`Server::serve_metrics`] on a listener bound earlier (the one that served the
    /// restore's progress, [`RestoreMetrics`]).
    pub fn serve_metrics_on(
        &self,
        listener: std::net::TcpListener,
        extra: Vec<MetricsSource>,
    ) -> Result<SocketAddr, StartError> {
        let local = metrics_addr(&listener)?;
        let reports = self.reports.clone();
        let stop = Arc::clone(&self.stop);
        let config = Arc::clone(&self.config);
        thread::Builder::new()
            .name("dynauthd-metrics".into())
            .spawn(move || {
                serve_http(&listener, &stop, || {
                    let current = config.load();
                    let owned = client_names(&current);
                    let names: Vec<&str> = owned.iter().map(String::as_str).collect();
                    let mut body = prometheus_text(&totals_of(&reports, &current), &names);
                    per_shard_prometheus(&reports, &mut body);
                    for source in &extra {
                        source(&mut body);
                    }
                    body
                })
            })
            .map_err(|e| StartError::Bind {
                addr: local,
                source: e,
            })?;
        Ok(local)
    }

    /// Runs until `shutdown` is set, logging a stats line every interval; then stops reading,
    /// answers what is in flight, joins the shards and returns the totals.
    pub fn run_until(self, shutdown: &AtomicBool) -> Totals {
        self.run_until_with(shutdown, &mut || {})
    }

    /// [`Server::run_until`], calling `tick` about every 50 ms on this thread (a reload
    /// requested by SIGHUP, the systemd watchdog).
    pub fn run_until_with(self, shutdown: &AtomicBool, tick: &mut dyn FnMut()) -> Totals {
        let mut last = Instant::now();
        let mut last_received = 0u64;
        while !shutdown.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(50));
            tick();
            if let Some(dead) = self.threads.iter().position(|t| t.is_finished()) {
                tracing::error!(
                    "shard {dead} stopped unexpectedly; shutting down so that a supervisor restarts dynauthd"
                );
                break;
            }
            if !self.stats_interval.is_zero() && last.elapsed() >= self.stats_interval {
                let totals = self.totals();
                let secs = last.elapsed().as_secs_f64();
                let rate = (totals.io.received - last_received) as f64 / secs.max(1e-3);
                tracing::info!("stats: {rate:.0} req/s, {}", totals.summary());
                last = Instant::now();
                last_received = totals.io.received;
            }
        }
        tracing::info!("shutting down: stopped reading, answering what is in flight");
        self.stop.store(true, Ordering::SeqCst);
        let Server {
            threads, reports, ..
        } = self;
        let mut failed_shards = 0;
        for t in threads {
            if t.join().is_err() {
                failed_shards += 1;
            }
        }
        let mut totals = Totals::default();
        for r in &reports {
            totals.add(&r.lock().unwrap_or_else(|p| p.into_inner()));
        }
        totals.failed_shards = failed_shards;
        totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_list_formatting() {
        assert_eq!(format_cpu_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(format_cpu_list(&[3]), "3");
    }
}
