//! The router's worker thread: takes the shards' routed requests in bursts, finds each one's
//! owner (cache, then one pipelined Redis round trip per burst for the misses, then one for
//! owner addresses not known), forwards, matches the owners' answers by the router's
//! Proxy-State, relays them, and settles what timed out.
//!
//! Owns: the forwarding sockets (one receiving thread each), the in-flight table, the
//! Redis connections (lookups; the invalidation subscriber has its own thread), delivery of
//! answers to the shards and the DACs. Must not touch: the bytes of packets (the sans-IO
//! `PendingRequest::{route, forward, relay}` build and check them).
#![forbid(unsafe_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender};
use dynauth_proto::action::{ActionSink, PendingRequest, QueueFull, Settled};
use dynauth_proto::auth::Secret;
use dynauth_proto::codec::{self, Packet};
use dynauth_proto::dict::{ErrorCause, attr};
use dynauth_proto::route::{Forwarded, NasHints};

use super::cache::{AffinityCache, Owners};
use super::{NasMatch, OnOwnerTimeout, RouterSettings, RouterStats};
use crate::actions::{Delivery, SettledAnswer, ShardNotice};
use crate::affinity;

/// Requests waiting for the worker, across all shards.
pub const QUEUE_CAPACITY: usize = 65_536;
/// Forwarding sockets: each has 256 Identifiers, so this many times 256 requests can be in
/// flight to one owner before an Identifier is reused (harmless even then: the Request
/// Authenticators differ, so an owner's duplicate cache tells them apart).
const FORWARD_SOCKETS: usize = 4;
/// The router's Proxy-State: a tag, this process's nonce, the request's token.
const PROXY_STATE_TAG: &[u8; 4] = b"dyrt";
const PROXY_STATE_LEN: usize = 16;
/// Marks an owner that stands for "the DAS of this NAS" (a learner's session); owner ids
/// cannot hold it.
const LEARNT_AT: &str = "@";
/// How long an owner's address is trusted before it is read again (its heartbeat period).
const OWNER_ADDRESS_TTL_MS: u64 = 1_000;
/// Redis commands time out after this (the request then gets NAK 505).
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);
/// At most one reconnection attempt per this.
const REDIS_RETRY: Duration = Duration::from_millis(250);

enum Input {
    Request(PendingRequest),
    /// A datagram that arrived on one of the forwarding sockets (an owner's answer, if it verifies).
    Answer {
        bytes: Vec<u8>,
        from: SocketAddr,
    },
    /// Routing keys whose owners changed (from the invalidation channel).
    Invalidate(Vec<Vec<u8>>),
    /// The invalidation stream was interrupted: nothing cached can be trusted.
    ClearCache,
}

/// The shards' hand-off to the worker (an `ActionSink`).
#[derive(Clone)]
pub struct RouteSink {
    tx: Sender<Input>,
}

impl ActionSink for RouteSink {
    fn submit(&self, request: PendingRequest) -> Result<(), QueueFull> {
        self.tx
            .try_send(Input::Request(request))
            .map_err(|_| QueueFull)
    }
}

/// What the worker needs from the daemon.
pub struct RouterSetup {
    pub settings: RouterSettings,
    pub delivery: Delivery,
    /// The shards' monotonic clock origin (deadlines are in its milliseconds).
    pub base: Instant,
    pub stats: Arc<RouterStats>,
}

/// The running router: the worker, the forwarding sockets' readers, the subscriber.
pub struct Router {
    /// Tells the worker to finish: no new requests come (the shards have stopped); what is
    /// in flight is settled by its owner's answer or its deadline.
    drain: Arc<AtomicBool>,
    /// Stops the readers and the subscriber, once the worker is done.
    stop: Arc<AtomicBool>,
    worker: Option<thread::JoinHandle<()>>,
    threads: Vec<thread::JoinHandle<()>>,
    local: Vec<SocketAddr>,
}

/// The sink the shards hand requests to, and the worker's inbox (create it before the
/// runtime starts; start the router with the inbox once the runtime's delivery exists).
pub fn channel() -> (RouteSink, RouterInbox) {
    let (tx, rx) = channel::bounded(QUEUE_CAPACITY);
    (RouteSink { tx: tx.clone() }, RouterInbox { tx, rx })
}

/// The worker's side of [`channel`].
pub struct RouterInbox {
    tx: Sender<Input>,
    rx: Receiver<Input>,
}

impl Router {
    /// Binds the forwarding sockets and starts the threads. Redis need not be up: requests
    /// get NAK 505 until it is (cached routes keep working).
    pub fn start(setup: RouterSetup, inbox: RouterInbox) -> io::Result<Router> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut sockets = Vec::with_capacity(FORWARD_SOCKETS);
        let mut local = Vec::new();
        for i in 0..FORWARD_SOCKETS {
            let socket = UdpSocket::bind(setup.settings.forward_bind)?;
            local.push(socket.local_addr()?);
            let reader = socket.try_clone()?;
            reader.set_read_timeout(Some(Duration::from_millis(100)))?;
            let tx = inbox.tx.clone();
            let stop = Arc::clone(&stop);
            threads.push(
                thread::Builder::new()
                    .name(format!("dynauthd-router-rx-{i}"))
                    .spawn(move || read_answers(&reader, &tx, &stop))?,
            );
            sockets.push(socket);
        }
        {
            let tx = inbox.tx.clone();
            let stop = Arc::clone(&stop);
            let settings = setup.settings.affinity.clone();
            let stats = Arc::clone(&setup.stats);
            threads.push(
                thread::Builder::new()
                    .name("dynauthd-router-sub".into())
                    .spawn(move || subscribe(&settings, &stats, &tx, &stop))?,
            );
        }
        let drain = Arc::new(AtomicBool::new(false));
        let worker_drain = Arc::clone(&drain);
        let RouterInbox { tx, rx } = inbox;
        drop(tx);
        let worker = thread::Builder::new()
            .name("dynauthd-router".into())
            .spawn(move || Worker::new(setup, sockets).run(&rx, &worker_drain))?;
        Ok(Router {
            drain,
            stop,
            worker: Some(worker),
            threads,
            local,
        })
    }

    /// The forwarding sockets' addresses (owners see requests from these).
    pub fn forward_addrs(&self) -> &[SocketAddr] {
        &self.local
    }

    /// Stops (after the shards): requests in flight still get their owner's answer relayed,
    /// or NAK 505 (or nothing, with `--on-owner-timeout drop`) at their deadline; then every
    /// thread ends. Bounded by `--forward-timeout`.
    pub fn stop(mut self) {
        self.drain.store(true, Ordering::Release);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        self.stop.store(true, Ordering::Release);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn read_answers(socket: &UdpSocket, tx: &Sender<Input>, stop: &AtomicBool) {
    let mut buf = vec![0u8; codec::MAX_PACKET_LEN + 1];
    while !stop.load(Ordering::Acquire) {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) if n <= codec::MAX_PACKET_LEN => {
                let bytes = buf.get(..n).unwrap_or_default().to_vec();
                if tx.send(Input::Answer { bytes, from }).is_err() {
                    return;
                }
            }
            Ok(_) => {} // larger than any RADIUS packet: not an answer
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                tracing::warn!("router: forwarding socket: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Follows the invalidation channel. Each (re)subscription clears the cache: an
/// invalidation may have been published while the router was not listening. While Redis is
/// unreachable the cache is kept: owners cannot change the affinity then either, so cached
/// routes are as good as Redis's own (and a stale one costs a NAK 503 and a re-lookup).
fn subscribe(
    settings: &affinity::AffinitySettings,
    stats: &RouterStats,
    tx: &Sender<Input>,
    stop: &AtomicBool,
) {
    let channel_name = affinity::channel(&settings.prefix);
    let mut logged_down = false;
    while !stop.load(Ordering::Acquire) {
        let result = (|| -> redis::RedisResult<()> {
            let client = redis::Client::open(settings.url.as_str())?;
            let mut conn = client.get_connection_with_timeout(REDIS_TIMEOUT)?;
            conn.set_read_timeout(Some(Duration::from_millis(200)))?;
            let mut pubsub = conn.as_pubsub();
            pubsub.subscribe(&channel_name)?;
            if logged_down {
                tracing::info!("router: invalidation channel {channel_name} followed again");
                logged_down = false;
            }
            // Anything cached before this subscription may have missed an invalidation.
            let _ = tx.send(Input::ClearCache);
            stats.subscribed.store(1, Ordering::Release);
            while !stop.load(Ordering::Acquire) {
                match pubsub.get_message() {
                    Ok(msg) => {
                        let payload: Vec<u8> = msg.get_payload().unwrap_or_default();
                        let keys = affinity::decode_invalidation(&payload);
                        if !keys.is_empty() && tx.send(Input::Invalidate(keys)).is_err() {
                            return Ok(());
                        }
                    }
                    Err(e) if e.is_timeout() => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })();
        stats.subscribed.store(0, Ordering::Release);
        if let Err(e) = result {
            if !logged_down {
                tracing::warn!(
                    "router: invalidation channel on {} lost ({e}); the cache is cleared and retried",
                    affinity::publish::redact_url(&settings.url)
                );
                logged_down = true;
            }
            thread::sleep(REDIS_RETRY);
        }
    }
}

struct Flight {
    pending: PendingRequest,
    forwarded: Forwarded,
    proxy_state: [u8; PROXY_STATE_LEN],
    target: SocketAddr,
    secret: Secret,
    /// Routing keys whose cached owners were used (a NAK 503 then looks them up afresh).
    cached_keys: Vec<Vec<u8>>,
    rerouted: bool,
}

/// Where one request goes.
enum Route {
    Owner(String),
    Nas(usize),
    NotRoutable,
    MultipleOwners,
    StoreUnavailable,
}

struct Worker {
    settings: RouterSettings,
    delivery: Delivery,
    base: Instant,
    stats: Arc<RouterStats>,
    sockets: Vec<UdpSocket>,
    redis: Option<redis::Connection>,
    redis_next_try: Instant,
    redis_logged_down: bool,
    cache: AffinityCache,
    owner_addresses: HashMap<String, (Option<SocketAddr>, u64)>,
    in_flight: HashMap<u64, Flight>,
    deadlines: BinaryHeap<Reverse<(u64, u64)>>,
    next_token: u64,
    nonce: [u8; 4],
    out: Vec<u8>,
    /// The forwarded request being built (reused: no 4 KiB allocation per request).
    forward_buf: Vec<u8>,
    ready: Vec<SettledAnswer>,
}

impl Worker {
    fn new(setup: RouterSetup, sockets: Vec<UdpSocket>) -> Self {
        let RouterSetup {
            settings,
            delivery,
            base,
            stats,
        } = setup;
        let cache = AffinityCache::new(
            settings.cache_entries,
            u64::try_from(settings.cache_ttl.as_millis()).unwrap_or(u64::MAX),
        );
        // A per-process nonce: answers meant for an earlier router process are not ours.
        let nonce = {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let mixed = (t as u64) ^ (u64::from(std::process::id()) << 32);
            let b = mixed.to_le_bytes();
            [b[0] ^ b[4], b[1] ^ b[5], b[2] ^ b[6], b[3] ^ b[7]]
        };
        Worker {
            settings,
            delivery,
            base,
            stats,
            sockets,
            redis: None,
            redis_next_try: Instant::now(),
            redis_logged_down: false,
            cache,
            owner_addresses: HashMap::new(),
            in_flight: HashMap::new(),
            deadlines: BinaryHeap::new(),
            next_token: 1,
            nonce,
            out: vec![0; codec::MAX_PACKET_LEN],
            forward_buf: vec![0; codec::MAX_PACKET_LEN],
            ready: Vec::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn run(mut self, inbox: &Receiver<Input>, drain: &AtomicBool) {
        let mut burst = Vec::new();
        loop {
            if drain.load(Ordering::Acquire) && self.in_flight.is_empty() && inbox.is_empty() {
                break;
            }
            let wait = self
                .deadlines
                .peek()
                .map(|Reverse((d, _))| d.saturating_sub(self.now_ms()))
                .unwrap_or(50)
                .clamp(1, 50);
            match inbox.recv_timeout(Duration::from_millis(wait)) {
                Ok(input) => self.take(input, &mut burst),
                Err(channel::RecvTimeoutError::Timeout) => {}
                Err(channel::RecvTimeoutError::Disconnected) => break,
            }
            // A burst: whatever else is queued now, up to a bound.
            while burst.len() < 1_024 {
                match inbox.try_recv() {
                    Ok(input) => self.take(input, &mut burst),
                    Err(_) => break,
                }
            }
            if !burst.is_empty() {
                self.route_burst(std::mem::take(&mut burst));
            }
            self.expire();
            self.send_ready();
            self.stats
                .cache_entries
                .store(self.cache.len() as u64, Ordering::Relaxed);
        }
        self.send_ready();
    }

    fn take(&mut self, input: Input, burst: &mut Vec<(PendingRequest, bool)>) {
        match input {
            Input::Request(p) => burst.push((p, false)),
            Input::Answer { bytes, from } => {
                if let Some(retry) = self.answer(&bytes, from) {
                    burst.push((retry, true));
                }
            }
            Input::Invalidate(keys) => {
                for k in keys {
                    if self.cache.invalidate(&k) {
                        self.stats
                            .cache_invalidations
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Input::ClearCache => self.cache.clear(),
        }
    }

    /// Routes a burst: cache, then one pipelined lookup of every missing key, then one of
    /// every owner address not known; forwards or answers each request. A request marked
    /// fresh bypasses the cache (a cached owner answered 503).
    fn route_burst(&mut self, burst: Vec<(PendingRequest, bool)>) {
        let now = self.now_ms();
        let mut requests = Vec::with_capacity(burst.len());
        let mut missing: Vec<Vec<u8>> = Vec::new();
        let mut missing_set: HashSet<Vec<u8>> = HashSet::new();
        for (pending, fresh) in burst {
            let Ok(route) = pending.route() else {
                // Its own bytes no longer verify: cannot happen for a request the shard
                // verified; answer nothing rather than something unauthenticated.
                continue;
            };
            for k in &route.keys {
                let cached = !fresh && self.cache.get(k, now).is_some();
                if cached {
                    self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
                    if missing_set.insert(k.clone()) {
                        missing.push(k.clone());
                    }
                }
            }
            requests.push((pending, route, fresh));
        }
        let looked_up = if missing.is_empty() {
            Some(HashMap::new())
        } else {
            self.lookup_keys(&missing)
        };
        if let Some(found) = &looked_up {
            for (k, owners) in found {
                self.cache.put(k.clone(), owners.clone(), now);
            }
        }
        let mut decided = Vec::with_capacity(requests.len());
        let mut need_addresses = Vec::new();
        for (pending, route, fresh) in requests {
            // Per key: the owners holding the session live, and those holding it or its
            // tombstone; the request's owners are the intersections (live first).
            let mut live: Option<HashSet<&str>> = None;
            let mut any: Option<HashSet<&str>> = None;
            let mut cached_keys = Vec::new();
            let mut unavailable = false;
            for k in &route.keys {
                let set: Option<&Owners> = match looked_up.as_ref().and_then(|f| f.get(k)) {
                    Some(o) => Some(o),
                    None if !fresh => {
                        let c = self.cache.get(k, now);
                        if c.is_some() {
                            cached_keys.push(k.clone());
                        }
                        c
                    }
                    None => None,
                };
                let Some(set) = set else {
                    unavailable = true;
                    break;
                };
                let live_here: HashSet<&str> = set
                    .iter()
                    .filter(|(_, l)| *l)
                    .map(|(o, _)| o.as_str())
                    .collect();
                let any_here: HashSet<&str> = set.iter().map(|(o, _)| o.as_str()).collect();
                live = Some(match live {
                    None => live_here,
                    Some(prev) => prev.intersection(&live_here).copied().collect(),
                });
                any = Some(match any {
                    None => any_here,
                    Some(prev) => prev.intersection(&any_here).copied().collect(),
                });
            }
            let live = live.unwrap_or_default();
            let chosen = if live.is_empty() {
                any.unwrap_or_default()
            } else {
                live
            };
            let owners: Vec<String> = chosen.into_iter().map(str::to_owned).collect();
            let choice = if unavailable {
                Route::StoreUnavailable
            } else if owners.len() > 1 {
                Route::MultipleOwners
            } else if let Some(owner) = owners.into_iter().next() {
                match owner.strip_prefix(LEARNT_AT) {
                    // Learnt from the NAS's Accounting by a --learner: its own DAS acts.
                    Some(nas) => match self.nas_route_by_identity(nas) {
                        Some(i) => Route::Nas(i),
                        None => Route::NotRoutable,
                    },
                    None => Route::Owner(owner),
                }
            } else {
                match self.nas_route(&route.nas) {
                    Some(i) => Route::Nas(i),
                    None => Route::NotRoutable,
                }
            };
            if let Route::Owner(o) = &choice
                && self
                    .owner_addresses
                    .get(o)
                    .is_none_or(|(_, at)| now.saturating_sub(*at) >= OWNER_ADDRESS_TTL_MS)
                && !need_addresses.contains(o)
            {
                need_addresses.push(o.clone());
            }
            decided.push((pending, choice, cached_keys));
        }
        let addresses_ok = need_addresses.is_empty() || self.lookup_owners(&need_addresses, now);
        for (pending, choice, cached_keys) in decided {
            match choice {
                Route::Owner(owner) => {
                    let address = self.owner_addresses.get(&owner).and_then(|(a, _)| *a);
                    match address {
                        Some(target) => {
                            let secret = self.settings.owner_secret.clone();
                            self.forward(pending, target, secret, cached_keys, false);
                        }
                        None if !addresses_ok => {
                            self.stats.store_unavailable.fetch_add(1, Ordering::Relaxed);
                            self.refuse(&pending, ErrorCause::OtherProxyProcessingError);
                        }
                        None => {
                            self.stats.owner_gone.fetch_add(1, Ordering::Relaxed);
                            self.refuse(&pending, ErrorCause::OtherProxyProcessingError);
                        }
                    }
                }
                Route::Nas(i) => {
                    let (target, secret) = match self.settings.nas_routes.get(i) {
                        Some(r) => (r.address, r.secret.clone()),
                        None => continue,
                    };
                    self.stats.nas_routed.fetch_add(1, Ordering::Relaxed);
                    self.forward(pending, target, secret, Vec::new(), false);
                }
                Route::NotRoutable => {
                    self.stats.not_routable.fetch_add(1, Ordering::Relaxed);
                    self.refuse(&pending, ErrorCause::RequestNotRoutable);
                }
                Route::MultipleOwners => {
                    self.stats.multiple_owners.fetch_add(1, Ordering::Relaxed);
                    self.refuse(&pending, ErrorCause::MultipleSessionSelectionUnsupported);
                }
                Route::StoreUnavailable => {
                    self.stats.store_unavailable.fetch_add(1, Ordering::Relaxed);
                    self.refuse(&pending, ErrorCause::OtherProxyProcessingError);
                }
            }
        }
    }

    /// The first `--nas-route` for a NAS identity as a learner published it (the session's
    /// `nas`: its NAS-Identifier, or its NAS-IP-Address / NAS-IPv6-Address as text).
    fn nas_route_by_identity(&self, nas: &str) -> Option<usize> {
        let ip = nas.parse::<std::net::IpAddr>().ok();
        self.settings
            .nas_routes
            .iter()
            .position(|r| match &r.matcher {
                NasMatch::Identifier(id) => id == nas,
                NasMatch::Ip(addr) => Some(*addr) == ip,
                NasMatch::OperatorName(_) => false,
            })
    }

    /// The first `--nas-route` matching the NAS the request names.
    fn nas_route(&self, nas: &NasHints) -> Option<usize> {
        self.settings
            .nas_routes
            .iter()
            .position(|r| match &r.matcher {
                NasMatch::Identifier(id) => nas.identifier.as_deref() == Some(id.as_bytes()),
                NasMatch::OperatorName(name) => {
                    nas.operator_name.as_deref() == Some(name.as_bytes())
                }
                NasMatch::Ip(ip) => {
                    nas.ip.map(std::net::IpAddr::V4) == Some(*ip)
                        || nas.ipv6.map(std::net::IpAddr::V6) == Some(*ip)
                }
            })
    }

    fn connection(&mut self) -> Option<&mut redis::Connection> {
        if self.redis.is_none() && Instant::now() >= self.redis_next_try {
            let url = self.settings.affinity.url.clone();
            let connected = redis::Client::open(url.as_str()).and_then(|c| {
                let conn = c.get_connection_with_timeout(REDIS_TIMEOUT)?;
                conn.set_read_timeout(Some(REDIS_TIMEOUT))?;
                conn.set_write_timeout(Some(REDIS_TIMEOUT))?;
                Ok(conn)
            });
            match connected {
                Ok(conn) => {
                    if self.redis_logged_down {
                        tracing::info!(
                            "router: affinity store {} reachable again",
                            affinity::publish::redact_url(&url)
                        );
                        self.redis_logged_down = false;
                    }
                    self.redis = Some(conn);
                }
                Err(e) => self.redis_down(&e),
            }
        }
        self.redis.as_mut()
    }

    fn redis_down(&mut self, e: &redis::RedisError) {
        self.redis = None;
        self.redis_next_try = Instant::now() + REDIS_RETRY;
        self.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
        if !self.redis_logged_down {
            tracing::warn!(
                "router: affinity store {} unavailable ({e}); requests that need it get NAK 505 until it is back",
                affinity::publish::redact_url(&self.settings.affinity.url)
            );
            self.redis_logged_down = true;
        }
    }

    /// One pipelined `HGETALL` per key; `None` when Redis cannot be read.
    fn lookup_keys(&mut self, keys: &[Vec<u8>]) -> Option<HashMap<Vec<u8>, Owners>> {
        let prefix = self.settings.affinity.prefix.clone();
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("HGETALL").arg(affinity::index_key(&prefix, k));
        }
        let now_wall = crate::state::wall_ms();
        let learners = self.settings.learners.clone();
        let started = Instant::now();
        let result: redis::RedisResult<Vec<Vec<Vec<u8>>>> = match self.connection() {
            Some(conn) => pipe.query(conn),
            None => return None,
        };
        match result {
            Ok(fields) => {
                self.stats.redis_round_trip(started.elapsed());
                Some(
                    keys.iter()
                        .cloned()
                        .zip(fields.into_iter().map(|pairs| {
                            let mut owners: Owners = Vec::new();
                            for pair in pairs.chunks_exact(2) {
                                let [f, v] = pair else { continue };
                                let Some(live) = affinity::field_state(v, now_wall) else {
                                    continue; // an expired tombstone
                                };
                                if let Some(o) = affinity::field_owner(f)
                                    && let Ok(o) = core::str::from_utf8(o)
                                {
                                    // A learner's session goes to its NAS: "@NAS" stands for it.
                                    let learnt;
                                    let o = if learners.iter().any(|l| l == o) {
                                        let Some(nas) = affinity::field_nas(f) else {
                                            continue;
                                        };
                                        learnt = format!("{LEARNT_AT}{nas}");
                                        learnt.as_str()
                                    } else {
                                        o
                                    };
                                    match owners.iter_mut().find(|(x, _)| x == o) {
                                        Some((_, l)) => *l |= live,
                                        None => owners.push((o.to_owned(), live)),
                                    }
                                }
                            }
                            owners
                        }))
                        .collect(),
                )
            }
            Err(e) => {
                self.redis_down(&e);
                None
            }
        }
    }

    /// One pipelined `GET` per owner address; false when Redis cannot be read.
    fn lookup_owners(&mut self, owners: &[String], now: u64) -> bool {
        let prefix = self.settings.affinity.prefix.clone();
        let mut pipe = redis::pipe();
        for o in owners {
            pipe.cmd("GET").arg(affinity::owner_key(&prefix, o));
        }
        let started = Instant::now();
        let result: redis::RedisResult<Vec<Option<String>>> = match self.connection() {
            Some(conn) => pipe.query(conn),
            None => return false,
        };
        match result {
            Ok(addresses) => {
                self.stats.redis_round_trip(started.elapsed());
                for (o, a) in owners.iter().zip(addresses) {
                    let parsed = a.and_then(|a| a.parse::<SocketAddr>().ok());
                    self.owner_addresses.insert(o.clone(), (parsed, now));
                }
                true
            }
            Err(e) => {
                self.redis_down(&e);
                false
            }
        }
    }

    fn forward(
        &mut self,
        pending: PendingRequest,
        target: SocketAddr,
        secret: Secret,
        cached_keys: Vec<Vec<u8>>,
        rerouted: bool,
    ) {
        let token = self.next_token;
        self.next_token = self.next_token.wrapping_add(1);
        let mut proxy_state = [0u8; PROXY_STATE_LEN];
        proxy_state[..4].copy_from_slice(PROXY_STATE_TAG);
        proxy_state[4..8].copy_from_slice(&self.nonce);
        proxy_state[8..].copy_from_slice(&token.to_be_bytes());
        let identifier = token as u8;
        let socket_index = ((token >> 8) as usize) % self.sockets.len().max(1);
        let forwarded =
            match pending.forward(identifier, &proxy_state, &secret, &mut self.forward_buf) {
                Ok(f) => f,
                Err(_) => {
                    // Our Proxy-State and Message-Authenticator do not fit in 4096 octets.
                    self.refuse(&pending, ErrorCause::OtherProxyProcessingError);
                    return;
                }
            };
        let sent = self.sockets.get(socket_index).map(|s| {
            s.send_to(
                self.forward_buf.get(..forwarded.len).unwrap_or_default(),
                target,
            )
        });
        if !matches!(sent, Some(Ok(_))) {
            self.stats.send_errors.fetch_add(1, Ordering::Relaxed);
            self.refuse(&pending, ErrorCause::OtherProxyProcessingError);
            return;
        }
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        let deadline = pending.deadline_ms();
        self.deadlines.push(Reverse((deadline, token)));
        self.in_flight.insert(
            token,
            Flight {
                pending,
                forwarded,
                proxy_state,
                target,
                secret,
                cached_keys,
                rerouted,
            },
        );
        self.stats
            .in_flight
            .store(self.in_flight.len() as u64, Ordering::Relaxed);
    }

    /// An owner's datagram. Returns a request to route again (a cached owner said 503).
    fn answer(&mut self, bytes: &[u8], from: SocketAddr) -> Option<PendingRequest> {
        let Some(token) = self.token_of(bytes) else {
            self.stats.bad_owner_answers.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let Some(flight) = self.in_flight.get(&token) else {
            self.stats
                .late_owner_answers
                .fetch_add(1, Ordering::Relaxed);
            return None;
        };
        if from != flight.target {
            self.stats.bad_owner_answers.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let relayed = flight.pending.relay(
            bytes,
            &flight.forwarded,
            &flight.secret,
            &flight.proxy_state,
            &mut self.out,
        );
        let settled = match relayed {
            Ok(s) => s,
            Err(e) => {
                // A forged or broken answer changes nothing: the real one may still come.
                self.stats.bad_owner_answers.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("router: answer from {from} ignored: {e}");
                return None;
            }
        };
        let flight = self.in_flight.remove(&token)?;
        self.stats
            .in_flight
            .store(self.in_flight.len() as u64, Ordering::Relaxed);
        if settled.error_cause == Some(ErrorCause::SessionContextNotFound)
            && !flight.cached_keys.is_empty()
            && !flight.rerouted
        {
            // The cache may be stale (the session moved): ask Redis once more.
            for k in &flight.cached_keys {
                self.cache.invalidate(k);
            }
            self.stats.rerouted.fetch_add(1, Ordering::Relaxed);
            return Some(flight.pending);
        }
        self.stats.relayed.fetch_add(1, Ordering::Relaxed);
        self.deliver(settled);
        None
    }

    /// The token in our Proxy-State (the last one of the packet), if it is ours.
    fn token_of(&self, bytes: &[u8]) -> Option<u64> {
        let packet = Packet::parse(bytes).ok()?;
        let mut last = None;
        for a in packet.attributes() {
            let a = a.ok()?;
            if a.ty == attr::PROXY_STATE {
                last = Some(a.value);
            }
        }
        let v = last?;
        if v.len() != PROXY_STATE_LEN
            || v.get(..4) != Some(&PROXY_STATE_TAG[..])
            || v.get(4..8) != Some(&self.nonce[..])
        {
            return None;
        }
        Some(u64::from_be_bytes(v.get(8..)?.try_into().ok()?))
    }

    fn expire(&mut self) {
        let now = self.now_ms();
        while let Some(Reverse((deadline, token))) = self.deadlines.peek().copied() {
            if deadline > now {
                break;
            }
            self.deadlines.pop();
            let Some(flight) = self.in_flight.remove(&token) else {
                continue;
            };
            self.stats.owner_timeouts.fetch_add(1, Ordering::Relaxed);
            match self.settings.on_owner_timeout {
                OnOwnerTimeout::Nak => {
                    self.refuse(&flight.pending, ErrorCause::OtherProxyProcessingError);
                }
                OnOwnerTimeout::Drop => {
                    self.stats
                        .owner_timeouts_dropped
                        .fetch_add(1, Ordering::Relaxed);
                    let abandoned = flight.pending.abandoned();
                    if let Some(shard) = self.delivery.shards.get(abandoned.shard) {
                        let _ = shard.notices.send(ShardNotice::Abandoned(abandoned));
                    }
                }
            }
        }
        self.stats
            .in_flight
            .store(self.in_flight.len() as u64, Ordering::Relaxed);
    }

    fn refuse(&mut self, pending: &PendingRequest, cause: ErrorCause) {
        if let Ok(settled) = pending.refuse(cause, &mut self.out) {
            self.deliver(settled);
        }
    }

    fn deliver(&mut self, settled: Settled) {
        let bytes = self.out.get(..settled.len).unwrap_or_default().to_vec();
        self.ready.push(SettledAnswer { settled, bytes });
    }

    fn send_ready(&mut self) {
        self.delivery
            .send(&mut self.ready, &self.stats.send_errors, "router");
    }
}
