//! End to end, the balancer in production shape: a real control plane, a
//! caller's sidecar and two replicas of `api` (each a real sidecar process
//! in front of its own HTTP server), over mutual TLS on loopback.
//!
//! - identical replicas get even shares under steady load;
//! - a replica restarted is not flooded while its app warms up and comes
//!   back to an even share (slow start from a neutral estimate, not a stale
//!   or optimistic one);
//! - a replica whose app died is not-ready on /ready, is probed rather than
//!   sent traffic after each ejection, and costs callers nothing (its sidecar
//!   says the request never reached the app, the caller sends it elsewhere);
//! - a pod-style shutdown (app and sidecar stopped together) loses no
//!   request, even POSTs, nor does an app closing its listener with
//!   connections queued (its sidecar tells the reset from an answer);
//! - TCP tunnels (`--upstream`) move off a replica whose app refuses them,
//!   which is then not-ready, ejected and probed like one serving HTTP.
//!
//! Every loop is bounded in requests and time; the shares asserted are wide
//! enough for a loaded 2-core machine.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use weft_testkit::mesh::App;
use weft_testkit::{http_get, metric_sum, wait_metric, ControlPlane, Sidecar, SidecarSpec};

const TD: &str = "example.org";

/// How a replica's app answers: after `delay`, and, once, a warm-up: every
/// request arriving within `warm_up` of its first one waits until then (a
/// cache filled or code compiled on first use, as a JVM app does).
#[derive(Clone, Copy, Debug, Default)]
struct Pace {
    delay: Duration,
    warm_up: Duration,
}

/// What a replica's app saw: requests in progress, and the most at once
/// during its warm-up.
#[derive(Debug, Default)]
struct AppLoad {
    now: AtomicUsize,
    peak_warming: AtomicUsize,
    warm_at: Mutex<Option<Instant>>,
}

/// An HTTP/1.1 app answering `<name> <path>` on every request, one request
/// per connection (so when it stops, no kept-alive connection serves on).
/// Stopping it closes its listener: new connections are refused, requests
/// already accepted are answered, as an app does on SIGTERM.
struct Replica {
    addr: SocketAddr,
    accept: Option<tokio::task::JoinHandle<()>>,
    load: Arc<AppLoad>,
}

impl Replica {
    async fn start_paced(name: &'static str, pace: Pace) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::serve(name, l, pace)
    }

    /// Serves again on the same address.
    async fn restart(&mut self, name: &'static str) {
        self.restart_paced(name, Pace::default()).await
    }

    /// Serves again on the same address, at `pace` (a fresh warm-up).
    async fn restart_paced(&mut self, name: &'static str, pace: Pace) {
        self.stop();
        let l = TcpListener::bind(self.addr).await.expect("rebind the app's port");
        *self = Self::serve(name, l, pace);
    }

    fn serve(name: &'static str, l: TcpListener, pace: Pace) -> Self {
        let addr = l.local_addr().expect("addr");
        let load = Arc::new(AppLoad::default());
        let app_load = load.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = l.accept().await else { continue };
                let load = app_load.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let load = load.clone();
                        async move {
                            let warm_at =
                                *load.warm_at.lock().unwrap().get_or_insert_with(|| Instant::now() + pace.warm_up);
                            let n = load.now.fetch_add(1, Ordering::SeqCst) + 1;
                            if Instant::now() < warm_at {
                                load.peak_warming.fetch_max(n, Ordering::SeqCst);
                                tokio::time::sleep_until(warm_at.into()).await;
                            }
                            tokio::time::sleep(pace.delay).await;
                            load.now.fetch_sub(1, Ordering::SeqCst);
                            let body = format!("{name} {}", req.uri().path());
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(false)
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self { addr, accept: Some(accept), load }
    }

    fn stop(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Mesh {
    cp: ControlPlane,
    client: Sidecar,
    sidecars: [Sidecar; 2],
    replicas: [Replica; 2],
    _web: weft_testkit::servers::Server,
}

const NAMES: [&str; 2] = ["a", "b"];

async fn mesh() -> Mesh {
    mesh_paced(Pace::default()).await
}

/// The mesh with both replicas' apps answering at `pace`.
async fn mesh_paced(pace: Pace) -> Mesh {
    let cp = ControlPlane::start(TD, &[]).await;
    let replicas = [Replica::start_paced(NAMES[0], pace).await, Replica::start_paced(NAMES[1], pace).await];
    let web = weft_testkit::servers::http("web").await;
    let sidecars = [
        Sidecar::start(&cp, TD, SidecarSpec::new("api", replicas[0].addr)).await,
        Sidecar::start(&cp, TD, SidecarSpec::new("api", replicas[1].addr)).await,
    ];
    let client = Sidecar::start(&cp, TD, SidecarSpec::new("web", web.addr)).await;
    client.wait_endpoints("api", 2, Duration::from_secs(10)).await;
    Mesh { cp, client, sidecars, replicas, _web: web }
}

/// Answers per replica and failures (the first few kept) over some requests.
#[derive(Debug, Default)]
struct Shares {
    by: [usize; 2],
    failed: usize,
    failures: Vec<String>,
}

impl Shares {
    fn share(&self, i: usize) -> f64 {
        self.by[i] as f64 / (self.by[0] + self.by[1]).max(1) as f64
    }

    fn add(&mut self, o: Shares) {
        self.by[0] += o.by[0];
        self.by[1] += o.by[1];
        self.failed += o.failed;
        self.failures.extend(o.failures.into_iter().take(10 - self.failures.len().min(10)));
    }
}

/// `n` requests (`method`) to `api` from `workers` concurrent callers, or
/// fewer if `limit` passes first.
async fn load(app: &App, method: Method, n: usize, workers: usize, limit: Duration) -> Shares {
    let start = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let (app, method) = (app.clone(), method.clone());
            tokio::spawn(async move {
                let mut s = Shares::default();
                for i in 0..n / workers {
                    if start.elapsed() > limit {
                        break;
                    }
                    let path = format!("/w{w}/{i}");
                    match app.send(method.clone(), "api", &path, &[]).await {
                        Ok(r) if r.status == 200 && r.body == format!("a {path}") => s.by[0] += 1,
                        Ok(r) if r.status == 200 && r.body == format!("b {path}") => s.by[1] += 1,
                        Ok(r) => {
                            s.failed += 1;
                            s.failures.push(format!("{path} at {:?}: {} {}", start.elapsed(), r.status, r.body));
                        }
                        Err(e) => {
                            s.failed += 1;
                            s.failures.push(format!("{path} at {:?}: {e}", start.elapsed()));
                        }
                    }
                }
                s
            })
        })
        .collect();
    let mut all = Shares::default();
    for t in tasks {
        all.add(t.await.expect("load worker"));
    }
    all
}

fn assert_even(s: &Shares, what: &str) {
    for (i, name) in NAMES.iter().enumerate() {
        let share = s.share(i);
        assert!((0.425..=0.575).contains(&share), "{what}: replica {name} got {share:.3} of the traffic: {s:?}");
    }
}

/// Identical replicas split steady load within ±15 % of even, even one
/// request at a time, where P2C compares the two on latency alone (before
/// the fix: 12,836 to 79, the one measured slower once starved for good).
#[tokio::test(flavor = "multi_thread")]
async fn identical_replicas_get_even_shares() {
    let m = mesh().await;
    let app = App::of(&m.client);
    let warm = load(&app, Method::GET, 100, 1, Duration::from_secs(30)).await;
    assert_eq!(warm.failed, 0, "{warm:?}");
    let s = load(&app, Method::GET, 3000, 1, Duration::from_secs(120)).await;
    eprintln!("shares: {s:?}");
    assert_eq!(s.failed, 0, "{s:?}");
    assert!(s.by[0] + s.by[1] >= 1000, "too few requests answered: {s:?}");
    assert_even(&s, "steady load");
}

/// A replica restarted (app and sidecar, same address and identity) whose
/// app warms up on its first requests is neither flooded while it warms
/// nor starved after, and gets back to an even share, losing no request.
///
/// The apps answer in 20 ms; twelve callers at once. A restarted endpoint with
/// the optimistic default estimate (1 ms, far under its peer's 20 ms) drew
/// every caller onto the warming replica at once (all twelve waited out its
/// warm-up); from its peer's estimate and in slow start (twice the cost at
/// first) it gets at most about half of them (7 of 12 seen on a loaded
/// machine) until its first answers come back (its estimate decays while it
/// has no answer).
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_replica_is_not_flooded_and_recovers_its_share() {
    const CALLERS: usize = 12;
    let pace = Pace { delay: Duration::from_millis(20), warm_up: Duration::ZERO };
    let mut m = mesh_paced(pace).await;
    let app = App::of(&m.client);
    let warm = load(&app, Method::GET, 400, CALLERS, Duration::from_secs(30)).await;
    assert_eq!(warm.failed, 0, "{warm:?}");

    // A pod-style stop (SIGTERM to app and sidecar) between loads: the stop
    // under load is `pod_shutdown_loses_no_request`'s subject, not this one's.
    m.replicas[1].stop();
    let pid = m.sidecars[1].proc_.pid();
    tokio::task::block_in_place(|| m.sidecars[1].proc_.terminate(Duration::from_secs(20)))
        .unwrap_or_else(|| panic!("b's sidecar (pid {pid}) did not exit within 20 s of SIGTERM"));

    // Load from twelve callers while b is down and through its start.
    let running = Arc::new(AtomicBool::new(true));
    let during = {
        let (app, running) = (app.clone(), running.clone());
        tokio::spawn(async move {
            let mut all = Shares::default();
            while running.load(Ordering::SeqCst) {
                // Long batches: a caller done with its batch idles until the
                // batch ends, and could not be drawn to b.
                all.add(load(&app, Method::GET, 100 * CALLERS, CALLERS, Duration::from_secs(30)).await);
            }
            all
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let warm_up = Duration::from_millis(300);
    m.replicas[1].restart_paced(NAMES[1], Pace { warm_up, ..pace }).await;
    m.sidecars[1].respawn(&m.cp, true).await;
    m.client.wait_endpoints("api", 2, Duration::from_secs(10)).await;
    // b gets traffic again (after its probe, if it was ejected) and warms up.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let warm_at = *m.replicas[1].load.warm_at.lock().unwrap();
        if warm_at.is_some_and(|t| Instant::now() > t + Duration::from_millis(200)) {
            break;
        }
        assert!(Instant::now() < deadline, "b's app got no request 60 s after its restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.store(false, Ordering::SeqCst);
    let across = during.await.expect("load");
    assert_eq!(across.failed, 0, "requests lost across b's restart: {across:?}");
    let peak = m.replicas[1].load.peak_warming.load(Ordering::SeqCst);
    eprintln!("b's app had at most {peak} of {CALLERS} callers' requests at once while warming up");
    assert!(peak <= 9, "the restarted replica drew {peak} of {CALLERS} callers at once while warming up");

    // Rounds of 300 requests, at most 20: one must be near even (neither
    // starved by its slow warm-up answers nor flooded).
    let mut rounds = Vec::new();
    for _ in 0..20 {
        let s = load(&app, Method::GET, 300, CALLERS, Duration::from_secs(30)).await;
        assert_eq!(s.failed, 0, "after the restart: {s:?}");
        let share = s.share(1);
        rounds.push(share);
        if (0.4..=0.6).contains(&share) {
            eprintln!("b's share by round after its restart: {rounds:.3?}");
            return;
        }
    }
    panic!("b's share never came back near even after its restart: {rounds:.3?}");
}

/// A replica whose app died: its sidecar says not-ready (with the reason),
/// callers lose nothing, and after the first ejection it is probed instead
/// of sent real requests. When the app is back it is ready again and
/// gets its share back.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_app_is_not_ready_probed_and_costs_callers_nothing() {
    let mut m = mesh().await;
    let app = App::of(&m.client);
    let warm = load(&app, Method::GET, 200, 2, Duration::from_secs(30)).await;
    assert_eq!(warm.failed, 0, "{warm:?}");
    let refused_at_b =
        |text: &str| metric_sum(text, "weft_proxy_requests_total", &["direction=\"inbound\"", "code=\"502\""]);
    assert_eq!(refused_at_b(&m.sidecars[1].metrics().await), 0.0);

    m.replicas[1].stop();
    // A bounded stretch of load (20 s at most) spanning several ejection lapses.
    let dead = load(&app, Method::GET, 100_000, 2, Duration::from_secs(20)).await;
    eprintln!("with b's app dead: {dead:?}");
    // Without the resend, the 5 refused before b's ejection failed; without
    // telling a reset by a closed listener from an answer, a request caught
    // in the stopping app's accept queue (one per caller) did.
    assert_eq!(dead.failed, 0, "requests lost: {:?}", dead.failures);
    assert!(dead.by[0] >= 200, "a served too little: {dead:?}");
    // Without probes, every lapse (2 s, 4 s, 8 s…) sent b 5 real requests more.
    let at_b = refused_at_b(&m.sidecars[1].metrics().await);
    assert!(at_b <= 12.0, "b's sidecar was sent {at_b} requests its app refused");

    let (status, body) = http_get(m.sidecars[1].admin, "/ready").await.expect("b's admin answers");
    assert_eq!(status, 503, "b's sidecar still says ready: {body}");
    assert!(body.contains("refuses connections"), "/ready gives no reason: {body}");

    m.replicas[1].restart(NAMES[1]).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while http_get(m.sidecars[1].admin, "/ready").await.map(|r| r.0).ok() != Some(200) {
        assert!(Instant::now() < deadline, "b's sidecar not ready 15 s after its app came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Probed healthy at its next lapse (≤ 60 s), then slow start: b serves again.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let s = load(&app, Method::GET, 200, 2, Duration::from_secs(30)).await;
        assert_eq!(s.failed, 0, "after b's app came back: {s:?}");
        if s.by[1] > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "b got no traffic 90 s after its app came back");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A pod's app and sidecar get SIGTERM together while POSTs flow: none is
/// lost. Requests the dying app refused were never sent, so the caller's
/// sidecar sends them to the other replica, whatever the method.
#[tokio::test(flavor = "multi_thread")]
async fn pod_shutdown_loses_no_request() {
    let mut m = mesh().await;
    let app = App::of(&m.client);
    let warm = load(&app, Method::POST, 200, 2, Duration::from_secs(30)).await;
    assert_eq!(warm.failed, 0, "{warm:?}");
    assert!(warm.by[1] > 0, "b served nothing before its shutdown: {warm:?}");

    let running = Arc::new(AtomicBool::new(true));
    let during = {
        let (app, running) = (app.clone(), running.clone());
        tokio::spawn(async move {
            let mut all = Shares::default();
            while running.load(Ordering::SeqCst) {
                all.add(load(&app, Method::POST, 20, 2, Duration::from_secs(30)).await);
            }
            all
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SIGTERM to both: the app stops accepting at once, the sidecar drains.
    m.replicas[1].stop();
    let pid = m.sidecars[1].proc_.pid();
    let status = tokio::task::block_in_place(|| m.sidecars[1].proc_.terminate(Duration::from_secs(20)))
        .unwrap_or_else(|| panic!("b's sidecar (pid {pid}) did not exit within 20 s of SIGTERM"));
    assert!(status.success(), "b's sidecar exited with {status}");
    m.client.wait_endpoints("api", 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.store(false, Ordering::SeqCst);
    let s = during.await.expect("load");
    eprintln!("across the shutdown: {s:?}");
    assert_eq!(s.failed, 0, "requests lost across the pod's shutdown: {:?}", s.failures);
    assert!(s.by[0] >= 50, "too few requests across the shutdown: {s:?}");
}

/// Requests queued at an app that stops listening never reached it: the
/// kernel resets the connections still in the listener's accept queue when
/// it closes. b's sidecar says so, and the caller's sidecar sends them to a,
/// GETs and POSTs alike (before the fix, each was a 502 "Connection reset by
/// peer").
#[tokio::test(flavor = "multi_thread")]
async fn requests_queued_at_an_app_that_stops_listening_go_to_the_other_replica() {
    let mut m = mesh().await;
    let app = App::of(&m.client);
    let warm = load(&app, Method::GET, 20, 2, Duration::from_secs(30)).await;
    assert_eq!(warm.failed, 0, "{warm:?}");

    // b's app becomes a listener that never accepts: connections to it
    // complete in the kernel and wait in its queue.
    m.replicas[1].stop();
    let addr = m.replicas[1].addr;
    let deadline = Instant::now() + Duration::from_secs(5);
    let queue = loop {
        // The aborted accept task closes the old listener soon, not at once.
        match std::net::TcpListener::bind(addr) {
            Ok(l) => break l,
            Err(e) if Instant::now() < deadline => {
                eprintln!("rebinding b's app port: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("rebind b's app port {addr}: {e}"),
        }
    };
    let loads: Vec<_> = [Method::GET, Method::POST]
        .into_iter()
        .map(|method| {
            let app = app.clone();
            tokio::spawn(async move { load(&app, method, 200, 3, Duration::from_secs(20)).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let queued = accept_queue(addr);
        if queued >= 2 {
            eprintln!("{queued} connections queued at b's app");
            break;
        }
        assert!(Instant::now() < deadline, "no request reached b's app queue within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(queue);
    let mut s = Shares::default();
    for l in loads {
        s.add(l.await.expect("load"));
    }
    eprintln!("across b's app closing its listener: {s:?}");
    assert_eq!(s.failed, 0, "requests queued at b's app were lost: {:?}", s.failures);
    assert!(s.by[0] >= 100, "a served too few: {s:?}");
}

/// Connections waiting in the accept queue of the listener at `addr` (ss's Recv-Q).
fn accept_queue(addr: SocketAddr) -> usize {
    let out = std::process::Command::new("ss")
        .args(["-Hltn", &format!("sport = :{}", addr.port())])
        .output()
        .expect("run ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().filter_map(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok()).sum()
}

/// A TCP app answering every connection with `<name>:` and what it read,
/// until the caller shuts its side. Stopping it closes its listener (new
/// connections are refused).
struct TcpReplica {
    addr: SocketAddr,
    accept: Option<tokio::task::JoinHandle<()>>,
}

impl TcpReplica {
    async fn start(name: &'static str) -> Self {
        // Outside the ephemeral range and claimed across test processes: while
        // stopped, no other test's socket may take the port (a listener there
        // would make the stopped app look up again).
        Self::serve(name, TcpListener::bind(weft_testkit::free_addr()).await.expect("bind"))
    }

    fn serve(name: &'static str, l: TcpListener) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = l.local_addr().expect("addr");
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = l.accept().await else { continue };
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    if tcp.read_to_end(&mut got).await.is_ok() {
                        let _ = tcp.write_all(format!("{name}:").as_bytes()).await;
                        let _ = tcp.write_all(&got).await;
                        let _ = tcp.shutdown().await;
                    }
                });
            }
        });
        Self { addr, accept: Some(accept) }
    }

    async fn restart(&mut self, name: &'static str) {
        self.stop();
        *self = Self::serve(name, TcpListener::bind(self.addr).await.expect("rebind the app's port"));
    }

    fn stop(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
        }
    }
}

impl Drop for TcpReplica {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Opens `n` TCP connections (at most `limit` of time) to the caller's
/// `--upstream db` port, each sending one line; counts which replica
/// answered and which connections failed.
async fn tunnels(client: &Sidecar, n: usize, limit: Duration) -> Shares {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let start = Instant::now();
    let mut s = Shares::default();
    for i in 0..n {
        if start.elapsed() > limit {
            break;
        }
        let line = format!("ping {i}\n");
        let answer = async {
            let mut tcp = tokio::net::TcpStream::connect(client.upstream("db")).await?;
            tcp.write_all(line.as_bytes()).await?;
            tcp.shutdown().await?;
            let mut got = String::new();
            tcp.read_to_string(&mut got).await?;
            Ok::<_, std::io::Error>(got)
        };
        match tokio::time::timeout(Duration::from_secs(10), answer).await {
            Ok(Ok(got)) if got == format!("a:{line}") => s.by[0] += 1,
            Ok(Ok(got)) if got == format!("b:{line}") => s.by[1] += 1,
            other => {
                s.failed += 1;
                if s.failures.len() < 10 {
                    s.failures.push(format!("connection {i} at {:?}: {other:?}", start.elapsed()));
                }
            }
        }
    }
    s
}

/// TCP tunnels (`--upstream`) share the requests' health logic: a tunnel
/// the callee's app refuses is opened at the other replica before any byte
/// is carried (no caller connection fails), the refusing replica's sidecar
/// says not-ready, its endpoint is ejected and then probed (counted in
/// `weft_proxy_endpoint_probes_total`) rather than sent tunnels, and once
/// its app is back it carries tunnels again.
#[tokio::test(flavor = "multi_thread")]
async fn tcp_tunnels_move_off_an_app_that_refuses() {
    let cp = ControlPlane::start(TD, &[]).await;
    let mut apps = [TcpReplica::start(NAMES[0]).await, TcpReplica::start(NAMES[1]).await];
    let web = weft_testkit::servers::http("web").await;
    let sidecars = [
        Sidecar::start(&cp, TD, SidecarSpec::new("db", apps[0].addr)).await,
        Sidecar::start(&cp, TD, SidecarSpec::new("db", apps[1].addr)).await,
    ];
    let client = Sidecar::start(&cp, TD, SidecarSpec { upstreams: &["db"], ..SidecarSpec::new("web", web.addr) }).await;
    client.wait_endpoints("db", 2, Duration::from_secs(10)).await;

    let before = tunnels(&client, 40, Duration::from_secs(30)).await;
    assert_eq!(before.failed, 0, "{before:?}");
    assert!(before.by[0] > 0 && before.by[1] > 0, "both replicas carry tunnels: {before:?}");

    apps[1].stop();
    // The first refused tunnels turn b not-ready (before any probe of b,
    // which could do so too, is due: b's first ejection lasts 2 s).
    let mut dead = tunnels(&client, 10, Duration::from_secs(30)).await;
    let probed = |text: &str| metric_sum(text, "weft_proxy_endpoint_probes_total", &["service=\"db\""]);
    let (status, body) = http_get(sidecars[1].admin, "/ready").await.expect("b's admin answers");
    if probed(&client.metrics().await) == 0.0 {
        assert_eq!(status, 503, "b's sidecar still says ready after refused tunnels: {body}");
    } else {
        eprintln!("b was probed already (a slow run): its /ready after refused tunnels is not checked");
    }
    // Long enough for b's first ejection (2 s) to lapse and its probe to fail.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(6) {
        dead.add(tunnels(&client, 20, Duration::from_secs(30)).await);
    }
    eprintln!("with b's app refusing: {dead:?}");
    assert_eq!(dead.failed, 0, "tunnels failed instead of moving to a: {:?}", dead.failures);
    assert_eq!(dead.by[1], 0, "b answered with its app stopped: {dead:?}");

    let (status, body) = http_get(sidecars[1].admin, "/ready").await.expect("b's admin answers");
    assert_eq!(status, 503, "b's sidecar still says ready with its app refusing tunnels: {body}");
    assert!(body.contains("refuses connections"), "/ready gives no reason: {body}");
    let text = client.metrics().await;
    assert!(metric_sum(&text, "weft_proxy_endpoint_ejections_total", &[]) >= 1.0, "b was never ejected:\n{text}");
    let probes = wait_metric(
        client.admin,
        "weft_proxy_endpoint_probes_total",
        &["service=\"db\"", "result=\"unhealthy\""],
        1.0,
        Duration::from_secs(20),
    )
    .await;
    assert!(probes >= 1.0);

    // b's app back: ready again, probed healthy at its next lapse, carries tunnels.
    apps[1].restart(NAMES[1]).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let s = tunnels(&client, 20, Duration::from_secs(30)).await;
        assert_eq!(s.failed, 0, "after b's app came back: {s:?}");
        if s.by[1] > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "b carried no tunnel 90 s after its app came back");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(http_get(sidecars[1].admin, "/ready").await.map(|r| r.0).ok(), Some(200), "b is not ready again");
    let healthy = metric_sum(
        &client.metrics().await,
        "weft_proxy_endpoint_probes_total",
        &["service=\"db\"", "result=\"healthy\""],
    );
    assert!(healthy >= 1.0, "b came back without a passing probe");
    drop(cp);
}
