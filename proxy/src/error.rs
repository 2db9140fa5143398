//! The request path's one error type, and its one mapping to a response.
//!
//! Every layer returns [`ProxyError`] for a failure a caller can meet; the
//! edge of each direction (the inbound connection's stack, the outbound
//! routing step) turns it into the response with [`respond`] — status,
//! plain-text body `weft: <message>`, and headers such as `Retry-After` —
//! and the response's status is the `code` label of the request metrics.
//! gRPC callers are to get their `grpc-status` from this same mapping.

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode};
use weft_certs::SpiffeId;

use crate::http::{local_response, Body};

/// Why a pooled connection to an endpoint's sidecar could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr} timed out")]
    Timeout { addr: SocketAddr },
    #[error("connect to {addr}: {source}")]
    Tcp { addr: SocketAddr, source: std::io::Error },
    #[error("mTLS with {addr} (expecting {id}) failed: {source}")]
    Tls { addr: SocketAddr, id: SpiffeId, source: std::io::Error },
    #[error("peer {addr} did not negotiate ALPN h2")]
    NoH2 { addr: SocketAddr },
    #[error("HTTP/2 handshake with {addr}: {source}")]
    H2 { addr: SocketAddr, source: hyper::Error },
}

/// A failure on the request path: what failed, and where (the service, the
/// endpoint's address and identity, the local app).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Outbound: the app's request names no service.
    #[error("request has no Host header or authority to route by")]
    NoAuthority,
    /// Outbound: the request target cannot be carried on.
    #[error("bad request target: {source}")]
    BadTarget { source: http::Error },
    /// Outbound: the service has HTTPRoutes and none matches (the Gateway API's 404).
    #[error("no route of service {service:?} matches {method} {path}")]
    NoRoute { service: String, method: http::Method, path: String },
    /// Outbound: discovery lists no endpoint for the service (or its subset).
    #[error("no endpoints for service {service:?}{}", subset_note(.subset))]
    NoEndpoints { service: String, subset: String },
    /// Outbound: no connection to the endpoint's sidecar (it never saw the request).
    #[error("{source}")]
    ConnectFailed { peer: SpiffeId, source: Box<ConnectError> },
    /// Outbound: the endpoint's sidecar did not prove the identity discovery gave for it.
    #[error("mTLS with {addr} (expecting {expected}) failed: {source}")]
    PeerIdentity { addr: SocketAddr, expected: SpiffeId, source: std::io::Error },
    /// Outbound: one attempt ran past the route's per-try timeout.
    #[error("attempt timed out after {after:?}")]
    AttemptTimeout { after: Duration, peer: SpiffeId, addr: SocketAddr },
    /// Outbound: the route's whole-request timeout passed.
    #[error("{service} did not answer within the route's {timeout:?} request timeout")]
    RequestTimeout { service: String, timeout: Duration, peer: Option<SpiffeId> },
    /// Outbound: the connection to the endpoint's sidecar failed mid-request.
    #[error("upstream {addr}: {source}")]
    UpstreamReset { addr: SocketAddr, peer: SpiffeId, source: hyper::Error },
    /// Outbound TCP: the endpoint's sidecar refused the CONNECT tunnel.
    #[error("peer {addr} refused the tunnel: {status}")]
    TunnelRefused { addr: SocketAddr, status: StatusCode },
    /// Outbound TCP: the tunnel broke while carrying bytes.
    #[error("tunnel to {addr}: {source}")]
    TunnelIo { addr: SocketAddr, source: std::io::Error },
    /// Inbound: the caller is not allowed (details only in logs and metrics).
    #[error("{} denied by authorization policy", if *.tcp { "connection" } else { "request" })]
    Denied { tcp: bool, policy: String, peer: SpiffeId },
    /// Inbound: a rate limit has no token for the request.
    #[error("rate limit exceeded")]
    RateLimited { limit: String, retry_after: Duration },
    /// Inbound: the local app failed to answer the request.
    #[error("local app at {app} failed: {source}")]
    AppFailed { app: SocketAddr, source: hyper_util::client::legacy::Error },
    /// Inbound TCP: the local app's port cannot be reached.
    #[error("local app at {app}: {source}")]
    AppUnreachable { app: SocketAddr, source: std::io::Error },
    /// A header section over `--max-header-bytes`, refused by the sidecar
    /// that met it: 431 for a request (the app or peer never sees it), 502
    /// for a response (it cannot be carried). A local limit: it never counts
    /// against an endpoint.
    /// `size`: the header section's size (RFC 9113 §6.5.2), or `None` when
    /// the HTTP/1.1 parser refused it for being far over the limit.
    #[error(
        "{hop} headers are {}, over this sidecar's limit of {limit} bytes; \
         send smaller headers or raise --max-header-bytes on every sidecar",
        size_note(.size)
    )]
    HeadersTooLarge { hop: HeaderHop, size: Option<usize>, limit: usize },
    /// A layer ran without the context its edge sets (a bug in the stack).
    #[error("internal error: {what}")]
    Internal { what: &'static str },
}

/// Where a header section over the limit was met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderHop {
    /// The app's request, at the caller's sidecar.
    RequestFromApp,
    /// The calling sidecar's request, at the callee's sidecar.
    RequestFromPeer,
    /// The local app's response, at the callee's sidecar.
    ResponseFromApp,
    /// The peer sidecar's response, at the caller's sidecar.
    ResponseFromPeer,
}

impl HeaderHop {
    /// Whether the headers are a request's (else a response's).
    pub fn is_request(self) -> bool {
        matches!(self, HeaderHop::RequestFromApp | HeaderHop::RequestFromPeer)
    }
}

impl std::fmt::Display for HeaderHop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HeaderHop::RequestFromApp => "request from the app:",
            HeaderHop::RequestFromPeer => "request from the calling sidecar:",
            HeaderHop::ResponseFromApp => "response from the local app:",
            HeaderHop::ResponseFromPeer => "response from the peer sidecar:",
        })
    }
}

/// Set by a sidecar on a response it made for a local limit (value: the
/// limit's flag name), so the caller's sidecar does not count it against the
/// endpoint. Only a sidecar may set it: the callee's sidecar strips it from
/// the app's responses.
pub const LOCAL_LIMIT: http::HeaderName = http::HeaderName::from_static("weft-local-limit");

fn size_note(size: &Option<usize>) -> String {
    match size {
        Some(n) => format!("{n} bytes"),
        None => "far larger".to_string(),
    }
}

fn subset_note(subset: &str) -> String {
    if subset.is_empty() {
        String::new()
    } else {
        format!(" subset {subset:?}")
    }
}

impl ProxyError {
    /// The HTTP status a caller gets for this failure.
    pub fn status(&self) -> StatusCode {
        use ProxyError as E;
        match self {
            E::NoAuthority | E::BadTarget { .. } => StatusCode::BAD_REQUEST,
            E::NoRoute { .. } => StatusCode::NOT_FOUND,
            E::NoEndpoints { .. } => StatusCode::SERVICE_UNAVAILABLE,
            E::ConnectFailed { .. }
            | E::PeerIdentity { .. }
            | E::UpstreamReset { .. }
            | E::TunnelRefused { .. }
            | E::TunnelIo { .. }
            | E::AppFailed { .. }
            | E::AppUnreachable { .. } => StatusCode::BAD_GATEWAY,
            E::AttemptTimeout { .. } | E::RequestTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            E::Denied { .. } => StatusCode::FORBIDDEN,
            E::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            E::HeadersTooLarge { hop, .. } if hop.is_request() => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            E::HeadersTooLarge { .. } => StatusCode::BAD_GATEWAY,
            E::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The endpoint identity the failure happened at, if it got that far
    /// (the outbound `peer` metric label).
    pub fn peer(&self) -> Option<&SpiffeId> {
        use ProxyError as E;
        match self {
            E::ConnectFailed { peer, .. } | E::AttemptTimeout { peer, .. } | E::UpstreamReset { peer, .. } => {
                Some(peer)
            }
            E::PeerIdentity { expected, .. } => Some(expected),
            E::RequestTimeout { peer, .. } => peer.as_ref(),
            _ => None,
        }
    }

    /// Whether the endpoint could not be reached or did not answer: always
    /// worth a retry, whatever the status (the sidecar made the response).
    pub fn is_connection_failure(&self) -> bool {
        use ProxyError as E;
        matches!(
            self,
            E::ConnectFailed { .. }
                | E::PeerIdentity { .. }
                | E::AttemptTimeout { .. }
                | E::UpstreamReset { .. }
                | E::RequestTimeout { peer: Some(_), .. }
        )
    }
}

/// The response for a failure: the one place that decides status, body and
/// headers.
pub fn respond(err: &ProxyError) -> Response<Body> {
    let mut resp = local_response(err.status(), format!("weft: {err}"));
    match err {
        ProxyError::RateLimited { retry_after, .. } => {
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            resp.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        ProxyError::HeadersTooLarge { .. } => {
            resp.headers_mut().insert(LOCAL_LIMIT, HeaderValue::from_static("max-header-bytes"));
        }
        _ => {}
    }
    resp
}

/// The tower layer at an edge: a stack that fails with [`ProxyError`]
/// becomes one that always answers, through [`respond`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RespondLayer;

impl<S> tower::Layer<S> for RespondLayer {
    type Service = Respond<S>;
    fn layer(&self, inner: S) -> Respond<S> {
        Respond { inner }
    }
}

/// See [`RespondLayer`].
#[derive(Clone, Debug)]
pub struct Respond<S> {
    inner: S,
}

impl<S, R> tower::Service<R> for Respond<S>
where
    S: tower::Service<R, Response = Response<Body>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = std::convert::Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Response<Body>, std::convert::Infallible>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        // The inner services are always ready; a readiness error is answered on call.
        match self.inner.poll_ready(cx) {
            std::task::Poll::Pending => std::task::Poll::Pending,
            std::task::Poll::Ready(_) => std::task::Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: R) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move { Ok(fut.await.unwrap_or_else(|e| respond(&e))) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn id() -> SpiffeId {
        SpiffeId::parse("spiffe://td/ns/a/sa/api").unwrap()
    }

    fn addr() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    fn io() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
    }

    async fn hyper_error() -> hyper::Error {
        // A real hyper error: a response that is not HTTP.
        let (client, mut server) = tokio::io::duplex(1024);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = server.write_all(b"not http\r\n\r\n").await;
        });
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(client)).await.unwrap();
        tokio::spawn(conn);
        send.send_request(http::Request::new(crate::http::empty())).await.unwrap_err()
    }

    async fn app_error() -> hyper_util::client::legacy::Error {
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<crate::http::Body>();
        // A port nothing listens on: bound, then released.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let uri = format!("http://{closed}/");
        client.get(uri.parse().unwrap()).await.unwrap_err()
    }

    /// The status, body and Retry-After of `err`'s response.
    async fn answer(err: ProxyError) -> (u16, String, Option<String>) {
        let resp = respond(&err);
        let retry = resp.headers().get(http::header::RETRY_AFTER).map(|v| v.to_str().unwrap().to_string());
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap(), retry)
    }

    #[tokio::test]
    async fn no_authority() {
        let r = answer(ProxyError::NoAuthority).await;
        assert_eq!(r, (400, "weft: request has no Host header or authority to route by\n".into(), None));
    }

    #[tokio::test]
    async fn bad_target() {
        let source = http::Uri::builder().authority("bad authority").build().unwrap_err();
        let (code, body, _) = answer(ProxyError::BadTarget { source }).await;
        assert_eq!(code, 400);
        assert!(body.starts_with("weft: bad request target: "), "{body}");
    }

    #[tokio::test]
    async fn no_route() {
        let e = ProxyError::NoRoute { service: "api".into(), method: http::Method::GET, path: "/x".into() };
        assert_eq!(answer(e).await, (404, "weft: no route of service \"api\" matches GET /x\n".into(), None));
    }

    #[tokio::test]
    async fn no_endpoints() {
        let e = ProxyError::NoEndpoints { service: "nowhere".into(), subset: String::new() };
        assert_eq!(answer(e).await, (503, "weft: no endpoints for service \"nowhere\"\n".into(), None));
        let e = ProxyError::NoEndpoints { service: "api".into(), subset: "v2".into() };
        assert_eq!(answer(e).await.1, "weft: no endpoints for service \"api\" subset \"v2\"\n");
    }

    #[tokio::test]
    async fn connect_failed() {
        let e = ProxyError::ConnectFailed {
            peer: id(),
            source: Box::new(ConnectError::Tcp { addr: addr(), source: io() }),
        };
        assert!(e.is_connection_failure() && e.peer() == Some(&id()));
        let (code, body, _) = answer(e).await;
        assert_eq!(code, 502);
        assert!(body.starts_with("weft: connect to 127.0.0.1:9: "), "{body}");
        let e = ProxyError::ConnectFailed { peer: id(), source: Box::new(ConnectError::Timeout { addr: addr() }) };
        assert_eq!(answer(e).await.1, "weft: connect to 127.0.0.1:9 timed out\n");
    }

    #[tokio::test]
    async fn peer_identity() {
        let e = ProxyError::PeerIdentity { addr: addr(), expected: id(), source: io() };
        assert!(e.is_connection_failure());
        let (code, body, _) = answer(e).await;
        assert_eq!(code, 502);
        assert!(body.starts_with("weft: mTLS with 127.0.0.1:9 (expecting spiffe://td/ns/a/sa/api) failed"), "{body}");
    }

    #[tokio::test]
    async fn attempt_timeout() {
        let e = ProxyError::AttemptTimeout { after: Duration::from_millis(200), peer: id(), addr: addr() };
        assert!(e.is_connection_failure());
        assert_eq!(answer(e).await, (504, "weft: attempt timed out after 200ms\n".into(), None));
    }

    #[tokio::test]
    async fn request_timeout() {
        let e = ProxyError::RequestTimeout { service: "api".into(), timeout: Duration::from_secs(1), peer: None };
        assert!(!e.is_connection_failure(), "cut outside any attempt");
        let expected = "weft: api did not answer within the route's 1s request timeout\n";
        assert_eq!(answer(e).await, (504, expected.into(), None));
    }

    #[tokio::test]
    async fn upstream_reset() {
        let e = ProxyError::UpstreamReset { addr: addr(), peer: id(), source: hyper_error().await };
        assert!(e.is_connection_failure());
        let (code, body, _) = answer(e).await;
        assert_eq!(code, 502);
        assert!(body.starts_with("weft: upstream 127.0.0.1:9: "), "{body}");
    }

    #[tokio::test]
    async fn tunnel_refused() {
        let e = ProxyError::TunnelRefused { addr: addr(), status: StatusCode::FORBIDDEN };
        assert_eq!(answer(e).await, (502, "weft: peer 127.0.0.1:9 refused the tunnel: 403 Forbidden\n".into(), None));
    }

    #[tokio::test]
    async fn tunnel_io() {
        let e = ProxyError::TunnelIo { addr: addr(), source: io() };
        let (code, body, _) = answer(e).await;
        assert_eq!(code, 502);
        assert!(body.starts_with("weft: tunnel to 127.0.0.1:9: "), "{body}");
    }

    #[tokio::test]
    async fn denied() {
        let e = ProxyError::Denied { tcp: false, policy: "secret-policy".into(), peer: id() };
        let r = answer(e).await;
        assert_eq!(r, (403, "weft: request denied by authorization policy\n".into(), None), "no policy leaks");
        let e = ProxyError::Denied { tcp: true, policy: "p".into(), peer: id() };
        assert_eq!(answer(e).await.1, "weft: connection denied by authorization policy\n");
    }

    #[tokio::test]
    async fn rate_limited() {
        let e = ProxyError::RateLimited { limit: "rl".into(), retry_after: Duration::from_millis(100) };
        assert_eq!(answer(e).await, (429, "weft: rate limit exceeded\n".into(), Some("1".into())));
        let e = ProxyError::RateLimited { limit: "rl".into(), retry_after: Duration::from_millis(2500) };
        assert_eq!(answer(e).await.2.as_deref(), Some("3"), "whole seconds, rounded up");
    }

    #[tokio::test]
    async fn app_failed() {
        let e = ProxyError::AppFailed { app: addr(), source: app_error().await };
        let (code, body, _) = answer(e).await;
        assert_eq!(code, 502);
        assert!(body.starts_with("weft: local app at 127.0.0.1:9 failed: "), "{body}");
    }

    #[tokio::test]
    async fn app_unreachable() {
        let e = ProxyError::AppUnreachable { app: addr(), source: io() };
        let (code, body, _) = answer(e).await;
        assert_eq!(code, 502);
        assert!(body.starts_with("weft: local app at 127.0.0.1:9: "), "{body}");
    }

    #[tokio::test]
    async fn headers_too_large() {
        let e = ProxyError::HeadersTooLarge { hop: HeaderHop::RequestFromApp, size: Some(102_450), limit: 65_536 };
        let resp = respond(&e);
        assert_eq!(resp.headers()[LOCAL_LIMIT], "max-header-bytes");
        let (code, body, _) = answer(e).await;
        assert_eq!(code, 431);
        assert_eq!(
            body,
            "weft: request from the app: headers are 102450 bytes, over this sidecar's limit of 65536 bytes; \
             send smaller headers or raise --max-header-bytes on every sidecar\n"
        );
        let e = ProxyError::HeadersTooLarge { hop: HeaderHop::ResponseFromApp, size: Some(70_000), limit: 65_536 };
        assert!(!e.is_connection_failure() && e.peer().is_none());
        let (code, body, _) = answer(e).await;
        assert_eq!(code, 502);
        assert!(body.starts_with("weft: response from the local app: headers are 70000 bytes"), "{body}");
    }

    #[tokio::test]
    async fn internal() {
        let e = ProxyError::Internal { what: "request without caller context" };
        let expected = "weft: internal error: request without caller context\n";
        assert_eq!(answer(e).await, (500, expected.into(), None));
    }
}
