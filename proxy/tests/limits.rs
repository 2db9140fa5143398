//! Limits on every hop, end to end through real sidecar processes: header
//! sizes (`--max-header-bytes`), slowloris and idle connections
//! (`--header-read-timeout`, `--idle-timeout`), the connection cap
//! (`--max-connections`), many tunnels to one peer, and an app that closes
//! idle keep-alive connections.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_testkit::mesh::App;
use weft_testkit::{metric_sum, servers, ControlPlane, Sidecar, SidecarSpec};

const TD: &str = "example.org";

struct Pair {
    _cp: ControlPlane,
    caller: Sidecar,
    callee: Sidecar,
    _apps: Vec<servers::Server>,
}

/// `web` (the caller) and `api` fronting `app`, with extra flags for each sidecar.
async fn pair(app: servers::Server, caller_args: &[&str], upstreams: &[&str]) -> Pair {
    pair_with(app, &[], caller_args, upstreams).await
}

/// [`pair`] with flags for the callee's sidecar too.
async fn pair_with(app: servers::Server, callee_args: &[&str], caller_args: &[&str], upstreams: &[&str]) -> Pair {
    let cp = ControlPlane::start(TD, &[]).await;
    let web_app = servers::http("web").await;
    let callee =
        Sidecar::start(&cp, TD, SidecarSpec { extra_args: callee_args, ..SidecarSpec::new("api", app.addr) }).await;
    let caller = Sidecar::start(
        &cp,
        TD,
        SidecarSpec { service: "web", app: web_app.addr, upstreams, labels: &[], extra_args: caller_args },
    )
    .await;
    caller.wait_endpoints("api", 1, Duration::from_secs(10)).await;
    Pair { _cp: cp, caller, callee, _apps: vec![app, web_app] }
}

/// A lone sidecar (its outbound listener is what is tested) with `args`.
async fn lone(args: &[&str]) -> (ControlPlane, Sidecar, servers::Server) {
    let cp = ControlPlane::start(TD, &[]).await;
    let app = servers::http("web").await;
    let sidecar = Sidecar::start(
        &cp,
        TD,
        SidecarSpec { service: "web", app: app.addr, upstreams: &[], labels: &[], extra_args: args },
    )
    .await;
    (cp, sidecar, app)
}

#[tokio::test(flavor = "multi_thread")]
async fn large_headers_pass_every_hop_and_too_large_ones_get_431_from_the_callers_sidecar() {
    let m = pair(servers::http("api").await, &[], &[]).await;
    let app = App::of(&m.caller);

    // 40 KiB of cookie: above HTTP/2's usual 16 KiB, under the 64 KiB default.
    let cookie = format!("session={}", "c".repeat(40 * 1024));
    let r = app.req(Method::GET, "api", "/echo-headers", &[("cookie", &cookie)]).await;
    assert_eq!(r.status, 200, "a 40 KiB request header must reach the app: {}", &r.body[..r.body.len().min(300)]);
    assert!(r.body.contains(&cookie), "the app did not get the whole cookie");

    // 40 KiB spread over 150 fields also passes the caller's sidecar (hyper's own
    // default is 100 fields, which answered 431 with an empty body); 404: no such service.
    let fields: Vec<(String, String)> = (0..150).map(|i| (format!("x-f{i}"), "v".repeat(270))).collect();
    let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = app.req(Method::GET, "nowhere", "/", &fields).await;
    assert_eq!(r.status, 404, "150 header fields must be parsed: {}", r.body);

    // A 40 KiB response header comes back whole.
    let r = app.get("api", "/response-header/40960").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-big").len(), 40960);

    // 100 KiB: refused by the caller's own sidecar, naming the limit.
    let cookie = "c".repeat(100 * 1024);
    let r = app.req(Method::GET, "api", "/echo-headers", &[("cookie", &cookie)]).await;
    assert_eq!(r.status, 431, "{}", r.body);
    assert_eq!(r.header("server"), "weft");
    assert!(r.body.contains("request from the app") && r.body.contains("--max-header-bytes"), "{}", r.body);
    assert!(r.body.contains("65536"), "the body names the limit: {}", r.body);
    let caller = m.caller.metrics().await;
    let refused = ["direction=\"outbound\"", "message=\"request\""];
    assert_eq!(metric_sum(&caller, "weft_proxy_headers_too_large_total", &refused), 1.0, "{caller}");
    // The callee never saw it: only the two requests above reached it.
    let callee = m.callee.metrics().await;
    assert_eq!(metric_sum(&callee, "weft_proxy_requests_total", &["direction=\"inbound\""]), 2.0, "{callee}");
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_response_headers_are_a_local_limit_and_never_eject_the_endpoint() {
    let m = pair(servers::http("api").await, &[], &[]).await;
    let app = App::of(&m.caller);
    let mut replies = Vec::new();
    for _ in 0..8 {
        replies.push(app.get("api", "/response-header/102400").await);
    }
    let caller = m.caller.metrics().await;
    assert_eq!(metric_sum(&caller, "weft_proxy_endpoint_ejections_total", &[]), 0.0, "{caller}");
    for r in replies {
        assert_eq!(r.status, 502, "{}", r.body);
        assert!(r.body.contains("response from the local app") && r.body.contains("--max-header-bytes"), "{}", r.body);
    }
    let callee = m.callee.metrics().await;
    let hit = ["direction=\"inbound\"", "message=\"response\""];
    assert_eq!(metric_sum(&callee, "weft_proxy_headers_too_large_total", &hit), 8.0, "{callee}");
    // The endpoint still serves.
    let r = app.get("api", "/still-there").await;
    assert_eq!((r.status, r.body.as_str()), (200, "api /still-there"));
}

/// Reads until the peer closes (EOF or reset); the time it took.
async fn closed_within(tcp: &mut tokio::net::tcp::OwnedReadHalf, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((start + limit).into(), tcp.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn slowloris_connections_are_closed_after_the_header_read_timeout() {
    let (_cp, sidecar, _app) = lone(&["--header-read-timeout", "2s"]).await;
    const N: usize = 60;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..N {
        let addr = sidecar.outbound;
        tasks.push(tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let (mut rd, mut wr) = tcp.into_split();
            let writer = tokio::spawn(async move {
                let _ = wr.write_all(b"GET / HTTP/1.1\r\nHost: api\r\n").await;
                for n in 0.. {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if wr.write_all(format!("x-slow-{i}-{n}: 1\r\n").as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
            let closed = closed_within(&mut rd, Duration::from_secs(10)).await;
            writer.abort();
            closed
        }));
    }
    for t in tasks {
        let closed = t.await.unwrap();
        assert!(closed.is_some(), "a slowloris connection was still open after 10 s");
    }
    assert!(start.elapsed() < Duration::from_secs(7), "closing took {:?}", start.elapsed());
    let metrics = sidecar.metrics().await;
    let labels = ["listener=\"outbound\"", "reason=\"header_read\""];
    assert_eq!(metric_sum(&metrics, "weft_proxy_listener_timeouts_total", &labels), N as f64, "{metrics}");
    assert!(metric_sum(&metrics, "weft_proxy_listener_accepted_total", &["listener=\"outbound\""]) >= N as f64);
    // And the listener still serves (404: "nowhere" is no service of the mesh).
    let r = App::of(&sidecar).get("nowhere", "/").await;
    assert_eq!(r.status, 404, "{}", r.body);
}

/// Sends one keep-alive request on `tcp` and reads its whole response (Content-Length).
async fn exchange(tcp: &mut TcpStream) -> String {
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: nowhere\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut chunk)).await.expect("a response").unwrap();
        assert!(n > 0, "closed before the response ended");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| l.strip_prefix("content-length: ").and_then(|v| v.trim().parse::<usize>().ok()))
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return text;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_keep_alive_connections_are_closed_after_the_idle_timeout() {
    let (_cp, sidecar, _app) = lone(&["--idle-timeout", "2s", "--header-read-timeout", "10s"]).await;
    let mut tcp = TcpStream::connect(sidecar.outbound).await.unwrap();
    let first = exchange(&mut tcp).await;
    assert!(first.starts_with("HTTP/1.1 404"), "{first}");
    // Still open well inside the idle timeout: a second request is served.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    exchange(&mut tcp).await;
    let (mut rd, _wr) = tcp.into_split();
    let closed = closed_within(&mut rd, Duration::from_secs(8)).await.expect("idle connection closed");
    assert!(closed > Duration::from_millis(1500) && closed < Duration::from_secs(4), "closed after {closed:?}");
    let metrics = sidecar.metrics().await;
    let labels = ["listener=\"outbound\"", "reason=\"idle\""];
    assert_eq!(metric_sum(&metrics, "weft_proxy_listener_timeouts_total", &labels), 1.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn at_max_connections_new_connections_wait_and_the_open_ones_keep_being_served() {
    let (_cp, sidecar, _app) = lone(&["--max-connections", "20"]).await;
    let mut open = Vec::new();
    for _ in 0..20 {
        let mut tcp = TcpStream::connect(sidecar.outbound).await.unwrap();
        exchange(&mut tcp).await;
        open.push(tcp);
    }
    // The 21st gets through TCP (the kernel's backlog) but is not served.
    let mut extra = TcpStream::connect(sidecar.outbound).await.unwrap();
    extra.write_all(b"GET / HTTP/1.1\r\nHost: nowhere\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let early = tokio::time::timeout(Duration::from_millis(1500), extra.read(&mut buf)).await;
    assert!(early.is_err(), "a 21st connection was served over --max-connections 20");
    let metrics = sidecar.metrics().await;
    assert!(
        metric_sum(&metrics, "weft_proxy_listener_at_capacity_total", &["listener=\"outbound\""]) >= 1.0,
        "{metrics}"
    );
    assert_eq!(metric_sum(&metrics, "weft_proxy_listener_open_connections", &["listener=\"outbound\""]), 20.0);
    // The open ones are still served.
    exchange(&mut open[3]).await;
    // One closes: the waiting one is taken and answered.
    drop(open.pop());
    let n = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf)).await.expect("served once a slot freed");
    assert!(String::from_utf8_lossy(&buf[..n.unwrap()]).starts_with("HTTP/1.1 404"));
}

#[tokio::test(flavor = "multi_thread")]
async fn three_hundred_tunnels_to_one_peer_survive_simultaneous_small_writes() {
    let m = pair(servers::tcp_echo_or_http().await, &[], &["api"]).await;
    let upstream = m.caller.upstream("api");
    const N: usize = 300;
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let mut tasks = Vec::new();
    for i in 0..N {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut tcp = TcpStream::connect(upstream).await.map_err(|e| format!("{i}: connect: {e}"))?;
            echo(&mut tcp, format!("hello {i}\n").as_bytes()).await.map_err(|e| format!("{i}: first echo: {e}"))?;
            // All open at once; then all write a few bytes at the same moment, repeatedly.
            for round in 0..5 {
                // A tunnel that never opened must not hold the others forever.
                tokio::time::timeout(Duration::from_secs(15), barrier.wait())
                    .await
                    .map_err(|_| format!("{i}: round {round}: other tunnels never got there"))?;
                let msg = format!("{round}:{i};");
                echo(&mut tcp, msg.as_bytes()).await.map_err(|e| format!("{i}: round {round}: {e}"))?;
            }
            Ok::<_, String>(tcp)
        }));
    }
    let mut tunnels = Vec::new();
    let mut failed = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(25);
    for t in tasks {
        match tokio::time::timeout_at(deadline, t).await {
            Ok(Ok(Ok(tcp))) => tunnels.push(tcp),
            Ok(Ok(Err(e))) => failed.push(e),
            Ok(Err(e)) => failed.push(e.to_string()),
            Err(_) => failed.push("stalled".into()),
        }
    }
    assert!(failed.is_empty(), "{} of {N} tunnels failed: {:?}", failed.len(), &failed[..failed.len().min(5)]);
    // Every tunnel still works, and HTTP to the same peer too.
    for (i, tcp) in tunnels.iter_mut().enumerate() {
        echo(tcp, format!("after {i}").as_bytes()).await.unwrap();
    }
    let r = App::of(&m.caller).get("api", "/").await;
    assert_eq!((r.status, r.body.as_str()), (200, "echo-http"));
    let caller = m.caller.metrics().await;
    let pooled = metric_sum(&caller, "weft_proxy_connections_total", &["direction=\"outbound\"", "protocol=\"mtls\""]);
    assert!((2.0..=4.0).contains(&pooled), "pooled connections opened: {pooled}");
}

/// Writes `msg` and reads the same bytes back within 10 s.
async fn echo(tcp: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    tcp.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut back))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no echo within 10 s"))??;
    if back != msg {
        return Err(std::io::Error::other(format!("echo differs: {:?}", String::from_utf8_lossy(&back))));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_app_closing_idle_keep_alives_costs_no_request() {
    let (app, answered) = servers::http1_closing_idle(Duration::from_millis(200)).await;
    // Declared, so no protocol probe reaches this app and every answer it counts is a request.
    let m = pair_with(app, &["--app-protocol", "http1"], &[], &[]).await;
    let client = App::of(&m.caller);
    let mut failures = Vec::new();
    for i in 0..60u64 {
        // Around the app's idle close: 185..215 ms after the last answer.
        tokio::time::sleep(Duration::from_millis(185 + (i * 7) % 31)).await;
        let path = format!("/r{i}");
        match client.send(Method::GET, "api", &path, &[]).await {
            Ok(r) if r.status == 200 && r.body == format!("ok {path}") => {}
            Ok(r) => failures.push(format!("{path}: {} {}", r.status, r.body)),
            Err(e) => failures.push(format!("{path}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{} of 60 failed: {failures:?}", failures.len());
    assert_eq!(answered.load(std::sync::atomic::Ordering::SeqCst), 60);
}
