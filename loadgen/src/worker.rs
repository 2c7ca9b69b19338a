//! One worker thread: its sockets, its share of the requests, its schedule, its timers.
//!
//! The loop, repeated until the worker has sent its share and resolved every request:
//! 1. expire timers: retransmit (same bytes, same Identifier) or resolve as timeout /
//!    expected discard;
//! 2. send what is due: open loop, every request whose intended time has come (latency is
//!    measured from that intended time, so a slow server cannot hide queueing delay: no
//!    coordinated omission); closed loop, enough to keep the window full. One `sendmmsg` per
//!    socket per round;
//! 3. receive with `recvmmsg` on every socket until empty, verify and resolve;
//! 4. when nothing happened, sleep in `ppoll` until the next socket event, send time or timer.
//!
//! Identifiers come from each socket's [`IdAllocator`], so one is never reused while
//! outstanding. A request occupies its (socket, Identifier) slot, which also keeps the exact
//! bytes sent (for retransmission and echo comparison) and the Request Authenticator.
//!
//! Answer matching: an answer belongs to the request whose Response Authenticator it carries
//! (RFC 2865 §3, RFC 5176 §3.5: MD5(Code + Identifier + Length + Request Authenticator +
//! Attributes + Secret)), not merely to whichever request holds its Identifier now. Each
//! (socket, Identifier) remembers the Request Authenticators of its last [`HISTORY`]
//! requests, so a late answer (its request timed out and the Identifier was reused) or a
//! duplicate answer (to a retransmission) is recognised and counted as such, and the current
//! request stays outstanding. Only an answer that verifies against no request sent on that
//! Identifier counts as a bad Response Authenticator, and it does not resolve the current
//! request either (a DAC silently discards it, RFC 2865 §3): that request is then answered
//! properly or times out.
//!
//! Latency: every request that expects an answer leaves one sample, from its intended send
//! time (open loop; closed loop: when it was built): an answer's arrival, or, for a request
//! unanswered `timeout` after its intended send time (a timeout) or never sent (unsent), the
//! time loadgen gave up on it, never less than the timeout.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use dynauth_proto::auth::{
    ResponseCheck, authenticators_equal, md5_authenticator, verify_response,
};
use dynauth_proto::codec::Packet;
use dynauth_proto::dict::{ErrorCause, attr};
use hdrhistogram::Histogram;

use crate::cli::Expect;
use crate::deadlines::Deadlines;
use crate::ids::IdAllocator;
use crate::pool::{Expectation, Pool};
use crate::report::{Counters, HIST_MAX_NS, NAK_SLOTS, new_histogram};
use crate::series::Series;
use dynauth_udp::dac::{BatchReceiver, BatchSender, Poller};

/// Most datagrams in one batch.
pub const MAX_BATCH: usize = 256;
/// Below this, waiting for the next send time does not sleep.
const SPIN_NS: u64 = 2_000;
/// Earlier requests remembered per (socket, Identifier) for recognising late and duplicate
/// answers.
pub const HISTORY: usize = 4;
/// Open loop: how long after the end of the sending time requests due before it may still
/// leave (at most the timeout).
const END_GRACE_NS: u64 = 50_000_000;
/// Unsent requests whose latency sample is computed one by one; beyond, the rest are
/// recorded at the timeout (a lower bound) in one go.
const UNSENT_EXACT: u64 = 1 << 20;

/// Open or closed loop, for one worker.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// Request `j` of this worker is intended at `offset_ns + j * interval_ns` after start.
    /// At most `max_outstanding` requests in flight.
    Open {
        interval_ns: f64,
        offset_ns: f64,
        max_outstanding: usize,
    },
    /// Keep `window` requests outstanding.
    Closed { window: usize },
}

/// Live figures a worker publishes for the progress line.
#[derive(Debug, Default)]
pub struct Progress {
    pub requests: AtomicU64,
    pub answered: AtomicU64,
    pub timeouts: AtomicU64,
    pub bad: AtomicU64,
    pub late: AtomicU64,
    pub outstanding: AtomicU64,
    /// The worker has stopped sending (it drains, or it is done): the end of the measured
    /// window once every worker has.
    pub sending_done: AtomicBool,
    _pad: [u64; 1],
}

/// Everything one worker needs.
#[derive(Debug)]
pub struct WorkerPlan {
    pub index: usize,
    pub threads: usize,
    pub pool: Arc<Pool>,
    pub sockets: Vec<UdpSocket>,
    pub batch: usize,
    pub mode: Mode,
    /// This worker's share of the requests (`None`: until `send_for` ends).
    pub requests: Option<u64>,
    pub send_for: Option<Duration>,
    pub timeout: Duration,
    pub retransmit_after: Option<Duration>,
    pub retries: u8,
    pub expect: Expect,
    pub cpu: Option<usize>,
    /// The common start (every worker's schedule starts here).
    pub start: Instant,
    pub progress: Arc<Progress>,
}

/// What a worker measured.
#[derive(Debug)]
pub struct WorkerResult {
    pub counters: Counters,
    /// Every request that expected an answer: answered, timed out, or unsent.
    pub latency: Histogram<u64>,
    /// Answered requests only.
    pub answered_latency: Histogram<u64>,
    pub lag: Histogram<u64>,
    /// Per 100 ms: sends, answers, latency by intended time.
    pub series: Series,
    pub cpu_ns: u64,
    pub wall_ns: u64,
    /// When the sending phase ended (ns after start).
    pub send_end_ns: u64,
}

/// How an earlier request on a (socket, Identifier) ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Ended {
    #[default]
    Nothing,
    Answered,
    TimedOut,
}

/// An earlier request on a (socket, Identifier).
#[derive(Debug, Clone, Copy, Default)]
struct Past {
    auth: [u8; 16],
    ended: Ended,
}

/// One outstanding request.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    active: bool,
    generation: u32,
    /// Global request number (pool index).
    k: u64,
    intended_ns: u64,
    /// `intended_ns + timeout`: unanswered by then, the request has timed out.
    deadline_ns: u64,
    first_ns: u64,
    transmissions: u8,
    auth: [u8; 16],
    len: u16,
}

struct Sock {
    socket: UdpSocket,
    fd: RawFd,
    ids: IdAllocator,
    slots: Vec<Slot>,
    bufs: Vec<u8>,
    stride: usize,
    /// Identifiers built (or due for retransmission) and not yet handed to the kernel.
    pending: VecDeque<u8>,
    /// The last [`HISTORY`] requests of each Identifier, a ring per Identifier.
    past: Vec<[Past; HISTORY]>,
    past_next: Vec<u8>,
}

impl Sock {
    fn packet(&self, id: u8) -> &[u8] {
        let start = usize::from(id) * self.stride;
        let len = usize::from(self.slots[usize::from(id)].len);
        &self.bufs[start..start + len]
    }
}

/// Ordered by `at_ns` first (the timeout heap's order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    at_ns: u64,
    sock: u32,
    id: u8,
    generation: u32,
}

struct Worker {
    pool: Arc<Pool>,
    socks: Vec<Sock>,
    sender: BatchSender,
    receiver: BatchReceiver,
    /// Waits on the sockets in `poll_map` (rebuilt before each wait).
    poller: Poller,
    /// The socket of each of the poller's entries: the sockets with requests outstanding
    /// (every socket on every 64th wait, for late and stray answers on idle ones). ppoll's
    /// cost grows with its fds (about 0.1 µs each): with 128 source ports and a window of
    /// 64, polling all of them cost ~10% of the worker's CPU per request.
    poll_map: Vec<usize>,
    poll_fds: Vec<RawFd>,
    waits: u64,
    batch: usize,
    mode: Mode,
    requests: Option<u64>,
    send_until_ns: Option<u64>,
    timeout_ns: u64,
    rtx_ns: Option<u64>,
    retries: u8,
    expect: Expect,
    index: u64,
    threads: u64,
    start: Instant,
    progress: Arc<Progress>,
    // state
    next_j: u64,
    outstanding: usize,
    next_sock: usize,
    /// Requests still to allocate on `next_sock` before moving to the next socket.
    run_left: usize,
    /// Receive rounds so far.
    rounds: u64,
    /// (socket, Identifier) of requests `schedule` prepared and has yet to sign.
    unsigned: Vec<(u32, u8)>,
    /// Deadlines run from the intended send time, so they are not quite in send order.
    timeouts: Deadlines<Timer>,
    retransmits: VecDeque<Timer>,
    /// Readiness from the last `ppoll` (`Some(0)`: it timed out), consumed by `receive`.
    polled: Option<usize>,
    counters: Counters,
    latency: Histogram<u64>,
    answered_latency: Histogram<u64>,
    lag: Histogram<u64>,
    series: Series,
    unix_secs: u32,
}

fn now_ns(start: Instant) -> u64 {
    Instant::now().saturating_duration_since(start).as_nanos() as u64
}

fn unix_now() -> u32 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as u32)
}

/// Runs one worker to completion.
pub fn run(plan: WorkerPlan) -> io::Result<WorkerResult> {
    if let Some(cpu) = plan.cpu {
        core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
    }
    dynauth_udp::dac::set_timer_slack_ns(1_000);
    let stride = plan.pool.max_len().next_multiple_of(64).max(64);
    let batch = plan.batch.clamp(1, MAX_BATCH);
    let fds: Vec<RawFd> = plan.sockets.iter().map(|s| s.as_raw_fd()).collect();
    let socks = plan
        .sockets
        .into_iter()
        .map(|socket| Sock {
            fd: socket.as_raw_fd(),
            socket,
            ids: IdAllocator::new(),
            slots: vec![Slot::default(); 256],
            bufs: vec![0; 256 * stride],
            stride,
            pending: VecDeque::with_capacity(256),
            past: vec![[Past::default(); HISTORY]; 256],
            past_next: vec![0; 256],
        })
        .collect();
    let mut w = Worker {
        pool: plan.pool,
        socks,
        sender: BatchSender::new(batch),
        receiver: BatchReceiver::new(batch, 4096),
        poller: Poller::new(&fds),
        poll_map: (0..fds.len()).collect(),
        poll_fds: fds.clone(),
        waits: 0,
        batch,
        mode: plan.mode,
        requests: plan.requests,
        send_until_ns: plan.send_for.map(|d| d.as_nanos() as u64),
        timeout_ns: plan.timeout.as_nanos() as u64,
        rtx_ns: plan
            .retransmit_after
            .filter(|_| plan.retries > 0)
            .map(|d| d.as_nanos().max(1) as u64),
        retries: plan.retries,
        expect: plan.expect,
        index: plan.index as u64,
        threads: plan.threads.max(1) as u64,
        start: plan.start,
        progress: plan.progress,
        next_j: 0,
        outstanding: 0,
        next_sock: 0,
        run_left: batch,
        rounds: 0,
        unsigned: Vec::with_capacity(MAX_BATCH),
        timeouts: Deadlines::default(),
        retransmits: VecDeque::new(),
        polled: None,
        counters: Counters::default(),
        latency: new_histogram(),
        answered_latency: new_histogram(),
        lag: new_histogram(),
        series: Series::new(),
        unix_secs: unix_now(),
    };
    // Wait for the common start.
    while Instant::now() < w.start {
        std::thread::sleep(Duration::from_micros(200));
    }
    let cpu0 = dynauth_udp::dac::thread_cpu_ns();
    let send_end_ns = w.run_loop()?;
    let cpu_ns = dynauth_udp::dac::thread_cpu_ns().saturating_sub(cpu0);
    let wall_ns = now_ns(w.start);
    w.publish();
    Ok(WorkerResult {
        counters: w.counters,
        latency: w.latency,
        answered_latency: w.answered_latency,
        lag: w.lag,
        series: w.series,
        cpu_ns,
        wall_ns,
        send_end_ns,
    })
}

impl Worker {
    fn intended_ns(&self, j: u64) -> u64 {
        match self.mode {
            Mode::Open {
                interval_ns,
                offset_ns,
                ..
            } => (offset_ns + j as f64 * interval_ns) as u64,
            Mode::Closed { .. } => 0,
        }
    }

    /// Whether request `j` of this worker exists (within the count and the duration).
    fn more_to_send(&self, now: u64) -> bool {
        if self.requests.is_some_and(|n| self.next_j >= n) {
            return false;
        }
        match self.send_until_ns {
            Some(end) => match self.mode {
                // A request due before the end may still leave a little after it (a worker
                // woken late at the end is not a generator that fell behind; its latency
                // still counts from its intended time).
                Mode::Open { .. } => {
                    self.intended_ns(self.next_j) < end
                        && now < end + self.timeout_ns.min(END_GRACE_NS)
                }
                Mode::Closed { .. } => now < end,
            },
            None => true,
        }
    }

    fn publish(&self) {
        let p = &self.progress;
        let c = &self.counters;
        p.requests.store(c.requests, Ordering::Relaxed);
        p.answered.store(c.answered(), Ordering::Relaxed);
        p.timeouts.store(c.timeouts, Ordering::Relaxed);
        p.bad.store(
            c.bad_authenticators() + c.echo_mismatches,
            Ordering::Relaxed,
        );
        p.late
            .store(c.late_answers + c.duplicate_answers, Ordering::Relaxed);
        p.outstanding
            .store(self.outstanding as u64, Ordering::Relaxed);
    }

    /// Returns when the sending phase ended (ns after start).
    fn run_loop(&mut self) -> io::Result<u64> {
        let mut send_end_ns: Option<u64> = None;
        let mut last_publish = 0u64;
        loop {
            let now = now_ns(self.start);
            if now.saturating_sub(last_publish) > 50_000_000 {
                self.unix_secs = unix_now();
                self.publish();
                last_publish = now;
            }
            self.expire(now);
            let sending = send_end_ns.is_none();
            let mut built = 0;
            if sending {
                let interrupted = dynauth_udp::dac::interrupted();
                if self.more_to_send(now) && !interrupted {
                    built = self.schedule(now);
                } else {
                    send_end_ns = Some(now);
                    self.progress.sending_done.store(true, Ordering::Release);
                    self.count_unsent(now, interrupted);
                }
            }
            let (sent, blocked) = self.flush(now);
            let received = self.receive()?;
            if let Some(end) = send_end_ns {
                if self.outstanding == 0 {
                    return Ok(end);
                }
                // The final drain: at most `timeout` (plus retransmission slack).
                if now > end + self.timeout_ns + 50_000_000 {
                    self.abandon_all();
                    return Ok(end);
                }
            }
            // Fewer datagrams than sockets: let ppoll say which sockets have answers (and
            // sleep until one has, or until the next send time or timer) rather than trying
            // recvmmsg on every socket again.
            if built + sent + received == 0 || received < self.socks.len() || blocked {
                self.wait(now, send_end_ns.is_some(), blocked)?;
            }
        }
    }

    /// Open loop: requests intended before the end that were never sent.
    fn count_unsent(&mut self, now: u64, interrupted: bool) {
        let Mode::Open {
            interval_ns,
            offset_ns,
            ..
        } = self.mode
        else {
            return;
        };
        let end = match (interrupted, self.send_until_ns) {
            (true, until) => now.min(until.unwrap_or(u64::MAX)),
            (false, Some(until)) => until,
            (false, None) => return, // bounded by count only: everything was sent
        };
        let due = ((end as f64 - offset_ns) / interval_ns).ceil().max(0.0) as u64;
        let due = self.requests.map_or(due, |n| due.min(n));
        let unsent = due.saturating_sub(self.next_j);
        self.counters.unsent += unsent;
        // Each one never got an answer: a sample of at least the timeout.
        let exact = unsent.min(UNSENT_EXACT);
        for j in self.next_j..self.next_j + exact {
            let intended = self.intended_ns(j);
            let waited = now.saturating_sub(intended).max(self.timeout_ns).max(1);
            self.latency.saturating_record(waited);
            self.series.sample(intended, waited, true);
        }
        if unsent > exact {
            let timeout = self.timeout_ns.clamp(1, HIST_MAX_NS);
            let _ = self.latency.record_n(timeout, unsent - exact);
            // The series, a bucket at a time.
            let (mut j, last) = (self.next_j + exact, self.next_j + unsent);
            while j < last {
                let intended = self.intended_ns(j);
                let bucket_end =
                    (intended / crate::series::BUCKET_NS + 1) * crate::series::BUCKET_NS;
                let next = (((bucket_end as f64 - offset_ns) / interval_ns).ceil() as u64)
                    .clamp(j + 1, last);
                self.series.sample_n(intended, timeout, next - j, true);
                j = next;
            }
        }
    }

    /// A request that expected an answer and got none in time (or was never sent): its
    /// latency sample is how long it had waited when loadgen gave up, at least the timeout.
    fn record_unanswered(&mut self, intended_ns: u64, now: u64) {
        let waited = now.saturating_sub(intended_ns).max(self.timeout_ns).max(1);
        self.latency.saturating_record(waited);
        self.series.sample(intended_ns, waited, true);
    }

    /// Builds due requests into free slots; returns how many.
    fn schedule(&mut self, now: u64) -> usize {
        let mut built = 0;
        while built < self.batch * self.socks.len() && self.more_to_send(now) {
            let intended = match self.mode {
                Mode::Open {
                    max_outstanding, ..
                } => {
                    let t = self.intended_ns(self.next_j);
                    if t > now {
                        break;
                    }
                    if now >= t.saturating_add(self.timeout_ns) {
                        // It could not leave before its deadline (the generator fell behind
                        // by more than the timeout): already a timeout, so not sent at all,
                        // counted as unsent, with its sample.
                        self.next_j += 1;
                        self.counters.unsent += 1;
                        self.record_unanswered(t, now);
                        continue;
                    }
                    if self.outstanding >= max_outstanding {
                        self.counters.limit_waits += 1;
                        break;
                    }
                    t
                }
                Mode::Closed { window } => {
                    if self.outstanding >= window {
                        break;
                    }
                    now
                }
            };
            let Some((s, id)) = self.allocate() else {
                break; // every Identifier is outstanding: the schedule slips (lag grows)
            };
            let k = self.index + self.next_j * self.threads;
            self.next_j += 1;
            let sock = &mut self.socks[s];
            let start = usize::from(id) * sock.stride;
            let (len, auth) = self.pool.prepare(
                k,
                id,
                self.unix_secs,
                &mut sock.bufs[start..start + sock.stride],
            );
            if auth.is_none() {
                self.unsigned.push((s as u32, id));
            }
            sock.slots[usize::from(id)] = Slot {
                active: true,
                generation: sock.slots[usize::from(id)].generation.wrapping_add(1),
                k,
                intended_ns: intended,
                deadline_ns: intended.saturating_add(self.timeout_ns),
                first_ns: 0,
                transmissions: 0,
                auth: auth.unwrap_or_default(),
                len: len as u16,
            };
            sock.pending.push_back(id);
            self.outstanding += 1;
            built += 1;
        }
        self.sign_unsigned();
        built
    }

    /// Signs the requests `schedule` prepared unsigned, four of one length at a time in one
    /// four-lane MD5 (signing is most of loadgen's own work per request), the rest one by
    /// one; sets each slot's Request Authenticator.
    fn sign_unsigned(&mut self) {
        let mut todo = std::mem::take(&mut self.unsigned);
        let len_of =
            |socks: &[Sock], &(s, id): &(u32, u8)| socks[s as usize].slots[usize::from(id)].len;
        todo.sort_unstable_by_key(|t| len_of(&self.socks, t));
        let mut rest = &todo[..];
        while !rest.is_empty() {
            let n = if rest.len() >= 4
                && len_of(&self.socks, &rest[0]) == len_of(&self.socks, &rest[3])
            {
                let p = |i: usize| {
                    let (s, id) = rest[i];
                    self.socks[s as usize].packet(id)
                };
                match self.pool.authenticators4([p(0), p(1), p(2), p(3)]) {
                    Some(ras) => {
                        for (&(s, id), ra) in rest[..4].iter().zip(ras) {
                            self.finish_signing(s as usize, id, Some(ra));
                        }
                        4
                    }
                    None => {
                        self.finish_signing(rest[0].0 as usize, rest[0].1, None);
                        1
                    }
                }
            } else {
                self.finish_signing(rest[0].0 as usize, rest[0].1, None);
                1
            };
            rest = &rest[n..];
        }
        todo.clear();
        self.unsigned = todo;
    }

    /// Writes the Request Authenticator `ra` (computed here when `None`) into the unsigned
    /// request in (`s`, `id`) and its slot.
    fn finish_signing(&mut self, s: usize, id: u8, ra: Option<dynauth_proto::auth::Authenticator>) {
        let sock = &mut self.socks[s];
        let slot = &mut sock.slots[usize::from(id)];
        let start = usize::from(id) * sock.stride;
        let packet = &mut sock.bufs[start..start + usize::from(slot.len)];
        slot.auth = match ra {
            Some(ra) => self.pool.finish(slot.k, packet, ra),
            None => self.pool.sign_unsigned(slot.k, packet),
        };
    }

    /// A free (socket, Identifier). Up to a batch of consecutive requests go to the same
    /// socket (full `sendmmsg` batches), then the next socket takes over, so that over time
    /// every source port (and every SO_REUSEPORT shard they hash to) gets its share.
    fn allocate(&mut self) -> Option<(usize, u8)> {
        let n = self.socks.len();
        if self.run_left == 0 {
            self.next_sock = (self.next_sock + 1) % n;
            self.run_left = self.batch;
        }
        for i in 0..n {
            let s = (self.next_sock + i) % n;
            if let Some(id) = self.socks[s].ids.allocate() {
                if i != 0 {
                    self.next_sock = s;
                    self.run_left = self.batch;
                }
                self.run_left -= 1;
                return Some((s, id));
            }
        }
        None
    }

    /// Hands pending packets to the kernel. Returns (sent, whether a socket buffer was full).
    fn flush(&mut self, _now: u64) -> (usize, bool) {
        let mut total = 0;
        let mut blocked = false;
        for s in 0..self.socks.len() {
            while !self.socks[s].pending.is_empty() {
                let sock = &self.socks[s];
                let n = sock.pending.len().min(self.batch);
                let mut slices: [&[u8]; MAX_BATCH] = [&[]; MAX_BATCH];
                for (slice, &id) in slices.iter_mut().zip(sock.pending.iter()).take(n) {
                    *slice = sock.packet(id);
                }
                self.counters.sendmmsg_calls += 1;
                match self.sender.send(sock.fd, &slices[..n]) {
                    Ok(sent) => {
                        let now = now_ns(self.start);
                        for _ in 0..sent {
                            if let Some(id) = self.socks[s].pending.pop_front() {
                                self.mark_sent(s, id, now);
                            }
                        }
                        total += sent;
                        if sent < n {
                            blocked = true;
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        blocked = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        // ECONNREFUSED (ICMP port unreachable from an earlier datagram) and
                        // the like: the first packet is lost; it will time out.
                        self.counters.send_errors += 1;
                        let now = now_ns(self.start);
                        if let Some(id) = self.socks[s].pending.pop_front() {
                            self.mark_sent(s, id, now);
                        }
                    }
                }
            }
        }
        (total, blocked)
    }

    fn mark_sent(&mut self, s: usize, id: u8, now: u64) {
        let sock = &mut self.socks[s];
        let slot = &mut sock.slots[usize::from(id)];
        if !slot.active {
            return;
        }
        let timer = Timer {
            at_ns: 0,
            sock: s as u32,
            id,
            generation: slot.generation,
        };
        if slot.transmissions == 0 {
            slot.first_ns = now;
            self.counters.requests += 1;
            self.series.sent(now);
            if let Mode::Open { .. } = self.mode {
                self.lag
                    .saturating_record(now.saturating_sub(slot.intended_ns).max(1));
            }
            self.timeouts.push(
                slot.deadline_ns,
                Timer {
                    at_ns: slot.deadline_ns,
                    ..timer
                },
            );
        } else {
            self.counters.retransmissions += 1;
        }
        slot.transmissions = slot.transmissions.saturating_add(1);
        if let Some(rtx) = self.rtx_ns
            && slot.transmissions <= self.retries
        {
            self.retransmits.push_back(Timer {
                at_ns: now + rtx,
                ..timer
            });
        }
    }

    fn slot_matches(&self, t: &Timer) -> bool {
        let slot = &self.socks[t.sock as usize].slots[usize::from(t.id)];
        slot.active && slot.generation == t.generation
    }

    fn expire(&mut self, now: u64) {
        while let Some(t) = self.retransmits.front().copied() {
            if t.at_ns > now {
                break;
            }
            self.retransmits.pop_front();
            if self.slot_matches(&t) {
                let sock = &mut self.socks[t.sock as usize];
                if !sock.pending.contains(&t.id) {
                    sock.pending.push_back(t.id);
                }
            }
        }
        while let Some((_, t)) = self.timeouts.pop_due(now) {
            if self.slot_matches(&t) {
                self.time_out(t.sock as usize, t.id, now);
            }
        }
    }

    /// Resolves the outstanding request in (`s`, `id`) as unanswered in time: an expected
    /// discard (a deliberately bad request), else a timeout with its latency sample.
    fn time_out(&mut self, s: usize, id: u8, now: u64) {
        let slot = self.socks[s].slots[usize::from(id)];
        if self.pool.template(slot.k).expect == Expectation::Discard
            && self.expect == Expect::Radius
        {
            self.counters.expected_discards += 1;
        } else {
            self.counters.timeouts += 1;
            self.record_unanswered(slot.intended_ns, now);
        }
        self.resolve(s, id, Ended::TimedOut);
    }

    /// The drain is over: whatever is still outstanding timed out.
    fn abandon_all(&mut self) {
        let now = now_ns(self.start);
        for s in 0..self.socks.len() {
            for id in 0..=255u8 {
                let slot = self.socks[s].slots[usize::from(id)];
                if slot.active {
                    if slot.transmissions == 0 {
                        // Built but never handed to the kernel: not a request sent.
                        // Like every unsent request, a sample of at least the timeout.
                        self.counters.unsent += 1;
                        self.record_unanswered(slot.intended_ns, now);
                        self.resolve(s, id, Ended::TimedOut);
                    } else {
                        self.time_out(s, id, now);
                    }
                }
            }
            self.socks[s].pending.clear();
        }
    }

    fn resolve(&mut self, s: usize, id: u8, ended: Ended) {
        let sock = &mut self.socks[s];
        let i = usize::from(id);
        let slot = &mut sock.slots[i];
        let n = usize::from(sock.past_next[i]);
        sock.past[i][n] = Past {
            auth: slot.auth,
            ended,
        };
        sock.past_next[i] = ((n + 1) % HISTORY) as u8;
        slot.active = false;
        slot.generation = slot.generation.wrapping_add(1);
        sock.ids.release(id);
        self.outstanding -= 1;
    }

    /// Receives everything queued on every socket. Returns how many datagrams.
    fn receive(&mut self) -> io::Result<usize> {
        let mut total = 0;
        // After a ppoll, only the sockets it found readable have anything queued.
        let polled = self.polled.take();
        // Without a ppoll, sockets with nothing outstanding are skipped (with many source
        // ports most have nothing in flight), except every 64th round, so that late and
        // stray answers queued on them are still read and counted.
        self.rounds = self.rounds.wrapping_add(1);
        let every_socket = self.rounds.is_multiple_of(64);
        let candidates = if polled.is_some() {
            self.poll_map.len()
        } else {
            self.socks.len()
        };
        for j in 0..candidates {
            let s = if polled.is_some() {
                if !self.poller.readable(j) {
                    continue;
                }
                self.poll_map[j]
            } else {
                j
            };
            if polled.is_none() && !every_socket && self.socks[s].ids.outstanding() == 0 {
                continue;
            }
            loop {
                self.counters.recvmmsg_calls += 1;
                match self.receiver.recv(self.socks[s].fd, false) {
                    Ok(n) => {
                        let now = now_ns(self.start);
                        for i in 0..n {
                            self.answer(s, i, now);
                        }
                        total += n;
                        if n < self.batch {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // ICMP errors from earlier sends surface here; the request times out.
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(total)
    }

    /// Which earlier request on (`s`, `id`) the answer `data` is for, judged by its Response
    /// Authenticator (RADIUS) or its echoed Request Authenticator (echo).
    fn past_match(&self, s: usize, id: u8, data: &[u8]) -> Option<Ended> {
        let sock = &self.socks[s];
        let received: &[u8; 16] = data.get(4..20)?.try_into().ok()?;
        sock.past[usize::from(id)]
            .iter()
            .filter(|p| p.ended != Ended::Nothing)
            .find(|p| match self.expect {
                Expect::Echo => authenticators_equal(&p.auth, received),
                Expect::Radius => authenticators_equal(
                    &md5_authenticator(data, &p.auth, self.pool.secret()),
                    received,
                ),
            })
            .map(|p| p.ended)
    }

    /// Counts datagram `data_index`, not for the current request of (`s`, `id`), as late (its
    /// request had timed out) or duplicate (its request was already answered); false when it
    /// is for no remembered request either (the caller counts it).
    fn not_current(&mut self, s: usize, id: u8, data_index: usize) -> bool {
        let data = self.receiver.packet(data_index);
        match self.past_match(s, id, data) {
            Some(Ended::TimedOut) => {
                self.counters.late_answers += 1;
                true
            }
            Some(Ended::Answered) => {
                self.counters.duplicate_answers += 1;
                true
            }
            _ => false,
        }
    }

    /// Judges datagram `i` of the last receive on socket `s`.
    fn answer(&mut self, s: usize, i: usize, now: u64) {
        let data = self.receiver.packet(i);
        let Some(&id) = data.get(1) else {
            self.counters.malformed_answers += 1;
            return;
        };
        let slot = self.socks[s].slots[usize::from(id)];
        let current = slot.active && slot.transmissions > 0;
        if self.expect == Expect::Echo {
            if current && data == self.socks[s].packet(id) {
                self.answered(s, id, now);
            } else if !self.not_current(s, id, i) {
                if current {
                    self.counters.echo_mismatches += 1;
                } else {
                    self.counters.stray_answers += 1;
                }
            }
            return;
        }
        let Ok(packet) = Packet::parse(data) else {
            self.counters.malformed_answers += 1;
            return;
        };
        if !current {
            if !self.not_current(s, id, i) {
                self.counters.stray_answers += 1;
            }
            return;
        }
        match verify_response(&packet, &slot.auth, self.pool.secret()) {
            ResponseCheck::Valid => {}
            ResponseCheck::BadResponseAuthenticator => {
                // Not this request's answer: perhaps an earlier one's on this Identifier.
                if !self.not_current(s, id, i) {
                    self.counters.bad_response_authenticators += 1;
                }
                return;
            }
            ResponseCheck::BadMessageAuthenticator => {
                // This request's answer (the Response Authenticator says so) with a wrong
                // Message-Authenticator: discarded (RFC 3579 §3.2); the request stays
                // outstanding and is answered again (retransmission) or times out.
                self.counters.bad_message_authenticators += 1;
                return;
            }
        }
        if now >= slot.deadline_ns {
            // Too late: the request has timed out, whether or not its timer has fired yet.
            self.counters.late_answers += 1;
            self.time_out(s, id, now);
            return;
        }
        let template = *self.pool.template(slot.k);
        let kind = template.kind;
        let cause = error_cause(&packet);
        let code = packet.code();
        let c = &mut self.counters;
        if template.expect == Expectation::Discard {
            c.answered_discards += 1;
        }
        let matched = if code == kind.ack_code() {
            c.acks[kind.index()] += 1;
            if cause == Some(ErrorCause::ResidualSessionContextRemoved.value()) {
                c.acks_residual += 1;
            }
            template.expect == Expectation::Ack
        } else if code == kind.nak_code() {
            let slot_index = cause
                .and_then(ErrorCause::from_value)
                .map_or(NAK_SLOTS - 1, ErrorCause::index);
            c.naks[kind.index()][slot_index] += 1;
            template.expect == Expectation::NakNotFound
                && cause == Some(ErrorCause::SessionContextNotFound.value())
        } else {
            c.unexpected_codes += 1;
            false
        };
        if !matched && template.expect != Expectation::Discard {
            c.expectation_mismatches += 1;
        }
        self.record_answered(slot.intended_ns, now);
        self.resolve(s, id, Ended::Answered);
    }

    /// An answer at `now` to the request intended at `intended_ns`: its latency sample.
    fn record_answered(&mut self, intended_ns: u64, now: u64) {
        let latency = now.saturating_sub(intended_ns).max(1);
        self.latency.saturating_record(latency);
        self.answered_latency.saturating_record(latency);
        self.series.answered(now);
        self.series.sample(intended_ns, latency, false);
    }

    /// Echo mode: the current request of (`s`, `id`) was echoed.
    fn answered(&mut self, s: usize, id: u8, now: u64) {
        let slot = self.socks[s].slots[usize::from(id)];
        if now >= slot.deadline_ns {
            self.counters.late_answers += 1;
            self.time_out(s, id, now);
            return;
        }
        self.counters.echo_ok += 1;
        self.record_answered(slot.intended_ns, now);
        self.resolve(s, id, Ended::Answered);
    }

    /// Sleeps until a socket is readable or the next send time or timer is due.
    fn wait(&mut self, now: u64, draining: bool, blocked: bool) -> io::Result<()> {
        let mut next = u64::MAX;
        if blocked {
            next = now + 20_000; // a full socket buffer: try again shortly
        }
        if !draining
            && let Mode::Open {
                max_outstanding, ..
            } = self.mode
            && self.outstanding < max_outstanding
            && self.socks.iter().any(|s| s.ids.free() > 0)
        {
            next = next.min(self.intended_ns(self.next_j));
        }
        if let Some(end) = self.send_until_ns
            && !draining
        {
            next = next.min(end);
        }
        if !draining
            && let Mode::Closed { window } = self.mode
            && self.outstanding < window
            && self.socks.iter().any(|s| s.ids.free() > 0)
        {
            next = now; // room in the window: only check the sockets, then send more
        }
        if let Some(at) = self.timeouts.next_at() {
            next = next.min(at);
        }
        if let Some(t) = self.retransmits.front() {
            next = next.min(t.at_ns);
        }
        if draining {
            next = next.min(now + self.timeout_ns + 50_000_000);
        }
        let wait_ns = next.saturating_sub(now);
        // The timer slack is 1 µs (set at start), so ppoll wakes close to the send time; what
        // it misses shows in the schedule lag. Below SPIN_NS it only checks the sockets.
        let timeout = if wait_ns < SPIN_NS {
            Duration::ZERO
        } else {
            Duration::from_nanos(wait_ns)
        };
        self.counters.ppoll_calls += 1;
        self.waits = self.waits.wrapping_add(1);
        let every_socket = self.waits.is_multiple_of(64);
        self.poll_map.clear();
        self.poll_fds.clear();
        for (i, sock) in self.socks.iter().enumerate() {
            if every_socket || sock.ids.outstanding() > 0 {
                self.poll_map.push(i);
                self.poll_fds.push(sock.fd);
            }
        }
        self.poller = Poller::new(&self.poll_fds);
        self.polled = Some(self.poller.wait(Some(timeout))?);
        Ok(())
    }
}

/// The Error-Cause value of an answer, if any.
fn error_cause(packet: &Packet<'_>) -> Option<u32> {
    packet
        .attributes()
        .filter_map(Result::ok)
        .find(|a| a.ty == attr::ERROR_CAUSE)
        .and_then(|a| dynauth_proto::codec::read_u32(a.value).ok())
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("sockets", &self.socks.len())
            .field("outstanding", &self.outstanding)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Sock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sock")
            .field("local", &self.socket.local_addr().ok())
            .field("outstanding", &self.ids.outstanding())
            .finish_non_exhaustive()
    }
}
