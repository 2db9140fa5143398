//! The authorization (authz) layer: every inbound request, and every CONNECT
//! tunnel as it opens, is judged by the policies of this sidecar's service
//! (`state/authz.rs`) with the caller's verified SPIFFE ID. A denial is a
//! [`ProxyError::Denied`] (403; for TCP, the caller's sidecar closes the
//! app's connection on a non-200).

use std::sync::Arc;

use http::Method;

use super::app::MISSING_CONTEXT;
use super::gate::{Gate, GateLayer};
use crate::context::RequestContext;
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::state::authz::Request;

/// The gate that enforces authorization, reading the caller and the config
/// from the request's [`RequestContext`].
#[derive(Clone)]
pub struct Authz {
    metrics: Arc<Metrics>,
}

/// The tower layer of [`Authz`].
pub type AuthzLayer = GateLayer<Authz>;

impl Authz {
    pub fn layer(metrics: Arc<Metrics>) -> AuthzLayer {
        GateLayer(Self { metrics })
    }
}

impl Gate for Authz {
    fn check<B>(&self, req: &http::Request<B>) -> Result<(), ProxyError> {
        let ctx = req.extensions().get::<RequestContext>();
        let Some((ctx, peer)) = ctx.and_then(|c| Some((c, c.peer.as_ref()?))) else {
            return Err(ProxyError::Internal { what: MISSING_CONTEXT });
        };
        let tcp = req.method() == Method::CONNECT;
        let authz = &ctx.snapshot.authz;
        let decision = authz.check(
            peer,
            &Request {
                method: (!tcp).then(|| req.method()),
                path: (!tcp).then(|| req.uri().path()),
                port: authz.port(),
            },
        );
        let outcome = if decision.allowed { "allow" } else { "deny" };
        self.metrics.authz_decision(decision.policy, outcome, if tcp { "tcp" } else { "http" });
        if decision.allowed {
            return Ok(());
        }
        // No policy details leak to the caller; they are in logs and metrics.
        tracing::info!(peer = %peer, policy = %decision.policy, method = %req.method(), path = %req.uri().path(), "denied by policy");
        Err(ProxyError::Denied { tcp, policy: decision.policy.to_string(), peer: (**peer).clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::RespondLayer;
    use crate::http::{local_response, Body};
    use crate::state::authz::Authorizer;
    use crate::state::Snapshot;
    use http::StatusCode;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::{Service, ServiceBuilder, ServiceExt};
    use weft_certs::SpiffeId;

    fn stack(
        calls: Arc<AtomicUsize>,
    ) -> impl Service<http::Request<()>, Response = http::Response<Body>, Error = std::convert::Infallible> + Clone
    {
        let inner = tower::service_fn(move |_req: http::Request<()>| {
            calls.fetch_add(1, Ordering::Relaxed);
            async { Ok::<_, ProxyError>(local_response(StatusCode::OK, "app")) }
        });
        ServiceBuilder::new().layer(RespondLayer).layer(Authz::layer(Arc::new(Metrics::default()))).service(inner)
    }

    fn request(method: Method, path: &str, peer: &str, snapshot: &Arc<Snapshot>) -> http::Request<()> {
        let mut req = http::Request::builder().method(method).uri(path).body(()).unwrap();
        req.extensions_mut()
            .insert(RequestContext::inbound(Arc::new(SpiffeId::parse(peer).unwrap()), snapshot.clone()));
        req
    }

    #[tokio::test]
    async fn denies_before_the_app_and_allows_through() {
        let cfg = weft_config::parse(
            "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: api}\nspec: {}\n---\napiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: only-web}\nspec:\n  targetRef: {name: api}\n  action: ALLOW\n  rules: [{from: [{identities: ['spiffe://td/ns/a/sa/web']}]}]\n",
        )
        .unwrap();
        let snapshot = Arc::new(Snapshot { authz: Authorizer::new(&cfg, "api"), ..Default::default() });
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = stack(calls.clone());
        let ok = svc.clone().oneshot(request(Method::GET, "/", "spiffe://td/ns/a/sa/web", &snapshot)).await.unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
        let denied =
            svc.clone().oneshot(request(Method::GET, "/", "spiffe://td/ns/a/sa/evil", &snapshot)).await.unwrap();
        assert_eq!(denied.status(), StatusCode::FORBIDDEN);
        let tcp = svc
            .clone()
            .oneshot(request(Method::CONNECT, "api:0", "spiffe://td/ns/a/sa/evil", &snapshot))
            .await
            .unwrap();
        assert_eq!(tcp.status(), StatusCode::FORBIDDEN);
        assert_eq!(calls.load(Ordering::Relaxed), 1, "denied requests never reach the app");
        let mut no_ctx = http::Request::new(());
        *no_ctx.uri_mut() = "/".parse().unwrap();
        assert_eq!(svc.oneshot(no_ctx).await.unwrap().status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
