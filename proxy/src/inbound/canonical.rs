//! The inbound canonicalization layer: the callee's sidecar makes every
//! request canonical (`canonical.rs`) before authorization and rate limits
//! judge it and the app gets it. A caller's sidecar has done so already; this
//! edge is for a peer with a valid SVID that skips its own sidecar and speaks
//! mTLS HTTP/2 straight to this one: it must not get a spelling past policy
//! that the app would read otherwise. A request with no canonical form is a
//! [`ProxyError::NonCanonical`] (400), counted in
//! `weft_proxy_requests_refused_total{direction="inbound"}`.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{ready, Either, Ready};
use http::{Request, Response};
use tower::{Layer, Service};

use super::app::MISSING_CONTEXT;
use crate::canonical::canonicalize;
use crate::context::RequestContext;
use crate::error::ProxyError;
use crate::http::Body;
use crate::metrics::Metrics;

/// See the module docs.
#[derive(Clone)]
pub struct CanonicalLayer {
    metrics: Arc<Metrics>,
}

impl CanonicalLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for CanonicalLayer {
    type Service = Canonical<S>;
    fn layer(&self, inner: S) -> Canonical<S> {
        Canonical { inner, metrics: self.metrics.clone() }
    }
}

/// See [`CanonicalLayer`].
#[derive(Clone)]
pub struct Canonical<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B> Service<Request<B>> for Canonical<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = ProxyError>,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    /// The refusal at once, or the inner service's future as it is: no
    /// allocation per request.
    type Future = Either<Ready<Result<Response<Body>, ProxyError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(ctx) = req.extensions().get::<RequestContext>() else {
            return Either::Left(ready(Err(ProxyError::Internal { what: MISSING_CONTEXT })));
        };
        let slashes = ctx.snapshot.encoded_slashes();
        let peer = ctx.peer.clone();
        let (mut parts, body) = req.into_parts();
        if let Err(e) = canonicalize(&mut parts, slashes) {
            let e = ProxyError::NonCanonical(e);
            if let Some(reason) = e.refusal() {
                self.metrics.refused("inbound", reason);
            }
            let peer = peer.map(|p| p.to_string()).unwrap_or_default();
            tracing::info!(%peer, error = %e, "refused a request with no canonical form from a peer");
            return Either::Left(ready(Err(e)));
        }
        Either::Right(self.inner.call(Request::from_parts(parts, body)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::RespondLayer;
    use crate::http::local_response;
    use crate::state::Snapshot;
    use http::StatusCode;
    use std::sync::Mutex;
    use tower::{ServiceBuilder, ServiceExt};
    use weft_certs::SpiffeId;

    #[tokio::test]
    async fn the_app_and_the_layers_behind_see_only_canonical_requests() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let inner = tower::service_fn(move |req: Request<()>| {
            s.lock().unwrap().push(req.uri().to_string());
            async { Ok::<_, ProxyError>(local_response(StatusCode::OK, "app")) }
        });
        let metrics = Arc::new(Metrics::default());
        let svc = ServiceBuilder::new().layer(RespondLayer).layer(CanonicalLayer::new(metrics.clone())).service(inner);
        let peer = Arc::new(SpiffeId::parse("spiffe://td/a").unwrap());
        let snapshot = Arc::new(Snapshot::default());
        let send = |target: &str| {
            let mut req = Request::get(target).body(()).unwrap();
            req.extensions_mut().insert(RequestContext::inbound(peer.clone(), snapshot.clone()));
            svc.clone().oneshot(req)
        };
        assert_eq!(send("http://Backend.:80//admin/./users").await.unwrap().status(), StatusCode::OK);
        assert_eq!(*seen.lock().unwrap(), ["http://backend/admin/users"]);
        for bad in ["http://backend/admin%2Fusers", "http://backend/admin;x/users", "http://backend/../admin"] {
            assert_eq!(send(bad).await.unwrap().status(), StatusCode::BAD_REQUEST, "{bad}");
        }
        assert_eq!(seen.lock().unwrap().len(), 1, "refused requests never reach the layers behind");
        let refused = metrics
            .refused
            .get_or_create(&crate::metrics::RefusedLabels { direction: "inbound", reason: "non_canonical" })
            .get();
        assert_eq!(refused, 3);
    }
}
