//! Transparent interception on the outbound listener: connections the
//! pod's iptables rules (`weft init-iptables`) redirected here carry their
//! original destination (`SO_ORIGINAL_DST`), which says where the app meant
//! to go.
//!
//! - The destination is the listener itself: not intercepted; the app named
//!   the sidecar, and the `Host` header names the service (as without
//!   interception).
//! - A service of the mesh ([`Snapshot::service_at`](crate::state::Snapshot::service_at)):
//!   the first bytes say what it speaks ([`detect_within`]); HTTP/1.1 and
//!   HTTP/2 are served per request (routing, retries, metrics), anything else
//!   (TLS, other TCP, a client silent past `--detect-timeout`) is tunnelled
//!   over mTLS to the service. A Service declared `protocol: tcp` or
//!   `opaque` is tunnelled without waiting for bytes.
//! - Anything else: passed through to the original destination, or refused
//!   under the Mesh's `outboundTrafficPolicy: registryOnly`; counted either way.
//!
//! Plaintext never leaves for an address the mesh may own ([`judge`]):
//! before the first config is applied every destination would look unknown,
//! so a connection waits for it (at most [`FIRST_CONFIG_WAIT`]) and is
//! refused if none comes; an address that left the mesh within
//! [`FORMER_DESTINATION_RETENTION`] (a draining or restarting pod) is
//! refused, not passed through. A connection that comes back from the
//! sidecar's own passthrough socket ([`OwnSockets`]: the sidecar runs as a
//! UID the rules do not exempt) is refused, ending the loop at its first turn.

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::detect::{detect, Detection, Protocol};
use crate::state::State;
pub use crate::state::FORMER_DESTINATION_RETENTION;

/// How long an intercepted connection waits for the sidecar's first config
/// (after a start or restart) before it is refused: 5 seconds.
pub const FIRST_CONFIG_WAIT: Duration = Duration::from_secs(5);

/// What becomes of an intercepted connection, by its original destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A service of the mesh: carried over mTLS to it.
    Mesh { service: String, declared_opaque: bool },
    /// Not the mesh's (Mesh `outboundTrafficPolicy: allowAny`): passed through.
    Passthrough,
    /// Closed with a reset.
    Refused(Refusal),
}

/// Why an intercepted connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not the mesh's, under Mesh `outboundTrafficPolicy: registryOnly`.
    RegistryOnly,
    /// No config arrived within [`FIRST_CONFIG_WAIT`]: the destination cannot be judged.
    NoConfig,
    /// The address left the mesh less than [`FORMER_DESTINATION_RETENTION`]
    /// ago; `first`: the first refusal since (logged).
    FormerlyInMesh { first: bool },
    /// The connection came from the sidecar's own passthrough socket.
    Loop,
}

impl Refusal {
    /// The `action` label of `weft_proxy_unknown_destinations_total`.
    pub fn action(self) -> &'static str {
        match self {
            Self::RegistryOnly => "refused",
            Self::NoConfig => "refused_no_config",
            Self::FormerlyInMesh { .. } => "refused_former_mesh_address",
            Self::Loop => "refused_loop",
        }
    }
}

/// Judges an intercepted connection to `dst`: waits (at most `config_wait`)
/// for a first config when there is none yet, then looks `dst` up in it.
pub async fn judge(state: &State, dst: SocketAddr, config_wait: Duration) -> Verdict {
    if !state.has_config() && tokio::time::timeout(config_wait, state.first_applied()).await.is_err() {
        return Verdict::Refused(Refusal::NoConfig);
    }
    let snapshot = state.snapshot();
    if let Some(service) = snapshot.service_at(dst) {
        return Verdict::Mesh { service: service.to_string(), declared_opaque: snapshot.declared_opaque(service) };
    }
    if let (true, first) = state.formerly_in_mesh(dst.ip()) {
        return Verdict::Refused(Refusal::FormerlyInMesh { first });
    }
    match snapshot.outbound_traffic_policy() {
        weft_config::OutboundTrafficPolicy::AllowAny => Verdict::Passthrough,
        weft_config::OutboundTrafficPolicy::RegistryOnly => Verdict::Refused(Refusal::RegistryOnly),
    }
}

/// The local ports of the sidecar's open passthrough sockets: an intercepted
/// connection from one of them is the sidecar's own connection redirected
/// back into it (it runs as a UID the rules do not exempt).
#[derive(Debug, Default)]
pub struct OwnSockets {
    ports: Mutex<HashSet<u16>>,
}

impl OwnSockets {
    /// Whether `peer` (an accepted connection's source) is one of ours.
    pub fn contains(&self, peer: SocketAddr) -> bool {
        self.ports.lock().unwrap_or_else(|e| e.into_inner()).contains(&peer.port())
    }

    /// Connects to `dst` from a socket whose local port is recorded (before
    /// the connection starts, so its redirected twin finds it) while the
    /// returned stream lives.
    ///
    /// # Errors
    /// Binding or connecting failed.
    pub async fn connect(self: &Arc<Self>, dst: SocketAddr) -> io::Result<(TcpStream, OwnSocket)> {
        let socket = if dst.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        let any: SocketAddr =
            if dst.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
        socket.bind(any)?;
        let port = socket.local_addr()?.port();
        self.ports.lock().unwrap_or_else(|e| e.into_inner()).insert(port);
        let guard = OwnSocket { owner: self.clone(), port };
        Ok((socket.connect(dst).await?, guard))
    }
}

/// Keeps a port in [`OwnSockets`] until dropped.
#[derive(Debug)]
pub struct OwnSocket {
    owner: Arc<OwnSockets>,
    port: u16,
}

impl Drop for OwnSocket {
    fn drop(&mut self) {
        self.owner.ports.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.port);
    }
}

/// Closes `tcp` with a reset (linger 0), so the app sees a refusal at once.
pub fn reset(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}

/// Where an accepted connection was going before iptables redirected it;
/// None when it was not redirected (its original destination is the
/// listener's own address) or the kernel has no NAT record of it.
pub fn original_dst(tcp: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(tcp);
    let local = tcp.local_addr().ok()?;
    let dst = if local.is_ipv4() { sock.original_dst_v4() } else { sock.original_dst_v6() };
    let dst = dst.ok()?.as_socket()?;
    (dst != local).then_some(dst)
}

/// The sidecar runs as another UID than the one the interception rules
/// exempt (`weft init-iptables --proxy-uid`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "--proxy-uid {expected}: this sidecar runs as uid {actual}, but the interception rules exempt only uid {expected}'s connections, so its own would be redirected back into it; run it as uid {expected} (Kubernetes: the sidecar's securityContext.runAsUser), or give weft init-iptables and weft-proxy the same --proxy-uid"
)]
pub struct ProxyUidMismatch {
    pub expected: u32,
    pub actual: u32,
}

/// Checks that the sidecar's effective UID is `expected`, the UID whose
/// connections the interception rules leave alone (they are matched by the
/// socket owner, so it is the effective UID that counts).
///
/// # Errors
/// [`ProxyUidMismatch`] when it is another.
pub fn check_proxy_uid(expected: u32) -> Result<(), ProxyUidMismatch> {
    let actual = rustix::process::geteuid().as_raw();
    if actual != expected {
        return Err(ProxyUidMismatch { expected, actual });
    }
    Ok(())
}

/// The protocol label of a detection (the `protocol` label of the metric).
pub fn label(p: Protocol) -> &'static str {
    match p {
        Protocol::Http1 => "http1",
        Protocol::Http2 => "http2",
        Protocol::Tls => "tls",
        Protocol::Opaque => "opaque",
    }
}

/// Reads the client's first bytes until [`detect`] knows the protocol or
/// `timeout` (from now) passes; a client that sends nothing (or not enough)
/// in time — a server-speaks-first protocol — is [`Protocol::Opaque`], so it
/// waits at most `timeout`. The bytes read are replayed by the returned stream.
///
/// # Errors
/// A read error from the client.
pub async fn detect_within<S: AsyncRead + Unpin>(mut io: S, timeout: Duration) -> io::Result<(Protocol, Rewind<S>)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    loop {
        if let Detection::Known(p) = detect(&buf) {
            return Ok((p, Rewind::new(io, buf)));
        }
        match tokio::time::timeout_at(deadline, io.read(&mut chunk)).await {
            Err(_) | Ok(Ok(0)) => return Ok((Protocol::Opaque, Rewind::new(io, buf))),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// A stream whose first reads return bytes already read from it.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Rewind<S> {
    /// `inner`, read from after `prefix` was read from it.
    pub fn new(inner: S, prefix: Vec<u8>) -> Self {
        Self { prefix, pos: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    use weft_proto::config::v1 as pb;

    /// A snapshot where service `api` has endpoints at `ips` (port 15006)
    /// and the Mesh's policy is `policy`.
    fn snapshot(version: u64, ips: &[&str], policy: &str) -> pb::Snapshot {
        let cfg = format!(
            "apiVersion: weft.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: m}}\nspec: {{outboundTrafficPolicy: {policy}}}\n---\napiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {{name: api}}\nspec: {{port: 8080}}\n"
        );
        let cfg = weft_config::parse(&cfg).unwrap();
        let endpoints = ips
            .iter()
            .map(|ip| pb::Endpoint {
                address: format!("{ip}:15006"),
                spiffe_id: "spiffe://td/ns/a/sa/api".into(),
                labels: Default::default(),
            })
            .collect();
        pb::Snapshot {
            version,
            services: vec![pb::Service { name: "api".into(), endpoints }],
            mesh_config_json: serde_json::to_string(&cfg).unwrap(),
            ..Default::default()
        }
    }

    fn state() -> Arc<State> {
        State::new("client", Arc::new(crate::metrics::Metrics::default()))
    }

    fn api() -> Verdict {
        Verdict::Mesh { service: "api".into(), declared_opaque: false }
    }

    #[tokio::test]
    async fn nothing_is_judged_before_the_first_config() {
        let state = state();
        let dst: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        // No config: refused after the wait, never passed through.
        let v = judge(&state, dst, Duration::from_millis(50)).await;
        assert_eq!(v, Verdict::Refused(Refusal::NoConfig));
        // A config arriving during the wait decides.
        let waiting = {
            let state = state.clone();
            tokio::spawn(async move { judge(&state, dst, Duration::from_secs(30)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        state.apply(&snapshot(1, &["10.0.0.1"], "allowAny")).unwrap();
        assert_eq!(waiting.await.unwrap(), api());
        assert_eq!(judge(&state, "10.0.0.9:8080".parse().unwrap(), Duration::ZERO).await, Verdict::Passthrough);
    }

    #[tokio::test]
    async fn an_address_that_left_the_mesh_is_refused_not_passed_through() {
        let state = state();
        state.apply(&snapshot(1, &["10.0.0.1", "10.0.0.2"], "allowAny")).unwrap();
        let gone: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        assert_eq!(judge(&state, gone, Duration::ZERO).await, api());
        // The pod drains: discovery drops it while it still accepts.
        state.apply(&snapshot(2, &["10.0.0.1"], "allowAny")).unwrap();
        let first = Verdict::Refused(Refusal::FormerlyInMesh { first: true });
        assert_eq!(judge(&state, gone, Duration::ZERO).await, first);
        let again = Verdict::Refused(Refusal::FormerlyInMesh { first: false });
        assert_eq!(judge(&state, gone, Duration::ZERO).await, again, "logged once");
        // Any port of that address.
        assert_eq!(judge(&state, "10.0.0.2:22".parse().unwrap(), Duration::ZERO).await, again);
        // Unrelated updates keep the memory; addresses never in the mesh pass.
        state.apply(&snapshot(3, &["10.0.0.1"], "allowAny")).unwrap();
        assert_eq!(judge(&state, gone, Duration::ZERO).await, again);
        assert_eq!(judge(&state, "10.0.0.3:8080".parse().unwrap(), Duration::ZERO).await, Verdict::Passthrough);
        // Back in discovery: carried over mTLS again, and forgotten as former.
        state.apply(&snapshot(4, &["10.0.0.1", "10.0.0.2"], "allowAny")).unwrap();
        assert_eq!(judge(&state, gone, Duration::ZERO).await, api());
        assert_eq!(state.formerly_in_mesh(gone.ip()), (false, false));
    }

    #[tokio::test]
    async fn registry_only_refuses_unknown_destinations() {
        let state = state();
        state.apply(&snapshot(1, &["10.0.0.1"], "registryOnly")).unwrap();
        let v = judge(&state, "10.0.0.3:8080".parse().unwrap(), Duration::ZERO).await;
        assert_eq!(v, Verdict::Refused(Refusal::RegistryOnly));
    }

    #[tokio::test]
    async fn the_sidecars_own_passthrough_sockets_are_recognised() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let own = Arc::new(OwnSockets::default());
        let (stream, guard) = own.connect(listener.local_addr().unwrap()).await.unwrap();
        let (_accepted, peer) = listener.accept().await.unwrap();
        assert!(own.contains(peer), "the accepted peer is our own socket");
        drop((stream, guard));
        assert!(!own.contains(peer), "forgotten once closed");
        let other = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        assert!(!own.contains(other.local_addr().unwrap()));
    }

    #[test]
    fn the_proxy_uid_must_be_the_effective_one() {
        let me = rustix::process::geteuid().as_raw();
        assert_eq!(check_proxy_uid(me), Ok(()));
        let other = me.wrapping_add(1);
        let err = check_proxy_uid(other).unwrap_err();
        assert_eq!(err, ProxyUidMismatch { expected: other, actual: me });
        assert!(err.to_string().contains(&format!("runs as uid {me}")), "{err}");
    }

    #[tokio::test]
    async fn a_silent_client_is_opaque_after_the_timeout_and_nothing_is_lost() {
        let (client, server) = tokio::io::duplex(64);
        let start = std::time::Instant::now();
        let (p, _) = detect_within(server, Duration::from_millis(100)).await.unwrap();
        assert_eq!(p, Protocol::Opaque);
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(100) && waited < Duration::from_secs(5), "{waited:?}");
        drop(client);
    }

    #[tokio::test]
    async fn http_is_detected_across_reads_and_replayed_whole() {
        let (mut client, server) = tokio::io::duplex(64);
        let task = tokio::spawn(async move { detect_within(server, Duration::from_secs(10)).await.unwrap() });
        client.write_all(b"GET / HT").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        client.write_all(b"TP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let (p, mut rewound) = task.await.unwrap();
        assert_eq!(p, Protocol::Http1);
        drop(client);
        let mut all = Vec::new();
        rewound.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    }

    #[tokio::test]
    async fn h2_preface_and_tls_and_other_bytes() {
        for (bytes, want) in [
            (crate::detect::H2_PREFACE.to_vec(), Protocol::Http2),
            (vec![22, 3, 1, 0, 200, 1, 0, 0], Protocol::Tls),
            (b"\x00\x01binary".to_vec(), Protocol::Opaque),
        ] {
            let (mut client, server) = tokio::io::duplex(256);
            client.write_all(&bytes).await.unwrap();
            let (p, _) = detect_within(server, Duration::from_secs(10)).await.unwrap();
            assert_eq!(p, want, "{bytes:?}");
        }
    }
}
