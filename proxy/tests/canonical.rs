//! End to end, issue #9: one canonical form of every request, so policy and
//! app never disagree. A real control plane watches a mesh config file; a
//! real `frontend` sidecar sends to a real `backend` sidecar over mTLS, in
//! front of a testkit HTTP app that answers `backend <path>` with the path it
//! received. Requests are written as raw bytes on a TcpStream to the
//! frontend's outbound listener, so no client library normalizes a spelling
//! before the mesh sees it.
//!
//! Each path spelling is sent under a `DENY /admin/*` policy and under an
//! `ALLOW /public/*` policy: the status must follow from the spelling's
//! canonical form (proxy/src/canonical.rs, docs/config.md "Request
//! canonicalization"), and on 200 the app must have seen exactly that form.
//!
//! Metric expected from the caller's sidecar (the edge where the request
//! enters the mesh): `weft_proxy_requests_refused_total{reason="non_canonical"}`,
//! one per request refused with 400 because it has no canonical form.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_testkit::servers;
use weft_testkit::{metric_sum, ControlPlane, Sidecar, SidecarSpec};

const TD: &str = "example.org";
const DENIED: &str = "weft: request denied by authorization policy";
const REFUSED: &str = "weft_proxy_requests_refused_total";
const NON_CANONICAL: &str = "reason=\"non_canonical\"";

// ------------------------------------------------------------------ configs

const SERVICES: &str = r#"apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: frontend}
spec: {port: 8080}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: backend}
spec: {port: 8080}
"#;

fn policy(action: &str, path: &str) -> String {
    format!(
        r#"{SERVICES}---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: p}}
spec:
  targetRef: {{name: backend}}
  action: {action}
  rules:
    - to: [{{paths: ["{path}"]}}]
"#
    )
}

fn deny_admin() -> String {
    policy("DENY", "/admin/*")
}

fn allow_public() -> String {
    policy("ALLOW", "/public/*")
}

fn with_opaque_slashes(config: &str) -> String {
    format!(
        "{config}---\napiVersion: weft.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: mesh}}\nspec:\n  pathNormalization: {{encodedSlashes: opaque}}\n"
    )
}

// ------------------------------------------------------------------ harness

/// The watched config file, replaced atomically the way editors save.
struct ConfigFile {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl ConfigFile {
    fn new(text: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, text).expect("write config");
        Self { dir, path }
    }

    fn write(&self, text: &str) {
        let tmp = self.dir.path().join(".mesh.yaml.swp");
        std::fs::write(&tmp, text).expect("write temp config");
        std::fs::rename(&tmp, &self.path).expect("rename over config");
    }
}

struct Mesh {
    config: ConfigFile,
    frontend: Sidecar,
    backend: Sidecar,
    _cp: ControlPlane,
    _apps: Vec<servers::Server>,
}

async fn mesh(config: &str) -> Mesh {
    let config = ConfigFile::new(config);
    let cp = ControlPlane::start(TD, &["--config", &config.path.display().to_string()]).await;
    let backend_app = servers::http("backend").await;
    let frontend_app = servers::http("frontend").await;
    let backend = Sidecar::start(&cp, TD, SidecarSpec::new("backend", backend_app.addr)).await;
    let frontend = Sidecar::start(&cp, TD, SidecarSpec::new("frontend", frontend_app.addr)).await;
    frontend.wait_endpoints("backend", 1, Duration::from_secs(15)).await;
    Mesh { config, frontend, backend, _cp: cp, _apps: vec![backend_app, frontend_app] }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    body: String,
}

/// Writes `request` as is to `addr` and reads the whole answer (the request
/// says `Connection: close`); decodes a chunked body.
async fn raw(addr: SocketAddr, request: &[u8]) -> Reply {
    let what = String::from_utf8_lossy(request).into_owned();
    let exchange = async {
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.write_all(request).await?;
        let mut buf = Vec::new();
        tcp.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| panic!("no answer within 10s to {what:?}"))
        .unwrap_or_else(|e| panic!("{what:?}: {e}"));
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{what:?}: no response head in {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{what:?}: no status in {head:?}"));
    let chunked = head.lines().any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
    let body = if chunked { dechunk(body) } else { body.to_string() };
    Reply { status, body }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// A GET of `target` with the given Host header lines.
fn get(target: &str, hosts: &[&str]) -> Vec<u8> {
    let mut r = format!("GET {target} HTTP/1.1\r\n");
    for h in hosts {
        r.push_str(&format!("Host: {h}\r\n"));
    }
    r.push_str("Connection: close\r\n\r\n");
    r.into_bytes()
}

async fn refused_non_canonical(s: &Sidecar) -> f64 {
    metric_sum(&s.metrics().await, REFUSED, &[NON_CANONICAL])
}

/// Polls until `path` on `backend` answers `want` (a config change applied).
async fn wait_status(m: &Mesh, path: &str, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = raw(m.frontend.outbound, &get(path, &["backend"])).await;
        if r.status == want {
            return;
        }
        assert!(Instant::now() < deadline, "GET {path} still answers {} {:?}, want {want}", r.status, r.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ------------------------------------------------------------------ spellings

/// A path spelling and its canonical form (`None`: no canonical form, 400).
/// The canonical form is the path only: the app's echo has no query.
const PATHS: &[(&str, Option<&str>)] = &[
    ("/admin/users", Some("/admin/users")),
    ("//admin/users", Some("/admin/users")),
    ("/admin//users", Some("/admin/users")),
    ("///admin///users", Some("/admin/users")),
    ("/%61dmin/users", Some("/admin/users")),
    ("/%61%64%6d%69%6E/users", Some("/admin/users")),
    ("/admin/./users", Some("/admin/users")),
    ("/./admin/users", Some("/admin/users")),
    ("/public/../admin/users", Some("/admin/users")),
    ("/public/%2e%2e/admin/users", Some("/admin/users")),
    ("/public/%2E%2E/admin/users", Some("/admin/users")),
    ("/public/.%2e/admin/users", Some("/admin/users")),
    ("/%2e/admin/users", Some("/admin/users")),
    ("/admin/users?x=/../public/", Some("/admin/users")),
    ("/ADMIN/users", Some("/ADMIN/users")),
    ("/admin", Some("/admin")),
    ("/admin/", Some("/admin/")),
    ("/admin/users/..", Some("/admin/")),
    ("/public/a", Some("/public/a")),
    ("/public/a?x=/admin/users", Some("/public/a")),
    ("/public/a#/../../admin/users", Some("/public/a")),
    ("/public//a///b", Some("/public/a/b")),
    ("/public/./a/../b/", Some("/public/b/")),
    ("/public/a/b/..", Some("/public/a/")),
    ("/public/%2e/a", Some("/public/a")),
    ("/public/%7euser", Some("/public/~user")),
    ("/public/%41", Some("/public/A")),
    ("/public/caf%c3%a9", Some("/public/caf%C3%A9")),
    ("/public/caf\u{e9}", Some("/public/caf%C3%A9")),
    ("/public/a|b", Some("/public/a%7Cb")),
    ("/public/a%3bb", Some("/public/a%3Bb")),
    ("/public/a%3Fx/../b", Some("/public/b")),
    ("/public/%252e%252e/admin", Some("/public/%252e%252e/admin")),
    ("/public/%252F", Some("/public/%252F")),
    ("/public", Some("/public")),
    ("/public/", Some("/public/")),
    ("/", Some("/")),
    // No canonical form.
    ("/admin%2Fusers", None),
    ("/admin%2fusers", None),
    ("/public/..%2fadmin/users", None),
    ("/public%2F..%2Fadmin/users", None),
    ("/public/a%5cb", None),
    ("/admin\\users", None),
    ("/public/..\\admin/users", None),
    ("/admin;x=1/users", None),
    ("/public/..;/admin/users", None),
    ("/public/a;jsessionid=1", None),
    ("/admin%00/users", None),
    ("/public/a%0d%0aX-Injected:%201", None),
    ("/admin%zz/users", None),
    ("/admin%", None),
    ("/public/%4", None),
    ("/../admin/users", None),
    ("/%2e%2e/admin/users", None),
    ("/public/../../admin/users", None),
    ("/public/%c0%ae%c0%ae/admin/users", None),
    ("/public/%ff", None),
];

fn long_paths() -> Vec<(String, Option<String>)> {
    vec![
        (format!("/public/{}", "a".repeat(8184)), Some(format!("/public/{}", "a".repeat(8184)))),
        (format!("/public/{}", "a".repeat(9000)), None),
        // Grows past the limit once encoded.
        (format!("/public/{}", "|".repeat(3000)), None),
    ]
}

fn all_paths() -> Vec<(String, Option<String>)> {
    let mut v: Vec<_> = PATHS.iter().map(|(p, c)| (p.to_string(), c.map(str::to_string))).collect();
    v.extend(long_paths());
    v
}

/// Sends every spelling; `allowed(canonical)` says whether the active policy
/// lets the canonical path through. Returns how many were refused with 400.
async fn check_paths(m: &Mesh, phase: &str, allowed: impl Fn(&str) -> bool) -> usize {
    let mut failures = Vec::new();
    let mut refused = 0;
    for (spelling, canonical) in all_paths() {
        let r = raw(m.frontend.outbound, &get(&spelling, &["backend"])).await;
        let shown = if spelling.len() > 80 { format!("{}…", &spelling[..80]) } else { spelling.clone() };
        let want = match &canonical {
            None => 400,
            Some(c) if allowed(c) => 200,
            Some(_) => 403,
        };
        if r.status != want {
            failures.push(format!("{phase}: GET {shown:?}: status {} (body {:?}), want {want}", r.status, r.body));
            continue;
        }
        match want {
            200 => {
                let seen = r.body.strip_prefix("backend ").unwrap_or(&r.body);
                if Some(seen) != canonical.as_deref() {
                    failures.push(format!("{phase}: GET {shown:?}: the app saw {seen:?}, want {canonical:?}"));
                }
            }
            403 if r.body.trim_end() != DENIED => {
                failures.push(format!("{phase}: GET {shown:?}: 403 body {:?}", r.body))
            }
            400 => {
                refused += 1;
                if r.body.starts_with("backend ") {
                    failures.push(format!("{phase}: GET {shown:?}: 400 came from the app: {:?}", r.body));
                }
            }
            _ => {}
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} spellings wrong:\n{}",
        failures.len(),
        all_paths().len(),
        failures.join("\n")
    );
    refused
}

fn is_admin(p: &str) -> bool {
    weft_config::glob_match("/admin/*", p)
}

fn is_public(p: &str) -> bool {
    weft_config::glob_match("/public/*", p)
}

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread")]
async fn every_path_spelling_means_one_thing_to_policy_and_app() {
    assert!(all_paths().len() >= 40);
    let m = mesh(&deny_admin()).await;
    wait_status(&m, "/admin/users", 403).await;

    // One refusal is counted once, at the caller's sidecar.
    let before = refused_non_canonical(&m.frontend).await;
    let r = raw(m.frontend.outbound, &get("/admin%2Fusers", &["backend"])).await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("%2F") || r.body.contains("encoded"), "the 400 should say what is wrong: {r:?}");
    let after = refused_non_canonical(&m.frontend).await;
    assert_eq!(after - before, 1.0, "{REFUSED}{{{NON_CANONICAL}}} went {before} -> {after}");

    // DENY /admin/*: everything that is /admin/… once canonical is denied.
    let before = refused_non_canonical(&m.frontend).await;
    let refused = check_paths(&m, "DENY /admin/*", |c| !is_admin(c)).await;
    let after = refused_non_canonical(&m.frontend).await;
    // The HTTP parser itself accepts every spelling above, so each 400 is the mesh's.
    assert_eq!(after - before, refused as f64, "each refused spelling counted once");

    // ALLOW /public/*: only what is /public/… once canonical gets through.
    m.config.write(&allow_public());
    wait_status(&m, "/other", 403).await;
    check_paths(&m, "ALLOW /public/*", is_public).await;

    // The callee's sidecar saw only canonical requests: it refused none.
    assert_eq!(refused_non_canonical(&m.backend).await, 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn opaque_encoded_slashes_stay_encoded_for_policy_and_app() {
    let m = mesh(&with_opaque_slashes(&allow_public())).await;
    wait_status(&m, "/other", 403).await;
    let cases: &[(&str, u16, Option<&str>)] = &[
        ("/public/a%2fb", 200, Some("/public/a%2Fb")),
        ("/public/a%5Cb", 200, Some("/public/a%5Cb")),
        ("/public/a\\b", 200, Some("/public/a%5Cb")),
        // Still one segment: "..%2F.." is not a dot-segment.
        ("/public/..%2F..%2Fadmin", 200, Some("/public/..%2F..%2Fadmin")),
        // '%2F' does not separate segments, so this is not under /public/.
        ("/public%2Fa", 403, None),
        ("/public/a;b", 400, None),
        ("/public/%2e%2e/%2e%2e/x", 400, None),
    ];
    for (spelling, want, seen) in cases {
        let r = raw(m.frontend.outbound, &get(spelling, &["backend"])).await;
        assert_eq!(r.status, *want, "GET {spelling:?}: {r:?}");
        if let Some(seen) = seen {
            assert_eq!(r.body, format!("backend {seen}"), "GET {spelling:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_host_spelling_routes_to_the_service_and_conflicts_are_refused() {
    let m = mesh(&deny_admin()).await;
    let out = m.frontend.outbound;

    // Host spellings of `backend`: routed there (not 503 "no endpoints").
    let hosts = [
        "backend",
        "BACKEND",
        "Backend",
        "Backend:8080",
        "backend:80",
        "backend.",
        "backend.:80",
        "BaCkEnD.:8080",
        "backend:",
    ];
    for host in hosts {
        let r = raw(out, &get("/public/x", &[host])).await;
        assert_eq!((r.status, r.body.as_str()), (200, "backend /public/x"), "Host: {host:?}: {r:?}");
        // The app is told the canonical host.
        let r = raw(out, &get("/echo-headers", &[host])).await;
        assert_eq!(r.status, 200, "Host: {host:?}: {r:?}");
        assert!(r.body.lines().any(|l| l == "host: backend"), "Host: {host:?}: the app saw {:?}", r.body);
    }

    // No canonical host, or more than one host: 400.
    let before = refused_non_canonical(&m.frontend).await;
    let bad: &[&[&str]] = &[
        &["backend.."],
        &[".backend"],
        &["back_end"],
        &["backend:http"],
        &["backend:99999"],
        &["user@backend"],
        &["ba%63kend"],
        &[""],
        &["backend", "backend"],
        &["backend", "admin"],
        &["frontend", "backend"],
    ];
    for hosts in bad {
        let r = raw(out, &get("/public/x", hosts)).await;
        assert_eq!(r.status, 400, "Host: {hosts:?}: {r:?}");
    }
    // Without any Host, HTTP/1.1 has nothing to route by.
    let r = raw(out, b"GET /public/x HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert_eq!(r.status, 400, "{r:?}");
    let after = refused_non_canonical(&m.frontend).await;
    assert!(after - before >= bad.len() as f64, "{REFUSED}{{{NON_CANONICAL}}} went {before} -> {after}");

    // Absolute-form: the target's authority is the host; a Host that names
    // another host is a conflict.
    let abs = |target: &str, host: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes()
    };
    let r = raw(out, &abs("http://backend/public/x", "backend")).await;
    assert_eq!((r.status, r.body.as_str()), (200, "backend /public/x"), "{r:?}");
    let r = raw(out, &abs("http://BACKEND.:8080//public/./x", "backend:8080")).await;
    assert_eq!((r.status, r.body.as_str()), (200, "backend /public/x"), "{r:?}");
    let r = raw(out, &abs("http://backend/public/x", "frontend")).await;
    assert_eq!(r.status, 400, "Host disagreeing with the absolute-form target: {r:?}");
    let r = raw(out, &abs("http://backend/admin%2fusers", "backend")).await;
    assert_eq!(r.status, 400, "{r:?}");
    let r = raw(out, &abs("http://backend//admin/users", "backend")).await;
    assert_eq!((r.status, r.body.trim_end()), (403, DENIED), "{r:?}");

    // HTTP/2 (h2c): a Host header that disagrees with :authority is a conflict.
    assert_eq!(h2_get(out, "http://backend/public/x", None).await, (200, "backend /public/x".into()));
    assert_eq!(h2_get(out, "http://Backend.:8080/%61dmin/users", None).await.0, 403);
    assert_eq!(h2_get(out, "http://backend/public/x", Some("backend")).await.0, 200);
    assert_eq!(h2_get(out, "http://backend/public/x", Some("frontend")).await.0, 400);
}

/// A GET over h2c (prior knowledge) with `uri`'s authority as `:authority`
/// and, if given, a `Host` header too; (status, body).
async fn h2_get(addr: SocketAddr, uri: &str, host: Option<&str>) -> (u16, String) {
    let tcp = TcpStream::connect(addr).await.expect("connect outbound");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut req = http::Request::get(uri);
    if let Some(h) = host {
        req = req.header(http::header::HOST, h);
    }
    let req = req.body(Empty::<Bytes>::new()).expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .unwrap_or_else(|_| panic!("h2 {uri}: no answer within 10s"))
        .unwrap_or_else(|e| panic!("h2 {uri}: {e}"));
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    (status, String::from_utf8_lossy(&body).into_owned())
}

// ------------------------------------------------------------------ inbound edge

/// An mTLS HTTP/2 client holding a real SVID of the mesh (attested with a
/// join token, as a sidecar would), for speaking straight to a sidecar's
/// inbound port: a peer that skips its own sidecar.
struct Peer {
    send: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    _dir: tempfile::TempDir,
}

impl Peer {
    async fn connect(cp: &ControlPlane, name: &str, to: SocketAddr) -> Self {
        use std::sync::Arc;
        use weft_certs::{pki, IdMatcher, SpiffeVerifier, TrustBundle, TrustDomain};
        let dir = tempfile::tempdir().expect("tempdir");
        let bundle = TrustBundle::load(&cp.trust_bundle()).expect("trust bundle");
        let td = TrustDomain::new(TD).expect("trust domain");
        let identity = weft_proxy::identity::Identity::new(
            cp.addr.to_string(),
            bundle,
            pki::control_plane_id(&td),
            dir.path().join(name),
            Arc::new(weft_proxy::metrics::Metrics::default()),
        )
        .expect("identity");
        let token = cp.token_file(&format!("spiffe://{TD}/ns/default/sa/{name}"));
        identity.bootstrap(Some(&token)).await.expect("attest the peer");
        let verifier = SpiffeVerifier::new(identity.bundle.clone(), IdMatcher::TrustDomain(td));
        let tls =
            weft_certs::tls::client_config(Some(identity.resolver.clone()), verifier, &[weft_certs::tls::ALPN_H2]);
        let tcp = TcpStream::connect(to).await.expect("connect inbound");
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(weft_certs::tls::server_name(), tcp)
            .await
            .expect("mTLS with the inbound sidecar");
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.expect("h2 handshake");
        tokio::spawn(conn);
        Self { send, _dir: dir }
    }

    /// GET `uri` (absolute: `:authority` and `:path` as given); (status, body).
    async fn get(&mut self, uri: &str) -> (u16, String) {
        let req = http::Request::get(uri).body(Empty::<Bytes>::new()).expect("request");
        let resp = tokio::time::timeout(Duration::from_secs(10), self.send.send_request(req))
            .await
            .unwrap_or_else(|_| panic!("{uri}: no answer within 10s"))
            .unwrap_or_else(|e| panic!("{uri}: {e}"));
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_that_skips_its_sidecar_gets_no_spelling_past_the_callees_policy() {
    let config = ConfigFile::new(&deny_admin());
    let cp = ControlPlane::start(TD, &["--config", &config.path.display().to_string()]).await;
    let backend_app = servers::http("backend").await;
    let backend = Sidecar::start(&cp, TD, SidecarSpec::new("backend", backend_app.addr)).await;
    let mut peer = Peer::connect(&cp, "frontend", backend.inbound).await;

    // Through the front door: denied as spelled; allowed paths reach the app.
    let (status, body) = peer.get("http://backend/admin/users").await;
    assert_eq!((status, body.trim_end()), (403, DENIED));
    assert_eq!(peer.get("http://backend/public/x").await, (200, "backend /public/x".into()));

    // Spellings the app would read as /admin/users: denied or refused, never served.
    let before = refused_non_canonical(&backend).await;
    let cases: &[(&str, u16)] = &[
        ("http://backend//admin/users", 403),
        ("http://backend/%61dmin/users", 403),
        ("http://backend/public/../admin/users", 403),
        ("http://backend/public/%2e%2e/admin/users", 403),
        ("http://BACKEND.:8080/admin//users", 403),
        ("http://backend/admin%2Fusers", 400),
        ("http://backend/admin;x=1/users", 400),
        ("http://backend/admin\\users", 400),
        ("http://backend/%2e%2e/admin/users", 400),
    ];
    for (uri, want) in cases {
        let (status, body) = peer.get(uri).await;
        assert_eq!(status, *want, "{uri}: {body:?}");
        assert!(!body.starts_with("backend "), "{uri}: reached the app: {body:?}");
    }
    let after = refused_non_canonical(&backend).await;
    assert_eq!(after - before, 4.0, "each inbound refusal counted once");
    // What does get through is canonical for the app too.
    assert_eq!(peer.get("http://backend//public/./x").await, (200, "backend /public/x".into()));
}
