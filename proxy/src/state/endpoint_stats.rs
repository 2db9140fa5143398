//! An endpoint's statistics for the balancer and outlier detection: an
//! EWMA latency estimate, requests in flight, consecutive failures, the
//! ejection they lead to, the probe that must pass before the endpoint gets
//! traffic again, and the slow start after it (or after it first appears).
//! Kept per endpoint ([`super::endpoints`]), read by the balancer
//! ([`super::balance`]).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Consecutive failures that eject an endpoint.
pub const EJECT_AFTER: u32 = 5;
/// First ejection; each later one (or failed probe) doubles, up to `MAX_EJECTION`.
pub const BASE_EJECTION: Duration = Duration::from_secs(2);
/// The longest ejection.
pub const MAX_EJECTION: Duration = Duration::from_secs(60);
/// How long a new endpoint (or one back from ejection) ramps up: its cost
/// starts at twice its peers' and falls to theirs over this window, as
/// Envoy's `slow_start_window` does.
pub const SLOW_START: Duration = Duration::from_secs(3);
/// EWMA time constant: the estimate decays toward zero with this constant
/// while an endpoint gets no sample and has nothing in flight, and a sample after a gap of `dt`
/// weighs `1 - e^(-dt/DECAY)`. Short (Linkerd uses 10 s) because with
/// little concurrency P2C compares latency alone: one noisy sample on a
/// busy host starves an identical replica until its estimate decays back
/// into the tie band (CI, one request at a time: 2835 to 165 at 10 s).
const DECAY: Duration = Duration::from_secs(1);
/// The least weight of one sample: an endpoint answering every millisecond
/// averages over its last ~20 answers rather than over 10 s of them.
const MIN_WEIGHT: f64 = 0.05;
/// Latency assumed for an endpoint never measured when no peer has been
/// measured either (optimistic, so it gets tried).
const INITIAL_EWMA_SECS: f64 = 0.001;

#[derive(Debug)]
pub(super) struct Ewma {
    pub(super) value: f64,
    pub(super) at: Instant,
    /// No sample since the endpoint appeared or came back from ejection:
    /// the balancer seeds `value` from its peers' estimates (neutral).
    pub(super) unmeasured: bool,
}

/// One endpoint's latency estimate, load and outlier history.
#[derive(Debug)]
pub struct EndpointStats {
    pub(super) in_flight: AtomicUsize,
    pub(super) ewma: Mutex<Ewma>,
    pub(super) failures: AtomicU32,
    pub(super) ejections: AtomicU32,
    pub(super) ejected_until: Mutex<Option<Instant>>,
    /// Ejected and not yet probed healthy: no traffic, even after
    /// `ejected_until`, until [`EndpointStats::probed`] says it answered.
    pub(super) on_probation: AtomicBool,
    /// A probe is running (one at a time).
    pub(super) probing: AtomicBool,
    /// Since when the endpoint ramps up (slow start).
    pub(super) started: Mutex<Instant>,
}

impl EndpointStats {
    /// Fresh stats: unmeasured (neutral once the balancer sees its peers),
    /// and in slow start from `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            ewma: Mutex::new(Ewma { value: INITIAL_EWMA_SECS, at: now, unmeasured: true }),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: Mutex::new(None),
            on_probation: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            started: Mutex::new(now),
        }
    }

    /// The latency estimate (seconds) as of `now`: while the endpoint has
    /// nothing in flight it decays toward zero with the time since its last
    /// sample (as Peak-EWMA does), so an endpoint passed over after a slow
    /// sample is tried again rather than starved. Not while requests are in
    /// flight on it: their answers are the news, and an endpoint slow to
    /// answer (an app warming up) must not look faster the longer it takes.
    pub(super) fn estimate(&self, now: Instant) -> f64 {
        let e = self.ewma.lock().unwrap_or_else(|e| e.into_inner());
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return e.value;
        }
        let idle = now.saturating_duration_since(e.at).as_secs_f64();
        e.value * (-idle / DECAY.as_secs_f64()).exp()
    }

    /// Whether the endpoint has no sample since it appeared or came back.
    pub(super) fn unmeasured(&self) -> bool {
        self.ewma.lock().unwrap_or_else(|e| e.into_inner()).unmeasured
    }

    /// Sets an unmeasured endpoint's estimate to `neutral` (its peers'
    /// median), so it neither draws everything (an optimistic default)
    /// nor nothing (a stale high estimate).
    pub(super) fn seed(&self, neutral: f64, now: Instant) {
        let mut e = self.ewma.lock().unwrap_or_else(|e| e.into_inner());
        if e.unmeasured {
            *e = Ewma { value: neutral, at: now, unmeasured: false };
        }
    }

    /// Latency estimate × (requests in flight + 1) × the slow-start factor
    /// (2 when the endpoint appears, 1 after [`SLOW_START`]).
    pub(super) fn cost(&self, now: Instant) -> f64 {
        self.estimate(now) * (self.in_flight.load(Ordering::Relaxed) as f64 + 1.0) * self.ramp(now)
    }

    /// The slow-start factor: from 2 down to 1 over [`SLOW_START`].
    pub(super) fn ramp(&self, now: Instant) -> f64 {
        let started = *self.started.lock().unwrap_or_else(|e| e.into_inner());
        let progress = now.saturating_duration_since(started).as_secs_f64() / SLOW_START.as_secs_f64();
        2.0 - progress.min(1.0)
    }

    /// Within its ejection interval.
    pub(super) fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|t| t > now)
    }

    /// Whether the balancer may give it traffic: not ejected, and not
    /// waiting for a probe after an ejection.
    pub(super) fn available(&self, now: Instant) -> bool {
        !self.ejected(now) && !self.on_probation.load(Ordering::Acquire)
    }

    /// Claims the endpoint's probe when its ejection has lapsed and no probe
    /// runs; the caller must report with [`EndpointStats::probed`].
    pub(super) fn claim_probe(&self, now: Instant) -> bool {
        self.on_probation.load(Ordering::Acquire)
            && !self.ejected(now)
            && self.probing.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// A probe's outcome: healthy brings the endpoint back, unmeasured and in
    /// slow start (its old estimate is stale); unhealthy extends the
    /// ejection, doubling as for a new ejection.
    pub(super) fn probed(&self, healthy: bool, now: Instant) {
        if healthy {
            self.failures.store(0, Ordering::Relaxed);
            self.ewma.lock().unwrap_or_else(|e| e.into_inner()).unmeasured = true;
            *self.started.lock().unwrap_or_else(|e| e.into_inner()) = now;
            self.on_probation.store(false, Ordering::Release);
        } else {
            self.eject(now);
        }
        self.probing.store(false, Ordering::Release);
    }

    fn eject(&self, now: Instant) {
        let k = self.ejections.fetch_add(1, Ordering::Relaxed).min(5);
        let d = (BASE_EJECTION * 2u32.pow(k)).min(MAX_EJECTION);
        *self.ejected_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(now + d);
        self.on_probation.store(true, Ordering::Release);
    }

    /// Feeds one answered request: `latency` to its response headers, `ok`
    /// unless it failed at the endpoint. Returns true when this ejected it.
    pub(super) fn observe(&self, latency: Duration, ok: bool, now: Instant) -> bool {
        {
            let mut e = self.ewma.lock().unwrap_or_else(|e| e.into_inner());
            let sample = latency.as_secs_f64();
            let dt = now.saturating_duration_since(e.at).as_secs_f64();
            // A sample after a long gap weighs more (the old value is stale),
            // but never less than MIN_WEIGHT.
            let weight = (1.0 - (-dt / DECAY.as_secs_f64()).exp()).max(MIN_WEIGHT);
            if e.unmeasured {
                // The first sample is the estimate: no stale value to blend with.
                *e = Ewma { value: if ok { sample } else { sample.max(e.value) }, at: now, unmeasured: false };
            } else if ok {
                e.value = e.value * (1.0 - weight) + sample * weight;
                e.at = now;
            } else {
                // A failure only ever raises the estimate.
                e.value = e.value * (1.0 - weight) + sample.max(e.value) * weight;
                e.at = now;
            }
        }
        self.outcome(ok, now)
    }

    /// Feeds an answer that says nothing of the endpoint's speed (a 429 or
    /// 403 from a policy or limit answers at once, whatever the app's
    /// latency): only its success counts, for outlier detection.
    pub(super) fn observe_outcome_only(&self, ok: bool, now: Instant) -> bool {
        self.outcome(ok, now)
    }

    fn outcome(&self, ok: bool, now: Instant) -> bool {
        if ok {
            self.failures.store(0, Ordering::Relaxed);
            // Healthy for a long while since its last ejection: forgive the
            // history, so the next ejection starts short again.
            let last = *self.ejected_until.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|until| now > until + MAX_EJECTION) {
                self.ejections.store(0, Ordering::Relaxed);
            }
            return false;
        }
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= EJECT_AFTER {
            self.failures.store(0, Ordering::Relaxed);
            self.eject(now);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_decays_only_while_nothing_is_in_flight() {
        let t0 = Instant::now();
        let s = EndpointStats::new(t0);
        s.observe(Duration::from_millis(20), true, t0);
        let later = t0 + DECAY * 2;
        s.in_flight.fetch_add(1, Ordering::Relaxed);
        assert_eq!(s.estimate(later), 0.020, "a request outstanding for 2 s made the endpoint look faster");
        s.in_flight.fetch_sub(1, Ordering::Relaxed);
        assert!(s.estimate(later) < 0.020 / 5.0, "an idle endpoint's estimate decays: {}", s.estimate(later));
    }
}
