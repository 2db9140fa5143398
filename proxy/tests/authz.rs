//! End to end: AuthorizationPolicy (ALLOW / DENY rules, the mesh's default
//! deny) over HTTP and TCP, decided on the callee's sidecar from the caller's
//! mTLS identity, never from a header the caller sets.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_testkit::mesh::{control_plane, sidecar, App, ConfigFile, TD};
use weft_testkit::{metric_sum, servers};

const DENIED: &str = "weft: request denied by authorization policy";

fn id(service: &str) -> String {
    format!("spiffe://{TD}/ns/default/sa/{service}")
}

// ------------------------------------------------------------------ 6. authorization

const AUTHZ: &str = r#"apiVersion: weft.dev/v1alpha1
kind: Mesh
metadata: {name: mesh}
spec: {defaultPolicy: deny}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: secure}
spec: {port: 8080}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: locked}
spec: {port: 8080}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: echo}
spec: {port: 7000, protocol: tcp}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-frontend}
spec:
  targetRef: {name: secure}
  action: ALLOW
  rules:
    - from: [{identities: ["spiffe://example.org/ns/default/sa/frontend"]}]
      to: [{paths: ["/api/*", "/public"]}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-public-reads}
spec:
  targetRef: {name: secure}
  action: ALLOW
  rules:
    - to: [{paths: ["/public", "/echo-headers"], methods: [GET]}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-admin-writes}
spec:
  targetRef: {name: secure}
  action: DENY
  rules:
    - to: [{paths: ["/api/admin/*"], methods: [POST, DELETE]}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: echo-open}
spec:
  targetRef: {name: echo}
  action: ALLOW
  rules: [{}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: echo-no-intruder}
spec:
  targetRef: {name: echo}
  action: DENY
  rules:
    - from: [{identities: ["spiffe://example.org/ns/default/sa/intruder"]}]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn authorization_matrix_http_and_tcp() {
    let cfg = ConfigFile::new(AUTHZ);
    let cp = control_plane(&cfg).await;
    let (secure_app, locked_app, caller_app) =
        (servers::http("secure").await, servers::http("locked").await, servers::http("caller").await);
    let (echo_server, echo_conns) = servers::tcp_echo_counting().await;
    let echo_addr = echo_server.addr;
    let secure = sidecar(&cp, "secure", secure_app.addr, &[], &[]).await;
    let locked = sidecar(&cp, "locked", locked_app.addr, &[], &[]).await;
    let echo = sidecar(&cp, "echo", echo_addr, &[], &[]).await;
    let frontend = sidecar(&cp, "frontend", caller_app.addr, &[], &["echo"]).await;
    let intruder = sidecar(&cp, "intruder", caller_app.addr, &[], &["echo"]).await;
    for s in [&frontend, &intruder] {
        for svc in ["secure", "locked", "echo"] {
            s.wait_endpoints(svc, 1, Duration::from_secs(10)).await;
        }
    }
    let callers = [("frontend", App::of(&frontend)), ("intruder", App::of(&intruder))];

    let (get, post, delete) = (Method::GET, Method::POST, Method::DELETE);
    #[rustfmt::skip]
    let matrix: &[(&str, &str, &Method, &str, u16)] = &[
        // caller,   service,  method,  path,              expected
        ("frontend", "secure", &get,    "/api/items",       200),
        ("frontend", "secure", &post,   "/api/items",       200),
        ("frontend", "secure", &delete, "/api/items",       200),
        ("frontend", "secure", &get,    "/api/admin/users", 200),
        ("frontend", "secure", &post,   "/api/admin/users", 403), // deny wins over allow
        ("frontend", "secure", &delete, "/api/admin/users", 403),
        ("frontend", "secure", &get,    "/public",          200),
        ("frontend", "secure", &delete, "/public",          200),
        ("frontend", "secure", &get,    "/private",         403), // no ALLOW matches
        ("intruder", "secure", &get,    "/api/items",       403),
        ("intruder", "secure", &post,   "/api/items",       403),
        ("intruder", "secure", &get,    "/public",          200), // allow-public-reads
        ("intruder", "secure", &post,   "/public",          403),
        ("intruder", "secure", &delete, "/public",          403),
        ("intruder", "secure", &get,    "/private",         403),
        ("frontend", "locked", &get,    "/anything",        403), // mesh default deny
        ("intruder", "locked", &get,    "/anything",        403),
        ("frontend", "locked", &post,   "/anything",        403),
    ];
    let policy_names = ["allow-frontend", "allow-public-reads", "deny-admin-writes", "no-allow-match", "default"];
    let (mut denied, mut allowed) = (0.0, 0.0);
    for (caller, service, method, path, want) in matrix {
        let app = &callers.iter().find(|(n, _)| n == caller).unwrap().1;
        let r = app.req((*method).clone(), service, path, &[]).await;
        let case = format!("{caller} {method} {service}{path}");
        assert_eq!(r.status, *want, "{case}: {r:?}");
        if *want == 403 {
            assert_eq!(r.body.trim_end(), DENIED, "{case}");
            for p in policy_names {
                assert!(!r.body.contains(p), "{case}: policy name leaked: {r:?}");
            }
        } else if *method != Method::POST {
            assert_eq!(r.body, format!("{service} {path}"), "{case}");
        }
        if *service == "secure" {
            if *want == 403 {
                denied += 1.0;
            } else {
                allowed += 1.0;
            }
        }
    }

    // A caller claiming to be frontend in the identity header gets nowhere.
    let intruder_app = &callers[1].1;
    let forged = [("x-weft-peer-id", "spiffe://example.org/ns/default/sa/frontend")];
    let r = intruder_app.req(Method::GET, "secure", "/api/items", &forged).await;
    assert_eq!((r.status, r.body.trim_end()), (403, DENIED), "{r:?}");
    denied += 1.0;
    // Where it is let in, the app sees its real identity, not the forged one.
    let r = intruder_app.req(Method::GET, "secure", "/echo-headers", &forged).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.body.contains(&format!("x-weft-peer-id: {}", id("intruder"))) && !r.body.contains("sa/frontend"),
        "{}",
        r.body
    );
    allowed += 1.0;

    // Decisions are counted on the callee's sidecar, by policy.
    let sm = secure.metrics().await;
    let authz = "weft_proxy_authz_decisions_total";
    assert_eq!(metric_sum(&sm, authz, &["outcome=\"deny\"", "protocol=\"http\""]), denied, "{sm}");
    assert_eq!(metric_sum(&sm, authz, &["outcome=\"allow\""]), allowed, "{sm}");
    assert_eq!(metric_sum(&sm, authz, &["outcome=\"deny\"", "policy=\"deny-admin-writes\""]), 2.0, "{sm}");
    let lm = locked.metrics().await;
    assert_eq!(metric_sum(&lm, authz, &["outcome=\"deny\"", "policy=\"default\""]), 3.0, "{lm}");

    // TCP: frontend's connection is carried, intruder's closed at once.
    let mut ok = tokio::net::TcpStream::connect(frontend.upstream("echo")).await.unwrap();
    ok.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), ok.read_exact(&mut buf))
        .await
        .expect("echo answered")
        .expect("echo read");
    assert_eq!(&buf, b"ping");
    assert_eq!(echo_conns.load(Ordering::SeqCst), 1);

    let mut no = tokio::net::TcpStream::connect(intruder.upstream("echo")).await.unwrap();
    let _ = no.write_all(b"ping").await;
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), no.read(&mut buf))
        .await
        .expect("a denied TCP connection is closed, not left hanging");
    assert!(matches!(read, Ok(0) | Err(_)), "denied TCP connection got data: {read:?}");
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(echo_conns.load(Ordering::SeqCst), 1, "nothing of the denied connection reached the echo server");
    let em = echo.metrics().await;
    assert_eq!(
        metric_sum(&em, authz, &["outcome=\"deny\"", "protocol=\"tcp\"", "policy=\"echo-no-intruder\""]),
        1.0,
        "{em}"
    );
    drop(ok);
    drop(echo_server);
}
