//! Calls to the control plane as the operator identity (mTLS with operator.crt).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::human;
use crate::output::{out, outln};
use anyhow::Context;
use weft_certs::{pki, verify, IdMatcher, SpiffeId, SpiffeVerifier, SvidResolver, TrustBundle};
use weft_proto::admin::v1::admin_client::AdminClient;
use weft_proto::admin::v1::{
    ApplyConfigRequest, CreateJoinTokenRequest, CreateJoinTokenResponse, GetConfigRequest, GetConfigResponse,
    SidecarStatus, StatusRequest, StatusResponse,
};

#[derive(clap::Args, Debug, Clone)]
pub struct ConnArgs {
    /// Control-plane gRPC address (host:port), or several replicas
    /// comma-separated (cp1:7443,cp2:7443), tried in order: the first that
    /// accepts a connection is asked.
    #[arg(long, env = "WEFT_CONTROL_PLANE", default_value = "127.0.0.1:7443", value_parser = parse_control_plane)]
    pub control_plane: String,
    /// PKI directory holding operator.crt, operator.key and trust-bundle.pem.
    #[arg(long, env = "WEFT_PKI", default_value = "./pki")]
    pub pki: PathBuf,
}

/// `--control-plane`: the sidecars' list syntax and checks
/// ([`weft_proxy::control_plane::ControlPlanes::parse`]: no empty entries,
/// no repeats, each host:port), kept as given.
fn parse_control_plane(s: &str) -> Result<String, String> {
    weft_proxy::control_plane::ControlPlanes::parse(s).map(|_| s.to_string()).map_err(|e| e.to_string())
}

/// How long the TCP connect and TLS handshake with each listed replica may
/// take before the next is tried.
const REPLICA_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl ConnArgs {
    /// These arguments naming one replica: with a single `--control-plane`
    /// entry, that one (its errors come from the call itself); with several,
    /// the first in order that completes a mutual-TLS handshake as the
    /// operator and proves the control plane's SPIFFE ID, moving on from one
    /// that refuses, does not answer within 5 s (a frozen process whose
    /// kernel still accepts TCP), or is not a control plane's gRPC port.
    ///
    /// # Errors
    /// An unusable `--control-plane` value, or every replica unreachable
    /// (each named with why).
    pub async fn reach(&self) -> anyhow::Result<ConnArgs> {
        let cps = weft_proxy::control_plane::ControlPlanes::parse(&self.control_plane)?;
        let entries = cps.entries();
        if entries.len() == 1 {
            return Ok(ConnArgs { control_plane: entries[0].clone(), pki: self.pki.clone() });
        }
        let connector = tokio_rustls::TlsConnector::from(Arc::new(operator_tls(self)?));
        let mut failures = Vec::new();
        for entry in entries {
            let handshake = async {
                let tcp = tokio::net::TcpStream::connect(entry.as_str()).await?;
                connector.connect(weft_certs::tls::server_name(), tcp).await
            };
            match tokio::time::timeout(REPLICA_CONNECT_TIMEOUT, handshake).await {
                Ok(Ok(_)) => return Ok(ConnArgs { control_plane: entry.clone(), pki: self.pki.clone() }),
                Ok(Err(e)) => failures.push(format!("{entry}: {e}")),
                Err(_) => failures.push(format!(
                    "{entry}: no TLS handshake within {}s (frozen, overloaded, or not a control plane's gRPC port)",
                    REPLICA_CONNECT_TIMEOUT.as_secs()
                )),
            }
            tracing::debug!(control_plane = %entry, "control-plane replica unreachable; trying the next");
        }
        anyhow::bail!(
            "no control-plane replica of --control-plane {} is reachable ({}); check that they run and listen there",
            self.control_plane,
            failures.join("; ")
        )
    }
}

/// The files the operator commands read from `--pki`, and what each one is.
const PKI_FILES: [(&str, &str); 3] = [
    (pki::OPERATOR_CERT, "the operator certificate"),
    (pki::OPERATOR_KEY, "the operator key"),
    (pki::TRUST_BUNDLE, "the trust bundle"),
];

/// Names the first missing PKI file and how to point at the right directory
/// (running from another directory than the one holding `pki/` is the usual cause).
fn check_pki_dir(dir: &Path) -> anyhow::Result<()> {
    for (file, what) in PKI_FILES {
        let path = dir.join(file);
        if !path.exists() {
            anyhow::bail!(
                "{what} {} does not exist: pass --pki DIR (or set WEFT_PKI=DIR) naming the directory \
                 `weft certs init` wrote, which holds {}, {} and {}",
                path.display(),
                pki::OPERATOR_CERT,
                pki::OPERATOR_KEY,
                pki::TRUST_BUNDLE
            );
        }
    }
    Ok(())
}

/// Checks the operator certificate before using it: the control plane would
/// refuse an expired one or one from another PKI with a TLS alert that the
/// client often sees only as a closed connection, so say it here, by file.
fn check_operator_cert(conn: &ConnArgs, op: &weft_certs::Svid, bundle: &TrustBundle) -> anyhow::Result<()> {
    use rustls::server::danger::ClientCertVerifier;
    let cert = conn.pki.join(pki::OPERATOR_CERT);
    let now = std::time::SystemTime::now();
    if op.not_after < now {
        let at = weft_certs::svid::unix_secs(op.not_after);
        anyhow::bail!(
            "the operator certificate {} has expired ({}, {}): the control plane refuses it; use a --pki directory \
             with a current operator certificate",
            cert.display(),
            human::rfc3339(at),
            human::relative(at, human::now_unix())
        );
    }
    let verifier = SpiffeVerifier::new(verify::shared_bundle(bundle.clone()), IdMatcher::Exact(op.spiffe_id.clone()));
    let (leaf, intermediates) = op.chain.split_first().context("the operator certificate file holds no certificate")?;
    if verifier.verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now()).is_err() {
        anyhow::bail!(
            "the operator certificate {} is not signed by {} (files from two different `weft certs init` runs?): \
             the control plane refuses it; pass --pki naming the one directory `weft certs init` wrote for this mesh",
            cert.display(),
            conn.pki.join(pki::TRUST_BUNDLE).display()
        );
    }
    Ok(())
}

/// The operator's mutual-TLS client config from `--pki` (checked first:
/// files present, certificate current and of this PKI), accepting only the
/// control plane's SPIFFE ID.
fn operator_tls(conn: &ConnArgs) -> anyhow::Result<rustls::ClientConfig> {
    check_pki_dir(&conn.pki)?;
    let op = pki::load_svid(&conn.pki.join(pki::OPERATOR_CERT), &conn.pki.join(pki::OPERATOR_KEY))?;
    let bundle = TrustBundle::load(&conn.pki.join(pki::TRUST_BUNDLE))?;
    check_operator_cert(conn, &op, &bundle)?;
    let cp_id = pki::control_plane_id(op.spiffe_id.trust_domain());
    let verifier = SpiffeVerifier::new(verify::shared_bundle(bundle), IdMatcher::Exact(cp_id));
    Ok(weft_certs::tls::client_config(Some(SvidResolver::with_svid(&op)?), verifier, &[weft_certs::tls::ALPN_H2]))
}

/// An admin client speaking mTLS as the operator (connects lazily).
pub async fn client(conn: &ConnArgs) -> anyhow::Result<AdminClient<tonic::transport::Channel>> {
    // Callers normally pass `reach()`'s result (one replica); a list is reached here.
    let reached;
    let conn = if conn.control_plane.contains(',') {
        reached = conn.reach().await?;
        &reached
    } else {
        conn
    };
    let tls = operator_tls(conn)?;
    let channel = weft_proto::channel::lazy_channel_with(
        &conn.control_plane,
        Arc::new(tls),
        weft_certs::tls::server_name(),
        weft_proto::channel::Timeouts::OPERATOR,
    )
    .with_context(|| format!("--control-plane {:?}", conn.control_plane))?;
    Ok(AdminClient::new(channel))
}

/// An operator-facing error for a failed RPC. Only the status message is
/// shown: tonic's `Code` Display ("Client specified an invalid argument") is
/// gRPC jargon that tells the operator nothing the message does not.
fn rpc_error(status: tonic::Status, conn: &ConnArgs) -> anyhow::Error {
    use weft_certs::diagnose::{Client, ControlPlaneError};
    if let Some(e) = ControlPlaneError::from_error(&conn.control_plane, Client::Operator, &status) {
        return e.into();
    }
    if status.code() == tonic::Code::Unavailable && status.message().starts_with("store ") {
        // The control plane answered; what it cannot reach is its store.
        anyhow::anyhow!("the control plane at {} cannot do that now: {}", conn.control_plane, status.message())
    } else if status.code() == tonic::Code::Unavailable && status.message().contains("certificate") {
        anyhow::anyhow!(
            "TLS with the control plane at {} failed (is --pki the control plane's PKI?): {}",
            conn.control_plane,
            status.message()
        )
    } else if matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded) {
        // A connect timeout surfaces as Unknown("transport error").
        anyhow::anyhow!("control plane at {} is unreachable or not answering: {}", conn.control_plane, status.message())
    } else if status.message().is_empty() {
        anyhow::anyhow!("the control plane at {} refused: {:?}", conn.control_plane, status.code())
    } else {
        anyhow::anyhow!("{}", status.message())
    }
}

/// The asked replica's state for the first line of `weft status`: `not
/// ready: <reason>` (its /ready 503 reason), `serving, writes unavailable:
/// store unreachable`, or `healthy`.
pub fn health(s: &StatusResponse) -> String {
    if !s.not_ready.is_empty() {
        format!("not ready: {}", s.not_ready)
    } else if !s.store_error.is_empty() {
        "serving, writes unavailable: store unreachable".to_string()
    } else {
        "healthy".to_string()
    }
}

/// One replica of `weft status`: what its record in the store says, leaving
/// out what it does not (a replica whose record is not read yet).
fn replica_line(r: &weft_proto::admin::v1::ReplicaStatus, s: &StatusResponse) -> String {
    let this = if r.id == s.replica { " (this one)" } else { "" };
    let mut facts = Vec::new();
    if !r.listen.is_empty() {
        facts.push(format!("listen {}", r.listen));
    }
    if !r.host.is_empty() {
        facts.push(format!("host {}", r.host));
    }
    facts.push(human::count(r.sidecars as usize, "sidecar", "sidecars"));
    if r.listen.is_empty() && r.host.is_empty() {
        let why = if s.store_error.is_empty() { "not read yet" } else { "not readable: store unreachable" };
        facts.push(format!("its record in the store is {why}"));
    }
    format!("replica {}{this}: {}", r.id, facts.join(", "))
}

/// The control plane's Status RPC: trust domain, config version, connected sidecars.
pub async fn fetch_status(
    c: &mut AdminClient<tonic::transport::Channel>,
    conn: &ConnArgs,
) -> anyhow::Result<StatusResponse> {
    Ok(c.status(StatusRequest {}).await.map_err(|s| rpc_error(s, conn))?.into_inner())
}

/// The version a sidecar's acked/nacked versions count in: the version its
/// replica serves (versions are per replica). None for another replica's
/// sidecar whose ACK state that replica has not reported yet.
fn served_version(p: &SidecarStatus, s: &StatusResponse) -> Option<u64> {
    if !p.remote {
        Some(s.config_version)
    } else {
        (p.replica_config_version > 0).then_some(p.replica_config_version)
    }
}

/// Another replica's sidecar whose replica serves an older mesh config
/// revision than the one asked: its revision.
fn behind_revision(p: &SidecarStatus, s: &StatusResponse) -> Option<i64> {
    (p.remote && p.replica_config_revision < s.config_revision).then_some(p.replica_config_revision)
}

/// Whether a sidecar applied the config its replica serves (and, for
/// another replica's sidecar, that replica serves the current mesh config
/// revision); None when not known yet.
pub fn in_sync(p: &SidecarStatus, s: &StatusResponse) -> Option<bool> {
    served_version(p, s).map(|v| p.acked_version == v && behind_revision(p, s).is_none())
}

/// A sidecar's config sync state against the version its replica serves:
/// `in sync`, `REJECTED: <reason>`, `stale (lag N)` or, for a sidecar of a
/// replica behind on the mesh config, `stale (config revision R of S)`.
/// A sidecar held by another replica than the one asked gets `, on replica
/// <id>` after it, or is only `on replica <id>` while its ACK state is not
/// known yet.
pub fn sync_state(p: &SidecarStatus, s: &StatusResponse) -> String {
    let Some(version) = served_version(p, s) else { return format!("on replica {}", p.replica) };
    let state = if let Some(rev) = behind_revision(p, s) {
        format!("stale (config revision {rev} of {})", s.config_revision)
    } else if p.acked_version == version {
        "in sync".to_string()
    } else if p.nacked_version == version {
        format!("REJECTED: {}", p.nack_reason)
    } else {
        format!("stale (lag {})", version.saturating_sub(p.acked_version))
    };
    if p.remote {
        format!("{state}, on replica {}", p.replica)
    } else {
        state
    }
}

/// One warning per service name that sidecars declare they call
/// (`--calls`) and the mesh does not define, naming those sidecars.
fn unknown_calls_warnings(s: &StatusResponse) -> Vec<String> {
    let mut by_name: std::collections::BTreeMap<&str, Vec<&SidecarStatus>> = std::collections::BTreeMap::new();
    for p in &s.sidecars {
        for name in &p.unknown_calls {
            by_name.entry(name).or_default().push(p);
        }
    }
    by_name
        .into_iter()
        .map(|(name, sidecars)| {
            let mut who: Vec<String> =
                sidecars.iter().take(3).map(|p| format!("{} ({})", p.service, p.inbound_address)).collect();
            if sidecars.len() > 3 {
                who.push(format!("{} more", sidecars.len() - 3));
            }
            format!(
                "--calls of {} names service `{name}`, which the mesh does not define (no Service {name} in the mesh \
                 config and no sidecar registered as {name}), so they get nothing for it; check the spelling or \
                 apply a Service named {name}",
                who.join(", ")
            )
        })
        .collect()
}

pub async fn create_token(conn: &ConnArgs, id: &SpiffeId, ttl: Duration) -> anyhow::Result<CreateJoinTokenResponse> {
    let mut c = client(conn).await?;
    let resp = c
        .create_join_token(CreateJoinTokenRequest { spiffe_id: id.to_string(), ttl_seconds: ttl.as_secs() })
        .await
        .map_err(|s| rpc_error(s, conn))?;
    Ok(resp.into_inner())
}

/// Stores `yaml` as the mesh config (ApplyConfig): the revision, and
/// whether the stored config already was this one (nothing written).
pub async fn apply_config(conn: &ConnArgs, yaml: String, if_revision: i64) -> anyhow::Result<(i64, bool)> {
    let mut c = client(conn).await?;
    let resp = c.apply_config(ApplyConfigRequest { yaml, if_revision }).await.map_err(|s| rpc_error(s, conn))?;
    let resp = resp.into_inner();
    Ok((resp.revision, resp.unchanged))
}

/// Why `weft apply` refuses a config declaring nothing (`name`: where it
/// was read from): what applying it would remove, read from the stored
/// config when the control plane answers, and the flag that does it anyway.
pub async fn empty_apply_refusal(conn: &ConnArgs, name: &str) -> String {
    let stored = get_config(conn).await.ok().filter(|c| c.revision > 0);
    let removed = match stored.as_ref().map(|c| weft_config::parse(&c.yaml)) {
        Some(Ok(cfg)) => {
            let names = |v: Vec<&str>| if v.is_empty() { String::new() } else { format!(" ({})", v.join(", ")) };
            let mut parts = vec![
                human::count(cfg.services.len(), "service", "services")
                    + &names(cfg.services.keys().map(String::as_str).collect()),
                human::count(cfg.routes.len() + cfg.grpc_routes.len(), "route", "routes"),
                human::count(cfg.policies.len(), "authorization policy", "authorization policies")
                    + &names(cfg.policies.iter().map(|p| p.name.as_str()).collect()),
                human::count(cfg.rate_limits.len(), "rate limit", "rate limits"),
            ];
            if !cfg.workloads.is_empty() {
                parts.push(human::count(cfg.workloads.len(), "workload", "workloads"));
            }
            format!(
                "everything the stored config (revision {}) declares: {}",
                stored.as_ref().map_or(0, |c| c.revision),
                parts.join(", ")
            )
        }
        _ => "every service, route, authorization policy and rate limit the stored config declares".to_string(),
    };
    format!(
        "refusing to apply {name}: it declares no services, routes, authorization policies, rate limits or workloads, \
         so applying it would remove {removed}; without their authorization policies services accept every caller \
         of the mesh. Pass --allow-empty to apply it anyway"
    )
}

/// The stored mesh config and its revision (GetConfig).
pub async fn get_config(conn: &ConnArgs) -> anyhow::Result<GetConfigResponse> {
    let mut c = client(conn).await?;
    Ok(c.get_config(GetConfigRequest {}).await.map_err(|s| rpc_error(s, conn))?.into_inner())
}

/// Warnings about the config being served, checked against the connected
/// sidecars and the mesh's trust domain (route backends without endpoints,
/// policies naming another trust domain), and about services sidecars
/// declare they call (`--calls`) that the mesh does not define; one line each.
pub fn status_warnings(s: &StatusResponse) -> Vec<String> {
    let mut warnings = Vec::new();
    if let Ok(cfg) = serde_json::from_str::<weft_config::MeshConfig>(&s.mesh_config_json) {
        let facts = weft_config::warnings::MeshFacts {
            trust_domain: Some(s.trust_domain.clone()),
            endpoints: Some(crate::validate::endpoints_of(&s.sidecars)),
        };
        warnings.extend(weft_config::warnings::warnings(&cfg, &facts).iter().map(ToString::to_string));
    }
    warnings.extend(unknown_calls_warnings(s));
    warnings
}

/// Prints the control plane's view as a table (or JSON).
pub async fn status(conn: &ConnArgs, json: bool) -> anyhow::Result<()> {
    let mut c = client(conn).await?;
    let s = fetch_status(&mut c, conn).await?;
    if json {
        let sidecars: Vec<_> = s
            .sidecars
            .iter()
            .map(|p| {
                serde_json::json!({
                    "spiffe_id": p.spiffe_id,
                    "service": p.service,
                    "address": p.inbound_address,
                    "admin_address": p.admin_address,
                    "labels": p.labels,
                    "svid_expires_at": p.svid_expires_at,
                    "acked_version": p.acked_version,
                    "nacked_version": p.nacked_version,
                    "nack_reason": p.nack_reason,
                    // Another replica's sidecar: its versions are that
                    // replica's (null until that replica reports them).
                    "in_sync": in_sync(p, &s),
                    "sync": sync_state(p, &s),
                    "replica": p.replica,
                    "remote": p.remote,
                    "replica_config_version": p.replica_config_version,
                    "replica_config_revision": p.replica_config_revision,
                    "calls": p.calls,
                    "unknown_calls": p.unknown_calls,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "trust_domain": s.trust_domain,
            "config_version": s.config_version,
            "config_error": s.config_error,
            "store": s.store,
            "store_error": s.store_error,
            "config_revision": s.config_revision,
            "replica": s.replica,
            "not_ready": s.not_ready,
            "health": health(&s),
            "replicas": s.replicas.iter().map(|r| serde_json::json!({
                "id": r.id,
                "listen": r.listen,
                "host": r.host,
                "started_at": r.started_at,
                "sidecars": r.sidecars,
            })).collect::<Vec<_>>(),
            "sidecars": sidecars,
            "warnings": status_warnings(&s),
        });
        outln!("{doc}")?;
        return Ok(());
    }
    outln!(
        "control plane {}: {}, trust domain {}, config version {}",
        conn.control_plane,
        health(&s),
        s.trust_domain,
        s.config_version
    )?;
    if !s.config_error.is_empty() {
        outln!("last config change REJECTED: {}", s.config_error)?;
    }
    if !s.store_error.is_empty() {
        outln!(
            "store {} UNREACHABLE: {}; serving what is in memory, join tokens and weft apply refused until it is back",
            s.store,
            s.store_error
        )?;
    } else if s.store.starts_with("etcd://") {
        outln!("store {}: up, mesh config revision {}", s.store, s.config_revision)?;
    }
    for r in &s.replicas {
        outln!("{}", replica_line(r, &s))?;
    }
    let now = human::now_unix();
    outln!("{:<48} {:<12} {:<22} {:<14} {:<8} SYNC", "SPIFFE ID", "SERVICE", "ADDRESS", "SVID EXPIRY", "VERSION")?;
    for p in &s.sidecars {
        let mut sync = sync_state(p, &s);
        if !p.remote && !p.replica.is_empty() {
            // With etcd every sidecar names its replica; other replicas' do in sync_state.
            sync += &format!(", on replica {} (this one)", p.replica);
        }
        outln!(
            "{:<48} {:<12} {:<22} {:<14} {:<8} {}",
            p.spiffe_id,
            p.service,
            p.inbound_address,
            human::relative(p.svid_expires_at, now),
            p.acked_version,
            sync
        )?;
    }
    if s.sidecars.is_empty() {
        outln!("(no sidecars connected)")?;
    }
    for w in status_warnings(&s) {
        outln!("warning: {w}")?;
    }
    Ok(())
}

/// Every connected sidecar that told the control plane its admin address.
pub async fn sidecar_targets(conn: &ConnArgs) -> anyhow::Result<Vec<crate::top::Target>> {
    let mut c = client(conn).await?;
    let s = fetch_status(&mut c, conn).await?;
    Ok(s.sidecars
        .into_iter()
        .filter_map(|p| Some(crate::top::Target { admin: p.admin_address.parse().ok()?, spiffe_id: p.spiffe_id }))
        .collect())
}

/// Prints a sidecar's applied config (its /config) as YAML.
pub async fn proxy_config(conn: &ConnArgs, which: &str) -> anyhow::Result<()> {
    let mut c = client(conn).await?;
    let s = fetch_status(&mut c, conn).await?;
    let matching: Vec<_> = s
        .sidecars
        .iter()
        .filter(|p| p.spiffe_id == which || p.service == which || p.inbound_address == which)
        .collect();
    let p = match matching.as_slice() {
        [] => anyhow::bail!(
            "no connected sidecar is {which:?}; connected: {}",
            s.sidecars
                .iter()
                .map(|p| format!("{} ({})", p.spiffe_id, p.inbound_address))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        [one] => *one,
        many => anyhow::bail!(
            "{which:?} matches {} sidecars; name one by inbound address: {}",
            many.len(),
            many.iter().map(|p| p.inbound_address.as_str()).collect::<Vec<_>>().join(", ")
        ),
    };
    let admin: std::net::SocketAddr = p
        .admin_address
        .parse()
        .map_err(|_| anyhow::anyhow!("sidecar {} did not report an admin address", p.spiffe_id))?;
    let (status, body) =
        crate::http_get(admin, "/config").await.ok_or_else(|| anyhow::anyhow!("sidecar admin {admin} unreachable"))?;
    anyhow::ensure!(status == 200, "sidecar admin {admin} answered {status}");
    let json: serde_json::Value = serde_json::from_str(&body).context("sidecar /config is not JSON")?;
    outln!("# sidecar {} ({}), applied version {}", p.spiffe_id, p.inbound_address, json["version"])?;
    out!("{}", serde_norway::to_string(&json)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_replicas_sidecar_is_judged_by_its_replicas_version_and_the_config_revision() {
        let s = StatusResponse { config_version: 40, config_revision: 7, ..Default::default() };
        let remote = |acked, served, revision| SidecarStatus {
            remote: true,
            replica: "r2".into(),
            acked_version: acked,
            replica_config_version: served,
            replica_config_revision: revision,
            ..Default::default()
        };
        // Not reported yet.
        let p = remote(0, 0, 0);
        assert_eq!((sync_state(&p, &s), in_sync(&p, &s)), ("on replica r2".to_string(), None));
        // Its own versions (12), not this replica's (40).
        let p = remote(12, 12, 7);
        assert_eq!((sync_state(&p, &s), in_sync(&p, &s)), ("in sync, on replica r2".to_string(), Some(true)));
        let p = remote(10, 12, 7);
        assert_eq!(sync_state(&p, &s), "stale (lag 2), on replica r2");
        let p = remote(12, 12, 6);
        assert_eq!(
            (sync_state(&p, &s), in_sync(&p, &s)),
            ("stale (config revision 6 of 7), on replica r2".into(), Some(false))
        );
        let p = SidecarStatus { nacked_version: 12, nack_reason: "bad".into(), ..remote(11, 12, 7) };
        assert_eq!(sync_state(&p, &s), "REJECTED: bad, on replica r2");
        let local = SidecarStatus { acked_version: 40, ..Default::default() };
        assert_eq!((sync_state(&local, &s), in_sync(&local, &s)), ("in sync".to_string(), Some(true)));
    }

    #[test]
    fn first_line_and_replica_lines_tell_the_replicas_state() {
        let mut s = StatusResponse { replica: "r1".into(), ..Default::default() };
        assert_eq!(health(&s), "healthy");
        s.store_error = "store etcd://127.0.0.1:1 is unreachable".into();
        assert_eq!(health(&s), "serving, writes unavailable: store unreachable");
        s.not_ready = "has not read the stored mesh config yet: x".into();
        assert_eq!(health(&s), "not ready: has not read the stored mesh config yet: x");
        let bare = weft_proto::admin::v1::ReplicaStatus { id: "r1".into(), ..Default::default() };
        assert_eq!(
            replica_line(&bare, &s),
            "replica r1 (this one): 0 sidecars, its record in the store is not readable: store unreachable"
        );
        let full = weft_proto::admin::v1::ReplicaStatus {
            id: "r2".into(),
            listen: "0.0.0.0:7443".into(),
            host: "h2".into(),
            sidecars: 1,
            ..Default::default()
        };
        assert_eq!(replica_line(&full, &s), "replica r2: listen 0.0.0.0:7443, host h2, 1 sidecar");
    }

    #[test]
    fn unknown_calls_are_one_warning_per_name() {
        let sidecar = |addr: &str, unknown: &[&str]| SidecarStatus {
            service: "web".into(),
            inbound_address: addr.into(),
            unknown_calls: unknown.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        };
        let s = StatusResponse {
            sidecars: (1..=5).map(|i| sidecar(&format!("10.0.0.{i}:15006"), &["apii"])).collect(),
            ..Default::default()
        };
        let w = status_warnings(&s);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("--calls of web (10.0.0.1:15006), web (10.0.0.2:15006), web (10.0.0.3:15006), 2 more names service `apii`"), "{w:?}");
        assert!(w[0].ends_with("check the spelling or apply a Service named apii"), "{w:?}");
    }
}
