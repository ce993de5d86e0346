//! Presence events to the connections that listen (docs/PRESENCE.md): the hub as the
//! presence table's `Audience`.
//!
//! A join or leave goes to the room's presence listeners; online and offline to those of
//! the tenant's status room. Each event is encoded once and handed to every listener at low
//! priority: behind a long queue it is shed rather than let a storm of connects close slow
//! connections with 4008. A client that needs the whole picture asks with a query.

use super::outbox::{Delivery, Handover, Peer};
use super::{protocol, Hub};
use crate::presence::counts::Key;
use crate::presence::live::Audience;
use crate::presence::table::Transition;
use crate::route::Priority;

/// Listeners from which a room is walked from a list rather than under its shard's lock.
const LARGE: usize = 256;

fn is_tenant_room(tenant: Option<&str>, room: &str) -> bool {
    tenant.is_some_and(|t| crate::auth::tenant_room(t) == room)
}

impl Audience for Hub {
    fn tell(&self, transitions: &[Transition]) {
        let ts = crate::unix_millis();
        for transition in transitions {
            let (key, came) = match transition {
                Transition::Came(key) => (key, true),
                Transition::Went(key) => (key, false),
            };
            self.tell_one(key, came, ts);
        }
    }
}

impl Hub {
    fn tell_one(&self, key: &Key, came: bool, ts: i64) {
        let tenant = key.tenant.as_deref();
        let status_room = self.config.presence.status_room_of(tenant);
        let (room, event, named) = match &key.room {
            // Where the status room is the tenant's own room, which every connection of the
            // tenant is in from its welcome on, its online and offline say the same.
            Some(room) if status_room.as_ref() == Some(room) && is_tenant_room(tenant, room) => {
                return
            }
            Some(room) => {
                let event = if came {
                    "presence.join"
                } else {
                    "presence.leave"
                };
                (room.clone(), event, Some(room.as_str()))
            }
            None => {
                let Some(room) = status_room else {
                    return;
                };
                let event = if came {
                    "presence.online"
                } else {
                    "presence.offline"
                };
                (room, event, None)
            }
        };
        if self.listeners.member_count(tenant, &room) == 0 {
            return;
        }
        let frame = protocol::presence_event(event, ts, named, &key.user);
        let mut results = [0u64; 3];
        let mut deliver = |peer: &Peer| {
            let result = match peer.hand_over(&frame, Priority::Low, Handover::Queue) {
                Delivery::Accepted => 0,
                Delivery::Shed => 1,
                Delivery::Overflow | Delivery::Closed => 2,
            };
            results[result] += 1;
        };
        // A large room's members are walked from a shared list, not under its shard's lock:
        // a connection joining a room of that shard meanwhile does not wait for the walk.
        let rooms = [room];
        let large = self
            .listeners
            .reach(tenant, &rooms, event, LARGE, &mut deliver);
        if let Some(members) = large {
            members.for_each_ahead(0..members.len(), event, Peer::prefetch, &mut deliver);
        }
        for (label, n) in ["sent", "shed", "closed"].into_iter().zip(results) {
            if n > 0 {
                let counter = self.metrics.presence_events.with_label_values(&[label]);
                counter.inc_by(n);
            }
        }
    }
}
