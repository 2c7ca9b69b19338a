//! The accounting listener: RADIUS Accounting (RFC 2866) from the NASes (or a RADIUS server
//! copying it) keeps the session store up to date, with no integration on the gateway
//! ("zero-integration mode", docs/ACCOUNTING.md).
//!
//! One plain thread on one `std::net::UdpSocket`: accounting rates are far below CoA rates.
//! Each datagram is decided by [`dynauth_proto::accounting::Accounting`], its event handed to
//! the feed function, and the Accounting-Response sent only once the feed applied it; a
//! refused event gets no answer (the NAS retransmits) and is counted. Bounded: one datagram
//! at a time, the socket's receive buffer is the only queue, the duplicate cache has a fixed
//! size. Stops within [`POLL`] of the stop flag being set.
//!
//! Must not touch: protocol rules (`dynauth_proto`), configuration and the command line
//! (`config`, `main`), the CoA shards (`runtime`). Secrets never reach a log line: nothing
//! here can read one.
#![forbid(unsafe_code)]

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dynauth_proto::accounting::{
    Accepted, Accounting, AccountingStats, DEFAULT_DEDUP, Received, Refused,
};
use dynauth_proto::client::ClientTable;
use dynauth_proto::codec::MAX_PACKET_LEN;
use dynauth_proto::dedup::DedupConfig;
use dynauth_proto::feed::{FeedError, FeedOutcome, Sequenced};

use crate::feed::SessionFeed;

/// How the listener applies an event: in the server, the one [`SessionFeed`] (shared with
/// the control socket) in front of the session store ([`through`]).
pub type FeedFn = Arc<dyn Fn(Sequenced) -> Result<FeedOutcome, FeedError> + Send + Sync>;

/// How often the thread looks at the stop flag while no datagram arrives.
pub const POLL: Duration = Duration::from_millis(100);

/// The feed function of the server's one [`SessionFeed`] (shared with the control socket).
pub fn through(feed: Arc<SessionFeed>) -> FeedFn {
    Arc::new(move |event| feed.apply(event))
}

/// Counters of a running listener, readable from any thread (metrics): the totals and the
/// same per client (indexed by `ClientId` of the listener's client table).
#[derive(Debug, Clone, Default)]
pub struct StatsHandle(Arc<Mutex<(AccountingStats, Vec<AccountingStats>)>>);

impl StatsHandle {
    /// The counters as of the last datagram decided.
    pub fn get(&self) -> AccountingStats {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).0
    }

    /// Adds the per-client counters as of the last datagram decided into `into` (grown to
    /// hold every client this listener has seen), so several listeners sum into one set.
    pub fn add_per_client(&self, into: &mut Vec<AccountingStats>) {
        let guard = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if into.len() < guard.1.len() {
            into.resize(guard.1.len(), AccountingStats::default());
        }
        for (total, client) in into.iter_mut().zip(&guard.1) {
            total.add(client);
        }
    }

    /// The counters in the Prometheus text format (`dynauth_accounting_*`).
    pub fn prometheus_text(&self) -> String {
        let mut out = String::new();
        self.get().write_prometheus(&mut out);
        out
    }

    /// Publishes `accounting`'s counters after one datagram: the totals and the one client
    /// row it was counted in (a copy of two rows, whatever the number of clients; the row
    /// vector grows only the first time a client is seen).
    fn set(&self, accounting: &Accounting) {
        let mut guard = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        guard.0 = accounting.stats();
        if let Some((at, row)) = accounting.last_client_stats() {
            if guard.1.len() <= at {
                guard.1.resize(at + 1, AccountingStats::default());
            }
            if let Some(slot) = guard.1.get_mut(at) {
                *slot = row;
            }
        }
    }
}

/// A running accounting listener.
#[derive(Debug)]
pub struct Listener {
    addr: SocketAddr,
    /// This listener's own stop flag (the shared one passed to [`spawn`] is only read).
    halt: Arc<AtomicBool>,
    stats: StatsHandle,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// The bound address (the real port when spawned on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> AccountingStats {
        self.stats.get()
    }

    /// A handle on the counters that outlives borrows of the listener (for a metrics
    /// thread).
    pub fn stats_handle(&self) -> StatsHandle {
        self.stats.clone()
    }

    /// Stops this listener (the shared stop flag passed to [`spawn`] is left alone) and
    /// waits for the thread to end; returns the final counters.
    pub fn stop(mut self) -> AccountingStats {
        self.halt.store(true, Ordering::SeqCst);
        self.join_thread();
        self.stats.get()
    }

    /// Waits for the thread to end (once the shared stop flag was set elsewhere).
    pub fn join(mut self) -> AccountingStats {
        self.join_thread();
        self.stats.get()
    }

    fn join_thread(&mut self) {
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the accounting listener thread panicked");
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.halt.store(true, Ordering::SeqCst);
        self.join_thread();
    }
}

/// Binds `addr` and starts the listener thread with the default duplicate-cache size.
/// Accounting-Requests are accepted from the clients of `clients` (their secrets verify
/// them), events go to `feed`, and the thread ends within [`POLL`] once `stop` is set (or
/// [`Listener::stop`] is called, or the `Listener` is dropped).
pub fn spawn(
    addr: SocketAddr,
    clients: Arc<ClientTable>,
    feed: FeedFn,
    stop: Arc<AtomicBool>,
) -> io::Result<Listener> {
    spawn_with(addr, clients, feed, stop, DEFAULT_DEDUP)
}

/// [`spawn`] with an explicit duplicate-cache size.
pub fn spawn_with(
    addr: SocketAddr,
    clients: Arc<ClientTable>,
    feed: FeedFn,
    stop: Arc<AtomicBool>,
    duplicates: DedupConfig,
) -> io::Result<Listener> {
    let socket = UdpSocket::bind(addr)?;
    socket.set_read_timeout(Some(POLL))?;
    let local = socket.local_addr()?;
    let stats = StatsHandle::default();
    let halt = Arc::new(AtomicBool::new(false));
    let thread = {
        let (halt, stats) = (Arc::clone(&halt), stats.clone());
        std::thread::Builder::new()
            .name("dynauth-acct".into())
            .spawn(move || {
                let accounting = Accounting::new(duplicates);
                let stopped = || stop.load(Ordering::Relaxed) || halt.load(Ordering::Relaxed);
                serve(&socket, &clients, &*feed, &stopped, accounting, &stats);
            })?
    };
    tracing::info!("accounting listener on {local}");
    Ok(Listener {
        addr: local,
        halt,
        stats,
        thread: Some(thread),
    })
}

fn serve(
    socket: &UdpSocket,
    clients: &ClientTable,
    feed: &(dyn Fn(Sequenced) -> Result<FeedOutcome, FeedError> + Send + Sync),
    stopped: &dyn Fn() -> bool,
    mut accounting: Accounting,
    stats: &StatsHandle,
) {
    let epoch = Instant::now();
    let mut datagram = vec![0u8; MAX_PACKET_LEN];
    let mut answer = vec![0u8; MAX_PACKET_LEN];
    while !stopped() {
        let (len, peer) = match socket.recv_from(&mut datagram) {
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // ICMP errors of earlier sends (ECONNREFUSED) and the like: not fatal.
                tracing::debug!("accounting socket: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let now_ms = u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let bytes = datagram.get(..len).unwrap_or_default();
        let reply = match accounting.receive(bytes, peer, clients, now_ms, answer.len()) {
            Received::Refused(reason) => {
                tracing::debug!(%peer, reason = reason.name(), "accounting datagram refused");
                None
            }
            Received::Duplicate(cached) => answer.get_mut(..cached.len()).map(|slot| {
                slot.copy_from_slice(cached);
                cached.len()
            }),
            Received::Accepted(Accepted { event, request }) => {
                let applied = match event {
                    None => Ok(None),
                    Some(event) => feed(event).map(Some),
                };
                match applied {
                    Ok(outcome) => {
                        tracing::trace!(
                            %peer,
                            client = request.client_name(),
                            status = ?request.status(),
                            ?outcome,
                            "accounting event applied"
                        );
                        accounting.answer(request, &mut answer, now_ms).ok()
                    }
                    Err(e) => {
                        tracing::warn!(
                            %peer,
                            client = request.client_name(),
                            status = ?request.status(),
                            "accounting event refused by the feed, not answered: {e}"
                        );
                        accounting.refuse(request, Refused::FeedRefused);
                        None
                    }
                }
            }
        };
        if let Some(n) = reply
            && let Err(e) = socket.send_to(answer.get(..n).unwrap_or_default(), peer)
        {
            tracing::debug!(%peer, "accounting answer not sent: {e}");
        }
        stats.set(&accounting);
    }
    stats.set(&accounting);
}
