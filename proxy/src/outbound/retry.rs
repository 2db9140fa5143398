//! Retry policy: which requests may be retried, and a budget so retries can
//! never multiply load (at most `percent` of recent requests, plus a floor of
//! `minRetriesPerSecond`).

use std::sync::Mutex;
use std::time::Instant;

use http::Method;
use weft_config::RetryBudget;

/// Methods that are safe to send twice (RFC 9110 9.2.2).
pub fn idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

#[derive(Debug)]
struct State {
    tokens: f64,
    last: Instant,
}

#[derive(Debug)]
pub struct Budget {
    budget: RetryBudget,
    state: Mutex<State>,
}

impl Budget {
    pub fn new(budget: RetryBudget) -> Self {
        let tokens = f64::from(budget.min_retries_per_second);
        Self { budget, state: Mutex::new(State { tokens, last: Instant::now() }) }
    }

    fn cap(&self) -> f64 {
        // Ten seconds' worth of the floor, and room for at least ten retries.
        (f64::from(self.budget.min_retries_per_second) * 10.0).max(10.0)
    }

    /// Every original request earns `percent`/100 of a retry.
    pub fn deposit(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.tokens = (s.tokens + self.budget.percent / 100.0).min(self.cap().max(s.tokens));
    }

    /// Takes one retry from the budget if there is one.
    pub fn withdraw(&self, now: Instant) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let floor = now.saturating_duration_since(s.last).as_secs_f64() * f64::from(self.budget.min_retries_per_second);
        s.tokens = (s.tokens + floor).min(self.cap().max(s.tokens));
        s.last = now;
        // A little slack: ten deposits of 0.2 must buy two retries despite rounding.
        if s.tokens >= 1.0 - 1e-9 {
            s.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn methods() {
        assert!(idempotent(&Method::GET) && idempotent(&Method::PUT) && idempotent(&Method::DELETE));
        assert!(!idempotent(&Method::POST) && !idempotent(&Method::PATCH));
    }

    #[test]
    fn budget_bounds_retries() {
        let b = Budget::new(RetryBudget { percent: 20.0, min_retries_per_second: 0 });
        let now = Instant::now();
        assert!(!b.withdraw(now), "nothing earned yet");
        for _ in 0..10 {
            b.deposit();
        }
        // 10 requests at 20% earn two retries.
        assert!(b.withdraw(now));
        assert!(b.withdraw(now));
        assert!(!b.withdraw(now));
    }

    #[test]
    fn floor_refills_over_time() {
        let b = Budget::new(RetryBudget { percent: 0.0, min_retries_per_second: 2 });
        let t0 = Instant::now();
        assert!(b.withdraw(t0) && b.withdraw(t0));
        assert!(!b.withdraw(t0));
        assert!(b.withdraw(t0 + Duration::from_millis(600)));
    }
}
