//! The client table: which source addresses may send requests, with which shared secret(s)
//! and under which policy (SPEC §2.1, §3, §5, §6.3, §6.6, §8, §9).
//!
//! Owns: CIDR parsing, longest-prefix match over IPv4 and IPv6 (an IPv4-mapped IPv6 source is
//! matched as IPv4), secret rotation (two live secrets), per-client policy and the NAS's own
//! identity. Must not touch: packets (`decide`), files and flags (the server's config layer
//! builds these types).
#![forbid(unsafe_code)]

use core::fmt;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use core::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::auth::Secret;
use crate::session::KeyProfile;

/// An IPv4 or IPv6 network: address and prefix length, host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

/// A CIDR that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("`{0}` is not an IP address")]
    BadAddress(String),
    #[error("prefix length `{0}` is not a number from 0 to 32 (IPv4) or 128 (IPv6)")]
    BadLength(String),
}

impl Cidr {
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        let addr = canonical(addr);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return None;
        }
        Some(Cidr {
            addr: mask(addr, len),
            len,
        })
    }

    /// A single host (/32 or /128).
    pub fn host(addr: IpAddr) -> Self {
        let addr = canonical(addr);
        let len = if addr.is_ipv4() { 32 } else { 128 };
        Cidr { addr, len }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.len) == self.addr
    }

    fn is_host(&self) -> bool {
        self.len == if self.addr.is_ipv4() { 32 } else { 128 }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| CidrError::BadAddress(addr.to_string()))?;
        match len {
            None => Ok(Cidr::host(addr)),
            Some(l) => l
                .trim()
                .parse::<u8>()
                .ok()
                .and_then(|n| Cidr::new(addr, n))
                .ok_or_else(|| CidrError::BadLength(l.to_string())),
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// IPv4-mapped IPv6 addresses (a dual-stack socket's view of an IPv4 peer) become IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn mask(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & m))
        }
        IpAddr::V6(v6) => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & m))
        }
    }
}

/// Whether several matched sessions are acted on (SPEC §6.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum MultiSessionPolicy {
    /// Apply to every matched session, up to `cap`; more gives NAK 508.
    All { cap: u32 },
    /// Exactly one session per request; more gives NAK 508.
    Single,
}

impl MultiSessionPolicy {
    pub fn max_sessions(&self) -> u32 {
        match self {
            MultiSessionPolicy::All { cap } => *cap,
            MultiSessionPolicy::Single => 1,
        }
    }
}

impl Default for MultiSessionPolicy {
    fn default() -> Self {
        MultiSessionPolicy::All { cap: 10_000 }
    }
}

/// When an answer carries a Message-Authenticator (SPEC §3: always, by default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AnswerSigning {
    /// Every answer carries one, first (SPEC §3, BlastRADIUS guidance).
    #[default]
    Always,
    /// Only answers to requests that carried one (FreeRADIUS's behaviour; for old DACs).
    WhenRequested,
}

/// Per-client policy. Every field has a safe default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientPolicy {
    /// Discard requests without a Message-Authenticator (SPEC §2.5).
    pub require_message_authenticator: bool,
    /// Discard requests without an Event-Timestamp (SPEC §2.6).
    pub require_event_timestamp: bool,
    /// Accepted Event-Timestamp skew, either side, and the duplicate-cache window (SPEC §4).
    pub event_timestamp_window_secs: u32,
    /// Accepted identification combinations (SPEC §6.3).
    pub key_profile: KeyProfile,
    /// Several matched sessions: all (with a cap) or single (SPEC §6.6).
    pub multi_session: MultiSessionPolicy,
    /// A Reply-Message with a short reason in every NAK (SPEC §9).
    pub reply_message_reasons: bool,
    /// Service-Type = Authorize Only is supported: CoA-NAK 507 and a re-authorization;
    /// otherwise 405 (SPEC §8).
    pub authorize_only: bool,
    /// NAS identification attributes must be present (absent gives 402, SPEC §5).
    pub require_nas_identification: bool,
    /// When answers carry a Message-Authenticator.
    pub answer_message_authenticator: AnswerSigning,
    /// The routing context this client's address keys refer to (SPEC §6.7).
    pub vrf: Option<String>,
    /// Most Proxy-State attributes echoed; a request with more is silently discarded.
    pub max_proxy_states: u8,
}

impl Default for ClientPolicy {
    fn default() -> Self {
        ClientPolicy {
            require_message_authenticator: false,
            require_event_timestamp: false,
            event_timestamp_window_secs: 300,
            key_profile: KeyProfile::Any,
            multi_session: MultiSessionPolicy::default(),
            reply_message_reasons: false,
            authorize_only: true,
            require_nas_identification: false,
            answer_message_authenticator: AnswerSigning::Always,
            vrf: None,
            max_proxy_states: 16,
        }
    }
}

/// One DAC: a name for logs and counters, its secret(s), its policy.
#[derive(Debug, Clone)]
pub struct Client {
    pub name: String,
    pub network: Cidr,
    /// The current secret; answers are signed with whichever secret verified the request.
    pub secret: Secret,
    /// The secret being retired during a change: still verifies (SPEC §3).
    pub previous_secret: Option<Secret>,
    pub policy: ClientPolicy,
}

impl Client {
    pub fn new(network: Cidr, secret: Secret) -> Self {
        Client {
            name: network.to_string(),
            network,
            secret,
            previous_secret: None,
            policy: ClientPolicy::default(),
        }
    }

    /// The live secrets, current first.
    pub fn secrets(&self) -> impl Iterator<Item = &Secret> {
        core::iter::once(&self.secret).chain(self.previous_secret.as_ref())
    }
}

/// Index of a client in its table (dense, for counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u32);

/// A client network appears twice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("client network {0} is configured twice")]
pub struct DuplicateClient(pub Cidr);

/// Source address to client, by longest-prefix match. Empty admits nobody (SPEC §2.1).
#[derive(Debug, Clone, Default)]
pub struct ClientTable {
    clients: Vec<Client>,
    /// Single hosts, for a hash probe before the prefix scan.
    hosts: hashbrown::HashMap<IpAddr, u32>,
    /// Networks sorted by prefix length, longest first.
    networks: Vec<(Cidr, u32)>,
}

impl ClientTable {
    pub fn new(clients: impl IntoIterator<Item = Client>) -> Result<Self, DuplicateClient> {
        let mut table = ClientTable::default();
        for client in clients {
            table.add(client)?;
        }
        Ok(table)
    }

    pub fn add(&mut self, client: Client) -> Result<ClientId, DuplicateClient> {
        let net = client.network;
        if self.clients.iter().any(|c| c.network == net) {
            return Err(DuplicateClient(net));
        }
        let id = self.clients.len() as u32;
        if net.is_host() {
            self.hosts.insert(net.addr(), id);
        } else {
            let at = self
                .networks
                .partition_point(|(c, _)| c.prefix_len() >= net.prefix_len());
            self.networks.insert(at, (net, id));
        }
        self.clients.push(client);
        Ok(ClientId(id))
    }

    /// The client for a source address: the most specific network that contains it.
    pub fn lookup(&self, source: IpAddr) -> Option<(ClientId, &Client)> {
        let source = canonical(source);
        let id = self.hosts.get(&source).copied().or_else(|| {
            self.networks
                .iter()
                .find(|(net, _)| net.contains(source))
                .map(|(_, id)| *id)
        })?;
        self.clients.get(id as usize).map(|c| (ClientId(id), c))
    }

    pub fn get(&self, id: ClientId) -> Option<&Client> {
        self.clients.get(id.0 as usize)
    }

    /// The client configured for exactly this network (a client's identity across a reload).
    pub fn position_of(&self, network: Cidr) -> Option<ClientId> {
        self.clients
            .iter()
            .position(|c| c.network == network)
            .map(|i| ClientId(i as u32))
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Client> {
        self.clients.iter()
    }
}

/// This NAS's identity, against which NAS-IP-Address, NAS-IPv6-Address and NAS-Identifier are
/// checked (SPEC §5). An empty address list means "the address the request arrived on".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NasIdentity {
    pub identifiers: Vec<String>,
    pub ipv4: Vec<Ipv4Addr>,
    pub ipv6: Vec<Ipv6Addr>,
}

impl NasIdentity {
    /// Whether `id` is one of this NAS's NAS-Identifiers. Unlike the addresses, an identifier
    /// has no natural default (the address a request arrived on stands in for NAS-IP-Address),
    /// so with none configured every NAS-Identifier is a mismatch (NAK 403; SPEC §5,
    /// docs/CONFORMANCE.md rule 5.4) and dynauthd says so in its start-up log.
    pub fn identifier_matches(&self, id: &[u8]) -> bool {
        self.identifiers.iter().any(|own| own.as_bytes() == id)
    }

    pub fn ipv4_matches(&self, ip: Ipv4Addr, arrived_on: IpAddr) -> bool {
        if self.ipv4.is_empty() {
            canonical(arrived_on) == IpAddr::V4(ip)
        } else {
            self.ipv4.contains(&ip)
        }
    }

    pub fn ipv6_matches(&self, ip: Ipv6Addr, arrived_on: IpAddr) -> bool {
        if self.ipv6.is_empty() {
            arrived_on == IpAddr::V6(ip)
        } else {
            self.ipv6.contains(&ip)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(net: &str) -> Client {
        Client::new(net.parse().unwrap(), Secret::new(net).unwrap())
    }

    // SPEC §2.1: an empty client list admits nobody.
    #[test]
    fn spec_2_1_empty_table_admits_nobody() {
        let table = ClientTable::default();
        assert!(table.lookup("127.0.0.1".parse().unwrap()).is_none());
    }

    #[test]
    fn longest_prefix_wins_for_v4_and_v6() {
        let table = ClientTable::new([
            client("10.0.0.0/8"),
            client("10.1.0.0/16"),
            client("10.1.2.3"),
            client("2001:db8::/32"),
            client("2001:db8:1::/48"),
        ])
        .unwrap();
        let name = |ip: &str| {
            table
                .lookup(ip.parse().unwrap())
                .map(|(_, c)| c.name.clone())
        };
        assert_eq!(name("10.9.9.9").as_deref(), Some("10.0.0.0/8"));
        assert_eq!(name("10.1.9.9").as_deref(), Some("10.1.0.0/16"));
        assert_eq!(name("10.1.2.3").as_deref(), Some("10.1.2.3/32"));
        assert_eq!(name("::ffff:10.1.2.3").as_deref(), Some("10.1.2.3/32"));
        assert_eq!(name("2001:db8:1::5").as_deref(), Some("2001:db8:1::/48"));
        assert_eq!(name("2001:db8:2::5").as_deref(), Some("2001:db8::/32"));
        assert_eq!(name("192.0.2.1"), None);
    }

    #[test]
    fn cidr_parse_errors_and_masking() {
        assert_eq!(
            "10.1.2.3/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert!(matches!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(CidrError::BadLength(_))
        ));
        assert!(matches!(
            "nope/8".parse::<Cidr>(),
            Err(CidrError::BadAddress(_))
        ));
        assert!(ClientTable::new([client("10.0.0.0/8"), client("10.0.0.0/8")]).is_err());
    }

    // SPEC §5: an absent address list means the address the request arrived on.
    #[test]
    fn spec_5_nas_ip_defaults_to_arrival_address() {
        let nas = NasIdentity::default();
        let arrived: IpAddr = "192.0.2.7".parse().unwrap();
        assert!(nas.ipv4_matches("192.0.2.7".parse().unwrap(), arrived));
        assert!(!nas.ipv4_matches("192.0.2.8".parse().unwrap(), arrived));
        let nas = NasIdentity {
            ipv4: vec!["198.51.100.1".parse().unwrap()],
            ..Default::default()
        };
        assert!(nas.ipv4_matches("198.51.100.1".parse().unwrap(), arrived));
        assert!(!nas.ipv4_matches("192.0.2.7".parse().unwrap(), arrived));
    }

    #[test]
    fn spec_5_4_no_configured_identifier_matches_no_nas_identifier() {
        let nas = NasIdentity::default();
        assert!(!nas.identifier_matches(b"bng-1"));
        let nas = NasIdentity {
            identifiers: vec!["bng-1".into()],
            ..Default::default()
        };
        assert!(nas.identifier_matches(b"bng-1"));
        assert!(!nas.identifier_matches(b"bng-2"));
    }
}
