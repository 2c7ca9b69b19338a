//! Test support: building signed requests, running them through an `Engine` over the store
//! under test, and reading answers (every answer's authenticators are checked here).
//!
//! Requests that select sessions go to the data plane as actions (`dynauth_proto::action`):
//! the fixture's [`RecordingAgent`] records each one and commits it at once (or refuses one
//! named session), and the fixture settles it, so a test sees the answer that the agent's
//! results give; [`RecordingAgent::hold`] keeps actions pending for the tests of the
//! in-flight behaviour.
//!
//! The store under test is the including crate root's `StoreUnderTest`: `MemoryStore` in this
//! crate's tests, the carrier `SessionTable` when `engine/table/tests/conformance.rs` runs the
//! same conformance suite (`spec_rules.rs`) against the store dynauthd serves from.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use dynauth_proto::action::{
    ActionKind, ActionSink, PendingRequest, QueueFull, SessionResult, Settled,
};

use dynauth_proto::auth::{self, ResponseCheck, Secret};
use dynauth_proto::client::{Client, ClientPolicy, ClientTable, NasIdentity};
use dynauth_proto::codec::{MAX_PACKET_LEN, Packet, PacketWriter};
use dynauth_proto::dict::{ErrorCause, attr};
use dynauth_proto::session::Session;
use dynauth_proto::store::{MemoryStore, SessionStore};
use dynauth_proto::{Answer, Engine, EngineConfig, Now, Outcome};

/// A store the conformance suite can run against.
pub trait TestStore: SessionStore + 'static {
    fn from_sessions(sessions: Vec<Session>) -> Self;
    /// Every live session.
    fn sessions(&self) -> Vec<Session>;
}

impl TestStore for MemoryStore {
    fn from_sessions(sessions: Vec<Session>) -> Self {
        MemoryStore::with_sessions(sessions)
    }
    fn sessions(&self) -> Vec<Session> {
        self.snapshot()
    }
}

/// The store under test (see the module doc).
pub type Store = crate::StoreUnderTest;

pub const SECRET: &str = "testing123";
pub const NOW: Now = Now {
    unix_secs: 1_795_263_234,
    monotonic_ms: 1_000_000,
};

pub fn source() -> SocketAddr {
    "127.0.0.1:40000".parse().unwrap()
}

pub fn destination() -> SocketAddr {
    "127.0.0.1:3799".parse().unwrap()
}

/// Builds a request: attributes in order; `message_authenticator` puts one first.
pub fn request(code: u8, id: u8, attrs: &[(u8, &[u8])], message_authenticator: bool) -> Vec<u8> {
    request_with_secret(code, id, attrs, message_authenticator, SECRET)
}

pub fn request_with_secret(
    code: u8,
    id: u8,
    attrs: &[(u8, &[u8])],
    message_authenticator: bool,
    secret: &str,
) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_PACKET_LEN];
    let mut w = PacketWriter::new(&mut buf, code, id, &[0; 16]).unwrap();
    let ma = message_authenticator.then(|| w.push(attr::MESSAGE_AUTHENTICATOR, &[0; 16]).unwrap());
    for (ty, v) in attrs {
        w.push(*ty, v).unwrap();
    }
    let len = w.finish().len();
    buf.truncate(len);
    auth::sign_request(&mut buf, ma, &Secret::new(secret).unwrap());
    buf
}

/// A Vendor-Specific attribute value holding one sub-attribute.
pub fn vsa(vendor: u32, ty: u8, value: &[u8]) -> Vec<u8> {
    let mut v = vendor.to_be_bytes().to_vec();
    v.push(ty);
    v.push((value.len() + 2) as u8);
    v.extend_from_slice(value);
    v
}

/// Re-signs a request after a test edited its bytes (so only the edit is under test).
pub fn resign(packet: &mut [u8]) {
    let ma = Packet::parse(packet)
        .unwrap()
        .attributes()
        .map_while(Result::ok)
        .find(|a| a.ty == attr::MESSAGE_AUTHENTICATOR)
        .map(|a| a.value_offset());
    if let Some(off) = ma {
        packet[off..off + 16].fill(0);
    }
    packet[4..20].fill(0);
    auth::sign_request(packet, ma, &Secret::new(SECRET).unwrap());
}

/// The test data plane: every action it commits is recorded, in order.
#[derive(Debug, Default)]
pub struct RecordingAgent {
    pub events: Mutex<Vec<String>>,
    /// The Acct-Session-Id of a session whose removal this agent refuses.
    pub refuse_removal_of: Mutex<Option<String>>,
    /// Keep submitted actions pending (`Fixture::take_pending`) instead of settling them.
    pub hold: AtomicBool,
    queue: Mutex<Vec<PendingRequest>>,
}

impl ActionSink for RecordingAgent {
    fn submit(&self, request: PendingRequest) -> Result<(), QueueFull> {
        self.queue.lock().unwrap().push(request);
        Ok(())
    }
}

impl RecordingAgent {
    /// Commits every session of `request` (except a refused removal) and records it.
    pub fn results(&self, request: &PendingRequest) -> Vec<Option<SessionResult>> {
        let plan = request.plan().expect("a pending request re-reads");
        let refused = self.refuse_removal_of.lock().unwrap().clone();
        let id = |s: &Session| s.acct_session_id.clone().unwrap_or_else(|| "?".into());
        let mut results = Vec::new();
        let mut events = Vec::new();
        for p in &plan.sessions {
            let name = id(&p.session);
            if plan.kind == ActionKind::Disconnect && refused.as_deref() == Some(name.as_str()) {
                results.push(Some(SessionResult::Failed(None)));
                continue;
            }
            let cmd = plan
                .command
                .map_or(String::new(), |c| format!(" {}", c.name()));
            events.push(match plan.kind {
                ActionKind::Disconnect => format!("removed {name}"),
                ActionKind::Change => format!("changed {name}{cmd}"),
                ActionKind::Reauthorize => format!("reauthorize {name}"),
            });
            results.push(Some(SessionResult::Committed));
        }
        // A refused Disconnect tears nothing down in this agent (it checks before acting).
        if results
            .iter()
            .any(|r| matches!(r, Some(SessionResult::Failed(_))))
        {
            return results
                .into_iter()
                .map(|r| r.map(|_| SessionResult::Failed(None)))
                .collect();
        }
        self.events.lock().unwrap().extend(events);
        results
    }
}

pub struct Fixture {
    pub engine: Engine,
    pub store: Arc<Store>,
    pub data_plane: Arc<RecordingAgent>,
    pub out: Vec<u8>,
    /// Datagrams go through `Engine::shed` (the overload path) instead of `Engine::handle`.
    pub shed: bool,
}

/// A parsed, authenticator-checked answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u8,
    pub identifier: u8,
    pub attrs: Vec<(u8, Vec<u8>)>,
    pub bytes: Vec<u8>,
}

impl Reply {
    pub fn error_causes(&self) -> Vec<u32> {
        self.attrs
            .iter()
            .filter(|(t, _)| *t == attr::ERROR_CAUSE)
            .map(|(_, v)| u32::from_be_bytes(v[..4].try_into().unwrap()))
            .collect()
    }

    pub fn error_cause(&self) -> Option<ErrorCause> {
        let all = self.error_causes();
        assert!(all.len() <= 1, "more than one Error-Cause: {all:?}");
        all.first().map(|v| ErrorCause::from_value(*v).unwrap())
    }

    pub fn values(&self, ty: u8) -> Vec<Vec<u8>> {
        self.attrs
            .iter()
            .filter(|(t, _)| *t == ty)
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn types(&self) -> Vec<u8> {
        self.attrs.iter().map(|(t, _)| *t).collect()
    }
}

pub fn session(id: &str) -> Session {
    Session {
        acct_session_id: Some(id.into()),
        ..Session::default()
    }
}

impl Fixture {
    pub fn new(policy: ClientPolicy, sessions: Vec<Session>) -> Self {
        Self::with_nas(policy, sessions, NasIdentity::default())
    }

    pub fn with_nas(policy: ClientPolicy, sessions: Vec<Session>, nas: NasIdentity) -> Self {
        let mut client = Client::new(
            "127.0.0.1/32".parse().unwrap(),
            Secret::new(SECRET).unwrap(),
        );
        client.policy = policy;
        Self::with_clients(vec![client], sessions, nas)
    }

    pub fn with_clients(clients: Vec<Client>, sessions: Vec<Session>, nas: NasIdentity) -> Self {
        let config = EngineConfig {
            clients: ClientTable::new(clients).unwrap(),
            nas,
            ..EngineConfig::default()
        };
        let store = Arc::new(<Store as TestStore>::from_sessions(sessions));
        let data_plane = Arc::new(RecordingAgent::default());
        let engine = Engine::new(Arc::new(config), store.clone())
            .with_actions(0, data_plane.clone() as Arc<dyn ActionSink>);
        Fixture {
            engine,
            store,
            data_plane,
            out: vec![0; MAX_PACKET_LEN],
            shed: false,
        }
    }

    pub fn handle_at(
        &mut self,
        packet: &[u8],
        from: SocketAddr,
        now: Now,
    ) -> (Outcome, Option<Reply>) {
        let mut outcome = if self.shed {
            self.engine
                .shed(packet, from, destination(), now, &mut self.out)
        } else {
            self.engine
                .handle(packet, from, destination(), now, &mut self.out)
        };
        if outcome == Outcome::Pending && !self.data_plane.hold.load(Ordering::Relaxed) {
            let pending = self
                .take_pending()
                .expect("a pending request was submitted");
            let results = self.data_plane.results(&pending);
            let settled = self.settle(&pending, &results, now);
            outcome = Outcome::Answer(Answer {
                len: settled.len,
                code: settled.code,
                error_cause: settled.error_cause,
                sessions: settled.sessions,
                sealed_later: false,
            });
        }
        let len = match outcome {
            Outcome::Answer(a) => a.len,
            Outcome::Replay { len } => len,
            Outcome::Discard(_) | Outcome::Pending => return (outcome, None),
        };
        let bytes = self.out[..len].to_vec();
        let request = Packet::parse(packet).unwrap();
        let answer = Packet::parse(&bytes).expect("answer parses");
        assert_eq!(
            answer.identifier(),
            request.identifier(),
            "SPEC §9: same Identifier"
        );
        assert_eq!(
            auth::verify_response(
                &answer,
                request.authenticator(),
                &Secret::new(SECRET).unwrap()
            ),
            ResponseCheck::Valid,
            "answer authenticators must verify"
        );
        let attrs = answer
            .attributes()
            .map(|a| {
                let a = a.expect("answer framing");
                (a.ty, a.value.to_vec())
            })
            .collect();
        let reply = Reply {
            code: answer.code(),
            identifier: answer.identifier(),
            attrs,
            bytes,
        };
        (outcome, Some(reply))
    }

    pub fn handle(&mut self, packet: &[u8]) -> (Outcome, Option<Reply>) {
        self.handle_at(packet, source(), NOW)
    }

    /// Sends a request that must be answered; returns the answer.
    pub fn answer(&mut self, packet: &[u8]) -> Reply {
        match self.handle(packet) {
            (_, Some(reply)) => reply,
            (outcome, None) => panic!("expected an answer, got {outcome:?}"),
        }
    }

    /// Sends a request that must be silently discarded; returns the reason.
    pub fn discard(&mut self, packet: &[u8]) -> dynauth_proto::counters::Discard {
        match self.handle(packet) {
            (Outcome::Discard(reason), None) => reason,
            other => panic!("expected a silent discard, got {other:?}"),
        }
    }

    /// The oldest action submitted and not yet taken.
    pub fn take_pending(&self) -> Option<PendingRequest> {
        let mut queue = self.data_plane.queue.lock().unwrap();
        (!queue.is_empty()).then(|| queue.remove(0))
    }

    /// Settles `pending` with `results` as the daemon's dispatcher does: the answer is written
    /// to `self.out` and recorded in the engine's duplicate cache and counters.
    pub fn settle(
        &mut self,
        pending: &PendingRequest,
        results: &[Option<SessionResult>],
        now: Now,
    ) -> Settled {
        let settled = pending
            .settle(&*self.store, results, now, &mut self.out)
            .expect("a pending request settles");
        let bytes = self.out[..settled.len].to_vec();
        self.engine.settle(&settled, &bytes, now.monotonic_ms);
        settled
    }

    pub fn events(&self) -> Vec<String> {
        self.data_plane.events.lock().unwrap().clone()
    }
}
