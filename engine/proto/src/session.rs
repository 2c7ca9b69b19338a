//! The session model: every identification key of SPEC §6 and the authorization state a
//! CoA-Request changes (SPEC §8).
//!
//! Owns: the identification keys, defined once: [`Key`] and its key table (field name, kind
//! of value, whether it identifies alone and is indexed, uniqueness); the `Session` record
//! (serialised with these exact field names in the JSON Lines session files), the borrowed
//! `SessionQuery` a request is turned into, and the matching rules (AND semantics,
//! normalisation, routing-context scope, the most selective key, key profiles), each a loop
//! over [`Key::ALL`] through `get` and [`HasKeys`].
//! Must not touch: storage layout or concurrency (`store` and the session table), wire
//! parsing (`decide` builds queries from parsed attributes).
#![forbid(unsafe_code)]

use core::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::codec::Ipv6Prefix;

/// One subscriber session as the NAS knows it. Every key is optional; a useful session has at
/// least one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Session {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acct_session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acct_multi_session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_name: Option<String>,
    /// Chargeable-User-Identity (RFC 4372).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cui: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub framed_ip: Option<Ipv4Addr>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "prefix_as_text"
    )]
    pub framed_ipv6_prefix: Option<Ipv6Prefix>,
    /// Framed-Interface-Id (RFC 3162 §2.2), the 64-bit interface identifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub framed_interface_id: Option<u64>,
    /// Called-Station-Id; for mobile sessions the APN or DNN, which scopes addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub called_station_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calling_station_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nas_port: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nas_port_id: Option<String>,
    /// 3GPP-IMSI (vendor 10415, type 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imsi: Option<String>,
    /// 3GPP-NSAPI (vendor 10415, type 10), as sent: one character such as "5".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nsapi: Option<String>,
    /// Cisco-AVPair "audit-session-id=VALUE": the VALUE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_session_id: Option<String>,
    /// The routing context (VRF) the session's addresses live in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vrf: Option<String>,
    /// The NAS the session belongs to (its NAS-Identifier, NAS-IP-Address or
    /// NAS-IPv6-Address as text), set by the session feed. Acct-Session-Id is unique per NAS,
    /// because NASes reuse them (RFC 2866 §5.5 asks only for uniqueness on one NAS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nas: Option<String>,
    /// What a CoA-Request may change.
    #[serde(default, skip_serializing_if = "Authorization::is_default")]
    pub authorization: Authorization,
}

/// The authorization state of a session (SPEC §8). A CoA attribute present replaces every
/// value of that attribute; one absent leaves it unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Authorization {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_timeout: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acct_interim_interval: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filter_ids: Vec<String>,
    /// Class values are opaque octets (RFC 2865 §5.25).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reply_messages: Vec<String>,
    /// Cisco-AVPair policy values ("subscriber:service-name=gold", "ip:inacl#1=...").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cisco_policies: Vec<String>,
}

impl Authorization {
    fn is_default(&self) -> bool {
        *self == Authorization::default()
    }
}

mod prefix_as_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::codec::Ipv6Prefix;

    pub fn serialize<S: Serializer>(v: &Option<Ipv6Prefix>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(p) => s.collect_str(p),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ipv6Prefix>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| t.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// One identification key of SPEC §6.
///
/// The variants are in selectivity order, the order in which [`SessionQuery::primary_key`]
/// tries them, and `Key::ALL[k as usize] == k`. Every property of a key is in its row of
/// [`Key::info`]: the field name, the kind of value, whether it identifies on its own and is
/// indexed, and how many live sessions may share a value. `Session` and `SessionQuery` have
/// one field per key, reached by [`Session::get`] and [`SessionQuery::get`]; everything else
/// (identification, matching, the primary key, key profiles, the session table's indexes)
/// is a loop over [`Key::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// Acct-Session-Id.
    AcctSessionId,
    /// Cisco-AVPair "audit-session-id=VALUE".
    AuditSessionId,
    /// Chargeable-User-Identity (RFC 4372).
    Cui,
    /// 3GPP-IMSI (vendor 10415, type 1).
    Imsi,
    /// Framed-IP-Address.
    FramedIp,
    /// Framed-IPv6-Prefix.
    FramedIpv6Prefix,
    /// Acct-Multi-Session-Id.
    AcctMultiSessionId,
    /// User-Name.
    UserName,
    /// Calling-Station-Id.
    CallingStationId,
    /// NAS-Port-Id.
    NasPortId,
    /// Framed-Interface-Id (RFC 3162 §2.2).
    FramedInterfaceId,
    /// NAS-Port.
    NasPort,
    /// Called-Station-Id (the APN or DNN of a mobile session).
    CalledStationId,
    /// 3GPP-NSAPI (vendor 10415, type 10): identifies only together with 3GPP-IMSI.
    Nsapi,
}

/// The kind of value a key holds (see [`KeyValue`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueKind {
    Text,
    Ipv4,
    Ipv6Prefix,
    U64,
    U32,
}

/// How a key finds sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Identifies on its own; the session table keeps an index of it.
    Indexed,
    /// Identifies on its own, but a lookup by it alone visits every session: one
    /// Called-Station-Id (an APN or DNN) is shared by millions.
    Scanned,
    /// Identifies only together with another key and is never a primary key: 3GPP-NSAPI
    /// narrows a 3GPP-IMSI (SPEC §6), NSAPI alone identifies nothing.
    Qualifier,
}

/// How many live sessions of the session table may hold one value of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Uniqueness {
    /// Any number.
    Shared,
    /// One.
    Unique,
    /// One per 3GPP-NSAPI value (or absence): 3GPP-IMSI, one session per PDP context.
    WithNsapi,
    /// One per routing context, VRF + Called-Station-Id: the addresses (SPEC §6.7). A lookup
    /// by such a key is scoped by the request's Called-Station-Id.
    InContext,
}

/// The properties of one key (a row of the key table, see [`Key::info`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyInfo {
    pub key: Key,
    /// The field name in `Session` and `SessionQuery`, and so in the JSON Lines session
    /// files.
    pub name: &'static str,
    pub kind: ValueKind,
    pub role: Role,
    pub uniqueness: Uniqueness,
}

/// The key table, one row per key in `Key` order (checked at compile time below).
const INFO: [KeyInfo; Key::COUNT] = {
    use Role::{Indexed, Qualifier, Scanned};
    use Uniqueness::{InContext, Shared, Unique, WithNsapi};
    use ValueKind::{Ipv4, Ipv6Prefix, Text, U32, U64};
    const fn row(
        key: Key,
        name: &'static str,
        kind: ValueKind,
        role: Role,
        uniqueness: Uniqueness,
    ) -> KeyInfo {
        KeyInfo {
            key,
            name,
            kind,
            role,
            uniqueness,
        }
    }
    [
        row(Key::AcctSessionId, "acct_session_id", Text, Indexed, Unique),
        row(
            Key::AuditSessionId,
            "audit_session_id",
            Text,
            Indexed,
            Unique,
        ),
        row(Key::Cui, "cui", Text, Indexed, Unique),
        row(Key::Imsi, "imsi", Text, Indexed, WithNsapi),
        row(Key::FramedIp, "framed_ip", Ipv4, Indexed, InContext),
        row(
            Key::FramedIpv6Prefix,
            "framed_ipv6_prefix",
            Ipv6Prefix,
            Indexed,
            InContext,
        ),
        row(
            Key::AcctMultiSessionId,
            "acct_multi_session_id",
            Text,
            Indexed,
            Shared,
        ),
        row(Key::UserName, "user_name", Text, Indexed, Shared),
        row(
            Key::CallingStationId,
            "calling_station_id",
            Text,
            Indexed,
            Shared,
        ),
        row(Key::NasPortId, "nas_port_id", Text, Indexed, Shared),
        row(
            Key::FramedInterfaceId,
            "framed_interface_id",
            U64,
            Indexed,
            Shared,
        ),
        row(Key::NasPort, "nas_port", U32, Indexed, Shared),
        row(
            Key::CalledStationId,
            "called_station_id",
            Text,
            Scanned,
            Shared,
        ),
        row(Key::Nsapi, "nsapi", Text, Qualifier, Shared),
    ]
};

// The invariants the rest of the code relies on, checked by the compiler.
const _: () = {
    let mut i = 0;
    while i < Key::COUNT {
        assert!(
            Key::ALL[i] as usize == i,
            "Key::ALL is in declaration order"
        );
        assert!(
            INFO[i].key as usize == i,
            "one INFO row per key, in Key order"
        );
        let indexed = matches!(INFO[i].role, Role::Indexed);
        assert!(
            indexed == (i < Key::INDEXED),
            "the indexed keys come first: index numbers are 0..Key::INDEXED"
        );
        assert!(
            indexed || matches!(INFO[i].uniqueness, Uniqueness::Shared),
            "a unique key is indexed (duplicates are found through the index)"
        );
        i += 1;
    }
};

impl Key {
    /// How many keys there are.
    pub const COUNT: usize = 14;

    /// Every key, most selective first.
    pub const ALL: [Key; Key::COUNT] = [
        Key::AcctSessionId,
        Key::AuditSessionId,
        Key::Cui,
        Key::Imsi,
        Key::FramedIp,
        Key::FramedIpv6Prefix,
        Key::AcctMultiSessionId,
        Key::UserName,
        Key::CallingStationId,
        Key::NasPortId,
        Key::FramedInterfaceId,
        Key::NasPort,
        Key::CalledStationId,
        Key::Nsapi,
    ];

    /// How many keys the session table indexes: `Key::ALL[..Key::INDEXED]`, index number
    /// `k as usize` ([`Key::index`]).
    pub const INDEXED: usize = {
        let mut n = 0;
        while n < Key::COUNT && matches!(INFO[n].role, Role::Indexed) {
            n += 1;
        }
        n
    };

    /// This key's row of the key table.
    pub const fn info(self) -> &'static KeyInfo {
        &INFO[self as usize]
    }

    /// The field name (`Session`, `SessionQuery`, session files).
    pub const fn name(self) -> &'static str {
        self.info().name
    }

    pub const fn kind(self) -> ValueKind {
        self.info().kind
    }

    pub const fn role(self) -> Role {
        self.info().role
    }

    pub const fn uniqueness(self) -> Uniqueness {
        self.info().uniqueness
    }

    /// Whether the key identifies sessions on its own (everything but 3GPP-NSAPI).
    pub const fn identifies_alone(self) -> bool {
        !matches!(self.role(), Role::Qualifier)
    }

    /// The number of the session table's index for this key, below [`Key::INDEXED`];
    /// `None` for the keys looked up by scan or never looked up alone.
    pub const fn index(self) -> Option<usize> {
        match self.role() {
            Role::Indexed => Some(self as usize),
            Role::Scanned | Role::Qualifier => None,
        }
    }

    /// Whether a lookup by this key is scoped by the request's Called-Station-Id (the
    /// addresses: SPEC §6.7).
    pub const fn scoped_by_context(self) -> bool {
        matches!(self.uniqueness(), Uniqueness::InContext)
    }
}

impl core::fmt::Display for Key {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// The value of one key, borrowed. Text is compared octet for octet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyValue<'a> {
    Text(&'a [u8]),
    Ipv4(Ipv4Addr),
    Ipv6Prefix(Ipv6Prefix),
    U64(u64),
    U32(u32),
}

impl<'a> KeyValue<'a> {
    pub const fn kind(&self) -> ValueKind {
        match self {
            KeyValue::Text(_) => ValueKind::Text,
            KeyValue::Ipv4(_) => ValueKind::Ipv4,
            KeyValue::Ipv6Prefix(_) => ValueKind::Ipv6Prefix,
            KeyValue::U64(_) => ValueKind::U64,
            KeyValue::U32(_) => ValueKind::U32,
        }
    }

    pub const fn text(self) -> Option<&'a [u8]> {
        match self {
            KeyValue::Text(v) => Some(v),
            _ => None,
        }
    }

    pub const fn ipv4(self) -> Option<Ipv4Addr> {
        match self {
            KeyValue::Ipv4(v) => Some(v),
            _ => None,
        }
    }

    pub const fn ipv6_prefix(self) -> Option<Ipv6Prefix> {
        match self {
            KeyValue::Ipv6Prefix(v) => Some(v),
            _ => None,
        }
    }

    pub const fn u64(self) -> Option<u64> {
        match self {
            KeyValue::U64(v) => Some(v),
            _ => None,
        }
    }

    pub const fn u32(self) -> Option<u32> {
        match self {
            KeyValue::U32(v) => Some(v),
            _ => None,
        }
    }
}

/// Why a key could not be set to a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyValueError {
    #[error("{key} holds a {:?} value, not {found:?}", key.kind())]
    WrongKind { key: Key, found: ValueKind },
    #[error("{key} is text and must be UTF-8")]
    NotUtf8 { key: Key },
}

/// `value` as the `T` that `pick` extracts, or the error naming `key`.
fn picked<'a, T>(
    key: Key,
    value: Option<KeyValue<'a>>,
    pick: impl FnOnce(KeyValue<'a>) -> Option<T>,
) -> Result<Option<T>, KeyValueError> {
    match value {
        None => Ok(None),
        Some(v) => pick(v).map(Some).ok_or(KeyValueError::WrongKind {
            key,
            found: v.kind(),
        }),
    }
}

/// A text `value` as an owned string.
fn owned(key: Key, value: Option<KeyValue<'_>>) -> Result<Option<String>, KeyValueError> {
    picked(key, value, KeyValue::text)?
        .map(|t| {
            core::str::from_utf8(t)
                .map(str::to_owned)
                .map_err(|_| KeyValueError::NotUtf8 { key })
        })
        .transpose()
}

/// Something holding identification keys: a [`Session`], or a record of the session table.
/// The matching rules ([`SessionQuery::matches`], [`PrimaryKey::finds`]) are written once,
/// against this.
pub trait HasKeys {
    /// Whether `key` is present with exactly `value`.
    fn has_key(&self, key: Key, value: KeyValue<'_>) -> bool;
}

impl HasKeys for Session {
    fn has_key(&self, key: Key, value: KeyValue<'_>) -> bool {
        self.get(key) == Some(value)
    }
}

impl Session {
    /// The value of `key`, if set.
    pub fn get(&self, key: Key) -> Option<KeyValue<'_>> {
        fn text(v: &Option<String>) -> Option<KeyValue<'_>> {
            v.as_deref().map(|t| KeyValue::Text(t.as_bytes()))
        }
        match key {
            Key::AcctSessionId => text(&self.acct_session_id),
            Key::AuditSessionId => text(&self.audit_session_id),
            Key::Cui => text(&self.cui),
            Key::Imsi => text(&self.imsi),
            Key::FramedIp => self.framed_ip.map(KeyValue::Ipv4),
            Key::FramedIpv6Prefix => self.framed_ipv6_prefix.map(KeyValue::Ipv6Prefix),
            Key::AcctMultiSessionId => text(&self.acct_multi_session_id),
            Key::UserName => text(&self.user_name),
            Key::CallingStationId => text(&self.calling_station_id),
            Key::NasPortId => text(&self.nas_port_id),
            Key::FramedInterfaceId => self.framed_interface_id.map(KeyValue::U64),
            Key::NasPort => self.nas_port.map(KeyValue::U32),
            Key::CalledStationId => text(&self.called_station_id),
            Key::Nsapi => text(&self.nsapi),
        }
    }

    /// Sets `key` to `value` (`None` clears it). Refused, leaving the session unchanged,
    /// for a value of another kind than the key's or text that is not UTF-8.
    pub fn set(&mut self, key: Key, value: Option<KeyValue<'_>>) -> Result<(), KeyValueError> {
        match key {
            Key::AcctSessionId => self.acct_session_id = owned(key, value)?,
            Key::AuditSessionId => self.audit_session_id = owned(key, value)?,
            Key::Cui => self.cui = owned(key, value)?,
            Key::Imsi => self.imsi = owned(key, value)?,
            Key::FramedIp => self.framed_ip = picked(key, value, KeyValue::ipv4)?,
            Key::FramedIpv6Prefix => {
                self.framed_ipv6_prefix = picked(key, value, KeyValue::ipv6_prefix)?;
            }
            Key::AcctMultiSessionId => self.acct_multi_session_id = owned(key, value)?,
            Key::UserName => self.user_name = owned(key, value)?,
            Key::CallingStationId => self.calling_station_id = owned(key, value)?,
            Key::NasPortId => self.nas_port_id = owned(key, value)?,
            Key::FramedInterfaceId => {
                self.framed_interface_id = picked(key, value, KeyValue::u64)?;
            }
            Key::NasPort => self.nas_port = picked(key, value, KeyValue::u32)?,
            Key::CalledStationId => self.called_station_id = owned(key, value)?,
            Key::Nsapi => self.nsapi = owned(key, value)?,
        }
        Ok(())
    }

    /// True when at least one key that identifies on its own is set (a session file line
    /// must have one; 3GPP-NSAPI alone does not count).
    pub fn has_identification(&self) -> bool {
        Key::ALL
            .into_iter()
            .any(|key| key.identifies_alone() && self.get(key).is_some())
    }
}

/// The identification attributes of one request, borrowed from the packet (SPEC §6).
/// Text keys are compared octet for octet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionQuery<'a> {
    pub acct_session_id: Option<&'a [u8]>,
    pub acct_multi_session_id: Option<&'a [u8]>,
    pub user_name: Option<&'a [u8]>,
    pub cui: Option<&'a [u8]>,
    pub framed_ip: Option<Ipv4Addr>,
    pub framed_ipv6_prefix: Option<Ipv6Prefix>,
    pub framed_interface_id: Option<u64>,
    pub called_station_id: Option<&'a [u8]>,
    pub calling_station_id: Option<&'a [u8]>,
    pub nas_port: Option<u32>,
    pub nas_port_id: Option<&'a [u8]>,
    pub imsi: Option<&'a [u8]>,
    pub nsapi: Option<&'a [u8]>,
    pub audit_session_id: Option<&'a [u8]>,
}

/// The key a lookup starts from: the most selective identification attribute present
/// (session-table issue: one index probe per request, the rest checked on the record).
/// Never 3GPP-NSAPI, which identifies only together with 3GPP-IMSI (checked on the record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrimaryKey<'a> {
    pub key: Key,
    pub value: KeyValue<'a>,
}

/// Which combinations of identification attributes a client may use (SPEC §6.3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyProfile {
    /// Any identification attribute (the default).
    #[default]
    Any,
    /// The 5G SMF profile: {IMSI + NSAPI}, {Acct-Session-Id}, {Called-Station-Id +
    /// Framed-IP-Address}, {Called-Station-Id + Framed-IPv6-Prefix}.
    #[serde(rename = "5g-smf", alias = "smf")]
    Smf5g,
}

impl KeyProfile {
    /// The key combinations of the profile, one of which a request must hold completely;
    /// `None` for [`KeyProfile::Any`]: any key that identifies on its own.
    pub const fn combinations(self) -> Option<&'static [&'static [Key]]> {
        match self {
            KeyProfile::Any => None,
            KeyProfile::Smf5g => Some(&[
                &[Key::Imsi, Key::Nsapi],
                &[Key::AcctSessionId],
                &[Key::CalledStationId, Key::FramedIp],
                &[Key::CalledStationId, Key::FramedIpv6Prefix],
            ]),
        }
    }
}

impl<'a> SessionQuery<'a> {
    /// The value of `key`, if the request holds it.
    pub fn get(&self, key: Key) -> Option<KeyValue<'a>> {
        let text = |v: Option<&'a [u8]>| v.map(KeyValue::Text);
        match key {
            Key::AcctSessionId => text(self.acct_session_id),
            Key::AuditSessionId => text(self.audit_session_id),
            Key::Cui => text(self.cui),
            Key::Imsi => text(self.imsi),
            Key::FramedIp => self.framed_ip.map(KeyValue::Ipv4),
            Key::FramedIpv6Prefix => self.framed_ipv6_prefix.map(KeyValue::Ipv6Prefix),
            Key::AcctMultiSessionId => text(self.acct_multi_session_id),
            Key::UserName => text(self.user_name),
            Key::CallingStationId => text(self.calling_station_id),
            Key::NasPortId => text(self.nas_port_id),
            Key::FramedInterfaceId => self.framed_interface_id.map(KeyValue::U64),
            Key::NasPort => self.nas_port.map(KeyValue::U32),
            Key::CalledStationId => text(self.called_station_id),
            Key::Nsapi => text(self.nsapi),
        }
    }

    /// Sets `key` to `value` (`None` clears it). Refused, leaving the query unchanged, for a
    /// value of another kind than the key's.
    pub fn set(&mut self, key: Key, value: Option<KeyValue<'a>>) -> Result<(), KeyValueError> {
        let text = || picked(key, value, KeyValue::text);
        match key {
            Key::AcctSessionId => self.acct_session_id = text()?,
            Key::AuditSessionId => self.audit_session_id = text()?,
            Key::Cui => self.cui = text()?,
            Key::Imsi => self.imsi = text()?,
            Key::FramedIp => self.framed_ip = picked(key, value, KeyValue::ipv4)?,
            Key::FramedIpv6Prefix => {
                self.framed_ipv6_prefix = picked(key, value, KeyValue::ipv6_prefix)?;
            }
            Key::AcctMultiSessionId => self.acct_multi_session_id = text()?,
            Key::UserName => self.user_name = text()?,
            Key::CallingStationId => self.calling_station_id = text()?,
            Key::NasPortId => self.nas_port_id = text()?,
            Key::FramedInterfaceId => {
                self.framed_interface_id = picked(key, value, KeyValue::u64)?;
            }
            Key::NasPort => self.nas_port = picked(key, value, KeyValue::u32)?,
            Key::CalledStationId => self.called_station_id = text()?,
            Key::Nsapi => self.nsapi = text()?,
        }
        Ok(())
    }

    /// No identification attribute at all (SPEC §6.2: NAK 402). 3GPP-NSAPI without
    /// 3GPP-IMSI does not count: it identifies only together with an IMSI (SPEC §6).
    pub fn is_empty(&self) -> bool {
        self.primary_key().is_none()
    }

    /// The most selective key present, in the order of [`Key::ALL`]. 3GPP-NSAPI is never a
    /// key of its own (SPEC §6): it only narrows an IMSI (it is ANDed in by `matches`), so a
    /// request with NSAPI and no other identification attribute has none (NAK 402), rather
    /// than selecting every session with that NSAPI.
    pub fn primary_key(&self) -> Option<PrimaryKey<'a>> {
        Key::ALL
            .into_iter()
            .filter(|key| key.identifies_alone())
            .find_map(|key| self.get(key).map(|value| PrimaryKey { key, value }))
    }

    /// Whether the request holds a complete key combination of `profile` (SPEC §6.3).
    pub fn satisfies(&self, profile: KeyProfile) -> bool {
        match profile.combinations() {
            None => !self.is_empty(),
            Some(combinations) => combinations
                .iter()
                .any(|keys| keys.iter().all(|&key| self.get(key).is_some())),
        }
    }

    /// AND semantics (SPEC §6.1): every identification attribute present matches `session`.
    pub fn matches<S: HasKeys + ?Sized>(&self, session: &S) -> bool {
        Key::ALL.into_iter().all(|key| {
            self.get(key)
                .is_none_or(|value| session.has_key(key, value))
        })
    }
}

/// The query identifying a session by every key it has.
impl<'a> From<&'a Session> for SessionQuery<'a> {
    fn from(session: &'a Session) -> Self {
        let mut query = SessionQuery::default();
        for key in Key::ALL {
            // The same key's value: of the key's kind, so `set` accepts it.
            let set = query.set(key, session.get(key));
            debug_assert!(set.is_ok(), "{set:?}");
        }
        query
    }
}

impl PrimaryKey<'_> {
    /// Whether the key alone finds `session`. For addresses the routing context is part of the
    /// key (SPEC §6.7), so `called_station_id` from the request scopes them.
    pub fn finds<S: HasKeys + ?Sized>(
        &self,
        session: &S,
        called_station_id: Option<&[u8]>,
    ) -> bool {
        session.has_key(self.key, self.value)
            && (!self.key.scoped_by_context()
                || called_station_id
                    .is_none_or(|c| session.has_key(Key::CalledStationId, KeyValue::Text(c))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session {
            acct_session_id: Some("sess-1".into()),
            user_name: Some("alice".into()),
            framed_ip: Some(Ipv4Addr::new(10, 0, 0, 1)),
            called_station_id: Some("corp".into()),
            ..Session::default()
        }
    }

    /// A session with every field set.
    fn full() -> Session {
        Session {
            acct_session_id: Some("acct".into()),
            acct_multi_session_id: Some("multi".into()),
            user_name: Some("bob".into()),
            cui: Some("cui".into()),
            framed_ip: Some(Ipv4Addr::new(10, 0, 0, 2)),
            framed_ipv6_prefix: "2001:db8:1::/48".parse().ok(),
            framed_interface_id: Some(0x0200_5eff_fe00_5301),
            called_station_id: Some("ims".into()),
            calling_station_id: Some("02-00-5E-00-53-01".into()),
            nas_port: Some(7),
            nas_port_id: Some("ge-0/0/1".into()),
            imsi: Some("001010123456789".into()),
            nsapi: Some("5".into()),
            audit_session_id: Some("audit".into()),
            vrf: Some("red".into()),
            nas: Some("bng-1".into()),
            authorization: Authorization {
                session_timeout: Some(60),
                ..Authorization::default()
            },
        }
    }

    #[test]
    fn every_key_is_in_all_once_in_declaration_order() {
        let mut seen = std::collections::HashSet::new();
        for (i, key) in Key::ALL.into_iter().enumerate() {
            assert_eq!(key as usize, i);
            assert_eq!(key.info().key, key);
            assert!(seen.insert(key), "{key} twice");
        }
        assert_eq!(seen.len(), Key::COUNT);
        let names: std::collections::HashSet<_> = Key::ALL.map(Key::name).into();
        assert_eq!(names.len(), Key::COUNT, "names are distinct");
    }

    #[test]
    fn index_numbers_are_a_bijection_onto_the_indexed_keys() {
        let mut numbers: Vec<usize> = Key::ALL.into_iter().filter_map(Key::index).collect();
        numbers.sort_unstable();
        assert_eq!(numbers, (0..Key::INDEXED).collect::<Vec<_>>());
        for key in Key::ALL {
            assert_eq!(key.index().is_some(), key.role() == Role::Indexed, "{key}");
            if let Some(n) = key.index() {
                assert_eq!(Key::ALL[n], key);
            }
        }
        assert_eq!(Key::CalledStationId.index(), None);
        assert_eq!(Key::Nsapi.index(), None);
        assert!(!Key::Nsapi.identifies_alone());
        assert_eq!(
            Key::ALL
                .into_iter()
                .filter(|k| !k.identifies_alone())
                .count(),
            1,
            "only NSAPI needs another key"
        );
    }

    // The JSON Lines field names are the struct's, which must be exactly the key table's.
    #[test]
    fn session_json_fields_are_the_key_names_plus_vrf_and_authorization() {
        let serde_json::Value::Object(map) = serde_json::to_value(full()).unwrap() else {
            panic!("a session is an object");
        };
        let mut fields: Vec<&str> = map.keys().map(String::as_str).collect();
        fields.sort_unstable();
        let mut want: Vec<&str> = Key::ALL.map(Key::name).to_vec();
        want.extend(["vrf", "nas", "authorization"]);
        want.sort_unstable();
        assert_eq!(fields, want);
    }

    #[test]
    fn get_and_set_agree_for_every_key() {
        let s = full();
        for key in Key::ALL {
            let value = s.get(key).unwrap_or_else(|| panic!("{key} unset"));
            assert_eq!(value.kind(), key.kind(), "{key}");
            let mut one = Session::default();
            one.set(key, Some(value)).unwrap();
            assert_eq!(one.get(key), Some(value));
            let others = Key::ALL.into_iter().filter(|&k| k != key);
            assert!(others.clone().all(|k| one.get(k).is_none()), "{key}");
            let mut q = SessionQuery::default();
            q.set(key, Some(value)).unwrap();
            assert_eq!(q.get(key), Some(value));
            assert!(others.clone().all(|k| q.get(k).is_none()), "{key}");
            // A value of another kind is refused and changes nothing.
            let wrong = if key.kind() == ValueKind::U32 {
                KeyValue::U64(1)
            } else {
                KeyValue::U32(1)
            };
            let err = KeyValueError::WrongKind {
                key,
                found: wrong.kind(),
            };
            assert_eq!(one.set(key, Some(wrong)), Err(err));
            assert_eq!(q.set(key, Some(wrong)), Err(err));
            assert_eq!((one.get(key), q.get(key)), (Some(value), Some(value)));
            one.set(key, None).unwrap();
            q.set(key, None).unwrap();
            assert_eq!((one, q), (Session::default(), SessionQuery::default()));
        }
        let mut one = Session::default();
        assert_eq!(
            one.set(Key::UserName, Some(KeyValue::Text(b"\xff"))),
            Err(KeyValueError::NotUtf8 { key: Key::UserName })
        );
        assert_eq!(
            SessionQuery::from(&s).get(Key::NasPort),
            Some(KeyValue::U32(7))
        );
    }

    // Each key alone: the primary key is that key, and it finds and matches the session.
    #[test]
    fn every_single_key_finds_its_session() {
        let s = full();
        let other = session();
        assert!(SessionQuery::from(&s).matches(&s));
        assert!(!SessionQuery::from(&s).matches(&other));
        for key in Key::ALL {
            let mut q = SessionQuery::default();
            q.set(key, s.get(key)).unwrap();
            assert!(q.matches(&s), "{key}");
            if !key.identifies_alone() {
                assert!(q.is_empty(), "{key}");
                continue;
            }
            let pk = q.primary_key().unwrap();
            assert_eq!(pk.key, key);
            assert!(pk.finds(&s, q.called_station_id), "{key}");
            assert!(!pk.finds(&other, q.called_station_id), "{key}");
            let mut lone = Session::default();
            lone.set(key, s.get(key)).unwrap();
            assert!(lone.has_identification(), "{key}");
        }
        let mut nsapi_only = Session::default();
        nsapi_only.set(Key::Nsapi, s.get(Key::Nsapi)).unwrap();
        assert!(!nsapi_only.has_identification());
    }

    #[test]
    fn primary_key_follows_all_order() {
        let s = full();
        // Drop the most selective key one at a time: the next one in `Key::ALL` leads.
        let mut q = SessionQuery::from(&s);
        for key in Key::ALL.into_iter().filter(|k| k.identifies_alone()) {
            assert_eq!(q.primary_key().map(|p| p.key), Some(key));
            q.set(key, None).unwrap();
        }
        assert!(q.is_empty(), "NSAPI is left");
        assert!(q.nsapi.is_some());
    }

    // SPEC §6.1 (RFC 5176 §3): every identification attribute present must match (AND).
    #[test]
    fn rfc5176_s3_identification_is_and() {
        let s = session();
        let q = SessionQuery {
            acct_session_id: Some(b"sess-1"),
            user_name: Some(b"alice"),
            ..Default::default()
        };
        assert!(q.matches(&s));
        let q = SessionQuery {
            user_name: Some(b"bob"),
            ..q
        };
        assert!(!q.matches(&s));
    }

    #[test]
    fn primary_key_prefers_the_most_selective() {
        let q = SessionQuery {
            user_name: Some(b"alice"),
            framed_ip: Some(Ipv4Addr::new(10, 0, 0, 1)),
            acct_session_id: Some(b"sess-1"),
            ..Default::default()
        };
        assert_eq!(
            q.primary_key(),
            Some(PrimaryKey {
                key: Key::AcctSessionId,
                value: KeyValue::Text(b"sess-1")
            })
        );
        assert_eq!(SessionQuery::default().primary_key(), None);
    }

    // SPEC §6.7: the same address in two routing contexts; Called-Station-Id scopes it.
    #[test]
    fn spec_6_7_called_station_id_scopes_addresses() {
        let s = session();
        let key = PrimaryKey {
            key: Key::FramedIp,
            value: KeyValue::Ipv4(Ipv4Addr::new(10, 0, 0, 1)),
        };
        assert!(key.finds(&s, Some(b"corp")));
        assert!(!key.finds(&s, Some(b"internet")));
        assert!(key.finds(&s, None));
    }

    // SPEC §6 (RFC 5176 §3): 3GPP-NSAPI identifies only together with 3GPP-IMSI.
    #[test]
    fn spec_6_nsapi_alone_is_no_identification_rfc5176_s3() {
        let nsapi_only = SessionQuery {
            nsapi: Some(b"5"),
            ..Default::default()
        };
        assert!(nsapi_only.is_empty());
        assert_eq!(nsapi_only.primary_key(), None);
        assert!(!nsapi_only.satisfies(KeyProfile::Any));
        assert!(!nsapi_only.satisfies(KeyProfile::Smf5g));
        let with_imsi = SessionQuery {
            imsi: Some(b"001010123456789"),
            ..nsapi_only
        };
        assert_eq!(
            with_imsi.primary_key(),
            Some(PrimaryKey {
                key: Key::Imsi,
                value: KeyValue::Text(b"001010123456789")
            })
        );
        let s = Session {
            imsi: Some("001010123456789".into()),
            nsapi: Some("6".into()),
            ..Session::default()
        };
        assert!(!with_imsi.matches(&s), "NSAPI is ANDed with the IMSI");
    }

    // SPEC §6.3: the 5G SMF key profile.
    #[test]
    fn spec_6_3_smf_profile_combinations() {
        let imsi_only = SessionQuery {
            imsi: Some(b"001010123456789"),
            ..Default::default()
        };
        assert!(imsi_only.satisfies(KeyProfile::Any));
        assert!(!imsi_only.satisfies(KeyProfile::Smf5g));
        let imsi_nsapi = SessionQuery {
            nsapi: Some(b"5"),
            ..imsi_only
        };
        assert!(imsi_nsapi.satisfies(KeyProfile::Smf5g));
        let ip_only = SessionQuery {
            framed_ip: Some(Ipv4Addr::new(10, 0, 0, 1)),
            ..Default::default()
        };
        assert!(!ip_only.satisfies(KeyProfile::Smf5g));
        let ip_apn = SessionQuery {
            called_station_id: Some(b"ims"),
            ..ip_only
        };
        assert!(ip_apn.satisfies(KeyProfile::Smf5g));
        let user = SessionQuery {
            user_name: Some(b"alice"),
            ..Default::default()
        };
        assert!(!user.satisfies(KeyProfile::Smf5g));
    }

    #[test]
    fn session_json_uses_model_field_names() {
        let line = r#"{"acct_session_id":"a1","framed_ip":"10.1.2.3","framed_ipv6_prefix":"2001:db8::1/64","nas_port":7}"#;
        let s: Session = serde_json::from_str(line).unwrap();
        assert_eq!(s.framed_ipv6_prefix.unwrap().to_string(), "2001:db8::/64");
        assert_eq!(s.nas_port, Some(7));
        let back = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Session>(&back).unwrap(), s);
        assert!(serde_json::from_str::<Session>(r#"{"acct_sesion_id":"x"}"#).is_err());
    }
}
