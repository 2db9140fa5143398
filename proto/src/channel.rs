//! gRPC channels to the control plane over rustls (TLS 1.3, ALPN h2).
//!
//! tonic's own TLS cannot verify SPIFFE IDs, so the channel gets a custom
//! connector that does the TLS handshake with the caller's rustls config.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long the TCP connect to a control-plane replica may take: one whose
/// host is gone (SYNs unanswered) is given up on after this, and the caller
/// moves to another replica.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the TLS handshake may take once the TCP connect succeeded.
/// Longer than [`CONNECT_TIMEOUT`]: a replica that accepted the connection
/// is alive, and in a join storm (a control-plane restart, every sidecar
/// at once) its handshakes wait their turn (the server runs a bounded number
/// at once and closes a connection that waited 15 s); giving up earlier
/// would throw away the place in that queue and cost a new handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// How long connecting to a control plane may take, in two parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// The TCP connect.
    pub connect: Duration,
    /// The TLS handshake, once connected.
    pub handshake: Duration,
}

impl Timeouts {
    /// A sidecar's: [`CONNECT_TIMEOUT`] and [`HANDSHAKE_TIMEOUT`].
    pub const SIDECAR: Timeouts = Timeouts { connect: CONNECT_TIMEOUT, handshake: HANDSHAKE_TIMEOUT };
    /// An operator command's (`weft status`, `weft apply`, ...): someone is
    /// waiting at a terminal, so 5 s for each part, and the command says
    /// the control plane is not answering.
    pub const OPERATOR: Timeouts = Timeouts { connect: CONNECT_TIMEOUT, handshake: CONNECT_TIMEOUT };
}

/// A channel that connects on first use and reconnects after failures.
/// `addr` is `host:port`; `tls` decides which server identity is accepted.
/// Connecting fails with `TimedOut` after [`CONNECT_TIMEOUT`] for the TCP
/// connect or [`HANDSHAKE_TIMEOUT`] for the TLS handshake ([`Timeouts::SIDECAR`]).
pub fn lazy_channel(
    addr: &str,
    tls: Arc<ClientConfig>,
    server_name: ServerName<'static>,
) -> Result<Channel, tonic::transport::Error> {
    lazy_channel_with(addr, tls, server_name, Timeouts::SIDECAR)
}

/// [`lazy_channel`] with other [`Timeouts`].
pub fn lazy_channel_with(
    addr: &str,
    tls: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    timeouts: Timeouts,
) -> Result<Channel, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let connector = TlsConnector::from(tls);
    Ok(endpoint.connect_with_connector_lazy(tower::service_fn(move |uri: Uri| {
        let connector = connector.clone();
        let server_name = server_name.clone();
        async move {
            let authority = uri
                .authority()
                .ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, "control-plane address has no host:port")
                })?
                .to_string();
            let timed_out = |what: &str, after: Duration| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{what} with control plane {authority} timed out after {after:?}"),
                )
            };
            let tcp = tokio::time::timeout(timeouts.connect, TcpStream::connect(&authority))
                .await
                .map_err(|_| timed_out("TCP connect", timeouts.connect))??;
            tcp.set_nodelay(true)?;
            let tls = tokio::time::timeout(timeouts.handshake, connector.connect(server_name, tcp))
                .await
                .map_err(|_| timed_out("TLS handshake", timeouts.handshake))??;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    })))
}
