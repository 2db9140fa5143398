//! Tests of the real `weft` binary that need no running control plane.
//! (`weft token create` / `weft status` against a live control plane are in
//! control-plane/tests/cli_e2e.rs, which starts one.)

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use weft_certs::{pki, TrustDomain};
use weft_testkit::{run, Output};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

const FILES: [&str; 7] = [
    pki::TRUST_BUNDLE,
    pki::TRUST_ANCHOR_CERT,
    pki::TRUST_ANCHOR_KEY,
    pki::ISSUER_CERT,
    pki::ISSUER_KEY,
    pki::OPERATOR_CERT,
    pki::OPERATOR_KEY,
];
const KEYS: [&str; 3] = [pki::TRUST_ANCHOR_KEY, pki::ISSUER_KEY, pki::OPERATOR_KEY];

/// Runs `weft args...` to completion (killed after 15s), without any WEFT_* settings
/// from the environment.
fn weft(args: &[&str]) -> Output {
    run(Command::new(WEFT).args(args).env_remove("WEFT_CONTROL_PLANE").env_remove("WEFT_PKI").env_remove("RUST_LOG"))
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    FILES.iter().map(|f| (f.to_string(), std::fs::read(dir.join(f)).unwrap())).collect()
}

fn free_port() -> u16 {
    weft_testkit::free_addr().port()
}

#[test]
fn certs_init_writes_the_pki_and_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let d = dir.to_str().unwrap();

    let out = weft(&["certs", "init", "--trust-domain", "example.org", "--out", d]);
    assert!(out.status.success(), "{}", out.stderr);
    for f in FILES {
        assert!(dir.join(f).is_file(), "{f} missing");
        assert!(out.stdout.contains(f), "stdout names {f}: {}", out.stdout);
    }
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), FILES.len(), "exactly the 7 files (no temp files left)");
    assert!(out.stdout.contains("operator identity: spiffe://example.org/weft/operator"), "{}", out.stdout);
    for k in KEYS {
        let mode = std::fs::metadata(dir.join(k)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{k} mode {mode:o}");
    }
    // What was written is a usable PKI for the trust domain.
    let authority = pki::load_authority(&dir, None).expect("load the PKI");
    assert_eq!(authority.trust_domain(), &TrustDomain::new("example.org").unwrap());
    let op = pki::load_svid(&dir.join(pki::OPERATOR_CERT), &dir.join(pki::OPERATOR_KEY)).unwrap();
    assert_eq!(op.spiffe_id.to_string(), "spiffe://example.org/weft/operator");

    // Again without --force: refused, naming an existing file, nothing changed.
    let before = snapshot(&dir);
    let out = weft(&["certs", "init", "--trust-domain", "example.org", "--out", d]);
    assert!(!out.status.success(), "second init succeeded");
    assert!(
        FILES.iter().any(|f| out.stderr.contains(&dir.join(f).display().to_string())),
        "names an existing file: {}",
        out.stderr
    );
    assert!(out.stderr.contains("--force"), "{}", out.stderr);
    assert_eq!(snapshot(&dir), before, "files unchanged");

    // Even if only one of the files exists.
    let partial = tmp.path().join("partial");
    std::fs::create_dir(&partial).unwrap();
    std::fs::write(partial.join(pki::OPERATOR_KEY), b"keep me").unwrap();
    let out = weft(&["certs", "init", "--trust-domain", "example.org", "--out", partial.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(out.stderr.contains(pki::OPERATOR_KEY), "{}", out.stderr);
    assert_eq!(std::fs::read(partial.join(pki::OPERATOR_KEY)).unwrap(), b"keep me");
    assert_eq!(std::fs::read_dir(&partial).unwrap().count(), 1, "nothing written");

    // --force overwrites: new keys, still valid.
    let out = weft(&["certs", "init", "--trust-domain", "example.org", "--out", d, "--force"]);
    assert!(out.status.success(), "{}", out.stderr);
    let after = snapshot(&dir);
    for ((name, old), (_, new)) in before.iter().zip(&after) {
        assert_ne!(old, new, "{name} was not rewritten");
    }
    for k in KEYS {
        let mode = std::fs::metadata(dir.join(k)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{k} after --force, mode {mode:o}");
    }
    pki::load_authority(&dir, None).expect("load the rewritten PKI");
}

#[test]
fn certs_init_rejects_upper_case_trust_domain() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let out = weft(&["certs", "init", "--trust-domain", "Example.org", "--out", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("upper case"), "{}", out.stderr);
    assert!(!dir.exists(), "nothing written");
}

#[test]
fn token_create_rejects_invalid_spiffe_id_locally() {
    let tmp = tempfile::tempdir().unwrap();
    // No PKI and nothing listening: the ID is checked before anything else.
    let out = weft(&[
        "token",
        "create",
        "--spiffe-id",
        "spiffe://example.org/ns//sa/x",
        "--pki",
        tmp.path().join("none").to_str().unwrap(),
        "--control-plane",
        &format!("127.0.0.1:{}", free_port()),
    ]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("empty"), "{}", out.stderr);
    assert!(out.stderr.contains("--spiffe-id"), "{}", out.stderr);
    assert!(!out.stderr.contains("unreachable"), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "no token printed: {}", out.stdout);
}

#[test]
fn commands_report_an_unreachable_control_plane() {
    let tmp = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    pki::init(&td, tmp.path(), None, false).unwrap();
    let addr = format!("127.0.0.1:{}", free_port()); // nothing listens there
    let pki_dir = tmp.path().to_str().unwrap();

    let out = weft(&[
        "token",
        "create",
        "--spiffe-id",
        "spiffe://example.org/ns/default/sa/web",
        "--pki",
        pki_dir,
        "--control-plane",
        &addr,
    ]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("unreachable"), "{}", out.stderr);
    assert!(out.stderr.contains(&addr), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "no token printed: {}", out.stdout);

    let out = weft(&["status", "--pki", pki_dir, "--control-plane", &addr]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("unreachable"), "{}", out.stderr);

    // Something listens but never speaks TLS: the connect timeout ends it, named as such.
    let silent = std::net::TcpListener::bind(weft_testkit::free_addr()).unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let started = std::time::Instant::now();
    let out = weft(&["status", "--pki", pki_dir, "--control-plane", &silent_addr]);
    assert!(!out.status.success());
    assert!(
        out.stderr
            .contains(&format!("control plane unreachable at {silent_addr}: no answer within the connect timeout")),
        "{}",
        out.stderr
    );
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
}

#[test]
fn token_create_names_a_missing_pki_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = weft(&[
        "token",
        "create",
        "--spiffe-id",
        "spiffe://example.org/ns/default/sa/web",
        "--pki",
        tmp.path().to_str().unwrap(),
        "--control-plane",
        &format!("127.0.0.1:{}", free_port()),
    ]);
    assert!(!out.status.success());
    assert!(out.stderr.contains(pki::OPERATOR_CERT), "{}", out.stderr);
}

#[test]
fn certs_init_from_an_external_issuer() {
    let ext = tempfile::tempdir().unwrap();
    let ext_pki = ext.path().join("corp");
    let out = weft(&["certs", "init", "--trust-domain", "corp.example", "--out", ext_pki.to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.stderr);
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let (cert, key, bundle) =
        (ext_pki.join("issuer.crt"), ext_pki.join("issuer.key"), ext_pki.join("trust-bundle.pem"));
    let out = weft(&[
        "certs",
        "init",
        "--trust-domain",
        "corp.example",
        "--out",
        pki.to_str().unwrap(),
        "--from-issuer",
        cert.to_str().unwrap(),
        "--issuer-key",
        key.to_str().unwrap(),
        "--trust-bundle",
        bundle.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(!pki.join("trust-anchor.key").exists(), "the root key is never copied");
    assert_eq!(std::fs::read(pki.join("issuer.crt")).unwrap(), std::fs::read(&cert).unwrap());
    // The operator certificate chains to the brought trust bundle (real openssl).
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&bundle)
        .arg("-untrusted")
        .arg(&cert)
        .arg(pki.join("operator.crt"))
        .output()
        .expect("openssl is installed");
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
    // An issuer key that does not match its certificate is refused, naming the file.
    let other = tempfile::tempdir().unwrap();
    let bad = weft(&[
        "certs",
        "init",
        "--trust-domain",
        "corp.example",
        "--out",
        other.path().join("pki").to_str().unwrap(),
        "--from-issuer",
        cert.to_str().unwrap(),
        "--issuer-key",
        ext_pki.join("operator.key").to_str().unwrap(),
        "--trust-bundle",
        bundle.to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    assert!(bad.stderr.contains("issuer.crt") && bad.stderr.contains("does not match"), "{}", bad.stderr);
}

#[test]
fn control_plane_logs_json_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let cp = Path::new(WEFT).with_file_name("weft-control-plane");
    let out = Command::new(cp)
        .args(["--log-format", "json", "--pki"])
        .arg(dir.path().join("missing"))
        .env_remove("RUST_LOG")
        .output()
        .expect("weft-control-plane is built next to weft");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr.lines().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON log line in:\n{stderr}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["level"], "ERROR", "{line}");
    assert!(v["fields"]["message"].as_str().unwrap_or("").contains("trust-bundle.pem"), "{line}");
}

#[test]
fn demo_app_refuses_a_call_target_that_is_not_a_service_name() {
    // It would become the Host header of every call; refused before anything listens.
    let out = weft(&[
        "demo-app",
        "--service",
        "web",
        "--call",
        "Bad Name",
        "--via",
        "127.0.0.1:9",
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("--call") && out.stderr.contains("is not a service name"), "{}", out.stderr);
    let out = weft(&["demo-app", "--service", "web", "--call", "api", "--listen", "127.0.0.1:0"]);
    assert!(!out.status.success(), "--call without --via would call nothing");
    assert!(out.stderr.contains("--via"), "{}", out.stderr);
}

/// `weft init-iptables --dry-run` prints weft's chains, and refuses the
/// port mistakes a real install refuses (no root needed for either).
#[test]
fn init_iptables_dry_run_prints_the_rules_and_refuses_what_install_would() {
    let out =
        weft(&["init-iptables", "--dry-run", "--skip-inbound-ports", "15020", "--skip-outbound-cidrs", "10.9.0.0/16"]);
    assert!(out.status.success(), "{}", out.stderr);
    for want in ["*nat", ":WEFT_INBOUND", ":WEFT_OUTPUT", "--uid-owner 1337", "15020", "10.9.0.0/16", "COMMIT"] {
        assert!(out.stdout.contains(want), "no {want:?} in:\n{}", out.stdout);
    }
    for ports in
        [["--inbound-port", "0", "--outbound-port", "15001"], ["--inbound-port", "15001", "--outbound-port", "15001"]]
    {
        let mut args = vec!["init-iptables", "--dry-run"];
        args.extend(ports);
        let out = weft(&args);
        assert!(!out.status.success(), "{ports:?} accepted:\n{}", out.stdout);
        assert!(out.stderr.contains("must differ and be non-zero"), "{}", out.stderr);
    }
}
