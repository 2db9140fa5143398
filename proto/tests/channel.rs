//! The control-plane channel's timeouts, against a real TLS server on loopback.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpListener;
use weft_proto::channel::{lazy_channel, CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT};
use weft_proto::config::v1::config_client::ConfigClient;
use weft_proto::config::v1::AckRequest;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A gRPC-over-TLS server on loopback that waits `delay` after accepting
/// each connection before its TLS handshake (a control plane whose
/// handshakes queue in a join storm), then answers every call UNIMPLEMENTED.
/// Returns its address and the client TLS config that trusts it.
async fn slow_handshake_server(delay: Duration) -> (String, Arc<rustls::ClientConfig>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert: CertificateDer<'static> = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let svc = hyper::service::service_fn(|_req| async {
                    let resp = hyper::Response::builder()
                        .header("content-type", "application/grpc")
                        .header("grpc-status", "12")
                        // Trailers-only: the status in the headers, no body.
                        .body(String::new())
                        .unwrap();
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    (addr, Arc::new(client))
}

/// A replica that accepted the TCP connection but whose handshake waits its
/// turn longer than the TCP connect timeout (a join storm) is waited for:
/// giving up at the connect timeout threw away the place in its queue and
/// cost every sidecar a new handshake (the 10,000-sidecar storm never
/// settled). Fails with the connect timeout covering the handshake.
#[tokio::test]
async fn a_handshake_that_waits_past_the_connect_timeout_is_waited_for() {
    assert!(HANDSHAKE_TIMEOUT > CONNECT_TIMEOUT + Duration::from_secs(5));
    let delay = CONNECT_TIMEOUT + Duration::from_millis(1500);
    let (addr, tls) = slow_handshake_server(delay).await;
    let channel = lazy_channel(&addr, tls, ServerName::try_from("localhost").unwrap()).unwrap();
    let started = Instant::now();
    let status =
        ConfigClient::new(channel).ack(AckRequest::default()).await.expect_err("the server answers UNIMPLEMENTED");
    assert_eq!(
        status.code(),
        tonic::Code::Unimplemented,
        "connected after {:?} and got the server's answer: {status}",
        started.elapsed()
    );
    assert!(started.elapsed() >= delay, "the handshake was delayed by the server");
}
