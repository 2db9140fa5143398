//! Inbound: terminate mutual TLS from peer sidecars, learn the caller's
//! SPIFFE ID from its verified certificate, and forward to the local app in
//! the protocol the calling app spoke (HTTP/1.1 or h2c), or as raw TCP for
//! CONNECT tunnels. Authorization and rate limits apply first.

pub mod gate;
pub mod policy;
pub mod ratelimit;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use weft_certs::SpiffeId;

use crate::discovery::{Discovery, Table};
use crate::http::{boxed, empty, local_response, strip_hop_by_hop, Body, APP_PROTOCOL, PEER_ID};
use crate::metrics::{AuthzLabels, ConnLabels, Metrics, OpenConn, RequestMeta};
use futures::future::BoxFuture;
use policy::Authorize;
use ratelimit::RateLimit;
use std::convert::Infallible;
use tower::{ServiceBuilder, ServiceExt};
use weft_runtime::drain::Drain;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is calling and which config judges the request; set per request by
/// the inbound connection for the layers behind it.
#[derive(Clone)]
pub struct RequestContext {
    pub peer: Arc<SpiffeId>,
    pub table: Arc<Table>,
}

/// The innermost inbound service: CONNECT tunnels to the app's TCP port,
/// everything else is forwarded as HTTP.
#[derive(Clone)]
struct AppService {
    inbound: Arc<Inbound>,
}

impl tower::Service<Request<Incoming>> for AppService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let inbound = self.inbound.clone();
        Box::pin(async move {
            let Some(ctx) = req.extensions().get::<RequestContext>().cloned() else {
                return Ok(policy::missing_context());
            };
            Ok(if req.method() == Method::CONNECT {
                inbound.tunnel(req, &ctx.peer).await
            } else {
                inbound.forward(req, &ctx.peer).await
            })
        })
    }
}

/// Counts each HTTP request by caller and status, and its latency.
#[derive(Clone)]
struct RequestMetricsLayer {
    metrics: Arc<Metrics>,
    service: String,
}

impl<S> tower::Layer<S> for RequestMetricsLayer {
    type Service = RequestMetrics<S>;
    fn layer(&self, inner: S) -> RequestMetrics<S> {
        RequestMetrics { inner, metrics: self.metrics.clone(), service: self.service.clone() }
    }
}

#[derive(Clone)]
struct RequestMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
    service: String,
}

impl<S, B> tower::Service<Request<B>> for RequestMetrics<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // Tunnels are counted as connections and bytes, not requests.
        let peer = (req.method() != Method::CONNECT)
            .then(|| req.extensions().get::<RequestContext>().map(|c| c.peer.to_string()).unwrap_or_default());
        let (metrics, service) = (self.metrics.clone(), self.service.clone());
        Box::pin(async move {
            let start = Instant::now();
            let resp = inner.call(req).await?;
            if let Some(peer) = peer {
                let meta = RequestMeta { peer, ..Default::default() };
                metrics.request("inbound", &service, &meta, resp.status().as_u16(), start.elapsed().as_secs_f64());
            }
            Ok(resp)
        })
    }
}

/// Connects every request to the local app, whatever the URI says.
#[derive(Clone)]
pub struct AppConnector {
    app: SocketAddr,
}

impl tower::Service<http::Uri> for AppConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let app = self.app;
        Box::pin(async move {
            let tcp = TcpStream::connect(app).await?;
            tcp.set_nodelay(true)?;
            Ok(TokioIo::new(tcp))
        })
    }
}

/// Which protocol the local app speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AppProtocol {
    /// Whatever the calling app spoke (HTTP/1.1 or h2c).
    Auto,
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 without TLS (prior knowledge), e.g. gRPC servers.
    H2c,
}

pub struct Inbound {
    pub app: SocketAddr,
    pub app_protocol: AppProtocol,
    pub service: String,
    pub discovery: Arc<Discovery>,
    pub metrics: Arc<Metrics>,
    h1: Client<AppConnector, Body>,
    h2: Client<AppConnector, Body>,
}

/// Resolves when a newly applied config denies `peer` TCP access.
async fn revoked(discovery: &Discovery, peer: &SpiffeId) {
    let mut changes = discovery.changes();
    loop {
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
        let table = discovery.table();
        let req = policy::Request { method: None, path: None, port: table.authz.port() };
        if !table.authz.check(peer, &req).allowed {
            return;
        }
    }
}

/// Why an inbound handshake failed, as a metric label.
fn refusal_reason(e: &std::io::Error) -> &'static str {
    use rustls::{Error as E, PeerIncompatible};
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(E::NoCertificatesPresented) => "no_client_certificate",
        Some(E::InvalidCertificate(_)) => "bad_certificate",
        Some(E::PeerIncompatible(PeerIncompatible::SupportedVersionsExtensionRequired)) => "tls_version",
        Some(E::PeerIncompatible(_)) => "incompatible",
        Some(E::InvalidMessage(_)) | Some(E::InappropriateMessage { .. }) => "not_tls",
        Some(_) => "tls_error",
        None => "io_error",
    }
}

impl Inbound {
    pub fn new(
        app: SocketAddr,
        app_protocol: AppProtocol,
        service: String,
        discovery: Arc<Discovery>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let connector = AppConnector { app };
        let h1 =
            Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(connector.clone());
        let h2 = Client::builder(TokioExecutor::new()).http2_only(true).timer(TokioTimer::new()).build(connector);
        Arc::new(Self { app, app_protocol, service, discovery, metrics, h1, h2 })
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener, acceptor: TlsAcceptor, drain: Drain) {
        loop {
            let (tcp, remote) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => { tracing::warn!(error = %e, "inbound accept failed"); continue; }
                },
                _ = drain.signaled() => return,
            };
            let _ = tcp.set_nodelay(true);
            let this = self.clone();
            let acceptor = acceptor.clone();
            let drain = drain.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        let reason = refusal_reason(&e);
                        this.metrics.handshake("inbound", reason);
                        tracing::info!(%remote, reason, error = %e, "inbound connection refused");
                        return;
                    }
                    Err(_) => {
                        this.metrics.handshake("inbound", "timeout");
                        return;
                    }
                };
                // The verifier only lets through chains that carry a SPIFFE ID.
                let Some(peer) = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|leaf| weft_certs::svid::spiffe_id_of(leaf).ok())
                else {
                    this.metrics.handshake("inbound", "no_client_certificate");
                    return;
                };
                this.metrics.handshake("inbound", "ok");
                let _open = OpenConn::new(&this.metrics, "inbound", "mtls");
                let peer = Arc::new(peer);
                let stack = ServiceBuilder::new()
                    .layer(RequestMetricsLayer { metrics: this.metrics.clone(), service: this.service.clone() })
                    .layer(Authorize::layer(this.metrics.clone()))
                    .layer(RateLimit::layer(this.metrics.clone()))
                    .service(AppService { inbound: this.clone() });
                let discovery = this.discovery.clone();
                let svc = service_fn(move |mut req: Request<Incoming>| {
                    // One config version for the whole request.
                    let ctx = RequestContext { peer: peer.clone(), table: discovery.table() };
                    req.extensions_mut().insert(ctx);
                    stack.clone().oneshot(req)
                });
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .adaptive_window(true)
                    .serve_connection(TokioIo::new(tls), svc);
                drain.watch(conn).await;
            });
        }
    }

    async fn forward(&self, req: Request<Incoming>, peer: &SpiffeId) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        let caller_h2 = parts.headers.remove(APP_PROTOCOL).is_some_and(|v| v == "h2");
        let app_h2 = match self.app_protocol {
            AppProtocol::Auto => caller_h2,
            AppProtocol::Http1 => false,
            AppProtocol::H2c => true,
        };
        strip_hop_by_hop(&mut parts.headers);
        // Only the sidecar may say who the caller is.
        parts.headers.remove(PEER_ID);
        if let Ok(v) = HeaderValue::from_str(peer.as_str()) {
            parts.headers.insert(PEER_ID, v);
        }
        let client = if app_h2 {
            parts.version = Version::HTTP_2;
            &self.h2
        } else {
            parts.version = Version::HTTP_11;
            if let Some(host) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
                parts.headers.insert(header::HOST, host);
            }
            &self.h1
        };
        match client.request(Request::from_parts(parts, boxed(body))).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                parts.version = Version::HTTP_2;
                Response::from_parts(parts, boxed(body))
            }
            Err(e) => {
                tracing::warn!(app = %self.app, error = %e, "local app request failed");
                local_response(StatusCode::BAD_GATEWAY, format!("weft: local app at {} failed: {e}", self.app))
            }
        }
    }

    async fn tunnel(&self, req: Request<Incoming>, peer: &SpiffeId) -> Response<Body> {
        let app = match TcpStream::connect(self.app).await {
            Ok(s) => s,
            Err(e) => {
                return local_response(StatusCode::BAD_GATEWAY, format!("weft: local app at {}: {e}", self.app));
            }
        };
        let _ = app.set_nodelay(true);
        let metrics = self.metrics.clone();
        let peer = peer.clone();
        let discovery = self.discovery.clone();
        tokio::spawn(async move {
            let _open = OpenConn::new(&metrics, "inbound", "tcp");
            let upgraded = match hyper::upgrade::on(req).await {
                Ok(u) => u,
                Err(e) => return tracing::info!(%peer, error = %e, "CONNECT upgrade failed"),
            };
            let (mut app, mut upgraded) = (app, TokioIo::new(upgraded));
            let copy = tokio::io::copy_bidirectional(&mut upgraded, &mut app);
            tokio::select! {
                r = copy => match r {
                    Ok((a, b)) => {
                        let labels = ConnLabels { direction: "inbound", protocol: "tcp" };
                        metrics.tcp_bytes.get_or_create(&labels).inc_by(a + b);
                    }
                    Err(e) => tracing::debug!(%peer, error = %e, "tunnel ended with error"),
                },
                // A policy change that no longer allows this caller closes its open connection.
                () = revoked(&discovery, &peer) => {
                    let labels = AuthzLabels { policy: "revoked".into(), outcome: "deny", protocol: "tcp" };
                    metrics.authz.get_or_create(&labels).inc();
                    tracing::info!(%peer, "closing TCP connection: no longer allowed by policy");
                }
            }
        });
        Response::new(empty())
    }
}
