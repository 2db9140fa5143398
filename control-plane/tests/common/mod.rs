//! Shared helpers for the end-to-end tests: a real `weft-control-plane`
//! process on free local ports (killed on drop), a PKI in a temporary
//! directory, and tonic clients over rustls with SPIFFE verification.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use tempfile::TempDir;
use tonic::transport::Channel;
use weft_certs::{pki, verify, IdMatcher, SpiffeId, SpiffeVerifier, Svid, SvidResolver};
use weft_certs::{TrustBundle, TrustDomain};
use weft_proto::admin::v1::admin_client::AdminClient;
use weft_proto::admin::v1::CreateJoinTokenRequest;
use weft_proto::identity::v1::identity_client::IdentityClient;
use weft_proto::identity::v1::{AttestRequest, X509SvidResponse};

pub const CONTROL_PLANE_BIN: &str = env!("CARGO_BIN_EXE_weft-control-plane");

/// How long a control plane may take to become ready (debug build, busy CI).
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound for any single gRPC call or process run in these tests.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// A free port on 127.0.0.1 for the control plane to listen on.
pub fn free_port() -> u16 {
    weft_testkit::free_addr().port()
}

/// A PKI directory made by `weft_certs::pki::init`.
pub struct Pki {
    pub dir: TempDir,
    pub td: TrustDomain,
}

impl Pki {
    pub fn new(td: &str) -> Self {
        let td = TrustDomain::new(td).expect("trust domain");
        let dir = tempfile::tempdir().expect("tempdir");
        pki::init(&td, dir.path(), None, false).expect("pki init");
        Self { dir, td }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::load(&self.path().join(pki::TRUST_BUNDLE)).expect("trust bundle")
    }

    pub fn operator(&self) -> Svid {
        pki::load_svid(&self.path().join(pki::OPERATOR_CERT), &self.path().join(pki::OPERATOR_KEY))
            .expect("operator SVID")
    }

    /// An SVID for `id` signed directly by this PKI's issuer (not via a control plane).
    pub fn issue_local(&self, id: &SpiffeId, ttl: Duration) -> Svid {
        pki::load_authority(self.path(), None).expect("authority").issue_local(id, ttl).expect("issue_local")
    }

    pub fn id(&self, path: &str) -> SpiffeId {
        self.td.id(path).expect("SPIFFE ID path")
    }

    pub fn control_plane_id(&self) -> SpiffeId {
        pki::control_plane_id(&self.td)
    }
}

/// A running `weft-control-plane` child process; killed when dropped.
pub struct ControlPlane {
    child: Option<Child>,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub pki_dir: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    pub td: TrustDomain,
    bundle: TrustBundle,
    operator: Svid,
    _logdir: TempDir,
}

impl ControlPlane {
    /// Starts a control plane for `pki` with a fresh state directory inside `state`.
    pub fn start(pki: &Pki, state_dir: &Path, extra: &[&str]) -> Self {
        // A port picked by free_port can be taken by a parallel test before the
        // child binds it; then the child exits with "cannot listen" and we retry.
        for attempt in 1..=5 {
            match Self::try_start(pki, state_dir, extra) {
                Ok(cp) => return cp,
                Err(log) if log.contains("cannot listen") && attempt < 5 => continue,
                Err(log) => panic!("control plane did not start:\n{log}"),
            }
        }
        unreachable!()
    }

    fn try_start(pki: &Pki, state_dir: &Path, extra: &[&str]) -> Result<Self, String> {
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let logdir = tempfile::tempdir().expect("tempdir");
        let log = logdir.path().join("control-plane.log");
        let logfile = std::fs::File::create(&log).expect("log file");
        let started = Instant::now();
        let child = Command::new(CONTROL_PLANE_BIN)
            .arg("--pki")
            .arg(pki.path())
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--listen")
            .arg(grpc.to_string())
            .arg("--admin")
            .arg(admin.to_string())
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(logfile.try_clone().expect("dup log"))
            .stderr(logfile)
            .spawn()
            .expect("spawn weft-control-plane");
        let mut cp = Self {
            child: Some(child),
            grpc,
            admin,
            pki_dir: pki.path().to_path_buf(),
            state_dir: state_dir.to_path_buf(),
            log,
            td: pki.td.clone(),
            bundle: pki.bundle(),
            operator: pki.operator(),
            _logdir: logdir,
        };
        loop {
            if let Some(status) = cp.child.as_mut().unwrap().try_wait().expect("try_wait") {
                cp.child = None;
                return Err(format!("exited with {status}; log:\n{}", cp.log_text()));
            }
            // Another test's process may have grabbed one of our ports (then
            // ours exits with "cannot listen"), so first make sure that *this*
            // child bound both, then that it says it is ready.
            if cp.bound_both() && http_get(admin, "/ready").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
                // Logged, not asserted: timing depends on the machine.
                eprintln!("control plane ready in {:?} (grpc {grpc}, admin {admin})", started.elapsed());
                return Ok(cp);
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(format!("not ready after {READY_TIMEOUT:?}; log:\n{}", cp.log_text()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the child logged that it listens on our gRPC and admin addresses.
    fn bound_both(&self) -> bool {
        let (grpc, admin) = (self.grpc.to_string(), self.admin.to_string());
        self.log_text()
            .lines()
            .any(|l| l.contains("control plane listening") && l.contains(&grpc) && l.contains(&admin))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (up to 5s) for `needle` to show up in the process's log.
    pub fn wait_for_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if self.log_text().contains(needle) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process (SIGKILL: nothing gets a chance to flush) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM (via kill(1), to this child's pid only) and waits up to
    /// [`CALL_TIMEOUT`] for it to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("control plane is running");
        let sent = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no exit {CALL_TIMEOUT:?} after SIGTERM; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Client TLS config: the server must be this trust domain's control plane.
    pub fn tls(&self, client: Option<&Svid>, server: IdMatcher) -> Arc<rustls::ClientConfig> {
        client_tls(&self.bundle, client, server)
    }

    pub fn channel(&self, client: Option<&Svid>, server: IdMatcher) -> Channel {
        weft_proto::channel::lazy_channel(
            &self.grpc.to_string(),
            self.tls(client, server),
            weft_certs::tls::server_name(),
        )
        .expect("channel")
    }

    fn cp_matcher(&self) -> IdMatcher {
        IdMatcher::Exact(pki::control_plane_id(&self.td))
    }

    /// Identity client over server-authenticated TLS (no client certificate).
    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel(None, self.cp_matcher()))
    }

    /// Identity client over mutual TLS with `svid`.
    pub fn identity_as(&self, svid: &Svid) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel(Some(svid), self.cp_matcher()))
    }

    pub fn admin_as(&self, svid: Option<&Svid>) -> AdminClient<Channel> {
        AdminClient::new(self.channel(svid, self.cp_matcher()))
    }

    pub fn operator(&self) -> &Svid {
        &self.operator
    }

    pub fn id(&self, path: &str) -> SpiffeId {
        self.td.id(path).expect("SPIFFE ID path")
    }

    /// A join token for `id`, created by the operator over the Admin API.
    pub async fn create_token(&self, id: &SpiffeId, ttl_seconds: u64) -> String {
        let resp = within(
            self.admin_as(Some(&self.operator))
                .create_join_token(CreateJoinTokenRequest { spiffe_id: id.to_string(), ttl_seconds }),
        )
        .await
        .unwrap_or_else(|s| panic!("CreateJoinToken as operator: {s:?}"))
        .into_inner();
        assert!(!resp.token.is_empty());
        resp.token
    }

    /// Attest with `token` and a fresh P-256 CSR; returns the SVID (with its key) and the raw response.
    pub async fn attest(&self, token: &str) -> Result<(Svid, X509SvidResponse), tonic::Status> {
        let (csr, key) = weft_certs::ca::make_csr().expect("make_csr");
        let resp =
            within(self.identity().attest(AttestRequest { join_token: token.to_string(), csr })).await?.into_inner();
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

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn client_tls(bundle: &TrustBundle, client: Option<&Svid>, server: IdMatcher) -> Arc<rustls::ClientConfig> {
    let verifier = SpiffeVerifier::new(verify::shared_bundle(bundle.clone()), server);
    let resolver = client.map(|s| SvidResolver::with_svid(s).expect("resolver"));
    Arc::new(weft_certs::tls::client_config(resolver, verifier, &[weft_certs::tls::ALPN_H2]))
}

/// The SVID a response carries, with the key its CSR was made from.
pub fn svid_from(resp: &X509SvidResponse, key_pkcs8: Vec<u8>) -> Svid {
    let chain = resp.cert_chain.iter().map(|c| CertificateDer::from(c.clone())).collect();
    Svid::new(chain, key_pkcs8).expect("response chain is an X.509-SVID")
}

/// Runs a future with [`CALL_TIMEOUT`], so a hang fails the test instead of stalling it.
pub async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(CALL_TIMEOUT, f).await.expect("call did not finish in time")
}

/// `GET path` over plain HTTP/1.1; the raw response, or None if not reachable.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// What a finished process printed.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion (killing it after [`CALL_TIMEOUT`]) and captures its output.
pub fn run(cmd: &mut Command) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let deadline = Instant::now() + CALL_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still running after {CALL_TIMEOUT:?}; stderr:\n{}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: std::fs::read_to_string(&out).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err).unwrap_or_default(),
    }
}
