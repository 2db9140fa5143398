//! The SPIFFE Workload API of a real `weft-proxy` process, exercised with
//! clients nobody here wrote: the Python `spiffe` package (PyPI), the Rust
//! `spiffe` crate, and raw gRPC for what those libraries never send.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request};
use weft_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use weft_proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest, X509svidRequest,
};
use weft_testkit::{free_addr, ControlPlane, Sidecar, SidecarSpec};

const TD: &str = "example.org";
const PY_SPIFFE: &str = "spiffe==0.3.2";
/// Bound on every single call or stream message in these tests.
const CALL: Duration = Duration::from_secs(15);

struct Mesh {
    cp: ControlPlane,
    sidecar: Sidecar,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mesh {
    fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    fn spiffe_id(&self) -> String {
        format!("spiffe://{TD}/ns/default/sa/{}", self.sidecar.service)
    }
}

async fn mesh(service: &str, cp_args: &[&str]) -> Mesh {
    let cp = ControlPlane::start(TD, cp_args).await;
    // A directory of its own, with a short path (sun_path holds 108 bytes).
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock");
    let flag = format!("unix://{}", socket.display());
    let sidecar = Sidecar::start(
        &cp,
        TD,
        SidecarSpec { service, app: free_addr(), upstreams: &[], labels: &[], extra_args: &["--workload-api", &flag] },
    )
    .await;
    assert!(socket.exists(), "{} missing; sidecar log:\n{}", socket.display(), sidecar.proc_.log_text());
    Mesh { cp, sidecar, socket, _dir: dir }
}

/// A plain tonic client over the Unix socket (authority `localhost`).
async fn raw_client(socket: &Path) -> SpiffeWorkloadApiClient<Channel> {
    let socket = socket.to_path_buf();
    let channel = Endpoint::try_from("http://localhost")
        .expect("static URI")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .expect("connect to the Workload API socket");
    SpiffeWorkloadApiClient::new(channel)
}

fn with_header<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("workload.spiffe.io", "true".parse().expect("ascii"));
    r
}

async fn bounded<F: std::future::IntoFuture>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(CALL, f).await.unwrap_or_else(|_| panic!("{what}: no answer within {CALL:?}"))
}

fn leaf_of(concatenated_der: &[u8]) -> x509_parser::certificate::X509Certificate<'_> {
    let (_, leaf) = x509_parser::parse_x509_certificate(concatenated_der).expect("leaf is DER X.509");
    leaf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_spiffe_package_fetches_and_validates() {
    let probe = std::process::Command::new("python3").args(["-c", "import spiffe"]).output();
    match probe {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "the Python `spiffe` package is not importable ({}); .ci/run installs it: \
             python3 -m pip install --quiet '{PY_SPIFFE}'",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!("python3 not runnable ({e}); .ci/run installs `{PY_SPIFFE}` for it"),
    }
    let m = mesh("py-app", &[]).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/workload_api_client.py");
    let audience = "weft-test-audience";
    let run = tokio::process::Command::new("python3")
        .arg(&script)
        .args([TD, audience])
        .env("SPIFFE_ENDPOINT_SOCKET", m.endpoint())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("the Python client finished within 90s")
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client failed ({}):\n{stderr}\nstdout:\n{stdout}\nsidecar log:\n{}",
        out.status,
        m.sidecar.proc_.log_text()
    );
    let line = stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let id = m.spiffe_id();
    assert_eq!(v["x509_spiffe_id"], id.as_str(), "{v}");
    assert_eq!(v["x509_chain_len"], 2, "leaf + issuer: {v}");
    assert_eq!(v["x509_key_matches_leaf"], true, "{v}");
    assert_eq!(v["x509_bundle_authorities"], 1, "{v}");
    assert_eq!(v["x509_chain_verifies_to_bundle"], true, "{v}");
    assert_eq!(v["x509_context_svids"], 1, "{v}");
    assert_eq!(v["jwt_spiffe_id"], id.as_str(), "{v}");
    assert_eq!(v["jwt_audience"], serde_json::json!([audience]), "{v}");
    let ttl = v["jwt_ttl"].as_i64().unwrap_or_default();
    assert!((240..=301).contains(&ttl), "default JWT-SVID lifetime is 5 minutes, got {ttl}s: {v}");
    assert_eq!(v["jwt_cached"], true, "a second fetch within half-life reuses the token: {v}");
    assert_eq!(v["jwt_bundle_kids"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["jwt_local_spiffe_id"], id.as_str(), "PyJWT verified the ES256 signature: {v}");
    assert_eq!(v["validated_spiffe_id"], id.as_str(), "{v}");
    let wrong = v["wrong_audience_error"].as_str().unwrap_or_default();
    assert!(wrong.contains("INVALID_ARGUMENT") && wrong.contains("audience"), "{wrong}");
    let bad_sig = v["bad_signature_error"].as_str().unwrap_or_default();
    assert!(bad_sig.contains("INVALID_ARGUMENT") && bad_sig.contains("signature"), "{bad_sig}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_spiffe_crate_fetches_and_validates() {
    let m = mesh("rs-app", &[]).await;
    let id = m.spiffe_id();
    let td = spiffe::TrustDomain::new(TD).expect("trust domain");
    let client = bounded("connect", spiffe::WorkloadApiClient::connect_to(m.endpoint())).await.expect("connect");

    let svid = bounded("fetch_x509_svid", client.fetch_x509_svid()).await.expect("X.509-SVID");
    assert_eq!(svid.spiffe_id().to_string(), id);
    assert_eq!(svid.cert_chain().len(), 2);
    let bundles = bounded("fetch_x509_bundles", client.fetch_x509_bundles()).await.expect("X.509 bundles");
    let bundle = bundles.get(&td).expect("bundle of the trust domain");
    assert_eq!(bundle.authorities().len(), 1);
    let ctx = bounded("fetch_x509_context", client.fetch_x509_context()).await.expect("X.509 context");
    assert_eq!(ctx.svids().len(), 1);

    let jwt = bounded("fetch_jwt_svid", client.fetch_jwt_svid(["svc-a", "svc-b"], None)).await.expect("JWT-SVID");
    assert_eq!(jwt.spiffe_id().to_string(), id);
    let mut aud = jwt.audience().to_vec();
    aud.sort();
    assert_eq!(aud, ["svc-a", "svc-b"]);
    let ok = bounded("validate", client.validate_jwt_token("svc-b", jwt.token())).await.expect("valid for svc-b");
    assert_eq!(ok.spiffe_id().to_string(), id);
    let err = bounded("validate", client.validate_jwt_token("svc-c", jwt.token())).await.expect_err("not for svc-c");
    assert!(err.is_invalid_argument(), "{err}");

    let jwt_bundles = bounded("fetch_jwt_bundles", client.fetch_jwt_bundles()).await.expect("JWT bundles");
    let jb = jwt_bundles.get(&td).expect("JWT bundle of the trust domain");
    assert!(jb.find_jwt_authority(jwt.key_id()).is_some(), "the token's kid is in the JWT bundle");

    let other = spiffe::SpiffeId::new(format!("spiffe://{TD}/ns/default/sa/someone-else")).expect("id");
    let err = bounded("fetch other", client.fetch_jwt_svid(["svc-a"], Some(&other))).await.expect_err("not ours");
    assert!(matches!(err, spiffe::WorkloadApiError::NoIdentityIssued), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_early_cancellation() {
    let m = mesh("raw-app", &[]).await;
    let mode = std::fs::metadata(&m.socket).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "Workload API socket mode");
    let mut c = raw_client(&m.socket).await;

    // No security header, or a wrong value: INVALID_ARGUMENT on every RPC.
    let missing = "security header missing from request";
    let s = bounded("x509", c.fetch_x509svid(X509svidRequest {})).await.expect_err("no header");
    assert_eq!((s.code(), s.message()), (Code::InvalidArgument, missing));
    let s = bounded("x509 bundles", c.fetch_x509_bundles(X509BundlesRequest {})).await.expect_err("no header");
    assert_eq!((s.code(), s.message()), (Code::InvalidArgument, missing));
    let s = bounded("jwt bundles", c.fetch_jwt_bundles(JwtBundlesRequest {})).await.expect_err("no header");
    assert_eq!((s.code(), s.message()), (Code::InvalidArgument, missing));
    let req = JwtsvidRequest { audience: vec!["a".into()], spiffe_id: String::new() };
    let s = bounded("jwt", c.fetch_jwtsvid(req.clone())).await.expect_err("no header");
    assert_eq!((s.code(), s.message()), (Code::InvalidArgument, missing));
    let s = bounded("validate", c.validate_jwtsvid(ValidateJwtsvidRequest { audience: "a".into(), svid: "x".into() }))
        .await
        .expect_err("no header");
    assert_eq!((s.code(), s.message()), (Code::InvalidArgument, missing));
    let mut wrong = Request::new(req.clone());
    wrong.metadata_mut().insert("workload.spiffe.io", "false".parse().expect("ascii"));
    let s = bounded("jwt", c.fetch_jwtsvid(wrong)).await.expect_err("header false");
    assert_eq!(s.code(), Code::InvalidArgument);

    // With the header: argument checks and identity checks.
    let s = bounded("jwt", c.fetch_jwtsvid(with_header(JwtsvidRequest::default()))).await.expect_err("no audience");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let other = JwtsvidRequest { audience: vec!["a".into()], spiffe_id: format!("spiffe://{TD}/ns/default/sa/other") };
    let s = bounded("jwt", c.fetch_jwtsvid(with_header(other))).await.expect_err("someone else's ID");
    assert_eq!((s.code(), s.message()), (Code::PermissionDenied, "no identity issued"));
    let garbage = ValidateJwtsvidRequest { audience: "a".into(), svid: "not.a.jwt".into() };
    let s = bounded("validate", c.validate_jwtsvid(with_header(garbage))).await.expect_err("garbage token");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("malformed"), "{s:?}");
    let jwt = bounded("jwt", c.fetch_jwtsvid(with_header(req))).await.expect("JWT-SVID").into_inner();
    let claims = bounded(
        "validate",
        c.validate_jwtsvid(with_header(ValidateJwtsvidRequest {
            audience: "a".into(),
            svid: jwt.svids[0].svid.clone(),
        })),
    )
    .await
    .expect("valid")
    .into_inner();
    assert_eq!(claims.spiffe_id, m.spiffe_id());
    let fields = claims.claims.expect("claims").fields;
    for name in ["sub", "aud", "exp", "iat"] {
        assert!(fields.contains_key(name), "claim {name} missing: {fields:?}");
    }

    // One-shot clients: take the first message of each stream and hang up.
    for i in 0..20 {
        let mut x509 =
            bounded("x509", c.fetch_x509svid(with_header(X509svidRequest {}))).await.expect("x509").into_inner();
        let first = bounded("x509 msg", x509.message()).await.expect("message").expect("not ended");
        assert_eq!(first.svids[0].spiffe_id, m.spiffe_id(), "round {i}");
        assert!(!first.svids[0].x509_svid_key.is_empty() && !first.svids[0].bundle.is_empty());
        drop(x509);
        let mut b = bounded("bundles", c.fetch_x509_bundles(with_header(X509BundlesRequest {})))
            .await
            .expect("bundles")
            .into_inner();
        let first = bounded("bundles msg", b.message()).await.expect("message").expect("not ended");
        assert!(first.bundles.contains_key(&format!("spiffe://{TD}")), "{:?}", first.bundles.keys());
        drop(b);
        let mut j = bounded("jwt bundles", c.fetch_jwt_bundles(with_header(JwtBundlesRequest {})))
            .await
            .expect("jwt bundles")
            .into_inner();
        let first = bounded("jwt bundles msg", j.message()).await.expect("message").expect("not ended");
        let jwks: serde_json::Value = serde_json::from_slice(&first.bundles[&format!("spiffe://{TD}")]).expect("JSON");
        assert_eq!(jwks["keys"][0]["use"], "jwt-svid", "{jwks}");
        assert_eq!(jwks["keys"][0]["alg"], "ES256", "{jwks}");
        assert_eq!(jwks["spiffe_sequence"], 1, "{jwks}");
    }
    // A stream left open stays open (no clean end while healthy).
    let mut open = bounded("x509", c.fetch_x509svid(with_header(X509svidRequest {}))).await.expect("x509").into_inner();
    bounded("x509 msg", open.message()).await.expect("message").expect("not ended");
    assert!(tokio::time::timeout(Duration::from_secs(1), open.message()).await.is_err(), "nothing more, no end");
    assert!(m.sidecar.metrics().await.contains("svid"), "the sidecar still answers");
    let log = m.sidecar.proc_.log_text();
    assert!(!log.contains("panicked") && !log.contains("ERROR"), "sidecar log:\n{log}");

    // The control plane mints JWT-SVIDs and serves the JWT bundle over mTLS only.
    let bundle = weft_certs::TrustBundle::load(&m.cp.trust_bundle()).expect("bundle");
    let td = weft_certs::TrustDomain::new(TD).expect("td");
    let verifier = weft_certs::SpiffeVerifier::new(
        weft_certs::verify::shared_bundle(bundle),
        weft_certs::IdMatcher::Exact(weft_certs::pki::control_plane_id(&td)),
    );
    let tls = weft_certs::tls::client_config(None, verifier, &[weft_certs::tls::ALPN_H2]);
    let channel =
        weft_proto::channel::lazy_channel(&m.cp.addr.to_string(), Arc::new(tls), weft_certs::tls::server_name())
            .expect("channel");
    let mut cp = weft_proto::identity::v1::identity_client::IdentityClient::new(channel);
    let req = weft_proto::identity::v1::MintJwtSvidRequest { audience: vec!["a".into()] };
    let s = bounded("mint", cp.mint_jwt_svid(req)).await.expect_err("no client SVID");
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let s = bounded("jwt bundle", cp.jwt_bundle(weft_proto::identity::v1::JwtBundleRequest {}))
        .await
        .expect_err("no client SVID");
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let key = m.cp.state.join("jwt-signing-key.pem");
    let mode = std::fs::metadata(&key).expect("JWT signing key in the state dir").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", key.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_stream_delivers_each_rotation() {
    let m = mesh("rotating-app", &["--svid-ttl", "6s"]).await;
    let mut c = raw_client(&m.socket).await;
    let mut stream =
        bounded("x509", c.fetch_x509svid(with_header(X509svidRequest {}))).await.expect("x509").into_inner();
    let first = bounded("first", stream.message()).await.expect("message").expect("not ended");
    // Renewal at half-life (about 3s with jitter): the next one well within 10s.
    let second = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap_or_else(|_| panic!("no rotated SVID within 10s; sidecar log:\n{}", m.sidecar.proc_.log_text()))
        .expect("message")
        .expect("stream still open");
    let (a, b) = (&first.svids[0], &second.svids[0]);
    assert_ne!(a.x509_svid, b.x509_svid, "a new certificate");
    assert_ne!(a.x509_svid_key, b.x509_svid_key, "with a new key");
    assert_eq!(a.spiffe_id, m.spiffe_id());
    assert_eq!(b.spiffe_id, m.spiffe_id());
    let (old, new) = (leaf_of(&a.x509_svid), leaf_of(&b.x509_svid));
    assert!(new.validity().not_after > old.validity().not_after, "the new SVID outlives the old");
    assert_eq!(a.bundle, b.bundle, "same trust bundle");
}
