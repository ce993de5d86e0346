//! Watches one replica until its table of the tenant is the expected one. Its counter of
//! presence records consumed is cheap to read; the table (about half a megabyte for 10,000
//! users, which the replica builds whole for every request) is fetched only when a record
//! came since the last fetch, and a second after the last fetch otherwise. A thread of its
//! own: the fetches block, and the clients' runtime has other work.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::table::{self, TenantTable};
use crate::procstat;

const CONSUMED: &str = "roomcast_presence_records_consumed_total";
pub const PUBLISHED: &str = "roomcast_presence_records_published_total";
/// The table is fetched at least this often, should the counter not move.
const REFETCH: Duration = Duration::from_secs(1);

pub struct Watch {
    pub admin: SocketAddr,
    pub tenant: String,
    /// What the table must be; the storm narrows it to the clients that got in once it knows.
    pub expected: Arc<RwLock<Arc<TenantTable>>>,
    /// The storm's start: every time is counted from it.
    pub start: Instant,
    pub deadline: Instant,
    pub poll: Duration,
    /// The replica the clients are on: its records-published counter is read once, at
    /// agreement.
    pub publisher: SocketAddr,
}

/// What the watch saw of its replica.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// From the start to the first read of the counter that showed a record consumed since.
    pub first_record: Option<Duration>,
    /// From the start to the answer that showed the expected table.
    pub agreed: Option<Duration>,
    /// Presence records the replica consumed from the start to that answer (or the deadline).
    pub records: Option<f64>,
    /// The first replica's records-published counter when this one agreed.
    pub published_at_agreement: Option<f64>,
    /// Tables fetched.
    pub fetches: u64,
    /// Users and room memberships in the last table fetched.
    pub last_users: Option<usize>,
    pub last_memberships: Option<usize>,
}

pub fn spawn(w: Watch) -> JoinHandle<Seen> {
    std::thread::Builder::new()
        .name(format!("watch-{}", w.admin))
        .spawn(move || watch(&w))
        .expect("a thread")
}

fn watch(w: &Watch) -> Seen {
    let metrics = format!("http://{}/metrics", w.admin);
    let path = format!("/presence?tenant={}", escape(&w.tenant));
    let consumed = || procstat::scrape(&metrics).and_then(|m| m.get(CONSUMED).copied());
    let at_start = consumed();
    let mut seen = Seen::default();
    let mut last = Fetch {
        count: at_start,
        at: w.start,
    };
    loop {
        let count = consumed();
        if seen.first_record.is_none() && count.is_some() && count != at_start {
            seen.first_record = Some(w.start.elapsed());
        }
        seen.records = count.zip(at_start).map(|(c, a)| c - a);
        let now = Instant::now();
        if last.due(count, now) {
            last = Fetch { count, at: now };
            seen.fetches += 1;
            let answer = procstat::get(w.admin, &path).map(|body| table::parse(&body));
            if let Some(Ok(Some(t))) = answer {
                seen.last_users = Some(t.users.len());
                seen.last_memberships = Some(t.memberships());
                let expected = w.expected.read().unwrap_or_else(|e| e.into_inner()).clone();
                if t == *expected {
                    seen.agreed = Some(w.start.elapsed());
                    seen.published_at_agreement =
                        procstat::scrape(&format!("http://{}/metrics", w.publisher))
                            .and_then(|m| m.get(PUBLISHED).copied());
                    return seen;
                }
            }
        }
        if Instant::now() >= w.deadline {
            return seen;
        }
        std::thread::sleep(w.poll);
    }
}

/// Reads `admin`'s metric `name` every `poll` until it is `value`; the time from `start` to
/// the read that showed it, or None by the deadline.
pub fn until_metric(
    admin: SocketAddr,
    name: &'static str,
    value: f64,
    start: Instant,
    deadline: Instant,
    poll: Duration,
) -> JoinHandle<Option<Duration>> {
    let url = format!("http://{admin}/metrics");
    std::thread::Builder::new()
        .name(format!("metric-{admin}"))
        .spawn(move || loop {
            if procstat::scrape(&url).and_then(|m| m.get(name).copied()) == Some(value) {
                return Some(start.elapsed());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(poll);
        })
        .expect("a thread")
}

/// The counter's value at the last fetch of the table, and when that was.
#[derive(Debug, Clone, Copy)]
struct Fetch {
    count: Option<f64>,
    at: Instant,
}

impl Fetch {
    /// Whether to fetch the table now: a record came since (or the counter cannot be read),
    /// or the last fetch is a second old.
    fn due(&self, count: Option<f64>, now: Instant) -> bool {
        count.is_none() || count != self.count || now.duration_since(self.at) >= REFETCH
    }
}

/// A query value, percent-encoded but for unreserved characters.
fn escape(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_fetched_when_a_record_came_or_a_second_went_by() {
        let t = Instant::now();
        let last = Fetch {
            count: Some(4.0),
            at: t,
        };
        assert!(!last.due(Some(4.0), t + Duration::from_millis(999)));
        assert!(last.due(Some(5.0), t + Duration::from_millis(20)));
        assert!(last.due(Some(4.0), t + REFETCH));
        assert!(last.due(None, t));
    }

    #[test]
    fn tenants_are_escaped_for_the_query() {
        assert_eq!(escape("bench-1_a.b~"), "bench-1_a.b~");
        assert_eq!(escape("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }
}
