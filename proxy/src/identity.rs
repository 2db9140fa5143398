//! The sidecar's identity: attest once with a join token, keep the key and
//! SVID in the state directory, renew over mTLS at half-life with jitter, and
//! swap each new SVID into the TLS resolver without touching open connections.
//! Calls go to the control-plane replica in use ([`ControlPlanes`]); one that
//! cannot be reached is left for another.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::sync::watch;
use weft_certs::ca::make_csr;
use weft_certs::pki::{load_svid, save_svid};
use weft_certs::verify::{Anchors, SharedBundle};
use weft_certs::{pki, IdMatcher, SpiffeId, SpiffeVerifier, Svid, SvidResolver, TrustBundle};
use weft_proto::identity::v1::identity_client::IdentityClient;
use weft_proto::identity::v1::{AttestRequest, RenewRequest, X509SvidResponse};

use crate::control_plane::{Backoff, ControlPlaneAddrError, ControlPlanes};
use crate::metrics::Metrics;

const SVID_CERT: &str = "svid.pem";
const SVID_KEY: &str = "svid.key";
const BUNDLE: &str = "bundle.pem";
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("no saved SVID in {state_dir} and no join token: pass --token-file")]
    NoToken { state_dir: PathBuf },
    #[error("token file {path}: {reason}")]
    TokenFile { path: PathBuf, reason: String },
    #[error("control plane refused: {0}")]
    Refused(String),
    #[error("control plane unreachable: {0}")]
    Unreachable(String),
    /// A TCP or TLS failure reaching the control plane, in one actionable line.
    #[error(transparent)]
    ControlPlane(#[from] weft_certs::diagnose::ControlPlaneError),
    #[error(transparent)]
    Cert(#[from] weft_certs::CertError),
    #[error("state directory {path}: {err}")]
    State { path: PathBuf, err: std::io::Error },
    #[error(transparent)]
    ControlPlaneAddr(#[from] ControlPlaneAddrError),
}

impl IdentityError {
    /// The replica could not be reached or spoken to (TCP or TLS): another
    /// replica may do, and this one spent no join token.
    pub fn replica_failed(&self) -> bool {
        matches!(self, Self::Unreachable(_) | Self::ControlPlane(_))
    }

    /// Worth waiting for on a first start: nothing answered (refused,
    /// timed out, no route, or the name does not resolve yet), as when the
    /// control plane starts after its sidecars. A wrong trust bundle or port
    /// is a mistake to report at once.
    pub fn transient(&self) -> bool {
        use weft_certs::diagnose::Failure;
        match self {
            Self::Unreachable(_) => true,
            Self::ControlPlane(e) => matches!(e.failure, Failure::Refused | Failure::Unreachable(_)),
            Self::ControlPlaneAddr(e) => matches!(e, ControlPlaneAddrError::Unresolved { .. }),
            _ => false,
        }
    }
}

/// The sidecar's current SVID and trust bundle, shared with its TLS configs.
pub struct Identity {
    pub resolver: Arc<SvidResolver>,
    pub bundle: SharedBundle,
    current: watch::Sender<Option<Svid>>,
    control_planes: Arc<ControlPlanes>,
    cp_id: SpiffeId,
    state_dir: PathBuf,
    metrics: Arc<Metrics>,
}

impl Identity {
    /// `control_plane` is `--control-plane`: one or more `host:port`
    /// entries, comma-separated ([`ControlPlanes::parse`]).
    pub fn new(
        control_plane: String,
        bootstrap_bundle: TrustBundle,
        cp_id: SpiffeId,
        state_dir: PathBuf,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, IdentityError> {
        let control_planes = Arc::new(ControlPlanes::parse(&control_plane)?);
        std::fs::create_dir_all(&state_dir).map_err(|err| IdentityError::State { path: state_dir.clone(), err })?;
        let bundle = match TrustBundle::load(&state_dir.join(BUNDLE)) {
            Ok(saved) => saved,
            Err(_) => bootstrap_bundle,
        };
        Ok(Arc::new(Self {
            resolver: SvidResolver::new(),
            bundle: weft_certs::verify::shared_bundle(bundle),
            current: watch::channel(None).0,
            control_planes,
            cp_id,
            state_dir,
            metrics,
        }))
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Svid>> {
        self.current.subscribe()
    }

    pub fn current(&self) -> Option<Svid> {
        self.current.borrow().clone()
    }

    pub fn spiffe_id(&self) -> Option<SpiffeId> {
        self.current.borrow().as_ref().map(|s| s.spiffe_id.clone())
    }

    /// A rustls client config that verifies the control plane's SPIFFE ID and
    /// presents our SVID when we have one.
    pub fn control_plane_tls(&self, with_svid: bool) -> rustls::ClientConfig {
        let verifier = SpiffeVerifier::new(self.bundle.clone(), IdMatcher::Exact(self.cp_id.clone()));
        weft_certs::tls::client_config(with_svid.then(|| self.resolver.clone()), verifier, &[weft_certs::tls::ALPN_H2])
    }

    /// The control-plane replicas, shared by every caller so that all move together.
    pub fn control_planes(&self) -> &Arc<ControlPlanes> {
        &self.control_planes
    }

    /// A lazy channel to the replica in use (before any choice: the first
    /// `--control-plane` entry). For calls that do not fail over themselves.
    pub fn control_plane_channel(&self, with_svid: bool) -> Result<tonic::transport::Channel, IdentityError> {
        let addr = match self.control_planes.current() {
            Some(a) => a.to_string(),
            None => self.control_planes.first_entry().to_string(),
        };
        self.channel_to(&addr, with_svid)
    }

    /// A lazy channel to the replica to use now ([`ControlPlanes::pick`]),
    /// with its address, to report with [`ControlPlanes::failed`] if the
    /// replica turns out to be gone.
    pub async fn replica_channel(
        &self,
        with_svid: bool,
    ) -> Result<(tonic::transport::Channel, std::net::SocketAddr), IdentityError> {
        let addr = self.control_planes.pick().await?;
        Ok((self.channel_to(&addr.to_string(), with_svid)?, addr))
    }

    fn channel_to(&self, addr: &str, with_svid: bool) -> Result<tonic::transport::Channel, IdentityError> {
        weft_proto::channel::lazy_channel(
            addr,
            Arc::new(self.control_plane_tls(with_svid)),
            weft_certs::tls::server_name(),
        )
        .map_err(|e| IdentityError::Unreachable(format!("{addr}: {e}")))
    }

    /// Gets a first SVID: the saved one (renewed at once if the control plane
    /// answers), else by attesting with the join token; gives up at once
    /// when no replica can be reached (see [`Identity::bootstrap_waiting`]).
    pub async fn bootstrap(&self, token_file: Option<&Path>) -> Result<(), IdentityError> {
        self.bootstrap_waiting(token_file, Duration::ZERO).await
    }

    /// [`Identity::bootstrap`], but when no replica can be reached,
    /// attesting is retried with jittered backoff for up to `wait` (see
    /// [`crate::control_plane::FirstContact`]).
    pub async fn bootstrap_waiting(&self, token_file: Option<&Path>, wait: Duration) -> Result<(), IdentityError> {
        let cert = self.state_dir.join(SVID_CERT);
        let key = self.state_dir.join(SVID_KEY);
        if let Ok(saved) = load_svid(&cert, &key) {
            if saved.not_after > SystemTime::now() {
                tracing::info!(spiffe_id = %saved.spiffe_id, "using saved SVID from state directory");
                self.install(saved)?;
                match self.renew().await {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "renewing the saved SVID failed; keeping it and retrying later")
                    }
                }
                return Ok(());
            }
            tracing::warn!(spiffe_id = %saved.spiffe_id, "saved SVID has expired; attesting again");
        }
        let token_file = token_file.ok_or_else(|| IdentityError::NoToken { state_dir: self.state_dir.clone() })?;
        let token = std::fs::read_to_string(token_file)
            .map_err(|e| IdentityError::TokenFile { path: token_file.into(), reason: e.to_string() })?;
        let token = token.trim();
        if token.is_empty() {
            return Err(IdentityError::TokenFile { path: token_file.into(), reason: "is empty".into() });
        }
        let (csr, key_pair) = make_csr()?;
        // Each replica once per round: an unreachable one spends no token.
        // A round where none answered is retried after a backoff, up to `wait`.
        let mut first_contact = crate::control_plane::FirstContact::new(wait);
        let resp = 'rounds: loop {
            let attempts = match self.control_planes.resolve().await {
                Ok(addrs) => addrs.len(),
                Err(e) => {
                    first_contact.retry_or_give_up(&self.control_planes.describe(), IdentityError::from(e)).await?;
                    continue;
                }
            };
            let mut attempt = 0;
            loop {
                attempt += 1;
                let (channel, addr) = match self.replica_channel(false).await {
                    Ok(c) => c,
                    Err(e) if e.transient() => {
                        first_contact.retry_or_give_up(&self.control_planes.describe(), e).await?;
                        continue 'rounds;
                    }
                    Err(e) => return Err(e),
                };
                let req = AttestRequest { join_token: token.to_string(), csr: csr.clone() };
                match IdentityClient::new(channel).attest(req).await.map_err(|s| self.rpc_error(addr, s)) {
                    Ok(resp) => {
                        self.control_planes.answered(addr);
                        break 'rounds resp.into_inner();
                    }
                    Err(e) if e.replica_failed() => {
                        self.control_planes.failed(addr);
                        if attempt >= attempts {
                            if !e.transient() {
                                return Err(e);
                            }
                            first_contact.retry_or_give_up(&self.control_planes.describe(), e).await?;
                            continue 'rounds;
                        }
                        tracing::warn!(error = %e, "attesting: control-plane replica unreachable; trying another");
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let svid = self.accept(resp, key_pair.serialize_der())?;
        tracing::info!(spiffe_id = %svid.spiffe_id, "attested with join token");
        Ok(())
    }

    /// A failed call: the control plane was not reached (transport failures
    /// surface as Unavailable or Unknown), or it answered with a refusal.
    fn rpc_error(&self, addr: std::net::SocketAddr, s: tonic::Status) -> IdentityError {
        use weft_certs::diagnose::{Client, ControlPlaneError};
        if let Some(e) = ControlPlaneError::from_error(&addr.to_string(), Client::Sidecar, &s) {
            return e.into();
        }
        match s.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded => {
                IdentityError::Unreachable(format!("{addr}: {}", s.message()))
            }
            code => IdentityError::Refused(format!("{code:?}: {}", s.message())),
        }
    }

    /// Renews over mTLS with the current SVID, at the replica in use; one
    /// that cannot be reached is left, so the next attempt goes to another.
    pub async fn renew(&self) -> Result<(), IdentityError> {
        let (csr, key_pair) = make_csr()?;
        let (channel, addr) = self.replica_channel(true).await?;
        let resp = match IdentityClient::new(channel).renew(RenewRequest { csr }).await {
            Ok(r) => {
                self.control_planes.answered(addr);
                r.into_inner()
            }
            Err(s) => {
                let e = self.rpc_error(addr, s);
                if e.replica_failed() {
                    self.control_planes.failed(addr);
                }
                return Err(e);
            }
        };
        let svid = self.accept(resp, key_pair.serialize_der())?;
        tracing::info!(spiffe_id = %svid.spiffe_id, expires = %humantime::format_rfc3339_seconds(svid.not_after), "renewed SVID");
        Ok(())
    }

    fn accept(&self, resp: X509SvidResponse, key_der: Vec<u8>) -> Result<Svid, IdentityError> {
        let chain = resp.cert_chain.into_iter().map(Into::into).collect();
        let svid = Svid::new(chain, key_der)?;
        let roots = resp.trust_bundle.into_iter().map(Into::into).collect();
        let bundle = TrustBundle::new(roots)?;
        if self.bundle.load().bundle() != &bundle {
            pki::write_file(&self.state_dir.join(BUNDLE), bundle.to_pem().as_bytes(), false)?;
            self.bundle.store(Arc::new(Anchors::new(bundle)));
        }
        save_svid(&svid, &self.state_dir.join(SVID_CERT), &self.state_dir.join(SVID_KEY))?;
        self.install(svid.clone())?;
        Ok(svid)
    }

    fn install(&self, svid: Svid) -> Result<(), IdentityError> {
        self.resolver.set(&svid)?;
        self.metrics.svid_expiry.set(svid.expires_unix());
        self.current.send_replace(Some(svid));
        Ok(())
    }

    /// Renews forever: at half-life ± 10%, and after a failure with jittered,
    /// capped exponential backoff (at another replica if that one was
    /// unreachable) while the old SVID keeps serving.
    pub async fn run_renewal(self: Arc<Self>) {
        let mut backoff = Backoff::new(Duration::from_secs(1), MAX_BACKOFF);
        loop {
            let Some(svid) = self.current() else { return };
            // Half of the validity left from now, not from not_before: the
            // CA backdates not_before (clock skew), so with a short TTL the
            // half-life point of [not_before, not_after] is already past at
            // issuance and renewal would spin without pause.
            let remaining = svid.not_after.duration_since(SystemTime::now()).unwrap_or_default();
            let jitter = rand::rng().random_range(0.9..1.1);
            let wait = (remaining / 2).mul_f64(jitter);
            tokio::time::sleep(wait).await;
            loop {
                match self.renew().await {
                    Ok(()) => {
                        self.metrics
                            .svid_renewals
                            .get_or_create(&crate::metrics::OutcomeLabels { outcome: "ok" })
                            .inc();
                        backoff.reset();
                        break;
                    }
                    Err(e) => {
                        self.metrics
                            .svid_renewals
                            .get_or_create(&crate::metrics::OutcomeLabels { outcome: "error" })
                            .inc();
                        let retry_in = backoff.next_delay();
                        tracing::warn!(error = %e, retry_in = %humantime::format_duration(retry_in), "SVID renewal failed; keeping the current SVID");
                        tokio::time::sleep(retry_in).await;
                    }
                }
            }
        }
    }
}
