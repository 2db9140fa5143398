//! SPIFFE IDs and trust domains, validated exactly as the SPIFFE-ID spec says.
//!
//! `spiffe://<trust-domain>/<path>`: the scheme is lower-case `spiffe`; the
//! trust domain is 1..=255 bytes of `[a-z0-9.-_]` (so no port, userinfo or
//! upper case); the path is empty or `/`-separated segments of `[a-zA-Z0-9.-_]`
//! that are neither empty, `.` nor `..`; no query or fragment; at most 2048
//! bytes in all.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID the spec allows, in bytes.
pub const MAX_ID_LEN: usize = 2048;
/// Longest trust domain the spec allows, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
const SCHEME: &str = "spiffe://";

/// Why a string is not a valid SPIFFE ID; each variant names the rule broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID must start with the scheme \"spiffe://\" (lower case)")]
    WrongScheme,
    #[error("SPIFFE ID is {0} bytes; the limit is 2048")]
    TooLong(usize),
    #[error("trust domain is missing (expected spiffe://<trust-domain>/...)")]
    MissingTrustDomain,
    #[error("trust domain is {0} bytes; the limit is 255")]
    TrustDomainTooLong(usize),
    #[error("trust domain may contain only lower-case letters, digits, '.', '-' and '_'; found {0:?} (ports, userinfo and upper case are not allowed)")]
    BadTrustDomainChar(char),
    #[error("path segment {0} is empty (no \"//\" and no trailing '/')")]
    EmptySegment(usize),
    #[error("path segment {0} is {1:?}; '.' and '..' are not allowed")]
    DotSegment(usize, String),
    #[error("path may contain only letters, digits, '.', '-', '_' and '/'; found {0:?} (no query, fragment or percent-encoding)")]
    BadPathChar(char),
}

/// A SPIFFE trust domain, e.g. `example.org`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`example.org`) or its ID form (`spiffe://example.org`).
    pub fn new(s: &str) -> Result<Self, SpiffeIdError> {
        if let Some(rest) = s.strip_prefix(SCHEME) {
            let id = SpiffeId::parse(s)?;
            if !id.path().is_empty() {
                return Err(SpiffeIdError::BadTrustDomainChar('/'));
            }
            let _ = rest;
            return Ok(id.trust_domain().clone());
        }
        validate_trust_domain(s)?;
        Ok(Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<td>`, the key SPIFFE bundle maps use.
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }

    /// Builds `spiffe://<td><path>`; `path` must start with '/'.
    pub fn id(&self, path: &str) -> Result<SpiffeId, SpiffeIdError> {
        SpiffeId::parse(&format!("{SCHEME}{}{path}", self.0))
    }

    /// The workload ID of a Kubernetes-style namespace and service account.
    pub fn workload_id(&self, namespace: &str, service_account: &str) -> Result<SpiffeId, SpiffeIdError> {
        self.id(&format!("/ns/{namespace}/sa/{service_account}"))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A validated SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    full: String,
    trust_domain: TrustDomain,
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong(s.len()));
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        validate_path(path)?;
        Ok(Self { full: s.to_string(), trust_domain: TrustDomain(td.to_string()) })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path, starting with '/', or "" for a trust-domain ID.
    pub fn path(&self) -> &str {
        &self.full[SCHEME.len() + self.trust_domain.0.len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// For `/ns/<ns>/sa/<sa>` IDs, the namespace.
    pub fn namespace(&self) -> Option<&str> {
        let mut segs = self.path().split('/').skip(1);
        match (segs.next(), segs.next()) {
            (Some("ns"), Some(ns)) => Some(ns),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong(td.len()));
    }
    match td.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))) {
        Some(c) => Err(SpiffeIdError::BadTrustDomainChar(c)),
        None => Ok(()),
    }
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    // `path` starts with '/', so the first split item is the empty prefix.
    for (i, seg) in path.split('/').enumerate().skip(1) {
        if seg.is_empty() {
            return Err(SpiffeIdError::EmptySegment(i));
        }
        if seg == "." || seg == ".." {
            return Err(SpiffeIdError::DotSegment(i, seg.to_string()));
        }
        if let Some(c) = seg.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))) {
            return Err(SpiffeIdError::BadPathChar(c));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use SpiffeIdError::*;

    #[test]
    fn valid_ids() {
        for (s, td, path) in [
            ("spiffe://example.org", "example.org", ""),
            ("spiffe://example.org/ns/default/sa/web", "example.org", "/ns/default/sa/web"),
            ("spiffe://a-b_c.0/x", "a-b_c.0", "/x"),
            ("spiffe://td/A.b-C_9/...x/..a", "td", "/A.b-C_9/...x/..a"),
            ("spiffe://1.2.3.4/p", "1.2.3.4", "/p"),
        ] {
            let id = SpiffeId::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.trust_domain().as_str(), td, "{s}");
            assert_eq!(id.path(), path, "{s}");
            assert_eq!(id.to_string(), s);
        }
    }

    #[test]
    fn invalid_ids_name_the_rule() {
        let long_td = format!("spiffe://{}/p", "a".repeat(256));
        let long_id = format!("spiffe://td/{}", "a".repeat(2040));
        let cases: Vec<(&str, SpiffeIdError)> = vec![
            ("", Empty),
            ("http://example.org/x", WrongScheme),
            ("SPIFFE://example.org/x", WrongScheme),
            ("spiffe:/example.org/x", WrongScheme),
            ("example.org/x", WrongScheme),
            ("spiffe://", MissingTrustDomain),
            ("spiffe:///path", MissingTrustDomain),
            ("spiffe://Example.org/x", BadTrustDomainChar('E')),
            ("spiffe://example.org:8080/x", BadTrustDomainChar(':')),
            ("spiffe://user@example.org/x", BadTrustDomainChar('@')),
            ("spiffe://exa mple.org", BadTrustDomainChar(' ')),
            ("spiffe://example.org?q=1", BadTrustDomainChar('?')),
            ("spiffe://example.org/", EmptySegment(1)),
            ("spiffe://example.org//x", EmptySegment(1)),
            ("spiffe://example.org/x/", EmptySegment(2)),
            ("spiffe://example.org/./x", DotSegment(1, ".".into())),
            ("spiffe://example.org/x/..", DotSegment(2, "..".into())),
            ("spiffe://example.org/x?query", BadPathChar('?')),
            ("spiffe://example.org/x#frag", BadPathChar('#')),
            ("spiffe://example.org/x%20y", BadPathChar('%')),
            ("spiffe://example.org/x:y", BadPathChar(':')),
            ("spiffe://example.org/é", BadPathChar('é')),
        ];
        for (s, want) in cases {
            assert_eq!(SpiffeId::parse(s), Err(want), "{s}");
        }
        assert_eq!(SpiffeId::parse(&long_td), Err(TrustDomainTooLong(256)));
        assert_eq!(SpiffeId::parse(&long_id), Err(TooLong(long_id.len())));
        // Exactly at the limits is fine.
        let max_td = format!("spiffe://{}", "a".repeat(255));
        assert!(SpiffeId::parse(&max_td).is_ok());
        let max_id = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN - "spiffe://td/".len()));
        assert!(SpiffeId::parse(&max_id).is_ok());
    }

    #[test]
    fn trust_domain_forms() {
        assert_eq!(TrustDomain::new("example.org").unwrap().as_str(), "example.org");
        assert_eq!(TrustDomain::new("spiffe://example.org").unwrap().as_str(), "example.org");
        assert!(TrustDomain::new("spiffe://example.org/x").is_err());
        assert_eq!(TrustDomain::new("EXAMPLE.org"), Err(BadTrustDomainChar('E')));
        assert_eq!(TrustDomain::new(""), Err(MissingTrustDomain));
        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(td.workload_id("default", "web").unwrap().as_str(), "spiffe://example.org/ns/default/sa/web");
        assert_eq!(td.workload_id("default", "web").unwrap().namespace(), Some("default"));
        assert_eq!(td.id_string(), "spiffe://example.org");
    }
}
