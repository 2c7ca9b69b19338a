//! Request rules (SPEC §5 to §8): what an authenticated request asks for, and the verdict.
//!
//! Owns: the attribute rules applied while the verifier scans the packet once
//! ([`RequestReader`]: which attributes a Disconnect-Request or CoA-Request may carry, how
//! often, with what values; the first error of the most fundamental class wins), the NAS
//! identification check, the key-profile check, the store call, and the one Error-Cause of
//! each NAK ([`prepare`] checks the rules, [`verdict`] turns what the store or the data plane
//! did into a [`Verdict`]).
//! Must not touch: authenticators and the duplicate cache (`verify`, `dedup`), the answer's
//! bytes (`answer`), sockets and clocks (time is passed in), allocation on the Disconnect path.
#![forbid(unsafe_code)]

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::change::{AuthorizationChange, CiscoAvPair, classify_cisco_avpair};
use crate::client::NasIdentity;
use crate::codec::{self, Attribute, Ipv6Prefix, MalformedValue, Packet};
use crate::counters::RequestKind;
use crate::dict::{ErrorCause, attr, service_type, vendor};
use crate::session::SessionQuery;
use crate::store::{Applied, Lookup, MatchScope, Refusal, SessionStore};
use crate::verify::Authenticated;

/// The verdict on an authenticated request, before encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub(crate) ack: bool,
    pub(crate) error_cause: Option<ErrorCause>,
    /// Service-Type = Authorize Only is echoed (RFC 5176 §3.2: the NAK 507 answer).
    pub(crate) echo_authorize_only: bool,
    /// Sessions removed or changed.
    pub(crate) sessions: u32,
}

impl Verdict {
    pub(crate) fn nak(cause: ErrorCause) -> Self {
        Verdict {
            ack: false,
            error_cause: Some(cause),
            echo_authorize_only: false,
            sessions: 0,
        }
    }
}

/// What a request that passed every rule asks the store (or the data plane) to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    /// A Disconnect-Request (SPEC §7).
    Disconnect,
    /// A CoA-Request with authorization changes (SPEC §8).
    Change,
    /// A CoA-Request with Service-Type = Authorize Only (RFC 5176 §3.2).
    Reauthorize,
}

/// A request that passed every rule: the lookup that selects its sessions and its change.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Prepared<'a> {
    pub(crate) operation: Operation,
    pub(crate) lookup: Lookup<'a>,
    pub(crate) change: AuthorizationChange<'a>,
    /// The NAS identification it carried (a router's routing hints).
    pub(crate) nas: NasAttributes<'a>,
}

/// The table-only verdict on a request that passed every rule.
pub(crate) fn decide_prepared(prepared: &Prepared<'_>, store: &dyn SessionStore) -> Verdict {
    verdict(prepared.operation, apply(prepared, store))
}

/// Every rule short of the store (SPEC §5 to §8): the request's attributes, Service-Type, NAS
/// identification and key profile. `Err` is the NAK.
pub(crate) fn prepare<'a>(
    request: &Authenticated<'a>,
    nas: &NasIdentity,
    arrived_on: IpAddr,
    now_ms: u64,
) -> Result<Prepared<'a>, Verdict> {
    prepare_with(request, Some((nas, arrived_on)), now_ms)
}

/// [`prepare`] for a router (RFC 5176 §3.1): the same rules except the NAS identification
/// check, because the request names the owner's NAS, not the router. The NAS attributes are
/// routing hints ([`Prepared::nas`]); the owner checks them.
pub(crate) fn prepare_route<'a>(
    request: &Authenticated<'a>,
    now_ms: u64,
) -> Result<Prepared<'a>, Verdict> {
    prepare_with(request, None, now_ms)
}

fn prepare_with<'a>(
    request: &Authenticated<'a>,
    nas_check: Option<(&NasIdentity, IpAddr)>,
    now_ms: u64,
) -> Result<Prepared<'a>, Verdict> {
    let attributes = request.attributes().map_err(Verdict::nak)?;
    let policy = &request.client().policy;
    if let Some(st) = attributes.service_type {
        // SPEC §8: only Authorize Only is a service a CoA may request, and only when enabled.
        if st != service_type::AUTHORIZE_ONLY || !policy.authorize_only {
            return Err(Verdict::nak(ErrorCause::UnsupportedService));
        }
        // RFC 5176 §3.2: an Authorize Only request carries no authorization changes.
        if !attributes.change.is_empty() {
            return Err(Verdict::nak(ErrorCause::UnsupportedAttribute));
        }
    }
    let check = match nas_check {
        Some((nas, arrived_on)) => attributes.nas.check(nas, arrived_on),
        None if attributes.nas.is_absent() => NasCheck::Absent,
        None => NasCheck::Matches,
    };
    match check {
        NasCheck::Mismatch => return Err(Verdict::nak(ErrorCause::NasIdentificationMismatch)),
        NasCheck::Absent if policy.require_nas_identification => {
            return Err(Verdict::nak(ErrorCause::MissingAttribute));
        }
        _ => {}
    }
    if !attributes.query.satisfies(policy.key_profile) {
        return Err(Verdict::nak(ErrorCause::MissingAttribute));
    }
    let lookup = Lookup {
        query: attributes.query,
        scope: MatchScope {
            vrf: policy.vrf.as_deref(),
            max_sessions: policy.multi_session.max_sessions(),
            // SPEC §4.6: a tombstone answers this client's retries for its replay window.
            tombstone_window_ms: u64::from(policy.event_timestamp_window_secs) * 1000,
        },
        now_ms,
    };
    let operation = match (request.kind(), attributes.service_type) {
        (RequestKind::Disconnect, _) => Operation::Disconnect,
        (RequestKind::Coa, Some(_)) => Operation::Reauthorize,
        (RequestKind::Coa, None) => Operation::Change,
    };
    Ok(Prepared {
        operation,
        lookup,
        change: attributes.change,
        nas: attributes.nas,
    })
}

/// The table-only store call.
fn apply(prepared: &Prepared<'_>, store: &dyn SessionStore) -> Result<Applied, Refusal> {
    match prepared.operation {
        Operation::Disconnect => store.disconnect(&prepared.lookup),
        Operation::Reauthorize => store.reauthorize(&prepared.lookup),
        Operation::Change => store.change(&prepared.lookup, &prepared.change),
    }
}

/// The verdict on what the store (or the data plane) did.
pub(crate) fn verdict(operation: Operation, result: Result<Applied, Refusal>) -> Verdict {
    match (result, operation) {
        (Ok(Applied::Sessions(n)), Operation::Reauthorize) => Verdict {
            ack: false,
            error_cause: Some(ErrorCause::RequestInitiated),
            echo_authorize_only: true,
            sessions: n,
        },
        (Ok(Applied::Sessions(n)), _) => Verdict {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NasCheck {
    Absent,
    Matches,
    Mismatch,
}

/// The NAS identification attributes a request carried (SPEC §5), checked against this
/// server's identity and the address the request arrived on.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct NasAttributes<'a> {
    pub(crate) ip: Option<Ipv4Addr>,
    pub(crate) ipv6: Option<Ipv6Addr>,
    pub(crate) identifier: Option<&'a [u8]>,
    /// Operator-Name (RFC 8559 §3.1): which operator's NAS; a router routes by it, a DAS
    /// accepts it and does not check it (it has no operator name of its own to compare).
    pub(crate) operator_name: Option<&'a [u8]>,
}

impl NasAttributes<'_> {
    fn is_absent(&self) -> bool {
        self.ip.is_none() && self.ipv6.is_none() && self.identifier.is_none()
    }

    fn check(&self, nas: &NasIdentity, arrived_on: IpAddr) -> NasCheck {
        if self.is_absent() {
            return NasCheck::Absent;
        }
        let ok = self.ip.is_none_or(|ip| nas.ipv4_matches(ip, arrived_on))
            && self.ipv6.is_none_or(|ip| nas.ipv6_matches(ip, arrived_on))
            && self.identifier.is_none_or(|id| nas.identifier_matches(id));
        if ok {
            NasCheck::Matches
        } else {
            NasCheck::Mismatch
        }
    }
}

/// What a request asks for, once every attribute passed the rules of SPEC §7 and §8.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestAttributes<'a> {
    pub(crate) query: SessionQuery<'a>,
    pub(crate) nas: NasAttributes<'a>,
    pub(crate) service_type: Option<u32>,
    pub(crate) change: AuthorizationChange<'a>,
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

/// Applies the attribute rules one attribute at a time, fed by the verifier's single scan.
pub(crate) struct RequestReader<'a> {
    coa: bool,
    errors: Errors,
    query: SessionQuery<'a>,
    nas: NasAttributes<'a>,
    change: AuthorizationChange<'a>,
    service_type: Option<u32>,
    session_timeout: Option<u32>,
    idle_timeout: Option<u32>,
    interim: Option<u32>,
    state_seen: bool,
    event_timestamp_seen: bool,
    command_seen: bool,
}

impl<'a> RequestReader<'a> {
    pub(crate) fn new(kind: RequestKind, packet: Packet<'a>) -> Self {
        RequestReader {
            coa: kind == RequestKind::Coa,
            errors: Errors::default(),
            query: SessionQuery::default(),
            nas: NasAttributes::default(),
            change: AuthorizationChange::new(packet),
            service_type: None,
            session_timeout: None,
            idle_timeout: None,
            interim: None,
            state_seen: false,
            event_timestamp_seen: false,
            command_seen: false,
        }
    }

    /// The attributes ended in a framing error (RFC 5176 §3.6: NAK 404 once authenticated).
    pub(crate) fn framing_error(&mut self) {
        self.errors.framing = true;
    }

    pub(crate) fn read(&mut self, a: Attribute<'a>) {
        let coa = self.coa;
        let errors = &mut self.errors;
        let q = &mut self.query;
        let v = a.value;
        match a.ty {
            attr::USER_NAME => set_once(&mut q.user_name, text(v), errors),
            attr::NAS_PORT => set_once(&mut q.nas_port, codec::read_u32(v), errors),
            attr::FRAMED_IP_ADDRESS => set_once(&mut q.framed_ip, codec::read_ipv4(v), errors),
            attr::CALLED_STATION_ID => set_once(&mut q.called_station_id, text(v), errors),
            attr::CALLING_STATION_ID => set_once(&mut q.calling_station_id, text(v), errors),
            attr::ACCT_SESSION_ID => set_once(&mut q.acct_session_id, text(v), errors),
            attr::ACCT_MULTI_SESSION_ID => set_once(&mut q.acct_multi_session_id, text(v), errors),
            attr::NAS_PORT_ID => set_once(&mut q.nas_port_id, text(v), errors),
            attr::CHARGEABLE_USER_IDENTITY => set_once(&mut q.cui, text(v), errors),
            attr::FRAMED_INTERFACE_ID => set_once(
                &mut q.framed_interface_id,
                codec::read_interface_id(v),
                errors,
            ),
            attr::FRAMED_IPV6_PREFIX => {
                set_once(&mut q.framed_ipv6_prefix, Ipv6Prefix::from_wire(v), errors)
            }
            attr::NAS_IP_ADDRESS => set_once(&mut self.nas.ip, codec::read_ipv4(v), errors),
            attr::NAS_IPV6_ADDRESS => set_once(&mut self.nas.ipv6, codec::read_ipv6(v), errors),
            attr::NAS_IDENTIFIER => set_once(&mut self.nas.identifier, text(v), errors),
            attr::OPERATOR_NAME => set_once(&mut self.nas.operator_name, text(v), errors),
            attr::PROXY_STATE => {
                if v.is_empty() {
                    errors.malformed = true;
                }
            }
            attr::STATE => {
                if self.state_seen {
                    errors.repeated = true;
                }
                self.state_seen = true;
                if v.is_empty() {
                    errors.malformed = true;
                }
            }
            attr::EVENT_TIMESTAMP => {
                if self.event_timestamp_seen {
                    errors.repeated = true;
                }
                self.event_timestamp_seen = true;
                if codec::read_u32(v).is_err() {
                    errors.malformed = true;
                }
            }
            // Checked (and verified) by the verifier.
            attr::MESSAGE_AUTHENTICATOR => {}
            attr::REPLY_MESSAGE => {
                if utf8_text(v).is_err() {
                    errors.malformed = true;
                }
                self.change.replaces_reply_messages |= coa;
            }
            attr::CLASS => {
                if v.is_empty() {
                    errors.malformed = true;
                }
                self.change.replaces_classes |= coa;
            }
            attr::SERVICE_TYPE if coa => {
                set_once(&mut self.service_type, codec::read_u32(v), errors)
            }
            attr::SESSION_TIMEOUT if coa => {
                set_once(&mut self.session_timeout, codec::read_u32(v), errors)
            }
            attr::IDLE_TIMEOUT if coa => {
                set_once(&mut self.idle_timeout, codec::read_u32(v), errors)
            }
            attr::ACCT_INTERIM_INTERVAL if coa => {
                set_once(&mut self.interim, codec::read_u32(v), errors)
            }
            attr::FILTER_ID if coa => {
                if utf8_text(v).is_err() {
                    errors.malformed = true;
                }
                self.change.replaces_filter_ids = true;
            }
            attr::VENDOR_SPECIFIC => self.read_vendor_specific(a),
            // Everything else, Service-Type and authorization attributes in a
            // Disconnect-Request included (SPEC §7), is unsupported.
            _ => errors.unsupported = true,
        }
    }

    /// Vendor-Specific attributes: 3GPP IMSI/NSAPI and Cisco-AVPair; any other vendor or type
    /// is unsupported (SPEC §7, §8).
    fn read_vendor_specific(&mut self, a: Attribute<'a>) {
        let errors = &mut self.errors;
        let Some(vsa) = a.vendor_specific() else {
            errors.malformed = true;
            return;
        };
        if vsa.vendor_id != vendor::THREE_GPP && vsa.vendor_id != vendor::CISCO {
            errors.unsupported = true;
            return;
        }
        let q = &mut self.query;
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
                    CiscoAvPair::Command(_) | CiscoAvPair::Policy(_) if !self.coa => {
                        errors.unsupported = true
                    }
                    CiscoAvPair::Command(command) => {
                        if self.command_seen {
                            errors.repeated = true;
                        }
                        self.command_seen = true;
                        match command {
                            Some(c) => self.change.command = Some(c),
                            None => errors.malformed = true,
                        }
                    }
                    CiscoAvPair::Policy(p) => {
                        if core::str::from_utf8(p).is_err() {
                            errors.malformed = true;
                        }
                        self.change.replaces_cisco_policies = true;
                    }
                    CiscoAvPair::Malformed => errors.malformed = true,
                },
                _ => errors.unsupported = true,
            }
        }
    }

    /// The request's attributes, or the one Error-Cause of its first rule broken.
    pub(crate) fn finish(self) -> Result<RequestAttributes<'a>, ErrorCause> {
        if let Some(cause) = self.errors.first() {
            return Err(cause);
        }
        let mut change = self.change;
        change.session_timeout = self.session_timeout;
        change.idle_timeout = self.idle_timeout;
        change.acct_interim_interval = self.interim;
        Ok(RequestAttributes {
            query: self.query,
            nas: self.nas,
            service_type: self.service_type,
            change,
        })
    }
}
