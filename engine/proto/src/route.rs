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

use core::net::{Ipv4Addr, Ipv6Addr};
use std::io::Write as _;

use crate::action::{ActionKind, PendingRequest, Settled};
use crate::auth::{self, Authenticator, ResponseCheck, Secret};
use crate::codec::{self, Packet, PacketWriter};
use crate::counters::Discard;
use crate::dict::{ErrorCause, attr, code, service_type};
use crate::rules;
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
    // Formatted straight into the key (a Vec<u8> is an io::Write that cannot fail).
    let _ = write!(out, "{value}");
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

/// The NAS a request names: where a router sends it when no owner of its session is known
/// (RFC 8559 §3.1 routes by Operator-Name; NAS-Identifier and the NAS addresses name the NAS).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NasHints {
    pub ip: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    pub identifier: Option<Vec<u8>>,
    pub operator_name: Option<Vec<u8>>,
}

/// What a router needs to find a request's owner.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteRequest {
    /// The request's routing keys ([`query_route_keys`]).
    pub keys: Vec<Vec<u8>>,
    pub nas: NasHints,
}

/// A request as forwarded to its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forwarded {
    pub len: usize,
    pub identifier: u8,
    /// Its Request Authenticator: the owner's answer is signed over it.
    pub authenticator: Authenticator,
}

/// Why an owner's answer cannot be relayed (the router answers the DAC NAK 505 instead, or
/// ignores the datagram: see the daemon's router).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    #[error("not a RADIUS packet")]
    Malformed,
    #[error("code {0} does not answer the forwarded request")]
    UnexpectedCode(u8),
    #[error("the Identifier is not the forwarded request's")]
    WrongIdentifier,
    #[error("the Response Authenticator does not verify with the owner's secret")]
    BadResponseAuthenticator,
    #[error("the Message-Authenticator does not verify with the owner's secret")]
    BadMessageAuthenticator,
    #[error("the router's Proxy-State is not the last one echoed")]
    MissingProxyState,
    #[error("the relayed answer would not fit in 4096 octets")]
    TooLarge,
    #[error("the original request no longer verifies: {0:?}")]
    Request(Discard),
}

impl PendingRequest {
    /// The routing keys and NAS hints of this request (the router role).
    pub fn route(&self) -> Result<RouteRequest, Discard> {
        let request = self.reopen()?;
        let prepared = rules::prepare_route(&request, self.arrived.monotonic_ms)
            .map_err(|_| Discard::Malformed)?;
        let nas = prepared.nas;
        Ok(RouteRequest {
            keys: query_route_keys(&prepared.lookup.query),
            nas: NasHints {
                ip: nas.ip,
                ipv6: nas.ipv6,
                identifier: nas.identifier.map(<[u8]>::to_vec),
                operator_name: nas.operator_name.map(<[u8]>::to_vec),
            },
        })
    }

    /// Writes the request as forwarded to its owner into `out` (RFC 5176 §3.1): the same
    /// code and attributes in the same order, `proxy_state` appended as the last
    /// Proxy-State, a Message-Authenticator first (always: owners may require it, and it
    /// costs 18 octets), signed with the owner's `secret` under `identifier`.
    pub fn forward(
        &self,
        identifier: u8,
        proxy_state: &[u8],
        secret: &Secret,
        out: &mut [u8],
    ) -> Result<Forwarded, Discard> {
        let request = self.reopen()?;
        let packet = request.packet();
        let mut w = PacketWriter::new(out, packet.code(), identifier, &[0; 16])
            .map_err(|_| Discard::AnswerTooLarge)?;
        let too_large = |_| Discard::AnswerTooLarge;
        let ma = w
            .push(attr::MESSAGE_AUTHENTICATOR, &[0; 16])
            .map_err(too_large)?;
        for a in packet.attributes() {
            let a = a.map_err(|_| Discard::Malformed)?;
            if a.ty != attr::MESSAGE_AUTHENTICATOR {
                w.push(a.ty, a.value).map_err(too_large)?;
            }
        }
        w.push(attr::PROXY_STATE, proxy_state).map_err(too_large)?;
        let bytes = w.finish();
        auth::sign_request(bytes, Some(ma), secret);
        let mut authenticator = [0; 16];
        if let Some(a) = bytes.get(4..codec::HEADER_LEN) {
            authenticator.copy_from_slice(a);
        }
        Ok(Forwarded {
            len: bytes.len(),
            identifier,
            authenticator,
        })
    }

    /// Checks the owner's `answer` to the request forwarded as `forwarded` (code, Identifier,
    /// Response Authenticator and Message-Authenticator with the owner's secret, our
    /// `proxy_state` echoed last) and writes it, relayed, into `out`: the same code and
    /// attributes in order, our Proxy-State removed, the DAC's Identifier, signed with the
    /// secret the DAC's request verified with (with a Message-Authenticator when the DAC's
    /// policy wants one).
    pub fn relay(
        &self,
        answer: &[u8],
        forwarded: &Forwarded,
        owner_secret: &Secret,
        proxy_state: &[u8],
        out: &mut [u8],
    ) -> Result<Settled, RelayError> {
        let owner = Packet::parse(answer).map_err(|_| RelayError::Malformed)?;
        let (ack, nak) = match self.kind {
            ActionKind::Disconnect => (code::DISCONNECT_ACK, code::DISCONNECT_NAK),
            ActionKind::Change | ActionKind::Reauthorize => (code::COA_ACK, code::COA_NAK),
        };
        if owner.code() != ack && owner.code() != nak {
            return Err(RelayError::UnexpectedCode(owner.code()));
        }
        if owner.identifier() != forwarded.identifier {
            return Err(RelayError::WrongIdentifier);
        }
        match auth::verify_response(&owner, &forwarded.authenticator, owner_secret) {
            ResponseCheck::Valid => {}
            ResponseCheck::BadResponseAuthenticator => {
                return Err(RelayError::BadResponseAuthenticator);
            }
            ResponseCheck::BadMessageAuthenticator => {
                return Err(RelayError::BadMessageAuthenticator);
            }
        }
        // Ours is the last Proxy-State (RFC 2865 §5.33: echoed in order; we appended it).
        let mut ours = None;
        for (i, a) in owner.attributes().enumerate() {
            let a = a.map_err(|_| RelayError::Malformed)?;
            if a.ty == attr::PROXY_STATE {
                ours = Some((i, a.value == proxy_state));
            }
        }
        let ours = match ours {
            Some((i, true)) => i,
            _ => return Err(RelayError::MissingProxyState),
        };
        let request = self.reopen().map_err(RelayError::Request)?;
        let dac = request.packet();
        let mut w = PacketWriter::new(out, owner.code(), dac.identifier(), dac.authenticator())
            .map_err(|_| RelayError::TooLarge)?;
        let too_large = |_| RelayError::TooLarge;
        let ma = if request.signs_answer() {
            Some(
                w.push(attr::MESSAGE_AUTHENTICATOR, &[0; 16])
                    .map_err(too_large)?,
            )
        } else {
            None
        };
        let mut error_cause = None;
        let mut authorize_only = false;
        for (i, a) in owner.attributes().enumerate() {
            let a = a.map_err(|_| RelayError::Malformed)?;
            if i == ours || a.ty == attr::MESSAGE_AUTHENTICATOR {
                continue;
            }
            if a.ty == attr::ERROR_CAUSE {
                error_cause = codec::read_u32(a.value)
                    .ok()
                    .and_then(ErrorCause::from_value);
            }
            if a.ty == attr::SERVICE_TYPE
                && codec::read_u32(a.value) == Ok(service_type::AUTHORIZE_ONLY)
            {
                authorize_only = true;
            }
            w.push(a.ty, a.value).map_err(too_large)?;
        }
        let bytes = w.finish();
        auth::sign_response(bytes, ma, request.secret());
        Ok(Settled {
            shard: self.shard,
            source: self.source,
            destination: self.destination,
            len: bytes.len(),
            code: owner.code(),
            error_cause,
            sessions: 0,
            compensate: Vec::new(),
            client_id: self.client_id,
            client_network: request.client().network,
            kind: request.kind(),
            ack: owner.code() == ack,
            authorize_only,
            key: self.key,
            answer_expires_ms: self.answer_expires_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::{ActionSink, QueueFull};
    use crate::client::{Client, ClientTable};
    use crate::codec::Ipv6Prefix;
    use crate::engine::{Engine, EngineConfig, Now, Outcome};
    use crate::store::MemoryStore;
    use std::sync::{Arc, Mutex};

    const DAC_SECRET: &[u8] = b"dac-secret";
    const OWNER_SECRET: &[u8] = b"owner-secret";

    #[derive(Default)]
    struct Capture(Mutex<Vec<PendingRequest>>);

    impl ActionSink for Capture {
        fn submit(&self, request: PendingRequest) -> Result<(), QueueFull> {
            self.0.lock().unwrap().push(request);
            Ok(())
        }
    }

    fn config() -> Arc<EngineConfig> {
        let client = Client::new(
            "127.0.0.1/32".parse().unwrap(),
            Secret::new(DAC_SECRET).unwrap(),
        );
        Arc::new(EngineConfig {
            clients: ClientTable::new([client]).unwrap(),
            ..EngineConfig::default()
        })
    }

    fn dac_request(code: u8, attrs: &[(u8, &[u8])], ma: bool) -> Vec<u8> {
        let mut buf = vec![0; codec::MAX_PACKET_LEN];
        let mut w = PacketWriter::new(&mut buf, code, 7, &[0; 16]).unwrap();
        let ma = ma.then(|| w.push(attr::MESSAGE_AUTHENTICATOR, &[0; 16]).unwrap());
        for (ty, v) in attrs {
            w.push(*ty, v).unwrap();
        }
        let bytes = w.finish();
        auth::sign_request(bytes, ma, &Secret::new(DAC_SECRET).unwrap());
        bytes.to_vec()
    }

    const NOW: Now = Now {
        unix_secs: 1_700_000_000,
        monotonic_ms: 1_000,
    };

    /// Runs `datagram` through a router-role engine; returns what the engine did and the
    /// pending request, if it went to the router.
    fn route(datagram: &[u8]) -> (Outcome, Vec<u8>, Option<PendingRequest>, Engine) {
        let sink = Arc::new(Capture::default());
        let mut engine = Engine::new(config(), Arc::new(MemoryStore::default()))
            .with_router(0, Arc::clone(&sink) as Arc<dyn ActionSink>);
        let mut out = vec![0; codec::MAX_PACKET_LEN];
        let outcome = engine.handle(
            datagram,
            "127.0.0.1:5000".parse().unwrap(),
            "127.0.0.1:3799".parse().unwrap(),
            NOW,
            &mut out,
        );
        let pending = sink.0.lock().unwrap().pop();
        (outcome, out, pending, engine)
    }

    /// The owner's answer to a forwarded request: every Proxy-State echoed in order
    /// (RFC 5176 §3.1), an Error-Cause when given, signed with `secret`.
    fn owner_answer(forwarded: &[u8], code: u8, cause: Option<u32>, secret: &[u8]) -> Vec<u8> {
        let request = Packet::parse(forwarded).unwrap();
        let mut buf = vec![0; codec::MAX_PACKET_LEN];
        let mut w = PacketWriter::new(
            &mut buf,
            code,
            request.identifier(),
            request.authenticator(),
        )
        .unwrap();
        let ma = w.push(attr::MESSAGE_AUTHENTICATOR, &[0; 16]).unwrap();
        if let Some(c) = cause {
            w.push_u32(attr::ERROR_CAUSE, c).unwrap();
        }
        for a in request.attributes() {
            let a = a.unwrap();
            if a.ty == attr::PROXY_STATE {
                w.push(a.ty, a.value).unwrap();
            }
        }
        let bytes = w.finish();
        auth::sign_response(bytes, Some(ma), &Secret::new(secret).unwrap());
        bytes.to_vec()
    }

    fn proxy_states(packet: &[u8]) -> Vec<Vec<u8>> {
        Packet::parse(packet)
            .unwrap()
            .attributes()
            .map(Result::unwrap)
            .filter(|a| a.ty == attr::PROXY_STATE)
            .map(|a| a.value.to_vec())
            .collect()
    }

    #[test]
    fn rfc5176_s3_1_forward_and_relay_round_trip() {
        let req = dac_request(
            code::DISCONNECT_REQUEST,
            &[
                (attr::ACCT_SESSION_ID, b"S1"),
                (attr::USER_NAME, b"alice"),
                (attr::PROXY_STATE, b"dac-hop"),
            ],
            true,
        );
        let (outcome, _, pending, _) = route(&req);
        assert_eq!(outcome, Outcome::Pending);
        let pending = pending.expect("handed to the router");
        let keys = pending.route().unwrap().keys;
        assert_eq!(
            keys,
            [b"acct_session_id=S1".to_vec(), b"user_name=alice".to_vec()]
        );

        let owner_secret = Secret::new(OWNER_SECRET).unwrap();
        let mut fwd = vec![0; codec::MAX_PACKET_LEN];
        let f = pending
            .forward(200, b"rt-1", &owner_secret, &mut fwd)
            .unwrap();
        let fwd = &fwd[..f.len];
        let packet = Packet::parse(fwd).unwrap();
        assert_eq!(packet.identifier(), 200);
        assert!(auth::request_authenticator_is_valid(&packet, &owner_secret));
        assert!(!auth::request_authenticator_is_valid(
            &packet,
            &Secret::new(DAC_SECRET).unwrap()
        ));
        assert_eq!(proxy_states(fwd), [b"dac-hop".to_vec(), b"rt-1".to_vec()]);

        let answer = owner_answer(fwd, code::DISCONNECT_NAK, Some(503), OWNER_SECRET);
        let mut out = vec![0; codec::MAX_PACKET_LEN];
        let settled = pending
            .relay(&answer, &f, &owner_secret, b"rt-1", &mut out)
            .unwrap();
        let relayed = &out[..settled.len];
        let relayed_packet = Packet::parse(relayed).unwrap();
        assert_eq!(relayed_packet.code(), code::DISCONNECT_NAK);
        assert_eq!(relayed_packet.identifier(), 7);
        assert_eq!(
            settled.error_cause,
            Some(ErrorCause::SessionContextNotFound)
        );
        let dac_auth: Authenticator = req[4..20].try_into().unwrap();
        assert_eq!(
            auth::verify_response(
                &relayed_packet,
                &dac_auth,
                &Secret::new(DAC_SECRET).unwrap()
            ),
            ResponseCheck::Valid
        );
        // The DAC's own Proxy-State comes back; the router's does not.
        assert_eq!(proxy_states(relayed), [b"dac-hop".to_vec()]);
    }

    #[test]
    fn relay_refuses_answers_it_cannot_trust() {
        let req = dac_request(code::COA_REQUEST, &[(attr::ACCT_SESSION_ID, b"S1")], false);
        let (_, _, pending, _) = route(&req);
        let pending = pending.unwrap();
        let owner_secret = Secret::new(OWNER_SECRET).unwrap();
        let mut fwd = vec![0; codec::MAX_PACKET_LEN];
        let f = pending
            .forward(9, b"rt-2", &owner_secret, &mut fwd)
            .unwrap();
        let fwd = fwd[..f.len].to_vec();
        let mut out = vec![0; codec::MAX_PACKET_LEN];
        let mut relay = |answer: &[u8], token: &[u8]| {
            pending
                .relay(answer, &f, &owner_secret, token, &mut out)
                .map(|s| s.code)
        };
        let good = owner_answer(&fwd, code::COA_ACK, None, OWNER_SECRET);
        assert_eq!(relay(&good, b"rt-2"), Ok(code::COA_ACK));
        let forged = owner_answer(&fwd, code::COA_ACK, None, b"not-the-secret");
        assert_eq!(
            relay(&forged, b"rt-2"),
            Err(RelayError::BadResponseAuthenticator)
        );
        assert_eq!(relay(&good, b"rt-X"), Err(RelayError::MissingProxyState));
        let wrong_code = owner_answer(&fwd, code::DISCONNECT_ACK, None, OWNER_SECRET);
        assert_eq!(
            relay(&wrong_code, b"rt-2"),
            Err(RelayError::UnexpectedCode(code::DISCONNECT_ACK))
        );
        let mut other_id = good.clone();
        other_id[1] ^= 1;
        assert_eq!(relay(&other_id, b"rt-2"), Err(RelayError::WrongIdentifier));
    }

    #[test]
    fn router_role_keeps_the_rules_but_not_the_nas_check() {
        // The NAS attributes name the owner's NAS, not the router (RFC 5176 §3.1): no 403.
        let req = dac_request(
            code::DISCONNECT_REQUEST,
            &[
                (attr::ACCT_SESSION_ID, b"S1"),
                (attr::NAS_IDENTIFIER, b"bng-7"),
                (attr::OPERATOR_NAME, b"1example.net"),
            ],
            false,
        );
        let (outcome, _, pending, _) = route(&req);
        assert_eq!(outcome, Outcome::Pending);
        let hints = pending.unwrap().route().unwrap().nas;
        assert_eq!(hints.identifier.as_deref(), Some(&b"bng-7"[..]));
        assert_eq!(hints.operator_name.as_deref(), Some(&b"1example.net"[..]));
        // A rule the router still applies: no identification attribute is NAK 402.
        let req = dac_request(
            code::DISCONNECT_REQUEST,
            &[(attr::NAS_IDENTIFIER, b"x")],
            false,
        );
        let (outcome, out, pending, _) = route(&req);
        assert!(pending.is_none());
        let Outcome::Answer(a) = outcome else {
            panic!("{outcome:?}")
        };
        assert_eq!(a.error_cause, Some(ErrorCause::MissingAttribute));
        assert_eq!(out[0], code::DISCONNECT_NAK);
    }

    #[test]
    fn a_retransmission_while_routed_is_absorbed_and_abandon_forgets_it() {
        let req = dac_request(
            code::DISCONNECT_REQUEST,
            &[(attr::ACCT_SESSION_ID, b"S1")],
            false,
        );
        let (_, _, pending, mut engine) = route(&req);
        let pending = pending.unwrap();
        let mut out = vec![0; codec::MAX_PACKET_LEN];
        let src = "127.0.0.1:5000".parse().unwrap();
        let dst = "127.0.0.1:3799".parse().unwrap();
        assert_eq!(
            engine.handle(&req, src, dst, NOW, &mut out),
            Outcome::Discard(Discard::DuplicateInFlight)
        );
        engine.abandon(&pending.abandoned());
        assert_eq!(
            engine.handle(&req, src, dst, NOW, &mut out),
            Outcome::Pending
        );
    }

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
