//! weft-config: the mesh config users write (Kubernetes-shaped YAML) and the
//! validated form the control plane pushes to sidecars.
//!
//! Parsing is strict: unknown kinds and fields are errors, and every error
//! names the document, the field path and the reason. A file with any error
//! is rejected as a whole.

pub mod canonical;
mod documents;
mod error;
mod gateway;
pub mod membership;
pub mod model;
pub mod registration;
mod validate;
pub mod warnings;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use error::{ConfigError, ConfigErrors};
pub use model::*;

/// A named spec: a document's `metadata.name` and its decoded `spec`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Named<T> {
    pub name: String,
    pub spec: T,
}

/// The validated mesh config, as pushed to sidecars (JSON).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfig {
    pub mesh: MeshSpec,
    pub services: BTreeMap<String, ServiceSpec>,
    /// HTTPRoutes, then every GRPCRoute as its HTTPRoute equivalent
    /// ([`GrpcRouteSpec::to_http`]), which is what sidecars route by.
    pub routes: Vec<Named<HttpRouteSpec>>,
    /// The GRPCRoutes as written (already compiled into `routes`; not pushed).
    #[serde(default, skip_serializing)]
    pub grpc_routes: Vec<Named<GrpcRouteSpec>>,
    pub policies: Vec<Named<AuthorizationPolicySpec>>,
    pub rate_limits: Vec<Named<RateLimitSpec>>,
    #[serde(default)]
    pub workloads: Vec<Named<WorkloadSpec>>,
}

/// Parses and validates a multi-document YAML config (YAML 1.1 documents
/// separated by `---`; empty documents are skipped).
///
/// Errors: every problem found, each naming its document, field path and
/// reason ([`ConfigError`]); the config is rejected as a whole.
pub fn parse(text: &str) -> Result<MeshConfig, ConfigErrors> {
    let mut report = error::Report::default();
    let docs = documents::read(text, &mut report);
    let (cfg, labels) = documents::decode(docs, &mut report);
    validate::mesh(&cfg, &labels, &mut report);
    let mut cfg = cfg;
    let grpc: Vec<_> = cfg.grpc_routes.iter().map(|r| Named { name: r.name.clone(), spec: r.spec.to_http() }).collect();
    cfg.routes.extend(grpc);
    report.finish(cfg)
}

/// Parses a config file from disk; I/O problems are reported like config
/// errors, with the file's path as the document.
pub fn load(path: &std::path::Path) -> Result<MeshConfig, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            document: path.display().to_string(),
            field: String::new(),
            reason: e.to_string(),
        }])
    })?;
    parse(&text)
}

/// A document or subset name: lower-case letters, digits, '-' or '.', at most
/// 63 characters, starting and ending with a letter or digit.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

/// `*` glob match: `*` matches any run of characters (including `/`).
pub fn glob_match(pattern: &str, s: &str) -> bool {
    // No allocation: it runs for every request an AuthorizationPolicy judges.
    let Some((first, after_first)) = pattern.split_once('*') else {
        return pattern == s;
    };
    let (middle, last) = after_first.rsplit_once('*').unwrap_or(("", after_first));
    if !s.starts_with(first) || s.len() < first.len() + last.len() || !s.ends_with(last) {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for mid in middle.split('*') {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests;
