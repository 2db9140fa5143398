//! Mutual-TLS HTTP/2 connections to peer sidecars, shared by every request
//! and TCP tunnel to that peer. The peer must present exactly the SPIFFE ID
//! that discovery gave for it. The connections are kept in the endpoint's
//! state (`state::EndpointState`), so they leave with the endpoint.
//!
//! Plain requests go on connections of our raw HTTP/2 client
//! (`h2_client.rs`); CONNECT tunnels and carried exchanges (upgrades,
//! 100-continue) on hyper's, which has the upgrade machinery. So a peer
//! that is sent both has one connection of each kind per worker.
//!
//! Each stream (request until its response body ends, tunnel until it
//! closes) holds a [`Lease`] on its connection. A caller gets the first
//! connection with a free stream under the peer's
//! SETTINGS_MAX_CONCURRENT_STREAMS; when every connection is full, a new one
//! is opened, so long-lived tunnels never stall new streams. A connection
//! with no stream for [`Limits::pool_idle_timeout`] is closed (before the
//! peer's own idle close could race a new request).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use weft_certs::{IdMatcher, SpiffeId, SpiffeVerifier};

use super::h2_client;
use crate::error::{ConnectError, ProxyError};
use crate::http::Body;
use crate::identity::Identity;
use crate::limits::{self, Limits};
use crate::metrics::{Metrics, OpenConn};
use crate::state::{Endpoint, EndpointState, Pooled, StreamCount, StreamGuard};

pub struct Pool {
    identity: Arc<Identity>,
    metrics: Arc<Metrics>,
    connect_timeout: Duration,
    limits: Limits,
}

/// A stream's hold on a pooled connection: the sender to use, and the count
/// of the connection's open streams, until dropped.
#[derive(Debug)]
pub struct Lease {
    pub sender: PeerSender,
    pub guard: StreamGuard,
}

/// Which client a pooled connection runs (see the module's doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnKind {
    /// Plain requests: raw HTTP/2 ([`h2_client`]).
    Requests,
    /// CONNECT tunnels and carried exchanges: hyper's client, for its upgrades.
    Upgrades,
}

/// A pooled connection's request handle.
#[derive(Clone, Debug)]
pub enum PeerSender {
    Requests(h2_client::Sender),
    Upgrades(SendRequest<Body>),
}

impl PeerSender {
    pub fn kind(&self) -> ConnKind {
        match self {
            Self::Requests(_) => ConnKind::Requests,
            Self::Upgrades(_) => ConnKind::Upgrades,
        }
    }

    /// Whether the connection has ended (or, raw, refused a stream on GOAWAY).
    pub fn is_closed(&self) -> bool {
        match self {
            Self::Requests(s) => s.is_closed(),
            Self::Upgrades(s) => s.is_closed(),
        }
    }

    fn is_ready(&self) -> bool {
        match self {
            Self::Requests(s) => !s.is_closed(),
            Self::Upgrades(s) => s.is_ready(),
        }
    }

    /// hyper's sender, for a lease taken with [`ConnKind::Upgrades`].
    pub fn upgrades(&self) -> Option<SendRequest<Body>> {
        match self {
            Self::Upgrades(s) => Some(s.clone()),
            Self::Requests(_) => None,
        }
    }
}

/// Streams one connection carries at most, whatever the peer allows: hyper's
/// default SETTINGS_MAX_CONCURRENT_STREAMS for peers of older versions.
const MAX_STREAMS_PER_CONNECTION: usize = limits::H2_MAX_CONCURRENT_STREAMS as usize;

impl Pool {
    pub fn new(identity: Arc<Identity>, metrics: Arc<Metrics>, connect_timeout: Duration, limits: Limits) -> Arc<Self> {
        Arc::new(Self { identity, metrics, connect_timeout, limits })
    }

    /// How long a connection attempt may take (`--connect-timeout`).
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The limits the pool's connections are built with.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A stream on a pooled connection of `kind` to `ep` driven by the caller's worker
    /// thread (`weft_runtime::workers`): the first one with a free stream,
    /// else a new one. Concurrent callers on one worker for one peer wait
    /// for a single connection attempt; other workers' callers do not wait
    /// for it.
    pub async fn get(&self, ep: &Endpoint, kind: ConnKind) -> Result<Lease, ProxyError> {
        let worker = weft_runtime::workers::index();
        let mut conns = ep.state.conn.at(worker).lock().await;
        conns.retain(|c| !c.sender.is_closed());
        let free = |c: &&Pooled| {
            c.sender.kind() == kind && c.sender.is_ready() && c.streams.has_room(MAX_STREAMS_PER_CONNECTION)
        };
        if let Some(c) = conns.iter().find(free) {
            return Ok(Lease { sender: c.sender.clone(), guard: c.streams.open_one() });
        }
        let streams = Arc::new(StreamCount::default());
        // Boxed: the TCP + TLS + h2 handshake future is kilobytes, and inline it
        // would make every request's future (which holds this one) that large,
        // copied on each move, for a path taken once per connection.
        let sender =
            Box::pin(self.connect(ep.address, &ep.spiffe_id, kind, streams.clone())).await.map_err(|e| match e {
                // A certificate the verifier refused: not the identity discovery named.
                ConnectError::Tls { addr, id, source } if bad_certificate(&source) => {
                    ProxyError::PeerIdentity { addr, expected: id, source }
                }
                source => ProxyError::ConnectFailed { peer: (*ep.spiffe_id).clone(), source: Box::new(source) },
            })?;
        let pooled = Pooled::new(sender.clone(), streams, &self.metrics.pool_connections);
        let lease = Lease { sender, guard: pooled.streams.open_one() };
        tokio::spawn(close_when_idle(
            Arc::downgrade(&ep.state),
            worker,
            pooled.streams.clone(),
            self.limits.pool_idle_timeout(),
        ));
        conns.push(pooled);
        if conns.len() > 1 {
            tracing::debug!(addr = %ep.address, connections = conns.len(), "every pooled connection is at its stream limit; opened another");
        }
        Ok(lease)
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        id: &SpiffeId,
        kind: ConnKind,
        streams: Arc<StreamCount>,
    ) -> Result<PeerSender, ConnectError> {
        let verifier = SpiffeVerifier::new(self.identity.bundle.clone(), IdMatcher::Exact(id.clone()));
        let tls =
            weft_certs::tls::client_config(Some(self.identity.resolver.clone()), verifier, &[weft_certs::tls::ALPN_H2]);
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout { addr })?
            .map_err(|source| ConnectError::Tcp { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(
            self.connect_timeout,
            TlsConnector::from(Arc::new(tls)).connect(weft_certs::tls::server_name(), tcp),
        )
        .await
        .map_err(|_| ConnectError::Timeout { addr })?
        .map_err(|source| {
            self.metrics.handshake("outbound", "error");
            ConnectError::Tls { addr, id: id.clone(), source }
        })?;
        if tls.get_ref().1.alpn_protocol() != Some(weft_certs::tls::ALPN_H2) {
            return Err(ConnectError::NoH2 { addr });
        }
        self.metrics.handshake("outbound", "ok");
        let open = OpenConn::new(&self.metrics, "outbound", "mtls");
        let peer = id.clone();
        if kind == ConnKind::Requests {
            let mut builder = h2::client::Builder::new();
            builder
                .initial_max_send_streams(H2_INITIAL_MAX_SEND_STREAMS)
                .initial_window_size(limits::H2_STREAM_WINDOW)
                .initial_connection_window_size(limits::H2_CONNECTION_WINDOW)
                .max_frame_size(limits::H2_MAX_FRAME_SIZE)
                .max_header_list_size(self.limits.parser_bytes_u32())
                .max_send_buffer_size(H2_MAX_SEND_BUFFER)
                .enable_push(false);
            let on_settings = move |max| streams.set_max(max);
            let on_end = move |r: Result<(), h2_client::ConnError>| {
                let _open = open;
                log_end(addr, &peer, r.err().as_ref().map(|e| e as _));
            };
            let keep_alive = (limits::H2_KEEP_ALIVE_INTERVAL, limits::H2_KEEP_ALIVE_TIMEOUT);
            let sender = h2_client::handshake(tls, &builder, keep_alive, on_settings, on_end)
                .await
                .map_err(|source| ConnectError::H2 { addr, source: Box::new(source) })?;
            tracing::debug!(%addr, peer = %id, "pooled connection open");
            return Ok(PeerSender::Requests(sender));
        }
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(limits::H2_KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(limits::H2_KEEP_ALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(limits::H2_STREAM_WINDOW)
            .initial_connection_window_size(limits::H2_CONNECTION_WINDOW)
            .max_frame_size(limits::H2_MAX_FRAME_SIZE)
            .max_header_list_size(self.limits.parser_bytes_u32())
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|source| ConnectError::H2 { addr, source: Box::new(source) })?;
        tokio::spawn(async move {
            let _open = open;
            let mut conn = std::pin::pin!(conn);
            // The peer's stream limit can change with any SETTINGS frame.
            let done = std::future::poll_fn(|cx| {
                let r = conn.as_mut().poll(cx);
                streams.set_max(conn.current_max_send_streams());
                r
            });
            let r = done.await;
            log_end(addr, &peer, r.as_ref().err().map(|e| e as _));
        });
        tracing::debug!(%addr, peer = %id, "pooled connection open");
        Ok(PeerSender::Upgrades(sender))
    }
}

/// Streams the raw client may open before the peer's SETTINGS say how
/// many it allows (hyper's default).
const H2_INITIAL_MAX_SEND_STREAMS: usize = 100;
/// Bytes of request body a raw stream buffers before it waits for the
/// peer's window (hyper's default).
const H2_MAX_SEND_BUFFER: usize = 1024 * 1024;

/// Logs how a pooled connection ended: every request and tunnel on it
/// fails with it, so a failure says which peer.
fn log_end(addr: SocketAddr, peer: &SpiffeId, error: Option<&(dyn std::error::Error + 'static)>) {
    match error {
        Some(e) => {
            let error = crate::error::cause(e);
            tracing::warn!(%addr, %peer, %error, "HTTP/2 connection to the peer's sidecar failed");
        }
        None => tracing::debug!(%addr, %peer, "HTTP/2 connection to the peer's sidecar closed"),
    }
}

/// Drops the pooled connection counted by `streams` from the endpoint's
/// pool of `worker` once it has had no stream for `idle`; hyper closes it
/// when the last sender is gone.
async fn close_when_idle(ep: std::sync::Weak<EndpointState>, worker: usize, streams: Arc<StreamCount>, idle: Duration) {
    loop {
        let wait = idle.saturating_sub(streams.idle_for()).max(idle / 4);
        tokio::time::sleep(wait).await;
        let Some(ep) = ep.upgrade() else { return };
        let mut conns = ep.conn.at(worker).lock().await;
        let Some(i) = conns.iter().position(|c| Arc::ptr_eq(&c.streams, &streams)) else { return };
        if conns[i].sender.is_closed() {
            conns.remove(i);
            return;
        }
        if streams.idle_for() >= idle {
            conns.remove(i);
            tracing::debug!("closing idle pooled connection");
            return;
        }
    }
}

/// Whether a TLS failure is the peer's certificate being refused.
fn bad_certificate(e: &std::io::Error) -> bool {
    matches!(e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()), Some(rustls::Error::InvalidCertificate(_)))
}
