//! Reading a multi-document YAML stream: each document's header
//! (`apiVersion`/`kind`/`metadata`), then its `spec`, decoded strictly by kind.

use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::Report;
use crate::{gateway, valid_name, Document, MeshConfig, Named, API_VERSION, GATEWAY_API_VERSION};

const KINDS: &str = "Mesh, Service, HTTPRoute, GRPCRoute, AuthorizationPolicy, RateLimit, Workload";

/// The kinds accepted under the Gateway API's `apiVersion` as well as weft's.
const GATEWAY_KINDS: [&str; 2] = ["HTTPRoute", "GRPCRoute"];

/// A document whose header parsed, with the label its errors are reported under.
pub(crate) struct Labelled {
    label: String,
    doc: Document,
}

/// Where each decoded document came from: (kind, name) → its label.
#[derive(Default)]
pub(crate) struct Labels(BTreeMap<(&'static str, String), String>);

impl Labels {
    /// The label of the decoded `kind` named `name`.
    pub(crate) fn of(&self, kind: &'static str, name: &str) -> &str {
        &self.0[&(kind, name.to_string())]
    }
}

/// `Kind "name" (document N)`, the prefix of every error about a document.
fn label(kind: &str, name: &str, index: usize) -> String {
    format!("{kind} {name:?} (document {index})")
}

/// Splits `text` into documents and checks each header; empty documents are skipped.
pub(crate) fn read(text: &str, report: &mut Report) -> Vec<Labelled> {
    let mut names = BTreeSet::new();
    let mut docs = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let value = match serde_norway::Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                report.err(&format!("document {index}"), "", format!("not valid YAML: {e}"));
                // The YAML stream cannot be resumed after a syntax error.
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        match serde_path_to_error::deserialize::<_, Document>(value) {
            Ok(doc) => docs.push(check_header(doc, index, &mut names, report)),
            Err(e) => report.err(&format!("document {index}"), e.path().to_string(), e.inner().to_string()),
        }
    }
    docs
}

/// Checks the API version and the name, which must be unique per kind.
fn check_header(doc: Document, index: usize, names: &mut BTreeSet<(String, String)>, report: &mut Report) -> Labelled {
    let label = label(&doc.kind, &doc.metadata.name, index);
    let gateway_kind = GATEWAY_KINDS.contains(&doc.kind.as_str());
    let weft_kind = KINDS.split(", ").any(|k| k == doc.kind);
    match doc.api_version.as_str() {
        API_VERSION => {}
        GATEWAY_API_VERSION if gateway_kind => {}
        v if v.starts_with(gateway::GROUP_PREFIX) && gateway_kind => report.err(
            &label,
            "apiVersion",
            format!("{v:?} is not supported; use {GATEWAY_API_VERSION} (the Gateway API's standard channel)"),
        ),
        // Other Gateway API kinds get one clear message from `decode`.
        v if v.starts_with(gateway::GROUP_PREFIX) && !weft_kind => {}
        v if gateway_kind => report.err(
            &label,
            "apiVersion",
            format!("{v:?} is not supported; use {GATEWAY_API_VERSION} or {API_VERSION}"),
        ),
        v => report.err(&label, "apiVersion", format!("{v:?} is not supported; use {API_VERSION}")),
    }
    if !valid_name(&doc.metadata.name) {
        report.err(&label, "metadata.name", "must be lower-case letters, digits, '-' or '.', at most 63 characters");
    }
    if !names.insert((doc.kind.clone(), doc.metadata.name.clone())) {
        report.err(&label, "metadata.name", format!("another {} is already named {:?}", doc.kind, doc.metadata.name));
    }
    Labelled { label, doc }
}

/// Decodes every document's spec by its kind into one config (references are
/// checked later, once every Service is known).
pub(crate) fn decode(docs: Vec<Labelled>, report: &mut Report) -> (MeshConfig, Labels) {
    let mut cfg = MeshConfig::default();
    let mut labels = Labels::default();
    let mut seen_mesh = false;
    for Labelled { label, doc } in docs {
        match doc.kind.as_str() {
            "Mesh" => {
                if seen_mesh {
                    report.err(&label, "kind", "only one Mesh document is allowed");
                }
                seen_mesh = true;
                if let Some(s) = spec(report, &label, doc.spec) {
                    cfg.mesh = s;
                }
            }
            "Service" => {
                let name = doc.metadata.name;
                if let Some(s) = spec(report, &label, doc.spec) {
                    labels.0.insert(("Service", name.clone()), label);
                    cfg.services.insert(name, s);
                }
            }
            "HTTPRoute" | "GRPCRoute" => {
                let mut doc = doc;
                gateway::screen(&doc.kind, doc.metadata.namespace.as_deref(), &mut doc.spec, &label, report);
                if doc.kind == "HTTPRoute" {
                    push(report, &mut labels, "HTTPRoute", label, doc, &mut cfg.routes)
                } else {
                    push(report, &mut labels, "GRPCRoute", label, doc, &mut cfg.grpc_routes)
                }
            }
            "AuthorizationPolicy" => push(report, &mut labels, "AuthorizationPolicy", label, doc, &mut cfg.policies),
            "RateLimit" => push(report, &mut labels, "RateLimit", label, doc, &mut cfg.rate_limits),
            "Workload" => push(report, &mut labels, "Workload", label, doc, &mut cfg.workloads),
            other if doc.api_version.starts_with(gateway::GROUP_PREFIX) => report.err(
                &label,
                "kind",
                format!(
                    "the Gateway API kind {other:?} is not implemented yet: weft implements the mesh (GAMMA) profile, \
                     HTTPRoute and GRPCRoute with Services as parents"
                ),
            ),
            other => report.err(&label, "kind", format!("unknown kind {other:?}; expected one of {KINDS}")),
        }
    }
    (cfg, labels)
}

/// Decodes `doc`'s spec and appends it to `list` under its name.
fn push<T: DeserializeOwned>(
    report: &mut Report,
    labels: &mut Labels,
    kind: &'static str,
    label: String,
    doc: Document,
    list: &mut Vec<Named<T>>,
) {
    let name = doc.metadata.name;
    if let Some(spec) = spec(report, &label, doc.spec) {
        labels.0.insert((kind, name.clone()), label);
        list.push(Named { name, spec });
    }
}

/// Decodes a spec strictly; on failure reports the path below `spec`.
fn spec<T: DeserializeOwned>(report: &mut Report, label: &str, v: serde_norway::Value) -> Option<T> {
    match serde_path_to_error::deserialize(v) {
        Ok(s) => Some(s),
        Err(e) => {
            let path = e.path().to_string();
            let field = if path == "." { "spec".to_string() } else { format!("spec.{path}") };
            report.err(label, field, e.inner().to_string());
            None
        }
    }
}
