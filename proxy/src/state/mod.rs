//! What the sidecar believes: the endpoints of every service with the
//! identity each must prove, the compiled routes, authorization and rate
//! limits — swapped as one [`Snapshot`] per applied config — and the state
//! that must outlive a swap (an endpoint's balancer statistics and pooled
//! connection, a limit's buckets, a rule's retry budget), kept one way
//! ([`kept::Kept`]) and dropped when what it belongs to leaves the config.
//!
//! The request layers (`inbound/`, `outbound/`) read it; it imports none of
//! them. The config client (`config_stream.rs`) feeds it.

pub mod authz;
pub mod balance;
pub mod budget;
pub mod endpoint_stats;
pub mod endpoints;
pub mod kept;
pub mod ratelimit;
pub mod routes;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;
use weft_certs::SpiffeId;
use weft_config::MeshConfig;
use weft_proto::config::v1 as pb;

use crate::metrics::Metrics;
use authz::Authorizer;
use budget::Budget;
use kept::Kept;
use ratelimit::{Limit, LimitClock, RateLimits};
use routes::{RouteError, Router, Rule};

pub use endpoints::{Endpoint, EndpointState, Pooled, StreamCount, StreamGuard};

/// Why a snapshot from the control plane was rejected (sent back as the NACK
/// reason; the last good config keeps serving).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("service {service}: endpoint address {address:?}: {source}")]
    EndpointAddress { service: String, address: String, source: std::net::AddrParseError },
    #[error("service {service}: endpoint {address}: SPIFFE ID: {source}")]
    EndpointId { service: String, address: String, source: weft_certs::SpiffeIdError },
    #[error("mesh config: {0}")]
    MeshConfig(#[from] serde_json::Error),
    #[error(transparent)]
    Routes(#[from] RouteError),
}

/// One applied config: endpoints and the mesh config, compiled, swapped as
/// one so a request sees one consistent version from start to end.
#[derive(Debug, Default, Serialize)]
pub struct Snapshot {
    pub version: u64,
    /// With an etcd-backed control plane: the etcd revision of the mesh
    /// config, the same from every replica (0: file store).
    pub config_revision: i64,
    pub services: HashMap<String, Vec<Endpoint>>,
    /// The mesh config as applied (None: no config from the control plane).
    pub mesh: Option<MeshConfig>,
    #[serde(skip)]
    pub routes: Router,
    #[serde(skip)]
    pub authz: Authorizer,
    #[serde(skip)]
    pub rate_limits: Option<RateLimits>,
    /// The route of each known service without HTTPRoutes (all its
    /// endpoints), made once per version instead of once per request.
    #[serde(skip)]
    pub(crate) default_rules: HashMap<String, Arc<Rule>>,
    /// Original destinations of intercepted connections → service
    /// ([`Snapshot::service_at`]): per IP, the port it must be on (None:
    /// any) and the service, sorted by service name.
    #[serde(skip)]
    pub(crate) destinations: HashMap<IpAddr, Vec<(Option<u16>, String)>>,
}

impl Snapshot {
    /// The default route of `service` (for services without HTTPRoutes).
    pub fn default_rule(&self, service: &str) -> Arc<Rule> {
        self.default_rules.get(service).cloned().unwrap_or_else(|| Arc::new(Rule::default_for(service)))
    }

    pub fn endpoints(&self, service: &str) -> &[Endpoint] {
        self.services.get(service).map(Vec::as_slice).unwrap_or_default()
    }

    /// Whether the mesh knows `service`: discovery lists it (a sidecar of
    /// it registered), or the config declares it (a `Service`, which may
    /// have no endpoints right now).
    pub fn knows(&self, service: &str) -> bool {
        self.services.contains_key(service) || self.mesh.as_ref().is_some_and(|m| m.services.contains_key(service))
    }

    /// The service an intercepted connection to `dst` is for: a Service's
    /// virtual address (`spec.addresses`) on its `spec.port`, or an
    /// endpoint's IP (a pod address) on the Service's `spec.port` — on any
    /// port when no Service declares the name. None: not the mesh's.
    pub fn service_at(&self, dst: SocketAddr) -> Option<&str> {
        self.destinations
            .get(&dst.ip())?
            .iter()
            .find(|(port, _)| port.is_none_or(|p| p == dst.port()))
            .map(|(_, s)| s.as_str())
    }

    /// Whether `service` is declared `protocol: tcp` or `opaque` (no detection).
    pub fn declared_opaque(&self, service: &str) -> bool {
        self.mesh
            .as_ref()
            .and_then(|m| m.services.get(service))
            .is_some_and(|s| matches!(s.protocol, weft_config::Protocol::Tcp | weft_config::Protocol::Opaque))
    }

    /// The Mesh's `spec.outboundTrafficPolicy` (default: allowAny).
    pub fn outbound_traffic_policy(&self) -> weft_config::OutboundTrafficPolicy {
        self.mesh.as_ref().map(|m| m.mesh.outbound_traffic_policy).unwrap_or_default()
    }

    /// The Mesh's `spec.pathNormalization.encodedSlashes` (default: reject).
    pub fn encoded_slashes(&self) -> weft_config::EncodedSlashes {
        self.mesh.as_ref().map(|m| m.mesh.path_normalization.encoded_slashes).unwrap_or_default()
    }
}

/// How long an address that left the mesh (an endpoint's IP or a Service
/// virtual address no longer in the config) is remembered, so that an
/// intercepted connection to it is refused rather than passed through in
/// plaintext while callers catch up (a draining pod still accepts for a
/// moment; a restarted one comes back at the same IP): 5 minutes.
pub const FORMER_DESTINATION_RETENTION: Duration = Duration::from_secs(300);

/// An address that left the mesh: when, and whether a refusal was logged.
#[derive(Debug, Clone, Copy)]
struct Former {
    since: Instant,
    logged: bool,
}

/// The sidecar's state: the current [`Snapshot`] and what outlives it.
pub struct State {
    /// This sidecar's service (authorization and rate limits guard it).
    service: String,
    snapshot: ArcSwap<Snapshot>,
    applied: watch::Sender<u64>,
    endpoints: Kept<(SocketAddr, SpiffeId), EndpointState>,
    limits: Kept<String, Limit>,
    budgets: Kept<String, Budget>,
    clock: LimitClock,
    metrics: Arc<Metrics>,
    /// Addresses that were destinations of the mesh and are no longer
    /// ([`State::formerly_in_mesh`]), kept [`FORMER_DESTINATION_RETENTION`].
    former: Mutex<HashMap<IpAddr, Former>>,
    /// `--calls` (empty: the whole mesh), to tell a service outside the
    /// sidecar's scope from one the mesh lacks.
    calls: std::sync::OnceLock<Vec<String>>,
}

impl State {
    pub fn new(service: &str, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            service: service.to_string(),
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            applied: watch::channel(0).0,
            endpoints: Kept::default(),
            limits: Kept::default(),
            budgets: Kept::default(),
            clock: LimitClock::default(),
            metrics,
            former: Mutex::new(HashMap::new()),
            calls: std::sync::OnceLock::new(),
        })
    }

    /// Records the sidecar's `--calls` (set once, at start; later calls are ignored).
    pub fn set_calls(&self, calls: Vec<String>) {
        let _ = self.calls.set(calls);
    }

    /// The sidecar's `--calls` (empty: not given, the whole mesh).
    pub fn calls(&self) -> &[String] {
        self.calls.get().map(Vec::as_slice).unwrap_or_default()
    }

    /// The current snapshot; holding it keeps that version for the whole request.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Notified after every applied snapshot.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Whether a first snapshot has been applied (before it, no destination
    /// can be judged: every one would look unknown).
    pub fn has_config(&self) -> bool {
        *self.applied.borrow() > 0
    }

    /// Whether `ip` was a destination of the mesh (an endpoint's IP or a
    /// Service's virtual address) within [`FORMER_DESTINATION_RETENTION`]
    /// and is not one now. The second value is true the first time it is
    /// asked about since it left (so a refusal is logged once per address).
    pub fn formerly_in_mesh(&self, ip: IpAddr) -> (bool, bool) {
        let mut former = self.former.lock().unwrap_or_else(|e| e.into_inner());
        match former.get_mut(&ip) {
            Some(f) if f.since.elapsed() < FORMER_DESTINATION_RETENTION => {
                (true, !std::mem::replace(&mut f.logged, true))
            }
            Some(_) => {
                former.remove(&ip);
                (false, false)
            }
            None => (false, false),
        }
    }

    /// Resolves once a first snapshot has been applied.
    pub async fn first_applied(&self) {
        let mut rx = self.applied.subscribe();
        let _ = rx.wait_for(|v| *v > 0).await;
    }

    /// How many endpoints have kept state (balancer statistics, pool slot).
    pub fn kept_endpoints(&self) -> usize {
        self.endpoints.len()
    }

    /// Applies a snapshot from the control plane; any bad entry rejects the
    /// whole snapshot, so nothing half-applies. What outlives the swap is
    /// carried over, and what the new snapshot no longer names is dropped.
    pub fn apply(&self, s: &pb::Snapshot) -> Result<(), ConfigError> {
        let mut endpoints = self.endpoints.renew();
        let mut limits = self.limits.renew();
        let mut budgets = self.budgets.renew();
        let mut services = HashMap::new();
        let now = Instant::now();
        for svc in &s.services {
            let mut eps = Vec::with_capacity(svc.endpoints.len());
            for ep in &svc.endpoints {
                let address = ep.address.parse().map_err(|source| ConfigError::EndpointAddress {
                    service: svc.name.clone(),
                    address: ep.address.clone(),
                    source,
                })?;
                let spiffe_id = SpiffeId::parse(&ep.spiffe_id).map_err(|source| ConfigError::EndpointId {
                    service: svc.name.clone(),
                    address: ep.address.clone(),
                    source,
                })?;
                let gauge = &self.metrics.balancer_endpoints;
                let state = endpoints.get((address, spiffe_id.clone()), |_| true, || EndpointState::new(gauge, now));
                eps.push(Endpoint {
                    address,
                    spiffe_id: Arc::new(spiffe_id),
                    labels: ep.labels.clone().into_iter().collect(),
                    state,
                });
            }
            services.insert(svc.name.clone(), eps);
        }
        let mesh: Option<MeshConfig> =
            if s.mesh_config_json.is_empty() { None } else { Some(serde_json::from_str(&s.mesh_config_json)?) };
        let empty = MeshConfig::default();
        let cfg = mesh.as_ref().unwrap_or(&empty);
        let routes = Router::new(cfg, &mut budgets)?;
        let authz = Authorizer::new(cfg, &self.service);
        let rate_limits = RateLimits::new(cfg, &self.service, &mut limits, &self.clock);
        let rate_limits = (!rate_limits.is_empty()).then_some(rate_limits);
        let default_rules = services.keys().map(|name| (name.clone(), Arc::new(Rule::default_for(name)))).collect();
        let destinations = destinations(&services, cfg);
        let snapshot = Snapshot {
            version: s.version,
            config_revision: s.config_revision,
            services,
            mesh,
            routes,
            authz,
            rate_limits,
            default_rules,
            destinations,
        };
        // Nothing failed: the renewals become the kept state (the rest drops).
        endpoints.commit();
        limits.commit();
        budgets.commit();
        self.remember_former(&snapshot, now);
        self.snapshot.store(Arc::new(snapshot));
        self.applied.send_replace(s.version.max(1));
        Ok(())
    }
}

impl State {
    /// Records the addresses the current snapshot maps and `next` does not,
    /// forgets those `next` maps again, and drops the expired.
    fn remember_former(&self, next: &Snapshot, now: Instant) {
        let current = self.snapshot.load();
        let mut former = self.former.lock().unwrap_or_else(|e| e.into_inner());
        former.retain(|ip, f| {
            !next.destinations.contains_key(ip) && now.duration_since(f.since) < FORMER_DESTINATION_RETENTION
        });
        for ip in current.destinations.keys().filter(|ip| !next.destinations.contains_key(ip)) {
            former.insert(*ip, Former { since: now, logged: false });
        }
    }
}

/// The map behind [`Snapshot::service_at`].
fn destinations(
    services: &HashMap<String, Vec<Endpoint>>,
    cfg: &MeshConfig,
) -> HashMap<IpAddr, Vec<(Option<u16>, String)>> {
    let mut map: HashMap<IpAddr, Vec<(Option<u16>, String)>> = HashMap::new();
    for (name, svc) in &cfg.services {
        for ip in &svc.addresses {
            map.entry(*ip).or_default().push((Some(svc.port), name.clone()));
        }
    }
    for (name, eps) in services {
        let port = cfg.services.get(name).map(|s| s.port);
        for ep in eps {
            let entry = map.entry(ep.address.ip()).or_default();
            if !entry.iter().any(|(p, n)| *p == port && n == name) {
                entry.push((port, name.clone()));
            }
        }
    }
    for v in map.values_mut() {
        // Exact ports before "any port", then by name: one answer, whatever the order of discovery.
        v.sort_by(|a, b| (a.0.is_none(), &a.1).cmp(&(b.0.is_none(), &b.1)));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::config::v1::{Endpoint as PbEndpoint, Service as PbService};

    fn snapshot(version: u64, limit_rps: u32, extra_endpoint: bool) -> pb::Snapshot {
        let cfg = format!(
            "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {{name: api}}\nspec: {{}}\n---\napiVersion: weft.dev/v1alpha1\nkind: RateLimit\nmetadata: {{name: rl}}\nspec: {{targetRef: {{name: api}}, requestsPerSecond: {limit_rps}}}\n---\napiVersion: weft.dev/v1alpha1\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec: {{parentRefs: [{{name: api}}], rules: [{{backendRefs: [{{name: api}}], retry: {{attempts: 2, budget: {{percent: {limit_rps}}}}}}}]}}\n"
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
        pb::Snapshot {
            version,
            services: vec![PbService { name: "api".into(), endpoints }],
            mesh_config_json: serde_json::to_string(&cfg).unwrap(),
            ..Default::default()
        }
    }

    fn limit(s: &Snapshot) -> Arc<Limit> {
        s.rate_limits.as_ref().unwrap().limit("rl").unwrap().clone()
    }

    fn budget(s: &Snapshot) -> Arc<Budget> {
        s.routes.rules()[0].budget.clone().unwrap()
    }

    #[test]
    fn rate_limit_buckets_survive_unrelated_updates() {
        let state = State::new("api", Arc::new(Metrics::default()));
        state.apply(&snapshot(1, 5, false)).unwrap();
        let t1 = state.snapshot();
        state.apply(&snapshot(2, 5, true)).unwrap();
        let t2 = state.snapshot();
        assert_eq!(t2.endpoints("api").len(), 2);
        assert!(Arc::ptr_eq(&limit(&t1), &limit(&t2)));
        assert!(Arc::ptr_eq(&budget(&t1), &budget(&t2)), "retry budgets too");
        state.apply(&snapshot(3, 9, true)).unwrap();
        let t3 = state.snapshot();
        assert!(!Arc::ptr_eq(&limit(&t2), &limit(&t3)), "changed limits start afresh");
        assert!(!Arc::ptr_eq(&budget(&t2), &budget(&t3)), "changed budgets start afresh");
    }

    #[test]
    fn a_bad_snapshot_is_rejected_whole() {
        let state = State::new("api", Arc::new(Metrics::default()));
        let mut s = snapshot(1, 5, true);
        s.services[0].endpoints[1].spiffe_id = "spiffe://Bad/x".into();
        let err = state.apply(&s).unwrap_err().to_string();
        assert!(err.contains("127.0.0.1:2") && err.contains("SPIFFE ID"), "{err}");
        s.services[0].endpoints[1].spiffe_id = "spiffe://td/ok".into();
        s.mesh_config_json = "{not json".into();
        assert!(state.apply(&s).unwrap_err().to_string().contains("mesh config"));
        assert_eq!(state.kept_endpoints(), 0, "a rejected snapshot keeps nothing");
    }

    #[test]
    fn endpoint_state_lives_while_discovery_lists_the_endpoint() {
        let metrics = Arc::new(Metrics::default());
        let state = State::new("api", metrics.clone());
        state.apply(&snapshot(1, 5, true)).unwrap();
        let first = state.snapshot().endpoints("api")[0].state.clone();
        assert_eq!((state.kept_endpoints(), metrics.balancer_endpoints.get()), (2, 2));

        // An unrelated update keeps the endpoint's stats and connection.
        state.apply(&snapshot(2, 5, true)).unwrap();
        assert!(Arc::ptr_eq(&first, &state.snapshot().endpoints("api")[0].state));

        // Endpoint 2 leaves: its state is dropped with the old snapshot.
        state.apply(&snapshot(3, 5, false)).unwrap();
        assert_eq!((state.kept_endpoints(), metrics.balancer_endpoints.get()), (1, 1));

        // Churn: hundreds of endpoints come and go, nothing stays behind.
        let mut many = snapshot(4, 5, false);
        for i in 0..500u16 {
            many.services[0].endpoints.push(PbEndpoint {
                address: format!("127.0.0.2:{}", 1000 + i),
                spiffe_id: "spiffe://td/ns/a/sa/api".into(),
                labels: Default::default(),
            });
        }
        state.apply(&many).unwrap();
        assert_eq!(metrics.balancer_endpoints.get(), 501);
        state.apply(&snapshot(5, 5, false)).unwrap();
        assert_eq!((state.kept_endpoints(), metrics.balancer_endpoints.get()), (1, 1));

        // The same address with another identity is another endpoint.
        let mut other = snapshot(6, 5, false);
        other.services[0].endpoints[0].spiffe_id = "spiffe://td/ns/a/sa/other".into();
        state.apply(&other).unwrap();
        assert!(!Arc::ptr_eq(&first, &state.snapshot().endpoints("api")[0].state));
        drop(first);
        assert_eq!(metrics.balancer_endpoints.get(), 1);
    }

    #[test]
    fn original_destinations_map_to_services_by_endpoint_ip_and_virtual_address() {
        let state = State::new("web", Arc::new(Metrics::default()));
        let mut s = snapshot(1, 5, false);
        let mut cfg: MeshConfig = serde_json::from_str(&s.mesh_config_json).unwrap();
        let api = cfg.services.get_mut("api").unwrap();
        api.port = 8080;
        api.addresses = vec!["10.96.0.10".parse().unwrap()];
        s.mesh_config_json = serde_json::to_string(&cfg).unwrap();
        s.services[0].endpoints[0].address = "10.1.0.5:15006".into();
        s.services.push(PbService {
            name: "undeclared".into(),
            endpoints: vec![PbEndpoint {
                address: "10.1.0.6:15006".into(),
                spiffe_id: "spiffe://td/ns/a/sa/undeclared".into(),
                labels: Default::default(),
            }],
        });
        state.apply(&s).unwrap();
        let snap = state.snapshot();
        let at = |a: &str| snap.service_at(a.parse().unwrap());
        assert_eq!(at("10.96.0.10:8080"), Some("api"), "a virtual address on the Service's port");
        assert_eq!(at("10.96.0.10:80"), None, "another port of a virtual address");
        assert_eq!(at("10.1.0.5:8080"), Some("api"), "a pod address on the Service's port");
        assert_eq!(at("10.1.0.5:9090"), None, "another port of the pod is not the service's");
        assert_eq!(at("10.1.0.6:1234"), Some("undeclared"), "no Service declares the port: any port");
        assert_eq!(at("10.9.9.9:8080"), None);
        assert!(!snap.declared_opaque("api"));
        assert_eq!(snap.outbound_traffic_policy(), weft_config::OutboundTrafficPolicy::AllowAny);
    }

    #[test]
    fn budgets_and_limits_leave_with_their_rule() {
        let state = State::new("api", Arc::new(Metrics::default()));
        state.apply(&snapshot(1, 5, false)).unwrap();
        assert_eq!((state.budgets.len(), state.limits.len()), (1, 1));
        let mut bare = snapshot(2, 5, false);
        bare.mesh_config_json.clear();
        state.apply(&bare).unwrap();
        assert_eq!((state.budgets.len(), state.limits.len()), (0, 0));
    }
}
