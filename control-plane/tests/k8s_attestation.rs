//! Kubernetes service-account token attestation end to end: a real control
//! plane (`--k8s-token-issuer`, `--k8s-token-jwks` or
//! `--k8s-token-discovery-url`) and real sidecars whose `--token-file` holds
//! a token in the projected-token format, signed by a test issuer key (RSA
//! from `tests/k8s/`, EC made here). Good tokens give
//! `spiffe://<td>/ns/<namespace>/sa/<sa>`; every bad token is refused with
//! its reason and counted.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::KeyPair;
use serde_json::{json, Value};
use weft_testkit::{bin, free_addr, http_get, ControlPlane};

const TD: &str = "example.org";
const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/k8s").join(name)
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// The claims of a projected token as the API server writes them.
fn claims(namespace: &str, sa: &str) -> Value {
    let now = now();
    json!({
        "aud": ["weft"],
        "exp": now + 3600,
        "iat": now,
        "nbf": now,
        "iss": ISSUER,
        "jti": "6a0f7bba-43a5-4bd8-9d0c-4b6b8f1b7d11",
        "kubernetes.io": {
            "namespace": namespace,
            "node": {"name": "node-a", "uid": "8e4f2b44-8f7a-4e2c-9a83-7f6c2f1b0a01"},
            "pod": {"name": format!("{sa}-5d9c7b8f4-x2x7q"), "uid": "1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f"},
            "serviceaccount": {"name": sa, "uid": "9b8a7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"}
        },
        "sub": format!("system:serviceaccount:{namespace}:{sa}")
    })
}

struct Keys {
    rsa: EncodingKey,
    other_rsa: EncodingKey,
    ec: EncodingKey,
    ec_jwk: Value,
}

fn keys() -> Keys {
    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
    let point = pair.public_key().as_ref();
    let ec_jwk = json!({
        "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": "cluster-key-ec",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
    });
    let rsa = |f: &str| EncodingKey::from_rsa_pem(&std::fs::read(fixture(f)).unwrap()).unwrap();
    Keys {
        rsa: rsa("cluster-rsa.pem"),
        other_rsa: rsa("other-cluster-rsa.pem"),
        ec: EncodingKey::from_ec_der(pkcs8.as_ref()),
        ec_jwk,
    }
}

/// The cluster's JWK Set: the RSA key of the fixture and the EC key.
fn jwks(keys: &Keys) -> Value {
    let mut set: Value = serde_json::from_slice(&std::fs::read(fixture("cluster-jwks.json")).unwrap()).unwrap();
    set["keys"].as_array_mut().unwrap().push(keys.ec_jwk.clone());
    set
}

fn sign(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

/// Runs a sidecar for `service` attesting with `token`: Ok(the SPIFFE ID it
/// was issued) once it is ready (then it is stopped), or Err(its stderr) if
/// it exits.
async fn sidecar(cp: &ControlPlane, service: &str, token: &str) -> Result<String, String> {
    let dir = cp.dir.path().join(format!("sidecar-{}", free_addr().port()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, token).unwrap();
    let admin = free_addr();
    let args: Vec<String> = [
        "--control-plane",
        &cp.addr.to_string(),
        "--trust-bundle",
        cp.trust_bundle().to_str().unwrap(),
        "--token-file",
        token_file.to_str().unwrap(),
        "--state-dir",
        dir.join("state").to_str().unwrap(),
        "--service",
        service,
        "--app",
        &free_addr().to_string(),
        "--inbound",
        &free_addr().to_string(),
        "--outbound",
        &free_addr().to_string(),
        "--admin",
        &admin.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = std::process::Command::new(bin("weft-proxy"))
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A refused token ends the sidecar at once; a good one makes it ready.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut child = out;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            return Err(format!("exit {status}: {err}"));
        }
        if http_get(admin, "/ready").await.is_ok_and(|(s, _)| s == 200) {
            let _ = child.kill();
            let _ = child.wait();
            let pem = std::fs::read_to_string(dir.join("state/svid.pem")).unwrap();
            let der = pem::parse(pem.as_bytes()).unwrap().into_contents();
            return Ok(weft_certs::svid::spiffe_id_of(&der).unwrap().to_string());
        }
        assert!(std::time::Instant::now() < deadline, "sidecar neither ready nor exited");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn refusals(cp: &ControlPlane, reason: &str) -> f64 {
    let (_, text) = http_get(cp.admin, "/metrics").await.unwrap();
    weft_testkit::metric_sum(&text, "weft_control_plane_sa_token_refusals_total", &[&format!("outcome=\"{reason}\"")])
}

#[tokio::test(flavor = "multi_thread")]
async fn projected_tokens_attest_and_bad_tokens_are_refused_with_a_reason() {
    let keys = keys();
    let dir = tempfile::tempdir().unwrap();
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks(&keys).to_string()).unwrap();
    let cp =
        ControlPlane::start(TD, &["--k8s-token-issuer", ISSUER, "--k8s-token-jwks", jwks_file.to_str().unwrap()]).await;

    // RS256 (the API server's default) and ES256 tokens attest.
    let rs = sign(Algorithm::RS256, "cluster-key-1", &keys.rsa, &claims("shop", "web"));
    let web = sidecar(&cp, "web", &rs).await.unwrap_or_else(|e| panic!("RS256 token refused: {e}"));
    assert_eq!(web, "spiffe://example.org/ns/shop/sa/web");
    let es = sign(Algorithm::ES256, "cluster-key-ec", &keys.ec, &claims("payments", "api"));
    let api = sidecar(&cp, "api", &es).await.unwrap_or_else(|e| panic!("ES256 token refused: {e}"));
    assert_eq!(api, "spiffe://example.org/ns/payments/sa/api");
    let (_, text) = http_get(cp.admin, "/metrics").await.unwrap();
    let issued =
        weft_testkit::metric_sum(&text, "weft_control_plane_svids_issued_total", &["outcome=\"k8s_sa_token\""]);
    assert_eq!(issued, 2.0);

    let good = claims("shop", "web");
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = good.clone();
        f(&mut c);
        c
    };
    let alg_none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT","kid":"cluster-key-1"}"#),
        URL_SAFE_NO_PAD.encode(good.to_string())
    );
    let tampered = {
        let parts: Vec<String> = rs.split('.').map(str::to_string).collect();
        let mut c = good.clone();
        c["kubernetes.io"]["namespace"] = json!("kube-system");
        c["sub"] = json!("system:serviceaccount:kube-system:web");
        format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(c.to_string()), parts[2])
    };
    let other_issuer = "https://oidc.other-cluster.example";
    let cases: Vec<(&str, String, &str, &str)> = vec![
        ("alg none", alg_none, "algorithm", "\"none\" is not accepted"),
        (
            "signed by another cluster's key under this cluster's key ID",
            sign(Algorithm::RS256, "cluster-key-1", &keys.other_rsa, &good),
            "signature",
            "signature does not verify",
        ),
        ("claims changed after signing", tampered, "signature", "signature does not verify"),
        (
            "a token from another cluster",
            sign(Algorithm::RS256, "other-key-1", &keys.other_rsa, &with(&|c| c["iss"] = json!(other_issuer))),
            "unknown_key",
            "no key \"other-key-1\"",
        ),
        (
            "wrong audience",
            sign(
                Algorithm::RS256,
                "cluster-key-1",
                &keys.rsa,
                &with(&|c| c["aud"] = json!(["https://kubernetes.default.svc"])),
            ),
            "audience",
            "audience does not include \"weft\"",
        ),
        (
            "wrong issuer",
            sign(Algorithm::RS256, "cluster-key-1", &keys.rsa, &with(&|c| c["iss"] = json!(other_issuer))),
            "issuer",
            "issuer is not",
        ),
        (
            "expired",
            sign(
                Algorithm::RS256,
                "cluster-key-1",
                &keys.rsa,
                &with(&|c| {
                    c["exp"] = json!(now() - 600);
                    c["iat"] = json!(now() - 4200);
                    c["nbf"] = json!(now() - 4200);
                }),
            ),
            "expired",
            "has expired",
        ),
        (
            "a plain JWT without Kubernetes claims",
            sign(
                Algorithm::RS256,
                "cluster-key-1",
                &keys.rsa,
                &with(&|c| {
                    c.as_object_mut().unwrap().remove("kubernetes.io");
                }),
            ),
            "claims",
            "no 'kubernetes.io' claim",
        ),
    ];
    for (what, token, reason, message) in cases {
        let before = refusals(&cp, reason).await;
        let err = match sidecar(&cp, "web", &token).await {
            Ok(_) => panic!("{what}: the token was accepted"),
            Err(e) => e,
        };
        assert!(err.contains("service-account token refused") && err.contains(message), "{what}: {err}");
        assert_eq!(refusals(&cp, reason).await, before + 1.0, "{what}: refusal not counted under {reason:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_without_k8s_attestation_configured_are_refused_clearly() {
    let keys = keys();
    let cp = ControlPlane::start(TD, &[]).await;
    let rs = sign(Algorithm::RS256, "cluster-key-1", &keys.rsa, &claims("shop", "web"));
    let err = sidecar(&cp, "web", &rs).await.expect_err("refused");
    assert!(err.contains("does not accept them") && err.contains("--k8s-token-issuer"), "{err}");
}

/// A tiny HTTPS issuer: OIDC discovery at `/.well-known/openid-configuration`
/// and the JWK Set at `/openid/v1/jwks`, both only with `Authorization:
/// Bearer <bearer>`, as the API server serves them.
async fn oidc_issuer(
    tls: &weft_k8s::tls::WebhookTls,
    bearer: &'static str,
    jwks: std::sync::Arc<std::sync::Mutex<Value>>,
) -> std::net::SocketAddr {
    use rustls_pki_types::pem::PemObject;
    let certs = vec![rustls_pki_types::CertificateDer::from_pem_slice(tls.cert_pem.as_bytes()).unwrap()];
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes()).unwrap();
    let config =
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, jwks) = (acceptor.clone(), jwks.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else { return };
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let jwks = jwks.clone();
                    async move {
                        let authorized = req.headers().get("authorization").and_then(|v| v.to_str().ok())
                            == Some(&format!("Bearer {bearer}"));
                        let (status, body) = match (authorized, req.uri().path()) {
                            (false, _) => (401, "{}".to_string()),
                            (true, "/.well-known/openid-configuration") => (
                                200,
                                json!({
                                    "issuer": ISSUER,
                                    "jwks_uri": format!("https://localhost:{}/openid/v1/jwks", addr.port()),
                                    "response_types_supported": ["id_token"],
                                    "subject_types_supported": ["public"],
                                    "id_token_signing_alg_values_supported": ["RS256", "ES256"],
                                })
                                .to_string(),
                            ),
                            (true, "/openid/v1/jwks") => (200, jwks.lock().unwrap().to_string()),
                            _ => (404, "{}".to_string()),
                        };
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .status(status)
                                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// Keys from the issuer's OIDC discovery document (HTTPS, bearer token),
/// fetched again when a token names a key the control plane has not seen
/// (the issuer rotated its keys).
#[tokio::test(flavor = "multi_thread")]
async fn keys_from_oidc_discovery_follow_key_rotation() {
    let keys = keys();
    let dir = tempfile::tempdir().unwrap();
    let tls = weft_k8s::tls::webhook_tls(&["localhost".into()]).unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &tls.ca_pem).unwrap();
    let bearer = dir.path().join("bearer");
    std::fs::write(&bearer, "reader-token\n").unwrap();
    // At first the issuer publishes only its RSA key.
    let rsa_only: Value = serde_json::from_slice(&std::fs::read(fixture("cluster-jwks.json")).unwrap()).unwrap();
    let served = std::sync::Arc::new(std::sync::Mutex::new(rsa_only));
    let issuer = oidc_issuer(&tls, "reader-token", served.clone()).await;
    let discovery = format!("https://localhost:{}/.well-known/openid-configuration", issuer.port());
    let cp = ControlPlane::start(
        TD,
        &[
            "--k8s-token-issuer",
            ISSUER,
            "--k8s-token-discovery-url",
            &discovery,
            "--k8s-token-ca",
            ca.to_str().unwrap(),
            "--k8s-token-bearer-file",
            bearer.to_str().unwrap(),
        ],
    )
    .await;
    let started = std::time::Instant::now();
    let rs = sign(Algorithm::RS256, "cluster-key-1", &keys.rsa, &claims("shop", "web"));
    assert_eq!(sidecar(&cp, "web", &rs).await.unwrap(), "spiffe://example.org/ns/shop/sa/web");

    // The issuer adds an EC key; once the refresh interval has passed, a
    // token signed with it makes the control plane fetch the keys again.
    served.lock().unwrap()["keys"].as_array_mut().unwrap().push(keys.ec_jwk.clone());
    let es = sign(Algorithm::ES256, "cluster-key-ec", &keys.ec, &claims("shop", "api"));
    let wait = Duration::from_secs(11).saturating_sub(started.elapsed());
    tokio::time::sleep(wait).await;
    assert_eq!(sidecar(&cp, "api", &es).await.unwrap(), "spiffe://example.org/ns/shop/sa/api");
}
