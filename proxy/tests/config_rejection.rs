//! End to end: an invalid mesh config file is rejected as a whole (logged,
//! counted, shown by `weft status`, never pushed to sidecars) and the last
//! good config keeps serving. (`weft validate` on the same files is tested in
//! cli/tests/validate.rs.)

use std::process::Command;
use std::time::{Duration, Instant};

use weft_testkit::mesh::{bad_configs, canary, split, tally, wait_all_to};
use weft_testkit::{bin, metric_sum, wait_metric, ControlPlane};

// ------------------------------------------------------------------ 8. invalid config

fn weft_status(cp: &ControlPlane) -> String {
    let out = Command::new(bin("weft"))
        .args(["status", "--control-plane", &cp.addr.to_string(), "--pki"])
        .arg(&cp.pki)
        .output()
        .expect("run weft status");
    assert!(out.status.success(), "weft status: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_config_is_rejected_and_the_last_good_one_serves() {
    let good = split(0, 100);
    let m = canary(&good).await;
    const RELOADS: &str = "weft_control_plane_config_reloads_total";
    let mut rejected = 0.0;
    let all_v2 = tally(&m.app, "backend", 50, 2).await;
    assert_eq!(all_v2.v2, 50, "{all_v2:?}");
    assert!(!weft_status(&m.cp).contains("REJECTED"));

    for (what, text, names) in bad_configs() {
        let log_before = m.cp.proc_.log_text().len();
        m.cfg.write(&text);
        rejected += 1.0;
        wait_metric(m.cp.admin, RELOADS, &["outcome=\"rejected\""], rejected, Duration::from_secs(15)).await;
        // What the control plane logged about this change (the counter moves
        // just before the line is written).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = m.cp.proc_.log_text();
            let new = log.get(log_before..).unwrap_or_default();
            let missing: Vec<_> = names.iter().filter(|n| !new.contains(**n)).collect();
            if missing.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "{what}: control-plane log lacks {missing:?}:\n{new}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let status = weft_status(&m.cp);
            let shown = status.contains("REJECTED") && names.iter().all(|n| status.contains(n));
            if shown {
                break;
            }
            assert!(Instant::now() < deadline, "{what}: weft status lacks REJECTED or {names:?}:\n{status}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let t = tally(&m.app, "backend", 20, 1).await;
        assert_eq!(
            (t.v1, t.v2, t.others),
            (0, 20, 0),
            "{what}: traffic must follow the last good config (0/100): {t:?}"
        );
    }
    let text = m.cp.metrics().await;
    assert_eq!(metric_sum(&text, RELOADS, &["outcome=\"applied\""]), 0.0, "{text}");

    // The file fixed back to exactly the last good config: nothing is
    // rejected any more.
    m.cfg.write(&good);
    wait_metric(m.cp.admin, RELOADS, &["outcome=\"applied\""], 1.0, Duration::from_secs(15)).await;
    let status = weft_status(&m.cp);
    assert!(!status.contains("REJECTED"), "a good config is serving again:\n{status}");
    // And a new good config applies as usual.
    let changed = Instant::now();
    m.cfg.write(&split(100, 0));
    wait_all_to(&m.app, "v1", changed).await;
    assert!(!weft_status(&m.cp).contains("REJECTED"));
    let text = m.cp.metrics().await;
    assert_eq!(metric_sum(&text, RELOADS, &["outcome=\"rejected\""]), rejected, "{text}");
    // Sidecars never saw a bad config.
    for s in [&m.frontend, &m.v1, &m.v2] {
        let sm = s.metrics().await;
        assert_eq!(metric_sum(&sm, "weft_proxy_config_updates_total", &["outcome=\"rejected\""]), 0.0, "{sm}");
    }
}
