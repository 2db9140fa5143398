//! End to end: what a sidecar refuses. A running sidecar's inbound port is
//! attacked with real clients (a raw TCP socket, rustls clients with wrong or
//! missing certificates, `openssl s_client` limited to TLS 1.2); each attempt
//! must fail, be counted in `/metrics`, and leave the sidecar serving. And a
//! sidecar must never send a request to an endpoint whose certificate names a
//! different SPIFFE ID than discovery gave for it.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use weft_certs::verify::shared_bundle;
use weft_certs::{pki, IdMatcher, SpiffeId, SpiffeVerifier, Svid, SvidResolver, TrustBundle};
use weft_proto::config::v1::config_client::ConfigClient;
use weft_proto::config::v1::WatchRequest;
use weft_testkit::servers;
use weft_testkit::{http_get_host, metric_sum, wait_metric, ControlPlane, Sidecar, SidecarSpec};

const TD: &str = "example.org";
const HANDSHAKES: &str = "weft_proxy_tls_handshakes_total";
const HOUR: Duration = Duration::from_secs(3600);

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).expect("valid SPIFFE ID")
}

struct Mesh {
    cp: ControlPlane,
    client: Sidecar,
    server: Sidecar,
    _servers: Vec<servers::Server>,
}

/// `web` calls `api` (which fronts an HTTP server answering `api <path>`).
async fn mesh() -> Mesh {
    let cp = ControlPlane::start(TD, &[]).await;
    let api_app = servers::http("api").await;
    let web_app = servers::http("web").await;
    let server = Sidecar::start(&cp, TD, SidecarSpec::new("api", api_app.addr)).await;
    let client = Sidecar::start(&cp, TD, SidecarSpec::new("web", web_app.addr)).await;
    client.wait_endpoints("api", 1, Duration::from_secs(10)).await;
    Mesh { cp, client, server, _servers: vec![api_app, web_app] }
}

fn bundle(cp: &ControlPlane) -> TrustBundle {
    TrustBundle::load(&cp.trust_bundle()).expect("mesh trust bundle")
}

/// A rustls client config that verifies the server against `bundle` and
/// requires exactly `server_id`, presenting `svid` when given.
fn client_tls(bundle: &TrustBundle, server_id: IdMatcher, svid: Option<&Svid>) -> Arc<rustls::ClientConfig> {
    let resolver = svid.map(|s| SvidResolver::with_svid(s).expect("usable SVID"));
    Arc::new(weft_certs::tls::client_config(
        resolver,
        SpiffeVerifier::new(shared_bundle(bundle.clone()), server_id),
        &[weft_certs::tls::ALPN_H2],
    ))
}

/// Connects to a sidecar's inbound port with `tls`, and sends one HTTP/2
/// `GET http://<authority><path>` over it; (status, body) or why it failed.
async fn h2_get(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    authority: &str,
    path: &str,
) -> Result<(u16, String), String> {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        let tls = TlsConnector::from(tls)
            .connect(weft_certs::tls::server_name(), tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let (mut send, conn) =
            hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        let req =
            http::Request::get(format!("http://{authority}{path}")).body(Empty::new()).map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| format!("request: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), attempt).await.map_err(|_| "timed out".to_string())?
}

async fn handshakes(sidecar: &Sidecar, outcome: &str) -> f64 {
    let text = sidecar.metrics().await;
    metric_sum(&text, HANDSHAKES, &["direction=\"inbound\"", &format!("outcome=\"{outcome}\"")])
}

/// Waits until the server sidecar has counted one more inbound handshake with `outcome`.
async fn expect_counted(sidecar: &Sidecar, outcome: &str, before: f64) {
    wait_metric(
        sidecar.admin,
        HANDSHAKES,
        &["direction=\"inbound\"", &format!("outcome=\"{outcome}\"")],
        before + 1.0,
        Duration::from_secs(10),
    )
    .await;
}

/// The mesh still works: a request through both sidecars, and a fresh
/// handshake to the attacked inbound port with a valid SVID.
async fn still_serving(m: &mut Mesh, valid: &Arc<rustls::ClientConfig>, tag: &str) {
    let path = format!("/after-{tag}");
    let (status, body) = http_get_host(m.client.outbound, "api", &path)
        .await
        .unwrap_or_else(|e| panic!("after {tag}: request through the mesh: {e}"));
    assert_eq!((status, body.as_str()), (200, format!("api {path}").as_str()), "after {tag}");
    let ok_before = handshakes(&m.server, "ok").await;
    let direct = h2_get(m.server.inbound, valid.clone(), "api", &path).await;
    assert_eq!(direct, Ok((200, format!("api {path}"))), "after {tag}: a valid client on a fresh connection");
    expect_counted(&m.server, "ok", ok_before).await;
    assert!(m.server.proc_.running(), "after {tag}: sidecar died");
}

/// An SVID for `spiffe://other.org/...` signed by the mesh's own issuer,
/// built directly with rcgen (the Authority refuses to sign outside its
/// trust domain) with exactly the weft leaf profile.
fn foreign_td_svid(cp: &ControlPlane) -> Svid {
    let issuer_pem = std::fs::read_to_string(cp.pki.join(pki::ISSUER_CERT)).unwrap();
    let issuer_key = KeyPair::from_pem(&std::fs::read_to_string(cp.pki.join(pki::ISSUER_KEY)).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&issuer_pem, issuer_key).unwrap();
    let issuer_der =
        weft_certs::bundle::parse_pem_certs(issuer_pem.as_bytes(), &cp.pki.join(pki::ISSUER_CERT)).unwrap().remove(0);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "weft workload");
    let now = SystemTime::now();
    p.not_before = (now - Duration::from_secs(60)).into();
    p.not_after = (now + HOUR).into();
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.subject_alt_names = vec![SanType::URI("spiffe://other.org/ns/x/sa/y".try_into().unwrap())];
    p.use_authority_key_identifier_extension = true;
    let leaf = p.signed_by(&key, &issuer).unwrap();
    let svid =
        Svid::new(vec![leaf.der().clone(), issuer_der], key.serialize_der()).expect("the leaf has the SVID profile");
    assert_eq!(svid.spiffe_id.as_str(), "spiffe://other.org/ns/x/sa/y");
    svid
}

#[tokio::test(flavor = "multi_thread")]
async fn inbound_refuses_and_counts_and_keeps_serving() {
    let mut m = mesh().await;
    let bundle = bundle(&m.cp);
    let api_id = IdMatcher::Exact(id("spiffe://example.org/ns/default/sa/api"));
    let authority = pki::load_authority(&m.cp.pki, None).unwrap();
    let probe = authority.issue_local(&id("spiffe://example.org/ns/default/sa/probe"), HOUR).unwrap();
    let valid = client_tls(&bundle, api_id.clone(), Some(&probe));
    // The positive control: the same client code with a valid SVID gets through.
    still_serving(&mut m, &valid, "start").await;

    // 1. Plaintext HTTP to the mTLS port.
    let before = handshakes(&m.server, "not_tls").await;
    let mut tcp = TcpStream::connect(m.server.inbound).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the sidecar kept a plaintext connection open");
    assert!(!got.starts_with(b"HTTP/"), "plaintext HTTP got an HTTP answer: {:?}", String::from_utf8_lossy(&got));
    expect_counted(&m.server, "not_tls", before).await;
    still_serving(&mut m, &valid, "plaintext").await;

    // 2. TLS without a client certificate.
    let before = handshakes(&m.server, "no_client_certificate").await;
    let no_cert = client_tls(&bundle, api_id.clone(), None);
    let r = h2_get(m.server.inbound, no_cert, "api", "/no-cert").await;
    assert!(r.is_err(), "a client without a certificate got {r:?}");
    expect_counted(&m.server, "no_client_certificate", before).await;
    still_serving(&mut m, &valid, "no-cert").await;

    // 3. A client certificate from another CA of the same trust domain.
    let other_pki = tempfile::tempdir().unwrap();
    let st = std::process::Command::new(weft_testkit::bin("weft"))
        .args(["certs", "init", "--trust-domain", TD, "--out"])
        .arg(other_pki.path().join("pki"))
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let rogue_ca = pki::load_authority(&other_pki.path().join("pki"), None).unwrap();
    let rogue = rogue_ca.issue_local(&id("spiffe://example.org/ns/default/sa/web"), HOUR).unwrap();
    let before = handshakes(&m.server, "bad_certificate").await;
    let r = h2_get(m.server.inbound, client_tls(&bundle, api_id.clone(), Some(&rogue)), "api", "/other-ca").await;
    assert!(r.is_err(), "a certificate from another CA got {r:?}");
    expect_counted(&m.server, "bad_certificate", before).await;
    still_serving(&mut m, &valid, "other-ca").await;

    // 4. A certificate chaining to the mesh's own issuer, but for another trust domain.
    let foreign = foreign_td_svid(&m.cp);
    let before = handshakes(&m.server, "bad_certificate").await;
    let r = h2_get(m.server.inbound, client_tls(&bundle, api_id.clone(), Some(&foreign)), "api", "/other-td").await;
    assert!(r.is_err(), "an SVID of spiffe://other.org got {r:?}");
    expect_counted(&m.server, "bad_certificate", before).await;
    let log = m.server.proc_.log_text();
    assert!(log.contains("spiffe://other.org/ns/x/sa/y"), "the refusal should name the foreign ID; log:\n{log}");
    still_serving(&mut m, &valid, "other-td").await;

    // 5. A TLS 1.2-only client (real openssl).
    let before = handshakes(&m.server, "tls_version").await;
    let mut cmd = tokio::process::Command::new("openssl");
    cmd.args(["s_client", "-tls1_2", "-servername", "weft.mesh", "-connect"])
        .arg(m.server.inbound.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(15), cmd.output())
        .await
        .expect("openssl s_client did not finish")
        .expect("openssl is installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "TLS 1.2 handshake succeeded:\n{stdout}\n{stderr}");
    assert!(
        stderr.contains("alert protocol version") || stderr.contains("protocol version"),
        "expected a protocol_version alert:\n{stdout}\n{stderr}"
    );
    expect_counted(&m.server, "tls_version", before).await;
    still_serving(&mut m, &valid, "tls1.2").await;

    // Nothing refused ever reached the app: only the 12 good requests did
    // (start + 5 cases, each one through the mesh and one direct).
    let text = m.server.metrics().await;
    let app_calls = metric_sum(&text, "weft_proxy_requests_total", &["direction=\"inbound\""]);
    assert_eq!(app_calls, 12.0, "{text}");
}

/// A fake "inbound" that presents an SVID of the mesh, but not the one
/// discovery announces for its address; counts what reaches it.
struct Impostor {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    handshakes: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Impostor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn impostor(svid: &Svid, bundle: &TrustBundle) -> Impostor {
    let td = svid.spiffe_id.trust_domain().clone();
    let tls = weft_certs::tls::server_config(
        SvidResolver::with_svid(svid).unwrap(),
        SpiffeVerifier::new(shared_bundle(bundle.clone()), IdMatcher::TrustDomain(td)),
        &[weft_certs::tls::ALPN_H2],
    );
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let connections = Arc::new(AtomicU64::new(0));
    let handshakes = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let (c, h, r) = (connections.clone(), handshakes.clone(), requests.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                continue;
            };
            c.fetch_add(1, Ordering::SeqCst);
            let (acceptor, h, r) = (acceptor.clone(), h.clone(), r.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                h.fetch_add(1, Ordering::SeqCst);
                let svc = hyper::service::service_fn(move |_req| {
                    r.fetch_add(1, Ordering::SeqCst);
                    async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(
                            b"evil says hello",
                        ))))
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    Impostor { addr, connections, handshakes, requests, task }
}

/// Registers `inbound` as an endpoint of `service` by opening a
/// `Config.Watch` stream with `svid`, as a sidecar would; the registration
/// lives as long as the returned task.
async fn register(cp: &ControlPlane, svid: &Svid, service: &str, inbound: SocketAddr) -> tokio::task::JoinHandle<()> {
    let td = svid.spiffe_id.trust_domain().clone();
    let tls = client_tls(&bundle(cp), IdMatcher::Exact(pki::control_plane_id(&td)), Some(svid));
    let channel = weft_proto::channel::lazy_channel(&cp.addr.to_string(), tls, weft_certs::tls::server_name()).unwrap();
    let mut stream = ConfigClient::new(channel)
        .watch(WatchRequest { service: service.into(), inbound_address: inbound.to_string(), ..Default::default() })
        .await
        .expect("the control plane accepts the registration")
        .into_inner();
    let first = stream.message().await.expect("first snapshot");
    assert!(first.is_some(), "watch stream ended at once");
    tokio::spawn(async move { while let Ok(Some(_)) = stream.message().await {} })
}

#[tokio::test(flavor = "multi_thread")]
async fn no_request_reaches_an_endpoint_with_the_wrong_identity() {
    let cp = ControlPlane::start(TD, &[]).await;
    let bundle = bundle(&cp);
    let authority = pki::load_authority(&cp.pki, None).unwrap();
    let evil = authority.issue_local(&id("spiffe://example.org/ns/default/sa/evil"), HOUR).unwrap();
    let api = authority.issue_local(&id("spiffe://example.org/ns/default/sa/api"), HOUR).unwrap();
    let fake = impostor(&evil, &bundle).await;
    // Discovery now says: service api has an endpoint at fake.addr that is sa/api.
    let registration = register(&cp, &api, "api", fake.addr).await;

    let web_app = servers::http("web").await;
    let client = Sidecar::start(&cp, TD, SidecarSpec::new("web", web_app.addr)).await;
    client.wait_endpoints("api", 1, Duration::from_secs(10)).await;
    let (_, config) = weft_testkit::http_get(client.admin, "/config").await.unwrap();
    assert!(
        config.contains(&fake.addr.to_string()) && config.contains("spiffe://example.org/ns/default/sa/api"),
        "{config}"
    );

    for i in 0..3 {
        let path = format!("/secret-{i}");
        let (status, body) = http_get_host(client.outbound, "api", &path).await.unwrap();
        assert_eq!(status, 502, "{body}");
        assert!(
            body.contains("spiffe://example.org/ns/default/sa/evil"),
            "the 502 should say which ID the peer presented: {body}"
        );
    }
    // The sidecar did dial the impostor, and refused it during the handshake.
    assert!(fake.connections.load(Ordering::SeqCst) >= 1);
    assert_eq!(fake.handshakes.load(Ordering::SeqCst), 0);
    assert_eq!(fake.requests.load(Ordering::SeqCst), 0, "a request reached an endpoint presenting the wrong SPIFFE ID");
    let text = client.metrics().await;
    assert!(metric_sum(&text, HANDSHAKES, &["direction=\"outbound\"", "outcome=\"error\""]) >= 3.0, "{text}");

    // The impostor itself works: a client that accepts any mesh ID reaches it,
    // so the zero above is the sidecar's doing.
    let lax = client_tls(&bundle, IdMatcher::TrustDomain(api.spiffe_id.trust_domain().clone()), Some(&api));
    let r = h2_get(fake.addr, lax, "api", "/control").await;
    assert_eq!(r, Ok((200, "evil says hello".to_string())));
    assert_eq!(fake.requests.load(Ordering::SeqCst), 1);
    registration.abort();
}
