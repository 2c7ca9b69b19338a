//! Session affinity in Redis (or Valkey): which instance owns which session, shared by the
//! owners that publish it (`publish`) and the routers that read it (`crate::router`).
//!
//! Owns: the names and encodings of everything in the store (below), the connection
//! settings. Must not touch: the session table (owners hand changes in), packets.
//!
//! # Layout (prefix `P`, default `dynauth`)
//!
//! | key | type | what |
//! |---|---|---|
//! | `P:{k:ROUTEKEY}` | hash | one field per session holding this routing key: `OWNER\|NAS\|ID` → `1` while live, `t:MS` for [`TOMBSTONE_WINDOW`] after its removal at wall-clock MS; expires `ttl` after its last write |
//! | `P:owner:{OWNER}` | string | the owner's DAS address (`ip:port`), written every heartbeat, expires after 3 missed ones |
//! | `P:inv` | channel | routing keys whose owners changed (netstrings `LEN:BYTES`), for the routers' caches |
//!
//! `ROUTEKEY` is `dynauth_proto::route::route_key` (`acct_session_id=S1`, `user_name=alice`,
//! `framed_ip=10.0.0.7`, …). A lookup by any routing key is one `HKEYS` of one key, so one
//! cluster slot; the owners of a request are the intersection over the routing keys it
//! carries. Writes touch one key per command (`HSET`+`PEXPIRE`, or a `HDEL`), never a
//! multi-key transaction, so they run unchanged on Redis Cluster: the braces are the hash
//! tag, and the whole name is the tag, so keys spread over the slots.
//!
//! A field names its session (`NAS|ID`, `dynauth_proto::route::session_identity`), so writes
//! are idempotent: a re-publish after a restart writes the same fields, and a session moving
//! to another owner removes exactly its own field from the old one.
#![forbid(unsafe_code)]

pub mod publish;

use core::time::Duration;

/// Where the affinity lives and how it is named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AffinitySettings {
    /// `redis://HOST:PORT[/DB]` (also `rediss://`, `redis+unix://` as the redis crate reads them).
    pub url: String,
    /// The key prefix (several deployments can share one Redis).
    pub prefix: String,
    /// How long an index entry lives after its last write (owners refresh live sessions).
    pub ttl: Duration,
}

impl AffinitySettings {
    pub fn new(url: impl Into<String>) -> Self {
        AffinitySettings {
            url: url.into(),
            prefix: DEFAULT_PREFIX.into(),
            ttl: DEFAULT_TTL,
        }
    }
}

pub const DEFAULT_PREFIX: &str = "dynauth";
/// Index entries live a day after their last write; owners refresh every live session's
/// entries well within that (`publish::REFRESH_FRACTION`).
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// How often an owner writes its address.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// An owner whose address was not written for this long is gone (three missed heartbeats).
pub const OWNER_TTL: Duration = Duration::from_secs(3);

/// A field's value while its session is live.
pub const LIVE: &str = "1";
/// A removed session's field holds this prefix and the wall-clock milliseconds of its
/// removal, for [`TOMBSTONE_WINDOW`]: a retried Disconnect still reaches the owner that
/// removed it (which answers ACK 201 from its own tombstone, SPEC §4).
pub const TOMBSTONE_PREFIX: &str = "t:";
/// How long a tombstone field routes (the session table's default tombstone window).
pub const TOMBSTONE_WINDOW: Duration = Duration::from_secs(300);

/// The value of a tombstone field removed at `wall_ms`.
pub fn tombstone_value(wall_ms: u64) -> String {
    format!("{TOMBSTONE_PREFIX}{wall_ms}")
}

/// What a field's value says at `now_wall_ms`: `Some(true)` live, `Some(false)` a tombstone
/// within its window, `None` an expired tombstone or a value that is neither.
pub fn field_state(value: &[u8], now_wall_ms: u64) -> Option<bool> {
    if value == LIVE.as_bytes() {
        return Some(true);
    }
    let at: u64 = core::str::from_utf8(value.strip_prefix(TOMBSTONE_PREFIX.as_bytes())?)
        .ok()?
        .parse()
        .ok()?;
    let window = u64::try_from(TOMBSTONE_WINDOW.as_millis()).unwrap_or(u64::MAX);
    (now_wall_ms.saturating_sub(at) < window).then_some(false)
}

/// The index key of one routing key.
pub fn index_key(prefix: &str, route_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + route_key.len() + 5);
    k.extend_from_slice(prefix.as_bytes());
    k.extend_from_slice(b":{k:");
    k.extend_from_slice(route_key);
    k.push(b'}');
    k
}

/// The key holding an owner's address.
pub fn owner_key(prefix: &str, owner: &str) -> String {
    format!("{prefix}:owner:{{{owner}}}")
}

/// The invalidation channel.
pub fn channel(prefix: &str) -> String {
    format!("{prefix}:inv")
}

/// The field of one session under an index key.
pub fn field(owner: &str, identity: &str) -> String {
    format!("{owner}|{identity}")
}

/// The owner a field names.
pub fn field_owner(field: &[u8]) -> Option<&[u8]> {
    field.split(|&b| b == b'|').next().filter(|o| !o.is_empty())
}

/// The NAS a field names (`OWNER|NAS|ID`; the NAS may itself hold `|`).
pub fn field_nas(field: &[u8]) -> Option<&str> {
    let text = core::str::from_utf8(field).ok()?;
    let (_, rest) = text.split_once('|')?;
    let (nas, _) = rest.rsplit_once('|')?;
    (!nas.is_empty()).then_some(nas)
}

/// Why an owner id is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("owner id {0:?} must be 1 to 64 characters of [A-Za-z0-9._-]")]
pub struct BadOwnerId(pub String);

/// Checks an owner id (it is part of fields and key names).
pub fn check_owner_id(id: &str) -> Result<(), BadOwnerId> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(BadOwnerId(id.into()))
    }
}

/// Encodes routing keys for the invalidation channel: netstrings `LEN:BYTES`, concatenated.
pub fn encode_invalidation(keys: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for k in keys {
        out.extend_from_slice(k.len().to_string().as_bytes());
        out.push(b':');
        out.extend_from_slice(k);
    }
    out
}

/// Decodes an invalidation message; stops at the first malformed entry.
pub fn decode_invalidation(mut message: &[u8]) -> Vec<Vec<u8>> {
    let mut keys = Vec::new();
    while let Some(colon) = message.iter().position(|&b| b == b':') {
        let Some(len) = core::str::from_utf8(&message[..colon])
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
        else {
            break;
        };
        let rest = &message[colon + 1..];
        let Some(key) = rest.get(..len) else { break };
        keys.push(key.to_vec());
        message = &rest[len..];
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            index_key("dynauth", b"user_name=alice"),
            b"dynauth:{k:user_name=alice}"
        );
        assert_eq!(owner_key("dynauth", "bng-a"), "dynauth:owner:{bng-a}");
        assert_eq!(
            field_owner(field("bng-a", "nas|a:S1").as_bytes()),
            Some(&b"bng-a"[..])
        );
        assert!(check_owner_id("bng-a.1_x").is_ok());
        assert!(check_owner_id("a|b").is_err());
        assert!(check_owner_id("").is_err());
        assert_eq!(field_nas(b"learner|bng|7|a:S1"), Some("bng|7"));
        assert_eq!(field_nas(b"learner||a:S1"), None);
        assert_eq!(field_state(b"1", 5), Some(true));
        assert_eq!(
            field_state(tombstone_value(1_000).as_bytes(), 1_000 + 299_999),
            Some(false)
        );
        assert_eq!(
            field_state(tombstone_value(1_000).as_bytes(), 1_000 + 300_000),
            None
        );
        assert_eq!(field_state(b"t:x", 0), None);
    }

    #[test]
    fn invalidation_round_trip_with_any_octets() {
        let keys = vec![b"user_name=a:b|c".to_vec(), vec![0, b':', 255], Vec::new()];
        assert_eq!(decode_invalidation(&encode_invalidation(&keys)), keys);
        assert_eq!(decode_invalidation(b"5:ab"), Vec::<Vec<u8>>::new());
    }
}
