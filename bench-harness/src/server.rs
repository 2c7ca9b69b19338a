//! The servers under test as child processes: their command lines (echo ceiling, dynauthd,
//! FreeRADIUS), starting them pinned, waiting until they say they are ready, capturing their
//! output for diagnostics, reading their CPU time, and stopping them. Owns: process
//! lifetime (a started server is always stopped, also on error paths, by `Drop`). Must not
//! touch: loadgen, results.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::loadgen::cpu_list;
use crate::machine;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("starting {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{name} exited before it was ready ({status}); last output:\n{output}")]
    Exited {
        name: String,
        status: String,
        output: String,
    },
    #[error("{name} was not ready after {secs} s; last output:\n{output}")]
    NotReady {
        name: String,
        secs: u64,
        output: String,
    },
    #[error("no free UDP port on 127.0.0.1: {0}")]
    Port(std::io::Error),
    #[error("reading the server's CPU time: {0}")]
    Cpu(#[from] machine::MachineError),
}

impl ServerError {
    /// The captured output (empty for errors without any).
    pub fn output(&self) -> &str {
        match self {
            ServerError::Exited { output, .. } | ServerError::NotReady { output, .. } => output,
            _ => "",
        }
    }
}

/// A free UDP port on 127.0.0.1 (bound and released: another process could take it in
/// between, which the start-up check then reports).
pub fn free_port() -> Result<u16, ServerError> {
    let s = UdpSocket::bind("127.0.0.1:0").map_err(ServerError::Port)?;
    Ok(s.local_addr().map_err(ServerError::Port)?.port())
}

/// How to start one server and know it is ready.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    /// For messages: "echo ceiling", "dynauthd", "FreeRADIUS".
    pub name: String,
    pub argv: Vec<String>,
    /// A line on stdout or stderr that says the server is ready.
    pub ready_line: String,
    pub ready_timeout: Duration,
    /// CPUs for the whole process (with `taskset`).
    pub cpus: Vec<usize>,
    pub taskset: Option<PathBuf>,
}

impl ServerSpec {
    /// `loadgen echo-server` with one thread per server CPU.
    pub fn echo(loadgen: &std::path::Path, addr: SocketAddr, cpus: &[usize]) -> ServerSpec {
        ServerSpec {
            name: "echo ceiling".into(),
            argv: vec![
                loadgen.display().to_string(),
                "echo-server".into(),
                "--listen".into(),
                addr.to_string(),
                "--threads".into(),
                cpus.len().max(1).to_string(),
                "--cpus".into(),
                cpu_list(cpus),
            ],
            ready_line: "listening on".into(),
            ready_timeout: Duration::from_secs(10),
            cpus: cpus.to_vec(),
            taskset: None,
        }
    }

    /// dynauthd with one backend, shard count and batch size (the runtime issue's CLI).
    #[allow(clippy::too_many_arguments)]
    pub fn dynauthd(
        program: &std::path::Path,
        addr: SocketAddr,
        secret: &str,
        sessions: &std::path::Path,
        io: &str,
        shards: usize,
        batch: usize,
        cpus: &[usize],
    ) -> ServerSpec {
        ServerSpec {
            name: "dynauthd".into(),
            argv: vec![
                program.display().to_string(),
                "--listen".into(),
                addr.to_string(),
                "--client".into(),
                format!("{}/32={secret}", addr.ip()),
                "--sessions".into(),
                sessions.display().to_string(),
                "--shards".into(),
                shards.to_string(),
                "--cpus".into(),
                cpu_list(cpus),
                "--io".into(),
                io.into(),
                "--batch".into(),
                batch.to_string(),
                // Per-shard answer counts (`Server::shard_answers`).
                "--metrics".into(),
                "127.0.0.1:0".into(),
            ],
            ready_line: "dynauthd listening".into(),
            // Loading a large session file can take a while.
            ready_timeout: Duration::from_secs(300),
            cpus: cpus.to_vec(),
            taskset: None,
        }
    }

    /// FreeRADIUS in the foreground on the configuration directory the harness wrote.
    pub fn freeradius(
        program: &std::path::Path,
        confdir: &std::path::Path,
        cpus: &[usize],
    ) -> ServerSpec {
        ServerSpec {
            name: "FreeRADIUS".into(),
            argv: vec![
                program.display().to_string(),
                "-f".into(),
                "-d".into(),
                confdir.display().to_string(),
                "-l".into(),
                "stdout".into(),
            ],
            ready_line: "Ready to process requests".into(),
            ready_timeout: Duration::from_secs(120),
            cpus: cpus.to_vec(),
            taskset: None,
        }
    }

    pub fn with_taskset(mut self, taskset: Option<PathBuf>) -> ServerSpec {
        self.taskset = taskset;
        self
    }

    /// The full command line, `taskset -c CPUS` first when pinning.
    pub fn command_line(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(t) = &self.taskset {
            v.push(t.display().to_string());
            v.push("-c".into());
            v.push(cpu_list(&self.cpus));
        }
        v.extend(self.argv.iter().cloned());
        v
    }

    /// Starts the server and waits for its ready line.
    pub fn start(&self) -> Result<Server, ServerError> {
        let argv = self.command_line();
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| ServerError::Spawn {
                program: argv[0].clone(),
                source,
            })?;
        let output = Arc::new(Mutex::new(Vec::<String>::new()));
        let (tx, rx) = mpsc::channel::<()>();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let output = Arc::clone(&output);
            let tx = tx.clone();
            let ready = self.ready_line.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if line.contains(&ready) {
                        let _ = tx.send(());
                    }
                    let mut o = output.lock().unwrap_or_else(|p| p.into_inner());
                    o.push(line);
                    if o.len() > 400 {
                        o.drain(..200);
                    }
                }
            });
        }
        drop(tx);
        let mut server = Server {
            name: self.name.clone(),
            child,
            output,
        };
        let deadline = Instant::now() + self.ready_timeout;
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(()) => return Ok(server),
                Err(mpsc::RecvTimeoutError::Timeout)
                | Err(mpsc::RecvTimeoutError::Disconnected) => {}
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                // Let the readers take the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return Err(ServerError::Exited {
                    name: self.name.clone(),
                    status: status.to_string(),
                    output: server.last_output(30),
                });
            }
            if Instant::now() >= deadline {
                let output = server.last_output(30);
                server.stop();
                return Err(ServerError::NotReady {
                    name: self.name.clone(),
                    secs: self.ready_timeout.as_secs(),
                    output,
                });
            }
        }
    }
}

/// A running server; stopped when dropped.
/// `dynauth_shard_answers_sent_total{shard="N"} V` lines, in shard order.
pub fn parse_shard_answers(metrics: &str) -> Vec<u64> {
    let mut counts: Vec<(usize, u64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("dynauth_shard_answers_sent_total{shard=\""))
        .filter_map(|rest| {
            let (shard, value) = rest.split_once("\"} ")?;
            Some((shard.parse().ok()?, value.trim().parse().ok()?))
        })
        .collect();
    counts.sort();
    counts.into_iter().map(|(_, v)| v).collect()
}

#[derive(Debug)]
pub struct Server {
    name: String,
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Where dynauthd serves its metrics, from its banner (`metrics=ADDR`).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        let output = self.output.lock().unwrap_or_else(|p| p.into_inner());
        output
            .iter()
            .filter(|l| l.contains("dynauthd listening"))
            .flat_map(|l| l.split_whitespace())
            .find_map(|w| w.strip_prefix("metrics="))
            .and_then(|a| a.parse().ok())
    }

    /// Answers each shard has sent so far (dynauthd's `dynauth_shard_answers_sent_total`), or
    /// `None` for a server without those metrics.
    pub fn shard_answers(&self) -> Option<Vec<u64>> {
        let addr = self.metrics_addr()?;
        let mut http = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        http.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        std::io::Write::write_all(&mut http, b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
        let mut body = String::new();
        http.read_to_string(&mut body).ok()?;
        Some(parse_shard_answers(&body))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User + system CPU ticks of the whole server process so far (every thread, exited
    /// ones too): for the busy guard, over the whole loadgen run. The CPU per answer is
    /// loadgen's per-thread figure over its measured window (`--server-pid`).
    pub fn cpu_ticks(&self) -> Result<u64, ServerError> {
        Ok(machine::process_ticks(self.pid())?)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last `n` lines it printed.
    pub fn last_output(&self, n: usize) -> String {
        let o = self.output.lock().unwrap_or_else(|p| p.into_inner());
        o[o.len().saturating_sub(n)..].join("\n")
    }

    /// SIGTERM, up to 5 s to exit, then SIGKILL; reaps the child.
    pub fn stop(&mut self) {
        if !self.alive() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "bench-harness: {} did not stop on SIGTERM; killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_shard_answers_are_read_from_the_metrics_in_shard_order() {
        let text = "# TYPE dynauth_shard_answers_sent_total counter\n\
                    dynauth_shard_answers_sent_total{shard=\"1\"} 7\n\
                    dynauth_shard_answers_sent_total{shard=\"0\"} 5\n\
                    dynauth_answers_sent_total 12\n";
        assert_eq!(parse_shard_answers(text), vec![5, 7]);
        assert!(parse_shard_answers("dynauth_answers_sent_total 3\n").is_empty());
    }

    #[test]
    fn dynauthd_gets_the_contract_flags() {
        let s = ServerSpec::dynauthd(
            std::path::Path::new("/b/dynauthd"),
            "127.0.0.1:4567".parse().unwrap(),
            "sec",
            std::path::Path::new("/t/s.jsonl"),
            "uring",
            2,
            16,
            &[1, 3],
        )
        .with_taskset(Some("/usr/bin/taskset".into()));
        let c = s.command_line().join(" ");
        assert_eq!(
            c,
            "/usr/bin/taskset -c 1,3 /b/dynauthd --listen 127.0.0.1:4567 --client 127.0.0.1/32=sec \
             --sessions /t/s.jsonl --shards 2 --cpus 1,3 --io uring --batch 16 --metrics 127.0.0.1:0"
        );
    }

    #[test]
    fn a_server_that_exits_at_once_is_reported_with_its_output() {
        let spec = ServerSpec {
            name: "fake".into(),
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo boom: io_uring refused >&2; exit 3".into(),
            ],
            ready_line: "never".into(),
            ready_timeout: Duration::from_secs(10),
            cpus: vec![0],
            taskset: None,
        };
        let e = spec.start().unwrap_err();
        assert!(matches!(e, ServerError::Exited { .. }), "{e}");
        assert!(e.output().contains("io_uring refused"), "{e}");
    }

    #[test]
    fn a_ready_server_is_found_measured_and_stopped() {
        let spec = ServerSpec {
            name: "fake".into(),
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo all set; exec sleep 30".into(),
            ],
            ready_line: "all set".into(),
            ready_timeout: Duration::from_secs(10),
            cpus: vec![0],
            taskset: None,
        };
        let mut s = spec.start().unwrap();
        assert!(s.alive());
        assert!(s.cpu_ticks().is_ok());
        let t = Instant::now();
        s.stop();
        assert!(!s.alive());
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "SIGTERM should end sleep at once"
        );
    }

    #[test]
    fn free_ports_are_nonzero() {
        assert_ne!(free_port().unwrap(), 0);
    }
}
