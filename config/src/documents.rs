//! Reading a multi-document YAML stream: each document's header
//! (`apiVersion`/`kind`/`metadata`), then its `spec`, decoded strictly by kind.

use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::Report;
use crate::{valid_name, Document, MeshConfig, Named, API_VERSION};

const KINDS: &str = "Mesh, Service, HTTPRoute, AuthorizationPolicy, RateLimit, Workload";

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
    if doc.api_version != API_VERSION {
        report.err(&label, "apiVersion", format!("{:?} is not supported; use {API_VERSION}", doc.api_version));
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
            "HTTPRoute" => push(report, &mut labels, "HTTPRoute", label, doc, &mut cfg.routes),
            "AuthorizationPolicy" => push(report, &mut labels, "AuthorizationPolicy", label, doc, &mut cfg.policies),
            "RateLimit" => push(report, &mut labels, "RateLimit", label, doc, &mut cfg.rate_limits),
            "Workload" => push(report, &mut labels, "Workload", label, doc, &mut cfg.workloads),
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
