//! Real TLS 1.3 handshakes over loopback TCP between weft's own rustls
//! configs: `tls::{server_config, client_config}` with `SvidResolver` and
//! `SpiffeVerifier`. Each case asserts what both ends saw: a success exchanges
//! bytes both ways, a refusal names the rustls error of the refusing side.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber,
};
use rustls::client::Resumption;
use rustls::{CertificateError, ClientConfig, HandshakeKind, ServerConfig};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_rustls::{client, TlsAcceptor, TlsConnector};
use weft_certs::ca::{self, PemPair, DEFAULT_SVID_TTL};
use weft_certs::svid::spiffe_id_of;
use weft_certs::tls::{client_config, server_config, server_name, ALPN_H2};
use weft_certs::verify::{shared_bundle, Anchors, PeerRejected};
use weft_certs::{
    Authority, IdMatcher, SharedBundle, SpiffeId, SpiffeVerifier, Svid, SvidResolver, TrustBundle, TrustDomain,
};

const LIMIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- PKI helpers

/// A trust anchor + issuer of one trust domain, and the authority signing with it.
struct Pki {
    issuer: PemPair,
    anchor_pem: String,
    authority: Authority,
}

impl Pki {
    fn new(td: &str) -> Self {
        let td = TrustDomain::new(td).unwrap();
        let anchor = ca::make_trust_anchor(&td, Duration::from_secs(86400)).unwrap();
        let issuer = ca::make_issuer(&td, &anchor, Duration::from_secs(86400)).unwrap();
        let issuer_der = der_of(&issuer.cert_pem);
        let authority = Authority::new(td, issuer_der, &issuer.key_pem, bundle_of(&[&anchor])).unwrap();
        Self { issuer, anchor_pem: anchor.cert_pem, authority }
    }

    fn svid(&self, id: &str) -> Svid {
        self.authority.issue_local(&SpiffeId::parse(id).unwrap(), DEFAULT_SVID_TTL).unwrap()
    }

    fn bundle(&self) -> TrustBundle {
        self.authority.bundle().clone()
    }

    /// An X.509-SVID with the weft leaf profile whose validity ended an hour
    /// ago, signed by this PKI's issuer with rcgen directly (the authority
    /// refuses to make such a thing).
    fn expired_svid(&self, id: &str) -> Svid {
        let issuer =
            Issuer::from_ca_cert_pem(&self.issuer.cert_pem, KeyPair::from_pem(&self.issuer.key_pem).unwrap()).unwrap();
        let key = ca::generate_key().unwrap();
        let now = SystemTime::now();
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "expired workload");
        p.distinguished_name = dn;
        p.not_before = (now - Duration::from_secs(7200)).into();
        p.not_after = (now - Duration::from_secs(3600)).into();
        p.serial_number = Some(SerialNumber::from_slice(&[0x42; 16]));
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        p.use_authority_key_identifier_extension = true;
        let leaf = p.signed_by(&key, &issuer).unwrap();
        let chain = vec![leaf.der().clone(), der_of(&self.issuer.cert_pem)];
        let svid = Svid::new(chain, key.serialize_der()).unwrap();
        assert!(svid.not_after < now, "test SVID must really be expired");
        svid
    }
}

fn der_of(pem: &str) -> CertificateDer<'static> {
    weft_certs::bundle::parse_pem_certs(pem.as_bytes(), Path::new("test")).unwrap().remove(0)
}

fn bundle_of(anchors: &[&PemPair]) -> TrustBundle {
    let pem: String = anchors.iter().map(|a| a.cert_pem.as_str()).collect();
    TrustBundle::from_pem(pem.as_bytes(), Path::new("bundle")).unwrap()
}

fn bundle_pems(pems: &[&str]) -> TrustBundle {
    TrustBundle::from_pem(pems.concat().as_bytes(), Path::new("bundle")).unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).unwrap()
}

const WEB: &str = "spiffe://example.org/ns/default/sa/web";
const DB: &str = "spiffe://example.org/ns/default/sa/db";

// --------------------------------------------------------- TLS test harness

/// What the server saw of one accepted connection.
#[derive(Debug)]
struct ServerSeen {
    client_leaf: Option<CertificateDer<'static>>,
    client_id: Option<SpiffeId>,
    kind: Option<HandshakeKind>,
}

/// A TLS echo server on 127.0.0.1: reports each handshake's outcome on a
/// channel, then echoes bytes back until the client closes.
struct EchoServer {
    addr: std::net::SocketAddr,
    seen: mpsc::UnboundedReceiver<io::Result<ServerSeen>>,
}

impl EchoServer {
    async fn start(cfg: ServerConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(cfg));
        let (tx, seen) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut tls = match acceptor.accept(tcp).await {
                        Ok(tls) => tls,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let (_, conn) = tls.get_ref();
                    let client_leaf = conn.peer_certificates().and_then(|c| c.first()).map(|c| c.clone().into_owned());
                    let client_id =
                        client_leaf.as_ref().map(|leaf| spiffe_id_of(leaf).expect("verified peer has a SPIFFE ID"));
                    let kind = conn.handshake_kind();
                    let _ = tx.send(Ok(ServerSeen { client_leaf, client_id, kind }));
                    let mut buf = [0u8; 1024];
                    loop {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if tls.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                                let _ = tls.flush().await;
                            }
                        }
                    }
                });
            }
        });
        Self { addr, seen }
    }

    /// The outcome of the next accepted handshake.
    async fn next(&mut self) -> io::Result<ServerSeen> {
        timeout(LIMIT, self.seen.recv()).await.expect("server saw no handshake in time").expect("server task ended")
    }
}

type ClientStream = client::TlsStream<TcpStream>;

async fn connect(addr: std::net::SocketAddr, cfg: &Arc<ClientConfig>) -> io::Result<ClientStream> {
    let tcp = TcpStream::connect(addr).await?;
    timeout(LIMIT, TlsConnector::from(cfg.clone()).connect(server_name(), tcp))
        .await
        .expect("client handshake timed out")
}

/// Sends `msg` and reads the echo; checks the bytes came back unchanged.
async fn ping(stream: &mut ClientStream, msg: &[u8]) -> io::Result<()> {
    timeout(LIMIT, async {
        stream.write_all(msg).await?;
        stream.flush().await?;
        let mut back = vec![0u8; msg.len()];
        stream.read_exact(&mut back).await?;
        assert_eq!(back, msg, "echo returned different bytes");
        Ok(())
    })
    .await
    .expect("echo timed out")
}

/// Connects and exchanges bytes; the stream on success.
async fn talk(addr: std::net::SocketAddr, cfg: &Arc<ClientConfig>) -> io::Result<ClientStream> {
    let mut s = connect(addr, cfg).await?;
    ping(&mut s, b"hello over mTLS").await?;
    ping(&mut s, &[0u8, 1, 2, 3, 255]).await?;
    Ok(s)
}

fn server_leaf(s: &ClientStream) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().expect("server presented certificates")[0].clone().into_owned()
}

/// The rustls error inside an io::Error from tokio-rustls.
fn tls_error(e: &io::Error) -> &rustls::Error {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a TLS error: {e:?}"))
}

/// The `PeerRejected` reason a `SpiffeVerifier` put into the error.
fn rejection(e: &io::Error) -> &PeerRejected {
    match tls_error(e) {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
            other.0.downcast_ref::<PeerRejected>().unwrap_or_else(|| panic!("not a SPIFFE rejection: {e:?}"))
        }
        other => panic!("expected a SPIFFE rejection, got {other:?}"),
    }
}

/// Asserts the peer's chain did not lead to a trusted anchor. Every weft CA
/// has the same subject names, so webpki pairs a foreign issuer with our
/// anchor by name and reports `BadSignature`; with distinct names it would
/// report `UnknownIssuer`. Either is a refusal of the chain itself.
fn assert_untrusted_chain(e: &io::Error) {
    assert!(
        matches!(cert_error(e), CertificateError::UnknownIssuer | CertificateError::BadSignature),
        "expected an untrusted-chain error, got {e:?}"
    );
}

fn cert_error(e: &io::Error) -> &CertificateError {
    match tls_error(e) {
        rustls::Error::InvalidCertificate(ce) => ce,
        other => panic!("expected an invalid-certificate error, got {other:?}"),
    }
}

/// The client could not finish talking: TLS 1.3 clients finish their
/// handshake before the server checks their certificate, so a refusal shows
/// up either at connect or at the first read (the server's alert).
async fn assert_client_cut_off(addr: std::net::SocketAddr, cfg: &Arc<ClientConfig>) {
    match talk(addr, cfg).await {
        Ok(_) => panic!("client exchanged bytes with a server that should have refused it"),
        Err(e) => {
            // An alert from the server, or the connection closing under us.
            let ok = matches!(
                e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
                Some(rustls::Error::AlertReceived(_))
            ) || matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            );
            assert!(ok, "unexpected client error: {e:?}");
        }
    }
}

fn verifier(bundle: &SharedBundle, m: IdMatcher) -> SpiffeVerifier {
    SpiffeVerifier::new(bundle.clone(), m)
}

fn server_cfg(svid: &Svid, bundle: &SharedBundle, m: IdMatcher) -> ServerConfig {
    server_config(SvidResolver::with_svid(svid).unwrap(), verifier(bundle, m), &[ALPN_H2])
}

/// weft's client config, with TLS session resumption turned off so that every
/// handshake below is a full one and really runs the verifiers. The configs as
/// shipped resume sessions; `resumption_*` tests at the end cover that.
fn client_cfg(svid: Option<&Svid>, bundle: &SharedBundle, m: IdMatcher) -> Arc<ClientConfig> {
    let mut cfg = shipped_client_cfg(svid, bundle, m);
    cfg.resumption = Resumption::disabled();
    Arc::new(cfg)
}

/// `tls::client_config` exactly as the proxy gets it.
fn shipped_client_cfg(svid: Option<&Svid>, bundle: &SharedBundle, m: IdMatcher) -> ClientConfig {
    client_config(svid.map(|s| SvidResolver::with_svid(s).unwrap()), verifier(bundle, m), &[ALPN_H2])
}

// ------------------------------------------------------------------- cases

#[tokio::test]
async fn mutual_tls_succeeds_and_server_reads_client_id() {
    let pki = Pki::new("example.org");
    let bundle = shared_bundle(pki.bundle());
    let server_svid = pki.svid(WEB);
    let client_svid = pki.svid(DB);
    let mut server =
        EchoServer::start(server_cfg(&server_svid, &bundle, IdMatcher::TrustDomain(td("example.org")))).await;
    let client = client_cfg(Some(&client_svid), &bundle, IdMatcher::Exact(id(WEB)));

    let stream = talk(server.addr, &client).await.expect("mTLS handshake");
    let seen = server.next().await.expect("server accepted");
    assert_eq!(seen.client_id, Some(id(DB)));
    assert_eq!(seen.client_leaf.as_ref(), Some(&client_svid.chain[0]));
    // The client saw the server's SVID, leaf first, with the issuer after it.
    let (_, conn) = stream.get_ref();
    let chain = conn.peer_certificates().unwrap();
    assert_eq!(chain, server_svid.chain.as_slice());
    assert_eq!(spiffe_id_of(&chain[0]).unwrap(), id(WEB));
    assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
    assert_eq!(conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
}

#[tokio::test]
async fn client_refuses_impostor_server() {
    let pki = Pki::new("example.org");
    let bundle = shared_bundle(pki.bundle());
    // A perfectly valid SVID of the same trust domain, but not the ID asked for.
    let mut server =
        EchoServer::start(server_cfg(&pki.svid(WEB), &bundle, IdMatcher::TrustDomain(td("example.org")))).await;
    let client = client_cfg(Some(&pki.svid(DB)), &bundle, IdMatcher::Exact(id(DB)));

    let err = talk(server.addr, &client).await.expect_err("impostor accepted");
    match rejection(&err) {
        PeerRejected::WrongId { got, .. } => assert_eq!(got, &id(WEB)),
        other => panic!("expected WrongId, got {other:?}"),
    }
    let server_err = server.next().await.expect_err("server should see the client abort");
    assert!(matches!(tls_error(&server_err), rustls::Error::AlertReceived(_)), "{server_err:?}");

    // Control: the same client asking for the right ID gets through.
    let honest = client_cfg(Some(&pki.svid(DB)), &bundle, IdMatcher::Exact(id(WEB)));
    talk(server.addr, &honest).await.expect("right ID accepted");
    server.next().await.unwrap();
}

#[tokio::test]
async fn server_refuses_client_from_another_ca_of_same_trust_domain() {
    let ours = Pki::new("example.org");
    let rogue = Pki::new("example.org");
    let server_bundle = shared_bundle(ours.bundle());
    // The client trusts both CAs, so only the server's check can stop it.
    let client_bundle = shared_bundle(bundle_pems(&[&ours.anchor_pem, &rogue.anchor_pem]));
    let mut server =
        EchoServer::start(server_cfg(&ours.svid(WEB), &server_bundle, IdMatcher::TrustDomain(td("example.org")))).await;
    let client = client_cfg(Some(&rogue.svid(DB)), &client_bundle, IdMatcher::Exact(id(WEB)));

    assert_client_cut_off(server.addr, &client).await;
    let err = server.next().await.expect_err("rogue CA accepted");
    assert_untrusted_chain(&err);
}

#[tokio::test]
async fn server_refuses_valid_svid_of_another_trust_domain() {
    let ours = Pki::new("example.org");
    let theirs = Pki::new("other.org");
    // The server trusts both trust domains' anchors: the chain validates, and
    // the trust-domain matcher alone must refuse.
    let bundle = shared_bundle(bundle_pems(&[&ours.anchor_pem, &theirs.anchor_pem]));
    let mut server =
        EchoServer::start(server_cfg(&ours.svid(WEB), &bundle, IdMatcher::TrustDomain(td("example.org")))).await;
    let foreign = theirs.svid("spiffe://other.org/ns/default/sa/db");
    let client = client_cfg(Some(&foreign), &bundle, IdMatcher::Exact(id(WEB)));

    assert_client_cut_off(server.addr, &client).await;
    let err = server.next().await.expect_err("foreign trust domain accepted");
    match rejection(&err) {
        PeerRejected::WrongId { got, .. } => {
            assert_eq!(got, &id("spiffe://other.org/ns/default/sa/db"))
        }
        other => panic!("expected WrongId, got {other:?}"),
    }

    // Control: the same bundle and matcher accept an example.org client.
    let local = client_cfg(Some(&ours.svid(DB)), &bundle, IdMatcher::Exact(id(WEB)));
    talk(server.addr, &local).await.expect("own trust domain");
    assert_eq!(server.next().await.unwrap().client_id, Some(id(DB)));
}

#[tokio::test]
async fn client_certificate_mandatory_unless_optional() {
    let pki = Pki::new("example.org");
    let bundle = shared_bundle(pki.bundle());
    let server_svid = pki.svid(WEB);
    let anonymous = client_cfg(None, &bundle, IdMatcher::Exact(id(WEB)));

    // Mandatory (the default): no certificate, no connection.
    let mut strict =
        EchoServer::start(server_cfg(&server_svid, &bundle, IdMatcher::TrustDomain(td("example.org")))).await;
    assert_client_cut_off(strict.addr, &anonymous).await;
    let err = strict.next().await.expect_err("anonymous client accepted");
    assert!(matches!(tls_error(&err), rustls::Error::NoCertificatesPresented), "{err:?}");

    // Optional: the anonymous client gets through, and the server knows it has no ID.
    let optional = server_config(
        SvidResolver::with_svid(&server_svid).unwrap(),
        verifier(&bundle, IdMatcher::TrustDomain(td("example.org"))).client_auth_optional(),
        &[ALPN_H2],
    );
    let mut lenient = EchoServer::start(optional).await;
    talk(lenient.addr, &anonymous).await.expect("optional client auth");
    let seen = lenient.next().await.unwrap();
    assert!(seen.client_id.is_none() && seen.client_leaf.is_none());

    // Optional still verifies a certificate that is presented.
    let rogue = Pki::new("example.org");
    let client_bundle = shared_bundle(bundle_pems(&[&pki.anchor_pem, &rogue.anchor_pem]));
    let bad = client_cfg(Some(&rogue.svid(DB)), &client_bundle, IdMatcher::Exact(id(WEB)));
    assert_client_cut_off(lenient.addr, &bad).await;
    let err = lenient.next().await.expect_err("bad optional cert accepted");
    assert_untrusted_chain(&err);

    // And an optional server still identifies a good client.
    let good = client_cfg(Some(&pki.svid(DB)), &bundle, IdMatcher::Exact(id(WEB)));
    talk(lenient.addr, &good).await.unwrap();
    assert_eq!(lenient.next().await.unwrap().client_id, Some(id(DB)));
}

#[tokio::test]
async fn expired_svid_is_refused_both_ways() {
    let pki = Pki::new("example.org");
    let bundle = shared_bundle(pki.bundle());
    let matcher = IdMatcher::TrustDomain(td("example.org"));

    // A server presenting an expired SVID: the client refuses it.
    let mut server = EchoServer::start(server_cfg(&pki.expired_svid(WEB), &bundle, matcher.clone())).await;
    let client = client_cfg(Some(&pki.svid(DB)), &bundle, IdMatcher::Exact(id(WEB)));
    let err = talk(server.addr, &client).await.expect_err("expired server SVID accepted");
    assert_eq!(cert_error(&err), &CertificateError::Expired, "{err:?}");
    server.next().await.expect_err("server sees the abort");

    // A client presenting an expired SVID: the server refuses it.
    let mut server = EchoServer::start(server_cfg(&pki.svid(WEB), &bundle, matcher)).await;
    let client = client_cfg(Some(&pki.expired_svid(DB)), &bundle, IdMatcher::Exact(id(WEB)));
    assert_client_cut_off(server.addr, &client).await;
    let err = server.next().await.expect_err("expired client SVID accepted");
    assert_eq!(cert_error(&err), &CertificateError::Expired, "{err:?}");
}

fn serial(der: &[u8]) -> Vec<u8> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    X509Certificate::from_der(der).unwrap().1.raw_serial().to_vec()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn kind(s: &ClientStream) -> Option<HandshakeKind> {
    s.get_ref().1.handshake_kind()
}

#[tokio::test]
async fn rotation_changes_next_handshake_and_spares_open_connections() {
    let pki = Pki::new("example.org");
    let bundle = shared_bundle(pki.bundle());
    let old = pki.svid(WEB);
    let new = pki.svid(WEB);
    assert_ne!(serial(&old.chain[0]), serial(&new.chain[0]));

    let resolver = SvidResolver::with_svid(&old).unwrap();
    let mut server = EchoServer::start(server_config(
        resolver.clone(),
        verifier(&bundle, IdMatcher::TrustDomain(td("example.org"))),
        &[ALPN_H2],
    ))
    .await;
    let client = client_cfg(Some(&pki.svid(DB)), &bundle, IdMatcher::Exact(id(WEB)));

    let mut before = talk(server.addr, &client).await.expect("before rotation");
    assert_eq!(server.next().await.unwrap().kind, Some(HandshakeKind::Full));
    assert_eq!(server_leaf(&before), old.chain[0]);

    resolver.set(&new).unwrap();

    let mut after = talk(server.addr, &client).await.expect("after rotation");
    assert_eq!(kind(&after), Some(HandshakeKind::Full));
    assert_eq!(server.next().await.unwrap().kind, Some(HandshakeKind::Full));
    let presented = server_leaf(&after);
    assert_eq!(presented, new.chain[0], "next handshake presents the new leaf");
    assert_eq!(serial(&presented), serial(&new.chain[0]));
    assert_ne!(serial(&presented), serial(&old.chain[0]));

    // The connection opened before the swap still carries traffic, on the old leaf.
    ping(&mut before, b"still here after rotation").await.expect("pre-rotation connection keeps working");
    assert_eq!(server_leaf(&before), old.chain[0]);
    ping(&mut after, b"and the new one too").await.unwrap();
}

#[tokio::test]
async fn bundle_swap_makes_next_handshake_trust_new_ca() {
    let old_ca = Pki::new("example.org");
    let new_ca = Pki::new("example.org");
    // The client's trust, shared through the ArcSwap: the old CA only.
    let client_bundle = shared_bundle(old_ca.bundle());
    let client = client_cfg(Some(&old_ca.svid(DB)), &client_bundle, IdMatcher::Exact(id(WEB)));
    // Servers on the old and the new CA, both trusting both for their clients.
    let server_bundle = shared_bundle(bundle_pems(&[&old_ca.anchor_pem, &new_ca.anchor_pem]));
    let mut new_server =
        EchoServer::start(server_cfg(&new_ca.svid(WEB), &server_bundle, IdMatcher::TrustDomain(td("example.org"))))
            .await;
    let mut old_server =
        EchoServer::start(server_cfg(&old_ca.svid(WEB), &server_bundle, IdMatcher::TrustDomain(td("example.org"))))
            .await;

    let err = talk(new_server.addr, &client).await.expect_err("new CA trusted before the swap");
    assert_untrusted_chain(&err);
    new_server.next().await.expect_err("server sees the abort");
    talk(old_server.addr, &client).await.expect("old CA trusted");
    old_server.next().await.unwrap();

    // Swap in a bundle holding only the new CA; the same client config follows.
    client_bundle.store(Arc::new(Anchors::new(new_ca.bundle())));

    let s = talk(new_server.addr, &client).await.expect("new CA trusted after the swap");
    assert_eq!(kind(&s), Some(HandshakeKind::Full));
    assert_eq!(new_server.next().await.unwrap().client_id, Some(id(DB)));
    let err = talk(old_server.addr, &client).await.expect_err("old CA still trusted after the swap");
    assert_untrusted_chain(&err);
    old_server.next().await.expect_err("server sees the abort");
}

// ------------------------------------------- session resumption (as shipped)
//
// A resumed TLS 1.3 handshake runs neither `SpiffeVerifier` nor the resolver:
// it replays the peer chain of the original session. `tls::server_config` and
// `tls::client_config` therefore turn resumption off; these tests use the
// configs as shipped and prove that rotation, bundle changes and expiry apply
// to the very next handshake from the same client.

const RESUMPTION_BUG: &str = "weft_certs::tls configs resume TLS sessions, skipping the SPIFFE verifiers";

#[tokio::test]
async fn resumption_does_not_hide_a_rotated_server_svid() {
    let pki = Pki::new("example.org");
    let bundle = shared_bundle(pki.bundle());
    let old = pki.svid(WEB);
    let new = pki.svid(WEB);
    let resolver = SvidResolver::with_svid(&old).unwrap();
    let mut server = EchoServer::start(server_config(
        resolver.clone(),
        verifier(&bundle, IdMatcher::TrustDomain(td("example.org"))),
        &[ALPN_H2],
    ))
    .await;
    let client = Arc::new(shipped_client_cfg(Some(&pki.svid(DB)), &bundle, IdMatcher::Exact(id(WEB))));
    let first = talk(server.addr, &client).await.unwrap();
    server.next().await.unwrap();
    assert_eq!(server_leaf(&first), old.chain[0]);

    resolver.set(&new).unwrap();
    let second = talk(server.addr, &client).await.unwrap();
    server.next().await.unwrap();
    let shown = server_leaf(&second);
    assert!(
        shown == new.chain[0],
        "{RESUMPTION_BUG}: after rotation a {:?} handshake shows serial {} (old {}, new {})",
        kind(&second),
        hex(&serial(&shown)),
        hex(&serial(&old.chain[0])),
        hex(&serial(&new.chain[0])),
    );
}

#[tokio::test]
async fn resumption_does_not_outlive_a_bundle_swap() {
    let old_ca = Pki::new("example.org");
    let new_ca = Pki::new("example.org");
    // The server trusts the old CA for clients, then drops it.
    let server_bundle = shared_bundle(bundle_pems(&[&old_ca.anchor_pem, &new_ca.anchor_pem]));
    let mut server =
        EchoServer::start(server_cfg(&new_ca.svid(WEB), &server_bundle, IdMatcher::TrustDomain(td("example.org"))))
            .await;
    let client = Arc::new(shipped_client_cfg(
        Some(&old_ca.svid(DB)),
        &shared_bundle(new_ca.bundle()),
        IdMatcher::Exact(id(WEB)),
    ));
    talk(server.addr, &client).await.unwrap();
    server.next().await.unwrap();

    server_bundle.store(Arc::new(Anchors::new(new_ca.bundle())));
    let outcome = talk(server.addr, &client).await;
    let seen = server.next().await;
    assert!(
        outcome.is_err() && seen.is_err(),
        "{RESUMPTION_BUG}: a client of the removed CA got in again ({:?})",
        seen.map(|s| s.kind)
    );
}

#[tokio::test]
async fn resumption_does_not_outlive_client_svid_expiry() {
    let pki = Pki::new("example.org");
    let bundle = shared_bundle(pki.bundle());
    let mut server =
        EchoServer::start(server_cfg(&pki.svid(WEB), &bundle, IdMatcher::TrustDomain(td("example.org")))).await;
    // An SVID valid for two more seconds.
    let short = pki.authority.issue_local(&id(DB), Duration::from_secs(2)).unwrap();
    let client = Arc::new(shipped_client_cfg(Some(&short), &bundle, IdMatcher::Exact(id(WEB))));
    talk(server.addr, &client).await.expect("still valid");
    server.next().await.unwrap();

    let wait = short.not_after.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(1500)).await;
    assert!(SystemTime::now() > short.not_after);

    let outcome = talk(server.addr, &client).await;
    let seen = server.next().await;
    assert!(
        outcome.is_err() && seen.is_err(),
        "{RESUMPTION_BUG}: an expired client SVID got in ({:?})",
        seen.map(|s| s.kind)
    );
}
