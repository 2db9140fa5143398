//! The rate-limit layer: an inbound HTTP request takes a token from every
//! limit of this sidecar's service that applies (`state/ratelimit.rs`), or
//! is refused with [`ProxyError::RateLimited`] (429 with `Retry-After`). A
//! CONNECT tunnel is one long request and is not limited here.

use std::sync::Arc;

use super::app::MISSING_CONTEXT;
use super::gate::{Gate, GateLayer};
use crate::context::RequestContext;
use crate::error::ProxyError;
use crate::metrics::{LimitLabels, Metrics};
use crate::state::routes::RequestInfo;

/// The gate that enforces the service's rate limits.
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
    fn check<B>(&self, req: &http::Request<B>) -> Result<(), ProxyError> {
        if req.method() == http::Method::CONNECT {
            return Ok(());
        }
        let ctx = req.extensions().get::<RequestContext>();
        let Some((ctx, peer)) = ctx.and_then(|c| Some((c, c.peer.as_ref()?))) else {
            return Err(ProxyError::Internal { what: MISSING_CONTEXT });
        };
        let Some(limits) = ctx.snapshot.rate_limits.as_ref() else { return Ok(()) };
        let info = RequestInfo {
            method: req.method(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
        };
        let refusal = match limits.check_request(peer, &info, &ctx.snapshot.routes) {
            Ok(()) => return Ok(()),
            Err(r) => r,
        };
        self.metrics.rate_limited.get_or_create(&LimitLabels { limit: refusal.limit.clone() }).inc();
        Err(ProxyError::RateLimited { limit: refusal.limit, retry_after: refusal.wait })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::RespondLayer;
    use crate::http::local_response;
    use crate::state::ratelimit::{tests::limiter, LimitClock};
    use crate::state::Snapshot;
    use http::StatusCode;
    use tower::{ServiceBuilder, ServiceExt};
    use weft_certs::SpiffeId;

    #[tokio::test]
    async fn answers_429_with_retry_after_past_the_budget() {
        let clock = LimitClock::default();
        let snapshot = Arc::new(Snapshot { rate_limits: Some(limiter("service", &clock)), ..Default::default() });
        let inner = tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, ProxyError>(local_response(StatusCode::OK, "app"))
        });
        let svc = ServiceBuilder::new()
            .layer(RespondLayer)
            .layer(RateLimit::layer(Arc::new(Metrics::default())))
            .service(inner);
        let peer = Arc::new(SpiffeId::parse("spiffe://td/a").unwrap());
        let mut codes = Vec::new();
        for _ in 0..7 {
            let mut req = http::Request::get("/limited/x").body(()).unwrap();
            req.extensions_mut().insert(RequestContext::inbound(peer.clone(), snapshot.clone()));
            let resp = svc.clone().oneshot(req).await.unwrap();
            if resp.status() == StatusCode::TOO_MANY_REQUESTS {
                assert_eq!(resp.headers()[http::header::RETRY_AFTER], "1");
            }
            codes.push(resp.status().as_u16());
        }
        assert_eq!(codes, [200, 200, 200, 200, 200, 429, 429]);
    }
}
