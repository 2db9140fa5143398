//! The etcd store (`--store etcd://...`): join tokens, the mesh config and the
//! connection to etcd that [`crate::replicas`] uses for registrations. Speaks
//! the etcd v3 gRPC API ([`weft_proto::etcd`]) over one channel that connects
//! to the first member that answers, trying the next one when it fails.
//!
//! Keys (all under `/weft/`):
//! - `/weft/tokens/<sha256 hex>`: a [`TokenRecord`] as JSON, under a lease that
//!   ends a week after the token's expiry;
//! - `/weft/config`: the mesh config's YAML as applied; its `mod_revision` is
//!   the config's revision;
//! - `/weft/jwt-signing-key`: the JWT-SVID signing key (PEM PKCS#8) all
//!   replicas sign with, so a JWT-SVID minted through one verifies with the
//!   bundle of any; the first replica stores its own key there. Whoever can
//!   write to etcd can already mint SVIDs (a token record is enough), so
//!   etcd must be protected (TLS, client certificates) either way;
//! - `/weft/mesh-identity`: a [`MeshIdentity`] as JSON, written by the first
//!   replica (create-if-absent); a replica with another trust domain or CA
//!   refuses to start rather than share this mesh's keys, tokens and discovery;
//! - `/weft/registrations/<replica>/<n>`, `/weft/replicas/<replica>`: see [`crate::replicas`].

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};
use weft_proto::etcd::compare::{CompareResult, CompareTarget, TargetUnion};
use weft_proto::etcd::kv_client::KvClient;
use weft_proto::etcd::lease_client::LeaseClient;
use weft_proto::etcd::request_op::Request as Op;
use weft_proto::etcd::watch_client::WatchClient;
use weft_proto::etcd::{
    Compare, DeleteRangeRequest, KeyValue, LeaseGrantRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};

use super::url::EtcdTls;
use super::{Store, StoreError, TokenRecord};

/// Prefix of every key weft writes.
pub const PREFIX: &str = "/weft/";
/// The mesh config's key.
pub const CONFIG_KEY: &str = "/weft/config";
const TOKENS: &str = "/weft/tokens/";
/// The JWT-SVID signing key every replica signs with (PEM PKCS#8).
pub const JWT_KEY: &str = "/weft/jwt-signing-key";
/// The mesh's identity ([`MeshIdentity`]), written once by the first replica.
pub const IDENTITY_KEY: &str = "/weft/mesh-identity";
/// Spent tokens are kept this long after expiry (so "already used" can be
/// told apart from "unknown"), then etcd drops them with their lease.
const KEEP_SPENT_SECS: i64 = 7 * 86400;
/// Upper bound of one unary call: an etcd that does not answer must not
/// hold an RPC of ours for long.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The end of the key range holding every key that starts with `prefix`
/// (etcd's `range_end`: the prefix with its last byte incremented).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A connection to etcd: the KV, Watch and Lease clients over one channel.
#[derive(Clone)]
pub struct Etcd {
    pub kv: KvClient<Channel>,
    pub watch: WatchClient<Channel>,
    pub lease: LeaseClient<Channel>,
    /// `etcd://...` as configured, for messages.
    pub endpoints: String,
    /// Whether and when etcd answered or failed, as seen by this replica.
    pub reach: Arc<Reachability>,
    /// Set once this replica's [`MeshIdentity`] matched etcd's: until then
    /// every write is refused, so a replica of another mesh changes nothing.
    identity_checked: Arc<AtomicBool>,
}

/// What this replica saw of etcd's answers: whether it ever answered since
/// start-up, and when it last came back after calls failed. The follower
/// holds removals of other replicas' registrations for a grace after a
/// recovery ([`Reachability::removal_hold`]).
#[derive(Debug, Default)]
pub struct Reachability {
    answered: AtomicBool,
    state: Mutex<ReachState>,
}

#[derive(Debug, Default)]
struct ReachState {
    /// A call failed and none succeeded since.
    troubled: bool,
    /// When a call succeeded after failures, last.
    recovered_at: Option<Instant>,
}

impl Reachability {
    fn state(&self) -> std::sync::MutexGuard<'_, ReachState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A call was answered.
    pub fn answered(&self) {
        self.answered.store(true, Ordering::Relaxed);
        let mut s = self.state();
        if s.troubled {
            s.troubled = false;
            s.recovered_at = Some(Instant::now());
        }
    }

    /// A call failed (error or no answer in time).
    pub fn failed(&self) {
        self.state().troubled = true;
    }

    /// Whether etcd ever answered since start-up.
    pub fn ever_answered(&self) -> bool {
        self.answered.load(Ordering::Relaxed)
    }

    /// Until when removals of other replicas' registrations are held
    /// (`grace` after etcd came back; None: not holding). While calls fail,
    /// `grace` from now (it moves on until etcd answers).
    pub fn removal_hold(&self, grace: Duration) -> Option<Instant> {
        let s = self.state();
        let now = Instant::now();
        if s.troubled {
            return Some(now + grace);
        }
        s.recovered_at.map(|at| at + grace).filter(|until| *until > now)
    }
}

/// Who a mesh is: its trust domain and the SHA-256 of its CA certificates
/// (the trust bundle's DER, concatenated), hex. Stored at [`IDENTITY_KEY`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MeshIdentity {
    pub trust_domain: String,
    pub ca_sha256: String,
}

impl MeshIdentity {
    /// The identity of a PKI: `trust_domain` and its bundle's DER certificates.
    pub fn new(trust_domain: &str, bundle_der: &[u8]) -> Self {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(bundle_der);
        Self { trust_domain: trust_domain.to_string(), ca_sha256: digest.iter().map(|b| format!("{b:02x}")).collect() }
    }
}

/// This replica's PKI is not the one of the mesh etcd holds.
#[derive(Debug, thiserror::Error)]
#[error(
    "{endpoints} (key {IDENTITY_KEY}) holds the mesh of trust domain {stored_td} (CA sha256 {stored_ca}), \
     but this replica's --pki is trust domain {ours_td} (CA sha256 {ours_ca}): replicas of one mesh must \
     share one PKI. Start this replica with the same --pki as the others (copy that pki directory), or \
     give this mesh its own etcd (another --store)"
)]
pub struct IdentityMismatch {
    pub endpoints: String,
    pub stored_td: String,
    pub stored_ca: String,
    pub ours_td: String,
    pub ours_ca: String,
}

/// Why etcd could not be set up (at start-up).
#[derive(Debug, thiserror::Error)]
pub enum EtcdSetupError {
    #[error("--store-ca {path}: {reason}")]
    Ca { path: String, reason: String },
    #[error("--store-cert/--store-key: {0}")]
    ClientCert(String),
    #[error("--store-cert and --store-key go together, and need --store-ca")]
    Incomplete,
}

fn tls_config(tls: &EtcdTls) -> Result<Option<Arc<rustls::ClientConfig>>, EtcdSetupError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let Some(ca) = &tls.ca else {
        return if tls.cert.is_some() || tls.key.is_some() { Err(EtcdSetupError::Incomplete) } else { Ok(None) };
    };
    let ca_err = |reason: String| EtcdSetupError::Ca { path: ca.display().to_string(), reason };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| ca_err(e.to_string()))? {
        roots.add(cert.map_err(|e| ca_err(e.to_string()))?).map_err(|e| ca_err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(ca_err("no PEM certificate in it".into()));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| EtcdSetupError::ClientCert(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| EtcdSetupError::ClientCert(format!("{}: {e}", cert.display())))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| EtcdSetupError::ClientCert(format!("{}: {e}", key.display())))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| EtcdSetupError::ClientCert(e.to_string()))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(EtcdSetupError::Incomplete),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Some(Arc::new(config)))
}

impl Etcd {
    /// A lazily connecting client for `endpoints` (`host:port`); connects to
    /// the member after the one that failed last, so a stopped member is
    /// skipped on the next call.
    pub fn connect(endpoints: &[String], tls: &EtcdTls) -> Result<Self, EtcdSetupError> {
        let tls = tls_config(tls)?;
        let members: Arc<Vec<String>> = Arc::new(endpoints.to_vec());
        let next = Arc::new(AtomicUsize::new(0));
        // The URI is not used for connecting (the connector picks a member).
        let endpoint = Endpoint::from_static("http://etcd.invalid")
            .connect_timeout(Duration::from_secs(2))
            .http2_keep_alive_interval(Duration::from_secs(3))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true);
        let connector = tower::service_fn(move |_: Uri| {
            let (members, next, tls) = (members.clone(), next.clone(), tls.clone());
            async move {
                let start = next.load(Ordering::Relaxed);
                let mut last_err = std::io::Error::other("no etcd endpoint");
                for i in 0..members.len() {
                    let idx = (start + i) % members.len();
                    let addr = &members[idx];
                    let tcp = match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await {
                        Ok(Ok(tcp)) => tcp,
                        Ok(Err(e)) => {
                            last_err = std::io::Error::new(e.kind(), format!("{addr}: {e}"));
                            continue;
                        }
                        Err(_) => {
                            last_err = std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{addr}: timed out"));
                            continue;
                        }
                    };
                    tcp.set_nodelay(true)?;
                    // A later reconnect starts with the member after this one:
                    // the connection only breaks when this one failed.
                    next.store(idx + 1, Ordering::Relaxed);
                    let io: Box<dyn Io> = match &tls {
                        None => Box::new(tcp),
                        Some(cfg) => {
                            let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
                            let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
                            let name = rustls_pki_types::ServerName::try_from(host)
                                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                            let tls = tokio_rustls::TlsConnector::from(cfg.clone()).connect(name, tcp).await;
                            Box::new(tls.map_err(|e| tls_hint(addr, e))?)
                        }
                    };
                    return Ok(TokioIo::new(io));
                }
                Err(last_err)
            }
        });
        let channel = endpoint.connect_with_connector_lazy(connector);
        Ok(Self {
            kv: KvClient::new(channel.clone()),
            watch: WatchClient::new(channel.clone()),
            lease: LeaseClient::new(channel),
            endpoints: format!("etcd://{}", endpoints.join(",")),
            reach: Arc::default(),
            identity_checked: Arc::default(),
        })
    }

    /// A failed call as a [`StoreError::Unavailable`] (noted in [`Etcd::reach`]).
    pub fn unavailable(&self, reason: impl std::fmt::Display) -> StoreError {
        self.reach.failed();
        StoreError::Unavailable { endpoints: self.endpoints.clone(), reason: reason.to_string() }
    }

    /// Writes wait until the mesh identity is checked ([`Etcd::claim_identity`]).
    pub(crate) fn writable(&self) -> Result<(), StoreError> {
        if self.identity_checked.load(Ordering::Acquire) {
            return Ok(());
        }
        Err(StoreError::Unavailable {
            endpoints: self.endpoints.clone(),
            reason: "this replica has not yet checked that etcd holds its own mesh (trust domain and CA)".into(),
        })
    }

    /// Records `ours` as the mesh's identity if etcd holds none yet, else
    /// compares it with the stored one; writes are allowed from then on.
    /// Errors: [`ClaimError::Mismatch`] (another mesh: do not start), or
    /// the store being unreachable (try again).
    pub async fn claim_identity(&self, ours: &MeshIdentity) -> Result<(), ClaimError> {
        let value = serde_json::to_vec(ours).expect("serializes");
        let stored = match self.put_if_unchecked(IDENTITY_KEY, value, 0, 0).await {
            Ok(_) => {
                tracing::info!(trust_domain = %ours.trust_domain, ca_sha256 = %ours.ca_sha256, "mesh identity recorded in etcd (first replica)");
                None
            }
            Err(StoreError::Conflict { .. }) => match self.get(IDENTITY_KEY).await? {
                Some(kv) => Some(serde_json::from_slice::<MeshIdentity>(&kv.value).map_err(|e| {
                    ClaimError::Store(StoreError::Backend {
                        path: format!("{}{IDENTITY_KEY}", self.endpoints),
                        reason: format!("unreadable mesh identity: {e}"),
                    })
                })?),
                None => return Err(self.unavailable("the mesh identity vanished between two reads").into()),
            },
            Err(e) => return Err(e.into()),
        };
        if let Some(stored) = stored {
            if &stored != ours {
                return Err(ClaimError::Mismatch(IdentityMismatch {
                    endpoints: self.endpoints.clone(),
                    stored_td: stored.trust_domain,
                    stored_ca: stored.ca_sha256,
                    ours_td: ours.trust_domain.clone(),
                    ours_ca: ours.ca_sha256.clone(),
                }));
            }
        }
        self.identity_checked.store(true, Ordering::Release);
        Ok(())
    }

    /// Runs one unary call with [`CALL_TIMEOUT`].
    pub async fn call<T>(
        &self,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(CALL_TIMEOUT, f).await {
            Ok(Ok(r)) => {
                self.reach.answered();
                Ok(r.into_inner())
            }
            Ok(Err(s)) => Err(self.unavailable(format!("{:?}: {}", s.code(), s.message()))),
            Err(_) => Err(self.unavailable(format!("no answer within {CALL_TIMEOUT:?}"))),
        }
    }

    /// The value of `key` (None: absent).
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let req = RangeRequest { key: key.as_bytes().to_vec(), ..Default::default() };
        Ok(self.call(self.kv.clone().range(req)).await?.kvs.into_iter().next())
    }

    /// Every key under `prefix`, and the store revision they were read at.
    pub async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let req = RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix.as_bytes()),
            ..Default::default()
        };
        let resp = self.call(self.kv.clone().range(req)).await?;
        Ok((resp.kvs, resp.header.map(|h| h.revision).unwrap_or(0)))
    }

    pub async fn put(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<(), StoreError> {
        self.writable()?;
        self.call(self.kv.clone().put(PutRequest { key: key.as_bytes().to_vec(), value, lease })).await.map(|_| ())
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.writable()?;
        let req = DeleteRangeRequest { key: key.as_bytes().to_vec(), ..Default::default() };
        self.call(self.kv.clone().delete_range(req)).await.map(|_| ())
    }

    /// A new lease of `ttl` (whole seconds, at least 1); its ID.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, StoreError> {
        self.writable()?;
        let req = LeaseGrantRequest { ttl: ttl.as_secs().max(1) as i64, id: 0 };
        let resp = self.call(self.lease.clone().lease_grant(req)).await?;
        if !resp.error.is_empty() {
            return Err(self.unavailable(format!("lease grant: {}", resp.error)));
        }
        Ok(resp.id)
    }

    /// Puts `value` at `key` only if the key's `mod_revision` is `expected`
    /// (0: the key does not exist). Ok(new revision) or Err(Conflict).
    pub async fn put_if(&self, key: &str, value: Vec<u8>, lease: i64, expected: i64) -> Result<i64, StoreError> {
        self.writable()?;
        self.put_if_unchecked(key, value, lease, expected).await
    }

    async fn put_if_unchecked(&self, key: &str, value: Vec<u8>, lease: i64, expected: i64) -> Result<i64, StoreError> {
        let compare = Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Mod as i32,
            key: key.as_bytes().to_vec(),
            target_union: Some(TargetUnion::ModRevision(expected)),
        };
        let put =
            RequestOp { request: Some(Op::RequestPut(PutRequest { key: key.as_bytes().to_vec(), value, lease })) };
        let get = RequestOp {
            request: Some(Op::RequestRange(RangeRequest { key: key.as_bytes().to_vec(), ..Default::default() })),
        };
        let req = TxnRequest { compare: vec![compare], success: vec![put], failure: vec![get] };
        let resp = self.call(self.kv.clone().txn(req)).await?;
        if resp.succeeded {
            return Ok(resp.header.map(|h| h.revision).unwrap_or(0));
        }
        let actual = resp
            .responses
            .into_iter()
            .find_map(|r| match r.response {
                Some(weft_proto::etcd::response_op::Response::ResponseRange(r)) => {
                    r.kvs.first().map(|kv| kv.mod_revision)
                }
                _ => None,
            })
            .unwrap_or(0);
        Err(StoreError::Conflict { expected, actual })
    }
}

/// Why [`Etcd::claim_identity`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(transparent)]
    Mismatch(#[from] IdentityMismatch),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A failed TLS handshake with `addr`, with a hint when the member closed
/// the connection at once: what a plaintext etcd does with a ClientHello,
/// with a FIN (end of file) or, when it closes with the hello unread, a
/// reset.
fn tls_hint(addr: &str, e: std::io::Error) -> std::io::Error {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, UnexpectedEof};
    let closed = matches!(e.kind(), UnexpectedEof | ConnectionReset | ConnectionAborted)
        || e.to_string().to_lowercase().contains("eof");
    let hint = if closed {
        " (etcd may be serving plaintext on this port: drop --store-ca/--store-cert/--store-key, \
         or start etcd with --cert-file/--key-file and https:// client URLs)"
    } else {
        ""
    };
    std::io::Error::new(e.kind(), format!("{addr}: TLS handshake: {e}{hint}"))
}

/// Boxed so plaintext and TLS connections are one type for tonic.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// The mesh config as stored: its YAML and the etcd revision that wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredConfig {
    pub yaml: String,
    /// The key's `mod_revision`: grows with every apply, equal on every replica.
    pub revision: i64,
}

/// Join tokens and the mesh config in etcd.
pub struct EtcdStore {
    pub etcd: Etcd,
}

impl EtcdStore {
    /// The stored mesh config, if one was ever applied.
    pub async fn get_config(&self) -> Result<Option<StoredConfig>, StoreError> {
        Ok(self.etcd.get(CONFIG_KEY).await?.map(|kv| StoredConfig {
            yaml: String::from_utf8_lossy(&kv.value).into_owned(),
            revision: kv.mod_revision,
        }))
    }

    /// Writes the mesh config (validated by the caller). `expected`: the
    /// revision it must replace (0: none may exist yet), or None to replace
    /// whatever is there. Returns the new revision.
    pub async fn put_config(&self, yaml: &str, expected: Option<i64>) -> Result<i64, StoreError> {
        match expected {
            Some(rev) => self.etcd.put_if(CONFIG_KEY, yaml.as_bytes().to_vec(), 0, rev).await,
            None => {
                self.etcd.writable()?;
                let req = PutRequest { key: CONFIG_KEY.as_bytes().to_vec(), value: yaml.as_bytes().to_vec(), lease: 0 };
                let resp = self.etcd.call(self.etcd.kv.clone().put(req)).await?;
                Ok(resp.header.map(|h| h.revision).unwrap_or(0))
            }
        }
    }
}

impl EtcdStore {
    /// The replicas' shared JWT-SVID signing key (PEM): `local` is stored
    /// if none is yet (this replica is the first), else the stored one is
    /// returned.
    pub async fn shared_jwt_key(&self, local: &[u8]) -> Result<Vec<u8>, StoreError> {
        match self.etcd.put_if(JWT_KEY, local.to_vec(), 0, 0).await {
            Ok(_) => Ok(local.to_vec()),
            Err(StoreError::Conflict { .. }) => match self.etcd.get(JWT_KEY).await? {
                Some(kv) => Ok(kv.value),
                None => Err(self.etcd.unavailable("the JWT signing key vanished between two reads")),
            },
            Err(e) => Err(e),
        }
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn put_token(&self, rec: TokenRecord) -> Result<(), StoreError> {
        let now = weft_certs::svid::unix_secs(std::time::SystemTime::now());
        let keep = Duration::from_secs((rec.expires_at - now + KEEP_SPENT_SECS).max(1) as u64);
        let lease = self.etcd.grant(keep).await?;
        let value = serde_json::to_vec(&rec).expect("token record serializes");
        // Created once: a (impossible) hash collision must not reset a used token.
        self.etcd.put_if(&format!("{TOKENS}{}", rec.hash), value, lease, 0).await.map(|_| ()).map_err(|e| match e {
            StoreError::Conflict { .. } => {
                StoreError::Backend { path: self.etcd.endpoints.clone(), reason: "token exists".into() }
            }
            e => e,
        })
    }

    /// Reads the token, then marks it used in a transaction that only
    /// succeeds if nobody changed it since the read (compare `mod_revision`):
    /// of concurrent attempts on any replicas exactly one wins.
    async fn consume_token(&self, hash: &str, now: i64) -> Result<TokenRecord, StoreError> {
        let key = format!("{TOKENS}{hash}");
        let kv = self.etcd.get(&key).await?.ok_or(StoreError::UnknownToken)?;
        let mut rec: TokenRecord = serde_json::from_slice(&kv.value).map_err(|e| StoreError::Backend {
            path: format!("{}{key}", self.etcd.endpoints),
            reason: format!("corrupt token record: {e}"),
        })?;
        if rec.used {
            return Err(StoreError::UsedToken);
        }
        if rec.expires_at <= now {
            return Err(StoreError::ExpiredToken);
        }
        rec.used = true;
        let value = serde_json::to_vec(&rec).expect("token record serializes");
        match self.etcd.put_if(&key, value, kv.lease, kv.mod_revision).await {
            Ok(_) => Ok(rec),
            // The only change a token record ever sees is being used.
            Err(StoreError::Conflict { .. }) => Err(StoreError::UsedToken),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{tls_hint, Reachability};
    use std::time::{Duration, Instant};

    /// A member that closes at once, by FIN or by reset (a plaintext etcd
    /// given a ClientHello), gets the plaintext hint; other failures do not.
    #[test]
    fn a_member_closing_the_handshake_hints_at_plaintext() {
        use std::io::{Error, ErrorKind};
        for kind in [ErrorKind::UnexpectedEof, ErrorKind::ConnectionReset, ErrorKind::ConnectionAborted] {
            let e = tls_hint("127.0.0.1:2379", Error::from(kind));
            assert!(e.to_string().contains("may be serving plaintext"), "{kind:?}: {e}");
        }
        let e = tls_hint("127.0.0.1:2379", Error::new(ErrorKind::InvalidData, "invalid peer certificate"));
        assert!(!e.to_string().contains("plaintext"), "{e}");
    }

    #[test]
    fn removals_are_held_while_calls_fail_and_for_the_grace_after() {
        let grace = Duration::from_secs(10);
        let reach = Reachability::default();
        assert!(!reach.ever_answered());
        assert_eq!(reach.removal_hold(grace), None, "nothing failed: no hold");
        reach.answered();
        assert!(reach.ever_answered());
        assert_eq!(reach.removal_hold(grace), None);
        reach.failed();
        let during = reach.removal_hold(grace).expect("held while calls fail");
        assert!(during >= Instant::now() + grace - Duration::from_secs(1));
        reach.answered();
        let after = reach.removal_hold(grace).expect("held for the grace after etcd answered");
        assert!(after > Instant::now() + grace - Duration::from_secs(1));
        assert_eq!(reach.removal_hold(Duration::ZERO), None, "a grace of 0 is over at once");
    }

    #[test]
    fn mesh_identity_is_the_trust_domain_and_the_bundle_digest() {
        let a = super::MeshIdentity::new("example.org", b"der");
        assert_eq!(a.ca_sha256.len(), 64);
        assert_eq!(a, super::MeshIdentity::new("example.org", b"der"));
        assert_ne!(a, super::MeshIdentity::new("other.org", b"der"));
        assert_ne!(a, super::MeshIdentity::new("example.org", b"other der"));
    }

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(super::prefix_end(b"/weft/"), b"/weft0".to_vec());
        assert_eq!(super::prefix_end(b"a\xff"), b"b".to_vec());
    }
}
