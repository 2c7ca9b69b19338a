//! Driving the `loadgen` binary: its command line for one closed- or open-loop run, reading
//! its `--json` report (through loadgen's own [`RunReport`] type) and its `.hgrm`
//! percentile file. Must not touch: servers, guards' thresholds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::results::DistPoint;

#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error("starting {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("loadgen failed ({status}): {stderr}")]
    Failed { status: String, stderr: String },
    #[error("loadgen's JSON report could not be read: {0}")]
    Json(#[from] serde_json::Error),
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

/// loadgen's `--json` report: the type loadgen itself serialises (one definition of the
/// schema, in the loadgen library).
pub use dynauth_loadgen::report::RunReport;

/// Reads loadgen's `--json` output.
pub fn parse_report(json: &str) -> Result<RunReport, serde_json::Error> {
    serde_json::from_str(json)
}

/// Closed loop (a window of outstanding requests) or open loop (a rate).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    Window(usize),
    Rate(f64),
    /// loadgen's SLO capacity search: p99 under `slo_p99_ms` and loss under `slo_loss`,
    /// offered rates up to `max_rps`, steps of the run's duration.
    Capacity {
        slo_p99_ms: u64,
        slo_loss: f64,
        max_rps: f64,
    },
}

/// loadgen's capacity-search report (its own type).
pub use dynauth_loadgen::capacity::CapacityReport;

/// Everything one loadgen run needs.
#[derive(Debug, Clone)]
pub struct LoadgenRun {
    pub program: PathBuf,
    /// `taskset` to pin the whole process (workers are pinned by `--cpus` too).
    pub taskset: Option<PathBuf>,
    pub target: SocketAddr,
    pub secret: String,
    /// The sessions, as `--synthetic COUNT --seed SEED`: the same sessions
    /// [`write_sessions`] wrote for the server (`loadgen sessions --count COUNT --seed SEED`),
    /// generated in loadgen's memory, so no run of a sweep reads or parses the sessions file
    /// (only the server does, once, when it starts).
    pub sessions: usize,
    pub seed: u64,
    pub mix: String,
    pub cpus: Vec<usize>,
    pub threads: usize,
    pub duration_ms: u64,
    pub timeout_ms: u64,
    pub echo: bool,
    pub load: Load,
    pub histogram_file: Option<PathBuf>,
    /// loadgen's `--source-ports` (source sockets per thread); `None`: its default.
    pub source_ports: Option<usize>,
    /// loadgen's `--server-pid`: the server whose threads' CPU loadgen samples at the start
    /// and the end of its measured window.
    pub server_pid: Option<u32>,
}

/// A CPU list as the tools take it: "0,2,3".
pub fn cpu_list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

impl LoadgenRun {
    /// The program and its arguments.
    pub fn command_line(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(t) = &self.taskset {
            v.push(t.display().to_string());
            v.push("-c".into());
            v.push(cpu_list(&self.cpus));
        }
        v.push(self.program.display().to_string());
        let mut push = |a: &str, b: String| {
            v.push(a.to_string());
            v.push(b);
        };
        push("--target", self.target.to_string());
        push("--bind", self.target.ip().to_string());
        push("--secret", self.secret.clone());
        push("--synthetic", self.sessions.to_string());
        push("--seed", self.seed.to_string());
        push("--mix", self.mix.clone());
        push("--threads", self.threads.max(1).to_string());
        push("--cpus", cpu_list(&self.cpus));
        push("--duration", format!("{}ms", self.duration_ms));
        push("--timeout", format!("{}ms", self.timeout_ms));
        match self.load {
            Load::Window(w) => push("--window", w.to_string()),
            Load::Rate(r) => push("--rate", format!("{r:.0}")),
            Load::Capacity {
                slo_p99_ms,
                slo_loss,
                max_rps,
            } => {
                push("--slo-p99", format!("{slo_p99_ms}ms"));
                push("--slo-loss", format!("{slo_loss}"));
                // From an eighth of the closed-loop maximum (`max_rps` is twice it): three
                // doublings reach it; 20 steps leave room for the bisection and for the
                // second run of every failing rate.
                push(
                    "--capacity-min",
                    format!("{:.0}", (max_rps / 16.0).max(100.0)),
                );
                push("--capacity-max", format!("{max_rps:.0}"));
                push("--capacity-steps", "20".into());
            }
        }
        if self.echo {
            push("--expect", "echo".into());
        }
        if let Some(h) = &self.histogram_file {
            push("--histogram-file", h.display().to_string());
        }
        if let Some(n) = self.source_ports {
            push("--source-ports", n.to_string());
        }
        if let Some(pid) = self.server_pid {
            push("--server-pid", pid.to_string());
        }
        v.push("--json".into());
        v.push("--quiet".into());
        v
    }

    /// Runs loadgen to the end and parses its report.
    pub fn run(&self) -> Result<RunReport, LoadgenError> {
        self.run_json()
    }

    /// Runs loadgen's SLO capacity search (`load` must be [`Load::Capacity`]) and parses its
    /// report; a search in which no rate passed still reports its steps.
    pub fn run_capacity(&self) -> Result<CapacityReport, LoadgenError> {
        self.run_json()
    }

    /// Runs loadgen and reads its `--json` output as `T`. A run that exits non-zero but
    /// still prints its JSON (counts that do not add up, a search with no passing rate)
    /// is read; the guard flags mark it.
    fn run_json<T: serde::de::DeserializeOwned>(&self) -> Result<T, LoadgenError> {
        let argv = self.command_line();
        let out = Command::new(&argv[0])
            .args(&argv[1..])
            .output()
            .map_err(|source| LoadgenError::Spawn {
                program: argv[0].clone(),
                source,
            })?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        match serde_json::from_str(&stdout) {
            Ok(r) => Ok(r),
            Err(e) if out.status.success() => Err(LoadgenError::Json(e)),
            Err(_) => Err(LoadgenError::Failed {
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            }),
        }
    }
}

/// Writes the synthetic sessions file with `loadgen sessions`.
pub fn write_sessions(
    program: &Path,
    count: usize,
    seed: u64,
    out: &Path,
) -> Result<(), LoadgenError> {
    let o = Command::new(program)
        .args([
            "sessions",
            "--count",
            &count.to_string(),
            "--seed",
            &seed.to_string(),
        ])
        .arg("--out")
        .arg(out)
        .output()
        .map_err(|source| LoadgenError::Spawn {
            program: program.display().to_string(),
            source,
        })?;
    if !o.status.success() {
        return Err(LoadgenError::Failed {
            status: o.status.to_string(),
            stderr: String::from_utf8_lossy(&o.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Reads an HdrHistogram `.hgrm` percentile distribution (values in milliseconds) as
/// percentiles in microseconds.
pub fn read_hgrm(path: &Path) -> Result<Vec<DistPoint>, LoadgenError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadgenError::Read {
        path: path.display().to_string(),
        source,
    })?;
    Ok(parse_hgrm(&text))
}

/// Lines `Value Percentile TotalCount 1/(1-Percentile)`; headers, the summary footer and
/// the 100% line's infinite last column are skipped or tolerated.
pub fn parse_hgrm(text: &str) -> Vec<DistPoint> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(v), Some(p)) = (f.next(), f.next()) else {
            continue;
        };
        let (Ok(ms), Ok(q)) = (v.parse::<f64>(), p.parse::<f64>()) else {
            continue;
        };
        if !(0.0..=1.0).contains(&q) {
            continue;
        }
        out.push(DistPoint {
            percentile: q * 100.0,
            latency_us: ms * 1000.0,
        });
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn run(load: Load) -> LoadgenRun {
        LoadgenRun {
            program: "/x/loadgen".into(),
            taskset: Some("/usr/bin/taskset".into()),
            target: "127.0.0.1:4000".parse().unwrap(),
            secret: "s".into(),
            sessions: 5000,
            seed: 7,
            mix: "coa=9,unknown=1".into(),
            cpus: vec![0, 2],
            threads: 2,
            duration_ms: 300,
            timeout_ms: 250,
            echo: false,
            load,
            histogram_file: None,
            source_ports: None,
            server_pid: None,
        }
    }

    #[test]
    fn command_lines_pin_and_choose_the_loop() {
        let c = run(Load::Window(128)).command_line();
        assert_eq!(&c[..4], &["/usr/bin/taskset", "-c", "0,2", "/x/loadgen"]);
        let s = c.join(" ");
        assert!(s.contains("--window 128"), "{s}");
        assert!(s.contains("--cpus 0,2 "), "{s}");
        assert!(s.contains("--duration 300ms --timeout 250ms"), "{s}");
        // The sessions are generated, not read from the file the server loaded.
        assert!(s.contains("--synthetic 5000 --seed 7 "), "{s}");
        assert!(!s.contains("--sessions"), "{s}");
        assert!(!s.contains("--rate"), "{s}");
        assert!(s.ends_with("--json --quiet"), "{s}");
        let mut r = run(Load::Rate(12_345.4));
        r.echo = true;
        r.taskset = None;
        let s = r.command_line().join(" ");
        assert!(s.starts_with("/x/loadgen "), "{s}");
        assert!(s.contains("--rate 12345 --expect echo"), "{s}");
        assert!(!s.contains("--window"), "{s}");
        assert!(!s.contains("--source-ports"), "{s}");
        let mut r = run(Load::Window(64));
        r.source_ports = Some(128);
        let s = r.command_line().join(" ");
        assert!(s.contains("--source-ports 128"), "{s}");
        assert!(!s.contains("--server-pid"), "{s}");
        r.server_pid = Some(4321);
        let s = r.command_line().join(" ");
        assert!(s.contains("--server-pid 4321"), "{s}");
    }

    /// `a` and `b` have the same keys, strings, integers and booleans, and floats within
    /// 1e-12 of each other.
    fn assert_same(a: &serde_json::Value, b: &serde_json::Value, at: &str) {
        use serde_json::Value;
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let keys =
                    |o: &serde_json::Map<String, Value>| o.keys().cloned().collect::<Vec<_>>();
                assert_eq!(keys(x), keys(y), "keys at {at}");
                for (k, v) in x {
                    assert_same(v, &y[k], &format!("{at}.{k}"));
                }
            }
            (Value::Array(x), Value::Array(y)) => {
                assert_eq!(x.len(), y.len(), "length at {at}");
                for (i, (v, w)) in x.iter().zip(y).enumerate() {
                    assert_same(v, w, &format!("{at}[{i}]"));
                }
            }
            (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
                let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                assert!(
                    (x - y).abs() <= 1e-12 * x.abs().max(1.0),
                    "{at}: {x} != {y}"
                );
            }
            _ => assert_eq!(a, b, "at {at}"),
        }
    }

    /// A real loadgen run of `requests` requests at 2,000/s against its own echo server on
    /// loopback (the tests of the harness's readers start from one).
    pub(crate) fn echo_run(requests: u64) -> dynauth_loadgen::Report {
        let server = dynauth_loadgen::echo::EchoServer::loopback().unwrap();
        let target = server.local_addr().to_string();
        let requests = requests.to_string();
        let args = dynauth_loadgen::RunArgs::from_args([
            "--target",
            &target,
            "--bind",
            "127.0.0.1",
            "--expect",
            "echo",
            "--rate",
            "2000",
            "--requests",
            &requests,
            "--timeout",
            "500ms",
            "--quiet",
        ])
        .unwrap();
        let report = dynauth_loadgen::run(&args).unwrap();
        server.stop().unwrap();
        report
    }

    /// A report from loadgen itself (a real run against its echo server on loopback),
    /// written as the binary writes it, reads back through the harness's reader unchanged.
    #[test]
    fn loadgen_json_round_trips_through_the_harness_reader() {
        let report = echo_run(200);
        let json = serde_json::to_string_pretty(&report.run).unwrap();
        let read = parse_report(&json).unwrap();
        // (serde_json's float parsing may miss the last bit of a double: compare the rest
        // exactly, floats to 1e-12.)
        assert_same(
            &serde_json::to_value(&read).unwrap(),
            &serde_json::to_value(&report.run).unwrap(),
            "",
        );
        assert_eq!(read.requests, 200);
        assert_eq!(read.mode, dynauth_loadgen::report::LoopMode::OpenLoop);
        assert_eq!(read.answers.echo_ok + read.timeouts, 200);
        // Every field the binary writes is one the reader knows (nothing dropped on the way).
        let written: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_same(&serde_json::to_value(&read).unwrap(), &written, "");
        // Not a loadgen report: refused, not half read.
        assert!(parse_report(r#"{"requests": 1}"#).is_err());
    }

    #[test]
    fn hgrm_files_become_percentiles_in_microseconds() {
        let text = "       Value     Percentile TotalCount 1/(1-Percentile)\n\n\
                    \x20      0.050 0.000000000000          1           1.00\n\
                    \x20      0.100 0.500000000000        500           2.00\n\
                    \x20      0.400 0.990000000000        990         100.00\n\
                    \x20      1.200 1.000000000000       1000            inf\n\
                    #[Mean    =        0.120, StdDeviation   =        0.050]\n\
                    #[Max     =        1.200, Total count    =         1000]\n";
        let d = parse_hgrm(text);
        assert_eq!(d.len(), 4);
        assert_eq!(d[1].percentile, 50.0);
        assert!((d[2].latency_us - 400.0).abs() < 1e-9);
        assert_eq!(d[3].percentile, 100.0);
    }
}
