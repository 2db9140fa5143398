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
//!   (atomic rename); per sidecar whose scope holds the route (its callers,
//!   the unscoped ones), the time until its stream delivers the new mesh
//!   config: p50/p99/max.
//! - mesh-wide change: a `Mesh` setting changes (every sidecar's cut of the
//!   mesh config changes): the same latency over every sidecar, the worst
//!   case of the fan-out.
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
//!     [--calls 3] [--unscoped 3] [--store file|etcd|etcd://127.0.0.1:2379] [--deadline 300]
//! ```
//!
//! `--store etcd` starts a local one-member etcd (the `etcd` binary on PATH,
//! as the tests do) for each size.
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
    deadline: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        sidecars: vec![1000, 10_000],
        per_service: 10,
        calls: 3,
        unscoped: 3,
        store: "file".into(),
        deadline: Duration::from_secs(300),
    };
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
            "--deadline" => a.deadline = Duration::from_secs(num(&flag, value(&flag)?)? as u64),
            "-h" | "--help" => {
                return Err("usage: weft-fanout [--sidecars N,N..] [--endpoints-per-service E] [--calls K] \
                            [--unscoped M] [--store file|etcd|etcd://host:port] [--deadline SECONDS]"
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
    /// Latencies of the current change, in microseconds since it was made.
    change_latency: Mutex<Vec<u64>>,
    /// The current change: a string its mesh config holds, when it was
    /// made, and its number (each sidecar records each change once).
    change: Mutex<Option<(String, Instant, usize)>>,
    failed: AtomicUsize,
    /// Why streams ended or failed, by message (the first words), counted.
    ends: Mutex<BTreeMap<String, usize>>,
}

impl Observed {
    fn ended(&self, why: String) {
        let short: String = why.chars().take(120).collect();
        *self.ends.lock().unwrap().entry(short).or_default() += 1;
    }
}

fn svc(i: usize) -> String {
    format!("svc-{i}")
}

fn mesh_config(services: usize, weight: u32, encoded_slashes: &str) -> String {
    let mut y = format!(
        "apiVersion: weft.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: mesh}}\n\
         spec: {{pathNormalization: {{encodedSlashes: {encoded_slashes}}}}}\n---\n"
    );
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
    let mut recorded = 0usize;
    let k = sim.kind as usize;
    loop {
        let mut stream = match client.watch(req.clone()).await {
            Ok(s) => s.into_inner(),
            Err(e) => {
                obs.failed.fetch_add(1, Ordering::Relaxed);
                obs.ended(format!("watch refused: {e}"));
                tokio::time::sleep(backoff.mul_f64(0.5 + (idx % 100) as f64 / 100.0)).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let mut view: BTreeMap<String, usize> = BTreeMap::new();
        let end = loop {
            let snap = match stream.message().await {
                Ok(Some(s)) => s,
                Ok(None) => break "stream ended by the server (OK)".to_string(),
                Err(e) => break format!("stream failed: {e}"),
            };
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
                let change = obs.change.lock().unwrap().clone();
                if let Some((marker, at, n)) = change {
                    if n > recorded && snap.mesh_config_json.contains(&marker) {
                        recorded = n;
                        obs.change_latency.lock().unwrap().push(at.elapsed().as_micros() as u64);
                    }
                }
            }
            if !complete && sim.expect.iter().all(|(s, n)| view.get(s) == Some(n)) {
                complete = true;
                obs.complete.fetch_add(1, Ordering::Relaxed);
            }
            let ack = AckRequest {
                version: snap.version,
                error: String::new(),
                inbound_address: req.inbound_address.clone(),
                ..Default::default()
            };
            let _ = client.ack(ack).await;
        };
        obs.ended(end);
        obs.failed.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(backoff.mul_f64(0.5 + (idx % 100) as f64 / 100.0)).await;
    }
}

/// Latencies of one change, over the sidecars that should get it.
struct Change {
    reached: usize,
    expected: usize,
    p50: f64,
    p99: f64,
    max: f64,
    /// Control-plane and bench (client) CPU seconds from the change until it settled.
    cp_cpu_s: f64,
    client_cpu_s: f64,
    /// Bytes per sidecar of each kind.
    bytes: [f64; 3],
}

struct Row {
    n: usize,
    services: usize,
    /// None: not settled by the deadline (how many were, then).
    settle: Result<Duration, usize>,
    join_cpu_ms: f64,
    join_client_cpu_ms: f64,
    rss_kib_per_sidecar: f64,
    rss_total_mib: f64,
    route: Option<Change>,
    mesh: Option<Change>,
    join_bytes: [f64; 3],
    join_pushed: [u64; 3],
    first_full_bytes: [f64; 3],
    retries: usize,
    ends: BTreeMap<String, usize>,
    load: String,
}

/// This process's own user+system CPU seconds (the simulated sidecars).
fn own_cpu() -> f64 {
    cpu_and_rss(std::process::id()).0
}

/// Makes change number `seq` (`text` is the new config: renamed over the
/// `--config` file, or with etcd `weft apply`'d through `apply`), waits until
/// `expected` sidecars recorded it (or `limit`), and measures.
// One call per change; the arguments are the run's, not worth a struct.
#[allow(clippy::too_many_arguments)]
async fn measure_change(
    obs: &Observed,
    cfg: &Path,
    apply: Option<&ControlPlane>,
    text: &str,
    marker: &str,
    seq: usize,
    expected: usize,
    pid: u32,
    n: usize,
    unscoped: usize,
) -> Change {
    reset(obs);
    obs.change_latency.lock().unwrap().clear();
    let (cp0, me0) = (cpu_and_rss(pid).0, own_cpu());
    *obs.change.lock().unwrap() = Some((marker.to_string(), Instant::now(), seq));
    match apply {
        Some(cp) => {
            let req = weft_proto::admin::v1::ApplyConfigRequest { yaml: text.to_string(), if_revision: 0 };
            cp.admin_as(Some(&cp.operator())).apply_config(req).await.expect("apply the mesh config");
        }
        None => write_atomic(cfg, text),
    }
    let t = Instant::now();
    while obs.change_latency.lock().unwrap().len() < expected && t.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let the ACKs land.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cp1, me1) = (cpu_and_rss(pid).0, own_cpu());
    let mut lat = obs.change_latency.lock().unwrap().clone();
    lat.sort_unstable();
    Change {
        reached: lat.len(),
        expected,
        p50: pct(&lat, 0.5),
        p99: pct(&lat, 0.99),
        max: pct(&lat, 1.0),
        cp_cpu_s: cp1 - cp0,
        client_cpu_s: me1 - me0,
        bytes: per_kind(obs, n, unscoped),
    }
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
    // The route's parent is svc-0: its callers and its own sidecars have it
    // in scope, and every unscoped sidecar.
    let route_expected =
        sims.iter().filter(|s| s.kind != Kind::Scoped || s.service == 0 || s.calls.contains(&0)).count();

    // `--store etcd`: a local one-member etcd for this size (dropped with it).
    let etcd = if args.store == "etcd" {
        Some(weft_testkit::etcd::Etcd::start(1).await.expect("--store etcd needs the etcd binary on PATH"))
    } else {
        None
    };
    let store = match &etcd {
        Some(e) => e.url(),
        None => args.store.clone(),
    };
    let pki = Pki::new(TD);
    let work = tempfile::tempdir().expect("tempdir");
    let cfg = work.path().join("mesh.yaml");
    write_atomic(&cfg, &mesh_config(services, 90, "reject"));
    let cfg_arg = cfg.display().to_string();
    let mut cp_args = vec!["--config", cfg_arg.as_str(), "--svid-ttl", "24h"];
    if store != "file" {
        cp_args.extend(["--store", store.as_str()]);
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
    eprintln!("[{n}] {services} services attested (store {store}); load {}", loadavg());

    // Join storm: every stream at once.
    let obs = Arc::new(Observed::default());
    let (cpu0, rss0) = cpu_and_rss(pid);
    let me0 = own_cpu();
    let started = Instant::now();
    let addr = cp.addr.to_string();
    let mut tasks = Vec::with_capacity(total);
    for (i, sim) in sims.iter().enumerate() {
        let channel =
            weft_proto::channel::lazy_channel(&addr, tls[sim.service].clone(), weft_certs::tls::server_name())
                .expect("channel");
        tasks.push(tokio::spawn(run_sim(sim.clone(), i, channel, obs.clone())));
    }
    let mut last_report = Instant::now();
    let settle = loop {
        let complete = obs.complete.load(Ordering::Relaxed);
        if complete >= total {
            break Ok(started.elapsed());
        }
        if started.elapsed() > args.deadline {
            break Err(complete);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            let (cpu, rss) = cpu_and_rss(pid);
            eprintln!(
                "[{n}] {complete} of {total} complete after {:.1?} ({} stream failures; CP CPU {:.1} s, client CPU {:.1} s, CP RSS {} MiB)",
                started.elapsed(),
                obs.failed.load(Ordering::Relaxed),
                cpu - cpu0,
                own_cpu() - me0,
                rss / 1024
            );
        }
    };
    // Let the last ACKs land before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cpu1, rss1) = cpu_and_rss(pid);
    let me1 = own_cpu();
    let first_full_bytes = per_kind(&obs, n, args.unscoped);
    eprintln!("[{n}] join storm: {settle:?}; load {}", loadavg());
    let ends_after_join = obs.ends.lock().unwrap().clone();

    // With etcd the stored config is what serves: changes are applied.
    let apply = (store != "file").then_some(&cp);
    let (mut route, mut mesh) = (None, None);
    let (mut join_bytes, mut join_pushed) = ([0.0; 3], [0; 3]);
    if settle.is_ok() {
        // Route change: 90/10 → 80/20 on svc-0.
        let text = mesh_config(services, 80, "reject");
        let r =
            measure_change(&obs, &cfg, apply, &text, "\"weight\":80", 1, route_expected, pid, n, args.unscoped).await;
        eprintln!("[{n}] route change reached {}/{}; load {}", r.reached, r.expected, loadavg());
        route = Some(r);
        // Mesh-wide change: every sidecar's cut changes.
        let text = mesh_config(services, 80, "opaque");
        let m = measure_change(&obs, &cfg, apply, &text, "opaque", 2, total, pid, n, args.unscoped).await;
        eprintln!("[{n}] mesh-wide change reached {}/{}; load {}", m.reached, m.expected, loadavg());
        mesh = Some(m);

        // One endpoint joins service 5 (a scale-up): who is told, how much.
        reset(&obs);
        let extra = Arc::new(Sim { kind: Kind::Scoped, service: 5 % services, calls: vec![], expect: BTreeMap::new() });
        let channel =
            weft_proto::channel::lazy_channel(&addr, tls[extra.service].clone(), weft_certs::tls::server_name())
                .expect("channel");
        let extra_obs = Arc::new(Observed::default());
        tasks.push(tokio::spawn(run_sim(extra, total, channel, extra_obs)));
        tokio::time::sleep(Duration::from_secs(3)).await;
        join_bytes = per_kind(&obs, n, args.unscoped);
        join_pushed = [0, 1, 2].map(|k| obs.messages[k].load(Ordering::Relaxed));
    }

    for t in tasks {
        t.abort();
    }
    drop(cp);
    drop(etcd);
    Row {
        n,
        services,
        settle,
        join_cpu_ms: (cpu1 - cpu0) * 1000.0 / total as f64,
        join_client_cpu_ms: (me1 - me0) * 1000.0 / total as f64,
        // What the sidecars added, over the idle control plane's own.
        rss_kib_per_sidecar: rss1.saturating_sub(rss0) as f64 / total as f64,
        rss_total_mib: rss1 as f64 / 1024.0,
        route,
        mesh,
        join_bytes,
        join_pushed,
        first_full_bytes,
        retries: obs.failed.load(Ordering::Relaxed),
        ends: ends_after_join,
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
    println!("| sidecars (N) | services | join storm settled (stream retries) | CP CPU per join | client CPU per join | CP RSS (total; added per sidecar) | route change p50 / p99 / max (reached) | mesh-wide change p50 / p99 / max (reached) | CP CPU: route, mesh-wide change (client CPU) | load avg |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let change = |c: &Option<Change>| match c {
        Some(c) => format!("{:.0} / {:.0} / {:.0} ms ({}/{})", c.p50, c.p99, c.max, c.reached, c.expected),
        None => "–".into(),
    };
    for r in rows {
        let settle = match r.settle {
            Ok(d) => format!("{:.1} s", d.as_secs_f64()),
            Err(done) => format!("not in {} s ({done} settled)", args.deadline.as_secs()),
        };
        let cpu = match (&r.route, &r.mesh) {
            (Some(a), Some(b)) => format!(
                "{:.2} s, {:.2} s (client {:.2} s, {:.2} s)",
                a.cp_cpu_s, b.cp_cpu_s, a.client_cpu_s, b.client_cpu_s
            ),
            _ => "–".into(),
        };
        println!(
            "| {} | {} | {settle} ({}) | {:.2} ms | {:.2} ms | {:.0} MiB, {:.1} KB | {} | {} | {cpu} | {} |",
            r.n,
            r.services,
            r.retries,
            r.join_cpu_ms,
            r.join_client_cpu_ms,
            r.rss_total_mib,
            r.rss_kib_per_sidecar,
            change(&r.route),
            change(&r.mesh),
            r.load
        );
    }
    println!();
    println!("| sidecars (N) | kind | join storm (all messages until settled) | route change | mesh-wide change | one endpoint joins (bytes per sidecar; messages to all of that kind) |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        for (k, name) in ["scoped, incremental (--calls)", "unscoped, incremental", "unscoped, full (old sidecars)"]
            .iter()
            .enumerate()
        {
            let bytes = |c: &Option<Change>| c.as_ref().map(|c| kb(c.bytes[k])).unwrap_or_else(|| "–".into());
            println!(
                "| {} | {} | {} | {} | {} | {} ({} messages) |",
                r.n,
                name,
                kb(r.first_full_bytes[k]),
                bytes(&r.route),
                bytes(&r.mesh),
                kb(r.join_bytes[k]),
                r.join_pushed[k]
            );
        }
    }
    for r in rows {
        if !r.ends.is_empty() {
            println!();
            println!("[{}] why streams ended or were refused during the join storm (count):", r.n);
            for (why, count) in &r.ends {
                println!("  {count:>7}  {why}");
            }
        }
    }
}
