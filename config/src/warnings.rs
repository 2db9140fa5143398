//! Warnings: a valid config that will not do what it says in the mesh it runs
//! in. Unlike [`crate::ConfigErrors`] they never reject a config, because
//! they depend on facts outside the file that change at run time (which
//! workloads are up) or that may be deliberate (a policy naming a federated
//! trust domain). `weft validate` and `weft status` print them.

use std::collections::BTreeMap;

use crate::{ConfigError, MeshConfig};

/// One workload instance serving a service: its service name and labels
/// (as a sidecar registers them, or as a `Workload` document declares them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointFacts {
    pub service: String,
    pub labels: BTreeMap<String, String>,
    /// The endpoint's IP (a pod address), when known (live sidecars).
    pub address: Option<std::net::IpAddr>,
}

/// What is known about the mesh beyond the file. `None` means unknown, and
/// the warnings that need that fact are skipped rather than guessed.
#[derive(Debug, Clone, Default)]
pub struct MeshFacts {
    /// The mesh's trust domain (e.g. `example.org`), from the PKI or the control plane.
    pub trust_domain: Option<String>,
    /// Every endpoint the mesh has (live sidecars, or the file's Workloads).
    pub endpoints: Option<Vec<EndpointFacts>>,
}

impl MeshFacts {
    /// The endpoints the file's own `Workload` documents declare (those with
    /// at least one replica), or `None` when it declares none: a file without
    /// Workloads says nothing about which workloads will run.
    pub fn declared_workloads(cfg: &MeshConfig) -> Option<Vec<EndpointFacts>> {
        if cfg.workloads.is_empty() {
            return None;
        }
        Some(
            cfg.workloads
                .iter()
                .filter(|w| w.spec.replicas > 0)
                .map(|w| EndpointFacts {
                    service: w.spec.service.clone(),
                    labels: w.spec.labels.clone(),
                    address: None,
                })
                .collect(),
        )
    }
}

/// Every warning for `cfg` given `facts`, in document order: route backends
/// (with weight above 0) whose service or subset has no endpoint, and
/// AuthorizationPolicy identities or trust domains outside the mesh's trust
/// domain. Each names the document (`HTTPRoute "backend-canary"`), the field
/// path and what to change, like a [`ConfigError`].
///
/// Also Service virtual addresses that interception will not use as meant:
/// an IPv6 one (only IPv4 is intercepted), and one that is a live
/// endpoint's own IP (intercepted connections to that pod would go to the
/// Service instead of the pod's own service).
pub fn warnings(cfg: &MeshConfig, facts: &MeshFacts) -> Vec<ConfigError> {
    let mut out = Vec::new();
    for (name, svc) in &cfg.services {
        for (i, ip) in svc.addresses.iter().enumerate() {
            let at = |reason: String| ConfigError {
                document: format!("Service {name:?}"),
                field: format!("spec.addresses[{i}]"),
                reason,
            };
            if ip.is_ipv6() {
                out.push(at(format!(
                    "{ip} is an IPv6 address, but only IPv4 is intercepted: connections to it leave directly (no mTLS, no registryOnly)"
                )));
            }
            let pod = facts.endpoints.iter().flatten().find(|e| e.address == Some(*ip));
            if let Some(pod) = pod {
                out.push(at(format!(
                    "{ip} is the address of a live endpoint of service {:?}: intercepted connections to that pod on port {} go to Service {name:?} instead; list the Service's own virtual address (its ClusterIP), not a pod's",
                    pod.service, svc.port
                )));
            }
        }
    }
    if let Some(endpoints) = &facts.endpoints {
        for r in &cfg.routes {
            let doc = format!("HTTPRoute {:?}", r.name);
            for (ri, rule) in r.spec.rules.iter().enumerate() {
                for (bi, b) in rule.backend_refs.iter().enumerate() {
                    if b.weight == 0 {
                        continue;
                    }
                    let Some(reason) = no_endpoints(cfg, endpoints, &b.name, b.subset.as_deref()) else { continue };
                    out.push(ConfigError {
                        document: doc.clone(),
                        field: format!("spec.rules[{ri}].backendRefs[{bi}]"),
                        reason,
                    });
                }
            }
        }
    }
    if let Some(td) = &facts.trust_domain {
        for p in &cfg.policies {
            let doc = format!("AuthorizationPolicy {:?}", p.name);
            for (ri, rule) in p.spec.rules.iter().enumerate() {
                for (si, s) in rule.from.iter().enumerate() {
                    let at = format!("spec.rules[{ri}].from[{si}]");
                    for (ii, id) in s.identities.iter().enumerate() {
                        if let Some(other) = identity_trust_domain(id).filter(|other| other != td) {
                            out.push(ConfigError {
                                document: doc.clone(),
                                field: format!("{at}.identities[{ii}]"),
                                reason: foreign(id, other, td),
                            });
                        }
                    }
                    for (ti, other) in s.trust_domains.iter().enumerate() {
                        if other != td {
                            out.push(ConfigError {
                                document: doc.clone(),
                                field: format!("{at}.trustDomains[{ti}]"),
                                reason: foreign(other, other, td),
                            });
                        }
                    }
                }
            }
        }
    }
    out
}

/// Why `service` (`subset`) has no endpoint among `endpoints`, or `None` if it has one.
fn no_endpoints(cfg: &MeshConfig, endpoints: &[EndpointFacts], service: &str, subset: Option<&str>) -> Option<String> {
    let of_service: Vec<_> = endpoints.iter().filter(|e| e.service == service).collect();
    let Some(subset) = subset else {
        return of_service
            .is_empty()
            .then(|| format!("service {service:?} has no endpoints: requests routed here fail with 503"));
    };
    let labels = cfg.services.get(service)?.subsets.iter().find(|s| s.name == subset)?.labels.clone();
    let serving = of_service.iter().any(|e| labels.iter().all(|(k, v)| e.labels.get(k) == Some(v)));
    (!serving).then(|| {
        let want = labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
        format!(
            "service {service:?} subset {subset:?} has no endpoints (no workload of {service:?} has labels {want}): \
             requests routed here fail with 503; start one, or set this backend's weight to 0"
        )
    })
}

/// The trust domain of a SPIFFE ID or `spiffe://…` glob (`None` for `*` or a
/// glob over trust domains, which name no single one).
fn identity_trust_domain(id: &str) -> Option<&str> {
    let rest = id.strip_prefix("spiffe://")?;
    let td = rest.split('/').next()?;
    (!td.is_empty() && !td.contains('*')).then_some(td)
}

fn foreign(what: &str, other: &str, td: &str) -> String {
    format!(
        "{what:?} is in trust domain {other:?}, but this mesh's trust domain is {td:?}: no workload of this mesh \
         can match it (a typo? write spiffe://{td}/…; ignore this if {other:?} is a federated trust domain)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_virtual_address_that_is_a_pod_or_ipv6_is_warned_about() {
        let cfg = crate::parse(
            "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: db}\nspec: {port: 5432, addresses: [10.77.0.3, \"fd00::1\", 10.96.0.10]}\n",
        )
        .unwrap();
        let pod = EndpointFacts {
            service: "backend".into(),
            labels: BTreeMap::new(),
            address: Some("10.77.0.3".parse().unwrap()),
        };
        let facts = MeshFacts { trust_domain: None, endpoints: Some(vec![pod]) };
        let w: Vec<String> = warnings(&cfg, &facts).iter().map(ToString::to_string).collect();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("spec.addresses[0]") && w[0].contains("live endpoint of service \"backend\""), "{w:?}");
        assert!(w[1].contains("spec.addresses[1]") && w[1].contains("only IPv4 is intercepted"), "{w:?}");
        // Without live facts, only the IPv6 one.
        assert_eq!(warnings(&cfg, &MeshFacts::default()).len(), 1);
    }

    const MESH: &str = r#"
kind: Service
metadata: {name: backend}
spec:
  port: 8080
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
---
kind: HTTPRoute
metadata: {name: split}
spec:
  parentRefs: [{name: backend}]
  rules:
    - backendRefs:
        - {name: backend, subset: v1, weight: 90}
        - {name: backend, subset: v2, weight: 10}
---
kind: AuthorizationPolicy
metadata: {name: callers}
spec:
  targetRef: {name: backend}
  action: ALLOW
  rules:
    - from:
        - identities: ["spiffe://example.com/ns/default/sa/frontend", "spiffe://example.org/ns/default/sa/batch"]
          trustDomains: [example.net]
"#;

    fn cfg() -> MeshConfig {
        crate::parse(&MESH.replace("kind:", "apiVersion: weft.dev/v1alpha1\nkind:")).expect("valid")
    }

    fn ep(service: &str, version: &str) -> EndpointFacts {
        EndpointFacts {
            service: service.into(),
            labels: [("version".to_string(), version.to_string())].into(),
            address: None,
        }
    }

    #[test]
    fn a_subset_without_endpoints_is_named_with_its_field() {
        let facts = MeshFacts { trust_domain: None, endpoints: Some(vec![ep("backend", "v1")]) };
        let w = warnings(&cfg(), &facts);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].document, "HTTPRoute \"split\"");
        assert_eq!(w[0].field, "spec.rules[0].backendRefs[1]");
        assert!(w[0].reason.contains("subset \"v2\" has no endpoints"), "{}", w[0]);
        let both = MeshFacts { trust_domain: None, endpoints: Some(vec![ep("backend", "v1"), ep("backend", "v2")]) };
        assert!(warnings(&cfg(), &both).is_empty());
        let none = MeshFacts { trust_domain: None, endpoints: Some(vec![]) };
        assert_eq!(warnings(&cfg(), &none).len(), 2, "both subsets are empty");
    }

    #[test]
    fn unknown_facts_give_no_warnings() {
        assert!(warnings(&cfg(), &MeshFacts::default()).is_empty());
    }

    #[test]
    fn identities_and_trust_domains_outside_the_mesh_are_named() {
        let facts = MeshFacts { trust_domain: Some("example.org".into()), endpoints: None };
        let w: Vec<String> = warnings(&cfg(), &facts).iter().map(|w| w.to_string()).collect();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with(
                "AuthorizationPolicy \"callers\": spec.rules[0].from[0].identities[0]: \
             \"spiffe://example.com/ns/default/sa/frontend\" is in trust domain \"example.com\", but this mesh's \
             trust domain is \"example.org\""
            ),
            "{}",
            w[0]
        );
        assert!(w[1].starts_with("AuthorizationPolicy \"callers\": spec.rules[0].from[0].trustDomains[0]"), "{}", w[1]);
    }

    #[test]
    fn globs_name_a_trust_domain_only_before_the_first_slash() {
        assert_eq!(identity_trust_domain("spiffe://example.org/ns/*"), Some("example.org"));
        assert_eq!(identity_trust_domain("spiffe://*/ns/a"), None);
        assert_eq!(identity_trust_domain("*"), None);
    }

    #[test]
    fn declared_workloads_are_facts_only_when_there_are_some() {
        assert!(MeshFacts::declared_workloads(&cfg()).is_none());
    }
}
