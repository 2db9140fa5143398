//! The proxy's request canonicalization (proxy/src/canonical.rs) on
//! arbitrary input: never panics, and its output has the canonical form's
//! properties — idempotent (the canonical form is its own canonical form,
//! borrowed, not copied), no `//`, `/./`, `/../`, no encoded unreserved
//! characters, upper-case hex, query kept as is — in both slash modes.
#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../proxy/src/canonical.rs"]
mod canonical;

use canonical::{canonical_host, canonical_path, canonicalize, EncodedSlashes};

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> u8 {
    (b as char).to_digit(16).expect("a hex digit after '%'") as u8
}

fn check_path(raw: &str, slashes: EncodedSlashes) -> Option<String> {
    let out = canonical_path(raw, slashes).ok()?;
    if let Cow::Borrowed(b) = &out {
        assert_eq!(*b, raw);
    }
    match canonical_path(&out, slashes) {
        Ok(Cow::Borrowed(again)) => assert_eq!(again, &*out, "not idempotent"),
        other => panic!("{out:?} from {raw:?} is not canonical: {other:?}"),
    }
    let (path, query) = match out.find('?') {
        Some(q) => out.split_at(q),
        None => (&*out, ""),
    };
    // The query is the input's, byte for byte.
    assert_eq!(query, raw.find('?').map(|q| &raw[q..]).unwrap_or(""));
    assert!(path.starts_with('/'));
    for bad in ["//", "/./", "/../"] {
        assert!(!path.contains(bad), "{out:?} contains {bad:?}");
    }
    assert!(!path.ends_with("/.") && !path.ends_with("/.."), "{out:?}");
    assert!(!path.contains(';') && !path.contains('\\') && !path.contains('#'), "{out:?}");
    let b = path.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            let (hi, lo) = (b[i + 1], b[i + 2]);
            assert!(hi.is_ascii_hexdigit() && lo.is_ascii_hexdigit(), "{out:?}");
            assert!(!hi.is_ascii_lowercase() && !lo.is_ascii_lowercase(), "lower-case hex in {out:?}");
            let v = hex(hi) << 4 | hex(lo);
            assert!(!unreserved(v), "encoded unreserved character in {out:?}");
            assert!(v >= 0x20 && v != 0x7F, "encoded control character in {out:?}");
            if slashes == EncodedSlashes::Reject {
                assert!(v != b'/' && v != b'\\', "encoded slash in {out:?}");
            }
            i += 3;
        } else {
            assert!(c.is_ascii_graphic() && c != b'?', "raw byte {c:#x} in {out:?}");
            i += 1;
        }
    }
    Some(out.into_owned())
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let reject = check_path(s, EncodedSlashes::Reject);
    let opaque = check_path(s, EncodedSlashes::Opaque);
    // Opaque accepts all that reject accepts, and says the same about it.
    if let Some(r) = &reject {
        assert_eq!(Some(r), opaque.as_ref(), "{s:?}");
    }

    if let Ok(host) = canonical_host(s) {
        assert!(matches!(canonical_host(&host), Ok(Cow::Borrowed(_))), "{host:?} from {s:?}");
        assert!(!host.ends_with('.') && !host.bytes().any(|b| b.is_ascii_uppercase()), "{host:?}");
        assert!(host.starts_with('[') || !host.contains(':'), "{host:?} has a port");
    }

    // A whole request: the first line is the target, the rest Host headers.
    let mut lines = s.split('\n');
    let target = lines.next().unwrap_or_default();
    let mut b = http::Request::builder().uri(target);
    for h in lines {
        b = b.header(http::header::HOST, h);
    }
    let Ok(req) = b.body(()) else { return };
    let (mut parts, ()) = req.into_parts();
    for slashes in [EncodedSlashes::Reject, EncodedSlashes::Opaque] {
        let mut p = parts.clone();
        if let Ok(first) = canonicalize(&mut p, slashes) {
            let again = canonicalize(&mut p, slashes).expect("a canonical request is canonical");
            assert!(!again.rewritten, "{target:?} became {} and then changed again", p.uri);
            assert_eq!(again.service, first.service);
        }
    }
    let _ = canonicalize(&mut parts, EncodedSlashes::Reject);
});
