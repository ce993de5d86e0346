//! What the bystander and the `/healthz` probe saw, cut into the run's phases: the worst gap
//! between records, the records lost, the worst record latency, and the worst probe.
//! Pure functions over the logs, so that the bookkeeping is tested apart from any server.

use serde_json::{json, Value};

/// One stretch of the run, `[start_us, end_us)` in µs since the epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub name: String,
    pub start_us: u64,
    pub end_us: u64,
}

/// A record the bystander received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    pub seq: u64,
    pub sent_us: u64,
    pub at_us: u64,
}

/// A record the producer handed to Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub seq: u64,
    pub sent_us: u64,
}

/// One `/healthz` request: when it started, how long until it was answered or given up on,
/// and whether the answer was 200.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub start_us: u64,
    pub elapsed_us: u64,
    pub ok: bool,
}

/// The longest stretch without a record that ends in the window, or that is still open at its
/// end: a server that delivers nothing during the whole window shows a gap as long as the time
/// since its last record, not none. `arrivals_at` is sorted; before the first record the
/// stretch counts from the window's start.
pub fn worst_gap_us(arrivals_at: &[u64], w: &Window) -> u64 {
    let first = arrivals_at.partition_point(|&t| t < w.start_us);
    let end = arrivals_at.partition_point(|&t| t < w.end_us);
    let mut prev = if first > 0 {
        arrivals_at[first - 1]
    } else {
        w.start_us
    };
    let mut worst = 0;
    for &t in &arrivals_at[first..end] {
        worst = worst.max(t - prev);
        prev = t;
    }
    worst.max(w.end_us.saturating_sub(prev))
}

/// The bystander's figures for one window. A record belongs to the window it was sent in; it
/// is lost if it never arrived during the whole run.
pub fn bystander(sent: &[Sent], arrivals: &[Arrival], arrivals_at: &[u64], w: &Window) -> Value {
    let in_window = |t: u64| t >= w.start_us && t < w.end_us;
    let mut received = std::collections::HashSet::new();
    let mut worst_latency = 0;
    let mut duplicates = 0u64;
    for a in arrivals {
        if !received.insert(a.seq) {
            duplicates += 1;
            continue;
        }
        if in_window(a.sent_us) {
            worst_latency = worst_latency.max(a.at_us.saturating_sub(a.sent_us));
        }
    }
    let produced: Vec<u64> = sent
        .iter()
        .filter(|s| in_window(s.sent_us))
        .map(|s| s.seq)
        .collect();
    let lost = produced.iter().filter(|s| !received.contains(s)).count();
    json!({
        "produced": produced.len(),
        "lost": lost,
        "worst_gap_ms": ms(worst_gap_us(arrivals_at, w)),
        "worst_latency_ms": ms(worst_latency),
        "duplicates_in_run": duplicates,
    })
}

/// The probe's figures for one window: probes started in it, the slowest (an unanswered one
/// counts with the time it was waited for), and how many got no 200.
pub fn healthz(probes: &[Probe], w: &Window) -> Value {
    let mine: Vec<&Probe> = probes
        .iter()
        .filter(|p| p.start_us >= w.start_us && p.start_us < w.end_us)
        .collect();
    let worst = mine.iter().map(|p| p.elapsed_us).max();
    json!({
        "probes": mine.len(),
        "failed": mine.iter().filter(|p| !p.ok).count(),
        "worst_ms": worst.map(ms),
    })
}

pub fn ms(us: u64) -> f64 {
    (us as f64 / 100.0).round() / 10.0
}

/// The `_total` series of two scrapes that moved, except the ones every record moves: what a
/// phase made the server count (refusals, closes by code, subscriptions by result).
pub fn moved_counters(
    a: &std::collections::HashMap<String, f64>,
    b: &std::collections::HashMap<String, f64>,
) -> std::collections::BTreeMap<String, f64> {
    const BUSY: [&str; 4] = [
        "roomcast_records_consumed_total",
        "roomcast_deliveries_total",
        "roomcast_replayed_records_total",
        "roomcast_record_latency_seconds",
    ];
    b.iter()
        .filter(|(k, _)| k.contains("_total") && !BUSY.iter().any(|n| k.starts_with(n)))
        .filter_map(|(k, v)| {
            let d = v - a.get(k).copied().unwrap_or(0.0);
            (d != 0.0).then(|| (k.clone(), d))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(start_us: u64, end_us: u64) -> Window {
        Window {
            name: "w".into(),
            start_us,
            end_us,
        }
    }

    #[test]
    fn the_worst_gap_is_the_longest_stretch_ending_in_the_window() {
        let at = [100, 150, 200, 400, 450, 900];
        // 200 -> 400 ends inside; 450 -> 900 ends after the window, which is open from 450.
        assert_eq!(worst_gap_us(&at, &window(160, 500)), 200);
        assert_eq!(worst_gap_us(&at, &window(160, 800)), 350);
        // A stretch that began before the window counts whole.
        assert_eq!(worst_gap_us(&at, &window(300, 420)), 200);
    }

    #[test]
    fn a_window_without_records_has_a_gap_from_the_last_one_before_it() {
        let at = [100, 150];
        assert_eq!(worst_gap_us(&at, &window(1_000, 5_000)), 4_850);
        assert_eq!(worst_gap_us(&[], &window(1_000, 5_000)), 4_000);
    }

    #[test]
    fn records_belong_to_the_window_they_were_sent_in() {
        let sent: Vec<Sent> = (0..6)
            .map(|seq| Sent {
                seq,
                sent_us: seq * 50_000,
            })
            .collect();
        // Record 2 never arrives; record 4 arrives late, in the next window; 1 comes twice.
        let arrivals = [
            (0, 1_000),
            (1, 51_000),
            (1, 52_000),
            (3, 151_000),
            (4, 400_000),
            (5, 251_000),
        ]
        .map(|(seq, at_us)| Arrival {
            seq,
            sent_us: seq * 50_000,
            at_us,
        });
        let mut at: Vec<u64> = arrivals.iter().map(|a| a.at_us).collect();
        at.sort_unstable();
        let first = bystander(&sent, &arrivals, &at, &window(0, 250_000));
        assert_eq!(first["produced"], 5);
        assert_eq!(first["lost"], 1);
        assert_eq!(first["worst_latency_ms"], 200.0);
        assert_eq!(first["worst_gap_ms"], 99.0);
        assert_eq!(first["duplicates_in_run"], 1);
        let second = bystander(&sent, &arrivals, &at, &window(250_000, 500_000));
        assert_eq!(second["produced"], 1);
        assert_eq!(second["lost"], 0);
        assert_eq!(second["worst_gap_ms"], 149.0);
    }

    #[test]
    fn an_unanswered_probe_counts_with_its_wait() {
        let probes = [
            Probe {
                start_us: 0,
                elapsed_us: 900,
                ok: true,
            },
            Probe {
                start_us: 50_000,
                elapsed_us: 2_000_000,
                ok: false,
            },
            Probe {
                start_us: 3_000_000,
                elapsed_us: 1_200,
                ok: true,
            },
        ];
        let h = healthz(&probes, &window(0, 3_000_000));
        assert_eq!(h["probes"], 2);
        assert_eq!(h["failed"], 1);
        assert_eq!(h["worst_ms"], 2000.0);
        assert_eq!(
            healthz(&probes, &window(4_000_000, 5_000_000))["worst_ms"],
            Value::Null
        );
    }

    #[test]
    fn only_counters_that_moved_are_kept() {
        let a = [
            ("roomcast_handshake_failures_total", 1.0),
            ("roomcast_deliveries_total", 5.0),
            ("roomcast_rooms", 3.0),
        ]
        .map(|(k, v)| (k.to_string(), v))
        .into();
        let b = [
            ("roomcast_handshake_failures_total", 4.0),
            ("roomcast_handshake_failures_total{reason=\"x\"}", 3.0),
            ("roomcast_deliveries_total", 9.0),
            ("roomcast_rooms", 30.0),
        ]
        .map(|(k, v)| (k.to_string(), v))
        .into();
        let moved = moved_counters(&a, &b);
        assert_eq!(moved.len(), 2);
        assert_eq!(moved["roomcast_handshake_failures_total"], 3.0);
        assert_eq!(
            moved["roomcast_handshake_failures_total{reason=\"x\"}"],
            3.0
        );
    }
}
