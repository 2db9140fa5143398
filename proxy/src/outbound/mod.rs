//! Outbound: the app's plain HTTP/1.1, HTTP/2 (h2c, gRPC) and declared TCP
//! upstreams, carried to the destination's inbound sidecar over the pooled
//! mTLS HTTP/2 connection.

pub mod pool;
pub mod retry;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body::Body as _;

use http::{header, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

use crate::balance::Balancer;
use crate::discovery::{Discovery, Table};
use crate::http::{boxed, empty, local_response, strip_hop_by_hop, Body, APP_PROTOCOL};
use crate::metrics::{ConnLabels, Metrics, OpenConn, RequestMeta, RetryLabels};
use crate::routing::{modify_headers, Backend, Decision, RequestInfo, Rule};
use crate::shutdown::Drain;
use pool::Pool;
use retry::{idempotent, Budget};

pub struct Outbound {
    pub discovery: Arc<Discovery>,
    pub pool: Arc<Pool>,
    pub balancer: Balancer,
    /// Retry budgets per route rule.
    pub budgets: Mutex<HashMap<String, Arc<Budget>>>,
    pub metrics: Arc<Metrics>,
}

/// A copy of a request head (method, URI, version, headers) for a retry.
fn clone_head(parts: &http::request::Parts) -> http::request::Parts {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req.into_parts().0
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

    /// Routes, applies the rule's timeouts, retries and header filters, and
    /// sends the request to an endpoint of the chosen backend.
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
        let default_rule;
        let rule = match table.router.route(service, &info) {
            Decision::Rule(r) => r,
            Decision::Default => {
                default_rule = Rule::default_for(service);
                &default_rule
            }
            Decision::NoMatch => {
                let msg =
                    format!("weft: no route of service {service:?} matches {} {}", parts.method, parts.uri.path());
                return local_response(StatusCode::NOT_FOUND, msg);
            }
        };
        let backend = rule.pick_backend();
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

        // Only requests that are safe to repeat and have no body to replay are retried.
        let retry = rule.retry.as_ref().filter(|_| idempotent(&parts.method) && body.is_end_stream());
        let attempts = self.attempts(&table, rule, backend, parts, body, retry, meta);
        let mut resp = match rule.request_timeout {
            None => attempts.await,
            Some(t) => match tokio::time::timeout(t, attempts).await {
                Ok(r) => r,
                Err(_) => local_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("weft: {service} did not answer within the route's {t:?} request timeout"),
                ),
            },
        };
        modify_headers(&rule.response_headers, resp.headers_mut());
        resp
    }

    #[allow(clippy::too_many_arguments)]
    async fn attempts(
        &self,
        table: &Table,
        rule: &Rule,
        backend: &Backend,
        parts: http::request::Parts,
        body: Incoming,
        retry: Option<&weft_config::Retry>,
        meta: &mut RequestMeta,
    ) -> Response<Body> {
        let budget = retry.map(|r| self.budget(&rule.name, &r.budget));
        if let Some(b) = &budget {
            b.deposit();
        }
        let tries = 1 + retry.map(|r| r.attempts).unwrap_or(0);
        let mut body = Some(body);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let endpoints = backend.select(table.endpoints(&backend.service));
            let Some((ep, in_flight)) = self.balancer.pick(&endpoints) else {
                let subset =
                    if backend.subset.is_empty() { String::new() } else { format!(" subset {:?}", backend.subset) };
                let msg = format!("weft: no endpoints for service {:?}{subset}", backend.service);
                return local_response(StatusCode::SERVICE_UNAVAILABLE, msg);
            };
            meta.peer = ep.spiffe_id.to_string();
            // A retried request has no body (checked above); the first may.
            let req_body = match retry {
                Some(_) => empty(),
                None => body.take().map(boxed).unwrap_or_else(empty),
            };
            let req = Request::from_parts(clone_head(&parts), req_body);
            let result = self.send(ep.address, &ep.spiffe_id, req, rule.try_timeout).await;
            let failed = match &result {
                Ok(r) => r.status().is_server_error(),
                Err(_) => true,
            };
            if in_flight.done(!failed) {
                self.metrics.ejections.inc();
            }
            let retryable = match (&result, retry) {
                (_, None) => false,
                (Ok(r), Some(rt)) => rt.codes.contains(&r.status().as_u16()),
                (Err(_), Some(_)) => true,
            };
            if retryable && attempt < tries {
                let allowed = budget.as_ref().is_some_and(|b| b.withdraw(Instant::now()));
                let outcome = if allowed { "sent" } else { "budget_exhausted" };
                self.metrics.retries.get_or_create(&RetryLabels { route: rule.name.clone(), outcome }).inc();
                if allowed {
                    let backoff = retry.and_then(|r| r.backoff).map(|d| d.0).unwrap_or(Duration::from_millis(25));
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            }
            return match result {
                Ok(resp) => resp,
                Err(resp) => resp,
            };
        }
    }

    /// One attempt on one endpoint; an `Err` is the sidecar's own error response.
    async fn send(
        &self,
        addr: std::net::SocketAddr,
        id: &weft_certs::SpiffeId,
        req: Request<Body>,
        try_timeout: Option<Duration>,
    ) -> Result<Response<Body>, Response<Body>> {
        let mut sender = self.pool.get(addr, id).await.map_err(|e| {
            tracing::warn!(endpoint = %addr, error = %e, "no connection to endpoint");
            local_response(StatusCode::BAD_GATEWAY, format!("weft: {e}"))
        })?;
        let call = sender.send_request(req);
        let resp = match try_timeout {
            None => call.await,
            Some(t) => tokio::time::timeout(t, call).await.map_err(|_| {
                local_response(StatusCode::GATEWAY_TIMEOUT, format!("weft: attempt timed out after {t:?}"))
            })?,
        };
        match resp {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Ok(Response::from_parts(parts, boxed(body)))
            }
            Err(e) => {
                tracing::warn!(endpoint = %addr, error = %e, "request to endpoint failed");
                Err(local_response(StatusCode::BAD_GATEWAY, format!("weft: upstream {addr}: {e}")))
            }
        }
    }

    fn budget(&self, route: &str, cfg: &weft_config::RetryBudget) -> Arc<Budget> {
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        // Keyed by the budget's settings too, so a changed budget takes effect.
        let key = format!("{route}|{}|{}", cfg.percent, cfg.min_retries_per_second);
        budgets.entry(key).or_insert_with(|| Arc::new(Budget::new(cfg.clone()))).clone()
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
