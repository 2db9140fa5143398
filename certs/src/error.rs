//! Errors of the certificate layer, worded so an operator can act on them.

use std::path::PathBuf;

use crate::spiffe_id::SpiffeIdError;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("{0} already exists; pass --force to overwrite it")]
    Exists(PathBuf),
    #[error("invalid SPIFFE ID: {0}")]
    SpiffeId(#[from] SpiffeIdError),
    #[error("CSR is not a valid PKCS#10 request: {0}")]
    CsrParse(String),
    #[error("CSR signature does not verify (the requester must sign it with the key it wants certified)")]
    CsrSignature,
    #[error("CSR key must be ECDSA P-256; found {0}")]
    CsrKeyType(String),
    #[error("certificate is not a valid X.509-SVID: {0}")]
    NotSvid(String),
    #[error("issuer certificate does not match the issuer key")]
    KeyMismatch,
    #[error("issuer {0}")]
    Issuer(String),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("JWT-SVID signing key: {0}")]
    JwtKey(String),
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
}

impl CertError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), err: source }
    }
    pub(crate) fn bad_file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::BadFile { path: path.into(), reason: reason.into() }
    }
}

pub type Result<T, E = CertError> = std::result::Result<T, E>;
