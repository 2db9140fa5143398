//! Control-plane replicas on a real etcd (`--store etcd://...`): join tokens
//! used once across replicas, registrations and the mesh config shared by
//! every replica, and etcd outages that sidecars do not notice. The etcd
//! servers are real processes on loopback (testkit's [`Etcd`]); each test
//! skips with a message when no `etcd` binary is installed.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use tempfile::TempDir;
use weft_proto::admin::v1::{ApplyConfigRequest, GetConfigRequest};
use weft_proto::identity::v1::{AttestRequest, JwtBundleRequest, MintJwtSvidRequest};
use weft_testkit::etcd::Etcd;
use weft_testkit::mesh::{App, TD};
use weft_testkit::{bin, http_get, run, servers, within, ControlPlane, Pki, Sidecar, SidecarSpec};

/// Registration lease TTL for the tests: short, so expiry is seen quickly.
const TTL: &str = "4s";

const SEED: &str = "\
apiVersion: weft.dev/v1alpha1
kind: Mesh
metadata: {name: mesh}
spec: {defaultPolicy: allow}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: seeded-one}
spec: {port: 8080, protocol: http}
";

fn with_marker(marker: &str) -> String {
    format!(
        "{SEED}---\napiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {{name: {marker}}}\nspec: {{port: 8080, protocol: http}}\n"
    )
}

/// Every field error of this file is one `weft validate` names.
const INVALID: &str = "\
apiVersion: weft.dev/v1alpha1
kind: HTTPRoute
metadata: {name: broken}
spec:
  parentRefs: [{name: nowhere}]
  rules:
    - backendRefs: [{name: nowhere, weight: -3}]
";

/// [`SEED`] in a file of a new temporary directory (kept alive by the
/// caller), and its path as a `--config` argument.
fn seed_file() -> (TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mesh.yaml");
    std::fs::write(&file, SEED).unwrap();
    let arg = file.display().to_string();
    (dir, arg)
}

/// `n` replicas on one PKI and `etcd`, each with its own state dir
/// (`--registration-ttl` [`TTL`] unless `extra` sets it).
async fn replicas(pki: &Pki, etcd: &Etcd, n: usize, extra: &[&str]) -> (Vec<TempDir>, Vec<ControlPlane>) {
    let url = etcd.url();
    let mut dirs = Vec::new();
    let mut cps = Vec::new();
    for _ in 0..n {
        let state = tempfile::tempdir().expect("tempdir");
        let mut args = vec!["--store", url.as_str()];
        if !extra.contains(&"--registration-ttl") {
            args.extend(["--registration-ttl", TTL]);
        }
        args.extend_from_slice(extra);
        cps.push(ControlPlane::start_on(pki, state.path(), &args).await);
        dirs.push(state);
    }
    (dirs, cps)
}

/// `api` registered at `api_cp` and `web` at `web_cp` calling it (an
/// `--upstream`), with their apps (kept alive in `_apps`); returned once
/// web's discovery lists api.
struct Pair {
    api: Sidecar,
    web: Sidecar,
    _apps: (servers::Server, servers::Server),
}

async fn pair(api_cp: &ControlPlane, web_cp: &ControlPlane) -> Pair {
    let api_app = servers::http("api").await;
    let api = Sidecar::start(api_cp, TD, SidecarSpec::new("api", api_app.addr)).await;
    let web_app = servers::http("web").await;
    let web = Sidecar::start(
        web_cp,
        TD,
        SidecarSpec { service: "web", app: web_app.addr, upstreams: &["api"], labels: &[], extra_args: &[] },
    )
    .await;
    web.wait_endpoints("api", 1, Duration::from_secs(20)).await;
    Pair { api, web, _apps: (api_app, web_app) }
}

fn weft(cp: &ControlPlane, args: &[&str]) -> weft_testkit::Output {
    cp.weft(args)
}

/// Waits until the sidecar's applied config (its /config) contains `needle`.
async fn wait_config_has(s: &Sidecar, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let (_, body) = http_get(s.admin, "/config").await.unwrap_or_default();
        if body.contains(needle) {
            return;
        }
        assert!(Instant::now() < deadline, "sidecar {} never applied {needle:?}; /config:\n{body}", s.service);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_ready(cp: &ControlPlane, want: u16, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let (code, body) = http_get(cp.admin, "/ready").await.unwrap_or((0, String::new()));
        if code == want {
            return body;
        }
        assert!(Instant::now() < deadline, "/ready stayed {code} ({body}), want {want}; log:\n{}", cp.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `/ready/writes` answers `want`; its body.
async fn wait_writes(cp: &ControlPlane, want: u16, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let (code, body) = http_get(cp.admin, "/ready/writes").await.unwrap_or((0, String::new()));
        if code == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/ready/writes stayed {code} ({body}), want {want}; log:\n{}",
            cp.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `weft status --json` through `cp`, parsed.
fn status_json(cp: &ControlPlane) -> serde_json::Value {
    let out = weft(cp, &["status", "--json"]);
    assert!(out.status.success(), "weft status: {}", out.stderr);
    serde_json::from_str(&out.stdout).expect("status JSON")
}

/// A seed whose route sends `api` traffic to `api`: a replica that knew
/// only its own sidecars would warn that `api` has no endpoints.
fn routed_seed() -> String {
    format!(
        "{SEED}---\napiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {{name: api}}\nspec: {{port: 8080, protocol: http}}\n\
         ---\napiVersion: weft.dev/v1alpha1\nkind: HTTPRoute\nmetadata: {{name: api-route}}\n\
         spec:\n  parentRefs: [{{name: api}}]\n  rules:\n    - backendRefs: [{{name: api}}]\n"
    )
}

/// Whatever replica is asked: `weft status` lists every replica and every
/// sidecar (other replicas' from etcd) without a false "no endpoints"
/// warning; an applied config reaches sidecars on both replicas with the
/// same config revision; a JWT-SVID minted through one replica verifies
/// with the JWT bundle of the other.
#[tokio::test(flavor = "multi_thread")]
async fn replicas_agree_on_status_config_revision_and_jwt_keys() {
    let Some(etcd) = Etcd::start(1).await else { return };
    let pki = Pki::new(TD);
    let seed = tempfile::tempdir().unwrap();
    let seed_file = seed.path().join("mesh.yaml");
    std::fs::write(&seed_file, routed_seed()).unwrap();
    let seed_arg = seed_file.display().to_string();
    let (_dirs, cps) = replicas(&pki, &etcd, 2, &["--config", &seed_arg]).await;
    let Pair { api, web, _apps } = pair(&cps[1], &cps[0]).await;

    let deadline = Instant::now() + Duration::from_secs(20);
    while cps.iter().any(|cp| status_json(cp)["sidecars"].as_array().map_or(0, Vec::len) < 2) {
        assert!(Instant::now() < deadline, "status never listed both sidecars: {}", status_json(&cps[0]));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ids: Vec<String> = cps.iter().map(|cp| status_json(cp)["replica"].as_str().unwrap().to_string()).collect();
    assert_ne!(ids[0], ids[1]);
    for (i, (cp, own)) in cps.iter().zip(["web", "api"]).enumerate() {
        let st = status_json(cp);
        assert_eq!(st["warnings"], serde_json::json!([]), "no false warnings through replica {i}: {st}");
        let mut listed: Vec<String> = st["replicas"].as_array().unwrap().iter().map(|r| r["id"].to_string()).collect();
        listed.sort();
        let mut want: Vec<String> = ids.iter().map(|id| format!("{id:?}")).collect();
        want.sort();
        assert_eq!(listed, want, "{st}");
        for s in st["sidecars"].as_array().unwrap() {
            let local = s["service"] == own;
            assert_eq!(s["remote"], !local, "{s}");
            assert_eq!(s["replica"], ids[if local { i } else { 1 - i }].as_str(), "{s}");
        }
        let table = weft(cp, &["status"]);
        assert!(table.stdout.contains(&format!("on replica {}", ids[1 - i])), "{}", table.stdout);
        assert!(!table.stdout.contains("no endpoints"), "{}", table.stdout);
    }

    // One config revision, on both replicas and in both sidecars' snapshots.
    let dir = tempfile::tempdir().unwrap();
    let v2 = dir.path().join("v2.yaml");
    std::fs::write(&v2, routed_seed() + "---\napiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: rev-marker}\nspec: {port: 8080, protocol: http}\n").unwrap();
    let out = weft(&cps[1], &["apply", "-f", &v2.display().to_string()]);
    assert!(out.status.success(), "weft apply: {}", out.stderr);
    let revision: i64 = out.stdout.trim().rsplit(' ').next().and_then(|r| r.parse().ok()).expect("revision printed");
    for s in [&web, &api] {
        wait_config_has(s, &format!("\"config_revision\": {revision}"), Duration::from_secs(15)).await;
    }
    for cp in &cps {
        assert_eq!(status_json(cp)["config_revision"], revision);
    }

    // A JWT-SVID minted through replica 1 verifies with replica 2's bundle.
    let id = cps[0].id("/ns/default/sa/jwt-user");
    let token = cps[0].create_token(&id, 60).await;
    let (svid, _) = cps[0].attest(&token).await.expect("attest");
    let minted =
        within(cps[0].identity_as(&svid).mint_jwt_svid(MintJwtSvidRequest { audience: vec!["orders".into()] }))
            .await
            .expect("mint")
            .into_inner();
    let jwks =
        within(cps[1].identity_as(&svid).jwt_bundle(JwtBundleRequest {})).await.expect("bundle").into_inner().jwks;
    let bundle = weft_certs::jwt::JwtBundle::parse(cps[1].trust_domain(), &jwks).expect("JWKS");
    let valid = bundle.validate(&minted.token, "orders", std::time::SystemTime::now());
    assert!(valid.is_ok(), "a JWT-SVID from replica 1 fails with replica 2's bundle: {valid:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_join_token_works_exactly_once_across_replicas() {
    let Some(etcd) = Etcd::start(1).await else { return };
    let pki = Pki::new(TD);
    let (_dirs, cps) = replicas(&pki, &etcd, 3, &[]).await;
    let id = cps[0].id("/ns/default/sa/web");

    let token = cps[0].create_token(&id, 600).await;
    let (svid, _) = cps[1].attest(&token).await.expect("first use, through replica 2");
    assert_eq!(svid.spiffe_id, id);
    let refused = cps[2].attest(&token).await.expect_err("second use, through replica 3");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("already used"), "{refused:?}");

    // 50 attempts at once, spread over the replicas: one SVID.
    let token = cps[0].create_token(&id, 600).await;
    let clients: Vec<_> = cps.iter().map(|cp| cp.identity()).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50 {
        let mut client = clients[i % clients.len()].clone();
        let token = token.clone();
        tasks.spawn(async move {
            let (csr, _) = weft_certs::ca::make_csr().expect("csr");
            within(client.attest(AttestRequest { join_token: token, csr })).await
        });
    }
    let (mut ok, mut used) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        match r.expect("task") {
            Ok(_) => ok += 1,
            Err(s) if s.code() == tonic::Code::PermissionDenied => used += 1,
            Err(s) => panic!("neither an SVID nor 'already used': {s:?}"),
        }
    }
    assert_eq!((ok, used), (1, 49), "exactly one SVID for one token");
}

#[tokio::test(flavor = "multi_thread")]
async fn registrations_and_applied_config_reach_sidecars_on_every_replica() {
    let Some(etcd) = Etcd::start(1).await else { return };
    let pki = Pki::new(TD);
    let (_seed, seed_arg) = seed_file();
    // Replica 1 seeds the empty store from --config; replica 2 reads it.
    let (_d1, mut cp1) = replicas(&pki, &etcd, 1, &["--config", &seed_arg]).await;
    let (_d2, mut cp2) = replicas(&pki, &etcd, 1, &[]).await;
    let (cp1, cp2) = (cp1.remove(0), cp2.remove(0));

    let Pair { api, web, _apps } = pair(&cp2, &cp1).await;
    // The api sidecar registered with replica 2; the web sidecar's replica 1 knows it.
    web.wait_endpoints("api", 1, Duration::from_secs(20)).await;
    let reply = App::of(&web).get("api", "/across").await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "api /across"));
    wait_config_has(&web, "seeded-one", Duration::from_secs(10)).await;
    wait_config_has(&api, "seeded-one", Duration::from_secs(10)).await;

    // Applied through replica 2, served by both.
    let dir = tempfile::tempdir().unwrap();
    let v2 = dir.path().join("v2.yaml");
    std::fs::write(&v2, with_marker("marker-two")).unwrap();
    let out = weft(&cp2, &["apply", "-f", &v2.display().to_string()]);
    assert!(out.status.success(), "weft apply: {}", out.stderr);
    assert!(out.stdout.contains("applied, revision"), "{}", out.stdout);
    wait_config_has(&web, "marker-two", Duration::from_secs(10)).await;
    wait_config_has(&api, "marker-two", Duration::from_secs(10)).await;
    let got = weft(&cp1, &["get", "config"]);
    assert!(got.status.success(), "{}", got.stderr);
    assert!(got.stdout.starts_with("# revision: ") && got.stdout.contains("marker-two"), "{}", got.stdout);

    // An invalid config: the same field-level errors as `weft validate`, nothing changes.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, INVALID).unwrap();
    let validate = run(Command::new(bin("weft")).arg("validate").arg(&bad));
    assert!(!validate.status.success());
    let applied = weft(&cp1, &["apply", "-f", &bad.display().to_string()]);
    assert!(!applied.status.success());
    assert_eq!(applied.stderr, validate.stderr, "weft apply reports what weft validate reports");
    // Sent straight to a replica (no client-side check): refused with the same errors.
    let errors = weft_config::parse(INVALID).expect_err("invalid").to_string();
    assert!(validate.stderr.contains(&errors), "{}", validate.stderr);
    let mut admin = cp2.admin_as(Some(&cp2.operator()));
    let status = within(admin.apply_config(ApplyConfigRequest { yaml: INVALID.into(), if_revision: 0 }))
        .await
        .expect_err("invalid config refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), errors);
    let after = weft(&cp2, &["get", "config"]);
    assert_eq!(after.stdout, got.stdout, "the stored config did not change");
    let stored = within(admin.get_config(GetConfigRequest {})).await.unwrap().into_inner();
    assert!(stored.yaml.contains("marker-two"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    wait_config_has(&web, "marker-two", Duration::from_secs(1)).await;

    // A stale --if-revision loses.
    let v3 = dir.path().join("v3.yaml");
    std::fs::write(&v3, with_marker("marker-three")).unwrap();
    let stale = weft(&cp1, &["apply", "-f", &v3.display().to_string(), "--if-revision", "1"]);
    assert!(!stale.status.success() && stale.stderr.contains("weft get config"), "{}", stale.stderr);
}

/// The replica a sidecar was connected to dies: its registration stays for
/// the lease's TTL (time to reconnect elsewhere), then goes.
#[tokio::test(flavor = "multi_thread")]
async fn a_sidecar_of_a_dead_replica_stays_for_the_lease_then_goes() {
    let Some(etcd) = Etcd::start(1).await else { return };
    let pki = Pki::new(TD);
    let (_dirs, mut cps) = replicas(&pki, &etcd, 2, &[]).await;
    let Pair { api, web, _apps } = pair(&cps[1], &cps[0]).await;
    cps[1].stop();
    let killed = Instant::now();
    // Within the grace the endpoint stays and serves.
    tokio::time::sleep(Duration::from_secs(1)).await;
    web.wait_endpoints("api", 1, Duration::from_millis(100)).await;
    assert_eq!(App::of(&web).get("api", "/grace").await.status, 200);
    // The api sidecar only knows the dead replica: gone once the lease runs out.
    web.wait_endpoints("api", 0, Duration::from_secs(30)).await;
    assert!(killed.elapsed() >= Duration::from_secs(3), "removed before the lease TTL: {:?}", killed.elapsed());
    drop(api);
}

/// Continuous requests web → api while etcd loses a member, then all of
/// them: no request fails, replicas say they are not ready for writes and
/// why, and catch up when etcd returns.
#[tokio::test(flavor = "multi_thread")]
async fn etcd_outages_go_unnoticed_by_sidecars_and_replicas_catch_up() {
    let Some(mut etcd) = Etcd::start(3).await else { return };
    let pki = Pki::new(TD);
    let (_seed, seed_arg) = seed_file();
    let (_dirs, cps) = replicas(&pki, &etcd, 2, &["--config", &seed_arg]).await;
    let Pair { api, web, _apps } = pair(&cps[1], &cps[0]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (app, stop, ok, failed) = (App::of(&web), stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let mut first_failure = None;
            while !stop.load(Ordering::Relaxed) {
                match app.send(Method::GET, "api", "/load", &[]).await {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        first_failure.get_or_insert(format!("{other:?}"));
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            first_failure
        })
    };

    // One member of three stops: writes still work through both replicas.
    etcd.stop(0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for cp in &cps {
        let id = cp.id("/ns/default/sa/during-member-loss");
        let token = cp.create_token(&id, 60).await;
        cp.attest(&token).await.expect("attest with one etcd member down");
    }
    etcd.restart(0);
    etcd.wait_healthy(0).await;

    // All of etcd stops for a while. The replicas keep serving sidecars, so
    // /ready stays 200 (they stay in their Kubernetes Service); writes are
    // what they cannot do, and /ready/writes says why.
    etcd.stop_all();
    let why = wait_writes(&cps[0], 503, Duration::from_secs(30)).await;
    assert!(why.contains("unreachable") && why.contains("etcd://"), "{why}");
    wait_writes(&cps[1], 503, Duration::from_secs(30)).await;
    for cp in &cps {
        assert_eq!(http_get(cp.admin, "/ready").await.map(|r| r.0).ok(), Some(200), "/ready during the outage");
    }
    assert!(cps[0].metrics().await.contains("weft_control_plane_store_up 0"));
    // A read is answered from the replica's own copy, said to be possibly stale.
    let got = weft(&cps[0], &["get", "config"]);
    assert!(got.status.success(), "weft get config during the outage: {}", got.stderr);
    assert!(got.stdout.contains("seeded-one") && got.stdout.contains("may be stale"), "{}", got.stdout);
    assert!(got.stderr.contains("warning:") && got.stderr.contains("unreachable"), "{}", got.stderr);
    // A write is refused, saying it is the store that is away.
    let dir = tempfile::tempdir().unwrap();
    let during = dir.path().join("during.yaml");
    std::fs::write(&during, with_marker("during-outage")).unwrap();
    let refused_apply = weft(&cps[1], &["apply", "-f", &during.display().to_string()]);
    assert!(!refused_apply.status.success());
    assert!(refused_apply.stderr.contains("cannot do that now: store etcd://"), "{}", refused_apply.stderr);
    let status = weft(&cps[0], &["status"]);
    assert!(status.status.success(), "{}", status.stderr);
    assert!(status.stdout.contains("UNREACHABLE"), "{}", status.stdout);
    let refused = within(cps[0].admin_as(Some(&cps[0].operator())).create_join_token(
        weft_proto::admin::v1::CreateJoinTokenRequest {
            spiffe_id: cps[0].id("/ns/default/sa/x").to_string(),
            ttl_seconds: 60,
        },
    ))
    .await
    .expect_err("no token without the store");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    // The operator is told it is the store, not the control plane, that is away.
    let cli = weft(&cps[0], &["token", "create", "--spiffe-id", &cps[0].id("/ns/default/sa/x").to_string()]);
    assert!(!cli.status.success());
    assert!(
        cli.stderr.contains("cannot do that now: store etcd://") && !cli.stderr.contains("not answering"),
        "{}",
        cli.stderr
    );
    // Longer than the registration TTL: nothing in memory is dropped.
    tokio::time::sleep(Duration::from_secs(6)).await;
    web.wait_endpoints("api", 1, Duration::from_millis(100)).await;

    etcd.start_all().await;
    for cp in &cps {
        wait_writes(cp, 200, Duration::from_secs(30)).await;
        wait_ready(cp, 200, Duration::from_secs(1)).await;
        assert!(cp.metrics().await.contains("weft_control_plane_store_up 1"));
    }
    let after = dir.path().join("after.yaml");
    std::fs::write(&after, with_marker("after-outage")).unwrap();
    let out = weft(&cps[1], &["apply", "-f", &after.display().to_string()]);
    assert!(out.status.success(), "weft apply after the outage: {}", out.stderr);
    wait_config_has(&web, "after-outage", Duration::from_secs(15)).await;
    wait_config_has(&api, "after-outage", Duration::from_secs(15)).await;
    // Registrations were written again: still one api endpoint after a TTL.
    tokio::time::sleep(Duration::from_secs(5)).await;
    web.wait_endpoints("api", 1, Duration::from_millis(100)).await;

    stop.store(true, Ordering::Relaxed);
    let first_failure = load.await.unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} failed requests of {}; first: {first_failure:?}", ok + failed);
    assert!(ok > 100, "only {ok} requests went through");
}

/// A sidecar given several control-plane addresses (`--control-plane a,b`)
/// moves to the other replica when its replica is killed, while requests flow
/// and short SVIDs renew.
#[tokio::test(flavor = "multi_thread")]
async fn sidecars_fail_over_when_their_replica_is_killed() {
    let Some(etcd) = Etcd::start(1).await else { return };
    let pki = Pki::new(TD);
    let (_dirs, mut cps) = replicas(&pki, &etcd, 2, &["--svid-ttl", "6s"]).await;
    let both = format!("{},{}", cps[0].addr, cps[1].addr);
    let Pair { api, web, _apps } = pair(&cps[0], &cps[0]).await;
    // Sidecar::start names one replica; restart both with the list (the SVID is in their state dirs).
    let mut sidecars = [api, web];
    for s in &mut sidecars {
        restart_with_control_planes(s, &both, &cps[0]).await;
    }
    let [api, web] = sidecars;
    web.wait_endpoints("api", 1, Duration::from_secs(20)).await;
    let app = App::of(&web);
    cps[0].stop();
    let until = Instant::now() + Duration::from_secs(20);
    let (mut ok, mut failed) = (0, 0);
    while Instant::now() < until {
        match app.send(Method::GET, "api", "/failover", &[]).await {
            Ok(r) if r.status == 200 => ok += 1,
            _ => failed += 1,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(failed, 0, "{failed} of {} failed across the replica's death and SVID renewals", ok + failed);
    // Both re-registered with the surviving replica.
    let status = weft(&cps[1], &["status", "--json"]);
    assert!(
        status.stdout.contains("\"service\":\"api\"") && status.stdout.contains("\"service\":\"web\""),
        "{}",
        status.stdout
    );
    drop(api);
}

/// Restarts sidecar `s` (SIGKILL) with `--control-plane list`; its SVID is
/// in its state dir. Its log goes to `cp`'s dir.
async fn restart_with_control_planes(s: &mut Sidecar, list: &str, cp: &ControlPlane) {
    s.proc_.kill();
    let mut args = s.args.clone();
    let at = args.iter().position(|a| a == "--control-plane").unwrap() + 1;
    args[at] = list.to_string();
    s.proc_ = weft_testkit::Proc::spawn(&format!("{}-failover", s.service), &bin("weft-proxy"), &args, cp.dir.path());
    weft_testkit::wait_ok(s.admin, "/ready", Duration::from_secs(20), Some(&s.proc_)).await;
}

/// The sidecars `weft status --json` through `cp` lists for `service`.
fn status_of(cp: &ControlPlane, service: &str) -> (serde_json::Value, Vec<serde_json::Value>) {
    let st = status_json(cp);
    let found = st["sidecars"].as_array().unwrap().iter().filter(|s| s["service"] == service).cloned().collect();
    (st, found)
}

/// Polls `weft status --json` through `cp` until `ok` holds for the one
/// sidecar of `service` listed; that sidecar.
async fn wait_status(
    cp: &ControlPlane,
    service: &str,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&serde_json::Value, &serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (st, found) = status_of(cp, service);
        if let [one] = found.as_slice() {
            if ok(&st, one) {
                return one.clone();
            }
        }
        assert!(Instant::now() < deadline, "{what}: weft status never showed it; last:\n{st:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The ack records (`/weft/acks/<replica>`) in etcd, by replica ID.
async fn ack_records(etcd: &Etcd) -> Vec<String> {
    let endpoints = vec![etcd.client_addr(0).to_string()];
    let client = weft_control_plane::store::etcd::Etcd::connect(&endpoints, &Default::default()).expect("etcd client");
    let (kvs, _) = client.get_prefix(weft_control_plane::replicas::ACKS).await.expect("read /weft/acks/");
    kvs.iter()
        .map(|kv| String::from_utf8_lossy(&kv.key[weft_control_plane::replicas::ACKS.len()..]).into_owned())
        .collect()
}

/// `weft status` through either replica shows a sidecar held by the other
/// in sync (its acked version, in its replica's versions, and the config
/// revision), also after a config change; when that replica is killed, the
/// sidecar moves and shows in sync as the asked replica's own at once, and
/// the dead replica's ack record leaves etcd with its lease.
#[tokio::test(flavor = "multi_thread")]
async fn status_through_any_replica_shows_every_sidecars_acks() {
    let Some(etcd) = Etcd::start(1).await else { return };
    let pki = Pki::new(TD);
    let (_seed, seed_arg) = seed_file();
    let (_dirs, mut cps) = replicas(&pki, &etcd, 2, &["--config", &seed_arg]).await;
    let api_app = servers::http("api").await;
    let mut api = Sidecar::start(&cps[1], TD, SidecarSpec::new("api", api_app.addr)).await;
    // Given both replicas (to move when its own dies), it starts on either.
    restart_with_control_planes(&mut api, &format!("{},{}", cps[1].addr, cps[0].addr), &cps[1]).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    // Held by `held`, asked through `asked`: listed once by each, as its own by one.
    let (held, asked) = loop {
        let local = |i: usize| status_of(&cps[i], "api").1.iter().map(|s| s["remote"] == false).collect::<Vec<_>>();
        let (zero, one) = (local(0), local(1));
        if zero.len() == 1 && one.len() == 1 && zero[0] != one[0] {
            break if zero[0] { (0, 1) } else { (1, 0) };
        }
        assert!(Instant::now() < deadline, "no replica holds the api sidecar: {}", status_json(&cps[0]));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let held_id = status_json(&cps[held])["replica"].as_str().unwrap().to_string();
    let asked_id = status_json(&cps[asked])["replica"].as_str().unwrap().to_string();

    let in_sync = |st: &serde_json::Value, s: &serde_json::Value| {
        s["remote"] == true
            && s["in_sync"] == true
            && s["acked_version"].as_u64().unwrap_or(0) > 0
            && s["acked_version"] == s["replica_config_version"]
            && s["replica_config_revision"] == st["config_revision"]
    };
    let s =
        wait_status(&cps[asked], "api", "the other replica's sidecar in sync", Duration::from_secs(60), in_sync).await;
    assert_eq!(s["replica"], held_id.as_str(), "{s}");
    let table = weft(&cps[asked], &["status"]);
    let line = table.stdout.lines().find(|l| l.contains("/sa/api")).unwrap_or_default().to_string();
    assert!(line.contains(&format!("in sync, on replica {held_id}")), "{}", table.stdout);

    // A config applied through the asked replica: the sidecar on the other acks it, and status shows that.
    let dir = tempfile::tempdir().unwrap();
    let v2 = dir.path().join("v2.yaml");
    std::fs::write(&v2, with_marker("acks-marker")).unwrap();
    let out = weft(&cps[asked], &["apply", "-f", &v2.display().to_string()]);
    assert!(out.status.success(), "weft apply: {}", out.stderr);
    let revision: i64 = out.stdout.trim().rsplit(' ').next().and_then(|r| r.parse().ok()).expect("revision printed");
    wait_config_has(&api, "acks-marker", Duration::from_secs(60)).await;
    let s = wait_status(&cps[asked], "api", "in sync at the new revision", Duration::from_secs(60), |st, s| {
        in_sync(st, s) && s["replica_config_revision"] == revision
    })
    .await;
    assert_eq!(s["replica"], held_id.as_str(), "{s}");
    let mut records = ack_records(&etcd).await;
    records.sort();
    let mut both_ids = vec![held_id.clone(), asked_id.clone()];
    both_ids.sort();
    assert_eq!(records, both_ids, "one ack record per replica");

    // Its replica dies: it moves to the asked one, which lists it as its own, in sync.
    cps[held].stop();
    let s = wait_status(&cps[asked], "api", "the moved sidecar in sync", Duration::from_secs(60), |_, s| {
        s["remote"] == false && s["in_sync"] == true
    })
    .await;
    assert_eq!(s["replica"], asked_id.as_str(), "{s}");
    // The dead replica's record leaves with its lease (TTL 4 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    while ack_records(&etcd).await.contains(&held_id) {
        assert!(Instant::now() < deadline, "the dead replica's ack record outlived its lease");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(ack_records(&etcd).await, [asked_id.as_str()]);
    // The asked replica hears of it through its watch.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = status_json(&cps[asked]);
        if st["replicas"].as_array().map(Vec::len) == Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "the dead replica is still listed: {st:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(api);
}

/// Needs no etcd: a `--store` that is neither form is a start-up error
/// saying what is expected, and a file-store control plane refuses
/// `weft apply` / `weft get config` saying why.
#[tokio::test(flavor = "multi_thread")]
async fn bad_store_urls_and_file_store_apply_are_refused_clearly() {
    for (store, expect) in [
        ("http://127.0.0.1:2379", "expected `file` or `etcd://host:port[,host:port...]`"),
        ("etcd://127.0.0.1", "\"127.0.0.1\" is not host:port"),
        ("etcd://127.0.0.1:99999", "\"127.0.0.1:99999\" has a port out of range: a port is 1-65535"),
    ] {
        let out = run(Command::new(bin("weft-control-plane")).args(["--store", store]));
        assert!(!out.status.success());
        assert!(out.stderr.contains(expect), "--store {store}: {}", out.stderr);
        // clap names the value; the message does not repeat it.
        assert_eq!(out.stderr.matches(store).count(), 1, "--store {store}: {}", out.stderr);
    }
    let cp = ControlPlane::start(TD, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mesh.yaml");
    std::fs::write(&file, SEED).unwrap();
    let out = weft(&cp, &["apply", "-f", &file.display().to_string()]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("--store file") && out.stderr.contains("--config file"), "{}", out.stderr);
    let out = weft(&cp, &["get", "config"]);
    assert!(!out.status.success() && out.stderr.contains("--store etcd://"), "{}", out.stderr);
}

/// A CA and two certificates it signs, in `dir`: `server.crt`/`.key`
/// (127.0.0.1) and `client.crt`/`.key`, with `ca.crt`.
fn ca_and_leaf(dir: &std::path::Path) -> weft_testkit::etcd::ServerTls {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let leaf = |sans: Vec<String>, usage: ExtendedKeyUsagePurpose, name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(sans).unwrap();
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &issuer).unwrap();
        (write(&format!("{name}.crt"), cert.pem()), write(&format!("{name}.key"), key.serialize_pem()))
    };
    let (server_cert, server_key) = leaf(vec!["127.0.0.1".into()], ExtendedKeyUsagePurpose::ServerAuth, "server");
    leaf(vec!["weft-control-plane".into()], ExtendedKeyUsagePurpose::ClientAuth, "client");
    weft_testkit::etcd::ServerTls { cert: server_cert, key: server_key, client_ca: write("ca.crt", ca_cert.pem()) }
}

/// etcd with TLS and client-certificate auth: a replica with --store-ca,
/// --store-cert and --store-key stores and serves; one without a client
/// certificate is not ready and says why.
#[tokio::test(flavor = "multi_thread")]
async fn etcd_over_tls_with_client_certificates() {
    let certs = tempfile::tempdir().unwrap();
    let tls = ca_and_leaf(certs.path());
    let Some(etcd) = Etcd::start_tls(1, tls.clone()).await else { return };
    let pki = Pki::new(TD);
    let file = |n: &str| certs.path().join(n).display().to_string();
    let (ca, cert, key) = (file("ca.crt"), file("client.crt"), file("client.key"));
    let (_dirs, cps) = replicas(&pki, &etcd, 1, &["--store-ca", &ca, "--store-cert", &cert, "--store-key", &key]).await;
    let id = cps[0].id("/ns/default/sa/tls");
    let token = cps[0].create_token(&id, 60).await;
    cps[0].attest(&token).await.expect("token stored in and consumed from etcd over TLS");

    // No client certificate: etcd refuses the handshake; the replica says so.
    let state = tempfile::tempdir().unwrap();
    let url = etcd.url();
    let admin = weft_testkit::free_addr();
    let admin_arg = admin.to_string();
    let cp = spawn_cp("cp-no-client-cert", &pki, state.path(), &admin_arg, &["--store", &url, "--store-ca", &ca]);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Ok((503, why)) = http_get(admin, "/ready").await {
            assert!(why.contains("unreachable") && why.contains("etcd://"), "{why}");
            break;
        }
        assert!(Instant::now() < deadline, "never said why it is not ready; log:\n{}", cp.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A replica started while etcd is down has not read the stored mesh
/// config: it must send no config at all rather than an empty one, so a
/// sidecar that moves to it keeps its routes and policies; once etcd is
/// back the replica serves the stored config.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_has_not_read_the_stored_config_pushes_none() {
    let Some(mut etcd) = Etcd::start(1).await else { return };
    let pki = Pki::new(TD);
    let seed_dir = tempfile::tempdir().unwrap();
    let seed = seed_dir.path().join("mesh.yaml");
    std::fs::write(&seed, with_marker("kept-one")).unwrap();
    let (_dirs, mut cps) = replicas(&pki, &etcd, 2, &["--config", seed.to_str().unwrap()]).await;
    let both = format!("{},{}", cps[0].addr, cps[1].addr);
    let web_app = servers::http("web").await;
    let web = Sidecar::start(
        &cps[0],
        TD,
        SidecarSpec { extra_args: &["--control-plane", both.as_str()], ..SidecarSpec::new("web", web_app.addr) },
    )
    .await;
    wait_config_has(&web, "kept-one", Duration::from_secs(20)).await;

    etcd.stop_all();
    cps[1].restart_unready().await;
    cps[0].stop();
    // The sidecar registers at the restarted replica, which has no config to give it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, metrics) = http_get(cps[1].admin, "/metrics").await.unwrap_or_default();
        if weft_testkit::metric_sum(&metrics, "weft_control_plane_sidecars_connected", &[]) >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the sidecar never moved to the restarted replica:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, applied) = http_get(web.admin, "/config").await.unwrap();
    assert!(applied.contains("kept-one"), "the sidecar lost its config to a replica that never read it:\n{applied}");

    etcd.start_all().await;
    wait_ready(&cps[1], 200, Duration::from_secs(30)).await;
    wait_config_has(&web, "kept-one", Duration::from_secs(20)).await;
}

/// `weft apply` says what `weft validate` would warn about (a policy naming
/// another trust domain) and that an empty file removes everything, then
/// applies; a missing file gets validate's message.
#[tokio::test(flavor = "multi_thread")]
async fn apply_prints_the_warnings_validate_gives() {
    let Some(etcd) = Etcd::start(1).await else { return };
    let pki = Pki::new(TD);
    let (_dirs, cps) = replicas(&pki, &etcd, 1, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let foreign = dir.path().join("foreign.yaml");
    std::fs::write(
        &foreign,
        format!(
            "{SEED}---\napiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: callers}}\n\
             spec:\n  targetRef: {{name: seeded-one}}\n  action: ALLOW\n  rules:\n    - from:\n        - identities: \
             [\"spiffe://example.com/ns/default/sa/web\"]\n"
        ),
    )
    .unwrap();
    let out = weft(&cps[0], &["apply", "-f", foreign.to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stderr.contains("warning:") && out.stderr.contains("\"example.com\""),
        "no trust-domain warning: {}",
        out.stderr
    );

    let empty = dir.path().join("empty.yaml");
    std::fs::write(&empty, "").unwrap();
    // Refused without --allow-empty (see empty_applies_are_refused_...); with it, warned.
    let out = weft(&cps[0], &["apply", "-f", empty.to_str().unwrap(), "--allow-empty"]);
    assert!(out.stderr.contains("removes every one the mesh has"), "{}", out.stderr);

    let missing = dir.path().join("missing.yaml");
    let applied = weft(&cps[0], &["apply", "-f", missing.to_str().unwrap()]);
    let validated = run(Command::new(bin("weft")).args(["validate", missing.to_str().unwrap()]));
    assert!(!applied.status.success() && applied.stderr.contains("cannot read config file"), "{}", applied.stderr);
    assert_eq!(applied.stderr, validated.stderr);
}

/// Continuous requests web → api until `stop`; (ok, failed, first failure).
fn load(app: App, host: &'static str, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u64, u64, Option<String>)> {
    tokio::spawn(async move {
        let (mut ok, mut failed, mut first) = (0, 0, None);
        while !stop.load(Ordering::Relaxed) {
            match app.send(Method::GET, host, "/load", &[]).await {
                Ok(r) if r.status == 200 => ok += 1,
                other => {
                    first.get_or_insert(format!("{other:?}"));
                    failed += 1
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (ok, failed, first)
    })
}

/// How many endpoints of `service` a sidecar's /config dump lists.
fn endpoints_in(config_json: &str, service: &str) -> usize {
    let key = format!("\"{service}\": [");
    let Some(start) = config_json.find(&key) else { return 0 };
    let rest = &config_json[start + key.len()..];
    rest[..rest.find(']').unwrap_or(rest.len())].matches("\"address\"").count()
}

/// A paused etcd (SIGSTOP, longer than the registration TTL) expires every
/// lease when it resumes, deleting the registrations of replica 2 before
/// replica 2 could renew them. Replica 1 holds those removals for the
/// recovery grace: requests from its sidecar to replica 2's never fail,
/// while a sidecar really killed during the outage disappears after it.
#[tokio::test(flavor = "multi_thread")]
async fn registrations_survive_an_etcd_pause_longer_than_their_lease() {
    let Some(mut etcd) = Etcd::start(3).await else { return };
    let pki = Pki::new(TD);
    let (_dirs, cps) = replicas(&pki, &etcd, 2, &["--registration-ttl", "3s"]).await;
    let api_app = servers::http("api").await;
    let api = Sidecar::start(&cps[1], TD, SidecarSpec::new("api", api_app.addr)).await;
    let doomed_app = servers::http("doomed").await;
    let mut doomed = Sidecar::start(&cps[1], TD, SidecarSpec::new("doomed", doomed_app.addr)).await;
    let web_app = servers::http("web").await;
    let web = Sidecar::start(
        &cps[0],
        TD,
        SidecarSpec { service: "web", app: web_app.addr, upstreams: &["api", "doomed"], labels: &[], extra_args: &[] },
    )
    .await;
    web.wait_endpoints("api", 1, Duration::from_secs(20)).await;
    web.wait_endpoints("doomed", 1, Duration::from_secs(20)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = load(App::of(&web), "api", stop.clone());
    // The lowest number of api endpoints web's discovery ever showed.
    let lowest = {
        let (admin, stop) = (web.admin, stop.clone());
        tokio::spawn(async move {
            let mut lowest = usize::MAX;
            while !stop.load(Ordering::Relaxed) {
                let (_, body) = http_get(admin, "/config").await.unwrap_or_default();
                if !body.is_empty() {
                    lowest = lowest.min(endpoints_in(&body, "api"));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            lowest
        })
    };
    etcd.pause_all();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Really gone during the outage: its replica cannot tell etcd.
    doomed.proc_.kill();
    tokio::time::sleep(Duration::from_secs(5)).await;
    etcd.resume_all();
    let resumed = Instant::now();
    // The leases expired as etcd resumed; replica 2 registers api again and
    // replica 1 drops what was not registered again only after the grace.
    web.wait_endpoints("doomed", 0, Duration::from_secs(60)).await;
    let gone_after = resumed.elapsed();
    web.wait_endpoints("api", 1, Duration::from_millis(100)).await;
    // Requests go on for a while after the grace too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed, first) = load.await.unwrap();
    let lowest = lowest.await.unwrap();
    assert_eq!(lowest, 1, "web's discovery lost api during the recovery; replica 1 log:\n{}", cps[0].log_text());
    assert_eq!(
        failed,
        0,
        "{failed} failed requests of {}; first: {first:?}; replica 1 log:\n{}",
        ok + failed,
        cps[0].log_text()
    );
    assert!(ok > 100, "only {ok} requests went through");
    // Dropped at the end of the grace (10 s at this TTL), not before.
    assert!(gone_after >= Duration::from_secs(5), "doomed removed {gone_after:?} after etcd resumed");
    let log = cps[0].log_text();
    assert!(log.contains("held removals applied"), "{log}");
    assert!(cps[1].log_text().contains("sidecars again under a new lease"), "{}", cps[1].log_text());
    drop(api);
}

/// A control plane of another mesh (another PKI: another trust domain, or
/// the same trust domain with another CA) pointed at this mesh's etcd
/// refuses to start, naming both; one with the same PKI joins.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_of_another_mesh_refuses_to_join_its_etcd() {
    let Some(etcd) = Etcd::start(1).await else { return };
    let pki = Pki::new(TD);
    let (_dirs, cps) = replicas(&pki, &etcd, 1, &[]).await;
    let url = etcd.url();
    for (other, td) in [(Pki::new("other.org"), "other.org"), (Pki::new(TD), TD)] {
        let state = tempfile::tempdir().unwrap();
        let out = run_cp(&other, state.path(), &["--store", &url]);
        assert!(!out.status.success(), "a replica of {td} with another CA started: {}", out.stderr);
        for needle in
            [format!("trust domain {TD}"), format!("trust domain {td}"), "CA sha256".into(), "same --pki".into()]
        {
            assert!(out.stderr.contains(&needle), "{needle:?} not in: {}", out.stderr);
        }
    }
    // Nothing of the other mesh got in: one replica listed, tokens work.
    let (_more, same) = replicas(&pki, &etcd, 1, &[]).await;
    let st = status_json(&cps[0]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while status_json(&cps[0])["replicas"].as_array().map_or(0, Vec::len) != 2 {
        assert!(Instant::now() < deadline, "the same-PKI replica never joined: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token = cps[0].create_token(&cps[0].id("/ns/default/sa/after"), 60).await;
    same[0].attest(&token).await.expect("a token works across same-PKI replicas");
}

/// SIGTERM: the replica removes its own record at once (other replicas'
/// `weft status` stop listing it long before its lease would run out), but
/// not its sidecars' registrations, which stay while they move.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_replica_leaves_status_at_once_and_keeps_its_sidecars_for_the_lease() {
    let Some(etcd) = Etcd::start(1).await else { return };
    let pki = Pki::new(TD);
    let (_dirs, mut cps) = replicas(&pki, &etcd, 2, &["--registration-ttl", "60s"]).await;
    let Pair { api, web, _apps } = pair(&cps[1], &cps[0]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while status_json(&cps[0])["replicas"].as_array().map_or(0, Vec::len) != 2 {
        assert!(Instant::now() < deadline, "status never listed both replicas");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cps[1].terminate();
    let stopped = Instant::now();
    loop {
        let st = status_json(&cps[0]);
        if st["replicas"].as_array().map_or(0, Vec::len) == 1 {
            break;
        }
        assert!(stopped.elapsed() < Duration::from_secs(5), "the stopped replica is still listed: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its sidecar stays in discovery (for the lease) and serves.
    web.wait_endpoints("api", 1, Duration::from_millis(100)).await;
    assert_eq!(App::of(&web).get("api", "/after-stop").await.status, 200);
    drop(api);
}

/// No etcd needed: a registration TTL beyond 5m is refused naming the
/// flag and the range; --store-ca with the file store is refused.
#[tokio::test(flavor = "multi_thread")]
async fn store_flags_out_of_range_or_without_etcd_are_refused() {
    let out = run(Command::new(bin("weft-control-plane")).args(["--registration-ttl", "10d"]));
    assert!(!out.status.success());
    for needle in ["--registration-ttl", "10d", "2s to 5m"] {
        assert!(out.stderr.contains(needle), "{needle:?} not in: {}", out.stderr);
    }
    let pki = Pki::new(TD);
    let state = tempfile::tempdir().unwrap();
    let out = run_cp(&pki, state.path(), &["--store-ca", "/nonexistent/ca.pem"]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("apply only to --store etcd://"), "{}", out.stderr);
}

/// A control plane started from its binary with the usual flags (`--pki`,
/// `--state-dir`, `--listen`, `--admin` on `admin`) and `extra`, for the
/// tests of one that warns or is not ready (which `ControlPlane::start_on`
/// would wait out).
fn spawn_cp(name: &str, pki: &Pki, state: &std::path::Path, admin: &str, extra: &[&str]) -> weft_testkit::Proc {
    weft_testkit::Proc::spawn(name, &bin("weft-control-plane"), &cp_args(pki, state, admin, extra), state)
}

/// The same control plane run to its exit (one that must refuse to start).
fn run_cp(pki: &Pki, state: &std::path::Path, extra: &[&str]) -> weft_testkit::Output {
    run(Command::new(bin("weft-control-plane")).args(cp_args(pki, state, "127.0.0.1:0", extra)))
}

fn cp_args(pki: &Pki, state: &std::path::Path, admin: &str, extra: &[&str]) -> Vec<String> {
    let (pki, state) = (pki.path().display().to_string(), state.display().to_string());
    let mut args: Vec<String> =
        ["--pki", &pki, "--state-dir", &state, "--listen", "127.0.0.1:0", "--admin", admin].map(String::from).into();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Waits up to 30 s for `cp`'s log to hold every one of `needles`.
async fn wait_log_all(cp: &weft_testkit::Proc, needles: &[&str], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = cp.log_text();
        if needles.iter().all(|n| log.contains(n)) {
            return;
        }
        assert!(Instant::now() < deadline, "no {what}; log:\n{log}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An etcd address where nothing listens is said to be a likely wrong
/// address (not an outage) while etcd has never answered.
#[tokio::test(flavor = "multi_thread")]
async fn an_etcd_that_never_answered_is_named_as_a_likely_wrong_address() {
    let pki = Pki::new(TD);
    let state = tempfile::tempdir().unwrap();
    // Bound and dropped: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let store = format!("etcd://127.0.0.1:{port}");
    let cp = spawn_cp("cp", &pki, state.path(), "127.0.0.1:0", &["--store", &store]);
    let want = format!("etcd at 127.0.0.1:{port} has not answered since start-up: check the --store address and port");
    wait_log_all(&cp, &[&want, "--store-ca/--store-cert/--store-key"], "never-answered warning").await;
}

/// `--store-ca` against an etcd serving plaintext: the member closes the
/// TLS handshake at once, and the replica's log hints that etcd may be
/// serving plaintext.
#[tokio::test(flavor = "multi_thread")]
async fn tls_towards_a_plaintext_etcd_hints_at_plaintext() {
    let Some(etcd) = Etcd::start(1).await else { return };
    let certs = tempfile::tempdir().unwrap();
    let tls = ca_and_leaf(certs.path());
    let pki = Pki::new(TD);
    let state = tempfile::tempdir().unwrap();
    let url = etcd.url();
    let ca = tls.client_ca.display().to_string();
    let cp = spawn_cp("cp-tls-to-plaintext", &pki, state.path(), "127.0.0.1:0", &["--store", &url, "--store-ca", &ca]);
    wait_log_all(&cp, &["etcd may be serving plaintext on this port"], "plaintext hint").await;
}

/// `weft apply` of a file declaring nothing is refused, naming what it
/// would remove (the policy too) and `--allow-empty`, and changes nothing;
/// re-applying the stored config (from a file or from stdin, `-f -`) says
/// "unchanged" and writes no new revision.
#[tokio::test(flavor = "multi_thread")]
async fn empty_applies_are_refused_and_identical_ones_are_unchanged() {
    let Some(etcd) = Etcd::start(1).await else { return };
    let pki = Pki::new(TD);
    let (_dirs, cps) = replicas(&pki, &etcd, 1, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let guarded = format!(
        "{SEED}---\napiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: callers}}\n\
         spec:\n  targetRef: {{name: seeded-one}}\n  action: ALLOW\n  rules:\n    - from:\n        - identities: \
         [\"spiffe://{TD}/ns/default/sa/web\"]\n"
    );
    let file = dir.path().join("mesh.yaml");
    std::fs::write(&file, &guarded).unwrap();
    let out = weft(&cps[0], &["apply", "-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.stderr);
    let revision: i64 = out.stdout.trim().rsplit(' ').next().unwrap().parse().expect(&out.stdout);

    let out = weft(&cps[0], &["apply", "-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), format!("{}: unchanged (revision {revision})", file.display()));
    // The same config written differently (a comment) is the same config.
    let mut child = Command::new(bin("weft"))
        .args(["apply", "-f", "-", "--control-plane", &cps[0].addr.to_string(), "--pki"])
        .arg(&cps[0].pki)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(format!("# from stdin\n{guarded}").as_bytes()).unwrap();
    }
    let piped = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&piped.stdout), String::from_utf8_lossy(&piped.stderr));
    assert!(piped.status.success(), "{stderr}");
    assert_eq!(stdout.trim(), format!("stdin: unchanged (revision {revision})"), "{stderr}");

    let empty = dir.path().join("empty.yaml");
    std::fs::write(&empty, "# nothing yet\n").unwrap();
    let out = weft(&cps[0], &["apply", "-f", empty.to_str().unwrap()]);
    assert!(!out.status.success(), "an empty config was applied: {}", out.stdout);
    for says in [
        "refusing to apply",
        "would remove everything the stored config",
        "1 service (seeded-one)",
        "1 authorization policy (callers)",
        "Pass --allow-empty",
    ] {
        assert!(out.stderr.contains(says), "no {says:?}: {}", out.stderr);
    }
    let got = weft(&cps[0], &["get", "config"]);
    assert!(
        got.stdout.starts_with(&format!("# revision: {revision}\n")) && got.stdout.contains("callers"),
        "{}",
        got.stdout
    );
}

/// `weft status` says on its first line what the asked replica can do:
/// serving without writes while etcd is away, not ready (with /ready's
/// reason) when it started without reading the stored config; its replica
/// line has no empty fields then.
#[tokio::test(flavor = "multi_thread")]
async fn status_first_line_tells_a_store_outage_and_not_ready() {
    let Some(mut etcd) = Etcd::start(1).await else { return };
    let pki = Pki::new(TD);
    let seed_dir = tempfile::tempdir().unwrap();
    let seed = seed_dir.path().join("mesh.yaml");
    std::fs::write(&seed, SEED).unwrap();
    let (_dirs, mut cps) = replicas(&pki, &etcd, 1, &["--config", seed.to_str().unwrap()]).await;
    let first_line = |cp: &ControlPlane| {
        let out = weft(cp, &["status"]);
        assert!(out.status.success(), "{}", out.stderr);
        out.stdout
    };
    let table = first_line(&cps[0]);
    assert!(table.starts_with(&format!("control plane {}: healthy,", cps[0].addr)), "{table}");

    etcd.stop_all();
    wait_writes(&cps[0], 503, Duration::from_secs(30)).await;
    let table = first_line(&cps[0]);
    assert!(
        table.starts_with(&format!("control plane {}: serving, writes unavailable: store unreachable,", cps[0].addr)),
        "{table}"
    );

    cps[0].restart_unready().await;
    let reason = wait_ready(&cps[0], 503, Duration::from_secs(30)).await;
    assert!(reason.contains("has not read the stored mesh config yet"), "{reason}");
    let table = first_line(&cps[0]);
    let first = table.lines().next().unwrap_or_default();
    assert!(
        first
            .starts_with(&format!("control plane {}: not ready: has not read the stored mesh config yet", cps[0].addr)),
        "{table}"
    );
    let replica = table.lines().find(|l| l.starts_with("replica ")).unwrap_or_default();
    assert!(replica.contains("(this one)") && !replica.contains("listen ,") && !replica.contains("host ,"), "{table}");
    let doc = status_json(&cps[0]);
    assert!(doc["not_ready"].as_str().unwrap_or_default().starts_with("has not read"), "{doc:#}");

    etcd.start_all().await;
    wait_ready(&cps[0], 200, Duration::from_secs(30)).await;
    let table = first_line(&cps[0]);
    assert!(table.starts_with(&format!("control plane {}: healthy,", cps[0].addr)), "{table}");
}

/// A replica started with a `--config` that differs from the config etcd
/// holds serves the stored one and says so as a WARN, naming the file and
/// `weft apply`; one started with the stored file says nothing of the kind.
#[tokio::test(flavor = "multi_thread")]
async fn a_config_file_differing_from_the_stored_one_is_warned_about() {
    let Some(etcd) = Etcd::start(1).await else { return };
    let pki = Pki::new(TD);
    let dir = tempfile::tempdir().unwrap();
    let (seed, other) = (dir.path().join("seed.yaml"), dir.path().join("other.yaml"));
    std::fs::write(&seed, SEED).unwrap();
    std::fs::write(&other, with_marker("other-one")).unwrap();
    let (_d1, first) = replicas(&pki, &etcd, 1, &["--config", seed.to_str().unwrap()]).await;
    assert!(first[0].wait_for_log("seeded it from --config").await, "{}", first[0].log_text());
    let (_d2, differing) = replicas(&pki, &etcd, 1, &["--config", other.to_str().unwrap()]).await;
    assert!(
        differing[0].wait_for_log("is ignored: etcd already holds a mesh config").await,
        "{}",
        differing[0].log_text()
    );
    let log = differing[0].log_text();
    let line = log.lines().find(|l| l.contains("is ignored")).unwrap_or_default();
    assert!(line.contains("WARN") && line.contains(&format!("weft apply -f {}", other.display())), "{line}");
    let (_d3, same) = replicas(&pki, &etcd, 1, &["--config", seed.to_str().unwrap()]).await;
    assert!(same[0].wait_for_log("already holds this --config's mesh config").await, "{}", same[0].log_text());
    assert!(!same[0].log_text().contains("is ignored"), "{}", same[0].log_text());
}
