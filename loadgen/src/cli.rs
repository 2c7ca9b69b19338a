//! The command line (clap derive): the load run's flags at the top level, and the
//! `echo-server` subcommand. Parsing only; `plan` turns [`RunArgs`] into a checked run plan.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Expect {
    /// RADIUS answers: Identifier, Response Authenticator, Message-Authenticator, code.
    Radius,
    /// An echo server: an answer identical to the request is a success.
    Echo,
}

/// The traffic shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
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
    /// Shared secret (RFC 2865 §3).
    #[arg(long, default_value = "testing123", hide_default_value = true)]
    pub secret: String,

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
    /// Default 10s, unless --requests is given or the profile is mass-disconnect.
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
    /// Source sockets in all (256 Identifiers each), spread over the threads. Default: enough
    /// for the window (closed loop) or 4 per thread (open loop).
    #[arg(long)]
    pub sockets: Option<usize>,
    /// Datagrams per sendmmsg/recvmmsg batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// SO_SNDBUF and SO_RCVBUF of each socket, in octets.
    #[arg(long, default_value_t = 4 << 20)]
    pub socket_buffer: usize,

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
}

impl RunArgs {
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

fn parse_duration_with(s: &str, bare_unit_ns: f64) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{s}`: not a duration (e.g. 250ms, 10s, 2m)"))?;
    let unit_ns = match unit.trim() {
        "" => bare_unit_ns,
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "m" | "min" => 60e9,
        other => return Err(format!("`{other}`: unknown unit (ms, s, m)")),
    };
    let ns = value * unit_ns;
    if !ns.is_finite() || !(0.0..=1e18).contains(&ns) {
        return Err(format!("`{s}`: out of range"));
    }
    Ok(Duration::from_nanos(ns as u64))
}

/// A duration whose bare number means seconds.
pub fn parse_seconds(s: &str) -> Result<Duration, String> {
    parse_duration_with(s, 1e9)
}

/// A duration whose bare number means milliseconds.
pub fn parse_millis(s: &str) -> Result<Duration, String> {
    parse_duration_with(s, 1e6)
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
    fn cli_parses_run_and_echo_server() {
        let r = RunArgs::from_args(["--rate", "1000", "--requests", "5", "--json"]).unwrap();
        assert_eq!(r.rate, Some(1000.0));
        assert!(RunArgs::from_args(["--rate", "1", "--window", "2"]).is_err());
        let cli =
            Cli::try_parse_from(["loadgen", "echo-server", "--listen", "127.0.0.1:9"]).unwrap();
        assert!(matches!(cli.command, Some(Command::EchoServer(_))));
    }
}
