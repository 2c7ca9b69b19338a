//! The JSON report of `mmsg-gen`, the independent generator: one type, serialised by
//! `mmsg-gen --json` and read by `bench-harness gen-check` (both compile this file), so the
//! schema is written once. Owns: field names and what each count means. Must not touch: I/O.

use serde::{Deserialize, Serialize};

/// One closed-loop run of `mmsg-gen`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenReport {
    /// The target, `ADDR:PORT`.
    pub target: String,
    /// Requests kept in flight.
    pub window: usize,
    /// Datagrams per `sendmmsg`/`recvmmsg` at most.
    pub batch: usize,
    /// Octets of every request (and so of every echo).
    pub datagram_octets: usize,
    /// Every request signed with a shared secret (MD5 Request Authenticator), as loadgen's.
    pub signed: bool,
    /// The CPU the generator pinned itself to, if any.
    pub cpu: Option<usize>,
    /// Requests the kernel accepted.
    pub sent: u64,
    /// Answers byte-identical to the request outstanding on their slot with their
    /// sequence number: each resolves one request.
    pub answered: u64,
    /// Requests with no such answer within the timeout (resolved as lost; the slot is reused).
    pub lost: u64,
    /// Answers naming an earlier sequence number of their slot (late after a loss, or a
    /// duplicate): resolve nothing.
    pub stale: u64,
    /// Answers naming the outstanding request but not identical to it: resolve nothing.
    pub corrupt: u64,
    /// Datagrams that are not one of ours (too short, no marker, unknown slot or sequence).
    pub foreign: u64,
    /// `sendmmsg` calls that failed (e.g. ECONNREFUSED with nothing listening).
    pub send_errors: u64,
    /// Requests still in flight when the drain gave up (counted in `lost` too).
    pub unresolved_at_end: u64,
    /// Time spent sending (the measured window), seconds.
    pub send_seconds: f64,
    /// Whole run, drain included, seconds.
    pub wall_seconds: f64,
    /// `answered / send_seconds`: answers per second of the sending phase (loadgen's
    /// `achieved_rate_rps` is defined the same way, so the two compare like for like).
    pub answered_rps: f64,
    /// The sending thread's CPU time over the whole run (`CLOCK_THREAD_CPUTIME_ID`).
    pub worker_cpu_s: f64,
    /// `worker_cpu_s / wall_seconds`: near 1.0, the generator's own core was the limit.
    pub worker_utilisation: f64,
    /// Worker CPU per answer, nanoseconds.
    pub cpu_ns_per_answer: f64,
    pub sendmmsg_calls: u64,
    pub recvmmsg_calls: u64,
}

impl GenReport {
    /// Every request resolved by its own, exact answer: nothing lost, late, corrupt or
    /// foreign, and every accepted request answered.
    pub fn clean(&self) -> bool {
        self.answered == self.sent
            && self.lost == 0
            && self.stale == 0
            && self.corrupt == 0
            && self.foreign == 0
    }

    /// Every request resolved exactly once.
    pub fn counts_add_up(&self) -> bool {
        self.answered + self.lost == self.sent
    }
}
