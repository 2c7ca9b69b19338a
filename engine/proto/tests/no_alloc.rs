//! The hot path allocates nothing: decode + verify + decide + encode of a Disconnect-Request
//! (with and without Message-Authenticator), including the duplicate cache and the removal,
//! runs with zero heap allocations once the engine is warm (house rule: no allocation per
//! packet). A counting global allocator makes that measurable.

mod common;

/// The store the shared test support runs the engine over (see `common`).
#[allow(dead_code)]
type StoreUnderTest = dynauth_proto::store::MemoryStore;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::*;
use dynauth_proto::client::ClientPolicy;
use dynauth_proto::dict::{attr, code};
use dynauth_proto::{Now, Outcome};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to the system allocator unchanged; counting has no effect on
// the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The counter is global: tests that count take turns.
static TURNS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn count<T>(f: impl FnOnce() -> T) -> (T, usize) {
    ALLOCATIONS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    let out = f();
    COUNTING.store(false, Ordering::SeqCst);
    (out, ALLOCATIONS.load(Ordering::SeqCst))
}

#[test]
fn disconnect_request_path_allocates_nothing() {
    let _turn = TURNS.lock().unwrap_or_else(|p| p.into_inner());
    let sessions: Vec<_> = (0..8).map(|i| session(&format!("sess-{i}"))).collect();
    let mut f = Fixture::new(ClientPolicy::default(), vec![]);
    // Table-only mode (the table is the data plane): the hand-off of an action to an agent
    // copies the request and is out of scope here.
    let config = std::sync::Arc::new(f.engine.config().clone());
    let store = std::sync::Arc::new(dynauth_proto::store::MemoryStore::with_sessions(sessions));
    f.engine = dynauth_proto::Engine::new(config, store);
    // Warm-up: the first removal grows the tombstone list once.
    let warm = request(
        code::DISCONNECT_REQUEST,
        1,
        &[(attr::ACCT_SESSION_ID, b"sess-0")],
        false,
    );
    let now = NOW;
    f.engine
        .handle(&warm, source(), destination(), now, &mut f.out);

    let cases = [
        (
            request(
                code::DISCONNECT_REQUEST,
                2,
                &[(attr::ACCT_SESSION_ID, b"sess-1")],
                false,
            ),
            code::DISCONNECT_ACK,
        ),
        (
            request(
                code::DISCONNECT_REQUEST,
                3,
                &[
                    (attr::ACCT_SESSION_ID, b"sess-2"),
                    (attr::PROXY_STATE, b"ps"),
                ],
                true,
            ),
            code::DISCONNECT_ACK,
        ),
        (
            request(
                code::DISCONNECT_REQUEST,
                4,
                &[(attr::ACCT_SESSION_ID, b"no-such")],
                true,
            ),
            code::DISCONNECT_NAK,
        ),
    ];
    for (packet, expected) in &cases {
        let (outcome, allocations) = count(|| {
            f.engine
                .handle(packet, source(), destination(), now, &mut f.out)
        });
        assert!(
            matches!(outcome, Outcome::Answer(a) if a.code == *expected),
            "{outcome:?}"
        );
        assert_eq!(allocations, 0, "allocations on the Disconnect path");
    }
    // A retransmission (answered from the duplicate cache) and a discard allocate nothing either.
    let (outcome, allocations) = count(|| {
        f.engine
            .handle(&cases[0].0, source(), destination(), now, &mut f.out)
    });
    assert!(matches!(outcome, Outcome::Replay { .. }));
    assert_eq!(allocations, 0);
    let mut bad = cases[0].0.clone();
    bad[5] ^= 1;
    let (outcome, allocations) = count(|| {
        f.engine
            .handle(&bad, source(), destination(), Now { ..now }, &mut f.out)
    });
    assert!(matches!(outcome, Outcome::Discard(_)));
    assert_eq!(allocations, 0);
    // The counter can fail: an allocation inside `count` is seen.
    let (_, seen) = count(|| vec![0u8; 64]);
    assert_eq!(seen, 1);
}

/// The batch engine API (four-lane MD5 before and after the decisions,
/// docs/ARCHITECTURE.md "A receive batch") allocates nothing per batch once its buffers have
/// grown to a batch's size.
#[test]
fn a_batch_of_disconnects_allocates_nothing_once_warm() {
    let _turn = TURNS.lock().unwrap_or_else(|p| p.into_inner());
    let sessions: Vec<_> = (0..64).map(|i| session(&format!("sess-{i}"))).collect();
    let mut f = Fixture::new(ClientPolicy::default(), vec![]);
    let config = std::sync::Arc::new(f.engine.config().clone());
    let store = std::sync::Arc::new(dynauth_proto::store::MemoryStore::with_sessions(sessions));
    f.engine = dynauth_proto::Engine::new(config, store);
    let batch = |first: u8| -> Vec<Vec<u8>> {
        (first..first + 8)
            .map(|i| {
                let id = format!("sess-{i}");
                request(
                    code::DISCONNECT_REQUEST,
                    i,
                    &[(attr::ACCT_SESSION_ID, id.as_bytes())],
                    i % 2 == 0,
                )
            })
            .collect()
    };
    let mut outs = vec![[0u8; 4096]; 8];
    let mut run = |engine: &mut dynauth_proto::Engine, requests: &[Vec<u8>]| -> usize {
        engine.begin_batch(requests.iter().map(|r| (&r[..], source())));
        let mut later = 0;
        for (r, out) in requests.iter().zip(&mut outs) {
            if let Outcome::Answer(a) = engine.handle(r, source(), destination(), NOW, out) {
                later += usize::from(a.sealed_later);
            }
        }
        engine.seal_batch();
        for out in &mut outs[..later] {
            assert!(engine.write_sealed(out));
        }
        later
    };
    // Warm-up: the batch buffers grow once, the store's tombstone list (8 more per batch)
    // to a capacity of 32.
    for first in [0, 8, 16] {
        run(&mut f.engine, &batch(first));
    }
    let fourth = batch(24);
    let (sealed, allocations) = count(|| run(&mut f.engine, &fourth));
    assert_eq!(sealed, 8, "every answer of the batch was signed in lanes");
    assert_eq!(allocations, 0, "allocations on the batch path");
}
