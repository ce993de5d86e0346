//! Per-key connection counts with a cap: connections of one user, from one address, or not
//! yet upgraded from one address. A taken share is a guard; dropping it gives the share back,
//! and a key whose count falls to zero is forgotten, so the map holds only live keys. An
//! `Admission` bundles the shares one open connection holds.

use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::sync::OwnedSemaphorePermit;

pub struct Quota<K: Hash + Eq> {
    /// 0: no limit (nothing is counted).
    cap: usize,
    counts: DashMap<K, usize>,
}

impl<K: Hash + Eq + Clone> Quota<K> {
    pub fn new(cap: usize) -> Arc<Quota<K>> {
        Arc::new(Quota {
            cap,
            counts: DashMap::new(),
        })
    }

    /// One more connection for `key`, or None if it already has `cap`.
    pub fn take(self: &Arc<Self>, key: K) -> Option<Share<K>> {
        if self.cap == 0 {
            return Some(Quota::unlimited());
        }
        let mut count = self.counts.entry(key.clone()).or_insert(0);
        if *count >= self.cap {
            return None;
        }
        *count += 1;
        drop(count);
        Some(Share(Some((self.clone(), key))))
    }

    /// A share that counts against nothing (for peers a limit does not apply to).
    pub fn unlimited() -> Share<K> {
        Share(None)
    }

    /// Keys with at least one connection.
    #[cfg(test)]
    pub fn keys(&self) -> usize {
        self.counts.len()
    }

    /// Gives back the table's capacity once most of it stands empty (see `shrink_map`).
    pub fn shrink(&self) -> bool {
        crate::registry::shrink_map(&self.counts)
    }

    fn give_back(&self, key: &K) {
        if let Entry::Occupied(mut count) = self.counts.entry(key.clone()) {
            *count.get_mut() -= 1;
            if *count.get() == 0 {
                count.remove();
            }
        }
    }
}

/// One connection's share of a [`Quota`].
pub struct Share<K: Hash + Eq + Clone>(Option<(Arc<Quota<K>>, K)>);

impl<K: Hash + Eq + Clone> Drop for Share<K> {
    fn drop(&mut self) {
        if let Some((quota, key)) = &self.0 {
            quota.give_back(key);
        }
    }
}

/// What an open connection holds against the limits; all of it is given back when it ends.
pub struct Admission {
    _permit: OwnedSemaphorePermit,
    _user: Share<u64>,
    _address: Share<IpAddr>,
}

impl Admission {
    pub fn new(permit: OwnedSemaphorePermit, user: Share<u64>, address: Share<IpAddr>) -> Self {
        Admission {
            _permit: permit,
            _user: user,
            _address: address,
        }
    }

    /// A connection counted against the connection limit alone.
    pub fn permit_only(permit: OwnedSemaphorePermit) -> Admission {
        Admission::new(permit, Quota::unlimited(), Quota::unlimited())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_capped_per_key_and_given_back() {
        let q = Quota::new(2);
        let a1 = q.take("a").unwrap();
        let _a2 = q.take("a").unwrap();
        assert!(q.take("a").is_none());
        let _b = q.take("b").unwrap();
        drop(a1);
        let _a3 = q.take("a").unwrap();
        assert!(q.take("a").is_none());
        assert_eq!(q.keys(), 2);
    }

    #[test]
    fn forgotten_when_the_last_share_goes() {
        let q = Quota::new(3);
        let shares: Vec<_> = (0..3).map(|_| q.take(7u32).unwrap()).collect();
        assert_eq!(q.keys(), 1);
        drop(shares);
        assert_eq!(q.keys(), 0);
    }

    #[test]
    fn an_emptied_table_gives_its_capacity_back() {
        let q = Quota::new(1);
        let shares: Vec<_> = (0..20_000u64).map(|k| q.take(k).unwrap()).collect();
        let full = q.counts.capacity();
        drop(shares);
        assert!(
            q.counts.capacity() > full / 2,
            "a table does not shrink by itself"
        );
        assert!(q.shrink());
        assert!(
            q.counts.capacity() < full / 10,
            "{} of {full}",
            q.counts.capacity()
        );
        assert!(!q.shrink(), "nothing left to give back");
    }

    #[test]
    fn zero_is_no_limit_and_counts_nothing() {
        let q = Quota::new(0);
        let shares: Vec<_> = (0..1000).map(|_| q.take(1u8).unwrap()).collect();
        assert_eq!(q.keys(), 0);
        drop(shares);
    }
}
