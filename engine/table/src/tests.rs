//! Unit tests of the session table (both index designs).
use core::net::Ipv4Addr;

use super::*;
use dynauth_proto::session::SessionQuery;
use dynauth_proto::store::{MatchScope, MemoryStore};

fn s(id: &str, user: &str) -> Session {
    Session {
        acct_session_id: Some(id.into()),
        user_name: Some(user.into()),
        ..Default::default()
    }
}

fn lookup(query: SessionQuery<'_>, max: u32, now_ms: u64) -> Lookup<'_> {
    Lookup {
        query,
        scope: MatchScope {
            vrf: None,
            max_sessions: max,
            tombstone_window_ms: dynauth_proto::store::NO_CLIENT_WINDOW,
        },
        now_ms,
    }
}

fn user(u: &str) -> SessionQuery<'_> {
    SessionQuery {
        user_name: Some(u.as_bytes()),
        ..Default::default()
    }
}

fn acct(a: &str) -> SessionQuery<'_> {
    SessionQuery {
        acct_session_id: Some(a.as_bytes()),
        ..Default::default()
    }
}

fn basics<I: KeyIndex>() {
    let t = SessionTable::<I>::with_sessions([s("a", "u"), s("b", "u"), s("c", "v")]);
    assert_eq!(t.len(), 3);
    assert!(!t.insert(s("a", "w")), "acct_session_id is unique");
    assert_eq!(
        t.disconnect(&lookup(user("u"), 1, 0)),
        Err(Refusal::TooManySessions)
    );
    let q = SessionQuery {
        acct_session_id: Some(b"a"),
        user_name: Some(b"v"),
        ..Default::default()
    };
    assert_eq!(t.disconnect(&lookup(q, 9, 0)), Err(Refusal::Contradicted));
    assert_eq!(
        t.disconnect(&lookup(acct("zz"), 9, 0)),
        Err(Refusal::NotFound)
    );
    assert_eq!(t.len(), 3);
    assert_eq!(
        t.disconnect(&lookup(user("u"), 9, 0)),
        Ok(Applied::Sessions(2))
    );
    assert_eq!(t.len(), 1);
    // SPEC §4: the late retry within the window.
    assert_eq!(
        t.disconnect(&lookup(user("u"), 9, 10)),
        Ok(Applied::AlreadyRemoved)
    );
    assert_eq!(
        t.disconnect(&lookup(acct("a"), 9, 10)),
        Ok(Applied::AlreadyRemoved)
    );
    // A CoA never answers from tombstones.
    assert_eq!(
        t.reauthorize(&lookup(acct("a"), 9, 10)),
        Err(Refusal::NotFound)
    );
    // The key is free again for a new session.
    assert!(t.insert(s("a", "x")));
    assert_eq!(t.snapshot().len(), 2);
    assert_eq!(t.matching(&lookup(acct("a"), 9, 10)), vec![s("a", "x")]);
}

#[test]
fn flat_table_basics() {
    basics::<FlatIndex>();
}

#[test]
fn papaya_table_basics() {
    basics::<PapayaIndex>();
}

// SPEC §4: tombstones are time-limited and bounded.
#[test]
fn spec_4_tombstones_expire_and_are_bounded() {
    let t = SessionTable::<FlatIndex>::new(TableConfig {
        tombstones: TombstonePolicy {
            window_ms: 500,
            capacity: 2,
        },
        ..TableConfig::default()
    });
    for i in 0..5 {
        t.insert(s(&format!("s{i}"), "u"));
    }
    for i in 0..5 {
        let id = format!("s{i}");
        assert_eq!(
            t.disconnect(&lookup(acct(&id), 9, 1000)),
            Ok(Applied::Sessions(1))
        );
    }
    assert_eq!(t.stats().tombstones, 2);
    // Only the two newest are remembered.
    let late = |id: &str, now| t.disconnect(&lookup(acct(id), 9, now));
    assert_eq!(late("s0", 1100), Err(Refusal::NotFound));
    assert_eq!(late("s4", 1100), Ok(Applied::AlreadyRemoved));
    assert_eq!(late("s3", 1500), Ok(Applied::AlreadyRemoved));
    assert_eq!(late("s3", 1501), Err(Refusal::NotFound));
    // Expired tombstones leave the indexes and the arena.
    assert_eq!(t.stats().tombstones, 0);
    assert_eq!(t.stats().index_entries, 0);
    assert_eq!(t.stats().record_bytes, 0);
}

// SPEC §4.6 (issue #14, defect 6): a storm larger than the old fixed cap of 65,536 keeps
// every tombstone within the window with the default capacity: at 100,000 Disconnects/s,
// the earliest of 100,000 still gets ACK 201 at the end of the 300 s window, nothing is
// evicted early; then all expire.
#[test]
fn spec_4_6_storm_larger_than_the_old_cap_keeps_201_for_the_earliest() {
    let n = 100_000u64;
    assert!(TombstonePolicy::default().capacity as u64 > n && n > 65_536);
    let t = SessionTable::<FlatIndex>::new(TableConfig::default());
    for i in 0..n {
        t.insert(s(&format!("s{i}"), "u"));
    }
    let start = 1_000;
    for i in 0..n {
        let id = format!("s{i}");
        // 100 per millisecond: 100,000/s.
        let now = start + i / 100;
        assert_eq!(
            t.disconnect(&lookup(acct(&id), 9, now)),
            Ok(Applied::Sessions(1))
        );
    }
    assert_eq!(t.stats().tombstones, n as usize);
    let window = TombstonePolicy::default().window_ms;
    let late = |id: &str, now| t.disconnect(&lookup(acct(id), 9, now));
    assert_eq!(late("s0", start + window), Ok(Applied::AlreadyRemoved));
    assert_eq!(late("s99999", start + window), Ok(Applied::AlreadyRemoved));
    assert_eq!(t.tombstone_stats().evicted_early, 0);
    assert_eq!(late("s0", start + window + 1), Err(Refusal::NotFound));
    assert_eq!(
        late("s99999", start + 1000 + window + 1),
        Err(Refusal::NotFound)
    );
    assert_eq!(t.stats().tombstones, 0);
    assert_eq!(t.tombstone_stats().expired, n);
}

// SPEC §4.6: when the capacity is too small for the removal rate, the window is cut short in
// a counted way: each tombstone evicted within its window is `evicted_early` (and a late
// retry for it is NAK 503); one evicted after its window is counted as expired.
#[test]
fn spec_4_6_early_eviction_is_counted() {
    let t = SessionTable::<FlatIndex>::new(TableConfig {
        tombstones: TombstonePolicy {
            window_ms: 1_000,
            capacity: 3,
        },
        ..TableConfig::default()
    });
    for i in 0..10 {
        t.insert(s(&format!("s{i}"), "u"));
    }
    for i in 0..8u64 {
        let id = format!("s{i}");
        assert_eq!(
            t.disconnect(&lookup(acct(&id), 9, 100 + i)),
            Ok(Applied::Sessions(1))
        );
    }
    assert_eq!(
        t.tombstone_stats(),
        dynauth_proto::store::TombstoneStats {
            expired: 0,
            evicted_early: 5
        }
    );
    assert_eq!(
        t.disconnect(&lookup(acct("s0"), 9, 200)),
        Err(Refusal::NotFound)
    );
    assert_eq!(
        t.disconnect(&lookup(acct("s7"), 9, 200)),
        Ok(Applied::AlreadyRemoved)
    );
    // After the window: expiry, counted as such.
    assert_eq!(
        t.disconnect(&lookup(acct("s8"), 9, 5_000)),
        Ok(Applied::Sessions(1))
    );
    let stats = t.tombstone_stats();
    assert_eq!((stats.expired, stats.evicted_early), (3, 5));
    // The reference store counts the same way.
    let m = MemoryStore::new(TombstonePolicy {
        window_ms: 1_000,
        capacity: 3,
    });
    for i in 0..8u64 {
        let id = format!("s{i}");
        m.insert(s(&id, "u"));
        m.disconnect(&lookup(acct(&id), 9, 100 + i)).unwrap();
    }
    assert_eq!(m.tombstone_stats().evicted_early, 5);
}

// SPEC §4.6: the table honours each request's window (the client's) within its own.
#[test]
fn spec_4_6_tombstone_window_follows_the_lookup_scope() {
    let t = SessionTable::<FlatIndex>::with_sessions([s("a", "u")]);
    t.disconnect(&lookup(acct("a"), 9, 1_000)).unwrap();
    let with_window = |window_ms, now_ms| {
        let mut l = lookup(acct("a"), 9, now_ms);
        l.scope.tombstone_window_ms = window_ms;
        t.peek(&l)
    };
    assert_eq!(with_window(10_000, 11_000), Ok(Applied::AlreadyRemoved));
    assert_eq!(with_window(10_000, 11_001), Err(Refusal::NotFound));
    // A client window longer than the table's is capped by the table's (300 s).
    assert_eq!(with_window(600_000, 301_000), Ok(Applied::AlreadyRemoved));
    assert_eq!(with_window(600_000, 301_001), Err(Refusal::NotFound));
}

// RFC 5176 §2.1 (ACK after commit): `select` changes nothing (lock-free); the commit
// removes exactly the sessions the data plane tore down, each with a tombstone (SPEC §4),
// and a session the data plane did not know without one; a CoA commit changes only those.
#[test]
fn rfc5176_s2_1_select_changes_nothing_commit_applies_what_committed() {
    fn check<I: KeyIndex>() {
        let t = SessionTable::<I>::with_sessions([s("a", "u"), s("b", "u"), s("c", "v")]);
        let mut selected = Vec::new();
        assert_eq!(
            t.select(&lookup(user("u"), 9, 0), true, &mut selected),
            Ok(Applied::Sessions(2))
        );
        assert_eq!(t.len(), 3);
        assert_eq!(t.stats().tombstones, 0);
        selected.sort_by(|x, y| x.acct_session_id.cmp(&y.acct_session_id));
        let bytes = filter_coa("gold");
        let change = filter_change(&bytes);
        assert_eq!(t.change_sessions(&selected[1..], &change, 0), Ok(1));
        assert_eq!(
            t.matching(&lookup(acct("b"), 9, 0))[0]
                .authorization
                .filter_ids,
            vec!["gold".to_string()]
        );
        assert!(
            t.matching(&lookup(acct("a"), 9, 0))[0]
                .authorization
                .filter_ids
                .is_empty()
        );
        assert_eq!(t.remove_sessions(&selected[..1], true, 5), Ok(1));
        assert_eq!(t.remove_sessions(&selected[1..], false, 5), Ok(1));
        assert_eq!(t.remove_sessions(&selected, true, 5), Ok(0), "already gone");
        assert_eq!(t.len(), 1);
        assert_eq!(t.stats().tombstones, 1);
        assert_eq!(
            t.disconnect(&lookup(acct("a"), 9, 6)),
            Ok(Applied::AlreadyRemoved)
        );
        assert_eq!(
            t.disconnect(&lookup(acct("b"), 9, 6)),
            Err(Refusal::NotFound)
        );
        let mut none = Vec::new();
        assert_eq!(
            t.select(&lookup(acct("a"), 9, 6), true, &mut none),
            Ok(Applied::AlreadyRemoved)
        );
        assert_eq!(
            t.select(&lookup(acct("a"), 9, 6), false, &mut none),
            Err(Refusal::NotFound)
        );
        assert!(none.is_empty());
    }
    check::<FlatIndex>();
    check::<PapayaIndex>();
}

// SPEC §6.7: the same address in two routing contexts.
#[test]
fn spec_6_7_address_unique_within_context() {
    let t = SessionTable::<FlatIndex>::default();
    let mk = |id: &str, apn: &str| Session {
        acct_session_id: Some(id.into()),
        framed_ip: Some(Ipv4Addr::new(10, 0, 0, 1)),
        framed_ipv6_prefix: "2001:db8::/64".parse().ok(),
        called_station_id: Some(apn.into()),
        ..Default::default()
    };
    assert!(t.insert(mk("a", "ims")));
    assert!(t.insert(mk("b", "internet")));
    assert_eq!(
        t.try_insert(&mk("c", "ims")),
        Err(InsertError::Duplicate {
            key: "framed_ip",
            existing: 0
        })
    );
    let q = SessionQuery {
        framed_ipv6_prefix: "2001:db8::5/64".parse().ok(),
        called_station_id: Some(b"internet"),
        ..Default::default()
    };
    assert_eq!(t.matching(&lookup(q, 9, 0)), vec![mk("b", "internet")]);
    let q = SessionQuery {
        framed_ip: Some(Ipv4Addr::new(10, 0, 0, 1)),
        ..Default::default()
    };
    assert_eq!(t.peek(&lookup(q, 1, 0)), Err(Refusal::TooManySessions));
}

// Keys without an index of their own: a scan, refused above `max_scan`.
#[test]
fn called_station_id_alone_scans_within_bound() {
    let mut sessions: Vec<Session> = dynauth_proto::synth::sessions(1, 10).collect();
    sessions[3].called_station_id = Some("ims".into());
    let t = SessionTable::<FlatIndex>::with_sessions(sessions.clone());
    let q = SessionQuery {
        called_station_id: Some(b"ims"),
        ..Default::default()
    };
    assert_eq!(t.matching(&lookup(q, 9, 0)), vec![sessions[3].clone()]);
    let small = SessionTable::<FlatIndex>::new(TableConfig {
        max_scan: 5,
        ..TableConfig::default()
    });
    for x in sessions {
        small.insert(x);
    }
    assert_eq!(small.peek(&lookup(q, 9, 0)), Err(Refusal::Unavailable));
}

#[test]
fn every_synthetic_key_finds_its_session() {
    let t = SessionTable::<FlatIndex>::with_sessions(dynauth_proto::synth::sessions(5, 3000));
    for i in (0..3000).step_by(97) {
        let want = dynauth_proto::synth::session(5, i);
        let mac = dynauth_proto::synth::calling_station_id(5, i);
        let port = dynauth_proto::synth::nas_port_id(i);
        for q in [
            SessionQuery {
                calling_station_id: Some(mac.as_bytes()),
                ..Default::default()
            },
            SessionQuery {
                nas_port_id: Some(port.as_bytes()),
                ..Default::default()
            },
            SessionQuery {
                framed_ip: Some(dynauth_proto::synth::framed_ip(i)),
                ..Default::default()
            },
        ] {
            assert_eq!(t.matching(&lookup(q, 9, 0)), vec![want.clone()]);
        }
    }
}

// The control plane's removal leaves no tombstone (SPEC §4 tombstones are for Disconnects).
#[test]
fn control_plane_remove_leaves_no_tombstone() {
    let t = SessionTable::<FlatIndex>::with_sessions([s("a", "u"), s("b", "u"), s("c", "v")]);
    assert_eq!(
        t.remove(&lookup(user("u"), 1, 0)),
        Err(Refusal::TooManySessions)
    );
    assert_eq!(t.len(), 3);
    assert_eq!(t.remove(&lookup(user("u"), 9, 0)), Ok(2));
    assert_eq!(t.len(), 1);
    assert_eq!(t.stats().tombstones, 0);
    assert_eq!(
        t.disconnect(&lookup(acct("a"), 9, 1)),
        Err(Refusal::NotFound)
    );
    assert!(t.insert(s("a", "u")));
    assert_eq!(t.stats().index_entries, 4);
}

// A key value shared by more sessions than an index keeps per group: found by scan, exactly.
#[test]
fn huge_multi_session_group_is_found_by_scan() {
    let n = index::MAX_GROUP + 100;
    let t = SessionTable::<FlatIndex>::default();
    for i in 0..n {
        assert!(t.insert(s(&format!("s{i}"), "guest")));
    }
    assert!(t.insert(s("other", "alice")));
    assert_eq!(
        t.peek(&lookup(user("guest"), n as u32, 0)),
        Ok(Applied::Sessions(n as u32))
    );
    assert_eq!(
        t.disconnect(&lookup(user("guest"), 10, 0)),
        Err(Refusal::TooManySessions)
    );
    assert_eq!(
        t.peek(&lookup(acct("s4000"), 1, 0)),
        Ok(Applied::Sessions(1))
    );
    assert_eq!(
        t.disconnect(&lookup(user("guest"), n as u32, 0)),
        Ok(Applied::Sessions(n as u32))
    );
    assert_eq!(t.len(), 1);
    assert_eq!(
        t.disconnect(&lookup(user("guest"), n as u32, 1)),
        Ok(Applied::AlreadyRemoved)
    );
}

/// A session with every key set; `n` makes every value distinct.
fn full(n: u8) -> Session {
    Session {
        acct_session_id: Some(format!("acct-{n}")),
        acct_multi_session_id: Some(format!("multi-{n}")),
        user_name: Some(format!("user-{n}")),
        cui: Some(format!("cui-{n}")),
        framed_ip: Some(Ipv4Addr::new(10, 0, 0, n)),
        framed_ipv6_prefix: format!("2001:db8:{n}::/48").parse().ok(),
        framed_interface_id: Some(0x0200_5eff_fe00_0000 | u64::from(n)),
        called_station_id: Some(format!("apn-{n}")),
        // Canonical MAC form: stored packed.
        calling_station_id: Some(format!("02-00-5E-00-53-{n:02X}")),
        nas_port: Some(u32::from(n)),
        nas_port_id: Some(format!("ge-0/0/{n}")),
        imsi: Some(format!("00101012345678{n}")),
        nsapi: Some(format!("{n}")),
        audit_session_id: Some(format!("audit-{n}")),
        vrf: None,
        nas: Some(format!("nas-{n}")),
        authorization: Default::default(),
    }
}

/// The query holding only `key`, with `s`'s value.
fn only(s: &Session, key: Key) -> SessionQuery<'_> {
    let mut q = SessionQuery::default();
    q.set(key, s.get(key)).unwrap();
    q
}

// Each key alone finds exactly its session, in the reference store and in both tables;
// 3GPP-NSAPI alone identifies nothing.
#[test]
fn every_single_key_finds_its_session_in_every_store() {
    let sessions = [full(1), full(2), full(3)];
    let memory = dynauth_proto::store::MemoryStore::with_sessions(sessions.clone());
    let flat = SessionTable::<FlatIndex>::with_sessions(sessions.clone());
    let papaya = SessionTable::<PapayaIndex>::with_sessions(sessions.clone());
    assert_eq!(flat.len(), 3);
    assert_eq!(papaya.len(), 3);
    let want = &sessions[1];
    for key in Key::ALL {
        let l = lookup(only(want, key), 9, 0);
        let expected = if key.identifies_alone() {
            Ok(Applied::Sessions(1))
        } else {
            Err(Refusal::NotFound)
        };
        assert_eq!(memory.reauthorize(&l), expected, "{key}");
        assert_eq!(flat.reauthorize(&l), expected, "{key}");
        assert_eq!(papaya.reauthorize(&l), expected, "{key}");
        if key.identifies_alone() {
            assert_eq!(flat.matching(&l), vec![want.clone()], "{key}");
            assert_eq!(papaya.matching(&l), vec![want.clone()], "{key}");
        }
        // Any other session's value of this key contradicts (AND semantics).
        let mut q = SessionQuery::from(want);
        q.set(key, sessions[2].get(key)).unwrap();
        let l = lookup(q, 9, 0);
        assert_eq!(memory.reauthorize(&l), flat.reauthorize(&l), "{key}");
        assert_eq!(flat.matching(&l), vec![], "{key}");
    }
}

// The index numbering is a bijection from the indexed keys onto the table's index array:
// a session with one key has exactly one entry, in that key's index.
#[test]
fn each_key_has_its_own_index() {
    let s = full(7);
    let mut seen = [false; Key::INDEXED];
    for key in Key::ALL {
        let t = SessionTable::<FlatIndex>::default();
        let mut lone = Session::default();
        lone.set(key, s.get(key)).unwrap();
        assert!(t.try_insert(&lone).is_ok(), "{key}");
        let counts: Vec<usize> = t.indexes.iter().map(KeyIndex::len).collect();
        match key.index() {
            Some(n) => {
                assert!(!seen[n], "{key} shares index {n}");
                seen[n] = true;
                let mut want = vec![0; Key::INDEXED];
                want[n] = 1;
                assert_eq!(counts, want, "{key}");
            }
            None => assert_eq!(counts, vec![0; Key::INDEXED], "{key}"),
        }
    }
    assert!(seen.iter().all(|&s| s), "every index belongs to a key");
    let t = SessionTable::<FlatIndex>::with_sessions([s]);
    assert_eq!(t.stats().index_entries, Key::INDEXED);
}

// Every unique key refuses a second live session with its value (as `Key::uniqueness`
// says), by name, in `try_insert` and in a bulk load.
#[test]
fn every_unique_key_refuses_a_duplicate() {
    let first = full(1);
    for key in Key::ALL {
        let mut lone = Session::default();
        lone.set(key, first.get(key)).unwrap();
        // The same value of `key`, in a session told apart by another key.
        let mut second = lone.clone();
        let other = if key == Key::AcctSessionId {
            Key::UserName
        } else {
            Key::AcctSessionId
        };
        second.set(other, Some(KeyValue::Text(b"other"))).unwrap();
        let t = SessionTable::<FlatIndex>::with_sessions([lone.clone()]);
        let result = t.try_insert(&second);
        let text = [&lone, &second]
            .map(|s| serde_json::to_string(s).unwrap())
            .join("\n");
        let loaded = load::load_jsonl::<FlatIndex>(
            text.as_bytes(),
            TableConfig::default(),
            None,
            &mut |_| {},
        );
        match key.uniqueness() {
            Uniqueness::Shared => {
                assert!(result.is_ok(), "{key}");
                assert!(loaded.is_ok() || !lone.has_identification(), "{key}");
            }
            _ => {
                let name = unique_name(key);
                assert_eq!(
                    result,
                    Err(InsertError::Duplicate {
                        key: name,
                        existing: 0
                    }),
                    "{key}"
                );
                assert!(
                    matches!(loaded, Err(load::LoadError::Duplicate { key: k, line: 2, first: 1 }) if k == name),
                    "{key}"
                );
            }
        }
    }
    assert_eq!(unique_name(Key::Imsi), "imsi+nsapi");
    assert_eq!(unique_name(Key::FramedIp), "framed_ip");
}

/// A session of NAS `nas` (the session feed sets it).
fn on(nas: Option<&str>, id: &str, user: &str) -> Session {
    Session {
        nas: nas.map(String::from),
        ..s(id, user)
    }
}

/// The reference store and both tables, with the same tombstone policy.
fn feed_stores(tombstones: TombstonePolicy) -> Vec<(&'static str, Box<dyn SessionStore>)> {
    let config = TableConfig {
        tombstones,
        ..TableConfig::default()
    };
    vec![
        ("memory", Box::new(MemoryStore::new(tombstones))),
        ("flat", Box::new(SessionTable::<FlatIndex>::new(config))),
        ("papaya", Box::new(SessionTable::<PapayaIndex>::new(config))),
    ]
}

fn count(store: &dyn SessionStore, q: SessionQuery<'_>) -> Result<Applied, Refusal> {
    store.reauthorize(&lookup(q, 10_000, 0))
}

// RFC 2866 §5.5: Acct-Session-Id is unique on one NAS only.
#[test]
fn acct_session_id_is_unique_per_nas() {
    for (name, store) in feed_stores(TombstonePolicy::default()) {
        let store = store.as_ref();
        assert!(store.insert(on(Some("n1"), "a", "alice")), "{name}");
        assert!(store.insert(on(Some("n2"), "a", "bob")), "{name}");
        // No NAS is one NAS of its own.
        assert!(store.insert(on(None, "a", "carol")), "{name}");
        assert!(
            !store.insert(on(Some("n1"), "a", "dave")),
            "{name}: same NAS"
        );
        assert!(!store.insert(on(None, "a", "dave")), "{name}: no NAS twice");
        assert_eq!(count(store, acct("a")), Ok(Applied::Sessions(3)), "{name}");
        // The same NAS's session is replaced by an upsert.
        assert_eq!(
            store.upsert(on(Some("n1"), "a", "dave"), UpsertMode::Create, 0),
            Ok(Upserted::Replaced),
            "{name}"
        );
        assert_eq!(store.len(), 3, "{name}");
        assert_eq!(
            count(store, user("alice")),
            Err(Refusal::NotFound),
            "{name}"
        );
        assert_eq!(
            count(store, user("dave")),
            Ok(Applied::Sessions(1)),
            "{name}"
        );
        assert_eq!(
            count(store, user("bob")),
            Ok(Applied::Sessions(1)),
            "{name}"
        );
        // Delete is per NAS too.
        assert!(!store.delete(Some("n3"), "a", 0), "{name}");
        assert!(store.delete(Some("n2"), "a", 0), "{name}");
        assert!(!store.delete(Some("n2"), "a", 0), "{name}: already gone");
        assert_eq!(count(store, acct("a")), Ok(Applied::Sessions(2)), "{name}");
        // The delete left a tombstone (a late Disconnect gets ACK + 201).
        assert_eq!(
            store.disconnect(&lookup(user("bob"), 9, 1)),
            Ok(Applied::AlreadyRemoved),
            "{name}"
        );
        // Other unique keys stay unique across NASes.
        let mut cui = on(Some("n1"), "c1", "x");
        cui.cui = Some("chargeable".into());
        assert!(store.insert(cui.clone()), "{name}");
        cui.nas = Some("n2".into());
        cui.acct_session_id = Some("c2".into());
        assert_eq!(
            store.upsert(cui, UpsertMode::Create, 0),
            Err(UpsertError::KeyTaken("cui")),
            "{name}"
        );
        assert_eq!(
            store.upsert(Session::default(), UpsertMode::Create, 0),
            Err(UpsertError::NoIdentification),
            "{name}"
        );
    }
    // The table names the record that holds the key: still the one replaced in place.
    let t = SessionTable::<FlatIndex>::default();
    let id = t.try_insert(&on(Some("n1"), "a", "alice")).unwrap();
    t.try_insert(&on(Some("n2"), "a", "bob")).unwrap();
    for v in 0..5 {
        let next = Session {
            framed_ip: Some(Ipv4Addr::new(10, 0, 0, v)),
            ..on(Some("n1"), "a", &format!("v{v}"))
        };
        assert_eq!(
            t.upsert(next, UpsertMode::Refresh, 0),
            Ok(Upserted::Replaced)
        );
    }
    assert_eq!(
        t.try_insert(&on(Some("n1"), "a", "eve")),
        Err(InsertError::Duplicate {
            key: "acct_session_id",
            existing: id
        })
    );
    // A bulk load checks the same rule.
    let lines = |nas2: &str| {
        format!(
            "{{\"acct_session_id\":\"a\",\"nas\":\"n1\"}}\n{{\"acct_session_id\":\"a\",\"nas\":\"{nas2}\"}}\n"
        )
    };
    let load = |text: String| {
        load::load_jsonl::<FlatIndex>(text.as_bytes(), TableConfig::default(), None, &mut |_| {})
    };
    assert_eq!(load(lines("n2")).map(|(t, _)| t.len()).ok(), Some(2));
    assert!(matches!(
        load(lines("n1")),
        Err(load::LoadError::Duplicate {
            key: "acct_session_id",
            line: 2,
            first: 1
        })
    ));
}

// Accounting Interim after Stop (the feed's Refresh): no resurrection within the tombstone
// window; a session again after it, or with Create, or without tombstones.
#[test]
fn refresh_after_delete_within_and_after_the_tombstone_window() {
    let policy = TombstonePolicy {
        window_ms: 500,
        capacity: 16,
    };
    for (name, store) in feed_stores(policy) {
        let store = store.as_ref();
        let n1 = |u: &str| on(Some("n1"), "a", u);
        let refresh = |u: &str, now| store.upsert(n1(u), UpsertMode::Refresh, now);
        assert_eq!(refresh("u", 0), Ok(Upserted::Inserted), "{name}: unknown");
        assert_eq!(refresh("u", 50), Ok(Upserted::Replaced), "{name}: live");
        assert!(store.delete(Some("n1"), "a", 100), "{name}");
        assert_eq!(refresh("u", 200), Ok(Upserted::StillRemoved), "{name}");
        assert_eq!(
            refresh("u", 600),
            Ok(Upserted::StillRemoved),
            "{name}: last ms"
        );
        assert_eq!(store.len(), 0, "{name}");
        // The tombstone is of NAS n1's session only.
        assert_eq!(
            store.upsert(on(Some("n2"), "a", "u"), UpsertMode::Refresh, 300),
            Ok(Upserted::Inserted),
            "{name}"
        );
        assert_eq!(refresh("u", 601), Ok(Upserted::Inserted), "{name}: expired");
        assert_eq!(store.len(), 2, "{name}");
        // A Start (Create) is a session whatever the tombstones say.
        assert!(store.delete(Some("n1"), "a", 700), "{name}");
        assert_eq!(
            store.upsert(n1("u"), UpsertMode::Create, 710),
            Ok(Upserted::Inserted),
            "{name}"
        );
        // NAS resets leave tombstones too.
        assert_eq!(store.retain_nas(Some("n1"), &mut |_| false, 720), 1);
        assert_eq!(refresh("u", 730), Ok(Upserted::StillRemoved), "{name}");
        // Sessions without an Acct-Session-Id are the same session by audit-session-id.
        let audit = Session {
            audit_session_id: Some("x".into()),
            nas: Some("n1".into()),
            ..Session::default()
        };
        assert_eq!(
            store.upsert(audit.clone(), UpsertMode::Create, 740),
            Ok(Upserted::Inserted),
            "{name}"
        );
        assert_eq!(store.retain_nas(Some("n1"), &mut |_| false, 750), 1);
        assert_eq!(
            store.upsert(audit, UpsertMode::Refresh, 760),
            Ok(Upserted::StillRemoved),
            "{name}"
        );
    }
    for (name, store) in feed_stores(TombstonePolicy {
        window_ms: 500,
        capacity: 0,
    }) {
        let store = store.as_ref();
        assert!(store.insert(on(Some("n1"), "a", "u")), "{name}");
        assert!(store.delete(Some("n1"), "a", 100), "{name}");
        assert_eq!(
            store.upsert(on(Some("n1"), "a", "u"), UpsertMode::Refresh, 200),
            Ok(Upserted::Inserted),
            "{name}: no tombstones kept"
        );
    }
}

// A NAS reset (keep nothing) and a resync end (keep what was re-sent): only that NAS's
// sessions, each offered to `keep` once, each removed one leaving a tombstone.
#[test]
fn retain_nas_removes_only_that_nas() {
    for (name, store) in feed_stores(TombstonePolicy {
        window_ms: 500,
        capacity: 10_000,
    }) {
        let store = store.as_ref();
        for i in 0..1000 {
            let id = format!("s{i}");
            let u = if i % 2 == 0 { "even" } else { "odd" };
            assert!(store.insert(on(Some("n1"), &id, u)), "{name}");
            assert!(store.insert(on(Some("n2"), &id, u)), "{name}");
            if i < 10 {
                assert!(store.insert(on(None, &id, u)), "{name}");
            }
        }
        let mut offered = 0;
        let removed = store.retain_nas(
            Some("n1"),
            &mut |s| {
                offered += 1;
                assert_eq!(s.nas.as_deref(), Some("n1"));
                s.user_name.as_deref() == Some("even")
            },
            0,
        );
        assert_eq!((removed, offered), (500, 1000), "{name}");
        assert_eq!(store.len(), 1510, "{name}");
        assert_eq!(count(store, acct("s1")), Ok(Applied::Sessions(2)), "{name}");
        assert_eq!(count(store, acct("s2")), Ok(Applied::Sessions(3)), "{name}");
        assert_eq!(
            count(store, user("odd")),
            Ok(Applied::Sessions(505)),
            "{name}"
        );
        assert_eq!(store.retain_nas(None, &mut |_| false, 0), 10, "{name}");
        assert_eq!(store.retain_nas(Some("n2"), &mut |_| false, 0), 1000);
        assert_eq!(store.retain_nas(Some("n2"), &mut |_| false, 0), 0);
        assert_eq!(store.len(), 500, "{name}");
        assert_eq!(
            store.disconnect(&lookup(acct("s999"), 9, 10)),
            Ok(Applied::AlreadyRemoved),
            "{name}"
        );
    }
}

// An upsert moves the index entries of the keys that changed and keeps the others: the
// table ends with exactly the entries a fresh table of the final sessions has.
#[test]
fn upsert_moves_changed_keys_and_keeps_the_rest() {
    fn check<I: KeyIndex>() {
        let t = SessionTable::<I>::default();
        let mut a = full(1);
        assert!(t.insert(a.clone()));
        assert!(t.insert(full(2)));
        a.user_name = Some("renamed".into());
        a.framed_ip = Some(Ipv4Addr::new(10, 9, 9, 9));
        a.calling_station_id = None;
        a.nas_port = None;
        a.authorization.filter_ids = (0..40).map(|k| format!("filter-{k}")).collect();
        assert_eq!(
            t.upsert(a.clone(), UpsertMode::Create, 0),
            Ok(Upserted::Replaced)
        );
        let old = full(1);
        for key in [
            Key::UserName,
            Key::FramedIp,
            Key::CallingStationId,
            Key::NasPort,
        ] {
            assert_eq!(
                t.peek(&lookup(only(&old, key), 9, 0)),
                Err(Refusal::NotFound),
                "{key}"
            );
        }
        for key in Key::ALL {
            if key.identifies_alone() && a.get(key).is_some() {
                assert_eq!(t.matching(&lookup(only(&a, key), 9, 0)), vec![a.clone()]);
            }
        }
        let fresh = SessionTable::<I>::with_sessions([a.clone(), full(2)]);
        assert_eq!(t.stats().index_entries, fresh.stats().index_entries);
        // A key another live session holds is refused, and nothing changes.
        let mut clash = a.clone();
        clash.audit_session_id = full(2).audit_session_id;
        assert_eq!(
            t.upsert(clash, UpsertMode::Create, 0),
            Err(UpsertError::KeyTaken("audit_session_id"))
        );
        assert_eq!(t.matching(&lookup(only(&a, Key::Cui), 9, 0)), vec![a]);
    }
    check::<FlatIndex>();
    check::<PapayaIndex>();
}

fn filter_coa(value: &str) -> Vec<u8> {
    let mut bytes = vec![43, 1, 0, 0];
    bytes.extend_from_slice(&[0; 16]);
    bytes.extend_from_slice(&[
        dynauth_proto::dict::attr::FILTER_ID,
        (value.len() + 2) as u8,
    ]);
    bytes.extend_from_slice(value.as_bytes());
    let len = bytes.len() as u16;
    bytes[2..4].copy_from_slice(&len.to_be_bytes());
    bytes
}

fn filter_change(bytes: &[u8]) -> AuthorizationChange<'_> {
    let mut change = AuthorizationChange::new(dynauth_proto::codec::Packet::parse(bytes).unwrap());
    change.replaces_filter_ids = true;
    change
}

/// Overflow words a record of `s` takes.
fn record_words(s: &Session) -> u64 {
    let mut enc = Vec::new();
    record::encode(s, &mut enc);
    enc.len().div_ceil(8) as u64
}

// RFC 5176 §3: a CoA applies to every matched session or to none. Here the arena has room
// for the new versions of all matched sessions but one, in whatever order they are
// published: the CoA is refused with NAK 506 and no record has changed.
#[test]
fn coa_that_cannot_store_every_session_changes_none() {
    fn check<I: KeyIndex>() {
        let mut big = s("c", "u");
        big.authorization.classes = vec![vec![7; 200]];
        let sessions = [s("a", "u"), s("b", "u"), big];
        let bytes = filter_coa("new-filter");
        let change = filter_change(&bytes);
        let changed: Vec<Session> = sessions
            .iter()
            .map(|s| {
                let mut s = s.clone();
                change.apply_to(&mut s.authorization);
                s
            })
            .collect();
        // The two small sessions live inline, so their new versions go to overflow blocks;
        // the big one lives in overflow from the start.
        let before = record_words(&sessions[2]);
        let needed: u64 = changed.iter().map(record_words).sum();
        let arena = Arena::with_word_limit(before + needed - 1);
        let t = SessionTable::<I>::with_arena(TableConfig::default(), arena);
        for s in &sessions {
            assert!(t.insert(s.clone()));
        }
        let stats = t.stats();
        assert_eq!(stats.live, 3);
        assert_eq!(
            t.change(&lookup(user("u"), 9, 0), &change),
            Err(Refusal::Unavailable)
        );
        assert_eq!(
            t.snapshot(),
            sessions.to_vec(),
            "a refused CoA changed records"
        );
        assert_eq!(t.stats(), stats);
        // The reservations were given back: a CoA of one session still fits.
        assert_eq!(
            t.change(&lookup(acct("a"), 9, 0), &change),
            Ok(Applied::Sessions(1))
        );
        assert_eq!(
            t.matching(&lookup(acct("a"), 9, 0)),
            vec![changed[0].clone()]
        );
    }
    check::<FlatIndex>();
    check::<PapayaIndex>();
}

// A writer that panics while holding the writer lock may have left the table half updated
// (a bug in the table's own write path). The table is poisoned:
// every later write is refused (NAK 506 or the feed's errors) and counted, lookups go on.
#[test]
fn panicked_writer_poisons_the_table_for_writers_only() {
    fn check<I: KeyIndex>() {
        let t = SessionTable::<I>::with_sessions([s("a", "u"), s("b", "u"), s("c", "v")]);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _writer = t.writer.lock();
            panic!("a bug while writing");
        }));
        assert!(panicked.is_err());
        // Writers are refused and change nothing.
        let live = t.len();
        let before = t.snapshot();
        assert_eq!(
            t.disconnect(&lookup(acct("c"), 9, 0)),
            Err(Refusal::Unavailable)
        );
        let bytes = filter_coa("f");
        let change = filter_change(&bytes);
        assert_eq!(
            t.change(&lookup(acct("c"), 9, 0), &change),
            Err(Refusal::Unavailable)
        );
        // Authorize Only changes nothing in the table: a read, still answered.
        assert_eq!(
            t.reauthorize(&lookup(acct("c"), 9, 0)),
            Ok(Applied::Sessions(1))
        );
        assert_eq!(
            t.remove(&lookup(acct("c"), 9, 0)),
            Err(Refusal::Unavailable)
        );
        assert!(!t.insert(s("d", "w")));
        assert!(!t.delete(None, "c", 0));
        assert_eq!(t.retain_nas(None, &mut |_| false, 0), 0);
        assert_eq!(t.len(), live);
        assert_eq!(t.snapshot(), before);
        assert!(t.is_poisoned());
        assert_eq!(t.try_insert(&s("d", "w")), Err(InsertError::Unavailable));
        assert_eq!(
            t.upsert(s("c", "v2"), UpsertMode::Create, 0),
            Err(UpsertError::Unavailable)
        );
        assert_eq!(t.poison_refusals(), 8);
        // Lookups never take the lock: they still answer, also the lock-free NAKs.
        assert_eq!(t.peek(&lookup(acct("c"), 9, 0)), Ok(Applied::Sessions(1)));
        assert_eq!(t.matching(&lookup(acct("c"), 9, 0)), vec![s("c", "v")]);
        assert_eq!(
            t.disconnect(&lookup(acct("zz"), 9, 0)),
            Err(Refusal::NotFound)
        );
        assert_eq!(t.poison_refusals(), 8);
        assert_eq!(t.stats().live, live);
    }
    check::<FlatIndex>();
    check::<PapayaIndex>();
}

/// The batch hint (`SessionStore::touch`) loads and changes nothing: the index step reads
/// the probe's first slot, the record step the cell of the matching record (its header word
/// is that of a live record); every lookup answers as before, also for a key that is not
/// in the table and after a removal.
#[test]
fn touch_loads_the_slot_and_the_record_and_changes_nothing() {
    let t = SessionTable::<FlatIndex>::new(TableConfig::default());
    for i in 0..64 {
        t.insert(s(&format!("sess-{i}"), &format!("user-{i}")));
    }
    assert_eq!(
        t.disconnect(&lookup(acct("sess-7"), 1, 1)),
        Ok(Applied::Sessions(1))
    );
    let before: Vec<_> = (0..70)
        .map(|i| t.peek(&lookup(acct(&format!("sess-{i}")), 1, 2)))
        .collect();
    for i in 0..70 {
        let id = format!("sess-{i}");
        let key = PrimaryKey {
            key: Key::AcctSessionId,
            value: KeyValue::Text(id.as_bytes()),
        };
        t.touch(&key, Touch::Index);
        t.touch(&key, Touch::Record);
    }
    let after: Vec<_> = (0..70)
        .map(|i| t.peek(&lookup(acct(&format!("sess-{i}")), 1, 2)))
        .collect();
    assert_eq!(before, after);
    assert_eq!(t.len(), 63);
    assert_eq!(before[7], Ok(Applied::AlreadyRemoved));
    assert_eq!(before[69], Err(Refusal::NotFound));
    // What the record step loads is the record's header: non-zero for a stored record.
    let ix = t.index(Key::AcctSessionId).unwrap();
    let hash = t.hash(KeyValue::Text(b"sess-3"));
    let mut loaded = Vec::new();
    ix.probe(hash, |id| {
        loaded.push(t.arena.touch(id));
        false
    });
    assert!(loaded.first().is_some_and(|&w| w != 0), "{loaded:?}");
    assert_ne!(
        ix.touch(hash),
        0,
        "a stored key's probe starts at a used slot"
    );
}

/// `touch_all` (a whole batch's hint, mixed key kinds and keys that are not stored) changes
/// nothing either, and its tight index loop loads what one `touch` per key loads.
#[test]
fn touch_all_changes_nothing_and_loads_what_touch_loads() {
    let t = SessionTable::<FlatIndex>::new(TableConfig::default());
    for i in 0..200 {
        t.insert(s(&format!("sess-{i}"), &format!("user-{i}")));
    }
    let ids: Vec<String> = (0..260).map(|i| format!("sess-{i}")).collect();
    let before: Vec<_> = ids
        .iter()
        .map(|id| t.peek(&lookup(acct(id), 1, 2)))
        .collect();
    let mut keys: Vec<PrimaryKey<'_>> = ids
        .iter()
        .map(|id| PrimaryKey {
            key: Key::AcctSessionId,
            value: KeyValue::Text(id.as_bytes()),
        })
        .collect();
    keys.insert(
        70,
        PrimaryKey {
            key: Key::UserName,
            value: KeyValue::Text(b"user-3"),
        },
    );
    t.touch_all(&keys);
    let after: Vec<_> = ids
        .iter()
        .map(|id| t.peek(&lookup(acct(id), 1, 2)))
        .collect();
    assert_eq!(before, after);
    assert_eq!(t.len(), 200);
    let ix = t.index(Key::AcctSessionId).unwrap();
    let hashes: Vec<u64> = ids
        .iter()
        .map(|id| t.hash(KeyValue::Text(id.as_bytes())))
        .collect();
    let one_by_one = hashes.iter().fold(0, |acc, &h| acc ^ ix.touch(h));
    assert_eq!(ix.touch_many(&hashes), one_by_one);
    assert_ne!(one_by_one, 0);
}
