//! Service membership: which services a registered workload is an endpoint
//! of. A workload registers as the service its identity names
//! ([`crate::registration`]); a Service with `admit` also lists, as its own
//! endpoints, the workloads of the service accounts it names (narrowed by
//! labels). This is how Kubernetes Services work — several Services select
//! the pods of one service account (`foo-v1`, `foo-v2` over SA `foo`) — and
//! the control plane applies it when it builds each snapshot, so a workload
//! can never make itself an endpoint of a Service that did not admit it.

use std::collections::HashMap;

use weft_certs::SpiffeId;

use crate::{Admit, MeshConfig};

/// `(namespace, service account)` of a `spiffe://<td>/ns/<ns>/sa/<sa>` ID.
pub fn service_account(id: &SpiffeId) -> Option<(&str, &str)> {
    let mut segs = id.path().strip_prefix('/')?.split('/');
    match (segs.next(), segs.next(), segs.next(), segs.next(), segs.next()) {
        (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
        _ => None,
    }
}

/// Whether `admit` admits the workload `id` with registered `labels`: its
/// service account is listed (`name` in any namespace, or `namespace/name`)
/// and it carries every label `admit` asks for.
pub fn admits(admit: &Admit, id: &SpiffeId, labels: &HashMap<String, String>) -> bool {
    let Some((ns, sa)) = service_account(id) else {
        return false;
    };
    let account_listed = admit.service_accounts.iter().any(|entry| match entry.split_once('/') {
        Some((want_ns, want_sa)) => want_ns == ns && want_sa == sa,
        None => entry == sa,
    });
    account_listed && admit.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Every service the workload `id`, registered as `registered` with
/// `labels`, is an endpoint of: `registered` first, then each Service of
/// `cfg` that admits it (name order).
pub fn services_of<'a>(
    cfg: &'a MeshConfig,
    id: &SpiffeId,
    registered: &'a str,
    labels: &HashMap<String, String>,
) -> Vec<&'a str> {
    let mut out = vec![registered];
    for (name, svc) in &cfg.services {
        if name != registered && svc.admit.as_ref().is_some_and(|a| admits(a, id, labels)) {
            out.push(name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const CFG: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: foo}
spec: {}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: foo-v1}
spec:
  admit: {serviceAccounts: [foo], labels: {version: v1}}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: foo-v2}
spec:
  admit: {serviceAccounts: [prod/foo], labels: {version: v2}}
"#;

    #[test]
    fn service_accounts_of_ids() {
        assert_eq!(service_account(&id("spiffe://td/ns/prod/sa/foo")), Some(("prod", "foo")));
        assert_eq!(service_account(&id("spiffe://td/ns/prod/sa/foo/x")), None);
        assert_eq!(service_account(&id("spiffe://td/workload/foo")), None);
    }

    #[test]
    fn admitted_by_account_and_labels() {
        let cfg = crate::parse(CFG).unwrap();
        let foo = id("spiffe://td/ns/prod/sa/foo");
        assert_eq!(services_of(&cfg, &foo, "foo", &labels(&[("version", "v1")])), ["foo", "foo-v1"]);
        assert_eq!(services_of(&cfg, &foo, "foo", &labels(&[("version", "v2")])), ["foo", "foo-v2"]);
        assert_eq!(services_of(&cfg, &foo, "foo", &labels(&[])), ["foo"], "labels narrow the admission");
        let other_ns = id("spiffe://td/ns/dev/sa/foo");
        assert_eq!(services_of(&cfg, &other_ns, "foo", &labels(&[("version", "v2")])), ["foo"], "prod/foo only");
        assert_eq!(services_of(&cfg, &other_ns, "foo", &labels(&[("version", "v1")])), ["foo", "foo-v1"]);
        // The right labels without the service account admit nothing.
        let bar = id("spiffe://td/ns/prod/sa/bar");
        assert_eq!(services_of(&cfg, &bar, "bar", &labels(&[("version", "v1")])), ["bar"]);
    }
}
