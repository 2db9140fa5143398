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
use weft_testkit::{metric_sum, servers};

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

// ------------------------------------------------------------------ upgrades

const DENY_ADMIN: &str = r#"apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: api}
spec: {}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-admin}
spec:
  targetRef: {name: api}
  action: DENY
  rules:
    - to: [{paths: ["/admin/*"]}]
"#;

/// A control plane with [`DENY_ADMIN`], `api` fronting `app`, and the caller `web`.
struct Pair {
    _cfg: ConfigFile,
    _cp: weft_testkit::ControlPlane,
    api: weft_testkit::Sidecar,
    web: weft_testkit::Sidecar,
    _web_app: servers::Server,
}

async fn pair(app: SocketAddr) -> Pair {
    let cfg = ConfigFile::new(DENY_ADMIN);
    let cp = control_plane(&cfg).await;
    let web_app = servers::http("web").await;
    let api = sidecar(&cp, "api", app, &[], &[]).await;
    let web = sidecar(&cp, "web", web_app.addr, &[], &[]).await;
    web.wait_endpoints("api", 1, Duration::from_secs(10)).await;
    Pair { _cfg: cfg, _cp: cp, api, web, _web_app: web_app }
}

fn python(args: &[&str]) -> std::process::Command {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/websocket_e2e.py");
    let probe = Command::new("python3").args(["-c", "import websockets"]).output();
    match probe {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "the Python `websockets` package is missing ({}); install it: python3 -m pip install websockets",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!("python3 not runnable ({e}); .ci/run installs `websockets` for it"),
    }
    let mut c = Command::new("python3");
    c.arg(script).args(args);
    c
}

/// A child process killed when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A WebSocket client (Python `websockets`) through the caller's sidecar to
/// a `websockets` echo app: greeting, messages both ways, a 1 MiB message,
/// the close handshake; a DENY on the path answers 403 and the app never
/// sees the request. Counted as upgraded connections and their bytes.
#[tokio::test(flavor = "multi_thread")]
async fn websocket_end_to_end_under_authorization() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("ws.log");
    let mut server = python(&["server", &log.display().to_string()]);
    let mut server = Child(server.stdout(std::process::Stdio::piped()).spawn().expect("start the websockets server"));
    let mut first = String::new();
    std::io::BufReader::new(server.0.stdout.take().unwrap()).read_line(&mut first).unwrap();
    let port: u16 = first.trim().parse().unwrap_or_else(|_| panic!("websockets server said {first:?}"));
    let p = pair(SocketAddr::from(([127, 0, 0, 1], port))).await;
    let outbound = p.web.outbound.port().to_string();

    let run = |args: &[&str]| {
        let out = python(args).output().unwrap();
        let (stdout, stderr) =
            (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
        (stdout, stderr)
    };
    let (out, err) = run(&["client", &outbound, "/chat"]);
    assert_eq!(out.trim(), "OK", "client failed:\n{err}\nsidecar log:\n{}", p.api.proc_.log_text());
    let (out, err) = run(&["denied", &outbound, "/admin/chat"]);
    assert_eq!(out.trim(), "403", "{err}");

    let seen = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(seen.contains("open /chat\nclosed 1000\n"), "the app saw: {seen}");
    assert!(!seen.contains("/admin"), "a denied upgrade reached the app: {seen}");

    let web = p.web.metrics().await;
    let api = p.api.metrics().await;
    assert!(metric_sum(&web, "weft_proxy_requests_total", &["direction=\"outbound\"", "code=\"101\""]) >= 1.0, "{web}");
    assert!(metric_sum(&api, "weft_proxy_requests_total", &["direction=\"inbound\"", "code=\"403\""]) >= 1.0);
    assert!(metric_sum(&api, "weft_proxy_requests_total", &["direction=\"inbound\"", "code=\"101\""]) >= 1.0);
    for (m, direction) in [(&web, "outbound"), (&api, "inbound")] {
        let d = format!("direction=\"{direction}\"");
        assert!(metric_sum(m, "weft_proxy_connections_total", &[&d, "protocol=\"upgrade\""]) >= 1.0, "{m}");
        let bytes = metric_sum(m, "weft_proxy_tcp_bytes_total", &[&d, "protocol=\"upgrade\""]);
        assert!(bytes >= 2.0 * 1024.0 * 1024.0, "{direction}: {bytes} upgraded bytes");
    }
}

/// Reads from `tcp` until `\r\n\r\n` (a message head), returning everything read.
async fn read_head(tcp: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut buf = [0u8; 4096];
        let n =
            tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await.expect("head timed out").unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// A raw-socket app: answers a request with `Upgrade: foo/1` on path
/// `/foo` with 101 and then echoes bytes; any other request gets `400
/// no upgrade here`. Every request head it reads goes to `seen`.
async fn raw_upgrade_app() -> (SocketAddr, Task, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let head = read_head(&mut tcp).await;
                log.lock().unwrap().push(head.clone());
                let lower = head.to_ascii_lowercase();
                if head.starts_with("GET /foo ") && lower.contains("\r\nupgrade: foo/1\r\n") {
                    let _ = tcp
                        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: foo/1\r\nX-Foo: yes\r\n\r\n")
                        .await;
                    let mut buf = [0u8; 8192];
                    while let Ok(n) = tcp.read(&mut buf).await {
                        if n == 0 || tcp.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                } else {
                    let _ =
                        tcp.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 15\r\n\r\nno upgrade here").await;
                }
            });
        }
    });
    (addr, Task(task), seen)
}

/// Any HTTP/1.1 Upgrade token, not only WebSocket: the raw app's 101 and its
/// headers reach the caller, bytes flow both ways; an app that refuses the
/// upgrade has its answer passed back; a DENY answers 403 before the app.
#[tokio::test(flavor = "multi_thread")]
async fn any_upgrade_token_is_carried_and_a_refusal_passes_back() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (app, _task, seen) = raw_upgrade_app().await;
    let p = pair(app).await;
    let upgrade = |path: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: foo/1\r\nX-Mine: 1\r\n\r\n")
    };

    let mut tcp = tokio::net::TcpStream::connect(p.web.outbound).await.unwrap();
    tcp.write_all(upgrade("/foo").as_bytes()).await.unwrap();
    let head = read_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let lower = head.to_ascii_lowercase();
    for h in ["\r\nupgrade: foo/1\r\n", "\r\nconnection: upgrade\r\n", "\r\nx-foo: yes\r\n"] {
        assert!(lower.contains(h), "{h:?} missing from {head}");
    }
    for round in 0..3 {
        let msg = format!("ping {round} ").repeat(1000);
        tcp.write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut back)).await.expect("echo").unwrap();
        assert_eq!(back, msg.as_bytes());
    }
    let app_head = seen.lock().unwrap()[0].to_ascii_lowercase();
    assert!(app_head.contains("\r\nconnection: upgrade\r\n") && app_head.contains("\r\nx-mine: 1\r\n"), "{app_head}");
    assert!(app_head.contains("\r\nx-weft-peer-id: spiffe://example.org/ns/default/sa/web\r\n"), "{app_head}");
    drop(tcp);

    // The app refuses: its answer comes back as it is.
    let mut tcp = tokio::net::TcpStream::connect(p.web.outbound).await.unwrap();
    tcp.write_all(upgrade("/other").as_bytes()).await.unwrap();
    let mut answer = read_head(&mut tcp).await;
    if !answer.ends_with("no upgrade here") {
        let mut rest = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut rest)).await.unwrap().unwrap();
        answer.push_str(&String::from_utf8_lossy(&rest[..n]));
    }
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.ends_with("no upgrade here"), "{answer}");

    // Denied: 403 from the callee's sidecar, the app never asked.
    let before = seen.lock().unwrap().len();
    let mut tcp = tokio::net::TcpStream::connect(p.web.outbound).await.unwrap();
    tcp.write_all(upgrade("/admin/foo").as_bytes()).await.unwrap();
    let head = read_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 403 "), "{head}");
    assert_eq!(seen.lock().unwrap().len(), before, "a denied upgrade reached the app");
}

// ------------------------------------------------------------------ Expect: 100-continue

/// `Expect: 100-continue`: the caller's `100 Continue` comes only once the
/// callee's sidecar has allowed the request. Denied: 403 with no 100 before
/// it, and the client never sends its 10 MB body. Allowed: 100, then the
/// body, then 200 with the body echoed.
#[tokio::test(flavor = "multi_thread")]
async fn expect_100_continue_waits_for_the_callees_authorization() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LEN: usize = 10 * 1024 * 1024;
    let app = servers::http("api").await;
    let p = pair(app.addr).await;
    let head = |path: &str| {
        format!("POST {path} HTTP/1.1\r\nHost: api\r\nContent-Length: {LEN}\r\nExpect: 100-continue\r\n\r\n")
    };

    let mut tcp = tokio::net::TcpStream::connect(p.web.outbound).await.unwrap();
    tcp.write_all(head("/admin/upload").as_bytes()).await.unwrap();
    let answer = read_head(&mut tcp).await;
    assert!(answer.starts_with("HTTP/1.1 403 "), "a 100 Continue (or anything) before the denial: {answer:?}");
    assert!(!answer.contains("100 Continue"), "{answer:?}");

    let mut tcp = tokio::net::TcpStream::connect(p.web.outbound).await.unwrap();
    tcp.write_all(head("/upload").as_bytes()).await.unwrap();
    let cont = read_head(&mut tcp).await;
    assert_eq!(cont, "HTTP/1.1 100 Continue\r\n\r\n");
    let body: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
    let (mut rd, mut wr) = tcp.into_split();
    let send = tokio::spawn(async move { wr.write_all(&body).await.map(|()| wr) });
    let mut got = Vec::with_capacity(LEN + 1024);
    let recv = async {
        loop {
            let mut buf = vec![0u8; 65536];
            let n = tokio::time::timeout(Duration::from_secs(20), rd.read(&mut buf)).await.expect("stalled").unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let h = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let chunked = h.contains("transfer-encoding: chunked");
                if !chunked && got.len() >= end + 4 + LEN {
                    break;
                }
                if chunked && got.ends_with(b"\r\n0\r\n\r\n") {
                    break;
                }
            }
        }
    };
    recv.await;
    let _wr = send.await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&got[..got.len().min(200)]).into_owned();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head_text = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    let echoed =
        if head_text.contains("transfer-encoding: chunked") { dechunk(&got[end..]) } else { got[end..].to_vec() };
    assert_eq!(echoed.len(), LEN);
    assert!(echoed.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8), "echoed body differs");
    assert!(
        metric_sum(&p.api.metrics().await, "weft_proxy_requests_total", &["direction=\"inbound\"", "code=\"200\""])
            >= 1.0
    );
}

/// The payload of a chunked body (RFC 9112 7.1).
fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
        let size_text = String::from_utf8_lossy(&b[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).expect("chunk size");
        b = &b[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}
