//! Hostile and heavy input (issue #14): shedding by age under overload (RFC 5176 §3.5: NAK
//! 506 Resources Unavailable rather than answers that arrive after the DAC gave up), and the
//! size of the tombstone FIFO that answers late Disconnect retries with Error-Cause 201.
//!
//! Owns: the flags (`--shed-after`, `--shed-action`, `--tombstones`, the test-only
//! `--test-slow-decision-us`), their `[overload]` / `[tombstones]` file keys and defaults,
//! the per-datagram shedding decision ([`Shedder`]: the datagram's age from the kernel's
//! receive time, or the batch's age when the kernel gave none) and its counters. Must not
//! touch: packets (the engine's `Engine::shed` answers a shed request), sockets (the
//! kernel's receive times come from `dynauth_udp`), the store (a shed request never reaches
//! it: the decision is made before the engine is called).
#![forbid(unsafe_code)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dynauth_proto::client::Client;
use dynauth_proto::store::TombstonePolicy;
use dynauth_udp::Received;
use serde::Deserialize;

/// The default age after which a datagram is shed: half a DAC's usual 1 s timeout, so that
/// what is answered still arrives in time.
pub const DEFAULT_SHED_AFTER_MS: u64 = 500;

/// What happens to a datagram that waited longer than `--shed-after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShedAction {
    /// Authenticated, then answered NAK 506 without any session lookup (`Engine::shed`).
    #[default]
    Nak,
    /// Dropped unread: the cheapest; the DAC retries after its timeout.
    Drop,
}

impl ShedAction {
    pub fn name(self) -> &'static str {
        match self {
            ShedAction::Nak => "nak",
            ShedAction::Drop => "drop",
        }
    }
}

/// The command-line flags (flattened into `config::Cli`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct OverloadArgs {
    /// Shed a request that waited longer than this in the socket queue (kernel receive time
    /// to decision): answered NAK 506 or dropped (--shed-action), never looked up. `0`: never
    /// shed. Default 500ms. See docs/RUNNING.md, "Overload".
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_or_zero)]
    pub shed_after: Option<u64>,
    /// What a shed request gets: `nak` (NAK 506, the default) or `drop` (nothing).
    #[arg(long, value_enum, value_name = "nak|drop")]
    pub shed_action: Option<ShedAction>,
    /// How many tombstones (removed sessions remembered for Error-Cause 201) the table keeps
    /// at most (default 4194304; each costs about 250 octets resident). See docs/RUNNING.md,
    /// "Tombstones".
    #[arg(long, value_name = "N")]
    pub tombstones: Option<usize>,
    /// Test only: sleep this many microseconds per datagram decided in full (not per shed
    /// one), to make a server slow enough that a load test on a small machine can offer it
    /// twice its capacity. Never use it in production.
    #[arg(long, value_name = "US", hide = true)]
    pub test_slow_decision_us: Option<u64>,
}

fn parse_duration_or_zero(s: &str) -> Result<u64, String> {
    crate::config::parse_duration_ms(s)
        .ok()
        .filter(|&ms| ms <= 86_400_000)
        .ok_or_else(|| format!("{s:?}: expected a duration such as 500ms or 1s (0: off)"))
}

/// `[overload]` in the TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverloadFile {
    /// Milliseconds; 0: never shed.
    shed_after_ms: Option<u64>,
    shed_action: Option<ShedAction>,
}

/// `[tombstones]` in the TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TombstonesFile {
    max: Option<usize>,
}

/// The overload settings dynauthd runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverloadSettings {
    /// Shed after this age (`None`: never).
    pub shed_after: Option<Duration>,
    pub shed_action: ShedAction,
    /// The table's tombstones: `--tombstones` of them, kept for the longest replay window
    /// (Event-Timestamp window) of the configured clients; each request honours its own
    /// client's window within that.
    pub tombstones: TombstonePolicy,
    /// Test only (`--test-slow-decision-us`).
    pub test_slow_decision: Duration,
}

impl Default for OverloadSettings {
    fn default() -> Self {
        OverloadSettings {
            shed_after: Some(Duration::from_millis(DEFAULT_SHED_AFTER_MS)),
            shed_action: ShedAction::Nak,
            tombstones: TombstonePolicy::default(),
            test_slow_decision: Duration::ZERO,
        }
    }
}

impl OverloadSettings {
    /// Flags over the file over the defaults; the tombstone window from `clients`.
    pub fn combine(
        args: &OverloadArgs,
        overload: &OverloadFile,
        tombstones: &TombstonesFile,
        clients: &[Client],
    ) -> OverloadSettings {
        let shed_after_ms = args
            .shed_after
            .or(overload.shed_after_ms)
            .unwrap_or(DEFAULT_SHED_AFTER_MS);
        let window_ms = clients
            .iter()
            .map(|c| u64::from(c.policy.event_timestamp_window_secs) * 1000)
            .max()
            .unwrap_or(TombstonePolicy::default().window_ms);
        OverloadSettings {
            shed_after: (shed_after_ms > 0).then(|| Duration::from_millis(shed_after_ms)),
            shed_action: args
                .shed_action
                .or(overload.shed_action)
                .unwrap_or_default(),
            tombstones: TombstonePolicy {
                window_ms,
                capacity: args
                    .tombstones
                    .or(tombstones.max)
                    .unwrap_or(TombstonePolicy::default().capacity),
            },
            test_slow_decision: Duration::from_micros(args.test_slow_decision_us.unwrap_or(0)),
        }
    }

    /// The session table's settings.
    pub fn table_config(&self) -> dynauth_table::TableConfig {
        dynauth_table::TableConfig {
            tombstones: self.tombstones,
            ..dynauth_table::TableConfig::default()
        }
    }
}

/// Datagrams shed by one shard, by action (`dynauth_shed_total{action}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShedStats {
    /// Shed with `nak`: authenticated and answered NAK 506 (or its cached answer, or a
    /// discard with its own reason), never looked up.
    pub nak: u64,
    /// Shed with `drop`: not read further.
    pub drop: u64,
    /// Of all datagrams checked, how many had no kernel receive time (aged by their batch).
    pub without_timestamp: u64,
}

impl ShedStats {
    pub fn add(&mut self, o: &ShedStats) {
        self.nak += o.nak;
        self.drop += o.drop;
        self.without_timestamp += o.without_timestamp;
    }

    /// Prometheus text.
    pub fn write_prometheus(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "# HELP dynauth_shed_total Requests shed because they waited longer than --shed-after (RFC 5176 section 3.5), by action.\n# TYPE dynauth_shed_total counter\ndynauth_shed_total{{action=\"nak\"}} {}\ndynauth_shed_total{{action=\"drop\"}} {}",
            self.nak, self.drop
        );
        let _ = writeln!(
            out,
            "# HELP dynauth_shed_untimed_total Datagrams without a kernel receive time (aged by their batch).\n# TYPE dynauth_shed_untimed_total counter\ndynauth_shed_untimed_total {}",
            self.without_timestamp
        );
    }
}

/// One shard's shedding decision and the test-only slowdown.
#[derive(Debug, Clone)]
pub struct Shedder {
    after_ns: Option<u64>,
    pub action: ShedAction,
    slow: Duration,
    /// The batch being decided: its start, wall clock (ns) and monotonic.
    batch_wall_ns: u64,
    batch_started: Instant,
    /// Datagrams of this batch decided in full (for the test-only slowdown).
    decided: u32,
    pub stats: ShedStats,
}

impl Shedder {
    pub fn new(settings: &OverloadSettings) -> Self {
        Shedder {
            after_ns: settings
                .shed_after
                .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            action: settings.shed_action,
            slow: settings.test_slow_decision,
            batch_wall_ns: 0,
            batch_started: Instant::now(),
            decided: 0,
            stats: ShedStats::default(),
        }
    }

    /// At the start of a batch that began at `started` (the caller's clock read); the wall
    /// clock is read only when shedding is on.
    pub fn start_batch(&mut self, started: Instant) {
        self.batch_started = started;
        if self.after_ns.is_some() {
            self.batch_wall_ns = wall_ns();
        }
        self.decided = 0;
    }

    /// Whether [`Shedder::should_shed`] looks at its clock argument (shedding is on): when
    /// not, the caller need not read the clock per datagram.
    pub fn needs_clock(&self) -> bool {
        self.after_ns.is_some()
    }

    /// Whether `d` waited too long at `now` (the caller's clock read for this datagram): its
    /// age is the wall clock now minus the kernel's receive time, or (no receive time) the
    /// time since its batch began to be decided. Counts the shed datagram under the action
    /// the caller then applies.
    pub fn should_shed(&mut self, d: &Received<'_>, now: Instant) -> bool {
        let Some(after) = self.after_ns else {
            self.decided += 1;
            return false;
        };
        let elapsed = u64::try_from(now.saturating_duration_since(self.batch_started).as_nanos())
            .unwrap_or(u64::MAX);
        let age = match d.received_ns {
            // The batch's wall-clock start plus the time since: one clock read per batch.
            Some(at) => self
                .batch_wall_ns
                .saturating_add(elapsed)
                .saturating_sub(at),
            None => {
                self.stats.without_timestamp += 1;
                elapsed
            }
        };
        if age <= after {
            self.decided += 1;
            return false;
        }
        match self.action {
            ShedAction::Nak => self.stats.nak += 1,
            ShedAction::Drop => self.stats.drop += 1,
        }
        true
    }

    /// At the end of a batch: the test-only slowdown for the datagrams decided in full.
    pub fn end_batch(&mut self) {
        if !self.slow.is_zero() && self.decided > 0 {
            std::thread::sleep(self.slow * self.decided);
        }
    }
}

/// The table's tombstones in Prometheus text: how many are kept now, and how many left,
/// by reason (`expired` at the end of their window, `early`: evicted within it because the
/// capacity was too small for the removal rate, so late retries of those got 503, not 201).
pub fn write_tombstone_prometheus(table: &dynauth_table::SessionTable, out: &mut String) {
    use std::fmt::Write as _;
    let stats = table.tombstone_stats();
    let config = table.config().tombstones;
    let _ = writeln!(
        out,
        "# HELP dynauth_tombstones Tombstones kept now (removed sessions remembered for Error-Cause 201).\n# TYPE dynauth_tombstones gauge\ndynauth_tombstones {}\n# HELP dynauth_tombstones_capacity The most tombstones kept (--tombstones).\n# TYPE dynauth_tombstones_capacity gauge\ndynauth_tombstones_capacity {}\n# HELP dynauth_tombstones_evicted_total Tombstones that left, by reason: expired (end of the window) or early (evicted within the window at capacity: the window was cut short).\n# TYPE dynauth_tombstones_evicted_total counter\ndynauth_tombstones_evicted_total{{reason=\"expired\"}} {}\ndynauth_tombstones_evicted_total{{reason=\"early\"}} {}",
        table.stats().tombstones,
        config.capacity,
        stats.expired,
        stats.evicted_early
    );
}

fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn datagram(received_ns: Option<u64>) -> Received<'static> {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        Received {
            data: &[],
            source: a,
            destination: a,
            received_ns,
        }
    }

    // RFC 5176 §3.5 shedding: a datagram older than --shed-after by its kernel receive time
    // is shed and counted under its action; a fresh one is not; `0` never sheds.
    #[test]
    fn rfc5176_s3_5_shed_by_kernel_receive_age() {
        let mut settings = OverloadSettings::default();
        let mut s = Shedder::new(&settings);
        s.start_batch(Instant::now());
        let now = wall_ns();
        assert!(!s.should_shed(&datagram(Some(now)), Instant::now()));
        assert!(!s.should_shed(&datagram(Some(now - 400_000_000)), Instant::now()));
        assert!(s.should_shed(&datagram(Some(now - 600_000_000)), Instant::now()));
        assert_eq!(s.stats.nak, 1);
        settings.shed_action = ShedAction::Drop;
        let mut s = Shedder::new(&settings);
        s.start_batch(Instant::now());
        assert!(s.should_shed(&datagram(Some(now - 2_000_000_000)), Instant::now()));
        assert_eq!((s.stats.nak, s.stats.drop), (0, 1));
        settings.shed_after = None;
        let mut s = Shedder::new(&settings);
        s.start_batch(Instant::now());
        assert!(!s.should_shed(&datagram(Some(0)), Instant::now()));
    }

    // Without a kernel receive time, a datagram is aged by its batch (the time since the
    // batch began to be decided), and counted as untimed.
    #[test]
    fn rfc5176_s3_5_without_timestamps_the_batch_age_is_used() {
        let settings = OverloadSettings {
            shed_after: Some(Duration::from_millis(20)),
            ..OverloadSettings::default()
        };
        let mut s = Shedder::new(&settings);
        s.start_batch(Instant::now());
        assert!(!s.should_shed(&datagram(None), Instant::now()));
        std::thread::sleep(Duration::from_millis(30));
        assert!(s.should_shed(&datagram(None), Instant::now()));
        assert_eq!(s.stats.without_timestamp, 2);
    }

    // SPEC §4.6: the tombstone window is the longest client replay window; the capacity
    // comes from the flag over the file over the default.
    #[test]
    fn spec_4_6_tombstone_window_is_the_longest_client_window() {
        let secret = dynauth_proto::auth::Secret::new("s").unwrap();
        let mut a = Client::new("192.0.2.0/24".parse().unwrap(), secret.clone());
        a.policy.event_timestamp_window_secs = 30;
        let mut b = Client::new("198.51.100.0/24".parse().unwrap(), secret);
        b.policy.event_timestamp_window_secs = 600;
        let file = TombstonesFile { max: Some(10) };
        let s = OverloadSettings::combine(
            &OverloadArgs::default(),
            &OverloadFile::default(),
            &file,
            &[a.clone(), b],
        );
        assert_eq!(s.tombstones.window_ms, 600_000);
        assert_eq!(s.tombstones.capacity, 10);
        let args = OverloadArgs {
            tombstones: Some(20),
            shed_after: Some(0),
            ..OverloadArgs::default()
        };
        let s = OverloadSettings::combine(&args, &OverloadFile::default(), &file, &[a]);
        assert_eq!(
            s.tombstones,
            TombstonePolicy {
                window_ms: 30_000,
                capacity: 20
            }
        );
        assert_eq!(s.shed_after, None);
    }
}
