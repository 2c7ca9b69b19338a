//! What a run measured: the per-thread [`Counters`] and histograms, merged into a
//! [`Report`] that prints as text or JSON, and the HdrHistogram percentile-distribution
//! (`.hgrm`) file that HdrHistogram's plotting tools read.
//!
//! Accounting rule: every request sent is resolved exactly once, as an authenticated answer
//! (ACK, NAK or unexpected code; echo: an identical echo) within the timeout, a timeout, or an
//! expected discard (a request with a deliberately bad authenticator that got no answer).
//! Hence `requests = answered + timeouts + expected_discards`. Datagrams that answer no
//! outstanding request (late, duplicate, stray, bad authenticators, malformed) are counted
//! on their own and resolve nothing.
//!
//! Latency is reported over every request that expected an answer, sent or not: answered
//! ones at their latency, timed-out and unsent ones at (at least) the timeout, so the
//! percentiles cannot hide loss; the share of such samples is printed beside them.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::Write;

use dynauth_proto::dict::ErrorCause;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::cli::{Expect, Profile};

/// Highest latency or lag recorded (ns): 60 s; higher values are recorded as 60 s.
pub const HIST_MAX_NS: u64 = 60_000_000_000;
/// Significant figures of every histogram.
pub const HIST_SIGFIG: u8 = 3;

/// A latency histogram in nanoseconds.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_NS, HIST_SIGFIG).expect("valid histogram bounds")
}

/// NAK counters: one per Error-Cause of RFC 5176 §3.5, then "none or unknown".
pub const NAK_SLOTS: usize = ErrorCause::ALL.len() + 1;

/// One thread's counts (summed into the report).
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Distinct requests sent (first transmissions).
    pub requests: u64,
    /// Retransmissions (same packet, same Identifier).
    pub retransmissions: u64,
    /// Valid answers (authenticated, expected code): ACK by request kind.
    pub acks: [u64; 2],
    /// ACKs carrying Error-Cause 201 (Residual Session Context Removed), part of `acks`.
    pub acks_residual: u64,
    /// Valid NAKs by request kind and Error-Cause slot.
    pub naks: [[u64; NAK_SLOTS]; 2],
    /// Authenticated answers with a code that does not answer the request.
    pub unexpected_codes: u64,
    /// Answers on an outstanding Identifier whose Response Authenticator verifies against
    /// neither the outstanding request nor an earlier one on that Identifier (a DAS bug, a
    /// wrong secret, or an answer older than the remembered history). They resolve nothing.
    pub bad_response_authenticators: u64,
    /// Answers to an outstanding request (by their Response Authenticator) whose
    /// Message-Authenticator is wrong: discarded, the request stays outstanding.
    pub bad_message_authenticators: u64,
    /// Echo mode: answers identical to the request.
    pub echo_ok: u64,
    /// Echo mode: answers on an outstanding Identifier identical to no request sent on it.
    pub echo_mismatches: u64,
    /// Authenticated answers to a request that had already timed out (its Identifier possibly
    /// reused since), including answers that arrived after the deadline but before its timer.
    pub late_answers: u64,
    /// Authenticated answers to a request that had already been answered (duplicates, e.g.
    /// to a retransmission).
    pub duplicate_answers: u64,
    /// Requests with no answer within the timeout (excluding expected discards).
    pub timeouts: u64,
    /// Deliberately bad requests that (rightly) got no answer.
    pub expected_discards: u64,
    /// Deliberately bad requests that were answered anyway (part of the answered counts).
    pub answered_discards: u64,
    /// Valid answers that differ from what the mix predicted (e.g. NAK 503 to a Disconnect of
    /// a session an earlier Disconnect already removed).
    pub expectation_mismatches: u64,
    /// Datagrams on an Identifier with no outstanding request that verify against no
    /// remembered earlier request either.
    pub stray_answers: u64,
    /// Datagrams that are not RADIUS packets.
    pub malformed_answers: u64,
    /// Requests intended (open loop) but never sent before the end: the generator fell behind.
    pub unsent: u64,
    /// Open loop: times a due request waited because --max-outstanding requests were in
    /// flight (the modelled DAC's limit, set off by a slow server, not the generator's).
    pub limit_waits: u64,
    /// sendmmsg errors other than a full socket buffer.
    pub send_errors: u64,
    /// System calls made by the workers: sendmmsg, recvmmsg, ppoll.
    pub sendmmsg_calls: u64,
    pub recvmmsg_calls: u64,
    pub ppoll_calls: u64,
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        self.requests += o.requests;
        self.retransmissions += o.retransmissions;
        for k in 0..2 {
            self.acks[k] += o.acks[k];
            for c in 0..NAK_SLOTS {
                self.naks[k][c] += o.naks[k][c];
            }
        }
        self.acks_residual += o.acks_residual;
        self.unexpected_codes += o.unexpected_codes;
        self.bad_response_authenticators += o.bad_response_authenticators;
        self.bad_message_authenticators += o.bad_message_authenticators;
        self.echo_ok += o.echo_ok;
        self.echo_mismatches += o.echo_mismatches;
        self.late_answers += o.late_answers;
        self.duplicate_answers += o.duplicate_answers;
        self.timeouts += o.timeouts;
        self.expected_discards += o.expected_discards;
        self.answered_discards += o.answered_discards;
        self.expectation_mismatches += o.expectation_mismatches;
        self.stray_answers += o.stray_answers;
        self.malformed_answers += o.malformed_answers;
        self.unsent += o.unsent;
        self.limit_waits += o.limit_waits;
        self.send_errors += o.send_errors;
        self.sendmmsg_calls += o.sendmmsg_calls;
        self.recvmmsg_calls += o.recvmmsg_calls;
        self.ppoll_calls += o.ppoll_calls;
    }

    pub fn ack_total(&self) -> u64 {
        self.acks[0] + self.acks[1]
    }

    pub fn nak_total(&self) -> u64 {
        self.naks.iter().flatten().sum()
    }

    /// Requests resolved by an authenticated answer within the timeout.
    pub fn answered(&self) -> u64 {
        self.ack_total() + self.nak_total() + self.unexpected_codes + self.echo_ok
    }

    /// Answers that failed verification.
    pub fn bad_authenticators(&self) -> u64 {
        self.bad_response_authenticators + self.bad_message_authenticators
    }

    /// NAKs of one Error-Cause, both kinds.
    pub fn naks_with(&self, cause: ErrorCause) -> u64 {
        let i = cause.index();
        self.naks[0][i] + self.naks[1][i]
    }
}

/// Percentiles of one histogram, in microseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// Latency over every request that expected an answer, with the share of samples that are
/// timeouts (or unsent requests) beside the percentiles: a percentile at or above
/// `timeout_us` is a timeout, not a measured answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    #[serde(flatten)]
    pub percentiles: Percentiles,
    /// Samples that are timeouts or unsent requests (recorded at least at the timeout).
    pub timeouts: u64,
    /// `timeouts / count` (0 when there is no sample).
    pub timeout_share: f64,
    /// The timeout, in microseconds.
    pub timeout_us: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>, timeouts: u64, timeout_ns: u64) -> Latency {
        let percentiles = Percentiles::of(h);
        Latency {
            timeout_share: if percentiles.count == 0 {
                0.0
            } else {
                timeouts as f64 / percentiles.count as f64
            },
            percentiles,
            timeouts,
            timeout_us: timeout_ns as f64 / 1e3,
        }
    }

    /// `value_us` as text, marked when it is a timeout rather than a measured answer.
    pub fn show(&self, value_us: f64) -> String {
        if self.timeouts > 0 && value_us >= self.timeout_us {
            format!("{value_us:.1} (timeout)")
        } else {
            format!("{value_us:.1}")
        }
    }
}

impl std::ops::Deref for Latency {
    type Target = Percentiles;
    fn deref(&self) -> &Percentiles {
        &self.percentiles
    }
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        let us = |ns: u64| ns as f64 / 1e3;
        if h.is_empty() {
            return Percentiles {
                count: 0,
                min_us: 0.0,
                mean_us: 0.0,
                p50_us: 0.0,
                p90_us: 0.0,
                p99_us: 0.0,
                p999_us: 0.0,
                max_us: 0.0,
            };
        }
        Percentiles {
            count: h.len(),
            min_us: us(h.min()),
            mean_us: h.mean() / 1e3,
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// The generator's own cost, so a reader can tell whether it or the server was the limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneratorCost {
    /// CPU seconds of the worker threads (CLOCK_THREAD_CPUTIME_ID), summed.
    pub worker_cpu_s: f64,
    /// Worker CPU nanoseconds per request sent (sending, receiving, verifying).
    pub cpu_ns_per_request: f64,
    /// Worker CPU time over worker wall time, averaged over the threads (1.0: every worker
    /// was busy all the time, so the generator may have been the limit).
    pub worker_utilisation: f64,
    /// The busiest worker's CPU time over its wall time.
    #[serde(default)]
    pub busiest_worker_utilisation: f64,
    /// The generator's own capacity on these settings, estimated: the requests per second
    /// its workers would handle if every one were busy all the time (threads x 1e9 /
    /// `cpu_ns_per_request`). Against answers as costly as this run's; 0 when nothing was
    /// sent.
    #[serde(default)]
    pub capacity_rps: f64,
    /// CPU seconds of the whole process (getrusage), user and system.
    pub process_user_s: f64,
    pub process_system_s: f64,
    /// Worker system calls per request sent: sendmmsg, recvmmsg, ppoll.
    pub sendmmsg_per_request: f64,
    pub recvmmsg_per_request: f64,
    pub ppoll_per_request: f64,
}

/// Open loop only: how late requests left compared with their intended send time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleLag {
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// Answer counts, keyed for JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerCounts {
    pub ack_disconnect: u64,
    pub ack_coa: u64,
    /// ACKs with Error-Cause 201 (included in the ACK counts).
    pub ack_residual_201: u64,
    pub nak_disconnect: u64,
    pub nak_coa: u64,
    /// NAKs by Error-Cause value ("none" when absent or not a registered value).
    pub nak_by_error_cause: BTreeMap<String, u64>,
    pub unexpected_codes: u64,
    pub bad_response_authenticators: u64,
    pub bad_message_authenticators: u64,
    pub echo_ok: u64,
    pub echo_mismatches: u64,
    pub answered_discards: u64,
    pub expectation_mismatches: u64,
    /// Answers to requests that had already timed out.
    pub late: u64,
    /// Answers to requests that had already been answered.
    pub duplicates: u64,
    pub stray: u64,
    pub malformed: u64,
}

/// Open or closed loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoopMode {
    /// A rate: latency from the intended send time.
    OpenLoop,
    /// A window of outstanding requests.
    ClosedLoop,
}

impl LoopMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LoopMode::OpenLoop => "open-loop",
            LoopMode::ClosedLoop => "closed-loop",
        }
    }
}

/// The whole run's figures: the `--json` output, and the one definition of that schema
/// (bench-harness reads loadgen's JSON through this type, never through a copy of it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    pub target: String,
    pub mode: LoopMode,
    pub profile: Profile,
    pub expect: Expect,
    pub threads: usize,
    pub sockets: usize,
    pub window: Option<usize>,
    pub offered_rate_rps: Option<f64>,
    /// From the first send to the end of the sending phase.
    pub send_seconds: f64,
    /// Including the final drain.
    pub wall_seconds: f64,
    pub requests: u64,
    pub transmissions: u64,
    pub retransmissions: u64,
    /// Requests resolved by an authenticated answer within the timeout.
    pub answered: u64,
    pub timeouts: u64,
    pub expected_discards: u64,
    /// Open loop: requests scheduled but never sent (the generator fell behind).
    pub unsent: u64,
    pub send_errors: u64,
    /// Requests per second sent during the sending phase.
    pub sent_rate_rps: f64,
    /// Answers per second over the sending phase.
    pub achieved_rate_rps: f64,
    /// Timeouts over requests that expected an answer.
    pub loss_ratio: f64,
    pub answers: AnswerCounts,
    /// Latency of every request that expected an answer, from its intended send time:
    /// answers at their latency, timeouts and unsent requests at (at least) the timeout; with
    /// the timeouts' share.
    pub latency: Latency,
    /// Latency of the answered requests only (for telling server time from loss; not the
    /// headline figure).
    pub answered_latency: Percentiles,
    pub schedule_lag: Option<ScheduleLag>,
    pub generator: GeneratorCost,
    /// Per 100 ms bucket: rate sent and answered, latency p50/p99 and timeouts of the
    /// requests intended in it.
    #[serde(default)]
    pub time_series: crate::series::TimeSeries,
    /// The generator, not the server, was the bottleneck: these figures are the generator's
    /// and must not be reported as the server's (see [`generator_bound_reasons`]).
    #[serde(default)]
    pub generator_bound: bool,
    /// Why it was, in words (empty when it was not).
    #[serde(default)]
    pub generator_bound_reasons: Vec<String>,
    /// The run was stopped early by Ctrl-C.
    pub interrupted: bool,
    /// True when `requests == answered + timeouts + expected_discards`.
    pub counts_add_up: bool,
    /// With --server-pid: the server's CPU (user + system of its threads) and the machine's
    /// steal over the measured window (first send to the end of sending).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_cpu: Option<crate::watch::ServerCpu>,
}

/// A worker busier than this (CPU over wall time) was the bottleneck.
pub const GENERATOR_BUSY: f64 = 0.95;
/// Open loop: more than this share of the requests due left unsent, without the
/// --max-outstanding limit ever holding one back, means the generator could not offer the
/// rate.
pub const GENERATOR_UNSENT: f64 = 0.01;

/// Why the generator was the bottleneck of a run (empty: it was not). `busiest`: the
/// busiest worker's utilisation; `limit_waits`: how often --max-outstanding held a request
/// back (then unsent requests are the slow server's doing, not the generator's).
pub fn generator_bound_reasons(
    busiest: f64,
    mode: LoopMode,
    offered_rps: Option<f64>,
    sent_rps: f64,
    requests: u64,
    unsent: u64,
    limit_waits: u64,
) -> Vec<String> {
    let mut why = Vec::new();
    if busiest > GENERATOR_BUSY {
        why.push(format!(
            "a worker was {:.0}% busy (over {:.0}%): add --threads/--cpus",
            busiest * 100.0,
            GENERATOR_BUSY * 100.0
        ));
    }
    let due = requests + unsent;
    if mode == LoopMode::OpenLoop
        && limit_waits == 0
        && due > 0
        && unsent as f64 > GENERATOR_UNSENT * due as f64
    {
        why.push(format!(
            "offered rate not achieved: {unsent} of {due} requests due were never sent (sent {:.0}/s of {:.0}/s offered)",
            sent_rps,
            offered_rps.unwrap_or(0.0)
        ));
    }
    why
}

/// What [`crate::run`] returns: the [`RunReport`] (reached through `Deref`, serialised as
/// itself) and the raw counters and histogram it was computed from, for tests and the
/// `.hgrm` file.
#[derive(Debug, Clone)]
pub struct Report {
    pub run: RunReport,
    pub counters: Counters,
    pub histogram: Histogram<u64>,
}

impl std::ops::Deref for Report {
    type Target = RunReport;
    fn deref(&self) -> &RunReport {
        &self.run
    }
}

impl Serialize for Report {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.run.serialize(serializer)
    }
}

impl AnswerCounts {
    /// Answers that failed verification or answered a request meant to be discarded.
    pub fn invalid(&self) -> u64 {
        self.bad_response_authenticators
            + self.bad_message_authenticators
            + self.echo_mismatches
            + self.answered_discards
            + self.malformed
    }
}

impl RunReport {
    /// Human-readable summary.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let l = &self.latency;
        let a = &self.answers;
        let rate = self
            .offered_rate_rps
            .map_or(String::new(), |r| format!(", offered {r:.0}/s"));
        let window = self
            .window
            .map_or(String::new(), |w| format!(", window {w}"));
        s += &format!(
            "loadgen {} {} -> {} ({} threads, {} sockets{window}{rate}, expect {})\n",
            self.profile.as_str(),
            self.mode.as_str(),
            self.target,
            self.threads,
            self.sockets,
            self.expect.as_str()
        );
        s += &format!(
            "requests {}  answered {}  timeouts {}  expected-discards {}  unsent {}  retransmissions {}\n",
            self.requests,
            self.answered,
            self.timeouts,
            self.expected_discards,
            self.unsent,
            self.retransmissions
        );
        s += &format!(
            "rate: sent {:.0}/s  answered {:.0}/s over {:.3} s (wall {:.3} s)  loss {:.4}%\n",
            self.sent_rate_rps,
            self.achieved_rate_rps,
            self.send_seconds,
            self.wall_seconds,
            self.loss_ratio * 100.0
        );
        s += &format!(
            "answers: ACK disconnect {} coa {} (201: {})  NAK disconnect {} coa {} {:?}\n",
            a.ack_disconnect,
            a.ack_coa,
            a.ack_residual_201,
            a.nak_disconnect,
            a.nak_coa,
            a.nak_by_error_cause
        );
        s += &format!(
            "         unexpected-codes {}  bad-response-auth {}  bad-message-auth {}  echo ok {} mismatch {}  answered-discards {}  expectation-mismatches {}  late {}  duplicates {}  stray {}  malformed {}\n",
            a.unexpected_codes,
            a.bad_response_authenticators,
            a.bad_message_authenticators,
            a.echo_ok,
            a.echo_mismatches,
            a.answered_discards,
            a.expectation_mismatches,
            a.late,
            a.duplicates,
            a.stray,
            a.malformed
        );
        s += &format!(
            "latency us (all {} requests due, {:.2}% timeouts, timeout {:.0}): p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {:.1})\n",
            l.count,
            l.timeout_share * 100.0,
            l.timeout_us,
            l.show(l.p50_us),
            l.show(l.p90_us),
            l.show(l.p99_us),
            l.show(l.p999_us),
            l.show(l.max_us),
            l.mean_us
        );
        let al = &self.answered_latency;
        s += &format!(
            "answered-only latency us: p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  (n {})\n",
            al.p50_us, al.p90_us, al.p99_us, al.p999_us, al.max_us, al.count
        );
        if let Some(lag) = &self.schedule_lag {
            s += &format!(
                "schedule lag us: p50 {:.1}  p99 {:.1}  max {:.1}\n",
                lag.p50_us, lag.p99_us, lag.max_us
            );
        }
        let g = &self.generator;
        s += &format!(
            "generator: {:.0} ns CPU/request, workers {:.0}% busy (busiest {:.0}%), capacity about {:.0}/s, process CPU user {:.3} s system {:.3} s; per request: {:.3} sendmmsg {:.3} recvmmsg {:.3} ppoll\n",
            g.cpu_ns_per_request,
            g.worker_utilisation * 100.0,
            g.busiest_worker_utilisation * 100.0,
            g.capacity_rps,
            g.process_user_s,
            g.process_system_s,
            g.sendmmsg_per_request,
            g.recvmmsg_per_request,
            g.ppoll_per_request
        );
        if let Some(c) = &self.server_cpu {
            s += &format!(
                "server CPU (pid {}, {} threads, user+system of its threads over the {:.3} s measured window; softirq work on other CPUs not included): user {} system {} ticks; machine steal {:.2}%{}\n",
                c.pid,
                c.threads,
                c.window_s,
                c.user_ticks,
                c.system_ticks,
                c.steal_share() * 100.0,
                if c.threads_exited > 0 {
                    format!(
                        "; {} thread(s) exited inside the window (their CPU is missing)",
                        c.threads_exited
                    )
                } else {
                    String::new()
                }
            );
        }
        if self.generator_bound {
            s += &format!(
                "GENERATOR-BOUND: the generator, not the server, was the bottleneck ({}): not a server figure\n",
                self.generator_bound_reasons.join("; ")
            );
        }
        if self.interrupted {
            s += "interrupted: the run was stopped early (Ctrl-C)\n";
        }
        if !self.counts_add_up {
            s += "WARNING: requests != answered + timeouts + expected discards\n";
        }
        if self.nothing_answered() {
            s += "FAILED: nothing was answered\n";
        }
        s
    }

    /// No request was answered although some expected an answer (or none was sent at all):
    /// the process exits non-zero. A run of deliberately bad requests only, all rightly
    /// unanswered, is not a failure.
    pub fn nothing_answered(&self) -> bool {
        let only_expected_discards =
            self.requests > 0 && self.unsent == 0 && self.expected_discards == self.requests;
        self.answered == 0 && !only_expected_discards
    }
}

/// Builds the JSON-friendly answer counts.
pub fn answer_counts(c: &Counters) -> AnswerCounts {
    let mut by_cause = BTreeMap::new();
    for (i, cause) in ErrorCause::ALL.iter().enumerate() {
        let n = c.naks[0][i] + c.naks[1][i];
        if n > 0 {
            by_cause.insert(cause.value().to_string(), n);
        }
    }
    let none = c.naks[0][NAK_SLOTS - 1] + c.naks[1][NAK_SLOTS - 1];
    if none > 0 {
        by_cause.insert("none".into(), none);
    }
    AnswerCounts {
        ack_disconnect: c.acks[0],
        ack_coa: c.acks[1],
        ack_residual_201: c.acks_residual,
        nak_disconnect: c.naks[0].iter().sum(),
        nak_coa: c.naks[1].iter().sum(),
        nak_by_error_cause: by_cause,
        unexpected_codes: c.unexpected_codes,
        bad_response_authenticators: c.bad_response_authenticators,
        bad_message_authenticators: c.bad_message_authenticators,
        echo_ok: c.echo_ok,
        echo_mismatches: c.echo_mismatches,
        answered_discards: c.answered_discards,
        expectation_mismatches: c.expectation_mismatches,
        late: c.late_answers,
        duplicates: c.duplicate_answers,
        stray: c.stray_answers,
        malformed: c.malformed_answers,
    }
}

/// Writes `h` (nanoseconds) in HdrHistogram's classic percentile-distribution format, values
/// in milliseconds, 5 ticks per half distance (what `HistogramLogProcessor` and the online
/// plotter read).
pub fn write_hgrm<W: Write>(h: &Histogram<u64>, mut out: W) -> std::io::Result<()> {
    const SCALE: f64 = 1e6;
    writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    )?;
    let mut total = 0u64;
    if !h.is_empty() {
        for v in h.iter_quantiles(5) {
            total += v.count_since_last_iteration();
            let q = v.quantile_iterated_to();
            let value = v.value_iterated_to() as f64 / SCALE;
            if q < 1.0 {
                writeln!(
                    out,
                    "{value:>12.3} {q:>2.12} {total:>10} {:>14.2}",
                    1.0 / (1.0 - q)
                )?;
            } else {
                writeln!(out, "{value:>12.3} {q:>2.12} {total:>10}")?;
            }
        }
    }
    let (mean, stdev, max) = if h.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        (h.mean() / SCALE, h.stdev() / SCALE, h.max() as f64 / SCALE)
    };
    let sub_buckets = 1u64 << (2.0 * 10f64.powi(i32::from(h.sigfig()))).log2().ceil() as u32;
    writeln!(
        out,
        "#[Mean    = {mean:>12.3}, StdDeviation   = {stdev:>12.3}]"
    )?;
    writeln!(
        out,
        "#[Max     = {max:>12.3}, Total count    = {:>12}]",
        h.len()
    )?;
    writeln!(
        out,
        "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        h.buckets(),
        sub_buckets
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hgrm_has_header_rows_and_footer() {
        let mut h = new_histogram();
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap();
        }
        let mut out = Vec::new();
        write_hgrm(&h, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)\n\n"));
        let last_row = text
            .lines()
            .rfind(|l| !l.starts_with('#') && !l.trim().is_empty())
            .unwrap();
        let cols: Vec<&str> = last_row.split_whitespace().collect();
        assert_eq!(cols[1], "1.000000000000");
        assert_eq!(cols[2], "1000");
        assert!(
            (cols[0].parse::<f64>().unwrap() - 1.0).abs() < 0.01,
            "{last_row}"
        );
        assert!(text.contains("#[Max     =        1.000, Total count    =         1000]"));
        assert!(text.contains("SubBuckets     =         2048]"));
    }

    #[test]
    fn the_generator_is_the_bottleneck_when_busy_or_short_of_its_rate() {
        let open = LoopMode::OpenLoop;
        let check = |busiest, mode, requests, unsent, waits| {
            generator_bound_reasons(busiest, mode, Some(1000.0), 900.0, requests, unsent, waits)
        };
        assert!(check(0.5, open, 1000, 0, 0).is_empty());
        assert!(
            check(0.95, open, 1000, 10, 0).is_empty(),
            "at the thresholds"
        );
        let busy = check(0.99, LoopMode::ClosedLoop, 1000, 0, 0);
        assert_eq!(busy.len(), 1);
        assert!(busy[0].contains("99% busy"), "{busy:?}");
        let short = check(0.5, open, 1000, 50, 0);
        assert_eq!(short.len(), 1);
        assert!(short[0].contains("50 of 1050"), "{short:?}");
        // Unsent because --max-outstanding held requests back: the server's doing.
        assert!(check(0.5, open, 1000, 50, 7).is_empty());
        // Closed loop has no schedule to fall behind.
        assert!(check(0.5, LoopMode::ClosedLoop, 1000, 50, 0).is_empty());
        assert_eq!(check(0.99, open, 1000, 500, 0).len(), 2);
    }

    #[test]
    fn counts_merge_and_total() {
        let mut a = Counters {
            requests: 3,
            timeouts: 1,
            ..Counters::default()
        };
        a.acks[0] = 1;
        a.naks[1][ErrorCause::SessionContextNotFound.index()] = 1;
        let mut b = Counters::default();
        b.add(&a);
        b.add(&a);
        assert_eq!(b.requests, 6);
        assert_eq!(b.answered(), 4);
        assert_eq!(b.naks_with(ErrorCause::SessionContextNotFound), 2);
        let j = answer_counts(&b);
        assert_eq!(j.nak_by_error_cause.get("503"), Some(&2));
    }
}
