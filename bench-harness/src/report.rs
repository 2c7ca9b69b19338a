//! The Markdown report: machine, settings, warnings, the maximum-throughput table with
//! ratios against the echo ceiling and FreeRADIUS of the same run, the latency sweep, the
//! half-load percentiles, skipped targets, and the flag legend; and the comparison of two
//! runs, which refuses results from different machines. Owns: wording and arithmetic of
//! the tables. Must not touch: measuring, drawing.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::results::{Flag, Results, TargetKind, TargetResult, marks};
use crate::stats::{Summary, ratio};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Two results from machines with different fingerprints.
    #[error("refusing to compare runs from different machines: {0}")]
    DifferentMachines(String),
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a bench-harness results file: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path} has schema version {found}; this harness reads {expected}")]
    Schema {
        path: String,
        found: u32,
        expected: u32,
    },
}

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("writing {0}: {1}")]
    Io(String, std::io::Error),
    #[error("encoding the results: {0}")]
    Json(serde_json::Error),
    #[error(transparent)]
    Chart(crate::charts::ChartError),
}

/// Reads a results file.
pub fn load(path: &Path) -> Result<Results, ReportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReportError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let r: Results = serde_json::from_str(&text).map_err(|source| ReportError::Parse {
        path: path.display().to_string(),
        source,
    })?;
    if r.schema_version != crate::results::SCHEMA_VERSION {
        return Err(ReportError::Schema {
            path: path.display().to_string(),
            found: r.schema_version,
            expected: crate::results::SCHEMA_VERSION,
        });
    }
    Ok(r)
}

/// Refuses two results from machines with different fingerprints.
pub fn same_machine(a: (&str, &Results), b: (&str, &Results)) -> Result<(), ReportError> {
    if a.1.machine.fingerprint == b.1.machine.fingerprint {
        return Ok(());
    }
    let desc = |r: &Results| {
        format!(
            "{}, {} CPUs, {}",
            r.machine.cpu_model, r.machine.logical_cpus, r.machine.kernel
        )
    };
    Err(ReportError::DifferentMachines(format!(
        "{} has fingerprint {} ({}), {} has {} ({})",
        a.0,
        a.1.machine.fingerprint,
        desc(a.1),
        b.0,
        b.1.machine.fingerprint,
        desc(b.1)
    )))
}

/// `12,345` style integers.
pub fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// "median [min–max]" of a summary, or "median" when there is one value.
pub(crate) fn range(s: &Summary, f: impl Fn(f64) -> String) -> String {
    if s.n > 1 && s.max > s.min {
        format!("{} [{}–{}]", f(s.median), f(s.min), f(s.max))
    } else {
        f(s.median)
    }
}

/// A share as a percentage, with more digits when small (0.13%, 4.2%, 57%).
fn pct(v: Option<f64>) -> String {
    v.map_or("–".into(), |r| {
        let p = r * 100.0;
        if p >= 10.0 || p == 0.0 {
            format!("{p:.0}%")
        } else if p >= 1.0 {
            format!("{p:.1}%")
        } else {
            format!("{p:.2}%")
        }
    })
}

/// A ratio: whole above 10, two decimals down to 0.1, two significant digits below (0.0071×).
pub(crate) fn times(v: Option<f64>) -> String {
    v.map_or("–".into(), |r| {
        if r >= 10.0 {
            format!("{r:.0}×")
        } else if r >= 0.1 || r == 0.0 {
            format!("{r:.2}×")
        } else {
            let digits = (1 - r.log10().floor() as i32).clamp(2, 6) as usize;
            format!("{r:.digits$}×")
        }
    })
}

fn us(v: f64) -> String {
    if v >= 1000.0 {
        thousands(v)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// The ratios of one target against the ceiling and FreeRADIUS of the same run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ratios {
    /// Throughput over the echo ceiling's.
    pub of_ceiling: Option<f64>,
    /// Throughput over FreeRADIUS's.
    pub vs_freeradius: Option<f64>,
    /// FreeRADIUS's CPU per answer over this target's (how many times less CPU it needs).
    pub cpu_vs_freeradius: Option<f64>,
}

/// Ratios of medians, measured in the same run.
pub fn ratios(results: &Results, t: &TargetResult) -> Ratios {
    let max = t.max_rps().map(|s| s.median);
    let echo = results
        .first_of(TargetKind::Echo)
        .and_then(|e| e.max_rps())
        .map(|s| s.median);
    let fr = results.first_of(TargetKind::Freeradius);
    Ratios {
        of_ceiling: ratio(max, echo),
        vs_freeradius: ratio(max, fr.and_then(|f| f.max_rps()).map(|s| s.median)),
        cpu_vs_freeradius: ratio(
            fr.and_then(|f| f.cpu_ns_per_answer()).map(|s| s.median),
            t.cpu_ns_per_answer().map(|s| s.median),
        ),
    }
}

/// The best dynauthd configuration against the ceiling and FreeRADIUS, in one sentence.
pub fn headline(results: &Results) -> Option<String> {
    let best = results
        .targets
        .iter()
        .filter(|t| t.kind == TargetKind::Dynauthd && t.skipped.is_none())
        .filter_map(|t| t.max_rps().map(|m| (t, m)))
        .max_by(|a, b| a.1.median.total_cmp(&b.1.median))?;
    let (t, m) = best;
    let r = ratios(results, t);
    let mut line = format!(
        "the fastest dynauthd configuration here ({}) answered {} requests/s",
        t.label(),
        thousands(m.median)
    );
    if let Some(c) = r.of_ceiling {
        line += &format!(", {} of the echo ceiling", pct(Some(c)));
    }
    if let Some(f) = r.vs_freeradius {
        line += &format!(", {} FreeRADIUS's throughput", times(Some(f)));
    }
    if let Some(c) = r.cpu_vs_freeradius {
        line += &format!(
            ", using {} FreeRADIUS's CPU per answer",
            times(Some(1.0 / c))
        );
    }
    line.push('.');
    Some(line)
}

/// The whole Markdown report; `charts` are (title, path) of the SVGs, linked relative to
/// `report_path`'s directory; `json_name` is the raw results' file name.
pub fn markdown(results: &Results, charts: &[(String, PathBuf)], json_name: &str) -> String {
    let mut s = String::new();
    let m = &results.machine;
    let st = &results.settings;
    let _ = writeln!(s, "# Dynauth benchmarks (bench-harness)\n");
    let _ = writeln!(
        s,
        "Generated by `bench-harness{}`: every figure below was measured in this one run, on this \
         one machine, with the same load generator; compare ratios, not absolute numbers, across \
         machines. Raw results: [`{json_name}`]({json_name}).\n",
        if st.quick { " --quick" } else { "" }
    );
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(
        s,
        "| date | {} to {} |",
        results.started_utc, results.finished_utc
    );
    let _ = writeln!(
        s,
        "| commit | {} |",
        m.git_commit.as_deref().unwrap_or("unknown")
    );
    let _ = writeln!(
        s,
        "| machine | {}, {} logical CPUs, {:.1} GiB |",
        m.cpu_model,
        m.logical_cpus,
        m.mem_total_kib as f64 / 1048576.0
    );
    let _ = writeln!(s, "| kernel | {} |", m.kernel);
    let _ = writeln!(s, "| machine fingerprint | `{}` |", m.fingerprint);
    let _ = writeln!(
        s,
        "| load average at start | {:.2} / {:.2} / {:.2} |",
        m.load_average[0], m.load_average[1], m.load_average[2]
    );
    let _ = writeln!(
        s,
        "| CPUs | server {:?}, loadgen {:?} ({} worker thread{}){} |",
        st.server_cpus,
        st.loadgen_cpus,
        st.loadgen_threads,
        if st.loadgen_threads == 1 { "" } else { "s" },
        if st.pinned_with_taskset {
            ", whole processes pinned with taskset"
        } else {
            ", taskset missing: partly unpinned"
        }
    );
    let _ = writeln!(
        s,
        "| load | closed loop window {}; {} ms per run; {} repetition{}; {} known sessions (seed {}); mix `{}` |",
        st.window,
        st.duration_ms,
        st.repetitions,
        if st.repetitions == 1 { "" } else { "s" },
        st.sessions,
        st.seed,
        st.mix
    );
    if let Some(n) = st.source_ports {
        let _ = writeln!(
            s,
            "| source ports | {n} per loadgen thread (`--source-ports`) |"
        );
    }
    let _ = writeln!(
        s,
        "| sweep | {} of each maximum |",
        st.fractions
            .iter()
            .map(|f| format!("{:.0}%", f * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (name, what) in &st.programs {
        let _ = writeln!(s, "| {name} | `{what}` |");
    }
    for n in &st.notes {
        let _ = writeln!(s, "| note | {} |", n.replace('|', "\\|"));
    }
    s.push('\n');

    if !results.warnings.is_empty() {
        let _ = writeln!(s, "**Warnings**\n");
        for w in &results.warnings {
            let _ = writeln!(s, "- {w}");
        }
        s.push('\n');
    }

    if let Some(h) = headline(results) {
        let _ = writeln!(s, "**In one line:** {h}\n");
    }

    slo_capacity(&mut s, results);

    // Maximum throughput.
    let _ = writeln!(s, "## Maximum throughput (closed loop)\n");
    let _ = writeln!(
        s,
        "Answers per second with {} requests outstanding: median [min–max] of {} repetition{}. \
         *of ceiling*: this target's median over the echo ceiling's (the most any UDP server can \
         answer here with this generator). *vs FreeRADIUS*: over FreeRADIUS's, same run. *server \
         CPU/answer*: the user+system CPU of the server's threads (`/proc/<pid>/task/*/stat`, \
         summed), sampled by loadgen when its workers start sending and when they stop (its \
         start-up and the final drain are outside the window), divided by the answers; softirq \
         work for the server's packets that the kernel does on other CPUs (the loopback's \
         delivery, for one) is not included, so compare it between servers on the same machine, \
         not with a figure from elsewhere. *steal*: the machine's steal time over the same \
         windows, as a share of all its CPU time, the highest of the repetitions (above a few percent, the hypervisor was running \
         someone else and every CPU figure is less reliable). *CPU vs FR*: FreeRADIUS's CPU per answer over this \
         target's (how many times less CPU). *ACK share*: ACKs over answers (echoes for the \
         ceiling); with the default mix about 90%, so a server that NAKs everything shows here. \
         *generator capacity*: loadgen's estimate of the rate its own workers could sustain on \
         these settings (threads x 1 s / worker CPU per request). Runs flagged **N** (the \
         generator was the bottleneck) are left out of every server figure; a target with only \
         such runs shows the generator's figure as a lower bound.\n",
        st.window,
        st.repetitions,
        if st.repetitions == 1 { "" } else { "s" }
    );
    let _ = writeln!(
        s,
        "| target | answers/s | of ceiling | vs FreeRADIUS | server CPU/answer (ns) | steal | CPU vs FR | p50 / p99 (µs) | ACK share | generator capacity/s | flags |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for t in results.targets.iter().filter(|t| t.skipped.is_none()) {
        let generator = t
            .generator_capacity()
            .map_or("–".into(), |g| thousands(g.median));
        let Some(max) = t.max_rps() else {
            let figure = t.generator_bound_rps().map_or("no result".into(), |b| {
                format!("≥ {} (generator-bound)", thousands(b.median))
            });
            let _ = writeln!(
                s,
                "| {} | {figure} | | | | | | | | {generator} | {} |",
                t.label(),
                marks(&t.closed_flags())
            );
            continue;
        };
        let r = ratios(results, t);
        let cpu = t
            .cpu_ns_per_answer()
            .map_or("–".into(), |c| range(&c, thousands));
        let steal = pct(t.steal_share().map(|x| x.max));
        let p50 =
            Summary::of_by(&t.closed, |m| m.latency_of(|l| l.p50_us)).map_or(0.0, |x| x.median);
        let p99 =
            Summary::of_by(&t.closed, |m| m.latency_of(|l| l.p99_us)).map_or(0.0, |x| x.median);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} |",
            t.label(),
            range(&max, thousands),
            if t.kind == TargetKind::Echo {
                "100%".into()
            } else {
                pct(r.of_ceiling)
            },
            if t.kind == TargetKind::Freeradius {
                "1×".into()
            } else {
                times(r.vs_freeradius)
            },
            cpu,
            steal,
            if t.kind == TargetKind::Freeradius {
                "1×".into()
            } else {
                times(r.cpu_vs_freeradius)
            },
            us(p50),
            us(p99),
            pct(t.ack_share()),
            generator,
            marks(&t.closed_flags())
        );
    }
    s.push('\n');
    shard_spread(&mut s, results);
    if results.first_of(TargetKind::Freeradius).is_none() {
        let _ = writeln!(
            s,
            "FreeRADIUS was not measured in this run, so there is no ratio against it (see *Skipped*).\n"
        );
    }
    if results.first_of(TargetKind::Echo).is_none() {
        let _ = writeln!(
            s,
            "The echo ceiling was not measured in this run, so there is no ratio against it.\n"
        );
    }

    for (title, path) in charts {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let _ = writeln!(s, "![{title}]({name})\n");
    }

    // Latency sweep.
    let swept: Vec<&TargetResult> = results
        .targets
        .iter()
        .filter(|t| t.skipped.is_none() && !t.sweep.is_empty())
        .collect();
    if !swept.is_empty() {
        let _ = writeln!(s, "## Latency against offered load (open loop)\n");
        let _ = writeln!(
            s,
            "Each server at fractions of its own closed-loop maximum. Latency is measured from each \
             request's intended send time (no coordinated omission). Medians [min–max] over the \
             repetitions.\n"
        );
        for t in swept {
            let _ = writeln!(s, "### {}\n", t.label());
            let _ = writeln!(
                s,
                "| load | offered/s | answered/s | p50 (µs) | p99 (µs) | p99.9 (µs) | lost | flags |"
            );
            let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---|");
            for p in &t.sweep {
                let ach = p.achieved().map_or("–".into(), |a| range(&a, thousands));
                let p50 = Summary::of_by(&p.runs, |m| m.latency_of(|l| l.p50_us))
                    .map_or("–".into(), |x| us(x.median));
                let p99 = p.p99().map_or("–".into(), |x| range(&x, us));
                let p999 = Summary::of_by(&p.runs, |m| m.latency_of(|l| l.p999_us))
                    .map_or("–".into(), |x| us(x.median));
                let lost =
                    Summary::of_by(&p.runs, |m| Some(m.loss_ratio)).map_or(0.0, |x| x.median);
                let _ = writeln!(
                    s,
                    "| {:.0}% | {} | {} | {} | {} | {} | {:.2}% | {} |",
                    p.fraction * 100.0,
                    thousands(p.offered_rps),
                    ach,
                    p50,
                    p99,
                    p999,
                    lost * 100.0,
                    marks(&p.flags())
                );
            }
            s.push('\n');
        }
    }

    // Half-load distribution.
    let dists: Vec<&TargetResult> = results
        .targets
        .iter()
        .filter(|t| !t.half_load_distribution.is_empty())
        .collect();
    if !dists.is_empty() {
        let _ = writeln!(s, "## Latency percentiles at half load\n");
        let wanted = [50.0, 90.0, 99.0, 99.9, 99.99, 100.0];
        let _ = writeln!(
            s,
            "From loadgen's histogram at the sweep point nearest 50% (first repetition), in µs.\n"
        );
        let _ = writeln!(
            s,
            "| target | {} |",
            wanted.map(|p| format!("p{p}")).join(" | ")
        );
        let _ = writeln!(s, "|---|{}", "---:|".repeat(wanted.len()));
        for t in dists {
            let cells: Vec<String> = wanted
                .iter()
                .map(|&w| {
                    t.half_load_distribution
                        .iter()
                        .find(|d| d.percentile >= w - 1e-9)
                        .or(t.half_load_distribution.last())
                        .map_or("–".into(), |d| us(d.latency_us))
                })
                .collect();
            let _ = writeln!(s, "| {} | {} |", t.label(), cells.join(" | "));
        }
        s.push('\n');
    }

    let skipped: Vec<&TargetResult> = results
        .targets
        .iter()
        .filter(|t| t.skipped.is_some())
        .collect();
    if !skipped.is_empty() {
        let _ = writeln!(s, "## Skipped\n");
        for t in skipped {
            let _ = writeln!(
                s,
                "- **{}**: {}",
                t.label(),
                t.skipped.as_deref().unwrap_or("")
            );
        }
        s.push('\n');
    }
    let notes: Vec<&String> = results.targets.iter().flat_map(|t| &t.notes).collect();
    if !notes.is_empty() {
        let _ = writeln!(s, "## Notes\n");
        for n in notes {
            let _ = writeln!(s, "- {n}");
        }
        s.push('\n');
    }

    let g = &st.guards;
    let _ = writeln!(s, "## Flags\n");
    let _ = writeln!(
        s,
        "A flag on a row means at least one of its repetitions had it:\n"
    );
    for f in Flag::ALL {
        let rule = match f {
            Flag::GeneratorBehind => format!(
                "schedule lag p99 > {} µs or unsent > {:.1}%",
                g.lag_p99_us,
                g.unsent_ratio * 100.0
            ),
            Flag::GeneratorSaturated => {
                format!("worker utilisation ≥ {:.0}%", g.worker_utilisation * 100.0)
            }
            Flag::Loss => format!("timeouts > {:.1}% of requests", g.loss_ratio * 100.0),
            Flag::Busy => format!(
                "other processes used > {:.2} cores during the run",
                g.other_cpu_cores
            ),
            Flag::InvalidAnswers => "any".into(),
            Flag::GeneratorBound => "loadgen's `generator_bound`: a worker > 95% busy, or > 1% of the requests due never sent without the in-flight limit holding them back".into(),
        };
        let _ = writeln!(s, "- **{}**: {} ({rule}).", f.mark(), f.meaning());
    }
    let _ = writeln!(
        s,
        "\nThe echo ceiling is *meant* to be limited by the generator (**S**): it answers with no \
         work at all. A server row with **S** is at least as fast as the generator can tell. \
         Beyond 100% of the maximum, **G** and **L** are expected: the server cannot keep up, \
         the generator's identifiers run out and requests queue or are dropped. **X** together \
         with **L** beyond the maximum is usually the same overload: answers that arrive after \
         loadgen's timeout meet a newer request with the same Identifier and fail its \
         verification; **X** without **L** means wrongly signed answers. **N** is loadgen's own \
         verdict that it was the bottleneck: such a run is the generator's figure, never the \
         server's, and is left out of the tables' server figures and ratios."
    );
    s
}

/// A comparison of two runs of the same machine: maximum throughput per target and the
/// candidate's change.
/// The SLO capacity of every target that was searched: the number an operator sizes with,
/// first in the report.
fn slo_capacity(s: &mut String, results: &Results) {
    let searched: Vec<(&TargetResult, &crate::results::Capacity)> = results
        .targets
        .iter()
        .filter_map(|t| t.capacity.as_ref().map(|c| (t, c)))
        .collect();
    let Some((_, first)) = searched.first() else {
        return;
    };
    let _ = writeln!(s, "## SLO capacity\n");
    let _ = writeln!(
        s,
        "The highest offered rate (open loop, loadgen `--capacity`) at which p99, timeouts \
         included, stays under {} ms with under {}% of requests lost: bisection over the \
         offered rate. *of echo*: over the echo ceiling's capacity in this run. A target \
         whose search was generator-bound shows a lower bound.\n",
        first.slo_p99_ms,
        first.slo_loss * 100.0
    );
    // A ratio only between two capacities that were found (a lower bound over anything is
    // no ratio).
    let echo = searched
        .iter()
        .find(|(t, _)| t.kind == TargetKind::Echo)
        .filter(|(_, c)| c.outcome == "found")
        .and_then(|(_, c)| c.capacity_rps);
    let _ = writeln!(
        s,
        "| target | capacity/s | of echo | first failing rate/s | outcome | steps |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---|---:|");
    for (t, c) in &searched {
        let capacity = match (c.capacity_rps, c.outcome.as_str()) {
            (None, _) => "none".to_string(),
            (Some(v), "found") => thousands(v),
            (Some(v), _) => format!("≥ {}", thousands(v)),
        };
        let found = c.outcome == "found";
        let of_echo = match (c.capacity_rps, echo) {
            (_, _) if t.kind == TargetKind::Echo => "100%".into(),
            (Some(v), Some(e)) if e > 0.0 && found => pct(Some(v / e)),
            _ => "–".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {capacity} | {of_echo} | {} | {} | {} |",
            t.label(),
            c.first_failing_rps.map_or("–".into(), thousands),
            c.outcome,
            c.steps
        );
    }
    s.push('\n');
}

/// Each dynauthd target's answers per shard over its closed-loop repetitions (dynauthd's
/// per-shard metrics): whether SO_REUSEPORT spread loadgen's source ports over every shard.
fn shard_spread(s: &mut String, results: &Results) {
    let rows: Vec<(String, Vec<u64>)> = results
        .targets
        .iter()
        .filter(|t| t.skipped.is_none() && t.shards.unwrap_or(1) > 1)
        .filter_map(|t| {
            let mut total: Vec<u64> = Vec::new();
            for m in &t.closed {
                if total.len() < m.shard_answers.len() {
                    total.resize(m.shard_answers.len(), 0);
                }
                for (sum, v) in total.iter_mut().zip(&m.shard_answers) {
                    *sum += v;
                }
            }
            (!total.is_empty()).then(|| (t.label(), total))
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "Answers per shard over the closed-loop repetitions (dynauthd's \
         `dynauth_shard_answers_sent_total`): how the kernel's SO_REUSEPORT hash spread \
         loadgen's source ports.\n"
    );
    let _ = writeln!(s, "| target | answers per shard (share) |");
    let _ = writeln!(s, "|---|---|");
    for (label, counts) in rows {
        let sum: u64 = counts.iter().sum::<u64>().max(1);
        let cells: Vec<String> = counts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                format!(
                    "shard {i}: {} ({:.0}%)",
                    thousands(*c as f64),
                    *c as f64 * 100.0 / sum as f64
                )
            })
            .collect();
        let _ = writeln!(s, "| {label} | {} |", cells.join(" · "));
    }
    s.push('\n');
}

pub fn compare(
    a_name: &str,
    a: &Results,
    b_name: &str,
    b: &Results,
) -> Result<String, ReportError> {
    same_machine((a_name, a), (b_name, b))?;
    let mut s = String::new();
    let _ = writeln!(s, "# bench-harness comparison\n");
    let _ = writeln!(
        s,
        "Same machine (fingerprint `{}`: {}, {} CPUs, {}).\n",
        a.machine.fingerprint, a.machine.cpu_model, a.machine.logical_cpus, a.machine.kernel
    );
    let _ = writeln!(
        s,
        "- baseline: `{a_name}` ({}, commit {})",
        a.started_utc,
        a.machine.git_commit.as_deref().unwrap_or("?")
    );
    let _ = writeln!(
        s,
        "- candidate: `{b_name}` ({}, commit {})\n",
        b.started_utc,
        b.machine.git_commit.as_deref().unwrap_or("?")
    );
    if a.settings.server_cpus != b.settings.server_cpus
        || a.settings.loadgen_cpus != b.settings.loadgen_cpus
        || a.settings.window != b.settings.window
        || a.settings.mix != b.settings.mix
    {
        let _ = writeln!(
            s,
            "**Note:** the runs used different CPUs, window or mix; the comparison is only indicative.\n"
        );
    }
    let _ = writeln!(
        s,
        "| target | baseline answers/s | candidate answers/s | change | baseline of ceiling | candidate of ceiling | flags (b / c) |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---|");
    for tb in &b.targets {
        let Some(ta) = a.target(&tb.id) else { continue };
        let (ma, mb) = (ta.max_rps(), tb.max_rps());
        let change = ratio(mb.map(|x| x.median), ma.map(|x| x.median))
            .map_or("–".into(), |r| format!("{:+.1}%", (r - 1.0) * 100.0));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} / {} |",
            tb.label(),
            ma.map_or("–".into(), |x| range(&x, thousands)),
            mb.map_or("–".into(), |x| range(&x, thousands)),
            change,
            pct(ratios(a, ta).of_ceiling),
            pct(ratios(b, tb).of_ceiling),
            marks(&ta.closed_flags()),
            marks(&tb.closed_flags())
        );
    }
    Ok(s)
}

/// Writes the report, the raw JSON and the charts: `report` and, beside it, `<stem>.json`
/// and `<stem>-*.svg`. Returns the paths written.
pub fn write_all(results: &Results, report: &Path) -> Result<Vec<PathBuf>, WriteError> {
    let dir = report
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| WriteError::Io(dir.display().to_string(), e))?;
    let stem = report.file_stem().map_or("BENCHMARKS-harness".into(), |s| {
        s.to_string_lossy().to_string()
    });
    let json = dir.join(format!("{stem}.json"));
    let text = serde_json::to_string_pretty(results).map_err(WriteError::Json)?;
    std::fs::write(&json, text + "\n")
        .map_err(|e| WriteError::Io(json.display().to_string(), e))?;
    let charts = crate::charts::draw_all(results, dir, &stem).map_err(WriteError::Chart)?;
    let md = markdown(results, &charts, &format!("{stem}.json"));
    std::fs::write(report, md).map_err(|e| WriteError::Io(report.display().to_string(), e))?;
    let mut out = vec![report.to_path_buf(), json];
    out.extend(charts.into_iter().map(|c| c.1));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::Machine;
    use crate::results::tests::{closed, open};
    use crate::results::{DistPoint, Guards, Settings, SweepPoint};

    pub fn machine(fp: &str) -> Machine {
        Machine {
            cpu_model: "AMD EPYC".into(),
            logical_cpus: 2,
            mem_total_kib: 8 << 20,
            kernel: "Linux 6.18".into(),
            hostname: "h".into(),
            fingerprint: fp.into(),
            git_commit: Some("abc123".into()),
            load_average: [0.1, 0.2, 0.3],
        }
    }

    fn target(id: &str, kind: TargetKind, rps: [f64; 3], cpu_ns: f64) -> TargetResult {
        let mut t = TargetResult::new(id, kind);
        t.primary = true;
        if kind == TargetKind::Dynauthd {
            t.io = Some("mmsg".into());
            t.shards = Some(1);
            t.batch = Some(64);
        }
        t.closed = rps.iter().map(|&r| closed(r, cpu_ns)).collect();
        t.sweep = vec![SweepPoint {
            fraction: 0.5,
            offered_rps: rps[1] / 2.0,
            runs: vec![
                open(rps[1] / 2.0, 120.0),
                open(rps[1] / 2.0, 180.0),
                open(rps[1] / 2.0, 150.0),
            ],
        }];
        t.half_load_distribution = vec![
            DistPoint {
                percentile: 50.0,
                latency_us: 40.0,
            },
            DistPoint {
                percentile: 99.0,
                latency_us: 150.0,
            },
            DistPoint {
                percentile: 100.0,
                latency_us: 900.0,
            },
        ];
        t
    }

    pub fn results(fp: &str) -> Results {
        let mut skipped = TargetResult::new("dynauthd-uring-s1-b64", TargetKind::Dynauthd);
        skipped.io = Some("uring".into());
        skipped.shards = Some(1);
        skipped.batch = Some(64);
        skipped.skipped = Some("dynauthd reports io_uring unavailable here: EPERM".into());
        Results {
            schema_version: crate::results::SCHEMA_VERSION,
            machine: machine(fp),
            settings: Settings {
                quick: false,
                duration_ms: 5000,
                repetitions: 3,
                fractions: vec![0.5],
                window: 128,
                sessions: 1000,
                seed: 1,
                mix: "coa=9,unknown=1".into(),
                server_cpus: vec![1],
                loadgen_cpus: vec![0],
                loadgen_threads: 1,
                pinned_with_taskset: true,
                guards: Guards::default(),
                notes: vec!["dynauthd from branch runtime".into()],
                source_ports: None,
                programs: [(
                    "FreeRADIUS".to_string(),
                    "/usr/sbin/freeradius (FreeRADIUS Version 3.2.1)".to_string(),
                )]
                .into(),
            },
            started_utc: "2026-11-21 14:00:00 UTC".into(),
            finished_utc: "2026-11-21 14:10:00 UTC".into(),
            targets: vec![
                target(
                    "echo",
                    TargetKind::Echo,
                    [310_000.0, 300_000.0, 290_000.0],
                    1500.0,
                ),
                target(
                    "dynauthd-mmsg-s1-b64",
                    TargetKind::Dynauthd,
                    [150_000.0, 140_000.0, 160_000.0],
                    6000.0,
                ),
                skipped,
                target(
                    "freeradius",
                    TargetKind::Freeradius,
                    [30_000.0, 28_000.0, 35_000.0],
                    30_000.0,
                ),
            ],
            warnings: vec!["the machine is busy before the run: load average 3.00".into()],
        }
    }

    // The SLO capacity comes first, with the ratio to the echo ceiling's and a lower bound
    // for a search that did not find its limit.
    #[test]
    fn the_report_opens_with_the_slo_capacity() {
        let mut r = results("f1");
        assert!(!markdown(&r, &[], "B.json").contains("## SLO capacity"));
        let cap = |rps: Option<f64>, outcome: &str| {
            Some(crate::results::Capacity {
                slo_p99_ms: 10,
                slo_loss: 0.001,
                capacity_rps: rps,
                outcome: outcome.into(),
                first_failing_rps: rps.map(|v| v * 1.05),
                steps: 9,
            })
        };
        r.targets[0].capacity = cap(Some(200_000.0), "found");
        r.targets[1].capacity = cap(Some(100_000.0), "found");
        r.targets[3].capacity = cap(Some(20_000.0), "at-maximum");
        let md = markdown(&r, &[], "B.json");
        let slo = md.find("## SLO capacity").expect("the section");
        assert!(slo < md.find("## Maximum throughput").unwrap(), "first");
        assert!(md.contains("| 100,000 | 50% |"), "{md}");
        assert!(
            md.contains("| ≥ 20,000 | – |"),
            "a lower bound has no ratio: {md}"
        );
        r.targets[0].capacity = cap(Some(200_000.0), "generator-bound");
        let md = markdown(&r, &[], "B.json");
        assert!(
            md.contains("| 100,000 | – |"),
            "no ratio to a lower bound: {md}"
        );
    }

    // Per-shard answer counts (dynauthd's metrics) are summed over the repetitions and shown
    // with their shares, for targets with more than one shard only.
    #[test]
    fn the_report_shows_how_answers_spread_over_shards() {
        let mut r = results("f1");
        assert!(!markdown(&r, &[], "B.json").contains("answers per shard"));
        let mut two = target(
            "dynauthd-mmsg-s2-b64",
            TargetKind::Dynauthd,
            [200_000.0, 210_000.0, 190_000.0],
            6000.0,
        );
        two.shards = Some(2);
        for m in &mut two.closed {
            m.shard_answers = vec![300, 100];
        }
        r.targets.push(two);
        let md = markdown(&r, &[], "B.json");
        assert!(md.contains("answers per shard"), "{md}");
        assert!(
            md.contains("shard 0: 900 (75%) · shard 1: 300 (25%)"),
            "{md}"
        );
    }

    #[test]
    fn ratios_are_medians_of_the_same_run() {
        let r = results("f1");
        let d = r.target("dynauthd-mmsg-s1-b64").unwrap();
        let x = ratios(&r, d);
        // medians: dynauthd 150k, echo 300k, FreeRADIUS 30k; CPU 30000 vs 6000 ns
        assert!((x.of_ceiling.unwrap() - 0.5).abs() < 1e-12);
        assert!((x.vs_freeradius.unwrap() - 5.0).abs() < 1e-12);
        assert!((x.cpu_vs_freeradius.unwrap() - 5.0).abs() < 1e-12);
        let mut no_fr = r.clone();
        no_fr.targets.retain(|t| t.kind != TargetKind::Freeradius);
        let x = ratios(&no_fr, no_fr.target("dynauthd-mmsg-s1-b64").unwrap());
        assert_eq!(x.vs_freeradius, None);
        assert!(x.of_ceiling.is_some());
    }

    #[test]
    fn the_report_states_machine_ratios_ranges_skips_and_flags() {
        let mut r = results("f1");
        r.targets[1].closed[0].flags = vec![Flag::GeneratorSaturated];
        let md = markdown(
            &r,
            &[(
                "Maximum throughput by shard count".into(),
                PathBuf::from("/x/B-throughput-by-shards.svg"),
            )],
            "B.json",
        );
        for want in [
            "AMD EPYC, 2 logical CPUs",
            "Linux 6.18",
            "abc123",
            "`f1`",
            "2026-11-21 14:00:00 UTC",
            "| dynauthd mmsg, 1 shard, batch 64 | 150,000 [140,000–160,000] | 50% | 5.00× | 6,000 | 0% | 5.00× | 100 / 300 | 90% | – | S |",
            "softirq work for the server's packets",
            "sampled by loadgen when its workers start sending and when they stop",
            "| echo ceiling | 300,000 [290,000–310,000] | 100% |",
            "| FreeRADIUS | 30,000 [28,000–35,000] |",
            "![Maximum throughput by shard count](B-throughput-by-shards.svg)",
            "dynauthd reports io_uring unavailable here: EPERM",
            "the machine is busy before the run",
            "[`B.json`](B.json)",
            "| 50% | 150,000 |",
            "150 [120–180]",
            "## Latency percentiles at half load",
            "- **G**:",
            "| FreeRADIUS | `/usr/sbin/freeradius (FreeRADIUS Version 3.2.1)` |",
            "| note | dynauthd from branch runtime |",
        ] {
            assert!(md.contains(want), "missing `{want}` in:\n{md}");
        }
    }

    /// Steal is shown beside the CPU per answer: the highest of the repetitions.
    #[test]
    fn steal_is_shown_beside_the_cpu_per_answer() {
        let mut r = results("f1");
        let t = r
            .targets
            .iter_mut()
            .find(|t| t.id == "dynauthd-mmsg-s1-b64")
            .unwrap();
        for (m, steal) in t.closed.iter_mut().zip([0.01, 0.031, 0.02]) {
            m.steal_share = Some(steal);
        }
        let md = markdown(&r, &[], "x.json");
        assert!(md.contains("| 5.00× | 6,000 | 3.1% | 5.00× |"), "{md}");
    }

    #[test]
    fn a_report_without_freeradius_says_so() {
        let mut r = results("f1");
        r.targets.retain(|t| t.kind != TargetKind::Freeradius);
        let md = markdown(&r, &[], "x.json");
        assert!(md.contains("FreeRADIUS was not measured in this run"));
        assert!(
            md.contains(
                "| dynauthd mmsg, 1 shard, batch 64 | 150,000 [140,000–160,000] | 50% | – |"
            ),
            "{md}"
        );
    }

    /// An echo ceiling whose every run was generator-bound (as it usually is) is no server
    /// figure: shown as a lower bound with the generator's capacity, flagged N, and no
    /// ratio is taken against it.
    #[test]
    fn generator_bound_runs_are_marked_and_left_out_of_the_server_figures() {
        let mut r = results("f1");
        for t in r.targets.iter_mut().filter(|t| t.kind == TargetKind::Echo) {
            for m in &mut t.closed {
                m.generator_bound = true;
                m.generator_capacity_rps = 320_000.0;
                m.flags.push(Flag::GeneratorBound);
            }
        }
        let md = markdown(&r, &[], "x.json");
        assert!(
            md.contains(
                "| echo ceiling | ≥ 300,000 (generator-bound) | | | | | | | | 320,000 | N |"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "| dynauthd mmsg, 1 shard, batch 64 | 150,000 [140,000–160,000] | – | 5.00× |"
            ),
            "no ratio against a generator figure: {md}"
        );
        assert!(md.contains("- **N**: not a server figure"), "{md}");
        assert!(headline(&r).is_some_and(|h| !h.contains("echo ceiling")));
    }

    #[test]
    fn comparisons_refuse_different_machines() {
        let a = results("aaaa");
        let b = results("bbbb");
        let e = compare("a.json", &a, "b.json", &b).unwrap_err();
        assert!(matches!(e, ReportError::DifferentMachines(_)));
        assert!(e.to_string().contains("refusing to compare"), "{e}");
        let mut c = results("aaaa");
        c.targets[1].closed = vec![closed(165_000.0, 5000.0)];
        let out = compare("a.json", &a, "c.json", &c).unwrap();
        assert!(out.contains("| dynauthd mmsg, 1 shard, batch 64 | 150,000 [140,000–160,000] | 165,000 | +10.0% |"), "{out}");
    }

    #[test]
    fn results_round_trip_through_json_and_files_with_charts() {
        let r = results("f1");
        let dir = std::env::temp_dir().join(format!("bh-report-{}", std::process::id()));
        let report = dir.join("BENCH.md");
        let written = write_all(&r, &report).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
            .collect();
        assert_eq!(
            names,
            vec![
                "BENCH.md",
                "BENCH.json",
                "BENCH-throughput-by-shards.svg",
                "BENCH-p99-vs-offered.svg",
                "BENCH-latency-at-half-load.svg"
            ]
        );
        let back = load(&dir.join("BENCH.json")).unwrap();
        assert_eq!(back, r);
        let p99 = std::fs::read_to_string(dir.join("BENCH-p99-vs-offered.svg")).unwrap();
        for name in ["echo ceiling", "dynauthd mmsg s1 b64", "FreeRADIUS"] {
            assert!(p99.contains(name), "{name} missing from the p99 chart");
        }
        let md = std::fs::read_to_string(&report).unwrap();
        assert!(md.contains("(BENCH-p99-vs-offered.svg)"));
        let mut bad = r.clone();
        bad.schema_version = 99;
        std::fs::write(dir.join("bad.json"), serde_json::to_string(&bad).unwrap()).unwrap();
        assert!(matches!(
            load(&dir.join("bad.json")),
            Err(ReportError::Schema { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn small_shares_and_ratios_keep_their_significant_digits() {
        assert_eq!(pct(Some(0.5)), "50%");
        assert_eq!(pct(Some(0.042)), "4.2%");
        assert_eq!(pct(Some(0.00135)), "0.14%");
        assert_eq!(pct(None), "–");
        assert_eq!(times(Some(12.3)), "12×");
        assert_eq!(times(Some(3.2)), "3.20×");
        assert_eq!(times(Some(0.0071)), "0.0071×");
        assert_eq!(times(Some(0.012)), "0.012×");
    }

    #[test]
    fn the_headline_names_the_fastest_dynauthd_and_its_ratios() {
        let r = results("f1");
        let h = headline(&r).unwrap();
        assert_eq!(
            h,
            "the fastest dynauthd configuration here (dynauthd mmsg, 1 shard, batch 64) answered \
             150,000 requests/s, 50% of the echo ceiling, 5.00× FreeRADIUS's throughput, using \
             0.20× FreeRADIUS's CPU per answer."
        );
        assert!(markdown(&r, &[], "x.json").contains(&format!("**In one line:** {h}")));
        let mut none = r.clone();
        none.targets.retain(|t| t.kind != TargetKind::Dynauthd);
        assert_eq!(headline(&none), None);
    }

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(-1000.0), "-1,000");
    }
}
