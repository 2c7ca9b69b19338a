//! The action dispatcher: requests that selected sessions go to the data plane that owns
//! them, and are answered only when it has committed (RFC 5176 §2.1).
//!
//! Owns: the queue from the shards ([`channel`], bounded: a full queue is NAK 506 at the
//! shard, never unbounded memory), the running actions and their deadlines, the
//! serialization of requests for one session (a second request for a session with an action
//! in flight waits for it, then selects again: never dropped, never two actions at once on
//! one session), the agents and the NASes they own ([`Agents`]), the compensating actions of
//! a multi-session CoA that did not commit everywhere, and delivering each settled answer to
//! its shard (duplicate cache, counters) and to the DAC.
//! Must not touch: the answer's contents (`dynauth_proto::action` settles it), the table's
//! internals, the control socket's framing (`control`). Runs on its own thread, so no agent
//! and no data-plane code ever runs on a shard thread or under a table lock.
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender};
use dynauth_proto::action::{
    ActionKind, ActionPlan, ActionSink, PendingRequest, PlannedSession, QueueFull, Reselected,
    SessionResult, Settled, change_steps,
};
use dynauth_proto::codec::MAX_PACKET_LEN;
use dynauth_proto::dict::ErrorCause;
use dynauth_proto::session::Session;
use dynauth_proto::{EngineConfig, Now, SessionStore};
use dynauth_udp::{AnswerBatch, AnswerSender};
use serde_json::Value;

/// A settled answer on its way to the shard that received the request.
#[derive(Debug)]
pub struct SettledAnswer {
    pub settled: Settled,
    pub bytes: Vec<u8>,
}

/// What a shard learns about one of its pending requests.
#[derive(Debug)]
pub enum ShardNotice {
    /// Answered: cache the bytes for retransmissions, count the answer.
    Answered(SettledAnswer),
    /// Given up without an answer (a router letting the DAC retry): forget it is in flight.
    Abandoned(dynauth_proto::action::Abandoned),
}

/// Where a running action's sessions went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Owner {
    /// A control-socket connection (its number).
    Agent(u64),
    /// The in-process data plane.
    InProcess,
}

/// An action as the data plane receives it.
#[derive(Debug, Clone)]
pub struct Action {
    pub id: u64,
    pub plan: ActionPlan,
    /// Positions in `plan.sessions` this recipient must answer for.
    pub indexes: Vec<usize>,
    /// Milliseconds left to commit.
    pub deadline_ms: u64,
    /// A compensating action (undoing a CoA that did not commit everywhere): its results
    /// are only logged.
    pub compensation: bool,
}

/// The control socket's `action` line, serialized straight from the plan.
#[derive(serde::Serialize)]
struct ActionLine<'a> {
    v: u64,
    #[serde(rename = "type")]
    ty: &'static str,
    action: u64,
    kind: &'static str,
    deadline_ms: u64,
    sessions: Vec<SessionLine<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    command: Option<&'static str>,
    #[serde(skip_serializing_if = "core::ops::Not::not")]
    compensation: bool,
}

#[derive(serde::Serialize)]
struct SessionLine<'a> {
    index: usize,
    session: &'a Session,
    #[serde(skip_serializing_if = "Option::is_none")]
    authorization: Option<&'a dynauth_proto::session::Authorization>,
    #[serde(skip_serializing_if = "Option::is_none")]
    steps: Option<&'a [dynauth_proto::action::Step]>,
}

impl Action {
    /// The control socket's `action` message (docs/CONTROL.md, "Actions"), one line.
    pub fn to_line(&self) -> String {
        action_line(
            self.id,
            &self.plan,
            &self.indexes,
            self.deadline_ms,
            self.compensation,
        )
    }
}

/// The `action` line of `plan`'s sessions at `indexes`, serialized straight from the plan
/// (an agent's action needs no copy of it).
fn action_line(
    id: u64,
    plan: &ActionPlan,
    indexes: &[usize],
    deadline_ms: u64,
    compensation: bool,
) -> String {
    let change = plan.kind == ActionKind::Change;
    let line = ActionLine {
        v: crate::control::VERSION,
        ty: "action",
        action: id,
        kind: plan.kind.name(),
        deadline_ms,
        sessions: indexes
            .iter()
            .filter_map(|&i| plan.sessions.get(i).map(|p| (i, p)))
            .map(|(index, p)| SessionLine {
                index,
                session: &p.session,
                authorization: change.then_some(&p.authorization),
                steps: change.then_some(p.steps.as_slice()),
            })
            .collect(),
        command: plan.command.map(|c| c.name()),
        compensation,
    };
    serde_json::to_string(&line).unwrap_or_default()
}

/// The distinct owners of `owners`, in first-seen order (almost always one).
fn distinct(owners: &[Owner]) -> Vec<Owner> {
    let mut out: Vec<Owner> = Vec::with_capacity(1);
    for o in owners {
        if !out.contains(o) {
            out.push(*o);
        }
    }
    out
}

/// A data plane in the same process (a library user embedding dynauthd's runtime). It is
/// called on the dispatcher's thread and must not block: start the work and report later.
pub trait DataPlane: Send + Sync {
    fn execute(&self, action: Action, results: ResultSink);
}

/// Where a data plane reports an action's results (from any thread, any time).
#[derive(Debug, Clone)]
pub struct ResultSink {
    tx: Sender<Event>,
    owner: Owner,
}

impl ResultSink {
    /// Results for positions of the action (`index` as in [`Action::indexes`]).
    pub fn report(&self, action: u64, results: Vec<(usize, SessionResult)>) {
        let _ = self.tx.send(Event::Results {
            action,
            owner: self.owner,
            results,
        });
    }
}

/// One connected agent that takes actions.
pub struct AgentLink {
    pub name: String,
    out: Mutex<Box<dyn Write + Send>>,
    /// Closes the connection when a write fails (a line may have been cut: nothing more
    /// may follow it); its actions then settle NAK 506 as the agent is gone.
    close: Box<dyn Fn() + Send + Sync>,
}

impl AgentLink {
    pub fn new(
        name: String,
        out: Box<dyn Write + Send>,
        close: Box<dyn Fn() + Send + Sync>,
    ) -> Self {
        AgentLink {
            name,
            out: Mutex::new(out),
            close,
        }
    }

    /// Writes one line and sends it.
    pub fn send_line(&self, line: String) -> io::Result<()> {
        self.queue_line(line)?;
        self.flush()
    }

    /// Writes one line into the connection's buffer; [`AgentLink::flush`] sends it (one
    /// write for a burst of actions). The line and its newline go to the writer in one
    /// `write_all`: the connection's replies take the writer's lock once per call, so a
    /// line written in two calls (`writeln!` makes one per piece) could have a reply land
    /// between its text and its newline, and the agent would read two messages run together.
    pub fn queue_line(&self, mut line: String) -> io::Result<()> {
        line.push('\n');
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        out.write_all(line.as_bytes())
            .inspect_err(|_| (self.close)())
    }

    pub fn flush(&self) -> io::Result<()> {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        out.flush().inspect_err(|_| (self.close)())
    }
}

/// The agents on the control socket and the NASes each owns.
#[derive(Default)]
pub struct Agents {
    inner: Mutex<AgentsInner>,
}

#[derive(Default)]
struct AgentsInner {
    /// NAS name to (connection number, agent name).
    owners: HashMap<String, (u64, String)>,
    /// Connections that take actions.
    links: HashMap<u64, Arc<AgentLink>>,
}

impl Agents {
    fn lock(&self) -> std::sync::MutexGuard<'_, AgentsInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `nases` for connection `connection`; `Err` names a NAS another connection
    /// owns, and its agent.
    pub fn claim(
        &self,
        connection: u64,
        agent: &str,
        nases: &[String],
    ) -> Result<(), (String, String)> {
        let mut inner = self.lock();
        if let Some((nas, (_, other))) = nases.iter().find_map(|n| {
            inner
                .owners
                .get(n)
                .filter(|(c, _)| *c != connection)
                .map(|o| (n.clone(), o.clone()))
        }) {
            return Err((nas, other));
        }
        for n in nases {
            inner
                .owners
                .insert(n.clone(), (connection, agent.to_owned()));
        }
        Ok(())
    }

    /// The owner of `nas`: its connection and agent name.
    pub fn owner(&self, nas: &str) -> Option<(u64, String)> {
        self.lock().owners.get(nas).cloned()
    }

    /// Connection `connection` takes actions through `link`.
    pub fn attach(&self, connection: u64, link: Arc<AgentLink>) {
        self.lock().links.insert(connection, link);
    }

    /// A connection ended: its NASes are free again and it takes no more actions.
    pub fn release(&self, connection: u64) {
        let mut inner = self.lock();
        inner.owners.retain(|_, (c, _)| *c != connection);
        inner.links.remove(&connection);
    }

    /// The link to the agent that owns `nas`, if it takes actions.
    fn link_for(&self, nas: &str) -> Option<(u64, Arc<AgentLink>)> {
        let inner = self.lock();
        let (connection, _) = inner.owners.get(nas)?;
        inner
            .links
            .get(connection)
            .map(|l| (*connection, Arc::clone(l)))
    }

    fn link(&self, connection: u64) -> Option<Arc<AgentLink>> {
        self.lock().links.get(&connection).cloned()
    }
}

/// What the dispatcher thread is told.
#[derive(Debug)]
pub enum Event {
    Submit(PendingRequest),
    /// An operator's Disconnect from the control socket (`dynauthctl disconnect`).
    Operator(OperatorDisconnect),
    Results {
        action: u64,
        owner: Owner,
        results: Vec<(usize, SessionResult)>,
    },
    AgentGone(u64),
}

/// The shards' side of the queue.
#[derive(Debug, Clone)]
pub struct Submitter {
    tx: Sender<Event>,
}

impl ActionSink for Submitter {
    fn submit(&self, request: PendingRequest) -> Result<(), QueueFull> {
        self.tx
            .try_send(Event::Submit(request))
            .map_err(|_| QueueFull)
    }
}

impl Submitter {
    /// Hands an operator's Disconnect of `sessions` to the dispatcher; the outcome arrives on
    /// the returned channel once the owning agents have answered (or the deadline passed).
    pub fn operator_disconnect(
        &self,
        sessions: Vec<Session>,
    ) -> Result<Receiver<OperatorOutcome>, QueueFull> {
        let (reply, outcome) = channel::bounded(1);
        self.tx
            .try_send(Event::Operator(OperatorDisconnect {
                sessions,
                deadline_ms: 0,
                reply,
            }))
            .map_err(|_| QueueFull)?;
        Ok(outcome)
    }

    /// Where agents' results go (the control socket's `action_result`).
    pub fn results_from(&self, owner: Owner) -> ResultSink {
        ResultSink {
            tx: self.tx.clone(),
            owner,
        }
    }

    /// An agent's connection ended: its actions without results settle now (NAK 506).
    pub fn agent_gone(&self, connection: u64) {
        let _ = self.tx.send(Event::AgentGone(connection));
    }
}

/// The queue between the shards and the dispatcher, holding at most `capacity` events.
pub fn channel(capacity: usize) -> (Submitter, Receiver<Event>) {
    let (tx, rx) = channel::bounded(capacity.max(1));
    (Submitter { tx }, rx)
}

/// An operator-initiated Disconnect (control socket), carried out by the owning agents like
/// a RADIUS one and audited by the control socket.
#[derive(Debug)]
pub struct OperatorDisconnect {
    pub sessions: Vec<Session>,
    /// Monotonic milliseconds (the shards' clock), set by the dispatcher on arrival from
    /// the configured action deadline.
    deadline_ms: u64,
    reply: Sender<OperatorOutcome>,
}

/// What the agents did with an operator's Disconnect, session by session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OperatorOutcome {
    /// Torn down (and removed from the table, with tombstones).
    pub committed: u32,
    /// Unknown to the data plane (removed from the table as stale).
    pub not_found: u32,
    /// Refused by the data plane (still there).
    pub failed: u32,
    /// No result by the deadline, or no agent takes actions for the session's NAS.
    pub unanswered: u32,
}

/// Where a request to the data plane came from.
#[derive(Debug)]
enum Origin {
    Radius(PendingRequest),
    Operator(OperatorDisconnect),
}

impl Origin {
    fn sessions(&self) -> &[Session] {
        match self {
            Origin::Radius(p) => p.sessions(),
            Origin::Operator(o) => &o.sessions,
        }
    }

    fn deadline_ms(&self) -> u64 {
        match self {
            Origin::Radius(p) => p.deadline_ms(),
            Origin::Operator(o) => o.deadline_ms,
        }
    }
}

/// Counters of the dispatcher (Prometheus text in `write_prometheus`).
#[derive(Debug, Default)]
pub struct ActionStats {
    pub submitted: AtomicU64,
    pub settled_ack: AtomicU64,
    pub settled_nak: AtomicU64,
    pub timed_out: AtomicU64,
    pub no_agent: AtomicU64,
    pub agent_gone: AtomicU64,
    pub serialized: AtomicU64,
    pub compensations: AtomicU64,
    pub unexpected_results: AtomicU64,
    pub send_errors: AtomicU64,
}

impl ActionStats {
    pub fn write_prometheus(&self, out: &mut String) {
        use std::fmt::Write as _;
        let rows: [(&str, &str, &AtomicU64); 10] = [
            (
                "submitted",
                "Requests handed to the data plane",
                &self.submitted,
            ),
            (
                "settled_ack",
                "Pending requests answered with an ACK",
                &self.settled_ack,
            ),
            (
                "settled_nak",
                "Pending requests answered with a NAK",
                &self.settled_nak,
            ),
            (
                "timed_out",
                "Actions without every result by the deadline (NAK 506)",
                &self.timed_out,
            ),
            (
                "no_agent",
                "Requests for sessions whose NAS has no agent taking actions (NAK 506)",
                &self.no_agent,
            ),
            (
                "agent_gone",
                "Actions whose agent disconnected before answering (NAK 506)",
                &self.agent_gone,
            ),
            (
                "serialized",
                "Requests that waited for another action on the same session",
                &self.serialized,
            ),
            (
                "compensations",
                "Compensating actions sent (a CoA that did not commit everywhere)",
                &self.compensations,
            ),
            (
                "unexpected_results",
                "Results for unknown actions or sessions (late, or not this agent's)",
                &self.unexpected_results,
            ),
            (
                "send_errors",
                "Settled answers that could not be sent",
                &self.send_errors,
            ),
        ];
        for (name, help, v) in rows {
            let _ = writeln!(
                out,
                "# HELP dynauth_actions_{name}_total {help}.\n# TYPE dynauth_actions_{name}_total counter\ndynauth_actions_{name}_total {}",
                v.load(Ordering::Relaxed)
            );
        }
    }
}

/// A shard that sends its settled answers itself (mmsg backend): woken with its eventfd, it
/// sends them from its own CPU in one `sendmmsg`, off the dispatcher's thread.
#[derive(Debug)]
pub struct ShardSends {
    pub waker: Arc<dynauth_udp::Waker>,
    /// True while the shard loops. Set false, under this lock, when the shard stops, after
    /// which it sends what its queue still holds and never looks at the queue again; the
    /// dispatcher hands answers over only under the lock while it is true, so every answer
    /// is sent by exactly one of the two.
    pub open: Mutex<bool>,
}

impl ShardSends {
    pub fn new(waker: Arc<dynauth_udp::Waker>) -> Self {
        ShardSends {
            waker,
            open: Mutex::new(true),
        }
    }

    /// The shard stops taking answers over: from now on the dispatcher sends them.
    pub fn close(&self) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = false;
    }
}

/// Where a shard's notices go.
#[derive(Debug)]
pub struct ShardLink {
    pub notices: Sender<ShardNotice>,
    /// `Some`: the shard sends its settled answers itself.
    pub sends: Option<Arc<ShardSends>>,
}

/// Delivers settled answers: to the shard (duplicate cache, counters), then to the DAC.
pub struct Delivery {
    pub shards: Vec<ShardLink>,
    pub sender: AnswerSender,
    /// A round's answers on their way to the DAC (one `sendmmsg` per round and socket).
    outgoing: AnswerBatch,
    /// Shards handed answers this round (woken once at its end).
    woken: Vec<bool>,
}

impl Delivery {
    pub fn new(shards: Vec<ShardLink>, sender: AnswerSender) -> Self {
        Delivery {
            shards,
            sender,
            outgoing: AnswerBatch::new(),
            woken: Vec::new(),
        }
    }

    /// Sends a round's settled answers. A shard that sends its own (`ShardSends`) gets
    /// them on its queue and one wake-up: it caches each answer (duplicate cache, counters)
    /// and sends them together from its CPU. For any other shard (io_uring, or one that has
    /// stopped) each answer goes to the shard's cache first, then all of them to their DACs
    /// with one `sendmmsg` per socket from here. Either way a retransmission that follows an
    /// answer finds it in the cache. Answers that could not be sent are counted in
    /// `send_errors` (`who` names the sender in the log).
    pub fn send(&mut self, ready: &mut Vec<SettledAnswer>, send_errors: &AtomicU64, who: &str) {
        self.woken.clear();
        self.woken.resize(self.shards.len(), false);
        for answer in ready.drain(..) {
            let shard = answer.settled.shard;
            let Some(link) = self.shards.get(shard) else {
                send_errors.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let mut answer = answer;
            if let Some(sends) = &link.sends {
                let open = sends.open.lock().unwrap_or_else(|p| p.into_inner());
                if *open {
                    match link.notices.send(ShardNotice::Answered(answer)) {
                        Ok(()) => {
                            if let Some(w) = self.woken.get_mut(shard) {
                                *w = true;
                            }
                            continue;
                        }
                        // The shard's queue is gone: the answer comes back, sent from here.
                        Err(channel::SendError(ShardNotice::Answered(back))) => answer = back,
                        Err(channel::SendError(ShardNotice::Abandoned(_))) => continue,
                    }
                }
            }
            let (to, from) = (answer.settled.source, answer.settled.destination);
            if let Err(e) = self.outgoing.push(&self.sender, &answer.bytes, to, from) {
                send_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("{who}: answer to {to} not sent: {e}");
            }
            let _ = link.notices.send(ShardNotice::Answered(answer));
        }
        for (link, woken) in self.shards.iter().zip(&self.woken) {
            if let (true, Some(sends)) = (*woken, &link.sends) {
                sends.waker.wake();
            }
        }
        let flushed = self.outgoing.flush(&self.sender);
        if flushed.failed > 0 {
            send_errors.fetch_add(flushed.failed as u64, Ordering::Relaxed);
        }
    }
}

/// Everything the dispatcher works with.
pub struct DispatcherSetup {
    pub config: Arc<EngineConfig>,
    pub store: Arc<dyn SessionStore>,
    pub agents: Arc<Agents>,
    pub in_process: Option<Arc<dyn DataPlane>>,
    pub delivery: Delivery,
    /// The shards' monotonic clock origin (deadlines are in its milliseconds).
    pub base: Instant,
    pub stats: Arc<ActionStats>,
    /// Where agents report (its sender side is cloned into `ResultSink`s).
    pub submitter: Submitter,
    /// Where settled answers are audited (`--audit-log`).
    pub audit: Option<Arc<crate::audit::AuditLog>>,
}

/// The dispatcher's queue size: requests and results in flight between threads.
pub const QUEUE_CAPACITY: usize = 65_536;

/// The running dispatcher thread.
pub struct Dispatcher {
    thread: Option<thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    drain: Arc<AtomicBool>,
}

impl Dispatcher {
    /// Starts the thread.
    pub fn start(setup: DispatcherSetup, inbox: Receiver<Event>) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let drain = Arc::new(AtomicBool::new(false));
        let (thread_stop, thread_drain) = (Arc::clone(&stop), Arc::clone(&drain));
        let thread = thread::Builder::new()
            .name("dynauthd-actions".into())
            .spawn(move || State::new(setup).run(&inbox, &thread_stop, &thread_drain))?;
        Ok(Dispatcher {
            thread: Some(thread),
            stop,
            drain,
        })
    }

    /// Drains, then stops (after the shards have stopped reading): every running or waiting
    /// action is left to finish, its answer sent as usual, each bounded by its own deadline
    /// (then NAK 506); after `within` at the most, [`Dispatcher::stop`] answers the rest.
    /// Returns whether the drain finished by itself.
    pub fn drain_and_stop(self, within: Duration) -> bool {
        self.drain.store(true, Ordering::Release);
        let until = Instant::now() + within;
        let drained = loop {
            match &self.thread {
                Some(t) if !t.is_finished() => {}
                _ => break true,
            }
            if Instant::now() >= until {
                break false;
            }
            thread::sleep(Duration::from_millis(10));
        };
        self.stop();
        drained
    }

    /// Stops the thread (after the shards have stopped): requests still pending are
    /// answered NAK 506, so no DAC is left without an answer it can act on.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Running {
    origin: Origin,
    plan: ActionPlan,
    owners: Vec<Owner>,
    results: Vec<Option<SessionResult>>,
    identities: Vec<u64>,
}

struct State {
    setup: DispatcherSetup,
    /// Links with queued action lines, flushed after each burst of events.
    unflushed: HashMap<u64, Arc<AgentLink>>,
    next_id: u64,
    running: HashMap<u64, Running>,
    /// The identities of sessions with an action running, with how many running actions
    /// (or sessions of one action) hold each.
    busy: HashMap<u64, u32>,
    waiting: VecDeque<Origin>,
    compensating: HashSet<u64>,
    out: Vec<u8>,
    /// Settled answers of this round, sent once the round's store changes are durable
    /// (`state::defer_commits`; without a state directory that wait is free).
    ready: Vec<SettledAnswer>,
    /// Operators' outcomes of this round, likewise sent once durable.
    ready_operators: Vec<(Sender<OperatorOutcome>, OperatorOutcome)>,
}

/// The most events handled before queued action lines are written out.
const BURST: usize = 1024;

/// The most requests waiting behind another action on the same session.
const MAX_WAITING: usize = 4096;

/// A session's identity for serialization (`store::same_session`), hashed: the NAS and the
/// first of Acct-Session-Id, audit-session-id and CUI it has (else the whole session). Two
/// sessions whose identities collide are serialized as if they were one, which only makes
/// the second wait; two requests for one session always share the identity.
fn identity(s: &Session) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = IDENTITY_HASH.build_hasher();
    s.nas.as_deref().unwrap_or("").hash(&mut h);
    match (&s.acct_session_id, &s.audit_session_id, &s.cui) {
        (Some(a), _, _) => (b'a', a).hash(&mut h),
        (None, Some(a), _) => (b's', a).hash(&mut h),
        (None, None, Some(c)) => (b'c', c).hash(&mut h),
        (None, None, None) => (b'?', serde_json::to_string(s).unwrap_or_default()).hash(&mut h),
    }
    h.finish()
}

/// Fixed keys: identities are compared within one process only.
const IDENTITY_HASH: std::hash::BuildHasherDefault<std::hash::DefaultHasher> =
    std::hash::BuildHasherDefault::new();

impl State {
    fn new(setup: DispatcherSetup) -> Self {
        State {
            setup,
            unflushed: HashMap::new(),
            next_id: 1,
            running: HashMap::new(),
            busy: HashMap::new(),
            waiting: VecDeque::new(),
            compensating: HashSet::new(),
            out: vec![0; MAX_PACKET_LEN],
            ready: Vec::new(),
            ready_operators: Vec::new(),
        }
    }

    fn now(&self) -> Now {
        crate::runtime::clock(self.setup.base)
    }

    fn run(mut self, inbox: &Receiver<Event>, stop: &AtomicBool, drain: &AtomicBool) {
        while !stop.load(Ordering::Acquire) {
            let scope = crate::state::defer_commits();
            let now_ms = self.now().monotonic_ms;
            let next = self
                .running
                .values()
                .map(|r| r.origin.deadline_ms())
                .chain(self.waiting.iter().map(Origin::deadline_ms))
                .min();
            let wait = next.map_or(Duration::from_millis(100), |d| {
                Duration::from_millis(d.saturating_sub(now_ms).clamp(1, 100))
            });
            match inbox.recv_timeout(wait) {
                Ok(event) => {
                    self.on(event);
                    // A burst: whatever else is queued, then one write per agent.
                    for _ in 0..BURST {
                        match inbox.try_recv() {
                            Ok(event) => self.on(event),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.flush_links();
            self.expire();
            // The round's commits are durable before any of its answers leaves.
            scope.wait();
            self.send_ready();
            if drain.load(Ordering::Acquire)
                && self.running.is_empty()
                && self.waiting.is_empty()
                && inbox.is_empty()
            {
                break;
            }
        }
        let scope = crate::state::defer_commits();
        // Requests submitted before the shards stopped.
        while let Ok(event) = inbox.try_recv() {
            match event {
                Event::Submit(p) => {
                    self.refuse(Origin::Radius(p), ErrorCause::ResourcesUnavailable)
                }
                Event::Operator(o) => {
                    self.refuse(Origin::Operator(o), ErrorCause::ResourcesUnavailable)
                }
                Event::Results { .. } | Event::AgentGone(_) => {}
            }
        }
        // Shutting down: everything still pending is answered 506 (the DAC may retry).
        let ids: Vec<u64> = self.running.keys().copied().collect();
        for id in ids {
            self.settle(id);
        }
        while let Some(p) = self.waiting.pop_front() {
            self.refuse(p, ErrorCause::ResourcesUnavailable);
        }
        scope.wait();
        self.send_ready();
    }

    fn on(&mut self, event: Event) {
        match event {
            Event::Submit(p) => {
                self.setup.stats.submitted.fetch_add(1, Ordering::Relaxed);
                self.admit(Origin::Radius(p));
            }
            Event::Operator(mut o) => {
                self.setup.stats.submitted.fetch_add(1, Ordering::Relaxed);
                o.deadline_ms = self
                    .now()
                    .monotonic_ms
                    .saturating_add(self.setup.config.action_deadline_ms);
                self.admit(Origin::Operator(o));
            }
            Event::Results {
                action,
                owner,
                results,
            } => self.results(action, owner, results),
            Event::AgentGone(connection) => {
                let gone: Vec<u64> = self
                    .running
                    .iter()
                    .filter(|(_, r)| {
                        r.owners
                            .iter()
                            .zip(&r.results)
                            .any(|(o, res)| *o == Owner::Agent(connection) && res.is_none())
                    })
                    .map(|(id, _)| *id)
                    .collect();
                for id in gone {
                    self.setup.stats.agent_gone.fetch_add(1, Ordering::Relaxed);
                    self.settle(id);
                }
            }
        }
    }

    /// Starts `p` now, or queues it behind an action on one of its sessions.
    fn admit(&mut self, p: Origin) {
        if p.sessions()
            .iter()
            .any(|s| self.busy.contains_key(&identity(s)))
        {
            if self.waiting.len() >= MAX_WAITING {
                self.refuse(p, ErrorCause::ResourcesUnavailable);
            } else {
                self.setup.stats.serialized.fetch_add(1, Ordering::Relaxed);
                self.waiting.push_back(p);
            }
            return;
        }
        self.start(p);
    }

    fn start(&mut self, p: Origin) {
        let plan = match &p {
            Origin::Radius(pending) => match pending.plan() {
                Ok(plan) => plan,
                Err(_) => return self.refuse(p, ErrorCause::ResourcesUnavailable),
            },
            Origin::Operator(o) => ActionPlan {
                kind: ActionKind::Disconnect,
                command: None,
                sessions: o
                    .sessions
                    .iter()
                    .map(|s| PlannedSession {
                        session: s.clone(),
                        authorization: s.authorization.clone(),
                        steps: Vec::new(),
                    })
                    .collect(),
            },
        };
        // Every session needs a data plane that takes actions, before anything is sent.
        let mut owners = Vec::with_capacity(plan.sessions.len());
        let mut links: HashMap<u64, Arc<AgentLink>> = HashMap::new();
        for planned in &plan.sessions {
            if self.setup.in_process.is_some() {
                owners.push(Owner::InProcess);
                continue;
            }
            let nas = planned.session.nas.as_deref().unwrap_or("");
            match self.setup.agents.link_for(nas) {
                Some((connection, link)) => {
                    owners.push(Owner::Agent(connection));
                    links.insert(connection, link);
                }
                None => {
                    self.setup.stats.no_agent.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("actions: no agent takes actions for NAS {nas:?}: NAK 506");
                    return self.refuse(p, ErrorCause::ResourcesUnavailable);
                }
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let deadline_ms = p.deadline_ms().saturating_sub(self.now().monotonic_ms);
        let identities: Vec<u64> = p.sessions().iter().map(identity).collect();
        for i in &identities {
            *self.busy.entry(*i).or_insert(0) += 1;
        }
        let mut running = Running {
            results: vec![None; plan.sessions.len()],
            origin: p,
            plan,
            owners,
            identities,
        };
        for owner in distinct(&running.owners) {
            let indexes: Vec<usize> = (0..running.owners.len())
                .filter(|&i| running.owners[i] == owner)
                .collect();
            match owner {
                Owner::InProcess => {
                    if let Some(dp) = &self.setup.in_process {
                        let action = Action {
                            id,
                            plan: running.plan.clone(),
                            indexes,
                            deadline_ms,
                            compensation: false,
                        };
                        dp.execute(action, self.setup.submitter.results_from(owner));
                    }
                }
                Owner::Agent(connection) => {
                    let sent = links.get(&connection).map(|l| {
                        self.unflushed.insert(connection, Arc::clone(l));
                        l.queue_line(action_line(id, &running.plan, &indexes, deadline_ms, false))
                    });
                    if !matches!(sent, Some(Ok(()))) {
                        // Nobody will answer for these sessions: a result of "none" now.
                        tracing::warn!(
                            "actions: could not send action {id} to agent on connection {connection}"
                        );
                        for (o, r) in running.owners.iter().zip(running.results.iter_mut()) {
                            if *o == owner && r.is_none() {
                                *r = Some(SessionResult::Failed(Some(
                                    ErrorCause::ResourcesUnavailable,
                                )));
                            }
                        }
                    }
                }
            }
        }
        let done = running.results.iter().all(Option::is_some);
        self.running.insert(id, running);
        if done {
            self.settle(id);
        }
    }

    fn results(&mut self, action: u64, owner: Owner, results: Vec<(usize, SessionResult)>) {
        if self.compensating.remove(&action) {
            tracing::info!("actions: compensation {action} reported {results:?}");
            return;
        }
        let Some(running) = self.running.get_mut(&action) else {
            self.setup
                .stats
                .unexpected_results
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        for (index, result) in results {
            match (running.owners.get(index), running.results.get_mut(index)) {
                (Some(o), Some(slot)) if *o == owner && slot.is_none() => *slot = Some(result),
                _ => {
                    self.setup
                        .stats
                        .unexpected_results
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if running.results.iter().all(Option::is_some) {
            self.settle(action);
        }
    }

    /// Sends the action lines queued in this burst. An agent whose socket does not take them
    /// (it stopped reading for longer than the write timeout) gets no result in time: its
    /// actions settle NAK 506 at their deadline, or when its connection closes.
    fn flush_links(&mut self) {
        for (connection, link) in self.unflushed.drain() {
            if let Err(e) = link.flush() {
                tracing::warn!(
                    "actions: agent on connection {connection} does not take actions: {e}"
                );
            }
        }
    }

    /// Settles running action `id` with the results it has (missing ones give 506).
    fn settle(&mut self, id: u64) {
        let Some(running) = self.running.remove(&id) else {
            return;
        };
        for i in &running.identities {
            if let Some(n) = self.busy.get_mut(i) {
                *n -= 1;
                if *n == 0 {
                    self.busy.remove(i);
                }
            }
        }
        let now = self.now();
        match &running.origin {
            Origin::Radius(pending) => {
                let settled =
                    pending.settle(&*self.setup.store, &running.results, now, &mut self.out);
                match settled {
                    Ok(settled) => {
                        if !settled.compensate.is_empty() {
                            self.compensate(&running, &settled.compensate);
                        }
                        self.audit(pending, &settled);
                        self.deliver(settled);
                    }
                    Err(reason) => {
                        tracing::warn!("actions: action {id} could not be answered: {reason:?}")
                    }
                }
            }
            Origin::Operator(o) => {
                let mut outcome = OperatorOutcome::default();
                let (mut gone, mut stale) = (Vec::new(), Vec::new());
                for (s, r) in o.sessions.iter().zip(&running.results) {
                    match r {
                        Some(SessionResult::Committed) => {
                            outcome.committed += 1;
                            gone.push(s.clone());
                        }
                        Some(SessionResult::NotFound) => {
                            outcome.not_found += 1;
                            stale.push(s.clone());
                        }
                        Some(SessionResult::Failed(_)) => outcome.failed += 1,
                        None => outcome.unanswered += 1,
                    }
                }
                // The table follows the data plane, as for a RADIUS Disconnect.
                let _ = self
                    .setup
                    .store
                    .remove_sessions(&gone, true, now.monotonic_ms);
                let _ = self
                    .setup
                    .store
                    .remove_sessions(&stale, false, now.monotonic_ms);
                self.ready_operators.push((o.reply.clone(), outcome));
            }
        }
        self.wake_waiting();
    }

    /// Undoes the sessions of a CoA that committed when others did not (all or none).
    fn compensate(&mut self, running: &Running, indexes: &[usize]) {
        let id = self.next_id;
        self.next_id += 1;
        let mut plan = running.plan.clone();
        for p in &mut plan.sessions {
            p.steps = change_steps(&p.authorization, &p.session.authorization);
            p.authorization = p.session.authorization.clone();
        }
        plan.command = None;
        let recipients: HashSet<Owner> = indexes
            .iter()
            .filter_map(|&i| running.owners.get(i).copied())
            .collect();
        for owner in recipients {
            let action = Action {
                id,
                plan: plan.clone(),
                indexes: indexes
                    .iter()
                    .copied()
                    .filter(|&i| running.owners.get(i) == Some(&owner))
                    .collect(),
                deadline_ms: self.setup.config.action_deadline_ms,
                compensation: true,
            };
            self.setup
                .stats
                .compensations
                .fetch_add(1, Ordering::Relaxed);
            match owner {
                Owner::InProcess => {
                    if let Some(dp) = &self.setup.in_process {
                        dp.execute(action, self.setup.submitter.results_from(owner));
                    }
                }
                Owner::Agent(connection) => {
                    if let Some(link) = self.setup.agents.link(connection) {
                        let _ = link.queue_line(action.to_line());
                        self.unflushed.insert(connection, link);
                    }
                }
            }
        }
        self.compensating.insert(id);
    }

    /// Requests that waited for a session that is free now: selected again and started, or
    /// answered when the table already says how (ACK 201, NAK 503).
    fn wake_waiting(&mut self) {
        let mut still = VecDeque::new();
        while let Some(p) = self.waiting.pop_front() {
            if p.sessions()
                .iter()
                .any(|s| self.busy.contains_key(&identity(s)))
            {
                still.push_back(p);
                continue;
            }
            let now = self.now();
            let Origin::Radius(mut pending) = p else {
                // An operator's Disconnect acts on the sessions it named; one that is gone
                // meanwhile is answered not_found by its agent.
                self.admit(p);
                continue;
            };
            match pending.reselect(&*self.setup.store, now, &mut self.out) {
                Ok(Reselected::Sessions) => self.admit(Origin::Radius(pending)),
                Ok(Reselected::Settled(settled)) => {
                    self.audit(&pending, &settled);
                    self.deliver(settled)
                }
                Err(_) => self.refuse(Origin::Radius(pending), ErrorCause::ResourcesUnavailable),
            }
        }
        still.append(&mut self.waiting);
        self.waiting = still;
    }

    /// Actions and waiting requests past their deadline get NAK 506.
    fn expire(&mut self) {
        let now_ms = self.now().monotonic_ms;
        let due: Vec<u64> = self
            .running
            .iter()
            .filter(|(_, r)| r.origin.deadline_ms() <= now_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.setup.stats.timed_out.fetch_add(1, Ordering::Relaxed);
            self.settle(id);
        }
        while self
            .waiting
            .front()
            .is_some_and(|p| p.deadline_ms() <= now_ms)
        {
            if let Some(p) = self.waiting.pop_front() {
                self.setup.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                self.refuse(p, ErrorCause::ResourcesUnavailable);
            }
        }
    }

    /// Answers without the data plane: NAK `cause` to a RADIUS request; an operator's
    /// Disconnect learns that nothing was done.
    fn refuse(&mut self, p: Origin, cause: ErrorCause) {
        match p {
            Origin::Radius(p) => match p.refuse(cause, &mut self.out) {
                Ok(settled) => {
                    self.audit(&p, &settled);
                    self.deliver(settled)
                }
                Err(reason) => {
                    tracing::warn!("actions: a request could not be answered: {reason:?}")
                }
            },
            Origin::Operator(o) => {
                let _ = o.reply.try_send(OperatorOutcome {
                    unanswered: o.sessions.len() as u32,
                    ..OperatorOutcome::default()
                });
            }
        }
    }

    /// The audit log's line for a settled RADIUS request (its answer is in `self.out`).
    fn audit(&self, pending: &PendingRequest, settled: &Settled) {
        if let Some(audit) = &self.setup.audit {
            let bytes = self.out.get(..settled.len).unwrap_or_default();
            audit.settled_answer(pending, settled, bytes);
        }
    }

    fn deliver(&mut self, settled: Settled) {
        let stats = &self.setup.stats;
        if settled.error_cause.is_some_and(|c| c.value() >= 400) {
            stats.settled_nak.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.settled_ack.fetch_add(1, Ordering::Relaxed);
        }
        let bytes = self.out.get(..settled.len).unwrap_or_default().to_vec();
        self.ready.push(SettledAnswer { settled, bytes });
    }

    /// Sends the answers settled this round (after the round's commits are durable).
    fn send_ready(&mut self) {
        for (reply, outcome) in self.ready_operators.drain(..) {
            let _ = reply.try_send(outcome);
        }
        self.setup
            .delivery
            .send(&mut self.ready, &self.setup.stats.send_errors, "actions");
    }
}

/// Reads an agent's `results` list: `[{"index": 0, "result": "committed"}, ...]`
/// (`failed` may carry `error_cause`). `Err` names the field.
pub fn parse_results(value: Option<&Value>) -> Result<Vec<(usize, SessionResult)>, String> {
    let Some(Value::Array(list)) = value else {
        return Err("results".into());
    };
    list.iter()
        .enumerate()
        .map(|(i, r)| {
            let index = r
                .get("index")
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("results[{i}].index"))? as usize;
            let result = match r.get("result").and_then(Value::as_str) {
                Some("committed") => SessionResult::Committed,
                Some("not_found") => SessionResult::NotFound,
                Some("failed") => SessionResult::Failed(match r.get("error_cause") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(
                        v.as_u64()
                            .and_then(|n| u32::try_from(n).ok())
                            .and_then(ErrorCause::from_value)
                            .filter(|c| c.value() >= 400)
                            .ok_or_else(|| format!("results[{i}].error_cause"))?,
                    ),
                }),
                _ => return Err(format!("results[{i}].result")),
            };
            Ok((index, result))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynauth_proto::auth::{self, Secret};
    use dynauth_proto::client::{Cidr, Client, ClientTable};
    use dynauth_proto::codec::{Packet, PacketWriter};
    use dynauth_proto::store::MemoryStore;
    use dynauth_proto::{Engine, Outcome};
    use std::net::{SocketAddr, UdpSocket};

    /// Records every `write` call it gets, as the connection's shared writer sees them.
    #[derive(Clone, Default)]
    struct Calls(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Calls {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// An action line reaches the connection's writer in one call, newline included: the
    /// connection's replies take the same writer between calls, so a line written in two
    /// (its text, then its newline: `writeln!`) could have a reply land inside it and the
    /// agent read two messages run together (seen once as "trailing characters" in
    /// `tests/durability.rs::kill_9_in_agent_mode_loses_nothing_acknowledged`).
    #[test]
    fn an_action_line_reaches_the_shared_writer_in_one_call() {
        let calls = Calls::default();
        let link = AgentLink::new("a".into(), Box::new(calls.clone()), Box::new(|| {}));
        link.queue_line(r#"{"type":"action","action":1}"#.to_owned())
            .unwrap();
        link.send_line(r#"{"type":"action","action":2}"#.to_owned())
            .unwrap();
        assert_eq!(
            *calls.0.lock().unwrap(),
            vec![
                br#"{"type":"action","action":1}"#.iter().chain(b"\n").copied().collect::<Vec<u8>>(),
                br#"{"type":"action","action":2}"#.iter().chain(b"\n").copied().collect::<Vec<u8>>(),
            ]
        );
    }

    /// An in-process data plane that commits every session from another thread.
    struct Committer {
        seen: Mutex<Vec<(u64, ActionKind, usize)>>,
    }

    impl DataPlane for Committer {
        fn execute(&self, action: Action, results: ResultSink) {
            self.seen
                .lock()
                .unwrap()
                .push((action.id, action.plan.kind, action.indexes.len()));
            let id = action.id;
            let indexes = action.indexes.clone();
            std::thread::spawn(move || {
                results.report(
                    id,
                    indexes
                        .into_iter()
                        .map(|i| (i, SessionResult::Committed))
                        .collect(),
                );
            });
        }
    }

    // RFC 5176 §2.1 with a library user's in-process data plane: the shard hands the request
    // off (Outcome::Pending), the data plane commits on its own thread, and only then the
    // DAC gets the ACK, from the socket the request came to; the shard's cache learns it.
    #[test]
    fn in_process_data_plane_commits_then_the_dac_gets_the_ack() {
        let secret = Secret::new("in-process").unwrap();
        let config = Arc::new(EngineConfig {
            clients: ClientTable::new([Client::new(
                Cidr::host("127.0.0.1".parse().unwrap()),
                secret.clone(),
            )])
            .unwrap(),
            ..EngineConfig::default()
        });
        let store: Arc<dyn SessionStore> = Arc::new(MemoryStore::with_sessions([Session {
            acct_session_id: Some("s-1".into()),
            nas: Some("bng1".into()),
            ..Session::default()
        }]));
        let listener = dynauth_udp::bind_udp(
            "127.0.0.1:0".parse().unwrap(),
            dynauth_udp::BufferSizes {
                recv: 1 << 16,
                send: 1 << 16,
            },
        )
        .unwrap();
        let local = listener.local;
        let (submitter, inbox) = channel(16);
        let (shard_tx, shard_rx) = channel::unbounded();
        let plane = Arc::new(Committer {
            seen: Mutex::new(Vec::new()),
        });
        let base = Instant::now();
        let dispatcher = Dispatcher::start(
            DispatcherSetup {
                config: Arc::clone(&config),
                store: Arc::clone(&store),
                agents: Arc::new(Agents::default()),
                in_process: Some(plane.clone() as Arc<dyn DataPlane>),
                delivery: Delivery::new(
                    vec![ShardLink {
                        notices: shard_tx,
                        sends: None,
                    }],
                    AnswerSender::new(std::slice::from_ref(&listener)).unwrap(),
                ),
                base,
                stats: Arc::new(ActionStats::default()),
                submitter: submitter.clone(),
                audit: None,
            },
            inbox,
        )
        .unwrap();
        let mut engine = Engine::new(Arc::clone(&config), Arc::clone(&store))
            .with_actions(0, Arc::new(submitter) as Arc<dyn ActionSink>);
        let dac = UdpSocket::bind("127.0.0.1:0").unwrap();
        dac.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let mut w = PacketWriter::new(&mut buf, 40, 7, &[0; 16]).unwrap();
        w.push(44, b"s-1").unwrap();
        let len = w.finish().len();
        let request = &mut buf[..len];
        auth::sign_request(request, None, &secret);
        let mut out = [0u8; 4096];
        let source: SocketAddr = dac.local_addr().unwrap();
        let now = crate::runtime::clock(base);
        let outcome = engine.handle(request, source, local, now, &mut out);
        assert_eq!(outcome, Outcome::Pending);
        let mut answer = [0u8; 4096];
        let (n, from) = dac.recv_from(&mut answer).expect("the ACK");
        assert_eq!(from, local, "from the address the request came to");
        let packet = Packet::parse(&answer[..n]).unwrap();
        assert_eq!(packet.code(), 41, "Disconnect-ACK");
        assert_eq!(
            auth::verify_response(
                &packet,
                Packet::parse(request).unwrap().authenticator(),
                &secret
            ),
            auth::ResponseCheck::Valid
        );
        assert_eq!(store.len(), 0, "the table followed the commit");
        assert_eq!(plane.seen.lock().unwrap()[0].1, ActionKind::Disconnect);
        let ShardNotice::Answered(settled) = shard_rx.recv_timeout(Duration::from_secs(5)).unwrap()
        else {
            panic!("the shard is told of an answer, not an abandonment")
        };
        assert_eq!(
            settled.bytes,
            answer[..n].to_vec(),
            "the shard caches these bytes"
        );
        engine.settle(&settled.settled, &settled.bytes, now.monotonic_ms);
        let replay = engine.handle(request, source, local, now, &mut out);
        assert_eq!(
            replay,
            Outcome::Replay { len: n },
            "a retransmission replays"
        );
        dispatcher.stop();
    }
}
