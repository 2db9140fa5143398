//! weft-control-plane: issues SPIFFE X.509-SVIDs and pushes discovery and
//! config to sidecars over gRPC (mutual TLS).
//!
//! - [`identity`]: Attest (join token + CSR) and Renew (mTLS + CSR); JWT-SVIDs
//!   (MintJwtSvid, JwtBundle) signed with a key kept in the state directory.
//! - [`admin`]: operator calls: join tokens, status.
//! - [`discovery`]: per-sidecar config watch streams and ACK/NACK.
//! - [`registry`]: connected sidecars and the versioned snapshot.
//! - [`store`]: what survives restarts (embedded file store; etcd later).
//! - [`server`]: the TLS listener that tells handlers who the caller is.

pub mod admin;
pub mod attest;
pub mod command;
pub mod config_watch;
pub mod discovery;
pub mod identity;
pub mod injector;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod store;
pub mod tokens;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::TlsAcceptor;
use weft_certs::pki;
use weft_certs::{verify, IdMatcher, SpiffeVerifier, SvidResolver, TrustDomain};
use weft_proto::admin::v1::admin_server::AdminServer;
use weft_proto::config::v1::config_server::ConfigServer;
use weft_proto::identity::v1::identity_server::IdentityServer;

use crate::metrics::Metrics;
use crate::registry::Registry;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Pki(#[from] weft_certs::CertError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("{}: {errors}", path.display())]
    Config { errors: weft_config::ConfigErrors, path: PathBuf },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    StateDir(#[from] weft_admin::state_lock::StateLockError),
}

#[derive(Debug, Clone)]
pub struct Options {
    pub pki: PathBuf,
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub svid_ttl: Duration,
    pub trust_domain: Option<TrustDomain>,
    /// Mesh config file (YAML), watched for changes.
    pub config: Option<PathBuf>,
    /// Lifetime of minted JWT-SVIDs.
    pub jwt_svid_ttl: Duration,
    /// Kubernetes service-account token attestation, if configured.
    pub sa_tokens: Option<Arc<attest::k8s::SaTokenAttestor>>,
}

/// The JWT-SVID signing key's file in the state directory (PEM PKCS#8, 0600),
/// made at first start.
pub const JWT_KEY_FILE: &str = "jwt-signing-key.pem";

/// A started control plane: listeners bound, ready to serve.
pub struct ControlPlane {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub registry: Arc<Registry>,
    serve: tokio::task::JoinHandle<()>,
    _state_lock: weft_admin::state_lock::StateLock,
}

impl ControlPlane {
    /// Loads the PKI and store, issues the control plane's own SVID and binds
    /// both listeners. Every failure here is a clear start-up error.
    pub async fn start(opts: Options) -> Result<Self, StartError> {
        let authority = Arc::new(pki::load_authority(&opts.pki, opts.trust_domain.as_ref())?);
        let td = authority.trust_domain().clone();
        let state_lock = weft_admin::state_lock::lock(&opts.state_dir)?;
        let store: Arc<dyn store::Store> = Arc::new(store::file::FileStore::open(&opts.state_dir)?);
        let jwt_signer = Arc::new(weft_certs::jwt::JwtSigner::load_or_create(&opts.state_dir.join(JWT_KEY_FILE))?);

        let metrics = Arc::new(Metrics::default());
        let mut prom = prometheus_client::registry::Registry::default();
        metrics.register(&mut prom);
        let admin_http = weft_admin::Admin::new(prom);
        let registry = Registry::new(metrics.clone());
        if let Some(path) = &opts.config {
            let (text, cfg) =
                config_watch::load(path).map_err(|e| StartError::Config { errors: e, path: path.clone() })?;
            registry.set_mesh_config(config_watch::to_json(&cfg));
            tokio::spawn(config_watch::watch(path.clone(), text, registry.clone(), metrics.clone()));
        }

        // The control plane serves with an SVID it issues to itself, renewed at half-life.
        let own_id = pki::control_plane_id(&td);
        let resolver = SvidResolver::with_svid(&authority.issue_local(&own_id, opts.svid_ttl)?)?;
        spawn_self_renewal(authority.clone(), resolver.clone(), opts.svid_ttl);

        let bundle = verify::shared_bundle(authority.bundle().clone());
        let verifier = SpiffeVerifier::new(bundle, IdMatcher::TrustDomain(td.clone())).client_auth_optional();
        let tls = weft_certs::tls::server_config(resolver, verifier, &[weft_certs::tls::ALPN_H2]);

        let grpc = tokio::net::TcpListener::bind(opts.listen)
            .await
            .map_err(|source| StartError::Bind { addr: opts.listen, source })?;
        let admin_listener =
            weft_admin::bind(opts.admin).await.map_err(|source| StartError::Bind { addr: opts.admin, source })?;
        let grpc_addr = grpc.local_addr().map_err(|source| StartError::Bind { addr: opts.listen, source })?;
        let admin_addr = admin_listener.local_addr().map_err(|source| StartError::Bind { addr: opts.admin, source })?;

        let identity = identity::IdentityService {
            authority: authority.clone(),
            store: store.clone(),
            svid_ttl: opts.svid_ttl,
            jwt_signer,
            jwt_svid_ttl: opts.jwt_svid_ttl,
            metrics: metrics.clone(),
            sa_tokens: opts.sa_tokens.clone(),
        };
        let admin = admin::AdminService {
            operator: pki::operator_id(&td),
            trust_domain: td.clone(),
            store,
            registry: registry.clone(),
            metrics: metrics.clone(),
        };
        let discovery = discovery::DiscoveryService { registry: registry.clone(), metrics: metrics.clone() };
        let incoming = server::tls_incoming(grpc, TlsAcceptor::from(Arc::new(tls)), metrics);
        let router = tonic::transport::Server::builder()
            // Sidecars that vanish without closing their connection are noticed
            // (and deregistered) within seconds.
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .add_service(IdentityServer::new(identity))
            .add_service(AdminServer::new(admin))
            .add_service(ConfigServer::new(discovery));

        let reg = registry.clone();
        admin_http.set_config_view(move || {
            let s = reg.snapshot();
            format!(
                "{{\"version\":{},\"services\":{},\"mesh_config\":{}}}",
                s.version,
                s.services.len(),
                if s.mesh_config_json.is_empty() { "null".to_string() } else { s.mesh_config_json }
            )
        });
        admin_http.set_ready(true);
        tokio::spawn(weft_admin::serve(admin_listener, admin_http));
        let serve = tokio::spawn(async move {
            if let Err(e) = router.serve_with_incoming(incoming).await {
                tracing::error!(error = %e, "gRPC server stopped");
            }
        });
        tracing::info!(trust_domain = %td, grpc = %grpc_addr, admin = %admin_addr, "control plane listening");
        Ok(Self { grpc_addr, admin_addr, registry, serve, _state_lock: state_lock })
    }

    /// Runs until the server task ends.
    pub async fn wait(self) {
        let _ = self.serve.await;
    }
}

fn spawn_self_renewal(authority: Arc<weft_certs::Authority>, resolver: Arc<SvidResolver>, ttl: Duration) {
    tokio::spawn(async move {
        let id = pki::control_plane_id(authority.trust_domain());
        loop {
            tokio::time::sleep(ttl / 2).await;
            match authority.issue_local(&id, ttl).and_then(|s| resolver.set(&s)) {
                Ok(()) => tracing::debug!("renewed the control plane's own SVID"),
                Err(e) => {
                    tracing::error!(error = %e, "could not renew the control plane's own SVID")
                }
            }
        }
    });
}
