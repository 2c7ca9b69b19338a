//! UDP sockets: binding with SO_REUSEPORT, buffer sizes, and the options dynauthd asks for (IP_PKTINFO, SO_RXQ_OVFL, SO_TIMESTAMPNS).

use core::mem::size_of;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

// ---------------------------------------------------------------------------------------
// Sockets
// ---------------------------------------------------------------------------------------

/// Socket buffer sizes (SO_RCVBUF / SO_SNDBUF), in octets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferSizes {
    pub recv: usize,
    pub send: usize,
}

/// One bound UDP socket of one shard.
#[derive(Debug)]
pub struct Listener {
    pub socket: Socket,
    /// The address it is bound to (its port is the port answers leave from).
    pub local: SocketAddr,
    /// The receive buffer the kernel granted (it may cap the request at net.core.rmem_max).
    pub recv_buffer: usize,
}

pub(crate) fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a live c_int for the duration of the call and the length passed is
    // exactly its size; setsockopt only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Binds one SO_REUSEPORT UDP socket on `addr` with packet info, drop counting and the
/// requested buffer sizes. IPv6 sockets are IPv6-only (list IPv4 addresses separately).
pub fn bind_udp(addr: SocketAddr, sizes: BufferSizes) -> io::Result<Listener> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let fd = socket.as_raw_fd();
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
    } else {
        setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
    }
    socket.set_reuse_port(true)?;
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RXQ_OVFL, 1)?;
    // Kernel receive times (SCM_TIMESTAMPNS), for shedding by age under overload. Optional:
    // without them the runtime falls back to the batch's age.
    let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1);
    // Ask for the sizes; with CAP_NET_ADMIN the FORCE variants pass net.core.*mem_max.
    let clamp = |n: usize| libc::c_int::try_from(n).unwrap_or(libc::c_int::MAX);
    if setsockopt_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        clamp(sizes.recv),
    )
    .is_err()
    {
        socket.set_recv_buffer_size(sizes.recv)?;
    }
    if setsockopt_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        clamp(sizes.send),
    )
    .is_err()
    {
        socket.set_send_buffer_size(sizes.send)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    let local = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("bound socket has no IP address"))?;
    // Linux reports twice the usable size it granted.
    let recv_buffer = socket.recv_buffer_size()? / 2;
    Ok(Listener {
        socket,
        local,
        recv_buffer,
    })
}
