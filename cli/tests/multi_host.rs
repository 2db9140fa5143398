//! A mesh across "hosts": network namespaces on one bridge (each its own
//! network stack and address), one for etcd, one per control-plane replica
//! and one per workload (its app and its sidecar). The sidecars listen on a
//! wildcard and register `--advertise-address`; everything between hosts
//! crosses the bridge, where tcpdump checks that app traffic is mutual TLS.
//! Under continuous load, the replica both sidecars use is SIGKILLed: no
//! request fails, both move to the other replica and renew their (short)
//! SVIDs there.
//!
//! Needs root, `ip`, tcpdump, curl, python3 and etcd; without them it prints
//! why and passes as skipped (testkit's [`netns::unsupported`]).

use std::process::Command;
use std::time::Duration;

use weft_testkit::bin;
use weft_testkit::netns::{self, ok, Lab};

const TD: &str = "example.org";
const SUBNET: &str = "10.78.0";
const ETCD: u8 = 2;
const CP1: u8 = 11;
const CP2: u8 = 12;
const HOST_A: u8 = 21;
const HOST_B: u8 = 22;

const MESH: &str = "\
apiVersion: weft.dev/v1alpha1
kind: Mesh
metadata: {name: mesh}
spec: {defaultPolicy: allow}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: api}
spec: {port: 8080, protocol: http}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: web}
spec: {port: 8080, protocol: http}
";

/// GETs through the sidecar (keep-alive) every 20 ms until the stop file
/// exists; keeps "<ok> <failed> <first failure>" in the out file.
const LOAD: &str = r#"
import http.client, os, sys, time
host, port, stop, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ok = failed = 0
first = ""
conn = None
i = 0
while not os.path.exists(stop):
    i += 1
    try:
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", f"/mh-marker-{i}", headers={"Host": "api"})
        r = conn.getresponse()
        body = r.read().decode()
        if r.status == 200 and body.startswith("api /mh-marker-"):
            ok += 1
        else:
            failed += 1
            first = first or f"{r.status} {body[:200]!r}"
    except Exception as e:
        failed += 1
        first = first or repr(e)
        conn = None
    with open(out + ".tmp", "w") as f:
        f.write(f"{ok} {failed} {first}\n")
    os.replace(out + ".tmp", out)
    time.sleep(0.02)
"#;

/// (ok, failed, first failure) from the load's out file.
fn load_counts(lab: &Lab) -> (u64, u64, String) {
    let text = std::fs::read_to_string(lab.path().join("load.out")).unwrap_or_default();
    let mut it = text.trim_end().splitn(3, ' ');
    let ok = it.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    let failed = it.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    (ok, failed, it.next().unwrap_or_default().to_string())
}

fn weft_on(lab: &Lab, host: &str, cp: &str, pki: &str, args: &[&str]) -> std::process::Output {
    let weft = bin("weft").display().to_string();
    let mut all = vec![weft.as_str()];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--control-plane", cp, "--pki", pki]);
    lab.exec(host, &all)
}

/// `weft status --json` through `cp`, parsed.
fn status(lab: &Lab, cp: &str, pki: &str) -> serde_json::Value {
    let out = weft_on(lab, "b", cp, pki, &["status", "--json"]);
    assert!(out.status.success(), "weft status: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// The services of the sidecars `status` lists as held by the replica asked (not remote).
fn local_services(status: &serde_json::Value) -> Vec<String> {
    let mut v: Vec<String> = status["sidecars"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["remote"] == false)
        .map(|s| s["service"].as_str().unwrap_or_default().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn sidecars_on_separate_hosts_talk_over_mtls_and_survive_the_loss_of_their_replica() {
    if let Some(why) = netns::unsupported(&["tcpdump", "curl", "python3", "etcd"]) {
        eprintln!("SKIPPED {}: {why}", module_path!());
        return;
    }
    let mut lab = Lab::new("mh", SUBNET);
    for (host, n) in [("etcd", ETCD), ("cp1", CP1), ("cp2", CP2), ("a", HOST_A), ("b", HOST_B)] {
        lab.host(host, n);
    }
    let ip = |n: u8| format!("{SUBNET}.{n}");

    // etcd on its own host.
    let etcd_url = format!("http://{}:2379", ip(ETCD));
    let data = lab.path().join("etcd-data").display().to_string();
    let etcd_args = [
        "etcd",
        "--name",
        "m0",
        "--data-dir",
        &data,
        "--listen-client-urls",
        &etcd_url,
        "--advertise-client-urls",
        &etcd_url,
        "--listen-peer-urls",
        "http://127.0.0.1:2380",
        "--initial-advertise-peer-urls",
        "http://127.0.0.1:2380",
        "--initial-cluster",
        "m0=http://127.0.0.1:2380",
    ]
    .map(String::from);
    lab.spawn("etcd", "etcd", &etcd_args);
    lab.wait("etcd", Duration::from_secs(30), || lab.curl("etcd", &["-f"], &format!("{etcd_url}/health")).0 == 0);

    // Two control-plane replicas on their hosts, listening on a wildcard.
    let pki = lab.path().join("pki");
    ok(Command::new(bin("weft")).args(["certs", "init", "--trust-domain", TD, "--out"]).arg(&pki));
    let pki = pki.display().to_string();
    let mesh = lab.write("mesh.yaml", MESH).display().to_string();
    let store = format!("etcd://{}:2379", ip(ETCD));
    let cp_addr = |n: u8| format!("{}:7443", ip(n));
    let start_cp = |lab: &mut Lab, name: &str| {
        let state = lab.path().join(format!("{name}-state")).display().to_string();
        let args = [
            bin("weft-control-plane").display().to_string(),
            "--pki".into(),
            pki.clone(),
            "--state-dir".into(),
            state,
            "--store".into(),
            store.clone(),
            "--listen".into(),
            "0.0.0.0:7443".into(),
            "--admin".into(),
            "127.0.0.1:7444".into(),
            "--registration-ttl".into(),
            "4s".into(),
            "--svid-ttl".into(),
            "6s".into(),
            "--config".into(),
            mesh.clone(),
        ];
        lab.spawn(name, name, &args);
        lab.wait(name, Duration::from_secs(30), || lab.curl(name, &["-f"], "http://127.0.0.1:7444/ready").0 == 0);
    };
    start_cp(&mut lab, "cp1");

    // A host per workload: its app on loopback, its sidecar on a wildcard
    // with the host's address advertised, knowing both replicas (cp2 is not
    // up yet: a first pick of it moves on to cp1).
    let app = lab.write("app.py", weft_testkit::netns::HTTP_APP).display().to_string();
    let replicas = format!("{},{}", cp_addr(CP1), cp_addr(CP2));
    for (host, n, service, upstream) in [("a", HOST_A, "api", None), ("b", HOST_B, "web", Some("api=127.0.0.1:18080"))]
    {
        lab.spawn(
            host,
            &format!("{service}-app"),
            &["python3".into(), "-u".into(), app.clone(), service.into(), "8080".into(), "127.0.0.1".into()],
        );
        let id = format!("spiffe://{TD}/ns/default/sa/{service}");
        let token = weft_on(&lab, "cp1", &cp_addr(CP1), &pki, &["token", "create", "--spiffe-id", &id, "--ttl", "10m"]);
        assert!(token.status.success(), "token: {}", String::from_utf8_lossy(&token.stderr));
        let token_file = lab.write(&format!("{service}.token"), String::from_utf8_lossy(&token.stdout).trim());
        let mut args = vec![
            bin("weft-proxy").display().to_string(),
            "--control-plane".into(),
            replicas.clone(),
            "--trust-bundle".into(),
            format!("{pki}/trust-bundle.pem"),
            "--token-file".into(),
            token_file.display().to_string(),
            "--state-dir".into(),
            lab.path().join(format!("{service}-state")).display().to_string(),
            "--service".into(),
            service.into(),
            "--app".into(),
            "127.0.0.1:8080".into(),
            "--inbound".into(),
            "0.0.0.0:15006".into(),
            "--advertise-address".into(),
            ip(n),
            "--outbound".into(),
            "127.0.0.1:15001".into(),
            "--admin".into(),
            "127.0.0.1:15020".into(),
        ];
        if let Some(u) = upstream {
            args.extend(["--upstream".into(), u.into()]);
        }
        lab.spawn(host, &format!("{service}-sidecar"), &args);
    }
    for host in ["a", "b"] {
        lab.wait(&format!("sidecar on {host}"), Duration::from_secs(60), || {
            lab.curl(host, &["-f"], "http://127.0.0.1:15020/ready").0 == 0
        });
    }
    start_cp(&mut lab, "cp2");
    let api_endpoint = format!("\"{}:15006\"", ip(HOST_A));
    lab.wait("web's discovery of api on host a", Duration::from_secs(30), || {
        lab.curl("b", &[], "http://127.0.0.1:15020/config").1.contains(&api_endpoint)
    });

    // Asked of the replica that holds neither sidecar, status lists both
    // (from etcd), both replicas, and no false "no endpoints" warning.
    lab.wait("cp2 to see cp1's sidecars", Duration::from_secs(15), || {
        status(&lab, &cp_addr(CP2), &pki)["sidecars"].as_array().map_or(0, Vec::len) == 2
    });
    let st = status(&lab, &cp_addr(CP2), &pki);
    assert_eq!(st["replicas"].as_array().map(Vec::len), Some(2), "{st}");
    assert!(local_services(&st).is_empty(), "both sidecars are on cp1: {st}");
    assert_eq!(local_services(&status(&lab, &cp_addr(CP1), &pki)), ["api", "web"]);
    assert_eq!(st["warnings"], serde_json::json!([]), "{st}");

    // Capture everything crossing the bridge from here on.
    let pcap = lab.path().join("bridge.pcap").display().to_string();
    let tcpdump = ["tcpdump", "-i", "br0", "--immediate-mode", "-U", "-s", "0", "-w", &pcap, "tcp"];
    lab.spawn("br", "tcpdump", &tcpdump.map(String::from));
    // Not a fixed pause, and packets handed over as they come (libpcap
    // otherwise batches them for up to a second).
    lab.wait("tcpdump to listen", Duration::from_secs(20), || lab.log("tcpdump").contains("listening on"));

    // Load from web's app to api, across the bridge.
    let load = lab.write("load.py", LOAD).display().to_string();
    let stop = lab.path().join("load.stop").display().to_string();
    let out = lab.path().join("load.out").display().to_string();
    lab.spawn("b", "load", &["python3", "-u", &load, "127.0.0.1", "18080", &stop, &out].map(String::from));
    lab.wait("the first requests", Duration::from_secs(20), || load_counts(&lab).0 >= 20);
    let (_, failed, first) = load_counts(&lab);
    assert_eq!(failed, 0, "failures before the kill: {first}\n{}", lab.logs());

    // The replica both sidecars use dies without a word.
    let renewed_before: Vec<usize> =
        ["api-sidecar", "web-sidecar"].iter().map(|s| lab.log(s).matches("renewed SVID").count()).collect();
    lab.kill("cp1");
    lab.wait("both sidecars to move to cp2", Duration::from_secs(30), || {
        local_services(&status(&lab, &cp_addr(CP2), &pki)) == ["api", "web"]
    });
    // Long enough for both to renew their 6 s SVIDs at cp2.
    lab.wait("both sidecars to renew at cp2", Duration::from_secs(30), || {
        ["api-sidecar", "web-sidecar"]
            .iter()
            .zip(&renewed_before)
            .all(|(s, before)| lab.log(s).matches("renewed SVID").count() > *before)
    });
    // And more requests after the move, through the new SVIDs.
    let after_move = load_counts(&lab).0;
    lab.wait("100 more requests after the move", Duration::from_secs(60), || load_counts(&lab).0 >= after_move + 100);
    std::fs::write(&stop, "").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (ok_count, failed, first) = load_counts(&lab);
    assert_eq!(failed, 0, "{failed} of {} requests failed; first: {first}\n{}", ok_count + failed, lab.logs());
    assert!(ok_count > 100, "only {ok_count} requests went through\n{}", lab.logs());

    // What crossed the bridge between the workloads' hosts was TLS.
    lab.interrupt("tcpdump");
    let capture = std::fs::read(&pcap).expect("capture");
    let has = |needle: &[u8]| capture.windows(needle.len()).any(|w| w == needle);
    assert!(!has(b"/mh-marker-"), "a request path crossed the bridge in plaintext");
    assert!(!has(b"HTTP/1.1") && !has(b"x-weft-peer-id"), "plaintext HTTP crossed the bridge");
    assert!(has(&[0x17, 0x03, 0x03]), "no TLS application data on the bridge ({} bytes)", capture.len());
    let summary = lab.exec("br", &["tcpdump", "-nr", &pcap]);
    let summary = String::from_utf8_lossy(&summary.stdout);
    let (a, b) = (ip(HOST_A), ip(HOST_B));
    assert!(
        summary.lines().any(|l| l.contains(&format!("{b}.")) && l.contains(&format!("{a}.15006"))),
        "no traffic from host b to host a's inbound port:\n{summary}"
    );
    for host in [&a, &b] {
        // "<ip>.<port>: " or "<ip>.<port> >" in tcpdump's lines (timestamps also have ".8080…").
        let app_port = format!("{host}.8080");
        assert!(
            !summary.contains(&format!("{app_port}:")) && !summary.contains(&format!("{app_port} >")),
            "an app port was reached across the bridge:\n{summary}"
        );
    }
    // The sidecars reached cp2 across the bridge too (config stream and renewal).
    assert!(summary.contains(&format!("{}.7443", ip(CP2))), "{summary}");
}
