//! Hostile clients against one server, watched by a bystander: a connection of its own user in
//! a room no attacker joins, which receives a record every 50 ms through Kafka for the whole
//! run, and a `/healthz` probe every 50 ms. The attacks run one after the other, each for a
//! bounded time: backtracking event filters (`filter`), connections that never finish their
//! request head (`pre-upgrade`), thousands of rooms in one subscribe (`rooms`), a flood of
//! pings (`flood`), and a burst of connections with 256 rooms each, closed again (`burst`).
//!
//! Per phase: the bystander's worst gap between records, records lost and worst latency, the
//! probe's worst answer, the server's RSS and the counters it moved; at the end, after a
//! settle time, RSS against the start. A server that answers neither the probe nor the
//! bystander `--recover-seconds` after a phase is killed (it may not handle SIGTERM either)
//! and a new one started for the phases left; the report says so.

mod attack;
mod feed;
mod observe;
mod tally;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::cli::HostileArgs;
use crate::client::now_us;
use crate::procstat::{self, status_kib};
use crate::round;
use crate::server::{Server, Spec};
use attack::Reach;
use observe::{Targets, Witnesses};
use tally::Window;

/// Records per second for the filter attackers' rooms while that attack runs.
const ATTACK_RATE: f64 = 20.0;
/// Handshakes in flight at once in the burst.
const BURST_IN_FLIGHT: usize = 200;
/// Connections of one pre-upgrade attack per source address: under the default
/// `server.max_handshakes_per_address` (256), as a careful attacker would stay.
const PER_SOURCE: usize = 250;
const FIRST_RECORD_TIMEOUT: Duration = Duration::from_secs(30);
/// The pre-upgrade phase lasts this much longer than the others, to see connections closed by
/// the handshake deadline (10 s by default).
const PRE_UPGRADE_EXTRA: Duration = Duration::from_secs(5);

/// The attacks, by the item numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Filter,
    PreUpgrade,
    Rooms,
    Flood,
    Burst,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Filter => "filter",
            Phase::PreUpgrade => "pre-upgrade",
            Phase::Rooms => "rooms",
            Phase::Flood => "flood",
            Phase::Burst => "burst",
        }
    }
}

pub fn parse_phases(text: &str) -> anyhow::Result<Vec<Phase>> {
    let all = [
        Phase::Filter,
        Phase::PreUpgrade,
        Phase::Rooms,
        Phase::Flood,
        Phase::Burst,
    ];
    text.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            all.into_iter()
                .find(|p| p.name() == t)
                .with_context(|| format!("unknown phase {t:?} in --hostile-phases"))
        })
        .collect()
}

/// How many connections each attack opens: the figures times `--hostile-scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Scale {
    pub filter: usize,
    pub silent: usize,
    pub slowloris: usize,
    pub heads: usize,
    pub head_bytes: usize,
    pub room_conns: usize,
    pub rooms_per_subscribe: usize,
    pub flood: usize,
    pub burst: usize,
    pub burst_rooms: usize,
}

impl Scale {
    pub fn new(factor: f64) -> anyhow::Result<Scale> {
        if !(factor > 0.0 && factor <= 1.0) {
            bail!("--hostile-scale must be above 0 and at most 1");
        }
        let n = |full: usize| ((full as f64 * factor).round() as usize).max(1);
        Ok(Scale {
            filter: n(50),
            silent: n(2000),
            slowloris: n(200),
            heads: n(300),
            head_bytes: 349 * 1024,
            room_conns: n(100),
            rooms_per_subscribe: 5000,
            flood: n(20),
            burst: n(10_000),
            burst_rooms: 256,
        })
    }
}

/// The run's state: the server (replaced if it has to be killed), where the witnesses look
/// for it, and what each phase left.
struct Run<'a> {
    args: &'a HostileArgs,
    spec: Spec,
    server: Server,
    targets: watch::Sender<Targets>,
    windows: Vec<Window>,
    phases: Vec<Value>,
    restarts: Vec<Value>,
    /// RSS of the server alive now, taken when it was quiet with the bystander connected.
    rss_baseline_kib: Option<u64>,
    /// What that RSS was made of (see [`Run::memory`]).
    memory_baseline: Value,
}

pub async fn run(args: &HostileArgs, spec: Spec) -> anyhow::Result<Value> {
    let brokers = args.kafka.brokers("hostile")?;
    let phases = parse_phases(&args.hostile_phases)?;
    let scale = Scale::new(args.hostile_scale)?;
    let nofile = procstat::raise_nofile();
    if (nofile as usize) < scale.burst + scale.silent + 1000 {
        bail!("the hostile run needs more open files than the limit of {nofile}");
    }
    let server = start(&spec).await?;
    let (targets, seen) = watch::channel(targets_of(&server));
    let attackers = (0..scale.filter).map(attack::filter_user).collect();
    let feed = feed::Feed::start(
        brokers,
        &args.kafka.topic,
        &args.kafka.producer(),
        attackers,
        ATTACK_RATE,
    )?;
    let token = crate::token(&args.tokens.secret, "bystander", args.tokens.token_ttl)?;
    let witnesses = Witnesses::start(seen, token)?;
    let started = Instant::now();
    let mut run = Run {
        args,
        spec,
        server,
        targets,
        windows: Vec::new(),
        phases: Vec::new(),
        restarts: Vec::new(),
        rss_baseline_kib: None,
        memory_baseline: Value::Null,
    };
    first_record(&witnesses, now_us()).await?;
    let quiet_start = now_us();
    tokio::time::sleep(Duration::from_secs_f64(args.phase_seconds)).await;
    run.rss_baseline_kib = run.rss();
    run.memory_baseline = run.memory();
    let rss_start_kib = run.rss_baseline_kib;
    run.window("quiet", quiet_start);
    for phase in phases {
        run.phase(phase, &scale, &feed, &witnesses).await?;
    }
    let end_start = now_us();
    tokio::time::sleep(Duration::from_secs_f64(args.settle_seconds)).await;
    let rss_end_kib = run.rss();
    let memory_end = run.memory();
    run.window("end", end_start);
    let produced = feed.finish()?;
    // The last records' way through Kafka.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reconnects = witnesses.live.reconnects.load(Ordering::Relaxed);
    let first_error = witnesses
        .live
        .first_error
        .lock()
        .ok()
        .and_then(|e| e.clone());
    let log = witnesses.finish();
    let mut server = run.server;
    let stop = tokio::task::spawn_blocking(move || server.terminate()).await?;
    let report = report(Finished {
        args,
        scale: &scale,
        windows: &run.windows,
        phases: run.phases,
        restarts: run.restarts,
        produced: &produced,
        log: &log,
        rss: (rss_start_kib, run.rss_baseline_kib, rss_end_kib),
        memory: (run.memory_baseline, memory_end),
        reconnects,
        first_error,
        seconds: started.elapsed().as_secs_f64(),
        stop_s: stop.ok().map(|d| round(d.as_secs_f64(), 2)),
    });
    print_hostile(&report);
    Ok(report)
}

async fn start(spec: &Spec) -> anyhow::Result<Server> {
    let spec = spec.clone();
    let server = tokio::task::spawn_blocking(move || spec.start()).await??;
    eprintln!(
        "roomcast pid {} at {} (admin {}), ready after {:.2} s",
        server.pid,
        server.public,
        server.admin,
        server.ready_after.as_secs_f64()
    );
    Ok(server)
}

fn targets_of(server: &Server) -> Targets {
    Targets {
        public: server.public,
        admin: server.admin,
    }
}

/// Waits until the bystander has received a record after `since_us`.
async fn first_record(witnesses: &Witnesses, since_us: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + FIRST_RECORD_TIMEOUT;
    while witnesses.live.last_arrival_us.load(Ordering::Relaxed) <= since_us {
        if Instant::now() > deadline {
            let e = witnesses
                .live
                .first_error
                .lock()
                .ok()
                .and_then(|e| e.clone());
            bail!("the bystander received nothing within {FIRST_RECORD_TIMEOUT:?} ({e:?})");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

impl Run<'_> {
    /// None once the process has exited.
    fn rss(&self) -> Option<u64> {
        status_kib(self.server.pid, "VmRSS:")
    }

    fn window(&mut self, name: &str, start_us: u64) {
        self.windows.push(Window {
            name: name.into(),
            start_us,
            end_us: now_us(),
        });
    }

    fn reach(&self) -> Reach {
        Reach {
            public: self.server.public,
            secret: self.args.tokens.secret.clone(),
            ttl: self.args.tokens.token_ttl,
        }
    }

    /// RSS split into anonymous memory and mapped files (code), and the replay buffer's own
    /// count of the bytes it holds: a server keeps the recent records for every resume, so
    /// its RSS grows over a run by design, attacks or not.
    fn memory(&self) -> Value {
        let m = self.scrape();
        json!({
            "anon_kib": status_kib(self.server.pid, "RssAnon:"),
            "file_kib": status_kib(self.server.pid, "RssFile:"),
            "replay_buffer_bytes": m.as_ref().and_then(|m| m.get("roomcast_replay_buffer_bytes").copied()),
            "replay_buffer_records": m.as_ref().and_then(|m| m.get("roomcast_replay_buffer_records").copied()),
        })
    }

    /// RSS, peak RSS and the room and connection gauges now.
    fn sample(&self) -> Value {
        let url = self.server.metrics_url();
        let m = tokio::task::block_in_place(|| procstat::scrape(&url));
        let gauge = |k: &str| m.as_ref().and_then(|m| m.get(k).copied());
        json!({
            "rss_kib": self.rss(),
            "rss_peak_kib": status_kib(self.server.pid, "VmHWM:"),
            "rooms": gauge("roomcast_rooms"),
            "connections": gauge("roomcast_connections"),
        })
    }

    fn scrape(&self) -> Option<std::collections::HashMap<String, f64>> {
        let url = self.server.metrics_url();
        tokio::task::block_in_place(|| procstat::scrape(&url))
    }

    async fn phase(
        &mut self,
        phase: Phase,
        scale: &Scale,
        feed: &feed::Feed,
        witnesses: &Witnesses,
    ) -> anyhow::Result<()> {
        let name = phase.name();
        eprintln!("phase {name}");
        let start_us = now_us();
        let before = self.scrape();
        let attack = self.attack(phase, scale, feed).await;
        let rss_after_attack_kib = self.rss();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let restart = self.recover(name, witnesses).await?;
        let after = self.scrape();
        let counters = match (&before, &after, &restart) {
            (Some(a), Some(b), None) => json!(tally::moved_counters(a, b)),
            _ => Value::Null,
        };
        self.phases.push(json!({
            "name": name,
            "attack": attack,
            "rss_after_attack_kib": rss_after_attack_kib,
            "rss_after_close_kib": self.rss(),
            "counters": counters,
            "server_replaced": restart.is_some(),
        }));
        self.window(name, start_us);
        Ok(())
    }

    async fn attack(&self, phase: Phase, s: &Scale, feed: &feed::Feed) -> Value {
        let hold = Duration::from_secs_f64(self.args.phase_seconds);
        let reach = self.reach();
        match phase {
            Phase::Filter => attack::filters(&reach, s.filter, hold, &feed.switches).await,
            Phase::PreUpgrade => {
                let (n, slow, heads) = (s.silent, s.slowloris, s.heads);
                let hold = hold + PRE_UPGRADE_EXTRA;
                attack::pre_upgrade(&reach, n, slow, heads, s.head_bytes, PER_SOURCE, hold).await
            }
            Phase::Rooms => {
                let started = Instant::now();
                let mut held = attack::rooms(&reach, s.room_conns, s.rooms_per_subscribe).await;
                tokio::time::sleep(hold.saturating_sub(started.elapsed())).await;
                held.report["held"] = self.sample();
                drop(held.conns);
                held.report
            }
            Phase::Flood => attack::flood(&reach, s.flood, hold).await,
            Phase::Burst => self.burst(&reach, s).await,
        }
    }

    /// RSS before, at the peak (all open) and a settle time after all closed.
    async fn burst(&self, reach: &Reach, s: &Scale) -> Value {
        let before = self.sample();
        let mut held = attack::burst(reach, s.burst, s.burst_rooms, BURST_IN_FLIGHT).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let peak = self.sample();
        drop(held.conns);
        tokio::time::sleep(Duration::from_secs_f64(self.args.settle_seconds)).await;
        let after = self.sample();
        held.report["before"] = before;
        held.report["peak"] = peak;
        held.report["after_settle"] = after;
        held.report["settle_s"] = json!(self.args.settle_seconds);
        held.report
    }

    /// Waits until the server answers the probe and delivers to the bystander again; kills
    /// and replaces it if it does not within `--recover-seconds`. Some(what happened) then.
    async fn recover(
        &mut self,
        after: &str,
        witnesses: &Witnesses,
    ) -> anyhow::Result<Option<Value>> {
        let stalled = Instant::now();
        let limit = Duration::from_secs_f64(self.args.recover_seconds);
        let mut exited = None;
        while stalled.elapsed() < limit {
            if let Err(e) = self.server.check_running() {
                exited = Some(e.to_string());
                break;
            }
            if self.healthy(witnesses) {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let old = self.server.pid;
        match &exited {
            Some(e) => eprintln!("after {after}, {e}: starting another"),
            None => {
                eprintln!(
                    "the server has not recovered {limit:?} after {after}: killing pid {old}"
                );
                tokio::task::block_in_place(|| self.server.kill());
            }
        }
        self.server = start(&self.spec).await?;
        let _ = self.targets.send(targets_of(&self.server));
        first_record(witnesses, now_us()).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.rss_baseline_kib = self.rss();
        self.memory_baseline = self.memory();
        let restart = json!({
            "after_phase": after,
            "waited_s": round(stalled.elapsed().as_secs_f64(), 1),
            "old_pid": old,
            "exited_by_itself": exited,
            "new_pid": self.server.pid,
            "new_rss_baseline_kib": self.rss_baseline_kib,
        });
        self.restarts.push(restart.clone());
        Ok(Some(restart))
    }

    fn healthy(&self, witnesses: &Witnesses) -> bool {
        let last = witnesses.live.last_arrival_us.load(Ordering::Relaxed);
        let fresh = now_us().saturating_sub(last) < 2 * feed::EVERY.as_micros() as u64 + 400_000;
        let admin = self.server.admin;
        fresh
            && tokio::task::block_in_place(|| crate::server::http_status(admin, "/healthz"))
                == Some(200)
    }
}

struct Finished<'a> {
    args: &'a HostileArgs,
    scale: &'a Scale,
    windows: &'a [Window],
    phases: Vec<Value>,
    restarts: Vec<Value>,
    produced: &'a feed::Outcome,
    log: &'a observe::Log,
    /// RSS at the start, of the server alive at the end when it was quiet, and at the end.
    rss: (Option<u64>, Option<u64>, Option<u64>),
    /// What the baseline and the end RSS were made of.
    memory: (Value, Value),
    reconnects: u64,
    first_error: Option<String>,
    seconds: f64,
    stop_s: Option<f64>,
}

fn report(f: Finished<'_>) -> Value {
    let mut at: Vec<u64> = f.log.arrivals.iter().map(|a| a.at_us).collect();
    at.sort_unstable();
    let mut attacks = f.phases.into_iter();
    let windows: Vec<Value> = f
        .windows
        .iter()
        .map(|w| {
            let mut v = json!({
                "name": w.name,
                "seconds": round((w.end_us - w.start_us) as f64 / 1e6, 2),
                "bystander": tally::bystander(&f.produced.sent, &f.log.arrivals, &at, w),
                "healthz": tally::healthz(&f.log.probes, w),
            });
            if w.name != "quiet" && w.name != "end" {
                if let (Some(obj), Some(Value::Object(p))) = (v.as_object_mut(), attacks.next()) {
                    obj.extend(p.into_iter().filter(|(k, _)| k != "name"));
                }
            }
            v
        })
        .collect();
    let worst = |key: &str, field: &str| {
        windows
            .iter()
            .filter_map(|w| w[key][field].as_f64())
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
    };
    let lost: u64 = windows
        .iter()
        .filter_map(|w| w["bystander"]["lost"].as_u64())
        .sum();
    let (start, baseline, end) = f.rss;
    let ratio = match (baseline, end) {
        (Some(b), Some(e)) if b > 0 => Some(round(e as f64 / b as f64, 3)),
        _ => None,
    };
    let healthz_failed: u64 = windows
        .iter()
        .filter_map(|w| w["healthz"]["failed"].as_u64())
        .sum();
    json!({
        "tool": "roomcast-load",
        "mode": "hostile",
        "label": f.args.output.label,
        "target": "roomcast",
        "scale": f.args.hostile_scale,
        "counts": f.scale,
        "phase_seconds": f.args.phase_seconds,
        "settle_seconds": f.args.settle_seconds,
        "seconds": round(f.seconds, 1),
        "windows": windows,
        "bystander": {
            "records_produced": f.produced.sent.len(),
            "records_refused_by_producer": f.produced.refused,
            "records_failed_in_kafka": f.produced.failed,
            "received": f.log.arrivals.len(),
            "reconnects": f.reconnects,
            "first_error": f.first_error,
        },
        "attack_records": f.produced.attack_records,
        "probes": f.log.probes.len(),
        "server_restarts": f.restarts,
        "server_stop_s": f.stop_s,
        "rss": {
            "start_kib": start,
            "baseline_kib": baseline,
            "end_kib": end,
            "end_over_baseline": ratio,
            "baseline": f.memory.0,
            "end": f.memory.1,
        },
        "verdict": {
            "worst_gap_ms": worst("bystander", "worst_gap_ms"),
            "worst_healthz_ms": worst("healthz", "worst_ms"),
            "records_lost": lost,
            "gap_under_100ms": worst("bystander", "worst_gap_ms").is_some_and(|g| g < 100.0),
            "healthz_failed": healthz_failed,
            "healthz_under_100ms": healthz_failed == 0
                && worst("healthz", "worst_ms").is_some_and(|g| g < 100.0),
            "rss_within_10pct": ratio.is_some_and(|r| (r - 1.0).abs() <= 0.10),
            "server_replaced": !f.restarts.is_empty(),
        },
    })
}

fn print_hostile(r: &Value) {
    let mib = |v: &Value| {
        v.as_f64()
            .map(|k| format!("{:.0} MB", k / 1024.0))
            .unwrap_or("-".into())
    };
    eprintln!("== hostile clients {} (scale {})", r["label"], r["scale"]);
    eprintln!(
        "{:<12} {:>8} {:>14} {:>6} {:>14} {:>10}",
        "phase", "seconds", "worst gap ms", "lost", "healthz ms", "RSS"
    );
    for w in r["windows"].as_array().into_iter().flatten() {
        let rss = if w.get("rss_after_close_kib").is_none() {
            "".to_string()
        } else {
            mib(&w["rss_after_close_kib"])
        };
        eprintln!(
            "{:<12} {:>8} {:>14} {:>6} {:>14} {:>10}{}",
            w["name"].as_str().unwrap_or("?"),
            w["seconds"],
            w["bystander"]["worst_gap_ms"],
            w["bystander"]["lost"],
            w["healthz"]["worst_ms"],
            rss,
            if w["server_replaced"] == true {
                "  (server died or froze: replaced)"
            } else {
                ""
            }
        );
    }
    let rss = &r["rss"];
    eprintln!(
        "RSS: {} at the start, {} at the end after {} s: end/start {}",
        mib(&rss["baseline_kib"]),
        mib(&rss["end_kib"]),
        r["settle_seconds"],
        rss["end_over_baseline"]
    );
    let part = |key: &str, scale: f64| {
        let at = |when: &str| {
            rss[when][key]
                .as_f64()
                .map_or("-".into(), |v| format!("{:.1}", v / scale))
        };
        format!("{} -> {}", at("baseline"), at("end"))
    };
    eprintln!(
        "     anonymous {} MiB, files {} MiB; replay buffer {} MiB ({} records)",
        part("anon_kib", 1024.0),
        part("file_kib", 1024.0),
        part("replay_buffer_bytes", 1048576.0),
        part("replay_buffer_records", 1.0),
    );
    eprintln!("verdict: {}", r["verdict"]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_named_and_ordered_as_given() {
        assert_eq!(
            parse_phases("burst, filter").unwrap(),
            vec![Phase::Burst, Phase::Filter]
        );
        assert!(parse_phases("filter,nope").is_err());
        assert!(parse_phases("").unwrap().is_empty());
    }

    #[test]
    fn scale_keeps_at_least_one_of_each() {
        let full = Scale::new(1.0).unwrap();
        assert_eq!((full.silent, full.burst, full.filter), (2000, 10_000, 50));
        let tiny = Scale::new(0.001).unwrap();
        assert_eq!((tiny.filter, tiny.flood, tiny.burst), (1, 1, 10));
        assert_eq!(tiny.rooms_per_subscribe, 5000);
        assert!(Scale::new(0.0).is_err());
        assert!(Scale::new(2.0).is_err());
    }
}
