//! `weft.identity.v1.Identity`: attest with a join token, renew with mTLS,
//! and mint JWT-SVIDs (ES256) for mTLS callers, with the JWT bundle to check them.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tonic::{Request, Response, Status};
use weft_certs::ca::{verify_csr, VerifiedCsr};
use weft_certs::jwt::JwtSigner;
use weft_certs::{Authority, CertError, SpiffeId};
use weft_proto::identity::v1::identity_server::Identity;
use weft_proto::identity::v1::{
    AttestRequest, JwtBundleRequest, JwtBundleResponse, MintJwtSvidRequest, MintJwtSvidResponse, RenewRequest,
    X509SvidResponse,
};

use crate::metrics::Metrics;
use crate::server::require_peer;
use crate::store::{Store, StoreError};
use crate::tokens;

pub struct IdentityService {
    pub authority: Arc<Authority>,
    pub store: Arc<dyn Store>,
    pub svid_ttl: Duration,
    /// Signs JWT-SVIDs; its key never rotates yet, so the bundle's
    /// `spiffe_sequence` stays [`JWT_BUNDLE_SEQUENCE`].
    /// Swapped once (with etcd) when the replicas' shared key is read.
    pub jwt_signer: Arc<arc_swap::ArcSwap<JwtSigner>>,
    pub jwt_svid_ttl: Duration,
    pub metrics: Arc<Metrics>,
    /// Kubernetes service-account token attestation, if configured.
    pub sa_tokens: Option<Arc<crate::attest::k8s::SaTokenAttestor>>,
}

/// `spiffe_sequence` of the JWT bundle: one key, made once.
pub const JWT_BUNDLE_SEQUENCE: u64 = 1;
/// At most this many audiences in one JWT-SVID.
const MAX_AUDIENCES: usize = 32;

#[allow(clippy::result_large_err)]
fn csr_or_invalid(der: &[u8]) -> Result<VerifiedCsr, Status> {
    verify_csr(der).map_err(|e| Status::invalid_argument(e.to_string()))
}

impl IdentityService {
    /// Attests with a Kubernetes service-account token: `spiffe://<td>/ns/<ns>/sa/<sa>`.
    #[allow(clippy::result_large_err)]
    async fn attest_sa_token(&self, req: &AttestRequest) -> Result<X509SvidResponse, Status> {
        let Some(sa_tokens) = &self.sa_tokens else {
            return Err(Status::unauthenticated(
                "a Kubernetes service-account token was presented, but this control plane does not accept them \
                 (start it with --k8s-token-issuer)",
            ));
        };
        let csr = csr_or_invalid(&req.csr)?;
        let account = sa_tokens.verify(&req.join_token).await.map_err(|e| {
            self.metrics.sa_token_refused(e.reason());
            tracing::warn!(reason = e.reason(), error = %e, "service-account token refused");
            Status::unauthenticated(format!("service-account token refused: {e}"))
        })?;
        let id = self.authority.trust_domain().workload_id(&account.namespace, &account.name).map_err(|e| {
            Status::invalid_argument(format!("service account {}/{}: {e}", account.namespace, account.name))
        })?;
        let resp = self.issue(&csr, &id)?;
        tracing::info!(spiffe_id = %id, pod = account.pod.as_deref().unwrap_or(""), "attested with a service-account token");
        self.metrics.issued("k8s_sa_token");
        Ok(resp)
    }

    #[allow(clippy::result_large_err)]
    fn issue(&self, csr: &VerifiedCsr, id: &SpiffeId) -> Result<X509SvidResponse, Status> {
        let chain = self.authority.sign(csr, id, self.svid_ttl).map_err(|e| match e {
            CertError::Issuer(m) => Status::permission_denied(m),
            e => Status::internal(e.to_string()),
        })?;
        let expires_at = weft_certs::svid::not_after(&chain[0]).map(weft_certs::svid::unix_secs).unwrap_or(0);
        Ok(X509SvidResponse {
            spiffe_id: id.to_string(),
            cert_chain: chain.into_iter().map(|c| c.to_vec()).collect(),
            trust_bundle: self.authority.bundle().roots().iter().map(|c| c.to_vec()).collect(),
            expires_at,
        })
    }

    fn record<T>(&self, rpc: &str, r: &Result<T, Status>) {
        self.metrics.rpc(rpc, r.as_ref().map(|_| tonic::Code::Ok).unwrap_or_else(|s| s.code()));
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn attest(&self, req: Request<AttestRequest>) -> Result<Response<X509SvidResponse>, Status> {
        let r = async {
            let req = req.into_inner();
            if req.join_token.trim().is_empty() {
                return Err(Status::unauthenticated("join token is empty"));
            }
            if weft_k8s::sa_token::looks_like_jwt(&req.join_token) {
                return self.attest_sa_token(&req).await;
            }
            // Check the CSR before spending the token, so a bad CSR loses nothing.
            let csr = csr_or_invalid(&req.csr)?;
            let now = weft_certs::svid::unix_secs(SystemTime::now());
            let rec = self.store.consume_token(&tokens::hash(&req.join_token), now).await.map_err(|e| match e {
                StoreError::UnknownToken => Status::unauthenticated(e.to_string()),
                StoreError::ExpiredToken | StoreError::UsedToken => Status::permission_denied(e.to_string()),
                StoreError::Backend { .. } | StoreError::Unavailable { .. } | StoreError::Conflict { .. } => {
                    Status::unavailable(e.to_string())
                }
            })?;
            let id = SpiffeId::parse(&rec.spiffe_id).map_err(|e| Status::internal(format!("stored token ID: {e}")))?;
            let resp = self.issue(&csr, &id)?;
            tracing::info!(spiffe_id = %id, "attested with join token");
            self.metrics.issued("join_token");
            Ok(resp)
        }
        .await;
        self.record("Attest", &r);
        r.map(Response::new)
    }

    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<X509SvidResponse>, Status> {
        let r = async {
            // The identity comes from the verified client certificate only.
            let (id, _) = require_peer(&req)?;
            let csr = csr_or_invalid(&req.get_ref().csr)?;
            let resp = self.issue(&csr, &id)?;
            tracing::debug!(spiffe_id = %id, "renewed SVID");
            self.metrics.issued("renew");
            Ok(resp)
        }
        .await;
        self.record("Renew", &r);
        r.map(Response::new)
    }

    async fn mint_jwt_svid(&self, req: Request<MintJwtSvidRequest>) -> Result<Response<MintJwtSvidResponse>, Status> {
        let r = async {
            // Only for the verified caller's own ID: whoever holds an SVID can
            // get a JWT-SVID for that SPIFFE ID, and for nothing else.
            let (id, _) = require_peer(&req)?;
            let audience = &req.get_ref().audience;
            if audience.is_empty() {
                return Err(Status::invalid_argument("audience must be specified"));
            }
            if audience.len() > MAX_AUDIENCES || audience.iter().any(|a| a.is_empty() || a.len() > 1024) {
                return Err(Status::invalid_argument(format!(
                    "audiences must be 1 to {MAX_AUDIENCES} non-empty strings of at most 1024 bytes"
                )));
            }
            let (token, expires_at) = self
                .jwt_signer
                .load()
                .sign(&id, audience, self.jwt_svid_ttl, SystemTime::now())
                .map_err(|e| Status::internal(e.to_string()))?;
            tracing::debug!(spiffe_id = %id, audience = %audience.join(","), "minted JWT-SVID");
            self.metrics.issued("jwt_svid");
            Ok(MintJwtSvidResponse { token, expires_at })
        }
        .await;
        self.record("MintJwtSvid", &r);
        r.map(Response::new)
    }

    async fn jwt_bundle(&self, req: Request<JwtBundleRequest>) -> Result<Response<JwtBundleResponse>, Status> {
        let r =
            require_peer(&req).map(|_| JwtBundleResponse { jwks: self.jwt_signer.load().jwks(JWT_BUNDLE_SEQUENCE) });
        self.record("JwtBundle", &r);
        r.map(Response::new)
    }
}
