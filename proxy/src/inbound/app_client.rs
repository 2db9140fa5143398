//! The callee's sidecar's HTTP client to the local app, built for the
//! keep-alive race: an app closes an idle connection just as the sidecar
//! sends a request on it, and the request fails though the app never saw it.
//!
//! - Idle connections are kept only `--app-idle-timeout` (default 500 ms),
//!   below the keep-alive timeout of common app servers (gunicorn 2 s,
//!   Node.js and uvicorn 5 s, nginx 75 s), so the sidecar closes them first:
//!   a checkout never takes one idle that long, and a reaper task closes it.
//! - An HTTP/1.1 request that fails on a *reused* connection before any byte
//!   of its response arrived is sent once more on a fresh connection (never
//!   pooled), if its body could be kept: no body, or a body of known length up
//!   to [`REPLAY_MAX`] bytes without `Expect: 100-continue` (buffered before
//!   sending), or any request hyper hands back unwritten. Whatever the
//!   method: a connection closed with no answer on reuse is the app closing
//!   its idle connection, which has not read the request. A request with a
//!   larger or streamed body is not retried (its bytes are gone): the caller
//!   gets the 502 and decides, as it would for any non-idempotent request.
//! - A connection goes back to the pool only once its response body has been
//!   read to the end and hyper is ready for the next request on it.
//! - Response heads are read into a buffer bounded by the header limit
//!   ([`Limits::parser_bytes`]).
//!
//! HTTP/1.1 uses a small pool of our own over `hyper::client::conn::http1`
//! (one per worker, a `Mutex<Vec>` of idle connections): the hot path of a
//! sidecar, where hyper-util's general client (pool keys, checkout futures,
//! a task per returned connection) cost ~10% of the callee sidecar's
//! instructions. h2c, a rare path, stays on hyper-util's client.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
// tokio's, so that a paused test clock and the reaper's timer agree.
use tokio::time::Instant;

use crate::error::cause;
use crate::http::{boxed, Body};
use crate::limits::{self, Limits};

/// The largest request body kept so the request can be sent again (bytes).
pub const REPLAY_MAX: u64 = 64 * 1024;

/// Why a request to the local app got no response.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The app's port did not take the TCP connection (nothing was sent).
    #[error("cannot connect: {}", cause(.0))]
    Connect(#[source] std::io::Error),
    /// The connection broke (or the app closed it) before a whole response
    /// head arrived.
    #[error("no response: {}", cause(.0))]
    NoResponse(#[source] hyper::Error),
    /// The h2c client's error.
    #[error("{}", legacy_cause(.0))]
    H2c(#[source] hyper_util::client::legacy::Error),
}

impl AppError {
    /// Whether the connection to the app could not be made: the app never
    /// saw the request.
    pub fn is_connect(&self) -> bool {
        match self {
            AppError::Connect(_) => true,
            AppError::NoResponse(_) => false,
            AppError::H2c(e) => e.is_connect(),
        }
    }
}

/// hyper-util's own text ("client error (SendRequest)") names its step, not
/// the cause; the cause is in its source chain.
fn legacy_cause(err: &hyper_util::client::legacy::Error) -> String {
    use std::error::Error as _;
    let step = if err.is_connect() { "cannot connect" } else { "no response" };
    match err.source() {
        Some(source) => format!("{step}: {}", cause(source)),
        None => step.to_string(),
    }
}

/// A pooled client to the local app (HTTP/1.1 or h2c), see the module docs.
#[derive(Clone, Debug)]
pub struct AppClient {
    inner: Inner,
}

#[derive(Clone, Debug)]
enum Inner {
    Http1(Arc<Pool>),
    H2c(Box<Client<AppConnector, Body>>),
}

impl AppClient {
    /// An HTTP/1.1 client to `app`, with the one retry on a reused connection.
    pub fn http1(app: SocketAddr, limits: &Limits) -> Self {
        let mut builder = http1::Builder::new();
        builder.max_buf_size(limits.parser_bytes()).max_headers(crate::limits::HTTP1_MAX_HEADER_FIELDS);
        let pool = Pool {
            app,
            builder,
            idle_timeout: limits.app_idle_timeout,
            idle: Mutex::new(IdleList { conns: Vec::new(), reaping: false }),
        };
        Self { inner: Inner::Http1(Arc::new(pool)) }
    }

    /// An h2c (HTTP/2 prior knowledge) client to `app`.
    pub fn h2(app: SocketAddr, limits: &Limits) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(limits.app_idle_timeout)
            .http2_max_header_list_size(limits.parser_bytes_u32())
            .http2_keep_alive_interval(limits::H2_KEEP_ALIVE_INTERVAL)
            .http2_keep_alive_timeout(limits::H2_KEEP_ALIVE_TIMEOUT)
            .build(AppConnector { app });
        Self { inner: Inner::H2c(Box::new(client)) }
    }

    /// Sends `req` to the app (see the module docs for the one retry).
    pub async fn request(&self, req: Request<Body>) -> Result<Response<AppBody>, AppError> {
        match &self.inner {
            Inner::Http1(pool) => pool.request(req).await,
            Inner::H2c(client) => {
                let resp = client.request(req).await.map_err(AppError::H2c)?;
                Ok(resp.map(|inner| AppBody { inner, back: None }))
            }
        }
    }
}

/// HTTP/1.1 connections to one app, idle ones kept for reuse.
struct Pool {
    app: SocketAddr,
    builder: http1::Builder,
    idle_timeout: Duration,
    idle: Mutex<IdleList>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("app", &self.app).field("idle_timeout", &self.idle_timeout).finish()
    }
}

struct IdleList {
    /// Oldest first: checkouts take the newest, least likely closed by the app.
    conns: Vec<Idle>,
    /// Whether a reaper task is closing the stale ones.
    reaping: bool,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// One HTTP/1.1 connection to the app; dropping the last sender closes it
/// once idle (hyper's connection task ends when no request can come).
struct Conn {
    tx: http1::SendRequest<Body>,
    /// Bytes read from the app on this connection, to tell whether a failed
    /// request had any of its response.
    read: Arc<AtomicU64>,
}

impl Pool {
    async fn request(self: &Arc<Self>, req: Request<Body>) -> Result<Response<AppBody>, AppError> {
        let (mut parts, body) = req.into_parts();
        origin_form(&mut parts);
        // A caller waiting on `Expect: 100-continue` sends its body only once
        // the app agrees: buffering it first would take that choice from the app.
        let expects = parts.headers.contains_key(http::header::EXPECT);
        let (mut conn, reused) = match self.checkout() {
            Some(conn) => (conn, true),
            None => (self.connect().await?, false),
        };
        // Only a reused connection's request is retried: a fresh one's needs no copy.
        let replayable =
            reused && (body.is_end_stream() || (!expects && body.size_hint().exact().is_some_and(|n| n <= REPLAY_MAX)));
        // The copy for the one retry: the head without the extensions (the
        // sidecar's own, of no use to the app's connection), and the body.
        let (req, copy) = if !replayable {
            (Request::from_parts(parts, body), None)
        } else if body.is_end_stream() {
            // Nothing to buffer (e.g. a GET): the body goes on as it is.
            let copy = crate::http::head_only(&parts);
            (Request::from_parts(parts, body), Some((copy, Bytes::new())))
        } else {
            match body.collect().await {
                Ok(b) => {
                    let bytes = b.to_bytes();
                    let copy = crate::http::head_only(&parts);
                    (Request::from_parts(parts, boxed(Full::new(bytes.clone()))), Some((copy, bytes)))
                }
                // The caller's body broke: let the request fail with that error.
                Err(e) => {
                    let broken = StreamBody::new(futures::stream::iter([Err::<Frame<Bytes>, _>(e)]));
                    (Request::from_parts(parts, boxed(broken)), None)
                }
            }
        };
        let read_before = conn.read.load(Ordering::Relaxed);
        let err = match conn.tx.try_send_request(req).await {
            Ok(resp) => return Ok(self.answered(conn, resp)),
            Err(err) => err,
        };
        let (error, retry) = if !reused {
            (err.into_error(), None)
        } else {
            let mut err = err;
            match err.take_message() {
                // Never written: whatever its body, it can go as it is.
                Some(req) => (err.into_error(), Some(req)),
                None if conn.read.load(Ordering::Relaxed) == read_before => {
                    (err.into_error(), copy.map(|(head, bytes)| Request::from_parts(head, boxed(Full::new(bytes)))))
                }
                // Part of a response came: the app saw the request.
                None => (err.into_error(), None),
            }
        };
        let Some(req) = retry else { return Err(AppError::NoResponse(error)) };
        tracing::debug!(%error, "app closed a reused connection without answering; retrying on a fresh one");
        drop(conn);
        let mut fresh = self.connect().await?;
        let resp = fresh.tx.send_request(req).await.map_err(AppError::NoResponse)?;
        // Never pooled: this connection is only for the retry.
        Ok(resp.map(|inner| AppBody { inner, back: None }))
    }

    /// The newest idle connection ready for a request, closing the stale
    /// and closed ones met on the way.
    fn checkout(&self) -> Option<Conn> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(i) = idle.conns.pop() {
            if now.duration_since(i.since) >= self.idle_timeout {
                // Older ones are staler still: close them all.
                idle.conns.clear();
                return None;
            }
            if i.conn.tx.is_ready() {
                return Some(i.conn);
            }
        }
        None
    }

    async fn connect(&self) -> Result<Conn, AppError> {
        let tcp = TcpStream::connect(self.app).await.map_err(AppError::Connect)?;
        tcp.set_nodelay(true).map_err(AppError::Connect)?;
        let read = Arc::new(AtomicU64::new(0));
        let io = TokioIo::new(Counted { tcp, read: read.clone() });
        let (tx, connection) = self.builder.handshake(io).await.map_err(AppError::NoResponse)?;
        let app = self.app;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                // The request on it, if any, gets the error too.
                tracing::debug!(%app, %error, "connection to the local app ended");
            }
        });
        Ok(Conn { tx, read })
    }

    /// The response, with its connection to go back to the pool once the
    /// body has been read to the end.
    fn answered(self: &Arc<Self>, conn: Conn, resp: Response<Incoming>) -> Response<AppBody> {
        let (parts, inner) = resp.into_parts();
        let done = inner.is_end_stream();
        let mut body = AppBody { inner, back: Some(GiveBack { pool: self.clone(), conn }) };
        if done {
            body.give_back();
        }
        Response::from_parts(parts, body)
    }

    /// Keeps `conn` for reuse once hyper can take a request on it.
    fn put(self: &Arc<Self>, mut conn: Conn) {
        if self.idle_timeout.is_zero() || conn.tx.is_closed() {
            return;
        }
        if conn.tx.is_ready() {
            return self.keep(conn);
        }
        // Its request body is still being written, or hyper has yet to see the
        // end of the exchange: wait for it (rare; a task only then).
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            if conn.tx.ready().await.is_ok() {
                if let Some(pool) = pool.upgrade() {
                    pool.keep(conn);
                }
            }
        });
    }

    fn keep(self: &Arc<Self>, conn: Conn) {
        let since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.conns.push(Idle { conn, since });
        if !idle.reaping {
            idle.reaping = true;
            tokio::spawn(reap(Arc::downgrade(self), since + self.idle_timeout));
        }
    }
}

/// Closes the pool's connections idle for its timeout (the app may close
/// them any moment after), waking at the oldest one's deadline; ends when
/// none is left, to be started again by the next one kept.
async fn reap(pool: Weak<Pool>, mut wake: Instant) {
    loop {
        tokio::time::sleep_until(wake).await;
        let Some(pool) = pool.upgrade() else { return };
        let now = Instant::now();
        let mut idle = pool.idle.lock().unwrap_or_else(PoisonError::into_inner);
        // Dropping a sender closes its idle connection.
        idle.conns.retain(|i| now.duration_since(i.since) < pool.idle_timeout && !i.conn.tx.is_closed());
        match idle.conns.first() {
            Some(oldest) => wake = oldest.since + pool.idle_timeout,
            None => {
                idle.reaping = false;
                return;
            }
        }
    }
}

/// The app's response body; an HTTP/1.1 connection goes back to the pool
/// when it has been read to the end (dropped earlier, the connection closes).
#[derive(Debug)]
pub struct AppBody {
    inner: Incoming,
    back: Option<GiveBack>,
}

struct GiveBack {
    pool: Arc<Pool>,
    conn: Conn,
}

impl std::fmt::Debug for GiveBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GiveBack").finish_non_exhaustive()
    }
}

impl AppBody {
    fn give_back(&mut self) {
        if let Some(GiveBack { pool, conn }) = self.back.take() {
            pool.put(conn);
        }
    }
}

impl http_body::Body for AppBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            // The reader may stop at `is_end_stream` without polling for the end.
            None => self.give_back(),
            Some(Ok(_)) if self.inner.is_end_stream() => self.give_back(),
            Some(Ok(_)) => {}
            // A broken connection is not reused.
            Some(Err(_)) => self.back = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Puts the request target in origin form (`/path?query`), as an HTTP/1.1
/// request to an origin server has it. `Host` is the caller's to set
/// (`app.rs` sets it from the authority).
fn origin_form(parts: &mut http::request::Parts) {
    if parts.uri.scheme().is_none() && parts.uri.authority().is_none() {
        return;
    }
    let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    parts.uri = http::Uri::from(path);
}

/// A TCP connection to the app counting the bytes read from it.
struct Counted {
    tcp: TcpStream,
    read: Arc<AtomicU64>,
}

impl AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.tcp).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
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

/// Connects every h2c request to the local app, whatever the URI says.
#[derive(Clone, Debug)]
pub struct AppConnector {
    app: SocketAddr,
}

impl tower::Service<http::Uri> for AppConnector {
    type Response = TokioIo<TcpStream>;
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
            Ok(TokioIo::new(tcp))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    use http::StatusCode;
    use hyper::service::service_fn;

    /// What the test server saw.
    #[derive(Default)]
    struct Seen {
        /// Connections accepted.
        accepted: AtomicUsize,
        /// Connections that ended.
        closed: AtomicUsize,
        /// Requests received (answered or not).
        requests: AtomicUsize,
    }

    /// A hyper HTTP/1.1 server on 127.0.0.1 answering `ok <path> <body
    /// length>`. With `answer_once`, the second request on a connection is
    /// read whole and the connection closed with no answer, as an app
    /// closing its idle connection as a request arrives (without
    /// `Connection: close` on the first answer).
    async fn server(answer_once: bool) -> (SocketAddr, Arc<Seen>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let s = seen.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = l.accept().await.unwrap();
                s.accepted.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                tokio::spawn(async move {
                    let on_conn = Arc::new(AtomicUsize::new(0));
                    let svc = {
                        let s = s.clone();
                        service_fn(move |req: Request<Incoming>| {
                            let (s, on_conn) = (s.clone(), on_conn.clone());
                            async move {
                                s.requests.fetch_add(1, Ordering::SeqCst);
                                let path = req.uri().to_string();
                                let body = req.into_body().collect().await.map_err(std::io::Error::other)?.to_bytes();
                                if answer_once && on_conn.fetch_add(1, Ordering::SeqCst) >= 1 {
                                    return Err(std::io::Error::other("closing without an answer"));
                                }
                                let text = format!("ok {path} {}", body.len());
                                Ok::<_, std::io::Error>(Response::new(Full::new(Bytes::from(text))))
                            }
                        })
                    };
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
                    s.closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (addr, seen)
    }

    fn limits(idle: Duration) -> Limits {
        Limits { app_idle_timeout: idle, ..Limits::default() }
    }

    fn get(app: SocketAddr, path: &str) -> Request<Body> {
        Request::get(format!("http://{app}{path}")).body(crate::http::empty()).unwrap()
    }

    async fn text(resp: Response<AppBody>) -> String {
        assert_eq!(resp.status(), StatusCode::OK);
        String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn an_idle_connection_is_reused_once_its_response_was_read() {
        let (app, seen) = server(false).await;
        let client = AppClient::http1(app, &limits(Duration::from_secs(5)));
        let first = client.request(get(app, "/a")).await.unwrap();
        // Its body unread: the connection is still busy, a second request gets another.
        let second = client.request(get(app, "/b")).await.unwrap();
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(text(first).await, "ok /a 0");
        assert_eq!(text(second).await, "ok /b 0");
        for path in ["/c", "/d", "/e"] {
            assert_eq!(text(client.request(get(app, path)).await.unwrap()).await, format!("ok {path} 0"));
        }
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 2, "read responses' connections are reused");
        assert_eq!(seen.closed.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_after_the_idle_timeout_and_not_reused() {
        let (app, seen) = server(false).await;
        let client = AppClient::http1(app, &limits(Duration::from_millis(100)));
        assert_eq!(text(client.request(get(app, "/a")).await.unwrap()).await, "ok /a 0");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(seen.closed.load(Ordering::SeqCst), 0, "still kept inside the idle timeout");
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(seen.closed.load(Ordering::SeqCst), 1, "closed by the sidecar after the idle timeout");
        assert_eq!(text(client.request(get(app, "/b")).await.unwrap()).await, "ok /b 0");
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_request_the_app_closed_unanswered_on_a_reused_connection_is_sent_once_more() {
        let (app, seen) = server(true).await;
        let client = AppClient::http1(app, &limits(Duration::from_secs(5)));
        assert_eq!(text(client.request(get(app, "/a")).await.unwrap()).await, "ok /a 0");
        // Reuses the connection; the app reads it and closes: sent again on a fresh one.
        assert_eq!(text(client.request(get(app, "/b")).await.unwrap()).await, "ok /b 0");
        assert_eq!(seen.requests.load(Ordering::SeqCst), 3);
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
        // The retry's connection was not pooled: a new one, then reused for a body.
        assert_eq!(text(client.request(get(app, "/c")).await.unwrap()).await, "ok /c 0");
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 3, "the retry's connection is not pooled");
        let post = Request::post(format!("http://{app}/d")).body(boxed(Full::new(Bytes::from("hello")))).unwrap();
        assert_eq!(text(client.request(post).await.unwrap()).await, "ok /d 5", "the kept body is sent again");
        assert_eq!(seen.requests.load(Ordering::SeqCst), 6);
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_streamed_body_is_not_sent_again() {
        let (app, seen) = server(true).await;
        let client = AppClient::http1(app, &limits(Duration::from_secs(5)));
        assert_eq!(text(client.request(get(app, "/a")).await.unwrap()).await, "ok /a 0");
        let chunks = [Ok::<_, std::io::Error>(Frame::data(Bytes::from("hel"))), Ok(Frame::data(Bytes::from("lo")))];
        let streamed = boxed(StreamBody::new(futures::stream::iter(chunks)));
        assert_eq!(streamed.size_hint().exact(), None);
        let err = client.request(Request::post(format!("http://{app}/b")).body(streamed).unwrap()).await.unwrap_err();
        assert!(!err.is_connect(), "{err}");
        assert!(err.to_string().starts_with("no response: "), "{err}");
        assert_eq!(seen.requests.load(Ordering::SeqCst), 2);
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 1, "no retry");
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let client = AppClient::http1(closed, &Limits::default());
        let err = client.request(get(closed, "/")).await.unwrap_err();
        assert!(err.is_connect(), "{err}");
        use std::error::Error as _;
        let io = err.source().and_then(|s| s.downcast_ref::<std::io::Error>()).expect("the io error as source");
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
    }
}
