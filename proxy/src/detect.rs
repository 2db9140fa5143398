//! Protocol detection from the first bytes of a connection: which protocol
//! a client opened with, and whether a server answered an HTTP/2 preface.
//!
//! Pure functions on a byte prefix, no I/O: the caller reads, asks, and
//! reads more while the answer is [`Detection::NeedMore`]. They never panic
//! on any input (a fuzz target, `fuzz/fuzz_targets/detect.rs`, holds them to it).
//!
//! What is recognized, from the client's first bytes:
//! - HTTP/2 with prior knowledge: the connection preface
//!   `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n` (RFC 9113 3.4);
//! - a TLS ClientHello: a handshake record (content type 22, record
//!   version 3.x) whose first message is a ClientHello (type 1) (RFC 8446 5.1, 4);
//! - an HTTP/1.x request line: `method SP request-target SP HTTP/1.d`
//!   ending in CRLF (or a bare LF, which RFC 9112 2.2 lets a server accept),
//!   the method a token (RFC 9110 5.6.2), the target visible ASCII;
//! - anything else is opaque (e.g. a server-first protocol, or raw TCP).

/// What a client's first bytes say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// An HTTP/1.0 or HTTP/1.1 request line.
    Http1,
    /// The HTTP/2 prior-knowledge connection preface (h2c, or h2 after TLS).
    Http2,
    /// A TLS ClientHello record.
    Tls,
    /// None of the above.
    Opaque,
}

/// The answer for a prefix: a protocol, or too few bytes to tell yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detection {
    Known(Protocol),
    /// Every byte so far is consistent with a recognized protocol; read more.
    NeedMore,
}

/// The HTTP/2 client connection preface (RFC 9113 3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How many bytes of an HTTP/1.x request line are read before giving up
/// and calling the stream opaque (bytes). Request lines longer than this
/// are refused by most servers anyway (hyper's default limit is the same order).
pub const MAX_REQUEST_LINE: usize = 8 * 1024;

/// Classifies the first bytes a client sent. More bytes never change a
/// `Known` answer into another one, so a caller may stop reading at the
/// first `Known`. Past [`MAX_REQUEST_LINE`] bytes the answer is always `Known`.
pub fn detect(prefix: &[u8]) -> Detection {
    if prefix.is_empty() {
        return Detection::NeedMore;
    }
    let mut undecided = false;
    for check in [h2_preface, tls_client_hello, http1_request_line] {
        match check(prefix) {
            Detection::Known(Protocol::Opaque) => {}
            Detection::Known(p) => return Detection::Known(p),
            Detection::NeedMore => undecided = true,
        }
    }
    if undecided {
        Detection::NeedMore
    } else {
        Detection::Known(Protocol::Opaque)
    }
}

/// Whether `prefix` is (the start of) the HTTP/2 preface.
fn h2_preface(prefix: &[u8]) -> Detection {
    let n = prefix.len().min(H2_PREFACE.len());
    if prefix[..n] != H2_PREFACE[..n] {
        Detection::Known(Protocol::Opaque)
    } else if n == H2_PREFACE.len() {
        Detection::Known(Protocol::Http2)
    } else {
        Detection::NeedMore
    }
}

/// Whether `prefix` is (the start of) a TLS record carrying a ClientHello.
fn tls_client_hello(prefix: &[u8]) -> Detection {
    const HANDSHAKE: u8 = 22;
    const CLIENT_HELLO: u8 = 1;
    let fits = |i: usize, ok: fn(u8) -> bool| prefix.get(i).is_none_or(|&b| ok(b));
    let consistent = fits(0, |b| b == HANDSHAKE)
        // Record version 3.x: SSL 3.0 to TLS 1.3 (which keeps 3.1/3.3 on the wire).
        && fits(1, |b| b == 3)
        && fits(2, |b| b <= 4)
        // A record of at most 2^14 bytes (RFC 8446 5.1), and at least the
        // handshake header: the high length byte is at most 0x40.
        && fits(3, |b| b <= 0x40)
        && fits(5, |b| b == CLIENT_HELLO);
    let len_ok = match (prefix.get(3), prefix.get(4)) {
        (Some(&hi), Some(&lo)) => (4..=1 << 14).contains(&u16::from_be_bytes([hi, lo])),
        _ => true,
    };
    if !(consistent && len_ok) {
        Detection::Known(Protocol::Opaque)
    } else if prefix.len() >= 6 {
        Detection::Known(Protocol::Tls)
    } else {
        Detection::NeedMore
    }
}

/// A token character (RFC 9110 5.6.2).
fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether `prefix` is (the start of) an HTTP/1.x request line.
fn http1_request_line(prefix: &[u8]) -> Detection {
    let opaque = Detection::Known(Protocol::Opaque);
    let line = &prefix[..prefix.len().min(MAX_REQUEST_LINE)];
    // method
    let method_len = line.iter().take_while(|&&b| tchar(b)).count();
    let Some(&after_method) = line.get(method_len) else {
        return more_unless_full(prefix);
    };
    if method_len == 0 || after_method != b' ' {
        return opaque;
    }
    // request-target: visible ASCII (obs-text and controls are not allowed raw).
    let rest = &line[method_len + 1..];
    let target_len = rest.iter().take_while(|&&b| b.is_ascii_graphic()).count();
    let Some(&after_target) = rest.get(target_len) else {
        return more_unless_full(prefix);
    };
    if target_len == 0 || after_target != b' ' {
        return opaque;
    }
    // HTTP-version, then the line end.
    let rest = &rest[target_len + 1..];
    const VERSION: &[u8] = b"HTTP/1.";
    let n = rest.len().min(VERSION.len());
    if rest[..n] != VERSION[..n] {
        return opaque;
    }
    let Some(&minor) = rest.get(VERSION.len()) else {
        return more_unless_full(prefix);
    };
    if !minor.is_ascii_digit() {
        return opaque;
    }
    match rest.get(VERSION.len() + 1..VERSION.len() + 3) {
        Some([b'\r', b'\n']) => Detection::Known(Protocol::Http1),
        Some([b'\n', _]) => Detection::Known(Protocol::Http1),
        Some(_) => opaque,
        None => match rest.get(VERSION.len() + 1) {
            None | Some(b'\r') => more_unless_full(prefix),
            Some(b'\n') => Detection::Known(Protocol::Http1),
            Some(_) => opaque,
        },
    }
}

/// `NeedMore`, unless the request line has already run past its limit.
fn more_unless_full(prefix: &[u8]) -> Detection {
    if prefix.len() >= MAX_REQUEST_LINE {
        Detection::Known(Protocol::Opaque)
    } else {
        Detection::NeedMore
    }
}

/// Whether a server's first bytes, after it was sent [`H2_PREFACE`] and an
/// empty SETTINGS frame, show that it speaks HTTP/2: an HTTP/2 server's
/// first frame is its SETTINGS frame (RFC 9113 3.4): 9-byte frame header,
/// type 4, no ACK flag, stream 0, length a multiple of 6. `None`: fewer than
/// 9 bytes and nothing rules HTTP/2 out yet. An HTTP/1.x server answers with
/// a status line (`HTTP/1.1 505 ...`), whose first byte rules it out at once.
pub fn server_speaks_h2(reply: &[u8]) -> Option<bool> {
    const SETTINGS: u8 = 4;
    // The length is 24 bits; a SETTINGS frame is far below 2^16 bytes.
    if reply.first().is_some_and(|&b| b != 0) {
        return Some(false);
    }
    let header = reply.get(..9)?;
    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]);
    let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
    Some(header[3] == SETTINGS && header[4] & 1 == 0 && stream == 0 && len.is_multiple_of(6))
}

/// Whether a server's first bytes, after it was sent an HTTP/1.1 request,
/// are an HTTP/1.x status line (`HTTP/1.1 200 OK`, RFC 9112 4). `None`:
/// too few bytes, and all so far are those of `HTTP/1.`. An HTTP/2-only
/// server answers with its SETTINGS frame (first byte 0), or closes.
pub fn server_speaks_http1(reply: &[u8]) -> Option<bool> {
    const STATUS_LINE: &[u8] = b"HTTP/1.";
    let n = reply.len().min(STATUS_LINE.len());
    if reply[..n] != STATUS_LINE[..n] {
        Some(false)
    } else if n == STATUS_LINE.len() {
        Some(true)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(p: &[u8]) -> Option<Protocol> {
        match detect(p) {
            Detection::Known(p) => Some(p),
            Detection::NeedMore => None,
        }
    }

    /// The answer for every prefix of `full`: `NeedMore` until `at` bytes,
    /// then `want` for every longer prefix.
    fn settles(full: &[u8], at: usize, want: Protocol) {
        for n in 0..=full.len() {
            let got = known(&full[..n]);
            if n < at {
                assert_eq!(got, None, "{:?} ({n} bytes) decided too early", String::from_utf8_lossy(&full[..n]));
            } else {
                assert_eq!(got, Some(want), "{:?} ({n} bytes)", String::from_utf8_lossy(&full[..n]));
            }
        }
    }

    #[test]
    fn http1_request_lines() {
        let get = b"GET /index.html HTTP/1.1\r\nHost: a\r\n\r\n";
        settles(get, 26, Protocol::Http1);
        settles(b"OPTIONS * HTTP/1.0\n", 19, Protocol::Http1);
        settles(b"CONNECT db:5432 HTTP/1.1\r\n", 26, Protocol::Http1);
        settles(b"M-SEARCH * HTTP/1.1\r\n", 21, Protocol::Http1);
        assert_eq!(known(b"GET http://a/b?c=d HTTP/1.1\r\n"), Some(Protocol::Http1));
    }

    #[test]
    fn not_http1() {
        for p in [
            &b"GET  / HTTP/1.1\r\n"[..],
            b" GET / HTTP/1.1\r\n",
            b"GET / HTTP/2.0\r\n",
            b"GET / HTTP/1.x\r\n",
            b"GET / HTTP/1.1\rX",
            b"GET / HTTP/1.1x",
            b"GET /\x01 HTTP/1.1\r\n",
            b"GET /\xff HTTP/1.1\r\n",
            b"G(T / HTTP/1.1\r\n",
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"\0\0\0\0",
            b"GET /\r\n",
        ] {
            assert_eq!(known(p), Some(Protocol::Opaque), "{:?}", String::from_utf8_lossy(p));
        }
    }

    #[test]
    fn a_request_line_without_end_is_opaque_at_the_limit() {
        let mut long = b"GET /".to_vec();
        long.resize(MAX_REQUEST_LINE - 1, b'a');
        assert_eq!(known(&long), None);
        long.push(b'a');
        assert_eq!(known(&long), Some(Protocol::Opaque));
        long.extend_from_slice(b" HTTP/1.1\r\n");
        assert_eq!(known(&long), Some(Protocol::Opaque), "more bytes never change a Known answer");
    }

    #[test]
    fn h2_preface() {
        settles(H2_PREFACE, H2_PREFACE.len(), Protocol::Http2);
        let mut with_settings = H2_PREFACE.to_vec();
        with_settings.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(known(&with_settings), Some(Protocol::Http2));
        // "PRI * HTTP/2.0" is no HTTP/1.x request line, and a broken preface is nothing.
        assert_eq!(known(b"PRI * HTTP/2.0\r\n\r\nXX"), Some(Protocol::Opaque));
        assert_eq!(known(b"PRI * HTTP/1.1\r\n"), Some(Protocol::Http1));
    }

    #[test]
    fn tls_client_hello() {
        // A TLS 1.2/1.3 ClientHello record's start: handshake, 3.1, length 0x0200, type 1.
        let hello = [22u8, 3, 1, 2, 0, 1, 0, 1, 252, 3, 3];
        settles(&hello, 6, Protocol::Tls);
        assert_eq!(known(&[22, 3, 3, 0, 0x50, 1]), Some(Protocol::Tls));
        assert_eq!(known(&[22, 3, 1, 2, 0, 2]), Some(Protocol::Opaque), "a ServerHello");
        assert_eq!(known(&[23, 3, 3, 0, 5, 1]), Some(Protocol::Opaque), "application data");
        assert_eq!(known(&[22, 2, 0]), Some(Protocol::Opaque), "SSL 2 version");
        assert_eq!(known(&[22, 3, 1, 0x41, 0, 1]), Some(Protocol::Opaque), "record over 2^14 bytes");
        assert_eq!(known(&[22, 3, 1, 0, 3, 1]), Some(Protocol::Opaque), "record shorter than a handshake header");
    }

    #[test]
    fn empty_needs_more_and_nothing_panics_on_short_input() {
        assert_eq!(detect(b""), Detection::NeedMore);
        for b in 0..=255u8 {
            let _ = detect(&[b]);
            let _ = detect(&[b, b' ']);
            let _ = server_speaks_h2(&[b]);
        }
    }

    #[test]
    fn server_replies() {
        assert_eq!(server_speaks_h2(b""), None);
        assert_eq!(server_speaks_h2(b"HTTP/1.1 505 HTTP Version Not Supported\r\n"), Some(false));
        assert_eq!(server_speaks_h2(&[0, 0, 6]), None);
        // hyper's SETTINGS: 3 settings, 18 bytes.
        assert_eq!(server_speaks_h2(&[0, 0, 18, 4, 0, 0, 0, 0, 0, 0, 3]), Some(true));
        assert_eq!(server_speaks_h2(&[0, 0, 0, 4, 1, 0, 0, 0, 0]), Some(false), "a SETTINGS ACK first");
        assert_eq!(server_speaks_h2(&[0, 0, 8, 7, 0, 0, 0, 0, 0]), Some(false), "a GOAWAY first");
        assert_eq!(server_speaks_h2(&[0, 0, 6, 4, 0, 0, 0, 0, 1]), Some(false), "on a stream");

        assert_eq!(server_speaks_http1(b""), None);
        assert_eq!(server_speaks_http1(b"HTTP/"), None);
        assert_eq!(server_speaks_http1(b"HTTP/1.1 400 Bad Request"), Some(true));
        assert_eq!(server_speaks_http1(b"HTTP/1.0 200 OK"), Some(true));
        assert_eq!(server_speaks_http1(&[0, 0, 18, 4]), Some(false));
        assert_eq!(server_speaks_http1(b"HTTP/2"), Some(false));
    }
}
