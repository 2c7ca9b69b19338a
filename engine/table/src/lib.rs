//! The carrier-scale session table: a [`SessionStore`] for millions of sessions whose
//! lookups never wait for a writer.
//!
//! Owns: indexes for every identification key (SPEC §6), lock-free lookups, all-or-none
//! application of a request to every matched session (RFC 5176 §3), tombstones for late
//! Disconnect retries (SPEC §4), bulk loading from JSON Lines ([`load`]).
//! Must not touch: packets and decisions (`decide`), the reference semantics (`store`:
//! this table reproduces `MemoryStore`'s answers exactly, see the differential test).
//!
//! Structure (details and measurements: `docs/SESSION_TABLE.md`):
//! - records: compact byte encodings (`record.rs`) stored inline in a fixed cell per record
//!   id (or in an overflow arena), read with an optimistic, atomics-only seqlock
//!   (`arena.rs`); a record id is a `u32`;
//! - indexes ([`index`]): key hash to record ids. Unique keys: Acct-Session-Id,
//!   audit-session-id, Chargeable-User-Identity; IMSI (unique with NSAPI), Framed-IP-Address
//!   and Framed-IPv6-Prefix (unique within VRF + Called-Station-Id) are indexed by value and
//!   checked on the record. Multi-valued: Acct-Multi-Session-Id, User-Name,
//!   Calling-Station-Id, NAS-Port-Id, and (extra indexes, free when unused) NAS-Port and
//!   Framed-Interface-Id. Called-Station-Id alone and NSAPI alone (huge groups in practice:
//!   one APN, one NSAPI value for millions) fall back to a scan, refused with
//!   `Refusal::Unavailable` above `TableConfig::max_scan` live sessions; so does a key value
//!   shared by more than `index::MAX_GROUP` sessions (its group is not indexed);
//! - a lookup is one probe of the most selective key's index (`SessionQuery::primary_key`),
//!   every other attribute checked on the record;
//! - writers (disconnect, CoA, insert, tombstone expiry) take one table writer lock that
//!   lookups never take. A request is decided and applied under it, so it applies to all its
//!   sessions or none, also against a concurrent request on overlapping sessions. A request
//!   whose key finds no live session is answered without the lock.
#![forbid(unsafe_code)]

mod arena;
pub mod index;
pub mod load;
mod record;

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use dynauth_proto::change::AuthorizationChange;
use dynauth_proto::session::{PrimaryKey, Session};
use dynauth_proto::store::{Applied, DataPlane, Lookup, Refusal, SessionStore, TombstonePolicy};

use arena::{Arena, ArenaWriter, RecBuf};
pub use index::{FlatIndex, KeyIndex, PapayaIndex};
use record::Keys;

/// Settings of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableConfig {
    pub tombstones: TombstonePolicy,
    /// The most live sessions a scan (Called-Station-Id or NSAPI as the only key) may visit;
    /// above it the request is refused with `Refusal::Unavailable` (NAK 506).
    pub max_scan: usize,
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig {
            tombstones: TombstonePolicy::default(),
            max_scan: 1_000_000,
        }
    }
}

/// Why `SessionTable::try_insert` refused a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InsertError {
    /// A unique key is already taken by the live session with record id `existing`.
    #[error("duplicate {key} (already held by record {existing})")]
    Duplicate { key: &'static str, existing: u32 },
    /// The encoded session is larger than a record may be.
    #[error("session too large ({0} octets encoded)")]
    TooLarge(usize),
    /// The table cannot hold more records.
    #[error("session table full")]
    Full,
}

/// Sizes, for reports and memory accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TableStats {
    pub live: usize,
    pub tombstones: usize,
    /// Octets of records in use (inline in their cells or in overflow blocks).
    pub record_bytes: u64,
    /// Index entries, all indexes together.
    pub index_entries: usize,
}

/// The carrier-scale store. `I` picks the index design; [`FlatIndex`] is the default.
pub struct SessionTable<I: KeyIndex = FlatIndex> {
    arena: Arena,
    acct: I,
    audit: I,
    cui: I,
    imsi: I,
    fip: I,
    v6: I,
    multi: I,
    user: I,
    calling: I,
    port_id: I,
    ifid: I,
    port: I,
    hasher: foldhash::fast::RandomState,
    writer: Mutex<Writer>,
    live: AtomicUsize,
    id_bound: AtomicU32,
    /// Removal time of the oldest tombstone (`u64::MAX`: none), so that lock-free answers
    /// know when expiry is due without touching the writer lock.
    oldest_tombstone: AtomicU64,
    config: TableConfig,
}

/// A table over papaya's epoch-based map (the design that lost: see the docs).
pub type PapayaSessionTable = SessionTable<PapayaIndex>;

#[derive(Default)]
struct Writer {
    arena: ArenaWriter,
    /// (removal time, record id), oldest first.
    tombstones: VecDeque<(u64, u32)>,
    enc: Vec<u8>,
    rec: Box<RecBuf>,
    ids: Vec<u32>,
}

impl<I: KeyIndex> core::fmt::Debug for SessionTable<I> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SessionTable")
            .field("index", &I::NAME)
            .field("live", &self.len())
            .finish_non_exhaustive()
    }
}

impl<I: KeyIndex> Default for SessionTable<I> {
    fn default() -> Self {
        Self::new(TableConfig::default())
    }
}

/// Counts of one selection.
#[derive(Debug, Clone, Copy, Default)]
struct Selection {
    found: u32,
    matched: u32,
    tombstone: bool,
}

impl Selection {
    fn verdict(self, max: u32) -> Result<u32, Refusal> {
        match (self.found, self.matched) {
            (0, _) => Err(Refusal::NotFound),
            (_, 0) => Err(Refusal::Contradicted),
            (_, m) if m > max => Err(Refusal::TooManySessions),
            (_, m) => Ok(m),
        }
    }
}

/// Where a primary key is looked up.
enum Probe<'t, I> {
    Index(&'t I, u64),
    Scan,
}

impl<I: KeyIndex> SessionTable<I> {
    pub fn new(config: TableConfig) -> Self {
        SessionTable {
            arena: Arena::default(),
            acct: I::default(),
            audit: I::default(),
            cui: I::default(),
            imsi: I::default(),
            fip: I::default(),
            v6: I::default(),
            multi: I::default(),
            user: I::default(),
            calling: I::default(),
            port_id: I::default(),
            ifid: I::default(),
            port: I::default(),
            hasher: foldhash::fast::RandomState::default(),
            writer: Mutex::new(Writer::default()),
            live: AtomicUsize::new(0),
            id_bound: AtomicU32::new(0),
            oldest_tombstone: AtomicU64::new(u64::MAX),
            config,
        }
    }

    /// A table holding `sessions` (duplicates of unique keys are skipped).
    pub fn with_sessions(sessions: impl IntoIterator<Item = Session>) -> Self {
        let t = Self::default();
        for s in sessions {
            t.insert(s);
        }
        t
    }

    pub fn config(&self) -> TableConfig {
        self.config
    }

    fn lock(&self) -> MutexGuard<'_, Writer> {
        // The writer state is only changed by code that cannot panic between its updates
        // (data-plane callbacks run after each record's update is complete).
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn h(&self, v: &[u8]) -> u64 {
        self.hasher.hash_one(v)
    }

    fn h_ip(&self, ip: core::net::Ipv4Addr) -> u64 {
        self.hasher.hash_one(u32::from(ip))
    }

    fn h_v6(&self, p: dynauth_proto::codec::Ipv6Prefix) -> u64 {
        self.hasher.hash_one((u128::from(p.addr()), p.len()))
    }

    fn probe_for(&self, key: &PrimaryKey<'_>) -> Probe<'_, I> {
        match *key {
            PrimaryKey::AcctSessionId(v) => Probe::Index(&self.acct, self.h(v)),
            PrimaryKey::AuditSessionId(v) => Probe::Index(&self.audit, self.h(v)),
            PrimaryKey::Cui(v) => Probe::Index(&self.cui, self.h(v)),
            PrimaryKey::Imsi(v) => Probe::Index(&self.imsi, self.h(v)),
            PrimaryKey::FramedIp(ip) => Probe::Index(&self.fip, self.h_ip(ip)),
            PrimaryKey::FramedIpv6Prefix(p) => Probe::Index(&self.v6, self.h_v6(p)),
            PrimaryKey::AcctMultiSessionId(v) => Probe::Index(&self.multi, self.h(v)),
            PrimaryKey::UserName(v) => Probe::Index(&self.user, self.h(v)),
            PrimaryKey::CallingStationId(v) => Probe::Index(&self.calling, self.h(v)),
            PrimaryKey::NasPortId(v) => Probe::Index(&self.port_id, self.h(v)),
            PrimaryKey::FramedInterfaceId(v) => Probe::Index(&self.ifid, self.hasher.hash_one(v)),
            PrimaryKey::NasPort(v) => Probe::Index(&self.port, self.hasher.hash_one(v)),
            PrimaryKey::CalledStationId(_) => Probe::Scan,
        }
    }

    /// Every (index, hash) entry of a record.
    fn entries(&self, k: &Keys<'_>, mut f: impl FnMut(&I, u64)) {
        self.numbered_entries(k, |_, ix, hash| f(ix, hash));
    }

    /// The index by number (`IX_*`).
    fn index(&self, n: usize) -> &I {
        match n {
            IX_ACCT => &self.acct,
            IX_AUDIT => &self.audit,
            IX_CUI => &self.cui,
            IX_IMSI => &self.imsi,
            IX_MULTI => &self.multi,
            IX_USER => &self.user,
            IX_PORT_ID => &self.port_id,
            IX_CALLING => &self.calling,
            IX_FIP => &self.fip,
            IX_V6 => &self.v6,
            IX_IFID => &self.ifid,
            _ => &self.port,
        }
    }

    /// Every (index number, index, hash) entry of a record.
    fn numbered_entries(&self, k: &Keys<'_>, mut f: impl FnMut(usize, &I, u64)) {
        let text = [
            (IX_ACCT, k.acct_session_id),
            (IX_AUDIT, k.audit_session_id),
            (IX_CUI, k.cui),
            (IX_IMSI, k.imsi),
            (IX_MULTI, k.acct_multi_session_id),
            (IX_USER, k.user_name),
            (IX_PORT_ID, k.nas_port_id),
        ];
        for (n, v) in text {
            if let Some(v) = v {
                f(n, self.index(n), self.h(v));
            }
        }
        if let Some(c) = &k.calling_station_id {
            let mut buf = [0u8; 17];
            f(IX_CALLING, &self.calling, self.h(c.as_bytes(&mut buf)));
        }
        if let Some(ip) = k.framed_ip {
            f(IX_FIP, &self.fip, self.h_ip(ip));
        }
        if let Some(p) = k.framed_ipv6_prefix {
            f(IX_V6, &self.v6, self.h_v6(p));
        }
        if let Some(v) = k.framed_interface_id {
            f(IX_IFID, &self.ifid, self.hasher.hash_one(v));
        }
        if let Some(v) = k.nas_port {
            f(IX_PORT, &self.port, self.hasher.hash_one(v));
        }
    }

    /// Bulk load, step one (fresh table, nobody else holds it): stores the record and
    /// collects its index entries in `bulk` instead of inserting them.
    pub(crate) fn bulk_push(&self, session: &Session, bulk: &mut Bulk) -> Result<u32, InsertError> {
        let mut w = self.lock();
        let Writer { enc, arena, .. } = &mut *w;
        record::encode(session, enc);
        if enc.len() > arena::MAX_RECORD {
            return Err(InsertError::TooLarge(enc.len()));
        }
        let id = self.arena.alloc_id(arena).map_err(|_| InsertError::Full)?;
        if self.arena.store(arena, id, enc).is_err() {
            self.arena.free_id(arena, id);
            return Err(InsertError::Full);
        }
        self.id_bound
            .store(Arena::id_bound(arena), Ordering::Release);
        self.numbered_entries(&record::keys_of(session), |n, _, hash| {
            bulk.entries[n].push(u64::from(index::stored_hash(hash)) << 32 | u64::from(id));
        });
        self.live.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    /// Bulk load, step two: sorts each index's entries, checks unique keys (the duplicate
    /// whose later record id is smallest is reported as `(key, first id, later id)`), then
    /// builds every index in one sequential pass.
    pub(crate) fn bulk_finish(&self, bulk: &mut Bulk) -> Result<(), (&'static str, u32, u32)> {
        let mut w = self.lock();
        let mut other = RecBuf::default();
        let mut worst: Option<(&'static str, u32, u32)> = None;
        for (n, entries) in bulk.entries.iter_mut().enumerate() {
            entries.sort_unstable();
            let Some(name) = unique_key_name(n) else {
                continue;
            };
            for run in entries.chunk_by(|a, b| a >> 32 == b >> 32) {
                for (i, &a) in run.iter().enumerate() {
                    for &b in &run[i + 1..] {
                        let (a, b) = (a as u32, b as u32);
                        if worst.is_some_and(|(_, _, later)| later <= b) {
                            continue;
                        }
                        let (Some(ka), Some(kb)) =
                            (self.read_keys(a, &mut w.rec), self.read_keys(b, &mut other))
                        else {
                            continue;
                        };
                        if same_unique_key(n, &ka, &kb) {
                            worst = Some((name, a, b));
                        }
                    }
                }
            }
        }
        if let Some(dup) = worst {
            return Err(dup);
        }
        for (n, entries) in bulk.entries.iter().enumerate() {
            if !entries.is_empty() {
                self.index(n).bulk_build(entries);
            }
        }
        Ok(())
    }

    /// Visits the candidate records of `lookup`'s primary key and counts as `MemoryStore`'s
    /// selection does; `on_match` sees each live match. Lock-free and allocation-free (for
    /// records up to 512 octets).
    fn select(
        &self,
        lookup: &Lookup<'_>,
        buf: &mut RecBuf,
        mut on_match: impl FnMut(u32),
    ) -> Result<Selection, Refusal> {
        let Some(key) = lookup.query.primary_key() else {
            return Err(Refusal::NotFound);
        };
        let window = self.config.tombstones.window_ms;
        let mut sel = Selection::default();
        let mut visit = |id: u32| {
            if !self.arena.read(id, buf) {
                return true;
            }
            let Some(k) = record::decode(buf.bytes()) else {
                return true;
            };
            if !k.admitted_by(&lookup.scope) || !k.found_by(&key, lookup.query.called_station_id) {
                return true;
            }
            match k.removed_at {
                Some(t) => {
                    if t.saturating_add(window) >= lookup.now_ms && k.matched_by(&lookup.query) {
                        sel.tombstone = true;
                    }
                }
                None => {
                    sel.found += 1;
                    if k.matched_by(&lookup.query) {
                        sel.matched += 1;
                        on_match(id);
                    }
                }
            }
            true
        };
        match self.probe_for(&key) {
            Probe::Index(ix, hash) if ix.complete(hash) => ix.probe(hash, visit),
            Probe::Index(..) | Probe::Scan => {
                if self.len() > self.config.max_scan {
                    return Err(Refusal::Unavailable);
                }
                for id in 0..self.id_bound.load(Ordering::Acquire) {
                    visit(id);
                }
            }
        }
        Ok(sel)
    }

    /// What a Disconnect-Request with this lookup would be answered, without changing
    /// anything: lock-free, allocation-free. Several sessions are not read atomically.
    pub fn peek(&self, lookup: &Lookup<'_>) -> Result<Applied, Refusal> {
        let sel = with_buf(|buf| self.select(lookup, buf, |_| {}))?;
        if sel.found == 0 && sel.tombstone {
            return Ok(Applied::AlreadyRemoved);
        }
        sel.verdict(lookup.scope.max_sessions)
            .map(Applied::Sessions)
    }

    /// Copies of the live sessions `lookup` matches (tests, tools). Lock-free.
    pub fn matching(&self, lookup: &Lookup<'_>) -> Vec<Session> {
        let mut ids = Vec::new();
        let mut buf = RecBuf::default();
        let _ = self.select(lookup, &mut buf, |id| ids.push(id));
        ids.into_iter().filter_map(|id| self.session(id)).collect()
    }

    /// The live session with record id `id`.
    fn session(&self, id: u32) -> Option<Session> {
        let mut buf = RecBuf::default();
        if !self.arena.read(id, &mut buf) {
            return None;
        }
        let k = record::decode(buf.bytes())?;
        k.removed_at.is_none().then(|| k.to_session())
    }

    /// Copies of every live session in record-id order (tests, dumps).
    pub fn snapshot(&self) -> Vec<Session> {
        (0..self.id_bound.load(Ordering::Acquire))
            .filter_map(|id| self.session(id))
            .collect()
    }

    pub fn stats(&self) -> TableStats {
        let w = self.lock();
        let ixs = [
            &self.acct,
            &self.audit,
            &self.cui,
            &self.imsi,
            &self.fip,
            &self.v6,
            &self.multi,
            &self.user,
            &self.calling,
            &self.port_id,
            &self.ifid,
            &self.port,
        ];
        TableStats {
            live: self.len(),
            tombstones: w.tombstones.len(),
            record_bytes: w.arena.used_words * 8 + w.arena.inline_bytes,
            index_entries: ixs.iter().map(|i| i.len()).sum(),
        }
    }

    /// The live session holding a unique key of `k`, if any (writer lock held).
    fn conflict(&self, k: &Keys<'_>, buf: &mut RecBuf) -> Option<(&'static str, u32)> {
        let mut found = None;
        let mut check =
            |name: &'static str, ix: &I, hash: u64, same: &dyn Fn(&Keys<'_>) -> bool| {
                if found.is_some() {
                    return;
                }
                let mut visit = |id| {
                    let hit = self.arena.read(id, buf)
                        && record::decode(buf.bytes())
                            .is_some_and(|o| o.removed_at.is_none() && same(&o));
                    if hit {
                        found = Some((name, id));
                    }
                    !hit
                };
                if ix.complete(hash) {
                    ix.probe(hash, visit);
                } else {
                    for id in 0..self.id_bound.load(Ordering::Acquire) {
                        if !visit(id) {
                            break;
                        }
                    }
                }
            };
        if let Some(v) = k.acct_session_id {
            check("acct_session_id", &self.acct, self.h(v), &|o| {
                o.acct_session_id == Some(v)
            });
        }
        if let Some(v) = k.audit_session_id {
            check("audit_session_id", &self.audit, self.h(v), &|o| {
                o.audit_session_id == Some(v)
            });
        }
        if let Some(v) = k.cui {
            check("cui", &self.cui, self.h(v), &|o| o.cui == Some(v));
        }
        if let Some(v) = k.imsi {
            check("imsi+nsapi", &self.imsi, self.h(v), &|o| {
                o.imsi == Some(v) && o.nsapi == k.nsapi
            });
        }
        let same_context =
            |o: &Keys<'_>| o.vrf == k.vrf && o.called_station_id == k.called_station_id;
        if let Some(ip) = k.framed_ip {
            check("framed_ip", &self.fip, self.h_ip(ip), &|o| {
                o.framed_ip == Some(ip) && same_context(o)
            });
        }
        if let Some(p) = k.framed_ipv6_prefix {
            check("framed_ipv6_prefix", &self.v6, self.h_v6(p), &|o| {
                o.framed_ipv6_prefix == Some(p) && same_context(o)
            });
        }
        found
    }

    /// Adds a session; unique keys (Acct-Session-Id, audit-session-id, CUI, IMSI+NSAPI,
    /// Framed-IP-Address and Framed-IPv6-Prefix within VRF + Called-Station-Id) must be free
    /// among live sessions. Returns the record id.
    pub fn try_insert(&self, session: &Session) -> Result<u32, InsertError> {
        let mut w = self.lock();
        let Writer {
            enc, rec, arena, ..
        } = &mut *w;
        record::encode(session, enc);
        if enc.len() > arena::MAX_RECORD {
            return Err(InsertError::TooLarge(enc.len()));
        }
        let keys = record::keys_of(session);
        if let Some((key, existing)) = self.conflict(&keys, rec) {
            return Err(InsertError::Duplicate { key, existing });
        }
        let id = self.arena.alloc_id(arena).map_err(|_| InsertError::Full)?;
        if self.arena.store(arena, id, enc).is_err() {
            self.arena.free_id(arena, id);
            return Err(InsertError::Full);
        }
        self.id_bound
            .store(Arena::id_bound(arena), Ordering::Release);
        // The record is published before any index entry points at it.
        self.entries(&keys, |ix, hash| ix.insert(hash, id));
        self.live.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    /// The control plane's removal (the NAS ended the session itself): removes every live
    /// session `lookup` matches, all or none, without a data-plane hand-off and without a
    /// tombstone (a later Disconnect gets NAK 503, not ACK 201). Returns how many.
    pub fn remove(&self, lookup: &Lookup<'_>) -> Result<u32, Refusal> {
        let mut guard = self.lock();
        let w = &mut *guard;
        let count = self
            .select_locked(w, lookup)?
            .verdict(lookup.scope.max_sessions)?;
        let ids = core::mem::take(&mut w.ids);
        for &id in &ids {
            self.purge(w, id);
            self.live.fetch_sub(1, Ordering::Relaxed);
        }
        w.ids = ids;
        Ok(count)
    }

    /// Drops tombstones older than the window (writer lock held).
    fn expire(&self, w: &mut Writer, now_ms: u64) {
        let window = self.config.tombstones.window_ms;
        while let Some(&(t, id)) = w.tombstones.front() {
            if t.saturating_add(window) >= now_ms {
                break;
            }
            w.tombstones.pop_front();
            self.purge(w, id);
        }
        self.note_oldest(w);
    }

    fn note_oldest(&self, w: &Writer) {
        let oldest = w.tombstones.front().map_or(u64::MAX, |&(t, _)| t);
        self.oldest_tombstone.store(oldest, Ordering::Relaxed);
    }

    /// Expires due tombstones if the writer lock is free right now (never waits).
    fn expire_if_idle(&self, now_ms: u64) {
        let oldest = self.oldest_tombstone.load(Ordering::Relaxed);
        if oldest.saturating_add(self.config.tombstones.window_ms) >= now_ms {
            return;
        }
        if let Ok(mut w) = self.writer.try_lock() {
            self.expire(&mut w, now_ms);
        }
    }

    /// Removes record `id` from every index and frees it (writer lock held).
    fn purge(&self, w: &mut Writer, id: u32) {
        if let Some(k) = self.read_keys(id, &mut w.rec) {
            self.entries(&k, |ix, hash| {
                ix.remove(hash, id);
            });
        }
        self.arena.clear(&mut w.arena, id);
        self.arena.free_id(&mut w.arena, id);
    }

    /// Selects under the writer lock: the matched ids in `w.ids`, or the refusal.
    fn select_locked(&self, w: &mut Writer, lookup: &Lookup<'_>) -> Result<Selection, Refusal> {
        w.ids.clear();
        let Writer { rec, ids, .. } = w;
        self.select(lookup, rec, |id| ids.push(id))
    }

    /// The lock-free first look: `Some(answer)` when no live session is found.
    fn no_live_session(
        &self,
        lookup: &Lookup<'_>,
        tombstones: bool,
    ) -> Option<Result<Applied, Refusal>> {
        match with_buf(|buf| self.select(lookup, buf, |_| {})) {
            Err(r) => Some(Err(r)),
            Ok(sel) if sel.found == 0 => Some(if tombstones && sel.tombstone {
                Ok(Applied::AlreadyRemoved)
            } else {
                Err(Refusal::NotFound)
            }),
            Ok(_) => None,
        }
    }

    /// A Disconnect without any identification attribute (the decisions answer 402 before
    /// asking a store): as `MemoryStore`, NotFound, or AlreadyRemoved when any tombstone in
    /// scope is within its window (an empty query matches every session).
    fn disconnect_without_key(&self, lookup: &Lookup<'_>) -> Result<Applied, Refusal> {
        let mut guard = self.lock();
        let w = &mut *guard;
        self.expire(w, lookup.now_ms);
        let ids: Vec<u32> = w.tombstones.iter().map(|&(_, id)| id).collect();
        for id in ids {
            if self
                .read_keys(id, &mut w.rec)
                .is_some_and(|k| k.admitted_by(&lookup.scope))
            {
                return Ok(Applied::AlreadyRemoved);
            }
        }
        Err(Refusal::NotFound)
    }

    fn read_keys<'b>(&self, id: u32, buf: &'b mut RecBuf) -> Option<Keys<'b>> {
        if !self.arena.read(id, buf) {
            return None;
        }
        record::decode(buf.bytes())
    }
}

thread_local! {
    /// One record buffer per thread for lock-free lookups (no 512-octet initialisation per
    /// lookup).
    static LOOKUP_BUF: core::cell::RefCell<RecBuf> = core::cell::RefCell::new(RecBuf::default());
}

/// Runs `f` once with this thread's lookup buffer (a fresh one if it is in use).
fn with_buf<T>(mut f: impl FnMut(&mut RecBuf) -> T) -> T {
    LOOKUP_BUF
        .try_with(|cell| cell.try_borrow_mut().ok().map(|mut buf| f(&mut buf)))
        .ok()
        .flatten()
        .unwrap_or_else(|| f(&mut RecBuf::default()))
}

const IX_ACCT: usize = 0;
const IX_AUDIT: usize = 1;
const IX_CUI: usize = 2;
const IX_IMSI: usize = 3;
const IX_MULTI: usize = 4;
const IX_USER: usize = 5;
const IX_PORT_ID: usize = 6;
const IX_CALLING: usize = 7;
const IX_FIP: usize = 8;
const IX_V6: usize = 9;
const IX_IFID: usize = 10;
const IX_PORT: usize = 11;

/// The unique key an index carries, by index number.
fn unique_key_name(n: usize) -> Option<&'static str> {
    match n {
        IX_ACCT => Some("acct_session_id"),
        IX_AUDIT => Some("audit_session_id"),
        IX_CUI => Some("cui"),
        IX_IMSI => Some("imsi+nsapi"),
        IX_FIP => Some("framed_ip"),
        IX_V6 => Some("framed_ipv6_prefix"),
        _ => None,
    }
}

/// Whether two records collide on index `n`'s unique key (the rules of `conflict`).
fn same_unique_key(n: usize, a: &Keys<'_>, b: &Keys<'_>) -> bool {
    let context = a.vrf == b.vrf && a.called_station_id == b.called_station_id;
    match n {
        IX_ACCT => a.acct_session_id.is_some() && a.acct_session_id == b.acct_session_id,
        IX_AUDIT => a.audit_session_id.is_some() && a.audit_session_id == b.audit_session_id,
        IX_CUI => a.cui.is_some() && a.cui == b.cui,
        IX_IMSI => a.imsi.is_some() && a.imsi == b.imsi && a.nsapi == b.nsapi,
        IX_FIP => a.framed_ip.is_some() && a.framed_ip == b.framed_ip && context,
        IX_V6 => {
            a.framed_ipv6_prefix.is_some()
                && a.framed_ipv6_prefix == b.framed_ipv6_prefix
                && context
        }
        _ => false,
    }
}

/// Index entries collected by a bulk load, per index.
#[derive(Debug, Default)]
pub(crate) struct Bulk {
    entries: [Vec<u64>; 12],
}

impl<I: KeyIndex> SessionStore for SessionTable<I> {
    fn disconnect(
        &self,
        lookup: &Lookup<'_>,
        data_plane: &dyn DataPlane,
    ) -> Result<Applied, Refusal> {
        if lookup.query.is_empty() {
            return self.disconnect_without_key(lookup);
        }
        if let Some(answer) = self.no_live_session(lookup, true) {
            self.expire_if_idle(lookup.now_ms);
            return answer;
        }
        let mut guard = self.lock();
        let w = &mut *guard;
        self.expire(w, lookup.now_ms);
        let sel = self.select_locked(w, lookup)?;
        if sel.found == 0 && sel.tombstone {
            return Ok(Applied::AlreadyRemoved);
        }
        let count = sel.verdict(lookup.scope.max_sessions)?;
        let ids = core::mem::take(&mut w.ids);
        let mut sessions = Vec::with_capacity(ids.len());
        for &id in &ids {
            if let Some(k) = self.read_keys(id, &mut w.rec) {
                sessions.push(k.to_session());
            }
        }
        if !sessions.iter().all(|s| data_plane.may_remove(s)) {
            w.ids = ids;
            return Err(Refusal::NotRemovable);
        }
        let policy = self.config.tombstones;
        for (&id, session) in ids.iter().zip(&sessions) {
            let Writer {
                rec, enc, arena, ..
            } = &mut *w;
            let mut kept = false;
            if policy.capacity > 0 {
                if let Some(k) = self.read_keys(id, rec) {
                    record::encode_parts(&k, k.authorization, Some(lookup.now_ms), enc);
                    kept = self.arena.store(arena, id, enc).is_ok();
                }
            }
            if kept {
                if w.tombstones.len() >= policy.capacity {
                    if let Some((_, old)) = w.tombstones.pop_front() {
                        self.purge(w, old);
                    }
                }
                w.tombstones.push_back((lookup.now_ms, id));
            } else {
                self.purge(w, id);
            }
            self.live.fetch_sub(1, Ordering::Relaxed);
            data_plane.removed(session);
        }
        w.ids = ids;
        self.note_oldest(w);
        Ok(Applied::Sessions(count))
    }

    fn change(
        &self,
        lookup: &Lookup<'_>,
        change: &AuthorizationChange<'_>,
        data_plane: &dyn DataPlane,
    ) -> Result<Applied, Refusal> {
        if let Some(answer) = self.no_live_session(lookup, false) {
            return answer;
        }
        let mut guard = self.lock();
        let w = &mut *guard;
        let count = self
            .select_locked(w, lookup)?
            .verdict(lookup.scope.max_sessions)?;
        let ids = core::mem::take(&mut w.ids);
        // Phase one: every new record is built and checked before any is published.
        let mut staged = Vec::with_capacity(ids.len());
        for &id in &ids {
            let Some(k) = self.read_keys(id, &mut w.rec) else {
                continue;
            };
            let mut session = k.to_session();
            change.apply_to(&mut session.authorization);
            let mut bytes = Vec::new();
            record::encode(&session, &mut bytes);
            if bytes.len() > arena::MAX_RECORD {
                w.ids = ids;
                return Err(Refusal::Unavailable);
            }
            staged.push((id, bytes, session));
        }
        // Phase two: publish. `store` only fails when the arena is exhausted (2^32 words).
        for (id, bytes, _) in &staged {
            if self.arena.store(&mut w.arena, *id, bytes).is_err() {
                w.ids = ids;
                return Err(Refusal::Unavailable);
            }
        }
        for (_, _, session) in &staged {
            data_plane.changed(session, change);
        }
        w.ids = ids;
        Ok(Applied::Sessions(count))
    }

    fn reauthorize(
        &self,
        lookup: &Lookup<'_>,
        data_plane: &dyn DataPlane,
    ) -> Result<Applied, Refusal> {
        if let Some(answer) = self.no_live_session(lookup, false) {
            return answer;
        }
        let mut guard = self.lock();
        let w = &mut *guard;
        let count = self
            .select_locked(w, lookup)?
            .verdict(lookup.scope.max_sessions)?;
        let ids = core::mem::take(&mut w.ids);
        for &id in &ids {
            if let Some(k) = self.read_keys(id, &mut w.rec) {
                data_plane.reauthorize(&k.to_session());
            }
        }
        w.ids = ids;
        Ok(Applied::Sessions(count))
    }

    fn insert(&self, session: Session) -> bool {
        self.try_insert(&session).is_ok()
    }

    fn len(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests;
