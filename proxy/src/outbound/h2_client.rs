//! The HTTP/2 client of plain requests between sidecars, on the `h2` crate
//! directly (RFC 9113).
//!
//! hyper's HTTP/2 client hands every request through a channel to the task
//! that drives the connection, which opens the stream and spawns one more
//! task per request to wait for the response and pass it back over a
//! oneshot; and its keepalive bookkeeping takes a lock and reads the clock
//! on every frame. Here the caller's task opens the stream and waits for the
//! response itself (h2 shares the connection's state behind its own lock),
//! a request body is piped by a task only when there is one, and the
//! connection is pinged by a timer ([`drive`]). That took 13 % off the
//! caller's sidecar's instructions per request (docs/performance.md,
//! "Eighth session").
//!
//! CONNECT tunnels and carried exchanges (upgrades, 100-continue) stay on
//! hyper's client (`pool.rs`, [`super::pool::ConnKind::Upgrades`]): they
//! need its upgrade machinery, and they are rare.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::Either;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, Request, Response};
use http_body::{Body as _, Frame};

use crate::http::{boxed, Body, BodyError};

/// A raw HTTP/2 connection's request handle, and whether its driver has
/// ended (the connection is gone; the pool drops it).
#[derive(Clone, Debug)]
pub struct Sender {
    send: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl Sender {
    /// Whether the connection has ended or refused a new stream (GOAWAY).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Sends `req` and waits for the response head. The response's body
    /// returns the connection's flow-control window as it is read; dropping
    /// the future or the body resets the stream (CANCEL). `hold` is dropped
    /// with the response body (or on failure): a stream's lease on its
    /// connection.
    ///
    /// Errors: the request back when it was never sent (the connection is
    /// closed or going away), with h2's error; else the stream's or the
    /// connection's error (RST_STREAM, GOAWAY, I/O).
    pub async fn send<H>(&mut self, req: Request<Body>, hold: H) -> Result<Response<Body>, SendError>
    where
        H: Send + Sync + Unpin + 'static,
    {
        if let Err(source) = poll_fn(|cx| self.send.poll_ready(cx)).await {
            self.closed.store(true, Ordering::Relaxed);
            return Err(SendError { unsent: Some(req), source });
        }
        let (mut head, body) = req.into_parts();
        set_content_length(&head.method, &mut head.headers, &body);
        crate::http::detach_header_values(&mut head.headers);
        let end = body.is_end_stream();
        let (response, stream) = self
            .send
            .send_request(Request::from_parts(head, ()), end)
            .map_err(|source| SendError { unsent: None, source })?;
        // The stream lives while its body is piped or its response is read:
        // the lease is held by both, and the caller giving up (this future
        // or the response body dropped) stops the pipe, which resets the
        // stream (CANCEL) rather than leave it open at the peer.
        // (No allocation for either when there is no body to pipe.)
        let keep = if end {
            Either::Left(hold)
        } else {
            let hold = Arc::new(hold);
            let (cancel, cancelled) = futures::channel::oneshot::channel::<std::convert::Infallible>();
            tokio::spawn(pipe(body, stream, cancelled, hold.clone()));
            Either::Right((cancel, hold))
        };
        let resp = response.await.map_err(|source| SendError { unsent: None, source })?;
        Ok(resp.map(|rx| boxed(RecvBody { rx, data_done: false, _keep: keep })))
    }
}

/// A request that failed on a raw HTTP/2 connection.
#[derive(Debug)]
pub struct SendError {
    /// The request, when it was never sent.
    pub unsent: Option<Request<Body>>,
    pub source: h2::Error,
}

/// Starts a client on `io` (an mTLS stream that negotiated `h2`) with the
/// given builder's settings, and spawns its driver ([`drive`]): pings every
/// `keep_alive` interval, closed when a ping is not answered within
/// `keep_alive_timeout`. `on_settings` is called with the peer's
/// SETTINGS_MAX_CONCURRENT_STREAMS whenever the connection is polled.
///
/// Errors: the HTTP/2 preface or settings exchange failed.
pub async fn handshake<T>(
    io: T,
    builder: &h2::client::Builder,
    keep_alive: (Duration, Duration),
    on_settings: impl Fn(usize) + Send + Sync + 'static,
    on_end: impl FnOnce(Result<(), ConnError>) + Send + 'static,
) -> Result<Sender, h2::Error>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = builder.handshake::<T, Bytes>(io).await?;
    let closed = Arc::new(AtomicBool::new(false));
    let done = closed.clone();
    tokio::spawn(async move {
        let r = drive(conn, keep_alive, on_settings).await;
        done.store(true, Ordering::Relaxed);
        on_end(r);
    });
    Ok(Sender { send, closed })
}

/// Why a raw HTTP/2 connection ended in error.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error(transparent)]
    H2(#[from] h2::Error),
    /// The peer did not answer a keepalive PING in time; the connection was
    /// dropped (its streams fail).
    #[error("the peer did not answer an HTTP/2 ping within {0:?}")]
    PingTimeout(Duration),
}

/// Drives the connection until it ends; every `interval` sends a PING and
/// drops the connection if its PONG takes longer than `timeout`: a peer
/// that vanished without closing (a dead host, a partition) is found within
/// `interval + timeout` even when idle.
async fn drive<T>(
    mut conn: h2::client::Connection<T, Bytes>,
    (interval, timeout): (Duration, Duration),
    on_settings: impl Fn(usize),
) -> Result<(), ConnError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut keepalive = std::pin::pin!(keep_alive(conn.ping_pong(), interval, timeout));
    poll_fn(|cx| {
        let r = Pin::new(&mut conn).poll(cx);
        on_settings(conn.max_concurrent_send_streams());
        if let Poll::Ready(r) = r {
            return Poll::Ready(r.map_err(ConnError::from));
        }
        if let Poll::Ready(()) = keepalive.as_mut().poll(cx) {
            return Poll::Ready(Err(ConnError::PingTimeout(timeout)));
        }
        Poll::Pending
    })
    .await
}

/// Pings every `interval`; returns when a PONG is not back within `timeout`.
/// Pending forever without a ping handle (h2 gives it out once).
async fn keep_alive(ping: Option<h2::PingPong>, interval: Duration, timeout: Duration) {
    let Some(mut ping) = ping else { return std::future::pending().await };
    loop {
        tokio::time::sleep(interval).await;
        if ping.send_ping(h2::Ping::opaque()).is_err() {
            return std::future::pending().await;
        }
        match tokio::time::timeout(timeout, poll_fn(|cx| ping.poll_pong(cx))).await {
            Ok(Ok(_)) => {}
            // The connection itself failed: its own poll reports that.
            Ok(Err(_)) => return std::future::pending().await,
            Err(_elapsed) => return,
        }
    }
}

/// Sets `content-length` as hyper's client does when the body's size is
/// known and the request has none: for a non-empty body, or an empty one
/// of a method whose requests carry content (RFC 9110 8.6).
fn set_content_length(method: &http::Method, headers: &mut HeaderMap, body: &Body) {
    let Some(len) = body.size_hint().exact() else { return };
    let carries = !matches!(*method, http::Method::GET | http::Method::HEAD | http::Method::DELETE)
        && *method != http::Method::CONNECT
        && *method != http::Method::OPTIONS
        && *method != http::Method::TRACE;
    if (len != 0 || carries) && !headers.contains_key(http::header::CONTENT_LENGTH) {
        headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    }
}

/// Copies a request body into its stream as the peer's flow-control window
/// allows, then its trailers or END_STREAM; stops when the peer resets the
/// stream. A body that fails, or a caller that gave up (`cancelled`: its
/// sender dropped), resets the stream (CANCEL), so the far side sees a
/// broken request, not a short one, and stops waiting for the rest. `_hold`
/// (the stream's lease) is kept until then.
async fn pipe<H>(
    mut body: Body,
    mut tx: SendStream<Bytes>,
    mut cancelled: futures::channel::oneshot::Receiver<std::convert::Infallible>,
    _hold: Arc<H>,
) {
    let result: Result<(), Option<h2::Error>> = async {
        loop {
            let frame = poll_fn(|cx| {
                if let Poll::Ready(r) = tx.poll_reset(cx) {
                    return Poll::Ready(Err(r.err()));
                }
                if Pin::new(&mut cancelled).poll(cx).is_ready() {
                    tracing::debug!("the caller gave up on the request; resetting its stream");
                    tx.send_reset(Reason::CANCEL);
                    return Poll::Ready(Err(None));
                }
                Pin::new(&mut body).poll_frame(cx).map(Ok)
            })
            .await?;
            let frame = match frame {
                None => return tx.send_data(Bytes::new(), true).map_err(Some),
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "request body failed; resetting its stream");
                    tx.send_reset(Reason::CANCEL);
                    return Ok(());
                }
                Some(Ok(frame)) => frame,
            };
            let frame = match frame.into_data() {
                Ok(mut data) => {
                    let end = body.is_end_stream();
                    // An empty last frame (a common way to end a stream) sends END_STREAM alone.
                    if data.is_empty() && end {
                        return tx.send_data(data, true).map_err(Some);
                    }
                    while !data.is_empty() {
                        tx.reserve_capacity(data.len());
                        let cap = poll_fn(|cx| {
                            if let Poll::Ready(r) = tx.poll_reset(cx) {
                                return Poll::Ready(Err(r.err()));
                            }
                            if Pin::new(&mut cancelled).poll(cx).is_ready() {
                                tx.send_reset(Reason::CANCEL);
                                return Poll::Ready(Err(None));
                            }
                            // poll_capacity wakes on an increase only: capacity
                            // already assigned is read first.
                            match tx.capacity() {
                                0 => match ready!(tx.poll_capacity(cx)) {
                                    Some(r) => Poll::Ready(r.map_err(Some)),
                                    // The stream is gone: nothing more can be sent.
                                    None => Poll::Ready(Err(None)),
                                },
                                n => Poll::Ready(Ok(n)),
                            }
                        })
                        .await?;
                        if cap == 0 {
                            continue;
                        }
                        let chunk = data.split_to(cap.min(data.len()));
                        tx.send_data(chunk, end && data.is_empty()).map_err(Some)?;
                    }
                    if end {
                        return Ok(());
                    }
                    continue;
                }
                Err(frame) => frame,
            };
            if let Ok(trailers) = frame.into_trailers() {
                return tx.send_trailers(trailers).map_err(Some);
            }
        }
    }
    .await;
    if let Err(Some(e)) = result {
        tracing::debug!(error = %e, "request body not sent whole");
    }
}

/// A response body read from its stream: DATA, then trailers. Each chunk's
/// bytes go back to the stream's window as it is handed on.
struct RecvBody<K> {
    rx: RecvStream,
    data_done: bool,
    /// Dropped with the body: the lease, and with a request body being
    /// piped, the sender whose drop stops the pipe ([`pipe`]).
    _keep: K,
}

impl<K: Unpin> http_body::Body for RecvBody<K> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if !self.data_done {
            match ready!(self.rx.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.rx.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(BodyError::new(e)))),
                None => self.data_done = true,
            }
        }
        match ready!(self.rx.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(BodyError::new(e)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rx.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use http_body_util::{BodyExt, Full, StreamBody};

    const KEEP_ALIVE: (Duration, Duration) = (Duration::from_secs(20), Duration::from_secs(10));

    /// A client on one end of an in-memory pipe, h2's server on the other;
    /// the server's connection is handed to the test to drive (or not).
    async fn pair(
        window: u32,
    ) -> (Sender, h2::server::Connection<tokio::io::DuplexStream, Bytes>, tokio::sync::oneshot::Receiver<String>) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let server =
            tokio::spawn(async move { h2::server::Builder::new().initial_window_size(window).handshake(b).await });
        let mut builder = h2::client::Builder::new();
        builder.initial_window_size(window);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let on_end = move |r: Result<(), ConnError>| {
            let _ = tx.send(r.err().map(|e| e.to_string()).unwrap_or_default());
        };
        let client = async { handshake(a, &builder, KEEP_ALIVE, |_| {}, on_end).await.unwrap() };
        // The handshakes need each other: the server's finishes once the client's preface is read.
        let (client, server) = tokio::join!(client, server);
        (client, server.unwrap().unwrap(), rx)
    }

    /// The server's first stream; the connection is driven on after it.
    async fn first_stream(
        mut server: h2::server::Connection<tokio::io::DuplexStream, Bytes>,
    ) -> (Request<RecvStream>, h2::server::SendResponse<Bytes>) {
        let first = server.accept().await.unwrap().unwrap();
        tokio::spawn(async move { while server.accept().await.is_some() {} });
        first
    }

    #[tokio::test]
    async fn a_get_gets_its_body_and_trailers() {
        let (mut client, mut server, _) = pair(65_535).await;
        tokio::spawn(async move {
            while let Some(Ok((req, mut respond))) = server.accept().await {
                assert!(req.body().is_end_stream(), "a GET opens its stream with END_STREAM");
                let mut tx = respond.send_response(Response::new(()), false).unwrap();
                tx.send_data(Bytes::from(format!("hello {}", req.uri().path())), false).unwrap();
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().unwrap());
                tx.send_trailers(trailers).unwrap();
            }
        });
        let req = Request::get("http://api/x").body(crate::http::empty()).unwrap();
        let resp = client.send(req, ()).await.unwrap();
        let all = resp.into_body().collect().await.unwrap();
        assert_eq!(all.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(all.to_bytes(), "hello /x");
    }

    #[tokio::test]
    async fn a_body_larger_than_the_window_arrives_whole_with_its_trailers() {
        let (mut client, server, _) = pair(16_384).await;
        let got = tokio::spawn(async move {
            let (req, mut respond) = first_stream(server).await;
            let (head, mut body) = req.into_parts();
            let mut n = 0;
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                n += chunk.len();
                body.flow_control().release_capacity(chunk.len()).unwrap();
            }
            let trailers = body.trailers().await.unwrap().unwrap();
            respond.send_response(Response::new(()), true).unwrap();
            (head.headers.get("content-length").cloned(), n, trailers["x-sum"].clone())
        });
        // Three 100 KB frames, then trailers: six times the peer's window.
        let frames = (0..3).map(|_| Ok::<_, BodyError>(Frame::data(Bytes::from(vec![7u8; 100_000]))));
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", "300000".parse().unwrap());
        let frames = frames.chain(std::iter::once(Ok(Frame::trailers(trailers))));
        let body = boxed(StreamBody::new(futures::stream::iter(frames)));
        let req = Request::post("http://api/up").body(body).unwrap();
        let resp = client.send(req, ()).await.unwrap();
        assert_eq!(resp.status(), 200);
        let (length, n, sum) = got.await.unwrap();
        assert_eq!((length, n, sum.to_str().unwrap()), (None, 300_000, "300000"));
    }

    /// A body of the given frames that says it has ended as soon as the
    /// last one is taken (as hyper's HTTP/2 body does).
    struct Frames(std::collections::VecDeque<Frame<Bytes>>);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = BodyError;
        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    #[tokio::test]
    async fn a_body_ending_with_an_empty_frame_ends_its_stream() {
        let (mut client, server, _) = pair(65_535).await;
        let got = tokio::spawn(async move {
            let (req, mut respond) = first_stream(server).await;
            let mut body = req.into_body();
            let mut all = Vec::new();
            while let Some(chunk) = body.data().await {
                all.extend_from_slice(&chunk.unwrap());
            }
            respond.send_response(Response::new(()), true).unwrap();
            all
        });
        // A gRPC client's unary call: its message, then an empty DATA frame with END_STREAM.
        let frames = [Frame::data(Bytes::from_static(b"message")), Frame::data(Bytes::new())];
        let req = Request::post("http://api/").body(boxed(Frames(frames.into()))).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), client.send(req, ())).await.expect("the stream ended");
        assert_eq!(resp.unwrap().status(), 200);
        assert_eq!(got.await.unwrap(), b"message");
    }

    #[tokio::test]
    async fn a_known_length_is_announced() {
        let (mut client, server, _) = pair(65_535).await;
        let got = tokio::spawn(async move {
            let (req, mut respond) = first_stream(server).await;
            respond.send_response(Response::new(()), true).unwrap();
            req.headers().get("content-length").cloned()
        });
        let req = Request::post("http://api/").body(boxed(Full::new(Bytes::from_static(b"12345")))).unwrap();
        client.send(req, ()).await.unwrap();
        assert_eq!(got.await.unwrap().unwrap(), "5");
    }

    #[tokio::test]
    async fn dropping_the_response_body_resets_the_stream_and_releases_the_hold() {
        let (mut client, server, _) = pair(65_535).await;
        let reset = tokio::spawn(async move {
            let (_req, mut respond) = first_stream(server).await;
            let mut tx = respond.send_response(Response::new(()), false).unwrap();
            tx.send_data(Bytes::from_static(b"part"), false).unwrap();
            poll_fn(|cx| tx.poll_reset(cx)).await.unwrap()
        });
        let hold = Arc::new(());
        let req = Request::get("http://api/").body(crate::http::empty()).unwrap();
        let resp = client.send(req, hold.clone()).await.unwrap();
        assert_eq!(Arc::strong_count(&hold), 2, "the body holds the lease");
        drop(resp);
        assert_eq!(Arc::strong_count(&hold), 1);
        assert_eq!(reset.await.unwrap(), Reason::CANCEL);
    }

    #[tokio::test]
    async fn a_caller_giving_up_mid_upload_resets_the_stream_and_releases_the_hold() {
        let (mut client, server, _) = pair(65_535).await;
        let reset = tokio::spawn(async move {
            let (req, mut respond) = first_stream(server).await;
            let mut body = req.into_body();
            let first = body.data().await.unwrap().unwrap();
            assert_eq!(first, "part");
            // Neither more body nor an answer: the caller's route timeout ends it.
            let reason = poll_fn(|cx| respond.poll_reset(cx)).await.unwrap();
            (reason, body)
        });
        // An upload that sends one chunk and then stays open.
        let chunk = futures::stream::iter([Ok::<_, BodyError>(Frame::data(Bytes::from_static(b"part")))]);
        let body = boxed(StreamBody::new(chunk.chain(futures::stream::pending())));
        let hold = Arc::new(());
        let req = Request::post("http://api/up").body(body).unwrap();
        let sent = tokio::time::timeout(Duration::from_millis(200), client.send(req, hold.clone())).await;
        assert!(sent.is_err(), "no answer: the caller gave up");
        let (reason, _body) = tokio::time::timeout(Duration::from_secs(5), reset).await.expect("reset").unwrap();
        assert_eq!(reason, Reason::CANCEL);
        for _ in 0..100 {
            if Arc::strong_count(&hold) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(Arc::strong_count(&hold), 1, "the lease ends with the stream");
    }

    #[tokio::test]
    async fn a_closed_connection_hands_the_request_back() {
        let (mut client, server, ended) = pair(65_535).await;
        drop(server);
        ended.await.unwrap();
        assert!(client.is_closed());
        let req = Request::get("http://api/again").body(crate::http::empty()).unwrap();
        let e = client.send(req, ()).await.unwrap_err();
        assert_eq!(e.unsent.expect("never sent, so handed back").uri().path(), "/again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_answering_pings_is_dropped() {
        // The server side is never polled again: its kernel (here, the pipe)
        // takes the PING, nobody answers it.
        let (client, _server, ended) = pair(65_535).await;
        let started = tokio::time::Instant::now();
        let why = ended.await.unwrap();
        assert_eq!(why, "the peer did not answer an HTTP/2 ping within 10s");
        assert_eq!(started.elapsed().as_secs(), 30, "one interval, then the timeout");
        assert!(client.is_closed());
    }
}
