//! Standard Gateway API documents (`gateway.networking.k8s.io/v1`
//! `HTTPRoute` and `GRPCRoute`, mesh profile) accepted as written. The
//! examples in `tests/gateway-api/` follow the shape of the Gateway API's
//! own `examples/standard` (traffic splitting, header matching, timeouts,
//! GRPCRoute), written fresh for these tests.

use weft_config::{parse, MeshConfig, PathMatchType};

const SERVICES: &str = include_str!("gateway-api/services.yaml");

fn with_services(doc: &str) -> String {
    format!("{SERVICES}\n---\n{doc}")
}

fn ok(doc: &str) -> MeshConfig {
    parse(&with_services(doc)).unwrap_or_else(|e| panic!("{e}"))
}

fn errors(doc: &str) -> Vec<String> {
    parse(&with_services(doc)).expect_err("should be rejected").0.iter().map(ToString::to_string).collect()
}

#[test]
fn traffic_splitting_between_two_services() {
    let cfg = ok(include_str!("gateway-api/traffic-splitting.yaml"));
    let route = &cfg.routes[0];
    assert_eq!(route.name, "foo-split");
    let parent = &route.spec.parent_refs[0];
    assert_eq!((parent.group.as_deref(), parent.kind.as_str(), parent.name.as_str()), (Some(""), "Service", "foo"));
    assert_eq!(parent.port, Some(8080));
    let backends: Vec<_> =
        route.spec.rules[0].backend_refs.iter().map(|b| (b.name.as_str(), b.port, b.weight)).collect();
    assert_eq!(backends, [("foo-v1", Some(8080), 90), ("foo-v2", Some(8080), 10)]);
    // foo-v1 and foo-v2 admit the pods of service account foo by version.
    let admit = cfg.services["foo-v2"].admit.as_ref().unwrap();
    assert_eq!(admit.service_accounts, ["foo"]);
    assert_eq!(admit.labels["version"], "v2");
}

#[test]
fn header_matching_and_filters() {
    let cfg = ok(include_str!("gateway-api/header-matching.yaml"));
    let rules = &cfg.routes[0].spec.rules;
    assert_eq!(rules[0].matches[0].headers[0].name, "x-tester");
    assert_eq!(rules[0].matches[1].query_params[0].name, "build");
    let catch_all = rules[1].matches[0].path.as_ref().unwrap();
    assert_eq!((catch_all.kind, catch_all.value.as_str()), (PathMatchType::PathPrefix, "/"), "value defaults to /");
}

#[test]
fn timeouts() {
    let cfg = ok(include_str!("gateway-api/timeouts.yaml"));
    let t = cfg.routes[0].spec.rules[0].timeouts.as_ref().unwrap();
    assert_eq!(t.request.unwrap().0.as_secs(), 10);
    assert_eq!(t.backend_request.unwrap().0.as_secs(), 2);
}

#[test]
fn grpc_routes_become_routes_over_grpc_paths() {
    let cfg = ok(include_str!("gateway-api/grpc-route.yaml"));
    assert_eq!(cfg.grpc_routes.len(), 1);
    let route = cfg.routes.iter().find(|r| r.name == "echo-route").expect("compiled into routes");
    let paths: Vec<_> = route.spec.rules[0]
        .matches
        .iter()
        .map(|m| {
            let p = m.path.as_ref().unwrap();
            (p.kind, p.value.as_str(), m.headers.len())
        })
        .collect();
    assert_eq!(
        paths,
        [
            (PathMatchType::PathPrefix, "/grpc.examples.echo.Echo", 1),
            (PathMatchType::Exact, "/grpc.examples.echo.Echo/EchoStream", 0),
        ]
    );
    assert!(route.spec.rules[1].matches.is_empty());
    // What sidecars receive carries the compiled route only.
    let json = serde_json::to_string(&cfg).unwrap();
    let back: MeshConfig = serde_json::from_str(&json).unwrap();
    assert!(back.grpc_routes.is_empty() && back.routes.iter().any(|r| r.name == "echo-route"));
}

#[test]
fn every_example_together() {
    let all = [
        include_str!("gateway-api/traffic-splitting.yaml"),
        include_str!("gateway-api/header-matching.yaml"),
        include_str!("gateway-api/timeouts.yaml"),
        include_str!("gateway-api/grpc-route.yaml"),
    ]
    .join("\n---\n");
    assert_eq!(ok(&all).routes.len(), 4);
}

#[test]
fn standard_fields_weft_lacks_are_named_not_unknown() {
    let errs = errors(include_str!("gateway-api/not-implemented.yaml"));
    let want = [
        "spec.hostnames: not implemented yet in weft",
        "spec.parentRefs[0].sectionName: not implemented yet in weft",
        "spec.rules[0].sessionPersistence: not implemented yet in weft",
        "spec.rules[0].filters[0].type: not implemented yet in weft: the HTTPRoute filter \"URLRewrite\"",
        "spec.rules[0].filters[1].type: not implemented yet in weft: the HTTPRoute filter \"RequestMirror\"",
        "spec.rules[0].backendRefs[0].filters: not implemented yet in weft",
        "spec.rules[0].backendRefs[0].namespace: not implemented yet in weft: references across namespaces",
    ];
    assert_eq!(errs.len(), want.len(), "{errs:#?}");
    for w in want {
        assert!(errs.iter().any(|e| e.contains(w)), "no error contains {w:?}: {errs:#?}");
    }
    assert!(!errs.iter().any(|e| e.contains("unknown field")), "{errs:#?}");
}

const SPLIT_HEAD: &str = "kind: HTTPRoute\nmetadata: {name: r}\nspec:\n";

fn route_doc(api: &str, spec: &str) -> String {
    format!("apiVersion: {api}\n{SPLIT_HEAD}{spec}")
}

#[test]
fn refusals_name_the_fix() {
    let v1 = "gateway.networking.k8s.io/v1";
    let rules = "  rules:\n  - backendRefs: [{name: foo-v1, port: 8080}]\n";
    let one = |doc: String| {
        let errs = errors(&doc);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        errs[0].clone()
    };

    let e = one(route_doc("gateway.networking.k8s.io/v1beta1", &format!("  parentRefs: [{{name: foo}}]\n{rules}")));
    assert!(e.contains("apiVersion") && e.contains("use gateway.networking.k8s.io/v1"), "{e}");

    let e = one(route_doc(
        v1,
        &format!("  parentRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: gw}}]\n{rules}"),
    ));
    assert!(e.contains("spec.parentRefs[0].group: Gateway parents are not implemented yet"), "{e}");
    assert!(e.contains("mesh (GAMMA) profile"), "{e}");

    let e =
        one(route_doc(v1, &format!("  parentRefs: [{{group: \"\", kind: Service, name: foo, port: 80}}]\n{rules}")));
    assert!(e.contains("spec.parentRefs[0].port: Service \"foo\" has port 8080, not 80"), "{e}");

    let e = one(route_doc(v1, "  parentRefs: [{name: foo}]\n  rules:\n  - backendRefs: [{name: foo-v1, port: 9}]\n"));
    assert!(e.contains("spec.rules[0].backendRefs[0].port: Service \"foo-v1\" has port 8080, not 9"), "{e}");

    let e = one(route_doc(
        v1,
        "  parentRefs: [{name: foo}]\n  rules:\n  - backendRefs: [{group: example.com, kind: Bucket, name: foo-v1}]\n",
    ));
    assert!(e.contains("spec.rules[0].backendRefs[0].group: \"example.com\" is not supported"), "{e}");

    // Other Gateway API kinds, and weft kinds under the Gateway API's version.
    let e = one(format!("apiVersion: {v1}\nkind: Gateway\nmetadata: {{name: gw}}\nspec: {{}}\n"));
    assert!(e.contains("the Gateway API kind \"Gateway\" is not implemented yet"), "{e}");
    let e = one(format!("apiVersion: {v1}\nkind: Service\nmetadata: {{name: x}}\nspec: {{}}\n"));
    assert!(e.contains("use weft.dev/v1alpha1"), "{e}");

    // A typo in a field weft implements is still an unknown field.
    let e = one(route_doc(v1, "  parentRefs: [{name: foo}]\n  rules:\n  - backendRefs: [{name: foo-v1, wieght: 2}]\n"));
    assert!(e.contains("unknown field `wieght`"), "{e}");
}

#[test]
fn grpc_method_matches_are_checked() {
    let doc = |method: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: g}}\nspec:\n  parentRefs: [{{name: echo}}]\n  rules:\n  - matches: [{{method: {method}}}]\n    backendRefs: [{{name: echo}}]\n"
        )
    };
    let errs = errors(&doc("{}"));
    assert!(
        errs.len() == 1 && errs[0].contains("spec.rules[0].matches[0].method: set service, method or both"),
        "{errs:#?}"
    );
    let errs = errors(&doc("{service: 'not a service'}"));
    assert!(errs.len() == 1 && errs[0].contains("is not a gRPC service name"), "{errs:#?}");
    let errs = errors(&doc("{type: RegularExpression, method: 'Get('}"));
    assert!(errs.len() == 1 && errs[0].contains("regular expression does not compile"), "{errs:#?}");
    let errs = errors(
        &doc("{service: a.B}")
            .replace("kind: GRPCRoute\nmetadata: {name: g}", "kind: GRPCRoute\nmetadata: {name: g}\n")
            .replace("name: echo}]\n  rules", "name: echo}]\n  hostnames: [x]\n  rules"),
    );
    assert!(errs.len() == 1 && errs[0].contains("spec.hostnames: not implemented yet"), "{errs:#?}");
    let cfg = ok(&doc("{type: RegularExpression, service: 'grpc\\.health\\..*'}"));
    let p = cfg.routes[0].spec.rules[0].matches[0].path.as_ref().unwrap();
    assert_eq!((p.kind, p.value.as_str()), (PathMatchType::RegularExpression, "/(?:grpc\\.health\\..*)/[^/]+"));
}

#[test]
fn admit_needs_a_service_account() {
    let svc = "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: x}\nspec: {admit: {serviceAccounts: [], labels: {a: b}}}\n";
    let errs = errors(svc);
    assert!(
        errs.len() == 1 && errs[0].contains("spec.admit.serviceAccounts: name at least one service account"),
        "{errs:#?}"
    );
    let svc = "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: x}\nspec: {admit: {serviceAccounts: [a/b/c]}}\n";
    let errs = errors(svc);
    assert!(errs.len() == 1 && errs[0].contains("is not `name` or `namespace/name`"), "{errs:#?}");
}
