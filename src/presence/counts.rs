//! What presence counts: a user's connections, and a user's connections in a room, each in
//! its tenant's namespace.
//!
//! The tenant is a field of the key, never spelled into a string with the room, so `task:9`
//! of one tenant and `task:9` of another can never meet.

use std::collections::BTreeMap;

/// A tenant's namespace; `None` holds the connections whose token names no tenant.
pub type Tenant = Option<String>;

/// One count's key. Ordered by tenant, then a user's own count (`room: None`) before the
/// rooms, so that a record groups its counts per tenant and per room as it walks them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub tenant: Tenant,
    /// `None`: the user's connections, whatever rooms they are in (online while above zero);
    /// a room: the user's connections in it (in the room while above zero).
    pub room: Option<String>,
    pub user: String,
}

impl Key {
    pub fn user(tenant: Option<&str>, user: &str) -> Key {
        Key {
            tenant: tenant.map(str::to_string),
            room: None,
            user: user.to_string(),
        }
    }

    pub fn member(tenant: Option<&str>, room: &str, user: &str) -> Key {
        Key {
            room: Some(room.to_string()),
            ..Key::user(tenant, user)
        }
    }

    /// The first key of a room's members in the order of keys.
    pub(super) fn room_start(tenant: Option<&str>, room: &str) -> Key {
        Key::member(tenant, room, "")
    }

    pub fn same_room(&self, other: &Key) -> bool {
        self.tenant == other.tenant && self.room == other.room
    }
}

/// Counts by key. In a change set, 0 means gone; a state holds no zero.
pub type Counts = BTreeMap<Key, u32>;
