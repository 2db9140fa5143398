//! weft-certs: SPIFFE identity for weft.
//!
//! - [`spiffe_id`]: SPIFFE IDs and trust domains, validated to the spec.
//! - [`ca`]: trust anchors, issuers, CSR verification and SVID signing.
//! - [`svid`]: X.509-SVID parsing and profile checks.
//! - [`bundle`]: trust bundles.
//! - [`jwt`]: JWT-SVIDs (ES256): signing, the JWK Set bundle, validation.
//! - [`verify`]: rustls verifiers matching peers' SPIFFE IDs.
//! - [`resolver`]: a hot-swappable SVID resolver for rotation.
//! - [`tls`]: TLS 1.3-only rustls configs.
//! - [`crypto`]: the rustls crypto provider (*ring*) all of the above use.
//! - [`diagnose`]: connection failures to the control plane as one actionable line.
//! - [`pki`]: the PKI directory written by `weft certs init`.

pub mod bundle;
pub mod ca;
pub mod crypto;
pub mod diagnose;
pub mod error;
pub mod jwt;
pub mod pki;
pub mod resolver;
pub mod spiffe_id;
pub mod svid;
pub mod tls;
pub mod verify;

pub use bundle::TrustBundle;
pub use ca::Authority;
pub use error::CertError;
pub use resolver::SvidResolver;
pub use spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};
pub use svid::Svid;
pub use verify::{IdMatcher, SharedBundle, SpiffeVerifier};
