//! An endpoint's statistics for the balancer and outlier detection: a
//! peak-EWMA latency estimate, requests in flight, consecutive failures and
//! the ejection they lead to. Kept per endpoint ([`super::endpoints`]), read
//! by the balancer ([`super::balance`]).

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Consecutive failures that eject an endpoint.
pub const EJECT_AFTER: u32 = 5;
/// First ejection; each later one doubles, up to `MAX_EJECTION`.
pub const BASE_EJECTION: Duration = Duration::from_secs(2);
pub const MAX_EJECTION: Duration = Duration::from_secs(60);
/// EWMA time constant.
const DECAY: Duration = Duration::from_secs(10);
/// Latency assumed for an endpoint never measured (optimistic, so it gets tried).
const INITIAL_EWMA_SECS: f64 = 0.001;

#[derive(Debug)]
pub(super) struct Ewma {
    pub(super) value: f64,
    pub(super) at: Instant,
}

/// One endpoint's latency estimate, load and outlier history.
#[derive(Debug)]
pub struct EndpointStats {
    pub(super) in_flight: AtomicUsize,
    pub(super) ewma: Mutex<Ewma>,
    pub(super) failures: AtomicU32,
    pub(super) ejections: AtomicU32,
    pub(super) ejected_until: Mutex<Option<Instant>>,
}

impl EndpointStats {
    /// Fresh stats; endpoints first seen together start equal.
    pub fn new(now: Instant) -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            ewma: Mutex::new(Ewma { value: INITIAL_EWMA_SECS, at: now }),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: Mutex::new(None),
        }
    }

    /// Latency estimate × (requests in flight + 1). An estimate decays toward
    /// zero with the time since its last sample (as Peak-EWMA does), so an
    /// endpoint passed over after one slow sample is tried again rather than
    /// starved for good: with two endpoints P2C always compares both, and an
    /// estimate that only moves on samples would never move again.
    pub(super) fn cost(&self, now: Instant) -> f64 {
        let e = self.ewma.lock().unwrap_or_else(|e| e.into_inner());
        let idle = now.saturating_duration_since(e.at).as_secs_f64();
        let ewma = e.value * (-idle / DECAY.as_secs_f64()).exp();
        ewma * (self.in_flight.load(Ordering::Relaxed) as f64 + 1.0)
    }

    pub(super) fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|t| t > now)
    }

    pub(super) fn observe(&self, latency: Duration, ok: bool, now: Instant) -> bool {
        {
            let mut e = self.ewma.lock().unwrap_or_else(|e| e.into_inner());
            let dt = now.saturating_duration_since(e.at).as_secs_f64();
            let w = (-dt / DECAY.as_secs_f64()).exp();
            let sample = if ok { latency.as_secs_f64() } else { latency.as_secs_f64().max(e.value) };
            e.value = e.value * w + sample * (1.0 - w);
            e.at = now;
        }
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
            let k = self.ejections.fetch_add(1, Ordering::Relaxed).min(5);
            let d = (BASE_EJECTION * 2u32.pow(k)).min(MAX_EJECTION);
            *self.ejected_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(now + d);
            return true;
        }
        false
    }
}
