//! Graceful drain on SIGTERM: listeners stop accepting, open connections are
//! told to finish (HTTP/2 GOAWAY, HTTP/1.1 close after the response) and the
//! process waits for them, bounded by a drain timeout.

use std::pin::pin;
use std::time::Duration;

use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::watch;

/// Held by every listener and connection task.
#[derive(Clone)]
pub struct Drain {
    rx: watch::Receiver<bool>,
}

/// Starts the drain.
pub struct DrainTrigger {
    tx: watch::Sender<bool>,
}

pub fn channel() -> (DrainTrigger, Drain) {
    let (tx, rx) = watch::channel(false);
    (DrainTrigger { tx }, Drain { rx })
}

impl Drain {
    /// Resolves once draining has begun.
    pub async fn signaled(&self) {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Serves `conn` to completion, asking it to finish gracefully on drain.
    pub async fn watch<C: GracefulConnection>(self, conn: C) {
        let mut conn = pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => {}
            _ = self.signaled() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }
}

impl DrainTrigger {
    /// Signals drain and waits until every [`Drain`] holder is gone, or the
    /// timeout passes. Returns whether everything finished in time.
    pub async fn drain(self, timeout: Duration) -> bool {
        let _ = self.tx.send(true);
        tokio::time::timeout(timeout, self.tx.closed()).await.is_ok()
    }
}
