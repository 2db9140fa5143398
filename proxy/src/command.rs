//! The command line of the daemon: its flags and its run loop, shared by the
//! binary and by `weft up`, which runs it as a child process of `weft`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::{outbound::parse_upstream, Options, Proxy};
use clap::Parser;
use weft_certs::TrustDomain;

/// weft sidecar proxy: mutual TLS with SPIFFE identities between services.
#[derive(Parser, Debug)]
#[command(name = "weft-proxy", version)]
pub struct Args {
    /// Control-plane gRPC address (host:port), or several replicas
    /// comma-separated (cp1:7443,cp2:7443); a DNS name may stand for several
    /// addresses. The sidecar moves to another replica when its own goes away.
    #[arg(long, default_value = "127.0.0.1:7443", value_parser = parse_control_plane)]
    control_plane: String,
    /// On a first start (no saved SVID): how long to keep trying when no
    /// control-plane replica answers, with jittered backoff, before exiting
    /// (e.g. 5m; 0s exits at the first failure). A sidecar with a saved
    /// SVID starts serving at once and keeps retrying in the background.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    control_plane_wait: Duration,
    /// The services the app calls, comma-separated or repeated (e.g. --calls
    /// api,db): the sidecar then gets only those (with the backends of their
    /// routes and its own service) instead of the whole mesh. Calls to other
    /// services find no endpoints. `--upstream` names are added.
    #[arg(long, value_delimiter = ',')]
    calls: Vec<String>,
    /// Trust bundle (PEM) to verify the control plane before the first SVID.
    #[arg(long)]
    trust_bundle: PathBuf,
    /// Trust domain; by default read from the bundle's spiffe:// URI SAN.
    #[arg(long)]
    trust_domain: Option<TrustDomain>,
    /// File holding the one-time join token (needed only without a saved SVID).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Where the SVID, its key (0600) and the bundle are kept across restarts.
    #[arg(long)]
    state_dir: PathBuf,
    /// The service this workload belongs to.
    #[arg(long)]
    service: String,
    /// Workload label, k=v (repeatable), e.g. --label version=v2.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// The local app's address.
    #[arg(long)]
    app: SocketAddr,
    /// The local app's protocol: auto (declared by its Service, or learned by probing the app), http1 or h2c.
    #[arg(long, value_enum, default_value = "auto")]
    app_protocol: crate::inbound::AppProtocol,
    /// mTLS listener for peer sidecars.
    #[arg(long, default_value = "127.0.0.1:15006")]
    inbound: SocketAddr,
    /// The inbound address registered in discovery (what peer sidecars dial),
    /// IP or IP:PORT (port default: --inbound's). Default: --inbound itself,
    /// which must then not be a wildcard; with --inbound 0.0.0.0:15006 pass
    /// the pod's IP, e.g. --advertise-address 10.1.0.5.
    #[arg(long, value_parser = parse_advertise)]
    advertise_address: Option<Advertise>,
    /// Plain HTTP listener for the local app's outgoing calls.
    #[arg(long, default_value = "127.0.0.1:15001")]
    outbound: SocketAddr,
    /// Admin HTTP listener (/live, /ready, /metrics, /config).
    #[arg(long, default_value = "127.0.0.1:15020")]
    admin: SocketAddr,
    /// Opaque TCP upstream NAME=ADDR: connections to ADDR reach service NAME (repeatable).
    #[arg(long = "upstream", value_parser = parse_upstream)]
    upstreams: Vec<(String, SocketAddr)>,
    /// How long an intercepted outbound connection's first bytes are awaited
    /// before it is carried as opaque TCP (server-speaks-first protocols wait this long at most).
    /// 1ms to 10s.
    #[arg(long, default_value = "100ms", value_parser = parse_detect_timeout)]
    detect_timeout: Duration,
    /// The UID `weft init-iptables --proxy-uid` exempts from interception:
    /// the sidecar then refuses to start unless it runs as this UID (as any
    /// other, its own connections would be redirected back into it). Pass it
    /// wherever the rules are installed.
    #[arg(long)]
    proxy_uid: Option<u32>,
    /// Timeout for connecting to a peer sidecar.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Serve the SPIFFE Workload API on this Unix socket (mode 0600), e.g.
    /// unix:///run/weft/agent.sock; point the app's SPIFFE_ENDPOINT_SOCKET at it.
    #[arg(long, value_parser = crate::workload_api::parse_socket_addr)]
    workload_api: Option<PathBuf>,
    /// Largest header section of a request or response, in bytes (HTTP/2
    /// counting: name + value + 32 per field), on every hop. A request over it
    /// gets 431 from the sidecar that met it; a response over it, 502.
    #[arg(long, default_value_t = crate::limits::DEFAULT_MAX_HEADER_BYTES, value_parser = parse_header_bytes)]
    max_header_bytes: usize,
    /// How long a client may take to send a request's headers (from the
    /// first byte; for a new connection, from accept) before the connection is closed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    header_read_timeout: Duration,
    /// How long a keep-alive connection (HTTP/1.1 or HTTP/2) may stay open
    /// with no request in flight before the sidecar closes it.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// Connections each listener (inbound, outbound, each upstream) serves at
    /// once; further connections wait in the kernel's backlog until one closes.
    #[arg(long, default_value_t = 10_000, value_parser = parse_max_connections)]
    max_connections: usize,
    /// How long an idle connection to the local app is kept for reuse; keep
    /// it below the app's own keep-alive timeout.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    app_idle_timeout: Duration,
    /// How often a ready sidecar releases the clean pages of its code and
    /// read-only data again (it does once at readiness), so code that ran
    /// once since (a config update, an SVID renewal) leaves its RSS; 0s:
    /// only at readiness.
    #[arg(long, default_value = "30s", value_parser = parse_release_pages_every)]
    release_pages_every: Duration,
    /// How long SIGTERM waits for in-flight requests.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Log format: human or json.
    #[arg(long, default_value = "human", value_parser = ["human", "json"])]
    pub log_format: String,
    /// Threads that run the sidecar's connections, each with its own event
    /// loop: a connection stays on the thread it was handed to, with the
    /// connections it opens to peers and to the app, so a request is never
    /// handed between threads. auto (the default; or 0): one per CPU core the
    /// process may use, as its CPU limit (cgroup quota) and affinity allow;
    /// N: exactly N. 1 to 1024, 0 or auto.
    #[arg(long, env = "WEFT_PROXY_WORKER_THREADS", default_value = "auto", allow_negative_numbers = true, value_parser = parse_worker_threads)]
    pub worker_threads: WorkerThreads,
}

/// `--worker-threads`: how many threads run the sidecar's tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerThreads {
    /// One per CPU core the process may use (`0` or `auto`;
    /// [`std::thread::available_parallelism`], which honours CPU affinity
    /// and cgroup quotas).
    Auto,
    /// Exactly this many, 1..=[`MAX_WORKER_THREADS`].
    Count(usize),
}

/// The name of the runtime's threads (workers and the blocking pool); the
/// main thread keeps the process's name.
pub const THREAD_NAME: &str = "weft-worker";

/// The most `--worker-threads` accepts.
pub const MAX_WORKER_THREADS: usize = 1024;

impl WorkerThreads {
    /// The number of threads this resolves to on this machine (at least 1).
    pub fn resolve(self) -> usize {
        match self {
            Self::Count(n) => n,
            Self::Auto => std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// The tokio runtime the sidecar starts on: always the current-thread
    /// scheduler (worker 0, which also runs the accept loops and the
    /// control-plane streams); [`WorkerThreads::start_workers`] adds the
    /// others. Blocking work (`spawn_blocking`, DNS lookups) goes to tokio's
    /// blocking pool.
    ///
    /// Errors: the I/O driver (epoll) could not be created.
    pub fn runtime(self) -> std::io::Result<tokio::runtime::Runtime> {
        // Named for `top -H` and /proc/PID/task/*/comm (the blocking pool; workers are named at start).
        tokio::runtime::Builder::new_current_thread().thread_name(THREAD_NAME).enable_all().build()
    }

    /// Starts the worker threads beyond the calling runtime's
    /// (`weft_runtime::workers`: thread-per-core, one current-thread runtime
    /// each), named [`THREAD_NAME`]. Call it inside [`WorkerThreads::runtime`].
    pub fn start_workers(self) -> Result<(), weft_runtime::workers::StartError> {
        weft_runtime::workers::start(self.resolve(), THREAD_NAME)
    }
}

/// `--worker-threads`: `0` or `auto` (one per core), or 1..=1024.
fn parse_worker_threads(s: &str) -> Result<WorkerThreads, String> {
    let expected = "expected a number of threads from 1 to 1024, or 0 or auto for one per CPU core";
    if s.eq_ignore_ascii_case("auto") {
        return Ok(WorkerThreads::Auto);
    }
    match s.parse::<usize>() {
        Ok(0) => Ok(WorkerThreads::Auto),
        Ok(n) if n <= MAX_WORKER_THREADS => Ok(WorkerThreads::Count(n)),
        Ok(n) => Err(format!("{n}: too many threads; {expected}")),
        Err(_) => Err(format!("{s:?}: {expected}")),
    }
}

/// `--max-header-bytes`: 1 KiB .. 16 MiB (h2's setting is 32-bit, and hyper's
/// HTTP/1.1 buffer is twice this).
fn parse_header_bytes(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{s:?}: {e}; expected a number of bytes, e.g. 65536"))?;
    if !(1024..=16 * 1024 * 1024).contains(&n) {
        return Err(format!("{n}: must be between 1024 and 16777216 bytes"));
    }
    Ok(n)
}

/// `--detect-timeout`: 1 ms .. 10 s. Zero would call every client opaque
/// before it could speak; longer stalls every server-speaks-first protocol
/// that long on each connection.
fn parse_detect_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}; expected a duration, e.g. 100ms"))?;
    if !(Duration::from_millis(1)..=Duration::from_secs(10)).contains(&d) {
        return Err(format!("{s}: must be between 1ms and 10s (default 100ms)"));
    }
    Ok(d)
}

/// `--release-pages-every`: `0s` (only at readiness), or 1 s to 1 day (each
/// release reads smaps twice: more often would be work for nothing).
fn parse_release_pages_every(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}; expected a duration, e.g. 30s"))?;
    if !d.is_zero() && !(Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(&d) {
        return Err(format!("{s}: must be 0s (only at readiness) or between 1s and 1d (default 30s)"));
    }
    Ok(d)
}

/// `--advertise-address`: an IP, with or without a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advertise {
    pub ip: std::net::IpAddr,
    pub port: Option<u16>,
}

fn parse_advertise(s: &str) -> Result<Advertise, String> {
    let a = if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        Advertise { ip, port: None }
    } else {
        match s.parse::<SocketAddr>() {
            Ok(a) => Advertise { ip: a.ip(), port: Some(a.port()) },
            Err(_) => return Err(format!("{s:?}: expected IP or IP:PORT, e.g. 10.1.0.5 or 10.1.0.5:15006")),
        }
    };
    // What peers dial: a wildcard is where to listen, not an address to reach.
    if a.ip.is_unspecified() {
        return Err(format!(
            "{s:?} is a wildcard: the advertised address must be a specific address peers on other hosts can dial \
             (this host's or pod's IP, e.g. 10.1.0.5)"
        ));
    }
    if a.port == Some(0) {
        return Err(format!("{s:?}: port 0 cannot be dialed; give the inbound port, e.g. 10.1.0.5:15006, or no port"));
    }
    Ok(a)
}

/// `--control-plane`: checked with [`crate::control_plane::ControlPlanes::parse`]
/// (the shared list syntax: no empty entries, no repeats) and kept as given.
fn parse_control_plane(s: &str) -> Result<String, String> {
    crate::control_plane::ControlPlanes::parse(s).map(|_| s.to_string()).map_err(|e| e.to_string())
}

/// `--max-connections`: at least 1.
fn parse_max_connections(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected k=v"))?;
    if k.is_empty() {
        return Err(format!("{s:?}: empty label key"));
    }
    Ok((k.to_string(), v.to_string()))
}

/// The whole daemon, from parsed flags to exit status: logging, the runtime
/// `--worker-threads` asks for (its choice logged), then [`run`] on it.
/// For `weft-proxy` and `weft proxy` (`weft up`); call it outside any tokio
/// runtime (it builds its own).
pub fn main(args: Args) -> std::process::ExitCode {
    weft_runtime::init_logging(&args.log_format);
    let threads = args.worker_threads;
    let runtime = match threads.runtime() {
        Ok(rt) => rt,
        Err(source) => return weft_runtime::exit_code(Err(RunError::Runtime { threads: threads.resolve(), source })),
    };
    weft_runtime::exit_code(runtime.block_on(async move {
        threads.start_workers().map_err(|e| RunError::Workers { threads: threads.resolve(), source: e })?;
        let workers = weft_runtime::workers::count();
        tracing::info!(worker_threads = workers, "runtime: current-thread, {workers} worker thread(s)");
        run(args).await
    }))
}

/// Runs until SIGTERM or Ctrl-C.
pub async fn run(args: Args) -> Result<(), RunError> {
    let drain_timeout = args.drain_timeout;
    let proxy = Proxy::start(Options {
        control_plane: args.control_plane,
        trust_bundle: args.trust_bundle,
        trust_domain: args.trust_domain,
        token_file: args.token_file,
        state_dir: args.state_dir,
        service: args.service,
        labels: args.labels.into_iter().collect::<HashMap<_, _>>(),
        app: args.app,
        app_protocol: args.app_protocol,
        inbound: args.inbound,
        advertise: args.advertise_address.map(|a| (a.ip, a.port)),
        detect_timeout: args.detect_timeout,
        proxy_uid: args.proxy_uid,
        outbound: args.outbound,
        admin: args.admin,
        upstreams: args.upstreams,
        connect_timeout: args.connect_timeout,
        limits: crate::limits::Limits {
            max_header_bytes: args.max_header_bytes,
            header_read_timeout: args.header_read_timeout,
            idle_timeout: args.idle_timeout,
            max_connections: args.max_connections,
            app_idle_timeout: args.app_idle_timeout,
        },
        workload_api: args.workload_api,
        calls: args.calls,
        control_plane_wait: args.control_plane_wait,
        release_pages_every: args.release_pages_every,
    })
    .await?;
    let signal = weft_runtime::shutdown_signal().await.map_err(RunError::Signal)?;
    tracing::info!("{signal}; draining");
    if proxy.shutdown(drain_timeout).await {
        tracing::info!("drained; exiting");
    } else {
        tracing::warn!("drain timeout passed with connections still open; exiting");
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Start(#[from] crate::StartError),
    #[error("cannot install the SIGTERM handler: {0}")]
    Signal(std::io::Error),
    /// The tokio runtime could not be built (threads, epoll).
    #[error("cannot start the runtime with {threads} worker thread(s): {source}; try fewer with --worker-threads")]
    Runtime { threads: usize, source: std::io::Error },
    /// A worker thread or its runtime could not be started.
    #[error("cannot start {threads} worker thread(s): {source}; try fewer with --worker-threads")]
    Workers { threads: usize, source: weft_runtime::workers::StartError },
}

#[cfg(test)]
mod tests {
    use super::WorkerThreads;

    #[test]
    fn release_pages_every_is_zero_or_a_second_to_a_day() {
        use std::time::Duration;
        assert_eq!(super::parse_release_pages_every("0s"), Ok(Duration::ZERO));
        assert_eq!(super::parse_release_pages_every("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(super::parse_release_pages_every("1d"), Ok(Duration::from_secs(86_400)));
        for bad in ["1ns", "500ms", "2d", "300000000000years"] {
            let err = super::parse_release_pages_every(bad).unwrap_err();
            assert!(err.contains("0s (only at readiness) or between 1s and 1d"), "{bad:?}: {err}");
        }
        for bad in ["abc", ""] {
            assert!(super::parse_release_pages_every(bad).unwrap_err().contains("expected a duration"), "{bad:?}");
        }
    }

    #[test]
    fn worker_threads_are_a_count_zero_or_auto() {
        assert_eq!(super::parse_worker_threads("1"), Ok(WorkerThreads::Count(1)));
        assert_eq!(super::parse_worker_threads("4"), Ok(WorkerThreads::Count(4)));
        assert_eq!(super::parse_worker_threads("0"), Ok(WorkerThreads::Auto));
        assert_eq!(super::parse_worker_threads("AUTO"), Ok(WorkerThreads::Auto));
        for bad in ["-1", "two", "", "1.5", "1025"] {
            let err = super::parse_worker_threads(bad).unwrap_err();
            assert!(err.contains("from 1 to 1024, or 0 or auto"), "{bad:?}: {err}");
        }
        assert!(WorkerThreads::Auto.resolve() >= 1);
    }

    #[test]
    fn every_worker_is_a_current_thread_scheduler() {
        let rt = WorkerThreads::Count(3).runtime().unwrap();
        assert_eq!(rt.handle().runtime_flavor(), tokio::runtime::RuntimeFlavor::CurrentThread);
    }

    #[test]
    fn advertise_address_is_an_ip_with_an_optional_port() {
        let a = super::parse_advertise("10.1.0.5").unwrap();
        assert_eq!((a.ip.to_string(), a.port), ("10.1.0.5".into(), None));
        let a = super::parse_advertise("[fd00::5]:15006").unwrap();
        assert_eq!((a.ip.to_string(), a.port), ("fd00::5".into(), Some(15006)));
        assert!(super::parse_advertise("pod.local").unwrap_err().contains("IP or IP:PORT"));
        for wildcard in ["0.0.0.0", "0.0.0.0:15006", "::", "[::]:15006"] {
            let e = super::parse_advertise(wildcard).unwrap_err();
            assert!(e.contains("must be a specific address") && !e.contains("pass --advertise-address"), "{e}");
        }
        assert!(super::parse_advertise("10.1.0.5:0").unwrap_err().contains("port 0"));
    }
}
