//! `weft install`: the manifests that run weft in a cluster.
//!
//! - CustomResourceDefinitions for the config kinds, whose schemas are
//!   generated (schemars) from the same Rust types `weft validate` decodes,
//!   so the two agree;
//! - the control plane's Namespace, ServiceAccount, RBAC, Deployment and
//!   Service, its mesh config (ConfigMap) and PKI (Secret);
//! - the trust bundle ConfigMap injected sidecars mount, in every meshed
//!   namespace;
//! - the MutatingWebhookConfiguration for the sidecar injector, with its TLS
//!   certificate (Secret) and CA (`caBundle`).

use base64::Engine;
use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::{json, Map, Value};
use weft_config::{AuthorizationPolicySpec, GrpcRouteSpec, HttpRouteSpec, MeshSpec, RateLimitSpec, ServiceSpec};

use crate::inject::{InjectOptions, ANNOTATION_INJECT};
use crate::tls::WebhookTls;

/// The API group of weft's config kinds.
pub const GROUP: &str = "weft.dev";
/// Their version.
pub const VERSION: &str = "v1alpha1";
/// The label that turns injection on for a namespace (`weft.dev/inject=enabled`).
pub const NAMESPACE_LABEL: &str = ANNOTATION_INJECT;

/// The files of a PKI directory from `weft certs init`, PEM.
#[derive(Debug, Clone)]
pub struct PkiFiles {
    pub trust_bundle: String,
    pub issuer_cert: String,
    pub issuer_key: String,
}

/// What `weft install` prints.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// The control plane's namespace.
    pub namespace: String,
    /// Namespaces that get the trust bundle ConfigMap (and the injection label).
    pub mesh_namespaces: Vec<String>,
    /// The PKI to ship as a Secret; without it the Secret `weft-pki` must exist.
    pub pki: Option<PkiFiles>,
    /// The mesh config (YAML) for the control plane's `--config`.
    pub config: String,
    /// The issuer of the cluster's service-account tokens.
    pub sa_issuer: String,
    /// Where the control plane finds the issuer's keys (an OIDC discovery URL).
    pub sa_discovery_url: String,
    /// How injected sidecars look (image, control plane address…).
    pub inject: InjectOptions,
    /// The injector's certificate and CA.
    pub webhook_tls: WebhookTls,
    /// The control plane's `--store`: `file` (one replica, state in an
    /// emptyDir) or `etcd://host:port[,...]` (state shared by the replicas).
    pub store: String,
    /// Control-plane replicas (more than one needs an etcd store).
    pub replicas: u32,
}

/// A config kind: its kind, plural and spec schema.
struct Kind {
    kind: &'static str,
    plural: &'static str,
    spec: Value,
}

fn kinds() -> Vec<Kind> {
    vec![
        Kind { kind: "Mesh", plural: "meshes", spec: spec_schema::<MeshSpec>() },
        Kind { kind: "Service", plural: "services", spec: spec_schema::<ServiceSpec>() },
        Kind { kind: "HTTPRoute", plural: "httproutes", spec: spec_schema::<HttpRouteSpec>() },
        Kind { kind: "GRPCRoute", plural: "grpcroutes", spec: spec_schema::<GrpcRouteSpec>() },
        Kind {
            kind: "AuthorizationPolicy",
            plural: "authorizationpolicies",
            spec: spec_schema::<AuthorizationPolicySpec>(),
        },
        Kind { kind: "RateLimit", plural: "ratelimits", spec: spec_schema::<RateLimitSpec>() },
    ]
}

/// The schema of `T` as a Kubernetes structural schema (OpenAPI v3 subset).
pub fn spec_schema<T: JsonSchema>() -> Value {
    let settings = SchemaSettings::openapi3().with(|s| {
        s.inline_subschemas = true;
        s.meta_schema = None;
    });
    let mut v = settings.into_generator().into_root_schema_for::<T>().to_value();
    structural(&mut v);
    v
}

/// Formats Kubernetes knows; others (schemars' `uint16`…) are dropped, the
/// `minimum`/`maximum` beside them still bound the value.
const FORMATS: &[&str] = &["int32", "int64", "float", "double", "byte", "date", "date-time", "password"];

/// Rewrites a generated schema into what the API server accepts: no
/// `$schema`/`title`/`definitions`, no `additionalProperties` beside
/// `properties` (Kubernetes prunes unknown fields instead), known formats only.
fn structural(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for k in ["$schema", "title", "components", "definitions", "$defs"] {
                m.remove(k);
            }
            if m.contains_key("properties") && m.get("additionalProperties") == Some(&Value::Bool(false)) {
                m.remove("additionalProperties");
            }
            if m.get("format").and_then(Value::as_str).is_some_and(|f| !FORMATS.contains(&f)) {
                m.remove("format");
            }
            for (_, child) in m.iter_mut() {
                structural(child);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(structural),
        _ => {}
    }
}

/// One CustomResourceDefinition per config kind.
pub fn crds() -> Vec<Value> {
    kinds()
        .into_iter()
        .map(|k| {
            json!({
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {"name": format!("{}.{GROUP}", k.plural), "labels": {"app.kubernetes.io/part-of": "weft"}},
                "spec": {
                    "group": GROUP,
                    "names": {
                        "kind": k.kind,
                        "listKind": format!("{}List", k.kind),
                        "plural": k.plural,
                        "singular": k.kind.to_lowercase(),
                        "categories": ["weft"],
                    },
                    "scope": "Namespaced",
                    "versions": [{
                        "name": VERSION,
                        "served": true,
                        "storage": true,
                        "schema": {"openAPIV3Schema": {
                            "type": "object",
                            "description": format!("weft {} (see docs/config.md).", k.kind),
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": k.spec,
                            },
                            "required": ["spec"],
                        }},
                    }],
                },
            })
        })
        .collect()
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

const NAME: &str = "weft-control-plane";
const GRPC_PORT: u16 = 7443;
const ADMIN_PORT: u16 = 7444;
const INJECTOR_PORT: u16 = 9443;

/// Every manifest of an install, in the order to apply them.
pub fn manifests(o: &InstallOptions) -> Vec<Value> {
    let ns = o.namespace.as_str();
    let labels = json!({"app.kubernetes.io/name": NAME, "app.kubernetes.io/part-of": "weft"});
    let mut out = vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"app.kubernetes.io/part-of": "weft"}}}),
    ];
    for n in o.mesh_namespaces.iter().filter(|n| *n != ns) {
        out.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n, "labels": {NAMESPACE_LABEL: "enabled"}}}));
    }
    out.extend(crds());
    out.push(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": NAME, "namespace": ns, "labels": labels}}));
    // Read access to the config kinds and the Gateway API routes, for a
    // control plane that watches them; today it reads the mounted ConfigMap.
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": NAME, "labels": labels},
        "rules": [
            {"apiGroups": [GROUP], "resources": kinds().iter().map(|k| k.plural).collect::<Vec<_>>(), "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes", "grpcroutes"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["services", "namespaces"], "verbs": ["get", "list", "watch"]},
        ],
    }));
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": NAME, "labels": labels},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME},
        "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": ns}],
    }));
    // The API server's OIDC discovery and JWKS endpoints are readable by
    // service accounts only with this binding (Kubernetes' own ClusterRole).
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": format!("{NAME}-oidc-discovery"), "labels": labels},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:service-account-issuer-discovery"},
        "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": ns}],
    }));
    out.push(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "weft-config", "namespace": ns, "labels": labels},
        "data": {"mesh.yaml": o.config},
    }));
    if let Some(pki) = &o.pki {
        out.push(json!({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "weft-pki", "namespace": ns, "labels": labels},
            "data": {
                "trust-bundle.pem": b64(&pki.trust_bundle),
                "issuer.crt": b64(&pki.issuer_cert),
                "issuer.key": b64(&pki.issuer_key),
            },
        }));
        let mut namespaces = vec![ns.to_string()];
        namespaces.extend(o.mesh_namespaces.iter().filter(|n| *n != ns).cloned());
        for n in namespaces {
            out.push(json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": o.inject.trust_bundle_config_map, "namespace": n, "labels": {"app.kubernetes.io/part-of": "weft"}},
                "data": {"ca.pem": pki.trust_bundle},
            }));
        }
    }
    out.push(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "weft-injector-tls", "namespace": ns, "labels": labels},
        "data": {"tls.crt": b64(&o.webhook_tls.cert_pem), "tls.key": b64(&o.webhook_tls.key_pem)},
    }));
    out.push(deployment(o, &labels));
    out.push(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": NAME, "namespace": ns, "labels": labels},
        "spec": {
            "selector": {"app.kubernetes.io/name": NAME},
            "ports": [
                {"name": "grpc", "port": GRPC_PORT, "targetPort": GRPC_PORT, "protocol": "TCP", "appProtocol": "grpc"},
                {"name": "injector", "port": 443, "targetPort": INJECTOR_PORT, "protocol": "TCP"},
            ],
        },
    }));
    out.push(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "weft-sidecar-injector", "labels": labels},
        "webhooks": [{
            "name": "inject.weft.dev",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            // A pod that cannot be injected is not started without its sidecar.
            "failurePolicy": "Fail",
            "reinvocationPolicy": "IfNeeded",
            "timeoutSeconds": 10,
            "clientConfig": {
                "service": {"name": NAME, "namespace": ns, "path": "/inject", "port": 443},
                "caBundle": b64(&o.webhook_tls.ca_pem),
            },
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: "enabled"}},
            "objectSelector": {"matchExpressions": [{"key": ANNOTATION_INJECT, "operator": "NotIn", "values": ["false", "disabled"]}]},
        }],
    }));
    out
}

fn deployment(o: &InstallOptions, labels: &Value) -> Value {
    let ns = &o.namespace;
    let args: Vec<String> = [
        "--pki",
        "/etc/weft/pki",
        "--state-dir",
        "/var/lib/weft",
        "--listen",
        &format!("0.0.0.0:{GRPC_PORT}"),
        "--admin",
        &format!("0.0.0.0:{ADMIN_PORT}"),
        "--config",
        "/etc/weft/config/mesh.yaml",
        "--log-format",
        "json",
        "--injector-listen",
        &format!("0.0.0.0:{INJECTOR_PORT}"),
        "--injector-cert",
        "/etc/weft/injector/tls.crt",
        "--injector-key",
        "/etc/weft/injector/tls.key",
        "--injector-image",
        &o.inject.image,
        "--injector-control-plane-address",
        &o.inject.control_plane,
        "--injector-proxy-uid",
        &o.inject.proxy_uid.to_string(),
        "--k8s-token-issuer",
        &o.sa_issuer,
        "--k8s-token-discovery-url",
        &o.sa_discovery_url,
        "--k8s-token-ca",
        "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
        "--k8s-token-bearer-file",
        "/var/run/secrets/kubernetes.io/serviceaccount/token",
        "--store",
        &o.store,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut pod_labels = Map::new();
    pod_labels.insert("app.kubernetes.io/name".into(), json!(NAME));
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": NAME, "namespace": ns, "labels": labels},
        "spec": {
            "replicas": o.replicas,
            "selector": {"matchLabels": pod_labels},
            "template": {
                "metadata": {"labels": labels, "annotations": {ANNOTATION_INJECT: "false"}},
                "spec": {
                    "serviceAccountName": NAME,
                    "containers": [{
                        "name": "control-plane",
                        "image": o.inject.image,
                        "command": ["weft-control-plane"],
                        "args": args,
                        "ports": [
                            {"name": "grpc", "containerPort": GRPC_PORT},
                            {"name": "admin", "containerPort": ADMIN_PORT},
                            {"name": "injector", "containerPort": INJECTOR_PORT},
                        ],
                        "readinessProbe": {"httpGet": {"path": "/ready", "port": ADMIN_PORT}},
                        "livenessProbe": {"httpGet": {"path": "/live", "port": ADMIN_PORT}},
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
                        "securityContext": {
                            "runAsNonRoot": true, "runAsUser": 65532, "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [
                            {"name": "pki", "mountPath": "/etc/weft/pki", "readOnly": true},
                            {"name": "config", "mountPath": "/etc/weft/config", "readOnly": true},
                            {"name": "injector-tls", "mountPath": "/etc/weft/injector", "readOnly": true},
                            {"name": "state", "mountPath": "/var/lib/weft"},
                        ],
                    }],
                    "volumes": [
                        {"name": "pki", "secret": {"secretName": "weft-pki", "defaultMode": 256}},
                        {"name": "config", "configMap": {"name": "weft-config"}},
                        {"name": "injector-tls", "secret": {"secretName": "weft-injector-tls", "defaultMode": 256}},
                        {"name": "state", "emptyDir": {}},
                    ],
                },
            },
        },
    })
}
