//! The session feed: how the gateway's own software (the control socket) and its RADIUS
//! accounting (RFC 2866) tell the store which sessions exist.
//!
//! Owns: the one event model both ways in share ([`FeedEvent`]: Upsert, Delete, NasReset,
//! SyncBegin, SyncEnd), the per-NAS sequence numbers that make an old or repeated event a
//! counted no-op, and the resync bookkeeping (sessions not re-sent between SyncBegin and
//! SyncEnd are removed at SyncEnd). [`Feed::apply`] applies one event to a [`SessionStore`].
//! Must not touch: sockets, JSON, clocks (time is passed in), the wire codec. One `Feed`
//! orders the events of every connection; the store's own atomicity keeps readers lock-free.
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};

use crate::session::Session;
use crate::store::{ResyncMark, SessionStore, UpsertError, UpsertMode, Upserted};

/// One change to the set of sessions, from the NAS's point of view.
// An event is built, applied and dropped; a batch holds at most one line's worth, so the
// inline `Session` costs less than a box per upsert would.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedEvent {
    /// Insert or replace a session with all its keys (the session's `nas` is set to the
    /// event's NAS).
    Upsert { session: Session, mode: UpsertMode },
    /// The session with this Acct-Session-Id on this NAS is gone.
    Delete { acct_session_id: String },
    /// Every session of this NAS is gone (it rebooted: Accounting-On/Off, RFC 2866 §5.1).
    NasReset,
    /// A full resync of this NAS begins: from now on the feed remembers which sessions are
    /// re-sent.
    SyncBegin,
    /// The resync ends: every session of this NAS not re-sent since `SyncBegin` is removed.
    SyncEnd,
}

/// An event with the NAS it belongs to and, when the source numbers its events, its
/// per-NAS sequence number (strictly increasing; RADIUS accounting has none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequenced {
    pub nas: Option<String>,
    pub seq: Option<u64>,
    pub event: FeedEvent,
}

/// What applying one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedOutcome {
    Upserted(Upserted),
    /// Delete: whether a live session was removed.
    Deleted(bool),
    /// NasReset or SyncEnd: how many sessions were removed.
    Removed(usize),
    SyncStarted,
    /// The sequence number was not above the NAS's last one: ignored (and counted).
    Stale {
        last: u64,
    },
}

/// Why an event was refused. The feed stays usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FeedError {
    #[error(transparent)]
    Upsert(#[from] UpsertError),
    #[error("sync_end without sync_begin for this NAS")]
    SyncEndWithoutBegin,
}

/// Counters of the feed (exported as metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FeedStats {
    pub upserts: u64,
    pub deletes: u64,
    pub nas_resets: u64,
    pub syncs: u64,
    /// Sessions removed by NAS resets and resyncs.
    pub swept: u64,
    /// Events ignored for an old or repeated sequence number.
    pub stale: u64,
    /// Events refused (bad session, sync_end without begin).
    pub refused: u64,
}

/// The identity a resync remembers for each re-sent session: 128 bits of MD5 over its
/// Acct-Session-Id, audit-session-id and CUI (each with its presence and length, so no two
/// different identities share an input). 16 octets per session instead of three strings
/// (a resync of 10M sessions is remembered in a few hundred MB, and journaled in 16 octets
/// a session); not a security boundary: the agent that could craft a collision owns the
/// NAS anyway, and a collision would only keep one not-re-sent session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResyncTag(pub [u8; 16]);

impl ResyncTag {
    pub fn of(s: &Session) -> ResyncTag {
        use md5::Digest;
        let mut h = md5::Md5::new();
        for part in [&s.acct_session_id, &s.audit_session_id, &s.cui] {
            match part {
                None => h.update([0u8]),
                Some(v) => {
                    h.update([1u8]);
                    h.update((v.len() as u64).to_le_bytes());
                    h.update(v.as_bytes());
                }
            }
        }
        ResyncTag(h.finalize().into())
    }
}

#[derive(Debug, Default)]
struct NasState {
    last_seq: Option<u64>,
    /// During a resync: the sessions re-sent so far.
    resent: Option<HashSet<ResyncTag>>,
}

/// What a feed remembers across a restart (a durable store records it through
/// `SessionStore::feed_seq` and `SessionStore::feed_resync` and gives it back at restore).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeedMemory {
    /// The last sequence number applied, per NAS.
    pub seqs: HashMap<Option<String>, u64>,
    /// The resyncs in progress: per NAS, the sessions re-sent so far.
    pub resyncs: HashMap<Option<String>, HashSet<ResyncTag>>,
}

impl FeedMemory {
    /// Applies one resync step (the restore replays them in journal order). A `Resent` for
    /// a NAS with no resync open opens one: replaying a journal over a snapshot taken in the
    /// middle of it may meet re-sent sessions before it meets their `Begin` again, and the
    /// last `Begin` or `End` decides in the end.
    pub fn apply_resync(&mut self, nas: Option<String>, mark: ResyncMark) {
        match mark {
            ResyncMark::Begin => {
                self.resyncs.insert(nas, HashSet::new());
            }
            ResyncMark::Resent(tag) => {
                self.resyncs.entry(nas).or_default().insert(tag);
            }
            ResyncMark::End => {
                self.resyncs.remove(&nas);
            }
        }
    }

    /// Records sequence number `seq` of `nas` (the highest wins).
    pub fn apply_seq(&mut self, nas: Option<String>, seq: u64) {
        let last = self.seqs.entry(nas).or_insert(seq);
        *last = (*last).max(seq);
    }
}

/// Orders and applies feed events. One per server, shared by every feed source.
#[derive(Debug, Default)]
pub struct Feed {
    nases: HashMap<Option<String>, NasState>,
    stats: FeedStats,
}

impl Feed {
    pub fn new() -> Self {
        Feed::default()
    }

    /// A feed that goes on from what a durable store restored: each NAS's last sequence
    /// number and the resyncs in progress.
    pub fn with_memory(memory: FeedMemory) -> Self {
        let mut feed = Feed::default();
        for (nas, seq) in memory.seqs {
            feed.nases.entry(nas).or_default().last_seq = Some(seq);
        }
        for (nas, resent) in memory.resyncs {
            feed.nases.entry(nas).or_default().resent = Some(resent);
        }
        feed
    }

    pub fn stats(&self) -> FeedStats {
        self.stats
    }

    /// Whether a resync of `nas` is in progress.
    pub fn syncing(&self, nas: Option<&str>) -> bool {
        self.nases
            .get(&nas.map(str::to_owned))
            .is_some_and(|n| n.resent.is_some())
    }

    /// Applies one event to `store` at monotonic time `now_ms`.
    pub fn apply(
        &mut self,
        event: Sequenced,
        store: &dyn SessionStore,
        now_ms: u64,
    ) -> Result<FeedOutcome, FeedError> {
        let Sequenced { nas, seq, event } = event;
        let state = self.nases.entry(nas.clone()).or_default();
        if let (Some(seq), Some(last)) = (seq, state.last_seq)
            && seq <= last
        {
            self.stats.stale += 1;
            return Ok(FeedOutcome::Stale { last });
        }
        let outcome = match event {
            FeedEvent::Upsert { mut session, mode } => {
                session.nas = nas.clone();
                let t = state.resent.as_ref().map(|_| ResyncTag::of(&session));
                match store.upsert(session, mode, now_ms) {
                    Ok(done) => {
                        if let (Some(resent), Some(t)) = (state.resent.as_mut(), t) {
                            resent.insert(t);
                            store.feed_resync(nas.as_deref(), ResyncMark::Resent(t));
                        }
                        self.stats.upserts += 1;
                        Ok(FeedOutcome::Upserted(done))
                    }
                    Err(e) => Err(FeedError::Upsert(e)),
                }
            }
            FeedEvent::Delete { acct_session_id } => {
                // A resync's memory of the session may stay: only live sessions are kept
                // or removed at SyncEnd, and a re-sent one comes back through an Upsert.
                self.stats.deletes += 1;
                Ok(FeedOutcome::Deleted(store.delete(
                    nas.as_deref(),
                    &acct_session_id,
                    now_ms,
                )))
            }
            FeedEvent::NasReset => {
                self.stats.nas_resets += 1;
                let n = store.retain_nas(nas.as_deref(), &mut |_| false, now_ms);
                if state.resent.take().is_some() {
                    store.feed_resync(nas.as_deref(), ResyncMark::End);
                }
                self.stats.swept += n as u64;
                Ok(FeedOutcome::Removed(n))
            }
            FeedEvent::SyncBegin => {
                state.resent = Some(HashSet::new());
                store.feed_resync(nas.as_deref(), ResyncMark::Begin);
                Ok(FeedOutcome::SyncStarted)
            }
            FeedEvent::SyncEnd => match state.resent.take() {
                None => Err(FeedError::SyncEndWithoutBegin),
                Some(resent) => {
                    self.stats.syncs += 1;
                    let n = store.retain_nas(
                        nas.as_deref(),
                        &mut |s| resent.contains(&ResyncTag::of(s)),
                        now_ms,
                    );
                    store.feed_resync(nas.as_deref(), ResyncMark::End);
                    self.stats.swept += n as u64;
                    Ok(FeedOutcome::Removed(n))
                }
            },
        };
        match outcome {
            Ok(_) => {
                if let Some(seq) = seq {
                    state.last_seq = Some(seq);
                    store.feed_seq(nas.as_deref(), seq);
                }
            }
            Err(_) => self.stats.refused += 1,
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryStore, TombstonePolicy};

    fn session(id: &str, user: &str) -> Session {
        Session {
            acct_session_id: Some(id.into()),
            user_name: Some(user.into()),
            ..Default::default()
        }
    }

    fn ev(nas: &str, seq: Option<u64>, event: FeedEvent) -> Sequenced {
        Sequenced {
            nas: Some(nas.into()),
            seq,
            event,
        }
    }

    fn upsert(id: &str, user: &str) -> FeedEvent {
        FeedEvent::Upsert {
            session: session(id, user),
            mode: UpsertMode::Create,
        }
    }

    fn users(store: &MemoryStore) -> Vec<(Option<String>, String)> {
        let mut v: Vec<_> = store
            .snapshot()
            .into_iter()
            .map(|s| (s.nas, s.user_name.unwrap_or_default()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn upsert_replaces_the_same_session_of_the_same_nas_only() {
        let store = MemoryStore::new(TombstonePolicy::default());
        let mut feed = Feed::new();
        feed.apply(ev("bng1", Some(1), upsert("a", "alice")), &store, 0)
            .unwrap();
        // The same Acct-Session-Id on another NAS is another session (NASes reuse them).
        feed.apply(ev("bng2", Some(1), upsert("a", "bob")), &store, 0)
            .unwrap();
        let r = feed.apply(ev("bng1", Some(2), upsert("a", "carol")), &store, 0);
        assert_eq!(r, Ok(FeedOutcome::Upserted(Upserted::Replaced)));
        assert_eq!(
            users(&store),
            vec![
                (Some("bng1".into()), "carol".into()),
                (Some("bng2".into()), "bob".into())
            ]
        );
    }

    #[test]
    fn old_and_repeated_sequence_numbers_are_ignored_and_counted() {
        let store = MemoryStore::new(TombstonePolicy::default());
        let mut feed = Feed::new();
        feed.apply(ev("n", Some(5), upsert("a", "new")), &store, 0)
            .unwrap();
        let late = feed.apply(ev("n", Some(4), upsert("a", "old")), &store, 0);
        assert_eq!(late, Ok(FeedOutcome::Stale { last: 5 }));
        let again = feed.apply(
            ev(
                "n",
                Some(5),
                FeedEvent::Delete {
                    acct_session_id: "a".into(),
                },
            ),
            &store,
            0,
        );
        assert_eq!(again, Ok(FeedOutcome::Stale { last: 5 }));
        assert_eq!(users(&store), vec![(Some("n".into()), "new".into())]);
        assert_eq!(feed.stats().stale, 2);
        // Another NAS has its own numbering.
        feed.apply(ev("m", Some(1), upsert("b", "x")), &store, 0)
            .unwrap();
        assert_eq!(store.len(), 2);
    }

    #[test]
    fn nas_reset_removes_every_session_of_that_nas_only() {
        let store = MemoryStore::new(TombstonePolicy::default());
        let mut feed = Feed::new();
        for (nas, id) in [("n", "1"), ("n", "2"), ("m", "1")] {
            feed.apply(ev(nas, None, upsert(id, id)), &store, 0)
                .unwrap();
        }
        let r = feed.apply(ev("n", None, FeedEvent::NasReset), &store, 0);
        assert_eq!(r, Ok(FeedOutcome::Removed(2)));
        assert_eq!(users(&store), vec![(Some("m".into()), "1".into())]);
    }

    #[test]
    fn resync_removes_what_was_not_resent() {
        let store = MemoryStore::new(TombstonePolicy::default());
        let mut feed = Feed::new();
        for id in ["1", "2", "3"] {
            feed.apply(ev("n", None, upsert(id, id)), &store, 0)
                .unwrap();
        }
        feed.apply(ev("m", None, upsert("9", "9")), &store, 0)
            .unwrap();
        feed.apply(ev("n", None, FeedEvent::SyncBegin), &store, 0)
            .unwrap();
        assert!(feed.syncing(Some("n")));
        feed.apply(ev("n", None, upsert("2", "two")), &store, 0)
            .unwrap();
        feed.apply(ev("n", None, upsert("4", "four")), &store, 0)
            .unwrap();
        let r = feed.apply(ev("n", None, FeedEvent::SyncEnd), &store, 0);
        assert_eq!(r, Ok(FeedOutcome::Removed(2)), "1 and 3 were not re-sent");
        assert_eq!(
            users(&store),
            vec![
                (Some("m".into()), "9".into()),
                (Some("n".into()), "four".into()),
                (Some("n".into()), "two".into())
            ]
        );
        let again = feed.apply(ev("n", None, FeedEvent::SyncEnd), &store, 0);
        assert_eq!(again, Err(FeedError::SyncEndWithoutBegin));
        assert_eq!(feed.stats().refused, 1);
    }

    /// A store that remembers what the feed told it, as a durable store journals it.
    struct Remembering {
        inner: MemoryStore,
        memory: std::sync::Mutex<FeedMemory>,
    }

    impl SessionStore for Remembering {
        crate::store::delegate_to_memory_store!(inner);
        fn feed_seq(&self, nas: Option<&str>, seq: u64) {
            self.memory
                .lock()
                .unwrap()
                .apply_seq(nas.map(str::to_owned), seq);
        }
        fn feed_resync(&self, nas: Option<&str>, mark: ResyncMark) {
            self.memory
                .lock()
                .unwrap()
                .apply_resync(nas.map(str::to_owned), mark);
        }
    }

    #[test]
    fn a_resync_goes_on_after_a_restart_from_what_the_store_remembered() {
        let store = Remembering {
            inner: MemoryStore::new(TombstonePolicy::default()),
            memory: Default::default(),
        };
        let mut feed = Feed::new();
        for (seq, id) in [(1, "1"), (2, "2"), (3, "3")] {
            feed.apply(ev("n", Some(seq), upsert(id, id)), &store, 0)
                .unwrap();
        }
        feed.apply(ev("n", Some(4), FeedEvent::SyncBegin), &store, 0)
            .unwrap();
        feed.apply(ev("n", Some(5), upsert("2", "two")), &store, 0)
            .unwrap();
        assert_eq!(store.memory.lock().unwrap().resyncs.len(), 1);
        // The server restarts: a new feed from what the store remembered.
        let mut feed = Feed::with_memory(store.memory.lock().unwrap().clone());
        assert!(feed.syncing(Some("n")));
        assert_eq!(
            feed.apply(ev("n", Some(5), upsert("3", "late")), &store, 0),
            Ok(FeedOutcome::Stale { last: 5 }),
            "the sequence numbers were remembered too"
        );
        feed.apply(ev("n", Some(6), upsert("4", "four")), &store, 0)
            .unwrap();
        let r = feed.apply(ev("n", Some(7), FeedEvent::SyncEnd), &store, 0);
        assert_eq!(r, Ok(FeedOutcome::Removed(2)), "1 and 3 were not re-sent");
        assert_eq!(
            users(&store.inner),
            vec![
                (Some("n".into()), "four".into()),
                (Some("n".into()), "two".into())
            ]
        );
        assert!(store.memory.lock().unwrap().resyncs.is_empty());
        // A NAS reset cancels a resync, and the store is told.
        feed.apply(ev("n", Some(8), FeedEvent::SyncBegin), &store, 0)
            .unwrap();
        feed.apply(ev("n", Some(9), FeedEvent::NasReset), &store, 0)
            .unwrap();
        assert!(store.memory.lock().unwrap().resyncs.is_empty());
        assert!(!Feed::with_memory(store.memory.lock().unwrap().clone()).syncing(Some("n")));
    }

    #[test]
    fn replaying_resync_steps_over_a_later_state_ends_where_the_journal_ends() {
        // A snapshot holds the memory at some point of the journal; the restore replays the
        // journal from an earlier point over it. The result is the journal's end state.
        let t = |id: &str| ResyncTag::of(&session(id, id));
        let nas = || Some("n".to_owned());
        let journal = [
            ResyncMark::Begin,
            ResyncMark::Resent(t("1")),
            ResyncMark::End,
            ResyncMark::Begin,
            ResyncMark::Resent(t("2")),
        ];
        let mut straight = FeedMemory::default();
        for m in journal {
            straight.apply_resync(nas(), m);
        }
        for snapshot_at in 0..=journal.len() {
            for replay_from in 0..=snapshot_at {
                let mut m = FeedMemory::default();
                for &j in &journal[..snapshot_at] {
                    m.apply_resync(nas(), j);
                }
                for &j in &journal[replay_from..] {
                    m.apply_resync(nas(), j);
                }
                assert_eq!(
                    m, straight,
                    "snapshot at {snapshot_at}, replay from {replay_from}"
                );
            }
        }
        assert_eq!(straight.resyncs[&nas()].len(), 1);
        assert_ne!(t("1"), t("2"));
        // Presence and length are part of the tag: no two identities share an input.
        let a = Session {
            acct_session_id: Some("ab".into()),
            ..Default::default()
        };
        let b = Session {
            audit_session_id: Some("ab".into()),
            ..Default::default()
        };
        assert_ne!(ResyncTag::of(&a), ResyncTag::of(&b));
    }

    #[test]
    fn an_interim_after_stop_does_not_resurrect_but_a_start_does() {
        let store = MemoryStore::new(TombstonePolicy::default());
        let mut feed = Feed::new();
        feed.apply(ev("n", None, upsert("a", "alice")), &store, 0)
            .unwrap();
        let stop = FeedEvent::Delete {
            acct_session_id: "a".into(),
        };
        assert_eq!(
            feed.apply(ev("n", None, stop), &store, 10),
            Ok(FeedOutcome::Deleted(true))
        );
        let interim = FeedEvent::Upsert {
            session: session("a", "alice"),
            mode: UpsertMode::Refresh,
        };
        assert_eq!(
            feed.apply(ev("n", None, interim.clone()), &store, 20),
            Ok(FeedOutcome::Upserted(Upserted::StillRemoved))
        );
        assert_eq!(store.len(), 0);
        // An Interim for a session never seen creates it (we may have missed its Start).
        let unknown = FeedEvent::Upsert {
            session: session("b", "bob"),
            mode: UpsertMode::Refresh,
        };
        assert_eq!(
            feed.apply(ev("n", None, unknown), &store, 20),
            Ok(FeedOutcome::Upserted(Upserted::Inserted))
        );
        // After the tombstone window the Interim is a session again.
        let later = TombstonePolicy::default().window_ms + 100;
        assert_eq!(
            feed.apply(ev("n", None, interim), &store, later),
            Ok(FeedOutcome::Upserted(Upserted::Inserted))
        );
        assert_eq!(
            feed.apply(ev("n", None, upsert("a", "alice")), &store, later),
            Ok(FeedOutcome::Upserted(Upserted::Replaced))
        );
    }

    #[test]
    fn a_session_without_identification_is_refused_and_the_feed_goes_on() {
        let store = MemoryStore::new(TombstonePolicy::default());
        let mut feed = Feed::new();
        let empty = FeedEvent::Upsert {
            session: Session::default(),
            mode: UpsertMode::Create,
        };
        assert_eq!(
            feed.apply(ev("n", Some(1), empty), &store, 0),
            Err(FeedError::Upsert(UpsertError::NoIdentification))
        );
        // A refused event does not consume its sequence number.
        assert!(
            feed.apply(ev("n", Some(1), upsert("a", "a")), &store, 0)
                .is_ok()
        );
    }
}
