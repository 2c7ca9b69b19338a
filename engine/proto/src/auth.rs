//! Authenticators: the MD5 Request and Response Authenticators (RFC 2866 §3 style, RFC 5176
//! §2.3 and §3.4) and the HMAC-MD5 Message-Authenticator (RFC 3579 §3.2, RFC 5176 §3.4).
//!
//! Owns: shared secrets (never printed), the precomputed HMAC key state, and constant-time
//! comparison. Must not touch: framing decisions (`codec`) or what to do with a bad packet
//! (`decide`). Nothing here allocates per packet: hashing is fed the packet in pieces, so the
//! zeroed fields never need a copy.
#![forbid(unsafe_code)]

use core::fmt;

use hmac::{Hmac, KeyInit, Mac};
use md5::{Digest, Md5};
use subtle::ConstantTimeEq;

use crate::codec::{AUTHENTICATOR_LEN, HEADER_LEN, Packet};

/// An authenticator or Message-Authenticator value.
pub type Authenticator = [u8; AUTHENTICATOR_LEN];

const ZERO: Authenticator = [0; AUTHENTICATOR_LEN];

/// A shared secret with its HMAC-MD5 key state computed once (RFC 2104: a key longer than the
/// 64-octet block is hashed first, which the `hmac` crate does). Cloning the precomputed state
/// per packet saves the two key-block compressions that dominate HMAC on small packets.
///
/// `Debug` never shows the secret (SPEC: secrets never reach a log line).
#[derive(Clone)]
pub struct Secret {
    bytes: Box<[u8]>,
    hmac_key_state: Hmac<Md5>,
    /// The same key state as two MD5 midstates, after the key block XOR ipad and XOR opad
    /// (RFC 2104 §2), for HMACs computed four at a time ([`crate::md5x4`]).
    hmac_midstates: HmacMidstates,
}

/// The MD5 states after the HMAC key block XOR ipad (`inner`) and XOR opad (`outer`).
#[derive(Clone, Copy)]
pub(crate) struct HmacMidstates {
    pub inner: [u32; 4],
    pub outer: [u32; 4],
}

impl HmacMidstates {
    fn of(key: &[u8]) -> Self {
        // RFC 2104 §2: a key longer than the block is hashed first; then zero-padded.
        let mut block = [0u8; 64];
        if key.len() > block.len() {
            let digest: [u8; 16] = Md5::digest(key).into();
            block[..16].copy_from_slice(&digest);
        } else {
            block[..key.len()].copy_from_slice(key);
        }
        HmacMidstates {
            inner: crate::md5x4::state_after(&block.map(|b| b ^ 0x36)),
            outer: crate::md5x4::state_after(&block.map(|b| b ^ 0x5c)),
        }
    }
}

/// The secret is empty: RFC 2865 §3 forbids an empty shared secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a shared secret must not be empty (RFC 2865 §3)")]
pub struct EmptySecret;

impl Secret {
    pub fn new(bytes: impl AsRef<[u8]>) -> Result<Self, EmptySecret> {
        let bytes = bytes.as_ref();
        if bytes.is_empty() {
            return Err(EmptySecret);
        }
        let hmac_key_state = <Hmac<Md5> as KeyInit>::new_from_slice(bytes)
            .expect("HMAC accepts keys of every length");
        Ok(Secret {
            bytes: bytes.into(),
            hmac_key_state,
            hmac_midstates: HmacMidstates::of(bytes),
        })
    }

    /// The secret's octets, for authenticators computed four at a time. Crate-private:
    /// nothing outside the authenticators may see them.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub(crate) fn hmac_midstates(&self) -> HmacMidstates {
        self.hmac_midstates
    }

    /// HMAC-MD5 over the concatenation of `parts`, starting from the precomputed key state.
    pub fn hmac_md5(&self, parts: &[&[u8]]) -> Authenticator {
        let mut mac = self.hmac_key_state.clone();
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    /// MD5 over the concatenation of `parts` followed by the secret.
    pub fn md5_with_secret_last(&self, parts: &[&[u8]]) -> Authenticator {
        let mut md5 = Md5::new();
        for part in parts {
            md5.update(part);
        }
        md5.update(&self.bytes);
        md5.finalize().into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} octets, redacted>)", self.bytes.len())
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.bytes.ct_eq(&other.bytes).into()
    }
}

/// Constant-time equality of two authenticators (SPEC §3).
pub fn authenticators_equal(a: &Authenticator, b: &Authenticator) -> bool {
    a.ct_eq(b).into()
}

/// MD5(Code | Identifier | Length | `authenticator_field` | Attributes | K) over a finished
/// packet. With 16 zero octets this is a Request Authenticator (RFC 5176 §2.3, RFC 2866 §3);
/// with the request's Request Authenticator it is a Response Authenticator (RFC 5176 §3.4).
pub fn md5_authenticator(
    packet_bytes: &[u8],
    authenticator_field: &Authenticator,
    secret: &Secret,
) -> Authenticator {
    let header = packet_bytes.get(..4).unwrap_or_default();
    let attributes = packet_bytes.get(HEADER_LEN..).unwrap_or_default();
    secret.md5_with_secret_last(&[header, authenticator_field, attributes])
}

/// HMAC-MD5(K, packet) with the Authenticator field replaced by `authenticator_field` and the
/// 16 octets at `ma_value_offset` (the Message-Authenticator value) taken as zeros
/// (RFC 3579 §3.2; RFC 5176 §3.4 for requests with zeros, §3.5/SPEC §3 for answers with the
/// request's Request Authenticator).
pub fn message_authenticator(
    packet_bytes: &[u8],
    authenticator_field: &Authenticator,
    ma_value_offset: usize,
    secret: &Secret,
) -> Authenticator {
    let header = packet_bytes.get(..4).unwrap_or_default();
    let before = packet_bytes
        .get(HEADER_LEN..ma_value_offset)
        .unwrap_or_default();
    let after = packet_bytes
        .get(ma_value_offset + AUTHENTICATOR_LEN..)
        .unwrap_or_default();
    secret.hmac_md5(&[header, authenticator_field, before, &ZERO, after])
}

/// Checks a request's Request Authenticator (SPEC §2.4, RFC 5176 §3.4).
pub fn request_authenticator_is_valid(packet: &Packet<'_>, secret: &Secret) -> bool {
    let expected = md5_authenticator(packet.bytes(), &ZERO, secret);
    authenticators_equal(&expected, packet.authenticator())
}

/// Checks a request's Message-Authenticator whose value starts at `ma_value_offset`
/// (SPEC §2.5, RFC 3579 §3.2).
pub fn request_message_authenticator_is_valid(
    packet: &Packet<'_>,
    ma_value_offset: usize,
    secret: &Secret,
) -> bool {
    let Some(received) = packet
        .bytes()
        .get(ma_value_offset..ma_value_offset + AUTHENTICATOR_LEN)
        .and_then(|v| <&Authenticator>::try_from(v).ok())
    else {
        return false;
    };
    let expected = message_authenticator(packet.bytes(), &ZERO, ma_value_offset, secret);
    authenticators_equal(&expected, received)
}

/// Signs a request in place: writes the Message-Authenticator (when `ma_value_offset` is
/// given) and then the Request Authenticator, in the order RFC 5176 §3.4 requires. For DAC
/// code (the load generator, tests).
pub fn sign_request(packet: &mut [u8], ma_value_offset: Option<usize>, secret: &Secret) {
    if let Some(offset) = ma_value_offset {
        let ma = message_authenticator(packet, &ZERO, offset, secret);
        if let Some(slot) = packet.get_mut(offset..offset + AUTHENTICATOR_LEN) {
            slot.copy_from_slice(&ma);
        }
    }
    let ra = md5_authenticator(packet, &ZERO, secret);
    if let Some(slot) = packet.get_mut(4..HEADER_LEN) {
        slot.copy_from_slice(&ra);
    }
}

/// Signs an answer in place whose Authenticator field still holds the request's Request
/// Authenticator: Message-Authenticator first (when present), then the Response Authenticator
/// (RFC 5176 §3.4, §3.5).
pub fn sign_response(packet: &mut [u8], ma_value_offset: Option<usize>, secret: &Secret) {
    let request_authenticator: Authenticator = packet
        .get(4..HEADER_LEN)
        .and_then(|a| a.try_into().ok())
        .unwrap_or(ZERO);
    if let Some(offset) = ma_value_offset {
        let ma = message_authenticator(packet, &request_authenticator, offset, secret);
        if let Some(slot) = packet.get_mut(offset..offset + AUTHENTICATOR_LEN) {
            slot.copy_from_slice(&ma);
        }
    }
    let response = md5_authenticator(packet, &request_authenticator, secret);
    if let Some(slot) = packet.get_mut(4..HEADER_LEN) {
        slot.copy_from_slice(&response);
    }
}

/// What a DAC finds when it checks an answer against the request it sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseCheck {
    Valid,
    BadResponseAuthenticator,
    BadMessageAuthenticator,
}

/// Verifies an answer (DAC side; used by the load generator and the tests): the Response
/// Authenticator, and the Message-Authenticator when one is present.
pub fn verify_response(
    answer: &Packet<'_>,
    request_authenticator: &Authenticator,
    secret: &Secret,
) -> ResponseCheck {
    let expected = md5_authenticator(answer.bytes(), request_authenticator, secret);
    if !authenticators_equal(&expected, answer.authenticator()) {
        return ResponseCheck::BadResponseAuthenticator;
    }
    for attribute in answer.attributes() {
        let Ok(attribute) = attribute else {
            return ResponseCheck::BadResponseAuthenticator;
        };
        if attribute.ty == crate::dict::attr::MESSAGE_AUTHENTICATOR {
            let Ok(received) = <&Authenticator>::try_from(attribute.value) else {
                return ResponseCheck::BadMessageAuthenticator;
            };
            let expected = message_authenticator(
                answer.bytes(),
                request_authenticator,
                attribute.value_offset(),
                secret,
            );
            if !authenticators_equal(&expected, received) {
                return ResponseCheck::BadMessageAuthenticator;
            }
        }
    }
    ResponseCheck::Valid
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 2104 test case 2 ("Jefe"), as HMAC-MD5 test vector in RFC 2202 §2.
    #[test]
    fn rfc2202_hmac_md5_known_answer() {
        let s = Secret::new(b"Jefe").unwrap();
        let mac = s.hmac_md5(&[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            mac,
            [
                0x75, 0x0c, 0x78, 0x3e, 0x6a, 0xb0, 0xb5, 0x03, 0xea, 0xa8, 0x6e, 0x31, 0x0a, 0x5d,
                0xb7, 0x38
            ]
        );
    }

    /// The HMAC midstates (four-lane HMACs continue from them) give the `hmac` crate's
    /// HMAC-MD5 for keys of every length up to past the block (RFC 2104 §2: a longer key
    /// is hashed first).
    #[test]
    fn hmac_midstates_continue_to_the_same_mac_for_every_key_length() {
        let message = b"a Disconnect-ACK, more or less";
        for len in 1..=100usize {
            let key: Vec<u8> = (0..len).map(|k| (k * 13 + len) as u8).collect();
            let s = Secret::new(&key).unwrap();
            let m = s.hmac_midstates();
            let inner =
                crate::md5x4::md5x4_parts([m.inner; 4], 64, [&[&message[..]][..]; 4]).unwrap()[0];
            let outer =
                crate::md5x4::md5x4_parts([m.outer; 4], 64, [&[&inner[..]][..]; 4]).unwrap()[1];
            assert_eq!(outer, s.hmac_md5(&[message]), "key of {len} octets");
        }
    }

    // RFC 2202 §2 test case 6: an 80-octet key (longer than the block) is hashed first.
    #[test]
    fn rfc2104_long_key_is_hashed_first() {
        let s = Secret::new([0xaa; 80]).unwrap();
        let mac = s.hmac_md5(&[b"Test Using Larger Than Block-Size Key - Hash Key First"]);
        assert_eq!(
            mac,
            [
                0x6b, 0x1a, 0xb7, 0xfe, 0x4b, 0xd7, 0xbf, 0x8f, 0x0b, 0x62, 0xe6, 0xce, 0x61, 0xb9,
                0xd0, 0xcd
            ]
        );
    }

    #[test]
    fn secret_debug_never_shows_the_secret() {
        let s = Secret::new(b"hunter2-secret").unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(Secret::new(b"").is_err());
    }

    #[test]
    fn sign_then_verify_request_and_response() {
        let s = Secret::new(b"testing123").unwrap();
        let mut req = vec![40, 1, 0, 44];
        req.extend_from_slice(&[0; 16]);
        req.extend_from_slice(&[80, 18]);
        req.extend_from_slice(&[0; 16]);
        req.extend_from_slice(&[44, 6, b's', b'-', b'1', b'!']);
        sign_request(&mut req, Some(22), &s);
        let p = Packet::parse(&req).unwrap();
        assert!(request_authenticator_is_valid(&p, &s));
        assert!(request_message_authenticator_is_valid(&p, 22, &s));
        let other = Secret::new(b"testing124").unwrap();
        assert!(!request_authenticator_is_valid(&p, &other));
        assert!(!request_message_authenticator_is_valid(&p, 22, &other));

        let mut ans = vec![41, 1, 0, 38];
        ans.extend_from_slice(p.authenticator());
        ans.extend_from_slice(&[80, 18]);
        ans.extend_from_slice(&[0; 16]);
        sign_response(&mut ans, Some(22), &s);
        let a = Packet::parse(&ans).unwrap();
        assert_eq!(
            verify_response(&a, p.authenticator(), &s),
            ResponseCheck::Valid
        );
        assert_eq!(
            verify_response(&a, p.authenticator(), &other),
            ResponseCheck::BadResponseAuthenticator
        );
    }
}
