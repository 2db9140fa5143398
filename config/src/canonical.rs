//! The one canonical form of a request's target (path and query) and
//! authority (host), computed once at the edge so that routing,
//! authorization, rate limits, metrics and the app all see the same request.
//!
//! A policy that matches the raw path and an app that normalizes it disagree
//! about `//admin/users`, `/%61dmin/users` or `/a/../admin/users`; here every
//! spelling that means the same resource becomes one string, and what cannot
//! be given one meaning is refused ([`CanonicalError`], answered with 400).
//!
//! Path rules (RFC 3986 §6.2.2 syntax-based normalization, plus the mesh's
//! own stricter rules; docs/config.md "Request canonicalization" is the user
//! view):
//!
//! 1. The target must be origin-form (`/…`); an empty path is `/`. `*`
//!    (asterisk-form) is refused. Everything after the first `?` is the query.
//! 2. A fragment (`#`) is refused. Raw control characters (0x00–0x1F, 0x7F)
//!    and spaces are refused, in the path and in the query.
//! 3. Percent-encodings (`%XX`) must have two hex digits (`%zz`, `%4` and a
//!    lone `%` are refused). Encoded unreserved characters (ALPHA, DIGIT,
//!    `-`, `.`, `_`, `~`, §2.3) are decoded; every other encoding is kept with
//!    upper-case hex digits (§6.2.2.1). Encoded control characters (`%00`–`%1F`,
//!    `%7F`) are refused. `%25` stays `%25`: decoding happens once, so
//!    `%252F` is never `/`. Encoded bytes above 0x7F must form UTF-8
//!    (overlong forms such as `%C0%AE`, a "dot" to some decoders, are refused).
//! 4. An encoded `/` (`%2F`) or `\` (`%5C`), and a raw `\`, are refused, or,
//!    with [`EncodedSlashes::Opaque`], kept as `%2F` / `%5C` (a raw `\`
//!    becomes `%5C`): never a segment separator.
//! 5. A raw `;` (a path parameter, RFC 2396 §3.3, which servlet containers
//!    strip before matching and so would see `/admin;x=1/users` as
//!    `/admin/users`) is refused; a literal semicolon is sent as `%3B`, which
//!    stays encoded.
//! 6. Other bytes that may not appear raw in a path (`"<>[]^`{|}` and
//!    non-ASCII UTF-8) are percent-encoded.
//! 7. Empty segments are merged (`//` → `/`), then dot-segments are removed
//!    (§5.2.4), after decoding, so `%2e%2e` is `..`. A `..` that would climb
//!    above the root is refused rather than clamped.
//! 8. The query is kept byte for byte; it never changes the path.
//! 9. The path is at most [`MAX_PATH_LEN`] bytes, before and after.
//!
//! Host rules: see [`canonical_host`].
//!
//! The request-level step (one `http::Request`'s target and Host header) is
//! `weft_proxy::canonical::canonicalize`; config validation uses the path
//! rules to refuse route, policy and rate-limit paths no request could match.

use std::borrow::Cow;
use std::net::{Ipv4Addr, Ipv6Addr};

pub use crate::model::EncodedSlashes;

/// Longest path (bytes, without the query) accepted, both as received and
/// once canonical (encoding may lengthen it).
pub const MAX_PATH_LEN: usize = 8192;

/// Longest host name (bytes, without a trailing dot or port), RFC 1035 §2.3.4.
pub const MAX_HOST_LEN: usize = 253;

/// Longest DNS label (bytes), RFC 1035 §2.3.4.
const MAX_LABEL_LEN: usize = 63;

/// Why a request has no canonical form. Every variant is answered with 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalError {
    #[error("the request target must be a path starting with '/' (origin-form); got {0}")]
    NotOriginForm(String),
    #[error("the request target has a fragment ('#' at byte {at}); fragments are for the client, remove it")]
    Fragment { at: usize },
    #[error(
        "the request target has a raw control character or space (byte 0x{byte:02X} at byte {at}); percent-encode it"
    )]
    ControlChar { at: usize, byte: u8 },
    #[error("the path has an invalid percent-encoding at byte {at} (a '%' must be followed by two hex digits; send '%25' for a literal '%')")]
    BadPercentEncoding { at: usize },
    #[error("the path has an encoded control character (%{byte:02X} at byte {at}); paths may not contain control characters")]
    EncodedControl { at: usize, byte: u8 },
    #[error("the path has encoded bytes at byte {at} that are not UTF-8 (e.g. an overlong form); encode characters as UTF-8")]
    EncodedNotUtf8 { at: usize },
    #[error("the path has an encoded '{which}' at byte {at}; the mesh refuses it because apps disagree on whether it separates segments (Mesh spec.pathNormalization.encodedSlashes: opaque keeps it encoded instead)")]
    EncodedSlash { at: usize, which: char },
    #[error("the path has a raw '\\' at byte {at}; some apps treat it as '/', so the mesh refuses it (use '/', or Mesh spec.pathNormalization.encodedSlashes: opaque to send it as %5C)")]
    Backslash { at: usize },
    #[error("the path has a ';' path parameter at byte {at}; the mesh refuses path parameters (some apps ignore them when matching); send a literal ';' as %3B")]
    PathParameter { at: usize },
    #[error("the path climbs above the root with '..'")]
    AboveRoot,
    #[error("the path is {len} bytes{}; at most {max} are accepted", if *.canonical { " once canonical" } else { "" })]
    PathTooLong { len: usize, max: usize, canonical: bool },
    #[error("the request names no host: send a Host header (or an absolute-form target) naming the service")]
    MissingHost,
    #[error("the host is empty; name the service in the Host header")]
    EmptyHost,
    #[error("the host {host} is not valid: {why}")]
    BadHost { host: String, why: &'static str },
    #[error("the port in host {host} is not valid: it must be a number up to 65535")]
    BadPort { host: String },
    #[error("the request names two hosts ({first} and {second}); send exactly one Host header, agreeing with the request target")]
    ConflictingHost { first: String, second: String },
    #[error("the canonical request target is not a valid URI: {0}")]
    BadTarget(String),
}

impl CanonicalError {
    /// A short, stable name for the kind of problem (`encoded_slash`, …), for
    /// log fields and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotOriginForm(_) => "not_origin_form",
            Self::Fragment { .. } => "fragment",
            Self::ControlChar { .. } => "control_char",
            Self::BadPercentEncoding { .. } => "bad_percent_encoding",
            Self::EncodedControl { .. } => "encoded_control",
            Self::EncodedNotUtf8 { .. } => "encoded_not_utf8",
            Self::EncodedSlash { .. } => "encoded_slash",
            Self::Backslash { .. } => "backslash",
            Self::PathParameter { .. } => "path_parameter",
            Self::AboveRoot => "above_root",
            Self::PathTooLong { .. } => "path_too_long",
            Self::MissingHost => "missing_host",
            Self::EmptyHost => "empty_host",
            Self::BadHost { .. } => "bad_host",
            Self::BadPort { .. } => "bad_port",
            Self::ConflictingHost { .. } => "conflicting_host",
            Self::BadTarget(_) => "bad_target",
        }
    }
}

/// An attacker-supplied string for an error message: quoted, escaped, and cut
/// to a readable length.
pub fn shown(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        format!("{s:?}")
    } else {
        let mut end = MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{:?}…", &s[..end])
    }
}

// ---------------------------------------------------------------- bytes

/// RFC 3986 §2.3 unreserved.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Bytes that stand for themselves in a canonical path: pchar (§3.3) without
/// `;` (refused) or `%` (only as an encoding), plus the `/` separator.
fn is_raw_path_byte(b: u8) -> bool {
    is_unreserved(b) || matches!(b, b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':' | b'@')
}

fn is_control(b: u8) -> bool {
    b < 0x20 || b == 0x7F
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The byte a `%XX` at `b[i]` encodes.
fn percent_at(b: &[u8], i: usize) -> Result<u8, CanonicalError> {
    let hi = b.get(i + 1).copied().and_then(hex_value);
    let lo = b.get(i + 2).copied().and_then(hex_value);
    match (hi, lo) {
        (Some(hi), Some(lo)) => Ok(hi << 4 | lo),
        _ => Err(CanonicalError::BadPercentEncoding { at: i }),
    }
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn push_encoded(out: &mut String, b: u8) {
    out.push('%');
    out.push(HEX_UPPER[usize::from(b >> 4)] as char);
    out.push(HEX_UPPER[usize::from(b & 0xF)] as char);
}

/// One percent-encoded character at `b[i]` (`%XX`, or for a byte above 0x7F
/// the whole `%XX%XX…` UTF-8 sequence), checked against the rules; returns
/// the index after it and its bytes (1–4).
fn encoded_char(b: &[u8], i: usize, slashes: EncodedSlashes) -> Result<(usize, [u8; 4], usize), CanonicalError> {
    let first = percent_at(b, i)?;
    let mut buf = [first, 0, 0, 0];
    if first < 0x80 {
        if is_control(first) {
            return Err(CanonicalError::EncodedControl { at: i, byte: first });
        }
        if matches!(first, b'/' | b'\\') && slashes == EncodedSlashes::Reject {
            return Err(CanonicalError::EncodedSlash { at: i, which: first as char });
        }
        return Ok((i + 3, buf, 1));
    }
    let n = match first {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => return Err(CanonicalError::EncodedNotUtf8 { at: i }),
    };
    for (k, slot) in buf.iter_mut().enumerate().take(n).skip(1) {
        let j = i + 3 * k;
        if b.get(j) != Some(&b'%') {
            return Err(CanonicalError::EncodedNotUtf8 { at: i });
        }
        *slot = percent_at(b, j)?;
    }
    // std's decoder refuses overlong forms, surrogates and values past U+10FFFF.
    if std::str::from_utf8(&buf[..n]).is_err() {
        return Err(CanonicalError::EncodedNotUtf8 { at: i });
    }
    Ok((i + 3 * n, buf, n))
}

// ---------------------------------------------------------------- path

/// The canonical form of an origin-form request target (`/path?query`), by
/// the rules in the module docs. Borrows `raw` when it is canonical already
/// (no allocation on the hot path).
///
/// Errors: [`CanonicalError`] naming the first problem found, with its byte
/// offset in `raw`.
pub fn canonical_path(raw: &str, slashes: EncodedSlashes) -> Result<Cow<'_, str>, CanonicalError> {
    let (path, query) = match raw.find('?') {
        Some(q) => raw.split_at(q),
        None => (raw, ""),
    };
    if let Some(at) = raw.find('#') {
        return Err(CanonicalError::Fragment { at });
    }
    if let Some(at) = query.bytes().position(|b| is_control(b) || b == b' ') {
        return Err(CanonicalError::ControlChar { at: path.len() + at, byte: query.as_bytes()[at] });
    }
    if path.len() > MAX_PATH_LEN {
        return Err(CanonicalError::PathTooLong { len: path.len(), max: MAX_PATH_LEN, canonical: false });
    }
    if path.is_empty() {
        return Ok(Cow::Owned(format!("/{query}")));
    }
    if !path.starts_with('/') {
        return Err(CanonicalError::NotOriginForm(shown(path)));
    }
    if is_canonical(path, slashes) {
        return Ok(Cow::Borrowed(raw));
    }
    let mut out = rewrite(path, slashes)?;
    if out.len() > MAX_PATH_LEN {
        return Err(CanonicalError::PathTooLong { len: out.len(), max: MAX_PATH_LEN, canonical: true });
    }
    out.push_str(query);
    Ok(Cow::Owned(out))
}

/// True when `path` (starting with `/`) is canonical. False means "maybe
/// not": [`rewrite`] then decides, and reports any error.
fn is_canonical(path: &str, slashes: EncodedSlashes) -> bool {
    let b = path.as_bytes();
    let dot_or_empty = |seg: &[u8]| seg.is_empty() || seg == b"." || seg == b"..";
    let mut seg_start = 1;
    let mut i = 1;
    while i < b.len() {
        match b[i] {
            b'/' => {
                if dot_or_empty(&b[seg_start..i]) {
                    return false;
                }
                seg_start = i + 1;
                i += 1;
            }
            b'%' => match encoded_char(b, i, slashes) {
                Ok((next, buf, n)) => {
                    let decodes = n == 1 && is_unreserved(buf[0]);
                    if decodes || b[i..next].iter().any(u8::is_ascii_lowercase) {
                        return false;
                    }
                    i = next;
                }
                Err(_) => return false,
            },
            c if is_raw_path_byte(c) => i += 1,
            _ => return false,
        }
    }
    // A trailing empty segment is a trailing slash, which is kept.
    let last = &b[seg_start..];
    !(last == b"." || last == b"..")
}

/// The slow path: decode, encode, merge slashes and remove dot-segments.
fn rewrite(path: &str, slashes: EncodedSlashes) -> Result<String, CanonicalError> {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len() + 8);
    // Where each kept segment's '/' is in `out`, for '..'.
    let mut starts: Vec<usize> = Vec::new();
    let mut trailing_slash = false;
    let mut i = 0; // at a '/'
    loop {
        let mark = out.len();
        out.push('/');
        let mut j = i + 1;
        while j < b.len() && b[j] != b'/' {
            let c = b[j];
            match c {
                b'%' => {
                    let (next, buf, n) = encoded_char(b, j, slashes)?;
                    if n == 1 && is_unreserved(buf[0]) {
                        out.push(buf[0] as char);
                    } else {
                        for &e in &buf[..n] {
                            push_encoded(&mut out, e);
                        }
                    }
                    j = next;
                    continue;
                }
                b'\\' if slashes == EncodedSlashes::Reject => return Err(CanonicalError::Backslash { at: j }),
                b';' => return Err(CanonicalError::PathParameter { at: j }),
                b'#' => return Err(CanonicalError::Fragment { at: j }),
                c if is_control(c) || c == b' ' => return Err(CanonicalError::ControlChar { at: j, byte: c }),
                c if is_raw_path_byte(c) => out.push(c as char),
                // '\' (opaque), other ASCII not allowed raw, and UTF-8 bytes.
                c => push_encoded(&mut out, c),
            }
            j += 1;
        }
        let last = j == b.len();
        match &out[mark + 1..] {
            "" | "." => out.truncate(mark),
            ".." => {
                out.truncate(mark);
                let parent = starts.pop().ok_or(CanonicalError::AboveRoot)?;
                out.truncate(parent);
            }
            _ => {
                starts.push(mark);
                if last {
                    break;
                }
                i = j;
                continue;
            }
        }
        // Dropped a segment: if it was the last, the result ends in '/'
        // ("/a/." and "/a/b/.." are "/a/", §5.2.4).
        if last {
            trailing_slash = true;
            break;
        }
        i = j;
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(out)
}

// ---------------------------------------------------------------- host

/// The canonical host of an authority (`host[:port]`, as in a Host header or
/// a URI): lower-case, without a trailing dot and without the port. This is
/// the name requests are routed by (the service name).
///
/// - A name is dot-separated DNS labels (RFC 1035/1123: letters, digits, `-`
///   not at either end, 1–63 bytes each, at most [`MAX_HOST_LEN`] in all); one
///   trailing dot (a fully qualified name) is dropped.
/// - A name whose last label is numeric (or `0x…`) must be an IPv4 address in
///   dotted-decimal form (`127.1` and `0x7f.0.0.1` are refused: resolvers
///   disagree about them).
/// - An IPv6 literal is bracketed (`[::1]:8080`) and comes out in RFC 5952
///   form (`[::1]`); zone IDs and IPvFuture are refused.
/// - The port, when present, is digits up to 65535 (may be empty, RFC 3986 §3.2.3).
/// - User info (`user@`) and percent-encoding are refused.
///
/// Borrows `authority` when it is canonical already.
pub fn canonical_host(authority: &str) -> Result<Cow<'_, str>, CanonicalError> {
    let bad = |why| CanonicalError::BadHost { host: shown(authority), why };
    if authority.is_empty() {
        return Err(CanonicalError::EmptyHost);
    }
    if authority.contains('@') {
        return Err(bad("user info ('user@') is not allowed; send only host[:port]"));
    }
    let check_port = |port: &str| {
        if port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u32>().unwrap_or(0) <= 65535 {
            Ok(())
        } else {
            Err(CanonicalError::BadPort { host: shown(authority) })
        }
    };
    if let Some(rest) = authority.strip_prefix('[') {
        let (inner, after) = rest.split_once(']').ok_or_else(|| bad("an IPv6 literal needs a closing ']'"))?;
        match after.strip_prefix(':') {
            Some(port) => check_port(port)?,
            None if after.is_empty() => {}
            None => return Err(bad("only ':port' may follow an IPv6 literal")),
        }
        let addr: Ipv6Addr = inner.parse().map_err(|_| bad("not an IPv6 address (zone IDs are not accepted)"))?;
        let canonical = format!("[{addr}]");
        return Ok(if canonical == authority { Cow::Borrowed(authority) } else { Cow::Owned(canonical) });
    }
    let name = match authority.split_once(':') {
        Some((name, port)) => {
            check_port(port)?;
            name
        }
        None => authority,
    };
    // One trailing dot is the root of a fully qualified name.
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err(CanonicalError::EmptyHost);
    }
    if name.len() > MAX_HOST_LEN {
        return Err(bad("longer than 253 bytes"));
    }
    let mut last = "";
    for label in name.split('.') {
        if label.is_empty() {
            return Err(bad("has an empty label ('..', or a leading dot)"));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(bad("has a label longer than 63 bytes"));
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(bad("may contain only letters, digits, '-' and '.' (or be an IP address)"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("has a label starting or ending with '-'"));
        }
        last = label;
    }
    let numeric = last.bytes().all(|b| b.is_ascii_digit()) || last.starts_with("0x") || last.starts_with("0X");
    let canonical: Cow<'_, str> = if numeric {
        let addr: Ipv4Addr =
            name.parse().map_err(|_| bad("looks like an IPv4 address but is not in dotted-decimal form (a.b.c.d)"))?;
        Cow::Owned(addr.to_string())
    } else if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    };
    Ok(match canonical {
        Cow::Owned(s) if s == authority => Cow::Borrowed(authority),
        other => other,
    })
}
#[cfg(test)]
mod tests {
    use super::*;
    use EncodedSlashes::{Opaque, Reject};

    /// What a spelling should come out as: the canonical form, or the kind of error.
    enum Want {
        Is(&'static str),
        /// Canonical already: borrowed, not copied.
        Same,
        Err(&'static str),
    }
    use Want::{Err as Refused, Is, Same};

    /// Every canonical output: idempotent, borrowed when fed back (the fast
    /// path agrees with the slow one), and free of what canonical forms lack.
    fn assert_canonical_form(out: &str, slashes: EncodedSlashes) {
        match canonical_path(out, slashes) {
            Ok(Cow::Borrowed(again)) => assert_eq!(again, out),
            other => panic!("{out:?} is not a fixed point: {other:?}"),
        }
        let path = out.split('?').next().unwrap_or_default();
        assert!(path.starts_with('/'), "{out:?}");
        for bad in ["//", "/./", "/../"] {
            assert!(!path.contains(bad), "{out:?} contains {bad}");
        }
        assert!(!path.ends_with("/.") && !path.ends_with("/.."), "{out:?}");
        let b = path.as_bytes();
        for (i, _) in path.match_indices('%') {
            let v = percent_at(b, i).unwrap_or_else(|e| panic!("{out:?}: {e}"));
            assert!(!is_unreserved(v), "{out:?} has an encoded unreserved character at {i}");
            assert!(!b[i + 1..i + 3].iter().any(u8::is_ascii_lowercase), "{out:?}: lower-case hex at {i}");
        }
        assert!(!path.contains(';') && !path.contains('\\'), "{out:?}");
        assert!(path.bytes().all(|c| c == b'/' || c == b'%' || is_raw_path_byte(c)), "{out:?}");
    }

    fn check_paths(slashes: EncodedSlashes, table: &[(&str, Want)]) {
        for (raw, want) in table {
            let got = canonical_path(raw, slashes);
            match (want, &got) {
                (Same, Ok(Cow::Borrowed(out))) => assert_eq!(out, raw),
                (Is(w), Ok(out)) => assert_eq!(out, w, "{raw:?}"),
                (Refused(kind), Err(e)) => {
                    assert_eq!(e.kind(), *kind, "{raw:?}: {e}");
                    assert!(!e.to_string().is_empty());
                }
                _ => panic!("{raw:?} ({slashes:?}): got {got:?}"),
            }
            if let Ok(out) = got {
                assert_canonical_form(&out, slashes);
            }
        }
    }

    #[test]
    fn paths() {
        let long_ok = format!("/{}", "a".repeat(MAX_PATH_LEN - 1));
        let too_long = format!("/{}", "a".repeat(MAX_PATH_LEN));
        let grows_too_long = format!("/{}", "|".repeat(3000));
        let table: Vec<(&str, Want)> = vec![
            // Canonical already.
            ("/", Same),
            ("/admin/users", Same),
            ("/admin/users/", Same),
            ("/admin/users?x=1&y=%2F", Same),
            ("/ADMIN/users", Same),
            ("/a:b@c!$&'()*+,=-._~", Same),
            ("/a%20b", Same),
            ("/a%252Fb", Same),
            ("/a%252fb", Same),
            ("/a%3Bb", Same),
            ("/caf%C3%A9", Same),
            ("/public/...", Same),
            ("/public/..a/.b/a.", Same),
            ("/a/b?c?d", Same),
            (long_ok.as_str(), Same),
            // Empty path.
            ("", Is("/")),
            ("?a=b", Is("/?a=b")),
            // Merged slashes.
            ("//admin/users", Is("/admin/users")),
            ("///admin//users", Is("/admin/users")),
            ("/admin//users//", Is("/admin/users/")),
            ("//", Is("/")),
            // Encoded unreserved characters are decoded; hex upper-cased.
            ("/%61dmin/users", Is("/admin/users")),
            ("/%61%64%6D%69%6e/users", Is("/admin/users")),
            ("/%41dmin", Is("/Admin")),
            ("/%2D%2E%5F%7E", Is("/-._~")),
            ("/%7euser", Is("/~user")),
            ("/a%3bb", Is("/a%3Bb")),
            ("/a%3fb?x", Is("/a%3Fb?x")),
            ("/caf%c3%a9", Is("/caf%C3%A9")),
            ("/a%2a", Is("/a%2A")),
            // Raw bytes that may not appear in a path are encoded.
            ("/café", Is("/caf%C3%A9")),
            ("/a|b", Is("/a%7Cb")),
            ("/a{b}", Is("/a%7Bb%7D")),
            ("/a\"<>^`[]", Is("/a%22%3C%3E%5E%60%5B%5D")),
            ("/日本", Is("/%E6%97%A5%E6%9C%AC")),
            // Dot-segments (§5.2.4), after decoding.
            ("/admin/./users", Is("/admin/users")),
            ("/./admin/users", Is("/admin/users")),
            ("/admin/users/.", Is("/admin/users/")),
            ("/admin/x/../users", Is("/admin/users")),
            ("/public/../admin/users", Is("/admin/users")),
            ("/admin/users/..", Is("/admin/")),
            ("/a/b/c/../../d", Is("/a/d")),
            ("/a/./././b", Is("/a/b")),
            ("/a/.//b", Is("/a/b")),
            ("/.", Is("/")),
            ("/a/..", Is("/")),
            ("/%2e", Is("/")),
            ("/%2e/admin", Is("/admin")),
            ("/public/%2e%2e/admin/users", Is("/admin/users")),
            ("/public/%2E%2e/admin", Is("/admin")),
            ("/public/.%2e/admin", Is("/admin")),
            ("/a/%2E%2E/", Is("/")),
            ("/a/b/%2e%2E?x=1", Is("/a/?x=1")),
            ("/a//..//b", Is("/b")),
            // The query is kept as is and never changes the path.
            ("/admin/users?../x", Same),
            ("/admin/users?a=%zz&b=//&c=%", Same),
            ("//admin?q=/./", Is("/admin?q=/./")),
            ("/public/..?/admin", Is("/?/admin")),
            ("/a?caf\u{e9}", Same),
            // Not origin-form.
            ("*", Refused("not_origin_form")),
            ("admin/users", Refused("not_origin_form")),
            ("http://backend/admin", Refused("not_origin_form")),
            // Fragments.
            ("/admin#x", Refused("fragment")),
            ("/admin?x#y", Refused("fragment")),
            ("/#", Refused("fragment")),
            // Raw control characters and spaces, in path or query.
            ("/ad\0min", Refused("control_char")),
            ("/admin\r\nX-Evil: 1", Refused("control_char")),
            ("/a b", Refused("control_char")),
            ("/a\tb", Refused("control_char")),
            ("/a\u{7f}b", Refused("control_char")),
            ("/a?b c", Refused("control_char")),
            ("/a?b\0", Refused("control_char")),
            // Encoded control characters.
            ("/a%00b", Refused("encoded_control")),
            ("/admin%00.png", Refused("encoded_control")),
            ("/a%0d%0aX", Refused("encoded_control")),
            ("/a%7F", Refused("encoded_control")),
            ("/a%1f", Refused("encoded_control")),
            // Invalid percent-encodings.
            ("/a%zz", Refused("bad_percent_encoding")),
            ("/a%", Refused("bad_percent_encoding")),
            ("/a%4", Refused("bad_percent_encoding")),
            ("/a%4g", Refused("bad_percent_encoding")),
            ("/a%%41", Refused("bad_percent_encoding")),
            ("/a%C3%A", Refused("bad_percent_encoding")),
            ("/a%+1", Refused("bad_percent_encoding")),
            // Encoded bytes that are not UTF-8.
            ("/%c0%ae%c0%ae/admin", Refused("encoded_not_utf8")),
            ("/%C3", Refused("encoded_not_utf8")),
            ("/%C3%28", Refused("encoded_not_utf8")),
            ("/%C3x", Refused("encoded_not_utf8")),
            ("/%ed%a0%80", Refused("encoded_not_utf8")),
            ("/%ff", Refused("encoded_not_utf8")),
            ("/%80", Refused("encoded_not_utf8")),
            ("/%F4%90%80%80", Refused("encoded_not_utf8")),
            // Encoded slashes and backslashes (reject mode).
            ("/admin%2Fusers", Refused("encoded_slash")),
            ("/admin%2fusers", Refused("encoded_slash")),
            ("/a%5Cb", Refused("encoded_slash")),
            ("/a%5cb", Refused("encoded_slash")),
            ("/a/..%2F..%2Fadmin", Refused("encoded_slash")),
            ("/a\\b", Refused("backslash")),
            ("\\admin", Refused("not_origin_form")),
            ("/\\admin", Refused("backslash")),
            // Path parameters.
            ("/admin;x=1/users", Refused("path_parameter")),
            ("/public/..;/admin", Refused("path_parameter")),
            ("/a;", Refused("path_parameter")),
            ("/admin;jsessionid=1", Refused("path_parameter")),
            // Above the root.
            ("/..", Refused("above_root")),
            ("/../admin", Refused("above_root")),
            ("/a/../../admin", Refused("above_root")),
            ("/%2e%2e/admin", Refused("above_root")),
            ("/%2E./admin", Refused("above_root")),
            ("//../admin", Refused("above_root")),
            // Overlong.
            (too_long.as_str(), Refused("path_too_long")),
            (grows_too_long.as_str(), Refused("path_too_long")),
        ];
        assert!(table.len() >= 60);
        check_paths(Reject, &table);
    }

    #[test]
    fn opaque_slashes_are_kept_encoded() {
        check_paths(
            Opaque,
            &[
                ("/a%2Fb", Same),
                ("/a%5Cb", Same),
                ("/a%2fb", Is("/a%2Fb")),
                ("/a%5cb", Is("/a%5Cb")),
                ("/a\\b", Is("/a%5Cb")),
                ("\\a", Refused("not_origin_form")),
                ("/a/..%2f..%2fadmin", Is("/a/..%2F..%2Fadmin")),
                ("//admin%2Fusers/../x", Is("/x")),
                ("/admin%2F..%2Fusers", Is("/admin%2F..%2Fusers")),
                ("/%2F", Same),
                ("/%2e%2e%2f", Is("/..%2F")),
                // Everything else is as in reject mode.
                ("/%61dmin", Is("/admin")),
                ("/admin;x", Refused("path_parameter")),
                ("/a%00", Refused("encoded_control")),
            ],
        );
    }

    #[test]
    fn errors_say_where_and_what_to_do() {
        let e = canonical_path("/admin%2Fusers", Reject).unwrap_err();
        assert_eq!(e, CanonicalError::EncodedSlash { at: 6, which: '/' });
        assert!(e.to_string().contains("encodedSlashes: opaque"), "{e}");
        let e = canonical_path("/a;b", Reject).unwrap_err();
        assert!(e.to_string().contains("%3B"), "{e}");
        let e = canonical_path("/a?b\0", Reject).unwrap_err();
        assert_eq!(e, CanonicalError::ControlChar { at: 4, byte: 0 });
        // Attacker text in messages is escaped and cut short.
        let e = canonical_host(&format!("{}\n", "x".repeat(200))).unwrap_err();
        assert!(e.to_string().len() < 250 && !e.to_string().contains('\n'), "{e}");
    }

    #[test]
    fn hosts() {
        let long_label = "a".repeat(64);
        let long_name = ["a"; 128].join(".");
        let table: Vec<(&str, Want)> = vec![
            ("backend", Same),
            ("backend.default.svc", Same),
            ("a-b", Same),
            ("x1", Same),
            ("127.0.0.1", Same),
            ("[::1]", Same),
            ("BACKEND", Is("backend")),
            ("Backend:8080", Is("backend")),
            ("backend.", Is("backend")),
            ("backend.:80", Is("backend")),
            ("backend:", Is("backend")),
            ("backend:080", Is("backend")),
            ("Backend.Default.SVC.", Is("backend.default.svc")),
            ("127.0.0.1:8080", Is("127.0.0.1")),
            ("[::1]:8080", Is("[::1]")),
            ("[0:0:0:0:0:0:0:1]:80", Is("[::1]")),
            ("[2001:DB8::1]", Is("[2001:db8::1]")),
            ("[::ffff:127.0.0.1]", Is("[::ffff:127.0.0.1]")),
            ("", Refused("empty_host")),
            (":80", Refused("empty_host")),
            (".", Refused("empty_host")),
            ("backend..", Refused("bad_host")),
            (".backend", Refused("bad_host")),
            ("a..b", Refused("bad_host")),
            ("back end", Refused("bad_host")),
            ("back_end", Refused("bad_host")),
            ("ba%63kend", Refused("bad_host")),
            ("-backend", Refused("bad_host")),
            ("backend-", Refused("bad_host")),
            ("backend\0", Refused("bad_host")),
            ("user@backend", Refused("bad_host")),
            ("user:pw@backend:80", Refused("bad_host")),
            ("[::1", Refused("bad_host")),
            ("[::1]x", Refused("bad_host")),
            ("[fe80::1%25eth0]", Refused("bad_host")),
            ("[v1.x]", Refused("bad_host")),
            ("[backend]", Refused("bad_host")),
            ("127.1", Refused("bad_host")),
            ("0x7f.0.0.1", Refused("bad_host")),
            ("0177.0.0.1", Refused("bad_host")),
            ("1.2.3.256", Refused("bad_host")),
            ("backend.1", Refused("bad_host")),
            (long_label.as_str(), Refused("bad_host")),
            (long_name.as_str(), Refused("bad_host")),
            ("backend:http", Refused("bad_port")),
            ("backend:65536", Refused("bad_port")),
            ("backend:123456", Refused("bad_port")),
            ("backend:80:80", Refused("bad_port")),
            ("backend:-1", Refused("bad_port")),
            ("::1", Refused("bad_port")),
            ("[::1]:x", Refused("bad_port")),
        ];
        for (raw, want) in &table {
            let got = canonical_host(raw);
            match (want, &got) {
                (Same, Ok(Cow::Borrowed(out))) => assert_eq!(out, raw),
                (Is(w), Ok(out)) => assert_eq!(out, w, "{raw:?}"),
                (Refused(kind), Err(e)) => assert_eq!(e.kind(), *kind, "{raw:?}: {e}"),
                _ => panic!("{raw:?}: got {got:?}"),
            }
            if let Ok(out) = got {
                assert!(matches!(canonical_host(&out), Ok(Cow::Borrowed(_))), "{out:?} is not a fixed point");
            }
        }
    }
}
