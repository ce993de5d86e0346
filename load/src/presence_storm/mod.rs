//! The presence storm (docs/PRESENCE.md): N clients, each a user of one tenant, connect at
//! the same instant to the first of several replicas sharing a fresh presence topic, each
//! joining a room; later all of them close at once. Per storm: how fast the clients got in
//! (connects/s), the presence records the first replica published, the time until every
//! other replica's `/presence?tenant=T` shows exactly the table the clients make (empty after
//! the close), and the first replica's CPU over a fixed window from the storm's start. The
//! same storms against one server with presence off give the CPU presence adds per connect
//! and per disconnect.
//!
//! Every server is started here from one config file, the `ROOMCAST_*` environment setting
//! what differs: the name, listeners on port 0, presence on or off, the topic. A replica's
//! first periodic snapshot comes `presence.snapshot_seconds` (30) after its start; with the
//! default window both storms end before it, so the windows hold the storms' cost alone.

mod clients;
mod costs;
mod table;
mod watch;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use serde_json::{json, Value};

use crate::cli::PresenceStormArgs;
use crate::client;
use crate::dist::Dist;
use crate::procstat;
use crate::round;
use crate::server::{Server, Spec};
use crate::storm::quantiles;
use clients::{Outcome, Plan, Signals, Target};
use costs::{add_costs, extra, Sample};
use table::{Reached, TenantTable};
use watch::{Seen, Watch};

/// Time allowed past the clients' own limit for outcomes still on their way.
const SETTLE: Duration = Duration::from_secs(5);
/// How long the replicas have to read the presence topic and see each other.
const PRESENCE_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// What every run of one invocation shares.
struct Setup {
    n: usize,
    dist: Dist,
    topic: String,
    window: Duration,
    runs: Vec<bool>,
}

pub async fn run(args: &PresenceStormArgs) -> anyhow::Result<Value> {
    let setup = setup(args)?;
    let nofile = procstat::raise_nofile();
    if (nofile as usize) < setup.n + 256 {
        bail!(
            "{} connections need more open files than the limit of {nofile}",
            setup.n
        );
    }
    let mut runs = serde_json::Map::new();
    for &presence in &setup.runs {
        let r = one_run(args, &setup, presence).await?;
        runs.insert(mode_name(presence).into(), r);
    }
    let runs = Value::Object(runs);
    let report = json!({
        "tool": "roomcast-load",
        "mode": "presence-storm",
        "label": args.output.label,
        "clients": setup.n,
        "dist": setup.dist.to_string(),
        "tenant": args.tenant,
        "replicas": args.replicas,
        "presence_topic": setup.topic,
        "window_s": setup.window.as_secs_f64(),
        "extra": extra(&runs),
        "runs": runs,
    });
    print(&report);
    Ok(report)
}

fn setup(args: &PresenceStormArgs) -> anyhow::Result<Setup> {
    if args.connections == 0 {
        bail!("presence-storm needs connections (-n)");
    }
    if args.replicas < 2 {
        bail!("--replicas must be at least 2: the first takes the clients, the others agree");
    }
    for (name, v) in [
        ("--window", args.window),
        ("--join-timeout", args.join_timeout),
        ("--agree-timeout", args.agree_timeout),
    ] {
        if !v.is_finite() || v <= 0.0 {
            bail!("{name} must be a number of seconds above 0");
        }
    }
    Ok(Setup {
        n: args.connections,
        dist: Dist::parse(&args.dist).map_err(anyhow::Error::msg)?,
        topic: args.presence_topic.clone().unwrap_or_else(fresh_topic),
        window: Duration::from_secs_f64(args.window),
        runs: parse_modes(&args.modes).map_err(anyhow::Error::msg)?,
    })
}

/// `on,off` as the runs' presence settings, in order; each at most once.
fn parse_modes(text: &str) -> Result<Vec<bool>, String> {
    let mut runs = Vec::new();
    for word in text.split(',').map(str::trim) {
        let presence = match word {
            "on" => true,
            "off" => false,
            _ => return Err(format!("--modes: {word:?} is neither on nor off")),
        };
        if runs.contains(&presence) {
            return Err(format!("--modes: {word} twice"));
        }
        runs.push(presence);
    }
    Ok(runs)
}

fn mode_name(presence: bool) -> &'static str {
    if presence {
        "on"
    } else {
        "off"
    }
}

fn fresh_topic() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("bench-presence-{ms}")
}

/// Starts the servers of one run, storms them, stops them.
async fn one_run(args: &PresenceStormArgs, setup: &Setup, presence: bool) -> anyhow::Result<Value> {
    let count = if presence { args.replicas } else { 1 };
    eprintln!(
        "presence {}: starting {count} server(s){}",
        mode_name(presence),
        if presence {
            format!(" on topic {}", setup.topic)
        } else {
            String::new()
        }
    );
    let servers = start_servers(args, &setup.topic, presence, count).await?;
    if presence {
        presence_ready(&servers).await?;
    }
    let result = storms(args, setup, &servers, presence).await;
    stop_servers(servers).await;
    let mut r = result?;
    r["presence"] = json!(presence);
    r["servers"] = json!(count);
    Ok(r)
}

/// The `ROOMCAST_*` settings of server `i` (from 1) of a run.
fn server_env(i: usize, presence: bool, topic: &str) -> Vec<(String, String)> {
    [
        ("ROOMCAST_SERVER_NAME", format!("bench-presence-{i}")),
        ("ROOMCAST_SERVER_LISTEN", "127.0.0.1:0".into()),
        ("ROOMCAST_SERVER_ADMIN_LISTEN", "127.0.0.1:0".into()),
        ("ROOMCAST_PRESENCE_ENABLED", presence.to_string()),
        ("ROOMCAST_PRESENCE_TOPIC", topic.into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Starts them all at once and waits until each is ready.
async fn start_servers(
    args: &PresenceStormArgs,
    topic: &str,
    presence: bool,
    count: usize,
) -> anyhow::Result<Vec<Server>> {
    let base = args.managed.spec();
    let starting: Vec<_> = (1..=count)
        .map(|i| {
            let spec: Spec = base.replica(i, server_env(i, presence, topic));
            tokio::task::spawn_blocking(move || spec.start())
        })
        .collect();
    let mut servers = Vec::with_capacity(count);
    for s in starting {
        servers.push(s.await??);
    }
    Ok(servers)
}

/// Waits until every replica has read the topic and holds all of them in its table.
async fn presence_ready(servers: &[Server]) -> anyhow::Result<()> {
    let admins: Vec<_> = servers.iter().map(|s| s.admin).collect();
    let count = admins.len();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + PRESENCE_READY_TIMEOUT;
        for admin in admins {
            loop {
                let view: Option<Value> = procstat::get(admin, "/presence")
                    .and_then(|body| serde_json::from_str(&body).ok());
                let seen = view.as_ref().and_then(|v| v["replicas"].as_u64());
                if view.as_ref().is_some_and(|v| v["ready"] == true) && seen == Some(count as u64) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{admin}: presence not ready with {count} replicas (saw {seen:?})");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    })
    .await?
}

/// SIGTERM to all at once, so that their drains overlap.
async fn stop_servers(servers: Vec<Server>) {
    let stopping: Vec<_> = servers
        .into_iter()
        .map(|mut s| tokio::task::spawn_blocking(move || s.terminate()))
        .collect();
    for s in stopping {
        if let Ok(Err(e)) = s.await {
            eprintln!("presence storm: {e}");
        }
    }
}

/// The connect storm, then the close storm, on running servers.
async fn storms(
    args: &PresenceStormArgs,
    setup: &Setup,
    servers: &[Server],
    presence: bool,
) -> anyhow::Result<Value> {
    let mut crowd = Crowd::arm(args, setup, &servers[0]).await?;
    let storm = Storm {
        args,
        servers,
        presence,
        window: setup.window,
    };
    eprintln!(
        "presence {}: {} clients to {} at once",
        mode_name(presence),
        setup.n,
        servers[0].public
    );
    let connect = storm.connect(&mut crowd).await;
    eprintln!("presence {}: every client closes", mode_name(presence));
    let disconnect = storm.close(&mut crowd, connect["connected"].as_u64()).await;
    Ok(json!({ "connect": connect, "disconnect": disconnect }))
}

/// The clients, armed: every socket bound, every task waiting for the start.
struct Crowd {
    target: Arc<Target>,
    signals: Signals,
    done: tokio::sync::mpsc::UnboundedReceiver<(usize, Outcome)>,
    handles: Vec<tokio::task::JoinHandle<()>>,
    /// Each client's user and the room it asks for, in client order.
    users: Vec<(String, Option<String>)>,
}

impl Crowd {
    async fn arm(args: &PresenceStormArgs, setup: &Setup, first: &Server) -> anyhow::Result<Crowd> {
        let rooms = setup.dist.assign(setup.n, 1);
        let plans = (0..setup.n)
            .map(|i| {
                Ok(Plan {
                    index: i,
                    token: crate::tenant_token(
                        &args.tokens.secret,
                        &Dist::user(i),
                        Some(&args.tenant),
                        args.tokens.token_ttl,
                    )?,
                    room: setup.dist.subscribe_room(rooms[i]),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let users = plans
            .iter()
            .map(|p| (Dist::user(p.index), p.room.clone()))
            .collect();
        let per_source = args.per_source.max(1);
        let sources = client::source_addresses(args.first_source, setup.n, per_source)
            .map_err(anyhow::Error::msg)?;
        let target = Arc::new(Target::new(
            format!("ws://{}/ws", first.public),
            first.public,
            args.read_buffer,
            Duration::from_secs_f64(args.join_timeout),
        ));
        let (signals, done, handles) = clients::spawn(plans, &sources, per_source, &target);
        clients::arm(&target, setup.n).await?;
        Ok(Crowd {
            target,
            signals,
            done,
            handles,
            users,
        })
    }

    /// The tenant's table with each client where it got.
    fn table(&self, tenant: &str, reached: impl Fn(usize) -> Reached) -> TenantTable {
        TenantTable::expected(
            tenant,
            self.users
                .iter()
                .enumerate()
                .map(|(i, (u, r))| (u.as_str(), r.as_deref(), reached(i))),
        )
    }
}

/// One run's servers and what its storms share.
struct Storm<'a> {
    args: &'a PresenceStormArgs,
    servers: &'a [Server],
    presence: bool,
    window: Duration,
}

impl Storm<'_> {
    /// Every client connects at once; the window's costs once the others agree with the
    /// clients that got in.
    async fn connect(&self, crowd: &mut Crowd) -> Value {
        let tenant = &self.args.tenant;
        let everyone = crowd.table(tenant, |_| Reached::Joined);
        let before = Sample::take(self.servers, self.args.broker_pid);
        let t0 = Instant::now();
        let expected = Arc::new(RwLock::new(Arc::new(everyone)));
        let watches = self.watch_others(t0, &expected);
        let _ = crowd.signals.start.send(Some(t0));
        let deadline = t0 + crowd.target.limit + SETTLE;
        let outcomes = clients::collect(crowd.users.len(), deadline, &mut crowd.done).await;
        let entered = crowd.table(tenant, |i| {
            outcomes[i].as_ref().map_or(Reached::Nothing, |o| o.reached)
        });
        *expected.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(entered);
        tokio::time::sleep_until((t0 + self.window).into()).await;
        let after = Sample::take(self.servers, self.args.broker_pid);
        let seen = join(watches).await;
        let mut r = entry_report(&outcomes);
        let connected = r["connected"].as_u64();
        add_costs(&mut r, &before, &after, &seen, connected);
        r["agreed_after_all_in_s"] = json!(later(&r["all_agreed_s"], &r["all_joined_s"]));
        r
    }

    /// Every client sends its close at once; the window's costs once the others show nobody.
    async fn close(&self, crowd: &mut Crowd, connected: Option<u64>) -> Value {
        let before = Sample::take(self.servers, self.args.broker_pid);
        let t1 = Instant::now();
        let gone = Arc::new(RwLock::new(Arc::new(TenantTable::default())));
        let watches = self.watch_others(t1, &gone);
        let ended = self.sessions_ended(t1);
        let _ = crowd.signals.close.send(true);
        for h in crowd.handles.drain(..) {
            let _ = h.await;
        }
        let closes_sent = t1.elapsed();
        tokio::time::sleep_until((t1 + self.window).into()).await;
        let after = Sample::take(self.servers, self.args.broker_pid);
        let seen = join(watches).await;
        let ended = tokio::task::spawn_blocking(move || ended.join().ok().flatten())
            .await
            .ok()
            .flatten();
        let mut r = json!({
            "closes_sent_s": round(closes_sent.as_secs_f64(), 3),
            "sessions_ended_s": ended.map(|d| round(d.as_secs_f64(), 3)),
        });
        add_costs(&mut r, &before, &after, &seen, connected);
        r["agreed_after_all_in_s"] = json!(later(&r["all_agreed_s"], &r["sessions_ended_s"]));
        r
    }

    /// The replicas other than the first, watched from `start` until they show `expected`
    /// (none with presence off).
    fn watch_others(
        &self,
        start: Instant,
        expected: &Arc<RwLock<Arc<TenantTable>>>,
    ) -> Vec<std::thread::JoinHandle<Seen>> {
        if !self.presence {
            return Vec::new();
        }
        self.servers[1..]
            .iter()
            .map(|s| {
                watch::spawn(Watch {
                    admin: s.admin,
                    tenant: self.args.tenant.clone(),
                    expected: expected.clone(),
                    start,
                    deadline: start + Duration::from_secs_f64(self.args.agree_timeout),
                    poll: Duration::from_millis(self.args.poll_ms.max(1)),
                    publisher: self.servers[0].admin,
                })
            })
            .collect()
    }

    /// The first server's open connections watched until none is left, in every run alike:
    /// when it has ended the sessions the clients closed.
    fn sessions_ended(&self, start: Instant) -> std::thread::JoinHandle<Option<Duration>> {
        watch::until_metric(
            self.servers[0].admin,
            "roomcast_connections",
            0.0,
            start,
            start + Duration::from_secs_f64(self.args.agree_timeout),
            Duration::from_millis(self.args.poll_ms.max(1)),
        )
    }
}

async fn join(watches: Vec<std::thread::JoinHandle<Seen>>) -> Vec<Seen> {
    tokio::task::spawn_blocking(move || {
        watches
            .into_iter()
            .map(|w| w.join().unwrap_or_default())
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// How far the clients got and how fast.
fn entry_report(outcomes: &[Option<Outcome>]) -> Value {
    let mut joined: Vec<u64> = outcomes
        .iter()
        .flatten()
        .filter_map(|o| o.joined_us)
        .collect();
    let mut welcomed: Vec<u64> = outcomes
        .iter()
        .flatten()
        .filter_map(|o| o.welcomed_us)
        .collect();
    let connected = welcomed.len();
    let last = joined.iter().max().copied();
    json!({
        "clients": outcomes.len(),
        "connected": connected,
        "joined": joined.len(),
        "failures": clients::failures(outcomes),
        "all_joined_s": last.filter(|_| joined.len() == outcomes.len())
            .map(|us| round(us as f64 / 1e6, 3)),
        "connects_per_s": last.map(|us| round(rate(joined.len(), us), 0)),
        "welcomed_us": quantiles(&mut welcomed),
        "joined_us": quantiles(&mut joined),
    })
}

/// How long after `from` (seconds since the start) `at` came, when both did.
fn later(at: &Value, from: &Value) -> Option<f64> {
    Some(round(at.as_f64()? - from.as_f64()?, 3))
}

/// Clients per second, `count` of them in `us` microseconds.
fn rate(count: usize, us: u64) -> f64 {
    count as f64 / (us.max(1) as f64 / 1e6)
}

fn print(r: &Value) {
    eprintln!(
        "== presence storm {} ({} clients)",
        r["label"], r["clients"]
    );
    for (mode, run) in r["runs"].as_object().into_iter().flatten() {
        let (c, d) = (&run["connect"], &run["disconnect"]);
        eprintln!(
            "presence {mode}: {} of {} joined (failures {}), all in {} s, {} connects/s; \
             closes sent in {} s, every session ended after {} s",
            c["joined"],
            c["clients"],
            c["failures"],
            c["all_joined_s"],
            c["connects_per_s"],
            d["closes_sent_s"],
            d["sessions_ended_s"]
        );
        for (storm, p) in [("connect", c), ("disconnect", d)] {
            let agreed: Vec<String> = p["others"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|o| o["agreed_s"].to_string())
                .collect();
            eprintln!(
                "  {storm}: {} records published ({} by agreement), others agreed after [{}] s \
                 ({} s after the last client was in, or the first server had ended every session); \
                 first server {} CPU s, {} µs per client; other work on the machine {} cores; \
                 kernel {}",
                p["records_published"],
                p["records_published_by_agreement"],
                agreed.join(", "),
                p["agreed_after_all_in_s"],
                p["first_server"]["cpu_s"],
                p["first_server"]["cpu_per_client_us"],
                p["other_work_cores"],
                p["kernel_tcp"],
            );
        }
    }
    eprintln!("presence adds {}", r["extra"]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_on_and_off_each_once() {
        assert_eq!(parse_modes("on,off"), Ok(vec![true, false]));
        assert_eq!(parse_modes("off, on"), Ok(vec![false, true]));
        assert_eq!(parse_modes("on"), Ok(vec![true]));
        assert!(parse_modes("on,on").is_err());
        assert!(parse_modes("maybe").is_err());
    }

    #[test]
    fn rates_and_delays() {
        assert_eq!(rate(10_000, 2_000_000), 5000.0);
        assert_eq!(later(&json!(2.5), &json!(1.75)), Some(0.75));
        assert_eq!(later(&Value::Null, &json!(1.75)), None);
    }

    #[test]
    fn each_server_gets_its_name_listeners_and_presence() {
        use std::collections::HashMap;

        let env: HashMap<String, String> = server_env(2, true, "bench-presence-1")
            .into_iter()
            .collect();
        assert_eq!(env["ROOMCAST_SERVER_NAME"], "bench-presence-2");
        assert_eq!(env["ROOMCAST_SERVER_LISTEN"], "127.0.0.1:0");
        assert_eq!(env["ROOMCAST_SERVER_ADMIN_LISTEN"], "127.0.0.1:0");
        assert_eq!(env["ROOMCAST_PRESENCE_ENABLED"], "true");
        assert_eq!(env["ROOMCAST_PRESENCE_TOPIC"], "bench-presence-1");
        assert_eq!(server_env(1, false, "t")[3].1, "false");
    }
}
