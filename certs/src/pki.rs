//! The PKI directory `weft certs init` writes and the control plane reads.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::KeyPair;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;

use crate::bundle::{der_to_pem, parse_pem_certs, TrustBundle};
use crate::ca::{self, Authority, PemPair};
use crate::error::{CertError, Result};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::svid::Svid;

pub const TRUST_BUNDLE: &str = "trust-bundle.pem";
pub const TRUST_ANCHOR_CERT: &str = "trust-anchor.crt";
pub const TRUST_ANCHOR_KEY: &str = "trust-anchor.key";
pub const ISSUER_CERT: &str = "issuer.crt";
pub const ISSUER_KEY: &str = "issuer.key";
pub const OPERATOR_CERT: &str = "operator.crt";
pub const OPERATOR_KEY: &str = "operator.key";

pub const TRUST_ANCHOR_TTL: Duration = Duration::from_secs(10 * 365 * 86400);
pub const ISSUER_TTL: Duration = Duration::from_secs(365 * 86400);
pub const OPERATOR_TTL: Duration = Duration::from_secs(365 * 86400);

/// The operator's SPIFFE ID in a trust domain.
pub fn operator_id(td: &TrustDomain) -> SpiffeId {
    td.id("/weft/operator").expect("static path is valid")
}

/// The control plane's own SPIFFE ID in a trust domain.
pub fn control_plane_id(td: &TrustDomain) -> SpiffeId {
    td.id("/weft/control-plane").expect("static path is valid")
}

/// An issuer brought from the operator's own PKI.
#[derive(Debug, Clone)]
pub struct ExternalIssuer {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

/// Writes a new PKI directory. Refuses to overwrite any existing file unless
/// `force`, and checks that before writing anything. Returns the files written.
pub fn init(td: &TrustDomain, out: &Path, from_issuer: Option<&ExternalIssuer>, force: bool) -> Result<Vec<PathBuf>> {
    let mut names = vec![TRUST_BUNDLE, ISSUER_CERT, ISSUER_KEY, OPERATOR_CERT, OPERATOR_KEY];
    if from_issuer.is_none() {
        names.extend([TRUST_ANCHOR_CERT, TRUST_ANCHOR_KEY]);
    }
    if !force {
        if let Some(existing) = names.iter().map(|n| out.join(n)).find(|p| p.exists()) {
            return Err(CertError::Exists(existing));
        }
    }
    std::fs::create_dir_all(out).map_err(|e| CertError::io(out, e))?;

    let mut files: Vec<(&str, String, bool)> = Vec::new();
    let (bundle_pem, issuer) = match from_issuer {
        None => {
            let anchor = ca::make_trust_anchor(td, TRUST_ANCHOR_TTL)?;
            let issuer = ca::make_issuer(td, &anchor, ISSUER_TTL)?;
            files.push((TRUST_ANCHOR_CERT, anchor.cert_pem.clone(), false));
            files.push((TRUST_ANCHOR_KEY, anchor.key_pem.clone(), true));
            (anchor.cert_pem, issuer)
        }
        Some(ext) => {
            let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| CertError::io(p, e));
            (read(&ext.bundle)?, PemPair { cert_pem: read(&ext.cert)?, key_pem: read(&ext.key)? })
        }
    };
    let authority = authority_from_pem(
        td,
        (&issuer.cert_pem, Path::new(ISSUER_CERT)),
        &issuer.key_pem,
        (&bundle_pem, Path::new(TRUST_BUNDLE)),
    )?;
    let operator = authority.issue_local(&operator_id(td), OPERATOR_TTL)?;
    files.push((TRUST_BUNDLE, bundle_pem, false));
    files.push((ISSUER_CERT, issuer.cert_pem, false));
    files.push((ISSUER_KEY, issuer.key_pem, true));
    files.push((OPERATOR_CERT, chain_pem(&operator), false));
    files.push((OPERATOR_KEY, der_to_pem("PRIVATE KEY", &operator.key_pkcs8), true));

    let mut written = Vec::new();
    for (name, content, secret) in files {
        let path = out.join(name);
        write_file(&path, content.as_bytes(), secret)?;
        written.push(path);
    }
    Ok(written)
}

/// PEM of an SVID's chain, leaf first.
pub fn chain_pem(svid: &Svid) -> String {
    svid.chain.iter().map(|c| der_to_pem("CERTIFICATE", c)).collect()
}

/// Writes a file, 0600 for secrets, replacing it atomically (write + rename).
pub fn write_file(path: &Path, content: &[u8], secret: bool) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true).mode(if secret { 0o600 } else { 0o644 });
    let mut f = opts.open(&tmp).map_err(|e| CertError::io(&tmp, e))?;
    f.write_all(content).and_then(|_| f.sync_all()).map_err(|e| CertError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| CertError::io(path, e))
}

fn authority_from_pem(
    td: &TrustDomain,
    (issuer_pem, issuer_path): (&str, &Path),
    key_pem: &str,
    (bundle_pem, bundle_path): (&str, &Path),
) -> Result<Authority> {
    let bundle = TrustBundle::from_pem(bundle_pem.as_bytes(), bundle_path)?;
    let issuer_der = parse_pem_certs(issuer_pem.as_bytes(), issuer_path)?.remove(0);
    Authority::new(td.clone(), issuer_der, key_pem, bundle).map_err(|e| CertError::bad_file(issuer_path, e.to_string()))
}

/// Loads the control plane's signing authority from a PKI directory; every
/// error names the file at fault.
pub fn load_authority(dir: &Path, td: Option<&TrustDomain>) -> Result<Authority> {
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read_to_string(&p).map_err(|e| CertError::io(&p, e)).map(|s| (s, p))
    };
    let (bundle_pem, bundle_path) = read(TRUST_BUNDLE)?;
    let (issuer_pem, issuer_path) = read(ISSUER_CERT)?;
    let (key_pem, key_path) = read(ISSUER_KEY)?;
    KeyPair::from_pem(&key_pem).map_err(|e| CertError::bad_file(&key_path, format!("not a PEM private key: {e}")))?;
    let issuer_der = parse_pem_certs(issuer_pem.as_bytes(), &issuer_path)?.remove(0);
    let td = match td {
        Some(td) => td.clone(),
        None => trust_domain_of(&issuer_der).ok_or_else(|| {
            CertError::bad_file(&issuer_path, "has no spiffe://<trust-domain> URI SAN; pass --trust-domain")
        })?,
    };
    let bundle = TrustBundle::from_pem(bundle_pem.as_bytes(), &bundle_path)?;
    Authority::new(td, issuer_der, &key_pem, bundle).map_err(|e| match e {
        CertError::KeyMismatch => CertError::bad_file(&key_path, format!("does not match {}", issuer_path.display())),
        e => CertError::bad_file(&issuer_path, e.to_string()),
    })
}

/// The trust domain named by a signing certificate's `spiffe://<td>` URI SAN.
pub fn trust_domain_of(der: &[u8]) -> Option<TrustDomain> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => TrustDomain::new(u).ok(),
        _ => None,
    })
}

/// Loads an SVID from a PEM chain file and a PEM PKCS#8 key file.
pub fn load_svid(cert: &Path, key: &Path) -> Result<Svid> {
    let pem = std::fs::read(cert).map_err(|e| CertError::io(cert, e))?;
    let chain = parse_pem_certs(&pem, cert)?;
    let key_pem = std::fs::read(key).map_err(|e| CertError::io(key, e))?;
    let key_der = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(PrivateKeyDer::Pkcs8(k)) => k.secret_pkcs8_der().to_vec(),
        Ok(_) => return Err(CertError::bad_file(key, "expected a PKCS#8 \"PRIVATE KEY\"")),
        Err(e) => return Err(CertError::bad_file(key, format!("bad PEM key: {e}"))),
    };
    Svid::new(chain, key_der).map_err(|e| CertError::bad_file(cert, e.to_string()))
}

/// Saves an SVID as PEM chain + 0600 PKCS#8 key.
pub fn save_svid(svid: &Svid, cert: &Path, key: &Path) -> Result<()> {
    write_file(key, der_to_pem("PRIVATE KEY", &svid.key_pkcs8).as_bytes(), true)?;
    write_file(cert, chain_pem(svid).as_bytes(), false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_writes_files_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let files = init(&td, dir.path(), None, false).unwrap();
        assert_eq!(files.len(), 7);
        for key in [TRUST_ANCHOR_KEY, ISSUER_KEY, OPERATOR_KEY] {
            let mode = std::fs::metadata(dir.path().join(key)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        let before = std::fs::read(dir.path().join(ISSUER_KEY)).unwrap();
        let err = init(&td, dir.path(), None, false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(std::fs::read(dir.path().join(ISSUER_KEY)).unwrap(), before, "nothing overwritten");
        init(&td, dir.path(), None, true).unwrap();
        assert_ne!(std::fs::read(dir.path().join(ISSUER_KEY)).unwrap(), before);

        let authority = load_authority(dir.path(), None).unwrap();
        assert_eq!(authority.trust_domain(), &td);
        let op = load_svid(&dir.path().join(OPERATOR_CERT), &dir.path().join(OPERATOR_KEY)).unwrap();
        assert_eq!(op.spiffe_id, operator_id(&td));
    }

    #[test]
    fn from_issuer_brings_external_pki() {
        let ext = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("corp.example").unwrap();
        let anchor = ca::make_trust_anchor(&td, TRUST_ANCHOR_TTL).unwrap();
        let issuer = ca::make_issuer(&td, &anchor, ISSUER_TTL).unwrap();
        let e = ExternalIssuer {
            cert: ext.path().join("i.crt"),
            key: ext.path().join("i.key"),
            bundle: ext.path().join("r.pem"),
        };
        std::fs::write(&e.cert, &issuer.cert_pem).unwrap();
        std::fs::write(&e.key, &issuer.key_pem).unwrap();
        std::fs::write(&e.bundle, &anchor.cert_pem).unwrap();
        let out = tempfile::tempdir().unwrap();
        init(&td, out.path(), Some(&e), false).unwrap();
        assert!(!out.path().join(TRUST_ANCHOR_KEY).exists(), "root key is never copied");
        load_authority(out.path(), None).unwrap();
        // A mismatched key is refused, naming the file.
        std::fs::write(&e.key, &anchor.key_pem).unwrap();
        let out2 = tempfile::tempdir().unwrap();
        let err = init(&td, out2.path(), Some(&e), false).unwrap_err().to_string();
        assert!(err.contains(ISSUER_CERT) && err.contains("does not match"), "{err}");
    }

    #[test]
    fn load_names_missing_or_mismatched_file() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        init(&td, dir.path(), None, false).unwrap();
        std::fs::remove_file(dir.path().join(ISSUER_KEY)).unwrap();
        let err = load_authority(dir.path(), None).unwrap_err().to_string();
        assert!(err.contains(ISSUER_KEY), "{err}");

        let other = tempfile::tempdir().unwrap();
        init(&td, other.path(), None, false).unwrap();
        std::fs::copy(other.path().join(ISSUER_KEY), dir.path().join(ISSUER_KEY)).unwrap();
        let err = load_authority(dir.path(), None).unwrap_err().to_string();
        assert!(err.contains(ISSUER_KEY) && err.contains("does not match"), "{err}");
    }
}
