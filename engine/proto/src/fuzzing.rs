//! Support for the cargo-fuzz target (`engine/proto/fuzz`) and its corpus replay test: one function
//! that runs arbitrary bytes through every decoder and the whole decision path. Not part of
//! the public API.
//!
//! Owns: the fixed engine the fuzzer drives (one client at 127.0.0.1 with secret
//! `fuzz-secret`, a few sessions, every policy switch that widens the reachable code).
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::sync::Arc;

use crate::auth::Secret;
use crate::client::{Client, ClientTable, NasIdentity};
use crate::codec::{MAX_PACKET_LEN, Packet};
use crate::engine::{Engine, EngineConfig, Now, Outcome};
use crate::store::{AcceptAll, MemoryStore};

/// The secret of the fuzzing client (corpus files signed with it reach the decisions).
pub const FUZZ_SECRET: &str = "fuzz-secret";

thread_local! {
    static ENGINE: RefCell<Engine> = RefCell::new(engine());
}

fn engine() -> Engine {
    let client = Client::new(
        "127.0.0.1/32".parse().expect("valid CIDR"),
        Secret::new(FUZZ_SECRET).expect("non-empty"),
    );
    let config = EngineConfig {
        clients: ClientTable::new([client]).expect("one client"),
        nas: NasIdentity {
            identifiers: vec!["bng-1".into()],
            ..NasIdentity::default()
        },
        dedup: crate::dedup::DedupConfig {
            max_entries: 64,
            arena_bytes: 16 << 10,
            max_in_flight: 8,
        },
    };
    let store = MemoryStore::with_sessions(crate::synth::demo_sessions(1, 4));
    Engine::new(Arc::new(config), Arc::new(store), Arc::new(AcceptAll))
}

/// Runs `data` through the decoders and the engine twice: as it is, and re-signed with
/// [`FUZZ_SECRET`] (Request Authenticator and any Message-Authenticator), so that mutated
/// attributes get past authentication and reach the decisions. Panics only on a broken
/// invariant.
pub fn decode_and_decide(data: &[u8]) {
    decide_once(data);
    let Ok(packet) = Packet::parse(data) else {
        return;
    };
    let mut ma_offset = None;
    for attribute in packet.attributes().flatten() {
        if let Some(vsa) = attribute.vendor_specific() {
            for _ in vsa.sub_attributes() {}
        }
        if attribute.ty == crate::dict::attr::MESSAGE_AUTHENTICATOR && attribute.value.len() == 16 {
            ma_offset.get_or_insert(attribute.value_offset());
        }
    }
    let mut signed = [0u8; MAX_PACKET_LEN];
    let Some(copy) = signed.get_mut(..packet.length()) else {
        return;
    };
    copy.copy_from_slice(packet.bytes());
    let secret = Secret::new(FUZZ_SECRET).expect("non-empty");
    crate::auth::sign_request(copy, ma_offset, &secret);
    decide_once(copy);
}

fn decide_once(data: &[u8]) {
    ENGINE.with(|engine| {
        let mut out = [0u8; MAX_PACKET_LEN];
        let now = Now {
            unix_secs: 1_795_263_234,
            monotonic_ms: 1_000,
        };
        let outcome = engine.borrow_mut().handle(
            data,
            "127.0.0.1:40000".parse().expect("valid address"),
            "127.0.0.1:3799".parse().expect("valid address"),
            now,
            &mut out,
        );
        if let Outcome::Answer(a) = outcome {
            let answer = Packet::parse(out.get(..a.len).unwrap_or_default());
            assert!(answer.is_ok(), "every answer is a well-formed packet");
        }
    });
}
