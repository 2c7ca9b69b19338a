//! The interface between the I/O backends and the code that decides datagrams: `Handler`
//! (one receive batch in, answers out), `Batch`, `Received`, `AnswerBuffer`, `IoStats`, and
//! `Backend`, either backend behind one type.
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
    /// When the kernel received it (SO_TIMESTAMPNS: CLOCK_REALTIME nanoseconds since the
    /// Unix epoch), when the kernel said; the runtime sheds by this age under overload.
    pub received_ns: Option<u64>,
}

/// The buffer one datagram's answer is written into, and whether there is one to send.
#[derive(Debug)]
pub struct AnswerBuffer<'d> {
    buffer: &'d mut [u8],
    len: Option<usize>,
}

impl<'d> AnswerBuffer<'d> {
    pub(crate) fn new(buffer: &'d mut [u8]) -> Self {
        AnswerBuffer { buffer, len: None }
    }

    /// Where to write the answer (`MAX_DATAGRAM` octets).
    pub fn buffer(&mut self) -> &mut [u8] {
        self.buffer
    }

    /// Sends the first `len` octets of the buffer as the answer (capped at its size).
    pub fn send(&mut self, len: usize) {
        self.len = Some(len.min(self.buffer.len()));
    }

    /// Sends nothing after all (undoes [`AnswerBuffer::send`]).
    pub fn cancel(&mut self) {
        self.len = None;
    }

    /// The length to send, if the handler answered.
    pub fn answer_len(&self) -> Option<usize> {
        self.len
    }
}

/// One receive batch: the datagrams in, one answer buffer per datagram out (same index).
/// Handing the handler the whole batch at once lets it do per-batch work (read the clock
/// once, prefetch, multi-buffer hashing) without touching the I/O code.
#[derive(Debug)]
pub struct Batch<'b, 'd> {
    datagrams: &'b [Received<'d>],
    answers: &'b mut [AnswerBuffer<'d>],
    /// The backend can keep this batch's answers back while it decides the next batch.
    can_hold: bool,
    held: bool,
}

impl<'b, 'd> Batch<'b, 'd> {
    pub(crate) fn new(datagrams: &'b [Received<'d>], answers: &'b mut [AnswerBuffer<'d>]) -> Self {
        debug_assert_eq!(datagrams.len(), answers.len());
        Batch {
            datagrams,
            answers,
            can_hold: false,
            held: false,
        }
    }

    /// A batch whose answers the backend can hold (see [`Batch::hold`]).
    pub(crate) fn holdable(mut self, can_hold: bool) -> Self {
        self.can_hold = can_hold;
        self
    }

    /// Asks the backend to keep this batch's answers back until [`Handler::release_held`]
    /// says they may go: the backend receives and decides later batches meanwhile, then
    /// calls `release_held` once for this batch and sends its answers, before any answer
    /// of a later batch. Returns false when this backend cannot hold answers (the handler
    /// must then wait itself before returning from [`Handler::batch`]). Hold only a batch
    /// with answers: one without is released at once (`release_held` right away).
    ///
    /// What it is for: answers that may only leave once something else finished (a journal
    /// fsync), without the shard idling until then.
    pub fn hold(&mut self) -> bool {
        self.held = self.can_hold;
        self.held
    }

    /// Whether the handler held this batch's answers.
    pub(crate) fn is_held(&self) -> bool {
        self.held
    }

    pub fn len(&self) -> usize {
        self.datagrams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.datagrams.is_empty()
    }

    pub fn datagrams(&self) -> &[Received<'d>] {
        self.datagrams
    }

    /// Each datagram with its answer buffer.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&Received<'d>, &mut AnswerBuffer<'d>)> {
        self.datagrams.iter().zip(self.answers.iter_mut())
    }
}

/// What a backend feeds datagrams to, one receive batch at a time.
pub trait Handler {
    /// Decides every datagram of the batch, writing answers into their buffers.
    fn batch(&mut self, batch: &mut Batch<'_, '_>);

    /// Blocks until the answers of the oldest batch this handler held ([`Batch::hold`]) and
    /// that was not released yet may be sent. The backend calls it once per held batch, in
    /// the order they were decided, right before sending that batch's answers.
    fn release_held(&mut self) {}

    /// Whether [`Handler::release_held`] would return at once (the backend then sends
    /// the oldest held batch's answers without waiting).
    fn held_ready(&mut self) -> bool {
        true
    }
}

/// Empties a vector of borrowed values so that its allocation can be kept across batches
/// whose borrows have different lifetimes. The in-place `collect` reuses the allocation (same
/// size and alignment), so steady-state batches allocate nothing.
pub(crate) fn recycle<'a, 'b>(mut v: Vec<Received<'a>>) -> Vec<Received<'b>> {
    v.clear();
    v.into_iter()
        .map(|_| unreachable!("the vector is empty"))
        .collect()
}

/// [`recycle`] for answer buffers.
pub(crate) fn recycle_answers<'a, 'b>(mut v: Vec<AnswerBuffer<'a>>) -> Vec<AnswerBuffer<'b>> {
    v.clear();
    v.into_iter()
        .map(|_| unreachable!("the vector is empty"))
        .collect()
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
    /// Datagrams longer than the receive buffer (MSG_TRUNC). RADIUS packets are at most 4096
    /// octets and octets past the Length field are padding (RFC 2865 §3), so the packet itself
    /// arrived whole: these are counted and decided as usual.
    pub truncated: u64,
    /// Datagrams whose control messages were cut (MSG_CTRUNC): the local address the answer
    /// must leave from may be lost, so they are dropped and counted.
    pub control_truncated: u64,
    /// io_uring: the provided-buffer ring ran dry (the kernel then drops datagrams).
    pub out_of_buffers: u64,
    /// Batches (wake-ups that found at least one datagram).
    pub batches: u64,
    /// UDP GSO messages sent (each carrying several answers).
    pub gso_messages: u64,
    /// Settled answers (decided later by the data plane) the shard sent itself.
    pub settled_sent: u64,
}

impl IoStats {
    pub fn add(&mut self, o: &IoStats) {
        self.received += o.received;
        self.sent += o.sent;
        self.kernel_drops += o.kernel_drops;
        self.send_errors += o.send_errors;
        self.recv_errors += o.recv_errors;
        self.unparsable += o.unparsable;
        self.truncated += o.truncated;
        self.control_truncated += o.control_truncated;
        self.out_of_buffers += o.out_of_buffers;
        self.batches += o.batches;
        self.gso_messages += o.gso_messages;
        self.settled_sent += o.settled_sent;
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

    /// Lets another thread end the wait for datagrams; false where the backend cannot
    /// (io_uring: the caller then does not rely on it).
    pub fn set_waker(&mut self, waker: std::sync::Arc<crate::Waker>) -> bool {
        match self {
            Backend::Mmsg(b) => {
                b.set_waker(waker);
                true
            }
            Backend::Uring(_) => false,
        }
    }

    pub fn stats(&self) -> IoStats {
        match self {
            Backend::Mmsg(b) => b.stats(),
            Backend::Uring(b) => b.stats(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recycled_vectors_keep_their_allocation() {
        let data = [1u8, 2, 3];
        let mut v = Vec::with_capacity(64);
        v.push(Received {
            data: &data,
            source: SocketAddr::from(([127, 0, 0, 1], 1)),
            destination: SocketAddr::from(([127, 0, 0, 1], 2)),
            received_ns: None,
        });
        let ptr = v.as_ptr() as usize;
        let v: Vec<Received<'static>> = recycle(v);
        assert!(v.is_empty());
        assert!(v.capacity() >= 64);
        assert_eq!(v.as_ptr() as usize, ptr);
    }

    #[test]
    fn batch_pairs_each_datagram_with_its_answer_buffer() {
        let (a, b) = ([40u8; 20], [43u8; 20]);
        let source = SocketAddr::from(([127, 0, 0, 1], 1));
        let datagrams = [
            Received {
                data: &a,
                source,
                destination: source,
                received_ns: None,
            },
            Received {
                data: &b,
                source,
                destination: source,
                received_ns: None,
            },
        ];
        let mut out = [[0u8; 8]; 2];
        let [o1, o2] = &mut out;
        let mut answers = [AnswerBuffer::new(o1), AnswerBuffer::new(o2)];
        let mut batch = Batch::new(&datagrams, &mut answers);
        assert_eq!(batch.len(), 2);
        for (d, answer) in batch.iter_mut() {
            if d.data[0] == 43 {
                answer.buffer()[0] = 44;
                answer.send(100);
            }
        }
        assert_eq!(answers[0].answer_len(), None);
        assert_eq!(
            answers[1].answer_len(),
            Some(8),
            "capped at the buffer's size"
        );
        assert_eq!(out[1][0], 44);
    }
}
