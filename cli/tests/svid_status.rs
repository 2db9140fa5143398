//! `weft status` shows the SVID a sidecar holds now, not the one its config
//! stream connected with: a real control plane with short SVIDs, a real
//! weft-proxy that renews them, and the real `weft status`.

use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use weft_testkit::{servers, ControlPlane, Sidecar, SidecarSpec};

const TD: &str = "example.org";

fn weft(cp: &ControlPlane, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(args)
        .args(["--control-plane", &cp.addr.to_string(), "--pki"])
        .arg(&cp.pki)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// The notAfter of the SVID in the sidecar's state directory, seconds since the Unix epoch.
fn saved_svid_expiry(sidecar: &Sidecar) -> i64 {
    let svid = weft_certs::pki::load_svid(&sidecar.state_dir.join("svid.pem"), &sidecar.state_dir.join("svid.key"))
        .expect("the sidecar's saved SVID");
    weft_certs::svid::unix_secs(svid.not_after)
}

/// The sidecar's `svid_expires_at` in `weft status --json`.
fn status_expiry(cp: &ControlPlane, sidecar: &Sidecar) -> i64 {
    let (ok, json, err) = weft(cp, &["status", "--json"]);
    assert!(ok, "weft status --json: {err}");
    let doc: serde_json::Value = serde_json::from_str(&json).expect("status --json is JSON");
    let inbound = sidecar.inbound.to_string();
    let s = doc["sidecars"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["address"].as_str() == Some(inbound.as_str()))
        .unwrap_or_else(|| panic!("sidecar {inbound} in {json}"));
    s["svid_expires_at"].as_i64().unwrap()
}

async fn renewals(sidecar: &Sidecar) -> f64 {
    weft_testkit::metric_sum(&sidecar.metrics().await, "weft_proxy_svid_renewals_total", &["outcome=\"ok\""])
}

fn now() -> i64 {
    weft_certs::svid::unix_secs(SystemTime::now())
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_the_renewed_svid_not_the_one_the_stream_connected_with() {
    let cp = ControlPlane::start(TD, &["--store", "file", "--svid-ttl", "20s"]).await;
    let app = servers::http("api").await;
    let api = Sidecar::start(&cp, TD, SidecarSpec::new("api", app.addr)).await;
    let first = saved_svid_expiry(&api);

    // Renewal at about half-life (10 s); generous bounds for a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(60);
    while renewals(&api).await < 1.0 {
        assert!(Instant::now() < deadline, "the sidecar did not renew within 60 s:\n{}", api.proc_.log_text());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The status follows the SVID on disk (read around it: a renewal may fall between).
    let deadline = Instant::now() + Duration::from_secs(30);
    let (shown, held) = loop {
        let before = saved_svid_expiry(&api);
        let shown = status_expiry(&cp, &api);
        let after = saved_svid_expiry(&api);
        if shown == before || shown == after {
            break (shown, after);
        }
        assert!(
            Instant::now() < deadline,
            "weft status shows SVID expiry {shown} ({}s from now), the sidecar holds one expiring at {after} \
             (first SVID: {first})",
            shown - now()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(shown > first && held > first, "renewed: {shown} (held {held}) after the first SVID's {first}");

    // Past the first SVID's expiry, the human view still says it expires in the future.
    while now() <= first + 1 {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, text, err) = weft(&cp, &["status"]);
        assert!(ok, "{err}");
        let line = text.lines().find(|l| l.contains(&api.inbound.to_string())).unwrap_or_default().to_string();
        if !line.contains("expired") && line.contains(" in ") {
            break;
        }
        assert!(Instant::now() < deadline, "a renewing sidecar shown as expired:\n{text}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
