//! The injector's serving certificate: the API server calls the webhook
//! over TLS and verifies it against the `caBundle` of the
//! MutatingWebhookConfiguration, so `weft install` makes a small CA and a
//! certificate for the webhook Service's DNS names.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// A CA and a serving certificate it signed, all PEM.
#[derive(Debug, Clone)]
pub struct WebhookTls {
    /// The CA certificate: the webhook configuration's `caBundle`.
    pub ca_pem: String,
    /// The serving certificate (`--injector-cert`).
    pub cert_pem: String,
    /// Its private key, PKCS#8 (`--injector-key`).
    pub key_pem: String,
}

/// Makes a CA (ECDSA P-256, valid 10 years) and a serving certificate for
/// `dns_names` (the first is also the subject's common name).
///
/// Errors: a name that is not a valid DNS name or IP address.
pub fn webhook_tls(dns_names: &[String]) -> Result<WebhookTls, rcgen::Error> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name.push(DnType::CommonName, "weft injector CA");
    ca.not_after = time_in_years(10);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(dns_names.to_vec())?;
    if let Some(first) = dns_names.first() {
        leaf.distinguished_name.push(DnType::CommonName, first.as_str());
    }
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_after = time_in_years(10);
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok(WebhookTls { ca_pem: ca_cert.pem(), cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

fn time_in_years(years: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + time::Duration::days(365 * years)
}
