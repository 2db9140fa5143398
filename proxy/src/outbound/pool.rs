//! One mutual-TLS HTTP/2 connection per peer sidecar, shared by every
//! request and TCP tunnel to that peer. The peer must present exactly the
//! SPIFFE ID that discovery gave for it. The connection is kept in the
//! endpoint's state (`state::EndpointState`), so it leaves with the endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use weft_certs::{IdMatcher, SpiffeId, SpiffeVerifier};

use crate::error::{ConnectError, ProxyError};
use crate::http::Body;
use crate::identity::Identity;
use crate::metrics::{Metrics, OpenConn};
use crate::state::{Endpoint, Pooled};

pub struct Pool {
    identity: Arc<Identity>,
    metrics: Arc<Metrics>,
    connect_timeout: Duration,
}

impl Pool {
    pub fn new(identity: Arc<Identity>, metrics: Arc<Metrics>, connect_timeout: Duration) -> Arc<Self> {
        Arc::new(Self { identity, metrics, connect_timeout })
    }

    /// A sender on the pooled connection to `ep`, connecting if needed.
    /// Concurrent callers for one peer wait for a single connection attempt.
    pub async fn get(&self, ep: &Endpoint) -> Result<SendRequest<Body>, ProxyError> {
        let mut slot = ep.state.conn.lock().await;
        if let Some(pooled) = slot.as_ref() {
            if !pooled.sender.is_closed() {
                return Ok(pooled.sender.clone());
            }
        }
        let sender = self.connect(ep.address, &ep.spiffe_id).await.map_err(|e| match e {
            // A certificate the verifier refused: not the identity discovery named.
            ConnectError::Tls { addr, id, source } if bad_certificate(&source) => {
                ProxyError::PeerIdentity { addr, expected: id, source }
            }
            source => ProxyError::ConnectFailed { peer: ep.spiffe_id.clone(), source: Box::new(source) },
        })?;
        *slot = Some(Pooled::new(sender.clone(), &self.metrics.pool_connections));
        Ok(sender)
    }

    async fn connect(&self, addr: SocketAddr, id: &SpiffeId) -> Result<SendRequest<Body>, ConnectError> {
        let verifier = SpiffeVerifier::new(self.identity.bundle.clone(), IdMatcher::Exact(id.clone()));
        let tls =
            weft_certs::tls::client_config(Some(self.identity.resolver.clone()), verifier, &[weft_certs::tls::ALPN_H2]);
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout { addr })?
            .map_err(|source| ConnectError::Tcp { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(
            self.connect_timeout,
            TlsConnector::from(Arc::new(tls)).connect(weft_certs::tls::server_name(), tcp),
        )
        .await
        .map_err(|_| ConnectError::Timeout { addr })?
        .map_err(|source| {
            self.metrics.handshake("outbound", "error");
            ConnectError::Tls { addr, id: id.clone(), source }
        })?;
        if tls.get_ref().1.alpn_protocol() != Some(weft_certs::tls::ALPN_H2) {
            return Err(ConnectError::NoH2 { addr });
        }
        self.metrics.handshake("outbound", "ok");
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .adaptive_window(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|source| ConnectError::H2 { addr, source })?;
        let open = OpenConn::new(&self.metrics, "outbound", "mtls");
        let peer = id.clone();
        tokio::spawn(async move {
            let _open = open;
            // Every request and tunnel on it fails with it: say which peer.
            if let Err(e) = conn.await {
                let error = crate::error::cause(&e);
                tracing::warn!(%addr, %peer, %error, "HTTP/2 connection to the peer's sidecar failed");
            } else {
                tracing::debug!(%addr, %peer, "HTTP/2 connection to the peer's sidecar closed");
            }
        });
        tracing::debug!(%addr, peer = %id, "pooled connection open");
        Ok(sender)
    }
}

/// Whether a TLS failure is the peer's certificate being refused.
fn bad_certificate(e: &std::io::Error) -> bool {
    matches!(e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()), Some(rustls::Error::InvalidCertificate(_)))
}
