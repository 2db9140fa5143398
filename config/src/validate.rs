//! Checks of the decoded kinds that serde cannot express: references between
//! documents, value ranges, regular expressions, header names and methods.
//! Each function reports every problem it finds and never stops at the first.

use std::collections::{BTreeMap, BTreeSet};

use crate::documents::Labels;
use crate::error::Report;
use crate::*;

const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];

type Services = BTreeMap<String, ServiceSpec>;

/// Checks every decoded document, kind by kind, in the order errors are reported.
pub(crate) fn mesh(cfg: &MeshConfig, labels: &Labels, report: &mut Report) {
    let slashes = cfg.mesh.path_normalization.encoded_slashes;
    let mut virtual_ips: BTreeMap<std::net::IpAddr, &str> = BTreeMap::new();
    for (name, svc) in &cfg.services {
        let lbl = labels.of("Service", name);
        service(report, lbl, name, svc);
        for (i, ip) in svc.addresses.iter().enumerate() {
            match virtual_ips.insert(*ip, name) {
                Some(other) if other != name => report.err(
                    lbl,
                    format!("spec.addresses[{i}]"),
                    format!("{ip} is already an address of Service {other:?}; a virtual address names one service"),
                ),
                Some(_) => report.err(lbl, format!("spec.addresses[{i}]"), format!("{ip} is listed twice")),
                None => {}
            }
        }
    }
    for r in &cfg.routes {
        route(report, labels.of("HTTPRoute", &r.name), &r.spec, &cfg.services, slashes);
    }
    for r in &cfg.grpc_routes {
        let lbl = labels.of("GRPCRoute", &r.name);
        grpc_route(report, lbl, &r.spec, &cfg.services);
        if cfg.routes.iter().any(|h| h.name == r.name) {
            report.err(
                lbl,
                "metadata.name",
                format!(
                    "an HTTPRoute is already named {:?}; routes share one set of names (metrics name rules by route)",
                    r.name
                ),
            );
        }
    }
    for p in &cfg.policies {
        let lbl = labels.of("AuthorizationPolicy", &p.name);
        target(report, lbl, &p.spec.target_ref, &cfg.services);
        policy(report, lbl, &p.spec, slashes);
    }
    for r in &cfg.rate_limits {
        rate_limit(report, labels.of("RateLimit", &r.name), &r.spec, cfg);
    }
    for w in &cfg.workloads {
        workload(report, labels.of("Workload", &w.name), &w.spec, &cfg.services);
    }
}

fn service(report: &mut Report, lbl: &str, name: &str, svc: &ServiceSpec) {
    if let Some(admit) = &svc.admit {
        if admit.service_accounts.is_empty() {
            report.err(
                lbl,
                "spec.admit.serviceAccounts",
                "name at least one service account: labels alone cannot admit (workloads declare their own labels)",
            );
        }
        for (i, sa) in admit.service_accounts.iter().enumerate() {
            let parts: Vec<&str> = sa.split('/').collect();
            if parts.len() > 2 || !parts.iter().all(|p| registration::valid_service_name(p)) {
                report.err(
                    lbl,
                    format!("spec.admit.serviceAccounts[{i}]"),
                    format!("{sa:?} is not `name` or `namespace/name` (DNS labels)"),
                );
            }
        }
    }
    // Sidecars register under this name, which must be a DNS label.
    if !registration::valid_service_name(name) {
        report.err(lbl, "metadata.name", "a Service name is a DNS label: no '.' (sidecars register under this name)");
    }
    if svc.port == 0 {
        report.err(lbl, "spec.port", "must be between 1 and 65535");
    }
    for (i, ip) in svc.addresses.iter().enumerate() {
        let broadcast = matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast());
        if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || broadcast {
            report.err(
                lbl,
                format!("spec.addresses[{i}]"),
                format!("{ip} cannot be a service's virtual address (unspecified, loopback, multicast or broadcast)"),
            );
        }
    }
    let mut seen = BTreeSet::new();
    for (i, s) in svc.subsets.iter().enumerate() {
        if !valid_name(&s.name) {
            report.err(lbl, format!("spec.subsets[{i}].name"), "must be lower-case letters, digits, '-' or '.'");
        }
        if !seen.insert(&s.name) {
            report.err(lbl, format!("spec.subsets[{i}].name"), format!("subset {:?} is defined twice", s.name));
        }
        if s.labels.is_empty() {
            report.err(
                lbl,
                format!("spec.subsets[{i}].labels"),
                "a subset needs at least one label to select workloads",
            );
        }
    }
}

fn target(report: &mut Report, lbl: &str, t: &TargetRef, services: &Services) {
    if t.kind != "Service" {
        report.err(lbl, "spec.targetRef.kind", format!("{:?} is not supported; only Service", t.kind));
    } else if !services.contains_key(&t.name) {
        report.err(lbl, "spec.targetRef.name", format!("Service {:?} does not exist", t.name));
    }
}

fn rate_limit(report: &mut Report, lbl: &str, r: &RateLimitSpec, cfg: &MeshConfig) {
    let target_ref = &r.target_ref;
    match target_ref.kind.as_str() {
        "Service" => target(report, lbl, target_ref, &cfg.services),
        "HTTPRoute" if !cfg.routes.iter().any(|route| route.name == target_ref.name) => {
            report.err(lbl, "spec.targetRef.name", format!("HTTPRoute {:?} does not exist", target_ref.name))
        }
        "HTTPRoute" => {}
        other => {
            report.err(lbl, "spec.targetRef.kind", format!("{other:?} is not supported; only Service or HTTPRoute"))
        }
    }
    if !(r.requests_per_second.is_finite() && r.requests_per_second > 0.0) {
        report.err(lbl, "spec.requestsPerSecond", "must be a number greater than 0");
    }
    for (i, p) in r.paths.iter().enumerate() {
        check_path_glob(report, lbl, &format!("spec.paths[{i}]"), p, cfg.mesh.path_normalization.encoded_slashes);
    }
}

fn workload(report: &mut Report, lbl: &str, w: &WorkloadSpec, services: &Services) {
    if !services.contains_key(&w.service) {
        report.err(lbl, "spec.service", format!("Service {:?} does not exist", w.service));
    }
    for (i, c) in w.calls.iter().enumerate() {
        if !services.contains_key(c) {
            report.err(lbl, format!("spec.calls[{i}]"), format!("Service {c:?} does not exist"));
        }
    }
    if !(1..=20).contains(&w.replicas) {
        report.err(lbl, "spec.replicas", "must be between 1 and 20");
    }
    if !(w.load.is_finite() && (0.0..=5000.0).contains(&w.load)) {
        report.err(lbl, "spec.load", "must be between 0 and 5000 requests per second");
    }
}

// ---------------------------------------------------------------- HTTPRoute

fn parent_refs(report: &mut Report, lbl: &str, refs: &[ParentRef], services: &Services) {
    if refs.is_empty() {
        report.err(lbl, "spec.parentRefs", "needs at least one parent Service");
    }
    for (i, p) in refs.iter().enumerate() {
        parent_ref(report, lbl, &format!("spec.parentRefs[{i}]"), p, services);
    }
}

fn route(report: &mut Report, lbl: &str, r: &HttpRouteSpec, services: &Services, slashes: EncodedSlashes) {
    parent_refs(report, lbl, &r.parent_refs, services);
    if r.rules.is_empty() {
        report.err(lbl, "spec.rules", "needs at least one rule");
    }
    for (ri, rule) in r.rules.iter().enumerate() {
        let at = format!("spec.rules[{ri}]");
        for (mi, m) in rule.matches.iter().enumerate() {
            route_match(report, lbl, &format!("{at}.matches[{mi}]"), m, slashes);
        }
        backend_refs(report, lbl, &at, &rule.backend_refs, services);
        if let Some(t) = &rule.timeouts {
            timeouts(report, lbl, &at, t);
        }
        if let Some(rt) = &rule.retry {
            retry(report, lbl, &at, rt);
        }
        for (fi, f) in rule.filters.iter().enumerate() {
            filter(report, lbl, &format!("{at}.filters[{fi}]"), f);
        }
    }
}

/// A parent must be an existing HTTP or gRPC Service (the Gateway API's
/// mesh profile: `group: ""`, `kind: Service`), on its port if one is named.
fn parent_ref(report: &mut Report, lbl: &str, at: &str, p: &ParentRef, services: &Services) {
    match p.group.as_deref() {
        None | Some("") => {}
        Some("gateway.networking.k8s.io") => {
            report.err(
                lbl,
                format!("{at}.group"),
                "Gateway parents are not implemented yet: weft implements the Gateway API's mesh (GAMMA) profile, \
                 where a route's parent is a Service (group: \"\", kind: Service)",
            );
            return;
        }
        Some(g) => {
            report.err(lbl, format!("{at}.group"), format!("{g:?} is not supported; a Service's group is \"\" (core)"));
            return;
        }
    }
    if p.kind != "Service" {
        report.err(lbl, format!("{at}.kind"), format!("{:?} is not supported; only Service", p.kind));
        return;
    }
    match services.get(&p.name) {
        None => report.err(lbl, format!("{at}.name"), format!("Service {:?} does not exist", p.name)),
        Some(s) if matches!(s.protocol, Protocol::Tcp | Protocol::Opaque) => report.err(
            lbl,
            format!("{at}.name"),
            format!("Service {:?} is {:?}; HTTPRoutes apply only to http, http2 and grpc services", p.name, s.protocol),
        ),
        Some(s) => service_port(report, lbl, at, &p.name, p.port, s),
    }
}

/// A reference's `port`, if given, must be the Service's (weft Services have one port).
fn service_port(report: &mut Report, lbl: &str, at: &str, name: &str, port: Option<u16>, svc: &ServiceSpec) {
    if let Some(port) = port.filter(|p| *p != svc.port) {
        report.err(
            lbl,
            format!("{at}.port"),
            format!("Service {name:?} has port {}, not {port} (a weft Service has one port: spec.port)", svc.port),
        );
    }
}

fn route_match(report: &mut Report, lbl: &str, at: &str, m: &RouteMatch, slashes: EncodedSlashes) {
    if let Some(p) = &m.path {
        match p.kind {
            PathMatchType::RegularExpression => check_regex(report, lbl, &format!("{at}.path.value"), &p.value),
            _ if !p.value.starts_with('/') => {
                report.err(lbl, format!("{at}.path.value"), format!("{:?} must start with '/'", p.value))
            }
            _ => check_canonical_path(report, lbl, &format!("{at}.path.value"), &p.value, slashes),
        }
    }
    for (hi, h) in m.headers.iter().enumerate() {
        check_header_name(report, lbl, &format!("{at}.headers[{hi}].name"), &h.name);
        if h.kind == ValueMatchType::RegularExpression {
            check_regex(report, lbl, &format!("{at}.headers[{hi}].value"), &h.value);
        }
    }
    for (qi, q) in m.query_params.iter().enumerate() {
        if q.kind == ValueMatchType::RegularExpression {
            check_regex(report, lbl, &format!("{at}.queryParams[{qi}].value"), &q.value);
        }
    }
    if let Some(method) = &m.method {
        check_method(report, lbl, &format!("{at}.method"), method);
    }
}

/// A rule's backends: existing Services and subsets, weights that send traffic somewhere.
fn backend_refs(report: &mut Report, lbl: &str, at: &str, refs: &[BackendRef], services: &Services) {
    if refs.is_empty() {
        report.err(lbl, format!("{at}.backendRefs"), "needs at least one backend");
    }
    let mut total: u64 = 0;
    for (bi, b) in refs.iter().enumerate() {
        let at = format!("{at}.backendRefs[{bi}]");
        total += u64::from(b.weight);
        if b.weight > 1_000_000 {
            report.err(lbl, format!("{at}.weight"), "must be at most 1000000");
        }
        if let Some(g) = b.group.as_deref().filter(|g| !g.is_empty()) {
            report.err(lbl, format!("{at}.group"), format!("{g:?} is not supported; a Service's group is \"\" (core)"));
            continue;
        }
        if let Some(k) = b.kind.as_deref().filter(|k| *k != "Service") {
            report.err(lbl, format!("{at}.kind"), format!("{k:?} is not supported; backends are Services"));
            continue;
        }
        match (services.get(&b.name), &b.subset) {
            (None, _) => report.err(lbl, format!("{at}.name"), format!("Service {:?} does not exist", b.name)),
            (Some(svc), Some(sub)) if !svc.subsets.iter().any(|s| &s.name == sub) => {
                report.err(lbl, format!("{at}.subset"), format!("Service {:?} has no subset {sub:?}", b.name))
            }
            (Some(svc), _) => service_port(report, lbl, &at, &b.name, b.port, svc),
        }
    }
    if !refs.is_empty() && total == 0 {
        report.err(lbl, format!("{at}.backendRefs"), "weights add up to 0, so no backend would receive traffic");
    }
}

fn timeouts(report: &mut Report, lbl: &str, at: &str, t: &Timeouts) {
    for (f, d) in [("request", t.request), ("backendRequest", t.backend_request)] {
        if d.is_some_and(|d| d.0.is_zero()) {
            report.err(lbl, format!("{at}.timeouts.{f}"), "must be greater than 0");
        }
    }
    if let (Some(req), Some(be)) = (t.request, t.backend_request) {
        if be.0 > req.0 {
            report.err(
                lbl,
                format!("{at}.timeouts.backendRequest"),
                "is longer than timeouts.request, so it could never apply",
            );
        }
    }
}

fn retry(report: &mut Report, lbl: &str, at: &str, rt: &Retry) {
    if rt.attempts > 10 {
        report.err(lbl, format!("{at}.retry.attempts"), "must be at most 10");
    }
    for (ci, c) in rt.codes.iter().enumerate() {
        if !(500..=599).contains(c) {
            report.err(lbl, format!("{at}.retry.codes[{ci}]"), format!("{c} is not a 5xx status"));
        }
    }
    if !(0.0..=100.0).contains(&rt.budget.percent) {
        report.err(lbl, format!("{at}.retry.budget.percent"), "must be between 0 and 100");
    }
}

/// A filter needs the modifier its type names, with valid header names.
fn filter(report: &mut Report, lbl: &str, at: &str, f: &Filter) {
    let (want, present) = match f.kind {
        FilterType::RequestHeaderModifier => ("requestHeaderModifier", f.request_header_modifier.as_ref()),
        FilterType::ResponseHeaderModifier => ("responseHeaderModifier", f.response_header_modifier.as_ref()),
    };
    let Some(m) = present else {
        report.err(lbl, format!("{at}.{want}"), format!("required for type {:?}", f.kind));
        return;
    };
    for (hi, h) in m.set.iter().chain(&m.add).enumerate() {
        check_header_name(report, lbl, &format!("{at}.{want}.set/add[{hi}].name"), &h.name);
    }
    for (hi, h) in m.remove.iter().enumerate() {
        check_header_name(report, lbl, &format!("{at}.{want}.remove[{hi}]"), h);
    }
}

// ---------------------------------------------------------------- GRPCRoute

/// A gRPC service name as the Gateway API accepts it (`package.Service`).
const GRPC_SERVICE: &str = r"^(?i)\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*$";
/// A gRPC method name.
const GRPC_METHOD: &str = r"^[A-Za-z_][A-Za-z_0-9]*$";

fn grpc_route(report: &mut Report, lbl: &str, r: &GrpcRouteSpec, services: &Services) {
    parent_refs(report, lbl, &r.parent_refs, services);
    if r.rules.is_empty() {
        report.err(lbl, "spec.rules", "needs at least one rule");
    }
    for (ri, rule) in r.rules.iter().enumerate() {
        let at = format!("spec.rules[{ri}]");
        for (mi, m) in rule.matches.iter().enumerate() {
            let at = format!("{at}.matches[{mi}]");
            if let Some(method) = &m.method {
                grpc_method(report, lbl, &format!("{at}.method"), method);
            }
            let headers = RouteMatch { headers: m.headers.clone(), ..Default::default() };
            route_match(report, lbl, &at, &headers, EncodedSlashes::default());
        }
        backend_refs(report, lbl, &at, &rule.backend_refs, services);
        for (fi, f) in rule.filters.iter().enumerate() {
            filter(report, lbl, &format!("{at}.filters[{fi}]"), f);
        }
    }
}

fn grpc_method(report: &mut Report, lbl: &str, at: &str, m: &GrpcMethodMatch) {
    if m.service.is_none() && m.method.is_none() {
        report.err(lbl, at, "set service, method or both");
    }
    for (field, value, pattern) in [("service", &m.service, GRPC_SERVICE), ("method", &m.method, GRPC_METHOD)] {
        let Some(value) = value else { continue };
        match m.kind {
            ValueMatchType::RegularExpression => check_regex(report, lbl, &format!("{at}.{field}"), value),
            ValueMatchType::Exact if !regex::Regex::new(pattern).is_ok_and(|re| re.is_match(value)) => {
                report.err(lbl, format!("{at}.{field}"), format!("{value:?} is not a gRPC {field} name"))
            }
            ValueMatchType::Exact => {}
        }
    }
}

// ---------------------------------------------------------------- AuthorizationPolicy

fn policy(report: &mut Report, lbl: &str, p: &AuthorizationPolicySpec, slashes: EncodedSlashes) {
    for (ri, rule) in p.rules.iter().enumerate() {
        for (si, s) in rule.from.iter().enumerate() {
            source(report, lbl, &format!("spec.rules[{ri}].from[{si}]"), s);
        }
        for (oi, o) in rule.to.iter().enumerate() {
            let at = format!("spec.rules[{ri}].to[{oi}]");
            for (pi, path) in o.paths.iter().enumerate() {
                check_path_glob(report, lbl, &format!("{at}.paths[{pi}]"), path, slashes);
            }
            for (mi, m) in o.methods.iter().enumerate() {
                check_method(report, lbl, &format!("{at}.methods[{mi}]"), m);
            }
        }
    }
}

/// Identities are SPIFFE IDs or `spiffe://…` globs; trust domains follow the SPIFFE spec.
fn source(report: &mut Report, lbl: &str, at: &str, s: &Source) {
    for (ii, id) in s.identities.iter().enumerate() {
        let ok = if id.contains('*') {
            id == "*" || id.starts_with("spiffe://")
        } else {
            weft_certs::SpiffeId::parse(id).is_ok()
        };
        if !ok {
            let why = weft_certs::SpiffeId::parse(id).err().map(|e| e.to_string()).unwrap_or_default();
            report.err(
                lbl,
                format!("{at}.identities[{ii}]"),
                format!("{id:?} is not a SPIFFE ID or spiffe://… glob: {why}"),
            );
        }
    }
    for (ti, td) in s.trust_domains.iter().enumerate() {
        if let Err(e) = weft_certs::TrustDomain::new(td) {
            report.err(lbl, format!("{at}.trustDomains[{ti}]"), e.to_string());
        }
    }
}

// ---------------------------------------------------------------- values

fn check_regex(report: &mut Report, lbl: &str, field: &str, re: &str) {
    if let Err(e) = regex::Regex::new(re) {
        report.err(lbl, field, format!("regular expression does not compile: {}", e.to_string().replace('\n', " ")));
    }
}

fn check_method(report: &mut Report, lbl: &str, field: &str, m: &str) {
    if !METHODS.contains(&m) {
        report.err(lbl, field, format!("{m:?} is not an HTTP method; expected one of {}", METHODS.join(", ")));
    }
}

fn check_header_name(report: &mut Report, lbl: &str, field: &str, name: &str) {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        report.err(lbl, field, format!("{name:?} is not a valid header name"));
    }
}

fn check_path_glob(report: &mut Report, lbl: &str, field: &str, p: &str, slashes: EncodedSlashes) {
    if !(p.starts_with('/') || p.starts_with('*')) {
        report.err(lbl, field, format!("{p:?} must start with '/' (or be a '*' glob)"));
        return;
    }
    // A leading '*' matches any prefix; what follows is checked when it is a path.
    let rest = p.trim_start_matches('*');
    if rest.starts_with('/') {
        check_canonical_path(report, lbl, field, rest, slashes);
    }
}

/// Requests are matched in their canonical form (docs/config.md "Request
/// canonicalization"), so a path or glob written otherwise (`//x`,
/// `/a/../b`, `%61`) could never match: refused, with the spelling that would.
/// `*` is an ordinary path character to the canonical rules, so a glob's
/// literal parts are checked where they stand.
fn check_canonical_path(report: &mut Report, lbl: &str, field: &str, p: &str, slashes: EncodedSlashes) {
    if let Some(at) = p.find(['?', '#']) {
        report.err(
            lbl,
            field,
            format!(
                "{p:?} has {:?} at byte {at}: paths are matched without the query, so it could never match",
                &p[at..=at]
            ),
        );
        return;
    }
    match canonical::canonical_path(p, slashes) {
        Ok(c) if c == p => {}
        Ok(c) => report.err(
            lbl,
            field,
            format!("{p:?} is not in canonical form, so no request could match it (requests are matched once canonical); write {c:?}"),
        ),
        Err(e) => report.err(lbl, field, format!("{p:?} could never match a request: {e}")),
    }
}
