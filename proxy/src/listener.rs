//! Per-connection limits of the sidecar's listeners: a header-read timeout
//! (slowloris), an idle timeout for keep-alive connections (HTTP/1.1 and
//! HTTP/2), and the listener's counters as metrics. The connection cap itself
//! is `weft_runtime::serve::Server::max_connections`.
//!
//! hyper's own HTTP/1.1 header-read timer also runs between keep-alive
//! requests (it would close every idle connection after the header-read
//! timeout), and hyper has no idle close for HTTP/2, so both are kept here:
//! each connection's [`Activity`] (requests in flight, when it went idle,
//! when the next request's first byte came) drives a watchdog that closes it:
//!
//! - no request in flight and a request head begun (HTTP/1.1), or no first
//!   request yet (a new connection that is not HTTP/2): closed once
//!   `--header-read-timeout` has passed since that first byte (since accept);
//! - no request in flight otherwise: closed after `--idle-timeout`; an
//!   HTTP/2 connection gets a GOAWAY and finishes what it has.
//!
//! Requests starting and ending do not wake the watchdog (that was two extra
//! polls of the whole connection task per request): it sleeps until the
//! current deadline, or for the shorter of the two timeouts if that is
//! sooner, and looks again then. A change it was not told of (a request
//! starting or ending, a head beginning) can only bring a deadline at least
//! that far ahead, so every deadline is still kept exactly. The drain and
//! the watchdog are polled only when they wake ([`UntilStop`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use weft_runtime::drain::Drain;

use crate::limits::Limits;
use crate::metrics::{Metrics, TimeoutLabels};

/// The first bytes of an HTTP/2 connection (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Why the sidecar closed a connection on its own (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// A request's headers did not arrive within `--header-read-timeout`.
    HeaderRead,
    /// No request for `--idle-timeout`.
    Idle,
}

impl Closed {
    pub fn label(self) -> &'static str {
        match self {
            Closed::HeaderRead => "header_read",
            Closed::Idle => "idle",
        }
    }
}

/// What one connection is doing, shared by its I/O ([`Watched`]), its
/// requests ([`InFlight`]) and its watchdog.
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicUsize,
    requests: AtomicU64,
    h2: AtomicBool,
    /// When the last request ended (or the connection was accepted).
    idle_since: Mutex<Instant>,
    /// When the first byte arrived while no request was in flight.
    head_started: Mutex<Option<Instant>>,
}

impl Activity {
    /// A connection accepted now; `h2` when it is known to speak HTTP/2.
    pub fn new(h2: bool) -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            h2: AtomicBool::new(h2),
            idle_since: Mutex::new(Instant::now()),
            head_started: Mutex::new(None),
        })
    }

    /// Counts a request (or CONNECT tunnel) in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.requests.fetch_add(1, Ordering::Relaxed);
        *lock(&self.head_started) = None;
        InFlight { activity: self.clone() }
    }

    fn read(&self, bytes: &[u8], first: bool) {
        if first && !bytes.is_empty() {
            let n = bytes.len().min(H2_PREFACE.len());
            if bytes[..n] == H2_PREFACE[..n] {
                self.h2.store(true, Ordering::Relaxed);
            }
        }
        if self.in_flight.load(Ordering::SeqCst) == 0 && !bytes.is_empty() {
            let mut head = lock(&self.head_started);
            if head.is_none() {
                *head = Some(Instant::now());
            }
        }
    }

    /// When the connection must close, and why; `None` while a request is in flight.
    fn deadline(&self, limits: &Limits) -> Option<(Instant, Closed)> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let idle_since = *lock(&self.idle_since);
        if !self.h2.load(Ordering::Relaxed) {
            if self.requests.load(Ordering::Relaxed) == 0 {
                return Some((idle_since + limits.header_read_timeout, Closed::HeaderRead));
            }
            if let Some(t) = *lock(&self.head_started) {
                return Some((t + limits.header_read_timeout, Closed::HeaderRead));
            }
        }
        Some((idle_since + limits.idle_timeout, Closed::Idle))
    }

    /// The limit broken at `now`, or when to look again: the deadline, or
    /// sooner, as the state changes without a wake-up (see the module docs).
    /// Requests starting and ending, and heads beginning, only ever bring a
    /// deadline of at least `now` plus the shorter of the two timeouts, so
    /// looking again by then finds it in time.
    fn check(&self, limits: &Limits, now: Instant) -> Result<Closed, Instant> {
        let soon = now + limits.header_read_timeout.min(limits.idle_timeout).max(MIN_RECHECK);
        match self.deadline(limits) {
            None => Err(soon),
            Some((at, why)) if at <= now => Ok(why),
            Some((at, _)) => Err(at.min(soon)),
        }
    }

    /// Resolves when the connection has broken a limit.
    async fn expired(&self, limits: &Limits) -> Closed {
        loop {
            match self.check(limits, Instant::now()) {
                Ok(why) => return why,
                Err(at) => tokio::time::sleep_until(at).await,
            }
        }
    }
}

/// The shortest time between two looks of the watchdog, whatever the
/// limits (a zero `--header-read-timeout` must not make it spin).
const MIN_RECHECK: Duration = Duration::from_millis(100);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A request in flight on a connection (see [`Activity::start`]).
#[derive(Debug)]
pub struct InFlight {
    activity: Arc<Activity>,
}

impl Clone for InFlight {
    fn clone(&self) -> Self {
        self.activity.start()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.activity.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            *lock(&self.activity.idle_since) = Instant::now();
            *lock(&self.activity.head_started) = None;
        }
    }
}

/// A connection's byte stream, reporting reads to its [`Activity`].
#[derive(Debug)]
pub struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
    first: bool,
}

impl<T> Watched<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self { inner, activity, first: true }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let first = std::mem::replace(&mut self.first, false);
            self.activity.read(&buf.filled()[before..], first);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A response body that keeps its request counted in flight until it ends
/// (or is dropped).
pub struct Guarded<B> {
    inner: B,
    guard: Option<InFlight>,
}

impl<B> Guarded<B> {
    pub fn new(inner: B, guard: InFlight) -> Self {
        Self { inner, guard: Some(guard) }
    }

    /// A body that keeps nothing counted: the type of a guarded one, for a
    /// response whose request is done counting.
    pub fn unguarded(inner: B) -> Self {
        Self { inner, guard: None }
    }
}

impl<B: HttpBody + Unpin> HttpBody for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.guard = None;
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a connection is asked to stop before it ends on its own.
enum Stop {
    Drain,
    Limit(Closed),
}

/// Serves `conn` until it ends, the drain asks it to finish, or it breaks
/// the header-read or idle limit (counted in `metrics` under `listener`).
pub async fn serve_conn<C: GracefulConnection>(
    conn: C,
    activity: Arc<Activity>,
    limits: Limits,
    drain: Drain,
    metrics: Arc<Metrics>,
    listener: &'static str,
) {
    let mut conn = std::pin::pin!(conn);
    let stop = std::pin::pin!(async {
        tokio::select! {
            _ = drain.signaled() => Stop::Drain,
            why = activity.expired(&limits) => Stop::Limit(why),
        }
    });
    let Some(stop) = UntilStop::new(conn.as_mut(), stop).await else { return };
    match stop {
        Stop::Drain => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
        Stop::Limit(why) => {
            metrics.listener_timeouts.get_or_create(&TimeoutLabels { listener, reason: why.label() }).inc();
            tracing::debug!(listener, reason = why.label(), "closing connection");
            if activity.h2.load(Ordering::Relaxed) {
                // GOAWAY: streams the client has already sent still finish.
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(GOAWAY_GRACE, conn).await;
            }
            // HTTP/1.1 with nothing in flight: dropping the connection closes it.
        }
    }
}

/// Runs `conn` until it ends (`None`) or `stop` resolves (`Some`), polling
/// `stop` only when something it waits on (the drain, the watchdog's timer)
/// has woken it. `tokio::select!` polls every branch on every wake-up of
/// the task, and a connection's task wakes several times per request.
struct UntilStop<'a, C, S> {
    conn: Pin<&'a mut C>,
    stop: Pin<&'a mut S>,
    stop_waker: Arc<StopWaker>,
    waker: std::task::Waker,
}

/// The waker `stop` is polled with: notes that it was woken and wakes the
/// connection's task.
#[derive(Default)]
struct StopWaker {
    woken: AtomicBool,
    task: futures::task::AtomicWaker,
}

impl std::task::Wake for StopWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        self.task.wake();
    }
}

impl<'a, C, S> UntilStop<'a, C, S> {
    fn new(conn: Pin<&'a mut C>, stop: Pin<&'a mut S>) -> Self {
        let stop_waker = Arc::new(StopWaker::default());
        // `stop` has not been polled yet: its first poll registers what it waits on.
        stop_waker.woken.store(true, Ordering::SeqCst);
        let waker = std::task::Waker::from(stop_waker.clone());
        Self { conn, stop, stop_waker, waker }
    }
}

impl<C: Future, S: Future> Future for UntilStop<'_, C, S> {
    type Output = Option<S::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        this.stop_waker.task.register(cx.waker());
        if this.conn.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        if this.stop_waker.woken.swap(false, Ordering::SeqCst) {
            if let Poll::Ready(stop) = this.stop.as_mut().poll(&mut Context::from_waker(&this.waker)) {
                return Poll::Ready(Some(stop));
            }
        }
        Poll::Pending
    }
}

/// How long an HTTP/2 connection closed for idleness may take to finish after its GOAWAY.
const GOAWAY_GRACE: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(5),
            ..Limits::default()
        }
    }

    /// Counts the wake-ups of the task polling a future.
    struct Wakes(AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn requests_starting_and_ending_do_not_wake_the_watchdog() {
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        for h2 in [false, true] {
            let a = Activity::new(h2);
            drop(a.start());
            let limits = limits();
            let mut watchdog = std::pin::pin!(a.expired(&limits));
            assert!(std::future::Future::poll(watchdog.as_mut(), &mut cx).is_pending());
            // What every keep-alive request does: its first bytes, then in flight, then done.
            for _ in 0..100 {
                a.read(b"GET / HTTP/1.1\r\n", false);
                let guard = a.start();
                drop(guard);
            }
            assert_eq!(wakes.0.load(Ordering::SeqCst), 0, "h2: {h2}: the connection's task was woken");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_begun_while_idle_is_closed_at_its_own_deadline_however_long_the_idle_timeout() {
        let limits = Limits { idle_timeout: Duration::from_secs(600), ..limits() };
        let a = Activity::new(false);
        drop(a.start());
        let watchdog = tokio::spawn({
            let a = a.clone();
            async move { a.expired(&limits).await }
        });
        // The watchdog is asleep (no wake-up on the head's first byte) when the head begins.
        tokio::time::sleep(Duration::from_millis(3_500)).await;
        a.read(b"G", false);
        let start = Instant::now();
        assert_eq!(watchdog.await.unwrap(), Closed::HeaderRead);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test]
    async fn the_stop_future_is_polled_only_when_it_was_woken() {
        let polls = AtomicUsize::new(0);
        let notify = tokio::sync::Notify::new();
        let stop = std::pin::pin!(async {
            polls.fetch_add(1, Ordering::SeqCst);
            notify.notified().await;
            polls.fetch_add(1, Ordering::SeqCst);
            "stopped"
        });
        // A connection woken 1,000 times (each yield wakes its task at once).
        let conn = std::pin::pin!(async {
            for _ in 0..1_000 {
                tokio::task::yield_now().await;
            }
        });
        assert_eq!(UntilStop::new(conn, stop).await, None);
        assert_eq!(polls.load(Ordering::SeqCst), 1, "polled on the connection's wake-ups");

        // Woken by what it waits on, it is polled and ends the connection's wait.
        let notify = tokio::sync::Notify::new();
        let stop = std::pin::pin!(async {
            notify.notified().await;
            "stopped"
        });
        let conn = std::pin::pin!(async {
            tokio::task::yield_now().await;
            notify.notify_one();
            std::future::pending::<()>().await
        });
        assert_eq!(UntilStop::new(conn, stop).await, Some("stopped"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_request_served_while_the_watchdog_sleeps_starts_the_idle_timeout() {
        // The idle timeout shorter than the header-read one.
        let limits =
            Limits { header_read_timeout: Duration::from_secs(10), idle_timeout: Duration::from_secs(2), ..limits() };
        let a = Activity::new(false);
        let start = Instant::now();
        let watchdog = tokio::spawn({
            let a = a.clone();
            async move { a.expired(&limits).await }
        });
        tokio::task::yield_now().await; // the watchdog looks: no request yet
        tokio::time::sleep(Duration::from_millis(500)).await;
        a.read(b"GET / HTTP/1.1\r\n\r\n", true);
        drop(a.start());
        assert_eq!(watchdog.await.unwrap(), Closed::Idle);
        assert_eq!(start.elapsed(), Duration::from_millis(2_500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_must_send_its_first_request_within_the_header_read_timeout() {
        let a = Activity::new(false);
        let start = Instant::now();
        a.read(b"GET / HT", true);
        assert_eq!(a.expired(&limits()).await, Closed::HeaderRead);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn http1_keep_alive_idles_until_the_idle_timeout_then_a_slow_head_gets_the_header_timeout() {
        let a = Activity::new(false);
        drop(a.start());
        let start = Instant::now();
        assert_eq!(a.expired(&limits()).await, Closed::Idle);
        assert_eq!(start.elapsed(), Duration::from_secs(5));

        let a = Activity::new(false);
        drop(a.start());
        tokio::time::sleep(Duration::from_secs(1)).await;
        a.read(b"G", false);
        let start = Instant::now();
        assert_eq!(a.expired(&limits()).await, Closed::HeaderRead);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_expires_while_a_request_is_in_flight_and_http2_only_idles() {
        let a = Activity::new(false);
        a.read(H2_PREFACE, true);
        let guard = a.start();
        let expired = tokio::time::timeout(Duration::from_secs(60), a.expired(&limits())).await;
        assert!(expired.is_err(), "closed with a request in flight");
        drop(guard);
        let start = Instant::now();
        a.read(b"\0\0\0\x04", false); // a frame, not a request head
        assert_eq!(a.expired(&limits()).await, Closed::Idle);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }
}
