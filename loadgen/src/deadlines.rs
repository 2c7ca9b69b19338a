//! A queue of timers by deadline, for a worker's request timeouts. Owns: the order in
//! which due timers come out. Must not touch: what a timer means.
//!
//! Deadlines run from each request's intended send time, which grows with the request
//! number, so they are pushed almost always in increasing order: those go to a FIFO (O(1) in
//! and out, read sequentially). The few pushed out of order (a socket's pending requests
//! handed to the kernel after newer ones of another socket) go to a binary heap. Popping
//! takes the earlier of the two fronts, so timers come out in deadline order, like from one
//! heap. With every request of the last timeout in it (a million at 1 s and 1M/s), a single
//! heap's sift-down was a tenth of loadgen's CPU in the echo benchmark.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

/// Timers `T` by deadline (nanoseconds).
#[derive(Debug)]
pub struct Deadlines<T> {
    in_order: VecDeque<(u64, T)>,
    out_of_order: BinaryHeap<Reverse<(u64, T)>>,
}

impl<T: Ord + Copy> Default for Deadlines<T> {
    fn default() -> Self {
        Deadlines {
            in_order: VecDeque::new(),
            out_of_order: BinaryHeap::new(),
        }
    }
}

impl<T: Ord + Copy> Deadlines<T> {
    /// Adds `timer`, due at `at_ns`.
    pub fn push(&mut self, at_ns: u64, timer: T) {
        match self.in_order.back() {
            Some(&(last, _)) if at_ns < last => self.out_of_order.push(Reverse((at_ns, timer))),
            _ => self.in_order.push_back((at_ns, timer)),
        }
    }

    /// The earliest deadline.
    pub fn next_at(&self) -> Option<u64> {
        let a = self.in_order.front().map(|&(at, _)| at);
        let b = self.out_of_order.peek().map(|Reverse((at, _))| *at);
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Removes and returns the earliest timer if it is due at or before `now_ns`.
    pub fn pop_due(&mut self, now_ns: u64) -> Option<(u64, T)> {
        let a = self.in_order.front().map(|&(at, _)| at);
        let b = self.out_of_order.peek().map(|Reverse((at, _))| *at);
        match (a, b) {
            (Some(a), b) if a <= now_ns && b.is_none_or(|b| a <= b) => self.in_order.pop_front(),
            (_, Some(b)) if b <= now_ns => self.out_of_order.pop().map(|Reverse(t)| t),
            _ => None,
        }
    }

    /// Timers held.
    pub fn len(&self) -> usize {
        self.in_order.len() + self.out_of_order.len()
    }

    /// No timers held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Timers come out in deadline order, each exactly once, only when due, whatever the
    /// order they went in.
    #[test]
    fn due_timers_come_out_in_deadline_order() {
        let mut d = Deadlines::default();
        // Mostly increasing, with stragglers and ties.
        let input = [10u64, 20, 20, 15, 30, 5, 40, 40, 35, 50];
        for (i, &at) in input.iter().enumerate() {
            d.push(at, i);
        }
        assert_eq!(d.len(), input.len());
        assert_eq!(d.next_at(), Some(5));
        assert_eq!(d.pop_due(4), None, "nothing is due before 5");
        let mut out = Vec::new();
        while let Some((at, i)) = d.pop_due(u64::MAX) {
            assert_eq!(input[i], at);
            out.push(at);
        }
        let mut sorted = input.to_vec();
        sorted.sort_unstable();
        assert_eq!(out, sorted);
        assert!(d.is_empty());
        assert_eq!(d.next_at(), None);
    }

    #[test]
    fn only_what_is_due_comes_out() {
        let mut d = Deadlines::default();
        for at in [100u64, 200, 150, 300] {
            d.push(at, at);
        }
        let due: Vec<u64> = std::iter::from_fn(|| d.pop_due(200).map(|(at, _)| at)).collect();
        assert_eq!(due, [100, 150, 200]);
        assert_eq!(d.next_at(), Some(300));
        assert_eq!(d.len(), 1);
    }

    /// Against a plain heap over a long pseudo-random mostly-increasing sequence.
    #[test]
    fn agrees_with_a_heap() {
        let mut d = Deadlines::default();
        let mut h = BinaryHeap::new();
        let mut x = 12345u64;
        let mut base = 0u64;
        for i in 0..10_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            base += x >> 60; // 0..15
            let at = if (x >> 32).is_multiple_of(10) {
                base.saturating_sub(x >> 58)
            } else {
                base
            };
            d.push(at, i);
            h.push(Reverse((at, i)));
            if i.is_multiple_of(7) {
                let now = base.saturating_sub(20);
                loop {
                    let expect = match h.peek() {
                        Some(Reverse((at, _))) if *at <= now => h.pop().map(|Reverse(t)| t.0),
                        _ => None,
                    };
                    let got = d.pop_due(now).map(|t| t.0);
                    assert_eq!(got, expect);
                    if got.is_none() {
                        break;
                    }
                }
            }
        }
        assert_eq!(d.len(), h.len());
    }
}
