//! `weft.admin.v1.Admin`: operator calls (join tokens, status), allowed only
//! for the operator identity.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tonic::{Request, Response, Status};
use weft_certs::{SpiffeId, TrustDomain};
use weft_proto::admin::v1::admin_server::Admin;
use weft_proto::admin::v1::{CreateJoinTokenRequest, CreateJoinTokenResponse, StatusRequest, StatusResponse};

use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::server::require_peer;
use crate::store::{Store, TokenRecord};
use crate::tokens;

/// Longest join-token lifetime accepted.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 86400);

pub struct AdminService {
    pub trust_domain: TrustDomain,
    pub operator: SpiffeId,
    pub store: Arc<dyn Store>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
}

impl AdminService {
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
            Ok(Response::new(self.registry.status(&self.trust_domain)))
        }
        .await;
        self.metrics.rpc("Status", r.as_ref().map(|_| tonic::Code::Ok).unwrap_or_else(|s| s.code()));
        r
    }
}
