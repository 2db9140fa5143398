//! HTTP plumbing shared by inbound and outbound: the body type, hop-by-hop
//! header handling, and how HTTP/1.1 travels as HTTP/2 between sidecars.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BodyError>;

/// The error of any body the sidecar relays, and (boxed, as
/// [`crate::error::PeerError`]) of a stream to a peer's sidecar. A concrete
/// type rather than a boxed trait object keeps hyper's `Send` bounds
/// provable in spawned tasks.
#[derive(Debug)]
pub struct BodyError(BoxError);

impl BodyError {
    pub fn new(e: impl Into<BoxError>) -> Self {
        Self(e.into())
    }
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Which protocol the calling app spoke, so the far side can restore it.
pub const APP_PROTOCOL: HeaderName = HeaderName::from_static("weft-app-protocol");
/// The caller's verified SPIFFE ID, set by the inbound sidecar for the app.
pub const PEER_ID: HeaderName = HeaderName::from_static("x-weft-peer-id");
/// On a callee sidecar's 5xx: the request never reached its app (the app
/// refused the connection), so the caller may send it to another endpoint
/// whatever its method. Value: why (`app-refused`). Never taken from an app.
pub const UNSENT: HeaderName = HeaderName::from_static("weft-unsent");
/// A caller sidecar's probe of an ejected endpoint: the callee sidecar
/// answers it itself (204 when its app accepts connections, else a 503
/// with [`UNSENT`]), never forwarding it to the app.
pub const PROBE: HeaderName = HeaderName::from_static("weft-probe");

pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(|e| BodyError(e.into())).boxed()
}

/// A plain-text response made by the sidecar itself.
pub fn local_response(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut msg = msg.into();
    msg.push('\n');
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header("server", "weft")
        .body(boxed(Full::new(Bytes::from(msg))))
        .expect("static response parts are valid")
}

/// Removes connection-specific headers that must not cross a hop (RFC 9110
/// 7.6.1), including any named by `Connection`. `te: trailers` is kept for gRPC.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the few names a message has first: most carry none of
    // these, and the scan costs less than a hashed removal per name.
    if !headers.keys().any(|n| is_hop_by_hop(n) || n == header::TE) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(str::trim).map(str::to_ascii_lowercase).collect::<Vec<_>>())
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(n);
    }
    if headers.get(header::TE).is_some_and(|v| v != HeaderValue::from_static("trailers")) {
        headers.remove(header::TE);
    }
}

/// The fields [`strip_hop_by_hop`] always removes.
fn is_hop_by_hop(n: &HeaderName) -> bool {
    n == header::CONNECTION
        || n == header::TRANSFER_ENCODING
        || n == header::UPGRADE
        || n == header::PROXY_AUTHORIZATION
        || n.as_str() == "keep-alive"
        || n.as_str() == "proxy-connection"
}

/// Gives every header value its own memory: all values copied into one
/// allocation of their total length, each value a slice of it (sensitivity
/// kept).
///
/// Why: hyper's HTTP/1 parser and h2's decoder hand out values as slices of
/// the connection's read buffer (8–16 KiB or more), and HPACK's encoder
/// keeps the values it indexes in its dynamic table (RFC 7541 2.3.2) for as
/// long as the connection lives. A value that changes per message (`date`,
/// a trace or request ID) is indexed anew each time, and each kept slice
/// pinned the whole buffer it came from: the callee's heap grew by ~20 KB
/// per 3,000 requests until the table's 4 KiB of entries pinned tens of
/// buffers. Call it on a message about to be encoded into a long-lived
/// HTTP/2 connection.
pub fn detach_header_values(headers: &mut HeaderMap) {
    let total: usize = headers.values().map(HeaderValue::len).sum();
    if total == 0 {
        return;
    }
    let mut all = bytes::BytesMut::with_capacity(total);
    for v in headers.values() {
        all.extend_from_slice(v.as_bytes());
    }
    let all = all.freeze();
    let mut at = 0;
    for v in headers.values_mut() {
        let end = at + v.len();
        // Valid before, so valid as a copy; a failure would leave the value as it was.
        if let Ok(mut own) = HeaderValue::from_maybe_shared(all.slice(at..end)) {
            own.set_sensitive(v.is_sensitive());
            *v = own;
        }
        at = end;
    }
}

/// A copy of a request head (method, URI, version, headers) without its
/// extensions: the sidecar's own per-request state, which a copy kept for
/// sending the request again does not need.
pub fn head_only(parts: &http::request::Parts) -> http::request::Parts {
    let mut req = http::Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req.into_parts().0
}

/// An empty body.
pub fn empty() -> Body {
    boxed(Empty::<Bytes>::new())
}

#[cfg(test)]
mod tests {
    #[test]
    fn detached_header_values_keep_their_bytes_and_leave_the_read_buffer() {
        use bytes::Bytes;
        use http::header::{HeaderMap, HeaderValue};
        // As hyper's parser does: values sliced out of one large read buffer.
        let mut buf = vec![b'x'; 16 * 1024];
        buf[100..129].copy_from_slice(b"Tue, 01 Dec 2026 04:30:00 GMT");
        buf[200..205].copy_from_slice(b"trace");
        let read_buf = Bytes::from(buf);
        let range = read_buf.as_ptr_range();
        let mut h = HeaderMap::new();
        h.insert("date", HeaderValue::from_maybe_shared(read_buf.slice(100..129)).unwrap());
        h.append("x-trace", HeaderValue::from_maybe_shared(read_buf.slice(200..205)).unwrap());
        let mut secret = HeaderValue::from_maybe_shared(read_buf.slice(200..203)).unwrap();
        secret.set_sensitive(true);
        h.append("x-trace", secret);
        h.insert("empty", HeaderValue::from_static(""));
        let before = h.clone();
        super::detach_header_values(&mut h);
        assert_eq!(h, before, "same names, values and order");
        for v in h.values() {
            assert!(!range.contains(&v.as_bytes().as_ptr()), "a value still points into the read buffer");
        }
        let sensitive: Vec<bool> = h.get_all("x-trace").iter().map(HeaderValue::is_sensitive).collect();
        assert_eq!(sensitive, [false, true]);
    }

    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-app"], "kept");
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h[header::TE], "trailers");
        // Each one alone is found by the first pass.
        for name in
            ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "proxy-authorization"]
        {
            let mut h = HeaderMap::new();
            h.insert(HeaderName::from_static(name), HeaderValue::from_static("x"));
            h.insert("x-app", HeaderValue::from_static("kept"));
            strip_hop_by_hop(&mut h);
            assert_eq!(h.len(), 1, "{name}");
        }
    }
}
