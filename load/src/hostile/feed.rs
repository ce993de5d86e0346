//! The records of a hostile run, on a thread of its own: one for the bystander every 50 ms
//! for the whole run, and while the filter attack is on, records for the attackers' own user
//! rooms whose event name (from the `event` header, which overrides the route) has three
//! segments, so that every attacker's event filter is evaluated against it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};

use super::tally::Sent;
use crate::client::now_us;
use crate::producer::{self, Counters, Sink};

pub const EVERY: Duration = Duration::from_millis(50);
/// Three segments, like the default entity route's `{feature}.{entity}.{action}`.
pub const ATTACK_EVENT: &str = "tasks.task.updated";
/// Attack records are numbered from here, apart from the bystander's.
const ATTACK_SEQ: u64 = 1 << 40;
/// No run lasts longer; the thread ends by itself then.
const MAX_RUN: Duration = Duration::from_secs(3600);

/// Switches shared with the run.
#[derive(Default)]
pub struct Switches {
    pub stop: AtomicBool,
    /// Records for the filter attackers' rooms are produced while this is on.
    pub attack: AtomicBool,
}

pub struct Outcome {
    pub sent: Vec<Sent>,
    pub refused: u64,
    pub attack_records: u64,
    /// Records Kafka reported failed after they were handed over (either kind).
    pub failed: u64,
}

pub struct Feed {
    pub switches: Arc<Switches>,
    thread: std::thread::JoinHandle<Outcome>,
}

impl Feed {
    /// `attackers`: the users whose rooms get the attack records, in turn.
    pub fn start(
        brokers: &str,
        topic: &str,
        settings: &[(String, String)],
        attackers: Vec<String>,
        attack_rate: f64,
    ) -> anyhow::Result<Feed> {
        let counters = Arc::new(Counters::new(1));
        let sink = producer::kafka_sink(brokers, topic, settings, &counters)?;
        let switches = Arc::new(Switches::default());
        let s = switches.clone();
        let thread = std::thread::Builder::new()
            .name("hostile-feed".into())
            .spawn(move || {
                let mut out = run(&sink, &s, &attackers, attack_rate);
                if let Sink::Kafka { producer, .. } = &sink {
                    let _ = producer.flush(Duration::from_secs(10));
                }
                out.failed = counters.errors.load(Ordering::Relaxed);
                out
            })?;
        Ok(Feed { switches, thread })
    }

    pub fn finish(self) -> anyhow::Result<Outcome> {
        self.switches.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the feed thread panicked"))
    }
}

fn run(sink: &Sink, s: &Switches, attackers: &[String], attack_rate: f64) -> Outcome {
    let mut out = Outcome {
        sent: Vec::new(),
        refused: 0,
        attack_records: 0,
        failed: 0,
    };
    let Sink::Kafka { producer, topic } = sink else {
        return out;
    };
    let started = Instant::now();
    let attack_every = Duration::from_secs_f64(1.0 / attack_rate.max(0.1));
    let (mut next, mut next_attack) = (started, started);
    let mut seq = 0u64;
    while !s.stop.load(Ordering::Relaxed) && started.elapsed() < MAX_RUN {
        let now = Instant::now();
        if now >= next {
            let sent_us = now_us();
            let value = format!(
                r#"{{"taskId":"{}","seq":{seq},"sent_us":{sent_us}}}"#,
                super::observe::TASK
            );
            let record = BaseRecord::with_opaque_to(topic, seq as usize)
                .key(super::observe::TASK)
                .payload(&value);
            match producer.send(record) {
                Ok(()) => out.sent.push(super::tally::Sent { seq, sent_us }),
                Err(_) => out.refused += 1,
            }
            seq += 1;
            next += EVERY;
        }
        if s.attack.load(Ordering::Relaxed) && now >= next_attack && !attackers.is_empty() {
            let k = out.attack_records;
            let user = &attackers[k as usize % attackers.len()];
            let value = format!(r#"{{"userId":"{user}","seq":{k},"sent_us":{}}}"#, now_us());
            let headers = OwnedHeaders::new().insert(Header {
                key: "event",
                value: Some(ATTACK_EVENT),
            });
            let record = BaseRecord::with_opaque_to(topic, (ATTACK_SEQ + k) as usize)
                .key(user.as_str())
                .payload(&value)
                .headers(headers);
            if producer.send(record).is_ok() {
                out.attack_records += 1;
            }
            next_attack = now + attack_every;
        }
        let wake = if s.attack.load(Ordering::Relaxed) {
            next.min(next_attack)
        } else {
            next
        };
        let now = Instant::now();
        if wake > now {
            std::thread::sleep((wake - now).min(Duration::from_millis(5)));
        }
    }
    out
}
