//! End to end: an HTTPRoute's retries and request timeout, and outlier
//! detection ejecting a failing endpoint (and taking it back once healthy).

use std::time::{Duration, Instant};

use http::Method;
use weft_proxy::state::balance::BASE_EJECTION;
use weft_testkit::mesh::{concurrent_gets, control_plane, sidecar, App, ConfigFile};
use weft_testkit::metric_sum;
use weft_testkit::servers::{self, Failure};

// ------------------------------------------------------------------ 3. retries

#[tokio::test(flavor = "multi_thread")]
async fn retries_idempotent_requests_only() {
    let cfg = ConfigFile::new(
        r#"apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: flaky}
spec: {port: 8080}
---
apiVersion: weft.dev/v1alpha1
kind: HTTPRoute
metadata: {name: flaky-retries}
spec:
  parentRefs: [{name: flaky}]
  rules:
    - name: on-503
      backendRefs: [{name: flaky}]
      retry: {attempts: 2, codes: [503]}
"#,
    );
    let cp = control_plane(&cfg).await;
    let flaky = servers::flaky("flaky", Failure::FirstPerRequestId, true).await;
    let af = servers::http("frontend").await;
    let _backend = sidecar(&cp, "flaky", flaky.addr(), &[], &[]).await;
    let frontend = sidecar(&cp, "frontend", af.addr, &[], &[]).await;
    frontend.wait_endpoints("flaky", 1, Duration::from_secs(10)).await;
    let app = App::of(&frontend);
    const RETRIES: &str = "weft_proxy_retries_total";
    let sent = ["route=\"flaky-retries/on-503\"", "outcome=\"sent\""];
    let retries = || async { metric_sum(&frontend.metrics().await, RETRIES, &sent) };

    // GET: the first attempt gets 503, the retry 200.
    let r = app.req(Method::GET, "flaky", "/r", &[("x-request-id", "get-1")]).await;
    assert_eq!((r.status, r.body.as_str()), (200, "flaky /r"), "{r:?}");
    assert_eq!(flaky.hits("get-1"), 2, "one retry");
    assert_eq!(retries().await, 1.0, "{}", frontend.metrics().await);

    // POST is not idempotent: its 503 comes back, and the app saw it once.
    let r = app.req(Method::POST, "flaky", "/r", &[("x-request-id", "post-1")]).await;
    assert_eq!((r.status, r.body.as_str()), (503, "flaky unavailable /r"), "{r:?}");
    assert_eq!(flaky.hits("post-1"), 1, "POST must not be retried");
    assert_eq!(retries().await, 1.0);

    // Always 503: one try and exactly `attempts` retries, then the 503.
    let r = app.req(Method::GET, "flaky", "/status/503", &[("x-request-id", "always")]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(flaky.hits("always"), 3, "1 try + 2 retries");
    assert_eq!(retries().await, 3.0);

    // 503 is retried, the 500 that follows is not (codes: [503]).
    let r = app.req(Method::GET, "flaky", "/status/500", &[("x-request-id", "five-hundred")]).await;
    assert_eq!(r.status, 500, "{r:?}");
    assert_eq!(flaky.hits("five-hundred"), 2);
    assert_eq!(retries().await, 4.0);
}

// ------------------------------------------------------------------ 4. timeout

#[tokio::test(flavor = "multi_thread")]
async fn request_timeout_answers_504() {
    let cfg = ConfigFile::new(
        r#"apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: slow}
spec: {port: 8080}
---
apiVersion: weft.dev/v1alpha1
kind: HTTPRoute
metadata: {name: slow-timeout}
spec:
  parentRefs: [{name: slow}]
  rules:
    - backendRefs: [{name: slow}]
      timeouts: {request: 500ms}
"#,
    );
    let cp = control_plane(&cfg).await;
    let (slow, slow2, af) = (servers::http("slow").await, servers::http("slow").await, servers::http("frontend").await);
    let _backend = sidecar(&cp, "slow", slow.addr, &[], &[]).await;
    let _backend2 = sidecar(&cp, "slow", slow2.addr, &[], &[]).await;
    let frontend = sidecar(&cp, "frontend", af.addr, &[], &[]).await;
    frontend.wait_endpoints("slow", 2, Duration::from_secs(10)).await;
    let app = App::of(&frontend);

    let r = app.get("slow", "/sleep/50").await;
    assert_eq!((r.status, r.body.as_str()), (200, "slow slept 50"), "{r:?}");

    let start = Instant::now();
    let r = app.get("slow", "/sleep/3000").await;
    let took = start.elapsed();
    eprintln!("GET /sleep/3000 with a 500ms timeout: {} in {took:?}", r.status);
    assert_eq!(r.status, 504, "{r:?}");
    assert!(r.body.contains("timeout"), "{r:?}");
    assert!(took >= Duration::from_millis(450) && took < Duration::from_millis(2500), "504 after {took:?}");

    // A request cut by the route's timeout counts against the endpoint that
    // did not answer: 12 at once over two hanging endpoints give one of them
    // five failures in a row, and outlier detection ejects it.
    let replies = concurrent_gets(&app, "slow", "/sleep/3000", 12, 12).await;
    assert!(replies.iter().all(|r| r.status == 504), "{replies:?}");
    let fm = frontend.metrics().await;
    assert!(metric_sum(&fm, "weft_proxy_endpoint_ejections_total", &[]) >= 1.0, "{fm}");
}

// ------------------------------------------------------------------ 5. outliers

#[tokio::test(flavor = "multi_thread")]
async fn failing_endpoint_is_ejected_then_returns() {
    // No HTTPRoute: the service's two endpoints share its traffic.
    let cfg =
        ConfigFile::new("apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: pool}\nspec: {port: 8080}\n");
    let cp = control_plane(&cfg).await;
    let good = servers::http("good").await;
    let bad = servers::flaky("bad", Failure::OnlyWhenUnhealthy, false).await;
    let af = servers::http("frontend").await;
    let _g = sidecar(&cp, "pool", good.addr, &["version=good"], &[]).await;
    let _b = sidecar(&cp, "pool", bad.addr(), &["version=bad"], &[]).await;
    let frontend = sidecar(&cp, "frontend", af.addr, &[], &[]).await;
    frontend.wait_endpoints("pool", 2, Duration::from_secs(10)).await;
    let app = App::of(&frontend);

    // Each request takes the app 10 ms, so a few callers at once keep both
    // endpoints busy: the balancer weighs requests in flight, and the failing
    // endpoint (whose 503s are fast) gets its share until it is ejected.
    let started = Instant::now();
    let first = concurrent_gets(&app, "pool", "/sleep/10", 20, 4).await;
    let bad_first = first.iter().filter(|r| r.who() == "bad").count();
    for r in &first {
        let (who, status) = (r.who(), r.status);
        assert!((who, status) == ("good", 200) || (who, status) == ("bad", 503), "{r:?}");
    }
    let window = concurrent_gets(&app, "pool", "/sleep/10", 50, 4).await;
    let bad_window = window.iter().filter(|r| r.who() == "bad").count();
    assert!(window.iter().all(|r| r.status == 200 || r.who() == "bad"), "{window:?}");
    eprintln!(
        "failing endpoint got {bad_first} of the first 20, {bad_window} of the next 50 (within {:?})",
        started.elapsed()
    );
    assert!(bad_first >= 1, "the failing endpoint got traffic at first");
    assert!(bad_window <= 2, "the failing endpoint still got {bad_window} of 50 requests");
    let fm = frontend.metrics().await;
    assert!(metric_sum(&fm, "weft_proxy_endpoint_ejections_total", &[]) >= 1.0, "{fm}");

    // Healthy again: once the ejection interval (2 s) is over, it gets
    // traffic again, and not before.
    bad.set_healthy(true);
    let healed = Instant::now();
    let back = loop {
        let replies = concurrent_gets(&app, "pool", "/sleep/10", 4, 4).await;
        if replies.iter().any(|r| r.who() == "bad" && r.status == 200) {
            break Instant::now();
        }
        assert!(healed.elapsed() < Duration::from_secs(15), "the recovered endpoint never got traffic again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "recovered endpoint served again {:?} after it healed, {:?} after the first request",
        back - healed,
        back - started
    );
    assert!(back - started >= BASE_EJECTION, "back after {:?}, before the ejection interval was over", back - started);
}
