//! rustls verifiers for SPIFFE peers: validate the chain against the trust
//! bundle (no DNS names: SPIFFE authenticates by URI SAN), then require the
//! peer's SPIFFE ID to match. One type serves client and server sides; the
//! bundle is shared through an `ArcSwap` so a new bundle applies to the next
//! handshake without rebuilding configs.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};

use crate::bundle::TrustBundle;
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::svid::spiffe_id_of;

/// Which SPIFFE IDs a verifier accepts.
#[derive(Clone)]
pub enum IdMatcher {
    /// Exactly this ID (outbound: the ID discovery says the endpoint has).
    Exact(SpiffeId),
    /// Any of these IDs.
    OneOf(Vec<SpiffeId>),
    /// Any ID of this trust domain.
    TrustDomain(TrustDomain),
    /// A custom predicate.
    Predicate(Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>),
}

impl IdMatcher {
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(want) => want == id,
            Self::OneOf(ids) => ids.contains(id),
            Self::TrustDomain(td) => id.trust_domain() == td,
            Self::Predicate(f) => f(id),
        }
    }

    /// What this matcher accepts, in words, for error messages:
    /// `spiffe://example.org/weft/control-plane`, `an ID in trust domain example.org`.
    pub fn describe(&self) -> String {
        match self {
            Self::Exact(id) => id.to_string(),
            Self::OneOf(ids) => {
                format!("one of {}", ids.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))
            }
            Self::TrustDomain(td) => format!("an ID in trust domain {td}"),
            Self::Predicate(_) => "an ID this peer accepts".into(),
        }
    }
}

impl std::fmt::Debug for IdMatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact(id) => write!(f, "Exact({id})"),
            Self::OneOf(ids) => write!(f, "OneOf({ids:?})"),
            Self::TrustDomain(td) => write!(f, "TrustDomain({td})"),
            Self::Predicate(_) => f.write_str("Predicate(..)"),
        }
    }
}

/// Why a peer was refused; carried inside rustls' `CertificateError::Other`.
#[derive(Debug, thiserror::Error)]
pub enum PeerRejected {
    #[error("peer presented SPIFFE ID {got}, expected {want}")]
    WrongId { got: SpiffeId, want: String },
    #[error("peer certificate is not an X.509-SVID: {0}")]
    NotSvid(String),
}

/// Trust anchors derived from a bundle, kept together with it.
pub struct Anchors {
    bundle: TrustBundle,
    anchors: Vec<TrustAnchor<'static>>,
}

impl Anchors {
    pub fn new(bundle: TrustBundle) -> Self {
        let anchors = bundle
            .roots()
            .iter()
            .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok().map(|a| a.to_owned()))
            .collect();
        Self { bundle, anchors }
    }
    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }
}

/// A hot-swappable trust bundle shared by every verifier of a process.
pub type SharedBundle = Arc<ArcSwap<Anchors>>;

pub fn shared_bundle(bundle: TrustBundle) -> SharedBundle {
    Arc::new(ArcSwap::from_pointee(Anchors::new(bundle)))
}

/// Verifies SPIFFE peers for both TLS clients and servers.
#[derive(Clone)]
pub struct SpiffeVerifier {
    bundle: SharedBundle,
    matcher: IdMatcher,
    algs: WebPkiSupportedAlgorithms,
    client_auth_mandatory: bool,
}

impl std::fmt::Debug for SpiffeVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpiffeVerifier").field("matcher", &self.matcher).finish_non_exhaustive()
    }
}

impl SpiffeVerifier {
    pub fn new(bundle: SharedBundle, matcher: IdMatcher) -> Self {
        Self {
            bundle,
            matcher,
            algs: crate::crypto::provider().signature_verification_algorithms,
            client_auth_mandatory: true,
        }
    }

    /// As a server: let clients without a certificate finish the handshake
    /// (the application then decides, e.g. the control plane's Attest call).
    pub fn client_auth_optional(mut self) -> Self {
        self.client_auth_mandatory = false;
        self
    }

    /// Validates the chain for `usage` and returns the peer's matching SPIFFE ID.
    pub fn verify_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<SpiffeId, rustls::Error> {
        let anchors = self.bundle.load();
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        ee.verify_for_usage(self.algs.all, &anchors.anchors, intermediates, now, usage, None, None)
            .map_err(pki_error)?;
        let id = spiffe_id_of(end_entity).map_err(|e| other(PeerRejected::NotSvid(e.to_string())))?;
        if !self.matcher.matches(&id) {
            return Err(other(PeerRejected::WrongId { got: id, want: self.matcher.describe() }));
        }
        Ok(id)
    }
}

fn other(e: PeerRejected) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error::*;
    let ce = match e {
        BadDer | BadDerTime => CertificateError::BadEncoding,
        CertExpired { .. } => CertificateError::Expired,
        CertNotValidYet { .. } => CertificateError::NotValidYet,
        UnknownIssuer => CertificateError::UnknownIssuer,
        InvalidSignatureForPublicKey
        | UnsupportedSignatureAlgorithmForPublicKeyContext(_)
        | UnsupportedSignatureAlgorithmContext(_) => CertificateError::BadSignature,
        RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        _ => CertificateError::Other(OtherError(Arc::new(e))),
    };
    rustls::Error::InvalidCertificate(ce)
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify_peer(end_entity, intermediates, now, webpki::KeyUsage::server_auth())?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        self.client_auth_mandatory
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify_peer(end_entity, intermediates, now, webpki::KeyUsage::client_auth())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
