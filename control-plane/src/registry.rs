//! The registry of connected sidecars: who they are, where their inbound
//! listener is, and which config version they applied. A registration lives
//! exactly as long as the sidecar's config watch stream. With several
//! replicas, the registrations other replicas hold (from etcd, see
//! [`crate::replicas`]) are merged into every snapshot as `shared` ones.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch, Notify};
use weft_certs::{SpiffeId, TrustDomain};
use weft_config::MeshConfig;
use weft_proto::admin::v1::{SidecarStatus, StatusResponse};
use weft_proto::config::v1::{Endpoint, Service, Snapshot};

use crate::metrics::Metrics;

/// How long registrations and deregistrations are gathered before one new
/// version is published: a join storm (a control-plane restart, a rollout)
/// becomes a few versions instead of one per sidecar, each pushed once.
/// Mesh config changes are published at once.
pub const COALESCE: Duration = Duration::from_millis(50);

/// While registrations keep arriving faster than this many per
/// [`COALESCE`] (a join storm), gathering goes on, up to
/// [`STORM_COALESCE`]: each version is pushed to every sidecar whose scope
/// it changed, so 20 versions a second during a 10,000-sidecar storm would
/// be 200,000 messages (and ACKs) a second.
pub const STORM_RATE: usize = 8;

/// The shortest time registrations are gathered for during a storm; the
/// longest is [`storm_coalesce`] of the sidecars connected.
pub const STORM_COALESCE: Duration = Duration::from_secs(1);

/// The longest registrations are gathered during a storm, whatever the size.
pub const STORM_COALESCE_MAX: Duration = Duration::from_secs(5);

/// Gathering time during a storm per connected sidecar (see [`storm_coalesce`]).
pub const STORM_COALESCE_PER_SIDECAR: Duration = Duration::from_micros(500);

/// How long registrations are gathered per version during a storm when
/// `sidecars` are connected: `sidecars` × [`STORM_COALESCE_PER_SIDECAR`],
/// within [`STORM_COALESCE`]..=[`STORM_COALESCE_MAX`] (1 s up to 2,000
/// sidecars, 5 s from 10,000). Each version in a storm is a push and an ACK
/// for nearly every connected sidecar (their services all change), about
/// 0.17 ms of control-plane CPU each as measured at 10,000: one version a
/// second would spend the whole CPU on re-pushing while newcomers wait for
/// their handshakes, and the storm's cost would grow with its length (N²).
pub fn storm_coalesce(sidecars: usize) -> Duration {
    STORM_COALESCE_PER_SIDECAR
        .saturating_mul(u32::try_from(sidecars).unwrap_or(u32::MAX))
        .clamp(STORM_COALESCE, STORM_COALESCE_MAX)
}

#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    pub spiffe_id: SpiffeId,
    pub service: String,
    pub address: String,
    pub admin_address: String,
    pub labels: HashMap<String, String>,
    /// When the SVID the sidecar holds expires: that of the stream's TLS
    /// connection at first, then what the sidecar reports after each renewal
    /// ([`Registry::svid_renewed`]). `None`: unknown.
    pub svid_expires: Option<SystemTime>,
    /// The services it declared it calls (`WatchRequest.calls`); empty: the whole mesh.
    pub calls: Vec<String>,
}

#[derive(Debug)]
struct Entry {
    reg: Registration,
    connected: Instant,
    acked: u64,
    nacked: u64,
    nack_reason: String,
    /// The last version pushed to this sidecar, and the newest version whose
    /// content for this sidecar is the same (its scope did not change, so
    /// nothing was pushed): an ACK of `sent` means in sync up to `same_until`.
    sent: u64,
    same_until: u64,
}

#[derive(Default)]
struct Inner {
    next_key: u64,
    sidecars: BTreeMap<u64, Entry>,
    /// The keys of `sidecars` by inbound address, so an ACK finds its
    /// sidecar without a scan (every sidecar ACKs every push).
    by_address: HashMap<String, Vec<u64>>,
    mesh_config_json: Arc<str>,
    /// `mesh_config_json` decoded, for the Services' `admit` rules and the
    /// sidecars' scopes (none before a config is set).
    mesh: Option<Arc<MeshConfig>>,
    /// Per-scope views of `mesh`, replaced with it.
    scopes: Arc<Scopes>,
    config_error: String,
    /// With etcd: the revision of the stored config in `mesh_config_json`.
    config_revision: i64,
    /// Registrations changed since the last published version.
    dirty: bool,
    /// Registration changes since the publisher last looked.
    arrived: usize,
    /// Registrations held by other replicas, endpoints like our own.
    shared: Vec<Registration>,
    /// Where registrations and deregistrations of this replica are told
    /// (the etcd writer), if anywhere.
    changes: Option<mpsc::UnboundedSender<LocalChange>>,
    /// Bumped whenever what [`Registry::local_acks`] returns may have
    /// changed (an ACK, a NACK, a sidecar coming or going, a new version),
    /// so the etcd writer rewrites this replica's ack record only then.
    acks_generation: u64,
}

/// This replica's sidecars' ACK state at one moment ([`Registry::local_acks`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalAcks {
    /// See `Inner::acks_generation`: equal generations, equal contents.
    pub generation: u64,
    /// The version this replica serves, which the versions below count in.
    pub version: u64,
    /// The mesh config revision it serves (0: file store, or none stored).
    pub config_revision: i64,
    /// Per sidecar: (inbound address, acked version, nacked version, NACK reason).
    pub sidecars: Vec<(String, u64, u64, String)>,
}

/// A change to this replica's own registrations, keyed by the registry's
/// per-stream key (unique within this process).
#[derive(Debug, Clone)]
pub enum LocalChange {
    Registered(u64, Box<Registration>),
    Deregistered(u64),
}

/// One published version of what sidecars are told: built once per version
/// and shared by every config stream (an `Arc`), whatever their number.
#[derive(Debug, Default)]
pub struct Published {
    /// Monotonic; one more than the previous published version.
    pub version: u64,
    /// Every service by name with its endpoints (address order). A service
    /// whose endpoints did not change keeps the very same `Arc` from one
    /// version to the next, so streams tell what changed by pointer.
    pub services: BTreeMap<String, Arc<Service>>,
    /// The validated mesh config as JSON (empty: none); the same `Arc`
    /// while it is unchanged.
    pub mesh_config_json: Arc<str>,
    pub mesh: Option<Arc<MeshConfig>>,
    /// With etcd: the config's etcd revision, equal on every replica (0: file store).
    pub config_revision: i64,
    /// Per-scope views of `mesh` (shared by every version with this mesh config).
    scopes: Arc<Scopes>,
    /// The whole-mesh snapshot, made on first use.
    full: OnceLock<Snapshot>,
}

/// What one scoped sidecar is told of the mesh: its services (see
/// [`Published::scope`]) and the part of the mesh config that concerns it.
#[derive(Debug)]
pub struct Scope {
    /// The services whose endpoints it gets.
    pub services: BTreeSet<String>,
    /// The mesh config cut to this scope (see [`scoped_mesh_config`]), as
    /// JSON in weft-config's schema; empty when there is no mesh config.
    pub mesh_config_json: Arc<str>,
}

/// A sidecar's own service and the services it calls, as it declared them.
type ScopeKey = (String, Vec<String>);

/// The [`Scope`]s of one mesh config by (own service, calls), made on first
/// use: sidecars of one service that call the same services share one, and
/// a version that changed only registrations reuses them all.
#[derive(Debug, Default)]
pub struct Scopes {
    by_key: Mutex<HashMap<ScopeKey, Arc<Scope>>>,
}

/// The part of `cfg` a sidecar of service `own` whose services are `scope`
/// needs (weft-proxy reads no more): the Mesh settings; the routes whose
/// parent is in the scope; the Services of the scope and of those routes'
/// backends (a route is compiled against its backends' Services); the
/// AuthorizationPolicies and RateLimits that guard `own` (directly, or
/// through one of the included routes); no Workloads.
pub fn scoped_mesh_config(cfg: &MeshConfig, own: &str, scope: &BTreeSet<String>) -> MeshConfig {
    let routes: Vec<_> =
        cfg.routes.iter().filter(|r| r.spec.parent_refs.iter().any(|p| scope.contains(&p.name))).cloned().collect();
    let backends = routes.iter().flat_map(|r| r.spec.rules.iter().flat_map(|rule| rule.backend_refs.iter()));
    let names: BTreeSet<&str> = scope.iter().map(String::as_str).chain(backends.map(|b| b.name.as_str())).collect();
    let route_names: HashSet<&str> = routes.iter().map(|r| r.name.as_str()).collect();
    MeshConfig {
        mesh: cfg.mesh.clone(),
        services: names
            .iter()
            .filter_map(|n| cfg.services.get_key_value(*n))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        policies: cfg.policies.iter().filter(|p| p.spec.target_ref.name == own).cloned().collect(),
        rate_limits: cfg
            .rate_limits
            .iter()
            .filter(|r| {
                let t = &r.spec.target_ref;
                if t.kind == "HTTPRoute" {
                    route_names.contains(t.name.as_str())
                } else {
                    t.name == own
                }
            })
            .cloned()
            .collect(),
        routes,
        grpc_routes: Vec::new(),
        workloads: Vec::new(),
    }
}

impl Published {
    /// The whole mesh as one snapshot (for sidecars without a scope, and
    /// the admin view), built at most once per version.
    pub fn full(&self) -> &Snapshot {
        self.full.get_or_init(|| Snapshot {
            version: self.version,
            services: self.services.values().map(|s| (**s).clone()).collect(),
            mesh_config_json: self.mesh_config_json.to_string(),
            config_revision: self.config_revision,
            ..Default::default()
        })
    }

    /// The services a sidecar of `own` service that calls `calls` needs:
    /// the called services, its own, and every backend of the routes whose
    /// parent is a called service (a split to `foo-v1`/`foo-v2`). `None`
    /// (the whole mesh) when `calls` is empty.
    pub fn scope(&self, own: &str, calls: &[String]) -> Option<BTreeSet<String>> {
        if calls.is_empty() {
            return None;
        }
        let mut scope: BTreeSet<String> = calls.iter().cloned().collect();
        scope.insert(own.to_string());
        for route in self.mesh.iter().flat_map(|m| m.routes.iter()) {
            if route.spec.parent_refs.iter().any(|p| calls.contains(&p.name)) {
                let backends = route.spec.rules.iter().flat_map(|r| r.backend_refs.iter());
                scope.extend(backends.map(|b| b.name.clone()));
            }
        }
        Some(scope)
    }

    /// The names in `calls` that this version does not know: no Service of
    /// that name in the mesh config and no endpoint registered for it (a
    /// misspelt `--calls`, or a Service not applied yet). In `calls` order.
    pub fn unknown_calls(&self, calls: &[String]) -> Vec<String> {
        let defined = |name: &String| self.mesh.as_ref().is_some_and(|m| m.services.contains_key(name));
        calls.iter().filter(|c| !self.services.contains_key(*c) && !defined(c)).cloned().collect()
    }

    /// The [`Scope`] of a sidecar of `own` that calls `calls`, made once per
    /// mesh config and (own, calls); `None` (the whole mesh) when `calls` is
    /// empty.
    pub fn scoped(&self, own: &str, calls: &[String]) -> Option<Arc<Scope>> {
        self.scoped_in(own, calls, &mut None)
    }

    /// [`Published::scoped`], remembering the answer in `cache` for the
    /// versions that share this mesh config (no lookup per version).
    pub fn scoped_in(
        &self,
        own: &str,
        calls: &[String],
        cache: &mut Option<(Arc<Scopes>, Arc<Scope>)>,
    ) -> Option<Arc<Scope>> {
        if let Some((scopes, scope)) = cache {
            if Arc::ptr_eq(scopes, &self.scopes) {
                return Some(scope.clone());
            }
        }
        if calls.is_empty() {
            return None;
        }
        let key = (own.to_string(), calls.to_vec());
        let mut by_key = self.scopes.by_key.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = by_key.get(&key) {
            *cache = Some((self.scopes.clone(), s.clone()));
            return Some(s.clone());
        }
        let services = self.scope(own, calls)?;
        let mesh_config_json: Arc<str> = match &self.mesh {
            Some(cfg) => {
                serde_json::to_string(&scoped_mesh_config(cfg, own, &services)).expect("a MeshConfig serializes").into()
            }
            // No config, or one that is not a MeshConfig (only in tests): as it is.
            None => self.mesh_config_json.clone(),
        };
        let scope = Arc::new(Scope { services, mesh_config_json });
        by_key.insert(key, scope.clone());
        *cache = Some((self.scopes.clone(), scope.clone()));
        Some(scope)
    }
}

pub struct Registry {
    inner: Mutex<Inner>,
    published: watch::Sender<Arc<Published>>,
    /// Wakes the publisher when registrations changed.
    changed: Arc<Notify>,
    metrics: Arc<Metrics>,
    /// Whether the mesh config to serve is known. False only while a replica
    /// on etcd has not read the stored config yet: streams send nothing
    /// until then, so no sidecar swaps its policies for an empty config.
    config_known: watch::Sender<bool>,
}

/// Deregisters its sidecar when dropped (the watch stream ended).
pub struct RegistrationGuard {
    registry: Arc<Registry>,
    key: u64,
    /// The first version that includes this registration.
    pub first_version: u64,
}

impl RegistrationGuard {
    /// Records that `version` was pushed to this sidecar.
    pub fn sent(&self, version: u64) {
        if let Some(e) = self.registry.lock().sidecars.get_mut(&self.key) {
            e.sent = version;
            e.same_until = version;
        }
    }

    /// Records that `version` changed nothing for this sidecar, so nothing
    /// was pushed: having ACKed what it was last sent, it is in sync with
    /// `version` too (what `weft status` compares).
    pub fn unchanged(&self, version: u64) {
        let mut inner = self.registry.lock();
        if let Some(e) = inner.sidecars.get_mut(&self.key) {
            e.same_until = version;
            if e.acked >= e.sent && e.sent > 0 && e.acked < version {
                e.acked = version;
                inner.acks_generation += 1;
            }
        }
    }
}

impl Drop for RegistrationGuard {
    fn drop(&mut self) {
        self.registry.deregister(self.key);
    }
}

impl Registry {
    /// An empty registry at version 1. Registrations are published by
    /// [`Registry::run_publisher`] (spawn it), or by [`Registry::snapshot`].
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        let first = Published { version: 1, ..Default::default() };
        metrics.config_version.set(1);
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            published: watch::channel(Arc::new(first)).0,
            changed: Arc::new(Notify::new()),
            metrics,
            config_known: watch::channel(true).0,
        })
    }

    /// The mesh config is in a store not read yet: config streams wait
    /// (see [`Registry::config_known`]) until [`Registry::set_mesh_config`]
    /// or [`Registry::config_settled`].
    pub fn expect_stored_config(&self) {
        self.config_known.send_replace(false);
    }

    /// The store was read and holds no mesh config: the defaults are it.
    pub fn config_settled(&self) {
        self.config_known.send_replace(true);
    }

    /// True once the mesh config to serve is known (always, with the file store).
    pub fn config_known(&self) -> watch::Receiver<bool> {
        self.config_known.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes the next version from `inner` while the caller holds the
    /// lock, so a version never pairs new contents with an old number.
    /// Services whose endpoints are unchanged keep their `Arc`.
    fn publish(&self, inner: &mut Inner) {
        inner.dirty = false;
        let prev = self.published.borrow().clone();
        let mut endpoints: BTreeMap<&str, Vec<Endpoint>> = BTreeMap::new();
        let no_config = MeshConfig::default();
        let cfg = inner.mesh.as_deref().unwrap_or(&no_config);
        // The Services with `admit` rules (usually few), once, rather than
        // every Service for every registration (weft-config's `services_of`).
        let admitting: Vec<(&str, &weft_config::Admit)> =
            cfg.services.iter().filter_map(|(n, s)| Some((n.as_str(), s.admit.as_ref()?))).collect();
        for reg in inner.sidecars.values().map(|e| &e.reg).chain(&inner.shared) {
            // Its own service, and every Service whose `admit` takes it in
            // (as `membership::services_of`).
            let admitted = admitting.iter().filter(|(name, admit)| {
                *name != reg.service && weft_config::membership::admits(admit, &reg.spiffe_id, &reg.labels)
            });
            for service in std::iter::once(reg.service.as_str()).chain(admitted.map(|(name, _)| *name)) {
                endpoints.entry(service).or_default().push(Endpoint {
                    address: reg.address.clone(),
                    spiffe_id: reg.spiffe_id.to_string(),
                    labels: reg.labels.clone(),
                });
            }
        }
        let services = endpoints
            .into_iter()
            .map(|(name, mut eps)| {
                eps.sort_by(|a, b| a.address.cmp(&b.address).then_with(|| a.spiffe_id.cmp(&b.spiffe_id)));
                // A sidecar moving between replicas is registered on both for
                // a while (the old lease runs out): one endpoint, the first
                // (local) registration's (the sort is stable). Adjacent after
                // the sort: no set of every registration per version.
                eps.dedup_by(|b, a| a.address == b.address && a.spiffe_id == b.spiffe_id);
                let svc = match prev.services.get(name) {
                    Some(old) if old.endpoints == eps => old.clone(),
                    _ => Arc::new(Service { name: name.to_string(), endpoints: eps }),
                };
                (name.to_string(), svc)
            })
            .collect();
        let next = Published {
            version: prev.version + 1,
            services,
            mesh_config_json: inner.mesh_config_json.clone(),
            mesh: inner.mesh.clone(),
            config_revision: inner.config_revision,
            scopes: inner.scopes.clone(),
            full: OnceLock::new(),
        };
        self.metrics.config_version.set(next.version as i64);
        self.published.send_replace(Arc::new(next));
        inner.acks_generation += 1;
    }

    /// Publishes gathered registration changes at most once per
    /// [`COALESCE`] (per [`storm_coalesce`] while they arrive at more than
    /// [`STORM_RATE`] per [`COALESCE`]), until the registry is dropped.
    pub async fn run_publisher(self: Arc<Self>) {
        let weak: Weak<Self> = Arc::downgrade(&self);
        let changed = self.changed.clone();
        drop(self);
        loop {
            changed.notified().await;
            let started = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(COALESCE).await;
                let Some(this) = weak.upgrade() else { return };
                let (arrived, connected) = {
                    let mut inner = this.lock();
                    (std::mem::take(&mut inner.arrived), inner.sidecars.len() + inner.shared.len())
                };
                if arrived <= STORM_RATE || started.elapsed() + COALESCE > storm_coalesce(connected) {
                    break;
                }
            }
            let Some(this) = weak.upgrade() else { return };
            let mut inner = this.lock();
            if inner.dirty {
                this.publish(&mut inner);
            }
        }
    }

    /// Adds a sidecar; it is published with the next version (within
    /// [`COALESCE`] when the publisher runs): `first_version` on the guard.
    pub fn register(self: &Arc<Self>, reg: Registration) -> RegistrationGuard {
        let mut inner = self.lock();
        let key = inner.next_key;
        inner.next_key += 1;
        tracing::info!(spiffe_id = %reg.spiffe_id, service = %reg.service, address = %reg.address, "sidecar registered");
        if let Some(tx) = &inner.changes {
            let _ = tx.send(LocalChange::Registered(key, Box::new(reg.clone())));
        }
        inner.by_address.entry(reg.address.clone()).or_default().push(key);
        let entry = Entry {
            reg,
            connected: Instant::now(),
            acked: 0,
            nacked: 0,
            nack_reason: String::new(),
            sent: 0,
            same_until: 0,
        };
        inner.sidecars.insert(key, entry);
        inner.acks_generation += 1;
        self.metrics.sidecars_connected.set(inner.sidecars.len() as i64);
        inner.dirty = true;
        inner.arrived += 1;
        let first_version = self.published.borrow().version + 1;
        self.changed.notify_one();
        RegistrationGuard { registry: self.clone(), key, first_version }
    }

    fn deregister(&self, key: u64) {
        let mut inner = self.lock();
        if let Some(e) = inner.sidecars.remove(&key) {
            if let Some(keys) = inner.by_address.get_mut(&e.reg.address) {
                keys.retain(|k| *k != key);
                if keys.is_empty() {
                    inner.by_address.remove(&e.reg.address);
                }
            }
            tracing::info!(spiffe_id = %e.reg.spiffe_id, service = %e.reg.service, "sidecar deregistered");
            inner.acks_generation += 1;
        }
        if let Some(tx) = &inner.changes {
            let _ = tx.send(LocalChange::Deregistered(key));
        }
        self.metrics.sidecars_connected.set(inner.sidecars.len() as i64);
        inner.dirty = true;
        inner.arrived += 1;
        self.changed.notify_one();
    }

    /// Replaces the mesh config pushed to sidecars, published at once. A
    /// valid config clears any earlier rejection, even when it is the one
    /// already serving (the file was fixed back to the last good config).
    pub fn set_mesh_config(&self, json: String) {
        let revision = self.lock().config_revision;
        self.set_stored_config(json, revision);
    }

    /// [`Registry::set_mesh_config`] for a config read from etcd at
    /// `revision` (its `mod_revision`): the revision goes into every
    /// snapshot, so sidecars on any replica can tell they have the same one.
    pub fn set_stored_config(&self, json: String, revision: i64) {
        self.config_known.send_replace(true);
        let mut inner = self.lock();
        inner.config_error.clear();
        if *inner.mesh_config_json != *json || inner.config_revision != revision {
            inner.config_revision = revision;
            // The JSON is always a serialized, validated MeshConfig.
            inner.mesh = serde_json::from_str(&json).ok().map(Arc::new);
            inner.mesh_config_json = json.into();
            inner.scopes = Arc::default();
            self.publish(&mut inner);
        }
    }

    /// Records a rejected config change (the previous one keeps serving).
    pub fn set_config_error(&self, error: String) {
        self.lock().config_error = error;
    }

    /// From now on, every registration and deregistration is also sent to
    /// `tx`; the registrations held so far are sent first.
    pub fn publish_local_changes(&self, tx: mpsc::UnboundedSender<LocalChange>) {
        let mut inner = self.lock();
        for (key, e) in &inner.sidecars {
            let _ = tx.send(LocalChange::Registered(*key, Box::new(e.reg.clone())));
        }
        inner.changes = Some(tx);
    }

    /// Replaces the registrations held by other replicas; a new version
    /// only when what sidecars are told changed (a renewed SVID's expiry,
    /// shown only by `weft status`, is no new version).
    pub fn set_shared(&self, shared: Vec<Registration>) {
        let mut inner = self.lock();
        let same_but_expiry = |a: &Registration, b: &Registration| {
            Registration { svid_expires: None, ..a.clone() } == Registration { svid_expires: None, ..b.clone() }
        };
        let endpoints_same =
            inner.shared.len() == shared.len() && inner.shared.iter().zip(&shared).all(|(a, b)| same_but_expiry(a, b));
        inner.shared = shared;
        if !endpoints_same {
            inner.dirty = true;
            inner.arrived += 1;
            self.changed.notify_one();
        }
    }

    /// Records that the sidecar with SPIFFE ID `id` registered at inbound
    /// `address` now holds an SVID expiring at `expires` (it renewed; its
    /// config stream still runs on the connection made with the old one).
    /// Only that registration changes: replicas of a service share one
    /// SPIFFE ID but renew at different times. A changed registration is
    /// written again for the other replicas (see
    /// [`Registry::publish_local_changes`]); no new version is published.
    /// Returns whether a registration of this replica changed.
    pub fn svid_renewed(&self, id: &SpiffeId, address: &str, expires: SystemTime) -> bool {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let mut changed = false;
        for key in inner.by_address.get(address).into_iter().flatten() {
            let Some(e) = inner.sidecars.get_mut(key).filter(|e| &e.reg.spiffe_id == id) else { continue };
            if e.reg.svid_expires == Some(expires) {
                continue;
            }
            e.reg.svid_expires = Some(expires);
            changed = true;
            if let Some(tx) = &inner.changes {
                let _ = tx.send(LocalChange::Registered(*key, Box::new(e.reg.clone())));
            }
        }
        changed
    }

    /// Every published version, as it is published (a slow reader skips to
    /// the newest).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.published.subscribe()
    }

    /// The current version, with any gathered registration changes
    /// published first.
    pub fn current(&self) -> Arc<Published> {
        let mut inner = self.lock();
        if inner.dirty {
            self.publish(&mut inner);
        }
        drop(inner);
        self.published.borrow().clone()
    }

    /// The whole mesh at the current version (see [`Registry::current`]).
    pub fn snapshot(&self) -> Snapshot {
        self.current().full().clone()
    }

    /// Records a sidecar's ACK (`error` empty) or NACK of a version.
    pub fn ack(&self, id: &SpiffeId, address: &str, version: u64, error: String) {
        let mut inner = self.lock();
        let keys = inner.by_address.get(address).cloned().unwrap_or_default();
        inner.acks_generation += 1;
        for key in keys {
            let Some(e) = inner.sidecars.get_mut(&key).filter(|e| &e.reg.spiffe_id == id) else { continue };
            if error.is_empty() {
                // Versions since then that changed nothing for it count too.
                let upto = if version == e.sent { e.same_until.max(version) } else { version };
                e.acked = e.acked.max(upto);
            } else {
                tracing::warn!(spiffe_id = %id, version, reason = %error, "sidecar rejected config");
                e.nacked = version;
                e.nack_reason = error.clone();
            }
        }
    }

    /// The generation of [`Registry::local_acks`]: unchanged, nothing to rewrite.
    pub fn acks_generation(&self) -> u64 {
        self.lock().acks_generation
    }

    /// This replica's sidecars' ACK state, with the version it counts in
    /// (read together, so they agree), for the other replicas' `weft status`.
    pub fn local_acks(&self) -> LocalAcks {
        let inner = self.lock();
        let published = self.published.borrow();
        LocalAcks {
            generation: inner.acks_generation,
            version: published.version,
            config_revision: published.config_revision,
            sidecars: inner
                .sidecars
                .values()
                .map(|e| (e.reg.address.clone(), e.acked, e.nacked, e.nack_reason.clone()))
                .collect(),
        }
    }

    pub fn status(&self, td: &TrustDomain) -> StatusResponse {
        let inner = self.lock();
        let published = self.published.borrow().clone();
        StatusResponse {
            trust_domain: td.to_string(),
            config_version: published.version,
            config_error: inner.config_error.clone(),
            mesh_config_json: inner.mesh_config_json.to_string(),
            sidecars: inner
                .sidecars
                .values()
                .map(|e| SidecarStatus {
                    spiffe_id: e.reg.spiffe_id.to_string(),
                    service: e.reg.service.clone(),
                    inbound_address: e.reg.address.clone(),
                    labels: e.reg.labels.clone(),
                    svid_expires_at: e.reg.svid_expires.map(weft_certs::svid::unix_secs).unwrap_or(0),
                    acked_version: e.acked,
                    nacked_version: e.nacked,
                    nack_reason: e.nack_reason.clone(),
                    connected_seconds: e.connected.elapsed().as_secs(),
                    admin_address: e.reg.admin_address.clone(),
                    unknown_calls: published.unknown_calls(&e.reg.calls),
                    calls: e.reg.calls.clone(),
                    replica_config_version: published.version,
                    replica_config_revision: published.config_revision,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(id: &str, service: &str, addr: &str) -> Registration {
        Registration {
            spiffe_id: SpiffeId::parse(id).unwrap(),
            service: service.into(),
            address: addr.into(),
            admin_address: String::new(),
            labels: HashMap::new(),
            svid_expires: None,
            calls: Vec::new(),
        }
    }

    #[test]
    fn storm_gathering_grows_with_the_connected_sidecars_within_bounds() {
        assert_eq!(storm_coalesce(0), STORM_COALESCE);
        assert_eq!(storm_coalesce(2_000), Duration::from_secs(1));
        assert_eq!(storm_coalesce(6_000), Duration::from_secs(3));
        assert_eq!(storm_coalesce(10_000), STORM_COALESCE_MAX);
        assert_eq!(storm_coalesce(usize::MAX), STORM_COALESCE_MAX);
    }

    #[test]
    fn registrations_live_with_their_guard() {
        let r = Registry::new(Arc::new(Metrics::default()));
        let v0 = r.snapshot().version;
        let g1 = r.register(reg("spiffe://td/ns/a/sa/web", "web", "127.0.0.1:1"));
        let g2 = r.register(reg("spiffe://td/ns/a/sa/db", "db", "127.0.0.1:2"));
        let s = r.snapshot();
        assert!(s.version > v0);
        assert_eq!(s.services.len(), 2);
        drop(g1);
        let s2 = r.snapshot();
        assert!(s2.version > s.version);
        assert_eq!(s2.services.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), vec!["db"]);
        r.ack(&SpiffeId::parse("spiffe://td/ns/a/sa/db").unwrap(), "127.0.0.1:2", s2.version, String::new());
        let st = r.status(&TrustDomain::new("td").unwrap());
        assert_eq!(st.sidecars[0].acked_version, s2.version);
        drop(g2);
        assert!(r.snapshot().services.is_empty());
    }

    #[test]
    fn admitted_workloads_are_endpoints_of_the_admitting_services() {
        let r = Registry::new(Arc::new(Metrics::default()));
        let cfg = weft_config::parse(
            "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: foo}\nspec: {}\n---\n\
             apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: foo-v1}\n\
             spec: {admit: {serviceAccounts: [foo], labels: {version: v1}}}\n",
        )
        .unwrap();
        r.set_mesh_config(serde_json::to_string(&cfg).unwrap());
        let mut v1 = reg("spiffe://td/ns/a/sa/foo", "foo", "127.0.0.1:1");
        v1.labels.insert("version".into(), "v1".into());
        let _g1 = r.register(v1);
        // Same labels, another service account: not admitted.
        let mut bar = reg("spiffe://td/ns/a/sa/bar", "bar", "127.0.0.1:2");
        bar.labels.insert("version".into(), "v1".into());
        let _g2 = r.register(bar);
        let s = r.snapshot();
        let eps = |name: &str| -> Vec<String> {
            s.services
                .iter()
                .filter(|x| x.name == name)
                .flat_map(|x| x.endpoints.iter().map(|e| e.address.clone()))
                .collect()
        };
        assert_eq!(eps("foo"), ["127.0.0.1:1"]);
        assert_eq!(eps("foo-v1"), ["127.0.0.1:1"]);
        assert_eq!(eps("bar"), ["127.0.0.1:2"]);
    }

    #[test]
    fn shared_registrations_are_endpoints_once_and_local_changes_are_published() {
        let r = Registry::new(Arc::new(Metrics::default()));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let g = r.register(reg("spiffe://td/ns/a/sa/web", "web", "127.0.0.1:1"));
        r.publish_local_changes(tx);
        assert!(matches!(rx.try_recv(), Ok(LocalChange::Registered(_, x)) if x.address == "127.0.0.1:1"));
        let v = r.snapshot().version;
        // The same sidecar still registered on a replica it left, and one of another replica.
        r.set_shared(vec![
            reg("spiffe://td/ns/a/sa/web", "web", "127.0.0.1:1"),
            reg("spiffe://td/ns/a/sa/web", "web", "127.0.0.1:3"),
        ]);
        let s = r.snapshot();
        assert!(s.version > v);
        let addrs: Vec<_> = s.services[0].endpoints.iter().map(|e| e.address.as_str()).collect();
        assert_eq!(addrs, ["127.0.0.1:1", "127.0.0.1:3"]);
        r.set_shared(vec![
            reg("spiffe://td/ns/a/sa/web", "web", "127.0.0.1:1"),
            reg("spiffe://td/ns/a/sa/web", "web", "127.0.0.1:3"),
        ]);
        assert_eq!(r.snapshot().version, s.version, "unchanged: no new version");
        drop(g);
        assert!(matches!(rx.try_recv(), Ok(LocalChange::Deregistered(_))));
    }

    #[test]
    fn calls_the_mesh_does_not_define_are_unknown_until_registered_or_configured() {
        let r = Registry::new(Arc::new(Metrics::default()));
        let td = TrustDomain::new("td").unwrap();
        let cfg = weft_config::parse("apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: api}\nspec: {}\n")
            .unwrap();
        r.set_mesh_config(serde_json::to_string(&cfg).unwrap());
        let mut web = reg("spiffe://td/ns/a/sa/web", "web", "127.0.0.1:1");
        web.calls = vec!["api".into(), "apii".into(), "db".into()];
        let _web = r.register(web);
        assert_eq!(r.current().unknown_calls(&["api".into(), "apii".into(), "db".into()]), ["apii", "db"]);
        assert_eq!(r.status(&td).sidecars[0].unknown_calls, ["apii", "db"]);
        let _db = r.register(reg("spiffe://td/ns/a/sa/db", "db", "127.0.0.1:2"));
        r.snapshot(); // published (the publisher task would, within COALESCE)
        let st = r.status(&td);
        let web = st.sidecars.iter().find(|s| s.service == "web").unwrap();
        assert_eq!(web.unknown_calls, ["apii"], "a registered service is known");
        assert_eq!(web.calls, ["api", "apii", "db"]);
    }

    #[test]
    fn local_acks_change_generation_with_every_ack_and_version() {
        let r = Registry::new(Arc::new(Metrics::default()));
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/web").unwrap();
        let _g = r.register(reg("spiffe://td/ns/a/sa/web", "web", "127.0.0.1:1"));
        let v = r.snapshot().version;
        let before = r.acks_generation();
        r.ack(&id, "127.0.0.1:1", v, String::new());
        assert!(r.acks_generation() > before);
        let acks = r.local_acks();
        assert_eq!((acks.version, acks.generation), (v, r.acks_generation()));
        assert_eq!(acks.sidecars, [("127.0.0.1:1".to_string(), v, 0, String::new())]);
        r.ack(&id, "127.0.0.1:1", v, "bad".into());
        assert_eq!(r.local_acks().sidecars[0], ("127.0.0.1:1".to_string(), v, v, "bad".to_string()));
        let g = r.acks_generation();
        r.set_mesh_config("{\"a\":2}".into());
        assert!(r.acks_generation() > g, "a new version changes what the acks are compared with");
    }

    #[test]
    fn a_renewed_svid_updates_only_the_registration_at_that_address() {
        let r = Registry::new(Arc::new(Metrics::default()));
        let td = TrustDomain::new("td").unwrap();
        let api = SpiffeId::parse("spiffe://td/ns/a/sa/api").unwrap();
        let at = |secs: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        let first = |addr: &str, id: &str| Registration { svid_expires: Some(at(1_000)), ..reg(id, "api", addr) };
        // Two replicas of api (one SPIFFE ID), and another ID at the first address.
        let _a = r.register(first("127.0.0.1:1", "spiffe://td/ns/a/sa/api"));
        let _b = r.register(first("127.0.0.1:2", "spiffe://td/ns/a/sa/api"));
        let _other = r.register(first("127.0.0.1:1", "spiffe://td/ns/a/sa/web"));
        let (tx, mut rx) = mpsc::unbounded_channel();
        r.publish_local_changes(tx);
        while rx.try_recv().is_ok() {}
        let v = r.snapshot().version;
        assert!(r.svid_renewed(&api, "127.0.0.1:1", at(2_000)));
        let expiry = |addr: &str, id: &str| {
            let st = r.status(&td);
            st.sidecars.iter().find(|s| s.inbound_address == addr && s.spiffe_id == id).unwrap().svid_expires_at
        };
        assert_eq!(expiry("127.0.0.1:1", "spiffe://td/ns/a/sa/api"), 2_000, "the renewed sidecar");
        assert_eq!(expiry("127.0.0.1:2", "spiffe://td/ns/a/sa/api"), 1_000, "another replica of api");
        assert_eq!(expiry("127.0.0.1:1", "spiffe://td/ns/a/sa/web"), 1_000, "another ID at that address");
        // Written again for the other replicas, under its own key.
        match rx.try_recv() {
            Ok(LocalChange::Registered(_, x)) => {
                assert_eq!(
                    (x.address.as_str(), x.spiffe_id.clone(), x.svid_expires),
                    ("127.0.0.1:1", api.clone(), Some(at(2_000)))
                )
            }
            other => panic!("expected the renewed registration, got {other:?}"),
        }
        assert!(rx.try_recv().is_err(), "only that registration");
        assert!(!r.svid_renewed(&api, "127.0.0.1:1", at(2_000)), "the same expiry again changes nothing");
        assert!(!r.svid_renewed(&api, "127.0.0.1:9", at(3_000)), "no sidecar at that address");
        assert_eq!(r.snapshot().version, v, "no new version: sidecars are told nothing new");
        // Another replica's renewal, seen in etcd, is no new version either.
        r.set_shared(vec![first("127.0.0.1:3", "spiffe://td/ns/a/sa/api")]);
        let v = r.snapshot().version;
        r.set_shared(vec![Registration {
            svid_expires: Some(at(2_000)),
            ..first("127.0.0.1:3", "spiffe://td/ns/a/sa/api")
        }]);
        assert_eq!(r.snapshot().version, v);
        assert_eq!(r.lock().shared[0].svid_expires, Some(at(2_000)), "but kept");
    }

    #[test]
    fn a_good_config_clears_the_rejection_even_when_unchanged() {
        let r = Registry::new(Arc::new(Metrics::default()));
        let td = TrustDomain::new("td").unwrap();
        r.set_mesh_config("{\"a\":1}".into());
        let v = r.snapshot().version;
        r.set_config_error("bad".into());
        assert_eq!(r.status(&td).config_error, "bad");
        r.set_mesh_config("{\"a\":1}".into());
        assert_eq!(r.status(&td).config_error, "", "the file is good again");
        assert_eq!(r.snapshot().version, v, "nothing new to push");
    }
}
