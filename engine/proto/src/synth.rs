//! Synthetic sessions, deterministic from a seed, for benchmarks, the demo and the load
//! generator: the same `(seed, index)` always gives the same session, so a load generator can
//! target sessions a server loaded without reading the server's file.
//!
//! Key patterns (index `i`, seed `s`):
//! - `acct_session_id`: `"{s:04x}{i:012x}"` (16 characters, unique);
//! - `user_name`: `"user{i:08}@isp.example"` (21 characters, unique);
//! - `framed_ip`: `10.0.0.0 + i` (unique up to 16,777,216 sessions);
//! - `calling_station_id`: a locally administered MAC derived from `(s, i)`, `02-xx-xx-xx-xx-xx`;
//! - `nas_port_id`: `"ge-{i / 65536}/{(i / 256) % 256}/{i % 256}"`: the 256 sessions behind one
//!   port share the prefix `"ge-C/P/"` (a "mass disconnect" group).
//!
//! Demo sessions: index 0 also answers to `acct_session_id = "demo-1"` when built by
//! [`demo_sessions`], so the README's radclient line finds it.
#![forbid(unsafe_code)]

use core::net::Ipv4Addr;

use crate::session::Session;

/// splitmix64: a tiny, well-mixed deterministic generator.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The Acct-Session-Id of synthetic session `i`.
pub fn acct_session_id(seed: u64, i: u64) -> String {
    format!("{:04x}{:012x}", seed & 0xffff, i & 0xffff_ffff_ffff)
}

/// The User-Name of synthetic session `i`.
pub fn user_name(i: u64) -> String {
    format!("user{i:08}@isp.example")
}

/// The Framed-IP-Address of synthetic session `i`.
pub fn framed_ip(i: u64) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000u32.wrapping_add(i as u32))
}

/// The NAS-Port-Id of synthetic session `i`.
pub fn nas_port_id(i: u64) -> String {
    format!("ge-{}/{}/{}", i / 65_536, (i / 256) % 256, i % 256)
}

/// The NAS-Port-Id prefix shared by the 256 sessions of group `g` (`i / 256 == g`).
pub fn nas_port_group(g: u64) -> String {
    format!("ge-{}/{}/", g / 256, g % 256)
}

/// The Calling-Station-Id (a MAC address) of synthetic session `i`.
pub fn calling_station_id(seed: u64, i: u64) -> String {
    let m = mix(seed ^ mix(i)).to_be_bytes();
    format!(
        "02-{:02X}-{:02X}-{:02X}-{:02X}-{:02X}",
        m[0], m[1], m[2], m[3], m[4]
    )
}

/// Synthetic session `i` of `seed`: a typical broadband session.
pub fn session(seed: u64, i: u64) -> Session {
    Session {
        acct_session_id: Some(acct_session_id(seed, i)),
        user_name: Some(user_name(i)),
        framed_ip: Some(framed_ip(i)),
        calling_station_id: Some(calling_station_id(seed, i)),
        nas_port_id: Some(nas_port_id(i)),
        ..Session::default()
    }
}

/// `count` synthetic sessions of `seed`, in index order.
pub fn sessions(seed: u64, count: u64) -> impl Iterator<Item = Session> {
    (0..count).map(move |i| session(seed, i))
}

/// The demo set: `count` synthetic sessions whose Acct-Session-Ids are `demo-1`, `demo-2`, ...
/// (so `Acct-Session-Id = "demo-1"` disconnects the first), other keys as [`session`].
pub fn demo_sessions(seed: u64, count: u64) -> impl Iterator<Item = Session> {
    (0..count).map(move |i| Session {
        acct_session_id: Some(format!("demo-{}", i + 1)),
        ..session(seed, i)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_unique_keys() {
        assert_eq!(session(7, 42), session(7, 42));
        assert_ne!(
            session(7, 42).calling_station_id,
            session(8, 42).calling_station_id
        );
        let a: Vec<_> = sessions(1, 1000).collect();
        let mut ids: Vec<_> = a.iter().map(|s| s.acct_session_id.clone()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 1000);
        assert_eq!(a[0].acct_session_id.as_deref().map(str::len), Some(16));
        assert_eq!(a[257].nas_port_id.as_deref(), Some("ge-0/1/1"));
        assert!(
            a[257]
                .nas_port_id
                .as_deref()
                .unwrap()
                .starts_with(&nas_port_group(1))
        );
        assert_eq!(a[3].framed_ip, Some(Ipv4Addr::new(10, 0, 0, 3)));
        let demo: Vec<_> = demo_sessions(1, 2).collect();
        assert_eq!(demo[0].acct_session_id.as_deref(), Some("demo-1"));
    }
}
