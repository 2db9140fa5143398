//! Endpoint choice and outlier detection.
//!
//! Power of two choices over a cost of EWMA latency × (requests in flight +
//! 1), so slow or busy endpoints get less traffic than round robin would give
//! them. Two costs within [`TIE`] of each other are a tie, broken at random:
//! identical replicas differ only by noise, and a strict comparison would send
//! everything to whichever measured a hair faster (with two endpoints P2C
//! always compares both). From [`TIE`] to [`STRICT`] the cheaper one is ever
//! likelier to be chosen, beyond it always ([`prefer_cheaper`]).
//!
//! The latency is the endpoint's answer time: from the request handed to a
//! pooled connection to its response headers, never the connection's set-up
//! (an endpoint passed over has its idle connection closed, and its next
//! request would pay a handshake and look slow again). Answers that say
//! nothing of speed (429, 403, a local limit) leave the estimate alone.
//!
//! A new endpoint, or one back from ejection, starts from its peers' median
//! estimate (neutral, not an optimistic or stale one) and ramps up over
//! [`SLOW_START`]. An endpoint failing [`EJECT_AFTER`] times in a row is
//! ejected for a growing interval; when it lapses the endpoint gets no
//! traffic until a probe ([`probes_due`], run by the outbound) says it
//! answers again; a failed probe extends the ejection. Never all endpoints
//! at once.
//!
//! weft's own rather than `tower::balance`: tower's P2C has no outlier
//! ejection, and its endpoints carry no identity to verify.
//!
//! A failed request's latency never lowers an endpoint's estimate: a replica
//! that fails fast (a 503 or a gRPC UNAVAILABLE in a millisecond) would
//! otherwise look like the fastest and draw more traffic, not less. The statistics
//! are per-endpoint state ([`super::endpoints::EndpointState`]): they outlive config
//! swaps and leave with the endpoint.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;

pub use super::endpoint_stats::{BASE_EJECTION, EJECT_AFTER, MAX_EJECTION, SLOW_START};
use super::endpoints::{Endpoint, EndpointState};
use super::routes::Candidates;

/// Cost ratio under which two endpoints count as equal (random choice).
pub const TIE: f64 = 1.25;
/// Cost ratio from which the cheaper endpoint is always chosen; between
/// [`TIE`] and this, it is chosen with a probability rising from 1/2 to 1.
pub const STRICT: f64 = 2.0;

/// A request in flight on an endpoint; report its outcome with [`InFlight::done`].
pub struct InFlight {
    state: Arc<EndpointState>,
    addr: SocketAddr,
    start: Instant,
}

impl InFlight {
    /// Records latency and success; returns true when this ejected the endpoint.
    pub fn done(self, ok: bool) -> bool {
        let latency = self.elapsed();
        self.done_after(latency, ok)
    }

    /// Starts the latency clock again: the request is handed to its
    /// connection now (what came before was connection set-up).
    pub fn sent(&mut self) {
        self.start = Instant::now();
    }

    /// How long since the endpoint was picked (or [`InFlight::sent`]).
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Records latency (measured earlier: a gRPC call's time to its
    /// response headers) and success, now that the outcome is known; returns
    /// true when this ejected the endpoint.
    pub fn done_after(self, latency: Duration, ok: bool) -> bool {
        let ejected = self.state.stats.observe(latency, ok, Instant::now());
        self.warn_if(ejected)
    }

    /// Records success only, not latency: for answers that come at once
    /// whatever the endpoint's speed (a 429 or 403). Returns true when this
    /// ejected the endpoint.
    pub fn done_without_latency(self, ok: bool) -> bool {
        let ejected = self.state.stats.observe_outcome_only(ok, Instant::now());
        self.warn_if(ejected)
    }

    /// Records success only and keeps the endpoint counted in flight until
    /// this drops: for a TCP tunnel, whose set-up time says nothing of the
    /// app's answer time, and which is load on the endpoint while it is
    /// open. Returns true when this ejected the endpoint.
    pub fn outcome(&self, ok: bool) -> bool {
        let ejected = self.state.stats.observe_outcome_only(ok, Instant::now());
        self.warn_if(ejected)
    }

    fn warn_if(&self, ejected: bool) -> bool {
        if ejected {
            tracing::warn!(endpoint = %self.addr, "endpoint ejected after consecutive failures; it will be probed before it gets traffic again");
        }
        ejected
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Picks an endpoint (None when there are none) and marks it busy.
pub fn pick<'a>(endpoints: &[&'a Endpoint]) -> Option<(&'a Endpoint, InFlight)> {
    let now = Instant::now();
    seed_unmeasured(endpoints, now);
    // Inline: a collected Vec was an allocation per request.
    let healthy: Candidates<'a> = endpoints.iter().copied().filter(|e| e.state.stats.available(now)).collect();
    // Never eject everything: with no healthy endpoint, use them all.
    let pool: &[&'a Endpoint] = if healthy.is_empty() { endpoints } else { &healthy };
    let ep = match pool.len() {
        0 => return None,
        1 => pool[0],
        n => {
            let mut rng = rand::rng();
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (ca, cb) = (pool[a].state.stats.cost(now), pool[b].state.stats.cost(now));
            let (cheap, dear) = if ca <= cb { (pool[a], pool[b]) } else { (pool[b], pool[a]) };
            if rng.random_bool(prefer_cheaper(ca.min(cb), ca.max(cb))) {
                cheap
            } else {
                dear
            }
        }
    };
    ep.state.stats.in_flight.fetch_add(1, Ordering::Relaxed);
    Some((ep, InFlight { state: ep.state.clone(), addr: ep.address, start: now }))
}

/// The probability of choosing the cheaper of two endpoints, costs `lo` ≤
/// `hi`: 1/2 within [`TIE`], rising linearly to 1 at [`STRICT`]. Not a
/// strict comparison below that: one request at a time nothing is in
/// flight and the costs are latency alone, and an endpoint passed over on
/// latency noise (a loaded host) got slower still from being idle (its
/// sidecar's threads parked, its connection cold) and was starved (a loaded
/// run: 567 to 2433 between identical replicas with a strict comparison
/// above 25 %).
fn prefer_cheaper(lo: f64, hi: f64) -> f64 {
    let ratio = if hi <= 0.0 {
        1.0
    } else if lo <= 0.0 {
        f64::INFINITY
    } else {
        hi / lo
    };
    0.5 + 0.5 * ((ratio - TIE) / (STRICT - TIE)).clamp(0.0, 1.0)
}

/// Gives endpoints with no sample yet the median of their measured peers'
/// estimates (left as they are while no peer has been measured).
fn seed_unmeasured(endpoints: &[&Endpoint], now: Instant) {
    if !endpoints.iter().any(|e| e.state.stats.unmeasured()) {
        return;
    }
    let mut measured: Vec<f64> = endpoints
        .iter()
        .filter(|e| !e.state.stats.unmeasured() && e.state.stats.available(now))
        .map(|e| e.state.stats.estimate(now))
        .collect();
    if measured.is_empty() {
        return;
    }
    measured.sort_by(f64::total_cmp);
    let median = measured[measured.len() / 2];
    for e in endpoints {
        e.state.stats.seed(median, now);
    }
}

/// The endpoints whose ejection has lapsed and that now need a probe, each
/// claimed for one caller: it must run the probe and report it with
/// [`probed`].
pub fn probes_due<'a>(endpoints: &[&'a Endpoint]) -> Vec<&'a Endpoint> {
    let now = Instant::now();
    endpoints.iter().copied().filter(|e| e.state.stats.claim_probe(now)).collect()
}

/// A probe's outcome: healthy brings `ep` back (neutral estimate, slow
/// start); unhealthy ejects it again for longer.
pub fn probed(ep: &EndpointState, healthy: bool) {
    ep.stats.probed(healthy, Instant::now());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::endpoint_stats::EndpointStats;
    use std::collections::HashMap;
    use weft_certs::SpiffeId;

    fn ep(port: u16) -> Endpoint {
        // Endpoints first seen together start equal.
        static SEEN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let seen = *SEEN.get_or_init(Instant::now);
        Endpoint {
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            spiffe_id: Arc::new(SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap()),
            labels: Default::default(),
            state: Arc::new(EndpointState::new(&Default::default(), seen)),
        }
    }

    #[test]
    fn prefers_the_less_busy_endpoint() {
        let eps = [ep(1), ep(2)];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let _busy: Vec<_> = (0..5).map(|_| eps[0].state.stats.in_flight.fetch_add(1, Ordering::Relaxed)).collect();
        for _ in 0..20 {
            let (e, _g) = pick(&refs).unwrap();
            assert_eq!(e.address.port(), 2);
        }
        assert!(pick(&[]).is_none());
    }

    #[test]
    fn prefers_the_faster_endpoint() {
        let eps = [ep(1), ep(2)];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let now = Instant::now() + Duration::from_secs(1);
        eps[0].state.stats.observe(Duration::from_millis(200), true, now);
        eps[1].state.stats.observe(Duration::from_millis(2), true, now);
        let fast = (0..100).filter(|_| pick(&refs).unwrap().0.address.port() == 2).count();
        assert_eq!(fast, 100, "with two endpoints P2C always compares both");
    }

    #[test]
    fn a_fast_failure_does_not_make_an_endpoint_look_fast() {
        let eps = [ep(1), ep(2)];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let (good, bad) = (&eps[0].state.stats, &eps[1].state.stats);
        let ewma = |s: &EndpointStats| s.ewma.lock().unwrap().value;
        // Both measured at 5 ms for a while.
        let mut t = Instant::now() + Duration::from_secs(1);
        for _ in 0..100 {
            t += Duration::from_millis(500);
            good.observe(Duration::from_millis(5), true, t);
            bad.observe(Duration::from_millis(5), true, t);
        }
        let before = ewma(bad);
        // Then good answers in 5 ms and bad fails in 0.1 ms, for seconds.
        for _ in 0..(EJECT_AFTER - 1) {
            t += Duration::from_secs(2);
            good.observe(Duration::from_millis(5), true, t);
            bad.observe(Duration::from_micros(100), false, t);
        }
        assert!(ewma(bad) >= before, "fast failures lowered the estimate: {before} -> {}", ewma(bad));
        // Before this rule, bad's estimate fell toward 0.1 ms and P2C sent it everything.
        let bad_share = (0..100).filter(|_| pick(&refs).unwrap().0.address.port() == 2).count();
        assert!(ewma(bad) > 0.004, "bad looks faster than it ever answered: {} s ({bad_share} of 100)", ewma(bad));
    }

    #[test]
    fn an_endpoint_passed_over_is_tried_again() {
        let eps = [ep(1), ep(2)];
        let t0 = Instant::now();
        let (one, two) = (&eps[0].state.stats, &eps[1].state.stats);
        // A slow sample on endpoint 2 (say, its first connection's
        // handshake), then steady fast traffic on endpoint 1 only.
        let t1 = t0 + Duration::from_secs(10);
        two.observe(Duration::from_millis(5), true, t1);
        let mut t = t1;
        for _ in 0..200 {
            t += Duration::from_millis(100);
            one.observe(Duration::from_millis(1), true, t);
        }
        assert!(one.cost(t1) < two.cost(t1), "endpoint 1 is the faster");
        assert!(two.cost(t) < one.cost(t), "20 s later endpoint 2 is worth a try again");
    }

    #[test]
    fn spreads_evenly_when_idle() {
        let eps = [ep(1), ep(2), ep(3)];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let mut counts = HashMap::new();
        for _ in 0..3000 {
            let (e, _g) = pick(&refs).unwrap();
            *counts.entry(e.address.port()).or_insert(0) += 1;
        }
        for port in 1..=3 {
            let c = counts[&port];
            assert!((700..1300).contains(&c), "endpoint {port} got {c} of 3000");
        }
    }

    #[test]
    fn ejects_after_consecutive_failures_and_brings_back() {
        let eps = [ep(1), ep(2)];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let s = &eps[0].state.stats;
        let t0 = Instant::now();
        for i in 1..EJECT_AFTER {
            assert!(!s.observe(Duration::from_millis(1), false, t0), "not yet at failure {i}");
        }
        assert!(s.observe(Duration::from_millis(1), false, t0));
        assert!(s.ejected(t0));
        for _ in 0..50 {
            assert_eq!(pick(&refs).unwrap().0.address.port(), 2, "ejected endpoint gets no traffic");
        }
        assert!(!s.ejected(t0 + BASE_EJECTION + Duration::from_millis(1)), "brought back after the interval");
        // The second ejection lasts longer.
        for _ in 0..EJECT_AFTER {
            s.observe(Duration::from_millis(1), false, t0);
        }
        assert!(s.ejected(t0 + BASE_EJECTION + Duration::from_millis(1)));
        // Long healthy after its ejection, the endpoint's history is forgiven.
        let later = t0 + MAX_EJECTION * 3;
        s.observe(Duration::from_millis(1), true, later);
        assert_eq!(s.ejections.load(Ordering::Relaxed), 0);
        // With every endpoint ejected, traffic still flows.
        let only = [&eps[0]];
        assert!(pick(&only).is_some());
    }

    #[test]
    fn the_cheaper_endpoint_is_ever_likelier_up_to_strict() {
        assert_eq!(prefer_cheaper(1.0, 1.2), 0.5);
        assert!((prefer_cheaper(1.0, (TIE + STRICT) / 2.0) - 0.75).abs() < 1e-9);
        assert_eq!(prefer_cheaper(1.0, STRICT), 1.0);
        assert_eq!(prefer_cheaper(1.0, 100.0), 1.0);
        assert_eq!(prefer_cheaper(0.0, 0.0), 0.5, "both idle and unmeasured: a coin toss");
        assert_eq!(prefer_cheaper(0.0, 1.0), 1.0);
        // A replica 1.5 times slower is not starved: about 1 in 3.
        let eps = [ep(1), ep(2)];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let t = Instant::now() + SLOW_START;
        eps[0].state.stats.observe(Duration::from_micros(1000), true, t);
        eps[1].state.stats.observe(Duration::from_micros(1500), true, t);
        let slow = (0..3000).filter(|_| pick(&refs).unwrap().0.address.port() == 2).count();
        assert!((700..1300).contains(&slow), "the slower endpoint got {slow} of 3000");
    }

    #[test]
    fn near_equal_endpoints_split_evenly_even_one_at_a_time() {
        // One request at a time (nothing in flight at each pick), estimates
        // a hair apart: a strict comparison sent all 1000 to endpoint 1.
        let eps = [ep(1), ep(2)];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let t = Instant::now() + SLOW_START;
        eps[0].state.stats.observe(Duration::from_micros(1000), true, t);
        eps[1].state.stats.observe(Duration::from_micros(1100), true, t);
        let ones = (0..1000).filter(|_| pick(&refs).unwrap().0.address.port() == 1).count();
        assert!((400..600).contains(&ones), "endpoint 1 got {ones} of 1000");
    }

    #[test]
    fn a_new_endpoint_starts_from_its_peers_median_and_ramps_up() {
        let eps = [ep(1), ep(2), ep(3)];
        let now = Instant::now();
        for (e, ms) in eps.iter().zip([2, 4]) {
            e.state.stats.observe(Duration::from_millis(ms), true, now);
        }
        // A stale high estimate would starve it, an optimistic one flood it.
        let fresh = Endpoint { state: Arc::new(EndpointState::new(&Default::default(), now)), ..ep(4) };
        let all: Vec<&Endpoint> = eps.iter().take(2).chain([&fresh]).collect();
        seed_unmeasured(&all, now);
        let est = fresh.state.stats.estimate(now);
        assert!((0.0039..0.0041).contains(&est), "seeded {est} s, want the median 4 ms");
        // Slow start: twice the cost at first, its peers' after the window.
        assert!((fresh.state.stats.ramp(now) - 2.0).abs() < 1e-9);
        assert!((fresh.state.stats.ramp(now + SLOW_START / 2) - 1.5).abs() < 1e-6);
        assert_eq!(fresh.state.stats.ramp(now + SLOW_START * 2), 1.0);
        // With no measured peer it keeps the optimistic default until measured.
        let lone = ep(5);
        seed_unmeasured(&[&lone], now);
        assert!(lone.state.stats.unmeasured());
    }

    #[test]
    fn an_ejected_endpoint_gets_traffic_only_after_a_probe_passes() {
        let eps = [ep(1), ep(2)];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let s = &eps[0].state.stats;
        let t0 = Instant::now();
        for _ in 0..EJECT_AFTER {
            s.observe(Duration::from_millis(1), false, t0);
        }
        assert!(probes_due(&refs).is_empty(), "no probe while the ejection lasts");
        // The ejection lapses: still no traffic, one probe is due, once.
        let lapsed = t0 + BASE_EJECTION + Duration::from_millis(1);
        assert!(!s.available(lapsed));
        assert!(s.claim_probe(lapsed));
        assert!(!s.claim_probe(lapsed), "one probe at a time");
        // A failed probe ejects it again, for longer.
        s.probed(false, lapsed);
        assert!(s.ejected(lapsed + BASE_EJECTION * 2 - Duration::from_millis(10)));
        let later = lapsed + BASE_EJECTION * 2 + Duration::from_millis(1);
        assert!(!s.available(later) && s.claim_probe(later));
        // A passing probe brings it back, unmeasured (its old estimate is stale) and in slow start.
        s.probed(true, later);
        assert!(s.available(later) && s.unmeasured());
        assert!((s.ramp(later) - 2.0).abs() < 1e-9);
    }
}
