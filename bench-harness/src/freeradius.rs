//! FreeRADIUS as a DAS: the minimal configuration the harness writes to a temporary
//! directory (radiusd.conf with a `listen { type = coa }` on a loopback port, one client,
//! a `files` instance listing the known Acct-Session-Ids, and a `recv-coa` policy that ACKs
//! known sessions and NAKs others with Error-Cause 503), and finding the binary.
//! Owns: that configuration. Must not touch: process handling (see `server`).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::machine::which;

#[derive(Debug, thiserror::Error)]
pub enum FreeradiusError {
    #[error("writing the FreeRADIUS configuration in {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("reading sessions from {path}: {source}")]
    Sessions {
        path: String,
        source: std::io::Error,
    },
}

/// The FreeRADIUS server binary: `freeradius` (Debian) or `radiusd` (upstream), on PATH or
/// in /usr/sbin.
pub fn find() -> Option<PathBuf> {
    ["freeradius", "radiusd"].iter().find_map(|n| {
        which(n).or_else(|| {
            let p = Path::new("/usr/sbin").join(n);
            crate::machine::is_executable(&p).then_some(p)
        })
    })
}

/// The module directory holding `rlm_files.so` and `rlm_always.so` next to the binary's
/// usual places.
pub fn libdir() -> PathBuf {
    for d in [
        "/usr/lib/freeradius",
        "/usr/lib64/freeradius",
        "/usr/local/lib/freeradius",
        "/usr/lib/x86_64-linux-gnu/freeradius",
        "/usr/lib/aarch64-linux-gnu/freeradius",
    ] {
        if Path::new(d).join("rlm_files.so").exists() {
            return PathBuf::from(d);
        }
    }
    PathBuf::from("/usr/lib/freeradius")
}

/// The radiusd.conf text. Every path points into `dir`; `threads` sizes the thread pool.
pub fn radiusd_conf(
    dir: &Path,
    libdir: &Path,
    listen: SocketAddr,
    secret: &str,
    threads: usize,
) -> String {
    let d = dir.display();
    let lib = libdir.display();
    let ip = listen.ip();
    let port = listen.port();
    let threads = threads.max(1);
    let start = (threads * 4).min(32);
    format!(
        r#"# Written by bench-harness: FreeRADIUS as a Dynamic Authorization Server (RFC 5176).
prefix = /usr
exec_prefix = /usr
sysconfdir = /etc
localstatedir = /var
sbindir = /usr/sbin
logdir = {d}
raddbdir = {d}
radacctdir = {d}
name = freeradius
confdir = {d}
modconfdir = {d}
run_dir = {d}
db_dir = {d}
libdir = {lib}
pidfile = {d}/radiusd.pid
max_request_time = 30
# No replies held for duplicate detection: FreeRADIUS's fastest setting (dynauthd keeps its
# duplicate cache).
cleanup_delay = 0
max_requests = 1048576
hostname_lookups = no
log {{
	destination = stdout
	colourise = no
	stripped_names = no
	auth = no
}}
security {{
	allow_core_dumps = no
	max_attributes = 200
	reject_delay = 0
	status_server = no
}}
thread pool {{
	start_servers = {start}
	max_servers = 64
	min_spare_servers = 2
	max_spare_servers = 64
	max_requests_per_server = 0
	auto_limit_acct = no
}}
client bench {{
	ipaddr = {ip}
	secret = {secret}
	require_message_authenticator = no
	nas_type = other
}}
modules {{
	always ok {{
		rcode = ok
	}}
	always reject {{
		rcode = reject
	}}
	# The known sessions, one entry per Acct-Session-Id, looked up by that attribute.
	files known_sessions {{
		filename = {d}/sessions
		key = "%{{%{{Acct-Session-Id}}:-none}}"
	}}
}}
server dynauth_bench {{
	listen {{
		type = coa
		ipaddr = {ip}
		port = {port}
	}}
	# Disconnect-Request and CoA-Request both arrive here.
	recv-coa {{
		known_sessions.authorize
		if (ok || updated) {{
			ok
		}}
		else {{
			update reply {{
				&Error-Cause := Session-Context-Not-Found
			}}
			reject
		}}
	}}
	send-coa {{
		ok
	}}
}}
"#
    )
}

/// Writes `radiusd.conf` and the `sessions` file (one entry per Acct-Session-Id found in the
/// JSON Lines session file) into `dir`; returns how many sessions it listed.
pub fn write_config(
    dir: &Path,
    listen: SocketAddr,
    secret: &str,
    threads: usize,
    sessions_jsonl: &Path,
) -> Result<usize, FreeradiusError> {
    let werr = |source| FreeradiusError::Write {
        path: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(werr)?;
    std::fs::write(
        dir.join("radiusd.conf"),
        radiusd_conf(dir, &libdir(), listen, secret, threads),
    )
    .map_err(werr)?;
    let input =
        std::fs::File::open(sessions_jsonl).map_err(|source| FreeradiusError::Sessions {
            path: sessions_jsonl.display().to_string(),
            source,
        })?;
    let out = std::fs::File::create(dir.join("sessions")).map_err(werr)?;
    let mut out = std::io::BufWriter::new(out);
    let mut n = 0;
    for line in BufReader::new(input).lines() {
        let line = line.map_err(|source| FreeradiusError::Sessions {
            path: sessions_jsonl.display().to_string(),
            source,
        })?;
        if let Some(id) = acct_session_id(&line) {
            write!(out, "{}", users_entry(&id)).map_err(werr)?;
            n += 1;
        }
    }
    out.flush().map_err(werr)?;
    Ok(n)
}

/// The Acct-Session-Id of one JSON Lines session, if it has one.
pub fn acct_session_id(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v.get("acct_session_id")?.as_str().map(str::to_string)
}

/// One `files` entry: the quoted name and no check or reply items.
pub fn users_entry(id: &str) -> String {
    let escaped: String = id
        .chars()
        .filter(|c| !c.is_control())
        .flat_map(|c| match c {
            '"' | '\\' => vec!['\\', c],
            _ => vec![c],
        })
        .collect();
    format!("\"{escaped}\"\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_listens_for_coa_and_naks_unknown_sessions_with_503() {
        let c = radiusd_conf(
            Path::new("/tmp/x"),
            Path::new("/usr/lib/freeradius"),
            "127.0.0.1:41234".parse().unwrap(),
            "s3cret",
            1,
        );
        assert!(c.contains("type = coa"));
        assert!(c.contains("port = 41234"));
        assert!(c.contains("ipaddr = 127.0.0.1"));
        assert!(c.contains("secret = s3cret"));
        assert!(c.contains("recv-coa {"));
        assert!(c.contains("&Error-Cause := Session-Context-Not-Found"));
        assert!(c.contains("filename = /tmp/x/sessions"));
        assert!(c.contains("key = \"%{%{Acct-Session-Id}:-none}\""));
    }

    #[test]
    fn session_ids_are_listed_from_json_lines() {
        let dir = std::env::temp_dir().join(format!("bh-fr-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let jsonl = dir.join("s.jsonl");
        std::fs::write(
            &jsonl,
            "{\"acct_session_id\":\"a-1\"}\n{\"user_name\":\"x\"}\n{\"acct_session_id\":\"q\\\"x\"}\n",
        )
        .unwrap();
        let n = write_config(&dir, "127.0.0.1:9".parse().unwrap(), "s", 1, &jsonl).unwrap();
        assert_eq!(n, 2);
        let users = std::fs::read_to_string(dir.join("sessions")).unwrap();
        assert_eq!(users, "\"a-1\"\n\n\"q\\\"x\"\n\n");
        assert!(dir.join("radiusd.conf").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
