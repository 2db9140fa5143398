//! A declared TCP upstream's connection (or an intercepted one that is not
//! HTTP), carried as an HTTP CONNECT stream
//! on the pooled mTLS connection to an endpoint of the service.

use http::{Method, Request, StatusCode, Version};
use hyper_util::rt::TokioIo;

use super::Outbound;
use crate::error::ProxyError;
use crate::http::empty;
use crate::limits;
use crate::metrics::{ConnLabels, OpenConn};
use crate::state::balance;

impl Outbound {
    /// Tunnels one accepted connection to `service` until either side closes.
    pub(super) async fn tunnel<S>(&self, mut tcp: S, service: &str) -> Result<(), ProxyError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let _open = OpenConn::new(&self.metrics, "outbound", "tcp");
        let snapshot = self.state.snapshot();
        let endpoints: Vec<_> = snapshot.endpoints(service).iter().collect();
        let (ep, _in_flight) = balance::pick(&endpoints)
            .ok_or_else(|| ProxyError::NoEndpoints { service: service.to_string(), subset: String::new() })?;
        let ep = ep.clone();
        drop(snapshot);
        let addr = ep.address;
        // The lease keeps the tunnel's stream counted on its connection until the tunnel ends.
        let lease = self.pool.get(&ep).await?;
        let mut sender = lease.sender.clone();
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("{service}:0"))
            .version(Version::HTTP_2)
            .body(empty())
            .map_err(|source| ProxyError::BadTarget { source })?;
        let reset = |source| ProxyError::UpstreamReset { addr, peer: ep.spiffe_id.clone(), source };
        let resp = sender.send_request(req).await.map_err(reset)?;
        if resp.status() != StatusCode::OK {
            return Err(ProxyError::TunnelRefused { addr, status: resp.status() });
        }
        let upgraded = hyper::upgrade::on(resp).await.map_err(reset)?;
        let (up, down) = tokio::io::copy_bidirectional_with_sizes(
            &mut tcp,
            &mut TokioIo::new(upgraded),
            limits::TUNNEL_BUFFER,
            limits::TUNNEL_BUFFER,
        )
        .await
        .map_err(|source| ProxyError::TunnelIo { addr, source })?;
        self.metrics.tcp_bytes.get_or_create(&ConnLabels { direction: "outbound", protocol: "tcp" }).inc_by(up + down);
        Ok(())
    }
}
