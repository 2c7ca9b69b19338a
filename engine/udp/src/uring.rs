//! The io_uring backend: multishot `recvmsg` into a provided-buffer ring, batched `sendmsg`; probed at start.

use core::mem::{ManuallyDrop, size_of};
use std::alloc::Layout;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use io_uring::types::{BufRingEntry, Fd, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, opcode};

use crate::backend::*;
use crate::cmsg::*;
use crate::socket::*;
use crate::{CONTROL_LEN, MAX_DATAGRAM, NAME_LEN};

// ---------------------------------------------------------------------------------------
// io_uring
// ---------------------------------------------------------------------------------------

/// Provided buffers in the ring (a power of two).
pub(crate) const URING_BUFFERS: u16 = 512;
/// One provided buffer: the recvmsg_out header, the name, the control area, then payload.
pub(crate) const URING_BUF_LEN: usize = 16 + NAME_LEN + CONTROL_LEN + MAX_DATAGRAM + 112;
pub(crate) const BUFFER_GROUP: u16 = 0;
pub(crate) const TAG_SHIFT: u32 = 56;
pub(crate) const TAG_RECV: u64 = 1;
pub(crate) const TAG_SEND: u64 = 2;
pub(crate) const TAG_CANCEL: u64 = 3;

/// One answer being sent by io_uring: every byte the kernel reads for this `sendmsg`.
#[repr(C)]
pub(crate) struct SendSlot {
    pub(crate) hdr: libc::msghdr,
    pub(crate) iov: libc::iovec,
    pub(crate) name: NameBuf,
    pub(crate) ctrl: ControlBuf,
    pub(crate) data: [u8; MAX_DATAGRAM],
}

/// io_uring: one multishot `recvmsg` per socket, reading into a provided-buffer ring, and one
/// `sendmsg` per answer, submitted together at the end of each batch.
///
/// Memory shared with the kernel (the buffer ring, the provided buffers, the receive
/// `msghdr` and the send slots) is held through raw pointers and freed only after every
/// operation that uses it has completed; if shutdown could not confirm that, it is leaked.
pub struct UringBackend {
    pub(crate) ring: ManuallyDrop<IoUring>,
    pub(crate) listeners: Vec<Listener>,
    pub(crate) batch: usize,
    /// The `msghdr` template of the multishot receives (only its lengths are used).
    pub(crate) recv_msghdr: *mut libc::msghdr,
    /// The provided-buffer ring (page aligned, `URING_BUFFERS` entries).
    pub(crate) buf_ring: *mut BufRingEntry,
    pub(crate) buf_ring_layout: Layout,
    pub(crate) buf_ring_registered: bool,
    /// Local copy of the ring's tail.
    pub(crate) tail: u16,
    /// `URING_BUFFERS * URING_BUF_LEN` octets of provided buffers.
    pub(crate) buffers: *mut u8,
    pub(crate) buffers_layout: Layout,
    pub(crate) slots: Vec<*mut SendSlot>,
    pub(crate) free_slots: Vec<u32>,
    pub(crate) sends_in_flight: usize,
    /// Receive completions taken from the ring and not yet decided (each holds its buffer).
    pub(crate) pending: std::collections::VecDeque<(u64, i32, u32)>,
    /// Whether each socket's multishot receive is armed.
    pub(crate) armed: Vec<bool>,
    pub(crate) stopping: bool,
    /// True once shutdown saw every operation complete: memory may be freed.
    pub(crate) quiesced: bool,
    /// Per datagram of the batch being decided: (socket, provided buffer, send slot, info).
    pub(crate) batch_meta: Vec<(usize, u16, u32, PacketInfo)>,
    /// The batch handed to the handler (kept empty between batches, allocation reused).
    pub(crate) batch_received: Vec<Received<'static>>,
    pub(crate) batch_answers: Vec<AnswerBuffer<'static>>,
    pub(crate) drops: DropCounters,
    pub(crate) stats: IoStats,
}

/// Why io_uring cannot be used here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UringUnavailable(pub String);

pub(crate) fn kernel_at_least(major: u32, minor: u32) -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

pub(crate) fn describe_setup_error(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => {
            "io_uring_setup was refused (EPERM): a seccomp filter (containers often \
                              have one) or the kernel.io_uring_disabled sysctl blocks io_uring"
                .to_string()
        }
        Some(libc::ENOSYS) => "the kernel has no io_uring (ENOSYS)".to_string(),
        Some(libc::ENOMEM) => "io_uring_setup failed with ENOMEM: the locked-memory limit \
                               (ulimit -l) is too small"
            .to_string(),
        _ => format!("io_uring_setup failed: {e}"),
    }
}

/// Checks that this kernel and sandbox allow what the io_uring backend uses: the ring itself,
/// `IORING_FEAT_EXT_ARG`, the `recvmsg`, `sendmsg` and `async_cancel` operations, a
/// provided-buffer ring, and multishot `recvmsg` (Linux 6.0).
///
/// Setting `DYNAUTH_DISABLE_URING` in the environment makes the probe fail (for testing the
/// fallback, or to rule io_uring out without changing the configuration).
pub fn probe_uring() -> Result<(), UringUnavailable> {
    let fail = |m: String| Err(UringUnavailable(m));
    if std::env::var_os("DYNAUTH_DISABLE_URING").is_some() {
        return fail("disabled by the DYNAUTH_DISABLE_URING environment variable".into());
    }
    let ring = match IoUring::new(8) {
        Ok(r) => r,
        Err(e) => return fail(describe_setup_error(&e)),
    };
    if !ring.params().is_feature_ext_arg() {
        return fail("the kernel lacks IORING_FEAT_EXT_ARG (Linux 5.11)".into());
    }
    let mut probe = io_uring::Probe::new();
    if let Err(e) = ring.submitter().register_probe(&mut probe) {
        return fail(format!("io_uring opcode probe failed: {e}"));
    }
    for (code, name) in [
        (opcode::RecvMsgMulti::CODE, "recvmsg"),
        (opcode::SendMsg::CODE, "sendmsg"),
        (opcode::AsyncCancel::CODE, "async_cancel"),
    ] {
        if !probe.is_supported(code) {
            return fail(format!("io_uring does not support {name} here"));
        }
    }
    if !kernel_at_least(6, 0) {
        return fail("multishot recvmsg needs Linux 6.0 or later".into());
    }
    let layout = Layout::from_size_align(8 * size_of::<BufRingEntry>(), 4096)
        .map_err(|e| UringUnavailable(e.to_string()))?;
    // SAFETY: the layout has a non-zero size.
    let mem = unsafe { std::alloc::alloc_zeroed(layout) };
    if mem.is_null() {
        return fail("out of memory".into());
    }
    // SAFETY: `mem` is a zeroed, page-aligned area of 8 ring entries that stays allocated
    // until after it is unregistered below (or the ring is dropped on the error path, which
    // tears the registration down before `mem` is freed).
    let registered = unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(mem as u64, 8, 0, 0)
    };
    let result = match registered {
        Ok(()) => {
            let _ = ring.submitter().unregister_buf_ring(0);
            Ok(())
        }
        Err(e) => fail(format!(
            "io_uring provided-buffer rings are not available: {e}"
        )),
    };
    drop(ring);
    // SAFETY: `mem` came from `alloc_zeroed(layout)` and the ring that knew it is gone.
    unsafe { std::alloc::dealloc(mem, layout) };
    result
}

pub(crate) fn build_ring(entries: u32) -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_defer_taskrun()
        .build(entries)
        .or_else(|_| IoUring::builder().setup_coop_taskrun().build(entries))
        .or_else(|_| IoUring::new(entries))
}

impl UringBackend {
    pub fn new(listeners: Vec<Listener>, batch: usize) -> Result<Self, UringUnavailable> {
        let batch = batch.clamp(1, 1024);
        let ring = build_ring(2048).map_err(|e| UringUnavailable(describe_setup_error(&e)))?;
        let err = |e: String| UringUnavailable(e);
        let buf_ring_layout =
            Layout::from_size_align(usize::from(URING_BUFFERS) * size_of::<BufRingEntry>(), 4096)
                .map_err(|e| err(e.to_string()))?;
        let buffers_layout =
            Layout::from_size_align(usize::from(URING_BUFFERS) * URING_BUF_LEN, 64)
                .map_err(|e| err(e.to_string()))?;
        // SAFETY: both layouts have non-zero sizes.
        let (buf_ring, buffers) = unsafe {
            (
                std::alloc::alloc_zeroed(buf_ring_layout).cast::<BufRingEntry>(),
                std::alloc::alloc_zeroed(buffers_layout),
            )
        };
        if buf_ring.is_null() || buffers.is_null() {
            return Err(err("out of memory for io_uring buffers".into()));
        }
        // SAFETY: msghdr is a plain C struct for which all zero bits are valid.
        let mut template: libc::msghdr = unsafe { core::mem::zeroed() };
        template.msg_namelen = NAME_LEN as libc::socklen_t;
        template.msg_controllen = CONTROL_LEN;
        let recv_msghdr = Box::into_raw(Box::new(template));
        let slot_count = batch * 2;
        let slots: Vec<*mut SendSlot> = (0..slot_count)
            .map(|_| {
                // SAFETY: SendSlot holds only C structs and byte arrays, all valid when zeroed.
                let slot: SendSlot = unsafe { core::mem::zeroed() };
                Box::into_raw(Box::new(slot))
            })
            .collect();
        let n = listeners.len();
        let mut backend = UringBackend {
            ring: ManuallyDrop::new(ring),
            listeners,
            batch,
            recv_msghdr,
            buf_ring,
            buf_ring_layout,
            buf_ring_registered: false,
            tail: 0,
            buffers,
            buffers_layout,
            free_slots: (0..slot_count as u32).rev().collect(),
            slots,
            sends_in_flight: 0,
            pending: std::collections::VecDeque::with_capacity(usize::from(URING_BUFFERS) * 2),
            armed: vec![false; n],
            stopping: false,
            quiesced: false,
            batch_meta: Vec::with_capacity(batch),
            batch_received: Vec::with_capacity(batch),
            batch_answers: Vec::with_capacity(batch),
            drops: DropCounters::new(n),
            stats: IoStats::default(),
        };
        // SAFETY: `buf_ring` is a zeroed, page-aligned array of URING_BUFFERS entries owned by
        // the backend; it is freed only in Drop, after the ring is closed and only when every
        // operation completed (otherwise leaked).
        unsafe {
            backend.ring.submitter().register_buf_ring_with_flags(
                buf_ring as u64,
                URING_BUFFERS,
                BUFFER_GROUP,
                0,
            )
        }
        .map_err(|e| err(format!("registering the provided-buffer ring failed: {e}")))?;
        backend.buf_ring_registered = true;
        for bid in 0..URING_BUFFERS {
            backend.give_buffer(bid);
        }
        backend.publish_tail();
        Ok(backend)
    }

    pub fn stats(&self) -> IoStats {
        self.stats
    }

    /// Puts provided buffer `bid` back at the ring's tail (published by `publish_tail`).
    pub(crate) fn give_buffer(&mut self, bid: u16) {
        let index = usize::from(self.tail & (URING_BUFFERS - 1));
        // SAFETY: `index` < URING_BUFFERS, so the entry lies inside the ring allocation; the
        // kernel reads entries only between the published head and tail, and this one is past
        // the published tail until `publish_tail`.
        let entry = unsafe { &mut *self.buf_ring.add(index) };
        // SAFETY: `bid` < URING_BUFFERS, so the offset lies inside the buffers allocation.
        let addr = unsafe { self.buffers.add(usize::from(bid) * URING_BUF_LEN) };
        entry.set_addr(addr as u64);
        entry.set_len(URING_BUF_LEN as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    pub(crate) fn publish_tail(&mut self) {
        // SAFETY: `buf_ring` points at the first, initialised entry of the registered ring, as
        // `BufRingEntry::tail` requires.
        let tail = unsafe { BufRingEntry::tail(self.buf_ring) } as *mut u16;
        // SAFETY: the tail field is a naturally aligned u16 inside the live ring allocation
        // that the kernel reads concurrently; all our accesses to it go through this atomic.
        let tail = unsafe { AtomicU16::from_ptr(tail) };
        tail.store(self.tail, Ordering::Release);
    }

    pub(crate) fn arm(&mut self) -> io::Result<()> {
        if self.stopping {
            return Ok(());
        }
        for s in 0..self.listeners.len() {
            if self.armed[s] {
                continue;
            }
            let fd = self.listeners[s].socket.as_raw_fd();
            let entry = opcode::RecvMsgMulti::new(Fd(fd), self.recv_msghdr, BUFFER_GROUP)
                .build()
                .user_data((TAG_RECV << TAG_SHIFT) | s as u64);
            self.push(&entry)?;
            self.armed[s] = true;
        }
        Ok(())
    }

    pub(crate) fn push(&mut self, entry: &io_uring::squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every entry we push references memory that outlives its completion: the
            // receive msghdr and buffers live until the backend is dropped after quiescing,
            // send slots are reused only after their completion arrives.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    /// Waits up to `timeout` for completions, decides every received datagram with
    /// `handler`, and submits all the answers at once. Returns how many datagrams it read.
    pub fn poll_batch(
        &mut self,
        timeout: Duration,
        handler: &mut dyn Handler,
    ) -> io::Result<usize> {
        self.arm()?;
        let ts = Timespec::new()
            .sec(timeout.as_secs())
            .nsec(timeout.subsec_nanos());
        let args = SubmitArgs::new().timespec(&ts);
        let runnable = !self.pending.is_empty() && !self.free_slots.is_empty();
        if !runnable
            && self.ring.completion().is_empty()
            && let Err(e) = self.ring.submitter().submit_with_args(1, &args)
            && !is_transient(&e)
        {
            return Err(e);
        }
        let n = self.drain(handler)?;
        self.ring.submit()?;
        Ok(n)
    }

    pub(crate) fn drain(&mut self, handler: &mut dyn Handler) -> io::Result<usize> {
        // Take every completion that is ready: sends free their slots at once, receives
        // queue up (bounded by the provided buffers they hold) until a send slot is free.
        for cqe in self.ring.completion() {
            let (user_data, result, flags) = (cqe.user_data(), cqe.result(), cqe.flags());
            match user_data >> TAG_SHIFT {
                TAG_SEND => {
                    self.free_slots
                        .push((user_data & ((1 << TAG_SHIFT) - 1)) as u32);
                    self.sends_in_flight -= 1;
                    if result < 0 {
                        self.stats.send_errors += 1;
                    } else {
                        self.stats.sent += 1;
                    }
                }
                TAG_RECV => self.pending.push_back((user_data, result, flags)),
                _ => {}
            }
        }
        let mut received = 0;
        let mut datagrams = recycle(core::mem::take(&mut self.batch_received));
        let mut buffers = recycle_answers(core::mem::take(&mut self.batch_answers));
        self.batch_meta.clear();
        while received < self.batch && !self.free_slots.is_empty() {
            let Some((user_data, result, flags)) = self.pending.pop_front() else {
                break;
            };
            let index = (user_data & ((1 << TAG_SHIFT) - 1)) as usize;
            if !cqueue::more(flags) {
                self.armed[index] = false;
            }
            match cqueue::buffer_select(flags) {
                Some(bid) if result >= 0 => {
                    received += 1;
                    self.stats.received += 1;
                    let len = (result as usize).min(URING_BUF_LEN);
                    // SAFETY: the kernel completed its write into buffer `bid` (its completion
                    // was just taken) and will not touch it again until `give_buffer(bid)`
                    // returns it, which happens only after the handler below is done with
                    // this batch; `bid` < URING_BUFFERS keeps the slice inside the allocation.
                    let buffer: &[u8] = unsafe {
                        core::slice::from_raw_parts(
                            self.buffers.add(usize::from(bid) * URING_BUF_LEN),
                            len,
                        )
                    };
                    // SAFETY: `recv_msghdr` is the live template the receives were armed with.
                    let template = unsafe { &*self.recv_msghdr };
                    let msg = RecvMsgOut::parse(buffer, template).ok();
                    let info = msg.as_ref().map(|m| parse_control(m.control_data()));
                    if let Some(info) = info {
                        self.drops.update(index, info.drops, &mut self.stats);
                    }
                    if msg
                        .as_ref()
                        .is_some_and(RecvMsgOut::is_control_data_truncated)
                    {
                        self.stats.control_truncated += 1;
                        self.give_buffer(bid);
                        continue;
                    }
                    if msg.as_ref().is_some_and(RecvMsgOut::is_payload_truncated) {
                        self.stats.truncated += 1;
                    }
                    let source = msg.as_ref().and_then(|m| parse_sockaddr(m.name_data()));
                    let (Some(msg), Some(info), Some(source)) = (msg.as_ref(), info, source) else {
                        self.stats.unparsable += 1;
                        self.give_buffer(bid);
                        continue;
                    };
                    let Some(slot_index) = self.free_slots.pop() else {
                        // Not reached: the loop runs only while a slot is free.
                        self.give_buffer(bid);
                        continue;
                    };
                    // The payload as a slice of `buffer` itself (which outlives `msg`).
                    let payload = msg.payload_data();
                    let start = payload.as_ptr() as usize - buffer.as_ptr() as usize;
                    let end = start + payload.len().min(MAX_DATAGRAM);
                    let data = buffer.get(start..end).unwrap_or_default();
                    let local = self.listeners[index].local;
                    datagrams.push(Received {
                        data,
                        source,
                        destination: SocketAddr::new(
                            info.local.unwrap_or(local.ip()),
                            local.port(),
                        ),
                        received_ns: info.received_ns,
                    });
                    // SAFETY: the slot was free (its previous send completed, or it was never
                    // used), so the kernel holds no reference to it; it was just taken off the
                    // free list, so this is the only reference until its send is submitted.
                    let slot = unsafe { &mut *self.slots[slot_index as usize] };
                    buffers.push(AnswerBuffer::new(&mut slot.data));
                    self.batch_meta.push((index, bid, slot_index, info));
                }
                Some(bid) => self.give_buffer(bid),
                None if result == -libc::ENOBUFS => self.stats.out_of_buffers += 1,
                None if result == -libc::ECANCELED || result >= 0 => {}
                None => self.stats.recv_errors += 1,
            }
        }
        if !datagrams.is_empty() {
            self.stats.batches += 1;
            handler.batch(&mut Batch::new(&datagrams, &mut buffers));
        }
        let mut outcome = Ok(());
        for (k, b) in buffers.iter().enumerate() {
            let (s, bid, slot_index, info) = self.batch_meta[k];
            let answer = b.answer_len().map(|len| (len, datagrams[k].source));
            if outcome.is_ok()
                && let Some((len, to)) = answer
            {
                outcome = self.submit_answer(s, slot_index, to, info, len);
                self.give_buffer(bid);
                continue;
            }
            self.free_slots.push(slot_index);
            self.give_buffer(bid);
        }
        self.batch_received = recycle(datagrams);
        self.batch_answers = recycle_answers(buffers);
        self.publish_tail();
        outcome.map(|()| received)
    }

    /// Submits the answer written into send slot `slot_index` to `to`, from the local address
    /// the request arrived on.
    pub(crate) fn submit_answer(
        &mut self,
        s: usize,
        slot_index: u32,
        to: SocketAddr,
        info: PacketInfo,
        len: usize,
    ) -> io::Result<()> {
        let slot_ptr = self.slots[slot_index as usize];
        // SAFETY: the slot was taken off the free list for this batch and its send is not yet
        // submitted, so the kernel holds no reference to it and this is the only reference.
        let slot = unsafe { &mut *slot_ptr };
        let namelen = write_sockaddr(to, &mut slot.name.0);
        let ctrllen = write_pktinfo(&mut slot.ctrl.0, info.local, info.ifindex);
        slot.iov = libc::iovec {
            iov_base: slot.data.as_mut_ptr().cast(),
            iov_len: len.min(MAX_DATAGRAM),
        };
        slot.hdr.msg_name = slot.name.0.as_mut_ptr().cast();
        slot.hdr.msg_namelen = namelen;
        slot.hdr.msg_iov = &mut slot.iov;
        slot.hdr.msg_iovlen = 1;
        slot.hdr.msg_control = if ctrllen == 0 {
            core::ptr::null_mut()
        } else {
            slot.ctrl.0.as_mut_ptr().cast()
        };
        slot.hdr.msg_controllen = ctrllen;
        slot.hdr.msg_flags = 0;
        let fd = self.listeners[s].socket.as_raw_fd();
        let entry = opcode::SendMsg::new(Fd(fd), &slot.hdr)
            .build()
            .user_data((TAG_SEND << TAG_SHIFT) | u64::from(slot_index));
        self.push(&entry)?;
        self.sends_in_flight += 1;
        Ok(())
    }

    /// Stops receiving (cancels the multishot receives), answers what already arrived, and
    /// waits for every send to complete. Returns whether everything completed (only then is
    /// the kernel-shared memory freed on drop).
    pub fn shutdown(&mut self, handler: &mut dyn Handler) -> bool {
        self.stopping = true;
        for s in 0..self.listeners.len() {
            if self.armed[s] {
                let entry = opcode::AsyncCancel::new((TAG_RECV << TAG_SHIFT) | s as u64)
                    .build()
                    .user_data(TAG_CANCEL << TAG_SHIFT);
                if self.push(&entry).is_err() {
                    return false;
                }
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while self.armed.iter().any(|a| *a) || self.sends_in_flight > 0 || !self.pending.is_empty()
        {
            if std::time::Instant::now() > deadline {
                return false;
            }
            if self.poll_batch(Duration::from_millis(50), handler).is_err() {
                return false;
            }
        }
        self.quiesced = true;
        true
    }
}

impl Drop for UringBackend {
    fn drop(&mut self) {
        if self.buf_ring_registered && self.quiesced {
            let _ = self.ring.submitter().unregister_buf_ring(BUFFER_GROUP);
        }
        // SAFETY: the ring is dropped exactly once, here; nothing uses it afterwards.
        unsafe { ManuallyDrop::drop(&mut self.ring) };
        if !self.quiesced {
            // Some operation may still reference this memory: leak it rather than risk the
            // kernel writing into freed memory.
            return;
        }
        // SAFETY: every operation completed (quiesced) and the ring is closed, so the kernel
        // holds no reference; each pointer came from the matching allocation and is freed once.
        unsafe {
            std::alloc::dealloc(self.buf_ring.cast(), self.buf_ring_layout);
            std::alloc::dealloc(self.buffers, self.buffers_layout);
            drop(Box::from_raw(self.recv_msghdr));
            for slot in self.slots.drain(..) {
                drop(Box::from_raw(slot));
            }
        }
    }
}
