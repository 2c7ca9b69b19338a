//! RADIUS Identifier allocation for one source socket.
//!
//! A socket has 256 Identifiers. A DAC must never reuse one while a request carrying it is
//! still outstanding (the DAS's duplicate detection and the DAC's own answer matching both key
//! on it, RFC 5080 §2.2.2). Free Identifiers wait in a FIFO ring: a released Identifier goes to
//! the back, so the one idle the longest is reused first. That rotation also keeps a late
//! answer to a timed-out request from landing on a fresh request for as long as possible.
#![forbid(unsafe_code)]

/// The free Identifiers of one socket, in reuse order.
#[derive(Debug, Clone)]
pub struct IdAllocator {
    ring: [u8; 256],
    head: usize,
    free: usize,
    outstanding: [bool; 256],
}

impl Default for IdAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl IdAllocator {
    /// All 256 Identifiers free, handed out 0, 1, 2, ... first.
    pub fn new() -> Self {
        let mut ring = [0u8; 256];
        for (i, slot) in ring.iter_mut().enumerate() {
            *slot = i as u8;
        }
        IdAllocator {
            ring,
            head: 0,
            free: 256,
            outstanding: [false; 256],
        }
    }

    /// Free Identifiers left.
    pub fn free(&self) -> usize {
        self.free
    }

    /// Identifiers outstanding.
    pub fn outstanding(&self) -> usize {
        256 - self.free
    }

    pub fn is_outstanding(&self, id: u8) -> bool {
        self.outstanding[usize::from(id)]
    }

    /// The Identifier free the longest, now outstanding; `None` when all 256 are outstanding.
    pub fn allocate(&mut self) -> Option<u8> {
        if self.free == 0 {
            return None;
        }
        let id = self.ring[self.head];
        self.head = (self.head + 1) % 256;
        self.free -= 1;
        debug_assert!(!self.outstanding[usize::from(id)]);
        self.outstanding[usize::from(id)] = true;
        Some(id)
    }

    /// Returns `id` to the back of the ring. Releasing an Identifier that is not outstanding
    /// is refused (returns false) so that a double release can never make one id free twice.
    pub fn release(&mut self, id: u8) -> bool {
        if !self.outstanding[usize::from(id)] {
            return false;
        }
        self.outstanding[usize::from(id)] = false;
        let tail = (self.head + self.free) % 256;
        self.ring[tail] = id;
        self.free += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_all_256_then_refuses() {
        let mut a = IdAllocator::new();
        let mut seen = [false; 256];
        for _ in 0..256 {
            let id = a.allocate().unwrap();
            assert!(!seen[usize::from(id)], "id {id} handed out twice");
            seen[usize::from(id)] = true;
        }
        assert_eq!(a.allocate(), None);
        assert_eq!(a.outstanding(), 256);
        assert!(a.release(17));
        assert!(!a.release(17), "double release must be refused");
        assert_eq!(a.allocate(), Some(17));
        assert_eq!(a.allocate(), None);
    }

    #[test]
    fn released_ids_go_to_the_back_of_the_ring() {
        let mut a = IdAllocator::new();
        let first = a.allocate().unwrap();
        assert_eq!(first, 0);
        a.release(first);
        // 255 other ids come before 0 again.
        for expected in 1..=255u8 {
            assert_eq!(a.allocate(), Some(expected));
        }
        assert_eq!(a.allocate(), Some(0));
    }

    /// A pseudo-random interleaving of allocations and releases (answers arrive out of
    /// order): an allocated id is never one still outstanding, and the model agrees.
    #[test]
    fn never_reuses_an_outstanding_identifier() {
        let mut a = IdAllocator::new();
        let mut outstanding: Vec<u8> = Vec::new();
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut allocations = 0;
        for _ in 0..200_000 {
            let r = next();
            if r % 3 != 0 || outstanding.is_empty() {
                if let Some(id) = a.allocate() {
                    assert!(!outstanding.contains(&id), "reused outstanding id {id}");
                    outstanding.push(id);
                    allocations += 1;
                } else {
                    assert_eq!(outstanding.len(), 256);
                }
            } else {
                let i = (r >> 8) as usize % outstanding.len();
                let id = outstanding.swap_remove(i);
                assert!(a.release(id));
            }
            assert_eq!(a.outstanding(), outstanding.len());
            for &id in &outstanding {
                assert!(a.is_outstanding(id));
            }
        }
        assert!(allocations > 60_000, "{allocations}");
    }
}
