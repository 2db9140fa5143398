//! What the operator reads from the real `weft` binary: no panic on a closed
//! pipe, times as people write them, plurals, error messages without gRPC
//! jargon, a missing PKI file named with the way out, and help for every flag.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use weft_testkit::{servers, ControlPlane, Sidecar, SidecarSpec};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");
const TD: &str = "example.org";

/// `weft args…` without WEFT_* settings from the environment.
fn weft(args: &[&str]) -> Command {
    let mut c = Command::new(WEFT);
    c.args(args).env_remove("WEFT_CONTROL_PLANE").env_remove("WEFT_PKI").env_remove("RUST_LOG").stdin(Stdio::null());
    c
}

/// An operator command against `cp`.
fn op(cp: &ControlPlane, args: &[&str]) -> Command {
    let mut c = weft(args);
    c.args(["--control-plane", &cp.addr.to_string(), "--pki"]).arg(&cp.pki);
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Waits for `child` (killed after 20s).
fn wait(mut child: std::process::Child) -> Output {
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("weft did not exit within 20s of its reader going away");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn against_a_running_control_plane() {
    let cp = ControlPlane::start(TD, &[]).await;
    let app = servers::http("web").await;
    let _web = Sidecar::start(&cp, TD, SidecarSpec::new("web", app.addr)).await;

    tokio::task::spawn_blocking(move || {
        // `weft top | head -2`: the reader leaves after two lines; weft exits quietly.
        let mut child = op(&cp, &["top", "--interval", "200ms", "--no-clear"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        for _ in 0..2 {
            lines.next().expect("a line from weft top").unwrap();
        }
        drop(lines);
        let out = wait(child);
        assert!(out.status.success(), "weft top | head -2 exited {:?}: {}", out.status, text(&out.stderr));
        assert_eq!(text(&out.stderr), "", "nothing to say when the reader has gone");

        // `weft status | head -0`: the reader is gone before anything is written.
        let mut child = op(&cp, &["status"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        drop(child.stdout.take());
        let out = wait(child);
        assert!(out.status.success(), "weft status into a closed pipe exited {:?}: {}", out.status, text(&out.stderr));
        assert_eq!(text(&out.stderr), "");

        // Token expiry: an RFC 3339 time and how far away it is.
        let out = op(&cp, &["token", "create", "--spiffe-id", "spiffe://example.org/ns/default/sa/x", "--ttl", "10m"])
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert!(out.status.success(), "{err}");
        let when = err.split("expires ").nth(1).unwrap_or_else(|| panic!("{err}"));
        let stamp = when.split_whitespace().next().unwrap();
        assert!(
            stamp.len() == 20 && stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T' && stamp.starts_with("20"),
            "RFC 3339 UTC: {err}"
        );
        assert!(when.contains("(in 10m)") || when.contains("(in 9m59s)"), "{err}");
        assert!(!err.contains("unix"), "{err}");

        // SVID expiry in minutes and seconds, not thousands of seconds.
        let out = op(&cp, &["status"]).output().unwrap();
        let status = text(&out.stdout);
        let row = status.lines().find(|l| l.contains("sa/web")).unwrap_or_else(|| panic!("{status}"));
        let expiry =
            row.split("in ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or_else(|| panic!("{row}"));
        assert!(expiry.starts_with("59m") || expiry.starts_with("58m") || expiry == "1h", "{row}");
        assert!(expiry.ends_with('s') || expiry.ends_with('m') || expiry.ends_with('h'), "{row}");

        // A refusal is the control plane's message, without gRPC's code description.
        let out =
            op(&cp, &["token", "create", "--spiffe-id", "spiffe://other.org/ns/default/sa/web"]).output().unwrap();
        let err = text(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("outside this control plane's trust domain example.org"), "{err}");
        for jargon in ["Client specified an invalid argument", "InvalidArgument", "status:", "code:"] {
            assert!(!err.contains(jargon), "{jargon:?} leaked: {err}");
        }
    })
    .await
    .unwrap();
}

#[test]
fn validate_counts_in_proper_plurals() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/canary.yaml");
    let out = weft(&["validate", example]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("valid (3 services, 1 route, 2 authorization policies, 0 rate limits)"),
        "{}",
        text(&out.stdout)
    );
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one.yaml");
    std::fs::write(
        &one,
        "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {port: 80}\n---\n\
         apiVersion: weft.dev/v1alpha1\nkind: RateLimit\nmetadata: {name: r}\nspec: {targetRef: {name: a}, requestsPerSecond: 5}\n",
    )
    .unwrap();
    let out = weft(&["validate", one.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("valid (1 service, 0 routes, 0 authorization policies, 1 rate limit)"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn operator_commands_outside_the_pki_directory_say_how_to_point_at_it() {
    let elsewhere = tempfile::tempdir().unwrap();
    for args in [&["status"][..], &["top"], &["dashboard"], &["proxy-config", "web"]] {
        let out = weft(args).current_dir(elsewhere.path()).output().unwrap();
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains("./pki/operator.crt"), "{args:?} names the missing file: {err}");
        assert!(err.contains("--pki DIR") && err.contains("WEFT_PKI"), "{args:?} says how to fix it: {err}");
        assert!(!err.contains("No such file or directory"), "{args:?}: {err}");
    }
    // WEFT_PKI is honoured: with the files there, the next problem is the (absent) control plane.
    let pki = elsewhere.path().join("my-pki");
    let out = weft(&["certs", "init", "--trust-domain", TD, "--out", pki.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let nowhere = weft_testkit::free_addr().to_string();
    let out = weft(&["status", "--control-plane", &nowhere])
        .current_dir(elsewhere.path())
        .env("WEFT_PKI", &pki)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("unreachable") && !err.contains("operator.crt"), "{err}");
    // A missing key is named as such too.
    std::fs::remove_file(pki.join("operator.key")).unwrap();
    let out = weft(&["status", "--pki", pki.to_str().unwrap()]).output().unwrap();
    let err = text(&out.stderr);
    assert!(err.contains(&pki.join("operator.key").display().to_string()) && err.contains("--pki DIR"), "{err}");
}

/// The entries of the `Options:`/`Arguments:` sections of a `-h` page that have no help text.
fn undocumented(help: &str) -> Vec<String> {
    let lines: Vec<&str> = help.lines().collect();
    let mut missing = Vec::new();
    let mut in_section = false;
    for (i, line) in lines.iter().enumerate() {
        if !line.starts_with(' ') {
            in_section = line.starts_with("Options:") || line.starts_with("Arguments:");
            continue;
        }
        let entry = line.trim_start();
        if !in_section || !(entry.starts_with('-') || entry.starts_with('<') || entry.starts_with('[')) {
            continue;
        }
        let indent = line.len() - entry.len();
        let same_line = entry.split_once("  ").is_some_and(|(_, h)| !h.trim().is_empty());
        let next_line = lines.get(i + 1).is_some_and(|n| {
            let t = n.trim_start();
            n.len() - t.len() > indent && !t.is_empty() && !t.starts_with('-')
        });
        if !same_line && !next_line {
            missing.push(entry.to_string());
        }
    }
    missing
}

fn help(args: &[&str]) -> String {
    let out = weft(args).arg("-h").output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn help_lists_up_first_and_documents_every_flag() {
    let top = help(&[]);
    let commands: Vec<String> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    assert_eq!(commands.first().map(String::as_str), Some("up"), "{top}");
    assert!(commands.contains(&"dashboard".to_string()), "{top}");
    let mut pages = vec![(vec![], top.clone())];
    for c in commands.iter().filter(|c| *c != "help") {
        let page = help(&[c]);
        // Subcommands of a group (certs init, token create).
        let subs: Vec<String> = page
            .lines()
            .skip_while(|l| !l.starts_with("Commands:"))
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .filter(|s| s != "help")
            .collect();
        for s in subs {
            pages.push((vec![c.clone(), s.clone()], help(&[c, &s])));
        }
        pages.push((vec![c.clone()], page));
    }
    assert!(pages.len() > 10, "{pages:?}");
    let missing: Vec<(Vec<String>, Vec<String>)> =
        pages.into_iter().map(|(cmd, page)| (cmd, undocumented(&page))).filter(|(_, m)| !m.is_empty()).collect();
    assert!(missing.is_empty(), "flags without help text: {missing:#?}");
    // The check itself can fail.
    assert_eq!(undocumented("Options:\n      --bare <X>\n  -h, --help  Print help\n"), ["--bare <X>"]);
}
