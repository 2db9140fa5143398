//! The innermost outbound service: pick an endpoint of the routed backend
//! (P2C over EWMA, outliers ejected; `state/balance.rs`), send on the pooled
//! mTLS connection with the per-try timeout, and feed the outcome back to
//! the balancer. Failures are [`ProxyError`]s naming the endpoint.
//!
//! The outcome: an HTTP response fails the endpoint on 5xx; a gRPC response
//! on a server-fault `grpc-status` ([`grpc::is_endpoint_failure`]), read
//! from its headers (trailers-only) or, when the status comes in trailers,
//! at the end of its body (the balancer hears of the call then, with the
//! latency to its response headers).

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use tower::Service;
use weft_certs::SpiffeId;

use super::pool::{ConnKind, Lease, PeerSender, Pool};
use super::probe;
use crate::context::{Deadline, RequestContext, ServedBy};
use crate::error::{peer_error, HeaderHop, ProxyError, LOCAL_LIMIT};
use crate::extended_connect::{self, Carried};
use crate::grpc;
use crate::http::{boxed, strip_hop_by_hop, Body, UNSENT};
use crate::inbound::app_client::REPLAY_MAX;
use crate::limits::header_list_size;
use crate::metrics::HeaderLimitLabels;
use crate::metrics::Metrics;
use crate::state::balance::{self, InFlight};

#[derive(Clone)]
pub struct EndpointService {
    pub pool: Arc<Pool>,
    pub metrics: Arc<Metrics>,
}

impl Service<Request<Body>> for EndpointService {
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Response<Body>, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let ctx = req.extensions().get::<RequestContext>().cloned();
            let Some((ctx, route)) = ctx.and_then(|c| c.route.clone().map(|r| (c, r))) else {
                return Err(ProxyError::Internal { what: "unrouted request" });
            };
            let service = route.backend.service.as_str();
            let limit = AttemptLimit::new(route.rule.try_timeout, ctx.deadline);
            let mut candidates = route.backend.select(ctx.snapshot.endpoints(service));
            for ep in balance::probes_due(&candidates) {
                tokio::spawn(probe::run(this.pool.clone(), this.metrics.clone(), ep.clone(), service.to_string()));
            }
            let mut req = Some(match Unsent::keep_now(req) {
                Ok(unsent) => unsent,
                // Boxed: a body to buffer is the rare case, and its future
                // inline would make every request's future larger.
                Err(req) => Box::pin(Unsent::keep(req)).await,
            });
            let mut refused = None;
            let mut last_refusal = None;
            // An endpoint that cannot be connected to, or whose sidecar says
            // its app refused the connection, never saw the request, so
            // another one may take it, whatever the method (e.g. a peer that
            // is draining or just died and is still in discovery).
            for _ in 0..MAX_CONNECT_TRIES {
                let Some((ep, mut in_flight)) = balance::pick(&candidates) else { break };
                let (addr, id) = (ep.address, ep.spiffe_id.clone());
                let kind = req.as_ref().map_or(ConnKind::Requests, Unsent::conn_kind);
                let result = match limit.run(this.pool.get(ep, kind)).await {
                    Err(_elapsed) => Err(limit.error(service, &id, addr)),
                    Ok(Err(e)) => {
                        tracing::warn!(endpoint = %addr, error = %e, "no connection to endpoint");
                        this.report(in_flight, false);
                        candidates.retain(|c| c.address != addr);
                        refused = Some(e);
                        continue;
                    }
                    Ok(Ok(lease)) => {
                        let Some(unsent) = req.take() else { break };
                        // The endpoint's latency is its answer time, not the connection's set-up.
                        in_flight.sent();
                        match this.send(lease, addr, &id, unsent, &limit, service).await {
                            Sent::Answered(resp, again) if again.is_some() && never_reached_app(&resp) => {
                                tracing::info!(endpoint = %addr, "the endpoint's app refused the request unseen; trying another endpoint");
                                this.report(in_flight, false);
                                candidates.retain(|c| c.address != addr);
                                req = again.map(Kept::resend);
                                refused = None;
                                last_refusal = Some(resp);
                                continue;
                            }
                            Sent::Answered(resp, _) => Ok(resp),
                            Sent::HandedBack(again, e) => {
                                tracing::info!(endpoint = %addr, error = %e, "request not taken by the endpoint's sidecar; trying another endpoint");
                                this.report(in_flight, false);
                                candidates.retain(|c| c.address != addr);
                                req = Some(*again);
                                refused = Some(e);
                                continue;
                            }
                            Sent::Failed(e) => Err(e),
                        }
                    }
                };
                let resp = match result {
                    Ok(resp) => resp,
                    // A local limit (this sidecar's or the peer's) says nothing of the endpoint's health.
                    Err(e @ ProxyError::HeadersTooLarge { .. }) => {
                        this.report(in_flight, true);
                        return Err(e);
                    }
                    Err(e) => {
                        this.report(in_flight, false);
                        return Err(e);
                    }
                };
                let mut resp = match classify(&resp) {
                    Verdict::Now { ok } if !measures_latency(&resp) => {
                        if in_flight.done_without_latency(ok) {
                            this.metrics.ejections.inc();
                        }
                        resp
                    }
                    Verdict::Now { ok } => {
                        this.report(in_flight, ok);
                        resp
                    }
                    Verdict::AtTrailers => this.report_at_trailers(resp, in_flight),
                };
                resp.extensions_mut().insert(ServedBy(id));
                return Ok(resp);
            }
            // Every endpoint tried refused unseen: the last refusal is the answer.
            if let Some(resp) = last_refusal {
                return Ok(resp);
            }
            Err(refused.unwrap_or_else(|| ProxyError::NoEndpoints {
                service: route.backend.service.clone(),
                subset: route.backend.subset.clone(),
            }))
        })
    }
}

/// Whether a peer sidecar's answer says the request never reached its app.
fn never_reached_app(resp: &Response<Body>) -> bool {
    resp.status().is_server_error() && resp.headers().contains_key(UNSENT)
}

/// Whether an answer's time says anything of the endpoint's speed: a 429
/// or 403 (a rate limit or policy, the callee sidecar's or the app's) comes
/// at once whatever the app's latency, and would make a refusing endpoint
/// look fast.
fn measures_latency(resp: &Response<Body>) -> bool {
    let status = resp.status();
    status != http::StatusCode::TOO_MANY_REQUESTS
        && status != http::StatusCode::FORBIDDEN
        && !resp.headers().contains_key(LOCAL_LIMIT)
}

/// A request on its way to an endpoint, kept so that it can go to another
/// one when the first never saw it: its head, and its body when that is
/// small enough to keep ([`REPLAY_MAX`]).
struct Unsent {
    req: Request<Body>,
    /// The head and body again, for another endpoint; None when the body
    /// cannot be kept (streamed, large, `Expect: 100-continue`, or a carried
    /// exchange).
    copy: Option<Kept>,
}

/// A request's head and body kept for another endpoint. The copy sent on
/// is made only when one is needed ([`Kept::resend`]): nearly every request
/// is answered by its first endpoint.
struct Kept {
    parts: http::request::Parts,
    body: bytes::Bytes,
}

impl Unsent {
    /// The kind of pooled connection it goes on: a carried exchange needs
    /// hyper's upgrades.
    fn conn_kind(&self) -> ConnKind {
        if self.req.extensions().get::<Carried>().is_some() {
            ConnKind::Upgrades
        } else {
            ConnKind::Requests
        }
    }

    /// [`Unsent::keep`] without waiting: the request back when its body
    /// is to be buffered first.
    // The request handed back is as large as `Self` (the Ok side): boxing
    // it would add an allocation to every request with a body.
    #[allow(clippy::result_large_err)]
    fn keep_now(req: Request<Body>) -> Result<Self, Request<Body>> {
        use http_body::Body as _;
        let (parts, body) = req.into_parts();
        if body.is_end_stream() && parts.extensions.get::<Carried>().is_none() {
            if parts.headers.contains_key(http::header::EXPECT) {
                return Ok(Self { req: Request::from_parts(parts, body), copy: None });
            }
            // No extensions in the copy: a kept request is never a carried
            // exchange, the only kind whose extensions the send reads.
            let copy = crate::http::head_only(&parts);
            return Ok(Self {
                req: Request::from_parts(parts, body),
                copy: Some(Kept { parts: copy, body: bytes::Bytes::new() }),
            });
        }
        Err(Request::from_parts(parts, body))
    }

    /// Keeps a copy of `req` if it can be sent again (buffering its body;
    /// a request without one, e.g. a GET, keeps its head only).
    async fn keep(req: Request<Body>) -> Self {
        use http_body::Body as _;
        let (parts, body) = req.into_parts();
        let keepable = parts.extensions.get::<Carried>().is_none()
            && !parts.headers.contains_key(http::header::EXPECT)
            && (body.is_end_stream() || body.size_hint().exact().is_some_and(|n| n <= REPLAY_MAX));
        if !keepable {
            return Self { req: Request::from_parts(parts, body), copy: None };
        }
        if body.is_end_stream() {
            let copy = crate::http::head_only(&parts);
            return Self {
                req: Request::from_parts(parts, body),
                copy: Some(Kept { parts: copy, body: bytes::Bytes::new() }),
            };
        }
        match body.collect().await {
            Ok(b) => {
                let body = b.to_bytes();
                let copy = crate::http::head_only(&parts);
                let req = Request::from_parts(parts, boxed(Full::new(body.clone())));
                Self { req, copy: Some(Kept { parts: copy, body }) }
            }
            // The caller's body broke: the request fails with that error.
            Err(e) => {
                let broken = StreamBody::new(futures::stream::iter([Err::<http_body::Frame<bytes::Bytes>, _>(e)]));
                Self { req: Request::from_parts(parts, boxed(broken)), copy: None }
            }
        }
    }

    /// The request to send, and what is kept for another endpoint.
    fn split(self) -> (Request<Body>, Option<Kept>) {
        (self.req, self.copy)
    }
}

impl Kept {
    /// The kept request, to send to another endpoint (and kept again).
    fn resend(self) -> Unsent {
        let req = Request::from_parts(crate::http::head_only(&self.parts), boxed(Full::new(self.body.clone())));
        Unsent { req, copy: Some(self) }
    }
}

/// A send's outcome.
// Answered is the common case and lives on the stack for a moment: boxing
// it would cost an allocation per request; the rare HandedBack is boxed.
#[allow(clippy::large_enum_variant)]
enum Sent {
    /// An answer, with the request kept if it can go to another endpoint.
    Answered(Response<Body>, Option<Kept>),
    /// The peer's sidecar did not take the request (its connection was
    /// closing): hyper handed it back untouched.
    HandedBack(Box<Unsent>, ProxyError),
    Failed(ProxyError),
}

/// How many endpoints one attempt tries to connect to before it gives up.
const MAX_CONNECT_TRIES: usize = 3;

/// When a response's outcome is known.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// From its headers: HTTP status, or a trailers-only gRPC status.
    Now { ok: bool },
    /// A gRPC response whose `grpc-status` comes in its trailers.
    AtTrailers,
}

fn classify(resp: &Response<Body>) -> Verdict {
    let status = resp.status();
    if status != http::StatusCode::OK || !grpc::is_grpc(resp.headers()) {
        let local_limit = resp.headers().contains_key(LOCAL_LIMIT);
        return Verdict::Now { ok: !status.is_server_error() || local_limit };
    }
    match grpc::status(resp.headers()) {
        Some(code) => Verdict::Now { ok: !grpc::is_endpoint_failure(code) },
        None => Verdict::AtTrailers,
    }
}

impl EndpointService {
    /// Feeds an attempt's outcome to the balancer (latency, outlier detection).
    fn report(&self, in_flight: InFlight, ok: bool) {
        if in_flight.done(ok) {
            self.metrics.ejections.inc();
        }
    }

    /// Reports a gRPC call to the balancer when its body ends: failed on a
    /// server-fault status, a missing status or a broken stream; not at all
    /// when the caller cancels it (not the endpoint's doing). The latency
    /// is the time to the response headers, whatever the stream's length.
    fn report_at_trailers(&self, resp: Response<Body>, in_flight: InFlight) -> Response<Body> {
        let latency = in_flight.elapsed();
        let metrics = self.metrics.clone();
        resp.map(move |body| {
            http_body_util::BodyExt::boxed(grpc::ObservedBody::new(body, move |outcome| {
                let ok = match outcome {
                    grpc::Outcome::Status(code) => !grpc::is_endpoint_failure(code),
                    grpc::Outcome::NoStatus | grpc::Outcome::Error => false,
                    grpc::Outcome::Cancelled => return,
                };
                if in_flight.done_after(latency, ok) {
                    metrics.ejections.inc();
                }
            }))
        })
    }

    /// Sends on an open connection; the lease is held until the response body ends.
    async fn send(
        &self,
        lease: Lease,
        addr: SocketAddr,
        id: &SpiffeId,
        unsent: Unsent,
        limit: &AttemptLimit,
        service: &str,
    ) -> Sent {
        let Lease { sender, guard } = lease;
        let (mut req, again) = unsent.split();
        // A carried exchange (upgrade, 100-continue) goes on after the CONNECT's answer.
        let carried = req.extensions_mut().remove::<Carried>();
        let can_resend = carried.is_none();
        let exchange = async move {
            match sender {
                PeerSender::Requests(mut sender) => {
                    sender.send(req, guard).await.map_err(|e| (e.unsent, peer_error(e.source)))
                }
                PeerSender::Upgrades(mut sender) => {
                    let fail = |e: hyper::Error| (None, peer_error(e));
                    let resp = sender
                        .try_send_request(req)
                        .await
                        .map_err(|mut e| (e.take_message(), peer_error(e.into_error())))?;
                    let resp = match carried {
                        // Boxed: rare (upgrades, 100-continue), and large inline.
                        Some(carried) => Box::pin(extended_connect::finish(resp, carried)).await.map_err(fail)?,
                        None => resp,
                    };
                    // The stream stays counted on its connection until the body ends.
                    Ok(resp.map(|body| {
                        boxed(body.map_frame(move |f| {
                            let _held = &guard;
                            f
                        }))
                    }))
                }
            }
        };
        match limit.run(exchange).await {
            Err(_elapsed) => Sent::Failed(limit.error(service, id, addr)),
            Ok(Ok(resp)) => {
                let (mut parts, body) = resp.into_parts();
                let max = self.pool.limits().max_header_bytes;
                let size = header_list_size(&parts.headers);
                if size > max {
                    let labels = HeaderLimitLabels { direction: "outbound", message: "response" };
                    self.metrics.headers_too_large.get_or_create(&labels).inc();
                    return Sent::Failed(ProxyError::HeadersTooLarge {
                        hop: HeaderHop::ResponseFromPeer,
                        size: Some(size),
                        limit: max,
                    });
                }
                strip_hop_by_hop(&mut parts.headers);
                Sent::Answered(Response::from_parts(parts, body), again)
            }
            Ok(Err((Some(req), source))) if can_resend => {
                let e = ProxyError::UpstreamReset { addr, peer: id.clone(), source };
                Sent::HandedBack(Box::new(Unsent { req, copy: again }), e)
            }
            Ok(Err((_, source))) => {
                tracing::warn!(endpoint = %addr, error = %source, "request to endpoint failed");
                Sent::Failed(ProxyError::UpstreamReset { addr, peer: id.clone(), source })
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
            // Boxed: the timer is as large as a request's other state, and
            // only routes with a timeout need it.
            Some(until) => Box::pin(tokio::time::timeout_at(until, f)).await,
        }
    }

    /// The failure of an attempt this limit cut, at endpoint `peer`.
    fn error(&self, service: &str, peer: &SpiffeId, addr: SocketAddr) -> ProxyError {
        match (self.per_try, self.deadline) {
            (None, Some(d)) => ProxyError::RequestTimeout {
                service: service.to_string(),
                timeout: d.timeout,
                peer: Some(peer.clone()),
            },
            (per_try, _) => ProxyError::AttemptTimeout { after: per_try.unwrap_or_default(), peer: peer.clone(), addr },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[test]
    fn grpc_responses_are_judged_by_grpc_status() {
        let resp = |status: u16, headers: &[(&str, &str)]| {
            let mut b = Response::builder().status(status);
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            b.body(crate::http::empty()).unwrap()
        };
        let grpc = ("content-type", "application/grpc");
        assert_eq!(classify(&resp(200, &[])), Verdict::Now { ok: true });
        assert_eq!(classify(&resp(503, &[])), Verdict::Now { ok: false });
        assert_eq!(classify(&resp(200, &[grpc])), Verdict::AtTrailers);
        assert_eq!(classify(&resp(200, &[grpc, ("grpc-status", "14")])), Verdict::Now { ok: false });
        assert_eq!(classify(&resp(200, &[grpc, ("grpc-status", "13")])), Verdict::Now { ok: false });
        assert_eq!(classify(&resp(200, &[grpc, ("grpc-status", "0")])), Verdict::Now { ok: true });
        assert_eq!(classify(&resp(200, &[grpc, ("grpc-status", "7")])), Verdict::Now { ok: true });
        assert_eq!(classify(&resp(200, &[grpc, ("grpc-status", "8")])), Verdict::Now { ok: true });
        assert_eq!(classify(&resp(502, &[grpc])), Verdict::Now { ok: false });
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_ends_at_the_earlier_of_per_try_timeout_and_request_deadline() {
        let now = Instant::now();
        let deadline =
            |after_ms| Deadline { at: now + Duration::from_millis(after_ms), timeout: Duration::from_secs(1) };

        let l = AttemptLimit::new(Some(Duration::from_millis(200)), Some(deadline(1000)));
        assert_eq!(l.until, Some(now + Duration::from_millis(200)));
        let (id, addr) = (SpiffeId::parse("spiffe://td/api").unwrap(), "127.0.0.1:1".parse().unwrap());
        assert_eq!(
            l.error("api", &id, addr).to_string(),
            "attempt timed out after 200ms (the route's per-try timeout) waiting for the sidecar of spiffe://td/api at 127.0.0.1:1"
        );

        let l = AttemptLimit::new(Some(Duration::from_millis(900)), Some(deadline(300)));
        assert_eq!(l.until, Some(now + Duration::from_millis(300)));
        assert_eq!(
            l.error("api", &id, addr).to_string(),
            "api did not answer within the route's 1s request timeout (last attempt: the sidecar of spiffe://td/api)"
        );

        let l = AttemptLimit::new(None, Some(deadline(300)));
        assert_eq!(l.until, Some(now + Duration::from_millis(300)));
        assert!(AttemptLimit::new(None, None).until.is_none());
    }

    #[test]
    fn rate_limits_and_denials_say_nothing_of_latency() {
        let resp = |status: u16| Response::builder().status(status).body(crate::http::empty()).unwrap();
        assert!(measures_latency(&resp(200)) && measures_latency(&resp(503)));
        assert!(!measures_latency(&resp(429)) && !measures_latency(&resp(403)));
        let mut limited = resp(431);
        limited.headers_mut().insert(LOCAL_LIMIT, http::HeaderValue::from_static("max-header-bytes"));
        assert!(!measures_latency(&limited));
    }

    #[test]
    fn only_a_marked_server_error_never_reached_the_app() {
        let resp = |status: u16, unsent: bool| {
            let mut r = Response::builder().status(status).body(crate::http::empty()).unwrap();
            if unsent {
                r.headers_mut().insert(UNSENT, http::HeaderValue::from_static("app-refused"));
            }
            r
        };
        assert!(never_reached_app(&resp(502, true)));
        assert!(!never_reached_app(&resp(502, false)), "a plain 502 may have reached the app");
        assert!(!never_reached_app(&resp(200, true)), "an answer is an answer");
    }

    #[tokio::test]
    async fn a_small_request_is_kept_for_another_endpoint_a_streamed_one_is_not() {
        let req = Request::post("http://api/x").header("x-a", "1").body(boxed(Full::new(bytes::Bytes::from("hi"))));
        let (first, again) = Unsent::keep(req.unwrap()).await.split();
        let again = again.expect("a 2-byte body is kept").resend();
        let (second, _) = again.split();
        for r in [first, second] {
            assert_eq!((r.method(), r.uri().path()), (&http::Method::POST, "/x"));
            assert_eq!(r.headers()["x-a"], "1");
            assert_eq!(r.into_body().collect().await.unwrap().to_bytes(), "hi");
        }
        let get = Request::get("http://api/y").header("x-b", "2").body(crate::http::empty()).unwrap();
        let (first, again) = Unsent::keep(get).await.split();
        let (second, _) = again.expect("a request without a body is kept").resend().split();
        for r in [first, second] {
            assert_eq!((r.method(), r.uri().path()), (&http::Method::GET, "/y"));
            assert_eq!(r.headers()["x-b"], "2");
            assert!(r.into_body().collect().await.unwrap().to_bytes().is_empty());
        }
        // Without waiting: a bodyless request is kept at once (its head), one with a body is handed back.
        let get = Request::get("http://api/y").body(crate::http::empty()).unwrap();
        assert!(Unsent::keep_now(get).ok().and_then(|u| u.copy).is_some_and(|k| k.body.is_empty()));
        let expect = Request::get("http://api/y").header("expect", "100-continue").body(crate::http::empty());
        assert!(Unsent::keep_now(expect.unwrap()).ok().is_some_and(|u| u.copy.is_none()));
        let post = Request::post("http://api/x").body(boxed(Full::new(bytes::Bytes::from("hi")))).unwrap();
        assert!(Unsent::keep_now(post).is_err(), "a body is buffered by the waiting keep");
        let (tx, rx) = futures::channel::mpsc::channel::<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>(1);
        drop(tx);
        let streamed = Request::post("http://api/x").body(boxed(StreamBody::new(rx))).unwrap();
        assert!(Unsent::keep(streamed).await.split().1.is_none(), "a body of unknown length cannot be kept");
    }
}
