//! The callee's side of a carried HTTP/1.1 exchange (`extended_connect.rs`):
//! authorization and rate limits have passed (they judged the CONNECT's
//! head, which the edge restored), so the CONNECT is answered `200` ("go")
//! and one HTTP/1.1 exchange is served on the stream. Its head is framing
//! only: the app gets the CONNECT's head with the inner body —
//! `Expect: 100-continue` requests as any forwarded request, upgrades on a
//! connection of their own to the app (HTTP/1.1 with `Connection: upgrade`),
//! spliced to the stream after the app's 101.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http::request::Parts;
use http::{header, HeaderValue, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use weft_certs::SpiffeId;

use super::Inbound;
use crate::error::{respond, ProxyError};
use crate::extended_connect::{self, CountedLater, Kind};
use crate::http::{boxed, empty, strip_hop_by_hop, Body, APP_PROTOCOL, PEER_ID};
use crate::metrics::RequestMeta;

impl Inbound {
    /// Answers an allowed carried exchange's CONNECT with 200 and serves the
    /// exchange on its stream.
    pub(super) async fn exchange(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        kind: Kind,
        peer: &SpiffeId,
    ) -> Result<Response<Body>, ProxyError> {
        let start = Instant::now();
        let on_stream = hyper::upgrade::on(&mut req);
        let (head, _) = req.into_parts();
        // The service below is called once per inner request; only the first is the carried one.
        let head = Arc::new(Mutex::new(Some(head)));
        let peer = peer.clone();
        tokio::spawn(async move {
            let stream = match on_stream.await {
                Ok(s) => s,
                Err(e) => return tracing::info!(%peer, error = %e, "carried exchange: the stream did not open"),
            };
            let svc = service_fn(move |inner: Request<Incoming>| {
                let head = head.lock().unwrap_or_else(|e| e.into_inner()).take();
                let (this, kind, peer) = (self.clone(), kind.clone(), peer.clone());
                async move {
                    let Some(head) = head else {
                        let e = ProxyError::BadExchange { what: "a second request on one carried exchange" };
                        return Ok::<_, Infallible>(respond(&e, false));
                    };
                    let mut resp = match kind {
                        Kind::Continue => this.forward(Request::from_parts(head, inner.into_body()), &peer).await,
                        Kind::Upgrade(value) => this.upgrade_app(head, inner, &value, &peer).await,
                    }
                    .unwrap_or_else(|e| respond(&e, false));
                    *resp.version_mut() = Version::HTTP_11;
                    let meta = RequestMeta { peer: Some(Arc::new(peer.clone())), ..Default::default() };
                    let secs = start.elapsed().as_secs_f64();
                    Ok(this.metrics.response("inbound", &this.service, meta, resp, secs))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(stream, svc).with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "carried exchange ended with an error");
            }
        });
        let mut go = Response::new(empty());
        go.extensions_mut().insert(CountedLater);
        Ok(go)
    }

    /// Sends a carried upgrade request to the app on a connection of its
    /// own; on the app's 101 splices that connection to the stream.
    async fn upgrade_app(
        &self,
        mut head: Parts,
        mut inner: Request<Incoming>,
        value: &HeaderValue,
        peer: &SpiffeId,
    ) -> Result<Response<Body>, ProxyError> {
        let unreachable = |source| ProxyError::AppUnreachable { app: self.app, source };
        let on_stream = hyper::upgrade::on(&mut inner);
        head.headers.remove(APP_PROTOCOL);
        strip_hop_by_hop(&mut head.headers);
        // Only the sidecar may say who the caller is.
        head.headers.remove(PEER_ID);
        if let Ok(v) = HeaderValue::from_str(peer.as_str()) {
            head.headers.insert(PEER_ID, v);
        }
        if let Some(host) = head.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
            head.headers.insert(header::HOST, host);
        }
        extended_connect::upgrade_headers(&mut head.headers, value);
        head.version = Version::HTTP_11;
        // Origin form on the app's own connection (RFC 9112 3.2.1).
        head.uri = head.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").parse().unwrap_or_default();

        let tcp = TcpStream::connect(self.app).await.map_err(unreachable)?;
        let _ = tcp.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| unreachable(std::io::Error::other(e)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upgraded app connection ended with an error");
            }
        });
        let mut resp = sender
            .send_request(Request::from_parts(head, inner.into_body()))
            .await
            .map_err(|e| unreachable(std::io::Error::other(e)))?;
        let upgraded_to = resp.headers().get(header::UPGRADE).cloned();
        strip_hop_by_hop(resp.headers_mut());
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            extended_connect::upgrade_headers(resp.headers_mut(), upgraded_to.as_ref().unwrap_or(value));
            let app = hyper::upgrade::on(&mut resp);
            extended_connect::splice(on_stream, app, self.metrics.clone(), "inbound", None);
        }
        Ok(resp.map(boxed))
    }
}
