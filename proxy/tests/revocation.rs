//! A policy change that no longer allows a caller closes its open TCP
//! connections, not just new ones.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_testkit::{servers, ControlPlane, Sidecar, SidecarSpec};

const TD: &str = "example.org";
const BASE: &str = "apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: db}
spec: {port: 5432, protocol: tcp}
";
const DENY_WEB: &str = "---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-web}
spec:
  targetRef: {name: db}
  action: DENY
  rules:
    - from: [{identities: [\"spiffe://example.org/ns/default/sa/web\"]}]
";

async fn echo_once(tcp: &mut tokio::net::TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    tcp.write_all(msg).await?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut buf)).await??;
    Ok(buf)
}

#[tokio::test(flavor = "multi_thread")]
async fn open_tcp_connection_is_closed_when_policy_revokes_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("mesh.yaml");
    std::fs::write(&cfg, BASE).unwrap();
    let cp = ControlPlane::start(TD, &["--config", cfg.to_str().unwrap()]).await;
    let db_app = servers::tcp_echo().await;
    let _db = Sidecar::start(&cp, TD, SidecarSpec::new("db", db_app.addr)).await;
    let web_app = servers::http("web").await;
    let web = Sidecar::start(
        &cp,
        TD,
        SidecarSpec { service: "web", app: web_app.addr, upstreams: &["db"], labels: &[], extra_args: &[] },
    )
    .await;
    web.wait_endpoints("db", 1, Duration::from_secs(10)).await;

    let mut conn = tokio::net::TcpStream::connect(web.upstream("db")).await.unwrap();
    assert_eq!(echo_once(&mut conn, b"allowed").await.unwrap(), b"allowed");

    std::fs::write(&cfg, format!("{BASE}{DENY_WEB}")).unwrap();
    // The open connection is closed once the new policy reaches the db sidecar.
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the revoked connection stayed open");

    // And a new connection is refused.
    let mut again = tokio::net::TcpStream::connect(web.upstream("db")).await.unwrap();
    assert!(echo_once(&mut again, b"denied?").await.is_err(), "a denied caller got a working tunnel");
    let metrics = _db.metrics().await;
    assert!(
        weft_testkit::metric_sum(&metrics, "weft_proxy_authz_decisions_total", &["policy=\"revoked\""]) >= 1.0,
        "{metrics}"
    );
}
