//! The TLS and identity mistakes people make pointing a CLI or a sidecar at
//! a control plane, each against real processes and real TLS: every one must
//! end in one line that says what is wrong and which flag to change, with no
//! Rust debug output (`WrongId { got: SpiffeId { … } }`, `Other(…)`) and no
//! transport prefixes ("transport error", "error trying to connect").

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use weft_certs::pki;
use weft_testkit::{bin, command, free_addr, wait_ok, ControlPlane, Proc, Sidecar, SidecarSpec};

const TD: &str = "example.org";

/// A copy of `from` (a PKI directory) with some files taken from `other`.
fn mixed_pki(root: &Path, name: &str, from: &Path, other: &Path, from_other: &[&str]) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    for f in [pki::TRUST_BUNDLE, pki::OPERATOR_CERT, pki::OPERATOR_KEY] {
        let src = if from_other.contains(&f) { other } else { from };
        std::fs::copy(src.join(f), dir.join(f)).expect("copy");
    }
    dir
}

fn certs_init(out: &Path) {
    let st = Command::new(bin("weft"))
        .args(["certs", "init", "--trust-domain", TD, "--out"])
        .arg(out)
        .output()
        .expect("weft certs init");
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
}

/// `weft status` against `addr` with `pki`: its one-line error.
fn weft_status(addr: &str, pki: &Path) -> String {
    let out = command::run(Command::new(bin("weft")).args(["status", "--control-plane", addr, "--pki"]).arg(pki));
    assert!(!out.status.success(), "weft status succeeded:\n{}", out.stdout);
    out.stderr
}

/// `weft-proxy` joining through `addr` with `bundle`: its one-line error at exit.
fn weft_proxy(addr: &str, bundle: &Path, token: &Path, dir: &Path) -> String {
    let (inbound, outbound, admin, app) = (free_addr(), free_addr(), free_addr(), free_addr());
    let out = command::run(Command::new(bin("weft-proxy")).args([
        "--control-plane",
        addr,
        "--trust-bundle",
        &bundle.display().to_string(),
        "--token-file",
        &token.display().to_string(),
        "--state-dir",
        &dir.join(format!("state-{}", admin.port())).display().to_string(),
        "--service",
        "backend",
        "--app",
        &app.to_string(),
        "--inbound",
        &inbound.to_string(),
        "--outbound",
        &outbound.to_string(),
        "--admin",
        &admin.to_string(),
        // A refused control plane is retried on a first start; not for long here.
        "--control-plane-wait",
        "1s",
    ]));
    assert!(!out.status.success(), "weft-proxy kept running");
    out.stderr
}

/// The last `error:` line of `stderr`, checked to be the only one and to be free of debug output.
fn one_line(what: &str, stderr: &str) -> String {
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(errors.len(), 1, "{what}: one error line:\n{stderr}");
    let line = errors[0].to_string();
    for bad in ["{", "Other(", "Some(", "transport error", "error trying to connect", "Status", "os error"] {
        assert!(!line.contains(bad), "{what}: {bad:?} in {line:?}");
    }
    line
}

#[tokio::test(flavor = "multi_thread")]
async fn each_connection_mistake_gets_one_actionable_line() {
    let cp = ControlPlane::start(TD, &[]).await;
    let root = tempfile::tempdir().expect("tempdir");
    let other = root.path().join("other-pki");
    certs_init(&other);
    // A sidecar, to point the CLI at a TLS port that proves another SPIFFE ID.
    let app: SocketAddr = free_addr();
    let _app = Proc::spawn(
        "app",
        &bin("weft"),
        &["demo-app".into(), "--service".into(), "backend".into(), "--listen".into(), app.to_string()],
        root.path(),
    );
    wait_ok(app, "/", Duration::from_secs(20), None).await;
    let sidecar = Sidecar::start(&cp, TD, SidecarSpec::new("backend", app)).await;
    // An operator certificate that expired a second after it was issued.
    let expired_pki = mixed_pki(root.path(), "expired", &cp.pki, &cp.pki, &[]);
    let authority = pki::load_authority(&cp.pki, None).expect("authority");
    let op_id = pki::operator_id(&weft_certs::TrustDomain::new(TD).expect("td"));
    let short = authority.issue_local(&op_id, Duration::from_secs(1)).expect("issue");
    pki::save_svid(&short, &expired_pki.join(pki::OPERATOR_CERT), &expired_pki.join(pki::OPERATOR_KEY)).expect("save");
    let closed = free_addr().to_string();
    let (cp_addr, admin) = (cp.addr.to_string(), cp.admin.to_string());
    tokio::time::sleep(Duration::from_secs(2)).await;

    // (mistake, --control-plane, --pki, what the line must say)
    let wrong_bundle = mixed_pki(root.path(), "wrong-bundle", &cp.pki, &other, &[pki::TRUST_BUNDLE]);
    let unknown_ca = mixed_pki(root.path(), "unknown-ca", &cp.pki, &other, &[pki::OPERATOR_CERT, pki::OPERATOR_KEY]);
    let inbound = sidecar.inbound.to_string();
    let cli_cases: Vec<(&str, &str, &Path, String)> = vec![
        ("connection refused", &closed, &cp.pki, format!("control plane unreachable at {closed}: connection refused")),
        (
            "the admin port",
            &admin,
            &cp.pki,
            format!("{admin} is not a weft control plane's gRPC port (it answered plain HTTP?); --control-plane should name"),
        ),
        (
            "another mesh's PKI",
            &cp_addr,
            &other,
            format!("the control plane at {cp_addr} has a certificate that --pki's trust-bundle.pem does not trust"),
        ),
        (
            "a trust bundle from another PKI than the operator certificate",
            &cp_addr,
            &wrong_bundle,
            format!(
                "the operator certificate {}/operator.crt is not signed by {}/trust-bundle.pem",
                wrong_bundle.display(),
                wrong_bundle.display()
            ),
        ),
        (
            "an operator certificate from an unknown CA",
            &cp_addr,
            &unknown_ca,
            format!(
                "the operator certificate {}/operator.crt is not signed by {}/trust-bundle.pem",
                unknown_ca.display(),
                unknown_ca.display()
            ),
        ),
        (
            "an expired operator certificate",
            &cp_addr,
            &expired_pki,
            format!("the operator certificate {}/operator.crt has expired", expired_pki.display()),
        ),
        (
            "a port proving another SPIFFE ID",
            &inbound,
            &cp.pki,
            format!(
                "the control plane at {inbound} proved SPIFFE ID spiffe://{TD}/ns/default/sa/backend, not \
                 spiffe://{TD}/weft/control-plane"
            ),
        ),
    ];
    let mut failures = Vec::new();
    for (what, addr, pki_dir, want) in &cli_cases {
        let line = one_line(what, &weft_status(addr, pki_dir));
        if !line.contains(want.as_str()) {
            failures.push(format!("weft status, {what}:\n  got  {line}\n  want …{want}…"));
        }
    }

    // The sidecar's side: the same mistakes in weft-proxy's flags.
    let token = cp.token_file(&format!("spiffe://{TD}/ns/default/sa/backend"));
    let other_bundle = other.join(pki::TRUST_BUNDLE);
    let sidecar_cases: Vec<(&str, &str, PathBuf, String)> = vec![
        (
            "connection refused",
            &closed,
            cp.trust_bundle(),
            format!("control plane unreachable at {closed}: connection refused"),
        ),
        ("the admin port", &admin, cp.trust_bundle(), format!("{admin} is not a weft control plane's gRPC port")),
        (
            "another mesh's trust bundle",
            &cp_addr,
            other_bundle,
            format!("the control plane at {cp_addr} has a certificate that --trust-bundle does not trust"),
        ),
    ];
    for (what, addr, bundle, want) in &sidecar_cases {
        let line = one_line(what, &weft_proxy(addr, bundle, &token, root.path()));
        if !line.contains(want.as_str()) {
            failures.push(format!("weft-proxy, {what}:\n  got  {line}\n  want …{want}…"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
