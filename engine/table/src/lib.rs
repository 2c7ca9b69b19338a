//! The carrier-scale session table: a [`SessionStore`] for millions of sessions whose
//! lookups never wait for a writer.
//!
//! Owns: indexes for every identification key (SPEC §6), lock-free lookups, all-or-none
//! application of a request to every matched session (RFC 5176 §3), tombstones for late
//! Disconnect retries (SPEC §4), the session feed's writes (`upsert`, `delete`, `retain_nas`:
//! `dynauth_proto::feed`), bulk loading from JSON Lines ([`load`]).
//! Must not touch: packets and decisions (`decide`), the reference semantics (`store`:
//! this table reproduces `MemoryStore`'s answers exactly, see the differential test).
//!
//! Structure (details and measurements: `docs/SESSION_TABLE.md`):
//! - records: compact byte encodings (`record.rs`) stored inline in a fixed cell per record
//!   id (or in an overflow arena), read with an optimistic, atomics-only seqlock
//!   (`arena.rs`); a record id is a `u32`;
//! - indexes ([`index`]): key hash to record ids, one per indexed `Key`, in the array
//!   `indexes` numbered by `Key::index` (the key table in `dynauth_proto::session` says
//!   which keys are indexed and unique). Unique keys: Acct-Session-Id (per NAS,
//!   `Session::nas`: NASes reuse them; the index is keyed on the id alone and the NAS is
//!   checked on the record), audit-session-id, Chargeable-User-Identity; IMSI (unique with NSAPI), Framed-IP-Address and
//!   Framed-IPv6-Prefix (unique within VRF + Called-Station-Id) are indexed by value and
//!   checked on the record. Multi-valued: Acct-Multi-Session-Id, User-Name,
//!   Calling-Station-Id, NAS-Port-Id, and (extra indexes, free when unused) NAS-Port and
//!   Framed-Interface-Id. Called-Station-Id alone (a huge group in practice: one APN for
//!   millions) falls back to a scan, refused with `Refusal::Unavailable` above
//!   `TableConfig::max_scan` live sessions; so does a key value shared by more than
//!   `index::MAX_GROUP` sessions (its group is not indexed);
//! - a lookup is one probe of the most selective key's index (`SessionQuery::primary_key`),
//!   every other attribute checked on the record;
//! - writers (disconnect, CoA, insert, the feed's upsert / delete / retain_nas, tombstone
//!   expiry) take one table writer lock that lookups never take. A request is decided and
//!   applied under it, so it applies to all its sessions or none, also against a concurrent
//!   request on overlapping sessions. A request whose key finds no live session is answered
//!   without the lock. A writer that panics holding the lock (a data-plane callback, say)
//!   poisons the table for writers: every later write is refused (NAK 506 / the feed's
//!   errors), counted and logged once; lookups go on (`SessionTable::is_poisoned`).
//!
//! Upsert (the feed's insert-or-replace) is atomic for lock-free readers. The live record of
//! the same session (`store::same_session`, found by one probe of the Acct-Session-Id index,
//! or of the audit-session-id and CUI indexes for sessions without one) is replaced in place:
//! 1. the new version is stored into the same record id with `Arena::store`, the seqlock
//!    publish (one header store; a reader copies the old version or the new one, whole);
//! 2. then index entries are inserted for the key values the new version has and the old one
//!    had not;
//! 3. then the entries of values the old version had and the new one has not are removed.
//!
//! An entry `(hash, id)` of a value both versions hold is never touched, so a lookup by any
//! key the two share probes the same entry throughout and reads one of the two versions: it
//! finds the session exactly once — never none (as delete-then-insert would allow), never
//! twice (as insert-then-delete would). A lookup by a key only the new version holds may miss
//! the session until step 2 (it did not have that key yet); one by a key only the old version
//! held may still reach the record until step 3 and then reads the new version, which no
//! longer matches. The record id never changes, so neither does any id a lookup collected.
//! Delete is one probe of the Acct-Session-Id index (the NAS checked on the record);
//! `retain_nas` is one pass over the record ids, handing `keep` one reused `Session`. Both
//! turn records into tombstones exactly as `disconnect` does (`bury`).
#![forbid(unsafe_code)]

mod arena;
pub mod index;
pub mod load;
mod record;

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};

use dynauth_proto::change::AuthorizationChange;
use dynauth_proto::session::{HasKeys, Key, KeyValue, PrimaryKey, Session, Uniqueness};
use dynauth_proto::store::{
    Applied, Lookup, Refusal, SessionStore, TombstonePolicy, Touch, UpsertError, UpsertMode,
    Upserted,
};

use arena::{Arena, ArenaWriter, RecBuf};
pub use index::{FlatIndex, KeyIndex, PapayaIndex};
use record::Keys;

/// Writes `session` in the table's compact record encoding (`record.rs`: the present keys
/// in `Key` order, the VRF, the NAS, the authorization as JSON) into `out` (cleared first).
/// The state journal of `dynauthd` stores sessions in this form.
pub fn encode_session(session: &Session, out: &mut Vec<u8>) {
    record::encode(session, out);
}

/// The session `encode_session` wrote; `None` for bytes no encoder wrote (never a panic).
pub fn decode_session(bytes: &[u8]) -> Option<Session> {
    record::decode(bytes).map(Keys::to_session)
}

/// Settings of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableConfig {
    pub tombstones: TombstonePolicy,
    /// The most live sessions a scan (Called-Station-Id as the only key) may visit;
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
    /// The table is poisoned: a writer panicked while holding the writer lock
    /// ([`SessionTable::is_poisoned`]), so no write is accepted any more.
    #[error("session table poisoned by a panicked writer")]
    Unavailable,
    /// Bytes that `encode_session` did not write (a bulk load of encoded records).
    #[error("not an encoded session")]
    Malformed,
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
    /// One index per indexed key, by `Key::index` (`Key::ALL[..Key::INDEXED]`).
    indexes: [I; Key::INDEXED],
    hasher: foldhash::fast::RandomState,
    writer: Mutex<Writer>,
    live: AtomicUsize,
    id_bound: AtomicU32,
    /// Removal time of the oldest tombstone (`u64::MAX`: none), so that lock-free answers
    /// know when expiry is due without touching the writer lock.
    oldest_tombstone: AtomicU64,
    /// Set (and logged) on the first write refused because a writer panicked while holding
    /// the writer lock.
    poison_logged: AtomicBool,
    /// Writes refused because the table is poisoned.
    poison_refusals: AtomicU64,
    /// Tombstones that left at the end of their window.
    tombstones_expired: AtomicU64,
    /// Tombstones evicted within their window at capacity (SPEC §4.6: a late retry of those
    /// gets NAK 503 instead of ACK 201; the operator sees the window was cut short).
    tombstones_evicted_early: AtomicU64,
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
    /// A CoA's new versions, staged before any is published (`change_ids`): record id and
    /// encoding; the encodings' buffers are kept for the next CoA.
    staged: Vec<(u32, Vec<u8>)>,
    /// The authorization's JSON while a record is encoded (`record::encode_reusing`).
    json: Vec<u8>,
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
        Self::with_arena(config, Arena::default())
    }

    fn with_arena(config: TableConfig, arena: Arena) -> Self {
        SessionTable {
            arena,
            indexes: core::array::from_fn(|_| I::default()),
            hasher: foldhash::fast::RandomState::default(),
            writer: Mutex::new(Writer::default()),
            live: AtomicUsize::new(0),
            id_bound: AtomicU32::new(0),
            oldest_tombstone: AtomicU64::new(u64::MAX),
            poison_logged: AtomicBool::new(false),
            poison_refusals: AtomicU64::new(0),
            tombstones_expired: AtomicU64::new(0),
            tombstones_evicted_early: AtomicU64::new(0),
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

    /// The writer lock, or `Poisoned` when a writer panicked while holding it (a data-plane
    /// callback, a bug, an allocation failure). Such a writer may have stopped between two
    /// updates that belong together (some of a Disconnect's sessions buried and the rest
    /// not, index entries added for a replaced record but the old ones not removed, the
    /// tombstone FIFO or the free lists half updated), so carrying on could answer wrongly
    /// or damage the table further. The table is then poisoned for writers, for good:
    /// every later write is refused (`Refusal::Unavailable`, NAK 506, or the feed methods'
    /// errors), counted (`poison_refusals`) and logged once. Lookups never take this lock,
    /// so they keep answering from what was published.
    fn lock(&self) -> Result<MutexGuard<'_, Writer>, Poisoned> {
        self.writer.lock().map_err(|_| self.refuse_poisoned())
    }

    /// Counts a write refused because the table is poisoned; logs the first.
    #[cold]
    fn refuse_poisoned(&self) -> Poisoned {
        self.poison_refusals.fetch_add(1, Ordering::Relaxed);
        if !self.poison_logged.swap(true, Ordering::Relaxed) {
            eprintln!(
                "dynauth-table: a writer panicked while holding the session table's writer \
                 lock; the table is poisoned: every write is refused from now on (NAK 506), \
                 lookups go on"
            );
        }
        Poisoned
    }

    /// Whether a writer panicked while holding the writer lock: every write is refused
    /// since (see `lock`); lookups still answer.
    pub fn is_poisoned(&self) -> bool {
        self.writer.is_poisoned()
    }

    /// How many writes were refused because the table is poisoned.
    pub fn poison_refusals(&self) -> u64 {
        self.poison_refusals.load(Ordering::Relaxed)
    }

    /// The hash a key value is indexed under.
    fn hash(&self, v: KeyValue<'_>) -> u64 {
        match v {
            KeyValue::Text(t) => self.hasher.hash_one(t),
            KeyValue::Ipv4(ip) => self.hasher.hash_one(u32::from(ip)),
            KeyValue::Ipv6Prefix(p) => self.hasher.hash_one((u128::from(p.addr()), p.len())),
            KeyValue::U64(v) => self.hasher.hash_one(v),
            KeyValue::U32(v) => self.hasher.hash_one(v),
        }
    }

    /// The index of `key`; `None` for the keys looked up by scan.
    fn index(&self, key: Key) -> Option<&I> {
        key.index().and_then(|n| self.indexes.get(n))
    }

    fn probe_for(&self, key: &PrimaryKey<'_>) -> Probe<'_, I> {
        match self.index(key.key) {
            Some(ix) => Probe::Index(ix, self.hash(key.value)),
            None => Probe::Scan,
        }
    }

    /// Every (index, hash) entry of a record.
    fn entries(&self, k: &Keys<'_>, mut f: impl FnMut(&I, u64)) {
        self.numbered_entries(k, |_, ix, hash| f(ix, hash));
    }

    /// Every (index number, index, hash) entry of a record.
    fn numbered_entries(&self, k: &Keys<'_>, mut f: impl FnMut(usize, &I, u64)) {
        for key in Key::ALL {
            let mut buf = [0u8; 17];
            let (Some(n), Some(value)) = (key.index(), k.value(key, &mut buf)) else {
                continue;
            };
            if let Some(ix) = self.indexes.get(n) {
                f(n, ix, self.hash(value));
            }
        }
    }

    /// Bulk load, step one (fresh table, nobody else holds it): stores the record and
    /// collects its index entries in `bulk` instead of inserting them.
    pub(crate) fn bulk_push(&self, session: &Session, bulk: &mut Bulk) -> Result<u32, InsertError> {
        let mut w = self.lock().map_err(|_| InsertError::Unavailable)?;
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

    /// [`SessionTable::bulk_push`] of a record already encoded (`encode_session`'s bytes, as
    /// a snapshot holds them): no decode into a `Session`, no encode again.
    pub(crate) fn bulk_push_encoded(
        &self,
        rec: &[u8],
        bulk: &mut Bulk,
    ) -> Result<u32, InsertError> {
        let keys = record::decode(rec).ok_or(InsertError::Malformed)?;
        if rec.len() > arena::MAX_RECORD {
            return Err(InsertError::TooLarge(rec.len()));
        }
        let mut w = self.lock().map_err(|_| InsertError::Unavailable)?;
        let Writer { arena, .. } = &mut *w;
        let id = self.arena.alloc_id(arena).map_err(|_| InsertError::Full)?;
        if self.arena.store(arena, id, rec).is_err() {
            self.arena.free_id(arena, id);
            return Err(InsertError::Full);
        }
        self.id_bound
            .store(Arena::id_bound(arena), Ordering::Release);
        self.numbered_entries(&keys, |n, _, hash| {
            bulk.entries[n].push(u64::from(index::stored_hash(hash)) << 32 | u64::from(id));
        });
        self.live.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    /// Bulk load, step two: sorts each index's entries, checks unique keys (the duplicate
    /// whose later record id is smallest is reported as `(key, first id, later id)`), then
    /// builds every index in one sequential pass.
    pub(crate) fn bulk_finish(&self, bulk: &mut Bulk) -> Result<(), (&'static str, u32, u32)> {
        // Only `load` calls this, on the table it created and holds alone: a panic of one of
        // its writes unwinds out of `load` and drops the table, so it is never poisoned here.
        let mut w = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut other = RecBuf::default();
        let mut worst: Option<(&'static str, u32, u32)> = None;
        for key in Key::ALL {
            let Some(entries) = key.index().and_then(|n| bulk.entries.get_mut(n)) else {
                continue;
            };
            entries.sort_unstable();
            if key.uniqueness() == Uniqueness::Shared {
                continue;
            }
            let name = unique_name(key);
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
                        if same_unique_key(key, &ka, &kb) {
                            worst = Some((name, a, b));
                        }
                    }
                }
            }
        }
        if let Some(dup) = worst {
            return Err(dup);
        }
        for (ix, entries) in self.indexes.iter().zip(&bulk.entries) {
            if !entries.is_empty() {
                ix.bulk_build(entries);
            }
        }
        Ok(())
    }

    /// Visits the candidate records of `lookup`'s primary key and counts as `MemoryStore`'s
    /// selection does; `on_match` sees each live match. Lock-free and allocation-free (for
    /// records up to 512 octets).
    fn visit_matches(
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
            if !k.admitted_by(&lookup.scope) || !key.finds(&k, lookup.query.called_station_id) {
                return true;
            }
            match k.removed_at {
                Some(t) => {
                    if lookup.scope.tombstone_visible(t, lookup.now_ms, window)
                        && lookup.query.matches(&k)
                    {
                        sel.tombstone = true;
                    }
                }
                None => {
                    sel.found += 1;
                    if lookup.query.matches(&k) {
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
        let sel = with_buf(|buf| self.visit_matches(lookup, buf, |_| {}))?;
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
        let _ = self.visit_matches(lookup, &mut buf, |id| ids.push(id));
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

    /// Calls `f` with every live session in record-id order, one reused `Session` (a
    /// snapshot writer streams them without collecting). Lock-free: sessions written
    /// during the pass may or may not be seen (a fuzzy snapshot; `dynauthd`'s state
    /// module replays the journal from before the pass over it).
    pub fn for_each_session(&self, mut f: impl FnMut(&Session)) {
        let mut buf = RecBuf::default();
        let mut session = Session::default();
        for id in 0..self.id_bound.load(Ordering::Acquire) {
            if !self.arena.read(id, &mut buf) {
                continue;
            }
            let Some(k) = record::decode(buf.bytes()) else {
                continue;
            };
            if k.removed_at.is_none() {
                k.fill_session(&mut session);
                f(&session);
            }
        }
    }

    /// The tombstones, oldest first: (removal time, the session as it was removed).
    pub fn tombstones(&self) -> Vec<(u64, Session)> {
        let ids: Vec<(u64, u32)> = {
            let w = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
            w.tombstones.iter().copied().collect()
        };
        let mut buf = RecBuf::default();
        ids.into_iter()
            .filter_map(|(t, id)| {
                let k = self.read_keys(id, &mut buf)?;
                (k.removed_at == Some(t)).then(|| (t, k.to_session()))
            })
            .collect()
    }

    /// The live session that is `store::same_session` as `identity`, if any.
    pub fn current(&self, identity: &Session) -> Option<Session> {
        let keys = record::keys_of(identity);
        let mut buf = RecBuf::default();
        let (live, _) = self.find_same(&keys, 0, &mut buf);
        live.and_then(|id| self.session(id))
    }

    /// Puts back a tombstone of `session` removed at `removed_at` (a restore): indexed
    /// like any tombstone, appended to the tombstone FIFO (callers restore oldest first),
    /// no unique-key check (tombstones hold none). False when the record does not fit or
    /// the table refuses writes.
    pub fn restore_tombstone(&self, session: &Session, removed_at: u64) -> bool {
        let policy = self.config.tombstones;
        if policy.capacity == 0 {
            return false;
        }
        let Ok(mut guard) = self.lock() else {
            return false;
        };
        let w = &mut *guard;
        let keys = record::keys_of(session);
        let auth = (session.authorization != dynauth_proto::session::Authorization::default())
            .then(|| serde_json::to_vec(&session.authorization).unwrap_or_default());
        record::encode_parts(&keys, auth.as_deref(), Some(removed_at), &mut w.enc);
        if w.enc.len() > arena::MAX_RECORD {
            return false;
        }
        let Ok(id) = self.arena.alloc_id(&mut w.arena) else {
            return false;
        };
        if self.arena.store(&mut w.arena, id, &w.enc).is_err() {
            self.arena.free_id(&mut w.arena, id);
            return false;
        }
        self.id_bound
            .store(Arena::id_bound(&w.arena), Ordering::Release);
        self.entries(&keys, |ix, hash| ix.insert(hash, id));
        self.evict_for_one_more(w, removed_at);
        w.tombstones.push_back((removed_at, id));
        self.note_oldest(w);
        true
    }

    pub fn stats(&self) -> TableStats {
        // Read only (counters), so a poisoned lock is no reason to refuse.
        let w = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        TableStats {
            live: self.len(),
            tombstones: w.tombstones.len(),
            record_bytes: w.arena.used_words * 8 + w.arena.inline_bytes,
            index_entries: self.indexes.iter().map(KeyIndex::len).sum(),
        }
    }

    /// The live session other than record `except` holding a unique key of `k`, if any
    /// (writer lock held).
    fn conflict(
        &self,
        k: &Keys<'_>,
        except: Option<u32>,
        buf: &mut RecBuf,
    ) -> Option<(&'static str, u32)> {
        for key in Key::ALL {
            if key.uniqueness() == Uniqueness::Shared {
                continue;
            }
            let mut text = [0u8; 17];
            let Some(value) = k.value(key, &mut text) else {
                continue;
            };
            let mut found = None;
            self.candidates(key, value, |id| {
                let hit = Some(id) != except
                    && self.arena.read(id, buf)
                    && record::decode(buf.bytes())
                        .is_some_and(|o| o.removed_at.is_none() && same_unique_key(key, k, &o));
                if hit {
                    found = Some(id);
                }
                !hit
            });
            if let Some(id) = found {
                return Some((unique_name(key), id));
            }
        }
        None
    }

    /// Calls `f` with every record id that may hold `value` of indexed `key` (one index
    /// probe; a scan of every id when the key's group is not indexed completely) until `f`
    /// returns false. Callers check the key on the record.
    fn candidates(&self, key: Key, value: KeyValue<'_>, mut f: impl FnMut(u32) -> bool) {
        let hash = self.hash(value);
        match self.index(key) {
            Some(ix) if ix.complete(hash) => ix.probe(hash, f),
            _ => {
                for id in 0..self.id_bound.load(Ordering::Acquire) {
                    if !f(id) {
                        break;
                    }
                }
            }
        }
    }

    /// Adds a session; unique keys (Acct-Session-Id, audit-session-id, CUI, IMSI+NSAPI,
    /// Framed-IP-Address and Framed-IPv6-Prefix within VRF + Called-Station-Id) must be free
    /// among live sessions. Returns the record id.
    pub fn try_insert(&self, session: &Session) -> Result<u32, InsertError> {
        let mut w = self.lock().map_err(|_| InsertError::Unavailable)?;
        self.insert_locked(&mut w, session)
    }

    /// `try_insert` with the writer lock held.
    fn insert_locked(&self, w: &mut Writer, session: &Session) -> Result<u32, InsertError> {
        let Writer {
            enc, rec, arena, ..
        } = w;
        record::encode(session, enc);
        if enc.len() > arena::MAX_RECORD {
            return Err(InsertError::TooLarge(enc.len()));
        }
        let keys = record::keys_of(session);
        if let Some((key, existing)) = self.conflict(&keys, None, rec) {
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
        let mut guard = self.lock().map_err(|_| Refusal::Unavailable)?;
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
            self.tombstones_expired.fetch_add(1, Ordering::Relaxed);
        }
        self.note_oldest(w);
    }

    /// At capacity, evicts the oldest tombstone to make room for one removed at `now_ms`,
    /// counted as early when it was still within the window (writer lock held).
    fn evict_for_one_more(&self, w: &mut Writer, now_ms: u64) {
        let policy = self.config.tombstones;
        if w.tombstones.len() >= policy.capacity
            && let Some((t, old)) = w.tombstones.pop_front()
        {
            self.purge(w, old);
            let counter = if t.saturating_add(policy.window_ms) >= now_ms {
                &self.tombstones_evicted_early
            } else {
                &self.tombstones_expired
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many tombstones expired and how many were evicted early.
    pub fn tombstone_stats(&self) -> dynauth_proto::store::TombstoneStats {
        dynauth_proto::store::TombstoneStats {
            expired: self.tombstones_expired.load(Ordering::Relaxed),
            evicted_early: self.tombstones_evicted_early.load(Ordering::Relaxed),
        }
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
        match self.writer.try_lock() {
            Ok(mut w) => self.expire(&mut w, now_ms),
            // Poisoned: expiry is a write like any other, left undone.
            Err(TryLockError::Poisoned(_) | TryLockError::WouldBlock) => {}
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
        self.visit_matches(lookup, rec, |id| ids.push(id))
    }

    /// The lock-free first look: `Some(answer)` when no live session is found.
    fn no_live_session(
        &self,
        lookup: &Lookup<'_>,
        tombstones: bool,
    ) -> Option<Result<Applied, Refusal>> {
        match with_buf(|buf| self.visit_matches(lookup, buf, |_| {})) {
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
        let mut guard = self.lock().map_err(|_| Refusal::Unavailable)?;
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

    /// Turns live record `id` into a tombstone removed at `now_ms` (same id, same index
    /// entries, in the tombstone FIFO; the oldest tombstone is evicted at capacity), or
    /// purges it when no tombstones are kept. Writer lock held; the caller updates
    /// `oldest_tombstone` (`note_oldest`) when done.
    fn bury(&self, w: &mut Writer, id: u32, now_ms: u64) {
        let policy = self.config.tombstones;
        let Writer {
            rec, enc, arena, ..
        } = &mut *w;
        let mut kept = false;
        if policy.capacity > 0
            && let Some(k) = self.read_keys(id, rec)
        {
            record::encode_parts(&k, k.authorization, Some(now_ms), enc);
            kept = self.arena.store(arena, id, enc).is_ok();
        }
        if kept {
            self.evict_for_one_more(w, now_ms);
            w.tombstones.push_back((now_ms, id));
        } else {
            self.purge(w, id);
        }
        self.live.fetch_sub(1, Ordering::Relaxed);
    }

    /// The record of the same session as `new` for the feed (`store::same_session`: the same
    /// NAS and Acct-Session-Id; without one, the same audit-session-id or CUI): the live one,
    /// if any, and whether a tombstone of it removed within the window at `now_ms` exists.
    /// Index probes only (writer lock held).
    fn find_same(&self, new: &Keys<'_>, now_ms: u64, buf: &mut RecBuf) -> (Option<u32>, bool) {
        let window = self.config.tombstones.window_ms;
        let mut live = None;
        let mut tomb = false;
        let probes: &[Key] = if new.stored(Key::AcctSessionId).is_some() {
            &[Key::AcctSessionId]
        } else {
            &[Key::AuditSessionId, Key::Cui]
        };
        for &key in probes {
            let mut text = [0u8; 17];
            let Some(value) = new.value(key, &mut text) else {
                continue;
            };
            self.candidates(key, value, |id| {
                let Some(old) = self.read_keys(id, buf) else {
                    return true;
                };
                if !same_session(&old, new) {
                    return true;
                }
                match old.removed_at {
                    None => live = live.or(Some(id)),
                    Some(t) => tomb |= t.saturating_add(window) >= now_ms,
                }
                true
            });
        }
        (live, tomb)
    }

    /// Replaces live record `id` by `session` in place, atomically for lock-free readers
    /// (see the module documentation): the new version is published in the same record id
    /// under the seqlock, then index entries are added for key values the old version did
    /// not have and removed for those the new one no longer has. An entry of a key value
    /// both versions share is never touched, so a lookup by it finds this record id
    /// throughout, and reads either version whole: one session, never none, never two.
    fn replace(&self, w: &mut Writer, id: u32, session: &Session) -> Result<(), UpsertError> {
        let Writer {
            rec, enc, arena, ..
        } = w;
        record::encode(session, enc);
        if enc.len() > arena::MAX_RECORD {
            return Err(UpsertError::TooLarge);
        }
        let mut old = [None; Key::INDEXED];
        if let Some(k) = self.read_keys(id, rec) {
            self.numbered_entries(&k, |n, _, hash| old[n] = Some(hash));
        }
        let mut new = [None; Key::INDEXED];
        self.numbered_entries(&record::keys_of(session), |n, _, hash| new[n] = Some(hash));
        self.arena
            .store(arena, id, enc)
            .map_err(|_| UpsertError::TooLarge)?;
        // An index entry is (stored hash, id): equal stored hashes are the same entry.
        let stored = |h: Option<u64>| h.map(index::stored_hash);
        for (n, ix) in self.indexes.iter().enumerate() {
            if let Some(hash) = new[n].filter(|_| stored(new[n]) != stored(old[n])) {
                ix.insert(hash, id);
            }
        }
        for (n, ix) in self.indexes.iter().enumerate() {
            if let Some(hash) = old[n].filter(|_| stored(new[n]) != stored(old[n])) {
                ix.remove(hash, id);
            }
        }
        Ok(())
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

/// The name a duplicate of unique `key` is reported by: its field name, and for the IMSI,
/// unique together with the NSAPI, "imsi+nsapi".
fn unique_name(key: Key) -> &'static str {
    match key.uniqueness() {
        Uniqueness::WithNsapi => "imsi+nsapi",
        Uniqueness::Shared | Uniqueness::Unique | Uniqueness::InContext => key.name(),
    }
}

/// Whether two records collide on unique `key` (`Key::uniqueness`): both hold the same value
/// and, for IMSI, the same NSAPI or none, for addresses, the same routing context.
fn same_unique_key(key: Key, a: &Keys<'_>, b: &Keys<'_>) -> bool {
    let mut buf = [0u8; 17];
    let Some(value) = a.value(key, &mut buf) else {
        return false;
    };
    b.has_key(key, value)
        && match key.uniqueness() {
            Uniqueness::Shared => false,
            // Acct-Session-Id is unique per NAS (NASes reuse them, RFC 2866 §5.5); the other
            // unique keys are unique in the whole table.
            Uniqueness::Unique => key != Key::AcctSessionId || a.nas == b.nas,
            Uniqueness::WithNsapi => a.same(b, Key::Nsapi),
            Uniqueness::InContext => a.vrf == b.vrf && a.same(b, Key::CalledStationId),
        }
}

/// The writer lock is poisoned: a writer panicked while holding it.
#[derive(Debug, Clone, Copy)]
struct Poisoned;

/// `store::same_session` on records: the same NAS and the same Acct-Session-Id; sessions
/// without one, the same audit-session-id, else the same CUI.
fn same_session(a: &Keys<'_>, b: &Keys<'_>) -> bool {
    if a.nas != b.nas {
        return false;
    }
    let both = |key: Key| a.stored(key).is_some() && a.same(b, key);
    match (a.stored(Key::AcctSessionId), b.stored(Key::AcctSessionId)) {
        (Some(_), Some(_)) => a.same(b, Key::AcctSessionId),
        (None, None) => both(Key::AuditSessionId) || both(Key::Cui),
        _ => false,
    }
}

/// Index entries collected by a bulk load, per index.
#[derive(Debug, Default)]
pub(crate) struct Bulk {
    entries: [Vec<u64>; Key::INDEXED],
}

/// The capacity a CoA's staging buffer starts with (records are usually under 100 octets).
const STAGED_RECORD: usize = 256;

impl<I: KeyIndex> SessionTable<I> {
    /// Applies `change` to live records `ids`, all or none (writer lock held).
    fn change_ids(
        &self,
        w: &mut Writer,
        ids: &[u32],
        change: &AuthorizationChange<'_>,
    ) -> Result<(), Refusal> {
        // Phase one: every new record is built and checked before any is published (into
        // the writer's staging buffers, kept from one CoA to the next).
        let mut n = 0;
        for &id in ids {
            let Some(k) = self.read_keys(id, &mut w.rec) else {
                continue;
            };
            let mut session = k.to_session();
            change.apply_to(&mut session.authorization);
            if w.staged.len() <= n {
                // Room for a usual record, so that later CoAs reuse it without growing it.
                w.staged.push((id, Vec::with_capacity(STAGED_RECORD)));
            }
            let slot = &mut w.staged[n];
            slot.0 = id;
            record::encode_reusing(&session, &mut w.json, &mut slot.1);
            if slot.1.len() > arena::MAX_RECORD {
                return Err(Refusal::Unavailable);
            }
            n += 1;
        }
        let staged = &w.staged[..n];
        // Phase two: storage for every new version is reserved before any is published; when
        // one cannot be had (the arena is exhausted) every reservation is given back and no
        // record has changed (all or none, RFC 5176 §3).
        let mut reserved = Vec::with_capacity(staged.len());
        for (id, bytes) in staged {
            match self.arena.reserve(&mut w.arena, *id, bytes.len()) {
                Ok(r) => reserved.push(r),
                Err(_) => {
                    for r in reserved {
                        self.arena.unreserve(&mut w.arena, r);
                    }
                    return Err(Refusal::Unavailable);
                }
            }
        }
        // Phase three: publish; cannot fail.
        for ((id, bytes), r) in staged.iter().zip(reserved) {
            self.arena.publish(&mut w.arena, *id, r, bytes);
        }
        Ok(())
    }

    /// The live record ids of the sessions that are `same_session` as each of `sessions`
    /// (writer lock held).
    fn live_ids_of(&self, w: &mut Writer, sessions: &[Session], now_ms: u64) -> Vec<u32> {
        let mut ids = Vec::with_capacity(sessions.len());
        for session in sessions {
            let keys = record::keys_of(session);
            if let (Some(id), _) = self.find_same(&keys, now_ms, &mut w.rec)
                && !ids.contains(&id)
            {
                ids.push(id);
            }
        }
        ids
    }
}

/// What [`SessionTable::disconnect_recording`] hands each removed session's identity to.
pub type IdentitySink<'a> = dyn FnMut(&[u8]) + 'a;

impl<I: KeyIndex> SessionTable<I> {
    /// [`SessionStore::disconnect`] that also hands `removed` the identity of each session
    /// it removes (NAS, Acct-Session-Id, audit-session-id, CUI, in the octets
    /// [`encode_session`] writes for a session with only those fields), under the writer
    /// lock, before the session is buried: what a journal records of a Disconnect, without
    /// decoding the session or a second lookup. Allocation-free when warm.
    pub fn disconnect_recording(
        &self,
        lookup: &Lookup<'_>,
        removed: &mut dyn FnMut(&[u8]),
    ) -> Result<Applied, Refusal> {
        self.disconnect_observed(lookup, Some(removed))
    }

    fn disconnect_observed(
        &self,
        lookup: &Lookup<'_>,
        mut removed: Option<&mut IdentitySink<'_>>,
    ) -> Result<Applied, Refusal> {
        if lookup.query.is_empty() {
            return self.disconnect_without_key(lookup);
        }
        if let Some(answer) = self.no_live_session(lookup, true) {
            self.expire_if_idle(lookup.now_ms);
            return answer;
        }
        let mut guard = self.lock().map_err(|_| Refusal::Unavailable)?;
        let w = &mut *guard;
        self.expire(w, lookup.now_ms);
        let sel = self.select_locked(w, lookup)?;
        if sel.found == 0 && sel.tombstone {
            return Ok(Applied::AlreadyRemoved);
        }
        let count = sel.verdict(lookup.scope.max_sessions)?;
        let ids = core::mem::take(&mut w.ids);
        for &id in &ids {
            if let Some(removed) = removed.as_mut()
                && let Some(k) = self.read_keys(id, &mut w.rec)
            {
                record::encode_identity(&k, &mut w.enc);
                removed(&w.enc);
            }
            self.bury(w, id, lookup.now_ms);
        }
        w.ids = ids;
        self.note_oldest(w);
        Ok(Applied::Sessions(count))
    }
}

impl<I: KeyIndex> SessionStore for SessionTable<I> {
    /// Index: the probe's first slot; Record: the cell of the first entry whose stored
    /// hash matches. Plain loads, handed to `black_box`: the misses of a batch's touches
    /// overlap, and what they load is what the decisions then find in the cache.
    fn touch(&self, key: &PrimaryKey<'_>, step: Touch) {
        let Some(ix) = self.index(key.key) else {
            return;
        };
        let hash = self.hash(key.value);
        match step {
            Touch::Index => {
                std::hint::black_box(ix.touch(hash));
            }
            Touch::Record => ix.probe(hash, |id| {
                std::hint::black_box(self.arena.touch(id));
                false
            }),
        }
    }

    /// The batch's keys hashed first (no memory touched), then every index entry in one
    /// tight loop per run of keys of one kind, then every record: more of the batch's misses
    /// in flight together than one `touch` per key and step allows (plain loads stall
    /// retirement, so fewer instructions between them mean more of them issued).
    fn touch_all(&self, keys: &[PrimaryKey<'_>]) {
        const CHUNK: usize = 64;
        for keys in keys.chunks(CHUNK) {
            let mut hashes = [0u64; CHUNK];
            for (h, key) in hashes.iter_mut().zip(keys) {
                *h = self.hash(key.value);
            }
            let hashes = hashes.get(..keys.len()).unwrap_or_default();
            let mut loaded = 0u64;
            let mut start = 0;
            for run in keys.chunk_by(|a, b| a.key == b.key) {
                let end = start + run.len();
                if let (Some(ix), Some(run_hashes)) = (
                    run.first().and_then(|k| self.index(k.key)),
                    hashes.get(start..end),
                ) {
                    loaded ^= ix.touch_many(run_hashes);
                }
                start = end;
            }
            for (key, &h) in keys.iter().zip(hashes) {
                if let Some(ix) = self.index(key.key) {
                    ix.probe(h, |id| {
                        loaded ^= self.arena.touch(id);
                        false
                    });
                }
            }
            std::hint::black_box(loaded);
        }
    }

    fn disconnect(&self, lookup: &Lookup<'_>) -> Result<Applied, Refusal> {
        self.disconnect_observed(lookup, None)
    }

    fn change(
        &self,
        lookup: &Lookup<'_>,
        change: &AuthorizationChange<'_>,
    ) -> Result<Applied, Refusal> {
        if let Some(answer) = self.no_live_session(lookup, false) {
            return answer;
        }
        let mut guard = self.lock().map_err(|_| Refusal::Unavailable)?;
        let w = &mut *guard;
        let count = self
            .select_locked(w, lookup)?
            .verdict(lookup.scope.max_sessions)?;
        let ids = core::mem::take(&mut w.ids);
        let changed = self.change_ids(w, &ids, change);
        w.ids = ids;
        changed.map(|()| Applied::Sessions(count))
    }

    fn reauthorize(&self, lookup: &Lookup<'_>) -> Result<Applied, Refusal> {
        if let Some(answer) = self.no_live_session(lookup, false) {
            return answer;
        }
        with_buf(|buf| self.visit_matches(lookup, buf, |_| {}))?
            .verdict(lookup.scope.max_sessions)
            .map(Applied::Sessions)
    }

    fn select(
        &self,
        lookup: &Lookup<'_>,
        tombstones: bool,
        out: &mut Vec<Session>,
    ) -> Result<Applied, Refusal> {
        if lookup.query.is_empty() {
            return if tombstones {
                self.disconnect_without_key(lookup)
            } else {
                Err(Refusal::NotFound)
            };
        }
        let mut ids = Vec::new();
        let sel = with_buf(|buf| self.visit_matches(lookup, buf, |id| ids.push(id)))?;
        if tombstones && sel.found == 0 && sel.tombstone {
            return Ok(Applied::AlreadyRemoved);
        }
        let count = sel.verdict(lookup.scope.max_sessions)?;
        // Lock-free: a session replaced or removed between the probe and this read is
        // skipped; the commit finds sessions by identity again under the writer lock.
        out.extend(ids.into_iter().filter_map(|id| self.session(id)));
        Ok(Applied::Sessions(count))
    }

    fn remove_sessions(
        &self,
        sessions: &[Session],
        tombstone: bool,
        now_ms: u64,
    ) -> Result<u32, Refusal> {
        let mut guard = self.lock().map_err(|_| Refusal::Unavailable)?;
        let w = &mut *guard;
        self.expire(w, now_ms);
        let ids = self.live_ids_of(w, sessions, now_ms);
        for &id in &ids {
            if tombstone {
                self.bury(w, id, now_ms);
            } else {
                self.purge(w, id);
                self.live.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.note_oldest(w);
        Ok(ids.len() as u32)
    }

    fn change_sessions(
        &self,
        sessions: &[Session],
        change: &AuthorizationChange<'_>,
        now_ms: u64,
    ) -> Result<u32, Refusal> {
        let mut guard = self.lock().map_err(|_| Refusal::Unavailable)?;
        let w = &mut *guard;
        let ids = self.live_ids_of(w, sessions, now_ms);
        self.change_ids(w, &ids, change)?;
        Ok(ids.len() as u32)
    }

    fn insert(&self, session: Session) -> bool {
        self.try_insert(&session).is_ok()
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
        let mut guard = self.lock().map_err(|_| UpsertError::Unavailable)?;
        let w = &mut *guard;
        self.expire(w, now_ms);
        let keys = record::keys_of(&session);
        let (live, tombstone) = self.find_same(&keys, now_ms, &mut w.rec);
        if let Some(id) = live {
            if let Some((name, _)) = self.conflict(&keys, Some(id), &mut w.rec) {
                return Err(UpsertError::KeyTaken(name));
            }
            self.replace(w, id, &session)?;
            return Ok(Upserted::Replaced);
        }
        if mode == UpsertMode::Refresh && tombstone {
            return Ok(Upserted::StillRemoved);
        }
        match self.insert_locked(w, &session) {
            Ok(_) => Ok(Upserted::Inserted),
            Err(InsertError::Duplicate { key, .. }) => Err(UpsertError::KeyTaken(key)),
            Err(InsertError::TooLarge(_) | InsertError::Full | InsertError::Malformed) => {
                Err(UpsertError::TooLarge)
            }
            Err(InsertError::Unavailable) => Err(UpsertError::Unavailable),
        }
    }

    fn delete(&self, nas: Option<&str>, acct_session_id: &str, now_ms: u64) -> bool {
        let Ok(mut guard) = self.lock() else {
            return false;
        };
        let w = &mut *guard;
        self.expire(w, now_ms);
        let wanted = KeyValue::Text(acct_session_id.as_bytes());
        let nas = nas.map(str::as_bytes);
        let mut found = None;
        let rec = &mut w.rec;
        self.candidates(Key::AcctSessionId, wanted, |id| {
            let hit = self.read_keys(id, rec).is_some_and(|k| {
                k.removed_at.is_none() && k.nas == nas && k.has_key(Key::AcctSessionId, wanted)
            });
            if hit {
                found = Some(id);
            }
            !hit
        });
        let Some(id) = found else {
            return false;
        };
        self.bury(w, id, now_ms);
        self.note_oldest(w);
        true
    }

    fn retain_nas(
        &self,
        nas: Option<&str>,
        keep: &mut dyn FnMut(&Session) -> bool,
        now_ms: u64,
    ) -> usize {
        let Ok(mut guard) = self.lock() else {
            return 0;
        };
        let w = &mut *guard;
        self.expire(w, now_ms);
        let nas = nas.map(str::as_bytes);
        // One pass over the record ids; the session handed to `keep` is one reused value.
        let mut session = Session::default();
        let mut removed = 0;
        for id in 0..self.id_bound.load(Ordering::Acquire) {
            let Some(k) = self.read_keys(id, &mut w.rec) else {
                continue;
            };
            if k.removed_at.is_some() || k.nas != nas {
                continue;
            }
            k.fill_session(&mut session);
            if keep(&session) {
                continue;
            }
            self.bury(w, id, now_ms);
            removed += 1;
        }
        self.note_oldest(w);
        removed
    }

    fn len(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    fn tombstone_stats(&self) -> dynauth_proto::store::TombstoneStats {
        SessionTable::tombstone_stats(self)
    }
}

#[cfg(test)]
mod tests;
