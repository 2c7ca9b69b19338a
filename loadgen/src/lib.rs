//! # dynauth-loadgen
//!
//! `loadgen`, the Dynamic Authorization Client (RFC 5176) load generator: it plays the RADIUS
//! server's side and sends Disconnect-Request and CoA-Request packets to a DAS at a controlled
//! rate, verifies every answer, and reports latency honestly.
//!
//! Modules, bottom up:
//! Batched I/O (sendmmsg/recvmmsg, ppoll, thread CPU time) is `dynauth_udp::dac`: loadgen has
//! no syscall code of its own.
//! - [`ids`]: per-socket Identifier rotation (never reuse an outstanding Identifier).
//! - [`pool`]: sessions (JSON Lines or synthetic) and the requests prepared ahead of time.
//! - [`deadlines`]: a worker's timeout timers in deadline order (a FIFO plus a heap).
//! - [`worker`]: one pinned thread's send/receive/verify loop, open or closed loop.
//! - [`report`]: counters, HdrHistogram percentiles, text/JSON report, `.hgrm` file.
//! - [`series`]: the per-100 ms time series (rate, p50/p99, timeouts).
//! - [`run`]: a whole run, from flags to report.
//! - [`capacity`]: the SLO capacity search, a bisection over open-loop runs.
//! - [`echo`]: the UDP echo server used as the ceiling target.
//! - [`watch`]: the server's CPU (per thread) and the machine's steal over the measured window.
//! - [`cli`]: the clap command line.
#![forbid(unsafe_code)]

pub mod capacity;
pub mod cli;
pub mod deadlines;
pub mod echo;
pub mod ids;
pub mod pool;
pub mod report;
pub mod run;
pub mod series;
pub mod watch;
pub mod worker;

pub use cli::{Cli, Command, EchoArgs, RunArgs};
pub use report::{Report, RunReport};
pub use run::{RunError, run};
