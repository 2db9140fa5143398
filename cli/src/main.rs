//! `weft`: the operator's command line.

mod dashboard;
mod demo;
mod human;
mod init_iptables;
mod inject;
mod install;
mod operator;
mod output;
mod top;
mod up;
mod validate;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use weft_certs::{pki, SpiffeId, TrustDomain};

use crate::output::{out, outln};

#[derive(Parser, Debug)]
#[command(name = "weft", version, about = "weft service mesh: operator commands")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    // `up` first: it is the command a newcomer runs.
    /// Run a local mesh from a file (default: the embedded canary example) with a live traffic table.
    Up(up::UpArgs),
    /// Trust anchor, issuer and operator certificates.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// One-time join tokens for workloads.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Print an example mesh config built into weft, e.g. `weft example canary > canary.yaml`.
    Example {
        /// Which example (`canary`: a frontend, a backend split 90/10 between v1 and v2, an authorization policy).
        #[arg(default_value = "canary", value_parser = ["canary"])]
        name: String,
    },
    /// Check a mesh config file offline; prints every error with document, field and reason.
    Validate(validate::ValidateArgs),
    /// Add the weft sidecar to Kubernetes manifests (Deployment, StatefulSet, DaemonSet, Job, CronJob, Pod, List).
    Inject(inject::InjectArgs),
    /// Redirect this network namespace's TCP through the sidecar (run as root in the pod's init step).
    InitIptables(init_iptables::InitIptablesArgs),
    /// Print the manifests that run weft in a Kubernetes cluster (CRDs, control plane, RBAC, sidecar injector).
    Install(install::InstallArgs),
    /// The sidecar (same flags as weft-proxy); used by `weft up`.
    #[command(hide = true)]
    Proxy(weft_proxy::command::Args),
    /// The control plane (same flags as weft-control-plane); used by `weft up`.
    #[command(hide = true)]
    ControlPlane(weft_control_plane::command::Args),
    /// A small HTTP demo service (answers with its name and version; can fail or slow down).
    DemoApp(demo::DemoArgs),
    /// Live per-route traffic of every connected sidecar (like the `weft up` table).
    Top {
        #[command(flatten)]
        conn: operator::ConnArgs,
        /// Time between refreshes, e.g. 1s, 500ms.
        #[arg(long, default_value = "1s", value_parser = humantime_duration)]
        interval: Duration,
        /// Stop after this many tables (default: until Ctrl-C).
        #[arg(long)]
        iterations: Option<u64>,
        /// Print tables one after another instead of redrawing.
        #[arg(long)]
        no_clear: bool,
    },
    /// Live web dashboard: service graph, per-route traffic, canary splits, refusals, sidecar health.
    Dashboard(dashboard::DashboardArgs),
    /// The config a sidecar has applied, as YAML. SIDECAR is a SPIFFE ID, service name or inbound address.
    ProxyConfig {
        #[command(flatten)]
        conn: operator::ConnArgs,
        /// The sidecar: its SPIFFE ID, service name or inbound address (as `weft status` lists them).
        sidecar: String,
    },
    /// Store a mesh config for every control-plane replica to serve (--store etcd://...).
    /// Checked first exactly like `weft validate`; an invalid file changes nothing.
    Apply {
        #[command(flatten)]
        conn: operator::ConnArgs,
        /// The YAML file, e.g. examples/canary.yaml; `-` reads it from stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Apply only if the stored config is still at this revision (from `weft get config`).
        #[arg(long)]
        if_revision: Option<i64>,
        /// Apply a config that declares nothing (no services, routes,
        /// policies or rate limits), removing everything the mesh has;
        /// refused without this flag.
        #[arg(long)]
        allow_empty: bool,
    },
    /// Read what the control plane stores.
    Get {
        #[command(subcommand)]
        cmd: GetCmd,
    },
    /// The control plane's view: connected sidecars, versions, SVID expiry.
    Status {
        #[command(flatten)]
        conn: operator::ConnArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum CertsCmd {
    /// Write a new PKI directory: trust anchor (10y), issuer (1y), operator certificate.
    Init {
        /// The trust domain every SPIFFE ID of the mesh is in, e.g. example.org (lower case).
        #[arg(long)]
        trust_domain: TrustDomain,
        /// Directory to write the PKI files to (created if missing).
        #[arg(long, default_value = "./pki")]
        out: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
        /// Bring an issuer (PEM certificate) from your own PKI instead of making one;
        /// needs --issuer-key and --trust-bundle.
        #[arg(long, requires_all = ["issuer_key", "trust_bundle"])]
        from_issuer: Option<PathBuf>,
        /// PEM PKCS#8 key of --from-issuer.
        #[arg(long, requires = "from_issuer")]
        issuer_key: Option<PathBuf>,
        /// PEM trust anchors that --from-issuer chains to.
        #[arg(long, requires = "from_issuer")]
        trust_bundle: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum GetCmd {
    /// The stored mesh config (YAML) and its revision, as `weft apply` wrote it.
    Config {
        #[command(flatten)]
        conn: operator::ConnArgs,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Create a join token bound to a SPIFFE ID; prints the token on stdout.
    Create {
        #[command(flatten)]
        conn: operator::ConnArgs,
        /// e.g. spiffe://example.org/ns/default/sa/web
        #[arg(long)]
        spiffe_id: String,
        /// Token lifetime, e.g. 10m, 1h.
        #[arg(long, default_value = "10m", value_parser = humantime_duration)]
        ttl: Duration,
    },
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 10m, 1h)"))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // `weft up` runs the daemons as child processes of this binary, so a
    // newcomer needs only `cargo run --bin weft -- up`. The sidecar builds
    // the runtime its `--worker-threads` asks for; everything else runs on
    // tokio's multi-thread runtime, as `#[tokio::main]` would.
    let cli = match cli.cmd {
        Cmd::Proxy(args) => return weft_proxy::command::main(args),
        cmd => Cli { cmd },
    };
    match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(async_main(cli)),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn async_main(cli: Cli) -> std::process::ExitCode {
    if let Cmd::ControlPlane(args) = cli.cmd {
        weft_runtime::init_logging(&args.log_format);
        return weft_runtime::exit_code(weft_control_plane::command::run(args).await);
    }
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The reader of stdout has gone (`weft top | head`): nothing to say, and no one to say it to.
        Err(e) if output::is_broken_pipe(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A plain HTTP/1.1 GET; (status, body), or None when it could not be made.
pub(crate) async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use http_body_util::BodyExt;
    let tcp = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await.ok()?.ok()?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.ok()?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", addr.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(3), send.send_request(req)).await.ok()?.ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.cmd {
        Cmd::Proxy(_) | Cmd::ControlPlane(_) => unreachable!("handled in main"),
        Cmd::Certs { cmd: CertsCmd::Init { trust_domain, out, force, from_issuer, issuer_key, trust_bundle } } => {
            let ext = from_issuer.map(|cert| pki::ExternalIssuer {
                cert,
                key: issuer_key.expect("clap requires --issuer-key"),
                bundle: trust_bundle.expect("clap requires --trust-bundle"),
            });
            let files = pki::init(&trust_domain, &out, ext.as_ref(), force)?;
            for f in files {
                outln!("wrote {}", f.display())?;
            }
            outln!("operator identity: {}", pki::operator_id(&trust_domain))?;
        }
        Cmd::Token { cmd: TokenCmd::Create { conn, spiffe_id, ttl } } => {
            // Validate locally first so the message names the rule broken.
            let id = SpiffeId::parse(&spiffe_id).with_context(|| format!("--spiffe-id {spiffe_id:?}"))?;
            let conn = conn.reach().await?;
            let resp = operator::create_token(&conn, &id, ttl).await?;
            eprintln!(
                "token for {id}, expires {} ({})",
                human::rfc3339(resp.expires_at),
                human::relative(resp.expires_at, human::now_unix())
            );
            outln!("{}", resp.token)?;
        }
        Cmd::Status { conn, json } => operator::status(&conn.reach().await?, json).await?,
        Cmd::Apply { conn, file, if_revision, allow_empty } => {
            // The same check, messages and warnings as `weft validate`, before anything is sent.
            let (yaml, cfg) = validate::load(&file)?;
            let name = validate::source_name(&file);
            let conn = conn.reach().await?;
            if validate::declares_nothing(&cfg) && !allow_empty {
                anyhow::bail!("{}", operator::empty_apply_refusal(&conn, &name).await);
            }
            for w in validate::apply_warnings(&cfg, &conn) {
                eprintln!("warning: {w}");
            }
            match operator::apply_config(&conn, yaml, if_revision.unwrap_or(0)).await? {
                (revision, true) => outln!("{name}: unchanged (revision {revision})")?,
                (revision, false) => outln!("{name}: applied, revision {revision}")?,
            }
        }
        Cmd::Get { cmd: GetCmd::Config { conn } } => {
            let conn = conn.reach().await?;
            let c = operator::get_config(&conn).await?;
            if c.revision == 0 {
                anyhow::bail!("no mesh config is stored yet: store one with weft apply -f FILE");
            }
            if c.stale_reason.is_empty() {
                outln!("# revision: {}", c.revision)?;
            } else {
                // Still valid YAML to pipe into weft apply; the warning goes to stderr too.
                eprintln!(
                    "warning: {}; this is the copy control plane {} serves (revision {}), which may be stale",
                    c.stale_reason, conn.control_plane, c.revision
                );
                outln!("# revision: {} (may be stale: the store did not answer)", c.revision)?;
            }
            output::out!("{}", c.yaml)?;
        }
        Cmd::Up(args) => up::run(args).await?,
        Cmd::Inject(args) => inject::run(args)?,
        Cmd::Install(args) => install::run(args)?,
        Cmd::InitIptables(args) => init_iptables::run(args)?,
        Cmd::DemoApp(args) => demo::run(args).await?,
        Cmd::Dashboard(mut args) => {
            args.conn = args.conn.reach().await?;
            dashboard::run(args).await?
        }
        Cmd::Top { conn, interval, iterations, no_clear } => {
            let conn = conn.reach().await?;
            let targets = operator::sidecar_targets(&conn).await?;
            anyhow::ensure!(!targets.is_empty(), "no sidecars are connected to {}", conn.control_plane);
            let (n, cp) = (targets.len(), conn.control_plane.clone());
            let header = move || format!("weft top: {n} sidecars via control plane {cp}\n\n");
            top::run(move || targets.clone(), header, interval, iterations, !no_clear).await?;
        }
        Cmd::ProxyConfig { conn, sidecar } => operator::proxy_config(&conn.reach().await?, &sidecar).await?,
        Cmd::Example { name: _ } => out!("{}", up::EMBEDDED_EXAMPLE)?,
        Cmd::Validate(mut args) => {
            if args.live {
                args.conn = args.conn.reach().await?;
            }
            validate::run(args).await?
        }
    }
    Ok(())
}
