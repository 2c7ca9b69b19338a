//! dynauthd, the Dynauth server: the crate that wires the pipeline together.
//!
//! A datagram's path: [`dynauth_udp`] receives a batch from the kernel, the [`runtime`] hands
//! it to this shard's [`dynauth_proto::Engine`] (verify, request rules, session decision
//! against the [`dynauth_table::SessionTable`], answer), and `dynauth_udp` sends the answers.
//!
//! - [`config`]: command line and TOML file, combined into `Settings`.
//! - [`runtime`]: shards (one pinned thread each, own SO_REUSEPORT sockets, own `Engine`),
//!   stats, metrics, shutdown.
//! - [`feed`]: the one session feed every source writes through.
//! - [`actions`]: the action dispatcher: requests that selected sessions go to the agent
//!   that owns them (or an in-process data plane) and are answered after it commits.
//! - [`state`]: `--state-dir`: the durable store (journal, snapshots, restore).
//! - [`control`]: the control socket (newline-delimited JSON over a Unix stream socket) for
//!   the gateway's agents and `dynauthctl`.
//! - [`reload`]: SIGHUP / `dynauthctl reload`: the configuration again, without a restart.
//! - [`audit`]: `--audit-log`: one JSON line per decided Disconnect or CoA.
//! - [`notify`]: systemd's `sd_notify` (READY, RELOADING, STOPPING, WATCHDOG).
//! - [`overload`]: shedding by age under overload (`--shed-after`, NAK 506 or drop) and
//!   the tombstones' size (`--tombstones`).
//!
//! Must not touch: syscalls (they are `dynauth_udp`'s) or protocol rules (`dynauth_proto`'s).
#![forbid(unsafe_code)]

pub mod accounting;
pub mod actions;
pub mod affinity;
pub mod audit;
pub mod config;
pub mod control;
pub mod feed;
pub mod notify;
pub mod overload;
pub mod reload;
pub mod router;
pub mod runtime;
pub mod state;
