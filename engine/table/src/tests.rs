//! Unit tests of the session table (both index designs).
use core::net::Ipv4Addr;

use super::*;
use dynauth_proto::session::SessionQuery;
use dynauth_proto::store::{AcceptAll, MatchScope};

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
        t.disconnect(&lookup(user("u"), 1, 0), &AcceptAll),
        Err(Refusal::TooManySessions)
    );
    let q = SessionQuery {
        acct_session_id: Some(b"a"),
        user_name: Some(b"v"),
        ..Default::default()
    };
    assert_eq!(
        t.disconnect(&lookup(q, 9, 0), &AcceptAll),
        Err(Refusal::Contradicted)
    );
    assert_eq!(
        t.disconnect(&lookup(acct("zz"), 9, 0), &AcceptAll),
        Err(Refusal::NotFound)
    );
    assert_eq!(t.len(), 3);
    assert_eq!(
        t.disconnect(&lookup(user("u"), 9, 0), &AcceptAll),
        Ok(Applied::Sessions(2))
    );
    assert_eq!(t.len(), 1);
    // SPEC §4: the late retry within the window.
    assert_eq!(
        t.disconnect(&lookup(user("u"), 9, 10), &AcceptAll),
        Ok(Applied::AlreadyRemoved)
    );
    assert_eq!(
        t.disconnect(&lookup(acct("a"), 9, 10), &AcceptAll),
        Ok(Applied::AlreadyRemoved)
    );
    // A CoA never answers from tombstones.
    assert_eq!(
        t.reauthorize(&lookup(acct("a"), 9, 10), &AcceptAll),
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
            t.disconnect(&lookup(acct(&id), 9, 1000), &AcceptAll),
            Ok(Applied::Sessions(1))
        );
    }
    assert_eq!(t.stats().tombstones, 2);
    // Only the two newest are remembered.
    let late = |id: &str, now| t.disconnect(&lookup(acct(id), 9, now), &AcceptAll);
    assert_eq!(late("s0", 1100), Err(Refusal::NotFound));
    assert_eq!(late("s4", 1100), Ok(Applied::AlreadyRemoved));
    assert_eq!(late("s3", 1500), Ok(Applied::AlreadyRemoved));
    assert_eq!(late("s3", 1501), Err(Refusal::NotFound));
    // Expired tombstones leave the indexes and the arena.
    assert_eq!(t.stats().tombstones, 0);
    assert_eq!(t.stats().index_entries, 0);
    assert_eq!(t.stats().record_bytes, 0);
}

struct RefuseB;
impl DataPlane for RefuseB {
    fn may_remove(&self, s: &Session) -> bool {
        s.acct_session_id.as_deref() != Some("b")
    }
}

// SPEC §7: a refused removal changes nothing, not even the other matches.
#[test]
fn spec_7_refused_removal_changes_nothing() {
    let t = SessionTable::<FlatIndex>::with_sessions([s("a", "u"), s("b", "u")]);
    assert_eq!(
        t.disconnect(&lookup(user("u"), 9, 0), &RefuseB),
        Err(Refusal::NotRemovable)
    );
    assert_eq!(t.len(), 2);
    assert_eq!(t.stats().tombstones, 0);
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
        t.disconnect(&lookup(acct("a"), 9, 1), &AcceptAll),
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
        t.disconnect(&lookup(user("guest"), 10, 0), &AcceptAll),
        Err(Refusal::TooManySessions)
    );
    assert_eq!(
        t.peek(&lookup(acct("s4000"), 1, 0)),
        Ok(Applied::Sessions(1))
    );
    assert_eq!(
        t.disconnect(&lookup(user("guest"), n as u32, 0), &AcceptAll),
        Ok(Applied::Sessions(n as u32))
    );
    assert_eq!(t.len(), 1);
    assert_eq!(
        t.disconnect(&lookup(user("guest"), n as u32, 1), &AcceptAll),
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
        assert_eq!(memory.reauthorize(&l, &AcceptAll), expected, "{key}");
        assert_eq!(flat.reauthorize(&l, &AcceptAll), expected, "{key}");
        assert_eq!(papaya.reauthorize(&l, &AcceptAll), expected, "{key}");
        if key.identifies_alone() {
            assert_eq!(flat.matching(&l), vec![want.clone()], "{key}");
            assert_eq!(papaya.matching(&l), vec![want.clone()], "{key}");
        }
        // Any other session's value of this key contradicts (AND semantics).
        let mut q = SessionQuery::from(want);
        q.set(key, sessions[2].get(key)).unwrap();
        let l = lookup(q, 9, 0);
        assert_eq!(
            memory.reauthorize(&l, &AcceptAll),
            flat.reauthorize(&l, &AcceptAll),
            "{key}"
        );
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
