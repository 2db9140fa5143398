//! The sidecar's identity: attest once with a join token, keep the key and
//! SVID in the state directory, renew over mTLS at half-life with jitter, and
//! swap each new SVID into the TLS resolver without touching open connections.

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
}

/// The sidecar's current SVID and trust bundle, shared with its TLS configs.
pub struct Identity {
    pub resolver: Arc<SvidResolver>,
    pub bundle: SharedBundle,
    current: watch::Sender<Option<Svid>>,
    control_plane: String,
    cp_id: SpiffeId,
    state_dir: PathBuf,
    metrics: Arc<Metrics>,
}

impl Identity {
    pub fn new(
        control_plane: String,
        bootstrap_bundle: TrustBundle,
        cp_id: SpiffeId,
        state_dir: PathBuf,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, IdentityError> {
        std::fs::create_dir_all(&state_dir).map_err(|err| IdentityError::State { path: state_dir.clone(), err })?;
        let bundle = match TrustBundle::load(&state_dir.join(BUNDLE)) {
            Ok(saved) => saved,
            Err(_) => bootstrap_bundle,
        };
        Ok(Arc::new(Self {
            resolver: SvidResolver::new(),
            bundle: weft_certs::verify::shared_bundle(bundle),
            current: watch::channel(None).0,
            control_plane,
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

    pub fn control_plane_channel(&self, with_svid: bool) -> Result<tonic::transport::Channel, IdentityError> {
        weft_proto::channel::lazy_channel(
            &self.control_plane,
            Arc::new(self.control_plane_tls(with_svid)),
            weft_certs::tls::server_name(),
        )
        .map_err(|e| IdentityError::Unreachable(format!("{}: {e}", self.control_plane)))
    }

    /// Gets a first SVID: the saved one (renewed at once if the control plane
    /// answers), else by attesting with the join token.
    pub async fn bootstrap(&self, token_file: Option<&Path>) -> Result<(), IdentityError> {
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
        let mut client = IdentityClient::new(self.control_plane_channel(false)?);
        let resp = client
            .attest(AttestRequest { join_token: token.to_string(), csr })
            .await
            .map_err(|s| self.rpc_error(s))?
            .into_inner();
        let svid = self.accept(resp, key_pair.serialize_der())?;
        tracing::info!(spiffe_id = %svid.spiffe_id, "attested with join token");
        Ok(())
    }

    /// A failed call: the control plane was not reached (transport failures
    /// surface as Unavailable or Unknown), or it answered with a refusal.
    fn rpc_error(&self, s: tonic::Status) -> IdentityError {
        use weft_certs::diagnose::{Client, ControlPlaneError};
        if let Some(e) = ControlPlaneError::from_error(&self.control_plane, Client::Sidecar, &s) {
            return e.into();
        }
        match s.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded => {
                IdentityError::Unreachable(format!("{}: {}", self.control_plane, s.message()))
            }
            code => IdentityError::Refused(format!("{code:?}: {}", s.message())),
        }
    }

    /// Renews over mTLS with the current SVID.
    pub async fn renew(&self) -> Result<(), IdentityError> {
        let (csr, key_pair) = make_csr()?;
        let mut client = IdentityClient::new(self.control_plane_channel(true)?);
        let resp = client.renew(RenewRequest { csr }).await.map_err(|s| self.rpc_error(s))?.into_inner();
        let svid = self.accept(resp, key_pair.serialize_der())?;
        tracing::info!(spiffe_id = %svid.spiffe_id, expires = svid.expires_unix(), "renewed SVID");
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

    /// Renews forever: at half-life ± 10%, and after a failure with capped
    /// exponential backoff while the old SVID keeps serving.
    pub async fn run_renewal(self: Arc<Self>) {
        let mut backoff = Duration::from_secs(1);
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
                        backoff = Duration::from_secs(1);
                        break;
                    }
                    Err(e) => {
                        self.metrics
                            .svid_renewals
                            .get_or_create(&crate::metrics::OutcomeLabels { outcome: "error" })
                            .inc();
                        tracing::warn!(error = %e, retry_in = ?backoff, "SVID renewal failed; keeping the current SVID");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
    }
}
