//! dynauthd's configuration: the command line (clap), the TOML file (serde + toml), and how
//! they combine into the [`Settings`] the runtime runs with.
//!
//! Owns: every setting's name, default and validation; secrets from the file, a file or an
//! environment variable (never logged: [`Secret`]'s `Debug` redacts); error messages that say
//! where (file, line, key) and what to do. Flags override the file. Must not touch: sockets,
//! threads (the runtime) or packets (the engine).
#![forbid(unsafe_code)]

use core::fmt;
use core::str::FromStr;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde::Deserialize;
use toml::Spanned;

use dynauth_proto::auth::Secret;
use dynauth_proto::client::{Cidr, Client, ClientPolicy, ClientTable, NasIdentity};
use dynauth_proto::dedup::DedupConfig;
pub use dynauth_udp::cpu::CpuList;

/// The documented demo secret (`--demo`): public, for the quick start only.
pub const DEMO_SECRET: &str = "dynauth-demo-secret";
/// How many synthetic sessions `--demo` loads (Acct-Session-Id demo-1 ... demo-1000).
pub const DEMO_SESSIONS: u64 = 1000;
/// The default listen address (RFC 5176 §3.7: UDP port 3799).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:3799";
/// Default socket buffers: 32 MiB receive (a storm at full rate queues, not drops), 8 MiB send.
pub const DEFAULT_RECV_BUFFER: usize = 32 << 20;
pub const DEFAULT_SEND_BUFFER: usize = 8 << 20;
pub const DEFAULT_BATCH: usize = 64;
/// With `--state-dir` every batch waits for the fsync that covers it, so a batch should hold
/// as many requests as a storm has in flight: one fsync then covers them all
/// (docs/BENCHMARKS.md, "Durable state").
pub const DEFAULT_DURABLE_BATCH: usize = 1024;
pub const DEFAULT_STATS_INTERVAL_SECS: u64 = 10;

/// dynauthd: an RFC 5176 Dynamic Authorization Server (Disconnect and CoA).
#[derive(Debug, Clone, Parser)]
#[command(name = "dynauthd", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML configuration file (flags override its settings).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address and port to listen on; repeatable (default 127.0.0.1:3799).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Vec<SocketAddr>,
    /// A client (DAC) network and its shared secret; repeatable. The secret is visible in the
    /// process list: in production put secrets in the config file's secret_file/secret_env.
    #[arg(long, value_name = "CIDR=SECRET", value_parser = parse_client_flag)]
    pub client: Vec<ClientFlag>,
    /// This NAS's NAS-Identifier (checked against requests, RFC 5176 §3); repeatable.
    #[arg(long, value_name = "ID")]
    pub nas_identifier: Vec<String>,
    /// This NAS's NAS-IP-Address; repeatable (default: the address a request arrived on).
    #[arg(long, value_name = "IP")]
    pub nas_ip: Vec<Ipv4Addr>,
    /// This NAS's NAS-IPv6-Address; repeatable (default: the address a request arrived on).
    #[arg(long, value_name = "IP")]
    pub nas_ipv6: Vec<Ipv6Addr>,
    /// Sessions to load: JSON Lines, one session per line.
    #[arg(long, value_name = "FILE.jsonl")]
    pub sessions: Option<PathBuf>,
    /// Number of shards (threads, each with its own sockets): a number or `auto` (one per CPU).
    #[arg(long, value_name = "N|auto")]
    pub shards: Option<Shards>,
    /// CPUs to pin shards to, e.g. `0,2-5` (default: every CPU this process may use).
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<CpuList>,
    /// I/O backend: `auto` takes recvmmsg/sendmmsg (measured faster, with UDP GSO); `uring` asks for io_uring.
    #[arg(long, value_enum, value_name = "auto|uring|mmsg")]
    pub io: Option<IoChoice>,
    /// Most datagrams received and answered per batch (default 64; 1024 with --state-dir,
    /// where each batch waits for one fsync).
    #[arg(long, value_name = "N")]
    pub batch: Option<usize>,
    /// Demo mode: loopback 127.0.0.1:3799, client 127.0.0.1 and ::1 with the public secret
    /// `dynauth-demo-secret`, 1000 synthetic sessions demo-1 ... demo-1000.
    #[arg(long)]
    pub demo: bool,
    /// SO_RCVBUF per socket, in octets (default 32 MiB).
    #[arg(long, value_name = "BYTES")]
    pub recv_buffer: Option<usize>,
    /// SO_SNDBUF per socket, in octets (default 8 MiB).
    #[arg(long, value_name = "BYTES")]
    pub send_buffer: Option<usize>,
    /// Seconds between stats log lines (0: none).
    #[arg(long, value_name = "SECS")]
    pub stats_interval: Option<u64>,
    /// Send a batch's answers to one DAC as UDP GSO messages (mmsg backend). The default
    /// where the kernel supports it; this flag makes a refusal a warning.
    #[arg(long, conflicts_with = "no_gso")]
    pub gso: bool,
    /// Send every answer as a datagram of its own (no UDP GSO).
    #[arg(long)]
    pub no_gso: bool,
    /// Serve Prometheus text metrics over HTTP on this address (e.g. 127.0.0.1:9799).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
    /// Learn sessions from RADIUS Accounting-Requests (RFC 2866) on this address; repeatable
    /// (the standard port is 1813). See docs/ACCOUNTING.md.
    #[arg(long, value_name = "ADDR:PORT")]
    pub accounting_listen: Vec<SocketAddr>,
    /// Listen for the gateway's agents and dynauthctl on this Unix socket (docs/CONTROL.md).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// File mode of the control socket, octal (default 0600: its owner only).
    #[arg(long, value_name = "OCTAL", value_parser = parse_mode, requires = "control")]
    pub control_mode: Option<u32>,
    /// Owner of the control socket: UID, UID:GID or :GID (numeric).
    #[arg(long, value_name = "UID[:GID]", value_parser = parse_owner, requires = "control")]
    pub control_owner: Option<(Option<u32>, Option<u32>)>,
    /// Who tears sessions down: `agent` (the agents on the control socket; a Disconnect or
    /// CoA is answered only after the owning agent commits) or `table` (the session table
    /// alone; demo, tests). Default: `agent` with --control, else `table`.
    #[arg(long, value_name = "agent|table", value_parser = parse_data_plane)]
    pub data_plane: Option<DataPlaneMode>,
    /// How long an agent has to commit an action before the request gets NAK 506 (e.g.
    /// 3s, 500ms).
    #[arg(long, value_name = "DURATION", value_parser = parse_millis)]
    pub action_deadline: Option<u64>,
    /// Keep the session table durable in this directory: every change is journaled (fsynced)
    /// before it is acknowledged, snapshots bound the journal, a restart restores it
    /// (docs/DURABILITY.md). --sessions FILE is then imported once, into an empty state.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Group commit: at most one journal fsync per this window; every change in it waits for
    /// that fsync (default 2ms; 0: fsync as fast as the disk allows).
    #[arg(long, value_name = "DURATION", value_parser = parse_millis_or_zero, requires = "state_dir")]
    pub journal_commit_window: Option<u64>,
    /// Time between periodic snapshots, e.g. 300s (0: only at a clean shutdown).
    #[arg(long, value_name = "DURATION", value_parser = parse_millis_or_zero, requires = "state_dir")]
    pub snapshot_interval: Option<u64>,
    /// Also take a snapshot once the journal has grown by this many octets since the last
    /// one (0: by time only; default 1 GiB).
    #[arg(long, value_name = "BYTES", requires = "state_dir")]
    pub snapshot_journal_bytes: Option<u64>,
    #[command(flatten)]
    pub router: crate::router::RouterArgs,
    #[command(flatten)]
    pub overload: crate::overload::OverloadArgs,
    /// Write one JSON line per decided Disconnect/CoA and operator disconnect to this file
    /// (`-`: standard output). Off by default. See docs/RUNNING.md, "Audit log".
    #[arg(long, value_name = "PATH|-")]
    pub audit_log: Option<PathBuf>,
    /// Rotate the audit log before it grows past this many octets (0: never; default 100 MiB).
    #[arg(long, value_name = "BYTES", requires = "audit_log")]
    pub audit_log_max_bytes: Option<u64>,
    /// Rotated audit log files kept (PATH.1 ... PATH.N; default 5).
    #[arg(long, value_name = "N", requires = "audit_log")]
    pub audit_log_keep: Option<usize>,
    /// Publish this instance's session affinity to Redis for the routers
    /// (redis://[:PASSWORD@]HOST:PORT[/DB]; docs/SCALE_OUT.md). Needs --owner-id.
    #[arg(long, value_name = "URL")]
    pub affinity_redis: Option<String>,
    /// This instance's owner id in the affinity index (1-64 of [A-Za-z0-9._-]).
    #[arg(long, value_name = "ID")]
    pub owner_id: Option<String>,
    /// The DAS address routers forward to (default: the first listen address).
    #[arg(long, value_name = "IP:PORT")]
    pub owner_address: Option<SocketAddr>,
    /// Key prefix in Redis (default `dynauth`).
    #[arg(long, value_name = "PREFIX")]
    pub affinity_prefix: Option<String>,
    /// How long an index entry lives after its last write, e.g. 24h, 90m, 3600s (default 24h).
    #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
    pub affinity_ttl: Option<Duration>,
}

/// `--affinity-ttl`: the other flags' syntax (`3s`, `500ms`, milliseconds) plus `m` and
/// `h`; at least a second.
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let scaled = |n: &str, unit: u64| {
        n.trim()
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(unit))
            .ok_or_else(|| format!("{s:?}: expected a duration such as 24h, 90m or 3600s"))
    };
    let ms = if let Some(n) = t.strip_suffix('h') {
        scaled(n, 3_600_000)?
    } else if let Some(n) = t.strip_suffix('m') {
        scaled(n, 60_000)?
    } else {
        parse_millis(t)?
    };
    if ms < 1000 {
        return Err(format!("{s:?}: at least 1s"));
    }
    Ok(Duration::from_millis(ms))
}

/// A duration such as `2ms` or `300s`, zero allowed (at most a day).
fn parse_millis_or_zero(s: &str) -> Result<u64, String> {
    parse_duration_ms(s).and_then(|ms| {
        (ms <= 86_400_000)
            .then_some(ms)
            .ok_or_else(|| format!("{s:?}: at most a day (86400s)"))
    })
}

/// The one duration syntax of every flag: `3s`, `500ms`, or a number of milliseconds; zero
/// allowed (callers that need more than zero, or a bound, say so).
pub(crate) fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let (number, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else {
        (s, 1)
    };
    number
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("{s:?}: expected a duration such as 3s or 500ms"))
}

/// Who carries out Disconnects and CoAs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPlaneMode {
    /// Agents on the control socket; ACK only after they commit (RFC 5176 §2.1).
    Agent,
    /// The session table is the data plane.
    Table,
}

fn parse_data_plane(s: &str) -> Result<DataPlaneMode, String> {
    match s {
        "agent" => Ok(DataPlaneMode::Agent),
        "table" => Ok(DataPlaneMode::Table),
        other => Err(format!("{other:?}: expected agent or table")),
    }
}

/// `3s`, `500ms`, or a number of milliseconds, more than zero.
fn parse_millis(s: &str) -> Result<u64, String> {
    parse_duration_ms(s)
        .ok()
        .filter(|&ms| ms > 0)
        .ok_or_else(|| format!("{s:?}: expected a positive duration such as 3s or 500ms"))
}

/// `--control-mode 0660`.
fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!(
            "{text:?} is not a file mode: use octal digits, e.g. 0600 or 0660"
        )),
    }
}

/// `--control-owner 0:114`.
fn parse_owner(text: &str) -> Result<(Option<u32>, Option<u32>), String> {
    let bad = || format!("{text:?} is not UID, UID:GID or :GID (numbers)");
    let id = |s: &str| -> Result<Option<u32>, String> {
        if s.is_empty() {
            Ok(None)
        } else {
            s.parse().map(Some).map_err(|_| bad())
        }
    };
    let (uid, gid) = match text.split_once(':') {
        Some((u, g)) => (id(u)?, id(g)?),
        None => (id(text)?, None),
    };
    if uid.is_none() && gid.is_none() {
        return Err(bad());
    }
    Ok((uid, gid))
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Validates a configuration file (and the secrets and session file it names) and says
    /// exactly what is wrong: file, line, key.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
}

/// `--client CIDR=SECRET`.
#[derive(Clone)]
pub struct ClientFlag {
    pub network: Cidr,
    pub secret: Secret,
}

impl fmt::Debug for ClientFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientFlag({}={:?})", self.network, self.secret)
    }
}

fn parse_client_flag(s: &str) -> Result<ClientFlag, String> {
    let (cidr, secret) = s
        .split_once('=')
        .ok_or("expected CIDR=SECRET, e.g. 192.0.2.0/24=s3cret (no `=` found)")?;
    let network = cidr
        .parse::<Cidr>()
        .map_err(|e| format!("bad client network: {e}"))?;
    let secret = Secret::new(secret)
        .map_err(|_| format!("the secret for {network} is empty (RFC 2865 §3 forbids that)"))?;
    Ok(ClientFlag { network, secret })
}

/// `--shards N|auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Shards {
    #[default]
    Auto,
    Count(usize),
}

impl FromStr for Shards {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(Shards::Auto);
        }
        match s.trim().parse::<usize>() {
            Ok(n) if (1..=1024).contains(&n) => Ok(Shards::Count(n)),
            _ => Err(format!(
                "`{s}` is not a shard count: use a number from 1 to 1024 or `auto`"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Shards {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(i64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => n.to_string().parse().map_err(serde::de::Error::custom),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// `--io`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoChoice {
    /// recvmmsg/sendmmsg: the backend measured faster here (UDP GSO, pipelined commits).
    #[default]
    Auto,
    /// io_uring (multishot recvmsg, provided buffers); an error if it is not available.
    Uring,
    /// recvmmsg/sendmmsg.
    Mmsg,
}

/// A CIDR in the TOML file (parse errors carry the value's position).
#[derive(Debug, Clone, Copy)]
struct CidrValue(Cidr);

impl<'de> Deserialize<'de> for CidrValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<Cidr>()
            .map(CidrValue)
            .map_err(|e| serde::de::Error::custom(format!("bad client network: {e}")))
    }
}

/// The TOML file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<Vec<SocketAddr>>,
    shards: Option<Shards>,
    cpus: Option<CpuList>,
    io: Option<IoChoice>,
    batch: Option<usize>,
    sessions: Option<PathBuf>,
    recv_buffer_bytes: Option<usize>,
    send_buffer_bytes: Option<usize>,
    stats_interval_secs: Option<u64>,
    gso: Option<bool>,
    metrics: Option<SocketAddr>,
    #[serde(default)]
    nas: NasFile,
    #[serde(default)]
    dedup: DedupFile,
    #[serde(default)]
    overload: crate::overload::OverloadFile,
    #[serde(default)]
    tombstones: crate::overload::TombstonesFile,
    #[serde(default)]
    client: Vec<ClientFile>,
    affinity: Option<AffinityFile>,
}

/// `[affinity]`: the `--affinity-*` and `--owner-*` flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AffinityFile {
    redis: Option<String>,
    owner_id: Option<String>,
    owner_address: Option<SocketAddr>,
    prefix: Option<String>,
    ttl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NasFile {
    #[serde(default)]
    identifier: Vec<String>,
    #[serde(default)]
    ipv4: Vec<Ipv4Addr>,
    #[serde(default)]
    ipv6: Vec<Ipv6Addr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DedupFile {
    max_entries: Option<usize>,
    arena_bytes: Option<usize>,
    max_in_flight: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    name: Option<String>,
    network: Spanned<CidrValue>,
    secret: Option<Spanned<String>>,
    secret_file: Option<Spanned<PathBuf>>,
    secret_env: Option<Spanned<String>>,
    previous_secret: Option<Spanned<String>>,
    previous_secret_file: Option<Spanned<PathBuf>>,
    previous_secret_env: Option<Spanned<String>>,
    #[serde(default)]
    policy: ClientPolicy,
}

/// A configuration that cannot be used. Every variant says where and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, or a value of the wrong type; toml's message names the
    /// line, column and key.
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}:{line}: key `{key}`: {problem}")]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        problem: String,
    },
    #[error("{0}")]
    Other(String),
}

/// Whether the answers go out as UDP GSO (UDP_SEGMENT) messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gso {
    /// The default: with the mmsg backend where the kernel supports it, quietly without
    /// where it does not (and with io_uring, which has no GSO path).
    Auto,
    /// Asked for (`--gso`, `gso = true`): as `Auto`, but a kernel or backend without it is
    /// worth a warning.
    On,
    /// `--no-gso`, `gso = false`: one datagram per answer.
    Off,
}

impl Gso {
    /// Whether to try GSO at all.
    pub fn wanted(self) -> bool {
        self != Gso::Off
    }
}

/// Everything dynauthd runs with, after file, flags and demo defaults are combined.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: Vec<SocketAddr>,
    pub shards: Shards,
    pub cpus: Option<CpuList>,
    pub io: IoChoice,
    pub batch: usize,
    pub sessions: Option<PathBuf>,
    /// Load the synthetic demo sessions.
    pub demo_sessions: bool,
    pub recv_buffer: usize,
    pub send_buffer: usize,
    pub stats_interval_secs: u64,
    /// UDP GSO for answers (mmsg backend).
    pub gso: Gso,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// The control socket, if any.
    pub control: Option<crate::control::ControlConfig>,
    /// Where to receive RADIUS Accounting (the zero-integration session feed).
    pub accounting_listen: Vec<SocketAddr>,
    pub clients: Vec<Client>,
    pub nas: NasIdentity,
    pub dedup: DedupConfig,
    /// Who carries out Disconnects and CoAs.
    pub data_plane: DataPlaneMode,
    /// Milliseconds an agent has to commit an action.
    pub action_deadline_ms: u64,
    /// `--state-dir`: the durable state, if any.
    pub state: Option<crate::state::StateOptions>,
    /// `--role router`: the routing tier's settings (docs/SCALE_OUT.md).
    pub router: Option<crate::router::RouterSettings>,
    /// `--audit-log`: the audit log, if any.
    pub audit: Option<crate::audit::AuditOptions>,
    /// `--affinity-redis`: publish this owner's sessions for the routers.
    pub affinity: Option<AffinityOwner>,
    /// Shedding under overload and the tombstones' size (`crate::overload`).
    pub overload: crate::overload::OverloadSettings,
}

/// Publishing affinity (`--affinity-redis`).
#[derive(Debug, Clone)]
pub struct AffinityOwner {
    pub settings: crate::affinity::AffinitySettings,
    pub owner_id: String,
    /// `None`: the first listen address as bound (it may be port 0 until then).
    pub owner_address: Option<SocketAddr>,
}

fn affinity_owner(
    file: Option<&AffinityFile>,
    cli: &Cli,
    listen: &[SocketAddr],
) -> Result<Option<AffinityOwner>, ConfigError> {
    let none = AffinityFile::default();
    let file = file.unwrap_or(&none);
    let Some(url) = cli.affinity_redis.clone().or(file.redis.clone()) else {
        let stray = cli.owner_id.is_some()
            || cli.owner_address.is_some()
            || cli.affinity_prefix.is_some()
            || cli.affinity_ttl.is_some();
        if stray {
            return Err(ConfigError::Other(
                "--owner-id, --owner-address, --affinity-prefix and --affinity-ttl need --affinity-redis URL".into(),
            ));
        }
        return Ok(None);
    };
    let owner_id = cli.owner_id.clone().or(file.owner_id.clone()).ok_or_else(|| {
        ConfigError::Other(
            "--affinity-redis needs --owner-id ID: the name this instance's sessions are published under (unique per instance)".into(),
        )
    })?;
    crate::affinity::check_owner_id(&owner_id)
        .map_err(|e| ConfigError::Other(format!("--owner-id: {e}")))?;
    let owner_address = cli.owner_address.or(file.owner_address);
    match owner_address {
        Some(a) if a.ip().is_unspecified() || a.port() == 0 => {
            return Err(ConfigError::Other(format!(
                "--owner-address {a}: routers need an address they can reach: give a specific IP and port"
            )));
        }
        Some(_) => {}
        None => {
            if let Some(first) = listen.first()
                && first.ip().is_unspecified()
            {
                return Err(ConfigError::Other(format!(
                    "--affinity-redis: the first listen address {first} is unspecified, so routers cannot be told where to forward: give --owner-address IP:PORT"
                )));
            }
        }
    }
    crate::affinity::publish::check_url(&url).map_err(|e| ConfigError::Other(e.to_string()))?;
    let mut settings = crate::affinity::AffinitySettings::new(url);
    if let Some(p) = cli.affinity_prefix.clone().or(file.prefix.clone()) {
        if p.is_empty() || p.contains(['{', '}']) {
            return Err(ConfigError::Other(format!(
                "--affinity-prefix {p:?}: must be non-empty, without braces"
            )));
        }
        settings.prefix = p;
    }
    if let Some(ttl) = cli.affinity_ttl {
        settings.ttl = ttl;
    } else if let Some(ttl) = &file.ttl {
        settings.ttl =
            parse_ttl(ttl).map_err(|e| ConfigError::Other(format!("affinity.ttl: {e}")))?;
    }
    Ok(Some(AffinityOwner {
        settings,
        owner_id,
        owner_address,
    }))
}

impl Settings {
    /// The engine's view: clients, NAS identity, duplicate-cache sizing.
    pub fn engine_config(&self) -> Result<dynauth_proto::EngineConfig, ConfigError> {
        let clients = ClientTable::new(self.clients.iter().cloned())
            .map_err(|e| ConfigError::Other(format!("{e}: list each client network once")))?;
        Ok(dynauth_proto::EngineConfig {
            clients,
            nas: self.nas.clone(),
            dedup: self.dedup,
            action_deadline_ms: self.action_deadline_ms,
        })
    }
}

fn line_of(source: &str, offset: usize) -> usize {
    source
        .get(..offset.min(source.len()))
        .map(|s| s.matches('\n').count() + 1)
        .unwrap_or(1)
}

struct SecretSource<'a> {
    value: Option<&'a Spanned<String>>,
    file: Option<&'a Spanned<PathBuf>>,
    env: Option<&'a Spanned<String>>,
}

fn resolve_secret(
    path: &Path,
    source: &str,
    base_dir: &Path,
    key_prefix: &str,
    which: &str,
    s: SecretSource<'_>,
    fallback_line: usize,
) -> Result<Option<Secret>, ConfigError> {
    let invalid =
        |span: core::ops::Range<usize>, key: String, problem: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: line_of(source, span.start),
            key,
            problem,
        };
    let given = [s.value.is_some(), s.file.is_some(), s.env.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if given > 1 {
        let span = s
            .file
            .map(Spanned::span)
            .or(s.env.map(Spanned::span))
            .unwrap_or(0..0);
        return Err(invalid(
            span,
            format!("{key_prefix}.{which}"),
            format!("give only one of `{which}`, `{which}_file` and `{which}_env`"),
        ));
    }
    let bytes: Vec<u8> = if let Some(v) = s.value {
        v.get_ref().as_bytes().to_vec()
    } else if let Some(f) = s.file {
        let file = base_dir.join(f.get_ref());
        let mut data = std::fs::read(&file).map_err(|e| {
            invalid(
                f.span(),
                format!("{key_prefix}.{which}_file"),
                format!(
                    "cannot read secret file {}: {e} (create it with the shared secret on one line, readable only by dynauthd)",
                    file.display()
                ),
            )
        })?;
        while data.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            data.pop();
        }
        warn_if_world_readable(&file);
        data
    } else if let Some(e) = s.env {
        match std::env::var_os(e.get_ref()) {
            Some(v) => v.into_encoded_bytes(),
            None => {
                return Err(invalid(
                    e.span(),
                    format!("{key_prefix}.{which}_env"),
                    format!(
                        "environment variable {} is not set: export it before starting dynauthd",
                        e.get_ref()
                    ),
                ));
            }
        }
    } else {
        return Ok(None);
    };
    let span = s
        .value
        .map(Spanned::span)
        .or(s.file.map(Spanned::span))
        .or(s.env.map(Spanned::span));
    Secret::new(bytes)
        .map(Some)
        .map_err(|_| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: span
                .map(|sp| line_of(source, sp.start))
                .unwrap_or(fallback_line),
            key: format!("{key_prefix}.{which}"),
            problem: "the secret is empty (RFC 2865 §3 forbids an empty shared secret)".into(),
        })
}

fn warn_if_world_readable(file: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(file)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            file = %file.display(),
            "secret file is readable by group or others: chmod 600 it"
        );
    }
}

/// The file's settings, parsed and resolved (secrets read), before flags.
#[derive(Debug, Default)]
struct Loaded {
    file: FileConfig,
    clients: Vec<Client>,
}

fn load_file(path: &Path) -> Result<Loaded, ConfigError> {
    let source = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let file: FileConfig = toml::from_str(&source).map_err(|e| ConfigError::Syntax {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })?;
    let base_dir = path.parent().unwrap_or(Path::new("."));
    let mut clients = Vec::with_capacity(file.client.len());
    for (i, c) in file.client.iter().enumerate() {
        let key = format!("client[{i}]");
        let line = line_of(&source, c.network.span().start);
        let secret = resolve_secret(
            path,
            &source,
            base_dir,
            &key,
            "secret",
            SecretSource {
                value: c.secret.as_ref(),
                file: c.secret_file.as_ref(),
                env: c.secret_env.as_ref(),
            },
            line,
        )?
        .ok_or_else(|| ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            key: format!("{key}.secret"),
            problem: format!(
                "client {} has no secret: set `secret_file` (recommended), `secret_env` or `secret`",
                c.network.get_ref().0
            ),
        })?;
        let previous = resolve_secret(
            path,
            &source,
            base_dir,
            &key,
            "previous_secret",
            SecretSource {
                value: c.previous_secret.as_ref(),
                file: c.previous_secret_file.as_ref(),
                env: c.previous_secret_env.as_ref(),
            },
            line,
        )?;
        let network = c.network.get_ref().0;
        if let Some(dup) = clients.iter().position(|x: &Client| x.network == network) {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                line,
                key: format!("{key}.network"),
                problem: format!("{network} is already configured by client[{dup}]"),
            });
        }
        let mut client = Client::new(network, secret);
        if let Some(name) = &c.name {
            client.name = name.clone();
        }
        client.previous_secret = previous;
        client.policy = c.policy.clone();
        clients.push(client);
    }
    let mut file = file;
    // Relative paths in the file are relative to the file.
    file.sessions = file
        .sessions
        .map(|s| if s.is_relative() { base_dir.join(s) } else { s });
    Ok(Loaded { file, clients })
}

/// `dynauthd check-config FILE`: the settings the file gives, or what is wrong with it.
pub fn check_file(path: &Path) -> Result<Settings, ConfigError> {
    let cli = Cli::parse_from(["dynauthd"]);
    let name = |e: ConfigError| match e {
        ConfigError::Other(m) => ConfigError::Other(format!("{}: {m}", path.display())),
        e => e,
    };
    let settings = combine(load_file(path)?, &cli).map_err(name)?;
    settings.engine_config().map_err(name)?;
    if let Some(sessions) = &settings.sessions
        && !sessions.is_file()
    {
        return Err(ConfigError::Other(format!(
            "{}: key `sessions`: no such file {}",
            path.display(),
            sessions.display()
        )));
    }
    Ok(settings)
}

/// The settings of a command line (with its `--config` file, when given).
pub fn settings_from(cli: &Cli) -> Result<Settings, ConfigError> {
    let loaded = match &cli.config {
        Some(path) => load_file(path)?,
        None => Loaded::default(),
    };
    combine(loaded, cli)
}

fn combine(loaded: Loaded, cli: &Cli) -> Result<Settings, ConfigError> {
    let Loaded { file, mut clients } = loaded;
    // --client adds clients; one whose network the file already has replaces it.
    for flag in &cli.client {
        let client = Client::new(flag.network, flag.secret.clone());
        match clients.iter_mut().find(|c| c.network == flag.network) {
            Some(existing) => {
                existing.secret = client.secret;
                existing.previous_secret = None;
            }
            None => clients.push(client),
        }
    }
    let mut listen = if !cli.listen.is_empty() {
        cli.listen.clone()
    } else {
        file.listen.clone().unwrap_or_default()
    };
    if cli.demo {
        for net in ["127.0.0.1/32", "::1/128"] {
            let network: Cidr = net
                .parse()
                .map_err(|e| ConfigError::Other(format!("{e}")))?;
            if !clients.iter().any(|c| c.network == network) {
                let secret =
                    Secret::new(DEMO_SECRET).map_err(|e| ConfigError::Other(e.to_string()))?;
                let mut client = Client::new(network, secret);
                client.name = format!("demo {net}");
                clients.push(client);
            }
        }
    }
    if listen.is_empty() {
        listen.push(
            DEFAULT_LISTEN
                .parse()
                .map_err(|_| ConfigError::Other("bad default".into()))?,
        );
    }
    let mut nas = NasIdentity {
        identifiers: file.nas.identifier.clone(),
        ipv4: file.nas.ipv4.clone(),
        ipv6: file.nas.ipv6.clone(),
    };
    if !cli.nas_identifier.is_empty() {
        nas.identifiers = cli.nas_identifier.clone();
    }
    if !cli.nas_ip.is_empty() {
        nas.ipv4 = cli.nas_ip.clone();
    }
    if !cli.nas_ipv6.is_empty() {
        nas.ipv6 = cli.nas_ipv6.clone();
    }
    let defaults = DedupConfig::default();
    let dedup = DedupConfig {
        max_entries: file.dedup.max_entries.unwrap_or(defaults.max_entries),
        arena_bytes: file.dedup.arena_bytes.unwrap_or(defaults.arena_bytes),
        max_in_flight: file.dedup.max_in_flight.unwrap_or(defaults.max_in_flight),
    };
    let sessions = cli.sessions.clone().or(file.sessions.clone());
    let default_batch = if cli.state_dir.is_some() {
        DEFAULT_DURABLE_BATCH
    } else {
        DEFAULT_BATCH
    };
    let batch = cli.batch.or(file.batch).unwrap_or(default_batch);
    if !(1..=1024).contains(&batch) {
        return Err(ConfigError::Other(format!(
            "batch {batch} is out of range: use 1 to 1024"
        )));
    }
    if clients.is_empty() {
        return Err(ConfigError::Other(
            "no clients configured, so every request would be dropped: add --client CIDR=SECRET, \
             a [[client]] table in --config FILE, or use --demo"
                .into(),
        ));
    }
    let router = cli
        .router
        .settings(
            (
                cli.affinity_redis
                    .clone()
                    .or(file.affinity.as_ref().and_then(|a| a.redis.clone())),
                cli.affinity_prefix
                    .clone()
                    .or(file.affinity.as_ref().and_then(|a| a.prefix.clone())),
            ),
            &listen,
        )
        .map_err(|e| ConfigError::Other(e.to_string()))?;
    if router.is_some() {
        let das_only: [(&str, bool); 6] = [
            ("sessions", sessions.is_some()),
            ("demo", cli.demo),
            ("state-dir", cli.state_dir.is_some()),
            ("control", cli.control.is_some()),
            ("accounting-listen", !cli.accounting_listen.is_empty()),
            ("data-plane", cli.data_plane.is_some()),
        ];
        if let Some((flag, _)) = das_only.iter().find(|(_, set)| *set) {
            return Err(ConfigError::Other(
                crate::router::RouterConfigError::NotForARouter(flag).to_string(),
            ));
        }
    }
    let overload = crate::overload::OverloadSettings::combine(
        &cli.overload,
        &file.overload,
        &file.tombstones,
        &clients,
    );
    // A router reads the affinity (`--affinity-redis` is where); only an owner publishes.
    let affinity = if router.is_some() {
        let owner_only: [(&'static str, bool); 3] = [
            ("owner-id", cli.owner_id.is_some()),
            ("owner-address", cli.owner_address.is_some()),
            ("affinity-ttl", cli.affinity_ttl.is_some()),
        ];
        if let Some((flag, _)) = owner_only.iter().find(|(_, set)| *set) {
            return Err(ConfigError::Other(
                crate::router::RouterConfigError::OwnerFlag(flag).to_string(),
            ));
        }
        None
    } else {
        affinity_owner(file.affinity.as_ref(), cli, &listen)?
    };
    Ok(Settings {
        overload,
        affinity,
        listen,
        shards: cli.shards.or(file.shards).unwrap_or_default(),
        cpus: cli.cpus.clone().or(file.cpus.clone()),
        io: cli.io.or(file.io).unwrap_or_default(),
        batch,
        demo_sessions: cli.demo && sessions.is_none(),
        sessions,
        recv_buffer: cli
            .recv_buffer
            .or(file.recv_buffer_bytes)
            .unwrap_or(DEFAULT_RECV_BUFFER),
        send_buffer: cli
            .send_buffer
            .or(file.send_buffer_bytes)
            .unwrap_or(DEFAULT_SEND_BUFFER),
        stats_interval_secs: cli
            .stats_interval
            .or(file.stats_interval_secs)
            .unwrap_or(DEFAULT_STATS_INTERVAL_SECS),
        gso: match (cli.gso, cli.no_gso, file.gso) {
            (true, _, _) | (false, false, Some(true)) => Gso::On,
            (_, true, _) | (false, false, Some(false)) => Gso::Off,
            (false, false, None) => Gso::Auto,
        },
        metrics: cli.metrics.or(file.metrics),
        accounting_listen: cli.accounting_listen.clone(),
        control: cli.control.as_ref().map(|path| {
            let mut c = crate::control::ControlConfig::new(path.clone());
            if let Some(mode) = cli.control_mode {
                c.mode = mode;
            }
            c.owner = cli.control_owner;
            c
        }),
        clients,
        nas,
        dedup,
        data_plane: match (cli.data_plane, &cli.control) {
            (Some(DataPlaneMode::Agent), None) => {
                return Err(ConfigError::Other(
                    "--data-plane agent needs --control PATH: the agents that commit actions connect there".into(),
                ));
            }
            (Some(mode), _) => mode,
            (None, Some(_)) => DataPlaneMode::Agent,
            (None, None) => DataPlaneMode::Table,
        },
        action_deadline_ms: match &router {
            Some(r) => u64::try_from(r.forward_timeout.as_millis()).unwrap_or(u64::MAX),
            None => cli
                .action_deadline
                .unwrap_or(dynauth_proto::engine::DEFAULT_ACTION_DEADLINE_MS),
        },
        state: cli
            .state_dir
            .as_ref()
            .map(|dir| crate::state::StateOptions {
                table: overload.table_config(),
                dir: dir.clone(),
                commit_window: cli
                    .journal_commit_window
                    .map_or(crate::state::DEFAULT_COMMIT_WINDOW, Duration::from_millis),
                snapshot_interval: cli.snapshot_interval.map_or(
                    crate::state::DEFAULT_SNAPSHOT_INTERVAL,
                    Duration::from_millis,
                ),
                snapshot_journal_bytes: cli
                    .snapshot_journal_bytes
                    .unwrap_or(crate::state::DEFAULT_SNAPSHOT_JOURNAL_BYTES),
            }),
        router,
        audit: cli
            .audit_log
            .as_ref()
            .map(|path| crate::audit::AuditOptions {
                path: (path.as_os_str() != "-").then(|| path.clone()),
                max_bytes: cli
                    .audit_log_max_bytes
                    .unwrap_or(crate::audit::DEFAULT_MAX_BYTES),
                keep: cli.audit_log_keep.unwrap_or(crate::audit::DEFAULT_KEEP),
            }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse() {
        assert_eq!("auto".parse::<Shards>().unwrap(), Shards::Auto);
        assert_eq!("2".parse::<Shards>().unwrap(), Shards::Count(2));
        assert!("0".parse::<Shards>().is_err());
    }

    #[test]
    fn client_flag_parses_and_hides_secret() {
        let f = parse_client_flag("10.0.0.0/8=topsecret").unwrap();
        assert_eq!(f.network.to_string(), "10.0.0.0/8");
        assert!(!format!("{f:?}").contains("topsecret"));
        assert!(parse_client_flag("10.0.0.0/33=x").is_err());
        assert!(parse_client_flag("10.0.0.0/8=").is_err());
        assert!(parse_client_flag("10.0.0.0/8").is_err());
    }

    #[test]
    fn durable_state_defaults_to_the_largest_batch() {
        let settings = |args: &[&str]| {
            let mut all = vec!["dynauthd", "--client", "127.0.0.1/32=x"];
            all.extend_from_slice(args);
            settings_from(&Cli::parse_from(all)).unwrap()
        };
        assert_eq!(settings(&[]).batch, DEFAULT_BATCH);
        assert_eq!(
            settings(&["--state-dir", "/tmp/x"]).batch,
            DEFAULT_DURABLE_BATCH
        );
        assert_eq!(
            settings(&["--state-dir", "/tmp/x", "--batch", "32"]).batch,
            32
        );
    }

    #[test]
    fn affinity_flags() {
        let settings = |args: &[&str]| {
            let mut all = vec!["dynauthd", "--client", "127.0.0.1/32=x"];
            all.extend_from_slice(args);
            settings_from(&Cli::parse_from(all))
        };
        let s = settings(&[
            "--affinity-redis",
            "redis://127.0.0.1:6379",
            "--owner-id",
            "bng-a",
        ])
        .unwrap();
        let a = s.affinity.unwrap();
        assert_eq!(a.settings.prefix, "dynauth");
        assert_eq!(a.settings.ttl, Duration::from_secs(86_400));
        assert_eq!(a.owner_address, None);
        let err = settings(&["--affinity-redis", "redis://h"]).unwrap_err();
        assert!(err.to_string().contains("--owner-id"), "{err}");
        let err = settings(&[
            "--affinity-redis",
            "redis://h",
            "--owner-id",
            "a",
            "--listen",
            "0.0.0.0:3799",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("--owner-address"), "{err}");
        let err = settings(&[
            "--affinity-redis",
            "redis://h",
            "--owner-id",
            "a",
            "--owner-address",
            "0.0.0.0:3799",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("specific IP"), "{err}");
        assert!(
            settings(&["--owner-id", "a"]).is_err(),
            "owner flags need the URL"
        );
        assert!(settings(&["--affinity-redis", "redis://h", "--owner-id", "a|b"]).is_err());
        assert_eq!(parse_ttl("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_ttl("3600s"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_ttl("500ms").is_err(), "at least a second");
        assert!(parse_ttl("soon").is_err());
    }

    #[test]
    fn affinity_in_the_file_and_flags_override_it() {
        let dir = std::env::temp_dir().join(format!("dynauthd-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("affinity.toml");
        std::fs::write(
            &path,
            "[affinity]\nredis = \"redis://:pw@10.0.0.5:6379/0\"\nowner_id = \"bng-a\"\n\
             owner_address = \"192.0.2.10:3799\"\nprefix = \"dyn2\"\nttl = \"2h\"\n\
             [[client]]\nnetwork = \"127.0.0.1/32\"\nsecret = \"x\"\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let a = settings_from(&Cli::parse_from(["dynauthd", "--config", p]))
            .unwrap()
            .affinity
            .unwrap();
        assert_eq!(a.settings.url, "redis://:pw@10.0.0.5:6379/0");
        assert_eq!(a.settings.prefix, "dyn2");
        assert_eq!(a.settings.ttl, Duration::from_secs(7200));
        assert_eq!(a.owner_id, "bng-a");
        assert_eq!(a.owner_address, Some("192.0.2.10:3799".parse().unwrap()));
        let a = settings_from(&Cli::parse_from([
            "dynauthd",
            "--config",
            p,
            "--owner-id",
            "bng-b",
            "--affinity-ttl",
            "60s",
        ]))
        .unwrap()
        .affinity
        .unwrap();
        assert_eq!(
            (a.owner_id.as_str(), a.settings.ttl),
            ("bng-b", Duration::from_secs(60))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    // Issue 13: GSO is on by default (where the kernel has it), off with `--no-gso` or
    // `gso = false`; a flag beats the file.
    #[test]
    fn gso_is_on_by_default_and_flags_beat_the_file() {
        let dir = std::env::temp_dir().join(format!("dynauthd-gso-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let off = dir.join("off.toml");
        std::fs::write(
            &off,
            "gso = false\n[[client]]\nnetwork = \"127.0.0.1/32\"\nsecret = \"x\"\n",
        )
        .unwrap();
        let off = off.to_str().unwrap();
        let gso = |args: &[&str]| {
            let mut all = vec!["dynauthd"];
            if !args.contains(&"--config") {
                all.extend(["--client", "127.0.0.1/32=x"]);
            }
            all.extend_from_slice(args);
            settings_from(&Cli::parse_from(all)).unwrap().gso
        };
        assert_eq!(gso(&[]), Gso::Auto);
        assert!(gso(&[]).wanted());
        assert_eq!(gso(&["--gso"]), Gso::On);
        assert_eq!(gso(&["--no-gso"]), Gso::Off);
        assert!(!Gso::Off.wanted());
        assert_eq!(gso(&["--config", off]), Gso::Off);
        assert_eq!(gso(&["--config", off, "--gso"]), Gso::On);
        assert!(Cli::try_parse_from(["dynauthd", "--gso", "--no-gso"]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn line_numbers() {
        assert_eq!(line_of("a\nb\nc", 0), 1);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb\nc", 4), 3);
    }
}
