//! weft-proxy: the sidecar beside every workload.
//!
//! - [`identity`]: attest, keep and renew the workload's SVID.
//! - [`discovery`]: the control plane's config stream (endpoints and their IDs).
//! - [`outbound`]: app → mesh (HTTP routing, TCP upstreams, connection pool).
//! - [`inbound`]: mesh → app (mTLS termination, caller identity, forwarding).
//! - [`balance`]: endpoint choice.
//! - [`shutdown`]: graceful drain.
//! - [`workload_api`]: the SPIFFE Workload API for the app, over a Unix socket.

pub mod balance;
pub mod canonical;
pub mod command;
pub mod discovery;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod routing;
pub mod shutdown;
pub mod workload_api;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use weft_certs::{pki, IdMatcher, SpiffeVerifier, TrustBundle, TrustDomain};

use crate::discovery::{Discovery, Registration};
use crate::identity::{Identity, IdentityError};
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct Options {
    pub control_plane: String,
    pub trust_bundle: PathBuf,
    pub trust_domain: Option<TrustDomain>,
    pub token_file: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub service: String,
    pub labels: HashMap<String, String>,
    pub app: SocketAddr,
    pub app_protocol: inbound::AppProtocol,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    pub upstreams: Vec<(String, SocketAddr)>,
    pub connect_timeout: Duration,
    /// Serve the SPIFFE Workload API on this Unix socket (mode 0600).
    pub workload_api: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Cert(#[from] weft_certs::CertError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("cannot listen on {addr} ({what}): {err}")]
    Bind { what: &'static str, addr: SocketAddr, err: std::io::Error },
    #[error("cannot serve the Workload API on {}: {err}", path.display())]
    WorkloadApi { path: PathBuf, err: String },
    #[error("{0}")]
    Config(String),
    #[error("--service: {0}")]
    Registration(#[from] weft_config::registration::RegistrationError),
    #[error("--trust-bundle {0}")]
    TrustBundle(weft_certs::CertError),
    #[error(transparent)]
    StateDir(#[from] weft_admin::state_lock::StateLockError),
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|err| StartError::Bind { what, addr, err })
}

/// A running sidecar.
pub struct Proxy {
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub upstream_addrs: Vec<(String, SocketAddr)>,
    /// The Workload API socket, removed at shutdown.
    pub workload_api: Option<PathBuf>,
    drain: shutdown::DrainTrigger,
    admin: Arc<weft_admin::Admin>,
    /// The config watch; while it is open, this sidecar is registered.
    discovery_task: tokio::task::JoinHandle<()>,
    _state_lock: weft_admin::state_lock::StateLock,
}

/// How long a draining sidecar keeps accepting after it has left discovery,
/// so that callers hear of it before its listeners close (at most half the
/// drain timeout).
const DEREGISTER_GRACE: Duration = Duration::from_secs(1);

impl Proxy {
    /// Binds every listener, gets an SVID, and starts serving; readiness
    /// (/ready) follows once the first config has arrived.
    pub async fn start(opts: Options) -> Result<Self, StartError> {
        // A bad name is refused before a join token is spent on it.
        if !weft_config::registration::valid_service_name(&opts.service) {
            return Err(StartError::Registration(weft_config::registration::RegistrationError::BadName(
                opts.service.clone(),
            )));
        }
        let bootstrap_bundle = TrustBundle::load(&opts.trust_bundle).map_err(StartError::TrustBundle)?;
        let td = match &opts.trust_domain {
            Some(td) => td.clone(),
            None => bootstrap_bundle.roots().iter().find_map(|r| pki::trust_domain_of(r)).ok_or_else(|| {
                StartError::Config(format!(
                    "{}: no spiffe:// URI SAN names the trust domain; pass --trust-domain",
                    opts.trust_bundle.display()
                ))
            })?,
        };
        let metrics = Arc::new(Metrics::default());
        let mut prom = prometheus_client::registry::Registry::default();
        metrics.register(&mut prom);
        let admin = weft_admin::Admin::new(prom);

        // Bind first, so a taken port fails fast and clearly.
        let state_lock = weft_admin::state_lock::lock(&opts.state_dir)?;
        let admin_listener = bind("--admin", opts.admin).await?;
        let inbound_listener = bind("--inbound", opts.inbound).await?;
        let outbound_listener = bind("--outbound", opts.outbound).await?;
        let mut upstream_listeners = Vec::new();
        for (name, addr) in &opts.upstreams {
            upstream_listeners.push((name.clone(), bind("--upstream", *addr).await?));
        }
        let local =
            |l: &TcpListener, what| l.local_addr().map_err(|err| StartError::Bind { what, addr: opts.inbound, err });
        let admin_addr = local(&admin_listener, "--admin")?;
        let inbound_addr = local(&inbound_listener, "--inbound")?;
        let outbound_addr = local(&outbound_listener, "--outbound")?;
        let upstream_addrs = upstream_listeners
            .iter()
            .map(|(n, l)| Ok((n.clone(), local(l, "--upstream")?)))
            .collect::<Result<Vec<_>, StartError>>()?;
        let workload_listener = match &opts.workload_api {
            Some(path) => Some(
                workload_api::bind(path)
                    .map_err(|e| StartError::WorkloadApi { path: path.clone(), err: e.to_string() })?,
            ),
            None => None,
        };
        tokio::spawn(weft_admin::serve(admin_listener, admin.clone()));

        let identity = Identity::new(
            opts.control_plane.clone(),
            bootstrap_bundle,
            pki::control_plane_id(&td),
            opts.state_dir.clone(),
            metrics.clone(),
        )?;
        // Served from before the first SVID (calls get UNAVAILABLE until then),
        // so an app started beside the sidecar finds the socket at once.
        let workload = match (workload_listener, &opts.workload_api) {
            (Some(listener), Some(path)) => {
                let api = workload_api::WorkloadApi::new(identity.clone(), td.clone(), &opts.state_dir)?;
                tokio::spawn(api.clone().serve(listener));
                tracing::info!(socket = %path.display(), "serving the SPIFFE Workload API");
                Some(api)
            }
            _ => None,
        };
        identity.bootstrap(opts.token_file.as_deref()).await?;
        // The control plane would refuse the registration forever; say so now.
        if let Some(id) = identity.spiffe_id() {
            weft_config::registration::check_registration(&id, &opts.service)?;
        }
        if let Some(api) = &workload {
            api.set_started();
        }
        tokio::spawn(identity.clone().run_renewal());

        let discovery = Discovery::new(&opts.service);
        let reg = Registration {
            service: opts.service.clone(),
            inbound_address: inbound_addr,
            admin_address: admin_addr,
            labels: opts.labels.clone(),
        };
        let discovery_task = tokio::spawn(discovery.clone().run(identity.clone(), reg, metrics.clone()));
        {
            let d = discovery.clone();
            admin.set_config_view(move || serde_json::to_string_pretty(&*d.table()).unwrap_or_default());
        }

        let (drain_trigger, drain) = shutdown::channel();
        let verifier = SpiffeVerifier::new(identity.bundle.clone(), IdMatcher::TrustDomain(td.clone()));
        let server_tls =
            weft_certs::tls::server_config(identity.resolver.clone(), verifier, &[weft_certs::tls::ALPN_H2]);
        let inbound = inbound::Inbound::new(
            opts.app,
            opts.app_protocol,
            opts.service.clone(),
            discovery.clone(),
            metrics.clone(),
        );
        tokio::spawn(inbound.serve(inbound_listener, TlsAcceptor::from(Arc::new(server_tls)), drain.clone()));

        let outbound = outbound::Outbound::new(
            discovery.clone(),
            outbound::pool::Pool::new(identity.clone(), metrics.clone(), opts.connect_timeout),
            metrics.clone(),
        );
        tokio::spawn(outbound.clone().serve_http(outbound_listener, drain.clone()));
        for (name, l) in upstream_listeners {
            tokio::spawn(outbound.clone().serve_tcp(l, name, drain.clone()));
        }
        {
            let admin = admin.clone();
            let discovery = discovery.clone();
            tokio::spawn(async move {
                discovery.first_applied().await;
                admin.set_ready(true);
                tracing::info!("ready: SVID held and first config applied");
            });
        }
        tracing::info!(
            spiffe_id = %identity.spiffe_id().map(|i| i.to_string()).unwrap_or_default(),
            inbound = %inbound_addr, outbound = %outbound_addr, admin = %admin_addr,
            "sidecar listening"
        );
        drop(drain);
        Ok(Self {
            inbound_addr,
            outbound_addr,
            admin_addr,
            upstream_addrs,
            workload_api: opts.workload_api.clone(),
            drain: drain_trigger,
            admin,
            discovery_task,
            _state_lock: state_lock,
        })
    }

    /// Leaves discovery (the control plane tells every caller), keeps serving
    /// for a short grace while that spreads, then stops accepting and lets open
    /// connections finish; all within `timeout`. True when everything finished.
    pub async fn shutdown(self, timeout: Duration) -> bool {
        self.admin.set_ready(false);
        // Ending the config watch ends this sidecar's registration.
        self.discovery_task.abort();
        let grace = DEREGISTER_GRACE.min(timeout / 2);
        tokio::time::sleep(grace).await;
        if let Some(path) = &self.workload_api {
            let _ = std::fs::remove_file(path);
        }
        self.drain.drain(timeout - grace).await
    }
}
