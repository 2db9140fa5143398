//! End to end: endpoint churn leaves nothing behind. Hundreds of endpoints of
//! `api` register (real `Config.Watch` streams with a real SVID, each with
//! its own inbound address: a TCP relay to the real `api` sidecar), the
//! `web` sidecar calls them — creating balancer statistics and pooled mTLS
//! connections — and then they leave. The sidecar's
//! `weft_proxy_balancer_endpoints` and `weft_proxy_pool_connections` must
//! return to their base, its pooled connections must close, and its resident
//! memory must not grow from one churn round to the next.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use weft_certs::{pki, TrustBundle, TrustDomain};
use weft_proto::config::v1::config_client::ConfigClient;
use weft_proto::config::v1::WatchRequest;
use weft_proxy::identity::Identity;
use weft_proxy::metrics::Metrics;
use weft_testkit::servers;
use weft_testkit::{http_get_host, metric_sum, ControlPlane, Sidecar, SidecarSpec};

const TD: &str = "example.org";
/// Endpoints that come and go in each round.
const CHURN: usize = 200;
/// Watch streams per control-plane connection.
const STREAMS_PER_CONN: usize = 50;

/// Relays every connection to `to`, counting those open.
async fn relay(to: SocketAddr, open: Arc<AtomicUsize>) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
    let addr = listener.local_addr().expect("relay address");
    let task = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let open = open.clone();
            tokio::spawn(async move {
                let Ok(mut upstream) = TcpStream::connect(to).await else { return };
                open.fetch_add(1, Ordering::SeqCst);
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut upstream).await;
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, task)
}

/// `web`'s worker threads: each keeps its own pooled connections.
const WEB_WORKERS: usize = 2;

/// The value of a gauge on a sidecar's /metrics.
async fn gauge(sidecar: &Sidecar, name: &str) -> f64 {
    metric_sum(&sidecar.metrics().await, name, &[])
}

/// Waits until `name` on `sidecar` passes `ok` (described by `want`); panics after `timeout`.
async fn wait_gauge(sidecar: &Sidecar, name: &str, ok: impl Fn(f64) -> bool, want: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let v = gauge(sidecar, name).await;
        if ok(v) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} = {v}, want {want} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Current resident set size (VmRSS) of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line")
}

/// One round: `CHURN` endpoints register, `web` calls through them, they leave.
async fn churn_round(cp: &ControlPlane, identity: &Identity, api: &Sidecar, web: &Sidecar, base: (f64, f64)) {
    let open = Arc::new(AtomicUsize::new(0));
    let mut relays = Vec::new();
    for _ in 0..CHURN {
        relays.push(relay(api.inbound, open.clone()).await);
    }
    // Each watch stream is one registered endpoint, for as long as it is open.
    let mut streams = Vec::new();
    let mut channel = None;
    for (i, (addr, _)) in relays.iter().enumerate() {
        if i % STREAMS_PER_CONN == 0 {
            channel = Some(identity.control_plane_channel(true).expect("control-plane channel"));
        }
        let mut client = ConfigClient::new(channel.clone().expect("a channel"));
        let req = WatchRequest {
            service: "api".into(),
            inbound_address: addr.to_string(),
            labels: Default::default(),
            admin_address: "127.0.0.1:9".into(),
            ..Default::default()
        };
        let mut stream = client.watch(req).await.expect("Config.Watch").into_inner();
        // Read the snapshots (so the control plane never buffers for us).
        streams.push(tokio::spawn(async move { while let Ok(Some(_)) = stream.message().await {} }));
    }
    web.wait_endpoints("api", CHURN + 1, Duration::from_secs(60)).await;
    assert_eq!(gauge(web, "weft_proxy_balancer_endpoints").await, base.0 + CHURN as f64, "one entry per endpoint");

    // Calls spread over the endpoints: pooled connections through the relays.
    for i in 0..CHURN * 2 {
        let (status, body) = http_get_host(web.outbound, "api", &format!("/churn-{i}")).await.expect("call api");
        assert_eq!((status, body.as_str()), (200, format!("api /churn-{i}").as_str()));
    }
    let pooled = gauge(web, "weft_proxy_pool_connections").await;
    assert!(pooled >= base.1 + (CHURN / 4) as f64, "calls opened pooled connections: {pooled}");
    assert!(open.load(Ordering::SeqCst) >= CHURN / 4, "through the relays");

    // The endpoints leave: their state and connections must go with them.
    for s in &streams {
        s.abort();
    }
    drop(streams);
    // Generous: every departure is a new snapshot to every stream still open.
    web.wait_endpoints("api", 1, Duration::from_secs(60)).await;
    let endpoints = format!("{}", base.0);
    wait_gauge(web, "weft_proxy_balancer_endpoints", |v| v == base.0, &endpoints, Duration::from_secs(20)).await;
    // Left: the connections to the real api, at most one per worker of web.
    let at_most = format!("at most {WEB_WORKERS} (one per worker, to the real api)");
    let left = |v: f64| v <= WEB_WORKERS as f64;
    wait_gauge(web, "weft_proxy_pool_connections", left, &at_most, Duration::from_secs(20)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while open.load(Ordering::SeqCst) > 0 {
        assert!(Instant::now() < deadline, "{} pooled connections still open", open.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (_, task) in relays {
        task.abort();
    }
    let _ = cp;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_churn_leaves_no_state_behind() {
    let cp = ControlPlane::start(TD, &[]).await;
    let api_app = servers::http("api").await;
    let web_app = servers::http("web").await;
    let api = Sidecar::start(&cp, TD, SidecarSpec::new("api", api_app.addr)).await;
    let workers = WEB_WORKERS.to_string();
    let web_spec = SidecarSpec { extra_args: &["--worker-threads", &workers], ..SidecarSpec::new("web", web_app.addr) };
    let web = Sidecar::start(&cp, TD, web_spec).await;
    web.wait_endpoints("api", 1, Duration::from_secs(10)).await;
    let (status, _) = http_get_host(web.outbound, "api", "/warm").await.expect("warm-up call");
    assert_eq!(status, 200);
    let base = (gauge(&web, "weft_proxy_balancer_endpoints").await, gauge(&web, "weft_proxy_pool_connections").await);
    assert_eq!(base, (2.0, 1.0), "web knows api and itself, and pools one connection to api");

    // The churning endpoints prove the same identity as the real api sidecar.
    let dir = tempfile::tempdir().expect("tempdir");
    let bundle = TrustBundle::load(&cp.trust_bundle()).expect("trust bundle");
    let td = TrustDomain::new(TD).expect("trust domain");
    let identity = Identity::new(
        cp.addr.to_string(),
        bundle,
        pki::control_plane_id(&td),
        dir.path().join("churn"),
        Arc::new(Metrics::default()),
    )
    .expect("identity");
    let token = cp.token_file(&format!("spiffe://{TD}/ns/default/sa/api"));
    identity.bootstrap(Some(&token)).await.expect("attest the churning endpoints");

    let pid = web.proc_.pid();
    churn_round(&cp, &identity, &api, &web, base).await;
    let after_first = rss_kib(pid);
    churn_round(&cp, &identity, &api, &web, base).await;
    let after_second = rss_kib(pid);
    eprintln!("web sidecar RSS: {after_first} KiB after the first churn round, {after_second} KiB after the second");
    // Measured here: ~2 MiB between rounds with pruning, ~9 MiB when one
    // round's endpoint state and pooled connections are kept (the leak).
    assert!(
        after_second <= after_first + 4 * 1024,
        "RSS grew from {after_first} KiB to {after_second} KiB across a churn round"
    );
    let (status, body) = http_get_host(web.outbound, "api", "/after").await.expect("call after churn");
    assert_eq!((status, body.as_str()), (200, "api /after"), "the real endpoint still serves");
}
