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

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::detect::{detect, Detection, Protocol};

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
