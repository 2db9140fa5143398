//! A declared TCP upstream's connection (or an intercepted one that is not
//! HTTP), carried as an HTTP CONNECT stream
//! on the pooled mTLS connection to an endpoint of the service.
//!
//! A tunnel takes part in the same outlier detection as requests
//! (`state/balance.rs`): ejected endpoints get none until probed, and an
//! endpoint that cannot be reached, or whose sidecar answers that its app
//! refused the connection ([`UNSENT`]), counts a failure and the tunnel is
//! opened at another endpoint instead. That is safe whatever the protocol:
//! the caller's bytes are only read once a tunnel is open.

use http::{Method, Request, StatusCode, Version};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;

use super::pool::{ConnKind, Lease};
use super::{probe, Outbound};
use crate::error::{peer_error, ProxyError};
use crate::http::{empty, UNSENT};
use crate::limits;
use crate::metrics::{ConnLabels, OpenConn};
use crate::state::balance::{self, InFlight};
use crate::state::Endpoint;

/// How many endpoints one tunnel tries before it gives up (as a request does).
const MAX_TRIES: usize = 3;

/// An open tunnel: the endpoint's load count and the stream on its
/// connection stay held until the tunnel ends.
struct Open {
    upgraded: Upgraded,
    addr: std::net::SocketAddr,
    _in_flight: InFlight,
    _lease: Lease,
}

/// Why an attempt opened no tunnel.
enum Attempt {
    /// The endpoint never took the tunnel (unreachable, or its app refused):
    /// a failure of the endpoint, and another one may take it.
    Unsent(ProxyError),
    /// Refused by policy or a limit: the answer, and no fault of the endpoint.
    Refused(ProxyError),
}

impl Outbound {
    /// Tunnels one accepted connection to `service` until either side closes.
    pub(super) async fn tunnel<S>(&self, mut tcp: S, service: &str) -> Result<(), ProxyError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let _open = OpenConn::new(&self.metrics, "outbound", "tcp");
        let open = self.open_tunnel(service).await?;
        let addr = open.addr;
        let (up, down) = tokio::io::copy_bidirectional_with_sizes(
            &mut tcp,
            &mut TokioIo::new(open.upgraded),
            limits::TUNNEL_BUFFER,
            limits::TUNNEL_BUFFER,
        )
        .await
        .map_err(|source| ProxyError::TunnelIo { addr, source })?;
        self.metrics.tcp_bytes.get_or_create(&ConnLabels { direction: "outbound", protocol: "tcp" }).inc_by(up + down);
        Ok(())
    }

    /// Opens a tunnel at an endpoint of `service`, moving on to another
    /// (at most [`MAX_TRIES`]) when one never took it.
    async fn open_tunnel(&self, service: &str) -> Result<Open, ProxyError> {
        let mut candidates: Vec<Endpoint> = self.state.snapshot().endpoints(service).to_vec();
        for ep in balance::probes_due(&candidates.iter().collect::<Vec<_>>()) {
            tokio::spawn(probe::run(self.pool.clone(), self.metrics.clone(), ep.clone(), service.to_string()));
        }
        let mut last = None;
        for _ in 0..MAX_TRIES {
            let picked = balance::pick(&candidates.iter().collect::<Vec<_>>()).map(|(ep, f)| (ep.clone(), f));
            let Some((ep, in_flight)) = picked else { break };
            match self.attempt(&ep, service).await {
                Ok((lease, upgraded)) => {
                    // Its set-up time says nothing of the app's answer time: the outcome only.
                    if in_flight.outcome(true) {
                        self.metrics.ejections.inc();
                    }
                    return Ok(Open { upgraded, addr: ep.address, _in_flight: in_flight, _lease: lease });
                }
                Err(Attempt::Unsent(e)) => {
                    tracing::info!(endpoint = %ep.address, %service, error = %e, "tunnel not taken by the endpoint; trying another endpoint");
                    if in_flight.outcome(false) {
                        self.metrics.ejections.inc();
                    }
                    candidates.retain(|c| c.address != ep.address);
                    last = Some(e);
                }
                Err(Attempt::Refused(e)) => {
                    in_flight.outcome(true);
                    return Err(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| ProxyError::NoEndpoints { service: service.to_string(), subset: String::new() }))
    }

    /// One CONNECT to `ep`'s sidecar.
    async fn attempt(&self, ep: &Endpoint, service: &str) -> Result<(Lease, Upgraded), Attempt> {
        let addr = ep.address;
        let lease = self.pool.get(ep, ConnKind::Upgrades).await.map_err(Attempt::Unsent)?;
        let Some(mut sender) = lease.sender.upgrades() else {
            return Err(Attempt::Refused(ProxyError::Internal { what: "a tunnel leased a raw HTTP/2 connection" }));
        };
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("{service}:0"))
            .version(Version::HTTP_2)
            .body(empty())
            .map_err(|source| Attempt::Refused(ProxyError::BadTarget { source }))?;
        let reset = |source: hyper::Error| {
            Attempt::Unsent(ProxyError::UpstreamReset {
                addr,
                peer: (*ep.spiffe_id).clone(),
                source: peer_error(source),
            })
        };
        let resp = sender.send_request(req).await.map_err(reset)?;
        let status = resp.status();
        if status != StatusCode::OK {
            let e = ProxyError::TunnelRefused { addr, status };
            // The callee's app refused it, or its sidecar failed: the endpoint's fault.
            let unsent = resp.headers().contains_key(UNSENT) || status.is_server_error();
            return Err(if unsent { Attempt::Unsent(e) } else { Attempt::Refused(e) });
        }
        let upgraded = hyper::upgrade::on(resp).await.map_err(reset)?;
        Ok((lease, upgraded))
    }
}
