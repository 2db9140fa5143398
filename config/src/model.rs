//! The config kinds, in the shape of Kubernetes resources (and, for
//! `HTTPRoute`, of the Gateway API), so they can later become CRDs. Unknown
//! fields are errors everywhere.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const API_VERSION: &str = "weft.dev/v1alpha1";

/// `apiVersion` / `kind` / `metadata` / `spec`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Document {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: serde_norway::Value,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A duration written as `500ms`, `2s`, `1m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(Dur)
            .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration ({e}); use e.g. 500ms, 2s, 1m")))
    }
}

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

// ---------------------------------------------------------------- Mesh

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultPolicy {
    #[default]
    Allow,
    Deny,
}

/// Mesh-wide settings (kind `Mesh`, at most one).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshSpec {
    /// `deny`: traffic that no ALLOW rule matches is refused.
    #[serde(default)]
    pub default_policy: DefaultPolicy,
    /// How sidecars canonicalize request paths (docs/config.md, "Request
    /// canonicalization"). Left out of the pushed JSON while default, so
    /// sidecars that predate it still accept the config.
    #[serde(default, skip_serializing_if = "PathNormalization::is_default")]
    pub path_normalization: PathNormalization,
}

/// `spec.pathNormalization` of the Mesh.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathNormalization {
    /// An encoded `/` (`%2F`) or `\` (`%5C`, or a raw `\`) in a path.
    #[serde(default)]
    pub encoded_slashes: EncodedSlashes,
}

impl PathNormalization {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// What sidecars do with an encoded slash or backslash in a request path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodedSlashes {
    /// Refuse the request with 400: apps disagree on whether `%2F` separates
    /// path segments, so no policy could be sure what it matched.
    #[default]
    Reject,
    /// Keep it encoded (`%2F`, `%5C`): part of a path segment, never a separator.
    Opaque,
}

// ---------------------------------------------------------------- Service

/// What a service's workloads speak; the callee's sidecar talks to its app
/// in this protocol (`weft-proxy --app-protocol auto`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP; whether the app takes HTTP/1.1, h2c or both is learned by probing it.
    #[default]
    Http,
    /// HTTP/2 without TLS (prior knowledge, RFC 9113 3.3) only.
    Http2,
    /// gRPC: HTTP/2 without TLS.
    Grpc,
    Tcp,
    Opaque,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub subsets: Vec<Subset>,
}

fn default_port() -> u16 {
    80
}

/// The workloads of a service that carry all of `labels` (`--label k=v`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

// ---------------------------------------------------------------- HTTPRoute

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    pub rules: Vec<RouteRule>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParentRef {
    #[serde(default = "kind_service")]
    pub kind: String,
    pub name: String,
}

fn kind_service() -> String {
    "Service".into()
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any one matching selects the rule; none means "everything".
    #[serde(default)]
    pub matches: Vec<RouteMatch>,
    pub backend_refs: Vec<BackendRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    #[serde(default)]
    pub filters: Vec<Filter>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default)]
    pub query_params: Vec<ValueMatch>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum PathMatchType {
    Exact,
    PathPrefix,
    RegularExpression,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathMatch {
    #[serde(rename = "type", default = "prefix")]
    pub kind: PathMatchType,
    pub value: String,
}

fn prefix() -> PathMatchType {
    PathMatchType::PathPrefix
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum ValueMatchType {
    #[default]
    Exact,
    RegularExpression,
}

/// A header or query parameter match.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ValueMatch {
    #[serde(rename = "type", default)]
    pub kind: ValueMatchType,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendRef {
    /// The Service to send to (usually the route's parent; any Service of the mesh may be named).
    pub name: String,
    /// A subset of the service's workloads; none means all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Timeouts {
    /// Whole request, retries included → 504.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Dur>,
    /// Each attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<Dur>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Retry {
    /// Retries after the first attempt.
    pub attempts: u32,
    /// Response codes that are retried; connection failures always are.
    #[serde(default = "retry_codes")]
    pub codes: Vec<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Dur>,
    #[serde(default)]
    pub budget: RetryBudget,
}

fn retry_codes() -> Vec<u16> {
    vec![502, 503, 504]
}

/// Retries may add at most `percent` of recent requests, plus a small floor.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryBudget {
    #[serde(default = "twenty")]
    pub percent: f64,
    #[serde(default = "ten")]
    pub min_retries_per_second: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self { percent: 20.0, min_retries_per_second: 10 }
    }
}

fn twenty() -> f64 {
    20.0
}
fn ten() -> u32 {
    10
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum FilterType {
    RequestHeaderModifier,
    ResponseHeaderModifier,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Filter {
    #[serde(rename = "type")]
    pub kind: FilterType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderModifier {
    #[serde(default)]
    pub set: Vec<Header>,
    #[serde(default)]
    pub add: Vec<Header>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Header {
    pub name: String,
    pub value: String,
}

// ---------------------------------------------------------------- AuthorizationPolicy

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[serde(alias = "allow", alias = "Allow")]
    Allow,
    #[serde(alias = "deny", alias = "Deny")]
    Deny,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TargetRef {
    #[serde(default = "kind_service")]
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    pub target_ref: TargetRef,
    pub action: Action,
    /// Any rule matching makes the policy apply; no rules match nothing.
    #[serde(default)]
    pub rules: Vec<AuthzRule>,
}

/// Matches when one of `from` matches the caller (or `from` is empty) and one
/// of `to` matches the request (or `to` is empty).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzRule {
    #[serde(default)]
    pub from: Vec<Source>,
    #[serde(default)]
    pub to: Vec<Operation>,
}

/// Each non-empty list must match (AND); within a list any entry (OR).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Source {
    /// Exact SPIFFE IDs or `*` globs (`spiffe://example.org/ns/prod/*`).
    #[serde(default)]
    pub identities: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub trust_domains: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Operation {
    /// Exact paths or `*` globs (`/api/*`).
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub ports: Vec<u16>,
}

// ---------------------------------------------------------------- RateLimit

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitKey {
    /// One bucket for all callers.
    #[default]
    Service,
    /// One bucket per caller SPIFFE ID.
    Identity,
}

/// A local token bucket, enforced by each of the target service's sidecars.
/// The target is a Service (all its requests) or an HTTPRoute (the requests
/// to its parent services that the route's rules match).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitSpec {
    pub target_ref: TargetRef,
    pub requests_per_second: f64,
    #[serde(default)]
    pub burst: u32,
    #[serde(default)]
    pub per: RateLimitKey,
    /// Only requests whose path matches one of these (`*` globs); none = all.
    #[serde(default)]
    pub paths: Vec<String>,
}

// ---------------------------------------------------------------- Workload

/// A workload for `weft up` to run: a demo app with its sidecar. The control
/// plane itself does not act on these (real workloads register themselves).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    pub service: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "one")]
    pub replicas: u32,
    /// Services the demo app calls (through its sidecar) for each request.
    #[serde(default)]
    pub calls: Vec<String>,
    /// Requests per second `weft up`'s load generator sends to this workload.
    #[serde(default)]
    pub load: f64,
}
