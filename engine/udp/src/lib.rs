//! Every line of `unsafe` in dynauthd lives here: socket options, `recvmmsg`/`sendmmsg`,
//! io_uring (multishot `recvmsg` with a provided-buffer ring, batched `sendmsg`), and the
//! SIGINT/SIGTERM handler. Each `unsafe` block says why it is sound in a `// SAFETY:` comment.
//!
//! Owns: turning datagrams on sockets into a [`Batch`] of [`Received`] values for a
//! [`Handler`] (one receive batch in, one answer buffer per datagram out) and sending the
//! answers it writes, from the exact local address each request came to (IP_PKTINFO /
//! IPV6_PKTINFO), with kernel drop counts (SO_RXQ_OVFL). Must not touch: RADIUS decisions
//! (the handler makes them) or configuration (the runtime passes plain values in).
//!
//! Addresses and control messages are read and written as bytes in safe code; the unsafe
//! parts are only the system calls, the kernel-shared memory of io_uring, and zero-initialising
//! plain C structs.
//!
//! Files, by concern:
//! - `socket.rs`: binding (SO_REUSEPORT, buffer sizes, IP_PKTINFO, SO_RXQ_OVFL).
//! - `cmsg.rs`: socket addresses and control messages as bytes (safe code).
//! - `backend.rs`: the `Handler` batch interface, `Batch`, `Received`, `AnswerBuffer`,
//!   `IoStats`, and `Backend` (either one).
//! - `mmsg.rs`: the `recvmmsg`/`sendmmsg` backend.
//! - `uring.rs`: the io_uring backend and its probe.
//! - `late.rs`: answers sent outside a receive batch (settled by the data plane later);
//!   `late_batch.rs`: many of them with one `sendmmsg`.
//! - `waker.rs`: an eventfd that ends a shard's wait (the dispatcher hands it answers).
//! - `lock.rs`: exclusive file locks (one dynauthd per state directory).
//! - `signals.rs`: SIGINT/SIGTERM for graceful shutdown, SIGHUP for a configuration reload.
//! - [`cpu`]: CPU lists shared by every tool; [`dac`]: the DAC side (load generator, echo
//!   server, bench clients): batched send/receive, ppoll, CPU time.
#![allow(unsafe_code)]

pub mod cpu;
pub mod dac;

/// The largest RADIUS packet (RFC 2865 §3); receive buffers hold this much payload.
pub const MAX_DATAGRAM: usize = 4096;
/// Room for the control messages we ask for (packet info and the drop counter).
pub(crate) const CONTROL_LEN: usize = 128;
/// Room for a `sockaddr_in6`, the larger of the two address families.
pub(crate) const NAME_LEN: usize = 28;

mod backend;
mod cmsg;
mod late;
mod late_batch;
mod lock;
mod mmsg;
mod signals;
mod socket;
mod uring;
mod waker;

pub use backend::*;
pub use late::*;
pub use late_batch::*;
pub use lock::*;
pub use mmsg::*;
pub use signals::*;
pub use socket::*;
pub use uring::*;
pub use waker::*;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmsg::*;
    use std::net::{IpAddr, SocketAddr};

    #[test]
    fn sockaddr_bytes_round_trip() {
        let mut buf = [0u8; 32];
        for addr in ["192.0.2.1:3799", "[2001:db8::1]:1700"] {
            let a: SocketAddr = addr.parse().unwrap();
            let len = write_sockaddr(a, &mut buf) as usize;
            assert_eq!(parse_sockaddr(&buf[..len]), Some(a));
        }
    }

    #[test]
    fn pktinfo_written_is_pktinfo_parsed() {
        let mut ctrl = [0u8; CONTROL_LEN];
        let ip: IpAddr = "2001:db8::7".parse().unwrap();
        let len = write_pktinfo(&mut ctrl, Some(ip), 3);
        let info = parse_control(&ctrl[..len]);
        assert_eq!(info.local, Some(ip));
        assert_eq!(info.ifindex, 3);
        assert_eq!(write_pktinfo(&mut ctrl, None, 0), 0);
    }
}
