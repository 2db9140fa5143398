//! The innermost inbound service: the local app. HTTP is forwarded in the
//! version the app speaks (`app_protocol.rs`), with
//! the caller's verified SPIFFE ID in `x-weft-peer-id`; CONNECT becomes a
//! TCP tunnel to the app's port, closed when policy stops allowing the caller.

use std::sync::Arc;

use futures::future::BoxFuture;
use http::{header, HeaderValue, Method, Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use weft_certs::SpiffeId;

use super::{app_protocol, Inbound};
use crate::context::RequestContext;
use crate::error::ProxyError;
use crate::extended_connect::Exchange;
use crate::http::{boxed, empty, strip_hop_by_hop, Body, APP_PROTOCOL, PEER_ID, UNSENT};
use crate::metrics::{AuthzLabels, ConnLabels, OpenConn};
use crate::state::{authz, State};

/// The innermost inbound service: carried exchanges (upgrades,
/// 100-continue; `exchange.rs`), CONNECT tunnels to the app's TCP port,
/// everything else is forwarded as HTTP.
#[derive(Clone)]
pub(super) struct AppService {
    pub(super) inbound: Arc<Inbound>,
}

impl tower::Service<Request<Incoming>> for AppService {
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Response<Body>, ProxyError>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), ProxyError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let inbound = self.inbound.clone();
        Box::pin(async move {
            let peer = req.extensions().get::<RequestContext>().and_then(|c| c.peer.clone());
            let Some(peer) = peer else { return Err(ProxyError::Internal { what: MISSING_CONTEXT }) };
            if let Some(exchange) = req.extensions().get::<Exchange>() {
                let kind = exchange.kind.clone();
                inbound.exchange(req, kind, &peer).await
            } else if req.method() == Method::CONNECT {
                inbound.tunnel(req, &peer).await
            } else {
                inbound.forward(req, &peer).await
            }
        })
    }
}

/// Whether the app's kernel reset the connection (`ECONNRESET`, or `EPIPE`
/// on a write after the reset). A socket closed with data unread, or a
/// queued connection whose listener closed, is reset; an app that read the
/// whole request and then closed sends FIN instead, so a reset means the app
/// did not read all of it.
fn reset_by_app(e: &(dyn std::error::Error + 'static)) -> bool {
    crate::error::chain(e)
        .find_map(|e| e.downcast_ref::<std::io::Error>())
        .is_some_and(|io| matches!(io.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe))
}

/// The layers run behind the inbound connection, which always sets the context.
pub(crate) const MISSING_CONTEXT: &str = "request without caller context";

/// Resolves when a newly applied config denies `peer` TCP access.
async fn revoked(state: &State, peer: &SpiffeId) {
    let mut changes = state.changes();
    loop {
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
        let snapshot = state.snapshot();
        let req = authz::Request { method: None, path: None, port: snapshot.authz.port() };
        if !snapshot.authz.check(peer, &req).allowed {
            return;
        }
    }
}

impl Inbound {
    pub(super) async fn forward(&self, req: Request<Incoming>, peer: &SpiffeId) -> Result<Response<Body>, ProxyError> {
        let (mut parts, body) = req.into_parts();
        let caller_h2 = parts.headers.remove(APP_PROTOCOL).is_some_and(|v| v == "h2");
        let ask = app_protocol::Ask {
            caller_h2,
            grpc: parts
                .headers
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc")),
            declared: parts
                .extensions
                .get::<RequestContext>()
                .and_then(|c| c.snapshot.mesh.as_ref()?.services.get(&self.service).map(|s| s.protocol)),
        };
        let grpc = ask.grpc;
        let app_h2 = self.app_versions.choose(ask).await == app_protocol::Version::H2c;
        strip_hop_by_hop(&mut parts.headers);
        // Only the sidecar may say who the caller is.
        parts.headers.remove(PEER_ID);
        let made = parts.extensions.get::<RequestContext>().and_then(|c| c.peer_header.clone());
        if let Some(v) = made.or_else(|| HeaderValue::from_str(peer.as_str()).ok()) {
            parts.headers.insert(PEER_ID, v);
        }
        let client = if app_h2 {
            parts.version = Version::HTTP_2;
            self.h2.get()
        } else {
            parts.version = Version::HTTP_11;
            if let Some(host) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
                parts.headers.insert(header::HOST, host);
            }
            self.h1.get()
        };
        match client.request(Request::from_parts(parts, boxed(body))).await {
            Ok(resp) => {
                self.readiness.accepted();
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                // Only this sidecar may say a request never reached the app.
                parts.headers.remove(UNSENT);
                crate::http::detach_header_values(&mut parts.headers);
                parts.version = Version::HTTP_2;
                Ok(Response::from_parts(parts, boxed(body)))
            }
            Err(source) => {
                tracing::warn!(app = %self.app, error = %source, "local app request failed");
                // It may have been answered in a version the app no longer speaks.
                self.app_versions.forget().await;
                // Refused before a byte was sent, or reset unread by an app
                // that now refuses connections (its listener closed with our
                // connection still queued, or it closed an idle connection as
                // the request arrived): it never saw the request.
                let unsent = source.is_connect() || (reset_by_app(&source) && self.readiness.refuses_now().await);
                let e = ProxyError::AppFailed { app: self.app, source };
                if !unsent {
                    return Err(e);
                }
                // Not ready, and the caller may send the request to another endpoint.
                self.readiness.refused(&e);
                let mut resp = crate::error::respond(&e, grpc);
                resp.headers_mut().insert(UNSENT, HeaderValue::from_static("app-refused"));
                Ok(resp)
            }
        }
    }

    async fn tunnel(&self, mut req: Request<Incoming>, peer: &SpiffeId) -> Result<Response<Body>, ProxyError> {
        let app = match TcpStream::connect(self.app).await {
            Ok(app) => {
                self.readiness.accepted();
                app
            }
            Err(source) => {
                // Refused before a byte was carried: not ready, and the
                // caller may open the tunnel at another endpoint.
                self.readiness.refused(&source);
                let e = ProxyError::AppUnreachable { app: self.app, source };
                tracing::warn!(%peer, error = %e, "tunnel refused: the local app refuses connections");
                let mut resp = crate::error::respond(&e, false);
                resp.headers_mut().insert(UNSENT, HeaderValue::from_static("app-refused"));
                return Ok(resp);
            }
        };
        let _ = app.set_nodelay(true);
        let metrics = self.metrics.clone();
        let peer = peer.clone();
        let state = self.state.clone();
        // Keeps the connection from the idle close while the tunnel is open.
        let in_flight = req.extensions_mut().remove::<crate::listener::InFlight>();
        tokio::spawn(async move {
            let _open = OpenConn::new(&metrics, "inbound", "tcp");
            let _in_flight = in_flight;
            let upgraded = match hyper::upgrade::on(req).await {
                Ok(u) => u,
                Err(e) => return tracing::info!(%peer, error = %e, "CONNECT upgrade failed"),
            };
            let (mut app, mut upgraded) = (app, TokioIo::new(upgraded));
            let copy = tokio::io::copy_bidirectional_with_sizes(
                &mut upgraded,
                &mut app,
                crate::limits::TUNNEL_BUFFER,
                crate::limits::TUNNEL_BUFFER,
            );
            tokio::select! {
                r = copy => match r {
                    Ok((a, b)) => {
                        let labels = ConnLabels { direction: "inbound", protocol: "tcp" };
                        metrics.tcp_bytes.get_or_create(&labels).inc_by(a + b);
                    }
                    Err(e) => tracing::debug!(%peer, error = %e, "tunnel ended with error"),
                },
                // A policy change that no longer allows this caller closes its open connection.
                () = revoked(&state, &peer) => {
                    let labels = AuthzLabels { policy: "revoked".into(), outcome: "deny", protocol: "tcp" };
                    metrics.authz.get_or_create(&labels).inc();
                    tracing::info!(%peer, "closing TCP connection: no longer allowed by policy");
                }
            }
        });
        Ok(Response::new(empty()))
    }
}
