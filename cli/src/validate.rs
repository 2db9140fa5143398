//! `weft validate`: the file's errors (the control plane would reject it) and
//! warnings (valid, but it will not do what it says in this mesh).
//!
//! Which warnings can be known depends on what is known besides the file:
//! - the mesh's trust domain, for policies naming SPIFFE IDs of another one:
//!   `--trust-domain`, else the operator certificate in `--pki` if there is
//!   one, else (with `--live`) the control plane;
//! - which endpoints exist, for route backends with none: with `--live` the
//!   sidecars connected to the control plane, else the file's own `Workload`
//!   documents (the ones `weft up` runs) if it declares any.

use std::path::PathBuf;

use anyhow::Context;
use weft_certs::{pki, TrustDomain};
use weft_config::warnings::{EndpointFacts, MeshFacts};

use crate::human;
use crate::operator::{self, ConnArgs};
use crate::output::outln;

#[derive(clap::Args, Debug)]
pub struct ValidateArgs {
    /// The YAML file, e.g. canary.yaml (`weft example canary > canary.yaml` writes one).
    pub file: PathBuf,
    /// The mesh's trust domain, to warn about policies naming another one
    /// (default: the trust domain of the operator certificate in --pki, if present).
    #[arg(long)]
    pub trust_domain: Option<TrustDomain>,
    /// Also ask the control plane (--control-plane, --pki) which sidecars are
    /// connected, to warn about route backends that have no endpoints now.
    #[arg(long)]
    pub live: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// Reads and validates a config file as `weft validate` and `weft apply`
/// do: (its text, the config); errors name the file and every field.
pub fn load(file: &std::path::Path) -> anyhow::Result<(String, weft_config::MeshConfig)> {
    let path = source_name(file);
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| anyhow::anyhow!("cannot read the config from stdin: {}", io_reason(&e)))?
    } else {
        std::fs::read_to_string(file).map_err(|e| {
            anyhow::anyhow!("cannot read config file {path}: {} (pass the path of an existing file)", io_reason(&e))
        })?
    };
    let cfg = weft_config::parse(&text).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
    Ok((text, cfg))
}

/// How messages name a `-f` source: its path, or `stdin` for `-`.
pub fn source_name(file: &std::path::Path) -> String {
    if file.as_os_str() == "-" {
        "stdin".to_string()
    } else {
        file.display().to_string()
    }
}

/// Whether `cfg` declares nothing a mesh config removes when replaced:
/// no services, routes (HTTP or gRPC), authorization policies, rate
/// limits or workloads.
pub fn declares_nothing(cfg: &weft_config::MeshConfig) -> bool {
    cfg.services.is_empty()
        && cfg.routes.is_empty()
        && cfg.grpc_routes.is_empty()
        && cfg.policies.is_empty()
        && cfg.rate_limits.is_empty()
        && cfg.workloads.is_empty()
}

/// The warnings `weft apply` prints before storing `cfg`: those knowable
/// from the file and `--pki`, and that an empty file removes everything.
pub fn apply_warnings(cfg: &weft_config::MeshConfig, conn: &ConnArgs) -> Vec<String> {
    let facts = MeshFacts { trust_domain: pki_trust_domain(conn), endpoints: MeshFacts::declared_workloads(cfg) };
    let mut out: Vec<String> = weft_config::warnings::warnings(cfg, &facts).iter().map(ToString::to_string).collect();
    if declares_nothing(cfg) {
        out.push(
            "the file declares no services, routes, authorization policies or rate limits: applying it removes \
             every one the mesh has"
                .into(),
        );
    }
    out
}

pub async fn run(args: ValidateArgs) -> anyhow::Result<()> {
    let path = args.file.display();
    let (_, cfg) = load(&args.file)?;
    outln!(
        "{path}: valid ({}, {}, {}, {})",
        human::count(cfg.services.len(), "service", "services"),
        human::count(cfg.routes.len(), "route", "routes"),
        human::count(cfg.policies.len(), "authorization policy", "authorization policies"),
        human::count(cfg.rate_limits.len(), "rate limit", "rate limits")
    )?;
    let mut facts = MeshFacts {
        trust_domain: args.trust_domain.as_ref().map(ToString::to_string).or_else(|| pki_trust_domain(&args.conn)),
        endpoints: MeshFacts::declared_workloads(&cfg),
    };
    if args.live {
        let mut c = operator::client(&args.conn).await?;
        let s = operator::fetch_status(&mut c, &args.conn).await.context("--live")?;
        facts.trust_domain.get_or_insert(s.trust_domain.clone());
        facts.endpoints = Some(endpoints_of(&s.sidecars));
    }
    for w in weft_config::warnings::warnings(&cfg, &facts) {
        outln!("warning: {w}")?;
    }
    Ok(())
}

/// The trust domain of the operator certificate in `--pki`, if one is there.
fn pki_trust_domain(conn: &ConnArgs) -> Option<String> {
    let op = pki::load_svid(&conn.pki.join(pki::OPERATOR_CERT), &conn.pki.join(pki::OPERATOR_KEY)).ok()?;
    Some(op.spiffe_id.trust_domain().to_string())
}

/// An I/O error's reason without Rust's " (os error N)" suffix.
pub fn io_reason(e: &std::io::Error) -> String {
    weft_control_plane::config_file::io_reason(e)
}

/// The endpoints a set of sidecars stands for, as warnings need them.
pub fn endpoints_of(sidecars: &[weft_proto::admin::v1::SidecarStatus]) -> Vec<EndpointFacts> {
    sidecars
        .iter()
        .map(|p| EndpointFacts {
            service: p.service.clone(),
            labels: p.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            address: p.inbound_address.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()),
        })
        .collect()
}
