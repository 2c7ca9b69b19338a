//! The sessions file is written once per suite and no loadgen run of a sweep reads it: the
//! harness runs loadgen through a wrapper that logs every command line, and the log shows
//! one `loadgen sessions` (the file the servers load) and runs that take `--synthetic N
//! --seed S` (the same sessions, generated in memory), never `--sessions FILE`. Needs
//! `target/<profile>/loadgen` built (or BENCH_HARNESS_LOADGEN). A test binary of its own: a
//! script written while another test thread forks could not be executed ("text file busy").

use std::path::{Path, PathBuf};
use std::process::Command;

fn loadgen() -> PathBuf {
    let p = std::env::var_os("BENCH_HARNESS_LOADGEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_BIN_EXE_bench-harness"))
                .parent()
                .expect("bench-harness has a directory")
                .join("loadgen")
        });
    assert!(
        p.is_file(),
        "{} not found: build loadgen first (`cargo build -p dynauth-loadgen`), or set BENCH_HARNESS_LOADGEN",
        p.display()
    );
    p
}

#[test]
fn a_suite_writes_the_sessions_once_and_no_run_reads_them() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("bench-harness-once-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("argv.log");
    let wrapper = dir.join("loadgen");
    // `exec` keeps the process id, so the harness still stops and measures the echo server.
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$*\" >> '{}'\nexec '{}' \"$@\"\n",
            log.display(),
            loadgen().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bench-harness"))
        .args([
            "--quick",
            "--duration-ms",
            "200",
            "--points",
            "0.5,1.0",
            "--repetitions",
            "2",
            "--targets",
            "echo",
            "--sessions",
            "700",
            "--seed",
            "5",
            "--timeout-ms",
            "200",
        ])
        .arg("--report")
        .arg(dir.join("B.md"))
        .arg("--loadgen")
        .arg(&wrapper)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench-harness failed:\n{stderr}");
    let log = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    let writes: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("sessions "))
        .collect();
    assert_eq!(writes.len(), 1, "{log}");
    assert!(writes[0].contains("--count 700 --seed 5"), "{log}");
    let runs: Vec<&&str> = lines.iter().filter(|l| l.contains("--target")).collect();
    // Warm-up, 2 closed-loop repetitions, 2 points x 2 repetitions.
    assert!(runs.len() >= 7, "{log}");
    for r in &runs {
        assert!(r.contains("--synthetic 700 --seed 5 "), "{r}");
        assert!(!r.contains("--sessions"), "{r}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
