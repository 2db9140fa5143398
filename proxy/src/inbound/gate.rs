//! A gate: the shape shared by the inbound checks that either let a request
//! through to the next service or refuse it with a [`ProxyError`]
//! (authorization, rate limits). Each check implements [`Gate`];
//! [`GateLayer`] makes it a tower layer.

use std::task::{Context, Poll};

use futures::future::{ready, Either, Ready};
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
    S: Service<http::Request<B>, Response = http::Response<Body>, Error = ProxyError>,
{
    type Response = http::Response<Body>;
    type Error = ProxyError;
    /// The refusal at once, or the inner service's future as it is: no
    /// allocation per request.
    type Future = Either<Ready<Result<Self::Response, ProxyError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Err(e) = self.gate.check(&req) {
            return Either::Left(ready(Err(e)));
        }
        Either::Right(self.inner.call(req))
    }
}
