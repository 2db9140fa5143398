//! The issuing CA: makes trust anchors and issuers, verifies CSRs and signs
//! X.509-SVIDs for the SPIFFE ID that attestation proved.

use std::time::{Duration, SystemTime};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::CertificateDer;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::bundle::TrustBundle;
use crate::error::{CertError, Result};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::svid::Svid;

/// Default X.509-SVID lifetime.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(3600);
/// Backdating of not-before, to tolerate small clock skew between hosts.
const BACKDATE: Duration = Duration::from_secs(30);

/// A fresh ECDSA P-256 key pair.
pub fn generate_key() -> Result<KeyPair> {
    Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?)
}

/// A random, positive 128-bit serial number.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] &= 0x7f; // keep it positive in DER
    bytes[0] |= 0x01; // and full length
    SerialNumber::from_slice(&bytes)
}

fn dn(org_unit: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "weft");
    dn.push(DnType::CommonName, org_unit);
    dn
}

fn uri_san(id: &str) -> Result<SanType> {
    Ok(SanType::URI(id.try_into().map_err(|_| CertError::NotSvid(format!("{id} is not an IA5 string")))?))
}

fn signing_params(td: &TrustDomain, name: &str, ttl: Duration, path_len: Option<u8>) -> Result<CertificateParams> {
    let now = SystemTime::now();
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(name);
    p.not_before = (now - BACKDATE).into();
    p.not_after = (now + ttl).into();
    p.serial_number = Some(random_serial());
    p.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.subject_alt_names = vec![uri_san(&td.id_string())?];
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// A PEM certificate and PEM PKCS#8 key.
#[derive(Debug, Clone)]
pub struct PemPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Makes a self-signed trust anchor (root CA) for a trust domain.
pub fn make_trust_anchor(td: &TrustDomain, ttl: Duration) -> Result<PemPair> {
    let key = generate_key()?;
    let mut p = signing_params(td, "weft trust anchor", ttl, None)?;
    p.use_authority_key_identifier_extension = false;
    let cert = p.self_signed(&key)?;
    Ok(PemPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Makes an intermediate (issuer) CA signed by a trust anchor.
pub fn make_issuer(td: &TrustDomain, anchor: &PemPair, ttl: Duration) -> Result<PemPair> {
    let anchor_key = KeyPair::from_pem(&anchor.key_pem)?;
    let anchor_issuer = Issuer::from_ca_cert_pem(&anchor.cert_pem, anchor_key)?;
    let key = generate_key()?;
    let p = signing_params(td, "weft issuer", ttl, Some(0))?;
    let cert = p.signed_by(&key, &anchor_issuer)?;
    Ok(PemPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// The verified content of a CSR: the public key to certify.
pub struct VerifiedCsr {
    spki: SubjectPublicKeyInfo,
}

/// Parses a DER PKCS#10 CSR, requires an ECDSA P-256 key, and verifies its
/// self-signature (proof that the requester holds the private key).
pub fn verify_csr(der: &[u8]) -> Result<VerifiedCsr> {
    let (rest, csr) = X509CertificationRequest::from_der(der).map_err(|e| CertError::CsrParse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CertError::CsrParse(format!("{} trailing bytes", rest.len())));
    }
    let spki = &csr.certification_request_info.subject_pki;
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err(CertError::CsrKeyType(format!("key algorithm {}", spki.algorithm.algorithm)));
    }
    let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
    if curve.as_ref() != Some(&OID_EC_P256) {
        return Err(CertError::CsrKeyType(match curve {
            Some(c) => format!("EC curve {c}"),
            None => "EC key without a named curve".into(),
        }));
    }
    csr.verify_signature().map_err(|_| CertError::CsrSignature)?;
    let spki = SubjectPublicKeyInfo::from_der(spki.raw).map_err(|e| CertError::CsrParse(e.to_string()))?;
    Ok(VerifiedCsr { spki })
}

/// Makes a key pair and a CSR for a workload. The CSR's contents beyond the
/// key do not matter: the control plane decides the SPIFFE ID.
pub fn make_csr() -> Result<(Vec<u8>, KeyPair)> {
    let key = generate_key()?;
    let mut p = CertificateParams::default();
    p.distinguished_name = dn("weft workload");
    let csr = p.serialize_request(&key)?;
    Ok((csr.der().to_vec(), key))
}

/// The control plane's signing authority: an issuer certificate and key plus
/// the trust bundle the issuer chains to. It never holds the root key.
pub struct Authority {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    issuer_der: CertificateDer<'static>,
    issuer_not_after: SystemTime,
    bundle: TrustBundle,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").field("trust_domain", &self.trust_domain).finish_non_exhaustive()
    }
}

impl Authority {
    /// Checks that the issuer is a CA allowed to sign certificates, is still
    /// valid, matches `key_pem`, and is signed by one of the bundle's anchors.
    pub fn new(
        trust_domain: TrustDomain,
        issuer_der: CertificateDer<'static>,
        key_pem: &str,
        bundle: TrustBundle,
    ) -> Result<Self> {
        let key =
            KeyPair::from_pem(key_pem).map_err(|e| CertError::Issuer(format!("key is not a usable PEM key: {e}")))?;
        let (_, cert) = X509Certificate::from_der(&issuer_der)
            .map_err(|e| CertError::Issuer(format!("certificate is not X.509: {e}")))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CertError::KeyMismatch);
        }
        if !cert.is_ca() {
            return Err(CertError::Issuer("certificate is not a CA (basicConstraints CA:TRUE required)".into()));
        }
        match cert.key_usage() {
            Ok(Some(ku)) if ku.value.key_cert_sign() => {}
            _ => return Err(CertError::Issuer("certificate lacks keyUsage keyCertSign".into())),
        }
        if !cert.validity().is_valid() {
            return Err(CertError::Issuer("certificate is expired or not yet valid".into()));
        }
        let chains = bundle.roots().iter().any(|root| {
            X509Certificate::from_der(root)
                .ok()
                .is_some_and(|(_, r)| cert.verify_signature(Some(r.public_key())).is_ok())
        });
        if !chains {
            return Err(CertError::Issuer("certificate is not signed by any certificate in the trust bundle".into()));
        }
        let issuer_not_after = crate::svid::not_after(&issuer_der)?;
        let issuer = Issuer::from_ca_cert_der(&issuer_der, key)?;
        Ok(Self { trust_domain, issuer, issuer_der, issuer_not_after, bundle })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    pub fn issuer_der(&self) -> &CertificateDer<'static> {
        &self.issuer_der
    }

    /// Signs an X.509-SVID for `id` over the CSR's key. Only the key is taken
    /// from the CSR; everything else is decided here. Returns leaf + issuer.
    pub fn sign(&self, csr: &VerifiedCsr, id: &SpiffeId, ttl: Duration) -> Result<Vec<CertificateDer<'static>>> {
        if id.trust_domain() != &self.trust_domain {
            return Err(CertError::Issuer(format!(
                "cannot sign {id}: this control plane issues for trust domain {}",
                self.trust_domain
            )));
        }
        let now = SystemTime::now();
        let not_after = (now + ttl).min(self.issuer_not_after);
        let mut p = CertificateParams::default();
        p.distinguished_name = dn("weft workload");
        p.not_before = (now - BACKDATE).into();
        p.not_after = not_after.into();
        p.serial_number = Some(random_serial());
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.subject_alt_names = vec![uri_san(id.as_str())?];
        p.use_authority_key_identifier_extension = true;
        let leaf = p.signed_by(&csr.spki, &self.issuer)?;
        Ok(vec![leaf.der().clone(), self.issuer_der.clone()])
    }

    /// Issues an SVID with a key made here: for the control plane's own
    /// serving identity and the operator certificate, never for workloads.
    pub fn issue_local(&self, id: &SpiffeId, ttl: Duration) -> Result<Svid> {
        let (csr, key) = make_csr()?;
        let chain = self.sign(&verify_csr(&csr)?, id, ttl)?;
        Svid::new(chain, key.serialize_der())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::svid::LeafInfo;
    use std::path::Path;

    fn authority(td: &str) -> Authority {
        let td = TrustDomain::new(td).unwrap();
        let anchor = make_trust_anchor(&td, Duration::from_secs(86400 * 365)).unwrap();
        let issuer = make_issuer(&td, &anchor, Duration::from_secs(86400)).unwrap();
        let bundle = TrustBundle::from_pem(anchor.cert_pem.as_bytes(), Path::new("anchor")).unwrap();
        let issuer_der =
            crate::bundle::parse_pem_certs(issuer.cert_pem.as_bytes(), Path::new("issuer")).unwrap().remove(0);
        Authority::new(td, issuer_der, &issuer.key_pem, bundle).unwrap()
    }

    #[test]
    fn leaf_profile() {
        let ca = authority("example.org");
        let id = SpiffeId::parse("spiffe://example.org/ns/default/sa/web").unwrap();
        let svid = ca.issue_local(&id, DEFAULT_SVID_TTL).unwrap();
        assert_eq!(svid.chain.len(), 2);
        assert_eq!(svid.spiffe_id, id);
        let (_, leaf) = X509Certificate::from_der(&svid.chain[0]).unwrap();
        let bc = leaf.basic_constraints().unwrap().expect("basicConstraints present");
        assert!(bc.critical && !bc.value.ca);
        let ku = leaf.key_usage().unwrap().unwrap();
        assert!(ku.critical && ku.value.digital_signature() && !ku.value.key_cert_sign() && !ku.value.crl_sign());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(leaf
            .get_extension_unique(&x509_parser::oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER)
            .unwrap()
            .is_some());
        assert!(leaf
            .get_extension_unique(&x509_parser::oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER)
            .unwrap()
            .is_some());
        assert_eq!(leaf.public_key().algorithm.algorithm, OID_KEY_TYPE_EC_PUBLIC_KEY);
        // 128-bit random serial (16 bytes, positive).
        assert_eq!(leaf.raw_serial().len(), 16);
        let life = svid.lifetime().as_secs();
        assert!((3600..=3600 + 31).contains(&life), "lifetime {life}");
        // Signing cert profile.
        let (_, issuer) = X509Certificate::from_der(&svid.chain[1]).unwrap();
        let bc = issuer.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && bc.value.ca);
        let ku = issuer.key_usage().unwrap().unwrap();
        assert!(ku.critical && ku.value.key_cert_sign() && !ku.value.digital_signature());
        assert!(leaf.verify_signature(Some(issuer.public_key())).is_ok());
    }

    #[test]
    fn serials_differ() {
        let ca = authority("example.org");
        let id = SpiffeId::parse("spiffe://example.org/a").unwrap();
        let a = ca.issue_local(&id, DEFAULT_SVID_TTL).unwrap();
        let b = ca.issue_local(&id, DEFAULT_SVID_TTL).unwrap();
        let sa = X509Certificate::from_der(&a.chain[0]).unwrap().1.raw_serial().to_vec();
        let sb = X509Certificate::from_der(&b.chain[0]).unwrap().1.raw_serial().to_vec();
        assert_ne!(sa, sb);
    }

    #[test]
    fn ttl_never_beyond_issuer() {
        let ca = authority("example.org");
        let id = SpiffeId::parse("spiffe://example.org/a").unwrap();
        let svid = ca.issue_local(&id, Duration::from_secs(86400 * 30)).unwrap();
        assert!(svid.not_after <= ca.issuer_not_after);
    }

    #[test]
    fn signs_attested_id_not_csr_id() {
        let ca = authority("example.org");
        // A CSR asking for another identity.
        let key = generate_key().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![uri_san("spiffe://example.org/ns/kube-system/sa/admin").unwrap()];
        p.distinguished_name = dn("evil");
        let csr = p.serialize_request(&key).unwrap();
        let attested = SpiffeId::parse("spiffe://example.org/ns/default/sa/web").unwrap();
        let chain = ca.sign(&verify_csr(csr.der()).unwrap(), &attested, DEFAULT_SVID_TTL).unwrap();
        assert_eq!(LeafInfo::parse(&chain[0]).unwrap().spiffe_id, attested);
    }

    #[test]
    fn refuses_other_trust_domain() {
        let ca = authority("example.org");
        let (csr, _) = make_csr().unwrap();
        let id = SpiffeId::parse("spiffe://other.org/a").unwrap();
        assert!(ca.sign(&verify_csr(&csr).unwrap(), &id, DEFAULT_SVID_TTL).is_err());
    }

    #[test]
    fn bad_csrs() {
        assert!(matches!(verify_csr(b"garbage"), Err(CertError::CsrParse(_))));
        let (mut csr, _) = make_csr().unwrap();
        let n = csr.len();
        csr[n - 5] ^= 0xff; // corrupt the signature
        assert!(matches!(verify_csr(&csr), Err(CertError::CsrSignature) | Err(CertError::CsrParse(_))));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let csr = CertificateParams::default().serialize_request(&key).unwrap();
        assert!(matches!(verify_csr(csr.der()), Err(CertError::CsrKeyType(_))));
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let csr = CertificateParams::default().serialize_request(&key).unwrap();
        assert!(matches!(verify_csr(csr.der()), Err(CertError::CsrKeyType(_))));
    }

    #[test]
    fn authority_checks_its_inputs() {
        let td = TrustDomain::new("example.org").unwrap();
        let anchor = make_trust_anchor(&td, Duration::from_secs(86400)).unwrap();
        let other = make_trust_anchor(&td, Duration::from_secs(86400)).unwrap();
        let issuer = make_issuer(&td, &anchor, Duration::from_secs(86400)).unwrap();
        let der = |pem: &str| crate::bundle::parse_pem_certs(pem.as_bytes(), Path::new("x")).unwrap().remove(0);
        let bundle = |pem: &str| TrustBundle::from_pem(pem.as_bytes(), Path::new("b")).unwrap();
        // Wrong key.
        let e =
            Authority::new(td.clone(), der(&issuer.cert_pem), &other.key_pem, bundle(&anchor.cert_pem)).unwrap_err();
        assert!(matches!(e, CertError::KeyMismatch), "{e}");
        // Not under the bundle.
        let e =
            Authority::new(td.clone(), der(&issuer.cert_pem), &issuer.key_pem, bundle(&other.cert_pem)).unwrap_err();
        assert!(e.to_string().contains("not signed by"), "{e}");
    }
}
