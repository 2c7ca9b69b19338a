//! Requests prepared ahead of time.
//!
//! The sessions to target come from a JSON Lines file of `dynauth_proto::session::Session`
//! (the format `dynauthd --sessions` loads) or from `dynauth_proto::synth` (the same
//! `(seed, index)` gives the same session on both sides). From them the pool builds every
//! distinct request once, into one arena: header with Identifier 0 and a zero Authenticator,
//! then the attributes. Sending request `k` copies template `k % len`, sets the Identifier and
//! the Event-Timestamp, and signs (Message-Authenticator, then Request Authenticator): the
//! only per-send work.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use dynauth_proto::auth::{Authenticator, Secret, sign_request};
use dynauth_proto::codec::{MAX_PACKET_LEN, PacketWriter, WriteError};
use dynauth_proto::dict::{attr, code, vendor};
use dynauth_proto::session::Session;
use dynauth_proto::synth;

use crate::cli::Mix;
use dynauth_proto::md5x4::md5x4;

/// Why the requests could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot read sessions file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: not a session: {source}")]
    Parse {
        path: PathBuf,
        line: usize,
        source: serde_json::Error,
    },
    #[error("{path}:{line}: the session has no identification attribute")]
    NoIdentification { path: PathBuf, line: usize },
    #[error("no sessions to target: give --sessions FILE or --synthetic N")]
    NoSessions,
    #[error("the group selects no session")]
    EmptyGroup,
    #[error("a request does not fit in a RADIUS packet ({0:?})")]
    TooLarge(WriteError),
    #[error("{0}")]
    Secret(#[from] dynauth_proto::auth::EmptySecret),
}

/// The packet a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Disconnect,
    Coa,
}

impl Kind {
    pub fn index(self) -> usize {
        match self {
            Kind::Disconnect => 0,
            Kind::Coa => 1,
        }
    }

    pub fn ack_code(self) -> u8 {
        match self {
            Kind::Disconnect => code::DISCONNECT_ACK,
            Kind::Coa => code::COA_ACK,
        }
    }

    pub fn nak_code(self) -> u8 {
        match self {
            Kind::Disconnect => code::DISCONNECT_NAK,
            Kind::Coa => code::COA_NAK,
        }
    }
}

/// What the mix predicts for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expectation {
    /// An existing session: ACK.
    Ack,
    /// A session that does not exist: NAK with Error-Cause 503.
    NakNotFound,
    /// A wrong Request Authenticator: no answer at all (SPEC §2.4).
    Discard,
}

/// One prepared request.
#[derive(Debug, Clone, Copy)]
pub struct Template {
    start: u32,
    len: u16,
    /// Offset of the Message-Authenticator value, 0 when absent.
    ma_offset: u16,
    /// Offset of the Event-Timestamp value, 0 when absent.
    ts_offset: u16,
    pub kind: Kind,
    pub expect: Expectation,
}

/// The identification attribute(s) of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ident {
    Attr(u8, Vec<u8>),
    Vendor(u32, u8, Vec<u8>),
    Imsi(Vec<u8>, Vec<u8>),
}

/// Where the sessions come from.
#[derive(Debug, Clone)]
pub enum Sessions {
    /// `synth::session(seed, i)` for `i` in `0..count`.
    Synthetic { seed: u64, count: u64 },
    /// Sessions read from a file: identification and NAS-Port-Id only.
    Loaded(Vec<(Ident, Option<String>)>),
}

impl Sessions {
    /// Reads a JSON Lines file of sessions (blank lines and `#` comments skipped).
    pub fn from_file(path: &Path) -> Result<Sessions, PoolError> {
        let file = File::open(path).map_err(|source| PoolError::Read {
            path: path.into(),
            source,
        })?;
        let mut out = Vec::new();
        for (n, line) in BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|source| PoolError::Read {
                path: path.into(),
                source,
            })?;
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let session: Session =
                serde_json::from_str(trimmed).map_err(|source| PoolError::Parse {
                    path: path.into(),
                    line: n + 1,
                    source,
                })?;
            let ident = ident_of(&session).ok_or_else(|| PoolError::NoIdentification {
                path: path.into(),
                line: n + 1,
            })?;
            out.push((ident, session.nas_port_id));
        }
        Ok(Sessions::Loaded(out))
    }

    pub fn len(&self) -> u64 {
        match self {
            Sessions::Synthetic { count, .. } => *count,
            Sessions::Loaded(v) => v.len() as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The identification of session `i` (`i < len`).
    pub fn ident(&self, i: u64) -> Ident {
        match self {
            Sessions::Synthetic { seed, .. } => Ident::Attr(
                attr::ACCT_SESSION_ID,
                synth::acct_session_id(*seed, i).into_bytes(),
            ),
            Sessions::Loaded(v) => v
                .get(i as usize)
                .map(|(ident, _)| ident.clone())
                .unwrap_or(Ident::Attr(attr::ACCT_SESSION_ID, b"?".to_vec())),
        }
    }

    /// Indices of the sessions whose NAS-Port-Id starts with `prefix`.
    pub fn group(&self, prefix: &str) -> Vec<u64> {
        match self {
            Sessions::Synthetic { count, .. } => (0..*count)
                .filter(|&i| synth::nas_port_id(i).starts_with(prefix))
                .collect(),
            Sessions::Loaded(v) => v
                .iter()
                .enumerate()
                .filter(|(_, (_, port))| port.as_deref().is_some_and(|p| p.starts_with(prefix)))
                .map(|(i, _)| i as u64)
                .collect(),
        }
    }

    /// Indices of synthetic group `g` (the 256 sessions sharing `synth::nas_port_group(g)`),
    /// computed directly for synthetic sessions.
    pub fn synthetic_group(&self, g: u64) -> Vec<u64> {
        match self {
            Sessions::Synthetic { count, .. } => {
                let start = g.saturating_mul(256).min(*count);
                let end = start.saturating_add(256).min(*count);
                (start..end).collect()
            }
            Sessions::Loaded(_) => self.group(&synth::nas_port_group(g)),
        }
    }
}

/// Writes `count` synthetic sessions of `seed` as JSON Lines.
pub fn write_synthetic<W: Write>(seed: u64, count: u64, out: W) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(out);
    for s in synth::sessions(seed, count) {
        serde_json::to_writer(&mut out, &s)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// The most selective identification a session has: Acct-Session-Id first.
pub fn ident_of(s: &Session) -> Option<Ident> {
    let text =
        |ty: u8, v: &Option<String>| v.as_ref().map(|v| Ident::Attr(ty, v.clone().into_bytes()));
    text(attr::ACCT_SESSION_ID, &s.acct_session_id)
        .or_else(|| text(attr::ACCT_MULTI_SESSION_ID, &s.acct_multi_session_id))
        .or_else(|| text(attr::CHARGEABLE_USER_IDENTITY, &s.cui))
        .or_else(|| {
            s.audit_session_id.as_ref().map(|v| {
                Ident::Vendor(
                    vendor::CISCO,
                    vendor::CISCO_AVPAIR,
                    format!("audit-session-id={v}").into_bytes(),
                )
            })
        })
        .or_else(|| match (&s.imsi, &s.nsapi) {
            (Some(imsi), Some(nsapi)) => Some(Ident::Imsi(
                imsi.clone().into_bytes(),
                nsapi.clone().into_bytes(),
            )),
            _ => None,
        })
        .or_else(|| text(attr::USER_NAME, &s.user_name))
        .or_else(|| {
            s.framed_ip
                .map(|ip| Ident::Attr(attr::FRAMED_IP_ADDRESS, ip.octets().to_vec()))
        })
        .or_else(|| text(attr::CALLING_STATION_ID, &s.calling_station_id))
        .or_else(|| text(attr::NAS_PORT_ID, &s.nas_port_id))
        .or_else(|| {
            s.nas_port
                .map(|p| Ident::Attr(attr::NAS_PORT, p.to_be_bytes().to_vec()))
        })
}

/// What to put in every request.
#[derive(Debug, Clone)]
pub struct Options {
    pub message_authenticator: bool,
    pub event_timestamp: bool,
    pub session_timeout: u32,
    pub seed: u64,
    /// Which existing sessions the churn pool's requests target.
    pub targets: TargetSelection,
}

/// How the churn pool picks existing sessions (`--targets`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum TargetSelection {
    /// Session 0, 1, 2, ... (the first `--pool` sessions of a large table only).
    #[default]
    InOrder,
    /// Uniformly over every session, seeded.
    Uniform,
    /// Zipf over every session with exponent `s` (> 0, not 1): session 0 the most often, a
    /// few hot subscribers and a long tail; seeded.
    Zipf(f64),
}

impl TargetSelection {
    /// `in-order`, `uniform`, or `zipf:S` (e.g. `zipf:0.9`).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "in-order" => Ok(TargetSelection::InOrder),
            "uniform" => Ok(TargetSelection::Uniform),
            _ => s
                .strip_prefix("zipf:")
                .and_then(|e| e.parse::<f64>().ok())
                .filter(|e| e.is_finite() && *e > 0.0 && (*e - 1.0).abs() > 1e-9)
                .map(TargetSelection::Zipf)
                .ok_or_else(|| {
                    format!("{s:?}: expected in-order, uniform or zipf:S (S > 0, not 1)")
                }),
        }
    }
}

/// A small seeded generator (splitmix64) for reproducible target picks.
struct Picker {
    state: u64,
    selection: TargetSelection,
    count: u64,
    next_in_order: u64,
}

impl Picker {
    fn new(selection: TargetSelection, seed: u64, count: u64) -> Self {
        Picker {
            state: seed ^ 0x9e37_79b9_7f4a_7c15,
            selection,
            count: count.max(1),
            next_in_order: 0,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform number in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    fn next(&mut self) -> u64 {
        match self.selection {
            TargetSelection::InOrder => {
                let i = self.next_in_order % self.count;
                self.next_in_order += 1;
                i
            }
            TargetSelection::Uniform => self.next_u64() % self.count,
            TargetSelection::Zipf(s) => {
                // Inverse of the continuous approximation of Zipf's CDF over [1, N + 1).
                let n = self.count as f64 + 1.0;
                let a = 1.0 - s;
                let x = ((n.powf(a) - 1.0) * self.unit() + 1.0).powf(1.0 / a);
                ((x.floor() as u64).saturating_sub(1)).min(self.count - 1)
            }
        }
    }
}

/// The prepared requests and the secret that signs them.
#[derive(Debug)]
pub struct Pool {
    arena: Vec<u8>,
    entries: Vec<Template>,
    max_len: usize,
    secret: Secret,
    /// The secret's octets, for [`Pool::authenticators4`] (`Secret` keeps its own private).
    secret_bytes: Box<[u8]>,
}

/// Smooth weighted round robin (as nginx does): over every cycle of `total` picks, each entry
/// is picked exactly `weight` times, spread out evenly. Deterministic.
struct Wrr {
    weights: [i64; 4],
    current: [i64; 4],
    total: i64,
}

impl Wrr {
    fn new(mix: &Mix) -> Self {
        let weights = [
            i64::from(mix.disconnect),
            i64::from(mix.coa),
            i64::from(mix.unknown),
            i64::from(mix.bad_auth),
        ];
        Wrr {
            weights,
            current: [0; 4],
            total: weights.iter().sum(),
        }
    }

    fn next(&mut self) -> usize {
        let mut best = 0;
        for i in 0..4 {
            self.current[i] += self.weights[i];
            if self.current[i] > self.current[best] {
                best = i;
            }
        }
        self.current[best] -= self.total;
        best
    }
}

impl Pool {
    fn empty(secret: &[u8]) -> Result<Pool, PoolError> {
        Ok(Pool {
            arena: Vec::new(),
            entries: Vec::new(),
            max_len: 0,
            secret: Secret::new(secret)?,
            secret_bytes: secret.into(),
        })
    }

    /// The churn pool: `size` requests following `mix`, existing sessions taken round robin.
    pub fn churn(
        sessions: &Sessions,
        mix: &Mix,
        size: usize,
        options: &Options,
        secret: impl AsRef<[u8]>,
    ) -> Result<Pool, PoolError> {
        let needs_sessions = mix.disconnect + mix.coa + mix.bad_auth > 0;
        if needs_sessions && sessions.is_empty() {
            return Err(PoolError::NoSessions);
        }
        let mut pool = Pool::empty(secret.as_ref())?;
        let mut wrr = Wrr::new(mix);
        let mut picker = Picker::new(options.targets, options.seed, sessions.len());
        let mut existing = || sessions.ident(picker.next());
        for k in 0..size.max(1) {
            match wrr.next() {
                0 => pool.push(Kind::Disconnect, Expectation::Ack, &existing(), options)?,
                1 => pool.push(Kind::Coa, Expectation::Ack, &existing(), options)?,
                2 => {
                    let id = format!("unknown-{:x}-{k}", options.seed);
                    let ident = Ident::Attr(attr::ACCT_SESSION_ID, id.into_bytes());
                    pool.push(Kind::Coa, Expectation::NakNotFound, &ident, options)?
                }
                _ => pool.push(Kind::Coa, Expectation::Discard, &existing(), options)?,
            }
        }
        Ok(pool)
    }

    /// The mass-disconnect pool: one Disconnect-Request per selected session.
    pub fn mass_disconnect(
        sessions: &Sessions,
        selected: &[u64],
        options: &Options,
        secret: impl AsRef<[u8]>,
    ) -> Result<Pool, PoolError> {
        if selected.is_empty() {
            return Err(PoolError::EmptyGroup);
        }
        let mut pool = Pool::empty(secret.as_ref())?;
        for &i in selected {
            pool.push(
                Kind::Disconnect,
                Expectation::Ack,
                &sessions.ident(i),
                options,
            )?;
        }
        Ok(pool)
    }

    fn push(
        &mut self,
        kind: Kind,
        expect: Expectation,
        ident: &Ident,
        o: &Options,
    ) -> Result<(), PoolError> {
        let mut buf = [0u8; MAX_PACKET_LEN];
        let code = match kind {
            Kind::Disconnect => code::DISCONNECT_REQUEST,
            Kind::Coa => code::COA_REQUEST,
        };
        let mut w = PacketWriter::new(&mut buf, code, 0, &[0; 16]).map_err(PoolError::TooLarge)?;
        let mut ma_offset = 0;
        if o.message_authenticator {
            ma_offset = w
                .push(attr::MESSAGE_AUTHENTICATOR, &[0; 16])
                .map_err(PoolError::TooLarge)?;
        }
        match ident {
            Ident::Attr(ty, v) => w.push(*ty, v),
            Ident::Vendor(vendor_id, ty, v) => w.push_vendor(*vendor_id, *ty, v),
            Ident::Imsi(imsi, nsapi) => w
                .push_vendor(vendor::THREE_GPP, vendor::THREE_GPP_IMSI, imsi)
                .and_then(|_| w.push_vendor(vendor::THREE_GPP, vendor::THREE_GPP_NSAPI, nsapi)),
        }
        .map_err(PoolError::TooLarge)?;
        let mut ts_offset = 0;
        if o.event_timestamp {
            ts_offset = w
                .push_u32(attr::EVENT_TIMESTAMP, 0)
                .map_err(PoolError::TooLarge)?;
        }
        if kind == Kind::Coa {
            w.push_u32(attr::SESSION_TIMEOUT, o.session_timeout)
                .map_err(PoolError::TooLarge)?;
        }
        let packet = w.finish();
        let start = self.arena.len() as u32;
        self.arena.extend_from_slice(packet);
        self.max_len = self.max_len.max(packet.len());
        self.entries.push(Template {
            start,
            len: packet.len() as u16,
            ma_offset: ma_offset as u16,
            ts_offset: ts_offset as u16,
            kind,
            expect,
        });
        Ok(())
    }

    /// Distinct requests.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The longest request, in octets.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    /// Template of request `k` (cycled).
    pub fn template(&self, k: u64) -> &Template {
        &self.entries[(k % self.entries.len() as u64) as usize]
    }

    /// Writes request `k` with Identifier `id` into `out` (at least `max_len` octets), signed;
    /// returns its length and its Request Authenticator. `unix_secs` is the Event-Timestamp.
    pub fn build(&self, k: u64, id: u8, unix_secs: u32, out: &mut [u8]) -> (usize, Authenticator) {
        let (len, auth) = self.prepare(k, id, unix_secs, out);
        (
            len,
            auth.unwrap_or_else(|| self.sign_unsigned(k, &mut out[..len])),
        )
    }

    /// Writes request `k` with Identifier `id` into `out` as [`Pool::build`] does, but leaves
    /// a request without Message-Authenticator unsigned (its Authenticator field zero) for
    /// [`Pool::authenticators4`] or [`Pool::sign_unsigned`] to sign, several at once: returns
    /// its length and, when it is already signed (a Message-Authenticator must be computed
    /// first), its Request Authenticator.
    pub fn prepare(
        &self,
        k: u64,
        id: u8,
        unix_secs: u32,
        out: &mut [u8],
    ) -> (usize, Option<Authenticator>) {
        let t = self.template(k);
        let len = usize::from(t.len);
        let start = t.start as usize;
        let out = &mut out[..len];
        out.copy_from_slice(&self.arena[start..start + len]);
        out[1] = id;
        if t.ts_offset != 0 {
            let o = usize::from(t.ts_offset);
            out[o..o + 4].copy_from_slice(&unix_secs.to_be_bytes());
        }
        if t.ma_offset == 0 {
            return (len, None);
        }
        sign_request(out, Some(usize::from(t.ma_offset)), &self.secret);
        let ra: Authenticator = out[4..20].try_into().expect("16 octets");
        (len, Some(self.finish(k, out, ra)))
    }

    /// Signs request `k`, prepared unsigned in `packet`; returns its Request Authenticator.
    pub fn sign_unsigned(&self, k: u64, packet: &mut [u8]) -> Authenticator {
        // The Authenticator field is zero, so MD5 over the packet as it is, then the
        // secret, is the Request Authenticator (RFC 5176 §2.3, as `sign_request` computes).
        let ra = self.secret.md5_with_secret_last(&[packet]);
        self.finish(k, packet, ra)
    }

    /// The Request Authenticators of four requests prepared unsigned, all of one length, in
    /// one four-lane MD5 ([`md5x4`]); `None` when they differ in length or are too long
    /// (sign those with [`Pool::sign_unsigned`]). The caller writes each with
    /// [`Pool::finish`].
    pub fn authenticators4(&self, packets: [&[u8]; 4]) -> Option<[Authenticator; 4]> {
        md5x4(packets, &self.secret_bytes)
    }

    /// Writes the Request Authenticator `ra` into request `k`'s `packet` (spoiled for a
    /// deliberately bad request, whose DAS must stay silent); returns what was written.
    pub fn finish(&self, k: u64, packet: &mut [u8], ra: Authenticator) -> Authenticator {
        packet[4..20].copy_from_slice(&ra);
        if self.template(k).expect == Expectation::Discard {
            packet[4] ^= 0xa5;
        }
        packet[4..20].try_into().expect("16 octets")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynauth_proto::auth::{
        request_authenticator_is_valid, request_message_authenticator_is_valid,
    };
    use dynauth_proto::codec::Packet;

    fn options(ma: bool, ts: bool) -> Options {
        Options {
            message_authenticator: ma,
            event_timestamp: ts,
            session_timeout: 600,
            seed: 1,
            targets: TargetSelection::InOrder,
        }
    }

    // The issue's storm over a whole table: uniform picks reach the far end of a large table
    // (in order stops at the pool size), Zipf favours the first sessions, and both are
    // reproducible for one seed.
    #[test]
    fn targets_are_drawn_over_the_whole_table() {
        let count = 10_000_000;
        let picks = |sel, seed| {
            let mut p = Picker::new(sel, seed, count);
            (0..20_000).map(|_| p.next()).collect::<Vec<u64>>()
        };
        let in_order = picks(TargetSelection::InOrder, 1);
        assert_eq!(in_order[..3], [0, 1, 2]);
        let uniform = picks(TargetSelection::Uniform, 1);
        assert!(uniform.iter().all(|&i| i < count));
        let far = uniform.iter().filter(|&&i| i >= count / 2).count();
        assert!(
            (9_000..11_000).contains(&far),
            "{far} of 20000 in the upper half"
        );
        assert_eq!(uniform, picks(TargetSelection::Uniform, 1), "seeded");
        assert_ne!(uniform, picks(TargetSelection::Uniform, 2));
        let zipf = picks(TargetSelection::Zipf(1.1), 1);
        assert!(zipf.iter().all(|&i| i < count));
        let hot = zipf.iter().filter(|&&i| i < 100).count();
        let uniform_hot = uniform.iter().filter(|&&i| i < 100).count();
        assert!(
            hot > 20 * uniform_hot.max(1),
            "Zipf favours the first: {hot}"
        );
        assert!(zipf.iter().any(|&i| i > 1_000_000), "and has a long tail");
        assert_eq!(
            TargetSelection::parse("zipf:0.9"),
            Ok(TargetSelection::Zipf(0.9))
        );
        assert!(TargetSelection::parse("zipf:1").is_err());
        assert!(TargetSelection::parse("random").is_err());
    }

    #[test]
    fn mix_is_exact_over_a_cycle_and_requests_are_signed() {
        let sessions = Sessions::Synthetic {
            seed: 1,
            count: 100,
        };
        let mix = Mix {
            disconnect: 1,
            coa: 2,
            unknown: 1,
            bad_auth: 1,
        };
        let pool = Pool::churn(&sessions, &mix, 50, &options(true, true), "s3cret").unwrap();
        let mut counts = [0usize; 4];
        for k in 0..50u64 {
            let t = pool.template(k);
            let i = match (t.kind, t.expect) {
                (Kind::Disconnect, Expectation::Ack) => 0,
                (Kind::Coa, Expectation::Ack) => 1,
                (_, Expectation::NakNotFound) => 2,
                (_, Expectation::Discard) => 3,
            };
            counts[i] += 1;
            let mut buf = [0u8; 4096];
            let (len, auth) = pool.build(k, 7, 1_700_000_000, &mut buf);
            let p = Packet::parse(&buf[..len]).unwrap();
            assert_eq!(p.identifier(), 7);
            assert_eq!(p.authenticator(), &auth);
            let secret = Secret::new("s3cret").unwrap();
            // Message-Authenticator first, right after the header.
            assert_eq!(buf[20], attr::MESSAGE_AUTHENTICATOR);
            let good = request_authenticator_is_valid(&p, &secret)
                && request_message_authenticator_is_valid(&p, 22, &secret);
            assert_eq!(good, t.expect != Expectation::Discard, "request {k}");
            let ts = p
                .attributes()
                .map(|a| a.unwrap())
                .find(|a| a.ty == attr::EVENT_TIMESTAMP)
                .unwrap();
            assert_eq!(ts.value, 1_700_000_000u32.to_be_bytes());
        }
        assert_eq!(counts, [10, 20, 10, 10]);
    }

    #[test]
    fn groups_select_the_256_sessions_of_a_port() {
        let sessions = Sessions::Synthetic {
            seed: 1,
            count: 1000,
        };
        let g = sessions.synthetic_group(1);
        assert_eq!(g.len(), 256);
        assert_eq!(g, sessions.group(&synth::nas_port_group(1)));
        assert_eq!(sessions.synthetic_group(3).len(), 1000 - 768);
        let pool = Pool::mass_disconnect(&sessions, &g, &options(false, false), "x").unwrap();
        assert_eq!(pool.len(), 256);
        let mut buf = [0u8; 4096];
        let (len, _) = pool.build(0, 1, 0, &mut buf);
        let p = Packet::parse(&buf[..len]).unwrap();
        assert_eq!(p.code(), code::DISCONNECT_REQUEST);
        let a = p.attributes().next().unwrap().unwrap();
        assert_eq!(a.ty, attr::ACCT_SESSION_ID);
        assert_eq!(a.value, synth::acct_session_id(1, 256).as_bytes());
    }

    #[test]
    fn sessions_file_is_read_with_the_best_identification() {
        let dir = std::env::temp_dir().join(format!("loadgen-pool-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sessions.jsonl");
        std::fs::write(
            &path,
            concat!(
                "# a comment\n",
                r#"{"acct_session_id":"a-1","user_name":"u1","nas_port_id":"ge-0/1/3"}"#,
                "\n\n",
                r#"{"user_name":"u2","framed_ip":"10.0.0.2"}"#,
                "\n",
            ),
        )
        .unwrap();
        let sessions = Sessions::from_file(&path).unwrap();
        assert_eq!(sessions.len(), 2);
        let synthetic = dir.join("synthetic.jsonl");
        write_synthetic(7, 300, std::fs::File::create(&synthetic).unwrap()).unwrap();
        let read = Sessions::from_file(&synthetic).unwrap();
        let made = Sessions::Synthetic {
            seed: 7,
            count: 300,
        };
        // Every session: `--synthetic N --seed S` targets exactly what the file holds (the
        // harness relies on it so that no run parses the file the server loaded).
        assert_eq!(read.len(), 300);
        for i in 0..300 {
            assert_eq!(read.ident(i), made.ident(i));
        }
        assert_eq!(read.group("ge-0/1/"), made.synthetic_group(1));
        assert_eq!(
            sessions.ident(0),
            Ident::Attr(attr::ACCT_SESSION_ID, b"a-1".to_vec())
        );
        assert_eq!(
            sessions.ident(1),
            Ident::Attr(attr::USER_NAME, b"u2".to_vec())
        );
        assert_eq!(sessions.group("ge-0/1/"), vec![0]);
        std::fs::write(
            &path,
            "{\"acct_session_id\":\"x\"}\n{\"no_such_field\":1}\n",
        )
        .unwrap();
        let err = Sessions::from_file(&path).unwrap_err().to_string();
        assert!(err.contains(":2:"), "{err}");
        std::fs::write(&path, "{\"vrf\":\"red\"}\n").unwrap();
        assert!(matches!(
            Sessions::from_file(&path),
            Err(PoolError::NoIdentification { line: 1, .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The per-send cost of preparing a request (copy, Identifier, Event-Timestamp, sign),
    /// against a plain copy of a precomputed packet. A measurement, not a check: run with
    /// `cargo test --release -p dynauth-loadgen build_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn build_cost() {
        let sessions = Sessions::Synthetic {
            seed: 1,
            count: 4096,
        };
        let mix = Mix {
            disconnect: 1,
            coa: 8,
            unknown: 1,
            bad_auth: 0,
        };
        for (ma, ts) in [(false, false), (false, true), (true, true)] {
            let pool = Pool::churn(&sessions, &mix, 4096, &options(ma, ts), "s3cret").unwrap();
            let mut buf = [0u8; 512];
            let n = 2_000_000u64;
            let t = std::time::Instant::now();
            let mut x = 0u8;
            for k in 0..n {
                let (_, auth) = pool.build(k, k as u8, 1_700_000_000, &mut buf);
                x ^= auth[0];
            }
            let sign_ns = t.elapsed().as_nanos() as f64 / n as f64;
            let t = std::time::Instant::now();
            for k in 0..n {
                let tpl = pool.template(k);
                let len = usize::from(tpl.len);
                let start = tpl.start as usize;
                buf[..len].copy_from_slice(&pool.arena[start..start + len]);
                x ^= std::hint::black_box(buf[1]);
            }
            let copy_ns = t.elapsed().as_nanos() as f64 / n as f64;
            println!(
                "message-authenticator {ma}, event-timestamp {ts}: build+sign {sign_ns:.0} ns, copy only {copy_ns:.0} ns ({x})"
            );
        }
    }
}
