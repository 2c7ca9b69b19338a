//! RFC 5176 decisions: one datagram in, a silent discard with its reason or the exact answer
//! out, with the session changes applied through the `SessionStore`.
//!
//! Owns: the order of checks (client, framing, code, authenticators, Event-Timestamp,
//! Proxy-State limit, and only then duplicates, so that no cached answer is replayed to bytes
//! that were not authenticated; then attribute rules, NAS identification, session
//! identification, action), the choice of exactly one Error-Cause per NAK, and the answer's
//! layout (Message-Authenticator first, then Service-Type for 507, Error-Cause,
//! Reply-Message, every State, every Proxy-State, in order).
//! Must not touch: sockets, threads or clocks (time is passed in as `Now`), allocation on the
//! Disconnect path.
#![forbid(unsafe_code)]

use core::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::auth::{self, Secret};
use crate::change::{AuthorizationChange, CiscoAvPair, classify_cisco_avpair};
use crate::client::{AnswerSigning, Client, ClientId, ClientTable, NasIdentity};
use crate::codec::{self, Attribute, Ipv6Prefix, MalformedValue, Packet, PacketWriter, WriteError};
use crate::counters::{Counters, Discard, RequestKind};
use crate::dedup::{DedupConfig, DuplicateCache, DuplicateKey, Seen};
use crate::dict::{ErrorCause, attr, code, service_type, vendor};
use crate::session::SessionQuery;
use crate::store::{Applied, DataPlane, Lookup, MatchScope, Refusal, SessionStore};

/// The time, passed in by the caller (the engine reads no clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Wall-clock seconds since the Unix epoch (Event-Timestamp checks).
    pub unix_secs: u64,
    /// A monotonic clock in milliseconds (duplicate cache, tombstones).
    pub monotonic_ms: u64,
}

/// Everything the decisions need that is fixed while the server runs.
#[derive(Debug, Clone, Default)]
pub struct EngineConfig {
    pub clients: ClientTable,
    pub nas: NasIdentity,
    pub dedup: DedupConfig,
}

/// What to do with one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Send nothing; the reason was counted.
    Discard(Discard),
    /// Send `out[..len]`, a fresh answer.
    Answer(Answer),
    /// Send `out[..len]`: the cached answer to an earlier copy of this request.
    Replay { len: usize },
}

/// A fresh answer's summary (the bytes are in the caller's buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub len: usize,
    pub code: u8,
    pub error_cause: Option<ErrorCause>,
    /// Sessions removed or changed.
    pub sessions: u32,
}

/// The verdict on an authenticated request, before encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Verdict {
    ack: bool,
    error_cause: Option<ErrorCause>,
    echo_authorize_only: bool,
    sessions: u32,
}

impl Verdict {
    fn nak(cause: ErrorCause) -> Self {
        Verdict {
            ack: false,
            error_cause: Some(cause),
            echo_authorize_only: false,
            sessions: 0,
        }
    }
}

/// One engine per shard: the shared configuration, store and data plane, and this shard's
/// duplicate cache and counters.
pub struct Engine {
    config: Arc<EngineConfig>,
    store: Arc<dyn SessionStore>,
    data_plane: Arc<dyn DataPlane>,
    dedup: DuplicateCache,
    counters: Counters,
}

impl core::fmt::Debug for Engine {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Engine")
            .field("clients", &self.config.clients.len())
            .field("sessions", &self.store.len())
            .finish_non_exhaustive()
    }
}

impl Engine {
    pub fn new(
        config: Arc<EngineConfig>,
        store: Arc<dyn SessionStore>,
        data_plane: Arc<dyn DataPlane>,
    ) -> Self {
        Engine {
            dedup: DuplicateCache::new(config.dedup),
            counters: Counters::new(config.clients.len()),
            config,
            store,
            data_plane,
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn dedup_stats(&self) -> crate::dedup::DedupStats {
        self.dedup.stats()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.store
    }

    /// Decides one datagram that arrived from `source` on `destination` (the local address,
    /// which the answer must leave from). The answer, if any, is written to `out`, which
    /// should hold `codec::MAX_PACKET_LEN` octets.
    pub fn handle(
        &mut self,
        datagram: &[u8],
        source: SocketAddr,
        destination: SocketAddr,
        now: Now,
        out: &mut [u8],
    ) -> Outcome {
        // Split borrows: the shared configuration is read while this shard's cache and counters
        // are written, without touching the `Arc`'s reference count (a cache line every shard
        // would otherwise bounce on every packet).
        let Engine {
            config,
            store,
            data_plane,
            dedup,
            counters,
        } = self;
        let Some((client_id, client)) = config.clients.lookup(source.ip()) else {
            counters.unknown_client += 1;
            return Outcome::Discard(Discard::UnknownClient);
        };
        let shard = Shard {
            nas: &config.nas,
            store: &**store,
            data_plane: &**data_plane,
            dedup,
            counters,
        };
        let request = Arrival {
            datagram,
            source,
            destination,
            now,
            client_id,
            client,
        };
        match shard.handle(&request, out) {
            Ok(outcome) => outcome,
            Err(reason) => {
                if let Some(c) = counters.per_client.get_mut(client_id.0 as usize) {
                    c.discards[reason.index()] += 1;
                }
                Outcome::Discard(reason)
            }
        }
    }
}

/// One datagram from a known client.
struct Arrival<'a> {
    datagram: &'a [u8],
    source: SocketAddr,
    destination: SocketAddr,
    now: Now,
    client_id: ClientId,
    client: &'a Client,
}

/// What one call of `Engine::handle` works with: the shared parts by reference, this shard's
/// duplicate cache and counters mutably.
struct Shard<'a> {
    nas: &'a NasIdentity,
    store: &'a dyn SessionStore,
    data_plane: &'a dyn DataPlane,
    dedup: &'a mut DuplicateCache,
    counters: &'a mut Counters,
}

impl Shard<'_> {
    fn handle(self, arrival: &Arrival<'_>, out: &mut [u8]) -> Result<Outcome, Discard> {
        let Arrival {
            datagram,
            source,
            destination,
            now,
            client_id,
            client,
        } = *arrival;
        let packet = Packet::parse(datagram).map_err(|_| Discard::Malformed)?;
        let kind = match packet.code() {
            code::DISCONNECT_REQUEST => RequestKind::Disconnect,
            code::COA_REQUEST => RequestKind::Coa,
            _ => return Err(Discard::UnsupportedCode),
        };
        let ci = client_id.0 as usize;
        if let Some(c) = self.counters.per_client.get_mut(ci) {
            c.requests[kind as usize] += 1;
        }
        // Authenticate before the duplicate cache is consulted: the cache key covers only the
        // first 20 octets, so only a request whose Request Authenticator (over the whole
        // packet) verified may be matched against it.
        let secret = client
            .secrets()
            .find(|s| auth::request_authenticator_is_valid(&packet, s))
            .ok_or(Discard::BadRequestAuthenticator)?;
        let security = SecurityScan::of(&packet);
        check_message_authenticator(&packet, &security, client, secret)?;
        check_event_timestamp(&security, client, now)?;
        if security.proxy_states > usize::from(client.policy.max_proxy_states) {
            return Err(Discard::TooManyProxyStates);
        }
        let sign = match client.policy.answer_message_authenticator {
            AnswerSigning::Always => true,
            AnswerSigning::WhenRequested => security.message_authenticator.is_some(),
        };
        // Before any session is touched: a change must never be committed and then left
        // without an answer because the answer does not fit.
        let worst_case =
            worst_case_answer_len(security.echo_len, sign, client.policy.reply_message_reasons);
        if worst_case > out.len().min(codec::MAX_PACKET_LEN) {
            return Err(Discard::AnswerWouldNotFit);
        }

        let key = DuplicateKey::new(
            source,
            packet.code(),
            packet.identifier(),
            *packet.authenticator(),
        );
        match self.dedup.seen(&key, now.monotonic_ms) {
            Seen::New => {}
            Seen::InFlight => return Err(Discard::DuplicateInFlight),
            Seen::Answered(bytes) => {
                let len = bytes.len();
                let slot = out.get_mut(..len).ok_or(Discard::AnswerTooLarge)?;
                slot.copy_from_slice(bytes);
                if let Some(c) = self.counters.per_client.get_mut(ci) {
                    c.duplicates[kind as usize] += 1;
                }
                return Ok(Outcome::Replay { len });
            }
        }

        let window_ms = u64::from(client.policy.event_timestamp_window_secs) * 1000;
        let expires_ms = now.monotonic_ms.saturating_add(window_ms);
        // `handle` decides synchronously, so no other copy can arrive while this one is being
        // decided: the in-flight mark (`DuplicateCache::begin`) is for callers that hand a
        // request to an asynchronous data plane and answer later.
        let verdict = self.decide(kind, &packet, client, destination.ip(), now);
        let answer_code = match (kind, verdict.ack) {
            (RequestKind::Disconnect, true) => code::DISCONNECT_ACK,
            (RequestKind::Disconnect, false) => code::DISCONNECT_NAK,
            (RequestKind::Coa, true) => code::COA_ACK,
            (RequestKind::Coa, false) => code::COA_NAK,
        };
        let reason = (!verdict.ack && client.policy.reply_message_reasons)
            .then(|| verdict.error_cause.map(ErrorCause::reason))
            .flatten();
        let encoded = encode_answer(out, &packet, answer_code, &verdict, reason, sign, secret);
        let len = match encoded {
            Ok(len) => len,
            Err(_) => return Err(Discard::AnswerTooLarge),
        };
        if let Some(bytes) = out.get(..len) {
            self.dedup
                .complete(key, bytes, now.monotonic_ms, expires_ms);
        }
        if let Some(c) = self.counters.per_client.get_mut(ci) {
            let k = kind as usize;
            if verdict.ack {
                c.acks[k] += 1;
            } else if let Some(cause) = verdict.error_cause {
                c.naks[k][cause.index()] += 1;
            }
            match kind {
                RequestKind::Disconnect => c.sessions_removed += u64::from(verdict.sessions),
                RequestKind::Coa => c.sessions_changed += u64::from(verdict.sessions),
            }
            if verdict.echo_authorize_only {
                c.authorize_only_requests += 1;
            }
        }
        Ok(Outcome::Answer(Answer {
            len,
            code: answer_code,
            error_cause: verdict.error_cause,
            sessions: verdict.sessions,
        }))
    }

    /// The decision on an authenticated request (SPEC §5 to §8).
    fn decide(
        &self,
        kind: RequestKind,
        packet: &Packet<'_>,
        client: &Client,
        arrived_on: IpAddr,
        now: Now,
    ) -> Verdict {
        let request = match ParsedRequest::parse(kind, packet, self.nas, arrived_on) {
            Ok(r) => r,
            Err(cause) => return Verdict::nak(cause),
        };
        let policy = &client.policy;
        if let Some(st) = request.service_type {
            // SPEC §8: only Authorize Only is a service a CoA may request, and only when enabled.
            if st != service_type::AUTHORIZE_ONLY || !policy.authorize_only {
                return Verdict::nak(ErrorCause::UnsupportedService);
            }
            // RFC 5176 §3.2: an Authorize Only request carries no authorization changes.
            if !request.change.is_empty() {
                return Verdict::nak(ErrorCause::UnsupportedAttribute);
            }
        }
        match request.nas {
            NasCheck::Mismatch => return Verdict::nak(ErrorCause::NasIdentificationMismatch),
            NasCheck::Absent if policy.require_nas_identification => {
                return Verdict::nak(ErrorCause::MissingAttribute);
            }
            _ => {}
        }
        if !request.query.satisfies(policy.key_profile) {
            return Verdict::nak(ErrorCause::MissingAttribute);
        }
        let lookup = Lookup {
            query: request.query,
            scope: MatchScope {
                vrf: policy.vrf.as_deref(),
                max_sessions: policy.multi_session.max_sessions(),
            },
            now_ms: now.monotonic_ms,
        };
        let dp = self.data_plane;
        let result = match (kind, request.service_type) {
            (RequestKind::Disconnect, _) => self.store.disconnect(&lookup, dp),
            (RequestKind::Coa, Some(_)) => self.store.reauthorize(&lookup, dp),
            (RequestKind::Coa, None) => self.store.change(&lookup, &request.change, dp),
        };
        match (result, request.service_type) {
            (Ok(Applied::Sessions(n)), Some(_)) => Verdict {
                ack: false,
                error_cause: Some(ErrorCause::RequestInitiated),
                echo_authorize_only: true,
                sessions: n,
            },
            (Ok(Applied::Sessions(n)), None) => Verdict {
                ack: true,
                error_cause: None,
                echo_authorize_only: false,
                sessions: n,
            },
            (Ok(Applied::AlreadyRemoved), _) => Verdict {
                ack: true,
                error_cause: Some(ErrorCause::ResidualSessionContextRemoved),
                echo_authorize_only: false,
                sessions: 0,
            },
            (Err(refusal), _) => Verdict::nak(refusal_cause(refusal)),
        }
    }
}

/// The one Error-Cause for each store refusal.
fn refusal_cause(refusal: Refusal) -> ErrorCause {
    match refusal {
        Refusal::NotFound => ErrorCause::SessionContextNotFound,
        Refusal::Contradicted => ErrorCause::InvalidAttributeValue,
        Refusal::TooManySessions => ErrorCause::MultipleSessionSelectionUnsupported,
        Refusal::NotRemovable => ErrorCause::SessionContextNotRemovable,
        Refusal::Unavailable => ErrorCause::ResourcesUnavailable,
    }
}

/// What the security pass found: the Message-Authenticator, Event-Timestamp and Proxy-State
/// count, read before the request is trusted.
#[derive(Debug, Default)]
struct SecurityScan {
    /// Offset of the Message-Authenticator's value, when exactly one of 16 octets is present.
    message_authenticator: Option<usize>,
    /// More than one, or one of the wrong length.
    message_authenticator_malformed: bool,
    /// The first Event-Timestamp: its value, or `Err` for a wrong length.
    event_timestamp: Option<Result<u32, MalformedValue>>,
    proxy_states: usize,
    /// Octets the answer's echo takes: every State and Proxy-State, 2 octets of header each.
    echo_len: usize,
}

impl SecurityScan {
    fn of(packet: &Packet<'_>) -> Self {
        let mut scan = SecurityScan::default();
        for attribute in packet.attributes() {
            let Ok(a) = attribute else { break };
            match a.ty {
                attr::MESSAGE_AUTHENTICATOR => {
                    if scan.message_authenticator.is_some()
                        || a.value.len() != codec::AUTHENTICATOR_LEN
                    {
                        scan.message_authenticator_malformed = true;
                    }
                    scan.message_authenticator = Some(a.value_offset());
                }
                attr::EVENT_TIMESTAMP if scan.event_timestamp.is_none() => {
                    scan.event_timestamp = Some(codec::read_u32(a.value));
                }
                attr::PROXY_STATE => {
                    scan.proxy_states += 1;
                    scan.echo_len += 2 + a.value.len();
                }
                attr::STATE => scan.echo_len += 2 + a.value.len(),
                _ => {}
            }
        }
        scan
    }
}

/// The longest Reply-Message reason a NAK can carry.
const MAX_REASON_LEN: usize = {
    let mut max = 0;
    let mut i = 0;
    while i < ErrorCause::ALL.len() {
        let n = ErrorCause::ALL[i].reason().len();
        if n > max {
            max = n;
        }
        i += 1;
    }
    max
};

/// The largest answer `encode_answer` can write for a request whose echo (States and
/// Proxy-States with their headers) takes `echo_len` octets, whatever the verdict: header,
/// Message-Authenticator when signing, Service-Type, Error-Cause, the longest Reply-Message
/// reason when reasons are enabled, then the echo.
fn worst_case_answer_len(echo_len: usize, sign: bool, reasons: bool) -> usize {
    let message_authenticator = if sign {
        2 + codec::AUTHENTICATOR_LEN
    } else {
        0
    };
    let reply_message = if reasons { 2 + MAX_REASON_LEN } else { 0 };
    // Service-Type (507) and Error-Cause: 2 octets of header and a 4-octet integer each.
    const U32_ATTRIBUTE: usize = 2 + 4;
    codec::HEADER_LEN + message_authenticator + 2 * U32_ATTRIBUTE + reply_message + echo_len
}

/// SPEC §2.5 (RFC 5176 §3.4, RFC 3579 §3.2).
fn check_message_authenticator(
    packet: &Packet<'_>,
    scan: &SecurityScan,
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
fn check_event_timestamp(scan: &SecurityScan, client: &Client, now: Now) -> Result<(), Discard> {
    match scan.event_timestamp {
        Some(Ok(ts)) => {
            let window = u64::from(client.policy.event_timestamp_window_secs);
            if now.unix_secs.abs_diff(u64::from(ts)) > window {
                Err(Discard::EventTimestampOutsideWindow)
            } else {
                Ok(())
            }
        }
        Some(Err(_)) | None if client.policy.require_event_timestamp => {
            Err(Discard::MissingEventTimestamp)
        }
        Some(Err(_)) => Ok(()),
        None => Ok(()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NasCheck {
    Absent,
    Matches,
    Mismatch,
}

/// The first error of each class met while reading the attributes; the most fundamental wins
/// (framing, then unsupported attribute, then repetition, then bad value).
#[derive(Debug, Default, Clone, Copy)]
struct Errors {
    framing: bool,
    unsupported: bool,
    repeated: bool,
    malformed: bool,
}

impl Errors {
    fn first(&self) -> Option<ErrorCause> {
        if self.framing {
            Some(ErrorCause::InvalidRequest)
        } else if self.unsupported {
            Some(ErrorCause::UnsupportedAttribute)
        } else if self.repeated {
            Some(ErrorCause::InvalidRequest)
        } else if self.malformed {
            Some(ErrorCause::InvalidAttributeValue)
        } else {
            None
        }
    }
}

/// A request whose attributes all passed the rules of SPEC §7 and §8.
struct ParsedRequest<'a> {
    query: SessionQuery<'a>,
    nas: NasCheck,
    service_type: Option<u32>,
    change: AuthorizationChange<'a>,
}

/// Sets a single-valued slot, noting a repetition (RFC 5176 §3.6: these appear 0-1 times).
fn set_once<T>(slot: &mut Option<T>, value: Result<T, MalformedValue>, errors: &mut Errors) {
    if slot.is_some() {
        errors.repeated = true;
        return;
    }
    match value {
        Ok(v) => *slot = Some(v),
        Err(_) => errors.malformed = true,
    }
}

fn text(value: &[u8]) -> Result<&[u8], MalformedValue> {
    codec::read_nonempty(value)
}

fn utf8_text(value: &[u8]) -> Result<&[u8], MalformedValue> {
    let v = codec::read_nonempty(value)?;
    core::str::from_utf8(v).map_err(|_| MalformedValue)?;
    Ok(v)
}

impl<'a> ParsedRequest<'a> {
    fn parse(
        kind: RequestKind,
        packet: &Packet<'a>,
        nas: &NasIdentity,
        arrived_on: IpAddr,
    ) -> Result<Self, ErrorCause> {
        let coa = kind == RequestKind::Coa;
        let mut errors = Errors::default();
        let mut q = SessionQuery::default();
        let mut change = AuthorizationChange::new(*packet);
        let mut service_type = None;
        let mut state_seen = false;
        let mut nas_check = NasCheck::Absent;
        let mut nas_ip = None;
        let mut nas_ipv6 = None;
        let mut nas_id = None;
        let mut session_timeout = None;
        let mut idle_timeout = None;
        let mut interim = None;
        let mut event_timestamp_seen = false;
        let mut command_seen = false;

        for attribute in packet.attributes() {
            let a: Attribute<'a> = match attribute {
                Ok(a) => a,
                Err(_) => {
                    errors.framing = true;
                    break;
                }
            };
            let v = a.value;
            match a.ty {
                attr::USER_NAME => set_once(&mut q.user_name, text(v), &mut errors),
                attr::NAS_PORT => set_once(&mut q.nas_port, codec::read_u32(v), &mut errors),
                attr::FRAMED_IP_ADDRESS => {
                    set_once(&mut q.framed_ip, codec::read_ipv4(v), &mut errors)
                }
                attr::CALLED_STATION_ID => set_once(&mut q.called_station_id, text(v), &mut errors),
                attr::CALLING_STATION_ID => {
                    set_once(&mut q.calling_station_id, text(v), &mut errors)
                }
                attr::ACCT_SESSION_ID => set_once(&mut q.acct_session_id, text(v), &mut errors),
                attr::ACCT_MULTI_SESSION_ID => {
                    set_once(&mut q.acct_multi_session_id, text(v), &mut errors)
                }
                attr::NAS_PORT_ID => set_once(&mut q.nas_port_id, text(v), &mut errors),
                attr::CHARGEABLE_USER_IDENTITY => set_once(&mut q.cui, text(v), &mut errors),
                attr::FRAMED_INTERFACE_ID => set_once(
                    &mut q.framed_interface_id,
                    codec::read_interface_id(v),
                    &mut errors,
                ),
                attr::FRAMED_IPV6_PREFIX => set_once(
                    &mut q.framed_ipv6_prefix,
                    Ipv6Prefix::from_wire(v),
                    &mut errors,
                ),
                attr::NAS_IP_ADDRESS => set_once(&mut nas_ip, codec::read_ipv4(v), &mut errors),
                attr::NAS_IPV6_ADDRESS => set_once(&mut nas_ipv6, codec::read_ipv6(v), &mut errors),
                attr::NAS_IDENTIFIER => set_once(&mut nas_id, text(v), &mut errors),
                attr::PROXY_STATE => {
                    if v.is_empty() {
                        errors.malformed = true;
                    }
                }
                attr::STATE => {
                    if state_seen {
                        errors.repeated = true;
                    }
                    state_seen = true;
                    if v.is_empty() {
                        errors.malformed = true;
                    }
                }
                attr::EVENT_TIMESTAMP => {
                    if event_timestamp_seen {
                        errors.repeated = true;
                    }
                    event_timestamp_seen = true;
                    if codec::read_u32(v).is_err() {
                        errors.malformed = true;
                    }
                }
                // Checked (and verified) by the security pass.
                attr::MESSAGE_AUTHENTICATOR => {}
                attr::REPLY_MESSAGE => {
                    if utf8_text(v).is_err() {
                        errors.malformed = true;
                    }
                    change.replaces_reply_messages |= coa;
                }
                attr::CLASS => {
                    if v.is_empty() {
                        errors.malformed = true;
                    }
                    change.replaces_classes |= coa;
                }
                attr::SERVICE_TYPE if coa => {
                    set_once(&mut service_type, codec::read_u32(v), &mut errors)
                }
                attr::SESSION_TIMEOUT if coa => {
                    set_once(&mut session_timeout, codec::read_u32(v), &mut errors)
                }
                attr::IDLE_TIMEOUT if coa => {
                    set_once(&mut idle_timeout, codec::read_u32(v), &mut errors)
                }
                attr::ACCT_INTERIM_INTERVAL if coa => {
                    set_once(&mut interim, codec::read_u32(v), &mut errors)
                }
                attr::FILTER_ID if coa => {
                    if utf8_text(v).is_err() {
                        errors.malformed = true;
                    }
                    change.replaces_filter_ids = true;
                }
                attr::VENDOR_SPECIFIC => read_vendor_specific(
                    a,
                    coa,
                    &mut q,
                    &mut change,
                    &mut command_seen,
                    &mut errors,
                ),
                // Everything else, Service-Type and authorization attributes in a
                // Disconnect-Request included (SPEC §7), is unsupported.
                _ => errors.unsupported = true,
            }
        }
        if let Some(cause) = errors.first() {
            return Err(cause);
        }
        change.session_timeout = session_timeout;
        change.idle_timeout = idle_timeout;
        change.acct_interim_interval = interim;

        if nas_ip.is_some() || nas_ipv6.is_some() || nas_id.is_some() {
            let ok = nas_ip.is_none_or(|ip| nas.ipv4_matches(ip, arrived_on))
                && nas_ipv6.is_none_or(|ip| nas.ipv6_matches(ip, arrived_on))
                && nas_id.is_none_or(|id| nas.identifier_matches(id));
            nas_check = if ok {
                NasCheck::Matches
            } else {
                NasCheck::Mismatch
            };
        }
        Ok(ParsedRequest {
            query: q,
            nas: nas_check,
            service_type,
            change,
        })
    }
}

/// Vendor-Specific attributes: 3GPP IMSI/NSAPI and Cisco-AVPair; any other vendor or type is
/// unsupported (SPEC §7, §8).
fn read_vendor_specific<'a>(
    a: Attribute<'a>,
    coa: bool,
    q: &mut SessionQuery<'a>,
    change: &mut AuthorizationChange<'a>,
    command_seen: &mut bool,
    errors: &mut Errors,
) {
    let Some(vsa) = a.vendor_specific() else {
        errors.malformed = true;
        return;
    };
    if vsa.vendor_id != vendor::THREE_GPP && vsa.vendor_id != vendor::CISCO {
        errors.unsupported = true;
        return;
    }
    for sub in vsa.sub_attributes() {
        let Ok(sub) = sub else {
            errors.malformed = true;
            return;
        };
        match (vsa.vendor_id, sub.ty) {
            (vendor::THREE_GPP, vendor::THREE_GPP_IMSI) => {
                set_once(&mut q.imsi, text(sub.value), errors)
            }
            (vendor::THREE_GPP, vendor::THREE_GPP_NSAPI) => {
                set_once(&mut q.nsapi, text(sub.value), errors)
            }
            (vendor::CISCO, vendor::CISCO_AVPAIR) => match classify_cisco_avpair(sub.value) {
                CiscoAvPair::AuditSessionId(id) => {
                    set_once(&mut q.audit_session_id, text(id), errors)
                }
                CiscoAvPair::Command(_) | CiscoAvPair::Policy(_) if !coa => {
                    errors.unsupported = true
                }
                CiscoAvPair::Command(command) => {
                    if *command_seen {
                        errors.repeated = true;
                    }
                    *command_seen = true;
                    match command {
                        Some(c) => change.command = Some(c),
                        None => errors.malformed = true,
                    }
                }
                CiscoAvPair::Policy(p) => {
                    if core::str::from_utf8(p).is_err() {
                        errors.malformed = true;
                    }
                    change.replaces_cisco_policies = true;
                }
                CiscoAvPair::Malformed => errors.malformed = true,
            },
            _ => errors.unsupported = true,
        }
    }
}

/// Writes the answer (SPEC §9, RFC 5176 §3.5): Message-Authenticator first when signing,
/// Service-Type for 507, the Error-Cause, an optional Reply-Message, every State in order (a
/// request with several gets NAK 404, which still echoes them all), then every Proxy-State in
/// order; then the Message-Authenticator and the Response Authenticator.
fn encode_answer(
    out: &mut [u8],
    request: &Packet<'_>,
    answer_code: u8,
    verdict: &Verdict,
    reason: Option<&str>,
    sign: bool,
    secret: &Secret,
) -> Result<usize, WriteError> {
    let mut w = PacketWriter::new(
        out,
        answer_code,
        request.identifier(),
        request.authenticator(),
    )?;
    let ma_offset = if sign {
        Some(w.push(attr::MESSAGE_AUTHENTICATOR, &[0; 16])?)
    } else {
        None
    };
    if verdict.echo_authorize_only {
        w.push_u32(attr::SERVICE_TYPE, service_type::AUTHORIZE_ONLY)?;
    }
    if let Some(cause) = verdict.error_cause {
        w.push_u32(attr::ERROR_CAUSE, cause.value())?;
    }
    if let Some(reason) = reason {
        w.push(attr::REPLY_MESSAGE, reason.as_bytes())?;
    }
    let well_framed = || request.attributes().map_while(Result::ok);
    for state in well_framed().filter(|a| a.ty == attr::STATE) {
        w.push(attr::STATE, state.value)?;
    }
    for proxy_state in well_framed().filter(|a| a.ty == attr::PROXY_STATE) {
        w.push(attr::PROXY_STATE, proxy_state.value)?;
    }
    let packet = w.finish();
    let len = packet.len();
    auth::sign_response(packet, ma_offset, secret);
    Ok(len)
}
