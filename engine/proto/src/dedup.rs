//! The duplicate-request cache (RFC 5080 §2.2.2, RFC 5176 §2.3; SPEC §4).
//!
//! Owns: recognising a retransmission by (source address, source port, Code, Identifier,
//! Request Authenticator), replaying the cached answer byte for byte, and dropping a copy of
//! a request still in flight. Time is passed in (monotonic milliseconds).
//!
//! Memory is fixed at construction: at most `max_entries` answers, stored in a byte ring of
//! `arena_bytes`. Answers are kept in arrival order; an entry leaves when its window (the
//! client's Event-Timestamp window) has passed, or earlier when room is needed for a new
//! answer: then the oldest answer is dropped and `evicted_early` counts it. A retransmission
//! of an answer dropped early is processed again as a new request (for a Disconnect whose
//! session is gone, the tombstone still answers it with 201). Nothing here allocates after
//! construction. Must not touch: authentication or decisions. Its public methods accept only an
//! [`Authenticated`] request (built by `verify` once every security check passed: Request
//! Authenticator, Message-Authenticator, Event-Timestamp window, Proxy-State limit), because the
//! key covers only the first 20 octets.
#![forbid(unsafe_code)]

use core::net::SocketAddr;
use std::collections::VecDeque;

use core::hash::BuildHasher;

use hashbrown::{HashMap, HashTable};

use crate::client::canonical;
use crate::verify::Authenticated;

/// What identifies a retransmission (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DuplicateKey {
    pub source: SocketAddr,
    pub code: u8,
    pub identifier: u8,
    pub authenticator: [u8; 16],
}

impl DuplicateKey {
    pub(crate) fn new(
        source: SocketAddr,
        code: u8,
        identifier: u8,
        authenticator: [u8; 16],
    ) -> Self {
        DuplicateKey {
            source: SocketAddr::new(canonical(source.ip()), source.port()),
            code,
            identifier,
            authenticator,
        }
    }
}

/// Sizing of one cache (one per shard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupConfig {
    pub max_entries: usize,
    pub arena_bytes: usize,
    pub max_in_flight: usize,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            max_entries: 65_536,
            arena_bytes: 8 << 20,
            max_in_flight: 4_096,
        }
    }
}

/// The result of looking a request up.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen<'c> {
    /// Not seen within the window: process it.
    New,
    /// Answered already: send these bytes again.
    Answered(&'c [u8]),
    /// A copy is being processed: drop this one (SPEC §2.7).
    InFlight,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    key: DuplicateKey,
    hash: u64,
    expires_ms: u64,
    offset: usize,
    len: usize,
}

/// Counters the cache keeps about itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DedupStats {
    pub stored: u64,
    pub expired: u64,
    /// Answers dropped before their window ended, to make room.
    pub evicted_early: u64,
    /// Answers larger than the whole arena, never cached.
    pub too_large: u64,
    /// Requests that could not be marked in flight because that table was full.
    pub in_flight_full: u64,
}

/// A bounded duplicate cache.
#[derive(Debug)]
pub struct DuplicateCache {
    config: DedupConfig,
    hasher: foldhash::fast::RandomState,
    /// Sequence numbers of the cached answers, by their key's hash.
    index: HashTable<u64>,
    /// The last key looked up and its hash: `seen` then `complete` hash a request once.
    last_hash: Option<(DuplicateKey, u64)>,
    in_flight: HashMap<DuplicateKey, u64, foldhash::fast::RandomState>,
    entries: VecDeque<Entry>,
    /// Sequence number of `entries.front()`.
    front_seq: u64,
    arena: Box<[u8]>,
    write_pos: usize,
    stats: DedupStats,
}

impl DuplicateCache {
    pub fn new(config: DedupConfig) -> Self {
        DuplicateCache {
            hasher: foldhash::fast::RandomState::default(),
            index: HashTable::with_capacity(config.max_entries),
            last_hash: None,
            in_flight: HashMap::with_capacity_and_hasher(
                config.max_in_flight,
                foldhash::fast::RandomState::default(),
            ),
            entries: VecDeque::with_capacity(config.max_entries),
            front_seq: 0,
            arena: vec![0u8; config.arena_bytes].into_boxed_slice(),
            write_pos: 0,
            stats: DedupStats::default(),
            config,
        }
    }

    pub fn stats(&self) -> DedupStats {
        self.stats
    }

    /// Answers currently cached.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Looks an authenticated request up. Expired answers are treated as unseen.
    pub fn seen(&mut self, request: &Authenticated<'_>, now_ms: u64) -> Seen<'_> {
        self.seen_key(&request.duplicate_key(), now_ms)
    }

    /// Marks an authenticated request as being processed until `complete` or `abandon`.
    /// Returns false (and counts it) when the in-flight table is full; the request is then
    /// processed unmarked.
    pub fn begin(&mut self, request: &Authenticated<'_>, expires_ms: u64) -> bool {
        self.begin_key(request.duplicate_key(), expires_ms)
    }

    /// The request was dropped without an answer: forget it.
    pub fn abandon(&mut self, request: &Authenticated<'_>) {
        self.abandon_key(&request.duplicate_key());
    }

    /// Stores the answer to `request`, kept until `expires_ms`.
    pub fn complete(
        &mut self,
        request: &Authenticated<'_>,
        answer: &[u8],
        now_ms: u64,
        expires_ms: u64,
    ) {
        self.complete_key(request.duplicate_key(), answer, now_ms, expires_ms);
    }

    pub(crate) fn seen_key(&mut self, key: &DuplicateKey, now_ms: u64) -> Seen<'_> {
        self.expire(now_ms);
        if !self.in_flight.is_empty() && self.in_flight.contains_key(key) {
            return Seen::InFlight;
        }
        let hash = self.hash_of(key);
        let Some(entry) = self.find(hash, key) else {
            return Seen::New;
        };
        if entry.expires_ms < now_ms {
            return Seen::New;
        }
        match self.arena.get(entry.offset..entry.offset + entry.len) {
            Some(bytes) => Seen::Answered(bytes),
            None => Seen::New,
        }
    }

    pub(crate) fn begin_key(&mut self, key: DuplicateKey, expires_ms: u64) -> bool {
        if self.in_flight.len() >= self.config.max_in_flight {
            self.stats.in_flight_full += 1;
            return false;
        }
        self.in_flight.insert(key, expires_ms);
        true
    }

    pub(crate) fn abandon_key(&mut self, key: &DuplicateKey) {
        self.in_flight.remove(key);
    }

    pub(crate) fn complete_key(
        &mut self,
        key: DuplicateKey,
        answer: &[u8],
        now_ms: u64,
        expires_ms: u64,
    ) {
        if !self.in_flight.is_empty() {
            self.in_flight.remove(&key);
        }
        self.expire(now_ms);
        let len = answer.len();
        if len >= self.arena.len() || self.config.max_entries == 0 {
            self.stats.too_large += 1;
            return;
        }
        let hash = self.hash_of(&key);
        // An expired answer to the same key may still be in the ring: drop its index entry.
        let (entries, front) = (&self.entries, self.front_seq);
        if let Ok(stale) = self.index.find_entry(hash, |&seq| {
            entry_at(entries, front, seq).is_some_and(|e| e.key == key)
        }) {
            stale.remove();
        }
        while self.entries.len() >= self.config.max_entries {
            self.evict_front(true);
        }
        let offset = loop {
            match self.place(len) {
                Some(offset) => break offset,
                None => self.evict_front(true),
            }
        };
        if let Some(slot) = self.arena.get_mut(offset..offset + len) {
            slot.copy_from_slice(answer);
        }
        self.write_pos = offset + len;
        let seq = self.front_seq + self.entries.len() as u64;
        self.entries.push_back(Entry {
            key,
            hash,
            expires_ms,
            offset,
            len,
        });
        let (entries, front) = (&self.entries, self.front_seq);
        self.index.insert_unique(hash, seq, |&s| {
            entry_at(entries, front, s).map_or(0, |e| e.hash)
        });
        self.stats.stored += 1;
    }

    /// Where `len` octets fit without overlapping a live answer, if anywhere. Live answers
    /// occupy the circular region from the oldest entry's offset up to `write_pos`.
    fn place(&mut self, len: usize) -> Option<usize> {
        let Some(oldest) = self.entries.front() else {
            self.write_pos = 0;
            return Some(0);
        };
        let start = oldest.offset;
        let cap = self.arena.len();
        if self.write_pos > start {
            if len <= cap - self.write_pos {
                return Some(self.write_pos);
            }
            // Wrap to the beginning; strictly below `start` so the ring never looks empty.
            return (len < start).then_some(0);
        }
        // Wrapped: free space is between write_pos and the oldest answer.
        (self.write_pos + len < start).then_some(self.write_pos)
    }

    fn evict_front(&mut self, early: bool) {
        if let Some(e) = self.entries.pop_front() {
            let front = self.front_seq;
            if let Ok(entry) = self.index.find_entry(e.hash, |&seq| seq == front) {
                entry.remove();
            }
            self.front_seq += 1;
            if early {
                self.stats.evicted_early += 1;
            } else {
                self.stats.expired += 1;
            }
        }
    }

    /// The key's hash, computed once for a `seen` followed by a `complete` of the same key.
    fn hash_of(&mut self, key: &DuplicateKey) -> u64 {
        match self.last_hash {
            Some((last, hash)) if last == *key => return hash,
            _ => {}
        }
        let hash = self.hasher.hash_one(key);
        self.last_hash = Some((*key, hash));
        hash
    }

    fn find(&self, hash: u64, key: &DuplicateKey) -> Option<&Entry> {
        let (entries, front) = (&self.entries, self.front_seq);
        let seq = self.index.find(hash, |&seq| {
            entry_at(entries, front, seq).is_some_and(|e| e.key == *key)
        })?;
        entry_at(entries, front, *seq)
    }

    fn expire(&mut self, now_ms: u64) {
        while self.entries.front().is_some_and(|e| e.expires_ms < now_ms) {
            self.evict_front(false);
        }
        // `retain` visits every bucket: only walk the table when something is in it.
        if !self.in_flight.is_empty() {
            self.in_flight.retain(|_, expires| *expires >= now_ms);
        }
    }
}

/// The entry with sequence number `seq`, if it is still in the ring.
fn entry_at(entries: &VecDeque<Entry>, front_seq: u64, seq: u64) -> Option<&Entry> {
    seq.checked_sub(front_seq)
        .and_then(|i| entries.get(usize::try_from(i).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16, id: u8) -> DuplicateKey {
        DuplicateKey::new(SocketAddr::from(([127, 0, 0, 1], port)), 40, id, [id; 16])
    }

    // SPEC §4 (RFC 5080 §2.2.2): a duplicate of an answered request gets the same bytes.
    #[test]
    fn rfc5080_s2_2_2_answered_duplicate_replays_bytes() {
        let mut c = DuplicateCache::new(DedupConfig::default());
        let k = key(1000, 1);
        assert_eq!(c.seen_key(&k, 0), Seen::New);
        assert!(c.begin_key(k, 300_000));
        assert_eq!(c.seen_key(&k, 1), Seen::InFlight);
        c.complete_key(k, b"answer-1", 1, 300_000);
        assert_eq!(c.seen_key(&k, 2), Seen::Answered(b"answer-1"));
        // Same source, port and Identifier with another authenticator: a new request.
        let mut other = k;
        other.authenticator = [9; 16];
        assert_eq!(c.seen_key(&other, 2), Seen::New);
        // After the window: new again.
        assert_eq!(c.seen_key(&k, 300_001), Seen::New);
        assert_eq!(c.stats().expired, 1);
    }

    #[test]
    fn ipv4_mapped_source_is_the_same_key() {
        let a = DuplicateKey::new("127.0.0.1:5".parse().unwrap(), 40, 1, [0; 16]);
        let b = DuplicateKey::new("[::ffff:127.0.0.1]:5".parse().unwrap(), 40, 1, [0; 16]);
        assert_eq!(a, b);
    }

    #[test]
    fn bounded_by_entries_and_bytes_with_fifo_eviction() {
        let mut c = DuplicateCache::new(DedupConfig {
            max_entries: 4,
            arena_bytes: 64,
            max_in_flight: 2,
        });
        for i in 0..10u8 {
            c.complete_key(key(1, i), &[i; 20], 0, 1_000);
            assert!(c.len() <= 4);
        }
        // 64 bytes hold at most two 20-byte answers plus a gap: the newest survive.
        assert_eq!(c.seen_key(&key(1, 9), 0), Seen::Answered(&[9; 20]));
        assert_eq!(c.seen_key(&key(1, 0), 0), Seen::New);
        assert!(c.stats().evicted_early >= 6);
        c.complete_key(key(1, 99), &[0; 64], 0, 1_000);
        assert_eq!(c.stats().too_large, 1);
        assert!(c.begin_key(key(2, 1), 10));
        assert!(c.begin_key(key(2, 2), 10));
        assert!(!c.begin_key(key(2, 3), 10));
        assert_eq!(c.stats().in_flight_full, 1);
        // A dropped request leaves nothing behind: its copy is new again.
        assert_eq!(c.seen_key(&key(2, 1), 0), Seen::InFlight);
        c.abandon_key(&key(2, 1));
        assert_eq!(c.seen_key(&key(2, 1), 0), Seen::New);
    }

    #[test]
    fn ring_wraps_and_every_live_answer_stays_intact() {
        let mut c = DuplicateCache::new(DedupConfig {
            max_entries: 100,
            arena_bytes: 100,
            max_in_flight: 1,
        });
        for i in 0..200u16 {
            let len = 5 + usize::from(i % 17);
            let byte = (i % 251) as u8;
            c.complete_key(key(i, byte), &vec![byte; len], 0, 1_000);
            // Every entry still indexed must read back exactly what was stored; eviction is
            // FIFO, so the live entries are the newest ones, and the newest is always live.
            let mut live = 0u16;
            for j in 0..=i {
                let b = (j % 251) as u8;
                match c.seen_key(&key(j, b), 0) {
                    Seen::Answered(bytes) => {
                        assert!(bytes.iter().all(|x| *x == b), "entry {j} corrupted");
                        assert_eq!(bytes.len(), 5 + usize::from(j % 17));
                        live += 1;
                    }
                    Seen::New => assert_eq!(live, 0, "entry {j} evicted before an older one"),
                    Seen::InFlight => panic!("entry {j} is not in flight"),
                }
            }
            // 100 octets always hold the three newest answers (at most 21 octets each, plus
            // a wrap gap shorter than one answer).
            assert!(live >= (i + 1).min(3), "only {live} live entries after {i}");
        }
    }
}
