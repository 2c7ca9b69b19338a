//! Where session records live: a word arena of atomics and one slot word per record id,
//! read optimistically (a seqlock built from atomics only, so no `unsafe`).
//!
//! Owns: record storage and its reclamation. A record is copied into blocks of `AtomicU64`
//! words; the slot of its id packs (offset, length in words, generation). Readers copy the
//! words out and re-check the slot: an unchanged slot proves the copy is whole (the writer
//! changes a slot, issues a release fence, and only then reuses the freed block). Records are
//! never modified in place: a change writes a new block and swaps the slot, so a reader sees
//! the old record or the new one, never a mixture.
//! Must not touch: record contents (`record`), indexes, or the writer lock (the caller holds
//! the table's writer lock for every `&mut ArenaWriter` call).
#![forbid(unsafe_code)]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering, fence};

const WORD_CHUNK_BITS: u32 = 18; // 2 MiB per word chunk
const WORD_CHUNK: usize = 1 << WORD_CHUNK_BITS;
const WORD_CHUNKS: usize = 1 << 14; // 2^32 words in all
const SLOT_CHUNK_BITS: u32 = 16;
const SLOT_CHUNK: usize = 1 << SLOT_CHUNK_BITS;
const SLOT_CHUNKS: usize = 1 << 15; // 2^31 record ids

const LEN_SHIFT: u32 = 32;
const LEN_MASK: u64 = 0x3ff;
const GEN_SHIFT: u32 = 42;
const GEN_MASK: u64 = (1 << 21) - 1;

/// The largest record, in octets.
pub(crate) const MAX_RECORD: usize = (LEN_MASK as usize) * 8;
/// Records up to this size are read without allocating.
const INLINE: usize = 512;

/// The arena is full, or a record is larger than [`MAX_RECORD`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NoSpace;

/// Writer-side state (free lists, bump pointer). Only touched under the table's writer lock.
#[derive(Debug, Default)]
pub(crate) struct ArenaWriter {
    bump: u64,
    /// Free blocks by length in words.
    free: Vec<Vec<u32>>,
    next_id: u32,
    free_ids: Vec<u32>,
    /// Words currently in use (live blocks).
    pub(crate) used_words: u64,
}

/// A copy of one record, on the stack when small.
pub(crate) struct RecBuf {
    inline: [u8; INLINE],
    heap: Vec<u8>,
    len: usize,
}

impl Default for RecBuf {
    fn default() -> Self {
        RecBuf {
            inline: [0; INLINE],
            heap: Vec::new(),
            len: 0,
        }
    }
}

impl RecBuf {
    pub(crate) fn bytes(&self) -> &[u8] {
        if self.len <= INLINE {
            &self.inline[..self.len]
        } else {
            &self.heap[..self.len]
        }
    }
}

fn chunks<T>(n: usize) -> Box<[OnceLock<Box<[T]>>]> {
    (0..n).map(|_| OnceLock::new()).collect()
}

fn zeroed(n: usize) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

/// Record storage shared by readers and the writer.
pub(crate) struct Arena {
    words: Box<[OnceLock<Box<[AtomicU64]>>]>,
    slots: Box<[OnceLock<Box<[AtomicU64]>>]>,
}

impl Default for Arena {
    fn default() -> Self {
        Arena {
            words: chunks(WORD_CHUNKS),
            slots: chunks(SLOT_CHUNKS),
        }
    }
}

impl core::fmt::Debug for Arena {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Arena").finish_non_exhaustive()
    }
}

impl Arena {
    fn slot(&self, id: u32) -> Option<&AtomicU64> {
        let id = id as usize;
        self.slots
            .get(id >> SLOT_CHUNK_BITS)?
            .get()?
            .get(id & (SLOT_CHUNK - 1))
    }

    fn block(&self, offset: u64, len: usize) -> Option<&[AtomicU64]> {
        let off = offset as usize;
        let chunk = self.words.get(off >> WORD_CHUNK_BITS)?.get()?;
        let start = off & (WORD_CHUNK - 1);
        chunk.get(start..start + len)
    }

    /// Copies record `id` into `buf`. False when the id holds no record. Lock-free: retries
    /// only while the writer replaces this very record.
    pub(crate) fn read(&self, id: u32, buf: &mut RecBuf) -> bool {
        let Some(slot) = self.slot(id) else {
            return false;
        };
        loop {
            let s1 = slot.load(Ordering::Acquire);
            let words = ((s1 >> LEN_SHIFT) & LEN_MASK) as usize;
            if words == 0 {
                return false;
            }
            let Some(block) = self.block(s1 & 0xffff_ffff, words) else {
                return false;
            };
            let len = words * 8;
            let out: &mut [u8] = if len <= INLINE {
                &mut buf.inline[..len]
            } else {
                buf.heap.resize(len, 0);
                &mut buf.heap[..len]
            };
            for (w, o) in block.iter().zip(out.chunks_exact_mut(8)) {
                o.copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
            }
            fence(Ordering::Acquire);
            if slot.load(Ordering::Relaxed) == s1 {
                buf.len = len;
                return true;
            }
        }
    }

    /// The highest id ever handed out, plus one (scans).
    pub(crate) fn id_bound(w: &ArenaWriter) -> u32 {
        w.next_id
    }

    /// A fresh record id (its slot empty).
    pub(crate) fn alloc_id(&self, w: &mut ArenaWriter) -> Result<u32, NoSpace> {
        if let Some(id) = w.free_ids.pop() {
            return Ok(id);
        }
        let id = w.next_id;
        let chunk = self
            .slots
            .get(id as usize >> SLOT_CHUNK_BITS)
            .ok_or(NoSpace)?;
        chunk.get_or_init(|| zeroed(SLOT_CHUNK));
        w.next_id = id.checked_add(1).ok_or(NoSpace)?;
        Ok(id)
    }

    /// Returns an id whose slot is empty to the free list.
    pub(crate) fn free_id(&self, w: &mut ArenaWriter, id: u32) {
        w.free_ids.push(id);
    }

    /// Writes `bytes` into a new block and points `id`'s slot at it (freeing the block it
    /// pointed at). Readers see the old record or the new one.
    pub(crate) fn store(&self, w: &mut ArenaWriter, id: u32, bytes: &[u8]) -> Result<(), NoSpace> {
        let words = bytes.len().div_ceil(8).max(1);
        if words as u64 > LEN_MASK {
            return Err(NoSpace);
        }
        let slot = self.slot(id).ok_or(NoSpace)?;
        let offset = self.alloc_block(w, words)?;
        // Any reader still copying a block freed earlier must see its slot changed: the slot
        // stores happened before this fence (seqlock writer side).
        fence(Ordering::Release);
        let block = self.block(offset, words).ok_or(NoSpace)?;
        for (w, chunk) in block.iter().zip(bytes.chunks(8)) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            w.store(u64::from_le_bytes(word), Ordering::Relaxed);
        }
        let old = slot.load(Ordering::Relaxed);
        let generation = ((old >> GEN_SHIFT) + 1) & GEN_MASK;
        slot.store(
            offset | (words as u64) << LEN_SHIFT | generation << GEN_SHIFT,
            Ordering::Release,
        );
        w.used_words += words as u64;
        self.release_block(w, old);
        Ok(())
    }

    /// Empties `id`'s slot and frees its block; the id itself is freed by `free_id`.
    pub(crate) fn clear(&self, w: &mut ArenaWriter, id: u32) {
        if let Some(slot) = self.slot(id) {
            let old = slot.load(Ordering::Relaxed);
            let generation = ((old >> GEN_SHIFT) + 1) & GEN_MASK;
            slot.store(generation << GEN_SHIFT, Ordering::Release);
            self.release_block(w, old);
        }
    }

    fn release_block(&self, w: &mut ArenaWriter, old_slot: u64) {
        let words = ((old_slot >> LEN_SHIFT) & LEN_MASK) as usize;
        if words == 0 {
            return;
        }
        if w.free.len() <= words {
            w.free.resize_with(words + 1, Vec::new);
        }
        w.free[words].push(old_slot as u32);
        w.used_words -= words as u64;
    }

    fn alloc_block(&self, w: &mut ArenaWriter, words: usize) -> Result<u64, NoSpace> {
        if let Some(off) = w.free.get_mut(words).and_then(Vec::pop) {
            return Ok(u64::from(off));
        }
        let mut off = w.bump;
        if (off as usize & (WORD_CHUNK - 1)) + words > WORD_CHUNK {
            off = (off | (WORD_CHUNK as u64 - 1)) + 1;
        }
        let chunk = self
            .words
            .get(off as usize >> WORD_CHUNK_BITS)
            .ok_or(NoSpace)?;
        chunk.get_or_init(|| zeroed(WORD_CHUNK));
        w.bump = off + words as u64;
        Ok(off)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_read_replace_clear() {
        let arena = Arena::default();
        let mut w = ArenaWriter::default();
        let id = arena.alloc_id(&mut w).unwrap();
        let mut buf = RecBuf::default();
        assert!(!arena.read(id, &mut buf));
        arena.store(&mut w, id, b"hello world").unwrap();
        assert!(arena.read(id, &mut buf));
        assert_eq!(&buf.bytes()[..11], b"hello world");
        let big = vec![7u8; 3000];
        arena.store(&mut w, id, &big).unwrap();
        assert!(arena.read(id, &mut buf));
        assert_eq!(&buf.bytes()[..3000], &big[..]);
        assert_eq!(w.used_words, 375);
        arena.clear(&mut w, id);
        assert!(!arena.read(id, &mut buf));
        assert_eq!(w.used_words, 0);
        // The freed two-word block is reused.
        let id2 = arena.alloc_id(&mut w).unwrap();
        arena.store(&mut w, id2, b"0123456789").unwrap();
        assert_eq!(w.bump, 2 + 375);
        assert!(arena.store(&mut w, id2, &vec![0; MAX_RECORD + 1]).is_err());
        assert!(!arena.read(u32::MAX, &mut buf));
    }
}
