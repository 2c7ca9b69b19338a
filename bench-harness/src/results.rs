//! The results model: what one suite run measured, as written to the raw JSON file and read
//! back by `report` and `compare`. Owns: the JSON schema, the per-measurement guard flags
//! (generator behind, generator saturated, loss, busy machine, invalid answers) and the
//! rules that set them. Must not touch: running processes, Markdown, charts.

use dynauth_loadgen::report::LoopMode;
use serde::{Deserialize, Serialize};

use crate::loadgen::RunReport;
use crate::machine::Machine;
use crate::stats::Summary;

/// Bumped whenever a field changes meaning.
pub const SCHEMA_VERSION: u32 = 1;

/// Thresholds behind the guard flags (stored with the results, so a reader knows them).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Guards {
    /// Open loop: schedule lag p99 above this (µs) marks the generator as behind.
    pub lag_p99_us: f64,
    /// Open loop: unsent requests above this share of the requests mark it as behind.
    pub unsent_ratio: f64,
    /// Worker utilisation at or above this marks the generator as (possibly) the limit.
    pub worker_utilisation: f64,
    /// Timeouts over requests above this mark a lossy result.
    pub loss_ratio: f64,
    /// CPU used by other processes during a run (in cores) above this marks it as busy.
    pub other_cpu_cores: f64,
}

impl Default for Guards {
    fn default() -> Self {
        Guards {
            lag_p99_us: 1000.0,
            unsent_ratio: 0.001,
            worker_utilisation: 0.90,
            loss_ratio: 0.001,
            other_cpu_cores: 0.25,
        }
    }
}

/// Why a figure should not be trusted as the server's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Flag {
    /// Open loop: the generator could not send on schedule (lag or unsent requests), so the
    /// offered rate was not really offered.
    GeneratorBehind,
    /// The generator's workers were (nearly) always busy: it may have set the rate.
    GeneratorSaturated,
    /// Requests timed out.
    Loss,
    /// Other processes used CPU during the run.
    Busy,
    /// Answers failed verification (bad authenticators, echo mismatches, counts not adding up).
    InvalidAnswers,
    /// loadgen's own check: the generator was the bottleneck. Not a server figure: left out
    /// of every server throughput, CPU and latency figure.
    GeneratorBound,
}

impl Flag {
    /// The one-letter mark used in tables.
    pub fn mark(self) -> char {
        match self {
            Flag::GeneratorBehind => 'G',
            Flag::GeneratorSaturated => 'S',
            Flag::Loss => 'L',
            Flag::Busy => 'B',
            Flag::InvalidAnswers => 'X',
            Flag::GeneratorBound => 'N',
        }
    }

    pub fn meaning(self) -> &'static str {
        match self {
            Flag::GeneratorBehind => {
                "generator behind its schedule (lag p99 or unsent requests): the offered rate was not fully offered"
            }
            Flag::GeneratorSaturated => {
                "generator workers busy nearly all the time: the generator may have been the limit"
            }
            Flag::Loss => "requests timed out (loss)",
            Flag::Busy => "other processes used CPU during the run: the machine was not quiet",
            Flag::InvalidAnswers => {
                "answers failed verification, or the generator's counts did not add up"
            }
            Flag::GeneratorBound => {
                "not a server figure: loadgen found itself the bottleneck (left out of the server's throughput, CPU and latency figures)"
            }
        }
    }

    pub const ALL: [Flag; 6] = [
        Flag::GeneratorBehind,
        Flag::GeneratorSaturated,
        Flag::Loss,
        Flag::Busy,
        Flag::InvalidAnswers,
        Flag::GeneratorBound,
    ];
}

/// The marks of a set of flags, e.g. "GS"; empty when clean.
pub fn marks(flags: &[Flag]) -> String {
    let mut f = flags.to_vec();
    f.sort();
    f.dedup();
    f.into_iter().map(Flag::mark).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    ClosedLoop,
    OpenLoop,
}

/// Latency percentiles in microseconds (open loop: from the intended send time).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// One loadgen run against one server, with the server's CPU over the same window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    pub mode: Mode,
    pub offered_rps: Option<f64>,
    pub achieved_rps: f64,
    pub requests: u64,
    pub answered: u64,
    pub timeouts: u64,
    pub unsent: u64,
    pub loss_ratio: f64,
    /// Authenticated ACKs (Disconnect and CoA; echoes for the echo ceiling).
    #[serde(default)]
    pub acks: u64,
    /// Authenticated NAKs.
    #[serde(default)]
    pub naks: u64,
    pub latency: Latency,
    pub schedule_lag_p99_us: Option<f64>,
    pub generator_worker_utilisation: f64,
    pub generator_cpu_ns_per_request: f64,
    /// Server CPU over loadgen's measured window (its first send to the end of sending; not
    /// loadgen's start-up, not the drain): user + system ticks of each of the server's threads
    /// (`/proc/<pid>/task/*/stat`), summed. Softirq work for its packets that runs on other
    /// CPUs is not in it.
    pub server_cpu_s: f64,
    /// `server_cpu_s` over answered requests, in nanoseconds (`None`: no answers, or the
    /// server's CPU could not be read).
    pub server_cpu_ns_per_answer: Option<f64>,
    /// The measured window `server_cpu_s` is over, in seconds (`None` in results from before
    /// the window was loadgen's).
    #[serde(default)]
    pub server_cpu_window_s: Option<f64>,
    /// The machine's steal time over the same window, as a share of all its CPU time (the
    /// hypervisor ran someone else: CPU figures on a machine with steal are less reliable).
    #[serde(default)]
    pub steal_share: Option<f64>,
    /// CPU used by everything else on the machine during the run, in cores.
    pub other_cpu_cores: f64,
    /// loadgen's own check: the generator, not the server, was the bottleneck.
    #[serde(default)]
    pub generator_bound: bool,
    /// loadgen's estimate of its own capacity on these settings (requests/s).
    #[serde(default)]
    pub generator_capacity_rps: f64,
    /// Answers each dynauthd shard sent during the run (its metrics; empty for other
    /// servers): how SO_REUSEPORT spread loadgen's source ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shard_answers: Vec<u64>,
    pub flags: Vec<Flag>,
}

impl Measurement {
    /// Builds a measurement from the generator's report (with the server's CPU over its
    /// measured window, in clock ticks: `clk_tck` per second) and the other processes' CPU
    /// over the run, and sets the guard flags.
    pub fn from_report(
        r: &RunReport,
        clk_tck: f64,
        other_cpu_cores: f64,
        guards: &Guards,
    ) -> Measurement {
        let cpu = r.server_cpu.as_ref();
        let server_cpu_s = cpu.map_or(0.0, |c| {
            (c.user_ticks + c.system_ticks) as f64 / clk_tck.max(1.0)
        });
        let mode = match r.mode {
            LoopMode::OpenLoop => Mode::OpenLoop,
            LoopMode::ClosedLoop => Mode::ClosedLoop,
        };
        let mut m = Measurement {
            mode,
            offered_rps: r.offered_rate_rps,
            achieved_rps: r.achieved_rate_rps,
            requests: r.requests,
            answered: r.answered,
            timeouts: r.timeouts,
            unsent: r.unsent,
            loss_ratio: r.loss_ratio,
            acks: r.answers.ack_coa + r.answers.ack_disconnect + r.answers.echo_ok,
            naks: r.answers.nak_coa + r.answers.nak_disconnect,
            latency: Latency {
                p50_us: r.latency.p50_us,
                p90_us: r.latency.p90_us,
                p99_us: r.latency.p99_us,
                p999_us: r.latency.p999_us,
                max_us: r.latency.max_us,
            },
            schedule_lag_p99_us: r.schedule_lag.as_ref().map(|l| l.p99_us),
            generator_worker_utilisation: r.generator.worker_utilisation,
            generator_cpu_ns_per_request: r.generator.cpu_ns_per_request,
            server_cpu_s,
            server_cpu_ns_per_answer: (r.answered > 0 && cpu.is_some())
                .then(|| server_cpu_s * 1e9 / r.answered as f64),
            server_cpu_window_s: cpu.map(|c| c.window_s),
            steal_share: cpu.map(|c| c.steal_share()),
            other_cpu_cores,
            generator_bound: r.generator_bound,
            generator_capacity_rps: r.generator.capacity_rps,
            shard_answers: Vec::new(),
            flags: Vec::new(),
        };
        m.flags = flags_for(&m, r.answers.invalid() > 0 || !r.counts_add_up, guards);
        m
    }
}

impl Measurement {
    /// The latency figures mean something: at least one authenticated answer was timed (a
    /// run whose every answer failed verification has all-zero percentiles), and they are
    /// the server's (the generator was not the bottleneck).
    pub fn has_latency(&self) -> bool {
        self.acks + self.naks > 0 && !self.generator_bound
    }

    /// The throughput is the server's: `Some(achieved)` unless the generator was the
    /// bottleneck.
    pub fn server_rps(&self) -> Option<f64> {
        (!self.generator_bound).then_some(self.achieved_rps)
    }

    /// A latency percentile, when [`has_latency`](Self::has_latency).
    pub fn latency_of(&self, f: impl Fn(&Latency) -> f64) -> Option<f64> {
        self.has_latency().then(|| f(&self.latency))
    }
}

/// The guard flags of one measurement.
pub fn flags_for(m: &Measurement, invalid_answers: bool, g: &Guards) -> Vec<Flag> {
    let mut flags = Vec::new();
    if m.mode == Mode::OpenLoop {
        let lag = m.schedule_lag_p99_us.unwrap_or(0.0);
        let unsent = m.unsent as f64 / (m.requests + m.unsent).max(1) as f64;
        if lag > g.lag_p99_us || unsent > g.unsent_ratio {
            flags.push(Flag::GeneratorBehind);
        }
    }
    if m.generator_worker_utilisation >= g.worker_utilisation {
        flags.push(Flag::GeneratorSaturated);
    }
    if m.loss_ratio > g.loss_ratio {
        flags.push(Flag::Loss);
    }
    if m.other_cpu_cores > g.other_cpu_cores {
        flags.push(Flag::Busy);
    }
    if invalid_answers {
        flags.push(Flag::InvalidAnswers);
    }
    if m.generator_bound {
        flags.push(Flag::GeneratorBound);
    }
    flags
}

/// One point of the open-loop sweep: a fraction of the maximum, repeated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepPoint {
    pub fraction: f64,
    pub offered_rps: f64,
    pub runs: Vec<Measurement>,
}

impl SweepPoint {
    /// p99 over the runs that timed any answer.
    pub fn p99(&self) -> Option<Summary> {
        Summary::of_by(&self.runs, |m| m.latency_of(|l| l.p99_us))
    }
    /// Answers per second over the runs that are server figures.
    pub fn achieved(&self) -> Option<Summary> {
        Summary::of_by(&self.runs, Measurement::server_rps)
    }
    pub fn flags(&self) -> Vec<Flag> {
        self.runs.iter().flat_map(|m| m.flags.clone()).collect()
    }
}

/// A latency percentile: `percentile` in 0..100, latency in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DistPoint {
    pub percentile: f64,
    pub latency_us: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// The plain UDP echo server: the ceiling.
    Echo,
    Dynauthd,
    Freeradius,
}

/// Everything measured for one server configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetResult {
    /// Unique in a run: `echo`, `dynauthd-mmsg-s1-b64`, `freeradius`.
    pub id: String,
    pub kind: TargetKind,
    pub io: Option<String>,
    pub shards: Option<usize>,
    pub batch: Option<usize>,
    /// Swept (open loop) and drawn as a line in the latency charts.
    pub primary: bool,
    /// Why it was not measured (binary absent, io_uring unavailable, start failure).
    pub skipped: Option<String>,
    /// CPU busy on the machine just before the server started, in cores.
    pub busy_before_cores: f64,
    pub closed: Vec<Measurement>,
    pub sweep: Vec<SweepPoint>,
    /// Latency percentile distribution at half of the maximum (the sweep's 0.5 point, first
    /// repetition).
    pub half_load_distribution: Vec<DistPoint>,
    pub notes: Vec<String>,
    /// The SLO capacity search (loadgen --capacity), when the plan asked for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Capacity>,
}

/// The answer of one SLO capacity search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    pub slo_p99_ms: u64,
    pub slo_loss: f64,
    /// The highest offered rate that met the SLO; `None`: none did.
    pub capacity_rps: Option<f64>,
    /// How the search ended, in loadgen's words (`found`, `at-maximum`, `generator-bound`...).
    pub outcome: String,
    pub first_failing_rps: Option<f64>,
    pub steps: usize,
}

impl TargetResult {
    pub fn new(id: impl Into<String>, kind: TargetKind) -> TargetResult {
        TargetResult {
            id: id.into(),
            kind,
            io: None,
            shards: None,
            batch: None,
            primary: false,
            skipped: None,
            busy_before_cores: 0.0,
            closed: Vec::new(),
            sweep: Vec::new(),
            half_load_distribution: Vec::new(),
            notes: Vec::new(),
            capacity: None,
        }
    }

    /// Human label: "echo ceiling", "dynauthd mmsg, 1 shard, batch 64", "FreeRADIUS".
    pub fn label(&self) -> String {
        match self.kind {
            TargetKind::Echo => "echo ceiling".into(),
            TargetKind::Freeradius => "FreeRADIUS".into(),
            TargetKind::Dynauthd => {
                let shards = self.shards.unwrap_or(1);
                format!(
                    "dynauthd {}, {} shard{}, batch {}",
                    self.io.as_deref().unwrap_or("?"),
                    shards,
                    if shards == 1 { "" } else { "s" },
                    self.batch.unwrap_or(0)
                )
            }
        }
    }

    /// Short label for chart legends: "echo", "dynauthd mmsg", "FreeRADIUS".
    pub fn series_name(&self) -> String {
        match self.kind {
            TargetKind::Echo => "echo ceiling".into(),
            TargetKind::Freeradius => "FreeRADIUS".into(),
            TargetKind::Dynauthd => format!(
                "dynauthd {} s{} b{}",
                self.io.as_deref().unwrap_or("?"),
                self.shards.unwrap_or(1),
                self.batch.unwrap_or(0)
            ),
        }
    }

    /// The closed-loop maximum over the runs that are server figures (the generator was
    /// not the bottleneck).
    pub fn max_rps(&self) -> Option<Summary> {
        Summary::of_by(&self.closed, Measurement::server_rps)
    }
    /// The closed-loop throughput of the generator-bound runs: a lower bound of the
    /// server's, and the generator's own figure.
    pub fn generator_bound_rps(&self) -> Option<Summary> {
        Summary::of_by(&self.closed, |m| {
            m.generator_bound.then_some(m.achieved_rps)
        })
    }
    /// loadgen's estimate of its own capacity over the closed-loop runs.
    pub fn generator_capacity(&self) -> Option<Summary> {
        Summary::of_by(&self.closed, |m| {
            (m.generator_capacity_rps > 0.0).then_some(m.generator_capacity_rps)
        })
    }
    pub fn cpu_ns_per_answer(&self) -> Option<Summary> {
        Summary::of_by(&self.closed, |m| {
            m.server_cpu_ns_per_answer.filter(|_| !m.generator_bound)
        })
    }
    /// The machine's steal share over the same closed-loop runs as
    /// [`cpu_ns_per_answer`](Self::cpu_ns_per_answer).
    pub fn steal_share(&self) -> Option<Summary> {
        Summary::of_by(&self.closed, |m| {
            m.steal_share
                .filter(|_| !m.generator_bound && m.server_cpu_ns_per_answer.is_some())
        })
    }
    /// ACKs over answers in the closed-loop runs (the default mix expects about 90%).
    pub fn ack_share(&self) -> Option<f64> {
        let acks: u64 = self.closed.iter().map(|m| m.acks).sum();
        let answered: u64 = self.closed.iter().map(|m| m.answered).sum();
        (answered > 0).then(|| acks as f64 / answered as f64)
    }
    pub fn closed_flags(&self) -> Vec<Flag> {
        self.closed.iter().flat_map(|m| m.flags.clone()).collect()
    }
}

/// What the suite was asked to do (so the report can say it, and a rerun can repeat it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub quick: bool,
    pub duration_ms: u64,
    pub repetitions: usize,
    pub fractions: Vec<f64>,
    pub window: usize,
    pub sessions: usize,
    pub seed: u64,
    pub mix: String,
    pub server_cpus: Vec<usize>,
    pub loadgen_cpus: Vec<usize>,
    pub loadgen_threads: usize,
    pub pinned_with_taskset: bool,
    pub guards: Guards,
    /// The programs run: name to "path (version)".
    #[serde(default)]
    pub programs: std::collections::BTreeMap<String, String>,
    /// The user's `--note` lines.
    #[serde(default)]
    pub notes: Vec<String>,
    /// loadgen's `--source-ports` (source sockets per worker thread), when given; `None`:
    /// loadgen's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ports: Option<usize>,
}

/// One suite run: the raw JSON file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    pub schema_version: u32,
    pub machine: Machine,
    pub settings: Settings,
    pub started_utc: String,
    pub finished_utc: String,
    pub targets: Vec<TargetResult>,
    /// Suite-level warnings (busy machine, CPUs shared between server and generator, ...).
    pub warnings: Vec<String>,
}

impl Results {
    pub fn target(&self, id: &str) -> Option<&TargetResult> {
        self.targets.iter().find(|t| t.id == id)
    }
    /// The first measured target of a kind.
    pub fn first_of(&self, kind: TargetKind) -> Option<&TargetResult> {
        self.targets
            .iter()
            .find(|t| t.kind == kind && t.skipped.is_none() && !t.closed.is_empty())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A clean closed-loop measurement at `rps`, with `cpu_ns` of server CPU per answer.
    pub fn closed(rps: f64, cpu_ns: f64) -> Measurement {
        let answered = (rps * 2.0) as u64;
        Measurement {
            mode: Mode::ClosedLoop,
            offered_rps: None,
            achieved_rps: rps,
            requests: answered,
            answered,
            timeouts: 0,
            unsent: 0,
            loss_ratio: 0.0,
            acks: answered * 9 / 10,
            naks: answered - answered * 9 / 10,
            latency: Latency {
                p50_us: 100.0,
                p90_us: 150.0,
                p99_us: 300.0,
                p999_us: 500.0,
                max_us: 900.0,
            },
            schedule_lag_p99_us: None,
            generator_worker_utilisation: 0.5,
            generator_cpu_ns_per_request: 3000.0,
            server_cpu_s: cpu_ns * answered as f64 / 1e9,
            server_cpu_ns_per_answer: Some(cpu_ns),
            server_cpu_window_s: Some(2.0),
            steal_share: Some(0.0),
            other_cpu_cores: 0.0,
            generator_bound: false,
            generator_capacity_rps: 0.0,
            shard_answers: Vec::new(),
            flags: Vec::new(),
        }
    }

    pub fn open(offered: f64, p99: f64) -> Measurement {
        let mut m = closed(offered, 1000.0);
        m.mode = Mode::OpenLoop;
        m.offered_rps = Some(offered);
        m.latency.p99_us = p99;
        m.schedule_lag_p99_us = Some(10.0);
        m
    }

    /// The CPU per answer is loadgen's window figure in ticks over the answers; steal and
    /// the window come with it; without the figure there is no CPU per answer (not zero).
    #[test]
    fn server_cpu_per_answer_comes_from_loadgens_window() {
        let mut r = crate::loadgen::tests::echo_run(100).run;
        assert!(r.answered > 0);
        let g = Guards::default();
        let m = Measurement::from_report(&r, 100.0, 0.0, &g);
        assert_eq!(m.server_cpu_ns_per_answer, None);
        assert_eq!(m.server_cpu_window_s, None);
        r.server_cpu = Some(dynauth_loadgen::watch::ServerCpu {
            pid: 1,
            window_s: 0.05,
            user_ticks: 3,
            system_ticks: 2,
            threads: 4,
            threads_exited: 0,
            machine_steal_ticks: 1,
            machine_ticks: 20,
        });
        let m = Measurement::from_report(&r, 100.0, 0.0, &g);
        assert!((m.server_cpu_s - 0.05).abs() < 1e-12);
        let per = m.server_cpu_ns_per_answer.unwrap();
        assert!((per - 0.05e9 / r.answered as f64).abs() < 1e-6, "{per}");
        assert_eq!(m.server_cpu_window_s, Some(0.05));
        assert_eq!(m.steal_share, Some(0.05));
    }

    #[test]
    fn clean_runs_have_no_flags() {
        assert!(flags_for(&closed(1000.0, 1.0), false, &Guards::default()).is_empty());
        assert!(flags_for(&open(1000.0, 100.0), false, &Guards::default()).is_empty());
    }

    #[test]
    fn generator_behind_schedule_is_flagged_in_open_loop_only() {
        let g = Guards::default();
        let mut m = open(1000.0, 100.0);
        m.schedule_lag_p99_us = Some(5000.0);
        assert_eq!(flags_for(&m, false, &g), vec![Flag::GeneratorBehind]);
        let mut m = open(1000.0, 100.0);
        m.unsent = 50;
        m.requests = 950;
        assert_eq!(flags_for(&m, false, &g), vec![Flag::GeneratorBehind]);
        let mut m = closed(1000.0, 1.0);
        m.schedule_lag_p99_us = Some(5000.0);
        assert!(flags_for(&m, false, &g).is_empty());
    }

    #[test]
    fn saturation_loss_busy_and_invalid_answers_are_flagged() {
        let g = Guards::default();
        let mut m = closed(1000.0, 1.0);
        m.generator_worker_utilisation = 0.97;
        m.loss_ratio = 0.05;
        m.other_cpu_cores = 0.8;
        assert_eq!(
            flags_for(&m, true, &g),
            vec![
                Flag::GeneratorSaturated,
                Flag::Loss,
                Flag::Busy,
                Flag::InvalidAnswers
            ]
        );
        assert_eq!(
            marks(&[Flag::Busy, Flag::GeneratorSaturated, Flag::Busy]),
            "SB"
        );
    }

    #[test]
    fn runs_without_timed_answers_are_left_out_of_latency_summaries() {
        let mut silent = open(1000.0, 0.0);
        silent.acks = 0;
        silent.naks = 0;
        let p = SweepPoint {
            fraction: 1.2,
            offered_rps: 1000.0,
            runs: vec![open(1000.0, 200.0), silent, open(1000.0, 400.0)],
        };
        let s = p.p99().unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (300.0, 200.0, 400.0, 2));
    }

    #[test]
    fn generator_bound_runs_are_flagged_and_not_server_figures() {
        let g = Guards::default();
        let mut bound = closed(900.0, 5.0);
        bound.generator_bound = true;
        bound.generator_capacity_rps = 950.0;
        assert_eq!(flags_for(&bound, false, &g), vec![Flag::GeneratorBound]);
        assert_eq!(marks(&[Flag::GeneratorBound]), "N");
        assert_eq!(bound.server_rps(), None);
        assert!(!bound.has_latency());
        let mut t = TargetResult::new("x", TargetKind::Dynauthd);
        t.closed = vec![closed(100.0, 10.0), bound.clone(), closed(300.0, 30.0)];
        let max = t.max_rps().unwrap();
        assert_eq!((max.median, max.n), (200.0, 2), "the bound run is left out");
        assert_eq!(t.cpu_ns_per_answer().unwrap().n, 2);
        assert_eq!(t.generator_bound_rps().unwrap().median, 900.0);
        assert_eq!(t.generator_capacity().unwrap().median, 950.0);
        t.closed = vec![bound.clone()];
        assert!(t.max_rps().is_none(), "no server figure at all");
        let p = SweepPoint {
            fraction: 0.5,
            offered_rps: 1000.0,
            runs: vec![bound, open(1000.0, 400.0)],
        };
        assert_eq!(p.p99().unwrap().n, 1);
        assert_eq!(p.achieved().unwrap().n, 1);
    }

    #[test]
    fn target_summaries_use_every_repetition() {
        let mut t = TargetResult::new("x", TargetKind::Echo);
        t.closed = vec![
            closed(100.0, 10.0),
            closed(300.0, 30.0),
            closed(200.0, 20.0),
        ];
        let max = t.max_rps().unwrap();
        assert_eq!((max.median, max.min, max.max), (200.0, 100.0, 300.0));
        assert_eq!(t.cpu_ns_per_answer().unwrap().median, 20.0);
    }
}
