//! Local rate limits: token buckets per RateLimit (and per caller identity
//! when asked). Excess requests get 429 with `Retry-After`. A limit targets
//! the whole service or one HTTPRoute of it: then it applies to the requests
//! that route's rules match, matched here on the callee's side.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;

use weft_certs::SpiffeId;

use super::gate::{Gate, GateLayer};
use super::RequestContext;
use crate::http::{local_response, Body};
use crate::metrics::{LimitLabels, Metrics};
use crate::routing::{Decision, RequestInfo, Rule};
use weft_config::{glob_match, MeshConfig, Named, RateLimitKey, RateLimitSpec};

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Debug)]
pub struct RateLimiter {
    /// The service whose inbound requests these limits guard.
    service: String,
    limits: Vec<Named<RateLimitSpec>>,
    buckets: Mutex<HashMap<(usize, String), Bucket>>,
}

impl RateLimiter {
    pub fn new(cfg: &MeshConfig, service: &str) -> Self {
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
            .cloned()
            .collect();
        Self { service: service.to_string(), limits, buckets: Mutex::new(HashMap::new()) }
    }

    /// Whether some limit applies only to the requests of one HTTPRoute.
    pub fn by_route(&self) -> bool {
        self.limits.iter().any(|l| l.spec.target_ref.kind == "HTTPRoute")
    }

    /// The service these limits guard.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Whether `other` enforces exactly the same limits.
    pub fn same_limits(&self, other: &RateLimiter) -> bool {
        serde_json::to_string(&self.limits).ok() == serde_json::to_string(&other.limits).ok()
    }

    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// Takes a token from every limit that applies, or from none: on refusal
    /// returns the refusing limit's name and how long until it has a token.
    /// `route` is the HTTPRoute whose rule matched the request, if any.
    pub fn check(
        &self,
        peer: &SpiffeId,
        path: Option<&str>,
        route: Option<&str>,
        now: Instant,
    ) -> Result<(), (String, Duration)> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let mut applying = Vec::new();
        for (i, l) in self.limits.iter().enumerate() {
            let s = &l.spec;
            if s.target_ref.kind == "HTTPRoute" && route != Some(s.target_ref.name.as_str()) {
                continue;
            }
            if !s.paths.is_empty() && !path.is_some_and(|p| s.paths.iter().any(|g| glob_match(g, p))) {
                continue;
            }
            let key = match s.per {
                RateLimitKey::Service => String::new(),
                RateLimitKey::Identity => peer.to_string(),
            };
            let capacity = if s.burst == 0 { s.requests_per_second.ceil().max(1.0) } else { f64::from(s.burst) };
            let b = buckets.entry((i, key.clone())).or_insert(Bucket { tokens: capacity, last: now });
            let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
            b.tokens = (b.tokens + elapsed * s.requests_per_second).min(capacity);
            b.last = now;
            if b.tokens < 1.0 {
                let wait = (1.0 - b.tokens) / s.requests_per_second;
                return Err((l.name.clone(), Duration::from_secs_f64(wait)));
            }
            applying.push((i, key));
        }
        // Every applicable bucket has a token: only now take them.
        for k in applying {
            if let Some(b) = buckets.get_mut(&k) {
                b.tokens -= 1.0;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn limiter(per: &str) -> RateLimiter {
        let cfg = weft_config::parse(&format!(
            "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {{name: api}}\nspec: {{}}\n---\napiVersion: weft.dev/v1alpha1\nkind: RateLimit\nmetadata: {{name: rl}}\nspec: {{targetRef: {{name: api}}, requestsPerSecond: 10, burst: 5, per: {per}, paths: ['/limited/*']}}\n"
        ))
        .unwrap();
        RateLimiter::new(&cfg, "api")
    }

    #[test]
    fn bucket_refuses_then_recovers() {
        let l = limiter("service");
        let peer = SpiffeId::parse("spiffe://td/a").unwrap();
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(l.check(&peer, Some("/limited/x"), None, t0).is_ok());
        }
        let (name, wait) = l.check(&peer, Some("/limited/x"), None, t0).unwrap_err();
        assert_eq!(name, "rl");
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
        // Other paths are not limited.
        assert!(l.check(&peer, Some("/free"), None, t0).is_ok());
        // After 200ms at 10/s two tokens are back.
        let t1 = t0 + Duration::from_millis(200);
        assert!(l.check(&peer, Some("/limited/x"), None, t1).is_ok());
        assert!(l.check(&peer, Some("/limited/x"), None, t1).is_ok());
        assert!(l.check(&peer, Some("/limited/x"), None, t1).is_err());
    }

    #[test]
    fn a_refusal_takes_no_token_from_other_limits() {
        let cfg = weft_config::parse(
            "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: api}\nspec: {}\n---\napiVersion: weft.dev/v1alpha1\nkind: RateLimit\nmetadata: {name: wide}\nspec: {targetRef: {name: api}, requestsPerSecond: 1, burst: 3}\n---\napiVersion: weft.dev/v1alpha1\nkind: RateLimit\nmetadata: {name: narrow}\nspec: {targetRef: {name: api}, requestsPerSecond: 1, burst: 1, paths: ['/x']}\n",
        )
        .unwrap();
        let l = RateLimiter::new(&cfg, "api");
        let peer = SpiffeId::parse("spiffe://td/a").unwrap();
        let t0 = Instant::now();
        assert!(l.check(&peer, Some("/x"), None, t0).is_ok());
        // "narrow" refuses /x now; "wide" must keep its two remaining tokens.
        for _ in 0..5 {
            assert_eq!(l.check(&peer, Some("/x"), None, t0).unwrap_err().0, "narrow");
        }
        assert!(l.check(&peer, Some("/y"), None, t0).is_ok());
        assert!(l.check(&peer, Some("/y"), None, t0).is_ok());
        assert_eq!(l.check(&peer, Some("/y"), None, t0).unwrap_err().0, "wide");
    }

    #[test]
    fn a_route_limit_applies_only_to_its_routes_requests() {
        let cfg = weft_config::parse(
            "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: api}\nspec: {}\n---\napiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: other}\nspec: {}\n---\napiVersion: weft.dev/v1alpha1\nkind: HTTPRoute\nmetadata: {name: bulk}\nspec: {parentRefs: [{name: api}], rules: [{matches: [{path: {type: PathPrefix, value: /bulk}}], backendRefs: [{name: api}]}]}\n---\napiVersion: weft.dev/v1alpha1\nkind: RateLimit\nmetadata: {name: bulk-1rps}\nspec: {targetRef: {kind: HTTPRoute, name: bulk}, requestsPerSecond: 1, burst: 1}\n",
        )
        .unwrap();
        let l = RateLimiter::new(&cfg, "api");
        assert!(l.by_route());
        assert!(RateLimiter::new(&cfg, "other").is_empty(), "the route is not one of other's");
        let peer = SpiffeId::parse("spiffe://td/a").unwrap();
        let t0 = Instant::now();
        assert!(l.check(&peer, Some("/bulk/1"), Some("bulk"), t0).is_ok());
        assert_eq!(l.check(&peer, Some("/bulk/2"), Some("bulk"), t0).unwrap_err().0, "bulk-1rps");
        // Requests no rule of that route matched are not limited by it.
        assert!(l.check(&peer, Some("/x"), None, t0).is_ok());
        assert!(l.check(&peer, Some("/x"), Some("another"), t0).is_ok());
    }

    #[test]
    fn per_identity_buckets() {
        let l = limiter("identity");
        let (a, b) = (SpiffeId::parse("spiffe://td/a").unwrap(), SpiffeId::parse("spiffe://td/b").unwrap());
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(l.check(&a, Some("/limited/x"), None, t0).is_ok());
        }
        assert!(l.check(&a, Some("/limited/x"), None, t0).is_err());
        assert!(l.check(&b, Some("/limited/x"), None, t0).is_ok(), "b has its own bucket");
    }
}

/// The gate that enforces the service's rate limits (HTTP only; a CONNECT
/// tunnel is one long request and is not limited here).
#[derive(Clone)]
pub struct RateLimit {
    metrics: Arc<Metrics>,
}

/// The tower layer of [`RateLimit`].
pub type RateLimitLayer = GateLayer<RateLimit>;

impl RateLimit {
    pub fn layer(metrics: Arc<Metrics>) -> RateLimitLayer {
        GateLayer(Self { metrics })
    }
}

impl Gate for RateLimit {
    fn check<B>(&self, req: &http::Request<B>) -> Option<http::Response<Body>> {
        if req.method() == http::Method::CONNECT {
            return None;
        }
        let Some(ctx) = req.extensions().get::<RequestContext>() else {
            return Some(super::policy::missing_context());
        };
        let limiter = ctx.table.rate_limits.as_ref()?;
        // Which HTTPRoute the request belongs to, matched as the caller's side did.
        let rule = if limiter.by_route() {
            let info = RequestInfo {
                method: req.method(),
                path: req.uri().path(),
                query: req.uri().query(),
                headers: req.headers(),
            };
            match ctx.table.router.route(limiter.service(), &info) {
                Decision::Rule(rule) => Some(rule),
                Decision::Default | Decision::NoMatch => None,
            }
        } else {
            None
        };
        let route = rule.as_deref().map(Rule::route_name);
        let (limit, wait) = limiter.check(&ctx.peer, Some(req.uri().path()), route, Instant::now()).err()?;
        self.metrics.rate_limited.get_or_create(&LimitLabels { limit }).inc();
        let mut r = local_response(StatusCode::TOO_MANY_REQUESTS, "weft: rate limit exceeded");
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        r.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
        Some(r)
    }
}

#[cfg(test)]
mod layer_tests {
    use super::*;
    use crate::discovery::Table;
    use std::convert::Infallible;
    use tower::Layer;
    use tower::ServiceExt;

    #[tokio::test]
    async fn answers_429_with_retry_after_past_the_budget() {
        let table =
            Arc::new(Table { rate_limits: Some(Arc::new(super::tests::limiter("service"))), ..Default::default() });
        let inner = tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, Infallible>(local_response(StatusCode::OK, "app"))
        });
        let svc = RateLimit::layer(Arc::new(Metrics::default())).layer(inner);
        let peer = Arc::new(SpiffeId::parse("spiffe://td/a").unwrap());
        let mut codes = Vec::new();
        for _ in 0..7 {
            let mut req = http::Request::get("/limited/x").body(()).unwrap();
            req.extensions_mut().insert(RequestContext { peer: peer.clone(), table: table.clone() });
            let resp = svc.clone().oneshot(req).await.unwrap();
            if resp.status() == StatusCode::TOO_MANY_REQUESTS {
                assert_eq!(resp.headers()[http::header::RETRY_AFTER], "1");
            }
            codes.push(resp.status().as_u16());
        }
        assert_eq!(codes, [200, 200, 200, 200, 200, 429, 429]);
    }
}
