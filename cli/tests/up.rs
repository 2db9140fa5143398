//! `weft up` end to end: the real binary starts a control plane, sidecars,
//! demo apps and load; the live table shows the canary split and the denied
//! caller; editing the file moves traffic; everything stops afterwards.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn weft() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weft"))
}

/// The rows of the last complete table in `out`: (service/backend, caller, rps, success).
fn last_table(out: &str) -> Vec<(String, String, f64, String)> {
    let tables: Vec<&str> = out.split("SERVICE/BACKEND").collect();
    let last = tables.iter().rev().find(|t| t.contains("sa/")).copied().unwrap_or("");
    last.lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // SERVICE/BACKEND ROUTE CALLER SERVER RPS SUCCESS P50 P99
            if cols.len() < 8 || !cols[0].contains('/') {
                return None;
            }
            Some((cols[0].to_string(), cols[2].to_string(), cols[4].parse().ok()?, cols[5].to_string()))
        })
        .collect()
}

#[test]
fn up_runs_the_canary_example_and_follows_edits() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mesh.yaml");
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/canary.yaml")).unwrap();
    std::fs::write(&file, &example).unwrap();
    let child = weft()
        .args(["up", "--duration", "14s", "--no-clear"])
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let tmp = dir.path().join("mesh.yaml.tmp");
    let save = |text: &str| {
        // As an editor would: write + rename.
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    // First a mistake: the table must show it, with the field, until it is fixed.
    std::thread::sleep(Duration::from_secs(3));
    let broken = example.replacen("weight: 90", "weight: ninety", 1);
    assert_ne!(broken, example);
    save(&broken);
    // Then move every request to v2 while it runs.
    std::thread::sleep(Duration::from_secs(4));
    let edited = example.replace("weight: 90", "weight: 0").replace("weight: 10", "weight: 100");
    assert_ne!(edited, example);
    save(&edited);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "weft up failed: {stderr}\n{stdout}");
    assert!(stdout.contains("first request served"), "{stdout}");

    // Early tables: frontend traffic reaches both v1 and v2, batch is denied.
    let early = stdout.split("weft up:").nth(4).unwrap_or_default();
    let early_rows = last_table(&format!("SERVICE/BACKEND{}", early.split("SERVICE/BACKEND").nth(1).unwrap_or("")));
    assert!(
        early_rows.iter().any(|r| r.0 == "backend/v1" && r.1.ends_with("sa/frontend") && r.2 > 5.0 && r.3 == "100.0%"),
        "{early_rows:?}\n{stdout}"
    );
    assert!(
        early_rows.iter().any(|r| r.1.ends_with("sa/batch") && r.3 == "denied"),
        "batch must show as denied: {early_rows:?}"
    );
    // The rejected edit was on screen with its field-level reason, and gone once fixed.
    let frames: Vec<&str> = stdout.split("weft up:").collect();
    let rejected = frames.iter().position(|f| f.contains("EDIT REJECTED"));
    let rejected = rejected.unwrap_or_else(|| panic!("the rejected edit was never shown:\n{stdout}"));
    assert!(frames[rejected].contains("weight"), "no field-level reason: {}", frames[rejected]);
    let last = frames.last().unwrap();
    assert!(!last.contains("EDIT REJECTED"), "still shown after the fix: {last}");
    // The route column names the HTTPRoute rule that carried the canary split.
    let route_of_v1 = stdout
        .lines()
        .find(|l| l.starts_with("backend/v1") && l.contains("sa/frontend"))
        .and_then(|l| l.split_whitespace().nth(1));
    assert!(route_of_v1.is_some_and(|r| r.starts_with("backend-canary/")), "{route_of_v1:?}\n{stdout}");

    // The last table: after the edit, v1 gets nothing from the frontend and v2 everything.
    let rows = last_table(&stdout);
    let rps = |backend: &str| {
        rows.iter().filter(|r| r.0 == backend && r.1.ends_with("sa/frontend")).map(|r| r.2).sum::<f64>()
    };
    assert!(rps("backend/v1") < 1.0, "v1 still receives traffic after the edit: {rows:?}\n{stdout}");
    assert!(rps("backend/v2") > 20.0, "v2 should carry the frontend's load: {rows:?}");

    // Nothing is left behind: no process of this run, no temporary directory.
    std::thread::sleep(Duration::from_millis(300));
    let ps = Command::new("ps").args(["-eo", "ppid,pid,args"]).output().unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    let orphans: Vec<&str> = ps.lines().filter(|l| l.split_whitespace().next() == Some(&pid.to_string())).collect();
    assert!(orphans.is_empty(), "children left running: {orphans:?}");
    let state_dir = stdout.lines().find_map(|l| l.strip_prefix("logs ")).and_then(|l| l.split_whitespace().next());
    let state_dir = std::path::Path::new(state_dir.expect("logs line")).parent().unwrap().to_path_buf();
    assert!(!state_dir.exists(), "{} was not removed", state_dir.display());
    assert!(!ps.contains(&state_dir.display().to_string()), "a process of this run is still running:\n{ps}");
}

#[test]
fn up_rejects_a_bad_file_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {prot: 1}\n")
        .unwrap();
    let start = Instant::now();
    let out = weft().arg("up").arg(&file).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spec.prot") && err.contains("unknown field"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(10));
    let out = weft().args(["up", "/nonexistent/mesh.yaml"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/mesh.yaml"));
}

/// The children of `pid`: (pid, command line).
fn children_of(pid: u32) -> Vec<(u32, String)> {
    let ps = Command::new("ps").args(["-eo", "ppid=,pid=,args="]).output().unwrap();
    String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (ppid, child) = (it.next()?.parse::<u32>().ok()?, it.next()?.parse::<u32>().ok()?);
            (ppid == pid).then(|| (child, it.collect::<Vec<_>>().join(" ")))
        })
        .collect()
}

#[test]
fn up_stops_and_says_so_when_a_process_of_the_mesh_dies() {
    let child = weft()
        .args(["up", "--duration", "60s", "--no-clear"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Wait until the mesh is up (a sidecar of the backend is running), then kill it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let victim = loop {
        let kids = children_of(pid);
        let ready = kids.iter().filter(|(_, args)| args.contains(" proxy ")).count() >= 4;
        if let Some(v) = kids.iter().find(|(_, a)| ready && a.contains(" proxy ") && a.contains("--service backend")) {
            break v.0;
        }
        assert!(Instant::now() < deadline, "weft up did not start its sidecars: {kids:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    std::thread::sleep(Duration::from_secs(2));
    assert!(Command::new("kill").args(["-KILL", &victim.to_string()]).status().unwrap().success());
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "weft up kept going without a sidecar:\n{stdout}");
    assert!(started.elapsed() < Duration::from_secs(20), "weft up took {:?} to notice", started.elapsed());
    assert!(stderr.contains("-proxy exited unexpectedly; see ") && stderr.contains(".log"), "{stderr}");
    assert!(children_of(pid).is_empty(), "children left running");
    // The state directory is kept for the logs, and said where.
    let kept = stdout.lines().find_map(|l| l.strip_prefix("state and logs kept in ")).expect("kept dir named");
    assert!(std::path::Path::new(kept.trim()).join("logs").is_dir(), "{stdout}");
    std::fs::remove_dir_all(kept.trim()).unwrap();
}
