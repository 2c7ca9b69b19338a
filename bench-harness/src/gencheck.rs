//! `bench-harness gen-check`: is loadgen the weak link? Runs, back to back on the same
//! machine, against one echo server (`loadgen echo-server`, pinned to the server CPU): the
//! independent generator `mmsg-gen` (bare: unsigned datagrams), `mmsg-gen --secret` (signing
//! every request as a DAC must, as loadgen does), and loadgen with one worker thread, each
//! pinned to the generator CPU, same window, same duration, same datagram size, for several
//! rounds in alternating order; prints each rate and the ratios loadgen / independent.
//! Owns: the check's plan, its order of runs and its report. Must not touch: the generators'
//! internals (each is a child process; their reports are their own types).

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::loadgen::{Load, LoadgenRun, RunReport};
use crate::machine;
use crate::mmsg_report::GenReport;
use crate::report::{range, thousands, times};
use crate::server::{ServerSpec, free_port};
use crate::stats::{Summary, ratio};

/// Synthetic sessions loadgen's requests are built from (their Acct-Session-Ids are all
/// 16 characters, so every request has the same size).
const SESSIONS: usize = 10_000;

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub loadgen: PathBuf,
    pub mmsg_gen: PathBuf,
    pub taskset: Option<PathBuf>,
    pub server_cpu: usize,
    pub generator_cpu: usize,
    pub window: usize,
    pub duration_ms: u64,
    pub rounds: usize,
    pub secret: String,
}

/// One generator's figures in one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Answers per second of the sending phase.
    pub rps: f64,
    pub worker_cpu_ns_per_answer: f64,
    pub worker_utilisation: f64,
    /// Every request answered exactly, nothing lost, late, corrupt or mismatched.
    pub exact: bool,
}

impl Figures {
    fn of_independent(r: &GenReport) -> Figures {
        Figures {
            rps: r.answered_rps,
            worker_cpu_ns_per_answer: r.cpu_ns_per_answer,
            worker_utilisation: r.worker_utilisation,
            exact: r.clean() && r.counts_add_up(),
        }
    }

    fn of_loadgen(r: &RunReport) -> Figures {
        let a = &r.answers;
        Figures {
            rps: r.achieved_rate_rps,
            worker_cpu_ns_per_answer: r.generator.cpu_ns_per_request,
            worker_utilisation: r.generator.worker_utilisation,
            exact: r.counts_add_up
                && r.timeouts == 0
                && r.unsent == 0
                && a.echo_ok == r.requests
                && a.echo_mismatches + a.late + a.duplicates + a.stray + a.malformed == 0,
        }
    }
}

/// One round: each generator once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Round {
    /// The order the three ran in.
    pub order: Vec<String>,
    pub independent: Figures,
    pub independent_signed: Figures,
    pub loadgen: Figures,
}

/// The whole check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub started_utc: String,
    pub cpu_model: String,
    pub load_average_start: [f64; 3],
    pub load_average_end: [f64; 3],
    pub server_cpu: usize,
    pub generator_cpu: usize,
    pub window: usize,
    pub duration_ms: u64,
    /// The size of loadgen's requests (measured), which mmsg-gen then sends.
    pub datagram_octets: usize,
    pub rounds: Vec<Round>,
    pub independent: Option<Summary>,
    pub independent_signed: Option<Summary>,
    pub loadgen: Option<Summary>,
    /// loadgen's median over the bare independent generator's median.
    pub ratio: Option<f64>,
    /// loadgen's median over the signing independent generator's median.
    pub ratio_signed: Option<f64>,
    /// Per round: loadgen over the bare independent generator.
    pub round_ratios: Option<Summary>,
    pub round_ratios_signed: Option<Summary>,
}

impl Report {
    /// Every run of every round answered exactly.
    pub fn all_exact(&self) -> bool {
        self.rounds
            .iter()
            .all(|r| r.independent.exact && r.independent_signed.exact && r.loadgen.exact)
    }

    /// The report as text: one line per round, then the medians and the ratios.
    pub fn text(&self) -> String {
        let mut s = format!(
            "generator check, {}: echo server on CPU {}, generators on CPU {} one at a time, window {}, {} ms per run, {}-octet requests; {}; load average {:.2} at the start, {:.2} at the end\n",
            self.started_utc,
            self.server_cpu,
            self.generator_cpu,
            self.window,
            self.duration_ms,
            self.datagram_octets,
            self.cpu_model,
            self.load_average_start[0],
            self.load_average_end[0],
        );
        let f = |x: &Figures| {
            format!(
                "{}/s ({:.0} ns/answer, {:.0}% busy{})",
                thousands(x.rps),
                x.worker_cpu_ns_per_answer,
                x.worker_utilisation * 100.0,
                if x.exact { "" } else { ", NOT EXACT" }
            )
        };
        for (i, r) in self.rounds.iter().enumerate() {
            s += &format!(
                "round {} ({}): independent {} · independent signed {} · loadgen {} · loadgen/independent {} · loadgen/signed {}\n",
                i + 1,
                r.order.join(", "),
                f(&r.independent),
                f(&r.independent_signed),
                f(&r.loadgen),
                times(ratio(Some(r.loadgen.rps), Some(r.independent.rps))),
                times(ratio(Some(r.loadgen.rps), Some(r.independent_signed.rps))),
            );
        }
        let m =
            |x: &Option<Summary>| x.map_or("–".into(), |x| format!("{}/s", range(&x, thousands)));
        s += &format!(
            "median of {} rounds [min–max]: independent {}, independent signed {}, loadgen {}\n",
            self.rounds.len(),
            m(&self.independent),
            m(&self.independent_signed),
            m(&self.loadgen)
        );
        let per_round = |x: &Option<Summary>| {
            x.map_or(String::new(), |x| {
                format!(" (per round {})", range(&x, |r| times(Some(r))))
            })
        };
        s += &format!(
            "loadgen / independent: {}{}\nloadgen / independent signed: {}{}\n",
            times(self.ratio),
            per_round(&self.round_ratios),
            times(self.ratio_signed),
            per_round(&self.round_ratios_signed),
        );
        if !self.all_exact() {
            s += "WARNING: a run did not get every answer exactly (see NOT EXACT): its rate is not a generator figure\n";
        }
        s
    }
}

/// The order of round `i` (0-based): alternating, so neither generator always runs first
/// (after a warmer cache, or before another tenant's build starts).
pub fn order(i: usize) -> [Gen; 3] {
    if i.is_multiple_of(2) {
        [Gen::Independent, Gen::IndependentSigned, Gen::Loadgen]
    } else {
        [Gen::Loadgen, Gen::IndependentSigned, Gen::Independent]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gen {
    Independent,
    IndependentSigned,
    Loadgen,
}

impl Gen {
    fn name(self) -> &'static str {
        match self {
            Gen::Independent => "mmsg-gen",
            Gen::IndependentSigned => "mmsg-gen --secret",
            Gen::Loadgen => "loadgen",
        }
    }
}

/// The octets of loadgen's echo-mode requests: loadgen sends a few to a socket of ours.
fn loadgen_datagram_size(plan: &Plan) -> anyhow::Result<usize> {
    let probe = UdpSocket::bind("127.0.0.1:0").context("binding the probe socket")?;
    probe.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut run = loadgen_run(plan, probe.local_addr()?);
    run.duration_ms = 50;
    run.timeout_ms = 100;
    run.load = Load::Window(4);
    let argv = run.command_line();
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", argv[0]))?;
    let mut buf = [0u8; 4096];
    let mut sizes = Vec::new();
    while sizes.len() < 4 {
        match probe.recv(&mut buf) {
            Ok(n) => sizes.push(n),
            Err(_) => break,
        }
    }
    let _ = child.wait();
    sizes.dedup();
    match sizes[..] {
        [n] => Ok(n),
        [] => anyhow::bail!("loadgen sent nothing to the probe socket"),
        _ => anyhow::bail!("loadgen's requests differ in size: {sizes:?}"),
    }
}

fn loadgen_run(plan: &Plan, target: SocketAddr) -> LoadgenRun {
    LoadgenRun {
        program: plan.loadgen.clone(),
        taskset: plan.taskset.clone(),
        target,
        secret: plan.secret.clone(),
        sessions: SESSIONS,
        seed: 1,
        mix: "coa=1".into(),
        cpus: vec![plan.generator_cpu],
        threads: 1,
        duration_ms: plan.duration_ms,
        timeout_ms: 1000,
        echo: true,
        load: Load::Window(plan.window),
        histogram_file: None,
        source_ports: None,
        server_pid: None,
    }
}

fn run_independent(
    plan: &Plan,
    target: SocketAddr,
    size: usize,
    duration_ms: u64,
    signed: bool,
) -> anyhow::Result<GenReport> {
    let mut argv: Vec<String> = Vec::new();
    if let Some(t) = &plan.taskset {
        argv.extend([
            t.display().to_string(),
            "-c".into(),
            plan.generator_cpu.to_string(),
        ]);
    }
    argv.push(plan.mmsg_gen.display().to_string());
    for (k, v) in [
        ("--target", target.to_string()),
        ("--window", plan.window.to_string()),
        ("--duration-ms", duration_ms.to_string()),
        ("--size", size.to_string()),
        ("--cpu", plan.generator_cpu.to_string()),
    ] {
        argv.push(k.into());
        argv.push(v);
    }
    if signed {
        argv.push("--secret".into());
        argv.push(plan.secret.clone());
    }
    argv.push("--json".into());
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .with_context(|| format!("starting {}", argv[0]))?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "mmsg-gen failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}

/// Runs the check.
pub fn run(plan: &Plan) -> anyhow::Result<Report> {
    anyhow::ensure!(plan.rounds >= 1, "--rounds must be at least 1");
    anyhow::ensure!(
        plan.server_cpu != plan.generator_cpu,
        "the echo server and the generators need different CPUs"
    );
    let started_utc = machine::utc_now();
    let load_average_start = machine::load_average().unwrap_or_default();
    let size = loadgen_datagram_size(plan)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let mut echo = ServerSpec::echo(&plan.loadgen, addr, &[plan.server_cpu])
        .with_taskset(plan.taskset.clone())
        .start()?;
    // Warm-up (not recorded): the echo server's first wake-ups, page faults, caches.
    run_independent(
        plan,
        addr,
        size,
        (plan.duration_ms / 3).clamp(100, 1000),
        false,
    )?;
    let mut rounds = Vec::new();
    for i in 0..plan.rounds {
        let mut independent = None;
        let mut independent_signed = None;
        let mut loadgen = None;
        for g in order(i) {
            eprintln!(
                "gen-check: round {} of {}: {}",
                i + 1,
                plan.rounds,
                g.name()
            );
            match g {
                Gen::Independent => {
                    let r = run_independent(plan, addr, size, plan.duration_ms, false)?;
                    independent = Some(Figures::of_independent(&r));
                }
                Gen::IndependentSigned => {
                    let r = run_independent(plan, addr, size, plan.duration_ms, true)?;
                    independent_signed = Some(Figures::of_independent(&r));
                }
                Gen::Loadgen => {
                    let r = loadgen_run(plan, addr).run()?;
                    loadgen = Some(Figures::of_loadgen(&r));
                }
            }
            if !echo.alive() {
                anyhow::bail!(
                    "the echo server exited during the check:\n{}",
                    echo.last_output(20)
                );
            }
        }
        rounds.push(Round {
            order: order(i).iter().map(|g| g.name().to_string()).collect(),
            independent: independent.expect("every round runs each generator"),
            independent_signed: independent_signed.expect("every round runs each generator"),
            loadgen: loadgen.expect("every round runs each generator"),
        });
    }
    echo.stop();
    Ok(summarise(
        plan,
        started_utc,
        load_average_start,
        machine::load_average().unwrap_or_default(),
        size,
        rounds,
    ))
}

/// The report of a set of rounds: medians and ratios.
pub fn summarise(
    plan: &Plan,
    started_utc: String,
    load_average_start: [f64; 3],
    load_average_end: [f64; 3],
    datagram_octets: usize,
    rounds: Vec<Round>,
) -> Report {
    let independent = Summary::of_by(&rounds, |r| Some(r.independent.rps));
    let independent_signed = Summary::of_by(&rounds, |r| Some(r.independent_signed.rps));
    let loadgen = Summary::of_by(&rounds, |r| Some(r.loadgen.rps));
    Report {
        started_utc,
        cpu_model: machine::Machine::detect().cpu_model,
        load_average_start,
        load_average_end,
        server_cpu: plan.server_cpu,
        generator_cpu: plan.generator_cpu,
        window: plan.window,
        duration_ms: plan.duration_ms,
        datagram_octets,
        ratio: ratio(loadgen.map(|s| s.median), independent.map(|s| s.median)),
        ratio_signed: ratio(
            loadgen.map(|s| s.median),
            independent_signed.map(|s| s.median),
        ),
        round_ratios: Summary::of_by(&rounds, |r| {
            ratio(Some(r.loadgen.rps), Some(r.independent.rps))
        }),
        round_ratios_signed: Summary::of_by(&rounds, |r| {
            ratio(Some(r.loadgen.rps), Some(r.independent_signed.rps))
        }),
        independent,
        independent_signed,
        loadgen,
        rounds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(rps: f64) -> Figures {
        Figures {
            rps,
            worker_cpu_ns_per_answer: 1e9 / rps,
            worker_utilisation: 0.98,
            exact: true,
        }
    }

    fn plan() -> Plan {
        Plan {
            loadgen: "loadgen".into(),
            mmsg_gen: "mmsg-gen".into(),
            taskset: None,
            server_cpu: 1,
            generator_cpu: 0,
            window: 64,
            duration_ms: 3000,
            rounds: 3,
            secret: "s".into(),
        }
    }

    #[test]
    fn rounds_alternate_and_each_runs_every_generator() {
        assert_eq!(order(0)[0], Gen::Independent);
        assert_eq!(order(1)[0], Gen::Loadgen);
        for i in 0..4 {
            let mut o = order(i).to_vec();
            o.sort_by_key(|g| g.name());
            assert_eq!(o, [Gen::Loadgen, Gen::Independent, Gen::IndependentSigned]);
        }
    }

    #[test]
    fn the_report_has_both_rates_and_the_ratios() {
        let rounds = [
            (600_000.0, 580_000.0, 570_000.0),
            (620_000.0, 590_000.0, 600_000.0),
        ]
        .iter()
        .enumerate()
        .map(|(i, &(a, b, c))| Round {
            order: order(i).iter().map(|g| g.name().into()).collect(),
            independent: figures(a),
            independent_signed: figures(b),
            loadgen: figures(c),
        })
        .collect();
        let r = summarise(&plan(), "t".into(), [0.5; 3], [0.7; 3], 44, rounds);
        assert_eq!(r.independent.unwrap().median, 610_000.0);
        assert_eq!(r.loadgen.unwrap().median, 585_000.0);
        let ratio = r.ratio.unwrap();
        assert!((ratio - 585.0 / 610.0).abs() < 1e-9, "{ratio}");
        assert!((r.ratio_signed.unwrap() - 1.0).abs() < 1e-9);
        assert_eq!(r.round_ratios.unwrap().n, 2);
        assert!(r.all_exact());
        let text = r.text();
        assert!(
            text.contains("independent 610,000 [600,000–620,000]/s"),
            "{text}"
        );
        assert!(
            text.contains("loadgen 585,000 [570,000–600,000]/s"),
            "{text}"
        );
        assert!(
            text.contains("loadgen / independent: 0.96× (per round 0.96× [0.95×–0.97×])"),
            "{text}"
        );
        assert!(
            text.contains("loadgen / independent signed: 1.00×"),
            "{text}"
        );
        assert!(text.contains("load average 0.50 at the start"), "{text}");
        assert!(!text.contains("WARNING"));
        // JSON round trip through the same type (floats to within their last digit).
        let json = serde_json::to_string(&r).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back.rounds, r.rounds);
        assert_eq!(back.loadgen, r.loadgen);
        assert!((back.ratio.unwrap() - ratio).abs() < 1e-12);
    }

    #[test]
    fn an_inexact_run_is_called_out() {
        let mut bad = figures(1.0);
        bad.exact = false;
        let rounds = vec![Round {
            order: vec![],
            independent: figures(2.0),
            independent_signed: figures(2.0),
            loadgen: bad,
        }];
        let r = summarise(&plan(), "t".into(), [0.0; 3], [0.0; 3], 44, rounds);
        assert!(!r.all_exact());
        assert!(r.text().contains("NOT EXACT"));
        assert!(r.text().contains("WARNING"));
    }
}
