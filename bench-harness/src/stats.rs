//! Summary statistics over repetitions (median, min, max) and the ratio arithmetic the
//! report prints. Owns: how a set of repeated figures becomes one number with its range, and
//! what a ratio is when one side is missing or zero. Must not touch: I/O.

use serde::{Deserialize, Serialize};

/// Median with the range of a set of repetitions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// How many values (repetitions) it summarises.
    pub n: usize,
}

impl Summary {
    /// The median (mean of the two middle values for an even count), min and max of the
    /// finite values; `None` when there is none.
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Summary {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }

    /// The summary of `f` applied to each item.
    pub fn of_by<T>(items: &[T], f: impl Fn(&T) -> Option<f64>) -> Option<Summary> {
        let values: Vec<f64> = items.iter().filter_map(f).collect();
        Summary::of(&values)
    }
}

/// `a / b`, or `None` when either side is missing, not finite, or `b` is not positive.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if a.is_finite() && b.is_finite() && b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// The sweep's offered rates: each fraction of the measured maximum, rounded to a whole
/// request per second, at least 1.
pub fn sweep_rates(max_rps: f64, fractions: &[f64]) -> Vec<f64> {
    fractions
        .iter()
        .map(|f| (max_rps * f).round().max(1.0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts_with_min_and_max() {
        let s = Summary::of(&[30.0, 10.0, 20.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (20.0, 10.0, 30.0, 3));
        let s = Summary::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 4.0, 4));
        let s = Summary::of(&[7.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (7.0, 7.0, 7.0));
    }

    #[test]
    fn empty_and_non_finite_values_are_left_out() {
        assert!(Summary::of(&[]).is_none());
        assert!(Summary::of(&[f64::NAN]).is_none());
        let s = Summary::of(&[f64::INFINITY, 5.0, f64::NAN, 1.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (3.0, 1.0, 5.0, 2));
    }

    #[test]
    fn summary_by_field_skips_missing_values() {
        let items = [Some(1.0), None, Some(3.0)];
        let s = Summary::of_by(&items, |x| *x).unwrap();
        assert_eq!((s.median, s.n), (2.0, 2));
    }

    #[test]
    fn ratios_refuse_missing_or_zero_denominators() {
        assert_eq!(ratio(Some(300.0), Some(100.0)), Some(3.0));
        assert_eq!(ratio(Some(50.0), Some(200.0)), Some(0.25));
        assert_eq!(ratio(None, Some(1.0)), None);
        assert_eq!(ratio(Some(1.0), None), None);
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
        assert_eq!(ratio(Some(f64::NAN), Some(1.0)), None);
    }

    #[test]
    fn sweep_rates_are_fractions_of_the_maximum() {
        assert_eq!(
            sweep_rates(200_000.0, &[0.1, 0.5, 1.2]),
            vec![20_000.0, 100_000.0, 240_000.0]
        );
        assert_eq!(sweep_rates(0.0, &[0.5]), vec![1.0]);
    }
}
