//! Whether the local app accepts connections, as the sidecar last saw it.
//!
//! A request, a TCP tunnel (CONNECT) or a caller's probe whose connection
//! to the app is refused marks the app refusing: the sidecar's `/ready` answers 503 with the
//! reason (`lib.rs` wires it), its answers to callers carry
//! [`UNSENT`](crate::http::UNSENT) so they send the request to another
//! endpoint, and callers' probes fail. A watcher then tries to connect every
//! [`RECHECK`] until the app accepts again. Nothing is checked before the
//! first request: an app started after its sidecar is not a fault.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;

/// How often a refusing app is tried again.
pub const RECHECK: Duration = Duration::from_millis(500);
/// How long one connection attempt to the app may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The local app's readiness: None while it accepts connections, else why not.
#[derive(Debug)]
pub struct AppReadiness {
    app: SocketAddr,
    refusing: watch::Sender<Option<String>>,
}

impl AppReadiness {
    /// Readiness of the app at `app`, taken as accepting until seen otherwise.
    pub fn new(app: SocketAddr) -> Arc<Self> {
        Arc::new(Self { app, refusing: watch::channel(None).0 })
    }

    /// Follows the readiness: None while the app accepts, else the reason.
    pub fn subscribe(&self) -> watch::Receiver<Option<String>> {
        self.refusing.subscribe()
    }

    /// Whether the app is known to refuse connections.
    pub fn is_refusing(&self) -> bool {
        self.refusing.borrow().is_some()
    }

    /// The app refused a connection (`error`): not ready until it accepts
    /// one again (checked every [`RECHECK`]).
    pub fn refused(self: &Arc<Self>, error: &dyn std::fmt::Display) {
        let reason = format!("local app at {} refuses connections ({error}); start it or fix --app", self.app);
        let was_ready = self.refusing.send_replace(Some(reason.clone())).is_none();
        if was_ready {
            tracing::warn!(app = %self.app, %reason, "not ready: the local app refuses connections");
            tokio::spawn(self.clone().watch());
        }
    }

    /// The app answered: ready (again).
    pub fn accepted(&self) {
        if self.is_refusing() {
            self.refusing.send_replace(None);
            tracing::info!(app = %self.app, "ready: the local app accepts connections again");
        }
    }

    /// Connects to the app now; Ok when it accepts (and marks it so), else
    /// the reason it is not ready (and marks it refusing).
    pub async fn check(self: &Arc<Self>) -> Result<(), String> {
        self.attempt().await.map_err(|_| self.refusing.borrow().clone().unwrap_or_default())
    }

    /// Connects to the app now: true only when the connection is refused
    /// (nothing listens at the app's port). A timeout is not a refusal: a
    /// full accept queue says nothing of whether the app still listens.
    pub async fn refuses_now(self: &Arc<Self>) -> bool {
        matches!(self.attempt().await, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    }

    /// One connection attempt to the app, marking it accepting or refusing.
    async fn attempt(self: &Arc<Self>) -> std::io::Result<()> {
        let r = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.app)).await {
            Ok(r) => r.map(drop),
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connection attempt timed out")),
        };
        match &r {
            Ok(()) => self.accepted(),
            Err(e) => self.refused(e),
        }
        r
    }

    async fn watch(self: Arc<Self>) {
        while self.is_refusing() {
            tokio::time::sleep(RECHECK).await;
            if let Ok(Ok(_)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.app)).await {
                self.accepted();
            }
        }
    }
}

/// The callee sidecar's answer to a caller's probe
/// ([`PROBE`](crate::http::PROBE)): 204 when the app accepts a connection
/// now, else 503 with [`UNSENT`](crate::http::UNSENT) and the reason.
pub async fn probe_answer(readiness: &Arc<AppReadiness>) -> http::Response<crate::http::Body> {
    match readiness.check().await {
        Ok(()) => {
            let mut resp = http::Response::new(crate::http::empty());
            *resp.status_mut() = http::StatusCode::NO_CONTENT;
            resp.headers_mut().insert(crate::http::PROBE, http::HeaderValue::from_static("ready"));
            resp
        }
        Err(reason) => {
            let mut resp =
                crate::http::local_response(http::StatusCode::SERVICE_UNAVAILABLE, format!("weft: {reason}"));
            resp.headers_mut().insert(crate::http::UNSENT, http::HeaderValue::from_static("app-refused"));
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refusing_until_the_app_accepts_again() {
        // A port nothing listens on: bind, note it, close.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let r = AppReadiness::new(addr);
        let mut changes = r.subscribe();
        assert!(!r.is_refusing(), "nothing is assumed before the app is tried");
        let reason = r.check().await.unwrap_err();
        assert!(reason.contains(&addr.to_string()) && reason.contains("refuses connections"), "{reason}");
        assert!(r.is_refusing());
        // The app comes up on that port: the watcher notices.
        let _app = tokio::net::TcpListener::bind(addr).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            while changes.borrow_and_update().is_some() {
                changes.changed().await.unwrap();
            }
        })
        .await
        .expect("ready again within 10 s of the app accepting");
        assert!(r.check().await.is_ok());
    }
}
