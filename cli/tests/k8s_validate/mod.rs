//! Validation against the Kubernetes schemas with `kubernetes-validate`
//! (PyPI: `pip install kubernetes-validate==1.37.0`), shared by the
//! `weft inject` and `weft install` tests.

use std::path::Path;
use std::process::Command;

/// Validates a manifest file against the Kubernetes schemas (strict: unknown
/// fields are errors) with the `kubernetes-validate` tool. The tool has no
/// schema for `List`, so a List's items are validated as documents of their
/// own; a document the tool has no schema for fails the test.
pub fn kubernetes_validate(file: &Path) {
    let text = std::fs::read_to_string(file).unwrap();
    let mut docs = Vec::new();
    for doc in documents(&text) {
        match doc.get("items").and_then(|i| i.as_sequence()) {
            Some(items) if doc.get("kind").and_then(|k| k.as_str()) == Some("List") => docs.extend(items.clone()),
            _ => docs.push(doc),
        }
    }
    let expanded = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    let body: String = docs.iter().map(|d| format!("---\n{}", serde_norway::to_string(d).unwrap())).collect();
    std::fs::write(expanded.path(), body).unwrap();
    let out =
        Command::new("kubernetes-validate").args(["--strict", "--quiet"]).arg(expanded.path()).output().unwrap_or_else(
            |e| panic!("cannot run kubernetes-validate ({e}): pip install kubernetes-validate==1.37.0"),
        );
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!report.contains("Couldn't find schema"), "{}: not validated: {report}", file.display());
    assert!(
        out.status.success(),
        "{} does not validate against the Kubernetes schemas:\n{}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The documents of a YAML stream.
pub fn documents(text: &str) -> Vec<serde_norway::Value> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(text)
        .map(|de| serde_norway::Value::deserialize(de).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}
