//! Key indexes: 64-bit key hash to record ids, probed without locks.
//!
//! Owns: the two index designs compared in `docs/SESSION_TABLE.md`:
//! - [`FlatIndex`] (the default): one open-addressing table of `AtomicU64` entries
//!   (`hash32 << 32 | id`), linear probing, deleted entries left as markers so an entry never
//!   moves while readers probe. Growth and clean-up rebuild the table and publish it with
//!   `ArcSwap`; readers of the old table finish on it.
//! - [`PapayaIndex`]: papaya's epoch-based concurrent map from the hash to a boxed id list.
//!
//! Both may hand out ids whose record has another key with the same hash (or, for a reader
//! racing a writer, an id already reused): callers always check the key on the record.
//! Must not touch: records or matching. Every mutating method is called under the table's
//! writer lock (one writer at a time); probes may run concurrently with it.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use arc_swap::ArcSwap;

/// An index from key hashes to record ids.
pub trait KeyIndex: Send + Sync + Default {
    /// Short name for benchmarks and reports.
    const NAME: &'static str;
    /// Calls `f` with every id stored under `hash` (and perhaps others); stops when `f`
    /// returns false. Lock-free.
    fn probe(&self, hash: u64, f: impl FnMut(u32) -> bool);
    /// Loads the entry a probe for `hash` starts at (a batch's hint, `SessionStore::touch`)
    /// and returns it, so that the load is not optimised away. Lock-free.
    fn touch(&self, _hash: u64) -> u64 {
        0
    }
    /// [`KeyIndex::touch`] for many hashes, the index's table looked up once: the loop
    /// body is a few instructions, so that many loads that miss are in flight together.
    /// Returns what they loaded, combined. Lock-free.
    fn touch_many(&self, hashes: &[u64]) -> u64 {
        hashes.iter().fold(0, |acc, &h| acc ^ self.touch(h))
    }
    /// Adds `(hash, id)`. Writer only.
    fn insert(&self, hash: u64, id: u32);
    /// Removes `(hash, id)`; false if absent. Writer only.
    fn remove(&self, hash: u64, id: u32) -> bool;
    /// Prepares room for `additional` more entries. Writer only.
    fn reserve(&self, additional: usize);
    /// Adds entries in stored form (`stored_hash(hash) << 32 | id`), sorted ascending
    /// (bulk load of a fresh table). Writer only.
    fn bulk_build(&self, sorted: &[u64]) {
        for &e in sorted {
            self.insert(e & !0xffff_ffff, e as u32);
        }
    }
    /// Whether the index holds every entry stored under `hash`. False once a hash gathered
    /// more than [`MAX_GROUP`] entries (one User-Name or NAS-Port-Id for thousands of
    /// sessions): further entries are not indexed, so that a huge group neither makes
    /// inserts quadratic nor clusters the table, and lookups of that hash scan instead.
    fn complete(&self, hash: u64) -> bool;
    /// Entries.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The most entries one hash keeps in an index (see [`KeyIndex::complete`]).
pub const MAX_GROUP: usize = 4096;

/// Hashes whose group outgrew [`MAX_GROUP`]; never cleared (a scan stays correct).
#[derive(Default)]
struct Overfull {
    any: std::sync::atomic::AtomicBool,
    set: papaya::HashSet<u32, foldhash::fast::RandomState>,
}

impl Overfull {
    fn mark(&self, h: u32) {
        self.set.pin().insert(h);
        self.any.store(true, Ordering::Release);
    }

    fn contains(&self, h: u32) -> bool {
        self.any.load(Ordering::Acquire) && self.set.pin().contains(&h)
    }
}

const EMPTY: u64 = 0;
const DELETED: u64 = 1;

struct Flat {
    slots: Box<[AtomicU64]>,
}

impl Flat {
    fn new(cap: usize) -> Self {
        Flat {
            slots: (0..cap).map(|_| AtomicU64::new(EMPTY)).collect(),
        }
    }

    fn home(&self, h32: u32) -> usize {
        ((u64::from(h32) * self.slots.len() as u64) >> 32) as usize
    }
}

/// Open addressing over atomics; see the module documentation.
pub struct FlatIndex {
    table: ArcSwap<Flat>,
    live: AtomicUsize,
    deleted: AtomicUsize,
    overfull: Overfull,
}

impl Default for FlatIndex {
    fn default() -> Self {
        FlatIndex {
            table: ArcSwap::from_pointee(Flat::new(0)),
            live: AtomicUsize::new(0),
            deleted: AtomicUsize::new(0),
            overfull: Overfull::default(),
        }
    }
}

impl core::fmt::Debug for FlatIndex {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FlatIndex")
            .field("live", &self.live.load(Ordering::Relaxed))
            .field("capacity", &self.table.load().slots.len())
            .finish()
    }
}

/// The stored 32 bits of a hash: the high half, never zero (zero marks empty/deleted).
pub(crate) fn stored_hash(hash: u64) -> u32 {
    ((hash >> 32) as u32).max(1)
}

use stored_hash as h32;

fn entry(h: u32, id: u32) -> u64 {
    u64::from(h) << 32 | u64::from(id)
}

/// Target load after a rebuild, and the load (live + deleted) that triggers one.
const TARGET_NUM: usize = 2;
const TARGET_DEN: usize = 3;
const MAX_NUM: usize = 4;
const MAX_DEN: usize = 5;

impl FlatIndex {
    fn rebuild(&self, live_after: usize) {
        let cap = (live_after * TARGET_DEN / TARGET_NUM).max(16);
        let old = self.table.load_full();
        let new = Flat::new(cap);
        for e in old.slots.iter() {
            let e = e.load(Ordering::Relaxed);
            if e > DELETED {
                let mut pos = new.home((e >> 32) as u32);
                while new.slots[pos].load(Ordering::Relaxed) != EMPTY {
                    pos += 1;
                    if pos == cap {
                        pos = 0;
                    }
                }
                new.slots[pos].store(e, Ordering::Relaxed);
            }
        }
        self.table.store(Arc::new(new));
        self.deleted.store(0, Ordering::Relaxed);
    }

    /// Table capacity (reports).
    pub fn capacity(&self) -> usize {
        self.table.load().slots.len()
    }
}

impl KeyIndex for FlatIndex {
    const NAME: &'static str = "flat-atomic";

    fn probe(&self, hash: u64, mut f: impl FnMut(u32) -> bool) {
        let t = self.table.load();
        let cap = t.slots.len();
        if cap == 0 {
            return;
        }
        let h = h32(hash);
        let mut pos = t.home(h);
        for _ in 0..cap {
            let e = t.slots[pos].load(Ordering::Acquire);
            if e == EMPTY {
                return;
            }
            if (e >> 32) as u32 == h && !f(e as u32) {
                return;
            }
            pos += 1;
            if pos == cap {
                pos = 0;
            }
        }
    }

    fn touch(&self, hash: u64) -> u64 {
        self.touch_many(&[hash])
    }

    fn touch_many(&self, hashes: &[u64]) -> u64 {
        let t = self.table.load();
        if t.slots.is_empty() {
            return 0;
        }
        hashes.iter().fold(0, |acc, &h| {
            acc ^ t
                .slots
                .get(t.home(h32(h)))
                .map_or(0, |slot| slot.load(Ordering::Relaxed))
        })
    }

    fn insert(&self, hash: u64, id: u32) {
        let live = self.live.load(Ordering::Relaxed);
        let deleted = self.deleted.load(Ordering::Relaxed);
        let cap = self.table.load().slots.len();
        if (live + deleted + 1) * MAX_DEN > cap * MAX_NUM {
            self.rebuild(live + 1);
        }
        let t = self.table.load();
        let cap = t.slots.len();
        let h = h32(hash);
        let mut pos = t.home(h);
        let mut reuse = None;
        let mut group = 0usize;
        for _ in 0..cap {
            let e = t.slots[pos].load(Ordering::Relaxed);
            if e == EMPTY {
                break;
            }
            if e == DELETED && reuse.is_none() {
                reuse = Some(pos);
            }
            if (e >> 32) as u32 == h {
                group += 1;
                if group >= MAX_GROUP {
                    self.overfull.mark(h);
                    return;
                }
            }
            pos += 1;
            if pos == cap {
                pos = 0;
            }
        }
        if let Some(r) = reuse {
            pos = r;
            self.deleted.fetch_sub(1, Ordering::Relaxed);
        }
        t.slots[pos].store(entry(h, id), Ordering::Release);
        self.live.fetch_add(1, Ordering::Relaxed);
    }

    fn remove(&self, hash: u64, id: u32) -> bool {
        let t = self.table.load();
        let cap = t.slots.len();
        if cap == 0 {
            return false;
        }
        let want = entry(h32(hash), id);
        let mut pos = t.home(h32(hash));
        for _ in 0..cap {
            let e = t.slots[pos].load(Ordering::Relaxed);
            if e == EMPTY {
                return false;
            }
            if e == want {
                t.slots[pos].store(DELETED, Ordering::Release);
                self.live.fetch_sub(1, Ordering::Relaxed);
                self.deleted.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            pos += 1;
            if pos == cap {
                pos = 0;
            }
        }
        false
    }

    fn reserve(&self, additional: usize) {
        let live = self.live.load(Ordering::Relaxed);
        let want = live + additional;
        let cap = self.table.load().slots.len();
        if want * MAX_DEN > cap * MAX_NUM {
            self.rebuild(want);
        }
    }

    fn len(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    fn bulk_build(&self, sorted: &[u64]) {
        if self.len() > 0 {
            for &e in sorted {
                self.insert(e & !0xffff_ffff, e as u32);
            }
            return;
        }
        // Sorted by stored hash means sorted by home position: the table fills front to
        // back, one sequential pass.
        let new = Flat::new((sorted.len() * TARGET_DEN / TARGET_NUM).max(16));
        let cap = new.slots.len();
        let mut pos = 0usize;
        let mut kept = 0usize;
        let mut group = (0u32, 0usize);
        for &e in sorted {
            let h = (e >> 32) as u32;
            group = if group.0 == h {
                (h, group.1 + 1)
            } else {
                (h, 1)
            };
            if group.1 >= MAX_GROUP {
                self.overfull.mark(h);
                continue;
            }
            kept += 1;
            let home = new.home(h);
            if home > pos || (pos == cap && home == 0) {
                pos = home;
            }
            loop {
                if pos == cap {
                    pos = 0;
                }
                if new.slots[pos].load(Ordering::Relaxed) == EMPTY {
                    break;
                }
                pos += 1;
            }
            new.slots[pos].store(e, Ordering::Relaxed);
            pos += 1;
        }
        self.table.store(Arc::new(new));
        self.live.store(kept, Ordering::Relaxed);
        self.deleted.store(0, Ordering::Relaxed);
    }

    fn complete(&self, hash: u64) -> bool {
        !self.overfull.contains(h32(hash))
    }
}

/// papaya's concurrent map from the stored hash (see [`stored_hash`]) to the ids under it.
#[derive(Default)]
pub struct PapayaIndex {
    map: papaya::HashMap<u64, Box<[u32]>, foldhash::fast::RandomState>,
    live: AtomicUsize,
    overfull: Overfull,
}

impl core::fmt::Debug for PapayaIndex {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PapayaIndex")
            .field("live", &self.live.load(Ordering::Relaxed))
            .finish()
    }
}

impl KeyIndex for PapayaIndex {
    const NAME: &'static str = "papaya";

    fn probe(&self, hash: u64, mut f: impl FnMut(u32) -> bool) {
        let m = self.map.pin();
        if let Some(ids) = m.get(&u64::from(h32(hash))) {
            for &id in ids.iter() {
                if !f(id) {
                    return;
                }
            }
        }
    }

    fn insert(&self, hash: u64, id: u32) {
        let hash = u64::from(h32(hash));
        let m = self.map.pin();
        let ids: Box<[u32]> = match m.get(&hash) {
            Some(old) if old.len() + 1 >= MAX_GROUP => {
                self.overfull.mark(hash as u32);
                return;
            }
            Some(old) => old.iter().copied().chain([id]).collect(),
            None => Box::new([id]),
        };
        m.insert(hash, ids);
        self.live.fetch_add(1, Ordering::Relaxed);
    }

    fn remove(&self, hash: u64, id: u32) -> bool {
        let hash = u64::from(h32(hash));
        let m = self.map.pin();
        let Some(old) = m.get(&hash) else {
            return false;
        };
        if !old.contains(&id) {
            return false;
        }
        let rest: Box<[u32]> = old.iter().copied().filter(|&i| i != id).collect();
        if rest.is_empty() {
            m.remove(&hash);
        } else {
            m.insert(hash, rest);
        }
        self.live.fetch_sub(1, Ordering::Relaxed);
        true
    }

    fn reserve(&self, additional: usize) {
        self.map.pin().reserve(additional);
    }

    fn complete(&self, hash: u64) -> bool {
        !self.overfull.contains(h32(hash))
    }

    fn len(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids<I: KeyIndex>(ix: &I, h: u64) -> Vec<u32> {
        let mut v = Vec::new();
        ix.probe(h, |id| {
            v.push(id);
            true
        });
        v.sort_unstable();
        v
    }

    fn exercise<I: KeyIndex>() {
        let ix = I::default();
        assert!(ids(&ix, 5).is_empty());
        for i in 0..1000u32 {
            ix.insert(u64::from(i % 100) << 40 | 7, i);
        }
        assert_eq!(ix.len(), 1000);
        let h = 3u64 << 40 | 7;
        assert_eq!(
            ids(&ix, h),
            (0..10).map(|k| k * 100 + 3).collect::<Vec<_>>()
        );
        assert!(ix.remove(h, 503));
        assert!(!ix.remove(h, 503));
        assert!(!ix.remove(h, 504));
        assert_eq!(ids(&ix, h).len(), 9);
        // Churn: deleted markers are reused or cleaned, never lost entries.
        for round in 0..20u32 {
            for i in 0..1000u32 {
                let hh = u64::from(i % 100) << 40 | 7;
                if ix.remove(hh, i) {
                    ix.insert(hh, i);
                }
            }
            assert_eq!(ix.len(), 999, "round {round}");
        }
        assert_eq!(ids(&ix, h).len(), 9);
        ix.reserve(100_000);
        assert_eq!(ids(&ix, h).len(), 9);
    }

    fn bulk<I: KeyIndex>() {
        let ix = I::default();
        let mut entries: Vec<u64> = (0..5000u32)
            .map(|i| {
                u64::from(stored_hash(
                    u64::from(i % 1700).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                )) << 32
                    | u64::from(i)
            })
            .collect();
        entries.sort_unstable();
        ix.bulk_build(&entries);
        assert_eq!(ix.len(), 5000);
        for i in 0..1700u32 {
            let h = u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let want: Vec<u32> = (0..5000).filter(|k| k % 1700 == i).collect();
            assert_eq!(ids(&ix, h), want);
        }
        // Bulk into a non-empty index falls back to inserts.
        ix.bulk_build(&[u64::from(stored_hash(7 << 32)) << 32 | 9999]);
        assert_eq!(ids(&ix, 7 << 32), vec![9999]);
    }

    fn overfull<I: KeyIndex>() {
        let ix = I::default();
        let h = 0xabcd_0000_0000_0000u64;
        assert!(ix.complete(h));
        for id in 0..(MAX_GROUP as u32 + 10) {
            ix.insert(h, id);
        }
        assert!(!ix.complete(h));
        assert!(ix.complete(h ^ 1 << 40));
        assert!(ids(&ix, h).len() <= MAX_GROUP);
        let bulk = I::default();
        let sorted: Vec<u64> = (0..MAX_GROUP as u64 + 10).map(|i| 7u64 << 32 | i).collect();
        bulk.bulk_build(&sorted);
        assert!(!bulk.complete(7 << 32));
        assert!(bulk.len() < MAX_GROUP);
    }

    #[test]
    fn huge_groups_are_flagged_not_indexed() {
        overfull::<FlatIndex>();
        overfull::<PapayaIndex>();
    }

    #[test]
    fn flat_index_bulk_build_finds_everything() {
        bulk::<FlatIndex>();
    }

    #[test]
    fn papaya_index_bulk_build_finds_everything() {
        bulk::<PapayaIndex>();
    }

    #[test]
    fn flat_index_multi_values_remove_churn() {
        exercise::<FlatIndex>();
    }

    #[test]
    fn papaya_index_multi_values_remove_churn() {
        exercise::<PapayaIndex>();
    }
}
