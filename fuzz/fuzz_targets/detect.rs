//! The proxy's first-bytes protocol detection (proxy/src/detect.rs) on
//! arbitrary input: never panics, a `Known` answer never changes as more
//! bytes arrive (every prefix is `NeedMore` or the same answer), and past
//! the request-line limit the answer is always `Known`; the probe-answer
//! checks decide within their fixed lengths and never change an early answer.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../proxy/src/detect.rs"]
mod detect;

use detect::{detect, server_speaks_h2, server_speaks_http1, Detection, MAX_REQUEST_LINE};

fuzz_target!(|data: &[u8]| {
    let whole = detect(data);
    if data.len() >= MAX_REQUEST_LINE {
        assert_ne!(whole, Detection::NeedMore, "undecided after {} bytes", data.len());
    }
    // Checking every prefix is quadratic; a sample of lengths keeps runs fast.
    let step = (data.len() / 64).max(1);
    for n in (0..data.len()).step_by(step) {
        match detect(&data[..n]) {
            Detection::NeedMore => {}
            known => assert_eq!(known, whole, "{n} bytes said {known:?}, all {} bytes {whole:?}", data.len()),
        }
    }
    let reply = server_speaks_h2(data);
    if data.len() >= 9 {
        assert!(reply.is_some());
    }
    // A status-line answer is decided by 7 bytes, and early answers stand.
    let status = server_speaks_http1(data);
    if data.len() >= 7 {
        assert!(status.is_some());
    }
    for n in 0..data.len().min(7) {
        if let Some(early) = server_speaks_http1(&data[..n]) {
            assert_eq!(Some(early), status, "{n} bytes of {data:?}");
        }
    }
    // An early answer from fewer than 9 bytes is the final one.
    for n in 0..data.len().min(9) {
        if let Some(early) = server_speaks_h2(&data[..n]) {
            assert_eq!(Some(early), reply, "{n} bytes of {data:?}");
        }
    }
});
