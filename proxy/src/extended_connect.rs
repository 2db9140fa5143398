//! HTTP/1.1 exchanges that a plain HTTP/2 request cannot carry between
//! sidecars, carried on an extended CONNECT stream (RFC 8441) instead:
//!
//! - an **Upgrade** (RFC 9110 7.8): WebSocket or any other token. After the
//!   app's `101 Switching Protocols` the bytes are spliced both ways:
//!   caller app ↔ outbound ↔ h2 stream ↔ inbound ↔ app.
//! - **`Expect: 100-continue`** (RFC 9110 10.1.1): the caller's `100 Continue`
//!   must wait until the callee's sidecar has allowed the request, and
//!   hyper's HTTP/2 client cannot hear a 1xx. The CONNECT's `200` is that
//!   signal: until it arrives the caller's body is not read, so hyper (which
//!   sends `100 Continue` when a body is first read) sends none; a denial
//!   answers 403 with no 100 and without the body ever being sent.
//!
//! The CONNECT carries the whole request head — `:path` and `:authority`
//! the request's, the method in `weft-method`, `weft-exchange: upgrade |
//! continue`, the Upgrade value in `weft-upgrade`, and every end-to-end
//! header after the outbound routing step — so the callee's sidecar applies
//! the same authorization and rate limits as to any request (they see the
//! original method and path). Its `200` means "allowed, go"; any other
//! answer (403, 429, …) is the answer. After the 200 the stream carries one
//! HTTP/1.1 exchange, used only for framing (the body, the response with its
//! status and headers, then for a 101 the upgraded bytes): the inbound side
//! ignores the inner request's head and uses the CONNECT's, so a peer cannot
//! have one head authorized and another served.

use std::sync::{Arc, Mutex};

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::error::ProxyError;
use crate::http::Body;
use crate::metrics::{ConnLabels, Metrics, OpenConn};

/// The exchange a CONNECT carries: `upgrade` or `continue`.
pub const EXCHANGE: HeaderName = HeaderName::from_static("weft-exchange");
/// The carried request's method.
pub const METHOD: HeaderName = HeaderName::from_static("weft-method");
/// The carried request's `Upgrade` value (`Upgrade` itself is hop-by-hop).
pub const UPGRADE: HeaderName = HeaderName::from_static("weft-upgrade");

/// The `:protocol` of a carried `Expect: 100-continue` request (RFC 8441
/// wants a token; this one names no real protocol).
const CONTINUE_PROTOCOL: &str = "weft-100-continue";

/// Which exchange a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// An Upgrade to the protocols in the value (e.g. `websocket`).
    Upgrade(HeaderValue),
    /// `Expect: 100-continue` with a body.
    Continue,
}

/// Whether a comma-separated header has `token` (case-insensitive).
fn has_token(headers: &http::HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The exchange an app's HTTP/1.1 request needs, if any. `Upgrade: h2c`
/// is the upgrade to the sidecar's own hop's HTTP/2 and is not carried.
pub fn kind_of<B: http_body::Body>(req: &Request<B>) -> Option<Kind> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let headers = req.headers();
    if has_token(headers, header::CONNECTION, "upgrade") {
        if let Some(up) = headers.get(header::UPGRADE) {
            let h2c = up.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("h2c")));
            if !h2c && !up.is_empty() {
                return Some(Kind::Upgrade(up.clone()));
            }
        }
    }
    if has_token(headers, header::EXPECT, "100-continue") && !req.body().is_end_stream() {
        return Some(Kind::Continue);
    }
    None
}

/// Removes the headers only sidecars may set from an app's request, so an
/// app cannot make a plain request look like a carried exchange.
pub fn strip_internal(headers: &mut http::HeaderMap) {
    // A scan of the few names first: apps almost never send these.
    if !headers.keys().any(|n| n == EXCHANGE || n == METHOD || n == UPGRADE) {
        return;
    }
    for h in [EXCHANGE, METHOD, UPGRADE] {
        headers.remove(h);
    }
}

/// What the outbound side keeps of a carried request while its CONNECT is
/// in flight: the caller's body and the exchange. A request extension
/// (shared, so that the retry layer's copies of the head stay valid).
#[derive(Clone)]
pub struct Carried(Arc<Mutex<Option<(Kind, Method, Body)>>>);

/// The caller's side of an upgrade: resolves to the caller app's
/// connection once the outbound has answered it 101.
pub struct CallerUpgrade {
    pub on_upgrade: OnUpgrade,
    pub requested: HeaderValue,
    /// The caller's connection's drain (a request extension its listener
    /// set): held by the spliced connection, so a SIGTERM drain waits for it
    /// (up to `--drain-timeout`) as it does for a TCP tunnel. Once upgraded,
    /// the connection is no longer the HTTP server's, whose task ends at the 101.
    pub drain: Option<weft_runtime::drain::Drain>,
}

/// The Upgrade value of a carried 101 (a response extension; `Upgrade`
/// itself is stripped as hop-by-hop between the layers).
#[derive(Clone, Debug)]
pub struct UpgradedTo(pub HeaderValue);

/// Outbound, before routing: takes from an app's request what its exchange
/// needs (the caller's pending upgrade; the `Expect` that the outbound
/// answers itself). The request is then routed like any other.
pub fn take_caller(req: &mut Request<Incoming>, kind: &Kind) -> Option<CallerUpgrade> {
    match kind {
        Kind::Upgrade(v) => Some(CallerUpgrade {
            on_upgrade: hyper::upgrade::on(&mut *req),
            requested: v.clone(),
            drain: req.extensions().get::<weft_runtime::drain::Drain>().cloned(),
        }),
        Kind::Continue => {
            req.headers_mut().remove(header::EXPECT);
            None
        }
    }
}

/// Outbound, after routing: turns the routed request into the extended
/// CONNECT that carries it; its body waits in a [`Carried`] extension.
pub fn to_connect(req: Request<Body>, kind: Kind) -> Request<Body> {
    let (mut parts, body) = req.into_parts();
    let method = std::mem::replace(&mut parts.method, Method::CONNECT);
    if let Ok(m) = HeaderValue::from_str(method.as_str()) {
        parts.headers.insert(METHOD, m);
    }
    let protocol = match &kind {
        Kind::Upgrade(v) => {
            parts.headers.insert(EXCHANGE, HeaderValue::from_static("upgrade"));
            parts.headers.insert(UPGRADE, v.clone());
            // :protocol is one token: the first one offered.
            let first = v.to_str().ok().and_then(|v| v.split(',').next()).map(str::trim).unwrap_or_default();
            hyper::ext::Protocol::from(first)
        }
        Kind::Continue => {
            parts.headers.insert(EXCHANGE, HeaderValue::from_static("continue"));
            hyper::ext::Protocol::from_static(CONTINUE_PROTOCOL)
        }
    };
    // A CONNECT must not announce a body; the carried one follows the 200.
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.extensions.insert(protocol);
    parts.extensions.insert(Carried(Arc::new(Mutex::new(Some((kind, method, body))))));
    Request::from_parts(parts, crate::http::empty())
}

/// Outbound, on the CONNECT's answer: a non-2xx is the request's answer (a
/// denial, a rate limit…); a 2xx opens the stream, on which the carried
/// request is sent (for 100-continue, only now is the caller's body read)
/// and its response read. A 101 keeps its upgrade in the response's
/// extensions for [`splice`].
pub async fn finish(resp: Response<Incoming>, carried: Carried) -> Result<Response<Incoming>, hyper::Error> {
    let taken = carried.0.lock().unwrap_or_else(|e| e.into_inner()).take();
    let Some((kind, method, body)) = taken else { return Ok(resp) };
    if !resp.status().is_success() {
        return Ok(resp);
    }
    let stream = hyper::upgrade::on(resp).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(stream).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "carried exchange ended with an error");
        }
    });
    // The inner head is framing only; the far side uses the CONNECT's.
    let mut inner = Request::builder().method(method).uri("/").header(header::HOST, "weft");
    if let Kind::Upgrade(v) = &kind {
        inner = inner.header(header::CONNECTION, "upgrade").header(header::UPGRADE, v.clone());
    }
    let inner = inner.body(body).expect("a static request head is valid");
    let mut resp = sender.send_request(inner).await?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(v) = resp.headers().get(header::UPGRADE).cloned() {
            resp.extensions_mut().insert(UpgradedTo(v));
        }
    }
    Ok(resp)
}

/// Inbound: what the edge learned from a carried exchange's CONNECT (a
/// request extension read by the app service).
#[derive(Clone, Debug)]
pub struct Exchange {
    pub kind: Kind,
}

/// Inbound edge: restores a carried request's method from its CONNECT, so
/// that every layer (authorization, rate limits, metrics) sees the request
/// as the app sent it. Errors: an extended CONNECT that is no carried
/// exchange, or names a bad method (400).
pub fn accept<B>(req: &mut Request<B>) -> Result<(), ProxyError> {
    if req.method() != Method::CONNECT || req.extensions().get::<hyper::ext::Protocol>().is_none() {
        return Ok(());
    }
    let bad = |what| Err(ProxyError::BadExchange { what });
    let headers = req.headers_mut();
    let kind = match headers.remove(EXCHANGE).as_ref().map(HeaderValue::as_bytes) {
        Some(b"continue") => Kind::Continue,
        Some(b"upgrade") => match headers.remove(UPGRADE) {
            Some(v) if !v.is_empty() => Kind::Upgrade(v),
            _ => return bad("weft-upgrade is missing"),
        },
        _ => return bad("weft-exchange is missing or unknown"),
    };
    let method = headers.remove(METHOD).and_then(|m| Method::from_bytes(m.as_bytes()).ok());
    let Some(method) = method.filter(|m| *m != Method::CONNECT) else {
        return bad("weft-method is missing or not a request method");
    };
    *req.method_mut() = method;
    req.extensions_mut().insert(Exchange { kind });
    Ok(())
}

/// The inner HTTP/1.1 head a carried upgrade needs toward the app.
pub fn upgrade_headers(headers: &mut http::HeaderMap, value: &HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, value.clone());
}

/// Splices two upgraded connections until both directions end, counting the
/// connection (`protocol="upgrade"`) and its bytes; `hold` (a drain) is
/// held until then.
pub fn splice(
    a: OnUpgrade,
    b: OnUpgrade,
    metrics: Arc<Metrics>,
    direction: &'static str,
    hold: Option<weft_runtime::drain::Drain>,
) {
    tokio::spawn(async move {
        let _hold = hold;
        let (a, b) = match tokio::try_join!(a, b) {
            Ok(both) => both,
            Err(e) => return tracing::info!(direction, error = %e, "upgrade did not complete"),
        };
        let _open = OpenConn::new(&metrics, direction, "upgrade");
        let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
        match tokio::io::copy_bidirectional(&mut a, &mut b).await {
            Ok((x, y)) => {
                metrics.tcp_bytes.get_or_create(&ConnLabels { direction, protocol: "upgrade" }).inc_by(x + y);
            }
            Err(e) => tracing::debug!(direction, error = %e, "upgraded connection ended with an error"),
        }
    });
}

/// Marks the inbound `200` that opens a carried exchange: the request is
/// counted when the app has answered it, not at the 200 (a response extension).
#[derive(Clone, Copy, Debug)]
pub struct CountedLater;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::empty;
    use http_body_util::Full;

    fn req(headers: &[(&str, &str)], body: &'static str) -> Request<Full<bytes::Bytes>> {
        let mut b = Request::get("/chat").version(Version::HTTP_11);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Full::new(bytes::Bytes::from_static(body.as_bytes()))).unwrap()
    }

    #[test]
    fn which_requests_are_carried() {
        let ws = req(&[("connection", "keep-alive, Upgrade"), ("upgrade", "websocket")], "");
        assert_eq!(kind_of(&ws), Some(Kind::Upgrade(HeaderValue::from_static("websocket"))));
        assert!(kind_of(&req(&[("connection", "upgrade"), ("upgrade", "foo/1")], "")).is_some());
        assert_eq!(kind_of(&req(&[("upgrade", "websocket")], "")), None, "no Connection: upgrade");
        assert_eq!(kind_of(&req(&[("connection", "upgrade"), ("upgrade", "h2c")], "")), None);
        assert_eq!(kind_of(&req(&[("expect", "100-Continue")], "body")), Some(Kind::Continue));
        assert_eq!(kind_of(&req(&[("expect", "100-continue")], "")), None, "nothing to wait for");
        let mut h2 = req(&[("connection", "upgrade"), ("upgrade", "websocket")], "");
        *h2.version_mut() = Version::HTTP_2;
        assert_eq!(kind_of(&h2), None);
    }

    #[test]
    fn the_connect_carries_the_head_and_the_edge_restores_it() {
        let up = HeaderValue::from_static("websocket");
        let r = Request::post("http://api/chat?x=1")
            .header("sec-websocket-key", "k")
            .header("content-length", "0")
            .body(empty())
            .unwrap();
        let mut c = to_connect(r, Kind::Upgrade(up.clone()));
        assert_eq!(c.method(), Method::CONNECT);
        assert_eq!(c.uri(), "http://api/chat?x=1");
        assert_eq!(c.extensions().get::<hyper::ext::Protocol>().unwrap().as_str(), "websocket");
        assert!(c.extensions().get::<Carried>().is_some());
        assert!(c.headers().get("content-length").is_none());
        accept(&mut c).unwrap();
        assert_eq!(c.method(), Method::POST);
        assert_eq!(c.headers()["sec-websocket-key"], "k");
        assert!(c.headers().get(EXCHANGE).is_none() && c.headers().get(METHOD).is_none());
        assert_eq!(c.extensions().get::<Exchange>().unwrap().kind, Kind::Upgrade(up));

        // A plain CONNECT (a TCP tunnel) is left alone; a forged one is refused.
        let mut tcp = Request::connect("api:0").body(()).unwrap();
        accept(&mut tcp).unwrap();
        assert_eq!(tcp.method(), Method::CONNECT);
        let mut forged = Request::connect("http://api/x").body(()).unwrap();
        forged.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
        forged.headers_mut().insert(EXCHANGE, HeaderValue::from_static("continue"));
        forged.headers_mut().insert(METHOD, HeaderValue::from_static("CONNECT"));
        assert!(matches!(accept(&mut forged), Err(ProxyError::BadExchange { .. })));
    }

    #[test]
    fn apps_cannot_set_the_internal_headers() {
        let mut h = http::HeaderMap::new();
        h.insert(EXCHANGE, HeaderValue::from_static("upgrade"));
        h.insert(METHOD, HeaderValue::from_static("GET"));
        h.insert(UPGRADE, HeaderValue::from_static("x"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_internal(&mut h);
        assert_eq!(h.len(), 1);
    }
}
