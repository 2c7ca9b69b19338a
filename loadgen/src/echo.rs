//! The echo server: the ceiling target. Each thread binds the listen address with
//! SO_REUSEPORT (the kernel spreads the sources over the threads), receives a batch with
//! `recvmmsg` and sends every datagram back, unchanged, to its source with one `sendmmsg`.
//! With `loadgen --expect echo` this measures what the machine's UDP path allows, the
//! ceiling any DAS on it can reach.
#![forbid(unsafe_code)]

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use dynauth_udp::dac::BatchReceiver;

/// A running echo server.
#[derive(Debug)]
pub struct EchoServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    echoed: Arc<AtomicU64>,
    threads: Vec<JoinHandle<io::Result<()>>>,
}

fn bind(listen: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    socket.set_reuse_port(true)?;
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.bind(&listen.into())?;
    // A read timeout lets the threads notice a stop request.
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    Ok(socket.into())
}

impl EchoServer {
    /// Starts `threads` echo threads on `listen` (port 0: a free port, shared by all),
    /// pinned round robin to `cpus` when given; `spin`: busy-poll instead of sleeping.
    pub fn start(
        listen: SocketAddr,
        threads: usize,
        cpus: Option<&[usize]>,
        batch: usize,
        spin: bool,
    ) -> io::Result<EchoServer> {
        let first = bind(listen)?;
        let addr = first.local_addr()?;
        let mut sockets = vec![first];
        for _ in 1..threads.max(1) {
            sockets.push(bind(addr)?);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicU64::new(0));
        let mut handles = Vec::new();
        for (i, socket) in sockets.into_iter().enumerate() {
            let cpu = cpus.filter(|c| !c.is_empty()).map(|c| c[i % c.len()]);
            let stop = Arc::clone(&stop);
            let echoed = Arc::clone(&echoed);
            let batch = batch.clamp(1, 1024);
            let handle = std::thread::Builder::new()
                .name(format!("echo-{i}"))
                .spawn(move || {
                    if let Some(id) = cpu {
                        core_affinity::set_for_current(core_affinity::CoreId { id });
                    }
                    let mut rx = BatchReceiver::new(batch, 4096);
                    let fd = socket.as_raw_fd();
                    while !stop.load(Ordering::Relaxed) {
                        match rx.recv(fd, !spin) {
                            Ok(n) => {
                                let _ = rx.reflect(fd);
                                echoed.fetch_add(n as u64, Ordering::Relaxed);
                            }
                            Err(e) if spin && e.kind() == io::ErrorKind::WouldBlock => {
                                std::hint::spin_loop();
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    io::ErrorKind::WouldBlock
                                        | io::ErrorKind::TimedOut
                                        | io::ErrorKind::Interrupted
                                        | io::ErrorKind::ConnectionRefused
                                ) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    Ok(())
                })?;
            handles.push(handle);
        }
        Ok(EchoServer {
            addr,
            stop,
            echoed,
            threads: handles,
        })
    }

    /// One thread on 127.0.0.1 at a free port, batch 64, sleeping in recvmmsg: the
    /// loopback target of tests and checks.
    pub fn loopback() -> io::Result<EchoServer> {
        EchoServer::start(
            SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0)),
            1,
            None,
            64,
            false,
        )
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams echoed so far.
    pub fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::Relaxed)
    }

    /// Runs until `duration` passes (forever when `None`), then stops.
    pub fn serve(self, duration: Option<Duration>) -> io::Result<u64> {
        let started = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(100));
            if duration.is_some_and(|d| started.elapsed() >= d)
                || self.threads.iter().any(|h| h.is_finished())
            {
                break;
            }
        }
        self.stop()
    }

    /// Stops the threads; returns how many datagrams were echoed.
    pub fn stop(self) -> io::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.threads {
            h.join()
                .map_err(|_| io::Error::other("echo thread panicked"))??;
        }
        Ok(self.echoed.load(Ordering::Relaxed))
    }
}
