//! Waking a shard that waits for datagrams: an `eventfd(2)` polled beside its sockets, so
//! another thread (the action dispatcher, with answers for the shard to send) can end the
//! shard's wait at once instead of after its receive timeout.
//!
//! Owns: the eventfd. Must not touch: what the woken thread does next.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// One eventfd; [`Waker::wake`] from any thread, the shard's backend polls and drains it.
#[derive(Debug)]
pub struct Waker {
    fd: OwnedFd,
}

impl Waker {
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor that
        // nothing else owns, which `OwnedFd` then closes exactly once.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a valid descriptor just returned by eventfd, owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Waker { fd })
    }

    /// Makes the eventfd readable (until drained): a waiting poll returns, and so does the
    /// next one if nobody waits now. Never blocks; a counter at its maximum is still readable.
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes the 8 octets of `one`, which lives across the call, to our eventfd.
        let _ = unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&one as *const u64).cast(),
                size_of::<u64>(),
            )
        };
    }

    /// Resets the eventfd to not readable (called by the poller when it fired).
    pub fn drain(&self) {
        let mut count: u64 = 0;
        // SAFETY: reads at most 8 octets into `count`, which lives across the call.
        let _ = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut count as *mut u64).cast(),
                size_of::<u64>(),
            )
        };
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd for the duration of the call.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn a_wake_makes_the_eventfd_readable_until_drained() {
        let w = Waker::new().unwrap();
        assert!(!readable(w.raw_fd()));
        w.wake();
        w.wake();
        assert!(readable(w.raw_fd()), "woken twice, readable once");
        w.drain();
        assert!(!readable(w.raw_fd()));
    }
}
