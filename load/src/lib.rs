//! roomcast-load: opens N WebSocket connections to roomcast (or to roomcast-floor), produces M
//! records/s open-loop, and measures end-to-end latency, deliveries/s, losses and duplicates,
//! and the server's CPU, write syscalls and memory over the measured window.
//!
//! One subcommand per scenario (`cli.rs`). Fan-out and idle (`fanout.rs`) and the connect
//! storm (`connstorm.rs`) run against a server already running; five scenarios start the
//! server themselves: the resume storm (`storm.rs`), which restarts it under its clients, the
//! replay buffer's memory (`replaymem.rs`), the routing rate from a backlog (`backlog.rs`),
//! hostile clients watched by a bystander (`hostile.rs`), and the presence storm
//! (`presence_storm/`), which starts several replicas sharing a presence topic; the Kafka
//! path (`kafkapath.rs`) has no server at all.
//!
//! Only loopback addresses are accepted as targets.
//!
//! The library also holds the client-side framing (`frame`), which the floor and the
//! service's raw-wire tests share; the binaries only parse arguments and run.

mod backlog;
pub mod cli;
mod client;
mod connections;
mod connstorm;
mod dist;
mod fanout;
pub mod frame;
mod hostile;
mod kafkapath;
mod presence_storm;
mod procstat;
mod producer;
mod replaymem;
pub mod report;
mod samples;
mod server;
mod storm;
pub mod tail;
mod wire;

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use cli::Command;
use dist::Dist;

/// Runs the scenario `command` names; its results as one JSON object.
pub async fn run(command: &Command) -> anyhow::Result<Value> {
    match command {
        Command::Fanout(args) => fanout::fanout(args).await,
        Command::Idle(args) => fanout::idle(args).await,
        Command::ConnectStorm(args) => connstorm::run(args).await,
        Command::KafkaPath(args) => {
            let dist = Dist::parse(&args.rooms.dist).map_err(anyhow::Error::msg)?;
            kafkapath::run(args, dist).await
        }
        Command::ResumeStorm(args) => storm::run(args, args.managed.spec()).await,
        Command::ReplayMemory(args) => replaymem::run(args, args.managed.spec()).await,
        Command::RouteBacklog(args) => backlog::run(args, args.managed.spec()).await,
        Command::Hostile(args) => hostile::run(args, args.managed.spec()).await,
        Command::PresenceStorm(args) => presence_storm::run(args).await,
        Command::CreateTopic(args) => {
            producer::create_topic(&args.brokers, &args.topic, args.partitions).await?;
            eprintln!(
                "topic {} ready ({} partitions)",
                args.topic, args.partitions
            );
            Ok(json!({ "topic": args.topic, "created": true }))
        }
        Command::CombineReplicas(args) => report::combine(args),
        Command::Report(_) | Command::FreePorts { .. } => {
            bail!("{command:?} prints no JSON line: see `offline`")
        }
    }
}

/// The commands that run no scenario, and need no runtime: their text, if `command` is one.
pub fn offline(command: &Command) -> Option<anyhow::Result<String>> {
    match command {
        Command::Report(args) => Some(report::tables(args)),
        Command::FreePorts { count } => Some(free_ports(*count)),
        _ => None,
    }
}

/// Ports the kernel had free on 127.0.0.1 a moment ago, space-separated.
fn free_ports(count: usize) -> anyhow::Result<String> {
    let listeners = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    let ports = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port().to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ports.join(" "))
}

pub(crate) fn loopback(addr: &SocketAddr) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() {
        bail!("{addr} is not a loopback address: this tool only targets 127.0.0.0/8");
    }
    Ok(())
}

pub(crate) fn ws_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .strip_prefix("ws://")
        .context("the URL must start with ws://")?;
    let host = rest.split(['/', '?']).next().unwrap_or(rest);
    let addr: SocketAddr = host
        .parse()
        .with_context(|| format!("{host:?} is not an IP:port"))?;
    loopback(&addr)?;
    Ok(addr)
}

pub(crate) fn token(secret: &str, sub: &str, ttl: u64) -> anyhow::Result<String> {
    tenant_token(secret, sub, None, ttl)
}

/// A token of user `sub` of `tenant` (none: the tenantless namespace), allowed `task:*`.
pub(crate) fn tenant_token(
    secret: &str,
    sub: &str,
    tenant: Option<&str>,
    ttl: u64,
) -> anyhow::Result<String> {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + ttl;
    let mut claims = json!({ "sub": sub, "exp": exp, "rooms": ["task:*"] });
    if let Some(t) = tenant {
        claims["tenant"] = json!(t);
    }
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// A report's microseconds as milliseconds with `decimals` places, or `-` when absent.
pub(crate) fn us_as_ms(v: &Value, decimals: usize) -> String {
    v.as_f64()
        .map(|u| format!("{:.*} ms", decimals, u / 1000.0))
        .unwrap_or("-".into())
}

pub(crate) fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_token_carries_its_tenant_and_a_plain_one_none() {
        let claims = |t: &str| {
            jsonwebtoken::decode::<Value>(
                t,
                &jsonwebtoken::DecodingKey::from_secret(b"s-0123456789"),
                &jsonwebtoken::Validation::default(),
            )
            .unwrap()
            .claims
        };
        let with = claims(&tenant_token("s-0123456789", "u7", Some("acme"), 60).unwrap());
        assert_eq!(with["sub"], "u7");
        assert_eq!(with["tenant"], "acme");
        assert_eq!(with["rooms"], json!(["task:*"]));
        let without = claims(&token("s-0123456789", "u7", 60).unwrap());
        assert!(without.get("tenant").is_none());
    }
}
