//! A gateway agent for benchmarks and demos: it owns one NAS on dynauthd's control socket,
//! loads the first N synthetic sessions (`dynauth_proto::synth`, as `loadgen --synthetic N`
//! targets them) for that NAS, then commits every action it receives at once.
//!
//! ```sh
//! cargo run --release -p dynauthd --example commit_agent -- /tmp/dynauthd.sock bench 100000
//! ```
//!
//! With `--feed-only` it only loads the sessions and exits (for a server with
//! `--data-plane table`).
//! It prints `ready` once the sessions are in, and at the end (stdin closed or Ctrl-C) how many
//! actions it committed. Not a production agent: it tears nothing down.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// One upsert event of a batch line, borrowed from the session it sends.
#[derive(Serialize)]
struct Upsert<'a> {
    op: &'static str,
    nas: &'a str,
    session: &'a dynauth_proto::session::Session,
}

/// The reply to a batch line: only whether it was applied whole.
#[derive(Deserialize)]
struct BatchReply {
    ok: bool,
    result: BatchResult,
}

#[derive(Deserialize)]
struct BatchResult {
    errors: Vec<Value>,
}

/// An action line, as far as committing it needs: its id and the sessions' indexes.
#[derive(Deserialize)]
struct Action<'a> {
    #[serde(rename = "type", borrow)]
    ty: std::borrow::Cow<'a, str>,
    #[serde(default)]
    action: u64,
    #[serde(default)]
    sessions: Vec<ActionSession>,
}

#[derive(Deserialize)]
struct ActionSession {
    index: u64,
}

fn main() -> anyhow::Result<()> {
    // --feed-only: load the sessions and take no actions (a server with --data-plane table).
    // --from=I: the sessions from index I on (feed new sessions into a loaded table).
    let feed_only = std::env::args().any(|a| a == "--feed-only");
    let from: u64 = std::env::args()
        .find_map(|a| a.strip_prefix("--from=").map(str::to_owned))
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(0);
    // --rate=R: feed at most R upserts per second (batches of 1,000 paced evenly).
    let rate: Option<f64> = std::env::args()
        .find_map(|a| a.strip_prefix("--rate=").map(str::to_owned))
        .map(|v| v.parse())
        .transpose()?;
    let mut args = std::env::args()
        .skip(1)
        .filter(|a| a != "--feed-only" && !a.starts_with("--from=") && !a.starts_with("--rate="));
    let usage = "usage: commit_agent CONTROL_SOCKET NAS SESSIONS [SEED] [--feed-only] [--from=I] [--rate=R]";
    let path = args.next().ok_or_else(|| anyhow::anyhow!(usage))?;
    let nas = args.next().ok_or_else(|| anyhow::anyhow!(usage))?;
    let count: u64 = args.next().ok_or_else(|| anyhow::anyhow!(usage))?.parse()?;
    let seed: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1);
    let stream = UnixStream::connect(&path)?;
    let mut writer = std::io::BufWriter::new(stream.try_clone()?);
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut request = |writer: &mut std::io::BufWriter<UnixStream>,
                       reader: &mut BufReader<UnixStream>,
                       message: Value|
     -> anyhow::Result<Value> {
        writeln!(writer, "{message}")?;
        writer.flush()?;
        line.clear();
        reader.read_line(&mut line)?;
        let reply: Value = serde_json::from_str(&line)?;
        anyhow::ensure!(reply["ok"] == json!(true), "{reply}");
        Ok(reply["result"].clone())
    };
    request(
        &mut writer,
        &mut reader,
        json!({"v": 1, "op": "hello", "agent": "commit-agent", "nas": [nas], "actions": !feed_only}),
    )?;
    let started = Instant::now();
    let mut sent = 0u64;
    // Each batch line written straight from typed values (no `serde_json::Value` per
    // session: the agent's own cost stays small beside the server's).
    let mut line = Vec::with_capacity(1 << 20);
    let mut reply = String::new();
    let mut i = from;
    while i < from + count {
        if let Some(rate) = rate {
            let due = started + std::time::Duration::from_secs_f64((i - from) as f64 / rate);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        let end = (i + 1000).min(from + count);
        line.clear();
        line.extend_from_slice(br#"{"v":1,"op":"batch","events":["#);
        for k in i..end {
            let mut session = dynauth_proto::synth::session(seed, k);
            session.nas = None;
            if k > i {
                line.push(b',');
            }
            serde_json::to_writer(
                &mut line,
                &Upsert {
                    op: "upsert",
                    nas: &nas,
                    session: &session,
                },
            )?;
        }
        line.extend_from_slice(b"]}\n");
        writer.write_all(&line)?;
        writer.flush()?;
        reply.clear();
        reader.read_line(&mut reply)?;
        let r: BatchReply =
            serde_json::from_str(&reply).map_err(|e| anyhow::anyhow!("{e}: {reply}"))?;
        anyhow::ensure!(r.ok && r.result.errors.is_empty(), "{reply}");
        sent += end - i;
        i = end;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "ready: {sent} sessions upserted in {secs:.2} s ({:.0} upserts/s)",
        sent as f64 / secs.max(1e-9)
    );
    if feed_only {
        return Ok(());
    }
    let mut committed = 0u64;
    let mut text = String::new();
    let mut out = String::new();
    loop {
        text.clear();
        if reader.read_line(&mut text)? == 0 {
            break;
        }
        // Only the fields a commit needs are read (the sessions' contents are skipped).
        let Ok(action) = serde_json::from_str::<Action>(&text) else {
            continue;
        };
        if action.ty != "action" {
            continue; // the replies to our action_result lines
        }
        out.clear();
        use std::fmt::Write as _;
        write!(
            out,
            r#"{{"v":1,"op":"action_result","action":{},"results":["#,
            action.action
        )?;
        for (k, s) in action.sessions.iter().enumerate() {
            if k > 0 {
                out.push(',');
            }
            write!(out, r#"{{"index":{},"result":"committed"}}"#, s.index)?;
        }
        out.push_str("]}");
        writeln!(writer, "{out}")?;
        // One write for every action already read.
        if !reader.buffer().contains(&b'\n') {
            writer.flush()?;
        }
        committed += 1;
    }
    println!("committed {committed} actions");
    Ok(())
}
