//! dynauthd: the Dynauth server. See `docs/RUNNING.md`.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context as _;
use clap::Parser as _;
use dynauth_proto::session::{Session, SessionQuery};
use dynauth_proto::store::{Lookup, MatchScope, SessionStore};
use dynauth_proto::synth;
use dynauth_table::{SessionTable, TableConfig, load};
use dynauthd::actions;
use dynauthd::affinity::publish::{self, PublishingStore};
use dynauthd::config::{self, Cli, Command, DEMO_SECRET, DEMO_SESSIONS, DataPlaneMode};
use dynauthd::control::ControlServer;
use dynauthd::feed::SessionFeed;
use dynauthd::runtime;
use dynauthd::state;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = match &cli.command {
        Some(Command::CheckConfig { file }) => check_config(file),
        None => serve(&cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dynauthd: error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Exit status 0: a clean stop (SIGTERM/SIGINT, after the drain). These are documented in
/// docs/RUNNING.md ("Exit status").
const EXIT_FAILURE: u8 = 1;
/// A usage or configuration error (clap's usage errors exit 2 too).
const EXIT_CONFIG: u8 = 2;

/// The exit status for an error that stopped dynauthd; a journal write or fsync error at run
/// time exits 74 from the state module itself (`state::EXIT_JOURNAL_FAILED`).
fn exit_code(e: &anyhow::Error) -> u8 {
    if e.chain().any(|c| c.is::<config::ConfigError>()) {
        EXIT_CONFIG
    } else if e.chain().any(|c| c.is::<state::StateError>()) {
        u8::try_from(state::EXIT_JOURNAL_FAILED).unwrap_or(EXIT_FAILURE)
    } else {
        EXIT_FAILURE
    }
}

fn check_config(file: &std::path::Path) -> anyhow::Result<()> {
    let settings = config::check_file(file)?;
    println!(
        "{}: OK: {} client(s), listen {}, io {:?}, shards {:?}",
        file.display(),
        settings.clients.len(),
        settings
            .listen
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" "),
        settings.io,
        settings.shards,
    );
    Ok(())
}

/// Loads the session file into a fresh table: all of it or nothing, with a progress bar on a
/// terminal and the count and time at the end.
fn load_sessions(path: &std::path::Path, config: TableConfig) -> anyhow::Result<SessionTable> {
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let bar = load::progress_bar(size, std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let loaded = load::load_jsonl_file(path, config, &mut |p| {
        if let Some(bar) = &bar {
            bar.set_position(p.bytes);
        }
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let (table, report) = loaded.with_context(|| {
        format!(
            "{}: the session file was not loaded (nothing was)",
            path.display()
        )
    })?;
    tracing::info!("{}: {report}", path.display());
    Ok(table)
}

fn insert_demo_sessions(table: &SessionTable) {
    for s in synth::demo_sessions(1, DEMO_SESSIONS) {
        table.insert(s);
    }
    tracing::warn!(
        "demo mode: the shared secret is the public `{DEMO_SECRET}`; {DEMO_SESSIONS} synthetic sessions demo-1 ... demo-{DEMO_SESSIONS}"
    );
}

/// Restores the state directory (before any socket is bound: nothing is answered until the
/// state is whole), imports `--sessions FILE` (or the demo sessions) into an empty one, and
/// starts the journal. Returns the store and the shards' clock origin.
fn open_state(
    settings: &config::Settings,
    options: &state::StateOptions,
    stats: &Arc<state::StateStats>,
) -> anyhow::Result<(Arc<state::DurableStore>, std::time::Instant)> {
    use std::sync::atomic::Ordering::Relaxed;
    let window = std::time::Duration::from_millis(settings.overload.tombstones.window_ms);
    let base = state::clock_base(window);
    tracing::info!(
        "state: restoring {} (no socket is bound until the restore is done)",
        options.dir.display()
    );
    let (mut table, restored) = state::restore(options, base, stats)?;
    tracing::info!("state: {restored}");
    stats.restore_ms.store(
        u64::try_from(restored.elapsed.as_millis()).unwrap_or(u64::MAX),
        Relaxed,
    );
    stats.restored_records.store(
        restored.snapshot_sessions + restored.snapshot_tombstones + restored.journal_records,
        Relaxed,
    );
    stats
        .restore_cuts
        .store(restored.cuts.len() as u64, Relaxed);
    stats
        .restore_cut_bytes
        .store(restored.cuts.iter().map(|c| c.dropped).sum(), Relaxed);
    stats.restore_conflicts.store(restored.conflicts, Relaxed);
    let mut imported = None;
    if restored.empty {
        if let Some(path) = &settings.sessions {
            table = load_sessions(path, options.table)?;
            imported = Some(path.display().to_string());
        } else if settings.demo_sessions {
            insert_demo_sessions(&table);
            imported = Some("the demo sessions".to_string());
        }
    } else if let Some(path) = &settings.sessions {
        tracing::warn!(
            "state: {} is not empty, so --sessions {} is not imported again (it is a one-off import into an empty state; the state has every change since)",
            options.dir.display(),
            path.display()
        );
    }
    let durable =
        state::DurableStore::start(Arc::new(table), &restored, options, Arc::clone(stats))?;
    if let Some(what) = imported {
        let report = durable
            .snapshot()
            .context("writing the state directory's first snapshot")?;
        tracing::info!("state: imported {what}: {report}");
    }
    Ok((durable, base))
}

fn serve(cli: &Cli) -> anyhow::Result<()> {
    let settings = config::settings_from(cli)?;
    let engine_config = Arc::new(settings.engine_config()?);
    if let Some(router) = settings.router.clone() {
        return serve_router(cli, &settings, engine_config, router);
    }
    let state_stats = Arc::new(state::StateStats::default());
    let mut restore_metrics = None;
    let mut durable = None;
    let mut base = None;
    let table = match &settings.state {
        None => {
            let table = Arc::new(match &settings.sessions {
                Some(path) => load_sessions(path, settings.overload.table_config())?,
                None => SessionTable::new(settings.overload.table_config()),
            });
            if settings.demo_sessions {
                insert_demo_sessions(&table);
            }
            table
        }
        Some(options) => {
            // /metrics during the restore: its progress, on the address the full metrics
            // keep afterwards (nothing else is bound until the state is whole).
            if let Some(addr) = settings.metrics {
                let stats = Arc::clone(&state_stats);
                let early = runtime::RestoreMetrics::serve(
                    runtime::bind_metrics(addr)?,
                    Arc::new(move |out: &mut String| stats.write_prometheus(out)),
                )?;
                tracing::info!(
                    "state: the restore's progress on http://{}/metrics",
                    early.local_addr()
                );
                restore_metrics = Some(early);
            }
            let d = open_state(&settings, options, &state_stats)?;
            base = Some(d.1);
            let table = Arc::clone(d.0.table());
            durable = Some(d.0);
            table
        }
    };
    // For the tombstone metrics (dynauth_tombstones_evicted_total).
    let tombstone_table = Arc::clone(&table);
    if settings.nas.identifiers.is_empty() {
        tracing::info!(
            "no --nas-identifier configured: a request carrying NAS-Identifier gets NAK 403 (NAS-IP-Address / NAS-IPv6-Address default to the address a request arrived on)"
        );
    }
    let shutdown = dynauth_udp::install_shutdown_signals()
        .context("installing the SIGINT/SIGTERM handlers")?;
    let reload_requested =
        dynauth_udp::install_reload_signal().context("installing the SIGHUP handler")?;
    let mut notifier = dynauthd::notify::Notifier::from_env();
    let audit = match &settings.audit {
        Some(options) => {
            let (log, writer) = dynauthd::audit::AuditLog::start(options)?;
            tracing::info!(
                "audit log: {}",
                options
                    .path
                    .as_ref()
                    .map_or("standard output".to_string(), |p| p.display().to_string())
            );
            Some((log, writer))
        }
        None => None,
    };
    let audit_log = audit.as_ref().map(|(log, _)| Arc::clone(log));
    let clients = Arc::new(engine_config.clients.clone());
    let store: Arc<dyn SessionStore> = match &durable {
        Some(d) => Arc::clone(d) as Arc<dyn SessionStore>,
        None => Arc::clone(&table) as Arc<dyn SessionStore>,
    };
    // --affinity-redis: every change is published for the routers (after the restore, so a
    // restored table is re-published by the publisher's first walk).
    let mut affinity = None;
    let store = match &settings.affinity {
        Some(a) => {
            let (publishing, changes) =
                PublishingStore::new(store, a.owner_id.clone(), publish::QUEUE_CAPACITY);
            let walked = Arc::clone(&table);
            let walk: publish::Walk = Arc::new(move |f: &mut dyn FnMut(&Session)| {
                walked.for_each_session(|s| f(s));
            });
            affinity = Some((Arc::clone(&publishing), changes, walk));
            publishing as Arc<dyn SessionStore>
        }
        None => store,
    };
    let snapshot_stop = Arc::new(AtomicBool::new(false));
    let snapshots = match &durable {
        Some(d) => Some(
            state::spawn_snapshots(
                Arc::clone(d),
                settings
                    .state
                    .as_ref()
                    .map_or(std::time::Duration::ZERO, |s| s.snapshot_interval),
                settings
                    .state
                    .as_ref()
                    .map_or(0, |s| s.snapshot_journal_bytes),
                Arc::clone(&snapshot_stop),
            )
            .context("starting the snapshot thread")?,
        ),
        None => None,
    };
    let agents = Arc::new(actions::Agents::default());
    let action_stats = Arc::new(actions::ActionStats::default());
    let queue = (settings.data_plane == DataPlaneMode::Agent)
        .then(|| actions::channel(actions::QUEUE_CAPACITY));
    let sink = queue
        .as_ref()
        .map(|(s, _)| Arc::new(s.clone()) as Arc<dyn dynauth_proto::action::ActionSink>);
    let mut server = runtime::start_at(
        &settings,
        Arc::clone(&engine_config),
        Arc::clone(&store),
        sink,
        base,
        audit_log.clone(),
    )?;
    let reloader = Arc::new(dynauthd::reload::Reloader::new(
        cli.clone(),
        settings.clone(),
        server.config(),
    ));
    let mut publisher = None;
    let mut affinity_stats = None;
    if let (Some((publishing, changes, walk)), Some(a)) = (affinity, &settings.affinity) {
        let address = a.owner_address.unwrap_or(server.local_addrs[0]);
        let config = publish::OwnerConfig {
            settings: a.settings.clone(),
            owner_id: a.owner_id.clone(),
            address,
        };
        publisher = Some(publish::Publisher::start(config, changes, walk)?);
        tracing::info!(
            "affinity: owner {} at {address}, publishing to {}",
            a.owner_id,
            publish::redact_url(&a.settings.url)
        );
        affinity_stats = Some(publishing);
    }
    let mut dispatcher = None;
    let mut submitter = None;
    if let Some((s, inbox)) = queue {
        let delivery = server
            .take_delivery()
            .context("the runtime kept no delivery for settled answers")?;
        let setup = actions::DispatcherSetup {
            config: Arc::clone(&engine_config),
            store: Arc::clone(&store),
            agents: Arc::clone(&agents),
            in_process: None,
            delivery,
            base: server.base,
            stats: Arc::clone(&action_stats),
            submitter: s.clone(),
            audit: audit_log.clone(),
        };
        dispatcher = Some(
            actions::Dispatcher::start(setup, inbox).context("starting the action dispatcher")?,
        );
        submitter = Some(s);
        tracing::info!(
            "data plane: the agents on the control socket; a Disconnect or CoA is answered only after the owning agent commits (deadline {} ms, then NAK 506)",
            settings.action_deadline_ms
        );
    } else {
        tracing::info!(
            "data plane: the session table only (--data-plane table): a Disconnect-ACK removes the session from the table and tears nothing down"
        );
    }
    // The feed's per-NAS order and resyncs in progress as the state directory recorded
    // them: an agent's old event replayed after a restart stays ignored, and a resync
    // interrupted by the restart still sweeps what was not re-sent at its sync_end.
    let feed_memory = durable
        .as_ref()
        .map(|d| d.feed_memory())
        .unwrap_or_default();
    let feed = Arc::new(SessionFeed::with_memory(
        Arc::clone(&store),
        server.base,
        feed_memory,
    ));
    let control = match &settings.control {
        Some(config) => {
            let reader = Arc::new(move |query: &Session| {
                table.matching(&Lookup {
                    query: SessionQuery::from(query),
                    scope: MatchScope {
                        vrf: query.vrf.as_deref(),
                        max_sessions: u32::MAX,
                        tombstone_window_ms: dynauth_proto::store::NO_CLIENT_WINDOW,
                    },
                    now_ms: 0,
                })
            });
            let hook = Arc::clone(&reloader);
            let extras = dynauthd::control::ControlExtras {
                reload: Some(Arc::new(move || {
                    hook.reload()
                        .map(|done| done.to_string())
                        .map_err(|e| e.to_string())
                })),
                audit: audit_log.clone(),
            };
            let control = ControlServer::start_with(
                config,
                Arc::clone(&feed),
                reader,
                Arc::clone(&agents),
                submitter.clone(),
                extras,
            )?;
            tracing::info!(
                "control socket {} (mode {:04o})",
                control.path().display(),
                config.mode
            );
            Some(control)
        }
        None => None,
    };
    let accounting_stop = Arc::new(AtomicBool::new(false));
    let mut accounting = Vec::new();
    for &addr in &settings.accounting_listen {
        let listener = dynauthd::accounting::spawn(
            addr,
            Arc::clone(&clients),
            dynauthd::accounting::through(Arc::clone(&feed)),
            Arc::clone(&accounting_stop),
        )
        .with_context(|| format!("--accounting-listen {addr}"))?;
        tracing::info!("RADIUS Accounting on {}", listener.local_addr());
        accounting.push(listener);
    }
    if control.is_none() && accounting.is_empty() {
        tracing::info!(
            "no --control socket and no --accounting-listen: sessions come only from the session file"
        );
    }
    let addrs = server
        .local_addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    tracing::info!(
        "listening on {addrs} with {} shard(s), io {}, {} client(s)",
        server.shards,
        server.io.name(),
        settings.clients.len()
    );
    let mut extras = String::new();
    if let Some(c) = &control {
        extras = format!(" control={}", c.path().display());
    }
    for a in &accounting {
        extras.push_str(&format!(" accounting={}", a.local_addr()));
    }
    if let Some(addr) = settings.metrics {
        let feed_metrics = Arc::clone(&feed);
        let reload_metrics = Arc::clone(&reloader);
        let tombstone_table = Arc::clone(&tombstone_table);
        let mut extra: Vec<runtime::MetricsSource> = vec![
            Arc::new(move |out: &mut String| feed_metrics.write_prometheus(out)),
            Arc::new(move |out: &mut String| reload_metrics.write_prometheus(out)),
            Arc::new(move |out: &mut String| {
                dynauthd::overload::write_tombstone_prometheus(&tombstone_table, out)
            }),
        ];
        if let Some(log) = &audit_log {
            let log = Arc::clone(log);
            extra.push(Arc::new(move |out: &mut String| log.write_prometheus(out)));
        }
        if dispatcher.is_some() {
            let stats = Arc::clone(&action_stats);
            extra.push(Arc::new(move |out: &mut String| {
                stats.write_prometheus(out)
            }));
        }
        if let Some(p) = &affinity_stats {
            let p = Arc::clone(p);
            extra.push(Arc::new(move |out: &mut String| {
                p.stats().write_prometheus(out)
            }));
        }
        if durable.is_some() {
            let stats = Arc::clone(&state_stats);
            extra.push(Arc::new(move |out: &mut String| {
                stats.write_prometheus(out)
            }));
        }
        if !accounting.is_empty() {
            use dynauth_proto::accounting::AccountingStats;
            let handles: Vec<_> = accounting.iter().map(|a| a.stats_handle()).collect();
            // The accounting listeners verify with the client table they started with.
            let names: Vec<String> = clients.iter().map(|c| c.name.clone()).collect();
            extra.push(Arc::new(move |out: &mut String| {
                let mut total = AccountingStats::default();
                let mut per_client = Vec::new();
                for h in &handles {
                    total.add(&h.get());
                    h.add_per_client(&mut per_client);
                }
                total.write_prometheus(out);
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                AccountingStats::write_prometheus_per_client(&per_client, &names, out);
            }));
        }
        let bound = match restore_metrics.take() {
            Some(early) => server.serve_metrics_on(early.finish(), extra)?,
            None => server.serve_metrics(addr, extra)?,
        };
        tracing::info!("Prometheus metrics on http://{bound}/metrics");
        extras.push_str(&format!(" metrics={bound}"));
    }
    // One machine-readable line on stdout for scripts and tests.
    println!(
        "dynauthd listening {addrs} io={} shards={}{extras}",
        server.io.name(),
        server.shards
    );
    // Sockets bound, state restored, the banner out: systemd may start what depends on us.
    let totals = run_until_stopped(server, shutdown, reload_requested, &mut notifier, &reloader);
    // The shards have stopped reading. Actions already with the data plane finish (their
    // answers still go out), each bounded by its deadline; the control socket stays open
    // meanwhile, since that is where the agents report.
    drop(submitter);
    if let Some(d) = dispatcher {
        let within = std::time::Duration::from_millis(settings.action_deadline_ms)
            + std::time::Duration::from_secs(1);
        tracing::info!(
            "shutting down: letting pending actions finish (at most {} ms)",
            within.as_millis()
        );
        if !d.drain_and_stop(within) {
            tracing::warn!("shutting down: some actions did not settle in time: answered NAK 506");
        }
    }
    if let Some(c) = control {
        c.stop();
    }
    accounting_stop.store(true, std::sync::atomic::Ordering::Release);
    for a in accounting {
        a.join();
    }
    if let Some(p) = publisher {
        // After every writer: what they queued is written, then the owner key goes.
        p.stop();
    }
    snapshot_stop.store(true, std::sync::atomic::Ordering::Release);
    if let Some(t) = snapshots {
        let _ = t.join();
    }
    if let Some(d) = &durable {
        let load = |v: &std::sync::atomic::AtomicU64| v.load(std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            "state: journal: {} records, {} octets, {} fsyncs; answers waited for an fsync {} times, {} ms in all",
            load(&state_stats.records),
            load(&state_stats.bytes),
            load(&state_stats.fsyncs),
            load(&state_stats.commit_waits),
            load(&state_stats.commit_wait_ns) / 1_000_000
        );
        // Everything that wrote has stopped: a last snapshot, so the next start replays
        // nothing.
        match d.close() {
            Ok(Some(r)) => tracing::info!("state: at shutdown: {r}"),
            Ok(None) => {}
            Err(e) => tracing::error!(
                "state: the shutdown snapshot failed ({e}); the journal holds every change, the next start replays it"
            ),
        }
    }
    if let Some((_, writer)) = audit {
        writer.stop();
    }
    tracing::info!("totals: {}", totals.summary());
    println!("dynauthd totals: {}", totals.summary());
    if totals.failed_shards > 0 {
        anyhow::bail!(
            "{} shard(s) failed; see the log above",
            totals.failed_shards
        );
    }
    Ok(())
}

/// `--role router`: the shards verify and check each request as an owner would, the router
/// worker forwards it to the owner of its session and relays the answer (docs/SCALE_OUT.md).
fn serve_router(
    cli: &Cli,
    settings: &config::Settings,
    engine_config: Arc<dynauth_proto::EngineConfig>,
    router: dynauthd::router::RouterSettings,
) -> anyhow::Result<()> {
    use dynauthd::router;
    let shutdown = dynauth_udp::install_shutdown_signals()
        .context("installing the SIGINT/SIGTERM handlers")?;
    let reload_requested =
        dynauth_udp::install_reload_signal().context("installing the SIGHUP handler")?;
    let mut notifier = dynauthd::notify::Notifier::from_env();
    // A router owns no sessions: the shards never look anything up.
    let store: Arc<dyn SessionStore> = Arc::new(dynauth_proto::store::MemoryStore::default());
    let (sink, inbox) = router::channel();
    let mut server = runtime::start(
        settings,
        Arc::clone(&engine_config),
        store,
        Some(Arc::new(sink) as Arc<dyn dynauth_proto::action::ActionSink>),
    )?;
    let delivery = server
        .take_delivery()
        .context("the runtime kept no delivery for relayed answers")?;
    // SIGHUP: the clients (the DACs), their secrets and policies, as on an owner; the
    // router's own flags need a restart.
    let reloader = Arc::new(dynauthd::reload::Reloader::new(
        cli.clone(),
        settings.clone(),
        server.config(),
    ));
    let stats = Arc::new(router::RouterStats::default());
    tracing::info!(
        "role: router: affinity from {} (prefix {}), owner timeout {} ms ({:?}), {} NAS route(s)",
        dynauthd::affinity::publish::redact_url(&router.affinity.url),
        router.affinity.prefix,
        router.forward_timeout.as_millis(),
        router.on_owner_timeout,
        router.nas_routes.len()
    );
    let running = router::Router::start(
        router::RouterSetup {
            settings: router,
            delivery,
            base: server.base,
            stats: Arc::clone(&stats),
        },
        inbox,
    )
    .context("starting the router")?;
    let addrs = server
        .local_addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    let forward = running
        .forward_addrs()
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut extras = format!(" role=router forward={forward}");
    if let Some(addr) = settings.metrics {
        let s = Arc::clone(&stats);
        let r = Arc::clone(&reloader);
        let extra: Vec<runtime::MetricsSource> = vec![
            Arc::new(move |out: &mut String| s.write_prometheus(out)),
            Arc::new(move |out: &mut String| r.write_prometheus(out)),
        ];
        let bound = server.serve_metrics(addr, extra)?;
        tracing::info!("Prometheus metrics on http://{bound}/metrics");
        extras.push_str(&format!(" metrics={bound}"));
    }
    tracing::info!(
        "listening on {addrs} with {} shard(s), io {}, {} client(s)",
        server.shards,
        server.io.name(),
        settings.clients.len()
    );
    println!(
        "dynauthd listening {addrs} io={} shards={}{extras}",
        server.io.name(),
        server.shards
    );
    let totals = run_until_stopped(server, shutdown, reload_requested, &mut notifier, &reloader);
    // The shards have stopped reading; what is in flight gets its owner's answer or its
    // deadline's NAK 505 (at most --forward-timeout).
    running.stop();
    tracing::info!("totals: {}", totals.summary());
    println!("dynauthd totals: {}", totals.summary());
    if totals.failed_shards > 0 {
        anyhow::bail!(
            "{} shard(s) failed; see the log above",
            totals.failed_shards
        );
    }
    Ok(())
}

/// Tells systemd we are ready, serves until SIGINT/SIGTERM (SIGHUP reloads, watchdog pings
/// meanwhile), and tells systemd we are stopping.
fn run_until_stopped(
    server: runtime::Server,
    shutdown: &std::sync::atomic::AtomicBool,
    reload_requested: &std::sync::atomic::AtomicBool,
    notifier: &mut dynauthd::notify::Notifier,
    reloader: &dynauthd::reload::Reloader,
) -> runtime::Totals {
    notifier.notify("READY=1");
    if let Some(every) = notifier.watchdog_interval() {
        tracing::info!("systemd watchdog: a ping every {} ms", every.as_millis());
    }
    let totals = server.run_until_with(shutdown, &mut || {
        notifier.watchdog_tick();
        if reload_requested.swap(false, std::sync::atomic::Ordering::SeqCst) {
            notifier.notify("RELOADING=1");
            tracing::info!("SIGHUP: reloading the configuration");
            // Logged and counted by the reloader either way.
            let _ = reloader.reload();
            notifier.notify("READY=1");
        }
    });
    notifier.notify("STOPPING=1");
    totals
}
