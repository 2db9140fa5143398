//! Graceful drain on shutdown: listeners stop accepting, open connections are
//! told to finish (HTTP/2 GOAWAY, HTTP/1.1 close after the response) and the
//! process waits for them, bounded by a drain timeout.
//!
//! Every listener loop and every connection task holds a [`Drain`]; the
//! [`DrainTrigger`] signals them all and then waits until the last holder is
//! gone.

use std::pin::pin;
use std::time::Duration;

use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::watch;

/// Held by every listener and connection task; dropping it tells the
/// [`DrainTrigger`] this holder is done.
#[derive(Clone, Debug)]
pub struct Drain {
    /// `None`: a drain that never comes (see [`Drain::never`]).
    rx: Option<watch::Receiver<bool>>,
}

/// Starts the drain.
#[derive(Debug)]
pub struct DrainTrigger {
    tx: watch::Sender<bool>,
}

/// A new trigger and the first [`Drain`] it signals (clone it for each holder).
pub fn channel() -> (DrainTrigger, Drain) {
    let (tx, rx) = watch::channel(false);
    (DrainTrigger { tx }, Drain { rx: Some(rx) })
}

impl Drain {
    /// A drain that is never signalled, for listeners that serve until the
    /// process ends (the admin endpoint keeps answering /ready while the rest drains).
    pub fn never() -> Self {
        Self { rx: None }
    }

    /// Resolves once draining has begun (or the trigger was dropped).
    pub async fn signaled(&self) {
        match &self.rx {
            Some(rx) => {
                let mut rx = rx.clone();
                let _ = rx.wait_for(|d| *d).await;
            }
            None => std::future::pending().await,
        }
    }

    /// Serves `conn` to completion, asking it to finish gracefully on drain.
    pub async fn watch<C: GracefulConnection>(self, conn: C) {
        let _ = self.watch_result(conn).await;
    }

    /// [`Drain::watch`], returning how the connection ended, for the caller
    /// to log a connection-level error with its peer and address.
    pub async fn watch_result<C: GracefulConnection>(self, conn: C) -> Result<(), C::Error> {
        let mut conn = pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = self.signaled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
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
