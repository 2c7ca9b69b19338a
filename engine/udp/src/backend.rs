//! The interface between the I/O backends and the code that decides datagrams: `Handler`, `Received`, `IoStats`, and `Backend`, either backend behind one type.
#![forbid(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::mmsg::*;
use crate::uring::*;

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
pub(crate) struct DropCounters(pub(crate) Vec<u32>);

impl DropCounters {
    pub(crate) fn new(n: usize) -> Self {
        DropCounters(vec![0; n])
    }
    pub(crate) fn update(&mut self, socket: usize, seen: Option<u32>, stats: &mut IoStats) {
        if let (Some(seen), Some(last)) = (seen, self.0.get_mut(socket)) {
            let delta = seen.wrapping_sub(*last);
            if delta > 0 && delta < u32::MAX / 2 {
                stats.kernel_drops += u64::from(delta);
                *last = seen;
            }
        }
    }
}

pub(crate) fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAGAIN) | Some(libc::EINTR) | Some(libc::ETIME) | Some(libc::EBUSY)
    )
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
