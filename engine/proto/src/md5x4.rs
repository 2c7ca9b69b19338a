//! MD5 of four messages at once, for the authenticators of a batch. Owns: the four-lane MD5
//! (RFC 1321), its padding, and continuing from a midstate (an HMAC key block already
//! compressed, RFC 2104). Must not touch: what is hashed (the callers put the packet, the
//! secret and the key state together, as [`crate::auth`] defines each authenticator).
//!
//! MD5 is one long chain of dependent 32-bit operations, so one message leaves most of a
//! core's execution units idle; four independent messages in four lanes (`[u32; 4]`, which
//! the compiler turns into SSE2 vector operations) cost little more than one. The lanes run
//! in lockstep, so their messages must pad to the same number of 64-octet blocks; their
//! lengths, parts and starting states may differ. Checked against the `md-5` crate for every
//! length up to four blocks and for every split into parts.
#![forbid(unsafe_code)]

/// Messages hashed at once by [`md5x4`].
pub const LANES: usize = 4;

/// Longest message (data + suffix) hashed in lanes; longer ones are the caller's to do
/// one by one.
pub const MAX_LEN: usize = 4 * 64 - 9;

/// The fresh MD5 state (RFC 1321 §3.3), for [`md5x4_parts`] lanes that start anew.
pub const INIT: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];

const K: [u32; 64] = [
    0xd76aa478, 0xe8c7b756, 0x242070db, 0xc1bdceee, 0xf57c0faf, 0x4787c62a, 0xa8304613, 0xfd469501,
    0x698098d8, 0x8b44f7af, 0xffff5bb1, 0x895cd7be, 0x6b901122, 0xfd987193, 0xa679438e, 0x49b40821,
    0xf61e2562, 0xc040b340, 0x265e5a51, 0xe9b6c7aa, 0xd62f105d, 0x02441453, 0xd8a1e681, 0xe7d3fbc8,
    0x21e1cde6, 0xc33707d6, 0xf4d50d87, 0x455a14ed, 0xa9e3e905, 0xfcefa3f8, 0x676f02d9, 0x8d2a4c8a,
    0xfffa3942, 0x8771f681, 0x6d9d6122, 0xfde5380c, 0xa4beea44, 0x4bdecfa9, 0xf6bb4b60, 0xbebfbc70,
    0x289b7ec6, 0xeaa127fa, 0xd4ef3085, 0x04881d05, 0xd9d4d039, 0xe6db99e5, 0x1fa27cf8, 0xc4ac5665,
    0xf4292244, 0x432aff97, 0xab9423a7, 0xfc93a039, 0x655b59c3, 0x8f0ccc92, 0xffeff47d, 0x85845dd1,
    0x6fa87e4f, 0xfe2ce6e0, 0xa3014314, 0x4e0811a1, 0xf7537e82, 0xbd3af235, 0x2ad7d2bb, 0xeb86d391,
];

#[inline(always)]
fn map<const L: usize>(f: impl Fn(usize) -> u32) -> [u32; L] {
    std::array::from_fn(f)
}

/// One MD5 step in every lane: `a = b + rotl(a + fun(b, c, d) + m + k, s)`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn step<const L: usize>(
    a: [u32; L],
    b: [u32; L],
    c: [u32; L],
    d: [u32; L],
    m: [u32; L],
    k: u32,
    s: u32,
    fun: impl Fn(u32, u32, u32) -> u32,
) -> [u32; L] {
    map(|i| {
        fun(b[i], c[i], d[i])
            .wrapping_add(a[i])
            .wrapping_add(m[i])
            .wrapping_add(k)
            .rotate_left(s)
            .wrapping_add(b[i])
    })
}

#[inline(always)]
fn f(x: u32, y: u32, z: u32) -> u32 {
    (x & y) | (!x & z)
}
#[inline(always)]
fn g(x: u32, y: u32, z: u32) -> u32 {
    (x & z) | (y & !z)
}
#[inline(always)]
fn h(x: u32, y: u32, z: u32) -> u32 {
    x ^ y ^ z
}
#[inline(always)]
fn i(x: u32, y: u32, z: u32) -> u32 {
    y ^ (x | !z)
}

/// One 64-octet block in every lane; `m[j]` holds message word `j` of each lane.
#[inline(always)]
fn compress<const L: usize>(state: &mut [[u32; L]; 4], m: &[[u32; L]; 16]) {
    let [mut a, mut b, mut c, mut d] = *state;
    macro_rules! round {
        ($fun:ident, $base:expr, $idx:expr, $s:expr) => {
            for q in 0..4 {
                let j = $base + 4 * q;
                a = step(a, b, c, d, m[$idx(j)], K[j], $s[0], $fun);
                d = step(d, a, b, c, m[$idx(j + 1)], K[j + 1], $s[1], $fun);
                c = step(c, d, a, b, m[$idx(j + 2)], K[j + 2], $s[2], $fun);
                b = step(b, c, d, a, m[$idx(j + 3)], K[j + 3], $s[3], $fun);
            }
        };
    }
    round!(f, 0, |j: usize| j, [7, 12, 17, 22]);
    round!(g, 16, |j: usize| (5 * j + 1) % 16, [5, 9, 14, 20]);
    round!(h, 32, |j: usize| (3 * j + 5) % 16, [4, 11, 16, 23]);
    round!(i, 48, |j: usize| (7 * j) % 16, [6, 10, 15, 21]);
    let [sa, sb, sc, sd] = state;
    *sa = map(|l| sa[l].wrapping_add(a[l]));
    *sb = map(|l| sb[l].wrapping_add(b[l]));
    *sc = map(|l| sc[l].wrapping_add(c[l]));
    *sd = map(|l| sd[l].wrapping_add(d[l]));
}

/// MD5(`data[l]` ‖ `suffix`) for each of the four lanes. The messages must pad to the same
/// number of blocks (equal lengths always do) and be at most [`MAX_LEN`] long; `None`
/// otherwise.
pub fn md5x4(data: [&[u8]; LANES], suffix: &[u8]) -> Option<[[u8; 16]; LANES]> {
    let parts: [[&[u8]; 2]; LANES] = core::array::from_fn(|l| [data[l], suffix]);
    md5x4_parts([INIT; LANES], 0, core::array::from_fn(|l| &parts[l][..]))
}

/// The MD5 state after one 64-octet block: the midstate an HMAC key block leaves
/// ([`md5x4_parts`] continues from it).
pub fn state_after(block: &[u8; 64]) -> [u32; 4] {
    let m: [[u32; 1]; 16] = core::array::from_fn(|j| {
        let at = 4 * j;
        [u32::from_le_bytes([
            block[at],
            block[at + 1],
            block[at + 2],
            block[at + 3],
        ])]
    });
    let mut state = INIT.map(|x| [x]);
    compress(&mut state, &m);
    state.map(|[x]| x)
}

/// For each lane `l`: the MD5 computation that stood at `states[l]` after `prefix_len`
/// octets (a multiple of 64: 0 with [`INIT`], 64 after an HMAC key block),
/// continued over the concatenation of `lanes[l]` and finished. `None` when the lanes'
/// messages do not pad to the same number of blocks, or to more than four.
pub fn md5x4_parts(
    states: [[u32; 4]; LANES],
    prefix_len: u64,
    lanes: [&[&[u8]]; LANES],
) -> Option<[[u8; 16]; LANES]> {
    let totals: [usize; LANES] = lanes.map(|parts| parts.iter().map(|p| p.len()).sum());
    let blocks = (totals[0] + 9).div_ceil(64);
    if blocks > 4 || totals.iter().any(|t| (t + 9).div_ceil(64) != blocks) {
        return None;
    }
    let job = Job {
        states,
        prefix_len,
        lanes,
        totals,
    };
    // A buffer of exactly the padded length (zeroing 1 KiB for a one-block message would
    // cost a third of the digest).
    Some(match blocks {
        1 => job.run::<64>(),
        2 => job.run::<128>(),
        3 => job.run::<192>(),
        _ => job.run::<256>(),
    })
}

struct Job<'a> {
    states: [[u32; 4]; LANES],
    prefix_len: u64,
    lanes: [&'a [&'a [u8]]; LANES],
    totals: [usize; LANES],
}

impl Job<'_> {
    /// The lanes, each padded to `N` octets, in lockstep.
    #[inline(always)]
    fn run<const N: usize>(&self) -> [[u8; 16]; LANES] {
        let mut buf = [[0u8; N]; LANES];
        for ((b, parts), &total) in buf.iter_mut().zip(self.lanes).zip(&self.totals) {
            let mut at = 0;
            for part in parts {
                if let Some(dst) = b.get_mut(at..at + part.len()) {
                    dst.copy_from_slice(part);
                }
                at += part.len();
            }
            if let Some(pad) = b.get_mut(total) {
                *pad = 0x80;
            }
            let bits = (self.prefix_len + total as u64) * 8;
            b[N - 8..].copy_from_slice(&bits.to_le_bytes());
        }
        let mut state: [[u32; LANES]; 4] = core::array::from_fn(|w| map(|l| self.states[l][w]));
        for block in 0..N / 64 {
            let m: [[u32; LANES]; 16] = core::array::from_fn(|j| {
                let at = block * 64 + 4 * j;
                map(|l| {
                    u32::from_le_bytes([buf[l][at], buf[l][at + 1], buf[l][at + 2], buf[l][at + 3]])
                })
            });
            compress(&mut state, &m);
        }
        core::array::from_fn(|l| {
            let mut out = [0u8; 16];
            for (w, s) in out.chunks_exact_mut(4).zip(&state) {
                w.copy_from_slice(&s[l].to_le_bytes());
            }
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Secret;

    fn md5(data: &[u8], suffix: &[u8]) -> [u8; 16] {
        use md5::Digest as _;
        let mut h = md5::Md5::new();
        h.update(data);
        h.update(suffix);
        h.finalize().into()
    }

    /// Agrees with the md-5 crate for every message length it takes, per lane.
    #[test]
    fn agrees_with_md5_for_every_length() {
        let secret = b"testing123";
        for len in 0..=MAX_LEN - secret.len() {
            let lanes: Vec<Vec<u8>> = (0..LANES)
                .map(|l| (0..len).map(|k| (k * 31 + l * 7 + len) as u8).collect())
                .collect();
            let data = [&lanes[0][..], &lanes[1][..], &lanes[2][..], &lanes[3][..]];
            let got = md5x4(data, secret).unwrap();
            for l in 0..LANES {
                assert_eq!(got[l], md5(data[l], secret), "length {len}, lane {l}");
            }
        }
    }

    /// Lanes of different lengths (padding to one block count), split into parts at every
    /// point, each agree with the md-5 crate.
    #[test]
    fn lanes_of_different_lengths_and_parts_agree_with_md5() {
        let bytes: Vec<u8> = (0..256u32).map(|k| (k * 37 + 11) as u8).collect();
        for blocks in 1..=4usize {
            let longest = blocks * 64 - 9;
            let shortest = longest
                .saturating_sub(63)
                .max(if blocks == 1 { 0 } else { 1 });
            for base in shortest..=longest {
                let lens: [usize; LANES] =
                    core::array::from_fn(|l| (base + 17 * l).min(longest).max(shortest));
                let split = base % 7;
                let parts: Vec<[&[u8]; 3]> = lens
                    .iter()
                    .map(|&n| {
                        let cut = split.min(n);
                        [&bytes[..cut], &bytes[cut..n], &[][..]]
                    })
                    .collect();
                let lanes: [&[&[u8]]; LANES] = core::array::from_fn(|l| &parts[l][..]);
                let got = md5x4_parts([INIT; LANES], 0, lanes).expect("one block count");
                for l in 0..LANES {
                    assert_eq!(
                        got[l],
                        md5(&bytes[..lens[l]], b""),
                        "lengths {lens:?}, lane {l}"
                    );
                }
            }
        }
    }

    /// Continuing from the state after one block gives the digest of the whole message.
    #[test]
    fn a_midstate_continues_the_computation_it_was_taken_from() {
        let block: [u8; 64] = core::array::from_fn(|k| (k * 5 + 3) as u8);
        let tail = b"the rest of the message";
        let state = state_after(&block);
        let got = md5x4_parts([state; LANES], 64, [&[&tail[..]][..]; LANES]).unwrap();
        let mut whole = block.to_vec();
        whole.extend_from_slice(tail);
        assert_eq!(got[3], md5(&whole, b""));
    }

    #[test]
    fn known_vector() {
        // RFC 1321 A.5: MD5("abc").
        let out = md5x4([b"a", b"a", b"a", b"a"], b"bc").unwrap();
        let hex: String = out[2].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "900150983cd24fb0d6963f7d28e17f72");
    }

    #[test]
    fn messages_of_other_block_counts_or_too_long_are_refused() {
        let one_block = [0u8; 55];
        let two_blocks = [0u8; 56];
        assert!(md5x4([&one_block, &one_block, &one_block, &two_blocks], b"").is_none());
        let long = vec![0u8; MAX_LEN];
        assert!(md5x4([&long, &long, &long, &long], b"x").is_none());
        assert!(md5x4([&long, &long, &long, &long], b"").is_some());
    }

    /// The cost against four one-by-one digests (`cargo test --release -p dynauth-proto
    /// md5x4_cost -- --ignored --nocapture`).
    #[test]
    #[ignore = "a measurement, not a test"]
    fn md5x4_cost() {
        let p = [7u8; 44];
        let secret = Secret::new(b"testing123").unwrap();
        let n = 1_000_000u32;
        let t = std::time::Instant::now();
        let mut x = 0u8;
        for k in 0..n {
            let mut q = p;
            q[1] = k as u8;
            for _ in 0..LANES {
                x ^= secret.md5_with_secret_last(&[&q])[0];
            }
        }
        let one = t.elapsed().as_nanos() as f64 / f64::from(n) / LANES as f64;
        let t = std::time::Instant::now();
        for k in 0..n {
            let mut q = p;
            q[1] = k as u8;
            x ^= md5x4([&q, &q, &q, &q], b"testing123").unwrap()[0][0];
        }
        let four = t.elapsed().as_nanos() as f64 / f64::from(n) / LANES as f64;
        println!("per digest: one by one {one:.0} ns, four lanes {four:.0} ns ({x})");
    }
}
