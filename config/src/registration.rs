//! Which service a workload may register as. The control plane enforces it on
//! every config watch; the sidecar checks it at start-up to fail fast with
//! the same message instead of retrying a registration that cannot succeed.

use weft_certs::SpiffeId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistrationError {
    #[error("service {0:?} is not a valid name (a DNS label: lower-case letters, digits and '-', at most 63)")]
    BadName(String),
    #[error(
        "{id} may not register as service {service:?}: a workload registers only for the service named by its service account (.../sa/{service})"
    )]
    NotItsService { id: SpiffeId, service: String },
}

/// A service name: a DNS label (lower-case letters, digits, '-').
pub fn valid_service_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A workload may only serve as the service its identity names, or else any
/// workload could attract another service's traffic.
pub fn check_registration(id: &SpiffeId, service: &str) -> Result<(), RegistrationError> {
    if !valid_service_name(service) {
        return Err(RegistrationError::BadName(service.to_string()));
    }
    if !id.path().ends_with(&format!("/sa/{service}")) {
        return Err(RegistrationError::NotItsService { id: id.clone(), service: service.to_string() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        for ok in ["web", "db-1", "a"] {
            assert!(valid_service_name(ok), "{ok}");
        }
        for bad in ["", "Web", "-a", "a-", "a.b", "a_b", &"x".repeat(64)] {
            assert!(!valid_service_name(bad), "{bad}");
        }
    }

    #[test]
    fn identity_names_the_service() {
        let id = SpiffeId::parse("spiffe://td/ns/default/sa/web").unwrap();
        assert_eq!(check_registration(&id, "web"), Ok(()));
        assert!(matches!(check_registration(&id, "db"), Err(RegistrationError::NotItsService { .. })));
        assert!(matches!(check_registration(&id, "sa/web"), Err(RegistrationError::BadName(_))));
        let other = SpiffeId::parse("spiffe://td/ns/default/sa/xweb").unwrap();
        assert!(check_registration(&other, "web").is_err(), "whole segments only");
    }
}
