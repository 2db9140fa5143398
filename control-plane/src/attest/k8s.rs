//! Kubernetes service-account token attestation (`--k8s-token-issuer`).
//!
//! A sidecar whose `--token-file` holds a projected service-account token
//! (audience `weft`) sends it where a join token would go; the control plane
//! verifies it ([`weft_k8s::sa_token::verify`]) against the issuer's keys —
//! a JWK Set file (`--k8s-token-jwks`) or the issuer's OIDC discovery
//! document (`--k8s-token-discovery-url`, whose `jwks_uri` is fetched) — and
//! issues `spiffe://<td>/ns/<namespace>/sa/<service-account>`. The keys are
//! fetched again (at most every [`REFRESH_MIN_INTERVAL`]) when a token names
//! a key not yet known, so the issuer's key rotation needs no restart.
//! Refusals are counted by reason (`weft_control_plane_sa_token_refusals`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::JwkSet;
use rustls_pki_types::pem::PemObject;
use tokio::sync::Mutex;
use weft_k8s::sa_token::{self, ServiceAccount, TokenError};

/// Unknown keys trigger a refresh at most this often.
pub const REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(10);
/// How long a key fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The flags of service-account token attestation.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct K8sTokenArgs {
    /// Accept Kubernetes projected service-account tokens (audience weft) from this issuer (`iss`).
    #[arg(long)]
    pub k8s_token_issuer: Option<String>,
    /// The issuer's keys: a JWK Set file (e.g. from `kubectl get --raw /openid/v1/jwks`).
    #[arg(long, requires = "k8s_token_issuer", conflicts_with = "k8s_token_discovery_url")]
    pub k8s_token_jwks: Option<PathBuf>,
    /// The issuer's keys: its OIDC discovery document (https URL), whose jwks_uri is fetched.
    #[arg(long, requires = "k8s_token_issuer")]
    pub k8s_token_discovery_url: Option<String>,
    /// CA certificates (PEM) to verify the discovery and JWKS URLs with.
    #[arg(long, requires = "k8s_token_discovery_url")]
    pub k8s_token_ca: Option<PathBuf>,
    /// A bearer token (file) to send with the discovery and JWKS requests (the API server requires one).
    #[arg(long, requires = "k8s_token_discovery_url")]
    pub k8s_token_bearer_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum K8sTokenError {
    #[error("--k8s-token-issuer needs the issuer's keys: --k8s-token-jwks FILE or --k8s-token-discovery-url URL")]
    NoKeys,
    #[error("--k8s-token-jwks {path}: {reason}")]
    Jwks { path: PathBuf, reason: String },
    #[error("--k8s-token-ca {path}: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error("fetching the service-account issuer's keys from {url}: {reason}")]
    Fetch { url: String, reason: String },
}

enum Source {
    File(PathBuf),
    Discovery { url: String, tls: tokio_rustls::TlsConnector, bearer: Option<PathBuf> },
}

/// Verifies service-account tokens against keys it keeps fresh.
pub struct SaTokenAttestor {
    issuer: String,
    source: Source,
    keys: Mutex<(JwkSet, Instant)>,
}

impl std::fmt::Debug for SaTokenAttestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaTokenAttestor").field("issuer", &self.issuer).finish_non_exhaustive()
    }
}

impl SaTokenAttestor {
    /// Loads the keys once; None without `--k8s-token-issuer`.
    ///
    /// Errors: no key source, or the first load fails (a control plane that
    /// could never verify a token should not start as if it could).
    pub async fn from_args(args: &K8sTokenArgs) -> Result<Option<Arc<Self>>, K8sTokenError> {
        let Some(issuer) = args.k8s_token_issuer.clone() else { return Ok(None) };
        let source = match (&args.k8s_token_jwks, &args.k8s_token_discovery_url) {
            (Some(path), _) => Source::File(path.clone()),
            (None, Some(url)) => {
                let mut roots = rustls::RootCertStore::empty();
                if let Some(ca) = &args.k8s_token_ca {
                    let err = |reason: String| K8sTokenError::Ca { path: ca.clone(), reason };
                    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| err(e.to_string()))? {
                        roots.add(cert.map_err(|e| err(e.to_string()))?).map_err(|e| err(e.to_string()))?;
                    }
                }
                let config =
                    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                        .with_safe_default_protocol_versions()
                        .expect("ring supports the default protocol versions")
                        .with_root_certificates(roots)
                        .with_no_client_auth();
                Source::Discovery {
                    url: url.clone(),
                    tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
                    bearer: args.k8s_token_bearer_file.clone(),
                }
            }
            (None, None) => return Err(K8sTokenError::NoKeys),
        };
        let keys = load(&source).await?;
        tracing::info!(%issuer, keys = keys.keys.len(), "accepting Kubernetes service-account tokens");
        Ok(Some(Arc::new(Self { issuer, source, keys: Mutex::new((keys, Instant::now())) })))
    }

    /// Verifies `token`; a token naming an unknown key refreshes the keys
    /// (rate-limited) and is checked once more.
    pub async fn verify(&self, token: &str) -> Result<ServiceAccount, TokenError> {
        let mut keys = self.keys.lock().await;
        match sa_token::verify(token, &self.issuer, &keys.0) {
            Err(TokenError::UnknownKey(kid)) if keys.1.elapsed() >= REFRESH_MIN_INTERVAL => {
                keys.1 = Instant::now();
                match load(&self.source).await {
                    Ok(fresh) => keys.0 = fresh,
                    Err(e) => {
                        tracing::warn!(error = %e, "refreshing the service-account issuer's keys failed");
                        return Err(TokenError::UnknownKey(kid));
                    }
                }
                sa_token::verify(token, &self.issuer, &keys.0)
            }
            r => r,
        }
    }
}

async fn load(source: &Source) -> Result<JwkSet, K8sTokenError> {
    match source {
        Source::File(path) => {
            let err = |reason: String| K8sTokenError::Jwks { path: path.clone(), reason };
            let bytes = tokio::fs::read(path).await.map_err(|e| err(e.to_string()))?;
            sa_token::parse_jwks(&bytes).map_err(|e| err(e.to_string()))
        }
        Source::Discovery { url, tls, bearer } => {
            let bearer = match bearer {
                Some(path) => Some(
                    tokio::fs::read_to_string(path)
                        .await
                        .map_err(|e| K8sTokenError::Fetch {
                            url: url.clone(),
                            reason: format!("{}: {e}", path.display()),
                        })?
                        .trim()
                        .to_string(),
                ),
                None => None,
            };
            let doc = get_json(url, tls, bearer.as_deref()).await?;
            let jwks_uri = doc.get("jwks_uri").and_then(|v| v.as_str()).ok_or_else(|| K8sTokenError::Fetch {
                url: url.clone(),
                reason: "the discovery document has no jwks_uri".into(),
            })?;
            let jwks = get_json(jwks_uri, tls, bearer.as_deref()).await?;
            serde_json::from_value(jwks)
                .map_err(|e| K8sTokenError::Fetch { url: jwks_uri.into(), reason: format!("not a JWK Set: {e}") })
        }
    }
}

/// `GET url` over HTTPS (HTTP/1.1), expecting 200 and a JSON body.
async fn get_json(
    url: &str,
    tls: &tokio_rustls::TlsConnector,
    bearer: Option<&str>,
) -> Result<serde_json::Value, K8sTokenError> {
    let err = |reason: String| K8sTokenError::Fetch { url: url.to_string(), reason };
    let uri: http::Uri = url.parse().map_err(|e| err(format!("not a URL: {e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(err("only https URLs are fetched".into()));
    }
    let host = uri.host().ok_or_else(|| err("no host".into()))?.to_string();
    let port = uri.port_u16().unwrap_or(443);
    let fetch = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| err(e.to_string()))?;
        let name = rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| err(e.to_string()))?;
        let stream = tls.connect(name, tcp).await.map_err(|e| err(format!("TLS: {e}")))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| err(e.to_string()))?;
        tokio::spawn(conn);
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let mut req =
            http::Request::get(path).header(http::header::HOST, &host).header(http::header::ACCEPT, "application/json");
        if let Some(b) = bearer {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {b}"));
        }
        let req = req.body(Empty::<Bytes>::new()).map_err(|e| err(e.to_string()))?;
        let resp = send.send_request(req).await.map_err(|e| err(e.to_string()))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| err(e.to_string()))?.to_bytes();
        if !status.is_success() {
            return Err(err(format!("HTTP {status}")));
        }
        serde_json::from_slice(&body).map_err(|e| err(format!("not JSON: {e}")))
    };
    tokio::time::timeout(FETCH_TIMEOUT, fetch).await.map_err(|_| err(format!("no answer within {FETCH_TIMEOUT:?}")))?
}
