//! What a CoA-Request changes (SPEC §8, RFC 5176 §2.2 and §3.2): the borrowed description
//! of an authorization change and how it is applied to a session's state.
//!
//! Owns: replace semantics (an attribute present replaces all values of that attribute, one
//! absent stays), Cisco-AVPair classification (audit-session-id, subscriber:command, policy).
//! Must not touch: whether the change is allowed (`decide`) or where sessions live (`store`).
#![forbid(unsafe_code)]

use crate::codec::Packet;
use crate::dict::{attr, vendor};
use crate::session::Authorization;

/// A Cisco `subscriber:command` (Catalyst CoA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubscriberCommand {
    Reauthenticate,
    BounceHostPort,
    DisableHostPort,
}

impl SubscriberCommand {
    pub const ALL: [SubscriberCommand; 3] = [
        SubscriberCommand::Reauthenticate,
        SubscriberCommand::BounceHostPort,
        SubscriberCommand::DisableHostPort,
    ];

    /// The command's name as the Cisco-AVPair carries it (`subscriber:command=NAME`).
    pub const fn name(self) -> &'static str {
        match self {
            SubscriberCommand::Reauthenticate => "reauthenticate",
            SubscriberCommand::BounceHostPort => "bounce-host-port",
            SubscriberCommand::DisableHostPort => "disable-host-port",
        }
    }
}

/// What one Cisco-AVPair value means to a DAS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CiscoAvPair<'a> {
    /// "audit-session-id=VALUE": an identification key.
    AuditSessionId(&'a [u8]),
    /// "subscriber:command=NAME": a command; `None` for a command this DAS does not know
    /// (SPEC §8: NAK 407).
    Command(Option<SubscriberCommand>),
    /// Any other "key=value": a policy attribute, replaced as a whole by a CoA.
    Policy(&'a [u8]),
    /// No '=' at all: a malformed value (NAK 407).
    Malformed,
}

const AUDIT_SESSION_ID: &[u8] = b"audit-session-id=";
const SUBSCRIBER_COMMAND: &[u8] = b"subscriber:command=";

/// Classifies a Cisco-AVPair value.
pub fn classify_cisco_avpair(value: &[u8]) -> CiscoAvPair<'_> {
    if let Some(id) = value.strip_prefix(AUDIT_SESSION_ID) {
        return CiscoAvPair::AuditSessionId(id);
    }
    if let Some(command) = value.strip_prefix(SUBSCRIBER_COMMAND) {
        return CiscoAvPair::Command(
            SubscriberCommand::ALL
                .into_iter()
                .find(|c| c.name().as_bytes() == command),
        );
    }
    if value.contains(&b'=') {
        CiscoAvPair::Policy(value)
    } else {
        CiscoAvPair::Malformed
    }
}

/// An authorization change, borrowed from a validated CoA-Request. Scalar values are decoded;
/// repeated values are read from the packet when applied, so decoding allocates nothing.
#[derive(Debug, Clone, Copy)]
pub struct AuthorizationChange<'a> {
    packet: Packet<'a>,
    pub session_timeout: Option<u32>,
    pub idle_timeout: Option<u32>,
    pub acct_interim_interval: Option<u32>,
    pub replaces_filter_ids: bool,
    pub replaces_classes: bool,
    pub replaces_reply_messages: bool,
    pub replaces_cisco_policies: bool,
    pub command: Option<SubscriberCommand>,
}

impl<'a> AuthorizationChange<'a> {
    /// An empty change over `packet` (fields are filled in by the decision code, which has
    /// already validated every value).
    pub fn new(packet: Packet<'a>) -> Self {
        AuthorizationChange {
            packet,
            session_timeout: None,
            idle_timeout: None,
            acct_interim_interval: None,
            replaces_filter_ids: false,
            replaces_classes: false,
            replaces_reply_messages: false,
            replaces_cisco_policies: false,
            command: None,
        }
    }

    /// True when the request changes nothing (identification only).
    pub fn is_empty(&self) -> bool {
        self.session_timeout.is_none()
            && self.idle_timeout.is_none()
            && self.acct_interim_interval.is_none()
            && !self.replaces_filter_ids
            && !self.replaces_classes
            && !self.replaces_reply_messages
            && !self.replaces_cisco_policies
            && self.command.is_none()
    }

    /// Values of every well-framed attribute of type `ty`, in wire order.
    pub fn values(&self, ty: u8) -> impl Iterator<Item = &'a [u8]> + use<'a> {
        self.packet
            .attributes()
            .filter_map(Result::ok)
            .filter(move |a| a.ty == ty)
            .map(|a| a.value)
    }

    /// Cisco-AVPair policy values (neither identification nor commands), in wire order.
    pub fn cisco_policies(&self) -> impl Iterator<Item = &'a [u8]> + use<'a> {
        self.packet
            .attributes()
            .filter_map(Result::ok)
            .filter_map(|a| a.vendor_specific())
            .filter(|v| v.vendor_id == vendor::CISCO)
            .flat_map(|v| v.sub_attributes().filter_map(Result::ok))
            .filter(|s| s.ty == vendor::CISCO_AVPAIR)
            .filter_map(|s| match classify_cisco_avpair(s.value) {
                CiscoAvPair::Policy(p) => Some(p),
                _ => None,
            })
    }

    /// Applies the change with replace semantics (SPEC §8). Text values were validated as
    /// UTF-8 by the decision code; anything else is replaced lossily rather than panicking.
    pub fn apply_to(&self, auth: &mut Authorization) {
        let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
        if let Some(v) = self.session_timeout {
            auth.session_timeout = Some(v);
        }
        if let Some(v) = self.idle_timeout {
            auth.idle_timeout = Some(v);
        }
        if let Some(v) = self.acct_interim_interval {
            auth.acct_interim_interval = Some(v);
        }
        if self.replaces_filter_ids {
            auth.filter_ids = self.values(attr::FILTER_ID).map(text).collect();
        }
        if self.replaces_classes {
            auth.classes = self.values(attr::CLASS).map(<[u8]>::to_vec).collect();
        }
        if self.replaces_reply_messages {
            auth.reply_messages = self.values(attr::REPLY_MESSAGE).map(text).collect();
        }
        if self.replaces_cisco_policies {
            auth.cisco_policies = self.cisco_policies().map(text).collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cisco_avpair_classification() {
        assert_eq!(
            classify_cisco_avpair(b"audit-session-id=ABC"),
            CiscoAvPair::AuditSessionId(b"ABC")
        );
        assert_eq!(
            classify_cisco_avpair(b"subscriber:command=bounce-host-port"),
            CiscoAvPair::Command(Some(SubscriberCommand::BounceHostPort))
        );
        assert_eq!(
            classify_cisco_avpair(b"subscriber:command=explode"),
            CiscoAvPair::Command(None)
        );
        assert_eq!(
            classify_cisco_avpair(b"subscriber:service-name=gold"),
            CiscoAvPair::Policy(b"subscriber:service-name=gold")
        );
        assert_eq!(classify_cisco_avpair(b"garbage"), CiscoAvPair::Malformed);
    }

    // SPEC §8 (RFC 5176 §2.2): an attribute present replaces all its values; absent stays.
    #[test]
    fn rfc5176_s2_2_replace_semantics() {
        let mut bytes = vec![43, 1, 0, 0];
        bytes.extend_from_slice(&[0; 16]);
        for f in [&b"new-a"[..], b"new-b"] {
            bytes.extend_from_slice(&[attr::FILTER_ID, (f.len() + 2) as u8]);
            bytes.extend_from_slice(f);
        }
        let len = bytes.len() as u16;
        bytes[2..4].copy_from_slice(&len.to_be_bytes());
        let packet = Packet::parse(&bytes).unwrap();
        let mut change = AuthorizationChange::new(packet);
        change.replaces_filter_ids = true;
        change.session_timeout = Some(600);
        let mut auth = Authorization {
            filter_ids: vec!["old".into()],
            idle_timeout: Some(30),
            classes: vec![b"keep".to_vec()],
            ..Default::default()
        };
        change.apply_to(&mut auth);
        assert_eq!(auth.filter_ids, vec!["new-a", "new-b"]);
        assert_eq!(auth.session_timeout, Some(600));
        assert_eq!(auth.idle_timeout, Some(30));
        assert_eq!(auth.classes, vec![b"keep".to_vec()]);
    }
}
