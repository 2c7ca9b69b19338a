//! The time series of a run: per 100 ms bucket, requests sent and answers received (by the
//! time they happened), and the latency of the requests intended in that bucket (p50/p99,
//! timeouts and unsent requests at least the timeout) with how many of them timed out, so
//! a storm's shape shows, not only its averages.
//!
//! Memory is bounded: past [`MAX_BUCKETS`] buckets, neighbours merge in pairs and the
//! bucket width doubles (a 10 minute run has 800 ms buckets).
#![forbid(unsafe_code)]

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::report::HIST_MAX_NS;

/// The bucket width a run starts with.
pub const BUCKET_NS: u64 = 100_000_000;
/// Most buckets kept; beyond, the width doubles.
pub const MAX_BUCKETS: usize = 1200;

#[derive(Debug, Clone, Default)]
struct Bucket {
    sent: u64,
    answered: u64,
    timeouts: u64,
    /// Latency of the requests intended in this bucket (ns; 2 significant figures).
    latency: Option<Histogram<u32>>,
}

impl Bucket {
    fn add(&mut self, o: &Bucket) {
        self.sent += o.sent;
        self.answered += o.answered;
        self.timeouts += o.timeouts;
        if let Some(h) = &o.latency {
            match &mut self.latency {
                Some(mine) => {
                    let _ = mine.add(h);
                }
                None => self.latency = Some(h.clone()),
            }
        }
    }
}

/// One thread's (or a whole run's) series.
#[derive(Debug, Clone)]
pub struct Series {
    width_ns: u64,
    buckets: Vec<Bucket>,
}

impl Default for Series {
    fn default() -> Self {
        Series::new()
    }
}

fn bucket_histogram() -> Histogram<u32> {
    Histogram::new_with_bounds(1_000, HIST_MAX_NS, 2).expect("valid histogram bounds")
}

impl Series {
    pub fn new() -> Series {
        Series {
            width_ns: BUCKET_NS,
            buckets: Vec::new(),
        }
    }

    /// The bucket of `at_ns` (after the run's start), widening the buckets as needed.
    fn bucket(&mut self, at_ns: u64) -> &mut Bucket {
        while at_ns / self.width_ns >= MAX_BUCKETS as u64 {
            self.widen();
        }
        let i = (at_ns / self.width_ns) as usize;
        if self.buckets.len() <= i {
            self.buckets.resize_with(i + 1, Bucket::default);
        }
        &mut self.buckets[i]
    }

    /// Doubles the width: bucket pairs merge.
    fn widen(&mut self) {
        let old = std::mem::take(&mut self.buckets);
        for pair in old.chunks(2) {
            let mut b = pair[0].clone();
            if let Some(second) = pair.get(1) {
                b.add(second);
            }
            self.buckets.push(b);
        }
        self.width_ns *= 2;
    }

    /// A request left at `at_ns`.
    pub fn sent(&mut self, at_ns: u64) {
        self.bucket(at_ns).sent += 1;
    }

    /// An answer arrived at `at_ns`.
    pub fn answered(&mut self, at_ns: u64) {
        self.bucket(at_ns).answered += 1;
    }

    /// `n` requests intended at `intended_ns` took `latency_ns` (`timed_out`: timeouts or
    /// unsent, at least the timeout).
    pub fn sample_n(&mut self, intended_ns: u64, latency_ns: u64, n: u64, timed_out: bool) {
        let b = self.bucket(intended_ns);
        if timed_out {
            b.timeouts += n;
        }
        let _ = b.latency.get_or_insert_with(bucket_histogram).record_n(
            latency_ns.clamp(1_000, HIST_MAX_NS),
            u32::try_from(n).unwrap_or(u32::MAX),
        );
    }

    pub fn sample(&mut self, intended_ns: u64, latency_ns: u64, timed_out: bool) {
        self.sample_n(intended_ns, latency_ns, 1, timed_out);
    }

    /// Adds `other` (another thread's series of the same run, same start).
    pub fn merge(&mut self, other: &Series) {
        let mut other = other.clone();
        while other.width_ns < self.width_ns {
            other.widen();
        }
        while self.width_ns < other.width_ns {
            self.widen();
        }
        if self.buckets.len() < other.buckets.len() {
            self.buckets
                .resize_with(other.buckets.len(), Bucket::default);
        }
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            mine.add(theirs);
        }
    }

    /// The JSON form.
    pub fn report(&self) -> TimeSeries {
        let secs = self.width_ns as f64 / 1e9;
        let q = |h: &Option<Histogram<u32>>, q: f64| {
            h.as_ref()
                .filter(|h| !h.is_empty())
                .map_or(0.0, |h| h.value_at_quantile(q) as f64 / 1e3)
        };
        TimeSeries {
            bucket_ms: self.width_ns as f64 / 1e6,
            points: self
                .buckets
                .iter()
                .enumerate()
                .map(|(i, b)| SeriesPoint {
                    start_ms: (i as u64 * self.width_ns) as f64 / 1e6,
                    sent_rps: b.sent as f64 / secs,
                    answered_rps: b.answered as f64 / secs,
                    samples: b.latency.as_ref().map_or(0, |h| h.len()),
                    timeouts: b.timeouts,
                    p50_us: q(&b.latency, 0.50),
                    p99_us: q(&b.latency, 0.99),
                })
                .collect(),
        }
    }
}

/// The time series in a run's JSON report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TimeSeries {
    /// Width of each bucket (100 ms, doubled for long runs).
    pub bucket_ms: f64,
    pub points: Vec<SeriesPoint>,
}

/// One bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesPoint {
    /// Bucket start, after the run's start.
    pub start_ms: f64,
    /// Requests sent in this bucket, per second.
    pub sent_rps: f64,
    /// Answers received in this bucket, per second.
    pub answered_rps: f64,
    /// Requests intended in this bucket that expected an answer (latency samples).
    pub samples: u64,
    /// Of those, timed out or never sent.
    pub timeouts: u64,
    /// Latency of those samples (2 significant figures; timeouts at least the timeout).
    pub p50_us: f64,
    pub p99_us: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn buckets_count_by_time_and_take_latency_by_intended_time() {
        let mut s = Series::new();
        for i in 0..100 {
            s.sent(i * MS);
            s.answered(i * MS + 150 * MS); // answered 150 ms later: the next buckets
            s.sample(i * MS, 150 * MS, false);
        }
        for _ in 0..3 {
            s.sample(50 * MS, 1000 * MS, true);
        }
        let r = s.report();
        assert_eq!(r.bucket_ms, 100.0);
        assert_eq!(r.points.len(), 3);
        assert_eq!(r.points[0].sent_rps, 1000.0);
        assert_eq!(
            (r.points[1].answered_rps, r.points[2].answered_rps),
            (500.0, 500.0)
        );
        assert_eq!((r.points[0].samples, r.points[0].timeouts), (103, 3));
        assert_eq!(r.points[1].samples, 0);
        assert!(
            (r.points[0].p50_us - 150_000.0).abs() < 1500.0,
            "{:?}",
            r.points[0]
        );
        assert!(r.points[0].p99_us >= 990_000.0, "{:?}", r.points[0]);
    }

    #[test]
    fn long_runs_widen_the_buckets_and_keep_every_count() {
        let mut s = Series::new();
        let end = MAX_BUCKETS as u64 * BUCKET_NS * 3; // three times the span of 100 ms buckets
        let mut t = 0;
        let mut n = 0;
        while t < end {
            s.sent(t);
            s.sample(t, MS, false);
            t += 50 * MS;
            n += 1;
        }
        let r = s.report();
        assert_eq!(r.bucket_ms, 400.0);
        assert!(r.points.len() <= MAX_BUCKETS);
        let sent: f64 = r.points.iter().map(|p| p.sent_rps * 0.4).sum();
        assert!((sent - n as f64).abs() < 1e-6);
        assert_eq!(r.points.iter().map(|p| p.samples).sum::<u64>(), n);
    }

    #[test]
    fn threads_merge_whatever_their_widths() {
        let mut a = Series::new();
        let mut b = Series::new();
        a.sent(0);
        b.sent(MAX_BUCKETS as u64 * BUCKET_NS + 1); // widened once
        b.sent(10 * MS);
        a.merge(&b);
        let r = a.report();
        assert_eq!(r.bucket_ms, 200.0);
        assert_eq!(r.points[0].sent_rps, 2.0 / 0.2);
        assert_eq!(r.points.iter().map(|p| p.sent_rps * 0.2).sum::<f64>(), 3.0);
    }
}
