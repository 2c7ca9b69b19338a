//! Settled answers sent in batches: a thread that settles many requests at once (the action
//! dispatcher after a burst of agent results) queues their answers here and sends them with
//! one `sendmmsg(2)` per socket, instead of one `sendmsg(2)` each.
//!
//! Owns: the queued answers' bytes and addresses, the `mmsghdr`/`iovec`/name/control arrays
//! built for the call (rebuilt at each flush, after every push, so no pointer outlives a
//! reallocation), and the bounded wait for room in a full send buffer. Must not touch: what
//! the answers say, or which socket an address belongs to ([`AnswerSender`] decides that).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

use crate::cmsg::{ControlBuf, NameBuf, write_pktinfo, write_sockaddr};
use crate::late::AnswerSender;
use crate::mmsg::{empty_iovecs, zeroed_mmsghdrs};
use crate::{CONTROL_LEN, MAX_DATAGRAM};

/// The most messages one `sendmmsg` call is given (the kernel's UIO_MAXIOV).
const MAX_PER_CALL: usize = 1024;

/// How many times a full send buffer is waited for (10 ms each) before the rest of that
/// socket's answers are counted as not sent.
const MAX_WAITS: u32 = 5;

#[derive(Debug, Clone, Copy)]
struct Queued {
    socket: usize,
    offset: usize,
    len: usize,
    to: SocketAddr,
    /// The local address to send from (IP_PKTINFO) when the socket is bound to a wildcard.
    from: Option<IpAddr>,
}

/// What a flush did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    pub sent: usize,
    pub failed: usize,
    /// The `sendmmsg` calls made.
    pub calls: usize,
}

/// Answers waiting to be sent by [`AnswerBatch::flush`]; its buffers are kept between
/// flushes (nothing is allocated per answer once warm).
#[derive(Default)]
pub struct AnswerBatch {
    data: Vec<u8>,
    queued: Vec<Queued>,
    names: Vec<NameBuf>,
    controls: Vec<ControlBuf>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers in `iovecs` and `headers` point only into this batch's own
// vectors; they are written in `send_run` right before the `sendmmsg` that reads them and are
// never dereferenced anywhere else, so moving the batch to another thread (with its vectors)
// leaves nothing shared and nothing dangling that is ever used.
unsafe impl Send for AnswerBatch {}

impl core::fmt::Debug for AnswerBatch {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("AnswerBatch")
            .field("queued", &self.queued.len())
            .finish_non_exhaustive()
    }
}

impl AnswerBatch {
    pub fn new() -> Self {
        AnswerBatch::default()
    }

    pub fn len(&self) -> usize {
        self.queued.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// Queues `answer` to `to` from local address `from` (where the request arrived) on one
    /// of `sender`'s sockets. `Err` when no socket of the server is bound to `from` or the
    /// answer is longer than a RADIUS packet; nothing is queued then.
    pub fn push(
        &mut self,
        sender: &AnswerSender,
        answer: &[u8],
        to: SocketAddr,
        from: SocketAddr,
    ) -> io::Result<()> {
        if answer.len() > MAX_DATAGRAM {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an answer longer than a RADIUS packet",
            ));
        }
        let (socket, wildcard) = sender.socket_for(from)?;
        let offset = self.data.len();
        self.data.extend_from_slice(answer);
        self.queued.push(Queued {
            socket,
            offset,
            len: answer.len(),
            to,
            from: wildcard.then_some(from.ip()),
        });
        Ok(())
    }

    /// Sends every queued answer, one `sendmmsg` per socket (and per 1,024 answers). A full
    /// send buffer is waited for, briefly; an answer the kernel refuses (no route) is counted
    /// failed and the rest still go. The batch is empty afterwards.
    pub fn flush(&mut self, sender: &AnswerSender) -> Flushed {
        let mut report = Flushed::default();
        if self.queued.is_empty() {
            return report;
        }
        // Answers leave grouped by socket, each socket's in the order they were queued. With
        // one socket (the usual case) they already are: the stable sort, which allocates its
        // scratch space, runs only when they are not.
        if !self.queued.is_sorted_by_key(|q| q.socket) {
            self.queued.sort_by_key(|q| q.socket);
        }
        let mut start = 0;
        while start < self.queued.len() {
            let socket = self.queued[start].socket;
            let end = self.queued[start..]
                .iter()
                .position(|q| q.socket != socket)
                .map_or(self.queued.len(), |n| start + n);
            let mut first = start;
            while first < end {
                let last = end.min(first + MAX_PER_CALL);
                self.send_run(sender, socket, first, last, &mut report);
                first = last;
            }
            start = end;
        }
        self.queued.clear();
        self.data.clear();
        report
    }

    /// Builds the headers of `queued[first..last]` (one socket) and sends them.
    fn send_run(
        &mut self,
        sender: &AnswerSender,
        socket: usize,
        first: usize,
        last: usize,
        report: &mut Flushed,
    ) {
        let count = last - first;
        if self.headers.len() < count {
            self.headers = zeroed_mmsghdrs(count).into_vec();
            self.iovecs = empty_iovecs(count).into_vec();
            self.names = vec![NameBuf([0; 32]); count];
            self.controls = vec![ControlBuf([0; CONTROL_LEN]); count];
        }
        for (k, q) in self.queued[first..last].iter().enumerate() {
            self.iovecs[k] = libc::iovec {
                iov_base: self.data[q.offset..].as_mut_ptr().cast(),
                iov_len: q.len,
            };
            let namelen = write_sockaddr(q.to, &mut self.names[k].0);
            let ctrllen = write_pktinfo(&mut self.controls[k].0, q.from, 0);
            let h = &mut self.headers[k].msg_hdr;
            h.msg_name = self.names[k].0.as_mut_ptr().cast();
            h.msg_namelen = namelen;
            h.msg_iov = &mut self.iovecs[k];
            h.msg_iovlen = 1;
            h.msg_control = if ctrllen == 0 {
                core::ptr::null_mut()
            } else {
                self.controls[k].0.as_mut_ptr().cast()
            };
            h.msg_controllen = ctrllen;
            h.msg_flags = 0;
            self.headers[k].msg_len = 0;
        }
        let Some(fd) = sender.raw_socket(socket).map(|s| s.as_raw_fd()) else {
            report.failed += count;
            return;
        };
        let mut done = 0;
        let mut waits = 0;
        while done < count {
            report.calls += 1;
            // SAFETY: headers `done..count` were filled just above and point into
            // `self.names`, `self.iovecs`, `self.controls` and `self.data`, none of which is
            // resized or moved until the call returns; the kernel only reads them (and
            // writes each header's `msg_len`). MSG_DONTWAIT: a full buffer is handled below.
            let rc = unsafe {
                libc::sendmmsg(
                    fd,
                    self.headers[done..].as_mut_ptr(),
                    (count - done) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if rc > 0 {
                let sent = rc as usize;
                report.sent += sent;
                done += sent;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) if waits < MAX_WAITS => {
                    waits += 1;
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: `pfd` is one live pollfd for the duration of the call.
                    unsafe { libc::poll(&mut pfd, 1, 10) };
                }
                Some(libc::EAGAIN) => {
                    report.failed += count - done;
                    tracing::warn!(
                        "late answers: the send buffer stayed full; {} answers not sent",
                        count - done
                    );
                    return;
                }
                _ => {
                    // The first message failed (no route, say): skip it, send the rest.
                    tracing::warn!(
                        "late answer to {} not sent: {e}",
                        self.queued[first + done].to
                    );
                    report.failed += 1;
                    done += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BufferSizes, bind_udp};
    use std::time::Duration;

    #[test]
    fn a_batch_of_late_answers_leaves_in_one_call_from_the_addresses_the_requests_came_to() {
        for listen in ["127.0.0.1:0", "0.0.0.0:0"] {
            let l = bind_udp(
                listen.parse().unwrap(),
                BufferSizes {
                    recv: 1 << 20,
                    send: 1 << 20,
                },
            )
            .unwrap();
            let port = l.local.port();
            let sender = AnswerSender::new(std::slice::from_ref(&l)).unwrap();
            let dacs: Vec<std::net::UdpSocket> = (0..3)
                .map(|_| {
                    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    s
                })
                .collect();
            let from: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let mut batch = AnswerBatch::new();
            for (i, dac) in dacs.iter().enumerate() {
                for n in 0..100 {
                    let answer = format!("answer {i}-{n}");
                    batch
                        .push(&sender, answer.as_bytes(), dac.local_addr().unwrap(), from)
                        .unwrap();
                }
            }
            let elsewhere: SocketAddr = "127.0.0.1:9".parse().unwrap();
            assert!(
                batch
                    .push(&sender, b"x", dacs[0].local_addr().unwrap(), elsewhere)
                    .is_err(),
                "no socket is bound to {elsewhere}"
            );
            assert_eq!(batch.len(), 300);
            let report = batch.flush(&sender);
            assert_eq!(report.sent, 300, "{listen}: {report:?}");
            assert_eq!(report.failed, 0);
            assert_eq!(report.calls, 1, "one sendmmsg for one socket's 300 answers");
            assert!(batch.is_empty());
            let mut buf = [0u8; 64];
            for (i, dac) in dacs.iter().enumerate() {
                for n in 0..100 {
                    let (len, peer) = dac.recv_from(&mut buf).unwrap();
                    assert_eq!(
                        &buf[..len],
                        format!("answer {i}-{n}").as_bytes(),
                        "in order"
                    );
                    assert_eq!(peer, from, "{listen}");
                }
            }
            // Warm: a second round reuses the buffers and still says what it did.
            batch
                .push(&sender, b"again", dacs[1].local_addr().unwrap(), from)
                .unwrap();
            assert_eq!(batch.flush(&sender).sent, 1);
            let (len, _) = dacs[1].recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..len], b"again");
        }
    }
    #[test]
    fn answers_from_two_sockets_leave_from_each_in_the_order_queued() {
        let sizes = BufferSizes {
            recv: 1 << 20,
            send: 1 << 20,
        };
        let a = bind_udp("127.0.0.1:0".parse().unwrap(), sizes).unwrap();
        let b = bind_udp("127.0.0.1:0".parse().unwrap(), sizes).unwrap();
        let (from_a, from_b) = (a.local, b.local);
        let sender = AnswerSender::new(&[a, b]).unwrap();
        let dac = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        dac.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let to = dac.local_addr().unwrap();
        let mut batch = AnswerBatch::new();
        // Interleaved, and longer than the stable sort's small-slice cut-off.
        for n in 0..40 {
            let (from, tag) = if n % 2 == 0 {
                (from_b, "b")
            } else {
                (from_a, "a")
            };
            batch
                .push(&sender, format!("{tag}{n}").as_bytes(), to, from)
                .unwrap();
        }
        let report = batch.flush(&sender);
        assert_eq!((report.sent, report.failed, report.calls), (40, 0, 2));
        let mut got = std::collections::HashMap::<SocketAddr, Vec<String>>::new();
        let mut buf = [0u8; 64];
        for _ in 0..40 {
            let (len, peer) = dac.recv_from(&mut buf).unwrap();
            got.entry(peer)
                .or_default()
                .push(String::from_utf8_lossy(&buf[..len]).into_owned());
        }
        let want = |tag: &str, first: usize| -> Vec<String> {
            (first..40)
                .step_by(2)
                .map(|n| format!("{tag}{n}"))
                .collect()
        };
        assert_eq!(
            got[&from_a],
            want("a", 1),
            "from the socket it was queued for, in order"
        );
        assert_eq!(got[&from_b], want("b", 0));
    }
}
