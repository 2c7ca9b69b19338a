//! The router role (`dynauthd --role router`): a DAS front-end that owns no sessions. Each
//! request is authenticated and checked by the same engine as on an owner (client table,
//! authenticators, duplicate cache, request rules; not the NAS check, which is the owner's),
//! then routed: its routing keys are looked up in the affinity store (a local cache first,
//! Redis on a miss), it is forwarded to the owning instance with the router's Proxy-State
//! appended and re-signed with the owner's secret (RFC 5176 §3.1), and the owner's answer is
//! relayed back, re-signed with the DAC's secret. Plain RFC 5176 DASes (a NAS whose sessions
//! are not published) are reached by the NAS the request names (`--nas-route`, RFC 8559).
//!
//! Errors (RFC 5176 §3.5): no owner known and no NAS route: NAK 502 (Request Not Routable);
//! the owner gone, Redis unreachable, or no valid answer by `--forward-timeout`: NAK 505
//! (Other Proxy Processing Error), or with `--on-owner-timeout drop` no answer at all for
//! the timeout case, so the DAC retries (possibly through another router); the keys of one
//! request lead to several owners: NAK 508 (a router does not split one request across
//! owners: an all-or-none change across them would need a distributed commit).
//!
//! Owns: routing settings, the worker thread (`worker`), the affinity cache (`cache`), the
//! router's metrics. Must not touch: sessions (it has none), the wire format (the sans-IO
//! rewrites are `dynauth_proto::route`'s), syscalls beyond std's UDP sockets.
#![forbid(unsafe_code)]

mod cache;
mod worker;

use core::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dynauth_proto::auth::Secret;

use crate::affinity::AffinitySettings;

pub use worker::{RouteSink, Router, RouterInbox, RouterSetup, channel};

/// Where a request goes when no owner of its session is known: the NAS it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NasMatch {
    /// NAS-Identifier.
    Identifier(String),
    /// NAS-IP-Address or NAS-IPv6-Address.
    Ip(IpAddr),
    /// Operator-Name (RFC 8559 §3.1), as sent (namespace octet first, e.g. `1example.net`).
    OperatorName(String),
}

/// One `--nas-route`: requests naming this NAS go to its DAS.
#[derive(Clone)]
pub struct NasRoute {
    pub matcher: NasMatch,
    pub address: SocketAddr,
    pub secret: Secret,
}

impl fmt::Debug for NasRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NasRoute")
            .field("matcher", &self.matcher)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// What the router does when an owner does not answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnOwnerTimeout {
    /// NAK 505 (Other Proxy Processing Error).
    #[default]
    Nak,
    /// No answer: the DAC retries (to this router or another), and the retry is forwarded
    /// anew.
    Drop,
}

/// Everything the router role runs with.
#[derive(Clone)]
pub struct RouterSettings {
    pub affinity: AffinitySettings,
    /// The secret the router shares with every owner (each owner lists the router as a
    /// client with it).
    pub owner_secret: Secret,
    pub nas_routes: Vec<NasRoute>,
    /// Owners that only learn sessions (from the NASes' RADIUS Accounting) and act on none:
    /// a session they published goes to its NAS's DAS by `nas_routes` (the zero-integration
    /// DAS proxy).
    pub learners: Vec<String>,
    pub forward_timeout: Duration,
    pub on_owner_timeout: OnOwnerTimeout,
    /// The local address forwarded requests leave from (port 0: any).
    pub forward_bind: SocketAddr,
    /// How long a cached route is trusted without hearing an invalidation.
    pub cache_ttl: Duration,
    pub cache_entries: usize,
}

impl fmt::Debug for RouterSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouterSettings")
            .field(
                "redis",
                &crate::affinity::publish::redact_url(&self.affinity.url),
            )
            .field("prefix", &self.affinity.prefix)
            .field("nas_routes", &self.nas_routes)
            .field("forward_timeout", &self.forward_timeout)
            .field("on_owner_timeout", &self.on_owner_timeout)
            .field("forward_bind", &self.forward_bind)
            .finish_non_exhaustive()
    }
}

pub const DEFAULT_FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(30);
pub const DEFAULT_CACHE_ENTRIES: usize = 1_000_000;

/// The role of this dynauthd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Owns sessions and answers for them.
    #[default]
    Das,
    /// Forwards each request to the instance that owns its session.
    Router,
}

fn parse_role(s: &str) -> Result<Role, String> {
    match s {
        "das" => Ok(Role::Das),
        "router" => Ok(Role::Router),
        other => Err(format!("{other:?}: expected das or router")),
    }
}

/// The router role's command-line flags (flattened into `config::Cli`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RouterArgs {
    /// `das` (the default: owns sessions and answers for them) or `router` (owns none:
    /// forwards each request to the instance that owns its session, found in Redis;
    /// docs/SCALE_OUT.md).
    #[arg(long, value_name = "das|router", value_parser = parse_role)]
    pub role: Option<Role>,
    /// Router: the file holding the secret shared with every owner and NAS route (each of
    /// them lists the router's address as a client with this secret).
    #[arg(long, value_name = "FILE")]
    pub owner_secret_file: Option<PathBuf>,
    /// Router: how long an owner has to answer (e.g. 2s, 500ms; default 2s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub forward_timeout: Option<Duration>,
    /// Router: `nak` (NAK 505 when an owner does not answer in time; the default) or `drop`
    /// (no answer, so the DAC retries, perhaps through another router).
    #[arg(long, value_name = "nak|drop", value_parser = parse_on_timeout)]
    pub on_owner_timeout: Option<OnOwnerTimeout>,
    /// Router: where requests for a NAS's sessions go when no owner is known for them:
    /// `nas_identifier=ID@ADDR:PORT`, `nas_ip=IP@ADDR:PORT` or `operator_name=NAME@ADDR:PORT`
    /// (RFC 8559); repeatable, the first match wins.
    #[arg(long, value_name = "MATCH@ADDR:PORT", value_parser = parse_nas_route)]
    pub nas_route: Vec<(NasMatch, SocketAddr)>,
    /// Router: an owner id whose sessions were learnt from RADIUS Accounting (a dynauthd
    /// with --accounting-listen publishing them) and are acted on by their NAS itself: a
    /// request for one goes to that NAS's --nas-route (by its NAS-Identifier or address);
    /// repeatable.
    #[arg(long, value_name = "OWNER_ID")]
    pub learner: Vec<String>,
    /// Router: the local address forwarded requests leave from (default: any, port 0).
    #[arg(long, value_name = "ADDR:PORT")]
    pub forward_bind: Option<SocketAddr>,
    /// Router: how long a cached route is used without an invalidation (default 30s; 0s:
    /// no cache, every request asks Redis).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_or_zero)]
    pub affinity_cache_ttl: Option<Duration>,
    /// Router: most routing keys cached (default 1,000,000).
    #[arg(long, value_name = "N")]
    pub affinity_cache_entries: Option<usize>,
}

fn parse_on_timeout(s: &str) -> Result<OnOwnerTimeout, String> {
    match s {
        "nak" => Ok(OnOwnerTimeout::Nak),
        "drop" => Ok(OnOwnerTimeout::Drop),
        other => Err(format!("{other:?}: expected nak or drop")),
    }
}

/// `2s`, `500ms` (positive).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration_or_zero(s)?;
    if d.is_zero() {
        return Err(format!("{s:?}: must be more than zero"));
    }
    Ok(d)
}

fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration_ms(s).map(Duration::from_millis)
}

/// Why the router role cannot start with these flags.
#[derive(Debug, thiserror::Error)]
pub enum RouterConfigError {
    #[error("--role router needs --affinity-redis URL (where the owners publish affinity)")]
    NoRedis,
    #[error("--role router needs --owner-secret-file FILE (the secret shared with the owners)")]
    NoOwnerSecret,
    /// A secret file or the Redis URL that cannot be used.
    #[error("{0}")]
    Secret(String),
    #[error("--{0} does not apply to --role router (a router reads affinity, it owns none)")]
    OwnerFlag(&'static str),
    #[error("--{0} applies to --role router only")]
    NotARouter(&'static str),
    #[error("--{0} does not apply to --role router (a router owns no sessions)")]
    NotForARouter(&'static str),
}

impl RouterArgs {
    /// The router settings, or `None` for the DAS role. `listen` picks the default
    /// forwarding address family.
    ///
    /// `affinity` is `--affinity-redis` and `--affinity-prefix` (the owners' flags: on a
    /// router they say where to read).
    pub fn settings(
        &self,
        affinity: (Option<String>, Option<String>),
        listen: &[SocketAddr],
    ) -> Result<Option<RouterSettings>, RouterConfigError> {
        if self.role.unwrap_or_default() != Role::Router {
            let router_only: [(&'static str, bool); 8] = [
                ("owner-secret-file", self.owner_secret_file.is_some()),
                ("forward-timeout", self.forward_timeout.is_some()),
                ("on-owner-timeout", self.on_owner_timeout.is_some()),
                ("nas-route", !self.nas_route.is_empty()),
                ("learner", !self.learner.is_empty()),
                ("forward-bind", self.forward_bind.is_some()),
                ("affinity-cache-ttl", self.affinity_cache_ttl.is_some()),
                (
                    "affinity-cache-entries",
                    self.affinity_cache_entries.is_some(),
                ),
            ];
            if let Some((flag, _)) = router_only.iter().find(|(_, set)| *set) {
                return Err(RouterConfigError::NotARouter(flag));
            }
            return Ok(None);
        }
        let (url, prefix) = affinity;
        let url = url.ok_or(RouterConfigError::NoRedis)?;
        crate::affinity::publish::check_url(&url)
            .map_err(|e| RouterConfigError::Secret(e.to_string()))?;
        let path = self
            .owner_secret_file
            .as_ref()
            .ok_or(RouterConfigError::NoOwnerSecret)?;
        let owner_secret = read_secret_file(path).map_err(RouterConfigError::Secret)?;
        let mut affinity = AffinitySettings::new(url);
        if let Some(p) = prefix {
            affinity.prefix = p;
        }
        let v6 = listen.first().is_some_and(SocketAddr::is_ipv6);
        let any: IpAddr = if v6 {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
        };
        Ok(Some(RouterSettings {
            affinity,
            nas_routes: self
                .nas_route
                .iter()
                .map(|(matcher, address)| NasRoute {
                    matcher: matcher.clone(),
                    address: *address,
                    secret: owner_secret.clone(),
                })
                .collect(),
            owner_secret,
            learners: self.learner.clone(),
            forward_timeout: self.forward_timeout.unwrap_or(DEFAULT_FORWARD_TIMEOUT),
            on_owner_timeout: self.on_owner_timeout.unwrap_or_default(),
            forward_bind: self.forward_bind.unwrap_or(SocketAddr::new(any, 0)),
            cache_ttl: self.affinity_cache_ttl.unwrap_or(DEFAULT_CACHE_TTL),
            cache_entries: self.affinity_cache_entries.unwrap_or(DEFAULT_CACHE_ENTRIES),
        }))
    }
}

/// `--nas-route MATCH@ADDR:PORT`, MATCH one of `nas_identifier=ID`, `nas_ip=IP`,
/// `operator_name=NAME`.
pub fn parse_nas_route(s: &str) -> Result<(NasMatch, SocketAddr), String> {
    let (matcher, address) = s.rsplit_once('@').ok_or_else(|| {
        format!("{s:?}: expected MATCH@ADDR:PORT, e.g. nas_identifier=bng-7@192.0.2.7:3799")
    })?;
    let address: SocketAddr = address
        .parse()
        .map_err(|e| format!("{s:?}: bad address {address:?}: {e}"))?;
    let (key, value) = matcher
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected nas_identifier=, nas_ip= or operator_name="))?;
    if value.is_empty() {
        return Err(format!("{s:?}: the value after {key}= is empty"));
    }
    let matcher = match key {
        "nas_identifier" => NasMatch::Identifier(value.into()),
        "nas_ip" => NasMatch::Ip(
            value
                .parse()
                .map_err(|e| format!("{s:?}: bad NAS address {value:?}: {e}"))?,
        ),
        "operator_name" => NasMatch::OperatorName(value.into()),
        other => {
            return Err(format!(
                "{s:?}: unknown match {other:?}: use nas_identifier, nas_ip or operator_name"
            ));
        }
    };
    Ok((matcher, address))
}

/// Reads the owner secret file (one line; surrounding whitespace trimmed).
pub fn read_secret_file(path: &PathBuf) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the owner secret file {}: {e}", path.display()))?;
    Secret::new(text.trim())
        .map_err(|_| format!("the owner secret file {} is empty", path.display()))
}

/// The router's counters (Prometheus text).
#[derive(Debug, Default)]
pub struct RouterStats {
    pub forwarded: AtomicU64,
    pub relayed: AtomicU64,
    pub not_routable: AtomicU64,
    pub multiple_owners: AtomicU64,
    pub owner_timeouts: AtomicU64,
    pub owner_timeouts_dropped: AtomicU64,
    pub owner_gone: AtomicU64,
    pub store_unavailable: AtomicU64,
    pub nas_routed: AtomicU64,
    pub rerouted: AtomicU64,
    pub bad_owner_answers: AtomicU64,
    pub late_owner_answers: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub cache_invalidations: AtomicU64,
    pub redis_round_trips: AtomicU64,
    pub redis_errors: AtomicU64,
    pub redis_micros: AtomicU64,
    /// Redis round trips by latency bucket (upper bounds `REDIS_BUCKETS_US`, then +Inf).
    pub redis_buckets: [AtomicU64; REDIS_BUCKETS_US.len() + 1],
    pub send_errors: AtomicU64,
    pub in_flight: AtomicU64,
    pub cache_entries: AtomicU64,
    /// 1 while the invalidation channel is followed.
    pub subscribed: AtomicU64,
}

/// Upper bounds of the Redis latency histogram, microseconds.
pub const REDIS_BUCKETS_US: [u64; 8] = [50, 100, 250, 500, 1_000, 2_500, 10_000, 100_000];

impl RouterStats {
    pub(crate) fn redis_round_trip(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.redis_round_trips.fetch_add(1, Ordering::Relaxed);
        self.redis_micros.fetch_add(us, Ordering::Relaxed);
        let bucket = REDIS_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(REDIS_BUCKETS_US.len());
        if let Some(b) = self.redis_buckets.get(bucket) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn write_prometheus(&self, out: &mut String) {
        use core::fmt::Write as _;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let counters: [(&str, &str, &AtomicU64); 18] = [
            (
                "forwarded",
                "Requests forwarded to an owner or a NAS's DAS",
                &self.forwarded,
            ),
            ("relayed", "Owner answers relayed to the DAC", &self.relayed),
            (
                "not_routable",
                "NAK 502: no owner known, no NAS route",
                &self.not_routable,
            ),
            (
                "multiple_owners",
                "NAK 508: the request's keys lead to several owners",
                &self.multiple_owners,
            ),
            (
                "owner_timeouts",
                "Owners that gave no valid answer in time (NAK 505 or dropped)",
                &self.owner_timeouts,
            ),
            (
                "owner_timeouts_dropped",
                "Of those, left unanswered so the DAC retries (--on-owner-timeout drop)",
                &self.owner_timeouts_dropped,
            ),
            (
                "owner_gone",
                "NAK 505: the owner's address expired (it stopped)",
                &self.owner_gone,
            ),
            (
                "store_unavailable",
                "NAK 505: the affinity store could not be read",
                &self.store_unavailable,
            ),
            (
                "nas_routed",
                "Requests routed by the NAS they name (--nas-route)",
                &self.nas_routed,
            ),
            (
                "rerouted",
                "NAK 503 from a cached owner, looked up again in Redis",
                &self.rerouted,
            ),
            (
                "bad_owner_answers",
                "Datagrams on the forwarding sockets that did not verify (ignored)",
                &self.bad_owner_answers,
            ),
            (
                "late_owner_answers",
                "Owner answers after the request was settled (ignored)",
                &self.late_owner_answers,
            ),
            (
                "cache_hits",
                "Routing keys found in the local affinity cache",
                &self.cache_hits,
            ),
            (
                "cache_misses",
                "Routing keys looked up in Redis",
                &self.cache_misses,
            ),
            (
                "cache_invalidations",
                "Cached routing keys dropped on an owner's invalidation",
                &self.cache_invalidations,
            ),
            (
                "redis_round_trips",
                "Pipelined Redis round trips",
                &self.redis_round_trips,
            ),
            (
                "redis_errors",
                "Redis commands that failed (connection lost, timeout)",
                &self.redis_errors,
            ),
            (
                "send_errors",
                "Datagrams that could not be sent",
                &self.send_errors,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP dynauth_router_{name}_total {help}.\n# TYPE dynauth_router_{name}_total counter\ndynauth_router_{name}_total {}",
                get(v)
            );
        }
        let hits = get(&self.cache_hits);
        let misses = get(&self.cache_misses);
        let ratio = if hits + misses == 0 {
            0.0
        } else {
            hits as f64 / (hits + misses) as f64
        };
        let _ = writeln!(
            out,
            "# HELP dynauth_router_cache_hit_ratio Share of routing keys answered by the local cache.\n# TYPE dynauth_router_cache_hit_ratio gauge\ndynauth_router_cache_hit_ratio {ratio}"
        );
        let _ = writeln!(
            out,
            "# HELP dynauth_router_cache_entries Routing keys in the local affinity cache.\n# TYPE dynauth_router_cache_entries gauge\ndynauth_router_cache_entries {}",
            get(&self.cache_entries)
        );
        let _ = writeln!(
            out,
            "# HELP dynauth_router_invalidations_followed 1 while the invalidation channel is followed (0: the cache is not kept fresh by owners).\n# TYPE dynauth_router_invalidations_followed gauge\ndynauth_router_invalidations_followed {}",
            get(&self.subscribed)
        );
        let _ = writeln!(
            out,
            "# HELP dynauth_router_in_flight Requests forwarded and not yet answered.\n# TYPE dynauth_router_in_flight gauge\ndynauth_router_in_flight {}",
            get(&self.in_flight)
        );
        let _ = writeln!(
            out,
            "# HELP dynauth_router_redis_seconds Latency of pipelined Redis round trips.\n# TYPE dynauth_router_redis_seconds histogram"
        );
        let mut cumulative = 0;
        for (i, b) in self.redis_buckets.iter().enumerate() {
            cumulative += get(b);
            let le = REDIS_BUCKETS_US
                .get(i)
                .map_or("+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
            let _ = writeln!(
                out,
                "dynauth_router_redis_seconds_bucket{{le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "dynauth_router_redis_seconds_sum {}\ndynauth_router_redis_seconds_count {}",
            get(&self.redis_micros) as f64 / 1e6,
            get(&self.redis_round_trips)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nas_route_flag() {
        assert_eq!(
            parse_nas_route("nas_identifier=bng-7@127.0.0.1:3799").unwrap(),
            (
                NasMatch::Identifier("bng-7".into()),
                "127.0.0.1:3799".parse().unwrap()
            )
        );
        assert_eq!(
            parse_nas_route("nas_ip=192.0.2.7@[::1]:3799").unwrap().0,
            NasMatch::Ip("192.0.2.7".parse().unwrap())
        );
        assert!(parse_nas_route("nas_identifier=@127.0.0.1:3799").is_err());
        assert!(parse_nas_route("vrf=x@127.0.0.1:3799").is_err());
        assert!(parse_nas_route("nas_identifier=x").is_err());
    }

    #[test]
    fn redis_histogram_is_cumulative() {
        let s = RouterStats::default();
        s.redis_round_trip(Duration::from_micros(40));
        s.redis_round_trip(Duration::from_micros(700));
        let mut out = String::new();
        s.write_prometheus(&mut out);
        assert!(
            out.contains("dynauth_router_redis_seconds_bucket{le=\"0.00005\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("dynauth_router_redis_seconds_bucket{le=\"0.001\"} 2"),
            "{out}"
        );
        assert!(
            out.contains("dynauth_router_redis_seconds_count 2"),
            "{out}"
        );
    }
}
