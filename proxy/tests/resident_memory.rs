//! A ready sidecar does not keep start-up's code and read-only data resident
//! (issue 10, its memory): once its first config is applied it unmaps its
//! clean file-backed pages (`weft-mapped-pages`), again every
//! `--release-pages-every`, and keeps serving with what it runs mapped again
//! on first use.

use std::time::{Duration, Instant};

use http::Method;
use weft_testkit::mesh::App;
use weft_testkit::{metric_sum, servers, ControlPlane, Sidecar, SidecarSpec};

const TD: &str = "example.org";

/// From the sidecar's `released start-up pages: N KiB in M clean
/// file-backed mapping(s), A KiB of them resident right after` line: N, M, A.
fn released(log: &str) -> Option<(u64, usize, u64)> {
    let rest = log.lines().find_map(|l| l.split_once("released start-up pages: ").map(|(_, r)| r))?;
    let words: Vec<&str> = rest.split_whitespace().collect();
    Some((words.first()?.parse().ok()?, words.get(3)?.parse().ok()?, words.get(7)?.parse().ok()?))
}

#[test]
fn the_log_line_is_read() {
    let line = "2026-12-01T06:11:44Z  INFO weft_proxy: released start-up pages: 19220 KiB in 11 clean \
                file-backed mapping(s), 964 KiB of them resident right after";
    assert_eq!(released(line), Some((19220, 11, 964)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ready_sidecar_releases_start_up_pages_and_keeps_serving() {
    let cp = ControlPlane::start(TD, &[]).await;
    let api_app = servers::http("api").await;
    let web_app = servers::http("web").await;
    let api = Sidecar::start(&cp, TD, SidecarSpec::new("api", api_app.addr)).await;
    let web = Sidecar::start(
        &cp,
        TD,
        SidecarSpec { extra_args: &["--release-pages-every", "1s"], ..SidecarSpec::new("web", web_app.addr) },
    )
    .await;

    let deadline = Instant::now() + Duration::from_secs(10);
    let (kib, mappings, after) = loop {
        if let Some(r) = released(&web.proc_.log_text()) {
            break r;
        }
        assert!(Instant::now() < deadline, "no 'released start-up pages' line:\n{}", web.proc_.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // At least the binary's code and its read-only data. Less of it is
    // resident right after: the sidecar's other threads keep running and
    // map back what they run (up to half of it in a debug build), but not
    // what only start-up ran. (That the release unmaps every page it covers
    // is `weft-mapped-pages`' own test, in a process that does nothing else.)
    assert!(mappings >= 2 && kib >= 512, "released {kib} KiB in {mappings} mappings");
    assert!(after < kib, "{after} of {kib} KiB still resident right after the release:\n{}", web.proc_.log_text());

    // It keeps serving: the code it runs is mapped again on first use.
    web.wait_endpoints("api", 1, Duration::from_secs(10)).await;
    let app = App::of(&web);
    for i in 0..20 {
        let r =
            app.send(Method::GET, "api", &format!("/after-release/{i}"), &[]).await.expect("request through the mesh");
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.body.contains(&format!("/after-release/{i}")), "{}", r.body);
    }
    // And again every --release-pages-every (web: 1 s); api keeps the
    // default, 30 s.
    let releases = |text: &str| metric_sum(text, "weft_proxy_page_releases_total", &["outcome=\"ok\""]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while releases(&web.metrics().await) < 3.0 {
        assert!(Instant::now() < deadline, "web released fewer than 3 times in 15 s:\n{}", web.metrics().await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // (A second one would take a test run over 30 s.)
    assert!((1.0..=2.0).contains(&releases(&api.metrics().await)), "{}", api.metrics().await);
    let r = app.send(Method::GET, "api", "/after-releases", &[]).await.expect("request through the mesh");
    assert_eq!(r.status, 200, "{}", r.body);
    for s in [&web, &api] {
        let log = s.proc_.log_text();
        assert!(!log.contains("panicked") && !log.contains("not released"), "{}:\n{log}", s.service);
    }
}
