//! RADIUS Accounting (RFC 2866) as a session feed: "zero-integration mode", where the
//! sessions are learnt from the accounting a NAS (or a RADIUS server copying it) sends.
//!
//! Owns: deciding one datagram from a known client: Accounting-Request only, its Request
//! Authenticator (RFC 2866 §3, against every live secret of the client) and its
//! Message-Authenticator when present (RFC 3579 §3.2); the mapping of Acct-Status-Type to a
//! [`FeedEvent`] for the NAS that sent it (NAS-Identifier, else NAS-IP-Address, else
//! NAS-IPv6-Address); the Accounting-Response (RFC 2866 §3 Response Authenticator,
//! Proxy-State echoed in order, Message-Authenticator when the request had one); and the
//! duplicate cache that answers a retransmission without applying it twice (RFC 5080
//! §2.2.2, the same [`DuplicateCache`] the DAS uses).
//!
//! The caller applies the event (through [`crate::feed::Feed::apply`]) and only then asks
//! for the answer, so an Accounting-Response always means "applied". A refused request gets
//! no answer and is counted by reason.
//!
//! Must not touch: sockets, clocks (time is passed in), the store and the feed's ordering.
//! Nothing here allocates per packet except the [`Session`] of an event.
#![forbid(unsafe_code)]

use core::fmt::Write as _;
use core::net::{IpAddr, SocketAddr};

use crate::auth::{self, Secret};
use crate::change::{CiscoAvPair, classify_cisco_avpair};
use crate::client::{Client, ClientId, ClientTable};
use crate::codec::{self, AUTHENTICATOR_LEN, HEADER_LEN, Ipv6Prefix, Packet, PacketWriter};
use crate::dedup::{DedupConfig, DedupStats, DuplicateCache, DuplicateKey, Seen};
use crate::dict::{acct_status, attr, code, vendor};
use crate::feed::{FeedEvent, Sequenced};
use crate::session::{Key, Session, SessionQuery};
use crate::store::UpsertMode;

/// Why an accounting datagram got no answer (each is counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refused {
    /// The source is not a configured client.
    UnknownClient,
    /// Not a RADIUS packet (RFC 2865 §3 length rules).
    Malformed,
    /// Not an Accounting-Request.
    UnsupportedCode,
    /// RFC 2866 §3: the Request Authenticator verifies with no live secret.
    BadRequestAuthenticator,
    /// RFC 3579 §3.2: the Message-Authenticator is wrong, malformed or repeated.
    BadMessageAuthenticator,
    /// The client requires a Message-Authenticator and there is none.
    MissingMessageAuthenticator,
    /// More Proxy-State attributes than the client's cap.
    TooManyProxyStates,
    /// The Accounting-Response would not fit in 4096 octets or the caller's buffer.
    AnswerWouldNotFit,
    /// RFC 2866 §5.1: Acct-Status-Type absent, repeated or not 4 octets.
    BadStatusType,
    /// RFC 2866 §4.1: none of NAS-Identifier, NAS-IP-Address, NAS-IPv6-Address.
    MissingNasIdentification,
    /// RFC 2866 §5.5: a Start, Interim-Update or Stop without Acct-Session-Id.
    MissingAcctSessionId,
    /// An identification or NAS attribute repeated, of the wrong length, or text that is not
    /// UTF-8; or the attributes' framing is broken.
    InvalidAttribute,
    /// The feed refused the event (reported by the caller through
    /// [`Accounting::refuse`]).
    FeedRefused,
}

impl Refused {
    pub const ALL: [Refused; 13] = [
        Refused::UnknownClient,
        Refused::Malformed,
        Refused::UnsupportedCode,
        Refused::BadRequestAuthenticator,
        Refused::BadMessageAuthenticator,
        Refused::MissingMessageAuthenticator,
        Refused::TooManyProxyStates,
        Refused::AnswerWouldNotFit,
        Refused::BadStatusType,
        Refused::MissingNasIdentification,
        Refused::MissingAcctSessionId,
        Refused::InvalidAttribute,
        Refused::FeedRefused,
    ];

    /// Index into [`Refused::ALL`] (dense, for counter arrays).
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }

    /// A stable snake_case name for logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Refused::UnknownClient => "unknown_client",
            Refused::Malformed => "malformed",
            Refused::UnsupportedCode => "unsupported_code",
            Refused::BadRequestAuthenticator => "bad_request_authenticator",
            Refused::BadMessageAuthenticator => "bad_message_authenticator",
            Refused::MissingMessageAuthenticator => "missing_message_authenticator",
            Refused::TooManyProxyStates => "too_many_proxy_states",
            Refused::AnswerWouldNotFit => "answer_would_not_fit",
            Refused::BadStatusType => "bad_status_type",
            Refused::MissingNasIdentification => "missing_nas_identification",
            Refused::MissingAcctSessionId => "missing_acct_session_id",
            Refused::InvalidAttribute => "invalid_attribute",
            Refused::FeedRefused => "feed_refused",
        }
    }
}

/// The Acct-Status-Type of a request (RFC 2866 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Start,
    InterimUpdate,
    Stop,
    AccountingOn,
    AccountingOff,
    /// Any other value (the tunnel values of RFC 2867, Failed, ...): answered, nothing
    /// applied.
    Other(u32),
}

impl Status {
    pub const fn from_value(v: u32) -> Status {
        match v {
            acct_status::START => Status::Start,
            acct_status::INTERIM_UPDATE => Status::InterimUpdate,
            acct_status::STOP => Status::Stop,
            acct_status::ACCOUNTING_ON => Status::AccountingOn,
            acct_status::ACCOUNTING_OFF => Status::AccountingOff,
            other => Status::Other(other),
        }
    }

    /// Whether the status is about one session (and so needs an Acct-Session-Id).
    pub const fn is_per_session(self) -> bool {
        matches!(self, Status::Start | Status::InterimUpdate | Status::Stop)
    }
}

/// Counters of the accounting feed (exported as metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountingStats {
    /// Datagrams decided.
    pub received: u64,
    /// New (not duplicate) requests accepted, by status.
    pub starts: u64,
    pub interims: u64,
    pub stops: u64,
    /// Accounting-On and Accounting-Off.
    pub nas_resets: u64,
    /// Other Acct-Status-Type values: answered, nothing applied.
    pub ignored: u64,
    /// Events the caller applied and then answered.
    pub applied: u64,
    /// Accounting-Responses written for new requests.
    pub answered: u64,
    /// Retransmissions answered from the duplicate cache, not applied again.
    pub duplicates: u64,
    /// Refusals (no answer) by reason, indexed as [`Refused::ALL`].
    pub refused: [u64; Refused::ALL.len()],
}

impl AccountingStats {
    /// Adds another listener's counters (one exposition for every listener).
    pub fn add(&mut self, o: &AccountingStats) {
        self.received += o.received;
        self.starts += o.starts;
        self.interims += o.interims;
        self.stops += o.stops;
        self.nas_resets += o.nas_resets;
        self.ignored += o.ignored;
        self.applied += o.applied;
        self.answered += o.answered;
        self.duplicates += o.duplicates;
        for (total, n) in self.refused.iter_mut().zip(o.refused) {
            *total += n;
        }
    }

    pub fn refused_total(&self) -> u64 {
        self.refused.iter().sum()
    }

    /// The counters in the Prometheus text exposition format, appended to `out`.
    pub fn write_prometheus(&self, out: &mut String) {
        let simple: [(&str, &str, u64); 4] = [
            (
                "dynauth_accounting_received_total",
                "Accounting datagrams received",
                self.received,
            ),
            (
                "dynauth_accounting_applied_total",
                "Accounting events applied to the session store",
                self.applied,
            ),
            (
                "dynauth_accounting_answered_total",
                "Accounting-Responses sent for new requests",
                self.answered,
            ),
            (
                "dynauth_accounting_duplicates_total",
                "Retransmissions answered from the duplicate cache",
                self.duplicates,
            ),
        ];
        for (name, help, value) in simple {
            let _ = writeln!(
                out,
                "# HELP {name} {help}.\n# TYPE {name} counter\n{name} {value}"
            );
        }
        let name = "dynauth_accounting_requests_total";
        let _ = writeln!(
            out,
            "# HELP {name} New Accounting-Requests by Acct-Status-Type.\n# TYPE {name} counter"
        );
        for (status, value) in [
            ("start", self.starts),
            ("interim_update", self.interims),
            ("stop", self.stops),
            ("accounting_on_off", self.nas_resets),
            ("other", self.ignored),
        ] {
            let _ = writeln!(out, "{name}{{status=\"{status}\"}} {value}");
        }
        let name = "dynauth_accounting_refused_total";
        let _ = writeln!(
            out,
            "# HELP {name} Accounting datagrams left unanswered, by reason.\n# TYPE {name} counter"
        );
        for reason in Refused::ALL {
            let value = self.refused[reason.index()];
            let _ = writeln!(out, "{name}{{reason=\"{}\"}} {value}", reason.name());
        }
    }

    /// Per-client counters (RFC 4671's radiusAccClientExt* set, as Prometheus series with a
    /// `client` label) appended to `out`: `per_client[i]` is labelled `client_names[i]`.
    /// A client that sent nothing has no series; a name is escaped as the format requires.
    pub fn write_prometheus_per_client(
        per_client: &[AccountingStats],
        client_names: &[&str],
        out: &mut String,
    ) {
        let clients: Vec<(String, &AccountingStats)> = per_client
            .iter()
            .enumerate()
            .filter(|(_, c)| c.received > 0)
            .map(|(i, c)| {
                let name = client_names.get(i).copied().unwrap_or("unnamed");
                (name.replace('\\', "\\\\").replace('"', "\\\""), c)
            })
            .collect();
        type Field = fn(&AccountingStats) -> u64;
        let simple: [(&str, &str, Field); 4] = [
            (
                "dynauth_accounting_client_received_total",
                "Accounting datagrams received, per client (radiusAccClientExtRequests with the refused ones)",
                |c| c.received,
            ),
            (
                "dynauth_accounting_client_applied_total",
                "Accounting events applied to the session store, per client",
                |c| c.applied,
            ),
            (
                "dynauth_accounting_client_answered_total",
                "Accounting-Responses sent for new requests, per client (radiusAccClientExtResponses without the duplicates)",
                |c| c.answered,
            ),
            (
                "dynauth_accounting_client_duplicates_total",
                "Retransmissions answered from the duplicate cache, per client (radiusAccClientExtDupRequests)",
                |c| c.duplicates,
            ),
        ];
        for (name, help, value) in simple {
            let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} counter");
            for (client, c) in &clients {
                let _ = writeln!(out, "{name}{{client=\"{client}\"}} {}", value(c));
            }
        }
        let name = "dynauth_accounting_client_requests_total";
        let _ = writeln!(
            out,
            "# HELP {name} New Accounting-Requests by Acct-Status-Type, per client.\n# TYPE {name} counter"
        );
        for (client, c) in &clients {
            for (status, value) in [
                ("start", c.starts),
                ("interim_update", c.interims),
                ("stop", c.stops),
                ("accounting_on_off", c.nas_resets),
                ("other", c.ignored),
            ] {
                let _ = writeln!(
                    out,
                    "{name}{{client=\"{client}\",status=\"{status}\"}} {value}"
                );
            }
        }
        let name = "dynauth_accounting_client_refused_total";
        let _ = writeln!(
            out,
            "# HELP {name} Accounting datagrams left unanswered, by reason, per client (radiusAccClientExtMalformedRequests, ...BadAuthenticators, ...PacketsDropped, ...UnknownTypes, ...NoRecords).\n# TYPE {name} counter"
        );
        for (client, c) in &clients {
            for reason in Refused::ALL {
                let value = c.refused[reason.index()];
                let _ = writeln!(
                    out,
                    "{name}{{client=\"{client}\",reason=\"{}\"}} {value}",
                    reason.name()
                );
            }
        }
    }
}

/// The default sizing of the accounting duplicate cache: accounting rates are far below
/// CoA rates, and an Accounting-Response is small.
pub const DEFAULT_DEDUP: DedupConfig = DedupConfig {
    max_entries: 16_384,
    arena_bytes: 1 << 20,
    max_in_flight: 1,
};

/// A verified Accounting-Request, waiting for its event to be applied. Only
/// [`Accounting::receive`] builds one; [`Accounting::answer`] or [`Accounting::refuse`]
/// consumes it.
#[derive(Debug)]
pub struct Request<'a> {
    packet: Packet<'a>,
    client: &'a Client,
    client_id: ClientId,
    secret: &'a Secret,
    key: DuplicateKey,
    status: Status,
    /// The request carried a (verified) Message-Authenticator: the answer carries one.
    message_authenticator: bool,
    answer_len: usize,
    has_event: bool,
}

impl<'a> Request<'a> {
    pub fn status(&self) -> Status {
        self.status
    }

    pub fn identifier(&self) -> u8 {
        self.packet.identifier()
    }

    pub fn source(&self) -> SocketAddr {
        self.key.source
    }

    /// The client's name (for logs; never its secret).
    pub fn client_name(&self) -> &'a str {
        &self.client.name
    }

    /// The length the Accounting-Response will have.
    pub fn answer_len(&self) -> usize {
        self.answer_len
    }
}

/// A new request: the event to apply (none for an Acct-Status-Type that changes nothing),
/// then [`Accounting::answer`] the request.
#[derive(Debug)]
pub struct Accepted<'a> {
    pub event: Option<Sequenced>,
    pub request: Request<'a>,
}

/// What to do with one datagram.
// Returned by value once per datagram and matched at once, never stored: boxing the large
// variant would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Received<'c, 'a> {
    /// No answer (counted).
    Refused(Refused),
    /// A retransmission of an answered request: send these bytes again, apply nothing.
    Duplicate(&'c [u8]),
    /// Apply the event, then answer (or refuse, when the feed refused it).
    Accepted(Accepted<'a>),
}

/// The accounting decisions of one listener: its duplicate cache and its counters.
#[derive(Debug)]
pub struct Accounting {
    cache: DuplicateCache,
    tally: Tally,
}

/// The listener's counters: the totals, and the same per client, indexed by `ClientId`
/// (RFC 4671's per-client radiusAccClientExt* set); a datagram from no client counts in the
/// totals only.
#[derive(Debug, Default)]
struct Tally {
    totals: AccountingStats,
    per_client: Vec<AccountingStats>,
    /// The client row the last count went to (a reader copies only what changed).
    last: Option<usize>,
}

impl Tally {
    /// Applies `what` to the totals and to `client`'s counters (grown to hold it: an
    /// allocation the first time a client is seen, never per datagram after that).
    fn count(&mut self, client: Option<ClientId>, what: impl Fn(&mut AccountingStats)) {
        what(&mut self.totals);
        self.last = None;
        let Some(ClientId(id)) = client else { return };
        let Ok(at) = usize::try_from(id) else { return };
        self.last = Some(at);
        if self.per_client.len() <= at {
            self.per_client.resize(at + 1, AccountingStats::default());
        }
        if let Some(slot) = self.per_client.get_mut(at) {
            what(slot);
        }
    }

    fn refused<'c, 'a>(&mut self, client: Option<ClientId>, reason: Refused) -> Received<'c, 'a> {
        self.count(client, |s| s.refused[reason.index()] += 1);
        Received::Refused(reason)
    }
}

impl Default for Accounting {
    fn default() -> Self {
        Accounting::new(DEFAULT_DEDUP)
    }
}

impl Accounting {
    pub fn new(duplicates: DedupConfig) -> Self {
        Accounting {
            cache: DuplicateCache::new(duplicates),
            tally: Tally::default(),
        }
    }

    pub fn stats(&self) -> AccountingStats {
        self.tally.totals
    }

    /// The counters per client, indexed by `ClientId` of the table the datagrams were
    /// decided with; clients that never sent anything may be missing at the end.
    pub fn client_stats(&self) -> &[AccountingStats] {
        &self.tally.per_client
    }

    /// The client row the last datagram was counted in (its index and counters), if it
    /// came from a client: what changed since the one before, besides the totals.
    pub fn last_client_stats(&self) -> Option<(usize, AccountingStats)> {
        let at = self.tally.last?;
        self.tally.per_client.get(at).map(|s| (at, *s))
    }

    pub fn duplicate_stats(&self) -> DedupStats {
        self.cache.stats()
    }

    /// Decides one datagram that arrived from `source` at monotonic time `now_ms`; its
    /// answer must fit in `answer_capacity` octets.
    pub fn receive<'c, 'a>(
        &'c mut self,
        datagram: &'a [u8],
        source: SocketAddr,
        clients: &'a ClientTable,
        now_ms: u64,
        answer_capacity: usize,
    ) -> Received<'c, 'a> {
        let client = clients.lookup(source.ip());
        let client_id = client.map(|(id, _)| id);
        self.tally.count(client_id, |s| s.received += 1);
        let (request, scan) = match verify(datagram, source, client, answer_capacity) {
            Ok(verified) => verified,
            Err(reason) => return self.tally.refused(client_id, reason),
        };
        // The key covers only the header: it is looked up once the whole packet verified.
        if let Seen::Answered(bytes) = self.cache.seen_key(&request.key, now_ms) {
            self.tally.count(client_id, |s| s.duplicates += 1);
            return Received::Duplicate(bytes);
        }
        let event = match event(&request, &scan) {
            Ok(event) => event,
            Err(reason) => return self.tally.refused(client_id, reason),
        };
        let status = request.status;
        self.tally.count(client_id, |s| match status {
            Status::Start => s.starts += 1,
            Status::InterimUpdate => s.interims += 1,
            Status::Stop => s.stops += 1,
            Status::AccountingOn | Status::AccountingOff => s.nas_resets += 1,
            Status::Other(_) => s.ignored += 1,
        });
        let request = Request {
            has_event: event.is_some(),
            ..request
        };
        Received::Accepted(Accepted { event, request })
    }

    /// Writes the Accounting-Response to `request` into `buf` (once its event was applied),
    /// caches it for retransmissions, and returns its length.
    pub fn answer(
        &mut self,
        request: Request<'_>,
        buf: &mut [u8],
        now_ms: u64,
    ) -> Result<usize, Refused> {
        let client = Some(request.client_id);
        let Some(len) = write_answer(&request, buf) else {
            self.tally.count(client, |s| {
                s.refused[Refused::AnswerWouldNotFit.index()] += 1
            });
            return Err(Refused::AnswerWouldNotFit);
        };
        let window_ms = u64::from(request.client.policy.event_timestamp_window_secs) * 1_000;
        let answer = buf.get(..len).unwrap_or_default();
        self.cache.complete_key(
            request.key,
            answer,
            now_ms,
            now_ms.saturating_add(window_ms),
        );
        let applied = u64::from(request.has_event);
        self.tally.count(client, |s| {
            s.answered += 1;
            s.applied += applied;
        });
        Ok(len)
    }

    /// The request's event was not applied: no answer (counted as `reason`).
    pub fn refuse(&mut self, request: Request<'_>, reason: Refused) {
        self.tally
            .count(Some(request.client_id), |s| s.refused[reason.index()] += 1);
    }
}

/// What the one walk over the attributes found.
#[derive(Debug, Default)]
struct Scan<'a> {
    status: Option<u32>,
    nas_identifier: Option<&'a [u8]>,
    nas_ip: Option<core::net::Ipv4Addr>,
    nas_ipv6: Option<core::net::Ipv6Addr>,
    keys: SessionQuery<'a>,
    session_timeout: Option<u32>,
    idle_timeout: Option<u32>,
    interim: Option<u32>,
    message_authenticator: Option<usize>,
    message_authenticator_malformed: bool,
    proxy_states: usize,
    proxy_states_len: usize,
    bad_status: bool,
    invalid: bool,
}

/// Sets a single-valued slot; a repetition or a malformed value makes the request invalid.
fn set_once<T>(slot: &mut Option<T>, value: Result<T, codec::MalformedValue>, invalid: &mut bool) {
    match value {
        Ok(v) if slot.is_none() => *slot = Some(v),
        _ => *invalid = true,
    }
}

/// A text key: UTF-8 (the session stores strings). An empty value counts as absent
/// (RFC 2865 §5: zero-length values should not be sent; some NASes do).
fn set_text<'a>(slot: &mut Option<&'a [u8]>, value: &'a [u8], invalid: &mut bool) {
    if value.is_empty() {
        return;
    }
    let text = core::str::from_utf8(value)
        .map(|_| value)
        .map_err(|_| codec::MalformedValue);
    set_once(slot, text, invalid);
}

impl<'a> Scan<'a> {
    fn of(packet: &Packet<'a>) -> Self {
        let mut s = Scan::default();
        for attribute in packet.attributes() {
            let Ok(a) = attribute else {
                s.invalid = true;
                break;
            };
            let v = a.value;
            let invalid = &mut s.invalid;
            let q = &mut s.keys;
            match a.ty {
                attr::ACCT_STATUS_TYPE => {
                    let mut bad = false;
                    set_once(&mut s.status, codec::read_u32(v), &mut bad);
                    s.bad_status |= bad;
                }
                attr::MESSAGE_AUTHENTICATOR => {
                    if s.message_authenticator.is_some() || v.len() != AUTHENTICATOR_LEN {
                        s.message_authenticator_malformed = true;
                    }
                    s.message_authenticator = Some(a.value_offset());
                }
                attr::PROXY_STATE => {
                    s.proxy_states += 1;
                    s.proxy_states_len += 2 + v.len();
                }
                attr::NAS_IDENTIFIER => set_text(&mut s.nas_identifier, v, invalid),
                attr::NAS_IP_ADDRESS => set_once(&mut s.nas_ip, codec::read_ipv4(v), invalid),
                attr::NAS_IPV6_ADDRESS => set_once(&mut s.nas_ipv6, codec::read_ipv6(v), invalid),
                attr::ACCT_SESSION_ID => set_text(&mut q.acct_session_id, v, invalid),
                attr::ACCT_MULTI_SESSION_ID => set_text(&mut q.acct_multi_session_id, v, invalid),
                attr::USER_NAME => set_text(&mut q.user_name, v, invalid),
                attr::CHARGEABLE_USER_IDENTITY => set_text(&mut q.cui, v, invalid),
                attr::CALLED_STATION_ID => set_text(&mut q.called_station_id, v, invalid),
                attr::CALLING_STATION_ID => set_text(&mut q.calling_station_id, v, invalid),
                attr::NAS_PORT_ID => set_text(&mut q.nas_port_id, v, invalid),
                attr::NAS_PORT => set_once(&mut q.nas_port, codec::read_u32(v), invalid),
                attr::FRAMED_IP_ADDRESS => set_once(&mut q.framed_ip, codec::read_ipv4(v), invalid),
                attr::FRAMED_IPV6_PREFIX => {
                    set_once(&mut q.framed_ipv6_prefix, Ipv6Prefix::from_wire(v), invalid)
                }
                attr::FRAMED_INTERFACE_ID => set_once(
                    &mut q.framed_interface_id,
                    codec::read_interface_id(v),
                    invalid,
                ),
                // Authorization values are kept when well formed and ignored otherwise: they
                // identify nothing, and a session is worth more than its Session-Timeout.
                attr::SESSION_TIMEOUT => s.session_timeout = codec::read_u32(v).ok(),
                attr::IDLE_TIMEOUT => s.idle_timeout = codec::read_u32(v).ok(),
                attr::ACCT_INTERIM_INTERVAL => s.interim = codec::read_u32(v).ok(),
                attr::VENDOR_SPECIFIC => {
                    let Some(vsa) = a.vendor_specific() else {
                        continue;
                    };
                    if vsa.vendor_id != vendor::THREE_GPP && vsa.vendor_id != vendor::CISCO {
                        continue;
                    }
                    for sub in vsa.sub_attributes() {
                        let Ok(sub) = sub else {
                            *invalid = true;
                            break;
                        };
                        match (vsa.vendor_id, sub.ty) {
                            (vendor::THREE_GPP, vendor::THREE_GPP_IMSI) => {
                                set_text(&mut q.imsi, sub.value, invalid)
                            }
                            (vendor::THREE_GPP, vendor::THREE_GPP_NSAPI) => {
                                set_text(&mut q.nsapi, sub.value, invalid)
                            }
                            (vendor::CISCO, vendor::CISCO_AVPAIR) => {
                                if let CiscoAvPair::AuditSessionId(id) =
                                    classify_cisco_avpair(sub.value)
                                {
                                    set_text(&mut q.audit_session_id, id, invalid);
                                }
                            }
                            _ => {}
                        }
                    }
                }
                // Counters, Event-Timestamp (often old when a detail file is replayed),
                // Acct-Delay-Time, Class and Filter-Id (read when the session is built), ...
                _ => {}
            }
        }
        s
    }

    /// The NAS, as the feed keys it: NAS-Identifier, else NAS-IP-Address, else
    /// NAS-IPv6-Address, as text.
    fn nas(&self) -> Option<String> {
        if let Some(id) = self.nas_identifier {
            return core::str::from_utf8(id).ok().map(str::to_owned);
        }
        self.nas_ip
            .map(IpAddr::V4)
            .or(self.nas_ipv6.map(IpAddr::V6))
            .map(|ip| ip.to_string())
    }
}

/// Every check before the duplicate cache, in order: framing, client, code, Request
/// Authenticator, Message-Authenticator, Proxy-State cap, answer size, and what the event
/// needs (Acct-Status-Type, NAS, Acct-Session-Id).
fn verify<'a>(
    datagram: &'a [u8],
    source: SocketAddr,
    client: Option<(ClientId, &'a Client)>,
    answer_capacity: usize,
) -> Result<(Request<'a>, Scan<'a>), Refused> {
    let packet = Packet::parse(datagram).map_err(|_| Refused::Malformed)?;
    let (client_id, client) = client.ok_or(Refused::UnknownClient)?;
    if packet.code() != code::ACCOUNTING_REQUEST {
        return Err(Refused::UnsupportedCode);
    }
    // RFC 2866 §3: MD5(Code + Identifier + Length + 16 zero octets + Attributes + Secret),
    // with every live secret (rollover), before anything in the packet is trusted.
    let secret = client
        .secrets()
        .find(|s| auth::request_authenticator_is_valid(&packet, s))
        .ok_or(Refused::BadRequestAuthenticator)?;
    let scan = Scan::of(&packet);
    if scan.message_authenticator_malformed {
        return Err(Refused::BadMessageAuthenticator);
    }
    match scan.message_authenticator {
        // RFC 3579 §3.2, as in an Accounting-Request: computed with 16 zero octets in the
        // Authenticator field.
        Some(offset) if !auth::request_message_authenticator_is_valid(&packet, offset, secret) => {
            return Err(Refused::BadMessageAuthenticator);
        }
        None if client.policy.require_message_authenticator => {
            return Err(Refused::MissingMessageAuthenticator);
        }
        _ => {}
    }
    if scan.proxy_states > usize::from(client.policy.max_proxy_states) {
        return Err(Refused::TooManyProxyStates);
    }
    let signed = scan.message_authenticator.is_some();
    let answer_len = HEADER_LEN + scan.proxy_states_len + if signed { 18 } else { 0 };
    if answer_len > answer_capacity.min(codec::MAX_PACKET_LEN) {
        return Err(Refused::AnswerWouldNotFit);
    }
    let status = match scan.status {
        Some(v) if !scan.bad_status => Status::from_value(v),
        _ => return Err(Refused::BadStatusType),
    };
    if scan.invalid {
        return Err(Refused::InvalidAttribute);
    }
    if scan.nas_identifier.is_none() && scan.nas_ip.is_none() && scan.nas_ipv6.is_none() {
        return Err(Refused::MissingNasIdentification);
    }
    if status.is_per_session() && scan.keys.acct_session_id.is_none() {
        return Err(Refused::MissingAcctSessionId);
    }
    let request = Request {
        packet,
        client,
        client_id,
        secret,
        key: DuplicateKey::new(
            source,
            packet.code(),
            packet.identifier(),
            *packet.authenticator(),
        ),
        status,
        message_authenticator: signed,
        answer_len,
        has_event: false,
    };
    Ok((request, scan))
}

/// The feed event of a verified request (allocates its `Session`).
fn event(request: &Request<'_>, scan: &Scan<'_>) -> Result<Option<Sequenced>, Refused> {
    let nas = scan.nas();
    let event = match request.status {
        Status::Start | Status::InterimUpdate => {
            let mode = if request.status == Status::Start {
                UpsertMode::Create
            } else {
                UpsertMode::Refresh
            };
            FeedEvent::Upsert {
                session: session(&request.packet, scan)?,
                mode,
            }
        }
        Status::Stop => FeedEvent::Delete {
            acct_session_id: scan
                .keys
                .acct_session_id
                .and_then(|id| core::str::from_utf8(id).ok())
                .ok_or(Refused::MissingAcctSessionId)?
                .to_owned(),
        },
        Status::AccountingOn | Status::AccountingOff => FeedEvent::NasReset,
        Status::Other(_) => return Ok(None),
    };
    Ok(Some(Sequenced {
        nas,
        seq: None,
        event,
    }))
}

/// The session the request describes: every identification key present, and the simple
/// authorization values (Session-Timeout, Idle-Timeout, Acct-Interim-Interval, Class,
/// Filter-Id). The feed sets its `nas`.
fn session(packet: &Packet<'_>, scan: &Scan<'_>) -> Result<Session, Refused> {
    let mut session = Session::default();
    for key in Key::ALL {
        session
            .set(key, scan.keys.get(key))
            .map_err(|_| Refused::InvalidAttribute)?;
    }
    let a = &mut session.authorization;
    a.session_timeout = scan.session_timeout;
    a.idle_timeout = scan.idle_timeout;
    a.acct_interim_interval = scan.interim;
    for attribute in packet.attributes().map_while(Result::ok) {
        match attribute.ty {
            attr::CLASS if !attribute.value.is_empty() => {
                a.classes.push(attribute.value.to_vec());
            }
            attr::FILTER_ID => {
                if let Ok(text) = core::str::from_utf8(attribute.value)
                    && !text.is_empty()
                {
                    a.filter_ids.push(text.to_owned());
                }
            }
            _ => {}
        }
    }
    Ok(session)
}

/// The Accounting-Response (RFC 2866 §3): code 5, the request's Identifier, the
/// Message-Authenticator first when the request had one, every Proxy-State in order
/// (RFC 2865 §5.33); signed with the Message-Authenticator, then the Response Authenticator
/// (MD5(Code + Identifier + Length + Request Authenticator + Attributes + Secret)).
fn write_answer(request: &Request<'_>, buf: &mut [u8]) -> Option<usize> {
    let packet = &request.packet;
    let mut w = PacketWriter::new(
        buf,
        code::ACCOUNTING_RESPONSE,
        packet.identifier(),
        packet.authenticator(),
    )
    .ok()?;
    let ma = if request.message_authenticator {
        Some(
            w.push(attr::MESSAGE_AUTHENTICATOR, &[0; AUTHENTICATOR_LEN])
                .ok()?,
        )
    } else {
        None
    };
    for a in packet.attributes().map_while(Result::ok) {
        if a.ty == attr::PROXY_STATE {
            w.push(attr::PROXY_STATE, a.value).ok()?;
        }
    }
    let out = w.finish();
    let len = out.len();
    // The Message-Authenticator first, over the packet with 16 zero octets in the
    // Authenticator field, as for the Accounting-Request: RFC 3579 §3.2 defines only the
    // Access-* answers, and this is what FreeRADIUS (radclient, the `replicate` module, the
    // detail-file reader) computes and checks for an Accounting-Response. Then the Response
    // Authenticator over the finished packet.
    if let Some(offset) = ma {
        let value = auth::message_authenticator(out, &ZERO, offset, request.secret);
        out.get_mut(offset..offset + AUTHENTICATOR_LEN)?
            .copy_from_slice(&value);
    }
    let response = auth::md5_authenticator(out, packet.authenticator(), request.secret);
    out.get_mut(4..HEADER_LEN)?.copy_from_slice(&response);
    Some(len)
}

const ZERO: auth::Authenticator = [0; AUTHENTICATOR_LEN];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{ResponseCheck, verify_response};
    use crate::client::Cidr;
    use crate::feed::{Feed, FeedOutcome};
    use crate::store::{MemoryStore, SessionStore, TombstonePolicy, Upserted};
    use core::net::Ipv4Addr;
    use md5::{Digest, Md5};

    const SECRET: &str = "acct-secret";

    fn src() -> SocketAddr {
        "192.0.2.10:40000".parse().unwrap()
    }

    fn clients() -> ClientTable {
        let net: Cidr = "192.0.2.0/24".parse().unwrap();
        let mut c = Client::new(net, Secret::new(SECRET).unwrap());
        c.previous_secret = Some(Secret::new("old-secret").unwrap());
        c.name = "bng-acct".into();
        ClientTable::new([c]).unwrap()
    }

    /// An Accounting-Request signed with `secret` (Message-Authenticator first if `ma`).
    fn request(id: u8, attrs: &[(u8, &[u8])], ma: bool, secret: &str) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        let mut w = PacketWriter::new(&mut buf, code::ACCOUNTING_REQUEST, id, &[0; 16]).unwrap();
        let offset = ma.then(|| w.push(attr::MESSAGE_AUTHENTICATOR, &[0; 16]).unwrap());
        for (ty, v) in attrs {
            w.push(*ty, v).unwrap();
        }
        let out = w.finish();
        auth::sign_request(out, offset, &Secret::new(secret).unwrap());
        out.to_vec()
    }

    fn status(v: u32) -> (u8, Vec<u8>) {
        (attr::ACCT_STATUS_TYPE, v.to_be_bytes().to_vec())
    }

    fn start_attrs() -> Vec<(u8, Vec<u8>)> {
        vec![
            status(acct_status::START),
            (attr::NAS_IDENTIFIER, b"bng1".to_vec()),
            (attr::NAS_IP_ADDRESS, vec![192, 0, 2, 1]),
            (attr::ACCT_SESSION_ID, b"s-1".to_vec()),
            (attr::USER_NAME, b"alice".to_vec()),
            (attr::FRAMED_IP_ADDRESS, vec![10, 0, 0, 7]),
            (attr::PROXY_STATE, b"p1".to_vec()),
            (attr::PROXY_STATE, b"p2".to_vec()),
        ]
    }

    fn borrow(attrs: &[(u8, Vec<u8>)]) -> Vec<(u8, &[u8])> {
        attrs.iter().map(|(t, v)| (*t, v.as_slice())).collect()
    }

    /// Decides `datagram` and, when accepted, answers it; returns the event and the answer.
    fn decide(
        acct: &mut Accounting,
        clients: &ClientTable,
        datagram: &[u8],
    ) -> Result<(Option<Sequenced>, Vec<u8>), Refused> {
        let mut buf = [0u8; 4096];
        match acct.receive(datagram, src(), clients, 1_000, buf.len()) {
            Received::Refused(r) => Err(r),
            Received::Duplicate(bytes) => Ok((None, bytes.to_vec())),
            Received::Accepted(Accepted { event, request }) => {
                let len = acct.answer(request, &mut buf, 1_000).unwrap();
                Ok((event, buf[..len].to_vec()))
            }
        }
    }

    #[test]
    fn rfc2866_s3_request_authenticator_is_md5_over_zeroed_header_attributes_and_secret() {
        let p = request(3, &[(attr::ACCT_STATUS_TYPE, &[0, 0, 0, 1])], false, SECRET);
        let mut md5 = Md5::new();
        md5.update(&p[..4]);
        md5.update([0u8; 16]);
        md5.update(&p[20..]);
        md5.update(SECRET.as_bytes());
        let expected: [u8; 16] = md5.finalize().into();
        assert_eq!(&p[4..20], &expected);
        let parsed = Packet::parse(&p).unwrap();
        assert!(auth::request_authenticator_is_valid(
            &parsed,
            &Secret::new(SECRET).unwrap()
        ));
    }

    #[test]
    fn rfc2866_s3_request_authenticator_checked_against_every_secret_of_the_client() {
        let clients = clients();
        let mut acct = Accounting::default();
        let attrs = start_attrs();
        for (id, secret) in [(1, SECRET), (2, "old-secret")] {
            let p = request(id, &borrow(&attrs), false, secret);
            let (_, answer) = decide(&mut acct, &clients, &p).unwrap();
            let a = Packet::parse(&answer).unwrap();
            // Answered with the secret that verified.
            assert_eq!(
                verify_response(&a, Packet::parse(&p).unwrap().authenticator(), &{
                    Secret::new(secret).unwrap()
                }),
                ResponseCheck::Valid
            );
        }
        let wrong = request(3, &borrow(&attrs), false, "not-the-secret");
        assert_eq!(
            decide(&mut acct, &clients, &wrong).unwrap_err(),
            Refused::BadRequestAuthenticator
        );
        // One octet changed after signing.
        let mut tampered = request(4, &borrow(&attrs), false, SECRET);
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(
            decide(&mut acct, &clients, &tampered).unwrap_err(),
            Refused::BadRequestAuthenticator
        );
        assert_eq!(
            acct.stats().refused[Refused::BadRequestAuthenticator.index()],
            2
        );
    }

    #[test]
    fn rfc2866_s3_response_authenticator_and_proxy_state_echoed_in_order() {
        let clients = clients();
        let mut acct = Accounting::default();
        let p = request(9, &borrow(&start_attrs()), false, SECRET);
        let (_, answer) = decide(&mut acct, &clients, &p).unwrap();
        let a = Packet::parse(&answer).unwrap();
        assert_eq!((a.code(), a.identifier()), (code::ACCOUNTING_RESPONSE, 9));
        // MD5(Code + Identifier + Length + Request Authenticator + Attributes + Secret).
        let mut md5 = Md5::new();
        md5.update(&answer[..4]);
        md5.update(&p[4..20]);
        md5.update(&answer[20..]);
        md5.update(SECRET.as_bytes());
        let expected: [u8; 16] = md5.finalize().into();
        assert_eq!(a.authenticator(), &expected);
        let attrs: Vec<_> = a.attributes().map(|x| x.unwrap()).collect();
        assert_eq!(
            attrs.len(),
            2,
            "only the Proxy-States: no Message-Authenticator"
        );
        assert_eq!(
            (attrs[0].ty, attrs[0].value),
            (attr::PROXY_STATE, &b"p1"[..])
        );
        assert_eq!(
            (attrs[1].ty, attrs[1].value),
            (attr::PROXY_STATE, &b"p2"[..])
        );
    }

    #[test]
    fn rfc3579_s3_2_message_authenticator_verified_and_answered_with_one() {
        let clients = clients();
        let mut acct = Accounting::default();
        let p = request(5, &borrow(&start_attrs()), true, SECRET);
        let (event, answer) = decide(&mut acct, &clients, &p).unwrap();
        assert!(event.is_some());
        let a = Packet::parse(&answer).unwrap();
        assert_eq!(
            a.attributes().next().unwrap().unwrap().ty,
            attr::MESSAGE_AUTHENTICATOR
        );
        let secret = Secret::new(SECRET).unwrap();
        let expected = auth::md5_authenticator(&answer, &p[4..20].try_into().unwrap(), &secret);
        assert_eq!(a.authenticator(), &expected, "Response Authenticator");
        // The Message-Authenticator is computed with 16 zero octets in the Authenticator
        // field, as FreeRADIUS checks it on an Accounting-Response.
        let ma = auth::message_authenticator(&answer, &[0; 16], 22, &secret);
        assert_eq!(&answer[22..38], &ma);
        // A wrong Message-Authenticator value, re-signed so that only it is wrong.
        let mut bad = p.clone();
        bad[22] ^= 0xff;
        let len = bad.len();
        let mut fixed = bad[..len].to_vec();
        let ra = auth::md5_authenticator(&fixed, &[0; 16], &Secret::new(SECRET).unwrap());
        fixed[4..20].copy_from_slice(&ra);
        assert_eq!(
            decide(&mut acct, &clients, &fixed).unwrap_err(),
            Refused::BadMessageAuthenticator
        );
        // Required by the client and absent.
        let mut c = clients.iter().next().unwrap().clone();
        c.policy.require_message_authenticator = true;
        let strict = ClientTable::new([c]).unwrap();
        let plain = request(6, &borrow(&start_attrs()), false, SECRET);
        assert_eq!(
            decide(&mut acct, &strict, &plain).unwrap_err(),
            Refused::MissingMessageAuthenticator
        );
    }

    fn upsert_of(event: Option<Sequenced>) -> (Option<String>, Session, UpsertMode) {
        match event {
            Some(Sequenced {
                nas,
                seq: None,
                event: FeedEvent::Upsert { session, mode },
            }) => (nas, session, mode),
            other => panic!("not an upsert: {other:?}"),
        }
    }

    #[test]
    fn rfc2866_s5_1_status_type_maps_to_feed_events() {
        let clients = clients();
        let mut acct = Accounting::default();
        let with = |st: u32| {
            let mut a = start_attrs();
            a[0] = status(st);
            a
        };
        let (event, _) = decide(
            &mut acct,
            &clients,
            &request(1, &borrow(&with(1)), false, SECRET),
        )
        .unwrap();
        let (nas, session, mode) = upsert_of(event);
        assert_eq!(
            (nas.as_deref(), mode, session.acct_session_id.as_deref()),
            (Some("bng1"), UpsertMode::Create, Some("s-1"))
        );
        let (event, _) = decide(
            &mut acct,
            &clients,
            &request(2, &borrow(&with(3)), false, SECRET),
        )
        .unwrap();
        assert_eq!(upsert_of(event).2, UpsertMode::Refresh);
        let (event, _) = decide(
            &mut acct,
            &clients,
            &request(3, &borrow(&with(2)), false, SECRET),
        )
        .unwrap();
        assert_eq!(
            event.unwrap().event,
            FeedEvent::Delete {
                acct_session_id: "s-1".into()
            }
        );
        for (id, st) in [(4, 7), (5, 8)] {
            let (event, _) = decide(
                &mut acct,
                &clients,
                &request(id, &borrow(&with(st)), false, SECRET),
            )
            .unwrap();
            let event = event.unwrap();
            assert_eq!(
                (event.nas.as_deref(), event.event),
                (Some("bng1"), FeedEvent::NasReset)
            );
        }
        // Accounting-On needs no Acct-Session-Id.
        let on = [
            (attr::ACCT_STATUS_TYPE, &[0, 0, 0, 7][..]),
            (attr::NAS_IP_ADDRESS, &[192, 0, 2, 1][..]),
        ];
        let (event, _) = decide(&mut acct, &clients, &request(6, &on, false, SECRET)).unwrap();
        assert_eq!(event.unwrap().nas.as_deref(), Some("192.0.2.1"));
        // Failed (15): answered, nothing to apply.
        let (event, answer) = decide(
            &mut acct,
            &clients,
            &request(7, &borrow(&with(15)), false, SECRET),
        )
        .unwrap();
        assert!(event.is_none());
        assert_eq!(answer[0], code::ACCOUNTING_RESPONSE);
        let s = acct.stats();
        assert_eq!(
            (s.starts, s.interims, s.stops, s.nas_resets, s.ignored),
            (1, 1, 1, 3, 1)
        );
        assert_eq!((s.answered, s.applied), (7, 6));
        // Absent, repeated or malformed Acct-Status-Type: refused.
        let mut twice = start_attrs();
        twice.push(status(1));
        let mut short = start_attrs();
        short[0] = (attr::ACCT_STATUS_TYPE, vec![1]);
        let mut absent = start_attrs();
        absent.remove(0);
        for (id, attrs) in [(8, twice), (9, short), (10, absent)] {
            assert_eq!(
                decide(
                    &mut acct,
                    &clients,
                    &request(id, &borrow(&attrs), false, SECRET)
                )
                .unwrap_err(),
                Refused::BadStatusType
            );
        }
    }

    #[test]
    fn rfc2866_s5_5_start_interim_stop_without_acct_session_id_are_refused() {
        let clients = clients();
        let mut acct = Accounting::default();
        for (id, st) in [(1u8, 1u32), (2, 3), (3, 2)] {
            let mut attrs = start_attrs();
            attrs[0] = status(st);
            attrs.retain(|(t, _)| *t != attr::ACCT_SESSION_ID);
            assert_eq!(
                decide(
                    &mut acct,
                    &clients,
                    &request(id, &borrow(&attrs), false, SECRET)
                )
                .unwrap_err(),
                Refused::MissingAcctSessionId
            );
        }
        assert_eq!(
            acct.stats().refused[Refused::MissingAcctSessionId.index()],
            3
        );
        assert_eq!(acct.stats().answered, 0);
    }

    #[test]
    fn rfc2866_s4_1_nas_is_identifier_then_ipv4_then_ipv6_and_one_is_required() {
        let clients = clients();
        let mut acct = Accounting::default();
        let v6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let base = [
            (attr::ACCT_STATUS_TYPE, &[0, 0, 0, 7][..]),
            (attr::NAS_IPV6_ADDRESS, &v6[..]),
        ];
        let (e, _) = decide(&mut acct, &clients, &request(1, &base, false, SECRET)).unwrap();
        assert_eq!(e.unwrap().nas.as_deref(), Some("2001:db8::1"));
        let mut with_v4 = base.to_vec();
        with_v4.push((attr::NAS_IP_ADDRESS, &[198, 51, 100, 1]));
        let (e, _) = decide(&mut acct, &clients, &request(2, &with_v4, false, SECRET)).unwrap();
        assert_eq!(e.unwrap().nas.as_deref(), Some("198.51.100.1"));
        let mut with_id = with_v4.clone();
        with_id.push((attr::NAS_IDENTIFIER, b"edge-7"));
        let (e, _) = decide(&mut acct, &clients, &request(3, &with_id, false, SECRET)).unwrap();
        assert_eq!(e.unwrap().nas.as_deref(), Some("edge-7"));
        let none = [(attr::ACCT_STATUS_TYPE, &[0, 0, 0, 7][..])];
        assert_eq!(
            decide(&mut acct, &clients, &request(4, &none, false, SECRET)).unwrap_err(),
            Refused::MissingNasIdentification
        );
    }

    #[test]
    fn rfc2866_s5_session_built_from_identification_and_authorization_attributes() {
        let clients = clients();
        let mut acct = Accounting::default();
        let mut attrs = start_attrs();
        let prefix = [0u8, 64, 0x20, 0x01, 0x0d, 0xb8, 0, 7, 0, 0, 0, 0];
        let imsi = [&[0, 0, 0x28, 0xaf, 1, 17][..], b"001010123456789"].concat();
        let nsapi = [&[0, 0, 0x28, 0xaf, 10, 3][..], b"5"].concat();
        let avpair = [&[0, 0, 0, 9, 1, 23][..], b"audit-session-id=AUD1"].concat();
        let other_avpair = [&[0, 0, 0, 9, 1, 14][..], b"connect=fast"].concat();
        let unknown_vendor = [&[0, 0, 0x0a, 0x4c, 1, 3][..], b"x"].concat();
        attrs.extend([
            (attr::FRAMED_IPV6_PREFIX, prefix.to_vec()),
            (attr::CALLING_STATION_ID, b"00-11-22-33-44-55".to_vec()),
            (attr::CALLED_STATION_ID, b"internet.apn".to_vec()),
            (attr::NAS_PORT, 42u32.to_be_bytes().to_vec()),
            (attr::NAS_PORT_ID, b"ge-0/0/1.100".to_vec()),
            (attr::ACCT_MULTI_SESSION_ID, b"multi-1".to_vec()),
            (attr::CHARGEABLE_USER_IDENTITY, b"cui-1".to_vec()),
            (attr::VENDOR_SPECIFIC, imsi),
            (attr::VENDOR_SPECIFIC, nsapi),
            (attr::VENDOR_SPECIFIC, avpair),
            (attr::VENDOR_SPECIFIC, other_avpair),
            (attr::VENDOR_SPECIFIC, unknown_vendor),
            (attr::SESSION_TIMEOUT, 3600u32.to_be_bytes().to_vec()),
            (attr::IDLE_TIMEOUT, 600u32.to_be_bytes().to_vec()),
            (attr::ACCT_INTERIM_INTERVAL, 300u32.to_be_bytes().to_vec()),
            (attr::CLASS, b"class-a".to_vec()),
            (attr::CLASS, b"class-b".to_vec()),
            (attr::FILTER_ID, b"gold".to_vec()),
            // Counters and the like are ignored: Acct-Input-Octets, Event-Timestamp.
            (42, 1000u32.to_be_bytes().to_vec()),
            (attr::EVENT_TIMESTAMP, 1u32.to_be_bytes().to_vec()),
        ]);
        let (event, _) = decide(
            &mut acct,
            &clients,
            &request(1, &borrow(&attrs), false, SECRET),
        )
        .unwrap();
        let (_, s, _) = upsert_of(event);
        assert_eq!(s.acct_session_id.as_deref(), Some("s-1"));
        assert_eq!(s.user_name.as_deref(), Some("alice"));
        assert_eq!(s.framed_ip, Some(Ipv4Addr::new(10, 0, 0, 7)));
        assert_eq!(
            s.framed_ipv6_prefix.map(|p| p.to_string()).as_deref(),
            Some("2001:db8:7::/64")
        );
        assert_eq!(s.calling_station_id.as_deref(), Some("00-11-22-33-44-55"));
        assert_eq!(s.called_station_id.as_deref(), Some("internet.apn"));
        assert_eq!(s.nas_port, Some(42));
        assert_eq!(s.nas_port_id.as_deref(), Some("ge-0/0/1.100"));
        assert_eq!(s.acct_multi_session_id.as_deref(), Some("multi-1"));
        assert_eq!(s.cui.as_deref(), Some("cui-1"));
        assert_eq!(s.imsi.as_deref(), Some("001010123456789"));
        assert_eq!(s.nsapi.as_deref(), Some("5"));
        assert_eq!(s.audit_session_id.as_deref(), Some("AUD1"));
        let a = &s.authorization;
        assert_eq!(
            (a.session_timeout, a.idle_timeout, a.acct_interim_interval),
            (Some(3600), Some(600), Some(300))
        );
        assert_eq!(a.classes, vec![b"class-a".to_vec(), b"class-b".to_vec()]);
        assert_eq!(a.filter_ids, vec!["gold".to_string()]);
        assert!(a.cisco_policies.is_empty());
        // A repeated key or a malformed value is refused, never guessed.
        for (id, extra) in [
            (2u8, (attr::ACCT_SESSION_ID, b"s-2".to_vec())),
            (3, (attr::FRAMED_IP_ADDRESS, vec![10, 0, 0])),
            (4, (attr::USER_NAME, vec![0xff, 0xfe])),
        ] {
            let mut bad = start_attrs();
            if extra.0 != attr::ACCT_SESSION_ID {
                bad.retain(|(t, _)| *t != extra.0);
            }
            bad.push(extra);
            assert_eq!(
                decide(
                    &mut acct,
                    &clients,
                    &request(id, &borrow(&bad), false, SECRET)
                )
                .unwrap_err(),
                Refused::InvalidAttribute,
                "request {id}"
            );
        }
    }

    #[test]
    fn rfc5080_s2_2_2_retransmission_answered_from_the_cache_and_not_applied_twice() {
        let clients = clients();
        let store = MemoryStore::new(TombstonePolicy::default());
        let mut feed = Feed::new();
        let mut acct = Accounting::default();
        let mut buf = [0u8; 4096];
        let p = request(77, &borrow(&start_attrs()), true, SECRET);
        let first = match acct.receive(&p, src(), &clients, 10, buf.len()) {
            Received::Accepted(Accepted { event, request }) => {
                let outcome = feed.apply(event.unwrap(), &store, 10);
                assert_eq!(outcome, Ok(FeedOutcome::Upserted(Upserted::Inserted)));
                let len = acct.answer(request, &mut buf, 10).unwrap();
                buf[..len].to_vec()
            }
            other => panic!("{other:?}"),
        };
        match acct.receive(&p, src(), &clients, 20, buf.len()) {
            Received::Duplicate(bytes) => assert_eq!(bytes, &first[..]),
            other => panic!("{other:?}"),
        }
        assert_eq!(feed.stats().upserts, 1);
        assert_eq!(store.len(), 1);
        // The same Identifier and content from another port is another request.
        let other: SocketAddr = "192.0.2.10:40001".parse().unwrap();
        assert!(matches!(
            acct.receive(&p, other, &clients, 20, buf.len()),
            Received::Accepted(_)
        ));
        let s = acct.stats();
        assert_eq!(
            (s.received, s.duplicates, s.answered, s.applied),
            (3, 1, 1, 1)
        );
    }

    #[test]
    fn rfc2866_s3_refused_request_is_not_cached_and_is_decided_again() {
        let clients = clients();
        let mut acct = Accounting::default();
        let mut buf = [0u8; 4096];
        let p = request(1, &borrow(&start_attrs()), false, SECRET);
        for _ in 0..2 {
            match acct.receive(&p, src(), &clients, 0, buf.len()) {
                Received::Accepted(Accepted { request, .. }) => {
                    acct.refuse(request, Refused::FeedRefused)
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(acct.stats().refused[Refused::FeedRefused.index()], 2);
        assert_eq!(acct.stats().duplicates, 0);
        // And once answered, the copy is a duplicate.
        if let Received::Accepted(Accepted { request, .. }) =
            acct.receive(&p, src(), &clients, 0, buf.len())
        {
            acct.answer(request, &mut buf, 0).unwrap();
        }
        assert!(matches!(
            acct.receive(&p, src(), &clients, 0, buf.len()),
            Received::Duplicate(_)
        ));
    }

    #[test]
    fn rfc2866_s4_only_accounting_requests_from_known_clients_are_decided() {
        let clients = clients();
        let mut acct = Accounting::default();
        let mut coa = request(1, &borrow(&start_attrs()), false, SECRET);
        coa[0] = code::COA_REQUEST;
        assert_eq!(
            decide(&mut acct, &clients, &coa).unwrap_err(),
            Refused::UnsupportedCode
        );
        assert_eq!(
            decide(&mut acct, &clients, &[4, 1, 0]).unwrap_err(),
            Refused::Malformed
        );
        let p = request(2, &borrow(&start_attrs()), false, SECRET);
        let stranger: SocketAddr = "203.0.113.5:1813".parse().unwrap();
        assert!(matches!(
            acct.receive(&p, stranger, &clients, 0, 4096),
            Received::Refused(Refused::UnknownClient)
        ));
        // An answer that would not fit the caller's buffer: refused before anything applies.
        assert!(matches!(
            acct.receive(&p, src(), &clients, 0, 25),
            Received::Refused(Refused::AnswerWouldNotFit)
        ));
        let s = acct.stats();
        assert_eq!(s.received, 4);
        assert_eq!(s.refused_total(), 4);
        let mut text = String::new();
        s.write_prometheus(&mut text);
        assert!(text.contains("dynauth_accounting_refused_total{reason=\"unknown_client\"} 1"));
        assert!(text.contains("dynauth_accounting_received_total 4"));
    }

    #[test]
    fn an_interim_after_stop_does_not_resurrect_through_the_feed() {
        let clients = clients();
        let store = MemoryStore::new(TombstonePolicy::default());
        let mut feed = Feed::new();
        let mut acct = Accounting::default();
        for (id, st) in [(1u8, 1u32), (2, 2), (3, 3)] {
            let mut attrs = start_attrs();
            attrs[0] = status(st);
            let (event, _) = decide(
                &mut acct,
                &clients,
                &request(id, &borrow(&attrs), false, SECRET),
            )
            .unwrap();
            feed.apply(event.unwrap(), &store, u64::from(id)).unwrap();
        }
        assert_eq!(store.len(), 0);
    }

    /// RFC 4671 keeps the accounting counters per client (radiusAccClientExtTable): each
    /// datagram counts in its client's row and in the totals, one from no client in the
    /// totals only, and the exposition labels each row with its client's name.
    #[test]
    fn rfc4671_counters_are_kept_per_client_and_sum_to_the_totals() {
        let first: Cidr = "192.0.2.0/24".parse().unwrap();
        let second: Cidr = "198.51.100.0/24".parse().unwrap();
        let mut a = Client::new(first, Secret::new(SECRET).unwrap());
        a.name = "bng-a".into();
        let mut b = Client::new(second, Secret::new("b-secret").unwrap());
        b.name = "bng \"b\"".into();
        let clients = ClientTable::new([a, b]).unwrap();
        let from_b: SocketAddr = "198.51.100.7:1813".parse().unwrap();
        let stranger: SocketAddr = "203.0.113.9:1813".parse().unwrap();
        let mut acct = Accounting::default();
        let mut buf = [0u8; 4096];
        let attrs = start_attrs();
        let start = request(1, &borrow(&attrs), false, SECRET);
        // Client a: a Start, its retransmission, and one with a wrong secret.
        for datagram in [&start, &start] {
            if let Received::Accepted(Accepted { request, .. }) =
                acct.receive(datagram, src(), &clients, 1_000, buf.len())
            {
                acct.answer(request, &mut buf, 1_000).unwrap();
            }
        }
        let forged = request(2, &borrow(&attrs), false, "wrong");
        assert!(matches!(
            acct.receive(&forged, src(), &clients, 1_000, buf.len()),
            Received::Refused(Refused::BadRequestAuthenticator)
        ));
        // Client b: a Stop the feed refuses, and a malformed datagram.
        let mut stop = attrs.clone();
        stop[0] = status(acct_status::STOP);
        let stop = request(3, &borrow(&stop), false, "b-secret");
        match acct.receive(&stop, from_b, &clients, 1_000, buf.len()) {
            Received::Accepted(Accepted { request, .. }) => {
                acct.refuse(request, Refused::FeedRefused)
            }
            other => panic!("the Stop was not accepted: {other:?}"),
        }
        assert!(matches!(
            acct.receive(&[1, 2, 3], from_b, &clients, 1_000, buf.len()),
            Received::Refused(Refused::Malformed)
        ));
        // Nobody's: counted in the totals only.
        assert!(matches!(
            acct.receive(&start, stranger, &clients, 1_000, buf.len()),
            Received::Refused(Refused::UnknownClient)
        ));

        let rows = acct.client_stats();
        assert_eq!(rows.len(), 2);
        let (a, b) = (rows[0], rows[1]);
        assert_eq!((a.received, a.starts, a.answered, a.applied), (3, 1, 1, 1));
        assert_eq!(a.duplicates, 1);
        assert_eq!(a.refused[Refused::BadRequestAuthenticator.index()], 1);
        assert_eq!((b.received, b.stops, b.answered), (2, 1, 0));
        assert_eq!(b.refused[Refused::FeedRefused.index()], 1);
        assert_eq!(b.refused[Refused::Malformed.index()], 1);
        let mut sum = AccountingStats::default();
        sum.add(&a);
        sum.add(&b);
        let totals = acct.stats();
        assert_eq!(totals.received, sum.received + 1, "the stranger's datagram");
        assert_eq!(totals.refused[Refused::UnknownClient.index()], 1);
        assert_eq!(sum.refused[Refused::UnknownClient.index()], 0);
        assert_eq!(
            (
                totals.starts,
                totals.stops,
                totals.duplicates,
                totals.answered
            ),
            (sum.starts, sum.stops, sum.duplicates, sum.answered)
        );

        let mut text = String::new();
        AccountingStats::write_prometheus_per_client(rows, &["bng-a", "bng \"b\""], &mut text);
        assert!(
            text.contains("dynauth_accounting_client_received_total{client=\"bng-a\"} 3"),
            "{text}"
        );
        assert!(text.contains("dynauth_accounting_client_duplicates_total{client=\"bng-a\"} 1"));
        assert!(text.contains(
            "dynauth_accounting_client_requests_total{client=\"bng \\\"b\\\"\",status=\"stop\"} 1"
        ), "{text}");
        assert!(text.contains(
            "dynauth_accounting_client_refused_total{client=\"bng \\\"b\\\"\",reason=\"malformed\"} 1"
        ));
        // A client that sent nothing has no rows.
        let mut idle = String::new();
        AccountingStats::write_prometheus_per_client(
            &[AccountingStats::default()],
            &["idle"],
            &mut idle,
        );
        assert!(!idle.contains("idle"), "{idle}");
    }
}
