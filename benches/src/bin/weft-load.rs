//! weft-load: the end-to-end load harness. In one run it puts the same load
//! on these setups in front of one app server and prints one table:
//!
//! - `direct`: straight to the app (the ceiling);
//! - `weft`: two sidecars (`web` → `api`), mutual TLS 1.3 and HTTP/2 between them,
//!   as they start by default (one worker thread per core the process may use);
//! - `weft_<N>t`: the same with `--worker-threads N` (`--weft-threads`, default
//!   1: a sidecar given one core; 0 leaves the row out);
//! - `nginx`: two nginx processes, mutual TLS 1.3 and HTTP/1.1 keep-alive between them;
//! - `haproxy`: two HAProxy processes, mutual TLS 1.3 and HTTP/2 between them.
//!
//! The peers use the sidecars' own SVIDs (issued by the weft PKI the run
//! starts). All setups are started first, then loaded in `--rounds`
//! interleaved rounds (default 3; each round starts one setup further on),
//! and each column shows the median of the rounds (peak RSS: the largest),
//! so a burst of load on a shared host during one setup's turn does not
//! decide the ratios; the per-round figures follow the table. Per setup: saturation (req/s over `--connections` keep-alive
//! HTTP/1.1 connections sending back to back), latency at a fixed
//! `--rate` (open loop, measured from each request's scheduled time, so a
//! stall is not hidden), CPU seconds per 1,000 requests of both proxies at
//! that rate, their peak RSS (VmHWM, all processes), and the new mutual-TLS
//! connections per second the server-side proxy accepts. Then, weft vs
//! direct: a gRPC bidirectional stream (messages/s) and a bulk TCP transfer
//! through an `--upstream` tunnel (MB/s), beside the same bytes through an
//! HAProxy pair in TCP mode doing the same mutual TLS 1.3 between its two
//! instances, through the same pair relaying plain TCP (what relaying alone
//! costs here), and through an nginx `stream` pair where nginx has that
//! module, each with its proxies' CPU seconds per GB. The peers' columns are also given
//! as a ratio to the best peer (nginx or HAProxy, whichever is better on that
//! column). Install the peers with `benches/install-peers.sh`; `--no-peers`
//! leaves them out (direct and weft only, as `benches/hot-text.sh` profiles;
//! the `xbest` columns are then `-`).
//!
//! ```text
//! cargo build --profile dist -p weft -p weft-control-plane -p weft-proxy -p weft-benches --bins
//! target/dist/weft-load [--duration 5] [--connections 64] [--rate 1000] [--json] ...
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_benches::procstat;
use weft_certs::{IdMatcher, Svid, TrustBundle};
use weft_testkit::servers::{self, echo};
use weft_testkit::{ControlPlane, Sidecar, SidecarSpec};

const TD: &str = "example.org";
const PATH: &str = "/bench";
const USAGE: &str = "usage: weft-load [--duration SECS] [--warmup SECS] [--connections N] [--rate REQ_PER_S] \
[--rate-duration SECS] [--rate-connections N] [--grpc-duration SECS] [--handshake-duration SECS] \
[--tcp-bytes BYTES] [--weft-threads N] [--rounds N] [--no-peers] [--json]";

#[derive(Clone, Copy)]
struct Args {
    /// Length of each saturation run (after the warm-up).
    duration: Duration,
    warmup: Duration,
    /// Keep-alive connections at saturation.
    connections: usize,
    /// Requests per second of the fixed-rate run.
    rate: u64,
    rate_duration: Duration,
    /// Connections the fixed rate is spread over.
    rate_connections: usize,
    grpc_duration: Duration,
    handshake_duration: Duration,
    /// Bytes of the bulk TCP transfer.
    tcp_bytes: u64,
    /// `--worker-threads` of the second weft pair (`weft_<N>t`); 0: no second pair.
    weft_threads: u64,
    /// Leave out the nginx and HAProxy pairs (rows and TCP transfers).
    no_peers: bool,
    /// Rounds of saturation and fixed-rate runs over all setups, interleaved.
    rounds: usize,
    json: bool,
}

fn parse_args() -> Result<Args, String> {
    let secs = Duration::from_secs;
    let mut a = Args {
        duration: secs(5),
        warmup: secs(1),
        connections: 64,
        rate: 1000,
        rate_duration: secs(5),
        rate_connections: 16,
        grpc_duration: secs(3),
        handshake_duration: secs(3),
        tcp_bytes: 1 << 30,
        weft_threads: 1,
        no_peers: false,
        rounds: 3,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| -> Result<u64, String> {
            let v = it.next().ok_or_else(|| format!("{name} needs a value"))?;
            v.parse().map_err(|e| format!("{name} {v:?}: {e}"))
        };
        match flag.as_str() {
            "--duration" => a.duration = secs(value("--duration")?),
            "--warmup" => a.warmup = secs(value("--warmup")?),
            "--connections" => a.connections = value("--connections")? as usize,
            "--rate" => a.rate = value("--rate")?,
            "--rate-duration" => a.rate_duration = secs(value("--rate-duration")?),
            "--rate-connections" => a.rate_connections = value("--rate-connections")? as usize,
            "--grpc-duration" => a.grpc_duration = secs(value("--grpc-duration")?),
            "--handshake-duration" => a.handshake_duration = secs(value("--handshake-duration")?),
            "--tcp-bytes" => a.tcp_bytes = value("--tcp-bytes")?,
            "--weft-threads" => a.weft_threads = value("--weft-threads")?,
            "--no-peers" => a.no_peers = true,
            "--rounds" => a.rounds = value("--rounds")? as usize,
            "--json" => a.json = true,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if a.connections == 0 || a.rate_connections == 0 || a.rate == 0 || a.duration.is_zero() {
        return Err("--connections, --rate-connections, --rate and --duration must be positive".into());
    }
    if !(1..=10).contains(&a.rounds) {
        return Err(format!("--rounds {}: from 1 to 10", a.rounds));
    }
    if a.weft_threads > 1024 {
        return Err("--weft-threads: at most 1024 (weft-proxy --worker-threads)".into());
    }
    if a.duration + a.rate_duration > secs(60) {
        return Err("--duration + --rate-duration above 60 s: keep the whole run within a few minutes".into());
    }
    Ok(a)
}

/// What one load run measured.
struct Run {
    requests: u64,
    errors: u64,
    elapsed: Duration,
    latency_us: Histogram<u64>,
}

impl Run {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    fn ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// How a connection paces its requests.
#[derive(Clone, Copy)]
enum Pace {
    /// Back to back (saturation).
    Closed,
    /// One request every `period`, latency counted from when it was due.
    Every { period: Duration, offset: Duration },
}

/// One keep-alive connection sending GETs until `end`; latencies are
/// recorded from `measure_from` on.
async fn connection(
    (addr, host): Entry,
    pace: Pace,
    measure_from: Instant,
    end: Instant,
) -> (u64, u64, Histogram<u64>) {
    let mut hist = histogram();
    let (mut ok, mut errors) = (0u64, 0u64);
    let mut ticks = match pace {
        Pace::Closed => None,
        Pace::Every { period, offset } => {
            let mut i = tokio::time::interval_at((Instant::now() + offset).into(), period);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            Some(i)
        }
    };
    'reconnect: while Instant::now() < end {
        let tcp = match tokio::net::TcpStream::connect(addr).await {
            Ok(t) => t,
            Err(_) => {
                errors += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let Ok((mut send, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await else {
            errors += 1;
            continue;
        };
        tokio::spawn(conn);
        loop {
            let due = match ticks.as_mut() {
                Some(t) => t.tick().await.into_std(),
                None => Instant::now(),
            };
            if due >= end {
                break 'reconnect;
            }
            if send.ready().await.is_err() {
                errors += 1;
                continue 'reconnect;
            }
            let req = http::Request::get(PATH).header("host", host).body(Empty::<Bytes>::new()).expect("request");
            let resp = match send.send_request(req).await {
                Ok(r) => r,
                Err(_) => {
                    errors += 1;
                    continue 'reconnect;
                }
            };
            let status = resp.status();
            if resp.into_body().collect().await.is_err() {
                errors += 1;
                continue 'reconnect;
            }
            let took = due.elapsed();
            if due < measure_from {
                continue;
            }
            if status == http::StatusCode::OK {
                ok += 1;
                let _ = hist.record((took.as_micros() as u64).max(1));
            } else {
                errors += 1;
            }
        }
    }
    (ok, errors, hist)
}

/// Where a setup takes the load: its entry address and the `Host` its
/// requests carry (the service a weft pair routes them to).
type Entry = (SocketAddr, &'static str);

async fn run(
    (addr, host): Entry,
    connections: usize,
    pace: impl Fn(usize) -> Pace,
    warmup: Duration,
    duration: Duration,
) -> Run {
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let tasks: Vec<_> =
        (0..connections).map(|i| tokio::spawn(connection((addr, host), pace(i), measure_from, end))).collect();
    let mut total = Run { requests: 0, errors: 0, elapsed: duration, latency_us: histogram() };
    for t in tasks {
        let (ok, errors, hist) = t.await.expect("load task");
        total.requests += ok;
        total.errors += errors;
        total.latency_us.add(hist).expect("histograms with equal bounds");
    }
    total
}

/// A setup under load: its name, where the load enters, its proxies'
/// processes (none for direct) and the server-side proxy's mutual-TLS
/// listener (for the handshake rate).
struct Target {
    name: &'static str,
    entry: Entry,
    pids: Vec<u32>,
    tls: Option<SocketAddr>,
}

/// The order of the setups in round `round` (0-based): each round starts
/// one setup further on, so no setup is always measured first or last.
fn round_order(setups: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..setups).map(move |i| (i + round) % setups)
}

/// What one round measured of one setup.
struct Setup {
    saturation: Run,
    fixed: Run,
    /// Both proxies' CPU seconds per 1,000 requests at the fixed rate.
    cpu_per_1k: Option<f64>,
    /// The same split into user and system (kernel) CPU seconds per 1,000 requests.
    cpu_split_per_1k: Option<(f64, f64)>,
    /// Both proxies' context switches per request at the fixed rate (each
    /// is a thread going to sleep, mostly in `epoll_wait`, and being woken).
    switches_per_request: Option<f64>,
    /// Both proxies' peak RSS (sum of VmHWM, since they started), KiB.
    peak_rss_kib: Option<u64>,
}

/// One setup over all rounds: each column is the median of its rounds
/// (peak RSS: the largest), so one round that a burst on the host slowed
/// does not decide a ratio.
struct Row {
    name: &'static str,
    rounds: Vec<Setup>,
    /// New mutual-TLS connections per second the server-side proxy accepted
    /// (measured once, after the rounds).
    handshakes: Option<f64>,
}

impl Row {
    fn values(&self, f: fn(&Setup) -> Option<f64>) -> Vec<f64> {
        self.rounds.iter().filter_map(f).collect()
    }
    fn median(&self, f: fn(&Setup) -> Option<f64>) -> Option<f64> {
        median(self.values(f))
    }
    fn errors(&self) -> u64 {
        self.rounds.iter().map(|s| s.saturation.errors + s.fixed.errors).sum()
    }
}

/// The median (the mean of the middle two for an even count); `None` for none.
fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// Runs the saturation and fixed-rate loads against `entry`, counting the
/// CPU of the processes under `pids` during the fixed-rate run.
async fn measure(entry: Entry, pids: &[u32], args: &Args) -> Setup {
    let saturation = run(entry, args.connections, |_| Pace::Closed, args.warmup, args.duration).await;
    let n = args.rate_connections;
    let period = Duration::from_secs_f64(n as f64 / args.rate as f64);
    let pace = move |i: usize| Pace::Every { period, offset: period.mul_f64(i as f64 / n as f64) };
    // Warm the connections at the rate, then count CPU over the measured run only.
    let _ = run(entry, n, pace, Duration::ZERO, args.warmup).await;
    let procs: Vec<u32> = pids.iter().flat_map(|p| procstat::tree(*p)).collect();
    let (user0, system0) = procstat::cpu_split(&procs);
    let switches0 = procstat::context_switches(&procs);
    let fixed = run(entry, n, pace, Duration::ZERO, args.rate_duration).await;
    let (user1, system1) = procstat::cpu_split(&procs);
    let switches = procstat::context_switches(&procs) - switches0;
    let per_1k = 1000.0 / fixed.requests.max(1) as f64;
    let mut setup = Setup {
        saturation,
        fixed,
        cpu_per_1k: None,
        cpu_split_per_1k: None,
        switches_per_request: None,
        peak_rss_kib: None,
    };
    if !pids.is_empty() {
        let (user, system) = ((user1 - user0) * per_1k, (system1 - system0) * per_1k);
        setup.cpu_per_1k = Some(user + system);
        setup.cpu_split_per_1k = Some((user, system));
        setup.switches_per_request = Some(switches as f64 * per_1k / 1000.0);
        setup.peak_rss_kib = Some(procstat::status_kib(&procs, "VmHWM"));
    }
    setup
}

/// The client side's TLS config for the handshake benchmark: the web
/// sidecar's SVID, any ID of the trust domain on the other side, ALPN h2 or
/// http/1.1 (nginx answers HTTP/1.1 only).
fn handshake_tls(state_dir: &std::path::Path, bundle: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let read = |p: std::path::PathBuf| std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()));
    let chain = pem::parse_many(read(state_dir.join("svid.pem"))?).map_err(|e| format!("svid.pem: {e}"))?;
    let key = pem::parse(read(state_dir.join("svid.key"))?).map_err(|e| format!("svid.key: {e}"))?;
    let chain = chain.into_iter().map(|c| c.into_contents().into()).collect();
    let svid = Svid::new(chain, key.into_contents()).map_err(|e| format!("SVID: {e}"))?;
    let bundle = TrustBundle::load(bundle).map_err(|e| e.to_string())?;
    let td = weft_certs::TrustDomain::new(TD).map_err(|e| e.to_string())?;
    let base = weft_testkit::control_plane::client_tls(&bundle, Some(&svid), IdMatcher::TrustDomain(td));
    let mut cfg = (*base).clone();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// New mutual-TLS connections per second `addr` completes: `concurrency`
/// loops of connect, full handshake (no resumption), close_notify, until
/// the server closes (so it has checked our certificate).
async fn handshakes(addr: SocketAddr, tls: Arc<rustls::ClientConfig>, duration: Duration) -> (f64, u64) {
    let end = Instant::now() + duration;
    let start = Instant::now();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let connector = tokio_rustls::TlsConnector::from(tls.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < end {
                    let one = async {
                        let tcp = tokio::net::TcpStream::connect(addr).await?;
                        let _ = tcp.set_nodelay(true);
                        let mut tls = connector.connect(weft_certs::tls::server_name(), tcp).await?;
                        tls.shutdown().await?;
                        let mut rest = Vec::new();
                        let _ = tls.read_to_end(&mut rest).await;
                        Ok::<_, std::io::Error>(())
                    };
                    match tokio::time::timeout(Duration::from_secs(5), one).await {
                        Ok(Ok(())) => ok += 1,
                        _ => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let (mut ok, mut failed) = (0, 0);
    for t in tasks {
        let (o, f) = t.await.expect("handshake task");
        ok += o;
        failed += f;
    }
    (ok as f64 / start.elapsed().as_secs_f64(), failed)
}

/// Messages per second echoed over one gRPC bidirectional stream to
/// `addr` (authority `grpc`), 32 messages in flight.
async fn grpc_bidi(addr: SocketAddr, duration: Duration) -> Result<f64, String> {
    const WINDOW: usize = 32;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .origin("http://grpc".parse().expect("origin"))
        .connect()
        .await
        .map_err(|e| format!("gRPC connect {addr}: {e}"))?;
    let mut client = echo::echo_client::EchoClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(WINDOW);
    let window = Arc::new(tokio::sync::Semaphore::new(WINDOW));
    let credits = window.clone();
    let producer = tokio::spawn(async move {
        for seq in 0.. {
            let Ok(permit) = credits.acquire().await else { return };
            permit.forget();
            if tx.send(echo::Msg { seq, payload: vec![7; 64] }).await.is_err() {
                return;
            }
        }
    });
    let mut inbound = client
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("gRPC bidi: {s}"))?
        .into_inner();
    let start = Instant::now();
    let mut count = 0u64;
    while start.elapsed() < duration {
        match inbound.message().await {
            Ok(Some(_)) => {
                count += 1;
                window.add_permits(1);
            }
            Ok(None) => break,
            Err(s) => return Err(format!("gRPC bidi: {s}")),
        }
    }
    window.close();
    producer.abort();
    Ok(count as f64 / start.elapsed().as_secs_f64())
}

/// MB/s (10^6 bytes) of one `bytes`-long upload to the sink at `addr`:
/// 8-byte length, the bytes, then the sink's 8-byte acknowledgement.
async fn tcp_bulk(addr: SocketAddr, bytes: u64) -> Result<f64, String> {
    let io = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        let start = Instant::now();
        tcp.write_all(&bytes.to_be_bytes()).await?;
        let chunk = vec![0x5au8; 256 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            tcp.write_all(&chunk[..n]).await?;
            left -= n as u64;
        }
        let got = tcp.read_u64().await?;
        if got != bytes {
            return Err(std::io::Error::other(format!("the sink got {got} of {bytes} bytes")));
        }
        Ok(bytes as f64 / 1e6 / start.elapsed().as_secs_f64())
    };
    tokio::time::timeout(Duration::from_secs(120), io)
        .await
        .map_err(|_| format!("TCP transfer to {addr} took over 120 s"))?
        .map_err(|e| format!("TCP transfer to {addr}: {e}"))
}

/// One bulk transfer through one setup.
struct Bulk {
    /// `tcp_bulk`'s name for the setup (`direct`, `weft`, `haproxy`, ...).
    name: &'static str,
    /// How the setup carries the bytes, for the text output.
    what: &'static str,
    mb_s: f64,
    /// CPU seconds the setup's proxies (all processes) used per 10^9 bytes.
    cpu_s_per_gb: Option<f64>,
    /// CPU seconds per 10^9 bytes of this process, where the sending client
    /// and the sink run (and nothing else during the transfer): the ends'
    /// share of the machine, for the arithmetic of what is left to the proxies.
    ends_cpu_s_per_gb: f64,
}

/// Times one `bytes`-long transfer through `entry`, counting the CPU of the
/// process trees under `pids` during it.
async fn bulk_transfer(
    name: &'static str,
    what: &'static str,
    entry: SocketAddr,
    pids: &[u32],
    bytes: u64,
) -> Result<Bulk, String> {
    let procs: Vec<u32> = pids.iter().flat_map(|p| procstat::tree(*p)).collect();
    let me = [std::process::id()];
    let (cpu0, ends0) = (procstat::cpu_seconds(&procs), procstat::cpu_seconds(&me));
    let mb_s = tcp_bulk(entry, bytes).await.map_err(|e| format!("{name}: {e}"))?;
    let cpu = procstat::cpu_seconds(&procs) - cpu0;
    let gb = bytes as f64 / 1e9;
    let cpu_s_per_gb = (!pids.is_empty()).then(|| cpu / gb);
    let ends_cpu_s_per_gb = (procstat::cpu_seconds(&me) - ends0) / gb;
    Ok(Bulk { name, what, mb_s, cpu_s_per_gb, ends_cpu_s_per_gb })
}

/// Waits until `entry` accepts TCP connections.
async fn wait_listening(name: &str, entry: SocketAddr, logs: impl Fn() -> String) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(entry).await.is_err() {
        if Instant::now() > deadline {
            return Err(format!("the {name} pair does not listen on {entry}; logs:\n{}", logs()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// A sidecar's SVID files: chain, key, trust bundle.
type IdFiles = (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf);

fn ident(x: &IdFiles) -> weft_benches::nginx::Identity<'_> {
    weft_benches::nginx::Identity { chain: &x.0, key: &x.1, bundle: &x.2 }
}

/// The TCP sink: reads an 8-byte length, that many bytes, and answers the count.
async fn sink() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = l.accept().await else { continue };
            tokio::spawn(async move {
                let Ok(len) = tcp.read_u64().await else { return };
                let mut buf = vec![0u8; 256 * 1024];
                let mut got = 0u64;
                while got < len {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n as u64,
                    }
                }
                let _ = tcp.write_u64(got).await;
            });
        }
    });
    addr
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// The app servers, on their own thread and runtime like a separate process.
struct Apps {
    http: SocketAddr,
    grpc: SocketAddr,
    sink: SocketAddr,
}

fn start_apps() -> Apps {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("app runtime");
        rt.block_on(async {
            let (http, grpc, sink) = (servers::http("api").await, servers::grpc_echo().await, sink().await);
            let _ = tx.send(Apps { http: http.addr, grpc: grpc.addr, sink });
            std::future::pending::<()>().await;
        });
    });
    rx.recv().expect("app servers started")
}

/// Waits until `entry` answers the benchmark's GET.
async fn wait_answering(name: &str, (entry, host): Entry, logs: impl Fn() -> String) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((200, _)) = weft_testkit::http_get_host(entry, host, PATH).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("the {name} pair does not answer {PATH}; logs:\n{}", logs()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Everything the run measured.
struct Report {
    setups: Vec<Row>,
    /// `/proc/loadavg` when the rounds began.
    load_at_start: String,
    grpc: [Option<f64>; 2],
    tcp: [Option<f64>; 2],
    /// Every bulk transfer that completed: direct, weft, then the peers.
    tcp_setups: Vec<Bulk>,
    idle_sidecar_kib: u64,
    notes: Vec<String>,
}

async fn main_async(args: Args, apps: Apps) -> Result<Report, String> {
    let mut notes = Vec::new();
    let cp = ControlPlane::start(TD, &[]).await;
    let web_app = servers::http("web").await;
    let api = Sidecar::start(&cp, TD, SidecarSpec::new("api", apps.http)).await;
    let grpc_spec = SidecarSpec {
        service: "grpc",
        app: apps.grpc,
        upstreams: &[],
        labels: &[],
        extra_args: &["--app-protocol", "h2c"],
    };
    let grpc = Sidecar::start(&cp, TD, grpc_spec).await;
    let bulk = Sidecar::start(&cp, TD, SidecarSpec::new("bulk", apps.sink)).await;
    let web_spec =
        SidecarSpec { service: "web", app: web_app.addr, upstreams: &["bulk"], labels: &[], extra_args: &[] };
    let web = Sidecar::start(&cp, TD, web_spec).await;
    for s in ["api", "grpc", "bulk"] {
        web.wait_endpoints(s, 1, Duration::from_secs(10)).await;
    }
    // Idle: started, attested, config received, no traffic yet.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_sidecar_kib =
        [&api, &web].iter().map(|s| procstat::status_kib(&[s.proc_.pid()], "VmRSS")).max().unwrap_or(0);
    wait_answering("weft", (web.outbound, "api"), || web.proc_.log_text()).await?;
    let hs_tls = handshake_tls(&web.state_dir, &cp.trust_bundle())?;

    // Every setup is started first and kept running, then measured in
    // `--rounds` interleaved rounds: the host's load moves over a run of
    // minutes, and a setup always measured last (or first) would carry that
    // drift in its ratio to the others.
    let mut targets = vec![Target { name: "direct", entry: (apps.http, "api"), pids: vec![], tls: None }];
    targets.push(Target {
        name: "weft",
        entry: (web.outbound, "api"),
        pids: vec![web.proc_.pid(), api.proc_.pid()],
        tls: Some(api.inbound),
    });
    let _threaded = if args.weft_threads > 0 {
        let (target, sidecars) = weft_threaded(&cp, &apps, web_app.addr, &args).await?;
        targets.push(target);
        Some(sidecars)
    } else {
        None
    };

    let id = |s: &Sidecar| (s.state_dir.join("svid.pem"), s.state_dir.join("svid.key"), cp.trust_bundle());
    let (c, s) = (id(&web), id(&api));
    let _nginx = match weft_benches::nginx::binary().filter(|_| !args.no_peers) {
        Some(bin) => {
            let dir = cp.dir.path().join("nginx");
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let pair = weft_benches::nginx::start(&bin, &dir, apps.http, ident(&c), ident(&s));
            wait_answering("nginx", (pair.entry, "api"), || {
                format!("{}\n{}", pair.client.log_text(), pair.server.log_text())
            })
            .await?;
            let pids = vec![pair.client.pid(), pair.server.pid()];
            targets.push(Target { name: "nginx", entry: (pair.entry, "api"), pids, tls: Some(pair.tls) });
            Some(pair)
        }
        None if args.no_peers => None,
        None => {
            notes.push("nginx not installed (benches/install-peers.sh): no nginx row".into());
            None
        }
    };
    let _haproxy = match weft_benches::haproxy::binary().filter(|_| !args.no_peers) {
        Some(bin) => {
            let dir = cp.dir.path().join("haproxy");
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let pair = weft_benches::haproxy::start(&bin, &dir, apps.http, ident(&c), ident(&s))
                .map_err(|e| format!("haproxy config: {e}"))?;
            wait_answering("haproxy", (pair.entry, "api"), || {
                format!("{}\n{}", pair.client.log_text(), pair.server.log_text())
            })
            .await?;
            let pids = vec![pair.client.pid(), pair.server.pid()];
            targets.push(Target { name: "haproxy", entry: (pair.entry, "api"), pids, tls: Some(pair.tls) });
            Some(pair)
        }
        None if args.no_peers => None,
        None => {
            notes.push("haproxy not installed (benches/install-peers.sh): no haproxy row".into());
            None
        }
    };

    let load_at_start = load_average();
    let mut setups: Vec<Row> =
        targets.iter().map(|t| Row { name: t.name, rounds: Vec::new(), handshakes: None }).collect();
    for round in 0..args.rounds {
        for i in round_order(targets.len(), round) {
            let t = &targets[i];
            setups[i].rounds.push(measure(t.entry, &t.pids, &args).await);
        }
    }
    for (t, row) in targets.iter().zip(&mut setups) {
        let Some(tls) = t.tls else { continue };
        let (rate, failed) = handshakes(tls, hs_tls.clone(), args.handshake_duration).await;
        row.handshakes = Some(rate);
        if failed > 0 {
            notes.push(format!("{}: {failed} mTLS handshakes failed", t.name));
        }
    }

    let mut grpc_rates = [None, None];
    for (i, addr) in [apps.grpc, web.outbound].into_iter().enumerate() {
        match grpc_bidi(addr, args.grpc_duration).await {
            Ok(r) => grpc_rates[i] = Some(r),
            Err(e) => notes.push(e),
        }
    }
    let mut tcp = [None, None];
    let mut tcp_setups = Vec::new();
    if args.tcp_bytes > 0 {
        let weft_pids = [web.proc_.pid(), bulk.proc_.pid()];
        let ours = [
            ("direct", "straight to the sink", apps.sink, &[][..]),
            ("weft", "weft --upstream tunnel (HTTP/2 CONNECT over mTLS 1.3)", web.upstream("bulk"), &weft_pids[..]),
        ];
        for (i, (name, what, addr, pids)) in ours.into_iter().enumerate() {
            match bulk_transfer(name, what, addr, pids, args.tcp_bytes).await {
                Ok(b) => {
                    tcp[i] = Some(b.mb_s);
                    tcp_setups.push(b);
                }
                Err(e) => notes.push(e),
            }
        }
        if !args.no_peers {
            let (c, s) = (id(&web), id(&bulk));
            tcp_peers(&cp, &apps, &args, (&c, &s), &mut tcp_setups, &mut notes).await;
        }
    }
    drop(grpc);
    drop(bulk);
    Ok(Report { setups, load_at_start, grpc: grpc_rates, tcp, tcp_setups, idle_sidecar_kib, notes })
}

/// The `weft_<N>t` row: a second pair (`web-mt` → `api-mt`, the same
/// app) whose sidecars run `--worker-threads N`; they stop when the
/// returned sidecars are dropped.
async fn weft_threaded(
    cp: &ControlPlane,
    apps: &Apps,
    web_app: SocketAddr,
    args: &Args,
) -> Result<(Target, [Sidecar; 2]), String> {
    let threads = args.weft_threads.to_string();
    let extra = ["--worker-threads", threads.as_str()];
    let api = Sidecar::start(cp, TD, SidecarSpec { extra_args: &extra, ..SidecarSpec::new("api-mt", apps.http) }).await;
    let web = Sidecar::start(cp, TD, SidecarSpec { extra_args: &extra, ..SidecarSpec::new("web-mt", web_app) }).await;
    web.wait_endpoints("api-mt", 1, Duration::from_secs(10)).await;
    let name: &'static str = Box::leak(format!("weft_{threads}t").into_boxed_str());
    wait_answering(name, (web.outbound, "api-mt"), || web.proc_.log_text()).await?;
    let target = Target {
        name,
        entry: (web.outbound, "api-mt"),
        pids: vec![web.proc_.pid(), api.proc_.pid()],
        tls: Some(api.inbound),
    };
    Ok((target, [web, api]))
}

/// The bulk transfer through the peers: an HAProxy pair in TCP mode with
/// mutual TLS 1.3 between its instances (the bulk sidecar's SVID on the
/// server side, web's on the client side), the same pair relaying plain
/// TCP, and an nginx `stream` pair with mutual TLS where nginx has the module.
async fn tcp_peers(
    cp: &ControlPlane,
    apps: &Apps,
    args: &Args,
    (c, s): (&IdFiles, &IdFiles),
    out: &mut Vec<Bulk>,
    notes: &mut Vec<String>,
) {
    use weft_benches::haproxy::{self, Hop};
    use weft_benches::nginx::{self, StreamModule};
    let dir = cp.dir.path().join("tcp-peers");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return notes.push(format!("{}: {e}", dir.display()));
    }
    match haproxy::binary() {
        Some(bin) => {
            let hops = [
                ("haproxy", "HAProxy pair, TCP mode, mTLS 1.3 between", Hop::MutualTls),
                ("haproxy_plain_tcp", "HAProxy pair, TCP mode, plain TCP between (no TLS)", Hop::Plain),
            ];
            for (name, what, hop) in hops {
                let pair = match haproxy::start_tcp(&bin, &dir, name, apps.sink, hop, ident(c), ident(s)) {
                    Ok(p) => p,
                    Err(e) => {
                        notes.push(format!("{name}: config: {e}"));
                        continue;
                    }
                };
                let logs = || format!("{}\n{}", pair.client.log_text(), pair.server.log_text());
                let ready = async {
                    wait_listening(name, pair.tls, logs).await?;
                    wait_listening(name, pair.entry, logs).await
                };
                let pids = [pair.client.pid(), pair.server.pid()];
                peer_transfer((name, what), pair.entry, &pids, ready, args.tcp_bytes, out, notes).await;
            }
        }
        None => notes.push("haproxy not installed (benches/install-peers.sh): no HAProxy TCP transfer".into()),
    }
    match nginx::binary().map(|b| (nginx::stream_module(&b), b)) {
        Some((StreamModule::Missing, _)) => notes.push(
            "nginx: no TCP transfer: this nginx has no stream module (Debian's nginx-light is built with \
             --with-stream=dynamic and ships no module file; libnginx-mod-stream has it)"
                .into(),
        ),
        Some((module, bin)) => {
            let pair = nginx::start_stream(&bin, &dir, &module, apps.sink, ident(c), ident(s));
            let logs = || format!("{}\n{}", pair.client.log_text(), pair.server.log_text());
            let what = "nginx stream pair, mTLS 1.3 between";
            let ready = wait_listening("nginx stream", pair.entry, logs);
            let pids = [pair.client.pid(), pair.server.pid()];
            peer_transfer(("nginx", what), pair.entry, &pids, ready, args.tcp_bytes, out, notes).await;
        }
        None => notes.push("nginx not installed (benches/install-peers.sh): no nginx TCP transfer".into()),
    }
}

/// The transfer of `bytes` through a peer pair (`name`, `what`) entered at
/// `entry`, counting the CPU of `pids`, once `ready` (its listeners
/// answer): into `out`, or, failed, into `notes`.
async fn peer_transfer(
    (name, what): (&'static str, &'static str),
    entry: SocketAddr,
    pids: &[u32],
    ready: impl std::future::Future<Output = Result<(), String>>,
    bytes: u64,
    out: &mut Vec<Bulk>,
    notes: &mut Vec<String>,
) {
    let r = match ready.await {
        Ok(()) => bulk_transfer(name, what, entry, pids, bytes).await,
        Err(e) => Err(e),
    };
    match r {
        Ok(b) => out.push(b),
        Err(e) => notes.push(e),
    }
}

/// The best peer's (nginx, HAProxy) value of a column.
fn best_peer(rows: &[Row], c: &Column) -> Option<f64> {
    rows.iter().filter(|r| r.name == "nginx" || r.name == "haproxy").filter_map(|r| c.value(r)).reduce(|a, b| {
        if (c.better)(b, a) {
            b
        } else {
            a
        }
    })
}

fn higher(a: f64, b: f64) -> bool {
    a > b
}
fn lower(a: f64, b: f64) -> bool {
    a < b
}

/// How a column's rounds make its one value.
#[derive(Clone, Copy, PartialEq)]
enum Combine {
    Median,
    Largest,
    /// Measured once, after the rounds (the handshake rate).
    Once,
}

/// A column of the table: its name in `--json`, its value in one round,
/// how the rounds combine, and which way is better.
struct Column {
    name: &'static str,
    round: fn(&Setup) -> Option<f64>,
    combine: Combine,
    better: fn(f64, f64) -> bool,
}

impl Column {
    fn value(&self, r: &Row) -> Option<f64> {
        match self.combine {
            Combine::Median => r.median(self.round),
            Combine::Largest => r.values(self.round).into_iter().reduce(f64::max),
            Combine::Once => r.handshakes,
        }
    }
}

const COLUMNS: [Column; 7] = [
    Column { name: "saturation_rps", round: |s| Some(s.saturation.rps()), combine: Combine::Median, better: higher },
    Column { name: "p50_ms", round: |s| Some(s.fixed.ms(0.5)), combine: Combine::Median, better: lower },
    Column { name: "p99_ms", round: |s| Some(s.fixed.ms(0.99)), combine: Combine::Median, better: lower },
    Column { name: "p999_ms", round: |s| Some(s.fixed.ms(0.999)), combine: Combine::Median, better: lower },
    Column { name: "cpu_s_per_1k", round: |s| s.cpu_per_1k, combine: Combine::Median, better: lower },
    Column {
        name: "peak_rss_mib",
        round: |s| s.peak_rss_kib.map(|k| k as f64 / 1024.0),
        combine: Combine::Largest,
        better: lower,
    },
    Column { name: "mtls_conn_per_s", round: |_| None, combine: Combine::Once, better: higher },
];

fn print_table(r: &Report, args: &Args) {
    println!(
        "weft-load: saturation over {} keep-alive HTTP/1.1 connections ({:?} + {:?} warm-up); latency and CPU at {} req/s over {} connections ({:?}); {} interleaved round(s), medians shown (RSS: the peak); host {} CPUs, load average {} at the start, {} at the end",
        args.connections,
        args.duration,
        args.warmup,
        args.rate,
        args.rate_connections,
        args.rate_duration,
        args.rounds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        r.load_at_start,
        load_average()
    );
    if !args.no_peers {
        println!("(xbest = the value / the best peer's, nginx or HAProxy, on that column)");
    }
    println!(
        "{:<8} {:>9} {:>6} {:>7} {:>7} {:>6} {:>8} {:>6} {:>8} {:>6} {:>8} {:>6} {:>8} {:>6} {:>6}",
        "setup",
        "sat req/s",
        "xbest",
        "p50 ms",
        "p99 ms",
        "xbest",
        "p99.9 ms",
        "xbest",
        "CPU s/1k",
        "xbest",
        "RSS MiB",
        "xbest",
        "mTLS c/s",
        "xbest",
        "errors"
    );
    let bests: Vec<Option<f64>> = COLUMNS.iter().map(|c| best_peer(&r.setups, c)).collect();
    for s in &r.setups {
        let mut line = format!("{:<8}", s.name);
        for (i, c) in COLUMNS.iter().enumerate() {
            let (name, v) = (&c.name, c.value(s));
            let width = if *name == "saturation_rps" {
                9
            } else if i == 1 || i == 2 {
                7
            } else {
                8
            };
            let val = match v {
                Some(v) if *name == "saturation_rps" || *name == "mtls_conn_per_s" => format!("{v:>width$.0}"),
                Some(v) => format!("{v:>width$.3}"),
                None => format!("{:>width$}", "-"),
            };
            line.push(' ');
            line.push_str(&val);
            if *name == "p50_ms" {
                continue;
            }
            let ratio = match (v, bests[i], s.name) {
                (_, _, "direct") => "-".to_string(),
                (Some(v), Some(b), _) if b > 0.0 => format!("{:.2}", v / b),
                _ => "-".to_string(),
            };
            line.push_str(&format!(" {ratio:>6}"));
        }
        line.push_str(&format!(" {:>6}", s.errors()));
        println!("{line}");
    }
    for s in &r.setups {
        let user = s.median(|s| s.cpu_split_per_1k.map(|c| c.0));
        let system = s.median(|s| s.cpu_split_per_1k.map(|c| c.1));
        if let (Some(user), Some(system), Some(switches)) = (user, system, s.median(|s| s.switches_per_request)) {
            println!(
                "{:<8} at {} req/s: CPU s/1k user {user:.3} + system {system:.3}; {switches:.2} context switches per request (both proxies)",
                s.name, args.rate
            );
        }
    }
    if args.rounds > 1 {
        for s in &r.setups {
            let by_round = |c: &Column, prec: usize| {
                let v: Vec<String> = s.values(c.round).iter().map(|v| format!("{v:.prec$}")).collect();
                if v.is_empty() {
                    "-".to_string()
                } else {
                    v.join(" ")
                }
            };
            println!(
                "{:<8} by round: sat req/s {}; p99 ms {}; CPU s/1k {}",
                s.name,
                by_round(&COLUMNS[0], 0),
                by_round(&COLUMNS[2], 3),
                by_round(&COLUMNS[4], 3)
            );
        }
    }
    let pair = |name: &str, unit: &str, v: &[Option<f64>; 2]| match v {
        [Some(d), Some(w)] => println!("{name}: direct {d:.0} {unit}, weft {w:.0} {unit} (x{:.2} of direct)", w / d),
        [d, w] => println!("{name}: direct {d:?}, weft {w:?} {unit}"),
    };
    pair("gRPC bidi stream (64 B messages, 32 in flight)", "msg/s", &r.grpc);
    pair(&format!("TCP transfer of {} bytes through an --upstream tunnel", args.tcp_bytes), "MB/s", &r.tcp);
    let direct = r.tcp[0];
    for b in &r.tcp_setups {
        let ratio = direct.map_or("-".into(), |d| format!("{:.2}", b.mb_s / d));
        let cpu = b.cpu_s_per_gb.map_or(String::new(), |c| format!(", proxies' CPU {c:.2} s/GB"));
        let cpu = format!("{cpu}, client+sink {:.2} s/GB", b.ends_cpu_s_per_gb);
        println!("  TCP {:<18} {:>6.0} MB/s (x{ratio} of direct{cpu}): {}", b.name, b.mb_s, b.what);
    }
    println!("idle sidecar RSS (larger of the two, after start-up): {:.1} MiB", r.idle_sidecar_kib as f64 / 1024.0);
    for n in &r.notes {
        println!("note: {n}");
    }
}

fn to_json(r: &Report, args: &Args) -> serde_json::Value {
    let bests: Vec<Option<f64>> = COLUMNS.iter().map(|c| best_peer(&r.setups, c)).collect();
    let setups: Vec<_> = r
        .setups
        .iter()
        .map(|s| {
            let mut o = serde_json::Map::new();
            o.insert("name".into(), json!(s.name));
            for (i, c) in COLUMNS.iter().enumerate() {
                let v = c.value(s);
                o.insert(c.name.into(), json!(v));
                let ratio = match (v, bests[i]) {
                    (Some(v), Some(b)) if b > 0.0 && s.name != "direct" => Some(v / b),
                    _ => None,
                };
                o.insert(format!("{}_vs_best_peer", c.name), json!(ratio));
                if c.combine != Combine::Once {
                    o.insert(format!("{}_rounds", c.name), json!(s.values(c.round)));
                }
            }
            o.insert("errors".into(), json!(s.errors()));
            o.insert("fixed_rate_requests".into(), json!(s.rounds.iter().map(|s| s.fixed.requests).sum::<u64>()));
            o.insert("cpu_user_s_per_1k".into(), json!(s.median(|s| s.cpu_split_per_1k.map(|c| c.0))));
            o.insert("cpu_system_s_per_1k".into(), json!(s.median(|s| s.cpu_split_per_1k.map(|c| c.1))));
            o.insert("context_switches_per_request".into(), json!(s.median(|s| s.switches_per_request)));
            serde_json::Value::Object(o)
        })
        .collect();
    json!({
        "rounds": args.rounds,
        "load_average_at_start": r.load_at_start,
        "load_average_at_end": load_average(),
        "connections": args.connections,
        "duration_s": args.duration.as_secs_f64(),
        "rate": args.rate,
        "rate_duration_s": args.rate_duration.as_secs_f64(),
        "setups": setups,
        "grpc_bidi_msg_per_s": { "direct": r.grpc[0], "weft": r.grpc[1] },
        "tcp_bulk": tcp_json(r, args),
        "idle_sidecar_rss_mib": r.idle_sidecar_kib as f64 / 1024.0,
        "notes": r.notes,
    })
}

/// `tcp_bulk`: the bytes, then per setup `<name>_mb_per_s`,
/// `<name>_vs_direct` and `<name>_proxy_cpu_s_per_gb` (none for direct;
/// null for a setup that did not run), and `<name>_client_sink_cpu_s_per_gb`.
fn tcp_json(r: &Report, args: &Args) -> serde_json::Value {
    let mut o = serde_json::Map::new();
    o.insert("bytes".into(), json!(args.tcp_bytes));
    let names = ["direct", "weft", "haproxy", "haproxy_plain_tcp", "nginx"];
    for name in names {
        let b = r.tcp_setups.iter().find(|b| b.name == name);
        let mb_s = b.map(|b| b.mb_s);
        let vs = match (mb_s, r.tcp[0]) {
            (Some(v), Some(d)) if d > 0.0 && name != "direct" => Some(v / d),
            _ => None,
        };
        o.insert(format!("{name}_mb_per_s"), json!(mb_s));
        if name != "direct" {
            o.insert(format!("{name}_vs_direct"), json!(vs));
            o.insert(format!("{name}_proxy_cpu_s_per_gb"), json!(b.and_then(|b| b.cpu_s_per_gb)));
        }
        o.insert(format!("{name}_client_sink_cpu_s_per_gb"), json!(b.map(|b| b.ends_cpu_s_per_gb)));
    }
    serde_json::Value::Object(o)
}

fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    // Sidecar logs at warn: info-level logging is not what is measured (the
    // control plane's "listening" line at info is how the testkit sees it is up).
    if std::env::var_os("WEFT_TEST_LOG").is_none() {
        std::env::set_var("WEFT_TEST_LOG", "warn,weft_control_plane=info");
    }
    let apps = start_apps();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("load runtime");
    let report = match rt.block_on(main_async(args, apps)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weft-load: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&report, &args)).expect("JSON"));
    } else {
        print_table(&report, &args);
    }
    std::process::ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts_and_none() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(vec![7.0]), Some(7.0));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn each_round_starts_one_setup_further_on_and_covers_all() {
        let rounds: Vec<Vec<usize>> = (0..4).map(|r| round_order(4, r).collect()).collect();
        assert_eq!(rounds[0], [0, 1, 2, 3]);
        assert_eq!(rounds[1], [1, 2, 3, 0]);
        assert_eq!(rounds[3], [3, 0, 1, 2]);
        for r in &rounds {
            let mut sorted = r.clone();
            sorted.sort();
            assert_eq!(sorted, [0, 1, 2, 3], "every setup once per round");
        }
        let firsts: Vec<usize> = rounds.iter().map(|r| r[0]).collect();
        assert_eq!(firsts, [0, 1, 2, 3], "no setup is always first");
    }

    fn round(rps_requests: u64, p99_us: u64, rss_kib: u64) -> Setup {
        let mut fixed = histogram();
        fixed.record(p99_us).unwrap();
        let sec = Duration::from_secs(1);
        Setup {
            saturation: Run { requests: rps_requests, errors: 1, elapsed: sec, latency_us: histogram() },
            fixed: Run { requests: 10, errors: 0, elapsed: sec, latency_us: fixed },
            cpu_per_1k: Some(0.1),
            cpu_split_per_1k: Some((0.06, 0.04)),
            switches_per_request: Some(4.0),
            peak_rss_kib: Some(rss_kib),
        }
    }

    #[test]
    fn a_row_takes_the_median_of_its_rounds_and_the_largest_rss() {
        let row = Row {
            name: "weft",
            rounds: vec![round(50_000, 9_000, 18_000), round(10_000, 1_000, 19_000), round(20_000, 2_000, 18_500)],
            handshakes: Some(1500.0),
        };
        let col = |name: &str| COLUMNS.iter().find(|c| c.name == name).unwrap().value(&row);
        assert_eq!(col("saturation_rps"), Some(20_000.0), "the slow and the fast round do not decide");
        let p99 = col("p99_ms").unwrap();
        assert!((p99 - 2.0).abs() < 0.01, "median p99 {p99} ms");
        assert_eq!(col("peak_rss_mib"), Some(19_000.0 / 1024.0));
        assert_eq!(col("mtls_conn_per_s"), Some(1500.0));
        assert_eq!(row.errors(), 3);
    }

    #[test]
    fn the_best_peer_is_the_better_of_nginx_and_haproxy_only() {
        let row = |name, rps| Row { name, rounds: vec![round(rps, 1_000, 1_000)], handshakes: None };
        let rows = [row("direct", 90_000), row("weft", 30_000), row("nginx", 20_000), row("haproxy", 25_000)];
        assert_eq!(best_peer(&rows, &COLUMNS[0]), Some(25_000.0));
        assert_eq!(best_peer(&rows, &COLUMNS[6]), None, "no handshake rate measured");
    }
}
