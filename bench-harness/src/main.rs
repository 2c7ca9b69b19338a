//! bench-harness: one command that answers "how fast is it, compared with what?". It starts
//! each server (the echo ceiling, dynauthd in each configuration, FreeRADIUS as a DAS) as a
//! child process pinned to its own CPUs, drives `loadgen` against it on 127.0.0.1, and
//! writes a Markdown report with ratios measured in the same run, SVG charts and the raw
//! JSON. See docs/BENCH_HARNESS.md.
//!
//! Modules: `cli` (flags and the plan), `suite` (running it), `server` (child processes),
//! `loadgen` (the generator's command line and reports), `freeradius` (its configuration),
//! `machine` (machine facts, CPU clocks, fingerprint), `results` (the JSON model and guard
//! flags), `stats` (medians and ratios), `report` (Markdown, comparisons), `charts` (SVG),
//! `gencheck` (loadgen against the independent generator `mmsg-gen`, whose report type
//! `mmsg_report` is compiled from that binary's source).
#![forbid(unsafe_code)]

mod charts;
mod cli;
mod freeradius;
mod gencheck;
mod loadgen;
mod machine;
#[path = "mmsg_gen/report.rs"]
mod mmsg_report;
mod report;
mod results;
mod server;
mod stats;
mod suite;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bench-harness: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Report { results, report }) => {
            let r = report::load(&results)?;
            let written = report::write_all(&r, &report)?;
            for p in written {
                println!("{}", p.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Series {
            loadgen_json,
            out,
            title,
        }) => {
            let text = std::fs::read_to_string(&loadgen_json)
                .with_context(|| format!("reading {}", loadgen_json.display()))?;
            let r = loadgen::parse_report(&text)
                .with_context(|| format!("{} is not a loadgen report", loadgen_json.display()))?;
            let title = title.unwrap_or_else(|| {
                format!(
                    "loadgen {} {} -> {}{}",
                    r.profile.as_str(),
                    r.mode.as_str(),
                    r.target,
                    if r.generator_bound {
                        " (generator-bound: not a server figure)"
                    } else {
                        ""
                    }
                )
            });
            charts::time_series(&out, &title, &r.time_series)?;
            println!("{}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::GenCheck(a)) => {
            let plan = gencheck::Plan {
                loadgen: a
                    .loadgen
                    .or_else(|| suite::sibling("loadgen"))
                    .unwrap_or_else(|| "loadgen".into()),
                mmsg_gen: a
                    .mmsg_gen
                    .or_else(|| suite::sibling("mmsg-gen"))
                    .unwrap_or_else(|| "mmsg-gen".into()),
                taskset: machine::which("taskset"),
                server_cpu: a.server_cpu,
                generator_cpu: a.generator_cpu,
                window: a.window,
                duration_ms: a.duration_ms,
                rounds: a.rounds,
                secret: a.secret,
            };
            let report = gencheck::run(&plan)?;
            print!("{}", report.text());
            if let Some(path) = &a.json {
                std::fs::write(path, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            let below = a
                .min_ratio
                .is_some_and(|min| report.ratio.is_none_or(|r| r < min));
            Ok(if report.all_exact() && !below {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Some(Command::Compare {
            baseline,
            candidate,
        }) => {
            let a = report::load(&baseline)?;
            let b = report::load(&candidate)?;
            match report::compare(
                &baseline.display().to_string(),
                &a,
                &candidate.display().to_string(),
                &b,
            ) {
                Ok(text) => {
                    print!("{text}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e @ report::ReportError::DifferentMachines(_)) => {
                    eprintln!("bench-harness: {e}");
                    Ok(ExitCode::from(2))
                }
                Err(e) => Err(e.into()),
            }
        }
        None => {
            let available = available_cpus();
            let plan = cli
                .run
                .plan(&available)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            for c in plan.server_cpus.iter().chain(&plan.loadgen_cpus) {
                if !available.contains(c) {
                    anyhow::bail!("CPU {c} is not available here (CPUs: {available:?})");
                }
            }
            let loadgen = cli
                .run
                .loadgen
                .clone()
                .or_else(|| suite::sibling("loadgen"))
                .unwrap_or_else(|| "loadgen".into());
            let dynauthd = cli
                .run
                .dynauthd
                .clone()
                .or_else(|| suite::sibling("dynauthd"));
            if let Some(d) = &dynauthd
                && !machine::is_executable(d)
            {
                anyhow::bail!("--dynauthd {}: not an executable file", d.display());
            }
            if let Some(f) = &cli.run.freeradius
                && !machine::is_executable(f)
            {
                anyhow::bail!("--freeradius {}: not an executable file", f.display());
            }
            let freeradius = if plan.targets.iter().any(|t| t == "freeradius") {
                cli.run.freeradius.clone().or_else(freeradius::find)
            } else {
                None
            };
            let bins = suite::Binaries {
                loadgen,
                dynauthd,
                freeradius,
                taskset: machine::which("taskset"),
            };
            let started = std::time::Instant::now();
            let results = suite::Suite::new(plan, bins).run()?;
            let written = report::write_all(&results, &cli.run.report)
                .with_context(|| format!("writing {}", cli.run.report.display()))?;
            eprintln!(
                "bench-harness: done in {:.0} s; wrote:",
                started.elapsed().as_secs_f64()
            );
            for p in written {
                println!("{}", p.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The CPUs this process may run on (/sys online list; falls back to 0..available).
fn available_cpus() -> Vec<usize> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| cli::parse_cpus(s.trim()).ok())
        .map(|l| l.0)
        .filter(|v| v.len() >= n)
        .unwrap_or_else(|| (0..n).collect())
}
