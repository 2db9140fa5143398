//! The sidecar's and control plane's logs, read from a real run: plain
//! text (no colour codes in a file), values are plain (no Rust `Some(…)` / `None`), times are RFC 3339, never a raw
//! Unix timestamp. The run goes through the events whose fields printed
//! otherwise: an SVID renewal (its expiry), the local app's HTTP version
//! probed on the first request, and the config stream broken by a control
//! plane restart.

use std::time::{Duration, Instant};

use http::Method;
use weft_testkit::mesh::App;
use weft_testkit::{servers, ControlPlane, Sidecar, SidecarSpec};

const TD: &str = "example.org";

/// Lines of `log` that print an Option's Debug form or a raw Unix time
/// after a field whose name says it is a time.
fn unplain_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|line| {
            let debug_option = line.contains("Some(") || line.split([' ', '=', ',', '(']).any(|w| w == "None");
            let raw_time = ["expires=", "expiry=", "expires_at=", "not_after="].iter().any(|field| {
                line.match_indices(field).any(|(i, f)| {
                    let value: String = line[i + f.len()..].chars().take_while(|c| !c.is_whitespace()).collect();
                    !value.is_empty() && value.chars().all(|c| c.is_ascii_digit())
                })
            });
            debug_option || raw_time
        })
        .collect()
}

#[test]
fn the_check_finds_what_it_must() {
    let bad = "2026-11-30T00:00:00Z  WARN weft_proxy: config stream ended control_plane=Some(127.0.0.1:7443)\n\
               INFO renewed SVID spiffe_id=spiffe://td/a expires=1764460800\n\
               INFO probed the local app's HTTP version app=127.0.0.1:1 version=Http1 speaks=None";
    assert_eq!(unplain_lines(bad).len(), 3, "{:?}", unplain_lines(bad));
    let good = "INFO renewed SVID spiffe_id=spiffe://td/a expires=2026-11-30T01:00:00Z\n\
                WARN config stream ended control_plane=none\n\
                INFO no service named \"Nonesuch\"";
    assert!(unplain_lines(good).is_empty(), "{:?}", unplain_lines(good));
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_print_plain_values_and_rfc3339_times() {
    // A short SVID lifetime, so the sidecars renew (and log the expiry) within the test.
    let mut cp = ControlPlane::start(TD, &["--svid-ttl", "6s"]).await;
    let api_app = servers::http("api").await;
    let web_app = servers::http("web").await;
    let api = Sidecar::start(&cp, TD, SidecarSpec::new("api", api_app.addr)).await;
    let web = Sidecar::start(&cp, TD, SidecarSpec::new("web", web_app.addr)).await;
    web.wait_endpoints("api", 1, Duration::from_secs(10)).await;
    let app = App::of(&web);
    let r = app.send(Method::GET, "api", "/", &[]).await.expect("request through the mesh");
    assert_eq!(r.status, 200, "{}", r.body);

    cp.restart().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let wanted = ["renewed SVID", "probed the local app's HTTP version", "config stream"];
    loop {
        let log = api.proc_.log_text();
        if wanted.iter().all(|w| log.contains(w)) {
            break;
        }
        assert!(Instant::now() < deadline, "the run did not log {wanted:?} within 30 s; log:\n{log}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A request after the restart, so the sidecars have logged what followed it.
    let r = app.send(Method::GET, "api", "/", &[]).await.expect("request after the restart");
    assert_eq!(r.status, 200, "{}", r.body);

    for (name, log) in
        [("api sidecar", api.proc_.log_text()), ("web sidecar", web.proc_.log_text()), ("control plane", cp.log_text())]
    {
        assert!(!log.is_empty(), "{name} logged nothing");
        assert!(!log.contains('\x1b'), "{name}'s log file has ANSI colour codes");
        let bad = unplain_lines(&log);
        assert!(bad.is_empty(), "{name} logs Rust debug values or raw Unix times:\n{}", bad.join("\n"));
    }
}
