//! Every line of `unsafe` in dynauthd lives here: socket options, `recvmmsg`/`sendmmsg`,
//! io_uring (multishot `recvmsg` with a provided-buffer ring, batched `sendmsg`), and the
//! SIGINT/SIGTERM handler. Each `unsafe` block says why it is sound in a `// SAFETY:` comment.
//!
//! Owns: turning datagrams on sockets into [`Received`] values for a [`Handler`] and sending
//! the answers it writes, from the exact local address each request came to (IP_PKTINFO /
//! IPV6_PKTINFO), with kernel drop counts (SO_RXQ_OVFL). Must not touch: RADIUS decisions
//! (the handler makes them) or configuration (the runtime passes plain values in).
//!
//! Addresses and control messages are read and written as bytes in safe code; the unsafe
//! parts are only the system calls, the kernel-shared memory of io_uring, and zero-initialising
//! plain C structs.
#![allow(unsafe_code)]

pub mod cpu;
pub mod dac;

use core::mem::{ManuallyDrop, size_of};
use std::alloc::Layout;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::time::Duration;

use io_uring::types::{BufRingEntry, Fd, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, opcode};
use socket2::{Domain, Protocol, Socket, Type};

/// The largest RADIUS packet (RFC 2865 §3); receive buffers hold this much payload.
pub const MAX_DATAGRAM: usize = 4096;
/// Room for the control messages we ask for (packet info and the drop counter).
const CONTROL_LEN: usize = 128;
/// Room for a `sockaddr_in6`, the larger of the two address families.
const NAME_LEN: usize = 28;

// ---------------------------------------------------------------------------------------
// Sockets
// ---------------------------------------------------------------------------------------

/// Socket buffer sizes (SO_RCVBUF / SO_SNDBUF), in octets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferSizes {
    pub recv: usize,
    pub send: usize,
}

/// One bound UDP socket of one shard.
#[derive(Debug)]
pub struct Listener {
    pub socket: Socket,
    /// The address it is bound to (its port is the port answers leave from).
    pub local: SocketAddr,
    /// The receive buffer the kernel granted (it may cap the request at net.core.rmem_max).
    pub recv_buffer: usize,
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a live c_int for the duration of the call and the length passed is
    // exactly its size; setsockopt only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Binds one SO_REUSEPORT UDP socket on `addr` with packet info, drop counting and the
/// requested buffer sizes. IPv6 sockets are IPv6-only (list IPv4 addresses separately).
pub fn bind_udp(addr: SocketAddr, sizes: BufferSizes) -> io::Result<Listener> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let fd = socket.as_raw_fd();
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
    } else {
        setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
    }
    socket.set_reuse_port(true)?;
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RXQ_OVFL, 1)?;
    // Ask for the sizes; with CAP_NET_ADMIN the FORCE variants pass net.core.*mem_max.
    let clamp = |n: usize| libc::c_int::try_from(n).unwrap_or(libc::c_int::MAX);
    if setsockopt_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        clamp(sizes.recv),
    )
    .is_err()
    {
        socket.set_recv_buffer_size(sizes.recv)?;
    }
    if setsockopt_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        clamp(sizes.send),
    )
    .is_err()
    {
        socket.set_send_buffer_size(sizes.send)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    let local = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("bound socket has no IP address"))?;
    // Linux reports twice the usable size it granted.
    let recv_buffer = socket.recv_buffer_size()? / 2;
    Ok(Listener {
        socket,
        local,
        recv_buffer,
    })
}

// ---------------------------------------------------------------------------------------
// Addresses and control messages, as bytes (safe code)
// ---------------------------------------------------------------------------------------

/// A `sockaddr` buffer, aligned for the kernel.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct NameBuf([u8; 32]);

/// A control-message buffer, aligned for `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct ControlBuf([u8; CONTROL_LEN]);

fn read_u16_be(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32_ne(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// A `sockaddr_in` / `sockaddr_in6` in bytes to a socket address.
fn parse_sockaddr(b: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes(b.get(0..2)?.try_into().ok()?);
    let port = read_u16_be(b, 2)?;
    match libc::c_int::from(family) {
        libc::AF_INET => {
            let ip: [u8; 4] = b.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
        }
        libc::AF_INET6 => {
            let flow = read_u32_ne(b, 4)?;
            let ip: [u8; 16] = b.get(8..24)?.try_into().ok()?;
            let scope = read_u32_ne(b, 24)?;
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                u32::from_be(flow),
                scope,
            )))
        }
        _ => None,
    }
}

/// Writes `addr` as a `sockaddr_in` / `sockaddr_in6`; returns its length.
fn write_sockaddr(addr: SocketAddr, out: &mut [u8; 32]) -> u32 {
    out.fill(0);
    match addr {
        SocketAddr::V4(a) => {
            out[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            out[2..4].copy_from_slice(&a.port().to_be_bytes());
            out[4..8].copy_from_slice(&a.ip().octets());
            size_of::<libc::sockaddr_in>() as u32
        }
        SocketAddr::V6(a) => {
            out[0..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
            out[2..4].copy_from_slice(&a.port().to_be_bytes());
            out[4..8].copy_from_slice(&a.flowinfo().to_be().to_ne_bytes());
            out[8..24].copy_from_slice(&a.ip().octets());
            out[24..28].copy_from_slice(&a.scope_id().to_ne_bytes());
            size_of::<libc::sockaddr_in6>() as u32
        }
    }
}

const CMSG_ALIGN: usize = size_of::<usize>();
const CMSG_HDR: usize = size_of::<libc::cmsghdr>();

const fn cmsg_align(n: usize) -> usize {
    (n + CMSG_ALIGN - 1) & !(CMSG_ALIGN - 1)
}

/// What the control messages of one received datagram said.
#[derive(Debug, Clone, Copy, Default)]
struct PacketInfo {
    /// The local address the datagram was sent to.
    local: Option<IpAddr>,
    ifindex: u32,
    /// The socket's cumulative drop counter (SO_RXQ_OVFL), when the kernel sent it.
    drops: Option<u32>,
}

fn parse_control(ctrl: &[u8]) -> PacketInfo {
    let mut info = PacketInfo::default();
    let mut off = 0;
    while off + CMSG_HDR <= ctrl.len() {
        let Some(len) = ctrl
            .get(off..off + CMSG_ALIGN)
            .and_then(|b| b.try_into().ok())
            .map(usize::from_ne_bytes)
        else {
            break;
        };
        let level = read_u32_ne(ctrl, off + CMSG_ALIGN).unwrap_or(0) as libc::c_int;
        let ty = read_u32_ne(ctrl, off + CMSG_ALIGN + 4).unwrap_or(0) as libc::c_int;
        if len < CMSG_HDR || off + len > ctrl.len() {
            break;
        }
        let data = &ctrl[off + CMSG_HDR..off + len];
        match (level, ty) {
            (libc::IPPROTO_IP, libc::IP_PKTINFO) if data.len() >= 12 => {
                info.ifindex = read_u32_ne(data, 0).unwrap_or(0);
                let ip: [u8; 4] = data[8..12].try_into().unwrap_or_default();
                info.local = Some(IpAddr::V4(Ipv4Addr::from(ip)));
            }
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) if data.len() >= 20 => {
                let ip: [u8; 16] = data[0..16].try_into().unwrap_or_default();
                info.local = Some(IpAddr::V6(Ipv6Addr::from(ip)));
                info.ifindex = read_u32_ne(data, 16).unwrap_or(0);
            }
            (libc::SOL_SOCKET, libc::SO_RXQ_OVFL) if data.len() >= 4 => {
                info.drops = read_u32_ne(data, 0);
            }
            _ => {}
        }
        off += cmsg_align(len);
    }
    info
}

/// Most datagrams in one GSO message (the kernel allows 64 or more) and most payload octets.
const GSO_MAX_SEGMENTS: usize = 64;
/// `UDP_SEGMENT` (linux/udp.h; Linux 4.18), not exported by libc for glibc targets.
const UDP_SEGMENT: libc::c_int = 103;
const GSO_MAX_BYTES: usize = 65_000;

/// Where one answer goes (mmsg backend, before messages are built).
#[derive(Debug, Clone, Copy)]
struct AnswerMeta {
    to: SocketAddr,
    local: Option<IpAddr>,
    ifindex: u32,
    len: usize,
}

impl Default for AnswerMeta {
    fn default() -> Self {
        AnswerMeta {
            to: SocketAddr::from(([0, 0, 0, 0], 0)),
            local: None,
            ifindex: 0,
            len: 0,
        }
    }
}

impl AnswerMeta {
    fn same_flow(&self, o: &AnswerMeta) -> bool {
        self.to == o.to && self.local == o.local && self.ifindex == o.ifindex && self.len == o.len
    }
}

/// Appends a UDP_SEGMENT control message (the GSO segment size) at `offset` of `out`;
/// returns the new control length.
fn write_udp_segment(out: &mut [u8; CONTROL_LEN], offset: usize, size: u16) -> usize {
    let len = CMSG_HDR + 2;
    let Some(area) = out.get_mut(offset..offset + cmsg_align(len)) else {
        return offset;
    };
    area.fill(0);
    area[0..CMSG_ALIGN].copy_from_slice(&len.to_ne_bytes());
    area[CMSG_ALIGN..CMSG_ALIGN + 4].copy_from_slice(&libc::SOL_UDP.to_ne_bytes());
    area[CMSG_ALIGN + 4..CMSG_ALIGN + 8].copy_from_slice(&UDP_SEGMENT.to_ne_bytes());
    area[CMSG_HDR..CMSG_HDR + 2].copy_from_slice(&size.to_ne_bytes());
    offset + cmsg_align(len)
}

/// Writes the IP_PKTINFO / IPV6_PKTINFO control message that makes an answer leave from
/// `local`; returns the control length (0 when `local` is unknown).
fn write_pktinfo(out: &mut [u8; CONTROL_LEN], local: Option<IpAddr>, ifindex: u32) -> usize {
    let Some(local) = local else { return 0 };
    out.fill(0);
    let (level, ty, data_len) = match local {
        IpAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_PKTINFO, 12),
        IpAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, 20),
    };
    let len = CMSG_HDR + data_len;
    out[0..CMSG_ALIGN].copy_from_slice(&len.to_ne_bytes());
    out[CMSG_ALIGN..CMSG_ALIGN + 4].copy_from_slice(&level.to_ne_bytes());
    out[CMSG_ALIGN + 4..CMSG_ALIGN + 8].copy_from_slice(&ty.to_ne_bytes());
    let data = &mut out[CMSG_HDR..CMSG_HDR + data_len];
    match local {
        // in_pktinfo: ifindex 0 and ipi_spec_dst = local: route normally, source = local.
        IpAddr::V4(ip) => data[4..8].copy_from_slice(&ip.octets()),
        // in6_pktinfo: address, then the interface (needed for link-local addresses).
        IpAddr::V6(ip) => {
            data[0..16].copy_from_slice(&ip.octets());
            data[16..20].copy_from_slice(&ifindex.to_ne_bytes());
        }
    }
    cmsg_align(len)
}

// ---------------------------------------------------------------------------------------
// The backend interface
// ---------------------------------------------------------------------------------------

/// One received datagram.
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    pub data: &'a [u8],
    pub source: SocketAddr,
    /// The local address and port it was sent to; the answer leaves from here.
    pub destination: SocketAddr,
}

/// What a backend feeds datagrams to.
pub trait Handler {
    /// A batch of datagrams begins (read the clock once here).
    fn begin_batch(&mut self) {}
    /// Decides one datagram; writes the answer, if any, into `out` and returns its length.
    fn datagram(&mut self, datagram: Received<'_>, out: &mut [u8]) -> Option<usize>;
}

/// I/O counters of one shard's backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoStats {
    pub received: u64,
    pub sent: u64,
    /// Datagrams the kernel dropped because a socket's receive queue was full (SO_RXQ_OVFL).
    pub kernel_drops: u64,
    pub send_errors: u64,
    pub recv_errors: u64,
    /// Datagrams whose source address could not be read.
    pub unparsable: u64,
    /// io_uring: the provided-buffer ring ran dry (the kernel then drops datagrams).
    pub out_of_buffers: u64,
    /// Batches (wake-ups that found at least one datagram).
    pub batches: u64,
    /// UDP GSO messages sent (each carrying several answers).
    pub gso_messages: u64,
}

impl IoStats {
    pub fn add(&mut self, o: &IoStats) {
        self.received += o.received;
        self.sent += o.sent;
        self.kernel_drops += o.kernel_drops;
        self.send_errors += o.send_errors;
        self.recv_errors += o.recv_errors;
        self.unparsable += o.unparsable;
        self.out_of_buffers += o.out_of_buffers;
        self.batches += o.batches;
        self.gso_messages += o.gso_messages;
    }
}

/// Tracks each socket's cumulative SO_RXQ_OVFL counter.
#[derive(Debug, Default)]
struct DropCounters(Vec<u32>);

impl DropCounters {
    fn new(n: usize) -> Self {
        DropCounters(vec![0; n])
    }
    fn update(&mut self, socket: usize, seen: Option<u32>, stats: &mut IoStats) {
        if let (Some(seen), Some(last)) = (seen, self.0.get_mut(socket)) {
            let delta = seen.wrapping_sub(*last);
            if delta > 0 && delta < u32::MAX / 2 {
                stats.kernel_drops += u64::from(delta);
                *last = seen;
            }
        }
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAGAIN) | Some(libc::EINTR) | Some(libc::ETIME) | Some(libc::EBUSY)
    )
}

// ---------------------------------------------------------------------------------------
// recvmmsg / sendmmsg
// ---------------------------------------------------------------------------------------

/// Batched receive and send with `recvmmsg(2)` / `sendmmsg(2)`.
pub struct MmsgBackend {
    listeners: Vec<Listener>,
    batch: usize,
    rx_data: Box<[u8]>,
    rx_names: Box<[NameBuf]>,
    rx_ctrl: Box<[ControlBuf]>,
    rx_iov: Box<[libc::iovec]>,
    rx_hdrs: Box<[libc::mmsghdr]>,
    tx_data: Box<[u8]>,
    tx_names: Box<[NameBuf]>,
    tx_ctrl: Box<[ControlBuf]>,
    tx_iov: Box<[libc::iovec]>,
    tx_hdrs: Box<[libc::mmsghdr]>,
    tx_meta: Box<[AnswerMeta]>,
    /// Answers in each `tx_hdrs` message (more than one with GSO).
    tx_segments: Box<[usize]>,
    gso: bool,
    drops: DropCounters,
    stats: IoStats,
}

fn zeroed_mmsghdrs(n: usize) -> Box<[libc::mmsghdr]> {
    (0..n)
        .map(|_| {
            // SAFETY: mmsghdr is a plain C struct of integers and raw pointers, for which all
            // zero bits are a valid value (null pointers, zero lengths).
            unsafe { core::mem::zeroed::<libc::mmsghdr>() }
        })
        .collect()
}

fn empty_iovecs(n: usize) -> Box<[libc::iovec]> {
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
        MmsgBackend {
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
            drops,
            stats: IoStats::default(),
        }
    }

    pub fn stats(&self) -> IoStats {
        self.stats
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
    pub fn poll_batch(
        &mut self,
        timeout: Duration,
        handler: &mut dyn Handler,
    ) -> io::Result<usize> {
        let mut total = 0;
        for round in 0..2 {
            for s in 0..self.listeners.len() {
                total += self.receive_and_answer(s, handler)?;
            }
            if total > 0 || round == 1 {
                break;
            }
            self.wait_readable(timeout)?;
        }
        Ok(total)
    }

    fn wait_readable(&self, timeout: Duration) -> io::Result<()> {
        let mut fds: Vec<libc::pollfd> = self
            .listeners
            .iter()
            .map(|l| libc::pollfd {
                fd: l.socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `fds` is a live, initialised array of `fds.len()` pollfd values that poll
        // may write `revents` into; it outlives the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if !is_transient(&e) {
                return Err(e);
            }
        }
        Ok(())
    }

    fn receive_and_answer(&mut self, s: usize, handler: &mut dyn Handler) -> io::Result<usize> {
        let fd = self.listeners[s].socket.as_raw_fd();
        let local = self.listeners[s].local;
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
        }
        // SAFETY: every header points at buffers owned by `self` (names, iovecs, data and
        // control areas of the sizes written above), which live across the call; the kernel
        // writes at most those lengths. `batch` headers exist.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.rx_hdrs.as_mut_ptr(),
                self.batch as libc::c_uint,
                libc::MSG_DONTWAIT,
                core::ptr::null_mut(),
            )
        };
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
        handler.begin_batch();
        let mut answers = 0;
        for i in 0..n {
            let hdr = &self.rx_hdrs[i];
            let len = (hdr.msg_len as usize).min(MAX_DATAGRAM);
            let namelen = (hdr.msg_hdr.msg_namelen as usize).min(NAME_LEN);
            let ctrllen = hdr.msg_hdr.msg_controllen.min(CONTROL_LEN);
            let info = parse_control(&self.rx_ctrl[i].0[..ctrllen]);
            self.drops.update(s, info.drops, &mut self.stats);
            let Some(source) = parse_sockaddr(&self.rx_names[i].0[..namelen]) else {
                self.stats.unparsable += 1;
                continue;
            };
            let destination = SocketAddr::new(info.local.unwrap_or(local.ip()), local.port());
            let data = &self.rx_data[i * MAX_DATAGRAM..i * MAX_DATAGRAM + len];
            let out = &mut self.tx_data[answers * MAX_DATAGRAM..(answers + 1) * MAX_DATAGRAM];
            let Some(answer_len) = handler.datagram(
                Received {
                    data,
                    source,
                    destination,
                },
                out,
            ) else {
                continue;
            };
            self.tx_meta[answers] = AnswerMeta {
                to: source,
                local: info.local,
                ifindex: info.ifindex,
                len: answer_len.min(MAX_DATAGRAM),
            };
            answers += 1;
        }
        let messages = self.build_messages(answers);
        self.send_all(fd, messages);
        Ok(n)
    }

    /// Turns this batch's answers into `sendmmsg` headers: one per answer, or with GSO one
    /// per run of answers to the same address, from the same local address, of the same size
    /// (UDP_SEGMENT: the kernel splits it into datagrams). Returns how many headers.
    fn build_messages(&mut self, answers: usize) -> usize {
        let mut m = 0;
        let mut i = 0;
        while i < answers {
            let first = self.tx_meta[i];
            let mut run = 1;
            if self.gso {
                while i + run < answers
                    && run < GSO_MAX_SEGMENTS
                    && (run + 1) * first.len <= GSO_MAX_BYTES
                    && self.tx_meta[i + run].same_flow(&first)
                {
                    run += 1;
                }
            }
            for k in i..i + run {
                self.tx_iov[k] = libc::iovec {
                    iov_base: self.tx_data[k * MAX_DATAGRAM..].as_mut_ptr().cast(),
                    iov_len: self.tx_meta[k].len,
                };
            }
            let namelen = write_sockaddr(first.to, &mut self.tx_names[m].0);
            let mut ctrllen = write_pktinfo(&mut self.tx_ctrl[m].0, first.local, first.ifindex);
            if run > 1 {
                ctrllen = write_udp_segment(&mut self.tx_ctrl[m].0, ctrllen, first.len as u16);
                self.stats.gso_messages += 1;
            }
            let h = &mut self.tx_hdrs[m].msg_hdr;
            h.msg_name = self.tx_names[m].0.as_mut_ptr().cast();
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

    fn send_all(&mut self, fd: RawFd, count: usize) {
        let mut done = 0;
        let mut retries = 0;
        while done < count {
            // SAFETY: headers `done..count` were filled in this batch and point at buffers
            // owned by `self` that stay alive and unchanged during the call.
            let rc = unsafe {
                libc::sendmmsg(
                    fd,
                    self.tx_hdrs[done..].as_mut_ptr(),
                    (count - done) as libc::c_uint,
                    0,
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

    /// Nothing is in the kernel's hands between batches: shutting down needs no draining.
    pub fn shutdown(&mut self, _handler: &mut dyn Handler) -> bool {
        true
    }
}

// ---------------------------------------------------------------------------------------
// io_uring
// ---------------------------------------------------------------------------------------

/// Provided buffers in the ring (a power of two).
const URING_BUFFERS: u16 = 512;
/// One provided buffer: the recvmsg_out header, the name, the control area, then payload.
const URING_BUF_LEN: usize = 16 + NAME_LEN + CONTROL_LEN + MAX_DATAGRAM + 112;
const BUFFER_GROUP: u16 = 0;
const TAG_SHIFT: u32 = 56;
const TAG_RECV: u64 = 1;
const TAG_SEND: u64 = 2;
const TAG_CANCEL: u64 = 3;

/// One answer being sent by io_uring: every byte the kernel reads for this `sendmsg`.
#[repr(C)]
struct SendSlot {
    hdr: libc::msghdr,
    iov: libc::iovec,
    name: NameBuf,
    ctrl: ControlBuf,
    data: [u8; MAX_DATAGRAM],
}

/// io_uring: one multishot `recvmsg` per socket, reading into a provided-buffer ring, and one
/// `sendmsg` per answer, submitted together at the end of each batch.
///
/// Memory shared with the kernel (the buffer ring, the provided buffers, the receive
/// `msghdr` and the send slots) is held through raw pointers and freed only after every
/// operation that uses it has completed; if shutdown could not confirm that, it is leaked.
pub struct UringBackend {
    ring: ManuallyDrop<IoUring>,
    listeners: Vec<Listener>,
    batch: usize,
    /// The `msghdr` template of the multishot receives (only its lengths are used).
    recv_msghdr: *mut libc::msghdr,
    /// The provided-buffer ring (page aligned, `URING_BUFFERS` entries).
    buf_ring: *mut BufRingEntry,
    buf_ring_layout: Layout,
    buf_ring_registered: bool,
    /// Local copy of the ring's tail.
    tail: u16,
    /// `URING_BUFFERS * URING_BUF_LEN` octets of provided buffers.
    buffers: *mut u8,
    buffers_layout: Layout,
    slots: Vec<*mut SendSlot>,
    free_slots: Vec<u32>,
    sends_in_flight: usize,
    /// Receive completions taken from the ring and not yet decided (each holds its buffer).
    pending: std::collections::VecDeque<(u64, i32, u32)>,
    /// Whether each socket's multishot receive is armed.
    armed: Vec<bool>,
    stopping: bool,
    /// True once shutdown saw every operation complete: memory may be freed.
    quiesced: bool,
    drops: DropCounters,
    stats: IoStats,
}

/// Why io_uring cannot be used here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UringUnavailable(pub String);

fn kernel_at_least(major: u32, minor: u32) -> bool {
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

fn describe_setup_error(e: &io::Error) -> String {
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

fn build_ring(entries: u32) -> io::Result<IoUring> {
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
    fn give_buffer(&mut self, bid: u16) {
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

    fn publish_tail(&mut self) {
        // SAFETY: `buf_ring` points at the first, initialised entry of the registered ring, as
        // `BufRingEntry::tail` requires.
        let tail = unsafe { BufRingEntry::tail(self.buf_ring) } as *mut u16;
        // SAFETY: the tail field is a naturally aligned u16 inside the live ring allocation
        // that the kernel reads concurrently; all our accesses to it go through this atomic.
        let tail = unsafe { AtomicU16::from_ptr(tail) };
        tail.store(self.tail, Ordering::Release);
    }

    fn arm(&mut self) -> io::Result<()> {
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

    fn push(&mut self, entry: &io_uring::squeue::Entry) -> io::Result<()> {
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
        if !runnable && self.ring.completion().is_empty() {
            if let Err(e) = self.ring.submitter().submit_with_args(1, &args) {
                if !is_transient(&e) {
                    return Err(e);
                }
            }
        }
        let n = self.drain(handler)?;
        self.ring.submit()?;
        Ok(n)
    }

    fn drain(&mut self, handler: &mut dyn Handler) -> io::Result<usize> {
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
        let mut begun = false;
        while received < self.batch && !self.free_slots.is_empty() {
            let Some((user_data, result, flags)) = self.pending.pop_front() else {
                break;
            };
            let index = (user_data & ((1 << TAG_SHIFT) - 1)) as usize;
            if !cqueue::more(flags) {
                self.armed[index] = false;
            }
            match cqueue::buffer_select(flags) {
                Some(bid) => {
                    if result >= 0 {
                        if !begun {
                            begun = true;
                            self.stats.batches += 1;
                            handler.begin_batch();
                        }
                        received += 1;
                        self.stats.received += 1;
                        let answered = self.answer(index, bid, result as usize, handler);
                        self.give_buffer(bid);
                        answered?;
                        continue;
                    }
                    self.give_buffer(bid);
                }
                None if result == -libc::ENOBUFS => self.stats.out_of_buffers += 1,
                None if result == -libc::ECANCELED || result >= 0 => {}
                None => self.stats.recv_errors += 1,
            }
        }
        self.publish_tail();
        Ok(received)
    }

    fn answer(
        &mut self,
        s: usize,
        bid: u16,
        len: usize,
        handler: &mut dyn Handler,
    ) -> io::Result<()> {
        let len = len.min(URING_BUF_LEN);
        // SAFETY: the kernel completed its write into buffer `bid` (its completion was just
        // taken) and will not touch it again until `give_buffer(bid)` returns it after this
        // call; `bid` < URING_BUFFERS keeps the slice inside the allocation.
        let buffer = unsafe {
            core::slice::from_raw_parts(self.buffers.add(usize::from(bid) * URING_BUF_LEN), len)
        };
        // SAFETY: `recv_msghdr` is the live template the receives were armed with.
        let template = unsafe { &*self.recv_msghdr };
        let Ok(msg) = RecvMsgOut::parse(buffer, template) else {
            self.stats.unparsable += 1;
            return Ok(());
        };
        let info = parse_control(msg.control_data());
        self.drops.update(s, info.drops, &mut self.stats);
        let Some(source) = parse_sockaddr(msg.name_data()) else {
            self.stats.unparsable += 1;
            return Ok(());
        };
        let local = self.listeners[s].local;
        let destination = SocketAddr::new(info.local.unwrap_or(local.ip()), local.port());
        let payload = msg.payload_data();
        let data = &payload[..payload.len().min(MAX_DATAGRAM)];
        let Some(slot_index) = self.free_slots.pop() else {
            return Ok(());
        };
        let slot_ptr = self.slots[slot_index as usize];
        // SAFETY: the slot is free (its previous send completed, or it was never used), so
        // the kernel holds no reference to it and this is the only reference.
        let slot = unsafe { &mut *slot_ptr };
        let Some(answer_len) = handler.datagram(
            Received {
                data,
                source,
                destination,
            },
            &mut slot.data,
        ) else {
            self.free_slots.push(slot_index);
            return Ok(());
        };
        let namelen = write_sockaddr(source, &mut slot.name.0);
        let ctrllen = write_pktinfo(&mut slot.ctrl.0, info.local, info.ifindex);
        slot.iov = libc::iovec {
            iov_base: slot.data.as_mut_ptr().cast(),
            iov_len: answer_len.min(MAX_DATAGRAM),
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

// ---------------------------------------------------------------------------------------
// Either backend
// ---------------------------------------------------------------------------------------

/// The I/O backend of one shard.
pub enum Backend {
    Mmsg(Box<MmsgBackend>),
    Uring(Box<UringBackend>),
}

impl Backend {
    pub fn poll_batch(
        &mut self,
        timeout: Duration,
        handler: &mut dyn Handler,
    ) -> io::Result<usize> {
        match self {
            Backend::Mmsg(b) => b.poll_batch(timeout, handler),
            Backend::Uring(b) => b.poll_batch(timeout, handler),
        }
    }

    pub fn shutdown(&mut self, handler: &mut dyn Handler) -> bool {
        match self {
            Backend::Mmsg(b) => b.shutdown(handler),
            Backend::Uring(b) => b.shutdown(handler),
        }
    }

    pub fn stats(&self) -> IoStats {
        match self {
            Backend::Mmsg(b) => b.stats(),
            Backend::Uring(b) => b.stats(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------------------------

static SHUTDOWN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_shutdown_signal(_signal: libc::c_int) {
    // Async-signal-safe: one atomic store.
    SHUTDOWN.store(true, Ordering::SeqCst);
}

/// Installs SIGINT and SIGTERM handlers that set the returned flag. A second signal of the
/// same kind kills the process (SA_RESETHAND), so an operator can always stop it.
pub fn install_shutdown_signals() -> io::Result<&'static AtomicBool> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: sigaction is a plain C struct for which all zero bits are valid.
        let mut action: libc::sigaction = unsafe { core::mem::zeroed() };
        action.sa_sigaction =
            on_shutdown_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESETHAND;
        // SAFETY: `action.sa_mask` is a valid sigset_t owned by this frame.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: `action` is fully initialised and its handler only performs an atomic store,
        // which is async-signal-safe; the old action is not requested (null).
        let rc = unsafe { libc::sigaction(signal, &action, core::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(&SHUTDOWN)
}

#[cfg(test)]
mod tests {
    use super::*;

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
