//! weft-control-plane: issues SPIFFE X.509-SVIDs and pushes discovery and
//! config to sidecars over gRPC (mutual TLS).
//!
//! - [`identity`]: `weft.identity.v1.Identity`: Attest (join token + CSR) and
//!   Renew (mTLS + CSR); JWT-SVIDs (MintJwtSvid, JwtBundle) signed with a key
//!   kept in the state directory.
//! - [`admin`]: `weft.admin.v1.Admin`: operator calls: join tokens, status.
//! - [`config_stream`]: `weft.config.v1.Config`: per-sidecar watch streams and ACK/NACK.
//! - [`config_file`]: the mesh config file, watched (change notification, poll fallback).
//! - [`registry`]: connected sidecars and the versioned snapshot, published once per version (registrations coalesced).
//! - [`store`]: what survives restarts: the embedded file store, or etcd
//!   (`--store etcd://...`) shared by several replicas.
//! - [`replicas`]: with etcd, registrations under leases and the stored mesh
//!   config, followed by every replica.
//! - [`server`]: the TLS listener that tells handlers who the caller is.

pub mod admin;
pub mod attest;
pub mod command;
pub mod config_file;
pub mod config_stream;
pub mod identity;
pub mod injector;
pub mod metrics;
pub mod registry;
pub mod replicas;
pub mod server;
pub mod store;
pub mod tokens;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use weft_certs::jwt::JwtSigner;
use weft_certs::TrustDomain;
use weft_certs::{pki, verify, Authority, IdMatcher, SpiffeVerifier, SvidResolver};
use weft_proto::admin::v1::admin_server::AdminServer;
use weft_proto::config::v1::config_server::ConfigServer;
use weft_proto::identity::v1::identity_server::IdentityServer;
use weft_runtime::state_lock::{self, StateLock};
use weft_runtime::DrainTrigger;

use crate::metrics::Metrics;
use crate::registry::Registry;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Pki(#[from] weft_certs::CertError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Config(#[from] config_file::LoadError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    StateDir(#[from] state_lock::StateLockError),
    #[error("--store {store}: {source}")]
    Etcd { store: String, source: store::etcd::EtcdSetupError },
    #[error(transparent)]
    MeshIdentity(#[from] store::etcd::IdentityMismatch),
    #[error(
        "--store-ca, --store-cert and --store-key apply only to --store etcd://...: drop them, or use --store etcd://host:port"
    )]
    StoreTlsWithoutEtcd,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// The PKI directory of `weft certs init`.
    pub pki: PathBuf,
    /// Join tokens, the JWT-SVID key and the lock live here.
    pub state_dir: PathBuf,
    /// gRPC (TLS) listen address.
    pub listen: SocketAddr,
    /// Admin HTTP listen address.
    pub admin: SocketAddr,
    /// Lifetime of issued X.509-SVIDs.
    pub svid_ttl: Duration,
    /// By default the issuer certificate's trust domain.
    pub trust_domain: Option<TrustDomain>,
    /// Mesh config file (YAML), watched for changes.
    pub config: Option<PathBuf>,
    /// Lifetime of minted JWT-SVIDs.
    pub jwt_svid_ttl: Duration,
    /// Kubernetes service-account token attestation, if configured.
    pub sa_tokens: Option<Arc<attest::k8s::SaTokenAttestor>>,
    /// Where tokens, registrations and (with etcd) the mesh config live.
    pub store: store::url::StoreUrl,
    /// TLS towards etcd.
    pub store_tls: store::url::EtcdTls,
    /// With etcd: the TTL of this replica's registration lease, i.e. how long
    /// its sidecars stay in discovery after it dies.
    pub registration_ttl: Duration,
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
    /// Dropped with the control plane, which stops the accept loop.
    _drain: DrainTrigger,
    _state_lock: StateLock,
    /// With etcd: the connection and this replica's record's key.
    record: Option<(store::etcd::Etcd, String)>,
}

/// What a stopping replica removes from etcd: its own replica record, so
/// `weft status` through the others stops listing it at once. Its sidecars'
/// registrations stay until the lease runs out: callers keep their endpoints
/// while those sidecars move to another replica.
pub struct Departure(Option<(store::etcd::Etcd, String)>);

impl Departure {
    /// Deletes the record (at most [`store::etcd::CALL_TIMEOUT`]; a failure is
    /// logged: the lease drops the record later anyway).
    pub async fn leave(self) {
        let Some((etcd, key)) = self.0 else { return };
        match etcd.delete(&key).await {
            Ok(()) => tracing::info!(%key, "replica record removed from etcd"),
            Err(e) => {
                tracing::warn!(error = %e, "could not remove this replica's record; it goes when its lease runs out")
            }
        }
    }
}

/// What the control plane keeps on disk: PKI, state directory (locked), store, JWT key.
struct State {
    authority: Arc<Authority>,
    lock: StateLock,
    store: Arc<dyn store::Store>,
    /// Set with `--store etcd://...`.
    etcd: Option<Arc<store::etcd::EtcdStore>>,
    jwt_signer: Arc<arc_swap::ArcSwap<JwtSigner>>,
}

impl State {
    fn open(opts: &Options) -> Result<Self, StartError> {
        let authority = Arc::new(pki::load_authority(&opts.pki, opts.trust_domain.as_ref())?);
        let lock = state_lock::lock(&opts.state_dir)?;
        let (store, etcd): (Arc<dyn store::Store>, _) = match &opts.store {
            store::url::StoreUrl::File => {
                let tls = &opts.store_tls;
                if tls.ca.is_some() || tls.cert.is_some() || tls.key.is_some() {
                    return Err(StartError::StoreTlsWithoutEtcd);
                }
                (Arc::new(store::file::FileStore::open(&opts.state_dir)?), None)
            }
            store::url::StoreUrl::Etcd { endpoints } => {
                let etcd = store::etcd::Etcd::connect(endpoints, &opts.store_tls)
                    .map_err(|source| StartError::Etcd { store: opts.store.to_string(), source })?;
                let s = Arc::new(store::etcd::EtcdStore { etcd });
                (s.clone(), Some(s))
            }
        };
        let jwt_signer =
            Arc::new(arc_swap::ArcSwap::from_pointee(JwtSigner::load_or_create(&opts.state_dir.join(JWT_KEY_FILE))?));
        Ok(Self { authority, lock, store, etcd, jwt_signer })
    }
}

/// Both listeners, bound first so a taken port fails start-up clearly.
struct Listeners {
    grpc: TcpListener,
    grpc_addr: SocketAddr,
    admin: TcpListener,
    admin_addr: SocketAddr,
}

impl Listeners {
    async fn bind(opts: &Options) -> Result<Self, StartError> {
        let bind = |addr: SocketAddr| async move {
            let l = server::bind(addr).map_err(|source| StartError::Bind { addr, source })?;
            let local = l.local_addr().map_err(|source| StartError::Bind { addr, source })?;
            Ok::<_, StartError>((l, local))
        };
        let (grpc, grpc_addr) = bind(opts.listen).await?;
        let (admin, admin_addr) = bind(opts.admin).await?;
        Ok(Self { grpc, grpc_addr, admin, admin_addr })
    }
}

impl ControlPlane {
    /// Loads the PKI and store, issues the control plane's own SVID and binds
    /// both listeners. Every failure here is a clear start-up error.
    pub async fn start(opts: Options) -> Result<Self, StartError> {
        // The config file first: a wrong --config must not leave a state
        // directory behind in whatever directory the operator ran from.
        let config =
            opts.config.as_deref().map(|path| Ok::<_, StartError>((path, config_file::load(path)?))).transpose()?;
        let state = State::open(&opts)?;
        let td = state.authority.trust_domain().clone();
        let metrics = Arc::new(Metrics::default());
        let registry = Registry::new(metrics.clone());
        tokio::spawn(registry.clone().run_publisher());
        let health = Arc::new(store::health::StoreHealth::new(opts.store.to_string()));
        metrics.store_up.set(1);
        let shared = match &state.etcd {
            None => {
                if let Some((path, (text, cfg))) = config {
                    watch_config_file(path, text, &cfg, &registry, &metrics);
                }
                None
            }
            Some(etcd) => {
                // Before any write: another mesh's replica must change nothing.
                let bundle = state.authority.bundle().concat_der();
                let identity = store::etcd::MeshIdentity::new(td.as_str(), &bundle);
                claim_identity(&etcd.etcd, identity).await?;
                if let Some((path, (text, _))) = &config {
                    seed_config(path, text, etcd).await;
                }
                share_jwt_key(etcd.clone(), opts.state_dir.join(JWT_KEY_FILE), state.jwt_signer.clone()).await;
                let shared = replicas::start(
                    etcd.etcd.clone(),
                    registry.clone(),
                    health.clone(),
                    metrics.clone(),
                    opts.registration_ttl,
                    // Streams wait for the stored config anyway; this only
                    // keeps start-up from racing the first read.
                    Duration::from_secs(3),
                    opts.listen,
                )
                .await;
                Some((etcd.clone(), shared))
            }
        };
        let record = shared
            .as_ref()
            .map(|(etcd, shared)| (etcd.etcd.clone(), format!("{}{}", replicas::REPLICAS, shared.replica)));
        let tls = server_tls(&state.authority, opts.svid_ttl)?;
        let listeners = Listeners::bind(&opts).await?;
        let router = grpc_router(&opts, &state, &registry, &metrics, &health, shared);
        let (drain_trigger, drain) = weft_runtime::drain::channel();
        let incoming = server::tls_incoming(
            listeners.grpc,
            TlsAcceptor::from(Arc::new(tls)),
            server::HandshakeLimits::default(),
            metrics.clone(),
            drain,
        );
        let serve = tokio::spawn(async move {
            if let Err(e) = router.serve_with_incoming(incoming).await {
                tracing::error!(error = %e, "gRPC server stopped");
            }
        });
        // Ready once the gRPC port is served.
        serve_admin(listeners.admin, &metrics, &registry, &health);
        let (grpc_addr, admin_addr) = (listeners.grpc_addr, listeners.admin_addr);
        tracing::info!(trust_domain = %td, grpc = %grpc_addr, admin = %admin_addr, "control plane listening");
        Ok(Self { grpc_addr, admin_addr, registry, serve, _drain: drain_trigger, _state_lock: state.lock, record })
    }

    /// What to remove from etcd when this replica stops gracefully.
    pub fn departure(&self) -> Departure {
        Departure(self.record.clone())
    }

    /// Runs until the server task ends.
    pub async fn wait(self) {
        let _ = self.serve.await;
    }
}

/// Puts the mesh config loaded at start (`text`, `cfg`) into the registry and
/// polls the file for changes from then on.
fn watch_config_file(
    path: &std::path::Path,
    text: String,
    cfg: &weft_config::MeshConfig,
    registry: &Arc<Registry>,
    metrics: &Arc<Metrics>,
) {
    registry.set_mesh_config(config_file::to_json(cfg));
    tokio::spawn(config_file::poll(path.into(), text, registry.clone(), metrics.clone()));
}

/// `--config` with etcd: stored only if etcd holds no config yet (the first
/// replica seeds it); from then on `weft apply` changes it. An invalid file
/// is a start-up error (checked when it was loaded); an unreachable etcd is
/// not (the stored one wins later).
async fn seed_config(path: &std::path::Path, text: &str, etcd: &store::etcd::EtcdStore) {
    match etcd.put_config(text, Some(0)).await {
        Ok(revision) => {
            tracing::info!(path = %path.display(), revision, "etcd held no mesh config: seeded it from --config")
        }
        Err(store::StoreError::Conflict { actual, .. }) => {
            // Silent only when the file is what is stored: otherwise the
            // operator expects the file's config and gets another one.
            if etcd.get_config().await.ok().flatten().is_some_and(|c| c.yaml == text) {
                tracing::info!(path = %path.display(), revision = actual, "etcd already holds this --config's mesh config");
            } else {
                tracing::warn!(
                    path = %path.display(),
                    revision = actual,
                    "--config {} is ignored: etcd already holds a mesh config (revision {actual}), and that one is \
                     served; to replace it with this file run `weft apply -f {}` (weft get config shows the stored one)",
                    path.display(),
                    path.display()
                )
            }
        }
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "could not seed the mesh config from --config"),
    }
}

/// With etcd: checks that etcd holds this replica's mesh (trust domain and
/// CA), recording it if etcd holds none: another mesh's replica is a
/// start-up error. Until checked, every write to etcd is refused; if etcd
/// does not answer now, it is asked again every 2 s in the background, and
/// a mismatch found then stops the process (exit status 2).
async fn claim_identity(etcd: &store::etcd::Etcd, ours: store::etcd::MeshIdentity) -> Result<(), StartError> {
    use store::etcd::ClaimError;
    match etcd.claim_identity(&ours).await {
        Ok(()) => Ok(()),
        Err(ClaimError::Mismatch(m)) => Err(m.into()),
        Err(ClaimError::Store(e)) => {
            tracing::warn!(error = %e, "cannot check the mesh identity in etcd yet: writes to etcd wait until it is checked");
            let etcd = etcd.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    match etcd.claim_identity(&ours).await {
                        Ok(()) => return tracing::info!("mesh identity checked in etcd"),
                        Err(ClaimError::Mismatch(m)) => {
                            if weft_runtime::logging::is_json() {
                                tracing::error!("{m}");
                            } else {
                                eprintln!("error: {m}");
                            }
                            std::process::exit(2);
                        }
                        Err(ClaimError::Store(_)) => {}
                    }
                }
            });
            Ok(())
        }
    }
}

/// With etcd: signs JWT-SVIDs with the key all replicas share (see
/// [`store::etcd::JWT_KEY`]). This replica's own key (`local`, in its state
/// directory) signs until etcd answers; if it does not at start-up, it is
/// asked again every 2 s in the background.
async fn share_jwt_key(etcd: Arc<store::etcd::EtcdStore>, local: PathBuf, signer: Arc<arc_swap::ArcSwap<JwtSigner>>) {
    let attempt = move || {
        let (etcd, local, signer) = (etcd.clone(), local.clone(), signer.clone());
        async move {
            let pem = std::fs::read(&local).map_err(|e| format!("{}: {e}", local.display()))?;
            let shared = etcd.shared_jwt_key(&pem).await.map_err(|e| e.to_string())?;
            let key = JwtSigner::from_pem(&shared).map_err(|e| format!("{}: {e}", store::etcd::JWT_KEY))?;
            tracing::info!(kid = %key.kid(), "signing JWT-SVIDs with the replicas' shared key");
            signer.store(Arc::new(key));
            Ok::<_, String>(())
        }
    };
    if let Err(e) = attempt().await {
        tracing::warn!(error = %e, "JWT-SVID signing key not shared yet: this replica's own key signs until etcd answers");
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                if attempt().await.is_ok() {
                    return;
                }
            }
        });
    }
}

/// The gRPC port's TLS config: the control plane's own SVID (issued to
/// itself, renewed at half-life); client certificates optional (Attest
/// callers have none), verified against the trust bundle when present.
fn server_tls(authority: &Arc<Authority>, svid_ttl: Duration) -> Result<rustls::ServerConfig, StartError> {
    let td = authority.trust_domain().clone();
    let resolver = SvidResolver::with_svid(&authority.issue_local(&pki::control_plane_id(&td), svid_ttl)?)?;
    spawn_self_renewal(authority.clone(), resolver.clone(), svid_ttl);
    let bundle = verify::shared_bundle(authority.bundle().clone());
    let verifier = SpiffeVerifier::new(bundle, IdMatcher::TrustDomain(td)).client_auth_optional();
    Ok(weft_certs::tls::server_config(resolver, verifier, &[weft_certs::tls::ALPN_H2]))
}

/// The three gRPC services of the proto: Identity, Admin and Config.
fn grpc_router(
    opts: &Options,
    state: &State,
    registry: &Arc<Registry>,
    metrics: &Arc<Metrics>,
    health: &Arc<store::health::StoreHealth>,
    shared: Option<(Arc<store::etcd::EtcdStore>, Arc<replicas::SharedState>)>,
) -> tonic::transport::server::Router {
    let td = state.authority.trust_domain().clone();
    let identity = identity::IdentityService {
        authority: state.authority.clone(),
        store: state.store.clone(),
        svid_ttl: opts.svid_ttl,
        jwt_signer: state.jwt_signer.clone(),
        jwt_svid_ttl: opts.jwt_svid_ttl,
        metrics: metrics.clone(),
        sa_tokens: opts.sa_tokens.clone(),
    };
    let admin = admin::AdminService {
        operator: pki::operator_id(&td),
        trust_domain: td,
        store: state.store.clone(),
        registry: registry.clone(),
        metrics: metrics.clone(),
        health: health.clone(),
        shared,
    };
    let config = config_stream::ConfigService { registry: registry.clone(), metrics: metrics.clone() };
    tonic::transport::Server::builder()
        // Sidecars that vanish without closing their connection are noticed
        // (and deregistered) within 30 s. The timeout is generous because a
        // sidecar busy or starved of CPU (thousands of them reconnecting at
        // once) answers late, and ending its stream for that costs it a new
        // handshake and full snapshot: more of the load that delayed it.
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(IdentityServer::new(identity))
        .add_service(AdminServer::new(admin))
        .add_service(ConfigServer::new(config))
}

/// The admin endpoint: metrics, and `/config` as the snapshot's version,
/// service count and mesh config. `/ready` is 200 from the start (listeners
/// are bound) and stays 200 while the store is unreachable: the replica
/// keeps serving sidecars from memory then, so it must stay in its
/// Kubernetes Service. Writes are what it cannot do: `/ready/writes` is 503
/// with the reason then, and `weft_control_plane_store_up` is 0. Only a
/// replica that has not read the stored mesh config yet (it started while
/// etcd was away) is not ready: it has no config to serve.
fn serve_admin(
    listener: TcpListener,
    metrics: &Arc<Metrics>,
    registry: &Arc<Registry>,
    health: &Arc<store::health::StoreHealth>,
) {
    let mut prom = prometheus_client::registry::Registry::default();
    metrics.register(&mut prom);
    let admin = weft_admin::Admin::new(prom);
    let reg = registry.clone();
    admin.set_config_view(move || {
        let s = reg.snapshot();
        format!(
            "{{\"version\":{},\"config_revision\":{},\"services\":{},\"mesh_config\":{}}}",
            s.version,
            s.config_revision,
            s.services.len(),
            if s.mesh_config_json.is_empty() { "null".to_string() } else { s.mesh_config_json }
        )
    });
    let store_state = health.subscribe();
    admin.add_check("/ready/writes", move || {
        // `reason` already names the store ("store etcd://… is unreachable (…)").
        store_state.borrow().as_ref().map(|reason| {
            format!("{reason}; meanwhile serving sidecars from memory and refusing writes (join tokens, weft apply)")
        })
    });
    admin.set_ready(true);
    let mut store_state = health.subscribe();
    let mut config_known = registry.config_known();
    let (metrics, admin2) = (metrics.clone(), admin.clone());
    tokio::spawn(async move {
        loop {
            let down = store_state.borrow_and_update().clone();
            metrics.store_up.set(i64::from(down.is_none()));
            // Not ready only while there is nothing to serve: a replica that
            // has not read the stored mesh config yet (it started while etcd
            // was away) would leave new sidecars waiting.
            let reason = (!*config_known.borrow_and_update()).then(|| {
                let why = down.unwrap_or_else(|| "reading it".into());
                format!("has not read the stored mesh config yet: {why}")
            });
            admin2.set_unready_reason(reason);
            tokio::select! {
                r = store_state.changed() => if r.is_err() { return },
                r = config_known.changed() => if r.is_err() { return },
            }
        }
    });
    tokio::spawn(weft_admin::serve(listener, admin));
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
