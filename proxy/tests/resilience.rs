//! End to end: the mesh keeps working through SVID rotation, control-plane
//! loss and restart, sidecar restarts (with the SVID saved in the state
//! directory), and drains in-flight requests on SIGTERM. Real processes on
//! loopback; every loop is bounded in count and time.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use weft_certs::verify::shared_bundle;
use weft_certs::{pki, IdMatcher, SpiffeId, SpiffeVerifier, SvidResolver, TrustBundle};
use weft_testkit::servers;
use weft_testkit::{http_get_host, metric_sum, wait_metric, ControlPlane, Proc, Sidecar, SidecarSpec};

const TD: &str = "example.org";

struct Mesh {
    cp: ControlPlane,
    client: Sidecar,
    server: Sidecar,
    _servers: Vec<servers::Server>,
}

fn spec<'a>(service: &'a str, app: SocketAddr) -> SidecarSpec<'a> {
    SidecarSpec { service, app, upstreams: &[], labels: &[], extra_args: &[] }
}

/// `web` calls `api` (an HTTP server answering `api <path>`).
async fn mesh(cp_args: &[&str]) -> Mesh {
    let cp = ControlPlane::start(TD, cp_args).await;
    let api_app = servers::http("api").await;
    let web_app = servers::http("web").await;
    let server = Sidecar::start(&cp, TD, spec("api", api_app.addr)).await;
    let client = Sidecar::start(&cp, TD, spec("web", web_app.addr)).await;
    client.wait_endpoints("api", 1, Duration::from_secs(10)).await;
    Mesh { cp, client, server, _servers: vec![api_app, web_app] }
}

/// One request through the mesh; Ok only for the expected 200 answer.
async fn call(outbound: SocketAddr, host: &str, path: &str) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(10), http_get_host(outbound, host, path)).await {
        Ok(Ok((200, body))) if body == format!("{host} {path}") => Ok(()),
        Ok(Ok((status, body))) => Err(format!("{path}: {status} {body}")),
        Ok(Err(e)) => Err(format!("{path}: {e}")),
        Err(_) => Err(format!("{path}: timed out")),
    }
}

/// Requests to `host` through `outbound` for as long as `running` is set,
/// `per_conn` requests per keep-alive connection, `pause` between requests.
/// Returns (succeeded, failures).
async fn traffic(
    outbound: SocketAddr,
    host: &'static str,
    per_conn: usize,
    pause: Duration,
    running: Arc<AtomicBool>,
    limit: Duration,
) -> (u64, Vec<String>) {
    let start = Instant::now();
    let mut ok = 0u64;
    let mut failures = Vec::new();
    let mut n = 0u64;
    'outer: while running.load(Ordering::SeqCst) && start.elapsed() < limit {
        let sender = async {
            let tcp = TcpStream::connect(outbound).await?;
            let (send, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(std::io::Error::other)?;
            tokio::spawn(conn);
            Ok::<_, std::io::Error>(send)
        };
        let mut send = match sender.await {
            Ok(s) => s,
            Err(e) => {
                failures.push(format!("connect: {e}"));
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        for _ in 0..per_conn {
            if !running.load(Ordering::SeqCst) || start.elapsed() >= limit {
                break 'outer;
            }
            n += 1;
            let path = format!("/req-{n}");
            let req =
                http::Request::get(&path).header("host", host).body(Empty::<Bytes>::new()).expect("valid request");
            let resp = tokio::time::timeout(Duration::from_secs(10), async {
                let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
                let status = resp.status().as_u16();
                let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
                Ok::<_, String>((status, body))
            })
            .await;
            match resp {
                Ok(Ok((200, body))) if body == format!("{host} {path}").as_bytes() => ok += 1,
                Ok(Ok((status, body))) => failures.push(format!(
                    "{path} at {:?}: {status} {}",
                    start.elapsed(),
                    String::from_utf8_lossy(&body)
                )),
                Ok(Err(e)) => {
                    failures.push(format!("{path} at {:?}: {e}", start.elapsed()));
                    continue 'outer;
                }
                Err(_) => {
                    failures.push(format!("{path} at {:?}: timed out", start.elapsed()));
                    continue 'outer;
                }
            }
            tokio::time::sleep(pause).await;
        }
    }
    (ok, failures)
}

/// The serial number of the SVID that `inbound` presents to a new mTLS client.
async fn presented_serial(inbound: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Result<Vec<u8>, String> {
    let tcp = TcpStream::connect(inbound).await.map_err(|e| e.to_string())?;
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        TlsConnector::from(tls).connect(weft_certs::tls::server_name(), tcp),
    )
    .await
    .map_err(|_| "handshake timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).ok_or("no peer certificate")?.clone();
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&leaf).map_err(|e| e.to_string())?;
    Ok(cert.raw_serial().to_vec())
}

/// A probe client: an SVID of the mesh (the test owns the PKI) and a
/// verifier that requires the server to be `spiffe://<td>/ns/default/sa/<service>`.
fn probe_tls(cp: &ControlPlane, service: &str) -> Arc<rustls::ClientConfig> {
    let authority = pki::load_authority(&cp.pki, None).unwrap();
    let probe = authority
        .issue_local(&SpiffeId::parse("spiffe://example.org/ns/default/sa/probe").unwrap(), Duration::from_secs(3600))
        .unwrap();
    let bundle = TrustBundle::load(&cp.trust_bundle()).unwrap();
    let want = SpiffeId::parse(&format!("spiffe://{TD}/ns/default/sa/{service}")).unwrap();
    Arc::new(weft_certs::tls::client_config(
        Some(SvidResolver::with_svid(&probe).unwrap()),
        SpiffeVerifier::new(shared_bundle(bundle), IdMatcher::Exact(want)),
        &[weft_certs::tls::ALPN_H2],
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn no_request_fails_across_svid_rotations() {
    let m = mesh(&["--svid-ttl", "20s"]).await;
    let probe = probe_tls(&m.cp, "api");
    let first = presented_serial(m.server.inbound, probe.clone()).await.unwrap();

    let running = Arc::new(AtomicBool::new(true));
    let load = tokio::spawn(traffic(
        m.client.outbound,
        "api",
        5,
        Duration::from_millis(20),
        running.clone(),
        Duration::from_secs(50),
    ));
    // Sample what the inbound port presents to new handshakes, every 2 s.
    let mut serials = vec![first.clone()];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(50) && !load.is_finished() {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let s = presented_serial(m.server.inbound, probe.clone())
            .await
            .unwrap_or_else(|e| panic!("probe handshake at {:?}: {e}", start.elapsed()));
        if serials.last() != Some(&s) {
            serials.push(s);
        }
    }
    running.store(false, Ordering::SeqCst);
    let (ok, failures) = load.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during rotation: {failures:#?}",
        failures.len(),
        ok + failures.len() as u64
    );
    assert!(ok >= 200, "only {ok} requests in 50 s");

    // Several rotations happened, and each new SVID was served at once.
    let renewals =
        wait_metric(m.server.admin, "weft_proxy_svid_renewals_total", &["outcome=\"ok\""], 2.0, Duration::from_secs(5))
            .await;
    let client_renewals = metric_sum(&m.client.metrics().await, "weft_proxy_svid_renewals_total", &["outcome=\"ok\""]);
    assert!(client_renewals >= 2.0, "client renewed {client_renewals} times");
    // Renewal at half-life: ~10 s apart with a 20 s TTL, not a storm.
    assert!(renewals <= 10.0, "{renewals} renewals in ~50 s with a 20 s TTL: renewing far too often");
    let last = presented_serial(m.server.inbound, probe).await.unwrap();
    assert_ne!(first, last, "the inbound port still presents the first SVID");
    assert!(serials.len() >= 3, "saw {} distinct SVIDs on the inbound port in 50 s", serials.len());
    eprintln!(
        "rotation: {ok} requests ok, server renewals {renewals}, client renewals {client_renewals}, {} distinct SVIDs seen",
        serials.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn control_plane_loss_and_restart() {
    let mut m = mesh(&[]).await;
    call(m.client.outbound, "api", "/before").await.unwrap();

    // Lose the control plane under traffic: the data plane keeps working,
    // while it is down and after it comes back (sidecars reconnect at
    // different times, so the restarted control plane's first snapshots are
    // incomplete: no request may fail because of that either).
    let running = Arc::new(AtomicBool::new(true));
    let load = tokio::spawn(traffic(
        m.client.outbound,
        "api",
        5,
        Duration::from_millis(20),
        running.clone(),
        Duration::from_secs(60),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    m.cp.proc_.kill();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!load.is_finished());
    // A new connection (app → sidecar) works too, with the control plane still down.
    call(m.client.outbound, "api", "/while-down").await.unwrap();

    // Restart: both sidecars reconnect and re-register; a new service
    // appearing afterwards reaches the old client.
    m.cp.restart().await;
    let restarted = Instant::now();
    wait_metric(m.cp.admin, "weft_control_plane_sidecars_connected", &[], 2.0, Duration::from_secs(20)).await;
    let extra_app = servers::http("extra").await;
    let extra = Sidecar::start(&m.cp, TD, spec("extra", extra_app.addr)).await;
    m.client.wait_endpoints("extra", 1, Duration::from_secs(20)).await;
    call(m.client.outbound, "extra", "/new-service").await.unwrap();
    // And the new service's sidecar can call the old one.
    extra.wait_endpoints("api", 1, Duration::from_secs(10)).await;
    call(extra.outbound, "api", "/from-extra").await.unwrap();

    // Keep the traffic going until well past the sidecars' reconnect window.
    let past = Duration::from_secs(15);
    tokio::time::sleep(past.saturating_sub(restarted.elapsed())).await;
    running.store(false, Ordering::SeqCst);
    let (ok, failures) = load.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed across control-plane loss and restart: {failures:#?}",
        failures.len(),
        ok + failures.len() as u64
    );
    assert!(ok >= 300, "only {ok} requests in ~20 s");
    m.client.wait_endpoints("api", 1, Duration::from_secs(1)).await;
    call(m.client.outbound, "api", "/after-restart").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn sidecar_restarts_from_its_saved_svid() {
    let mut m = mesh(&[]).await;
    call(m.client.outbound, "api", "/before").await.unwrap();
    let key = m.server.state_dir.join("svid.key");
    let mode = std::fs::metadata(&key).unwrap_or_else(|e| panic!("{}: {e}", key.display())).permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{} has mode {:o}", key.display(), mode);

    m.server.proc_.kill();
    // The join token is gone from the command line: only the saved SVID can do.
    m.server.respawn(&m.cp, false).await;
    assert!(!m.server.args.iter().any(|a| a == "--token-file"));
    let log = m.server.proc_.log_text();
    assert!(log.contains("using saved SVID from state directory"), "log:\n{log}");
    assert_eq!(log.matches("attested with join token").count(), 1, "{log}");

    m.client.wait_endpoints("api", 1, Duration::from_secs(10)).await;
    // The client's pooled connection died with the old process; the first
    // request after the restart must already succeed.
    call(m.client.outbound, "api", "/after-restart").await.unwrap();
    let text = m.server.metrics().await;
    assert!(
        metric_sum(&text, "weft_proxy_requests_total", &["direction=\"inbound\"", "code=\"200\""]) >= 1.0,
        "{text}"
    );
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "after renewal {} has mode {:o}", key.display(), mode);
}

/// Sends SIGTERM to `proc_` (one of the two sidecars) while a 3 s request
/// is in flight from `outbound` through the mesh; the request must complete
/// with 200 and the process exit 0.
async fn drains_in_flight(outbound: SocketAddr, proc_: &mut Proc) {
    let slow = tokio::spawn(async move {
        let t = Instant::now();
        let r = http_get_host(outbound, "api", "/sleep/3000").await;
        (r, t.elapsed())
    });
    // Let the request reach the app before the signal.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!slow.is_finished(), "the slow request finished early");
    let pid = proc_.pid();
    let status = tokio::task::block_in_place(|| proc_.terminate(Duration::from_secs(15)))
        .unwrap_or_else(|| panic!("pid {pid} did not exit within 15 s of SIGTERM"));
    let (r, took) = tokio::time::timeout(Duration::from_secs(10), slow).await.expect("slow request hung").unwrap();
    let log = proc_.log_text();
    assert_eq!(r.unwrap(), (200, "api slept 3000".to_string()), "in-flight request; log:\n{log}");
    assert!(took >= Duration::from_millis(2900), "{took:?}");
    assert!(status.success(), "exit status after SIGTERM: {status:?}\n{log}");
    assert!(log.contains("SIGTERM; draining"), "{log}");
    assert!(log.contains("drained; exiting"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests() {
    // The callee's sidecar (inbound: HTTP/2 from the peer sidecar).
    let mut m = mesh(&[]).await;
    call(m.client.outbound, "api", "/warm").await.unwrap();
    drains_in_flight(m.client.outbound, &mut m.server.proc_).await;
    let r = call(m.client.outbound, "api", "/after-drain").await;
    assert!(r.is_err(), "the drained sidecar still answered: {r:?}");

    // The caller's sidecar (outbound: HTTP/1.1 from the app).
    let mut m = mesh(&[]).await;
    call(m.client.outbound, "api", "/warm").await.unwrap();
    drains_in_flight(m.client.outbound, &mut m.client.proc_).await;
    let r = call(m.client.outbound, "api", "/after-drain").await;
    assert!(r.is_err(), "the drained sidecar still answered: {r:?}");
}

/// Four callers sending GETs through `outbound` to `api` until `running` is cleared.
fn load_api(outbound: SocketAddr, running: &Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<(u64, Vec<String>)>> {
    let pause = Duration::from_millis(2);
    (0..4)
        .map(|_| tokio::spawn(traffic(outbound, "api", 20, pause, running.clone(), Duration::from_secs(30))))
        .collect()
}

/// Stops `load`; (succeeded, failures).
async fn stop_load(running: &AtomicBool, load: Vec<tokio::task::JoinHandle<(u64, Vec<String>)>>) -> (u64, Vec<String>) {
    running.store(false, Ordering::SeqCst);
    let (mut ok, mut failures) = (0, Vec::new());
    for l in load {
        let (o, f) = l.await.unwrap();
        ok += o;
        failures.extend(f);
    }
    (ok, failures)
}

/// Callers lose nothing when an endpoint is drained by SIGTERM (it leaves
/// discovery before it stops accepting), and when one is killed outright
/// they lose only what was in flight on it: while discovery still lists it,
/// its refused connections send requests to another endpoint instead.
#[tokio::test(flavor = "multi_thread")]
async fn endpoints_leaving_under_load() {
    let mut m = mesh(&[]).await;
    let (api2, api3) = (servers::http("api").await, servers::http("api").await);
    let mut second = Sidecar::start(&m.cp, TD, spec("api", api2.addr)).await;
    let third = Sidecar::start(&m.cp, TD, spec("api", api3.addr)).await;
    m.client.wait_endpoints("api", 3, Duration::from_secs(10)).await;

    // Drained: exits 0, and no caller notices.
    let running = Arc::new(AtomicBool::new(true));
    let load = load_api(m.client.outbound, &running);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = m.server.proc_.pid();
    let status = tokio::task::block_in_place(|| m.server.proc_.terminate(Duration::from_secs(15)))
        .unwrap_or_else(|| panic!("pid {pid} did not exit within 15 s of SIGTERM"));
    assert!(status.success(), "drained sidecar exited with {status}");
    m.client.wait_endpoints("api", 2, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, failures) = stop_load(&running, load).await;
    eprintln!("drain: {ok} requests succeeded, {} failed", failures.len());
    assert!(failures.is_empty(), "{} requests failed: {:?}", failures.len(), &failures[..failures.len().min(10)]);
    assert!(ok >= 50, "only {ok} requests were sent");

    // Killed while the control plane is away too, so discovery keeps listing
    // it and its port refuses: callers must connect elsewhere by themselves.
    m.cp.proc_.kill();
    let running = Arc::new(AtomicBool::new(true));
    let load = load_api(m.client.outbound, &running);
    tokio::time::sleep(Duration::from_millis(500)).await;
    second.proc_.kill();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    m.client.wait_endpoints("api", 2, Duration::from_secs(1)).await;
    let (ok, failures) = stop_load(&running, load).await;
    eprintln!("kill: {ok} requests succeeded, {} failed: {failures:?}", failures.len());
    // At most the requests each caller had in flight on the killed endpoint
    // ("upstream ADDR: connection error" or "…: operation was canceled"); a
    // refused connection ("connect to ADDR") must have gone elsewhere.
    // A response whose headers had come back when the endpoint died breaks
    // mid-body ("error reading a body"): in flight too, and past the point
    // where the caller's sidecar could answer 502 or resend it.
    let killed = format!("502 weft: upstream {}: ", second.inbound);
    assert!(
        failures.len() <= 4
            && failures.iter().all(|f| f.contains(&killed) || f.contains("error reading a body from connection")),
        "only requests in flight on the killed endpoint may fail: {failures:?}"
    );
    assert!(ok >= 50, "only {ok} requests were sent");
    let served = metric_sum(&third.metrics().await, "weft_proxy_requests_total", &["direction=\"inbound\""]);
    assert!(served > 0.0, "the remaining endpoint served nothing");
}

/// Two control-plane replicas from one PKI (each with its own file-store
/// state: the file store is single-replica, so only the config watch and
/// SVID renewal fail over here; the sidecars already hold their SVIDs).
/// Both sidecars name both replicas; the one they are connected to is
/// killed (SIGKILL) under load through the pair: no request fails, both
/// sidecars move to the other replica, and renew their short SVIDs there.
#[tokio::test(flavor = "multi_thread")]
async fn sidecars_fail_over_to_another_control_plane_replica() {
    let pki = weft_testkit::control_plane::Pki::new(TD);
    let states = tempfile::tempdir().unwrap();
    let ttl = ["--svid-ttl", "6s"];
    let mut a = ControlPlane::start_on(&pki, &states.path().join("a"), &ttl).await;
    // Replica b's address is known, but b is down while the sidecars start,
    // so that both settle on a (with the file store, replicas do not share
    // registrations: a client and server on different replicas would not see
    // each other, which is what the etcd store is for).
    let mut b = ControlPlane::start_on(&pki, &states.path().join("b"), &ttl).await;
    b.stop();
    let replicas = format!("{},{}", a.addr, b.addr);
    let extra = ["--control-plane", replicas.as_str()];
    let api_app = servers::http("api").await;
    let web_app = servers::http("web").await;
    let server = Sidecar::start(&a, TD, SidecarSpec { extra_args: &extra, ..spec("api", api_app.addr) }).await;
    let client = Sidecar::start(&a, TD, SidecarSpec { extra_args: &extra, ..spec("web", web_app.addr) }).await;
    client.wait_endpoints("api", 1, Duration::from_secs(10)).await;
    wait_metric(a.admin, "weft_control_plane_sidecars_connected", &[], 2.0, Duration::from_secs(20)).await;
    b.restart().await;
    call(client.outbound, "api", "/before").await.unwrap();

    let running = Arc::new(AtomicBool::new(true));
    let load = tokio::spawn(traffic(
        client.outbound,
        "api",
        5,
        Duration::from_millis(20),
        running.clone(),
        Duration::from_secs(90),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let renewed = |text: &str| metric_sum(text, "weft_proxy_svid_renewals_total", &["outcome=\"ok\""]);
    let before = (renewed(&server.metrics().await), renewed(&client.metrics().await));
    a.stop();
    let killed = Instant::now();

    // Both sidecars re-register at b, and renew there (6 s SVIDs: every ~3 s).
    wait_metric(b.admin, "weft_control_plane_sidecars_connected", &[], 2.0, Duration::from_secs(20)).await;
    let moved = killed.elapsed();
    wait_metric(b.admin, "weft_control_plane_svids_issued_total", &["outcome=\"renew\""], 2.0, Duration::from_secs(20))
        .await;
    for (who, admin, was) in [("api", server.admin, before.0), ("web", client.admin, before.1)] {
        wait_metric(admin, "weft_proxy_svid_renewals_total", &["outcome=\"ok\""], was + 2.0, Duration::from_secs(20))
            .await;
        eprintln!("{who}: renewed at replica b after the kill");
    }
    // Traffic through and past the reconnect grace (10 s) on b's view.
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(killed.elapsed())).await;
    running.store(false, Ordering::SeqCst);
    let (ok, failures) = load.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed across the replica's loss: {failures:#?}",
        failures.len(),
        ok + failures.len() as u64
    );
    assert!(ok >= 200, "only {ok} requests");
    client.wait_endpoints("api", 1, Duration::from_secs(5)).await;
    call(client.outbound, "api", "/after").await.unwrap();
    eprintln!("failover: {ok} requests ok, both sidecars at replica b {moved:?} after the kill");
}

/// A first start (join token, no saved SVID) with one replica of
/// `--control-plane` down: the sidecar attests at another instead of exiting
/// (the dead one refuses the connection; the token is not spent there). Which
/// replica a sidecar tries first is random, so four sidecars start: on code
/// that gave up at the first refusal, all four would pass only 1 time in 16.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_start_attests_at_another_replica_when_one_is_down() {
    let cp = ControlPlane::start(TD, &[]).await;
    let dead = weft_testkit::free_addr();
    let replicas = format!("{dead},{}", cp.addr);
    let extra = ["--control-plane", replicas.as_str()];
    let app = servers::http("api").await;
    let mut sidecars = Vec::new();
    for _ in 0..4 {
        sidecars.push(Sidecar::start(&cp, TD, SidecarSpec { extra_args: &extra, ..spec("api", app.addr) }).await);
    }
    wait_metric(cp.admin, "weft_control_plane_sidecars_connected", &[], 4.0, Duration::from_secs(20)).await;
}
