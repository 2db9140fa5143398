//! Kubernetes manifests as YAML streams: documents separated by `---`, read
//! in order (keys keep their order, so printed manifests stay recognisable).

use serde::Deserialize;
use serde_norway::Value;

/// A manifest stream that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: document {index}: not valid YAML: {reason}")]
pub struct ManifestError {
    /// The file (or `-` for stdin) the stream came from.
    pub source_name: String,
    /// Which document, counting from 1.
    pub index: usize,
    pub reason: String,
}

/// The non-empty documents of a YAML stream, in order.
///
/// Errors: the first document that is not valid YAML (the stream cannot be
/// resumed after a syntax error).
pub fn read(source_name: &str, text: &str) -> Result<Vec<Value>, ManifestError> {
    let mut docs = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let v = Value::deserialize(de).map_err(|e| ManifestError {
            source_name: source_name.into(),
            index: i + 1,
            reason: e.to_string(),
        })?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// Documents as one YAML stream, each starting with `---`.
pub fn write(docs: &[Value]) -> String {
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(d).expect("a YAML value serializes"));
    }
    out
}
