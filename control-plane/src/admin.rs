//! `weft.admin.v1.Admin`: operator calls (join tokens, status, the mesh
//! config in etcd), allowed only for the operator identity.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tonic::{Request, Response, Status};
use weft_certs::{SpiffeId, TrustDomain};
use weft_proto::admin::v1::admin_server::Admin;
use weft_proto::admin::v1::{
    ApplyConfigRequest, ApplyConfigResponse, CreateJoinTokenRequest, CreateJoinTokenResponse, GetConfigRequest,
    GetConfigResponse, ReplicaStatus, SidecarStatus, StatusRequest, StatusResponse,
};

use crate::metrics::Metrics;
use crate::registry::{Published, Registry};
use crate::replicas::SharedState;
use crate::server::require_peer;
use crate::store::etcd::EtcdStore;
use crate::store::health::StoreHealth;
use crate::store::{Store, StoreError, TokenRecord};
use crate::tokens;

/// Longest join-token lifetime accepted.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 86400);

pub struct AdminService {
    pub trust_domain: TrustDomain,
    pub operator: SpiffeId,
    pub store: Arc<dyn Store>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<StoreHealth>,
    /// The etcd store and what this replica serves from it; None with `--store file`.
    pub shared: Option<(Arc<EtcdStore>, Arc<SharedState>)>,
}

/// How long ApplyConfig waits for this replica to serve what it stored.
const APPLIED_WAIT: Duration = Duration::from_secs(5);

impl AdminService {
    #[allow(clippy::result_large_err)]
    fn require_etcd(&self) -> Result<&(Arc<EtcdStore>, Arc<SharedState>), Status> {
        self.shared.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this control plane runs with --store file: its mesh config is the --config file (edit that file); \
                 weft apply and weft get config need control planes started with --store etcd://host:port",
            )
        })
    }

    #[allow(clippy::result_large_err)]
    fn require_operator<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let (id, _) = require_peer(req)?;
        if id != self.operator {
            return Err(Status::permission_denied(format!("{id} is not the operator identity {}", self.operator)));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_join_token(
        &self,
        req: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenResponse>, Status> {
        let r = async {
            self.require_operator(&req)?;
            let req = req.into_inner();
            let id = SpiffeId::parse(&req.spiffe_id).map_err(|e| {
                Status::invalid_argument(format!("spiffe_id {:?}: {e}", req.spiffe_id))
            })?;
            if id.trust_domain() != &self.trust_domain {
                return Err(Status::invalid_argument(format!(
                    "spiffe_id {id} is outside this control plane's trust domain {}",
                    self.trust_domain
                )));
            }
            if id.path().starts_with("/weft/") {
                return Err(Status::invalid_argument(format!(
                    "spiffe_id {id} is reserved for weft itself (paths under /weft/); workloads use e.g. /ns/<namespace>/sa/<service-account>"
                )));
            }
            if req.ttl_seconds == 0 || req.ttl_seconds > MAX_TOKEN_TTL.as_secs() {
                return Err(Status::invalid_argument(format!(
                    "ttl must be between 1s and {}s",
                    MAX_TOKEN_TTL.as_secs()
                )));
            }
            let token = tokens::generate();
            let expires_at =
                weft_certs::svid::unix_secs(SystemTime::now()) + req.ttl_seconds as i64;
            self.store
                .put_token(TokenRecord {
                    hash: tokens::hash(&token),
                    spiffe_id: id.to_string(),
                    expires_at,
                    used: false,
                })
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            tracing::info!(spiffe_id = %id, ttl_s = req.ttl_seconds, "join token created");
            Ok(CreateJoinTokenResponse { token, expires_at })
        }
        .await;
        self.metrics.rpc("CreateJoinToken", r.as_ref().map(|_| tonic::Code::Ok).unwrap_or_else(|s| s.code()));
        r.map(Response::new)
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let r: Result<Response<StatusResponse>, Status> = async {
            self.require_operator(&req)?;
            let mut status = self.registry.status(&self.trust_domain);
            status.store = self.health.store.clone();
            status.store_error = self.health.down_reason().unwrap_or_default();
            // The same reason /ready gives (see `serve_admin`).
            if !*self.registry.config_known().borrow() {
                let why = if status.store_error.is_empty() { "reading it".into() } else { status.store_error.clone() };
                status.not_ready = format!("has not read the stored mesh config yet: {why}");
            }
            if let Some((_, shared)) = &self.shared {
                status.config_revision = shared.config_revision.load(std::sync::atomic::Ordering::Acquire);
                // The last published version (what the local sidecars' state was
                // judged by), not a new one: a Status call must not cut coalescing short.
                let published = self.registry.subscribe().borrow().clone();
                add_replicas(&mut status, shared, &published);
            }
            Ok(Response::new(status))
        }
        .await;
        self.metrics.rpc("Status", r.as_ref().map(|_| tonic::Code::Ok).unwrap_or_else(|s| s.code()));
        r
    }

    async fn apply_config(&self, req: Request<ApplyConfigRequest>) -> Result<Response<ApplyConfigResponse>, Status> {
        let r: Result<ApplyConfigResponse, Status> = async {
            self.require_operator(&req)?;
            let (store, shared) = self.require_etcd()?;
            let req = req.into_inner();
            // The same checks and messages as `weft validate`.
            let cfg = weft_config::parse(&req.yaml).map_err(|errs| Status::invalid_argument(errs.to_string()))?;
            let expected = (req.if_revision > 0).then_some(req.if_revision);
            // Re-applying what is stored writes nothing: a new revision would
            // make every replica rebuild and push the same config again.
            let stored = store.get_config().await.map_err(|e| Status::unavailable(e.to_string()))?;
            if let Some(stored) = stored.filter(|c| expected.is_none_or(|rev| rev == c.revision)) {
                if same_config(&stored.yaml, &req.yaml, &cfg) {
                    tracing::info!(revision = stored.revision, "mesh config unchanged; nothing stored");
                    return Ok(ApplyConfigResponse { revision: stored.revision, unchanged: true });
                }
            }
            let revision = store.put_config(&req.yaml, expected).await.map_err(|e| match e {
                StoreError::Conflict { .. } => Status::failed_precondition(e.to_string()),
                e => Status::unavailable(e.to_string()),
            })?;
            tracing::info!(revision, "mesh config stored");
            // Return once this replica serves it (the others follow their watch).
            let deadline = tokio::time::Instant::now() + APPLIED_WAIT;
            while shared.config_revision.load(std::sync::atomic::Ordering::Acquire) < revision
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(ApplyConfigResponse { revision, unchanged: false })
        }
        .await;
        self.metrics.rpc("ApplyConfig", r.as_ref().map(|_| tonic::Code::Ok).unwrap_or_else(|s| s.code()));
        r.map(Response::new)
    }

    async fn get_config(&self, req: Request<GetConfigRequest>) -> Result<Response<GetConfigResponse>, Status> {
        let r: Result<GetConfigResponse, Status> = async {
            self.require_operator(&req)?;
            let (store, shared) = self.require_etcd()?;
            let stored = match store.get_config().await {
                Ok(stored) => stored,
                // A read can be answered from this replica's own copy (what
                // it serves), said to be possibly stale; writes cannot.
                Err(e @ StoreError::Unavailable { .. }) => match shared.config() {
                    Some(c) => {
                        return Ok(GetConfigResponse {
                            yaml: c.yaml,
                            revision: c.revision,
                            stale_reason: e.to_string(),
                        })
                    }
                    None => return Err(Status::unavailable(e.to_string())),
                },
                Err(e) => return Err(Status::unavailable(e.to_string())),
            };
            Ok(stored
                .map(|c| GetConfigResponse { yaml: c.yaml, revision: c.revision, ..Default::default() })
                .unwrap_or_default())
        }
        .await;
        self.metrics.rpc("GetConfig", r.as_ref().map(|_| tonic::Code::Ok).unwrap_or_else(|s| s.code()));
        r.map(Response::new)
    }
}

/// Whether the stored YAML is the config `yaml` (parsed as `cfg`) declares:
/// the same text, or the same config once parsed (comments, order of keys,
/// formatting aside).
fn same_config(stored: &str, yaml: &str, cfg: &weft_config::MeshConfig) -> bool {
    stored == yaml
        || weft_config::parse(stored).is_ok_and(|old| {
            serde_json::to_value(&old).ok().is_some_and(|old| serde_json::to_value(cfg).ok() == Some(old))
        })
}

/// With etcd: marks this replica's sidecars with its ID, adds the other
/// replicas' sidecars (as known from etcd, `remote`, with their ACK state
/// from their replica's ack record) and every live replica, so one
/// `weft status` shows the whole mesh whichever replica it asks. `published`
/// is this replica's current version, which tells which declared calls the
/// mesh does not define.
fn add_replicas(status: &mut StatusResponse, shared: &SharedState, published: &Published) {
    status.replica = shared.replica.clone();
    for s in &mut status.sidecars {
        s.replica = shared.replica.clone();
    }
    let local = status.sidecars.len() as u64;
    let remote = shared.remote();
    let acks = shared.acks();
    // A sidecar that just moved here is still registered by the replica it
    // left until that lease ends: list it once, here.
    let here: std::collections::HashSet<(String, String)> =
        status.sidecars.iter().map(|s| (s.spiffe_id.clone(), s.inbound_address.clone())).collect();
    let mut per_replica: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for (replica, reg) in remote {
        if here.contains(&(reg.spiffe_id.to_string(), reg.address.clone())) {
            continue;
        }
        *per_replica.entry(replica.clone()).or_default() += 1;
        let record = acks.get(&replica);
        let (acked_version, nacked_version, nack_reason) = record.and_then(|r| r.get(&reg.address)).unwrap_or_default();
        // Known only once its replica's record lists it.
        let known = record.filter(|r| r.sidecars.contains_key(&reg.address));
        status.sidecars.push(SidecarStatus {
            acked_version,
            nacked_version,
            nack_reason,
            replica_config_version: known.map_or(0, |r| r.version),
            replica_config_revision: known.map_or(0, |r| r.config_revision),
            unknown_calls: published.unknown_calls(&reg.calls),
            calls: reg.calls,
            spiffe_id: reg.spiffe_id.to_string(),
            service: reg.service,
            inbound_address: reg.address,
            labels: reg.labels,
            svid_expires_at: reg.svid_expires.map(weft_certs::svid::unix_secs).unwrap_or(0),
            admin_address: reg.admin_address,
            replica,
            remote: true,
            ..Default::default()
        });
    }
    let mut replicas = shared.replicas();
    // Listed even before (or while etcd is away and) its own record is read.
    replicas.entry(shared.replica.clone()).or_default();
    status.replicas = replicas
        .into_iter()
        .map(|(id, info)| ReplicaStatus {
            sidecars: if id == shared.replica { local } else { per_replica.get(&id).copied().unwrap_or(0) },
            id,
            listen: info.listen,
            host: info.host,
            started_at: info.started_at,
        })
        .collect();
}
