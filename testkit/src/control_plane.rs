//! The control plane under test: [`ControlPlane`] start-up on a given PKI and
//! state directory (ports another process took meanwhile are retried), and
//! gRPC clients for its Identity and Admin services over rustls with SPIFFE
//! verification, as a sidecar or the operator would call them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use tempfile::TempDir;
use tonic::transport::Channel;
use weft_certs::{pki, verify, IdMatcher, SpiffeId, SpiffeVerifier, Svid, SvidResolver, TrustBundle, TrustDomain};
use weft_proto::admin::v1::admin_client::AdminClient;
use weft_proto::admin::v1::CreateJoinTokenRequest;
use weft_proto::identity::v1::identity_client::IdentityClient;
use weft_proto::identity::v1::{AttestRequest, X509SvidResponse};

use crate::{free_addr, http_get, ControlPlane};

/// Upper bound for any single gRPC call or process run in the tests.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a control plane did not become ready, with its log.
struct NotReady(String);

/// A PKI directory made by [`weft_certs::pki::init`] in a temp dir (removed on drop).
pub struct Pki {
    /// Holds the PKI's files ([`weft_certs::pki`]'s file names).
    pub dir: TempDir,
    /// The trust domain the PKI was made for.
    pub td: TrustDomain,
}

impl Pki {
    /// A fresh PKI (trust anchor, issuer, operator certificate) for trust domain `td`.
    pub fn new(td: &str) -> Self {
        let td = TrustDomain::new(td).expect("trust domain");
        let dir = tempfile::tempdir().expect("tempdir");
        pki::init(&td, dir.path(), None, false).expect("pki init");
        Self { dir, td }
    }

    /// The PKI directory, as `--pki` takes it.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The trust bundle (the trust anchor) relying parties load.
    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::load(&self.path().join(pki::TRUST_BUNDLE)).expect("trust bundle")
    }

    /// The operator's SVID, the only identity allowed to call the admin RPCs.
    pub fn operator(&self) -> Svid {
        pki::load_svid(&self.path().join(pki::OPERATOR_CERT), &self.path().join(pki::OPERATOR_KEY))
            .expect("operator SVID")
    }

    /// An SVID for `id` signed directly by this PKI's issuer (not via a control plane).
    pub fn issue_local(&self, id: &SpiffeId, ttl: Duration) -> Svid {
        pki::load_authority(self.path(), None).expect("authority").issue_local(id, ttl).expect("issue_local")
    }

    /// `spiffe://<td><path>`; `path` starts with `/`.
    pub fn id(&self, path: &str) -> SpiffeId {
        self.td.id(path).expect("SPIFFE ID path")
    }

    /// `spiffe://<td>/weft/control-plane`, the ID the control plane serves with.
    pub fn control_plane_id(&self) -> SpiffeId {
        pki::control_plane_id(&self.td)
    }
}

impl ControlPlane {
    /// Starts a control plane on an existing `pki` with its state in
    /// `state_dir` (kept by the caller, so a later one can start on it),
    /// waiting until it is ready. Its log goes to a fresh temp dir.
    pub async fn start_on(pki: &Pki, state_dir: &Path, extra_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let extra_args = extra_args.iter().map(|s| s.to_string()).collect();
        Self::launch(dir, pki.path().to_path_buf(), state_dir.to_path_buf(), extra_args).await
    }

    /// Spawns the control plane on fresh ports and waits until it is ready.
    /// A port picked by [`free_addr`] can still be taken by a process outside
    /// the claim files before the child binds it; then the child exits with
    /// "cannot listen" and another pair of ports is tried.
    pub(crate) async fn launch(
        mut dir: TempDir,
        mut pki: PathBuf,
        mut state: PathBuf,
        mut extra_args: Vec<String>,
    ) -> Self {
        for attempt in 1..=5 {
            let (addr, admin) = (free_addr(), free_addr());
            let proc_ = Self::spawn(dir.path(), &pki, &state, addr, admin, &extra_args);
            let mut cp = Self { dir, pki, state, addr, admin, extra_args, proc_ };
            match cp.wait_ready().await {
                Ok(()) => return cp,
                Err(NotReady(log)) if log.contains("cannot listen") && attempt < 5 => {
                    cp.proc_.kill();
                    (dir, pki, state, extra_args) = (cp.dir, cp.pki, cp.state, cp.extra_args);
                }
                Err(NotReady(log)) => panic!("control plane did not start:\n{log}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Waits until this child says it listens on both of our addresses and
    /// answers /ready; Err(why, with the log) if it exits or takes too long.
    async fn wait_ready(&mut self) -> Result<(), NotReady> {
        let started = Instant::now();
        loop {
            if !self.proc_.running() {
                return Err(NotReady(format!("exited; log:\n{}", self.log_text())));
            }
            if self.bound_both() && matches!(http_get(self.admin, "/ready").await, Ok((200, _))) {
                // Logged, not asserted: timing depends on the machine.
                eprintln!("control plane ready in {:?} (grpc {}, admin {})", started.elapsed(), self.addr, self.admin);
                return Ok(());
            }
            let timeout = crate::ready_timeout();
            if started.elapsed() > timeout {
                return Err(NotReady(format!("not ready after {timeout:?}; log:\n{}", self.log_text())));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the child logged that it listens on our gRPC and admin addresses
    /// (another process may have answered on one of them).
    fn bound_both(&self) -> bool {
        let (grpc, admin) = (self.addr.to_string(), self.admin.to_string());
        self.log_text()
            .lines()
            .any(|l| l.contains("control plane listening") && l.contains(&grpc) && l.contains(&admin))
    }

    /// Everything the process logged so far.
    pub fn log_text(&self) -> String {
        self.proc_.log_text()
    }

    /// Runs the real `weft` CLI with `args` against this control plane
    /// (`--control-plane`, `--pki`; `WEFT_CONTROL_PLANE`, `WEFT_PKI` and
    /// `RUST_LOG` of the test's environment removed).
    pub fn weft(&self, args: &[&str]) -> crate::Output {
        let mut cmd = std::process::Command::new(crate::bin("weft"));
        cmd.args(args)
            .arg("--control-plane")
            .arg(self.addr.to_string())
            .arg("--pki")
            .arg(&self.pki)
            .env_remove("WEFT_CONTROL_PLANE")
            .env_remove("WEFT_PKI")
            .env_remove("RUST_LOG");
        crate::run(&mut cmd)
    }

    /// Waits (up to 5 s) for `needle` to show up in the process's log.
    pub async fn wait_for_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.log_text().contains(needle) {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Kills the process (SIGKILL: nothing gets a chance to flush) and reaps it.
    pub fn stop(&mut self) {
        self.proc_.kill();
    }

    /// Sends SIGTERM and waits up to [`CALL_TIMEOUT`] for the exit status;
    /// panics with the log if it does not exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        match self.proc_.terminate(CALL_TIMEOUT) {
            Some(status) => status,
            None => panic!("no exit {CALL_TIMEOUT:?} after SIGTERM; log:\n{}", self.log_text()),
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.proc_.running()
    }

    /// The control plane's /metrics text (empty if it does not answer).
    pub async fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").await.map(|(_, b)| b).unwrap_or_default()
    }

    /// The trust domain of this control plane's PKI.
    pub fn trust_domain(&self) -> TrustDomain {
        self.operator().spiffe_id.trust_domain().clone()
    }

    /// `spiffe://<td><path>`; `path` starts with `/`.
    pub fn id(&self, path: &str) -> SpiffeId {
        self.trust_domain().id(path).expect("SPIFFE ID path")
    }

    /// The operator's SVID (`weft certs init`'s operator certificate).
    pub fn operator(&self) -> Svid {
        pki::load_svid(&self.pki.join(pki::OPERATOR_CERT), &self.pki.join(pki::OPERATOR_KEY)).expect("operator SVID")
    }

    /// Client TLS config trusting this PKI's bundle; the server must match `server`.
    pub fn tls(&self, client: Option<&Svid>, server: IdMatcher) -> Arc<rustls::ClientConfig> {
        let bundle = TrustBundle::load(&self.trust_bundle()).expect("trust bundle");
        client_tls(&bundle, client, server)
    }

    /// A lazily connecting gRPC channel to the control plane.
    pub fn channel(&self, client: Option<&Svid>, server: IdMatcher) -> Channel {
        let tls = self.tls(client, server);
        weft_proto::channel::lazy_channel(&self.addr.to_string(), tls, weft_certs::tls::server_name()).expect("channel")
    }

    fn cp_matcher(&self) -> IdMatcher {
        IdMatcher::Exact(pki::control_plane_id(&self.trust_domain()))
    }

    /// Identity client over server-authenticated TLS (no client certificate).
    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel(None, self.cp_matcher()))
    }

    /// Identity client over mutual TLS with `svid`.
    pub fn identity_as(&self, svid: &Svid) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel(Some(svid), self.cp_matcher()))
    }

    /// Admin client, over mutual TLS with `svid` if given.
    pub fn admin_as(&self, svid: Option<&Svid>) -> AdminClient<Channel> {
        AdminClient::new(self.channel(svid, self.cp_matcher()))
    }

    /// A join token for `id`, created by the operator over the Admin API.
    pub async fn create_token(&self, id: &SpiffeId, ttl_seconds: u64) -> String {
        let req = CreateJoinTokenRequest { spiffe_id: id.to_string(), ttl_seconds };
        let resp = within(self.admin_as(Some(&self.operator())).create_join_token(req))
            .await
            .unwrap_or_else(|s| panic!("CreateJoinToken as operator: {s:?}"))
            .into_inner();
        assert!(!resp.token.is_empty());
        resp.token
    }

    /// Attests with `token` and a fresh P-256 CSR; the SVID (with its key) and the raw response.
    pub async fn attest(&self, token: &str) -> Result<(Svid, X509SvidResponse), tonic::Status> {
        let (csr, key) = weft_certs::ca::make_csr().expect("make_csr");
        let req = AttestRequest { join_token: token.to_string(), csr };
        let resp = within(self.identity().attest(req)).await?.into_inner();
        Ok((svid_from(&resp, key.serialize_der()), resp))
    }

    /// Asserts the control plane still serves: the operator makes a token and
    /// a workload attests with it.
    pub async fn assert_serving(&mut self) {
        assert!(self.is_running(), "control plane exited; log:\n{}", self.log_text());
        let id = self.id("/ns/health/sa/check");
        let token = self.create_token(&id, 60).await;
        let (svid, _) = self.attest(&token).await.unwrap_or_else(|s| panic!("attest after the failure case: {s:?}"));
        assert_eq!(svid.spiffe_id, id);
    }
}

/// Client TLS config trusting `bundle`, presenting `client` if given; the
/// server's SPIFFE ID must match `server`. ALPN h2, for gRPC.
pub fn client_tls(bundle: &TrustBundle, client: Option<&Svid>, server: IdMatcher) -> Arc<rustls::ClientConfig> {
    let verifier = SpiffeVerifier::new(verify::shared_bundle(bundle.clone()), server);
    let resolver = client.map(|s| SvidResolver::with_svid(s).expect("resolver"));
    Arc::new(weft_certs::tls::client_config(resolver, verifier, &[weft_certs::tls::ALPN_H2]))
}

/// The SVID a response carries, with the key (PKCS#8 DER) its CSR was made from.
pub fn svid_from(resp: &X509SvidResponse, key_pkcs8: Vec<u8>) -> Svid {
    let chain = resp.cert_chain.iter().map(|c| CertificateDer::from(c.clone())).collect();
    Svid::new(chain, key_pkcs8).expect("response chain is an X.509-SVID")
}

/// Runs a future with [`CALL_TIMEOUT`], so a hang fails the test instead of stalling it.
pub async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(CALL_TIMEOUT, f).await.expect("call did not finish in time")
}
