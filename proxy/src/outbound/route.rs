//! The outbound routing step: the request made canonical (`canonical.rs`:
//! the one form routing, the callee's policy and rate limits, metrics and the
//! app see), which service the app called (the canonical host), which rule
//! of its routes and which weighted backend take the request, and the
//! request prepared for the hop to the peer sidecar, with its
//! [`RequestContext`] for the layers behind.

use std::sync::Arc;

use http::uri::PathAndQuery;
use http::{header, HeaderName, HeaderValue, Request, Uri, Version};
use weft_config::HeaderModifier;

use crate::canonical::canonicalize;
use crate::context::RequestContext;
use crate::error::ProxyError;
use crate::http::{strip_hop_by_hop, Body, APP_PROTOCOL, PROBE};
use crate::metrics::RequestMeta;
use crate::state::routes::{Decision, RequestInfo, Rule};
use crate::state::Snapshot;

/// A request routed and ready for the stack.
pub struct Routed {
    /// The service the app called (the metrics' `service` label).
    pub service: String,
    pub req: Request<Body>,
    pub rule: Arc<Rule>,
}

/// A request that could not be routed, with the service it named if that
/// is a service of the mesh (None: refused before routing, not counted as a
/// request of any service).
pub type Unrouted = (Option<String>, ProxyError);

/// Routes `req` with `snapshot` (one config for the whole request: a config
/// change applies between requests) and prepares it for the peer sidecar.
///
/// Errors: [`ProxyError::NonCanonical`] (no canonical form, or no host),
/// [`ProxyError::UnknownService`], [`ProxyError::NoRoute`], [`ProxyError::BadTarget`].
pub fn route(snapshot: &Arc<Snapshot>, req: Request<Body>, meta: &mut RequestMeta) -> Result<Routed, Unrouted> {
    let (mut parts, body) = req.into_parts();
    let service = canonicalize(&mut parts, snapshot.encoded_slashes()).map_err(|e| (None, e.into()))?.service;
    if !snapshot.knows(&service) {
        return Err((None, ProxyError::UnknownService { service }));
    }
    let info = RequestInfo {
        method: &parts.method,
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &parts.headers,
    };
    let rule = match snapshot.routes.route(&service, &info) {
        Decision::Rule(r) => r,
        Decision::Default => snapshot.default_rule(&service),
        Decision::NoMatch => {
            let e = ProxyError::NoRoute {
                service: service.clone(),
                method: parts.method.clone(),
                path: parts.uri.path().to_string(),
            };
            return Err((Some(service), e));
        }
    };
    let backend = rule.pick_backend().clone();
    meta.route = Some(rule.clone());
    meta.backend = Some(backend.clone());

    let app_protocol = if parts.version == Version::HTTP_2 { "h2" } else { "h1" };
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    // Only a sidecar probes an endpoint (`probe.rs`): an app's header would skip the callee's app.
    parts.headers.remove(PROBE);
    parts.headers.insert(APP_PROTOCOL, HeaderValue::from_static(app_protocol));
    modify_headers(&rule.request_headers, &mut parts.headers);
    // The request's own path (a shared buffer: no copy, and the endpoint
    // layer's copy of the head clones it without allocating).
    let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    // The canonical host, without the port the app may have named: the
    // callee's sidecar and app see the service name.
    parts.uri = match Uri::builder().scheme("http").authority(service.as_str()).path_and_query(path).build() {
        Ok(u) => u,
        Err(source) => return Err((Some(service), ProxyError::BadTarget { source })),
    };
    parts.version = Version::HTTP_2;
    parts.extensions.insert(RequestContext::outbound(snapshot.clone(), rule.clone(), backend));
    Ok(Routed { service, req: Request::from_parts(parts, body), rule })
}

/// Applies a header modifier (set, add, remove) to a header map.
pub fn modify_headers(m: &HeaderModifier, headers: &mut http::HeaderMap) {
    for h in &m.set {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_str(&h.value)) {
            headers.insert(n, v);
        }
    }
    for h in &m.add {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_str(&h.value)) {
            headers.append(n, v);
        }
    }
    for name in &m.remove {
        if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
            headers.remove(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::empty;

    #[test]
    fn header_modifiers() {
        let m = HeaderModifier {
            set: vec![weft_config::Header { name: "x-a".into(), value: "1".into() }],
            add: vec![weft_config::Header { name: "x-b".into(), value: "2".into() }],
            remove: vec!["x-c".into()],
        };
        let mut h = http::HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("0"));
        h.insert("x-b", HeaderValue::from_static("1"));
        h.insert("x-c", HeaderValue::from_static("gone"));
        modify_headers(&m, &mut h);
        assert_eq!(h["x-a"], "1");
        assert_eq!(h.get_all("x-b").iter().count(), 2);
        assert!(h.get("x-c").is_none());
    }

    fn knowing(services: &[&str]) -> Arc<Snapshot> {
        let services = services.iter().map(|s| (s.to_string(), Vec::new())).collect();
        Arc::new(Snapshot { services, ..Default::default() })
    }

    #[test]
    fn routes_by_authority_and_prepares_the_hop() {
        let snapshot = knowing(&["api"]);
        let mut meta = RequestMeta::default();
        let req =
            Request::get("/x?q=1").header("host", "API.:8080").header("connection", "close").body(empty()).unwrap();
        let routed = route(&snapshot, req, &mut meta).unwrap_or_else(|(_, e)| panic!("{e}"));
        assert_eq!(routed.service, "api");
        assert_eq!(routed.req.uri(), "http://api/x?q=1", "the canonical host, without the port");
        assert_eq!(routed.req.version(), Version::HTTP_2);
        assert_eq!(routed.req.headers()[APP_PROTOCOL], "h1");
        assert!(routed.req.headers().get(header::HOST).is_none() && routed.req.headers().get("connection").is_none());
        let ctx = routed.req.extensions().get::<RequestContext>().unwrap();
        assert_eq!(ctx.route.as_ref().unwrap().backend.service, "api");

        let no_host = Request::get("/").body(empty()).unwrap();
        let e = route(&snapshot, no_host, &mut meta).err().map(|(s, e)| (s, e.refusal()));
        assert_eq!(e, Some((None, Some("missing_host"))));
    }

    #[test]
    fn routing_sees_the_canonical_path() {
        let snapshot = knowing(&["api"]);
        let mut meta = RequestMeta::default();
        let req = Request::get("//%61dmin/./x/../users?q=/..").header("host", "api").body(empty()).unwrap();
        let routed = route(&snapshot, req, &mut meta).unwrap_or_else(|(_, e)| panic!("{e}"));
        assert_eq!(routed.req.uri(), "http://api/admin/users?q=/..");
        let req = Request::get("/admin%2Fusers").header("host", "api").body(empty()).unwrap();
        let (service, e) = route(&snapshot, req, &mut meta).err().expect("refused");
        assert!(service.is_none() && matches!(e, ProxyError::NonCanonical(_)), "{e}");
        assert_eq!(e.refusal(), Some("non_canonical"));
    }

    #[test]
    fn an_unknown_service_is_not_a_service_without_endpoints() {
        let cfg =
            weft_config::parse("apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: declared}\nspec: {}\n")
                .unwrap();
        let snapshot = Arc::new(Snapshot { mesh: Some(cfg), ..Default::default() });
        let mut meta = RequestMeta::default();
        let req = Request::get("/").header("host", "nowhere").body(empty()).unwrap();
        let (service, e) = route(&snapshot, req, &mut meta).err().expect("refused");
        assert!(service.is_none());
        assert_eq!(e.to_string(), "no service named \"nowhere\" in the mesh; send Host: <service>");
        assert_eq!(e.status(), http::StatusCode::NOT_FOUND);
        // Declared in the config, no endpoints yet: routed (the endpoint layer answers 503).
        let req = Request::get("/").header("host", "declared").body(empty()).unwrap();
        assert_eq!(route(&snapshot, req, &mut meta).map(|r| r.service).ok().as_deref(), Some("declared"));
    }
}
