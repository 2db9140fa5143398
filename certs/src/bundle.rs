//! Trust bundles: the trust anchors (root CAs) of a trust domain.

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::error::{CertError, Result};

/// The trust anchors a peer's chain must lead to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self> {
        if roots.is_empty() {
            return Err(CertError::NotSvid("trust bundle holds no certificates".into()));
        }
        for r in &roots {
            webpki::anchor_from_trusted_cert(r)
                .map_err(|e| CertError::NotSvid(format!("trust bundle entry is not a usable trust anchor: {e:?}")))?;
        }
        Ok(Self { roots })
    }

    pub fn from_pem(pem: &[u8], origin: &Path) -> Result<Self> {
        let roots = parse_pem_certs(pem, origin)?;
        Self::new(roots).map_err(|e| CertError::bad_file(origin, e.to_string()))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let pem = std::fs::read(path).map_err(|e| CertError::io(path, e))?;
        Self::from_pem(&pem, path)
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub fn to_pem(&self) -> String {
        self.roots.iter().map(|c| der_to_pem("CERTIFICATE", c)).collect()
    }

    /// Concatenated DER, the Workload API's bundle encoding.
    pub fn concat_der(&self) -> Vec<u8> {
        self.roots.iter().flat_map(|c| c.iter().copied()).collect()
    }
}

/// Parses every CERTIFICATE block of a PEM file; names the file when it holds none.
pub fn parse_pem_certs(pem: &[u8], origin: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::bad_file(origin, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(CertError::bad_file(origin, "no CERTIFICATE block found"));
    }
    Ok(certs)
}

pub fn der_to_pem(label: &str, der: &[u8]) -> String {
    let block = pem::Pem::new(label, der.to_vec());
    pem::encode_config(&block, pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF))
}
