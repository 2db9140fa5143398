//! `weft status` shows the SVID a sidecar holds now, not the one its config
//! stream connected with: a real control plane with short SVIDs, a real
//! weft-proxy that renews them, and the real `weft status`.

use std::time::{Duration, Instant, SystemTime};

use weft_testkit::etcd::Etcd;
use weft_testkit::{servers, ControlPlane, Pki, Sidecar, SidecarSpec};

const TD: &str = "example.org";

fn weft(cp: &ControlPlane, args: &[&str]) -> (bool, String, String) {
    let out = cp.weft(args);
    (out.status.success(), out.stdout, out.stderr)
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

/// Waits (generously: the machine may be loaded) until the sidecar has
/// renewed its SVID once.
async fn wait_renewed(sidecar: &Sidecar) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while renewals(sidecar).await < 1.0 {
        assert!(Instant::now() < deadline, "the sidecar did not renew within 60 s:\n{}", sidecar.proc_.log_text());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until `weft status --json` through `cp` shows the expiry of the SVID
/// in the sidecar's state dir (read before and after: a renewal may fall
/// between), then checks it is a renewed one (later than `first`).
async fn wait_status_shows_the_held_svid(cp: &ControlPlane, sidecar: &Sidecar, first: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let (shown, held) = loop {
        let before = saved_svid_expiry(sidecar);
        let shown = status_expiry(cp, sidecar);
        let after = saved_svid_expiry(sidecar);
        if shown == before || shown == after {
            break (shown, after);
        }
        assert!(
            Instant::now() < deadline,
            "weft status through {} shows SVID expiry {shown} ({}s from now), the sidecar holds one expiring at \
             {after} (first SVID: {first})",
            cp.addr,
            shown - now()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(shown > first && held > first, "renewed: {shown} (held {held}) after the first SVID's {first}");
}

/// With `--svid-ttl 20s` the sidecar renews at about 10 s over a new
/// connection while its config stream stays on the first one: `weft status
/// --json` gives the renewed certificate's notAfter, and past the first
/// SVID's expiry the table still says `in …`, not `expired … ago`.
#[tokio::test(flavor = "multi_thread")]
async fn status_shows_the_renewed_svid_not_the_one_the_stream_connected_with() {
    let cp = ControlPlane::start(TD, &["--store", "file", "--svid-ttl", "20s"]).await;
    let app = servers::http("api").await;
    let api = Sidecar::start(&cp, TD, SidecarSpec::new("api", app.addr)).await;
    let first = saved_svid_expiry(&api);
    wait_renewed(&api).await;
    wait_status_shows_the_held_svid(&cp, &api, first).await;

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

/// With etcd and two replicas: the replica holding the sidecar's stream and
/// the other one (which knows it from its registration record in etcd) both
/// show the renewed SVID. Skipped without an `etcd` binary.
#[tokio::test(flavor = "multi_thread")]
async fn with_etcd_every_replica_shows_the_renewed_svid() {
    let Some(etcd) = Etcd::start(1).await else { return };
    let pki = Pki::new(TD);
    let url = etcd.url();
    let mut dirs = Vec::new();
    let mut cps = Vec::new();
    for _ in 0..2 {
        let state = tempfile::tempdir().expect("tempdir");
        let args = ["--store", url.as_str(), "--registration-ttl", "4s", "--svid-ttl", "20s"];
        cps.push(ControlPlane::start_on(&pki, state.path(), &args).await);
        dirs.push(state);
    }
    let app = servers::http("api").await;
    let api = Sidecar::start(&cps[0], TD, SidecarSpec::new("api", app.addr)).await;
    let first = saved_svid_expiry(&api);
    wait_renewed(&api).await;
    for cp in &cps {
        wait_status_shows_the_held_svid(cp, &api, first).await;
    }
}
