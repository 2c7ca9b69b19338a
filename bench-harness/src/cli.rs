//! The command line (clap derive): `bench-harness [OPTIONS]` runs the suite,
//! `bench-harness report RESULTS.json` redraws a report from raw results, and
//! `bench-harness compare A.json B.json` compares two runs of the same machine, and
//! `bench-harness gen-check` checks loadgen against the independent generator.
//! Owns: flag names, defaults, and turning `--quick` plus flags into a [`Plan`].
//! Must not touch: running anything.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use dynauth_udp::cpu::CpuList;

/// Side-by-side benchmarks: the echo ceiling, dynauthd (each I/O backend, shard count and
/// batch size) and FreeRADIUS as a DAS, driven by loadgen on 127.0.0.1; a Markdown report
/// with ratios measured in the same run, SVG charts and the raw JSON.
#[derive(Debug, Parser)]
#[command(
    name = "bench-harness",
    version,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Rebuild the Markdown report and charts from a raw results JSON file.
    Report {
        /// The raw results (the `.json` written beside a report).
        results: PathBuf,
        /// Where to write the report (charts go beside it).
        #[arg(long, default_value = "docs/BENCHMARKS-harness.md")]
        report: PathBuf,
    },
    /// Draw the time series of one loadgen run (its `--json` report, e.g. a mass-disconnect
    /// storm) as SVG: rates and timeouts per second, p50/p99 per 100 ms bucket.
    Series {
        /// loadgen's `--json` report.
        loadgen_json: PathBuf,
        /// The SVG to write.
        #[arg(long)]
        out: PathBuf,
        /// The chart's title (default: the run's profile, mode and target).
        #[arg(long)]
        title: Option<String>,
    },
    /// Is loadgen the weak link? Against one echo server, back to back: the independent
    /// generator `mmsg-gen` (bare and signing), then loadgen with one thread, same window,
    /// duration and datagram size, each pinned to the generator CPU; rounds alternate. Prints
    /// every rate and the ratios loadgen / independent (docs/LOADGEN.md, "Generator check").
    GenCheck(GenCheckArgs),
    /// Compare two results files; refuses files from different machines.
    Compare {
        /// The earlier run.
        baseline: PathBuf,
        /// The later run.
        candidate: PathBuf,
    },
}

#[derive(Debug, Clone, Args)]
pub struct GenCheckArgs {
    /// Requests in flight, for every generator.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Sending time of each run, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    pub duration_ms: u64,
    /// Rounds (each runs every generator once; the order alternates).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// The echo server's CPU.
    #[arg(long, default_value_t = 1)]
    pub server_cpu: usize,
    /// The generators' CPU (one at a time).
    #[arg(long, default_value_t = 0)]
    pub generator_cpu: usize,
    /// The shared secret loadgen and `mmsg-gen --secret` sign with (loopback only).
    #[arg(long, default_value = "testing123")]
    pub secret: String,
    /// The loadgen binary (default: next to this binary).
    #[arg(long)]
    pub loadgen: Option<PathBuf>,
    /// The mmsg-gen binary (default: next to this binary).
    #[arg(long)]
    pub mmsg_gen: Option<PathBuf>,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Exit non-zero when loadgen's median is below this fraction of the bare independent
    /// generator's (e.g. 1.0); by default the check only reports.
    #[arg(long)]
    pub min_ratio: Option<f64>,
}

/// A comma-separated list, as one clap value.
#[derive(Debug, Clone, PartialEq)]
pub struct List<T>(pub Vec<T>);

fn parse_list<T: std::str::FromStr>(s: &str) -> Result<List<T>, String> {
    let v = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<T>()
                .map_err(|_| format!("`{p}` is not a valid item"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if v.is_empty() {
        return Err("empty list".into());
    }
    Ok(List(v))
}

fn parse_usizes(s: &str) -> Result<List<usize>, String> {
    parse_list(s)
}
fn parse_f64s(s: &str) -> Result<List<f64>, String> {
    let l: List<f64> = parse_list(s)?;
    if l.0.iter().any(|f| !f.is_finite() || *f <= 0.0) {
        return Err("fractions must be positive numbers such as 0.5".into());
    }
    Ok(l)
}
fn parse_strings(s: &str) -> Result<List<String>, String> {
    parse_list(s)
}

/// A CPU list: "0", "0,2", "1-3" (parsed as `dynauthd --cpus` parses it).
pub fn parse_cpus(s: &str) -> Result<List<usize>, String> {
    s.parse::<CpuList>().map(|cpus| List(cpus.0))
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// A first look in under two minutes: short runs, 1 repetition, 4 sweep points, one
    /// batch size, shard counts 1 and the most (flags given explicitly still win).
    #[arg(long)]
    pub quick: bool,
    /// The Markdown report; the raw JSON (`.json`) and the SVG charts go beside it.
    #[arg(long, default_value = "docs/BENCHMARKS-harness.md")]
    pub report: PathBuf,
    /// Which targets: echo, dynauthd, freeradius.
    #[arg(long, value_parser = parse_strings, default_value = "echo,dynauthd,freeradius")]
    pub targets: List<String>,
    /// CPUs for the server under test (default: the upper half of the CPUs; CPU 1 of 2).
    #[arg(long, value_parser = parse_cpus)]
    pub server_cpus: Option<List<usize>>,
    /// CPUs for loadgen, one worker thread each (default: the lower half; CPU 0 of 2).
    #[arg(long, value_parser = parse_cpus)]
    pub loadgen_cpus: Option<List<usize>>,
    /// dynauthd I/O backends (uring is skipped when dynauthd reports it unavailable).
    #[arg(long, value_parser = parse_strings, default_value = "mmsg,uring")]
    pub io: List<String>,
    /// dynauthd shard counts (default: 1 to the number of server CPUs).
    #[arg(long, value_parser = parse_usizes)]
    pub shards: Option<List<usize>>,
    /// dynauthd batch sizes, measured at the most shards (default 16,64,256; quick: 64).
    /// The first of 64 or the list's first is the one swept and used for the shard counts.
    #[arg(long, value_parser = parse_usizes)]
    pub batches: Option<List<usize>>,
    /// Sending time of each loadgen run, in milliseconds (default 5000; quick 1500).
    #[arg(long)]
    pub duration_ms: Option<u64>,
    /// Repetitions of every measurement (default 3; quick 1).
    #[arg(long)]
    pub repetitions: Option<usize>,
    /// Open-loop sweep points as fractions of the closed-loop maximum
    /// (default 0.1,0.25,0.5,0.75,0.9,1.0,1.1,1.2; quick 0.1,0.5,1.0,1.2).
    #[arg(long, value_parser = parse_f64s)]
    pub points: Option<List<f64>>,
    /// Sweep every dynauthd variant, not only each backend's main one.
    #[arg(long)]
    pub sweep_all: bool,
    /// Closed loop: requests outstanding (in all).
    #[arg(long, default_value_t = 128)]
    pub window: usize,
    /// Known sessions loaded into every server (default 100000; quick 10000).
    #[arg(long)]
    pub sessions: Option<usize>,
    /// Seed of the synthetic sessions.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// loadgen's request mix (no Disconnects by default, so the session table stays the
    /// same across repetitions; unknown sessions get NAK 503).
    #[arg(long, default_value = "coa=9,unknown=1")]
    pub mix: String,
    /// The shared secret every server and loadgen use.
    #[arg(long, default_value = "bench-harness-secret")]
    pub secret: String,
    /// loadgen's per-request timeout in milliseconds (also its longest drain; default 1000,
    /// quick 500).
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// The loadgen binary (default: next to this binary).
    #[arg(long)]
    pub loadgen: Option<PathBuf>,
    /// The dynauthd binary (default: next to this binary).
    #[arg(long)]
    pub dynauthd: Option<PathBuf>,
    /// The FreeRADIUS binary (default: `freeradius` or `radiusd` on PATH).
    #[arg(long)]
    pub freeradius: Option<PathBuf>,
    /// A line for the report's header (repeatable), e.g. which branch dynauthd was built from.
    #[arg(long)]
    pub note: Vec<String>,
    /// SLO capacity search for every primary target: the highest offered rate at which p99
    /// (timeouts included) stays under this many milliseconds with loss under --slo-loss
    /// (loadgen --capacity). Default 10 (quick: no search unless given); 0 skips it.
    #[arg(long)]
    pub slo_p99_ms: Option<u64>,
    /// The capacity search's loss bound, as a fraction (default 0.001 = 0.1%).
    #[arg(long, default_value_t = 0.001)]
    pub slo_loss: f64,
    /// loadgen's source sockets (ports) per worker thread (default: loadgen's, 16 per thread
    /// and at least 128 in all). Each
    /// shard gets the share of them that SO_REUSEPORT hashes to it, so many shards need many:
    /// see docs/BENCHMARKS.md, "Shard scaling at 16 cores".
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub source_ports: Option<u64>,
}

/// The resolved plan: every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub quick: bool,
    pub targets: Vec<String>,
    pub server_cpus: Vec<usize>,
    pub loadgen_cpus: Vec<usize>,
    pub io: Vec<String>,
    pub shards: Vec<usize>,
    pub batches: Vec<usize>,
    /// The batch size used for the shard counts and swept.
    pub main_batch: usize,
    pub duration_ms: u64,
    pub repetitions: usize,
    pub fractions: Vec<f64>,
    pub sweep_all: bool,
    pub window: usize,
    pub sessions: usize,
    pub seed: u64,
    pub mix: String,
    pub secret: String,
    pub timeout_ms: u64,
    pub notes: Vec<String>,
    /// The SLO capacity search's p99 bound (ms); `None`: no search.
    pub slo_p99_ms: Option<u64>,
    pub slo_loss: f64,
    pub source_ports: Option<usize>,
}

/// Default CPU split: the lower half for loadgen, the upper half for the server (one CPU:
/// both share it, which the report warns about).
pub fn default_cpus(cpus: &[usize]) -> (Vec<usize>, Vec<usize>) {
    match cpus.len() {
        0 => (vec![0], vec![0]),
        1 => (cpus.to_vec(), cpus.to_vec()),
        n => {
            let half = n / 2;
            (cpus[..half].to_vec(), cpus[half..].to_vec())
        }
    }
}

impl RunArgs {
    /// Fills in the defaults for this machine's CPUs (`available`).
    pub fn plan(&self, available: &[usize]) -> Result<Plan, String> {
        let q = self.quick;
        let (lg_default, srv_default) = default_cpus(available);
        let server_cpus = self.server_cpus.clone().map_or(srv_default, |l| l.0);
        let loadgen_cpus = self.loadgen_cpus.clone().map_or(lg_default, |l| l.0);
        let shards = match &self.shards {
            Some(l) => l.0.clone(),
            None if q => {
                let mut v = vec![1, server_cpus.len().max(1)];
                v.dedup();
                v
            }
            None => (1..=server_cpus.len().max(1)).collect(),
        };
        if shards.contains(&0) {
            return Err("--shards: a shard count must be at least 1".into());
        }
        let batches = match &self.batches {
            Some(l) => l.0.clone(),
            None if q => vec![64],
            None => vec![16, 64, 256],
        };
        if batches.iter().any(|&b| b == 0 || b > 1024) {
            return Err("--batches: a batch size must be 1 to 1024".into());
        }
        let main_batch = if batches.contains(&64) {
            64
        } else {
            batches[0]
        };
        for t in &self.targets.0 {
            if !["echo", "dynauthd", "freeradius"].contains(&t.as_str()) {
                return Err(format!(
                    "--targets: unknown target `{t}` (echo, dynauthd, freeradius)"
                ));
            }
        }
        for io in &self.io.0 {
            if !["mmsg", "uring"].contains(&io.as_str()) {
                return Err(format!("--io: unknown backend `{io}` (mmsg, uring)"));
            }
        }
        let mut fractions = match &self.points {
            Some(l) => l.0.clone(),
            None if q => vec![0.1, 0.5, 1.0, 1.2],
            None => vec![0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.2],
        };
        fractions.sort_by(f64::total_cmp);
        fractions.dedup();
        let repetitions = self.repetitions.unwrap_or(if q { 1 } else { 3 });
        if repetitions == 0 {
            return Err("--repetitions must be at least 1".into());
        }
        let duration_ms = self.duration_ms.unwrap_or(if q { 1500 } else { 5000 });
        if duration_ms == 0 {
            return Err("--duration-ms must be at least 1".into());
        }
        if self.window == 0 {
            return Err("--window must be at least 1".into());
        }
        Ok(Plan {
            quick: q,
            targets: self.targets.0.clone(),
            server_cpus,
            loadgen_cpus,
            io: self.io.0.clone(),
            shards,
            batches,
            main_batch,
            duration_ms,
            repetitions,
            fractions,
            sweep_all: self.sweep_all,
            window: self.window,
            sessions: self
                .sessions
                .unwrap_or(if q { 10_000 } else { 100_000 })
                .max(1),
            seed: self.seed,
            mix: self.mix.clone(),
            secret: self.secret.clone(),
            timeout_ms: self.timeout_ms.unwrap_or(if q { 500 } else { 1000 }),
            notes: self.note.clone(),
            slo_p99_ms: match self.slo_p99_ms {
                Some(0) => None,
                Some(ms) => Some(ms),
                None if q => None,
                None => Some(10),
            },
            slo_loss: self.slo_loss.clamp(0.0, 1.0),
            source_ports: self.source_ports.map(|n| n as usize),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str], cpus: &[usize]) -> Plan {
        let mut v = vec!["bench-harness"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap().run.plan(cpus).unwrap()
    }

    #[test]
    fn two_cores_put_the_server_on_1_and_loadgen_on_0() {
        let p = plan(&[], &[0, 1]);
        assert_eq!(p.server_cpus, vec![1]);
        assert_eq!(p.loadgen_cpus, vec![0]);
        assert_eq!(p.shards, vec![1]);
        assert_eq!(p.batches, vec![16, 64, 256]);
        assert_eq!(p.main_batch, 64);
        assert_eq!((p.repetitions, p.duration_ms), (3, 5000));
        assert_eq!(p.fractions.len(), 8);
        assert_eq!(default_cpus(&[0, 1, 2, 3]), (vec![0, 1], vec![2, 3]));
    }

    #[test]
    fn quick_is_short_and_explicit_flags_win() {
        let p = plan(&["--quick"], &[0, 1, 2, 3]);
        assert_eq!(p.shards, vec![1, 2]);
        assert_eq!(
            (p.repetitions, p.duration_ms, p.batches.clone()),
            (1, 1500, vec![64])
        );
        assert_eq!(p.fractions, vec![0.1, 0.5, 1.0, 1.2]);
        let p = plan(
            &[
                "--quick",
                "--duration-ms",
                "300",
                "--points",
                "0.5",
                "--server-cpus",
                "2-3",
            ],
            &[0, 1, 2, 3],
        );
        assert_eq!(p.duration_ms, 300);
        assert_eq!(p.fractions, vec![0.5]);
        assert_eq!(p.server_cpus, vec![2, 3]);
    }

    #[test]
    fn bad_values_are_refused() {
        let parse = |a: &[&str]| {
            let mut v = vec!["bench-harness"];
            v.extend_from_slice(a);
            Cli::try_parse_from(v)
                .map_err(|e| e.to_string())
                .and_then(|c| c.run.plan(&[0, 1]))
        };
        assert!(parse(&["--targets", "echo,nginx"]).is_err());
        assert!(parse(&["--io", "epoll"]).is_err());
        assert!(parse(&["--shards", "0"]).is_err());
        assert!(parse(&["--points", "-0.5"]).is_err());
        assert!(parse(&["--server-cpus", "3-1"]).is_err());
        assert!(parse(&["--repetitions", "0"]).is_err());
        assert!(parse(&["compare", "a.json", "b.json"]).is_ok());
    }
}
