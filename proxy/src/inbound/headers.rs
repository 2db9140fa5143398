//! The inbound header-size limit (`--max-header-bytes`): a calling sidecar's
//! request over it is refused with 431 before policy or the app sees it; the
//! local app's response over it becomes a 502 naming the limit (it cannot be
//! carried), marked [`LOCAL_LIMIT`] so the caller's sidecar does not count it
//! against this endpoint. The app may not set that mark itself.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};

use crate::error::{HeaderHop, ProxyError, LOCAL_LIMIT};
use crate::http::Body;
use crate::limits::{header_list_size, is_header_overflow, request_header_size};
use crate::metrics::{HeaderLimitLabels, Metrics};

/// See the module docs.
#[derive(Clone)]
pub struct HeaderLimitLayer {
    pub limit: usize,
    pub metrics: Arc<Metrics>,
}

impl<S> tower::Layer<S> for HeaderLimitLayer {
    type Service = HeaderLimit<S>;
    fn layer(&self, inner: S) -> HeaderLimit<S> {
        HeaderLimit { inner, limit: self.limit, metrics: self.metrics.clone() }
    }
}

/// See [`HeaderLimitLayer`].
#[derive(Clone)]
pub struct HeaderLimit<S> {
    inner: S,
    limit: usize,
    metrics: Arc<Metrics>,
}

impl<S> HeaderLimit<S> {
    fn refuse(&self, hop: HeaderHop, size: Option<usize>) -> ProxyError {
        let message = if hop.is_request() { "request" } else { "response" };
        self.metrics.headers_too_large.get_or_create(&HeaderLimitLabels { direction: "inbound", message }).inc();
        ProxyError::HeadersTooLarge { hop, size, limit: self.limit }
    }
}

impl<S, B> tower::Service<Request<B>> for HeaderLimit<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>, Error = ProxyError>,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = HeaderLimitFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let size = request_header_size(&req);
        if size > self.limit {
            let e = self.refuse(HeaderHop::RequestFromPeer, Some(size));
            return HeaderLimitFuture::Refused { e: Some(e) };
        }
        let this = HeaderLimit { inner: (), limit: self.limit, metrics: self.metrics.clone() };
        HeaderLimitFuture::Sent { fut: self.inner.call(req), this }
    }
}

pin_project_lite::pin_project! {
    /// [`HeaderLimit`]'s future: a named type rather than a boxed one, which
    /// would cost an allocation per request.
    #[project = HeaderLimitProj]
    pub enum HeaderLimitFuture<F> {
        Refused { e: Option<ProxyError> },
        Sent { #[pin] fut: F, this: HeaderLimit<()> },
    }
}

impl<F> std::future::Future for HeaderLimitFuture<F>
where
    F: std::future::Future<Output = Result<Response<Body>, ProxyError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let (fut, this) = match self.project() {
            HeaderLimitProj::Refused { e } => {
                return Poll::Ready(Err(e.take().expect("a refused request's future is polled once done")))
            }
            HeaderLimitProj::Sent { fut, this } => (fut, this),
        };
        Poll::Ready(match std::task::ready!(fut.poll(cx)) {
            Ok(mut resp) => {
                resp.headers_mut().remove(LOCAL_LIMIT);
                let size = header_list_size(resp.headers());
                if size > this.limit {
                    return Poll::Ready(Err(this.refuse(HeaderHop::ResponseFromApp, Some(size))));
                }
                Ok(resp)
            }
            Err(ProxyError::AppFailed { source, .. }) if is_header_overflow(&source) => {
                Err(this.refuse(HeaderHop::ResponseFromApp, None))
            }
            Err(e) => Err(e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::empty;
    use futures::future::BoxFuture;
    use tower::{Service, ServiceExt};

    fn app(
        header_bytes: usize,
    ) -> impl tower::Service<
        Request<()>,
        Response = Response<Body>,
        Error = ProxyError,
        Future = BoxFuture<'static, Result<Response<Body>, ProxyError>>,
    > + Clone {
        tower::service_fn(move |_req: Request<()>| -> BoxFuture<'static, Result<Response<Body>, ProxyError>> {
            Box::pin(async move {
                let mut r = Response::new(empty());
                r.headers_mut().insert("x-big", "a".repeat(header_bytes).parse().unwrap());
                r.headers_mut().insert(LOCAL_LIMIT, "forged".parse().unwrap());
                Ok(r)
            })
        })
    }

    fn layer() -> HeaderLimitLayer {
        HeaderLimitLayer { limit: 1000, metrics: Arc::new(Metrics::default()) }
    }

    #[tokio::test]
    async fn requests_over_the_limit_are_refused_with_431_before_the_app() {
        let mut svc = tower::Layer::layer(&layer(), app(10));
        let req = Request::get("/").header("cookie", "c".repeat(2000)).body(()).unwrap();
        let err = svc.ready().await.unwrap().call(req).await.unwrap_err();
        assert_eq!(err.status(), 431);
    }

    #[tokio::test]
    async fn app_responses_over_the_limit_become_502_and_the_app_cannot_forge_the_mark() {
        let resp = tower::Layer::layer(&layer(), app(10)).oneshot(Request::new(())).await.unwrap();
        assert!(resp.headers().get(LOCAL_LIMIT).is_none(), "the app set the sidecar's mark");
        let err = tower::Layer::layer(&layer(), app(2000)).oneshot(Request::new(())).await.unwrap_err();
        assert_eq!(err.status(), 502);
        assert!(err.to_string().starts_with("response from the local app: headers are 2"), "{err}");
    }
}
