//! The compact byte encoding of one session record and the allocation-free matching rules
//! evaluated on it.
//!
//! Owns: the record layout (a 3-byte header, then the present fields in a fixed order,
//! then the authorization state as JSON and, for tombstones, the removal time), decoding into
//! borrowed [`Keys`], and the matching rules restated on those keys: they mirror
//! `SessionQuery::matches`, `PrimaryKey::finds` and `MatchScope::admits` exactly (the
//! differential test in `engine/table/tests/table_differential.rs` holds them to it).
//! Must not touch: where records live (`arena`) or how they are found (`index`).
//!
//! Layout: `presence: u16 LE` (one bit per field, `F_*`), `flags: u8` (`FLAG_*`); text
//! fields as LEB128 length + octets; Framed-IP 4 octets; Framed-IPv6-Prefix 16 + 1; Framed-
//! Interface-Id 8 LE; NAS-Port 4 LE. A Calling-Station-Id of the canonical MAC form
//! `XX-XX-XX-XX-XX-XX` (upper-case hex) is packed into 6 octets (`FLAG_MAC`). Authorization
//! (only when not default) is LEB128 length + `serde_json`. A tombstone ends with the removal
//! time, 8 octets LE (`FLAG_TOMB`).
#![forbid(unsafe_code)]

use core::net::{Ipv4Addr, Ipv6Addr};

use dynauth_proto::codec::Ipv6Prefix;
use dynauth_proto::session::{Authorization, PrimaryKey, Session, SessionQuery};
use dynauth_proto::store::MatchScope;

const F_ACCT: u16 = 1 << 0;
const F_AUDIT: u16 = 1 << 1;
const F_CUI: u16 = 1 << 2;
const F_IMSI: u16 = 1 << 3;
const F_NSAPI: u16 = 1 << 4;
const F_FIP: u16 = 1 << 5;
const F_V6: u16 = 1 << 6;
const F_MULTI: u16 = 1 << 7;
const F_USER: u16 = 1 << 8;
const F_CALLING: u16 = 1 << 9;
const F_PORTID: u16 = 1 << 10;
const F_IFID: u16 = 1 << 11;
const F_PORT: u16 = 1 << 12;
const F_CALLED: u16 = 1 << 13;
const F_VRF: u16 = 1 << 14;

const FLAG_AUTH: u8 = 1;
const FLAG_TOMB: u8 = 2;
const FLAG_MAC: u8 = 4;

/// A Calling-Station-Id as stored: raw octets or a packed MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Csid<'a> {
    Raw(&'a [u8]),
    Mac([u8; 6]),
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

impl Csid<'_> {
    /// The text form, written into `buf` when packed.
    pub(crate) fn as_bytes<'b>(&'b self, buf: &'b mut [u8; 17]) -> &'b [u8] {
        match self {
            Csid::Raw(r) => r,
            Csid::Mac(m) => {
                for (i, b) in m.iter().enumerate() {
                    buf[i * 3] = HEX[usize::from(b >> 4)];
                    buf[i * 3 + 1] = HEX[usize::from(b & 15)];
                    if i < 5 {
                        buf[i * 3 + 2] = b'-';
                    }
                }
                &buf[..]
            }
        }
    }

    fn eq_bytes(&self, wanted: &[u8]) -> bool {
        let mut buf = [0u8; 17];
        self.as_bytes(&mut buf) == wanted
    }
}

/// Packs `XX-XX-XX-XX-XX-XX` (upper-case hex) into 6 octets; `None` for anything else, which
/// is then stored as text so that it round-trips octet for octet.
fn pack_mac(text: &[u8]) -> Option<[u8; 6]> {
    if text.len() != 17 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 6];
    for (i, o) in out.iter_mut().enumerate() {
        let hi = nibble(text[i * 3])?;
        let lo = nibble(text[i * 3 + 1])?;
        if i < 5 && text[i * 3 + 2] != b'-' {
            return None;
        }
        *o = hi << 4 | lo;
    }
    Some(out)
}

/// The identification keys (and routing context) of one record, borrowed from its bytes.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Keys<'a> {
    pub acct_session_id: Option<&'a [u8]>,
    pub audit_session_id: Option<&'a [u8]>,
    pub cui: Option<&'a [u8]>,
    pub imsi: Option<&'a [u8]>,
    pub nsapi: Option<&'a [u8]>,
    pub framed_ip: Option<Ipv4Addr>,
    pub framed_ipv6_prefix: Option<Ipv6Prefix>,
    pub acct_multi_session_id: Option<&'a [u8]>,
    pub user_name: Option<&'a [u8]>,
    pub calling_station_id: Option<Csid<'a>>,
    pub nas_port_id: Option<&'a [u8]>,
    pub framed_interface_id: Option<u64>,
    pub nas_port: Option<u32>,
    pub called_station_id: Option<&'a [u8]>,
    pub vrf: Option<&'a [u8]>,
    /// Serialized `Authorization`, when not default.
    pub authorization: Option<&'a [u8]>,
    /// Removal time of a tombstone.
    pub removed_at: Option<u64>,
}

fn put_len(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn put_text(out: &mut Vec<u8>, presence: &mut u16, bit: u16, v: Option<&[u8]>) {
    if let Some(v) = v {
        *presence |= bit;
        put_len(out, v.len());
        out.extend_from_slice(v);
    }
}

/// Encodes `s` (a live record) into `out`, which is cleared first.
pub(crate) fn encode(s: &Session, out: &mut Vec<u8>) {
    let auth = (s.authorization != Authorization::default())
        .then(|| serde_json::to_vec(&s.authorization).unwrap_or_default());
    encode_parts(&keys_of(s), auth.as_deref(), None, out);
}

/// Borrowed keys of a `Session`.
pub(crate) fn keys_of(s: &Session) -> Keys<'_> {
    fn b(v: &Option<String>) -> Option<&[u8]> {
        v.as_deref().map(str::as_bytes)
    }
    Keys {
        acct_session_id: b(&s.acct_session_id),
        audit_session_id: b(&s.audit_session_id),
        cui: b(&s.cui),
        imsi: b(&s.imsi),
        nsapi: b(&s.nsapi),
        framed_ip: s.framed_ip,
        framed_ipv6_prefix: s.framed_ipv6_prefix,
        acct_multi_session_id: b(&s.acct_multi_session_id),
        user_name: b(&s.user_name),
        calling_station_id: b(&s.calling_station_id).map(Csid::Raw),
        nas_port_id: b(&s.nas_port_id),
        framed_interface_id: s.framed_interface_id,
        nas_port: s.nas_port,
        called_station_id: b(&s.called_station_id),
        vrf: b(&s.vrf),
        authorization: None,
        removed_at: None,
    }
}

/// Encodes keys plus an already serialized authorization and an optional removal time.
pub(crate) fn encode_parts(
    k: &Keys<'_>,
    auth: Option<&[u8]>,
    removed_at: Option<u64>,
    out: &mut Vec<u8>,
) {
    out.clear();
    out.extend_from_slice(&[0, 0, 0]);
    let mut p = 0u16;
    let mut flags = 0u8;
    put_text(out, &mut p, F_ACCT, k.acct_session_id);
    put_text(out, &mut p, F_AUDIT, k.audit_session_id);
    put_text(out, &mut p, F_CUI, k.cui);
    put_text(out, &mut p, F_IMSI, k.imsi);
    put_text(out, &mut p, F_NSAPI, k.nsapi);
    if let Some(ip) = k.framed_ip {
        p |= F_FIP;
        out.extend_from_slice(&ip.octets());
    }
    if let Some(v6) = k.framed_ipv6_prefix {
        p |= F_V6;
        out.extend_from_slice(&v6.addr().octets());
        out.push(v6.len());
    }
    put_text(out, &mut p, F_MULTI, k.acct_multi_session_id);
    put_text(out, &mut p, F_USER, k.user_name);
    match k.calling_station_id {
        None => {}
        Some(Csid::Mac(m)) => {
            p |= F_CALLING;
            flags |= FLAG_MAC;
            out.extend_from_slice(&m);
        }
        Some(Csid::Raw(r)) => {
            if let Some(m) = pack_mac(r) {
                p |= F_CALLING;
                flags |= FLAG_MAC;
                out.extend_from_slice(&m);
            } else {
                put_text(out, &mut p, F_CALLING, Some(r));
            }
        }
    }
    put_text(out, &mut p, F_PORTID, k.nas_port_id);
    if let Some(v) = k.framed_interface_id {
        p |= F_IFID;
        out.extend_from_slice(&v.to_le_bytes());
    }
    if let Some(v) = k.nas_port {
        p |= F_PORT;
        out.extend_from_slice(&v.to_le_bytes());
    }
    put_text(out, &mut p, F_CALLED, k.called_station_id);
    put_text(out, &mut p, F_VRF, k.vrf);
    if let Some(a) = auth {
        flags |= FLAG_AUTH;
        put_len(out, a.len());
        out.extend_from_slice(a);
    }
    if let Some(t) = removed_at {
        flags |= FLAG_TOMB;
        out.extend_from_slice(&t.to_le_bytes());
    }
    out[0..2].copy_from_slice(&p.to_le_bytes());
    out[2] = flags;
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).and_then(|s| s.try_into().ok())
    }
    fn len(&mut self) -> Option<usize> {
        let mut n = 0usize;
        for shift in (0..35).step_by(7) {
            let b = *self.take(1)?.first()?;
            n |= usize::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(n);
            }
        }
        None
    }
    fn text(&mut self, presence: u16, bit: u16) -> Option<Option<&'a [u8]>> {
        if presence & bit == 0 {
            return Some(None);
        }
        let n = self.len()?;
        self.take(n).map(Some)
    }
}

/// Decodes a record. `None` for bytes that no encoder wrote (treated as no record: never a
/// panic).
pub(crate) fn decode(bytes: &[u8]) -> Option<Keys<'_>> {
    let mut c = Cursor(bytes);
    let [p0, p1, flags] = c.array::<3>()?;
    let p = u16::from_le_bytes([p0, p1]);
    let mut k = Keys {
        acct_session_id: c.text(p, F_ACCT)?,
        audit_session_id: c.text(p, F_AUDIT)?,
        cui: c.text(p, F_CUI)?,
        imsi: c.text(p, F_IMSI)?,
        nsapi: c.text(p, F_NSAPI)?,
        ..Keys::default()
    };
    if p & F_FIP != 0 {
        k.framed_ip = Some(Ipv4Addr::from(c.array::<4>()?));
    }
    if p & F_V6 != 0 {
        let a = Ipv6Addr::from(c.array::<16>()?);
        let [len] = c.array::<1>()?;
        k.framed_ipv6_prefix = Some(Ipv6Prefix::new(a, len)?);
    }
    k.acct_multi_session_id = c.text(p, F_MULTI)?;
    k.user_name = c.text(p, F_USER)?;
    if p & F_CALLING != 0 {
        k.calling_station_id = Some(if flags & FLAG_MAC != 0 {
            Csid::Mac(c.array::<6>()?)
        } else {
            Csid::Raw(c.text(p, F_CALLING)??)
        });
    }
    k.nas_port_id = c.text(p, F_PORTID)?;
    if p & F_IFID != 0 {
        k.framed_interface_id = Some(u64::from_le_bytes(c.array::<8>()?));
    }
    if p & F_PORT != 0 {
        k.nas_port = Some(u32::from_le_bytes(c.array::<4>()?));
    }
    k.called_station_id = c.text(p, F_CALLED)?;
    k.vrf = c.text(p, F_VRF)?;
    if flags & FLAG_AUTH != 0 {
        let n = c.len()?;
        k.authorization = Some(c.take(n)?);
    }
    if flags & FLAG_TOMB != 0 {
        k.removed_at = Some(u64::from_le_bytes(c.array::<8>()?));
    }
    Some(k)
}

fn text_eq(wanted: Option<&[u8]>, have: Option<&[u8]>) -> bool {
    match wanted {
        None => true,
        Some(w) => have == Some(w),
    }
}

fn value_eq<T: PartialEq>(wanted: Option<T>, have: Option<T>) -> bool {
    match wanted {
        None => true,
        Some(w) => have == Some(w),
    }
}

impl Keys<'_> {
    /// `MatchScope::admits`.
    pub(crate) fn admitted_by(&self, scope: &MatchScope<'_>) -> bool {
        match scope.vrf {
            None => true,
            Some(vrf) => self.vrf == Some(vrf.as_bytes()),
        }
    }

    fn calling_eq(&self, wanted: Option<&[u8]>) -> bool {
        match wanted {
            None => true,
            Some(w) => self.calling_station_id.is_some_and(|c| c.eq_bytes(w)),
        }
    }

    /// `SessionQuery::matches`.
    pub(crate) fn matched_by(&self, q: &SessionQuery<'_>) -> bool {
        text_eq(q.acct_session_id, self.acct_session_id)
            && text_eq(q.audit_session_id, self.audit_session_id)
            && text_eq(q.cui, self.cui)
            && text_eq(q.imsi, self.imsi)
            && text_eq(q.nsapi, self.nsapi)
            && value_eq(q.framed_ip, self.framed_ip)
            && value_eq(q.framed_ipv6_prefix, self.framed_ipv6_prefix)
            && text_eq(q.acct_multi_session_id, self.acct_multi_session_id)
            && text_eq(q.user_name, self.user_name)
            && self.calling_eq(q.calling_station_id)
            && text_eq(q.nas_port_id, self.nas_port_id)
            && value_eq(q.framed_interface_id, self.framed_interface_id)
            && value_eq(q.nas_port, self.nas_port)
            && text_eq(q.called_station_id, self.called_station_id)
    }

    /// `PrimaryKey::finds`.
    pub(crate) fn found_by(&self, key: &PrimaryKey<'_>, called: Option<&[u8]>) -> bool {
        let t = |w: &[u8], h: Option<&[u8]>| h == Some(w);
        match *key {
            PrimaryKey::AcctSessionId(v) => t(v, self.acct_session_id),
            PrimaryKey::AuditSessionId(v) => t(v, self.audit_session_id),
            PrimaryKey::Cui(v) => t(v, self.cui),
            PrimaryKey::Imsi(v) => t(v, self.imsi),
            PrimaryKey::FramedIp(ip) => {
                self.framed_ip == Some(ip) && text_eq(called, self.called_station_id)
            }
            PrimaryKey::FramedIpv6Prefix(p) => {
                self.framed_ipv6_prefix == Some(p) && text_eq(called, self.called_station_id)
            }
            PrimaryKey::AcctMultiSessionId(v) => t(v, self.acct_multi_session_id),
            PrimaryKey::UserName(v) => t(v, self.user_name),
            PrimaryKey::CallingStationId(v) => self.calling_eq(Some(v)),
            PrimaryKey::NasPortId(v) => t(v, self.nas_port_id),
            PrimaryKey::FramedInterfaceId(v) => self.framed_interface_id == Some(v),
            PrimaryKey::NasPort(v) => self.nas_port == Some(v),
            PrimaryKey::CalledStationId(v) => t(v, self.called_station_id),
        }
    }

    /// The owned `Session` (write path only: data-plane callbacks take `&Session`).
    pub(crate) fn to_session(self) -> Session {
        let s = |v: Option<&[u8]>| v.map(|b| String::from_utf8_lossy(b).into_owned());
        let mut buf = [0u8; 17];
        Session {
            acct_session_id: s(self.acct_session_id),
            acct_multi_session_id: s(self.acct_multi_session_id),
            user_name: s(self.user_name),
            cui: s(self.cui),
            framed_ip: self.framed_ip,
            framed_ipv6_prefix: self.framed_ipv6_prefix,
            framed_interface_id: self.framed_interface_id,
            called_station_id: s(self.called_station_id),
            calling_station_id: self
                .calling_station_id
                .as_ref()
                .map(|c| String::from_utf8_lossy(c.as_bytes(&mut buf)).into_owned()),
            nas_port: self.nas_port,
            nas_port_id: s(self.nas_port_id),
            imsi: s(self.imsi),
            nsapi: s(self.nsapi),
            audit_session_id: s(self.audit_session_id),
            vrf: s(self.vrf),
            authorization: self
                .authorization
                .and_then(|a| serde_json::from_slice(a).ok())
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Session {
        Session {
            acct_session_id: Some("a".repeat(200)),
            acct_multi_session_id: Some("m".into()),
            user_name: Some("user".into()),
            cui: Some("cui".into()),
            framed_ip: Some(Ipv4Addr::new(10, 1, 2, 3)),
            framed_ipv6_prefix: "2001:db8:1::/48".parse().ok(),
            framed_interface_id: Some(u64::MAX - 3),
            called_station_id: Some("ims".into()),
            calling_station_id: Some("02-AB-CD-EF-01-23".into()),
            nas_port: Some(7),
            nas_port_id: Some("ge-0/0/1".into()),
            imsi: Some("001010123456789".into()),
            nsapi: Some("5".into()),
            audit_session_id: Some("audit".into()),
            vrf: Some("red".into()),
            authorization: Authorization {
                session_timeout: Some(5),
                filter_ids: vec!["f".into()],
                classes: vec![vec![0, 255]],
                ..Default::default()
            },
        }
    }

    #[test]
    fn round_trips_every_field() {
        let mut buf = Vec::new();
        for s in [
            full(),
            Session::default(),
            dynauth_proto::synth::session(3, 99),
        ] {
            encode(&s, &mut buf);
            assert_eq!(decode(&buf).unwrap().to_session(), s);
        }
    }

    #[test]
    fn mac_is_packed_only_in_canonical_form() {
        let mut buf = Vec::new();
        let mut s = full();
        encode(&s, &mut buf);
        let packed = buf.len();
        s.calling_station_id = Some("02-ab-cd-ef-01-23".into());
        encode(&s, &mut buf);
        assert_eq!(buf.len(), packed + 12);
        assert_eq!(decode(&buf).unwrap().to_session(), s);
    }

    #[test]
    fn tombstone_time_round_trips_and_garbage_is_none() {
        let s = full();
        let mut buf = Vec::new();
        let auth = serde_json::to_vec(&s.authorization).unwrap();
        encode_parts(&keys_of(&s), Some(&auth), Some(1234), &mut buf);
        let k = decode(&buf).unwrap();
        assert_eq!(k.removed_at, Some(1234));
        assert_eq!(k.to_session(), s);
        for n in 0..buf.len() {
            // Truncations never panic; most are rejected.
            let _ = decode(&buf[..n]);
        }
        assert!(decode(&[0xff, 0xff, 0xff]).is_none());
    }
}
