//! The registry of connected sidecars: who they are, where their inbound
//! listener is, and which config version they applied. A registration lives
//! exactly as long as the sidecar's config watch stream.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use tokio::sync::watch;
use weft_certs::{SpiffeId, TrustDomain};
use weft_proto::admin::v1::{SidecarStatus, StatusResponse};
use weft_proto::config::v1::{Endpoint, Service, Snapshot};

use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct Registration {
    pub spiffe_id: SpiffeId,
    pub service: String,
    pub address: String,
    pub admin_address: String,
    pub labels: HashMap<String, String>,
    pub svid_expires: Option<SystemTime>,
}

#[derive(Debug)]
struct Entry {
    reg: Registration,
    connected: Instant,
    acked: u64,
    nacked: u64,
    nack_reason: String,
}

#[derive(Default)]
struct Inner {
    next_key: u64,
    sidecars: BTreeMap<u64, Entry>,
    mesh_config_json: String,
    /// `mesh_config_json` decoded, for the Services' `admit` rules (none
    /// before a config is set).
    mesh: Option<weft_config::MeshConfig>,
    config_error: String,
}

pub struct Registry {
    inner: Mutex<Inner>,
    version: watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

/// Deregisters its sidecar when dropped (the watch stream ended).
pub struct RegistrationGuard {
    registry: Arc<Registry>,
    key: u64,
}

impl Drop for RegistrationGuard {
    fn drop(&mut self) {
        self.registry.deregister(self.key);
    }
}

impl Registry {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        let (version, _) = watch::channel(1);
        metrics.config_version.set(1);
        Arc::new(Self { inner: Mutex::new(Inner::default()), version, metrics })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bumps the version while the caller still holds the lock, so a
    /// snapshot never pairs new contents with an old version.
    fn bump(&self, _held: &mut Inner) {
        self.version.send_modify(|v| *v += 1);
        self.metrics.config_version.set(*self.version.borrow() as i64);
    }

    pub fn register(self: &Arc<Self>, reg: Registration) -> RegistrationGuard {
        let mut inner = self.lock();
        let key = inner.next_key;
        inner.next_key += 1;
        tracing::info!(spiffe_id = %reg.spiffe_id, service = %reg.service, address = %reg.address, "sidecar registered");
        inner
            .sidecars
            .insert(key, Entry { reg, connected: Instant::now(), acked: 0, nacked: 0, nack_reason: String::new() });
        self.metrics.sidecars_connected.set(inner.sidecars.len() as i64);
        self.bump(&mut inner);
        RegistrationGuard { registry: self.clone(), key }
    }

    fn deregister(&self, key: u64) {
        let mut inner = self.lock();
        if let Some(e) = inner.sidecars.remove(&key) {
            tracing::info!(spiffe_id = %e.reg.spiffe_id, service = %e.reg.service, "sidecar deregistered");
        }
        self.metrics.sidecars_connected.set(inner.sidecars.len() as i64);
        self.bump(&mut inner);
    }

    /// Replaces the mesh config pushed to sidecars. A valid config clears
    /// any earlier rejection, even when it is the one already serving (the
    /// file was fixed back to the last good config).
    pub fn set_mesh_config(&self, json: String) {
        let mut inner = self.lock();
        inner.config_error.clear();
        if inner.mesh_config_json != json {
            // The JSON is always a serialized, validated MeshConfig.
            inner.mesh = serde_json::from_str(&json).ok();
            inner.mesh_config_json = json;
            self.bump(&mut inner);
        }
    }

    /// Records a rejected config change (the previous one keeps serving).
    pub fn set_config_error(&self, error: String) {
        self.lock().config_error = error;
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    pub fn snapshot(&self) -> Snapshot {
        let inner = self.lock();
        let mut services: BTreeMap<&str, Vec<Endpoint>> = BTreeMap::new();
        let no_config = weft_config::MeshConfig::default();
        let cfg = inner.mesh.as_ref().unwrap_or(&no_config);
        for e in inner.sidecars.values() {
            // Its own service, and every Service whose `admit` takes it in.
            for service in weft_config::membership::services_of(cfg, &e.reg.spiffe_id, &e.reg.service, &e.reg.labels) {
                services.entry(service).or_default().push(Endpoint {
                    address: e.reg.address.clone(),
                    spiffe_id: e.reg.spiffe_id.to_string(),
                    labels: e.reg.labels.clone(),
                });
            }
        }
        Snapshot {
            version: *self.version.borrow(),
            services: services
                .into_iter()
                .map(|(name, endpoints)| Service { name: name.to_string(), endpoints })
                .collect(),
            mesh_config_json: inner.mesh_config_json.clone(),
        }
    }

    /// Records a sidecar's ACK (`error` empty) or NACK of a version.
    pub fn ack(&self, id: &SpiffeId, address: &str, version: u64, error: String) {
        let mut inner = self.lock();
        for e in inner.sidecars.values_mut().filter(|e| &e.reg.spiffe_id == id && e.reg.address == address) {
            if error.is_empty() {
                e.acked = e.acked.max(version);
            } else {
                tracing::warn!(spiffe_id = %id, version, reason = %error, "sidecar rejected config");
                e.nacked = version;
                e.nack_reason = error.clone();
            }
        }
    }

    pub fn status(&self, td: &TrustDomain) -> StatusResponse {
        let inner = self.lock();
        StatusResponse {
            trust_domain: td.to_string(),
            config_version: *self.version.borrow(),
            config_error: inner.config_error.clone(),
            mesh_config_json: inner.mesh_config_json.clone(),
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
                })
                .collect(),
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
        }
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
