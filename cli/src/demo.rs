//! `weft demo-app`: a small HTTP service for demos and tests. It answers with
//! its service name and version, can call other services through its
//! sidecar, and can be told to fail or slow down (`/control?fail=0.3&delay=50ms`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;

/// A `--call` target must be a service name (it becomes the request's `Host`).
fn service_name(s: &str) -> Result<String, String> {
    if weft_config::registration::valid_service_name(s) {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not a service name (lower-case letters, digits and '-')"))
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// The service this app is.
    #[arg(long)]
    pub service: String,
    /// Version reported in answers (e.g. v1).
    #[arg(long, default_value = "")]
    pub version: String,
    /// Address to serve HTTP on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Services to call for each request (through --via).
    #[arg(long = "call", value_parser = service_name, requires = "via")]
    pub calls: Vec<String>,
    /// The sidecar's outbound listener.
    #[arg(long)]
    pub via: Option<SocketAddr>,
    /// Fraction of requests answered 503 (0..1).
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Delay before answering.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    pub delay: Duration,
}

struct State {
    args: DemoArgs,
    /// fail rate in millionths; delay in microseconds (changed via /control).
    fail_ppm: AtomicU64,
    delay_us: AtomicU64,
    client: Client<HttpConnector, Empty<Bytes>>,
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}

impl State {
    fn name(&self) -> String {
        if self.args.version.is_empty() {
            self.args.service.clone()
        } else {
            format!("{} {}", self.args.service, self.args.version)
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.uri().path() == "/control" {
            return self.control(req.uri().query().unwrap_or(""));
        }
        let delay = self.delay_us.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_micros(delay)).await;
        }
        let fail = self.fail_ppm.load(Ordering::Relaxed) as f64 / 1e6;
        if fail > 0.0 && rand::rng().random_bool(fail.min(1.0)) {
            return text(StatusCode::SERVICE_UNAVAILABLE, format!("{} failing on purpose\n", self.name()));
        }
        let caller = req.headers().get("x-weft-peer-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let mut body = self.name();
        if !caller.is_empty() {
            body.push_str(&format!(" (caller {caller})"));
        }
        for svc in &self.args.calls {
            let Some(via) = self.args.via else { break };
            let path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
            let out = Request::get(format!("http://{via}{path}"))
                .header("host", svc.as_str())
                .body(Empty::new())
                .expect("valid request");
            match self.client.request(out).await {
                Ok(resp) => {
                    let status = resp.status();
                    let b = resp.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                    let b = String::from_utf8_lossy(&b).trim().to_string();
                    if !status.is_success() {
                        return text(status, format!("{} -> {svc}: {status} {b}\n", self.name()));
                    }
                    body.push_str(&format!(" -> [{b}]"));
                }
                Err(e) => return text(StatusCode::BAD_GATEWAY, format!("{} -> {svc}: {e}\n", self.name())),
            }
        }
        body.push('\n');
        text(StatusCode::OK, body)
    }

    fn control(&self, query: &str) -> Response<Full<Bytes>> {
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "fail" => match v.parse::<f64>() {
                    Ok(f) if (0.0..=1.0).contains(&f) => self.fail_ppm.store((f * 1e6) as u64, Ordering::Relaxed),
                    _ => return text(StatusCode::BAD_REQUEST, format!("fail={v:?}: expected 0..1\n")),
                },
                "delay" => match humantime::parse_duration(v) {
                    Ok(d) => self.delay_us.store(d.as_micros() as u64, Ordering::Relaxed),
                    Err(e) => return text(StatusCode::BAD_REQUEST, format!("delay={v:?}: {e}\n")),
                },
                other => return text(StatusCode::BAD_REQUEST, format!("unknown control {other:?}; use fail, delay\n")),
            }
        }
        let fail = self.fail_ppm.load(Ordering::Relaxed) as f64 / 1e6;
        let delay = Duration::from_micros(self.delay_us.load(Ordering::Relaxed));
        text(StatusCode::OK, format!("fail={fail} delay={delay:?}\n"))
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    anyhow::ensure!((0.0..=1.0).contains(&args.fail_rate), "--fail-rate must be between 0 and 1");
    anyhow::ensure!(args.calls.is_empty() || args.via.is_some(), "--call needs --via (the sidecar's outbound address)");
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let state = Arc::new(State {
        fail_ppm: AtomicU64::new((args.fail_rate * 1e6) as u64),
        delay_us: AtomicU64::new(args.delay.as_micros() as u64),
        client: Client::builder(TokioExecutor::new()).build_http(),
        args,
    });
    tracing::info!(listen = %listener.local_addr()?, service = %state.args.service, "demo app listening");
    loop {
        let (tcp, _) = listener.accept().await?;
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(state.handle(req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
