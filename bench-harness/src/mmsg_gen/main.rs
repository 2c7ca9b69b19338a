//! mmsg-gen: an independent closed-loop UDP generator, the yardstick for loadgen. It keeps
//! `--window` requests in flight on one connected socket, sends them with `sendmmsg`, reads
//! answers with `recvmmsg` (blocking until at least one is there), matches every answer to
//! its request by the slot and sequence number it carries and by comparing it, byte for
//! byte, with the request, and counts answers per second. Its datagrams are RADIUS-shaped
//! (a CoA-Request header, the slot in the Identifier, Acct-Session-Id attributes) and of a
//! chosen size, so that an echo server does the same work for it as for `loadgen --expect
//! echo`. It signs nothing: it is the cheapest client of its kind, so loadgen, which signs
//! every request, must reach at least its rate to be "never the weak link".
//!
//! It shares no code with loadgen or `dynauth-udp` (its I/O is its own `io` module, the
//! binary's only `unsafe`), so a flaw in theirs cannot flatter both. `bench-harness
//! gen-check` runs it beside loadgen against the same echo server. Modules: `io` (system
//! calls), `report` (the JSON schema, shared with the check). See docs/LOADGEN.md,
//! "Generator check".
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod io;
mod report;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

use crate::report::GenReport;

/// Marks a datagram as one of ours (the last four octets of the Authenticator field).
const MARKER: [u8; 4] = *b"MMSG";
/// RADIUS CoA-Request (RFC 5176 §2.2).
const COA_REQUEST: u8 = 43;
/// Acct-Session-Id (RFC 2866 §5.5), the filler attribute.
const ACCT_SESSION_ID: u8 = 44;
/// How long one blocking `recvmmsg` waits before the loop looks at the clock again.
const RECV_WAIT: Duration = Duration::from_millis(5);

/// A closed-loop UDP generator with its own recvmmsg/sendmmsg I/O: W requests in flight,
/// every answer matched to its request, answers per second.
#[derive(Debug, Parser)]
#[command(name = "mmsg-gen", version)]
struct Args {
    /// The echo server (or any server that returns each datagram unchanged).
    #[arg(long)]
    target: SocketAddr,
    /// Requests in flight.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    window: u32,
    /// Sending time in milliseconds; then the run drains (at most --timeout-ms) and ends.
    #[arg(long, default_value_t = 5000)]
    duration_ms: u64,
    /// Stop sending after this many requests (whichever of this and --duration-ms comes first).
    #[arg(long)]
    requests: Option<u64>,
    /// Octets per datagram (38 to 4096): loadgen's 44-octet CoA-Request by default.
    #[arg(long, default_value_t = 44)]
    size: usize,
    /// Datagrams per sendmmsg/recvmmsg at most.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1024))]
    batch: u32,
    /// A request unanswered this long (milliseconds) is lost and its slot reused.
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// Pin the generator to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// SO_SNDBUF/SO_RCVBUF in octets (capped by net.core.*mem_max).
    #[arg(long, default_value_t = 4 << 20)]
    socket_buffer: usize,
    /// Sign every request with this shared secret, as a DAC must (MD5 Request
    /// Authenticator, with RustCrypto's md-5, not loadgen's code): the same per-request work
    /// as loadgen's. Without it the Authenticator is zero and nothing is signed.
    #[arg(long)]
    secret: Option<String>,
    /// Busy-poll: never sleep in recvmmsg (MSG_DONTWAIT), spending the whole core.
    #[arg(long)]
    spin: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !(MIN_SIZE..=4096).contains(&args.size) {
        eprintln!("mmsg-gen: --size must be {MIN_SIZE} to 4096 octets");
        return ExitCode::from(2);
    }
    match run(&args) {
        Ok(r) => {
            if args.json {
                match serde_json::to_string_pretty(&r) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("mmsg-gen: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                println!(
                    "mmsg-gen -> {}: {:.0} answers/s over {:.2} s (window {}, {} octets); sent {}, answered {}, lost {}, stale {}, corrupt {}, foreign {}; worker {:.0} ns/answer, {:.0}% busy{}",
                    r.target,
                    r.answered_rps,
                    r.send_seconds,
                    r.window,
                    r.datagram_octets,
                    r.sent,
                    r.answered,
                    r.lost,
                    r.stale,
                    r.corrupt,
                    r.foreign,
                    r.cpu_ns_per_answer,
                    r.worker_utilisation * 100.0,
                    if r.clean() {
                        ""
                    } else {
                        " (NOT every answer exact)"
                    }
                );
            }
            if r.counts_add_up() && r.answered > 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("mmsg-gen: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Octets before the filler: header (20), the first attribute's type and length (2), then
/// [`MARKER`], the slot (4) and the sequence number (8).
const MIN_SIZE: usize = 38;

/// Writes the request of `slot` with sequence number `seq` into `buf[..size]`: header
/// (CoA-Request, Identifier = low octet of the slot, Length, Authenticator), then
/// Acct-Session-Id attributes, the first starting with [`MARKER`], the slot and the sequence
/// number, letters filling the rest. The Authenticator is 16 zero octets, or with a secret
/// the Request Authenticator a DAC sends, MD5(packet with a zero Authenticator + secret)
/// (RFC 5176 §2.3, RFC 2866 §3). Returns the Authenticator.
fn fill(buf: &mut [u8], slot: u32, seq: u64, size: usize, secret: Option<&[u8]>) -> [u8; 16] {
    let buf = &mut buf[..size];
    buf[0] = COA_REQUEST;
    buf[1] = slot as u8;
    buf[2..4].copy_from_slice(&(size as u16).to_be_bytes());
    buf[4..20].fill(0);
    let mut at = 20;
    while at < size {
        let rest = size - at;
        let mut len = rest.min(255);
        if rest - len == 1 {
            len -= 1; // never leave a 1-octet tail: an attribute needs 2
        }
        buf[at] = ACCT_SESSION_ID;
        buf[at + 1] = len as u8;
        for (k, b) in buf[at + 2..at + len].iter_mut().enumerate() {
            *b = b'a' + ((seq as usize).wrapping_add(at + k) % 26) as u8;
        }
        at += len;
    }
    buf[22..26].copy_from_slice(&MARKER);
    buf[26..30].copy_from_slice(&slot.to_be_bytes());
    buf[30..38].copy_from_slice(&seq.to_be_bytes());
    let mut auth = [0u8; 16];
    if let Some(secret) = secret {
        use md5::Digest as _;
        let mut h = md5::Md5::new();
        h.update(&buf[..]);
        h.update(secret);
        auth.copy_from_slice(&h.finalize());
        buf[4..20].copy_from_slice(&auth);
    }
    auth
}

/// The slot and sequence number an answer names, if it is one of ours.
fn parse(d: &[u8]) -> Option<(usize, u64)> {
    if d.len() < MIN_SIZE || d[20] != ACCT_SESSION_ID || d[22..26] != MARKER {
        return None;
    }
    let slot = u32::from_be_bytes(d[26..30].try_into().ok()?) as usize;
    let seq = u64::from_be_bytes(d[30..38].try_into().ok()?);
    Some((slot, seq))
}

#[derive(Clone, Copy, Default)]
struct Slot {
    /// The latest sequence number sent on this slot (0: never used).
    seq: u64,
    /// Its Authenticator (zero unless signed).
    auth: [u8; 16],
    sent_ns: u64,
    outstanding: bool,
}

fn run(args: &Args) -> std::io::Result<GenReport> {
    if let Some(cpu) = args.cpu {
        io::pin_to_cpu(cpu)?;
    }
    let local: IpAddr = match args.target.ip() {
        IpAddr::V4(a) if a.is_loopback() => Ipv4Addr::LOCALHOST.into(),
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(a) if a.is_loopback() => Ipv6Addr::LOCALHOST.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = UdpSocket::bind(SocketAddr::new(local, 0))?;
    socket.connect(args.target)?;
    socket.set_read_timeout(Some(RECV_WAIT))?;
    let fd = socket.as_raw_fd();
    io::set_buffers(fd, args.socket_buffer);

    let size = args.size;
    let window = args.window as usize;
    let batch = args.batch as usize;
    let timeout_ns = args.timeout_ms.max(1) * 1_000_000;
    let duration_ns = args.duration_ms * 1_000_000;
    let scan_every_ns = (timeout_ns / 4).clamp(1_000_000, 10_000_000);

    let mut tx = io::Batch::new(batch, size);
    // Room for longer datagrams than ours, so a grown answer is seen as corrupt, not cut.
    let mut rx = io::Batch::new(batch, 4096);
    let mut scratch = vec![0u8; size];
    let mut auths = vec![[0u8; 16]; batch];
    let secret = args.secret.as_deref().map(str::as_bytes);
    let mut slots = vec![Slot::default(); window];
    let mut free: Vec<u32> = (0..window as u32).rev().collect();
    let mut next_seq: u64 = 1;
    let mut outstanding = 0usize;

    let mut r = GenReport {
        target: args.target.to_string(),
        window,
        batch,
        datagram_octets: size,
        signed: secret.is_some(),
        cpu: args.cpu,
        sent: 0,
        answered: 0,
        lost: 0,
        stale: 0,
        corrupt: 0,
        foreign: 0,
        send_errors: 0,
        unresolved_at_end: 0,
        send_seconds: 0.0,
        wall_seconds: 0.0,
        answered_rps: 0.0,
        worker_cpu_s: 0.0,
        worker_utilisation: 0.0,
        cpu_ns_per_answer: 0.0,
        sendmmsg_calls: 0,
        recvmmsg_calls: 0,
    };

    let start = Instant::now();
    let cpu0 = io::thread_cpu_ns();
    let mut sending = true;
    let mut send_end_ns = 0u64;
    let mut next_scan_ns = scan_every_ns;
    loop {
        let now = start.elapsed().as_nanos() as u64;
        if sending && (now >= duration_ns || args.requests.is_some_and(|n| r.sent >= n)) {
            sending = false;
            send_end_ns = now;
        }
        if !sending && (outstanding == 0 || now >= send_end_ns + timeout_ns) {
            break;
        }
        if now >= next_scan_ns {
            for (i, s) in slots.iter_mut().enumerate() {
                if s.outstanding && now.saturating_sub(s.sent_ns) >= timeout_ns {
                    s.outstanding = false;
                    outstanding -= 1;
                    r.lost += 1;
                    free.push(i as u32);
                }
            }
            next_scan_ns = now + scan_every_ns;
        }

        // Send every free slot, a batch per sendmmsg.
        let mut retry_soon = false;
        while sending && !free.is_empty() {
            let budget = args.requests.map_or(u64::MAX, |n| n.saturating_sub(r.sent));
            let n = free.len().min(batch).min(budget.min(batch as u64) as usize);
            if n == 0 {
                break;
            }
            for (i, a) in auths.iter_mut().enumerate().take(n) {
                let slot = free[free.len() - 1 - i];
                *a = fill(tx.buffer_mut(i), slot, next_seq + i as u64, size, secret);
            }
            r.sendmmsg_calls += 1;
            match tx.send(fd, n, size) {
                Ok(k) => {
                    for auth in &auths[..k] {
                        let slot = free.pop().expect("k <= n <= free.len()") as usize;
                        slots[slot] = Slot {
                            seq: next_seq,
                            auth: *auth,
                            sent_ns: now,
                            outstanding: true,
                        };
                        next_seq += 1;
                    }
                    r.sent += k as u64;
                    outstanding += k;
                    if k < n {
                        retry_soon = true;
                        break;
                    }
                }
                // Nothing listening (ECONNREFUSED) or a full buffer: wait in recvmmsg
                // (at most RECV_WAIT), then try again.
                Err(_) => {
                    r.send_errors += 1;
                    break;
                }
            }
        }

        // Receive what is there; block for the first answer when the window is full.
        r.recvmmsg_calls += 1;
        match rx.recv(fd, retry_soon || args.spin) {
            Ok(n) => {
                for i in 0..n {
                    let d = rx.received(i);
                    let Some((slot, seq)) = parse(d).filter(|&(slot, _)| slot < window) else {
                        r.foreign += 1;
                        continue;
                    };
                    let s = &mut slots[slot];
                    if s.outstanding && s.seq == seq {
                        // The request as sent: unsigned, then its Authenticator.
                        fill(&mut scratch, slot as u32, seq, size, None);
                        scratch[4..20].copy_from_slice(&s.auth);
                        if d == &scratch[..] {
                            r.answered += 1;
                            s.outstanding = false;
                            outstanding -= 1;
                            free.push(slot as u32);
                        } else {
                            r.corrupt += 1;
                        }
                    } else if seq != 0 && seq <= s.seq {
                        r.stale += 1;
                    } else {
                        r.foreign += 1;
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::ConnectionRefused
                ) => {}
            Err(e) => return Err(e),
        }
    }
    let wall_ns = start.elapsed().as_nanos() as u64;
    let cpu_ns = io::thread_cpu_ns().saturating_sub(cpu0);
    r.unresolved_at_end = outstanding as u64;
    r.lost += outstanding as u64;
    r.send_seconds = (send_end_ns as f64 / 1e9).max(1e-9);
    r.wall_seconds = wall_ns as f64 / 1e9;
    r.answered_rps = r.answered as f64 / r.send_seconds;
    r.worker_cpu_s = cpu_ns as f64 / 1e9;
    r.worker_utilisation = cpu_ns as f64 / wall_ns.max(1) as f64;
    r.cpu_ns_per_answer = cpu_ns as f64 / r.answered.max(1) as f64;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_names_its_slot_and_sequence_and_is_radius_shaped() {
        for size in [38, 44, 275, 276, 277, 1000, 4096] {
            let mut b = vec![0u8; size];
            let auth = fill(&mut b, 300, 123_456_789, size, None);
            assert_eq!(auth, [0; 16]);
            assert_eq!(parse(&b), Some((300, 123_456_789)), "size {size}");
            assert_eq!(b[0], COA_REQUEST);
            assert_eq!(b[1], 300u32 as u8);
            assert_eq!(usize::from(u16::from_be_bytes([b[2], b[3]])), size);
            // The attributes tile the rest exactly, each at least 2 octets.
            let mut at = 20;
            while at < size {
                assert_eq!(b[at], ACCT_SESSION_ID);
                let len = usize::from(b[at + 1]);
                assert!(len >= 2, "size {size}: attribute of {len} at {at}");
                at += len;
            }
            assert_eq!(at, size);
        }
    }

    #[test]
    fn different_sequence_numbers_give_different_datagrams() {
        let (mut a, mut b) = (vec![0u8; 44], vec![0u8; 44]);
        fill(&mut a, 1, 1, 44, None);
        fill(&mut b, 1, 2, 44, None);
        assert_ne!(a, b);
        assert_eq!(parse(&a[..37]), None);
        a[22] ^= 1;
        assert_eq!(parse(&a), None);
    }

    /// A signed request carries MD5(request with a zero Authenticator + secret), RFC 2866
    /// §3's Request Authenticator (a known vector computed independently with md5sum).
    #[test]
    fn a_signed_request_carries_its_request_authenticator() {
        let mut unsigned = vec![0u8; 44];
        fill(&mut unsigned, 7, 9, 44, None);
        let mut signed = vec![0u8; 44];
        let auth = fill(&mut signed, 7, 9, 44, Some(b"testing123"));
        assert_ne!(auth, [0; 16]);
        assert_eq!(signed[4..20], auth);
        assert_eq!(signed[..4], unsigned[..4]);
        assert_eq!(signed[20..], unsigned[20..]);
        assert_eq!(parse(&signed), Some((7, 9)));
        let mut input = unsigned.clone();
        input.extend_from_slice(b"testing123");
        assert_eq!(
            hex(&auth),
            MD5_OF_THE_UNSIGNED_REQUEST_AND_SECRET,
            "{}",
            hex(&input)
        );
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    const MD5_OF_THE_UNSIGNED_REQUEST_AND_SECRET: &str = "2285e6c446f895fc3b5de5aac2ede37a";
}
