//! The one accept loop behind every TCP listener of weft (the sidecar's
//! inbound, outbound and upstream ports, the control plane's gRPC port, the
//! admin endpoint).
//!
//! - An accept error (EMFILE, ENFILE, ENOBUFS...) is logged and answered
//!   with a growing pause ([`FIRST_BACKOFF`] doubling up to [`MAX_BACKOFF`]),
//!   so a process out of file descriptors waits for some to be freed instead
//!   of spinning on the error.
//! - Accepted sockets get TCP_NODELAY (requests and responses are small
//!   writes that must not wait for Nagle).
//! - Each connection runs in its own task holding a [`Drain`], so a drain
//!   waits for it; on drain the loop stops accepting and drops the listener.
//! - With several [`workers`](crate::workers), each connection is handed to
//!   one of them, round robin per listener, and runs there to its end.
//! - [`Server::max_connections`] caps the connections open at once: at the
//!   cap the loop stops accepting (new connections wait in the kernel's
//!   backlog) until one closes.
//! - [`ListenerStats`] counts what happened, for per-listener metrics.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::drain::Drain;

/// The pause after the first failed accept.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(5);
/// The longest pause between accept attempts while they keep failing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Counters of one listener, shared with whoever exports them.
#[derive(Debug, Default)]
pub struct ListenerStats {
    accepted: AtomicU64,
    accept_errors: AtomicU64,
    open: AtomicU64,
    at_capacity: AtomicU64,
}

impl ListenerStats {
    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
    /// Failed accepts (each followed by a back-off pause).
    pub fn accept_errors(&self) -> u64 {
        self.accept_errors.load(Ordering::Relaxed)
    }
    /// Connections whose task is still running.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }
    /// Times the loop paused because [`Server::max_connections`] were open.
    pub fn at_capacity(&self) -> u64 {
        self.at_capacity.load(Ordering::Relaxed)
    }
}

/// One connection's hold on the listener: counted open, and its slot under
/// the cap, until the connection task ends.
struct Slot {
    stats: Arc<ListenerStats>,
    _permit: Option<OwnedSemaphorePermit>,
    _drain: Drain,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A listener's accept loop and its settings.
#[derive(Debug)]
pub struct Server {
    name: &'static str,
    limit: Option<Arc<Semaphore>>,
    stats: Arc<ListenerStats>,
}

impl Server {
    /// A loop for the listener called `name` (used in logs, e.g. `"inbound"`).
    pub fn new(name: &'static str) -> Self {
        Self { name, limit: None, stats: Arc::default() }
    }

    /// At most `n` connections open at once (at least 1).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.limit = Some(Arc::new(Semaphore::new(n.max(1))));
        self
    }

    /// This listener's counters.
    pub fn stats(&self) -> Arc<ListenerStats> {
        self.stats.clone()
    }

    /// Accepts until `drain` is signalled, handing each connection to
    /// `handle(stream, remote address, drain)` in a task of its own. The
    /// handler gets a [`Drain`] to finish its connection gracefully
    /// ([`Drain::watch`]); the task holds one too, so a drain waits for the
    /// handler's future to complete either way. The handler runs on the
    /// worker ([`crate::workers`]) the connection is handed to.
    pub async fn serve<H, F>(self, listener: TcpListener, drain: Drain, handle: H)
    where
        H: Fn(TcpStream, SocketAddr, Drain) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = Arc::new(handle);
        let mut backoff: Option<Duration> = None;
        // This listener's round robin over the workers (others, e.g. the
        // admin port, do not shift it).
        let mut turn = 0usize;
        loop {
            let Some(permit) = self.slot(&drain).await else { return };
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = drain.signaled() => return,
            };
            match accepted {
                Ok((tcp, remote)) => {
                    backoff = None;
                    // Best effort: a socket that cannot take the option still works.
                    let _ = tcp.set_nodelay(true);
                    self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                    self.stats.open.fetch_add(1, Ordering::Relaxed);
                    let slot = Slot { stats: self.stats.clone(), _permit: permit, _drain: drain.clone() };
                    self.run_conn(tcp, remote, slot, &drain, &handle, turn);
                    turn = turn.wrapping_add(1);
                }
                // The client gave up before we took its connection: nothing to wait for.
                Err(e) if is_per_connection(&e) => {
                    tracing::debug!(listener = self.name, error = %e, "connection aborted before accept");
                }
                Err(e) => {
                    self.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    let pause = backoff.map_or(FIRST_BACKOFF, |b| (b * 2).min(MAX_BACKOFF));
                    backoff = Some(pause);
                    tracing::warn!(
                        listener = self.name, error = %e, retry_in_ms = pause.as_millis() as u64,
                        "accept failed; pausing before the next attempt"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = drain.signaled() => return,
                    }
                }
            }
        }
    }

    /// Runs `handle` for one accepted connection in a task of its own: on
    /// worker `turn` (mod their count) when there are several (the socket
    /// moves to that worker's I/O driver), else on this runtime. `slot` is
    /// held to the end.
    fn run_conn<H, F>(
        &self,
        tcp: TcpStream,
        remote: SocketAddr,
        slot: Slot,
        drain: &Drain,
        handle: &Arc<H>,
        turn: usize,
    ) where
        H: Fn(TcpStream, SocketAddr, Drain) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let Some(worker) = crate::workers::nth(turn) else {
            let conn = handle(tcp, remote, drain.clone());
            tokio::spawn(async move {
                conn.await;
                drop(slot);
            });
            return;
        };
        // Registered with this runtime's epoll until moved: the worker registers it with its own.
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::warn!(listener = self.name, error = %e, "cannot hand the connection to a worker; closing it");
                return;
            }
        };
        let (handle, drain, name) = (handle.clone(), drain.clone(), self.name);
        worker.spawn(async move {
            match TcpStream::from_std(tcp) {
                Ok(tcp) => handle(tcp, remote, drain).await,
                Err(e) => tracing::warn!(listener = name, error = %e, "worker cannot take the connection; closing it"),
            }
            drop(slot);
        });
    }

    /// Waits for room under the cap; `None` when drain came first.
    async fn slot(&self, drain: &Drain) -> Option<Option<OwnedSemaphorePermit>> {
        let Some(limit) = &self.limit else { return Some(None) };
        if let Ok(p) = limit.clone().try_acquire_owned() {
            return Some(Some(p));
        }
        self.stats.at_capacity.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(listener = self.name, "connection limit reached; new connections wait until one closes");
        tokio::select! {
            // The semaphore is never closed.
            p = limit.clone().acquire_owned() => p.ok().map(Some),
            _ = drain.signaled() => None,
        }
    }
}

fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted)
}

/// [`Server::serve`] without a connection cap: accepts on `listener` (named
/// `name` in logs) until `drain`, one task per connection.
pub async fn serve<H, F>(listener: TcpListener, drain: Drain, name: &'static str, handle: H)
where
    H: Fn(TcpStream, SocketAddr, Drain) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    Server::new(name).serve(listener, drain, handle).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drain;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::watch;

    const LIMIT: Duration = Duration::from_secs(5);

    /// A handler that answers "hi", then holds the connection until `release` is true.
    fn holding(
        release: watch::Receiver<bool>,
        started: Arc<AtomicU64>,
    ) -> impl Fn(TcpStream, SocketAddr, Drain) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
        move |mut tcp, _, _| {
            let mut release = release.clone();
            let started = started.clone();
            Box::pin(async move {
                started.fetch_add(1, Ordering::SeqCst);
                let _ = tcp.write_all(b"hi").await;
                let _ = release.wait_for(|r| *r).await;
            })
        }
    }

    async fn greeted(addr: SocketAddr) -> TcpStream {
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 2];
        tokio::time::timeout(LIMIT, c.read_exact(&mut buf)).await.expect("greeting in time").unwrap();
        assert_eq!(&buf, b"hi");
        c
    }

    async fn listener() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    }

    #[tokio::test]
    async fn drain_stops_accepting_and_waits_for_open_connections() {
        let (l, addr) = listener().await;
        let (trigger, d) = drain::channel();
        let (release, rx) = watch::channel(false);
        let started = Arc::new(AtomicU64::new(0));
        let server = Server::new("test");
        let stats = server.stats();
        let loop_task = tokio::spawn(server.serve(l, d, holding(rx, started.clone())));
        let _c = greeted(addr).await;
        assert_eq!((stats.accepted(), stats.open()), (1, 1));

        let drained = tokio::spawn(trigger.drain(LIMIT));
        tokio::time::timeout(LIMIT, loop_task).await.expect("the loop stops on drain").unwrap();
        // The listener is gone: nothing new is accepted.
        let refused = TcpStream::connect(addr).await;
        assert!(refused.is_err(), "still accepting after drain");
        // The open connection keeps the drain waiting...
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!drained.is_finished(), "drain finished with a connection still open");
        // ...until it ends.
        release.send(true).unwrap();
        let finished = tokio::time::timeout(LIMIT, drained).await.expect("drain returns").unwrap();
        assert!(finished, "drain reported a timeout although every connection finished");
        assert_eq!(stats.open(), 0);
        assert_eq!(started.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn drain_times_out_on_a_connection_that_never_ends() {
        let (l, addr) = listener().await;
        let (trigger, d) = drain::channel();
        let (_release, rx) = watch::channel(false);
        tokio::spawn(serve(l, d, "test", holding(rx, Arc::default())));
        let _c = greeted(addr).await;
        assert!(!trigger.drain(Duration::from_millis(200)).await, "drain ignored an open connection");
    }

    #[tokio::test]
    async fn at_the_cap_new_connections_wait_until_one_closes() {
        let (l, addr) = listener().await;
        let (_trigger, d) = drain::channel();
        let (release, rx) = watch::channel(false);
        let started = Arc::new(AtomicU64::new(0));
        let server = Server::new("test").max_connections(1);
        let stats = server.stats();
        tokio::spawn(server.serve(l, d, holding(rx, started.clone())));
        let _first = greeted(addr).await;
        // The second connects (kernel backlog) but is not handled while the first is open.
        let second = tokio::spawn(greeted(addr));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(started.load(Ordering::SeqCst), 1, "a connection was handled above the cap");
        assert!(stats.at_capacity() >= 1);
        release.send(true).unwrap();
        tokio::time::timeout(LIMIT, second).await.expect("the second is handled once the first closes").unwrap();
        assert_eq!(started.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn connections_get_tcp_nodelay_and_their_remote_address() {
        let (l, addr) = listener().await;
        let (_trigger, d) = drain::channel();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(serve(l, d, "test", move |tcp: TcpStream, remote, _| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((tcp.nodelay().unwrap(), remote));
            }
        }));
        let c = TcpStream::connect(addr).await.unwrap();
        let (nodelay, remote) = tokio::time::timeout(LIMIT, rx.recv()).await.unwrap().unwrap();
        assert!(nodelay);
        assert_eq!(remote, c.local_addr().unwrap());
    }
}
