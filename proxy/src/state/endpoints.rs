//! The endpoints of a service as discovery lists them, each with the
//! identity its sidecar must prove and what the sidecar keeps for it while
//! it is listed: balancer statistics and pooled connections.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use weft_certs::SpiffeId;
use weft_runtime::workers::PerWorker;

use super::endpoint_stats::EndpointStats;
use crate::metrics::Live;
use crate::outbound::pool::PeerSender;

/// An endpoint of a service, with the identity its sidecar must prove.
#[derive(Debug, Clone, Serialize)]
pub struct Endpoint {
    pub address: SocketAddr,
    /// Shared: a request's answer names its endpoint (`ServedBy`, the
    /// `peer` label) without copying the ID.
    #[serde(serialize_with = "ser_id")]
    pub spiffe_id: Arc<SpiffeId>,
    pub labels: BTreeMap<String, String>,
    /// What the sidecar keeps for this endpoint while discovery lists it.
    #[serde(skip)]
    pub state: Arc<EndpointState>,
}

fn ser_id<S: serde::Serializer>(id: &Arc<SpiffeId>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(id.as_str())
}

/// Per-endpoint state that outlives config swaps: the balancer's statistics
/// and the pooled mTLS connections. Keyed by address and SPIFFE ID (a new
/// identity at the same address starts afresh); dropped, connections and
/// all, once discovery no longer lists the endpoint and no request holds it.
#[derive(Debug)]
pub struct EndpointState {
    pub stats: EndpointStats,
    /// The pooled connections of each worker thread (`weft_runtime::workers`:
    /// one, more while every one's streams are in use), driven by that
    /// worker. The lock makes a worker's concurrent callers wait for a
    /// single connection attempt; one per worker, so a worker opening its
    /// connection (a slow TLS handshake) never stalls another worker's
    /// requests on the connection it already has.
    pub conn: PerWorker<tokio::sync::Mutex<Vec<Pooled>>>,
    /// Counts this endpoint in `weft_proxy_balancer_endpoints`.
    _live: Live,
}

impl EndpointState {
    /// Fresh state as of `now` (endpoints first seen together start
    /// equal), counted in `gauge` for as long as it lives.
    pub fn new(gauge: &Gauge, now: Instant) -> Self {
        Self { stats: EndpointStats::new(now), conn: PerWorker::new(|_| Default::default()), _live: Live::new(gauge) }
    }
}

/// A pooled HTTP/2 connection to an endpoint's sidecar, counted in
/// `weft_proxy_pool_connections` while the pool holds it.
#[derive(Debug)]
pub struct Pooled {
    pub sender: PeerSender,
    /// Streams (requests, tunnels) open on it now.
    pub streams: Arc<StreamCount>,
    _live: Live,
}

impl Pooled {
    pub fn new(sender: PeerSender, streams: Arc<StreamCount>, gauge: &Gauge) -> Self {
        Self { sender, streams, _live: Live::new(gauge) }
    }
}

/// The streams open on one pooled connection, how many the peer allows, and
/// since when it has had none.
#[derive(Debug)]
pub struct StreamCount {
    open: std::sync::atomic::AtomicUsize,
    /// The peer's SETTINGS_MAX_CONCURRENT_STREAMS as last seen.
    max: std::sync::atomic::AtomicUsize,
    idle_since: std::sync::Mutex<Instant>,
}

impl Default for StreamCount {
    fn default() -> Self {
        Self {
            open: Default::default(),
            // hyper's assumption until the peer's SETTINGS arrive.
            max: std::sync::atomic::AtomicUsize::new(100),
            idle_since: std::sync::Mutex::new(Instant::now()),
        }
    }
}

impl StreamCount {
    /// Records the peer's current SETTINGS_MAX_CONCURRENT_STREAMS.
    pub fn set_max(&self, n: usize) {
        self.max.store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether one more stream fits under the peer's limit and `cap`.
    pub fn has_room(&self, cap: usize) -> bool {
        self.open() < self.max.load(std::sync::atomic::Ordering::Relaxed).min(cap)
    }

    /// Streams open now.
    pub fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How long the connection has had no stream open (zero while it has one).
    pub fn idle_for(&self) -> std::time::Duration {
        if self.open() > 0 {
            return std::time::Duration::ZERO;
        }
        self.idle_since.lock().unwrap_or_else(|e| e.into_inner()).elapsed()
    }

    /// Counts one stream open until the guard drops.
    pub fn open_one(self: &Arc<Self>) -> StreamGuard {
        self.open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        StreamGuard { count: self.clone() }
    }
}

/// One stream open on a pooled connection (see [`StreamCount::open_one`]).
#[derive(Debug)]
pub struct StreamGuard {
    count: Arc<StreamCount>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.count.open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            *self.count.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
    }
}
