//! What the storm's clients saw, checked against what each should have got, and the run's
//! JSON line and summary.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use super::run::{Connected, Edge, Finish, Layout, Live, Restart, Storm};
use super::{delta, gauge, quantiles, Board, Outcome};
use crate::cli::ResumeStormArgs;
use crate::procstat::{self, ProcSample};
use crate::producer::Counters;
use crate::round;

/// Which records each room should have: record `seq` is for room `seq % rooms`, every `seq`
/// below `total` was produced, less those Kafka refused (`lost`).
pub(super) struct Expected {
    total: u64,
    lost: Vec<u64>,
    rooms: usize,
}

impl Expected {
    pub fn new(counters: &Counters, rooms: usize) -> Expected {
        Expected {
            total: counters.attempted.load(Ordering::Acquire),
            lost: counters.lost(),
            rooms,
        }
    }

    /// Records for `room` below `total`, lost ones included.
    fn produced_for(&self, room: usize) -> u64 {
        let r = room as u64;
        if self.total > r {
            (self.total - r).div_ceil(self.rooms as u64)
        } else {
            0
        }
    }

    /// The indexes (`seq / rooms`) of `room`'s records that never reached Kafka.
    fn lost_in(&self, room: usize) -> Vec<u64> {
        let (r, rooms) = (room as u64, self.rooms as u64);
        self.lost
            .iter()
            .filter(|s| **s % rooms == r)
            .map(|s| s / rooms)
            .collect()
    }

    pub fn for_room(&self, room: usize) -> u64 {
        self.produced_for(room) - self.lost_in(room).len() as u64
    }

    /// Deliveries due if every client of `assignment` has all of its room's records.
    pub fn if_all(&self, assignment: &[usize]) -> u64 {
        let mut members = vec![0u64; self.rooms];
        for r in assignment {
            members[*r] += 1;
        }
        (0..self.rooms).map(|r| self.for_room(r) * members[r]).sum()
    }

    /// How many of `room`'s expected records the client's bitmap holds.
    fn got(&self, o: &Outcome) -> u64 {
        let lost_here = self.lost_in(o.room);
        (0..self.produced_for(o.room))
            .filter(|k| {
                let set = o
                    .bits
                    .get((k / 64) as usize)
                    .is_some_and(|w| w & (1 << (k % 64)) != 0);
                set && !lost_here.contains(k)
            })
            .count() as u64
    }
}

/// Everything the report is made from.
pub(super) struct Parts<'a> {
    pub args: &'a ResumeStormArgs,
    pub layout: &'a Layout,
    pub connected: &'a Connected,
    pub live: &'a Live,
    pub restart: &'a Restart,
    pub storm: &'a Storm,
    pub finish: &'a Finish,
    pub counters: &'a Counters,
    pub board: &'a Board,
}

/// The clients that had a first connection, summed up.
#[derive(Default)]
struct Tally {
    clients: usize,
    expected: u64,
    have: u64,
    missing: u64,
    dups: u64,
    misrouted: u64,
    ooo: u64,
    back: u64,
    resyncs: u64,
    incomplete: usize,
    /// The `replayed` count of an `ok` against the events that came before it.
    replayed_mismatch: usize,
    sources_seen: BTreeMap<String, u64>,
    first_close: BTreeMap<String, u64>,
    second_close: BTreeMap<String, u64>,
    welcome: Vec<u64>,
    ok: Vec<u64>,
    caught: Vec<u64>,
    to_ok: Vec<u64>,
    replayed: Vec<u64>,
    gaps: Vec<u64>,
    replay_events: Vec<u64>,
    attempts: u64,
    retried: usize,
    reconnects: usize,
    last_error: Option<String>,
}

impl Tally {
    fn of(outs: &[Outcome], expected: &Expected) -> Tally {
        let mut t = Tally::default();
        for o in outs.iter().filter(|o| o.first_connected) {
            t.clients += 1;
            t.delivery(o, expected);
            t.timing(o);
        }
        t
    }

    fn delivery(&mut self, o: &Outcome, expected: &Expected) {
        let want = expected.for_room(o.room);
        let got = expected.got(o);
        self.expected += want;
        self.have += got;
        self.missing += want - got.min(want);
        if got < want {
            self.incomplete += 1;
        }
        self.dups += o.duplicates;
        self.misrouted += o.misrouted;
        self.ooo += o.out_of_order;
        self.back += o.positions_backwards;
        self.resyncs += o.resyncs;
        if o.replayed.is_some_and(|r| r != o.replay_events) {
            self.replayed_mismatch += 1;
        }
        *self
            .sources_seen
            .entry(o.source.clone().unwrap_or_else(|| "no ok".into()))
            .or_default() += 1;
        *self
            .first_close
            .entry(o.first_close.map_or("open".into(), |c| c.to_string()))
            .or_default() += 1;
        if let Some(c) = o.second_close {
            *self.second_close.entry(c.to_string()).or_default() += 1;
        }
    }

    fn timing(&mut self, o: &Outcome) {
        self.welcome.extend(o.welcome_us);
        self.ok.extend(o.ok_us);
        self.caught.extend(o.caught_us);
        self.to_ok.extend(o.resume_to_ok_us);
        self.replayed.extend(o.replayed);
        self.replay_events.push(o.replay_events);
        self.gaps.extend(o.gap_offsets.map(|g| g.max(0) as u64));
        self.attempts += o.attempts as u64;
        if o.attempts > 1 {
            self.retried += 1;
        }
        if o.connections > 1 {
            self.reconnects += 1;
        }
        if o.last_error.is_some() {
            self.last_error = o.last_error.clone();
        }
    }
}

fn cpu(a: Option<ProcSample>, b: Option<ProcSample>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(b.cpu_s - a.cpu_s),
        _ => None,
    }
}

pub(super) fn build(p: &Parts<'_>) -> Value {
    let mut t = Tally::of(&p.finish.outs, &p.finish.expected);
    let (args, layout, c) = (p.args, p.layout, p.connected);
    json!({
        "tool": "roomcast-load",
        "mode": "resume-storm",
        "label": args.output.label,
        "target": "roomcast",
        "dist": layout.dist.to_string(),
        "rooms": layout.rooms,
        "rate": args.production.rate,
        "payload_bytes": args.production.payload_bytes,
        "connections": {
            "requested": layout.n,
            "open": c.open,
            "failed": c.failed + (layout.n - c.open - c.failed),
            "first_error": c.first_error,
            "connect_seconds": round(c.seconds, 2),
        },
        "restart": restart_report(p, &t),
        "storm": storm_report(p, &mut t),
        "replay": {
            "replayed_per_client": quantiles(&mut t.replayed),
            "events_before_ok_per_client": quantiles(&mut t.replay_events),
            "gap_offsets_per_client": quantiles(&mut t.gaps),
            "sources_by_ok": t.sources_seen,
            "resync_frames": t.resyncs,
        },
        "server_metrics": server_metrics(p),
        "server": server_report(p),
        "client": {
            "storm_cpu_cores": per_storm_s(p, cpu(p.storm.start.client, p.storm.end.client)),
            "rss_end_kib": p.storm.end.client.map(|s| s.rss_kib),
        },
        "broker": { "storm_cpu_cores": per_storm_s(p, cpu(p.storm.start.broker, p.storm.end.broker)) },
        "machine": machine(p.storm),
        "records": records_report(p),
        "verification": {
            "expected": t.expected,
            "received": t.have,
            "lost": t.missing,
            "duplicates": t.dups,
            "out_of_order": t.ooo,
            "misrouted": t.misrouted,
            "positions_backwards": t.back,
            "clients_incomplete": t.incomplete,
            "replayed_count_mismatch": t.replayed_mismatch,
        },
        "other_frames": p.board.other_frames.load(Ordering::Relaxed),
    })
}

fn per_storm_s(p: &Parts<'_>, cpu: Option<f64>) -> Option<f64> {
    cpu.map(|c| round(c / p.storm.wall.as_secs_f64().max(1e-9), 3))
}

fn restart_report(p: &Parts<'_>, t: &Tally) -> Value {
    let r = p.restart;
    json!({
        "live_seconds": round(p.live.wall, 2),
        "sigterm_to_exit_s": round(r.exit_took.as_secs_f64(), 3),
        "pause_s": p.args.down_seconds,
        "start_to_listening_s": round(r.listening, 3),
        "start_to_ready_s": round(r.ready, 3),
        "records_at_sigterm": r.s_term,
        "records_at_new_start": r.s_start,
        "records_at_reconnect": p.storm.s0,
        "first_connection_close_codes": t.first_close,
    })
}

fn storm_report(p: &Parts<'_>, t: &mut Tally) -> Value {
    let s = p.storm;
    json!({
        "all_caught_up_s": s.all_caught.map(|d| round(d.as_secs_f64(), 3)),
        "wall_s": round(s.wall.as_secs_f64(), 3),
        "clients": t.clients,
        "caught_up": t.caught.len(),
        "welcome_us": quantiles(&mut t.welcome),
        "ok_us": quantiles(&mut t.ok),
        "caught_up_us": quantiles(&mut t.caught),
        "resume_to_ok_us": quantiles(&mut t.to_ok),
        "handshake_attempts": t.attempts,
        "clients_that_retried": t.retried,
        "clients_resumed_more_than_once": t.reconnects,
        "last_error": t.last_error,
        "second_connection_close_codes": t.second_close,
        "kernel_tcp": match (&s.start.net, &s.end.net) {
            (Some(a), Some(b)) => json!(b
                .iter()
                .map(|(k, v)| (k.clone(), v.saturating_sub(a.get(k).copied().unwrap_or(0))))
                .collect::<BTreeMap<_, _>>()),
            _ => Value::Null,
        },
    })
}

fn server_metrics(p: &Parts<'_>) -> Value {
    let (m0, m1, m2) = (
        &p.storm.start.metrics,
        &p.storm.end.metrics,
        &p.finish.metrics,
    );
    let by_source = |name: &str| -> Value {
        let mut o = serde_json::Map::new();
        for s in ["memory", "kafka", "nothing", "resync"] {
            if let Some(v) = delta(m0, m1, &format!("{name}{{source=\"{s}\"}}")) {
                o.insert(s.into(), json!(v));
            }
        }
        Value::Object(o)
    };
    json!({
        "resumes_by_source": by_source("roomcast_resumes_total"),
        "replayed_records_by_source": by_source("roomcast_replayed_records_total"),
        "replay_buffer_bytes": gauge(m1, "roomcast_replay_buffer_bytes"),
        "replay_buffer_records": gauge(m1, "roomcast_replay_buffer_records"),
        "slow_consumer_closes": delta(m0, m2, "roomcast_slow_consumer_closes_total"),
        "handshake_failures": delta(m0, m2, "roomcast_handshake_failures_total"),
        "connections_at_end": gauge(m2, "roomcast_connections"),
        // Kafka timestamp to queued, for live records during the storm: whether the
        // consumer loop kept up while the resumes ran.
        "record_latency_bucket_le_s": record_latency(m0, m1),
    })
}

fn record_latency(a: &Option<HashMap<String, f64>>, b: &Option<HashMap<String, f64>>) -> Value {
    let (Some(a), Some(b)) = (a, b) else {
        return Value::Null;
    };
    procstat::histogram_quantiles(a, b, "roomcast_record_latency_seconds", &[0.5, 0.99, 1.0])
        .map(|q| json!({ "p50": q[0], "p99": q[1], "max": q[2] }))
        .unwrap_or(Value::Null)
}

fn server_report(p: &Parts<'_>) -> Value {
    let (live, s) = (p.live, p.storm);
    let server_cpu = cpu(s.start.server, s.end.server);
    json!({
        "first_rss_end_of_live_kib": live.b.map(|s| s.rss_kib),
        "first_cpu_cores_live": match (live.a, live.b) {
            (Some(a), Some(b)) => Some(round((b.cpu_s - a.cpu_s) / live.wall.max(1e-9), 3)),
            _ => None,
        },
        "first_replay_buffer_bytes": gauge(&live.metrics, "roomcast_replay_buffer_bytes"),
        "startup_cpu_s": p.restart.startup_cpu.map(|c| round(c, 3)),
        "storm_cpu_s": server_cpu.map(|c| round(c, 3)),
        "storm_cpu_cores": per_storm_s(p, server_cpu),
        "rss_at_reconnect_kib": s.start.server.map(|s| s.rss_kib),
        "rss_peak_kib": s.rss_peak,
        "rss_caught_up_kib": s.end.server.map(|s| s.rss_kib),
        "rss_end_kib": p.finish.rss_end,
    })
}

fn machine(s: &Storm) -> Value {
    let (a, b): (&Edge, &Edge) = (&s.start, &s.end);
    let (Some(m0), Some(m1)) = (a.machine, b.machine) else {
        return Value::Null;
    };
    let storm_s = s.wall.as_secs_f64().max(1e-9);
    let ours = cpu(a.server, b.server).unwrap_or(0.0)
        + cpu(a.client, b.client).unwrap_or(0.0)
        + cpu(a.broker, b.broker).unwrap_or(0.0);
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "busy_cores": round((m1 - m0) / storm_s, 3),
        "other_busy_cores": round(((m1 - m0) - ours).max(0.0) / storm_s, 3),
    })
}

fn records_report(p: &Parts<'_>) -> Value {
    let o = &p.finish.outcome;
    json!({
        "attempted": p.finish.expected.total,
        "refused": o.refused,
        "failed_after_send": p.counters.errors.load(Ordering::Relaxed),
        "max_send_delay_us": o.max_send_delay_us,
        "producer_seconds": round(o.elapsed.as_secs_f64(), 2),
    })
}

pub(super) fn print(r: &Value) {
    let s = &r["storm"];
    let ms = |v: &Value| crate::us_as_ms(v, 0);
    let dist = |name: &str| {
        let d = &s[name];
        format!(
            "p50 {}  p99 {}  max {}",
            ms(&d["p50"]),
            ms(&d["p99"]),
            ms(&d["max"])
        )
    };
    eprintln!("== resume storm {} ({})", r["dist"], r["label"]);
    eprintln!(
        "clients: {} resumed of {} connected; all caught up after {} s",
        s["caught_up"], s["clients"], s["all_caught_up_s"]
    );
    eprintln!("welcome   {}", dist("welcome_us"));
    eprintln!("ok        {}", dist("ok_us"));
    eprintln!("caught up {}", dist("caught_up_us"));
    eprintln!(
        "replayed per client: {}; sources {}",
        r["replay"]["replayed_per_client"], r["replay"]["sources_by_ok"]
    );
    eprintln!("server: {} ; metrics {}", r["server"], r["server_metrics"]);
    eprintln!("verification: {}", r["verification"]);
}
