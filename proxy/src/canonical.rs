//! The one canonical form of a request, computed once at each edge (the
//! caller's sidecar before routing, the callee's sidecar before
//! authorization and rate limits), so that routing, authorization, rate
//! limits, metrics and the app all see the same request.
//!
//! The path and host rules are in `weft_config::canonical` (shared with
//! config validation, which refuses paths no canonical request could
//! match); this module applies them to an `http` request in place.
//! docs/config.md "Request canonicalization" is the user view.

use std::borrow::Cow;

use http::header::{HeaderValue, HOST};
use http::uri::{Authority, PathAndQuery, Uri};
use http::Method;

pub use weft_config::canonical::{
    canonical_host, canonical_path, shown, CanonicalError, EncodedSlashes, MAX_HOST_LEN, MAX_PATH_LEN,
};

// ---------------------------------------------------------------- request

/// What [`canonicalize`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalRequest {
    /// The canonical host: the service the request is for.
    pub service: String,
    /// Whether the target or Host was rewritten (it was not canonical).
    pub rewritten: bool,
}

/// Canonicalizes a request in place: its target becomes the canonical path
/// and query ([`canonical_path`]), its authority and Host header the
/// canonical host ([`canonical_host`]).
///
/// The host comes from the target's authority (absolute-form, or HTTP/2
/// `:authority`) and the Host header. More than one Host header is refused
/// (RFC 9112 §3.2), and so is a Host that names another host than the
/// authority (RFC 9113 §8.3.1) — compared once canonical, so ports are not
/// compared. Neither is [`CanonicalError::MissingHost`]. A Host header is
/// rewritten if present, never added.
///
/// `CONNECT` targets (authority-form) have no path: only the host is checked
/// and the target is left as is (a tunnel needs its port).
///
/// The HTTP parser has already removed any fragment from `parts.uri`, so a
/// fragment never reaches the path here.
pub fn canonicalize(
    parts: &mut http::request::Parts,
    slashes: EncodedSlashes,
) -> Result<CanonicalRequest, CanonicalError> {
    let mut hosts = parts.headers.get_all(HOST).iter();
    let header = hosts.next();
    if let Some(second) = hosts.next() {
        let text = |v: &HeaderValue| shown(&String::from_utf8_lossy(v.as_bytes()));
        return Err(CanonicalError::ConflictingHost {
            first: text(header.expect("a second Host header follows a first")),
            second: text(second),
        });
    }
    let header = match header {
        Some(v) => Some(v.to_str().map_err(|_| CanonicalError::BadHost {
            host: shown(&String::from_utf8_lossy(v.as_bytes())),
            why: "not visible ASCII",
        })?),
        None => None,
    };
    let authority = parts.uri.authority().map(Authority::as_str);
    let host = match (authority, header) {
        (Some(a), Some(h)) => {
            let (ca, ch) = (canonical_host(a)?, canonical_host(h)?);
            if ca != ch {
                return Err(CanonicalError::ConflictingHost { first: shown(a), second: shown(h) });
            }
            ca
        }
        (Some(a), None) => canonical_host(a)?,
        (None, Some(h)) => canonical_host(h)?,
        (None, None) => return Err(CanonicalError::MissingHost),
    }
    .into_owned();

    let header_changes = header.is_some_and(|h| h != host);
    let authority_changes = authority.is_some_and(|a| a != host);
    let mut rewritten = false;
    if header_changes {
        let value = HeaderValue::from_str(&host).map_err(|e| CanonicalError::BadTarget(e.to_string()))?;
        parts.headers.insert(HOST, value);
        rewritten = true;
    }
    if parts.method == Method::CONNECT {
        return Ok(CanonicalRequest { service: host, rewritten });
    }

    let raw = parts.uri.path_and_query().map(PathAndQuery::as_str).unwrap_or("/");
    let path = match canonical_path(raw, slashes)? {
        Cow::Borrowed(_) => None,
        Cow::Owned(p) => Some(p),
    };
    if path.is_some() || authority_changes {
        let bad_target = |e: &dyn std::fmt::Display| CanonicalError::BadTarget(e.to_string());
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        if let Some(p) = path {
            uri.path_and_query = Some(PathAndQuery::try_from(p).map_err(|e| bad_target(&e))?);
        }
        if authority_changes {
            uri.authority = Some(Authority::try_from(host.as_str()).map_err(|e| bad_target(&e))?);
        }
        parts.uri = Uri::from_parts(uri).map_err(|e| bad_target(&e))?;
        rewritten = true;
    }
    Ok(CanonicalRequest { service: host, rewritten })
}

#[cfg(test)]
mod tests {
    use super::*;
    use EncodedSlashes::Reject;

    fn parts(method: &str, target: &str, hosts: &[&[u8]]) -> http::request::Parts {
        let mut b = http::Request::builder().method(method).uri(target);
        for h in hosts {
            b = b.header(HOST, HeaderValue::from_bytes(h).expect("header value"));
        }
        b.body(()).expect("request").into_parts().0
    }

    #[test]
    fn a_request_is_rewritten_in_place() {
        let mut p = parts("GET", "//%61dmin/./users?q=1", &[b"Backend.:8080"]);
        let c = canonicalize(&mut p, Reject).unwrap();
        assert_eq!(c, CanonicalRequest { service: "backend".into(), rewritten: true });
        assert_eq!(p.uri, "/admin/users?q=1");
        assert_eq!(p.headers[HOST], "backend");

        // Absolute-form (or HTTP/2 :authority): the authority is rewritten too.
        let mut p = parts("GET", "http://Backend:8080/a//b", &[b"backend"]);
        let c = canonicalize(&mut p, Reject).unwrap();
        assert_eq!(c.service, "backend");
        assert_eq!(p.uri.to_string(), "http://backend/a/b");
        assert_eq!(p.headers[HOST], "backend");

        // No Host header (HTTP/2): none is added.
        let mut p = parts("GET", "http://backend./x", &[]);
        assert_eq!(canonicalize(&mut p, Reject).unwrap().service, "backend");
        assert_eq!(p.uri.to_string(), "http://backend/x");
        assert!(p.headers.get(HOST).is_none());
    }

    #[test]
    fn a_canonical_request_is_left_alone() {
        let mut p = parts("GET", "/admin/users?q=1", &[b"backend"]);
        let before = p.uri.clone();
        let c = canonicalize(&mut p, Reject).unwrap();
        assert_eq!(c, CanonicalRequest { service: "backend".into(), rewritten: false });
        assert_eq!(p.uri, before);
        let mut p = parts("GET", "http://backend/a", &[]);
        assert!(!canonicalize(&mut p, Reject).unwrap().rewritten);
    }

    #[test]
    fn conflicting_or_missing_authority_is_refused() {
        let kind = |method: &str, target: &str, hosts: &[&[u8]]| {
            canonicalize(&mut parts(method, target, hosts), Reject).map(|c| c.service).map_err(|e| e.kind())
        };
        assert_eq!(kind("GET", "/a", &[b"backend", b"admin"]), Err("conflicting_host"));
        assert_eq!(kind("GET", "/a", &[b"backend", b"backend"]), Err("conflicting_host"));
        assert_eq!(kind("GET", "http://backend/a", &[b"admin"]), Err("conflicting_host"));
        assert_eq!(kind("GET", "http://backend:80/a", &[b"BACKEND.:8080"]), Ok("backend".into()));
        assert_eq!(kind("GET", "/a", &[]), Err("missing_host"));
        assert_eq!(kind("GET", "/a", &[b""]), Err("empty_host"));
        assert_eq!(kind("GET", "/a", &[b"back\xffend"]), Err("bad_host"));
        assert_eq!(kind("GET", "http://user@backend/a", &[]), Err("bad_host"));
        assert_eq!(kind("OPTIONS", "*", &[b"backend"]), Err("not_origin_form"));
        assert_eq!(kind("GET", "/admin%2Fusers", &[b"backend"]), Err("encoded_slash"));
        assert_eq!(kind("GET", "/a", &[b"backend:99999"]), Err("bad_port"));
    }

    #[test]
    fn connect_keeps_its_target() {
        let mut p = parts("CONNECT", "Backend:8080", &[b"backend:8080"]);
        let c = canonicalize(&mut p, Reject).unwrap();
        assert_eq!(c.service, "backend");
        assert_eq!(p.uri.to_string(), "Backend:8080");
        assert_eq!(p.headers[HOST], "backend");
    }

    #[test]
    fn the_http_parser_drops_fragments_before_we_see_them() {
        // Why canonicalize() cannot refuse a fragment: http::Uri removes it.
        let mut p = parts("GET", "/admin/users#frag", &[b"backend"]);
        assert_eq!(p.uri.path(), "/admin/users");
        assert!(!canonicalize(&mut p, Reject).unwrap().rewritten);
    }
}
