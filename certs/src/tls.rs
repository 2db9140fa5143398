//! rustls configurations for weft: TLS 1.3 only, ring crypto, SPIFFE peers.

use std::sync::Arc;

use rustls::{ClientConfig, ServerConfig};

use crate::crypto::provider;
use crate::resolver::SvidResolver;
use crate::verify::SpiffeVerifier;

/// ALPN for sidecar-to-sidecar and control-plane traffic.
pub const ALPN_H2: &[u8] = b"h2";

/// A TLS 1.3-only server config presenting `resolver`'s SVID and verifying clients with `verifier`.
pub fn server_config(resolver: Arc<SvidResolver>, verifier: SpiffeVerifier, alpn: &[&[u8]]) -> ServerConfig {
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(resolver);
    // No resumption: a resumed session would skip the SPIFFE verifier and the
    // resolver, so rotation, bundle changes and expiry would not apply.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg
}

/// A TLS 1.3-only client config verifying the server with `verifier`, and
/// presenting `resolver`'s SVID when given (mutual TLS).
pub fn client_config(resolver: Option<Arc<SvidResolver>>, verifier: SpiffeVerifier, alpn: &[&[u8]]) -> ClientConfig {
    let builder = ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut cfg = match resolver {
        Some(r) => builder.with_client_cert_resolver(r),
        None => builder.with_no_client_auth(),
    };
    // See server_config: every handshake must be a full, verified one.
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg
}

/// The server name weft clients send. SPIFFE peers are authenticated by URI
/// SAN, not DNS name, so this only fills the SNI field.
pub fn server_name() -> rustls_pki_types::ServerName<'static> {
    rustls_pki_types::ServerName::try_from("weft.mesh").expect("static name is valid")
}
