//! The room registry: which connections are in which rooms, and the reverse.
//!
//! It knows neither Kafka nor WebSocket: a member is any cloneable peer handle, and delivery is
//! a synchronous callback run while the room's shard is read-locked. No guard ever lives across
//! an `.await`, because nothing here is async.
//!
//! Rooms live in a tenant's namespace: the key is built from the tenant and the room name in a
//! way no pair of other names can reproduce, so a record of tenant A can never reach a
//! connection of tenant B whatever the rooms are called.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use crate::pattern::EventFilter;

pub type ConnId = u64;

/// A room's registry key: the tenant's length first, so `("a:b", "c")` and `("a", "b:c")` differ.
fn room_key(tenant: Option<&str>, room: &str) -> Box<str> {
    let tenant = tenant.unwrap_or("");
    let mut len = itoa::Buffer::new();
    let len = len.format(tenant.len());
    // Built by hand: it runs for every room of every record, and `format!` costs twice as much.
    let mut key = String::with_capacity(len.len() + tenant.len() + room.len() + 2);
    key.push_str(len);
    key.push(':');
    key.push_str(tenant);
    key.push('/');
    key.push_str(room);
    key.into_boxed_str()
}

#[derive(Clone)]
struct Member<P> {
    peer: P,
    filter: Option<Arc<EventFilter>>,
}

impl<P> Member<P> {
    fn admits(&self, event: &str) -> bool {
        self.filter.as_ref().is_none_or(|f| f.matches(event))
    }
}

struct Room<P> {
    members: HashMap<ConnId, Member<P>>,
    /// The members as a list that other threads can share, built when a large room is fanned
    /// out and dropped on every change of membership.
    listed: Mutex<Option<MemberList<P>>>,
}

impl<P> Default for Room<P> {
    fn default() -> Self {
        Room {
            members: HashMap::new(),
            listed: Mutex::new(None),
        }
    }
}

impl<P: Clone> Room<P> {
    fn changed(&mut self) {
        *self.listed.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn listed(&self) -> MemberList<P> {
        let mut listed = self.listed.lock().unwrap_or_else(|e| e.into_inner());
        listed
            .get_or_insert_with(|| self.members.iter().map(|(c, m)| (*c, m.clone())).collect())
            .clone()
    }
}

type MemberList<P> = Arc<[(ConnId, Member<P>)]>;

/// A room's members at one moment, shared by the threads that fan a record out to them, and
/// the connections to leave out because the record already reached them through another room.
pub struct Members<P> {
    list: MemberList<P>,
    skip: Arc<HashSet<ConnId>>,
}

impl<P> Clone for Members<P> {
    fn clone(&self) -> Self {
        Members {
            list: self.list.clone(),
            skip: self.skip.clone(),
        }
    }
}

impl<P> Members<P> {
    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Calls `deliver` for the members in `range` whose filter admits `event`, and before
    /// each, `ahead` on the member `AHEAD` places further on in `range` (to prefetch it).
    pub fn for_each_ahead(
        &self,
        range: Range<usize>,
        event: &str,
        ahead: impl Fn(&P),
        mut deliver: impl FnMut(&P),
    ) {
        const AHEAD: usize = 8;
        let end = range.end;
        for i in range {
            if i + AHEAD < end {
                ahead(&self.list[i + AHEAD].1.peer);
            }
            let (conn, member) = &self.list[i];
            if member.admits(event) && !self.skip.contains(conn) {
                deliver(&member.peer);
            }
        }
    }
}

pub struct Registry<P> {
    rooms: DashMap<Box<str>, Room<P>>,
    joined: DashMap<ConnId, HashSet<Box<str>>>,
}

impl<P> Default for Registry<P> {
    fn default() -> Self {
        Registry {
            rooms: DashMap::new(),
            joined: DashMap::new(),
        }
    }
}

impl<P: Clone> Registry<P> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `conn` to a room, or replaces its event filter there. True if it was not a member.
    pub fn join(
        &self,
        conn: ConnId,
        tenant: Option<&str>,
        room: &str,
        peer: &P,
        filter: Option<Arc<EventFilter>>,
    ) -> bool {
        let key = room_key(tenant, room);
        let member = Member {
            peer: peer.clone(),
            filter,
        };
        let fresh = {
            let mut room = self.rooms.entry(key.clone()).or_default();
            room.changed();
            room.members.insert(conn, member).is_none()
        };
        self.joined.entry(conn).or_default().insert(key);
        fresh
    }

    /// Removes `conn` from a room; an emptied room is dropped. True if it was a member. A
    /// connection that is not touches no room: its shard's lock may be held by a long walk.
    pub fn leave(&self, conn: ConnId, tenant: Option<&str>, room: &str) -> bool {
        let key = room_key(tenant, room);
        let was = match self.joined.get_mut(&conn) {
            Some(mut rooms) => rooms.remove(&key),
            None => false,
        };
        was && self.remove_member(&key, conn)
    }

    /// Removes `conn` from every room it is in.
    pub fn leave_all(&self, conn: ConnId) {
        if let Some((_, keys)) = self.joined.remove(&conn) {
            for key in keys {
                self.remove_member(&key, conn);
            }
        }
    }

    fn remove_member(&self, key: &str, conn: ConnId) -> bool {
        match self.rooms.entry(key.into()) {
            Entry::Occupied(mut room) => {
                let was = room.get_mut().members.remove(&conn).is_some();
                room.get_mut().changed();
                if room.get().members.is_empty() {
                    room.remove();
                }
                was
            }
            Entry::Vacant(_) => false,
        }
    }

    /// Calls `deliver` once per connection that is in at least one of `rooms` (of `tenant`)
    /// with a filter admitting `event`. Returns how many connections were reached.
    pub fn for_each_recipient(
        &self,
        tenant: Option<&str>,
        rooms: &[String],
        event: &str,
        mut deliver: impl FnMut(&P),
    ) -> usize {
        let mut reached = 0;
        self.reach(tenant, rooms, event, usize::MAX, |p| {
            reached += 1;
            deliver(p)
        });
        reached
    }

    /// As `for_each_recipient`, except that when the largest room has `large_at` members or
    /// more, its members are returned rather than visited (with those already reached through
    /// another room left out), so the caller can spread them over several threads.
    pub fn reach(
        &self,
        tenant: Option<&str>,
        rooms: &[String],
        event: &str,
        large_at: usize,
        mut deliver: impl FnMut(&P),
    ) -> Option<Members<P>> {
        if let [room] = rooms {
            let room = self.rooms.get(&room_key(tenant, room))?;
            if room.members.len() >= large_at {
                return Some(Members {
                    list: room.listed(),
                    skip: Arc::default(),
                });
            }
            for member in room.members.values().filter(|m| m.admits(event)) {
                deliver(&member.peer);
            }
            return None;
        }
        // The largest room goes last and unchecked against a set: only the members of the
        // other rooms are remembered, so a broadcast room plus a user room costs one small set.
        let keys: Vec<Box<str>> = rooms.iter().map(|r| room_key(tenant, r)).collect();
        let sizes: Vec<usize> = keys
            .iter()
            .map(|k| self.rooms.get(k).map_or(0, |r| r.members.len()))
            .collect();
        let largest = (0..keys.len()).max_by_key(|&i| sizes[i])?;
        let mut seen: HashSet<ConnId> = HashSet::new();
        for (i, key) in keys.iter().enumerate() {
            let Some(room) = self.rooms.get(key).filter(|_| i != largest) else {
                continue;
            };
            for (conn, member) in room.members.iter() {
                if member.admits(event) && seen.insert(*conn) {
                    deliver(&member.peer);
                }
            }
        }
        let room = self.rooms.get(&keys[largest])?;
        if room.members.len() >= large_at {
            return Some(Members {
                list: room.listed(),
                skip: Arc::new(seen),
            });
        }
        for (conn, member) in room.members.iter() {
            if member.admits(event) && !seen.contains(conn) {
                deliver(&member.peer);
            }
        }
        None
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Gives back the room and membership tables' capacity once most of it stands empty: a
    /// hash table never shrinks by itself, and after a burst of connections with hundreds of
    /// rooms each had closed, the empty tables still held hundreds of megabytes. True if
    /// anything shrank.
    pub fn shrink(&self) -> bool {
        shrink_map(&self.rooms) | shrink_map(&self.joined)
    }

    pub fn member_count(&self, tenant: Option<&str>, room: &str) -> usize {
        self.rooms
            .get(&room_key(tenant, room))
            .map_or(0, |room| room.members.len())
    }
}

/// Shrinks `map` when over three quarters of its capacity stand empty (and it is not small).
pub fn shrink_map<K: Eq + std::hash::Hash, V>(map: &DashMap<K, V>) -> bool {
    let worth = worth_shrinking(map.capacity(), map.len());
    if worth {
        map.shrink_to_fit();
    }
    worth
}

/// Whether a table of `capacity` holding `len` gives enough back to be shrunk: over three
/// quarters of it empty, and not small.
pub fn worth_shrinking(capacity: usize, len: usize) -> bool {
    const SMALL: usize = 4096;
    capacity > SMALL && capacity > 4 * len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emptied_tables_give_their_capacity_back() {
        let r = Registry::new();
        for conn in 0..20_000u64 {
            r.join(conn, None, &format!("task:{conn}"), &conn, None);
        }
        let full = r.rooms.capacity();
        assert!(!r.shrink(), "a full table is left alone");
        for conn in 100..20_000u64 {
            r.leave_all(conn);
        }
        let kept = r.rooms.capacity();
        assert!(
            kept > full / 2,
            "a hash table does not shrink by itself ({kept} of {full})"
        );
        assert!(r.shrink());
        assert!(
            r.rooms.capacity() < full / 10,
            "{} of {full}",
            r.rooms.capacity()
        );
        assert!(r.joined.capacity() < full / 10);
        assert_eq!(reached(&r, None, &["task:7"], "e"), [7]);
        assert!(!r.shrink(), "nothing left to give back");
    }

    fn reached(r: &Registry<u64>, tenant: Option<&str>, rooms: &[&str], event: &str) -> Vec<u64> {
        let rooms: Vec<String> = rooms.iter().map(|s| s.to_string()).collect();
        let mut got = Vec::new();
        let n = r.for_each_recipient(tenant, &rooms, event, |p| got.push(*p));
        assert_eq!(n, got.len());
        got.sort();
        got
    }

    #[test]
    fn a_connection_in_several_target_rooms_is_reached_once() {
        let r = Registry::new();
        r.join(1, None, "user:1", &1, None);
        r.join(1, None, "task:9", &1, None);
        r.join(2, None, "task:9", &2, None);
        assert_eq!(reached(&r, None, &["user:1", "task:9"], "e"), [1, 2]);
        assert_eq!(reached(&r, None, &["user:1"], "e"), [1]);
        assert_eq!(reached(&r, None, &["nobody"], "e"), Vec::<u64>::new());
    }

    #[test]
    fn tenants_never_see_each_other() {
        let r = Registry::new();
        r.join(1, Some("a"), "task:1", &1, None);
        r.join(2, Some("b"), "task:1", &2, None);
        r.join(3, None, "task:1", &3, None);
        r.join(4, Some("a:b"), "c", &4, None);
        assert_eq!(reached(&r, Some("a"), &["task:1"], "e"), [1]);
        assert_eq!(reached(&r, Some("b"), &["task:1"], "e"), [2]);
        assert_eq!(reached(&r, None, &["task:1"], "e"), [3]);
        assert_eq!(reached(&r, Some("a"), &["b:c"], "e"), Vec::<u64>::new());
    }

    #[test]
    fn filters_apply_per_membership() {
        let r = Registry::new();
        let only_deleted = Arc::new(EventFilter::parse(&["users.*.deleted".into()]).unwrap());
        r.join(1, None, "feature:users", &1, Some(only_deleted));
        r.join(2, None, "feature:users", &2, None);
        assert_eq!(
            reached(&r, None, &["feature:users"], "users.user.created"),
            [2]
        );
        assert_eq!(
            reached(&r, None, &["feature:users"], "users.user.deleted"),
            [1, 2]
        );
        // Another membership without a filter lets the record through once.
        r.join(1, None, "user:1", &1, None);
        assert_eq!(
            reached(&r, None, &["feature:users", "user:1"], "users.user.created"),
            [1, 2]
        );
    }

    fn split(r: &Registry<u64>, rooms: &[&str], min: usize) -> Option<(Vec<u64>, Vec<u64>)> {
        let rooms: Vec<String> = rooms.iter().map(|s| s.to_string()).collect();
        let mut direct = Vec::new();
        let members = r.reach(None, &rooms, "e", min, |p| direct.push(*p))?;
        let mut listed = Vec::new();
        members.for_each_ahead(0..members.len(), "e", |_| {}, |p| listed.push(*p));
        direct.sort();
        listed.sort();
        Some((direct, listed))
    }

    #[test]
    fn a_part_looks_ahead_only_within_itself_and_delivers_the_same() {
        let r = Registry::new();
        for conn in 0..20u64 {
            r.join(conn, None, "big", &conn, None);
        }
        let members = r.reach(None, &["big".to_string()], "e", 2, |_| {}).unwrap();
        let ahead = std::cell::RefCell::new(Vec::new());
        let mut delivered = Vec::new();
        members.for_each_ahead(
            4..15,
            "e",
            |p| ahead.borrow_mut().push(*p),
            |p| delivered.push(*p),
        );
        let mut plain = Vec::new();
        members.for_each_ahead(4..15, "e", |_| {}, |p| plain.push(*p));
        assert_eq!(delivered, plain);
        assert_eq!(delivered.len(), 11);
        // Each looked-ahead member is one the same part delivers to later, once.
        let ahead = ahead.into_inner();
        assert_eq!(ahead, delivered[delivered.len() - ahead.len()..]);
        assert_eq!(ahead.len(), 11 - 8);
    }

    #[test]
    fn a_large_room_is_split_from_the_others_and_listed_afresh_after_every_change() {
        let r = Registry::new();
        r.join(1, None, "big", &1, None);
        assert_eq!(split(&r, &["big"], 2), None);
        r.join(2, None, "big", &2, None);
        assert_eq!(split(&r, &["big"], 2), Some((vec![], vec![1, 2])));
        r.join(3, None, "big", &3, None);
        r.leave(1, None, "big");
        assert_eq!(split(&r, &["big"], 2), Some((vec![], vec![2, 3])));
        // Members reached through a smaller room are not reached again through the large one.
        r.join(3, None, "small", &3, None);
        r.join(4, None, "small", &4, None);
        assert_eq!(
            split(&r, &["small", "big", "none"], 2),
            Some((vec![3, 4], vec![2]))
        );
        assert_eq!(split(&r, &["small", "big"], 3), None);
        assert_eq!(reached(&r, None, &["small", "big"], "e"), [2, 3, 4]);
    }

    #[test]
    fn empty_rooms_are_removed() {
        let r = Registry::new();
        assert!(r.join(1, None, "a", &1, None));
        assert!(!r.join(1, None, "a", &1, None));
        r.join(1, None, "b", &1, None);
        r.join(2, None, "b", &2, None);
        assert_eq!(r.room_count(), 2);
        assert!(r.leave(1, None, "a"));
        assert!(!r.leave(1, None, "a"));
        assert_eq!(r.room_count(), 1);
        r.leave_all(1);
        assert_eq!(r.member_count(None, "b"), 1);
        r.leave_all(2);
        assert_eq!(r.room_count(), 0);
    }
}
