//! End to end: a real control plane, two real sidecar processes and real
//! servers; traffic from real clients (curl, tonic, raw TCP) goes through
//! both sidecars over mutual TLS.

use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_testkit::servers::{self, echo};
use weft_testkit::{metric_sum, ControlPlane, Sidecar, SidecarSpec};

const TD: &str = "example.org";
const TRACEPARENT: &str = "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

struct Mesh {
    cp: ControlPlane,
    client: Sidecar,
    server: Sidecar,
    _servers: Vec<servers::Server>,
}

/// `web` (the caller, fronting nothing of interest) and `api` (fronting `app`).
async fn mesh(app: servers::Server, app_protocol: &str, upstreams: &[&str]) -> Mesh {
    let cp = ControlPlane::start(TD, &[]).await;
    let web_app = servers::http("web").await;
    let server = Sidecar::start(
        &cp,
        TD,
        SidecarSpec {
            service: "api",
            app: app.addr,
            upstreams: &[],
            labels: &["version=v1"],
            extra_args: &["--app-protocol", app_protocol],
        },
    )
    .await;
    let client = Sidecar::start(
        &cp,
        TD,
        SidecarSpec { service: "web", app: web_app.addr, upstreams, labels: &[], extra_args: &[] },
    )
    .await;
    client.wait_endpoints("api", 1, Duration::from_secs(10)).await;
    Mesh { cp, client, server, _servers: vec![app, web_app] }
}

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl").args(["-sS", "--max-time", "10"]).args(args).output().expect("curl is installed");
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn http1_and_h2c_through_two_sidecars() {
    let m = mesh(servers::http("api").await, "auto", &[]).await;
    let outbound = format!("http://{}/echo-headers", m.client.outbound);

    // HTTP/1.1 from the app arrives as HTTP/1.1, with the caller's verified identity.
    let (body, err) = curl(&[
        "--http1.1",
        "-H",
        "Host: api",
        "-H",
        "x-weft-peer-id: spiffe://example.org/forged",
        "-H",
        TRACEPARENT,
        &outbound,
    ]);
    assert!(body.contains(TRACEPARENT), "W3C trace context must pass through both sidecars: {body}");
    assert!(body.contains("version: HTTP/1.1"), "body: {body}\nstderr: {err}");
    assert!(body.contains("x-weft-peer-id: spiffe://example.org/ns/default/sa/web"), "{body}");
    assert!(!body.contains("forged"), "a caller-supplied identity header must be stripped: {body}");
    assert!(!body.contains("weft-app-protocol"), "internal header leaked to the app: {body}");

    // h2c (prior knowledge) arrives as HTTP/2; the authority may carry a port.
    let (body, err) = curl(&["--http2-prior-knowledge", "-H", "Host: api:9080", &outbound]);
    assert!(body.contains("version: HTTP/2.0"), "body: {body}\nstderr: {err}");

    // A request body is streamed through and back byte-exact.
    let payload: String = (0..200_000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let file = m.cp.dir.path().join("payload.txt");
    std::fs::write(&file, &payload).unwrap();
    let (body, err) = curl(&[
        "--http1.1",
        "-H",
        "Host: api",
        "--data-binary",
        &format!("@{}", file.display()),
        &format!("http://{}/upload", m.client.outbound),
    ]);
    assert_eq!(body.len(), payload.len(), "stderr: {err}");
    assert!(body == payload, "echoed body differs");

    // Unknown service: a clear 404 from the sidecar (issue #14: not the 503
    // of a known service without endpoints).
    let (body, _) = curl(&["-H", "Host: nowhere", &format!("http://{}/", m.client.outbound)]);
    assert!(body.contains("no service named \"nowhere\" in the mesh"), "{body}");

    let metrics = m.client.metrics().await;
    assert!(metric_sum(&metrics, "weft_proxy_requests_total", &["direction=\"outbound\"", "service=\"api\""]) >= 3.0);
    assert!(metric_sum(&metrics, "weft_proxy_request_duration_seconds_count", &["service=\"api\""]) >= 3.0);
    let server_metrics = m.server.metrics().await;
    assert!(
        metric_sum(
            &server_metrics,
            "weft_proxy_requests_total",
            &["direction=\"inbound\"", "peer=\"spiffe://example.org/ns/default/sa/web\""]
        ) >= 3.0,
        "{server_metrics}"
    );
    // Pooled connections carried every request: at most one per worker
    // thread of the sidecar (one per core by default), each opened once.
    let cores = std::thread::available_parallelism().unwrap().get() as f64;
    let opened = metric_sum(&metrics, "weft_proxy_connections_total", &["direction=\"outbound\"", "protocol=\"mtls\""]);
    assert!((1.0..=cores).contains(&opened), "{opened} mTLS connections opened to api by {cores} workers");
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_10mib_byte_exact() {
    let m = mesh(servers::tcp_echo().await, "auto", &["api"]).await;
    let mut tcp = tokio::net::TcpStream::connect(m.client.upstream("api")).await.unwrap();
    let data: Vec<u8> = (0..10 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    let (mut rd, mut wr) = tcp.split();
    let send = async {
        wr.write_all(&data).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let mut got = Vec::with_capacity(data.len());
    let recv = async {
        while got.len() < data.len() {
            let mut buf = vec![0u8; 65536];
            let n =
                tokio::time::timeout(Duration::from_secs(20), rd.read(&mut buf)).await.expect("echo stalled").unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    };
    tokio::join!(send, recv);
    assert_eq!(got.len(), data.len());
    assert!(got == data, "echoed bytes differ");
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_unary_and_bidi_stream_with_trailers() {
    let m = mesh(servers::grpc_echo().await, "h2c", &[]).await;
    // The app addresses the service by name; the sidecar routes by :authority.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", m.client.outbound))
        .unwrap()
        .origin("http://api".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let mut client = echo::echo_client::EchoClient::new(channel);
    let resp = client.unary(echo::Msg { seq: 7, payload: b"hello".to_vec() }).await.unwrap();
    assert_eq!(resp.metadata().get("x-echo-caller").unwrap(), "spiffe://example.org/ns/default/sa/web");
    assert_eq!(resp.into_inner().seq, 7);

    let outbound = futures::stream::iter((0..1000u64).map(|i| echo::Msg { seq: i, payload: vec![i as u8; 100] }));
    let mut inbound = client.bidi(outbound).await.unwrap().into_inner();
    let mut seen = 0u64;
    let status = loop {
        match inbound.message().await {
            Ok(Some(m)) => {
                assert_eq!(m.seq, seen);
                assert_eq!(m.payload, vec![seen as u8; 100]);
                seen += 1;
            }
            Ok(None) => panic!("stream ended without the trailer status"),
            Err(status) => break status,
        }
    };
    assert_eq!(seen, 1000);
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert_eq!(status.message(), "done after 1000");
}

/// The flags of a sidecar for `service` with the token at `token`, fresh ports.
fn sidecar_args(cp: &ControlPlane, token: &std::path::Path, service: &str, state: &str) -> Vec<String> {
    [
        "--control-plane",
        &cp.addr.to_string(),
        "--trust-bundle",
        cp.trust_bundle().to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
        "--state-dir",
        cp.dir.path().join(state).to_str().unwrap(),
        "--service",
        service,
        "--app",
        "127.0.0.1:9",
        "--inbound",
        &weft_testkit::free_addr().to_string(),
        "--outbound",
        &weft_testkit::free_addr().to_string(),
        "--admin",
        &weft_testkit::free_addr().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Runs `weft-proxy` with `args` (expected to exit); (success, stderr).
fn run_sidecar(args: &[String]) -> (bool, String) {
    let out = std::process::Command::new(weft_testkit::bin("weft-proxy")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `args` with the value of `flag` replaced.
fn with(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    let i = args.iter().position(|a| a == flag).expect("flag present") + 1;
    args[i] = value.to_string();
    args
}

/// A sidecar told to serve a service its identity does not name, or a
/// malformed name, exits at once with a clear error instead of retrying a
/// registration the control plane will always refuse.
#[tokio::test(flavor = "multi_thread")]
async fn sidecar_refuses_a_service_its_identity_does_not_name() {
    let cp = ControlPlane::start(TD, &[]).await;
    let token = cp.token_file("spiffe://example.org/ns/default/sa/web");
    // A malformed name is refused before the token is spent…
    let (ok, err) = run_sidecar(&sidecar_args(&cp, &token, "Bad_Name", "bad"));
    assert!(!ok && err.contains("--service") && err.contains("DNS label"), "{err}");
    // …so the token still works, and the identity check names both sides.
    let (ok, err) = run_sidecar(&sidecar_args(&cp, &token, "db", "db"));
    assert!(!ok, "{err}");
    assert!(err.contains("spiffe://example.org/ns/default/sa/web may not register as service \"db\""), "{err}");
}

/// Bad start-up input stops the sidecar with a message naming the flag or
/// file at fault, before the join token is spent; the token then still works.
#[tokio::test(flavor = "multi_thread")]
async fn sidecar_start_up_errors_name_what_is_wrong() {
    let cp = ControlPlane::start(TD, &[]).await;
    let token = cp.token_file("spiffe://example.org/ns/default/sa/web");
    let args = || sidecar_args(&cp, &token, "web", "web");

    let missing = cp.dir.path().join("no-such-bundle.pem");
    let (ok, err) = run_sidecar(&with(args(), "--trust-bundle", missing.to_str().unwrap()));
    assert!(!ok && err.contains("--trust-bundle") && err.contains("no-such-bundle.pem"), "{err}");

    let not_pem = cp.dir.path().join("not-a-bundle.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let (ok, err) = run_sidecar(&with(args(), "--trust-bundle", not_pem.to_str().unwrap()));
    assert!(!ok && err.contains("--trust-bundle") && err.contains("no CERTIFICATE block"), "{err}");

    let busy = std::net::TcpListener::bind(weft_testkit::free_addr()).unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let (ok, err) = run_sidecar(&with(args(), "--inbound", &busy_addr));
    assert!(!ok && err.contains(&format!("cannot listen on {busy_addr} (--inbound)")), "{err}");

    let no_token = cp.dir.path().join("no-such.token");
    let (ok, err) = run_sidecar(&with(args(), "--token-file", no_token.to_str().unwrap()));
    assert!(!ok && err.contains("no-such.token"), "{err}");

    let (ok, err) = run_sidecar(&[args(), vec!["--upstream".into(), "db".into()]].concat());
    assert!(!ok && err.contains("--upstream") && err.contains("NAME=ADDR"), "{err}");

    // None of that spent the token: a good start attests with it.
    let good = args();
    let mut sidecar =
        weft_testkit::Proc::spawn("web-after-errors", &weft_testkit::bin("weft-proxy"), &good, cp.dir.path());
    let admin: std::net::SocketAddr = good[good.iter().position(|a| a == "--admin").unwrap() + 1].parse().unwrap();
    weft_testkit::wait_ok(admin, "/ready", Duration::from_secs(20), Some(&sidecar)).await;

    // A second sidecar on the same state directory would overwrite its key.
    let (ok, err) = run_sidecar(&sidecar_args(&cp, &token, "web", "web"));
    assert!(!ok && err.contains("in use by another weft process"), "{err}");
    sidecar.kill();
}

/// Names of the threads of process `pid` (`/proc/<pid>/task/*/comm`).
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect()
}

/// `--worker-threads` (or `WEFT_PROXY_WORKER_THREADS`) sets how many
/// threads run the connections, each its own event loop (thread-per-core):
/// by default one per core the process may use. A connection stays on the thread it was handed to, with
/// the connections it opens, so with two workers the client connections of
/// `web` are spread over both and each worker opens its own pooled
/// connection to `api`. A value that is not a thread count stops the
/// sidecar at start-up with a message naming the flag and what it accepts.
#[tokio::test(flavor = "multi_thread")]
async fn worker_threads_spread_connections_and_bad_values_are_refused() {
    let cp = ControlPlane::start(TD, &[]).await;
    let token = cp.token_file("spiffe://example.org/ns/default/sa/web");
    for bad in ["two", "-1", "1025"] {
        let (ok, err) = run_sidecar(
            &[sidecar_args(&cp, &token, "web", "bad"), vec!["--worker-threads".into(), bad.into()]].concat(),
        );
        assert!(
            !ok && err.contains("--worker-threads") && err.contains("from 1 to 1024, or 0 or auto"),
            "{bad}: {err}"
        );
    }
    let out = std::process::Command::new(weft_testkit::bin("weft-proxy"))
        .args(sidecar_args(&cp, &token, "web", "bad"))
        .env("WEFT_PROXY_WORKER_THREADS", "many")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--worker-threads") && err.contains("\"many\""), "{err}");
    let help = std::process::Command::new(weft_testkit::bin("weft-proxy")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let flag = help.split("--worker-threads").nth(1).unwrap_or_default();
    assert!(flag.contains("[default: auto]"), "one worker thread per core by default: {help}");

    let app = servers::http("api").await;
    // api as started by default: one worker per core.
    let api = Sidecar::start(&cp, TD, SidecarSpec::new("api", app.addr)).await;
    let web_app = servers::http("web").await;
    let web = Sidecar::start(
        &cp,
        TD,
        SidecarSpec { extra_args: &["--worker-threads", "2"], ..SidecarSpec::new("web", web_app.addr) },
    )
    .await;
    web.wait_endpoints("api", 1, Duration::from_secs(10)).await;
    // Four keep-alive client connections, each answered and held open: handed
    // out round robin, they land on both of web's workers.
    let mut held = Vec::new();
    for i in 0..4 {
        let mut c = tokio::net::TcpStream::connect(web.outbound).await.unwrap();
        c.write_all(format!("GET /threads{i} HTTP/1.1\r\nHost: api\r\n\r\n").as_bytes()).await.unwrap();
        let want = format!("api /threads{i}");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).ends_with(&want) {
            let n =
                tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await.expect("answer in time").unwrap();
            assert!(n > 0, "connection {i} closed early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
        held.push(c);
    }
    let pooled = metric_sum(&web.metrics().await, "weft_proxy_pool_connections", &[]);
    assert_eq!(pooled, 2.0, "one pooled connection to api per worker of web");

    let (web_log, api_log) = (web.proc_.log_text(), api.proc_.log_text());
    assert!(web_log.contains("runtime: current-thread, 2 worker thread(s)"), "{web_log}");
    let cores = std::thread::available_parallelism().unwrap().get();
    assert!(api_log.contains(&format!("runtime: current-thread, {cores} worker thread(s)")), "{api_log}");
    // The worker threads beyond the main one are named weft-worker.
    let workers = thread_names(web.proc_.pid()).iter().filter(|n| *n == "weft-worker").count();
    assert!(workers >= 1, "{:?}", thread_names(web.proc_.pid()));
}

/// The callee sidecar's side of a caller's pooled connection has TCP
/// keepalive on the caller's ping schedule (probes after 20 s idle), so an
/// idle caller whose host vanishes without a FIN is found; the kernel's
/// socket table (`ss -o`) shows the timer.
#[tokio::test(flavor = "multi_thread")]
async fn the_callee_side_of_a_peer_connection_has_tcp_keepalive() {
    let m = mesh(servers::http("api").await, "auto", &[]).await;
    let (body, err) = curl(&["-H", "Host: api", &format!("http://{}/", m.client.outbound)]);
    assert!(err.is_empty(), "{err}");
    assert!(body.contains("api"), "{body}");
    let port = m.server.inbound.port();
    let table = || {
        let out = Command::new("ss").args(["-tnoH", "state", "established", &format!("( sport = :{port} )")]).output();
        String::from_utf8_lossy(&out.expect("ss (iproute2) is installed").stdout).into_owned()
    };
    // A socket with bytes not yet acknowledged shows its retransmission
    // timer instead (`timer:(on,…)`): look again once they are.
    let mut seen = table();
    for _ in 0..50 {
        if !seen.is_empty() && seen.lines().all(|l| l.contains("keepalive")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        seen = table();
    }
    let conns: Vec<&str> = seen.lines().collect();
    assert!(!conns.is_empty(), "no established connection on the callee's inbound port {port}");
    for conn in conns {
        // e.g. `timer:(keepalive,19sec,0)`
        let timer = conn.split("timer:(keepalive,").nth(1).unwrap_or_else(|| panic!("no keepalive timer: {conn}"));
        let secs: u64 = timer.split("sec").next().and_then(|s| s.parse().ok()).unwrap_or(0);
        assert!(secs <= 20, "first probe in {secs} s, after 20 s idle at most: {conn}");
    }
}

/// iptables rules (`-I …` as given), deleted again when dropped, so a
/// failing test leaves none behind.
struct Rules(Vec<Vec<String>>);

impl Drop for Rules {
    fn drop(&mut self) {
        for rule in &self.0 {
            let mut delete = rule.clone();
            delete[0] = "-D".into();
            let _ = Command::new("iptables").arg("-w").args(&delete).output();
        }
    }
}

/// An HTTP/1.1 app that answers every request with an endless chunked
/// body, 1,000 bytes every 50 ms.
async fn endless_app() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").await;
                let chunk = format!("{:x}\r\n{}\r\n", 1000, "x".repeat(1000));
                while s.write_all(chunk.as_bytes()).await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
        }
    });
    addr
}

/// A caller whose host vanishes mid-response (every packet between the two
/// sidecars dropped, no FIN, no RST) is found by the callee: its side of
/// the connection has bytes unacknowledged, so TCP keepalive sends no probe,
/// and `TCP_USER_TIMEOUT` (30 s) ends it. Without that, the callee kept the
/// connection, the stream and the app's request for the kernel's
/// retransmission limit (about 15 minutes).
#[tokio::test(flavor = "multi_thread")]
async fn the_callee_drops_a_caller_that_vanished_mid_response() {
    let app = endless_app().await;
    let cp = ControlPlane::start(TD, &[]).await;
    let web_app = servers::http("web").await;
    let spec =
        SidecarSpec { service: "api", app, upstreams: &[], labels: &[], extra_args: &["--app-protocol", "http1"] };
    let api = Sidecar::start(&cp, TD, spec).await;
    let spec = SidecarSpec { service: "web", app: web_app.addr, upstreams: &[], labels: &[], extra_args: &[] };
    let web = Sidecar::start(&cp, TD, spec).await;
    web.wait_endpoints("api", 1, Duration::from_secs(10)).await;

    let mut client = tokio::net::TcpStream::connect(web.outbound).await.expect("connect");
    client.write_all(b"GET /download HTTP/1.1\r\nHost: api\r\n\r\n").await.expect("send");
    // Keep reading, so the response keeps flowing until the cut.
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while matches!(client.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let inbound = api.inbound.port().to_string();
    let out = Command::new("ss").args(["-tnH", "state", "established", &format!("( sport = :{inbound} )")]).output();
    let table = String::from_utf8_lossy(&out.expect("ss (iproute2) is installed").stdout).into_owned();
    // The caller's port of each connection to the callee's inbound listener.
    let ports: Vec<String> = table
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3).and_then(|peer| peer.rsplit(':').next()).map(str::to_string))
        .collect();
    assert!(!ports.is_empty(), "no connection to the callee's inbound port: {table}");
    let open = |m: &str| metric_sum(m, "weft_proxy_open_connections", &["direction=\"inbound\""]);
    assert!(open(&api.metrics().await) >= 1.0);

    let mut rules = Rules(Vec::new());
    for port in &ports {
        for (from, to) in [(port.as_str(), inbound.as_str()), (inbound.as_str(), port.as_str())] {
            let rule: Vec<String> =
                ["-I", "INPUT", "-i", "lo", "-p", "tcp", "--sport", from, "--dport", to, "-j", "DROP"]
                    .into_iter()
                    .map(String::from)
                    .collect();
            let status = Command::new("iptables").arg("-w").args(&rule).status().expect("iptables is installed");
            assert!(status.success(), "iptables {rule:?}");
            rules.0.push(rule);
        }
    }
    let cut = std::time::Instant::now();
    while open(&api.metrics().await) > 0.0 {
        assert!(cut.elapsed() < Duration::from_secs(50), "the callee still holds the vanished caller's connection");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    drop(rules);
    // Not before the caller had its 30 s: a slow caller is not cut off.
    assert!(cut.elapsed() > Duration::from_secs(20), "closed after {:?}", cut.elapsed());
}
