//! Bulk loading of sessions from JSON Lines, and the synthetic session file generator.
//!
//! Owns: the session-file format (one `Session` per line, the model's exact field names,
//! unknown fields refused, at least one identification key; blank lines skipped), error
//! reports naming the line and the field, duplicate reports naming both lines, progress
//! reporting, and the all-or-nothing rule: sessions go into a fresh table that is returned
//! only when every line loaded, so a bad file leaves nothing half-loaded.
//! Must not touch: table internals beyond `try_insert` and reservations; terminals (the
//! caller decides whether to draw a bar: [`progress_bar`] takes `is_terminal`).
//!
//! Lines are parsed by worker threads in chunks while the calling thread inserts them in
//! file order.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{self, BufRead, Write};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{Bulk, InsertError, KeyIndex, SessionTable, TableConfig};
use dynauth_proto::session::Session;

/// Lines per parsing chunk.
const CHUNK: usize = 16_384;

/// Why a load failed. Nothing was loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("line {line}: field `{field}`: {cause}")]
    Field {
        line: u64,
        field: String,
        cause: String,
    },
    #[error("line {line}: {cause}")]
    Syntax { line: u64, cause: String },
    #[error("line {line}: no identification key (at least one is required)")]
    NoKey { line: u64 },
    #[error("line {line}: duplicate {key}, already on line {first}")]
    Duplicate {
        line: u64,
        first: u64,
        key: &'static str,
    },
    #[error("line {line}: {source}")]
    Insert { line: u64, source: InsertError },
    #[error("line {line}: cannot read: {source}")]
    Io { line: u64, source: io::Error },
    #[error("cannot open the session file: {0}")]
    Open(io::Error),
}

/// Where a load stands (progress callbacks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadProgress {
    pub lines: u64,
    pub bytes: u64,
    pub sessions: u64,
}

/// The result of a load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadReport {
    pub sessions: u64,
    pub lines: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

impl core::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "loaded {} sessions ({} lines, {} bytes) in {:.2?}",
            self.sessions, self.lines, self.bytes, self.elapsed
        )
    }
}

type Parsed = Vec<(u64, Result<Session, LoadError>)>;
/// Lines read into one buffer: the text and each non-blank line's (number, start, end).
type Lines = (String, Vec<(u64, usize, usize)>);
/// A chunk of numbered lines as read: (sequence, lines, bytes read so far).
type Chunk = (u64, Result<Lines, LoadError>, u64);

/// Which field of a bad line is at fault: the first whose value alone does not deserialize.
fn field_at_fault(text: &str) -> Option<String> {
    let serde_json::Value::Object(map) = serde_json::from_str(text).ok()? else {
        return None;
    };
    map.into_iter()
        .find(|(k, v)| {
            let mut one = serde_json::Map::new();
            one.insert(k.clone(), v.clone());
            serde_json::from_value::<Session>(serde_json::Value::Object(one)).is_err()
        })
        .map(|(k, _)| k)
}

fn parse_line(line: u64, text: &str) -> Result<Session, LoadError> {
    match serde_json::from_str::<Session>(text) {
        Ok(s) if s.has_identification() => Ok(s),
        Ok(_) => Err(LoadError::NoKey { line }),
        Err(e) => {
            let cause = e.to_string();
            Err(match field_at_fault(text) {
                Some(field) => LoadError::Field { line, field, cause },
                None => LoadError::Syntax { line, cause },
            })
        }
    }
}

struct Source<R> {
    reader: R,
    next_seq: u64,
    line: u64,
    bytes: u64,
    done: bool,
}

/// Reads the next chunk of non-blank lines: (sequence, first line number, lines, bytes).
fn next_chunk<R: BufRead>(src: &Mutex<Source<R>>) -> Option<Chunk> {
    let mut s = src.lock().unwrap_or_else(|p| p.into_inner());
    if s.done {
        return None;
    }
    let seq = s.next_seq;
    s.next_seq += 1;
    let mut text = String::with_capacity(CHUNK * 192);
    let mut lines = Vec::with_capacity(CHUNK);
    while lines.len() < CHUNK {
        let start = text.len();
        match s.reader.read_line(&mut text) {
            Ok(0) => {
                s.done = true;
                break;
            }
            Ok(n) => {
                s.line += 1;
                s.bytes += n as u64;
                if text[start..].trim().is_empty() {
                    text.truncate(start);
                } else {
                    lines.push((s.line, start, text.len()));
                }
            }
            Err(source) => {
                s.done = true;
                let line = s.line + 1;
                return Some((seq, Err(LoadError::Io { line, source }), s.bytes));
            }
        }
    }
    Some((seq, Ok((text, lines)), s.bytes))
}

/// Loads every session of a JSON Lines stream into a fresh table. `progress` is called after
/// every chunk of lines. On any error nothing is returned but the error.
pub fn load_jsonl<I: KeyIndex>(
    reader: impl BufRead + Send,
    config: TableConfig,
    expected_lines: Option<u64>,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<(SessionTable<I>, LoadReport), LoadError> {
    let start = Instant::now();
    let table = SessionTable::<I>::new(config);
    let src = Mutex::new(Source {
        reader,
        next_seq: 0,
        line: 0,
        bytes: 0,
        done: false,
    });
    let stop = AtomicBool::new(false);
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8);
    let (tx, rx) = mpsc::sync_channel::<(u64, Result<Parsed, LoadError>, u64)>(workers * 2);
    let mut report = LoadReport {
        sessions: 0,
        lines: 0,
        bytes: 0,
        elapsed: Duration::ZERO,
    };
    let result = std::thread::scope(|scope| {
        for _ in 0..workers {
            let tx = tx.clone();
            let (src, stop) = (&src, &stop);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some((seq, lines, bytes)) = next_chunk(src) else {
                        return;
                    };
                    let parsed = lines.map(|(text, lines)| {
                        lines
                            .into_iter()
                            .map(|(n, a, b)| (n, parse_line(n, text.get(a..b).unwrap_or(""))))
                            .collect()
                    });
                    if tx.send((seq, parsed, bytes)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let outcome = insert_in_order(&table, &rx, expected_lines, &mut report, progress);
        stop.store(true, Ordering::Relaxed);
        drop(rx);
        outcome
    });
    result?;
    report.lines = src.lock().map(|s| s.line).unwrap_or(report.lines);
    report.elapsed = start.elapsed();
    Ok((table, report))
}

fn insert_in_order<I: KeyIndex>(
    table: &SessionTable<I>,
    rx: &mpsc::Receiver<(u64, Result<Parsed, LoadError>, u64)>,
    expected_lines: Option<u64>,
    report: &mut LoadReport,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<(), LoadError> {
    let mut pending = BTreeMap::new();
    let mut next = 0u64;
    // Line number of each record id: a fresh table hands out ids 0, 1, 2, ... in order.
    let mut line_of: Vec<u64> = Vec::new();
    let mut bulk = Bulk::default();
    if let Some(n) = expected_lines {
        line_of.reserve(n as usize);
    }
    for (seq, parsed, bytes) in rx.iter() {
        pending.insert(seq, (parsed, bytes));
        while let Some((parsed, bytes)) = pending.remove(&next) {
            next += 1;
            for (line, session) in parsed? {
                let session = session?;
                let id = table
                    .bulk_push(&session, &mut bulk)
                    .map_err(|source| LoadError::Insert { line, source })?;
                let id = id as usize;
                if line_of.len() <= id {
                    line_of.resize(id + 1, 0);
                }
                line_of[id] = line;
                report.sessions += 1;
                report.lines = line;
            }
            report.bytes = bytes;
            progress(LoadProgress {
                lines: report.lines,
                bytes,
                sessions: report.sessions,
            });
        }
    }
    table.bulk_finish(&mut bulk).map_err(|(key, first, later)| {
        let line = |id: u32| line_of.get(id as usize).copied().unwrap_or(0);
        LoadError::Duplicate {
            line: line(later),
            first: line(first),
            key,
        }
    })
}

/// Loads a session file into a fresh default table.
pub fn load_jsonl_file(
    path: &Path,
    config: TableConfig,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<(SessionTable, LoadReport), LoadError> {
    let file = std::fs::File::open(path).map_err(LoadError::Open)?;
    load_jsonl(
        io::BufReader::with_capacity(1 << 20, file),
        config,
        None,
        progress,
    )
}

/// A progress bar over `total_bytes` when drawing one makes sense (`is_terminal`, e.g.
/// `std::io::stderr().is_terminal()`); feed it from the progress callback with
/// `bar.set_position(p.bytes)`.
pub fn progress_bar(total_bytes: u64, is_terminal: bool) -> Option<indicatif::ProgressBar> {
    if !is_terminal {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total_bytes);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} loading sessions [{bar:40}] {bytes}/{total_bytes} ({eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    Some(bar)
}

/// Writes `count` synthetic sessions of `seed` (`synth::sessions`), one JSON object a line.
pub fn write_synthetic_jsonl(mut out: impl Write, seed: u64, count: u64) -> io::Result<()> {
    for s in dynauth_proto::synth::sessions(seed, count) {
        serde_json::to_writer(&mut out, &s)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// A bulk build of a fresh table from sessions that arrive one by one (a snapshot's
/// records): each session is stored at once, every index is built in one sorted pass at
/// [`BulkLoader::finish`]. Much faster than inserting one by one; unique keys are checked
/// at the end.
pub struct BulkLoader<I: KeyIndex = super::FlatIndex> {
    table: SessionTable<I>,
    bulk: Bulk,
}

impl<I: KeyIndex> BulkLoader<I> {
    pub fn new(config: TableConfig) -> Self {
        BulkLoader {
            table: SessionTable::<I>::new(config),
            bulk: Bulk::default(),
        }
    }

    /// Stores one session (its index entries wait for `finish`); returns its record id.
    pub fn push(&mut self, session: &Session) -> Result<u32, InsertError> {
        self.table.bulk_push(session, &mut self.bulk)
    }

    /// Stores one session given as `encode_session` wrote it (a snapshot's record), without
    /// decoding it into a `Session`.
    pub fn push_encoded(&mut self, record: &[u8]) -> Result<u32, InsertError> {
        self.table.bulk_push_encoded(record, &mut self.bulk)
    }

    /// Builds the indexes. `Err((key, first, later))`: two records (ids) hold one value of a
    /// unique key; the table is unusable then and is dropped.
    pub fn finish(mut self) -> Result<SessionTable<I>, (&'static str, u32, u32)> {
        self.table.bulk_finish(&mut self.bulk)?;
        Ok(self.table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FlatIndex;
    use dynauth_proto::store::SessionStore;

    fn load(text: &str) -> Result<(SessionTable<FlatIndex>, LoadReport), LoadError> {
        load_jsonl::<FlatIndex>(text.as_bytes(), TableConfig::default(), None, &mut |_| {})
    }

    #[test]
    fn bulk_loader_builds_the_same_table_and_refuses_duplicates() {
        let sessions: Vec<Session> = dynauth_proto::synth::sessions(4, 5_000).collect();
        let mut loader = BulkLoader::<FlatIndex>::new(TableConfig::default());
        for s in &sessions {
            loader.push(s).unwrap();
        }
        let table = loader.finish().unwrap();
        assert_eq!(table.len(), sessions.len());
        // The same from encoded records (a snapshot's bytes).
        let mut encoded = BulkLoader::<FlatIndex>::new(TableConfig::default());
        let mut buf = Vec::new();
        for s in &sessions {
            crate::encode_session(s, &mut buf);
            encoded.push_encoded(&buf).unwrap();
        }
        assert_eq!(encoded.push_encoded(b"\xff"), Err(InsertError::Malformed));
        let from_bytes = encoded.finish().unwrap();
        assert_eq!(from_bytes.len(), sessions.len());
        let mut a = Vec::new();
        let mut b = Vec::new();
        table.for_each_session(|s| a.push(s.clone()));
        from_bytes.for_each_session(|s| b.push(s.clone()));
        assert_eq!(a, b);
        for s in sessions.iter().step_by(97) {
            let q = dynauth_proto::session::SessionQuery::from(s);
            let found = table.matching(&dynauth_proto::store::Lookup {
                query: q,
                scope: dynauth_proto::store::MatchScope {
                    vrf: s.vrf.as_deref(),
                    max_sessions: 10,
                    tombstone_window_ms: dynauth_proto::store::NO_CLIENT_WINDOW,
                },
                now_ms: 0,
            });
            assert_eq!(found.len(), 1, "{s:?}");
        }
        let mut twice = BulkLoader::<FlatIndex>::new(TableConfig::default());
        twice.push(&sessions[0]).unwrap();
        twice.push(&sessions[0]).unwrap();
        assert!(
            twice.finish().is_err(),
            "one Acct-Session-Id on two records"
        );
    }

    #[test]
    fn loads_synthetic_file_with_progress() {
        let mut file = Vec::new();
        write_synthetic_jsonl(&mut file, 9, 40_000).unwrap();
        let mut calls = 0;
        let mut last = LoadProgress::default();
        let (t, report) =
            load_jsonl::<FlatIndex>(&file[..], TableConfig::default(), Some(40_000), &mut |p| {
                calls += 1;
                last = p;
            })
            .unwrap();
        assert_eq!(t.len(), 40_000);
        assert_eq!(report.sessions, 40_000);
        assert_eq!(report.lines, 40_000);
        assert_eq!(report.bytes, file.len() as u64);
        assert!(calls >= 3);
        assert_eq!(last.sessions, 40_000);
        let snap = t.snapshot();
        assert_eq!(snap[12_345], dynauth_proto::synth::session(9, 12_345));
        // Every index was built: each key finds its session, and the table keeps working.
        use dynauth_proto::session::SessionQuery;
        use dynauth_proto::store::{Applied, Lookup, MatchScope};
        for i in [0u64, 1, 20_000, 39_999] {
            let want = dynauth_proto::synth::session(9, i);
            let id = dynauth_proto::synth::acct_session_id(9, i);
            let user = dynauth_proto::synth::user_name(i);
            let mac = dynauth_proto::synth::calling_station_id(9, i);
            let port = dynauth_proto::synth::nas_port_id(i);
            for query in [
                SessionQuery {
                    acct_session_id: Some(id.as_bytes()),
                    ..Default::default()
                },
                SessionQuery {
                    user_name: Some(user.as_bytes()),
                    ..Default::default()
                },
                SessionQuery {
                    calling_station_id: Some(mac.as_bytes()),
                    ..Default::default()
                },
                SessionQuery {
                    nas_port_id: Some(port.as_bytes()),
                    ..Default::default()
                },
                SessionQuery {
                    framed_ip: want.framed_ip,
                    ..Default::default()
                },
            ] {
                let l = Lookup {
                    query,
                    scope: MatchScope {
                        vrf: None,
                        max_sessions: 4,
                        tombstone_window_ms: dynauth_proto::store::NO_CLIENT_WINDOW,
                    },
                    now_ms: 0,
                };
                assert_eq!(t.matching(&l), vec![want.clone()]);
            }
            let l = Lookup {
                query: SessionQuery {
                    acct_session_id: Some(id.as_bytes()),
                    ..Default::default()
                },
                scope: MatchScope {
                    vrf: None,
                    max_sessions: 4,
                    tombstone_window_ms: dynauth_proto::store::NO_CLIENT_WINDOW,
                },
                now_ms: 0,
            };
            assert_eq!(t.disconnect(&l), Ok(Applied::Sessions(1)));
            assert!(t.insert(want));
        }
        assert!(!t.insert(dynauth_proto::synth::session(9, 7)));
    }

    #[test]
    fn bad_value_names_line_and_field() {
        let text = "{\"acct_session_id\":\"a\"}\n\n{\"acct_session_id\":\"b\",\"framed_ip\":\"300.1.2.3\"}\n";
        match load(text) {
            Err(LoadError::Field { line, field, .. }) => {
                assert_eq!((line, field.as_str()), (3, "framed_ip"));
            }
            other => panic!("{other:?}"),
        }
        let err = load("{\"acct_session_id\":\"a\",\"bogus\":1}\n").unwrap_err();
        assert!(matches!(&err, LoadError::Field { line: 1, field, .. } if field == "bogus"));
        let err = load("{\"acct_session_id\":\"a\"}\n{oops\n").unwrap_err();
        assert!(matches!(err, LoadError::Syntax { line: 2, .. }), "{err}");
        let err = load("{\"acct_session_id\":\"a\"}\n{\"vrf\":\"red\"}\n").unwrap_err();
        assert!(matches!(err, LoadError::NoKey { line: 2 }));
        assert!(err.to_string().contains("line 2"));
    }

    #[test]
    fn duplicate_unique_key_names_both_lines_and_loads_nothing() {
        let text = "{\"acct_session_id\":\"a\"}\n{\"acct_session_id\":\"b\"}\n{\"user_name\":\"u\",\"acct_session_id\":\"a\"}\n";
        match load(text) {
            Err(LoadError::Duplicate { line, first, key }) => {
                assert_eq!((line, first, key), (3, 1, "acct_session_id"));
            }
            other => panic!("{other:?}"),
        }
        let text = "{\"framed_ip\":\"10.0.0.1\",\"vrf\":\"a\"}\n{\"framed_ip\":\"10.0.0.1\",\"vrf\":\"b\"}\n{\"framed_ip\":\"10.0.0.1\",\"vrf\":\"a\"}\n";
        assert!(matches!(
            load(text),
            Err(LoadError::Duplicate {
                line: 3,
                first: 1,
                key: "framed_ip"
            })
        ));
    }

    #[test]
    fn invalid_utf8_is_an_error_naming_the_line() {
        let mut bytes = b"{\"acct_session_id\":\"a\"}\n".to_vec();
        bytes.extend_from_slice(b"{\"acct_session_id\":\"\xff\"}\n");
        let err = load_jsonl::<FlatIndex>(&bytes[..], TableConfig::default(), None, &mut |_| {})
            .unwrap_err();
        assert!(matches!(err, LoadError::Io { line: 2, .. }), "{err}");
        assert!(err.to_string().starts_with("line 2: cannot read"));
    }

    #[test]
    fn loads_a_file_written_by_the_generator() {
        let path = std::env::temp_dir().join(format!("dynauth-table-{}.jsonl", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        write_synthetic_jsonl(io::BufWriter::new(file), 4, 1000).unwrap();
        let (t, report) = load_jsonl_file(&path, TableConfig::default(), &mut |_| {}).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!((t.len(), report.sessions), (1000, 1000));
        assert!(
            report
                .to_string()
                .starts_with("loaded 1000 sessions (1000 lines")
        );
        assert!(progress_bar(10, false).is_none());
        let missing = load_jsonl_file(
            Path::new("/nonexistent/x.jsonl"),
            TableConfig::default(),
            &mut |_| {},
        );
        assert!(matches!(missing, Err(LoadError::Open(_))));
    }

    #[test]
    fn earliest_duplicate_is_reported() {
        let text = "{\"cui\":\"x\"}\n{\"acct_session_id\":\"a\"}\n{\"acct_session_id\":\"b\"}\n{\"acct_session_id\":\"b\"}\n{\"cui\":\"x\"}\n{\"acct_session_id\":\"a\"}\n";
        assert!(matches!(
            load(text),
            Err(LoadError::Duplicate {
                line: 4,
                first: 3,
                key: "acct_session_id"
            })
        ));
    }

    #[test]
    fn error_deep_in_a_large_file_is_found_and_returns_no_table() {
        let mut file = Vec::new();
        write_synthetic_jsonl(&mut file, 1, 50_000).unwrap();
        file.extend_from_slice(b"{\"nas_port\":\"seven\"}\n");
        let err = load(std::str::from_utf8(&file).unwrap()).unwrap_err();
        assert!(
            matches!(&err, LoadError::Field { line: 50_001, field, .. } if field == "nas_port")
        );
    }
}
