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

use serde_json::{Value, json};

fn main() -> anyhow::Result<()> {
    // --feed-only: load the sessions and take no actions (a server with --data-plane table).
    // --from=I: the sessions from index I on (feed new sessions into a loaded table).
    let feed_only = std::env::args().any(|a| a == "--feed-only");
    let from: u64 = std::env::args()
        .find_map(|a| a.strip_prefix("--from=").map(str::to_owned))
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(0);
    let mut args = std::env::args()
        .skip(1)
        .filter(|a| a != "--feed-only" && !a.starts_with("--from="));
    let usage = "usage: commit_agent CONTROL_SOCKET NAS SESSIONS [SEED] [--feed-only] [--from=I]";
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
    let mut batch = Vec::with_capacity(1000);
    let mut sent = 0u64;
    for i in from..from + count {
        let mut s = dynauth_proto::synth::session(seed, i);
        s.nas = None;
        batch.push(json!({"op": "upsert", "nas": nas, "session": s}));
        if batch.len() == 1000 || i + 1 == from + count {
            let events = std::mem::take(&mut batch);
            sent += events.len() as u64;
            let r = request(
                &mut writer,
                &mut reader,
                json!({"v": 1, "op": "batch", "events": events}),
            )?;
            anyhow::ensure!(r["errors"] == json!([]), "{r}");
        }
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
    loop {
        text.clear();
        if reader.read_line(&mut text)? == 0 {
            break;
        }
        let message: Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(_) => continue,
        };
        if message["type"] != json!("action") {
            continue; // the replies to our action_result lines
        }
        let results: Vec<Value> = message["sessions"]
            .as_array()
            .map(|list| {
                list.iter()
                    .map(|s| json!({"index": s["index"], "result": "committed"}))
                    .collect()
            })
            .unwrap_or_default();
        writeln!(
            writer,
            "{}",
            json!({"v": 1, "op": "action_result", "action": message["action"], "results": results})
        )?;
        // One write for every action already read.
        if !reader.buffer().contains(&b'\n') {
            writer.flush()?;
        }
        committed += 1;
    }
    println!("committed {committed} actions");
    Ok(())
}
