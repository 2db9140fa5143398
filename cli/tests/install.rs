//! `weft install`: every manifest validates against the Kubernetes schemas
//! (`kubernetes-validate`), and the CRD schemas agree with `weft validate`:
//! the documents weft accepts validate against them, and documents weft
//! refuses for their shape (wrong types, unknown values, missing fields) do
//! not.

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

mod k8s_validate;
use k8s_validate::kubernetes_validate;

fn weft(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_weft")).args(args).output().expect("run weft");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path).display().to_string()
}

/// `weft install` with a fresh PKI; (output file, its documents as JSON).
fn install(dir: &Path, extra: &[&str]) -> (std::path::PathBuf, Vec<Value>) {
    let pki = dir.join("pki");
    let (ok, _, err) = weft(&["certs", "init", "--trust-domain", "example.org", "--out", pki.to_str().unwrap()]);
    assert!(ok, "{err}");
    let mut args = vec!["install", "--pki", pki.to_str().unwrap(), "--mesh-namespace", "shop"];
    args.extend(extra);
    let (ok, out, err) = weft(&args);
    assert!(ok, "{err}");
    let file = dir.join("install.yaml");
    std::fs::write(&file, &out).unwrap();
    let docs = k8s_validate::documents(&out).into_iter().map(|d| serde_json::to_value(d).unwrap()).collect();
    (file, docs)
}

#[test]
fn install_manifests_validate_against_the_kubernetes_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let canary = repo("examples/canary.yaml");
    let (file, docs) = install(dir.path(), &["--config", &canary]);
    kubernetes_validate(&file);
    let kinds: Vec<String> =
        docs.iter().map(|d| format!("{}/{}", d["kind"], d["metadata"]["name"]).replace('"', "")).collect();
    for want in [
        "Namespace/weft-system",
        "Namespace/shop",
        "CustomResourceDefinition/httproutes.weft.dev",
        "CustomResourceDefinition/grpcroutes.weft.dev",
        "CustomResourceDefinition/services.weft.dev",
        "CustomResourceDefinition/authorizationpolicies.weft.dev",
        "CustomResourceDefinition/ratelimits.weft.dev",
        "CustomResourceDefinition/meshes.weft.dev",
        "ServiceAccount/weft-control-plane",
        "ClusterRole/weft-control-plane",
        "ClusterRoleBinding/weft-control-plane",
        "Deployment/weft-control-plane",
        "Service/weft-control-plane",
        "MutatingWebhookConfiguration/weft-sidecar-injector",
        "Secret/weft-injector-tls",
        "ConfigMap/weft-trust-bundle",
    ] {
        assert!(kinds.contains(&want.to_string()), "no {want} in {kinds:?}");
    }
    // The mesh config is shipped as it was given.
    let config = docs.iter().find(|d| d["metadata"]["name"] == "weft-config").unwrap();
    assert_eq!(config["data"]["mesh.yaml"], std::fs::read_to_string(&canary).unwrap());
    // The webhook points at the control plane's Service and trusts the CA of its certificate.
    let hook = &docs.iter().find(|d| d["kind"] == "MutatingWebhookConfiguration").unwrap()["webhooks"][0];
    assert_eq!(
        hook["clientConfig"]["service"],
        json!({"name": "weft-control-plane", "namespace": "weft-system", "path": "/inject", "port": 443})
    );
    assert!(hook["clientConfig"]["caBundle"].as_str().is_some_and(|s| !s.is_empty()));

    // A config weft refuses is refused by install too.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: x}\nspec: {prot: 1}\n")
        .unwrap();
    let (ok, _, err) = weft(&["install", "--config", bad.to_str().unwrap()]);
    assert!(!ok && err.contains("spec.prot: unknown field"), "{err}");
}

/// Validates each (kind, spec) against the CRD's spec schema with Python's
/// `jsonschema` (installed with kubernetes-validate); returns the verdicts.
fn schema_verdicts(crds: &[Value], docs: &[(String, Value)]) -> Vec<bool> {
    let schemas: serde_json::Map<String, Value> = crds
        .iter()
        .map(|c| {
            let kind = c["spec"]["names"]["kind"].as_str().unwrap().to_string();
            (kind, c["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone())
        })
        .collect();
    let input = json!({"schemas": schemas, "docs": docs.iter().map(|(k, s)| json!([k, s])).collect::<Vec<_>>()});
    let script = r#"
import json, sys, jsonschema
d = json.load(sys.stdin)
out = []
for kind, spec in d["docs"]:
    errors = list(jsonschema.Draft4Validator(d["schemas"][kind]).iter_errors(spec))
    out.append(not errors)
print(json.dumps(out))
"#;
    use std::io::Write;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (with jsonschema, from pip install kubernetes-validate)");
    child.stdin.take().unwrap().write_all(input.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "jsonschema failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The weft.dev documents of a config file as (kind, spec JSON).
fn weft_docs(text: &str) -> Vec<(String, Value)> {
    k8s_validate::documents(text)
        .into_iter()
        .filter(|d| d.get("apiVersion").and_then(|v| v.as_str()).is_some_and(|v| v.starts_with("weft.dev/")))
        .filter(|d| d.get("kind").and_then(|k| k.as_str()) != Some("Workload")) // `weft up` only, no CRD
        .map(|d| (d["kind"].as_str().unwrap().to_string(), serde_json::to_value(&d["spec"]).unwrap()))
        .collect()
}

#[test]
fn crd_schemas_agree_with_weft_validate() {
    let dir = tempfile::tempdir().unwrap();
    let (_, docs) = install(dir.path(), &[]);
    let crds: Vec<Value> = docs.into_iter().filter(|d| d["kind"] == "CustomResourceDefinition").collect();

    // Everything weft accepts…
    let mut good = Vec::new();
    for file in ["examples/canary.yaml", "config/tests/gateway-api/services.yaml"] {
        let text = std::fs::read_to_string(repo(file)).unwrap();
        weft_config::parse(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        good.extend(weft_docs(&text));
    }
    let grpc = std::fs::read_to_string(repo("config/tests/gateway-api/grpc-route.yaml")).unwrap();
    good.extend(weft_docs(&grpc.replace("gateway.networking.k8s.io/v1", "weft.dev/v1alpha1")));
    assert!(good.len() >= 12, "{good:?}");
    let verdicts = schema_verdicts(&crds, &good);
    for ((kind, spec), ok) in good.iter().zip(&verdicts) {
        assert!(ok, "the {kind} CRD schema refuses what weft accepts: {spec}");
    }

    // …and shapes weft refuses.
    let bad = [
        ("Service", json!({"port": "eighty"})),
        ("Service", json!({"protocol": "udp"})),
        ("Service", json!({"subsets": [{"name": "v1"}]})),
        ("HTTPRoute", json!({"parentRefs": [{"name": "b"}]})),
        (
            "HTTPRoute",
            json!({"parentRefs": [{"name": "b"}], "rules": [{"backendRefs": [{"name": "b", "weight": "ninety"}]}]}),
        ),
        (
            "HTTPRoute",
            json!({"parentRefs": [{"name": "b"}], "rules": [{"backendRefs": [{"name": "b"}], "matches": [{"path": {"type": "Glob", "value": "/"}}]}]}),
        ),
        ("AuthorizationPolicy", json!({"targetRef": {"name": "b"}, "action": "MAYBE"})),
        ("RateLimit", json!({"targetRef": {"name": "b"}})),
        (
            "GRPCRoute",
            json!({"parentRefs": [{"name": "b"}], "rules": [{"backendRefs": [{"name": "b"}], "matches": [{"method": {"type": "Prefix"}}]}]}),
        ),
    ];
    let bad: Vec<(String, Value)> = bad.into_iter().map(|(k, s)| (k.to_string(), s)).collect();
    for (kind, spec) in &bad {
        let doc = format!(
            "apiVersion: weft.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: x}}\nspec: {}\n",
            serde_json::to_string(spec).unwrap()
        );
        assert!(weft_config::parse(&doc).is_err(), "weft accepts {kind} {spec}");
    }
    let verdicts = schema_verdicts(&crds, &bad);
    for ((kind, spec), ok) in bad.iter().zip(&verdicts) {
        assert!(!ok, "the {kind} CRD schema accepts what weft refuses: {spec}");
    }
}

#[test]
fn install_with_an_etcd_store_runs_several_replicas_and_a_file_store_only_one() {
    let dir = tempfile::tempdir().unwrap();
    let (file, docs) = install(dir.path(), &["--store", "etcd://10.0.0.5:2379,10.0.0.6:2379", "--replicas", "3"]);
    kubernetes_validate(&file);
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert_eq!(deployment["spec"]["replicas"], 3);
    let args: Vec<&str> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let at = args.iter().position(|a| *a == "--store").expect("--store in the control plane's args");
    assert_eq!(args[at + 1], "etcd://10.0.0.5:2379,10.0.0.6:2379");

    // The default is one replica on the file store.
    let (_, docs) = install(&dir.path().join("default"), &[]);
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert_eq!(deployment["spec"]["replicas"], 1);

    // Several replicas on the file store would not share tokens or registrations.
    let (ok, _, err) = weft(&["install", "--replicas", "2"]);
    assert!(!ok && err.contains("--replicas 2 needs --store etcd://"), "{err}");
    let (ok, _, err) = weft(&["install", "--store", "consul://x:1"]);
    assert!(!ok && err.contains("expected `file` or `etcd://"), "{err}");
}
