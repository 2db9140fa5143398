//! weft-k8s: weft on Kubernetes.
//!
//! - [`inject`]: the sidecar injection transformation (`weft inject` and the
//!   control plane's admission webhook share it).
//! - [`admission`]: `AdmissionReview` v1 in, JSONPatch out (the webhook's logic,
//!   without its TLS listener).
//! - [`install`]: the manifests of `weft install`, CRDs generated from the config types.
//! - [`manifests`]: reading and printing multi-document YAML.
//! - [`sa_token`]: verifying projected service-account tokens (attestation).
//! - [`tls`]: the injector's serving certificate and its CA.

pub mod admission;
pub mod inject;
pub mod install;
pub mod manifests;
pub mod sa_token;
pub mod tls;

pub use inject::{inject, InjectError, InjectOptions, Injected, Outcome};
