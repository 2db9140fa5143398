//! The config kinds, in the shape of Kubernetes resources (and, for
//! `HTTPRoute`, of the Gateway API), so they can later become CRDs. Unknown
//! fields are errors everywhere.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const API_VERSION: &str = "weft.dev/v1alpha1";

/// The Gateway API's standard channel (`HTTPRoute` and `GRPCRoute` are also
/// accepted under this `apiVersion`, unchanged, in the mesh (GAMMA) profile).
pub const GATEWAY_API_VERSION: &str = "gateway.networking.k8s.io/v1";

/// `apiVersion` / `kind` / `metadata` / `spec`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Document {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: serde_norway::Value,
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Accepted (Kubernetes manifests carry them) and not acted on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
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

/// In the schema a duration is a string (`500ms`, `2s`, `1m`).
impl schemars::JsonSchema for Dur {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A duration such as 500ms, 2s, 1m or 1m 30s."
        })
    }
}

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

// ---------------------------------------------------------------- Mesh

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DefaultPolicy {
    #[default]
    Allow,
    Deny,
}

/// Mesh-wide settings (kind `Mesh`, at most one).
#[derive(Debug, Clone, Default, Deserialize, Serialize, schemars::JsonSchema)]
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
    /// What an intercepted connection to a destination the mesh does not
    /// know gets (Istio's term). Left out of the pushed JSON while default.
    #[serde(default, skip_serializing_if = "OutboundTrafficPolicy::is_default")]
    pub outbound_traffic_policy: OutboundTrafficPolicy,
}

/// `spec.outboundTrafficPolicy` of the Mesh: intercepted connections whose
/// original destination is no endpoint or Service address of the mesh.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OutboundTrafficPolicy {
    /// Passed through to the original destination untouched (no mTLS).
    #[default]
    AllowAny,
    /// Refused (the connection is closed); only the mesh's own services are reachable.
    RegistryOnly,
}

impl OutboundTrafficPolicy {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// `spec.pathNormalization` of the Mesh.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
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

/// What sidecars do with an encoded slash or backslash in a request path
/// (also the mode argument of [`crate::canonical::canonical_path`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema)]
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
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

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub subsets: Vec<Subset>,
    /// Workloads of other services that are also endpoints of this one (the
    /// Kubernetes pattern of several Services selecting the pods of one
    /// service account, e.g. `foo-v1` and `foo-v2` over the pods of `foo`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admit: Option<Admit>,
    /// Virtual IP addresses of the service (e.g. a Kubernetes ClusterIP): an
    /// intercepted connection to one of them on `port` is this service's.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "virtual_addresses")]
    pub addresses: Vec<std::net::IpAddr>,
}

/// `spec.addresses`: each entry one IP address, a bad one quoted with its
/// index and what is expected (serde's own message names neither).
fn virtual_addresses<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<std::net::IpAddr>, D::Error> {
    let raw = Vec::<String>::deserialize(d)?;
    raw.iter()
        .enumerate()
        .map(|(i, a)| {
            a.trim().parse().map_err(|_| {
                serde::de::Error::custom(format!(
                    "[{i}]: {a:?} is not an IP address: a virtual address is one IPv4 address such as a ClusterIP, e.g. 10.96.0.10 (no /prefix)"
                ))
            })
        })
        .collect()
}

/// Which workloads a Service admits besides those whose identity names it:
/// a workload is admitted when its SPIFFE ID is `.../ns/<namespace>/sa/<name>`
/// for one of `serviceAccounts` AND its registered labels include every one
/// of `labels`. Labels alone never admit: a workload declares its own labels,
/// so only its attested identity can keep it from attracting another
/// service's traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Admit {
    /// `name` (that service account in any namespace) or `namespace/name`.
    pub service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

fn default_port() -> u16 {
    80
}

/// The workloads of a service that carry all of `labels` (`--label k=v`).
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

// ---------------------------------------------------------------- HTTPRoute

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    pub rules: Vec<RouteRule>,
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParentRef {
    /// The API group of the parent: `""` (the core group, where Service lives).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default = "kind_service")]
    pub kind: String,
    /// Only the route's own namespace (cross-namespace parents are not implemented yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    /// The Service port the route applies to; must be the Service's port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

fn kind_service() -> String {
    "Service".into()
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, schemars::JsonSchema)]
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

#[derive(Debug, Clone, Default, Deserialize, Serialize, schemars::JsonSchema)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
pub enum PathMatchType {
    Exact,
    PathPrefix,
    RegularExpression,
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathMatch {
    #[serde(rename = "type", default = "prefix")]
    pub kind: PathMatchType,
    /// Defaults to `/`, as in the Gateway API.
    #[serde(default = "root")]
    pub value: String,
}

fn root() -> String {
    "/".into()
}

fn prefix() -> PathMatchType {
    PathMatchType::PathPrefix
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
pub enum ValueMatchType {
    #[default]
    Exact,
    RegularExpression,
}

/// A header or query parameter match.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ValueMatch {
    #[serde(rename = "type", default)]
    pub kind: ValueMatchType,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendRef {
    /// The API group of the backend: `""` (the core group, where Service lives).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Only `Service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Only the route's own namespace (cross-namespace backends are not implemented yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The Service port to send to; must be the Service's port (the Gateway
    /// API requires it for Service backends, weft does not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
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

#[derive(Debug, Clone, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Timeouts {
    /// Whole request, retries included → 504.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Dur>,
    /// Each attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<Dur>,
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
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
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
pub enum FilterType {
    RequestHeaderModifier,
    ResponseHeaderModifier,
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Filter {
    #[serde(rename = "type")]
    pub kind: FilterType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderModifier {
    #[serde(default)]
    pub set: Vec<Header>,
    #[serde(default)]
    pub add: Vec<Header>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Header {
    pub name: String,
    pub value: String,
}

// ---------------------------------------------------------------- GRPCRoute

/// A Gateway API `GRPCRoute` (mesh profile). weft routes it as the HTTP/2
/// requests gRPC sends (`POST /<service>/<method>`), so it is compiled into
/// an [`HttpRouteSpec`] ([`GrpcRouteSpec::to_http`]) before sidecars see it.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    pub rules: Vec<GrpcRouteRule>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any one matching selects the rule; none means "every call".
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    #[serde(default)]
    pub filters: Vec<Filter>,
    pub backend_refs: Vec<BackendRef>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<GrpcMethodMatch>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
}

/// `service` is the fully qualified gRPC service (`package.Service`),
/// `method` the method name; at least one is set.
#[derive(Debug, Clone, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcMethodMatch {
    #[serde(rename = "type", default)]
    pub kind: ValueMatchType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

impl GrpcMethodMatch {
    /// The equivalent match on the request path `/<service>/<method>`:
    /// service and method → `Exact`; service alone → `PathPrefix /<service>`
    /// (whole segments); otherwise a `RegularExpression`.
    pub fn to_path(&self) -> PathMatch {
        let (service, method) = (self.service.as_deref(), self.method.as_deref());
        let re = |s: Option<&str>| match (self.kind, s) {
            (_, None) => "[^/]+".to_string(),
            (ValueMatchType::Exact, Some(s)) => regex::escape(s),
            (ValueMatchType::RegularExpression, Some(s)) => format!("(?:{s})"),
        };
        match (self.kind, service, method) {
            (ValueMatchType::Exact, Some(s), Some(m)) => {
                PathMatch { kind: PathMatchType::Exact, value: format!("/{s}/{m}") }
            }
            (ValueMatchType::Exact, Some(s), None) => {
                PathMatch { kind: PathMatchType::PathPrefix, value: format!("/{s}") }
            }
            _ => {
                PathMatch { kind: PathMatchType::RegularExpression, value: format!("/{}/{}", re(service), re(method)) }
            }
        }
    }
}

impl GrpcRouteSpec {
    /// The same route as an HTTPRoute over gRPC's request paths.
    pub fn to_http(&self) -> HttpRouteSpec {
        HttpRouteSpec {
            parent_refs: self.parent_refs.clone(),
            rules: self
                .rules
                .iter()
                .map(|r| RouteRule {
                    name: r.name.clone(),
                    matches: r
                        .matches
                        .iter()
                        .map(|m| RouteMatch {
                            path: m.method.as_ref().map(GrpcMethodMatch::to_path),
                            headers: m.headers.clone(),
                            method: None,
                            query_params: Vec::new(),
                        })
                        .collect(),
                    backend_refs: r.backend_refs.clone(),
                    timeouts: None,
                    retry: None,
                    filters: r.filters.clone(),
                })
                .collect(),
        }
    }
}

// ---------------------------------------------------------------- AuthorizationPolicy

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[serde(alias = "allow", alias = "Allow")]
    Allow,
    #[serde(alias = "deny", alias = "Deny")]
    Deny,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TargetRef {
    #[serde(default = "kind_service")]
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
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
#[derive(Debug, Clone, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzRule {
    #[serde(default)]
    pub from: Vec<Source>,
    #[serde(default)]
    pub to: Vec<Operation>,
}

/// Each non-empty list must match (AND); within a list any entry (OR).
#[derive(Debug, Clone, Default, Deserialize, Serialize, schemars::JsonSchema)]
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

#[derive(Debug, Clone, Default, Deserialize, Serialize, schemars::JsonSchema)]
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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
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
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
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
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
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
