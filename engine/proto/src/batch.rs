//! The per-batch work of a shard's engine: the MD5s of a receive batch computed four at a
//! time ([`crate::md5x4`]) instead of one by one. MD5 is the largest user-space cost of a
//! Disconnect (docs/BENCHMARKS.md, "Where a Disconnect's server CPU goes"), and one
//! datagram's authenticators are a chain of dependent hashes, but the datagrams of a batch
//! are independent of each other.
//!
//! Owns:
//! - *Before the decisions* ([`BatchWork::prepare`]): each request's expected Request
//!   Authenticator (RFC 5176 §3.4: MD5 over the packet with a zero Authenticator field, then
//!   the secret), with the client's first secret, over a copy of the request's octets. A
//!   decision takes it ([`BatchWork::precomputed`]) only for a datagram whose octets equal
//!   that copy, so a precomputed digest can never vouch for other bytes.
//! - *After the decisions* ([`BatchWork::seal`]): the answers that were encoded but left
//!   unsigned, signed in place of copies kept here, Message-Authenticator first and then
//!   the Response Authenticator (RFC 5176 §3.4/§3.5 order, as `auth::sign_response`), and
//!   their cached copies in the duplicate cache sealed the same way. Until then a cached
//!   unsigned answer is never replayed (`dedup`: a retransmission in the same batch is a
//!   duplicate in flight).
//!
//! Must not touch: decisions, the session store, sockets. Nothing here allocates once the
//! vectors have grown to a batch's size.
#![forbid(unsafe_code)]

use crate::auth::{Authenticator, Secret};
use crate::client::{ClientId, ClientTable};
use crate::codec::{AUTHENTICATOR_LEN, HEADER_LEN, Packet};
use crate::dedup::{DuplicateCache, UnsignedSlot};
use crate::dict::code;
use crate::md5x4::{self, LANES};

const ZERO: Authenticator = [0; AUTHENTICATOR_LEN];

/// One lane's input: where the MD5 computation starts (a fresh state with `prefix` 0, or an
/// HMAC midstate with `prefix` 64) and the message, in parts.
#[derive(Clone, Copy)]
struct LaneInput<'a> {
    state: [u32; 4],
    parts: [&'a [u8]; 5],
}

impl LaneInput<'_> {
    fn blocks(&self) -> usize {
        (self.parts.iter().map(|p| p.len()).sum::<usize>() + 9).div_ceil(64)
    }
}

/// `out[i] = MD5(input(i))` for every `i < n` whose input is `Some`, four lanes at a time,
/// lanes grouped by block count (they run in lockstep). A group short of four at the end
/// runs with its first lane repeated. Every input must be at most four blocks long
/// (callers check [`md5x4::MAX_LEN`]); all inputs share `prefix`.
fn digests<'a>(
    n: usize,
    prefix: u64,
    input: impl Fn(usize) -> Option<LaneInput<'a>>,
    out: &mut [Authenticator],
) {
    // Per block count (1 to 4): the lanes waiting for a run, and how many there are.
    let mut groups: [(Lanes<'a>, usize); 4] = [([None; LANES], 0); 4];
    for i in 0..n {
        let Some(lane) = input(i) else { continue };
        let Some((lanes, count)) = groups.get_mut(lane.blocks().wrapping_sub(1)) else {
            continue;
        };
        if let Some(slot) = lanes.get_mut(*count) {
            *slot = Some((i, lane));
        }
        *count += 1;
        if *count == LANES {
            run(lanes, prefix, out);
            *count = 0;
        }
    }
    for (lanes, count) in &mut groups {
        if let Some(waiting) = lanes.get_mut(*count..) {
            waiting.fill(None);
        }
        if *count > 0 {
            run(lanes, prefix, out);
        }
    }
}

/// One run's lanes, each with the input (its index) it is for; `None`: an unused lane.
type Lanes<'a> = [Option<(usize, LaneInput<'a>)>; LANES];

/// One four-lane run; lanes that are `None` repeat the first (their digests are dropped).
fn run(lanes: &Lanes<'_>, prefix: u64, out: &mut [Authenticator]) {
    let Some(Some(first)) = lanes.first().copied() else {
        return;
    };
    let full: [(usize, LaneInput<'_>); LANES] = core::array::from_fn(|l| lanes[l].unwrap_or(first));
    let parts: [&[&[u8]]; LANES] = core::array::from_fn(|l| &full[l].1.parts[..]);
    let Some(digests) = md5x4::md5x4_parts(full.map(|(_, lane)| lane.state), prefix, parts) else {
        return;
    };
    for (lane, digest) in lanes.iter().zip(digests) {
        if let Some((i, _)) = lane
            && let Some(slot) = out.get_mut(*i)
        {
            *slot = digest;
        }
    }
}

/// A request whose Request Authenticator was computed ahead: its octets at
/// `bytes[start..start + len]`, its client.
#[derive(Debug, Clone, Copy)]
struct Prepared {
    start: usize,
    len: usize,
    client: ClientId,
}

/// An answer encoded but not signed yet: its octets (as encoded: the Authenticator field
/// holds the request's Request Authenticator) at `bytes[start..start + len]`.
#[derive(Debug, Clone, Copy)]
struct Unsigned {
    start: usize,
    len: usize,
    /// Where the Message-Authenticator's value starts, when the answer carries one.
    ma: Option<usize>,
    client: ClientId,
    /// Which of the client's secrets verified the request (the answer is signed with it).
    secret: usize,
    /// The request's Request Authenticator, in the unsigned answer's Authenticator field.
    request_authenticator: Authenticator,
    /// The answer's place in the duplicate cache, to seal it there too.
    cached: Option<UnsignedSlot>,
}

/// The batch state of one engine (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct BatchWork {
    prepared: Vec<Prepared>,
    prepared_bytes: Vec<u8>,
    prepared_digests: Vec<Authenticator>,
    /// The next prepared request a decision is expected to ask for.
    cursor: usize,
    /// Answers are left unsigned until [`BatchWork::seal`].
    deferring: bool,
    unsigned: Vec<Unsigned>,
    unsigned_bytes: Vec<u8>,
    inner: Vec<Authenticator>,
    outer: Vec<Authenticator>,
    response: Vec<Authenticator>,
    /// Whether `unsigned` has been signed, and the next one [`BatchWork::write_sealed`] hands out.
    sealed: bool,
    handed: usize,
}

impl BatchWork {
    /// Starts a batch: computes the Request Authenticators of the requests among
    /// `datagrams` that a decision will check (Disconnect- and CoA-Requests from a known
    /// client, short enough for four lanes), and from now on leaves answers unsigned.
    pub(crate) fn prepare<'d>(
        &mut self,
        datagrams: impl IntoIterator<Item = (&'d [u8], std::net::IpAddr)>,
        clients: &ClientTable,
    ) {
        self.clear();
        self.deferring = true;
        for (datagram, source) in datagrams {
            let Ok(packet) = Packet::parse(datagram) else {
                continue;
            };
            if !matches!(packet.code(), code::DISCONNECT_REQUEST | code::COA_REQUEST) {
                continue;
            }
            let Some((client, secret)) = clients
                .lookup(source)
                .and_then(|(id, c)| Some((id, c.secrets().next()?)))
            else {
                continue;
            };
            let bytes = packet.bytes();
            if bytes.len() + secret.bytes().len() > md5x4::MAX_LEN {
                continue;
            }
            let start = self.prepared_bytes.len();
            self.prepared_bytes.extend_from_slice(bytes);
            self.prepared.push(Prepared {
                start,
                len: bytes.len(),
                client,
            });
        }
        let n = self.prepared.len();
        self.prepared_digests.clear();
        self.prepared_digests.resize(n, ZERO);
        let (prepared, bytes) = (&self.prepared, &self.prepared_bytes);
        let input = |i: usize| {
            let p = prepared.get(i)?;
            let b = bytes.get(p.start..p.start + p.len)?;
            let secret = clients.get(p.client)?.secrets().next()?;
            Some(LaneInput {
                state: md5x4::INIT,
                parts: [
                    b.get(..4)?,
                    &ZERO,
                    b.get(HEADER_LEN..)?,
                    secret.bytes(),
                    &[],
                ],
            })
        };
        digests(n, 0, input, &mut self.prepared_digests);
    }

    /// The expected Request Authenticator of `packet_bytes` from `client` with its first
    /// secret, when [`BatchWork::prepare`] computed it over exactly these octets.
    pub(crate) fn precomputed(
        &mut self,
        packet_bytes: &[u8],
        client: ClientId,
    ) -> Option<Authenticator> {
        // Decisions come in the batch's order; a datagram skipped (shed, dropped) moves the
        // match further on.
        let found = (self.cursor..self.prepared.len()).find(|&i| {
            self.prepared.get(i).is_some_and(|p| {
                p.client == client
                    && self.prepared_bytes.get(p.start..p.start + p.len) == Some(packet_bytes)
            })
        })?;
        self.cursor = found + 1;
        self.prepared_digests.get(found).copied()
    }

    /// Whether an answer encoded now should be left to [`BatchWork::seal`].
    pub(crate) fn defers(&self, answer_len: usize, secret: &Secret) -> bool {
        self.deferring && answer_len + secret.bytes().len() <= md5x4::MAX_LEN
    }

    /// Keeps a copy of an answer left unsigned (its octets as encoded).
    pub(crate) fn push_unsigned(
        &mut self,
        answer: &[u8],
        ma: Option<usize>,
        client: ClientId,
        secret: usize,
        cached: Option<UnsignedSlot>,
    ) {
        let start = self.unsigned_bytes.len();
        self.unsigned_bytes.extend_from_slice(answer);
        let request_authenticator = answer
            .get(4..HEADER_LEN)
            .and_then(|a| a.try_into().ok())
            .unwrap_or(ZERO);
        self.unsigned.push(Unsigned {
            start,
            len: answer.len(),
            ma,
            client,
            secret,
            request_authenticator,
            cached,
        });
    }

    /// Signs every answer left unsigned since [`BatchWork::prepare`] and seals their cached
    /// copies; answers decided after this are signed at once again until the next batch.
    /// `clients` must be the table the answers were decided with.
    pub(crate) fn seal(&mut self, clients: &ClientTable, dedup: &mut DuplicateCache) {
        self.deferring = false;
        if self.sealed {
            return;
        }
        self.sealed = true;
        let n = self.unsigned.len();
        for v in [&mut self.inner, &mut self.outer, &mut self.response] {
            v.clear();
            v.resize(n, ZERO);
        }
        let (unsigned, bytes) = (&self.unsigned, &self.unsigned_bytes);
        let secret_of = |u: &Unsigned| clients.get(u.client)?.secrets().nth(u.secret);
        let octets = |u: &Unsigned| bytes.get(u.start..u.start + u.len);
        // HMAC-MD5 over the answer with its Message-Authenticator zeroed and the request's
        // Request Authenticator in the Authenticator field (as encoded): inner hash ...
        digests(
            n,
            64,
            |i| {
                let u = unsigned.get(i)?;
                let (b, ma) = (octets(u)?, u.ma?);
                Some(LaneInput {
                    state: secret_of(u)?.hmac_midstates().inner,
                    parts: [
                        b.get(..ma)?,
                        &ZERO,
                        b.get(ma + AUTHENTICATOR_LEN..)?,
                        &[],
                        &[],
                    ],
                })
            },
            &mut self.inner,
        );
        // ... then the outer hash over the inner digest.
        let inner = &self.inner;
        digests(
            n,
            64,
            |i| {
                let u = unsigned.get(i)?;
                u.ma?;
                Some(LaneInput {
                    state: secret_of(u)?.hmac_midstates().outer,
                    parts: [inner.get(i)?, &[], &[], &[], &[]],
                })
            },
            &mut self.outer,
        );
        for (u, mac) in self.unsigned.iter().zip(&self.outer) {
            if let Some(ma) = u.ma
                && let Some(slot) = self
                    .unsigned_bytes
                    .get_mut(u.start + ma..u.start + ma + AUTHENTICATOR_LEN)
            {
                slot.copy_from_slice(mac);
            }
        }
        // The Response Authenticator over the answer with its Message-Authenticator.
        let (unsigned, bytes) = (&self.unsigned, &self.unsigned_bytes);
        let octets = |u: &Unsigned| bytes.get(u.start..u.start + u.len);
        digests(
            n,
            0,
            |i| {
                let u = unsigned.get(i)?;
                let b = octets(u)?;
                Some(LaneInput {
                    state: md5x4::INIT,
                    parts: [b, secret_of(u)?.bytes(), &[], &[], &[]],
                })
            },
            &mut self.response,
        );
        for (u, response) in self.unsigned.iter().zip(&self.response) {
            if let Some(slot) = self
                .unsigned_bytes
                .get_mut(u.start + 4..u.start + HEADER_LEN)
            {
                slot.copy_from_slice(response);
            }
            if let (Some(cached), Some(signed)) =
                (u.cached, self.unsigned_bytes.get(u.start..u.start + u.len))
            {
                dedup.seal(cached, signed);
            }
        }
    }

    /// Writes the next sealed answer, in the order they were decided, over `out`, which
    /// must hold that very answer unsigned (same octets but the two signatures); `false`
    /// (and `out` untouched) when it does not or when none is left: that answer must not
    /// be sent.
    pub(crate) fn write_sealed(&mut self, out: &mut [u8]) -> bool {
        let Some(u) = self
            .sealed
            .then(|| self.unsigned.get(self.handed))
            .flatten()
        else {
            return false;
        };
        let Some(signed) = self.unsigned_bytes.get(u.start..u.start + u.len) else {
            return false;
        };
        let Some(target) = out.get_mut(..u.len) else {
            return false;
        };
        // The same answer: the request's Request Authenticator where the sealed copy now
        // has the Response Authenticator, zeros where it has the Message-Authenticator, and
        // every other octet equal.
        let ma = u.ma.map_or(0..0, |m| m..m + AUTHENTICATOR_LEN);
        let same = target.get(4..HEADER_LEN) == Some(&u.request_authenticator[..])
            && target.iter().zip(signed).enumerate().all(|(k, (a, b))| {
                (4..HEADER_LEN).contains(&k) || (ma.contains(&k) && *a == 0) || a == b
            });
        if !same {
            return false;
        }
        target.copy_from_slice(signed);
        self.handed += 1;
        if self.handed == self.unsigned.len() {
            // The batch is over: nothing of it is needed any more.
            self.clear();
        }
        true
    }

    fn clear(&mut self) {
        self.prepared.clear();
        self.prepared_bytes.clear();
        self.cursor = 0;
        self.deferring = false;
        self.unsigned.clear();
        self.unsigned_bytes.clear();
        self.sealed = false;
        self.handed = 0;
    }
}
