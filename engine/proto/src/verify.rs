//! Verification: the only way to an [`Authenticated`] request.
//!
//! Owns: recognising a request (framing, code), the Request Authenticator (against every
//! secret of the client, for rollover), the Message-Authenticator, the Event-Timestamp window,
//! the Proxy-State limit and the check that the largest possible answer fits, all before the
//! duplicate cache is consulted or a session is touched (SPEC §2, RFC 5176 §3.4, RFC 3579
//! §3.2, RFC 5080 §2.2.2). It walks the attributes once: the same walk feeds the request rules
//! (`rules::RequestReader`) and records what the answer must echo.
//! Must not touch: the duplicate cache, the store, the answer's bytes, clocks (time is passed
//! in), allocation.
#![forbid(unsafe_code)]

use core::net::SocketAddr;

use crate::auth::{self, Secret};
use crate::client::{AnswerSigning, Client, ClientId};
use crate::codec::{self, Attribute, MalformedValue, Packet};
use crate::counters::{Discard, RequestKind};
use crate::dedup::DuplicateKey;
use crate::dict::{ErrorCause, attr, code};
use crate::engine::Now;
use crate::rules::{RequestAttributes, RequestReader};

/// A request from a known client whose authenticators verified, whose Event-Timestamp (if
/// any) is in the window and whose answer fits. Only [`authenticate`] builds one: the
/// duplicate cache and the decisions accept nothing else.
#[derive(Debug, Clone, Copy)]
pub struct Authenticated<'a> {
    packet: Packet<'a>,
    kind: RequestKind,
    source: SocketAddr,
    client_id: ClientId,
    client: &'a Client,
    secret: &'a Secret,
    message_authenticator: Option<usize>,
    event_timestamp: Option<u32>,
    echo: Echo<'a>,
    sign_answer: bool,
    attributes: Result<RequestAttributes<'a>, ErrorCause>,
}

impl<'a> Authenticated<'a> {
    pub fn packet(&self) -> Packet<'a> {
        self.packet
    }

    pub fn kind(&self) -> RequestKind {
        self.kind
    }

    pub fn source(&self) -> SocketAddr {
        self.source
    }

    pub fn client_id(&self) -> ClientId {
        self.client_id
    }

    pub fn client(&self) -> &'a Client {
        self.client
    }

    /// The secret the Request Authenticator verified with; the answer is signed with it.
    pub(crate) fn secret(&self) -> &'a Secret {
        self.secret
    }

    /// Which of the client's secrets ([`Client::secrets`]) verified the request: what a
    /// later signature or re-verification looks it up by.
    pub(crate) fn secret_index(&self) -> usize {
        self.client
            .secrets()
            .position(|s| core::ptr::eq(s, self.secret))
            .unwrap_or(0)
    }

    /// Offset of the verified Message-Authenticator's value, when the request carried one.
    pub fn message_authenticator(&self) -> Option<usize> {
        self.message_authenticator
    }

    /// The Event-Timestamp, when present and well formed (it was inside the window).
    pub fn event_timestamp(&self) -> Option<u32> {
        self.event_timestamp
    }

    /// What the answer echoes: every State, then every Proxy-State, in order.
    pub fn echo(&self) -> Echo<'a> {
        self.echo
    }

    /// Whether the answer carries a Message-Authenticator (client policy, SPEC §9).
    pub fn signs_answer(&self) -> bool {
        self.sign_answer
    }

    /// The request's attributes, or the one Error-Cause of the first rule they broke.
    pub(crate) fn attributes(&self) -> Result<&RequestAttributes<'a>, ErrorCause> {
        self.attributes.as_ref().map_err(|c| *c)
    }

    /// Its key in the duplicate cache (RFC 5080 §2.2.2: source, code, Identifier and Request
    /// Authenticator).
    pub(crate) fn duplicate_key(&self) -> DuplicateKey {
        DuplicateKey::new(
            self.source,
            self.packet.code(),
            self.packet.identifier(),
            *self.packet.authenticator(),
        )
    }
}

/// The State and Proxy-State attributes a request carried, which its answer echoes
/// (RFC 5176 §3.1, §3.5): their number and their size with headers, and an iterator over
/// them in answer order. Built by the verifier's scan; iterating reads only well-framed
/// attributes (a framing error ends the list where it ended the scan).
#[derive(Debug, Clone, Copy)]
pub struct Echo<'a> {
    packet: Packet<'a>,
    states: usize,
    proxy_states: usize,
    len: usize,
}

impl<'a> Echo<'a> {
    pub fn states(&self) -> usize {
        self.states
    }

    pub fn proxy_states(&self) -> usize {
        self.proxy_states
    }

    /// Octets the echo takes in the answer, 2 octets of header per attribute included.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.states == 0 && self.proxy_states == 0
    }

    /// Every State in order, then every Proxy-State in order.
    pub fn attributes(&self) -> impl Iterator<Item = Attribute<'a>> + 'a {
        let well_framed = self.packet.attributes().map_while(Result::ok);
        let states = well_framed.clone().filter(|a| a.ty == attr::STATE);
        let proxy_states = well_framed.filter(|a| a.ty == attr::PROXY_STATE);
        states.chain(proxy_states)
    }
}

/// Recognises a request: well framed (RFC 2865 §3) with a code this server answers. The
/// caller counts the request per client once this succeeds.
pub fn classify(datagram: &[u8]) -> Result<(Packet<'_>, RequestKind), Discard> {
    let packet = Packet::parse(datagram).map_err(|_| Discard::Malformed)?;
    let kind = match packet.code() {
        code::DISCONNECT_REQUEST => RequestKind::Disconnect,
        code::COA_REQUEST => RequestKind::Coa,
        _ => return Err(Discard::UnsupportedCode),
    };
    Ok((packet, kind))
}

/// What an arrived request is, before it is trusted.
#[derive(Debug, Clone, Copy)]
pub struct Arrival<'a> {
    pub packet: Packet<'a>,
    pub kind: RequestKind,
    pub source: SocketAddr,
    pub client_id: ClientId,
    pub client: &'a Client,
}

/// Verifies a request (SPEC §2): Request Authenticator, Message-Authenticator,
/// Event-Timestamp, Proxy-State limit, and that an answer of at most `answer_capacity` octets
/// can hold whatever the answer will be. Every failure is a silent discard.
pub fn authenticate<'a>(
    arrival: Arrival<'a>,
    now: Now,
    answer_capacity: usize,
) -> Result<Authenticated<'a>, Discard> {
    authenticate_precomputed(arrival, now, answer_capacity, None)
}

/// [`authenticate`], given the expected Request Authenticator of these very octets with the
/// client's first secret when it was computed ahead (`batch`, four at a time). The client's
/// other secrets (a rotation) are tried as usual when it does not match.
pub(crate) fn authenticate_precomputed<'a>(
    arrival: Arrival<'a>,
    now: Now,
    answer_capacity: usize,
    first_secret_expects: Option<auth::Authenticator>,
) -> Result<Authenticated<'a>, Discard> {
    // The Request Authenticator covers the whole packet, so it is checked before anything
    // else (and before the duplicate cache, whose key covers only the first 20 octets).
    let mut secrets = arrival.client.secrets();
    let secret = match first_secret_expects {
        Some(expected) => {
            let first = secrets.next().ok_or(Discard::BadRequestAuthenticator)?;
            if auth::authenticators_equal(&expected, arrival.packet.authenticator()) {
                Some(first)
            } else {
                secrets.find(|s| auth::request_authenticator_is_valid(&arrival.packet, s))
            }
        }
        None => secrets.find(|s| auth::request_authenticator_is_valid(&arrival.packet, s)),
    }
    .ok_or(Discard::BadRequestAuthenticator)?;
    checked(arrival, secret, now, answer_capacity, Macs::Verify)
}

/// Whether [`checked`] verifies the Message-Authenticator.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Macs {
    Verify,
    /// Already verified over these very bytes with this secret ([`reauthenticate`]).
    Verified,
}

/// [`authenticate`] again, for a request that passed it when it arrived and whose bytes are
/// owned and unchanged since (`action::PendingRequest`), with the secret that verified it
/// then (its position in `Client::secrets`) and the same clock reading: every check of
/// `authenticate` gives the same result again, so the two MACs (Request Authenticator,
/// Message-Authenticator) are not computed twice more per action. Crate-private: only what
/// `authenticate` accepted may come back this way.
pub(crate) fn reauthenticate<'a>(
    arrival: Arrival<'a>,
    secret_index: usize,
    now: Now,
    answer_capacity: usize,
) -> Result<Authenticated<'a>, Discard> {
    let secret = arrival
        .client
        .secrets()
        .nth(secret_index)
        .ok_or(Discard::BadRequestAuthenticator)?;
    checked(arrival, secret, now, answer_capacity, Macs::Verified)
}

/// The checks after the Request Authenticator's.
fn checked<'a>(
    arrival: Arrival<'a>,
    secret: &'a Secret,
    now: Now,
    answer_capacity: usize,
    macs: Macs,
) -> Result<Authenticated<'a>, Discard> {
    let Arrival {
        packet,
        kind,
        source,
        client_id,
        client,
    } = arrival;
    let scan = Scan::of(packet, kind);
    if macs == Macs::Verify {
        check_message_authenticator(&packet, &scan, client, secret)?;
    }
    let event_timestamp = check_event_timestamp(&scan, client, now)?;
    if scan.echo.proxy_states > usize::from(client.policy.max_proxy_states) {
        return Err(Discard::TooManyProxyStates);
    }
    let sign_answer = match client.policy.answer_message_authenticator {
        AnswerSigning::Always => true,
        AnswerSigning::WhenRequested => scan.message_authenticator.is_some(),
    };
    // Before any session is touched: a change must never be committed and then left without
    // an answer because the answer does not fit.
    let worst_case = crate::answer::worst_case_len(
        scan.echo.len,
        sign_answer,
        client.policy.reply_message_reasons,
    );
    if worst_case > answer_capacity.min(codec::MAX_PACKET_LEN) {
        return Err(Discard::AnswerWouldNotFit);
    }
    Ok(Authenticated {
        packet,
        kind,
        source,
        client_id,
        client,
        secret,
        message_authenticator: scan.message_authenticator,
        event_timestamp,
        echo: scan.echo,
        sign_answer,
        attributes: scan.attributes,
    })
}

/// The one walk over the attributes: security facts, the echo, and the request rules.
struct Scan<'a> {
    /// Offset of the Message-Authenticator's value, when exactly one of 16 octets is present.
    message_authenticator: Option<usize>,
    /// More than one, or one of the wrong length.
    message_authenticator_malformed: bool,
    /// The first Event-Timestamp: its value, or `Err` for a wrong length.
    event_timestamp: Option<Result<u32, MalformedValue>>,
    echo: Echo<'a>,
    attributes: Result<RequestAttributes<'a>, ErrorCause>,
}

impl<'a> Scan<'a> {
    fn of(packet: Packet<'a>, kind: RequestKind) -> Self {
        let mut message_authenticator = None;
        let mut message_authenticator_malformed = false;
        let mut event_timestamp = None;
        let mut echo = Echo {
            packet,
            states: 0,
            proxy_states: 0,
            len: 0,
        };
        let mut rules = RequestReader::new(kind, packet);
        for attribute in packet.attributes() {
            let Ok(a) = attribute else {
                rules.framing_error();
                break;
            };
            match a.ty {
                attr::MESSAGE_AUTHENTICATOR => {
                    if message_authenticator.is_some() || a.value.len() != codec::AUTHENTICATOR_LEN
                    {
                        message_authenticator_malformed = true;
                    }
                    message_authenticator = Some(a.value_offset());
                }
                attr::EVENT_TIMESTAMP if event_timestamp.is_none() => {
                    event_timestamp = Some(codec::read_u32(a.value));
                }
                attr::PROXY_STATE => {
                    echo.proxy_states += 1;
                    echo.len += 2 + a.value.len();
                }
                attr::STATE => {
                    echo.states += 1;
                    echo.len += 2 + a.value.len();
                }
                _ => {}
            }
            rules.read(a);
        }
        Scan {
            message_authenticator,
            message_authenticator_malformed,
            event_timestamp,
            echo,
            attributes: rules.finish(),
        }
    }
}

/// SPEC §2.5 (RFC 5176 §3.4, RFC 3579 §3.2).
fn check_message_authenticator(
    packet: &Packet<'_>,
    scan: &Scan<'_>,
    client: &Client,
    secret: &Secret,
) -> Result<(), Discard> {
    if scan.message_authenticator_malformed {
        return Err(Discard::BadMessageAuthenticator);
    }
    match scan.message_authenticator {
        Some(offset) => {
            if auth::request_message_authenticator_is_valid(packet, offset, secret) {
                Ok(())
            } else {
                Err(Discard::BadMessageAuthenticator)
            }
        }
        None if client.policy.require_message_authenticator => {
            Err(Discard::MissingMessageAuthenticator)
        }
        None => Ok(()),
    }
}

/// SPEC §2.6 (RFC 5176 §3.4): outside the window either side, or absent when required. A
/// malformed Event-Timestamp (wrong length) carries no time: when the client requires one it
/// counts as missing and is discarded; otherwise it gets NAK 407 (SPEC §7).
fn check_event_timestamp(
    scan: &Scan<'_>,
    client: &Client,
    now: Now,
) -> Result<Option<u32>, Discard> {
    match scan.event_timestamp {
        Some(Ok(ts)) => {
            let window = u64::from(client.policy.event_timestamp_window_secs);
            if now.unix_secs.abs_diff(u64::from(ts)) > window {
                Err(Discard::EventTimestampOutsideWindow)
            } else {
                Ok(Some(ts))
            }
        }
        Some(Err(_)) | None if client.policy.require_event_timestamp => {
            Err(Discard::MissingEventTimestamp)
        }
        Some(Err(_)) | None => Ok(None),
    }
}
