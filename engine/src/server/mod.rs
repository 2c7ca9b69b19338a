//! dynauthd, the server around the engine: configuration and the
//! shard-per-core UDP runtime with its two I/O backends.
//!
//! - [`config`]: command line and TOML file, combined into `Settings`. Sessions are loaded by
//!   [`crate::table::load`] into the carrier-scale [`crate::table::SessionTable`].
//! - [`runtime`]: shards (one pinned thread each, own SO_REUSEPORT sockets, own `Engine`),
//!   stats, shutdown.
//! - [`sys`]: the only module with `unsafe`: sockets, recvmmsg/sendmmsg, io_uring, signals.

#![deny(unsafe_code)]

pub mod config;
pub mod runtime;
pub mod sys;
