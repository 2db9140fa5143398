//! End to end: RateLimit on a Service and on an HTTPRoute, enforced by the
//! callee's sidecar (429 with Retry-After), and recovery once tokens refill.

use std::time::Duration;

use weft_testkit::mesh::{control_plane, sidecar, App, ConfigFile, Reply};
use weft_testkit::{metric_sum, servers, ControlPlane, Sidecar};

// ------------------------------------------------------------------ 7. rate limit

/// `frontend` calling `limited`, under `cfg`.
struct LimitedMesh {
    _cp: ControlPlane,
    _servers: Vec<servers::Server>,
    limited: Sidecar,
    _frontend: Sidecar,
    app: App,
}

async fn limited_mesh(cfg: &ConfigFile) -> LimitedMesh {
    let cp = control_plane(cfg).await;
    let (la, af) = (servers::http("limited").await, servers::http("frontend").await);
    let limited = sidecar(&cp, "limited", la.addr, &[], &[]).await;
    let frontend = sidecar(&cp, "frontend", af.addr, &[], &[]).await;
    frontend.wait_endpoints("limited", 1, Duration::from_secs(10)).await;
    let app = App::of(&frontend);
    LimitedMesh { _cp: cp, _servers: vec![la, af], limited, _frontend: frontend, app }
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limit_answers_429_with_retry_after_then_recovers() {
    let cfg = ConfigFile::new(
        r#"apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: limited}
spec: {port: 8080}
---
apiVersion: weft.dev/v1alpha1
kind: RateLimit
metadata: {name: limited-5rps}
spec:
  targetRef: {name: limited}
  requestsPerSecond: 5
  burst: 5
"#,
    );
    let m = limited_mesh(&cfg).await;
    let (limited, app) = (&m.limited, m.app.clone());

    let burst: Vec<Reply> = futures::future::join_all((0..20).map(|i| {
        let app = app.clone();
        async move { app.get("limited", &format!("/b/{i}")).await }
    }))
    .await;
    let ok = burst.iter().filter(|r| r.status == 200).count();
    let limited_n = burst.iter().filter(|r| r.status == 429).count();
    eprintln!("burst of 20 at 5/s burst 5: {ok} OK, {limited_n} refused");
    assert_eq!(ok + limited_n, 20, "{burst:?}");
    assert!((5..=8).contains(&ok), "{ok} of 20 got through: {burst:?}");
    for r in burst.iter().filter(|r| r.status == 429) {
        let after: u64 =
            r.header("retry-after").parse().unwrap_or_else(|_| panic!("429 without a numeric Retry-After: {r:?}"));
        assert!((1..=2).contains(&after), "{r:?}");
        assert_eq!(r.body.trim_end(), "weft: rate limit exceeded");
    }
    let lm = limited.metrics().await;
    assert_eq!(metric_sum(&lm, "weft_proxy_rate_limited_total", &["limit=\"limited-5rps\""]), limited_n as f64, "{lm}");

    tokio::time::sleep(Duration::from_millis(1500)).await;
    for i in 0..5 {
        let r = app.get("limited", &format!("/later/{i}")).await;
        assert_eq!(r.status, 200, "request {i} after 1.5s: {r:?}");
    }
}

/// A RateLimit on one HTTPRoute limits the requests that route's rules match
/// and nothing else of the service.
#[tokio::test(flavor = "multi_thread")]
async fn rate_limit_on_an_http_route_limits_only_that_route() {
    let cfg = ConfigFile::new(
        r#"apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: limited}
spec: {port: 8080}
---
apiVersion: weft.dev/v1alpha1
kind: HTTPRoute
metadata: {name: bulk}
spec:
  parentRefs: [{name: limited}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /bulk}}]
      backendRefs: [{name: limited}]
    - backendRefs: [{name: limited}]
---
apiVersion: weft.dev/v1alpha1
kind: HTTPRoute
metadata: {name: interactive}
spec:
  parentRefs: [{name: limited}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /ui}}]
      backendRefs: [{name: limited}]
---
apiVersion: weft.dev/v1alpha1
kind: RateLimit
metadata: {name: bulk-2}
spec:
  targetRef: {kind: HTTPRoute, name: bulk}
  requestsPerSecond: 0.5
  burst: 2
"#,
    );
    let m = limited_mesh(&cfg).await;
    let (limited, app) = (&m.limited, m.app.clone());

    // Route "bulk" (its /bulk rule and its catch-all rule) shares two tokens.
    let mut codes = Vec::new();
    for path in ["/bulk/1", "/other", "/bulk/2", "/other"] {
        codes.push(app.get("limited", path).await.status);
    }
    assert_eq!(codes, [200, 200, 429, 429], "bulk's requests past its burst of 2");
    // Route "interactive" is not limited.
    for i in 0..10 {
        let r = app.get("limited", &format!("/ui/{i}")).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let lm = limited.metrics().await;
    assert_eq!(metric_sum(&lm, "weft_proxy_rate_limited_total", &["limit=\"bulk-2\""]), 2.0, "{lm}");
}
