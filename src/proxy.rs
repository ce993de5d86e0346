//! Which address a connection comes from, for the per-address limits.
//!
//! The TCP peer is the client unless it is a proxy the operator trusts: only then is
//! `X-Forwarded-For` believed, read from the right (the entry the trusted proxy itself
//! appended) past every other trusted proxy. Anyone can write that header, so believing it
//! from an untrusted peer would let a client pick a fresh address for every connection.

use std::net::IpAddr;

use axum::http::HeaderMap;

/// One address range: an address and how many leading bits must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    addr: IpAddr,
    bits: u8,
}

impl Cidr {
    fn parse(source: &str) -> Result<Cidr, String> {
        let (addr, bits) = match source.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (source, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{source:?} is not an address or CIDR range"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => b
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("{source:?}: prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { addr, bits })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.bits),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.bits),
            _ => false,
        }
    }
}

/// An IPv4 peer accepted on a dual-stack socket shows as `::ffff:a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let (whole, rest) = ((bits / 8) as usize, bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        a[whole] & mask == b[whole] & mask
    }
}

/// The proxies whose `X-Forwarded-For` is believed (`server.trusted_proxies`).
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    pub fn parse(sources: &[String]) -> Result<TrustedProxies, String> {
        sources
            .iter()
            .map(|s| Cidr::parse(s))
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    /// The client's address: the peer itself, or, when the peer is a trusted proxy, the
    /// rightmost `X-Forwarded-For` entry that is not a trusted proxy (the leftmost if all are).
    pub fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.contains(peer) {
            return peer;
        }
        let entries: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        // Walking back from the hop nearest to us; an entry that is not an address ends the
        // walk at the last hop that was one.
        let mut nearest = peer;
        for entry in entries.iter().rev() {
            match entry.trim().parse::<IpAddr>().map(canonical) {
                Ok(ip) if !self.contains(ip) => return ip,
                Ok(ip) => nearest = ip,
                Err(_) => break,
            }
        }
        nearest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn proxies(list: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn ranges() {
        let p = proxies(&["10.0.0.0/8", "192.168.1.7", "fd00::/8", "172.16.0.0/12"]);
        assert!(p.contains(ip("10.200.3.4")));
        assert!(!p.contains(ip("11.0.0.1")));
        assert!(p.contains(ip("192.168.1.7")));
        assert!(!p.contains(ip("192.168.1.8")));
        assert!(p.contains(ip("fd12::1")));
        assert!(p.contains(ip("172.31.255.255")));
        assert!(!p.contains(ip("172.32.0.0")));
        assert!(p.contains(ip("::ffff:10.1.2.3")), "mapped IPv4");
        assert!(proxies(&["0.0.0.0/0"]).contains(ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "fd00::/129", "nope", "10.0.0.0/x", ""] {
            assert!(TrustedProxies::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_for_is_believed_only_from_a_trusted_peer() {
        let p = proxies(&["10.0.0.0/8"]);
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 203.0.113.9, 10.0.0.3"),
        );
        // Untrusted peer: the header is anyone's to write.
        assert_eq!(p.client_address(ip("198.51.100.1"), &h), ip("198.51.100.1"));
        // Trusted: the rightmost entry not itself a trusted proxy; the client-written
        // leftmost entry is not believed.
        assert_eq!(p.client_address(ip("10.0.0.2"), &h), ip("203.0.113.9"));
        // All trusted: the leftmost.
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("10.1.1.1, 10.0.0.3"),
        );
        assert_eq!(p.client_address(ip("10.0.0.2"), &h), ip("10.1.1.1"));
        // Garbage ends the walk at the nearest hop known.
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, junk, 10.0.0.3"),
        );
        assert_eq!(p.client_address(ip("10.0.0.2"), &h), ip("10.0.0.3"));
        // No header: the proxy itself.
        assert_eq!(
            p.client_address(ip("10.0.0.2"), &HeaderMap::new()),
            ip("10.0.0.2")
        );
    }
}
