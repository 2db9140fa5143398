//! The admin HTTP endpoint of every weft process.
//!
//! - `/live`: 200 while the process runs.
//! - `/ready`: 200 once [`Admin::set_ready`] said so (a sidecar: SVID + first config).
//! - `/metrics`: Prometheus text exposition of the process's registry.
//! - `/config`: what the process has applied, as JSON, from a callback.

pub mod ports;
pub mod state_lock;

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

type ConfigFn = Box<dyn Fn() -> String + Send + Sync>;

/// Shared state behind the admin endpoint.
pub struct Admin {
    ready: AtomicBool,
    registry: Mutex<Registry>,
    config: Mutex<Option<ConfigFn>>,
}

impl Admin {
    pub fn new(registry: Registry) -> Arc<Self> {
        Arc::new(Self { ready: AtomicBool::new(false), registry: Mutex::new(registry), config: Mutex::new(None) })
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Sets what `/config` shows.
    pub fn set_config_view(&self, f: impl Fn() -> String + Send + Sync + 'static) {
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
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
            "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into(), "text/plain"),
            "/metrics" => {
                text(StatusCode::OK, self.metrics_text(), "application/openmetrics-text; version=1.0.0; charset=utf-8")
            }
            "/config" => {
                let view = self.config.lock().unwrap_or_else(|e| e.into_inner());
                let body = view.as_ref().map(|f| f()).unwrap_or_else(|| "{}".into());
                text(StatusCode::OK, body, "application/json")
            }
            _ => text(StatusCode::NOT_FOUND, "not found: try /live, /ready, /metrics, /config\n".into(), "text/plain"),
        }
    }
}

/// Binds the admin listener (so a bad address fails at start-up).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves the admin endpoint until the task is dropped.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let resp = admin.handle(&req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Sets up `tracing` logs on stderr: human-readable, or JSON with `format == "json"`.
/// `RUST_LOG` overrides the default `info` level.
pub fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Logs and prints a fatal error (with its causes) and turns it into an exit code.
pub fn exit_code<E: std::fmt::Display>(result: Result<(), E>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Waits for SIGTERM or Ctrl-C (SIGINT) and names which one came.
pub async fn shutdown_signal() -> std::io::Result<&'static str> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    Ok(tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = term.recv() => "SIGTERM",
    })
}
