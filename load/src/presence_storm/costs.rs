//! What a storm's window cost: the processes and counters read at its start and at its end,
//! and the report of the difference (the first replica's CPU per client, the others', the
//! client's and the broker's, the machine's other work, the accept queue), with what the
//! watched replicas saw in it.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::watch::{Seen, PUBLISHED};
use crate::procstat;
use crate::round;
use crate::server::Server;

/// The processes and counters read at a storm's start and at the end of its window.
pub struct Sample {
    at: Instant,
    /// CPU seconds of each server, the first one's RSS and metrics.
    cpu: Vec<Option<f64>>,
    rss_kib: Option<u64>,
    metrics: Option<HashMap<String, f64>>,
    client: Option<f64>,
    broker: Option<f64>,
    machine_busy_s: Option<f64>,
    /// The kernel's accept-queue counters: a storm that overflows the queue waits for SYN
    /// retransmits (1 s, 3 s), which then set its pace.
    listen: Option<BTreeMap<String, u64>>,
}

impl Sample {
    pub fn take(servers: &[Server], broker: Option<u32>) -> Sample {
        let first = procstat::sample(&servers[0].pid.to_string());
        Sample {
            at: Instant::now(),
            cpu: servers
                .iter()
                .map(|s| procstat::sample(&s.pid.to_string()).map(|p| p.cpu_s))
                .collect(),
            rss_kib: first.map(|p| p.rss_kib),
            metrics: procstat::scrape(&servers[0].metrics_url()),
            client: procstat::sample("self").map(|p| p.cpu_s),
            broker: broker.and_then(|p| procstat::sample(&p.to_string()).map(|p| p.cpu_s)),
            machine_busy_s: procstat::machine_busy_s(),
            listen: procstat::listen_counters(),
        }
    }

    fn metric(&self, name: &str) -> Option<f64> {
        self.metrics.as_ref()?.get(name).copied()
    }
}

/// The first server's CPU per client over the window: (CPU seconds, microseconds per client).
fn per_client(
    before: Option<f64>,
    after: Option<f64>,
    clients: Option<u64>,
) -> (Option<f64>, Option<f64>) {
    let cpu = after.zip(before).map(|(a, b)| a - b);
    let per = cpu
        .zip(clients.filter(|&c| c > 0))
        .map(|(cpu, c)| cpu * 1e6 / c as f64);
    (cpu, per)
}

/// What one window cost and what the other replicas saw in it.
pub fn add_costs(r: &mut Value, a: &Sample, b: &Sample, seen: &[Seen], clients: Option<u64>) {
    let secs = |d: Option<Duration>| d.map(|d| round(d.as_secs_f64(), 3));
    let delta = |x: Option<f64>, y: Option<f64>| y.zip(x).map(|(y, x)| round(y - x, 3));
    let (cpu, per) = per_client(a.cpu[0], b.cpu[0], clients);
    let published_before = a.metric(PUBLISHED);
    let agreed: Vec<Option<f64>> = seen.iter().map(|s| secs(s.agreed)).collect();
    r["records_published"] = json!(delta(published_before, b.metric(PUBLISHED)));
    r["records_published_by_agreement"] = json!(seen
        .iter()
        .filter_map(|s| s.published_at_agreement)
        .fold(None, |m: Option<f64>, p| Some(m.map_or(p, |m| m.max(p))))
        .zip(published_before)
        .map(|(p, b)| p - b));
    r["all_agreed_s"] = json!(
        if agreed.iter().all(Option::is_some) && !agreed.is_empty() {
            agreed.iter().flatten().copied().reduce(f64::max)
        } else {
            None
        }
    );
    r["others"] = seen
        .iter()
        .map(|s| {
            json!({
                "first_record_s": secs(s.first_record),
                "agreed_s": secs(s.agreed),
                "records_consumed": s.records,
                "table_fetches": s.fetches,
                "last_users": s.last_users,
                "last_memberships": s.last_memberships,
            })
        })
        .collect();
    r["first_server"] = json!({
        "cpu_s": cpu.map(|c| round(c, 3)),
        "cpu_per_client_us": per.map(|p| round(p, 1)),
        "rss_before_kib": a.rss_kib,
        "rss_after_kib": b.rss_kib,
        "connections_at_end": b.metric("roomcast_connections"),
    });
    r["other_servers_cpu_s"] = a.cpu[1..]
        .iter()
        .zip(&b.cpu[1..])
        .map(|(x, y)| json!(delta(*x, *y)))
        .collect();
    r["client_cpu_s"] = json!(delta(a.client, b.client));
    r["broker_cpu_s"] = json!(delta(a.broker, b.broker));
    r["machine_busy_s"] = json!(delta(a.machine_busy_s, b.machine_busy_s));
    r["other_work_cores"] = json!(other_work(a, b));
    r["kernel_tcp"] = json!(listen_delta(&a.listen, &b.listen));
}

/// How much each accept-queue counter grew between two samples.
fn listen_delta(
    a: &Option<BTreeMap<String, u64>>,
    b: &Option<BTreeMap<String, u64>>,
) -> Option<BTreeMap<String, u64>> {
    let (a, b) = (a.as_ref()?, b.as_ref()?);
    Some(
        b.iter()
            .map(|(k, v)| (k.clone(), v.saturating_sub(a.get(k).copied().unwrap_or(0))))
            .collect(),
    )
}

/// The cores busy with work other than the servers', the client's and the broker's between
/// two samples: the machine's other tenants, whose load the run shared the cores with.
fn other_work(a: &Sample, b: &Sample) -> Option<f64> {
    let busy = b.machine_busy_s? - a.machine_busy_s?;
    let spent = |x: Option<f64>, y: Option<f64>| y.zip(x).map_or(0.0, |(y, x)| y - x);
    let ours: f64 = a
        .cpu
        .iter()
        .zip(&b.cpu)
        .map(|(x, y)| spent(*x, *y))
        .sum::<f64>()
        + spent(a.client, b.client)
        + spent(a.broker, b.broker);
    let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
    Some(round((busy - ours).max(0.0) / secs, 2))
}

/// What presence adds per client: the on run's CPU per client less the off run's.
pub fn extra(runs: &Value) -> Value {
    let diff = |phase: &str| {
        let per = |mode: &str| runs[mode][phase]["first_server"]["cpu_per_client_us"].as_f64();
        per("on")
            .zip(per("off"))
            .map(|(on, off)| round(on - off, 1))
    };
    json!({
        "cpu_per_connect_us": diff("connect"),
        "cpu_per_disconnect_us": diff("disconnect"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_per_client_and_what_presence_adds() {
        let (cpu, per) = per_client(Some(10.0), Some(10.5), Some(10_000));
        assert_eq!(cpu, Some(0.5));
        assert!((per.unwrap() - 50.0).abs() < 1e-9);
        assert_eq!(per_client(Some(1.0), None, Some(10)), (None, None));
        assert_eq!(per_client(Some(1.0), Some(2.0), Some(0)).1, None);
        let runs = json!({
            "on": {"connect": {"first_server": {"cpu_per_client_us": 71.5}},
                   "disconnect": {"first_server": {"cpu_per_client_us": 30.0}}},
            "off": {"connect": {"first_server": {"cpu_per_client_us": 60.25}},
                    "disconnect": {"first_server": {"cpu_per_client_us": null}}},
        });
        assert_eq!(
            extra(&runs),
            json!({"cpu_per_connect_us": 11.3, "cpu_per_disconnect_us": null})
        );
    }

    #[test]
    fn other_work_is_the_machine_less_what_the_run_spent() {
        let at = Instant::now();
        let sample = |at, cpu: [f64; 2], client, busy| Sample {
            at,
            cpu: cpu.into_iter().map(Some).collect(),
            rss_kib: None,
            metrics: None,
            client: Some(client),
            broker: None,
            machine_busy_s: Some(busy),
            listen: None,
        };
        let a = sample(at, [1.0, 2.0], 0.5, 100.0);
        let b = sample(at + Duration::from_secs(2), [2.0, 2.5], 1.0, 104.0);
        // 4 s busy, of which the run spent 2: one core's worth of other work over 2 s.
        assert_eq!(other_work(&a, &b), Some(1.0));
        let idle = sample(at + Duration::from_secs(2), [2.0, 2.5], 1.0, 101.0);
        assert_eq!(other_work(&a, &idle), Some(0.0));
    }

    #[test]
    fn accept_queue_counters_are_counted_over_the_window() {
        let counters = |o: u64, d: u64| {
            Some(BTreeMap::from([
                ("ListenOverflows".to_string(), o),
                ("ListenDrops".to_string(), d),
            ]))
        };
        assert_eq!(
            listen_delta(&counters(10, 3), &counters(510, 3)),
            Some(BTreeMap::from([
                ("ListenDrops".to_string(), 0),
                ("ListenOverflows".to_string(), 500),
            ]))
        );
        assert_eq!(listen_delta(&None, &counters(1, 1)), None);
    }
}
