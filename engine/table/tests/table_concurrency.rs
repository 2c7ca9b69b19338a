//! Concurrency stress tests of the session table (RFC 5176 §3: a request applies to all its
//! sessions or to none, also when requests on overlapping sessions run at the same time).
//! Bounded in count; each runs well under a few seconds in the test profile.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dynauth_proto::change::AuthorizationChange;
use dynauth_proto::codec::Packet;
use dynauth_proto::dict::attr;
use dynauth_proto::session::{Session, SessionQuery};
use dynauth_proto::store::{
    Applied, Lookup, MatchScope, Refusal, SessionStore, UpsertMode, Upserted,
};
use dynauth_table::{FlatIndex, KeyIndex, PapayaIndex, SessionTable};

const ROWS: usize = 24;
const COLS: usize = 24;

/// Session (r, c): User-Name "r{r}", Acct-Multi-Session-Id "c{c}": every row overlaps every
/// column in exactly one session.
fn grid_session(r: usize, c: usize) -> Session {
    Session {
        acct_session_id: Some(format!("s-{r}-{c}")),
        user_name: Some(format!("r{r}")),
        acct_multi_session_id: Some(format!("c{c}")),
        nas_port: Some((r * COLS + c) as u32),
        ..Session::default()
    }
}

fn lookup<'a>(query: SessionQuery<'a>, now_ms: u64) -> Lookup<'a> {
    Lookup {
        query,
        scope: MatchScope {
            vrf: None,
            max_sessions: 1000,
            tombstone_window_ms: dynauth_proto::store::NO_CLIENT_WINDOW,
        },
        now_ms,
    }
}

fn row(name: &str) -> SessionQuery<'_> {
    SessionQuery {
        user_name: Some(name.as_bytes()),
        ..Default::default()
    }
}

fn col(name: &str) -> SessionQuery<'_> {
    SessionQuery {
        acct_multi_session_id: Some(name.as_bytes()),
        ..Default::default()
    }
}

fn overlapping_disconnects_are_all_or_none<I: KeyIndex + 'static>() {
    let table = Arc::new(SessionTable::<I>::default());
    for r in 0..ROWS {
        for c in 0..COLS {
            assert!(table.insert(grid_session(r, c)));
        }
    }
    let results = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (table, results) = (table.clone(), results.clone());
            std::thread::spawn(move || {
                // Thread t takes rows (t even) or columns (t odd), in different orders.
                for k in 0..ROWS.max(COLS) {
                    let i = if t < 2 { k } else { ROWS.max(COLS) - 1 - k };
                    let name = if t % 2 == 0 {
                        format!("r{i}")
                    } else {
                        format!("c{i}")
                    };
                    let q = if t % 2 == 0 { row(&name) } else { col(&name) };
                    let answer = table.disconnect(&lookup(q, 1));
                    results.lock().unwrap().push((name, answer));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Every session removed exactly once: the counts of all answers add up to the grid (a
    // session counted by two overlapping requests would make the sum larger, one removed
    // by none would be left over).
    let mut removed = 0usize;
    for (name, answer) in results.lock().unwrap().iter() {
        let line = if name.starts_with('r') { COLS } else { ROWS };
        match answer {
            Ok(Applied::Sessions(k)) => {
                assert!(*k as usize <= line, "{name}: {k} sessions");
                removed += *k as usize;
            }
            Ok(Applied::AlreadyRemoved) | Err(Refusal::NotFound) => {}
            other => panic!("{name}: {other:?}"),
        }
    }
    assert_eq!(table.len(), 0, "every row and column was disconnected");
    assert!(table.snapshot().is_empty());
    assert_eq!(removed, ROWS * COLS, "each session removed once");
}

// RFC 5176 §3 / SPEC §6.6: overlapping multi-session Disconnects, all or none.
#[test]
fn rfc5176_s3_multi_session_is_atomic_flat() {
    overlapping_disconnects_are_all_or_none::<FlatIndex>();
}

#[test]
fn rfc5176_s3_multi_session_is_atomic_papaya() {
    overlapping_disconnects_are_all_or_none::<PapayaIndex>();
}

fn empty_coa() -> Vec<u8> {
    let mut bytes = vec![43, 1, 0, 20];
    bytes.extend_from_slice(&[0; 16]);
    bytes
}

fn filter_coa(value: &str) -> Vec<u8> {
    let mut bytes = vec![43, 1, 0, 0];
    bytes.extend_from_slice(&[0; 16]);
    bytes.extend_from_slice(&[attr::FILTER_ID, (value.len() + 2) as u8]);
    bytes.extend_from_slice(value.as_bytes());
    let len = bytes.len() as u16;
    bytes[2..4].copy_from_slice(&len.to_be_bytes());
    bytes
}

/// Four writers, each owning one authorization field, change overlapping groups (rows and
/// columns) with increasing sequence numbers; readers look sessions up all the while. At the
/// end every session holds, in every field, the last value its owner applied to a group
/// containing it: no lost update, no half-applied change. Readers never miss a live session.
fn concurrent_changes_lose_nothing<I: KeyIndex + 'static>() {
    const REQUESTS: u32 = 1500;
    let table = Arc::new(SessionTable::<I>::default());
    for r in 0..ROWS {
        for c in 0..COLS {
            assert!(table.insert(grid_session(r, c)));
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..2)
        .map(|k| {
            let (table, stop, reads) = (table.clone(), stop.clone(), reads.clone());
            std::thread::spawn(move || {
                let mut i = k;
                while !stop.load(Ordering::Relaxed) {
                    let (r, c) = (i % ROWS, (i / ROWS) % COLS);
                    let id = format!("s-{r}-{c}");
                    let q = SessionQuery {
                        acct_session_id: Some(id.as_bytes()),
                        ..Default::default()
                    };
                    assert_eq!(table.peek(&lookup(q, 1)), Ok(Applied::Sessions(1)), "{id}");
                    let name = format!("r{r}");
                    assert_eq!(
                        table.peek(&lookup(row(&name), 1)),
                        Ok(Applied::Sessions(COLS as u32))
                    );
                    reads.fetch_add(2, Ordering::Relaxed);
                    i += 7;
                }
            })
        })
        .collect();
    // expected[field][session] = last sequence applied.
    let writers: Vec<_> = (0..4usize)
        .map(|field| {
            let table = table.clone();
            std::thread::spawn(move || {
                let mut last = vec![0u32; ROWS * COLS];
                let mut state = 0x9e37_79b9u32 ^ field as u32;
                for seq in 1..=REQUESTS {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    let is_row = state & 1 == 0;
                    let i = (state >> 1) as usize % if is_row { ROWS } else { COLS };
                    let bytes = if field == 3 {
                        filter_coa(&seq.to_string())
                    } else {
                        empty_coa()
                    };
                    let packet = Packet::parse(&bytes).unwrap();
                    let mut change = AuthorizationChange::new(packet);
                    match field {
                        0 => change.session_timeout = Some(seq),
                        1 => change.idle_timeout = Some(seq),
                        2 => change.acct_interim_interval = Some(seq),
                        _ => change.replaces_filter_ids = true,
                    }
                    let name = if is_row {
                        format!("r{i}")
                    } else {
                        format!("c{i}")
                    };
                    let q = if is_row { row(&name) } else { col(&name) };
                    let n = if is_row { COLS } else { ROWS };
                    assert_eq!(
                        table.change(&lookup(q, 1), &change),
                        Ok(Applied::Sessions(n as u32))
                    );
                    for other in 0..n {
                        let (r, c) = if is_row { (i, other) } else { (other, i) };
                        last[r * COLS + c] = seq;
                    }
                }
                last
            })
        })
        .collect();
    let expected: Vec<Vec<u32>> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    assert!(reads.load(Ordering::Relaxed) > 0);
    for r in 0..ROWS {
        for c in 0..COLS {
            let id = format!("s-{r}-{c}");
            let q = SessionQuery {
                acct_session_id: Some(id.as_bytes()),
                ..Default::default()
            };
            let got = table.matching(&lookup(q, 1));
            let a = &got[0].authorization;
            let want = |f: usize| expected[f][r * COLS + c];
            let opt = |v: u32| (v != 0).then_some(v);
            assert_eq!(a.session_timeout, opt(want(0)), "{id} session_timeout");
            assert_eq!(a.idle_timeout, opt(want(1)), "{id} idle_timeout");
            assert_eq!(a.acct_interim_interval, opt(want(2)), "{id} interim");
            let filters: Vec<String> = match want(3) {
                0 => vec![],
                v => vec![v.to_string()],
            };
            assert_eq!(a.filter_ids, filters, "{id} filter_ids");
        }
    }
}

// RFC 5176 §3, SPEC §8: concurrent CoA on overlapping sessions, no lost update.
#[test]
fn rfc5176_s3_concurrent_coa_no_lost_update_flat() {
    concurrent_changes_lose_nothing::<FlatIndex>();
}

#[test]
fn rfc5176_s3_concurrent_coa_no_lost_update_papaya() {
    concurrent_changes_lose_nothing::<PapayaIndex>();
}

/// Readers racing inserts, removals and index rebuilds never miss a session that stays
/// live, and never see a removed one come back.
#[test]
fn lookups_never_miss_a_stable_session_during_churn() {
    let table = Arc::new(SessionTable::<FlatIndex>::default());
    let stable: Vec<Session> = dynauth_proto::synth::sessions(1, 2000).collect();
    for s in &stable {
        assert!(table.insert(s.clone()));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (table, stop) = (table.clone(), stop.clone());
        std::thread::spawn(move || {
            // Grows the table past several index rebuilds, removing as it goes.
            for i in 0..30_000u64 {
                // Same User-Name and NAS-Port-Id as a stable session, other addresses.
                let s = Session {
                    framed_ip: Some(core::net::Ipv4Addr::from(0xac10_0000 + i as u32)),
                    ..dynauth_proto::synth::session(2, i)
                };
                if !table.insert(s) {
                    stop.store(true, Ordering::Relaxed);
                    panic!("insert {i} refused");
                }
                if i >= 100 {
                    let id = dynauth_proto::synth::acct_session_id(2, i - 100);
                    let q = SessionQuery {
                        acct_session_id: Some(id.as_bytes()),
                        ..Default::default()
                    };
                    let answer = table.disconnect(&lookup(q, i));
                    if answer != Ok(Applied::Sessions(1)) {
                        stop.store(true, Ordering::Relaxed);
                        panic!("disconnect {i}: {answer:?}");
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
        })
    };
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let s = &stable[i % stable.len()];
        let q = SessionQuery {
            acct_session_id: s.acct_session_id.as_deref().map(str::as_bytes),
            calling_station_id: s.calling_station_id.as_deref().map(str::as_bytes),
            ..Default::default()
        };
        assert_eq!(table.peek(&lookup(q, 0)), Ok(Applied::Sessions(1)));
        let q = SessionQuery {
            framed_ip: s.framed_ip,
            ..Default::default()
        };
        assert_eq!(table.matching(&lookup(q, 0)), vec![s.clone()]);
        i += 1;
    }
    churn.join().unwrap();
    assert_eq!(table.len(), 2000 + 100);
}

/// Readers never see a torn record: one CoA sets Session-Timeout and Idle-Timeout to the
/// same value (new versions alternate between the inline cell and the overflow arena), and
/// every concurrent read shows the two equal.
#[test]
fn readers_never_see_a_torn_record() {
    let table = Arc::new(SessionTable::<FlatIndex>::default());
    for c in 0..4 {
        assert!(table.insert(grid_session(0, c)));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (table, stop) = (table.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seen = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for s in table.matching(&lookup(row("r0"), 1)) {
                        let a = &s.authorization;
                        assert_eq!(a.session_timeout, a.idle_timeout, "torn read");
                        assert_eq!(s.user_name.as_deref(), Some("r0"));
                        seen += 1;
                    }
                }
                seen
            })
        })
        .collect();
    let bytes = empty_coa();
    for n in 1..=20_000u32 {
        let mut change = AuthorizationChange::new(Packet::parse(&bytes).unwrap());
        change.session_timeout = Some(n);
        change.idle_timeout = Some(n);
        assert_eq!(
            table.change(&lookup(row("r0"), 1), &change),
            Ok(Applied::Sessions(4))
        );
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    for s in table.snapshot() {
        assert_eq!(s.authorization.session_timeout, Some(20_000));
    }
}

const FEED_NASES: [&str; 2] = ["bng-1", "bng-2"];
const FEED_SESSIONS: usize = 24;
const FEED_ROUNDS: u32 = 300;

/// Version `v` of feed session `i` of NAS `n`: the Acct-Session-Id "acct-{i}" on both NASes
/// (unique per NAS) and the User-Name stay; NAS-Port and Session-Timeout both carry `v`;
/// Framed-IP-Address alternates between two values, Calling-Station-Id comes and goes, and
/// the Filter-Ids grow and shrink so that versions move between inline cell and overflow.
fn feed_session(n: usize, i: usize, v: u32) -> Session {
    let mut s = Session {
        acct_session_id: Some(format!("acct-{i}")),
        user_name: Some(format!("u-{n}-{i}")),
        framed_ip: Some(core::net::Ipv4Addr::new(
            10,
            n as u8,
            i as u8,
            1 + (v % 2) as u8,
        )),
        calling_station_id: (!v.is_multiple_of(3)).then(|| format!("02-00-00-00-{n:02X}-{i:02X}")),
        nas_port: Some(v),
        nas: Some(FEED_NASES[n].into()),
        ..Session::default()
    };
    s.authorization.session_timeout = Some(v);
    s.authorization.filter_ids = (0..v % 4).map(|k| format!("filter-{k}-{v}")).collect();
    s
}

/// Session feed, RFC 5176 §3: an upsert replaces a session atomically for lock-free readers.
/// One writer re-upserts every session over and over (changing other fields and some keys);
/// readers looking a session up by its Acct-Session-Id (shared by both NASes), by
/// Acct-Session-Id + User-Name, or by User-Name alone always find exactly the sessions that
/// exist — never none (a delete-then-insert), never one more (an insert-then-delete) — and
/// read one whole version. A lookup by the alternating Framed-IP-Address finds at most one.
fn upserts_are_atomic_for_readers<I: KeyIndex + 'static>() {
    let table = Arc::new(SessionTable::<I>::default());
    for n in 0..FEED_NASES.len() {
        for i in 0..FEED_SESSIONS {
            assert!(table.insert(feed_session(n, i, 0)));
        }
    }
    let total = FEED_NASES.len() * FEED_SESSIONS;
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let readers: Vec<_> = (0..2)
        .map(|t| {
            let (table, stop) = (table.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                let mut k = t * 7;
                while !stop.load(Ordering::Relaxed) && reads < 5_000_000 {
                    assert!(std::time::Instant::now() < deadline, "test ran too long");
                    let (n, i) = (k % FEED_NASES.len(), (k / 2) % FEED_SESSIONS);
                    k += 1;
                    let acct = format!("acct-{i}");
                    let user = format!("u-{n}-{i}");
                    let by_acct = SessionQuery {
                        acct_session_id: Some(acct.as_bytes()),
                        ..Default::default()
                    };
                    assert_eq!(
                        table.peek(&lookup(by_acct, 1)),
                        Ok(Applied::Sessions(2)),
                        "{acct} on both NASes"
                    );
                    let by_both = SessionQuery {
                        user_name: Some(user.as_bytes()),
                        ..by_acct
                    };
                    let got = table.matching(&lookup(by_both, 1));
                    assert_eq!(got.len(), 1, "{acct} + {user}: {got:?}");
                    let s = &got[0];
                    let v = s.nas_port.unwrap();
                    assert_eq!(s, &feed_session(n, i, v), "one whole version");
                    let by_user = SessionQuery {
                        user_name: Some(user.as_bytes()),
                        ..Default::default()
                    };
                    assert_eq!(
                        table.peek(&lookup(by_user, 1)),
                        Ok(Applied::Sessions(1)),
                        "{user}"
                    );
                    let ip = SessionQuery {
                        framed_ip: Some(core::net::Ipv4Addr::new(10, n as u8, i as u8, 1)),
                        ..Default::default()
                    };
                    let answer = table.peek(&lookup(ip, 1));
                    assert!(
                        matches!(answer, Ok(Applied::Sessions(1)) | Err(Refusal::NotFound)),
                        "{user} by address: {answer:?}"
                    );
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    let writer = {
        let (table, stop) = (table.clone(), stop.clone());
        std::thread::spawn(move || {
            let _stop_on_exit = StopOnDrop(stop);
            for v in 1..=FEED_ROUNDS {
                for i in 0..FEED_SESSIONS {
                    for n in 0..FEED_NASES.len() {
                        let mode = if v % 2 == 0 {
                            UpsertMode::Create
                        } else {
                            UpsertMode::Refresh
                        };
                        assert_eq!(
                            table.upsert(feed_session(n, i, v), mode, u64::from(v)),
                            Ok(Upserted::Replaced)
                        );
                    }
                }
            }
        })
    };
    writer.join().unwrap();
    for r in readers {
        assert!(r.join().unwrap() > 0, "the readers ran");
    }
    assert_eq!(table.len(), total);
    let mut want: Vec<Session> = (0..FEED_NASES.len())
        .flat_map(|n| (0..FEED_SESSIONS).map(move |i| feed_session(n, i, FEED_ROUNDS)))
        .collect();
    let mut got = table.snapshot();
    let order = |s: &Session| (s.nas.clone(), s.user_name.clone());
    want.sort_by_key(order);
    got.sort_by_key(order);
    assert_eq!(got, want);
    // Index entries did not pile up: one per key value held.
    let index_entries = table.stats().index_entries;
    let fresh = SessionTable::<I>::with_sessions(want);
    assert_eq!(index_entries, fresh.stats().index_entries);
}

/// Stops the readers also when the writer panics.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn feed_upsert_is_atomic_for_readers_flat() {
    upserts_are_atomic_for_readers::<FlatIndex>();
}

#[test]
fn feed_upsert_is_atomic_for_readers_papaya() {
    upserts_are_atomic_for_readers::<PapayaIndex>();
}
