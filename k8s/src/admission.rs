//! The mutating admission webhook's logic: an `AdmissionReview`
//! (`admission.k8s.io/v1`) in, an `AdmissionReview` with a JSONPatch
//! (RFC 6902) out, applying exactly [`crate::inject()`].
//!
//! - A review that cannot be answered (not JSON, not an `AdmissionReview`
//!   v1, no `request.uid`) is a [`ReviewError`]: the HTTP server answers 400
//!   and the API server applies the webhook's `failurePolicy`.
//! - A review without an object, or for an operation other than `CREATE`,
//!   is allowed unchanged.
//! - An object injection refuses (a bad `weft.dev/*` annotation) is denied
//!   with the reason, so the user sees what to fix.

use base64::Engine;
use serde_json::{json, Value};

use crate::inject::{inject, InjectOptions, Outcome};

/// The API version of the reviews this webhook answers.
pub const REVIEW_API_VERSION: &str = "admission.k8s.io/v1";

/// A request body that is not an answerable `AdmissionReview`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    #[error("the request body is not JSON: {0}")]
    NotJson(String),
    #[error("not an AdmissionReview {REVIEW_API_VERSION} request: {0}")]
    NotAReview(String),
}

/// Answers one `AdmissionReview` request body (JSON) with the response review.
///
/// Errors: see the module documentation; they never depend on the object.
pub fn review(body: &[u8], opts: &InjectOptions) -> Result<Value, ReviewError> {
    let req: Value = serde_json::from_slice(body).map_err(|e| ReviewError::NotJson(e.to_string()))?;
    let api_version = req.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
    let kind = req.get("kind").and_then(Value::as_str).unwrap_or_default();
    if api_version != REVIEW_API_VERSION || kind != "AdmissionReview" {
        return Err(ReviewError::NotAReview(format!(
            "apiVersion {api_version:?}, kind {kind:?}; expected {REVIEW_API_VERSION} AdmissionReview"
        )));
    }
    let request = req.get("request").ok_or_else(|| ReviewError::NotAReview("no `request`".into()))?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| ReviewError::NotAReview("no `request.uid`".into()))?;
    let response = match (request.get("operation").and_then(Value::as_str), request.get("object")) {
        (Some("CREATE"), Some(object)) if object.is_object() => respond(uid, object, opts),
        (Some("CREATE"), _) => allowed(uid, Some("weft: the review has no object to inject; allowed unchanged")),
        _ => allowed(uid, None),
    };
    Ok(json!({"apiVersion": REVIEW_API_VERSION, "kind": "AdmissionReview", "response": response}))
}

fn respond(uid: &str, object: &Value, opts: &InjectOptions) -> Value {
    let mut doc: serde_norway::Value = match serde_norway::to_value(object) {
        Ok(v) => v,
        Err(e) => return denied(uid, &format!("weft: the object cannot be read: {e}")),
    };
    let outcomes = match inject(&mut doc, opts) {
        Ok(o) => o,
        Err(e) => return denied(uid, &format!("weft: cannot inject the sidecar: {e}")),
    };
    if !outcomes.iter().any(|o| o.outcome == Outcome::Injected) {
        return allowed(uid, None);
    }
    let after = match serde_json::to_value(&doc) {
        Ok(v) => v,
        Err(e) => return denied(uid, &format!("weft: the injected object cannot be written: {e}")),
    };
    let patch = json_patch::diff(object, &after);
    let patch = serde_json::to_vec(&patch).expect("a JSON patch serializes");
    json!({
        "uid": uid,
        "allowed": true,
        "patchType": "JSONPatch",
        "patch": base64::engine::general_purpose::STANDARD.encode(patch),
    })
}

fn allowed(uid: &str, warning: Option<&str>) -> Value {
    let mut r = json!({"uid": uid, "allowed": true});
    if let Some(w) = warning {
        r["warnings"] = json!([w]);
    }
    r
}

fn denied(uid: &str, message: &str) -> Value {
    json!({"uid": uid, "allowed": false, "status": {"code": 400, "message": message}})
}
