//! # dynauth-proto
//!
//! The sans-IO heart of Dynauth, a RADIUS Dynamic Authorization Server (RFC 5176): one
//! datagram, its addresses and the time go in; a silent discard with its reason, or the exact
//! answer packet, comes out, and the session changes are applied through a [`SessionStore`].
//! No sockets, no clocks, no threads, no `unsafe`: `cargo tree -p dynauth-proto` shows no
//! libc, socket2 or io-uring.
//!
//! Layers, bottom up (see `docs/ARCHITECTURE.md`):
//!
//! - [`dict`]: codes, attribute numbers, Error-Cause values.
//! - [`codec`]: checked, zero-copy packet view and the allocation-free answer writer.
//! - [`auth`]: Request/Response Authenticators and Message-Authenticator (HMAC-MD5 with the
//!   key state precomputed per secret), constant-time comparisons; [`md5x4`]: four MD5s at
//!   once, for the authenticators of a batch.
//! - [`client`]: source address to client (longest-prefix match), secrets, policy.
//! - [`session`], [`change`]: the session model, queries and matching; CoA changes.
//! - [`feed`]: the session feed's event model (Upsert, Delete, NasReset, resync) and its
//!   per-NAS ordering.
//! - [`accounting`]: RADIUS Accounting (RFC 2866) as a session feed: an Accounting-Request
//!   verified and turned into a feed event, its Accounting-Response, its duplicate cache.
//! - [`store`]: the `SessionStore` trait and a reference store
//!   (the carrier-scale one is the `dynauth-table` crate).
//! - [`synth`]: deterministic synthetic sessions (benchmarks, demo, load generator).
//! - [`counters`]: RFC 4673 counters, Prometheus text.
//! - The pipeline, one stage per module: [`verify`] (the only way to an
//!   [`verify::Authenticated`] request), [`dedup`] (the bounded duplicate cache, which accepts
//!   only authenticated requests), [`rules`] (request rules and the verdict), [`answer`] (the
//!   answer's layout and signatures), tied together by [`engine`] ([`Engine`]); [`action`]:
//!   a request that must reach the data plane, answered only after it commits.
#![forbid(unsafe_code)]

pub mod accounting;
pub mod action;
pub mod answer;
pub mod auth;
mod batch;
pub mod change;
pub mod client;
pub mod codec;
pub mod counters;
pub mod dedup;
pub mod dict;
pub mod engine;
pub mod feed;
#[doc(hidden)]
pub mod fuzzing;
pub mod md5x4;
pub mod route;
pub mod rules;
pub mod session;
pub mod store;
pub mod synth;
pub mod verify;

pub use engine::{Answer, Engine, EngineConfig, Now, Outcome};
pub use store::SessionStore;
pub use verify::Authenticated;
