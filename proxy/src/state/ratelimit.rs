//! Local rate limits: token buckets per RateLimit (and per caller identity
//! when asked). A refused request gets 429 with `Retry-After` (made by the
//! error mapping). A limit targets the whole service or one HTTPRoute of it:
//! then it applies to the requests that route's rules match, matched here on
//! the callee's side against the compiled routes.
//!
//! The buckets are `governor`'s GCRA limiters, keyed by caller identity (one
//! key for per-service limits). A request takes a token from every limit that
//! applies, or from none: governor has no "peek", so the limiters keep their
//! GCRA state in a [`Tats`] store of ours that can run a check as a dry run
//! (governor decides, the store does not write). With the check lock held,
//! every applicable bucket is checked dry first; only if all would allow are
//! they checked for real — which then cannot refuse, since nothing else ran
//! in between and time only moves forward.
//!
//! Each limit's buckets outlive config swaps while the limit's spec stays
//! (see [`super::kept`]); a removed or changed limit's buckets are dropped,
//! and callers whose buckets are full again are forgotten at each swap.

use std::collections::HashMap;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::StateStore;
use governor::Quota;
use weft_certs::SpiffeId;
use weft_config::{glob_match, MeshConfig, Named, RateLimitKey, RateLimitSpec};

use super::kept::Renewal;
use super::routes::{Decision, RequestInfo, Router, Rule};

/// Why a request was refused: the refusing limit, and how long until it has a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub limit: String,
    pub wait: Duration,
}

/// The clock of the buckets: time since the sidecar started (plus a skew
/// that only tests move).
#[derive(Debug, Clone)]
pub struct LimitClock {
    start: Instant,
    skew: Arc<AtomicU64>,
}

impl Default for LimitClock {
    fn default() -> Self {
        Self { start: Instant::now(), skew: Arc::default() }
    }
}

impl LimitClock {
    /// Moves this clock (and its clones) forward; for tests.
    pub fn advance(&self, by: Duration) {
        self.skew.fetch_add(by.as_nanos() as u64, Ordering::Relaxed);
    }
}

impl governor::clock::Clock for LimitClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        self.start.elapsed() + Duration::from_nanos(self.skew.load(Ordering::Relaxed))
    }
}

/// GCRA state (each key's theoretical arrival time) that can be measured
/// without being written (a dry run).
#[derive(Debug, Clone, Default)]
pub struct Tats<K> {
    inner: Arc<TatsInner<K>>,
}

#[derive(Debug, Default)]
struct TatsInner<K> {
    tats: Mutex<HashMap<K, Nanos>>,
    dry_run: AtomicBool,
}

impl<K> Tats<K> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Nanos>> {
        self.inner.tats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<K: Hash + Eq + Clone> StateStore for Tats<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut tats = self.lock();
        let (t, next) = f(tats.get(key).copied())?;
        if !self.inner.dry_run.load(Ordering::Relaxed) {
            tats.insert(key.clone(), next);
        }
        Ok(t)
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for Tats<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        self.lock().retain(|_, tat| *tat > drop_below);
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

type Buckets = governor::RateLimiter<String, Tats<String>, LimitClock, NoOpMiddleware<Duration>>;

/// One RateLimit's buckets (one per caller identity, or one for all).
pub struct Limit {
    name: String,
    spec: RateLimitSpec,
    buckets: Buckets,
    tats: Tats<String>,
    clock: LimitClock,
}

impl std::fmt::Debug for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limit").field("name", &self.name).field("spec", &self.spec).finish_non_exhaustive()
    }
}

impl Limit {
    fn new(l: &Named<RateLimitSpec>, clock: &LimitClock) -> Self {
        let s = &l.spec;
        // Capacity: `burst`, or one second's worth (at least one) when unset.
        let capacity = if s.burst == 0 { s.requests_per_second.ceil().max(1.0) as u32 } else { s.burst };
        let period = Duration::from_secs_f64(1.0 / s.requests_per_second.max(1e-9));
        let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
            .expect("a positive period")
            .allow_burst(NonZeroU32::new(capacity.max(1)).expect("at least one"));
        let tats = Tats::default();
        Self {
            name: l.name.clone(),
            spec: s.clone(),
            buckets: governor::RateLimiter::new(quota, tats.clone(), clock.clone()),
            tats,
            clock: clock.clone(),
        }
    }

    /// Callers with a bucket (for tests and pruning).
    pub fn callers(&self) -> usize {
        self.buckets.len()
    }

    fn key(&self, peer: &SpiffeId) -> String {
        match self.spec.per {
            RateLimitKey::Service => String::new(),
            RateLimitKey::Identity => peer.to_string(),
        }
    }

    /// governor's decision for `key`; with `dry_run`, nothing is taken.
    fn check(&self, key: &String, dry_run: bool) -> Result<(), Duration> {
        self.tats.inner.dry_run.store(dry_run, Ordering::Relaxed);
        let r = self.buckets.check_key(key);
        self.tats.inner.dry_run.store(false, Ordering::Relaxed);
        r.map_err(|not_until| not_until.wait_time_from(governor::clock::Clock::now(&self.clock)))
    }
}

/// Held while a request's buckets are checked, so that a dry run and the
/// real check see the same state (see the module doc).
static CHECK: Mutex<()> = Mutex::new(());

/// The rate limits that guard this sidecar's service.
#[derive(Debug)]
pub struct RateLimits {
    /// The service whose inbound requests these limits guard.
    service: String,
    limits: Vec<Arc<Limit>>,
}

impl RateLimits {
    /// The limits of `cfg` that target `service` or one of its HTTPRoutes;
    /// each takes its buckets from `kept` when its spec did not change.
    pub fn new(cfg: &MeshConfig, service: &str, kept: &mut Renewal<'_, String, Limit>, clock: &LimitClock) -> Self {
        // HTTPRoutes of this service, for limits that target a route.
        let routes: Vec<&str> = cfg
            .routes
            .iter()
            .filter(|r| r.spec.parent_refs.iter().any(|p| p.name == service))
            .map(|r| r.name.as_str())
            .collect();
        let limits = cfg
            .rate_limits
            .iter()
            .filter(|r| {
                let t = &r.spec.target_ref;
                if t.kind == "HTTPRoute" {
                    routes.contains(&t.name.as_str())
                } else {
                    t.name == service
                }
            })
            .map(|l| {
                let limit = kept.get(l.name.clone(), |old| old.spec == l.spec, || Limit::new(l, clock));
                // Callers whose buckets are full again are as good as new.
                limit.buckets.retain_recent();
                limit
            })
            .collect();
        Self { service: service.to_string(), limits }
    }

    /// Whether some limit applies only to the requests of one HTTPRoute.
    pub fn by_route(&self) -> bool {
        self.limits.iter().any(|l| l.spec.target_ref.kind == "HTTPRoute")
    }

    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// The limit named `name`, if it guards this service.
    pub fn limit(&self, name: &str) -> Option<&Arc<Limit>> {
        self.limits.iter().find(|l| l.name == name)
    }

    /// Checks an HTTP request: the HTTPRoute it belongs to is matched as the
    /// caller's side did, for limits that target a route.
    pub fn check_request(&self, peer: &SpiffeId, req: &RequestInfo<'_>, routes: &Router) -> Result<(), Refusal> {
        let rule = if self.by_route() {
            match routes.route(&self.service, req) {
                Decision::Rule(rule) => Some(rule),
                Decision::Default | Decision::NoMatch => None,
            }
        } else {
            None
        };
        self.check(peer, Some(req.path), rule.as_deref().map(Rule::route_name))
    }

    /// Takes a token from every limit that applies, or from none.
    /// `route` is the HTTPRoute whose rule matched the request, if any.
    pub fn check(&self, peer: &SpiffeId, path: Option<&str>, route: Option<&str>) -> Result<(), Refusal> {
        let applying: Vec<(&Limit, String)> = self
            .limits
            .iter()
            .filter(|l| {
                let s = &l.spec;
                (s.target_ref.kind != "HTTPRoute" || route == Some(s.target_ref.name.as_str()))
                    && (s.paths.is_empty() || path.is_some_and(|p| s.paths.iter().any(|g| glob_match(g, p))))
            })
            .map(|l| (l.as_ref(), l.key(peer)))
            .collect();
        let _held = CHECK.lock().unwrap_or_else(|e| e.into_inner());
        for (l, key) in &applying {
            l.check(key, true).map_err(|wait| Refusal { limit: l.name.clone(), wait })?;
        }
        // Every applicable bucket has a token: only now take them.
        for (l, key) in &applying {
            l.check(key, false).map_err(|wait| Refusal { limit: l.name.clone(), wait })?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::state::kept::Kept;

    pub(crate) fn limits(cfg: &MeshConfig, service: &str, clock: &LimitClock) -> RateLimits {
        let kept = Kept::default();
        let mut r = kept.renew();
        RateLimits::new(cfg, service, &mut r, clock)
    }

    pub(crate) fn limiter(per: &str, clock: &LimitClock) -> RateLimits {
        let cfg = weft_config::parse(&format!(
            "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {{name: api}}\nspec: {{}}\n---\napiVersion: weft.dev/v1alpha1\nkind: RateLimit\nmetadata: {{name: rl}}\nspec: {{targetRef: {{name: api}}, requestsPerSecond: 10, burst: 5, per: {per}, paths: ['/limited/*']}}\n"
        ))
        .unwrap();
        limits(&cfg, "api", clock)
    }

    #[test]
    fn bucket_refuses_then_recovers() {
        let clock = LimitClock::default();
        let l = limiter("service", &clock);
        let peer = SpiffeId::parse("spiffe://td/a").unwrap();
        for _ in 0..5 {
            assert!(l.check(&peer, Some("/limited/x"), None).is_ok());
        }
        let Refusal { limit, wait } = l.check(&peer, Some("/limited/x"), None).unwrap_err();
        assert_eq!(limit, "rl");
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
        // Other paths are not limited.
        assert!(l.check(&peer, Some("/free"), None).is_ok());
        // After 200ms at 10/s two tokens are back.
        clock.advance(Duration::from_millis(200));
        assert!(l.check(&peer, Some("/limited/x"), None).is_ok());
        assert!(l.check(&peer, Some("/limited/x"), None).is_ok());
        assert!(l.check(&peer, Some("/limited/x"), None).is_err());
    }

    #[test]
    fn a_refusal_takes_no_token_from_other_limits() {
        let cfg = weft_config::parse(
            "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: api}\nspec: {}\n---\napiVersion: weft.dev/v1alpha1\nkind: RateLimit\nmetadata: {name: wide}\nspec: {targetRef: {name: api}, requestsPerSecond: 1, burst: 3}\n---\napiVersion: weft.dev/v1alpha1\nkind: RateLimit\nmetadata: {name: narrow}\nspec: {targetRef: {name: api}, requestsPerSecond: 1, burst: 1, paths: ['/x']}\n",
        )
        .unwrap();
        let clock = LimitClock::default();
        let l = limits(&cfg, "api", &clock);
        let peer = SpiffeId::parse("spiffe://td/a").unwrap();
        assert!(l.check(&peer, Some("/x"), None).is_ok());
        // "narrow" refuses /x now; "wide" must keep its two remaining tokens.
        for _ in 0..5 {
            assert_eq!(l.check(&peer, Some("/x"), None).unwrap_err().limit, "narrow");
        }
        assert!(l.check(&peer, Some("/y"), None).is_ok());
        assert!(l.check(&peer, Some("/y"), None).is_ok());
        assert_eq!(l.check(&peer, Some("/y"), None).unwrap_err().limit, "wide");
    }

    #[test]
    fn a_route_limit_applies_only_to_its_routes_requests() {
        let cfg = weft_config::parse(
            "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: api}\nspec: {}\n---\napiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: other}\nspec: {}\n---\napiVersion: weft.dev/v1alpha1\nkind: HTTPRoute\nmetadata: {name: bulk}\nspec: {parentRefs: [{name: api}], rules: [{matches: [{path: {type: PathPrefix, value: /bulk}}], backendRefs: [{name: api}]}]}\n---\napiVersion: weft.dev/v1alpha1\nkind: RateLimit\nmetadata: {name: bulk-1rps}\nspec: {targetRef: {kind: HTTPRoute, name: bulk}, requestsPerSecond: 1, burst: 1}\n",
        )
        .unwrap();
        let clock = LimitClock::default();
        let l = limits(&cfg, "api", &clock);
        assert!(l.by_route());
        assert!(limits(&cfg, "other", &clock).is_empty(), "the route is not one of other's");
        let peer = SpiffeId::parse("spiffe://td/a").unwrap();
        assert!(l.check(&peer, Some("/bulk/1"), Some("bulk")).is_ok());
        assert_eq!(l.check(&peer, Some("/bulk/2"), Some("bulk")).unwrap_err().limit, "bulk-1rps");
        // Requests no rule of that route matched are not limited by it.
        assert!(l.check(&peer, Some("/x"), None).is_ok());
        assert!(l.check(&peer, Some("/x"), Some("another")).is_ok());
    }

    #[test]
    fn per_identity_buckets() {
        let clock = LimitClock::default();
        let l = limiter("identity", &clock);
        let (a, b) = (SpiffeId::parse("spiffe://td/a").unwrap(), SpiffeId::parse("spiffe://td/b").unwrap());
        for _ in 0..5 {
            assert!(l.check(&a, Some("/limited/x"), None).is_ok());
        }
        assert!(l.check(&a, Some("/limited/x"), None).is_err());
        assert!(l.check(&b, Some("/limited/x"), None).is_ok(), "b has its own bucket");
    }

    #[test]
    fn buckets_live_while_their_limit_stays_and_callers_with_full_buckets_are_forgotten() {
        let cfg = |rps: u32| {
            weft_config::parse(&format!(
                "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {{name: api}}\nspec: {{}}\n---\napiVersion: weft.dev/v1alpha1\nkind: RateLimit\nmetadata: {{name: rl}}\nspec: {{targetRef: {{name: api}}, requestsPerSecond: {rps}, burst: 2, per: identity}}\n"
            ))
            .unwrap()
        };
        let (clock, kept) = (LimitClock::default(), Kept::default());
        let apply = |c: &MeshConfig| {
            let mut r = kept.renew();
            let l = RateLimits::new(c, "api", &mut r, &clock);
            r.commit();
            l
        };
        let one = apply(&cfg(1));
        for i in 0..100 {
            let _ = one.check(&SpiffeId::parse(&format!("spiffe://td/caller-{i}")).unwrap(), Some("/"), None);
        }
        assert_eq!(one.limit("rl").unwrap().callers(), 100);
        // Same spec: same buckets (no fresh burst for an unrelated update).
        let two = apply(&cfg(1));
        assert!(Arc::ptr_eq(one.limit("rl").unwrap(), two.limit("rl").unwrap()));
        // Two seconds on, every bucket is full again: nothing to remember.
        clock.advance(Duration::from_secs(2));
        let three = apply(&cfg(1));
        assert_eq!(three.limit("rl").unwrap().callers(), 0);
        // A changed limit starts afresh; a removed one is dropped.
        let four = apply(&cfg(5));
        assert!(!Arc::ptr_eq(three.limit("rl").unwrap(), four.limit("rl").unwrap()));
        apply(
            &weft_config::parse("apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: api}\nspec: {}\n")
                .unwrap(),
        );
        assert!(kept.is_empty());
    }
}
