//! The route's whole-request timeout (retries included): 504 when it passes.
//!
//! The deadline also travels with the request as a [`Deadline`] extension, so
//! the endpoint service cuts the attempt that is running when it passes and
//! reports it to outlier detection as a failure of that endpoint (a future
//! dropped from outside could as well be a caller that went away).

use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Request, Response, StatusCode};
use tower::{Layer, Service};

use crate::http::{local_response, Body};
use crate::routing::RouteContext;

/// When the route's request timeout passes (a request extension).
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    pub at: tokio::time::Instant,
    /// The route's request timeout, for the message.
    pub timeout: Duration,
}

impl Deadline {
    pub fn passed(&self) -> bool {
        tokio::time::Instant::now() >= self.at
    }
}

/// The body of the 504 a request gets when the route's timeout passes.
pub fn timeout_message(service: &str, timeout: Duration) -> String {
    format!("weft: {service} did not answer within the route's {timeout:?} request timeout")
}

#[derive(Clone, Default)]
pub struct TimeoutLayer;

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout { inner }
    }
}

#[derive(Clone)]
pub struct Timeout<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Timeout<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let limit = req
            .extensions()
            .get::<RouteContext>()
            .and_then(|c| c.rule.request_timeout.map(|t| (t, c.backend.service.clone())));
        let deadline = limit.as_ref().map(|(t, _)| Deadline { at: tokio::time::Instant::now() + *t, timeout: *t });
        if let Some(d) = deadline {
            req.extensions_mut().insert(d);
        }
        let fut = self.inner.call(req);
        Box::pin(async move {
            let (Some((t, service)), Some(deadline)) = (limit, deadline) else { return fut.await };
            match tokio::time::timeout_at(deadline.at, fut).await {
                Ok(r) => r,
                Err(_) => Ok(local_response(StatusCode::GATEWAY_TIMEOUT, timeout_message(&service, t))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Table;
    use crate::routing::Rule;
    use std::sync::Arc;
    use std::time::Duration;
    use tower::ServiceExt;

    fn request(timeout: Option<Duration>) -> Request<()> {
        let mut rule = Rule::default_for("api");
        rule.request_timeout = timeout;
        let backend = rule.backends[0].clone();
        let mut req = Request::new(());
        req.extensions_mut().insert(RouteContext { table: Arc::new(Table::default()), rule: Arc::new(rule), backend });
        req
    }

    #[tokio::test(start_paused = true)]
    async fn answers_504_when_the_route_timeout_passes() {
        let slow = tower::service_fn(|_req: Request<()>| async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok::<_, Infallible>(local_response(StatusCode::OK, "late"))
        });
        let svc = TimeoutLayer.layer(slow);
        let resp = svc.clone().oneshot(request(Some(Duration::from_millis(500)))).await.unwrap();
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
        let resp = svc.clone().oneshot(request(Some(Duration::from_secs(5)))).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let resp = svc.oneshot(request(None)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "no timeout configured");
    }
}
