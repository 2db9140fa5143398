//! Retry budgets: retries may add at most `percent` of recent requests, plus
//! a floor of `minRetriesPerSecond`, so retries can never multiply load.
//!
//! The accounting is `tower::retry::budget::TpsBudget` (a sliding window of
//! deposits and withdrawals); this maps weft-config's `RetryBudget` onto it.
//! One budget per route rule, kept across config swaps while the rule and its
//! settings stay (see [`super::kept`]).

use std::time::Duration;

use tower::retry::budget::{Budget as _, TpsBudget};
use weft_config::RetryBudget;

/// How far back deposits count, and over which the floor is granted:
/// `minRetriesPerSecond` × this many retries without any deposit.
pub const WINDOW: Duration = Duration::from_secs(10);

/// The retry budget of one route rule.
pub struct Budget {
    settings: RetryBudget,
    tps: TpsBudget,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl Budget {
    /// `percent` (0–100 per original request; up to 100 000 is accepted, as
    /// TpsBudget allows) and `minRetriesPerSecond` map to TpsBudget's
    /// `retry_percent` (a fraction) and `min_per_sec` over [`WINDOW`].
    pub fn new(settings: &RetryBudget) -> Self {
        let fraction = (settings.percent / 100.0).clamp(0.0, 1000.0) as f32;
        let floor = settings.min_retries_per_second.min(i32::MAX as u32 - 1);
        Self { settings: settings.clone(), tps: TpsBudget::new(WINDOW, floor, fraction) }
    }

    /// The settings this budget was made from.
    pub fn settings(&self) -> &RetryBudget {
        &self.settings
    }

    /// Every original request earns `percent`/100 of a retry.
    pub fn deposit(&self) {
        self.tps.deposit();
    }

    /// Takes one retry from the budget if there is one.
    pub fn withdraw(&self) -> bool {
        self.tps.withdraw()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn budget_bounds_retries() {
        let b = Budget::new(&RetryBudget { percent: 20.0, min_retries_per_second: 0 });
        assert!(!b.withdraw(), "nothing earned yet");
        for _ in 0..10 {
            b.deposit();
        }
        // 10 requests at 20% earn two retries.
        assert!(b.withdraw());
        assert!(b.withdraw());
        assert!(!b.withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_is_granted_over_the_window_and_comes_back() {
        let b = Budget::new(&RetryBudget { percent: 0.0, min_retries_per_second: 2 });
        let floor = 2 * WINDOW.as_secs();
        assert_eq!((0..floor * 2).filter(|_| b.withdraw()).count() as u64, floor, "2/s over the window, no more");
        assert!(!b.withdraw());
        // Withdrawals age out of the window, and the floor is there again.
        tokio::time::advance(WINDOW + Duration::from_secs(1)).await;
        assert!(b.withdraw());
    }
}
