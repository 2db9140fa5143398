//! A small mesh driven by a config file, for the traffic-policy tests: a real
//! control plane watching a YAML file (`--config`), real sidecars fronting
//! real HTTP servers whose bodies say which one answered (`v1 /path`), and an
//! app-side HTTP client that calls through its sidecar's outbound listener.
//! Every request goes app → outbound sidecar → mTLS → inbound sidecar → app.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::{servers, ControlPlane, Sidecar, SidecarSpec};

/// The trust domain of these meshes.
pub const TD: &str = "example.org";

/// The watched mesh config file, rewritten the way editors save: a temp file
/// next to it, then an atomic rename over it. It has its own temp dir because
/// `--config` must name a valid file when the control plane starts, before
/// `ControlPlane::start` has made the control plane's.
pub struct ConfigFile {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl ConfigFile {
    /// `mesh.yaml` in a fresh temp dir, holding `text`.
    pub fn new(text: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, text).expect("write config");
        Self { dir, path }
    }

    /// Replaces the file's content with `text` (write to a temp file, rename over).
    pub fn write(&self, text: &str) {
        let tmp = self.dir.path().join(".mesh.yaml.swp");
        std::fs::write(&tmp, text).expect("write temp config");
        std::fs::rename(&tmp, &self.path).expect("rename over config");
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as a command-line argument.
    pub fn arg(&self) -> String {
        self.path.display().to_string()
    }
}

/// A control plane (trust domain [`TD`]) watching `cfg`.
pub async fn control_plane(cfg: &ConfigFile) -> ControlPlane {
    ControlPlane::start(TD, &["--config", &cfg.arg()]).await
}

/// A sidecar for `service` fronting `app`, with `labels` (`k=v`) and outbound `upstreams`.
pub async fn sidecar(
    cp: &ControlPlane,
    service: &str,
    app: SocketAddr,
    labels: &[&str],
    upstreams: &[&str],
) -> Sidecar {
    Sidecar::start(cp, TD, SidecarSpec { service, app, upstreams, labels, extra_args: &[] }).await
}

/// What the app beside a sidecar sees of a response.
#[derive(Debug)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    pub headers: HeaderMap,
    /// The body, as text (lossy UTF-8).
    pub body: String,
}

impl Reply {
    /// Which server answered: the first word of a testkit body.
    pub fn who(&self) -> &str {
        self.body.split(' ').next().unwrap_or("")
    }

    /// The value of header `name`, or "" if absent or not text.
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
}

/// An app's HTTP/1.1 client (keep-alive) talking to its sidecar's outbound
/// listener, naming the destination service in `Host`.
#[derive(Clone)]
pub struct App {
    client: Client<HttpConnector, Full<Bytes>>,
    outbound: SocketAddr,
}

/// How long a response (head, then body) may take before a request fails.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

impl App {
    /// The app beside `sidecar`.
    pub fn of(sidecar: &Sidecar) -> Self {
        Self { client: Client::builder(TokioExecutor::new()).build_http(), outbound: sidecar.outbound }
    }

    /// Sends `method http://<host><path>` with `headers`; an error if the
    /// request fails or its response (head or body) takes over 10 s.
    pub async fn send(&self, method: Method, host: &str, path: &str, headers: &[(&str, &str)]) -> io::Result<Reply> {
        let mut b =
            Request::builder().method(method).uri(format!("http://{}{path}", self.outbound)).header("host", host);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(Bytes::new())).map_err(io::Error::other)?;
        let resp = tokio::time::timeout(REPLY_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no response within 10s"))?
            .map_err(|e| io::Error::other(format!("request failed: {e}")))?;
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(REPLY_TIMEOUT, body.collect())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "body not complete within 10s"))?
            .map_err(|e| io::Error::other(format!("body failed: {e}")))?
            .to_bytes();
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// [`App::send`], panicking with the request if it fails.
    pub async fn req(&self, method: Method, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        let what = format!("{method} http://{host}{path} {headers:?}");
        self.send(method, host, path, headers).await.unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    /// `GET http://<host><path>`, panicking if it fails.
    pub async fn get(&self, host: &str, path: &str) -> Reply {
        self.req(Method::GET, host, path, &[]).await
    }
}

/// Counts answers by who answered, over `n` GETs sent by `workers` in parallel.
#[derive(Debug, Default)]
pub struct Tally {
    /// 200s from the server named "v1".
    pub v1: usize,
    /// 200s from the server named "v2".
    pub v2: usize,
    /// Anything else: (status, body), the first few; status 0 for a failed request.
    pub other: Vec<(u16, String)>,
    /// How many answers were anything else.
    pub others: usize,
}

/// Sends `n` GETs of `/t/<worker>/<i>` to `host` from `workers` concurrent callers.
pub async fn tally(app: &App, host: &str, n: usize, workers: usize) -> Tally {
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
                        t.other.push((0, e.to_string()));
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

/// `n` GETs of `path` sent by `workers` concurrent callers.
pub async fn concurrent_gets(app: &App, host: &str, path: &str, n: usize, workers: usize) -> Vec<Reply> {
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

/// Sends bursts of 50 requests to `backend` until one burst is all `want`
/// ("v1" or "v2"), for up to 20 s; returns how long the change took to show.
pub async fn wait_all_to(app: &App, want: &str, since: Instant) -> Duration {
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

/// Services `frontend` and `backend` (subsets v1 / v2 by label `version`).
pub const SERVICES: &str = r#"apiVersion: weft.dev/v1alpha1
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

/// [`SERVICES`] and HTTPRoute `backend-split` (rule `split`) sending weights
/// `v1` / `v2` to the two subsets.
pub fn split(v1: u32, v2: u32) -> String {
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

/// Invalid variants of `split(0, 100)`: (what, config text, strings the error
/// must name), for the control plane's rejection and `weft validate` alike.
pub fn bad_configs() -> Vec<(&'static str, String, Vec<&'static str>)> {
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

// ------------------------------------------------------------------ canary

/// `frontend` and two `backend` workloads (labels version=v1 / version=v2)
/// fronting servers named "v1" / "v2".
pub struct Canary {
    pub cfg: ConfigFile,
    pub cp: ControlPlane,
    pub frontend: Sidecar,
    pub v1: Sidecar,
    pub v2: Sidecar,
    pub app: App,
    _servers: Vec<servers::Server>,
}

/// Starts the [`Canary`] mesh under `config` and waits until `frontend` sees both backends.
pub async fn canary(config: &str) -> Canary {
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
