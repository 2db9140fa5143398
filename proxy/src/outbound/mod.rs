//! Outbound: the app's plain HTTP/1.1, HTTP/2 (h2c, gRPC), declared TCP
//! upstreams and intercepted connections (`intercept.rs`), carried to the
//! destination's inbound sidecar over the pooled mTLS HTTP/2 connection.
//!
//! A request passes: the accept loop here → [`Outbound::route_http`] (the
//! edge: metrics, error → response) → `route.rs` (rule, backend, the
//! request's context) → `timeout.rs` → `retry.rs` → `endpoint.rs` (balancer
//! pick, `pool.rs` connection) → the peer sidecar. TCP: `tunnel.rs`.

pub mod endpoint;
pub mod h2_client;
pub mod intercept;
pub mod pool;
pub mod probe;
pub mod retry;
pub mod route;
pub mod timeout;
pub mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use intercept::{Refusal, Verdict, FORMER_DESTINATION_RETENTION};
use tokio::net::{TcpListener, TcpStream};
use weft_runtime::serve::Server;

use crate::context::ServedBy;
use crate::detect::Protocol;
use crate::error::{respond, wants_grpc, HeaderHop, ProxyError};
use crate::extended_connect;
use crate::http::{boxed, Body};
use crate::limits;
use crate::listener::{self, Activity, Guarded, Watched};
use crate::metrics::{
    ConnLabels, HeaderLimitLabels, InterceptedLabels, Metrics, OpenConn, RequestMeta, UnknownDestinationLabels,
};
use crate::state::State;
use endpoint::EndpointService;
use pool::Pool;
use retry::{Retry, RetryLayer};
use timeout::{Timeout, TimeoutLayer};
use tower::{ServiceBuilder, ServiceExt};
use weft_runtime::drain::Drain;

pub struct Outbound {
    pub state: Arc<State>,
    pub pool: Arc<Pool>,
    pub metrics: Arc<Metrics>,
    /// The per-request stack behind routing: each concern a tower layer.
    stack: Timeout<Retry<EndpointService>>,
    /// How long an intercepted connection's first bytes are awaited before
    /// it is treated as opaque TCP (`--detect-timeout`).
    detect_timeout: std::time::Duration,
    /// The sidecar's own passthrough sockets (loop detection, `intercept.rs`).
    own: Arc<intercept::OwnSockets>,
    /// Whether the loop error was logged (once per process).
    loop_logged: std::sync::atomic::AtomicBool,
}

/// The app-facing listener's HTTP/1.1 + h2c connection builder.
type HttpBuilder = hyper_util::server::conn::auto::Builder<TokioExecutor>;

/// How long an intercepted connection's first bytes are awaited by default.
pub const DEFAULT_DETECT_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(100);

impl Outbound {
    /// The outbound side; intercepted connections wait [`DEFAULT_DETECT_TIMEOUT`]
    /// for their first bytes (see [`Outbound::with_detect_timeout`]).
    pub fn new(state: Arc<State>, pool: Arc<Pool>, metrics: Arc<Metrics>) -> Arc<Self> {
        Self::with_detect_timeout(state, pool, metrics, DEFAULT_DETECT_TIMEOUT)
    }

    /// The outbound side, waiting `detect_timeout` for an intercepted
    /// connection's first bytes before treating it as opaque TCP.
    pub fn with_detect_timeout(
        state: Arc<State>,
        pool: Arc<Pool>,
        metrics: Arc<Metrics>,
        detect_timeout: std::time::Duration,
    ) -> Arc<Self> {
        let stack = ServiceBuilder::new()
            .layer(TimeoutLayer)
            .layer(RetryLayer::new(metrics.clone()))
            .service(EndpointService { pool: pool.clone(), metrics: metrics.clone() });
        Arc::new(Self {
            state,
            pool,
            metrics,
            stack,
            detect_timeout,
            own: Arc::default(),
            loop_logged: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

/// Why an `--upstream` flag value is not `NAME=ADDR`.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamFlagError {
    #[error("{0:?}: expected NAME=ADDR, e.g. db=127.0.0.1:16001")]
    Shape(String),
    #[error("{flag:?}: address {addr:?}: {source}")]
    Address { flag: String, addr: String, source: std::net::AddrParseError },
    #[error("{0:?}: service name is empty")]
    EmptyName(String),
}

impl Outbound {
    /// Serves the app-facing HTTP listener (HTTP/1.1 and h2c on one port),
    /// with the header-read and idle timeouts and the connection cap of
    /// [`Limits`](crate::limits::Limits). Connections the pod's rules
    /// redirected here go by their original destination (`intercept.rs`).
    pub async fn serve_http(self: Arc<Self>, listener: TcpListener, drain: Drain) {
        let limits = *self.pool.limits();
        let server = Server::new("outbound").max_connections(limits.max_connections);
        self.metrics.listeners.add("outbound".into(), server.stats());
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        // The header-read timeout is the watchdog's (listener.rs): hyper's would also cut idle keep-alives.
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size(limits.parser_bytes())
            .max_headers(limits::HTTP1_MAX_HEADER_FIELDS);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(limits.parser_bytes_u32())
            .keep_alive_interval(limits::H2_KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(limits::H2_KEEP_ALIVE_TIMEOUT);
        let builder = Arc::new(builder);
        server
            .serve(listener, drain, move |tcp, _, drain| {
                let this = self.clone();
                let builder = builder.clone();
                async move {
                    match intercept::original_dst(&tcp) {
                        None => this.serve_http_conn(tcp, &builder, drain, None).await,
                        Some(dst) => this.intercepted(tcp, dst, &builder, drain).await,
                    }
                }
            })
            .await
    }

    /// Serves one app connection as HTTP/1.1 or h2c until it ends. `aimed`:
    /// the service an intercepted connection was for (its requests go there
    /// whatever their `Host`); None: the `Host` header names the service.
    async fn serve_http_conn<I>(self: Arc<Self>, io: I, builder: &HttpBuilder, drain: Drain, aimed: Option<Arc<str>>)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let limits = *self.pool.limits();
        let _open = OpenConn::new(&self.metrics, "outbound", "http");
        let activity = Activity::new(false);
        let counted = activity.clone();
        let metrics = self.metrics.clone();
        let held = drain.clone();
        let svc = service_fn(move |mut req: Request<hyper::body::Incoming>| {
            // For an upgrade: the spliced connection outlives this task
            // (`CallerUpgrade::drain`). Only then: an extension costs every
            // other request an allocation.
            if req.headers().contains_key(http::header::UPGRADE) {
                req.extensions_mut().insert(held.clone());
            }
            let this = self.clone();
            let guard = counted.start();
            let aimed = aimed.clone();
            async move {
                let resp = this.route_http(req, aimed.as_deref()).await;
                // Not boxed again: hyper takes the guarded body as it is.
                Ok::<_, std::convert::Infallible>(resp.map(|b| Guarded::new(b, guard)))
            }
        });
        let io = TokioIo::new(Watched::new(io, activity.clone()));
        let conn = builder.serve_connection_with_upgrades(io, svc);
        listener::serve_conn(conn, activity, limits, drain, metrics, "outbound").await;
    }

    /// An intercepted connection to `dst` (see `intercept.rs`).
    async fn intercepted(self: Arc<Self>, tcp: TcpStream, dst: SocketAddr, builder: &HttpBuilder, drain: Drain) {
        if tcp.peer_addr().is_ok_and(|peer| self.own.contains(peer)) {
            return self.refuse(tcp, dst, Refusal::Loop);
        }
        let (service, declared_opaque) = match intercept::judge(&self.state, dst, intercept::FIRST_CONFIG_WAIT).await {
            Verdict::Mesh { service, declared_opaque } => (service, declared_opaque),
            Verdict::Passthrough => return self.passthrough(tcp, dst).await,
            Verdict::Refused(why) => return self.refuse(tcp, dst, why),
        };
        let (protocol, io) = if declared_opaque {
            (Protocol::Opaque, intercept::Rewind::new(tcp, Vec::new()))
        } else {
            match intercept::detect_within(tcp, self.detect_timeout).await {
                Ok(detected) => detected,
                Err(e) => {
                    tracing::debug!(%dst, error = %e, "intercepted connection failed before its protocol was known");
                    return;
                }
            }
        };
        let labels = InterceptedLabels { service: service.clone(), protocol: intercept::label(protocol) };
        self.metrics.intercepted.get_or_create(&labels).inc();
        match protocol {
            Protocol::Http1 | Protocol::Http2 => self.serve_http_conn(io, builder, drain, Some(service.into())).await,
            Protocol::Tls | Protocol::Opaque => {
                if let Err(e) = self.tunnel(io, &service).await {
                    tracing::info!(%dst, %service, error = %e, "intercepted TCP tunnel failed");
                }
            }
        }
    }

    /// Refuses an intercepted connection (a reset), counts it, and says why.
    fn refuse(&self, tcp: TcpStream, dst: SocketAddr, why: Refusal) {
        self.metrics.unknown_destinations.get_or_create(&UnknownDestinationLabels { action: why.action() }).inc();
        intercept::reset(tcp);
        match why {
            Refusal::RegistryOnly => {
                tracing::info!(%dst, "refused: not a destination of the mesh (Mesh outboundTrafficPolicy: registryOnly)")
            }
            Refusal::NoConfig => tracing::warn!(
                %dst,
                wait_secs = intercept::FIRST_CONFIG_WAIT.as_secs(),
                "refused: no config from the control plane yet, so the destination cannot be told from the mesh's (it would otherwise leave in plaintext)"
            ),
            Refusal::FormerlyInMesh { first: true } => tracing::warn!(
                %dst,
                retention_secs = FORMER_DESTINATION_RETENTION.as_secs(),
                "refused: this address left the mesh recently (a draining or restarting pod, or a removed Service address); it is not passed through in plaintext until the retention ends"
            ),
            Refusal::FormerlyInMesh { first: false } => {}
            Refusal::Loop => {
                if !self.loop_logged.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::error!(
                        %dst,
                        "refused: the sidecar's own traffic is being intercepted and redirected back into it (a loop); run the sidecar as the UID that weft init-iptables exempts (its --proxy-uid, default 1337), and pass weft-proxy the same --proxy-uid so it checks this at start"
                    );
                }
            }
        }
    }

    /// An intercepted connection to a destination the mesh does not know,
    /// under `allowAny`: passed through untouched.
    async fn passthrough(&self, mut tcp: TcpStream, dst: SocketAddr) {
        self.metrics.unknown_destinations.get_or_create(&UnknownDestinationLabels { action: "passthrough" }).inc();
        let _open = OpenConn::new(&self.metrics, "outbound", "passthrough");
        // The sidecar's own connections are exempt from the rules (--proxy-uid), so this one leaves directly.
        let (mut up, _own) = match tokio::time::timeout(self.pool.connect_timeout(), self.own.connect(dst)).await {
            Ok(Ok(up)) => up,
            Ok(Err(e)) => return tracing::info!(%dst, error = %e, "passthrough connect failed"),
            Err(_) => return tracing::info!(%dst, "passthrough connect timed out"),
        };
        if let Ok((a, b)) = tokio::io::copy_bidirectional(&mut tcp, &mut up).await {
            let labels = ConnLabels { direction: "outbound", protocol: "passthrough" };
            self.metrics.tcp_bytes.get_or_create(&labels).inc_by(a + b);
        }
    }

    /// The edge of an app's HTTP request: routes it and sends it through
    /// the stack, turns a failure into its response, and counts it.
    async fn route_http(&self, mut req: Request<Incoming>, aimed: Option<&str>) -> Response<Body> {
        let start = Instant::now();
        if let Some(service) = aimed {
            aim_at(&mut req, service);
        }
        let grpc = wants_grpc(req.headers());
        let max = self.pool.limits().max_header_bytes;
        let size = limits::request_header_size(&req);
        if size > max {
            let labels = HeaderLimitLabels { direction: "outbound", message: "request" };
            self.metrics.headers_too_large.get_or_create(&labels).inc();
            let e = ProxyError::HeadersTooLarge { hop: HeaderHop::RequestFromApp, size: Some(size), limit: max };
            return respond(&e, grpc);
        }
        let mut meta = RequestMeta::default();
        extended_connect::strip_internal(req.headers_mut());
        let carried = extended_connect::kind_of(&req);
        let caller = carried.as_ref().and_then(|kind| extended_connect::take_caller(&mut req, kind));
        let (service, resp) = match route::route(&self.state.snapshot(), req.map(boxed), &mut meta) {
            Ok(route::Routed { service, req, rule }) => {
                let req = match carried {
                    Some(kind) => extended_connect::to_connect(req, kind),
                    None => req,
                };
                let mut resp = match self.stack.clone().oneshot(req).await {
                    Ok(mut resp) => {
                        if let Some(ServedBy(id)) = resp.extensions_mut().remove::<ServedBy>() {
                            meta.peer = Some(id);
                        }
                        resp
                    }
                    Err(e) => self.failed(&e, &mut meta, grpc),
                };
                route::modify_headers(&rule.response_headers, resp.headers_mut());
                if let Some(caller) = caller {
                    self.upgrade_caller(caller, &mut resp);
                }
                (service, resp)
            }
            // A request that names no service of the mesh is answered, and
            // counted as a refusal (its host is no service label).
            Err((None, e)) => {
                // A sidecar with --calls gets only those services: a name
                // outside the list is out of its view, not (known) absent.
                let e = match e {
                    ProxyError::UnknownService { service }
                        if !self.state.calls().is_empty() && !self.state.calls().contains(&service) =>
                    {
                        ProxyError::NotInCalls { service, calls: self.state.calls().to_vec() }
                    }
                    e => e,
                };
                if let Some(reason) = e.refusal() {
                    self.metrics.refused("outbound", reason);
                }
                tracing::debug!(error = %e, "request refused before routing");
                return respond(&e, grpc);
            }
            Err((Some(service), e)) => (service, self.failed(&e, &mut meta, grpc)),
        };
        self.metrics.response("outbound", &service, meta, resp, start.elapsed().as_secs_f64())
    }

    /// On the app's 101 to a carried upgrade: the caller gets the 101 with
    /// `Connection`/`Upgrade` restored, and its connection is spliced to the
    /// stream to the peer sidecar.
    fn upgrade_caller(&self, caller: extended_connect::CallerUpgrade, resp: &mut Response<Body>) {
        if resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
            return;
        }
        let to = resp.extensions_mut().remove::<extended_connect::UpgradedTo>();
        let value = to.map(|t| t.0).unwrap_or(caller.requested);
        extended_connect::upgrade_headers(resp.headers_mut(), &value);
        let peer = hyper::upgrade::on(&mut *resp);
        extended_connect::splice(caller.on_upgrade, peer, self.metrics.clone(), "outbound", caller.drain);
    }

    /// The response for a failed request, with the endpoint it failed at.
    fn failed(&self, e: &ProxyError, meta: &mut RequestMeta, grpc: bool) -> Response<Body> {
        if let Some(id) = e.peer() {
            meta.peer = Some(Arc::new(id.clone()));
        }
        respond(e, grpc)
    }

    /// Serves a declared TCP upstream: each connection becomes an HTTP
    /// CONNECT stream to an endpoint of `service`.
    /// Connections beyond `--max-connections` wait in the backlog. Tunnels
    /// have no idle timeout: the app's protocol decides how long they live.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener, service: String, drain: Drain) {
        let server = Server::new("upstream").max_connections(self.pool.limits().max_connections);
        self.metrics.listeners.add(format!("upstream:{service}"), server.stats());
        server
            .serve(listener, drain, move |tcp, from, _| {
                let this = self.clone();
                let service = service.clone();
                async move {
                    if let Err(e) = this.tunnel(tcp, &service).await {
                        tracing::info!(%from, %service, error = %e, "TCP tunnel failed");
                    }
                }
            })
            .await
    }
}

/// Points an intercepted request at `service`: its `Host` (and its
/// target's authority, if any) named the address the app dialled, which
/// interception has already mapped to the service.
fn aim_at<B>(req: &mut Request<B>, service: &str) {
    let Ok(host) = http::HeaderValue::from_str(service) else { return };
    req.headers_mut().insert(http::header::HOST, host);
    if req.uri().authority().is_some() {
        let mut parts = req.uri().clone().into_parts();
        if let Ok(authority) = service.parse() {
            parts.authority = Some(authority);
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    }
}

/// Parses `NAME=ADDR` for `--upstream`.
pub fn parse_upstream(s: &str) -> Result<(String, SocketAddr), UpstreamFlagError> {
    let (name, addr) = s.split_once('=').ok_or_else(|| UpstreamFlagError::Shape(s.to_string()))?;
    let addr = addr.parse().map_err(|source| UpstreamFlagError::Address {
        flag: s.to_string(),
        addr: addr.to_string(),
        source,
    })?;
    if name.is_empty() {
        return Err(UpstreamFlagError::EmptyName(s.to_string()));
    }
    Ok((name.to_string(), addr))
}
#[cfg(test)]
mod tests {
    #[test]
    fn an_intercepted_request_is_aimed_at_its_service_whatever_it_named() {
        let mut h1 = http::Request::get("/x?y=1").header("host", "10.1.0.5:8080").body(()).unwrap();
        super::aim_at(&mut h1, "backend");
        assert_eq!((h1.headers()["host"].to_str().unwrap(), h1.uri().to_string()), ("backend", "/x?y=1".into()));
        let mut h2 = http::Request::get("http://10.96.0.10:8080/x").body(()).unwrap();
        super::aim_at(&mut h2, "backend");
        assert_eq!(h2.uri().to_string(), "http://backend/x");
        assert_eq!(h2.headers()["host"], "backend");
    }

    #[test]
    fn upstream_flag() {
        assert_eq!(super::parse_upstream("db=127.0.0.1:1").unwrap().0, "db");
        assert!(super::parse_upstream("db").unwrap_err().to_string().contains("NAME=ADDR"));
        assert!(super::parse_upstream("db=nope").is_err());
        assert!(super::parse_upstream("=127.0.0.1:1").is_err());
    }
}
