//! The contract between the decisions and wherever sessions live: the `SessionStore` trait
//! and `MemoryStore`, a small, obviously correct store for tests.
//!
//! Owns: the meaning of a lookup (start from the most selective key, check the rest on the
//! record: SPEC §6.4, §6.5), atomic application to every matched session (RFC 5176 §3:
//! all or none; SPEC §6.6, §8), tombstones for Error-Cause 201 (SPEC §4).
//! Must not touch: packets and answers (`verify`, `rules`, `answer`), the feed's ordering
//! (`feed`). The carrier-scale store lives in its own
//! module and implements the same trait.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::change::AuthorizationChange;
use crate::session::{PrimaryKey, Session, SessionQuery};

/// Which sessions a request may see and how many it may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatchScope<'a> {
    /// The client's routing context: only sessions of this VRF are visible (SPEC §6.7).
    pub vrf: Option<&'a str>,
    /// The most sessions one request may act on; more gives NAK 508 (SPEC §6.6).
    pub max_sessions: u32,
    /// How long after its removal a tombstone still answers this request (Disconnect-ACK
    /// with Error-Cause 201, SPEC §4.6): the client's replay window, its Event-Timestamp
    /// window, which is also how long its answers stay in the duplicate cache. Never more
    /// than the store keeps tombstones ([`TombstonePolicy::window_ms`]); [`NO_CLIENT_WINDOW`]
    /// for a lookup that is no client's (the control plane, tools): the store's window.
    pub tombstone_window_ms: u64,
}

/// [`MatchScope::tombstone_window_ms`] of a lookup made for no client: the store's window.
pub const NO_CLIENT_WINDOW: u64 = u64::MAX;

impl MatchScope<'_> {
    /// Whether `session` is visible in this scope.
    pub fn admits(&self, session: &Session) -> bool {
        match self.vrf {
            None => true,
            Some(vrf) => session.vrf.as_deref() == Some(vrf),
        }
    }

    /// Whether a tombstone removed at `removed_at` still answers in this scope at `now_ms`,
    /// in a store that keeps tombstones for `store_window_ms`.
    pub fn tombstone_visible(&self, removed_at: u64, now_ms: u64, store_window_ms: u64) -> bool {
        removed_at.saturating_add(self.tombstone_window_ms.min(store_window_ms)) >= now_ms
    }
}

/// One request's lookup: what identifies the session(s), the scope, and the time.
#[derive(Debug, Clone, Copy)]
pub struct Lookup<'a> {
    pub query: SessionQuery<'a>,
    pub scope: MatchScope<'a>,
    /// Monotonic milliseconds (tombstone expiry).
    pub now_ms: u64,
}

/// What a store did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The request was applied to this many sessions (at least one).
    Sessions(u32),
    /// No live session, but a Disconnect removed a matching one within the tombstone window
    /// (SPEC §4: Disconnect-ACK with Error-Cause 201).
    AlreadyRemoved,
}

/// Why a store did nothing. Each maps to exactly one Error-Cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// No session found by any key (503).
    NotFound,
    /// A key found a session but another identification attribute contradicts it (407).
    Contradicted,
    /// More sessions matched than the scope allows (508).
    TooManySessions,
    /// The data plane refused a removal (504).
    NotRemovable,
    /// The store cannot act now (506).
    Unavailable,
}

/// The two steps of [`SessionStore::touch`]: a batch touches every request's index entry,
/// then every request's record, so that the cache misses of a whole batch overlap instead of
/// coming one request after the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touch {
    /// Load the index entry a lookup by the key starts at.
    Index,
    /// Load the record the index names (its entry is in the cache by now).
    Record,
}

/// The store behind the decisions. Implementations must apply each call to every matched
/// session or to none, also when two calls touch overlapping sessions at the same moment.
/// No call hands anything to a data plane: the table is the table. A request that must reach
/// a data plane first selects (`select`), the data plane acts (`action`), and only what it
/// committed is applied (`remove_sessions`, `change_sessions`), so no data-plane code ever
/// runs under a store's lock.
pub trait SessionStore: Send + Sync {
    /// A hint, before a batch is decided: load what a lookup by `key` will read. Changes
    /// nothing and answers nothing, so it may be given unauthenticated bytes; a store with
    /// nothing worth loading ignores it (the default).
    fn touch(&self, _key: &PrimaryKey<'_>, _step: Touch) {}

    /// [`SessionStore::touch`] for the keys of a whole batch: every key's index entry, then
    /// every key's record. A store may do it in fewer instructions per key than one call
    /// per key and step (so that more of the batch's cache misses are in flight together);
    /// the default is exactly those calls.
    fn touch_all(&self, keys: &[PrimaryKey<'_>]) {
        for step in [Touch::Index, Touch::Record] {
            for key in keys {
                self.touch(key, step);
            }
        }
    }

    /// Removes every session the lookup matches (SPEC §7), leaving tombstones (table-only
    /// mode: the table is the data plane).
    fn disconnect(&self, lookup: &Lookup<'_>) -> Result<Applied, Refusal>;

    /// Applies `change` to every session the lookup matches (SPEC §8, table-only mode).
    fn change(
        &self,
        lookup: &Lookup<'_>,
        change: &AuthorizationChange<'_>,
    ) -> Result<Applied, Refusal>;

    /// The sessions an Authorize Only request would ask to re-authorize (SPEC §8); the
    /// table does not change.
    fn reauthorize(&self, lookup: &Lookup<'_>) -> Result<Applied, Refusal> {
        let mut none = Vec::new();
        self.select(lookup, false, &mut none)
    }

    /// What `disconnect` (`tombstones`: a removed session within its window answers
    /// `AlreadyRemoved`) or `change` would act on, without changing anything: with
    /// `Ok(Applied::Sessions(n))`, copies of the `n` matched sessions are appended to `out`.
    fn select(
        &self,
        lookup: &Lookup<'_>,
        tombstones: bool,
        out: &mut Vec<Session>,
    ) -> Result<Applied, Refusal>;

    /// Removes the live session that is `store::same_session` as each of `sessions` (the
    /// data plane tore them down), atomically for readers, with a tombstone each when
    /// `tombstone` (a Disconnect) or without (a session the data plane did not know).
    /// Returns how many were still live.
    fn remove_sessions(
        &self,
        sessions: &[Session],
        tombstone: bool,
        now_ms: u64,
    ) -> Result<u32, Refusal>;

    /// Applies `change` to the live session that is `store::same_session` as each of
    /// `sessions` (the data plane committed it), all or none. Returns how many were live.
    fn change_sessions(
        &self,
        sessions: &[Session],
        change: &AuthorizationChange<'_>,
        now_ms: u64,
    ) -> Result<u32, Refusal>;

    /// Adds a session (the control plane's add; bulk loads). Returns false when a unique key
    /// is already taken.
    fn insert(&self, session: Session) -> bool;

    /// How many tombstones expired and how many were evicted early (none for a store that
    /// keeps none).
    fn tombstone_stats(&self) -> TombstoneStats {
        TombstoneStats::default()
    }

    /// The session feed's insert-or-replace (`feed::FeedEvent::Upsert`): the live session of
    /// the same NAS with the same Acct-Session-Id (a session without one: the same
    /// audit-session-id, else the same CUI) is replaced by `session`, atomically for readers
    /// (a concurrent lookup finds the old or the new record, never neither). With
    /// `UpsertMode::Refresh` (an Accounting Interim-Update) a session removed within the
    /// tombstone window is not brought back.
    fn upsert(
        &self,
        session: Session,
        mode: UpsertMode,
        now_ms: u64,
    ) -> Result<Upserted, UpsertError>;

    /// Removes the session of `nas` with this Acct-Session-Id (an Accounting Stop, the
    /// feed's Delete), leaving a tombstone. Returns whether one was live.
    fn delete(&self, nas: Option<&str>, acct_session_id: &str, now_ms: u64) -> bool;

    /// Removes every session of `nas` for which `keep` says false, leaving tombstones
    /// (NAS reset: keep nothing; the end of a resync: keep what was re-sent). Returns how
    /// many were removed.
    fn retain_nas(
        &self,
        nas: Option<&str>,
        keep: &mut dyn FnMut(&Session) -> bool,
        now_ms: u64,
    ) -> usize;

    /// The session feed applied event `seq` of `nas` (after the event's own changes): a
    /// durable store records it, so the feed's per-NAS order survives a restart (an old or
    /// repeated event stays ignored, and nothing it removed comes back). Wrappers pass it on.
    fn feed_seq(&self, _nas: Option<&str>, _seq: u64) {}

    /// The session feed's resync of `nas` moved on (`feed::FeedEvent::SyncBegin`, a session
    /// re-sent during it, its end or cancellation): a durable store records it, so a resync
    /// interrupted by a restart still removes exactly the sessions not re-sent when its
    /// `SyncEnd` arrives. Called after the event's own changes; wrappers pass it on.
    fn feed_resync(&self, _nas: Option<&str>, _mark: ResyncMark) {}

    /// Live sessions.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One step of a resync, as [`SessionStore::feed_resync`] is told it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncMark {
    /// A resync began: nothing is re-sent yet (a resync already in progress starts over).
    Begin,
    /// This session was re-sent.
    Resent(crate::feed::ResyncTag),
    /// The resync ended (`SyncEnd`) or was cancelled (`NasReset`): nothing is remembered.
    End,
}

/// How an upsert treats a session that was just removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpsertMode {
    /// A new or re-sent session (Accounting Start, the control socket's upsert): inserted
    /// whatever the tombstones say.
    Create,
    /// A refresh of a session that should exist (Accounting Interim-Update): inserted when
    /// unknown, but never over a tombstone of the same session (no resurrection after Stop).
    Refresh,
}

/// What an upsert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upserted {
    Inserted,
    Replaced,
    /// `UpsertMode::Refresh` of a session removed within the tombstone window: ignored.
    StillRemoved,
}

/// Why an upsert did nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpsertError {
    #[error("the session has no identification attribute")]
    NoIdentification,
    #[error("{0} is already taken by another session")]
    KeyTaken(&'static str),
    /// The session's record is larger than the store can hold, or the store is full.
    #[error("the session does not fit in the store (too large, or the store is full)")]
    TooLarge,
    /// The store refuses writes (a writer panicked; see the session table's docs).
    #[error("the session store refuses writes now")]
    Unavailable,
}

/// How long and how many tombstones a store keeps (SPEC §4.6).
///
/// A tombstone is kept for `window_ms` (dynauthd: the longest replay window of its clients,
/// see [`MatchScope::tombstone_window_ms`] for the window each request sees) unless
/// `capacity` tombstones are newer: then the oldest is evicted early, and counted
/// ([`TombstoneStats::evicted_early`]), because a late Disconnect retry for it now gets
/// NAK 503 instead of ACK 201. Size `capacity` for the storm rate you must ride out:
/// rate x window (100,000 Disconnects/s over 300 s is 30M); each costs about 250 octets in
/// the session table (docs/RUNNING.md, "Tombstones").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TombstonePolicy {
    pub window_ms: u64,
    pub capacity: usize,
}

/// The default tombstone capacity: 2^22, a whole 300 s window up to ~14,000 removals/s, and
/// 42 s of a 100,000/s storm (longer than a DAC's retry schedule).
pub const DEFAULT_TOMBSTONES: usize = 1 << 22;

/// The default tombstone window: the default Event-Timestamp window (300 s).
pub const DEFAULT_TOMBSTONE_WINDOW_MS: u64 = 300_000;

impl Default for TombstonePolicy {
    fn default() -> Self {
        TombstonePolicy {
            window_ms: DEFAULT_TOMBSTONE_WINDOW_MS,
            capacity: DEFAULT_TOMBSTONES,
        }
    }
}

/// What became of tombstones (counted by the store, exported by dynauthd as
/// `dynauth_tombstones_evicted_total{reason}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TombstoneStats {
    /// Left at the end of their window.
    pub expired: u64,
    /// Evicted within their window to make room (the capacity was too small for the removal
    /// rate): a late retry of those Disconnects gets NAK 503, not ACK 201.
    pub evicted_early: u64,
}

/// A small store whose correctness can be read at a glance: one mutex around a vector,
/// linear scans. For tests and tiny deployments; the session table is the carrier store.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
    tombstones: TombstonePolicy,
}

#[derive(Debug, Default)]
struct MemoryInner {
    sessions: Vec<Session>,
    /// Removed sessions with their removal time, oldest first.
    tombstones: VecDeque<(u64, Session)>,
    stats: TombstoneStats,
}

impl MemoryStore {
    pub fn new(tombstones: TombstonePolicy) -> Self {
        MemoryStore {
            inner: Mutex::new(MemoryInner {
                sessions: Vec::new(),
                tombstones: VecDeque::new(),
                stats: TombstoneStats::default(),
            }),
            tombstones,
        }
    }

    pub fn with_sessions(sessions: impl IntoIterator<Item = Session>) -> Self {
        let store = MemoryStore::new(TombstonePolicy::default());
        for s in sessions {
            store.insert(s);
        }
        store
    }

    /// A copy of every live session (tests).
    pub fn snapshot(&self) -> Vec<Session> {
        self.lock().sessions.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        // A panic in another thread cannot leave the vector half-updated: every update below
        // is a single push, retain or assignment, so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Sessions the lookup's primary key finds, then those that satisfy every attribute.
/// `Err` carries the refusal; `Ok` holds how many matched.
fn select(sessions: &[Session], lookup: &Lookup<'_>) -> Result<u32, Refusal> {
    let Some(key) = lookup.query.primary_key() else {
        return Err(Refusal::NotFound);
    };
    let mut found = 0u32;
    let mut matched = 0u32;
    for s in sessions {
        if lookup.scope.admits(s) && key.finds(s, lookup.query.called_station_id) {
            found += 1;
            if lookup.query.matches(s) {
                matched += 1;
            }
        }
    }
    match (found, matched) {
        (0, _) => Err(Refusal::NotFound),
        (_, 0) => Err(Refusal::Contradicted),
        (_, m) if m > lookup.scope.max_sessions => Err(Refusal::TooManySessions),
        (_, m) => Ok(m),
    }
}

fn is_match(s: &Session, lookup: &Lookup<'_>) -> bool {
    lookup.scope.admits(s) && lookup.query.matches(s)
}

impl SessionStore for MemoryStore {
    fn disconnect(&self, lookup: &Lookup<'_>) -> Result<Applied, Refusal> {
        let mut inner = self.lock();
        self.expire(&mut inner, lookup.now_ms);
        let count = match select(&inner.sessions, lookup) {
            Ok(count) => count,
            Err(Refusal::NotFound) if self.tombstone_answers(&inner, lookup) => {
                return Ok(Applied::AlreadyRemoved);
            }
            Err(refusal) => return Err(refusal),
        };
        let mut index = 0;
        while index < inner.sessions.len() {
            if is_match(&inner.sessions[index], lookup) {
                let removed = inner.sessions.swap_remove(index);
                self.bury(&mut inner, removed, lookup.now_ms);
            } else {
                index += 1;
            }
        }
        Ok(Applied::Sessions(count))
    }

    fn change(
        &self,
        lookup: &Lookup<'_>,
        change: &AuthorizationChange<'_>,
    ) -> Result<Applied, Refusal> {
        let mut inner = self.lock();
        let count = select(&inner.sessions, lookup)?;
        for s in inner.sessions.iter_mut().filter(|s| is_match(s, lookup)) {
            change.apply_to(&mut s.authorization);
        }
        Ok(Applied::Sessions(count))
    }

    fn select(
        &self,
        lookup: &Lookup<'_>,
        tombstones: bool,
        out: &mut Vec<Session>,
    ) -> Result<Applied, Refusal> {
        let mut inner = self.lock();
        self.expire(&mut inner, lookup.now_ms);
        let count = match select(&inner.sessions, lookup) {
            Ok(count) => count,
            Err(Refusal::NotFound) if tombstones && self.tombstone_answers(&inner, lookup) => {
                return Ok(Applied::AlreadyRemoved);
            }
            Err(refusal) => return Err(refusal),
        };
        out.extend(
            inner
                .sessions
                .iter()
                .filter(|s| is_match(s, lookup))
                .cloned(),
        );
        Ok(Applied::Sessions(count))
    }

    fn remove_sessions(
        &self,
        sessions: &[Session],
        tombstone: bool,
        now_ms: u64,
    ) -> Result<u32, Refusal> {
        let mut inner = self.lock();
        self.expire(&mut inner, now_ms);
        let mut removed = 0;
        for wanted in sessions {
            if let Some(i) = inner.sessions.iter().position(|s| same_session(s, wanted)) {
                let gone = inner.sessions.swap_remove(i);
                if tombstone {
                    self.bury(&mut inner, gone, now_ms);
                }
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn change_sessions(
        &self,
        sessions: &[Session],
        change: &AuthorizationChange<'_>,
        _now_ms: u64,
    ) -> Result<u32, Refusal> {
        let mut inner = self.lock();
        let mut changed = 0;
        for s in inner
            .sessions
            .iter_mut()
            .filter(|s| sessions.iter().any(|w| same_session(s, w)))
        {
            change.apply_to(&mut s.authorization);
            changed += 1;
        }
        Ok(changed)
    }

    fn insert(&self, session: Session) -> bool {
        let mut inner = self.lock();
        if inner
            .sessions
            .iter()
            .any(|s| unique_clash(s, &session).is_some())
        {
            return false;
        }
        inner.sessions.push(session);
        true
    }

    fn upsert(
        &self,
        session: Session,
        mode: UpsertMode,
        now_ms: u64,
    ) -> Result<Upserted, UpsertError> {
        if !session.has_identification() {
            return Err(UpsertError::NoIdentification);
        }
        let mut guard = self.lock();
        let MemoryInner {
            sessions,
            tombstones,
            ..
        } = &mut *guard;
        let window = self.tombstones.window_ms;
        let live_tombstone = |t: &u64| t.saturating_add(window) >= now_ms;
        match sessions.iter().position(|s| same_session(s, &session)) {
            Some(i) => {
                let clash = sessions
                    .iter()
                    .enumerate()
                    .find_map(|(j, s)| (j != i).then(|| unique_clash(s, &session)).flatten());
                if let Some(name) = clash {
                    return Err(UpsertError::KeyTaken(name));
                }
                sessions[i] = session;
                Ok(Upserted::Replaced)
            }
            None => {
                if mode == UpsertMode::Refresh
                    && tombstones
                        .iter()
                        .any(|(t, s)| live_tombstone(t) && same_session(s, &session))
                {
                    return Ok(Upserted::StillRemoved);
                }
                if let Some(name) = sessions.iter().find_map(|s| unique_clash(s, &session)) {
                    return Err(UpsertError::KeyTaken(name));
                }
                sessions.push(session);
                Ok(Upserted::Inserted)
            }
        }
    }

    fn delete(&self, nas: Option<&str>, acct_session_id: &str, now_ms: u64) -> bool {
        let mut guard = self.lock();
        let Some(i) = guard.sessions.iter().position(|s| {
            s.nas.as_deref() == nas && s.acct_session_id.as_deref() == Some(acct_session_id)
        }) else {
            return false;
        };
        let removed = guard.sessions.swap_remove(i);
        self.bury(&mut guard, removed, now_ms);
        true
    }

    fn retain_nas(
        &self,
        nas: Option<&str>,
        keep: &mut dyn FnMut(&Session) -> bool,
        now_ms: u64,
    ) -> usize {
        let mut guard = self.lock();
        let mut removed = 0;
        let mut i = 0;
        while i < guard.sessions.len() {
            let s = &guard.sessions[i];
            if s.nas.as_deref() == nas && !keep(s) {
                let gone = guard.sessions.swap_remove(i);
                self.bury(&mut guard, gone, now_ms);
                removed += 1;
            } else {
                i += 1;
            }
        }
        removed
    }

    fn len(&self) -> usize {
        self.lock().sessions.len()
    }

    fn tombstone_stats(&self) -> TombstoneStats {
        self.lock().stats
    }
}

impl MemoryStore {
    /// Drops tombstones older than the window.
    fn expire(&self, inner: &mut MemoryInner, now_ms: u64) {
        let window = self.tombstones.window_ms;
        while inner
            .tombstones
            .front()
            .is_some_and(|(t, _)| t.saturating_add(window) < now_ms)
        {
            inner.tombstones.pop_front();
            inner.stats.expired += 1;
        }
    }

    /// Whether a tombstone within the lookup's window matches it.
    fn tombstone_answers(&self, inner: &MemoryInner, lookup: &Lookup<'_>) -> bool {
        let window = self.tombstones.window_ms;
        inner.tombstones.iter().any(|(t, s)| {
            lookup.scope.tombstone_visible(*t, lookup.now_ms, window) && is_match(s, lookup)
        })
    }

    fn bury(&self, inner: &mut MemoryInner, session: Session, now_ms: u64) {
        if self.tombstones.capacity == 0 {
            return;
        }
        if inner.tombstones.len() >= self.tombstones.capacity
            && let Some((t, _)) = inner.tombstones.pop_front()
        {
            if t.saturating_add(self.tombstones.window_ms) >= now_ms {
                inner.stats.evicted_early += 1;
            } else {
                inner.stats.expired += 1;
            }
        }
        inner.tombstones.push_back((now_ms, session));
    }
}

/// Whether `a` and `b` are the same session for the feed: the same NAS and the same
/// Acct-Session-Id; sessions without one, the same audit-session-id, else the same CUI.
pub fn same_session(a: &Session, b: &Session) -> bool {
    if a.nas != b.nas {
        return false;
    }
    let same = |x: &Option<String>, y: &Option<String>| x.is_some() && x == y;
    match (&a.acct_session_id, &b.acct_session_id) {
        (Some(x), Some(y)) => x == y,
        (None, None) => same(&a.audit_session_id, &b.audit_session_id) || same(&a.cui, &b.cui),
        _ => false,
    }
}

/// The unique key `existing` already holds that `new` also claims, if any: Acct-Session-Id
/// (per NAS), audit-session-id, CUI.
fn unique_clash(existing: &Session, new: &Session) -> Option<&'static str> {
    let same = |a: &Option<String>, b: &Option<String>| a.is_some() && a == b;
    if existing.nas == new.nas && same(&existing.acct_session_id, &new.acct_session_id) {
        return Some("acct_session_id");
    }
    if same(&existing.audit_session_id, &new.audit_session_id) {
        return Some("audit_session_id");
    }
    if same(&existing.cui, &new.cui) {
        return Some("cui");
    }
    None
}

/// Tests' wrapper stores: the required [`SessionStore`] methods, each handed to the
/// `MemoryStore` in field `$inner`, so a test store writes only the hooks it watches.
#[cfg(test)]
macro_rules! delegate_to_memory_store {
    ($inner:ident) => {
        fn disconnect(
            &self,
            l: &$crate::store::Lookup<'_>,
        ) -> Result<$crate::store::Applied, $crate::store::Refusal> {
            self.$inner.disconnect(l)
        }
        fn change(
            &self,
            l: &$crate::store::Lookup<'_>,
            c: &$crate::change::AuthorizationChange<'_>,
        ) -> Result<$crate::store::Applied, $crate::store::Refusal> {
            self.$inner.change(l, c)
        }
        fn select(
            &self,
            l: &$crate::store::Lookup<'_>,
            t: bool,
            out: &mut Vec<$crate::session::Session>,
        ) -> Result<$crate::store::Applied, $crate::store::Refusal> {
            self.$inner.select(l, t, out)
        }
        fn remove_sessions(
            &self,
            s: &[$crate::session::Session],
            t: bool,
            now: u64,
        ) -> Result<u32, $crate::store::Refusal> {
            self.$inner.remove_sessions(s, t, now)
        }
        fn change_sessions(
            &self,
            s: &[$crate::session::Session],
            c: &$crate::change::AuthorizationChange<'_>,
            now: u64,
        ) -> Result<u32, $crate::store::Refusal> {
            self.$inner.change_sessions(s, c, now)
        }
        fn insert(&self, s: $crate::session::Session) -> bool {
            self.$inner.insert(s)
        }
        fn upsert(
            &self,
            s: $crate::session::Session,
            m: $crate::store::UpsertMode,
            now: u64,
        ) -> Result<$crate::store::Upserted, $crate::store::UpsertError> {
            self.$inner.upsert(s, m, now)
        }
        fn delete(&self, nas: Option<&str>, id: &str, now: u64) -> bool {
            self.$inner.delete(nas, id, now)
        }
        fn retain_nas(
            &self,
            nas: Option<&str>,
            keep: &mut dyn FnMut(&$crate::session::Session) -> bool,
            now: u64,
        ) -> usize {
            self.$inner.retain_nas(nas, keep, now)
        }
        fn len(&self) -> usize {
            self.$inner.len()
        }
    };
}
#[cfg(test)]
pub(crate) use delegate_to_memory_store;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::SessionQuery;
    use core::net::Ipv4Addr;

    fn s(id: &str, user: &str) -> Session {
        Session {
            acct_session_id: Some(id.into()),
            user_name: Some(user.into()),
            ..Default::default()
        }
    }

    fn lookup(query: SessionQuery<'_>, max: u32) -> Lookup<'_> {
        Lookup {
            query,
            scope: MatchScope {
                vrf: None,
                max_sessions: max,
                tombstone_window_ms: NO_CLIENT_WINDOW,
            },
            now_ms: 1_000,
        }
    }

    // SPEC §6.6 (RFC 5176 §3): several matches apply to all; a cap gives 508 and nothing.
    #[test]
    fn rfc5176_s3_multi_session_all_or_cap() {
        let store = MemoryStore::with_sessions([s("a", "u"), s("b", "u"), s("c", "v")]);
        let q = SessionQuery {
            user_name: Some(b"u"),
            ..Default::default()
        };
        assert_eq!(
            store.disconnect(&lookup(q, 1)),
            Err(Refusal::TooManySessions)
        );
        assert_eq!(store.len(), 3);
        assert_eq!(store.disconnect(&lookup(q, 10)), Ok(Applied::Sessions(2)));
        assert_eq!(store.len(), 1);
    }

    // SPEC §6.5: a key finds a session, another attribute contradicts it: 407.
    #[test]
    fn spec_6_5_contradiction_is_distinct_from_not_found() {
        let store = MemoryStore::with_sessions([s("a", "u")]);
        let q = SessionQuery {
            acct_session_id: Some(b"a"),
            user_name: Some(b"other"),
            ..Default::default()
        };
        assert_eq!(store.disconnect(&lookup(q, 10)), Err(Refusal::Contradicted));
        let q = SessionQuery {
            acct_session_id: Some(b"zzz"),
            ..Default::default()
        };
        assert_eq!(store.disconnect(&lookup(q, 10)), Err(Refusal::NotFound));
    }

    // RFC 5176 §2.1 (ACK after commit): selecting changes nothing; only the sessions the
    // data plane committed are removed, each leaving a tombstone (SPEC §4), and a session
    // the data plane did not know leaves none.
    #[test]
    fn rfc5176_s2_1_select_then_remove_exactly_what_committed() {
        let store = MemoryStore::with_sessions([s("a", "u"), s("b", "u"), s("c", "v")]);
        let q = SessionQuery {
            user_name: Some(b"u"),
            ..Default::default()
        };
        let mut selected = Vec::new();
        assert_eq!(
            store.select(&lookup(q, 10), true, &mut selected),
            Ok(Applied::Sessions(2))
        );
        assert_eq!(selected.len(), 2);
        assert_eq!(store.len(), 3, "select changes nothing");
        let (a, b) = (&selected[0..1], &selected[1..2]);
        assert_eq!(store.remove_sessions(a, true, 0), Ok(1));
        assert_eq!(store.remove_sessions(b, false, 0), Ok(1));
        assert_eq!(store.remove_sessions(a, true, 0), Ok(0), "already gone");
        assert_eq!(store.len(), 1);
        let by_id = |id: &'static [u8]| SessionQuery {
            acct_session_id: Some(id),
            ..Default::default()
        };
        let tombstoned = a[0].acct_session_id.clone().unwrap();
        let forgotten = b[0].acct_session_id.clone().unwrap();
        let q_t = by_id(if tombstoned == "a" { b"a" } else { b"b" });
        let q_f = by_id(if forgotten == "a" { b"a" } else { b"b" });
        assert_eq!(
            store.disconnect(&lookup(q_t, 10)),
            Ok(Applied::AlreadyRemoved)
        );
        assert_eq!(store.disconnect(&lookup(q_f, 10)), Err(Refusal::NotFound));
    }

    // SPEC §4: a tombstone answers a late retry within the window, and expires.
    #[test]
    fn spec_4_tombstone_then_expiry() {
        let store = MemoryStore::new(TombstonePolicy {
            window_ms: 500,
            capacity: 4,
        });
        store.insert(s("a", "u"));
        let q = SessionQuery {
            acct_session_id: Some(b"a"),
            ..Default::default()
        };
        assert_eq!(store.disconnect(&lookup(q, 10)), Ok(Applied::Sessions(1)));
        assert_eq!(
            store.disconnect(&lookup(q, 10)),
            Ok(Applied::AlreadyRemoved)
        );
        let late = Lookup {
            now_ms: 1_000 + 501,
            ..lookup(q, 10)
        };
        assert_eq!(store.disconnect(&late), Err(Refusal::NotFound));
    }

    #[test]
    fn vrf_scope_hides_other_contexts() {
        let mut a = s("a", "u");
        a.framed_ip = Some(Ipv4Addr::new(10, 0, 0, 1));
        a.vrf = Some("red".into());
        let store = MemoryStore::with_sessions([a]);
        let q = SessionQuery {
            framed_ip: Some(Ipv4Addr::new(10, 0, 0, 1)),
            ..Default::default()
        };
        let mut l = lookup(q, 10);
        l.scope.vrf = Some("blue");
        assert_eq!(store.disconnect(&l), Err(Refusal::NotFound));
        l.scope.vrf = Some("red");
        assert_eq!(store.disconnect(&l), Ok(Applied::Sessions(1)));
    }

    #[test]
    fn insert_refuses_duplicate_unique_key() {
        let store = MemoryStore::default();
        assert!(store.insert(s("a", "u")));
        assert!(!store.insert(s("a", "v")));
        assert!(store.insert(s("b", "u")));
    }
}
