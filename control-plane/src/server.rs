//! The control plane's gRPC listener: rustls in front of tonic, so each
//! request knows the SPIFFE ID of the client certificate (if any) that the
//! connection proved.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use weft_certs::SpiffeId;
use weft_runtime::tls_accept::tls_accept;
use weft_runtime::Drain;

use crate::metrics::Metrics;

/// How many connections may wait in the kernel's accept queue (capped by
/// `net.core.somaxconn`): a control-plane restart has every sidecar connect
/// at once, and a full queue drops SYNs, which clients retry only after 1 s,
/// then 3 s (RFC 6298's initial RTO), past their connect timeout.
pub const LISTEN_BACKLOG: u32 = 8192;

/// Binds `addr` with [`LISTEN_BACKLOG`] (tokio's `TcpListener::bind` uses 1024).
///
/// # Errors
/// The address cannot be bound (in use, not local, no permission).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // As tokio's bind does: a restarted control plane rebinds at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Bounds on the TLS handshakes of a join storm.
///
/// Handshakes are CPU work (an ECDHE key share, an ECDSA P-256 signature,
/// the client's chain verified). Run all at once, thousands of them share
/// the CPU and each finishes late, so all of them pass their client's
/// connect timeout (weft-proxy: 5 s) together and are retried: the storm
/// never drains. Run a few at a time in arrival order (a fair semaphore),
/// they finish early one by one, and a connection that waited longer than
/// its client does is closed unhandshaken instead of costing a handshake
/// whose client is gone.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeLimits {
    /// Handshakes in progress at once.
    pub concurrent: usize,
    /// The longest a connection waits for its turn before it is closed
    /// without a handshake (counted as `queue_timeout`).
    pub max_wait: Duration,
}

impl Default for HandshakeLimits {
    /// 256 at once (a handshake holds its slot while its client computes
    /// its part, which takes long when thousands of clients share a CPU;
    /// 64 slots measured 60 handshakes/s at 10,000 clients on this machine),
    /// and 15 s of waiting: within weft-proxy's 20 s TLS handshake timeout
    /// (`weft_proto::channel::HANDSHAKE_TIMEOUT`), leaving it 5 s for the
    /// handshake itself.
    fn default() -> Self {
        Self { concurrent: 256, max_wait: Duration::from_secs(15) }
    }
}

/// What the TLS handshake proved about the client; available to handlers as
/// a request extension.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    /// The verified client SVID's ID, `None` without a client certificate.
    pub spiffe_id: Option<SpiffeId>,
    pub svid_expires: Option<SystemTime>,
}

/// A server-side TLS connection carrying its [`PeerInfo`].
pub struct TlsConn {
    inner: TlsStream<TcpStream>,
    peer: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts on `listener` (weft-runtime's serve loop: back-off, drain) and
/// completes each TLS handshake in the connection's own task, at most
/// `limits.concurrent` at once (see [`HandshakeLimits`]); handshakes are
/// counted by outcome (`ok`, `queue_timeout` or the refusal reason) and
/// refusals logged, never fatal. Clients without a certificate get through
/// (Attest); handlers that need one use [`require_peer`].
pub fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: HandshakeLimits,
    metrics: Arc<Metrics>,
    drain: Drain,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let turns = Arc::new(Semaphore::new(limits.concurrent.max(1)));
    tokio::spawn(weft_runtime::serve(listener, drain, "grpc", move |tcp, remote, _| {
        let (acceptor, tx, metrics, turns) = (acceptor.clone(), tx.clone(), metrics.clone(), turns.clone());
        let accepted_at = Instant::now();
        async move {
            // The semaphore is never closed.
            let Ok(_turn) = turns.acquire().await else { return };
            if accepted_at.elapsed() > limits.max_wait {
                metrics.handshake("queue_timeout");
                tracing::debug!(%remote, "closed unhandshaken: waited past its client's connect timeout");
                return;
            }
            match tls_accept(&acceptor, tcp).await {
                Ok(accepted) => {
                    metrics.handshake("ok");
                    let peer = PeerInfo {
                        remote,
                        spiffe_id: accepted.peer.as_ref().map(|p| p.spiffe_id.clone()),
                        svid_expires: accepted.peer.map(|p| p.not_after),
                    };
                    let _ = tx.send(Ok(TlsConn { inner: accepted.stream, peer })).await;
                }
                Err(e) => {
                    metrics.handshake(e.reason());
                    tracing::info!(%remote, reason = e.reason(), error = %e, "TLS handshake refused");
                }
            }
        }
    }));
    ReceiverStream::new(rx)
}

/// The verified caller of a request, or UNAUTHENTICATED.
#[allow(clippy::result_large_err)]
pub fn require_peer<T>(req: &tonic::Request<T>) -> Result<(SpiffeId, Option<SystemTime>), tonic::Status> {
    req.extensions().get::<PeerInfo>().and_then(|p| p.spiffe_id.clone().map(|id| (id, p.svid_expires))).ok_or_else(
        || tonic::Status::unauthenticated("this call requires mutual TLS with a valid SVID of this trust domain"),
    )
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn acceptor() -> TlsAcceptor {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![ck.cert.der().clone()], key)
            .unwrap();
        TlsAcceptor::from(Arc::new(cfg))
    }

    fn handshakes(metrics: &Metrics, outcome: &str) -> u64 {
        let mut prom = prometheus_client::registry::Registry::default();
        metrics.register(&mut prom);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &prom).unwrap();
        let prefix = format!("tls_handshakes_total{{outcome=\"{outcome}\"}} ");
        text.lines().find_map(|l| l.split_once(&prefix).map(|(_, v)| v.parse().unwrap())).unwrap_or(0)
    }

    /// One handshake slot: a second connection waits for it, and one that
    /// waited past `max_wait` is closed without a handshake; one that comes
    /// when the slot is free is handshaken.
    #[tokio::test]
    async fn handshakes_wait_their_turn_and_stale_ones_are_closed_unhandshaken() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        let (_trigger, drain) = weft_runtime::drain::channel();
        let limits = HandshakeLimits { concurrent: 1, max_wait: Duration::from_millis(300) };
        let _incoming = tls_incoming(listener, acceptor(), limits, metrics.clone(), drain);
        // Holds the only slot: connected, no ClientHello yet.
        let holder = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut waiter = TcpStream::connect(addr).await.unwrap();
        // Well past max_wait, then the slot frees (the holder's handshake fails).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        drop(holder);
        let mut buf = [0u8; 16];
        let n =
            tokio::time::timeout(Duration::from_secs(10), waiter.read(&mut buf)).await.expect("closed").unwrap_or(0);
        assert_eq!(n, 0, "closed without a handshake (no ServerHello)");
        assert_eq!(handshakes(&metrics, "queue_timeout"), 1);
        // The slot is free: a newcomer is handshaken (garbage: refused as not TLS).
        let mut late = TcpStream::connect(addr).await.unwrap();
        late.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(10), late.read(&mut buf)).await.expect("answered");
        let deadline = Instant::now() + Duration::from_secs(10);
        while handshakes(&metrics, "not_tls") == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(handshakes(&metrics, "not_tls"), 1);
        assert_eq!(handshakes(&metrics, "queue_timeout"), 1);
    }
}
