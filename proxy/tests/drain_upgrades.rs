//! End to end: a SIGTERM drain waits for upgraded connections (WebSocket
//! and other HTTP/1.1 `Upgrade`s carried through the mesh) as it does for
//! TCP tunnels, up to `--drain-timeout`: they are not cut when the caller's
//! sidecar stops accepting. Once upgraded, such a connection is no longer
//! the HTTP server's (its task ends at the 101), so it must hold the drain
//! itself.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_testkit::servers;
use weft_testkit::{ControlPlane, Sidecar, SidecarSpec};

const TD: &str = "example.org";

/// An app that answers any `Upgrade: echo` request 101 and then echoes bytes.
async fn upgrade_echo_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|mut req: Request<Incoming>| async move {
                    let on = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        if let Ok(up) = on.await {
                            let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                        }
                    });
                    let resp = Response::builder()
                        .status(StatusCode::SWITCHING_PROTOCOLS)
                        .header("connection", "upgrade")
                        .header("upgrade", "echo")
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// Opens an upgraded connection to `api` through `outbound`.
async fn upgrade(outbound: SocketAddr) -> TcpStream {
    let mut c = TcpStream::connect(outbound).await.unwrap();
    c.write_all(b"GET /echo HTTP/1.1\r\nHost: api\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(20), c.read(&mut b)).await.expect("a 101 in time").unwrap();
        assert!(n > 0, "closed before the 101: {}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    c
}

/// Whether `c` still echoes `msg`.
async fn echoes(c: &mut TcpStream, msg: &[u8]) -> bool {
    if c.write_all(msg).await.is_err() {
        return false;
    }
    let mut got = vec![0u8; msg.len()];
    matches!(tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut got)).await, Ok(Ok(_))) && got == msg
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_waits_for_upgraded_connections() {
    let cp = ControlPlane::start(TD, &[]).await;
    let app = upgrade_echo_app().await;
    let api = Sidecar::start(&cp, TD, SidecarSpec::new("api", app)).await;
    let web_app = servers::http("web").await;
    let mut web = Sidecar::start(
        &cp,
        TD,
        SidecarSpec {
            extra_args: &["--worker-threads", "2", "--drain-timeout", "20s"],
            ..SidecarSpec::new("web", web_app.addr)
        },
    )
    .await;
    web.wait_endpoints("api", 1, Duration::from_secs(10)).await;
    // Several, so that they are spread over web's workers.
    let mut conns = Vec::new();
    for _ in 0..4 {
        let mut c = upgrade(web.outbound).await;
        assert!(echoes(&mut c, b"before").await);
        conns.push(c);
    }

    let pid = web.proc_.pid();
    let sent = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(sent.success());
    // Past the 1 s grace, when the listeners have closed: still carried.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (i, c) in conns.iter_mut().enumerate() {
        assert!(
            echoes(c, b"draining").await,
            "upgraded connection {i} cut during the drain; log:\n{}",
            web.proc_.log_text()
        );
    }
    // Closed by the client: the drain ends with them, well before its timeout.
    drop(conns);
    let t = Instant::now();
    let status = tokio::task::block_in_place(|| web.proc_.terminate(Duration::from_secs(15))).expect("web exited");
    assert!(status.success(), "{status:?}");
    let log = web.proc_.log_text();
    assert!(log.contains("drained; exiting"), "took {:?}: {log}", t.elapsed());
    drop(api);
}
