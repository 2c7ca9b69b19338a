//! The DAC side of the I/O layer, for the load generator, the echo server and other bench
//! clients: thin, allocation-free wrappers over the Linux system calls they need and `std`
//! does not offer: batched `sendmmsg(2)` / `recvmmsg(2)` on one socket, `ppoll(2)` with a
//! nanosecond timeout, the calling thread's CPU time (`clock_gettime(CLOCK_THREAD_CPUTIME_ID)`)
//! and the process's (`getrusage(RUSAGE_SELF)`), the timer slack (`prctl`), and a SIGINT flag
//! (`sigaction`).
//!
//! Owns: those syscalls for the tools. Must not touch: RADIUS (the callers build and verify
//! packets) or the server's receive path (the backends in this crate's root).
//!
//! Every batch structure owns its `mmsghdr`/`iovec` arrays and rebuilds the raw pointers on
//! each call, so no pointer outlives the borrow it was taken from.

use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

fn zeroed_msghdr() -> libc::mmsghdr {
    // SAFETY: `mmsghdr` is a plain C struct of integers and raw pointers; all-zero bytes are a
    // valid value (null pointers, zero lengths).
    unsafe { MaybeUninit::<libc::mmsghdr>::zeroed().assume_init() }
}

fn zeroed_storage() -> libc::sockaddr_storage {
    // SAFETY: `sockaddr_storage` is a plain C struct of integers; all-zero bytes are valid.
    unsafe { MaybeUninit::<libc::sockaddr_storage>::zeroed().assume_init() }
}

const EMPTY_IOVEC: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};

/// Sends batches of datagrams on a connected socket with one `sendmmsg(2)` each.
pub struct BatchSender {
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
}

impl std::fmt::Debug for BatchSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BatchSender({})", self.hdrs.len())
    }
}

impl BatchSender {
    pub fn new(capacity: usize) -> Self {
        BatchSender {
            hdrs: (0..capacity).map(|_| zeroed_msghdr()).collect(),
            iovs: vec![EMPTY_IOVEC; capacity],
        }
    }

    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// Sends up to `capacity` packets on connected socket `fd` without blocking. Returns how
    /// many the kernel took (a prefix of `packets`); `WouldBlock` when it took none.
    pub fn send(&mut self, fd: RawFd, packets: &[&[u8]]) -> io::Result<usize> {
        let n = packets.len().min(self.hdrs.len());
        if n == 0 {
            return Ok(0);
        }
        for ((hdr, iov), packet) in self.hdrs.iter_mut().zip(self.iovs.iter_mut()).zip(packets) {
            iov.iov_base = packet.as_ptr() as *mut libc::c_void;
            iov.iov_len = packet.len();
            hdr.msg_hdr.msg_name = std::ptr::null_mut();
            hdr.msg_hdr.msg_namelen = 0;
            hdr.msg_hdr.msg_iov = iov;
            hdr.msg_hdr.msg_iovlen = 1;
            hdr.msg_hdr.msg_control = std::ptr::null_mut();
            hdr.msg_hdr.msg_controllen = 0;
            hdr.msg_hdr.msg_flags = 0;
            hdr.msg_len = 0;
        }
        // SAFETY: `hdrs[..n]` are initialised headers whose `msg_iov` point at `iovs`, each
        // iovec pointing into a live `&[u8]` of `packets` (the kernel only reads them); `n` is
        // within both vectors; `fd` is a socket descriptor owned by the caller.
        let rc = unsafe {
            libc::sendmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc as usize)
        }
    }
}

/// Receives batches of datagrams with one `recvmmsg(2)` each, into buffers it owns, keeping
/// each datagram's source address (for the echo server's reply).
pub struct BatchReceiver {
    slot: usize,
    bufs: Vec<u8>,
    lens: Vec<usize>,
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_storage>,
    received: usize,
}

impl std::fmt::Debug for BatchReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BatchReceiver({} x {})", self.hdrs.len(), self.slot)
    }
}

impl BatchReceiver {
    /// `capacity` datagrams of at most `slot` octets each (longer ones are truncated).
    pub fn new(capacity: usize, slot: usize) -> Self {
        BatchReceiver {
            slot,
            bufs: vec![0; capacity * slot],
            lens: vec![0; capacity],
            hdrs: (0..capacity).map(|_| zeroed_msghdr()).collect(),
            iovs: vec![EMPTY_IOVEC; capacity],
            addrs: (0..capacity).map(|_| zeroed_storage()).collect(),
            received: 0,
        }
    }

    /// Receives up to `capacity` datagrams. `blocking`: wait for the first one
    /// (`MSG_WAITFORONE`); otherwise return `WouldBlock` when none is queued.
    pub fn recv(&mut self, fd: RawFd, blocking: bool) -> io::Result<usize> {
        self.received = 0;
        let slot = self.slot;
        for (((hdr, iov), buf), addr) in self
            .hdrs
            .iter_mut()
            .zip(self.iovs.iter_mut())
            .zip(self.bufs.chunks_exact_mut(slot))
            .zip(self.addrs.iter_mut())
        {
            iov.iov_base = buf.as_mut_ptr().cast();
            iov.iov_len = slot;
            hdr.msg_hdr.msg_name = (addr as *mut libc::sockaddr_storage).cast();
            hdr.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            hdr.msg_hdr.msg_iov = iov;
            hdr.msg_hdr.msg_iovlen = 1;
            hdr.msg_hdr.msg_control = std::ptr::null_mut();
            hdr.msg_hdr.msg_controllen = 0;
            hdr.msg_hdr.msg_flags = 0;
            hdr.msg_len = 0;
        }
        let flags = if blocking {
            libc::MSG_WAITFORONE
        } else {
            libc::MSG_DONTWAIT
        };
        // SAFETY: every header points at its own iovec (into `bufs`, `slot` writable octets
        // each) and its own `sockaddr_storage` with the matching length; the vectors are not
        // touched until the call returns; a null timeout is allowed.
        let rc = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                self.hdrs.len() as libc::c_uint,
                flags,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = rc as usize;
        for (len, hdr) in self.lens.iter_mut().zip(&self.hdrs).take(n) {
            *len = (hdr.msg_len as usize).min(slot);
        }
        self.received = n;
        Ok(n)
    }

    /// Datagrams of the last `recv`.
    pub fn len(&self) -> usize {
        self.received
    }

    pub fn is_empty(&self) -> bool {
        self.received == 0
    }

    /// Datagram `i` of the last `recv`.
    pub fn packet(&self, i: usize) -> &[u8] {
        let len = self.lens.get(i).copied().unwrap_or(0);
        self.bufs
            .get(i * self.slot..i * self.slot + len)
            .unwrap_or_default()
    }

    /// The source address of datagram `i` of the last `recv`.
    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        let addr = self.addrs.get(i)?;
        match i32::from(addr.ss_family) {
            libc::AF_INET => {
                // SAFETY: the kernel wrote a `sockaddr_in` (family AF_INET) into this
                // storage, which is large and aligned enough for it.
                let v4 = unsafe {
                    &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>()
                };
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr)),
                    u16::from_be(v4.sin_port),
                )))
            }
            libc::AF_INET6 => {
                // SAFETY: as above, for a `sockaddr_in6` (family AF_INET6).
                let v6 = unsafe {
                    &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
                };
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(v6.sin6_addr.s6_addr),
                    u16::from_be(v6.sin6_port),
                    v6.sin6_flowinfo,
                    v6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }

    /// Sends datagrams `0..n` of the last `recv` back, unchanged, each to its source, with
    /// one `sendmmsg(2)` (blocking socket: waits for room). Returns how many were sent.
    pub fn reflect(&mut self, fd: RawFd) -> io::Result<usize> {
        let n = self.received;
        let mut done = 0;
        while done < n {
            for i in done..n {
                let (Some(hdr), Some(iov), Some(len)) =
                    (self.hdrs.get_mut(i), self.iovs.get_mut(i), self.lens.get(i))
                else {
                    break;
                };
                iov.iov_len = *len;
                hdr.msg_hdr.msg_iov = iov;
                hdr.msg_hdr.msg_iovlen = 1;
                hdr.msg_hdr.msg_flags = 0;
                // msg_name / msg_namelen still hold the source written by recvmmsg.
            }
            let rest = &mut self.hdrs[done..n];
            // SAFETY: headers `done..n` were filled by the last `recvmmsg`: their iovecs point
            // into `bufs` with the received lengths and their names at the `addrs` entries the
            // kernel wrote; nothing was moved since.
            let rc =
                unsafe { libc::sendmmsg(fd, rest.as_mut_ptr(), rest.len() as libc::c_uint, 0) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // A datagram the kernel refuses (e.g. an unreachable source): skip it.
                done += 1;
                if done >= n {
                    return Err(e);
                }
                continue;
            }
            done += (rc as usize).max(1);
        }
        Ok(n)
    }
}

/// Waits with `ppoll(2)` until one of `fds` is readable or `timeout` passes (`None`: no
/// limit). Returns how many are readable; `readable[i]` tells which.
#[derive(Debug, Default)]
pub struct Poller {
    fds: Vec<libc::pollfd>,
}

impl Poller {
    pub fn new(fds: &[RawFd]) -> Self {
        Poller {
            fds: fds
                .iter()
                .map(|&fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect(),
        }
    }

    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<usize> {
        let ts = timeout.map(|t| libc::timespec {
            tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: libc::c_long::from(t.subsec_nanos() as i32),
        });
        let ts_ptr = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        for p in &mut self.fds {
            p.revents = 0;
        }
        // SAFETY: `fds` is a live, initialised array of `pollfd` of the given length;
        // `ts_ptr` is null or points at `ts`, alive until the call returns; a null signal
        // mask leaves the mask unchanged.
        let rc = unsafe {
            libc::ppoll(
                self.fds.as_mut_ptr(),
                self.fds.len() as libc::nfds_t,
                ts_ptr,
                std::ptr::null(),
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(e);
        }
        Ok(rc as usize)
    }

    pub fn readable(&self, i: usize) -> bool {
        self.fds.get(i).is_some_and(|p| p.revents != 0)
    }
}

fn timespec_ns(ts: &libc::timespec) -> u64 {
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// CPU time consumed by the calling thread, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID is always
    // supported on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    timespec_ns(&ts)
}

/// User and system CPU time consumed by the whole process, in nanoseconds.
pub fn process_cpu_ns() -> (u64, u64) {
    let mut usage = MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` points at writable memory of the size of `rusage`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return (0, 0);
    }
    // SAFETY: getrusage succeeded, so it filled the struct (and it was zeroed before).
    let usage = unsafe { usage.assume_init() };
    let tv = |t: libc::timeval| (t.tv_sec as u64) * 1_000_000_000 + (t.tv_usec as u64) * 1_000;
    (tv(usage.ru_utime), tv(usage.ru_stime))
}

/// Sets the calling thread's timer slack (how late the kernel may wake a sleeper, 50 µs by
/// default) so that open-loop sends leave close to their intended time.
pub fn set_timer_slack_ns(ns: u64) {
    // SAFETY: PR_SET_TIMERSLACK takes one unsigned long argument and affects only the
    // calling thread; the remaining arguments are ignored.
    let _ = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong, 0, 0, 0) };
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Makes the first SIGINT (Ctrl-C) set a flag, [`interrupted`], instead of killing the
/// process, so that a run can stop sending, drain and report; the handler resets itself, so a
/// second Ctrl-C kills as usual.
pub fn catch_interrupt() -> io::Result<()> {
    // SAFETY: `sigaction` is a plain C struct; all-zero is a valid empty value (no flags, empty
    // mask) that is then filled in.
    let mut action: libc::sigaction = unsafe { MaybeUninit::zeroed().assume_init() };
    action.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
    action.sa_flags = libc::SA_RESETHAND | libc::SA_RESTART;
    // SAFETY: `action` is a valid `sigaction` whose handler only performs an atomic store
    // (async-signal-safe); the old action is not requested (null).
    let rc = unsafe { libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether a SIGINT arrived since [`catch_interrupt`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn batch_send_receive_and_reflect_round_trip() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(server.local_addr().unwrap()).unwrap();
        let mut tx = BatchSender::new(8);
        let packets: [&[u8]; 3] = [b"one", b"two!", b"three"];
        assert_eq!(tx.send(client.as_raw_fd(), &packets).unwrap(), 3);
        let mut rx = BatchReceiver::new(8, 64);
        let mut got = Vec::new();
        while got.len() < 3 {
            let n = rx.recv(server.as_raw_fd(), true).unwrap();
            for i in 0..n {
                got.push(rx.packet(i).to_vec());
                assert_eq!(rx.source(i), Some(client.local_addr().unwrap()));
            }
            rx.reflect(server.as_raw_fd()).unwrap();
        }
        assert_eq!(
            got,
            vec![b"one".to_vec(), b"two!".to_vec(), b"three".to_vec()]
        );
        let mut back = BatchReceiver::new(8, 64);
        let mut echoed = 0;
        let mut poller = Poller::new(&[client.as_raw_fd()]);
        while echoed < 3 {
            assert!(poller.wait(Some(Duration::from_secs(2))).unwrap() > 0);
            assert!(poller.readable(0));
            echoed += back.recv(client.as_raw_fd(), false).unwrap();
        }
        assert!(thread_cpu_ns() > 0);
        assert!(process_cpu_ns().0 + process_cpu_ns().1 > 0);
    }
}
