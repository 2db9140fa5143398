//! The sidecar's Prometheus metrics (docs/metrics.md lists them).

use std::hash::Hash;
use std::sync::{Arc, RwLock};

use hashbrown::{Equivalent, HashMap};

use http::Response;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use weft_runtime::serve::ListenerStats;

use weft_certs::SpiffeId;

use crate::grpc;
use crate::http::Body;
use crate::state::routes::{Backend, Rule};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: &'static str,
    pub service: String,
    /// `HTTPRoute/rule` that carried the request (outbound), or empty.
    pub route: String,
    /// The service subset chosen (outbound canary backend), or empty.
    pub backend: String,
    pub peer: String,
    pub code: u16,
    /// The gRPC call's `grpc-status` (`0`, `14`, …; `none` when a gRPC
    /// response ended without one); empty for non-gRPC responses.
    pub grpc_status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub direction: &'static str,
    /// `non_canonical`, `missing_host`, `unknown_service` ([`crate::error::ProxyError::refusal`]).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    pub policy: String,
    pub outcome: &'static str,
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: String,
}

/// A probe of an ejected endpoint (`outbound/probe.rs`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub service: String,
    /// The endpoint's address (`ip:port`); only ejected endpoints are probed.
    pub endpoint: String,
    /// `healthy` (back in the balancer, in slow start) or `unhealthy` (ejected again, for longer).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub route: String,
    pub outcome: &'static str,
}

/// What a finished request is labelled with, besides its direction,
/// service and status: shared handles, read as labels only when counted
/// (a series seen before then costs no copy of them).
#[derive(Debug, Default, Clone)]
pub struct RequestMeta {
    /// The HTTPRoute rule that carried the request (outbound): the `route`
    /// label is its name; empty without one.
    pub route: Option<Arc<Rule>>,
    /// The backend routing chose (outbound): the `backend` label is its
    /// subset; empty without one.
    pub backend: Option<Arc<Backend>>,
    /// The peer sidecar's SPIFFE ID: the caller (inbound), or the endpoint
    /// that answered or failed (outbound); the `peer` label, empty without one.
    pub peer: Option<Arc<SpiffeId>>,
}

impl RequestMeta {
    fn route(&self) -> &str {
        self.route.as_ref().map_or("", |r| r.name.as_str())
    }

    fn backend(&self) -> &str {
        self.backend.as_ref().map_or("", |b| b.subset.as_str())
    }

    fn peer(&self) -> &str {
        self.peer.as_ref().map_or("", |p| p.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub direction: &'static str,
    pub service: String,
    pub route: String,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub direction: &'static str,
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: &'static str,
    pub outcome: &'static str,
    pub tls_version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~16 s: sidecar hops are sub-millisecond, app calls much longer.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 16))
}

pub struct Metrics {
    pub authz: Family<AuthzLabels, Counter>,
    /// Requests refused at the edge before routing (not in `requests`:
    /// their host is not a service, and would be an unbounded label).
    pub refused: Family<RefusedLabels, Counter>,
    pub rate_limited: Family<LimitLabels, Counter>,
    pub retries: Family<RetryLabels, Counter>,
    pub ejections: Counter,
    /// Probes of ejected endpoints before they get traffic again, by result.
    pub probes: Family<ProbeLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    pub connections: Family<ConnLabels, Counter>,
    pub open_connections: Family<ConnLabels, Gauge>,
    pub handshakes: Family<HandshakeLabels, Counter>,
    pub tcp_bytes: Family<ConnLabels, Counter>,
    pub config_updates: Family<OutcomeLabels, Counter>,
    pub svid_renewals: Family<OutcomeLabels, Counter>,
    pub svid_expiry: Gauge,
    /// Releases of the clean pages of the sidecar's code and read-only data
    /// (`weft-mapped-pages`), by outcome.
    pub page_releases: Family<OutcomeLabels, Counter>,
    /// Endpoints the balancer keeps statistics for (live per-endpoint state).
    pub balancer_endpoints: Gauge,
    /// Pooled mTLS connections to peer sidecars held by the pool.
    pub pool_connections: Gauge,
    /// Connections a listener closed itself: header-read or idle timeout.
    pub listener_timeouts: Family<TimeoutLabels, Counter>,
    /// Every listener's accept-loop counters, read at scrape time.
    pub listeners: std::sync::Arc<ListenerCollector>,
    /// Requests or responses refused for headers over `--max-header-bytes`.
    pub headers_too_large: Family<HeaderLimitLabels, Counter>,
    /// Intercepted outbound connections to services of the mesh, by detected protocol.
    pub intercepted: Family<InterceptedLabels, Counter>,
    /// Intercepted outbound connections to destinations outside the mesh.
    pub unknown_destinations: Family<UnknownDestinationLabels, Counter>,
    /// The series of `latency`, `requests` and `authz` counted per request,
    /// found without SipHash ([`SeriesCache`]).
    latency_series: SeriesCache<LatencyLabels, Histogram>,
    request_series: SeriesCache<RequestLabels, Counter>,
    authz_series: SeriesCache<AuthzLabels, Counter>,
}

/// An intercepted outbound connection to a service of the mesh.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InterceptedLabels {
    pub service: String,
    /// What detection found, or the Service declared: `http1`, `http2`,
    /// `tls`, `opaque` (also for a client silent past `--detect-timeout`).
    pub protocol: &'static str,
}

/// An intercepted outbound connection to a destination the mesh does not know.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UnknownDestinationLabels {
    /// `passthrough` (Mesh `outboundTrafficPolicy: allowAny`), `refused`
    /// (`registryOnly`), `refused_no_config` (no config within 5 s of the
    /// connection), `refused_former_mesh_address` (the address left the mesh
    /// less than 5 minutes ago) or `refused_loop` (the sidecar's own
    /// connection, redirected back into it).
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HeaderLimitLabels {
    /// `outbound` (caller's sidecar) or `inbound` (callee's sidecar).
    pub direction: &'static str,
    /// `request` or `response`.
    pub message: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            authz: Family::default(),
            refused: Family::default(),
            rate_limited: Family::default(),
            retries: Family::default(),
            ejections: Counter::default(),
            probes: Family::default(),
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            connections: Family::default(),
            open_connections: Family::default(),
            handshakes: Family::default(),
            tcp_bytes: Family::default(),
            config_updates: Family::default(),
            svid_renewals: Family::default(),
            svid_expiry: Gauge::default(),
            page_releases: Family::default(),
            balancer_endpoints: Gauge::default(),
            pool_connections: Gauge::default(),
            listener_timeouts: Family::default(),
            listeners: Default::default(),
            headers_too_large: Family::default(),
            intercepted: Family::default(),
            unknown_destinations: Family::default(),
            latency_series: SeriesCache::default(),
            request_series: SeriesCache::default(),
            authz_series: SeriesCache::default(),
        }
    }
}

impl Metrics {
    pub fn register(&self, reg: &mut Registry) {
        let reg = reg.sub_registry_with_prefix("weft_proxy");
        reg.register(
            "requests",
            "HTTP requests by direction, service, peer SPIFFE ID, status code and gRPC status (counted when the response ends)",
            self.requests.clone(),
        );
        reg.register(
            "requests_refused",
            "Requests refused with 400/404 before routing, by direction and reason (non_canonical, missing_host, unknown_service)",
            self.refused.clone(),
        );
        reg.register_with_unit(
            "request_duration",
            "HTTP request latency (to response headers) by direction and service",
            prometheus_client::registry::Unit::Seconds,
            self.latency.clone(),
        );
        reg.register("connections", "Connections accepted (inbound) or opened (outbound)", self.connections.clone());
        reg.register("open_connections", "Connections currently open", self.open_connections.clone());
        reg.register("tls_handshakes", "mTLS handshakes by direction and outcome", self.handshakes.clone());
        reg.register_with_unit(
            "tcp",
            "Bytes carried for opaque TCP (protocol=\"tcp\") and upgraded HTTP connections (protocol=\"upgrade\"), by direction",
            prometheus_client::registry::Unit::Bytes,
            self.tcp_bytes.clone(),
        );
        reg.register(
            "config_updates",
            "Config snapshots from the control plane by outcome",
            self.config_updates.clone(),
        );
        reg.register("svid_renewals", "SVID renewals by outcome", self.svid_renewals.clone());
        reg.register(
            "svid_expiry_timestamp_seconds",
            "Expiry of the current SVID (Unix seconds)",
            self.svid_expiry.clone(),
        );
        reg.register(
            "page_releases",
            "Times the sidecar released the clean pages of its code and read-only data (at readiness, then every --release-pages-every), by outcome (ok/error)",
            self.page_releases.clone(),
        );
        reg.register(
            "authz_decisions",
            "Inbound authorization decisions by deciding policy, outcome (allow/deny) and protocol",
            self.authz.clone(),
        );
        reg.register("rate_limited", "Inbound requests refused (429) by rate limit", self.rate_limited.clone());
        reg.register("retries", "Outbound retries by route and outcome (sent, budget_exhausted)", self.retries.clone());
        reg.register(
            "balancer_endpoints",
            "Endpoints the balancer keeps statistics for (those discovery lists, plus any a request in flight still holds)",
            self.balancer_endpoints.clone(),
        );
        reg.register(
            "pool_connections",
            "Pooled mTLS connections to peer sidecars (more than one per endpoint only while one connection's streams are all in use; dropped when idle or when the endpoint leaves)",
            self.pool_connections.clone(),
        );
        reg.register(
            "listener_timeouts",
            "Connections a listener closed for a request's headers not arriving in time (header_read) or no request for the idle timeout (idle)",
            self.listener_timeouts.clone(),
        );
        reg.register(
            "headers_too_large",
            "Requests (answered 431) and responses (answered 502) whose headers exceed --max-header-bytes, by direction and message",
            self.headers_too_large.clone(),
        );
        reg.register(
            "intercepted_connections",
            "Intercepted outbound connections (iptables REDIRECT) to services of the mesh, by service and protocol (http1, http2, tls, opaque)",
            self.intercepted.clone(),
        );
        reg.register(
            "unknown_destinations",
            "Intercepted outbound connections not carried to a service of the mesh, by action (passthrough, refused, refused_no_config, refused_former_mesh_address, refused_loop)",
            self.unknown_destinations.clone(),
        );
        reg.register_collector(Box::new(self.listeners.clone()));
        reg.register(
            "endpoint_ejections",
            "Endpoints ejected by outlier detection (consecutive failures)",
            self.ejections.clone(),
        );
        reg.register(
            "endpoint_probes",
            "Probes of ejected endpoints before they get traffic again, by service, endpoint and result (healthy, unhealthy)",
            self.probes.clone(),
        );
    }

    pub fn handshake(&self, direction: &'static str, outcome: &'static str) {
        let tls_version = if outcome == "ok" { "TLSv1.3" } else { "" };
        self.handshakes.get_or_create(&HandshakeLabels { direction, outcome, tls_version }).inc();
    }

    /// Counts a request refused at the edge (see [`RefusedLabels`]).
    pub fn refused(&self, direction: &'static str, reason: &'static str) {
        self.refused.get_or_create(&RefusedLabels { direction, reason }).inc();
    }

    /// Records a response: its latency now (to response headers), and its
    /// count with its `grpc_status` — now, or for a gRPC response whose
    /// status comes in trailers, when its body ends (the response's body is
    /// then watched, [`grpc::ObservedBody`]).
    ///
    /// The series are found in [`SeriesCache`]s by the borrowed labels, so a
    /// label set seen before costs no allocation and no SipHash.
    pub fn response(
        self: &Arc<Self>,
        direction: &'static str,
        service: &str,
        meta: RequestMeta,
        resp: Response<Body>,
        secs: f64,
    ) -> Response<Body> {
        let latency = LatencyKey { direction, service, route: meta.route(), backend: meta.backend() };
        self.latency_series.with(&latency, || resolve(&self.latency, latency.to_owned()), |h| h.observe(secs));
        let code = resp.status().as_u16();
        let status_text;
        let grpc_status = if !grpc::is_grpc(resp.headers()) {
            ""
        } else if let Some(status) = grpc::status(resp.headers()) {
            status_text = status.to_string();
            &status_text
        } else {
            let mut labels = RequestLabels {
                direction,
                service: service.to_string(),
                route: meta.route().to_string(),
                backend: meta.backend().to_string(),
                peer: meta.peer().to_string(),
                code,
                grpc_status: String::new(),
            };
            let this = self.clone();
            return resp.map(|body| {
                http_body_util::BodyExt::boxed(grpc::ObservedBody::new(body, move |outcome| {
                    labels.grpc_status = outcome.label();
                    this.count(&RequestKey::of(&labels));
                }))
            });
        };
        self.count(&RequestKey {
            direction,
            service,
            route: meta.route(),
            backend: meta.backend(),
            peer: meta.peer(),
            code,
            grpc_status,
        });
        resp
    }

    /// Counts one request in `weft_proxy_requests_total`.
    fn count(&self, key: &RequestKey<'_>) {
        self.request_series.with(
            key,
            || resolve(&self.requests, key.to_owned()),
            |c| {
                c.inc();
            },
        );
    }

    /// Counts an inbound authorization decision (`weft_proxy_authz_decisions_total`).
    pub fn authz_decision(&self, policy: &str, outcome: &'static str, protocol: &'static str) {
        let key = AuthzKey { policy, outcome, protocol };
        self.authz_series.with(
            &key,
            || resolve(&self.authz, key.to_owned()),
            |c| {
                c.inc();
            },
        );
    }
}

/// The family's series for `labels` (created at zero if new), with the labels.
fn resolve<K, M, C>(family: &Family<K, M, C>, labels: K) -> (K, M)
where
    K: Clone + Hash + Eq,
    M: Clone,
    C: prometheus_client::metrics::family::MetricConstructor<M>,
{
    let m = family.get_or_create_owned(&labels);
    (labels, m)
}

/// The series of one metric family already used, by label set: a
/// [`Family::get_or_create`] hashes its owned label set with SipHash under
/// the family's lock, where this finds the series by the borrowed labels
/// (`Q`, a [`hashbrown::Equivalent`] of the owned `K`) with foldhash, and
/// allocates nothing for a label set seen before. It holds clones of the
/// family's handles (an `Arc` each), so what it counts is what the family
/// exports; a series is added to it, as to the family, the first time it
/// is counted, and never removed (the family keeps every series too). A
/// config change needs no invalidation: the key is the label values, so a
/// renamed route is a new key, counted under its new labels.
pub struct SeriesCache<K, M> {
    series: RwLock<HashMap<K, M>>,
}

impl<K, M> Default for SeriesCache<K, M> {
    fn default() -> Self {
        Self { series: RwLock::new(HashMap::default()) }
    }
}

impl<K: Hash + Eq, M> SeriesCache<K, M> {
    /// Runs `f` on the series of `key`, made by `create` (its owned labels
    /// and the family's handle for them) the first time `key` is seen.
    pub fn with<Q>(&self, key: &Q, create: impl FnOnce() -> (K, M), f: impl FnOnce(&M))
    where
        Q: Hash + Equivalent<K> + ?Sized,
    {
        if let Some(m) = self.series.read().unwrap_or_else(|e| e.into_inner()).get(key) {
            return f(m);
        }
        let mut series = self.series.write().unwrap_or_else(|e| e.into_inner());
        let m = match series.get(key) {
            Some(m) => m,
            None => {
                let (k, m) = create();
                series.entry(k).or_insert(m)
            }
        };
        f(m)
    }

    /// How many series it holds.
    pub fn len(&self) -> usize {
        self.series.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// [`LatencyLabels`], borrowed. Its fields and their order are those of
/// the owned labels, so the derived `Hash`es agree (`str` and `String`
/// hash alike), as [`Equivalent`] requires.
#[derive(Hash)]
pub struct LatencyKey<'a> {
    pub direction: &'static str,
    pub service: &'a str,
    pub route: &'a str,
    pub backend: &'a str,
}

impl LatencyKey<'_> {
    fn to_owned(&self) -> LatencyLabels {
        LatencyLabels {
            direction: self.direction,
            service: self.service.to_string(),
            route: self.route.to_string(),
            backend: self.backend.to_string(),
        }
    }
}

impl Equivalent<LatencyLabels> for LatencyKey<'_> {
    fn equivalent(&self, k: &LatencyLabels) -> bool {
        self.direction == k.direction && self.service == k.service && self.route == k.route && self.backend == k.backend
    }
}

/// [`RequestLabels`], borrowed (fields in the same order, see [`LatencyKey`]).
#[derive(Hash)]
pub struct RequestKey<'a> {
    pub direction: &'static str,
    pub service: &'a str,
    pub route: &'a str,
    pub backend: &'a str,
    pub peer: &'a str,
    pub code: u16,
    pub grpc_status: &'a str,
}

impl<'a> RequestKey<'a> {
    fn of(l: &'a RequestLabels) -> Self {
        Self {
            direction: l.direction,
            service: &l.service,
            route: &l.route,
            backend: &l.backend,
            peer: &l.peer,
            code: l.code,
            grpc_status: &l.grpc_status,
        }
    }

    fn to_owned(&self) -> RequestLabels {
        RequestLabels {
            direction: self.direction,
            service: self.service.to_string(),
            route: self.route.to_string(),
            backend: self.backend.to_string(),
            peer: self.peer.to_string(),
            code: self.code,
            grpc_status: self.grpc_status.to_string(),
        }
    }
}

impl Equivalent<RequestLabels> for RequestKey<'_> {
    fn equivalent(&self, k: &RequestLabels) -> bool {
        self.code == k.code
            && self.direction == k.direction
            && self.service == k.service
            && self.route == k.route
            && self.backend == k.backend
            && self.peer == k.peer
            && self.grpc_status == k.grpc_status
    }
}

/// [`AuthzLabels`], borrowed (fields in the same order, see [`LatencyKey`]).
#[derive(Hash)]
pub struct AuthzKey<'a> {
    pub policy: &'a str,
    pub outcome: &'static str,
    pub protocol: &'static str,
}

impl AuthzKey<'_> {
    fn to_owned(&self) -> AuthzLabels {
        AuthzLabels { policy: self.policy.to_string(), outcome: self.outcome, protocol: self.protocol }
    }
}

impl Equivalent<AuthzLabels> for AuthzKey<'_> {
    fn equivalent(&self, k: &AuthzLabels) -> bool {
        self.outcome == k.outcome && self.protocol == k.protocol && self.policy == k.policy
    }
}

/// Counts a connection as open for as long as it lives.
pub struct OpenConn {
    gauge: Gauge,
}

impl OpenConn {
    pub fn new(m: &Metrics, direction: &'static str, protocol: &'static str) -> Self {
        let labels = ConnLabels { direction, protocol };
        m.connections.get_or_create(&labels).inc();
        let gauge = m.open_connections.get_or_create(&labels).clone();
        gauge.inc();
        Self { gauge }
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Counts one live thing in a gauge for as long as it lives.
#[derive(Debug)]
pub struct Live {
    gauge: Gauge,
}

impl Live {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self { gauge: gauge.clone() }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Connections closed by a listener's watchdog (`listener.rs`), by reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TimeoutLabels {
    pub listener: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

/// Exports every listener's [`ListenerStats`] at scrape time.
#[derive(Debug, Default)]
pub struct ListenerCollector {
    listeners: std::sync::Mutex<Vec<(String, Arc<ListenerStats>)>>,
}

impl ListenerCollector {
    /// Exports `stats` with the label `listener="<name>"`.
    pub fn add(&self, name: String, stats: Arc<ListenerStats>) {
        self.listeners.lock().unwrap_or_else(|e| e.into_inner()).push((name, stats));
    }
}

impl prometheus_client::collector::Collector for ListenerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner()).clone();
        type Value = fn(&ListenerStats) -> u64;
        let counters: [(&str, &str, Value); 3] = [
            ("listener_accepted", "Connections accepted, by listener", ListenerStats::accepted),
            (
                "listener_at_capacity",
                "Times a listener stopped accepting because --max-connections were open (new connections wait in the backlog)",
                ListenerStats::at_capacity,
            ),
            ("listener_accept_errors", "Failed accepts (e.g. out of file descriptors), by listener", ListenerStats::accept_errors),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(0u64);
            let mut family = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            for (listener, stats) in &listeners {
                let labels = ListenerLabels { listener: listener.clone() };
                ConstCounter::new(value(stats)).encode(family.encode_family(&labels)?)?;
            }
        }
        let gauge = ConstGauge::new(0i64);
        let mut family = encoder.encode_descriptor(
            "listener_open_connections",
            "Connections open now, by listener",
            None,
            gauge.metric_type(),
        )?;
        for (listener, stats) in &listeners {
            let labels = ListenerLabels { listener: listener.clone() };
            ConstGauge::new(i64::try_from(stats.open()).unwrap_or(i64::MAX)).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::*;
    use crate::http::empty;

    fn scrape(m: &Metrics) -> String {
        let mut reg = Registry::default();
        m.register(&mut reg);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        text
    }

    fn sample<'a>(text: &'a str, name: &str, labels: &str) -> Option<&'a str> {
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(labels)?.strip_prefix(' '))
    }

    fn meta(route: &str) -> RequestMeta {
        let mut rule = Rule::default_for("api");
        rule.name = route.into();
        let backend = Backend { service: "api".into(), subset: "v2".into(), labels: Default::default(), weight: 1 };
        let peer = SpiffeId::parse("spiffe://example.org/ns/default/sa/api").unwrap();
        RequestMeta { route: Some(Arc::new(rule)), backend: Some(Arc::new(backend)), peer: Some(Arc::new(peer)) }
    }

    /// hashbrown finds an owned key by a borrowed one only if both hash alike.
    #[test]
    fn borrowed_keys_hash_as_the_owned_labels() {
        let hasher = hashbrown::DefaultHashBuilder::default();
        let request = RequestKey {
            direction: "outbound",
            service: "api",
            route: "HTTPRoute/api-split/0",
            backend: "v2",
            peer: "spiffe://example.org/ns/default/sa/api",
            code: 200,
            grpc_status: "",
        };
        assert_eq!(hasher.hash_one(&request), hasher.hash_one(request.to_owned()));
        let latency = LatencyKey { direction: "inbound", service: "api", route: "", backend: "" };
        assert_eq!(hasher.hash_one(&latency), hasher.hash_one(latency.to_owned()));
        let authz = AuthzKey { policy: "allow-web", outcome: "allow", protocol: "http" };
        assert_eq!(hasher.hash_one(&authz), hasher.hash_one(authz.to_owned()));
    }

    #[test]
    fn responses_are_counted_under_their_labels_once_per_series() {
        let m = Arc::new(Metrics::default());
        for _ in 0..3 {
            m.response("outbound", "api", meta("HTTPRoute/api/0"), Response::new(empty()), 0.001);
        }
        let mut refused = Response::new(empty());
        *refused.status_mut() = http::StatusCode::FORBIDDEN;
        m.response("outbound", "api", meta("HTTPRoute/api/0"), refused, 0.001);
        m.authz_decision("allow-web", "allow", "http");
        m.authz_decision("allow-web", "allow", "http");
        let text = scrape(&m);
        let labels = |code: u16| {
            format!(
                "{{direction=\"outbound\",service=\"api\",route=\"HTTPRoute/api/0\",backend=\"v2\",peer=\"spiffe://example.org/ns/default/sa/api\",code=\"{code}\",grpc_status=\"\"}}"
            )
        };
        assert_eq!(sample(&text, "weft_proxy_requests_total", &labels(200)), Some("3"), "{text}");
        assert_eq!(sample(&text, "weft_proxy_requests_total", &labels(403)), Some("1"), "{text}");
        let latency = "{direction=\"outbound\",service=\"api\",route=\"HTTPRoute/api/0\",backend=\"v2\"}";
        assert_eq!(sample(&text, "weft_proxy_request_duration_seconds_count", latency), Some("4"), "{text}");
        let authz = "{policy=\"allow-web\",outcome=\"allow\",protocol=\"http\"}";
        assert_eq!(sample(&text, "weft_proxy_authz_decisions_total", authz), Some("2"), "{text}");
        assert_eq!((m.request_series.len(), m.latency_series.len(), m.authz_series.len()), (2, 1, 1));
    }

    /// A config change that renames the route (or moves the request to
    /// another backend) counts the next request under the new labels, and
    /// leaves the old series as they were.
    #[test]
    fn a_route_change_counts_under_the_new_labels() {
        let m = Arc::new(Metrics::default());
        m.response("outbound", "api", meta("HTTPRoute/api/0"), Response::new(empty()), 0.001);
        m.response("outbound", "api", meta("HTTPRoute/api-v2/0"), Response::new(empty()), 0.001);
        m.response("outbound", "api", meta("HTTPRoute/api-v2/0"), Response::new(empty()), 0.001);
        let text = scrape(&m);
        let count = |route: &str| {
            let labels = format!("{{direction=\"outbound\",service=\"api\",route=\"{route}\",backend=\"v2\",peer=\"spiffe://example.org/ns/default/sa/api\",code=\"200\",grpc_status=\"\"}}");
            sample(&text, "weft_proxy_requests_total", &labels).map(str::to_string)
        };
        assert_eq!(count("HTTPRoute/api/0").as_deref(), Some("1"), "{text}");
        assert_eq!(count("HTTPRoute/api-v2/0").as_deref(), Some("2"), "{text}");
        let latency = "{direction=\"outbound\",service=\"api\",route=\"HTTPRoute/api-v2/0\",backend=\"v2\"}";
        assert_eq!(sample(&text, "weft_proxy_request_duration_seconds_count", latency), Some("2"), "{text}");
    }

    /// gRPC statuses: in the response's headers (trailers-only) counted at
    /// once, in trailers counted when the body ends; no series is made for
    /// a status not seen.
    #[tokio::test]
    async fn grpc_statuses_are_counted_as_they_come() {
        use http_body_util::BodyExt;
        let m = Arc::new(Metrics::default());
        let grpc = |status: Option<&str>| {
            let mut resp = Response::new(empty());
            resp.headers_mut().insert("content-type", http::HeaderValue::from_static("application/grpc"));
            if let Some(s) = status {
                resp.headers_mut().insert("grpc-status", http::HeaderValue::from_str(s).unwrap());
            }
            resp
        };
        m.response("inbound", "echo", RequestMeta::default(), grpc(Some("14")), 0.001);
        let later = m.response("inbound", "echo", RequestMeta::default(), grpc(None), 0.001);
        let before = scrape(&m);
        let labels = |status: &str| {
            format!("{{direction=\"inbound\",service=\"echo\",route=\"\",backend=\"\",peer=\"\",code=\"200\",grpc_status=\"{status}\"}}")
        };
        assert_eq!(sample(&before, "weft_proxy_requests_total", &labels("14")), Some("1"), "{before}");
        assert_eq!(before.matches("weft_proxy_requests_total{").count(), 1, "{before}");
        later.into_body().collect().await.unwrap();
        let after = scrape(&m);
        assert_eq!(sample(&after, "weft_proxy_requests_total", &labels("none")), Some("1"), "{after}");
        let latency = "{direction=\"inbound\",service=\"echo\",route=\"\",backend=\"\"}";
        assert_eq!(sample(&after, "weft_proxy_request_duration_seconds_count", latency), Some("2"), "{after}");
    }
}
