//! The session model: every identification key of SPEC §6 and the authorization state a
//! CoA-Request changes (SPEC §8).
//!
//! Owns: the `Session` record (serialised with these exact field names in the JSON Lines
//! session files), the borrowed `SessionQuery` a request is turned into, and the matching
//! rules (AND semantics, normalisation, routing-context scope, the most selective key).
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

impl Session {
    /// True when at least one identification key is set (a session file line must have one).
    pub fn has_identification(&self) -> bool {
        let s = self;
        s.acct_session_id.is_some()
            || s.acct_multi_session_id.is_some()
            || s.user_name.is_some()
            || s.cui.is_some()
            || s.framed_ip.is_some()
            || s.framed_ipv6_prefix.is_some()
            || s.framed_interface_id.is_some()
            || s.called_station_id.is_some()
            || s.calling_station_id.is_some()
            || s.nas_port.is_some()
            || s.nas_port_id.is_some()
            || s.imsi.is_some()
            || s.audit_session_id.is_some()
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryKey<'a> {
    AcctSessionId(&'a [u8]),
    AuditSessionId(&'a [u8]),
    Cui(&'a [u8]),
    /// 3GPP-IMSI, with 3GPP-NSAPI when present (checked on the record).
    Imsi(&'a [u8]),
    /// Framed-IP-Address, unique within its routing context.
    FramedIp(Ipv4Addr),
    FramedIpv6Prefix(Ipv6Prefix),
    AcctMultiSessionId(&'a [u8]),
    UserName(&'a [u8]),
    CallingStationId(&'a [u8]),
    NasPortId(&'a [u8]),
    FramedInterfaceId(u64),
    NasPort(u32),
    CalledStationId(&'a [u8]),
    // No 3GPP-NSAPI: it identifies only together with 3GPP-IMSI (checked on the record).
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

fn text_eq(wanted: Option<&[u8]>, have: &Option<String>) -> bool {
    match wanted {
        None => true,
        Some(w) => have.as_deref().is_some_and(|h| h.as_bytes() == w),
    }
}

fn value_eq<T: PartialEq>(wanted: Option<T>, have: Option<T>) -> bool {
    match wanted {
        None => true,
        Some(w) => have == Some(w),
    }
}

impl<'a> SessionQuery<'a> {
    /// No identification attribute at all (SPEC §6.2: NAK 402). 3GPP-NSAPI without
    /// 3GPP-IMSI does not count: it identifies only together with an IMSI (SPEC §6).
    pub fn is_empty(&self) -> bool {
        self.primary_key().is_none()
    }

    /// The most selective key present, in the order of `PrimaryKey`'s variants.
    pub fn primary_key(&self) -> Option<PrimaryKey<'a>> {
        let q = self;
        q.acct_session_id
            .map(PrimaryKey::AcctSessionId)
            .or_else(|| q.audit_session_id.map(PrimaryKey::AuditSessionId))
            .or_else(|| q.cui.map(PrimaryKey::Cui))
            .or_else(|| q.imsi.map(PrimaryKey::Imsi))
            .or_else(|| q.framed_ip.map(PrimaryKey::FramedIp))
            .or_else(|| q.framed_ipv6_prefix.map(PrimaryKey::FramedIpv6Prefix))
            .or_else(|| q.acct_multi_session_id.map(PrimaryKey::AcctMultiSessionId))
            .or_else(|| q.user_name.map(PrimaryKey::UserName))
            .or_else(|| q.calling_station_id.map(PrimaryKey::CallingStationId))
            .or_else(|| q.nas_port_id.map(PrimaryKey::NasPortId))
            .or_else(|| q.framed_interface_id.map(PrimaryKey::FramedInterfaceId))
            .or_else(|| q.nas_port.map(PrimaryKey::NasPort))
            .or_else(|| q.called_station_id.map(PrimaryKey::CalledStationId))
        // 3GPP-NSAPI is never a key of its own (SPEC §6): it only narrows an IMSI (it is
        // ANDed in by `matches`), so a request with NSAPI and no other identification
        // attribute has none (NAK 402), rather than selecting every session with that NSAPI.
    }

    /// Whether the request holds a complete key combination of `profile` (SPEC §6.3).
    pub fn satisfies(&self, profile: KeyProfile) -> bool {
        match profile {
            KeyProfile::Any => !self.is_empty(),
            KeyProfile::Smf5g => {
                (self.imsi.is_some() && self.nsapi.is_some())
                    || self.acct_session_id.is_some()
                    || (self.called_station_id.is_some()
                        && (self.framed_ip.is_some() || self.framed_ipv6_prefix.is_some()))
            }
        }
    }

    /// AND semantics (SPEC §6.1): every identification attribute present matches `session`.
    pub fn matches(&self, s: &Session) -> bool {
        let q = self;
        text_eq(q.acct_session_id, &s.acct_session_id)
            && text_eq(q.audit_session_id, &s.audit_session_id)
            && text_eq(q.cui, &s.cui)
            && text_eq(q.imsi, &s.imsi)
            && text_eq(q.nsapi, &s.nsapi)
            && value_eq(q.framed_ip, s.framed_ip)
            && value_eq(q.framed_ipv6_prefix, s.framed_ipv6_prefix)
            && text_eq(q.acct_multi_session_id, &s.acct_multi_session_id)
            && text_eq(q.user_name, &s.user_name)
            && text_eq(q.calling_station_id, &s.calling_station_id)
            && text_eq(q.nas_port_id, &s.nas_port_id)
            && value_eq(q.framed_interface_id, s.framed_interface_id)
            && value_eq(q.nas_port, s.nas_port)
            && text_eq(q.called_station_id, &s.called_station_id)
    }
}

impl PrimaryKey<'_> {
    /// Whether the key alone finds `session`. For addresses the routing context is part of the
    /// key (SPEC §6.7), so `called_station_id` from the request scopes them.
    pub fn finds(&self, s: &Session, called_station_id: Option<&[u8]>) -> bool {
        match *self {
            PrimaryKey::AcctSessionId(v) => text_eq(Some(v), &s.acct_session_id),
            PrimaryKey::AuditSessionId(v) => text_eq(Some(v), &s.audit_session_id),
            PrimaryKey::Cui(v) => text_eq(Some(v), &s.cui),
            PrimaryKey::Imsi(v) => text_eq(Some(v), &s.imsi),
            PrimaryKey::FramedIp(ip) => {
                s.framed_ip == Some(ip) && text_eq(called_station_id, &s.called_station_id)
            }
            PrimaryKey::FramedIpv6Prefix(p) => {
                s.framed_ipv6_prefix == Some(p) && text_eq(called_station_id, &s.called_station_id)
            }
            PrimaryKey::AcctMultiSessionId(v) => text_eq(Some(v), &s.acct_multi_session_id),
            PrimaryKey::UserName(v) => text_eq(Some(v), &s.user_name),
            PrimaryKey::CallingStationId(v) => text_eq(Some(v), &s.calling_station_id),
            PrimaryKey::NasPortId(v) => text_eq(Some(v), &s.nas_port_id),
            PrimaryKey::FramedInterfaceId(v) => s.framed_interface_id == Some(v),
            PrimaryKey::NasPort(v) => s.nas_port == Some(v),
            PrimaryKey::CalledStationId(v) => text_eq(Some(v), &s.called_station_id),
        }
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
        assert_eq!(q.primary_key(), Some(PrimaryKey::AcctSessionId(b"sess-1")));
        assert_eq!(SessionQuery::default().primary_key(), None);
    }

    // SPEC §6.7: the same address in two routing contexts; Called-Station-Id scopes it.
    #[test]
    fn spec_6_7_called_station_id_scopes_addresses() {
        let s = session();
        let key = PrimaryKey::FramedIp(Ipv4Addr::new(10, 0, 0, 1));
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
            Some(PrimaryKey::Imsi(b"001010123456789"))
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
