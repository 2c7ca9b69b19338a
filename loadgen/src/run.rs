//! A load run from start to report: checks the flags, prepares the requests, opens the
//! sockets, starts the pinned workers on a common start time, shows the live progress line,
//! and merges what the workers measured into a [`Report`].
#![forbid(unsafe_code)]

use std::io::{IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::cli::{Expect, Profile, RunArgs};
use crate::pool::{Options, Pool, PoolError, Sessions};
use crate::report::{
    Counters, GeneratorCost, Latency, LoopMode, Percentiles, Report, RunReport, ScheduleLag,
    answer_counts, generator_bound_reasons, new_histogram, write_hgrm,
};
use crate::worker::{self, Mode, Progress, WorkerPlan};

/// Why a run could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Secret(#[from] crate::cli::SecretError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("socket: {0}")]
    Socket(std::io::Error),
    #[error("worker {index}: {source}")]
    Worker {
        index: usize,
        source: std::io::Error,
    },
    #[error("worker {0} panicked")]
    Panicked(usize),
    #[error("cannot write {path}: {source}")]
    Output {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

fn invalid(s: impl Into<String>) -> RunError {
    RunError::Invalid(s.into())
}

/// Default window of the closed loop.
pub const DEFAULT_WINDOW: usize = 64;
/// Default sending time when neither --duration nor --requests bounds the run.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// Opens one source socket connected to `target`.
fn open_socket(
    target: SocketAddr,
    bind: Option<IpAddr>,
    buffer: usize,
) -> std::io::Result<UdpSocket> {
    let domain = Domain::for_address(target);
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    // Larger buffers absorb bursts; the kernel caps them at net.core.[rw]mem_max.
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    let ip = bind.unwrap_or(match target {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    });
    socket.bind(&SocketAddr::new(ip, 0).into())?;
    socket.connect(&target.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// One sample of the server's threads, with its time; a failure (the server exited) is
/// said on stderr and leaves the run without a server CPU figure.
fn watch_sample(pid: u32) -> Option<(Instant, crate::watch::Sample)> {
    let t = Instant::now();
    match crate::watch::sample(pid) {
        Ok(s) => Some((t, s)),
        Err(e) => {
            eprintln!("loadgen: --server-pid {pid}: {e}; no server CPU figure for this run");
            None
        }
    }
}

/// Runs the load described by `args` and returns the report (also writing the histogram
/// file when asked). The live progress line goes to stderr only when it is a terminal.
pub fn run(args: &RunArgs) -> Result<Report, RunError> {
    let prepared = prepare(args)?;
    execute(args, &prepared)
}

/// What every run of one set of flags shares: the checked flags' sessions, turned into the
/// requests prepared ahead of time (the sessions file is read once, not once per run of a
/// capacity search).
#[derive(Debug)]
pub struct Prepared {
    pool: Arc<Pool>,
}

/// Checks the flags and prepares the requests.
pub fn prepare(args: &RunArgs) -> Result<Prepared, RunError> {
    let threads = args.threads;
    if threads == 0 || threads > 1024 {
        return Err(invalid("--threads must be between 1 and 1024"));
    }
    if args.expect == Expect::Echo && args.mix.bad_auth > 0 && args.profile == Profile::Churn {
        return Err(invalid(
            "--expect echo cannot judge deliberately bad authenticators: set bad-auth=0 in --mix",
        ));
    }
    if let Some(rate) = args.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        return Err(invalid("--rate must be a positive number"));
    }
    if args.window == Some(0) {
        return Err(invalid("--window must be at least 1"));
    }
    if args.timeout.is_zero() {
        return Err(invalid("--timeout must be positive"));
    }
    if args.source_ports == Some(0) {
        return Err(invalid("--source-ports must be at least 1"));
    }
    if let Some(pid) = args.server_pid {
        crate::watch::sample(pid).map_err(|e| {
            invalid(format!(
                "--server-pid {pid}: cannot read its threads' CPU times ({e}); is it a process on this machine?"
            ))
        })?;
    }
    let secret = args.secret_bytes()?;

    // Sessions and the prepared requests.
    let sessions = match (&args.sessions, args.synthetic) {
        (Some(path), _) => Sessions::from_file(path)?,
        (None, Some(count)) => Sessions::Synthetic {
            seed: args.seed,
            count,
        },
        (None, None) if args.expect == Expect::Echo => Sessions::Synthetic {
            seed: args.seed,
            count: 4096,
        },
        (None, None) => Sessions::Synthetic {
            seed: args.seed,
            count: 0,
        },
    };
    let options = Options {
        message_authenticator: args.message_authenticator,
        event_timestamp: args.event_timestamp,
        session_timeout: args.session_timeout,
        seed: args.seed,
        targets: args.targets,
    };
    let pool = match args.profile {
        Profile::Churn => {
            let size = args
                .pool
                .unwrap_or_else(|| sessions.len().clamp(4096, 1 << 20) as usize);
            Pool::churn(&sessions, &args.mix, size, &options, &secret)?
        }
        Profile::MassDisconnect => {
            if sessions.is_empty() {
                return Err(PoolError::NoSessions.into());
            }
            let selected: Vec<u64> = match (&args.group, &args.group_prefix) {
                (Some(g), _) => sessions.synthetic_group(*g),
                (None, Some(prefix)) => sessions.group(prefix),
                (None, None) => (0..sessions.len()).collect(),
            };
            Pool::mass_disconnect(&sessions, &selected, &options, &secret)?
        }
    };
    drop(secret);
    Ok(Prepared {
        pool: Arc::new(pool),
    })
}

/// One run of `args` with the requests of `prepared` (made by [`prepare`] from flags that
/// differ from `args` at most in the load: --rate, --duration, --histogram-file).
pub fn execute(args: &RunArgs, prepared: &Prepared) -> Result<Report, RunError> {
    let threads = args.threads;
    let pool = &prepared.pool;

    // Bounds: mass disconnect sends each session once.
    let mut requests = args.requests;
    if args.profile == Profile::MassDisconnect {
        let n = pool.len() as u64;
        requests = Some(requests.map_or(n, |r| r.min(n)));
    }
    let send_for = match (args.duration, requests) {
        (Some(d), _) => Some(d),
        (None, Some(_)) => None,
        (None, None) => Some(DEFAULT_DURATION),
    };

    // Mode and sockets.
    let window = match args.rate {
        Some(_) => None,
        None => Some(args.window.unwrap_or(DEFAULT_WINDOW)),
    };
    let source_ports = crate::cli::source_ports_per_thread(args.source_ports, threads);
    let sockets = match (args.sockets, window) {
        (Some(s), _) => s,
        (None, Some(w)) => {
            let per_thread = w.div_ceil(threads).div_ceil(256).max(source_ports);
            per_thread * threads
        }
        (None, None) => source_ports * threads,
    };
    if sockets < threads {
        return Err(invalid("--sockets must be at least --threads"));
    }
    if let Some(w) = window {
        let min_per_thread = sockets / threads;
        if w.div_ceil(threads) > min_per_thread * 256 {
            return Err(invalid(format!(
                "--window {w} needs more Identifiers than {sockets} sockets give (256 each per thread share); raise --sockets"
            )));
        }
    }
    let mut socket_sets: Vec<Vec<UdpSocket>> = (0..threads).map(|_| Vec::new()).collect();
    for i in 0..sockets {
        let s =
            open_socket(args.target, args.bind, args.socket_buffer).map_err(RunError::Socket)?;
        socket_sets[i % threads].push(s);
    }

    // Workers.
    let start = Instant::now() + Duration::from_millis(20);
    let cpu0 = dynauth_udp::dac::process_cpu_ns();
    let mut handles = Vec::with_capacity(threads);
    let mut progresses = Vec::with_capacity(threads);
    for (index, sockets) in socket_sets.into_iter().enumerate() {
        let mode = match (args.rate, window) {
            (Some(rate), _) => {
                let interval_ns = 1e9 * threads as f64 / rate;
                let max_outstanding = args.max_outstanding.map_or(usize::MAX, |m| {
                    (m / threads + usize::from(index < m % threads)).max(1)
                });
                Mode::Open {
                    interval_ns,
                    offset_ns: interval_ns * index as f64 / threads as f64,
                    max_outstanding,
                }
            }
            (None, Some(w)) => Mode::Closed {
                window: w / threads + usize::from(index < w % threads),
            },
            (None, None) => Mode::Closed {
                window: DEFAULT_WINDOW,
            },
        };
        let share = requests.map(|n| {
            let (t, i) = (threads as u64, index as u64);
            if i < n { (n - i).div_ceil(t) } else { 0 }
        });
        let progress = Arc::new(Progress::default());
        progresses.push(Arc::clone(&progress));
        let plan = WorkerPlan {
            index,
            threads,
            pool: Arc::clone(pool),
            sockets,
            batch: args.batch,
            mode,
            requests: share,
            send_for,
            timeout: args.timeout,
            retransmit_after: args.retransmit_after,
            retries: args.retries,
            expect: args.expect,
            cpu: args
                .cpus
                .as_ref()
                .filter(|c| !c.0.is_empty())
                .map(|c| c.0[index % c.0.len()]),
            start,
            progress,
        };
        let handle = std::thread::Builder::new()
            .name(format!("loadgen-{index}"))
            .spawn(move || worker::run(plan))
            .map_err(RunError::Socket)?;
        handles.push(handle);
    }

    // The server's CPU window opens at the common start (loadgen's start-up is behind it).
    let watch_start = args.server_pid.and_then(|pid| {
        if let Some(wait) = start.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        watch_sample(pid).map(|s| (pid, s))
    });
    let mut watch_end = None;
    let expected_end = send_for.map(|d| start + d);

    let live = !args.quiet && std::io::stderr().is_terminal();
    let mut last = (Instant::now(), 0u64, 0u64);
    let mut shown = false;
    while handles.iter().any(|h| !h.is_finished()) {
        let watching = watch_start.is_some() && watch_end.is_none();
        if let Some((pid, _)) = watch_start.as_ref().filter(|_| watching) {
            // ... and closes when the last worker has stopped sending (the drain is after).
            let done = progresses
                .iter()
                .zip(&handles)
                .all(|(p, h)| p.sending_done.load(Ordering::Acquire) || h.is_finished());
            if done {
                watch_end = Some(watch_sample(*pid));
                continue;
            }
        }
        let idle = Duration::from_millis(if live { 100 } else { 20 });
        let pause = match (watching, expected_end) {
            // Near the end of sending, look often: the window closes within a fraction of
            // a millisecond of it.
            (true, Some(end)) => end
                .checked_duration_since(Instant::now())
                .and_then(|left| left.checked_sub(Duration::from_millis(2)))
                .map_or(Duration::from_micros(200), |d| d.min(idle)),
            (true, None) => Duration::from_millis(1),
            (false, _) => idle,
        };
        std::thread::sleep(pause);
        if live && last.0.elapsed() >= Duration::from_secs(1) {
            let sum = |f: fn(&Progress) -> u64| progresses.iter().map(|p| f(p)).sum::<u64>();
            let req = sum(|p| p.requests.load(Ordering::Relaxed));
            let ans = sum(|p| p.answered.load(Ordering::Relaxed));
            let secs = last.0.elapsed().as_secs_f64();
            let line = format!(
                "\r[{:>6.1}s] sent {req} ({:.0}/s)  answered {ans} ({:.0}/s)  outstanding {}  timeouts {}  bad {}   ",
                start.elapsed().as_secs_f64(),
                (req - last.1) as f64 / secs,
                (ans - last.2) as f64 / secs,
                sum(|p| p.outstanding.load(Ordering::Relaxed)),
                sum(|p| p.timeouts.load(Ordering::Relaxed)),
                sum(|p| p.bad.load(Ordering::Relaxed)),
            );
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(line.as_bytes());
            let _ = err.flush();
            shown = true;
            last = (Instant::now(), req, ans);
        }
    }
    if shown {
        eprintln!();
    }

    let mut counters = Counters::default();
    let mut latency = new_histogram();
    let mut answered_latency = new_histogram();
    let mut lag = new_histogram();
    let (mut cpu_ns, mut wall_ns, mut send_end_ns, mut wall_max) = (0u64, 0u64, 0u64, 0u64);
    let mut busiest = 0.0f64;
    let mut series = crate::series::Series::new();
    for (index, handle) in handles.into_iter().enumerate() {
        let result = handle
            .join()
            .map_err(|_| RunError::Panicked(index))?
            .map_err(|source| RunError::Worker { index, source })?;
        counters.add(&result.counters);
        let _ = latency.add(&result.latency);
        let _ = answered_latency.add(&result.answered_latency);
        let _ = lag.add(&result.lag);
        series.merge(&result.series);
        cpu_ns += result.cpu_ns;
        wall_ns += result.wall_ns;
        send_end_ns = send_end_ns.max(result.send_end_ns);
        wall_max = wall_max.max(result.wall_ns);
        if result.wall_ns > 0 {
            busiest = busiest.max(result.cpu_ns as f64 / result.wall_ns as f64);
        }
    }
    let cpu1 = dynauth_udp::dac::process_cpu_ns();
    let server_cpu = watch_start.and_then(|(pid, (t0, s0))| {
        // Every worker finished before the loop saw them stop sending: close it now.
        let (t1, s1) = watch_end.flatten().or_else(|| watch_sample(pid))?;
        Some(crate::watch::between(
            pid,
            &s0,
            &s1,
            t1.saturating_duration_since(t0).as_secs_f64(),
        ))
    });

    if let Some(path) = &args.histogram_file {
        let file = std::fs::File::create(path).map_err(|source| RunError::Output {
            path: path.clone(),
            source,
        })?;
        write_hgrm(&latency, std::io::BufWriter::new(file)).map_err(|source| RunError::Output {
            path: path.clone(),
            source,
        })?;
    }

    let send_seconds = (send_end_ns as f64 / 1e9).max(1e-9);
    let answered = counters.answered();
    let expecting = counters.requests.saturating_sub(counters.expected_discards);
    let per_request = |n: u64| n as f64 / counters.requests.max(1) as f64;
    let mode = if args.rate.is_some() {
        LoopMode::OpenLoop
    } else {
        LoopMode::ClosedLoop
    };
    let sent_rate_rps = counters.requests as f64 / send_seconds;
    let generator_bound_reasons = generator_bound_reasons(
        busiest,
        mode,
        args.rate,
        sent_rate_rps,
        counters.requests,
        counters.unsent,
        counters.limit_waits,
    );
    let cpu_ns_per_request = if counters.requests == 0 {
        0.0
    } else {
        cpu_ns as f64 / counters.requests as f64
    };
    let run = RunReport {
        target: args.target.to_string(),
        mode,
        profile: args.profile,
        expect: args.expect,
        threads,
        sockets,
        window,
        offered_rate_rps: args.rate,
        send_seconds,
        wall_seconds: wall_max as f64 / 1e9,
        requests: counters.requests,
        transmissions: counters.requests + counters.retransmissions,
        retransmissions: counters.retransmissions,
        answered,
        timeouts: counters.timeouts,
        expected_discards: counters.expected_discards,
        unsent: counters.unsent,
        send_errors: counters.send_errors,
        sent_rate_rps,
        achieved_rate_rps: answered as f64 / send_seconds,
        loss_ratio: if expecting == 0 {
            0.0
        } else {
            counters.timeouts as f64 / expecting as f64
        },
        answers: answer_counts(&counters),
        latency: Latency::of(
            &latency,
            counters.timeouts + counters.unsent,
            args.timeout.as_nanos() as u64,
        ),
        answered_latency: Percentiles::of(&answered_latency),
        schedule_lag: args.rate.map(|_| {
            let p = Percentiles::of(&lag);
            ScheduleLag {
                p50_us: p.p50_us,
                p99_us: p.p99_us,
                max_us: p.max_us,
            }
        }),
        generator: GeneratorCost {
            worker_cpu_s: cpu_ns as f64 / 1e9,
            cpu_ns_per_request,
            worker_utilisation: if wall_ns == 0 {
                0.0
            } else {
                cpu_ns as f64 / wall_ns as f64
            },
            busiest_worker_utilisation: busiest,
            capacity_rps: if cpu_ns_per_request > 0.0 {
                threads as f64 * 1e9 / cpu_ns_per_request
            } else {
                0.0
            },
            process_user_s: cpu1.0.saturating_sub(cpu0.0) as f64 / 1e9,
            process_system_s: cpu1.1.saturating_sub(cpu0.1) as f64 / 1e9,
            sendmmsg_per_request: per_request(counters.sendmmsg_calls),
            recvmmsg_per_request: per_request(counters.recvmmsg_calls),
            ppoll_per_request: per_request(counters.ppoll_calls),
        },
        time_series: series.report(),
        generator_bound: !generator_bound_reasons.is_empty(),
        generator_bound_reasons,
        interrupted: dynauth_udp::dac::interrupted(),
        counts_add_up: counters.requests
            == answered + counters.timeouts + counters.expected_discards,
        server_cpu,
    };
    Ok(Report {
        run,
        counters,
        histogram: latency,
    })
}
