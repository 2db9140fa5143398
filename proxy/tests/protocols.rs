//! End to end: protocols carried whole through a real pair of sidecars —
//! the app's HTTP version learned rather than copied from the caller,
//! HTTP Upgrade (WebSocket with the Python `websockets` package, and any
//! other token with a raw-socket app), and `Expect: 100-continue` answered
//! only once the callee's sidecar has allowed the request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use weft_testkit::mesh::{control_plane, sidecar, ConfigFile};
use weft_testkit::servers;

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl").args(["-sS", "--max-time", "10"]).args(args).output().expect("curl is installed");
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A server task, aborted when dropped.
struct Task(JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An HTTP server that speaks only one version (`h2`: h2c prior knowledge,
/// else HTTP/1.1) and answers `<name> <version>`, echoing a request body after it.
async fn one_version_server(name: &'static str, h2: bool) -> (SocketAddr, Task) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    use http_body_util::BodyExt;
                    let version = format!("{:?}", req.version());
                    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    let text = format!("{name} {version} {}", String::from_utf8_lossy(&body));
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                });
                let io = TokioIo::new(tcp);
                if h2 {
                    let _ =
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(io, svc).await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
                }
            });
        }
    });
    (addr, Task(task))
}

const LEARNED: &str = r#"apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: h1only}
spec: {}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: h2only}
spec: {}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: declared}
spec: {protocol: http2}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: both}
spec: {}
"#;

/// `--app-protocol auto` (the default) speaks the version the app speaks,
/// whatever the caller spoke: learned by probing, or the declared one.
#[tokio::test(flavor = "multi_thread")]
async fn the_apps_http_version_is_learned_not_copied_from_the_caller() {
    let cfg = ConfigFile::new(LEARNED);
    let cp = control_plane(&cfg).await;
    let (h1_addr, _h1) = one_version_server("h1only", false).await;
    let (h2_addr, _h2) = one_version_server("h2only", true).await;
    let (declared_app, both_app, web_app) =
        (servers::http("declared").await, servers::http("both").await, servers::http("web").await);
    let _h1only = sidecar(&cp, "h1only", h1_addr, &[], &[]).await;
    let _h2only = sidecar(&cp, "h2only", h2_addr, &[], &[]).await;
    let _declared = sidecar(&cp, "declared", declared_app.addr, &[], &[]).await;
    let _both = sidecar(&cp, "both", both_app.addr, &[], &[]).await;
    let web = sidecar(&cp, "web", web_app.addr, &[], &[]).await;
    for s in ["h1only", "h2only", "declared", "both"] {
        web.wait_endpoints(s, 1, Duration::from_secs(10)).await;
    }
    let url = |path: &str| format!("http://{}{path}", web.outbound);

    // An h2c caller to an app that speaks only HTTP/1.1.
    for _ in 0..2 {
        let (body, err) = curl(&["--http2-prior-knowledge", "-H", "Host: h1only", &url("/")]);
        assert_eq!(body, "h1only HTTP/1.1 ", "stderr: {err}");
    }
    let (body, err) = curl(&["--http2-prior-knowledge", "-H", "Host: h1only", "--data-binary", "up", &url("/")]);
    assert_eq!(body, "h1only HTTP/1.1 up", "stderr: {err}");
    // An HTTP/1.1 caller to an app that speaks only h2c.
    for _ in 0..2 {
        let (body, err) = curl(&["--http1.1", "-H", "Host: h2only", "--data-binary", "up", &url("/")]);
        assert_eq!(body, "h2only HTTP/2.0 up", "stderr: {err}");
    }
    // A declared `protocol: http2` is spoken to a dual-stack app, even to an HTTP/1.1 caller.
    let (body, err) = curl(&["--http1.1", "-H", "Host: declared", &url("/echo-headers")]);
    assert!(body.starts_with("version: HTTP/2.0"), "{body}\nstderr: {err}");
    // Undeclared, a dual-stack app keeps getting the caller's version.
    let (body, err) = curl(&["--http1.1", "-H", "Host: both", &url("/echo-headers")]);
    assert!(body.starts_with("version: HTTP/1.1"), "{body}\nstderr: {err}");
    let (body, err) = curl(&["--http2-prior-knowledge", "-H", "Host: both", &url("/echo-headers")]);
    assert!(body.starts_with("version: HTTP/2.0"), "{body}\nstderr: {err}");
}
