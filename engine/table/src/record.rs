//! The compact byte encoding of one session record and the allocation-free matching rules
//! evaluated on it.
//!
//! Owns: the record layout (a 3-byte header, then the present fields in a fixed order,
//! then the authorization state as JSON and, for tombstones, the removal time), decoding into
//! borrowed [`Keys`], which implement `HasKeys` so that `SessionQuery::matches` and
//! `PrimaryKey::finds` run on records unchanged (`MatchScope::admits` is restated; the
//! differential test in `engine/table/tests/table_differential.rs` holds the table to it).
//! Must not touch: where records live (`arena`) or how they are found (`index`).
//!
//! Layout: `presence: u16 LE` (bit `k as u16` for each present `Key`, in `Key` order, then
//! `F_VRF`, then `F_NAS`), `flags: u8` (`FLAG_*`); the present keys in `Key` order, then the
//! VRF, then the NAS (text, the VRF and the NAS as LEB128 length + octets); Framed-IP 4 octets; Framed-IPv6-Prefix 16 + 1; Framed-
//! Interface-Id 8 LE; NAS-Port 4 LE. A Calling-Station-Id of the canonical MAC form
//! `XX-XX-XX-XX-XX-XX` (upper-case hex) is packed into 6 octets (`FLAG_MAC`). Authorization
//! (only when not default) is LEB128 length + `serde_json`. A tombstone ends with the removal
//! time, 8 octets LE (`FLAG_TOMB`).
#![forbid(unsafe_code)]

use core::net::{Ipv4Addr, Ipv6Addr};

use dynauth_proto::codec::Ipv6Prefix;
use dynauth_proto::session::{Authorization, HasKeys, Key, KeyValue, Session, ValueKind};
use dynauth_proto::store::MatchScope;

/// The presence bit of `key`; keys in `Key` order, then the VRF, then the NAS.
const fn bit(key: Key) -> u16 {
    1 << key as u16
}
const KEY_BITS: u16 = (1 << Key::COUNT) - 1;
const F_VRF: u16 = 1 << Key::COUNT;
const F_NAS: u16 = 1 << (Key::COUNT + 1);
const _: () = assert!(Key::COUNT + 1 < 16, "the presence bits fit in a u16");

const FLAG_AUTH: u8 = 1;
const FLAG_TOMB: u8 = 2;
const FLAG_MAC: u8 = 4;

/// The one key whose canonical MAC form is packed (`FLAG_MAC`).
const MAC_KEY: Key = Key::CallingStationId;

/// A key's value as stored: as given, or a Calling-Station-Id packed from its MAC form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stored<'a> {
    Value(KeyValue<'a>),
    Mac([u8; 6]),
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

impl Stored<'_> {
    /// The value; a packed MAC is written out into `buf` in its text form.
    pub(crate) fn value<'b>(&'b self, buf: &'b mut [u8; 17]) -> KeyValue<'b> {
        match self {
            Stored::Value(v) => *v,
            Stored::Mac(m) => {
                for (i, b) in m.iter().enumerate() {
                    buf[i * 3] = HEX[usize::from(b >> 4)];
                    buf[i * 3 + 1] = HEX[usize::from(b & 15)];
                    if i < 5 {
                        buf[i * 3 + 2] = b'-';
                    }
                }
                KeyValue::Text(&buf[..])
            }
        }
    }

    fn is(&self, wanted: KeyValue<'_>) -> bool {
        match self {
            Stored::Value(v) => *v == wanted,
            Stored::Mac(_) => {
                let mut buf = [0u8; 17];
                self.value(&mut buf) == wanted
            }
        }
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
    /// By `Key as usize`.
    keys: [Option<Stored<'a>>; Key::COUNT],
    pub vrf: Option<&'a [u8]>,
    /// The NAS the session belongs to (`Session::nas`): Acct-Session-Id is unique per NAS.
    pub nas: Option<&'a [u8]>,
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

fn put_text(out: &mut Vec<u8>, v: &[u8]) {
    put_len(out, v.len());
    out.extend_from_slice(v);
}

/// Encodes `s` (a live record) into `out`, which is cleared first.
pub(crate) fn encode(s: &Session, out: &mut Vec<u8>) {
    encode_reusing(s, &mut Vec::new(), out);
}

/// [`encode`] with the authorization's JSON written into `json` (cleared first), a buffer
/// the caller keeps, so that a warm writer allocates nothing for it.
pub(crate) fn encode_reusing(s: &Session, json: &mut Vec<u8>, out: &mut Vec<u8>) {
    json.clear();
    let auth = (s.authorization != Authorization::default()
        && serde_json::to_writer(&mut *json, &s.authorization).is_ok())
    .then_some(json.as_slice());
    encode_parts(&keys_of(s), auth, None, out);
}

/// Borrowed keys of a `Session`. Filled in place, key by key: `Key::ALL.map(..)` went
/// through `array::try_map`, which moved the whole array per element: 9.7 % of the control
/// thread's samples while it applies a feed, 4.6 % this way.
pub(crate) fn keys_of(s: &Session) -> Keys<'_> {
    let mut keys: [Option<Stored<'_>>; Key::COUNT] = [None; Key::COUNT];
    for key in Key::ALL {
        if let Some(slot) = keys.get_mut(key as usize) {
            *slot = s.get(key).map(Stored::Value);
        }
    }
    Keys {
        keys,
        vrf: s.vrf.as_deref().map(str::as_bytes),
        nas: s.nas.as_deref().map(str::as_bytes),
        authorization: None,
        removed_at: None,
    }
}

/// The identity of `k` (its NAS, Acct-Session-Id, audit-session-id and CUI: what
/// `store::same_session` compares) in the record encoding: the octets [`encode`] writes for
/// a session with only those fields.
pub(crate) fn encode_identity(k: &Keys<'_>, out: &mut Vec<u8>) {
    let mut identity = Keys {
        nas: k.nas,
        ..Keys::default()
    };
    for key in [Key::AcctSessionId, Key::AuditSessionId, Key::Cui] {
        identity.keys[key as usize] = k.keys[key as usize];
    }
    encode_parts(&identity, None, None, out);
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
    for key in Key::ALL {
        let mut buf = [0u8; 17];
        let Some(value) = k.value(key, &mut buf) else {
            continue;
        };
        p |= bit(key);
        match value {
            KeyValue::Text(t) => match (key == MAC_KEY).then(|| pack_mac(t)).flatten() {
                Some(m) => {
                    flags |= FLAG_MAC;
                    out.extend_from_slice(&m);
                }
                None => put_text(out, t),
            },
            KeyValue::Ipv4(ip) => out.extend_from_slice(&ip.octets()),
            KeyValue::Ipv6Prefix(v6) => {
                out.extend_from_slice(&v6.addr().octets());
                out.push(v6.len());
            }
            KeyValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
            KeyValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        }
    }
    if let Some(vrf) = k.vrf {
        p |= F_VRF;
        put_text(out, vrf);
    }
    if let Some(nas) = k.nas {
        p |= F_NAS;
        put_text(out, nas);
    }
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
    fn text(&mut self) -> Option<&'a [u8]> {
        let n = self.len()?;
        self.take(n)
    }
    fn value(&mut self, kind: ValueKind) -> Option<KeyValue<'a>> {
        Some(match kind {
            ValueKind::Text => KeyValue::Text(self.text()?),
            ValueKind::Ipv4 => KeyValue::Ipv4(Ipv4Addr::from(self.array::<4>()?)),
            ValueKind::Ipv6Prefix => {
                let a = Ipv6Addr::from(self.array::<16>()?);
                let [len] = self.array::<1>()?;
                KeyValue::Ipv6Prefix(Ipv6Prefix::new(a, len)?)
            }
            ValueKind::U64 => KeyValue::U64(u64::from_le_bytes(self.array::<8>()?)),
            ValueKind::U32 => KeyValue::U32(u32::from_le_bytes(self.array::<4>()?)),
        })
    }
}

/// Decodes a record. `None` for bytes that no encoder wrote (treated as no record: never a
/// panic).
pub(crate) fn decode(bytes: &[u8]) -> Option<Keys<'_>> {
    let mut c = Cursor(bytes);
    let [p0, p1, flags] = c.array::<3>()?;
    let p = u16::from_le_bytes([p0, p1]);
    let mut k = Keys::default();
    // The present keys only, in `Key` order (the order `encode_parts` wrote them).
    let mut present = p & KEY_BITS;
    while present != 0 {
        let key = Key::ALL[present.trailing_zeros() as usize];
        present &= present - 1;
        k.keys[key as usize] = Some(if key == MAC_KEY && flags & FLAG_MAC != 0 {
            Stored::Mac(c.array::<6>()?)
        } else {
            Stored::Value(c.value(key.kind())?)
        });
    }
    if p & F_VRF != 0 {
        k.vrf = Some(c.text()?);
    }
    if p & F_NAS != 0 {
        k.nas = Some(c.text()?);
    }
    if flags & FLAG_AUTH != 0 {
        let n = c.len()?;
        k.authorization = Some(c.take(n)?);
    }
    if flags & FLAG_TOMB != 0 {
        k.removed_at = Some(u64::from_le_bytes(c.array::<8>()?));
    }
    Some(k)
}

/// The record side of the matching rules: `SessionQuery::matches` and `PrimaryKey::finds`
/// run on `Keys` as on a `Session`.
impl HasKeys for Keys<'_> {
    fn has_key(&self, key: Key, value: KeyValue<'_>) -> bool {
        self.keys[key as usize].is_some_and(|s| s.is(value))
    }
}

impl<'a> Keys<'a> {
    /// The stored value of `key`.
    pub(crate) fn stored(&self, key: Key) -> Option<Stored<'a>> {
        self.keys[key as usize]
    }

    /// The value of `key`; a packed MAC is written out into `buf`.
    pub(crate) fn value<'b>(&'b self, key: Key, buf: &'b mut [u8; 17]) -> Option<KeyValue<'b>> {
        self.keys[key as usize].as_ref().map(|s| s.value(buf))
    }

    /// Whether both records hold the same value of `key`, or both none.
    pub(crate) fn same(&self, other: &Keys<'_>, key: Key) -> bool {
        let mut buf = [0u8; 17];
        match self.value(key, &mut buf) {
            None => other.stored(key).is_none(),
            Some(v) => other.has_key(key, v),
        }
    }

    /// `MatchScope::admits`.
    pub(crate) fn admitted_by(&self, scope: &MatchScope<'_>) -> bool {
        match scope.vrf {
            None => true,
            Some(vrf) => self.vrf == Some(vrf.as_bytes()),
        }
    }

    /// The owned `Session` (write path only: data-plane callbacks take `&Session`).
    pub(crate) fn to_session(self) -> Session {
        let mut s = Session {
            vrf: self.vrf.map(|b| String::from_utf8_lossy(b).into_owned()),
            nas: self.nas.map(|b| String::from_utf8_lossy(b).into_owned()),
            authorization: self
                .authorization
                .and_then(|a| serde_json::from_slice(a).ok())
                .unwrap_or_default(),
            ..Session::default()
        };
        for key in Key::ALL {
            let mut buf = [0u8; 17];
            if let Some(v) = self.value(key, &mut buf) {
                // Cannot fail for what `encode` wrote: each value has its key's kind and the
                // text came from a `String`. Bytes that are neither lose the key.
                let _ = s.set(key, Some(v));
            }
        }
        s
    }

    /// Overwrites `s` with this record, reusing `s`'s strings (a scan that hands every
    /// session to a callback allocates only when a value outgrows the previous one, and for a
    /// non-default authorization).
    pub(crate) fn fill_session(&self, s: &mut Session) {
        fn put(slot: &mut Option<String>, value: Option<&[u8]>) {
            match (value, slot.as_mut()) {
                (None, _) => *slot = None,
                (Some(v), Some(old)) => {
                    old.clear();
                    old.push_str(&String::from_utf8_lossy(v));
                }
                (Some(v), None) => *slot = Some(String::from_utf8_lossy(v).into_owned()),
            }
        }
        for key in Key::ALL {
            let mut buf = [0u8; 17];
            let value = self.value(key, &mut buf);
            match text_field(s, key) {
                Some(slot) => put(slot, value.and_then(KeyValue::text)),
                // As in `to_session`: cannot fail for what `encode` wrote.
                None => {
                    let _ = s.set(key, value);
                }
            }
        }
        put(&mut s.vrf, self.vrf);
        put(&mut s.nas, self.nas);
        s.authorization = self
            .authorization
            .and_then(|a| serde_json::from_slice(a).ok())
            .unwrap_or_default();
    }
}

/// The field of a text `key` (`None` for the keys of other kinds).
fn text_field(s: &mut Session, key: Key) -> Option<&mut Option<String>> {
    Some(match key {
        Key::AcctSessionId => &mut s.acct_session_id,
        Key::AuditSessionId => &mut s.audit_session_id,
        Key::Cui => &mut s.cui,
        Key::Imsi => &mut s.imsi,
        Key::AcctMultiSessionId => &mut s.acct_multi_session_id,
        Key::UserName => &mut s.user_name,
        Key::CallingStationId => &mut s.calling_station_id,
        Key::NasPortId => &mut s.nas_port_id,
        Key::CalledStationId => &mut s.called_station_id,
        Key::Nsapi => &mut s.nsapi,
        Key::FramedIp | Key::FramedIpv6Prefix | Key::FramedInterfaceId | Key::NasPort => {
            return None;
        }
    })
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
            nas: Some("bng-1".into()),
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
    fn fill_session_overwrites_every_field() {
        let mut buf = Vec::new();
        let mut reused = full();
        for s in [
            Session::default(),
            full(),
            dynauth_proto::synth::session(3, 99),
            full(),
        ] {
            encode(&s, &mut buf);
            decode(&buf).unwrap().fill_session(&mut reused);
            assert_eq!(reused, s);
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
