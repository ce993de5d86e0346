//! The command line: one subcommand per scenario, each made of the flag groups it uses
//! (flattened), so a flag a scenario would ignore is not accepted by it.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::server;

#[derive(Parser, Debug)]
#[command(
    name = "roomcast-load",
    version,
    about = "Load generator for roomcast: latency, fan-out rate, memory per connection"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Connections receive records produced open-loop through Kafka (or the floor's control
    /// socket): end-to-end latency, deliveries/s, losses, and the server's CPU, syscalls, RSS.
    Fanout(FanoutArgs),
    /// Only open the connections, hold them, and report the server's memory.
    Idle(IdleArgs),
    /// Every connection starts its handshake at the same instant, with no pacing and no
    /// limit; reports the time from then to each welcome frame, the failures by reason, and
    /// the server's CPU and memory over the storm. Produces no records.
    ConnectStorm(ConnectStormArgs),
    /// No server and no connections: produce at --rate to --topic and consume it with
    /// roomcast's consumer settings in this process; each record's age on arrival (from its
    /// intended send time).
    KafkaPath(KafkaPathArgs),
    /// Connect, restart the server under the clients while producing, then reconnect them
    /// all at once with ?resume=1 and check what each gets.
    ResumeStorm(ResumeStormArgs),
    /// No connections; produce until the replay buffer holds each of --targets-mib and sample
    /// the server's RSS. The server must read a fresh topic and keep everything (big budget
    /// and age).
    ReplayMemory(ReplayMemoryArgs),
    /// No connections; produce --records records (rooms from --dist over --connections) to a
    /// fresh topic as fast as the broker takes them, then start the server and measure how
    /// fast, and at what CPU, it reads them all back. The server's replay window
    /// ([resume] buffer_max_age_seconds) must reach back to the first record.
    RouteBacklog(RouteBacklogArgs),
    /// A bystander receives a record every 50 ms through Kafka and /healthz is probed every
    /// 50 ms while the attacks of --hostile-phases run one after the other; reports the
    /// bystander's worst gap, losses, the probe's worst answer and the server's RSS per
    /// phase. The server's route for --topic must be the bench's (`user:{userId}`,
    /// `task:{taskId}`).
    Hostile(HostileArgs),
    /// Starts --replicas servers sharing a fresh presence topic; N clients, each a user of
    /// --tenant joining one room, connect to the first at the same instant, then all close
    /// at once. Per storm: connects/s, presence records published, the time until every
    /// other replica's /presence shows exactly the first one's table, and the first one's
    /// CPU per client; then the same storms on one server with presence off: the extra CPU.
    PresenceStorm(PresenceStormArgs),
    /// Only create the topic (with --partitions) and exit.
    CreateTopic(CreateTopicArgs),
    /// Markdown tables, one per kind of run, from the JSON lines of a results file.
    Report(crate::report::ReportArgs),
    /// One `idle-replicas` JSON line from the idle lines of clients run side by side (one
    /// per server), with totals and the machine's MemAvailable.
    CombineReplicas(crate::report::CombineArgs),
    /// Free loopback ports, on one line: for a configuration that must name its ports before
    /// the server starts (a restarted server listens where its clients were).
    FreePorts {
        #[arg(default_value_t = 2)]
        count: usize,
    },
}

impl Command {
    /// Where the results go; None for the commands that run no scenario.
    pub fn output(&self) -> Option<&Output> {
        Some(match self {
            Command::Fanout(a) => &a.output,
            Command::Idle(a) => &a.output,
            Command::ConnectStorm(a) => &a.output,
            Command::KafkaPath(a) => &a.output,
            Command::ResumeStorm(a) => &a.output,
            Command::ReplayMemory(a) => &a.output,
            Command::RouteBacklog(a) => &a.output,
            Command::Hostile(a) => &a.output,
            Command::PresenceStorm(a) => &a.output,
            Command::CreateTopic(_)
            | Command::Report(_)
            | Command::CombineReplicas(_)
            | Command::FreePorts { .. } => return None,
        })
    }
}

/// What every scenario shares: its name, where its JSON line goes, its runtime.
#[derive(Args, Debug, Clone)]
pub struct Output {
    /// Free-form name carried into the JSON line.
    #[arg(long, default_value = "")]
    pub label: String,
    /// Also append the JSON line to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Client runtime worker threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

/// How many clients there are and which rooms they are in.
#[derive(Args, Debug, Clone)]
pub struct Rooms {
    /// Connections to open (the room count of the scenarios without connections).
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub connections: usize,
    /// Rooms: shared, groups:N, user, zipf:S[:ROOMS] (ROOMS defaults to connections/10).
    #[arg(long, default_value = "groups:10")]
    pub dist: String,
    /// Seed for zipf room draws.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// The clients' tokens.
#[derive(Args, Debug, Clone)]
pub struct Tokens {
    /// HS256 secret the server verifies tokens with.
    #[arg(long, default_value = "bench-secret-0123456789")]
    pub secret: String,
    #[arg(long, default_value_t = 3600)]
    pub token_ttl: u64,
}

/// How the connections are opened.
#[derive(Args, Debug, Clone)]
pub struct Connecting {
    /// Connections opened per second.
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// Connections per client source address (127.0.0.1, 127.0.0.2, ...).
    #[arg(long, default_value_t = 8000)]
    pub per_source: usize,
    /// First client source address; the next ones count up from it. Client processes that run
    /// at the same time need ranges of their own: an address has only the kernel's ephemeral
    /// ports to bind from (28,232 here), shared by every process.
    #[arg(long, default_value = "127.0.0.1")]
    pub first_source: Ipv4Addr,
    /// Per-connection read buffer (bytes).
    #[arg(long, default_value_t = 4096)]
    pub read_buffer: usize,
}

/// The server under test, already running: where it listens and what to sample.
#[derive(Args, Debug, Clone)]
pub struct Served {
    /// WebSocket URL of the server (loopback only).
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    pub url: String,
    /// Server process to sample (CPU, write syscalls, RSS).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Kafka broker process to sample (CPU only), for context.
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// The server's Prometheus endpoint, e.g. http://127.0.0.1:9090/metrics.
    #[arg(long)]
    pub metrics_url: Option<String>,
    /// roomcast-floor's control address: send records there instead of Kafka.
    #[arg(long)]
    pub floor_control: Option<String>,
    /// The server at --url is roomcast-floor reading the topic from Kafka (its --brokers):
    /// records go to Kafka as for roomcast, and the run is labelled `floor-kafka`.
    #[arg(long)]
    pub floor_kafka: bool,
}

impl Served {
    /// What the run is labelled as having measured.
    pub fn target_kind(&self) -> &'static str {
        match (&self.floor_control, self.floor_kafka) {
            (Some(_), _) => "floor",
            (None, true) => "floor-kafka",
            (None, false) => "roomcast",
        }
    }
}

/// The topic and the producer.
#[derive(Args, Debug, Clone)]
pub struct Kafka {
    /// Kafka bootstrap servers (produce to Kafka).
    #[arg(long)]
    pub brokers: Option<String>,
    #[arg(long, default_value = "bench-tasks")]
    pub topic: String,
    /// Producer linger.ms.
    #[arg(long, default_value_t = 0)]
    pub linger_ms: u32,
    /// More librdkafka properties for the producer, KEY=VALUE (repeatable).
    #[arg(long = "producer-set", value_parser = key_value)]
    pub producer_set: Vec<(String, String)>,
}

impl Kafka {
    /// The producer's librdkafka settings: linger.ms, then every --producer-set.
    pub fn producer(&self) -> Vec<(String, String)> {
        let mut settings = vec![("linger.ms".to_string(), self.linger_ms.to_string())];
        settings.extend(self.producer_set.iter().cloned());
        settings
    }

    /// The brokers, which `scenario` cannot do without.
    pub fn brokers(&self, scenario: &str) -> anyhow::Result<&str> {
        self.brokers
            .as_deref()
            .with_context(|| format!("{scenario} needs --brokers"))
    }
}

/// The open-loop production.
#[derive(Args, Debug, Clone)]
pub struct Production {
    /// Records per second, produced open-loop.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Size of each record's JSON value in bytes.
    #[arg(long, default_value_t = 200)]
    pub payload_bytes: usize,
    /// At most this many seconds to wait for the last deliveries after production ends.
    #[arg(long, default_value_t = 10.0)]
    pub drain: f64,
}

/// The measured window.
#[derive(Args, Debug, Clone)]
pub struct Window {
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Seconds of production before the measured window.
    #[arg(long, default_value_t = 3.0)]
    pub warmup: f64,
}

/// The server the scenario starts (and restarts) itself.
#[derive(Args, Debug, Clone)]
pub struct Managed {
    /// The roomcast binary, run as `BIN serve --config CONFIG`.
    #[arg(long)]
    pub server_bin: PathBuf,
    #[arg(long)]
    pub server_config: PathBuf,
    /// Where the servers' stderr goes (appended).
    #[arg(long, default_value = "roomcast-server.log")]
    pub server_log: PathBuf,
    /// Written with the pid of each server started.
    #[arg(long)]
    pub server_pidfile: Option<PathBuf>,
}

impl Managed {
    pub fn spec(&self) -> server::Spec {
        server::Spec {
            bin: self.server_bin.clone(),
            config: self.server_config.clone(),
            log: self.server_log.clone(),
            pidfile: self.server_pidfile.clone(),
            env: Vec::new(),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub output: Output,
    #[command(flatten)]
    pub rooms: Rooms,
    #[command(flatten)]
    pub tokens: Tokens,
    #[command(flatten)]
    pub connecting: Connecting,
    #[command(flatten)]
    pub served: Served,
    #[command(flatten)]
    pub kafka: Kafka,
    #[command(flatten)]
    pub production: Production,
    #[command(flatten)]
    pub window: Window,
    /// This fraction of the connections (spread evenly: 0.01 is every 100th) stops reading
    /// right after its subscribe `ok` and keeps the socket open: slow consumers. Latency,
    /// deliveries, losses and duplicates are counted over the other connections only.
    #[arg(long, default_value_t = 0.0)]
    pub slow_fraction: f64,
    /// Slow connections write an unsolicited pong every this many seconds (0: never), still
    /// reading nothing. roomcast closes a peer it has not heard from for
    /// websocket.idle_timeout_seconds (60) with 1001, long before a silent one's queue is full.
    #[arg(long, default_value_t = 0.0)]
    pub slow_keepalive: f64,
    /// Also read the topic in this process with roomcast's consumer settings and report each
    /// record's age on arrival there, beside the end-to-end latency.
    #[arg(long)]
    pub kafka_probe: bool,
}

#[derive(Args, Debug, Clone)]
pub struct IdleArgs {
    #[command(flatten)]
    pub output: Output,
    #[command(flatten)]
    pub rooms: Rooms,
    #[command(flatten)]
    pub tokens: Tokens,
    #[command(flatten)]
    pub connecting: Connecting,
    #[command(flatten)]
    pub served: Served,
    /// Seconds to hold idle connections before the second memory sample.
    #[arg(long, default_value_t = 10.0)]
    pub hold: f64,
}

#[derive(Args, Debug, Clone)]
pub struct ConnectStormArgs {
    #[command(flatten)]
    pub output: Output,
    #[command(flatten)]
    pub rooms: Rooms,
    #[command(flatten)]
    pub tokens: Tokens,
    #[command(flatten)]
    pub connecting: Connecting,
    #[command(flatten)]
    pub served: Served,
    /// A handshake not welcomed this many seconds after the start has failed (it is not
    /// retried).
    #[arg(long, default_value_t = 30.0)]
    pub welcome_timeout: f64,
}

#[derive(Args, Debug, Clone)]
pub struct KafkaPathArgs {
    #[command(flatten)]
    pub output: Output,
    #[command(flatten)]
    pub rooms: Rooms,
    #[command(flatten)]
    pub kafka: Kafka,
    #[command(flatten)]
    pub production: Production,
    #[command(flatten)]
    pub window: Window,
    /// Kafka broker process to sample (CPU only), for context.
    #[arg(long)]
    pub broker_pid: Option<u32>,
}

#[derive(Args, Debug, Clone)]
pub struct ResumeStormArgs {
    #[command(flatten)]
    pub output: Output,
    #[command(flatten)]
    pub rooms: Rooms,
    #[command(flatten)]
    pub tokens: Tokens,
    #[command(flatten)]
    pub connecting: Connecting,
    #[command(flatten)]
    pub kafka: Kafka,
    #[command(flatten)]
    pub production: Production,
    #[command(flatten)]
    pub managed: Managed,
    /// Seconds of live production before the SIGTERM.
    #[arg(long, default_value_t = 10.0)]
    pub live_seconds: f64,
    /// Seconds between the old server's exit and the new one's start.
    #[arg(long, default_value_t = 0.0)]
    pub down_seconds: f64,
    /// Production goes on at least this long after the reconnect starts.
    #[arg(long, default_value_t = 5.0)]
    pub after_seconds: f64,
    /// Give up on clients not caught up this many seconds after the reconnect starts.
    #[arg(long, default_value_t = 180.0)]
    pub storm_deadline: f64,
    /// Reconnects in flight at once (0: all at once).
    #[arg(long, default_value_t = 0)]
    pub reconnect_concurrency: usize,
    /// Kafka broker process to sample (CPU only), for context.
    #[arg(long)]
    pub broker_pid: Option<u32>,
}

#[derive(Args, Debug, Clone)]
pub struct ReplayMemoryArgs {
    #[command(flatten)]
    pub output: Output,
    #[command(flatten)]
    pub kafka: Kafka,
    #[command(flatten)]
    pub managed: Managed,
    /// Size of each record's JSON value in bytes.
    #[arg(long, default_value_t = 200)]
    pub payload_bytes: usize,
    /// Buffer sizes (MiB, as the server accounts them) to sample at.
    #[arg(long, default_value = "16,32,64,128")]
    pub targets_mib: String,
}

#[derive(Args, Debug, Clone)]
pub struct RouteBacklogArgs {
    #[command(flatten)]
    pub output: Output,
    #[command(flatten)]
    pub rooms: Rooms,
    #[command(flatten)]
    pub kafka: Kafka,
    #[command(flatten)]
    pub managed: Managed,
    /// Size of each record's JSON value in bytes.
    #[arg(long, default_value_t = 200)]
    pub payload_bytes: usize,
    /// Records to produce.
    #[arg(long, default_value_t = 1_000_000)]
    pub records: u64,
    /// Kafka broker process to sample (CPU only), for context.
    #[arg(long)]
    pub broker_pid: Option<u32>,
}

#[derive(Args, Debug, Clone)]
pub struct HostileArgs {
    #[command(flatten)]
    pub output: Output,
    #[command(flatten)]
    pub tokens: Tokens,
    #[command(flatten)]
    pub kafka: Kafka,
    #[command(flatten)]
    pub managed: Managed,
    /// The attacks, in order: filter, pre-upgrade, rooms, flood, burst.
    #[arg(long, default_value = "filter,pre-upgrade,rooms,flood,burst")]
    pub hostile_phases: String,
    /// Connection counts are the (50 filters, 2,000 silent, 200 slowloris, 300
    /// unfinished heads, 100 x 5,000 rooms, 20 floods, 10,000 x 256 rooms) times this.
    #[arg(long, default_value_t = 1.0)]
    pub hostile_scale: f64,
    /// Seconds each attack lasts (pre-upgrade 5 s more), and of quiet before the first.
    #[arg(long, default_value_t = 8.0)]
    pub phase_seconds: f64,
    /// Seconds after the burst's connections close, and at the end, before RSS is read.
    #[arg(long, default_value_t = 10.0)]
    pub settle_seconds: f64,
    /// A server that neither answers /healthz nor delivers to the bystander this long after
    /// a phase is killed and replaced for the phases left.
    #[arg(long, default_value_t = 20.0)]
    pub recover_seconds: f64,
}

#[derive(Args, Debug, Clone)]
pub struct PresenceStormArgs {
    #[command(flatten)]
    pub output: Output,
    #[command(flatten)]
    pub tokens: Tokens,
    #[command(flatten)]
    pub managed: Managed,
    /// Connections per client source address (127.0.0.1, 127.0.0.2, ...).
    #[arg(long, default_value_t = 8000)]
    pub per_source: usize,
    /// First client source address; the next ones count up from it.
    #[arg(long, default_value = "127.0.0.1")]
    pub first_source: Ipv4Addr,
    /// Per-connection read buffer (bytes).
    #[arg(long, default_value_t = 4096)]
    pub read_buffer: usize,
    /// Clients, all users of one tenant, all connecting to the first replica.
    #[arg(long, short = 'n', default_value_t = 10_000)]
    pub connections: usize,
    /// The room each client subscribes to besides its own user and tenant rooms: shared,
    /// groups:N, user (none), zipf:S[:ROOMS].
    #[arg(long, default_value = "groups:100")]
    pub dist: String,
    /// The tenant claim of every token.
    #[arg(long, default_value = "bench")]
    pub tenant: String,
    /// Servers sharing the presence topic when presence is on (the first takes the clients).
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// The presence topic (default: a fresh `bench-presence-<ms since epoch>`), made by the
    /// servers with the compaction PRESENCE.md gives it.
    #[arg(long)]
    pub presence_topic: Option<String>,
    /// The runs, in order: `on` (presence on, all replicas), `off` (presence off, the first
    /// replica alone).
    #[arg(long, default_value = "on,off")]
    pub modes: String,
    /// Seconds from each storm's start over which the first replica's CPU is counted; the
    /// same in every run, and long enough for the others to agree.
    #[arg(long, default_value_t = 6.0)]
    pub window: f64,
    /// A client not in its room this many seconds after the start has failed.
    #[arg(long, default_value_t = 30.0)]
    pub join_timeout: f64,
    /// Give up on a replica that has not agreed this many seconds after a storm's start.
    #[arg(long, default_value_t = 60.0)]
    pub agree_timeout: f64,
    /// Milliseconds between two reads of a watched replica's records-consumed counter; its
    /// whole table is fetched only when a record came since the last fetch.
    #[arg(long, default_value_t = 50)]
    pub poll_ms: u64,
    /// Kafka broker process to sample (CPU only), for context.
    #[arg(long)]
    pub broker_pid: Option<u32>,
}

#[derive(Args, Debug, Clone)]
pub struct CreateTopicArgs {
    /// Kafka bootstrap servers.
    #[arg(long)]
    pub brokers: String,
    #[arg(long, default_value = "bench-tasks")]
    pub topic: String,
    #[arg(long, default_value_t = 1)]
    pub partitions: i32,
}

/// Parses `KEY=VALUE`.
fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Flattened groups must not give two flags one name: clap would refuse at run time.
    #[test]
    fn every_subcommand_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_presence_storm_takes_no_pacing() {
        let paced = Cli::try_parse_from([
            "roomcast-load",
            "presence-storm",
            "--server-bin",
            "b",
            "--server-config",
            "c",
            "--connect-rate",
            "100",
        ]);
        assert_eq!(
            paced.unwrap_err().kind(),
            clap::error::ErrorKind::UnknownArgument
        );
        let Cli {
            command: Command::PresenceStorm(p),
        } = Cli::try_parse_from([
            "roomcast-load",
            "presence-storm",
            "--server-bin",
            "b",
            "--server-config",
            "c",
        ])
        .unwrap()
        else {
            panic!("not presence-storm");
        };
        assert_eq!((p.connections, p.replicas, p.poll_ms), (10_000, 3, 50));
        assert_eq!(
            (p.dist.as_str(), p.modes.as_str()),
            ("groups:100", "on,off")
        );
    }

    #[test]
    fn a_scenario_refuses_the_flags_of_another() {
        let idle = Cli::try_parse_from(["roomcast-load", "idle", "--rate", "100"]);
        assert_eq!(
            idle.unwrap_err().kind(),
            clap::error::ErrorKind::UnknownArgument
        );
        let managed = Cli::try_parse_from(["roomcast-load", "resume-storm", "--brokers", "b"]);
        assert_eq!(
            managed.unwrap_err().kind(),
            clap::error::ErrorKind::MissingRequiredArgument
        );
        let Cli {
            command: Command::Fanout(f),
        } = Cli::try_parse_from(["roomcast-load", "fanout", "-n", "7", "--floor-control", "x"])
            .unwrap()
        else {
            panic!("not fanout");
        };
        assert_eq!(f.rooms.connections, 7);
        assert_eq!(f.served.target_kind(), "floor");
    }
}
