//! The answer (SPEC §9, RFC 5176 §3.5): the code, the attribute layout and the signatures.
//!
//! Owns: the answer code for a verdict, the layout (Message-Authenticator first when signing,
//! Service-Type for 507, the Error-Cause, an optional Reply-Message reason, every State in
//! order, every Proxy-State in order), the Response Authenticator and Message-Authenticator,
//! and the bound on the answer's size that the verifier checks before anything changes.
//! Must not touch: the decision itself (`rules`), the duplicate cache, allocation.
#![forbid(unsafe_code)]

use crate::auth;
use crate::codec::{self, PacketWriter, WriteError};
use crate::counters::RequestKind;
use crate::dict::{ErrorCause, attr, code, service_type};
use crate::rules::Verdict;
use crate::verify::Authenticated;

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

/// The largest answer [`encode`] can write for a request whose echo (States and Proxy-States
/// with their headers) takes `echo_len` octets, whatever the verdict: header,
/// Message-Authenticator when signing, Service-Type, Error-Cause, the longest Reply-Message
/// reason when reasons are enabled, then the echo.
pub(crate) fn worst_case_len(echo_len: usize, sign: bool, reasons: bool) -> usize {
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

/// The answer's code: ACK or NAK of the request's kind.
pub(crate) fn answer_code(kind: RequestKind, ack: bool) -> u8 {
    match (kind, ack) {
        (RequestKind::Disconnect, true) => code::DISCONNECT_ACK,
        (RequestKind::Disconnect, false) => code::DISCONNECT_NAK,
        (RequestKind::Coa, true) => code::COA_ACK,
        (RequestKind::Coa, false) => code::COA_NAK,
    }
}

/// Writes the answer to `request` for `verdict` into `out` and signs it with the secret the
/// request verified with. Returns its length.
pub(crate) fn encode(
    out: &mut [u8],
    request: &Authenticated<'_>,
    verdict: &Verdict,
) -> Result<usize, WriteError> {
    let (len, ma_offset) = encode_unsigned(out, request, verdict)?;
    if let Some(answer) = out.get_mut(..len) {
        auth::sign_response(answer, ma_offset, request.secret());
    }
    Ok(len)
}

/// [`encode`] without the signatures: the Authenticator field holds the request's Request
/// Authenticator and the Message-Authenticator (at the returned offset, when the answer
/// carries one) is zero, as `auth::sign_response` expects them (`batch` signs later).
/// Returns the length and that offset.
pub(crate) fn encode_unsigned(
    out: &mut [u8],
    request: &Authenticated<'_>,
    verdict: &Verdict,
) -> Result<(usize, Option<usize>), WriteError> {
    let packet = request.packet();
    let reason = (!verdict.ack && request.client().policy.reply_message_reasons)
        .then(|| verdict.error_cause.map(ErrorCause::reason))
        .flatten();
    let mut w = PacketWriter::new(
        out,
        answer_code(request.kind(), verdict.ack),
        packet.identifier(),
        packet.authenticator(),
    )?;
    let ma_offset = if request.signs_answer() {
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
    for echoed in request.echo().attributes() {
        w.push(echoed.ty, echoed.value)?;
    }
    Ok((w.finish().len(), ma_offset))
}
