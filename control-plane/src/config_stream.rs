//! `weft.config.v1.Config`: the per-sidecar config stream (`Watch`:
//! registration, then a versioned snapshot on every change) and `Ack`
//! (ACK, or NACK with the sidecar's error).
//!
//! Every stream reads the same [`Published`] version (built once, shared).
//! A sidecar that declares the services it calls gets only those
//! ([`Published::scope`]), and no push at all for a version that changed
//! nothing in its scope; one that accepts incremental snapshots gets only
//! the services that changed since its previous message.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};
use weft_proto::config::v1::config_server::Config;
use weft_proto::config::v1::{AckRequest, AckResponse, Snapshot, WatchRequest};

use crate::registry::{Published, Registration, Registry, Scope, Scopes};
use crate::server::require_peer;

/// The `weft.config.v1.Config` gRPC service.
pub struct ConfigService {
    pub registry: Arc<Registry>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

#[tonic::async_trait]
impl Config for ConfigService {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<Snapshot, Status>> + Send>>;

    async fn watch(&self, req: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let r: Result<Response<Self::WatchStream>, Status> = async {
            let (id, svid_expires) = require_peer(&req)?;
            let req = req.into_inner();
            weft_config::registration::check_registration(&id, &req.service).map_err(|e| match e {
                weft_config::registration::RegistrationError::BadName(_) => Status::invalid_argument(e.to_string()),
                _ => Status::permission_denied(e.to_string()),
            })?;
            if req.inbound_address.parse::<SocketAddr>().is_err() {
                return Err(Status::invalid_argument(format!(
                    "inbound_address {:?} is not host:port (an IP address and port)",
                    req.inbound_address
                )));
            }
            let (own, calls, incremental) = (req.service.clone(), req.calls, req.accepts_incremental);
            let guard = self.registry.register(Registration {
                calls: calls.clone(),
                spiffe_id: id,
                service: req.service,
                address: req.inbound_address,
                admin_address: req.admin_address,
                labels: req.labels,
                svid_expires,
            });
            let mut changes = self.registry.subscribe();
            let mut config_known = self.registry.config_known();
            let stream = async_stream::stream! {
                // Held for the life of the stream: dropping it deregisters.
                let guard = guard;
                // Nothing before the mesh config is known: a sidecar keeps
                // its last config rather than get an empty one.
                if config_known.wait_for(|known| *known).await.is_err() {
                    return;
                }
                // The first message already lists this sidecar (at most one
                // coalescing period away).
                if changes.wait_for(|p| p.version >= guard.first_version).await.is_err() {
                    return;
                }
                let mut view = StreamView::new(own, calls, incremental);
                loop {
                    let published = changes.borrow_and_update().clone();
                    match view.next(&published) {
                        Some(snapshot) => {
                            guard.sent(published.version);
                            yield Ok(snapshot);
                        }
                        None => guard.unchanged(published.version),
                    }
                    if changes.changed().await.is_err() {
                        break;
                    }
                }
            };
            Ok(Response::new(Box::pin(stream) as Self::WatchStream))
        }
        .await;
        self.metrics.rpc("Watch", r.as_ref().map(|_| tonic::Code::Ok).unwrap_or_else(|s| s.code()));
        r
    }

    async fn ack(&self, req: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        let r: Result<Response<AckResponse>, Status> = async {
            let (id, _) = require_peer(&req)?;
            let req = req.into_inner();
            if req.svid_expires_at > 0 {
                // The SVID it holds now, which may be newer than its stream's connection's.
                let expires = std::time::UNIX_EPOCH + std::time::Duration::from_secs(req.svid_expires_at as u64);
                self.registry.svid_renewed(&id, &req.inbound_address, expires);
            }
            // Version 0 acknowledges nothing (an SVID report after a renewal).
            if req.version > 0 || !req.error.is_empty() {
                self.registry.ack(&id, &req.inbound_address, req.version, req.error);
            }
            Ok(Response::new(AckResponse {}))
        }
        .await;
        self.metrics.rpc("Ack", r.as_ref().map(|_| tonic::Code::Ok).unwrap_or_else(|s| s.code()));
        r
    }
}

/// Services by name, as shared by [`Published`].
type Services = BTreeMap<String, Arc<weft_proto::config::v1::Service>>;

/// What one stream has told its sidecar, to send the next version as the
/// sidecar needs it: whole or scoped, full or incremental, or not at all.
pub struct StreamView {
    own: String,
    calls: Vec<String>,
    incremental: bool,
    /// This sidecar's scope under the current mesh config.
    scope: Option<(Arc<Scopes>, Arc<Scope>)>,
    /// The services last sent (their shared `Arc`s) and the mesh config;
    /// `None` before the first message.
    sent: Option<(Services, Arc<str>)>,
    /// The unknown names of `calls` last sent ([`Published::unknown_calls`]).
    unknown: Vec<String>,
}

impl StreamView {
    /// A stream for a sidecar of service `own` that calls `calls` (empty:
    /// the whole mesh) and takes incremental snapshots if `incremental`.
    pub fn new(own: String, calls: Vec<String>, incremental: bool) -> Self {
        Self { own, calls, incremental, scope: None, sent: None, unknown: Vec::new() }
    }

    /// The message for `p`, or `None` when nothing this sidecar sees
    /// changed. A sidecar without a scope that takes only full snapshots
    /// gets the shared whole-mesh snapshot of every version, as before.
    pub fn next(&mut self, p: &Published) -> Option<Snapshot> {
        let scope = p.scoped_in(&self.own, &self.calls, &mut self.scope);
        // A scope is looked up service by service: its size, not the mesh's.
        let (now, mesh): (Services, Arc<str>) = match &scope {
            Some(s) => (
                s.services.iter().filter_map(|n| p.services.get(n).map(|v| (n.clone(), v.clone()))).collect(),
                s.mesh_config_json.clone(),
            ),
            None => (p.services.iter().map(|(n, s)| (n.clone(), s.clone())).collect(), p.mesh_config_json.clone()),
        };
        let prev = self.sent.replace((now, mesh));
        let unknown = p.unknown_calls(&self.calls);
        let unknown_changed = unknown != self.unknown;
        self.unknown = unknown;
        let (now, mesh) = self.sent.as_ref().expect("just set");
        let Some((before, mesh_before)) = prev else {
            return Some(self.whole(p, now, mesh));
        };
        // A scoped sidecar compares its own cut of the mesh config: a change
        // elsewhere in the mesh is no push for it.
        let mesh_unchanged = Arc::ptr_eq(&mesh_before, mesh) || mesh_before == *mesh;
        let changed: Vec<&Arc<weft_proto::config::v1::Service>> =
            now.iter().filter(|(n, s)| before.get(*n).is_none_or(|b| !Arc::ptr_eq(b, s))).map(|(_, s)| s).collect();
        let removed: Vec<String> = before.keys().filter(|n| !now.contains_key(*n)).cloned().collect();
        if mesh_unchanged && changed.is_empty() && removed.is_empty() && !unknown_changed {
            return None;
        }
        if !self.incremental {
            return Some(self.whole(p, now, mesh));
        }
        Some(Snapshot {
            version: p.version,
            services: changed.into_iter().map(|s| (**s).clone()).collect(),
            mesh_config_json: if mesh_unchanged { String::new() } else { mesh.to_string() },
            incremental: true,
            removed_services: removed,
            mesh_config_unchanged: mesh_unchanged,
            config_revision: p.config_revision,
            unknown_calls: self.unknown.clone(),
        })
    }

    /// A full snapshot of `services` and `mesh` (the whole mesh's shared
    /// snapshot when unscoped).
    fn whole(&self, p: &Published, services: &Services, mesh: &str) -> Snapshot {
        if self.calls.is_empty() {
            return p.full().clone();
        }
        Snapshot {
            version: p.version,
            services: services.values().map(|s| (**s).clone()).collect(),
            mesh_config_json: mesh.to_string(),
            config_revision: p.config_revision,
            unknown_calls: self.unknown.clone(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use weft_certs::SpiffeId;

    use super::*;
    use crate::metrics::Metrics;

    fn reg(sa: &str, addr: &str) -> Registration {
        Registration {
            spiffe_id: SpiffeId::parse(&format!("spiffe://td/ns/a/sa/{sa}")).unwrap(),
            service: sa.into(),
            address: addr.into(),
            admin_address: String::new(),
            labels: HashMap::new(),
            svid_expires: None,
            calls: Vec::new(),
        }
    }

    fn names(s: &Snapshot) -> Vec<&str> {
        s.services.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn a_scoped_sidecar_gets_its_services_and_no_push_for_others() {
        let r = Registry::new(Arc::new(Metrics::default()));
        let _web = r.register(reg("web", "127.0.0.1:1"));
        let _api = r.register(reg("api", "127.0.0.1:2"));
        let _db = r.register(reg("db", "127.0.0.1:3"));
        let mut view = StreamView::new("web".into(), vec!["api".into()], false);
        let first = view.next(&r.current()).expect("first message");
        assert_eq!(names(&first), ["api", "web"], "called and own service only");
        // Another db endpoint: nothing web sees changed.
        let _db2 = r.register(reg("db", "127.0.0.1:4"));
        assert!(view.next(&r.current()).is_none(), "no push when the scope did not change");
        // Another api endpoint: a full scoped snapshot.
        let _api2 = r.register(reg("api", "127.0.0.1:5"));
        let s = view.next(&r.current()).expect("api changed");
        assert!(!s.incremental);
        assert_eq!(names(&s), ["api", "web"]);
        assert_eq!(s.services[0].endpoints.len(), 2);
        // Without a scope, every version is the whole mesh, as before.
        let mut whole = StreamView::new("web".into(), vec![], false);
        assert_eq!(names(&whole.next(&r.current()).unwrap()), ["api", "db", "web"]);
    }

    #[test]
    fn incremental_snapshots_carry_only_what_changed() {
        let r = Registry::new(Arc::new(Metrics::default()));
        let _web = r.register(reg("web", "127.0.0.1:1"));
        let api = r.register(reg("api", "127.0.0.1:2"));
        let _db = r.register(reg("db", "127.0.0.1:3"));
        let mut view = StreamView::new("web".into(), vec![], true);
        let first = view.next(&r.current()).unwrap();
        assert!(!first.incremental, "a stream starts with a full snapshot");
        assert_eq!(names(&first), ["api", "db", "web"]);
        let _db2 = r.register(reg("db", "127.0.0.1:4"));
        let d = view.next(&r.current()).unwrap();
        assert!(d.incremental && d.mesh_config_unchanged && d.mesh_config_json.is_empty());
        assert_eq!(names(&d), ["db"], "only the changed service");
        assert_eq!(d.services[0].endpoints.len(), 2, "changed services are sent whole");
        drop(api);
        let d = view.next(&r.current()).unwrap();
        assert_eq!(d.removed_services, ["api"]);
        assert!(d.services.is_empty());
        r.set_mesh_config("{\"mesh\":{}}".into());
        let d = view.next(&r.current()).unwrap();
        assert!(!d.mesh_config_unchanged && d.services.is_empty());
        assert_eq!(d.mesh_config_json, "{\"mesh\":{}}");
        assert!(view.next(&r.current()).is_none(), "nothing new");
    }

    #[test]
    fn scope_follows_routes_to_their_backends() {
        let r = Registry::new(Arc::new(Metrics::default()));
        let cfg = weft_config::parse(
            "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: foo}\nspec: {}\n---\n\
             apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: foo-v2}\nspec: {}\n---\n\
             apiVersion: weft.dev/v1alpha1\nkind: HTTPRoute\nmetadata: {name: split}\n\
             spec: {parentRefs: [{name: foo}], rules: [{backendRefs: [{name: foo, weight: 9}, {name: foo-v2, weight: 1}]}]}\n",
        )
        .unwrap();
        r.set_mesh_config(crate::config_file::to_json(&cfg));
        let scope = r.current().scope("web", &["foo".into()]).unwrap();
        assert_eq!(scope.into_iter().collect::<Vec<_>>(), ["foo", "foo-v2", "web"]);
        assert!(r.current().scope("web", &[]).is_none(), "no calls: the whole mesh");
    }

    #[test]
    fn a_scoped_sidecar_gets_its_cut_of_the_mesh_config() {
        let r = Registry::new(Arc::new(Metrics::default()));
        let yaml = |weight: u32, slashes: &str, db_rps: u32| {
            let doc = |kind: &str, name: &str, spec: &str| {
                format!("apiVersion: weft.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}}}\nspec: {spec}\n---\n")
            };
            let mut y = String::new();
            for s in ["web", "api", "api-v2", "db", "other"] {
                y += &doc("Service", s, "{}");
            }
            y += &doc("Mesh", "mesh", &format!("{{pathNormalization: {{encodedSlashes: {slashes}}}}}"));
            y += &doc(
                "HTTPRoute",
                "api-split",
                &format!("{{parentRefs: [{{name: api}}], rules: [{{backendRefs: [{{name: api, weight: {weight}}}, {{name: api-v2, weight: 1}}]}}]}}"),
            );
            y += &doc("HTTPRoute", "db-route", "{parentRefs: [{name: db}], rules: [{backendRefs: [{name: db}]}]}");
            y += &doc("HTTPRoute", "web-route", "{parentRefs: [{name: web}], rules: [{backendRefs: [{name: web}]}]}");
            y += &doc(
                "AuthorizationPolicy",
                "web-allow",
                "{targetRef: {kind: Service, name: web}, action: ALLOW, rules: [{from: [{identities: ['*']}]}]}",
            );
            y += &doc(
                "AuthorizationPolicy",
                "db-allow",
                "{targetRef: {kind: Service, name: db}, action: ALLOW, rules: [{from: [{identities: ['*']}]}]}",
            );
            y += &doc(
                "RateLimit",
                "web-route-rl",
                "{targetRef: {kind: HTTPRoute, name: web-route}, requestsPerSecond: 5}",
            );
            y += &doc(
                "RateLimit",
                "db-rl",
                &format!("{{targetRef: {{kind: Service, name: db}}, requestsPerSecond: {db_rps}}}"),
            );
            crate::config_file::to_json(&weft_config::parse(&y).unwrap())
        };
        r.set_mesh_config(yaml(9, "reject", 5));
        let _web = r.register(reg("web", "127.0.0.1:1"));
        let mut view = StreamView::new("web".into(), vec!["api".into()], true);
        let first = view.next(&r.current()).unwrap();
        let cfg: weft_config::MeshConfig = serde_json::from_str(&first.mesh_config_json).unwrap();
        assert_eq!(cfg.services.keys().collect::<Vec<_>>(), ["api", "api-v2", "web"], "its scope's Services");
        let routes: Vec<_> = cfg.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(routes, ["api-split", "web-route"], "routes of called services, and its own for rate limits");
        assert_eq!(cfg.policies.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["web-allow"]);
        assert_eq!(cfg.rate_limits.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["web-route-rl"]);
        // A route change elsewhere in the mesh: nothing for web.
        let mut whole = StreamView::new("web".into(), vec![], true);
        whole.next(&r.current()).unwrap();
        r.set_mesh_config(yaml(9, "reject", 6));
        assert!(view.next(&r.current()).is_none(), "a change outside its scope is not pushed");
        assert!(whole.next(&r.current()).is_some(), "an unscoped sidecar gets every change");
        // Its route changes: pushed, with the new weight.
        r.set_mesh_config(yaml(8, "reject", 6));
        let d = view.next(&r.current()).unwrap();
        assert!(d.incremental && !d.mesh_config_unchanged && d.services.is_empty());
        assert!(d.mesh_config_json.contains("\"weight\":8"), "{}", d.mesh_config_json);
        // A Mesh-wide setting reaches every scope.
        r.set_mesh_config(yaml(8, "opaque", 6));
        let d = view.next(&r.current()).unwrap();
        assert!(d.mesh_config_json.contains("opaque"), "{}", d.mesh_config_json);
        // Sidecars of one service with the same calls share one cut.
        let p = r.current();
        assert!(Arc::ptr_eq(&p.scoped("web", &["api".into()]).unwrap(), &p.scoped("web", &["api".into()]).unwrap()));
    }

    #[tokio::test]
    async fn registrations_arriving_together_make_one_version() {
        let r = Registry::new(Arc::new(Metrics::default()));
        tokio::spawn(r.clone().run_publisher());
        let mut changes = r.subscribe();
        let v0 = changes.borrow_and_update().version;
        let guards: Vec<_> = (0..100).map(|i| r.register(reg("api", &format!("127.0.0.1:{}", 1000 + i)))).collect();
        let first = guards[0].first_version;
        assert!(guards.iter().all(|g| g.first_version == first), "all wait for the same version");
        let p = tokio::time::timeout(std::time::Duration::from_secs(10), changes.wait_for(|p| p.version >= first))
            .await
            .expect("published within the coalescing period")
            .unwrap()
            .clone();
        assert_eq!(p.version, v0 + 1, "one version for 100 registrations");
        assert_eq!(p.services["api"].endpoints.len(), 100);
    }

    #[tokio::test]
    async fn a_join_storm_is_gathered_into_few_versions() {
        let r = Registry::new(Arc::new(Metrics::default()));
        tokio::spawn(r.clone().run_publisher());
        let mut changes = r.subscribe();
        let v0 = changes.borrow_and_update().version;
        // 20 registrations every 5 ms for 1.5 s: about 200 per COALESCE,
        // far above STORM_RATE.
        let started = std::time::Instant::now();
        let mut guards = Vec::new();
        while started.elapsed() < std::time::Duration::from_millis(1500) {
            for _ in 0..20 {
                let i = guards.len();
                guards.push(r.register(reg("api", &format!("10.0.{}.{}:1", i / 250, i % 250))));
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let elapsed = started.elapsed();
        let last = guards.last().unwrap().first_version;
        let p = tokio::time::timeout(std::time::Duration::from_secs(10), changes.wait_for(|p| p.version >= last))
            .await
            .expect("published")
            .unwrap()
            .clone();
        assert_eq!(p.services["api"].endpoints.len(), guards.len(), "every registration published");
        let versions = p.version - v0;
        // One per COALESCE would be elapsed / 50 ms (30 or more); gathered,
        // about one per STORM_COALESCE.
        let per_coalesce = (elapsed.as_secs_f64() / crate::registry::COALESCE.as_secs_f64()) as u64;
        assert!(versions <= per_coalesce / 4, "{versions} versions in {elapsed:?}");
    }
}
