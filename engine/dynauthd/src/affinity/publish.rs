//! The owner side of session affinity (`--affinity-redis URL`): every change of the session
//! table is published to Redis, so that routers (`--role router`) can find which instance
//! owns a session.
//!
//! Two parts:
//! - [`PublishingStore`] wraps the served store and forwards every call unchanged; after a
//!   change that succeeded it computes what the index must lose and gain ([`diff`]) and hands
//!   it to a bounded queue, never blocking (a full queue counts a drop and asks for a
//!   resync). Readers (`select`, `reauthorize`) pass straight through: the shards pay nothing.
//! - [`Publisher`], one thread: writes the queued changes in pipelines (one round trip per
//!   burst, then one invalidation message per burst), heartbeats the owner key, and walks the
//!   whole table at start, after every reconnection or drop, and every `ttl / 4` (re-publishing
//!   every live session, which also refreshes the TTLs); after dropped changes the walk is
//!   followed by a sweep that removes this owner's fields no live session backs (a dropped
//!   removal). Redis down or slow: it reconnects with backoff, logs once per outage, keeps the
//!   queue (a failed burst is written again first); it never panics and never stops the feed.
//!
//! Order: the publisher is the only writer of this owner's fields, and a walk or sweep chunk
//! is written before any change queued after it was read, so the index ends as the table is.
//! Not atomic with the table: a table-mode Disconnect selects, then removes; a session
//! inserted between the two and removed by it keeps its fields until a sweep or the TTL.
//!
//! Owns: the queue, the publisher's Redis connection, the affinity metrics.
//! Must not touch: decisions (the wrapped store answers exactly as without it), the layout
//! (names and encodings are `super`'s), the table's internals (the walk is handed in).
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use dynauth_proto::change::AuthorizationChange;
use dynauth_proto::counters::LatencyHistogram;
use dynauth_proto::route;
use dynauth_proto::session::{PrimaryKey, Session, SessionQuery};
use dynauth_proto::store::{
    self, Applied, Lookup, MatchScope, Refusal, SessionStore, Touch, UpsertError, UpsertMode,
    Upserted,
};

use super::AffinitySettings;

/// The most changes waiting for the publisher; beyond it changes are dropped, counted, and
/// a resync walk repairs the index.
pub const QUEUE_CAPACITY: usize = 65_536;
/// The whole table is re-published every `ttl / REFRESH_FRACTION`.
pub const REFRESH_FRACTION: u32 = 4;
/// Sessions per pipeline of a walk.
pub const WALK_CHUNK: usize = 1_000;
/// The most sessions a walk publishes per second (so that a walk over millions of sessions
/// is a steady trickle, and the change stream is served between its chunks).
pub const WALK_RATE: u64 = 20_000;
/// The most queued changes written in one pipeline.
pub const BURST: usize = 4_096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const IO_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Deletes a hash field only if it still holds the given value (one key: cluster-safe).
const UNBURY_SCRIPT: &str = "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0";
/// Tombstones remembered for their removal; more are left to the sweep and the TTL.
const MAX_BURIALS: usize = 1 << 20;
/// How long a clean shutdown spends writing what is still queued.
const DRAIN_AT_STOP: Duration = Duration::from_secs(2);

/// What the index must lose and gain for one session (one field).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// `OWNER|NAS|ID` (`super::field`).
    pub field: String,
    /// Routing keys that now hold the field (HSET).
    pub set: Vec<Vec<u8>>,
    /// Routing keys that no longer hold it (HDEL).
    pub del: Vec<Vec<u8>>,
    /// Routing keys whose session was removed here: the field becomes a tombstone
    /// (`super::TOMBSTONE_PREFIX` + wall-clock ms) for the tombstone window, so a DAC's
    /// retry of a Disconnect whose answer was lost still reaches this owner (ACK 201), then
    /// goes.
    pub bury: Vec<Vec<u8>>,
}

/// The index changes that take the table from `old` to `new` for one session (`None`: not
/// live). Keys both have are left alone (the periodic walk refreshes their TTL); a change of
/// identity removes the old field and adds the new one.
pub fn diff(owner: &str, old: Option<&Session>, new: Option<&Session>) -> Vec<Change> {
    let keyed = |s: &Session| {
        (
            super::field(owner, &route::session_identity(s)),
            route::session_route_keys(s),
        )
    };
    match (old.map(keyed), new.map(keyed)) {
        (None, None) => Vec::new(),
        (None, Some((field, set))) => vec![Change {
            field,
            set,
            del: Vec::new(),
            bury: Vec::new(),
        }],
        (Some((field, bury)), None) => vec![Change {
            field,
            set: Vec::new(),
            del: Vec::new(),
            bury,
        }],
        (Some((old_field, old_keys)), Some((field, keys))) if old_field == field => {
            let set: Vec<_> = keys
                .iter()
                .filter(|k| !old_keys.contains(k))
                .cloned()
                .collect();
            let del: Vec<_> = old_keys.into_iter().filter(|k| !keys.contains(k)).collect();
            if set.is_empty() && del.is_empty() {
                Vec::new()
            } else {
                vec![Change {
                    field,
                    set,
                    del,
                    bury: Vec::new(),
                }]
            }
        }
        (Some((old_field, del)), Some((field, set))) => vec![
            Change {
                field: old_field,
                set: Vec::new(),
                del,
                bury: Vec::new(),
            },
            Change {
                field,
                set,
                del: Vec::new(),
                bury: Vec::new(),
            },
        ],
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct AffinityStats {
    /// Index entries written (HSET), by the change stream and the walks.
    pub published: AtomicU64,
    /// Index entries removed (HDEL).
    pub removed: AtomicU64,
    /// Changes dropped because the queue was full (a resync follows).
    pub dropped: AtomicU64,
    /// Walks of the whole table (start, reconnection, drops, TTL refresh).
    pub resyncs: AtomicU64,
    /// Failed connections and commands.
    pub errors: AtomicU64,
    /// Changes waiting in the queue.
    pub queued: AtomicU64,
    /// Round-trip time of each pipeline.
    pub write_latency: Mutex<LatencyHistogram>,
}

impl AffinityStats {
    /// Prometheus text appended to `out`.
    pub fn write_prometheus(&self, out: &mut String) {
        use core::fmt::Write as _;
        let rows: [(&str, &str, &str, &AtomicU64); 6] = [
            (
                "dynauth_affinity_published_total",
                "counter",
                "Affinity index entries written to Redis",
                &self.published,
            ),
            (
                "dynauth_affinity_removed_total",
                "counter",
                "Affinity index entries removed from Redis",
                &self.removed,
            ),
            (
                "dynauth_affinity_dropped_total",
                "counter",
                "Affinity changes dropped because the queue was full (a resync follows)",
                &self.dropped,
            ),
            (
                "dynauth_affinity_resyncs_total",
                "counter",
                "Walks re-publishing the whole session table",
                &self.resyncs,
            ),
            (
                "dynauth_affinity_errors_total",
                "counter",
                "Failed Redis connections and commands",
                &self.errors,
            ),
            (
                "dynauth_affinity_queue",
                "gauge",
                "Affinity changes waiting for the publisher",
                &self.queued,
            ),
        ];
        for (name, kind, help, v) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}.\n# TYPE {name} {kind}\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let latency = *self.write_latency.lock().unwrap_or_else(|p| p.into_inner());
        latency.write_prometheus(
            "dynauth_affinity_write_seconds",
            "Round-trip time of one Redis pipeline of affinity writes",
            out,
        );
    }
}

/// What the store and the publisher share.
#[derive(Debug, Default)]
struct Shared {
    stats: AffinityStats,
    /// A change was dropped: the publisher walks the table.
    resync: AtomicBool,
}

/// The served store, publishing its sessions' affinity.
pub struct PublishingStore {
    inner: Arc<dyn SessionStore>,
    owner: String,
    tx: SyncSender<Change>,
    shared: Arc<Shared>,
}

impl core::fmt::Debug for PublishingStore {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PublishingStore")
            .field("owner", &self.owner)
            .field("sessions", &self.inner.len())
            .finish_non_exhaustive()
    }
}

/// The publisher's end of the queue (handed to [`Publisher::start`]).
pub struct Changes {
    rx: Receiver<Change>,
    /// The wrapped store (the sweep checks what it still holds).
    store: Arc<dyn SessionStore>,
    shared: Arc<Shared>,
}

impl Changes {
    /// The next queued change, if any (tests).
    pub fn try_next(&self) -> Option<Change> {
        let c = self.rx.try_recv().ok()?;
        self.shared.stats.queued.fetch_sub(1, Ordering::Relaxed);
        Some(c)
    }

    pub fn stats(&self) -> &AffinityStats {
        &self.shared.stats
    }
}

impl PublishingStore {
    /// Wraps `inner`; the changes go to the returned queue (at most `capacity` waiting).
    pub fn new(
        inner: Arc<dyn SessionStore>,
        owner: impl Into<String>,
        capacity: usize,
    ) -> (Arc<Self>, Changes) {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let shared = Arc::new(Shared::default());
        let store = Arc::new(PublishingStore {
            inner: Arc::clone(&inner),
            owner: owner.into(),
            tx,
            shared: Arc::clone(&shared),
        });
        (
            store,
            Changes {
                rx,
                store: inner,
                shared,
            },
        )
    }

    /// The counters (for `/metrics`: `stats().write_prometheus(out)`).
    pub fn stats(&self) -> &AffinityStats {
        &self.shared.stats
    }

    fn enqueue(&self, old: Option<&Session>, new: Option<&Session>) {
        for change in diff(&self.owner, old, new) {
            self.send(change);
        }
    }

    /// Queues one change; a full queue drops it (counted) and asks for a resync: the feed
    /// never waits for Redis.
    fn send(&self, change: Change) {
        match self.tx.try_send(change) {
            Ok(()) => {
                self.shared.stats.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                self.shared.resync.store(true, Ordering::Release);
            }
        }
    }
}

/// The live session of `store` that is `store::same_session` as `s` (found by its
/// Acct-Session-Id, else its audit-session-id or CUI), through `select`.
fn current(store: &dyn SessionStore, s: &Session) -> Option<Session> {
    let by = |query: SessionQuery<'_>| {
        let lookup = Lookup {
            query,
            scope: MatchScope {
                vrf: None,
                max_sessions: u32::MAX,
                tombstone_window_ms: dynauth_proto::store::NO_CLIENT_WINDOW,
            },
            now_ms: 0,
        };
        let mut out = Vec::new();
        match store.select(&lookup, false, &mut out) {
            Ok(Applied::Sessions(_)) => out.into_iter().find(|c| store::same_session(c, s)),
            _ => None,
        }
    };
    if let Some(id) = &s.acct_session_id {
        return by(SessionQuery {
            acct_session_id: Some(id.as_bytes()),
            ..SessionQuery::default()
        });
    }
    let audit = s.audit_session_id.as_ref().and_then(|id| {
        by(SessionQuery {
            audit_session_id: Some(id.as_bytes()),
            ..SessionQuery::default()
        })
    });
    audit.or_else(|| {
        s.cui.as_ref().and_then(|cui| {
            by(SessionQuery {
                cui: Some(cui.as_bytes()),
                ..SessionQuery::default()
            })
        })
    })
}

/// Whether `store` holds a live session whose identity is `identity` (`NAS|a:ID`, `NAS|s:ID`,
/// `NAS|c:CUI`; a NAS name may itself hold `|`, so every split is tried) and whose routing
/// keys include `route_key`.
fn backs(store: &dyn SessionStore, identity: &str, route_key: &[u8]) -> bool {
    identity.match_indices('|').any(|(i, _)| {
        let (nas, rest) = (&identity[..i], &identity[i + 1..]);
        let mut s = Session {
            nas: (!nas.is_empty()).then(|| nas.to_owned()),
            ..Session::default()
        };
        match rest.split_at_checked(2) {
            Some(("a:", v)) => s.acct_session_id = Some(v.to_owned()),
            Some(("s:", v)) => s.audit_session_id = Some(v.to_owned()),
            Some(("c:", v)) => s.cui = Some(v.to_owned()),
            _ => return false,
        }
        current(store, &s).is_some_and(|live| {
            route::session_identity(&live) == identity
                && route::session_route_keys(&live)
                    .iter()
                    .any(|k| k == route_key)
        })
    })
}

impl SessionStore for PublishingStore {
    fn touch(&self, key: &PrimaryKey<'_>, step: Touch) {
        self.inner.touch(key, step);
    }

    fn touch_all(&self, keys: &[PrimaryKey<'_>]) {
        self.inner.touch_all(keys);
    }

    fn disconnect(&self, lookup: &Lookup<'_>) -> Result<Applied, Refusal> {
        // Table-only mode: what the lookup removes, captured whole before it goes.
        let mut before = Vec::new();
        let selected = matches!(
            self.inner.select(lookup, false, &mut before),
            Ok(Applied::Sessions(_))
        );
        let result = self.inner.disconnect(lookup);
        if selected && matches!(result, Ok(Applied::Sessions(_))) {
            for s in &before {
                self.enqueue(Some(s), None);
            }
        }
        result
    }

    /// A CoA changes a session's authorization, never its routing keys: nothing to publish.
    fn change(
        &self,
        lookup: &Lookup<'_>,
        change: &AuthorizationChange<'_>,
    ) -> Result<Applied, Refusal> {
        self.inner.change(lookup, change)
    }

    fn reauthorize(&self, lookup: &Lookup<'_>) -> Result<Applied, Refusal> {
        self.inner.reauthorize(lookup)
    }

    fn select(
        &self,
        lookup: &Lookup<'_>,
        tombstones: bool,
        out: &mut Vec<Session>,
    ) -> Result<Applied, Refusal> {
        self.inner.select(lookup, tombstones, out)
    }

    fn remove_sessions(
        &self,
        sessions: &[Session],
        tombstone: bool,
        now_ms: u64,
    ) -> Result<u32, Refusal> {
        // The copies were selected earlier: the live record may have other keys by now.
        let live: Vec<Option<Session>> =
            sessions.iter().map(|s| current(&*self.inner, s)).collect();
        let result = self.inner.remove_sessions(sessions, tombstone, now_ms);
        if matches!(result, Ok(n) if n > 0) {
            for (given, live) in sessions.iter().zip(&live) {
                if let Some(live) = live {
                    self.enqueue(Some(live), None);
                }
                if live.as_ref() != Some(given) {
                    self.enqueue(Some(given), None);
                }
            }
        }
        result
    }

    fn change_sessions(
        &self,
        sessions: &[Session],
        change: &AuthorizationChange<'_>,
        now_ms: u64,
    ) -> Result<u32, Refusal> {
        self.inner.change_sessions(sessions, change, now_ms)
    }

    fn insert(&self, session: Session) -> bool {
        let changes = diff(&self.owner, None, Some(&session));
        let ok = self.inner.insert(session);
        if ok {
            for change in changes {
                self.send(change);
            }
        }
        ok
    }

    fn upsert(
        &self,
        session: Session,
        mode: UpsertMode,
        now_ms: u64,
    ) -> Result<Upserted, UpsertError> {
        let old = current(&*self.inner, &session);
        let changes = diff(&self.owner, old.as_ref(), Some(&session));
        let result = self.inner.upsert(session, mode, now_ms);
        if let Ok(Upserted::Inserted | Upserted::Replaced) = result {
            for change in changes {
                self.send(change);
            }
        }
        result
    }

    fn delete(&self, nas: Option<&str>, acct_session_id: &str, now_ms: u64) -> bool {
        let wanted = Session {
            nas: nas.map(str::to_owned),
            acct_session_id: Some(acct_session_id.to_owned()),
            ..Session::default()
        };
        let old = current(&*self.inner, &wanted);
        let deleted = self.inner.delete(nas, acct_session_id, now_ms);
        if deleted && let Some(old) = &old {
            self.enqueue(Some(old), None);
        }
        deleted
    }

    fn retain_nas(
        &self,
        nas: Option<&str>,
        keep: &mut dyn FnMut(&Session) -> bool,
        now_ms: u64,
    ) -> usize {
        let mut gone = Vec::new();
        let n = self.inner.retain_nas(
            nas,
            &mut |s| {
                let k = keep(s);
                if !k {
                    gone.push(s.clone());
                }
                k
            },
            now_ms,
        );
        for s in &gone {
            self.enqueue(Some(s), None);
        }
        n
    }

    fn feed_seq(&self, nas: Option<&str>, seq: u64) {
        self.inner.feed_seq(nas, seq);
    }

    fn feed_resync(&self, nas: Option<&str>, mark: dynauth_proto::store::ResyncMark) {
        self.inner.feed_resync(nas, mark);
    }

    fn len(&self) -> usize {
        self.inner.len()
    }
}

// ---------------------------------------------------------------------------------------
// The publisher.

/// Visits every live session of the served table (`SessionTable::for_each_session`).
pub type Walk = Arc<dyn Fn(&mut dyn FnMut(&Session)) + Send + Sync>;

/// Why publishing cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AffinityError {
    #[error("--affinity-redis {url}: {message}")]
    BadUrl { url: String, message: String },
    #[error("affinity: cannot start the publisher thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// `url` with any password (and user name) replaced by `***`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***{}", &rest[at..]),
        None => url.to_string(),
    }
}

/// Checks that `url` is one the redis client takes (no connection is made).
pub fn check_url(url: &str) -> Result<redis::Client, AffinityError> {
    redis::Client::open(url).map_err(|e| AffinityError::BadUrl {
        url: redact_url(url),
        message: e.to_string(),
    })
}

/// Who this owner is and where routers reach it.
#[derive(Debug, Clone)]
pub struct OwnerConfig {
    pub settings: AffinitySettings,
    pub owner_id: String,
    /// The DAS address routers forward to (written to the owner key).
    pub address: SocketAddr,
}

/// The running publisher thread.
pub struct Publisher {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Publisher {
    /// Checks the URL and starts the thread (which connects on its own: a Redis that is
    /// down at start is retried like any outage).
    pub fn start(
        config: OwnerConfig,
        changes: Changes,
        walk: Walk,
    ) -> Result<Publisher, AffinityError> {
        let client = check_url(&config.settings.url)?;
        let stop = Arc::new(AtomicBool::new(false));
        let ttl = config.settings.ttl.max(Duration::from_secs(1));
        let worker = Worker {
            owner_id: config.owner_id.clone(),
            index_prefix: config.settings.prefix.clone(),
            owner_key: super::owner_key(&config.settings.prefix, &config.owner_id),
            channel: super::channel(&config.settings.prefix),
            address: config.address.to_string(),
            url: redact_url(&config.settings.url),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            refresh: ttl / REFRESH_FRACTION,
            client,
            conn: None,
            down: false,
            failures: 0,
            backoff: BACKOFF_MIN,
            next_attempt: Instant::now(),
            next_heartbeat: Instant::now(),
            next_refresh: None,
            retry: Vec::new(),
            burials: std::collections::VecDeque::new(),
            swept_drops: 0,
            changes,
            walk,
            stop: Arc::clone(&stop),
        };
        let thread = thread::Builder::new()
            .name("dynauthd-affinity".into())
            .spawn(move || worker.run())
            .map_err(AffinityError::Thread)?;
        Ok(Publisher {
            stop,
            thread: Some(thread),
        })
    }

    /// Clean shutdown: writes what is still queued (bounded), removes the owner key (routers
    /// answer at once instead of after `OWNER_TTL`), and joins the thread. The index entries
    /// stay: a restart re-publishes them.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

struct Worker {
    owner_id: String,
    index_prefix: String,
    owner_key: String,
    channel: String,
    address: String,
    /// Redacted.
    url: String,
    ttl_ms: u64,
    refresh: Duration,
    client: redis::Client,
    conn: Option<redis::Connection>,
    /// In an outage (logged once).
    down: bool,
    failures: u64,
    backoff: Duration,
    next_attempt: Instant,
    next_heartbeat: Instant,
    /// When the next walk is due (`None`: now).
    next_refresh: Option<Instant>,
    /// `dropped` when the last sweep ran (a sweep follows the walk after new drops).
    swept_drops: u64,
    /// A burst whose pipeline failed: written again first after reconnecting.
    retry: Vec<Change>,
    /// Tombstone fields to remove once their window has passed: (due, routing key, field,
    /// the tombstone value written; a field rewritten since is left alone).
    burials: std::collections::VecDeque<(Instant, Vec<u8>, String, String)>,
    changes: Changes,
    walk: Walk,
    stop: Arc<AtomicBool>,
}

impl Worker {
    fn stats(&self) -> &AffinityStats {
        &self.changes.shared.stats
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn run(mut self) {
        while !self.stopping() {
            if !self.connected() {
                thread::sleep(Duration::from_millis(20));
                continue;
            }
            self.heartbeat_if_due();
            if !self.retry.is_empty() {
                let burst = std::mem::take(&mut self.retry);
                if !self.write_burst(burst) {
                    continue;
                }
            }
            let due = self.next_refresh.is_none_or(|t| Instant::now() >= t);
            if due || self.changes.shared.resync.swap(false, Ordering::AcqRel) {
                let dropped = self.stats().dropped.load(Ordering::Relaxed);
                if self.resync() && dropped > self.swept_drops && self.sweep() {
                    self.swept_drops = dropped;
                }
                continue;
            }
            self.serve_changes(Duration::from_millis(100));
            self.unbury_due();
        }
        self.shutdown();
    }

    /// Removes the tombstone fields whose window has passed, if still tombstones (a session
    /// re-created meanwhile rewrote its field). One pipeline per call, bounded.
    fn unbury_due(&mut self) {
        let now = Instant::now();
        let mut pipe = redis::pipe();
        let mut n = 0;
        while n < BURST
            && let Some((due, _, _, _)) = self.burials.front()
            && *due <= now
        {
            let Some((_, k, field, value)) = self.burials.pop_front() else {
                break;
            };
            pipe.cmd("EVAL")
                .arg(UNBURY_SCRIPT)
                .arg(1)
                .arg(super::index_key(&self.index_prefix, &k))
                .arg(field)
                .arg(value)
                .ignore();
            n += 1;
        }
        if n > 0 {
            self.query(&pipe);
        }
    }

    /// Waits up to `wait` for changes, then writes a burst of them.
    fn serve_changes(&mut self, wait: Duration) {
        let wait = wait.min(
            self.next_heartbeat
                .saturating_duration_since(Instant::now()),
        );
        let first = match self.changes.rx.recv_timeout(wait) {
            Ok(c) => c,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return,
        };
        let mut burst = vec![first];
        while burst.len() < BURST {
            match self.changes.rx.try_recv() {
                Ok(c) => burst.push(c),
                Err(_) => break,
            }
        }
        self.stats()
            .queued
            .fetch_sub(burst.len() as u64, Ordering::Relaxed);
        self.write_burst(burst);
    }

    /// Connects when there is no connection and the backoff allows; true when connected.
    fn connected(&mut self) -> bool {
        if self.conn.is_some() {
            return true;
        }
        let now = Instant::now();
        if now < self.next_attempt {
            return false;
        }
        let opened = self
            .client
            .get_connection_with_timeout(CONNECT_TIMEOUT)
            .and_then(|c| {
                c.set_read_timeout(Some(IO_TIMEOUT))?;
                c.set_write_timeout(Some(IO_TIMEOUT))?;
                Ok(c)
            });
        match opened {
            Ok(c) => {
                if self.down {
                    tracing::info!(
                        "affinity: Redis {} reachable again after {} failed attempt(s); re-publishing every session",
                        self.url,
                        self.failures
                    );
                } else {
                    tracing::info!(
                        "affinity: publishing to Redis {} (index {}:{{k:…}}, owner key {})",
                        self.url,
                        self.index_prefix,
                        self.owner_key
                    );
                }
                self.conn = Some(c);
                self.down = false;
                self.failures = 0;
                self.backoff = BACKOFF_MIN;
                // Whatever Redis lost while we could not see it is written again.
                self.next_refresh = None;
                self.next_heartbeat = now;
                true
            }
            Err(e) => {
                self.failed(&e);
                false
            }
        }
    }

    /// A connection or command failed: drop the connection, back off, log once per outage.
    fn failed(&mut self, e: &redis::RedisError) {
        self.stats().errors.fetch_add(1, Ordering::Relaxed);
        self.failures += 1;
        if !self.down {
            tracing::warn!(
                "affinity: Redis {} failed ({e}); retrying with backoff up to {:?}, changes are queued (at most {QUEUE_CAPACITY}) and the table is re-published after reconnecting",
                self.url,
                BACKOFF_MAX
            );
            self.down = true;
        }
        self.conn = None;
        self.next_attempt = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// Runs `pipe` on the connection; false (and the connection dropped) on failure.
    fn query(&mut self, pipe: &redis::Pipeline) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        let started = Instant::now();
        let result: redis::RedisResult<()> = pipe.query(conn);
        match result {
            Ok(()) => {
                let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                self.stats()
                    .write_latency
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(ns);
                true
            }
            Err(e) => {
                self.failed(&e);
                false
            }
        }
    }

    fn heartbeat_if_due(&mut self) {
        let now = Instant::now();
        if now < self.next_heartbeat {
            return;
        }
        self.next_heartbeat = now + super::HEARTBEAT;
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&self.owner_key)
            .arg(&self.address)
            .arg("PX")
            .arg(u64::try_from(super::OWNER_TTL.as_millis()).unwrap_or(3000))
            .ignore();
        self.query(&pipe);
    }

    fn push_set(&self, pipe: &mut redis::Pipeline, route_key: &[u8], field: &str) {
        let key = super::index_key(&self.index_prefix, route_key);
        pipe.cmd("HSET").arg(&key).arg(field).arg(1).ignore();
        pipe.cmd("PEXPIRE").arg(&key).arg(self.ttl_ms).ignore();
    }

    /// Writes a burst of changes and its invalidation message in one pipeline; on failure
    /// the burst is kept for after the reconnection.
    fn write_burst(&mut self, burst: Vec<Change>) -> bool {
        let tombstone = super::tombstone_value(crate::state::wall_ms());
        let mut pipe = redis::pipe();
        let mut touched = BTreeSet::new();
        let (mut set, mut del) = (0u64, 0u64);
        for c in &burst {
            for k in &c.set {
                self.push_set(&mut pipe, k, &c.field);
                touched.insert(k.clone());
                set += 1;
            }
            for k in &c.del {
                pipe.cmd("HDEL")
                    .arg(super::index_key(&self.index_prefix, k))
                    .arg(&c.field)
                    .ignore();
                touched.insert(k.clone());
                del += 1;
            }
            for k in &c.bury {
                let key = super::index_key(&self.index_prefix, k);
                pipe.cmd("HSET")
                    .arg(&key)
                    .arg(&c.field)
                    .arg(&tombstone)
                    .ignore();
                pipe.cmd("PEXPIRE").arg(&key).arg(self.ttl_ms).ignore();
                touched.insert(k.clone());
                del += 1;
            }
        }
        if touched.is_empty() {
            return true;
        }
        let keys: Vec<Vec<u8>> = touched.into_iter().collect();
        pipe.cmd("PUBLISH")
            .arg(&self.channel)
            .arg(super::encode_invalidation(&keys))
            .ignore();
        if self.query(&pipe) {
            self.stats().published.fetch_add(set, Ordering::Relaxed);
            self.stats().removed.fetch_add(del, Ordering::Relaxed);
            // Each tombstone goes once the window has passed (a bounded queue: beyond it,
            // the sweep and the key's TTL remove them; a router ignores an old one anyway).
            let due = Instant::now() + super::TOMBSTONE_WINDOW;
            for c in &burst {
                for k in &c.bury {
                    if self.burials.len() < MAX_BURIALS {
                        self.burials.push_back((
                            due,
                            k.clone(),
                            c.field.clone(),
                            tombstone.clone(),
                        ));
                    }
                }
            }
            true
        } else {
            self.retry = burst;
            false
        }
    }

    /// Re-publishes every live session (idempotent HSETs), in paced chunks; between chunks
    /// the heartbeat and the change stream are served. A chunk written before the changes
    /// queued after it was read keeps the order: the index ends as the table is.
    fn resync(&mut self) -> bool {
        let started = Instant::now();
        self.stats().resyncs.fetch_add(1, Ordering::Relaxed);
        let walk = Arc::clone(&self.walk);
        let mut chunk: Vec<(String, Vec<Vec<u8>>)> = Vec::with_capacity(WALK_CHUNK);
        let mut aborted = false;
        let mut sessions = 0u64;
        let pace = Duration::from_secs_f64(WALK_CHUNK as f64 / WALK_RATE as f64);
        let mut next_chunk = Instant::now();
        let owner = self.owner_id.clone();
        walk(&mut |s: &Session| {
            if aborted {
                return;
            }
            let keys = route::session_route_keys(s);
            if keys.is_empty() {
                return;
            }
            chunk.push((super::field(&owner, &route::session_identity(s)), keys));
            sessions += 1;
            if chunk.len() >= WALK_CHUNK {
                let now = Instant::now();
                if now < next_chunk {
                    thread::sleep(next_chunk - now);
                }
                next_chunk = Instant::now() + pace;
                aborted = !self.write_chunk(&chunk) || self.stopping();
                chunk.clear();
                if !aborted {
                    self.heartbeat_if_due();
                    self.serve_changes(Duration::ZERO);
                    aborted = self.conn.is_none();
                }
            }
        });
        if !aborted && !chunk.is_empty() {
            aborted = !self.write_chunk(&chunk);
        }
        if aborted {
            // Walked again once Redis is back (`connected` asks for it).
            self.next_refresh = None;
            return false;
        }
        self.next_refresh = Some(Instant::now() + self.refresh);
        tracing::info!(
            "affinity: published {sessions} session(s) to Redis in {:.1?}",
            started.elapsed()
        );
        true
    }

    /// After dropped changes (a removal among them would leave its fields behind until they
    /// expire): scans the index and removes this owner's fields that no live session backs.
    /// Each chunk is read, checked against the table and cleaned before any queued change is
    /// written, so a session added meanwhile (its HSET queued after the check) stays.
    fn sweep(&mut self) -> bool {
        let started = Instant::now();
        let pattern = format!("{}:{{k:*", self.index_prefix);
        let head = format!("{}:{{k:", self.index_prefix).into_bytes();
        let mine = format!("{}|", self.owner_id).into_bytes();
        let pace = Duration::from_secs_f64(WALK_CHUNK as f64 / WALK_RATE as f64);
        let (mut cursor, mut removed) = (0u64, 0u64);
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return false;
            };
            let scanned: redis::RedisResult<(u64, Vec<Vec<u8>>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(WALK_CHUNK)
                .query(conn);
            let (next, keys) = match scanned {
                Ok(v) => v,
                Err(e) => {
                    self.failed(&e);
                    return false;
                }
            };
            let mut read = redis::pipe();
            for k in &keys {
                read.cmd("HKEYS").arg(k);
            }
            let fields: Vec<Vec<Vec<u8>>> = if keys.is_empty() {
                Vec::new()
            } else {
                match read.query(conn) {
                    Ok(v) => v,
                    Err(e) => {
                        self.failed(&e);
                        return false;
                    }
                }
            };
            let mut clean = redis::pipe();
            let mut touched = Vec::new();
            {
                // One durability wait per chunk, not per lookup (a durable store's reads).
                let _scope = crate::state::defer_commits();
                for (key, fields) in keys.iter().zip(fields) {
                    let Some(route_key) = key
                        .strip_prefix(head.as_slice())
                        .and_then(|k| k.strip_suffix(b"}"))
                    else {
                        continue;
                    };
                    for f in fields {
                        let Some(identity) = f.strip_prefix(mine.as_slice()) else {
                            continue;
                        };
                        let backed = core::str::from_utf8(identity)
                            .is_ok_and(|id| backs(&*self.changes.store, id, route_key));
                        if !backed {
                            clean.cmd("HDEL").arg(key).arg(&f).ignore();
                            touched.push(route_key.to_vec());
                        }
                    }
                }
            }
            if !touched.is_empty() {
                let n = touched.len() as u64;
                touched.dedup();
                clean
                    .cmd("PUBLISH")
                    .arg(&self.channel)
                    .arg(super::encode_invalidation(&touched))
                    .ignore();
                if !self.query(&clean) {
                    return false;
                }
                removed += n;
                self.stats().removed.fetch_add(n, Ordering::Relaxed);
            }
            cursor = next;
            if cursor == 0 || self.stopping() {
                break;
            }
            // Between chunks the change stream is served (a chunk is whole: read, checked
            // and cleaned), then the pace.
            let chunk_done = Instant::now();
            self.heartbeat_if_due();
            self.serve_changes(Duration::ZERO);
            if self.conn.is_none() {
                return false;
            }
            thread::sleep(pace.saturating_sub(chunk_done.elapsed()));
        }
        tracing::info!(
            "affinity: swept the index after dropped changes: {removed} stale field(s) of this owner removed in {:.1?}",
            started.elapsed()
        );
        true
    }

    fn write_chunk(&mut self, chunk: &[(String, Vec<Vec<u8>>)]) -> bool {
        let mut pipe = redis::pipe();
        let mut n = 0u64;
        for (field, keys) in chunk {
            for k in keys {
                self.push_set(&mut pipe, k, field);
                n += 1;
            }
        }
        let ok = self.query(&pipe);
        if ok {
            self.stats().published.fetch_add(n, Ordering::Relaxed);
        }
        ok
    }

    /// Writes what is still queued (bounded), then deletes the owner key.
    fn shutdown(&mut self) {
        let deadline = Instant::now() + DRAIN_AT_STOP;
        if !self.retry.is_empty() && self.connected() {
            let burst = std::mem::take(&mut self.retry);
            self.write_burst(burst);
        }
        while Instant::now() < deadline && self.conn.is_some() {
            let burst: Vec<Change> = self.changes.rx.try_iter().take(BURST).collect();
            if burst.is_empty() {
                break;
            }
            self.stats()
                .queued
                .fetch_sub(burst.len() as u64, Ordering::Relaxed);
            if !self.write_burst(burst) {
                break;
            }
        }
        if self.conn.is_none() {
            // One try: routers see the key expire after OWNER_TTL otherwise.
            self.next_attempt = Instant::now();
            let _ = self.connected();
        }
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(&self.owner_key).ignore();
        if self.query(&pipe) {
            tracing::info!("affinity: removed owner key {}", self.owner_key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynauth_proto::store::{MemoryStore, TombstonePolicy};

    fn s(nas: &str, id: &str, user: &str) -> Session {
        Session {
            nas: Some(nas.into()),
            acct_session_id: Some(id.into()),
            user_name: Some(user.into()),
            ..Session::default()
        }
    }

    fn text(keys: &[Vec<u8>]) -> Vec<String> {
        keys.iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect()
    }

    fn drain(changes: &Changes) -> Vec<Change> {
        std::iter::from_fn(|| changes.try_next()).collect()
    }

    fn wrapped(capacity: usize) -> (Arc<MemoryStore>, Arc<PublishingStore>, Changes) {
        let inner = Arc::new(MemoryStore::new(TombstonePolicy::default()));
        let (store, changes) =
            PublishingStore::new(Arc::clone(&inner) as Arc<dyn SessionStore>, "o1", capacity);
        (inner, store, changes)
    }

    #[test]
    fn diff_of_a_move_removes_only_what_the_session_lost() {
        let old = s("n", "S1", "alice");
        let mut new = old.clone();
        new.user_name = Some("bob".into());
        let c = diff("o1", Some(&old), Some(&new));
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].field, "o1|n|a:S1");
        assert_eq!(text(&c[0].set), ["user_name=bob"]);
        assert_eq!(text(&c[0].del), ["user_name=alice"]);
        assert!(diff("o1", Some(&old), Some(&old)).is_empty(), "no change");
        let c = diff("o1", None, Some(&old));
        assert_eq!(text(&c[0].set), ["acct_session_id=S1", "user_name=alice"]);
        assert!(c[0].del.is_empty());
    }

    #[test]
    fn wrapper_publishes_upserts_moves_and_removals() {
        let (inner, store, changes) = wrapped(64);
        store
            .upsert(s("n", "S1", "alice"), UpsertMode::Create, 0)
            .unwrap();
        let c = drain(&changes);
        assert_eq!(c.len(), 1);
        assert_eq!(text(&c[0].set), ["acct_session_id=S1", "user_name=alice"]);
        // Replaced with another User-Name: the entry moves.
        assert_eq!(
            store.upsert(s("n", "S1", "bob"), UpsertMode::Create, 0),
            Ok(Upserted::Replaced)
        );
        let c = drain(&changes);
        assert_eq!(c.len(), 1);
        assert_eq!(
            (text(&c[0].set), text(&c[0].del)),
            (vec!["user_name=bob".into()], vec!["user_name=alice".into()])
        );
        // Deleted: every key of the live record (bob's, not the copy's) becomes a tombstone
        // field (a retried Disconnect still reaches this owner), not a removal.
        assert!(store.delete(Some("n"), "S1", 0));
        let c = drain(&changes);
        assert_eq!(text(&c[0].bury), ["acct_session_id=S1", "user_name=bob"]);
        assert!(c[0].del.is_empty());
        assert!(!store.delete(Some("n"), "S1", 0));
        assert!(drain(&changes).is_empty(), "nothing removed, nothing sent");
        assert!(inner.is_empty());
    }

    #[test]
    fn wrapper_publishes_nas_resets_disconnects_and_data_plane_removals() {
        let (_inner, store, changes) = wrapped(64);
        for (nas, id, user) in [("n1", "A", "a"), ("n1", "B", "b"), ("n2", "C", "c")] {
            store
                .upsert(s(nas, id, user), UpsertMode::Create, 0)
                .unwrap();
        }
        drain(&changes);
        assert_eq!(
            store.retain_nas(
                Some("n1"),
                &mut |s| s.acct_session_id.as_deref() == Some("B"),
                0
            ),
            1
        );
        let c = drain(&changes);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].field, "o1|n1|a:A");
        // Table-only Disconnect by User-Name.
        let lookup = Lookup {
            query: SessionQuery {
                user_name: Some(b"b"),
                ..SessionQuery::default()
            },
            scope: MatchScope {
                vrf: None,
                max_sessions: 10,
                tombstone_window_ms: dynauth_proto::store::NO_CLIENT_WINDOW,
            },
            now_ms: 0,
        };
        assert_eq!(store.disconnect(&lookup), Ok(Applied::Sessions(1)));
        let c = drain(&changes);
        assert_eq!(c[0].field, "o1|n1|a:B");
        assert_eq!(text(&c[0].bury), ["acct_session_id=B", "user_name=b"]);
        // A retry finds only the tombstone: nothing is removed, nothing published.
        assert_eq!(store.disconnect(&lookup), Ok(Applied::AlreadyRemoved));
        assert!(drain(&changes).is_empty());
        // The data plane removed a stale copy: the live record's keys go.
        let copy = s("n2", "C", "old-name");
        assert_eq!(store.remove_sessions(&[copy], true, 0), Ok(1));
        let fields: Vec<_> = drain(&changes)
            .into_iter()
            .flat_map(|c| text(&c.bury))
            .collect();
        assert!(fields.contains(&"user_name=c".to_string()), "{fields:?}");
        assert!(store.is_empty());
    }

    #[test]
    fn a_full_queue_drops_counts_and_asks_for_a_resync_without_blocking() {
        let (_inner, store, changes) = wrapped(2);
        for i in 0..5 {
            store
                .upsert(s("n", &format!("S{i}"), "u"), UpsertMode::Create, 0)
                .unwrap();
        }
        assert_eq!(store.len(), 5, "the store took every change");
        assert_eq!(changes.stats().dropped.load(Ordering::Relaxed), 3);
        assert_eq!(changes.stats().queued.load(Ordering::Relaxed), 2);
        assert!(changes.shared.resync.load(Ordering::Acquire));
        assert_eq!(drain(&changes).len(), 2);
        assert_eq!(changes.stats().queued.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_sweep_keeps_exactly_the_fields_a_live_session_backs() {
        let (inner, store, _changes) = wrapped(64);
        store
            .upsert(s("a|b", "S|1", "alice"), UpsertMode::Create, 0)
            .unwrap();
        let inner: &dyn SessionStore = &*inner;
        assert!(
            backs(inner, "a|b|a:S|1", b"user_name=alice"),
            "| in NAS and id"
        );
        assert!(
            !backs(inner, "a|b|a:S|1", b"user_name=bob"),
            "a key it lost"
        );
        assert!(
            !backs(inner, "a|b|a:S2", b"user_name=alice"),
            "another session"
        );
        assert!(!backs(inner, "x|a:S|1", b"user_name=alice"), "another NAS");
        assert!(!backs(inner, "garbage", b"user_name=alice"));
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("redis://:hunter2@10.0.0.1:6379/0"),
            "redis://***@10.0.0.1:6379/0"
        );
        assert_eq!(redact_url("rediss://u:p@h/1"), "rediss://***@h/1");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
    }
}
