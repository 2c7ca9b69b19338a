//! The control socket: newline-delimited JSON over a Unix domain stream socket, for the
//! gateway's own agents (the session feed) and for operators (`dynauthctl`). The protocol,
//! with a complete example session, is `docs/CONTROL.md`.
//!
//! Owns: the socket file (created mode 0600 unless configured, owner configurable, replaced
//! only when stale), connections (each on its own thread, at most [`MAX_CONNECTIONS`]), the
//! message format (version 1), NAS ownership between agents, and the audit log of
//! operator-initiated actions.
//! Must not touch: the feed's ordering rules (`dynauth_proto::feed`), the store's internals,
//! the UDP path. Back-pressure: a connection's next line is read only after the previous one
//! was applied and answered, so a fast agent is slowed by the kernel's socket buffer, never
//! by memory here; a line is at most [`MAX_LINE`] octets.
#![forbid(unsafe_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use dynauth_proto::feed::{FeedEvent, FeedOutcome, Sequenced};
use dynauth_proto::session::{Session, SessionQuery};
use dynauth_proto::store::{Applied, Lookup, MatchScope, UpsertMode, Upserted};
use serde::Deserialize as _;
use serde_json::{Map, Value, json};

use crate::actions::{AgentLink, Agents, Owner, Submitter};
use crate::feed::SessionFeed;

mod typed_batch;

/// The protocol version this server speaks.
pub const VERSION: u64 = 1;
/// The longest line accepted (a batch of a few thousand sessions).
pub const MAX_LINE: usize = 4 << 20;
/// The most connections served at once; more are refused with an error line.
pub const MAX_CONNECTIONS: usize = 64;
/// The most sessions one `sessions_get` returns.
pub const MAX_RESULTS: usize = 1000;

/// Where and how to create the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    pub path: PathBuf,
    /// File mode of the socket (default 0o600: only the owner may connect).
    pub mode: u32,
    /// Owner and group to give the socket, when set.
    pub owner: Option<(Option<u32>, Option<u32>)>,
}

impl ControlConfig {
    pub fn new(path: PathBuf) -> Self {
        ControlConfig {
            path,
            mode: 0o600,
            owner: None,
        }
    }
}

/// Why the control socket could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{path}: another process is already listening on this control socket")]
    InUse { path: PathBuf },
    #[error("{path}: exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
}

fn io_error<'p>(path: &'p Path, what: &'static str) -> impl FnOnce(io::Error) -> ControlError + 'p {
    move |source| ControlError::Io {
        path: path.to_owned(),
        what,
        source,
    }
}

/// Answers `sessions_get`: the live sessions matching a query session (the carrier table's
/// `matching`, or any store that can list matches).
pub type SessionReader = Arc<dyn Fn(&Session) -> Vec<Session> + Send + Sync>;

/// `reload`: reads the configuration again; the summary, or the error that refused it.
pub type ReloadHook = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// What the control socket offers beyond the feed and the agents.
#[derive(Default, Clone)]
pub struct ControlExtras {
    /// Answers `reload` (without it, `reload` is refused).
    pub reload: Option<ReloadHook>,
    /// Where operator disconnects are audited (`--audit-log`).
    pub audit: Option<Arc<crate::audit::AuditLog>>,
}

/// State shared by every connection.
struct Shared {
    extras: ControlExtras,
    feed: Arc<SessionFeed>,
    /// Reads for `sessions_get` (the carrier table, or any store that can list matches).
    reader: SessionReader,
    /// The agents and the NASes each owns.
    agents: Arc<Agents>,
    /// Where agents' action results go (agent mode); `None` in table-only mode.
    actions: Option<Submitter>,
    connections: AtomicUsize,
    stop: AtomicBool,
}

/// The running control socket. Dropping it (or `stop`) closes it and removes the file.
pub struct ControlServer {
    path: PathBuf,
    shared: Arc<Shared>,
    accept: Option<thread::JoinHandle<()>>,
}

impl core::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ControlServer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ControlServer {
    /// Creates the socket and starts accepting. `reader` answers `sessions_get` with the
    /// live sessions matching a query session. With `actions` (agent mode), agents that say
    /// `"actions": true` in their hello receive actions for the NASes they own.
    pub fn start(
        config: &ControlConfig,
        feed: Arc<SessionFeed>,
        reader: SessionReader,
        agents: Arc<Agents>,
        actions: Option<Submitter>,
    ) -> Result<ControlServer, ControlError> {
        Self::start_with(
            config,
            feed,
            reader,
            agents,
            actions,
            ControlExtras::default(),
        )
    }

    /// [`ControlServer::start`] with `reload` and the audit log.
    pub fn start_with(
        config: &ControlConfig,
        feed: Arc<SessionFeed>,
        reader: SessionReader,
        agents: Arc<Agents>,
        actions: Option<Submitter>,
        extras: ControlExtras,
    ) -> Result<ControlServer, ControlError> {
        let listener = bind(config)?;
        listener
            .set_nonblocking(true)
            .map_err(io_error(&config.path, "setting non-blocking"))?;
        let shared = Arc::new(Shared {
            extras,
            feed,
            reader,
            agents,
            actions,
            connections: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let accept_shared = Arc::clone(&shared);
        let accept = thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(listener, accept_shared))
            .map_err(io_error(&config.path, "starting the control thread"))?;
        Ok(ControlServer {
            path: config.path.clone(),
            shared,
            accept: Some(accept),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, ends every connection and removes the socket file.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Binds under a temporary name, sets mode and owner, then renames into place, so the
/// socket is never reachable with the umask's permissions.
fn bind(config: &ControlConfig) -> Result<UnixListener, ControlError> {
    let path = &config.path;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(ControlError::InUse { path: path.clone() }),
            // Nobody listens: a stale socket from a process that died.
            Err(_) => {
                std::fs::remove_file(path).map_err(io_error(path, "removing a stale socket"))?
            }
        },
        Ok(_) => return Err(ControlError::NotASocket { path: path.clone() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(path, "reading")(e)),
    }
    let mut temporary = path.clone().into_os_string();
    temporary.push(format!(".{}.tmp", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let _ = std::fs::remove_file(&temporary);
    let listener = UnixListener::bind(&temporary).map_err(io_error(path, "binding"))?;
    let prepared =
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(config.mode))
            .map_err(io_error(path, "setting the socket's mode"))
            .and_then(|()| match config.owner {
                Some((uid, gid)) => std::os::unix::fs::chown(&temporary, uid, gid)
                    .map_err(io_error(path, "setting the socket's owner")),
                None => Ok(()),
            })
            .and_then(|()| {
                std::fs::rename(&temporary, path).map_err(io_error(path, "moving into place"))
            });
    if let Err(e) = prepared {
        let _ = std::fs::remove_file(&temporary);
        return Err(e);
    }
    Ok(listener)
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    let mut next_connection = 0u64;
    let mut workers: Vec<thread::JoinHandle<()>> = Vec::new();
    while !shared.stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => {
                next_connection += 1;
                let _ = stream.set_nonblocking(false);
                if shared.connections.load(Ordering::Acquire) >= MAX_CONNECTIONS {
                    let mut s = stream;
                    let _ = writeln!(
                        s,
                        "{}",
                        error_reply(&Value::Null, 0, "busy", None, "too many connections")
                    );
                    continue;
                }
                shared.connections.fetch_add(1, Ordering::AcqRel);
                let conn_shared = Arc::clone(&shared);
                let id = next_connection;
                match thread::Builder::new()
                    .name(format!("control-{id}"))
                    .spawn(move || {
                        serve_connection(stream, id, &conn_shared);
                        conn_shared.release(id);
                        conn_shared.connections.fetch_sub(1, Ordering::AcqRel);
                    }) {
                    Ok(t) => workers.push(t),
                    Err(e) => {
                        shared.connections.fetch_sub(1, Ordering::AcqRel);
                        tracing::warn!("control: could not start a connection thread: {e}");
                    }
                }
                workers.retain(|t| !t.is_finished());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                tracing::warn!("control: accept failed: {e}");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
    for t in workers {
        let _ = t.join();
    }
}

impl Shared {
    /// A connection ended: its NASes are free again, and its actions without results are
    /// answered NAK 506 now.
    fn release(&self, connection: u64) {
        self.agents.release(connection);
        if let Some(actions) = &self.actions {
            actions.agent_gone(connection);
        }
    }
}

/// One connection's state.
struct Connection<'s> {
    id: u64,
    agent: Option<String>,
    /// Whether this connection claimed NASes with `hello` (then it may feed only those).
    claimed: bool,
    /// Whether it takes actions (`"actions": true` in its hello).
    takes_actions: bool,
    /// The message just handled gets no reply (an accepted `action_result`).
    silent: bool,
    shared: &'s Shared,
    writer: SharedWriter,
    /// The connection itself (to close it when an action line cannot be written).
    stream: UnixStream,
}

/// The connection's write half, shared by its replies and the dispatcher's action lines.
#[derive(Clone)]
struct SharedWriter(Arc<Mutex<io::BufWriter<UnixStream>>>);

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

impl SharedWriter {
    /// One whole line under one lock; sent now when `flush` (else it waits in the buffer for
    /// the next flush: a pipelining agent gets its replies in one write).
    fn line(&self, text: &str, flush: bool) -> io::Result<()> {
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        writeln!(w, "{text}")?;
        if flush { w.flush() } else { Ok(()) }
    }
}

fn serve_connection(stream: UnixStream, id: u64, shared: &Shared) {
    // A short read timeout lets the thread notice shutdown.
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    // An agent that stops reading must not stall the dispatcher for long.
    let _ = write_half.set_write_timeout(Some(Duration::from_secs(1)));
    let mut writer = SharedWriter(Arc::new(Mutex::new(io::BufWriter::with_capacity(
        64 << 10,
        write_half,
    ))));
    let Ok(own) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut conn = Connection {
        id,
        agent: None,
        claimed: false,
        takes_actions: false,
        silent: false,
        shared,
        writer: writer.clone(),
        stream: own,
    };
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        match read_line(&mut reader, &mut line) {
            Ok(LineRead::Eof) => return,
            Ok(LineRead::Partial) => {
                if writer.flush().is_err() {
                    return;
                }
                continue;
            }
            Ok(LineRead::Line) => {
                number += 1;
                // Valid UTF-8 (the norm) is borrowed as it is; anything else is read with
                // U+FFFD in place of the bad octets, and then fails where a field is wrong.
                let text = match std::str::from_utf8(&line) {
                    Ok(text) => std::borrow::Cow::Borrowed(text),
                    Err(_) => String::from_utf8_lossy(&line),
                };
                if text.trim().is_empty() {
                    line.clear();
                    continue;
                }
                let Some(reply) = conn.handle(&text, number) else {
                    line.clear();
                    continue;
                };
                line.clear();
                // More lines already read: answer them too before writing.
                let more = reader.buffer().contains(&b'\n');
                if writer.line(&reply, !more).is_err() {
                    return;
                }
            }
            Ok(LineRead::TooLong) => {
                number += 1;
                line.clear();
                let reply = error_reply(
                    &Value::Null,
                    number,
                    "line_too_long",
                    None,
                    &format!("a line is at most {MAX_LINE} octets; this one was skipped"),
                );
                if writer.line(&reply, true).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

enum LineRead {
    Line,
    /// The read timed out mid-line; `line` keeps what arrived.
    Partial,
    TooLong,
    Eof,
}

/// Reads up to a newline into `line` (kept across timeouts), never more than `MAX_LINE`
/// octets: the rest of a longer line is read and thrown away.
fn read_line(reader: &mut BufReader<UnixStream>, line: &mut Vec<u8>) -> io::Result<LineRead> {
    loop {
        let room = (MAX_LINE + 1).saturating_sub(line.len()) as u64;
        let before = line.len();
        let read = reader.by_ref().take(room).read_until(b'\n', line);
        match read {
            Ok(0) if before == line.len() => {
                if room == 0 {
                    return skip_rest(reader).map(|()| LineRead::TooLong);
                }
                return Ok(LineRead::Eof);
            }
            Ok(_) => {
                if line.last() == Some(&b'\n') {
                    line.pop();
                    return Ok(if line.len() > MAX_LINE {
                        LineRead::TooLong
                    } else {
                        LineRead::Line
                    });
                }
                if line.len() > MAX_LINE {
                    return skip_rest(reader).map(|()| LineRead::TooLong);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                return Ok(LineRead::Partial);
            }
            Err(e) => return Err(e),
        }
    }
}

fn skip_rest(reader: &mut BufReader<UnixStream>) -> io::Result<()> {
    let mut sink = Vec::new();
    loop {
        sink.clear();
        match reader.by_ref().take(64 << 10).read_until(b'\n', &mut sink) {
            Ok(0) => return Ok(()),
            Ok(_) if sink.last() == Some(&b'\n') => return Ok(()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

/// A refusal of one message: its code, the field at fault, and a human sentence.
struct Refused {
    code: &'static str,
    field: Option<String>,
    message: String,
}

fn refused(code: &'static str, field: Option<&str>, message: impl Into<String>) -> Refused {
    Refused {
        code,
        field: field.map(str::to_owned),
        message: message.into(),
    }
}

fn error_reply(id: &Value, line: u64, code: &str, field: Option<&str>, message: &str) -> String {
    let mut error = Map::new();
    error.insert("code".into(), json!(code));
    if let Some(f) = field {
        error.insert("field".into(), json!(f));
    }
    error.insert("line".into(), json!(line));
    error.insert("message".into(), json!(message));
    let mut reply = Map::new();
    reply.insert("v".into(), json!(VERSION));
    if !id.is_null() {
        reply.insert("id".into(), id.clone());
    }
    reply.insert("ok".into(), json!(false));
    reply.insert("error".into(), Value::Object(error));
    Value::Object(reply).to_string()
}

fn ok_reply(id: &Value, result: Value) -> String {
    let mut reply = Map::new();
    reply.insert("v".into(), json!(VERSION));
    if !id.is_null() {
        reply.insert("id".into(), id.clone());
    }
    reply.insert("ok".into(), json!(true));
    reply.insert("result".into(), result);
    Value::Object(reply).to_string()
}

fn str_field<'m>(m: &'m Map<String, Value>, name: &str) -> Result<&'m str, Refused> {
    match m.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(_) => Err(refused(
            "bad_field",
            Some(name),
            "must be a non-empty string",
        )),
        None => Err(refused("missing_field", Some(name), "is required")),
    }
}

fn seq_field(m: &Map<String, Value>) -> Result<Option<u64>, Refused> {
    match m.get("seq") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| refused("bad_field", Some("seq"), "must be a non-negative integer")),
    }
}

/// Reads a session, naming the first field that is wrong (`session.framed_ip`).
fn session_field(value: Option<&Value>, path: &str) -> Result<Session, Refused> {
    let Some(value) = value else {
        return Err(refused("missing_field", Some(path), "is required"));
    };
    let Value::Object(fields) = value else {
        return Err(refused("bad_field", Some(path), "must be a JSON object"));
    };
    // Read from the borrowed value (no copy of the session's JSON per event).
    Session::deserialize(value).map_err(|whole| {
        // Find the culprit: the first field that does not parse on its own.
        for (name, v) in fields {
            let one = Value::Object(Map::from_iter([(name.clone(), v.clone())]));
            if let Err(e) = serde_json::from_value::<Session>(one) {
                return refused("bad_field", Some(&format!("{path}.{name}")), e.to_string());
            }
        }
        refused("bad_field", Some(path), whole.to_string())
    })
}

fn mode_field(m: &Map<String, Value>) -> Result<UpsertMode, Refused> {
    match m.get("mode").and_then(Value::as_str) {
        None if m.get("mode").is_none() => Ok(UpsertMode::Create),
        Some("create") => Ok(UpsertMode::Create),
        Some("refresh") => Ok(UpsertMode::Refresh),
        _ => Err(refused(
            "bad_field",
            Some("mode"),
            "must be \"create\" (the default) or \"refresh\"",
        )),
    }
}

/// Where an event message is, for naming a wrong field: the field's name is built only when
/// there is an error to report (none per event on the way in).
#[derive(Debug, Clone, Copy)]
enum Place {
    /// A message of its own: `nas`.
    Message,
    /// Event `i` of a batch: `events[i].nas`.
    InBatch(usize),
}

impl Place {
    fn field(self, name: &str) -> String {
        match self {
            Place::Message => name.to_owned(),
            Place::InBatch(i) => format!("events[{i}].{name}"),
        }
    }
}

fn outcome_json(outcome: FeedOutcome) -> Value {
    match outcome {
        FeedOutcome::Upserted(Upserted::Inserted) => json!({"upserted": "inserted"}),
        FeedOutcome::Upserted(Upserted::Replaced) => json!({"upserted": "replaced"}),
        FeedOutcome::Upserted(Upserted::StillRemoved) => json!({"upserted": "still_removed"}),
        FeedOutcome::Deleted(found) => json!({"deleted": found}),
        FeedOutcome::Removed(n) => json!({"removed": n}),
        FeedOutcome::SyncStarted => json!({"sync": "started"}),
        FeedOutcome::Stale { last } => json!({"stale": true, "last_seq": last}),
    }
}

impl<'s> Connection<'s> {
    /// The reply line; `None` for an accepted `action_result`, which gets none (an agent
    /// answering a storm of actions must never be blocked by replies it does not read).
    fn handle(&mut self, text: &str, line: u64) -> Option<String> {
        let reply = self.reply(text, line);
        (!core::mem::take(&mut self.silent)).then_some(reply)
    }

    fn reply(&mut self, text: &str, line: u64) -> String {
        // The feed's bulk form first, read without a `Value` tree; anything it does not
        // take as it is goes the general way, which names what is wrong.
        if let Some(batch) = typed_batch::parse(text)
            && let Some(reply) = self.typed_batch(batch)
        {
            return reply;
        }
        if let Some(result) = typed_batch::parse_action_result(text)
            && let Some(reply) = self.typed_action_result(result)
        {
            return reply;
        }
        let parsed: Result<Value, _> = serde_json::from_str(text);
        let message = match parsed {
            Ok(Value::Object(m)) => m,
            Ok(_) => {
                return error_reply(&Value::Null, line, "bad_message", None, "not a JSON object");
            }
            Err(e) => {
                return error_reply(&Value::Null, line, "bad_json", None, &e.to_string());
            }
        };
        let id = message.get("id").cloned().unwrap_or(Value::Null);
        match message.get("v").and_then(Value::as_u64) {
            Some(VERSION) => {}
            Some(other) => {
                return error_reply(
                    &id,
                    line,
                    "unsupported_version",
                    Some("v"),
                    &format!("this server speaks version {VERSION}, not {other}"),
                );
            }
            None => {
                return error_reply(
                    &id,
                    line,
                    "missing_field",
                    Some("v"),
                    "every message carries \"v\": 1",
                );
            }
        }
        match self.dispatch(&message) {
            Ok(result) => ok_reply(&id, result),
            Err(r) => error_reply(&id, line, r.code, r.field.as_deref(), &r.message),
        }
    }

    fn dispatch(&mut self, m: &Map<String, Value>) -> Result<Value, Refused> {
        let op = str_field(m, "op")?;
        match op {
            "hello" => self.hello(m),
            "upsert" | "delete" | "nas_reset" | "sync_begin" | "sync_end" => {
                let event = self.event(op, m, Place::Message)?;
                self.apply(event)
            }
            "batch" => self.batch(m),
            "sessions_count" => Ok(json!({"sessions": self.shared.feed.store().len()})),
            "sessions_get" => {
                let query = session_field(m.get("query"), "query")?;
                let mut found = (self.shared.reader)(&query);
                let truncated = found.len() > MAX_RESULTS;
                found.truncate(MAX_RESULTS);
                Ok(json!({"sessions": found, "truncated": truncated}))
            }
            "disconnect" => self.disconnect(m),
            "action_result" => self.action_result(m),
            "reload" => match &self.shared.extras.reload {
                Some(reload) => reload()
                    .map(|summary| json!({"reloaded": true, "summary": summary}))
                    .map_err(|e| refused("config_rejected", None, e)),
                None => Err(refused(
                    "unsupported",
                    Some("op"),
                    "this server cannot reload (started without a reload handler)",
                )),
            },
            "stats" => {
                let s = self.shared.feed.stats();
                Ok(json!({
                    "sessions": self.shared.feed.store().len(),
                    "connections": self.shared.connections.load(Ordering::Acquire),
                    "feed": {
                        "upserts": s.upserts, "deletes": s.deletes, "nas_resets": s.nas_resets,
                        "syncs": s.syncs, "swept": s.swept, "stale": s.stale, "refused": s.refused,
                    },
                }))
            }
            other => Err(refused(
                "unknown_op",
                Some("op"),
                format!(
                    "unknown operation {other:?}; known: hello, upsert, delete, nas_reset, \
                     sync_begin, sync_end, batch, sessions_count, sessions_get, disconnect, \
                     action_result, reload, stats"
                ),
            )),
        }
    }

    fn hello(&mut self, m: &Map<String, Value>) -> Result<Value, Refused> {
        let agent = str_field(m, "agent")?.to_owned();
        let nases: Vec<String> = match m.get("nas") {
            None => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_str()
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .ok_or_else(|| {
                            refused("bad_field", Some(&format!("nas[{i}]")), "must be a string")
                        })
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(refused("bad_field", Some("nas"), "must be a list of names")),
        };
        let takes_actions = match m.get("actions") {
            None | Some(Value::Bool(false)) => false,
            Some(Value::Bool(true)) => true,
            Some(_) => {
                return Err(refused(
                    "bad_field",
                    Some("actions"),
                    "must be true or false",
                ));
            }
        };
        if takes_actions && self.shared.actions.is_none() {
            return Err(refused(
                "no_actions",
                Some("actions"),
                "this server runs with --data-plane table: the session table carries out Disconnects and CoAs",
            ));
        }
        if let Err((nas, other)) = self.shared.agents.claim(self.id, &agent, &nases) {
            return Err(refused(
                "nas_owned",
                Some("nas"),
                format!("NAS {nas:?} is owned by agent {other:?} on another connection"),
            ));
        }
        if takes_actions {
            let closer = self.stream.try_clone().map_err(|e| {
                refused(
                    "internal",
                    None,
                    format!("cannot share the connection: {e}"),
                )
            })?;
            let close = move || {
                let _ = closer.shutdown(std::net::Shutdown::Both);
            };
            self.shared.agents.attach(
                self.id,
                Arc::new(AgentLink::new(
                    agent.clone(),
                    Box::new(self.writer.clone()),
                    Box::new(close),
                )),
            );
            self.takes_actions = true;
        }
        self.claimed |= !nases.is_empty();
        tracing::info!(
            "control: agent {agent:?} connected, owning {} NAS(es)",
            nases.len()
        );
        self.agent = Some(agent);
        Ok(json!({
            "server": "dynauthd", "version": VERSION, "owns": nases, "actions": takes_actions,
        }))
    }

    /// May this connection feed events for `nas`?
    fn check_owner(&self, nas: &str, place: Place) -> Result<(), Refused> {
        match self.shared.agents.owner(nas).as_ref() {
            Some((c, _)) if *c == self.id => Ok(()),
            Some((_, agent)) => Err(refused(
                "nas_owned",
                Some(&place.field("nas")),
                format!("NAS {nas:?} is owned by agent {agent:?}"),
            )),
            None if self.claimed => Err(refused(
                "nas_not_claimed",
                Some(&place.field("nas")),
                format!("this connection's hello did not claim NAS {nas:?}"),
            )),
            None => Ok(()),
        }
    }

    /// One event message, at `place` (a message of its own, or `events[3]` of a batch).
    fn event(&self, op: &str, m: &Map<String, Value>, place: Place) -> Result<Sequenced, Refused> {
        let at = |r: Refused| Refused {
            field: r.field.map(|f| place.field(&f)),
            ..r
        };
        let nas = str_field(m, "nas").map_err(at)?.to_owned();
        self.check_owner(&nas, place)?;
        let seq = seq_field(m).map_err(at)?;
        let event = match op {
            "upsert" => FeedEvent::Upsert {
                session: session_field(m.get("session"), "session").map_err(at)?,
                mode: mode_field(m).map_err(at)?,
            },
            "delete" => FeedEvent::Delete {
                acct_session_id: str_field(m, "acct_session_id").map_err(at)?.to_owned(),
            },
            "nas_reset" => FeedEvent::NasReset,
            "sync_begin" => FeedEvent::SyncBegin,
            "sync_end" => FeedEvent::SyncEnd,
            other => {
                return Err(at(refused(
                    "unknown_op",
                    Some("op"),
                    format!(
                        "{other:?} is not an event (upsert, delete, nas_reset, sync_begin, sync_end)"
                    ),
                )));
            }
        };
        Ok(Sequenced {
            nas: Some(nas),
            seq,
            event,
        })
    }

    fn apply(&self, event: Sequenced) -> Result<Value, Refused> {
        self.shared
            .feed
            .apply(event)
            .map(outcome_json)
            .map_err(|e| refused("refused", None, e.to_string()))
    }

    /// Events in order; each parsed first, so a bad one refuses the whole batch before
    /// anything is applied; then applied under one feed lock.
    fn batch(&self, m: &Map<String, Value>) -> Result<Value, Refused> {
        let Some(Value::Array(list)) = m.get("events") else {
            return Err(refused(
                "missing_field",
                Some("events"),
                "a list of event messages",
            ));
        };
        let mut events = Vec::with_capacity(list.len());
        for (i, e) in list.iter().enumerate() {
            let place = Place::InBatch(i);
            let Value::Object(em) = e else {
                return Err(refused(
                    "bad_field",
                    Some(&format!("events[{i}]")),
                    "must be an object",
                ));
            };
            let op = str_field(em, "op").map_err(|r| Refused {
                field: Some(place.field("op")),
                ..r
            })?;
            events.push(self.event(op, em, place)?);
        }
        Ok(self.apply_batch(events))
    }

    /// A batch read by [`typed_batch::parse`], applied as [`Connection::batch`] applies one;
    /// `None` when an event names a NAS this connection may not feed (the `Value` path then
    /// refuses the line, naming the event). Ownership is looked up once per run of events
    /// for the same NAS, not once per event.
    fn typed_batch(&self, batch: typed_batch::TypedBatch<'_>) -> Option<String> {
        let mut allowed: Option<&str> = None;
        for (i, e) in batch.events.iter().enumerate() {
            if allowed != Some(&*e.nas) {
                self.check_owner(&e.nas, Place::InBatch(i)).ok()?;
                allowed = Some(&e.nas);
            }
        }
        let events = batch
            .events
            .into_iter()
            .map(|e| Sequenced {
                nas: Some(e.nas.into_owned()),
                seq: e.seq,
                event: e.event,
            })
            .collect();
        Some(ok_reply(&batch.id, self.apply_batch(events)))
    }

    /// Applies a parsed batch under one feed lock; the reply names each event refused.
    fn apply_batch(&self, events: Vec<Sequenced>) -> Value {
        let results = self.shared.feed.apply_all(events);
        let mut applied = 0usize;
        let mut errors = Vec::new();
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(_) => applied += 1,
                Err(e) => errors.push(json!({"index": i, "message": e.to_string()})),
            }
        }
        json!({"applied": applied, "errors": errors})
    }

    /// An agent's results for an action it received: `{"op": "action_result", "action": N,
    /// "results": [{"index": 0, "result": "committed"}, ...]}`.
    fn action_result(&mut self, m: &Map<String, Value>) -> Result<Value, Refused> {
        let actions = self.results_sink()?;
        let action = m
            .get("action")
            .and_then(Value::as_u64)
            .ok_or_else(|| refused("bad_field", Some("action"), "the action's number"))?;
        let results = crate::actions::parse_results(m.get("results")).map_err(|field| {
            refused(
                "bad_field",
                Some(&field),
                "results: [{\"index\": N, \"result\": \"committed\" | \"not_found\" | \"failed\", \"error_cause\": 4xx/5xx}]",
            )
        })?;
        Ok(self.report(actions, action, results))
    }

    /// An `action_result` read by [`typed_batch::parse_action_result`], reported as
    /// [`Connection::action_result`] reports one; `None` when this connection takes no
    /// actions (the `Value` path then refuses the line).
    fn typed_action_result(&mut self, r: typed_batch::TypedActionResult) -> Option<String> {
        let actions = self.results_sink().ok()?;
        let result = self.report(actions, r.action, r.results);
        Some(ok_reply(&Value::Null, result))
    }

    /// Where this connection's action results go, or why it has none.
    fn results_sink(&self) -> Result<&'s Submitter, Refused> {
        let shared: &'s Shared = self.shared;
        match (&shared.actions, self.takes_actions) {
            (Some(actions), true) => Ok(actions),
            _ => Err(refused(
                "no_actions",
                Some("op"),
                "this connection takes no actions (say \"actions\": true in hello)",
            )),
        }
    }

    /// Hands an action's results to the dispatcher; the message gets no reply (`silent`: an
    /// agent answering a storm of actions must never be blocked by replies it does not read).
    fn report(
        &mut self,
        actions: &Submitter,
        action: u64,
        results: Vec<(usize, dynauth_proto::action::SessionResult)>,
    ) -> Value {
        let n = results.len();
        actions
            .results_from(Owner::Agent(self.id))
            .report(action, results);
        self.silent = true;
        json!({"accepted": n})
    }

    /// With agents: the matched sessions are torn down by the agents that own them (the
    /// table follows what they committed), audited. Answered once every agent has answered or
    /// the action deadline passed.
    fn disconnect_through_agents(
        &self,
        actions: &Submitter,
        lookup: &Lookup<'_>,
        query: &Session,
        agent: &str,
    ) -> Result<Value, Refused> {
        let mut sessions = Vec::new();
        let selected = self.shared.feed.store().select(lookup, true, &mut sessions);
        let audit = |what: &str| {
            tracing::info!(
                target: "dynauthd::audit",
                "operator disconnect by {agent:?} on control connection {}: query {} -> {what}",
                self.id,
                serde_json::to_string(query).unwrap_or_default(),
            );
        };
        let json_audit = |sessions: &[Session], ok: bool, changed: u32| {
            if let Some(a) = &self.shared.extras.audit {
                a.operator_disconnect(agent, sessions, ok, changed);
            }
        };
        match selected {
            Ok(Applied::Sessions(_)) => {}
            Ok(Applied::AlreadyRemoved) => {
                audit("already removed");
                return Ok(json!({"disconnected": 0, "already_removed": true}));
            }
            Err(refusal) => {
                audit(&format!("{refusal:?}"));
                json_audit(core::slice::from_ref(query), false, 0);
                return Err(refused("refused", None, format!("{refusal:?}")));
            }
        }
        let selected_sessions = self
            .shared
            .extras
            .audit
            .as_ref()
            .map(|_| sessions.clone())
            .unwrap_or_default();
        let outcome = actions
            .operator_disconnect(sessions)
            .map_err(|_| refused("busy", None, "the action queue is full; try again"))?
            .recv_timeout(Duration::from_secs(600))
            .map_err(|_| refused("internal", None, "the action dispatcher did not answer"))?;
        audit(&format!("{outcome:?}"));
        json_audit(
            &selected_sessions,
            outcome.failed == 0 && outcome.unanswered == 0,
            outcome.committed,
        );
        let summary = json!({
            "disconnected": outcome.committed,
            "not_found": outcome.not_found,
            "failed": outcome.failed,
            "unanswered": outcome.unanswered,
        });
        if outcome.failed > 0 || outcome.unanswered > 0 {
            return Err(refused(
                "not_committed",
                None,
                format!(
                    "{} torn down, {} unknown to the data plane, {} refused by the agent, {} without an answer (no agent for the NAS, or none in time): {summary}",
                    outcome.committed, outcome.not_found, outcome.failed, outcome.unanswered
                ),
            ));
        }
        Ok(summary)
    }

    /// An operator-initiated Disconnect of every session the query matches (all or none),
    /// audited.
    fn disconnect(&self, m: &Map<String, Value>) -> Result<Value, Refused> {
        let query = session_field(m.get("query"), "query")?;
        if !query.has_identification() {
            return Err(refused(
                "bad_field",
                Some("query"),
                "names no identification attribute",
            ));
        }
        let max_sessions = match m.get("max_sessions") {
            None => 1,
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| refused("bad_field", Some("max_sessions"), "a positive integer"))?,
        };
        let lookup = Lookup {
            query: SessionQuery::from(&query),
            scope: MatchScope {
                vrf: query.vrf.as_deref(),
                max_sessions,
                tombstone_window_ms: dynauth_proto::store::NO_CLIENT_WINDOW,
            },
            now_ms: self.shared.feed.now_ms(),
        };
        let agent = self.agent.as_deref().unwrap_or("operator");
        if let Some(actions) = &self.shared.actions {
            return self.disconnect_through_agents(actions, &lookup, &query, agent);
        }
        let result = self.shared.feed.store().disconnect(&lookup);
        tracing::info!(
            target: "dynauthd::audit",
            "operator disconnect by {agent:?} on control connection {}: query {} -> {:?}",
            self.id,
            serde_json::to_string(&query).unwrap_or_default(),
            result
        );
        if let Some(a) = &self.shared.extras.audit {
            let (ok, changed) = match result {
                Ok(Applied::Sessions(n)) => (true, n),
                Ok(Applied::AlreadyRemoved) => (true, 0),
                Err(_) => (false, 0),
            };
            a.operator_disconnect(agent, core::slice::from_ref(&query), ok, changed);
        }
        match result {
            Ok(Applied::Sessions(n)) => Ok(json!({"disconnected": n})),
            Ok(Applied::AlreadyRemoved) => Ok(json!({"disconnected": 0, "already_removed": true})),
            Err(refusal) => Err(refused("refused", None, format!("{refusal:?}"))),
        }
    }
}
