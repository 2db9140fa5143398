//! weft-load: the end-to-end load harness. Starts a real control plane and
//! two sidecars (`web` → `api`) with the testkit, then runs small HTTP/1.1
//! GETs over N concurrent keep-alive connections for a fixed time, first
//! straight to the app server and then through both sidecars (mTLS, h2
//! between them), and prints throughput, latency percentiles, their ratios
//! and each sidecar's peak RSS.
//!
//! Build the binaries in release first, then run it from target/release:
//!
//! ```text
//! cargo build --release --workspace --bins
//! target/release/weft-load [--duration 10] [--connections 64] [--warmup 2]
//! ```

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use weft_testkit::{peak_rss_kib, servers, ControlPlane, Sidecar, SidecarSpec};

const TD: &str = "example.org";
const PATH: &str = "/bench";

struct Args {
    duration: Duration,
    warmup: Duration,
    connections: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args { duration: Duration::from_secs(10), warmup: Duration::from_secs(2), connections: 64 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| -> Result<u64, String> {
            let v = it.next().ok_or_else(|| format!("{name} needs a value"))?;
            v.parse().map_err(|e| format!("{name} {v:?}: {e}"))
        };
        match flag.as_str() {
            "--duration" => a.duration = Duration::from_secs(value("--duration")?),
            "--warmup" => a.warmup = Duration::from_secs(value("--warmup")?),
            "--connections" => a.connections = value("--connections")? as usize,
            "-h" | "--help" => {
                return Err("usage: weft-load [--duration SECS] [--warmup SECS] [--connections N]".into())
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if a.connections == 0 || a.duration.is_zero() {
        return Err("--connections and --duration must be positive".into());
    }
    Ok(a)
}

/// What one run measured.
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

/// One keep-alive connection sending GETs back to back until `end`;
/// latencies are recorded from `measure_from` on.
async fn connection(
    addr: SocketAddr,
    host: &'static str,
    measure_from: Instant,
    end: Instant,
) -> (u64, u64, Histogram<u64>) {
    let mut hist = histogram();
    let (mut ok, mut errors) = (0u64, 0u64);
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
        while Instant::now() < end {
            if send.ready().await.is_err() {
                errors += 1;
                continue 'reconnect;
            }
            let req = http::Request::get(PATH).header("host", host).body(Empty::<Bytes>::new()).expect("valid request");
            let t = Instant::now();
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
            let took = t.elapsed();
            if t < measure_from {
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

async fn run(addr: SocketAddr, host: &'static str, args: &Args) -> Run {
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let tasks: Vec<_> =
        (0..args.connections).map(|_| tokio::spawn(connection(addr, host, measure_from, end))).collect();
    let mut total = Run { requests: 0, errors: 0, elapsed: args.duration, latency_us: histogram() };
    for t in tasks {
        let (ok, errors, hist) = t.await.expect("load task");
        total.requests += ok;
        total.errors += errors;
        total.latency_us.add(hist).expect("histograms with equal bounds");
    }
    total
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn print_run(name: &str, r: &Run) {
    println!(
        "{name:<14} {:>10.0} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>8}",
        r.rps(),
        r.ms(0.5),
        r.ms(0.99),
        r.ms(0.999),
        r.latency_us.max() as f64 / 1000.0,
        r.errors
    );
}

async fn main_async(args: Args, app: SocketAddr) -> Result<(), String> {
    let cp = ControlPlane::start(TD, &[]).await;
    let web_app = servers::http("web").await;
    let server =
        Sidecar::start(&cp, TD, SidecarSpec { service: "api", app, upstreams: &[], labels: &[], extra_args: &[] })
            .await;
    let client = Sidecar::start(&cp, TD, SidecarSpec::new("web", web_app.addr)).await;
    client.wait_endpoints("api", 1, Duration::from_secs(10)).await;
    match weft_testkit::http_get_host(client.outbound, "api", PATH).await {
        Ok((200, body)) if body == format!("api {PATH}") => {}
        other => return Err(format!("the mesh does not answer {PATH}: {other:?}")),
    }

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "weft-load: {} keep-alive HTTP/1.1 connections, GET {PATH} (~{} B answer), {:?} warm-up + {:?} per run",
        args.connections,
        format!("api {PATH}").len(),
        args.warmup,
        args.duration
    );
    println!(
        "host: {cpus} CPUs, load average before: {}; load generator, app server and both sidecars share them",
        load_average()
    );
    println!(
        "{:<14} {:>10} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "errors"
    );
    let direct = run(app, "api", &args).await;
    print_run("direct", &direct);
    let mesh = run(client.outbound, "api", &args).await;
    print_run("through mesh", &mesh);
    println!(
        "mesh/direct:   throughput x{:.3}, p50 x{:.2} (+{:.3} ms), p99 x{:.2} (+{:.3} ms)",
        mesh.rps() / direct.rps(),
        mesh.ms(0.5) / direct.ms(0.5),
        mesh.ms(0.5) - direct.ms(0.5),
        mesh.ms(0.99) / direct.ms(0.99),
        mesh.ms(0.99) - direct.ms(0.99),
    );
    let nginx = match weft_benches::nginx::binary() {
        Some(bin) => Some(nginx_run(&bin, &cp, app, &client, &server, &args, &mesh).await?),
        None => {
            println!("(nginx not installed: `apt-get install nginx-light` adds a weft-vs-nginx comparison)");
            None
        }
    };
    for (name, s) in [("client (web)", &client), ("server (api)", &server)] {
        let rss =
            peak_rss_kib(s.proc_.pid()).map(|k| format!("{:.1} MiB", k as f64 / 1024.0)).unwrap_or_else(|| "?".into());
        println!("peak RSS (VmHWM) of the {name} sidecar: {rss}");
    }
    println!("load average after: {}", load_average());
    let nginx_errors = nginx.map_or(0, |r| r.errors);
    if direct.errors + mesh.errors + nginx_errors > 0 {
        return Err(format!(
            "{} errors direct, {} through the mesh, {nginx_errors} through nginx",
            direct.errors, mesh.errors
        ));
    }
    Ok(())
}

/// The same load through two nginx proxies doing mTLS with the sidecars' SVIDs.
async fn nginx_run(
    bin: &std::path::Path,
    cp: &ControlPlane,
    app: SocketAddr,
    client: &Sidecar,
    server: &Sidecar,
    args: &Args,
    mesh: &Run,
) -> Result<Run, String> {
    use weft_benches::nginx::{start, Identity};
    let id = |s: &Sidecar| (s.state_dir.join("svid.pem"), s.state_dir.join("svid.key"), cp.trust_bundle());
    let (c, s) = (id(client), id(server));
    let dir = cp.dir.path().join("nginx");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let pair = start(
        bin,
        &dir,
        app,
        Identity { chain: &c.0, key: &c.1, bundle: &c.2 },
        Identity { chain: &s.0, key: &s.1, bundle: &s.2 },
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((200, _)) = weft_testkit::http_get_host(pair.entry, "api", PATH).await {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "nginx pair does not answer; logs:\n{}\n{}",
                pair.client.log_text(),
                pair.server.log_text()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = run(pair.entry, "api", args).await;
    print_run("through nginx", &r);
    println!(
        "weft/nginx:    throughput x{:.3}, p50 x{:.2}, p99 x{:.2}",
        mesh.rps() / r.rps(),
        mesh.ms(0.5) / r.ms(0.5),
        mesh.ms(0.99) / r.ms(0.99),
    );
    Ok(r)
}

fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    // Sidecar logs at warn: info-level logging is not what is measured.
    if std::env::var_os("WEFT_TEST_LOG").is_none() {
        std::env::set_var("WEFT_TEST_LOG", "warn");
    }
    // The app server gets its own thread and runtime, like a separate process
    // would, so the load generator's tasks do not queue in front of it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("app runtime");
        rt.block_on(async {
            let app = servers::http("api").await;
            let _ = tx.send(app.addr);
            std::future::pending::<()>().await;
        });
    });
    let app = rx.recv().expect("app server started");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("load runtime");
    match rt.block_on(main_async(args, app)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-load: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
