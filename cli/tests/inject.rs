//! `weft inject` golden tests over real-world-shaped manifests (every kind it
//! injects, multi-document, List, already injected, opted out). Each output
//! is validated against the Kubernetes schemas by `kubernetes-validate`
//! (PyPI; `pip install kubernetes-validate==1.37.0`), and injecting an
//! output again changes nothing.
//!
//! `WEFT_UPDATE_GOLDEN=1 cargo test -p weft --test inject` rewrites the
//! `*.golden.yaml` files; review the diff before committing it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

mod k8s_validate;
use k8s_validate::kubernetes_validate;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/inject")
}

/// `weft inject` with `args` and `stdin`: (success, stdout, stderr).
fn weft_inject(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weft"))
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run weft inject");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn inputs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml") && !p.to_string_lossy().ends_with(".golden.yaml"))
        .collect();
    v.sort();
    v
}

fn golden(input: &Path) -> PathBuf {
    input.with_extension("golden.yaml")
}

#[test]
fn golden_outputs_validate_and_reinjecting_is_a_no_op() {
    let update = std::env::var_os("WEFT_UPDATE_GOLDEN").is_some();
    let inputs = inputs();
    assert!(inputs.len() >= 10, "{inputs:?}");
    for input in &inputs {
        let (ok, out, err) = weft_inject(&["-f", input.to_str().unwrap()], "");
        assert!(ok, "{}: {err}", input.display());
        let golden = golden(input);
        if update {
            std::fs::write(&golden, &out).unwrap();
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_else(|e| panic!("{}: {e}", golden.display()));
        assert_eq!(out, want, "{}: output differs from {}", input.display(), golden.display());
        kubernetes_validate(&golden);
        // Injecting the output again changes nothing.
        let (ok, again, err) = weft_inject(&["-f", golden.to_str().unwrap()], "");
        assert!(ok, "{err}");
        assert_eq!(again, out, "{}: re-injecting changed the output", input.display());
    }
}

#[test]
fn what_happened_is_reported_per_workload() {
    let (_, _, err) = weft_inject(&["-f", dir().join("multi-document.yaml").to_str().unwrap()], "");
    assert_eq!(err, "Deployment/api: injected\n");
    let (_, out, err) = weft_inject(&["-f", dir().join("opted-out.yaml").to_str().unwrap()], "");
    assert_eq!(err, "Deployment/legacy: not injected: annotation weft.dev/inject: \"false\"\n");
    assert!(!out.contains("weft-proxy"), "{out}");
    let (_, _, err) = weft_inject(&["-f", dir().join("already-injected.yaml").to_str().unwrap()], "");
    assert_eq!(err, "StatefulSet/db: already injected, unchanged\n");
}

#[test]
fn every_kind_gets_a_native_sidecar() {
    for (file, kind) in [
        ("deployment.yaml", "Deployment"),
        ("statefulset.yaml", "StatefulSet"),
        ("daemonset.yaml", "DaemonSet"),
        ("job.yaml", "Job"),
        ("cronjob.yaml", "CronJob"),
        ("pod.yaml", "Pod"),
        ("list.yaml", "Deployment"),
    ] {
        let (ok, out, err) = weft_inject(&["-f", dir().join(file).to_str().unwrap()], "");
        assert!(ok && err.contains(&format!("{kind}/")) && err.contains("injected"), "{file}: {err}");
        // weft-init first, then the sidecar with restartPolicy: Always.
        let init = out.find("- name: weft-init").unwrap_or_else(|| panic!("{file}: {out}"));
        let proxy = out.find("- name: weft-proxy").unwrap_or_else(|| panic!("{file}: {out}"));
        assert!(init < proxy, "{file}");
        assert!(out[proxy..].contains("restartPolicy: Always"), "{file}");
        assert!(out.contains("audience: weft") && out.contains("name: weft-state"), "{file}");
        assert!(out.contains("path: /ready"), "{file}");
    }
    let (_, out, _) = weft_inject(&["-f", dir().join("pod.yaml").to_str().unwrap()], "");
    for want in [
        "- --skip-inbound-ports\n    - 15020,9090,9091\n",
        "- --skip-outbound-ports\n    - '53'\n",
        "- --skip-outbound-cidrs\n    - 169.254.169.254/32,10.96.0.0/12\n",
        "- --app\n    - 127.0.0.1:9000\n",
        "- --service\n    - debug\n",
    ] {
        assert!(out.contains(want), "pod.yaml lacks {want:?}:\n{out}");
    }
}

#[test]
fn stdin_and_directories() {
    let text = std::fs::read_to_string(dir().join("job.yaml")).unwrap();
    let (ok, out, err) = weft_inject(&["-f", "-"], &text);
    assert!(ok, "{err}");
    assert_eq!(out, std::fs::read_to_string(dir().join("job.golden.yaml")).unwrap());
    // A directory: its files in name order (goldens included, unchanged).
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(dir().join("pod.yaml"), tmp.path().join("b.yaml")).unwrap();
    std::fs::copy(dir().join("job.yaml"), tmp.path().join("a.yml")).unwrap();
    std::fs::write(tmp.path().join("notes.txt"), "not a manifest").unwrap();
    let (ok, out, err) = weft_inject(&["-f", tmp.path().to_str().unwrap()], "");
    assert!(ok, "{err}");
    let want = std::fs::read_to_string(dir().join("job.golden.yaml")).unwrap()
        + &std::fs::read_to_string(dir().join("pod.golden.yaml")).unwrap();
    assert_eq!(out, want);
}

#[test]
fn bad_annotations_and_yaml_are_refused_with_the_reason() {
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations: {weft.dev/skip-outbound-cidrs: \"10.0.0.0\"}\nspec:\n  containers: [{name: a, image: a}]\n";
    let (ok, out, err) = weft_inject(&["-f", "-"], pod);
    assert!(!ok && out.is_empty(), "{out}");
    assert!(err.contains("Pod/p: annotation weft.dev/skip-outbound-cidrs") && err.contains("ADDRESS/PREFIX"), "{err}");
    // IPv6 is not intercepted: `weft init-iptables` would refuse it at pod start.
    let v6 = pod.replace("\"10.0.0.0\"", "\"10.0.0.0/8,fd00::/8\"");
    let (ok, _, err) = weft_inject(&["-f", "-"], &v6);
    assert!(!ok && err.contains("\"fd00::/8\", an IPv6 network"), "{err}");
    let pod = pod.replace("weft.dev/skip-outbound-cidrs: \"10.0.0.0\"", "weft.dev/app-port: \"http\"");
    let (ok, _, err) = weft_inject(&["-f", "-"], &pod);
    assert!(!ok && err.contains("weft.dev/app-port") && err.contains("is not a port"), "{err}");
    // Lists are parsed as `weft init-iptables` parses them: an empty item
    // (which the init step would refuse at pod start) is refused here.
    for (list, position) in [("22,,23", 2), ("22,", 2), (",22", 1)] {
        let bad = v6.replace(
            "weft.dev/skip-outbound-cidrs: \"10.0.0.0/8,fd00::/8\"",
            &format!("weft.dev/skip-inbound-ports: \"{list}\""),
        );
        let (ok, _, err) = weft_inject(&["-f", "-"], &bad);
        assert!(
            !ok && err.contains("weft.dev/skip-inbound-ports") && err.contains(&format!("empty item {position}")),
            "{list}: {err}"
        );
    }
    // The admin port is always skipped: naming it again does not repeat it.
    let admin = v6
        .replace("weft.dev/skip-outbound-cidrs: \"10.0.0.0/8,fd00::/8\"", "weft.dev/skip-inbound-ports: \"15020,22\"");
    let (ok, out, err) = weft_inject(&["-f", "-"], &admin);
    assert!(ok && out.contains("- --skip-inbound-ports\n    - 15020,22\n"), "{err}{out}");
    let cidr = v6.replace("10.0.0.0/8,fd00::/8", "10.0.0.1/8");
    let (ok, _, err) = weft_inject(&["-f", "-"], &cidr);
    assert!(!ok && err.contains("host bits") && err.contains("10.0.0.0/8"), "{err}");
    let (ok, _, err) = weft_inject(&["-f", "-"], "kind: [unclosed");
    assert!(!ok && err.contains("-: document 1: not valid YAML"), "{err}");
}
