//! `loadgen`: the DAC load generator's command line. Everything lives in the library
//! (`dynauth_loadgen`); this only parses flags, runs, and prints.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use dynauth_loadgen::echo::EchoServer;
use dynauth_loadgen::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::EchoServer(args)) => {
            let server = EchoServer::start(
                args.listen,
                args.threads,
                args.cpus.as_ref().map(|c| c.0.as_slice()),
                args.batch,
                args.spin,
            )
            .with_context(|| format!("echo server on {}", args.listen))?;
            eprintln!(
                "loadgen echo-server: listening on {} with {} thread(s)",
                server.local_addr(),
                args.threads.max(1)
            );
            let echoed = server.serve(args.duration)?;
            eprintln!("loadgen echo-server: echoed {echoed} datagrams");
            Ok(())
        }
        Some(Command::Sessions(args)) => {
            match &args.out {
                Some(path) => {
                    let file = std::fs::File::create(path)
                        .with_context(|| format!("creating {}", path.display()))?;
                    dynauth_loadgen::pool::write_synthetic(args.seed, args.count, file)
                }
                None => dynauth_loadgen::pool::write_synthetic(
                    args.seed,
                    args.count,
                    std::io::stdout().lock(),
                ),
            }
            .context("writing sessions")?;
            Ok(())
        }
        None => {
            // Ctrl-C stops sending, drains and reports; a second Ctrl-C kills.
            dynauth_udp::dac::catch_interrupt().context("installing the SIGINT handler")?;
            if cli.run.capacity_search() {
                return capacity(&cli.run);
            }
            let report = dynauth_loadgen::run(&cli.run)?;
            if cli.run.json {
                println!("{}", serde_json::to_string_pretty(&report.run)?);
            } else {
                print!("{}", report.text());
            }
            if !report.counts_add_up {
                anyhow::bail!("the counts do not add up (a loadgen bug): see the report");
            }
            if report.nothing_answered() {
                anyhow::bail!(
                    "nothing was answered ({} requests sent, {} timed out, {} unsent)",
                    report.requests,
                    report.timeouts,
                    report.unsent
                );
            }
            Ok(())
        }
    }
}

/// The SLO capacity search: each step as it ends (stdout, or stderr with --json), then the
/// answer (the JSON report with --json); non-zero exit when no rate passed.
fn capacity(args: &dynauth_loadgen::RunArgs) -> anyhow::Result<()> {
    let plan = dynauth_loadgen::capacity::plan_of(args)?;
    let say = |line: &str| {
        if args.json {
            if !args.quiet {
                eprint!("{line}");
            }
        } else {
            print!("{line}");
        }
    };
    say(&plan.text());
    let report = dynauth_loadgen::capacity::run(args, |n, step| say(&step.line(n)))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    say(&report.answer());
    if report.capacity_rps.is_none() {
        anyhow::bail!("no offered rate met the target");
    }
    Ok(())
}
