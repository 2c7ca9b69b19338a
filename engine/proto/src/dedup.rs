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
//!
//! Layout (built for storm rates, where the cache is always full and every insert evicts):
//! the answers' entries live in a fixed ring of `max_entries` 64-octet slots in arrival order,
//! so that eviction reads the ring's head (sequential memory) and expiry is a comparison with
//! it. An open-addressed index of at least twice as many 8-octet words (32 bits of the key's
//! hash, 32 bits of ring position; linear probing, backward-shift deletion, so no tombstones)
//! finds an entry. A request is hashed once and probed once: `seen` remembers the key, its
//! hash and where its probe ended, and `complete` of the same key reuses them unless the
//! index changed in between (then it probes again, over the lines `seen` just brought into
//! cache). The in-flight marks are a separate table that the synchronous path never touches.
#![forbid(unsafe_code)]

use core::fmt;
use core::hash::BuildHasher;
use core::net::SocketAddr;

use hashbrown::HashTable;

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

    /// The key as five words, which the cache hashes, stores and compares: the address as an
    /// IPv6 (IPv4-mapped) address, the Request Authenticator, then port, Code, Identifier and
    /// IPv6 scope. The IPv6 flow label is not part of a source's identity.
    fn packed(&self) -> Packed {
        let (ip, scope) = match self.source {
            SocketAddr::V4(a) => (a.ip().to_ipv6_mapped().octets(), 0),
            SocketAddr::V6(a) => (a.ip().octets(), a.scope_id()),
        };
        let ip = u128::from_le_bytes(ip);
        let auth = u128::from_le_bytes(self.authenticator);
        Packed([
            ip as u64,
            (ip >> 64) as u64,
            auth as u64,
            (auth >> 64) as u64,
            u64::from(self.source.port())
                | u64::from(self.code) << 16
                | u64::from(self.identifier) << 24
                | u64::from(scope) << 32,
        ])
    }
}

/// A [`DuplicateKey`] as the cache keeps it.
#[derive(Debug, Clone, Copy, Default, Eq)]
struct Packed([u64; 5]);

impl core::hash::Hash for Packed {
    fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl PartialEq for Packed {
    /// Branch-free and inlined (the derived comparison calls `memcmp`).
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (&self.0, &other.0);
        ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4])) == 0
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

/// One cached answer: a slot of the ring, one cache line.
#[derive(Debug, Clone, Copy, Default)]
#[repr(align(64))]
struct Entry {
    key: Packed,
    expires_ms: u64,
    offset: u32,
    len: u32,
    /// The high half of the key's hash: its home in the index and its tag there.
    tag: u32,
    /// Stored before its signatures ([`DuplicateCache::complete_unsigned`]): never replayed
    /// until [`DuplicateCache::seal`] writes the signed octets.
    unsigned: bool,
}

/// Where an answer stored unsigned is, for [`DuplicateCache::seal`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct UnsignedSlot {
    pos: usize,
    key: Packed,
}

/// A free index word. Never a real one: ring positions are below `u32::MAX`.
const EMPTY: u64 = u64::MAX;

/// The most answers one cache holds (ring positions fit the index word's 32 bits).
const MAX_ENTRIES: usize = 1 << 30;

fn index_word(tag: u32, pos: usize) -> u64 {
    u64::from(tag) << 32 | pos as u64
}

fn word_pos(word: u64) -> usize {
    (word & u64::from(u32::MAX)) as usize
}

fn word_tag(word: u64) -> u32 {
    (word >> 32) as u32
}

/// Where the last key looked up is (see the module comment).
#[derive(Debug, Clone, Copy)]
struct Memo {
    key: Packed,
    hash: u64,
    /// `probe`'s answer for `key`, valid while the index's generation is `generation`.
    slot: Result<usize, usize>,
    generation: u64,
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
pub struct DuplicateCache {
    config: DedupConfig,
    hasher: foldhash::fast::RandomState,
    /// ANDed into every tag: all ones, except in tests that force collisions.
    tag_mask: u32,
    /// Open-addressed, a power of two at least twice `ring`'s length: `index_word`s or EMPTY.
    index: Box<[u64]>,
    /// Bumped by every insertion into and removal from `index` (which may move words).
    generation: u64,
    memo: Option<Memo>,
    /// The answers in arrival order: `len` of them from `head`, wrapping.
    ring: Box<[Entry]>,
    head: usize,
    len: usize,
    /// Requests being processed: key and the time the mark lapses. Marks that lapsed are
    /// dropped when looked up, or all at once when the table looks full.
    in_flight: HashTable<(Packed, u64)>,
    /// The latest time passed in: what a lapsed mark is measured against in `begin`.
    now_ms: u64,
    arena: Box<[u8]>,
    write_pos: usize,
    stats: DedupStats,
}

impl fmt::Debug for DuplicateCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DuplicateCache")
            .field("config", &self.config)
            .field("len", &self.len)
            .field("in_flight", &self.in_flight.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl DuplicateCache {
    pub fn new(config: DedupConfig) -> Self {
        let entries = config.max_entries.min(MAX_ENTRIES);
        let arena_bytes = config.arena_bytes.min(u32::MAX as usize);
        DuplicateCache {
            hasher: foldhash::fast::RandomState::default(),
            tag_mask: u32::MAX,
            index: vec![EMPTY; (entries * 2).next_power_of_two().max(8)].into_boxed_slice(),
            generation: 0,
            memo: None,
            ring: vec![Entry::default(); entries].into_boxed_slice(),
            head: 0,
            len: 0,
            // Twice the limit: hashbrown then always rehashes in place, never reallocates.
            in_flight: HashTable::with_capacity(config.max_in_flight.saturating_mul(2)),
            now_ms: 0,
            arena: vec![0u8; arena_bytes].into_boxed_slice(),
            write_pos: 0,
            stats: DedupStats::default(),
            config,
        }
    }

    /// A cache whose index tags keep only the bits of `tag_mask`: with few bits, keys share
    /// homes and tags, which exercises probing, collisions and backward shifts.
    #[cfg(test)]
    fn with_tag_mask(config: DedupConfig, tag_mask: u32) -> Self {
        DuplicateCache {
            tag_mask,
            ..DuplicateCache::new(config)
        }
    }

    pub fn stats(&self) -> DedupStats {
        self.stats
    }

    /// Answers currently cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
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
        let key = key.packed();
        if !self.in_flight.is_empty() && self.in_flight_mark(key, now_ms) {
            return Seen::InFlight;
        }
        let Ok(slot) = self.locate(key) else {
            return Seen::New;
        };
        let entry = self.entry_of(slot);
        if entry.expires_ms < now_ms {
            return Seen::New;
        }
        if entry.unsigned {
            // Answered, but its signatures are still being computed (same batch).
            return Seen::InFlight;
        }
        let start = entry.offset as usize;
        match self.arena.get(start..start + entry.len as usize) {
            Some(bytes) => Seen::Answered(bytes),
            None => Seen::New,
        }
    }

    pub(crate) fn begin_key(&mut self, key: DuplicateKey, expires_ms: u64) -> bool {
        if self.in_flight.len() >= self.config.max_in_flight {
            let now = self.now_ms;
            self.in_flight.retain(|(_, lapses)| *lapses >= now);
            if self.in_flight.len() >= self.config.max_in_flight {
                self.stats.in_flight_full += 1;
                return false;
            }
        }
        let key = key.packed();
        let hash = self.hash_of(key);
        let hasher = &self.hasher;
        match self
            .in_flight
            .entry(hash, |(k, _)| *k == key, |(k, _)| hasher.hash_one(k))
        {
            hashbrown::hash_table::Entry::Occupied(mut mark) => mark.get_mut().1 = expires_ms,
            hashbrown::hash_table::Entry::Vacant(slot) => {
                slot.insert((key, expires_ms));
            }
        }
        true
    }

    pub(crate) fn abandon_key(&mut self, key: &DuplicateKey) {
        if !self.in_flight.is_empty() {
            let key = key.packed();
            self.unmark(key);
        }
    }

    /// Stores an answer whose signatures are not written yet: a retransmission finds it
    /// in flight, not answered, until [`DuplicateCache::seal`]. `None` when it was not
    /// stored (too large).
    pub(crate) fn complete_unsigned(
        &mut self,
        request: &Authenticated<'_>,
        answer: &[u8],
        now_ms: u64,
        expires_ms: u64,
    ) -> Option<UnsignedSlot> {
        let key = request.duplicate_key();
        self.store(key, answer, now_ms, expires_ms, true)
            .map(|pos| UnsignedSlot {
                pos,
                key: key.packed(),
            })
    }

    /// Writes the signed octets of an answer stored by
    /// [`DuplicateCache::complete_unsigned`], which may be replayed from then on. Nothing
    /// happens when that answer has left the cache meanwhile (its ring slot then holds
    /// another key, or a signed answer) or `signed` is not of its length.
    pub(crate) fn seal(&mut self, slot: UnsignedSlot, signed: &[u8]) {
        let Some(entry) = self.ring.get_mut(slot.pos) else {
            return;
        };
        if !entry.unsigned || entry.key != slot.key || entry.len as usize != signed.len() {
            return;
        }
        let start = entry.offset as usize;
        if let Some(bytes) = self.arena.get_mut(start..start + signed.len()) {
            bytes.copy_from_slice(signed);
            entry.unsigned = false;
        }
    }

    pub(crate) fn complete_key(
        &mut self,
        key: DuplicateKey,
        answer: &[u8],
        now_ms: u64,
        expires_ms: u64,
    ) {
        let _ = self.store(key, answer, now_ms, expires_ms, false);
    }

    /// Stores an answer; its ring position, or `None` when it was not stored.
    fn store(
        &mut self,
        key: DuplicateKey,
        answer: &[u8],
        now_ms: u64,
        expires_ms: u64,
        unsigned: bool,
    ) -> Option<usize> {
        let key = key.packed();
        if !self.in_flight.is_empty() {
            self.unmark(key);
        }
        self.expire(now_ms);
        let len = answer.len();
        if len >= self.arena.len() || self.ring.is_empty() {
            self.stats.too_large += 1;
            return None;
        }
        // Room first (oldest answers out), then the key's place in the index: evictions may
        // have moved it, which `locate` notices.
        while self.len >= self.ring.len() {
            self.evict_front(true);
        }
        let offset = loop {
            match self.place(len) {
                Some(offset) => break offset,
                None => self.evict_front(true),
            }
        };
        if let Some(bytes) = self.arena.get_mut(offset..offset + len) {
            bytes.copy_from_slice(answer);
        }
        self.write_pos = offset + len;
        let pos = self.ring_pos(self.len);
        let slot = self.locate(key);
        let memo = self.memo.as_mut()?;
        let tag = hash_tag(memo.hash, self.tag_mask);
        if let Some(entry) = self.ring.get_mut(pos) {
            *entry = Entry {
                key,
                expires_ms,
                offset: offset as u32,
                len: len as u32,
                tag,
                unsigned,
            };
        }
        self.len += 1;
        let slot = match slot {
            // An older answer to the same key (expired, or answered twice): it stays in the
            // ring until its turn to leave, no longer indexed.
            Ok(slot) => slot,
            Err(slot) => {
                self.generation += 1;
                slot
            }
        };
        if let Some(word) = self.index.get_mut(slot) {
            *word = index_word(tag, pos);
        }
        memo.slot = Ok(slot);
        memo.generation = self.generation;
        self.stats.stored += 1;
        Some(pos)
    }

    /// Where `len` octets fit without overlapping a live answer, if anywhere. Live answers
    /// occupy the circular region from the oldest entry's offset up to `write_pos`.
    fn place(&mut self, len: usize) -> Option<usize> {
        if self.len == 0 {
            self.write_pos = 0;
            return Some(0);
        }
        let start = self.ring.get(self.head).map_or(0, |e| e.offset as usize);
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

    /// Drops the oldest answer: the ring's head, and its index word if it still has one.
    fn evict_front(&mut self, early: bool) {
        if self.len == 0 {
            return;
        }
        let head = self.head;
        let tag = self.ring.get(head).map_or(0, |e| e.tag);
        let mask = self.index.len() - 1;
        let mut i = tag as usize & mask;
        loop {
            let word = self.index.get(i).copied().unwrap_or(EMPTY);
            if word == EMPTY {
                break;
            }
            if word_pos(word) == head {
                self.remove_word(i);
                break;
            }
            i = (i + 1) & mask;
        }
        self.head = if head + 1 == self.ring.len() {
            0
        } else {
            head + 1
        };
        self.len -= 1;
        if early {
            self.stats.evicted_early += 1;
        } else {
            self.stats.expired += 1;
        }
    }

    /// Empties index word `i`, moving later words of its cluster back so that every
    /// remaining word stays reachable from its home without crossing an empty word.
    fn remove_word(&mut self, i: usize) {
        let mask = self.index.len() - 1;
        let mut hole = i;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let word = self.index.get(j).copied().unwrap_or(EMPTY);
            if word == EMPTY {
                break;
            }
            let home = word_tag(word) as usize & mask;
            // The word may fill the hole when its home is not in (hole, j], circularly.
            if j.wrapping_sub(home) & mask >= j.wrapping_sub(hole) & mask {
                if let Some(h) = self.index.get_mut(hole) {
                    *h = word;
                }
                hole = j;
            }
        }
        if let Some(h) = self.index.get_mut(hole) {
            *h = EMPTY;
        }
        self.generation += 1;
    }

    /// The index word holding `key` (`Ok`), or the empty word where it would go (`Err`).
    /// Hashes a key once and probes once while the index is unchanged (`memo`).
    fn locate(&mut self, key: Packed) -> Result<usize, usize> {
        let hash = match self.memo {
            Some(m) if m.key == key && m.generation == self.generation => return m.slot,
            Some(m) if m.key == key => m.hash,
            _ => self.hasher.hash_one(key),
        };
        let slot = self.probe(hash_tag(hash, self.tag_mask), &key);
        self.memo = Some(Memo {
            key,
            hash,
            slot,
            generation: self.generation,
        });
        slot
    }

    fn probe(&self, tag: u32, key: &Packed) -> Result<usize, usize> {
        let mask = self.index.len() - 1;
        let mut i = tag as usize & mask;
        loop {
            let word = self.index.get(i).copied().unwrap_or(EMPTY);
            if word == EMPTY {
                return Err(i);
            }
            if word_tag(word) == tag && self.ring.get(word_pos(word)).is_some_and(|e| e.key == *key)
            {
                return Ok(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// The entry index word `slot` points at.
    fn entry_of(&self, slot: usize) -> Entry {
        let word = self.index.get(slot).copied().unwrap_or(EMPTY);
        self.ring.get(word_pos(word)).copied().unwrap_or_default()
    }

    /// Position `n` of the ring counting from its head.
    fn ring_pos(&self, n: usize) -> usize {
        let pos = self.head + n;
        if pos >= self.ring.len() {
            pos - self.ring.len()
        } else {
            pos
        }
    }

    /// The key's hash, computed once for a `seen` followed by a `begin` or `complete`.
    fn hash_of(&mut self, key: Packed) -> u64 {
        let _ = self.locate(key);
        self.memo.map_or(0, |m| m.hash)
    }

    /// Whether `key` is marked in flight at `now_ms`; a lapsed mark is dropped.
    fn in_flight_mark(&mut self, key: Packed, now_ms: u64) -> bool {
        let hash = self.hash_of(key);
        match self.in_flight.find_entry(hash, |(k, _)| *k == key) {
            Ok(mark) if mark.get().1 >= now_ms => true,
            Ok(lapsed) => {
                lapsed.remove();
                false
            }
            Err(_) => false,
        }
    }

    fn unmark(&mut self, key: Packed) {
        let hash = self.hash_of(key);
        if let Ok(mark) = self.in_flight.find_entry(hash, |(k, _)| *k == key) {
            mark.remove();
        }
    }

    fn expire(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        while self.len > 0
            && self
                .ring
                .get(self.head)
                .is_some_and(|e| e.expires_ms < now_ms)
        {
            self.evict_front(false);
        }
    }
}

/// The index tag (and home) of a key's hash.
fn hash_tag(hash: u64, mask: u32) -> u32 {
    (hash >> 32) as u32 & mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

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

    /// The specification the cache is checked against: the same policy written the plainest
    /// way (a list scanned front to back, answers as owned vectors, placement as "the first
    /// candidate offset that overlaps no live answer").
    #[derive(Debug)]
    struct Model {
        config: DedupConfig,
        /// Oldest first: key, expiry, offset, answer, still the key's current answer.
        entries: VecDeque<(DuplicateKey, u64, usize, Vec<u8>, bool)>,
        in_flight: Vec<(DuplicateKey, u64)>,
        now_ms: u64,
        stats: DedupStats,
    }

    impl Model {
        fn new(config: DedupConfig) -> Self {
            Model {
                config,
                entries: VecDeque::new(),
                in_flight: Vec::new(),
                now_ms: 0,
                stats: DedupStats::default(),
            }
        }

        fn expire(&mut self, now_ms: u64) {
            self.now_ms = now_ms;
            while self.entries.front().is_some_and(|e| e.1 < now_ms) {
                self.entries.pop_front();
                self.stats.expired += 1;
            }
        }

        fn evict_oldest(&mut self) {
            if self.entries.pop_front().is_some() {
                self.stats.evicted_early += 1;
            }
        }

        fn seen(&mut self, key: &DuplicateKey, now_ms: u64) -> Seen<'_> {
            self.expire(now_ms);
            self.in_flight
                .retain(|(k, lapses)| k != key || *lapses >= now_ms);
            if self.in_flight.iter().any(|(k, _)| k == key) {
                return Seen::InFlight;
            }
            match self.entries.iter().find(|e| e.4 && e.0 == *key) {
                Some(e) if e.1 >= now_ms => Seen::Answered(&e.3),
                _ => Seen::New,
            }
        }

        fn begin(&mut self, key: DuplicateKey, expires_ms: u64) -> bool {
            let now = self.now_ms;
            if self.in_flight.len() >= self.config.max_in_flight {
                self.in_flight.retain(|(_, lapses)| *lapses >= now);
            }
            if self.in_flight.len() >= self.config.max_in_flight {
                self.stats.in_flight_full += 1;
                return false;
            }
            self.in_flight.retain(|(k, _)| *k != key);
            self.in_flight.push((key, expires_ms));
            true
        }

        fn abandon(&mut self, key: &DuplicateKey) {
            self.in_flight.retain(|(k, _)| k != key);
        }

        /// The first of (after the newest answer, the arena's start) where `len` octets fit
        /// before the end and leave at least one octet before every later live answer; the
        /// start is a candidate only while the live answers have not wrapped.
        fn offset_for(&self, len: usize) -> Option<usize> {
            let (Some(oldest), Some(newest)) = (self.entries.front(), self.entries.back()) else {
                return Some(0);
            };
            let end = newest.2 + newest.3.len();
            let wrapped = end <= oldest.2;
            let free = |at: usize| {
                at + len <= self.config.arena_bytes
                    && self
                        .entries
                        .iter()
                        .all(|e| at + len < e.2 || at >= e.2 + e.3.len())
            };
            [Some(end), (!wrapped).then_some(0)]
                .into_iter()
                .flatten()
                .find(|&at| free(at))
        }

        fn complete(&mut self, key: DuplicateKey, answer: &[u8], now_ms: u64, expires_ms: u64) {
            self.abandon(&key);
            self.expire(now_ms);
            if answer.len() >= self.config.arena_bytes || self.config.max_entries == 0 {
                self.stats.too_large += 1;
                return;
            }
            while self.entries.len() >= self.config.max_entries {
                self.evict_oldest();
            }
            let offset = loop {
                match self.offset_for(answer.len()) {
                    Some(offset) => break offset,
                    None => self.evict_oldest(),
                }
            };
            for e in self.entries.iter_mut().filter(|e| e.0 == key) {
                e.4 = false;
            }
            self.entries
                .push_back((key, expires_ms, offset, answer.to_vec(), true));
            self.stats.stored += 1;
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Seen(u8),
        Begin(u8, u64),
        Abandon(u8),
        Complete {
            key: u8,
            len: usize,
            byte: u8,
            window: u64,
        },
        /// The clock moves on.
        Wait(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => any::<u8>().prop_map(Op::Seen),
            1 => (any::<u8>(), 0..50u64).prop_map(|(k, w)| Op::Begin(k, w)),
            1 => any::<u8>().prop_map(Op::Abandon),
            4 => (any::<u8>(), 1..40usize, any::<u8>(), 0..100u64)
                .prop_map(|(key, len, byte, window)| Op::Complete { key, len, byte, window }),
            1 => (0..30u64).prop_map(Op::Wait),
        ]
    }

    /// One of `keys` distinct keys: another port, Identifier, Code, Request Authenticator or
    /// address family each time, so that keys differing in one field only are compared.
    fn model_key(k: u8, keys: u8) -> DuplicateKey {
        let k = k % keys.max(1);
        let source = if k % 5 == 4 {
            SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1], 1000))
        } else {
            SocketAddr::from(([127, 0, 0, 1], 1000 + u16::from(k % 3)))
        };
        let mut authenticator = [0; 16];
        authenticator[15] = k / 7;
        DuplicateKey::new(source, 40 + 3 * (k % 2), k / 2, authenticator)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        // The cache answers every operation exactly as the model does (replayed bytes,
        // in-flight marks, refusals, counters, size), with real hashes and with hashes cut to
        // two bits (every key then collides with others in the index).
        #[test]
        fn behaves_as_the_reference_model(
            max_entries in 0..10usize,
            arena_bytes in 1..160usize,
            max_in_flight in 0..4usize,
            keys in 1..40u8,
            narrow_tags in any::<bool>(),
            ops in proptest::collection::vec(op(), 1..300),
        ) {
            let config = DedupConfig { max_entries, arena_bytes, max_in_flight };
            let mask = if narrow_tags { 0b11 } else { u32::MAX };
            let mut cache = DuplicateCache::with_tag_mask(config, mask);
            let mut model = Model::new(config);
            let mut now = 0u64;
            for op in ops {
                match op {
                    Op::Seen(k) => {
                        let key = model_key(k, keys);
                        prop_assert_eq!(cache.seen_key(&key, now), model.seen(&key, now), "{:?}", key);
                    }
                    Op::Begin(k, w) => {
                        let key = model_key(k, keys);
                        prop_assert_eq!(cache.begin_key(key, now + w), model.begin(key, now + w));
                    }
                    Op::Abandon(k) => {
                        let key = model_key(k, keys);
                        cache.abandon_key(&key);
                        model.abandon(&key);
                    }
                    Op::Complete { key, len, byte, window } => {
                        let key = model_key(key, keys);
                        let answer = vec![byte; len];
                        cache.complete_key(key, &answer, now, now + window);
                        model.complete(key, &answer, now, now + window);
                    }
                    Op::Wait(ms) => now += ms,
                }
                prop_assert_eq!(cache.stats(), model.stats);
                prop_assert_eq!(cache.len(), model.entries.len());
            }
            // Every key, at the end: the same answer or the same absence.
            for k in 0..keys {
                let key = model_key(k, keys);
                prop_assert_eq!(cache.seen_key(&key, now), model.seen(&key, now));
            }
        }
    }

    #[test]
    fn keys_differing_in_one_field_are_distinct() {
        let base = key(1000, 1);
        let mut other_port = base;
        other_port.source.set_port(1001);
        let mut other_code = base;
        other_code.code = 43;
        let mut other_id = base;
        other_id.identifier = 2;
        let mut other_auth = base;
        other_auth.authenticator[15] ^= 1;
        let other_family = DuplicateKey::new("[2001:db8::1]:1000".parse().unwrap(), 40, 1, [1; 16]);
        let mut c = DuplicateCache::new(DedupConfig::default());
        c.complete_key(base, b"base", 0, 10);
        for k in [other_port, other_code, other_id, other_auth, other_family] {
            assert_ne!(k.packed(), base.packed());
            assert_eq!(c.seen_key(&k, 0), Seen::New, "{k:?}");
        }
        assert_eq!(c.seen_key(&base, 0), Seen::Answered(b"base"));
    }

    // At storm rates the cache is full and every insert evicts: the index must stay exact
    // over many times its size of inserts, evictions and backward shifts, colliding or not.
    #[test]
    fn full_cache_evicts_oldest_and_finds_every_live_answer() {
        for mask in [u32::MAX, 0b111] {
            let config = DedupConfig {
                max_entries: 64,
                arena_bytes: 1 << 16,
                max_in_flight: 0,
            };
            let mut c = DuplicateCache::with_tag_mask(config, mask);
            for i in 0..2_000u16 {
                c.complete_key(key(i, i as u8), &i.to_le_bytes(), 0, 1_000);
                assert_eq!(c.len(), usize::from(i + 1).min(64));
                let oldest = (i + 1).saturating_sub(64);
                for j in oldest.saturating_sub(3)..=i {
                    let expected = if j >= oldest {
                        Seen::Answered(&j.to_le_bytes())
                    } else {
                        Seen::New
                    };
                    assert_eq!(c.seen_key(&key(j, j as u8), 0), expected, "{j} after {i}");
                }
            }
            assert_eq!(c.stats().evicted_early, 2_000 - 64);
        }
    }
}
