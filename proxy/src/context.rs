//! The per-request context: set once at the edge (the inbound connection,
//! the outbound routing step) as a request extension, and read by the layers
//! behind it. One type, so inner layers import nothing from outer ones.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

use weft_certs::SpiffeId;

use crate::state::routes::{Backend, Rule};
use crate::state::Snapshot;

/// What the layers of one request need to know.
#[derive(Clone)]
pub struct RequestContext {
    /// The caller's verified SPIFFE ID (inbound; None on the outbound side,
    /// where the caller is the local app).
    pub peer: Option<Arc<SpiffeId>>,
    /// The config the request started with: one version from start to end.
    pub snapshot: Arc<Snapshot>,
    /// Outbound: the route rule and backend routing chose.
    pub route: Option<Route>,
    /// Outbound: when the route's request timeout passes (set by the timeout layer).
    pub deadline: Option<Deadline>,
    /// Inbound: `peer` as the value of the app's `x-weft-peer-id`, made once
    /// per connection (cloning it shares the bytes; making it per request
    /// was an allocation). None: made from `peer` when needed.
    pub peer_header: Option<HeaderValue>,
}

impl RequestContext {
    /// The context of a request from `peer` (inbound).
    pub fn inbound(peer: Arc<SpiffeId>, snapshot: Arc<Snapshot>) -> Self {
        Self { peer: Some(peer), snapshot, route: None, deadline: None, peer_header: None }
    }

    /// [`RequestContext::inbound`] with `peer`'s header value made beforehand.
    pub fn inbound_with_header(peer: Arc<SpiffeId>, peer_header: Option<HeaderValue>, snapshot: Arc<Snapshot>) -> Self {
        Self { peer_header, ..Self::inbound(peer, snapshot) }
    }

    /// The context of a routed request (outbound).
    pub fn outbound(snapshot: Arc<Snapshot>, rule: Arc<Rule>, backend: Arc<Backend>) -> Self {
        Self { peer: None, snapshot, route: Some(Route { rule, backend }), deadline: None, peer_header: None }
    }
}

/// What routing decided for an outbound request.
#[derive(Clone)]
pub struct Route {
    pub rule: Arc<Rule>,
    /// Shared with the rule: a routed request holds its backend without copying it.
    pub backend: Arc<Backend>,
}

/// When the route's request timeout passes.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    pub at: tokio::time::Instant,
    /// The route's request timeout, for the message.
    pub timeout: Duration,
}

impl Deadline {
    pub fn passed(&self) -> bool {
        tokio::time::Instant::now() >= self.at
    }
}

/// Which endpoint answered (a response extension, for the outbound metrics).
#[derive(Clone, Debug)]
pub struct ServedBy(pub Arc<SpiffeId>);
