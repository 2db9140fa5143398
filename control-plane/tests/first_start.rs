//! A sidecar's first start (no saved SVID) while its only control plane is
//! down: it retries with jittered backoff, saying so, and attests once the
//! control plane is back; `--control-plane-wait` bounds how long it tries.

use std::time::{Duration, Instant};

use weft_testkit::{bin, free_addr, wait_ok, ControlPlane, Proc};

const TD: &str = "example.org";

fn sidecar_args(cp: &ControlPlane, token: &std::path::Path, wait: &str) -> (Vec<String>, std::net::SocketAddr) {
    let admin = free_addr();
    let args = [
        "--control-plane".to_string(),
        cp.addr.to_string(),
        "--trust-bundle".into(),
        cp.trust_bundle().display().to_string(),
        "--token-file".into(),
        token.display().to_string(),
        "--state-dir".into(),
        cp.dir.path().join(format!("sidecar-{}", admin.port())).display().to_string(),
        "--service".into(),
        "web".into(),
        "--app".into(),
        free_addr().to_string(),
        "--inbound".into(),
        free_addr().to_string(),
        "--outbound".into(),
        free_addr().to_string(),
        "--admin".into(),
        admin.to_string(),
        "--control-plane-wait".into(),
        wait.into(),
    ];
    (args.to_vec(), admin)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_first_start_waits_for_a_control_plane_that_is_down() {
    let mut cp = ControlPlane::start(TD, &[]).await;
    let token = cp.token_file(&format!("spiffe://{TD}/ns/default/sa/web"));
    cp.proc_.kill();

    let (args, admin) = sidecar_args(&cp, &token, "2m");
    let mut sidecar = Proc::spawn("sidecar-waits", &bin("weft-proxy"), &args, cp.dir.path());
    let deadline = Instant::now() + Duration::from_secs(20);
    while sidecar.log_text().matches("no control-plane replica answered on first start; retrying").count() < 2 {
        assert!(sidecar.running(), "the sidecar exited instead of waiting:\n{}", sidecar.log_text());
        assert!(Instant::now() < deadline, "no retry logged:\n{}", sidecar.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let line = sidecar.log_text().lines().find(|l| l.contains("retrying")).unwrap_or_default().to_string();
    assert!(line.contains("retry_in_ms=") && line.contains("--control-plane-wait"), "{line}");

    cp.restart().await;
    wait_ok(admin, "/ready", Duration::from_secs(30), Some(&sidecar)).await;
    assert!(sidecar.log_text().contains("attested with join token"), "{}", sidecar.log_text());
}

#[tokio::test(flavor = "multi_thread")]
async fn control_plane_wait_bounds_the_first_start() {
    let mut cp = ControlPlane::start(TD, &[]).await;
    let token = cp.token_file(&format!("spiffe://{TD}/ns/default/sa/web"));
    cp.proc_.kill();

    let (args, _) = sidecar_args(&cp, &token, "2s");
    let started = Instant::now();
    let out = weft_testkit::run(std::process::Command::new(bin("weft-proxy")).args(&args));
    assert!(!out.status.success(), "the sidecar kept running");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(2) && waited < Duration::from_secs(30), "gave up after {waited:?}");
    assert!(
        out.stderr.contains(&format!("control plane unreachable at {}: connection refused", cp.addr)),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("retrying"), "{}", out.stderr);
}
