//! The request path's one error type, and its one mapping to a response.
//!
//! Every layer returns [`ProxyError`] for a failure a caller can meet; the
//! edge of each direction (the inbound connection's stack, the outbound
//! routing step) turns it into the response with [`respond`] — status,
//! plain-text body `weft: <message>`, and headers such as `Retry-After` —
//! and the response's status is the `code` label of the request metrics.
//! A gRPC caller (request `content-type: application/grpc*`) gets the same
//! failure in gRPC form: HTTP 200, trailers-only, with `grpc-status` and a
//! percent-encoded `grpc-message` (gRPC over HTTP/2, PROTOCOL-HTTP2.md).
//!
//! Every message says what failed and where: the hop (caller's sidecar →
//! callee's sidecar, callee's sidecar → its local app), the peer (SPIFFE ID
//! and address), the limit; and for I/O failures the cause, found by walking
//! the error's source chain ([`cause`]).

use std::net::SocketAddr;
use std::time::Duration;

use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use weft_certs::SpiffeId;

use crate::canonical::CanonicalError;
use crate::grpc::{self, code};
use crate::http::{empty, local_response, Body};

/// Why a pooled connection to an endpoint's sidecar could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr} timed out")]
    Timeout { addr: SocketAddr },
    #[error("connect to {addr}: {source}")]
    Tcp { addr: SocketAddr, source: std::io::Error },
    #[error("mTLS with {addr} (expecting {id}) failed: {}", cause(.source))]
    Tls { addr: SocketAddr, id: SpiffeId, source: std::io::Error },
    #[error("peer {addr} did not negotiate ALPN h2")]
    NoH2 { addr: SocketAddr },
    #[error("HTTP/2 handshake with {addr}: {}", cause(&**.source))]
    H2 { addr: SocketAddr, source: crate::http::BoxError },
}

/// A stream to a peer's sidecar that failed: hyper's error (tunnels,
/// carried exchanges) or h2's (plain requests, `outbound/h2_client.rs`),
/// shown as the error it holds. Boxed: inline, its fat pointer would make
/// every [`ProxyError`] larger.
pub type PeerError = Box<crate::http::BodyError>;

/// A [`PeerError`] holding `e`.
pub fn peer_error(e: impl Into<crate::http::BoxError>) -> PeerError {
    Box::new(crate::http::BodyError::new(e))
}

/// A failure on the request path: what failed, and where (the service, the
/// endpoint's address and identity, the local app).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Either edge: the request has no canonical form (`canonical.rs`), or
    /// names no host at all; refused before routing, authorization and rate
    /// limits see it.
    #[error("{0}")]
    NonCanonical(#[from] CanonicalError),
    /// Outbound: the host names no service the mesh knows (neither
    /// discovery nor the config has it).
    #[error("no service named {service:?} in the mesh; send Host: <service>")]
    UnknownService { service: String },
    /// Outbound, on a sidecar started with `--calls`: the host names a
    /// service outside that list, so the sidecar was never sent it (whether
    /// or not the mesh has it).
    #[error(
        "service {service:?} is not in this sidecar's view: the sidecar was started with --calls {} and gets \
         only those services; add {service} to its --calls (or drop --calls to get the whole mesh)",
        .calls.join(",")
    )]
    NotInCalls { service: String, calls: Vec<String> },
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
    #[error("{source} (caller's sidecar → the sidecar of {peer})")]
    ConnectFailed { peer: SpiffeId, source: Box<ConnectError> },
    /// Outbound: the endpoint's sidecar did not prove the identity discovery gave for it.
    #[error("mTLS with {addr} (expecting {expected}) failed: {} (caller's sidecar → callee's sidecar)", cause(.source))]
    PeerIdentity { addr: SocketAddr, expected: SpiffeId, source: std::io::Error },
    /// Outbound: one attempt ran past the route's per-try timeout.
    #[error(
        "attempt timed out after {after:?} (the route's per-try timeout) waiting for the sidecar of {peer} at {addr}"
    )]
    AttemptTimeout { after: Duration, peer: SpiffeId, addr: SocketAddr },
    /// Outbound: the route's whole-request timeout passed.
    #[error("{service} did not answer within the route's {timeout:?} request timeout{}", last_peer(.peer))]
    RequestTimeout { service: String, timeout: Duration, peer: Option<SpiffeId> },
    /// Outbound: the connection to the endpoint's sidecar failed mid-request.
    #[error("upstream {addr}: {} (caller's sidecar → the sidecar of {peer})", cause(.source))]
    UpstreamReset { addr: SocketAddr, peer: SpiffeId, source: PeerError },
    /// Outbound TCP: the endpoint's sidecar refused the CONNECT tunnel.
    #[error("peer {addr} refused the tunnel: {status}")]
    TunnelRefused { addr: SocketAddr, status: StatusCode },
    /// Outbound TCP: the tunnel broke while carrying bytes.
    #[error("tunnel to {addr}: {}", cause(.source))]
    TunnelIo { addr: SocketAddr, source: std::io::Error },
    /// Inbound: a peer's extended CONNECT is no well-formed carried exchange
    /// (`extended_connect.rs`).
    #[error("bad carried HTTP exchange from the peer sidecar: {what}")]
    BadExchange { what: &'static str },
    /// Inbound: the caller is not allowed (details only in logs and metrics).
    #[error("{} denied by authorization policy", if *.tcp { "connection" } else { "request" })]
    Denied { tcp: bool, policy: String, peer: SpiffeId },
    /// Inbound: a rate limit has no token for the request.
    #[error("rate limit exceeded")]
    RateLimited { limit: String, retry_after: Duration },
    /// Inbound: the local app failed to answer the request.
    #[error("local app at {app} failed: {source} (callee's sidecar → its local app)")]
    AppFailed { app: SocketAddr, source: crate::inbound::app_client::AppError },
    /// Inbound TCP: the local app's port cannot be reached.
    #[error("local app at {app}: {} (callee's sidecar → its local app)", cause(.source))]
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

fn last_peer(peer: &Option<SpiffeId>) -> String {
    peer.as_ref().map(|p| format!(" (last attempt: the sidecar of {p})")).unwrap_or_default()
}

/// `err` and the errors it wraps, outermost first (its `source()` chain).
pub fn chain<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(err), |e| e.source())
}

/// An error and its causes, outermost first (`a: b: c`), each said once:
/// wrappers that repeat their source's text, or add nothing, are skipped.
pub fn cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    for e in chain(err) {
        let text = e.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
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
            E::NonCanonical(_) | E::BadTarget { .. } | E::BadExchange { .. } => StatusCode::BAD_REQUEST,
            E::NoRoute { .. } | E::UnknownService { .. } | E::NotInCalls { .. } => StatusCode::NOT_FOUND,
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

    /// The `grpc-status` a gRPC caller gets for this failure (grpc/grpc
    /// doc/statuscodes.md): refused requests INVALID_ARGUMENT, no route or
    /// service UNIMPLEMENTED, anything unreachable UNAVAILABLE (a client may
    /// retry it), timeouts DEADLINE_EXCEEDED, denials PERMISSION_DENIED, rate
    /// limits RESOURCE_EXHAUSTED, bugs INTERNAL.
    pub fn grpc_status(&self) -> u32 {
        use ProxyError as E;
        match self {
            E::NonCanonical(_) | E::BadTarget { .. } | E::BadExchange { .. } => code::INVALID_ARGUMENT,
            // Metadata over a size limit is RESOURCE_EXHAUSTED in gRPC; an app's
            // response that cannot be carried is the callee side's INTERNAL.
            E::HeadersTooLarge { hop, .. } if hop.is_request() => code::RESOURCE_EXHAUSTED,
            E::HeadersTooLarge { .. } => code::INTERNAL,
            E::NoRoute { .. } | E::UnknownService { .. } | E::NotInCalls { .. } => code::UNIMPLEMENTED,
            E::NoEndpoints { .. }
            | E::ConnectFailed { .. }
            | E::PeerIdentity { .. }
            | E::UpstreamReset { .. }
            | E::TunnelRefused { .. }
            | E::TunnelIo { .. }
            | E::AppFailed { .. }
            | E::AppUnreachable { .. } => code::UNAVAILABLE,
            E::AttemptTimeout { .. } | E::RequestTimeout { .. } => code::DEADLINE_EXCEEDED,
            E::Denied { .. } => code::PERMISSION_DENIED,
            E::RateLimited { .. } => code::RESOURCE_EXHAUSTED,
            E::Internal { .. } => code::INTERNAL,
        }
    }

    /// Why the request was refused before routing, for
    /// `weft_proxy_requests_refused_total{reason}`: `non_canonical`,
    /// `missing_host`, `unknown_service`; None for other failures.
    pub fn refusal(&self) -> Option<&'static str> {
        match self {
            ProxyError::NonCanonical(CanonicalError::MissingHost) => Some("missing_host"),
            ProxyError::NonCanonical(_) => Some("non_canonical"),
            ProxyError::UnknownService { .. } | ProxyError::NotInCalls { .. } => Some("unknown_service"),
            _ => None,
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
/// headers. `grpc`: the request was gRPC ([`grpc::is_grpc`] of its headers),
/// so the answer is a trailers-only gRPC response (HTTP 200, empty body,
/// `grpc-status`, `grpc-message`); otherwise the HTTP status and a
/// plain-text `weft: <message>` body.
pub fn respond(err: &ProxyError, grpc: bool) -> Response<Body> {
    let message = format!("weft: {err}");
    let mut resp = if grpc {
        let mut resp = Response::new(empty());
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert(grpc::GRPC_STATUS, HeaderValue::from(err.grpc_status()));
        // Printable ASCII once encoded, so always a valid header value.
        if let Ok(v) = HeaderValue::from_str(&grpc::encode_message(&message)) {
            h.insert(grpc::GRPC_MESSAGE, v);
        }
        h.insert("server", HeaderValue::from_static("weft"));
        resp
    } else {
        local_response(err.status(), message)
    };
    if let ProxyError::RateLimited { retry_after, .. } = err {
        let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if let ProxyError::HeadersTooLarge { .. } = err {
        resp.headers_mut().insert(LOCAL_LIMIT, HeaderValue::from_static("max-header-bytes"));
    }
    resp
}

/// Whether a request with these headers gets its failures in gRPC form.
pub fn wants_grpc(headers: &HeaderMap) -> bool {
    grpc::is_grpc(headers)
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

impl<S, B> tower::Service<http::Request<B>> for Respond<S>
where
    S: tower::Service<http::Request<B>, Response = Response<Body>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = std::convert::Infallible;
    type Future = RespondFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        // The inner services are always ready; a readiness error is answered on call.
        match self.inner.poll_ready(cx) {
            std::task::Poll::Pending => std::task::Poll::Pending,
            std::task::Poll::Ready(_) => std::task::Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let grpc = wants_grpc(req.headers());
        RespondFuture { fut: self.inner.call(req), grpc }
    }
}

pin_project_lite::pin_project! {
    /// [`Respond`]'s future: a named type rather than a boxed one, which
    /// would cost an allocation per request.
    pub struct RespondFuture<F> {
        #[pin]
        fut: F,
        grpc: bool,
    }
}

impl<F> std::future::Future for RespondFuture<F>
where
    F: std::future::Future<Output = Result<Response<Body>, ProxyError>>,
{
    type Output = Result<Response<Body>, std::convert::Infallible>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let r = std::task::ready!(this.fut.poll(cx));
        std::task::Poll::Ready(Ok(r.unwrap_or_else(|e| respond(&e, *this.grpc))))
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

    /// A request to the local app through the sidecar's own client.
    async fn app_request(app: SocketAddr) -> crate::inbound::app_client::AppError {
        let client = crate::inbound::app_client::AppClient::http1(app, &crate::limits::Limits::default());
        let req = http::Request::get(format!("http://{app}/")).body(crate::http::empty()).unwrap();
        client.request(req).await.unwrap_err()
    }

    async fn app_error() -> crate::inbound::app_client::AppError {
        // A port nothing listens on: bound, then released.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        app_request(closed).await
    }

    async fn app_closes() -> crate::inbound::app_client::AppError {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let (mut tcp, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = tcp.read(&mut buf).await;
            // Closed without a response.
        });
        app_request(at).await
    }

    /// The status, body and Retry-After of `err`'s response.
    async fn answer(err: ProxyError) -> (u16, String, Option<String>) {
        let resp = respond(&err, false);
        let retry = resp.headers().get(http::header::RETRY_AFTER).map(|v| v.to_str().unwrap().to_string());
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap(), retry)
    }

    #[tokio::test]
    async fn non_canonical() {
        let r = answer(ProxyError::NonCanonical(CanonicalError::MissingHost)).await;
        let expected =
            "weft: the request names no host: send a Host header (or an absolute-form target) naming the service\n";
        assert_eq!(r, (400, expected.into(), None));
        let e = ProxyError::NonCanonical(CanonicalError::EncodedSlash { at: 6, which: '/' });
        assert_eq!(e.refusal(), Some("non_canonical"));
        assert_eq!(ProxyError::NonCanonical(CanonicalError::MissingHost).refusal(), Some("missing_host"));
        let (code, body, _) = answer(e).await;
        assert_eq!(code, 400);
        assert!(body.starts_with("weft: the path has an encoded '/' at byte 6"), "{body}");
    }

    #[tokio::test]
    async fn unknown_service() {
        let e = ProxyError::NotInCalls { service: "backend".into(), calls: vec!["api".into(), "db".into()] };
        assert_eq!(e.refusal(), Some("unknown_service"));
        let r = answer(e).await;
        assert_eq!(r.0, 404);
        assert!(
            r.1.starts_with(
                "weft: service \"backend\" is not in this sidecar's view: the sidecar was started with --calls api,db"
            ),
            "{r:?}"
        );
        let e = ProxyError::UnknownService { service: "x".into() };
        assert_eq!(e.refusal(), Some("unknown_service"));
        let r = answer(e).await;
        assert_eq!(r, (404, "weft: no service named \"x\" in the mesh; send Host: <service>\n".into(), None));
        let e = ProxyError::NoEndpoints { service: "x".into(), subset: String::new() };
        assert_eq!((e.status(), e.refusal()), (StatusCode::SERVICE_UNAVAILABLE, None), "known, no endpoints: 503");
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
        assert!(body.to_lowercase().contains("connection refused"), "the cause: {body}");
        assert!(
            body.contains("(caller's sidecar → the sidecar of spiffe://td/ns/a/sa/api)"),
            "the hop and peer: {body}"
        );
        let e = ProxyError::ConnectFailed { peer: id(), source: Box::new(ConnectError::Timeout { addr: addr() }) };
        assert_eq!(
            answer(e).await.1,
            "weft: connect to 127.0.0.1:9 timed out (caller's sidecar → the sidecar of spiffe://td/ns/a/sa/api)\n"
        );
    }

    #[tokio::test]
    async fn peer_identity() {
        let e = ProxyError::PeerIdentity { addr: addr(), expected: id(), source: io() };
        assert!(e.is_connection_failure());
        let (code, body, _) = answer(e).await;
        assert_eq!(code, 502);
        assert!(body.starts_with("weft: mTLS with 127.0.0.1:9 (expecting spiffe://td/ns/a/sa/api) failed"), "{body}");
        assert!(body.contains("caller's sidecar → callee's sidecar"), "{body}");
    }

    #[tokio::test]
    async fn attempt_timeout() {
        let e = ProxyError::AttemptTimeout { after: Duration::from_millis(200), peer: id(), addr: addr() };
        assert!(e.is_connection_failure());
        let expected = "weft: attempt timed out after 200ms (the route's per-try timeout) waiting for the sidecar of spiffe://td/ns/a/sa/api at 127.0.0.1:9\n";
        assert_eq!(answer(e).await, (504, expected.into(), None));
    }

    #[tokio::test]
    async fn request_timeout() {
        let e = ProxyError::RequestTimeout { service: "api".into(), timeout: Duration::from_secs(1), peer: None };
        assert!(!e.is_connection_failure(), "cut outside any attempt");
        let expected = "weft: api did not answer within the route's 1s request timeout\n";
        assert_eq!(answer(e).await, (504, expected.into(), None));
        let e = ProxyError::RequestTimeout { service: "api".into(), timeout: Duration::from_secs(1), peer: Some(id()) };
        assert!(answer(e).await.1.ends_with("(last attempt: the sidecar of spiffe://td/ns/a/sa/api)\n"));
    }

    #[tokio::test]
    async fn upstream_reset() {
        let e = ProxyError::UpstreamReset { addr: addr(), peer: id(), source: peer_error(hyper_error().await) };
        assert!(e.is_connection_failure());
        let (code, body, _) = answer(e).await;
        assert_eq!(code, 502);
        assert!(body.starts_with("weft: upstream 127.0.0.1:9: "), "{body}");
        assert!(body.contains("(caller's sidecar → the sidecar of spiffe://td/ns/a/sa/api)"), "{body}");
        assert!(!body.contains("SendRequest"), "{body}");
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
        assert!(body.starts_with("weft: local app at 127.0.0.1:9 failed: cannot connect: "), "{body}");
        assert!(body.to_lowercase().contains("connection refused"), "the cause, from the source chain: {body}");
        assert!(body.contains("(callee's sidecar → its local app)"), "{body}");
        assert!(!body.contains("client error"), "hyper-util's step name is not a cause: {body}");
        // An app that closes the connection without answering.
        let e = ProxyError::AppFailed { app: addr(), source: app_closes().await };
        let (code, body, _) = answer(e).await;
        assert_eq!(code, 502);
        assert!(body.starts_with("weft: local app at 127.0.0.1:9 failed: no response: "), "{body}");
        assert!(body.contains("closed before"), "{body}");
        assert!(!body.contains("SendRequest"), "{body}");
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
        let resp = respond(&e, false);
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

    /// (grpc-status, decoded grpc-message) of `err`'s gRPC-form response,
    /// checking its shape: HTTP 200, application/grpc, trailers-only.
    async fn grpc_answer(err: &ProxyError) -> (u32, String) {
        let resp = respond(err, true);
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/grpc");
        let status = grpc::status(resp.headers()).expect("grpc-status in the headers (trailers-only)");
        let raw = resp.headers()[grpc::GRPC_MESSAGE].to_str().unwrap().to_string();
        assert!(raw.bytes().all(|b| (0x20..=0x7E).contains(&b)), "{raw}");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(body.is_empty(), "trailers-only: no body");
        let mut bytes = Vec::new();
        let mut i = 0;
        let rb = raw.as_bytes();
        while i < rb.len() {
            if rb[i] == b'%' {
                bytes.push(u8::from_str_radix(&raw[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                bytes.push(rb[i]);
                i += 1;
            }
        }
        (status, String::from_utf8(bytes).unwrap())
    }

    #[tokio::test]
    async fn grpc_callers_get_grpc_status_and_message() {
        let cases: Vec<(ProxyError, u32, &str)> = vec![
            (
                ProxyError::Denied { tcp: false, policy: "p".into(), peer: id() },
                7,
                "weft: request denied by authorization policy",
            ),
            (
                ProxyError::NoEndpoints { service: "api".into(), subset: String::new() },
                14,
                "weft: no endpoints for service \"api\"",
            ),
            (
                ProxyError::ConnectFailed { peer: id(), source: Box::new(ConnectError::Timeout { addr: addr() }) },
                14,
                "weft: connect to 127.0.0.1:9 timed out",
            ),
            (
                ProxyError::UpstreamReset { addr: addr(), peer: id(), source: peer_error(hyper_error().await) },
                14,
                "weft: upstream 127.0.0.1:9: ",
            ),
            (
                ProxyError::AppFailed { app: addr(), source: app_error().await },
                14,
                "weft: local app at 127.0.0.1:9 failed",
            ),
            (ProxyError::AppUnreachable { app: addr(), source: io() }, 14, "weft: local app at 127.0.0.1:9"),
            (
                ProxyError::PeerIdentity { addr: addr(), expected: id(), source: io() },
                14,
                "weft: mTLS with 127.0.0.1:9",
            ),
            (
                ProxyError::TunnelRefused { addr: addr(), status: StatusCode::FORBIDDEN },
                14,
                "weft: peer 127.0.0.1:9 refused",
            ),
            (
                ProxyError::AttemptTimeout { after: Duration::from_millis(200), peer: id(), addr: addr() },
                4,
                "weft: attempt timed out after 200ms",
            ),
            (
                ProxyError::RequestTimeout { service: "api".into(), timeout: Duration::from_secs(1), peer: None },
                4,
                "weft: api did not answer within",
            ),
            (
                ProxyError::RateLimited { limit: "rl".into(), retry_after: Duration::from_millis(100) },
                8,
                "weft: rate limit exceeded",
            ),
            (
                ProxyError::NoRoute { service: "api".into(), method: http::Method::POST, path: "/x".into() },
                12,
                "weft: no route of service \"api\" matches POST /x",
            ),
            (
                ProxyError::UnknownService { service: "nowhere".into() },
                12,
                "weft: no service named \"nowhere\" in the mesh",
            ),
            (
                ProxyError::NonCanonical(CanonicalError::PathParameter { at: 6 }),
                3,
                "weft: the path has a ';' path parameter at byte 6",
            ),
            (ProxyError::NonCanonical(CanonicalError::MissingHost), 3, "weft: the request names no host"),
            (ProxyError::Internal { what: "x" }, 13, "weft: internal error: x"),
        ];
        for (err, want, message) in cases {
            let (status, got) = grpc_answer(&err).await;
            assert_eq!(status, want, "{err}");
            assert_eq!(status, err.grpc_status());
            assert!(got.starts_with(message), "{err}: grpc-message {got:?}");
            assert_eq!(got, format!("weft: {err}"), "the same message as the HTTP form");
        }
        // Retry-After rides along for a rate limit; the HTTP form is unchanged.
        let e = ProxyError::RateLimited { limit: "rl".into(), retry_after: Duration::from_millis(100) };
        assert_eq!(respond(&e, true).headers()[header::RETRY_AFTER], "1");
        assert_eq!(respond(&e, false).status(), StatusCode::TOO_MANY_REQUESTS);
        // Non-ASCII in a message (a path the caller sent) is percent-encoded.
        let e = ProxyError::NoRoute { service: "api".into(), method: http::Method::GET, path: "/café 100%".into() };
        let raw = respond(&e, true).headers()[grpc::GRPC_MESSAGE].to_str().unwrap().to_string();
        assert!(raw.ends_with("/caf%C3%A9 100%25"), "{raw}");
    }

    #[tokio::test]
    async fn the_respond_layer_answers_grpc_callers_in_grpc_form() {
        use tower::{Layer, ServiceExt};
        let failing = tower::service_fn(|_req: http::Request<()>| async {
            Err::<Response<Body>, _>(ProxyError::Denied { tcp: false, policy: "p".into(), peer: id() })
        });
        let svc = RespondLayer.layer(failing);
        let grpc_req =
            http::Request::post("/pkg.Svc/M").header("content-type", "application/grpc+proto").body(()).unwrap();
        let resp = svc.clone().oneshot(grpc_req).await.unwrap();
        assert_eq!((resp.status(), grpc::status(resp.headers())), (StatusCode::OK, Some(7)));
        let plain = http::Request::get("/").body(()).unwrap();
        let resp = svc.oneshot(plain).await.unwrap();
        assert_eq!((resp.status(), grpc::status(resp.headers())), (StatusCode::FORBIDDEN, None));
    }
}
