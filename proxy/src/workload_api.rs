//! The SPIFFE Workload API (`SpiffeWorkloadAPI`, `workload.proto`) over a
//! Unix socket, so applications beside the sidecar can have their identity
//! with any SPIFFE client library (`SPIFFE_ENDPOINT_SOCKET=unix:///...`).
//!
//! - X.509: the sidecar's own SVID (chain leaf first, PKCS#8 key) and the
//!   trust bundle, streamed again on every rotation.
//! - JWT: JWT-SVIDs minted by the control plane for this sidecar's SPIFFE ID
//!   (over mTLS with the sidecar's SVID), cached per audience set until half
//!   their lifetime; the JWT bundle (JWK Set) fetched from the control plane,
//!   kept in the state directory, and used to validate tokens locally.
//!
//! Every call needs the metadata `workload.spiffe.io: true` (a guard against
//! server-side request forgery), else INVALID_ARGUMENT. Before the first SVID
//! calls get UNAVAILABLE. There is no per-caller attestation: anyone who can
//! open the socket gets this workload's identity, so the socket is 0600 (the
//! application must run as the sidecar's user).
//!
//! Any `:authority` is accepted ([`authority`]: gRPC C-core clients such as
//! Python's `grpcio` send the socket path, which HTTP/2 servers in Rust would
//! otherwise refuse).

mod authority;

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::Stream;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::StreamExt as _;
use tonic::{Request, Response, Status};
use weft_certs::jwt::{JwtBundle, JwtError};
use weft_certs::{SpiffeId, Svid, TrustBundle, TrustDomain};
use weft_proto::identity::v1::identity_client::IdentityClient;
use weft_proto::identity::v1::{JwtBundleRequest, MintJwtSvidRequest};
use weft_proto::workload::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use weft_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest, X509svidResponse,
};

use crate::identity::{Identity, IdentityError};

/// The request metadata every Workload API call must carry.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";
/// The JWT bundle as last fetched, in the state directory (public data).
const JWT_BUNDLE_FILE: &str = "jwt-bundle.json";
/// How often the JWT bundle is fetched again without a reason.
const JWT_BUNDLE_REFRESH: Duration = Duration::from_secs(300);
/// An unknown `kid` refetches the bundle at most this often.
const UNKNOWN_KID_REFETCH: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Cached JWT-SVIDs (distinct audience sets) kept at most.
const MAX_CACHED_JWTS: usize = 256;
const CONTROL_PLANE_TIMEOUT: Duration = Duration::from_secs(10);

/// Parses `--workload-api`: `unix:///abs/path`, `unix:/abs/path` or `/abs/path`.
pub fn parse_socket_addr(s: &str) -> Result<PathBuf, String> {
    let path = if let Some(rest) = s.strip_prefix("unix://") {
        if !rest.starts_with('/') {
            return Err(format!("{s:?}: a unix:// address has no host; write unix:///absolute/path"));
        }
        rest
    } else if let Some(rest) = s.strip_prefix("unix:") {
        rest
    } else if s.starts_with('/') {
        s
    } else {
        return Err(format!("{s:?}: expected unix:///absolute/path/to/socket (only Unix sockets are served)"));
    };
    if !path.starts_with('/') || path.len() < 2 {
        return Err(format!("{s:?}: the socket path must be absolute"));
    }
    if path.contains(['?', '#']) {
        return Err(format!("{s:?}: the socket address may not have a query or fragment"));
    }
    Ok(PathBuf::from(path))
}

/// Binds the socket with mode 0600: removes a stale socket left by an earlier
/// run (refusing when a live server still answers on it, or when the path is
/// not a socket), binds under a temporary name, restricts it, then renames it
/// into place, so nobody can connect while it is still world-accessible.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::io::{Error, ErrorKind};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::new(ErrorKind::AddrInUse, "another process serves this socket"));
            }
            std::fs::remove_file(path)?;
            tracing::info!(path = %path.display(), "removed a stale Workload API socket");
        }
        Ok(_) => return Err(Error::new(ErrorKind::AlreadyExists, "exists and is not a socket; not removing it")),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let tmp = path.with_file_name(format!(".weft-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    // A temporary name can be too long for sun_path where the real one fits:
    // then bind in place and restrict right after.
    let (listener, at) = match UnixListener::bind(&tmp) {
        Ok(l) => (l, tmp.as_path()),
        Err(_) => (UnixListener::bind(path)?, path),
    };
    std::fs::set_permissions(at, std::fs::Permissions::from_mode(0o600))?;
    if at != path {
        std::fs::rename(at, path)?;
    }
    Ok(listener)
}

fn security_header(req: Request<()>) -> Result<Request<()>, Status> {
    match req.metadata().get(SECURITY_HEADER) {
        Some(v) if v == "true" => Ok(req),
        _ => Err(Status::invalid_argument("security header missing from request")),
    }
}

/// The Workload API service of one sidecar.
#[derive(Clone)]
pub struct WorkloadApi {
    identity: Arc<Identity>,
    trust_domain: TrustDomain,
    started: Arc<AtomicBool>,
    jwt: Arc<JwtState>,
}

struct CachedJwt {
    spiffe_id: SpiffeId,
    token: String,
    refresh_at: SystemTime,
}

/// JWT-SVIDs and the JWT bundle, both from the control plane.
struct JwtState {
    identity: Arc<Identity>,
    trust_domain: TrustDomain,
    channel: tonic::transport::Channel,
    bundle: watch::Sender<Option<Vec<u8>>>,
    bundle_path: PathBuf,
    cache: Mutex<HashMap<Vec<String>, CachedJwt>>,
    last_kid_refetch: Mutex<Option<Instant>>,
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn cp_status(s: Status) -> Status {
    match s.code() {
        tonic::Code::InvalidArgument => Status::invalid_argument(s.message().to_string()),
        code => Status::unavailable(format!("control plane: {code:?}: {}", s.message())),
    }
}

impl JwtState {
    async fn fetch_bundle(&self) -> Result<Vec<u8>, Status> {
        let mut req = Request::new(JwtBundleRequest {});
        req.set_timeout(CONTROL_PLANE_TIMEOUT);
        let jwks =
            IdentityClient::new(self.channel.clone()).jwt_bundle(req).await.map_err(cp_status)?.into_inner().jwks;
        JwtBundle::parse(self.trust_domain.clone(), &jwks)
            .map_err(|e| Status::unavailable(format!("control plane sent {e}")))?;
        let changed = self.bundle.send_if_modified(|cur| {
            if cur.as_deref() == Some(jwks.as_slice()) {
                return false;
            }
            *cur = Some(jwks.clone());
            true
        });
        if changed {
            tracing::info!("JWT bundle updated");
            if let Err(e) = weft_certs::pki::write_file(&self.bundle_path, &jwks, false) {
                tracing::warn!(error = %e, "could not keep the JWT bundle in the state directory");
            }
        }
        Ok(jwks)
    }

    /// The current JWT bundle, fetched now when there is none yet.
    async fn bundle(&self) -> Result<Vec<u8>, Status> {
        if let Some(b) = self.bundle.borrow().clone() {
            return Ok(b);
        }
        self.fetch_bundle().await.map_err(|e| Status::unavailable(format!("no JWT bundle yet: {}", e.message())))
    }

    /// Keeps the JWT bundle fresh: after every SVID change and every
    /// [`JWT_BUNDLE_REFRESH`], with capped backoff after failures.
    async fn run_refresh(self: Arc<Self>) {
        let mut svids = self.identity.subscribe();
        let mut backoff = Duration::from_secs(1);
        loop {
            if svids.borrow_and_update().is_none() {
                if svids.changed().await.is_err() {
                    return;
                }
                continue;
            }
            let wait = match self.fetch_bundle().await {
                Ok(_) => {
                    backoff = Duration::from_secs(1);
                    JWT_BUNDLE_REFRESH
                }
                Err(e) => {
                    tracing::warn!(error = %e.message(), retry_in = %humantime::format_duration(backoff), "fetching the JWT bundle failed");
                    let w = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    w
                }
            };
            tokio::select! {
                r = svids.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn jwt_svid(&self, id: &SpiffeId, mut audience: Vec<String>) -> Result<String, Status> {
        audience.sort();
        audience.dedup();
        let now = SystemTime::now();
        if let Some(c) = self.cache.lock().expect("jwt cache lock").get(&audience) {
            if &c.spiffe_id == id && now < c.refresh_at {
                return Ok(c.token.clone());
            }
        }
        let mut req = Request::new(MintJwtSvidRequest { audience: audience.clone() });
        req.set_timeout(CONTROL_PLANE_TIMEOUT);
        let resp = IdentityClient::new(self.channel.clone()).mint_jwt_svid(req).await.map_err(cp_status)?.into_inner();
        let now_secs = weft_certs::svid::unix_secs(now);
        let half_life = Duration::from_secs((resp.expires_at - now_secs).max(0) as u64 / 2);
        let mut cache = self.cache.lock().expect("jwt cache lock");
        cache.retain(|_, c| c.refresh_at > now);
        if cache.len() >= MAX_CACHED_JWTS {
            cache.clear();
        }
        cache.insert(
            audience,
            CachedJwt { spiffe_id: id.clone(), token: resp.token.clone(), refresh_at: now + half_life },
        );
        Ok(resp.token)
    }

    async fn validate(&self, token: &str, audience: &str) -> Result<weft_certs::jwt::ValidatedJwt, Status> {
        let jwks = self.bundle().await?;
        let check = |jwks: &[u8]| {
            JwtBundle::parse(self.trust_domain.clone(), jwks)
                .and_then(|b| b.validate(token, audience, SystemTime::now()))
        };
        match check(&jwks) {
            Err(JwtError::UnknownKey(..)) if self.may_refetch_for_kid() => {
                // Perhaps a key the control plane added since the last fetch.
                let jwks = self.fetch_bundle().await?;
                check(&jwks)
            }
            r => r,
        }
        .map_err(|e| Status::invalid_argument(e.to_string()))
    }

    fn may_refetch_for_kid(&self) -> bool {
        let mut last = self.last_kid_refetch.lock().expect("kid refetch lock");
        if last.is_some_and(|t| t.elapsed() < UNKNOWN_KID_REFETCH) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

fn concat_der<'a>(certs: impl IntoIterator<Item = &'a rustls_pki_types::CertificateDer<'static>>) -> Vec<u8> {
    certs.into_iter().flat_map(|c| c.iter().copied()).collect()
}

fn x509_response(svid: &Svid, bundle: &TrustBundle) -> X509svidResponse {
    X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: svid.spiffe_id.to_string(),
            x509_svid: concat_der(&svid.chain),
            x509_svid_key: svid.key_pkcs8.clone(),
            bundle: bundle.concat_der(),
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: HashMap::new(),
    }
}

fn to_value(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(prost_types::NullValue::NullValue as i32),
        J::Bool(b) => Kind::BoolValue(*b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => Kind::StringValue(s.clone()),
        J::Array(a) => Kind::ListValue(prost_types::ListValue { values: a.iter().map(to_value).collect() }),
        J::Object(m) => Kind::StructValue(to_struct(m)),
    };
    prost_types::Value { kind: Some(kind) }
}

fn to_struct(m: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct { fields: m.iter().map(|(k, v)| (k.clone(), to_value(v))).collect() }
}

impl WorkloadApi {
    /// The service for `identity`; `state_dir` keeps the JWT bundle.
    pub fn new(identity: Arc<Identity>, trust_domain: TrustDomain, state_dir: &Path) -> Result<Self, IdentityError> {
        let bundle_path = state_dir.join(JWT_BUNDLE_FILE);
        let saved = std::fs::read(&bundle_path).ok().filter(|b| JwtBundle::parse(trust_domain.clone(), b).is_ok());
        // Lazy: connects on first use, with the SVID current at each handshake.
        let channel = identity.control_plane_channel(true)?;
        let jwt = Arc::new(JwtState {
            identity: identity.clone(),
            trust_domain: trust_domain.clone(),
            channel,
            bundle: watch::channel(saved).0,
            bundle_path,
            cache: Mutex::new(HashMap::new()),
            last_kid_refetch: Mutex::new(None),
        });
        Ok(Self { identity, trust_domain, started: Arc::new(AtomicBool::new(false)), jwt })
    }

    /// Called once the sidecar's identity bootstrap has finished: from then
    /// on, having no SVID is PERMISSION_DENIED rather than UNAVAILABLE.
    pub fn set_started(&self) {
        self.started.store(true, Ordering::Release);
    }

    /// Serves on `listener` until the process ends; also keeps the JWT
    /// bundle fresh.
    pub async fn serve(self, listener: UnixListener) {
        tokio::spawn(self.jwt.clone().run_refresh());
        let svc = SpiffeWorkloadApiServer::with_interceptor(self, security_header);
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(UnixListenerStream::new(listener).map(|c| c.map(authority::FixAuthority::new)))
            .await
        {
            tracing::error!(error = %e, "Workload API server stopped");
        }
    }

    #[allow(clippy::result_large_err)]
    fn svid(&self) -> Result<Svid, Status> {
        match self.identity.current() {
            Some(s) => Ok(s),
            None if self.started.load(Ordering::Acquire) => Err(Status::permission_denied("no identity issued")),
            None => Err(Status::unavailable("starting up: no SVID yet")),
        }
    }

    fn td_key(&self) -> String {
        self.trust_domain.id_string()
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    async fn fetch_jwtsvid(&self, req: Request<JwtsvidRequest>) -> Result<Response<JwtsvidResponse>, Status> {
        let req = req.into_inner();
        if req.audience.is_empty() || req.audience.iter().any(|a| a.is_empty()) {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let svid = self.svid()?;
        if !req.spiffe_id.is_empty() {
            let want = SpiffeId::parse(&req.spiffe_id)
                .map_err(|e| Status::invalid_argument(format!("spiffe_id {:?}: {e}", req.spiffe_id)))?;
            if want != svid.spiffe_id {
                return Err(Status::permission_denied("no identity issued"));
            }
        }
        let token = self.jwt.jwt_svid(&svid.spiffe_id, req.audience).await?;
        tracing::debug!(spiffe_id = %svid.spiffe_id, "Workload API: JWT-SVID");
        Ok(Response::new(JwtsvidResponse {
            svids: vec![Jwtsvid { spiffe_id: svid.spiffe_id.to_string(), svid: token, hint: String::new() }],
        }))
    }

    type FetchJWTBundlesStream = ResponseStream<JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        _req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.svid()?;
        let mut rx = self.jwt.bundle.subscribe();
        let first = self.jwt.bundle().await?;
        let key = self.td_key();
        let stream = async_stream::stream! {
            let mut last = first.clone();
            yield Ok(JwtBundlesResponse { bundles: HashMap::from([(key.clone(), first)]) });
            loop {
                if rx.changed().await.is_err() {
                    yield Err(Status::unavailable("the sidecar is shutting down"));
                    break;
                }
                let Some(jwks) = rx.borrow_and_update().clone() else { continue };
                if jwks != last {
                    last = jwks.clone();
                    yield Ok(JwtBundlesResponse { bundles: HashMap::from([(key.clone(), jwks)]) });
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        let req = req.into_inner();
        if req.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if req.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        self.svid()?;
        let v = self.jwt.validate(&req.svid, &req.audience).await?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: v.spiffe_id.to_string(),
            claims: Some(to_struct(&v.claims)),
        }))
    }

    type FetchX509SVIDStream = ResponseStream<X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        _req: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        self.svid()?;
        let mut rx = self.identity.subscribe();
        let identity = self.identity.clone();
        let stream = async_stream::stream! {
            let mut last_leaf = None;
            loop {
                let current = rx.borrow_and_update().clone();
                if let Some(svid) = current {
                    if last_leaf.as_ref() != svid.chain.first() {
                        last_leaf = svid.chain.first().cloned();
                        // The bundle is swapped before the SVID is announced.
                        yield Ok(x509_response(&svid, identity.bundle.load().bundle()));
                    }
                }
                if rx.changed().await.is_err() {
                    yield Err(Status::unavailable("the sidecar is shutting down"));
                    break;
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    type FetchX509BundlesStream = ResponseStream<X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        _req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.svid()?;
        let mut rx = self.identity.subscribe();
        let identity = self.identity.clone();
        let key = self.td_key();
        let stream = async_stream::stream! {
            let mut last = None;
            loop {
                rx.borrow_and_update();
                let der = identity.bundle.load().bundle().concat_der();
                if last.as_ref() != Some(&der) {
                    last = Some(der.clone());
                    yield Ok(X509BundlesResponse { crl: Vec::new(), bundles: HashMap::from([(key.clone(), der)]) });
                }
                if rx.changed().await.is_err() {
                    yield Err(Status::unavailable("the sidecar is shutting down"));
                    break;
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses() {
        assert_eq!(parse_socket_addr("unix:///run/weft/agent.sock").unwrap(), PathBuf::from("/run/weft/agent.sock"));
        assert_eq!(parse_socket_addr("unix:/run/agent.sock").unwrap(), PathBuf::from("/run/agent.sock"));
        assert_eq!(parse_socket_addr("/run/agent.sock").unwrap(), PathBuf::from("/run/agent.sock"));
        for bad in
            ["unix://host/run/a.sock", "tcp://127.0.0.1:8081", "agent.sock", "unix:relative", "unix:///", "unix:///a?b"]
        {
            assert!(parse_socket_addr(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn bind_replaces_a_stale_socket_and_is_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("agent.sock");
        let first = bind(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // A live server is not pushed aside.
        let err = bind(&path).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
        drop(first);
        // Its socket file, once nobody listens, is stale and replaced.
        let _second = bind(&path).unwrap();
        assert!(tokio::net::UnixStream::connect(&path).await.is_ok());
        // A regular file is never removed.
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert_eq!(bind(&file).unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }

    #[test]
    fn claims_become_a_struct() {
        let claims =
            serde_json::json!({"sub": "spiffe://td/a", "aud": ["x", "y"], "exp": 5, "n": null, "o": {"b": true}});
        let s = to_struct(claims.as_object().unwrap());
        use prost_types::value::Kind;
        assert_eq!(s.fields["sub"].kind, Some(Kind::StringValue("spiffe://td/a".into())));
        assert_eq!(s.fields["exp"].kind, Some(Kind::NumberValue(5.0)));
        let Some(Kind::ListValue(l)) = &s.fields["aud"].kind else { panic!("aud not a list") };
        assert_eq!(l.values.len(), 2);
        let Some(Kind::StructValue(o)) = &s.fields["o"].kind else { panic!("o not a struct") };
        assert_eq!(o.fields["b"].kind, Some(Kind::BoolValue(true)));
    }
}
