//! End to end: HTTPRoute traffic splitting and matching from the mesh config
//! file. A real control plane watches the file; real sidecars front real HTTP
//! servers whose bodies say which one answered (`v1 /path`, `v2 /path`).
//! Every request goes app → outbound sidecar → mTLS → inbound sidecar → app.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use weft_testkit::mesh::{canary, split, tally, wait_all_to, SERVICES};
use weft_testkit::{metric_sum, Sidecar};

// ------------------------------------------------------------------ 1. canary

#[tokio::test(flavor = "multi_thread")]
async fn canary_split_and_a_live_weight_change_without_errors() {
    let m = canary(&split(90, 10)).await;

    let t = tally(&m.app, "backend", 2000, 8).await;
    assert_eq!(t.others, 0, "every request answered by v1 or v2: {t:?}");
    let share = t.v2 as f64 * 100.0 / 2000.0;
    eprintln!("canary 90/10: v2 answered {} of 2000 = {share:.2}%", t.v2);
    assert!((7.5..=12.5).contains(&share), "v2 share {share:.2}% is not 10% ± 2.5 points ({t:?})");

    // A continuous load while the file changes to 0/100.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (app, stop) = (m.app.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut sent, mut failures) = (0u64, Vec::new());
            let end = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && Instant::now() < end {
                sent += 1;
                match app.send(Method::GET, "backend", "/load", &[]).await {
                    Ok(r) if (200..300).contains(&r.status) => {}
                    Ok(r) => failures.push(format!("{} {}", r.status, r.body)),
                    Err(e) => failures.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (sent, failures)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let changed = Instant::now();
    m.cfg.write(&split(0, 100));
    let took = wait_all_to(&m.app, "v2", changed).await;
    eprintln!("0/100 applied within {took:?} of the rename");

    let after = tally(&m.app, "backend", 300, 4).await;
    assert_eq!((after.v1, after.v2, after.others), (0, 300, 0), "after the change everything goes to v2: {after:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    let (sent, failures) = load.await.expect("load task");
    eprintln!("continuous load: {sent} requests, {} failed", failures.len());
    assert!(sent >= 50, "the load ran: only {sent} requests");
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed during the change: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let cp_metrics = m.cp.metrics().await;
    assert_eq!(
        metric_sum(&cp_metrics, "weft_control_plane_config_reloads_total", &["outcome=\"applied\""]),
        1.0,
        "{cp_metrics}"
    );
    // The caller labels its requests with the route and the backend it chose.
    let fm = m.frontend.metrics().await;
    assert!(
        metric_sum(
            &fm,
            "weft_proxy_requests_total",
            &["direction=\"outbound\"", "route=\"backend-split/split\"", "backend=\"v2\""]
        ) >= 300.0,
        "{fm}"
    );
}

// ------------------------------------------------------------------ 2. matches

fn tagged(name: &str) -> String {
    format!(
        "filters: [{{type: ResponseHeaderModifier, responseHeaderModifier: {{set: [{{name: x-route, value: {name}}}]}}}}]"
    )
}

fn match_routes() -> String {
    format!(
        r#"{SERVICES}---
apiVersion: weft.dev/v1alpha1
kind: HTTPRoute
metadata: {{name: backend-routes}}
spec:
  parentRefs: [{{name: backend}}]
  rules:
    - name: split
      backendRefs:
        - {{name: backend, subset: v1, weight: 90}}
        - {{name: backend, subset: v2, weight: 10}}
      {split}
    - name: canary-header
      matches:
        - headers: [{{name: x-canary, value: "true"}}]
      backendRefs: [{{name: backend, subset: v2}}]
      {canary}
    - name: api-writes
      matches:
        - path: {{type: PathPrefix, value: /api}}
          method: POST
      backendRefs: [{{name: backend, subset: v2}}]
      {writes}
"#,
        split = tagged("split"),
        canary = tagged("canary-header"),
        writes = tagged("api-writes"),
    )
}

async fn inbound_requests(s: &Sidecar) -> f64 {
    metric_sum(&s.metrics().await, "weft_proxy_requests_total", &["direction=\"inbound\""])
}

#[tokio::test(flavor = "multi_thread")]
async fn header_path_and_method_matches_are_exact() {
    let m = canary(&match_routes()).await;
    let app = &m.app;

    // With the header: v2, every time.
    for i in 0..100 {
        let r = app.req(Method::GET, "backend", &format!("/c/{i}"), &[("x-canary", "true")]).await;
        assert_eq!(
            (r.status, r.who(), r.header("x-route")),
            (200, "v2", "canary-header"),
            "x-canary: true, request {i}: {r:?}"
        );
    }
    // Without it (or with another value: exact is exact): the weights.
    let (mut v1, mut v2) = (0, 0);
    for i in 0..200 {
        let hdrs: &[(&str, &str)] = if i % 2 == 0 { &[] } else { &[("x-canary", "TRUE")] };
        let r = app.req(Method::GET, "backend", "/", hdrs).await;
        assert_eq!((r.status, r.header("x-route")), (200, "split"), "{r:?}");
        match r.who() {
            "v1" => v1 += 1,
            "v2" => v2 += 1,
            _ => panic!("{r:?}"),
        }
    }
    eprintln!("without the header: v1 {v1}, v2 {v2} of 200");
    assert!((5..=40).contains(&v2), "90/10 split gave v2 {v2} of 200 (v1 {v1})");

    // PathPrefix /api + POST → v2; the app's POST echo has no name, so count
    // what each backend workload's inbound sidecar received.
    let (b1, b2) = (inbound_requests(&m.v1).await, inbound_requests(&m.v2).await);
    for path in ["/api/x", "/api", "/api/x/y"] {
        for _ in 0..10 {
            let r = app.req(Method::POST, "backend", path, &[]).await;
            assert_eq!((r.status, r.header("x-route")), (200, "api-writes"), "POST {path}: {r:?}");
        }
    }
    let (a1, a2) = (inbound_requests(&m.v1).await, inbound_requests(&m.v2).await);
    assert_eq!((a1 - b1, a2 - b2), (0.0, 30.0), "POST /api… went to v2 only");
    // GET on the prefix, and POST on a path that merely starts with "/api".
    for _ in 0..20 {
        let r = app.get("backend", "/api/x").await;
        assert_eq!((r.status, r.header("x-route")), (200, "split"), "{r:?}");
        assert!(r.body.ends_with(" /api/x"), "{r:?}");
        let r = app.req(Method::POST, "backend", "/apix", &[]).await;
        assert_eq!((r.status, r.header("x-route")), (200, "split"), "POST /apix must not match PathPrefix /api: {r:?}");
    }
}
