//! The operator's view against a running mesh: `weft status`,
//! `weft proxy-config` and `weft top`, all as real processes.

use std::process::Command;
use std::time::Duration;

use weft_testkit::{servers, ControlPlane, Sidecar, SidecarSpec};

const TD: &str = "example.org";

fn weft(cp: &ControlPlane, args: &[&str]) -> (bool, String, String) {
    let out = cp.weft(args);
    (out.status.success(), out.stdout, out.stderr)
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

/// The mesh of the `--calls` test: Services `web` and `api` only.
const CALLS_MESH: &str = "\
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: web}
spec: {port: 8080, protocol: http}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: api}
spec: {port: 8080, protocol: http}
";

/// `weft status --json`'s `unknown_calls` of the one sidecar of `service`.
fn unknown_calls(cp: &ControlPlane, service: &str) -> (Vec<String>, serde_json::Value) {
    let (ok, json, err) = weft(cp, &["status", "--json"]);
    assert!(ok, "{err}");
    let doc: serde_json::Value = serde_json::from_str(&json).expect("status --json is JSON");
    let sidecar = doc["sidecars"].as_array().unwrap().iter().find(|s| s["service"] == service).cloned();
    let names = sidecar
        .and_then(|s| s["unknown_calls"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|n| n.as_str().unwrap_or_default().to_string())
        .collect();
    (names, doc)
}

async fn wait_unknown_calls(cp: &ControlPlane, service: &str, want: &[&str]) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (names, doc) = unknown_calls(cp, service);
        if names == want {
            return doc;
        }
        assert!(std::time::Instant::now() < deadline, "unknown_calls never became {want:?}: {doc:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_log(s: &Sidecar, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let log = s.proc_.log_text();
        if log.contains(needle) {
            return log;
        }
        assert!(std::time::Instant::now() < deadline, "the {} sidecar never logged {needle:?}:\n{log}", s.service);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `--calls` names that are neither a Service of the mesh config nor a
/// registered service: the sidecar logs one WARN per name saying what to
/// change, and `weft status` warns and lists them (`unknown_calls`); each
/// clears when the service appears, by registering or by being applied.
/// Names that are not service names stop the sidecar at start-up.
#[tokio::test(flavor = "multi_thread")]
async fn calls_naming_services_the_mesh_does_not_define_are_reported() {
    let proxy = weft_testkit::bin("weft-proxy");
    let state = tempfile::tempdir().unwrap();
    for (calls, says) in [("api,,db", "an empty service name"), ("api,Db_1", "\"Db_1\" is not a service name")] {
        let out = Command::new(&proxy)
            .args(["--service", "web", "--trust-bundle", "/nonexistent", "--app", "127.0.0.1:9", "--calls", calls])
            .arg("--state-dir")
            .arg(state.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--calls {calls} accepted");
        assert!(stderr.contains("--calls") && stderr.contains(says), "--calls {calls}: {stderr}");
    }

    let cfg = weft_testkit::mesh::ConfigFile::new(CALLS_MESH);
    let cp = ControlPlane::start(TD, &["--config", &cfg.arg()]).await;
    let web_app = servers::http("web").await;
    let web = Sidecar::start(
        &cp,
        TD,
        SidecarSpec {
            service: "web",
            app: web_app.addr,
            upstreams: &[],
            labels: &[],
            extra_args: &["--calls", "api,apii,db"],
        },
    )
    .await;
    let doc = wait_unknown_calls(&cp, "web", &["apii", "db"]).await;
    let warnings = doc["warnings"].to_string();
    assert!(warnings.contains("names service `apii`") && warnings.contains("apply a Service named apii"), "{doc:#}");
    let (ok, table, err) = weft(&cp, &["status"]);
    assert!(ok, "{err}");
    let line = table.lines().find(|l| l.contains("`apii`")).unwrap_or_default();
    assert!(line.starts_with("warning: --calls of web (") && line.contains("check the spelling"), "{table}");
    let warn = "--calls names service `apii`, which the mesh does not define";
    let log = wait_log(&web, warn).await;
    assert!(log.contains("apply a Service named apii"), "{log}");
    assert!(log.contains("--calls names service `db`"), "{log}");

    // db registers: known from then on; the sidecar says so, apii is not warned again.
    let db_app = servers::http("db").await;
    let _db = Sidecar::start(&cp, TD, SidecarSpec::new("db", db_app.addr)).await;
    web.wait_endpoints("db", 1, Duration::from_secs(60)).await;
    wait_unknown_calls(&cp, "web", &["apii"]).await;
    wait_log(&web, "service `db` named by --calls is now defined").await;

    // apii is applied as a Service: no unknown name, no warning left.
    cfg.write(&format!(
        "{CALLS_MESH}---\napiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {{name: apii}}\nspec: {{port: 8080, protocol: http}}\n"
    ));
    let doc = wait_unknown_calls(&cp, "web", &[]).await;
    assert!(!doc["warnings"].to_string().contains("--calls"), "{doc:#}");
    let log = wait_log(&web, "service `apii` named by --calls is now defined").await;
    assert_eq!(log.matches(warn).count(), 1, "one WARN per change:\n{log}");
}
