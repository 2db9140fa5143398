//! The control plane's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    rpc: String,
    code: String,
}

#[derive(Default)]
pub struct Metrics {
    handshakes: Family<OutcomeLabels, Counter>,
    rpcs: Family<RpcLabels, Counter>,
    svids_issued: Family<OutcomeLabels, Counter>,
    pub sidecars_connected: Gauge,
    pub config_version: Gauge,
    /// 1 while the store answers, 0 while it does not (writes refused).
    pub store_up: Gauge,
    config_reloads: Family<OutcomeLabels, Counter>,
    sa_token_refusals: Family<OutcomeLabels, Counter>,
}

impl Metrics {
    pub fn register(&self, reg: &mut Registry) {
        let reg = reg.sub_registry_with_prefix("weft_control_plane");
        reg.register("tls_handshakes", "TLS handshakes on the gRPC port by outcome", self.handshakes.clone());
        reg.register("rpcs", "gRPC calls by method and status code", self.rpcs.clone());
        reg.register(
            "svids_issued",
            "X.509-SVIDs issued, by how the caller proved its identity",
            self.svids_issued.clone(),
        );
        reg.register("sidecars_connected", "Sidecars with an open config watch", self.sidecars_connected.clone());
        reg.register("config_version", "Version of the config being served", self.config_version.clone());
        reg.register(
            "store_up",
            "1 while the store (file or etcd) answers; 0 while it does not and writes are refused",
            self.store_up.clone(),
        );
        reg.register("config_reloads", "Mesh config reloads by outcome", self.config_reloads.clone());
        reg.register(
            "sa_token_refusals",
            "Kubernetes service-account tokens refused at attestation, by reason",
            self.sa_token_refusals.clone(),
        );
    }

    pub fn handshake(&self, outcome: &str) {
        self.handshakes.get_or_create(&OutcomeLabels { outcome: outcome.into() }).inc();
    }

    pub fn rpc(&self, rpc: &str, code: tonic::Code) {
        let code = format!("{code:?}");
        self.rpcs.get_or_create(&RpcLabels { rpc: rpc.into(), code }).inc();
    }

    pub fn issued(&self, how: &str) {
        self.svids_issued.get_or_create(&OutcomeLabels { outcome: how.into() }).inc();
    }

    /// A service-account token refused for `reason` ([`weft_k8s::sa_token::TokenError::reason`]).
    pub fn sa_token_refused(&self, reason: &str) {
        self.sa_token_refusals.get_or_create(&OutcomeLabels { outcome: reason.into() }).inc();
    }

    pub fn config_reload(&self, outcome: &str) {
        self.config_reloads.get_or_create(&OutcomeLabels { outcome: outcome.into() }).inc();
    }
}
