//! gRPC channels to the control plane over rustls (TLS 1.3, ALPN h2).
//!
//! tonic's own TLS cannot verify SPIFFE IDs, so the channel gets a custom
//! connector that does the TLS handshake with the caller's rustls config.

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

/// A channel that connects on first use and reconnects after failures.
/// `addr` is `host:port`; `tls` decides which server identity is accepted.
pub fn lazy_channel(
    addr: &str,
    tls: Arc<ClientConfig>,
    server_name: ServerName<'static>,
) -> Result<Channel, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .http2_keep_alive_interval(std::time::Duration::from_secs(20))
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
            let tcp = TcpStream::connect(authority).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    })))
}
