//! The server's one session feed: every source (control-socket agents, RADIUS accounting)
//! applies its events through one [`SessionFeed`], so that the per-NAS ordering of
//! `dynauth_proto::feed::Feed` holds across connections.
//!
//! Owns: the feed's lock (writers only: the shards read the store lock-free and never take
//! it) and the monotonic clock shared with the shards (tombstone times must agree).
//! Must not touch: wire formats (the control socket and accounting listener parse), sockets.
#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use dynauth_proto::feed::{Feed, FeedError, FeedMemory, FeedOutcome, FeedStats, Sequenced};
use dynauth_proto::store::SessionStore;

/// The feed, the store it writes, and the clock.
pub struct SessionFeed {
    feed: Mutex<Feed>,
    store: Arc<dyn SessionStore>,
    base: Instant,
}

impl core::fmt::Debug for SessionFeed {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SessionFeed")
            .field("sessions", &self.store.len())
            .finish_non_exhaustive()
    }
}

impl SessionFeed {
    /// `base` is the instant the shards measure monotonic milliseconds from
    /// (`runtime::Server::base`).
    pub fn new(store: Arc<dyn SessionStore>, base: Instant) -> Self {
        SessionFeed::with_memory(store, base, FeedMemory::default())
    }

    /// [`SessionFeed::new`] going on from what the state directory restored: each NAS's
    /// last sequence number and the resyncs in progress.
    pub fn with_memory(store: Arc<dyn SessionStore>, base: Instant, memory: FeedMemory) -> Self {
        SessionFeed {
            feed: Mutex::new(Feed::with_memory(memory)),
            store,
            base,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Feed> {
        // `Feed::apply` leaves the feed consistent between any two statements that can
        // panic (its maps are updated after the store call), so a poisoned lock is usable.
        self.feed.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Applies one event; returns once the store has committed it (with a state
    /// directory: once it is durable; the wait is outside the feed's lock, so one fsync
    /// covers the events of every source in its window).
    pub fn apply(&self, event: Sequenced) -> Result<FeedOutcome, FeedError> {
        let now = self.now_ms();
        let scope = crate::state::defer_commits();
        let outcome = self.lock().apply(event, &*self.store, now);
        scope.wait();
        outcome
    }

    /// Applies events in order under one lock acquisition (a bulk load); stops at nothing:
    /// each event's result is returned.
    pub fn apply_all(
        &self,
        events: impl IntoIterator<Item = Sequenced>,
    ) -> Vec<Result<FeedOutcome, FeedError>> {
        let now = self.now_ms();
        let scope = crate::state::defer_commits();
        let outcomes = {
            let mut feed = self.lock();
            events
                .into_iter()
                .map(|e| feed.apply(e, &*self.store, now))
                .collect()
        };
        scope.wait();
        outcomes
    }

    pub fn stats(&self) -> FeedStats {
        self.lock().stats()
    }

    /// The feed's counters and the live session count, as Prometheus text appended to `out`.
    pub fn write_prometheus(&self, out: &mut String) {
        use core::fmt::Write as _;
        let s = self.stats();
        let rows: [(&str, &str, u64); 7] = [
            (
                "dynauth_feed_upserts_total",
                "Session feed upserts applied",
                s.upserts,
            ),
            (
                "dynauth_feed_deletes_total",
                "Session feed deletes applied",
                s.deletes,
            ),
            (
                "dynauth_feed_nas_resets_total",
                "NAS resets applied",
                s.nas_resets,
            ),
            ("dynauth_feed_resyncs_total", "Resyncs completed", s.syncs),
            (
                "dynauth_feed_swept_total",
                "Sessions removed by NAS resets and resyncs",
                s.swept,
            ),
            (
                "dynauth_feed_stale_total",
                "Events ignored for an old sequence number",
                s.stale,
            ),
            ("dynauth_feed_refused_total", "Events refused", s.refused),
        ];
        for (name, help, value) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP dynauth_sessions Live sessions in the store\n# TYPE dynauth_sessions gauge\ndynauth_sessions {}",
            self.store.len()
        );
    }

    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.store
    }
}
