//! The sidecar injector: a Kubernetes mutating admission webhook over TLS
//! (`--injector-listen`). `POST /inject` takes an `AdmissionReview`
//! (`admission.k8s.io/v1`) and answers with the JSONPatch that applies
//! `weft inject`'s transformation ([`weft_k8s::admission`]).
//!
//! A body that is not an answerable review gets HTTP 400 with the reason, so
//! the API server applies the webhook's `failurePolicy`; an object that
//! cannot be injected (a bad `weft.dev/*` annotation) is denied with the
//! reason; nothing a request carries stops the server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use weft_runtime::drain::Drain;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use weft_k8s::InjectOptions;

/// The API server sends at most 3 MiB objects; leave room for the review around it.
const MAX_BODY: usize = 8 << 20;

/// The injector's flags.
#[derive(clap::Args, Debug, Clone)]
pub struct InjectorArgs {
    /// Serve the sidecar injector (mutating admission webhook, HTTPS) on this address.
    #[arg(long, requires_all = ["injector_cert", "injector_key"])]
    pub injector_listen: Option<SocketAddr>,
    /// The injector's TLS certificate chain (PEM), for the webhook's Service DNS name.
    #[arg(long)]
    pub injector_cert: Option<PathBuf>,
    /// The injector's TLS private key (PEM).
    #[arg(long)]
    pub injector_key: Option<PathBuf>,
    /// The image the injected containers run.
    #[arg(long, default_value_t = InjectOptions::default().image)]
    pub injector_image: String,
    /// The control plane's gRPC address as injected sidecars reach it.
    #[arg(long, default_value_t = InjectOptions::default().control_plane)]
    pub injector_control_plane_address: String,
    /// The UID the injected sidecar runs as (exempt from interception).
    #[arg(long, default_value_t = InjectOptions::default().proxy_uid)]
    pub injector_proxy_uid: u32,
}

impl InjectorArgs {
    fn options(&self) -> InjectOptions {
        InjectOptions {
            image: self.injector_image.clone(),
            control_plane: self.injector_control_plane_address.clone(),
            proxy_uid: self.injector_proxy_uid,
            ..InjectOptions::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InjectorError {
    #[error("--injector-cert {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("--injector-key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("--injector-cert/--injector-key: {0}")]
    Tls(rustls::Error),
    #[error("--injector-listen {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// A started injector.
pub struct Injector {
    pub addr: SocketAddr,
}

impl Injector {
    /// Loads the TLS certificate and key and starts serving; None without `--injector-listen`.
    pub async fn start(args: &InjectorArgs) -> Result<Option<Self>, InjectorError> {
        let Some(listen) = args.injector_listen else { return Ok(None) };
        let (cert_path, key_path) = (
            args.injector_cert.clone().expect("clap requires --injector-cert"),
            args.injector_key.clone().expect("clap requires --injector-key"),
        );
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| InjectorError::Cert { path: cert_path.clone(), reason: e.to_string() })?;
        if certs.is_empty() {
            return Err(InjectorError::Cert { path: cert_path, reason: "holds no PEM certificate".into() });
        }
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| InjectorError::Key { path: key_path.clone(), reason: e.to_string() })?;
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(InjectorError::Tls)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(InjectorError::Tls)?;
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| InjectorError::Bind { addr: listen, source })?;
        let addr = listener.local_addr().map_err(|source| InjectorError::Bind { addr: listen, source })?;
        let opts = Arc::new(args.options());
        // The webhook lives as long as the process; the API server retries on failure.
        tokio::spawn(weft_runtime::serve::serve(listener, Drain::never(), "injector", move |tcp, peer, _| {
            let (acceptor, opts) = (acceptor.clone(), opts.clone());
            async move {
                let tls = match weft_runtime::tls_accept::tls_accept(&acceptor, tcp).await {
                    Ok(accepted) => accepted.stream,
                    Err(e) => {
                        tracing::debug!(%peer, reason = e.reason(), error = %e, "injector: TLS handshake failed");
                        return;
                    }
                };
                let svc = hyper::service::service_fn(move |req| {
                    let opts = opts.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(req, &opts).await) }
                });
                if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await
                {
                    tracing::debug!(%peer, error = %e, "injector: connection ended with an error");
                }
            }
        }));
        tracing::info!(%addr, "sidecar injector (admission webhook) listening");
        Ok(Some(Self { addr }))
    }
}

async fn handle(req: Request<Incoming>, opts: &InjectOptions) -> Response<Full<Bytes>> {
    if req.uri().path() != "/inject" {
        return text(StatusCode::NOT_FOUND, "weft injector: the webhook path is /inject");
    }
    if req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "weft injector: POST an AdmissionReview to /inject");
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return text(StatusCode::BAD_REQUEST, &format!("weft injector: cannot read the body: {e}")),
    };
    match weft_k8s::admission::review(&body, opts) {
        Ok(review) => {
            let allowed = review["response"]["allowed"].as_bool().unwrap_or(true);
            tracing::debug!(uid = %review["response"]["uid"], allowed, "admission review answered");
            Response::builder()
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(serde_json::to_vec(&review).expect("JSON serializes"))))
                .expect("valid response")
        }
        Err(e) => {
            tracing::warn!(error = %e, "injector: unanswerable admission review");
            text(StatusCode::BAD_REQUEST, &format!("weft injector: {e}"))
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid response")
}
