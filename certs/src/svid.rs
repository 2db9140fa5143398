//! X.509-SVIDs: reading the SPIFFE ID and validity of a certificate, and
//! checking the SVID profile (one URI SAN, leaf vs signing cert usage).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::{CertError, Result};
use crate::spiffe_id::SpiffeId;

/// An SVID held by a workload: the chain (leaf first) and its PKCS#8 key.
#[derive(Clone)]
pub struct Svid {
    pub spiffe_id: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    pub key_pkcs8: Vec<u8>,
    pub not_after: SystemTime,
    pub not_before: SystemTime,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("chain_len", &self.chain.len())
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl Svid {
    /// Builds an SVID from a chain (leaf first) and key, checking the leaf's profile.
    pub fn new(chain: Vec<CertificateDer<'static>>, key_pkcs8: Vec<u8>) -> Result<Self> {
        let leaf = chain.first().ok_or_else(|| CertError::NotSvid("empty certificate chain".into()))?;
        let info = LeafInfo::parse(leaf)?;
        Ok(Self { spiffe_id: info.spiffe_id, chain, key_pkcs8, not_after: info.not_after, not_before: info.not_before })
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone()))
    }

    pub fn lifetime(&self) -> Duration {
        self.not_after.duration_since(self.not_before).unwrap_or_default()
    }

    /// Seconds since the epoch at which the leaf expires.
    pub fn expires_unix(&self) -> i64 {
        unix_secs(self.not_after)
    }
}

pub fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// What weft needs to know of a leaf SVID.
#[derive(Debug, Clone)]
pub struct LeafInfo {
    pub spiffe_id: SpiffeId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl LeafInfo {
    /// Parses a leaf and checks the X.509-SVID leaf profile: exactly one URI
    /// SAN holding a valid SPIFFE ID, not a CA, no certificate/CRL signing.
    pub fn parse(der: &[u8]) -> Result<Self> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::NotSvid(format!("not X.509: {e}")))?;
        let uris = uri_sans(&cert)?;
        let [uri] = uris.as_slice() else {
            return Err(CertError::NotSvid(format!("expected exactly one URI SAN, found {}", uris.len())));
        };
        let spiffe_id = SpiffeId::parse(uri)?;
        if cert.is_ca() {
            return Err(CertError::NotSvid("leaf has CA=true".into()));
        }
        if let Ok(Some(ku)) = cert.key_usage() {
            if ku.value.key_cert_sign() || ku.value.crl_sign() {
                return Err(CertError::NotSvid("leaf may not have keyCertSign or cRLSign".into()));
            }
        }
        Ok(Self {
            spiffe_id,
            not_before: to_system_time(cert.validity().not_before.timestamp()),
            not_after: to_system_time(cert.validity().not_after.timestamp()),
        })
    }
}

/// Reads the SPIFFE ID of a leaf certificate (the verified peer of a TLS session).
pub fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId> {
    LeafInfo::parse(der).map(|i| i.spiffe_id)
}

fn uri_sans(cert: &X509Certificate<'_>) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(u) = name {
                    out.push(u.to_string());
                }
            }
        }
    }
    Ok(out)
}

fn to_system_time(ts: i64) -> SystemTime {
    if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts as u64)
    } else {
        UNIX_EPOCH
    }
}

/// Not-after of any certificate.
pub fn not_after(der: &[u8]) -> Result<SystemTime> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::NotSvid(format!("not X.509: {e}")))?;
    Ok(to_system_time(cert.validity().not_after.timestamp()))
}
