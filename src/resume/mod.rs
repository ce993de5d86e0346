//! Resume: a client that reconnects with its positions gets exactly what it missed. This
//! module owns the plan (what the client has, the cut, what it would have received) and
//! `gather`, which serves the gap from the replay buffer (`buffer.rs`) where it covers it and
//! else reads it back through [`History`], which `kafka/` implements: resume does not know
//! Kafka. `lag.rs` holds a resume on a replica that has not read as far as the client.

pub mod buffer;
pub mod lag;

use std::future::Future;

use crate::frame::Frame;
use crate::position::{parse_partition_key, PositionMap};
use crate::ws::protocol::{RequestId, Source};
pub use buffer::{Entry, Limits, Lookup, ReplayBuffer, Selection};

/// Reading a partition back from the log itself, for the part of a gap the buffer no longer
/// holds.
pub trait History {
    /// The selected frames of `topic`/`partition` with offsets in `(after, upto]`.
    fn read(
        &self,
        topic: &str,
        partition: i32,
        after: i64,
        upto: i64,
        selection: &Selection,
    ) -> impl Future<Output = Result<Vec<Frame>, HistoryError>> + Send;
}

/// Why a gap cannot be read back; the client is told to `resync`.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("older than the replayable window")]
    TooOld,
    #[error("more than {0} records to replay")]
    TooMany(i64),
    #[error("kafka unavailable: {0}")]
    Kafka(String),
}

/// A resume, decided by the session and carried out by its writer, in stream order.
#[derive(Debug)]
pub struct ResumePlan {
    /// The request's id; None for an implicit resume (a client that opted in but sent
    /// something else first), which gets no `ok`.
    pub id: Option<RequestId>,
    /// What the client has: everything up to these offsets.
    pub after: PositionMap,
    /// The cut taken when the rooms were joined: live delivery covers what comes after it.
    pub cut: PositionMap,
    pub selection: Selection,
    pub rooms: Vec<String>,
    /// Who asked, for the log.
    pub conn: u64,
    pub user: String,
}

#[derive(Debug)]
pub enum Replayed {
    Frames {
        frames: Vec<Frame>,
        /// Nothing, memory or Kafka; never resync.
        source: Source,
    },
    /// The gap cannot be replayed; the reason is for the client.
    Resync(String),
}

/// Gathers, partition by partition and in offset order, every record of `(after, cut]` the
/// plan's selection admits: from memory where the buffer covers the range, else from Kafka.
pub async fn gather(buffer: &ReplayBuffer, history: &impl History, plan: &ResumePlan) -> Replayed {
    let mut frames = Vec::new();
    let mut source = Source::Nothing;
    for (key, &upto) in &plan.cut {
        let Some((topic, partition)) = parse_partition_key(key) else {
            continue;
        };
        // A partition the client has never heard of is replayed from its beginning.
        let after = plan.after.get(key).copied().unwrap_or(-1).max(-1);
        // The session has waited for this replica wherever the log holds `after` (lag.rs):
        // still past the cut, the log itself ends before it.
        if after > upto {
            return Replayed::Resync(format!(
                "{key}: position {after} is ahead of the log ({upto}); the topic was recreated"
            ));
        }
        if after == upto {
            continue;
        }
        match buffer.lookup(topic, partition, after, upto, &plan.selection) {
            Lookup::Hit(mut f) => {
                frames.append(&mut f);
                if source == Source::Nothing {
                    source = Source::Memory;
                }
            }
            Lookup::Miss { start } => {
                tracing::debug!(key, after, upto, start, "replay buffer miss");
                match history
                    .read(topic, partition, after, upto, &plan.selection)
                    .await
                {
                    Ok(mut f) => {
                        frames.append(&mut f);
                        source = Source::Kafka;
                    }
                    Err(e) => return Replayed::Resync(format!("{key}: {e}")),
                }
            }
        }
    }
    Replayed::Frames { frames, source }
}
