//! Outbound: the app's plain HTTP/1.1, HTTP/2 (h2c, gRPC) and declared TCP
//! upstreams, carried to the destination's inbound sidecar over the pooled
//! mTLS HTTP/2 connection.

pub mod endpoint;
pub mod pool;
pub mod retry;
pub mod timeout;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{header, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

use crate::balance::Balancer;
use crate::discovery::Discovery;
use crate::http::{boxed, empty, local_response, strip_hop_by_hop, Body, APP_PROTOCOL};
use crate::metrics::{ConnLabels, Metrics, OpenConn, RequestMeta};
use crate::routing::{modify_headers, Decision, RequestInfo, RouteContext};
use endpoint::{EndpointService, ServedBy};
use pool::Pool;
use retry::{Retry, RetryLayer};
use timeout::{Timeout, TimeoutLayer};
use tower::{ServiceBuilder, ServiceExt};
use weft_runtime::drain::Drain;

pub struct Outbound {
    pub discovery: Arc<Discovery>,
    pub pool: Arc<Pool>,
    pub balancer: Arc<Balancer>,
    pub metrics: Arc<Metrics>,
    /// The per-request stack behind routing: each concern a tower layer.
    stack: Timeout<Retry<EndpointService>>,
}

impl Outbound {
    pub fn new(discovery: Arc<Discovery>, pool: Arc<Pool>, metrics: Arc<Metrics>) -> Arc<Self> {
        let balancer = Arc::new(Balancer::default());
        let stack = ServiceBuilder::new()
            .layer(TimeoutLayer)
            .layer(RetryLayer::new(metrics.clone()))
            .service(EndpointService { pool: pool.clone(), balancer: balancer.clone(), metrics: metrics.clone() });
        Arc::new(Self { discovery, pool, balancer, metrics, stack })
    }
}

/// The service an authority names: `reviews`, `reviews:9080` → `reviews`.
pub fn service_of(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => authority,
    }
}

impl Outbound {
    /// Serves the app-facing HTTP listener (HTTP/1.1 and h2c on one port).
    pub async fn serve_http(self: Arc<Self>, listener: TcpListener, drain: Drain) {
        loop {
            let (tcp, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => { tracing::warn!(error = %e, "outbound accept failed"); continue; }
                },
                _ = drain.signaled() => return,
            };
            let _ = tcp.set_nodelay(true);
            let this = self.clone();
            let drain = drain.clone();
            tokio::spawn(async move {
                let _open = OpenConn::new(&this.metrics, "outbound", "http");
                let svc = service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, std::convert::Infallible>(this.route_http(req).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc);
                drain.watch(conn).await;
            });
        }
    }

    async fn route_http(&self, req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        let authority = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string));
        let Some(authority) = authority else {
            return local_response(
                StatusCode::BAD_REQUEST,
                "weft: request has no Host header or authority to route by",
            );
        };
        let service = service_of(&authority).to_string();
        let mut meta = RequestMeta::default();
        let resp = self.forward_http(req, &authority, &service, &mut meta).await;
        self.metrics.request("outbound", &service, &meta, resp.status().as_u16(), start.elapsed().as_secs_f64());
        resp
    }

    /// Routes the request (rule, weighted backend), prepares it for the hop
    /// to the peer sidecar, and sends it through the timeout → retry →
    /// endpoint stack.
    async fn forward_http(
        &self,
        req: Request<Incoming>,
        authority: &str,
        service: &str,
        meta: &mut RequestMeta,
    ) -> Response<Body> {
        // One table for the whole request: a config change applies between requests.
        let table = self.discovery.table();
        let (mut parts, body) = req.into_parts();
        let info = RequestInfo {
            method: &parts.method,
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &parts.headers,
        };
        let rule = match table.router.route(service, &info) {
            Decision::Rule(r) => r,
            Decision::Default => table.default_rule(service),
            Decision::NoMatch => {
                let msg =
                    format!("weft: no route of service {service:?} matches {} {}", parts.method, parts.uri.path());
                return local_response(StatusCode::NOT_FOUND, msg);
            }
        };
        let backend = rule.pick_backend().clone();
        meta.route = rule.name.clone();
        meta.backend = backend.subset.clone();

        let app_protocol = if parts.version == Version::HTTP_2 { "h2" } else { "h1" };
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::HOST);
        parts.headers.insert(APP_PROTOCOL, http::HeaderValue::from_static(app_protocol));
        modify_headers(&rule.request_headers, &mut parts.headers);
        let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        parts.uri = match Uri::builder().scheme("http").authority(authority).path_and_query(path).build() {
            Ok(u) => u,
            Err(e) => return local_response(StatusCode::BAD_REQUEST, format!("weft: bad request target: {e}")),
        };
        parts.version = Version::HTTP_2;
        parts.extensions.insert(RouteContext { table, rule: rule.clone(), backend });

        let Ok(mut resp) = self.stack.clone().oneshot(Request::from_parts(parts, boxed(body))).await;
        if let Some(ServedBy(id)) = resp.extensions().get::<ServedBy>() {
            meta.peer = id.to_string();
        }
        modify_headers(&rule.response_headers, resp.headers_mut());
        resp
    }

    /// Serves a declared TCP upstream: each connection becomes an HTTP
    /// CONNECT stream to an endpoint of `service`.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener, service: String, drain: Drain) {
        loop {
            let (tcp, from) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => { tracing::warn!(error = %e, "upstream accept failed"); continue; }
                },
                _ = drain.signaled() => return,
            };
            let _ = tcp.set_nodelay(true);
            let this = self.clone();
            let service = service.clone();
            tokio::spawn(async move {
                if let Err(e) = this.tunnel(tcp, &service).await {
                    tracing::info!(%from, %service, error = %e, "TCP tunnel failed");
                }
            });
        }
    }

    async fn tunnel(&self, mut tcp: TcpStream, service: &str) -> Result<(), String> {
        let _open = OpenConn::new(&self.metrics, "outbound", "tcp");
        let table = self.discovery.table();
        let endpoints: Vec<_> = table.endpoints(service).iter().collect();
        let (ep, _in_flight) =
            self.balancer.pick(&endpoints).ok_or_else(|| format!("no endpoints for service {service:?}"))?;
        let (addr, id) = (ep.address, ep.spiffe_id.clone());
        drop(table);
        let mut sender = self.pool.get(addr, &id).await.map_err(|e| e.to_string())?;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("{service}:0"))
            .version(Version::HTTP_2)
            .body(empty())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        if resp.status() != StatusCode::OK {
            return Err(format!("peer refused the tunnel: {}", resp.status()));
        }
        let upgraded = hyper::upgrade::on(resp).await.map_err(|e| e.to_string())?;
        let (up, down) =
            tokio::io::copy_bidirectional(&mut tcp, &mut TokioIo::new(upgraded)).await.map_err(|e| e.to_string())?;
        self.metrics.tcp_bytes.get_or_create(&ConnLabels { direction: "outbound", protocol: "tcp" }).inc_by(up + down);
        Ok(())
    }
}

/// Parses `NAME=ADDR` for `--upstream`.
pub fn parse_upstream(s: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) =
        s.split_once('=').ok_or_else(|| format!("{s:?}: expected NAME=ADDR, e.g. db=127.0.0.1:16001"))?;
    let addr = addr.parse().map_err(|e| format!("{s:?}: address {addr:?}: {e}"))?;
    if name.is_empty() {
        return Err(format!("{s:?}: service name is empty"));
    }
    Ok((name.to_string(), addr))
}

#[cfg(test)]
mod tests {
    #[test]
    fn service_from_authority() {
        assert_eq!(super::service_of("reviews"), "reviews");
        assert_eq!(super::service_of("reviews:9080"), "reviews");
        assert_eq!(super::service_of("[::1]:80"), "[::1]");
    }

    #[test]
    fn upstream_flag() {
        assert_eq!(super::parse_upstream("db=127.0.0.1:1").unwrap().0, "db");
        assert!(super::parse_upstream("db").unwrap_err().contains("NAME=ADDR"));
        assert!(super::parse_upstream("db=nope").is_err());
        assert!(super::parse_upstream("=127.0.0.1:1").is_err());
    }
}
