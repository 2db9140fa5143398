//! The admin HTTP endpoint of every weft process.
//!
//! - `/live`: 200 while the process runs.
//! - `/ready`: 200 once [`Admin::set_ready`] said so (a sidecar: SVID + first config)
//!   and no [`Admin::set_unready_reason`] holds it back (a sidecar: its app
//!   refuses connections); else 503 with the reason.
//! - `/metrics`: Prometheus text exposition of the process's registry.
//! - `/config`: what the process has applied, as JSON, from a callback.
//! - extra checks ([`Admin::add_check`]), e.g. the control plane's
//!   `/ready/writes`: 200, or 503 with the reason.
//!
//! Process plumbing (logging, signals, state lock, ports) is in weft-runtime.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use weft_runtime::Drain;

type ConfigFn = Box<dyn Fn() -> String + Send + Sync>;
/// A check: None when it passes, else why not.
type CheckFn = Box<dyn Fn() -> Option<String> + Send + Sync>;

/// Shared state behind the admin endpoint.
pub struct Admin {
    ready: AtomicBool,
    /// Why the process is not ready although `ready` was set.
    unready_reason: Mutex<Option<String>>,
    registry: Mutex<Registry>,
    config: Mutex<Option<ConfigFn>>,
    checks: Mutex<Vec<(&'static str, CheckFn)>>,
}

impl Admin {
    /// Not ready yet, serving `registry` on `/metrics` and `{}` on `/config`.
    pub fn new(registry: Registry) -> Arc<Self> {
        Arc::new(Self {
            ready: AtomicBool::new(false),
            unready_reason: Mutex::new(None),
            registry: Mutex::new(registry),
            config: Mutex::new(None),
            checks: Mutex::new(Vec::new()),
        })
    }

    /// What `/ready` answers from now on (200 or 503).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Holds `/ready` at 503 with `reason` (one line saying what is wrong
    /// and what to do), or releases it with None.
    pub fn set_unready_reason(&self, reason: Option<String>) {
        *self.unready_reason.lock().unwrap_or_else(|e| e.into_inner()) = reason;
    }

    /// Whether `/ready` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.unready_reason.lock().unwrap_or_else(|e| e.into_inner()).is_none()
    }

    /// Sets what `/config` shows.
    pub fn set_config_view(&self, f: impl Fn() -> String + Send + Sync + 'static) {
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    /// Serves `path` (e.g. `/ready/writes`): 200 `ok` while `check` gives
    /// None, else 503 `not ready: <reason>`.
    pub fn add_check(&self, path: &'static str, check: impl Fn() -> Option<String> + Send + Sync + 'static) {
        self.checks.lock().unwrap_or_else(|e| e.into_inner()).push((path, Box::new(check)));
    }

    /// The Prometheus text exposition of the registry.
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
        out
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let text = |status: StatusCode, body: String, ctype: &'static str| {
            Response::builder()
                .status(status)
                .header(http::header::CONTENT_TYPE, ctype)
                .body(Full::new(Bytes::from(body)))
                .expect("static response parts are valid")
        };
        if req.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into(), "text/plain");
        }
        match req.uri().path() {
            "/live" => text(StatusCode::OK, "live\n".into(), "text/plain"),
            "/ready" if self.is_ready() => text(StatusCode::OK, "ready\n".into(), "text/plain"),
            "/ready" => {
                let reason = self.unready_reason.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let body = reason.map(|r| format!("not ready: {r}\n")).unwrap_or_else(|| "not ready\n".into());
                text(StatusCode::SERVICE_UNAVAILABLE, body, "text/plain")
            }
            "/metrics" => {
                text(StatusCode::OK, self.metrics_text(), "application/openmetrics-text; version=1.0.0; charset=utf-8")
            }
            "/config" => {
                let view = self.config.lock().unwrap_or_else(|e| e.into_inner());
                let body = view.as_ref().map(|f| f()).unwrap_or_else(|| "{}".into());
                text(StatusCode::OK, body, "application/json")
            }
            path => {
                let checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((_, check)) = checks.iter().find(|(p, _)| *p == path) {
                    return match check() {
                        None => text(StatusCode::OK, "ok\n".into(), "text/plain"),
                        Some(r) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {r}\n"), "text/plain"),
                    };
                }
                text(StatusCode::NOT_FOUND, "not found: try /live, /ready, /metrics, /config\n".into(), "text/plain")
            }
        }
    }
}

/// Binds the admin listener (so a bad address fails at start-up).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves the admin endpoint until the task is dropped. It never drains:
/// `/ready` must keep answering (503) while the rest of the process drains.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    weft_runtime::serve(listener, Drain::never(), "admin", move |stream, _, _| {
        let admin = admin.clone();
        async move {
            let svc = service_fn(move |req| {
                let resp = admin.handle(&req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One raw HTTP/1.1 request; the status line and body.
    async fn call(addr: SocketAddr, method: &str, path: &str) -> (String, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out.lines().next().unwrap_or_default().to_string();
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    }

    #[tokio::test]
    async fn answers_live_ready_metrics_and_config() {
        let mut reg = Registry::default();
        let hits = prometheus_client::metrics::counter::Counter::<u64>::default();
        reg.register("hits", "test counter", hits.clone());
        hits.inc();
        let admin = Admin::new(reg);
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, admin.clone()));

        assert!(call(addr, "GET", "/live").await.0.contains("200"));
        assert!(call(addr, "GET", "/ready").await.0.contains("503"));
        admin.set_ready(true);
        assert!(call(addr, "GET", "/ready").await.0.contains("200"));
        admin.set_unready_reason(Some("local app at 127.0.0.1:9 refuses connections".into()));
        let (status, body) = call(addr, "GET", "/ready").await;
        assert!(
            status.contains("503") && body == "not ready: local app at 127.0.0.1:9 refuses connections\n",
            "{body}"
        );
        admin.set_unready_reason(None);
        assert!(call(addr, "GET", "/ready").await.0.contains("200"));
        let (status, body) = call(addr, "GET", "/metrics").await;
        assert!(status.contains("200") && body.contains("hits_total 1"), "{body}");
        assert_eq!(call(addr, "GET", "/config").await.1, "{}");
        admin.set_config_view(|| "{\"version\":3}".into());
        assert_eq!(call(addr, "GET", "/config").await.1, "{\"version\":3}");
        assert!(call(addr, "GET", "/nope").await.0.contains("404"));
        let down = Arc::new(Mutex::new(Some("store x is unreachable".to_string())));
        let d = down.clone();
        admin.add_check("/ready/writes", move || d.lock().unwrap().clone());
        let (status, body) = call(addr, "GET", "/ready/writes").await;
        assert!(status.contains("503") && body == "not ready: store x is unreachable\n", "{body}");
        assert!(call(addr, "GET", "/ready").await.0.contains("200"), "a check does not touch /ready");
        *down.lock().unwrap() = None;
        assert!(call(addr, "GET", "/ready/writes").await.0.contains("200"));
        assert!(call(addr, "POST", "/ready").await.0.contains("405"));
    }
}
