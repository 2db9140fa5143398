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
/// `<name> <path>`. `/status/<code>` answers that status.
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
    let full = |s: String| {
        Full::new(Bytes::from(s))
            .map_err(|never| match never {})
            .boxed()
    };
    let path = req.uri().path().to_string();
    if path == "/echo-headers" {
        let mut out = format!("version: {:?}\n", req.version());
        for (k, v) in req.headers() {
            out.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("<binary>")));
        }
        return Response::new(full(out));
    }
    if let Some(code) = path
        .strip_prefix("/status/")
        .and_then(|c| c.parse::<u16>().ok())
    {
        let mut r = Response::new(full(format!("{name} status {code}")));
        *r.status_mut() = http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::OK);
        return r;
    }
    if req.method() == http::Method::POST || req.method() == http::Method::PUT {
        // Streamed straight back, frame by frame.
        return Response::new(req.into_body().boxed());
    }
    Response::new(full(format!("{name} {path}")))
}

/// A TCP server that echoes every byte back.
pub async fn tcp_echo() -> Server {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = l.accept().await else {
                continue;
            };
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
    Server { addr, task }
}

#[derive(Default)]
struct EchoService;

#[tonic::async_trait]
impl echo::echo_server::Echo for EchoService {
    async fn unary(&self, req: GrpcRequest<echo::Msg>) -> Result<GrpcResponse<echo::Msg>, Status> {
        let caller = req
            .metadata()
            .get("x-weft-peer-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let mut resp = GrpcResponse::new(req.into_inner());
        resp.metadata_mut().insert(
            "x-echo-caller",
            caller
                .parse()
                .unwrap_or_else(|_| "bad".parse().expect("ascii")),
        );
        Ok(resp)
    }

    type BidiStream = Pin<Box<dyn Stream<Item = Result<echo::Msg, Status>> + Send>>;

    async fn bidi(
        &self,
        req: GrpcRequest<Streaming<echo::Msg>>,
    ) -> Result<GrpcResponse<Self::BidiStream>, Status> {
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
            let _ = tx
                .send(Err(Status::out_of_range(format!("done after {count}"))))
                .await;
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

/// A tonic gRPC server (h2c) with the Echo service.
pub async fn grpc_echo() -> Server {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(echo::echo_server::EchoServer::new(EchoService))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
            .await;
    });
    Server { addr, task }
}
