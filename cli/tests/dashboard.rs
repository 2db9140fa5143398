//! `weft dashboard` end to end: `weft up` runs a mesh (canary split, a denied
//! caller, a rate limit); the dashboard serves its page; a real headless
//! Chromium, driven over the DevTools protocol, loads it. The graph, the route
//! table, the split, the refusals and the sidecars must be on the page and
//! agree with `weft top` run at the same time. A screenshot is saved.
//!
//! Needs Debian's `chromium` (`apt-get install -y chromium`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

/// A child process stopped (SIGTERM, then SIGKILL) when the test ends, pass or fail.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `file` has a line for which `f` gives a value.
fn wait_line<T>(file: &Path, what: &str, timeout: Duration, f: impl Fn(&str) -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if let Some(v) = text.lines().find_map(&f) {
            return v;
        }
        assert!(Instant::now() < deadline, "no {what} within {timeout:?} in {}:\n{text}", file.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A plain HTTP/1.1 GET (Chromium's DevTools server does not answer 1.0, nor
/// close the connection after answering); the body, read by Content-Length.
fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut reader = BufReader::new(tcp);
    let mut length = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse::<usize>().ok();
            }
        }
    }
    let mut body = vec![0; length.expect("a Content-Length")];
    reader.read_exact(&mut body).unwrap();
    String::from_utf8(body).unwrap()
}

/// Chromium from Debian's package, or a failure that says how to get it.
fn chromium() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        for name in ["chromium", "chromium-browser"] {
            let p = Path::new(dir).join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!("chromium is not installed: this test drives a real headless Chromium. Install it with `apt-get install -y chromium`");
}

/// A DevTools protocol session with one page.
struct Cdp {
    ws: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

impl Cdp {
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        self.ws
            .send(tungstenite::Message::text(json!({"id": id, "method": method, "params": params}).to_string()))
            .unwrap();
        loop {
            let msg = self.ws.read().unwrap_or_else(|e| panic!("DevTools connection lost during {method}: {e}"));
            let tungstenite::Message::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates `expr` in the page; its value (JSON-able).
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({"expression": expr, "returnByValue": true, "awaitPromise": true}));
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }
}

/// Starts headless Chromium on `url` and connects to its page.
fn open_page(url: &str, profile: &Path) -> (Running, Cdp) {
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1400,1100",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let stderr = child.stderr.take().unwrap();
    let browser = Running(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Keep draining: Chromium logs to stderr for as long as it runs.
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(ws) = line.strip_prefix("DevTools listening on ") {
                let _ = tx.send(ws.to_string());
            }
        }
    });
    let browser_ws = rx.recv_timeout(Duration::from_secs(30)).expect("chromium printed no DevTools address in 30s");
    let devtools: SocketAddr = browser_ws.trim_start_matches("ws://").split('/').next().unwrap().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let page_ws = loop {
        let list: Value = serde_json::from_str(&http_get(devtools, "/json/list")).unwrap_or(Value::Null);
        let page = list.as_array().into_iter().flatten().find(|t| t["type"] == "page");
        if let Some(ws) = page.and_then(|p| p["webSocketDebuggerUrl"].as_str()) {
            break ws.to_string();
        }
        assert!(Instant::now() < deadline, "no page target in {list}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let (ws, _) = tungstenite::connect(page_ws.as_str()).expect("connect to the page's DevTools socket");
    (browser, Cdp { ws, next_id: 0 })
}

/// A route-table row's identity: (service/backend, route, caller, server), as `weft top` prints them.
type RowKey = (String, String, String, String);

/// `weft top`'s last table: row -> rps.
fn top_rows(out: &str) -> Vec<(RowKey, f64)> {
    let last = out.rsplit("SERVICE/BACKEND").next().unwrap_or("");
    last.lines()
        .skip(1)
        .filter_map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            (c.len() >= 8).then(|| {
                let key = (c[0].to_string(), c[1].to_string(), c[2].to_string(), c[3].to_string());
                (key, c[4].parse().unwrap())
            })
        })
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= f64::max(4.0, 0.35 * a.max(b))
}

#[test]
fn dashboard_in_a_real_browser_matches_weft_top() {
    let chromium_bin = chromium(); // fail first, and clearly, without it
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/canary.yaml")).unwrap();
    // A limit the frontend's 36 req/s to two v1 sidecars exceeds: some 429s.
    let limit = "---\napiVersion: weft.dev/v1alpha1\nkind: RateLimit\nmetadata:\n  name: backend-per-sidecar\n\
                 spec:\n  targetRef:\n    name: backend\n  requestsPerSecond: 15\n";
    std::fs::write(&mesh, format!("{example}{limit}")).unwrap();

    let up_out = dir.path().join("up.out");
    let _up = Running(
        Command::new(WEFT)
            .args(["up", "--duration", "150s", "--no-clear"])
            .arg(&mesh)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&up_out).unwrap())
            .stderr(std::fs::File::create(dir.path().join("up.err")).unwrap())
            .spawn()
            .unwrap(),
    );
    let cp = wait_line(&up_out, "control plane address", Duration::from_secs(60), |l| {
        l.strip_prefix("weft up: control plane ")?.split(',').next().map(str::to_string)
    });
    // `weft up` keeps its PKI beside its logs.
    let logs = wait_line(&up_out, "logs line", Duration::from_secs(5), |l| {
        l.strip_prefix("logs ")?.split_whitespace().next().map(PathBuf::from)
    });
    let pki = logs.parent().unwrap().join("pki");

    let dash_out = dir.path().join("dashboard.out");
    let dash_err = dir.path().join("dashboard.err");
    let _dashboard = Running(
        Command::new(WEFT)
            // Four-second windows on both sides: the canary's ~4 req/s share is a random
            // 10 % of the frontend's calls, too few per second to compare two reads.
            .args(["dashboard", "--listen", "127.0.0.1:0", "--interval", "4s", "--control-plane", &cp, "--pki"])
            .arg(&pki)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&dash_out).unwrap())
            .stderr(std::fs::File::create(&dash_err).unwrap())
            .spawn()
            .unwrap(),
    );
    let url = wait_line(&dash_out, "dashboard address", Duration::from_secs(20), |l| {
        l.strip_prefix("weft dashboard on ")?.split_whitespace().next().map(str::to_string)
    });
    let addr: SocketAddr = url.trim_start_matches("http://").trim_end_matches('/').parse().unwrap();

    // The API first: every kind of traffic has shown up (rates need two scrapes).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v: Value = serde_json::from_str(&http_get(addr, "/api/mesh")).unwrap();
        let refused = |kind: &str| v["refusals"].as_array().unwrap().iter().any(|r| r["kind"] == kind);
        if v["edges"].as_array().unwrap().len() >= 2 && refused("denied") && refused("rate_limited") {
            break;
        }
        assert!(Instant::now() < deadline, "the mesh's traffic did not show in /api/mesh:\n{v:#}");
        std::thread::sleep(Duration::from_millis(500));
    }

    let profile = tempfile::tempdir().unwrap();
    assert!(chromium_bin.is_file());
    let (_browser, mut page) = open_page(&url, profile.path());
    let deadline = Instant::now() + Duration::from_secs(30);
    while page.eval(
        // Null-safe: the first evaluations may run before the page has a body.
        "document.body?.dataset.ready === 'true' && document.querySelectorAll('#graph g.edge').length >= 2",
    ) != json!(true)
    {
        assert!(Instant::now() < deadline, "the page never drew the graph: {}", page.eval("document.body?.innerText"));
        std::thread::sleep(Duration::from_millis(200));
    }

    // `weft top` now, and the page right after it: both over four-second windows of the same steady load.
    let top = Command::new(WEFT)
        .args(["top", "--iterations", "2", "--no-clear", "--interval", "4s", "--control-plane", &cp, "--pki"])
        .arg(&pki)
        .output()
        .unwrap();
    assert!(top.status.success(), "{}", String::from_utf8_lossy(&top.stderr));
    let top = String::from_utf8_lossy(&top.stdout).to_string();
    let shown = page.eval(
        r#"JSON.stringify({
            nodes: [...document.querySelectorAll('#graph g.node')].map(n => n.dataset.service),
            edges: [...document.querySelectorAll('#graph g.edge')].map(e => ({
                from: e.dataset.from, to: e.dataset.to, caller: e.dataset.caller, callee: e.dataset.callee,
                rps: +e.dataset.rps, cls: e.getAttribute('class') })),
            labels: [...document.querySelectorAll('#graph g.label')].map(l => l.textContent),
            routes: [...document.querySelectorAll('#routes tbody tr[data-service]')].map(r => ({
                service: r.dataset.service, backend: r.dataset.backend, route: r.dataset.route,
                caller: r.dataset.caller, server: r.dataset.server, rps: +r.dataset.rps, text: r.innerText })),
            splits: [...document.querySelectorAll('#splits .split')].map(s => ({
                service: s.dataset.service, route: s.dataset.route,
                shares: Object.fromEntries([...s.querySelectorAll('.seg')].map(g => [g.dataset.backend, +g.dataset.share])) })),
            refusals: [...document.querySelectorAll('#refusals tbody tr[data-kind]')].map(r => ({
                kind: r.dataset.kind, service: r.dataset.service, caller: r.dataset.caller, rps: +r.dataset.rps, text: r.innerText })),
            sidecars: [...document.querySelectorAll('#sidecars tbody tr[data-spiffe-id]')].map(r => ({
                id: r.dataset.spiffeId, text: r.innerText, svid: r.querySelector('td.svid').innerText })),
        })"#,
    );
    let shown: Value = serde_json::from_str(shown.as_str().unwrap()).unwrap();
    let ctx = format!("page: {shown:#}\nweft top:\n{top}");
    let short = |id: &str| id.trim_start_matches("spiffe://").to_string();

    // The graph: the three services, and an edge per caller labelled with both identities.
    let mut nodes: Vec<&str> = shown["nodes"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    nodes.sort();
    assert_eq!(nodes, ["backend", "batch", "frontend"], "{ctx}");
    let edges = shown["edges"].as_array().unwrap();
    let edge = |from: &str| {
        edges
            .iter()
            .find(|e| e["from"] == from && e["to"] == "backend")
            .unwrap_or_else(|| panic!("{from} -> backend: {ctx}"))
    };
    let td = "spiffe://example.org/ns/default/sa";
    assert_eq!(edge("frontend")["caller"], format!("{td}/frontend"), "{ctx}");
    assert_eq!(edge("frontend")["callee"], format!("{td}/backend"), "{ctx}");
    assert_eq!(edge("batch")["caller"], format!("{td}/batch"), "{ctx}");
    assert!(edge("batch")["cls"].as_str().unwrap().contains("denied"), "batch's calls are drawn as denied: {ctx}");
    let labels: Vec<&str> = shown["labels"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    assert!(labels.iter().any(|l| l.contains("/sa/frontend → /ns/default/sa/backend")), "{ctx}");
    assert!(labels.iter().any(|l| l.contains("/sa/batch") && l.contains("denied")), "{ctx}");
    // Every caller -> server pair of `weft top` is an edge of the graph, and no other.
    let mut top_pairs: Vec<(String, String)> = top_rows(&top)
        .into_iter()
        .filter(|((_, _, _, server), _)| server != "-")
        .map(|((_, _, caller, server), _)| (caller, server))
        .collect();
    top_pairs.sort();
    top_pairs.dedup();
    let mut page_pairs: Vec<(String, String)> = edges
        .iter()
        .flat_map(|e| {
            let callers: Vec<String> = e["caller"].as_str().unwrap().split(' ').map(short).collect();
            let callees: Vec<String> =
                e["callee"].as_str().unwrap().split(' ').filter(|s| !s.is_empty()).map(short).collect();
            callers.into_iter().flat_map(move |c| callees.clone().into_iter().map(move |s| (c.clone(), s)))
        })
        .collect();
    page_pairs.sort();
    page_pairs.dedup();
    assert_eq!(page_pairs, top_pairs, "{ctx}");

    // The route table: the same rows as `weft top`, with rates within tolerance.
    let top_rows = top_rows(&top);
    assert!(top_rows.len() >= 3, "{ctx}");
    let page_rows: Vec<(RowKey, f64)> = shown["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap().to_string();
            let name =
                if s("backend").is_empty() { s("service") } else { format!("{}/{}", s("service"), s("backend")) };
            let dash = |v: String| if v.is_empty() { "-".to_string() } else { v };
            ((name, dash(s("route")), short(&s("caller")), dash(short(&s("server")))), r["rps"].as_f64().unwrap())
        })
        .collect();
    // A row that shows up between the two reads (batch's first call to v2, say) is a rate near zero on the other side.
    let rps_of = |rows: &[(RowKey, f64)], key: &RowKey| rows.iter().find(|r| &r.0 == key).map_or(0.0, |r| r.1);
    let mut keys: Vec<&RowKey> = top_rows.iter().chain(&page_rows).map(|r| &r.0).collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        let (page_rps, top_rps) = (rps_of(&page_rows, key), rps_of(&top_rows, key));
        assert!(close(page_rps, top_rps), "{key:?}: page {page_rps:.1} rps, weft top {top_rps:.1} rps\n{ctx}");
    }
    for (backend, caller) in [("backend/v1", "sa/frontend"), ("backend/v2", "sa/frontend"), ("backend/v1", "sa/batch")]
    {
        for rows in [&top_rows, &page_rows] {
            assert!(
                rows.iter().any(|r| r.0 .0 == backend && r.0 .2.ends_with(caller)),
                "{backend} from {caller}: {ctx}"
            );
        }
    }
    let frontend_v1 = page_rows.iter().find(|r| r.0 .0 == "backend/v1" && r.0 .2.ends_with("sa/frontend")).unwrap();
    assert!(frontend_v1.1 > 15.0, "the frontend's load reaches v1: {ctx}");

    // The canary split: about 90/10.
    let split = shown["splits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "backend" && s["route"] == "backend-canary/split")
        .unwrap_or_else(|| panic!("no split for backend-canary/split: {ctx}"));
    let (v1, v2) = (split["shares"]["v1"].as_f64().unwrap(), split["shares"]["v2"].as_f64().unwrap());
    assert!(v1 > 0.7 && v2 > 0.0 && v2 < 0.3 && (v1 + v2 - 1.0).abs() < 0.01, "{ctx}");

    // Refusals, as such: batch denied by the ALLOW policy, the frontend rate-limited.
    let refusals = shown["refusals"].as_array().unwrap();
    assert!(
        refusals.iter().any(|r| r["kind"] == "denied"
            && r["caller"] == format!("{td}/batch")
            && r["rps"].as_f64().unwrap() > 1.0
            && r["text"].as_str().unwrap().contains("DENIED")),
        "{ctx}"
    );
    assert!(
        refusals.iter().any(|r| r["kind"] == "rate_limited"
            && r["caller"] == format!("{td}/frontend")
            && r["text"].as_str().unwrap().contains("RATE-LIMITED")),
        "{ctx}"
    );

    // Sidecars: all five, in sync, SVID expiry as a human time ("in 59m40s").
    let sidecars = shown["sidecars"].as_array().unwrap();
    assert_eq!(sidecars.len(), 5, "{ctx}");
    for s in sidecars {
        let svid = s["svid"].as_str().unwrap();
        assert!(svid.starts_with("in 59m") || svid.starts_with("in 58m") || svid == "in 1h", "{svid}: {ctx}");
        assert!(s["text"].as_str().unwrap().contains("in sync"), "{ctx}");
    }

    // A picture of it, for people.
    let height = page.eval("Math.ceil(document.documentElement.scrollHeight)").as_f64().unwrap();
    let shot = page.call(
        "Page.captureScreenshot",
        json!({"format": "png", "captureBeyondViewport": true,
               "clip": {"x": 0, "y": 0, "width": 1400, "height": height, "scale": 1}}),
    );
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("test-output");
    std::fs::create_dir_all(&out_dir).unwrap();
    let path = out_dir.join("dashboard.png");
    std::fs::write(&path, png).unwrap();
    println!("screenshot: {}", path.display());
    let dash_errors = std::fs::read_to_string(&dash_err).unwrap();
    assert!(!dash_errors.contains("panicked"), "{dash_errors}");
}
