//! systemd's service notification protocol (`sd_notify(3)`, `Type=notify`): `READY=1` once the
//! sockets are bound and the state is restored, `RELOADING=1` around a reload, `STOPPING=1` at
//! shutdown, and `WATCHDOG=1` at half of `$WATCHDOG_USEC`.
//!
//! Owns: reading `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace) and
//! `$WATCHDOG_USEC`/`$WATCHDOG_PID`, and sending the datagrams (std's Unix datagram socket:
//! no libsystemd). Without `$NOTIFY_SOCKET` every call does nothing. Must not touch: when the
//! server is ready (main decides), anything else of the process.
#![forbid(unsafe_code)]

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

/// Where notifications go; `None` inside when not run by systemd.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
    last_ping: Instant,
}

fn target_of(name: &str) -> Option<SocketAddr> {
    if let Some(abstract_name) = name.strip_prefix('@') {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt as _;
            return SocketAddr::from_abstract_name(abstract_name.as_bytes()).ok();
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = abstract_name;
            return None;
        }
    }
    if name.starts_with('/') {
        SocketAddr::from_pathname(name).ok()
    } else {
        None
    }
}

impl Notifier {
    /// From the environment systemd gives a `Type=notify` service.
    pub fn from_env() -> Notifier {
        let target = std::env::var("NOTIFY_SOCKET").ok().and_then(|name| {
            let addr = target_of(&name);
            if addr.is_none() {
                tracing::warn!("NOTIFY_SOCKET={name:?} is not a socket path: not notifying");
            }
            let socket = UnixDatagram::unbound()
                .map_err(|e| tracing::warn!("NOTIFY_SOCKET: cannot create a socket: {e}"))
                .ok()?;
            Some((socket, addr?))
        });
        let pid_matches = std::env::var("WATCHDOG_PID")
            .ok()
            .is_none_or(|p| p.trim() == std::process::id().to_string());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&us| us > 0 && pid_matches && target.is_some())
            .map(|us| Duration::from_micros(us / 2));
        Notifier {
            target,
            watchdog,
            last_ping: Instant::now(),
        }
    }

    /// Whether systemd is listening.
    pub fn is_active(&self) -> bool {
        self.target.is_some()
    }

    /// The watchdog ping interval (half of `$WATCHDOG_USEC`), when the watchdog is on.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends `state` (e.g. `READY=1`); failures are logged once per call, never fatal.
    pub fn notify(&self, state: &str) {
        if let Some((socket, addr)) = &self.target
            && let Err(e) = socket.send_to_addr(state.as_bytes(), addr)
        {
            tracing::warn!("sd_notify {state:?}: {e}");
        }
    }

    /// `WATCHDOG=1` when half of `$WATCHDOG_USEC` has passed since the last one.
    pub fn watchdog_tick(&mut self) {
        if let Some(every) = self.watchdog
            && self.last_ping.elapsed() >= every
        {
            self.notify("WATCHDOG=1");
            self.last_ping = Instant::now();
        }
    }
}
