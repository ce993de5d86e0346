//! roomcast-load's command line: parses the subcommand, runs its scenario on a runtime of
//! `--threads` workers, prints its JSON line (and appends it to `--json-out`); or prints the
//! text of a command that runs nothing (`report`, `free-ports`).

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use roomcast_load::cli::{Cli, Output};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(text) = roomcast_load::offline(&cli.command) {
        println!("{}", text?.trim_end());
        return Ok(());
    }
    let threads = cli.command.output().map_or(1, |o| o.threads);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    let report = runtime.block_on(roomcast_load::run(&cli.command))?;
    let line = serde_json::to_string(&report)?;
    println!("{line}");
    if let Some(Output {
        json_out: Some(path),
        ..
    }) = cli.command.output()
    {
        append(path, &line)?;
    }
    // Connections are dropped with the runtime, without close handshakes.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

fn append(path: &std::path::Path, line: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{line}")?;
    Ok(())
}
