//! The audit log (`--audit-log PATH|-`): one JSON line per decided Disconnect or CoA (a fresh
//! answer from a shard or the action dispatcher) and per operator disconnect from the control
//! socket: the time (RFC 3339, UTC), the DAC, the request code and Identifier, the sessions
//! (Acct-Session-Id and NAS), the result and the Error-Cause. Never a secret, never a packet.
//!
//! Owns: the record format, the bounded queue from the shards (a full queue drops the line and
//! counts it, `dynauth_audit_dropped_total`: a shard never waits for the disk), the writer
//! thread, and size-based rotation (`PATH` → `PATH.1` → ... → `PATH.N`, the oldest removed).
//! Must not touch: decisions (the engine, the dispatcher), and nothing of it runs when the audit
//! log is off (the shards hold `None` and build no record).
#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender, TrySendError};
use dynauth_proto::Answer;
use dynauth_proto::action::{PendingRequest, Settled};
use dynauth_proto::codec::Packet;
use dynauth_proto::dict::{attr, code};
use dynauth_proto::session::Session;
use serde::Serialize;

/// Records queued between the shards and the writer; more are dropped and counted.
pub const QUEUE_CAPACITY: usize = 16_384;
/// Default size at which the file is rotated (`--audit-log-max-bytes`).
pub const DEFAULT_MAX_BYTES: u64 = 100 << 20;
/// Default number of rotated files kept (`--audit-log-keep`).
pub const DEFAULT_KEEP: usize = 5;

/// Where and how the audit log is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditOptions {
    /// `None`: standard output (`--audit-log -`), never rotated.
    pub path: Option<PathBuf>,
    /// Rotate before a line would make the file larger than this (0: never).
    pub max_bytes: u64,
    /// Rotated files kept: `PATH.1` (newest) ... `PATH.keep`.
    pub keep: usize,
}

/// One session an audited request selected.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AuditSession {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acct_session_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nas: Option<String>,
}

/// One line of the audit log (before its time is formatted).
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    #[serde(skip)]
    pub at: SystemTime,
    /// `radius` (a DAC's request) or `operator` (a control-socket disconnect).
    pub origin: &'static str,
    /// The DAC's address and port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dac: Option<String>,
    /// The control-socket client's agent name (operator disconnects).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// `Disconnect-Request` or `CoA-Request`.
    pub request: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identifier: Option<u8>,
    /// The sessions: those selected (agent mode, operator disconnects), else the session the
    /// request identified (its Acct-Session-Id and NAS attributes).
    pub sessions: Vec<AuditSession>,
    /// `ACK` or `NAK`.
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_cause: Option<u32>,
    /// Sessions removed or changed in the table.
    pub changed: u32,
}

/// The shards' and dispatcher's handle: queue a record, never block.
#[derive(Debug)]
pub struct AuditLog {
    tx: Sender<AuditRecord>,
    dropped: AtomicU64,
    stats: Arc<WriterStats>,
}

#[derive(Debug, Default)]
struct WriterStats {
    lines: AtomicU64,
    rotations: AtomicU64,
    write_errors: AtomicU64,
}

/// The writer thread; [`AuditWriter::stop`] writes what is queued and joins it.
pub struct AuditWriter {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

/// Why the audit log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(
        "--audit-log {path}: cannot open for appending: {source} (create its directory, or give a writable path)"
    )]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--audit-log: cannot start the writer thread: {0}")]
    Thread(#[source] io::Error),
}

fn request_name(c: u8) -> &'static str {
    if c == code::COA_REQUEST {
        "CoA-Request"
    } else {
        "Disconnect-Request"
    }
}

fn ack_or_nak(answer_code: u8) -> &'static str {
    if answer_code == code::DISCONNECT_ACK || answer_code == code::COA_ACK {
        "ACK"
    } else {
        "NAK"
    }
}

fn session_of(s: &Session) -> AuditSession {
    AuditSession {
        acct_session_id: s.acct_session_id.clone(),
        nas: s.nas.clone(),
    }
}

/// The session a request names: its Acct-Session-Id and its NAS (NAS-Identifier, else
/// NAS-IP-Address, else NAS-IPv6-Address).
fn requested_session(packet: &Packet<'_>) -> AuditSession {
    let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    let mut s = AuditSession {
        acct_session_id: None,
        nas: None,
    };
    let (mut id, mut v4, mut v6) = (None, None, None);
    for a in packet.attributes().map_while(Result::ok) {
        match a.ty {
            attr::ACCT_SESSION_ID if s.acct_session_id.is_none() => {
                s.acct_session_id = Some(text(a.value))
            }
            attr::NAS_IDENTIFIER if id.is_none() => id = Some(text(a.value)),
            attr::NAS_IP_ADDRESS if v4.is_none() => {
                v4 = <[u8; 4]>::try_from(a.value)
                    .ok()
                    .map(|b| IpAddr::V4(Ipv4Addr::from(b)).to_string())
            }
            attr::NAS_IPV6_ADDRESS if v6.is_none() => {
                v6 = <[u8; 16]>::try_from(a.value)
                    .ok()
                    .map(|b| IpAddr::V6(Ipv6Addr::from(b)).to_string())
            }
            _ => {}
        }
    }
    s.nas = id.or(v4).or(v6);
    s
}

impl AuditLog {
    /// Opens the log and starts its writer thread.
    pub fn start(options: &AuditOptions) -> Result<(Arc<AuditLog>, AuditWriter), AuditError> {
        let sink = Sink::open(options)?;
        let (tx, rx) = channel::bounded(QUEUE_CAPACITY);
        let stats = Arc::new(WriterStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stats = Arc::clone(&stats);
            let stop = Arc::clone(&stop);
            thread::Builder::new()
                .name("dynauthd-audit".into())
                .spawn(move || write_loop(sink, &rx, &stats, &stop))
                .map_err(AuditError::Thread)?
        };
        Ok((
            Arc::new(AuditLog {
                tx,
                dropped: AtomicU64::new(0),
                stats,
            }),
            AuditWriter {
                stop,
                thread: Some(thread),
            },
        ))
    }

    /// Queues `record`; a full queue drops it (counted).
    pub fn record(&self, record: AuditRecord) {
        match self.tx.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A shard's fresh answer to the request in `datagram` from `source`.
    pub fn radius_answer(&self, datagram: &[u8], source: SocketAddr, answer: &Answer) {
        let Ok(packet) = Packet::parse(datagram) else {
            return;
        };
        self.record(AuditRecord {
            at: SystemTime::now(),
            origin: "radius",
            dac: Some(source.to_string()),
            operator: None,
            request: request_name(packet.code()),
            identifier: Some(packet.identifier()),
            sessions: vec![requested_session(&packet)],
            result: ack_or_nak(answer.code),
            error_cause: answer.error_cause.map(|c| c.value()),
            changed: answer.sessions,
        });
    }

    /// The dispatcher's answer to `pending` (`answer` is its bytes).
    pub fn settled_answer(&self, pending: &PendingRequest, settled: &Settled, answer: &[u8]) {
        let request = if pending.kind() == dynauth_proto::action::ActionKind::Disconnect {
            code::DISCONNECT_REQUEST
        } else {
            code::COA_REQUEST
        };
        self.record(AuditRecord {
            at: SystemTime::now(),
            origin: "radius",
            dac: Some(settled.source.to_string()),
            operator: None,
            request: request_name(request),
            identifier: answer.get(1).copied(),
            sessions: pending.sessions().iter().map(session_of).collect(),
            result: ack_or_nak(settled.code),
            error_cause: settled.error_cause.map(|c| c.value()),
            changed: settled.sessions,
        });
    }

    /// An operator's disconnect over the control socket: `ok` when every session was torn
    /// down (or removed from the table).
    pub fn operator_disconnect(
        &self,
        operator: &str,
        sessions: &[Session],
        ok: bool,
        changed: u32,
    ) {
        self.record(AuditRecord {
            at: SystemTime::now(),
            origin: "operator",
            dac: None,
            operator: Some(operator.to_owned()),
            request: "Disconnect-Request",
            identifier: None,
            sessions: sessions.iter().map(session_of).collect(),
            result: if ok { "ACK" } else { "NAK" },
            error_cause: None,
            changed,
        });
    }

    /// `dynauth_audit_*` metrics.
    pub fn write_prometheus(&self, out: &mut String) {
        use std::fmt::Write as _;
        for (name, help, v) in [
            (
                "dynauth_audit_lines_total",
                "Audit log lines written",
                self.stats.lines.load(Ordering::Relaxed),
            ),
            (
                "dynauth_audit_dropped_total",
                "Audit log lines dropped because the writer's queue was full",
                self.dropped.load(Ordering::Relaxed),
            ),
            (
                "dynauth_audit_rotations_total",
                "Audit log files rotated",
                self.stats.rotations.load(Ordering::Relaxed),
            ),
            (
                "dynauth_audit_write_errors_total",
                "Audit log lines that could not be written",
                self.stats.write_errors.load(Ordering::Relaxed),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}.\n# TYPE {name} counter\n{name} {v}"
            );
        }
    }
}

impl AuditWriter {
    /// Writes every queued line, flushes and stops the thread.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum Sink {
    Stdout,
    File {
        path: PathBuf,
        file: io::BufWriter<File>,
        size: u64,
        max_bytes: u64,
        keep: usize,
    },
}

fn open_append(path: &Path) -> io::Result<(File, u64)> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let size = file.metadata()?.len();
    Ok((file, size))
}

impl Sink {
    fn open(options: &AuditOptions) -> Result<Sink, AuditError> {
        let Some(path) = &options.path else {
            return Ok(Sink::Stdout);
        };
        let (file, size) = open_append(path).map_err(|source| AuditError::Open {
            path: path.clone(),
            source,
        })?;
        Ok(Sink::File {
            path: path.clone(),
            file: io::BufWriter::new(file),
            size,
            max_bytes: options.max_bytes,
            keep: options.keep,
        })
    }

    /// Writes one line (with its newline), rotating first when it would pass the limit.
    fn line(&mut self, line: &[u8], stats: &WriterStats) -> io::Result<()> {
        match self {
            Sink::Stdout => io::stdout().lock().write_all(line),
            Sink::File {
                path,
                file,
                size,
                max_bytes,
                keep,
            } => {
                let len = line.len() as u64;
                if *max_bytes > 0 && *size > 0 && *size + len > *max_bytes {
                    file.flush()?;
                    rotate(path, *keep)?;
                    let (f, s) = open_append(path)?;
                    *file = io::BufWriter::new(f);
                    *size = s;
                    stats.rotations.fetch_add(1, Ordering::Relaxed);
                }
                file.write_all(line)?;
                *size += len;
                Ok(())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Stdout => io::stdout().lock().flush(),
            Sink::File { file, .. } => file.flush(),
        }
    }
}

/// `PATH.keep` is removed, `PATH.i` becomes `PATH.i+1`, `PATH` becomes `PATH.1` (with
/// `keep` 0 the file is simply started again).
fn rotate(path: &Path, keep: usize) -> io::Result<()> {
    let numbered = |i: usize| {
        let mut p = path.as_os_str().to_owned();
        p.push(format!(".{i}"));
        PathBuf::from(p)
    };
    if keep == 0 {
        return std::fs::remove_file(path);
    }
    let _ = std::fs::remove_file(numbered(keep));
    for i in (1..keep).rev() {
        let from = numbered(i);
        if from.exists() {
            std::fs::rename(&from, numbered(i + 1))?;
        }
    }
    std::fs::rename(path, numbered(1))
}

fn write_loop(mut sink: Sink, rx: &Receiver<AuditRecord>, stats: &WriterStats, stop: &AtomicBool) {
    let mut line = Vec::with_capacity(512);
    let mut errors = 0u64;
    let mut write = |record: AuditRecord, sink: &mut Sink| {
        line.clear();
        if format_line(&record, &mut line).is_err() {
            return;
        }
        match sink.line(&line, stats) {
            Ok(()) => {
                stats.lines.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                stats.write_errors.fetch_add(1, Ordering::Relaxed);
                errors += 1;
                if errors <= 10 || errors.is_power_of_two() {
                    tracing::error!("audit log: a line could not be written (count {errors}): {e}");
                }
            }
        }
    };
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(record) => {
                write(record, &mut sink);
                while let Ok(record) = rx.try_recv() {
                    write(record, &mut sink);
                }
                let _ = sink.flush();
            }
            Err(RecvTimeoutError::Timeout) => {
                if stop.load(Ordering::Acquire) {
                    break;
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    while let Ok(record) = rx.try_recv() {
        write(record, &mut sink);
    }
    let _ = sink.flush();
}

/// `{"time":"2024-05-01T12:00:00.123Z",...}` and a newline.
fn format_line(record: &AuditRecord, out: &mut Vec<u8>) -> serde_json::Result<()> {
    out.extend_from_slice(b"{\"time\":\"");
    out.extend_from_slice(rfc3339(record.at).as_bytes());
    out.extend_from_slice(b"\",");
    let body = serde_json::to_vec(record)?;
    // `body` is a JSON object: its fields follow the time.
    out.extend_from_slice(body.get(1..).unwrap_or(b"}"));
    out.push(b'\n');
    Ok(())
}

/// RFC 3339 in UTC with milliseconds, e.g. `2024-05-01T12:00:00.123Z`.
pub fn rfc3339(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        let at = |s: u64, ms: u64| UNIX_EPOCH + Duration::from_millis(s * 1000 + ms);
        assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(at(951_782_400, 5)), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(at(1_700_000_000, 123)), "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn rotation_keeps_n_files() {
        let dir = std::env::temp_dir().join(format!("dynauthd-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.log");
        let options = AuditOptions {
            path: Some(path.clone()),
            max_bytes: 100,
            keep: 2,
        };
        let mut sink = Sink::open(&options).unwrap();
        let stats = WriterStats::default();
        for i in 0..10 {
            sink.line(format!("{i:039}\n").as_bytes(), &stats).unwrap();
        }
        sink.flush().unwrap();
        // 40-octet lines, at most 100 octets a file: two lines each, the oldest dropped.
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(&path).lines().count(), 2);
        assert!(read(&path).ends_with(&format!("{:039}\n", 9)));
        assert!(read(&dir.join("audit.log.1")).starts_with(&format!("{:039}\n", 6)));
        assert!(dir.join("audit.log.2").exists());
        assert!(!dir.join("audit.log.3").exists());
        assert_eq!(stats.rotations.load(Ordering::Relaxed), 4);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
