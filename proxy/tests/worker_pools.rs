//! End to end: with several worker threads (`--worker-threads`), each worker
//! keeps its own pooled mTLS connection to a peer. One worker opening its
//! connection (a slow TLS handshake: a peer busy, far away, or its TCP
//! relay slow) must not stall requests on the other workers, which already
//! have theirs.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_testkit::servers;
use weft_testkit::{metric_sum, ControlPlane, Sidecar, SidecarSpec};

const TD: &str = "example.org";
/// How long the relay holds each new connection while `slow` is set: well
/// under web's `--connect-timeout`, well over what a request may take.
const SLOW_CONNECT: Duration = Duration::from_secs(6);

/// Relays every connection to the address set in `to`; while `slow` is set,
/// a new connection waits [`SLOW_CONNECT`] before it is relayed.
async fn slow_relay(to: Arc<OnceLock<SocketAddr>>, slow: Arc<AtomicBool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
    let addr = listener.local_addr().expect("relay address");
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let (to, slow) = (to.clone(), slow.clone());
            tokio::spawn(async move {
                if slow.load(Ordering::SeqCst) {
                    tokio::time::sleep(SLOW_CONNECT).await;
                }
                let Some(to) = to.get() else { return };
                let Ok(mut upstream) = TcpStream::connect(to).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut upstream).await;
            });
        }
    });
    addr
}

/// Sends `GET path` (Host: api) on a keep-alive connection and reads until the body `api path` arrives.
async fn get(c: &mut TcpStream, path: &str) -> String {
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: api\r\n\r\n").as_bytes()).await.unwrap();
    let want = format!("api {path}");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).ends_with(&want) {
        let n = tokio::time::timeout(Duration::from_secs(30), c.read(&mut buf)).await.expect("an answer").unwrap();
        assert!(n > 0, "connection closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_opening_its_pooled_connection_does_not_stall_the_others() {
    let cp = ControlPlane::start(TD, &[]).await;
    let (to, slow) = (Arc::new(OnceLock::new()), Arc::new(AtomicBool::new(false)));
    let relay = slow_relay(to.clone(), slow.clone()).await;
    let app = servers::http("api").await;
    let advertise = relay.to_string();
    let api = Sidecar::start(
        &cp,
        TD,
        SidecarSpec { extra_args: &["--advertise-address", &advertise], ..SidecarSpec::new("api", app.addr) },
    )
    .await;
    to.set(api.inbound).unwrap();
    let web_app = servers::http("web").await;
    let web = Sidecar::start(
        &cp,
        TD,
        SidecarSpec {
            extra_args: &["--worker-threads", "2", "--connect-timeout", "20s"],
            ..SidecarSpec::new("web", web_app.addr)
        },
    )
    .await;
    web.wait_endpoints("api", 1, Duration::from_secs(10)).await;

    // Connection A: its worker opens its pooled connection to api, quickly.
    let mut a = TcpStream::connect(web.outbound).await.unwrap();
    assert!(get(&mut a, "/warm").await.starts_with("HTTP/1.1 200"));
    assert_eq!(metric_sum(&web.metrics().await, "weft_proxy_pool_connections", &[]), 1.0);

    // New client connections, handed out round robin: some land on the other
    // worker, which opens its own pooled connection, slowly.
    slow.store(true, Ordering::SeqCst);
    let mut others = Vec::new();
    for i in 0..4 {
        let mut c = TcpStream::connect(web.outbound).await.unwrap();
        others.push(tokio::spawn(async move { get(&mut c, &format!("/other{i}")).await }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A's worker has its connection: its requests go on at once.
    let started = Instant::now();
    assert!(get(&mut a, "/meanwhile").await.starts_with("HTTP/1.1 200"));
    let took = started.elapsed();
    assert!(
        took < SLOW_CONNECT / 2,
        "a request on a worker with its own pooled connection took {took:?}: it waited for another worker's connection attempt"
    );
    slow.store(false, Ordering::SeqCst);
    for o in others {
        assert!(o.await.unwrap().starts_with("HTTP/1.1 200"));
    }
}
