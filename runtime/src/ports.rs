//! Loopback ports for child processes that must be told their address before
//! they start (`weft up`, the end-to-end tests).
//!
//! A port the kernel hands out for `bind(127.0.0.1:0)` lies in the ephemeral
//! range, where any outgoing connection on the machine may take it between our
//! release and the child's own bind ("Address already in use"). Ports below
//! (or above) that range are only ever taken by an explicit bind, so we pick
//! there and check that the port is free now.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use rand::Rng;

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`), or
/// Linux's default when it cannot be read.
pub fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// A free loopback address outside the ephemeral range. `claim(port)` is asked
/// first and may refuse a port (already handed to someone else in this run);
/// a refused or busy port is skipped. Falls back to a kernel-chosen port when
/// no range outside the ephemeral one is left.
pub fn pick_loopback_addr(mut claim: impl FnMut(u16) -> bool) -> std::io::Result<SocketAddr> {
    let (lo, hi) = ephemeral_range();
    // Stay clear of well-known and commonly configured ports below 10000.
    let (start, end) = if lo > 11_000 { (10_000u16, lo - 1) } else { (hi.saturating_add(1), 65_535) };
    if end > start {
        let span = u32::from(end - start) + 1;
        let first = rand::rng().random_range(0..span);
        for i in 0..span {
            let port = start + ((first + i) % span) as u16;
            if claim(port) && TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
            }
        }
    }
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn picks_distinct_free_ports_outside_the_ephemeral_range() {
        let (lo, hi) = ephemeral_range();
        let mut given = HashSet::new();
        let mut returned = HashSet::new();
        for _ in 0..50 {
            let addr = pick_loopback_addr(|p| given.insert(p)).unwrap();
            assert!(addr.ip().is_loopback());
            assert!(!(lo..=hi).contains(&addr.port()), "{addr} is in the ephemeral range {lo}-{hi}");
            assert!(returned.insert(addr.port()), "{addr} handed out twice");
        }
    }

    #[test]
    fn skips_a_port_that_is_in_use() {
        let held = pick_loopback_addr(|_| true).unwrap();
        let _listener = TcpListener::bind(held).unwrap();
        let mut asked = Vec::new();
        // Only the busy port and its neighbour are on offer.
        let addr = pick_loopback_addr(|p| {
            asked.push(p);
            p == held.port() || p == held.port().wrapping_add(1)
        })
        .unwrap();
        assert!(asked.contains(&held.port()), "the busy port was never considered");
        assert_ne!(addr, held);
    }
}
