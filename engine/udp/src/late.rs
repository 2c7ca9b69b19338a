//! Answers sent outside a receive batch: a request the data plane settles later (an action
//! committed by an agent) is answered from the socket it arrived on, from the exact local
//! address it was sent to (IP_PKTINFO / IPV6_PKTINFO when the socket is bound to a wildcard
//! address), by whichever thread settles it.
//!
//! Owns: duplicated handles of the shard sockets, one `sendmsg` per answer (`late_batch`
//! sends many with one `sendmmsg`). Must not touch:
//! what the answer says (the engine wrote it).
#![forbid(unsafe_code)]

use std::io;
use std::net::SocketAddr;

use socket2::{MsgHdr, SockAddr, Socket};

use crate::CONTROL_LEN;
use crate::cmsg::write_pktinfo;
use crate::socket::Listener;

/// How often a send into a full socket buffer is retried, 50 µs apart (50 ms in all).
const MAX_WAITS: u32 = 1000;

/// Sends settled answers from the server's sockets.
#[derive(Debug)]
pub struct AnswerSender {
    sockets: Vec<(SocketAddr, Socket)>,
}

impl AnswerSender {
    /// Handles of `listeners` (one shard's sockets: every address the server listens on).
    pub fn new(listeners: &[Listener]) -> io::Result<Self> {
        let sockets = listeners
            .iter()
            .map(|l| Ok((l.local, l.socket.try_clone()?)))
            .collect::<io::Result<_>>()?;
        Ok(AnswerSender { sockets })
    }

    /// The socket answers from local address `from` leave on (its index), and whether it is
    /// bound to a wildcard address (the answer then names `from` in IP_PKTINFO).
    pub(crate) fn socket_for(&self, from: SocketAddr) -> io::Result<(usize, bool)> {
        let bound = |local: &SocketAddr| {
            local.port() == from.port()
                && local.is_ipv4() == from.is_ipv4()
                && (local.ip() == from.ip() || local.ip().is_unspecified())
        };
        self.sockets
            .iter()
            .position(|(local, _)| bound(local))
            .map(|i| (i, self.sockets[i].0.ip().is_unspecified()))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    format!("no socket of this server is bound to {from}"),
                )
            })
    }

    pub(crate) fn raw_socket(&self, index: usize) -> Option<&Socket> {
        self.sockets.get(index).map(|(_, s)| s)
    }

    /// Sends `answer` to `to` from local address `from` (where the request arrived).
    /// Many at once: [`crate::AnswerBatch`].
    pub fn send(&self, answer: &[u8], to: SocketAddr, from: SocketAddr) -> io::Result<()> {
        let (index, wildcard) = self.socket_for(from)?;
        let socket = &self.sockets[index].1;
        let mut control = [0u8; CONTROL_LEN];
        let control_len = if wildcard {
            write_pktinfo(&mut control, Some(from.ip()), 0)
        } else {
            0
        };
        let to = SockAddr::from(to);
        let buffers = [io::IoSlice::new(answer)];
        let mut message = MsgHdr::new().with_addr(&to).with_buffers(&buffers);
        if control_len > 0 {
            message = message.with_control(&control[..control_len]);
        }
        // The shard's own answers share the socket's send buffer: when it is full for a
        // moment, wait for room (bounded) rather than lose a committed request's answer.
        let mut waited = 0u32;
        loop {
            match socket.sendmsg(&message, libc::MSG_DONTWAIT) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && waited < MAX_WAITS => {
                    waited += 1;
                    std::thread::sleep(std::time::Duration::from_micros(50));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BufferSizes, bind_udp};

    #[test]
    fn a_late_answer_leaves_from_the_address_the_request_came_to() {
        for listen in ["127.0.0.1:0", "0.0.0.0:0"] {
            let l = bind_udp(
                listen.parse().unwrap(),
                BufferSizes {
                    recv: 1 << 16,
                    send: 1 << 16,
                },
            )
            .unwrap();
            let port = l.local.port();
            let sender = AnswerSender::new(std::slice::from_ref(&l)).unwrap();
            let dac = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            dac.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
            let from: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            sender
                .send(b"late answer", dac.local_addr().unwrap(), from)
                .unwrap();
            let mut buf = [0u8; 64];
            let (n, peer) = dac.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"late answer");
            assert_eq!(peer, from, "{listen}");
            let elsewhere: SocketAddr = "127.0.0.1:9".parse().unwrap();
            assert!(
                sender
                    .send(b"x", dac.local_addr().unwrap(), elsewhere)
                    .is_err()
            );
        }
    }
}
