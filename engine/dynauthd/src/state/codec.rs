//! The state files' record codec: pure, no I/O (sans-IO), never a panic on any input.
//!
//! Owns: the frame (`len: u32 LE`, `crc32: u32 LE` of the payload, payload), the record
//! payloads, the file headers. Must not touch: files, clocks, the table (sessions are
//! encoded with the table's record encoding, `dynauth_table::encode_session`).
//!
//! Payload: `kind: u8`, `at: u64 LE` (wall-clock milliseconds since the Unix epoch), then
//! - `PUT` (1): the session, in the table's record encoding, to the end of the payload;
//! - `REMOVE` (2): `flags: u8` (bit 0: leave tombstones), `count: u32 LE`, then `count`
//!   times `len: u32 LE` + the identity session (NAS, Acct-Session-Id, audit-session-id,
//!   CUI) in the record encoding;
//! - `TOMB` (3, snapshots only): a tombstone, the whole session as removed at `at`;
//! - `SEQ` (5): `seq: u64 LE`, then the NAS (`0`, or `1` + its octets to the end);
//! - `RESYNC` (6): `op: u8` (0 begin, 1 a session re-sent, 2 end or cancelled), for op 1 the
//!   16-octet `feed::ResyncTag`, then the NAS as in `SEQ`;
//! - `END` (4, snapshots only): `sessions: u64 LE`, `tombstones: u64 LE`, the counts of
//!   the records before it; a snapshot without it is incomplete and never used.
#![forbid(unsafe_code)]

use dynauth_proto::feed::ResyncTag;
use dynauth_proto::session::Session;
use dynauth_proto::store::ResyncMark;

/// First octets of a journal segment, then its number (`u64 LE`).
pub const JOURNAL_MAGIC: [u8; 8] = *b"DYNJRNL1";
/// First octets of a snapshot, then the first journal segment to replay over it (`u64 LE`).
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"DYNSNAP1";
/// Header length of both files.
pub const HEADER_LEN: usize = 16;
/// Frame header: length and checksum.
pub const FRAME_HEADER: usize = 8;
/// A payload longer than this is damage, not a record (the largest real one, a Remove of
/// a NAS reset with many sessions, is split before it gets near).
pub const MAX_PAYLOAD: usize = 64 << 20;

const PUT: u8 = 1;
const REMOVE: u8 = 2;
const TOMB: u8 = 3;
const END: u8 = 4;
const SEQ: u8 = 5;
const RESYNC: u8 = 6;

/// One record of a journal segment or a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// This session is live, exactly so (insert, upsert, the new version after a CoA).
    Put { at_ms: u64, session: Session },
    /// The live sessions that are `store::same_session` as these identities were removed
    /// at `at_ms`, leaving tombstones when `tombstone`.
    Remove {
        at_ms: u64,
        tombstone: bool,
        identities: Vec<Session>,
    },
    /// A tombstone: `session` was removed at `at_ms` (snapshots).
    Tomb { at_ms: u64, session: Session },
    /// The end of a complete snapshot.
    End { sessions: u64, tombstones: u64 },
    /// The session feed applied the event numbered `seq` of `nas` (the control plane's
    /// per-NAS order survives a restart: an old or repeated event stays ignored).
    Seq {
        at_ms: u64,
        nas: Option<String>,
        seq: u64,
    },
    /// A resync of `nas` moved on (a restart goes on with it: the sessions not re-sent are
    /// removed at its `SyncEnd`).
    Resync {
        at_ms: u64,
        nas: Option<String>,
        mark: ResyncMark,
    },
}

/// Why bytes are not a record. Every one is a cut when it is found in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The bytes end inside a frame (a torn write).
    #[error("the file ends inside a record ({have} of {need} octets)")]
    Truncated { have: usize, need: usize },
    /// The length field is beyond any record (damage, or a zero-filled tail).
    #[error("a record length of {0} octets is impossible")]
    BadLength(usize),
    /// The checksum does not match the payload.
    #[error("checksum mismatch")]
    BadChecksum,
    /// The checksum matches but the payload is no record this version writes.
    #[error("the record cannot be decoded")]
    BadRecord,
}

/// The identity part of a session (what `store::same_session` compares): a Remove record
/// stores only this, the full record is already in the state before it.
pub fn identity(s: &Session) -> Session {
    Session {
        nas: s.nas.clone(),
        acct_session_id: s.acct_session_id.clone(),
        audit_session_id: s.audit_session_id.clone(),
        cui: s.cui.clone(),
        ..Session::default()
    }
}

/// A file header: magic + number.
pub fn header(magic: [u8; 8], number: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&magic);
    h[8..].copy_from_slice(&number.to_le_bytes());
    h
}

/// The number in a header with this magic, if `bytes` start with one.
pub fn parse_header(magic: [u8; 8], bytes: &[u8]) -> Option<u64> {
    let h = bytes.get(..HEADER_LEN)?;
    if h[..8] != magic {
        return None;
    }
    Some(u64::from_le_bytes(h[8..].try_into().ok()?))
}

/// Appends `record` as one frame to `out`; `scratch` is reused for session encodings.
pub fn encode(record: &Record, out: &mut Vec<u8>, scratch: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    match record {
        Record::Put { at_ms, session } | Record::Tomb { at_ms, session } => {
            out.push(if matches!(record, Record::Put { .. }) {
                PUT
            } else {
                TOMB
            });
            out.extend_from_slice(&at_ms.to_le_bytes());
            dynauth_table::encode_session(session, scratch);
            out.extend_from_slice(scratch);
        }
        Record::Remove {
            at_ms,
            tombstone,
            identities,
        } => {
            out.push(REMOVE);
            out.extend_from_slice(&at_ms.to_le_bytes());
            out.push(u8::from(*tombstone));
            out.extend_from_slice(&(identities.len() as u32).to_le_bytes());
            for s in identities {
                dynauth_table::encode_session(s, scratch);
                out.extend_from_slice(&(scratch.len() as u32).to_le_bytes());
                out.extend_from_slice(scratch);
            }
        }
        Record::Seq { at_ms, nas, seq } => {
            out.push(SEQ);
            out.extend_from_slice(&at_ms.to_le_bytes());
            out.extend_from_slice(&seq.to_le_bytes());
            push_nas(out, nas.as_deref());
        }
        Record::Resync { at_ms, nas, mark } => {
            out.push(RESYNC);
            out.extend_from_slice(&at_ms.to_le_bytes());
            match mark {
                ResyncMark::Begin => out.push(0),
                ResyncMark::Resent(tag) => {
                    out.push(1);
                    out.extend_from_slice(&tag.0);
                }
                ResyncMark::End => out.push(2),
            }
            push_nas(out, nas.as_deref());
        }
        Record::End {
            sessions,
            tombstones,
        } => {
            out.push(END);
            out.extend_from_slice(&0u64.to_le_bytes());
            out.extend_from_slice(&sessions.to_le_bytes());
            out.extend_from_slice(&tombstones.to_le_bytes());
        }
    }
    seal(out, start);
}

/// A NAS to the end of a payload: `0`, or `1` and its octets.
fn push_nas(out: &mut Vec<u8>, nas: Option<&str>) {
    match nas {
        None => out.push(0),
        Some(n) => {
            out.push(1);
            out.extend_from_slice(n.as_bytes());
        }
    }
}

/// The NAS that ends a payload (see [`push_nas`]).
fn read_nas(rest: &[u8]) -> Option<Option<String>> {
    match *rest.first()? {
        0 if rest.len() == 1 => Some(None),
        1 => Some(Some(String::from_utf8(rest.get(1..)?.to_vec()).ok()?)),
        _ => None,
    }
}

/// Writes the length and checksum of the frame that starts at `start` and ends `out`.
fn seal(out: &mut [u8], start: usize) {
    let payload = &out[start + FRAME_HEADER..];
    let len = payload.len() as u32;
    let crc = crc32fast::hash(payload);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// A `REMOVE` record written straight into a frame buffer, one identity at a time, each
/// already in the record encoding (the Disconnect path: the table hands over its records'
/// identities without decoding them, `SessionTable::disconnect_recording`). The frame is
/// the one [`encode`] writes for the same [`Record::Remove`].
#[derive(Debug)]
pub struct RemoveFrame {
    start: usize,
    count: u32,
}

impl RemoveFrame {
    /// Starts the record at the end of `out`.
    pub fn begin(out: &mut Vec<u8>, at_ms: u64, tombstone: bool) -> Self {
        let start = out.len();
        out.extend_from_slice(&[0; FRAME_HEADER]);
        out.push(REMOVE);
        out.extend_from_slice(&at_ms.to_le_bytes());
        out.push(u8::from(tombstone));
        out.extend_from_slice(&0u32.to_le_bytes());
        RemoveFrame { start, count: 0 }
    }

    /// Adds one identity (a session's record encoding).
    pub fn push(&mut self, out: &mut Vec<u8>, identity: &[u8]) {
        out.extend_from_slice(&(identity.len() as u32).to_le_bytes());
        out.extend_from_slice(identity);
        self.count += 1;
    }

    /// Seals the record; without any identity it is taken back out of `out`. Returns
    /// whether a record was written.
    pub fn finish(self, out: &mut Vec<u8>) -> bool {
        if self.count == 0 {
            out.truncate(self.start);
            return false;
        }
        // kind, at, flags: the count follows them.
        let count_at = self.start + FRAME_HEADER + 1 + 8 + 1;
        out[count_at..count_at + 4].copy_from_slice(&self.count.to_le_bytes());
        seal(out, self.start);
        true
    }
}

/// Decodes the frame at the start of `bytes`: `Ok(None)` at the end of the bytes, else the
/// record and how many octets it took.
pub fn decode(bytes: &[u8]) -> Result<Option<(Record, usize)>, FrameError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let Some(head) = bytes.get(..FRAME_HEADER) else {
        return Err(FrameError::Truncated {
            have: bytes.len(),
            need: FRAME_HEADER,
        });
    };
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    // The smallest payload is kind + time.
    if !(9..=MAX_PAYLOAD).contains(&len) {
        return Err(FrameError::BadLength(len));
    }
    let need = FRAME_HEADER + len;
    let Some(payload) = bytes.get(FRAME_HEADER..need) else {
        return Err(FrameError::Truncated {
            have: bytes.len(),
            need,
        });
    };
    if crc32fast::hash(payload) != crc {
        return Err(FrameError::BadChecksum);
    }
    let record = payload_record(payload).ok_or(FrameError::BadRecord)?;
    Ok(Some((record, need)))
}

fn payload_record(p: &[u8]) -> Option<Record> {
    let kind = *p.first()?;
    let at_ms = u64::from_le_bytes(p.get(1..9)?.try_into().ok()?);
    let rest = p.get(9..)?;
    match kind {
        PUT => Some(Record::Put {
            at_ms,
            session: dynauth_table::decode_session(rest)?,
        }),
        SEQ => {
            let seq = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
            let nas = read_nas(rest.get(8..)?)?;
            Some(Record::Seq { at_ms, nas, seq })
        }
        RESYNC => {
            let (mark, nas_at) = match *rest.first()? {
                0 => (ResyncMark::Begin, 1),
                1 => (
                    ResyncMark::Resent(ResyncTag(rest.get(1..17)?.try_into().ok()?)),
                    17,
                ),
                2 => (ResyncMark::End, 1),
                _ => return None,
            };
            let nas = read_nas(rest.get(nas_at..)?)?;
            Some(Record::Resync { at_ms, nas, mark })
        }
        TOMB => Some(Record::Tomb {
            at_ms,
            session: dynauth_table::decode_session(rest)?,
        }),
        REMOVE => {
            let tombstone = match *rest.first()? {
                0 => false,
                1 => true,
                _ => return None,
            };
            let count = u32::from_le_bytes(rest.get(1..5)?.try_into().ok()?) as usize;
            let mut at = 5;
            // Each identity takes at least 4 + 3 octets: a count beyond that is damage.
            if count > rest.len() / 7 {
                return None;
            }
            let mut identities = Vec::with_capacity(count);
            for _ in 0..count {
                let n = u32::from_le_bytes(rest.get(at..at + 4)?.try_into().ok()?) as usize;
                at += 4;
                identities.push(dynauth_table::decode_session(
                    rest.get(at..at.checked_add(n)?)?,
                )?);
                at += n;
            }
            (at == rest.len()).then_some(Record::Remove {
                at_ms,
                tombstone,
                identities,
            })
        }
        END => {
            let sessions = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
            let tombstones = u64::from_le_bytes(rest.get(8..16)?.try_into().ok()?);
            (rest.len() == 16).then_some(Record::End {
                sessions,
                tombstones,
            })
        }
        _ => None,
    }
}

/// Where a run of frames stops being readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// Offset of the first octet not used (the good prefix ends here).
    pub offset: usize,
    /// Octets after it.
    pub dropped: usize,
    pub reason: FrameError,
}

/// Calls `f` with every record of `bytes` (frames from offset 0) until the end or the first
/// frame that does not decode; returns the number of records and the cut, if any.
pub fn for_each(bytes: &[u8], mut f: impl FnMut(Record, usize)) -> (u64, Option<Cut>) {
    let mut at = 0;
    let mut n = 0;
    loop {
        match decode(&bytes[at..]) {
            Ok(None) => return (n, None),
            Ok(Some((record, used))) => {
                at += used;
                n += 1;
                f(record, at);
            }
            Err(reason) => {
                return (
                    n,
                    Some(Cut {
                        offset: at,
                        dropped: bytes.len() - at,
                        reason,
                    }),
                );
            }
        }
    }
}

/// [`for_each`] with the sessions of `Put` records left encoded: `on_put` gets their
/// bytes (as `dynauth_table::encode_session` wrote them, for a bulk load that stores them as
/// they are), `on_other` every other record. The same checks (length, checksum) and cuts.
pub fn for_each_put_raw(
    bytes: &[u8],
    mut on_put: impl FnMut(&[u8], usize),
    mut on_other: impl FnMut(Record, usize),
) -> (u64, Option<Cut>) {
    let mut at = 0;
    let mut n = 0;
    let cut = |at: usize, reason| Cut {
        offset: at,
        dropped: bytes.len() - at,
        reason,
    };
    while at < bytes.len() {
        let rest = &bytes[at..];
        let Some(head) = rest.get(..FRAME_HEADER) else {
            return (
                n,
                Some(cut(
                    at,
                    FrameError::Truncated {
                        have: rest.len(),
                        need: FRAME_HEADER,
                    },
                )),
            );
        };
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if !(9..=MAX_PAYLOAD).contains(&len) {
            return (n, Some(cut(at, FrameError::BadLength(len))));
        }
        let need = FRAME_HEADER + len;
        let Some(payload) = rest.get(FRAME_HEADER..need) else {
            return (
                n,
                Some(cut(
                    at,
                    FrameError::Truncated {
                        have: rest.len(),
                        need,
                    },
                )),
            );
        };
        if crc32fast::hash(payload) != crc {
            return (n, Some(cut(at, FrameError::BadChecksum)));
        }
        let end = at + need;
        if payload.first() == Some(&PUT) {
            on_put(payload.get(9..).unwrap_or_default(), end);
        } else {
            match payload_record(payload) {
                Some(r) => on_other(r, end),
                None => return (n, Some(cut(at, FrameError::BadRecord))),
            }
        }
        at = end;
        n += 1;
    }
    (n, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynauth_proto::synth;

    fn records() -> Vec<Record> {
        let sessions: Vec<Session> = synth::sessions(3, 8).collect();
        vec![
            Record::Put {
                at_ms: 1_700_000_000_123,
                session: sessions[0].clone(),
            },
            Record::Remove {
                at_ms: 1_700_000_000_124,
                tombstone: true,
                identities: sessions[1..4].iter().map(identity).collect(),
            },
            Record::Remove {
                at_ms: 5,
                tombstone: false,
                identities: vec![],
            },
            Record::Tomb {
                at_ms: 7,
                session: sessions[5].clone(),
            },
            Record::Seq {
                at_ms: 9,
                nas: Some("bng-a|1".into()),
                seq: 42,
            },
            Record::Seq {
                at_ms: 10,
                nas: None,
                seq: u64::MAX,
            },
            Record::Resync {
                at_ms: 11,
                nas: Some("bng-a|1".into()),
                mark: ResyncMark::Begin,
            },
            Record::Resync {
                at_ms: 12,
                nas: Some("bng-a|1".into()),
                mark: ResyncMark::Resent(ResyncTag::of(&sessions[6])),
            },
            Record::Resync {
                at_ms: 13,
                nas: None,
                mark: ResyncMark::End,
            },
            Record::End {
                sessions: 10,
                tombstones: 2,
            },
        ]
    }

    fn encode_all(rs: &[Record]) -> Vec<u8> {
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        for r in rs {
            encode(r, &mut out, &mut scratch);
        }
        out
    }

    #[test]
    fn a_remove_frame_built_identity_by_identity_is_the_encoded_remove_record() {
        let sessions: Vec<Session> = synth::sessions(4, 8).collect();
        let record = Record::Remove {
            at_ms: 1_700_000_000_999,
            tombstone: true,
            identities: sessions.iter().map(identity).collect(),
        };
        let (mut expected, mut scratch) = (vec![7u8], Vec::new());
        encode(&record, &mut expected, &mut scratch);
        let mut out = vec![7u8];
        let mut frame = RemoveFrame::begin(&mut out, 1_700_000_000_999, true);
        for s in &sessions {
            dynauth_table::encode_session(&identity(s), &mut scratch);
            frame.push(&mut out, &scratch);
        }
        assert!(frame.finish(&mut out));
        assert_eq!(out, expected);
        // With no identity nothing is written.
        let frame = RemoveFrame::begin(&mut out, 1, false);
        assert!(!frame.finish(&mut out));
        assert_eq!(out, expected);
    }

    #[test]
    fn every_record_kind_round_trips() {
        let rs = records();
        let bytes = encode_all(&rs);
        let mut back = Vec::new();
        let (n, cut) = for_each(&bytes, |r, _| back.push(r));
        assert_eq!(cut, None);
        assert_eq!(n, rs.len() as u64);
        assert_eq!(back, rs);
    }

    #[test]
    fn put_records_left_encoded_decode_to_what_for_each_gives() {
        let rs = records();
        let bytes = encode_all(&rs);
        for len in [bytes.len(), bytes.len() - 1, bytes.len() / 3] {
            let got = std::cell::RefCell::new(Vec::new());
            let raw = for_each_put_raw(
                &bytes[..len],
                |rec, at| {
                    let session = dynauth_table::decode_session(rec).unwrap();
                    got.borrow_mut().push((Some(session), None, at));
                },
                |r, at| got.borrow_mut().push((None, Some(r), at)),
            );
            let got = got.into_inner();
            let mut want = Vec::new();
            let serial = for_each(&bytes[..len], |r, at| match r {
                Record::Put { session, .. } => want.push((Some(session), None, at)),
                r => want.push((None, Some(r), at)),
            });
            assert_eq!((got, raw), (want, serial), "len {len}");
        }
    }

    #[test]
    fn a_torn_tail_is_cut_at_the_last_whole_record() {
        let rs = records();
        let bytes = encode_all(&rs);
        let kept = rs.len() - 1;
        let whole = encode_all(&rs[..kept]).len();
        for len in whole + 1..bytes.len() {
            let (n, cut) = for_each(&bytes[..len], |_, _| {});
            assert_eq!(n, kept as u64, "cut at {len}");
            let cut = cut.expect("a cut");
            assert_eq!(cut.offset, whole);
            assert_eq!(cut.dropped, len - whole);
            assert!(matches!(cut.reason, FrameError::Truncated { .. }));
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_in_a_frame_is_detected() {
        let rs = records();
        let bytes = encode_all(&rs);
        let first = encode_all(&rs[..1]).len();
        for bit in 0..first * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            let (n, cut) = for_each(&damaged, |_, _| {});
            assert_eq!(n, 0, "bit {bit}");
            assert_eq!(cut.map(|c| c.offset), Some(0));
        }
    }

    #[test]
    fn zeros_and_garbage_are_cuts_not_panics() {
        assert!(matches!(decode(&[0; 64]), Err(FrameError::BadLength(0))));
        assert!(matches!(decode(&[0xff; 64]), Err(FrameError::BadLength(_))));
        // A checksummed payload that is no record.
        let mut out = vec![0; 8];
        out.extend_from_slice(&[9; 12]);
        let crc = crc32fast::hash(&out[8..]);
        out[..4].copy_from_slice(&12u32.to_le_bytes());
        out[4..8].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&out), Err(FrameError::BadRecord));
    }

    #[test]
    fn headers_check_their_magic() {
        let h = header(JOURNAL_MAGIC, 42);
        assert_eq!(parse_header(JOURNAL_MAGIC, &h), Some(42));
        assert_eq!(parse_header(SNAPSHOT_MAGIC, &h), None);
        assert_eq!(parse_header(JOURNAL_MAGIC, &h[..10]), None);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;
        use proptest::sample::Index;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            // Encode then decode gives the same records; any single changed octet or any
            // truncation is reported as a cut at or before the damaged frame, never a
            // panic and never a different record.
            #[test]
            fn round_trip_and_damage_detection(
                seed in any::<u64>(),
                n in 1usize..12,
                at in any::<u64>(),
                pos in any::<Index>(),
                xor in 1u8..=255,
                cut_to in any::<Index>(),
            ) {
                let sessions: Vec<Session> = synth::sessions(seed, n as u64).collect();
                let rs: Vec<Record> = sessions.iter().enumerate().map(|(i, s)| {
                    match i % 5 {
                        2 => Record::Remove { at_ms: at, tombstone: i % 2 == 0, identities: vec![identity(s)] },
                        3 => Record::Seq { at_ms: at, nas: s.nas.clone(), seq: at ^ i as u64 },
                        4 => Record::Resync {
                            at_ms: at,
                            nas: s.nas.clone(),
                            mark: match i % 3 {
                                0 => ResyncMark::Begin,
                                1 => ResyncMark::Resent(ResyncTag::of(s)),
                                _ => ResyncMark::End,
                            },
                        },
                        _ => Record::Put { at_ms: at.wrapping_add(i as u64), session: s.clone() },
                    }
                }).collect();
                let bytes = encode_all(&rs);
                let mut back = Vec::new();
                let (count, cut) = for_each(&bytes, |r, _| back.push(r));
                prop_assert_eq!(cut, None);
                prop_assert_eq!(count, rs.len() as u64);
                prop_assert_eq!(&back, &rs);

                let i = pos.index(bytes.len());
                let mut damaged = bytes.clone();
                damaged[i] ^= xor;
                let mut got = Vec::new();
                let (_, cut) = for_each(&damaged, |r, _| got.push(r));
                let cut = cut.expect("damage is detected");
                prop_assert!(cut.offset <= i);
                prop_assert_eq!(&got[..], &rs[..got.len()]);

                let len = cut_to.index(bytes.len());
                let mut got = Vec::new();
                let (_, cut) = for_each(&bytes[..len], |r, _| got.push(r));
                prop_assert_eq!(&got[..], &rs[..got.len()]);
                if let Some(c) = cut {
                    prop_assert!(c.offset <= len);
                }
            }
        }
    }
}
