//! The config client: the control plane's `weft.config.v1.Config` service.
//! It registers this sidecar (`Watch`), receives versioned snapshots, has
//! [`State`] apply them, acknowledges each (ACK, or NACK with the reason)
//! with the expiry of the SVID it holds (also reported after each renewal),
//! and reconnects with jittered backoff, to another control-plane replica
//! when its replica went away ([`crate::control_plane`]); the last good
//! config keeps serving while the control plane is away. It declares the
//! services it calls (`--calls`: its scope; without it, the whole mesh) and
//! takes incremental snapshots, merged here into the session's full view.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use weft_proto::config::v1::config_client::ConfigClient;
use weft_proto::config::v1::{AckRequest, Service, Snapshot, WatchRequest};

use crate::control_plane::Backoff;
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
    #[error("the control plane sent an incremental snapshot (version {0}) before a full one")]
    IncrementalFirst(u64),
}

/// `base` (the session's last full view) with the incremental snapshot
/// `delta` applied: changed services replaced whole, removed ones dropped,
/// the mesh config kept when unchanged. A full snapshot is returned as is.
pub fn merge_incremental(base: Option<&Snapshot>, delta: Snapshot) -> Result<Snapshot, StreamError> {
    if !delta.incremental {
        return Ok(delta);
    }
    let base = base.ok_or(StreamError::IncrementalFirst(delta.version))?;
    let mut services: std::collections::BTreeMap<String, Service> =
        base.services.iter().map(|s| (s.name.clone(), s.clone())).collect();
    for name in &delta.removed_services {
        services.remove(name);
    }
    for svc in delta.services {
        services.insert(svc.name.clone(), svc);
    }
    Ok(Snapshot {
        version: delta.version,
        services: services.into_values().collect(),
        mesh_config_json: if delta.mesh_config_unchanged {
            base.mesh_config_json.clone()
        } else {
            delta.mesh_config_json
        },
        config_revision: delta.config_revision,
        unknown_calls: delta.unknown_calls,
        ..Default::default()
    })
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
    /// The services this workload calls (`--calls`, plus its `--upstream`
    /// names when `--calls` is given); empty: the whole mesh.
    pub calls: Vec<String>,
    /// The names given to `--calls` (the rest of `calls` come from
    /// `--upstream`), to name the right flag in a warning.
    pub declared_calls: Vec<String>,
}

/// The config client of one sidecar.
pub struct ConfigStream {
    state: Arc<State>,
    identity: Arc<Identity>,
    registration: Registration,
    metrics: Arc<Metrics>,
    /// The names of `calls` the control plane last said the mesh does not
    /// define (`Snapshot.unknown_calls`), warned about once per change.
    unknown_calls: std::sync::Mutex<Vec<String>>,
}

impl ConfigStream {
    pub fn new(state: Arc<State>, identity: Arc<Identity>, registration: Registration, metrics: Arc<Metrics>) -> Self {
        Self { state, identity, registration, metrics, unknown_calls: Default::default() }
    }

    /// Logs, once per change, the declared calls the mesh does not define
    /// (a WARN naming the flag, the service and what to change) and the
    /// ones that became defined since.
    fn report_unknown_calls(&self, unknown: &[String]) {
        let mut before = self.unknown_calls.lock().unwrap_or_else(|e| e.into_inner());
        if *before == unknown {
            return;
        }
        let flag =
            |name: &String| if self.registration.declared_calls.contains(name) { "--calls" } else { "--upstream" };
        for name in unknown.iter().filter(|n| !before.contains(n)) {
            let flag = flag(name);
            tracing::warn!(
                service = %name,
                "{flag} names service `{name}`, which the mesh does not define (no Service {name} in the mesh config \
                 and no sidecar registered as {name}), so this sidecar gets no endpoints or routes for it; check the \
                 spelling or apply a Service named {name}"
            );
        }
        for name in before.iter().filter(|n| !unknown.contains(n)) {
            tracing::info!(service = %name, "service `{name}` named by {} is now defined in the mesh", flag(name));
        }
        *before = unknown.to_vec();
    }

    /// The expiry of the SVID held now, seconds since the Unix epoch (0: none).
    fn svid_expires_at(&self) -> i64 {
        self.identity.current().map_or(0, |s| s.expires_unix())
    }

    /// Watches the control plane forever, reconnecting with jittered
    /// backoff; a replica whose stream ended or failed is left for another.
    pub async fn run(self) {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
        // The snapshot in effect (possibly merged, see RECONNECT_GRACE).
        let mut applied: Option<Snapshot> = None;
        loop {
            let mut received = false;
            let mut replica = None;
            match self.watch_once(&mut received, &mut applied, &mut replica).await {
                // No replica: none could be reached (the error says why).
                Ok(()) => tracing::warn!(control_plane = %shown(replica), "config stream ended; reconnecting"),
                Err(e) => {
                    tracing::warn!(control_plane = %shown(replica), error = %e, "config stream failed; keeping the last config")
                }
            }
            if let Some(addr) = replica {
                if received {
                    self.identity.control_planes().answered(addr);
                }
                self.identity.control_planes().failed(addr);
            }
            if received {
                backoff.reset();
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// One session: open the watch, apply and acknowledge until it ends.
    async fn watch_once(
        &self,
        received: &mut bool,
        applied: &mut Option<Snapshot>,
        replica: &mut Option<SocketAddr>,
    ) -> Result<(), StreamError> {
        let (reg, metrics) = (&self.registration, &self.metrics);
        let (channel, addr) = self.identity.replica_channel(true).await?;
        *replica = Some(addr);
        // Renewals from now on: the stream's connection keeps the SVID it was
        // made with, so the replica holding it hears of each new one here.
        let mut svids = self.identity.subscribe();
        let mut svid_reports = true;
        let mut client = ConfigClient::new(channel);
        let mut stream = client
            .watch(WatchRequest {
                service: reg.service.clone(),
                inbound_address: reg.inbound_address.to_string(),
                labels: reg.labels.clone(),
                admin_address: reg.admin_address.to_string(),
                calls: reg.calls.clone(),
                accepts_incremental: true,
            })
            .await?
            .into_inner();
        tracing::info!(control_plane = %addr, "config stream open");
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
                    let snap = merge_incremental(latest.as_ref(), snap)?;
                    // Not during the reconnect grace: a restarted control plane
                    // knows a service only once its sidecars are back.
                    if !grace {
                        self.report_unknown_calls(&snap.unknown_calls);
                    }
                    let effective = match (&previous, grace) {
                        (Some(p), true) => with_missing_endpoints(&snap, p),
                        _ => snap.clone(),
                    };
                    (snap, effective, true)
                }
                r = svids.changed(), if svid_reports => {
                    if r.is_err() {
                        svid_reports = false;
                        continue;
                    }
                    // Version 0: an SVID report, no acknowledgement.
                    let report = AckRequest {
                        inbound_address: reg.inbound_address.to_string(),
                        svid_expires_at: self.svid_expires_at(),
                        ..Default::default()
                    };
                    if let Err(s) = client.ack(report).await {
                        tracing::debug!(error = %s, "SVID report failed");
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(grace_end), if grace => {
                    grace = false;
                    if let Some(l) = &latest {
                        self.report_unknown_calls(&l.unknown_calls);
                    }
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
            let ack = AckRequest {
                version,
                error,
                inbound_address: reg.inbound_address.to_string(),
                svid_expires_at: self.svid_expires_at(),
            };
            if let Err(s) = client.ack(ack).await {
                tracing::debug!(error = %s, "ack failed");
            }
        }
        Ok(())
    }
}

/// A replica's address for the log, or `none` (never Rust's `Some(…)`).
fn shown(replica: Option<std::net::SocketAddr>) -> String {
    replica.map_or_else(|| "none".to_string(), |a| a.to_string())
}

#[cfg(test)]
mod tests {
    use weft_proto::config::v1::Endpoint;

    use super::*;

    fn svc(name: &str, addrs: &[&str]) -> Service {
        let endpoints = addrs.iter().map(|a| Endpoint { address: a.to_string(), ..Default::default() }).collect();
        Service { name: name.into(), endpoints }
    }

    #[test]
    fn incremental_snapshots_merge_into_the_last_full_one() {
        let full = Snapshot {
            version: 3,
            services: vec![svc("api", &["127.0.0.1:1"]), svc("db", &["127.0.0.1:2"])],
            mesh_config_json: "{\"m\":1}".into(),
            ..Default::default()
        };
        assert_eq!(merge_incremental(None, full.clone()).unwrap(), full, "a full snapshot stands alone");
        let delta = Snapshot {
            version: 4,
            services: vec![svc("api", &["127.0.0.1:1", "127.0.0.1:3"]), svc("web", &["127.0.0.1:4"])],
            incremental: true,
            removed_services: vec!["db".into()],
            mesh_config_unchanged: true,
            unknown_calls: vec!["apii".into()],
            ..Default::default()
        };
        let merged = merge_incremental(Some(&full), delta.clone()).unwrap();
        assert_eq!(merged.version, 4);
        assert_eq!(merged.unknown_calls, ["apii"], "every message carries the whole list");
        assert!(!merged.incremental);
        assert_eq!(merged.services, vec![svc("api", &["127.0.0.1:1", "127.0.0.1:3"]), svc("web", &["127.0.0.1:4"])]);
        assert_eq!(merged.mesh_config_json, "{\"m\":1}", "unchanged mesh config kept");
        let cfg =
            Snapshot { version: 5, mesh_config_json: "{\"m\":2}".into(), incremental: true, ..Default::default() };
        let merged = merge_incremental(Some(&merged), cfg).unwrap();
        assert_eq!(merged.mesh_config_json, "{\"m\":2}");
        assert_eq!(merged.services.len(), 2, "services untouched");
        assert!(matches!(merge_incremental(None, delta), Err(StreamError::IncrementalFirst(4))));
    }
}
