//! Counters for every discard reason and every answer (RFC 4673's DAS MIB set; SPEC §10), as
//! plain per-instance numbers that a runtime sums across shards, and their Prometheus text.
//!
//! Owns: the counter layout, merging, and the exposition format. Must not touch: decisions;
//! `decide` increments these and nothing else writes them.
#![forbid(unsafe_code)]

use core::fmt::Write as _;

use crate::dict::ErrorCause;

/// Why a datagram got no answer (SPEC §2; each is counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Discard {
    /// SPEC §2.1: the source is not a configured client.
    UnknownClient,
    /// SPEC §2.2: not a RADIUS packet (length rules).
    Malformed,
    /// SPEC §2.3: not a Disconnect-Request or CoA-Request.
    UnsupportedCode,
    /// SPEC §2.4: the Request Authenticator verifies with no live secret.
    BadRequestAuthenticator,
    /// SPEC §2.5: the Message-Authenticator is wrong, malformed or repeated.
    BadMessageAuthenticator,
    /// SPEC §2.5: absent while the client requires it.
    MissingMessageAuthenticator,
    /// SPEC §2.6: Event-Timestamp outside the window.
    EventTimestampOutsideWindow,
    /// SPEC §2.6: absent while the client requires it.
    MissingEventTimestamp,
    /// SPEC §2.7: a copy of this request is still being processed.
    DuplicateInFlight,
    /// More Proxy-State attributes than the client's cap.
    TooManyProxyStates,
    /// The answer would exceed 4096 octets or the caller's buffer.
    AnswerTooLarge,
    /// Checked before any session is touched: the largest answer this request could get (its
    /// States and Proxy-States echoed, plus every attribute the server may add) would not fit
    /// in 4096 octets or the caller's buffer, so it is not acted on (a change must never be
    /// committed without an answer to say so).
    AnswerWouldNotFit,
}

impl Discard {
    pub const ALL: [Discard; 12] = [
        Discard::UnknownClient,
        Discard::Malformed,
        Discard::UnsupportedCode,
        Discard::BadRequestAuthenticator,
        Discard::BadMessageAuthenticator,
        Discard::MissingMessageAuthenticator,
        Discard::EventTimestampOutsideWindow,
        Discard::MissingEventTimestamp,
        Discard::DuplicateInFlight,
        Discard::TooManyProxyStates,
        Discard::AnswerTooLarge,
        Discard::AnswerWouldNotFit,
    ];

    pub fn index(self) -> usize {
        Self::ALL.iter().position(|d| *d == self).unwrap_or(0)
    }

    /// A stable snake_case name for logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Discard::UnknownClient => "unknown_client",
            Discard::Malformed => "malformed",
            Discard::UnsupportedCode => "unsupported_code",
            Discard::BadRequestAuthenticator => "bad_request_authenticator",
            Discard::BadMessageAuthenticator => "bad_message_authenticator",
            Discard::MissingMessageAuthenticator => "missing_message_authenticator",
            Discard::EventTimestampOutsideWindow => "event_timestamp_outside_window",
            Discard::MissingEventTimestamp => "missing_event_timestamp",
            Discard::DuplicateInFlight => "duplicate_in_flight",
            Discard::TooManyProxyStates => "too_many_proxy_states",
            Discard::AnswerTooLarge => "answer_too_large",
            Discard::AnswerWouldNotFit => "answer_would_not_fit",
        }
    }
}

/// Disconnect or CoA: the two request kinds every counter is split by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestKind {
    Disconnect = 0,
    Coa = 1,
}

impl RequestKind {
    pub const fn name(self) -> &'static str {
        match self {
            RequestKind::Disconnect => "disconnect",
            RequestKind::Coa => "coa",
        }
    }
}

const KINDS: [RequestKind; 2] = [RequestKind::Disconnect, RequestKind::Coa];

/// One client's counters (RFC 4673 dynAuthServ* per client, split by request kind).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientCounters {
    /// Requests of a known code received (dynAuthServDisconRequests, ...CoARequests).
    pub requests: [u64; 2],
    /// CoA-Requests with Service-Type Authorize Only (dynAuthServCoAAuthOnlyRequests).
    pub authorize_only_requests: u64,
    pub acks: [u64; 2],
    /// NAKs by Error-Cause, indexed as `ErrorCause::ALL`.
    pub naks: [[u64; 16]; 2],
    /// Retransmissions answered from the duplicate cache (dynAuthServDupDisconRequests).
    pub duplicates: [u64; 2],
    /// Discards by reason, indexed as `Discard::ALL`.
    pub discards: [u64; Discard::ALL.len()],
    /// Sessions removed by Disconnect-Requests (dynAuthServDisconUserSessRemoved).
    pub sessions_removed: u64,
    /// Sessions changed by CoA-Requests.
    pub sessions_changed: u64,
}

impl ClientCounters {
    pub fn naks_total(&self, kind: RequestKind) -> u64 {
        self.naks[kind as usize].iter().sum()
    }

    pub fn discards_total(&self) -> u64 {
        self.discards.iter().sum()
    }

    pub fn nak(&self, kind: RequestKind, cause: ErrorCause) -> u64 {
        self.naks[kind as usize][cause.index()]
    }

    pub fn discarded(&self, reason: Discard) -> u64 {
        self.discards[reason.index()]
    }

    fn add(&mut self, o: &ClientCounters) {
        for k in 0..2 {
            self.requests[k] += o.requests[k];
            self.acks[k] += o.acks[k];
            self.duplicates[k] += o.duplicates[k];
            for (a, b) in self.naks[k].iter_mut().zip(o.naks[k]) {
                *a += b;
            }
        }
        for (a, b) in self.discards.iter_mut().zip(o.discards) {
            *a += b;
        }
        self.authorize_only_requests += o.authorize_only_requests;
        self.sessions_removed += o.sessions_removed;
        self.sessions_changed += o.sessions_changed;
    }
}

/// The counters of one engine instance (one shard).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Datagrams from sources that are not clients (dynAuthServInvalidClientAddresses).
    pub unknown_client: u64,
    /// Per client, indexed by `ClientId`.
    pub per_client: Vec<ClientCounters>,
}

impl Counters {
    pub fn new(clients: usize) -> Self {
        Counters {
            unknown_client: 0,
            per_client: vec![ClientCounters::default(); clients],
        }
    }

    /// Adds another shard's counters into these.
    pub fn merge(&mut self, other: &Counters) {
        self.unknown_client += other.unknown_client;
        if self.per_client.len() < other.per_client.len() {
            self.per_client
                .resize(other.per_client.len(), ClientCounters::default());
        }
        for (a, b) in self.per_client.iter_mut().zip(&other.per_client) {
            a.add(b);
        }
    }

    /// These counters for another client list of `to_len` clients: old client `i` becomes
    /// `to_index(i)`; the counts of a client with no new index (removed) are summed into the
    /// slot after the last client (index `to_len`), so totals never go down.
    pub fn reindexed(&self, to_len: usize, to_index: impl Fn(usize) -> Option<usize>) -> Counters {
        let mut out = Counters::new(to_len);
        for (i, c) in self.per_client.iter().enumerate() {
            let at = to_index(i).filter(|&j| j < to_len).unwrap_or(to_len);
            if out.per_client.len() <= at {
                out.per_client.resize(at + 1, ClientCounters::default());
            }
            if let Some(slot) = out.per_client.get_mut(at) {
                slot.add(c);
            }
        }
        out.unknown_client = self.unknown_client;
        out
    }

    /// Every client's counters summed.
    pub fn totals(&self) -> ClientCounters {
        let mut t = ClientCounters::default();
        for c in &self.per_client {
            t.add(c);
        }
        t
    }

    /// Prometheus text exposition (version 0.0.4). `client_names[i]` labels client `i`.
    pub fn write_prometheus(&self, client_names: &[&str], out: &mut String) {
        header(
            out,
            "dynauth_invalid_client_addresses_total",
            "Datagrams from unknown sources (RFC 4673 dynAuthServInvalidClientAddresses)",
        );
        let _ = writeln!(
            out,
            "dynauth_invalid_client_addresses_total {}",
            self.unknown_client
        );
        let clients: Vec<(String, &ClientCounters)> = self
            .per_client
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let name = client_names.get(i).copied().unwrap_or("unnamed");
                (name.replace('\\', "\\\\").replace('"', "\\\""), c)
            })
            .collect();
        let per_kind: [(&str, &str, PerKind); 3] = [
            ("dynauth_requests_total", "Requests received", |c| {
                &c.requests
            }),
            ("dynauth_acks_total", "ACKs sent", |c| &c.acks),
            (
                "dynauth_duplicates_total",
                "Retransmissions answered from the duplicate cache",
                |c| &c.duplicates,
            ),
        ];
        for (name, help, field) in per_kind {
            header(out, name, help);
            for (client, c) in &clients {
                for k in KINDS {
                    let v = field(c)[k as usize];
                    let _ = writeln!(
                        out,
                        "{name}{{client=\"{client}\",kind=\"{}\"}} {v}",
                        k.name()
                    );
                }
            }
        }
        let name = "dynauth_naks_total";
        header(out, name, "NAKs sent, by Error-Cause");
        for (client, c) in &clients {
            for k in KINDS {
                for cause in ErrorCause::ALL {
                    let _ = writeln!(
                        out,
                        "{name}{{client=\"{client}\",kind=\"{}\",error_cause=\"{}\"}} {}",
                        k.name(),
                        cause.value(),
                        c.nak(k, cause)
                    );
                }
            }
        }
        let name = "dynauth_discards_total";
        header(out, name, "Requests silently discarded, by reason");
        for (client, c) in &clients {
            for d in Discard::ALL {
                let _ = writeln!(
                    out,
                    "{name}{{client=\"{client}\",reason=\"{}\"}} {}",
                    d.name(),
                    c.discarded(d)
                );
            }
        }
        let name = "dynauth_sessions_total";
        header(out, name, "Sessions removed or changed");
        for (client, c) in &clients {
            for (action, v) in [
                ("removed", c.sessions_removed),
                ("changed", c.sessions_changed),
            ] {
                let _ = writeln!(out, "{name}{{client=\"{client}\",action=\"{action}\"}} {v}");
            }
        }
    }
}

/// Upper bounds of the latency buckets, in nanoseconds (the last bucket is unbounded).
pub const LATENCY_BOUNDS_NS: [u64; 14] = [
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    100_000_000,
];

/// A latency histogram with fixed buckets (SPEC §10): recording is a few comparisons and an
/// increment, nothing allocates, and shards' histograms add up like counters. Exported as a
/// Prometheus histogram.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Counts per bucket of `LATENCY_BOUNDS_NS`, plus one for everything above the last bound.
    pub buckets: [u64; 15],
    pub count: u64,
    pub sum_ns: u64,
}

impl LatencyHistogram {
    pub fn record(&mut self, ns: u64) {
        let i = LATENCY_BOUNDS_NS.partition_point(|&bound| bound < ns);
        if let Some(b) = self.buckets.get_mut(i) {
            *b += 1;
        }
        self.count += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
    }

    /// Records `n` observations of `ns` each (a batch's time shared among its datagrams).
    pub fn record_n(&mut self, ns: u64, n: u64) {
        let i = LATENCY_BOUNDS_NS.partition_point(|&bound| bound < ns);
        if let Some(b) = self.buckets.get_mut(i) {
            *b += n;
        }
        self.count += n;
        self.sum_ns = self.sum_ns.saturating_add(ns.saturating_mul(n));
    }

    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
    }

    /// The upper bound (ns) of the bucket holding quantile `q` (0..=1); `None` when empty or
    /// in the unbounded bucket.
    pub fn quantile_bound_ns(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return LATENCY_BOUNDS_NS.get(i).copied();
            }
        }
        None
    }

    /// Prometheus histogram text for metric `name` (in seconds).
    pub fn write_prometheus(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, n) in LATENCY_BOUNDS_NS.iter().zip(self.buckets) {
            cumulative += n;
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\"}} {cumulative}",
                *bound as f64 / 1e9
            );
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum_ns as f64 / 1e9);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// Reads one per-kind counter pair of a client.
type PerKind = fn(&ClientCounters) -> &[u64; 2];

fn header(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} counter");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_sums_shards() {
        let mut a = Counters::new(2);
        let mut b = Counters::new(2);
        a.per_client[0].acks[0] = 3;
        b.per_client[0].acks[0] = 4;
        b.per_client[1].naks[1][ErrorCause::SessionContextNotFound.index()] = 2;
        b.unknown_client = 5;
        a.merge(&b);
        assert_eq!(a.per_client[0].acks[0], 7);
        assert_eq!(
            a.totals()
                .nak(RequestKind::Coa, ErrorCause::SessionContextNotFound),
            2
        );
        assert_eq!(a.unknown_client, 5);
    }

    #[test]
    fn latency_histogram_buckets_merge_and_quantiles() {
        let mut a = LatencyHistogram::default();
        for ns in [500, 1_000, 1_001, 3_000, 3_000, 40_000, 200_000_000] {
            a.record(ns);
        }
        assert_eq!(
            a.buckets[0], 2,
            "bounds are inclusive: 500 and 1000 in le=1us"
        );
        assert_eq!(a.buckets[1], 1);
        assert_eq!(a.buckets[2], 2);
        assert_eq!(a.buckets[5], 1);
        assert_eq!(a.buckets[14], 1, "above every bound");
        assert_eq!(a.quantile_bound_ns(0.5), Some(5_000));
        assert_eq!(a.quantile_bound_ns(0.0), Some(1_000));
        assert_eq!(a.quantile_bound_ns(1.0), None);
        let mut b = LatencyHistogram::default();
        b.record(7_000);
        b.merge(&a);
        assert_eq!(b.count, 8);
        assert_eq!(b.buckets[3], 1);
        let mut text = String::new();
        b.write_prometheus("dynauth_decision_seconds", "x", &mut text);
        assert!(
            text.contains("dynauth_decision_seconds_bucket{le=\"0.000005\"} 5"),
            "{text}"
        );
        assert!(text.contains("dynauth_decision_seconds_bucket{le=\"+Inf\"} 8"));
        assert!(text.contains("dynauth_decision_seconds_count 8"));
        assert_eq!(LatencyHistogram::default().quantile_bound_ns(0.5), None);
    }

    /// `record_n` is `n` times `record` (a batch's time shared among its datagrams).
    #[test]
    fn record_n_is_n_records() {
        let (mut one_by_one, mut at_once) =
            (LatencyHistogram::default(), LatencyHistogram::default());
        for _ in 0..5 {
            one_by_one.record(3_000);
        }
        at_once.record_n(3_000, 5);
        at_once.record_n(9_000, 0);
        assert_eq!(one_by_one, at_once);
    }

    #[test]
    fn prometheus_text_has_labelled_series() {
        let mut c = Counters::new(1);
        c.per_client[0].discards[Discard::BadRequestAuthenticator.index()] = 9;
        c.per_client[0].naks[0][ErrorCause::SessionContextNotFound.index()] = 1;
        let mut out = String::new();
        c.write_prometheus(&["bng-\"a\""], &mut out);
        assert!(out.contains(
            "dynauth_discards_total{client=\"bng-\\\"a\\\"\",reason=\"bad_request_authenticator\"} 9"
        ));
        assert!(out.contains(
            "dynauth_naks_total{client=\"bng-\\\"a\\\"\",kind=\"disconnect\",error_cause=\"503\"} 1"
        ));
        assert!(out.contains("# TYPE dynauth_requests_total counter"));
    }
}
