//! A resume on a replica that has not read as far as the client: the client failed over from
//! a replica ahead of this one, and its map names offsets this replica's consumer has not
//! reached yet.
//!
//! Such a map is not "ahead of the log": the log holds those offsets, this replica is merely
//! behind. Told apart by the partition's high watermark (the next offset the log will write):
//! above the client's position, the replica is lagging, and the resume waits, holding no lock,
//! until its consumer has read past the client's position, so the cut is at or past it and
//! nothing is replayed twice; at or below it, the log itself is shorter (the topic was
//! recreated or truncated), and the resume goes on to its `resync`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::{timeout_at, Instant};

use super::HistoryError;
use crate::position::{parse_partition_key, PartitionTable, PositionMap};

/// How often a waiting resume looks at the consumer's positions again. Polled rather than
/// notified: a notification from the consumer per record would wake every waiting resume per
/// record, and a failover storm brings thousands of them while the consumer catches up.
pub const POLL: Duration = Duration::from_millis(20);

/// Where a partition's log ends, asked of the broker when this replica's own knowledge does
/// not already show the log holding the client's position.
pub trait Log {
    fn high_watermark(
        &self,
        topic: &str,
        partition: i32,
    ) -> impl Future<Output = Result<i64, HistoryError>> + Send;
}

/// The broker's answers about where partitions' logs end, with when each question was asked,
/// shared by every resume. An answer asked after a resume began holds for it: the client's
/// map was delivered by another replica before that, so a log that holds the map held it
/// then. One question at a time per partition: every resume of a failover storm that began
/// before a question was asked takes its answer, instead of asking again; questions about
/// different partitions do not wait for each other.
#[derive(Debug, Default)]
pub struct LogEnds {
    /// Held only to find a partition's entry, never across an await.
    partitions: std::sync::Mutex<HashMap<(String, i32), Arc<Asked>>>,
}

/// A partition's last answer (the high watermark and when it was asked), locked while a
/// question about it is out.
type Asked = Mutex<Option<(i64, Instant)>>;

impl LogEnds {
    async fn high_watermark(
        &self,
        log: &impl Log,
        topic: &str,
        partition: i32,
        since: Instant,
    ) -> Result<i64, HistoryError> {
        let entry = {
            let mut partitions = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
            let key = (topic.to_string(), partition);
            partitions.entry(key).or_default().clone()
        };
        let mut asked = entry.lock().await;
        if let Some((high, at)) = *asked {
            if at >= since {
                return Ok(high);
            }
        }
        let at = Instant::now();
        let high = log.high_watermark(topic, partition).await?;
        *asked = Some((high, at));
        Ok(high)
    }
}

/// What a resume asks about this replica: its positions, and where the logs end.
pub struct Replica<'a, L> {
    pub table: &'a PartitionTable,
    pub ends: &'a LogEnds,
    pub log: &'a L,
}

/// How a resume's map stood against this replica's positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Nothing in the map is past what this replica has read, except where the log itself
    /// ends before the map (that is for the replay to answer with `resync`).
    Even,
    /// The replica was behind the map, and read past it within the wait.
    CaughtUp,
}

/// The replica was still behind the client's map when the wait ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("this replica has read {key} up to {at}, behind the position {wanted} resumed from")]
pub struct Behind {
    pub key: String,
    pub wanted: i64,
    /// The last offset this replica has read (-1: none).
    pub at: i64,
}

/// A partition the client is ahead of, and where.
struct Ahead<'a> {
    key: &'a str,
    topic: &'a str,
    partition: i32,
    after: i64,
}

impl Ahead<'_> {
    /// The last offset this replica has read, if it is still behind `after`.
    fn behind(&self, table: &PartitionTable) -> Option<i64> {
        let state = table.get(self.topic, self.partition)?;
        (state.next_offset <= self.after).then_some(state.next_offset - 1)
    }
}

/// Returns once this replica has read every partition of `after` at least up to the client's
/// position where its log holds that position, or fails with the first partition still
/// behind at `deadline`.
pub async fn catch_up(
    replica: Replica<'_, impl Log>,
    after: &PositionMap,
    deadline: Instant,
) -> Result<Level, Behind> {
    let table = replica.table;
    let since = Instant::now();
    let mut lagging = Vec::new();
    for ahead in ahead_of(table, after) {
        if holds(&replica, &ahead, since, deadline).await {
            lagging.push(ahead);
        }
    }
    if lagging.is_empty() {
        return Ok(Level::Even);
    }
    loop {
        let Some((ahead, at)) = lagging
            .iter()
            .find_map(|a| a.behind(table).map(|at| (a, at)))
        else {
            return Ok(Level::CaughtUp);
        };
        if Instant::now() >= deadline {
            return Err(Behind {
                key: ahead.key.to_string(),
                wanted: ahead.after,
                at,
            });
        }
        tokio::time::sleep(POLL.min(deadline - Instant::now())).await;
    }
}

/// The partitions of `after` this replica has not read as far as the client.
fn ahead_of<'a>(table: &PartitionTable, after: &'a PositionMap) -> Vec<Ahead<'a>> {
    after
        .iter()
        .filter_map(|(key, &after)| {
            let (topic, partition) = parse_partition_key(key)?;
            let ahead = Ahead {
                key,
                topic,
                partition,
                after,
            };
            ahead.behind(table).map(|_| ahead)
        })
        .collect()
}

/// Whether the partition's log holds the client's position. What this replica knows of the
/// high watermark (librdkafka's statistics, its own reading) settles it when it is past the
/// position, with no round trip, which matters when every client of a failed replica resumes
/// here at once; otherwise the broker is asked (see [`LogEnds`]), and its answer kept in the
/// table for the resumes after. A broker that does not answer by the deadline settles
/// nothing: the resume waits as for a lagging replica, and if it is still behind at the end,
/// the client is told to try again, not to resync.
async fn holds(
    replica: &Replica<'_, impl Log>,
    ahead: &Ahead<'_>,
    since: Instant,
    deadline: Instant,
) -> bool {
    let (table, topic, partition) = (replica.table, ahead.topic, ahead.partition);
    if table
        .get(topic, partition)
        .is_some_and(|s| s.high_watermark > ahead.after)
    {
        return true;
    }
    let asked = replica
        .ends
        .high_watermark(replica.log, topic, partition, since);
    match timeout_at(deadline, asked).await {
        Ok(Ok(high)) => {
            table.set_high_watermark(topic, partition, high);
            high > ahead.after
        }
        Ok(Err(e)) => {
            tracing::warn!(key = ahead.key, error = %e, "high watermark unavailable for a resume");
            true
        }
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    /// A broker whose log of every partition ends at `high`, or that cannot be reached; it
    /// takes `delay` to answer.
    struct Broker {
        high: Option<i64>,
        delay: Duration,
        asked: AtomicUsize,
    }

    impl Broker {
        fn at(high: i64) -> Broker {
            Broker {
                high: Some(high),
                delay: Duration::ZERO,
                asked: AtomicUsize::new(0),
            }
        }

        fn down() -> Broker {
            Broker {
                high: None,
                ..Broker::at(0)
            }
        }

        fn asked(&self) -> usize {
            self.asked.load(Ordering::Relaxed)
        }
    }

    impl Log for Broker {
        async fn high_watermark(&self, _: &str, _: i32) -> Result<i64, HistoryError> {
            self.asked.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(self.delay).await;
            self.high.ok_or_else(|| HistoryError::Kafka("down".into()))
        }
    }

    /// A replica that has read `t:0` up to `read` and knows its head as `head`.
    fn replica(read: i64, head: i64) -> Arc<PartitionTable> {
        let table = Arc::new(PartitionTable::default());
        table.assign("t", 0, 0, 0);
        for offset in 0..=read {
            table.advance("t", 0, offset);
        }
        table.set_high_watermark("t", 0, head);
        table
    }

    fn map(offset: i64) -> PositionMap {
        [("t:0".to_string(), offset)].into()
    }

    /// One resume's wait, with nothing kept from earlier questions to the broker.
    async fn resume(
        table: &PartitionTable,
        broker: &Broker,
        after: &PositionMap,
        deadline: Instant,
    ) -> Result<Level, Behind> {
        let ends = LogEnds::default();
        let replica = Replica {
            table,
            ends: &ends,
            log: broker,
        };
        catch_up(replica, after, deadline).await
    }

    /// The consumer reading `t:0` on from where it is, one record every `every`.
    fn consumer(table: &Arc<PartitionTable>, upto: i64, every: Duration) {
        let table = table.clone();
        tokio::spawn(async move {
            let from = table.get("t", 0).unwrap().next_offset;
            for offset in from..=upto {
                tokio::time::sleep(every).await;
                table.advance("t", 0, offset);
            }
        });
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_level_with_the_map_waits_for_nothing_and_asks_nobody() {
        let table = replica(50, 51);
        let broker = Broker::at(51);
        let deadline = Instant::now() + Duration::from_secs(10);
        for level in [map(50), map(7), PositionMap::new()] {
            let got = resume(&table, &broker, &level, deadline).await;
            assert_eq!(got, Ok(Level::Even));
        }
        // A partition this replica does not read is the replay's to leave out.
        let other = [("u:3".to_string(), 99)].into();
        assert_eq!(
            resume(&table, &broker, &other, deadline).await,
            Ok(Level::Even)
        );
        assert_eq!(broker.asked(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lagging_replica_is_waited_for_until_it_has_read_past_the_map() {
        // Read up to 9; the log holds 100 records; the client has up to 60.
        let table = replica(9, 10);
        let broker = Broker::at(100);
        consumer(&table, 99, Duration::from_millis(50));
        let start = Instant::now();
        let deadline = start + Duration::from_secs(10);
        let got = resume(&table, &broker, &map(60), deadline).await;
        assert_eq!(got, Ok(Level::CaughtUp));
        // Offset 60 is read 51 records in, 2.55 s on; the wait sees it at its next look.
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(2550) && waited <= Duration::from_millis(2550) + POLL,
            "waited {waited:?}"
        );
        assert!(table.get("t", 0).unwrap().next_offset > 60);
        // The broker's answer is kept: a resume from further on asks nobody.
        assert_eq!(broker.asked(), 1);
        let further = resume(&table, &broker, &map(99), Instant::now()).await;
        assert_eq!(further.unwrap_err().wanted, 99);
        assert_eq!(broker.asked(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_still_behind_at_the_deadline_says_where_it_is() {
        let table = replica(9, 10);
        let broker = Broker::at(100);
        // Too slow: 22 records in 10 s.
        consumer(&table, 99, Duration::from_millis(450));
        let start = Instant::now();
        let got = resume(&table, &broker, &map(60), start + Duration::from_secs(10)).await;
        assert_eq!(
            got,
            Err(Behind {
                key: "t:0".into(),
                wanted: 60,
                at: 31,
            })
        );
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_map_past_the_end_of_the_log_is_left_to_resync_at_once() {
        // The log was recreated: it ends at 3, the client holds 500 of the old one.
        let table = replica(2, 3);
        let broker = Broker::at(3);
        let start = Instant::now();
        let got = resume(&table, &broker, &map(500), start + Duration::from_secs(10)).await;
        assert_eq!(got, Ok(Level::Even));
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(broker.asked(), 1);
        // The log's end is exact: offset 3 is not in it yet.
        assert_eq!(
            resume(&table, &broker, &map(3), start).await,
            Ok(Level::Even)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_broker_out_of_reach_makes_the_resume_wait_not_resync() {
        let table = replica(9, 10);
        let start = Instant::now();
        let deadline = start + Duration::from_secs(10);
        let got = resume(&table, &Broker::down(), &map(60), deadline).await;
        assert_eq!(got.unwrap_err().at, 9);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        // One that never answers holds the resume no longer than its deadline.
        let silent = Broker {
            delay: Duration::from_secs(3600),
            ..Broker::at(100)
        };
        let start = Instant::now();
        let got = resume(&table, &silent, &map(60), start + Duration::from_secs(10)).await;
        assert_eq!(got.unwrap_err().at, 9);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        // And a replica that catches up meanwhile is resumed as usual.
        consumer(&table, 70, Duration::from_millis(10));
        let deadline = Instant::now() + Duration::from_secs(10);
        let got = resume(&table, &Broker::down(), &map(60), deadline).await;
        assert_eq!(got, Ok(Level::CaughtUp));
    }

    /// Questions about two partitions go to the broker at once: a slow answer about one does
    /// not hold a resume that needs the other.
    #[tokio::test(start_paused = true)]
    async fn questions_about_different_partitions_do_not_wait_for_each_other() {
        let broker = Arc::new(Broker {
            delay: Duration::from_secs(4),
            ..Broker::at(100)
        });
        let ends = Arc::new(LogEnds::default());
        let started = Instant::now();
        let asks: Vec<_> = (0..2)
            .map(|partition| {
                let (broker, ends) = (broker.clone(), ends.clone());
                tokio::spawn(async move {
                    let since = Instant::now();
                    ends.high_watermark(&*broker, "t", partition, since).await
                })
            })
            .collect();
        for ask in asks {
            assert_eq!(ask.await.unwrap().unwrap(), 100);
        }
        assert_eq!(broker.asked(), 2);
        assert_eq!(started.elapsed(), Duration::from_secs(4));
    }

    #[tokio::test(start_paused = true)]
    async fn a_storm_of_resumes_asks_the_broker_once_for_all_that_began_before_it() {
        // The log ends at 3; a hundred clients of an older log resume at once from 500.
        let table = replica(2, 3);
        let broker = Arc::new(Broker {
            delay: Duration::from_millis(30),
            ..Broker::at(3)
        });
        let ends = Arc::new(LogEnds::default());
        let deadline = Instant::now() + Duration::from_secs(10);
        let storm: Vec<_> = (0..100)
            .map(|_| {
                let (table, broker, ends) = (table.clone(), broker.clone(), ends.clone());
                tokio::spawn(async move {
                    let replica = Replica {
                        table: &table,
                        ends: &ends,
                        log: &*broker,
                    };
                    catch_up(replica, &map(500), deadline).await
                })
            })
            .collect();
        for resume in storm {
            assert_eq!(resume.await.unwrap(), Ok(Level::Even));
        }
        assert_eq!(broker.asked(), 1);
        // A resume that begins after that answer asks again: the log may have grown since.
        let replica = Replica {
            table: &table,
            ends: &ends,
            log: &*broker,
        };
        assert_eq!(
            catch_up(replica, &map(500), deadline).await,
            Ok(Level::Even)
        );
        assert_eq!(broker.asked(), 2);
    }
}
