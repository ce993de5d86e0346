//! The `roomcast` binary: `serve`, `demo` and `check-config`. Errors become `anyhow` here, at
//! the edge, and a message naming what is wrong.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use roomcast::auth::{now_secs, sign_hs256, Claims};
use roomcast::config::{Algorithm, Config, LogFormat, Overrides};
use roomcast::setup::{log_filter, Setup};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "roomcast",
    version,
    about = "Kafka-to-WebSocket fan-out by rooms"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The options every command that runs or checks the service takes but the brokers: the
/// demo's alone, since it runs its own Kafka (its listeners default to 127.0.0.1:8080, :9090).
#[derive(clap::Args, Clone)]
struct Local {
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Public listener address (overrides server.listen and ROOMCAST_LISTEN).
    #[arg(long)]
    listen: Option<String>,
    /// Admin listener address (overrides server.admin_listen and ROOMCAST_ADMIN_LISTEN).
    #[arg(long)]
    admin_listen: Option<String>,
}

#[derive(clap::Args, Clone)]
struct Common {
    #[command(flatten)]
    local: Local,
    /// Kafka bootstrap servers (overrides kafka.brokers and ROOMCAST_KAFKA_BROKERS).
    #[arg(long)]
    brokers: Option<String>,
}

impl Common {
    /// The configuration these options name, checked and built the one way every command
    /// shares.
    fn setup(&self) -> anyhow::Result<Setup> {
        let config = Config::assemble(self.local.config.as_deref(), &self.overrides())?;
        Ok(Setup::build(config)?)
    }

    fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.local.listen.clone(),
            admin_listen: self.local.admin_listen.clone(),
            brokers: self.brokers.clone(),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve(Common),
    /// Run the service on an embedded Kafka with a demo producer and page.
    Demo(Local),
    /// Validate a configuration and print the effective one, secrets hidden.
    CheckConfig(Common),
    /// Print a connection token signed with the configured HMAC secret (for trying it out).
    Token(TokenArgs),
}

#[derive(clap::Args)]
struct TokenArgs {
    #[command(flatten)]
    common: Common,
    /// The user (`sub`).
    #[arg(long)]
    sub: String,
    /// Room patterns the token grants, comma-separated (e.g. 'feature:**,task:*').
    #[arg(long, value_delimiter = ',')]
    rooms: Vec<String>,
    /// Permissions the token carries, comma-separated; `auth.perms` maps them to rooms.
    #[arg(long, value_delimiter = ',')]
    perms: Vec<String>,
    /// The tenant (`tenant` claim): the token's rooms are that tenant's.
    #[arg(long)]
    tenant: Option<String>,
    /// Seconds until the token expires.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("roomcast: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::CheckConfig(c) => {
            let setup = c.setup()?;
            for name in &setup.config().ignored_env {
                eprintln!("roomcast: {name} is not a setting and changes nothing");
            }
            print!("{}", setup.config().redacted_toml());
            eprintln!("configuration is valid");
            Ok(())
        }
        Command::Token(t) => {
            let setup = t.common.setup()?;
            let auth = &setup.config().auth;
            let secret = match (auth.algorithm, &auth.secret) {
                (Algorithm::HS256, Some(secret)) => secret,
                _ => anyhow::bail!("token: needs auth.algorithm = HS256 and auth.secret"),
            };
            let claims = Claims {
                sub: t.sub,
                exp: now_secs() + t.ttl,
                tenant: t.tenant,
                rooms: t.rooms,
                perms: t.perms,
            };
            println!("{}", sign_hs256(secret, &claims));
            Ok(())
        }
        Command::Serve(c) => {
            let mut setup = c.setup()?;
            init_logging(setup.take_log_filter(), setup.config().log.format);
            report_ignored_env(&setup.config().ignored_env);
            block_on(roomcast::serve(setup, None, roomcast::shutdown::signal()))
        }
        Command::Demo(d) => {
            let mut base = Config::default();
            base.server.listen = "127.0.0.1:8080".into();
            base.server.admin_listen = "127.0.0.1:9090".into();
            let c = Common {
                local: d,
                brokers: None,
            };
            let config = Config::assemble_over(base, c.local.config.as_deref(), &c.overrides())?;
            init_logging(log_filter(&config.log)?, config.log.format);
            report_ignored_env(&config.ignored_env);
            block_on(roomcast::demo::run(config, roomcast::shutdown::signal()))
        }
    }
}

/// Runs the service on a multi-threaded runtime whose shutdown is bounded: a blocking call
/// stuck on an unreachable broker must not keep the process alive.
fn block_on(
    service: impl std::future::Future<Output = Result<(), roomcast::Error>>,
) -> anyhow::Result<()> {
    let runtime = roomcast::thread_cache::hook_workers(
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("roomcast"),
    )
    .build()
    .context("cannot start the runtime")?;
    let result = runtime.block_on(service);
    runtime.shutdown_timeout(Duration::from_secs(2));
    result.map_err(Into::into)
}

fn report_ignored_env(names: &[String]) {
    for name in names {
        tracing::warn!(variable = %name, "not a setting; it changes nothing");
    }
}

fn init_logging(filter: EnvFilter, format: LogFormat) {
    use std::io::IsTerminal;
    // Colours only for a person at a terminal: a file or a log collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}
