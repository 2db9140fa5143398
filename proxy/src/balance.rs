//! Endpoint choice: power of two choices over the number of requests in
//! flight, so a slow or busy endpoint gets less traffic than round robin
//! would give it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rand::Rng;

use crate::discovery::Endpoint;

#[derive(Default)]
pub struct Balancer {
    in_flight: Mutex<HashMap<SocketAddr, Arc<AtomicUsize>>>,
}

/// Counts a request as in flight on its endpoint until dropped.
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    fn counter(&self, addr: SocketAddr) -> Arc<AtomicUsize> {
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(addr)
            .or_default()
            .clone()
    }

    /// Picks an endpoint (None when there are none) and marks it busy.
    pub fn pick<'a>(&self, endpoints: &'a [Endpoint]) -> Option<(&'a Endpoint, InFlight)> {
        let chosen = match endpoints.len() {
            0 => return None,
            1 => &endpoints[0],
            n => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                let mut b = rng.random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (ea, eb) = (&endpoints[a], &endpoints[b]);
                let la = self.counter(ea.address).load(Ordering::Relaxed);
                let lb = self.counter(eb.address).load(Ordering::Relaxed);
                if lb < la {
                    eb
                } else {
                    ea
                }
            }
        };
        let c = self.counter(chosen.address);
        c.fetch_add(1, Ordering::Relaxed);
        Some((chosen, InFlight(c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_certs::SpiffeId;

    fn ep(port: u16) -> Endpoint {
        Endpoint {
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            spiffe_id: SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap(),
            labels: Default::default(),
        }
    }

    #[test]
    fn prefers_the_less_busy_endpoint() {
        let b = Balancer::default();
        let eps = vec![ep(1), ep(2)];
        // Keep endpoint 1 busy: every later pick must go to endpoint 2.
        for _ in 0..5 {
            b.counter(eps[0].address).fetch_add(1, Ordering::Relaxed);
        }
        for _ in 0..20 {
            let (e, guard) = b.pick(&eps).unwrap();
            assert_eq!(e.address.port(), 2);
            drop(guard);
        }
        assert!(b.pick(&[]).is_none());
    }

    #[test]
    fn spreads_evenly_when_idle() {
        let b = Balancer::default();
        let eps = vec![ep(1), ep(2), ep(3)];
        let mut counts = HashMap::new();
        for _ in 0..3000 {
            let (e, _g) = b.pick(&eps).unwrap();
            *counts.entry(e.address.port()).or_insert(0) += 1;
        }
        for port in 1..=3 {
            let c = counts[&port];
            assert!((800..1200).contains(&c), "endpoint {port} got {c} of 3000");
        }
    }
}
