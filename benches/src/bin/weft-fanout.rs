//! weft-fanout: config fan-out at scale. Starts one real control plane
//! (`--store`, default the file store) and connects N simulated sidecars to
//! it from this process: each a real gRPC client with its own mutual-TLS
//! connection and `Config.Watch` stream, presenting a real SVID issued
//! through a join token, and ACKing every snapshot as a sidecar does. Then:
//!
//! - join storm: all N open their streams at once (what a control-plane
//!   restart looks like); settled = every sidecar holds every endpoint of its
//!   scope. Reported: settle time, control-plane CPU per join, RSS per sidecar.
//! - route change: one HTTPRoute weight is changed in the config file
//!   (atomic rename); per sidecar, the time until its stream delivers the new
//!   mesh config: p50/p99/max.
//! - bytes per update, per sidecar, for three kinds of sidecars: scoped
//!   (`calls`, incremental: what `weft-proxy --calls` does), unscoped
//!   incremental (`weft-proxy` without `--calls`), and unscoped full (older
//!   sidecars), for the route change and for one endpoint joining.
//!
//! Sidecars of one service share that service's SVID (replicas of a service
//! have one SPIFFE ID); one join token is spent per service, because the file
//! store rewrites its token file on every change. Each sidecar still has its
//! own TLS connection and stream.
//!
//! ```text
//! cargo build --release -p weft-control-plane -p weft -p weft-benches --bins
//! target/release/weft-fanout [--sidecars 1000,10000] [--endpoints-per-service 10]
//!     [--calls 3] [--unscoped 20] [--store file|etcd://127.0.0.1:2379]
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use tonic::transport::Channel;
use weft_certs::IdMatcher;
use weft_proto::config::v1::config_client::ConfigClient;
use weft_proto::config::v1::{AckRequest, WatchRequest};
use weft_testkit::{client_tls, ControlPlane, Pki};

const TD: &str = "fanout.example";

struct Args {
    sidecars: Vec<usize>,
    per_service: usize,
    calls: usize,
    unscoped: usize,
    store: String,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args { sidecars: vec![1000, 10_000], per_service: 10, calls: 3, unscoped: 3, store: "file".into() };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        let num = |name: &str, v: String| v.parse::<usize>().map_err(|e| format!("{name} {v:?}: {e}"));
        match flag.as_str() {
            "--sidecars" => {
                a.sidecars = value("--sidecars")?
                    .split(',')
                    .map(|s| num("--sidecars", s.trim().to_string()))
                    .collect::<Result<_, _>>()?
            }
            "--endpoints-per-service" => a.per_service = num(&flag, value(&flag)?)?,
            "--calls" => a.calls = num(&flag, value(&flag)?)?,
            "--unscoped" => a.unscoped = num(&flag, value(&flag)?)?,
            "--store" => a.store = value("--store")?,
            "-h" | "--help" => {
                return Err("usage: weft-fanout [--sidecars N,N..] [--endpoints-per-service E] [--calls K] \
                            [--unscoped M] [--store file|etcd://host:port]"
                    .into())
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if a.per_service == 0 || a.sidecars.contains(&0) {
        return Err("--sidecars and --endpoints-per-service must be positive".into());
    }
    Ok(a)
}

/// The three kinds of simulated sidecar.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// `calls` declared, incremental snapshots.
    Scoped,
    /// No `calls`, incremental snapshots.
    Unscoped,
    /// No `calls`, full snapshots (a sidecar from before scopes).
    Legacy,
}

/// One simulated sidecar's plan and what it observed.
struct Sim {
    kind: Kind,
    service: usize,
    calls: Vec<usize>,
    /// service index → how many endpoints it must see to be complete.
    expect: BTreeMap<String, usize>,
}

/// Counters shared by every simulated sidecar.
#[derive(Default)]
struct Observed {
    complete: AtomicUsize,
    /// Bytes received per kind since the last reset.
    bytes: [AtomicU64; 3],
    /// Messages received per kind since the last reset.
    messages: [AtomicU64; 3],
    /// Route-change latencies, in microseconds since `change_at`.
    change_latency: Mutex<Vec<u64>>,
    change_at: Mutex<Option<Instant>>,
    failed: AtomicUsize,
}

fn svc(i: usize) -> String {
    format!("svc-{i}")
}

fn mesh_config(services: usize, weight: u32) -> String {
    let mut y = String::new();
    for i in 0..services {
        y.push_str(&format!(
            "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {{name: {}}}\nspec: {{}}\n---\n",
            svc(i)
        ));
    }
    y.push_str(&format!(
        "apiVersion: weft.dev/v1alpha1\nkind: HTTPRoute\nmetadata: {{name: split}}\nspec: {{parentRefs: [{{name: svc-0}}], \
         rules: [{{backendRefs: [{{name: svc-0, weight: {weight}}}, {{name: svc-1, weight: {}}}]}}]}}\n",
        100 - weight
    ));
    y
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

/// (user + system CPU seconds, RSS KiB) of a process, from /proc.
fn cpu_and_rss(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    // After the command name: state is field 3, utime 14, stime 15 (1-based, proc(5)).
    let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let cpu = (ticks(14) + ticks(15)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    (cpu, rss)
}

/// The 1-minute load average (the machine is shared).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Runs one simulated sidecar's stream: applies full and incremental
/// snapshots to a count of endpoints per service, ACKs each, and reports
/// completeness, bytes and the route change's arrival.
async fn run_sim(sim: Arc<Sim>, idx: usize, channel: Channel, obs: Arc<Observed>) {
    let mut client = ConfigClient::new(channel);
    let req = WatchRequest {
        service: svc(sim.service),
        inbound_address: format!("10.{}.{}.{}:15006", (idx >> 16) & 255, (idx >> 8) & 255, idx & 255),
        admin_address: "127.0.0.1:9".into(),
        calls: if sim.kind == Kind::Scoped { sim.calls.iter().map(|c| svc(*c)).collect() } else { vec![] },
        accepts_incremental: sim.kind != Kind::Legacy,
        ..Default::default()
    };
    // A refused or timed-out connection (a full accept queue in the storm),
    // or a stream that ends, is retried as a sidecar does, with jittered
    // backoff; counted. Each new stream starts with a full snapshot.
    let mut backoff = Duration::from_millis(250);
    let mut complete = false;
    let mut weight_seen = String::new();
    let k = sim.kind as usize;
    loop {
        let mut stream = match client.watch(req.clone()).await {
            Ok(s) => s.into_inner(),
            Err(e) => {
                if obs.failed.fetch_add(1, Ordering::Relaxed) < 3 {
                    eprintln!("watch {idx} (retrying): {e}");
                }
                tokio::time::sleep(backoff.mul_f64(0.5 + (idx % 100) as f64 / 100.0)).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let mut view: BTreeMap<String, usize> = BTreeMap::new();
        while let Ok(Some(snap)) = stream.message().await {
            backoff = Duration::from_millis(250);
            obs.bytes[k].fetch_add(snap.encoded_len() as u64, Ordering::Relaxed);
            obs.messages[k].fetch_add(1, Ordering::Relaxed);
            if !snap.incremental {
                view.clear();
            }
            for name in &snap.removed_services {
                view.remove(name);
            }
            for s in &snap.services {
                view.insert(s.name.clone(), s.endpoints.len());
            }
            if !snap.mesh_config_unchanged {
                // The route's current weight split, e.g. "90": changed → the update arrived.
                let w =
                    snap.mesh_config_json.split("\"weight\":").nth(1).unwrap_or("").chars().take(3).collect::<String>();
                if !weight_seen.is_empty() && w != weight_seen {
                    if let Some(at) = *obs.change_at.lock().unwrap() {
                        obs.change_latency.lock().unwrap().push(at.elapsed().as_micros() as u64);
                    }
                }
                weight_seen = w;
            }
            if !complete && sim.expect.iter().all(|(s, n)| view.get(s) == Some(n)) {
                complete = true;
                obs.complete.fetch_add(1, Ordering::Relaxed);
            }
            let ack = AckRequest {
                version: snap.version,
                error: String::new(),
                inbound_address: req.inbound_address.clone(),
            };
            let _ = client.ack(ack).await;
        }
        obs.failed.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(backoff.mul_f64(0.5 + (idx % 100) as f64 / 100.0)).await;
    }
}

struct Row {
    n: usize,
    services: usize,
    settle: Duration,
    join_cpu_ms: f64,
    rss_kib_per_sidecar: f64,
    rss_total_mib: f64,
    p50: f64,
    p99: f64,
    max: f64,
    got_change: usize,
    change_cpu_s: f64,
    route_bytes: [f64; 3],
    join_bytes: [f64; 3],
    join_pushed: [u64; 3],
    first_full_bytes: [f64; 3],
    retries: usize,
    load: String,
}

async fn run(args: &Args, n: usize) -> Row {
    let services = n.div_ceil(args.per_service).max(args.calls + 2);
    let total = n + 2 * args.unscoped;
    // Who is who: sidecar i is of service i % services and calls the next `calls` services.
    let mut members = vec![0usize; services];
    let plan: Vec<(Kind, usize)> = (0..total)
        .map(|i| {
            let kind = if i < n {
                Kind::Scoped
            } else if i < n + args.unscoped {
                Kind::Unscoped
            } else {
                Kind::Legacy
            };
            (kind, i % services)
        })
        .collect();
    for (_, s) in &plan {
        members[*s] += 1;
    }
    let sims: Vec<Arc<Sim>> = plan
        .iter()
        .map(|&(kind, service)| {
            let calls: Vec<usize> = (1..=args.calls).map(|d| (service + d) % services).collect();
            let mut scope: Vec<usize> = if kind == Kind::Scoped { calls.clone() } else { (0..services).collect() };
            scope.push(service);
            if kind == Kind::Scoped && calls.contains(&0) {
                scope.push(1);
            }
            let expect = scope.into_iter().map(|s| (svc(s), members[s])).collect();
            Arc::new(Sim { kind, service, calls, expect })
        })
        .collect();

    let pki = Pki::new(TD);
    let work = tempfile::tempdir().expect("tempdir");
    let cfg = work.path().join("mesh.yaml");
    write_atomic(&cfg, &mesh_config(services, 90));
    let cfg_arg = cfg.display().to_string();
    let mut cp_args = vec!["--config", cfg_arg.as_str(), "--svid-ttl", "24h"];
    if args.store != "file" {
        cp_args.extend(["--store", args.store.as_str()]);
    }
    let cp = ControlPlane::start_on(&pki, &work.path().join("state"), &cp_args).await;
    let pid = cp.proc_.pid();

    // One SVID per service, through a join token each.
    let bundle = pki.bundle();
    let cp_id = IdMatcher::Exact(pki.control_plane_id());
    let mut tls = Vec::with_capacity(services);
    for s in 0..services {
        let id = pki.id(&format!("/ns/default/sa/{}", svc(s)));
        let token = cp.create_token(&id, 3600).await;
        let (svid, _) = cp.attest(&token).await.expect("attest");
        tls.push(client_tls(&bundle, Some(&svid), cp_id.clone()));
    }
    eprintln!("[{n}] {services} services attested; load {}", loadavg());

    // Join storm: every stream at once.
    let obs = Arc::new(Observed::default());
    let (cpu0, rss0) = cpu_and_rss(pid);
    let started = Instant::now();
    let addr = cp.addr.to_string();
    let mut tasks = Vec::with_capacity(total);
    for (i, sim) in sims.iter().enumerate() {
        let channel =
            weft_proto::channel::lazy_channel(&addr, tls[sim.service].clone(), weft_certs::tls::server_name())
                .expect("channel");
        tasks.push(tokio::spawn(run_sim(sim.clone(), i, channel, obs.clone())));
    }
    let deadline = Duration::from_secs(300);
    while obs.complete.load(Ordering::Relaxed) < total {
        if started.elapsed() > deadline {
            panic!(
                "[{n}] {} of {total} complete after {:?} ({} streams failed)",
                obs.complete.load(Ordering::Relaxed),
                started.elapsed(),
                obs.failed.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        if started.elapsed().as_millis() % 5000 < 20 {
            eprintln!(
                "[{n}] {} of {total} complete after {:?}",
                obs.complete.load(Ordering::Relaxed),
                started.elapsed()
            );
        }
    }
    let settle = started.elapsed();
    // Let the last ACKs land before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cpu1, rss1) = cpu_and_rss(pid);
    let first_full_bytes = per_kind(&obs, n, args.unscoped);
    eprintln!("[{n}] join storm settled in {settle:?}; load {}", loadavg());

    // Route change: 90/10 → 80/20.
    reset(&obs);
    *obs.change_at.lock().unwrap() = Some(Instant::now());
    write_atomic(&cfg, &mesh_config(services, 80));
    let t = Instant::now();
    while obs.change_latency.lock().unwrap().len() < total && t.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cpu2, _) = cpu_and_rss(pid);
    let mut lat = obs.change_latency.lock().unwrap().clone();
    lat.sort_unstable();
    let route_bytes = per_kind(&obs, n, args.unscoped);
    eprintln!("[{n}] route change reached {}/{total}; load {}", lat.len(), loadavg());

    // One endpoint joins service 5 (a scale-up): who is told, how much.
    reset(&obs);
    let extra = Arc::new(Sim { kind: Kind::Scoped, service: 5 % services, calls: vec![], expect: BTreeMap::new() });
    let channel = weft_proto::channel::lazy_channel(&addr, tls[extra.service].clone(), weft_certs::tls::server_name())
        .expect("channel");
    let extra_obs = Arc::new(Observed::default());
    tasks.push(tokio::spawn(run_sim(extra, total, channel, extra_obs)));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let join_bytes = per_kind(&obs, n, args.unscoped);
    let join_pushed = [0, 1, 2].map(|k| obs.messages[k].load(Ordering::Relaxed));

    for t in tasks {
        t.abort();
    }
    drop(cp);
    Row {
        n,
        services,
        settle,
        join_cpu_ms: (cpu1 - cpu0) * 1000.0 / total as f64,
        // What the sidecars added, over the idle control plane's own.
        rss_kib_per_sidecar: rss1.saturating_sub(rss0) as f64 / total as f64,
        rss_total_mib: rss1 as f64 / 1024.0,
        p50: pct(&lat, 0.5),
        p99: pct(&lat, 0.99),
        max: pct(&lat, 1.0),
        got_change: lat.len(),
        change_cpu_s: cpu2 - cpu1,
        route_bytes,
        join_bytes,
        join_pushed,
        first_full_bytes,
        retries: obs.failed.load(Ordering::Relaxed),
        load: loadavg(),
    }
}

/// Bytes received per sidecar of each kind since the last reset.
fn per_kind(obs: &Observed, n: usize, unscoped: usize) -> [f64; 3] {
    let count = [n, unscoped, unscoped];
    [0, 1, 2].map(|k| obs.bytes[k].load(Ordering::Relaxed) as f64 / count[k].max(1) as f64)
}

fn reset(obs: &Observed) {
    for k in 0..3 {
        obs.bytes[k].store(0, Ordering::Relaxed);
        obs.messages[k].store(0, Ordering::Relaxed);
    }
}

fn kb(b: f64) -> String {
    if b < 1024.0 {
        format!("{b:.0} B")
    } else {
        format!("{:.1} KB", b / 1024.0)
    }
}

#[tokio::main]
async fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    // Two descriptors per sidecar (both ends on this machine); the control
    // plane inherits the raised limit.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(lim) => eprintln!("open-file limit: {lim}"),
        Err(e) => eprintln!("cannot raise the open-file limit: {e}"),
    }
    let mut rows = Vec::new();
    for &n in &args.sidecars {
        rows.push(run(&args, n).await);
        // Each size's tables as soon as it is measured (a later size may not finish).
        print_tables(&args, &rows);
    }
}

fn print_tables(args: &Args, rows: &[Row]) {
    println!(
        "store: {}; {} endpoints per service, each sidecar calls {}; {} unscoped + {} full-snapshot sidecars besides N",
        args.store, args.per_service, args.calls, args.unscoped, args.unscoped
    );
    println!();
    println!("| sidecars (N) | services | join storm settled (stream retries) | CP CPU per join | CP RSS (total; added per sidecar) | route change p50 / p99 / max | reached | CP CPU for the change | load avg |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {:.1} s ({}) | {:.2} ms | {:.0} MiB, {:.1} KB | {:.0} / {:.0} / {:.0} ms | {}/{} | {:.2} s | {} |",
            r.n,
            r.services,
            r.settle.as_secs_f64(),
            r.retries,
            r.join_cpu_ms,
            r.rss_total_mib,
            r.rss_kib_per_sidecar,
            r.p50,
            r.p99,
            r.max,
            r.got_change,
            r.n + 2 * args.unscoped,
            r.change_cpu_s,
            r.load
        );
    }
    println!();
    println!("| sidecars (N) | kind | join storm (all messages until settled) | route change | one endpoint joins (bytes per sidecar; messages to all of that kind) |");
    println!("|---|---|---|---|---|");
    for r in rows {
        for (k, name) in ["scoped, incremental (--calls)", "unscoped, incremental", "unscoped, full (old sidecars)"]
            .iter()
            .enumerate()
        {
            println!(
                "| {} | {} | {} | {} | {} ({} messages) |",
                r.n,
                name,
                kb(r.first_full_bytes[k]),
                kb(r.route_bytes[k]),
                kb(r.join_bytes[k]),
                r.join_pushed[k]
            );
        }
    }
}
