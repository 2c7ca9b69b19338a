//! Driving the `loadgen` binary: its command line for one closed- or open-loop run, reading
//! its `--json` report and its `.hgrm` percentile file. Owns: the harness's view of
//! loadgen's JSON (the fields it uses; see docs/LOADGEN.md for all of them). Must not touch:
//! servers, guards' thresholds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

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

/// The fields of loadgen's `--json` report the harness uses.
#[derive(Debug, Clone, Deserialize)]
pub struct LoadgenReport {
    pub mode: String,
    pub offered_rate_rps: Option<f64>,
    pub requests: u64,
    pub answered: u64,
    pub timeouts: u64,
    pub unsent: u64,
    pub achieved_rate_rps: f64,
    pub loss_ratio: f64,
    pub answers: Answers,
    pub latency: Percentiles,
    pub schedule_lag: Option<Lag>,
    pub generator: Generator,
    pub counts_add_up: bool,
}

impl LoadgenReport {
    /// Answers that failed verification.
    pub fn invalid_answers(&self) -> u64 {
        let a = &self.answers;
        a.bad_response_authenticators
            + a.bad_message_authenticators
            + a.echo_mismatches
            + a.answered_discards
            + a.malformed
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Answers {
    #[serde(default)]
    pub ack_disconnect: u64,
    #[serde(default)]
    pub ack_coa: u64,
    #[serde(default)]
    pub nak_disconnect: u64,
    #[serde(default)]
    pub nak_coa: u64,
    #[serde(default)]
    pub echo_ok: u64,
    pub bad_response_authenticators: u64,
    pub bad_message_authenticators: u64,
    pub echo_mismatches: u64,
    pub answered_discards: u64,
    pub malformed: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Percentiles {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Lag {
    pub p99_us: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Generator {
    pub cpu_ns_per_request: f64,
    pub worker_utilisation: f64,
    pub process_user_s: f64,
    pub process_system_s: f64,
}

/// Closed loop (a window of outstanding requests) or open loop (a rate).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    Window(usize),
    Rate(f64),
}

/// Everything one loadgen run needs.
#[derive(Debug, Clone)]
pub struct LoadgenRun {
    pub program: PathBuf,
    /// `taskset` to pin the whole process (workers are pinned by `--cpus` too).
    pub taskset: Option<PathBuf>,
    pub target: SocketAddr,
    pub secret: String,
    pub sessions_file: PathBuf,
    pub mix: String,
    pub cpus: Vec<usize>,
    pub threads: usize,
    pub duration_ms: u64,
    pub timeout_ms: u64,
    pub echo: bool,
    pub load: Load,
    pub histogram_file: Option<PathBuf>,
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
        push("--sessions", self.sessions_file.display().to_string());
        push("--mix", self.mix.clone());
        push("--threads", self.threads.max(1).to_string());
        push("--cpus", cpu_list(&self.cpus));
        push("--duration", format!("{}ms", self.duration_ms));
        push("--timeout", format!("{}ms", self.timeout_ms));
        match self.load {
            Load::Window(w) => push("--window", w.to_string()),
            Load::Rate(r) => push("--rate", format!("{r:.0}")),
        }
        if self.echo {
            push("--expect", "echo".into());
        }
        if let Some(h) = &self.histogram_file {
            push("--histogram-file", h.display().to_string());
        }
        v.push("--json".into());
        v.push("--quiet".into());
        v
    }

    /// Runs loadgen to the end and parses its report.
    pub fn run(&self) -> Result<LoadgenReport, LoadgenError> {
        let argv = self.command_line();
        let out = Command::new(&argv[0])
            .args(&argv[1..])
            .output()
            .map_err(|source| LoadgenError::Spawn {
                program: argv[0].clone(),
                source,
            })?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        // A report whose counts do not add up exits non-zero but still prints the JSON; the
        // guard flags mark it.
        match serde_json::from_str::<LoadgenReport>(&stdout) {
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
mod tests {
    use super::*;

    fn run(load: Load) -> LoadgenRun {
        LoadgenRun {
            program: "/x/loadgen".into(),
            taskset: Some("/usr/bin/taskset".into()),
            target: "127.0.0.1:4000".parse().unwrap(),
            secret: "s".into(),
            sessions_file: "/t/s.jsonl".into(),
            mix: "coa=9,unknown=1".into(),
            cpus: vec![0, 2],
            threads: 2,
            duration_ms: 300,
            timeout_ms: 250,
            echo: false,
            load,
            histogram_file: None,
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
        assert!(!s.contains("--rate"), "{s}");
        assert!(s.ends_with("--json --quiet"), "{s}");
        let mut r = run(Load::Rate(12_345.4));
        r.echo = true;
        r.taskset = None;
        let s = r.command_line().join(" ");
        assert!(s.starts_with("/x/loadgen "), "{s}");
        assert!(s.contains("--rate 12345 --expect echo"), "{s}");
        assert!(!s.contains("--window"), "{s}");
    }

    #[test]
    fn loadgen_json_is_read() {
        let json = r#"{"target":"127.0.0.1:1","mode":"open-loop","profile":"churn","expect":"radius",
          "threads":1,"sockets":4,"window":null,"offered_rate_rps":1000.0,"send_seconds":1.0,
          "wall_seconds":1.1,"requests":1000,"transmissions":1000,"retransmissions":0,"answered":990,
          "timeouts":10,"expected_discards":0,"unsent":0,"send_errors":0,"sent_rate_rps":1000.0,
          "achieved_rate_rps":990.0,"loss_ratio":0.01,
          "answers":{"ack_disconnect":0,"ack_coa":900,"ack_residual_201":0,"nak_disconnect":0,"nak_coa":90,
            "nak_by_error_cause":{"503":90},"unexpected_codes":0,"bad_response_authenticators":1,
            "bad_message_authenticators":0,"echo_ok":0,"echo_mismatches":0,"answered_discards":0,
            "expectation_mismatches":0,"stray":0,"malformed":0},
          "latency":{"count":990,"min_us":10.0,"mean_us":50.0,"p50_us":40.0,"p90_us":80.0,"p99_us":200.0,"p999_us":400.0,"max_us":900.0},
          "schedule_lag":{"p50_us":1.0,"p99_us":5.0,"max_us":9.0},
          "generator":{"worker_cpu_s":0.1,"cpu_ns_per_request":3000.0,"worker_utilisation":0.2,"process_user_s":0.05,
            "process_system_s":0.06,"sendmmsg_per_request":0.1,"recvmmsg_per_request":0.1,"ppoll_per_request":0.1},
          "interrupted":false,"counts_add_up":true}"#;
        let r: LoadgenReport = serde_json::from_str(json).unwrap();
        assert_eq!(r.answered, 990);
        assert_eq!(r.schedule_lag.as_ref().unwrap().p99_us, 5.0);
        assert_eq!(r.latency.p99_us, 200.0);
        assert_eq!(r.invalid_answers(), 1);
        assert_eq!((r.answers.ack_coa, r.answers.nak_coa), (900, 90));
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
