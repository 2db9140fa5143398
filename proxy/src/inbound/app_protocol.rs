//! Which HTTP version the inbound sidecar speaks to its app: a property of
//! the app, not of the caller. `--app-protocol http1|h2c` fixes it; with
//! `auto` it is the Service's declared `protocol` (`http2`, `grpc`: h2c), or
//! else learned by probing the app (`detect.rs` reads the answer) and kept
//! until a request to the app fails. Within what the app speaks, the
//! caller's version is kept (a dual-stack app sees what the calling app
//! sent); gRPC always needs HTTP/2. The probes reach no request handler:
//! an h2 preface and SETTINGS (an HTTP/1.1 server refuses `PRI * HTTP/2.0`
//! with a status line), and — only for an HTTP/1.1 caller to an app that
//! speaks h2 — a malformed HTTP/1.1 request that HTTP/1.1 servers refuse.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use super::AppProtocol;
use crate::detect;

/// How long a probe waits for the app to connect and answer; an app that
/// says nothing in this time is taken not to speak that version.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// An HTTP version the app may speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http1,
    /// HTTP/2 with prior knowledge (h2c).
    H2c,
}

/// What the sidecar knows of its app's HTTP versions.
pub struct AppProtocols {
    app: SocketAddr,
    fixed: AppProtocol,
    http1: Known,
    h2c: Known,
}

/// What is known of one version: read without a lock by every request (on
/// every worker thread), probed under the lock so concurrent requests wait
/// for one probe.
#[derive(Default)]
struct Known {
    /// [`UNKNOWN`], [`SPEAKS`] or [`SILENT`].
    answer: AtomicU8,
    probing: Mutex<()>,
}

const UNKNOWN: u8 = 0;
const SPEAKS: u8 = 1;
const SILENT: u8 = 2;

impl Known {
    /// Unknown (None), or whether the app answered the version.
    fn get(&self) -> Option<bool> {
        match self.answer.load(Ordering::Acquire) {
            SPEAKS => Some(true),
            SILENT => Some(false),
            _ => None,
        }
    }

    fn set(&self, known: Option<bool>) {
        let v = match known {
            Some(true) => SPEAKS,
            Some(false) => SILENT,
            None => UNKNOWN,
        };
        self.answer.store(v, Ordering::Release);
    }
}

/// What decides the version of one request.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    /// The calling app spoke HTTP/2.
    pub caller_h2: bool,
    /// A gRPC request (`content-type: application/grpc...`): HTTP/2 only.
    pub grpc: bool,
    /// The Service's declared protocol in the mesh config, if any.
    pub declared: Option<weft_config::Protocol>,
}

impl AppProtocols {
    pub fn new(app: SocketAddr, fixed: AppProtocol) -> Self {
        Self { app, fixed, http1: Known::default(), h2c: Known::default() }
    }

    /// The version to speak to the app for a request.
    pub async fn choose(&self, ask: Ask) -> Version {
        use weft_config::Protocol as P;
        match self.fixed {
            AppProtocol::Http1 => return Version::Http1,
            AppProtocol::H2c => return Version::H2c,
            AppProtocol::Auto => {}
        }
        if ask.grpc || matches!(ask.declared, Some(P::Http2 | P::Grpc)) {
            return Version::H2c;
        }
        // The h2 probe reaches no request handler of any app; it comes first.
        let h2 = self.speaks(Version::H2c).await;
        if ask.caller_h2 {
            return if h2 == Some(false) { Version::Http1 } else { Version::H2c };
        }
        if h2 != Some(true) {
            return Version::Http1;
        }
        // The app speaks h2: only h2, or HTTP/1.1 as well?
        if self.speaks(Version::Http1).await == Some(false) {
            Version::H2c
        } else {
            Version::Http1
        }
    }

    /// Forgets what was learned, so the next request probes again (the app
    /// may have been replaced by one speaking another version).
    pub async fn forget(&self) {
        if self.fixed == AppProtocol::Auto {
            self.http1.set(None);
            self.h2c.set(None);
        }
    }

    /// Whether the app speaks `v`: known, or probed now (None: the probe
    /// could not tell, e.g. the app is not listening).
    async fn speaks(&self, v: Version) -> Option<bool> {
        let slot = match v {
            Version::Http1 => &self.http1,
            Version::H2c => &self.h2c,
        };
        if let Some(known) = slot.get() {
            return Some(known);
        }
        // Held across the probe: concurrent requests wait for one probe.
        let _probing = slot.probing.lock().await;
        let mut known = slot.get();
        if known.is_none() {
            known = probe(self.app, v).await;
            slot.set(known);
            let speaks = match known {
                Some(true) => "yes",
                Some(false) => "no",
                None => "unknown (no answer)",
            };
            tracing::info!(app = %self.app, version = ?v, speaks, "probed the local app's HTTP version");
        }
        known
    }
}

/// Opens a connection to the app, sends the opening of `v` and reads
/// whether the app answers in kind.
async fn probe(app: SocketAddr, v: Version) -> Option<bool> {
    let run = async {
        let mut tcp = TcpStream::connect(app).await.ok()?;
        let (hello, judge): (&[u8], Judge) = match v {
            // The preface and an empty SETTINGS frame (RFC 9113 3.4).
            Version::H2c => (H2_HELLO, detect::server_speaks_h2),
            // A request any HTTP/1.1 server refuses with a status line (a space
            // in a field name, RFC 9112 5.1), so it reaches no request handler.
            Version::Http1 => (H1_HELLO, detect::server_speaks_http1),
        };
        tcp.write_all(hello).await.ok()?;
        let mut reply = Vec::with_capacity(64);
        loop {
            if let Some(answer) = judge(&reply) {
                return Some(answer);
            }
            let mut buf = [0u8; 64];
            match tcp.read(&mut buf).await {
                // Closed without a word in that version: it does not speak it.
                Ok(0) | Err(_) => return Some(false),
                Ok(n) => reply.extend_from_slice(&buf[..n]),
            }
        }
    };
    // Silence for that long is an answer too: probing again would delay
    // every request (a failing request makes the next one probe anyway).
    tokio::time::timeout(PROBE_TIMEOUT, run).await.unwrap_or(Some(false))
}

/// Reads a probe's answer: whether the app spoke the version (None: read more).
type Judge = fn(&[u8]) -> Option<bool>;

const H1_HELLO: &[u8] = b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\nweft probe: 1\r\n\r\n";

const H2_HELLO: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server that answers every connection with `reply` and closes.
    async fn answering(reply: &'static [u8]) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = l.accept().await {
                let mut buf = [0u8; 256];
                let _ = tcp.read(&mut buf).await;
                let _ = tcp.write_all(reply).await;
            }
        });
        addr
    }

    fn ask(caller_h2: bool) -> Ask {
        Ask { caller_h2, grpc: false, declared: None }
    }

    #[tokio::test]
    async fn learns_the_version_the_app_answers() {
        let h1_only = AppProtocols::new(answering(b"HTTP/1.1 505 Not Supported\r\n\r\n").await, AppProtocol::Auto);
        assert_eq!(h1_only.choose(ask(true)).await, Version::Http1);
        assert_eq!(h1_only.choose(ask(false)).await, Version::Http1);
        let h2_only =
            AppProtocols::new(answering(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]).await, AppProtocol::Auto);
        assert_eq!(h2_only.choose(ask(false)).await, Version::H2c);
        assert_eq!(h2_only.choose(ask(true)).await, Version::H2c);
        let grpc = Ask { grpc: true, ..ask(false) };
        assert_eq!(h1_only.choose(grpc).await, Version::H2c, "gRPC needs HTTP/2");
        let declared = Ask { declared: Some(weft_config::Protocol::Http2), ..ask(false) };
        assert_eq!(h1_only.choose(declared).await, Version::H2c);
        let fixed = AppProtocols::new(h2_only.app, AppProtocol::Http1);
        assert_eq!(fixed.choose(ask(true)).await, Version::Http1);
    }

    /// A hyper server (HTTP/1.1 and h2c, or h2c only) counting the requests its handler sees.
    async fn hyper_app(h1: bool) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        use std::sync::atomic::Ordering;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let handled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = handled.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let count = count.clone();
                let svc = hyper::service::service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                    count.fetch_add(1, Ordering::SeqCst);
                    async { Ok::<_, std::convert::Infallible>(http::Response::new(crate::http::empty())) }
                });
                tokio::spawn(async move {
                    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    if !h1 {
                        b = b.http2_only();
                    }
                    let _ = b.serve_connection(TokioIo::new(tcp), svc).await;
                });
            }
        });
        (addr, handled)
    }

    #[tokio::test]
    async fn probes_reach_no_request_handler() {
        let (both, handled) = hyper_app(true).await;
        let p = AppProtocols::new(both, AppProtocol::Auto);
        assert_eq!(p.choose(ask(false)).await, Version::Http1, "the caller's version");
        assert_eq!(p.choose(ask(true)).await, Version::H2c, "the caller's version");
        assert_eq!((p.http1.get(), p.h2c.get()), (Some(true), Some(true)));
        let (h2_only, handled_h2) = hyper_app(false).await;
        let p = AppProtocols::new(h2_only, AppProtocol::Auto);
        assert_eq!(p.choose(ask(false)).await, Version::H2c);
        let n = |c: &std::sync::atomic::AtomicUsize| c.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!((n(&handled), n(&handled_h2)), (0, 0), "a probe was served as a request");
    }

    #[tokio::test]
    async fn an_app_that_is_not_there_is_not_judged() {
        let gone = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let p = AppProtocols::new(gone, AppProtocol::Auto);
        assert_eq!(p.choose(ask(true)).await, Version::H2c, "the caller's version");
        assert_eq!(p.h2c.get(), None, "nothing learned");
    }
}
