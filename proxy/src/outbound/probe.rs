//! The probe of an ejected endpoint, run once its ejection lapses and
//! before it gets real traffic again (`state/balance.rs`): a pooled mTLS
//! connection to its sidecar and one `weft-probe` request, which the callee
//! sidecar answers itself from its app's readiness (`inbound/readiness.rs`).
//! A failed probe extends the ejection; a dead replica costs callers no
//! request per lapse.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Version};

use super::pool::{ConnKind, PeerSender, Pool};
use crate::http::{empty, PROBE, UNSENT};
use crate::metrics::{Metrics, ProbeLabels};
use crate::state::balance;
use crate::state::Endpoint;

/// How long a probe (connection and answer) may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Probes `ep` (an endpoint of `service`), reports the outcome to the
/// balancer and counts it in `weft_proxy_endpoint_probes_total`; true when
/// it answered healthy.
pub async fn run(pool: Arc<Pool>, metrics: Arc<Metrics>, ep: Endpoint, service: String) -> bool {
    let healthy = tokio::time::timeout(PROBE_TIMEOUT, probe(&pool, &ep, &service)).await.unwrap_or(false);
    let result = if healthy { "healthy" } else { "unhealthy" };
    tracing::info!(endpoint = %ep.address, %service, result, "probed an ejected endpoint");
    metrics.probes.get_or_create(&ProbeLabels { service, endpoint: ep.address.to_string(), result }).inc();
    balance::probed(&ep.state, healthy);
    healthy
}

async fn probe(pool: &Pool, ep: &Endpoint, service: &str) -> bool {
    let Ok(lease) = pool.get(ep, ConnKind::Requests).await else { return false };
    let PeerSender::Requests(mut sender) = lease.sender else { return false };
    let Ok(req) = Request::get(format!("http://{service}/")).version(Version::HTTP_2).header(PROBE, "1").body(empty())
    else {
        return false;
    };
    match sender.send(req, lease.guard).await {
        // A sidecar of an older version forwards the probe to its app:
        // any answer but a server error shows it serves.
        Ok(resp) => !resp.status().is_server_error() && !resp.headers().contains_key(UNSENT),
        Err(_) => false,
    }
}
