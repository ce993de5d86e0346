//! Samples of the processes and the machine taken at the edges of a measured window, and the
//! differences between two of them as they go into a run's JSON line.

use std::collections::HashMap;
use std::time::Instant;

use serde_json::{json, Value};

use crate::cli::Served;
use crate::procstat::{self, ProcSample};
use crate::round;

pub struct Samples {
    pub server: Option<ProcSample>,
    pub client: Option<ProcSample>,
    pub broker: Option<ProcSample>,
    pub metrics: Option<HashMap<String, f64>>,
    pub tcp_mem_pages: Option<u64>,
    pub mem_available_kib: Option<u64>,
    pub machine_busy_s: Option<f64>,
    pub at: Instant,
}

pub fn take(served: &Served) -> Samples {
    let pid = |p: Option<u32>| p.and_then(|p| procstat::sample(&p.to_string()));
    Samples {
        server: pid(served.server_pid),
        client: procstat::sample("self"),
        broker: pid(served.broker_pid),
        metrics: served.metrics_url.as_deref().and_then(procstat::scrape),
        tcp_mem_pages: procstat::tcp_mem_pages(),
        mem_available_kib: procstat::mem_available_kib(),
        machine_busy_s: procstat::machine_busy_s(),
        at: Instant::now(),
    }
}

pub fn proc_delta(
    a: Option<ProcSample>,
    b: Option<ProcSample>,
    wall: f64,
    deliveries: u64,
) -> Value {
    match (a, b) {
        (Some(a), Some(b)) => {
            let cpu = b.cpu_s - a.cpu_s;
            let syscw = match (a.syscw, b.syscw) {
                (Some(x), Some(y)) => Some(y.saturating_sub(x)),
                _ => None,
            };
            json!({
                "cpu_s": round(cpu, 3),
                "cpu_cores": round(cpu / wall.max(1e-9), 3),
                "cpu_us_per_delivery": (deliveries > 0).then(|| round(cpu * 1e6 / deliveries as f64, 3)),
                "write_syscalls": syscw,
                "write_syscalls_per_delivery": syscw.filter(|_| deliveries > 0).map(|s| round(s as f64 / deliveries as f64, 3)),
                "rss_start_kib": a.rss_kib,
                "rss_end_kib": b.rss_kib,
            })
        }
        _ => Value::Null,
    }
}

/// Busy cores of the whole machine in the window, and the part no sampled process used
/// (other work on the machine: noise for this run).
pub fn machine(a: &Samples, b: &Samples, wall: f64) -> Value {
    let cpu = |x: Option<ProcSample>, y: Option<ProcSample>| match (x, y) {
        (Some(x), Some(y)) => y.cpu_s - x.cpu_s,
        _ => 0.0,
    };
    let (Some(m0), Some(m1)) = (a.machine_busy_s, b.machine_busy_s) else {
        return Value::Null;
    };
    let busy = m1 - m0;
    let ours = cpu(a.server, b.server) + cpu(a.client, b.client) + cpu(a.broker, b.broker);
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "busy_cores": round(busy / wall.max(1e-9), 3),
        "other_busy_cores": round((busy - ours).max(0.0) / wall.max(1e-9), 3),
        "loadavg": std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| l.split_whitespace().next().map(String::from)),
    })
}

/// roomcast's own latency histogram (Kafka timestamp to queued for recipients) over the
/// window: the upper bounds of the buckets holding p50, p99 and p99.9.
pub fn server_side_latency(a: &Samples, b: &Samples) -> Value {
    let (Some(ma), Some(mb)) = (&a.metrics, &b.metrics) else {
        return Value::Null;
    };
    match procstat::histogram_quantiles(
        ma,
        mb,
        "roomcast_record_latency_seconds",
        &[0.5, 0.99, 0.999],
    ) {
        Some(q) => json!({ "p50": q[0], "p99": q[1], "p999": q[2] }),
        None => Value::Null,
    }
}

pub fn metric_delta(a: &Samples, b: &Samples, name: &str) -> Option<f64> {
    Some(b.metrics.as_ref()?.get(name)? - a.metrics.as_ref()?.get(name).copied().unwrap_or(0.0))
}
