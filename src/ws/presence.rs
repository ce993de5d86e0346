//! Presence events to the connections that listen (docs/PRESENCE.md): the hub as the
//! presence table's `Audience`.
//!
//! A join or leave goes to the room's presence listeners; online and offline to those of
//! the tenant's status room. Each event is encoded once and handed to every listener at low
//! priority: behind a long queue it is shed rather than let a storm of connects close slow
//! connections with 4008. A client that needs the whole picture asks with a query.

use super::outbox::{Delivery, Handover};
use super::{protocol, Hub};
use crate::presence::counts::Key;
use crate::presence::live::Audience;
use crate::presence::table::Transition;
use crate::route::Priority;

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
            // Its online and offline say the same of the status room, which every connection
            // of the tenant is in from its welcome on.
            Some(room) if status_room.as_ref() == Some(room) => return,
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
        self.listeners
            .for_each_recipient(tenant, &[room], event, |peer| {
                let result = match peer.hand_over(&frame, Priority::Low, Handover::Queue) {
                    Delivery::Accepted => 0,
                    Delivery::Shed => 1,
                    Delivery::Overflow | Delivery::Closed => 2,
                };
                results[result] += 1;
            });
        for (label, n) in ["sent", "shed", "closed"].into_iter().zip(results) {
            if n > 0 {
                let counter = self.metrics.presence_events.with_label_values(&[label]);
                counter.inc_by(n);
            }
        }
    }
}
