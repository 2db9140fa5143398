//! Inbound: terminate mutual TLS from peer sidecars, learn the caller's
//! SPIFFE ID from its verified certificate, and forward to the local app in
//! the version the app speaks (`app_protocol.rs`), or as raw TCP for
//! CONNECT tunnels. Authorization and rate limits apply first.
//!
//! A request passes: the accept loop and TLS handshake here (the edge: sets
//! the request's context) → `RequestMetrics` → `RespondLayer` (`error.rs`:
//! failure → response) → `canonical.rs` (the request made canonical, or
//! refused) → `authz.rs` → `ratelimit.rs` → `app.rs` (forward,
//! `exchange.rs` for a carried upgrade or 100-continue, or CONNECT tunnel)
//! → the local app.

pub mod app;
pub mod app_client;
pub mod app_protocol;
pub mod authz;
pub mod canonical;
pub mod exchange;
pub mod gate;
pub mod headers;
pub mod ratelimit;
pub mod readiness;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use weft_runtime::serve::Server;

use crate::context::RequestContext;
use crate::error::RespondLayer;
use crate::http::Body;
use crate::limits::{self, Limits};
use crate::listener::{self, Activity, Guarded, Watched};
use crate::metrics::{Metrics, OpenConn, RequestMeta};
use crate::state::State;
use app::AppService;
use app_client::AppClient;
use authz::Authz;
use canonical::CanonicalLayer;
use headers::HeaderLimitLayer;
use ratelimit::RateLimit;
use std::convert::Infallible;
use tower::{ServiceBuilder, ServiceExt};
use weft_runtime::drain::Drain;
use weft_runtime::workers::PerWorker;

/// Counts each HTTP request by caller and status, and its latency.
#[derive(Clone)]
struct RequestMetricsLayer {
    metrics: Arc<Metrics>,
    /// Shared: the stack is cloned per request.
    service: Arc<str>,
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
    service: Arc<str>,
}

impl<S, B> tower::Service<Request<B>> for RequestMetrics<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = RequestMetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // Tunnels are counted as connections and bytes, not requests.
        let peer = (req.method() != Method::CONNECT)
            .then(|| req.extensions().get::<RequestContext>().and_then(|c| c.peer.clone()));
        RequestMetricsFuture {
            start: Instant::now(),
            fut: self.inner.call(req),
            peer,
            metrics: self.metrics.clone(),
            service: self.service.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    /// [`RequestMetrics`]' future: a named type rather than a boxed one,
    /// which would cost an allocation per request.
    struct RequestMetricsFuture<F> {
        #[pin]
        fut: F,
        start: Instant,
        peer: Option<Option<Arc<weft_certs::SpiffeId>>>,
        metrics: Arc<Metrics>,
        service: Arc<str>,
    }
}

impl<F> std::future::Future for RequestMetricsFuture<F>
where
    F: std::future::Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.fut.poll(cx))?;
        // A carried exchange's 200 is counted when the app has answered.
        let later = resp.extensions().get::<crate::extended_connect::CountedLater>().is_some();
        let Some(peer) = this.peer.take().filter(|_| !later) else { return std::task::Poll::Ready(Ok(resp)) };
        let meta = RequestMeta { peer, ..Default::default() };
        let secs = this.start.elapsed().as_secs_f64();
        std::task::Poll::Ready(Ok(this.metrics.response("inbound", this.service, meta, resp, secs)))
    }
}

/// Which protocol the local app speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AppProtocol {
    /// The Service's declared protocol, or learned by probing the app
    /// (`app_protocol.rs`); the caller's version where the app speaks both.
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
    pub state: Arc<State>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// Clients to the app, one per worker thread (`weft_runtime::workers`):
    /// a request goes out on a connection driven by its own thread.
    h1: PerWorker<AppClient>,
    h2: PerWorker<AppClient>,
    /// The HTTP versions the app speaks, as declared or learned.
    app_versions: app_protocol::AppProtocols,
    /// Whether the app accepts connections (`/ready`, callers' probes).
    pub readiness: Arc<readiness::AppReadiness>,
}

impl Inbound {
    pub fn new(
        app: SocketAddr,
        app_protocol: AppProtocol,
        service: String,
        state: Arc<State>,
        metrics: Arc<Metrics>,
        limits: Limits,
    ) -> Arc<Self> {
        let (h1, h2) =
            (PerWorker::new(|_| AppClient::http1(app, &limits)), PerWorker::new(|_| AppClient::h2(app, &limits)));
        let app_versions = app_protocol::AppProtocols::new(app, app_protocol);
        let readiness = readiness::AppReadiness::new(app);
        Arc::new(Self { app, app_protocol, service, state, metrics, limits, h1, h2, app_versions, readiness })
    }

    /// Serves peer sidecars' mTLS HTTP/2 connections, with the idle timeout
    /// and connection cap of [`Limits`] (the TLS handshake has its own 10 s).
    pub async fn serve(self: Arc<Self>, listener: TcpListener, acceptor: TlsAcceptor, drain: Drain) {
        let limits = self.limits;
        let server = Server::new("inbound").max_connections(limits.max_connections);
        self.metrics.listeners.add("inbound".into(), server.stats());
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits::H2_MAX_CONCURRENT_STREAMS)
            .initial_stream_window_size(limits::H2_STREAM_WINDOW)
            .initial_connection_window_size(limits::H2_CONNECTION_WINDOW)
            .max_frame_size(limits::H2_MAX_FRAME_SIZE)
            .max_header_list_size(limits.parser_bytes_u32())
            // No HTTP/2 keepalive of the server's own: the caller pings, and
            // the socket has TCP keepalive (`limits::set_peer_keepalive`).
            // RFC 8441: upgrades and 100-continue arrive as extended CONNECT.
            .enable_connect_protocol();
        let builder = Arc::new(builder);
        server
            .serve(listener, drain, move |tcp, remote, drain| {
                let this = self.clone();
                let acceptor = acceptor.clone();
                let builder = builder.clone();
                async move {
                    if let Err(e) = limits::set_peer_keepalive(&tcp) {
                        tracing::debug!(%remote, error = %e, "TCP keepalive not set on a peer's connection");
                    }
                    let (tls, peer) =
                        match weft_runtime::tls_accept::tls_accept(&acceptor, tcp).await.and_then(|a| a.require_peer())
                        {
                            Ok(accepted) => accepted,
                            Err(refused) => {
                                let reason = refused.reason();
                                this.metrics.handshake("inbound", reason);
                                tracing::info!(%remote, reason, error = %refused, "inbound connection refused");
                                return;
                            }
                        };
                    this.metrics.handshake("inbound", "ok");
                    let _open = OpenConn::new(&this.metrics, "inbound", "mtls");
                    let peer = Arc::new(peer.spiffe_id);
                    let peer_header = http::HeaderValue::from_str(peer.as_str()).ok();
                    let stack = ServiceBuilder::new()
                        .layer(RequestMetricsLayer {
                            metrics: this.metrics.clone(),
                            service: this.service.as_str().into(),
                        })
                        .layer(RespondLayer)
                        .layer(HeaderLimitLayer { limit: this.limits.max_header_bytes, metrics: this.metrics.clone() })
                        .layer(CanonicalLayer::new(this.metrics.clone()))
                        .layer(Authz::layer(this.metrics.clone()))
                        .layer(RateLimit::layer(this.metrics.clone()))
                        .service(AppService { inbound: this.clone() });
                    let state = this.state.clone();
                    let activity = Activity::new(true);
                    let counted = activity.clone();
                    let readiness = this.readiness.clone();
                    let svc = service_fn(move |mut req: Request<Incoming>| {
                        // One config version for the whole request.
                        let ctx =
                            RequestContext::inbound_with_header(peer.clone(), peer_header.clone(), state.snapshot());
                        req.extensions_mut().insert(ctx);
                        // Counted in flight until the response body ends; a CONNECT
                        // tunnel takes its own count along (app.rs).
                        let guard = counted.start();
                        if req.method() == Method::CONNECT {
                            req.extensions_mut().insert(counted.start());
                        }
                        // A carried exchange is judged as the request it carries.
                        let refused = crate::extended_connect::accept(&mut req).err();
                        let stack = stack.clone();
                        let readiness = readiness.clone();
                        async move {
                            // A caller's probe of this endpoint: answered here, from the app's readiness.
                            if req.headers().contains_key(crate::http::PROBE) {
                                let resp = readiness::probe_answer(&readiness).await;
                                drop(guard);
                                return Ok(resp.map(Guarded::unguarded));
                            }
                            let resp = match refused {
                                Some(e) => Ok(crate::error::respond(&e, crate::error::wants_grpc(req.headers()))),
                                None => stack.oneshot(req).await,
                            };
                            // Not boxed again: hyper takes the guarded body as it is.
                            resp.map(|r| r.map(|b| Guarded::new(b, guard)))
                        }
                    });
                    let conn = builder.serve_connection(TokioIo::new(Watched::new(tls, activity.clone())), svc);
                    listener::serve_conn(conn, activity, limits, drain, this.metrics.clone(), "inbound").await;
                }
            })
            .await
    }
}
