//! Small real servers for end-to-end tests, each on a free loopback port.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status, Streaming};

pub mod echo {
    tonic::include_proto!("weft.testing.v1");
}

/// A server task that stops when dropped.
pub struct Server {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// HTTP/1.1 + h2c server. `GET /echo-headers` answers with the request's
/// headers (one `name: value` per line) and the protocol version; any
/// request with a body gets the body streamed back; everything else answers
/// `<name> <path>`. `/status/<code>` answers that status;
/// `/response-header/<n>` answers with a header `x-big` of `n` bytes; `/sleep/<ms>`
/// answers `<name> slept <ms>` after that many milliseconds (at most 60 s).
pub async fn http(name: &'static str) -> Server {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(handle_http(name, req).await)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Server { addr, task }
}

type HttpBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

async fn handle_http(name: &str, req: Request<Incoming>) -> Response<HttpBody> {
    let full = |s: String| Full::new(Bytes::from(s)).map_err(|never| match never {}).boxed();
    let path = req.uri().path().to_string();
    if path == "/echo-headers" {
        let mut out = format!("version: {:?}\n", req.version());
        for (k, v) in req.headers() {
            out.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("<binary>")));
        }
        return Response::new(full(out));
    }
    if let Some(code) = path.strip_prefix("/status/").and_then(|c| c.parse::<u16>().ok()) {
        let mut r = Response::new(full(format!("{name} status {code}")));
        *r.status_mut() = http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::OK);
        return r;
    }
    if let Some(n) = path.strip_prefix("/response-header/").and_then(|n| n.parse::<usize>().ok()) {
        let mut r = Response::new(full(format!("{name} response header of {n} bytes")));
        let value = "h".repeat(n.min(1 << 20));
        r.headers_mut().insert("x-big", http::HeaderValue::from_str(&value).expect("ascii"));
        return r;
    }
    if let Some(ms) = path.strip_prefix("/sleep/").and_then(|m| m.parse::<u64>().ok()) {
        let ms = ms.min(60_000);
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        return Response::new(full(format!("{name} slept {ms}")));
    }
    if req.method() == http::Method::POST || req.method() == http::Method::PUT {
        // Streamed straight back, frame by frame.
        return Response::new(req.into_body().boxed());
    }
    Response::new(full(format!("{name} {path}")))
}

/// An HTTP/1.1 server written on raw sockets that, like many app servers,
/// closes a keep-alive connection once it has been idle for `idle`: it stops
/// reading then, and closes 20 ms later (the time a server spends on its
/// close: logging, a TLS close_notify...), so a request sent in that window
/// is never read. It answers every request `200 ok <path>` (reading a
/// `Content-Length` body first); the counter is the requests answered.
pub async fn http1_closing_idle(idle: std::time::Duration) -> (Server, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let answered = std::sync::Arc::new(AtomicU64::new(0));
    let counter = answered.clone();
    const CLOSING: std::time::Duration = std::time::Duration::from_millis(20);
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = l.accept().await else { continue };
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // Wait for the next request's head, closing once idle.
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        let wait = if buf.is_empty() { idle } else { std::time::Duration::from_secs(10) };
                        match tokio::time::timeout(wait, tcp.read(&mut chunk)).await {
                            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            Ok(_) => return,
                            // Idle: stop reading, and close after the server's closing work.
                            Err(_) => return tokio::time::sleep(CLOSING).await,
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    let length = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < end + length {
                        let mut chunk = [0u8; 4096];
                        match tcp.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    }
                    buf.drain(..end + length);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                    let body = format!("ok {path}");
                    let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                    if tcp.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    (Server { addr, task }, answered)
}

/// A TCP echo server that also answers HTTP: a connection whose first bytes
/// are `GET ` gets `200 echo-http` (and is closed); any other connection is
/// echoed byte for byte, like [`tcp_echo`].
pub async fn tcp_echo_or_http() -> Server {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = l.accept().await else { continue };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut first = true;
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if std::mem::take(&mut first) && buf[..n].starts_with(b"GET ") {
                                let _ = tcp
                                    .write_all(
                                        b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\nconnection: close\r\n\r\necho-http",
                                    )
                                    .await;
                                break;
                            }
                            if tcp.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    Server { addr, task }
}

/// A TCP server that echoes every byte back.
pub async fn tcp_echo() -> Server {
    tcp_echo_counting().await.0
}

/// [`tcp_echo`], also counting the connections it accepted.
pub async fn tcp_echo_counting() -> (Server, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = accepted.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = l.accept().await else {
                continue;
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if tcp.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    (Server { addr, task }, accepted)
}

#[derive(Default)]
struct EchoService {
    /// Fails every call with this status instead of answering.
    fail: Option<tonic::Code>,
    /// Calls received.
    calls: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

#[tonic::async_trait]
impl echo::echo_server::Echo for EchoService {
    async fn unary(&self, req: GrpcRequest<echo::Msg>) -> Result<GrpcResponse<echo::Msg>, Status> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Some(code) = self.fail {
            return Err(Status::new(code, "echo fails every call on purpose"));
        }
        // `x-sleep-ms: N` makes the call take N ms (for timeouts).
        let sleep = req.metadata().get("x-sleep-ms").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        if let Some(ms) = sleep {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        let caller = req.metadata().get("x-weft-peer-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let mut resp = GrpcResponse::new(req.into_inner());
        resp.metadata_mut().insert("x-echo-caller", caller.parse().unwrap_or_else(|_| "bad".parse().expect("ascii")));
        Ok(resp)
    }

    type BidiStream = Pin<Box<dyn Stream<Item = Result<echo::Msg, Status>> + Send>>;

    async fn bidi(&self, req: GrpcRequest<Streaming<echo::Msg>>) -> Result<GrpcResponse<Self::BidiStream>, Status> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Some(code) = self.fail {
            // Response headers first, the failure in the trailers.
            let out = async_stream_lite(move |tx| async move {
                let _ = tx.send(Err(Status::new(code, "echo fails every stream on purpose"))).await;
            });
            return Ok(GrpcResponse::new(out));
        }
        let mut inbound = req.into_inner();
        let out = async_stream_lite(move |tx| async move {
            let mut count = 0u64;
            while let Some(m) = inbound.message().await.transpose() {
                match m {
                    Ok(m) => {
                        count += 1;
                        if tx.send(Ok(m)).await.is_err() {
                            return;
                        }
                    }
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                }
            }
            // Ends with a non-OK status carrying the count, so the test can
            // see that trailers (grpc-status/grpc-message) made it through.
            let _ = tx.send(Err(Status::out_of_range(format!("done after {count}")))).await;
        });
        Ok(GrpcResponse::new(out))
    }
}

fn async_stream_lite<F, Fut>(f: F) -> Pin<Box<dyn Stream<Item = Result<echo::Msg, Status>> + Send>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<echo::Msg, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// A tonic gRPC server (h2c) with the Echo service. Unary calls with
/// `x-sleep-ms: N` metadata take N ms.
pub async fn grpc_echo() -> Server {
    grpc_serve(EchoService::default()).await
}

/// A tonic gRPC server (h2c) whose Echo service fails every call with
/// `code` (e.g. `Unavailable`, grpc-status 14, in trailers-only form as
/// tonic sends it), with a counter of the calls it got.
pub async fn grpc_failing(code: tonic::Code) -> (Server, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let svc = EchoService { fail: Some(code), ..Default::default() };
    let calls = svc.calls.clone();
    (grpc_serve(svc).await, calls)
}

async fn grpc_serve(svc: EchoService) -> Server {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(echo::echo_server::EchoServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
            .await;
    });
    Server { addr, task }
}

/// How a [`flaky`] server fails on purpose (answering 503).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The first request of each distinct `x-request-id` header gets 503, so
    /// a retry of it succeeds. Requests without the header are not failed.
    FirstPerRequestId,
    /// Every `n`th request (the `n`th, `2n`th, …) gets 503.
    EveryNth(u64),
    /// Fails only while unhealthy (see [`Flaky::set_healthy`]).
    OnlyWhenUnhealthy,
}

/// An [`http`] server that answers 503 (`<name> unavailable <path>`) by its
/// [`Failure`] mode, and to everything while unhealthy; otherwise it behaves
/// like [`http`]. It counts requests, in total and per `x-request-id`.
pub struct Flaky {
    pub server: Server,
    healthy: std::sync::Arc<std::sync::atomic::AtomicBool>,
    state: std::sync::Arc<std::sync::Mutex<FlakyState>>,
}

#[derive(Default)]
struct FlakyState {
    requests: u64,
    failed: u64,
    /// Requests seen per `x-request-id`.
    ids: std::collections::HashMap<String, u64>,
}

impl Flaky {
    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// Unhealthy: every request gets 503. Healthy: only the [`Failure`] mode fails.
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, std::sync::atomic::Ordering::SeqCst);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FlakyState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests received.
    pub fn requests(&self) -> u64 {
        self.state().requests
    }

    /// Requests answered 503 on purpose.
    pub fn failed(&self) -> u64 {
        self.state().failed
    }

    /// Requests received with `x-request-id: <id>`.
    pub fn hits(&self, id: &str) -> u64 {
        self.state().ids.get(id).copied().unwrap_or(0)
    }
}

/// Starts a [`Flaky`] server.
pub async fn flaky(name: &'static str, failure: Failure, healthy: bool) -> Flaky {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let healthy = Arc::new(AtomicBool::new(healthy));
    let state = Arc::new(Mutex::new(FlakyState::default()));
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (h, s) = (healthy.clone(), state.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                continue;
            };
            let (h, s) = (h.clone(), s.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (h, s) = (h.clone(), s.clone());
                    async move {
                        let fail = {
                            let mut st = s.lock().unwrap_or_else(|e| e.into_inner());
                            st.requests += 1;
                            let n = st.requests;
                            let id =
                                req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_string);
                            let seen = match &id {
                                Some(id) => {
                                    let c = st.ids.entry(id.clone()).or_insert(0);
                                    *c += 1;
                                    *c
                                }
                                None => 0,
                            };
                            let fail = !h.load(Ordering::SeqCst)
                                || match failure {
                                    Failure::FirstPerRequestId => seen == 1,
                                    Failure::EveryNth(k) => k > 0 && n % k == 0,
                                    Failure::OnlyWhenUnhealthy => false,
                                };
                            if fail {
                                st.failed += 1;
                            }
                            fail
                        };
                        let resp = if fail {
                            let body = format!("{name} unavailable {}", req.uri().path());
                            let mut r =
                                Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
                            *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                            r
                        } else {
                            handle_http(name, req).await
                        };
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Flaky { server: Server { addr, task }, healthy, state }
}
