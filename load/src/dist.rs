//! How connections are spread over rooms, and which room each record is for.
//!
//! Rooms are numbered `0..rooms`. Record `seq` goes to room `seq % rooms` (round robin), so the
//! records one connection must get are exactly `seq = room + k * rooms`, `k = 0, 1, ...`: the
//! receiver keeps one bit per `k` and counts losses and duplicates exactly.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Dist {
    /// Every connection in one room (`task:all`).
    Shared,
    /// Rooms of `n` connections (`task:g<i>`).
    Groups(usize),
    /// One room per connection: its own `user:u<i>` room, joined automatically.
    User,
    /// Each connection joins one of `rooms` rooms (`task:z<r>`), drawn with probability
    /// proportional to `1 / (r + 1)^s`.
    Zipf { s: f64, rooms: Option<usize> },
}

impl Dist {
    pub fn parse(text: &str) -> Result<Dist, String> {
        let mut parts = text.split(':');
        let kind = parts.next().unwrap_or("");
        let arg = parts.next();
        let arg2 = parts.next();
        let bad = || {
            format!("invalid distribution {text:?}: use shared, groups:N, user or zipf:S[:ROOMS]")
        };
        let dist = match (kind, arg, arg2) {
            ("shared", None, None) => Dist::Shared,
            ("user", None, None) => Dist::User,
            ("groups", Some(n), None) => {
                let n: usize = n.parse().map_err(|_| bad())?;
                if n == 0 {
                    return Err(bad());
                }
                Dist::Groups(n)
            }
            ("zipf", Some(s), rooms) => {
                let s: f64 = s.parse().map_err(|_| bad())?;
                if !(s.is_finite() && s >= 0.0) {
                    return Err(bad());
                }
                let rooms = match rooms {
                    None => None,
                    Some(r) => Some(r.parse::<usize>().ok().filter(|r| *r > 0).ok_or_else(bad)?),
                };
                Dist::Zipf { s, rooms }
            }
            _ => return Err(bad()),
        };
        Ok(dist)
    }

    /// The number of rooms for `n` connections.
    pub fn rooms(&self, n: usize) -> usize {
        match self {
            Dist::Shared => 1,
            Dist::Groups(g) => n.div_ceil(*g).max(1),
            Dist::User => n.max(1),
            Dist::Zipf { rooms, .. } => rooms.unwrap_or((n / 10).max(1)),
        }
    }

    /// The room of every connection, `0..n`.
    pub fn assign(&self, n: usize, seed: u64) -> Vec<usize> {
        match self {
            Dist::Shared => vec![0; n],
            Dist::Groups(g) => (0..n).map(|i| i / g).collect(),
            Dist::User => (0..n).collect(),
            Dist::Zipf { s, .. } => {
                let rooms = self.rooms(n);
                let mut cdf = Vec::with_capacity(rooms);
                let mut sum = 0.0;
                for r in 0..rooms {
                    sum += 1.0 / ((r + 1) as f64).powf(*s);
                    cdf.push(sum);
                }
                let mut rng = SplitMix64(seed);
                (0..n)
                    .map(|_| {
                        let x = rng.next_f64() * sum;
                        cdf.partition_point(|c| *c < x).min(rooms - 1)
                    })
                    .collect()
            }
        }
    }

    /// The room a connection asks for with `subscribe`, if any (`user` rooms are automatic).
    pub fn subscribe_room(&self, room: usize) -> Option<String> {
        match self {
            Dist::Shared => Some("task:all".into()),
            Dist::Groups(_) => Some(format!("task:g{room}")),
            Dist::User => None,
            Dist::Zipf { .. } => Some(format!("task:z{room}")),
        }
    }

    /// The JWT subject of connection `i`.
    pub fn user(i: usize) -> String {
        format!("u{i}")
    }

    /// The routing field of a record for `room`: (JSON key, value).
    pub fn record_field(&self, room: usize) -> (&'static str, String) {
        match self {
            Dist::Shared => ("taskId", "all".into()),
            Dist::Groups(_) => ("taskId", format!("g{room}")),
            Dist::User => ("userId", Dist::user(room)),
            Dist::Zipf { .. } => ("taskId", format!("z{room}")),
        }
    }

    /// The room name a record for `room` reaches (for the floor's control line).
    pub fn record_room(&self, room: usize) -> String {
        match self.record_field(room) {
            ("userId", v) => format!("user:{v}"),
            (_, v) => format!("task:{v}"),
        }
    }
}

impl fmt::Display for Dist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dist::Shared => write!(f, "shared"),
            Dist::Groups(n) => write!(f, "groups:{n}"),
            Dist::User => write!(f, "user"),
            Dist::Zipf { s, rooms: None } => write!(f, "zipf:{s}"),
            Dist::Zipf { s, rooms: Some(r) } => write!(f, "zipf:{s}:{r}"),
        }
    }
}

/// A small deterministic generator; statistical quality is ample for drawing rooms.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_assigns() {
        assert_eq!(Dist::parse("shared").unwrap(), Dist::Shared);
        assert_eq!(Dist::parse("groups:10").unwrap(), Dist::Groups(10));
        assert!(Dist::parse("groups:0").is_err());
        assert!(Dist::parse("nope").is_err());
        let g = Dist::Groups(10);
        assert_eq!(g.rooms(1000), 100);
        assert_eq!(g.assign(25, 1)[24], 2);
        let z = Dist::parse("zipf:1.2:50").unwrap();
        let a = z.assign(10_000, 7);
        assert!(a.iter().all(|r| *r < 50));
        let first = a.iter().filter(|r| **r == 0).count();
        let last = a.iter().filter(|r| **r == 49).count();
        assert!(first > 10 * last.max(1), "{first} vs {last}");
        assert_eq!(Dist::User.record_room(7), "user:u7");
        assert_eq!(g.record_room(7), "task:g7");
    }
}
