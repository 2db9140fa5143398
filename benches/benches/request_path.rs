//! The per-request work a sidecar does off the network, for one request:
//! routing on the outbound side (canonical form, service, HTTPRoute rule,
//! weighted backend, the request's context), the authorization check on the
//! inbound side (AuthorizationPolicies against the caller's SPIFFE ID), and
//! the per-route metrics of the response (latency histogram, request
//! counter). All on the current config snapshot, as on the data path.
//!
//! `cargo bench -p weft-benches --bench request_path`

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use weft_certs::SpiffeId;
use weft_proto::config::v1 as pb;
use weft_proxy::http::{boxed, empty};
use weft_proxy::metrics::{Metrics, RequestMeta};
use weft_proxy::outbound::route;
use weft_proxy::state::{authz, State};

const CONFIG: &str = r#"apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: api}
spec:
  port: 8080
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
---
apiVersion: weft.dev/v1alpha1
kind: HTTPRoute
metadata: {name: api-routes}
spec:
  parentRefs: [{name: api}]
  rules:
    - name: canary
      matches:
        - headers: [{name: x-canary, value: "true"}]
      backendRefs: [{name: api, subset: v2}]
    - name: items
      matches:
        - path: {type: PathPrefix, value: /v1/items}
      backendRefs: [{name: api, subset: v1, weight: 90}, {name: api, subset: v2, weight: 10}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-admin}
spec:
  targetRef: {name: api}
  action: DENY
  rules:
    - to: [{paths: ["/admin/*"]}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-web}
spec:
  targetRef: {name: api}
  action: ALLOW
  rules:
    - from: [{identities: ["spiffe://example.org/ns/default/sa/web"]}]
      to: [{paths: ["/v1/*"], methods: [GET]}]
"#;

fn state() -> (Arc<State>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let state = State::new("api", metrics.clone());
    let cfg = weft_config::parse(CONFIG).expect("bench config");
    let endpoint = |port: u16, version: &str| pb::Endpoint {
        address: format!("127.0.0.1:{port}"),
        spiffe_id: "spiffe://example.org/ns/default/sa/api".into(),
        labels: [("version".to_string(), version.to_string())].into_iter().collect(),
    };
    let snapshot = pb::Snapshot {
        version: 1,
        services: vec![pb::Service { name: "api".into(), endpoints: vec![endpoint(1, "v1"), endpoint(2, "v2")] }],
        mesh_config_json: serde_json::to_string(&cfg).expect("config JSON"),
        ..Default::default()
    };
    state.apply(&snapshot).expect("bench snapshot applies");
    (state, metrics)
}

fn request_path(c: &mut Criterion) {
    let (state, metrics) = state();
    let peer = SpiffeId::parse("spiffe://example.org/ns/default/sa/web").expect("SPIFFE ID");
    let mut g = c.benchmark_group("request_path");
    g.bench_function("route+authz+metrics", |b| {
        b.iter(|| {
            let snapshot = state.snapshot();
            let req = Request::get("/v1/items/42?view=full")
                .header("host", "api")
                .header("user-agent", "bench")
                .body(boxed(http_body_util::Empty::<Bytes>::new()))
                .expect("request");
            let mut meta = RequestMeta::default();
            let routed = route::route(&snapshot, req, &mut meta).unwrap_or_else(|_| panic!("routed"));
            let check = authz::Request {
                method: Some(routed.req.method()),
                path: Some(routed.req.uri().path()),
                port: snapshot.authz.port(),
            };
            let decision = snapshot.authz.check(&peer, &check);
            assert!(decision.allowed, "{decision:?}");
            let resp = Response::new(empty());
            metrics.response("outbound", &routed.service, meta, resp, 0.000_5)
        })
    });
    g.finish();
}

criterion_group!(benches, request_path);
criterion_main!(benches);
