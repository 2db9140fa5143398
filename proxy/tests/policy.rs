//! End to end, issue #4: traffic policy from the mesh config file. A real
//! control plane watches a YAML file (`--config`); real sidecars for the
//! caller (`frontend`) and for backend workloads front real HTTP servers whose
//! bodies say which one answered (`v1 /path`, `v2 /path`). Every request goes
//! app → outbound sidecar → mTLS → inbound sidecar → app on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_proxy::state::balance::BASE_EJECTION;
use weft_testkit::servers::{self, Failure};
use weft_testkit::{bin, http_get, metric_sum, ControlPlane, Sidecar, SidecarSpec};

const TD: &str = "example.org";
const DENIED: &str = "weft: request denied by authorization policy";

fn id(service: &str) -> String {
    format!("spiffe://{TD}/ns/default/sa/{service}")
}

// ------------------------------------------------------------------ harness

/// The watched mesh config file, rewritten the way editors save: a temp file
/// next to it, then an atomic rename over it. It has its own temp dir because
/// `--config` must name a valid file when the control plane starts, before
/// `ControlPlane::start` has made the control plane's.
struct ConfigFile {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl ConfigFile {
    fn new(text: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, text).expect("write config");
        Self { dir, path }
    }

    fn write(&self, text: &str) {
        let tmp = self.dir.path().join(".mesh.yaml.swp");
        std::fs::write(&tmp, text).expect("write temp config");
        std::fs::rename(&tmp, &self.path).expect("rename over config");
    }

    fn arg(&self) -> String {
        self.path.display().to_string()
    }
}

/// A control plane watching `cfg`.
async fn control_plane(cfg: &ConfigFile) -> ControlPlane {
    ControlPlane::start(TD, &["--config", &cfg.arg()]).await
}

async fn sidecar(cp: &ControlPlane, service: &str, app: SocketAddr, labels: &[&str], upstreams: &[&str]) -> Sidecar {
    Sidecar::start(cp, TD, SidecarSpec { service, app, upstreams, labels, extra_args: &[] }).await
}

/// What the app beside a sidecar sees of a response.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    /// Which server answered: the first word of a testkit body.
    fn who(&self) -> &str {
        self.body.split(' ').next().unwrap_or("")
    }

    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
}

/// An app's HTTP/1.1 client (keep-alive) talking to its sidecar's outbound
/// listener, naming the destination service in `Host`.
#[derive(Clone)]
struct App {
    client: Client<HttpConnector, Full<Bytes>>,
    outbound: SocketAddr,
}

impl App {
    fn of(sidecar: &Sidecar) -> Self {
        Self { client: Client::builder(TokioExecutor::new()).build_http(), outbound: sidecar.outbound }
    }

    async fn send(&self, method: Method, host: &str, path: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
        let mut b =
            Request::builder().method(method).uri(format!("http://{}{path}", self.outbound)).header("host", host);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.client.request(req))
            .await
            .map_err(|_| "no response within 10s".to_string())?
            .map_err(|e| format!("request failed: {e}"))?;
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(Duration::from_secs(10), body.collect())
            .await
            .map_err(|_| "body not complete within 10s".to_string())?
            .map_err(|e| format!("body failed: {e}"))?
            .to_bytes();
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    async fn req(&self, method: Method, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        let what = format!("{method} http://{host}{path} {headers:?}");
        self.send(method, host, path, headers).await.unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    async fn get(&self, host: &str, path: &str) -> Reply {
        self.req(Method::GET, host, path, &[]).await
    }
}

/// Counts answers by who answered, over `n` GETs sent by `workers` in parallel.
#[derive(Debug, Default)]
struct Tally {
    v1: usize,
    v2: usize,
    /// Anything else: (status, body), the first few.
    other: Vec<(u16, String)>,
    others: usize,
}

async fn tally(app: &App, host: &str, n: usize, workers: usize) -> Tally {
    let mut tasks = Vec::new();
    for w in 0..workers {
        let app = app.clone();
        let host = host.to_string();
        let count = n / workers + usize::from(w < n % workers);
        tasks.push(tokio::spawn(async move {
            let mut t = Tally::default();
            for i in 0..count {
                match app.send(Method::GET, &host, &format!("/t/{w}/{i}"), &[]).await {
                    Ok(r) if r.status == 200 && r.who() == "v1" => t.v1 += 1,
                    Ok(r) if r.status == 200 && r.who() == "v2" => t.v2 += 1,
                    Ok(r) => {
                        t.others += 1;
                        t.other.push((r.status, r.body));
                    }
                    Err(e) => {
                        t.others += 1;
                        t.other.push((0, e));
                    }
                }
            }
            t
        }));
    }
    let mut all = Tally::default();
    for t in tasks {
        let t = t.await.expect("tally worker");
        all.v1 += t.v1;
        all.v2 += t.v2;
        all.others += t.others;
        all.other.extend(t.other.into_iter().take(5));
    }
    all
}

async fn metrics(admin: SocketAddr) -> String {
    http_get(admin, "/metrics").await.map(|(_, b)| b).unwrap_or_default()
}

/// Polls `admin`'s /metrics until `metric{labels}` reaches `at_least`.
async fn wait_metric(admin: SocketAddr, metric: &str, labels: &[&str], at_least: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = metrics(admin).await;
        let v = metric_sum(&text, metric, labels);
        if v >= at_least {
            return v;
        }
        assert!(Instant::now() < deadline, "{metric}{labels:?} = {v}, want >= {at_least}; /metrics:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends bursts of 50 requests until one burst is all `want` (bounded);
/// returns how long the change took to show.
async fn wait_all_to(app: &App, want: &str, since: Instant) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let t = tally(app, "backend", 50, 1).await;
        let n = if want == "v1" { t.v1 } else { t.v2 };
        if n == 50 {
            return since.elapsed();
        }
        assert!(Instant::now() < deadline, "config change never applied: last burst {t:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ------------------------------------------------------------------ configs

const SERVICES: &str = r#"apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: frontend}
spec: {port: 8080}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: backend}
spec:
  port: 8080
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
"#;

fn split(v1: u32, v2: u32) -> String {
    format!(
        r#"{SERVICES}---
apiVersion: weft.dev/v1alpha1
kind: HTTPRoute
metadata: {{name: backend-split}}
spec:
  parentRefs: [{{name: backend}}]
  rules:
    - name: split
      backendRefs:
        - {{name: backend, subset: v1, weight: {v1}}}
        - {{name: backend, subset: v2, weight: {v2}}}
"#
    )
}

/// `frontend` and two `backend` workloads (labels version=v1 / version=v2)
/// fronting servers named "v1" / "v2".
struct Canary {
    cfg: ConfigFile,
    cp: ControlPlane,
    frontend: Sidecar,
    v1: Sidecar,
    v2: Sidecar,
    app: App,
    _servers: Vec<servers::Server>,
}

async fn canary(config: &str) -> Canary {
    let cfg = ConfigFile::new(config);
    let cp = control_plane(&cfg).await;
    let (a1, a2, af) = (servers::http("v1").await, servers::http("v2").await, servers::http("frontend").await);
    let v1 = sidecar(&cp, "backend", a1.addr, &["version=v1"], &[]).await;
    let v2 = sidecar(&cp, "backend", a2.addr, &["version=v2"], &[]).await;
    let frontend = sidecar(&cp, "frontend", af.addr, &[], &[]).await;
    frontend.wait_endpoints("backend", 2, Duration::from_secs(10)).await;
    let app = App::of(&frontend);
    Canary { cfg, cp, frontend, v1, v2, app, _servers: vec![a1, a2, af] }
}

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
                    Err(e) => failures.push(e),
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
    let cp_metrics = metrics(m.cp.admin).await;
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

/// `n` GETs of `path` sent by `workers` concurrent callers.
async fn concurrent_gets(app: &App, host: &str, path: &str, n: usize, workers: usize) -> Vec<Reply> {
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let (app, host, path) = (app.clone(), host.to_string(), path.to_string());
            let count = n / workers + usize::from(w < n % workers);
            tokio::spawn(async move {
                let mut out = Vec::new();
                for _ in 0..count {
                    out.push(app.get(&host, &path).await);
                }
                out
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("caller task"));
    }
    all
}

// ------------------------------------------------------------------ 6. authorization

const AUTHZ: &str = r#"apiVersion: weft.dev/v1alpha1
kind: Mesh
metadata: {name: mesh}
spec: {defaultPolicy: deny}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: secure}
spec: {port: 8080}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: locked}
spec: {port: 8080}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: echo}
spec: {port: 7000, protocol: tcp}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-frontend}
spec:
  targetRef: {name: secure}
  action: ALLOW
  rules:
    - from: [{identities: ["spiffe://example.org/ns/default/sa/frontend"]}]
      to: [{paths: ["/api/*", "/public"]}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-public-reads}
spec:
  targetRef: {name: secure}
  action: ALLOW
  rules:
    - to: [{paths: ["/public", "/echo-headers"], methods: [GET]}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-admin-writes}
spec:
  targetRef: {name: secure}
  action: DENY
  rules:
    - to: [{paths: ["/api/admin/*"], methods: [POST, DELETE]}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: echo-open}
spec:
  targetRef: {name: echo}
  action: ALLOW
  rules: [{}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: echo-no-intruder}
spec:
  targetRef: {name: echo}
  action: DENY
  rules:
    - from: [{identities: ["spiffe://example.org/ns/default/sa/intruder"]}]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn authorization_matrix_http_and_tcp() {
    let cfg = ConfigFile::new(AUTHZ);
    let cp = control_plane(&cfg).await;
    let (secure_app, locked_app, caller_app) =
        (servers::http("secure").await, servers::http("locked").await, servers::http("caller").await);
    let (echo_server, echo_conns) = servers::tcp_echo_counting().await;
    let echo_addr = echo_server.addr;
    let secure = sidecar(&cp, "secure", secure_app.addr, &[], &[]).await;
    let locked = sidecar(&cp, "locked", locked_app.addr, &[], &[]).await;
    let echo = sidecar(&cp, "echo", echo_addr, &[], &[]).await;
    let frontend = sidecar(&cp, "frontend", caller_app.addr, &[], &["echo"]).await;
    let intruder = sidecar(&cp, "intruder", caller_app.addr, &[], &["echo"]).await;
    for s in [&frontend, &intruder] {
        for svc in ["secure", "locked", "echo"] {
            s.wait_endpoints(svc, 1, Duration::from_secs(10)).await;
        }
    }
    let callers = [("frontend", App::of(&frontend)), ("intruder", App::of(&intruder))];

    let (get, post, delete) = (Method::GET, Method::POST, Method::DELETE);
    #[rustfmt::skip]
    let matrix: &[(&str, &str, &Method, &str, u16)] = &[
        // caller,   service,  method,  path,              expected
        ("frontend", "secure", &get,    "/api/items",       200),
        ("frontend", "secure", &post,   "/api/items",       200),
        ("frontend", "secure", &delete, "/api/items",       200),
        ("frontend", "secure", &get,    "/api/admin/users", 200),
        ("frontend", "secure", &post,   "/api/admin/users", 403), // deny wins over allow
        ("frontend", "secure", &delete, "/api/admin/users", 403),
        ("frontend", "secure", &get,    "/public",          200),
        ("frontend", "secure", &delete, "/public",          200),
        ("frontend", "secure", &get,    "/private",         403), // no ALLOW matches
        ("intruder", "secure", &get,    "/api/items",       403),
        ("intruder", "secure", &post,   "/api/items",       403),
        ("intruder", "secure", &get,    "/public",          200), // allow-public-reads
        ("intruder", "secure", &post,   "/public",          403),
        ("intruder", "secure", &delete, "/public",          403),
        ("intruder", "secure", &get,    "/private",         403),
        ("frontend", "locked", &get,    "/anything",        403), // mesh default deny
        ("intruder", "locked", &get,    "/anything",        403),
        ("frontend", "locked", &post,   "/anything",        403),
    ];
    let policy_names = ["allow-frontend", "allow-public-reads", "deny-admin-writes", "no-allow-match", "default"];
    let (mut denied, mut allowed) = (0.0, 0.0);
    for (caller, service, method, path, want) in matrix {
        let app = &callers.iter().find(|(n, _)| n == caller).unwrap().1;
        let r = app.req((*method).clone(), service, path, &[]).await;
        let case = format!("{caller} {method} {service}{path}");
        assert_eq!(r.status, *want, "{case}: {r:?}");
        if *want == 403 {
            assert_eq!(r.body.trim_end(), DENIED, "{case}");
            for p in policy_names {
                assert!(!r.body.contains(p), "{case}: policy name leaked: {r:?}");
            }
        } else if *method != Method::POST {
            assert_eq!(r.body, format!("{service} {path}"), "{case}");
        }
        if *service == "secure" {
            if *want == 403 {
                denied += 1.0;
            } else {
                allowed += 1.0;
            }
        }
    }

    // A caller claiming to be frontend in the identity header gets nowhere.
    let intruder_app = &callers[1].1;
    let forged = [("x-weft-peer-id", "spiffe://example.org/ns/default/sa/frontend")];
    let r = intruder_app.req(Method::GET, "secure", "/api/items", &forged).await;
    assert_eq!((r.status, r.body.trim_end()), (403, DENIED), "{r:?}");
    denied += 1.0;
    // Where it is let in, the app sees its real identity, not the forged one.
    let r = intruder_app.req(Method::GET, "secure", "/echo-headers", &forged).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.body.contains(&format!("x-weft-peer-id: {}", id("intruder"))) && !r.body.contains("sa/frontend"),
        "{}",
        r.body
    );
    allowed += 1.0;

    // Decisions are counted on the callee's sidecar, by policy.
    let sm = secure.metrics().await;
    let authz = "weft_proxy_authz_decisions_total";
    assert_eq!(metric_sum(&sm, authz, &["outcome=\"deny\"", "protocol=\"http\""]), denied, "{sm}");
    assert_eq!(metric_sum(&sm, authz, &["outcome=\"allow\""]), allowed, "{sm}");
    assert_eq!(metric_sum(&sm, authz, &["outcome=\"deny\"", "policy=\"deny-admin-writes\""]), 2.0, "{sm}");
    let lm = locked.metrics().await;
    assert_eq!(metric_sum(&lm, authz, &["outcome=\"deny\"", "policy=\"default\""]), 3.0, "{lm}");

    // TCP: frontend's connection is carried, intruder's closed at once.
    let mut ok = tokio::net::TcpStream::connect(frontend.upstream("echo")).await.unwrap();
    ok.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), ok.read_exact(&mut buf))
        .await
        .expect("echo answered")
        .expect("echo read");
    assert_eq!(&buf, b"ping");
    assert_eq!(echo_conns.load(Ordering::SeqCst), 1);

    let mut no = tokio::net::TcpStream::connect(intruder.upstream("echo")).await.unwrap();
    let _ = no.write_all(b"ping").await;
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), no.read(&mut buf))
        .await
        .expect("a denied TCP connection is closed, not left hanging");
    assert!(matches!(read, Ok(0) | Err(_)), "denied TCP connection got data: {read:?}");
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(echo_conns.load(Ordering::SeqCst), 1, "nothing of the denied connection reached the echo server");
    let em = echo.metrics().await;
    assert_eq!(
        metric_sum(&em, authz, &["outcome=\"deny\"", "protocol=\"tcp\"", "policy=\"echo-no-intruder\""]),
        1.0,
        "{em}"
    );
    drop(ok);
    drop(echo_server);
}

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

// ------------------------------------------------------------------ 8. invalid config

fn weft_status(cp: &ControlPlane) -> String {
    let out = Command::new(bin("weft"))
        .args(["status", "--control-plane", &cp.addr.to_string(), "--pki"])
        .arg(&cp.pki)
        .output()
        .expect("run weft status");
    assert!(out.status.success(), "weft status: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (what, config text, strings the error must name).
fn bad_configs() -> Vec<(&'static str, String, Vec<&'static str>)> {
    let good = split(0, 100);
    vec![
        (
            "bad YAML",
            format!("{good}---\napiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {{name: x\nspec: {{}}\n"),
            vec!["document 4", "not valid YAML"],
        ),
        (
            "unknown kind",
            format!(
                "{good}---\napiVersion: weft.dev/v1alpha1\nkind: VirtualService\nmetadata: {{name: vs}}\nspec: {{}}\n"
            ),
            vec!["VirtualService \"vs\" (document 4)", "kind", "unknown kind \"VirtualService\""],
        ),
        (
            "unknown field",
            good.replace("    - name: split\n", "    - name: split\n      timeout: 2s\n"),
            vec!["HTTPRoute \"backend-split\" (document 3)", "spec.rules[0].timeout", "unknown field `timeout`"],
        ),
        (
            "weights summing to 0",
            split(0, 0),
            vec!["HTTPRoute \"backend-split\" (document 3)", "spec.rules[0].backendRefs", "weights add up to 0"],
        ),
        (
            "regex that does not compile",
            good.replace(
                "      backendRefs:\n",
                "      matches: [{path: {type: RegularExpression, value: \"/api/(v1\"}}]\n      backendRefs:\n",
            ),
            vec![
                "HTTPRoute \"backend-split\" (document 3)",
                "spec.rules[0].matches[0].path.value",
                "regular expression does not compile",
            ],
        ),
        (
            "missing service",
            good.replace("{name: backend, subset: v1, weight: 0}", "{name: ghost, weight: 0}"),
            vec![
                "HTTPRoute \"backend-split\" (document 3)",
                "spec.rules[0].backendRefs[0].name",
                "Service \"ghost\" does not exist",
            ],
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_config_is_rejected_and_the_last_good_one_serves() {
    let good = split(0, 100);
    let m = canary(&good).await;
    const RELOADS: &str = "weft_control_plane_config_reloads_total";
    let mut rejected = 0.0;
    let all_v2 = tally(&m.app, "backend", 50, 2).await;
    assert_eq!(all_v2.v2, 50, "{all_v2:?}");
    assert!(!weft_status(&m.cp).contains("REJECTED"));

    for (what, text, names) in bad_configs() {
        let log_before = m.cp.proc_.log_text().len();
        m.cfg.write(&text);
        rejected += 1.0;
        wait_metric(m.cp.admin, RELOADS, &["outcome=\"rejected\""], rejected).await;
        // What the control plane logged about this change (the counter moves
        // just before the line is written).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = m.cp.proc_.log_text();
            let new = log.get(log_before..).unwrap_or_default();
            let missing: Vec<_> = names.iter().filter(|n| !new.contains(**n)).collect();
            if missing.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "{what}: control-plane log lacks {missing:?}:\n{new}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let status = weft_status(&m.cp);
            let shown = status.contains("REJECTED") && names.iter().all(|n| status.contains(n));
            if shown {
                break;
            }
            assert!(Instant::now() < deadline, "{what}: weft status lacks REJECTED or {names:?}:\n{status}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let t = tally(&m.app, "backend", 20, 1).await;
        assert_eq!(
            (t.v1, t.v2, t.others),
            (0, 20, 0),
            "{what}: traffic must follow the last good config (0/100): {t:?}"
        );
    }
    let text = metrics(m.cp.admin).await;
    assert_eq!(metric_sum(&text, RELOADS, &["outcome=\"applied\""]), 0.0, "{text}");

    // The file fixed back to exactly the last good config: nothing is
    // rejected any more.
    m.cfg.write(&good);
    wait_metric(m.cp.admin, RELOADS, &["outcome=\"applied\""], 1.0).await;
    let status = weft_status(&m.cp);
    assert!(!status.contains("REJECTED"), "a good config is serving again:\n{status}");
    // And a new good config applies as usual.
    let changed = Instant::now();
    m.cfg.write(&split(100, 0));
    wait_all_to(&m.app, "v1", changed).await;
    assert!(!weft_status(&m.cp).contains("REJECTED"));
    let text = metrics(m.cp.admin).await;
    assert_eq!(metric_sum(&text, RELOADS, &["outcome=\"rejected\""]), rejected, "{text}");
    // Sidecars never saw a bad config.
    for s in [&m.frontend, &m.v1, &m.v2] {
        let sm = s.metrics().await;
        assert_eq!(metric_sum(&sm, "weft_proxy_config_updates_total", &["outcome=\"rejected\""]), 0.0, "{sm}");
    }
}

#[test]
fn weft_validate_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let validate = |file: &Path| {
        let out = Command::new(bin("weft")).arg("validate").arg(file).output().expect("run weft validate");
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    for (i, (what, text, names)) in bad_configs().into_iter().enumerate() {
        let file = dir.path().join(format!("bad-{i}.yaml"));
        std::fs::write(&file, text).unwrap();
        let (ok, out) = validate(&file);
        assert!(!ok, "{what}: weft validate accepted it:\n{out}");
        for n in names {
            assert!(out.contains(n), "{what}: output lacks {n:?}:\n{out}");
        }
    }
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/canary.yaml");
    let (ok, out) = validate(&example);
    assert!(ok, "examples/canary.yaml: {out}");
    assert!(out.contains("valid"), "{out}");
    let (ok, out) = validate(&dir.path().join("good.yaml").with_extension("missing"));
    assert!(!ok, "{out}");
    std::fs::write(dir.path().join("good.yaml"), split(90, 10)).unwrap();
    let (ok, out) = validate(&dir.path().join("good.yaml"));
    assert!(ok, "{out}");
}
