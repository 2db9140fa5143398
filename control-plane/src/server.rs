//! The control plane's gRPC listener: rustls in front of tonic, so each
//! request knows the SPIFFE ID of the client certificate (if any) that the
//! connection proved.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use weft_certs::svid::LeafInfo;
use weft_certs::SpiffeId;

use crate::metrics::Metrics;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Accepts TCP connections and completes TLS handshakes off the accept loop;
/// failed handshakes are logged and counted, never fatal.
pub fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    metrics: Arc<Metrics>,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned();
                        let info = leaf.and_then(|l| LeafInfo::parse(&l).ok());
                        let peer = PeerInfo {
                            remote,
                            spiffe_id: info.as_ref().map(|i| i.spiffe_id.clone()),
                            svid_expires: info.map(|i| i.not_after),
                        };
                        metrics.handshake("ok");
                        let _ = tx.send(Ok(TlsConn { inner: tls, peer })).await;
                    }
                    Ok(Err(e)) => {
                        metrics.handshake("error");
                        tracing::info!(%remote, error = %e, "TLS handshake refused");
                    }
                    Err(_) => {
                        metrics.handshake("timeout");
                        tracing::info!(%remote, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The verified caller of a request, or UNAUTHENTICATED.
#[allow(clippy::result_large_err)]
pub fn require_peer<T>(req: &tonic::Request<T>) -> Result<(SpiffeId, Option<SystemTime>), tonic::Status> {
    req.extensions().get::<PeerInfo>().and_then(|p| p.spiffe_id.clone().map(|id| (id, p.svid_expires))).ok_or_else(
        || tonic::Status::unauthenticated("this call requires mutual TLS with a valid SVID of this trust domain"),
    )
}
