//! Reloading the configuration without a restart (SIGHUP, `dynauthctl reload`): the config
//! file is read again with the command line it started with; the clients (networks, names,
//! secrets from the file, a file or the environment, `previous_secret` for a rotation),
//! their policies and the NAS identity take effect as one new `EngineConfig`, which every
//! shard picks up at the start of its next batch (no datagram is dropped; the duplicate
//! cache and the counters stay). A configuration that does not check (the error
//! `check-config` would print) is refused, logged and counted; the old one keeps running.
//! Settings that only a restart can change are logged as "needs a restart" and ignored.
//!
//! Owns: what a reload may change and the `dynauth_config_reloads_total` counters. Must not
//! touch: how settings are parsed (`config`), how shards swap (`runtime`), requests already
//! pending (each keeps the configuration it verified under).
#![forbid(unsafe_code)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::{self, Cli, ConfigError, Settings};
use crate::runtime::SharedConfig;

/// Reloads the configuration into the running shards.
pub struct Reloader {
    cli: Cli,
    /// The settings running now (those a reload may change are updated).
    running: Mutex<Settings>,
    shared: SharedConfig,
    ok: AtomicU64,
    rejected: AtomicU64,
}

/// A reload that was applied: what changed, in words, for the log and `dynauthctl reload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub clients: usize,
    /// Settings that changed in the file but need a restart (ignored).
    pub needs_restart: Vec<&'static str>,
}

impl core::fmt::Display for Reloaded {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "configuration reloaded: {} client(s)", self.clients)?;
        if !self.needs_restart.is_empty() {
            write!(
                f,
                "; changed but needs a restart (ignored until then): {}",
                self.needs_restart.join(", ")
            )?;
        }
        Ok(())
    }
}

impl Reloader {
    pub fn new(cli: Cli, running: Settings, shared: SharedConfig) -> Self {
        Reloader {
            cli,
            running: Mutex::new(running),
            shared,
            ok: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        }
    }

    /// Reads the configuration again and applies it, or refuses it (the old one stays).
    /// Either way the outcome is logged and counted.
    pub fn reload(&self) -> Result<Reloaded, ConfigError> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        match self.try_reload(&mut running) {
            Ok(done) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                for what in &done.needs_restart {
                    tracing::warn!(
                        "reload: `{what}` changed but needs a restart: ignored, the running value stays"
                    );
                }
                tracing::info!("reload: {done}");
                Ok(done)
            }
            Err(e) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    "reload: the new configuration is refused, the old one keeps running: {e}"
                );
                Err(e)
            }
        }
    }

    fn try_reload(&self, running: &mut Settings) -> Result<Reloaded, ConfigError> {
        let named = |e: ConfigError| match (e, &self.cli.config) {
            (ConfigError::Other(m), Some(path)) => {
                ConfigError::Other(format!("{}: {m}", path.display()))
            }
            (e, _) => e,
        };
        let new = config::settings_from(&self.cli).map_err(named)?;
        let mut engine = new.engine_config().map_err(named)?;
        let needs_restart = restart_only_changes(running, &new);
        // What needs a restart keeps its running value; the duplicate cache's sizing is one.
        engine.dedup = running.dedup;
        engine.action_deadline_ms = running.action_deadline_ms;
        let clients = engine.clients.len();
        running.clients = new.clients;
        running.nas = new.nas;
        self.shared.store(std::sync::Arc::new(engine));
        Ok(Reloaded {
            clients,
            needs_restart,
        })
    }

    /// `dynauth_config_reloads_total{result="ok|rejected"}`.
    pub fn write_prometheus(&self, out: &mut String) {
        use std::fmt::Write as _;
        let name = "dynauth_config_reloads_total";
        let _ = writeln!(
            out,
            "# HELP {name} Configuration reloads (SIGHUP, dynauthctl reload), by result.\n# TYPE {name} counter\n{name}{{result=\"ok\"}} {}\n{name}{{result=\"rejected\"}} {}",
            self.ok.load(Ordering::Relaxed),
            self.rejected.load(Ordering::Relaxed)
        );
    }
}

/// The settings whose change a reload cannot apply, by their config-file name.
fn restart_only_changes(old: &Settings, new: &Settings) -> Vec<&'static str> {
    // Debug text compares these plain values (no secret is among them).
    let differs =
        |a: &dyn core::fmt::Debug, b: &dyn core::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let mut changed = Vec::new();
    let fields: [(&'static str, &dyn core::fmt::Debug, &dyn core::fmt::Debug); 14] = [
        ("listen", &old.listen, &new.listen),
        ("shards", &old.shards, &new.shards),
        ("cpus", &old.cpus, &new.cpus),
        ("io", &old.io, &new.io),
        ("batch", &old.batch, &new.batch),
        ("sessions", &old.sessions, &new.sessions),
        ("recv_buffer_bytes", &old.recv_buffer, &new.recv_buffer),
        ("send_buffer_bytes", &old.send_buffer, &new.send_buffer),
        (
            "stats_interval_secs",
            &old.stats_interval_secs,
            &new.stats_interval_secs,
        ),
        ("gso", &old.gso, &new.gso),
        ("metrics", &old.metrics, &new.metrics),
        ("dedup", &old.dedup, &new.dedup),
        ("[overload] / [tombstones]", &old.overload, &new.overload),
        (
            "state_dir",
            &old.state.as_ref().map(|s| &s.dir),
            &new.state.as_ref().map(|s| &s.dir),
        ),
    ];
    for (name, a, b) in fields {
        if differs(a, b) {
            changed.push(name);
        }
    }
    changed
}
