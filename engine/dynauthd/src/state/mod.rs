//! Durable session state (`--state-dir DIR`, issue 12): a [`DurableStore`] wraps the
//! [`SessionTable`] and writes every change to an append-only, checksummed journal before the
//! call that made it returns; snapshots bound the journal; a restart restores the newest
//! valid snapshot and replays the journal over it. Design, formats and guarantees:
//! `docs/DURABILITY.md`.
//!
//! Owns: the journal writer thread (group commit: one `fdatasync` covers every record of a
//! commit window), the snapshot writer, restore, the wall-clock times of tombstones, the
//! per-thread commit scopes ([`defer_commits`]) that let one wait cover a whole batch.
//! Must not touch: decisions (the table answers exactly as without a state directory), wire
//! formats other than its own files ([`codec`]).
#![forbid(unsafe_code)]

pub mod codec;

use std::cell::RefCell;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dynauth_proto::change::AuthorizationChange;
use dynauth_proto::feed::FeedMemory;
use dynauth_proto::session::{PrimaryKey, Session};
use dynauth_proto::store::{
    Applied, Lookup, Refusal, ResyncMark, SessionStore, Touch, UpsertError, UpsertMode, Upserted,
};
use dynauth_table::{SessionTable, TableConfig};

use codec::{Cut, Record};

/// The default commit window: at most one fsync per 2 ms.
pub const DEFAULT_COMMIT_WINDOW: Duration = Duration::from_millis(2);
/// The default time between periodic snapshots.
pub const DEFAULT_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(300);
/// Exit status when the journal cannot be written (EX_IOERR): see [`fatal`].
pub const EXIT_JOURNAL_FAILED: i32 = 74;

/// A state directory that cannot be used. Every variant names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "state directory {dir}: journal segment {missing:016x} is missing between the snapshot and \
         later segments (files were removed by hand?): restore a backup of the directory, or move \
         it away to start empty"
    )]
    Gap { dir: PathBuf, missing: u64 },
    #[error(
        "state directory {dir}: no valid snapshot although journal segments start at {first:016x} \
         (the snapshot they follow is damaged or gone): restore a backup, or move the directory away"
    )]
    NoBase { dir: PathBuf, first: u64 },
    #[error(
        "state directory {dir}: another dynauthd is using it (its lock file is held); stop that \
         one first, or give this one another --state-dir"
    )]
    InUse { dir: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How the state directory is used.
#[derive(Debug, Clone)]
pub struct StateOptions {
    pub dir: PathBuf,
    /// The restored table's settings (its tombstones: `--tombstones`, the clients' window).
    pub table: dynauth_table::TableConfig,
    /// The writer fsyncs at most once per window (0: as fast as the disk allows).
    pub commit_window: Duration,
    /// Time between periodic snapshots (zero: only at a clean shutdown).
    pub snapshot_interval: Duration,
    /// A snapshot also once the journal has grown by this many octets since the last one
    /// (zero: by time only), so a storm cannot grow the journal, and the next restore's
    /// replay, without bound between two periodic snapshots.
    pub snapshot_journal_bytes: u64,
}

/// The default `snapshot_journal_bytes`: 1 GiB of journal since the last snapshot.
pub const DEFAULT_SNAPSHOT_JOURNAL_BYTES: u64 = 1 << 30;

/// Wall-clock milliseconds since the Unix epoch.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The shards' monotonic milliseconds (since `base`) against wall-clock milliseconds.
/// Tombstones are written with wall-clock times and read back into this process's
/// monotonic frame; the base is set a tombstone window before the start, so that a
/// tombstone from before the restart still has a time in it.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base_wall_ms: u64,
}

impl Clock {
    pub fn new(base: Instant) -> Self {
        let elapsed = u64::try_from(base.elapsed().as_millis()).unwrap_or(0);
        Clock {
            base_wall_ms: wall_ms().saturating_sub(elapsed),
        }
    }

    /// Wall-clock ms of monotonic ms `mono`.
    pub fn wall(&self, mono: u64) -> u64 {
        self.base_wall_ms.saturating_add(mono)
    }

    /// Monotonic ms of wall-clock ms `wall` (0 for times before the base).
    pub fn mono(&self, wall: u64) -> u64 {
        wall.saturating_sub(self.base_wall_ms)
    }
}

/// The shards' clock origin for a server with a state directory: `window` before now when
/// the platform's monotonic clock goes back that far (else now; restored tombstones then
/// live up to a window longer than they should, never shorter).
pub fn clock_base(window: Duration) -> Instant {
    let now = Instant::now();
    now.checked_sub(window).unwrap_or(now)
}

/// Counters for `/metrics` and the log.
#[derive(Debug, Default)]
pub struct StateStats {
    pub records: AtomicU64,
    pub bytes: AtomicU64,
    pub fsyncs: AtomicU64,
    /// Times an appender woke the journal writer (at most once per group commit).
    pub writer_wakeups: AtomicU64,
    /// Group commits started before the window ended, because a thread was blocked waiting.
    pub early_commits: AtomicU64,
    /// Times a thread had to wait for an fsync before answering (the pipelined shards wait
    /// only when the journal is slower than their decisions), and the time it waited.
    pub commit_waits: AtomicU64,
    pub commit_wait_ns: AtomicU64,
    pub snapshots: AtomicU64,
    pub snapshot_failures: AtomicU64,
    /// 1 while the restore runs (before any socket is bound), then 0.
    pub restoring: AtomicU64,
    /// Octets of snapshot and journal the restore has to read, and has read so far.
    pub restore_octets: AtomicU64,
    pub restore_octets_read: AtomicU64,
    /// Set once by the restore.
    pub restore_ms: AtomicU64,
    pub restored_records: AtomicU64,
    pub restore_cuts: AtomicU64,
    pub restore_cut_bytes: AtomicU64,
    pub restore_conflicts: AtomicU64,
}

impl StateStats {
    /// The restore's progress counters (octets read, records), to go back to.
    fn restore_mark(&self) -> (u64, u64) {
        (
            self.restore_octets_read.load(Ordering::Relaxed),
            self.restored_records.load(Ordering::Relaxed),
        )
    }

    fn restore_reset(&self, (octets, records): (u64, u64)) {
        self.restore_octets_read.store(octets, Ordering::Relaxed);
        self.restored_records.store(records, Ordering::Relaxed);
    }

    pub fn write_prometheus(&self, out: &mut String) {
        use core::fmt::Write as _;
        let rows: [(&str, &str, &str, &AtomicU64); 17] = [
            (
                "dynauth_restoring",
                "gauge",
                "1 while the state directory is restored (nothing is answered then), else 0",
                &self.restoring,
            ),
            (
                "dynauth_restore_octets",
                "gauge",
                "Snapshot and journal octets the restore reads",
                &self.restore_octets,
            ),
            (
                "dynauth_restore_octets_read",
                "gauge",
                "Snapshot and journal octets the restore has read so far",
                &self.restore_octets_read,
            ),
            (
                "dynauth_journal_records_total",
                "counter",
                "Journal records written",
                &self.records,
            ),
            (
                "dynauth_journal_bytes_total",
                "counter",
                "Journal octets written",
                &self.bytes,
            ),
            (
                "dynauth_journal_fsyncs_total",
                "counter",
                "Journal fdatasync calls (group commits)",
                &self.fsyncs,
            ),
            (
                "dynauth_journal_writer_wakeups_total",
                "counter",
                "Times an appender woke the journal writer (once per group commit, not per record)",
                &self.writer_wakeups,
            ),
            (
                "dynauth_journal_early_commits_total",
                "counter",
                "Group commits started before the commit window ended because a thread was blocked waiting for one",
                &self.early_commits,
            ),
            (
                "dynauth_journal_commit_waits_total",
                "counter",
                "Times an answer waited for the journal's fsync (its thread had nothing else to do)",
                &self.commit_waits,
            ),
            (
                "dynauth_journal_commit_wait_nanoseconds_total",
                "counter",
                "Time answers' threads spent waiting for the journal's fsync",
                &self.commit_wait_ns,
            ),
            (
                "dynauth_snapshots_total",
                "counter",
                "Snapshots written",
                &self.snapshots,
            ),
            (
                "dynauth_snapshot_failures_total",
                "counter",
                "Snapshots that failed",
                &self.snapshot_failures,
            ),
            (
                "dynauth_restore_milliseconds",
                "gauge",
                "Time the last restore took",
                &self.restore_ms,
            ),
            (
                "dynauth_restore_records",
                "gauge",
                "Snapshot and journal records the restore applied (so far, while it runs)",
                &self.restored_records,
            ),
            (
                "dynauth_restore_cuts",
                "gauge",
                "Damaged journal tails cut at the restore",
                &self.restore_cuts,
            ),
            (
                "dynauth_restore_cut_bytes",
                "gauge",
                "Octets cut from damaged journal tails at the restore",
                &self.restore_cut_bytes,
            ),
            (
                "dynauth_restore_conflicts",
                "gauge",
                "Restored records refused by the table (fuzzy snapshot overlap; the journal replay settles them)",
                &self.restore_conflicts,
            ),
        ];
        for (name, kind, help, v) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}.\n# TYPE {name} {kind}\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Commit scopes: one wait for a whole batch.

thread_local! {
    static SCOPE: RefCell<Option<Deferred>> = const { RefCell::new(None) };
}

struct Deferred {
    until: Option<(Arc<Shared>, u64)>,
}

/// While alive, durable-store calls on this thread return as soon as their change is applied
/// and queued for the journal; [`CommitScope::wait`] (or dropping the scope) then waits once
/// for the fsync that covers all of them. The caller must not let anyone see an answer
/// derived from those calls before that (the shards wait before the batch's answers are
/// sent; the feed before it replies; the dispatcher before it delivers). Without a durable
/// store this costs a thread-local write.
#[must_use = "the scope's wait is what makes the batch durable"]
pub struct CommitScope {
    active: bool,
    _not_send: core::marker::PhantomData<std::rc::Rc<()>>,
}

/// Starts a commit scope on this thread (nested scopes: the outermost one waits).
pub fn defer_commits() -> CommitScope {
    let active = SCOPE.with(|s| {
        let mut s = s.borrow_mut();
        if s.is_some() {
            false
        } else {
            *s = Some(Deferred { until: None });
            true
        }
    });
    CommitScope {
        active,
        _not_send: core::marker::PhantomData,
    }
}

impl CommitScope {
    /// Waits until every change made on this thread inside the scope is durable.
    pub fn wait(mut self) {
        self.finish();
    }

    /// Ends the scope without waiting: what it must wait for, if anything is not durable
    /// yet. The caller keeps everything derived from the scope's changes unseen until it
    /// has waited on the returned [`Durability`] (the shards hold the batch's answers while
    /// they decide the next batch, docs/DURABILITY.md "Pipelined group commit").
    pub fn detach(mut self) -> Option<Durability> {
        if !self.active {
            return None;
        }
        self.active = false;
        let deferred = SCOPE.with(|s| s.borrow_mut().take());
        match deferred {
            Some(Deferred {
                until: Some((shared, lsn)),
            }) if shared.durable_fast.load(Ordering::Acquire) < lsn => {
                Some(Durability { shared, lsn })
            }
            _ => None,
        }
    }

    fn finish(&mut self) {
        if !self.active {
            return;
        }
        self.active = false;
        let deferred = SCOPE.with(|s| s.borrow_mut().take());
        if let Some(Deferred {
            until: Some((shared, lsn)),
        }) = deferred
        {
            shared.wait_durable(lsn);
        }
    }
}

/// A point of the journal that an answer waits for ([`CommitScope::detach`]).
#[must_use = "what it covers must not be seen before `wait` returns"]
pub struct Durability {
    shared: Arc<Shared>,
    lsn: u64,
}

impl Durability {
    /// Waits until the journal is durable up to this point.
    pub fn wait(self) {
        self.shared.wait_durable(self.lsn);
    }

    /// Whether it already is.
    pub fn is_durable(&self) -> bool {
        self.shared.durable_fast.load(Ordering::Acquire) >= self.lsn
    }
}

impl core::fmt::Debug for Durability {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Durability")
            .field("lsn", &self.lsn)
            .finish()
    }
}

impl Drop for CommitScope {
    fn drop(&mut self) {
        self.finish();
    }
}

// ---------------------------------------------------------------------------------------
// The journal.

/// What appenders hand the writer, under the store's order lock.
#[derive(Default)]
struct Pending {
    /// (segment, frames), in order.
    chunks: Vec<(u64, Vec<u8>)>,
    /// The segment new records go to.
    segment: u64,
    /// Records appended so far (the last one's sequence number).
    appended: u64,
    scratch: Vec<u8>,
    spare: Vec<Vec<u8>>,
}

struct Shared {
    /// The order lock: held while a change is applied to the table and its record queued,
    /// so the journal's order is the table's.
    pending: Mutex<Pending>,
    wake: Condvar,
    appended: AtomicU64,
    durable: Mutex<u64>,
    durable_cv: Condvar,
    durable_fast: AtomicU64,
    /// The highest sequence number a thread blocked in `wait_durable` waits for (it has
    /// nothing else to do until then): while it is above `durable_fast`, the writer commits at
    /// once instead of waiting out its window.
    wanted: AtomicU64,
    stop: AtomicBool,
    stats: Arc<StateStats>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // Appenders never panic between the table change and the queueing of its record
        // (encoding cannot fail), so a poisoned lock is still consistent.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the writer for the first chunk of a round. It waits on `wake` only while
    /// `chunks` is empty (checked under the order lock), so an append to a non-empty
    /// `chunks` needs no wake-up: the writer takes it at the end of its window. One futex
    /// wake per group commit, not one per record (a storm's 150k syscalls a second).
    fn wake_writer(&self) {
        self.stats.writer_wakeups.fetch_add(1, Ordering::Relaxed);
        self.wake.notify_one();
    }

    fn wait_durable(&self, lsn: u64) {
        if self.durable_fast.load(Ordering::Acquire) >= lsn {
            return;
        }
        let started = Instant::now();
        // Published before the writer's lock is taken to notify it: the writer checks `wanted`
        // under that lock before each wait of its window, so it either sees this waiter or
        // is already waiting and gets the notification. A waiter whose record is already in
        // the fsync under way asks for nothing more: the writer compares with what is durable.
        self.wanted.fetch_max(lsn, Ordering::SeqCst);
        drop(self.lock());
        self.wake.notify_one();
        let mut d = self.durable.lock().unwrap_or_else(|p| p.into_inner());
        while *d < lsn {
            d = self.durable_cv.wait(d).unwrap_or_else(|p| p.into_inner());
        }
        drop(d);
        self.stats.commit_waits.fetch_add(1, Ordering::Relaxed);
        self.stats.commit_wait_ns.fetch_add(
            u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Makes `lsn` durable before this thread answers: now, or at the end of its scope.
    fn cover(self: &Arc<Self>, lsn: u64) {
        if self.durable_fast.load(Ordering::Acquire) >= lsn {
            return;
        }
        let deferred = SCOPE.with(|s| {
            let mut s = s.borrow_mut();
            match s.as_mut() {
                Some(d) => {
                    match &mut d.until {
                        Some((_, until)) => *until = (*until).max(lsn),
                        None => d.until = Some((Arc::clone(self), lsn)),
                    }
                    true
                }
                None => false,
            }
        });
        if !deferred {
            self.wait_durable(lsn);
        }
    }
}

fn segment_name(n: u64) -> String {
    format!("journal-{n:016x}.log")
}

fn snapshot_name(n: u64) -> String {
    format!("snapshot-{n:016x}.snap")
}

fn parse_name(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    let hex = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok())?
}

fn sync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// The journal cannot be written: the changes in memory are ahead of the disk and nothing
/// may be acknowledged any more. Like PostgreSQL after a failed fsync, dynauthd stops
/// (exit 74) rather than go on; the waiting callers never answer, and a supervisor restarts
/// it on what is durable.
fn fatal(what: &str, path: &Path, e: &io::Error) -> ! {
    tracing::error!(
        "state: {what} {} failed: {e}; stopping (exit {EXIT_JOURNAL_FAILED}) so that nothing is acknowledged that is not durable",
        path.display()
    );
    eprintln!(
        "dynauthd: error: state: {what} {} failed: {e}",
        path.display()
    );
    std::process::exit(EXIT_JOURNAL_FAILED);
}

struct Writer {
    dir: PathBuf,
    window: Duration,
    shared: Arc<Shared>,
    file: Option<(u64, File, PathBuf)>,
}

impl Writer {
    fn run(mut self) {
        let mut last_sync: Option<Instant> = None;
        loop {
            {
                let mut p = self.shared.lock();
                while p.chunks.is_empty() && !self.shared.stop.load(Ordering::Acquire) {
                    p = self.shared.wake.wait(p).unwrap_or_else(|e| e.into_inner());
                }
                if p.chunks.is_empty() {
                    return;
                }
            }
            // Group commit: at most one fsync per window while every appender has other work
            // (records arriving meanwhile join); as soon as a thread blocks waiting for a
            // commit, the window ends: nobody would be decided meanwhile.
            if let Some(t) = last_sync {
                let due = t + self.window;
                let mut p = self.shared.lock();
                loop {
                    let now = Instant::now();
                    if now >= due || self.shared.stop.load(Ordering::Acquire) {
                        break;
                    }
                    if self.shared.wanted.load(Ordering::SeqCst)
                        > self.shared.durable_fast.load(Ordering::Acquire)
                    {
                        self.shared
                            .stats
                            .early_commits
                            .fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    p = self
                        .shared
                        .wake
                        .wait_timeout(p, due - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
            let (chunks, lsn) = {
                let mut p = self.shared.lock();
                (std::mem::take(&mut p.chunks), p.appended)
            };
            last_sync = Some(Instant::now());
            let mut bytes = 0u64;
            let mut spare = Vec::new();
            for (segment, mut frames) in chunks {
                self.write(segment, &frames);
                bytes += frames.len() as u64;
                frames.clear();
                spare.push(frames);
            }
            if let Some((_, f, path)) = &self.file
                && let Err(e) = f.sync_data()
            {
                fatal("fdatasync of", path, &e);
            }
            let stats = &self.shared.stats;
            stats.bytes.fetch_add(bytes, Ordering::Relaxed);
            stats.fsyncs.fetch_add(1, Ordering::Relaxed);
            {
                let mut d = self
                    .shared
                    .durable
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                *d = lsn;
                self.shared.durable_fast.store(lsn, Ordering::Release);
            }
            self.shared.durable_cv.notify_all();
            let mut p = self.shared.lock();
            if p.spare.len() < 4 {
                p.spare.extend(spare.into_iter().take(4));
            }
        }
    }

    fn write(&mut self, segment: u64, frames: &[u8]) {
        if self.file.as_ref().map(|f| f.0) != Some(segment) {
            // The previous segment is complete and durable before the next one gets a record:
            // a torn write can only be in the newest segment.
            if let Some((_, f, path)) = self.file.take()
                && let Err(e) = f.sync_data()
            {
                fatal("fdatasync of", &path, &e);
            }
            let path = self.dir.join(segment_name(segment));
            let opened = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut f| {
                    if f.metadata()?.len() == 0 {
                        f.write_all(&codec::header(codec::JOURNAL_MAGIC, segment))?;
                        f.sync_all()?;
                    }
                    Ok(f)
                });
            match opened {
                Ok(f) => {
                    if let Err(StateError::Io { path, source }) = sync_dir(&self.dir) {
                        fatal("fsync of the directory", &path, &source);
                    }
                    self.file = Some((segment, f, path));
                }
                Err(e) => fatal("creating journal segment", &path, &e),
            }
        }
        if let Some((_, f, path)) = &mut self.file
            && let Err(e) = f.write_all(frames)
        {
            fatal("writing journal segment", path, &e);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The store.

/// The session table with a journal: every change is applied, then written, and the call
/// returns once it is durable (or, inside a [`CommitScope`], the scope's wait does).
pub struct DurableStore {
    table: Arc<SessionTable>,
    shared: Arc<Shared>,
    clock: Clock,
    dir: PathBuf,
    writer: Mutex<Option<thread::JoinHandle<()>>>,
    snapshot_lock: Mutex<()>,
    window_ms: u64,
    /// The session feed's last sequence number per NAS and its resyncs in progress
    /// (journaled with each event, written into every snapshot). Changed only under the
    /// order lock, with the record that journals the change: a snapshot's rotation is
    /// either before both or after both.
    feed_memory: Mutex<FeedMemory>,
    /// The state directory's lock, for as long as this store lives.
    _dir_lock: Option<Arc<fs::File>>,
}

impl core::fmt::Debug for DurableStore {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DurableStore")
            .field("dir", &self.dir)
            .field("sessions", &self.table.len())
            .finish_non_exhaustive()
    }
}

impl DurableStore {
    /// Starts the journal writer over a restored table; new records go to segment
    /// `restored.next_segment`.
    pub fn start(
        table: Arc<SessionTable>,
        restored: &Restored,
        options: &StateOptions,
        stats: Arc<StateStats>,
    ) -> Result<Arc<Self>, StateError> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                segment: restored.next_segment,
                ..Pending::default()
            }),
            wake: Condvar::new(),
            appended: AtomicU64::new(0),
            durable: Mutex::new(0),
            durable_cv: Condvar::new(),
            wanted: AtomicU64::new(0),
            durable_fast: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            stats,
        });
        let writer = Writer {
            dir: options.dir.clone(),
            window: options.commit_window,
            shared: Arc::clone(&shared),
            file: None,
        };
        let handle = thread::Builder::new()
            .name("dynauthd-journal".into())
            .spawn(move || writer.run())
            .map_err(io_err(&options.dir))?;
        let window_ms = table.config().tombstones.window_ms;
        Ok(Arc::new(DurableStore {
            table,
            shared,
            clock: restored.clock,
            dir: options.dir.clone(),
            writer: Mutex::new(Some(handle)),
            snapshot_lock: Mutex::new(()),
            window_ms,
            feed_memory: Mutex::new(restored.feed_memory.clone()),
            _dir_lock: restored.lock.clone(),
        }))
    }

    /// What the session feed must remember (each NAS's last sequence number, the resyncs
    /// in progress), as restored and since recorded.
    pub fn feed_memory(&self) -> FeedMemory {
        self.memory().clone()
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, FeedMemory> {
        self.feed_memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn table(&self) -> &Arc<SessionTable> {
        &self.table
    }

    /// Applies a change under the order lock, queues its records, and covers them.
    fn commit<T>(&self, f: impl FnOnce(&SessionTable, &mut Vec<Record>) -> T) -> T {
        let mut records = Vec::new();
        let mut writer_idle = false;
        let mut p = self.shared.lock();
        let out = f(&self.table, &mut records);
        let lsn = if records.is_empty() {
            p.appended
        } else {
            let Pending {
                chunks,
                segment,
                appended,
                scratch,
                spare,
            } = &mut *p;
            writer_idle = chunks.is_empty();
            if chunks.last().map(|c| c.0) != Some(*segment) {
                chunks.push((*segment, spare.pop().unwrap_or_default()));
            }
            if let Some((_, frames)) = chunks.last_mut() {
                for r in &records {
                    codec::encode(r, frames, scratch);
                }
            }
            *appended += 1;
            self.shared.appended.store(*appended, Ordering::Release);
            self.shared
                .stats
                .records
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            *appended
        };
        drop(p);
        if writer_idle {
            self.shared.wake_writer();
        }
        self.shared.cover(lsn);
        out
    }

    /// [`DurableStore::commit`] for a change that writes its records itself: `f` appends
    /// whole frames to the journal buffer it is given, under the order lock.
    fn commit_frames<T>(&self, f: impl FnOnce(&SessionTable, &mut Vec<u8>) -> T) -> T {
        let mut p = self.shared.lock();
        let Pending {
            chunks,
            segment,
            appended,
            spare,
            ..
        } = &mut *p;
        let writer_idle = chunks.is_empty();
        // The buffer of the current segment's chunk, taken out while `f` writes to it.
        let fresh = chunks.last().map(|c| c.0) != Some(*segment);
        let mut frames = match fresh {
            true => spare.pop().unwrap_or_default(),
            false => chunks.pop().map(|(_, frames)| frames).unwrap_or_default(),
        };
        let before = frames.len();
        let out = f(&self.table, &mut frames);
        let wrote = frames.len() > before;
        if wrote || !fresh {
            chunks.push((*segment, frames));
        } else {
            // Nothing written into a new chunk: the writer must not wake for an empty one.
            spare.push(frames);
        }
        if wrote {
            *appended += 1;
            self.shared.appended.store(*appended, Ordering::Release);
            self.shared.stats.records.fetch_add(1, Ordering::Relaxed);
        }
        let lsn = *appended;
        drop(p);
        if wrote && writer_idle {
            self.shared.wake_writer();
        }
        self.shared.cover(lsn);
        out
    }

    /// An answer read from the table is given only once what it reflects is durable.
    fn cover_reads(&self) {
        self.shared
            .cover(self.shared.appended.load(Ordering::Acquire));
    }

    fn removed(&self, now_ms: u64, tombstone: bool, sessions: &[Session]) -> Record {
        Record::Remove {
            at_ms: self.clock.wall(now_ms),
            tombstone,
            identities: sessions.iter().map(codec::identity).collect(),
        }
    }

    /// Writes a snapshot (not stopping readers or writers: new records go to the next
    /// segment while the table is read), then removes the segments and snapshots it
    /// supersedes.
    pub fn snapshot(&self) -> Result<SnapshotReport, StateError> {
        let _one = self.snapshot_lock.lock().unwrap_or_else(|p| p.into_inner());
        let started = Instant::now();
        let base = {
            let mut p = self.shared.lock();
            p.segment += 1;
            p.segment
        };
        let tmp = self.dir.join(format!("{}.tmp", snapshot_name(base)));
        let path = self.dir.join(snapshot_name(base));
        let written = self.write_snapshot(&tmp, base);
        let (sessions, tombstones) = match written {
            Ok(counts) => counts,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                self.shared
                    .stats
                    .snapshot_failures
                    .fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        sync_dir(&self.dir)?;
        // Older snapshots and segments are superseded now.
        let mut removed = 0;
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                let old = parse_name(&name, "journal-", ".log")
                    .or_else(|| parse_name(&name, "snapshot-", ".snap"))
                    .is_some_and(|n| n < base);
                if old && fs::remove_file(e.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        sync_dir(&self.dir)?;
        self.shared.stats.snapshots.fetch_add(1, Ordering::Relaxed);
        Ok(SnapshotReport {
            path,
            sessions,
            tombstones,
            removed_files: removed,
            elapsed: started.elapsed(),
        })
    }

    fn write_snapshot(&self, tmp: &Path, base: u64) -> Result<(u64, u64), StateError> {
        let file = File::create(tmp).map_err(io_err(tmp))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let (mut frames, mut scratch) = (Vec::with_capacity(1 << 16), Vec::new());
        frames.extend_from_slice(&codec::header(codec::SNAPSHOT_MAGIC, base));
        let mut sessions = 0u64;
        let mut failed = None;
        let at_ms = wall_ms();
        self.table.for_each_session(|s| {
            if failed.is_some() {
                return;
            }
            codec::encode(
                &Record::Put {
                    at_ms,
                    session: s.clone(),
                },
                &mut frames,
                &mut scratch,
            );
            sessions += 1;
            if frames.len() >= 1 << 16 {
                if let Err(e) = out.write_all(&frames) {
                    failed = Some(e);
                }
                frames.clear();
            }
        });
        if let Some(e) = failed {
            return Err(io_err(tmp)(e));
        }
        // Tombstones last: those made while the table was read are in it too.
        let tombs = self.table.tombstones();
        for (t, s) in &tombs {
            codec::encode(
                &Record::Tomb {
                    at_ms: self.clock.wall(*t),
                    session: s.clone(),
                },
                &mut frames,
                &mut scratch,
            );
        }
        // The feed's order too: an event older than the snapshot stays ignored after it;
        // and its resyncs in progress: the sessions re-sent so far.
        let memory = self.feed_memory();
        for (nas, seq) in memory.seqs {
            codec::encode(&Record::Seq { at_ms, nas, seq }, &mut frames, &mut scratch);
        }
        for (nas, resent) in memory.resyncs {
            let mut mark = |mark| {
                let nas = nas.clone();
                codec::encode(
                    &Record::Resync { at_ms, nas, mark },
                    &mut frames,
                    &mut scratch,
                );
            };
            mark(ResyncMark::Begin);
            for tag in resent {
                mark(ResyncMark::Resent(tag));
            }
        }
        codec::encode(
            &Record::End {
                sessions,
                tombstones: tombs.len() as u64,
            },
            &mut frames,
            &mut scratch,
        );
        out.write_all(&frames).map_err(io_err(tmp))?;
        let file = out.into_inner().map_err(|e| io_err(tmp)(e.into_error()))?;
        file.sync_all().map_err(io_err(tmp))?;
        Ok((sessions, tombs.len() as u64))
    }

    /// Clean shutdown: a last snapshot (so the next start replays nothing), then the
    /// writer drains and stops.
    pub fn close(&self) -> Result<Option<SnapshotReport>, StateError> {
        let report = self.snapshot();
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_all();
        if let Some(h) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
        report.map(Some)
    }

    /// The tombstone window in ms (for the restore's expiry).
    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }
}

/// What a snapshot wrote.
#[derive(Debug, Clone)]
pub struct SnapshotReport {
    pub path: PathBuf,
    pub sessions: u64,
    pub tombstones: u64,
    pub removed_files: usize,
    pub elapsed: Duration,
}

impl core::fmt::Display for SnapshotReport {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "snapshot {}: {} sessions, {} tombstones in {:.1?} ({} superseded files removed)",
            self.path.display(),
            self.sessions,
            self.tombstones,
            self.elapsed,
            self.removed_files
        )
    }
}

impl SessionStore for DurableStore {
    fn touch(&self, key: &PrimaryKey<'_>, step: Touch) {
        // A hint that changes nothing: nothing to journal.
        self.table.touch(key, step);
    }

    fn touch_all(&self, keys: &[PrimaryKey<'_>]) {
        self.table.touch_all(keys);
    }

    fn feed_seq(&self, nas: Option<&str>, seq: u64) {
        // Journaled after the event's own records, under the same commit scope: the feed's
        // reply waits for both.
        self.commit(|_, records| {
            records.push(Record::Seq {
                at_ms: wall_ms(),
                nas: nas.map(str::to_owned),
                seq,
            });
            self.memory().apply_seq(nas.map(str::to_owned), seq);
        });
    }

    fn feed_resync(&self, nas: Option<&str>, mark: ResyncMark) {
        self.commit(|_, records| {
            records.push(Record::Resync {
                at_ms: wall_ms(),
                nas: nas.map(str::to_owned),
                mark,
            });
            self.memory().apply_resync(nas.map(str::to_owned), mark);
        });
    }

    fn disconnect(&self, lookup: &Lookup<'_>) -> Result<Applied, Refusal> {
        // The Remove record is written straight from the table's records into the journal
        // buffer: one lookup, nothing decoded, nothing allocated when warm.
        let at_ms = self.clock.wall(lookup.now_ms);
        self.commit_frames(|table, frames| {
            let mut frame = codec::RemoveFrame::begin(frames, at_ms, true);
            let result =
                table.disconnect_recording(lookup, &mut |identity| frame.push(frames, identity));
            frame.finish(frames);
            result
        })
    }

    fn change(
        &self,
        lookup: &Lookup<'_>,
        change: &AuthorizationChange<'_>,
    ) -> Result<Applied, Refusal> {
        self.commit(|table, records| {
            let mut selected = Vec::new();
            match table.select(lookup, false, &mut selected) {
                Ok(Applied::Sessions(_)) => {}
                other => return other,
            }
            let result = table.change(lookup, change);
            if let Ok(Applied::Sessions(_)) = result {
                let at_ms = self.clock.wall(lookup.now_ms);
                for s in &selected {
                    if let Some(session) = table.current(s) {
                        records.push(Record::Put { at_ms, session });
                    }
                }
            }
            result
        })
    }

    fn reauthorize(&self, lookup: &Lookup<'_>) -> Result<Applied, Refusal> {
        let r = self.table.reauthorize(lookup);
        self.cover_reads();
        r
    }

    fn select(
        &self,
        lookup: &Lookup<'_>,
        tombstones: bool,
        out: &mut Vec<Session>,
    ) -> Result<Applied, Refusal> {
        let r = self.table.select(lookup, tombstones, out);
        self.cover_reads();
        r
    }

    fn remove_sessions(
        &self,
        sessions: &[Session],
        tombstone: bool,
        now_ms: u64,
    ) -> Result<u32, Refusal> {
        self.commit(|table, records| {
            let result = table.remove_sessions(sessions, tombstone, now_ms);
            if matches!(result, Ok(n) if n > 0) {
                records.push(self.removed(now_ms, tombstone, sessions));
            }
            result
        })
    }

    fn change_sessions(
        &self,
        sessions: &[Session],
        change: &AuthorizationChange<'_>,
        now_ms: u64,
    ) -> Result<u32, Refusal> {
        self.commit(|table, records| {
            let result = table.change_sessions(sessions, change, now_ms);
            if matches!(result, Ok(n) if n > 0) {
                let at_ms = self.clock.wall(now_ms);
                for s in sessions {
                    if let Some(session) = table.current(s) {
                        records.push(Record::Put { at_ms, session });
                    }
                }
            }
            result
        })
    }

    fn insert(&self, session: Session) -> bool {
        self.commit(|table, records| {
            let at_ms = wall_ms();
            let ok = table.try_insert(&session).is_ok();
            if ok {
                records.push(Record::Put { at_ms, session });
            }
            ok
        })
    }

    fn upsert(
        &self,
        session: Session,
        mode: UpsertMode,
        now_ms: u64,
    ) -> Result<Upserted, UpsertError> {
        self.commit(|table, records| {
            let identity = codec::identity(&session);
            let result = table.upsert(session, mode, now_ms);
            if let Ok(Upserted::Inserted | Upserted::Replaced) = result
                && let Some(session) = table.current(&identity)
            {
                records.push(Record::Put {
                    at_ms: self.clock.wall(now_ms),
                    session,
                });
            }
            result
        })
    }

    fn delete(&self, nas: Option<&str>, acct_session_id: &str, now_ms: u64) -> bool {
        self.commit(|table, records| {
            let deleted = table.delete(nas, acct_session_id, now_ms);
            if deleted {
                let identity = Session {
                    nas: nas.map(str::to_owned),
                    acct_session_id: Some(acct_session_id.to_owned()),
                    ..Session::default()
                };
                records.push(self.removed(now_ms, true, &[identity]));
            }
            deleted
        })
    }

    fn retain_nas(
        &self,
        nas: Option<&str>,
        keep: &mut dyn FnMut(&Session) -> bool,
        now_ms: u64,
    ) -> usize {
        self.commit(|table, records| {
            let mut gone = Vec::new();
            let n = table.retain_nas(
                nas,
                &mut |s| {
                    let k = keep(s);
                    if !k {
                        gone.push(codec::identity(s));
                    }
                    k
                },
                now_ms,
            );
            let at_ms = self.clock.wall(now_ms);
            // A NAS reset of a huge NAS is split so that no record gets near MAX_PAYLOAD.
            for part in gone.chunks(50_000) {
                records.push(Record::Remove {
                    at_ms,
                    tombstone: true,
                    identities: part.to_vec(),
                });
            }
            n
        })
    }

    fn len(&self) -> usize {
        self.table.len()
    }
}

// ---------------------------------------------------------------------------------------
// Restore.

/// One damaged journal tail that the restore cut.
#[derive(Debug, Clone)]
pub struct CutReport {
    pub file: PathBuf,
    pub offset: u64,
    pub dropped: u64,
    pub reason: String,
    /// Later segments set aside (renamed `*.after-cut`) because they follow the damage.
    pub later_segments: usize,
}

/// What the restore found and did.
#[derive(Debug, Clone)]
pub struct Restored {
    pub snapshot: Option<PathBuf>,
    pub snapshot_sessions: u64,
    pub snapshot_tombstones: u64,
    pub segments: usize,
    pub journal_records: u64,
    pub conflicts: u64,
    pub cuts: Vec<CutReport>,
    /// Damaged snapshots passed over for an older one.
    pub bad_snapshots: Vec<PathBuf>,
    /// Nothing was there: a fresh state.
    pub empty: bool,
    pub next_segment: u64,
    pub elapsed: Duration,
    pub clock: Clock,
    /// The state directory's lock, held from the restore on (the durable store keeps it).
    pub lock: Option<Arc<fs::File>>,
    /// What the session feed remembers: each NAS's last sequence number, the resyncs in
    /// progress.
    pub feed_memory: FeedMemory,
}

impl core::fmt::Display for Restored {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.empty {
            return write!(f, "empty state directory: starting with no sessions");
        }
        write!(
            f,
            "restored from {} ({} sessions, {} tombstones) and {} journal records from {} segment(s) in {:.1?}; {} cut(s), {} refused record(s)",
            self.snapshot
                .as_ref()
                .map_or("no snapshot".to_string(), |p| p.display().to_string()),
            self.snapshot_sessions,
            self.snapshot_tombstones,
            self.journal_records,
            self.segments,
            self.elapsed,
            self.cuts.len(),
            self.conflicts
        )
    }
}

/// Progress logging: at most once a second.
/// The restore's progress: a log line at most once a second, and the counters behind
/// `/metrics` (`dynauth_restore_octets_read`, `dynauth_restore_records`) at every record.
struct Progress<'a> {
    last: core::cell::Cell<Instant>,
    what: String,
    total: u64,
    stats: &'a StateStats,
    /// Octets and records of the files read before this one, and this file's header.
    octets_before: u64,
    header: u64,
    records_before: u64,
}

impl<'a> Progress<'a> {
    /// `total`: the octets after the file's header.
    fn new(what: String, total: u64, stats: &'a StateStats) -> Progress<'a> {
        Progress {
            last: core::cell::Cell::new(Instant::now()),
            what,
            total,
            stats,
            header: codec::HEADER_LEN as u64,
            octets_before: stats.restore_octets_read.load(Ordering::Relaxed),
            records_before: stats.restored_records.load(Ordering::Relaxed),
        }
    }

    fn tick(&self, done: u64, records: u64) {
        self.stats
            .restore_octets_read
            .store(self.octets_before + self.header + done, Ordering::Relaxed);
        self.stats
            .restored_records
            .store(self.records_before + records, Ordering::Relaxed);
        if self.last.get().elapsed() >= Duration::from_secs(1) {
            self.last.set(Instant::now());
            let pct = done.saturating_mul(100) / self.total.max(1);
            tracing::info!(
                "restore: {} {pct}% ({done} of {} octets, {records} records)",
                self.what,
                self.total
            );
        }
    }

    /// The file is read whole (a cut or a rejected snapshot reads no further).
    fn done(&self, records: u64) {
        self.tick(self.total, records);
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, StateError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io_err(path))?;
    Ok(bytes)
}

/// Applies one snapshot to a fresh table; `None` when it is not a complete, valid snapshot.
/// A snapshot's table, counts of sessions, tombstones and refused records, and the feed's
/// memory (sequence numbers, resyncs in progress).
type SnapshotContents = (SessionTable, u64, u64, u64, FeedMemory);

/// What reading a snapshot needs besides its bytes.
struct SnapshotReading<'a> {
    clock: &'a Clock,
    now_mono: u64,
    window_ms: u64,
    config: TableConfig,
    stats: &'a StateStats,
}

fn load_snapshot(
    path: &Path,
    base: u64,
    how: &SnapshotReading<'_>,
) -> Result<Option<SnapshotContents>, StateError> {
    let stats = how.stats;
    let bytes = read_file(path)?;
    // A pass that is not kept (a second pass, a damaged snapshot) does not count as read.
    let mark = stats.restore_mark();
    if codec::parse_header(codec::SNAPSHOT_MAGIC, &bytes) != Some(base) {
        return Ok(None);
    }
    let body = &bytes[codec::HEADER_LEN..];
    // Fast path: the sessions go into a bulk build (every index built in one sorted pass
    // at the end), the way `--sessions FILE` loads; a snapshot this process did not write
    // whole (two records with one unique key) is read again record by record.
    if let Some(contents) = read_snapshot(path, body, how, true) {
        if contents.is_none() {
            stats.restore_reset(mark);
        }
        return Ok(contents);
    }
    stats.restore_reset(mark);
    tracing::warn!(
        "restore: snapshot {} holds conflicting sessions: reading it again one by one",
        path.display()
    );
    let contents = read_snapshot(path, body, how, false).flatten();
    if contents.is_none() {
        stats.restore_reset(mark);
    }
    Ok(contents)
}

/// One pass over a snapshot's records. `None`: the bulk build found two records with one
/// unique key (only with `bulk`). `Some(None)`: not a complete snapshot.
fn read_snapshot(
    path: &Path,
    body: &[u8],
    how: &SnapshotReading<'_>,
    bulk: bool,
) -> Option<Option<SnapshotContents>> {
    let SnapshotReading {
        clock,
        now_mono,
        window_ms,
        config,
        stats,
    } = *how;
    let mut loader = bulk.then(|| dynauth_table::load::BulkLoader::new(config));
    let table = SessionTable::new(config);
    let tombs = std::cell::Cell::new(0u64);
    // Counted by both record callbacks of the bulk path.
    let conflicts = std::cell::Cell::new(0u64);
    let puts = std::cell::Cell::new(0u64);
    let ended = std::cell::Cell::new(false);
    let mut malformed = false;
    let mut tombstones = Vec::new();
    let mut memory = FeedMemory::default();
    let mut end = None;
    let progress = Progress::new(
        format!("snapshot {}", path.display()),
        body.len() as u64,
        stats,
    );
    let mut other = |r: Record, at: usize| {
        match r {
            Record::Tomb { at_ms, session } if end.is_none() => {
                tombs.set(tombs.get() + 1);
                let t = clock.mono(at_ms);
                if t.saturating_add(window_ms) >= now_mono {
                    tombstones.push((session, t));
                }
            }
            Record::Seq { nas, seq, .. } if end.is_none() => {
                memory.apply_seq(nas, seq);
            }
            Record::Resync { nas, mark, .. } if end.is_none() => {
                memory.apply_resync(nas, mark);
            }
            Record::End {
                sessions: s,
                tombstones: t,
            } if end.is_none() => {
                end = Some((s, t, at));
                ended.set(true);
            }
            Record::Put { session, .. } if end.is_none() => {
                puts.set(puts.get() + 1);
                if !table.insert(session) {
                    conflicts.set(conflicts.get() + 1);
                }
            }
            // Anything after the end, or a journal record here: not a snapshot we wrote.
            _ => end = Some((u64::MAX, u64::MAX, 0)),
        }
        progress.tick(at as u64, puts.get() + tombs.get());
    };
    let cut = match loader.as_mut() {
        // The sessions stay encoded: stored as they are, indexed at the end.
        Some(l) => {
            let (_, cut) = codec::for_each_put_raw(
                body,
                |rec, at| {
                    puts.set(puts.get() + 1);
                    progress.tick(at as u64, puts.get() + tombs.get());
                    match l.push_encoded(rec) {
                        // A session after the end: not a snapshot we wrote.
                        _ if ended.get() => malformed = true,
                        Ok(_) => {}
                        Err(dynauth_table::InsertError::Malformed) => malformed = true,
                        Err(_) => conflicts.set(conflicts.get() + 1),
                    }
                },
                &mut other,
            );
            cut
        }
        None => codec::for_each(body, &mut other).1,
    };
    let (sessions, mut conflicts, tombs) = (puts.get(), conflicts.get(), tombs.get());
    let complete = !malformed
        && matches!(
            (cut, end),
            (None, Some((s, t, at))) if s == sessions && t == tombs && at == body.len()
        );
    if !complete {
        return Some(None);
    }
    progress.done(sessions + tombs);
    let table = match loader {
        Some(l) => l.finish().ok()?,
        None => table,
    };
    // Tombstones once the indexes exist (one may not shadow a live session).
    for (session, t) in tombstones {
        if !table.restore_tombstone(&session, t) {
            conflicts += 1;
        }
    }
    Some(Some((table, sessions, tombs, conflicts, memory)))
}

/// Restores the state in `options.dir` (created when missing) into a table. The newest
/// complete snapshot is loaded (a damaged one is passed over for an older one), then every
/// journal segment from its base is replayed; a damaged tail is cut (the file truncated at
/// the last good record, later segments set aside), counted and reported. Logs progress.
///
/// `stats` follows the restore as it runs (`/metrics` is served meanwhile): `restoring`,
/// the octets to read and read, the records applied.
pub fn restore(
    options: &StateOptions,
    base: Instant,
    stats: &StateStats,
) -> Result<(SessionTable, Restored), StateError> {
    let started = Instant::now();
    stats.restoring.store(1, Ordering::Relaxed);
    let result = restore_dir(options, base, stats, started);
    stats.restoring.store(0, Ordering::Relaxed);
    if result.is_ok() {
        let total = stats.restore_octets.load(Ordering::Relaxed);
        stats.restore_octets_read.store(total, Ordering::Relaxed);
    }
    result
}

/// Octets of snapshot `snapshot` (when any) and of the segments from its base on.
fn planned_octets(dir: &Path, snapshot: Option<u64>, segments: &[u64]) -> u64 {
    let len = |p: PathBuf| fs::metadata(p).map_or(0, |m| m.len());
    let from = snapshot.unwrap_or(0);
    snapshot.map_or(0, |n| len(dir.join(snapshot_name(n))))
        + segments
            .iter()
            .filter(|&&n| n >= from)
            .map(|&n| len(dir.join(segment_name(n))))
            .sum::<u64>()
}

fn restore_dir(
    options: &StateOptions,
    base: Instant,
    stats: &StateStats,
    started: Instant,
) -> Result<(SessionTable, Restored), StateError> {
    let dir = &options.dir;
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    // Two servers on one directory would interleave their journals: the first one holds the
    // lock for its whole life (the durable store keeps a handle of it).
    let lock_path = dir.join("lock");
    let lock = fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    if !dynauth_udp::try_lock_exclusive(&lock).map_err(io_err(&lock_path))? {
        return Err(StateError::InUse { dir: dir.clone() });
    }
    let clock = Clock::new(base);
    let now_mono = u64::try_from(base.elapsed().as_millis()).unwrap_or(0);
    let window_ms = options.table.tombstones.window_ms;
    let mut snapshots = Vec::new();
    let mut segments = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = parse_name(&name, "snapshot-", ".snap") {
            snapshots.push(n);
        } else if let Some(n) = parse_name(&name, "journal-", ".log") {
            segments.push(n);
        } else if name.ends_with(".snap.tmp") {
            // A snapshot that never completed.
            let _ = fs::remove_file(e.path());
        }
    }
    snapshots.sort_unstable_by(|a, b| b.cmp(a));
    segments.sort_unstable();
    let mut restored = Restored {
        lock: Some(Arc::new(lock)),
        snapshot: None,
        snapshot_sessions: 0,
        snapshot_tombstones: 0,
        segments: 0,
        journal_records: 0,
        conflicts: 0,
        cuts: Vec::new(),
        bad_snapshots: Vec::new(),
        empty: snapshots.is_empty() && segments.is_empty(),
        next_segment: 1,
        elapsed: Duration::ZERO,
        clock,
        feed_memory: FeedMemory::default(),
    };
    let mut table = None;
    let mut from = 0u64;
    let how = SnapshotReading {
        clock: &clock,
        now_mono,
        window_ms,
        config: options.table,
        stats,
    };
    stats.restore_octets.store(
        planned_octets(dir, snapshots.first().copied(), &segments),
        Ordering::Relaxed,
    );
    for (i, &n) in snapshots.iter().enumerate() {
        let path = dir.join(snapshot_name(n));
        tracing::info!("restore: loading {}", path.display());
        match load_snapshot(&path, n, &how)? {
            Some((t, s, tombs, conflicts, memory)) => {
                restored.feed_memory = memory;
                table = Some(t);
                from = n;
                restored.snapshot = Some(path);
                restored.snapshot_sessions = s;
                restored.snapshot_tombstones = tombs;
                restored.conflicts += conflicts;
                break;
            }
            None => {
                tracing::error!(
                    "restore: snapshot {} is incomplete or damaged; trying an older one",
                    path.display()
                );
                restored.bad_snapshots.push(path);
                stats.restore_octets.store(
                    planned_octets(dir, snapshots.get(i + 1).copied(), &segments),
                    Ordering::Relaxed,
                );
            }
        }
    }
    let table: SessionTable = table.unwrap_or_else(|| SessionTable::new(options.table));
    let replay: Vec<u64> = segments.iter().copied().filter(|&n| n >= from).collect();
    if restored.snapshot.is_none()
        && let Some(&first) = replay.first()
        && first != 1
    {
        return Err(StateError::NoBase {
            dir: dir.clone(),
            first,
        });
    }
    let mut expected = replay.first().copied();
    let mut next = from.max(1);
    for (i, &n) in replay.iter().enumerate() {
        if let Some(e) = expected
            && n != e
        {
            return Err(StateError::Gap {
                dir: dir.clone(),
                missing: e,
            });
        }
        expected = Some(n + 1);
        next = n + 1;
        let path = dir.join(segment_name(n));
        let bytes = read_file(&path)?;
        restored.segments += 1;
        let header_ok = codec::parse_header(codec::JOURNAL_MAGIC, &bytes) == Some(n);
        let progress = Progress::new(
            format!("journal {}", path.display()),
            bytes.len().saturating_sub(codec::HEADER_LEN) as u64,
            stats,
        );
        let (records, cut) = if header_ok {
            let mut conflicts = 0;
            let body = &bytes[codec::HEADER_LEN..];
            let mut count = 0;
            let memory = &mut restored.feed_memory;
            let result = codec::for_each(body, |r, at| {
                count += 1;
                match r {
                    Record::Seq { nas, seq, .. } => memory.apply_seq(nas, seq),
                    Record::Resync { nas, mark, .. } => memory.apply_resync(nas, mark),
                    r => {
                        if !apply(&table, &clock, r) {
                            conflicts += 1;
                        }
                    }
                }
                progress.tick(at as u64, count);
            });
            restored.conflicts += conflicts;
            (
                result.0,
                result.1.map(|c| (c.offset + codec::HEADER_LEN, c)),
            )
        } else {
            // A header torn before its first fsync (the writer syncs it before any record).
            let reason = codec::FrameError::Truncated {
                have: bytes.len(),
                need: codec::HEADER_LEN,
            };
            (
                0,
                Some((
                    0,
                    Cut {
                        offset: 0,
                        dropped: bytes.len(),
                        reason,
                    },
                )),
            )
        };
        restored.journal_records += records;
        progress.done(records);
        if let Some((offset, c)) = cut {
            let later: Vec<u64> = replay[i + 1..].to_vec();
            cut_segment(&path, offset as u64)?;
            for &m in &later {
                let p = dir.join(segment_name(m));
                let _ = fs::rename(&p, p.with_extension("log.after-cut"));
            }
            sync_dir(dir)?;
            let report = CutReport {
                file: path.clone(),
                offset: offset as u64,
                dropped: c.dropped as u64,
                reason: c.reason.to_string(),
                later_segments: later.len(),
            };
            tracing::error!(
                "restore: journal {} is damaged at octet {} ({}): cut there, {} octet(s) dropped, {} later segment(s) set aside; the state is the last good record's",
                report.file.display(),
                report.offset,
                report.reason,
                report.dropped,
                report.later_segments
            );
            restored.cuts.push(report);
            break;
        }
    }
    restored.next_segment = next;
    restored.elapsed = started.elapsed();
    Ok((table, restored))
}

/// Truncates a damaged segment at its last good record (a file whose header is damaged
/// is removed).
fn cut_segment(path: &Path, offset: u64) -> Result<(), StateError> {
    if offset < codec::HEADER_LEN as u64 {
        return fs::remove_file(path).map_err(io_err(path));
    }
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    f.set_len(offset).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Replays one journal record; false when the table refused it (counted).
fn apply(table: &SessionTable, clock: &Clock, r: Record) -> bool {
    match r {
        Record::Put { at_ms, session } => table
            .upsert(session, UpsertMode::Create, clock.mono(at_ms))
            .is_ok(),
        Record::Remove {
            at_ms,
            tombstone,
            identities,
        } => table
            .remove_sessions(&identities, tombstone, clock.mono(at_ms))
            .is_ok(),
        Record::Tomb { .. } | Record::End { .. } | Record::Seq { .. } | Record::Resync { .. } => {
            false
        }
    }
}

/// Runs periodic snapshots until `stop`.
pub fn spawn_snapshots(
    store: Arc<DurableStore>,
    interval: Duration,
    journal_bytes: u64,
    stop: Arc<AtomicBool>,
) -> io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("dynauthd-snapshot".into())
        .spawn(move || {
            let mut last = Instant::now();
            let written = || store.shared.stats.bytes.load(Ordering::Relaxed);
            let mut at_last = written();
            while !stop.load(Ordering::Acquire) {
                thread::sleep(Duration::from_millis(100));
                let by_time = !interval.is_zero() && last.elapsed() >= interval;
                let by_size =
                    journal_bytes > 0 && written().saturating_sub(at_last) >= journal_bytes;
                if !by_time && !by_size {
                    continue;
                }
                if by_size && !by_time {
                    tracing::info!(
                        "state: the journal grew by {} octets since the last snapshot: taking one",
                        written().saturating_sub(at_last)
                    );
                }
                last = Instant::now();
                at_last = written();
                match store.snapshot() {
                    Ok(r) => tracing::info!("state: {r}"),
                    Err(e) => tracing::error!("state: snapshot failed: {e}"),
                }
            }
        })
}
