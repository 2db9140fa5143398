//! End-to-end tests of the control plane's identity and admin services,
//! against the real `weft-control-plane` process over real TLS.
//!
//! Every failure case also checks that the control plane keeps serving.

use std::time::{Duration, SystemTime};

use tonic::Code;
use weft_certs::svid::spiffe_id_of;
use weft_certs::{pki, IdMatcher};
use weft_proto::admin::v1::{CreateJoinTokenRequest, StatusRequest};
use weft_proto::identity::v1::{AttestRequest, RenewRequest};
use weft_testkit::{run, within, ControlPlane, Pki};

const TD: &str = "example.org";
const CONTROL_PLANE_BIN: &str = env!("CARGO_BIN_EXE_weft-control-plane");

async fn start(pki: &Pki, extra: &[&str]) -> (ControlPlane, tempfile::TempDir) {
    let state = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start_on(pki, state.path(), extra).await;
    (cp, state)
}

/// A P-256 CSR whose SAN asks for `uri`.
fn csr_asking_for(uri: &str) -> (Vec<u8>, rcgen::KeyPair) {
    let key = weft_certs::ca::generate_key().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    let csr = p.serialize_request(&key).unwrap().der().to_vec();
    (csr, key)
}

fn expect_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, what: &str) -> String {
    match r {
        Ok(v) => panic!("{what}: expected {code:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {s:?}");
            s.message().to_string()
        }
    }
}

/// A failure below gRPC: the TLS handshake or the connection (not a status the service chose).
fn is_transport_error(s: &tonic::Status) -> bool {
    std::error::Error::source(s).is_some_and(|e| e.is::<tonic::transport::Error>())
}

#[tokio::test]
async fn attest_then_renew() {
    let pki = Pki::new(TD);
    let (mut cp, _state) = start(&pki, &[]).await;
    let id = cp.id("/ns/default/sa/web");
    let token = cp.create_token(&id, 600).await;

    let (svid, resp) = cp.attest(&token).await.expect("attest");
    assert_eq!(resp.spiffe_id, id.to_string());
    assert_eq!(resp.cert_chain.len(), 2, "leaf + issuer");
    assert_eq!(spiffe_id_of(&resp.cert_chain[0]).unwrap(), id);
    let issuer = pki::load_authority(pki.path(), None).unwrap();
    assert_eq!(resp.cert_chain[1], issuer.issuer_der().to_vec());
    let bundle: Vec<Vec<u8>> = pki.bundle().roots().iter().map(|c| c.to_vec()).collect();
    assert!(!bundle.is_empty());
    assert_eq!(resp.trust_bundle, bundle, "bundle is trust-bundle.pem");
    assert_eq!(resp.expires_at, svid.expires_unix());
    let life = svid.not_after.duration_since(SystemTime::now()).unwrap();
    assert!(
        life > Duration::from_secs(3000) && life <= Duration::from_secs(3600),
        "default SVID TTL is 1h, got {life:?}"
    );

    // Renew over mTLS with the new SVID: a new leaf with the same ID.
    let (csr, key) = weft_certs::ca::make_csr().unwrap();
    let renewed = within(cp.identity_as(&svid).renew(RenewRequest { csr })).await.expect("renew").into_inner();
    assert_eq!(renewed.spiffe_id, id.to_string());
    assert_eq!(renewed.cert_chain.len(), 2);
    assert_eq!(spiffe_id_of(&renewed.cert_chain[0]).unwrap(), id);
    assert_ne!(renewed.cert_chain[0], resp.cert_chain[0], "a new leaf");
    assert_eq!(renewed.trust_bundle, bundle);
    // ...which is itself good for the next renewal.
    let renewed_svid = weft_testkit::svid_from(&renewed, key.serialize_der());
    let (csr, _) = weft_certs::ca::make_csr().unwrap();
    let again = within(cp.identity_as(&renewed_svid).renew(RenewRequest { csr }))
        .await
        .expect("renew with the renewed SVID")
        .into_inner();
    assert_eq!(spiffe_id_of(&again.cert_chain[0]).unwrap(), id);
    cp.assert_serving().await;
}

#[tokio::test]
async fn csr_cannot_choose_the_spiffe_id() {
    let pki = Pki::new(TD);
    let (mut cp, _state) = start(&pki, &[]).await;
    let id = cp.id("/ns/default/sa/web");
    let operator = pki::operator_id(&cp.trust_domain()).to_string();

    // Attest with a CSR asking for the operator identity.
    let token = cp.create_token(&id, 600).await;
    let (csr, key) = csr_asking_for(&operator);
    let resp =
        within(cp.identity().attest(AttestRequest { join_token: token, csr })).await.expect("attest").into_inner();
    assert_eq!(resp.spiffe_id, id.to_string());
    assert_eq!(spiffe_id_of(&resp.cert_chain[0]).unwrap(), id);

    // Renew likewise: the ID comes from the client certificate only.
    let svid = weft_testkit::svid_from(&resp, key.serialize_der());
    let (csr, _) = csr_asking_for(&operator);
    let renewed = within(cp.identity_as(&svid).renew(RenewRequest { csr })).await.expect("renew").into_inner();
    assert_eq!(spiffe_id_of(&renewed.cert_chain[0]).unwrap(), id);
    cp.assert_serving().await;
}

#[tokio::test]
async fn unknown_token_is_unauthenticated() {
    let pki = Pki::new(TD);
    let (mut cp, _state) = start(&pki, &[]).await;
    let r = cp.attest("weft-jt-0000000000000000").await;
    expect_code(r, Code::Unauthenticated, "unknown token");
    let r = cp.attest("").await;
    expect_code(r, Code::Unauthenticated, "empty token");
    cp.assert_serving().await;
}

#[tokio::test]
async fn used_token_is_permission_denied() {
    let pki = Pki::new(TD);
    let (mut cp, _state) = start(&pki, &[]).await;
    let id = cp.id("/ns/default/sa/web");
    let token = cp.create_token(&id, 600).await;
    cp.attest(&token).await.expect("first use");
    let msg = expect_code(cp.attest(&token).await, Code::PermissionDenied, "second use");
    assert!(msg.contains("used"), "{msg}");
    expect_code(cp.attest(&token).await, Code::PermissionDenied, "third use");
    // Trailing whitespace (as pasted from a terminal) is the same token.
    expect_code(cp.attest(&format!("{token}\n")).await, Code::PermissionDenied, "same token with a newline");
    cp.assert_serving().await;
}

#[tokio::test]
async fn concurrent_attests_with_one_token_yield_one_svid() {
    let pki = Pki::new(TD);
    let (mut cp, _state) = start(&pki, &[]).await;
    let id = cp.id("/ns/default/sa/web");
    let token = cp.create_token(&id, 600).await;
    let attempts = (0..8).map(|_| cp.attest(&token));
    let results = futures::future::join_all(attempts).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "exactly one attest wins: {results:?}");
    for r in results.into_iter().filter_map(Result::err) {
        assert_eq!(r.code(), Code::PermissionDenied, "{r:?}");
    }
    cp.assert_serving().await;
}

#[tokio::test]
async fn expired_token_is_permission_denied() {
    let pki = Pki::new(TD);
    let (mut cp, _state) = start(&pki, &[]).await;
    let id = cp.id("/ns/default/sa/web");
    let token = cp.create_token(&id, 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let msg = expect_code(cp.attest(&token).await, Code::PermissionDenied, "expired");
    assert!(msg.contains("expired"), "{msg}");
    cp.assert_serving().await;
}

#[tokio::test]
async fn bad_csrs_are_invalid_argument_and_keep_the_token() {
    let pki = Pki::new(TD);
    let (mut cp, _state) = start(&pki, &[]).await;
    let id = cp.id("/ns/default/sa/web");
    let token = cp.create_token(&id, 600).await;

    let (good, _) = weft_certs::ca::make_csr().unwrap();
    // The last byte is inside the signature's `s` integer: still DER, wrong signature.
    let mut bad_sig = good.clone();
    *bad_sig.last_mut().unwrap() ^= 0x01;
    let p384 = {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        rcgen::CertificateParams::default().serialize_request(&key).unwrap().der().to_vec()
    };
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("garbage", b"not a CSR at all".to_vec(), "PKCS#10"),
        ("empty", Vec::new(), "PKCS#10"),
        ("corrupted signature", bad_sig, "signature"),
        ("P-384 key", p384, "P-256"),
    ];
    for (what, csr, needle) in &cases {
        let r = within(cp.identity().attest(AttestRequest { join_token: token.clone(), csr: csr.clone() })).await;
        let msg = expect_code(r, Code::InvalidArgument, what);
        assert!(msg.contains(needle), "{what}: {msg}");
    }

    // None of that spent the token.
    let resp = within(cp.identity().attest(AttestRequest { join_token: token.clone(), csr: good }))
        .await
        .expect("the token still works after bad CSRs")
        .into_inner();
    assert_eq!(spiffe_id_of(&resp.cert_chain[0]).unwrap(), id);

    // Renew checks the CSR too.
    let svid = {
        let token = cp.create_token(&id, 600).await;
        cp.attest(&token).await.expect("attest").0
    };
    for (what, csr, needle) in cases {
        let r = within(cp.identity_as(&svid).renew(RenewRequest { csr })).await;
        let msg = expect_code(r, Code::InvalidArgument, &format!("renew, {what}"));
        assert!(msg.contains(needle), "renew, {what}: {msg}");
    }
    cp.assert_serving().await;
}

#[tokio::test]
async fn renew_without_client_certificate_is_unauthenticated() {
    let pki = Pki::new(TD);
    let (mut cp, _state) = start(&pki, &[]).await;
    let (csr, _) = weft_certs::ca::make_csr().unwrap();
    let r = within(cp.identity().renew(RenewRequest { csr })).await;
    expect_code(r, Code::Unauthenticated, "renew without a client SVID");
    cp.assert_serving().await;
}

#[tokio::test]
async fn renew_with_svid_from_another_ca_fails() {
    let pki = Pki::new(TD);
    let other = Pki::new(TD); // same trust domain, different keys
    let (mut cp, _state) = start(&pki, &[]).await;
    let id = cp.id("/ns/default/sa/web");
    let foreign = other.issue_local(&id, Duration::from_secs(3600));
    let (csr, _) = weft_certs::ca::make_csr().unwrap();
    let r = within(cp.identity_as(&foreign).renew(RenewRequest { csr })).await;
    match r {
        Ok(v) => panic!("renew with another CA's SVID succeeded: {v:?}"),
        Err(s) => {
            eprintln!("renew with another CA's SVID: {s:?}");
            assert!(s.code() == Code::Unauthenticated || is_transport_error(&s), "{s:?}");
        }
    }
    assert!(
        cp.wait_for_log("TLS handshake refused").await,
        "the server refused the handshake; log:\n{}",
        cp.log_text()
    );
    // The same, own-CA identity renews fine (so the failure was the CA).
    let own = pki.issue_local(&id, Duration::from_secs(3600));
    let (csr, _) = weft_certs::ca::make_csr().unwrap();
    let renewed = within(cp.identity_as(&own).renew(RenewRequest { csr }))
        .await
        .expect("renew with an SVID of this CA")
        .into_inner();
    assert_eq!(spiffe_id_of(&renewed.cert_chain[0]).unwrap(), id);
    cp.assert_serving().await;
}

#[tokio::test]
async fn renew_with_expired_svid_fails() {
    let pki = Pki::new(TD);
    let (mut cp, _state) = start(&pki, &["--svid-ttl", "2s"]).await;
    let id = cp.id("/ns/default/sa/web");
    let token = cp.create_token(&id, 600).await;
    let (svid, _) = cp.attest(&token).await.expect("attest");
    let life = svid.not_after.duration_since(svid.not_before).unwrap();
    assert!(life <= Duration::from_secs(33), "2s TTL + 30s backdate: {life:?}");

    // While valid it renews...
    let (csr, _) = weft_certs::ca::make_csr().unwrap();
    match within(cp.identity_as(&svid).renew(RenewRequest { csr })).await {
        Ok(_) => {}
        // X.509 times are whole seconds, so a 2s SVID may live just over 1s.
        Err(s) if SystemTime::now() >= svid.not_after => {
            eprintln!("too slow to renew within the SVID's life; control skipped: {s:?}")
        }
        Err(s) => panic!("renew while the SVID is valid: {s:?}"),
    }

    // ...and once expired it does not.
    let wait = svid.not_after.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(1500);
    tokio::time::sleep(wait).await;
    let (csr, _) = weft_certs::ca::make_csr().unwrap();
    let r = within(cp.identity_as(&svid).renew(RenewRequest { csr })).await;
    match r {
        Ok(v) => panic!("renew with an expired SVID succeeded: {v:?}"),
        Err(s) => {
            eprintln!("renew with an expired SVID: {s:?}");
            assert!(s.code() == Code::Unauthenticated || is_transport_error(&s), "{s:?}");
        }
    }
    assert!(
        cp.wait_for_log("TLS handshake refused").await,
        "the server refused the handshake; log:\n{}",
        cp.log_text()
    );
    // The control plane renewed its own short-lived SVID meanwhile and still serves.
    cp.assert_serving().await;
}

#[tokio::test]
async fn admin_calls_require_the_operator() {
    let pki = Pki::new(TD);
    let other = Pki::new(TD);
    let (mut cp, _state) = start(&pki, &[]).await;
    let req = |id: &str| CreateJoinTokenRequest { spiffe_id: id.to_string(), ttl_seconds: 60 };
    let web = cp.id("/ns/default/sa/web").to_string();

    // A workload SVID of this trust domain (as a sidecar would have).
    let token = cp.create_token(&cp.id("/ns/default/sa/web"), 600).await;
    let (workload, _) = cp.attest(&token).await.expect("attest");
    let r = within(cp.admin_as(Some(&workload)).create_join_token(req(&web))).await;
    let msg = expect_code(r, Code::PermissionDenied, "CreateJoinToken as a workload");
    assert!(msg.contains("operator"), "{msg}");
    let r = within(cp.admin_as(Some(&workload)).status(StatusRequest {})).await;
    expect_code(r, Code::PermissionDenied, "Status as a workload");

    // No client certificate at all.
    let r = within(cp.admin_as(None).create_join_token(req(&web))).await;
    expect_code(r, Code::Unauthenticated, "CreateJoinToken without a client SVID");

    // The operator identity, but signed by another CA.
    let forged = other.operator();
    let r = within(cp.admin_as(Some(&forged)).create_join_token(req(&web))).await;
    assert!(r.is_err(), "another CA's operator made a token: {r:?}");

    // The operator's own requests are still validated.
    let op = cp.operator();
    let r = within(cp.admin_as(Some(&op)).create_join_token(req("spiffe://other.org/ns/default/sa/web"))).await;
    expect_code(r, Code::InvalidArgument, "token for another trust domain");
    let r = within(
        cp.admin_as(Some(&op)).create_join_token(CreateJoinTokenRequest { spiffe_id: web.clone(), ttl_seconds: 0 }),
    )
    .await;
    expect_code(r, Code::InvalidArgument, "ttl 0");
    let r = within(cp.admin_as(Some(&op)).create_join_token(req("spiffe://example.org/a//b"))).await;
    expect_code(r, Code::InvalidArgument, "invalid SPIFFE ID");

    let status =
        within(cp.admin_as(Some(&op)).status(StatusRequest {})).await.expect("Status as operator").into_inner();
    assert_eq!(status.trust_domain, TD);
    cp.assert_serving().await;
}

#[tokio::test]
async fn token_store_survives_restart() {
    let pki = Pki::new(TD);
    let state = tempfile::tempdir().unwrap();
    let id = pki.id("/ns/default/sa/web");
    let used_id = pki.id("/ns/default/sa/used");

    let mut cp = ControlPlane::start_on(&pki, state.path(), &[]).await;
    let fresh = cp.create_token(&id, 600).await;
    let used = cp.create_token(&used_id, 600).await;
    cp.attest(&used).await.expect("attest before restart");
    cp.stop();
    assert!(!cp.is_running());

    let store = std::fs::read_to_string(state.path().join("store.json")).expect("store.json");
    assert!(!store.contains(&fresh) && !store.contains(&used), "the store keeps hashes, never tokens");

    let mut cp = ControlPlane::start_on(&pki, state.path(), &[]).await;
    let (svid, _) = cp.attest(&fresh).await.expect("token made before the restart");
    assert_eq!(svid.spiffe_id, id);
    expect_code(cp.attest(&used).await, Code::PermissionDenied, "token used before the restart");
    expect_code(cp.attest(&fresh).await, Code::PermissionDenied, "token used after the restart");
    cp.assert_serving().await;
}

#[tokio::test]
async fn serves_with_the_control_plane_spiffe_id() {
    let pki = Pki::new(TD);
    let (mut cp, _state) = start(&pki, &[]).await;
    let cp_id = pki.control_plane_id();
    assert_eq!(cp_id.to_string(), "spiffe://example.org/weft/control-plane");

    // Look at the certificate the server presents.
    let tls = cp.tls(None, IdMatcher::TrustDomain(cp.trust_domain()));
    let tcp = tokio::net::TcpStream::connect(cp.addr).await.unwrap();
    let conn = within(tokio_rustls::TlsConnector::from(tls).connect(weft_certs::tls::server_name(), tcp))
        .await
        .expect("TLS handshake");
    let (_, session) = conn.get_ref();
    let leaf = &session.peer_certificates().expect("server certificate")[0];
    assert_eq!(spiffe_id_of(leaf).unwrap(), cp_id);
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));
    drop(conn);

    // A client that expects another ID refuses the server.
    let op = cp.operator();
    for want in [pki::operator_id(&cp.trust_domain()), cp.id("/weft/control-plane/x")] {
        let ch = cp.channel(Some(&op), IdMatcher::Exact(want.clone()));
        let r = within(weft_proto::admin::v1::admin_client::AdminClient::new(ch).status(StatusRequest {})).await;
        assert!(r.is_err(), "client expecting {want} accepted the server");
    }
    // A client trusting another CA of the same trust domain refuses it too.
    let other = Pki::new(TD);
    let ch = weft_proto::channel::lazy_channel(
        &cp.addr.to_string(),
        weft_testkit::client_tls(&other.bundle(), None, IdMatcher::Exact(cp_id.clone())),
        weft_certs::tls::server_name(),
    )
    .unwrap();
    let (csr, _) = weft_certs::ca::make_csr().unwrap();
    let r = within(
        weft_proto::identity::v1::identity_client::IdentityClient::new(ch)
            .attest(AttestRequest { join_token: "weft-jt-x".into(), csr }),
    )
    .await;
    assert!(r.is_err(), "client with another bundle accepted the server");

    // The expected ID works.
    let r = within(cp.admin_as(Some(&op)).status(StatusRequest {})).await;
    assert!(r.is_ok(), "{r:?}");
    cp.assert_serving().await;
}

#[tokio::test]
async fn sigterm_stops_cleanly() {
    let pki = Pki::new(TD);
    let (mut cp, _state) = start(&pki, &[]).await;
    cp.assert_serving().await;
    let status = cp.terminate();
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert!(cp.log_text().contains("SIGTERM"), "{}", cp.log_text());
}

/// Runs a control plane that is expected to stop at start-up.
fn run_to_exit(pki: &std::path::Path, state: &std::path::Path) -> weft_testkit::Output {
    run(std::process::Command::new(CONTROL_PLANE_BIN).arg("--pki").arg(pki).arg("--state-dir").arg(state).args([
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ]))
}

#[test]
fn start_fails_without_pki() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_to_exit(&dir.path().join("no-such-pki"), &dir.path().join("state"));
    assert!(!out.status.success(), "started without a PKI");
    assert!(out.stderr.contains(pki::TRUST_BUNDLE), "{}", out.stderr);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

#[test]
fn start_fails_with_another_pkis_issuer_key() {
    let pki = Pki::new(TD);
    let other = Pki::new(TD);
    std::fs::copy(other.path().join(pki::ISSUER_KEY), pki.path().join(pki::ISSUER_KEY)).unwrap();
    let state = tempfile::tempdir().unwrap();
    let out = run_to_exit(pki.path(), state.path());
    assert!(!out.status.success(), "started with a mismatched issuer key");
    assert!(out.stderr.contains(pki::ISSUER_KEY), "{}", out.stderr);
    assert!(out.stderr.contains("does not match"), "{}", out.stderr);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

#[tokio::test]
async fn a_second_control_plane_on_one_state_dir_is_refused() {
    let pki = Pki::new(TD);
    let (mut cp, state) = start(&pki, &[]).await;
    cp.assert_serving().await;
    // Both would accept each join token once: the second stops at start-up.
    let out = run_to_exit(pki.path(), state.path());
    assert!(!out.status.success(), "a second control plane started on the same state dir");
    assert!(out.stderr.contains("in use by another weft process"), "{}", out.stderr);
    assert!(out.stderr.contains(&state.path().display().to_string()), "{}", out.stderr);
    // The first one is unharmed, and once it is gone the directory is free.
    cp.assert_serving().await;
    assert!(cp.terminate().success());
    let mut again = ControlPlane::start_on(&pki, state.path(), &[]).await;
    again.assert_serving().await;
}
