//! The summary of a set of runs: markdown tables, one per kind of run, one row per run (per
//! phase, per sample point), read back from the JSON lines the scenarios append; and the one
//! line that combines the idle-replicas clients that ran side by side.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use serde_json::{json, Value};

/// `report`: the tables of the JSON lines in a file.
#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// A file of JSON lines, as --json-out appends them.
    pub results: PathBuf,
    /// Leave out this many lines from its start (the runs of earlier invocations).
    #[arg(long, default_value_t = 0)]
    pub since: usize,
}

/// `combine-replicas`: the idle lines of clients that ran side by side, one per server.
#[derive(Args, Debug, Clone)]
pub struct CombineArgs {
    /// Each client's --json-out file (its last line is taken; a missing or empty file is a
    /// client that did not report).
    #[arg(required = true)]
    pub clients: Vec<PathBuf>,
    /// The machine's MemAvailable (KiB) before the servers started.
    #[arg(long)]
    pub mem_before_kib: u64,
    /// MemAvailable (KiB) after everything stopped.
    #[arg(long)]
    pub mem_after_kib: u64,
    /// MemAvailable samples (KiB, whitespace-separated) taken while the connections were held.
    #[arg(long)]
    pub mem_samples: PathBuf,
}

/// The report's markdown.
pub fn tables(args: &ReportArgs) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(&args.results)
        .with_context(|| format!("cannot read {}", args.results.display()))?;
    let mut t = Tables::default();
    for (i, line) in text.lines().enumerate().skip(args.since) {
        if line.trim().is_empty() {
            continue;
        }
        let r: Value =
            serde_json::from_str(line).with_context(|| format!("line {}: not JSON", i + 1))?;
        t.add(&r);
    }
    Ok(t.render())
}

/// Rows by kind of run, in the order their tables are printed.
#[derive(Default)]
struct Tables {
    fanout: Vec<Vec<String>>,
    storm: Vec<Vec<String>>,
    memory: Vec<Vec<String>>,
    slow: Vec<Vec<String>>,
    connect: Vec<Vec<String>>,
    backlog: Vec<Vec<String>>,
    kafka: Vec<Vec<String>>,
    hostile: Vec<Vec<String>>,
    replicas: Vec<Vec<String>>,
    presence: Vec<Vec<String>>,
}

impl Tables {
    fn add(&mut self, r: &Value) {
        match r["mode"].as_str().unwrap_or("") {
            "idle" => self.fanout.push(idle_row(r)),
            "fanout" => {
                self.fanout.push(fanout_row(r));
                if !r["slow_consumers"].is_null() {
                    self.slow.push(slow_row(r));
                }
            }
            "kafka-path" => self.kafka.push(kafka_row(r)),
            "connect-storm" => self.connect.push(connect_row(r)),
            "idle-replicas" => self.replicas.extend(replica_rows(r)),
            "resume-storm" => self.storm.push(storm_row(r)),
            "route-backlog" => self.backlog.push(backlog_row(r)),
            "hostile" => self.hostile.extend(hostile_rows(r)),
            "replay-memory" => self.memory.extend(memory_rows(r)),
            "presence-storm" => self.presence.extend(presence_rows(r)),
            _ => {}
        }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        let mut table = |head: &[&str], rows: &[Vec<String>]| {
            if rows.is_empty() {
                return;
            }
            out.push_str(&format!("| {} |\n", head.join(" | ")));
            out.push_str(&format!("|{}\n", "---|".repeat(head.len())));
            for row in rows {
                out.push_str(&format!("| {} |\n", row.join(" | ")));
            }
            out.push('\n');
        };
        table(FANOUT, &self.fanout);
        table(STORM, &self.storm);
        table(MEMORY, &self.memory);
        table(SLOW, &self.slow);
        table(CONNECT, &self.connect);
        table(BACKLOG, &self.backlog);
        table(KAFKA, &self.kafka);
        table(HOSTILE, &self.hostile);
        table(REPLICAS, &self.replicas);
        table(PRESENCE, &self.presence);
        out
    }
}

/// The tables' heads, one cell per column of their rows.
#[rustfmt::skip]
const FANOUT: &[&str] = &[
    "run", "target", "dist", "conns", "rec/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms",
    "deliveries/s", "lost", "dup", "server cores", "server RSS MiB", "RSS/conn B",
];
#[rustfmt::skip]
const STORM: &[&str] = &[
    "run", "caught up", "dist", "replayed p50 / mean / max", "source (ok)", "all caught up s",
    "catch-up p50 / p99 / max s", "resume->ok p50 / p99 ms", "lost / dup / out of order",
    "server CPU s (cores)", "server RSS MiB", "listen overflows",
];
#[rustfmt::skip]
const MEMORY: &[&str] = &[
    "value B", "buffer MiB", "records", "raw MiB", "accounted MiB", "accounted/raw",
    "RSS growth MiB", "RSS MiB per MiB of window", "RSS per accounted MiB", "RSS B/record",
];
#[rustfmt::skip]
const SLOW: &[&str] = &[
    "run", "target", "fast conns", "slow conns", "fast p50 ms", "fast p99 ms", "fast max ms",
    "deliveries/s (fast)", "lost (fast)", "dup (fast)", "4008 closes",
];
#[rustfmt::skip]
const CONNECT: &[&str] = &[
    "run", "target", "clients", "welcomed", "failed (reason)", "welcome p50 / p90 / p99 / max ms",
    "all welcomed s", "server CPU s (cores)", "server RSS MiB t0 -> peak -> end",
    "listen overflows / drops",
];
#[rustfmt::skip]
const BACKLOG: &[&str] = &[
    "run", "records", "produced in s", "ready s", "all consumed s", "records/s",
    "server CPU s (cores)", "records per CPU s", "CPU librdkafka / roomcast s",
    "CPU by thread name s", "server RSS MiB",
];
#[rustfmt::skip]
const KAFKA: &[&str] = &[
    "run", "rec/s", "linger ms", "received", "age p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms",
    "broker cores", "producer+consumer cores",
];
#[rustfmt::skip]
const HOSTILE: &[&str] = &[
    "run", "phase", "s", "bystander worst gap ms", "lost", "worst latency ms", "healthz worst ms",
    "healthz failed", "server RSS MiB", "server replaced",
];
#[rustfmt::skip]
const REPLICAS: &[&str] = &[
    "run", "open", "server RSS before MiB", "server RSS after MiB", "server RSS/conn B",
    "client RSS/conn B", "MemAvailable drop MiB", "MemAvailable drop/conn B",
];

#[rustfmt::skip]
const PRESENCE: &[&str] = &[
    "run", "presence", "storm", "clients in", "failed", "all in / all ended s", "connects/s",
    "records published (by agreement)", "others agreed s", "first server CPU s",
    "CPU per client µs", "presence adds µs", "other work cores", "listen overflows",
];

fn idle_row(r: &Value) -> Vec<String> {
    let c = &r["connections"];
    let mut row = vec![
        txt(&r["label"]),
        txt(&r["target"]),
        txt(&r["dist"]),
        txt(&c["open"]),
    ];
    row.extend(std::iter::repeat_n("-".to_string(), 9));
    row.push(fixed(
        r["server_rss_after_kib"].as_f64().map(|k| k / 1024.0),
        1,
    ));
    row.push(txt(&r["server_rss_per_connection_bytes"]));
    row
}

fn fanout_row(r: &Value) -> Vec<String> {
    let (c, l, d) = (&r["connections"], &r["latency_us"], &r["deliveries"]);
    vec![
        txt(&r["label"]),
        txt(&r["target"]),
        txt(&r["dist"]),
        txt(&c["open"]),
        g(&r["rate"]),
        ms(&l["p50"]),
        ms(&l["p99"]),
        ms(&l["p999"]),
        ms(&l["max"]),
        g(&d["per_s"]),
        txt(&d["lost"]),
        txt(&d["duplicates"]),
        txt(&r["server"]["cpu_cores"]),
        fixed(r["server"]["rss_end_kib"].as_f64().map(|k| k / 1024.0), 1),
        "-".into(),
    ]
}

fn slow_row(r: &Value) -> Vec<String> {
    let (sl, l, d) = (&r["slow_consumers"], &r["latency_us"], &r["deliveries"]);
    vec![
        txt(&r["label"]),
        txt(&r["target"]),
        txt(&sl["fast_connected"]),
        txt(&sl["slow_connected"]),
        ms(&l["p50"]),
        ms(&l["p99"]),
        ms(&l["max"]),
        g(&d["per_s"]),
        format!("{} of {}", txt(&d["lost"]), txt(&d["expected"])),
        txt(&d["duplicates"]),
        g(&sl["server_slow_consumer_closes"]),
    ]
}

fn kafka_row(r: &Value) -> Vec<String> {
    let a = &r["age_us"];
    vec![
        txt(&r["label"]),
        g(&r["rate"]),
        txt(&r["linger_ms"]),
        txt(&r["records"]["received"]),
        ms(&a["p50"]),
        ms(&a["p90"]),
        ms(&a["p99"]),
        ms(&a["p999"]),
        ms(&a["max"]),
        txt(&r["broker_cpu_cores"]),
        txt(&r["probe_cpu_cores"]),
    ]
}

fn connect_row(r: &Value) -> Vec<String> {
    let (w, sv, k) = (&r["welcome_us"], &r["server"], &r["kernel_tcp"]);
    vec![
        txt(&r["label"]),
        txt(&r["target"]),
        txt(&r["clients"]),
        txt(&r["welcomed"]),
        reasons(&r["failures"]),
        slashed(&[ms(&w["p50"]), ms(&w["p90"]), ms(&w["p99"]), ms(&w["max"])]),
        txt(&r["all_welcomed_s"]),
        format!("{} ({})", txt(&sv["cpu_s"]), txt(&sv["cpu_cores"])),
        format!(
            "{} -> {} -> {}",
            mib(&sv["rss_t0_kib"]),
            mib(&sv["rss_peak_kib"]),
            mib(&sv["rss_end_kib"])
        ),
        slashed(&[txt(&k["ListenOverflows"]), txt(&k["ListenDrops"])]),
    ]
}

fn replica_rows(r: &Value) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for p in r["replicas"].as_array().into_iter().flatten() {
        if p.is_null() {
            continue;
        }
        let c = &p["connections"];
        rows.push(vec![
            txt(&p["label"]),
            format!("{} of {}", txt(&c["open"]), txt(&c["requested"])),
            mib(&p["server_rss_before_kib"]),
            mib(&p["server_rss_after_kib"]),
            txt(&p["server_rss_per_connection_bytes"]),
            txt(&p["client_rss_per_connection_bytes"]),
            "-".into(),
            "-".into(),
        ]);
    }
    let (t, m) = (&r["total"], &r["mem_available"]);
    rows.push(vec![
        "total".into(),
        format!("{} of {}", txt(&t["open"]), txt(&t["requested"])),
        mib(&t["server_rss_before_kib"]),
        mib(&t["server_rss_after_kib"]),
        txt(&t["server_rss_per_connection_bytes"]),
        "-".into(),
        mib(&m["drop_kib"]),
        txt(&m["drop_per_connection_bytes"]),
    ]);
    rows
}

/// A row per run (presence on, off) and storm (connect, disconnect).
fn presence_rows(r: &Value) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for (mode, run) in r["runs"].as_object().into_iter().flatten() {
        for (storm, extra) in [
            ("connect", "cpu_per_connect_us"),
            ("disconnect", "cpu_per_disconnect_us"),
        ] {
            let (p, first) = (&run[storm], &run[storm]["first_server"]);
            let connect = &run["connect"];
            let agreed: Vec<String> = p["others"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|o| txt(&o["agreed_s"]))
                .collect();
            rows.push(vec![
                txt(&r["label"]),
                mode.clone(),
                storm.into(),
                format!(
                    "{} of {}",
                    txt(&connect["joined"]),
                    txt(&connect["clients"])
                ),
                if storm == "connect" {
                    reasons(&p["failures"])
                } else {
                    "-".into()
                },
                txt(if storm == "connect" {
                    &p["all_joined_s"]
                } else {
                    &p["sessions_ended_s"]
                }),
                if storm == "connect" {
                    txt(&p["connects_per_s"])
                } else {
                    "-".into()
                },
                format!(
                    "{} ({})",
                    txt(&p["records_published"]),
                    txt(&p["records_published_by_agreement"])
                ),
                if agreed.is_empty() {
                    "-".into()
                } else {
                    slashed(&agreed)
                },
                txt(&first["cpu_s"]),
                txt(&first["cpu_per_client_us"]),
                if mode == "on" {
                    txt(&r["extra"][extra])
                } else {
                    "-".into()
                },
                txt(&p["other_work_cores"]),
                txt(&p["kernel_tcp"]["ListenOverflows"]),
            ]);
        }
    }
    rows
}

fn storm_row(r: &Value) -> Vec<String> {
    let (st, rp, sv, v) = (&r["storm"], &r["replay"], &r["server"], &r["verification"]);
    let (cu, rep, ok) = (
        &st["caught_up_us"],
        &rp["replayed_per_client"],
        &st["resume_to_ok_us"],
    );
    vec![
        txt(&r["label"]),
        format!("{} of {}", txt(&st["caught_up"]), txt(&st["clients"])),
        txt(&r["dist"]),
        slashed(&[txt(&rep["p50"]), txt(&rep["mean"]), txt(&rep["max"])]),
        reasons(&rp["sources_by_ok"]),
        txt(&st["all_caught_up_s"]),
        slashed(&[secs(&cu["p50"]), secs(&cu["p99"]), secs(&cu["max"])]),
        slashed(&[ms(&ok["p50"]), ms(&ok["p99"])]),
        slashed(&[
            txt(&v["lost"]),
            txt(&v["duplicates"]),
            txt(&v["out_of_order"]),
        ]),
        format!(
            "{} ({})",
            txt(&sv["storm_cpu_s"]),
            txt(&sv["storm_cpu_cores"])
        ),
        format!(
            "{} -> {}",
            mib(&sv["rss_at_reconnect_kib"]),
            mib(&sv["rss_peak_kib"])
        ),
        txt(&st["kernel_tcp"]["ListenOverflows"]),
    ]
}

fn backlog_row(r: &Value) -> Vec<String> {
    let (sv, pr) = (&r["server"], &r["production"]);
    let names: Vec<String> = sv["threads_by_name"]
        .as_array()
        .into_iter()
        .flatten()
        .take(4)
        .map(|t| format!("{} {}", txt(&t["name"]), txt(&t["cpu_s"])))
        .collect();
    vec![
        txt(&r["label"]),
        txt(&r["records"]),
        txt(&pr["seconds"]),
        txt(&sv["ready_after_s"]),
        txt(&sv["all_consumed_after_s"]),
        g(&sv["records_per_s"]),
        format!("{} ({})", txt(&sv["cpu_s"]), txt(&sv["cpu_cores"])),
        g(&sv["records_per_cpu_s"]),
        slashed(&[
            txt(&sv["librdkafka_cpu_s"]),
            txt(&sv["roomcast_threads_cpu_s"]),
        ]),
        names.join(", "),
        mib(&sv["rss_end_kib"]),
    ]
}

fn hostile_rows(r: &Value) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for w in r["windows"].as_array().into_iter().flatten() {
        let (b, h) = (&w["bystander"], &w["healthz"]);
        rows.push(vec![
            txt(&r["label"]),
            txt(&w["name"]),
            txt(&w["seconds"]),
            txt(&b["worst_gap_ms"]),
            txt(&b["lost"]),
            txt(&b["worst_latency_ms"]),
            txt(&h["worst_ms"]),
            txt(&h["failed"]),
            mib(&w["rss_after_close_kib"]),
            if w["server_replaced"].as_bool() == Some(true) {
                "yes".into()
            } else {
                "-".into()
            },
        ]);
    }
    let rs = &r["rss"];
    let mut total = vec![txt(&r["label"]), "RSS end/start".into()];
    total.extend(std::iter::repeat_n("-".to_string(), 6));
    total.push(format!(
        "{} -> {} ({})",
        mib(&rs["baseline_kib"]),
        mib(&rs["end_kib"]),
        txt(&rs["end_over_baseline"])
    ));
    total.push("-".into());
    rows.push(total);
    rows
}

fn memory_rows(r: &Value) -> Vec<Vec<String>> {
    let mb = |v: &Value| fixed(v.as_f64().map(|b| b / f64::from(1 << 20)), 1);
    r["points"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            vec![
                txt(&r["payload_bytes"]),
                txt(&p["target_mib"]),
                fixed(p["records_held"].as_f64().map(f64::trunc), 0),
                mb(&p["raw_bytes"]),
                mb(&p["accounted_bytes"]),
                txt(&p["accounted_per_raw"]),
                mb(&p["rss_growth_bytes"]),
                txt(&p["rss_mib_per_raw_mib"]),
                txt(&p["rss_mib_per_accounted_mib"]),
                txt(&p["rss_growth_per_record"]),
            ]
        })
        .collect()
}

/// A value as it reads in a table: strings bare, numbers as JSON writes them, `-` for none.
fn txt(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Microseconds as milliseconds with two decimals.
fn ms(v: &Value) -> String {
    fixed(v.as_f64().map(|u| u / 1000.0), 2)
}

/// Microseconds as seconds with one decimal.
fn secs(v: &Value) -> String {
    fixed(v.as_f64().map(|u| u / 1e6), 1)
}

/// KiB as whole MiB.
fn mib(v: &Value) -> String {
    fixed(v.as_f64().map(|k| k / 1024.0), 0)
}

fn fixed(x: Option<f64>, decimals: usize) -> String {
    x.map_or("-".into(), |x| format!("{x:.decimals$}"))
}

/// A number with at most six significant digits and no trailing zeros (C's `%g`).
fn g(v: &Value) -> String {
    let Some(x) = v.as_f64() else {
        return "-".into();
    };
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let exp = x.abs().log10().floor() as i32;
    if !(-4..6).contains(&exp) {
        let s = format!("{x:.5e}");
        let (mantissa, e) = s.split_once('e').expect("an exponent");
        let e: i32 = e.parse().expect("a number");
        let sign = if e < 0 { '-' } else { '+' };
        return format!("{}e{sign}{:02}", trim_zeros(mantissa), e.abs());
    }
    let decimals = (5 - exp).max(0) as usize;
    trim_zeros(&format!("{x:.decimals$}")).to_string()
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

fn slashed(parts: &[String]) -> String {
    parts.join(" / ")
}

/// `{"refused": 3, "reset": 1}` as `refused 3, reset 1`; `-` when empty.
fn reasons(v: &Value) -> String {
    let parts: Vec<String> = v
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, n)| format!("{k} {}", txt(n)))
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

/// The idle-replicas line: each client's idle line, totals over those that reported, and the
/// machine's MemAvailable before the servers started, at its lowest while the connections
/// were held, and after everything stopped.
pub fn combine(args: &CombineArgs) -> anyhow::Result<Value> {
    let parts: Vec<Value> = args
        .clients
        .iter()
        .map(PathBuf::as_path)
        .map(last_line)
        .collect();
    let ok: Vec<&Value> = parts.iter().filter(|p| !p.is_null()).collect();
    let samples = std::fs::read_to_string(&args.mem_samples).unwrap_or_default();
    let low = samples
        .split_whitespace()
        .filter_map(|s| s.parse::<u64>().ok())
        .min();
    let total = |key: &str| -> Option<u64> {
        let vals: Option<Vec<u64>> = ok.iter().map(|p| p[key].as_u64()).collect();
        vals.filter(|v| !v.is_empty()).map(|v| v.iter().sum())
    };
    let count = |key: &str| -> u64 {
        ok.iter()
            .map(|p| p["connections"][key].as_u64().unwrap_or(0))
            .sum()
    };
    let opened = count("open");
    let per = |kib: Option<i64>| {
        kib.filter(|_| opened > 0)
            .map(|k| (k as f64 * 1024.0 / opened as f64).round() as i64)
    };
    let (rss0, rss1) = (
        total("server_rss_before_kib"),
        total("server_rss_after_kib"),
    );
    let rss_growth = rss0.zip(rss1).map(|(a, b)| b as i64 - a as i64);
    let drop = low.map(|l| args.mem_before_kib as i64 - l as i64);
    Ok(json!({
        "tool": "roomcast-load",
        "mode": "idle-replicas",
        "label": "idle-replicas",
        "target": "roomcast",
        "dist": "user",
        "replicas": parts,
        "total": {
            "servers": parts.len(),
            "clients_reported": ok.len(),
            "requested": count("requested"),
            "open": opened,
            "server_rss_before_kib": rss0,
            "server_rss_after_kib": rss1,
            "server_rss_per_connection_bytes": per(rss_growth),
        },
        "mem_available": {
            "before_servers_kib": args.mem_before_kib,
            "lowest_while_held_kib": low,
            "after_all_stopped_kib": args.mem_after_kib,
            "drop_kib": drop,
            "drop_per_connection_bytes": per(drop),
            "samples": samples.split_whitespace().count(),
        },
    }))
}

/// The last JSON line of a file; Null when there is none.
fn last_line(path: &Path) -> Value {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .and_then(|l| serde_json::from_str(l).ok())
        })
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_as_printf_g_writes_them() {
        for (x, want) in [
            (1000.0, "1000"),
            (20000.0, "20000"),
            (1_000_000.0, "1e+06"),
            (985_432.4, "985432"),
            (2.5, "2.5"),
            (0.0001, "0.0001"),
            (0.00001234, "1.234e-05"),
            (0.0, "0"),
        ] {
            assert_eq!(g(&json!(x)), want, "{x}");
        }
        assert_eq!(g(&Value::Null), "-");
    }

    #[test]
    fn a_fanout_and_an_idle_run_share_the_table_and_a_slow_run_adds_its_own() {
        let fanout = json!({
            "mode": "fanout", "label": "slow", "target": "roomcast", "dist": "shared",
            "connections": {"open": 10000}, "rate": 100.0,
            "latency_us": {"p50": 1500, "p99": 171000, "p999": 200000, "max": 250000},
            "deliveries": {"per_s": 990000.0, "lost": 0, "duplicates": 0, "expected": 5},
            "server": {"cpu_cores": 0.98, "rss_end_kib": 102400},
            "slow_consumers": {"fast_connected": 9900, "slow_connected": 100,
                               "server_slow_consumer_closes": 100.0},
        });
        let idle = json!({
            "mode": "idle", "label": "idle", "target": "floor", "dist": "user",
            "connections": {"open": 19000}, "server_rss_after_kib": 51200,
            "server_rss_per_connection_bytes": 3150.0,
        });
        let mut t = Tables::default();
        t.add(&fanout);
        t.add(&idle);
        t.add(&json!({"mode": "something else"}));
        let out = t.render();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], format!("| {} |", FANOUT.join(" | ")));
        assert_eq!(
            lines[2],
            "| slow | roomcast | shared | 10000 | 100 | 1.50 | 171.00 | 200.00 | 250.00 | \
             990000 | 0 | 0 | 0.98 | 100.0 | - |"
        );
        assert_eq!(
            lines[3],
            "| idle | floor | user | 19000 | - | - | - | - | - | - | - | - | - | 50.0 | 3150.0 |"
        );
        assert_eq!(
            lines[7],
            "| slow | roomcast | 9900 | 100 | 1.50 | 171.00 | 250.00 | 990000 | 0 of 5 | 0 | 100 |"
        );
        assert_eq!(lines.len(), 9, "{out}");
    }

    #[test]
    fn a_presence_storm_has_a_row_per_run_and_storm() {
        let storm = |agreed: Value, cpu: f64| {
            json!({"clients": 10, "joined": 10, "failures": {}, "all_joined_s": 0.5,
                   "sessions_ended_s": 0.1, "connects_per_s": 20.0, "records_published": 4.0,
                   "records_published_by_agreement": 2.0, "others": agreed, "other_work_cores": 0.25,
                   "kernel_tcp": {"ListenOverflows": 7},
                   "first_server": {"cpu_s": 0.02, "cpu_per_client_us": cpu}})
        };
        let r = json!({
            "mode": "presence-storm", "label": "p",
            "extra": {"cpu_per_connect_us": 30.0, "cpu_per_disconnect_us": 5.5},
            "runs": {
                "on": {"connect": storm(json!([{"agreed_s": 0.9}, {"agreed_s": 1.1}]), 100.0),
                       "disconnect": storm(json!([{"agreed_s": 0.3}, {"agreed_s": null}]), 20.0)},
                "off": {"connect": storm(json!([]), 70.0), "disconnect": storm(json!([]), 14.5)},
            },
        });
        let mut t = Tables::default();
        t.add(&r);
        let out = t.render();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], format!("| {} |", PRESENCE.join(" | ")));
        assert_eq!(
            lines[2],
            "| p | on | connect | 10 of 10 | - | 0.5 | 20.0 | 4.0 (2.0) | 0.9 / 1.1 | 0.02 | 100.0 | 30.0 | 0.25 | 7 |"
        );
        assert_eq!(
            lines[3],
            "| p | on | disconnect | 10 of 10 | - | 0.1 | - | 4.0 (2.0) | 0.3 / - | 0.02 | 20.0 | 5.5 | 0.25 | 7 |"
        );
        assert_eq!(
            lines[5],
            "| p | off | disconnect | 10 of 10 | - | 0.1 | - | 4.0 (2.0) | - | 0.02 | 14.5 | - | 0.25 | 7 |"
        );
        assert_eq!(lines.len(), 7, "{out}");
    }

    #[test]
    fn replicas_are_totalled_over_the_clients_that_reported() {
        let dir = std::env::temp_dir().join(format!("roomcast-combine-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let client = |i: u64, before: u64, after: u64| {
            let line = json!({
                "label": format!("idle-replicas-{i}"),
                "connections": {"open": 1000, "requested": 1000},
                "server_rss_before_kib": before, "server_rss_after_kib": after,
            });
            let path = dir.join(format!("c{i}.jsonl"));
            std::fs::write(&path, format!("{{}}\n{line}\n")).unwrap();
            path
        };
        let samples = dir.join("mem.txt");
        std::fs::write(&samples, "900000\n880000 890000\n").unwrap();
        let args = CombineArgs {
            clients: vec![
                client(1, 10_000, 13_000),
                client(2, 10_000, 14_000),
                dir.join("none"),
            ],
            mem_before_kib: 1_000_000,
            mem_after_kib: 990_000,
            mem_samples: samples,
        };
        let r = combine(&args).unwrap();
        assert_eq!(r["replicas"][2], Value::Null);
        assert_eq!(r["total"]["clients_reported"], 2);
        assert_eq!(r["total"]["open"], 2000);
        assert_eq!(r["total"]["server_rss_after_kib"], 27_000);
        // 7,000 KiB over 2,000 connections.
        assert_eq!(r["total"]["server_rss_per_connection_bytes"], 3584);
        assert_eq!(r["mem_available"]["drop_kib"], 120_000);
        assert_eq!(r["mem_available"]["samples"], 3);
        let text = Tables::default();
        let mut text = text;
        text.add(&r);
        assert!(text
            .render()
            .contains("| total | 2000 of 2000 | 20 | 26 | 3584 | - | 117 | 61440 |"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
