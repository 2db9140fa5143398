//! The limits every hop of a request shares (the sidecar's flags
//! `--max-header-bytes`, `--header-read-timeout`, `--idle-timeout`,
//! `--max-connections`, `--app-idle-timeout`), how header size is measured,
//! and the HTTP/2 settings of the sidecar-to-sidecar hop.
//!
//! Header size is checked by the sidecar itself at the edges (the app's
//! request at the caller's sidecar, the peer's request and the app's response
//! at the callee's sidecar) so that a hit is answered with a message naming
//! the limit; hyper's and h2's own parsers get a larger bound
//! ([`Limits::parser_bytes`]) so they never cut first.

use std::time::Duration;

use http::HeaderMap;

/// Bytes of headers a request or response may carry, by default (64 KiB).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;

/// At most this many header fields in an HTTP/1.1 request (from the app) or
/// response (from the app); hyper's default is 100, too few for real
/// clients. Past it hyper itself answers 431 (request) or fails the response
/// (502). Each field is a slot the parser allocates per message (32 bytes).
pub const HTTP1_MAX_HEADER_FIELDS: usize = 256;

/// HTTP/2 flow-control window of one stream between sidecars (bytes). Large
/// windows let many streams send without waiting for WINDOW_UPDATEs, and h2's
/// guard against floods of small DATA frames scales with the connection window.
pub const H2_STREAM_WINDOW: u32 = 1024 * 1024;
/// HTTP/2 flow-control window of a whole sidecar-to-sidecar connection (bytes).
/// h2 allows buffered small DATA frames worth half of it (see h2's
/// `DataFrameBudget`): 8 MiB, about 34 000 one-byte frames.
pub const H2_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Streams a peer may open at once on one inbound connection (HTTP/2
/// SETTINGS_MAX_CONCURRENT_STREAMS). The caller's pool opens another
/// connection when every one it has is at the limit the peer advertised.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Largest HTTP/2 frame payload a sidecar accepts from another
/// (SETTINGS_MAX_FRAME_SIZE, RFC 9113 6.5.2; bytes). Above the 16 KiB
/// default so a tunnel's bulk data crosses in fewer frames, each one poll of
/// the stream and one read at the far end.
pub const H2_MAX_FRAME_SIZE: u32 = 64 * 1024;
/// Bytes a TCP tunnel copies per read, in each direction (tokio's default is
/// 8 KiB): each chunk written into an HTTP/2 stream is a copy, a channel
/// send and a wake-up of the stream's task, so bulk transfers want few,
/// large ones. Two such buffers per tunnel on each sidecar.
pub const TUNNEL_BUFFER: usize = 64 * 1024;
/// How often an HTTP/2 connection between sidecars is pinged by its client
/// (the caller's sidecar), and how long an unanswered ping may wait before
/// the connection is closed as dead.
pub const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// See [`H2_KEEP_ALIVE_INTERVAL`].
pub const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Has the kernel find a caller whose host vanished (no FIN, no RST) on a
/// peer's connection to the inbound listener, on the schedule of the
/// caller's HTTP/2 pings, so that the connection and its streams end:
/// - idle, by TCP keepalive: probes after [`H2_KEEP_ALIVE_INTERVAL`]
///   without traffic, three of them over [`H2_KEEP_ALIVE_TIMEOUT`];
/// - with bytes unacknowledged (a response streaming, WINDOW_UPDATEs of an
///   upload), when keepalive sends no probes, by `TCP_USER_TIMEOUT`: data
///   unacknowledged for the sum of the two, 30 s, ends the connection
///   (a caller that is alive but slow still acknowledges, with a zero
///   window if it must).
///
/// The kernel does this at no cost per request, where hyper's HTTP/2 server
/// keepalive takes a lock and reads the clock on every frame (~1–2 % of the
/// callee sidecar's instructions). The caller pings the connection itself,
/// so the server does not.
///
/// Errors: the socket refused an option (logged by the caller; the
/// connection is served without it).
pub fn set_peer_keepalive(tcp: &tokio::net::TcpStream) -> std::io::Result<()> {
    let probes = 3;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(H2_KEEP_ALIVE_INTERVAL)
        .with_interval(H2_KEEP_ALIVE_TIMEOUT / probes)
        .with_retries(probes);
    let sock = socket2::SockRef::from(tcp);
    sock.set_tcp_keepalive(&keepalive)?;
    sock.set_tcp_user_timeout(Some(H2_KEEP_ALIVE_INTERVAL + H2_KEEP_ALIVE_TIMEOUT))
}

/// The sidecar's per-hop limits, from its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest header section of a request or response, in bytes as HTTP/2
    /// counts them (RFC 9113 §6.5.2: name + value + 32 per field).
    pub max_header_bytes: usize,
    /// How long a client may take to send a request's headers, from its
    /// first byte (or from accept, for a connection's first request).
    pub header_read_timeout: Duration,
    /// How long a keep-alive connection may stay open with no request in flight.
    pub idle_timeout: Duration,
    /// Connections each listener serves at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// How long an idle connection to the local app is kept for reuse.
    pub app_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            app_idle_timeout: Duration::from_millis(500),
        }
    }
}

impl Limits {
    /// The bound given to hyper's and h2's parsers (HTTP/1.1 read buffer,
    /// HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE): twice the limit plus 16 KiB.
    /// Above the limit, so headers the sidecars add fit and the sidecar's own
    /// check answers first; bounded, so memory per connection stays bounded.
    pub fn parser_bytes(&self) -> usize {
        self.max_header_bytes.saturating_mul(2).saturating_add(16 * 1024)
    }

    /// [`Limits::parser_bytes`] as an HTTP/2 setting value.
    pub fn parser_bytes_u32(&self) -> u32 {
        u32::try_from(self.parser_bytes()).unwrap_or(u32::MAX)
    }

    /// How long the pool keeps a connection to a peer sidecar with no stream
    /// open: half the idle timeout, so the caller closes it before the peer's
    /// idle close (same flags mesh-wide) could race a new request.
    pub fn pool_idle_timeout(&self) -> Duration {
        self.idle_timeout / 2
    }
}

/// The size of a header section as HTTP/2 counts it (RFC 9113 §6.5.2,
/// RFC 7541 §4.1): per field, name length + value length + 32 bytes.
pub fn header_list_size(headers: &HeaderMap) -> usize {
    headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 32).sum()
}

/// The size of a request's header section, pseudo-header fields (method,
/// target) included.
pub fn request_header_size<B>(req: &http::Request<B>) -> usize {
    let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len())
        + req.uri().authority().map_or(0, |a| a.as_str().len());
    header_list_size(req.headers()) + req.method().as_str().len() + target + 2 * 32
}

/// Whether `err` (or an error it wraps) is a parser refusing a header section
/// as too large: hyper's HTTP/1.1 head over its buffer.
pub fn is_header_overflow(err: &(dyn std::error::Error + 'static)) -> bool {
    crate::error::chain(err).any(|e| e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_parse_too_large))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_size_counts_names_values_and_32_per_field() {
        let mut h = HeaderMap::new();
        h.insert("cookie", "a".repeat(100).parse().unwrap());
        h.append("x-a", "bc".parse().unwrap());
        assert_eq!(header_list_size(&h), (6 + 100 + 32) + (3 + 2 + 32));
        let req = http::Request::get("http://api/x?y").header("cookie", "z").body(()).unwrap();
        assert_eq!(request_header_size(&req), (6 + 1 + 32) + 3 + ("/x?y".len() + 3) + 64);
    }

    #[test]
    fn parsers_get_room_above_the_limit() {
        let l = Limits { max_header_bytes: 64 * 1024, ..Limits::default() };
        assert_eq!(l.parser_bytes(), 144 * 1024);
        assert_eq!(Limits { max_header_bytes: usize::MAX, ..l }.parser_bytes_u32(), u32::MAX);
        assert_eq!(l.pool_idle_timeout(), Duration::from_secs(30));
    }
}
