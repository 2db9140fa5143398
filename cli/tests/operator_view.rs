//! The operator's view against a running mesh: `weft status`,
//! `weft proxy-config` and `weft top`, all as real processes.

use std::process::Command;
use std::time::Duration;

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

#[tokio::test(flavor = "multi_thread")]
async fn status_proxy_config_and_top() {
    let cp = ControlPlane::start(TD, &[]).await;
    let api_app = servers::http("api").await;
    let web_app = servers::http("web").await;
    let api = Sidecar::start(
        &cp,
        TD,
        SidecarSpec { service: "api", app: api_app.addr, upstreams: &[], labels: &["version=v1"], extra_args: &[] },
    )
    .await;
    let web = Sidecar::start(&cp, TD, SidecarSpec::new("web", web_app.addr)).await;
    web.wait_endpoints("api", 1, Duration::from_secs(10)).await;

    // status: both sidecars with identity, address, expiry and sync state.
    let mut status = String::new();
    for _ in 0..50 {
        let (ok, out, err) = weft(&cp, &["status"]);
        assert!(ok, "{err}");
        status = out;
        if status.matches("in sync").count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(status.contains("trust domain example.org"), "{status}");
    assert!(
        status.contains("spiffe://example.org/ns/default/sa/api") && status.contains(&api.inbound.to_string()),
        "{status}"
    );
    assert!(status.contains("spiffe://example.org/ns/default/sa/web"), "{status}");
    assert_eq!(status.matches("in sync").count(), 2, "{status}");
    assert!(
        ["in 1h ", "in 59m", "in 58m"].iter().any(|e| status.contains(e)),
        "SVID expiry about an hour away: {status}"
    );
    let (_, cp_metrics) = weft_testkit::http_get(cp.admin, "/metrics").await.unwrap();
    for rpc in ["Status", "Watch", "Ack", "CreateJoinToken", "Attest"] {
        assert!(
            weft_testkit::metric_sum(
                &cp_metrics,
                "weft_control_plane_rpcs_total",
                &[&format!("rpc=\"{rpc}\""), "code=\"Ok\""]
            ) >= 1.0,
            "{rpc} not counted:\n{cp_metrics}"
        );
    }
    let (ok, json, _) = weft(&cp, &["status", "--json"]);
    assert!(ok && json.contains("\"in_sync\":true"), "{json}");
    let doc: serde_json::Value = serde_json::from_str(&json).expect("status --json is JSON");
    let admins: Vec<&str> =
        doc["sidecars"].as_array().unwrap().iter().filter_map(|s| s["admin_address"].as_str()).collect();
    assert!(admins.contains(&api.admin.to_string().as_str()), "{json}");

    // proxy-config: the applied discovery as YAML, by service name or SPIFFE ID.
    let (ok, yaml, err) = weft(&cp, &["proxy-config", "web"]);
    assert!(ok, "{err}");
    assert!(yaml.contains("# sidecar spiffe://example.org/ns/default/sa/web"), "{yaml}");
    assert!(yaml.contains(&api.inbound.to_string()) && yaml.contains("version: v1"), "{yaml}");
    let (ok, _, err) = weft(&cp, &["proxy-config", "spiffe://example.org/ns/default/sa/nope"]);
    assert!(!ok && err.contains("no connected sidecar"), "{err}");

    // top: traffic shows up per backend with both identities.
    let traffic = tokio::spawn({
        let outbound = web.outbound;
        async move {
            for _ in 0..300 {
                let _ = tokio::process::Command::new("curl")
                    .args(["-s", "-o", "/dev/null", "-H", "Host: api"])
                    .arg(format!("http://{outbound}/"))
                    .status()
                    .await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    // Blocking calls run off the runtime, so the servers in this process keep serving.
    let (addr, pki) = (cp.addr.to_string(), cp.pki.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_weft"))
            .args(["top", "--iterations", "2", "--no-clear", "--interval", "1s", "--control-plane", &addr, "--pki"])
            .arg(&pki)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let (ok, top, err) = (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    traffic.abort();
    assert!(ok, "{err}");
    let row = top
        .lines()
        .rev()
        .find(|l| l.starts_with("api") && l.contains("sa/web") && l.contains("sa/api"))
        .unwrap_or_else(|| panic!("no api row in:\n{top}"));
    // SERVICE/BACKEND ROUTE CALLER SERVER RPS …; api has no HTTPRoute.
    assert_eq!(row.split_whitespace().nth(1), Some("-"), "{row}");
    let rps: f64 = row.split_whitespace().nth(4).unwrap().parse().unwrap();
    assert!(rps > 1.0, "{row}");
    assert!(row.contains("100.0%"), "{row}");
}
