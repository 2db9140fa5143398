//! `weft up`: a whole local mesh from one file. A control plane with fresh
//! PKI, and for every Workload a real `weft-proxy` beside a demo app, all on
//! loopback in a temporary directory; a load generator; and a live table.
//! Editing the file while it runs changes the mesh (the control plane watches
//! it). Ctrl-C stops every process and removes the directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use weft_certs::{pki, SpiffeId, TrustDomain};
use weft_runtime::process::{self, Process};

use crate::operator::{self, ConnArgs};
use crate::top::{self, Target};

/// The example shown by `weft up` with no file.
pub const EMBEDDED_EXAMPLE: &str = include_str!("../../examples/canary.yaml");

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Mesh file (Services, HTTPRoutes, AuthorizationPolicies, Workloads). Default: the embedded canary example.
    pub file: Option<PathBuf>,
    /// Trust domain of the mesh.
    #[arg(long, default_value = "example.org")]
    pub trust_domain: TrustDomain,
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Keep the state directory (logs, PKI) instead of removing it.
    #[arg(long)]
    pub keep: bool,
    /// Print the table without clearing the screen (for logs and pipes).
    #[arg(long)]
    pub no_clear: bool,
}

/// The mesh's child processes, each logging to `<logs>/<name>.log`.
struct Procs {
    children: Vec<Process>,
    logs: PathBuf,
}

impl Procs {
    fn spawn(&mut self, name: &str, program: &Path, args: &[String]) -> anyhow::Result<&mut Process> {
        let mut cmd = std::process::Command::new(program);
        cmd.args(args);
        self.children.push(Process::spawn(name, cmd, self.logs.join(format!("{name}.log")))?);
        Ok(self.children.last_mut().expect("just pushed"))
    }

    /// Resolves with the name and log of the first child to exit.
    async fn first_exit(&mut self) -> (String, PathBuf) {
        loop {
            let exited =
                self.children.iter_mut().find_map(|p| (!p.running()).then(|| (p.name().into(), p.log_path().into())));
            if let Some(exited) = exited {
                return exited;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// How long a process may take to answer /ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

struct Workload {
    /// Index of its sidecar in the mesh's processes.
    proxy: usize,
    sidecar_id: SpiffeId,
    admin: SocketAddr,
    app: SocketAddr,
    load: f64,
}

/// The mesh's files and addresses, shared by the start-up steps.
struct Mesh {
    root: PathBuf,
    pki_dir: PathBuf,
    config_path: PathBuf,
    logs: PathBuf,
    td: TrustDomain,
    /// Ports already handed out, so no address is used twice.
    given: std::collections::HashSet<u16>,
}

impl Mesh {
    /// A loopback address outside the ephemeral range, never the same twice.
    fn free_addr(&mut self) -> anyhow::Result<SocketAddr> {
        let given = &mut self.given;
        Ok(weft_runtime::ports::pick_loopback_addr(|p| given.insert(p))?)
    }
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = tempfile::Builder::new().prefix("weft-up-").tempdir()?;
    let (mut mesh, cfg) = prepare(&args, dir.path())?;
    let mut procs = Procs { children: Vec::new(), logs: mesh.logs.clone() };
    let result = async {
        let (_, conn) = start_control_plane(&mut mesh, &mut procs).await?;
        let workloads = start_workloads(&mut mesh, &mut procs, &cfg, &conn).await?;
        watch(&args, &mesh, &mut procs, &workloads, &conn, started).await
    }
    .await;
    println!("\nstopping {} processes…", procs.children.len());
    process::stop_all(&mut procs.children, Duration::from_secs(5)).await;
    if args.keep || result.is_err() {
        let kept = dir.keep();
        println!("state and logs kept in {}", kept.display());
    }
    result
}

/// Reads the mesh file (or writes the embedded example), validates it and
/// makes a fresh PKI and the logs directory under `root`.
fn prepare(args: &UpArgs, root: &Path) -> anyhow::Result<(Mesh, weft_config::MeshConfig)> {
    let (config_path, text) = match &args.file {
        Some(f) => (std::fs::canonicalize(f).with_context(|| format!("{}", f.display()))?, std::fs::read_to_string(f)?),
        None => {
            let p = root.join("mesh.yaml");
            std::fs::write(&p, EMBEDDED_EXAMPLE)?;
            (p, EMBEDDED_EXAMPLE.to_string())
        }
    };
    let cfg = weft_config::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", config_path.display()))?;
    anyhow::ensure!(!cfg.workloads.is_empty(), "{}: no Workload documents, so nothing to run", config_path.display());
    let td = args.trust_domain.clone();
    let pki_dir = root.join("pki");
    pki::init(&td, &pki_dir, None, false)?;
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs)?;
    let mesh = Mesh { root: root.to_path_buf(), pki_dir, config_path, logs, td, given: Default::default() };
    Ok((mesh, cfg))
}

fn arg(v: &dyn std::fmt::Display) -> String {
    v.to_string()
}

/// Starts the control plane (watching the mesh file) and waits until it is ready.
async fn start_control_plane(mesh: &mut Mesh, procs: &mut Procs) -> anyhow::Result<(SocketAddr, ConnArgs)> {
    let (cp_addr, cp_admin) = (mesh.free_addr()?, mesh.free_addr()?);
    let cp = procs.spawn(
        "control-plane",
        &std::env::current_exe()?,
        &[
            "control-plane".into(),
            "--pki".into(),
            arg(&mesh.pki_dir.display()),
            "--state-dir".into(),
            arg(&mesh.root.join("cp-state").display()),
            "--listen".into(),
            arg(&cp_addr),
            "--admin".into(),
            arg(&cp_admin),
            "--config".into(),
            arg(&mesh.config_path.display()),
        ],
    )?;
    cp.wait_ready(cp_admin, READY_TIMEOUT).await?;
    Ok((cp_addr, ConnArgs { control_plane: cp_addr.to_string(), pki: mesh.pki_dir.clone() }))
}

/// Starts a demo app and its sidecar (with a fresh join token) per Workload
/// replica, and waits until every sidecar is ready.
async fn start_workloads(
    mesh: &mut Mesh,
    procs: &mut Procs,
    cfg: &weft_config::MeshConfig,
    conn: &ConnArgs,
) -> anyhow::Result<Vec<Workload>> {
    let mut workloads = Vec::new();
    for w in &cfg.workloads {
        for replica in 0..w.spec.replicas {
            let name = if w.spec.replicas > 1 { format!("{}-{replica}", w.name) } else { w.name.clone() };
            let id = mesh.td.workload_id("default", &w.spec.service)?;
            let token = operator::create_token(conn, &id, Duration::from_secs(300)).await?;
            let token_file = mesh.root.join(format!("{name}.token"));
            std::fs::write(&token_file, &token.token)?;
            let (app, inbound, outbound, admin) =
                (mesh.free_addr()?, mesh.free_addr()?, mesh.free_addr()?, mesh.free_addr()?);
            let version = w.spec.labels.get("version").cloned().unwrap_or_default();
            let mut app_args =
                vec!["demo-app".into(), "--service".into(), w.spec.service.clone(), "--version".into(), version];
            app_args.extend(["--listen".into(), arg(&app), "--via".into(), arg(&outbound)]);
            for c in &w.spec.calls {
                app_args.extend(["--call".into(), c.clone()]);
            }
            procs.spawn(&format!("{name}-app"), &std::env::current_exe()?, &app_args)?;
            let mut proxy_args = vec![
                "proxy".into(),
                "--control-plane".into(),
                conn.control_plane.clone(),
                "--trust-bundle".into(),
                arg(&mesh.pki_dir.join(pki::TRUST_BUNDLE).display()),
                "--token-file".into(),
                arg(&token_file.display()),
                "--state-dir".into(),
                arg(&mesh.root.join(format!("{name}-state")).display()),
                "--service".into(),
                w.spec.service.clone(),
            ];
            for (flag, addr) in [("--app", app), ("--inbound", inbound), ("--outbound", outbound), ("--admin", admin)] {
                proxy_args.extend([flag.into(), arg(&addr)]);
            }
            for (k, v) in &w.spec.labels {
                proxy_args.extend(["--label".into(), format!("{k}={v}")]);
            }
            procs.spawn(&format!("{name}-proxy"), &std::env::current_exe()?, &proxy_args)?;
            let load = w.spec.load / f64::from(w.spec.replicas);
            workloads.push(Workload { sidecar_id: id, admin, app, load, proxy: procs.children.len() - 1 });
        }
    }
    for w in &workloads {
        procs.children[w.proxy].wait_ready(w.admin, READY_TIMEOUT).await?;
    }
    Ok(workloads)
}

/// Runs the load and the live table until Ctrl-C, SIGTERM, `--duration`,
/// or a process of the mesh exiting (an error naming its log).
async fn watch(
    args: &UpArgs,
    mesh: &Mesh,
    procs: &mut Procs,
    workloads: &[Workload],
    conn: &ConnArgs,
    started: Instant,
) -> anyhow::Result<()> {
    let cp_addr = conn.control_plane.clone();
    let rejected = Arc::new(std::sync::Mutex::new(String::new()));
    let rejection_watch = tokio::spawn(watch_rejections(conn.clone(), rejected.clone()));
    let served = Arc::new(AtomicUsize::new(0));
    let load_tasks: Vec<_> =
        workloads.iter().filter(|w| w.load > 0.0).map(|w| tokio::spawn(load(w.app, w.load, served.clone()))).collect();
    // Wait for the first answered request, to report start-up time honestly.
    let first_deadline = Instant::now() + Duration::from_secs(10);
    while served.load(Ordering::Relaxed) == 0 && Instant::now() < first_deadline && !load_tasks.is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let startup = started.elapsed();
    let targets: Vec<Target> =
        workloads.iter().map(|w| Target { spiffe_id: w.sidecar_id.to_string(), admin: w.admin }).collect();
    let header = {
        let (cfg_path, logs, n) =
            (mesh.config_path.display().to_string(), mesh.logs.display().to_string(), targets.len());
        move || {
            let mut h = format!(
                "weft up: control plane {cp_addr}, {n} sidecars; first request served {:.1}s after start\n\
                 config {cfg_path} (edit it: changes apply within seconds)\nlogs {logs}    Ctrl-C to stop\n\n",
                startup.as_secs_f64()
            );
            h.push_str(&rejection_banner(&rejected.lock().unwrap_or_else(|e| e.into_inner())));
            h
        }
    };
    let table = top::run(move || targets.clone(), header, Duration::from_secs(1), None, !args.no_clear);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let crashed = tokio::select! {
        _ = table => None,
        _ = tokio::signal::ctrl_c() => None,
        _ = term.recv() => None,
        _ = async { match args.duration { Some(d) => tokio::time::sleep(d).await, None => std::future::pending().await } } => None,
        exited = procs.first_exit() => Some(exited),
    };
    for t in load_tasks {
        t.abort();
    }
    rejection_watch.abort();
    // A mesh with a process missing would show a table that quietly lies.
    if let Some((name, log)) = crashed {
        anyhow::bail!("{name} exited unexpectedly; see {}", log.display());
    }
    Ok(())
}

/// Asks the control plane every second why it rejected the last edit of the
/// mesh file (empty once a valid edit is applied) and keeps the answer in `into`.
async fn watch_rejections(conn: ConnArgs, into: Arc<std::sync::Mutex<String>>) {
    let Ok(mut client) = operator::client(&conn).await else { return };
    loop {
        if let Ok(s) = operator::fetch_status(&mut client, &conn).await {
            *into.lock().unwrap_or_else(|e| e.into_inner()) = s.config_error;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The lines above the table while the last edit of the mesh file is rejected
/// (`error` is the control plane's reason, one problem per line), else nothing.
fn rejection_banner(error: &str) -> String {
    if error.is_empty() {
        return String::new();
    }
    format!("EDIT REJECTED, the mesh keeps running the last good config until the file is fixed:\n{error}\n\n")
}

/// Sends GETs to `app` at `rps`, forever.
async fn load(app: SocketAddr, rps: f64, served: Arc<AtomicUsize>) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rps.max(0.1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let client = client.clone();
        let served = served.clone();
        tokio::spawn(async move {
            let req = http::Request::get(format!("http://{app}/"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .expect("valid request");
            if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
                use http_body_util::BodyExt;
                let _ = resp.into_body().collect().await;
                served.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
}
