//! weft-proxy: the sidecar beside every workload.
//!
//! - [`state`]: what the sidecar believes — endpoints and their identities,
//!   compiled routes, authorization, rate limits — and the per-endpoint and
//!   per-route state that outlives a config swap.
//! - [`config_stream`]: the control plane's `Config` stream, applied to [`state`].
//! - [`identity`]: attest, keep and renew the workload's SVID.
//! - [`control_plane`]: the control-plane replicas and failover between them.
//! - [`outbound`]: app → mesh request layers (routing, timeout, retry,
//!   endpoint choice, connection pool, TCP upstreams).
//! - [`inbound`]: mesh → app request layers (mTLS termination, caller
//!   identity, authz, rate limits, forwarding).
//! - [`context`], [`error`]: the per-request context and the one error type
//!   the layers share, with its one mapping to a response (plain text, or
//!   gRPC form for gRPC callers).
//! - [`canonical`]: the one canonical form of a request, made at both edges.
//! - [`grpc`]: gRPC classification by `grpc-status`, trailers watched.
//! - [`workload_api`]: the SPIFFE Workload API for the app, over a Unix socket.
//!
//! Layers depend downward: `inbound`/`outbound` → `context`/`error` → `state`.

pub mod canonical;
pub mod command;
pub mod config_stream;
pub mod context;
pub mod control_plane;
pub mod detect;
pub mod error;
pub mod extended_connect;
pub mod grpc;
pub mod heap;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod outbound;
pub mod state;
pub mod workload_api;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use weft_certs::{pki, IdMatcher, SpiffeVerifier, TrustBundle, TrustDomain};

use crate::config_stream::{ConfigStream, Registration};
use crate::identity::{Identity, IdentityError};
use crate::metrics::Metrics;
use crate::state::State;
use crate::workload_api::WorkloadApi;

#[derive(Debug, Clone)]
pub struct Options {
    /// `--control-plane`: `host:port`, or several comma-separated (replicas).
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
    /// The inbound address to register in discovery: IP and optional port
    /// (default: the inbound listener's port). None: the inbound listener's
    /// address, which must then be a specific IP.
    pub advertise: Option<(std::net::IpAddr, Option<u16>)>,
    /// How long an intercepted connection's first bytes are awaited.
    pub detect_timeout: Duration,
    /// `--proxy-uid`: the UID the interception rules exempt; when set, the
    /// sidecar refuses to start as any other effective UID.
    pub proxy_uid: Option<u32>,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    pub upstreams: Vec<(String, SocketAddr)>,
    pub connect_timeout: Duration,
    /// Header size, timeouts and connection caps on every hop.
    pub limits: limits::Limits,
    /// Serve the SPIFFE Workload API on this Unix socket (mode 0600).
    pub workload_api: Option<PathBuf>,
    /// The services the app calls (`--calls`): the sidecar's scope, with
    /// the `upstreams`' names added. Empty: the whole mesh.
    pub calls: Vec<String>,
    /// `--control-plane-wait`: on a first start (no saved SVID), how long to
    /// keep retrying when no control-plane replica can be reached before
    /// giving up (zero: give up at once).
    pub control_plane_wait: Duration,
    /// `--release-pages-every`: how often a ready sidecar releases its clean
    /// file-backed pages again after the first release at readiness (zero:
    /// only then).
    pub release_pages_every: Duration,
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
    WorkloadApi { path: PathBuf, err: std::io::Error },
    #[error("{}: no spiffe:// URI SAN names the trust domain; pass --trust-domain", .0.display())]
    NoTrustDomain(PathBuf),
    #[error("--service: {0}")]
    Registration(#[from] weft_config::registration::RegistrationError),
    #[error("--calls: {0:?} is not a service name (a DNS label: lowercase letters, digits and '-')")]
    Calls(String),
    #[error("--calls: an empty service name (two commas in a row, or a leading or trailing comma); list names as --calls api,db")]
    CallsEmpty,
    #[error("--trust-bundle {0}")]
    TrustBundle(weft_certs::CertError),
    #[error("cannot register inbound address {0} in discovery: peers cannot dial {what}; pass --advertise-address <pod IP>[:<port>] (or a specific --inbound)", what = if .0.port() == 0 { "port 0" } else { "a wildcard or unspecified address" })]
    Unadvertisable(SocketAddr),
    #[error(transparent)]
    StateDir(#[from] weft_runtime::state_lock::StateLockError),
    #[error(transparent)]
    ProxyUid(#[from] outbound::intercept::ProxyUidMismatch),
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
    drain: weft_runtime::drain::DrainTrigger,
    admin: Arc<weft_admin::Admin>,
    /// The config stream; while it is open, this sidecar is registered.
    config_task: tokio::task::JoinHandle<()>,
    _state_lock: weft_runtime::state_lock::StateLock,
}

/// How long a draining sidecar keeps accepting after it has left discovery,
/// so that callers hear of it before its listeners close (at most half the
/// drain timeout).
const DEREGISTER_GRACE: Duration = Duration::from_secs(1);

/// The listeners, bound before anything else so a taken port fails fast.
struct Listeners {
    admin: TcpListener,
    inbound: TcpListener,
    outbound: TcpListener,
    upstreams: Vec<(String, TcpListener)>,
    workload_api: Option<tokio::net::UnixListener>,
}

/// Where the listeners ended up (ports chosen by the OS resolved).
struct Addrs {
    admin: SocketAddr,
    inbound: SocketAddr,
    /// The inbound address registered in discovery.
    advertised: SocketAddr,
    outbound: SocketAddr,
    upstreams: Vec<(String, SocketAddr)>,
}

impl Listeners {
    async fn bind(opts: &Options) -> Result<(Self, Addrs), StartError> {
        let admin = bind("--admin", opts.admin).await?;
        let inbound = bind("--inbound", opts.inbound).await?;
        let outbound = bind("--outbound", opts.outbound).await?;
        let mut upstreams = Vec::new();
        for (name, addr) in &opts.upstreams {
            upstreams.push((name.clone(), bind("--upstream", *addr).await?));
        }
        let local =
            |l: &TcpListener, what| l.local_addr().map_err(|err| StartError::Bind { what, addr: opts.inbound, err });
        let addrs = Addrs {
            admin: local(&admin, "--admin")?,
            inbound: local(&inbound, "--inbound")?,
            advertised: opts.inbound,
            outbound: local(&outbound, "--outbound")?,
            upstreams: upstreams
                .iter()
                .map(|(n, l)| Ok((n.clone(), local(l, "--upstream")?)))
                .collect::<Result<Vec<_>, StartError>>()?,
        };
        let workload_api = match &opts.workload_api {
            Some(path) => {
                Some(workload_api::bind(path).map_err(|err| StartError::WorkloadApi { path: path.clone(), err })?)
            }
            None => None,
        };
        Ok((Self { admin, inbound, outbound, upstreams, workload_api }, addrs))
    }
}

impl Proxy {
    /// Binds every listener, gets an SVID, and starts serving; readiness
    /// (/ready) follows once the first config has arrived.
    pub async fn start(opts: Options) -> Result<Self, StartError> {
        // Before anything is bound or spent: as another UID, its own
        // connections would loop back into it through the rules.
        if let Some(uid) = opts.proxy_uid {
            outbound::intercept::check_proxy_uid(uid)?;
        }
        // A bad name is refused before a join token is spent on it.
        if !weft_config::registration::valid_service_name(&opts.service) {
            return Err(StartError::Registration(weft_config::registration::RegistrationError::BadName(
                opts.service.clone(),
            )));
        }
        if opts.calls.iter().any(String::is_empty) {
            return Err(StartError::CallsEmpty);
        }
        if let Some(bad) = opts.calls.iter().find(|c| !weft_config::registration::valid_service_name(c)) {
            return Err(StartError::Calls(bad.clone()));
        }
        let bootstrap_bundle = TrustBundle::load(&opts.trust_bundle).map_err(StartError::TrustBundle)?;
        let td = trust_domain(&opts, &bootstrap_bundle)?;
        let metrics = Arc::new(Metrics::default());
        let mut prom = prometheus_client::registry::Registry::default();
        metrics.register(&mut prom);
        let admin = weft_admin::Admin::new(prom);

        let state_lock = weft_runtime::state_lock::lock(&opts.state_dir)?;
        let (listeners, mut addrs) = Listeners::bind(&opts).await?;
        addrs.advertised = advertised(&opts, addrs.inbound)?;
        tokio::spawn(weft_admin::serve(listeners.admin, admin.clone()));

        let identity = Identity::new(
            opts.control_plane.clone(),
            bootstrap_bundle,
            pki::control_plane_id(&td),
            opts.state_dir.clone(),
            metrics.clone(),
        )?;
        let workload = start_workload_api(&opts, &identity, &td, listeners.workload_api)?;
        attest(&opts, &identity, workload.as_ref()).await?;

        let state = State::new(&opts.service, metrics.clone());
        state.set_calls(opts.calls.clone());
        let config_task = start_config_stream(&opts, &addrs, &state, &identity, &metrics, &admin);
        let (drain_trigger, drain) = weft_runtime::drain::channel();
        let app_readiness = serve_inbound(&opts, listeners.inbound, &state, &identity, &td, &metrics, &drain);
        report_app_readiness(app_readiness, &admin);
        serve_outbound(&opts, listeners.outbound, listeners.upstreams, &state, &identity, &metrics, &drain);
        report_ready(&state, &admin, &metrics, opts.release_pages_every);
        tracing::info!(
            spiffe_id = %identity.spiffe_id().map(|i| i.to_string()).unwrap_or_default(),
            inbound = %addrs.inbound, outbound = %addrs.outbound, admin = %addrs.admin,
            "sidecar listening"
        );
        drop(drain);
        Ok(Self {
            inbound_addr: addrs.inbound,
            outbound_addr: addrs.outbound,
            admin_addr: addrs.admin,
            upstream_addrs: addrs.upstreams,
            workload_api: opts.workload_api.clone(),
            drain: drain_trigger,
            admin,
            config_task,
            _state_lock: state_lock,
        })
    }

    /// Leaves discovery (the control plane tells every caller), keeps serving
    /// for a short grace while that spreads, then stops accepting and lets open
    /// connections finish; all within `timeout`. True when everything finished.
    pub async fn shutdown(self, timeout: Duration) -> bool {
        self.admin.set_ready(false);
        // Ending the config stream ends this sidecar's registration.
        self.config_task.abort();
        let grace = DEREGISTER_GRACE.min(timeout / 2);
        tokio::time::sleep(grace).await;
        if let Some(path) = &self.workload_api {
            let _ = std::fs::remove_file(path);
        }
        self.drain.drain(timeout - grace).await
    }
}

/// The inbound address to register: `--advertise-address` (its port
/// defaulting to the bound inbound port), else the bound inbound address;
/// never an unspecified IP, which no peer could dial.
fn advertised(opts: &Options, bound: SocketAddr) -> Result<SocketAddr, StartError> {
    let addr = match opts.advertise {
        Some((ip, port)) => SocketAddr::new(ip, port.unwrap_or(bound.port())),
        None => bound,
    };
    if addr.ip().is_unspecified() || addr.port() == 0 {
        return Err(StartError::Unadvertisable(addr));
    }
    Ok(addr)
}

/// The trust domain: `--trust-domain`, or the one the bootstrap bundle's root names.
fn trust_domain(opts: &Options, bundle: &TrustBundle) -> Result<TrustDomain, StartError> {
    match &opts.trust_domain {
        Some(td) => Ok(td.clone()),
        None => bundle
            .roots()
            .iter()
            .find_map(|r| pki::trust_domain_of(r))
            .ok_or_else(|| StartError::NoTrustDomain(opts.trust_bundle.clone())),
    }
}

/// Serves the Workload API from before the first SVID (calls get
/// UNAVAILABLE until then), so an app started beside the sidecar finds the
/// socket at once.
fn start_workload_api(
    opts: &Options,
    identity: &Arc<Identity>,
    td: &TrustDomain,
    listener: Option<tokio::net::UnixListener>,
) -> Result<Option<WorkloadApi>, StartError> {
    let (Some(listener), Some(path)) = (listener, &opts.workload_api) else { return Ok(None) };
    let api = WorkloadApi::new(identity.clone(), td.clone(), &opts.state_dir)?;
    tokio::spawn(api.clone().serve(listener));
    tracing::info!(socket = %path.display(), "serving the SPIFFE Workload API");
    Ok(Some(api))
}

/// Gets the first SVID (saved, or with the join token) and keeps it renewed.
async fn attest(opts: &Options, identity: &Arc<Identity>, workload: Option<&WorkloadApi>) -> Result<(), StartError> {
    identity.bootstrap_waiting(opts.token_file.as_deref(), opts.control_plane_wait).await?;
    // The control plane would refuse the registration forever; say so now.
    if let Some(id) = identity.spiffe_id() {
        weft_config::registration::check_registration(&id, &opts.service)?;
    }
    if let Some(api) = workload {
        api.set_started();
    }
    tokio::spawn(identity.clone().run_renewal());
    Ok(())
}

/// Registers with the control plane and applies its config as it comes;
/// `/config` on the admin port shows the applied snapshot.
fn start_config_stream(
    opts: &Options,
    addrs: &Addrs,
    state: &Arc<State>,
    identity: &Arc<Identity>,
    metrics: &Arc<Metrics>,
    admin: &Arc<weft_admin::Admin>,
) -> tokio::task::JoinHandle<()> {
    let reg = Registration {
        service: opts.service.clone(),
        inbound_address: addrs.advertised,
        admin_address: addrs.admin,
        labels: opts.labels.clone(),
        calls: scope(opts),
        declared_calls: opts.calls.clone(),
    };
    let stream = ConfigStream::new(state.clone(), identity.clone(), reg, metrics.clone());
    let view = state.clone();
    admin.set_config_view(move || serde_json::to_string_pretty(&*view.snapshot()).unwrap_or_default());
    tokio::spawn(stream.run())
}

/// `--calls` and, when it is given, the names of the `--upstream`s (the app
/// calls those too). Empty when `--calls` is not given: the whole mesh.
fn scope(opts: &Options) -> Vec<String> {
    let mut calls = opts.calls.clone();
    if !calls.is_empty() {
        for (name, _) in &opts.upstreams {
            if !calls.contains(name) {
                calls.push(name.clone());
            }
        }
    }
    calls
}

/// Terminates mTLS from peer sidecars (any ID of the trust domain) for the app.
fn serve_inbound(
    opts: &Options,
    listener: TcpListener,
    state: &Arc<State>,
    identity: &Arc<Identity>,
    td: &TrustDomain,
    metrics: &Arc<Metrics>,
    drain: &weft_runtime::drain::Drain,
) -> tokio::sync::watch::Receiver<Option<String>> {
    let verifier = SpiffeVerifier::new(identity.bundle.clone(), IdMatcher::TrustDomain(td.clone()));
    let server_tls = weft_certs::tls::server_config(identity.resolver.clone(), verifier, &[weft_certs::tls::ALPN_H2]);
    let inbound = inbound::Inbound::new(
        opts.app,
        opts.app_protocol,
        opts.service.clone(),
        state.clone(),
        metrics.clone(),
        opts.limits,
    );
    let readiness = inbound.readiness.subscribe();
    tokio::spawn(inbound.serve(listener, TlsAcceptor::from(Arc::new(server_tls)), drain.clone()));
    readiness
}

/// Holds /ready at 503, with the reason, while the local app refuses
/// connections (`inbound/readiness.rs`).
fn report_app_readiness(mut readiness: tokio::sync::watch::Receiver<Option<String>>, admin: &Arc<weft_admin::Admin>) {
    let admin = admin.clone();
    tokio::spawn(async move {
        loop {
            let reason = readiness.borrow_and_update().clone();
            admin.set_unready_reason(reason);
            if readiness.changed().await.is_err() {
                return;
            }
        }
    });
}

/// Serves the app's HTTP listener and its declared TCP upstreams.
fn serve_outbound(
    opts: &Options,
    listener: TcpListener,
    upstreams: Vec<(String, TcpListener)>,
    state: &Arc<State>,
    identity: &Arc<Identity>,
    metrics: &Arc<Metrics>,
    drain: &weft_runtime::drain::Drain,
) {
    let pool = outbound::pool::Pool::new(identity.clone(), metrics.clone(), opts.connect_timeout, opts.limits);
    let outbound = outbound::Outbound::with_detect_timeout(state.clone(), pool, metrics.clone(), opts.detect_timeout);
    tokio::spawn(outbound.clone().serve_http(listener, drain.clone()));
    for (name, l) in upstreams {
        tokio::spawn(outbound.clone().serve_tcp(l, name, drain.clone()));
    }
}

/// Turns /ready on once the first config has been applied, then releases
/// the pages only start-up used (see [`weft_mapped_pages`]), and again every
/// `release_every` (unless zero).
fn report_ready(state: &Arc<State>, admin: &Arc<weft_admin::Admin>, metrics: &Arc<Metrics>, release_every: Duration) {
    let (admin, state, metrics) = (admin.clone(), state.clone(), metrics.clone());
    tokio::spawn(async move {
        state.first_applied().await;
        admin.set_ready(true);
        tracing::info!("ready: SVID held and first config applied");
        // Start-up's code and data would otherwise stay resident for the
        // sidecar's life (~0.7 MiB of each sidecar's peak under load, ~1 MiB
        // idle); what serving needs is mapped again on first use.
        release_pages(&metrics, true).await;
        if release_every.is_zero() {
            return;
        }
        // Code that runs once in a while (a config update, an SVID renewal,
        // a handshake to a new peer) leaves the RSS too; the hot path costs
        // some tens of minor faults each time.
        let mut every = tokio::time::interval_at(tokio::time::Instant::now() + release_every, release_every);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            release_pages(&metrics, false).await;
        }
    });
}

/// One release of the clean file-backed pages, on a blocking thread (it
/// reads smaps twice), counted and logged (at info the first time, at debug
/// after).
async fn release_pages(metrics: &Metrics, first: bool) {
    let outcome = match tokio::task::spawn_blocking(weft_mapped_pages::release_clean_file_pages).await {
        Ok(Ok(released)) if first => {
            tracing::info!("released start-up pages: {released}");
            "ok"
        }
        Ok(Ok(released)) => {
            tracing::debug!("released pages: {released}");
            "ok"
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "pages not released; they stay resident, nothing else changes");
            "error"
        }
        // The blocking thread panicked or the runtime is shutting down.
        Err(e) => {
            tracing::warn!(error = %e, "the page release did not finish; pages stay resident");
            "error"
        }
    };
    metrics.page_releases.get_or_create(&metrics::OutcomeLabels { outcome }).inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(advertise: Option<(std::net::IpAddr, Option<u16>)>) -> Options {
        Options {
            control_plane: String::new(),
            trust_bundle: PathBuf::new(),
            trust_domain: None,
            token_file: None,
            state_dir: PathBuf::new(),
            service: "web".into(),
            labels: HashMap::new(),
            app: "127.0.0.1:8080".parse().unwrap(),
            app_protocol: inbound::AppProtocol::Auto,
            inbound: "0.0.0.0:15006".parse().unwrap(),
            advertise,
            detect_timeout: outbound::DEFAULT_DETECT_TIMEOUT,
            proxy_uid: None,
            outbound: "127.0.0.1:15001".parse().unwrap(),
            admin: "127.0.0.1:15020".parse().unwrap(),
            upstreams: Vec::new(),
            connect_timeout: Duration::from_secs(1),
            limits: limits::Limits::default(),
            workload_api: None,
            calls: Vec::new(),
            control_plane_wait: Duration::ZERO,
            release_pages_every: Duration::ZERO,
        }
    }

    #[test]
    fn a_wildcard_inbound_needs_an_advertised_address() {
        let bound: SocketAddr = "0.0.0.0:15006".parse().unwrap();
        let err = advertised(&opts(None), bound).unwrap_err().to_string();
        assert!(err.contains("--advertise-address") && err.contains("0.0.0.0:15006"), "{err}");
        let ip = "10.1.0.5".parse().unwrap();
        assert_eq!(advertised(&opts(Some((ip, None))), bound).unwrap().to_string(), "10.1.0.5:15006");
        assert_eq!(advertised(&opts(Some((ip, Some(7000)))), bound).unwrap().to_string(), "10.1.0.5:7000");
        let unspecified = "::".parse().unwrap();
        assert!(advertised(&opts(Some((unspecified, None))), bound).is_err());
        let err = advertised(&opts(Some((ip, Some(0)))), bound).unwrap_err().to_string();
        assert!(err.contains("cannot dial port 0"), "{err}");
        let specific: SocketAddr = "127.0.0.1:15006".parse().unwrap();
        assert_eq!(advertised(&opts(None), specific).unwrap(), specific);
    }
}
