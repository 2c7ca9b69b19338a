//! Where session records live: one fixed cell of atomic words per record id, plus an
//! overflow arena of atomic words, read optimistically (a seqlock built from atomics only,
//! so no `unsafe`).
//!
//! Owns: record storage and its reclamation. The cell of a record id is 12 words: a header
//! word packing (offset, length in words, generation, inline flag) and 11 words (88 octets)
//! of inline payload. A record that fits is stored inline, so a lookup reads the index entry
//! and then this one cell: no further indirection. A record that does not fit, or a new
//! version of a record whose inline payload is live (CoA, tombstone), goes to a block of the
//! overflow arena and the header points there; the next version goes back inline (the
//! versions alternate), so a live inline payload is never overwritten. Readers copy the words
//! and re-check the header: an unchanged header proves the copy is whole (the writer changes
//! a header, issues a release fence, and only then reuses the payload or a freed block).
//! Readers never wait: there is no "write in progress" state to spin on.
//!
//! The header word, every bit used:
//!
//! | bits   | field                                                   |
//! |--------|---------------------------------------------------------|
//! | 0..32  | overflow offset in words (0 for an inline record)      |
//! | 32..42 | length in words (0: no record); hence `MAX_RECORD`      |
//! | 42..63 | generation, 21 bits, +1 (wrapping) on every store/clear |
//! | 63     | inline flag                                             |
//!
//! Wrap bound: a reader's check is fooled only if, between its two header loads, the cell
//! was stored or cleared a multiple of 2^21 (2,097,152) times and the last store has the same
//! offset, length and inline flag as the header it first loaded. Even at 10,000 changes per
//! second of one record (far beyond any CoA rate for one session) that needs a reader
//! preempted mid-copy for 3.5 minutes (35 minutes at 1,000 per second). Readers restart
//! their copy from a fresh header after every failed check, so only one preemption counts.
//! Must not touch: record contents (`record`), indexes, or the writer lock (the caller holds
//! the table's writer lock for every `&mut ArenaWriter` call).
#![forbid(unsafe_code)]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering, fence};

const WORD_CHUNK_BITS: u32 = 18; // 2 MiB per overflow chunk
const WORD_CHUNK: usize = 1 << WORD_CHUNK_BITS;
const WORD_CHUNKS: usize = 1 << 14; // 2^32 words in all
/// Words per cell: the header and the inline payload.
const CELL: usize = 12;
const INLINE_WORDS: usize = CELL - 1;
/// Cell chunks grow geometrically up to `MAX_IDS` ids (chunk 0 holds `FIRST_IDS` ids, chunk
/// k in 1..=8 holds `FIRST_IDS << (k - 1)`), then stay at `MAX_IDS` (24 MiB): small tables
/// stay small and a large one wastes at most one partly used chunk (chunks are zeroed, so
/// resident, when created).
const FIRST_IDS_BITS: u32 = 10;
const FIRST_IDS: usize = 1 << FIRST_IDS_BITS;
const MAX_IDS_BITS: u32 = 18;
const MAX_IDS: usize = 1 << MAX_IDS_BITS;
const GEOMETRIC_CHUNKS: usize = (MAX_IDS_BITS - FIRST_IDS_BITS) as usize + 1;
const CELL_CHUNKS: usize = GEOMETRIC_CHUNKS - 1 + (1 << (32 - MAX_IDS_BITS));

// The header word (see the module documentation): offset in bits 0..32, length in words in
// bits 32..42, generation in bits 42..63, inline flag in bit 63. Every bit is used.
const OFFSET_MASK: u64 = 0xffff_ffff;
const LEN_SHIFT: u32 = 32;
const LEN_BITS: u32 = 10;
const LEN_MASK: u64 = (1 << LEN_BITS) - 1;
const GEN_SHIFT: u32 = LEN_SHIFT + LEN_BITS;
/// Generation bits: all that the offset, the length and the inline flag leave.
const GEN_BITS: u32 = 63 - GEN_SHIFT;
const GEN_MASK: u64 = (1 << GEN_BITS) - 1;
const INLINE_FLAG: u64 = 1 << 63;
const _: () = assert!(GEN_BITS == 21 && GEN_SHIFT + GEN_BITS == 63);

/// (chunk, index within it) of a record id.
fn cell_pos(id: u32) -> (usize, usize) {
    if id as usize >= MAX_IDS {
        let chunk = GEOMETRIC_CHUNKS - 1 + (id >> MAX_IDS_BITS) as usize;
        return (chunk, id as usize & (MAX_IDS - 1));
    }
    let q = id >> FIRST_IDS_BITS;
    if q == 0 {
        return (0, id as usize);
    }
    let chunk = (32 - q.leading_zeros()) as usize;
    let start = FIRST_IDS << (chunk - 1);
    (chunk, id as usize - start)
}

fn chunk_ids(chunk: usize) -> usize {
    match chunk {
        0 => FIRST_IDS,
        c if c < GEOMETRIC_CHUNKS => FIRST_IDS << (c - 1),
        _ => MAX_IDS,
    }
}

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
    /// Overflow words currently in use (live blocks).
    pub(crate) used_words: u64,
    /// Octets of records currently stored inline.
    pub(crate) inline_bytes: u64,
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
    cells: Box<[OnceLock<Box<[AtomicU64]>>]>,
    /// Overflow words the bump pointer may hand out (all of them, but for tests that need
    /// an arena that fills up).
    word_limit: u64,
}

impl Default for Arena {
    fn default() -> Self {
        Arena {
            words: chunks(WORD_CHUNKS),
            cells: chunks(CELL_CHUNKS),
            word_limit: (WORD_CHUNKS * WORD_CHUNK) as u64,
        }
    }
}

/// Storage set aside for the next version of one record by [`Arena::reserve`]: nothing is
/// published yet, so it can still be given back ([`Arena::unreserve`]) or published
/// ([`Arena::publish`], which cannot fail).
#[derive(Debug)]
pub(crate) struct Reserved<'a> {
    words: usize,
    /// The overflow block (offset, words), or `None`: the version goes inline.
    block: Option<(u64, &'a [AtomicU64])>,
}

impl core::fmt::Debug for Arena {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Arena").finish_non_exhaustive()
    }
}

fn header_words(h: u64) -> usize {
    ((h >> LEN_SHIFT) & LEN_MASK) as usize
}

fn header_generation(h: u64) -> u64 {
    (h >> GEN_SHIFT) & GEN_MASK
}

fn header_offset(h: u64) -> u64 {
    h & OFFSET_MASK
}

/// A header word: overflow `offset` (0 for inline), length in words, generation, inline flag.
fn encode_header(offset: u64, words: usize, generation: u64, inline: bool) -> u64 {
    debug_assert!(offset <= OFFSET_MASK && words as u64 <= LEN_MASK && generation <= GEN_MASK);
    let flag = if inline { INLINE_FLAG } else { 0 };
    flag | (generation & GEN_MASK) << GEN_SHIFT | (words as u64 & LEN_MASK) << LEN_SHIFT | offset
}

fn next_generation(h: u64) -> u64 {
    (header_generation(h) + 1) & GEN_MASK
}

impl Arena {
    /// Loads the first word of record `id`'s cell (a batch's hint) and returns it, so that
    /// the load is not optimised away. Lock-free.
    pub(crate) fn touch(&self, id: u32) -> u64 {
        self.cell(id)
            .and_then(|cell| cell.first())
            .map_or(0, |word| word.load(Ordering::Relaxed))
    }

    fn cell(&self, id: u32) -> Option<&[AtomicU64]> {
        let (chunk, i) = cell_pos(id);
        self.cells.get(chunk)?.get()?.get(i * CELL..(i + 1) * CELL)
    }

    fn block(&self, offset: u64, len: usize) -> Option<&[AtomicU64]> {
        let off = offset as usize;
        let chunk = self.words.get(off >> WORD_CHUNK_BITS)?.get()?;
        let start = off & (WORD_CHUNK - 1);
        chunk.get(start..start + len)
    }

    /// Copies record `id` into `buf`. False when the id holds no record. Lock-free: retries
    /// only when the writer replaced this very record during the copy.
    pub(crate) fn read(&self, id: u32, buf: &mut RecBuf) -> bool {
        let Some(cell) = self.cell(id) else {
            return false;
        };
        loop {
            let h1 = cell[0].load(Ordering::Acquire);
            let words = header_words(h1);
            if words == 0 {
                return false;
            }
            let source = if h1 & INLINE_FLAG != 0 {
                cell.get(1..1 + words)
            } else {
                self.block(header_offset(h1), words)
            };
            let Some(source) = source else {
                return false;
            };
            let len = words * 8;
            let out: &mut [u8] = if len <= INLINE {
                &mut buf.inline[..len]
            } else {
                buf.heap.resize(len, 0);
                &mut buf.heap[..len]
            };
            for (w, o) in source.iter().zip(out.chunks_exact_mut(8)) {
                o.copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
            }
            fence(Ordering::Acquire);
            if cell[0].load(Ordering::Relaxed) == h1 {
                buf.len = len;
                return true;
            }
        }
    }

    /// The highest id ever handed out, plus one (scans).
    pub(crate) fn id_bound(w: &ArenaWriter) -> u32 {
        w.next_id
    }

    /// A fresh record id (its cell empty).
    pub(crate) fn alloc_id(&self, w: &mut ArenaWriter) -> Result<u32, NoSpace> {
        if let Some(id) = w.free_ids.pop() {
            return Ok(id);
        }
        let id = w.next_id;
        let (chunk, _) = cell_pos(id);
        let cells = self.cells.get(chunk).ok_or(NoSpace)?;
        cells.get_or_init(|| zeroed(chunk_ids(chunk) * CELL));
        w.next_id = id.checked_add(1).ok_or(NoSpace)?;
        Ok(id)
    }

    /// Returns an id whose cell is empty to the free list.
    pub(crate) fn free_id(&self, w: &mut ArenaWriter, id: u32) {
        w.free_ids.push(id);
    }

    /// An arena whose overflow holds at most `words` words (tests: a full arena).
    #[cfg(test)]
    pub(crate) fn with_word_limit(words: u64) -> Self {
        Arena {
            word_limit: words,
            ..Arena::default()
        }
    }

    /// Stores `bytes` as the record of `id`, replacing any previous version. Readers see the
    /// old version or the new one, never a mixture, and never wait.
    pub(crate) fn store(&self, w: &mut ArenaWriter, id: u32, bytes: &[u8]) -> Result<(), NoSpace> {
        let r = self.reserve(w, id, bytes.len())?;
        self.publish(w, id, r, bytes);
        Ok(())
    }

    /// Sets aside the storage of a new version of `id`, `len` octets long, without
    /// publishing anything: fails (changing nothing) when the record is too large or the
    /// arena is full. Until the reservation is published or given back, no other version
    /// of `id` may be stored or reserved (its inline payload is counted as free or not
    /// by the current header).
    pub(crate) fn reserve(
        &self,
        w: &mut ArenaWriter,
        id: u32,
        len: usize,
    ) -> Result<Reserved<'_>, NoSpace> {
        let words = len.div_ceil(8).max(1);
        if words as u64 > LEN_MASK {
            return Err(NoSpace);
        }
        let cell = self.cell(id).ok_or(NoSpace)?;
        let old = cell[0].load(Ordering::Relaxed);
        // The inline payload may be rewritten only while no reader can trust it: the cell
        // is empty or points to an overflow block. Any reader still copying an older inline
        // version holds an older header, which already differs.
        let inline_free = old & INLINE_FLAG == 0 || header_words(old) == 0;
        if words <= INLINE_WORDS && inline_free {
            return Ok(Reserved { words, block: None });
        }
        let offset = self.alloc_block(w, words)?;
        match self.block(offset, words) {
            Some(block) => Ok(Reserved {
                words,
                block: Some((offset, block)),
            }),
            None => {
                free_block(w, offset, words);
                Err(NoSpace)
            }
        }
    }

    /// Gives back an unpublished reservation. No reader was ever shown its block.
    pub(crate) fn unreserve(&self, w: &mut ArenaWriter, r: Reserved<'_>) {
        if let Some((offset, _)) = r.block {
            free_block(w, offset, r.words);
        }
    }

    /// Publishes `bytes` (as long as reserved) as the new version of `id` into storage
    /// reserved for it; cannot fail.
    pub(crate) fn publish(&self, w: &mut ArenaWriter, id: u32, r: Reserved<'_>, bytes: &[u8]) {
        debug_assert_eq!(bytes.len().div_ceil(8).max(1), r.words);
        let Some(cell) = self.cell(id) else {
            // `reserve` found the cell; cells are never dropped.
            self.unreserve(w, r);
            return;
        };
        let old = cell[0].load(Ordering::Relaxed);
        let generation = next_generation(old);
        let header = match r.block {
            None => {
                debug_assert!(old & INLINE_FLAG == 0 || header_words(old) == 0);
                fence(Ordering::Release);
                write_words(&cell[1..=r.words], bytes);
                w.inline_bytes += (r.words * 8) as u64;
                encode_header(0, r.words, generation, true)
            }
            Some((offset, block)) => {
                // Any reader still copying a block freed earlier must see its header
                // changed: header stores happened before this fence (seqlock writer side).
                fence(Ordering::Release);
                write_words(block, bytes);
                w.used_words += r.words as u64;
                encode_header(offset, r.words, generation, false)
            }
        };
        cell[0].store(header, Ordering::Release);
        self.release(w, old);
    }

    /// Empties `id`'s cell and frees its storage; the id itself is freed by `free_id`.
    pub(crate) fn clear(&self, w: &mut ArenaWriter, id: u32) {
        if let Some(cell) = self.cell(id) {
            let old = cell[0].load(Ordering::Relaxed);
            cell[0].store(
                encode_header(0, 0, next_generation(old), false),
                Ordering::Release,
            );
            self.release(w, old);
        }
    }

    /// Accounts for the storage a replaced header pointed at.
    fn release(&self, w: &mut ArenaWriter, old: u64) {
        let words = header_words(old);
        if words == 0 {
            return;
        }
        if old & INLINE_FLAG != 0 {
            w.inline_bytes -= (words * 8) as u64;
            return;
        }
        free_block(w, header_offset(old), words);
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
        if off + words as u64 > self.word_limit {
            return Err(NoSpace);
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

/// Puts an overflow block on the free list of its length.
fn free_block(w: &mut ArenaWriter, offset: u64, words: usize) {
    if w.free.len() <= words {
        w.free.resize_with(words + 1, Vec::new);
    }
    w.free[words].push(offset as u32);
}

fn write_words(dest: &[AtomicU64], bytes: &[u8]) {
    for (w, chunk) in dest.iter().zip(bytes.chunks(8)) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        w.store(u64::from_le_bytes(word), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cell_positions_cover_ids_without_gaps() {
        assert_eq!(cell_pos(0), (0, 0));
        assert_eq!(cell_pos(1023), (0, 1023));
        assert_eq!(cell_pos(1024), (1, 0));
        assert_eq!(cell_pos(2047), (1, 1023));
        assert_eq!(cell_pos(2048), (2, 0));
        assert_eq!(cell_pos(MAX_IDS as u32 - 1), (8, (MAX_IDS >> 1) - 1));
        assert_eq!(cell_pos(MAX_IDS as u32), (9, 0));
        assert_eq!(cell_pos(u32::MAX), (CELL_CHUNKS - 1, MAX_IDS - 1));
        let mut next = 0usize;
        for chunk in 0..CELL_CHUNKS {
            assert_eq!(cell_pos(next as u32), (chunk, 0));
            next += chunk_ids(chunk);
        }
        assert_eq!(next, 1 << 32);
    }

    #[test]
    fn header_uses_every_bit_and_round_trips_the_widest_values() {
        let widest = encode_header(OFFSET_MASK, LEN_MASK as usize, GEN_MASK, true);
        assert_eq!(widest, u64::MAX, "a header bit is unused");
        assert_eq!(GEN_MASK, (1 << 21) - 1);
        assert_eq!(header_offset(widest), OFFSET_MASK);
        assert_eq!(header_words(widest), LEN_MASK as usize);
        assert_eq!(header_generation(widest), GEN_MASK);
        assert_ne!(widest & INLINE_FLAG, 0);
        // Each field decodes alone, none leaks into another.
        let h = encode_header(0, 0, GEN_MASK, false);
        assert_eq!(
            (
                header_offset(h),
                header_words(h),
                header_generation(h),
                h & INLINE_FLAG
            ),
            (0, 0, GEN_MASK, 0)
        );
        let h = encode_header(0x1234_5678, 5, 1 << 20, false);
        assert_eq!(
            (
                header_offset(h),
                header_words(h),
                header_generation(h),
                h & INLINE_FLAG
            ),
            (0x1234_5678, 5, 1 << 20, 0)
        );
        // 2^20 changes no longer bring a header back to its value.
        assert_ne!(
            encode_header(8, 3, 1 << 20, true),
            encode_header(8, 3, 0, true)
        );
    }

    #[test]
    fn generation_wraps_after_2_pow_21_changes_only() {
        assert_eq!(next_generation(encode_header(0, 1, 0, true)), 1);
        assert_eq!(
            next_generation(encode_header(0, 1, (1 << 20) - 1, true)),
            1 << 20
        );
        assert_eq!(
            next_generation(encode_header(7, 1, GEN_MASK - 1, false)),
            GEN_MASK
        );
        assert_eq!(next_generation(encode_header(7, 1, GEN_MASK, false)), 0);
        assert_eq!(next_generation(u64::MAX), 0);
        // Through a real cell: a store or clear at the last generation wraps to 0 and
        // leaves the other fields whole.
        let arena = Arena::default();
        let mut w = ArenaWriter::default();
        let id = arena.alloc_id(&mut w).unwrap();
        arena.store(&mut w, id, b"first").unwrap();
        let cell = arena.cell(id).unwrap();
        let h = cell[0].load(Ordering::Relaxed);
        cell[0].store(
            encode_header(
                header_offset(h),
                header_words(h),
                GEN_MASK,
                h & INLINE_FLAG != 0,
            ),
            Ordering::Relaxed,
        );
        arena.store(&mut w, id, b"second version").unwrap();
        let h = cell[0].load(Ordering::Relaxed);
        assert_eq!((header_generation(h), header_words(h)), (0, 2));
        assert_eq!(h & INLINE_FLAG, 0);
        let mut buf = RecBuf::default();
        assert!(arena.read(id, &mut buf));
        assert_eq!(&buf.bytes()[..14], b"second version");
        cell[0].store(h | GEN_MASK << GEN_SHIFT, Ordering::Relaxed);
        arena.clear(&mut w, id);
        assert_eq!(cell[0].load(Ordering::Relaxed), 0);
        assert!(!arena.read(id, &mut buf));
    }

    #[test]
    fn store_read_replace_clear() {
        let arena = Arena::default();
        let mut w = ArenaWriter::default();
        let id = arena.alloc_id(&mut w).unwrap();
        let mut buf = RecBuf::default();
        assert!(!arena.read(id, &mut buf));
        // Inline, then (the inline version being live) overflow, then inline again.
        arena.store(&mut w, id, b"hello world").unwrap();
        assert_eq!((w.inline_bytes, w.used_words), (16, 0));
        assert!(arena.read(id, &mut buf));
        assert_eq!(&buf.bytes()[..11], b"hello world");
        arena.store(&mut w, id, b"second version").unwrap();
        assert_eq!((w.inline_bytes, w.used_words), (0, 2));
        assert!(arena.read(id, &mut buf));
        assert_eq!(&buf.bytes()[..14], b"second version");
        arena.store(&mut w, id, b"third").unwrap();
        assert_eq!((w.inline_bytes, w.used_words), (8, 0));
        assert!(arena.read(id, &mut buf));
        assert_eq!(&buf.bytes()[..5], b"third");
        // Too big for a cell: overflow.
        let big = vec![7u8; 3000];
        arena.store(&mut w, id, &big).unwrap();
        assert!(arena.read(id, &mut buf));
        assert_eq!(&buf.bytes()[..3000], &big[..]);
        assert_eq!((w.inline_bytes, w.used_words), (0, 375));
        arena.clear(&mut w, id);
        assert!(!arena.read(id, &mut buf));
        assert_eq!(w.used_words, 0);
        // Freed overflow blocks are reused.
        let id2 = arena.alloc_id(&mut w).unwrap();
        arena.store(&mut w, id2, &big).unwrap();
        assert_eq!(w.bump, 2 + 375);
        arena.store(&mut w, id2, &[1; 100]).unwrap();
        assert_eq!(w.bump, 2 + 375 + 13);
        assert!(arena.store(&mut w, id2, &vec![0; MAX_RECORD + 1]).is_err());
        assert!(!arena.read(u32::MAX, &mut buf));
        for _ in 0..3000 {
            arena.alloc_id(&mut w).unwrap();
        }
        arena.store(&mut w, 2500, b"far").unwrap();
        assert!(arena.read(2500, &mut buf));
    }
}
