//! End to end, issue #9: gRPC classified by `grpc-status`, and the
//! sidecar's own failures answered in gRPC form. A real control plane, real
//! sidecars in front of tonic Echo servers (testkit), and a real tonic client
//! calling through its sidecar's outbound listener.
//!
//! - Local errors (denied, no endpoints, timeout, rate limited, unknown
//!   service) reach a gRPC caller as HTTP 200 with grpc-status 7/14/4/8/12
//!   and the sidecar's message in grpc-message, not as 403/503/504/429 with
//!   a text body.
//! - A replica answering every call with grpc-status 14 (UNAVAILABLE) is a
//!   failing endpoint: outlier detection ejects it and the balancer does not
//!   prefer it for failing fast; metrics carry `grpc_status`.

use std::time::Duration;

use tonic::transport::Channel;
use weft_testkit::mesh::{control_plane, ConfigFile, TD};
use weft_testkit::servers::{self, echo};
use weft_testkit::{metric_sum, Sidecar, SidecarSpec};

const SERVICES: &str = r#"apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: web}
spec: {port: 8080}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: api}
spec: {port: 8080, protocol: grpc}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: empty}
spec: {port: 8080, protocol: grpc}
---
apiVersion: weft.dev/v1alpha1
kind: HTTPRoute
metadata: {name: api-timeout}
spec:
  parentRefs: [{name: api}]
  rules:
    - backendRefs: [{name: api}]
      timeouts: {request: 300ms}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: api-no-secrets}
spec:
  targetRef: {name: api}
  action: DENY
  rules:
    - to: [{paths: ["/weft.testing.v1.Echo/Bidi"]}]
---
apiVersion: weft.dev/v1alpha1
kind: RateLimit
metadata: {name: api-bidi-limit}
spec:
  targetRef: {name: api}
  requestsPerSecond: 1
  burst: 1
  paths: ["/weft.testing.v1.Echo/Unary"]
"#;

async fn grpc_sidecar(cp: &weft_testkit::ControlPlane, service: &str, app: std::net::SocketAddr) -> Sidecar {
    let spec = SidecarSpec { service, app, upstreams: &[], labels: &[], extra_args: &["--app-protocol", "h2c"] };
    Sidecar::start(cp, TD, spec).await
}

/// An Echo client for `service`, through `sidecar`'s outbound listener.
async fn client(sidecar: &Sidecar, service: &str) -> echo::echo_client::EchoClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", sidecar.outbound))
        .expect("endpoint")
        .origin(format!("http://{service}").parse().expect("origin"))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect to the outbound listener");
    echo::echo_client::EchoClient::new(channel)
}

fn msg(seq: u64) -> echo::Msg {
    echo::Msg { seq, payload: b"hi".to_vec() }
}

/// The status of a unary call that must fail.
async fn failed_unary(c: &mut echo::echo_client::EchoClient<Channel>, sleep_ms: Option<u64>) -> tonic::Status {
    let mut req = tonic::Request::new(msg(1));
    if let Some(ms) = sleep_ms {
        req.metadata_mut().insert("x-sleep-ms", ms.to_string().parse().expect("metadata"));
    }
    match c.unary(req).await {
        Ok(r) => panic!("the call succeeded: {:?}", r.into_inner()),
        Err(status) => status,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn local_errors_reach_grpc_callers_as_grpc_status_and_message() {
    let cfg = ConfigFile::new(SERVICES);
    let cp = control_plane(&cfg).await;
    let (api_app, web_app) = (servers::grpc_echo().await, servers::http("web").await);
    let api = grpc_sidecar(&cp, "api", api_app.addr).await;
    let web = Sidecar::start(&cp, TD, SidecarSpec::new("web", web_app.addr)).await;
    web.wait_endpoints("api", 1, Duration::from_secs(15)).await;
    let mut c = client(&web, "api").await;

    // Allowed: through, and counted with grpc_status 0 (read from the trailers).
    let reply = c.unary(msg(7)).await.expect("unary through the mesh");
    assert_eq!(reply.into_inner().seq, 7);

    // Rate limited (1/s, burst 1, on Unary): RESOURCE_EXHAUSTED from the callee's sidecar.
    let mut limited = None;
    for _ in 0..5 {
        if let Err(s) = c.unary(msg(2)).await {
            limited = Some(s);
            break;
        }
    }
    let s = limited.expect("a call past the rate limit");
    assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
    assert_eq!(s.message(), "weft: rate limit exceeded", "{s:?}");
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // Timed out (the route's 300 ms request timeout; the app takes 2 s): DEADLINE_EXCEEDED.
    let s = failed_unary(&mut c, Some(2000)).await;
    assert_eq!(s.code(), tonic::Code::DeadlineExceeded, "{s:?}");
    assert!(s.message().starts_with("weft: api did not answer within the route's 300ms request timeout"), "{s:?}");

    // Denied (DENY on the Bidi method): PERMISSION_DENIED, the sidecar's words.
    let s = c.bidi(futures::stream::iter(vec![msg(1)])).await.expect_err("denied");
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert_eq!(s.message(), "weft: request denied by authorization policy", "{s:?}");

    // A declared service with no endpoints: UNAVAILABLE.
    let s = failed_unary(&mut client(&web, "empty").await, None).await;
    assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
    assert_eq!(s.message(), "weft: no endpoints for service \"empty\"", "{s:?}");

    // A service the mesh does not know: UNIMPLEMENTED.
    let s = failed_unary(&mut client(&web, "nowhere").await, None).await;
    assert_eq!(s.code(), tonic::Code::Unimplemented, "{s:?}");
    assert_eq!(s.message(), "weft: no service named \"nowhere\" in the mesh; send Host: <service>", "{s:?}");

    // Metrics carry the gRPC status on both sides.
    let wm = web.metrics().await;
    let out = |labels: &[&str]| {
        let mut all = vec!["direction=\"outbound\"", "service=\"api\""];
        all.extend_from_slice(labels);
        metric_sum(&wm, "weft_proxy_requests_total", &all)
    };
    assert!(out(&["code=\"200\"", "grpc_status=\"0\""]) >= 1.0, "{wm}");
    assert!(out(&["grpc_status=\"8\""]) >= 1.0, "{wm}");
    assert!(out(&["grpc_status=\"4\""]) >= 1.0, "{wm}");
    assert!(out(&["grpc_status=\"7\""]) >= 1.0, "{wm}");
    let am = api.metrics().await;
    let inbound_denied = metric_sum(&am, "weft_proxy_requests_total", &["direction=\"inbound\"", "grpc_status=\"7\""]);
    assert!(inbound_denied >= 1.0, "{am}");
    assert!(metric_sum(&wm, "weft_proxy_requests_refused_total", &["reason=\"unknown_service\""]) >= 1.0, "{wm}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_failing_every_call_with_unavailable_is_ejected_not_preferred() {
    let cfg = ConfigFile::new(
        "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: echo}\nspec: {port: 8080, protocol: grpc}\n",
    );
    let cp = control_plane(&cfg).await;
    let good_app = servers::grpc_echo().await;
    let (bad_app, bad_calls) = servers::grpc_failing(tonic::Code::Unavailable).await;
    let web_app = servers::http("web").await;
    let _good = grpc_sidecar(&cp, "echo", good_app.addr).await;
    let _bad = grpc_sidecar(&cp, "echo", bad_app.addr).await;
    let web = Sidecar::start(&cp, TD, SidecarSpec::new("web", web_app.addr)).await;
    web.wait_endpoints("echo", 2, Duration::from_secs(15)).await;
    let c = client(&web, "echo").await;

    // Calls of 10 ms, 4 at a time: the good replica is busy, the bad one
    // fails in a moment. Counted as successes (HTTP 200), the bad replica
    // would look the fastest and draw the traffic.
    let batch = |n: usize| {
        let c = c.clone();
        async move {
            let mut outcomes = Vec::new();
            for chunk in 0..n / 4 {
                let calls = (0..4).map(|i| {
                    let mut c = c.clone();
                    async move {
                        let mut req = tonic::Request::new(msg((chunk * 4 + i) as u64));
                        req.metadata_mut().insert("x-sleep-ms", "10".parse().expect("metadata"));
                        c.unary(req).await.map(|_| ()).map_err(|s| s.code())
                    }
                });
                outcomes.extend(futures::future::join_all(calls).await);
            }
            outcomes
        }
    };
    let first = batch(20).await;
    let bad_first = bad_calls.load(std::sync::atomic::Ordering::SeqCst);
    for o in &first {
        assert!(matches!(o, Ok(()) | Err(tonic::Code::Unavailable)), "{first:?}");
    }
    let window = batch(48).await;
    let bad_window = bad_calls.load(std::sync::atomic::Ordering::SeqCst) - bad_first;
    let failed_window = window.iter().filter(|o| o.is_err()).count();
    eprintln!("the UNAVAILABLE replica got {bad_first} of the first 20 calls, {bad_window} of the next 48");
    assert!(bad_first >= 1, "the failing replica got traffic at first");
    assert!(bad_window <= 2, "the failing replica still got {bad_window} of 48 calls");
    assert!(failed_window <= 2, "{failed_window} of 48 calls failed: {window:?}");

    let wm = web.metrics().await;
    assert!(metric_sum(&wm, "weft_proxy_endpoint_ejections_total", &[]) >= 1.0, "{wm}");
    let unavailable =
        metric_sum(&wm, "weft_proxy_requests_total", &["service=\"echo\"", "code=\"200\"", "grpc_status=\"14\""]);
    assert!(unavailable >= bad_first as f64, "every UNAVAILABLE is counted with its grpc_status: {wm}");
}
