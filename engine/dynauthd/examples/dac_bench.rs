//! A small closed-loop DAC for the runtime benchmark (not a load generator: that is
//! `loadgen`). Keeps `window` CoA-Requests outstanding against sessions 0..N of a synthetic
//! session file (seed 9), each request unique (a Proxy-State counter), for `secs` seconds;
//! reports answers per second and, given the server's pid, its CPU time per answer from
//! /proc/PID/stat.
//!
//! `cargo run --release -p dynauthd --example dac_bench -- ADDR SECRET SESSIONS SECS WINDOW [PID]`
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use dynauth_proto::auth::{self, Secret};
use dynauth_proto::codec::PacketWriter;
use dynauth_proto::synth;
use dynauth_udp::MAX_DATAGRAM;
use dynauth_udp::dac::{BatchReceiver, BatchSender};

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line (11 and 12 after the name).
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn request(n: u64, sessions: u64, secret: &Secret) -> Vec<u8> {
    let mut buf = [0u8; 256];
    let mut w = PacketWriter::new(&mut buf, 43, n as u8, &[0; 16]).expect("room");
    let asid = synth::acct_session_id(9, n % sessions);
    w.push(44, asid.as_bytes()).expect("room");
    w.push_u32(27, 3600).expect("room");
    w.push(33, &n.to_be_bytes()).expect("room");
    let p = w.finish();
    auth::sign_request(p, None, secret);
    p.to_vec()
}

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let server: SocketAddr = a
        .first()
        .map(String::as_str)
        .unwrap_or("127.0.0.1:3799")
        .parse()?;
    let secret = Secret::new(a.get(1).map(String::as_str).unwrap_or("bench-secret"))?;
    let sessions: u64 = a.get(2).map(|s| s.parse()).transpose()?.unwrap_or(10);
    let secs: u64 = a.get(3).map(|s| s.parse()).transpose()?.unwrap_or(10);
    let window: usize = a.get(4).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let pid: Option<u32> = a.get(5).map(|s| s.parse()).transpose()?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(server),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_recv_buffer_size(16 << 20)?;
    socket.set_send_buffer_size(16 << 20)?;
    socket.bind(&"127.0.0.1:0".parse::<SocketAddr>()?.into())?;
    socket.connect(&server.into())?;
    // A blocking receive that gives up after 50 ms: lost packets restart the window.
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let fd = socket.as_raw_fd();
    let mut sender = BatchSender::new(64);
    let mut receiver = BatchReceiver::new(64, MAX_DATAGRAM);
    let mut counter = 0u64;
    let make = |k: usize, counter: &mut u64| -> Vec<Vec<u8>> {
        (0..k)
            .map(|_| {
                *counter += 1;
                request(*counter, sessions, &secret)
            })
            .collect()
    };
    // Warm up one second, then measure.
    let mut sent = 0u64;
    let mut answers = 0u64;
    let mut codes = [0u64; 256];
    let mut outstanding = 0usize;
    let start = Instant::now();
    let mut measuring_since: Option<(Instant, u64, Option<u64>)> = None;
    while start.elapsed() < Duration::from_secs(secs + 1) {
        if measuring_since.is_none() && start.elapsed() >= Duration::from_secs(1) {
            measuring_since = Some((Instant::now(), answers, pid.and_then(cpu_ticks)));
        }
        if outstanding < window {
            let batch = make((window - outstanding).min(64), &mut counter);
            let packets: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
            let n = match sender.send(fd, &packets) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e.into()),
            };
            sent += n as u64;
            outstanding += n;
        }
        let n = match receiver.recv(fd, true) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                0
            }
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            // Lost packets: start the window over.
            outstanding = 0;
            continue;
        }
        for i in 0..n {
            if let Some(&code) = receiver.packet(i).first() {
                codes[usize::from(code)] += 1;
            }
        }
        answers += n as u64;
        outstanding = outstanding.saturating_sub(n);
    }
    let (since, answers_before, ticks_before) = measuring_since.unwrap_or((start, 0, None));
    let elapsed = since.elapsed().as_secs_f64();
    let measured = answers - answers_before;
    let rate = measured as f64 / elapsed;
    println!(
        "sent {sent} answers {answers} (CoA-ACK {} CoA-NAK {} other {}) measured {measured} in {elapsed:.2} s: {rate:.0} answers/s",
        codes[44],
        codes[45],
        answers - codes[44] - codes[45]
    );
    if let (Some(pid), Some(before)) = (pid, ticks_before)
        && let Some(after) = cpu_ticks(pid)
    {
        // USER_HZ is 100 on Linux.
        let cpu_s = (after - before) as f64 / 100.0;
        println!(
            "server pid {pid}: {cpu_s:.2} CPU s, {:.2} us CPU per answer",
            cpu_s * 1e6 / measured.max(1) as f64
        );
    }
    Ok(())
}
