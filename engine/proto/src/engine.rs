//! The engine: one datagram in, a silent discard with its reason or the exact answer out.
//!
//! Owns: the pipeline's order, one stage per module: `verify` (client, framing, code,
//! authenticators, Event-Timestamp, Proxy-State limit, answer fit) builds an
//! [`Authenticated`] request; only then the duplicate cache (`dedup`), so that no cached
//! answer is replayed to bytes that were not authenticated; then `rules` (attribute rules,
//! NAS identification, session identification, the store call) gives a verdict; `answer`
//! encodes and signs it; the answer is cached and counted here.
//! Must not touch: sockets, threads or clocks (time is passed in as [`Now`]), allocation on
//! the Disconnect path.
#![forbid(unsafe_code)]

use core::net::SocketAddr;
use std::sync::Arc;

use crate::action::{Abandoned, ActionSink, PendingRequest, Settled};
use crate::answer;
use crate::batch::BatchWork;
use crate::client::{ClientTable, NasIdentity};
use crate::codec::Packet;
use crate::counters::{Counters, Discard, RequestKind};
use crate::dedup::{DedupConfig, DuplicateCache, Seen};
use crate::dict::ErrorCause;
use crate::dict::{attr, code};
use crate::rules::{self, Operation, Verdict};
use crate::session::{Key, KeyValue, PrimaryKey};
use crate::store::{Applied, SessionStore, Touch};
use crate::verify::{self, Arrival, Authenticated};

/// The time, passed in by the caller (the engine reads no clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Wall-clock seconds since the Unix epoch (Event-Timestamp checks).
    pub unix_secs: u64,
    /// A monotonic clock in milliseconds (duplicate cache, tombstones).
    pub monotonic_ms: u64,
}

/// Everything the decisions need that is fixed while the server runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub clients: ClientTable,
    pub nas: NasIdentity,
    pub dedup: DedupConfig,
    /// How long the data plane has to commit an action before the request gets NAK 506
    /// (RFC 5176 §3.5 Resources Unavailable); only with an [`ActionSink`].
    pub action_deadline_ms: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            clients: ClientTable::default(),
            nas: NasIdentity::default(),
            dedup: DedupConfig::default(),
            action_deadline_ms: DEFAULT_ACTION_DEADLINE_MS,
        }
    }
}

/// The default time the data plane has to commit an action (3 s, a DAC's usual first retry).
pub const DEFAULT_ACTION_DEADLINE_MS: u64 = 3_000;

/// What to do with one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Send nothing; the reason was counted.
    Discard(Discard),
    /// Send `out[..len]`, a fresh answer.
    Answer(Answer),
    /// Send `out[..len]`: the cached answer to an earlier copy of this request.
    Replay { len: usize },
    /// Send nothing now: the request went to the data plane (an [`ActionSink`]); its answer
    /// is sent when the action settles, and [`Engine::settle`] caches and counts it.
    Pending,
}

/// A fresh answer's summary (the bytes are in the caller's buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub len: usize,
    pub code: u8,
    pub error_cause: Option<ErrorCause>,
    /// Sessions removed or changed.
    pub sessions: u32,
    /// Left unsigned in a batch ([`Engine::begin_batch`]): the buffer may be sent only after
    /// [`Engine::write_sealed`] wrote the signed answer over it.
    pub sealed_later: bool,
}

/// One engine per shard: the shared configuration and store, where actions go (when the
/// data plane is not the table itself), and this shard's duplicate cache and counters.
pub struct Engine {
    config: Arc<EngineConfig>,
    store: Arc<dyn SessionStore>,
    actions: Option<Arc<dyn ActionSink>>,
    /// The router role: every request that passes the rules goes to `actions` for routing,
    /// without the NAS check and without a store.
    route: bool,
    shard: usize,
    dedup: DuplicateCache,
    counters: Counters,
    /// The MD5s of the current receive batch, four at a time ([`Engine::begin_batch`]).
    batch: BatchWork,
}

impl core::fmt::Debug for Engine {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Engine")
            .field("clients", &self.config.clients.len())
            .field("sessions", &self.store.len())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// An engine whose data plane is the table (table-only mode: a Disconnect removes the
    /// session from the table and nothing else).
    pub fn new(config: Arc<EngineConfig>, store: Arc<dyn SessionStore>) -> Self {
        Engine {
            dedup: DuplicateCache::new(config.dedup),
            counters: Counters::new(config.clients.len()),
            config,
            store,
            actions: None,
            route: false,
            shard: 0,
            batch: BatchWork::default(),
        }
    }

    /// The router role (RFC 5176 §3.1): every request that passes the rules (all of them but
    /// the NAS identification check, which is the owner's) is handed to `sink` without a
    /// session lookup; the router forwards it to the session's owner and settles it with the
    /// owner's answer relayed ([`PendingRequest::relay`]) or a NAK 502/505 of its own.
    pub fn with_router(mut self, shard: usize, sink: Arc<dyn ActionSink>) -> Self {
        self.shard = shard;
        self.actions = Some(sink);
        self.route = true;
        self
    }

    /// Forgets that one of this shard's requests is in flight, without an answer (a router
    /// configured to let the DAC retry when the owner is silent): its next retransmission is
    /// handled as new.
    pub fn abandon(&mut self, abandoned: &Abandoned) {
        self.dedup.abandon_key(&abandoned.key);
    }

    /// Sends every request that selects sessions to `sink` as shard number `shard`, and
    /// answers it only once the data plane's results settle it (RFC 5176 §2.1).
    pub fn with_actions(mut self, shard: usize, sink: Arc<dyn ActionSink>) -> Self {
        self.shard = shard;
        self.actions = Some(sink);
        self
    }

    /// Records the answer to one of this shard's pending requests: cached for its
    /// retransmissions (`answer` is the bytes sent) and counted.
    pub fn settle(&mut self, settled: &Settled, answer: &[u8], now_ms: u64) {
        self.dedup
            .complete_key(settled.key, answer, now_ms, settled.answer_expires_ms);
        // Counted under its client's network: the configuration may have been reloaded since
        // the request verified (then `client_id` indexes the old client list).
        let clients = &self.config.clients;
        let index = match clients.get(settled.client_id) {
            Some(c) if c.network == settled.client_network => settled.client_id.0 as usize,
            _ => clients
                .position_of(settled.client_network)
                .map_or(clients.len(), |id| id.0 as usize),
        };
        if self.counters.per_client.len() <= index {
            self.counters
                .per_client
                .resize(index + 1, crate::counters::ClientCounters::default());
        }
        if let Some(c) = self.counters.per_client.get_mut(index) {
            count_answer(
                c,
                settled.kind,
                &Verdict {
                    ack: settled.ack,
                    error_cause: settled.error_cause,
                    echo_authorize_only: settled.authorize_only,
                    sessions: settled.sessions,
                },
            );
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn dedup_stats(&self) -> crate::dedup::DedupStats {
        self.dedup.stats()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Runs with `config` from now on (a reload; the caller swaps between batches). The
    /// duplicate cache is kept as it is (its sizing is fixed at start), so are the counters,
    /// re-indexed by client network: a client that stays keeps its counts, a new one starts
    /// at zero, and the counts of a removed one move to the slot after the last client (so
    /// totals never go down). Requests already handed to the data plane keep the
    /// configuration they verified under ([`PendingRequest::config`]).
    pub fn set_config(&mut self, config: Arc<EngineConfig>) {
        // Answers left unsigned are signed with the secrets they were decided with.
        self.seal_batch();
        let (old, new) = (&self.config.clients, &config.clients);
        self.counters = self.counters.reindexed(new.len(), |i| {
            old.get(crate::client::ClientId(i as u32))
                .and_then(|c| new.position_of(c.network))
                .map(|id| id.0 as usize)
        });
        self.config = config;
    }

    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.store
    }

    /// The batch hint ([`SessionStore::touch`]): for a Disconnect- or CoA-Request that names
    /// an Acct-Session-Id (the key a storm is sent by), asks the store to load what its
    /// lookup will read. Nothing is verified and nothing decided: the bytes are only read to
    /// find the attribute, and a packet that does not parse is skipped.
    pub fn touch(&self, datagram: &[u8], step: Touch) {
        if self.route {
            return;
        }
        if let Some(value) = acct_session_id_of(datagram) {
            self.store.touch(
                &PrimaryKey {
                    key: Key::AcctSessionId,
                    value: KeyValue::Text(value),
                },
                step,
            );
        }
    }

    /// Starts a receive batch (the batch engine API): the Request Authenticators of the
    /// batch's requests are computed now, four at a time, and the answers decided until
    /// [`Engine::seal_batch`] are left unsigned ([`Answer::sealed_later`]) to be signed
    /// four at a time there. The caller then hands each such answer's buffer, in the order
    /// decided, to [`Engine::write_sealed`], and must not send one it refuses. Without
    /// `begin_batch`, [`Engine::handle`] signs every answer itself, as before.
    pub fn begin_batch<'d>(&mut self, datagrams: impl IntoIterator<Item = (&'d [u8], SocketAddr)>) {
        // A batch the caller never sealed: its cached answers are signed now all the same.
        self.seal_batch();
        if self.route {
            return;
        }
        self.batch.prepare(
            datagrams.into_iter().map(|(d, source)| (d, source.ip())),
            &self.config.clients,
        );
    }

    /// Signs the answers left unsigned since [`Engine::begin_batch`] (and their copies in
    /// the duplicate cache, which replays none of them before this). From now on answers
    /// are signed at once again, until the next `begin_batch`.
    pub fn seal_batch(&mut self) {
        self.batch.seal(&self.config.clients, &mut self.dedup);
    }

    /// Writes the next answer signed by [`Engine::seal_batch`] over `out`, which must hold
    /// that answer as [`Engine::handle`] left it (answers in the order they were decided).
    /// `false` when it does not, or none is left: that buffer must not be sent.
    pub fn write_sealed(&mut self, out: &mut [u8]) -> bool {
        self.batch.write_sealed(out)
    }

    /// The batch hint for a whole receive batch ([`SessionStore::touch_all`]): the
    /// Acct-Session-Id of every Disconnect- and CoA-Request among `datagrams`, read as
    /// [`Engine::touch`] reads it, handed to the store in one call per 64 keys.
    pub fn touch_batch<'d>(&self, datagrams: impl IntoIterator<Item = &'d [u8]>) {
        const CHUNK: usize = 64;
        if self.route {
            return;
        }
        let none = PrimaryKey {
            key: Key::AcctSessionId,
            value: KeyValue::Text(&[]),
        };
        let mut keys = [none; CHUNK];
        let mut n = 0;
        for datagram in datagrams {
            let Some(value) = acct_session_id_of(datagram) else {
                continue;
            };
            if let Some(slot) = keys.get_mut(n) {
                *slot = PrimaryKey {
                    key: Key::AcctSessionId,
                    value: KeyValue::Text(value),
                };
                n += 1;
            }
            if n == CHUNK {
                self.store.touch_all(&keys);
                n = 0;
            }
        }
        if let Some(rest) = keys.get(..n)
            && !rest.is_empty()
        {
            self.store.touch_all(rest);
        }
    }

    /// Decides one datagram that arrived from `source` on `destination` (the local address,
    /// which the answer must leave from). The answer, if any, is written to `out`, which
    /// should hold `codec::MAX_PACKET_LEN` octets.
    pub fn handle(
        &mut self,
        datagram: &[u8],
        source: SocketAddr,
        destination: SocketAddr,
        now: Now,
        out: &mut [u8],
    ) -> Outcome {
        self.handle_as(datagram, source, destination, now, out, false)
    }

    /// Sheds one datagram under overload (RFC 5176 §3.5: NAK 506 Resources Unavailable,
    /// rather than an answer that arrives after the DAC gave up): the request is
    /// authenticated like any other (nothing answers bytes that fail, and a discard keeps
    /// its reason), an authenticated copy of an answered request still gets its cached
    /// answer, and any other gets NAK 506, counted as an answer. The session store is never
    /// called, so a shed request has changed nothing, and the 506 is not cached: a
    /// retransmission after the overload is decided afresh.
    pub fn shed(
        &mut self,
        datagram: &[u8],
        source: SocketAddr,
        destination: SocketAddr,
        now: Now,
        out: &mut [u8],
    ) -> Outcome {
        self.handle_as(datagram, source, destination, now, out, true)
    }

    fn handle_as(
        &mut self,
        datagram: &[u8],
        source: SocketAddr,
        destination: SocketAddr,
        now: Now,
        out: &mut [u8],
        shed: bool,
    ) -> Outcome {
        // Split borrows: the shared configuration is read while this shard's cache and counters
        // are written, without touching the `Arc`'s reference count (a cache line every shard
        // would otherwise bounce on every packet).
        let Engine {
            config,
            store,
            actions,
            route,
            shard: shard_index,
            dedup,
            counters,
            batch,
        } = self;
        let Some((client_id, client)) = config.clients.lookup(source.ip()) else {
            counters.unknown_client += 1;
            return Outcome::Discard(Discard::UnknownClient);
        };
        let shard = Shard {
            config,
            store: &**store,
            actions: actions.as_deref(),
            route: *route,
            shard: *shard_index,
            dedup,
            counters,
            batch,
        };
        let arrival = verify::classify(datagram).map(|(packet, kind)| Arrival {
            packet,
            kind,
            source,
            client_id,
            client,
        });
        match arrival.and_then(|a| shard.handle(a, destination, now, out, shed)) {
            Ok(outcome) => outcome,
            Err(reason) => {
                if let Some(c) = counters.per_client.get_mut(client_id.0 as usize) {
                    c.discards[reason.index()] += 1;
                }
                Outcome::Discard(reason)
            }
        }
    }
}

/// What one call of `Engine::handle` works with: the shared parts by reference, this shard's
/// duplicate cache and counters mutably.
struct Shard<'a> {
    config: &'a Arc<EngineConfig>,
    store: &'a dyn SessionStore,
    actions: Option<&'a dyn ActionSink>,
    route: bool,
    shard: usize,
    dedup: &'a mut DuplicateCache,
    counters: &'a mut Counters,
    batch: &'a mut BatchWork,
}

impl Shard<'_> {
    fn handle(
        mut self,
        arrival: Arrival<'_>,
        destination: SocketAddr,
        now: Now,
        out: &mut [u8],
        shed: bool,
    ) -> Result<Outcome, Discard> {
        let ci = arrival.client_id.0 as usize;
        let kind = arrival.kind;
        if let Some(c) = self.counters.per_client.get_mut(ci) {
            c.requests[kind as usize] += 1;
        }
        let expected = self
            .batch
            .precomputed(arrival.packet.bytes(), arrival.client_id);
        let request = verify::authenticate_precomputed(arrival, now, out.len(), expected)?;
        match self.dedup.seen(&request, now.monotonic_ms) {
            Seen::New => {}
            Seen::InFlight => return Err(Discard::DuplicateInFlight),
            Seen::Answered(bytes) => {
                let len = bytes.len();
                let slot = out.get_mut(..len).ok_or(Discard::AnswerTooLarge)?;
                slot.copy_from_slice(bytes);
                if let Some(c) = self.counters.per_client.get_mut(ci) {
                    c.duplicates[kind as usize] += 1;
                }
                return Ok(Outcome::Replay { len });
            }
        }
        if shed {
            // Before any store call or hand-off: nothing changes, nothing is cached.
            let verdict = Verdict::nak(ErrorCause::ResourcesUnavailable);
            return self.answer_with(&request, &verdict, now, out, false);
        }
        if self.route
            && let Some(sink) = self.actions
        {
            let verdict = match rules::prepare_route(&request, now.monotonic_ms) {
                Err(verdict) => verdict,
                Ok(prepared) => match self.hand_off(
                    sink,
                    &request,
                    prepared.operation,
                    Vec::new(),
                    destination,
                    now,
                ) {
                    Ok(()) => return Ok(Outcome::Pending),
                    Err(verdict) => verdict,
                },
            };
            return self.answer(&request, &verdict, now, out);
        }
        let verdict = match rules::prepare(
            &request,
            &self.config.nas,
            destination.ip(),
            now.monotonic_ms,
        ) {
            Err(verdict) => verdict,
            Ok(prepared) => match self.actions {
                // Table-only: the table is the data plane.
                None => rules::decide_prepared(&prepared, self.store),
                Some(sink) => {
                    let mut sessions = Vec::new();
                    let selected = self.store.select(
                        &prepared.lookup,
                        prepared.operation == Operation::Disconnect,
                        &mut sessions,
                    );
                    match selected {
                        Ok(Applied::Sessions(_)) => {
                            match self.hand_off(
                                sink,
                                &request,
                                prepared.operation,
                                sessions,
                                destination,
                                now,
                            ) {
                                Ok(()) => return Ok(Outcome::Pending),
                                Err(verdict) => verdict,
                            }
                        }
                        other => rules::verdict(prepared.operation, other),
                    }
                }
            },
        };
        self.answer(&request, &verdict, now, out)
    }

    /// Encodes, caches and counts the answer to a decided request.
    fn answer(
        &mut self,
        request: &Authenticated<'_>,
        verdict: &Verdict,
        now: Now,
        out: &mut [u8],
    ) -> Result<Outcome, Discard> {
        self.answer_with(request, verdict, now, out, true)
    }

    /// Encodes and counts an answer, and caches it when `cache`.
    fn answer_with(
        &mut self,
        request: &Authenticated<'_>,
        verdict: &Verdict,
        now: Now,
        out: &mut [u8],
        cache: bool,
    ) -> Result<Outcome, Discard> {
        let ci = request.client_id().0 as usize;
        let kind = request.kind();
        let (len, ma_offset) =
            answer::encode_unsigned(out, request, verdict).map_err(|_| Discard::AnswerTooLarge)?;
        let bytes = out.get_mut(..len).ok_or(Discard::AnswerTooLarge)?;
        let sealed_later = self.batch.defers(len, request.secret());
        if sealed_later {
            // Signed with the batch's other answers (`batch`); cached unsigned until then,
            // and never replayed before.
            let cached = if cache {
                self.dedup.complete_unsigned(
                    request,
                    bytes,
                    now.monotonic_ms,
                    answer_expiry(request, now),
                )
            } else {
                None
            };
            self.batch.push_unsigned(
                bytes,
                ma_offset,
                request.client_id(),
                request.secret_index(),
                cached,
            );
        } else {
            crate::auth::sign_response(bytes, ma_offset, request.secret());
            if cache {
                self.dedup.complete(
                    request,
                    bytes,
                    now.monotonic_ms,
                    answer_expiry(request, now),
                );
            }
        }
        if let Some(c) = self.counters.per_client.get_mut(ci) {
            count_answer(c, kind, verdict);
        }
        Ok(Outcome::Answer(Answer {
            len,
            code: answer::answer_code(kind, verdict.ack),
            error_cause: verdict.error_cause,
            sessions: verdict.sessions,
            sealed_later,
        }))
    }

    /// Marks the request in flight (its retransmissions are absorbed, never a second action)
    /// and hands it to the data plane. `Err` is the answer to send at once: NAK 506 when no
    /// more requests can be in flight or the sink's queue is full (back-pressure, never
    /// unbounded memory).
    fn hand_off(
        &mut self,
        sink: &dyn ActionSink,
        request: &Authenticated<'_>,
        operation: Operation,
        sessions: Vec<crate::session::Session>,
        destination: SocketAddr,
        now: Now,
    ) -> Result<(), Verdict> {
        let unavailable = Verdict::nak(ErrorCause::ResourcesUnavailable);
        let deadline_ms = now
            .monotonic_ms
            .saturating_add(self.config.action_deadline_ms);
        // The in-flight mark outlives the deadline: the settled answer replaces it.
        if !self.dedup.begin(
            request,
            deadline_ms.saturating_add(self.config.action_deadline_ms),
        ) {
            return Err(unavailable);
        }
        let pending = PendingRequest::new(
            Arc::clone(self.config),
            self.shard,
            request,
            operation,
            sessions,
            destination,
            now,
            deadline_ms,
            answer_expiry(request, now),
        );
        match sink.submit(pending) {
            Ok(()) => Ok(()),
            Err(_) => {
                self.dedup.abandon(request);
                Err(unavailable)
            }
        }
    }
}

/// The Acct-Session-Id of a Disconnect- or CoA-Request, read without any check (a batch
/// hint only: nothing is decided from it); `None` for anything else.
fn acct_session_id_of(datagram: &[u8]) -> Option<&[u8]> {
    let packet = Packet::parse(datagram).ok()?;
    if !matches!(packet.code(), code::DISCONNECT_REQUEST | code::COA_REQUEST) {
        return None;
    }
    packet
        .attributes()
        .map_while(Result::ok)
        .find(|a| a.ty == attr::ACCT_SESSION_ID)
        .map(|a| a.value)
}

/// Counts one answer in its client's counters.
fn count_answer(c: &mut crate::counters::ClientCounters, kind: RequestKind, verdict: &Verdict) {
    let k = kind as usize;
    if verdict.ack {
        c.acks[k] += 1;
    } else if let Some(cause) = verdict.error_cause {
        c.naks[k][cause.index()] += 1;
    }
    match kind {
        RequestKind::Disconnect => c.sessions_removed += u64::from(verdict.sessions),
        RequestKind::Coa => c.sessions_changed += u64::from(verdict.sessions),
    }
    if verdict.echo_authorize_only {
        c.authorize_only_requests += 1;
    }
}

/// How long an answer stays cached: the client's Event-Timestamp window (a copy older than
/// that is discarded by the window check anyway).
fn answer_expiry(request: &Authenticated<'_>, now: Now) -> u64 {
    let window_ms = u64::from(request.client().policy.event_timestamp_window_secs) * 1000;
    now.monotonic_ms.saturating_add(window_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::QueueFull;
    use crate::auth::{self, ResponseCheck, Secret};
    use crate::client::{Cidr, Client, ClientId};
    use crate::codec::{MAX_PACKET_LEN, Packet, PacketWriter};
    use crate::dict::{attr, code};
    use crate::store::MemoryStore;
    use std::sync::Mutex;

    const NOW: Now = Now {
        unix_secs: 1_700_000_000,
        monotonic_ms: 1_000,
    };

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn config(clients: Vec<Client>) -> Arc<EngineConfig> {
        Arc::new(EngineConfig {
            clients: ClientTable::new(clients).unwrap(),
            ..EngineConfig::default()
        })
    }

    fn client(net: &str, secret: &str, previous: Option<&str>) -> Client {
        let mut c = Client::new(net.parse::<Cidr>().unwrap(), Secret::new(secret).unwrap());
        c.previous_secret = previous.map(|p| Secret::new(p).unwrap());
        c
    }

    fn disconnect(id: u8, session: &str, secret: &str) -> Vec<u8> {
        let mut buf = [0u8; 512];
        let mut w = PacketWriter::new(&mut buf, code::DISCONNECT_REQUEST, id, &[0; 16]).unwrap();
        w.push(attr::ACCT_SESSION_ID, session.as_bytes()).unwrap();
        let p = w.finish();
        auth::sign_request(p, None, &Secret::new(secret).unwrap());
        p.to_vec()
    }

    fn check(answer: &[u8], request: &[u8], secret: &str) -> ResponseCheck {
        let a = Packet::parse(answer).unwrap();
        let r = Packet::parse(request).unwrap();
        auth::verify_response(&a, r.authenticator(), &Secret::new(secret).unwrap())
    }

    fn store() -> Arc<dyn SessionStore> {
        Arc::new(MemoryStore::with_sessions(crate::synth::sessions(1, 4)))
    }

    fn session_id(i: u64) -> String {
        crate::synth::acct_session_id(1, i)
    }

    /// RFC 5176 §3.5 / RFC 2865 §3 with two live secrets (CONFORMANCE 3.1): either verifies,
    /// and the answer's Response Authenticator is computed with the one that did.
    #[test]
    fn both_secrets_verify_and_the_answer_is_signed_with_the_verifying_one() {
        let cfg = config(vec![client("127.0.0.1", "new", Some("old"))]);
        let mut engine = Engine::new(cfg, store());
        let mut out = [0u8; MAX_PACKET_LEN];
        for (id, secret, other) in [(1, "new", "old"), (2, "old", "new")] {
            let req = disconnect(id, &session_id(id.into()), secret);
            let Outcome::Answer(a) = engine.handle(
                &req,
                addr("127.0.0.1:5000"),
                addr("127.0.0.1:3799"),
                NOW,
                &mut out,
            ) else {
                panic!("signed with {secret}: answered");
            };
            assert_eq!(a.code, code::DISCONNECT_ACK);
            assert_eq!(check(&out[..a.len], &req, secret), ResponseCheck::Valid);
            assert_eq!(
                check(&out[..a.len], &req, other),
                ResponseCheck::BadResponseAuthenticator,
                "not signed with {other}"
            );
        }
        let req = disconnect(3, &session_id(3), "neither");
        assert_eq!(
            engine.handle(
                &req,
                addr("127.0.0.1:5000"),
                addr("127.0.0.1:3799"),
                NOW,
                &mut out
            ),
            Outcome::Discard(Discard::BadRequestAuthenticator)
        );
    }

    /// Two clients, one signing every answer (a Message-Authenticator, the default) and
    /// one only when asked, the second with a previous secret too: the batch tests mix
    /// lanes with and without an HMAC and with two secrets.
    fn batch_config() -> Arc<EngineConfig> {
        let mut plain = client("127.0.0.2", "plain", Some("old-plain"));
        plain.policy.answer_message_authenticator = crate::client::AnswerSigning::WhenRequested;
        config(vec![client("127.0.0.1", "signed", None), plain])
    }

    /// A batch's worth of requests: Disconnects of known and unknown sessions (ACK and NAK,
    /// answers of two lengths), from both clients, one signed with the previous secret, one
    /// forged, one retransmitted.
    fn batch_requests() -> Vec<(Vec<u8>, SocketAddr)> {
        let (a, b) = (addr("127.0.0.1:5000"), addr("127.0.0.2:5000"));
        let mut requests = vec![
            (disconnect(1, &session_id(0), "signed"), a),
            (disconnect(2, "no-such-session", "signed"), a),
            (disconnect(3, &session_id(1), "plain"), b),
            (disconnect(4, &session_id(2), "old-plain"), b),
            (disconnect(5, "another-unknown-session-id", "plain"), b),
            (disconnect(6, &session_id(3), "not-the-secret"), a),
            (disconnect(7, "x", "signed"), a),
        ];
        requests.push(requests[2].clone());
        requests
    }

    /// Decides `requests` as one batch: begin, decide each, seal, write the sealed answers.
    /// Each outcome, and the octets each buffer would send.
    fn decide_as_a_batch(
        engine: &mut Engine,
        requests: &[(Vec<u8>, SocketAddr)],
    ) -> Vec<(Outcome, Option<Vec<u8>>)> {
        engine.begin_batch(requests.iter().map(|(r, from)| (&r[..], *from)));
        let mut bufs: Vec<[u8; MAX_PACKET_LEN]> = vec![[0; MAX_PACKET_LEN]; requests.len()];
        let outcomes: Vec<Outcome> = requests
            .iter()
            .zip(&mut bufs)
            .map(|((r, from), buf)| engine.handle(r, *from, addr("127.0.0.1:3799"), NOW, buf))
            .collect();
        engine.seal_batch();
        outcomes
            .into_iter()
            .zip(&mut bufs)
            .map(|(outcome, buf)| {
                let sent = match outcome {
                    Outcome::Answer(a) if a.sealed_later => {
                        assert!(engine.write_sealed(buf), "{outcome:?}");
                        Some(buf[..a.len].to_vec())
                    }
                    Outcome::Answer(a) => Some(buf[..a.len].to_vec()),
                    Outcome::Replay { len } => Some(buf[..len].to_vec()),
                    Outcome::Discard(_) | Outcome::Pending => None,
                };
                (outcome, sent)
            })
            .collect()
    }

    /// The batch engine API (four-lane MD5 for the Request Authenticators before the
    /// decisions and for the answers' Message- and Response Authenticators after them)
    /// sends exactly the octets one-by-one decisions send (RFC 5176 §3.4/§3.5 signatures,
    /// RFC 3579 §3.2 Message-Authenticator), for every mix of lanes: with and without a
    /// Message-Authenticator, ACK and NAK lengths, the current and the previous secret; a
    /// forged request is discarded all the same, and a retransmission in the same batch is
    /// a duplicate in flight (its answer is not signed yet), replayed signed afterwards.
    #[test]
    fn a_batch_sends_the_octets_one_by_one_decisions_send() {
        let requests = batch_requests();
        let mut one_by_one = Engine::new(batch_config(), store());
        let mut batched = Engine::new(batch_config(), store());
        let together = decide_as_a_batch(&mut batched, &requests);
        let mut out = [0u8; MAX_PACKET_LEN];
        let dup = requests.len() - 1;
        for (i, ((request, from), (outcome, sent))) in requests.iter().zip(&together).enumerate() {
            let alone = one_by_one.handle(request, *from, addr("127.0.0.1:3799"), NOW, &mut out);
            if i == dup {
                // One by one, the retransmission finds the answer and replays it.
                assert!(matches!(alone, Outcome::Replay { .. }), "{alone:?}");
                assert_eq!(*outcome, Outcome::Discard(Discard::DuplicateInFlight));
                continue;
            }
            match (alone, outcome) {
                (Outcome::Answer(x), Outcome::Answer(y)) => {
                    assert!(y.sealed_later && !x.sealed_later, "request {i}");
                    assert_eq!(Some(&out[..x.len]), sent.as_deref(), "request {i}");
                }
                (x, y) => assert_eq!(x, *y, "request {i}"),
            }
        }
        // Every answer checks with the secret its request was signed with.
        let secrets = ["signed", "signed", "plain", "old-plain", "plain"];
        for (i, secret) in secrets.into_iter().enumerate() {
            let sent = together[i].1.as_ref().expect("answered");
            assert_eq!(
                check(sent, &requests[i].0, secret),
                ResponseCheck::Valid,
                "{i}"
            );
        }
        assert_eq!(
            together[5].0,
            Outcome::Discard(Discard::BadRequestAuthenticator)
        );
        // After the batch the retransmission gets the sealed answer from the cache.
        let (request, from) = &requests[dup];
        let replay = batched.handle(request, *from, addr("127.0.0.1:3799"), NOW, &mut out);
        let Outcome::Replay { len } = replay else {
            panic!("{replay:?}");
        };
        assert_eq!(Some(&out[..len]), together[2].1.as_deref());
    }

    /// A Request Authenticator computed ahead vouches only for the octets it was computed
    /// over: a forgery that copies a batch member's Identifier and Authenticator but not its
    /// attributes is discarded (RFC 5176 §3.4), inside the batch and after it.
    #[test]
    fn a_precomputed_request_authenticator_vouches_only_for_its_own_octets() {
        let mut engine = Engine::new(batch_config(), store());
        let genuine = disconnect(9, &session_id(0), "signed");
        let mut forged = disconnect(9, &session_id(1), "not-the-secret");
        forged[4..20].copy_from_slice(&genuine[4..20]);
        let from = addr("127.0.0.1:5000");
        let batch = [(genuine.clone(), from), (forged.clone(), from)];
        engine.begin_batch(batch.iter().map(|(r, f)| (&r[..], *f)));
        let mut out = [0u8; MAX_PACKET_LEN];
        assert_eq!(
            engine.handle(&forged, from, addr("127.0.0.1:3799"), NOW, &mut out),
            Outcome::Discard(Discard::BadRequestAuthenticator),
            "the forgery, decided first"
        );
        let Outcome::Answer(a) =
            engine.handle(&genuine, from, addr("127.0.0.1:3799"), NOW, &mut out)
        else {
            panic!("the genuine request is answered");
        };
        assert_eq!(a.code, code::DISCONNECT_ACK);
        engine.seal_batch();
        assert!(engine.write_sealed(&mut out));
        assert_eq!(
            check(&out[..a.len], &genuine, "signed"),
            ResponseCheck::Valid
        );
    }

    /// `write_sealed` writes an answer only over the buffer that holds it unsigned, in the
    /// order decided; a buffer holding anything else is refused (and must not be sent).
    #[test]
    fn write_sealed_refuses_a_buffer_that_does_not_hold_the_answer() {
        let mut engine = Engine::new(batch_config(), store());
        let from = addr("127.0.0.1:5000");
        let requests: Vec<_> = (0..4u8)
            .map(|i| (disconnect(i, &session_id(i.into()), "signed"), from))
            .collect();
        engine.begin_batch(requests.iter().map(|(r, f)| (&r[..], *f)));
        let mut bufs = vec![[0u8; MAX_PACKET_LEN]; 4];
        for ((r, f), buf) in requests.iter().zip(&mut bufs) {
            let outcome = engine.handle(r, *f, addr("127.0.0.1:3799"), NOW, buf);
            assert!(
                matches!(outcome, Outcome::Answer(a) if a.sealed_later),
                "{outcome:?}"
            );
        }
        engine.seal_batch();
        let unsigned_second = bufs[1];
        assert!(
            !engine.write_sealed(&mut bufs[1]),
            "the second answer's buffer, first"
        );
        assert_eq!(bufs[1], unsigned_second, "left untouched");
        for buf in &mut bufs {
            assert!(engine.write_sealed(buf));
        }
        assert!(
            !engine.write_sealed(&mut [0u8; MAX_PACKET_LEN]),
            "none left"
        );
        for ((r, _), buf) in requests.iter().zip(&bufs) {
            let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
            assert_eq!(check(&buf[..len], r, "signed"), ResponseCheck::Valid);
        }
    }

    /// A store that records the batch hints it is given (and is otherwise `MemoryStore`).
    struct Touched {
        inner: MemoryStore,
        seen: Mutex<Vec<(Key, Vec<u8>, Touch)>>,
    }

    impl SessionStore for Touched {
        fn touch(&self, key: &PrimaryKey<'_>, step: Touch) {
            let KeyValue::Text(value) = key.value else {
                panic!("an Acct-Session-Id is text");
            };
            self.seen
                .lock()
                .unwrap()
                .push((key.key, value.to_vec(), step));
        }
        crate::store::delegate_to_memory_store!(inner);
    }

    // The batch hint reads a request's Acct-Session-Id and nothing else: it is handed to the
    // store with the step asked for, for a Disconnect and a CoA alike, whoever signed it (it
    // is read before any check, and changes nothing); a packet that does not parse, another
    // code, or a request without an Acct-Session-Id gives no hint. The decisions that follow
    // are the same as without it.
    #[test]
    fn touch_hands_the_acct_session_id_to_the_store_and_changes_nothing() {
        let touched = Arc::new(Touched {
            inner: MemoryStore::with_sessions(crate::synth::sessions(1, 4)),
            seen: Mutex::new(Vec::new()),
        });
        let store: Arc<dyn SessionStore> = touched.clone();
        let mut engine = Engine::new(config(vec![client("127.0.0.1", "s", None)]), store);
        let id = session_id(1);
        let forged = disconnect(1, &id, "not-the-secret");
        engine.touch(&forged, Touch::Index);
        let mut coa = forged.clone();
        coa[0] = code::COA_REQUEST;
        engine.touch(&coa, Touch::Record);
        let mut access = forged.clone();
        access[0] = 1;
        engine.touch(&access, Touch::Index);
        engine.touch(&forged[..10], Touch::Index);
        let mut buf = [0u8; 64];
        let mut w = PacketWriter::new(&mut buf, code::DISCONNECT_REQUEST, 2, &[0; 16]).unwrap();
        w.push(attr::USER_NAME, b"alice").unwrap();
        engine.touch(w.finish(), Touch::Index);
        assert_eq!(
            *touched.seen.lock().unwrap(),
            vec![
                (Key::AcctSessionId, id.as_bytes().to_vec(), Touch::Index),
                (Key::AcctSessionId, id.as_bytes().to_vec(), Touch::Record),
            ]
        );
        assert_eq!(touched.len(), 4, "a hint removes nothing");
        let req = disconnect(3, &id, "s");
        let mut out = [0u8; MAX_PACKET_LEN];
        let Outcome::Answer(a) = engine.handle(
            &req,
            addr("127.0.0.1:5000"),
            addr("127.0.0.1:3799"),
            NOW,
            &mut out,
        ) else {
            panic!("answered");
        };
        assert_eq!(a.code, code::DISCONNECT_ACK);
        assert_eq!(touched.len(), 3);
    }

    /// The batch hint hands the store every Acct-Session-Id of the batch in one call (the
    /// default `touch_all`: every index entry, then every record), skipping what has none,
    /// and the decisions after it are the same.
    #[test]
    fn touch_batch_hands_every_acct_session_id_of_the_batch_to_the_store_at_once() {
        let touched = Arc::new(Touched {
            inner: MemoryStore::with_sessions(crate::synth::sessions(1, 4)),
            seen: Mutex::new(Vec::new()),
        });
        let store: Arc<dyn SessionStore> = touched.clone();
        let engine = Engine::new(config(vec![client("127.0.0.1", "s", None)]), store);
        let (a, b) = (session_id(1), session_id(2));
        let mut access = disconnect(3, &a, "s");
        access[0] = 1;
        let batch = [
            disconnect(1, &a, "s"),
            access,
            disconnect(2, &b, "forged-is-fine-for-a-hint"),
            vec![0u8; 7],
        ];
        engine.touch_batch(batch.iter().map(Vec::as_slice));
        let key = |id: &str, step| (Key::AcctSessionId, id.as_bytes().to_vec(), step);
        assert_eq!(
            *touched.seen.lock().unwrap(),
            vec![
                key(&a, Touch::Index),
                key(&b, Touch::Index),
                key(&a, Touch::Record),
                key(&b, Touch::Record),
            ]
        );
        // 100 keys: two calls (64 and 36), each index entries first.
        touched.seen.lock().unwrap().clear();
        let many: Vec<Vec<u8>> = (0..100u32)
            .map(|i| disconnect(i as u8, &i.to_string(), "s"))
            .collect();
        engine.touch_batch(many.iter().map(Vec::as_slice));
        let seen = touched.seen.lock().unwrap();
        assert_eq!(seen.len(), 200);
        assert!(seen[..64].iter().all(|(_, _, s)| *s == Touch::Index));
        assert!(seen[64..128].iter().all(|(_, _, s)| *s == Touch::Record));
        assert_eq!(seen[128].1, b"64".to_vec());
        assert_eq!(touched.len(), 4, "a hint removes nothing");
    }

    struct Capture(Mutex<Vec<PendingRequest>>);

    /// Settles a one-session pending request as committed by the data plane.
    fn settle_committed(
        pending: &PendingRequest,
        store: &dyn SessionStore,
        out: &mut [u8],
    ) -> crate::action::Settled {
        pending
            .settle(
                store,
                &[Some(crate::action::SessionResult::Committed)],
                NOW,
                out,
            )
            .unwrap()
    }

    impl ActionSink for Capture {
        fn submit(&self, request: PendingRequest) -> Result<(), QueueFull> {
            self.0.lock().unwrap().push(request);
            Ok(())
        }
    }

    /// A reload while a request waits for the data plane: it is answered with the secret
    /// (and client) it verified under, and counted under its client's network.
    #[test]
    fn a_pending_request_is_settled_with_the_config_it_verified_under() {
        let before = config(vec![
            client("127.0.0.1", "old", None),
            client("10.0.0.0/8", "x", None),
        ]);
        // The new list drops the secret the request used and reorders the clients.
        let after = config(vec![
            client("10.0.0.0/8", "x", None),
            client("127.0.0.1", "new", None),
        ]);
        let sink = Arc::new(Capture(Mutex::new(Vec::new())));
        let store = store();
        let mut engine = Engine::new(before, Arc::clone(&store)).with_actions(0, sink.clone());
        let mut out = [0u8; MAX_PACKET_LEN];
        let req = disconnect(7, &session_id(1), "old");
        let src = addr("127.0.0.1:5000");
        assert_eq!(
            engine.handle(&req, src, addr("127.0.0.1:3799"), NOW, &mut out),
            Outcome::Pending
        );
        engine.set_config(after);
        let pending = sink.0.lock().unwrap().pop().unwrap();
        assert_eq!(pending.client_id(), ClientId(0));
        let settled = settle_committed(&pending, &*store, &mut out);
        assert_eq!(settled.code, code::DISCONNECT_ACK);
        let answer = out[..settled.len].to_vec();
        assert_eq!(check(&answer, &req, "old"), ResponseCheck::Valid);
        engine.settle(&settled, &answer, NOW.monotonic_ms);
        // Counted under 127.0.0.1, which is client 1 now; client 0 (10/8) saw nothing.
        let c = engine.counters();
        assert_eq!(c.per_client[1].acks[RequestKind::Disconnect as usize], 1);
        assert_eq!(
            c.per_client[1].requests[RequestKind::Disconnect as usize],
            1
        );
        assert_eq!(c.per_client[0], Default::default());
        // The new secret works for new requests; the old one no longer does.
        let fresh = disconnect(8, &session_id(2), "old");
        assert_eq!(
            engine.handle(&fresh, src, addr("127.0.0.1:3799"), NOW, &mut out),
            Outcome::Discard(Discard::BadRequestAuthenticator)
        );
    }

    /// Secret rotation with the data plane: a pending request is reopened to plan and to
    /// settle without computing its MACs again, with the secret that verified it, so one
    /// verified with the previous secret is answered signed with that one (RFC 2865 §3).
    #[test]
    fn a_pending_request_verified_with_the_previous_secret_is_answered_with_it() {
        let cfg = config(vec![client("127.0.0.1", "new", Some("old"))]);
        let sink = Arc::new(Capture(Mutex::new(Vec::new())));
        let store = store();
        let mut engine = Engine::new(cfg, Arc::clone(&store)).with_actions(0, sink.clone());
        let mut out = [0u8; MAX_PACKET_LEN];
        for (id, secret, other) in [(1u8, "old", "new"), (2, "new", "old")] {
            let req = disconnect(id, &session_id(id.into()), secret);
            assert_eq!(
                engine.handle(
                    &req,
                    addr("127.0.0.1:5000"),
                    addr("127.0.0.1:3799"),
                    NOW,
                    &mut out
                ),
                Outcome::Pending
            );
            let pending = sink.0.lock().unwrap().pop().unwrap();
            assert_eq!(pending.plan().unwrap().sessions.len(), 1);
            let settled = settle_committed(&pending, &*store, &mut out);
            assert_eq!(settled.code, code::DISCONNECT_ACK);
            let answer = &out[..settled.len];
            assert_eq!(
                check(answer, &req, secret),
                ResponseCheck::Valid,
                "{secret}"
            );
            assert_eq!(
                check(answer, &req, other),
                ResponseCheck::BadResponseAuthenticator,
                "not signed with {other}"
            );
        }
    }

    #[test]
    fn a_reload_keeps_counters_by_network_and_totals_of_removed_clients() {
        let mut engine = Engine::new(
            config(vec![
                client("127.0.0.1", "s", None),
                client("127.0.0.2", "s", None),
            ]),
            store(),
        );
        let mut out = [0u8; MAX_PACKET_LEN];
        for (id, src) in [(1u8, "127.0.0.1:1"), (2, "127.0.0.2:1"), (3, "127.0.0.2:1")] {
            let req = disconnect(id, &session_id(id.into()), "s");
            assert!(matches!(
                engine.handle(&req, addr(src), addr("127.0.0.1:3799"), NOW, &mut out),
                Outcome::Answer(_)
            ));
        }
        let total = |e: &Engine| e.counters().totals().requests[0];
        assert_eq!(total(&engine), 3);
        // 127.0.0.2 removed, 127.0.0.3 added before 127.0.0.1.
        engine.set_config(config(vec![
            client("127.0.0.3", "s", None),
            client("127.0.0.1", "s", None),
        ]));
        let c = engine.counters();
        assert_eq!(c.per_client.len(), 3);
        assert_eq!(c.per_client[0].requests[0], 0);
        assert_eq!(c.per_client[1].requests[0], 1);
        assert_eq!(
            c.per_client[2].requests[0], 2,
            "the removed client's counts"
        );
        assert_eq!(total(&engine), 3);
    }
}
