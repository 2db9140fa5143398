//! A gate: the shape shared by the inbound checks that either let a request
//! through to the next service or refuse it with a [`ProxyError`]
//! (authorization, rate limits). Each check implements [`Gate`];
//! [`GateLayer`] makes it a tower layer.

use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tower::{Layer, Service};

use crate::error::ProxyError;
use crate::http::Body;

pub trait Gate: Clone + Send + Sync + 'static {
    /// `Err` refuses the request here; `Ok` lets it through.
    fn check<B>(&self, req: &http::Request<B>) -> Result<(), ProxyError>;
}

#[derive(Clone)]
pub struct GateLayer<G>(pub G);

impl<G: Clone, S> Layer<S> for GateLayer<G> {
    type Service = Gated<G, S>;
    fn layer(&self, inner: S) -> Gated<G, S> {
        Gated { gate: self.0.clone(), inner }
    }
}

#[derive(Clone)]
pub struct Gated<G, S> {
    gate: G,
    inner: S,
}

impl<G, S, B> Service<http::Request<B>> for Gated<G, S>
where
    G: Gate,
    S: Service<http::Request<B>, Response = http::Response<Body>, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Self::Response, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Err(e) = self.gate.check(&req) {
            return Box::pin(async { Err(e) });
        }
        // The standard tower dance: call the clone that was made ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(inner.call(req))
    }
}
