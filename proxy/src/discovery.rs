//! The sidecar's view of the mesh: the control plane's `Config.Watch` stream,
//! applied atomically, acknowledged, and kept when the control plane is away.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rand::Rng;
use serde::Serialize;
use tokio::sync::watch;
use weft_certs::SpiffeId;
use weft_proto::config::v1::config_client::ConfigClient;
use weft_proto::config::v1::{AckRequest, Service, Snapshot, WatchRequest};

use crate::identity::Identity;
use crate::inbound::policy::Authorizer;
use crate::inbound::ratelimit::RateLimiter;
use crate::metrics::{Metrics, OutcomeLabels};
use crate::routing::{Router, Rule};
use weft_config::MeshConfig;

/// An endpoint of a service, with the identity its sidecar must prove.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Endpoint {
    pub address: SocketAddr,
    #[serde(serialize_with = "ser_id")]
    pub spiffe_id: SpiffeId,
    pub labels: BTreeMap<String, String>,
}

fn ser_id<S: serde::Serializer>(id: &SpiffeId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(id.as_str())
}

/// The applied state: endpoints and the mesh config, swapped as one so a
/// request sees one consistent version from start to end.
#[derive(Debug, Default, Serialize)]
pub struct Table {
    pub version: u64,
    pub services: HashMap<String, Vec<Endpoint>>,
    /// The mesh config as applied (None: no config from the control plane).
    pub mesh: Option<MeshConfig>,
    #[serde(skip)]
    pub router: Router,
    #[serde(skip)]
    pub authz: Authorizer,
    #[serde(skip)]
    pub rate_limits: Option<Arc<RateLimiter>>,
    /// The route of each known service without HTTPRoutes (all its
    /// endpoints), made once per version instead of once per request.
    #[serde(skip)]
    pub(crate) default_rules: HashMap<String, Arc<Rule>>,
}

impl Table {
    /// Builds a table from a snapshot; any bad entry rejects the whole
    /// snapshot, so nothing half-applies.
    /// `prev` lends its rate-limit buckets when the limits did not change, so
    /// unrelated updates (a sidecar joining elsewhere) grant no fresh burst.
    pub fn from_snapshot(s: &Snapshot, own_service: &str, prev: &Table) -> Result<Self, String> {
        let mut services = HashMap::new();
        for svc in &s.services {
            let mut eps = Vec::with_capacity(svc.endpoints.len());
            for ep in &svc.endpoints {
                let address = ep
                    .address
                    .parse()
                    .map_err(|e| format!("service {}: endpoint address {:?}: {e}", svc.name, ep.address))?;
                let spiffe_id = SpiffeId::parse(&ep.spiffe_id)
                    .map_err(|e| format!("service {}: endpoint {}: SPIFFE ID: {e}", svc.name, ep.address))?;
                eps.push(Endpoint { address, spiffe_id, labels: ep.labels.clone().into_iter().collect() });
            }
            services.insert(svc.name.clone(), eps);
        }
        let mesh: Option<MeshConfig> = if s.mesh_config_json.is_empty() {
            None
        } else {
            Some(serde_json::from_str(&s.mesh_config_json).map_err(|e| format!("mesh config: {e}"))?)
        };
        let empty = MeshConfig::default();
        let cfg = mesh.as_ref().unwrap_or(&empty);
        let router = Router::new(cfg)?;
        let authz = Authorizer::new(cfg, own_service);
        let limiter = RateLimiter::new(cfg, own_service);
        let rate_limits = match &prev.rate_limits {
            Some(old) if old.same_limits(&limiter) => Some(old.clone()),
            _ => (!limiter.is_empty()).then(|| Arc::new(limiter)),
        };
        let default_rules = services.keys().map(|name| (name.clone(), Arc::new(Rule::default_for(name)))).collect();
        Ok(Self { version: s.version, services, mesh, router, authz, rate_limits, default_rules })
    }

    /// The default route of `service` (for services without HTTPRoutes).
    pub fn default_rule(&self, service: &str) -> Arc<Rule> {
        self.default_rules.get(service).cloned().unwrap_or_else(|| Arc::new(Rule::default_for(service)))
    }

    pub fn endpoints(&self, service: &str) -> &[Endpoint] {
        self.services.get(service).map(Vec::as_slice).unwrap_or_default()
    }
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

pub struct Discovery {
    service: String,
    table: ArcSwap<Table>,
    applied: watch::Sender<u64>,
}

impl Discovery {
    pub fn new(service: &str) -> Arc<Self> {
        Arc::new(Self {
            service: service.to_string(),
            table: ArcSwap::from_pointee(Table::default()),
            applied: watch::channel(0).0,
        })
    }

    /// The current table; holding it keeps that version for the whole request.
    pub fn table(&self) -> Arc<Table> {
        self.table.load_full()
    }

    /// Notified after every applied snapshot.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Resolves once a first snapshot has been applied.
    pub async fn first_applied(&self) {
        let mut rx = self.applied.subscribe();
        let _ = rx.wait_for(|v| *v > 0).await;
    }

    /// Applies a snapshot; returns the NACK reason if it was rejected.
    pub fn apply(&self, s: &Snapshot) -> Result<(), String> {
        let t = Table::from_snapshot(s, &self.service, &self.table.load())?;
        self.table.store(Arc::new(t));
        self.applied.send_replace(s.version.max(1));
        Ok(())
    }

    /// Watches the control plane forever, reconnecting with jittered backoff.
    pub async fn run(self: Arc<Self>, identity: Arc<Identity>, reg: Registration, metrics: Arc<Metrics>) {
        let mut backoff = Duration::from_millis(250);
        // The snapshot in effect (possibly merged, see RECONNECT_GRACE).
        let mut applied: Option<Snapshot> = None;
        loop {
            let mut received = false;
            match self.watch_once(&identity, &reg, &metrics, &mut received, &mut applied).await {
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

    async fn watch_once(
        &self,
        identity: &Identity,
        reg: &Registration,
        metrics: &Metrics,
        received: &mut bool,
        applied: &mut Option<Snapshot>,
    ) -> Result<(), String> {
        let channel = identity.control_plane_channel(true).map_err(|e| e.to_string())?;
        let mut client = ConfigClient::new(channel);
        let mut stream = client
            .watch(WatchRequest {
                service: reg.service.clone(),
                inbound_address: reg.inbound_address.to_string(),
                labels: reg.labels.clone(),
                admin_address: reg.admin_address.to_string(),
            })
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
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
                    let Some(snap) = m.map_err(|s| format!("{:?}: {}", s.code(), s.message()))? else {
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
            let error = match self.apply(&effective) {
                Ok(()) => {
                    *applied = Some(effective);
                    metrics.config_updates.get_or_create(&OutcomeLabels { outcome: "applied" }).inc();
                    tracing::debug!(version = snap.version, "config applied");
                    String::new()
                }
                Err(e) => {
                    metrics.config_updates.get_or_create(&OutcomeLabels { outcome: "rejected" }).inc();
                    tracing::warn!(version = snap.version, error = %e, "config rejected; keeping the last good one");
                    e
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

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::config::v1::{Endpoint as PbEndpoint, Service as PbService};

    fn snapshot(version: u64, limit_rps: u32, extra_endpoint: bool) -> Snapshot {
        let cfg = format!(
            "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {{name: api}}\nspec: {{}}\n---\napiVersion: weft.dev/v1alpha1\nkind: RateLimit\nmetadata: {{name: rl}}\nspec: {{targetRef: {{name: api}}, requestsPerSecond: {limit_rps}}}\n"
        );
        let cfg = weft_config::parse(&cfg).unwrap();
        let mut endpoints = vec![PbEndpoint {
            address: "127.0.0.1:1".into(),
            spiffe_id: "spiffe://td/ns/a/sa/api".into(),
            labels: Default::default(),
        }];
        if extra_endpoint {
            endpoints.push(PbEndpoint {
                address: "127.0.0.1:2".into(),
                spiffe_id: "spiffe://td/ns/a/sa/api".into(),
                labels: Default::default(),
            });
        }
        Snapshot {
            version,
            services: vec![PbService { name: "api".into(), endpoints }],
            mesh_config_json: serde_json::to_string(&cfg).unwrap(),
        }
    }

    #[test]
    fn rate_limit_buckets_survive_unrelated_updates() {
        let t1 = Table::from_snapshot(&snapshot(1, 5, false), "api", &Table::default()).unwrap();
        let t2 = Table::from_snapshot(&snapshot(2, 5, true), "api", &t1).unwrap();
        assert_eq!(t2.endpoints("api").len(), 2);
        assert!(Arc::ptr_eq(t1.rate_limits.as_ref().unwrap(), t2.rate_limits.as_ref().unwrap()));
        let t3 = Table::from_snapshot(&snapshot(3, 9, true), "api", &t2).unwrap();
        assert!(
            !Arc::ptr_eq(t2.rate_limits.as_ref().unwrap(), t3.rate_limits.as_ref().unwrap()),
            "changed limits start afresh"
        );
    }

    #[test]
    fn a_bad_snapshot_is_rejected_whole() {
        let mut s = snapshot(1, 5, true);
        s.services[0].endpoints[1].spiffe_id = "spiffe://Bad/x".into();
        let err = Table::from_snapshot(&s, "api", &Table::default()).unwrap_err();
        assert!(err.contains("127.0.0.1:2") && err.contains("SPIFFE ID"), "{err}");
        s.services[0].endpoints[1].spiffe_id = "spiffe://td/ok".into();
        s.mesh_config_json = "{not json".into();
        assert!(Table::from_snapshot(&s, "api", &Table::default()).unwrap_err().contains("mesh config"));
    }
}
