//! What a new user meets first, as real processes: `--control-plane` lists
//! (the operator commands try replicas in order; the list syntax is the one
//! every weft list flag has), `--advertise-address` refusals, what a
//! sidecar says when its first control-plane replica is down, and the 404 a
//! sidecar started with `--calls` gives for a service outside that list.

use std::process::Command;
use std::time::Duration;

use weft_testkit::{http_get_host, servers, ControlPlane, Pki, Sidecar, SidecarSpec};

const TD: &str = "example.org";

fn output(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn weft_at(control_plane: &str, pki: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    output(
        Command::new(env!("CARGO_BIN_EXE_weft")).args(args).args(["--control-plane", control_plane, "--pki"]).arg(pki),
    )
}

/// A loopback address nothing listens on (bound, then released).
fn dead_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// `weft status --control-plane DEAD,LIVE` asks the live replica; with
/// every replica down it names each with why.
#[tokio::test(flavor = "multi_thread")]
async fn operator_commands_try_the_listed_replicas_in_order() {
    let cp = ControlPlane::start(TD, &[]).await;
    let (dead, live) = (dead_addr(), cp.addr.to_string());
    let list = format!("{dead},{live}");
    let (ok, out, err) = weft_at(&list, &cp.pki, &["status"]);
    assert!(ok, "weft status --control-plane {list}: {err}");
    let first = out.lines().next().unwrap_or_default();
    assert!(first.starts_with(&format!("control plane {live}: healthy")), "{out}");
    let (ok, out, err) = weft_at(&list, &cp.pki, &["status", "--json"]);
    assert!(ok && out.contains("\"trust_domain\":\"example.org\""), "{out}{err}");
    let (ok, out, err) = weft_at(&list, &cp.pki, &["token", "create", "--spiffe-id", "spiffe://example.org/ns/d/sa/x"]);
    assert!(ok && !out.trim().is_empty(), "weft token create via {list}: {err}");

    let dead2 = dead_addr();
    let (ok, _, err) = weft_at(&format!("{dead},{dead2}"), &cp.pki, &["status"]);
    assert!(!ok, "status with no live replica succeeded");
    assert!(
        err.contains("no control-plane replica of --control-plane") && err.contains(&dead) && err.contains(&dead2),
        "{err}"
    );
}

/// A first replica that accepts TCP but never answers (a frozen process:
/// its kernel still accepts) or that is not a control plane's gRPC port (an
/// admin HTTP port) is passed over for the next one; with none answering,
/// every entry is named.
#[tokio::test(flavor = "multi_thread")]
async fn operator_commands_pass_over_a_frozen_or_wrong_replica() {
    let cp = ControlPlane::start(TD, &[]).await;
    let live = cp.addr.to_string();
    // Accepts (the kernel's backlog) and never speaks.
    let frozen = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let frozen_addr = frozen.local_addr().unwrap().to_string();
    let admin = cp.admin.to_string();
    for first in [&frozen_addr, &admin] {
        let list = format!("{first},{live}");
        let (ok, out, err) = weft_at(&list, &cp.pki, &["status"]);
        assert!(ok, "weft status --control-plane {list}: {err}");
        assert!(out.lines().next().unwrap_or_default().starts_with(&format!("control plane {live}: ")), "{out}");
    }
    let dead = dead_addr();
    let (ok, _, err) = weft_at(&format!("{frozen_addr},{dead}"), &cp.pki, &["status"]);
    assert!(!ok, "status with no answering replica succeeded");
    assert!(err.contains(&frozen_addr) && err.contains(&dead) && err.contains("no TLS handshake within"), "{err}");
}

/// `--control-plane` has the list syntax of every weft list flag: an
/// empty item is refused by its position, and so is a repeat, by
/// weft-proxy and by the operator commands alike.
#[test]
fn control_plane_lists_refuse_empty_items_and_repeats() {
    let pki = Pki::new(TD);
    let state = tempfile::tempdir().unwrap();
    let bad = [
        ("127.0.0.1:21111,,127.0.0.1:21121", "item 2 of \"127.0.0.1:21111,,127.0.0.1:21121\" is empty"),
        ("127.0.0.1:21111,", "item 2 of \"127.0.0.1:21111,\" is empty"),
        ("127.0.0.1:21111,127.0.0.1:21121,127.0.0.1:21111", "item 3 of"),
    ];
    for (list, says) in bad {
        let (ok, _, err) = output(
            Command::new(weft_testkit::bin("weft-proxy"))
                .args(["--service", "web", "--app", "127.0.0.1:9", "--control-plane", list, "--trust-bundle"])
                .arg(pki.path().join("trust-bundle.pem"))
                .arg("--state-dir")
                .arg(state.path()),
        );
        assert!(!ok, "weft-proxy accepted --control-plane {list}");
        assert!(err.contains(says), "weft-proxy --control-plane {list}: {err}");
        let (ok, _, err) = weft_at(list, pki.path(), &["status"]);
        assert!(!ok, "weft status accepted --control-plane {list}");
        assert!(err.contains(says), "weft status --control-plane {list}: {err}");
        if says == "item 3 of" {
            assert!(err.contains("repeats \"127.0.0.1:21111\" (item 1)"), "{err}");
        }
    }
}

/// `--advertise-address 0.0.0.0` is refused as a wildcard (it was passed:
/// the message does not ask for it).
#[test]
fn advertise_address_must_be_a_specific_address() {
    let state = tempfile::tempdir().unwrap();
    for wildcard in ["0.0.0.0", "0.0.0.0:15006", "::"] {
        let (ok, _, err) = output(
            Command::new(weft_testkit::bin("weft-proxy"))
                .args(["--service", "web", "--app", "127.0.0.1:9", "--trust-bundle", "/nonexistent"])
                .args(["--inbound", "0.0.0.0:0", "--advertise-address", wildcard])
                .arg("--state-dir")
                .arg(state.path()),
        );
        assert!(!ok, "--advertise-address {wildcard} accepted");
        assert!(err.contains("must be a specific address") && !err.contains("pass --advertise-address"), "{err}");
    }
}

/// A sidecar whose listed replicas are all down at its first start never
/// had a replica: it says each is unreachable, not that one was lost.
#[test]
fn a_replica_never_reached_is_unreachable_not_lost() {
    let pki = Pki::new(TD);
    let state = tempfile::tempdir().unwrap();
    let token = state.path().join("token");
    std::fs::write(&token, "not-a-real-token").unwrap();
    let (dead1, dead2) = (dead_addr(), dead_addr());
    let (ok, out, err) = output(
        Command::new(weft_testkit::bin("weft-proxy"))
            .args(["--service", "web", "--app", "127.0.0.1:9", "--control-plane-wait", "0s"])
            .args(["--inbound", "127.0.0.1:0", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .arg("--control-plane")
            .arg(format!("{dead1},{dead2}"))
            .arg("--trust-bundle")
            .arg(pki.path().join("trust-bundle.pem"))
            .arg("--token-file")
            .arg(&token)
            .arg("--state-dir")
            .arg(state.path().join("state")),
    );
    let log = format!("{out}{err}");
    assert!(!ok, "started with no control plane: {log}");
    assert!(log.contains(&format!("control-plane replica {dead1} unreachable; trying another")), "{log}");
    assert!(log.contains(&format!("control-plane replica {dead2} unreachable; trying another")), "{log}");
    assert!(!log.contains("replica lost"), "{log}");
}

/// A sidecar started with `--calls api` asked for `backend` (a service of
/// the mesh, registered) says backend is outside its --calls, not that the
/// mesh has no such service.
#[tokio::test(flavor = "multi_thread")]
async fn a_service_outside_calls_is_named_as_out_of_view() {
    let cp = ControlPlane::start(TD, &[]).await;
    let backend_app = servers::http("backend").await;
    let _backend = Sidecar::start(&cp, TD, SidecarSpec::new("backend", backend_app.addr)).await;
    let api_app = servers::http("api").await;
    let _api = Sidecar::start(&cp, TD, SidecarSpec::new("api", api_app.addr)).await;
    let web_app = servers::http("web").await;
    let web = Sidecar::start(
        &cp,
        TD,
        SidecarSpec { service: "web", app: web_app.addr, upstreams: &[], labels: &[], extra_args: &["--calls", "api"] },
    )
    .await;
    web.wait_endpoints("api", 1, Duration::from_secs(20)).await;
    let (code, body) = http_get_host(web.outbound, "backend", "/").await.unwrap();
    assert_eq!(code, 404, "{body}");
    assert!(
        body.contains("service \"backend\" is not in this sidecar's view: the sidecar was started with --calls api")
            && body.contains("add backend to its --calls"),
        "{body}"
    );
    // A service in its view still answers.
    let (code, body) = http_get_host(web.outbound, "api", "/").await.unwrap();
    assert_eq!(code, 200, "{body}");
}
