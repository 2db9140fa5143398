//! The server side of a TLS connection, shared by the sidecar's inbound and
//! the control plane: the handshake (bounded by [`HANDSHAKE_TIMEOUT`]) and
//! what it proved about the peer, or why the peer was refused.
//!
//! Who may connect is decided by the rustls config behind the acceptor
//! (weft-certs' `SpiffeVerifier`: TLS 1.3, chain to the trust bundle, SPIFFE
//! ID matcher). This step only reads the verified leaf's SPIFFE ID
//! (X.509-SVID URI SAN) and expiry, and names failures for metrics.

use std::time::{Duration, SystemTime};

use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use weft_certs::svid::LeafInfo;
use weft_certs::SpiffeId;

/// The longest a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the handshake proved about the client's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The SPIFFE ID of the verified client X.509-SVID.
    pub spiffe_id: SpiffeId,
    /// When that SVID expires.
    pub not_after: SystemTime,
}

/// A completed handshake.
#[derive(Debug)]
pub struct Accepted {
    /// The server side of the TLS connection.
    pub stream: TlsStream<TcpStream>,
    /// The verified client SVID; `None` when the client sent no certificate
    /// (only possible where the verifier makes client auth optional).
    pub peer: Option<PeerIdentity>,
}

impl Accepted {
    /// The stream and the peer, for listeners that require mutual TLS.
    ///
    /// # Errors
    /// [`Refused::NoClientCertificate`] when the client sent no certificate.
    pub fn require_peer(self) -> Result<(TlsStream<TcpStream>, PeerIdentity), Refused> {
        match self.peer {
            Some(p) => Ok((self.stream, p)),
            None => Err(Refused::NoClientCertificate),
        }
    }
}

/// Why a TLS connection was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("the TLS handshake did not finish within {0:?}")]
    Timeout(Duration),
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] rustls::Error),
    #[error("connection failed during the TLS handshake: {0}")]
    Io(#[source] std::io::Error),
    #[error("the client presented no certificate; this listener requires mutual TLS with an X.509-SVID")]
    NoClientCertificate,
    #[error("the client certificate is not an X.509-SVID: {0}")]
    NotSvid(#[source] weft_certs::CertError),
}

impl Refused {
    /// A short, fixed name for the refusal, for a metric label:
    /// `timeout`, `no_client_certificate`, `bad_certificate`, `tls_version`,
    /// `incompatible`, `not_tls`, `tls_error` or `io_error`.
    pub fn reason(&self) -> &'static str {
        use rustls::{Error as E, PeerIncompatible};
        match self {
            Self::Timeout(_) => "timeout",
            Self::NoClientCertificate | Self::Tls(E::NoCertificatesPresented) => "no_client_certificate",
            Self::NotSvid(_) | Self::Tls(E::InvalidCertificate(_)) => "bad_certificate",
            Self::Tls(E::PeerIncompatible(PeerIncompatible::SupportedVersionsExtensionRequired)) => "tls_version",
            Self::Tls(E::PeerIncompatible(_)) => "incompatible",
            Self::Tls(E::InvalidMessage(_) | E::InappropriateMessage { .. }) => "not_tls",
            Self::Tls(_) => "tls_error",
            Self::Io(_) => "io_error",
        }
    }
}

/// Completes the server side of the TLS handshake on `tcp` within
/// [`HANDSHAKE_TIMEOUT`] and reads the client's verified SVID, if it sent one.
///
/// # Errors
/// [`Refused`] with the reason: timeout, a rustls error (bad or missing
/// certificate, not TLS, TLS version), an I/O error, or a leaf that is not an SVID.
pub async fn tls_accept(acceptor: &TlsAcceptor, tcp: TcpStream) -> Result<Accepted, Refused> {
    accept_within(acceptor, tcp, HANDSHAKE_TIMEOUT).await
}

/// [`tls_accept`] with another handshake timeout.
pub async fn accept_within(acceptor: &TlsAcceptor, tcp: TcpStream, timeout: Duration) -> Result<Accepted, Refused> {
    let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Err(_) => return Err(Refused::Timeout(timeout)),
        Ok(Err(e)) => return Err(handshake_error(e)),
        Ok(Ok(s)) => s,
    };
    let peer = match stream.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        None => None,
        Some(leaf) => {
            let info = LeafInfo::parse(leaf).map_err(Refused::NotSvid)?;
            Some(PeerIdentity { spiffe_id: info.spiffe_id, not_after: info.not_after })
        }
    };
    Ok(Accepted { stream, peer })
}

/// tokio-rustls reports rustls errors inside an `io::Error`.
fn handshake_error(e: std::io::Error) -> Refused {
    if e.get_ref().is_some_and(|i| i.is::<rustls::Error>()) {
        let inner = e.into_inner().expect("checked above");
        return match inner.downcast::<rustls::Error>() {
            Ok(tls) => Refused::Tls(*tls),
            Err(other) => Refused::Io(std::io::Error::other(other)),
        };
    }
    Refused::Io(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio_rustls::TlsConnector;
    use weft_certs::tls::{client_config, server_config, server_name, ALPN_H2};
    use weft_certs::verify::shared_bundle;
    use weft_certs::{pki, Authority, IdMatcher, SpiffeVerifier, SvidResolver, TrustDomain};

    const TTL: Duration = Duration::from_secs(3600);

    struct Pki {
        _dir: tempfile::TempDir,
        authority: Authority,
    }

    impl Pki {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let td = TrustDomain::new("example.org").unwrap();
            pki::init(&td, dir.path(), None, false).unwrap();
            let authority = pki::load_authority(dir.path(), None).unwrap();
            Self { _dir: dir, authority }
        }
        fn verifier(&self) -> SpiffeVerifier {
            let td = self.authority.trust_domain().clone();
            SpiffeVerifier::new(shared_bundle(self.authority.bundle().clone()), IdMatcher::TrustDomain(td))
        }
        fn resolver(&self, path: &str) -> Arc<SvidResolver> {
            let id = self.authority.trust_domain().workload_id("default", path).unwrap();
            SvidResolver::with_svid(&self.authority.issue_local(&id, TTL).unwrap()).unwrap()
        }
    }

    /// The server's acceptor; client auth optional or mandatory.
    fn acceptor(pki: &Pki, optional: bool) -> TlsAcceptor {
        let v = if optional { pki.verifier().client_auth_optional() } else { pki.verifier() };
        TlsAcceptor::from(Arc::new(server_config(pki.resolver("server"), v, &[ALPN_H2])))
    }

    /// Accepts one connection with `acceptor` while `client` runs against it.
    async fn accept_one<C, F>(acceptor: TlsAcceptor, timeout: Duration, client: C) -> Result<Accepted, Refused>
    where
        C: FnOnce(TcpStream) -> F,
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        // Runs until done or the test's runtime ends.
        tokio::spawn(client(c));
        let (tcp, _) = l.accept().await.unwrap();
        accept_within(&acceptor, tcp, timeout).await
    }

    type ClientFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

    /// A TLS client trusting `trusts`, presenting `cert` if any; says hello and reads the echo.
    fn tls_client(trusts: SpiffeVerifier, cert: Option<Arc<SvidResolver>>) -> impl FnOnce(TcpStream) -> ClientFuture {
        move |tcp| {
            Box::pin(async move {
                let connector = TlsConnector::from(Arc::new(client_config(cert, trusts, &[ALPN_H2])));
                if let Ok(mut s) = connector.connect(server_name(), tcp).await {
                    let _ = s.write_all(b"ping").await;
                    let mut buf = [0u8; 4];
                    let _ = s.read_exact(&mut buf).await;
                }
            })
        }
    }

    #[tokio::test]
    async fn mutual_tls_yields_the_clients_spiffe_id_and_expiry() {
        let pki = Pki::new();
        let client_cert = pki.resolver("web");
        let a = accept_one(acceptor(&pki, false), HANDSHAKE_TIMEOUT, tls_client(pki.verifier(), Some(client_cert)))
            .await
            .unwrap();
        let (mut stream, peer) = a.require_peer().unwrap();
        assert_eq!(peer.spiffe_id.to_string(), "spiffe://example.org/ns/default/sa/web");
        assert!(peer.not_after > SystemTime::now());
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        stream.write_all(b"pong").await.unwrap();
    }

    #[tokio::test]
    async fn optional_client_auth_accepts_a_client_without_certificate_but_names_no_peer() {
        let pki = Pki::new();
        let a = accept_one(acceptor(&pki, true), HANDSHAKE_TIMEOUT, tls_client(pki.verifier(), None)).await.unwrap();
        assert!(a.peer.is_none());
        let err = a.require_peer().unwrap_err();
        assert_eq!(err.reason(), "no_client_certificate");
    }

    #[tokio::test]
    async fn mandatory_client_auth_refuses_a_client_without_certificate() {
        let pki = Pki::new();
        let err =
            accept_one(acceptor(&pki, false), HANDSHAKE_TIMEOUT, tls_client(pki.verifier(), None)).await.unwrap_err();
        assert_eq!(err.reason(), "no_client_certificate", "{err}");
    }

    #[tokio::test]
    async fn a_certificate_from_another_pki_is_a_bad_certificate() {
        let (pki, other) = (Pki::new(), Pki::new());
        let err = accept_one(
            acceptor(&pki, true),
            HANDSHAKE_TIMEOUT,
            tls_client(pki.verifier(), Some(other.resolver("intruder"))),
        )
        .await
        .unwrap_err();
        assert_eq!(err.reason(), "bad_certificate", "{err}");
        assert!(matches!(err, Refused::Tls(rustls::Error::InvalidCertificate(_))), "{err:?}");
    }

    #[tokio::test]
    async fn plain_http_is_not_tls() {
        let pki = Pki::new();
        let err = accept_one(acceptor(&pki, true), HANDSHAKE_TIMEOUT, |mut tcp: TcpStream| async move {
            let _ = tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
            let _ = tcp.read(&mut [0u8; 64]).await;
        })
        .await
        .unwrap_err();
        assert_eq!(err.reason(), "not_tls", "{err}");
    }

    #[tokio::test]
    async fn a_silent_client_times_out() {
        let pki = Pki::new();
        let err = accept_one(acceptor(&pki, true), Duration::from_millis(200), |tcp: TcpStream| async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(tcp);
        })
        .await
        .unwrap_err();
        assert_eq!(err.reason(), "timeout", "{err}");
    }
}
