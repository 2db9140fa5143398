//! Authorization (authz) evaluation: the AuthorizationPolicies of this
//! sidecar's service, judged with the caller's verified SPIFFE ID. Deny wins
//! over allow; when a service has ALLOW policies, or the mesh default is
//! deny, a request needs a matching ALLOW rule. Enforced on requests by
//! `inbound/authz.rs`, and on open TCP tunnels after every config change.

use http::Method;
use weft_certs::SpiffeId;

use weft_config::{
    glob_match, Action, AuthorizationPolicySpec, AuthzRule, DefaultPolicy, MeshConfig, Named, Operation, Source,
};

/// What a request looks like to policy; TCP has no method or path.
pub struct Request<'a> {
    pub method: Option<&'a Method>,
    pub path: Option<&'a str>,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<'a> {
    pub allowed: bool,
    /// The deciding policy, or `default` / `no-allow-match`. Borrowed: the
    /// check runs per request, and only a denial needs its own copy.
    pub policy: &'a str,
}

/// The policies that apply to one service.
#[derive(Debug, Default)]
pub struct Authorizer {
    default_deny: bool,
    port: u16,
    allow: Vec<Named<AuthorizationPolicySpec>>,
    deny: Vec<Named<AuthorizationPolicySpec>>,
}

fn source_matches(s: &Source, peer: &SpiffeId) -> bool {
    (s.identities.is_empty() || s.identities.iter().any(|p| glob_match(p, peer.as_str())))
        && (s.namespaces.is_empty() || peer.namespace().is_some_and(|ns| s.namespaces.iter().any(|n| n == ns)))
        && (s.trust_domains.is_empty() || s.trust_domains.iter().any(|td| td == peer.trust_domain().as_str()))
}

fn operation_matches(o: &Operation, req: &Request<'_>) -> bool {
    // An operation about paths or methods never matches opaque TCP.
    let paths = o.paths.is_empty() || req.path.is_some_and(|p| o.paths.iter().any(|g| glob_match(g, p)));
    let methods = o.methods.is_empty() || req.method.is_some_and(|m| o.methods.iter().any(|x| x == m.as_str()));
    let ports = o.ports.is_empty() || o.ports.contains(&req.port);
    paths && methods && ports
}

fn rule_matches(r: &AuthzRule, peer: &SpiffeId, req: &Request<'_>) -> bool {
    (r.from.is_empty() || r.from.iter().any(|s| source_matches(s, peer)))
        && (r.to.is_empty() || r.to.iter().any(|o| operation_matches(o, req)))
}

impl Authorizer {
    pub fn new(cfg: &MeshConfig, service: &str) -> Self {
        let mine = |a: Action| {
            cfg.policies.iter().filter(|p| p.spec.target_ref.name == service && p.spec.action == a).cloned().collect()
        };
        Self {
            default_deny: cfg.mesh.default_policy == DefaultPolicy::Deny,
            port: cfg.services.get(service).map(|s| s.port).unwrap_or(0),
            allow: mine(Action::Allow),
            deny: mine(Action::Deny),
        }
    }

    /// The port policies see: the service's declared port.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn check(&self, peer: &SpiffeId, req: &Request<'_>) -> Decision<'_> {
        if let Some(p) = self.deny.iter().find(|p| p.spec.rules.iter().any(|r| rule_matches(r, peer, req))) {
            return Decision { allowed: false, policy: &p.name };
        }
        if let Some(p) = self.allow.iter().find(|p| p.spec.rules.iter().any(|r| rule_matches(r, peer, req))) {
            return Decision { allowed: true, policy: &p.name };
        }
        if !self.allow.is_empty() {
            return Decision { allowed: false, policy: "no-allow-match" };
        }
        Decision { allowed: !self.default_deny, policy: "default" }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> MeshConfig {
        let base = "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: api}\nspec: {port: 8080}\n";
        weft_config::parse(&format!("{base}{extra}")).unwrap()
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    const POLICIES: &str = r#"---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-web}
spec:
  targetRef: {name: api}
  action: ALLOW
  rules:
    - from: [{identities: ["spiffe://td/ns/default/sa/web"]}]
      to: [{paths: ["/api/*"], methods: [GET]}]
    - from: [{namespaces: [ops]}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-admin}
spec:
  targetRef: {name: api}
  action: DENY
  rules:
    - to: [{paths: ["/api/admin*"]}]
"#;

    #[test]
    fn matrix() {
        let a = Authorizer::new(&cfg(POLICIES), "api");
        let (get, post) = (Method::GET, Method::POST);
        let cases = [
            ("spiffe://td/ns/default/sa/web", &get, "/api/items", true, "allow-web"),
            ("spiffe://td/ns/default/sa/web", &post, "/api/items", false, "no-allow-match"),
            ("spiffe://td/ns/default/sa/web", &get, "/other", false, "no-allow-match"),
            ("spiffe://td/ns/default/sa/web", &get, "/api/admin/x", false, "deny-admin"),
            ("spiffe://td/ns/default/sa/evil", &get, "/api/items", false, "no-allow-match"),
            ("spiffe://td/ns/ops/sa/anything", &post, "/whatever", true, "allow-web"),
            ("spiffe://td/ns/ops/sa/anything", &get, "/api/admin", false, "deny-admin"),
        ];
        for (peer, method, path, allowed, policy) in cases {
            let d = a.check(&id(peer), &Request { method: Some(method), path: Some(path), port: 8080 });
            assert_eq!(d, Decision { allowed, policy }, "{peer} {method} {path}");
        }
        // TCP: path/method rules do not match; the namespace rule does.
        assert!(
            !a.check(&id("spiffe://td/ns/default/sa/web"), &Request { method: None, path: None, port: 8080 }).allowed
        );
        assert!(a.check(&id("spiffe://td/ns/ops/sa/x"), &Request { method: None, path: None, port: 8080 }).allowed);
    }

    #[test]
    fn default_policy() {
        let req = Request { method: Some(&Method::GET), path: Some("/"), port: 8080 };
        let open = Authorizer::new(&cfg(""), "api");
        assert_eq!(open.check(&id("spiffe://td/x"), &req), Decision { allowed: true, policy: "default" });
        let closed =
            cfg("---\napiVersion: weft.dev/v1alpha1\nkind: Mesh\nmetadata: {name: m}\nspec: {defaultPolicy: deny}\n");
        let closed = Authorizer::new(&closed, "api");
        assert_eq!(closed.check(&id("spiffe://td/x"), &req), Decision { allowed: false, policy: "default" });
        // A deny-only policy with an open mesh leaves everything else allowed.
        let deny_only = POLICIES.split("---").nth(2).unwrap();
        let a = Authorizer::new(&cfg(&format!("---{deny_only}")), "api");
        assert!(a.check(&id("spiffe://td/x"), &req).allowed);
        assert!(
            !a.check(
                &id("spiffe://td/x"),
                &Request { method: Some(&Method::GET), path: Some("/api/admin"), port: 8080 }
            )
            .allowed
        );
    }

    #[test]
    fn ports_and_trust_domains() {
        let p = r#"---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: p}
spec:
  targetRef: {name: api}
  action: ALLOW
  rules:
    - from: [{trustDomains: [td]}]
      to: [{ports: [8080]}]
"#;
        let a = Authorizer::new(&cfg(p), "api");
        assert!(a.check(&id("spiffe://td/a"), &Request { method: None, path: None, port: a.port() }).allowed);
        assert!(!a.check(&id("spiffe://other/a"), &Request { method: None, path: None, port: a.port() }).allowed);
        assert!(!a.check(&id("spiffe://td/a"), &Request { method: None, path: None, port: 9090 }).allowed);
    }
}
