//! Running the suite: preparing the sessions, starting each target in turn, a warm-up, the
//! closed-loop repetitions, the open-loop sweep, the server's CPU over each run, the busy
//! checks, and stopping it. Owns: the order of work and what is recorded per run. Must not
//! touch: report layout, charts.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cli::Plan;
use crate::freeradius;
use crate::loadgen::{self, Load, LoadgenRun};
use crate::machine::{self, CpuTimes, Machine};
use crate::results::{
    Guards, Measurement, Results, SCHEMA_VERSION, Settings, SweepPoint, TargetKind, TargetResult,
};
use crate::server::{self, Server, ServerError, ServerSpec};
use crate::stats::{Summary, sweep_rates};

#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    #[error(
        "loadgen not found at {0}: build it first (`cargo build --release -p dynauth-loadgen`) or pass --loadgen PATH"
    )]
    NoLoadgen(PathBuf),
    #[error("creating the temporary directory {path}: {source}")]
    TempDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Loadgen(#[from] loadgen::LoadgenError),
    #[error(transparent)]
    Machine(#[from] machine::MachineError),
}

/// Binaries the suite runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub loadgen: PathBuf,
    /// None: not found (the dynauthd targets are skipped with a note).
    pub dynauthd: Option<PathBuf>,
    pub freeradius: Option<PathBuf>,
    pub taskset: Option<PathBuf>,
}

/// The directory of the running binary (target/<profile>/), where cargo puts loadgen and
/// dynauthd too.
pub fn sibling(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let p = dir.join(name);
    if machine::is_executable(&p) {
        return Some(p);
    }
    // Test executables live in target/<profile>/deps.
    let p = dir.parent()?.join(name);
    machine::is_executable(&p).then_some(p)
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, SuiteError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let p = std::env::temp_dir().join(format!("bench-harness-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).map_err(|source| SuiteError::TempDir {
            path: p.display().to_string(),
            source,
        })?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One target configuration to measure.
#[derive(Debug, Clone)]
struct TargetPlan {
    result: TargetResult,
}

/// The targets in order: the ceiling, dynauthd's variants, FreeRADIUS.
fn target_plans(plan: &Plan) -> Vec<TargetPlan> {
    let mut v = Vec::new();
    let wants = |t: &str| plan.targets.iter().any(|x| x == t);
    if wants("echo") {
        let mut r = TargetResult::new("echo", TargetKind::Echo);
        r.primary = true;
        v.push(TargetPlan { result: r });
    }
    if wants("dynauthd") {
        let max_shards = plan.shards.iter().copied().max().unwrap_or(1);
        for io in &plan.io {
            let mut variants: Vec<(usize, usize)> =
                plan.shards.iter().map(|&s| (s, plan.main_batch)).collect();
            for &b in &plan.batches {
                if b != plan.main_batch {
                    variants.push((max_shards, b));
                }
            }
            for (shards, batch) in variants {
                let mut r = TargetResult::new(
                    format!("dynauthd-{io}-s{shards}-b{batch}"),
                    TargetKind::Dynauthd,
                );
                r.io = Some(io.clone());
                r.shards = Some(shards);
                r.batch = Some(batch);
                r.primary = plan.sweep_all || (shards == max_shards && batch == plan.main_batch);
                v.push(TargetPlan { result: r });
            }
        }
    }
    if wants("freeradius") {
        let mut r = TargetResult::new("freeradius", TargetKind::Freeradius);
        r.primary = true;
        v.push(TargetPlan { result: r });
    }
    v
}

/// Everything a run of the suite needs.
pub struct Suite {
    pub plan: Plan,
    pub bins: Binaries,
    pub guards: Guards,
    machine: Machine,
    clk_tck: f64,
    warnings: Vec<String>,
}

fn say(msg: &str) {
    eprintln!("bench-harness: {msg}");
}

impl Suite {
    pub fn new(plan: Plan, bins: Binaries) -> Suite {
        let machine = Machine::detect();
        Suite {
            plan,
            bins,
            guards: Guards::default(),
            clk_tck: machine::clock_ticks(),
            machine,
            warnings: Vec::new(),
        }
    }

    fn warn(&mut self, msg: String) {
        say(&format!("WARNING: {msg}"));
        self.warnings.push(msg);
    }

    /// Runs every target and returns the results.
    pub fn run(mut self) -> Result<Results, SuiteError> {
        if !machine::is_executable(&self.bins.loadgen) {
            return Err(SuiteError::NoLoadgen(self.bins.loadgen.clone()));
        }
        let started_utc = machine::utc_now();
        let cores = self.machine.logical_cpus as f64;
        let load1 = self.machine.load_average[0];
        if load1 > cores * 0.5 {
            self.warn(format!(
                "the machine is busy before the run: load average {load1:.2} on {} CPUs; figures will be lower and noisier than on a quiet machine",
                self.machine.logical_cpus
            ));
        }
        if self
            .plan
            .server_cpus
            .iter()
            .any(|c| self.plan.loadgen_cpus.contains(c))
        {
            self.warn(format!(
                "server CPUs {:?} and loadgen CPUs {:?} overlap: the two compete for the same cores",
                self.plan.server_cpus, self.plan.loadgen_cpus
            ));
        }
        if self.bins.taskset.is_none() {
            self.warn(
                "taskset not found: only the threads that dynauthd, the echo server and loadgen pin themselves are pinned; FreeRADIUS runs unpinned".into(),
            );
        }
        for (name, path) in [
            ("loadgen", Some(self.bins.loadgen.clone())),
            ("dynauthd", self.bins.dynauthd.clone()),
        ] {
            if let Some(p) = path.filter(|p| is_debug_build(p)) {
                let msg = format!(
                    "{name} is a debug build ({}): its figures measure unoptimised code; build with --release",
                    p.display()
                );
                self.warn(msg);
            }
        }
        let tmp = TempDir::new()?;
        // Written once per suite, for the servers (each loads it once when it starts); the
        // loadgen runs generate the same sessions in memory (`--synthetic N --seed S`), so
        // no run of a sweep reads or parses it.
        let sessions_file = tmp.0.join("sessions.jsonl");
        say(&format!(
            "writing {} synthetic sessions (seed {})",
            self.plan.sessions, self.plan.seed
        ));
        loadgen::write_sessions(
            &self.bins.loadgen,
            self.plan.sessions,
            self.plan.seed,
            &sessions_file,
        )?;

        let mut programs = std::collections::BTreeMap::new();
        programs.insert(
            "loadgen".to_string(),
            machine::program_version(&self.bins.loadgen, "--version"),
        );
        if let Some(d) = &self.bins.dynauthd {
            programs.insert(
                "dynauthd".to_string(),
                machine::program_version(d, "--version"),
            );
        }
        if let Some(f) = &self.bins.freeradius {
            programs.insert("FreeRADIUS".to_string(), machine::program_version(f, "-v"));
        }
        let plans = target_plans(&self.plan);
        let total = plans.len();
        let mut targets = Vec::new();
        let mut uring_unavailable: Option<String> = None;
        for (i, tp) in plans.into_iter().enumerate() {
            let mut r = tp.result;
            say(&format!("[{}/{total}] {}", i + 1, r.label()));
            if let Some(reason) = self.skip_reason(&r, uring_unavailable.as_deref()) {
                say(&format!("  skipped: {reason}"));
                r.skipped = Some(reason);
                targets.push(r);
                continue;
            }
            let spec = match self.spec_for(&r, &sessions_file, &tmp.0) {
                Ok(s) => s,
                Err(reason) => {
                    say(&format!("  skipped: {reason}"));
                    r.skipped = Some(reason);
                    targets.push(r);
                    continue;
                }
            };
            r.busy_before_cores =
                machine::busy_cores(Duration::from_millis(300), self.machine.logical_cpus)?;
            if r.busy_before_cores > self.guards.other_cpu_cores {
                let msg = format!(
                    "{}: the machine was busy just before it started ({:.2} cores in use)",
                    r.label(),
                    r.busy_before_cores
                );
                self.warn(msg);
            }
            let mut server = match spec.0.start() {
                Ok(s) => s,
                Err(e) => {
                    let reason = start_failure(&r, &e);
                    if r.io.as_deref() == Some("uring") && e.output().contains("io_uring") {
                        uring_unavailable = Some(reason.clone());
                    }
                    say(&format!("  skipped: {reason}"));
                    r.skipped = Some(reason);
                    targets.push(r);
                    continue;
                }
            };
            if let Err(e) = self.measure(&mut r, &mut server, spec.1, &tmp.0) {
                let msg = format!("{}: measurement stopped: {e}", r.label());
                r.notes.push(msg.clone());
                self.warn(msg);
            }
            server.stop();
            targets.push(r);
        }
        Ok(Results {
            schema_version: SCHEMA_VERSION,
            machine: self.machine.clone(),
            settings: Settings {
                quick: self.plan.quick,
                duration_ms: self.plan.duration_ms,
                repetitions: self.plan.repetitions,
                fractions: self.plan.fractions.clone(),
                window: self.plan.window,
                sessions: self.plan.sessions,
                seed: self.plan.seed,
                mix: self.plan.mix.clone(),
                server_cpus: self.plan.server_cpus.clone(),
                loadgen_cpus: self.plan.loadgen_cpus.clone(),
                loadgen_threads: self.plan.loadgen_cpus.len().max(1),
                source_ports: self.plan.source_ports,
                pinned_with_taskset: self.bins.taskset.is_some(),
                guards: self.guards,
                programs,
                notes: self.plan.notes.clone(),
            },
            started_utc,
            finished_utc: machine::utc_now(),
            targets,
            warnings: self.warnings,
        })
    }

    fn skip_reason(&self, r: &TargetResult, uring_unavailable: Option<&str>) -> Option<String> {
        match r.kind {
            TargetKind::Echo => None,
            TargetKind::Dynauthd if self.bins.dynauthd.is_none() => Some(
                "dynauthd binary not found (build it with `cargo build --release -p dynauthd --bin dynauthd` or pass --dynauthd PATH)".into(),
            ),
            TargetKind::Dynauthd => match (r.io.as_deref(), uring_unavailable) {
                (Some("uring"), Some(reason)) => Some(reason.to_string()),
                _ => None,
            },
            TargetKind::Freeradius if self.bins.freeradius.is_none() => Some(
                "FreeRADIUS is not installed (Debian/Ubuntu: `apt-get install freeradius`; or pass --freeradius PATH): no comparison with it in this run".into(),
            ),
            TargetKind::Freeradius => None,
        }
    }

    /// The server's spec, its address, and whether loadgen expects echoes.
    fn spec_for(
        &self,
        r: &TargetResult,
        sessions: &Path,
        tmp: &Path,
    ) -> Result<(ServerSpec, (SocketAddr, bool)), String> {
        let port = server::free_port().map_err(|e| e.to_string())?;
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        let cpus = &self.plan.server_cpus;
        let spec = match r.kind {
            TargetKind::Echo => (ServerSpec::echo(&self.bins.loadgen, addr, cpus), true),
            TargetKind::Dynauthd => {
                let program = self.bins.dynauthd.as_ref().ok_or("no dynauthd")?;
                (
                    ServerSpec::dynauthd(
                        program,
                        addr,
                        &self.plan.secret,
                        sessions,
                        r.io.as_deref().unwrap_or("mmsg"),
                        r.shards.unwrap_or(1),
                        r.batch.unwrap_or(64),
                        cpus,
                    ),
                    false,
                )
            }
            TargetKind::Freeradius => {
                let program = self.bins.freeradius.as_ref().ok_or("no FreeRADIUS")?;
                let dir = tmp.join("freeradius");
                let n =
                    freeradius::write_config(&dir, addr, &self.plan.secret, cpus.len(), sessions)
                        .map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("no Acct-Session-Id in the sessions file".into());
                }
                (ServerSpec::freeradius(program, &dir, cpus), false)
            }
        };
        let (s, echo) = spec;
        Ok((s.with_taskset(self.bins.taskset.clone()), (addr, echo)))
    }

    fn loadgen_run(
        &self,
        target: SocketAddr,
        echo: bool,
        load: Load,
        duration_ms: u64,
    ) -> LoadgenRun {
        LoadgenRun {
            program: self.bins.loadgen.clone(),
            taskset: self.bins.taskset.clone(),
            target,
            secret: self.plan.secret.clone(),
            sessions: self.plan.sessions,
            seed: self.plan.seed,
            mix: self.plan.mix.clone(),
            cpus: self.plan.loadgen_cpus.clone(),
            threads: self.plan.loadgen_cpus.len().max(1),
            duration_ms,
            timeout_ms: self.plan.timeout_ms,
            echo,
            load,
            histogram_file: None,
            source_ports: self.plan.source_ports,
            server_pid: None,
        }
    }

    /// One loadgen run. The server's CPU per answer is loadgen's `--server-pid` figure: its
    /// threads' CPU over loadgen's measured window only. The busy guard compares the
    /// machine's CPU with the server's and loadgen's whole processes over the whole run.
    fn measure_once(&self, server: &mut Server, run: &LoadgenRun) -> Result<Measurement, String> {
        let mut run = run.clone();
        run.server_pid = Some(server.pid());
        let shards0 = server.shard_answers();
        let s0 = server.cpu_ticks().map_err(|e| e.to_string())?;
        let m0 = CpuTimes::now().map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let report = run.run().map_err(|e| e.to_string())?;
        let wall = t0.elapsed().as_secs_f64().max(1e-3);
        let m1 = CpuTimes::now().map_err(|e| e.to_string())?;
        let s1 = server.cpu_ticks().map_err(|e| e.to_string())?;
        if !server.alive() {
            return Err(format!(
                "the server exited during the run:\n{}",
                server.last_output(20)
            ));
        }
        if report.server_cpu.is_none() {
            return Err("loadgen could not read the server's CPU over its window".into());
        }
        let server_process_s = s1.saturating_sub(s0) as f64 / self.clk_tck;
        // user + nice + system only: interrupt time is charged to tasks by tick accounting
        // but not with CONFIG_IRQ_TIME_ACCOUNTING; leaving it out can only under-count others
        // (by the loopback's softirq share), never flag a quiet machine as busy.
        let machine_s = m1.process.saturating_sub(m0.process) as f64 / self.clk_tck;
        let loadgen_s = report.generator.process_user_s + report.generator.process_system_s;
        let other = ((machine_s - server_process_s - loadgen_s) / wall).max(0.0);
        let mut m = Measurement::from_report(&report, self.clk_tck, other, &self.guards);
        // Shards publish their counters every 250 ms: wait for the run's last ones.
        if let Some(before) = shards0 {
            std::thread::sleep(std::time::Duration::from_millis(300));
            if let Some(after) = server.shard_answers() {
                m.shard_answers = after
                    .iter()
                    .zip(before.iter().chain(std::iter::repeat(&0)))
                    .map(|(a, b)| a.saturating_sub(*b))
                    .collect();
            }
        }
        Ok(m)
    }

    fn measure(
        &self,
        r: &mut TargetResult,
        server: &mut Server,
        addr_echo: (SocketAddr, bool),
        tmp: &Path,
    ) -> Result<(), String> {
        let (addr, echo) = addr_echo;
        let p = &self.plan;
        // Warm-up (not recorded): thread pools, caches, the session table's pages.
        let warm = (p.duration_ms / 3).clamp(100, 1000);
        let _ = self.measure_once(
            server,
            &self.loadgen_run(addr, echo, Load::Window(p.window), warm),
        )?;
        for rep in 0..p.repetitions {
            let m = self.measure_once(
                server,
                &self.loadgen_run(addr, echo, Load::Window(p.window), p.duration_ms),
            )?;
            say(&format!(
                "  closed loop {}/{}: {:.0} answers/s, p99 {:.0} µs, server CPU {} ns/answer (steal {:.1}%) {}",
                rep + 1,
                p.repetitions,
                m.achieved_rps,
                m.latency.p99_us,
                m.server_cpu_ns_per_answer
                    .map_or("-".into(), |c| format!("{c:.0}")),
                m.steal_share.unwrap_or(0.0) * 100.0,
                crate::results::marks(&m.flags)
            ));
            r.closed.push(m);
        }
        if !r.primary {
            return Ok(());
        }
        // Fractions of the server's maximum, or of what the generator reached when it was
        // the bottleneck (the echo ceiling, usually): a lower bound of the server's.
        let Some(max) = r
            .max_rps()
            .or_else(|| r.generator_bound_rps())
            .map(|s: Summary| s.median)
            .filter(|m| *m > 0.0)
        else {
            return Err("no answers in closed loop: nothing to sweep".into());
        };
        let half = p
            .fractions
            .iter()
            .copied()
            .min_by(|a, b| (a - 0.5).abs().total_cmp(&(b - 0.5).abs()));
        for (fraction, rate) in p.fractions.iter().zip(sweep_rates(max, &p.fractions)) {
            let mut point = SweepPoint {
                fraction: *fraction,
                offered_rps: rate,
                runs: Vec::new(),
            };
            for rep in 0..p.repetitions {
                let mut run = self.loadgen_run(addr, echo, Load::Rate(rate), p.duration_ms);
                let hgrm = tmp.join(format!("{}-{fraction}.hgrm", r.id));
                let want_hgrm = rep == 0 && Some(*fraction) == half;
                if want_hgrm {
                    run.histogram_file = Some(hgrm.clone());
                }
                let m = self.measure_once(server, &run)?;
                say(&format!(
                    "  open loop {:.0}% ({rate:.0}/s) {}/{}: {:.0} answers/s, p50 {:.0} µs, p99 {:.0} µs {}",
                    fraction * 100.0,
                    rep + 1,
                    p.repetitions,
                    m.achieved_rps,
                    m.latency.p50_us,
                    m.latency.p99_us,
                    crate::results::marks(&m.flags)
                ));
                point.runs.push(m);
                if want_hgrm {
                    match loadgen::read_hgrm(&hgrm) {
                        Ok(d) => r.half_load_distribution = d,
                        Err(e) => r.notes.push(format!("half-load distribution: {e}")),
                    }
                }
            }
            r.sweep.push(point);
        }
        if let Some(slo_p99_ms) = p.slo_p99_ms {
            // Up to twice the closed-loop maximum: open loop can exceed it a little, and
            // passing the maximum ends the search ("at least").
            let run = self.loadgen_run(
                addr,
                echo,
                Load::Capacity {
                    slo_p99_ms,
                    slo_loss: p.slo_loss,
                    max_rps: max * 2.0,
                },
                p.duration_ms.min(2000),
            );
            match run.run_capacity() {
                Ok(c) => {
                    say(&format!(
                        "  SLO capacity (p99 < {slo_p99_ms} ms, loss < {}%): {} ({:?}, {} steps)",
                        p.slo_loss * 100.0,
                        c.capacity_rps
                            .map_or("none".into(), |v| format!("{v:.0}/s")),
                        c.outcome,
                        c.steps.len()
                    ));
                    r.capacity = Some(crate::results::Capacity {
                        slo_p99_ms,
                        slo_loss: p.slo_loss,
                        capacity_rps: c.capacity_rps,
                        outcome: serde_json::to_value(c.outcome)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default(),
                        first_failing_rps: c.first_failing_rps,
                        steps: c.steps.len(),
                    });
                }
                Err(e) => r.notes.push(format!("SLO capacity search: {e}")),
            }
        }
        Ok(())
    }
}

/// A binary from cargo's debug profile (a `debug` directory in its path).
pub fn is_debug_build(path: &Path) -> bool {
    path.components().any(|c| c.as_os_str() == "debug")
}

/// Why a server did not start, in one paragraph for the report.
fn start_failure(r: &TargetResult, e: &ServerError) -> String {
    let out = e.output();
    let last = out
        .lines()
        .rev()
        .find(|l| l.contains("error") || l.contains("Error") || l.contains("io_uring"))
        .or_else(|| out.lines().last())
        .unwrap_or("")
        .trim()
        .to_string();
    if r.io.as_deref() == Some("uring") && out.contains("io_uring") {
        format!("dynauthd reports io_uring unavailable here: {last}")
    } else if last.is_empty() {
        format!("{} did not start: {e}", r.label())
    } else {
        format!("{} did not start: {last}", r.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::Parser;

    fn plan(args: &[&str]) -> Plan {
        let mut v = vec!["bench-harness"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v)
            .unwrap()
            .run
            .plan(&[0, 1, 2, 3, 4])
            .unwrap()
    }

    #[test]
    fn targets_cover_backends_shards_and_batches_with_one_swept_per_backend() {
        let t = target_plans(&plan(&[]));
        let ids: Vec<&str> = t.iter().map(|t| t.result.id.as_str()).collect();
        assert_eq!(ids[0], "echo");
        assert_eq!(*ids.last().unwrap(), "freeradius");
        // server CPUs 2,3,4: shards 1..=3 at batch 64, then batches 16 and 256 at 3 shards
        for io in ["mmsg", "uring"] {
            for s in 1..=3 {
                assert!(
                    ids.contains(&format!("dynauthd-{io}-s{s}-b64").as_str()),
                    "{ids:?}"
                );
            }
            assert!(ids.contains(&format!("dynauthd-{io}-s3-b16").as_str()));
            assert!(ids.contains(&format!("dynauthd-{io}-s3-b256").as_str()));
        }
        assert_eq!(ids.len(), 1 + 2 * 5 + 1);
        let swept: Vec<&str> = t
            .iter()
            .filter(|t| t.result.primary)
            .map(|t| t.result.id.as_str())
            .collect();
        assert_eq!(
            swept,
            vec![
                "echo",
                "dynauthd-mmsg-s3-b64",
                "dynauthd-uring-s3-b64",
                "freeradius"
            ]
        );
        let all = target_plans(&plan(&[
            "--sweep-all",
            "--targets",
            "dynauthd",
            "--io",
            "mmsg",
        ]));
        assert!(all.iter().all(|t| t.result.primary));
        assert_eq!(all.len(), 5);
    }

    #[test]
    fn debug_builds_are_recognised_by_their_directory() {
        assert!(is_debug_build(Path::new("/w/target/debug/loadgen")));
        assert!(!is_debug_build(Path::new("/w/target/release/loadgen")));
        assert!(!is_debug_build(Path::new("/usr/bin/debugger")));
    }

    #[test]
    fn uring_start_failures_are_reported_as_unavailable() {
        let mut r = TargetResult::new("dynauthd-uring-s1-b64", TargetKind::Dynauthd);
        r.io = Some("uring".into());
        let e = ServerError::Exited {
            name: "dynauthd".into(),
            status: "exit status: 1".into(),
            output:
                "INFO starting\ndynauthd: error: io_uring was requested but is not available: EPERM"
                    .into(),
        };
        let why = start_failure(&r, &e);
        assert!(
            why.starts_with("dynauthd reports io_uring unavailable here"),
            "{why}"
        );
        assert!(why.contains("EPERM"), "{why}");
    }
}
