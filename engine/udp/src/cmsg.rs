//! Socket addresses and control messages (IP_PKTINFO / IPV6_PKTINFO, SO_RXQ_OVFL,
//! SO_TIMESTAMPNS, UDP_SEGMENT) read and written as bytes, in safe code.
#![forbid(unsafe_code)]

use core::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use crate::CONTROL_LEN;

// ---------------------------------------------------------------------------------------
// Addresses and control messages, as bytes (safe code)
// ---------------------------------------------------------------------------------------

/// A `sockaddr` buffer, aligned for the kernel.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub(crate) struct NameBuf(pub(crate) [u8; 32]);

/// A control-message buffer, aligned for `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub(crate) struct ControlBuf(pub(crate) [u8; CONTROL_LEN]);

pub(crate) fn read_u16_be(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

pub(crate) fn read_u32_ne(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// A `sockaddr_in` / `sockaddr_in6` in bytes to a socket address.
pub(crate) fn parse_sockaddr(b: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes(b.get(0..2)?.try_into().ok()?);
    let port = read_u16_be(b, 2)?;
    match libc::c_int::from(family) {
        libc::AF_INET => {
            let ip: [u8; 4] = b.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
        }
        libc::AF_INET6 => {
            let flow = read_u32_ne(b, 4)?;
            let ip: [u8; 16] = b.get(8..24)?.try_into().ok()?;
            let scope = read_u32_ne(b, 24)?;
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                u32::from_be(flow),
                scope,
            )))
        }
        _ => None,
    }
}

/// Writes `addr` as a `sockaddr_in` / `sockaddr_in6`; returns its length.
pub(crate) fn write_sockaddr(addr: SocketAddr, out: &mut [u8; 32]) -> u32 {
    out.fill(0);
    match addr {
        SocketAddr::V4(a) => {
            out[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            out[2..4].copy_from_slice(&a.port().to_be_bytes());
            out[4..8].copy_from_slice(&a.ip().octets());
            size_of::<libc::sockaddr_in>() as u32
        }
        SocketAddr::V6(a) => {
            out[0..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
            out[2..4].copy_from_slice(&a.port().to_be_bytes());
            out[4..8].copy_from_slice(&a.flowinfo().to_be().to_ne_bytes());
            out[8..24].copy_from_slice(&a.ip().octets());
            out[24..28].copy_from_slice(&a.scope_id().to_ne_bytes());
            size_of::<libc::sockaddr_in6>() as u32
        }
    }
}

pub(crate) const CMSG_ALIGN: usize = size_of::<usize>();
pub(crate) const CMSG_HDR: usize = size_of::<libc::cmsghdr>();

pub(crate) const fn cmsg_align(n: usize) -> usize {
    (n + CMSG_ALIGN - 1) & !(CMSG_ALIGN - 1)
}

/// What the control messages of one received datagram said.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PacketInfo {
    /// The local address the datagram was sent to.
    pub(crate) local: Option<IpAddr>,
    pub(crate) ifindex: u32,
    /// The socket's cumulative drop counter (SO_RXQ_OVFL), when the kernel sent it.
    pub(crate) drops: Option<u32>,
    /// When the kernel received the datagram (SCM_TIMESTAMPNS: CLOCK_REALTIME nanoseconds
    /// since the Unix epoch), when it sent the time.
    pub(crate) received_ns: Option<u64>,
}

pub(crate) fn parse_control(ctrl: &[u8]) -> PacketInfo {
    let mut info = PacketInfo::default();
    let mut off = 0;
    while off + CMSG_HDR <= ctrl.len() {
        let Some(len) = ctrl
            .get(off..off + CMSG_ALIGN)
            .and_then(|b| b.try_into().ok())
            .map(usize::from_ne_bytes)
        else {
            break;
        };
        let level = read_u32_ne(ctrl, off + CMSG_ALIGN).unwrap_or(0) as libc::c_int;
        let ty = read_u32_ne(ctrl, off + CMSG_ALIGN + 4).unwrap_or(0) as libc::c_int;
        if len < CMSG_HDR || off + len > ctrl.len() {
            break;
        }
        let data = &ctrl[off + CMSG_HDR..off + len];
        match (level, ty) {
            (libc::IPPROTO_IP, libc::IP_PKTINFO) if data.len() >= 12 => {
                info.ifindex = read_u32_ne(data, 0).unwrap_or(0);
                let ip: [u8; 4] = data[8..12].try_into().unwrap_or_default();
                info.local = Some(IpAddr::V4(Ipv4Addr::from(ip)));
            }
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) if data.len() >= 20 => {
                let ip: [u8; 16] = data[0..16].try_into().unwrap_or_default();
                info.local = Some(IpAddr::V6(Ipv6Addr::from(ip)));
                info.ifindex = read_u32_ne(data, 16).unwrap_or(0);
            }
            (libc::SOL_SOCKET, libc::SO_RXQ_OVFL) if data.len() >= 4 => {
                info.drops = read_u32_ne(data, 0);
            }
            // struct timespec: tv_sec and tv_nsec, each a native long (64-bit targets).
            (libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS) if data.len() >= 16 => {
                let word = |at: usize| {
                    data.get(at..at + 8)
                        .and_then(|b| b.try_into().ok())
                        .map(i64::from_ne_bytes)
                };
                if let (Some(secs), Some(nanos)) = (word(0), word(8)) {
                    info.received_ns = u64::try_from(secs)
                        .ok()
                        .zip(u64::try_from(nanos).ok())
                        .map(|(s, n)| s.saturating_mul(1_000_000_000).saturating_add(n));
                }
            }
            _ => {}
        }
        off += cmsg_align(len);
    }
    info
}

/// Most datagrams in one GSO message (the kernel allows 64 or more) and most payload octets.
pub(crate) const GSO_MAX_SEGMENTS: usize = 64;
/// `UDP_SEGMENT` (linux/udp.h; Linux 4.18), not exported by libc for glibc targets.
pub(crate) const UDP_SEGMENT: libc::c_int = 103;
pub(crate) const GSO_MAX_BYTES: usize = 65_000;

/// Where one answer goes (mmsg backend, before messages are built).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AnswerMeta {
    pub(crate) to: SocketAddr,
    pub(crate) local: Option<IpAddr>,
    pub(crate) ifindex: u32,
    pub(crate) len: usize,
    /// Which transmit buffer holds the answer.
    pub(crate) slot: usize,
}

impl Default for AnswerMeta {
    fn default() -> Self {
        AnswerMeta {
            to: SocketAddr::from(([0, 0, 0, 0], 0)),
            local: None,
            ifindex: 0,
            len: 0,
            slot: 0,
        }
    }
}

impl AnswerMeta {
    /// Where the answer goes and leaves from: answers with one route can share a GSO
    /// message.
    pub(crate) fn route_key(&self) -> (SocketAddr, Option<IpAddr>, u32) {
        (self.to, self.local, self.ifindex)
    }

    pub(crate) fn same_route(&self, o: &AnswerMeta) -> bool {
        self.route_key() == o.route_key()
    }
}

/// Appends a UDP_SEGMENT control message (the GSO segment size) at `offset` of `out`;
/// returns the new control length.
pub(crate) fn write_udp_segment(out: &mut [u8; CONTROL_LEN], offset: usize, size: u16) -> usize {
    let len = CMSG_HDR + 2;
    let Some(area) = out.get_mut(offset..offset + cmsg_align(len)) else {
        return offset;
    };
    area.fill(0);
    area[0..CMSG_ALIGN].copy_from_slice(&len.to_ne_bytes());
    area[CMSG_ALIGN..CMSG_ALIGN + 4].copy_from_slice(&libc::SOL_UDP.to_ne_bytes());
    area[CMSG_ALIGN + 4..CMSG_ALIGN + 8].copy_from_slice(&UDP_SEGMENT.to_ne_bytes());
    area[CMSG_HDR..CMSG_HDR + 2].copy_from_slice(&size.to_ne_bytes());
    offset + cmsg_align(len)
}

/// Writes the IP_PKTINFO / IPV6_PKTINFO control message that makes an answer leave from
/// `local`; returns the control length (0 when `local` is unknown).
pub(crate) fn write_pktinfo(
    out: &mut [u8; CONTROL_LEN],
    local: Option<IpAddr>,
    ifindex: u32,
) -> usize {
    let Some(local) = local else { return 0 };
    out.fill(0);
    let (level, ty, data_len) = match local {
        IpAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_PKTINFO, 12),
        IpAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, 20),
    };
    let len = CMSG_HDR + data_len;
    out[0..CMSG_ALIGN].copy_from_slice(&len.to_ne_bytes());
    out[CMSG_ALIGN..CMSG_ALIGN + 4].copy_from_slice(&level.to_ne_bytes());
    out[CMSG_ALIGN + 4..CMSG_ALIGN + 8].copy_from_slice(&ty.to_ne_bytes());
    let data = &mut out[CMSG_HDR..CMSG_HDR + data_len];
    match local {
        // in_pktinfo: ifindex 0 and ipi_spec_dst = local: route normally, source = local.
        IpAddr::V4(ip) => data[4..8].copy_from_slice(&ip.octets()),
        // in6_pktinfo: address, then the interface (needed for link-local addresses).
        IpAddr::V6(ip) => {
            data[0..16].copy_from_slice(&ip.octets());
            data[16..20].copy_from_slice(&ifindex.to_ne_bytes());
        }
    }
    cmsg_align(len)
}
