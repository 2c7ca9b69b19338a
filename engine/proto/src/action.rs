//! Actions to the data plane, answered only after they commit (RFC 5176 §2.1: a
//! Disconnect-ACK or CoA-ACK says the NAS has acted).
//!
//! Owns: the request a shard cannot answer alone ([`PendingRequest`]: an owned copy of an
//! authenticated request and the sessions it selected), the hand-off to whoever delivers it
//! ([`ActionSink`]), the data plane's per-session results ([`SessionResult`]), the verdict
//! they give and the table change applied only then ([`PendingRequest::settle`]), and the
//! ordered steps of a CoA (removals of authorization before additions, [`change_steps`]).
//! Must not touch: sockets, threads, clocks (time is passed in), where agents live (the
//! daemon's dispatcher delivers actions and collects results).
//!
//! Results to verdicts (documented in `docs/CONTROL.md`, "Actions"):
//!
//! | results                                   | Disconnect        | CoA                  |
//! |-------------------------------------------|-------------------|----------------------|
//! | every session committed                   | ACK               | ACK (507 for Authorize Only) |
//! | committed and not_found, nothing else     | ACK               | ACK                  |
//! | every session not_found                   | NAK 503           | NAK 503              |
//! | any failed                                | NAK 504           | NAK, the agent's Error-Cause (default 506) |
//! | any without a result by the deadline      | NAK 506           | NAK 506              |
//!
//! The table follows the data plane, never the other way: sessions that committed a
//! Disconnect are removed (with tombstones, SPEC §4) whatever the answer, because they are
//! gone; sessions the data plane did not know are removed without a tombstone (stale); a
//! CoA's change is written to the table only when the answer is an ACK. A CoA that is not
//! acknowledged lists the sessions that did commit ([`Settled::compensate`]) so that the
//! dispatcher can undo them (multi-session all-or-none, RFC 5176 §3).
#![forbid(unsafe_code)]

use core::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::answer;
use crate::change::SubscriberCommand;
use crate::client::{Cidr, ClientId};
use crate::counters::{Discard, RequestKind};
use crate::dedup::DuplicateKey;
use crate::dict::ErrorCause;
use crate::engine::{EngineConfig, Now};
use crate::rules::{self, Operation, Prepared, Verdict};
use crate::session::{Authorization, Session};
use crate::store::{Applied, Refusal, SessionStore};
use crate::verify::{self, Arrival, Authenticated};

/// What the data plane is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// Tear the sessions down (Disconnect-Request).
    Disconnect,
    /// Change their authorization (CoA-Request).
    Change,
    /// Start a re-authorization (CoA-Request with Service-Type = Authorize Only).
    Reauthorize,
}

impl ActionKind {
    pub fn name(self) -> &'static str {
        match self {
            ActionKind::Disconnect => "disconnect",
            ActionKind::Change => "change",
            ActionKind::Reauthorize => "reauthorize",
        }
    }

    fn of(operation: Operation) -> Self {
        match operation {
            Operation::Disconnect => ActionKind::Disconnect,
            Operation::Change => ActionKind::Change,
            Operation::Reauthorize => ActionKind::Reauthorize,
        }
    }
}

/// The data plane's answer for one session of an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionResult {
    /// Done: torn down, changed, or re-authorization started.
    Committed,
    /// The data plane has no such session (the table was stale).
    NotFound,
    /// The data plane refused or failed; a CoA NAK carries this Error-Cause when given.
    Failed(Option<ErrorCause>),
}

/// Where a shard hands a request that must reach the data plane. `submit` must not block:
/// on a full queue it refuses, and the shard answers NAK 506 at once.
pub trait ActionSink: Send + Sync {
    fn submit(&self, request: PendingRequest) -> Result<(), QueueFull>;
}

/// The sink's queue is full (or its dispatcher is gone): the request gets NAK 506.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

/// An authenticated request whose sessions were selected, waiting for the data plane. It
/// owns a copy of the datagram, so the answer is built from the very bytes that verified, and
/// the configuration it verified under (a reload while it waits changes neither its client,
/// its secret nor its NAS identity: it is answered as it was verified).
#[derive(Debug, Clone)]
pub struct PendingRequest {
    pub(crate) config: Arc<EngineConfig>,
    pub(crate) shard: usize,
    pub(crate) kind: ActionKind,
    pub(crate) sessions: Vec<Session>,
    /// Private: `reopen` trusts that these are the bytes that passed `verify::authenticate`.
    datagram: Vec<u8>,
    pub(crate) source: SocketAddr,
    pub(crate) destination: SocketAddr,
    pub(crate) client_id: ClientId,
    /// Which of the client's secrets verified it (`Client::secrets`): reopened with it.
    pub(crate) secret_index: usize,
    pub(crate) arrived: Now,
    pub(crate) key: DuplicateKey,
    pub(crate) deadline_ms: u64,
    pub(crate) answer_expires_ms: u64,
}

/// A pending request given up without an answer (`Engine::abandon` forgets its in-flight
/// mark, so the DAC's next retransmission is handled as new).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abandoned {
    pub shard: usize,
    pub(crate) key: DuplicateKey,
}

/// The answer to a pending request, once settled; the bytes are in the caller's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub shard: usize,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub len: usize,
    pub code: u8,
    pub error_cause: Option<ErrorCause>,
    /// Sessions removed or changed in the table.
    pub sessions: u32,
    /// Indexes (into [`PendingRequest::sessions`]) of sessions that committed a CoA that is
    /// not acknowledged: the dispatcher undoes them (all or none).
    pub compensate: Vec<usize>,
    pub(crate) client_id: ClientId,
    /// The client's network: its identity across a reload (`client_id` is an index into the
    /// configuration the request verified under).
    pub(crate) client_network: Cidr,
    pub(crate) kind: RequestKind,
    pub(crate) ack: bool,
    pub(crate) authorize_only: bool,
    pub(crate) key: DuplicateKey,
    pub(crate) answer_expires_ms: u64,
}

/// What the data plane is asked to do ([`PendingRequest::plan`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionPlan {
    pub kind: ActionKind,
    /// A Cisco `subscriber:command` the CoA carried (run it after the steps).
    pub command: Option<SubscriberCommand>,
    /// In the order of [`PendingRequest::sessions`].
    pub sessions: Vec<PlannedSession>,
}

/// One session of an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedSession {
    /// The session as the table knows it.
    pub session: Session,
    /// Its authorization once the action commits (a CoA; otherwise unchanged).
    pub authorization: Authorization,
    /// The steps from its authorization to the new one (empty unless a CoA).
    pub steps: Vec<Step>,
}

/// What [`PendingRequest::reselect`] found.
#[derive(Debug)]
pub enum Reselected {
    /// The sessions to act on (now in [`PendingRequest::sessions`]).
    Sessions,
    /// No action is needed any more: the answer is settled (e.g. ACK 201, the session was
    /// removed meanwhile, or NAK 503).
    Settled(Settled),
}

impl PendingRequest {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: Arc<EngineConfig>,
        shard: usize,
        request: &Authenticated<'_>,
        operation: Operation,
        sessions: Vec<Session>,
        destination: SocketAddr,
        arrived: Now,
        deadline_ms: u64,
        answer_expires_ms: u64,
    ) -> Self {
        PendingRequest {
            config,
            shard,
            kind: ActionKind::of(operation),
            sessions,
            datagram: request.packet().bytes().to_vec(),
            source: request.source(),
            destination,
            client_id: request.client_id(),
            secret_index: request.secret_index(),
            arrived,
            key: request.duplicate_key(),
            deadline_ms,
            answer_expires_ms,
        }
    }

    /// The shard that received it (its duplicate cache and counters are settled there).
    pub fn shard(&self) -> usize {
        self.shard
    }

    pub fn kind(&self) -> ActionKind {
        self.kind
    }

    /// The selected sessions, as they were when selected.
    pub fn sessions(&self) -> &[Session] {
        &self.sessions
    }

    /// The DAC that sent it.
    pub fn source(&self) -> SocketAddr {
        self.source
    }

    /// The local address it arrived on; the answer leaves from here.
    pub fn destination(&self) -> SocketAddr {
        self.destination
    }

    /// Monotonic milliseconds by which every session must have a result (else NAK 506).
    pub fn deadline_ms(&self) -> u64 {
        self.deadline_ms
    }

    /// The client it came from (an index into [`PendingRequest::config`]).
    pub fn client_id(&self) -> ClientId {
        self.client_id
    }

    /// The configuration it verified under; it is settled with this one, whatever was
    /// reloaded since.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// What the data plane must do, session by session: for a CoA the new authorization and
    /// the ordered steps that reach it, and any Cisco `subscriber:command`.
    pub fn plan(&self) -> Result<ActionPlan, Discard> {
        let request = self.reopen()?;
        let prepared = self.prepare(&request)?;
        let sessions = self
            .sessions
            .iter()
            .map(|s| {
                let mut authorization = s.authorization.clone();
                if self.kind == ActionKind::Change {
                    prepared.change.apply_to(&mut authorization);
                }
                PlannedSession {
                    steps: change_steps(&s.authorization, &authorization),
                    session: s.clone(),
                    authorization,
                }
            })
            .collect();
        Ok(ActionPlan {
            kind: self.kind,
            command: match self.kind {
                ActionKind::Change => prepared.change.command,
                ActionKind::Disconnect | ActionKind::Reauthorize => None,
            },
            sessions,
        })
    }

    /// Selects again, from the table as it is now (after another action on one of these
    /// sessions finished: two requests for one session are serialized).
    pub fn reselect(
        &mut self,
        store: &dyn SessionStore,
        now: Now,
        out: &mut [u8],
    ) -> Result<Reselected, Discard> {
        let mut sessions = Vec::new();
        let settled = {
            let request = self.reopen()?;
            let prepared = self.prepare_at(&request, now.monotonic_ms)?;
            let selected = store.select(
                &prepared.lookup,
                prepared.operation == Operation::Disconnect,
                &mut sessions,
            );
            match selected {
                Ok(Applied::Sessions(_)) => None,
                other => {
                    let verdict = rules::verdict(prepared.operation, other);
                    Some(self.finish(&request, &verdict, Vec::new(), out)?)
                }
            }
        };
        Ok(match settled {
            Some(settled) => Reselected::Settled(settled),
            None => {
                self.sessions = sessions;
                Reselected::Sessions
            }
        })
    }

    /// The answer once every session has a result (`None`: no result by the deadline),
    /// in the order of [`PendingRequest::sessions`]; applies to `store` what the data plane
    /// committed (see the module documentation), then encodes and signs the answer into
    /// `out`.
    pub fn settle(
        &self,
        store: &dyn SessionStore,
        results: &[Option<SessionResult>],
        now: Now,
        out: &mut [u8],
    ) -> Result<Settled, Discard> {
        let request = self.reopen()?;
        let prepared = self.prepare(&request)?;
        let result_of = |i: usize| results.get(i).copied().flatten();
        let with = |want: fn(&SessionResult) -> bool| -> Vec<Session> {
            self.sessions
                .iter()
                .enumerate()
                .filter(|(i, _)| result_of(*i).as_ref().is_some_and(want))
                .map(|(_, s)| s.clone())
                .collect()
        };
        let committed = with(|r| *r == SessionResult::Committed);
        let unknown = with(|r| *r == SessionResult::NotFound);
        let failure = (0..self.sessions.len()).find_map(|i| match result_of(i) {
            Some(SessionResult::Failed(cause)) => Some(cause),
            _ => None,
        });
        let missing = (0..self.sessions.len()).any(|i| result_of(i).is_none());
        let now_ms = now.monotonic_ms;
        // The table follows the data plane: stale sessions go, torn-down sessions go.
        if !unknown.is_empty() {
            let _ = store.remove_sessions(&unknown, false, now_ms);
        }
        let mut table_changed = 0;
        if self.kind == ActionKind::Disconnect && !committed.is_empty() {
            table_changed = store.remove_sessions(&committed, true, now_ms).unwrap_or(0);
        }
        let outcome: Result<u32, ErrorCause> = if let Some(cause) = failure {
            Err(match self.kind {
                ActionKind::Disconnect => ErrorCause::SessionContextNotRemovable,
                ActionKind::Change | ActionKind::Reauthorize => cause
                    .filter(|c| c.value() >= 400)
                    .unwrap_or(ErrorCause::ResourcesUnavailable),
            })
        } else if missing {
            Err(ErrorCause::ResourcesUnavailable)
        } else if committed.is_empty() {
            Err(ErrorCause::SessionContextNotFound)
        } else {
            Ok(committed.len() as u32)
        };
        let mut compensate = Vec::new();
        let verdict = match outcome {
            Ok(n) => {
                if self.kind == ActionKind::Change {
                    table_changed = store
                        .change_sessions(&committed, &prepared.change, now_ms)
                        .unwrap_or(0);
                }
                let mut v = rules::verdict(prepared.operation, Ok(Applied::Sessions(n)));
                if self.kind != ActionKind::Reauthorize {
                    v.sessions = table_changed;
                }
                v
            }
            Err(cause) => {
                if self.kind == ActionKind::Change {
                    compensate = (0..self.sessions.len())
                        .filter(|&i| result_of(i) == Some(SessionResult::Committed))
                        .collect();
                }
                let mut v = rules::verdict(prepared.operation, Err(Refusal::NotFound));
                v.error_cause = Some(cause);
                v.sessions = table_changed;
                v
            }
        };
        self.finish(&request, &verdict, compensate, out)
    }

    /// Given up without an answer (see [`Abandoned`]).
    pub fn abandoned(&self) -> Abandoned {
        Abandoned {
            shard: self.shard,
            key: self.key,
        }
    }

    /// The answer for a verdict reached without the data plane (no agent, queue full).
    pub(crate) fn finish(
        &self,
        request: &Authenticated<'_>,
        verdict: &Verdict,
        compensate: Vec<usize>,
        out: &mut [u8],
    ) -> Result<Settled, Discard> {
        let len = answer::encode(out, request, verdict).map_err(|_| Discard::AnswerTooLarge)?;
        Ok(Settled {
            shard: self.shard,
            source: self.source,
            destination: self.destination,
            len,
            code: answer::answer_code(request.kind(), verdict.ack),
            error_cause: verdict.error_cause,
            sessions: verdict.sessions,
            compensate,
            client_id: self.client_id,
            client_network: request.client().network,
            kind: request.kind(),
            ack: verdict.ack,
            authorize_only: verdict.echo_authorize_only,
            key: self.key,
            answer_expires_ms: self.answer_expires_ms,
        })
    }

    /// NAK with `cause`, without asking the data plane (no agent for a session, queue full).
    pub fn refuse(&self, cause: ErrorCause, out: &mut [u8]) -> Result<Settled, Discard> {
        let request = self.reopen()?;
        self.finish(&request, &Verdict::nak(cause), Vec::new(), out)
    }

    /// The request again, from its own bytes, as verified when it arrived (the same
    /// configuration, so the same client and secret; the same clock reading, so the same
    /// checks pass). Its MACs are not computed again: these bytes passed them, and nothing
    /// outside this module can change them (`verify::reauthenticate`).
    pub(crate) fn reopen(&self) -> Result<Authenticated<'_>, Discard> {
        let client = self
            .config
            .clients
            .get(self.client_id)
            .ok_or(Discard::UnknownClient)?;
        let (packet, kind) = verify::classify(&self.datagram)?;
        verify::reauthenticate(
            Arrival {
                packet,
                kind,
                source: self.source,
                client_id: self.client_id,
                client,
            },
            self.secret_index,
            self.arrived,
            crate::codec::MAX_PACKET_LEN,
        )
    }

    fn prepare<'r>(&self, request: &Authenticated<'r>) -> Result<Prepared<'r>, Discard> {
        self.prepare_at(request, self.arrived.monotonic_ms)
    }

    fn prepare_at<'r>(
        &self,
        request: &Authenticated<'r>,
        now_ms: u64,
    ) -> Result<Prepared<'r>, Discard> {
        // It passed every rule when it arrived; the same bytes pass them again.
        rules::prepare(request, &self.config.nas, self.destination.ip(), now_ms)
            .map_err(|_| Discard::Malformed)
    }
}

/// One step of a CoA for the data plane, in the order to apply them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Step {
    /// Remove this value of a list attribute (`filter_ids`, `classes` as hex,
    /// `reply_messages`, `cisco_policies`).
    Remove { attribute: String, value: String },
    /// Set a number (`session_timeout`, `idle_timeout`, `acct_interim_interval`).
    Set { attribute: String, value: u32 },
    /// Add this value of a list attribute.
    Add { attribute: String, value: String },
}

/// The steps that turn authorization `from` into `to`: every removal first, then every
/// number, then every addition (the Junos order: a policy is never briefly doubled).
pub fn change_steps(from: &Authorization, to: &Authorization) -> Vec<Step> {
    let hex = |v: &Vec<u8>| v.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let lists: [(&str, Vec<String>, Vec<String>); 4] = [
        ("filter_ids", from.filter_ids.clone(), to.filter_ids.clone()),
        (
            "classes",
            from.classes.iter().map(hex).collect(),
            to.classes.iter().map(hex).collect(),
        ),
        (
            "reply_messages",
            from.reply_messages.clone(),
            to.reply_messages.clone(),
        ),
        (
            "cisco_policies",
            from.cisco_policies.clone(),
            to.cisco_policies.clone(),
        ),
    ];
    let mut steps = Vec::new();
    for (name, old, new) in &lists {
        for v in old.iter().filter(|v| !new.contains(v)) {
            steps.push(Step::Remove {
                attribute: (*name).into(),
                value: v.clone(),
            });
        }
    }
    let numbers = [
        ("session_timeout", from.session_timeout, to.session_timeout),
        ("idle_timeout", from.idle_timeout, to.idle_timeout),
        (
            "acct_interim_interval",
            from.acct_interim_interval,
            to.acct_interim_interval,
        ),
    ];
    for (name, old, new) in numbers {
        if let Some(value) = new.filter(|n| Some(*n) != old) {
            steps.push(Step::Set {
                attribute: name.into(),
                value,
            });
        }
    }
    for (name, old, new) in &lists {
        for v in new.iter().filter(|v| !old.contains(v)) {
            steps.push(Step::Add {
                attribute: (*name).into(),
                value: v.clone(),
            });
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    // Junos order: a CoA's removals of authorization come before its additions.
    #[test]
    fn coa_steps_remove_before_add() {
        let from = Authorization {
            filter_ids: vec!["bronze".into(), "common".into()],
            session_timeout: Some(3600),
            ..Default::default()
        };
        let to = Authorization {
            filter_ids: vec!["common".into(), "gold".into()],
            session_timeout: Some(7200),
            ..Default::default()
        };
        let steps = change_steps(&from, &to);
        assert_eq!(
            steps,
            vec![
                Step::Remove {
                    attribute: "filter_ids".into(),
                    value: "bronze".into()
                },
                Step::Set {
                    attribute: "session_timeout".into(),
                    value: 7200
                },
                Step::Add {
                    attribute: "filter_ids".into(),
                    value: "gold".into()
                },
            ]
        );
        assert!(change_steps(&to, &to).is_empty());
        // Undoing is the same function the other way round.
        assert_eq!(
            change_steps(&to, &from).first(),
            Some(&Step::Remove {
                attribute: "filter_ids".into(),
                value: "gold".into()
            })
        );
    }
}
