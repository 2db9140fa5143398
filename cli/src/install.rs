//! `weft install`: prints the manifests that run weft in a cluster (see
//! [`weft_k8s::install`]); apply them with `kubectl apply -f -`.

use std::path::PathBuf;

use anyhow::Context;
use weft_k8s::install::{InstallOptions, PkiFiles};

use crate::inject::InjectFlags;

/// A config with only the defaults, for a control plane installed without `--config`.
const EMPTY_CONFIG: &str = "apiVersion: weft.dev/v1alpha1\nkind: Mesh\nmetadata: {name: mesh}\nspec: {}\n";

#[derive(clap::Args, Debug)]
pub struct InstallArgs {
    /// The control plane's namespace.
    #[arg(long, default_value = "weft-system")]
    pub namespace: String,
    /// A namespace to mesh: it gets the trust bundle and the label that turns injection on (repeatable).
    #[arg(long = "mesh-namespace")]
    pub mesh_namespaces: Vec<String>,
    /// PKI directory from `weft certs init`, shipped as the Secret weft-pki
    /// (without it, create that Secret yourself).
    #[arg(long)]
    pub pki: Option<PathBuf>,
    /// Mesh config for the control plane (checked like `weft validate`); default: an empty Mesh.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The issuer (`iss`) of the cluster's service-account tokens.
    #[arg(long, default_value = "https://kubernetes.default.svc.cluster.local")]
    pub sa_issuer: String,
    /// The issuer's OIDC discovery document, as the control plane reaches it.
    #[arg(long, default_value = "https://kubernetes.default.svc/.well-known/openid-configuration")]
    pub sa_discovery_url: String,
    /// The control plane's store: `file` (one replica; its state lives in an
    /// emptyDir and is lost when the pod goes) or `etcd://host:port[,host:port...]`
    /// (join tokens, registrations and the mesh config shared by every replica).
    #[arg(long, default_value = "file")]
    pub store: weft_control_plane::store::url::StoreUrl,
    /// Control-plane replicas; more than 1 needs `--store etcd://...`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub replicas: u32,
    #[command(flatten)]
    pub flags: InjectFlags,
}

pub fn run(mut args: InstallArgs) -> anyhow::Result<()> {
    if args.replicas > 1 && args.store == weft_control_plane::store::url::StoreUrl::File {
        anyhow::bail!(
            "--replicas {} needs --store etcd://host:port: the file store belongs to one control plane \
             (replicas would each issue tokens and hold registrations the others never see)",
            args.replicas
        );
    }
    let config = match &args.config {
        Some(path) => {
            weft_config::load(path).map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))?;
            std::fs::read_to_string(path).with_context(|| path.display().to_string())?
        }
        None => EMPTY_CONFIG.to_string(),
    };
    let pki = match &args.pki {
        Some(dir) => {
            let read = |f: &str| {
                std::fs::read_to_string(dir.join(f)).with_context(|| format!("--pki {}", dir.join(f).display()))
            };
            Some(PkiFiles {
                trust_bundle: read(weft_certs::pki::TRUST_BUNDLE)?,
                issuer_cert: read(weft_certs::pki::ISSUER_CERT)?,
                issuer_key: read(weft_certs::pki::ISSUER_KEY)?,
            })
        }
        None => None,
    };
    // Sidecars reach the control plane through its Service in --namespace.
    if args.flags.control_plane_address == weft_k8s::InjectOptions::default().control_plane {
        args.flags.control_plane_address = format!("weft-control-plane.{}.svc:7443", args.namespace);
    }
    let service = format!("weft-control-plane.{}.svc", args.namespace);
    let webhook_tls = weft_k8s::tls::webhook_tls(&[service.clone(), format!("{service}.cluster.local")])
        .context("making the injector's TLS certificate")?;
    let opts = InstallOptions {
        namespace: args.namespace,
        mesh_namespaces: args.mesh_namespaces,
        pki,
        config,
        sa_issuer: args.sa_issuer,
        sa_discovery_url: args.sa_discovery_url,
        inject: args.flags.options(),
        webhook_tls,
        store: args.store.to_string(),
        replicas: args.replicas,
    };
    let docs: Vec<serde_norway::Value> = weft_k8s::install::manifests(&opts)
        .into_iter()
        .map(|d| serde_norway::to_value(d).expect("JSON converts to YAML"))
        .collect();
    print!("{}", weft_k8s::manifests::write(&docs));
    Ok(())
}
