//! End to end, issues #9 and #14: the errors users read say what failed and
//! where. A real control plane and sidecars; a real HTTP client (the
//! testkit's app client, and raw bytes where a client would fix the request).
//!
//! - The callee's app is down: 502 naming the hop (callee's sidecar → its
//!   local app), the app's address and the cause ("connection refused"),
//!   never hyper's "client error (SendRequest)".
//! - A service the mesh does not know: 404 saying so and how to name one,
//!   distinct from a declared service with no endpoints (503); counted in
//!   `weft_proxy_requests_refused_total{reason="unknown_service"}`.
//! - No Host at all: 400 saying so (`reason="missing_host"`).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_testkit::mesh::{control_plane, sidecar, App, ConfigFile};
use weft_testkit::{metric_sum, servers};

const CONFIG: &str = r#"apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: down}
spec: {port: 8080}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: declared}
spec: {port: 8080}
"#;

const REFUSED: &str = "weft_proxy_requests_refused_total";

#[tokio::test(flavor = "multi_thread")]
async fn users_read_which_hop_which_peer_and_why() {
    let cfg = ConfigFile::new(CONFIG);
    let cp = control_plane(&cfg).await;
    // The app of `down` is not running: a port bound, then released.
    let gone = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let web_app = servers::http("web").await;
    let down = sidecar(&cp, "down", gone, &[], &[]).await;
    let web = sidecar(&cp, "web", web_app.addr, &[], &[]).await;
    web.wait_endpoints("down", 1, Duration::from_secs(15)).await;
    let app = App::of(&web);

    // The callee's local app is down.
    let r = app.get("down", "/x").await;
    assert_eq!(r.status, 502, "{r:?}");
    let expected = format!("weft: local app at {gone} failed: cannot connect: ");
    assert!(r.body.starts_with(&expected), "names the app and its address: {r:?}");
    assert!(r.body.to_lowercase().contains("connection refused"), "names the cause: {r:?}");
    assert!(r.body.contains("(callee's sidecar → its local app)"), "names the hop: {r:?}");
    assert!(!r.body.contains("SendRequest") && !r.body.contains("client error"), "{r:?}");
    let _ = down;

    // A service the mesh does not know, and one it knows without endpoints.
    let before = metric_sum(&web.metrics().await, REFUSED, &["reason=\"unknown_service\""]);
    let r = app.get("nowhere", "/").await;
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(r.body, "weft: no service named \"nowhere\" in the mesh; send Host: <service>\n");
    let after = metric_sum(&web.metrics().await, REFUSED, &["reason=\"unknown_service\""]);
    assert_eq!(after - before, 1.0, "counted as a refusal");
    let r = app.get("declared", "/").await;
    assert_eq!((r.status, r.body.as_str()), (503, "weft: no endpoints for service \"declared\"\n"), "{r:?}");
    let wm = web.metrics().await;
    assert_eq!(
        metric_sum(&wm, "weft_proxy_requests_total", &["service=\"nowhere\""]),
        0.0,
        "an unknown host is no service label: {wm}"
    );

    // No Host at all (HTTP/1.1 requires one): 400 saying so.
    let mut tcp = tokio::net::TcpStream::connect(web.outbound).await.expect("connect");
    tcp.write_all(b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n").await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf)).await.expect("answer").expect("read");
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("weft: the request names no host: send a Host header"), "{text}");
    let wm = web.metrics().await;
    assert!(metric_sum(&wm, REFUSED, &["reason=\"missing_host\""]) >= 1.0, "{wm}");
}
