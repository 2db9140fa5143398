//! The config client: the control plane's `weft.config.v1.Config` service.
//! It registers this sidecar (`Watch`), receives versioned snapshots, has
//! [`State`] apply them, acknowledges each (ACK, or NACK with the reason),
//! and reconnects with jittered backoff; the last good config keeps serving
//! while the control plane is away.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use weft_proto::config::v1::config_client::ConfigClient;
use weft_proto::config::v1::{AckRequest, Service, Snapshot, WatchRequest};

use crate::identity::{Identity, IdentityError};
use crate::metrics::{Metrics, OutcomeLabels};
use crate::state::State;

/// Why a config stream session ended.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("{:?}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
}

/// After the config stream reconnects, endpoints that the new session does
/// not list yet are kept this long. A restarted control plane knows an
/// endpoint only once that endpoint's own sidecar has reconnected (each
/// retries with up to ~7.5 s of jittered backoff), so its first snapshots are
/// incomplete rather than removals; applying them as they are would drop
/// endpoints that the last good config still serves and fail requests.
const RECONNECT_GRACE: Duration = Duration::from_secs(10);

/// `fresh` plus every endpoint of `previous` that `fresh` does not list (by
/// address); version and mesh config are `fresh`'s.
fn with_missing_endpoints(fresh: &Snapshot, previous: &Snapshot) -> Snapshot {
    let mut merged = fresh.clone();
    for old in &previous.services {
        let i = match merged.services.iter().position(|s| s.name == old.name) {
            Some(i) => i,
            None => {
                merged.services.push(Service { name: old.name.clone(), endpoints: Vec::new() });
                merged.services.len() - 1
            }
        };
        let svc = &mut merged.services[i];
        for ep in &old.endpoints {
            if !svc.endpoints.iter().any(|e| e.address == ep.address) {
                svc.endpoints.push(ep.clone());
            }
        }
    }
    merged
}

/// What this sidecar registers.
#[derive(Debug, Clone)]
pub struct Registration {
    pub service: String,
    pub inbound_address: SocketAddr,
    pub admin_address: SocketAddr,
    pub labels: HashMap<String, String>,
}

/// The config client of one sidecar.
pub struct ConfigStream {
    state: Arc<State>,
    identity: Arc<Identity>,
    registration: Registration,
    metrics: Arc<Metrics>,
}

impl ConfigStream {
    pub fn new(state: Arc<State>, identity: Arc<Identity>, registration: Registration, metrics: Arc<Metrics>) -> Self {
        Self { state, identity, registration, metrics }
    }

    /// Watches the control plane forever, reconnecting with jittered backoff.
    pub async fn run(self) {
        let mut backoff = Duration::from_millis(250);
        // The snapshot in effect (possibly merged, see RECONNECT_GRACE).
        let mut applied: Option<Snapshot> = None;
        loop {
            let mut received = false;
            match self.watch_once(&mut received, &mut applied).await {
                Ok(()) => tracing::warn!("config stream ended; reconnecting"),
                Err(e) => {
                    tracing::warn!(error = %e, "config stream failed; keeping the last config")
                }
            }
            if received {
                backoff = Duration::from_millis(250);
            }
            let jittered = backoff.mul_f64(rand::rng().random_range(0.5..1.5));
            tokio::time::sleep(jittered).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// One session: open the watch, apply and acknowledge until it ends.
    async fn watch_once(&self, received: &mut bool, applied: &mut Option<Snapshot>) -> Result<(), StreamError> {
        let (reg, metrics) = (&self.registration, &self.metrics);
        let channel = self.identity.control_plane_channel(true)?;
        let mut client = ConfigClient::new(channel);
        let mut stream = client
            .watch(WatchRequest {
                service: reg.service.clone(),
                inbound_address: reg.inbound_address.to_string(),
                labels: reg.labels.clone(),
                admin_address: reg.admin_address.to_string(),
            })
            .await?
            .into_inner();
        tracing::info!("config stream open");
        // After a reconnect, keep what the previous session listed until this
        // one has had time to hear from every sidecar again.
        let previous = applied.clone();
        let mut grace = previous.is_some();
        let grace_end = tokio::time::Instant::now() + RECONNECT_GRACE;
        let mut latest: Option<Snapshot> = None;
        loop {
            let (snap, effective, ack) = tokio::select! {
                m = stream.message() => {
                    let Some(snap) = m? else {
                        break;
                    };
                    let effective = match (&previous, grace) {
                        (Some(p), true) => with_missing_endpoints(&snap, p),
                        _ => snap.clone(),
                    };
                    (snap, effective, true)
                }
                _ = tokio::time::sleep_until(grace_end), if grace => {
                    grace = false;
                    // From now on the control plane's view is the whole truth.
                    match &latest {
                        Some(l) if applied.as_ref() != Some(l) => (l.clone(), l.clone(), false),
                        _ => continue,
                    }
                }
            };
            *received = true;
            let error = match self.state.apply(&effective) {
                Ok(()) => {
                    *applied = Some(effective);
                    metrics.config_updates.get_or_create(&OutcomeLabels { outcome: "applied" }).inc();
                    tracing::debug!(version = snap.version, "config applied");
                    String::new()
                }
                Err(e) => {
                    metrics.config_updates.get_or_create(&OutcomeLabels { outcome: "rejected" }).inc();
                    tracing::warn!(version = snap.version, error = %e, "config rejected; keeping the last good one");
                    e.to_string()
                }
            };
            let version = snap.version;
            latest = Some(snap);
            if !ack {
                continue;
            }
            let ack = AckRequest { version, error, inbound_address: reg.inbound_address.to_string() };
            if let Err(s) = client.ack(ack).await {
                tracing::debug!(error = %s, "ack failed");
            }
        }
        Ok(())
    }
}
