//! The machine a run happened on: CPU model, cores, memory, kernel, date, git commit, load,
//! and the fingerprint that keeps runs from different machines apart. Also the CPU clocks the
//! guards read: `/proc/stat` (the whole machine) and `/proc/<pid>/stat` (one process).
//! Owns: parsing those files and the fingerprint's definition. Must not touch: starting
//! servers, the report's layout.

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Why a machine figure could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: unexpected format")]
    Format { path: String },
}

fn read(path: &str) -> Result<String, MachineError> {
    std::fs::read_to_string(path).map_err(|source| MachineError::Read {
        path: path.into(),
        source,
    })
}

/// The machine description stored with every run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub logical_cpus: usize,
    pub mem_total_kib: u64,
    /// `uname -sr`.
    pub kernel: String,
    pub hostname: String,
    /// Hex digest of CPU model, logical CPUs, memory and kernel (see [`fingerprint`]).
    pub fingerprint: String,
    /// The commit the harness ran from (`git describe --always --dirty`), when known.
    pub git_commit: Option<String>,
    /// 1, 5 and 15 minute load averages at the start.
    pub load_average: [f64; 3],
}

impl Machine {
    /// Reads this machine's description.
    pub fn detect() -> Machine {
        let cpuinfo = read("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpu_model(&cpuinfo).unwrap_or_else(|| "unknown CPU".into());
        let logical_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let logical_cpus = online_cpus().unwrap_or(logical_cpus);
        let mem_total_kib = read("/proc/meminfo")
            .ok()
            .and_then(|m| mem_total_kib(&m))
            .unwrap_or(0);
        let kernel = command_line("uname", &["-sr"]).unwrap_or_else(|| "unknown kernel".into());
        let hostname = read("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let load_average = load_average().unwrap_or([0.0; 3]);
        let git_commit = command_line("git", &["describe", "--always", "--dirty", "--abbrev=12"]);
        Machine {
            fingerprint: fingerprint(&cpu_model, logical_cpus, mem_total_kib, &kernel),
            cpu_model,
            logical_cpus,
            mem_total_kib,
            kernel,
            hostname,
            git_commit,
            load_average,
        }
    }
}

/// Runs a command and returns its first line of output, trimmed, when it succeeds.
fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8_lossy(&out.stdout);
    let line = s.lines().next()?.trim().to_string();
    (!line.is_empty()).then_some(line)
}

/// The first `model name` of /proc/cpuinfo.
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// `MemTotal` of /proc/meminfo, in KiB.
pub fn mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn online_cpus() -> Option<usize> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    let mut n = 0;
    for part in s.trim().split(',') {
        match part.split_once('-') {
            Some((a, b)) => n += b.parse::<usize>().ok()? - a.parse::<usize>().ok()? + 1,
            None => {
                part.parse::<usize>().ok()?;
                n += 1;
            }
        }
    }
    (n > 0).then_some(n)
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> Result<[f64; 3], MachineError> {
    let s = read("/proc/loadavg")?;
    parse_loadavg(&s).ok_or(MachineError::Format {
        path: "/proc/loadavg".into(),
    })
}

pub fn parse_loadavg(s: &str) -> Option<[f64; 3]> {
    let mut it = s.split_whitespace().map(|x| x.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// A machine's identity for comparisons: FNV-1a (64 bits, stable across Rust versions) over
/// the CPU model, the logical CPU count, the memory rounded to GiB and the kernel release.
/// The hostname is left out (containers rename the same machine).
pub fn fingerprint(
    cpu_model: &str,
    logical_cpus: usize,
    mem_total_kib: u64,
    kernel: &str,
) -> String {
    let text = format!(
        "cpu={cpu_model}\ncpus={logical_cpus}\nmem_gib={}\nkernel={kernel}",
        (mem_total_kib + (1 << 19)) >> 20
    );
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Whole-machine CPU time from the first line of /proc/stat, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    /// user + nice + system: time spent running processes (interrupts and softirqs, where
    /// the loopback's UDP delivery runs, are separate columns).
    pub process: u64,
    /// Every column except idle and iowait.
    pub busy: u64,
    /// Every column.
    pub total: u64,
}

impl CpuTimes {
    pub fn now() -> Result<CpuTimes, MachineError> {
        parse_proc_stat(&read("/proc/stat")?).ok_or(MachineError::Format {
            path: "/proc/stat".into(),
        })
    }
}

pub fn parse_proc_stat(s: &str) -> Option<CpuTimes> {
    let v = dynauth_loadgen::watch::proc_stat_cpu_ticks(s)?;
    // user nice system idle iowait irq softirq steal guest guest_nice
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some(CpuTimes {
        process: v[0] + v[1] + v[2],
        busy: total - idle,
        total,
    })
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on every mainstream Linux).
pub fn clock_ticks() -> f64 {
    command_line("getconf", &["CLK_TCK"])
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|&t| t > 0.0)
        .unwrap_or(100.0)
}

/// User + system CPU time of a process (every thread), in clock ticks, from
/// `/proc/<pid>/stat`.
pub fn process_ticks(pid: u32) -> Result<u64, MachineError> {
    let path = format!("/proc/{pid}/stat");
    let s = read(&path)?;
    parse_pid_stat(&s).ok_or(MachineError::Format { path })
}

/// utime (field 14) + stime (field 15); the command name (field 2) may hold spaces and
/// parentheses, so fields are counted after its last ')'.
pub fn parse_pid_stat(s: &str) -> Option<u64> {
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, i.e. index 11.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// How busy the machine is right now, in cores, sampled over `window`.
pub fn busy_cores(window: std::time::Duration, cpus: usize) -> Result<f64, MachineError> {
    let a = CpuTimes::now()?;
    std::thread::sleep(window);
    let b = CpuTimes::now()?;
    let total = (b.total - a.total).max(1) as f64;
    Ok((b.busy - a.busy) as f64 / total * cpus as f64)
}

/// Now, in UTC, as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format_utc(secs)
}

/// A Unix time as `YYYY-MM-DD HH:MM:SS UTC` (proleptic Gregorian calendar).
pub fn format_utc(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// "PATH (first line of `PATH ARG`)" for the record: `--version` for clap programs, `-v` for
/// FreeRADIUS. A program that does not answer within 3 s is killed and recorded by path only.
pub fn program_version(path: &Path, arg: &str) -> String {
    let child = Command::new(path)
        .arg(arg)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return path.display().to_string();
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return path.display().to_string();
            }
        }
    }
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut o, &mut out);
    }
    match out.lines().map(str::trim).find(|l| !l.is_empty()) {
        Some(line) if child.wait().is_ok_and(|s| s.success()) => {
            format!("{} ({line})", path.display())
        }
        _ => path.display().to_string(),
    }
}

/// Whether a path is an executable file.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The first executable named `name` on PATH.
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_model_and_memory_are_read_from_proc_text() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(cpu_model(cpuinfo).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(
            mem_total_kib("MemTotal:       8145236 kB\nMemFree: 1 kB\n"),
            Some(8_145_236)
        );
        assert_eq!(
            parse_loadavg("0.52 1.10 2.00 1/234 5678\n"),
            Some([0.52, 1.10, 2.00])
        );
    }

    #[test]
    fn fingerprint_changes_with_the_machine_but_not_with_the_same_inputs() {
        let a = fingerprint("AMD EPYC", 2, 8_000_000, "Linux 6.18");
        assert_eq!(a, fingerprint("AMD EPYC", 2, 8_000_000, "Linux 6.18"));
        assert_eq!(a.len(), 16);
        assert_ne!(a, fingerprint("AMD EPYC", 4, 8_000_000, "Linux 6.18"));
        assert_ne!(a, fingerprint("Intel Xeon", 2, 8_000_000, "Linux 6.18"));
        assert_ne!(a, fingerprint("AMD EPYC", 2, 8_000_000, "Linux 6.1"));
        assert_ne!(a, fingerprint("AMD EPYC", 2, 16_000_000, "Linux 6.18"));
    }

    #[test]
    fn proc_stat_lines_parse_into_ticks() {
        let s = "cpu  100 5 50 1000 20 3 7 0 0 0\ncpu0 1 2 3 4\n";
        let t = parse_proc_stat(s).unwrap();
        assert_eq!(t.process, 155);
        assert_eq!(t.total, 1185);
        assert_eq!(t.busy, 1185 - 1020);
        // comm with spaces and parentheses
        let pid = "1234 (my (odd) name) S 1 1 1 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 1 0 5 0 0";
        assert_eq!(parse_pid_stat(pid), Some(325));
        assert_eq!(parse_pid_stat("garbage"), None);
    }

    #[test]
    fn this_process_has_readable_cpu_times_and_a_missing_one_is_an_error() {
        assert!(process_ticks(std::process::id()).is_ok());
        assert!(process_ticks(u32::MAX).is_err());
        assert!(CpuTimes::now().unwrap().total > 0);
    }

    #[test]
    fn program_versions_are_recorded_with_their_path() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("bh-version-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = |name: &str, body: &str| {
            let p = dir.join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            p
        };
        let good = script("good", "echo; echo \"tool 1.2 ($1)\"");
        let bad = script("bad", "echo nope; exit 3");
        // A just-written script can be briefly "text file busy" while another test thread
        // forks; retry.
        let got = (0..5)
            .map(|_| program_version(&good, "--version"))
            .find(|v| v.contains("tool"))
            .unwrap_or_default();
        assert_eq!(got, format!("{} (tool 1.2 (--version))", good.display()));
        assert_eq!(program_version(&bad, "-v"), bad.display().to_string());
        assert_eq!(
            program_version(&dir.join("missing"), "-v"),
            dir.join("missing").display().to_string()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn utc_dates_are_formatted_from_unix_time() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_utc(1_795_263_234), "2026-11-21 12:13:54 UTC");
    }
}
