//! The server's CPU over the measured window (`--server-pid`): user + system time of each of
//! the server's threads (`/proc/<pid>/task/<tid>/stat`) and the machine's steal time
//! (`/proc/stat`), sampled when the workers start sending and again when the last one has
//! stopped, so loadgen's own start-up (reading sessions, preparing requests, opening sockets)
//! and the final drain are outside it. Only for a server on this machine.
//!
//! What it counts: the CPU the kernel charges to the server's threads, in user and in system
//! mode (the system calls, including the UDP stack work done in them). Not counted: softirq
//! work for the server's packets that runs on other CPUs or outside its threads' time (the
//! loopback's packet delivery, for one), nor a thread that exits inside the window (counted
//! in [`ServerCpu::threads_exited`]). Resolution: one clock tick (`CLK_TCK`, usually 10 ms)
//! per thread at each end.
#![forbid(unsafe_code)]

use std::path::Path;

use serde::{Deserialize, Serialize};

/// User and system clock ticks of one thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadTicks {
    pub tid: u32,
    pub user: u64,
    pub system: u64,
}

/// One sample of a process's threads and the machine's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Sorted by thread id.
    pub threads: Vec<ThreadTicks>,
    /// The machine's steal ticks (all CPUs).
    pub steal: u64,
    /// The machine's ticks in every column (all CPUs).
    pub total: u64,
}

/// The server's CPU between two samples, as reported (in clock ticks; `CLK_TCK` per second).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerCpu {
    pub pid: u32,
    /// Wall time between the two samples (the measured window: first send to end of sending).
    pub window_s: f64,
    /// User ticks of the server's threads over the window (summed over threads).
    pub user_ticks: u64,
    /// System ticks of the server's threads over the window.
    pub system_ticks: u64,
    /// Threads alive at the end of the window.
    pub threads: usize,
    /// Threads alive at the start and gone at the end: their CPU in the window is missing.
    pub threads_exited: usize,
    /// Steal ticks of the whole machine over the window (the hypervisor ran someone else).
    pub machine_steal_ticks: u64,
    /// Every tick of the whole machine over the window (all CPUs, all columns).
    pub machine_ticks: u64,
}

impl ServerCpu {
    /// The share of the machine's CPU time stolen during the window (0 when unknown).
    pub fn steal_share(&self) -> f64 {
        if self.machine_ticks == 0 {
            0.0
        } else {
            self.machine_steal_ticks as f64 / self.machine_ticks as f64
        }
    }
}

/// utime (field 14) and stime (field 15) of a `/proc/<pid>[/task/<tid>]/stat` line; the
/// command name (field 2) may hold spaces and parentheses, so fields are counted after its
/// last ')'.
pub fn parse_stat(s: &str) -> Option<(u64, u64)> {
    let rest = &s[s.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    // rest starts at field 3 (state): utime is field 14, the 12th from here.
    let user = f.nth(11)?.parse().ok()?;
    let system = f.next()?.parse().ok()?;
    Some((user, system))
}

/// The tick counts of the `cpu ` line (all CPUs) of `/proc/stat`, in the kernel's order (user
/// nice system idle iowait irq softirq steal guest guest_nice); `None` unless it has at
/// least the first four, all numbers. The harness reads its busy/idle split from the same.
pub fn proc_stat_cpu_ticks(s: &str) -> Option<Vec<u64>> {
    let line = s.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    (v.len() >= 4).then_some(v)
}

/// Steal and total ticks from the `cpu ` line of `/proc/stat`
/// (user nice system idle iowait irq softirq steal guest guest_nice; guest time is already
/// in user, so the total is the first eight).
pub fn parse_machine_stat(s: &str) -> Option<(u64, u64)> {
    let v = proc_stat_cpu_ticks(s)?;
    Some((
        v.get(7).copied().unwrap_or(0),
        v.iter().take(8).sum::<u64>(),
    ))
}

/// Samples process `pid` under `proc_root` (`/proc`, or a fixture directory of the same
/// layout): every `task/<tid>/stat`, and `stat` at the root. A thread that exits while it is
/// being read is left out.
pub fn sample_at(proc_root: &Path, pid: u32) -> std::io::Result<Sample> {
    let task = proc_root.join(pid.to_string()).join("task");
    let mut threads = Vec::new();
    for entry in std::fs::read_dir(&task)? {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue; // exited between the listing and the read
        };
        let (user, system) = parse_stat(&text).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: unexpected format", entry.path().display()),
            )
        })?;
        threads.push(ThreadTicks { tid, user, system });
    }
    threads.sort_by_key(|t| t.tid);
    let machine = std::fs::read_to_string(proc_root.join("stat"))?;
    let (steal, total) = parse_machine_stat(&machine).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "/proc/stat: unexpected format",
        )
    })?;
    Ok(Sample {
        threads,
        steal,
        total,
    })
}

/// Samples process `pid` now.
pub fn sample(pid: u32) -> std::io::Result<Sample> {
    sample_at(Path::new("/proc"), pid)
}

/// The CPU between `start` and `end` (`window_s` apart): per thread, its ticks at the end
/// less its ticks at the start (a thread born inside the window from zero); threads gone by
/// the end are counted, not guessed.
pub fn between(pid: u32, start: &Sample, end: &Sample, window_s: f64) -> ServerCpu {
    let before = |tid: u32| {
        start
            .threads
            .binary_search_by_key(&tid, |t| t.tid)
            .ok()
            .map(|i| start.threads[i])
    };
    let (mut user, mut system) = (0u64, 0u64);
    for t in &end.threads {
        let (u0, s0) = before(t.tid).map_or((0, 0), |b| (b.user, b.system));
        user += t.user.saturating_sub(u0);
        system += t.system.saturating_sub(s0);
    }
    let threads_exited = start
        .threads
        .iter()
        .filter(|t| end.threads.binary_search_by_key(&t.tid, |e| e.tid).is_err())
        .count();
    ServerCpu {
        pid,
        window_s,
        user_ticks: user,
        system_ticks: system,
        threads: end.threads.len(),
        threads_exited,
        machine_steal_ticks: end.steal.saturating_sub(start.steal),
        machine_ticks: end.total.saturating_sub(start.total),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat_line(tid: u32, comm: &str, user: u64, system: u64) -> String {
        format!(
            "{tid} ({comm}) S 1 1 1 0 -1 4194560 100 0 0 0 {user} {system} 0 0 20 0 4 0 5 0 0\n"
        )
    }

    /// A fixture `/proc` with process 42 and the given threads, and a machine line.
    fn fixture(dir: &Path, threads: &[(u32, &str, u64, u64)], steal: u64, idle: u64) {
        let _ = std::fs::remove_dir_all(dir);
        for &(tid, comm, u, s) in threads {
            let d = dir.join("42/task").join(tid.to_string());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("stat"), stat_line(tid, comm, u, s)).unwrap();
        }
        std::fs::write(
            dir.join("stat"),
            format!("cpu  100 0 50 {idle} 0 0 10 {steal} 0 0\ncpu0 1 2 3 4\nintr 5\n"),
        )
        .unwrap();
    }

    #[test]
    fn task_stat_lines_parse_even_with_odd_command_names() {
        assert_eq!(
            parse_stat(&stat_line(7, "shard (3) x", 250, 75)),
            Some((250, 75))
        );
        assert_eq!(parse_stat("7 (short) S 1 2"), None);
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(
            parse_machine_stat("cpu  1 2 3 4 5 6 7 8 9 10\n"),
            Some((8, 36))
        );
        // Old kernels without a steal column.
        assert_eq!(parse_machine_stat("cpu  1 2 3 4\n"), Some((0, 10)));
        assert_eq!(parse_machine_stat("cpu0 1 2 3 4\n"), None);
    }

    /// Only what happened between the two samples counts: CPU a thread used before the
    /// window (its ticks at the start) is subtracted, a thread born inside counts from
    /// zero, a thread that exited is counted as exited, and the machine's steal is the
    /// window's.
    #[test]
    fn the_window_counts_only_cpu_used_between_its_samples() {
        let dir = std::env::temp_dir().join(format!("lg-watch-{}", std::process::id()));
        // Start-up: the main thread used 500 + 100 ticks before the window opened.
        fixture(
            &dir,
            &[
                (42, "dynauthd", 500, 100),
                (43, "shard-0", 20, 10),
                (44, "loader", 300, 0),
            ],
            5,
            1000,
        );
        let a = sample_at(&dir, 42).unwrap();
        assert_eq!(a.threads.len(), 3);
        assert_eq!(a.threads[0].tid, 42);
        // End: shard-0 worked, the loader thread exited, shard-1 was born.
        fixture(
            &dir,
            &[
                (42, "dynauthd", 501, 100),
                (43, "shard-0", 220, 90),
                (45, "shard-1", 30, 5),
            ],
            9,
            1300,
        );
        let b = sample_at(&dir, 42).unwrap();
        let w = between(42, &a, &b, 2.5);
        assert_eq!(w.user_ticks, 1 + 200 + 30);
        assert_eq!(w.system_ticks, 80 + 5);
        assert_eq!(w.threads, 3);
        assert_eq!(w.threads_exited, 1);
        assert_eq!(w.machine_steal_ticks, 4);
        assert_eq!(w.machine_ticks, 300 + 4);
        assert!((w.steal_share() - 4.0 / 304.0).abs() < 1e-12);
        assert_eq!(w.window_s, 2.5);
        // No such process: an error, not zeros.
        assert!(sample_at(&dir, 41).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A real run with --server-pid: the echo server runs in this process, so its threads
    /// are this process's; the figure is there, over a window that ends before the drain
    /// does, and a PID that is no process is refused before anything is sent.
    #[test]
    fn a_run_with_server_pid_reports_the_servers_cpu_over_its_window() {
        let server = crate::echo::EchoServer::loopback().unwrap();
        let target = server.local_addr().to_string();
        let pid = std::process::id().to_string();
        let flags = |pid: &str| {
            crate::RunArgs::from_args([
                "--target",
                &target,
                "--bind",
                "127.0.0.1",
                "--expect",
                "echo",
                "--window",
                "8",
                "--duration",
                "200ms",
                "--timeout",
                "300ms",
                "--quiet",
                "--server-pid",
                pid,
            ])
            .unwrap()
        };
        let report = crate::run(&flags(&pid)).unwrap();
        let c = report
            .run
            .server_cpu
            .clone()
            .expect("server_cpu with --server-pid");
        assert_eq!(c.pid, std::process::id());
        // The echo server's thread, the test threads, loadgen's workers.
        assert!(c.threads >= 2, "{c:?}");
        assert!(c.window_s > 0.0, "{c:?}");
        assert!(c.machine_ticks >= c.machine_steal_ticks, "{c:?}");
        assert!(
            report.text().contains("server CPU (pid"),
            "{}",
            report.text()
        );
        let json = serde_json::to_value(&report.run).unwrap();
        assert!(json["server_cpu"]["user_ticks"].is_u64(), "{json}");
        // Without the flag, no figure and no key.
        let mut plain = flags(&pid);
        plain.server_pid = None;
        let report = crate::run(&plain).unwrap();
        assert!(report.run.server_cpu.is_none());
        assert!(
            serde_json::to_value(&report.run)
                .unwrap()
                .get("server_cpu")
                .is_none()
        );
        let e = crate::run(&flags(&u32::MAX.to_string())).unwrap_err();
        assert!(e.to_string().contains("--server-pid"), "{e}");
        server.stop().unwrap();
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = sample(std::process::id()).unwrap();
        assert!(!s.threads.is_empty());
        assert!(s.total > 0);
        assert!(sample(u32::MAX).is_err());
    }
}
