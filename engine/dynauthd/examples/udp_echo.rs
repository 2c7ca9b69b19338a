//! A plain UDP echo server on dynauthd's own I/O backends (recvmmsg/sendmmsg or io_uring):
//! the baseline `docs/RUNTIME_BENCH.md` compares dynauthd with. One thread, optionally pinned.
//!
//! `cargo run --release -p dynauthd --example udp_echo -- ADDR [mmsg|uring] [CPU]`
#![forbid(unsafe_code)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use dynauth_udp::{Backend, BufferSizes, Handler, Received};

struct Echo;

impl Handler for Echo {
    fn datagram(&mut self, d: Received<'_>, out: &mut [u8]) -> Option<usize> {
        let out = out.get_mut(..d.data.len())?;
        out.copy_from_slice(d.data);
        Some(d.data.len())
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:3899".into())
        .parse()?;
    let io = args.next().unwrap_or_else(|| "mmsg".into());
    if let Some(cpu) = args.next() {
        core_affinity_pin(cpu.parse()?);
    }
    let sizes = BufferSizes {
        recv: 32 << 20,
        send: 8 << 20,
    };
    let listener = dynauth_udp::bind_udp(addr, sizes)?;
    let local = listener.local;
    let mut backend = match io.as_str() {
        "uring" => Backend::Uring(Box::new(dynauth_udp::UringBackend::new(
            vec![listener],
            64,
        )?)),
        _ => Backend::Mmsg(Box::new(dynauth_udp::MmsgBackend::new(vec![listener], 64))),
    };
    let stop = dynauth_udp::install_shutdown_signals()?;
    println!("udp_echo listening {local} io={io}");
    let mut echo = Echo;
    while !stop.load(Ordering::Relaxed) {
        backend.poll_batch(Duration::from_millis(100), &mut echo)?;
    }
    backend.shutdown(&mut echo);
    println!("udp_echo totals: {:?}", backend.stats());
    Ok(())
}

fn core_affinity_pin(cpu: usize) {
    let _ = core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
}
