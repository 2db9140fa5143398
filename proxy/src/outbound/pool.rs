//! One mutual-TLS HTTP/2 connection per peer sidecar, shared by every
//! request and TCP tunnel to that peer. The peer must present exactly the
//! SPIFFE ID that discovery gave for it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use weft_certs::{IdMatcher, SpiffeId, SpiffeVerifier};

use crate::http::Body;
use crate::identity::Identity;
use crate::metrics::{Metrics, OpenConn};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connect to {addr} timed out")]
    ConnectTimeout { addr: SocketAddr },
    #[error("connect to {addr}: {err}")]
    Connect { addr: SocketAddr, err: std::io::Error },
    #[error("mTLS with {addr} (expecting {id}) failed: {err}")]
    Tls { addr: SocketAddr, id: SpiffeId, err: std::io::Error },
    #[error("peer {addr} did not negotiate ALPN h2")]
    NoH2 { addr: SocketAddr },
    #[error("HTTP/2 handshake with {addr}: {err}")]
    H2 { addr: SocketAddr, err: hyper::Error },
}

type Key = (SocketAddr, SpiffeId);
type Slot = Arc<tokio::sync::Mutex<Option<SendRequest<Body>>>>;

pub struct Pool {
    identity: Arc<Identity>,
    metrics: Arc<Metrics>,
    connect_timeout: Duration,
    slots: Mutex<HashMap<Key, Slot>>,
}

impl Pool {
    pub fn new(identity: Arc<Identity>, metrics: Arc<Metrics>, connect_timeout: Duration) -> Arc<Self> {
        Arc::new(Self { identity, metrics, connect_timeout, slots: Mutex::new(HashMap::new()) })
    }

    /// A sender on the pooled connection to `addr`, connecting if needed.
    /// Concurrent callers for one peer wait for a single connection attempt.
    pub async fn get(&self, addr: SocketAddr, id: &SpiffeId) -> Result<SendRequest<Body>, PoolError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots.entry((addr, id.clone())).or_default().clone()
        };
        let mut guard = slot.lock().await;
        if let Some(sender) = guard.as_ref() {
            if !sender.is_closed() {
                return Ok(sender.clone());
            }
        }
        let sender = self.connect(addr, id).await?;
        *guard = Some(sender.clone());
        Ok(sender)
    }

    async fn connect(&self, addr: SocketAddr, id: &SpiffeId) -> Result<SendRequest<Body>, PoolError> {
        let verifier = SpiffeVerifier::new(self.identity.bundle.clone(), IdMatcher::Exact(id.clone()));
        let tls =
            weft_certs::tls::client_config(Some(self.identity.resolver.clone()), verifier, &[weft_certs::tls::ALPN_H2]);
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| PoolError::ConnectTimeout { addr })?
            .map_err(|err| PoolError::Connect { addr, err })?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(
            self.connect_timeout,
            TlsConnector::from(Arc::new(tls)).connect(weft_certs::tls::server_name(), tcp),
        )
        .await
        .map_err(|_| PoolError::ConnectTimeout { addr })?
        .map_err(|err| {
            self.metrics.handshake("outbound", "error");
            PoolError::Tls { addr, id: id.clone(), err }
        })?;
        if tls.get_ref().1.alpn_protocol() != Some(weft_certs::tls::ALPN_H2) {
            return Err(PoolError::NoH2 { addr });
        }
        self.metrics.handshake("outbound", "ok");
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .adaptive_window(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|err| PoolError::H2 { addr, err })?;
        let open = OpenConn::new(&self.metrics, "outbound", "mtls");
        tokio::spawn(async move {
            let _open = open;
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "pooled connection closed");
            }
        });
        tracing::debug!(%addr, peer = %id, "pooled connection open");
        Ok(sender)
    }
}
