//! gRPC as the sidecar sees it (gRPC over HTTP/2, PROTOCOL-HTTP2.md in the
//! grpc/grpc repository): a request is gRPC when its `content-type` is
//! `application/grpc` or `application/grpc+<codec>`; the call's outcome is
//! the `grpc-status` in the response's trailers, or in its headers for a
//! trailers-only response. HTTP 200 says nothing about a gRPC call.
//!
//! [`ObservedBody`] watches a response body for its trailers, so that the
//! balancer, outlier detection and metrics learn the call's outcome when it
//! is known (at the end of the body), not when the headers arrive.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, CONTENT_TYPE};
use http_body::{Frame, SizeHint};

use crate::http::{Body, BodyError};

/// `grpc-status`: the call's status code (decimal).
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// `grpc-message`: the status message, percent-encoded ([`encode_message`]).
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// The gRPC status codes the sidecar uses or classifies (grpc/grpc
/// doc/statuscodes.md).
pub mod code {
    pub const OK: u32 = 0;
    pub const UNKNOWN: u32 = 2;
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const PERMISSION_DENIED: u32 = 7;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
    pub const UNAVAILABLE: u32 = 14;
    pub const DATA_LOSS: u32 = 15;
}

/// Whether `headers` (a request's or a response's) say gRPC.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| {
        let ct = ct.trim_start();
        ct.len() >= 16
            && ct[..16].eq_ignore_ascii_case("application/grpc")
            && matches!(ct.as_bytes().get(16), None | Some(b'+' | b';'))
    })
}

/// The `grpc-status` in `headers` (trailers, or the headers of a
/// trailers-only response), if there is a well-formed one.
pub fn status(headers: &HeaderMap) -> Option<u32> {
    headers.get(GRPC_STATUS)?.to_str().ok()?.trim().parse().ok()
}

/// Whether a call that ended with `code` counts against the endpoint that
/// answered it (outlier detection, the balancer's cost): the server-side
/// faults UNKNOWN (2), DEADLINE_EXCEEDED (4), INTERNAL (13), UNAVAILABLE (14)
/// and DATA_LOSS (15) — what HTTP's 5xx is for HTTP.
///
/// Not RESOURCE_EXHAUSTED (8): like HTTP 429 it is a quota or rate limit
/// (the mesh's own rate limits answer it), which another replica would
/// enforce as well; ejecting for it would only move the load around.
pub fn is_endpoint_failure(code: u32) -> bool {
    matches!(code, code::UNKNOWN | code::DEADLINE_EXCEEDED | code::INTERNAL | code::UNAVAILABLE | code::DATA_LOSS)
}

/// `grpc-message` encoding: bytes outside printable ASCII (0x20–0x7E), and
/// `%` itself, become `%XX` (upper-case hex) of their UTF-8 bytes.
pub fn encode_message(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for &b in msg.as_bytes() {
        if (0x20..=0x7E).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// How a watched response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Trailers with this `grpc-status`.
    Status(u32),
    /// The body ended without a `grpc-status` (a gRPC protocol error).
    NoStatus,
    /// The body failed (the stream was reset, the connection died).
    Error,
    /// The body was dropped before its end: the caller went away.
    Cancelled,
}

impl Outcome {
    /// The metrics' `grpc_status` label: the code, or `none` when the call
    /// ended without one.
    pub fn label(self) -> String {
        match self {
            Outcome::Status(c) => c.to_string(),
            _ => "none".into(),
        }
    }
}

type OnEnd = Box<dyn FnOnce(Outcome) + Send + Sync>;

/// A response body that tells `on_end` how it ended (once): at its
/// trailers, its end, its error, or when dropped unfinished.
pub struct ObservedBody {
    inner: Body,
    on_end: Option<OnEnd>,
}

impl ObservedBody {
    pub fn new(inner: Body, on_end: impl FnOnce(Outcome) + Send + Sync + 'static) -> Self {
        Self { inner, on_end: Some(Box::new(on_end)) }
    }

    fn end(&mut self, outcome: Outcome) {
        if let Some(f) = self.on_end.take() {
            f(outcome);
        }
    }
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let outcome = status(trailers).map_or(Outcome::NoStatus, Outcome::Status);
                    self.end(outcome);
                }
            }
            Poll::Ready(Some(Err(_))) => self.end(Outcome::Error),
            Poll::Ready(None) => self.end(Outcome::NoStatus),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        self.end(Outcome::Cancelled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http_body_util::{BodyExt, StreamBody};
    use std::sync::{Arc, Mutex};

    #[test]
    fn content_types() {
        let h = |ct: &str| {
            let mut m = HeaderMap::new();
            m.insert(CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            is_grpc(&m)
        };
        assert!(h("application/grpc") && h("application/grpc+proto") && h("Application/GRPC+json"));
        assert!(!h("application/grpc-web") && !h("application/json") && !h("text/plain"));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn failures_are_server_faults() {
        for c in [2, 4, 13, 14, 15] {
            assert!(is_endpoint_failure(c), "{c}");
        }
        for c in [0, 1, 3, 5, 7, 8, 12, 16] {
            assert!(!is_endpoint_failure(c), "{c}");
        }
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(encode_message("no endpoints for \"api\""), "no endpoints for \"api\"");
        assert_eq!(encode_message("50% done\n"), "50%25 done%0A");
        assert_eq!(encode_message("café"), "caf%C3%A9");
    }

    fn body(frames: Vec<Result<Frame<Bytes>, BodyError>>) -> Body {
        crate::http::boxed(StreamBody::new(futures::stream::iter(frames)))
    }

    fn watched(frames: Vec<Result<Frame<Bytes>, BodyError>>) -> (ObservedBody, Arc<Mutex<Vec<Outcome>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (ObservedBody::new(body(frames), move |o| s.lock().unwrap().push(o)), seen)
    }

    #[tokio::test]
    async fn reports_the_trailers_status_once() {
        let mut t = HeaderMap::new();
        t.insert(GRPC_STATUS, HeaderValue::from_static("14"));
        let (b, seen) = watched(vec![Ok(Frame::data(Bytes::from_static(b"x"))), Ok(Frame::trailers(t))]);
        let collected = b.collect().await.unwrap();
        assert_eq!(status(collected.trailers().unwrap()), Some(14), "trailers pass through");
        assert_eq!(*seen.lock().unwrap(), [Outcome::Status(14)]);

        let (b, seen) = watched(vec![Ok(Frame::data(Bytes::from_static(b"x")))]);
        b.collect().await.unwrap();
        assert_eq!(*seen.lock().unwrap(), [Outcome::NoStatus]);

        let (b, seen) = watched(vec![Err(BodyError::new(std::io::Error::other("reset")))]);
        assert!(b.collect().await.is_err());
        assert_eq!(*seen.lock().unwrap(), [Outcome::Error]);

        let (b, seen) = watched(vec![Ok(Frame::data(Bytes::from_static(b"x")))]);
        drop(b);
        assert_eq!(*seen.lock().unwrap(), [Outcome::Cancelled]);
    }
}
