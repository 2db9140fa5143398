//! The route's whole-request timeout (retries included): 504 when it passes.

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::{Request, Response, StatusCode};
use tower::{Layer, Service};

use crate::http::{local_response, Body};
use crate::routing::RouteContext;

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

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let limit = req
            .extensions()
            .get::<RouteContext>()
            .and_then(|c| c.rule.request_timeout.map(|t| (t, c.backend.service.clone())));
        let fut = self.inner.call(req);
        Box::pin(async move {
            let Some((t, service)) = limit else { return fut.await };
            match tokio::time::timeout(t, fut).await {
                Ok(r) => r,
                Err(_) => Ok(local_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("weft: {service} did not answer within the route's {t:?} request timeout"),
                )),
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
