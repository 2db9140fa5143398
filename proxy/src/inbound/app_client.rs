//! The callee's sidecar's HTTP client to the local app, built for the
//! keep-alive race: an app closes an idle connection just as the sidecar
//! sends a request on it, and the request fails though the app never saw it.
//!
//! - Idle connections are kept only `--app-idle-timeout` (default 500 ms),
//!   below the keep-alive timeout of common app servers (gunicorn 2 s,
//!   Node.js and uvicorn 5 s, nginx 75 s), so the sidecar closes them first.
//! - An HTTP/1.1 request that fails on a *reused* connection before any byte
//!   of its response arrived is sent once more on a fresh connection (never
//!   pooled), if its body could be kept: no body, or a body of known length up
//!   to [`REPLAY_MAX`] bytes without `Expect: 100-continue` (buffered before
//!   sending). Whatever the method: a connection closed with no answer on
//!   reuse is the app closing its idle connection, which has not read the
//!   request. A request with a larger or
//!   streamed body is not retried (its bytes are gone): the caller gets the
//!   502 and decides, as it would for any non-idempotent request.
//! - Response heads are read into a buffer bounded by the header limit
//!   ([`Limits::parser_bytes`]).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body as _;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::{Client, Error};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::http::{boxed, Body};
use crate::limits::{self, Limits};

/// The largest request body kept so the request can be sent again (bytes).
pub const REPLAY_MAX: u64 = 64 * 1024;

/// A pooled client to the local app (HTTP/1.1 or h2c), see the module docs.
#[derive(Clone, Debug)]
pub struct AppClient {
    pooled: Client<TrackedConnector, Body>,
    /// For the one retry: a connection of its own, not returned to the pool.
    fresh: Option<Client<TrackedConnector, Body>>,
}

impl AppClient {
    /// An HTTP/1.1 client to `app`, with the one retry on a reused connection.
    pub fn http1(app: SocketAddr, limits: &Limits) -> Self {
        let build = |idle: usize| {
            Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(limits.app_idle_timeout)
                .pool_max_idle_per_host(idle)
                .http1_max_buf_size(limits.parser_bytes())
                .http1_max_headers(crate::limits::HTTP1_MAX_HEADER_FIELDS)
                .build(TrackedConnector { app })
        };
        Self { pooled: build(usize::MAX), fresh: Some(build(0)) }
    }

    /// An h2c (HTTP/2 prior knowledge) client to `app`.
    pub fn h2(app: SocketAddr, limits: &Limits) -> Self {
        let pooled = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(limits.app_idle_timeout)
            .http2_max_header_list_size(limits.parser_bytes_u32())
            .http2_keep_alive_interval(limits::H2_KEEP_ALIVE_INTERVAL)
            .http2_keep_alive_timeout(limits::H2_KEEP_ALIVE_TIMEOUT)
            .build(TrackedConnector { app });
        Self { pooled, fresh: None }
    }

    /// Sends `req` to the app (see the module docs for the one retry).
    pub async fn request(&self, req: Request<Body>) -> Result<Response<Incoming>, Error> {
        let Some(fresh) = &self.fresh else { return self.pooled.request(req).await };
        let (parts, body) = req.into_parts();
        // A caller waiting on `Expect: 100-continue` sends its body only once
        // the app agrees: buffering it first would take that choice from the app.
        let expects = parts.headers.contains_key(http::header::EXPECT);
        let replayable =
            body.is_end_stream() || (!expects && body.size_hint().exact().is_some_and(|n| n <= REPLAY_MAX));
        if !replayable {
            return self.pooled.request(Request::from_parts(parts, body)).await;
        }
        // The copy for the one retry: the head without the extensions (the
        // sidecar's own, of no use to the app's connection), and the body.
        let copy = head_only(&parts);
        let (first, bytes) = if body.is_end_stream() {
            // Nothing to buffer (e.g. a GET): the body goes on as it is.
            (Request::from_parts(parts, body), Bytes::new())
        } else {
            match body.collect().await {
                Ok(b) => {
                    let bytes = b.to_bytes();
                    (Request::from_parts(parts, boxed(Full::new(bytes.clone()))), bytes)
                }
                // The caller's body broke: let the request fail with that error.
                Err(e) => {
                    let broken = StreamBody::new(futures::stream::iter([Err::<http_body::Frame<Bytes>, _>(e)]));
                    return self.pooled.request(Request::from_parts(parts, boxed(broken))).await;
                }
            }
        };
        match self.pooled.request(first).await {
            Err(e) if unanswered_on_reuse(&e) => {
                tracing::debug!(error = %e, "app closed a reused connection without answering; retrying on a fresh one");
                fresh.request(Request::from_parts(copy, boxed(Full::new(bytes)))).await
            }
            r => r,
        }
    }
}

/// A copy of a request head without its extensions.
fn head_only(parts: &http::request::Parts) -> http::request::Parts {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req.into_parts().0
}

/// Whether `e` happened on a connection that had carried an earlier
/// exchange, before any byte of this request's response arrived.
fn unanswered_on_reuse(e: &Error) -> bool {
    if e.is_connect() {
        return false;
    }
    let Some(info) = e.connect_info() else { return false };
    let mut ext = http::Extensions::new();
    info.get_extras(&mut ext);
    ext.get::<Arc<ConnUse>>()
        .is_some_and(|u| u.exchanges.load(Ordering::SeqCst) >= 2 && !u.answered.load(Ordering::SeqCst))
}

/// What one connection to the app has carried: how many request/response
/// exchanges began on it (a write after a read starts one) and whether the
/// current one has had a response byte.
#[derive(Debug, Default)]
struct ConnUse {
    exchanges: AtomicU64,
    answered: AtomicBool,
    writing: AtomicBool,
}

/// Connects every request to the local app, whatever the URI says, and
/// tracks each connection's [`ConnUse`].
#[derive(Clone, Debug)]
pub struct TrackedConnector {
    app: SocketAddr,
}

impl tower::Service<http::Uri> for TrackedConnector {
    type Response = TokioIo<Tracked>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let app = self.app;
        Box::pin(async move {
            let tcp = TcpStream::connect(app).await?;
            tcp.set_nodelay(true)?;
            Ok(TokioIo::new(Tracked { tcp, used: Arc::default() }))
        })
    }
}

/// A connection to the app that records its [`ConnUse`].
#[derive(Debug)]
pub struct Tracked {
    tcp: TcpStream,
    used: Arc<ConnUse>,
}

impl Connection for Tracked {
    fn connected(&self) -> Connected {
        Connected::new().extra(self.used.clone())
    }
}

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.used.answered.store(true, Ordering::SeqCst);
            self.used.writing.store(false, Ordering::SeqCst);
        }
        r
    }
}

impl Tracked {
    fn wrote(&self, n: usize) {
        if n > 0 && !self.used.writing.swap(true, Ordering::SeqCst) {
            self.used.exchanges.fetch_add(1, Ordering::SeqCst);
            self.used.answered.store(false, Ordering::SeqCst);
        }
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.wrote(n);
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.wrote(n);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}
