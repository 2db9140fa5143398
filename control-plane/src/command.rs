//! The command line of the daemon: its flags and its run loop, shared by the
//! binary and by `weft up`, which runs it as a child process of `weft`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::{ControlPlane, Options};
use clap::Parser;
use weft_certs::TrustDomain;

/// weft control plane: issues SPIFFE X.509-SVIDs and pushes discovery and
/// config to sidecars over mutual TLS.
#[derive(Parser, Debug)]
#[command(name = "weft-control-plane", version)]
pub struct Args {
    /// PKI directory from `weft certs init` (trust-bundle.pem, issuer.crt, issuer.key).
    #[arg(long, default_value = "./pki")]
    pki: PathBuf,
    /// Where join tokens, the JWT-SVID signing key (0600) and other state are kept.
    #[arg(long, default_value = "./state")]
    state_dir: PathBuf,
    /// gRPC (TLS) listen address.
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// Admin HTTP listen address (/live, /ready, /metrics, /config).
    #[arg(long, default_value = "127.0.0.1:7444")]
    admin: SocketAddr,
    /// Lifetime of issued X.509-SVIDs, e.g. 1h, 20s.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    svid_ttl: Duration,
    /// Lifetime of JWT-SVIDs minted for workloads (Workload API FetchJWTSVID), e.g. 5m.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    jwt_svid_ttl: Duration,
    /// Trust domain; by default read from the issuer certificate's spiffe:// URI SAN.
    #[arg(long)]
    trust_domain: Option<TrustDomain>,
    /// Mesh config (Kubernetes-shaped YAML); watched, and changes are pushed to sidecars.
    /// With --store etcd://: stored in etcd if etcd holds no config yet, else
    /// not used (change the stored config with `weft apply -f FILE`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where join tokens (hashes), registrations and the mesh config live:
    /// `file` (in --state-dir; one control plane) or
    /// `etcd://host:port[,host:port...]` (etcd v3, shared by every replica).
    #[arg(long, default_value = "file")]
    store: crate::store::url::StoreUrl,
    /// PEM CA certificates of the etcd members' server certificates; turns on TLS towards etcd.
    #[arg(long)]
    store_ca: Option<PathBuf>,
    /// PEM client certificate for etcd's --client-cert-auth (with --store-key and --store-ca).
    #[arg(long, requires = "store_key")]
    store_cert: Option<PathBuf>,
    /// PEM private key of --store-cert.
    #[arg(long, requires = "store_cert")]
    store_key: Option<PathBuf>,
    /// With etcd: how long a sidecar stays in discovery after the replica it
    /// was connected to died (its registration lease's TTL), e.g. 15s; 2s to 5m.
    #[arg(long, default_value = "15s", value_parser = parse_registration_ttl)]
    registration_ttl: Duration,
    /// Log format: human or json.
    #[arg(long, default_value = "human", value_parser = ["human", "json"])]
    pub log_format: String,
    #[command(flatten)]
    injector: crate::injector::InjectorArgs,
    #[command(flatten)]
    k8s_tokens: crate::attest::k8s::K8sTokenArgs,
}

/// A lifetime flag that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DurationError {
    #[error("{input:?}: {source} (e.g. 1h, 30m, 20s)")]
    Syntax { input: String, source: humantime::DurationError },
    #[error("{0:?} is too short; at least 2s")]
    TooShort(String),
    #[error("{0:?} is out of range: 2s to 5m (a stopped replica's sidecars stay in discovery that long)")]
    OutOfRange(String),
}

/// The longest `--registration-ttl`: a replica that dies without a word
/// stays listed, and its sidecars in discovery, this long.
pub const MAX_REGISTRATION_TTL: Duration = Duration::from_secs(300);

/// `--registration-ttl`: a lifetime from 2s to [`MAX_REGISTRATION_TTL`].
fn parse_registration_ttl(s: &str) -> Result<Duration, DurationError> {
    let d = parse_duration(s)?;
    if d > MAX_REGISTRATION_TTL {
        return Err(DurationError::OutOfRange(s.into()));
    }
    Ok(d)
}

/// A lifetime of at least 2s in humantime syntax (`1h`, `30m`, `20s`).
fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let d = humantime::parse_duration(s).map_err(|source| DurationError::Syntax { input: s.into(), source })?;
    if d < Duration::from_secs(2) {
        return Err(DurationError::TooShort(s.into()));
    }
    Ok(d)
}

/// Runs until SIGTERM or Ctrl-C.
pub async fn run(args: Args) -> Result<(), RunError> {
    let _injector = crate::injector::Injector::start(&args.injector).await?;
    let sa_tokens = crate::attest::k8s::SaTokenAttestor::from_args(&args.k8s_tokens).await?;
    let cp = ControlPlane::start(Options {
        pki: args.pki,
        state_dir: args.state_dir,
        listen: args.listen,
        admin: args.admin,
        svid_ttl: args.svid_ttl,
        trust_domain: args.trust_domain,
        config: args.config,
        jwt_svid_ttl: args.jwt_svid_ttl,
        sa_tokens,
        store: args.store,
        store_tls: crate::store::url::EtcdTls { ca: args.store_ca, cert: args.store_cert, key: args.store_key },
        registration_ttl: args.registration_ttl,
    })
    .await?;
    let departure = cp.departure();
    tokio::select! {
        _ = cp.wait() => {}
        signal = weft_runtime::shutdown_signal() => {
            tracing::info!("{}; stopping", signal.map_err(RunError::Signal)?);
            departure.leave().await;
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Start(#[from] crate::StartError),
    #[error(transparent)]
    Injector(#[from] crate::injector::InjectorError),
    #[error(transparent)]
    K8sTokens(#[from] crate::attest::k8s::K8sTokenError),
    #[error("cannot install the SIGTERM handler: {0}")]
    Signal(std::io::Error),
}
