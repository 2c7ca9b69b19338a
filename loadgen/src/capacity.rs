//! SLO capacity search: the highest offered open-loop rate at which p99 latency (over every
//! request due, timeouts and unsent requests included) stays under a target and the share
//! of requests left unanswered stays under a bound. The number an operator sizes with.
//!
//! The search, over `[min, max]` requests per second, one open-loop run of `--duration` per
//! step, at most `max_steps` steps:
//! 1. the first step offers `min`; if it fails, the capacity is below the range (none);
//! 2. while steps pass, the rate doubles (capped at `max`; passing at `max` ends the search:
//!    the capacity is at least `max`);
//! 3. once a step has failed, bisection between the highest passing and the lowest failing
//!    rate, until they are within `precision` of each other.
//!
//! A step fails only when it fails twice in a row at the same rate (both runs are in the
//! report): one stall of a busy machine must not cap the answer.
//!
//! The answer is the highest rate that passed. A step in which the generator itself was
//! the bottleneck (`RunReport::generator_bound`) says nothing about the server: it caps the
//! bisection from above (nothing is known at or beyond it), and a search that ends against
//! that cap says so (`Outcome::GeneratorBound`, a lower bound). Every step is kept.
#![forbid(unsafe_code)]

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cli::{Profile, RunArgs};
use crate::report::RunReport;
use crate::run::{RunError, execute, prepare};

/// The SLO and the search bounds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SearchPlan {
    /// p99 must stay below this (µs).
    pub slo_p99_us: f64,
    /// The share of requests unanswered (timeouts and unsent) must stay below this (0..1);
    /// with 0, none may be.
    pub slo_loss_ratio: f64,
    pub min_rps: f64,
    pub max_rps: f64,
    /// Bisection ends when the failing rate is within this fraction above the passing one.
    pub precision: f64,
    pub max_steps: usize,
    /// Sending time of each step (s).
    pub step_seconds: f64,
}

/// One step: an open-loop run at `offered_rps` and its verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapacityStep {
    pub offered_rps: f64,
    pub sent_rps: f64,
    pub answered_rps: f64,
    /// Requests due (sent or not) that expected an answer.
    pub due: u64,
    pub timeouts: u64,
    pub unsent: u64,
    /// p50 and p99 over every request due, timeouts included (µs).
    pub p50_us: f64,
    pub p99_us: f64,
    /// (timeouts + unsent) / requests due.
    pub loss_ratio: f64,
    /// Under both bounds (and not generator-bound).
    pub pass: bool,
    /// The generator, not the server, was the bottleneck of this step.
    #[serde(default)]
    pub generator_bound: bool,
    /// Stopped by Ctrl-C.
    pub interrupted: bool,
    /// Why it passed or failed, in words.
    pub verdict: String,
}

/// How the search ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// A passing rate and a failing one within the precision: the capacity is found.
    Found,
    /// The maximum passed: the capacity is at least the maximum.
    AtMaximum,
    /// The minimum failed: no capacity within the range.
    BelowMinimum,
    /// The generator could not offer a rate: the capacity is at least the answer (if any),
    /// the server's real figure is unknown.
    GeneratorBound,
    /// The step budget ran out before the precision was reached: the answer is a lower
    /// bound.
    OutOfSteps,
    /// Ctrl-C.
    Interrupted,
}

impl Outcome {
    pub fn meaning(self) -> &'static str {
        match self {
            Outcome::Found => "found within the precision",
            Outcome::AtMaximum => "the maximum passed: the capacity is at least this",
            Outcome::BelowMinimum => "the minimum failed: the capacity is below the range",
            Outcome::GeneratorBound => {
                "the generator could not offer a higher rate: the server's capacity is at least this (not measured beyond)"
            }
            Outcome::OutOfSteps => "out of steps before the precision was reached: a lower bound",
            Outcome::Interrupted => "interrupted: a lower bound",
        }
    }
}

/// The search's answer (first, as an operator reads it) and every step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapacityReport {
    /// The highest offered rate that passed (requests per second); `None`: none did.
    pub capacity_rps: Option<f64>,
    pub outcome: Outcome,
    /// The lowest offered rate that failed, if any.
    pub first_failing_rps: Option<f64>,
    pub plan: SearchPlan,
    pub steps: Vec<CapacityStep>,
    /// The full report of the run at `capacity_rps`.
    pub at_capacity: Option<RunReport>,
}

/// Judges one run against the SLO.
pub fn judge(plan: &SearchPlan, offered_rps: f64, r: &RunReport) -> CapacityStep {
    let l = &r.latency;
    let loss = l.timeout_share;
    let p99_ok = l.count > 0 && l.p99_us < plan.slo_p99_us;
    let loss_ok = l.count > 0 && (loss == 0.0 || loss < plan.slo_loss_ratio);
    let generator_bound = r.generator_bound;
    let pass = p99_ok && loss_ok && !generator_bound && !r.interrupted;
    let mut why = Vec::new();
    if l.count == 0 {
        why.push("nothing was due".to_string());
    } else {
        why.push(format!(
            "p99 {:.2} ms {} {:.2} ms",
            l.p99_us / 1e3,
            if p99_ok { "<" } else { ">=" },
            plan.slo_p99_us / 1e3
        ));
        why.push(format!(
            "loss {:.3}% {} {:.3}%",
            loss * 100.0,
            if loss_ok { "<" } else { ">=" },
            plan.slo_loss_ratio * 100.0
        ));
    }
    if generator_bound {
        why.push(format!(
            "generator-bound: {}",
            r.generator_bound_reasons.join("; ")
        ));
    }
    if r.interrupted {
        why.push("interrupted".into());
    }
    CapacityStep {
        offered_rps,
        sent_rps: r.sent_rate_rps,
        answered_rps: r.achieved_rate_rps,
        due: l.count,
        timeouts: r.timeouts,
        unsent: r.unsent,
        p50_us: l.p50_us,
        p99_us: l.p99_us,
        loss_ratio: loss,
        pass,
        generator_bound,
        interrupted: r.interrupted,
        verdict: why.join(", "),
    }
}

/// The search itself, over `step(rate)`, which runs and judges one step and returns it
/// with what to keep of the run (`R`: the run's report in [`run`], nothing in tests).
/// Returns the report (without `at_capacity`) and the `R` of the highest passing step.
pub fn search<R, E>(
    plan: &SearchPlan,
    mut step: impl FnMut(f64) -> Result<(CapacityStep, R), E>,
) -> Result<(CapacityReport, Option<R>), E> {
    let mut steps = Vec::new();
    let mut pass: Option<(f64, R)> = None;
    let mut fail: Option<f64> = None;
    // The lowest rate the generator could not offer: nothing is known at or above it, so
    // the search bisects below it (the answer is then a lower bound).
    let mut ceiling: Option<f64> = None;
    let mut rate = plan.min_rps;
    let mut outcome = Outcome::OutOfSteps;
    while steps.len() < plan.max_steps {
        let (mut s, mut kept) = step(rate)?;
        // A failure must happen twice at the same rate: one stall of a shared machine (or of
        // the server's own housekeeping) in a short step must not cap the answer.
        if !s.pass && !s.generator_bound && !s.interrupted && steps.len() + 1 < plan.max_steps {
            steps.push(s);
            (s, kept) = step(rate)?;
        }
        let (passed, bound, interrupted) = (s.pass, s.generator_bound, s.interrupted);
        steps.push(s);
        if interrupted {
            outcome = Outcome::Interrupted;
            break;
        }
        if bound {
            ceiling = Some(ceiling.map_or(rate, |c: f64| c.min(rate)));
        } else if passed {
            pass = Some((rate, kept));
        } else {
            fail = Some(fail.map_or(rate, |f: f64| f.min(rate)));
        }
        let p = pass.as_ref().map(|(p, _)| *p);
        // The bisection's upper end: the lowest failing rate, or the generator's ceiling.
        let upper = match (fail, ceiling) {
            (Some(f), Some(c)) => Some(f.min(c)),
            (f, c) => f.or(c),
        };
        let by_ceiling =
            upper.is_some() && upper == ceiling && fail.is_none_or(|f| Some(f) != upper);
        match (p, upper) {
            (None, _) if fail.is_none() => {
                // Even the lowest rate could not be offered.
                outcome = Outcome::GeneratorBound;
                break;
            }
            (None, _) => {
                outcome = Outcome::BelowMinimum;
                break;
            }
            (Some(p), None) if p >= plan.max_rps => {
                outcome = Outcome::AtMaximum;
                break;
            }
            (Some(p), None) => rate = (p * 2.0).min(plan.max_rps),
            (Some(p), Some(u)) if u - p <= plan.precision * p => {
                outcome = if by_ceiling {
                    Outcome::GeneratorBound
                } else {
                    Outcome::Found
                };
                break;
            }
            (Some(p), Some(u)) => rate = (p + u) / 2.0,
        }
    }
    let (capacity_rps, kept) = match pass {
        Some((p, k)) => (Some(p), Some(k)),
        None => (None, None),
    };
    Ok((
        CapacityReport {
            capacity_rps,
            outcome,
            first_failing_rps: fail,
            plan: *plan,
            steps,
            at_capacity: None,
        },
        kept,
    ))
}

/// Default sending time of each step.
pub const DEFAULT_STEP: Duration = Duration::from_secs(2);

/// The search plan of `args`, checked.
pub fn plan_of(args: &RunArgs) -> Result<SearchPlan, RunError> {
    let invalid = |s: &str| Err(RunError::Invalid(s.into()));
    if args.rate.is_some() || args.window.is_some() {
        return invalid("a capacity search chooses the rate itself: drop --rate and --window");
    }
    if args.requests.is_some() {
        return invalid("a capacity search bounds each step by --duration: drop --requests");
    }
    if args.histogram_file.is_some() {
        return invalid("a capacity search writes no --histogram-file");
    }
    if args.profile != Profile::Churn {
        return invalid(
            "a capacity search needs --profile churn (a mass disconnect can be sent only once)",
        );
    }
    let slo_p99 = args.slo_p99.unwrap_or(crate::cli::DEFAULT_SLO_P99);
    if slo_p99.is_zero() {
        return invalid("--slo-p99 must be positive");
    }
    if args.timeout <= slo_p99 {
        return invalid(
            "--timeout must be longer than --slo-p99 (a timeout is a sample at the timeout: it must fail the target)",
        );
    }
    let (min, max) = (args.capacity_min, args.capacity_max);
    if !(min.is_finite() && min > 0.0 && max.is_finite() && max >= min) {
        return invalid("--capacity-min and --capacity-max: 0 < min <= max");
    }
    if !(1..=64).contains(&args.capacity_steps) {
        return invalid("--capacity-steps must be between 1 and 64");
    }
    if !(args.capacity_precision > 0.0 && args.capacity_precision < 1.0) {
        return invalid("--capacity-precision must be between 0% and 100%");
    }
    Ok(SearchPlan {
        slo_p99_us: slo_p99.as_nanos() as f64 / 1e3,
        slo_loss_ratio: args.slo_loss.unwrap_or(crate::cli::DEFAULT_SLO_LOSS),
        min_rps: min,
        max_rps: max,
        precision: args.capacity_precision,
        max_steps: args.capacity_steps,
        step_seconds: args.duration.unwrap_or(DEFAULT_STEP).as_secs_f64(),
    })
}

/// Runs the capacity search `args` describe, calling `on_step` after each step (for
/// printing it). The sessions are read and the requests prepared once for every step.
pub fn run(
    args: &RunArgs,
    mut on_step: impl FnMut(usize, &CapacityStep),
) -> Result<CapacityReport, RunError> {
    let plan = plan_of(args)?;
    let mut step_args = args.clone();
    step_args.duration = Some(Duration::from_secs_f64(plan.step_seconds));
    let prepared = prepare(&step_args)?;
    let mut n = 0;
    let (mut report, kept) = search(&plan, |rate| {
        step_args.rate = Some(rate);
        let r = execute(&step_args, &prepared)?;
        let s = judge(&plan, rate, &r);
        n += 1;
        on_step(n, &s);
        if !s.pass {
            // Let an overloaded server work off its queue before the next step.
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok::<_, RunError>((s, r.run))
    })?;
    report.at_capacity = kept;
    Ok(report)
}

impl SearchPlan {
    /// One line: the target and the range.
    pub fn text(&self) -> String {
        format!(
            "capacity search: p99 < {:.2} ms (timeouts included) and loss < {:.3}%, open loop {:.0}..{:.0}/s, steps of {:.3} s, at most {}, precision {:.1}%\n",
            self.slo_p99_us / 1e3,
            self.slo_loss_ratio * 100.0,
            self.min_rps,
            self.max_rps,
            self.step_seconds,
            self.max_steps,
            self.precision * 100.0
        )
    }
}

impl CapacityStep {
    /// One line: rate, p99, loss, pass or fail.
    pub fn line(&self, n: usize) -> String {
        format!(
            "step {n:>2}: offered {:>9.0}/s  sent {:>9.0}/s  answered {:>9.0}/s  p50 {:>9.3} ms  p99 {:>9.3} ms  loss {:>7.3}%  {}  ({})\n",
            self.offered_rps,
            self.sent_rps,
            self.answered_rps,
            self.p50_us / 1e3,
            self.p99_us / 1e3,
            self.loss_ratio * 100.0,
            if self.pass { "PASS" } else { "FAIL" },
            self.verdict
        )
    }
}

impl CapacityReport {
    /// The answer in one line.
    pub fn answer(&self) -> String {
        let failing = self
            .first_failing_rps
            .map_or(String::new(), |f| format!("; {f:.0}/s failed"));
        match self.capacity_rps {
            Some(c) => format!("capacity: {c:.0}/s ({}{failing})\n", self.outcome.meaning()),
            None => format!("capacity: none ({}{failing})\n", self.outcome.meaning()),
        }
    }

    /// The plan, every step and the answer.
    pub fn text(&self) -> String {
        let mut s = self.plan.text();
        for (i, step) in self.steps.iter().enumerate() {
            s += &step.line(i + 1);
        }
        s + &self.answer()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(min: f64, max: f64, steps: usize) -> SearchPlan {
        SearchPlan {
            slo_p99_us: 10_000.0,
            slo_loss_ratio: 0.001,
            min_rps: min,
            max_rps: max,
            precision: 0.05,
            max_steps: steps,
            step_seconds: 1.0,
        }
    }

    /// A step against a server that meets the SLO up to `capacity` requests per second.
    fn server(capacity: f64) -> impl FnMut(f64) -> Result<(CapacityStep, f64), ()> {
        move |rate| {
            let pass = rate <= capacity;
            Ok((
                CapacityStep {
                    offered_rps: rate,
                    sent_rps: rate,
                    answered_rps: rate.min(capacity),
                    due: 1000,
                    timeouts: 0,
                    unsent: 0,
                    p50_us: 100.0,
                    p99_us: if pass { 1000.0 } else { 50_000.0 },
                    loss_ratio: 0.0,
                    pass,
                    generator_bound: false,
                    interrupted: false,
                    verdict: String::new(),
                },
                rate,
            ))
        }
    }

    #[test]
    fn bisection_brackets_the_capacity_within_the_precision() {
        for capacity in [1000.0, 1234.0, 3700.0, 77_777.0, 999_999.0] {
            let (r, kept) = search(&plan(1000.0, 1e6, 40), server(capacity)).unwrap();
            assert_eq!(r.outcome, Outcome::Found, "{capacity}: {r:?}");
            let c = r.capacity_rps.unwrap();
            let f = r.first_failing_rps.unwrap();
            assert!(c <= capacity && capacity < f, "{c} {capacity} {f}");
            assert!(f - c <= 0.05 * c, "{c} {f}");
            assert_eq!(kept, Some(c), "the kept run is the capacity's");
            // Doubling then halving: about log2(range) + log2(1 / precision) steps, each
            // failure confirmed by a second run.
            assert!(r.steps.len() <= 10 + 2 * 6, "{}", r.steps.len());
            // The answer is the highest passing step.
            let best = r
                .steps
                .iter()
                .filter(|s| s.pass)
                .map(|s| s.offered_rps)
                .fold(0.0, f64::max);
            assert_eq!(best, c);
        }
    }

    // One stall in a short step is not the server's limit: a failure counts only when the
    // same rate fails again.
    #[test]
    fn a_single_noisy_failure_is_retried_before_it_counts() {
        let mut inner = server(50_000.0);
        let mut runs_at_2000 = 0;
        let (r, _) = search(&plan(1000.0, 1e6, 40), |rate| {
            let (mut s, k) = inner(rate)?;
            if rate == 2000.0 {
                runs_at_2000 += 1;
                if runs_at_2000 == 1 {
                    s.pass = false; // a stall
                }
            }
            Ok::<_, ()>((s, k))
        })
        .unwrap();
        assert_eq!(r.outcome, Outcome::Found);
        assert!(r.capacity_rps.unwrap() > 45_000.0, "{r:?}");
        assert_eq!(runs_at_2000, 2, "the failing rate was run again");
    }

    #[test]
    fn the_range_and_the_step_budget_bound_the_search() {
        let (r, kept) = search(&plan(1000.0, 8000.0, 40), server(1e9)).unwrap();
        assert_eq!(r.outcome, Outcome::AtMaximum);
        assert_eq!(r.capacity_rps, Some(8000.0));
        let rates: Vec<f64> = r.steps.iter().map(|s| s.offered_rps).collect();
        assert_eq!(rates, [1000.0, 2000.0, 4000.0, 8000.0]);
        assert_eq!(kept, Some(8000.0));

        let (r, kept) = search(&plan(1000.0, 8000.0, 40), server(500.0)).unwrap();
        assert_eq!(r.outcome, Outcome::BelowMinimum);
        assert_eq!((r.capacity_rps, r.first_failing_rps), (None, Some(1000.0)));
        assert_eq!(r.steps.len(), 2, "the failure and its confirmation");
        assert_eq!(kept, None);

        let (r, _) = search(&plan(1000.0, 1e6, 3), server(50_000.0)).unwrap();
        assert_eq!(r.outcome, Outcome::OutOfSteps);
        assert_eq!(r.steps.len(), 3);
        assert_eq!(r.capacity_rps, Some(4000.0), "a lower bound");
    }

    // A rate the generator cannot offer is an upper end for the bisection, not a failure:
    // the search narrows below it, and its answer is a lower bound; a server that fails below
    // the generator's limit is found as usual.
    #[test]
    fn a_generator_bound_step_bounds_the_search_from_above() {
        let generator = |limit: f64, capacity: f64| {
            let mut inner = server(capacity);
            move |rate: f64| {
                let (mut s, k) = inner(rate)?;
                if rate >= limit {
                    s.generator_bound = true;
                    s.pass = false;
                }
                Ok::<_, ()>((s, k))
            }
        };
        let (r, _) = search(&plan(1000.0, 1e6, 40), generator(4000.0, 1e9)).unwrap();
        assert_eq!(r.outcome, Outcome::GeneratorBound);
        let c = r.capacity_rps.unwrap();
        assert!(
            (0.95 * 4000.0..4000.0).contains(&c),
            "narrowed below the limit: {c}"
        );
        assert_eq!(
            r.first_failing_rps, None,
            "a generator-bound step is not a failure"
        );
        assert!(r.answer().contains("generator"), "{}", r.answer());
        // The server fails below what the generator can offer: found.
        let (r, _) = search(&plan(1000.0, 1e6, 40), generator(40_000.0, 5000.0)).unwrap();
        assert_eq!(r.outcome, Outcome::Found);
        let c = r.capacity_rps.unwrap();
        assert!(
            c <= 5000.0 && r.first_failing_rps.unwrap() > 5000.0,
            "{r:?}"
        );
        // Not even the minimum can be offered.
        let (r, _) = search(&plan(1000.0, 1e6, 40), generator(10.0, 1e9)).unwrap();
        assert_eq!((r.outcome, r.capacity_rps), (Outcome::GeneratorBound, None));
        assert_eq!(r.steps.len(), 1);
    }
}
