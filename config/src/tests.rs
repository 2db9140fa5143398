use super::*;

const HEAD: &str = "apiVersion: weft.dev/v1alpha1\n";

fn svc(name: &str) -> String {
    format!("{HEAD}kind: Service\nmetadata: {{name: {name}}}\nspec:\n  port: 80\n  subsets:\n    - name: v1\n      labels: {{version: v1}}\n    - name: v2\n      labels: {{version: v2}}\n")
}

fn route(spec: &str) -> String {
    format!("{HEAD}kind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n{spec}")
}

fn errors(text: &str) -> Vec<String> {
    parse(text).expect_err("config should be rejected").0.iter().map(|e| e.to_string()).collect()
}

fn one_error(text: &str) -> String {
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    errs[0].clone()
}

#[test]
fn the_example_is_valid() {
    let cfg = parse(include_str!("../../examples/canary.yaml")).unwrap();
    assert_eq!(cfg.services.len(), 3);
    assert_eq!(cfg.workloads.len(), 4);
    assert_eq!(cfg.routes[0].spec.rules[1].backend_refs[0].weight, 90);
    assert_eq!(cfg.policies.len(), 2);
    // Round-trips through the JSON pushed to sidecars.
    let json = serde_json::to_string(&cfg).unwrap();
    let back: MeshConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back.routes[0].spec.rules[1].timeouts.as_ref().unwrap().request.unwrap().0.as_secs(), 2);
}

#[test]
fn bad_yaml() {
    let e = one_error("kind: [unclosed");
    assert!(e.contains("document 1") && e.contains("not valid YAML"), "{e}");
}

#[test]
fn unknown_kind_and_field() {
    let e = one_error(&format!("{HEAD}kind: Gateway\nmetadata: {{name: g}}\nspec: {{}}\n"));
    assert!(e.contains("Gateway \"g\" (document 1): kind: unknown kind \"Gateway\""), "{e}");
    let e = one_error(&format!("{HEAD}kind: Service\nmetadata: {{name: s}}\nspec: {{port: 80, protocl: http}}\n"));
    assert!(e.contains("Service \"s\" (document 1): spec.protocl: unknown field `protocl`"), "{e}");
    let text = format!(
        "{}---\n{}",
        svc("b"),
        route("  parentRefs: [{name: b}]\n  rules:\n    - backendRefs: [{name: b, wieght: 3}]\n")
    );
    let e = one_error(&text);
    assert!(e.contains("HTTPRoute \"r\" (document 2): spec.rules[0].backendRefs[0]") && e.contains("wieght"), "{e}");
    let e = one_error("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {}\n");
    assert!(e.contains("apiVersion") && e.contains("weft.dev/v1alpha1"), "{e}");
}

#[test]
fn weights_must_make_sense() {
    let text = format!(
        "{}---\n{}",
        svc("b"),
        route("  parentRefs: [{name: b}]\n  rules:\n    - backendRefs: [{name: b, subset: v1, weight: 0}, {name: b, subset: v2, weight: 0}]\n")
    );
    assert!(one_error(&text).contains("spec.rules[0].backendRefs: weights add up to 0"));
    let text = format!(
        "{}---\n{}",
        svc("b"),
        route("  parentRefs: [{name: b}]\n  rules:\n    - backendRefs: [{name: b, weight: -5}]\n")
    );
    assert!(one_error(&text).contains("spec.rules[0].backendRefs[0].weight"));
}

#[test]
fn regexes_must_compile() {
    let text = format!(
        "{}---\n{}",
        svc("b"),
        route("  parentRefs: [{name: b}]\n  rules:\n    - matches: [{path: {type: RegularExpression, value: '/a(['}}]\n      backendRefs: [{name: b}]\n")
    );
    let e = one_error(&text);
    assert!(e.contains("spec.rules[0].matches[0].path.value: regular expression does not compile"), "{e}");
}

#[test]
fn references_must_exist() {
    let text = format!(
        "{}---\n{}",
        svc("b"),
        route("  parentRefs: [{name: nope}]\n  rules:\n    - backendRefs: [{name: b, subset: v3}, {name: ghost}]\n")
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert!(errs[0].contains("spec.parentRefs[0].name: Service \"nope\" does not exist"));
    assert!(errs[1].contains("spec.rules[0].backendRefs[0].subset: Service \"b\" has no subset \"v3\""));
    assert!(errs[2].contains("spec.rules[0].backendRefs[1].name: Service \"ghost\" does not exist"));
    let policy = format!(
        "{HEAD}kind: AuthorizationPolicy\nmetadata: {{name: p}}\nspec: {{targetRef: {{name: ghost}}, action: DENY}}\n"
    );
    assert!(one_error(&policy).contains("spec.targetRef.name: Service \"ghost\" does not exist"));
}

#[test]
fn policy_fields_are_checked() {
    let text = format!(
        "{}---\n{HEAD}kind: AuthorizationPolicy\nmetadata: {{name: p}}\nspec:\n  targetRef: {{name: b}}\n  action: ALLOW\n  rules:\n    - from: [{{identities: ['spiffe://Bad/x']}}]\n      to: [{{methods: [FETCH], paths: ['api']}}]\n",
        svc("b")
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert!(errs[0].contains("spec.rules[0].from[0].identities[0]"));
    assert!(errs[1].contains("spec.rules[0].to[0].paths[0]"));
    assert!(errs[2].contains("spec.rules[0].to[0].methods[0]: \"FETCH\" is not an HTTP method"));
    let bad_action = format!("{}---\n{HEAD}kind: AuthorizationPolicy\nmetadata: {{name: p}}\nspec: {{targetRef: {{name: b}}, action: MAYBE}}\n", svc("b"));
    assert!(one_error(&bad_action).contains("spec.action"));
}

#[test]
fn durations_and_duplicates() {
    let text = format!(
        "{}---\n{}",
        svc("b"),
        route("  parentRefs: [{name: b}]\n  rules:\n    - backendRefs: [{name: b}]\n      timeouts: {request: soon}\n")
    );
    assert!(one_error(&text).contains("spec.rules[0].timeouts.request"));
    let dup = format!("{}---\n{}", svc("b"), svc("b"));
    assert!(one_error(&dup).contains("another Service is already named \"b\""));
}

#[test]
fn globs() {
    assert!(glob_match("/api/*", "/api/x/y"));
    assert!(!glob_match("/api/*", "/apix"));
    assert!(glob_match("spiffe://td/ns/*/sa/web", "spiffe://td/ns/prod/sa/web"));
    assert!(!glob_match("spiffe://td/ns/*/sa/web", "spiffe://td/ns/prod/sa/db"));
    assert!(glob_match("*", "anything"));
    assert!(glob_match("/exact", "/exact"));
    assert!(!glob_match("/exact", "/exact/more"));
    assert!(glob_match("*.json", "/a/b.json"));
}

#[test]
fn service_names_are_dns_labels() {
    let e = one_error(&format!("{HEAD}kind: Service\nmetadata: {{name: a.b}}\nspec: {{}}\n"));
    assert!(e.contains("metadata.name") && e.contains("DNS label"), "{e}");
}

#[test]
fn rate_limits_target_a_service_or_an_existing_http_route() {
    let limit = |target: &str| {
        format!("{HEAD}kind: RateLimit\nmetadata: {{name: l}}\nspec: {{targetRef: {target}, requestsPerSecond: 1}}\n")
    };
    let base =
        format!("{}---\n{}", svc("b"), route("  parentRefs: [{name: b}]\n  rules:\n    - backendRefs: [{name: b}]\n"));
    parse(&format!("{base}---\n{}", limit("{kind: HTTPRoute, name: r}"))).expect("a route-targeted limit is valid");
    parse(&format!("{base}---\n{}", limit("{name: b}"))).expect("a service-targeted limit is valid");
    let err = one_error(&format!("{base}---\n{}", limit("{kind: HTTPRoute, name: ghost}")));
    assert!(err.contains("spec.targetRef.name: HTTPRoute \"ghost\" does not exist"), "{err}");
    let err = one_error(&format!("{base}---\n{}", limit("{kind: Gateway, name: r}")));
    assert!(err.contains("spec.targetRef.kind: \"Gateway\" is not supported; only Service or HTTPRoute"), "{err}");
}

#[test]
fn errors_name_kind_name_document_and_field_across_documents() {
    // A leading `---` opens document 1; an empty trailing document is skipped.
    let text = format!(
        "---\n{}---\n{HEAD}kind: Service\nmetadata: {{name: c}}\nspec: {{port: 0}}\n---\n{}---\n",
        svc("b"),
        route("  parentRefs: [{name: b}]\n  rules:\n    - backendRefs: [{name: b, subset: v9}]\n"),
    );
    let err = parse(&text).expect_err("two documents are wrong");
    assert_eq!(
        err.to_string(),
        "config rejected (2 errors):\n  - Service \"c\" (document 2): spec.port: must be between 1 and 65535\n  - HTTPRoute \"r\" (document 3): spec.rules[0].backendRefs[0].subset: Service \"b\" has no subset \"v9\""
    );
    parse(&format!("---\n{}---\n", svc("b"))).expect("empty documents around a valid one");
}

#[test]
fn mesh_path_normalization() {
    let mesh = |spec: &str| format!("{HEAD}kind: Mesh\nmetadata: {{name: mesh}}\nspec:\n{spec}");
    // Default: encoded slashes are refused, and the default is not pushed.
    let cfg = parse(&mesh("  defaultPolicy: allow\n")).unwrap();
    assert_eq!(cfg.mesh.path_normalization.encoded_slashes, EncodedSlashes::Reject);
    assert!(!serde_json::to_string(&cfg).unwrap().contains("pathNormalization"));
    let cfg = parse(&mesh("  pathNormalization: {encodedSlashes: opaque}\n")).unwrap();
    assert_eq!(cfg.mesh.path_normalization.encoded_slashes, EncodedSlashes::Opaque);
    let back: MeshConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back.mesh.path_normalization.encoded_slashes, EncodedSlashes::Opaque);
    let cfg = parse(&mesh("  pathNormalization: {encodedSlashes: reject}\n")).unwrap();
    assert_eq!(cfg.mesh.path_normalization.encoded_slashes, EncodedSlashes::Reject);

    let e = one_error(&mesh("  pathNormalization: {encodedSlashes: decode}\n"));
    assert!(
        e.contains("Mesh \"mesh\" (document 1): spec.pathNormalization.encodedSlashes")
            && e.contains("decode")
            && e.contains("reject")
            && e.contains("opaque"),
        "{e}"
    );
    let e = one_error(&mesh("  pathNormalization: {mergeSlashes: true}\n"));
    assert!(e.contains("spec.pathNormalization") && e.contains("mergeSlashes"), "{e}");
}

#[test]
fn paths_that_are_not_canonical_could_never_match_and_are_refused() {
    let policy = |path: &str| {
        format!(
            "{}---\n{HEAD}kind: AuthorizationPolicy\nmetadata: {{name: p}}\nspec:\n  targetRef: {{name: b}}\n  action: DENY\n  rules: [{{to: [{{paths: ['{path}']}}]}}]\n",
            svc("b")
        )
    };
    for (path, canonical) in
        [("/a/../b", "/b"), ("//x", "/x"), ("/%61dmin/*", "/admin/*"), ("/a/./b/", "/a/b/"), ("*//x", "/x")]
    {
        let e = one_error(&policy(path));
        assert!(
            e.contains("spec.rules[0].to[0].paths[0]")
                && e.contains("not in canonical form")
                && e.contains(&format!("write {canonical:?}")),
            "{path}: {e}"
        );
    }
    // No canonical form at all: the reason is given.
    let e = one_error(&policy("/admin%2F*"));
    assert!(e.contains("could never match") && e.contains("encoded '/'"), "{e}");
    let e = one_error(&policy("/admin;x=1/*"));
    assert!(e.contains("could never match") && e.contains("path parameter"), "{e}");
    let e = one_error(&policy("/a?b=1"));
    assert!(e.contains("without the query"), "{e}");
    // Canonical spellings (and globs) are fine.
    for ok in ["/admin/*", "/", "*", "/a%2Cb", "*/x", "/caf%C3%A9"] {
        parse(&policy(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    // With opaque encoded slashes, '%2F' is canonical (upper-case hex).
    let opaque = |path: &str| {
        format!(
            "{}---\n{HEAD}kind: Mesh\nmetadata: {{name: m}}\nspec: {{pathNormalization: {{encodedSlashes: opaque}}}}\n",
            policy(path)
        )
    };
    parse(&opaque("/a%2Fb")).unwrap();
    assert!(one_error(&opaque("/a%2fb")).contains("write \"/a%2Fb\""));

    // HTTPRoute path matches and RateLimit paths too.
    let text = format!(
        "{}---\n{}",
        svc("b"),
        route("  parentRefs: [{name: b}]\n  rules:\n    - matches: [{path: {type: PathPrefix, value: '/api//v1'}}]\n      backendRefs: [{name: b}]\n")
    );
    let e = one_error(&text);
    assert!(e.contains("spec.rules[0].matches[0].path.value") && e.contains("write \"/api/v1\""), "{e}");
    let text = format!(
        "{}---\n{HEAD}kind: RateLimit\nmetadata: {{name: rl}}\nspec: {{targetRef: {{name: b}}, requestsPerSecond: 5, paths: ['/x/%7e*']}}\n",
        svc("b")
    );
    let e = one_error(&text);
    assert!(e.contains("spec.paths[0]") && e.contains("write \"/x/~*\""), "{e}");
}

#[test]
fn mesh_outbound_traffic_policy_and_service_virtual_addresses() {
    let mesh = |spec: &str| format!("{HEAD}kind: Mesh\nmetadata: {{name: mesh}}\nspec:\n{spec}");
    let cfg = parse(&mesh("  defaultPolicy: allow\n")).unwrap();
    assert_eq!(cfg.mesh.outbound_traffic_policy, OutboundTrafficPolicy::AllowAny);
    assert!(!serde_json::to_string(&cfg).unwrap().contains("outboundTrafficPolicy"), "the default is not pushed");
    let cfg = parse(&mesh("  outboundTrafficPolicy: registryOnly\n")).unwrap();
    assert_eq!(cfg.mesh.outbound_traffic_policy, OutboundTrafficPolicy::RegistryOnly);
    let back: MeshConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back.mesh.outbound_traffic_policy, OutboundTrafficPolicy::RegistryOnly);
    let e = one_error(&mesh("  outboundTrafficPolicy: REGISTRY_ONLY\n"));
    assert!(e.contains("spec.outboundTrafficPolicy") && e.contains("registryOnly"), "{e}");

    let service = |name: &str, addrs: &str| {
        format!("{HEAD}kind: Service\nmetadata: {{name: {name}}}\nspec: {{port: 8080, addresses: {addrs}}}\n")
    };
    let cfg = parse(&service("b", "[10.96.0.10, \"fd00::10\"]")).unwrap();
    assert_eq!(cfg.services["b"].addresses.len(), 2);
    let e = one_error(&service("b", "[10.96.0.300]"));
    assert!(e.contains("spec.addresses"), "{e}");
    for bad in ["10.0.0.1/32", "not-an-ip"] {
        let e = one_error(&service("b", &format!("[10.96.0.9, \"{bad}\"]")));
        assert!(e.contains("spec.addresses") && e.contains(&format!("[1]: \"{bad}\" is not an IP address")), "{e}");
    }
    let e = one_error(&service("b", "[255.255.255.255]"));
    assert!(e.contains("spec.addresses[0]: 255.255.255.255 cannot be"), "{e}");
    let e = one_error(&service("b", "[0.0.0.0]"));
    assert!(e.contains("spec.addresses[0]: 0.0.0.0 cannot be"), "{e}");
    let e = one_error(&format!("{}---\n{}", service("a", "[10.96.0.10]"), service("b", "[10.96.0.10]")));
    assert!(e.contains("Service \"b\"") && e.contains("already an address of Service \"a\""), "{e}");
}
