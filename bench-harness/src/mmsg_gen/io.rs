//! The only `unsafe` code of `mmsg-gen`: `sendmmsg`/`recvmmsg` over a connected UDP socket
//! with one fixed set of buffers, the thread's CPU clock, socket buffer sizes and pinning
//! to one CPU, each a thin call to libc. Owns: the buffers' memory and the raw pointers into
//! it (built once, never resized, so the pointers stay valid for the batch's life). Must not
//! touch: what the datagrams contain, counting, time.
//!
//! Written for this generator alone: it shares no code with loadgen or `dynauth-udp`, so a
//! flaw in their I/O layer cannot hide in both generators at once.

use std::io;
use std::os::fd::RawFd;

/// `count` datagram buffers of `capacity` octets each, with the `iovec`s and `mmsghdr`s that
/// point into them.
pub struct Batch {
    storage: Vec<u8>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    capacity: usize,
}

// SAFETY: the raw pointers in `iovecs` and `headers` point into `storage` and `iovecs`, heap
// buffers owned by the same `Batch` and never resized; a `Batch` moved to another thread takes
// that memory along, nothing else holds the pointers, and they are used only through `&mut self`.
unsafe impl Send for Batch {}

impl Batch {
    /// Buffers for `count` datagrams (at least 1) of at most `capacity` octets (at least 1).
    pub fn new(count: usize, capacity: usize) -> Batch {
        let count = count.max(1);
        let capacity = capacity.max(1);
        let mut storage = vec![0u8; count * capacity];
        let base = storage.as_mut_ptr();
        let mut iovecs: Vec<libc::iovec> = (0..count)
            .map(|i| libc::iovec {
                // `wrapping_add` keeps this a plain address computation; `i * capacity` is
                // inside `storage` for every `i < count`.
                iov_base: base.wrapping_add(i * capacity).cast(),
                iov_len: capacity,
            })
            .collect();
        let iov = iovecs.as_mut_ptr();
        let headers = (0..count)
            .map(|i| {
                // SAFETY: `mmsghdr` is plain old data (integers and pointers); all-zero is
                // its documented empty value (no name, no control data, no flags).
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_iov = iov.wrapping_add(i);
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        Batch {
            storage,
            iovecs,
            headers,
            capacity,
        }
    }

    /// How many datagrams the batch holds.
    pub fn count(&self) -> usize {
        self.headers.len()
    }

    /// Buffer `i`, whole, for building a datagram to send.
    pub fn buffer_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.storage[i * self.capacity..(i + 1) * self.capacity]
    }

    /// Datagram `i` as the last `recv` received it.
    pub fn received(&self, i: usize) -> &[u8] {
        let len = (self.headers[i].msg_len as usize).min(self.capacity);
        &self.storage[i * self.capacity..i * self.capacity + len]
    }

    /// Sends buffers `0..n`, each `len` octets, with one `sendmmsg`; returns how many the
    /// kernel took (possibly fewer than `n`).
    pub fn send(&mut self, fd: RawFd, n: usize, len: usize) -> io::Result<usize> {
        let n = n.min(self.count());
        let len = len.min(self.capacity);
        for v in &mut self.iovecs[..n] {
            v.iov_len = len;
        }
        // SAFETY: `headers[..n]` are initialised `mmsghdr`s whose single `iovec` points at
        // `len` octets inside `storage` (both owned by `self`, not resized since `new`);
        // the kernel only reads them. `n` fits `c_uint` (it is at most `count`, a Vec length
        // the caller bounds to a few thousand).
        let r = unsafe { libc::sendmmsg(fd, self.headers.as_mut_ptr(), n as libc::c_uint, 0) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    /// Receives up to `count` datagrams with one `recvmmsg`: blocks (within the socket's
    /// receive timeout) until one is there unless `nonblocking`, then takes what is queued.
    pub fn recv(&mut self, fd: RawFd, nonblocking: bool) -> io::Result<usize> {
        let capacity = self.capacity;
        for (v, h) in self.iovecs.iter_mut().zip(&mut self.headers) {
            v.iov_len = capacity;
            h.msg_len = 0;
            h.msg_hdr.msg_flags = 0;
        }
        let flags = if nonblocking {
            libc::MSG_DONTWAIT
        } else {
            libc::MSG_WAITFORONE
        };
        // SAFETY: every header's `iovec` points at `capacity` writable octets inside
        // `storage`, owned by `self` and not resized since `new`; no name or control buffer
        // is given (null, length 0); the timeout pointer is null (none).
        let r = unsafe {
            libc::recvmmsg(
                fd,
                self.headers.as_mut_ptr(),
                self.headers.len() as libc::c_uint,
                flags,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }
}

/// CPU time of the calling thread (`CLOCK_THREAD_CPUTIME_ID`), in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable `timespec`; the clock id is a constant the kernel
    // knows.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Asks for `bytes` of send and receive buffer on `fd` (the kernel caps it at
/// `net.core.{w,r}mem_max`); failures are ignored, as the defaults still work.
pub fn set_buffers(fd: RawFd, bytes: usize) {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: `v` is a live `c_int` and the length passed is its size; the kernel only
        // reads it.
        let _ = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("CPU {cpu} is beyond CPU_SETSIZE"),
        ));
    }
    // SAFETY: `cpu_set_t` is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid `cpu_set_t` and `cpu` is below CPU_SETSIZE (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid, initialised `cpu_set_t` and its size is passed; pid 0 is the
    // calling thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
