//! Retry policy: which requests may be retried, and a budget so retries can
//! never multiply load (at most `percent` of recent requests, plus a floor of
//! `minRetriesPerSecond`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use http::Method;
use tower::{Layer, Service, ServiceExt};
use weft_config::RetryBudget;

use super::endpoint::ConnectionFailure;
use super::timeout::Deadline;
use crate::http::{empty, Body};
use crate::metrics::{Metrics, RetryLabels};
use crate::routing::RouteContext;

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

/// Retries a routed request per its rule: idempotent and body-less only,
/// on the rule's status codes or a connection failure, within the budget.
#[derive(Clone)]
pub struct RetryLayer {
    metrics: Arc<Metrics>,
    /// Per rule name; replaced when the rule's budget settings change.
    budgets: Arc<Mutex<HashMap<String, Arc<Budget>>>>,
}

impl RetryLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics, budgets: Default::default() }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry { inner, layer: self.clone() }
    }
}

#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    layer: RetryLayer,
}

impl RetryLayer {
    /// The rule's budget; a new one when the rule is new or its budget settings changed.
    fn budget(&self, rule: &str, cfg: &RetryBudget) -> Arc<Budget> {
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        match budgets.get(rule) {
            Some(b) if b.budget == *cfg => b.clone(),
            _ => {
                let b = Arc::new(Budget::new(cfg.clone()));
                budgets.insert(rule.to_string(), b.clone());
                b
            }
        }
    }
}

/// A copy of a request head (method, URI, version, headers, extensions).
fn clone_head(parts: &http::request::Parts) -> http::request::Parts {
    let mut req = http::Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    *req.extensions_mut() = parts.extensions.clone();
    req.into_parts().0
}

impl<S> Service<http::Request<Body>> for Retry<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let ctx = req.extensions().get::<RouteContext>().cloned();
        // Only requests that are safe to repeat and have no body to replay.
        let retry = ctx.as_ref().and_then(|c| c.rule.retry.clone()).filter(|_| {
            use http_body::Body as _;
            idempotent(req.method()) && req.body().is_end_stream()
        });
        let (Some(ctx), Some(retry)) = (ctx, retry) else { return Box::pin(inner.call(req)) };
        let budget = self.layer.budget(&ctx.rule.name, &retry.budget);
        budget.deposit();
        let metrics = self.layer.metrics.clone();
        let (head, _empty) = req.into_parts();
        Box::pin(async move {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let req = http::Request::from_parts(clone_head(&head), empty());
                let resp = inner.ready().await?.call(req).await?;
                let retryable = resp.extensions().get::<ConnectionFailure>().is_some()
                    || retry.codes.contains(&resp.status().as_u16());
                // Past the route's deadline a retry could never answer in time.
                let too_late = head.extensions.get::<Deadline>().is_some_and(Deadline::passed);
                if !retryable || attempt > retry.attempts || too_late {
                    return Ok(resp);
                }
                let allowed = budget.withdraw(Instant::now());
                let outcome = if allowed { "sent" } else { "budget_exhausted" };
                metrics.retries.get_or_create(&RetryLabels { route: ctx.rule.name.clone(), outcome }).inc();
                if !allowed {
                    return Ok(resp);
                }
                tokio::time::sleep(retry.backoff.map(|d| d.0).unwrap_or(Duration::from_millis(25))).await;
            }
        })
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

    #[tokio::test(start_paused = true)]
    async fn retries_idempotent_requests_within_budget() {
        use crate::discovery::Table;
        use crate::http::local_response;
        use crate::routing::Rule;
        use http::StatusCode;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tower::ServiceExt;

        // An endpoint that fails the first two attempts of every request.
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let inner = tower::service_fn(move |_req: http::Request<Body>| {
            let n = seen.fetch_add(1, Ordering::Relaxed);
            async move {
                let code = if n % 3 < 2 { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
                Ok::<_, Infallible>(local_response(code, "x"))
            }
        });
        let svc = RetryLayer::new(Arc::new(Metrics::default())).layer(inner);
        let mut rule = Rule::default_for("api");
        rule.retry = Some(Arc::new(weft_config::Retry {
            attempts: 2,
            codes: vec![503],
            backoff: None,
            budget: RetryBudget { percent: 20.0, min_retries_per_second: 10 },
        }));
        let ctx =
            RouteContext { table: Arc::new(Table::default()), backend: rule.backends[0].clone(), rule: Arc::new(rule) };
        let request = |method: Method| {
            let mut r = http::Request::builder().method(method).uri("http://api/").body(empty()).unwrap();
            r.extensions_mut().insert(ctx.clone());
            r
        };
        // GET: two retries turn 503, 503 into 200.
        assert_eq!(svc.clone().oneshot(request(Method::GET)).await.unwrap().status(), StatusCode::OK);
        assert_eq!(calls.load(Ordering::Relaxed), 3);
        // POST is not idempotent: its 503 comes straight back.
        calls.store(0, Ordering::Relaxed);
        assert_eq!(svc.clone().oneshot(request(Method::POST)).await.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        // Past the route's deadline no retry is sent: it could not answer in time.
        calls.store(0, Ordering::Relaxed);
        let mut late = request(Method::GET);
        late.extensions_mut().insert(Deadline { at: tokio::time::Instant::now(), timeout: Duration::from_secs(1) });
        assert_eq!(svc.clone().oneshot(late).await.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn one_budget_per_rule_until_its_settings_change() {
        let layer = RetryLayer::new(Arc::new(Metrics::default()));
        let cfg = RetryBudget { percent: 20.0, min_retries_per_second: 10 };
        let a = layer.budget("r/0", &cfg);
        assert!(Arc::ptr_eq(&a, &layer.budget("r/0", &cfg)));
        assert!(!Arc::ptr_eq(&a, &layer.budget("r/1", &cfg)));
        let changed = RetryBudget { percent: 50.0, ..cfg };
        assert!(!Arc::ptr_eq(&a, &layer.budget("r/0", &changed)));
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
