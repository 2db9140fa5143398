//! The real `weft` CLI against the real control plane.
//!
//! `weft` is another package's binary, so it is found next to this package's
//! `weft-control-plane` in the target directory. Build it first:
//! `cargo nextest run -p weft-control-plane -p weft` (or `cargo build --workspace --bins`).

use std::path::PathBuf;
use std::process::Command;

use weft_testkit::{run, ControlPlane, Output, Pki};

const TD: &str = "example.org";
const CONTROL_PLANE_BIN: &str = env!("CARGO_BIN_EXE_weft-control-plane");

fn weft_bin() -> PathBuf {
    let p = PathBuf::from(CONTROL_PLANE_BIN).with_file_name(format!("weft{}", std::env::consts::EXE_SUFFIX));
    assert!(
        p.is_file(),
        "{} not found: build the CLI first (`cargo build -p weft`, or run the tests with \
         `cargo nextest run -p weft-control-plane -p weft`)",
        p.display()
    );
    p
}

/// `weft args...` pointed at `cp` with --control-plane and --pki.
fn weft(cp: &ControlPlane, args: &[&str]) -> Output {
    assert!(weft_bin().is_file());
    cp.weft(args)
}

#[tokio::test]
async fn token_create_prints_a_token_that_attests() {
    let pki = Pki::new(TD);
    let state = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start_on(&pki, state.path(), &[]).await;
    let id = "spiffe://example.org/ns/default/sa/web";

    let out = weft(&cp, &["token", "create", "--spiffe-id", id, "--ttl", "5m"]);
    assert!(out.status.success(), "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line on stdout: {:?}", out.stdout);
    let token = lines[0];
    assert!(token.starts_with("weft-jt-"), "{token}");
    assert!(out.stderr.contains(id), "{}", out.stderr);

    let (svid, _) = cp.attest(token).await.expect("attest with the CLI's token");
    assert_eq!(svid.spiffe_id.to_string(), id);
    // It is a join token like any other: single use.
    assert_eq!(cp.attest(token).await.unwrap_err().code(), tonic::Code::PermissionDenied);

    // WEFT_CONTROL_PLANE / WEFT_PKI stand in for the flags.
    let out = run(Command::new(weft_bin())
        .args(["token", "create", "--spiffe-id", id])
        .env("WEFT_CONTROL_PLANE", cp.addr.to_string())
        .env("WEFT_PKI", &cp.pki));
    assert!(out.status.success(), "{}", out.stderr);
    let (svid, _) = cp.attest(out.stdout.trim()).await.expect("attest with a token made via env settings");
    assert_eq!(svid.spiffe_id.to_string(), id);

    // The control plane refuses IDs outside its trust domain; the CLI says why.
    let out = weft(&cp, &["token", "create", "--spiffe-id", "spiffe://other.org/ns/a/sa/b"]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("trust domain"), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    cp.assert_serving().await;
}

#[tokio::test]
async fn status_prints_the_trust_domain() {
    let pki = Pki::new(TD);
    let state = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start_on(&pki, state.path(), &[]).await;

    let out = weft(&cp, &["status"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains(&format!("trust domain {TD}")), "{}", out.stdout);

    let out = weft(&cp, &["status", "--json"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains(&format!("\"trust_domain\":\"{TD}\"")), "{}", out.stdout);
    cp.assert_serving().await;
}

#[tokio::test]
async fn token_create_against_a_stopped_control_plane_is_unreachable() {
    let pki = Pki::new(TD);
    let state = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start_on(&pki, state.path(), &[]).await;
    cp.stop();
    let out = weft(&cp, &["token", "create", "--spiffe-id", "spiffe://example.org/ns/default/sa/web"]);
    assert!(!out.status.success(), "made a token with the control plane down");
    assert!(out.stderr.contains("unreachable"), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
}

#[tokio::test]
async fn cli_from_another_pki_is_refused() {
    // An operator certificate of the same trust domain but another CA.
    let pki = Pki::new(TD);
    let other = Pki::new(TD);
    let state = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start_on(&pki, state.path(), &[]).await;
    let out = run(Command::new(weft_bin())
        .args(["token", "create", "--spiffe-id"])
        .arg("spiffe://example.org/ns/default/sa/web")
        .arg("--control-plane")
        .arg(cp.addr.to_string())
        .arg("--pki")
        .arg(other.path())
        .env_remove("WEFT_CONTROL_PLANE")
        .env_remove("WEFT_PKI"));
    assert!(!out.status.success(), "another CA's operator made a token");
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    cp.assert_serving().await;
}
