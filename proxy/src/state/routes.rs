//! The compiled routes: which HTTPRoute rule a request takes, and which
//! backend (service subset) by weight. Matches are ranked as the Gateway API
//! defines: exact path, then longest prefix, then method, then most header
//! matches, then most query matches, then route and rule order. The outbound
//! routing step and the inbound route-scoped rate limits both match here.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use rand::Rng;
use regex::Regex;
use weft_config::{
    BackendRef, FilterType, HeaderModifier, MeshConfig, PathMatchType, Retry, RouteMatch, RouteRule, ValueMatch,
    ValueMatchType,
};

use super::budget::Budget;
use super::endpoints::Endpoint;
use super::kept::Renewal;

/// Why the routes of a config do not compile (the whole config is rejected).
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("HTTPRoute {route}: backend service {service:?} unknown")]
    UnknownBackend { route: String, service: String },
    #[error("HTTPRoute {route}: subset {subset:?} unknown")]
    UnknownSubset { route: String, subset: String },
    #[error("HTTPRoute {route}: regular expression {pattern:?}: {source}")]
    Regex { route: String, pattern: String, source: regex::Error },
    #[error("HTTPRoute {route}: header {name:?}: {source}")]
    HeaderName { route: String, name: String, source: http::header::InvalidHeaderName },
    #[error("HTTPRoute {route}: method {method:?}: {source}")]
    Method { route: String, method: String, source: http::method::InvalidMethod },
}

#[derive(Debug)]
enum PathM {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum ValueM {
    Exact(String),
    Regex(Regex),
}

impl ValueM {
    fn matches(&self, v: &str) -> bool {
        match self {
            Self::Exact(want) => want == v,
            Self::Regex(re) => re.is_match(v),
        }
    }
}

#[derive(Debug)]
struct Match {
    path: Option<PathM>,
    headers: Vec<(HeaderName, ValueM)>,
    method: Option<Method>,
    query: Vec<(String, ValueM)>,
}

/// A backend: a service, optionally narrowed to a subset by labels.
#[derive(Debug, Clone)]
pub struct Backend {
    pub service: String,
    /// Subset name (for metrics), empty for the whole service.
    pub subset: String,
    pub labels: BTreeMap<String, String>,
    pub weight: u32,
}

/// Endpoints a request may go to: inline up to a few (no allocation per
/// request for a service of a few endpoints).
pub type Candidates<'a> = smallvec::SmallVec<[&'a Endpoint; 8]>;

impl Backend {
    /// The endpoints of this backend among a service's endpoints.
    pub fn select<'a>(&self, endpoints: &'a [Endpoint]) -> Candidates<'a> {
        endpoints.iter().filter(|e| self.labels.iter().all(|(k, v)| e.labels.get(k) == Some(v))).collect()
    }
}

/// A compiled route rule.
#[derive(Debug)]
pub struct Rule {
    /// `route/rule-name` or `route/<index>`, for metrics and logs.
    pub name: String,
    /// Shared, so a routed request holds its backend without copying it.
    pub backends: Vec<Arc<Backend>>,
    total_weight: u64,
    pub request_timeout: Option<Duration>,
    pub try_timeout: Option<Duration>,
    pub retry: Option<Arc<Retry>>,
    /// The retry budget of this rule (present with `retry`); it outlives
    /// config swaps while the rule and its budget settings stay.
    pub budget: Option<Arc<Budget>>,
    pub request_headers: HeaderModifier,
    pub response_headers: HeaderModifier,
}

impl Rule {
    /// The HTTPRoute this rule belongs to (empty for a default route).
    pub fn route_name(&self) -> &str {
        self.name.split_once('/').map_or("", |(route, _)| route)
    }

    /// The default route of a service without HTTPRoutes: all its endpoints.
    pub fn default_for(service: &str) -> Self {
        Self {
            name: String::new(),
            backends: vec![Arc::new(Backend {
                service: service.into(),
                subset: String::new(),
                labels: BTreeMap::new(),
                weight: 1,
            })],
            total_weight: 1,
            request_timeout: None,
            try_timeout: None,
            retry: None,
            budget: None,
            request_headers: HeaderModifier::default(),
            response_headers: HeaderModifier::default(),
        }
    }

    /// A backend chosen at random by weight.
    pub fn pick_backend(&self) -> &Arc<Backend> {
        let mut n = rand::rng().random_range(0..self.total_weight.max(1));
        for b in &self.backends {
            if n < u64::from(b.weight) {
                return b;
            }
            n -= u64::from(b.weight);
        }
        &self.backends[0]
    }
}

/// What routing decided for a request.
pub enum Decision {
    /// The service has no routes: send to any of its endpoints.
    Default,
    Rule(Arc<Rule>),
    /// The service has routes and none matched (404, as the Gateway API says).
    NoMatch,
}

/// A request's routing inputs.
pub struct RequestInfo<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
}

#[derive(Debug, Default)]
pub struct Router {
    /// Per service: (match or None for "all", rule index), best first.
    candidates: HashMap<String, Vec<(Option<Match>, usize)>>,
    rules: Vec<Arc<Rule>>,
}

type Rank = (u8, std::cmp::Reverse<usize>, u8, std::cmp::Reverse<usize>, std::cmp::Reverse<usize>, usize, usize);

fn rank(m: Option<&RouteMatch>, route: usize, rule: usize) -> Rank {
    use std::cmp::Reverse;
    let (path_rank, prefix_len) = match m.and_then(|m| m.path.as_ref()) {
        // Exact, then regular expressions (their order is left to
        // implementations by the Gateway API; before prefixes, so a catch-all
        // rule cannot shadow them), then prefixes, longest first.
        Some(p) if p.kind == PathMatchType::Exact => (0, p.value.len()),
        Some(p) if p.kind == PathMatchType::RegularExpression => (1, 0),
        Some(p) => (2, p.value.len()),
        None => (2, 1), // no path match behaves like the prefix "/"
    };
    let method = u8::from(m.and_then(|m| m.method.as_ref()).is_none());
    let headers = m.map(|m| m.headers.len()).unwrap_or(0);
    let query = m.map(|m| m.query_params.len()).unwrap_or(0);
    (path_rank, Reverse(prefix_len), method, Reverse(headers), Reverse(query), route, rule)
}

fn compile_value(route: &str, v: &ValueMatch) -> Result<ValueM, RouteError> {
    Ok(match v.kind {
        ValueMatchType::Exact => ValueM::Exact(v.value.clone()),
        ValueMatchType::RegularExpression => ValueM::Regex(anchored(route, &v.value)?),
    })
}

/// Gateway API regex matches are full matches.
fn anchored(route: &str, re: &str) -> Result<Regex, RouteError> {
    Regex::new(&format!("^(?:{re})$")).map_err(|source| RouteError::Regex {
        route: route.into(),
        pattern: re.into(),
        source,
    })
}

fn compile_match(route: &str, m: &RouteMatch) -> Result<Match, RouteError> {
    let path = m
        .path
        .as_ref()
        .map(|p| {
            Ok::<_, RouteError>(match p.kind {
                PathMatchType::Exact => PathM::Exact(p.value.clone()),
                PathMatchType::PathPrefix => PathM::Prefix(p.value.trim_end_matches('/').to_string()),
                PathMatchType::RegularExpression => PathM::Regex(anchored(route, &p.value)?),
            })
        })
        .transpose()?;
    let headers = m
        .headers
        .iter()
        .map(|h| {
            let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|source| RouteError::HeaderName {
                route: route.into(),
                name: h.name.clone(),
                source,
            })?;
            Ok((name, compile_value(route, h)?))
        })
        .collect::<Result<_, RouteError>>()?;
    let method = m
        .method
        .as_ref()
        .map(|s| {
            Method::from_bytes(s.as_bytes()).map_err(|source| RouteError::Method {
                route: route.into(),
                method: s.clone(),
                source,
            })
        })
        .transpose()?;
    let query = m
        .query_params
        .iter()
        .map(|q| Ok((q.name.clone(), compile_value(route, q)?)))
        .collect::<Result<_, RouteError>>()?;
    Ok(Match { path, headers, method, query })
}

fn compile_rule(
    cfg: &MeshConfig,
    route: &str,
    idx: usize,
    r: &RouteRule,
    budgets: &mut Renewal<'_, String, Budget>,
) -> Result<Rule, RouteError> {
    let backends = r
        .backend_refs
        .iter()
        .map(|b: &BackendRef| {
            let svc = cfg
                .services
                .get(&b.name)
                .ok_or_else(|| RouteError::UnknownBackend { route: route.into(), service: b.name.clone() })?;
            let labels = match &b.subset {
                None => BTreeMap::new(),
                Some(name) => svc
                    .subsets
                    .iter()
                    .find(|s| &s.name == name)
                    .map(|s| s.labels.clone())
                    .ok_or_else(|| RouteError::UnknownSubset { route: route.into(), subset: name.clone() })?,
            };
            Ok(Arc::new(Backend {
                service: b.name.clone(),
                subset: b.subset.clone().unwrap_or_default(),
                labels,
                weight: b.weight,
            }))
        })
        .collect::<Result<Vec<_>, RouteError>>()?;
    let modifier = |kind: FilterType| {
        r.filters
            .iter()
            .filter(|f| f.kind == kind)
            .filter_map(|f| match kind {
                FilterType::RequestHeaderModifier => f.request_header_modifier.clone(),
                FilterType::ResponseHeaderModifier => f.response_header_modifier.clone(),
            })
            .next()
            .unwrap_or_default()
    };
    let name = format!("{route}/{}", r.name.clone().unwrap_or_else(|| idx.to_string()));
    let budget = r.retry.as_ref().map(|retry| {
        let settings = &retry.budget;
        budgets.get(name.clone(), |b| b.settings() == settings, || Budget::new(settings))
    });
    Ok(Rule {
        name,
        total_weight: backends.iter().map(|b| u64::from(b.weight)).sum(),
        backends,
        request_timeout: r.timeouts.as_ref().and_then(|t| t.request).map(|d| d.0),
        try_timeout: r.timeouts.as_ref().and_then(|t| t.backend_request).map(|d| d.0),
        retry: r.retry.clone().map(Arc::new),
        budget,
        request_headers: modifier(FilterType::RequestHeaderModifier),
        response_headers: modifier(FilterType::ResponseHeaderModifier),
    })
}

impl Router {
    /// Compiles the routes of a validated config; any failure rejects it all.
    /// Rules with retries take their budget from `budgets` (kept across swaps).
    pub fn new(cfg: &MeshConfig, budgets: &mut Renewal<'_, String, Budget>) -> Result<Self, RouteError> {
        let mut router = Router::default();
        let mut ranked: HashMap<String, Vec<(Rank, Option<Match>, usize)>> = HashMap::new();
        for (ri, route) in cfg.routes.iter().enumerate() {
            for (ui, rule) in route.spec.rules.iter().enumerate() {
                let rule_idx = router.rules.len();
                router.rules.push(Arc::new(compile_rule(cfg, &route.name, ui, rule, budgets)?));
                for parent in &route.spec.parent_refs {
                    let list = ranked.entry(parent.name.clone()).or_default();
                    if rule.matches.is_empty() {
                        list.push((rank(None, ri, ui), None, rule_idx));
                    }
                    for m in &rule.matches {
                        let compiled = compile_match(&route.name, m)?;
                        list.push((rank(Some(m), ri, ui), Some(compiled), rule_idx));
                    }
                }
            }
        }
        for (svc, mut list) in ranked {
            list.sort_by_key(|c| c.0);
            router.candidates.insert(svc, list.into_iter().map(|(_, m, i)| (m, i)).collect());
        }
        Ok(router)
    }

    /// Every compiled rule, in config order.
    pub fn rules(&self) -> &[Arc<Rule>] {
        &self.rules
    }

    pub fn route(&self, service: &str, req: &RequestInfo<'_>) -> Decision {
        let Some(list) = self.candidates.get(service) else {
            return Decision::Default;
        };
        for (m, rule) in list {
            if m.as_ref().is_none_or(|m| matches(m, req)) {
                return Decision::Rule(self.rules[*rule].clone());
            }
        }
        Decision::NoMatch
    }
}

fn matches(m: &Match, req: &RequestInfo<'_>) -> bool {
    let path_ok = match &m.path {
        None => true,
        Some(PathM::Exact(p)) => req.path == p,
        // Prefixes match whole segments: /api matches /api and /api/x, not /apix.
        Some(PathM::Prefix(p)) => {
            p.is_empty()
                || (req.path.starts_with(p.as_str()) && matches!(req.path.as_bytes().get(p.len()), None | Some(b'/')))
        }
        Some(PathM::Regex(re)) => re.is_match(req.path),
    };
    path_ok
        && m.method.as_ref().is_none_or(|want| want == req.method)
        && m.headers
            .iter()
            .all(|(name, vm)| req.headers.get_all(name).iter().any(|v| v.to_str().is_ok_and(|v| vm.matches(v))))
        && m.query.iter().all(|(name, vm)| {
            req.query
                .unwrap_or("")
                .split('&')
                .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
                .any(|(k, v)| k == name && vm.matches(v))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::kept::Kept;
    use http::HeaderValue;

    fn compile(cfg: &MeshConfig) -> Router {
        let budgets = Kept::default();
        let mut renewal = budgets.renew();
        Router::new(cfg, &mut renewal).unwrap()
    }

    const CFG: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: b}
spec:
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
---
apiVersion: weft.dev/v1alpha1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{name: b}]
  rules:
    - name: split
      backendRefs: [{name: b, subset: v1, weight: 90}, {name: b, subset: v2, weight: 10}]
    - name: canary
      matches: [{headers: [{name: x-canary, value: "true"}]}]
      backendRefs: [{name: b, subset: v2}]
    - name: api-prefix
      matches: [{path: {type: PathPrefix, value: /api}}]
      backendRefs: [{name: b, subset: v1}]
    - name: api-exact
      matches: [{path: {type: Exact, value: /api/special}}]
      backendRefs: [{name: b, subset: v2}]
    - name: api-post
      matches: [{path: {type: PathPrefix, value: /api}, method: POST}]
      backendRefs: [{name: b, subset: v2}]
    - name: regex
      matches: [{path: {type: RegularExpression, value: "/v[0-9]+/.*"}}]
      backendRefs: [{name: b, subset: v2}]
    - name: query
      matches: [{path: {type: PathPrefix, value: /q}, queryParams: [{type: RegularExpression, name: id, value: "[0-9]+"}]}]
      backendRefs: [{name: b, subset: v2}]
"#;

    fn route_name(r: &Router, method: Method, path: &str, query: Option<&str>, headers: &[(&str, &str)]) -> String {
        let mut h = http::HeaderMap::new();
        for (k, v) in headers {
            h.insert(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        match r.route("b", &RequestInfo { method: &method, path, query, headers: &h }) {
            Decision::Rule(rule) => rule.name.clone(),
            Decision::Default => "default".into(),
            Decision::NoMatch => "none".into(),
        }
    }

    #[test]
    fn precedence_follows_the_gateway_api() {
        let cfg = weft_config::parse(CFG).unwrap();
        let r = compile(&cfg);
        assert_eq!(route_name(&r, Method::GET, "/", None, &[]), "r/split");
        assert_eq!(route_name(&r, Method::GET, "/", None, &[("x-canary", "true")]), "r/canary");
        assert_eq!(route_name(&r, Method::GET, "/", None, &[("x-canary", "TRUE")]), "r/split", "exact is exact");
        assert_eq!(route_name(&r, Method::GET, "/api/x", None, &[]), "r/api-prefix");
        assert_eq!(route_name(&r, Method::GET, "/api", None, &[]), "r/api-prefix");
        assert_eq!(route_name(&r, Method::GET, "/apix", None, &[]), "r/split", "prefixes match whole segments");
        assert_eq!(route_name(&r, Method::GET, "/api/special", None, &[]), "r/api-exact", "exact beats prefix");
        assert_eq!(route_name(&r, Method::POST, "/api/x", None, &[]), "r/api-post", "method beats none");
        assert_eq!(route_name(&r, Method::GET, "/q", Some("a=1&id=42"), &[]), "r/query");
        assert_eq!(route_name(&r, Method::GET, "/q", Some("id=4x2"), &[]), "r/split", "regex is a full match");
        assert_eq!(route_name(&r, Method::GET, "/v7/items", None, &[]), "r/regex", "a regex path beats the catch-all");
        assert_eq!(route_name(&r, Method::GET, "/v7x/items", None, &[]), "r/split");
        let none = r.route(
            "other",
            &RequestInfo { method: &Method::GET, path: "/", query: None, headers: &Default::default() },
        );
        assert!(matches!(none, Decision::Default));
    }

    #[test]
    fn no_match_when_routes_exist() {
        let cfg = weft_config::parse(&CFG.replace("    - name: split\n      backendRefs: [{name: b, subset: v1, weight: 90}, {name: b, subset: v2, weight: 10}]\n", "")).unwrap();
        let r = compile(&cfg);
        assert_eq!(route_name(&r, Method::GET, "/elsewhere", None, &[]), "none");
    }

    #[test]
    fn weights_split_traffic() {
        let cfg = weft_config::parse(CFG).unwrap();
        let r = compile(&cfg);
        let Decision::Rule(rule) =
            r.route("b", &RequestInfo { method: &Method::GET, path: "/", query: None, headers: &Default::default() })
        else {
            panic!()
        };
        let v2 = (0..10_000).filter(|_| rule.pick_backend().subset == "v2").count();
        assert!((800..1200).contains(&v2), "v2 got {v2} of 10000");
    }
}
