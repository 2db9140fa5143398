//! `weft`: the operator's command line.

mod operator;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use weft_certs::{pki, SpiffeId, TrustDomain};

#[derive(Parser, Debug)]
#[command(name = "weft", version, about = "weft service mesh: operator commands")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
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
    /// Check a mesh config file offline; prints every error with document, field and reason.
    Validate {
        /// The YAML file, e.g. examples/canary.yaml.
        file: PathBuf,
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
        #[arg(long)]
        trust_domain: TrustDomain,
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

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Certs { cmd: CertsCmd::Init { trust_domain, out, force, from_issuer, issuer_key, trust_bundle } } => {
            let ext = from_issuer.map(|cert| pki::ExternalIssuer {
                cert,
                key: issuer_key.expect("clap requires --issuer-key"),
                bundle: trust_bundle.expect("clap requires --trust-bundle"),
            });
            let files = pki::init(&trust_domain, &out, ext.as_ref(), force)?;
            for f in files {
                println!("wrote {}", f.display());
            }
            println!("operator identity: {}", pki::operator_id(&trust_domain));
        }
        Cmd::Token { cmd: TokenCmd::Create { conn, spiffe_id, ttl } } => {
            // Validate locally first so the message names the rule broken.
            let id = SpiffeId::parse(&spiffe_id).with_context(|| format!("--spiffe-id {spiffe_id:?}"))?;
            let resp = operator::create_token(&conn, &id, ttl).await?;
            eprintln!("token for {id}, expires at {} (unix)", resp.expires_at);
            println!("{}", resp.token);
        }
        Cmd::Status { conn, json } => operator::status(&conn, json).await?,
        Cmd::Validate { file } => {
            let cfg = weft_config::load(&file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            println!(
                "{}: valid ({} services, {} routes, {} authorization policies, {} rate limits)",
                file.display(),
                cfg.services.len(),
                cfg.routes.len(),
                cfg.policies.len(),
                cfg.rate_limits.len()
            );
        }
    }
    Ok(())
}
