//! The RADIUS dictionary Dynauth needs: packet codes, attribute types, vendor keys and the
//! RFC 5176 Error-Cause values.
//!
//! Owns: numeric constants and their names. Must not touch: parsing or policy (see `codec`,
//! `decide`).
#![forbid(unsafe_code)]

/// RADIUS packet codes of RFC 5176 §1 (SPEC §1), plus the ones a DAS must recognise to discard.
pub mod code {
    pub const ACCESS_REQUEST: u8 = 1;
    pub const ACCOUNTING_REQUEST: u8 = 4;
    /// RFC 2866 §3: the answer to an Accounting-Request.
    pub const ACCOUNTING_RESPONSE: u8 = 5;
    pub const STATUS_SERVER: u8 = 12;
    pub const DISCONNECT_REQUEST: u8 = 40;
    pub const DISCONNECT_ACK: u8 = 41;
    pub const DISCONNECT_NAK: u8 = 42;
    pub const COA_REQUEST: u8 = 43;
    pub const COA_ACK: u8 = 44;
    pub const COA_NAK: u8 = 45;
}

/// Attribute types (RFC 2865, 2866, 2869, 3162, 3579, 4372, 5176).
pub mod attr {
    pub const USER_NAME: u8 = 1;
    pub const NAS_IP_ADDRESS: u8 = 4;
    pub const NAS_PORT: u8 = 5;
    pub const SERVICE_TYPE: u8 = 6;
    pub const FRAMED_IP_ADDRESS: u8 = 8;
    pub const FILTER_ID: u8 = 11;
    pub const REPLY_MESSAGE: u8 = 18;
    pub const STATE: u8 = 24;
    pub const CLASS: u8 = 25;
    pub const VENDOR_SPECIFIC: u8 = 26;
    pub const SESSION_TIMEOUT: u8 = 27;
    pub const IDLE_TIMEOUT: u8 = 28;
    pub const CALLED_STATION_ID: u8 = 30;
    pub const CALLING_STATION_ID: u8 = 31;
    pub const NAS_IDENTIFIER: u8 = 32;
    pub const PROXY_STATE: u8 = 33;
    /// RFC 2866 §5.1.
    pub const ACCT_STATUS_TYPE: u8 = 40;
    pub const ACCT_SESSION_ID: u8 = 44;
    pub const ACCT_MULTI_SESSION_ID: u8 = 50;
    pub const EVENT_TIMESTAMP: u8 = 55;
    pub const MESSAGE_AUTHENTICATOR: u8 = 80;
    pub const ACCT_INTERIM_INTERVAL: u8 = 85;
    pub const NAS_PORT_ID: u8 = 87;
    pub const CHARGEABLE_USER_IDENTITY: u8 = 89;
    pub const NAS_IPV6_ADDRESS: u8 = 95;
    /// RFC 5580 §4.1, used for routing by RFC 8559 §3.1.
    pub const OPERATOR_NAME: u8 = 126;
    pub const FRAMED_INTERFACE_ID: u8 = 96;
    pub const FRAMED_IPV6_PREFIX: u8 = 97;
    pub const ERROR_CAUSE: u8 = 101;
}

/// Vendor-Specific keys Dynauth understands.
pub mod vendor {
    /// Cisco (SMI enterprise 9); Cisco-AVPair is its type 1.
    pub const CISCO: u32 = 9;
    pub const CISCO_AVPAIR: u8 = 1;
    /// 3GPP (SMI enterprise 10415), TS 29.061 §16.4.7.
    pub const THREE_GPP: u32 = 10415;
    pub const THREE_GPP_IMSI: u8 = 1;
    pub const THREE_GPP_NSAPI: u8 = 10;
}

/// Acct-Status-Type values (RFC 2866 §5.1, RFC 2867 for the tunnel ones).
pub mod acct_status {
    pub const START: u32 = 1;
    pub const STOP: u32 = 2;
    pub const INTERIM_UPDATE: u32 = 3;
    pub const ACCOUNTING_ON: u32 = 7;
    pub const ACCOUNTING_OFF: u32 = 8;
}

/// Service-Type values (RFC 2865 §5.6, RFC 5176 §3.2).
pub mod service_type {
    pub const AUTHORIZE_ONLY: u32 = 17;
}

/// Error-Cause values of RFC 5176 §3.5 (SPEC §9). Exactly one goes in every NAK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum ErrorCause {
    ResidualSessionContextRemoved = 201,
    UnsupportedAttribute = 401,
    MissingAttribute = 402,
    NasIdentificationMismatch = 403,
    InvalidRequest = 404,
    UnsupportedService = 405,
    UnsupportedExtension = 406,
    InvalidAttributeValue = 407,
    AdministrativelyProhibited = 501,
    RequestNotRoutable = 502,
    SessionContextNotFound = 503,
    SessionContextNotRemovable = 504,
    OtherProxyProcessingError = 505,
    ResourcesUnavailable = 506,
    RequestInitiated = 507,
    MultipleSessionSelectionUnsupported = 508,
}

impl ErrorCause {
    /// Every value, in numeric order (for counters and reports).
    pub const ALL: [ErrorCause; 16] = [
        ErrorCause::ResidualSessionContextRemoved,
        ErrorCause::UnsupportedAttribute,
        ErrorCause::MissingAttribute,
        ErrorCause::NasIdentificationMismatch,
        ErrorCause::InvalidRequest,
        ErrorCause::UnsupportedService,
        ErrorCause::UnsupportedExtension,
        ErrorCause::InvalidAttributeValue,
        ErrorCause::AdministrativelyProhibited,
        ErrorCause::RequestNotRoutable,
        ErrorCause::SessionContextNotFound,
        ErrorCause::SessionContextNotRemovable,
        ErrorCause::OtherProxyProcessingError,
        ErrorCause::ResourcesUnavailable,
        ErrorCause::RequestInitiated,
        ErrorCause::MultipleSessionSelectionUnsupported,
    ];

    /// The wire value.
    pub const fn value(self) -> u32 {
        self as u32
    }

    /// Index into [`ErrorCause::ALL`] (dense, for counter arrays).
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }

    /// The value's registered name, as FreeRADIUS and Wireshark print it.
    pub const fn name(self) -> &'static str {
        match self {
            ErrorCause::ResidualSessionContextRemoved => "Residual-Session-Context-Removed",
            ErrorCause::UnsupportedAttribute => "Unsupported-Attribute",
            ErrorCause::MissingAttribute => "Missing-Attribute",
            ErrorCause::NasIdentificationMismatch => "NAS-Identification-Mismatch",
            ErrorCause::InvalidRequest => "Invalid-Request",
            ErrorCause::UnsupportedService => "Unsupported-Service",
            ErrorCause::UnsupportedExtension => "Unsupported-Extension",
            ErrorCause::InvalidAttributeValue => "Invalid-Attribute-Value",
            ErrorCause::AdministrativelyProhibited => "Administratively-Prohibited",
            ErrorCause::RequestNotRoutable => "Request-Not-Routable",
            ErrorCause::SessionContextNotFound => "Session-Context-Not-Found",
            ErrorCause::SessionContextNotRemovable => "Session-Context-Not-Removable",
            ErrorCause::OtherProxyProcessingError => "Other-Proxy-Processing-Error",
            ErrorCause::ResourcesUnavailable => "Resources-Unavailable",
            ErrorCause::RequestInitiated => "Request-Initiated",
            ErrorCause::MultipleSessionSelectionUnsupported => {
                "Multiple-Session-Selection-Unsupported"
            }
        }
    }

    /// A short human reason for the optional Reply-Message of a NAK (SPEC §9).
    pub const fn reason(self) -> &'static str {
        match self {
            ErrorCause::ResidualSessionContextRemoved => "Session Already Removed",
            ErrorCause::UnsupportedAttribute => "Unsupported Attribute",
            ErrorCause::MissingAttribute => "Missing Session Identification",
            ErrorCause::NasIdentificationMismatch => "NAS Identification Mismatch",
            ErrorCause::InvalidRequest => "Invalid Request",
            ErrorCause::UnsupportedService => "Unsupported Service",
            ErrorCause::UnsupportedExtension => "Unsupported Extension",
            ErrorCause::InvalidAttributeValue => "Invalid Attribute Value",
            ErrorCause::AdministrativelyProhibited => "Administratively Prohibited",
            ErrorCause::RequestNotRoutable => "Request Not Routable",
            ErrorCause::SessionContextNotFound => "No Matching Session",
            ErrorCause::SessionContextNotRemovable => "Session Not Removable",
            ErrorCause::OtherProxyProcessingError => "Proxy Processing Error",
            ErrorCause::ResourcesUnavailable => "Resources Unavailable",
            ErrorCause::RequestInitiated => "Reauthorization Initiated",
            ErrorCause::MultipleSessionSelectionUnsupported => "Multiple Sessions Matched",
        }
    }

    /// Parses a wire value.
    pub fn from_value(v: u32) -> Option<ErrorCause> {
        Self::ALL.iter().copied().find(|c| c.value() == v)
    }
}

/// The name of a packet code, for logs and reports.
pub const fn code_name(c: u8) -> &'static str {
    match c {
        code::ACCESS_REQUEST => "Access-Request",
        code::ACCOUNTING_REQUEST => "Accounting-Request",
        code::ACCOUNTING_RESPONSE => "Accounting-Response",
        code::STATUS_SERVER => "Status-Server",
        code::DISCONNECT_REQUEST => "Disconnect-Request",
        code::DISCONNECT_ACK => "Disconnect-ACK",
        code::DISCONNECT_NAK => "Disconnect-NAK",
        code::COA_REQUEST => "CoA-Request",
        code::COA_ACK => "CoA-ACK",
        code::COA_NAK => "CoA-NAK",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_cause_values_round_trip_and_are_dense() {
        for (i, c) in ErrorCause::ALL.iter().enumerate() {
            assert_eq!(ErrorCause::from_value(c.value()), Some(*c));
            assert_eq!(c.index(), i);
        }
        assert_eq!(ErrorCause::from_value(200), None);
        assert_eq!(ErrorCause::SessionContextNotFound.value(), 503);
    }
}
