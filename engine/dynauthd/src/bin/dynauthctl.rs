//! dynauthctl: the operator's tool over dynauthd's control socket (docs/CONTROL.md).
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use serde_json::{Map, Value, json};

/// Operate a running dynauthd through its control socket.
#[derive(Debug, Parser)]
#[command(name = "dynauthctl", version)]
struct Cli {
    /// The control socket (dynauthd --control PATH).
    #[arg(
        long,
        env = "DYNAUTH_CONTROL",
        default_value = "/run/dynauthd/control.sock"
    )]
    control: PathBuf,
    #[command(subcommand)]
    command: Top,
}

#[derive(Debug, Subcommand)]
enum Top {
    /// Sessions in the table.
    Sessions {
        #[command(subcommand)]
        command: Sessions,
    },
    /// Disconnects every session matching KEY=VALUE... (all of them or none), audited.
    Disconnect {
        /// Identification, e.g. acct_session_id=abc user_name=alice framed_ip=10.0.0.1.
        #[arg(required = true, value_name = "KEY=VALUE")]
        keys: Vec<String>,
        /// The most sessions this may remove (more refuses the whole request).
        #[arg(long, default_value_t = 1)]
        max_sessions: u32,
    },
    /// The server's session and feed counters.
    Stats,
    /// Makes dynauthd read its configuration file again (as SIGHUP does) and reports whether
    /// it was applied or, if not, the error (the old configuration keeps running).
    Reload,
}

#[derive(Debug, Subcommand)]
enum Sessions {
    /// How many live sessions.
    Count,
    /// The live sessions matching KEY=VALUE..., one JSON object per line.
    Get {
        #[arg(required = true, value_name = "KEY=VALUE")]
        keys: Vec<String>,
    },
    /// Upserts sessions from a JSON Lines file (`-`: standard input), in batches.
    Add {
        file: PathBuf,
        /// The NAS the sessions belong to.
        #[arg(long)]
        nas: String,
        /// Sessions per batch message.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
    /// Removes the session of NAS with this Acct-Session-Id (leaves a tombstone).
    Remove {
        #[arg(long)]
        nas: String,
        acct_session_id: String,
    },
}

struct Control {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Control {
    fn connect(path: &PathBuf) -> anyhow::Result<Control> {
        let stream = UnixStream::connect(path).with_context(|| {
            format!(
                "connecting to {} (is dynauthd running with --control {}?)",
                path.display(),
                path.display()
            )
        })?;
        Ok(Control {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    /// Sends one message; returns its result or the server's error as an error.
    fn call(&mut self, message: Value) -> anyhow::Result<Value> {
        writeln!(self.writer, "{message}")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("dynauthd closed the control connection");
        }
        let reply: Value = serde_json::from_str(&line).context("dynauthd's reply")?;
        if reply["ok"] == json!(true) {
            return Ok(reply["result"].clone());
        }
        let e = &reply["error"];
        let field = e["field"]
            .as_str()
            .map(|f| format!(" (field {f})"))
            .unwrap_or_default();
        bail!(
            "{}{field}: {}",
            e["code"].as_str().unwrap_or("error"),
            e["message"].as_str().unwrap_or("")
        )
    }
}

/// The numeric session fields; every other key's value is text.
const NUMERIC: &[&str] = &["nas_port", "framed_interface_id"];

fn query(keys: &[String]) -> anyhow::Result<Value> {
    let mut q = Map::new();
    for kv in keys {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("{kv:?}: expected KEY=VALUE, e.g. acct_session_id=abc");
        };
        let value = if NUMERIC.contains(&k) {
            json!(
                v.parse::<u64>()
                    .with_context(|| format!("{k}: {v:?} is not a number"))?
            )
        } else {
            json!(v)
        };
        q.insert(k.to_owned(), value);
    }
    Ok(Value::Object(q))
}

fn add(c: &mut Control, file: &PathBuf, nas: &str, batch: usize) -> anyhow::Result<()> {
    let input: Box<dyn BufRead> = if file.as_os_str() == "-" {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        Box::new(BufReader::new(f))
    };
    let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    let bar = (std::io::stderr().is_terminal() && size > 0).then(|| {
        let bar = indicatif::ProgressBar::new(size);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {per_sec} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let (mut events, mut applied, mut bytes) = (Vec::new(), 0usize, 0u64);
    let mut failed = Vec::new();
    let started = std::time::Instant::now();
    let mut flush = |events: &mut Vec<Value>, first_line: usize| -> anyhow::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let r = c.call(json!({"v": 1, "op": "batch", "events": std::mem::take(events)}))?;
        applied += r["applied"].as_u64().unwrap_or(0) as usize;
        for e in r["errors"].as_array().into_iter().flatten() {
            let index = e["index"].as_u64().unwrap_or(0) as usize;
            failed.push(format!("line {}: {}", first_line + index, e["message"]));
        }
        Ok(())
    };
    let mut first_line = 1;
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        bytes += line.len() as u64 + 1;
        if line.trim().is_empty() {
            continue;
        }
        let session: Value = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}", file.display(), i + 1))?;
        if events.is_empty() {
            first_line = i + 1;
        }
        events.push(json!({"op": "upsert", "nas": nas, "session": session}));
        if events.len() >= batch.max(1) {
            flush(&mut events, first_line)
                .with_context(|| format!("the batch starting at line {first_line} was refused"))?;
            if let Some(bar) = &bar {
                bar.set_position(bytes);
            }
        }
    }
    flush(&mut events, first_line)
        .with_context(|| format!("the batch starting at line {first_line} was refused"))?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    for f in &failed {
        eprintln!("dynauthctl: {f}");
    }
    println!(
        "{applied} session(s) upserted for NAS {nas:?} in {:.1} s, {} refused",
        started.elapsed().as_secs_f64(),
        failed.len()
    );
    if !failed.is_empty() {
        bail!("{} session(s) were refused", failed.len());
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut c = Control::connect(&cli.control)?;
    match cli.command {
        Top::Sessions { command } => match command {
            Sessions::Count => {
                let r = c.call(json!({"v": 1, "op": "sessions_count"}))?;
                println!("{}", r["sessions"]);
            }
            Sessions::Get { keys } => {
                let r = c.call(json!({"v": 1, "op": "sessions_get", "query": query(&keys)?}))?;
                for s in r["sessions"].as_array().into_iter().flatten() {
                    println!("{s}");
                }
                if r["truncated"] == json!(true) {
                    eprintln!("dynauthctl: more sessions match; only the first ones are shown");
                }
            }
            Sessions::Add { file, nas, batch } => add(&mut c, &file, &nas, batch)?,
            Sessions::Remove {
                nas,
                acct_session_id,
            } => {
                let r = c.call(json!({"v": 1, "op": "delete", "nas": nas,
                    "acct_session_id": acct_session_id}))?;
                if r["deleted"] != json!(true) {
                    bail!("no live session {acct_session_id:?} on NAS {nas:?}");
                }
                println!("removed");
            }
        },
        Top::Disconnect { keys, max_sessions } => {
            let r = c.call(json!({"v": 1, "op": "disconnect", "query": query(&keys)?,
                "max_sessions": max_sessions}))?;
            println!("{} session(s) disconnected", r["disconnected"]);
        }
        Top::Reload => {
            let r = c
                .call(json!({"v": 1, "op": "reload"}))
                .context("the configuration was not reloaded (the old one keeps running)")?;
            println!(
                "{}",
                r["summary"].as_str().unwrap_or("configuration reloaded")
            );
        }
        Top::Stats => {
            let r = c.call(json!({"v": 1, "op": "stats"}))?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dynauthctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
