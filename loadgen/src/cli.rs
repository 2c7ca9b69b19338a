//! The command line (clap derive): the load run's flags at the top level, and the
//! `echo-server` subcommand. Parsing only; `plan` turns [`RunArgs`] into a checked run plan.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

/// loadgen: a RADIUS Dynamic Authorization Client (RFC 5176) load generator that measures
/// latency honestly (open loop from the intended send time), verifies every answer, and
/// reports its own cost.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// A plain UDP echo server (recvmmsg/sendmmsg): the ceiling target for `--expect echo`.
    EchoServer(EchoArgs),
    /// Writes synthetic sessions as JSON Lines (the file `dynauthd --sessions` and
    /// `loadgen --sessions` read).
    Sessions(SessionsArgs),
}

/// Flags of the `sessions` subcommand.
#[derive(Debug, Clone, Args)]
pub struct SessionsArgs {
    /// How many sessions (indices 0..N of `synth::session`).
    #[arg(long)]
    pub count: u64,
    /// Seed of the synthetic sessions.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Output file; default: stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Flags of the echo server.
#[derive(Debug, Clone, Args)]
pub struct EchoArgs {
    /// Address to listen on; every thread binds it with SO_REUSEPORT.
    #[arg(long, default_value = "127.0.0.1:3799")]
    pub listen: SocketAddr,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// CPUs to pin the threads to, round robin ("0", "0,2", "1-3").
    #[arg(long, value_parser = parse_cpus)]
    pub cpus: Option<CpuList>,
    /// Stop after this long (seconds unless a unit is given: 500ms, 10s, 2m); default: never.
    #[arg(long, value_parser = parse_seconds)]
    pub duration: Option<Duration>,
    /// Datagrams per recvmmsg/sendmmsg batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Busy-poll (non-blocking recvmmsg in a loop) instead of sleeping in recvmmsg: burns its
    /// CPUs, but senders no longer pay for waking it up.
    #[arg(long)]
    pub spin: bool,
}

/// How to judge answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Expect {
    /// RADIUS answers: Identifier, Response Authenticator, Message-Authenticator, code.
    Radius,
    /// An echo server: an answer identical to the request is a success.
    Echo,
}

/// The traffic shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// A constant mix (see --mix) at --rate or with --window outstanding.
    Churn,
    /// Every session of a group (--group / --group-prefix, or all sessions) disconnected once
    /// by its Acct-Session-Id, as fast as --rate or --window allow.
    MassDisconnect,
}

/// Flags of a load run.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The DAS to load (address:port).
    #[arg(long, default_value = "127.0.0.1:3799")]
    pub target: SocketAddr,
    /// Local address to send from (the DAS must know it as a client); default: unspecified
    /// address of the target's family.
    #[arg(long)]
    pub bind: Option<IpAddr>,
    /// Shared secret (RFC 2865 §3) on the command line (visible to other local users in the
    /// process list: prefer --secret-file or --secret-env). Default: "testing123" when no
    /// secret source is given.
    #[arg(long, group = "secret_source", value_parser = parse_secret_arg)]
    pub secret: Option<SecretArg>,
    /// Read the shared secret from this file (its content, without one trailing newline).
    #[arg(long, group = "secret_source")]
    pub secret_file: Option<PathBuf>,
    /// Read the shared secret from this environment variable.
    #[arg(long, group = "secret_source")]
    pub secret_env: Option<String>,

    /// Sessions to target, from a JSON Lines file of `dynauth_proto::session::Session`.
    #[arg(long, conflicts_with = "synthetic")]
    pub sessions: Option<PathBuf>,
    /// Sessions to target: the first N synthetic sessions of --seed (as `dynauthd` loads).
    #[arg(long)]
    pub synthetic: Option<u64>,
    /// Seed of the synthetic sessions (and of the request mix).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Traffic shape.
    #[arg(long, value_enum, default_value_t = Profile::Churn)]
    pub profile: Profile,
    /// Request mix as weights: disconnect=W,coa=W,unknown=W,bad-auth=W. disconnect and coa
    /// target existing sessions (ACK expected), unknown a session that does not exist (NAK
    /// 503 expected), bad-auth a CoA with a wrong Request Authenticator (no answer expected).
    #[arg(long, default_value = "disconnect=10,coa=80,unknown=10,bad-auth=0", value_parser = parse_mix)]
    pub mix: Mix,
    /// Mass disconnect: only the 256 sessions of synthetic group G (NAS-Port-Id prefix
    /// `synth::nas_port_group(G)`, e.g. "ge-0/1/").
    #[arg(long, conflicts_with = "group_prefix")]
    pub group: Option<u64>,
    /// Mass disconnect: only sessions whose NAS-Port-Id starts with this prefix.
    #[arg(long)]
    pub group_prefix: Option<String>,
    /// Which sessions churn requests target: `in-order` (0, 1, 2, ...: only the first
    /// --pool sessions of a large table), `uniform` (over every session, seeded) or `zipf:S`
    /// (over every session, a few hot ones; S > 0, not 1, e.g. zipf:0.9).
    #[arg(long, default_value = "in-order", value_parser = crate::pool::TargetSelection::parse)]
    pub targets: crate::pool::TargetSelection,
    /// Session-Timeout value a CoA sets (seconds).
    #[arg(long, default_value_t = 3600)]
    pub session_timeout: u32,
    /// Add a Message-Authenticator (first attribute) to every request.
    #[arg(long)]
    pub message_authenticator: bool,
    /// Add an Event-Timestamp (the send time) to every request.
    #[arg(long)]
    pub event_timestamp: bool,
    /// Distinct requests prepared ahead of time (cycled); default: one per session, at least
    /// 4096, at most 1,048,576.
    #[arg(long)]
    pub pool: Option<usize>,

    /// Open loop: offered rate in requests per second (latency from the intended send time).
    #[arg(long, conflicts_with = "window")]
    pub rate: Option<f64>,
    /// Open loop: at most this many requests outstanding (split over the threads), like a DAC
    /// with a bounded pending queue; a request due while the limit is reached leaves late (and
    /// its latency still counts from its intended time). Default: the Identifiers available.
    #[arg(long, requires = "rate")]
    pub max_outstanding: Option<usize>,
    /// Closed loop: requests kept outstanding (default 64 when --rate is absent).
    #[arg(long)]
    pub window: Option<usize>,
    /// Stop sending after this long (seconds unless a unit is given: 500ms, 10s, 2m).
    /// Default 10s, unless --requests is given or the profile is mass-disconnect; in a
    /// capacity search, the length of each step (default 2s).
    #[arg(long, value_parser = parse_seconds)]
    pub duration: Option<Duration>,
    /// Stop after this many requests (retransmissions not counted).
    #[arg(long)]
    pub requests: Option<u64>,
    /// A request with no answer this long after its first transmission is a timeout; also the
    /// longest final drain (milliseconds unless a unit is given).
    #[arg(long, default_value = "1000", value_parser = parse_millis)]
    pub timeout: Duration,
    /// Retransmit an unanswered request (same packet, same Identifier) after this long
    /// (milliseconds unless a unit is given); off by default.
    #[arg(long, value_parser = parse_millis)]
    pub retransmit_after: Option<Duration>,
    /// Retransmissions per request when --retransmit-after is set.
    #[arg(long, default_value_t = 2)]
    pub retries: u8,

    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// CPUs to pin worker threads to, round robin ("0", "0,2", "1-3").
    #[arg(long, value_parser = parse_cpus)]
    pub cpus: Option<CpuList>,
    /// Source sockets in all (256 Identifiers each), spread over the threads. Default:
    /// --source-ports per thread, or more when the window needs more Identifiers.
    #[arg(long, conflicts_with = "source_ports")]
    pub sockets: Option<usize>,
    /// Source sockets (ports) per thread, so that a server's SO_REUSEPORT shards all get
    /// traffic; raised when the window needs more Identifiers. Default: 16 per thread and at
    /// least 128 in all. The kernel picks a shard by hashing the 4-tuple, so each port lands
    /// on a shard at random: 128 ports reach every one of 16 shards with probability 99.6%
    /// (64: 77%; 16: almost never), and the busiest shard then gets about 1.6x the mean
    /// share (64 ports: 2x).
    #[arg(long)]
    pub source_ports: Option<usize>,
    /// Datagrams per sendmmsg/recvmmsg batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// SO_SNDBUF and SO_RCVBUF of each socket, in octets.
    #[arg(long, default_value_t = 4 << 20)]
    pub socket_buffer: usize,

    /// SLO capacity search: instead of one run, open-loop steps (bisection over the offered
    /// rate) find the highest rate at which p99 (timeouts included) stays under --slo-p99
    /// and loss under --slo-loss. Implied by --slo-p99 or --slo-loss. Each step lasts
    /// --duration (default 2s); prints every step and the answer; exits non-zero when no
    /// rate passed.
    #[arg(long)]
    pub capacity: bool,
    /// Capacity search: the p99 latency target (over every request due, timeouts
    /// included; milliseconds unless a unit is given). Default 10ms.
    #[arg(long, value_parser = parse_millis)]
    pub slo_p99: Option<Duration>,
    /// Capacity search: the share of requests due that may go unanswered (timeouts and
    /// unsent), as a percentage ("0.1%") or a fraction ("0.001"); a step passes below it
    /// (or with no loss at all). Default 0.1%.
    #[arg(long, value_parser = parse_ratio)]
    pub slo_loss: Option<f64>,
    /// Capacity search: the first (lowest) offered rate, requests per second.
    #[arg(long, default_value_t = 1000.0)]
    pub capacity_min: f64,
    /// Capacity search: the highest offered rate tried; passing it ends the search.
    #[arg(long, default_value_t = 1_000_000.0)]
    pub capacity_max: f64,
    /// Capacity search: stop bisecting when the failing rate is within this much above the
    /// passing one (percentage or fraction).
    #[arg(long, default_value = "5%", value_parser = parse_ratio)]
    pub capacity_precision: f64,
    /// Capacity search: at most this many steps (1 to 64), so the search lasts at most
    /// steps x (--duration + --timeout).
    #[arg(long, default_value_t = 16)]
    pub capacity_steps: usize,

    /// How to judge answers.
    #[arg(long, value_enum, default_value_t = Expect::Radius)]
    pub expect: Expect,
    /// Print the report as JSON on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    /// Write the latency histogram as an HdrHistogram percentile distribution (.hgrm,
    /// values in milliseconds).
    #[arg(long)]
    pub histogram_file: Option<PathBuf>,
    /// No live progress line (it is shown only when stderr is a terminal anyway).
    #[arg(long)]
    pub quiet: bool,
    /// Measure the CPU of the server under test, process PID on this machine: the user +
    /// system ticks of each of its threads (`/proc/PID/task/*/stat`) and the machine's steal
    /// time (`/proc/stat`), sampled when the workers start sending and when the last one
    /// stops, so loadgen's start-up and the final drain are outside the window. Reported as
    /// `server_cpu` (JSON) and a `server CPU` line (text).
    #[arg(long)]
    pub server_pid: Option<u32>,
}

impl RunArgs {
    /// A capacity search rather than one run (--capacity, --slo-p99 or --slo-loss).
    pub fn capacity_search(&self) -> bool {
        self.capacity || self.slo_p99.is_some() || self.slo_loss.is_some()
    }

    /// Parses the run flags alone (for tests and embedding): `args` without the program name.
    pub fn from_args<I, S>(args: I) -> Result<RunArgs, clap::Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString> + Clone,
    {
        let argv = std::iter::once(std::ffi::OsString::from("loadgen"))
            .chain(args.into_iter().map(Into::into));
        let cli = Cli::try_parse_from(argv)?;
        Ok(cli.run)
    }
}

impl Expect {
    /// The name on the command line and in the JSON report.
    pub fn as_str(self) -> &'static str {
        match self {
            Expect::Radius => "radius",
            Expect::Echo => "echo",
        }
    }
}

impl Profile {
    /// The name on the command line and in the JSON report.
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Churn => "churn",
            Profile::MassDisconnect => "mass-disconnect",
        }
    }
}

/// Weights of the request mix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mix {
    pub disconnect: u32,
    pub coa: u32,
    pub unknown: u32,
    pub bad_auth: u32,
}

impl Mix {
    pub fn total(&self) -> u64 {
        u64::from(self.disconnect)
            + u64::from(self.coa)
            + u64::from(self.unknown)
            + u64::from(self.bad_auth)
    }
}

fn parse_mix(s: &str) -> Result<Mix, String> {
    let mut mix = Mix {
        disconnect: 0,
        coa: 0,
        unknown: 0,
        bad_auth: 0,
    };
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, weight) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}`: expected NAME=WEIGHT"))?;
        let weight: u32 = weight
            .trim()
            .parse()
            .map_err(|_| format!("`{part}`: weight is not a whole number"))?;
        match name.trim() {
            "disconnect" => mix.disconnect = weight,
            "coa" => mix.coa = weight,
            "unknown" => mix.unknown = weight,
            "bad-auth" => mix.bad_auth = weight,
            other => {
                return Err(format!(
                    "unknown mix entry `{other}` (disconnect, coa, unknown, bad-auth)"
                ));
            }
        }
    }
    if mix.total() == 0 {
        return Err("the mix has no weight".into());
    }
    Ok(mix)
}

/// A duration: a bare number in `bare_unit_ns` (the flag's historical unit), or one or more
/// `NUMBER UNIT` terms (`500ms`, `10s`, `2m`, `1m30s`, `1.5s`; units ns, us, µs, ms, s, m,
/// min, h).
fn parse_duration_with(s: &str, bare_unit_ns: f64) -> Result<Duration, String> {
    let text = s.trim();
    let not_a_duration = || format!("`{text}`: not a duration (e.g. 500ms, 10s, 2m)");
    if text.is_empty() {
        return Err(not_a_duration());
    }
    let mut rest = text;
    let mut ns = 0.0f64;
    let mut terms = 0;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(split);
        let value: f64 = number.parse().map_err(|_| not_a_duration())?;
        let after = after.trim_start();
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.' || c.is_whitespace())
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let unit_ns = match unit {
            "" if terms == 0 && next.trim().is_empty() => bare_unit_ns,
            "" => return Err(format!("`{text}`: a number without a unit in a sum")),
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" | "min" => 60e9,
            "h" => 3600e9,
            other => return Err(format!("`{other}`: unknown unit (ms, s, m)")),
        };
        ns += value * unit_ns;
        terms += 1;
        rest = next.trim_start();
    }
    if !ns.is_finite() || !(0.0..=1e18).contains(&ns) {
        return Err(format!("`{text}`: out of range"));
    }
    Ok(Duration::from_nanos(ns.round() as u64))
}

/// A duration whose bare number means seconds.
pub fn parse_seconds(s: &str) -> Result<Duration, String> {
    parse_duration_with(s, 1e9)
}

/// A duration whose bare number means milliseconds.
pub fn parse_millis(s: &str) -> Result<Duration, String> {
    parse_duration_with(s, 1e6)
}

/// A share: a percentage ("0.1%", "5 %") or a fraction ("0.001"), within 0..=1.
pub fn parse_ratio(s: &str) -> Result<f64, String> {
    let text = s.trim();
    let (number, scale) = match text.strip_suffix('%') {
        Some(n) => (n.trim_end(), 100.0),
        None => (text, 1.0),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}`: not a share (e.g. 0.1% or 0.001)"))?;
    let ratio = value / scale;
    if !(0.0..=1.0).contains(&ratio) {
        return Err(format!("`{text}`: a share is between 0% and 100%"));
    }
    Ok(ratio)
}

/// The capacity search's default p99 target.
pub const DEFAULT_SLO_P99: Duration = Duration::from_millis(10);
/// The capacity search's default loss bound: 0.1%.
pub const DEFAULT_SLO_LOSS: f64 = 0.001;

/// Source ports per worker thread by default, at least.
pub const DEFAULT_SOURCE_PORTS: usize = 16;
/// Source ports in all by default, at least: the kernel hashes the 4-tuple onto the
/// SO_REUSEPORT shards, so the ports fall on shards like balls into bins; with 128, each of
/// 16 shards gets at least one with probability 99.6% (inclusion-exclusion:
/// 1 - sum_j (-1)^(j+1) C(16,j) (1 - j/16)^128), with 64 only 77%.
pub const DEFAULT_SOURCE_PORTS_TOTAL: usize = 128;

/// `--source-ports` resolved: the flag, or the default for `threads` workers
/// (`max(DEFAULT_SOURCE_PORTS, ceil(DEFAULT_SOURCE_PORTS_TOTAL / threads))` per thread).
pub fn source_ports_per_thread(flag: Option<usize>, threads: usize) -> usize {
    flag.unwrap_or_else(|| {
        DEFAULT_SOURCE_PORTS.max(DEFAULT_SOURCE_PORTS_TOTAL.div_ceil(threads.max(1)))
    })
}

/// The secret used when no secret source is given (FreeRADIUS's example secret).
pub const DEFAULT_SECRET: &str = "testing123";

/// A secret given on the command line. `Debug` never shows it (secrets never reach a log
/// line).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretArg(pub String);

impl std::fmt::Debug for SecretArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretArg(<{} octets, redacted>)", self.0.len())
    }
}

fn parse_secret_arg(s: &str) -> Result<SecretArg, String> {
    Ok(SecretArg(s.to_string()))
}

/// Why the shared secret could not be had. Messages name the source, never the secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("cannot read the secret file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("the environment variable {0} is not set")]
    EnvMissing(String),
    #[error("the environment variable {0} is not valid Unicode")]
    EnvNotUnicode(String),
    #[error("the shared secret from {0} is empty (RFC 2865 §3 forbids an empty secret)")]
    Empty(String),
}

impl RunArgs {
    /// The shared secret's octets, from --secret, --secret-file or --secret-env (at most one;
    /// clap refuses more), else [`DEFAULT_SECRET`].
    pub fn secret_bytes(&self) -> Result<Vec<u8>, SecretError> {
        self.secret_bytes_with(|name| std::env::var_os(name))
    }

    /// [`Self::secret_bytes`] with the environment looked up by `getenv` (for tests).
    pub fn secret_bytes_with(
        &self,
        getenv: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Vec<u8>, SecretError> {
        let (bytes, source) = if let Some(s) = &self.secret {
            (s.0.as_bytes().to_vec(), "--secret".to_string())
        } else if let Some(path) = &self.secret_file {
            let mut bytes = std::fs::read(path).map_err(|e| SecretError::File {
                path: path.clone(),
                reason: e.kind().to_string(),
            })?;
            // One trailing line end, as `echo secret > file` writes.
            if bytes.last() == Some(&b'\n') {
                bytes.pop();
                if bytes.last() == Some(&b'\r') {
                    bytes.pop();
                }
            }
            (bytes, format!("the file {}", path.display()))
        } else if let Some(name) = &self.secret_env {
            let value = getenv(name).ok_or_else(|| SecretError::EnvMissing(name.clone()))?;
            let value = value
                .into_string()
                .map_err(|_| SecretError::EnvNotUnicode(name.clone()))?;
            (
                value.into_bytes(),
                format!("the environment variable {name}"),
            )
        } else {
            (DEFAULT_SECRET.as_bytes().to_vec(), "the default".into())
        };
        if bytes.is_empty() {
            return Err(SecretError::Empty(source));
        }
        Ok(bytes)
    }
}

/// A list of CPU numbers (a newtype, so that clap takes it as one value).
pub use dynauth_udp::cpu::CpuList;

/// A CPU list: "0", "0,2", "1-3", "0,2-3" (parsed as `dynauthd --cpus` parses it).
pub fn parse_cpus(s: &str) -> Result<CpuList, String> {
    s.parse()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mix_durations_and_cpus() {
        let m = parse_mix("coa=3, unknown=1").unwrap();
        assert_eq!((m.disconnect, m.coa, m.unknown, m.bad_auth), (0, 3, 1, 0));
        assert!(parse_mix("coa=0").is_err());
        assert!(parse_mix("nope=1").is_err());
        assert_eq!(parse_seconds("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_seconds("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_millis("250").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_millis("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_millis("5 parsecs").is_err());
        assert_eq!(parse_cpus("0,2-3").unwrap(), CpuList(vec![0, 2, 3]));
        assert!(parse_cpus("3-1").is_err());
    }

    #[test]
    fn durations_take_units_and_bare_numbers_keep_their_meaning() {
        let ms = Duration::from_millis;
        // Bare numbers: seconds for --duration, milliseconds for --timeout.
        assert_eq!(parse_seconds("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_seconds("0.5").unwrap(), ms(500));
        assert_eq!(parse_millis("1000").unwrap(), ms(1000));
        assert_eq!(parse_millis("2.5").unwrap(), Duration::from_micros(2500));
        // Units mean the same whatever the flag's bare unit.
        for parse in [parse_seconds, parse_millis] {
            assert_eq!(parse("500ms").unwrap(), ms(500));
            assert_eq!(parse("10s").unwrap(), Duration::from_secs(10));
            assert_eq!(parse("2m").unwrap(), Duration::from_secs(120));
            assert_eq!(parse("2min").unwrap(), Duration::from_secs(120));
            assert_eq!(parse("1h").unwrap(), Duration::from_secs(3600));
            assert_eq!(parse("1m30s").unwrap(), Duration::from_secs(90));
            assert_eq!(parse("1s 250ms").unwrap(), ms(1250));
            assert_eq!(parse(" 20 ms ").unwrap(), ms(20));
            assert_eq!(parse("750us").unwrap(), Duration::from_micros(750));
            assert_eq!(parse("750µs").unwrap(), Duration::from_micros(750));
            assert_eq!(parse("40ns").unwrap(), Duration::from_nanos(40));
            assert_eq!(parse("0").unwrap(), Duration::ZERO);
            for bad in [
                "",
                "ms",
                "-1",
                "-1s",
                "1e3",
                "5 parsecs",
                "10x",
                "1s 5",
                "1..2s",
                "s10",
            ] {
                assert!(parse(bad).is_err(), "{bad:?} was accepted");
            }
            assert!(parse("99999999999h").is_err(), "out of range");
        }
        // Through clap: every time flag takes units.
        let r = RunArgs::from_args([
            "--duration",
            "1m",
            "--timeout",
            "2s",
            "--retransmit-after",
            "250ms",
        ])
        .unwrap();
        assert_eq!(r.duration, Some(Duration::from_secs(60)));
        assert_eq!(r.timeout, ms(2000));
        assert_eq!(r.retransmit_after, Some(ms(250)));
        let r = RunArgs::from_args(["--duration", "3", "--timeout", "300"]).unwrap();
        assert_eq!(r.duration, Some(Duration::from_secs(3)));
        assert_eq!(r.timeout, ms(300));
        assert!(RunArgs::from_args(["--timeout", "soon"]).is_err());
    }

    #[test]
    fn secret_sources() {
        let no_env = |_: &str| None;
        // Default.
        let r = RunArgs::from_args::<_, &str>([]).unwrap();
        assert_eq!(
            r.secret_bytes_with(no_env).unwrap(),
            DEFAULT_SECRET.as_bytes()
        );
        // Command line.
        let r = RunArgs::from_args(["--secret", "s3cret"]).unwrap();
        assert_eq!(r.secret_bytes_with(no_env).unwrap(), b"s3cret");
        assert!(
            !format!("{r:?}").contains("s3cret"),
            "Debug shows the secret"
        );
        assert!(
            RunArgs::from_args(["--secret", ""])
                .unwrap()
                .secret_bytes()
                .is_err()
        );
        // File: one trailing line end dropped, other octets kept.
        let dir = std::env::temp_dir().join(format!("loadgen-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        let from_file = |content: &[u8]| {
            std::fs::write(&path, content).unwrap();
            RunArgs::from_args(["--secret-file", path.to_str().unwrap()])
                .unwrap()
                .secret_bytes_with(no_env)
        };
        assert_eq!(from_file(b"file-secret\n").unwrap(), b"file-secret");
        assert_eq!(from_file(b"file-secret\r\n").unwrap(), b"file-secret");
        assert_eq!(from_file(b" with spaces \n\n").unwrap(), b" with spaces \n");
        assert_eq!(from_file(&[0xff, 0x00, 0x01]).unwrap(), [0xff, 0x00, 0x01]);
        assert!(matches!(from_file(b"\n"), Err(SecretError::Empty(_))));
        let missing = dir.join("missing");
        let err = RunArgs::from_args(["--secret-file", missing.to_str().unwrap()])
            .unwrap()
            .secret_bytes_with(no_env)
            .unwrap_err();
        assert!(matches!(err, SecretError::File { .. }), "{err}");
        // Environment.
        let env = |name: &str| (name == "DAC_SECRET").then(|| "env-secret".into());
        let r = RunArgs::from_args(["--secret-env", "DAC_SECRET"]).unwrap();
        assert_eq!(r.secret_bytes_with(env).unwrap(), b"env-secret");
        let r = RunArgs::from_args(["--secret-env", "NOT_SET"]).unwrap();
        let err = r.secret_bytes_with(env).unwrap_err();
        assert_eq!(err, SecretError::EnvMissing("NOT_SET".into()));
        let empty = |_: &str| Some(std::ffi::OsString::new());
        let r = RunArgs::from_args(["--secret-env", "DAC_SECRET"]).unwrap();
        assert!(matches!(
            r.secret_bytes_with(empty),
            Err(SecretError::Empty(_))
        ));
        // Error messages name the source, never the secret.
        std::fs::write(&path, b"").unwrap();
        let msg = RunArgs::from_args(["--secret-file", path.to_str().unwrap()])
            .unwrap()
            .secret_bytes_with(no_env)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("empty"), "{msg}");
        // At most one source.
        assert!(RunArgs::from_args(["--secret", "a", "--secret-env", "B"]).is_err());
        assert!(RunArgs::from_args(["--secret-file", "/x", "--secret-env", "B"]).is_err());
        assert!(RunArgs::from_args(["--secret", "a", "--secret-file", "/x"]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn capacity_flags_parse_shares_and_imply_the_search() {
        assert_eq!(parse_ratio("0.1%").unwrap(), 0.001);
        assert_eq!(parse_ratio("5 %").unwrap(), 0.05);
        assert_eq!(parse_ratio("0.02").unwrap(), 0.02);
        assert_eq!(parse_ratio("0").unwrap(), 0.0);
        for bad in ["", "%", "101%", "-1%", "1.5", "a lot"] {
            assert!(parse_ratio(bad).is_err(), "{bad:?} was accepted");
        }
        let r = RunArgs::from_args::<_, &str>([]).unwrap();
        assert!(!r.capacity_search());
        let r = RunArgs::from_args(["--slo-p99", "20ms"]).unwrap();
        assert!(r.capacity_search());
        assert_eq!(r.slo_p99, Some(Duration::from_millis(20)));
        let r = RunArgs::from_args(["--slo-loss", "0.5%"]).unwrap();
        assert!(r.capacity_search());
        assert_eq!(r.slo_loss, Some(0.005));
        let r = RunArgs::from_args(["--capacity", "--capacity-precision", "10%"]).unwrap();
        assert!(r.capacity_search() && r.slo_p99.is_none());
        assert_eq!(r.capacity_precision, 0.1);
    }

    #[test]
    fn cli_parses_run_and_echo_server() {
        let r = RunArgs::from_args(["--rate", "1000", "--requests", "5", "--json"]).unwrap();
        assert_eq!(r.rate, Some(1000.0));
        assert!(RunArgs::from_args(["--rate", "1", "--window", "2"]).is_err());
        let cli =
            Cli::try_parse_from(["loadgen", "echo-server", "--listen", "127.0.0.1:9"]).unwrap();
        assert!(matches!(cli.command, Some(Command::EchoServer(_))));
    }
}
