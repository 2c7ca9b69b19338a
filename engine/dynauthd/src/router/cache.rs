//! The router's local affinity cache: routing key -> the owners Redis named, for a while.
//!
//! Owns: bounded memory (at most `capacity` keys; expired entries go first, then the
//! oldest), expiry, invalidation. Must not touch: Redis (the worker fills it).
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};

/// Owners of one routing key, as Redis had them: (owner id, live). Not live: the owner
/// removed the session within the tombstone window (a retried Disconnect goes there).
pub type Owners = Vec<(String, bool)>;

struct Entry {
    owners: Owners,
    expires_ms: u64,
    /// Matches the `order` slot that inserted it (older slots for the key are stale).
    generation: u64,
}

/// A bounded map with insertion-order eviction.
pub struct AffinityCache {
    map: HashMap<Vec<u8>, Entry>,
    order: VecDeque<(Vec<u8>, u64)>,
    capacity: usize,
    ttl_ms: u64,
    next_generation: u64,
}

impl AffinityCache {
    pub fn new(capacity: usize, ttl_ms: u64) -> Self {
        AffinityCache {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            ttl_ms,
            next_generation: 0,
        }
    }

    /// The cached owners of `key`, unless absent or expired.
    pub fn get(&self, key: &[u8], now_ms: u64) -> Option<&Owners> {
        self.map
            .get(key)
            .filter(|e| e.expires_ms > now_ms)
            .map(|e| &e.owners)
    }

    /// Remembers `owners` for `key`. An empty set is not cached: a session added a moment
    /// later must route at once.
    pub fn put(&mut self, key: Vec<u8>, owners: Owners, now_ms: u64) {
        if owners.is_empty() || self.ttl_ms == 0 {
            self.map.remove(&key);
            return;
        }
        while self.map.len() >= self.capacity && !self.map.contains_key(&key) {
            let Some((old, generation)) = self.order.pop_front() else {
                break;
            };
            if self
                .map
                .get(&old)
                .is_some_and(|e| e.generation == generation)
            {
                self.map.remove(&old);
            }
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        self.order.push_back((key.clone(), generation));
        self.map.insert(
            key,
            Entry {
                owners,
                expires_ms: now_ms.saturating_add(self.ttl_ms),
                generation,
            },
        );
        // Stale order slots (re-put or invalidated keys) are dropped lazily; keep the queue
        // from growing without bound when the same keys are put again and again.
        if self.order.len() > self.capacity.saturating_mul(2) {
            let map = &self.map;
            self.order
                .retain(|(k, g)| map.get(k).is_some_and(|e| e.generation == *g));
        }
    }

    /// Forgets `key`; returns whether it was cached.
    pub fn invalidate(&mut self, key: &[u8]) -> bool {
        self.map.remove(key).is_some()
    }

    /// Forgets everything (the invalidation stream was interrupted).
    pub fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners(o: &[&str]) -> Owners {
        o.iter().map(|s| (s.to_string(), true)).collect()
    }

    #[test]
    fn expiry_invalidation_and_no_negative_entries() {
        let mut c = AffinityCache::new(10, 1_000);
        c.put(b"k".to_vec(), owners(&["a"]), 0);
        assert_eq!(c.get(b"k", 999), Some(&owners(&["a"])));
        assert_eq!(c.get(b"k", 1_000), None);
        c.put(b"k".to_vec(), owners(&["a"]), 0);
        assert!(c.invalidate(b"k"));
        assert_eq!(c.get(b"k", 1), None);
        c.put(b"n".to_vec(), Vec::new(), 0);
        assert!(c.is_empty());
    }

    #[test]
    fn bounded_oldest_first() {
        let mut c = AffinityCache::new(3, 1_000);
        for k in [b"a", b"b", b"c"] {
            c.put(k.to_vec(), owners(&["o"]), 0);
        }
        // Re-putting "a" makes "b" the oldest.
        c.put(b"a".to_vec(), owners(&["o"]), 0);
        c.put(b"d".to_vec(), owners(&["o"]), 0);
        assert_eq!(c.len(), 3);
        assert!(c.get(b"b", 0).is_none());
        assert!(c.get(b"a", 0).is_some() && c.get(b"d", 0).is_some());
        for i in 0..1_000u32 {
            c.put(i.to_be_bytes().to_vec(), owners(&["o"]), 0);
            assert!(c.len() <= 3 && c.order.len() <= 7);
        }
    }
}
