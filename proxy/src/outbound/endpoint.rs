//! The innermost outbound service: pick an endpoint of the routed backend
//! (P2C over EWMA, outliers ejected), send on the pooled mTLS connection with
//! the per-try timeout, and feed the outcome back to the balancer.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Request, Response, StatusCode};
use hyper::client::conn::http2::SendRequest;
use tower::Service;
use weft_certs::SpiffeId;

use super::pool::Pool;
use super::timeout::{timeout_message, Deadline};
use crate::balance::{Balancer, InFlight};
use crate::http::{boxed, local_response, strip_hop_by_hop, Body};
use crate::metrics::Metrics;
use crate::routing::RouteContext;

/// Which endpoint answered (a response extension, for metrics).
#[derive(Clone, Debug)]
pub struct ServedBy(pub SpiffeId);

/// Marks a response the sidecar made because the endpoint could not be
/// reached or did not answer: always worth a retry, whatever its code.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionFailure;

#[derive(Clone)]
pub struct EndpointService {
    pub pool: Arc<Pool>,
    pub balancer: Arc<Balancer>,
    pub metrics: Arc<Metrics>,
}

impl Service<Request<Body>> for EndpointService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let Some(ctx) = req.extensions().get::<RouteContext>().cloned() else {
                return Ok(local_response(StatusCode::INTERNAL_SERVER_ERROR, "weft: internal error: unrouted request"));
            };
            let service = ctx.backend.service.as_str();
            let limit = AttemptLimit::new(ctx.rule.try_timeout, req.extensions().get::<Deadline>().copied());
            let mut candidates = ctx.backend.select(ctx.table.endpoints(service));
            let mut req = Some(req);
            let mut refused = None;
            // An endpoint that cannot be connected to never saw the request, so
            // another one may take it, whatever the method (e.g. a peer that
            // is draining or just died and is still in discovery).
            for _ in 0..MAX_CONNECT_TRIES {
                let Some((ep, in_flight)) = this.balancer.pick(&candidates) else { break };
                let (addr, id) = (ep.address, ep.spiffe_id.clone());
                let result = match limit.run(this.pool.get(addr, &id)).await {
                    Err(_elapsed) => Err(local_response(StatusCode::GATEWAY_TIMEOUT, limit.message(service))),
                    Ok(Err(e)) => {
                        tracing::warn!(endpoint = %addr, error = %e, "no connection to endpoint");
                        this.report(in_flight, false);
                        candidates.retain(|c| c.address != addr);
                        refused = Some((id, local_response(StatusCode::BAD_GATEWAY, format!("weft: {e}"))));
                        continue;
                    }
                    Ok(Ok(sender)) => {
                        let req = req.take().expect("the request is sent at most once");
                        this.send(sender, addr, req, &limit, service).await
                    }
                };
                let failed = match &result {
                    Ok(r) => r.status().is_server_error(),
                    Err(_) => true,
                };
                this.report(in_flight, !failed);
                return Ok(served_by(result, id));
            }
            Ok(match refused {
                Some((id, resp)) => served_by(Err(resp), id),
                None => {
                    let b = &ctx.backend;
                    let subset = if b.subset.is_empty() { String::new() } else { format!(" subset {:?}", b.subset) };
                    local_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("weft: no endpoints for service {:?}{subset}", b.service),
                    )
                }
            })
        })
    }
}

/// How many endpoints one attempt tries to connect to before it gives up.
const MAX_CONNECT_TRIES: usize = 3;

/// The response to hand back, marked with the endpoint it went to; the
/// sidecar's own error responses are marked as connection failures.
fn served_by(result: Result<Response<Body>, Response<Body>>, id: SpiffeId) -> Response<Body> {
    let mut resp = result.unwrap_or_else(|mut local| {
        local.extensions_mut().insert(ConnectionFailure);
        local
    });
    resp.extensions_mut().insert(ServedBy(id));
    resp
}

impl EndpointService {
    /// Feeds an attempt's outcome to the balancer (latency, outlier detection).
    fn report(&self, in_flight: InFlight, ok: bool) {
        if in_flight.done(ok) {
            self.metrics.ejections.inc();
        }
    }

    /// Sends on an open connection; an `Err` is the sidecar's own error response.
    async fn send(
        &self,
        mut sender: SendRequest<Body>,
        addr: SocketAddr,
        req: Request<Body>,
        limit: &AttemptLimit,
        service: &str,
    ) -> Result<Response<Body>, Response<Body>> {
        match limit.run(sender.send_request(req)).await {
            Err(_elapsed) => Err(local_response(StatusCode::GATEWAY_TIMEOUT, limit.message(service))),
            Ok(Ok(resp)) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Ok(Response::from_parts(parts, boxed(body)))
            }
            Ok(Err(e)) => {
                tracing::warn!(endpoint = %addr, error = %e, "request to endpoint failed");
                Err(local_response(StatusCode::BAD_GATEWAY, format!("weft: upstream {addr}: {e}")))
            }
        }
    }
}

/// When one attempt must end: its per-try timeout or the route's request
/// deadline, whichever comes first.
#[derive(Clone, Copy, Debug)]
struct AttemptLimit {
    until: Option<tokio::time::Instant>,
    /// The per-try timeout, when it is what ends the attempt.
    per_try: Option<Duration>,
    deadline: Option<Deadline>,
}

impl AttemptLimit {
    fn new(try_timeout: Option<Duration>, deadline: Option<Deadline>) -> Self {
        let per_try = try_timeout.map(|t| tokio::time::Instant::now() + t);
        match (per_try, deadline) {
            (Some(p), Some(d)) if d.at < p => Self { until: Some(d.at), per_try: None, deadline },
            (Some(p), _) => Self { until: Some(p), per_try: try_timeout, deadline },
            (None, d) => Self { until: d.map(|d| d.at), per_try: None, deadline },
        }
    }

    /// Runs `f` until this limit passes.
    async fn run<F: std::future::Future>(&self, f: F) -> Result<F::Output, tokio::time::error::Elapsed> {
        match self.until {
            None => Ok(f.await),
            Some(until) => tokio::time::timeout_at(until, f).await,
        }
    }

    fn message(&self, service: &str) -> String {
        match (self.per_try, self.deadline) {
            (Some(t), _) => format!("weft: attempt timed out after {t:?}"),
            (None, Some(d)) => timeout_message(service, d.timeout),
            (None, None) => "weft: attempt timed out".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn an_attempt_ends_at_the_earlier_of_per_try_timeout_and_request_deadline() {
        let now = Instant::now();
        let deadline =
            |after_ms| Deadline { at: now + Duration::from_millis(after_ms), timeout: Duration::from_secs(1) };

        let l = AttemptLimit::new(Some(Duration::from_millis(200)), Some(deadline(1000)));
        assert_eq!(l.until, Some(now + Duration::from_millis(200)));
        assert_eq!(l.message("api"), "weft: attempt timed out after 200ms");

        let l = AttemptLimit::new(Some(Duration::from_millis(900)), Some(deadline(300)));
        assert_eq!(l.until, Some(now + Duration::from_millis(300)));
        assert_eq!(l.message("api"), "weft: api did not answer within the route's 1s request timeout");

        let l = AttemptLimit::new(None, Some(deadline(300)));
        assert_eq!(l.until, Some(now + Duration::from_millis(300)));
        assert!(AttemptLimit::new(None, None).until.is_none());
    }
}
