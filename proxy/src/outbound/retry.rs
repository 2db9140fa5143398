//! Retry policy: which requests may be retried (idempotent, body-less, on
//! the rule's status codes or a connection failure), within the rule's retry
//! budget (`state/budget.rs`, kept across config swaps).

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::{BoxFuture, Either};
use http::Method;
use tower::{Layer, Service, ServiceExt};

use crate::context::RequestContext;
use crate::error::ProxyError;
use crate::http::{empty, Body};
use crate::metrics::{Metrics, RetryLabels};

/// Methods that are safe to send twice (RFC 9110 9.2.2).
pub fn idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// Retries a routed request per its rule: idempotent and body-less only,
/// on the rule's status codes or a connection failure, within the budget.
#[derive(Clone)]
pub struct RetryLayer {
    metrics: Arc<Metrics>,
}

impl RetryLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry { inner, metrics: self.metrics.clone() }
    }
}

#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// A copy of a request head (method, URI, version, headers, extensions).
fn clone_head(parts: &http::request::Parts) -> http::request::Parts {
    let mut head = crate::http::head_only(parts);
    head.extensions = parts.extensions.clone();
    head
}

impl<S> Service<http::Request<Body>> for Retry<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = ProxyError;
    /// A request without a retry policy goes on as the inner service's own
    /// future (no allocation); a retried one is boxed.
    type Future = Either<S::Future, BoxFuture<'static, Result<Self::Response, ProxyError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let ctx = req.extensions().get::<RequestContext>();
        let route = ctx.and_then(|c| c.route.clone());
        let deadline = ctx.and_then(|c| c.deadline);
        // Only requests that are safe to repeat and have no body to replay.
        let policy = route.as_ref().and_then(|r| Some((r.rule.retry.clone()?, r.rule.budget.clone()?))).filter(|_| {
            use http_body::Body as _;
            idempotent(req.method()) && req.body().is_end_stream()
        });
        let (Some(route), Some((retry, budget))) = (route, policy) else { return Either::Left(self.inner.call(req)) };
        // The standard tower dance: the clone that was made ready goes with the retries.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        budget.deposit();
        let metrics = self.metrics.clone();
        let (head, _empty) = req.into_parts();
        Either::Right(Box::pin(async move {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let req = http::Request::from_parts(clone_head(&head), empty());
                let result = inner.ready().await?.call(req).await;
                let retryable = match &result {
                    Ok(resp) => retry.codes.contains(&resp.status().as_u16()),
                    Err(e) => e.is_connection_failure() || retry.codes.contains(&e.status().as_u16()),
                };
                // Past the route's deadline a retry could never answer in time.
                let too_late = deadline.is_some_and(|d| d.passed());
                if !retryable || attempt > retry.attempts || too_late {
                    return result;
                }
                let allowed = budget.withdraw();
                let outcome = if allowed { "sent" } else { "budget_exhausted" };
                metrics.retries.get_or_create(&RetryLabels { route: route.rule.name.clone(), outcome }).inc();
                if !allowed {
                    return result;
                }
                tokio::time::sleep(retry.backoff.map(|d| d.0).unwrap_or(Duration::from_millis(25))).await;
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::Deadline;
    use crate::http::local_response;
    use crate::state::budget::Budget;
    use crate::state::routes::Rule;
    use crate::state::Snapshot;
    use http::StatusCode;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use weft_config::RetryBudget;

    #[test]
    fn methods() {
        assert!(idempotent(&Method::GET) && idempotent(&Method::PUT) && idempotent(&Method::DELETE));
        assert!(!idempotent(&Method::POST) && !idempotent(&Method::PATCH));
    }

    fn context(rule: Rule) -> RequestContext {
        let backend = rule.backends[0].clone();
        RequestContext::outbound(Arc::new(Snapshot::default()), Arc::new(rule), backend)
    }

    fn retrying_rule(codes: Vec<u16>) -> Rule {
        let budget = RetryBudget { percent: 20.0, min_retries_per_second: 10 };
        let mut rule = Rule::default_for("api");
        rule.budget = Some(Arc::new(Budget::new(&budget)));
        rule.retry = Some(Arc::new(weft_config::Retry { attempts: 2, codes, backoff: None, budget }));
        rule
    }

    #[tokio::test(start_paused = true)]
    async fn retries_idempotent_requests_within_budget() {
        // An endpoint that fails the first two attempts of every request.
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let inner = tower::service_fn(move |_req: http::Request<Body>| {
            let n = seen.fetch_add(1, Ordering::Relaxed);
            async move {
                let code = if n % 3 < 2 { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
                Ok::<_, ProxyError>(local_response(code, "x"))
            }
        });
        let svc = RetryLayer::new(Arc::new(Metrics::default())).layer(inner);
        let ctx = context(retrying_rule(vec![503]));
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
        late.extensions_mut().get_mut::<RequestContext>().unwrap().deadline =
            Some(Deadline { at: tokio::time::Instant::now(), timeout: Duration::from_secs(1) });
        assert_eq!(svc.clone().oneshot(late).await.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_failure_is_retried_whatever_its_status() {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let inner = tower::service_fn(move |_req: http::Request<Body>| {
            let n = seen.fetch_add(1, Ordering::Relaxed);
            async move {
                if n == 0 {
                    let peer = weft_certs::SpiffeId::parse("spiffe://td/api").unwrap();
                    let addr = "127.0.0.1:1".parse().unwrap();
                    return Err(ProxyError::AttemptTimeout { after: Duration::from_millis(1), peer, addr });
                }
                Ok(local_response(StatusCode::OK, "x"))
            }
        });
        let svc = RetryLayer::new(Arc::new(Metrics::default())).layer(inner);
        let mut req = http::Request::get("http://api/").body(empty()).unwrap();
        req.extensions_mut().insert(context(retrying_rule(vec![])));
        assert_eq!(svc.oneshot(req).await.unwrap().status(), StatusCode::OK, "504 is not in codes, but retried");
        assert_eq!(calls.load(Ordering::Relaxed), 2);
    }
}
