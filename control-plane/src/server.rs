//! The control plane's gRPC listener: rustls in front of tonic, so each
//! request knows the SPIFFE ID of the client certificate (if any) that the
//! connection proved.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use weft_certs::SpiffeId;
use weft_runtime::tls_accept::tls_accept;
use weft_runtime::Drain;

use crate::metrics::Metrics;

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
/// completes each TLS handshake in the connection's own task; handshakes are
/// counted by outcome (`ok` or the refusal reason) and refusals logged,
/// never fatal. Clients without a certificate get through (Attest); handlers
/// that need one use [`require_peer`].
pub fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    metrics: Arc<Metrics>,
    drain: Drain,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(weft_runtime::serve(listener, drain, "grpc", move |tcp, remote, _| {
        let (acceptor, tx, metrics) = (acceptor.clone(), tx.clone(), metrics.clone());
        async move {
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
