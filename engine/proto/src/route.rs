//! Routing a request to the instance that owns its session (the router role, RFC 5176 §3.1
//! proxying; the 5G SMF radius-endpoint pattern): the routing keys of a session and of a
//! request, and the two rewrites a router makes: the request forwarded to the owner (its own
//! Proxy-State appended, re-signed with the owner's secret) and the owner's answer relayed to
//! the DAC (that Proxy-State removed again, re-signed with the DAC's secret).
//!
//! Owns: the text form of a routing key (one per indexed identification key: both the owner
//! that publishes its sessions and the router that looks a request up build it here, so they
//! cannot disagree), the forwarded request's bytes, the checks on the owner's answer (code,
//! Identifier, Response Authenticator, Message-Authenticator, our Proxy-State), and the
//! relayed answer's bytes.
//! Must not touch: where affinity is stored (the daemon's Redis client), sockets, clocks.
#![forbid(unsafe_code)]

use core::fmt::Write as _;

use crate::session::{Key, KeyValue, Role, Session, SessionQuery};

/// Appends the routing key of `key` = `value` to `out`: `name=value`, with the key's field
/// name (`acct_session_id`, `user_name`, …), text values as their octets, addresses and
/// prefixes in their usual text form, numbers in decimal.
pub fn route_key(key: Key, value: KeyValue<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(key.info().name.as_bytes());
    out.push(b'=');
    match value {
        KeyValue::Text(t) => out.extend_from_slice(t),
        KeyValue::Ipv4(ip) => push_display(out, ip),
        KeyValue::Ipv6Prefix(p) => push_display(out, p),
        KeyValue::U64(v) => push_display(out, v),
        KeyValue::U32(v) => push_display(out, v),
    }
}

fn push_display(out: &mut Vec<u8>, value: impl core::fmt::Display) {
    let mut s = String::new();
    let _ = write!(s, "{value}");
    out.extend_from_slice(s.as_bytes());
}

/// Whether a key is published and looked up for routing: the keys that identify a session
/// on their own and are indexed (never Called-Station-Id, shared by millions, nor 3GPP-NSAPI,
/// which only narrows an IMSI).
pub fn is_routing_key(key: Key) -> bool {
    key.info().role == Role::Indexed
}

/// The routing keys of a session, in `Key` order: what an owner publishes.
pub fn session_route_keys(session: &Session) -> Vec<Vec<u8>> {
    keys_of(|key| session.get(key))
}

/// The routing keys a request carries, in `Key` order (the most selective first): what a
/// router looks up. Every one the request holds must lead to the owner (AND semantics, SPEC
/// §6.1), so the router intersects their owners.
pub fn query_route_keys(query: &SessionQuery<'_>) -> Vec<Vec<u8>> {
    keys_of(|key| query.get(key))
}

fn keys_of<'a>(get: impl Fn(Key) -> Option<KeyValue<'a>>) -> Vec<Vec<u8>> {
    Key::ALL
        .into_iter()
        .filter(|&key| is_routing_key(key))
        .filter_map(|key| {
            get(key).map(|value| {
                let mut k = Vec::new();
                route_key(key, value, &mut k);
                k
            })
        })
        .collect()
}

/// The session's identity among its owner's sessions, as text: `NAS|acct_session_id` (else
/// the audit-session-id, else the CUI; the same identity the feed replaces by).
pub fn session_identity(session: &Session) -> String {
    let nas = session.nas.as_deref().unwrap_or("");
    let id = session
        .acct_session_id
        .as_deref()
        .map(|v| format!("a:{v}"))
        .or_else(|| {
            session
                .audit_session_id
                .as_deref()
                .map(|v| format!("s:{v}"))
        })
        .or_else(|| session.cui.as_deref().map(|v| format!("c:{v}")))
        .unwrap_or_default();
    format!("{nas}|{id}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Ipv6Prefix;

    fn session() -> Session {
        Session {
            nas: Some("bng-a".into()),
            acct_session_id: Some("S1".into()),
            user_name: Some("alice".into()),
            framed_ip: Some("10.0.0.7".parse().unwrap()),
            framed_ipv6_prefix: Ipv6Prefix::new("2001:db8::".parse().unwrap(), 56),
            called_station_id: Some("internet".into()),
            imsi: Some("001010123456789".into()),
            nsapi: Some("5".into()),
            ..Session::default()
        }
    }

    #[test]
    fn owner_and_router_build_the_same_keys() {
        let s = session();
        let published = session_route_keys(&s);
        let looked_up = query_route_keys(&SessionQuery::from(&s));
        assert_eq!(published, looked_up);
        let text: Vec<String> = published
            .iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        assert_eq!(
            text,
            [
                "acct_session_id=S1",
                "imsi=001010123456789",
                "framed_ip=10.0.0.7",
                "framed_ipv6_prefix=2001:db8::/56",
                "user_name=alice",
            ]
        );
    }

    #[test]
    fn scanned_and_qualifier_keys_do_not_route() {
        // SPEC §6: NSAPI identifies only with an IMSI; Called-Station-Id is shared by millions.
        let s = Session {
            called_station_id: Some("internet".into()),
            nsapi: Some("5".into()),
            ..Session::default()
        };
        assert!(session_route_keys(&s).is_empty());
    }

    #[test]
    fn identity_prefers_acct_session_id() {
        assert_eq!(session_identity(&session()), "bng-a|a:S1");
        let s = Session {
            audit_session_id: Some("X".into()),
            ..Session::default()
        };
        assert_eq!(session_identity(&s), "|s:X");
    }
}
