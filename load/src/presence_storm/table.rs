//! One tenant's presence table as a replica's `/presence?tenant=T` answers it, and the table
//! the storm's clients must make: what a replica has to show to agree with the first one.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Users and their connection counts, and per room its users and their counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct TenantTable {
    #[serde(default)]
    pub users: BTreeMap<String, u64>,
    #[serde(default)]
    pub rooms: BTreeMap<String, BTreeMap<String, u64>>,
}

/// How far one client got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reached {
    /// Not welcomed: it holds no connection.
    Nothing,
    /// Welcomed (so in its user and tenant rooms), but not in the room it asked for.
    Welcomed,
    /// In every room it asked for.
    Joined,
}

/// The `/presence?tenant=T` answer: whether the replica has read the topic up to where it
/// stood at start, and the tenant's table.
#[derive(Debug, Deserialize)]
struct Answer {
    ready: bool,
    #[serde(flatten)]
    table: TenantTable,
}

impl TenantTable {
    /// The table of `tenant` once every client is where it got: each user (distinct per
    /// client) online once, in its own `user:` room and the `tenant:` room, and in the room it
    /// subscribed to if it got there.
    pub fn expected<'a>(
        tenant: &str,
        clients: impl IntoIterator<Item = (&'a str, Option<&'a str>, Reached)>,
    ) -> TenantTable {
        let mut table = TenantTable::default();
        let mut add = |room: String, user: &str| {
            *table
                .rooms
                .entry(room)
                .or_default()
                .entry(user.to_string())
                .or_default() += 1;
        };
        let mut users = BTreeMap::new();
        for (user, room, reached) in clients {
            if reached == Reached::Nothing {
                continue;
            }
            *users.entry(user.to_string()).or_default() += 1;
            add(format!("user:{user}"), user);
            add(format!("tenant:{tenant}"), user);
            if let (Reached::Joined, Some(room)) = (reached, room) {
                add(room.to_string(), user);
            }
        }
        table.users = users;
        table
    }

    /// Room memberships summed over the rooms.
    pub fn memberships(&self) -> usize {
        self.rooms.values().map(|r| r.len()).sum()
    }
}

/// Reads an answer: `Some(table)` when the replica is ready, `None` when it is not yet.
pub fn parse(body: &str) -> Result<Option<TenantTable>, String> {
    let answer: Answer = serde_json::from_str(body).map_err(|e| e.to_string())?;
    Ok(answer.ready.then_some(answer.table))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expected_table_counts_what_each_client_reached() {
        let t = TenantTable::expected(
            "acme",
            [
                ("u0", Some("task:g0"), Reached::Joined),
                ("u1", Some("task:g0"), Reached::Welcomed),
                ("u2", Some("task:g0"), Reached::Nothing),
                ("u3", None, Reached::Joined),
            ],
        );
        assert_eq!(t.users.keys().collect::<Vec<_>>(), ["u0", "u1", "u3"]);
        assert!(t.users.values().all(|&n| n == 1));
        assert_eq!(t.rooms["task:g0"].keys().collect::<Vec<_>>(), ["u0"]);
        assert_eq!(t.rooms["tenant:acme"].len(), 3);
        assert_eq!(t.rooms["user:u1"]["u1"], 1);
        assert!(!t.rooms.contains_key("user:u2"));
        // Three users in their own rooms and the tenant's, one in a group.
        assert_eq!((t.rooms.len(), t.memberships()), (5, 7));
    }

    #[test]
    fn an_answer_agrees_only_when_ready_and_equal() {
        let want = TenantTable::expected("acme", [("u0", Some("task:g0"), Reached::Joined)]);
        let body = r#"{"ready":true,"tenant":"acme","users":{"u0":1},
            "rooms":{"task:g0":{"u0":1},"tenant:acme":{"u0":1},"user:u0":{"u0":1}}}"#;
        assert_eq!(parse(body).unwrap(), Some(want.clone()));
        let partial = r#"{"ready":true,"tenant":"acme","users":{"u0":1},
            "rooms":{"tenant:acme":{"u0":1},"user:u0":{"u0":1}}}"#;
        assert_ne!(parse(partial).unwrap(), Some(want.clone()));
        let twice = body.replace(r#""users":{"u0":1}"#, r#""users":{"u0":2}"#);
        assert_ne!(parse(&twice).unwrap(), Some(want));
        assert_eq!(
            parse(r#"{"ready":false,"tenant":"acme","users":{},"rooms":{}}"#).unwrap(),
            None
        );
        // An unknown tenant, or everyone gone: empty, which is what the closing storm awaits.
        assert_eq!(
            parse(r#"{"ready":true,"tenant":"x","users":{},"rooms":{}}"#).unwrap(),
            Some(TenantTable::default())
        );
        assert!(parse("presence is disabled\n").is_err());
    }
}
