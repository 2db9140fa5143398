//! Which HTTP version the inbound sidecar speaks to its app: a property of
//! the app, not of the caller. `--app-protocol http1|h2c` fixes it; with
//! `auto` it is the Service's declared `protocol` (`http2`, `grpc`: h2c), or
//! else learned by probing the app once per version (`detect.rs` reads the
//! answer) and kept until a request to the app fails. Within what the app
//! speaks, the caller's version is kept (a dual-stack app sees what the
//! calling app sent); gRPC always needs HTTP/2.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use super::AppProtocol;
use crate::detect;

/// How long a probe waits for the app to connect and answer; an app that
/// says nothing in this time is taken not to speak that version (for now:
/// the answer is not kept).
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
    /// Per version: unknown (None), or whether the app answered it.
    http1: Mutex<Option<bool>>,
    h2c: Mutex<Option<bool>>,
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
        Self { app, fixed, http1: Mutex::new(None), h2c: Mutex::new(None) }
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
        let (first, second) =
            if ask.caller_h2 { (Version::H2c, Version::Http1) } else { (Version::Http1, Version::H2c) };
        if self.speaks(first).await != Some(false) {
            return first;
        }
        match self.speaks(second).await {
            Some(true) => second,
            // Neither answered: keep the caller's; the request's failure says why.
            _ => first,
        }
    }

    /// Forgets what was learned, so the next request probes again (the app
    /// may have been replaced by one speaking another version).
    pub async fn forget(&self) {
        if self.fixed == AppProtocol::Auto {
            *self.http1.lock().await = None;
            *self.h2c.lock().await = None;
        }
    }

    /// Whether the app speaks `v`: known, or probed now (None: the probe
    /// could not tell, e.g. the app is not listening).
    async fn speaks(&self, v: Version) -> Option<bool> {
        let slot = match v {
            Version::Http1 => &self.http1,
            Version::H2c => &self.h2c,
        };
        // Held across the probe: concurrent requests wait for one probe.
        let mut known = slot.lock().await;
        if known.is_none() {
            *known = probe(self.app, v).await;
            tracing::info!(app = %self.app, version = ?v, speaks = ?*known, "probed the local app's HTTP version");
        }
        *known
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
            // A request every HTTP/1.1 server must parse (RFC 9110 9.3.7).
            Version::Http1 => {
                (b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", detect::server_speaks_http1)
            }
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
    tokio::time::timeout(PROBE_TIMEOUT, run).await.ok().flatten()
}

/// Reads a probe's answer: whether the app spoke the version (None: read more).
type Judge = fn(&[u8]) -> Option<bool>;

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

    #[tokio::test]
    async fn an_app_that_is_not_there_is_not_judged() {
        let gone = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let p = AppProtocols::new(gone, AppProtocol::Auto);
        assert_eq!(p.choose(ask(true)).await, Version::H2c, "the caller's version");
        assert_eq!(*p.h2c.lock().await, None, "nothing learned");
    }
}
