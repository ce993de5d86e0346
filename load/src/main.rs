//! roomcast-load's command line: parses the arguments, runs the scenario on a runtime of
//! `--threads` workers, prints its JSON line (and appends it to `--json-out`).

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use roomcast_load::Args;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    let report = runtime.block_on(roomcast_load::run(&args))?;
    let line = serde_json::to_string(&report)?;
    println!("{line}");
    if let Some(path) = &args.json_out {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        writeln!(f, "{line}")?;
    }
    // Connections are dropped with the runtime, without close handshakes.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
