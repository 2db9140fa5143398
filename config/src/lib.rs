//! weft-config: the mesh config users write (Kubernetes-shaped YAML) and the
//! validated form the control plane pushes to sidecars.
//!
//! Parsing is strict: unknown kinds and fields are errors, and every error
//! names the document, the field path and the reason. A file with any error
//! is rejected as a whole.

pub mod model;
pub mod registration;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

pub use model::*;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// e.g. `HTTPRoute "canary" (document 3)`.
    pub document: String,
    /// e.g. `spec.rules[0].backendRefs[1].weight`.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.document, self.reason)
        } else {
            write!(f, "{}: {}: {}", self.document, self.field, self.reason)
        }
    }
}

/// Every problem found; the config is rejected as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "config rejected ({n} error{}):", if n == 1 { "" } else { "s" })?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

/// A named spec.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Named<T> {
    pub name: String,
    pub spec: T,
}

/// The validated mesh config, as pushed to sidecars (JSON).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfig {
    pub mesh: MeshSpec,
    pub services: BTreeMap<String, ServiceSpec>,
    pub routes: Vec<Named<HttpRouteSpec>>,
    pub policies: Vec<Named<AuthorizationPolicySpec>>,
    pub rate_limits: Vec<Named<RateLimitSpec>>,
    #[serde(default)]
    pub workloads: Vec<Named<WorkloadSpec>>,
}

const KINDS: &str = "Mesh, Service, HTTPRoute, AuthorizationPolicy, RateLimit, Workload";
const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];

struct Ctx {
    errors: Vec<ConfigError>,
}

impl Ctx {
    fn err(&mut self, document: &str, field: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(ConfigError { document: document.into(), field: field.into(), reason: reason.into() });
    }
}

fn label(kind: &str, name: &str, index: usize) -> String {
    format!("{kind} {name:?} (document {index})")
}

/// Parses and validates a multi-document YAML config.
pub fn parse(text: &str) -> Result<MeshConfig, ConfigErrors> {
    let mut cx = Ctx { errors: Vec::new() };
    let mut cfg = MeshConfig::default();
    let mut seen_mesh = false;
    let mut names: BTreeSet<(String, String)> = BTreeSet::new();
    let mut docs: Vec<(String, Document)> = Vec::new();

    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let value = match serde_yaml::Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                cx.err(&format!("document {index}"), "", format!("not valid YAML: {e}"));
                // The YAML stream cannot be resumed after a syntax error.
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        let doc: Document = match serde_path_to_error::deserialize(value) {
            Ok(d) => d,
            Err(e) => {
                cx.err(&format!("document {index}"), e.path().to_string(), e.inner().to_string());
                continue;
            }
        };
        let lbl = label(&doc.kind, &doc.metadata.name, index);
        if doc.api_version != API_VERSION {
            cx.err(&lbl, "apiVersion", format!("{:?} is not supported; use {API_VERSION}", doc.api_version));
        }
        if !valid_name(&doc.metadata.name) {
            cx.err(&lbl, "metadata.name", "must be lower-case letters, digits, '-' or '.', at most 63 characters");
        }
        if !names.insert((doc.kind.clone(), doc.metadata.name.clone())) {
            cx.err(&lbl, "metadata.name", format!("another {} is already named {:?}", doc.kind, doc.metadata.name));
        }
        docs.push((lbl, doc));
    }

    // First pass: decode specs (services are needed to check references).
    fn spec<T: serde::de::DeserializeOwned>(cx: &mut Ctx, lbl: &str, v: serde_yaml::Value) -> Option<T> {
        match serde_path_to_error::deserialize(v) {
            Ok(s) => Some(s),
            Err(e) => {
                let path = e.path().to_string();
                let field = if path == "." { "spec".to_string() } else { format!("spec.{path}") };
                cx.err(lbl, field, e.inner().to_string());
                None
            }
        }
    }
    let mut labels: BTreeMap<(&'static str, String), String> = BTreeMap::new();
    for (lbl, doc) in docs {
        let name = doc.metadata.name.clone();
        match doc.kind.as_str() {
            "Mesh" => {
                if seen_mesh {
                    cx.err(&lbl, "kind", "only one Mesh document is allowed");
                }
                seen_mesh = true;
                if let Some(s) = spec(&mut cx, &lbl, doc.spec) {
                    cfg.mesh = s;
                }
            }
            "Service" => {
                if let Some(s) = spec(&mut cx, &lbl, doc.spec) {
                    labels.insert(("Service", name.clone()), lbl);
                    cfg.services.insert(name, s);
                }
            }
            "HTTPRoute" => {
                if let Some(s) = spec(&mut cx, &lbl, doc.spec) {
                    labels.insert(("HTTPRoute", name.clone()), lbl);
                    cfg.routes.push(Named { name, spec: s });
                }
            }
            "AuthorizationPolicy" => {
                if let Some(s) = spec(&mut cx, &lbl, doc.spec) {
                    labels.insert(("AuthorizationPolicy", name.clone()), lbl);
                    cfg.policies.push(Named { name, spec: s });
                }
            }
            "RateLimit" => {
                if let Some(s) = spec(&mut cx, &lbl, doc.spec) {
                    labels.insert(("RateLimit", name.clone()), lbl);
                    cfg.rate_limits.push(Named { name, spec: s });
                }
            }
            "Workload" => {
                if let Some(s) = spec(&mut cx, &lbl, doc.spec) {
                    labels.insert(("Workload", name.clone()), lbl);
                    cfg.workloads.push(Named { name, spec: s });
                }
            }
            other => cx.err(&lbl, "kind", format!("unknown kind {other:?}; expected one of {KINDS}")),
        }
    }

    for (name, svc) in &cfg.services {
        let lbl = &labels[&("Service", name.clone())];
        validate_service(&mut cx, lbl, name, svc);
    }
    for r in &cfg.routes {
        let lbl = labels[&("HTTPRoute", r.name.clone())].clone();
        validate_route(&mut cx, &lbl, &r.spec, &cfg.services);
    }
    for p in &cfg.policies {
        let lbl = labels[&("AuthorizationPolicy", p.name.clone())].clone();
        validate_target(&mut cx, &lbl, &p.spec.target_ref, &cfg.services);
        validate_policy(&mut cx, &lbl, &p.spec);
    }
    for r in &cfg.rate_limits {
        let lbl = labels[&("RateLimit", r.name.clone())].clone();
        let target = &r.spec.target_ref;
        match target.kind.as_str() {
            "Service" => validate_target(&mut cx, &lbl, target, &cfg.services),
            "HTTPRoute" if !cfg.routes.iter().any(|route| route.name == target.name) => {
                cx.err(&lbl, "spec.targetRef.name", format!("HTTPRoute {:?} does not exist", target.name))
            }
            "HTTPRoute" => {}
            other => {
                cx.err(&lbl, "spec.targetRef.kind", format!("{other:?} is not supported; only Service or HTTPRoute"))
            }
        }
        if !(r.spec.requests_per_second.is_finite() && r.spec.requests_per_second > 0.0) {
            cx.err(&lbl, "spec.requestsPerSecond", "must be a number greater than 0");
        }
        for (i, p) in r.spec.paths.iter().enumerate() {
            check_path_glob(&mut cx, &lbl, &format!("spec.paths[{i}]"), p);
        }
    }

    for w in &cfg.workloads {
        let lbl = labels[&("Workload", w.name.clone())].clone();
        if !cfg.services.contains_key(&w.spec.service) {
            cx.err(&lbl, "spec.service", format!("Service {:?} does not exist", w.spec.service));
        }
        for (i, c) in w.spec.calls.iter().enumerate() {
            if !cfg.services.contains_key(c) {
                cx.err(&lbl, format!("spec.calls[{i}]"), format!("Service {c:?} does not exist"));
            }
        }
        if !(1..=20).contains(&w.spec.replicas) {
            cx.err(&lbl, "spec.replicas", "must be between 1 and 20");
        }
        if !(w.spec.load.is_finite() && (0.0..=5000.0).contains(&w.spec.load)) {
            cx.err(&lbl, "spec.load", "must be between 0 and 5000 requests per second");
        }
    }

    if cx.errors.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigErrors(cx.errors))
    }
}

/// Parses a config file from disk; I/O problems are reported like config errors.
pub fn load(path: &std::path::Path) -> Result<MeshConfig, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            document: path.display().to_string(),
            field: String::new(),
            reason: e.to_string(),
        }])
    })?;
    parse(&text)
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

fn validate_service(cx: &mut Ctx, lbl: &str, name: &str, svc: &ServiceSpec) {
    // Sidecars register under this name, which must be a DNS label.
    if !registration::valid_service_name(name) {
        cx.err(lbl, "metadata.name", "a Service name is a DNS label: no '.' (sidecars register under this name)");
    }
    if svc.port == 0 {
        cx.err(lbl, "spec.port", "must be between 1 and 65535");
    }
    let mut seen = BTreeSet::new();
    for (i, s) in svc.subsets.iter().enumerate() {
        if !valid_name(&s.name) {
            cx.err(lbl, format!("spec.subsets[{i}].name"), "must be lower-case letters, digits, '-' or '.'");
        }
        if !seen.insert(&s.name) {
            cx.err(lbl, format!("spec.subsets[{i}].name"), format!("subset {:?} is defined twice", s.name));
        }
        if s.labels.is_empty() {
            cx.err(lbl, format!("spec.subsets[{i}].labels"), "a subset needs at least one label to select workloads");
        }
    }
}

fn validate_target(cx: &mut Ctx, lbl: &str, t: &TargetRef, services: &BTreeMap<String, ServiceSpec>) {
    if t.kind != "Service" {
        cx.err(lbl, "spec.targetRef.kind", format!("{:?} is not supported; only Service", t.kind));
    } else if !services.contains_key(&t.name) {
        cx.err(lbl, "spec.targetRef.name", format!("Service {:?} does not exist", t.name));
    }
}

fn check_regex(cx: &mut Ctx, lbl: &str, field: &str, re: &str) {
    if let Err(e) = regex::Regex::new(re) {
        cx.err(lbl, field, format!("regular expression does not compile: {}", e.to_string().replace('\n', " ")));
    }
}

fn check_method(cx: &mut Ctx, lbl: &str, field: &str, m: &str) {
    if !METHODS.contains(&m) {
        cx.err(lbl, field, format!("{m:?} is not an HTTP method; expected one of {}", METHODS.join(", ")));
    }
}

fn check_header_name(cx: &mut Ctx, lbl: &str, field: &str, name: &str) {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        cx.err(lbl, field, format!("{name:?} is not a valid header name"));
    }
}

fn check_path_glob(cx: &mut Ctx, lbl: &str, field: &str, p: &str) {
    if !(p.starts_with('/') || p.starts_with('*')) {
        cx.err(lbl, field, format!("{p:?} must start with '/' (or be a '*' glob)"));
    }
}

fn validate_route(cx: &mut Ctx, lbl: &str, r: &HttpRouteSpec, services: &BTreeMap<String, ServiceSpec>) {
    if r.parent_refs.is_empty() {
        cx.err(lbl, "spec.parentRefs", "needs at least one parent Service");
    }
    for (i, p) in r.parent_refs.iter().enumerate() {
        if p.kind != "Service" {
            cx.err(lbl, format!("spec.parentRefs[{i}].kind"), format!("{:?} is not supported; only Service", p.kind));
        } else {
            match services.get(&p.name) {
                None => {
                    cx.err(lbl, format!("spec.parentRefs[{i}].name"), format!("Service {:?} does not exist", p.name))
                }
                Some(s) if matches!(s.protocol, Protocol::Tcp | Protocol::Opaque) => cx.err(
                    lbl,
                    format!("spec.parentRefs[{i}].name"),
                    format!(
                        "Service {:?} is {:?}; HTTPRoutes apply only to http and grpc services",
                        p.name, s.protocol
                    ),
                ),
                Some(_) => {}
            }
        }
    }
    if r.rules.is_empty() {
        cx.err(lbl, "spec.rules", "needs at least one rule");
    }
    for (ri, rule) in r.rules.iter().enumerate() {
        let at = |f: &str| format!("spec.rules[{ri}].{f}");
        for (mi, m) in rule.matches.iter().enumerate() {
            let at = |f: &str| format!("spec.rules[{ri}].matches[{mi}].{f}");
            if let Some(p) = &m.path {
                match p.kind {
                    PathMatchType::RegularExpression => check_regex(cx, lbl, &at("path.value"), &p.value),
                    _ if !p.value.starts_with('/') => {
                        cx.err(lbl, at("path.value"), format!("{:?} must start with '/'", p.value))
                    }
                    _ => {}
                }
            }
            for (hi, h) in m.headers.iter().enumerate() {
                check_header_name(cx, lbl, &at(&format!("headers[{hi}].name")), &h.name);
                if h.kind == ValueMatchType::RegularExpression {
                    check_regex(cx, lbl, &at(&format!("headers[{hi}].value")), &h.value);
                }
            }
            for (qi, q) in m.query_params.iter().enumerate() {
                if q.kind == ValueMatchType::RegularExpression {
                    check_regex(cx, lbl, &at(&format!("queryParams[{qi}].value")), &q.value);
                }
            }
            if let Some(method) = &m.method {
                check_method(cx, lbl, &at("method"), method);
            }
        }
        if rule.backend_refs.is_empty() {
            cx.err(lbl, at("backendRefs"), "needs at least one backend");
        }
        let mut total: u64 = 0;
        for (bi, b) in rule.backend_refs.iter().enumerate() {
            total += u64::from(b.weight);
            if b.weight > 1_000_000 {
                cx.err(lbl, at(&format!("backendRefs[{bi}].weight")), "must be at most 1000000");
            }
            match services.get(&b.name) {
                None => {
                    cx.err(lbl, at(&format!("backendRefs[{bi}].name")), format!("Service {:?} does not exist", b.name))
                }
                Some(svc) => {
                    if let Some(sub) = &b.subset {
                        if !svc.subsets.iter().any(|s| &s.name == sub) {
                            cx.err(
                                lbl,
                                at(&format!("backendRefs[{bi}].subset")),
                                format!("Service {:?} has no subset {sub:?}", b.name),
                            );
                        }
                    }
                }
            }
        }
        if !rule.backend_refs.is_empty() && total == 0 {
            cx.err(lbl, at("backendRefs"), "weights add up to 0, so no backend would receive traffic");
        }
        if let Some(t) = &rule.timeouts {
            for (f, d) in [("request", t.request), ("backendRequest", t.backend_request)] {
                if d.is_some_and(|d| d.0.is_zero()) {
                    cx.err(lbl, at(&format!("timeouts.{f}")), "must be greater than 0");
                }
            }
            if let (Some(req), Some(be)) = (t.request, t.backend_request) {
                if be.0 > req.0 {
                    cx.err(
                        lbl,
                        at("timeouts.backendRequest"),
                        "is longer than timeouts.request, so it could never apply",
                    );
                }
            }
        }
        if let Some(rt) = &rule.retry {
            if rt.attempts > 10 {
                cx.err(lbl, at("retry.attempts"), "must be at most 10");
            }
            for (ci, c) in rt.codes.iter().enumerate() {
                if !(500..=599).contains(c) {
                    cx.err(lbl, at(&format!("retry.codes[{ci}]")), format!("{c} is not a 5xx status"));
                }
            }
            if !(0.0..=100.0).contains(&rt.budget.percent) {
                cx.err(lbl, at("retry.budget.percent"), "must be between 0 and 100");
            }
        }
        for (fi, f) in rule.filters.iter().enumerate() {
            let (want, present) = match f.kind {
                FilterType::RequestHeaderModifier => ("requestHeaderModifier", f.request_header_modifier.as_ref()),
                FilterType::ResponseHeaderModifier => ("responseHeaderModifier", f.response_header_modifier.as_ref()),
            };
            match present {
                None => cx.err(lbl, at(&format!("filters[{fi}].{want}")), format!("required for type {:?}", f.kind)),
                Some(m) => {
                    for (hi, h) in m.set.iter().chain(&m.add).enumerate() {
                        check_header_name(cx, lbl, &at(&format!("filters[{fi}].{want}.set/add[{hi}].name")), &h.name);
                    }
                    for (hi, h) in m.remove.iter().enumerate() {
                        check_header_name(cx, lbl, &at(&format!("filters[{fi}].{want}.remove[{hi}]")), h);
                    }
                }
            }
        }
    }
}

fn validate_policy(cx: &mut Ctx, lbl: &str, p: &AuthorizationPolicySpec) {
    for (ri, rule) in p.rules.iter().enumerate() {
        for (si, s) in rule.from.iter().enumerate() {
            let at = |f: &str| format!("spec.rules[{ri}].from[{si}].{f}");
            for (ii, id) in s.identities.iter().enumerate() {
                let ok = if id.contains('*') {
                    id == "*" || id.starts_with("spiffe://")
                } else {
                    weft_certs::SpiffeId::parse(id).is_ok()
                };
                if !ok {
                    let why = weft_certs::SpiffeId::parse(id).err().map(|e| e.to_string()).unwrap_or_default();
                    cx.err(
                        lbl,
                        at(&format!("identities[{ii}]")),
                        format!("{id:?} is not a SPIFFE ID or spiffe://… glob: {why}"),
                    );
                }
            }
            for (ti, td) in s.trust_domains.iter().enumerate() {
                if let Err(e) = weft_certs::TrustDomain::new(td) {
                    cx.err(lbl, at(&format!("trustDomains[{ti}]")), e.to_string());
                }
            }
        }
        for (oi, o) in rule.to.iter().enumerate() {
            let at = |f: &str| format!("spec.rules[{ri}].to[{oi}].{f}");
            for (pi, path) in o.paths.iter().enumerate() {
                check_path_glob(cx, lbl, &at(&format!("paths[{pi}]")), path);
            }
            for (mi, m) in o.methods.iter().enumerate() {
                check_method(cx, lbl, &at(&format!("methods[{mi}]")), m);
            }
        }
    }
}

/// `*` glob match: `*` matches any run of characters (including `/`).
pub fn glob_match(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !s.starts_with(first) || s.len() < first.len() + last.len() || !s.ends_with(last) {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests;
