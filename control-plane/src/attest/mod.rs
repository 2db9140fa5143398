//! Ways a workload proves who it is at its first SVID besides a join token.
//!
//! - [`k8s`]: a Kubernetes projected service-account token.

pub mod k8s;
