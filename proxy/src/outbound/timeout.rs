//! The route's whole-request timeout (retries included): a
//! [`ProxyError::RequestTimeout`] (504) when it passes.
//!
//! The deadline also travels in the request's [`RequestContext`], so the
//! endpoint service cuts the attempt that is running when it passes and
//! reports it to outlier detection as a failure of that endpoint (a future
//! dropped from outside could as well be a caller that went away).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{Layer, Service};

use crate::context::{Deadline, RequestContext};
use crate::error::ProxyError;
use crate::http::Body;

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
    S: Service<Request<B>, Response = Response<Body>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = TimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let ctx = req.extensions_mut().get_mut::<RequestContext>();
        let limit = ctx.and_then(|ctx| {
            let route = ctx.route.as_ref()?;
            let timeout = route.rule.request_timeout?;
            let service = route.backend.service.clone();
            let deadline = Deadline { at: tokio::time::Instant::now() + timeout, timeout };
            ctx.deadline = Some(deadline);
            Some((deadline, service))
        });
        let fut = self.inner.call(req);
        match limit {
            None => TimeoutFuture::Plain { fut },
            // Boxed: the timer is as large as the rest of a request's state,
            // and only routes with a timeout need it.
            Some((deadline, service)) => TimeoutFuture::Timed {
                fut: Box::pin(tokio::time::timeout_at(deadline.at, fut)),
                deadline,
                service: Some(service),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// [`Timeout`]'s future: the inner one as it is when the route has no
    /// timeout (no allocation per request), under the deadline when it has.
    #[project = TimeoutProj]
    pub enum TimeoutFuture<F> {
        Plain { #[pin] fut: F },
        Timed { fut: Pin<Box<tokio::time::Timeout<F>>>, deadline: Deadline, service: Option<String> },
    }
}

impl<F> Future for TimeoutFuture<F>
where
    F: Future<Output = Result<Response<Body>, ProxyError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match self.project() {
            TimeoutProj::Plain { fut } => fut.poll(cx),
            TimeoutProj::Timed { fut, deadline, service } => match std::task::ready!(fut.as_mut().poll(cx)) {
                Ok(r) => Poll::Ready(r),
                Err(_) => Poll::Ready(Err(ProxyError::RequestTimeout {
                    service: service.take().unwrap_or_default(),
                    timeout: deadline.timeout,
                    peer: None,
                })),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::local_response;
    use crate::state::routes::Rule;
    use crate::state::Snapshot;
    use http::StatusCode;
    use std::sync::Arc;
    use std::time::Duration;
    use tower::ServiceExt;

    fn request(timeout: Option<Duration>) -> Request<()> {
        let mut rule = Rule::default_for("api");
        rule.request_timeout = timeout;
        let backend = rule.backends[0].clone();
        let mut req = Request::new(());
        req.extensions_mut().insert(RequestContext::outbound(Arc::new(Snapshot::default()), Arc::new(rule), backend));
        req
    }

    #[tokio::test(start_paused = true)]
    async fn answers_504_when_the_route_timeout_passes() {
        let slow = tower::service_fn(|_req: Request<()>| async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok::<_, ProxyError>(local_response(StatusCode::OK, "late"))
        });
        let svc = TimeoutLayer.layer(slow);
        let err = svc.clone().oneshot(request(Some(Duration::from_millis(500)))).await.unwrap_err();
        assert_eq!(err.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(matches!(err, ProxyError::RequestTimeout { ref service, .. } if service == "api"));
        let resp = svc.clone().oneshot(request(Some(Duration::from_secs(5)))).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let resp = svc.oneshot(request(None)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "no timeout configured");
        // The deadline travels with the request for the attempt to honour.
        let seen = tower::service_fn(|req: Request<()>| async move {
            let d = req.extensions().get::<RequestContext>().and_then(|c| c.deadline);
            assert_eq!(d.map(|d| d.timeout), Some(Duration::from_millis(500)));
            Ok::<_, ProxyError>(local_response(StatusCode::OK, "ok"))
        });
        TimeoutLayer.layer(seen).oneshot(request(Some(Duration::from_millis(500)))).await.unwrap();
    }
}
