//! End to end: standard Gateway API routes (`gateway.networking.k8s.io/v1`,
//! mesh profile) as users copy them, over the Kubernetes canary pattern: two
//! Services `foo-v1` / `foo-v2` admitting the pods of service account `foo`
//! by their `version` label. A real control plane watches the file; real
//! sidecars front real HTTP servers whose bodies say which one answered.

use std::collections::HashMap;
use std::time::Duration;

use http::Method;
use weft_testkit::mesh::{control_plane, sidecar, tally, App, ConfigFile};
use weft_testkit::servers;

const SERVICES: &str = include_str!("../../config/tests/gateway-api/services.yaml");
const SPLIT: &str = include_str!("../../config/tests/gateway-api/traffic-splitting.yaml");
const HEADERS: &str = include_str!("../../config/tests/gateway-api/header-matching.yaml");

/// The canary split, header matching and membership, through real sidecars.
/// A workload of another service account carrying the same labels
/// (`bar`, version=v1) never receives foo's traffic.
#[tokio::test(flavor = "multi_thread")]
async fn gateway_api_canary_over_two_services_of_one_service_account() {
    let cfg = ConfigFile::new(&format!("{SERVICES}\n---\n{SPLIT}\n---\n{HEADERS}"));
    let cp = control_plane(&cfg).await;
    let (a1, a2, ab, ac) = (
        servers::http("v1").await,
        servers::http("v2").await,
        servers::http("bar").await,
        servers::http("client").await,
    );
    // Both register as their service account's service, foo; the config's
    // `admit` makes each an endpoint of foo-v1 or foo-v2 by its label.
    let _v1 = sidecar(&cp, "foo", a1.addr, &["version=v1"], &[]).await;
    let _v2 = sidecar(&cp, "foo", a2.addr, &["version=v2"], &[]).await;
    let _bar = sidecar(&cp, "bar", ab.addr, &["version=v1"], &[]).await;
    let client = sidecar(&cp, "client", ac.addr, &[], &[]).await;
    client.wait_endpoints("foo-v1", 1, Duration::from_secs(10)).await;
    client.wait_endpoints("foo-v2", 1, Duration::from_secs(10)).await;
    client.wait_endpoints("bar", 1, Duration::from_secs(10)).await;
    let app = App::of(&client);

    let t = tally(&app, "foo", 2000, 8).await;
    assert_eq!(t.others, 0, "every call answered by v1 or v2 (never bar): {t:?}");
    let share = t.v2 as f64 * 100.0 / 2000.0;
    eprintln!("Gateway API canary 90/10: foo-v2 answered {} of 2000 = {share:.2}%", t.v2);
    assert!((7.5..=12.5).contains(&share), "foo-v2 share {share:.2}% is not 10% ± 2.5 points ({t:?})");

    // The header-matching route: a tester's calls, and GET /beta?build=N,
    // go to foo-v2 only, with the request header the rule sets.
    let mut seen = HashMap::new();
    for i in 0..50 {
        let r = app.req(Method::GET, "foo", &format!("/x/{i}"), &[("x-tester", "yes")]).await;
        *seen.entry(r.who().to_string()).or_insert(0) += 1;
    }
    assert_eq!(seen, HashMap::from([("v2".to_string(), 50)]), "x-tester: yes goes to foo-v2");
    let r = app.req(Method::GET, "foo", "/beta/page?build=42", &[]).await;
    assert_eq!(r.who(), "v2", "{r:?}");
    let r = app.req(Method::GET, "foo", "/echo-headers", &[("x-tester", "yes")]).await;
    assert!(r.body.to_lowercase().contains("x-routed-by: weft"), "the rule's filter set the header: {r:?}");
}

/// A GRPCRoute routes gRPC calls (`POST /<service>/<method>`) by the
/// Gateway API's precedence: the exact method match and the service match
/// with a header both beat the catch-all rule.
#[test]
fn grpc_route_precedence() {
    use weft_proxy::state::kept::Kept;
    use weft_proxy::state::routes::{Decision, RequestInfo, Router};
    let text = format!("{SERVICES}\n---\n{}", include_str!("../../config/tests/gateway-api/grpc-route.yaml"));
    let cfg = weft_config::parse(&text).unwrap();
    let budgets = Kept::default();
    let router = Router::new(&cfg, &mut budgets.renew()).unwrap();
    let backend = |path: &str, headers: &[(&'static str, &'static str)]| {
        let mut h = http::HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, http::HeaderValue::from_static(v));
        }
        let req = RequestInfo { method: &Method::POST, path, query: None, headers: &h };
        match router.route("echo", &req) {
            Decision::Rule(rule) => rule.backends[0].service.clone(),
            Decision::Default => "default".into(),
            Decision::NoMatch => "no match".into(),
        }
    };
    assert_eq!(backend("/grpc.examples.echo.Echo/UnaryEcho", &[]), "echo");
    assert_eq!(backend("/grpc.examples.echo.Echo/UnaryEcho", &[("env", "canary")]), "echo-next");
    assert_eq!(backend("/grpc.examples.echo.Echo/EchoStream", &[]), "echo-next");
    assert_eq!(backend("/grpc.examples.echo.EchoX/UnaryEcho", &[("env", "canary")]), "echo", "whole service names");
    assert_eq!(backend("/other.Svc/EchoStream", &[]), "echo");
}
