//! Standard Gateway API fields weft does not implement yet. A route copied
//! from the Gateway API documentation may carry them; each is reported as
//! "not implemented yet" (with what to do instead) rather than as an unknown
//! field, and removed before the strict decode so the rest of the document
//! is still checked.

use serde_norway::Value;

use crate::error::Report;

/// The Gateway API's group, as it starts an `apiVersion`.
pub(crate) const GROUP_PREFIX: &str = "gateway.networking.k8s.io/";

/// Filter types weft implements, for both HTTPRoute and GRPCRoute.
const FILTERS: &str = "RequestHeaderModifier, ResponseHeaderModifier";

/// Reports (and removes) the standard fields of an `HTTPRoute` or `GRPCRoute`
/// spec that weft does not implement yet; `namespace` is the route's own.
pub(crate) fn screen(kind: &str, namespace: Option<&str>, spec: &mut Value, label: &str, report: &mut Report) {
    let own_ns = namespace.unwrap_or("default");
    let mut not_yet = |field: String, why: &str| {
        report.err(label, field, format!("not implemented yet in weft: {why}"));
    };
    if take(spec, "hostnames").is_some_and(|h| h.as_sequence().is_some_and(|s| !s.is_empty())) {
        not_yet(
            "spec.hostnames".into(),
            "in the mesh profile a route applies to every request to its parent Service; remove hostnames",
        );
    }
    for (i, parent) in seq_mut(spec, "parentRefs").into_iter().flatten().enumerate() {
        if take(parent, "sectionName").is_some() {
            not_yet(
                format!("spec.parentRefs[{i}].sectionName"),
                "name the Service port with `port` (a weft Service has one port)",
            );
        }
        cross_namespace(parent, own_ns, &format!("spec.parentRefs[{i}]"), &mut not_yet);
    }
    for (r, rule) in seq_mut(spec, "rules").into_iter().flatten().enumerate() {
        let at = format!("spec.rules[{r}]");
        if take(rule, "sessionPersistence").is_some() {
            not_yet(format!("{at}.sessionPersistence"), "requests are balanced per request; remove it");
        }
        let mut f = 0;
        if let Some(filters) = seq_mut(rule, "filters") {
            filters.retain(|filter| {
                let ty = filter.get("type").and_then(Value::as_str).unwrap_or_default().to_string();
                let keep = match ty.as_str() {
                    "RequestHeaderModifier" | "ResponseHeaderModifier" => true,
                    "RequestMirror" | "RequestRedirect" | "URLRewrite" | "ExtensionRef" | "CORS" | "ExternalAuth" => {
                        not_yet(
                            format!("{at}.filters[{f}].type"),
                            &format!("the {kind} filter {ty:?}; the filters weft implements are {FILTERS}"),
                        );
                        false
                    }
                    _ => true, // unknown types are reported by the strict decode
                };
                f += 1;
                keep
            });
        }
        for (b, backend) in seq_mut(rule, "backendRefs").into_iter().flatten().enumerate() {
            let at = format!("{at}.backendRefs[{b}]");
            if take(backend, "filters").is_some() {
                not_yet(format!("{at}.filters"), "per-backend filters; put the filter on the rule instead");
            }
            cross_namespace(backend, own_ns, &at, &mut not_yet);
        }
    }
}

/// A reference's `namespace` must be the route's own: weft Services are named
/// without a namespace, so another namespace cannot be told apart yet.
fn cross_namespace(r: &mut Value, own_ns: &str, at: &str, not_yet: &mut impl FnMut(String, &str)) {
    match r.get("namespace").and_then(Value::as_str).map(str::to_string) {
        Some(ns) if ns != own_ns => {
            take(r, "namespace");
            not_yet(
                format!("{at}.namespace"),
                &format!("references across namespaces ({ns:?} from a route in {own_ns:?}); use the route's namespace"),
            );
        }
        _ => {}
    }
}

/// Removes `key` from a mapping, returning its value.
fn take(v: &mut Value, key: &str) -> Option<Value> {
    v.as_mapping_mut().and_then(|m| m.remove(key))
}

/// The sequence at `key` of a mapping, if there is one.
fn seq_mut<'a>(v: &'a mut Value, key: &str) -> Option<&'a mut Vec<Value>> {
    v.get_mut(key).and_then(Value::as_sequence_mut)
}
