//! The `recvmmsg(2)` / `sendmmsg(2)` backend.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use crate::backend::*;
use crate::cmsg::*;
use crate::socket::*;
use crate::{CONTROL_LEN, MAX_DATAGRAM, NAME_LEN};

// ---------------------------------------------------------------------------------------
// recvmmsg / sendmmsg
// ---------------------------------------------------------------------------------------

/// Batched receive and send with `recvmmsg(2)` / `sendmmsg(2)`.
pub struct MmsgBackend {
    pub(crate) listeners: Vec<Listener>,
    pub(crate) batch: usize,
    pub(crate) rx_data: Box<[u8]>,
    pub(crate) rx_names: Box<[NameBuf]>,
    pub(crate) rx_ctrl: Box<[ControlBuf]>,
    pub(crate) rx_iov: Box<[libc::iovec]>,
    pub(crate) rx_hdrs: Box<[libc::mmsghdr]>,
    pub(crate) tx_data: Box<[u8]>,
    pub(crate) tx_names: Box<[NameBuf]>,
    pub(crate) tx_ctrl: Box<[ControlBuf]>,
    pub(crate) tx_iov: Box<[libc::iovec]>,
    pub(crate) tx_hdrs: Box<[libc::mmsghdr]>,
    pub(crate) tx_meta: Box<[AnswerMeta]>,
    /// Answers in each `tx_hdrs` message (more than one with GSO).
    pub(crate) tx_segments: Box<[usize]>,
    pub(crate) gso: bool,
    /// Per datagram of the batch being decided: its packet info.
    pub(crate) batch_info: Box<[PacketInfo]>,
    /// The batch handed to the handler (kept empty between batches, allocation reused).
    pub(crate) batch_received: Vec<Received<'static>>,
    pub(crate) batch_answers: Vec<AnswerBuffer<'static>>,
    pub(crate) drops: DropCounters,
    pub(crate) stats: IoStats,
    /// One `pollfd` per listener, built once (an idle wait allocates nothing).
    pub(crate) pollfds: Box<[libc::pollfd]>,
    /// Receive headers whose in/out lengths the last `recvmmsg` may have changed: only those
    /// are reset before the next one (the pointers are set once, in `new`).
    pub(crate) rx_dirty: usize,
    /// One listener, made blocking: `recvmmsg` itself waits (up to SO_RCVTIMEO) for the
    /// first datagram of a batch, so a batch costs one receive and one send call.
    pub(crate) blocking: bool,
    /// The SO_RCVTIMEO last set on the blocking listener.
    pub(crate) receive_timeout: Option<Duration>,
    /// The last call found nothing: the next one waits in `poll` before receiving (several
    /// listeners only), instead of a `recvmmsg` per socket that would only say EAGAIN.
    pub(crate) idle: bool,
    /// System calls made by `poll_batch` (receive, poll, send): what the tests count.
    pub(crate) syscalls: u64,
    /// Handlers may hold a batch's answers ([`Batch::hold`]).
    pub(crate) can_hold: bool,
    /// Answer slots (`tx_data` buffers, `tx_meta` entries): `batch` without holding; with
    /// holding a ring several batches deep, each batch taking a contiguous run of it.
    pub(crate) tx_slots: usize,
    /// Decided batches whose answers are not sent yet, oldest first: held ones, and any
    /// decided after a held one (answers leave in the order their batches were decided).
    pub(crate) queued: std::collections::VecDeque<QueuedAnswers>,
    /// The end of the newest queued batch's slots.
    pub(crate) head: usize,
    /// Polled beside the listeners (its `pollfd` is the last one): another thread ends the
    /// wait with it ([`MmsgBackend::set_waker`]).
    pub(crate) waker: Option<std::sync::Arc<crate::Waker>>,
}

/// A decided batch whose answers wait in the slot ring.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueuedAnswers {
    /// The listener it arrived on (its answers leave from it).
    socket: usize,
    /// Its first slot; its answers: `tx_meta[first..first + answers]`.
    first: usize,
    answers: usize,
    /// The handler held it: [`Handler::release_held`] before it is sent.
    held: bool,
}

/// How many batches deep the slot ring of a holding backend is.
pub const HOLD_DEPTH: usize = 4;

pub(crate) fn zeroed_mmsghdrs(n: usize) -> Box<[libc::mmsghdr]> {
    (0..n)
        .map(|_| {
            // SAFETY: mmsghdr is a plain C struct of integers and raw pointers, for which all
            // zero bits are a valid value (null pointers, zero lengths).
            unsafe { core::mem::zeroed::<libc::mmsghdr>() }
        })
        .collect()
}

pub(crate) fn empty_iovecs(n: usize) -> Box<[libc::iovec]> {
    (0..n)
        .map(|_| libc::iovec {
            iov_base: core::ptr::null_mut(),
            iov_len: 0,
        })
        .collect()
}

impl MmsgBackend {
    pub fn new(listeners: Vec<Listener>, batch: usize) -> Self {
        let batch = batch.clamp(1, 1024);
        let drops = DropCounters::new(listeners.len());
        let pollfds = listeners
            .iter()
            .map(|l| libc::pollfd {
                fd: l.socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // With one socket there is nothing else to wait for: let recvmmsg block on it.
        let blocking = listeners.len() == 1 && listeners[0].socket.set_nonblocking(false).is_ok();
        let mut backend = MmsgBackend {
            listeners,
            batch,
            rx_data: vec![0u8; batch * MAX_DATAGRAM].into_boxed_slice(),
            rx_names: vec![NameBuf([0; 32]); batch].into_boxed_slice(),
            rx_ctrl: vec![ControlBuf([0; CONTROL_LEN]); batch].into_boxed_slice(),
            rx_iov: empty_iovecs(batch),
            rx_hdrs: zeroed_mmsghdrs(batch),
            tx_data: vec![0u8; batch * MAX_DATAGRAM].into_boxed_slice(),
            tx_names: vec![NameBuf([0; 32]); batch].into_boxed_slice(),
            tx_ctrl: vec![ControlBuf([0; CONTROL_LEN]); batch].into_boxed_slice(),
            tx_iov: empty_iovecs(batch),
            tx_hdrs: zeroed_mmsghdrs(batch),
            tx_meta: vec![AnswerMeta::default(); batch].into_boxed_slice(),
            tx_segments: vec![0; batch].into_boxed_slice(),
            gso: false,
            batch_info: vec![PacketInfo::default(); batch].into_boxed_slice(),
            batch_received: Vec::with_capacity(batch),
            batch_answers: Vec::with_capacity(batch),
            drops,
            stats: IoStats::default(),
            pollfds,
            rx_dirty: 0,
            blocking,
            receive_timeout: None,
            idle: false,
            syscalls: 0,
            can_hold: false,
            tx_slots: batch,
            queued: std::collections::VecDeque::new(),
            head: 0,
            waker: None,
        };
        backend.point_headers();
        backend
    }

    /// Points every receive header at its buffers, and every send header at its name and
    /// control buffers. The boxes never move or change size, so this holds for good.
    fn point_headers(&mut self) {
        for i in 0..self.batch {
            self.rx_iov[i] = libc::iovec {
                iov_base: self.rx_data[i * MAX_DATAGRAM..].as_mut_ptr().cast(),
                iov_len: MAX_DATAGRAM,
            };
            let h = &mut self.rx_hdrs[i].msg_hdr;
            h.msg_name = self.rx_names[i].0.as_mut_ptr().cast();
            h.msg_namelen = NAME_LEN as libc::socklen_t;
            h.msg_iov = &mut self.rx_iov[i];
            h.msg_iovlen = 1;
            h.msg_control = self.rx_ctrl[i].0.as_mut_ptr().cast();
            h.msg_controllen = CONTROL_LEN;
            h.msg_flags = 0;
            self.rx_hdrs[i].msg_len = 0;
            self.tx_hdrs[i].msg_hdr.msg_name = self.tx_names[i].0.as_mut_ptr().cast();
        }
    }

    pub fn stats(&self) -> IoStats {
        self.stats
    }

    /// Lets another thread end this backend's wait for datagrams ([`crate::Waker::wake`]):
    /// the wait becomes a `poll` over the listeners and the waker, so an idle batch costs a
    /// non-blocking `recvmmsg` and a `poll` (under load, one `recvmmsg` as before).
    pub fn set_waker(&mut self, waker: std::sync::Arc<crate::Waker>) {
        self.blocking = false;
        self.pollfds = self
            .listeners
            .iter()
            .map(|l| l.socket.as_raw_fd())
            .chain(core::iter::once(waker.raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        self.waker = Some(waker);
    }

    /// Lets handlers hold a batch's answers while later batches are decided
    /// ([`Batch::hold`]): the answer slots become a ring [`HOLD_DEPTH`] batches deep
    /// (`batch` × 4 KiB each).
    pub fn enable_holding(&mut self) {
        if !self.can_hold {
            self.tx_slots = HOLD_DEPTH * self.batch;
            self.tx_data = vec![0u8; self.tx_slots * MAX_DATAGRAM].into_boxed_slice();
            self.tx_meta = vec![AnswerMeta::default(); self.tx_slots].into_boxed_slice();
            self.queued = std::collections::VecDeque::with_capacity(self.tx_slots);
            self.can_hold = true;
        }
    }

    /// The free run of answer slots the next batch is received into: (first, length).
    fn free_run(&mut self) -> (usize, usize) {
        let Some(oldest) = self.queued.front() else {
            self.head = 0;
            return (0, self.batch.min(self.tx_slots));
        };
        let tail = oldest.first;
        let (start, len) = if self.head > tail {
            // In use: tail..head. Free: head..end, then 0..tail.
            let end = (self.head, self.tx_slots - self.head);
            let front = (0, tail);
            if end.1 >= self.batch || end.1 >= front.1 {
                end
            } else {
                front
            }
        } else {
            // Wrapped: in use tail..end and 0..head. Free: head..tail.
            (self.head, tail - self.head)
        };
        (start, len.min(self.batch))
    }

    /// Sends the queued batches' answers, oldest first: every one whose answers may go now,
    /// and with `wait`, the oldest one even if that means waiting for the handler.
    pub(crate) fn send_queued(&mut self, handler: &mut dyn Handler, mut wait: bool) {
        while let Some(&oldest) = self.queued.front() {
            if oldest.held {
                if !wait && !handler.held_ready() {
                    return;
                }
                handler.release_held();
            }
            wait = false;
            self.queued.pop_front();
            let fd = self.listeners[oldest.socket].socket.as_raw_fd();
            let messages = self.build_messages(oldest.first, oldest.answers);
            self.send_all(fd, messages);
        }
    }

    /// Sends every queued batch's answers, waiting for the handler as long as it takes.
    pub(crate) fn send_all_queued(&mut self, handler: &mut dyn Handler) {
        while !self.queued.is_empty() {
            self.send_queued(handler, true);
        }
    }

    /// Sends runs of same-size answers to one address as one UDP GSO (UDP_SEGMENT) message,
    /// when every socket supports it. Returns whether GSO is on.
    pub fn enable_gso(&mut self) -> bool {
        self.gso = self
            .listeners
            .iter()
            .all(|l| setsockopt_int(l.socket.as_raw_fd(), libc::SOL_UDP, UDP_SEGMENT, 0).is_ok());
        self.gso
    }

    /// Waits up to `timeout` for datagrams, decides every one with `handler`, sends the
    /// answers (one `sendmmsg` per socket and batch). Returns how many datagrams it read.
    ///
    /// Returns within about `timeout` when nothing arrives. System calls per batch: with one
    /// listener, one blocking `recvmmsg` (MSG_WAITFORONE, bounded by SO_RCVTIMEO) and one
    /// `sendmmsg`; with several, a non-blocking `recvmmsg` per socket while traffic flows, and
    /// after a call that found nothing, `poll` first and a `recvmmsg` per readable socket.
    ///
    /// With held answers ([`Batch::hold`]) it does not wait: it decides what is already
    /// in the sockets, and when nothing is, sends the oldest held batch's answers (waiting
    /// for the handler to release them) and returns.
    pub fn poll_batch(
        &mut self,
        timeout: Duration,
        handler: &mut dyn Handler,
    ) -> io::Result<usize> {
        if !self.queued.is_empty() {
            let mut total = 0;
            for s in 0..self.listeners.len() {
                match self.receive_and_answer(s, libc::MSG_DONTWAIT, handler) {
                    Ok(n) => total += n,
                    Err(e) => {
                        self.send_all_queued(handler);
                        return Err(e);
                    }
                }
            }
            if total == 0 {
                self.send_queued(handler, true);
            }
            return Ok(total);
        }
        if self.blocking {
            let flags = if timeout.is_zero() {
                libc::MSG_DONTWAIT
            } else {
                self.set_receive_timeout(timeout)?;
                libc::MSG_WAITFORONE
            };
            return self.receive_and_answer(0, flags, handler);
        }
        let mut total = 0;
        if !self.idle {
            for s in 0..self.listeners.len() {
                total += self.receive_and_answer(s, libc::MSG_DONTWAIT, handler)?;
            }
            if total > 0 {
                return Ok(total);
            }
        }
        if self.wait_readable(timeout)? {
            for s in 0..self.listeners.len() {
                if self.pollfds[s].revents != 0 {
                    total += self.receive_and_answer(s, libc::MSG_DONTWAIT, handler)?;
                }
            }
        }
        self.idle = total == 0;
        Ok(total)
    }

    /// Bounds the blocking receive by `timeout` (set only when it changes).
    fn set_receive_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        if self.receive_timeout != Some(timeout) {
            // A zero SO_RCVTIMEO would mean "forever": never below one microsecond.
            let bounded = timeout.max(Duration::from_micros(1));
            self.listeners[0].socket.set_read_timeout(Some(bounded))?;
            self.syscalls += 1;
            self.receive_timeout = Some(timeout);
        }
        Ok(())
    }

    /// Waits up to `timeout` for any listener to be readable; true when one is (`revents`
    /// in `pollfds` say which).
    pub(crate) fn wait_readable(&mut self, timeout: Duration) -> io::Result<bool> {
        for p in self.pollfds.iter_mut() {
            p.revents = 0;
        }
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        self.syscalls += 1;
        // SAFETY: `pollfds` is a live, initialised array of `pollfds.len()` pollfd values
        // owned by `self`, which poll may write `revents` into; it outlives the call.
        let rc = unsafe {
            libc::poll(
                self.pollfds.as_mut_ptr(),
                self.pollfds.len() as libc::nfds_t,
                ms,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if !is_transient(&e) {
                return Err(e);
            }
            return Ok(false);
        }
        if let Some(waker) = &self.waker
            && self
                .pollfds
                .get(self.listeners.len())
                .is_some_and(|p| p.revents != 0)
        {
            // Woken: the caller looks at what it was woken for after this batch.
            waker.drain();
            return Ok(true);
        }
        Ok(rc > 0)
    }

    /// One `recvmmsg` on listener `s` with `flags`, the handler over what it read, and the
    /// answers sent.
    pub(crate) fn receive_and_answer(
        &mut self,
        s: usize,
        flags: libc::c_int,
        handler: &mut dyn Handler,
    ) -> io::Result<usize> {
        let fd = self.listeners[s].socket.as_raw_fd();
        let local = self.listeners[s].local;
        // The answer slots this batch gets: when the ring is nearly full of held answers,
        // the oldest go first (waiting for the handler to release them).
        let (first_slot, slots) = loop {
            let (first, len) = self.free_run();
            if len >= (self.batch / HOLD_DEPTH).max(1) || self.queued.is_empty() {
                break (first, len);
            }
            self.send_queued(handler, true);
        };
        // The kernel rewrote the name and control lengths of the headers it filled (and, to
        // be safe, of the one after): restore their capacities. The pointers never change.
        for hdr in self.rx_hdrs.iter_mut().take(self.rx_dirty + 1) {
            hdr.msg_hdr.msg_namelen = NAME_LEN as libc::socklen_t;
            hdr.msg_hdr.msg_controllen = CONTROL_LEN;
        }
        self.syscalls += 1;
        // SAFETY: every header points at buffers owned by `self` (names, iovecs, data and
        // control areas, set in `point_headers` with these lengths), whose boxes never move
        // and live across the call; the kernel writes at most those lengths. `batch`
        // headers exist.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.rx_hdrs.as_mut_ptr(),
                slots as libc::c_uint,
                flags,
                core::ptr::null_mut(),
            )
        };
        self.rx_dirty = usize::try_from(n).unwrap_or(0);
        if n < 0 {
            let e = io::Error::last_os_error();
            if is_transient(&e) {
                return Ok(0);
            }
            self.stats.recv_errors += 1;
            return match e.raw_os_error() {
                // An ICMP error queued on the socket, or memory pressure: not fatal.
                Some(libc::ECONNREFUSED) | Some(libc::ENOMEM) | Some(libc::ENOBUFS) => Ok(0),
                _ => Err(e),
            };
        }
        let n = n as usize;
        self.stats.received += n as u64;
        self.stats.batches += 1;
        let mut datagrams = recycle(core::mem::take(&mut self.batch_received));
        let mut buffers = recycle_answers(core::mem::take(&mut self.batch_answers));
        let mut tx = self.tx_data[first_slot * MAX_DATAGRAM..(first_slot + slots) * MAX_DATAGRAM]
            .chunks_exact_mut(MAX_DATAGRAM);
        for i in 0..n {
            let hdr = &self.rx_hdrs[i];
            let len = (hdr.msg_len as usize).min(MAX_DATAGRAM);
            let namelen = (hdr.msg_hdr.msg_namelen as usize).min(NAME_LEN);
            let ctrllen = hdr.msg_hdr.msg_controllen.min(CONTROL_LEN);
            let info = parse_control(&self.rx_ctrl[i].0[..ctrllen]);
            self.drops.update(s, info.drops, &mut self.stats);
            let flags = hdr.msg_hdr.msg_flags;
            if flags & libc::MSG_CTRUNC != 0 {
                self.stats.control_truncated += 1;
                continue;
            }
            if flags & libc::MSG_TRUNC != 0 {
                self.stats.truncated += 1;
            }
            let Some(source) = parse_sockaddr(&self.rx_names[i].0[..namelen]) else {
                self.stats.unparsable += 1;
                continue;
            };
            let Some(out) = tx.next() else { break };
            self.batch_info[datagrams.len()] = info;
            datagrams.push(Received {
                data: &self.rx_data[i * MAX_DATAGRAM..i * MAX_DATAGRAM + len],
                source,
                destination: SocketAddr::new(info.local.unwrap_or(local.ip()), local.port()),
                received_ns: info.received_ns,
            });
            buffers.push(AnswerBuffer::new(out));
        }
        let mut batch = Batch::new(&datagrams, &mut buffers).holdable(self.can_hold);
        handler.batch(&mut batch);
        let held = batch.is_held();
        let mut answers = 0;
        for (slot, (d, b)) in datagrams.iter().zip(&buffers).enumerate() {
            let Some(len) = b.answer_len() else { continue };
            let info = self.batch_info[slot];
            self.tx_meta[first_slot + answers] = AnswerMeta {
                to: d.source,
                local: info.local,
                ifindex: info.ifindex,
                len: len.min(MAX_DATAGRAM),
                slot: first_slot + slot,
            };
            answers += 1;
        }
        self.batch_received = recycle(datagrams);
        self.batch_answers = recycle_answers(buffers);
        // Answers leave in the order their batches were decided: behind any queued ones.
        if answers > 0 && (held || !self.queued.is_empty()) {
            self.queued.push_back(QueuedAnswers {
                socket: s,
                first: first_slot,
                answers,
                held,
            });
            self.head = first_slot + n;
        } else if answers > 0 {
            let messages = self.build_messages(first_slot, answers);
            self.send_all(fd, messages);
        } else if held {
            // Nothing to send, but the handler counts on its release.
            handler.release_held();
        }
        self.send_queued(handler, false);
        Ok(n)
    }

    /// Turns this batch's answers into `sendmmsg` headers: one per answer, or with GSO one
    /// per group of answers to the same address from the same local address
    /// (UDP_SEGMENT: the kernel splits it into datagrams), for the answers
    /// `tx_meta[first..first + answers]`. Returns how many headers.
    ///
    /// With GSO the batch's answers are first grouped by route, longest first (answers of one
    /// batch are independent datagrams, so their order among themselves carries nothing): a
    /// message is then a run of one size plus at most one shorter answer last, which
    /// UDP_SEGMENT allows. So the NAKs of another length mixed into a storm of ACKs cost one
    /// more message per route and batch, not one message each.
    pub(crate) fn build_messages(&mut self, first: usize, answers: usize) -> usize {
        // `i` counts answers (and iovecs) from 0; their metadata is at `first + i`.
        let meta = first;
        if self.gso
            && answers > 1
            && let Some(batch) = self.tx_meta.get_mut(meta..meta + answers)
        {
            // In place, no allocation: a few hundred comparisons for a batch of 64.
            batch
                .sort_unstable_by(|a, b| a.route_key().cmp(&b.route_key()).then(b.len.cmp(&a.len)));
        }
        let mut m = 0;
        let mut i = 0;
        while i < answers {
            let first = self.tx_meta[meta + i];
            let mut run = 1;
            if self.gso {
                while i + run < answers
                    && run < GSO_MAX_SEGMENTS
                    && (run + 1) * first.len <= GSO_MAX_BYTES
                {
                    let next = self.tx_meta[meta + i + run];
                    if !next.same_route(&first) || next.len > first.len {
                        break;
                    }
                    run += 1;
                    if next.len < first.len {
                        // The one shorter answer a GSO message may end with.
                        break;
                    }
                }
            }
            for k in i..i + run {
                let answer = self.tx_meta[meta + k];
                self.tx_iov[k] = libc::iovec {
                    iov_base: self.tx_data[answer.slot * MAX_DATAGRAM..]
                        .as_mut_ptr()
                        .cast(),
                    iov_len: answer.len,
                };
            }
            // `msg_name` points at `tx_names[m]` for good (`point_headers`).
            let namelen = write_sockaddr(first.to, &mut self.tx_names[m].0);
            let mut ctrllen = write_pktinfo(&mut self.tx_ctrl[m].0, first.local, first.ifindex);
            if run > 1 {
                ctrllen = write_udp_segment(&mut self.tx_ctrl[m].0, ctrllen, first.len as u16);
                self.stats.gso_messages += 1;
            }
            let h = &mut self.tx_hdrs[m].msg_hdr;
            h.msg_namelen = namelen;
            h.msg_iov = &mut self.tx_iov[i];
            h.msg_iovlen = run;
            h.msg_control = if ctrllen == 0 {
                core::ptr::null_mut()
            } else {
                self.tx_ctrl[m].0.as_mut_ptr().cast()
            };
            h.msg_controllen = ctrllen;
            h.msg_flags = 0;
            self.tx_segments[m] = run;
            m += 1;
            i += run;
        }
        m
    }

    pub(crate) fn send_all(&mut self, fd: RawFd, count: usize) {
        let mut done = 0;
        let mut retries = 0;
        while done < count {
            self.syscalls += 1;
            // SAFETY: headers `done..count` were filled in this batch and point at buffers
            // owned by `self` that stay alive and unchanged during the call. MSG_DONTWAIT: a
            // full send buffer is handled below even when the socket is blocking.
            let rc = unsafe {
                libc::sendmmsg(
                    fd,
                    self.tx_hdrs[done..].as_mut_ptr(),
                    (count - done) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if rc > 0 {
                let sent = rc as usize;
                self.stats.sent += self.tx_segments[done..done + sent].iter().sum::<usize>() as u64;
                done += sent;
                continue;
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            if e.raw_os_error() == Some(libc::EAGAIN) && retries < 100 {
                // The send buffer is full: wait for room briefly.
                retries += 1;
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: `pfd` is one live pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, 10) };
                continue;
            }
            // The first message failed (bad destination, no route): skip it, keep the rest.
            if self.tx_segments[done] > 1 && self.gso {
                // The kernel or device refused segmentation offload: stop using it.
                tracing::warn!("UDP GSO send failed ({e}); sending answers one by one from now on");
                self.gso = false;
            }
            self.stats.send_errors += self.tx_segments[done] as u64;
            done += 1;
        }
    }

    /// Nothing is in the kernel's hands between batches: shutting down sends the held
    /// answers and needs no draining.
    pub fn shutdown(&mut self, handler: &mut dyn Handler) -> bool {
        self.send_all_queued(handler);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    /// Answers every datagram with its own bytes.
    struct Echo;

    impl Handler for Echo {
        fn batch(&mut self, batch: &mut Batch<'_, '_>) {
            for (d, answer) in batch.iter_mut() {
                let len = d.data.len();
                answer.buffer()[..len].copy_from_slice(d.data);
                answer.send(len);
            }
        }
    }

    fn listener() -> Listener {
        let sizes = BufferSizes {
            recv: 1 << 20,
            send: 1 << 20,
        };
        bind_udp("127.0.0.1:0".parse().unwrap(), sizes).unwrap()
    }

    fn client() -> UdpSocket {
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c
    }

    /// Sends `data` to `to` from `c` a little later, from another thread: the datagram then
    /// (usually) arrives while `poll_batch` waits, the case that costs the most calls.
    fn send_later(c: &UdpSocket, data: Vec<u8>, to: SocketAddr) -> std::thread::JoinHandle<()> {
        let c = c.try_clone().unwrap();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            c.send_to(&data, to).unwrap();
        })
    }

    fn answer(c: &UdpSocket) -> Vec<u8> {
        let mut buf = [0u8; 64];
        let (len, _) = c.recv_from(&mut buf).expect("an answer");
        buf[..len].to_vec()
    }

    // Echo's budget: one receive and one send call per batch, also right after an idle wait;
    // answers reach each sender intact across batches (the headers are reused, only their
    // lengths reset).
    #[test]
    fn one_listener_costs_one_receive_and_one_send_per_batch() {
        let l = listener();
        let addr = l.local;
        let mut b = MmsgBackend::new(vec![l], 16);
        assert!(b.blocking);
        // One timeout throughout, as the runtime does (a new one costs a setsockopt).
        let timeout = Duration::from_millis(50);
        // Nothing arrives: the call returns (the wait is bounded by the timeout).
        assert_eq!(b.poll_batch(timeout, &mut Echo).unwrap(), 0);
        let (c1, c2) = (client(), client());
        for round in 0..3u8 {
            let later = send_later(&c1, vec![round; 20], addr);
            if round > 0 {
                // Also a batch already queued when the call starts.
                later.join().unwrap();
            }
            c2.send_to(&[round + 100; 24], addr).unwrap();
            let mut got = 0;
            while got < 2 {
                let before = b.syscalls;
                let n = b.poll_batch(timeout, &mut Echo).unwrap();
                assert_eq!(
                    b.syscalls - before,
                    if n > 0 { 2 } else { 1 },
                    "round {round}"
                );
                got += n;
            }
            assert_eq!(answer(&c1), vec![round; 20]);
            assert_eq!(answer(&c2), vec![round + 100; 24]);
        }
        assert_eq!(b.stats().sent, 6);
    }

    /// Answers each datagram with its own bytes, the answers of this batch all in one go:
    /// what the GSO grouping works on.
    fn echo_all(b: &mut MmsgBackend, expected: usize) {
        let mut got = 0;
        while got < expected {
            got += b.poll_batch(Duration::from_millis(200), &mut Echo).unwrap();
        }
    }

    /// A backend with GSO on, and its address; `None` (with a note) where the kernel
    /// refuses UDP_SEGMENT.
    fn gso_backend() -> Option<(MmsgBackend, SocketAddr)> {
        let l = listener();
        let addr = l.local;
        let mut b = MmsgBackend::new(vec![l], 16);
        if !b.enable_gso() {
            eprintln!("NOTE: this kernel refuses UDP_SEGMENT; nothing to check");
            return None;
        }
        Some((b, addr))
    }

    fn answers(c: &UdpSocket, n: usize) -> Vec<Vec<u8>> {
        let mut buf = [0u8; 64];
        let mut out: Vec<Vec<u8>> = (0..n)
            .map(|_| {
                let (len, _) = c.recv_from(&mut buf).expect("an answer");
                buf[..len].to_vec()
            })
            .collect();
        out.sort();
        out
    }

    // Issue 13 (GSO): the answers of one batch are grouped per route before they are cut
    // into UDP_SEGMENT messages, and a message may end with one shorter answer (a NAK among
    // ACKs). Two DACs' datagrams arrive interleaved, one of them with a shorter one in the
    // middle: two messages in all, one per DAC, and every DAC gets each of its answers
    // intact, as separate datagrams. Taking runs in arrival order instead gives no GSO
    // message at all here (every run is one answer long).
    #[test]
    fn gso_groups_a_batch_per_route_and_ends_a_message_with_one_shorter_answer() {
        let Some((mut b, addr)) = gso_backend() else {
            return;
        };
        let (c1, c2) = (client(), client());
        let mut sent1 = Vec::new();
        let mut sent2 = Vec::new();
        for k in 0..3u8 {
            let d1 = if k == 1 {
                vec![0x10 + k; 20]
            } else {
                vec![0x10 + k; 24]
            };
            c1.send_to(&d1, addr).unwrap();
            sent1.push(d1);
            let d2 = vec![0x20 + k; 24];
            c2.send_to(&d2, addr).unwrap();
            sent2.push(d2);
        }
        let d1 = vec![0x13; 24];
        c1.send_to(&d1, addr).unwrap();
        sent1.push(d1);
        // Let the seven datagrams queue, so that one receive takes them all.
        std::thread::sleep(Duration::from_millis(50));
        echo_all(&mut b, 7);
        sent1.sort();
        sent2.sort();
        assert_eq!(answers(&c1, 4), sent1);
        assert_eq!(answers(&c2, 3), sent2);
        assert_eq!(b.stats().sent, 7);
        assert_eq!(b.stats().gso_messages, 2, "one message per DAC");
    }

    // Within a route, the message takes answers of one size, then at most one shorter one:
    // sizes 30, 20, 20 (sorted longest first) are two messages (30 + 20, then 20), never one
    // that the kernel would cut at the wrong places.
    #[test]
    fn gso_never_puts_a_longer_answer_after_a_shorter_one() {
        let Some((mut b, addr)) = gso_backend() else {
            return;
        };
        let c = client();
        let sent = vec![vec![1u8; 20], vec![2u8; 30], vec![3u8; 20]];
        for d in &sent {
            c.send_to(d, addr).unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        echo_all(&mut b, 3);
        let mut sent = sent;
        sent.sort();
        assert_eq!(answers(&c, 3), sent);
        assert_eq!(
            b.stats().gso_messages,
            1,
            "30 + 20 in one message, 20 alone"
        );
        assert_eq!(b.stats().sent, 3);
    }

    /// Records each datagram's kernel receive time.
    struct Times(Vec<Option<u64>>);

    impl Handler for Times {
        fn batch(&mut self, batch: &mut Batch<'_, '_>) {
            self.0
                .extend(batch.datagrams().iter().map(|d| d.received_ns));
        }
    }

    // RFC 5176 §3.5 overload shedding needs each datagram's age: the kernel's receive time
    // (SO_TIMESTAMPNS) comes with every datagram, in the control area beside the packet info
    // (none is cut), and it is the receive time, not the decision time.
    #[test]
    fn kernel_receive_time_comes_with_each_datagram() {
        let l = listener();
        let addr = l.local;
        let mut b = MmsgBackend::new(vec![l], 16);
        let c = client();
        let wall_ns = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        };
        // The kernel turns receive stamping on for the whole stack lazily (a static key set
        // from a work queue when the first socket asks); until then a datagram is stamped
        // when it is read. Give it a moment, as a running server has had.
        std::thread::sleep(Duration::from_millis(200));
        let before = wall_ns();
        c.send_to(&[1; 20], addr).unwrap();
        c.send_to(&[2; 20], addr).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let mut times = Times(Vec::new());
        while times.0.len() < 2 {
            b.poll_batch(Duration::from_secs(5), &mut times).unwrap();
        }
        let after = wall_ns();
        assert_eq!(b.stats().control_truncated, 0);
        for t in times.0 {
            let t = t.expect("a kernel receive time");
            assert!(t >= before && t <= after, "{before} <= {t} <= {after}");
            // Received before the 50 ms wait, not when read.
            assert!(after - t >= 40_000_000, "age {} ns", after - t);
        }
    }

    // Several listeners: a call after an idle one waits in poll first, then reads only the
    // readable socket: poll, one receive, one send.
    #[test]
    fn several_listeners_poll_first_after_an_idle_call() {
        let (l1, l2) = (listener(), listener());
        let addr2 = l2.local;
        let mut b = MmsgBackend::new(vec![l1, l2], 16);
        assert!(!b.blocking);
        assert_eq!(
            b.poll_batch(Duration::from_millis(5), &mut Echo).unwrap(),
            0
        );
        assert!(b.idle);
        let c = client();
        let later = send_later(&c, vec![7; 20], addr2);
        let mut got = 0;
        while got == 0 {
            let before = b.syscalls;
            got = b.poll_batch(Duration::from_secs(10), &mut Echo).unwrap();
            // Idle: poll, then (when it said readable) one receive and one send.
            assert_eq!(b.syscalls - before, if got > 0 { 3 } else { 1 });
        }
        later.join().unwrap();
        assert_eq!(answer(&c), vec![7; 20]);
        assert!(!b.idle);
    }

    /// Echoes and holds every batch; a batch's answers may go once `released` says so.
    struct HoldingEcho {
        /// Batches held, oldest first: whether each may be released yet.
        may_go: std::collections::VecDeque<std::rc::Rc<core::cell::Cell<bool>>>,
        next: std::rc::Rc<core::cell::Cell<bool>>,
        released: usize,
    }

    impl Handler for HoldingEcho {
        fn batch(&mut self, batch: &mut Batch<'_, '_>) {
            for (d, answer) in batch.iter_mut() {
                let len = d.data.len();
                answer.buffer()[..len].copy_from_slice(d.data);
                answer.send(len);
            }
            assert!(batch.hold(), "a holding backend holds");
            self.may_go.push_back(std::rc::Rc::clone(&self.next));
        }
        fn release_held(&mut self) {
            let gate = self.may_go.pop_front().expect("one release per held batch");
            assert!(gate.get(), "released before its time");
            self.released += 1;
        }
        fn held_ready(&mut self) -> bool {
            self.may_go.front().is_some_and(|g| g.get())
        }
    }

    // Pipelined group commit (docs/DURABILITY.md): a held batch's answers stay in the
    // backend while later batches are decided, leave only once released, in the order
    // their batches were decided, and nothing is lost at shutdown.
    #[test]
    fn held_answers_leave_only_when_released_and_in_order() {
        let l = listener();
        let addr = l.local;
        let mut b = MmsgBackend::new(vec![l], 8);
        b.enable_holding();
        let first_gate = std::rc::Rc::new(core::cell::Cell::new(false));
        let mut h = HoldingEcho {
            may_go: Default::default(),
            next: std::rc::Rc::clone(&first_gate),
            released: 0,
        };
        let c = client();
        c.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        c.send_to(&[1; 20], addr).unwrap();
        while b.poll_batch(Duration::from_millis(50), &mut h).unwrap() == 0 {}
        // Held. A second batch is decided while the first waits (release_held must not be
        // reached: it would assert).
        let second_gate = std::rc::Rc::new(core::cell::Cell::new(false));
        h.next = std::rc::Rc::clone(&second_gate);
        c.send_to(&[2; 20], addr).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(b.poll_batch(Duration::ZERO, &mut h).unwrap(), 1);
        let mut buf = [0u8; 64];
        assert!(
            c.recv_from(&mut buf).is_err(),
            "nothing leaves before its release"
        );
        assert_eq!(b.queued.len(), 2);
        // The first batch may go: it leaves, the second stays.
        first_gate.set(true);
        c.send_to(&[3; 20], addr).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let third_gate = std::rc::Rc::new(core::cell::Cell::new(true));
        h.next = std::rc::Rc::clone(&third_gate);
        assert_eq!(b.poll_batch(Duration::ZERO, &mut h).unwrap(), 1);
        assert_eq!(answer(&c), vec![1; 20]);
        assert!(
            c.recv_from(&mut buf).is_err(),
            "the second batch is not released"
        );
        // The third batch is ready but queued behind the second: order is kept.
        assert_eq!(b.queued.len(), 2);
        second_gate.set(true);
        b.shutdown(&mut h);
        assert_eq!(answer(&c), vec![2; 20]);
        assert_eq!(answer(&c), vec![3; 20]);
        assert_eq!(h.released, 3);
        assert!(b.queued.is_empty());
        assert_eq!(b.stats().sent, 3);
    }
}
