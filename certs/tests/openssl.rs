//! Checks weft's PKI with an independent implementation: the `openssl`
//! binary. `weft_certs::pki::init` writes a PKI directory, the authority issues
//! leaves, and `openssl verify` / `openssl x509 -text` judge them.
//!
//! These tests need `openssl` (Debian/Ubuntu: `apt-get install openssl`). When
//! it is missing they fail, saying so: they never skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use weft_certs::bundle::der_to_pem;
use weft_certs::pki::{self, ISSUER_CERT, TRUST_ANCHOR_CERT, TRUST_BUNDLE};
use weft_certs::{Authority, SpiffeId, TrustDomain};

/// The openssl binary: `$WEFT_TEST_OPENSSL`, else /usr/bin/openssl, else `openssl` on PATH.
fn openssl_path() -> PathBuf {
    if let Some(p) = std::env::var_os("WEFT_TEST_OPENSSL") {
        return p.into();
    }
    let usr = Path::new("/usr/bin/openssl");
    if usr.exists() {
        return usr.into();
    }
    "openssl".into()
}

/// Runs openssl with `args`, panicking with a clear message if it cannot be started.
fn openssl(args: &[&str]) -> Output {
    let bin = openssl_path();
    Command::new(&bin).args(args).output().unwrap_or_else(|e| {
        panic!(
            "cannot run the openssl binary {} ({e}). These tests need a real openssl: \
             install it (apt-get install openssl) or point WEFT_TEST_OPENSSL at one. \
             They do not skip.",
            bin.display()
        )
    })
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// A PKI directory written by `pki::init`, and the authority loaded from it.
struct PkiDir {
    dir: tempfile::TempDir,
    authority: Authority,
}

impl PkiDir {
    fn new(td: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new(td).unwrap();
        pki::init(&td, dir.path(), None, false).unwrap();
        let authority = pki::load_authority(dir.path(), None).unwrap();
        assert_eq!(authority.trust_domain(), &td);
        Self { dir, authority }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Issues a leaf for `id` and writes it alone (no chain) as PEM; returns its path.
    fn write_leaf(&self, id: &str, name: &str) -> PathBuf {
        let svid = self.authority.issue_local(&SpiffeId::parse(id).unwrap(), Duration::from_secs(3600)).unwrap();
        assert_eq!(svid.spiffe_id.as_str(), id);
        let path = self.file(name);
        std::fs::write(&path, der_to_pem("CERTIFICATE", &svid.chain[0])).unwrap();
        path
    }

    /// `openssl verify` of `leaf` against this PKI's bundle and issuer.
    fn verify(&self, leaf: &Path, extra: &[&str]) -> Output {
        let bundle = self.file(TRUST_BUNDLE);
        let issuer = self.file(ISSUER_CERT);
        let mut args = vec!["verify"];
        args.extend_from_slice(extra);
        args.extend(["-CAfile", path_str(&bundle), "-untrusted", path_str(&issuer), path_str(leaf)]);
        openssl(&args)
    }
}

const IDS: [&str; 4] = [
    "spiffe://example.org/ns/default/sa/web",
    "spiffe://example.org/ns/payments/sa/db-primary",
    "spiffe://example.org/weft/control-plane",
    "spiffe://example.org/a.b/c-d/e_f/0123456789",
];

#[test]
fn openssl_binary_is_present() {
    let out = openssl(&["version"]);
    assert!(out.status.success(), "openssl version: {}", text(&out));
    assert!(text(&out).starts_with("OpenSSL"), "unexpected `openssl version` output: {}", text(&out));
}

#[test]
fn openssl_verifies_issued_leaves() {
    let pki = PkiDir::new("example.org");
    for (i, id) in IDS.iter().enumerate() {
        let leaf = pki.write_leaf(id, &format!("leaf{i}.pem"));
        let out = pki.verify(&leaf, &[]);
        assert!(out.status.success(), "openssl verify refused the leaf for {id}: {}", text(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("{}: OK", leaf.display())), "{}", text(&out));
        // The leaf is good for both ends of mutual TLS, as openssl reads its purposes.
        for purpose in ["sslserver", "sslclient"] {
            let out = pki.verify(&leaf, &["-purpose", purpose, "-x509_strict"]);
            assert!(
                out.status.success(),
                "openssl verify -purpose {purpose} -x509_strict refused {id}: {}",
                text(&out)
            );
        }
    }
}

#[test]
fn openssl_refuses_leaf_of_another_pki() {
    let ours = PkiDir::new("example.org");
    let theirs = PkiDir::new("example.org");
    let foreign = theirs.write_leaf(IDS[0], "foreign.pem");
    // Control: its own PKI accepts it.
    let out = theirs.verify(&foreign, &[]);
    assert!(out.status.success(), "{}", text(&out));

    let out = ours.verify(&foreign, &[]);
    assert!(!out.status.success(), "openssl accepted a leaf of another PKI: {}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("unable to get local issuer certificate") || t.contains("certificate signature failure"),
        "unexpected openssl error: {t}"
    );

    // Even when handed the other PKI's issuer as an untrusted intermediate.
    let bundle = ours.file(TRUST_BUNDLE);
    let issuer = theirs.file(ISSUER_CERT);
    let out = openssl(&["verify", "-CAfile", path_str(&bundle), "-untrusted", path_str(&issuer), path_str(&foreign)]);
    assert!(!out.status.success(), "openssl accepted a foreign chain: {}", text(&out));
}

/// One extension of `openssl x509 -text`: its header line (name and
/// ": critical" if so) and its value lines, trimmed.
#[derive(Debug)]
struct Ext {
    name: String,
    critical: bool,
    values: Vec<String>,
}

/// Parses the "X509v3 extensions:" block of `openssl x509 -noout -text`.
fn extensions(dump: &str) -> Vec<Ext> {
    let mut lines = dump.lines().skip_while(|l| l.trim() != "X509v3 extensions:");
    assert!(lines.next().is_some(), "no X509v3 extensions in:\n{dump}");
    let mut exts: Vec<Ext> = Vec::new();
    let mut header_indent = None;
    for line in lines {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        let h = *header_indent.get_or_insert(indent);
        if indent < h {
            break; // the signature block after the extensions
        }
        if indent == h {
            let (name, critical) = match trimmed.strip_suffix(": critical") {
                Some(n) => (n, true),
                None => (trimmed.trim_end_matches(':'), false),
            };
            exts.push(Ext { name: name.to_string(), critical, values: Vec::new() });
        } else {
            exts.last_mut().expect("value before any extension header").values.push(trimmed.to_string());
        }
    }
    exts
}

fn ext<'a>(exts: &'a [Ext], name: &str) -> &'a Ext {
    let found: Vec<_> = exts.iter().filter(|e| e.name == name).collect();
    assert_eq!(found.len(), 1, "want exactly one {name:?} in {exts:#?}");
    found[0]
}

fn dump(cert: &Path) -> String {
    let out = openssl(&["x509", "-noout", "-text", "-in", path_str(cert)]);
    assert!(out.status.success(), "openssl x509: {}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn leaf_profile_as_openssl_reads_it() {
    let pki = PkiDir::new("example.org");
    for (i, id) in IDS.iter().enumerate() {
        let leaf = pki.write_leaf(id, &format!("leaf{i}.pem"));
        let d = dump(&leaf);
        let exts = extensions(&d);

        let bc = ext(&exts, "X509v3 Basic Constraints");
        assert!(bc.critical, "basicConstraints must be critical: {bc:?}");
        assert_eq!(bc.values, ["CA:FALSE"], "{bc:?}");
        assert!(d.contains("X509v3 Basic Constraints: critical\n                CA:FALSE"), "{d}");

        let ku = ext(&exts, "X509v3 Key Usage");
        assert!(ku.critical, "keyUsage must be critical: {ku:?}");
        assert_eq!(ku.values, ["Digital Signature"], "{ku:?}");
        assert!(!d.contains("Certificate Sign") && !d.contains("CRL Sign"), "{d}");

        let eku = ext(&exts, "X509v3 Extended Key Usage");
        assert_eq!(eku.values, ["TLS Web Server Authentication, TLS Web Client Authentication"], "{eku:?}");

        let san = ext(&exts, "X509v3 Subject Alternative Name");
        assert_eq!(san.values, [format!("URI:{id}")], "{san:?}");
        assert_eq!(d.matches("URI:spiffe://").count(), 1, "{d}");
        assert!(!d.contains("DNS:") && !d.contains("IP Address:"), "{d}");

        assert!(d.contains("Public Key Algorithm: id-ecPublicKey"), "{d}");
        assert!(d.contains("ASN1 OID: prime256v1"), "{d}");
        assert!(d.contains("NIST CURVE: P-256"), "{d}");
        assert!(d.contains("Signature Algorithm: ecdsa-with-SHA256"), "{d}");
    }
}

#[test]
fn signing_cert_profiles_as_openssl_reads_them() {
    let pki = PkiDir::new("example.org");
    for name in [ISSUER_CERT, TRUST_ANCHOR_CERT] {
        let d = dump(&pki.file(name));
        let exts = extensions(&d);

        let bc = ext(&exts, "X509v3 Basic Constraints");
        assert!(bc.critical, "{name}: basicConstraints must be critical: {bc:?}");
        assert!(bc.values.len() == 1 && bc.values[0].starts_with("CA:TRUE"), "{name}: {bc:?}");

        let ku = ext(&exts, "X509v3 Key Usage");
        assert!(ku.critical, "{name}: keyUsage must be critical: {ku:?}");
        let usages: Vec<&str> = ku.values[0].split(", ").collect();
        assert!(usages.contains(&"Certificate Sign"), "{name}: {ku:?}");
        assert!(!usages.contains(&"Digital Signature"), "{name}: a signing cert has no leaf-only use: {ku:?}");
        assert!(
            !exts.iter().any(|e| e.name == "X509v3 Extended Key Usage"),
            "{name}: a signing cert has no extendedKeyUsage: {exts:#?}"
        );

        assert_eq!(d.matches("URI:spiffe://").count(), 1, "{d}");
        assert!(d.contains("URI:spiffe://example.org\n"), "{name}: {d}");
        assert!(d.contains("ASN1 OID: prime256v1"), "{name}: {d}");
    }
    // The issuer may sign leaves only: path length 0 under the anchor.
    let d = dump(&pki.file(ISSUER_CERT));
    assert!(d.contains("CA:TRUE, pathlen:0"), "{d}");
}

#[test]
fn openssl_verifies_the_operator_chain_file() {
    // operator.crt is a chain file, leaf first; openssl reads the leaf from it
    // and the issuer from -untrusted.
    let pki = PkiDir::new("example.org");
    let out = pki.verify(&pki.file(pki::OPERATOR_CERT), &["-purpose", "sslclient"]);
    assert!(out.status.success(), "{}", text(&out));
    let d = dump(&pki.file(pki::OPERATOR_CERT));
    assert!(d.contains("URI:spiffe://example.org/weft/operator"), "{d}");
}
