//! Kubernetes projected service-account tokens (the `serviceAccountToken`
//! volume source, audience `weft`) as attestation: the token's signature is
//! checked against the cluster's service-account issuer keys (a JWK Set,
//! RFC 7517), then its issuer, audience and expiry (RFC 7519), and the
//! identity is the service account its Kubernetes claims name.
//!
//! Tokens signed with `none`, with another cluster's key (an unknown `kid`
//! or a signature that does not verify), for another audience or issuer, or
//! expired are refused, each with a [`TokenError`] naming the reason.

use std::collections::HashSet;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::inject::TOKEN_AUDIENCE;

/// The identity a valid token proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
    /// The pod the token was projected into, when the token names one.
    pub pod: Option<String>,
}

/// Why a token was refused. [`TokenError::reason`] is the metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a JWT: {0}")]
    Malformed(String),
    #[error("the token's algorithm {0:?} is not accepted (service-account tokens are signed: RS256, ES256 and the like; never 'none')")]
    Algorithm(String),
    #[error("the token has no key ID ('kid'), so no issuer key can be chosen")]
    NoKeyId,
    #[error("no key {0:?} among the service-account issuer's keys (a token from another cluster, or keys not yet refreshed)")]
    UnknownKey(String),
    #[error("the token's signature does not verify with the issuer's key {0:?} (a token from another cluster?)")]
    Signature(String),
    #[error("the token's issuer is not {want:?}")]
    Issuer { want: String },
    #[error("the token's audience does not include {TOKEN_AUDIENCE:?}")]
    Audience,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token has no service account claims: {0}")]
    Claims(String),
    #[error("the issuer's keys are unusable: {0}")]
    Keys(String),
}

impl TokenError {
    /// A short label for counting refusals by reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::Algorithm(_) => "algorithm",
            Self::NoKeyId | Self::UnknownKey(_) => "unknown_key",
            Self::Signature(_) => "signature",
            Self::Issuer { .. } => "issuer",
            Self::Audience => "audience",
            Self::Expired | Self::NotYetValid => "expired",
            Self::Claims(_) => "claims",
            Self::Keys(_) => "keys",
        }
    }
}

/// Asymmetric algorithms a service-account issuer signs with.
const ALGORITHMS: [Algorithm; 8] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// Whether `token` has the shape of a JWT (three base64url parts, the first
/// a JSON object): how a projected token is told from a join token.
pub fn looks_like_jwt(token: &str) -> bool {
    let t = token.trim();
    t.starts_with("eyJ") && t.split('.').count() == 3
}

/// The issuer's keys, parsed from a JWK Set document.
///
/// Errors: the document is not a JWK Set.
pub fn parse_jwks(json: &[u8]) -> Result<JwkSet, TokenError> {
    serde_json::from_slice(json).map_err(|e| TokenError::Keys(format!("not a JWK Set: {e}")))
}

#[derive(Deserialize)]
struct Claims {
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
    sub: Option<String>,
}

#[derive(Deserialize)]
struct KubernetesClaims {
    namespace: String,
    serviceaccount: Named,
    pod: Option<Named>,
}

#[derive(Deserialize)]
struct Named {
    name: String,
}

/// Verifies `token` as a projected service-account token of `issuer` with
/// audience `weft`, signed by one of `keys`. Expiry allows 60 s of clock skew.
pub fn verify(token: &str, issuer: &str, keys: &JwkSet) -> Result<ServiceAccount, TokenError> {
    let token = token.trim();
    if !looks_like_jwt(token) {
        return Err(TokenError::Malformed("expected three base64url parts".into()));
    }
    // The header is read by hand first, so `alg: none` (which the JWT
    // library cannot even represent) is named as such.
    let header_json = token
        .split('.')
        .next()
        .and_then(|h| base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, h).ok())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .ok_or_else(|| TokenError::Malformed("the header is not base64url JSON".into()))?;
    let alg = header_json.get("alg").and_then(|a| a.as_str()).unwrap_or_default().to_string();
    let algorithm = ALGORITHMS.iter().copied().find(|a| format!("{a:?}") == alg).ok_or(TokenError::Algorithm(alg))?;
    let header = jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
    let kid = header.kid.ok_or(TokenError::NoKeyId)?;
    let jwk = keys.find(&kid).ok_or_else(|| TokenError::UnknownKey(kid.clone()))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| TokenError::Keys(format!("key {kid:?}: {e}")))?;

    let mut validation = Validation::new(algorithm);
    validation.set_issuer(&[issuer]);
    validation.set_audience(&[TOKEN_AUDIENCE]);
    validation.required_spec_claims = HashSet::from(["exp".to_string(), "iss".to_string(), "aud".to_string()]);
    validation.validate_nbf = true;
    validation.leeway = 60;
    let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| {
        use jsonwebtoken::errors::ErrorKind as K;
        match e.kind() {
            K::InvalidSignature => TokenError::Signature(kid.clone()),
            K::InvalidAlgorithm => TokenError::Algorithm(format!("{algorithm:?} with key {kid:?}")),
            K::ExpiredSignature => TokenError::Expired,
            K::ImmatureSignature => TokenError::NotYetValid,
            K::InvalidIssuer => TokenError::Issuer { want: issuer.into() },
            K::InvalidAudience => TokenError::Audience,
            K::MissingRequiredClaim(c) if c == "aud" => TokenError::Audience,
            K::MissingRequiredClaim(c) if c == "iss" => TokenError::Issuer { want: issuer.into() },
            K::MissingRequiredClaim(c) if c == "exp" => TokenError::Claims("no 'exp'".into()),
            K::Json(e) => TokenError::Claims(e.to_string()),
            _ => TokenError::Malformed(e.to_string()),
        }
    })?;
    let claims = data.claims;
    let k8s = claims.kubernetes.ok_or_else(|| TokenError::Claims("no 'kubernetes.io' claim".into()))?;
    // `sub` repeats the account; a token whose two claims disagree is not one Kubernetes made.
    let want_sub = format!("system:serviceaccount:{}:{}", k8s.namespace, k8s.serviceaccount.name);
    if claims.sub.as_deref() != Some(want_sub.as_str()) {
        return Err(TokenError::Claims(format!("'sub' is not {want_sub:?}")));
    }
    let label = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    };
    if !label(&k8s.namespace) || !label(&k8s.serviceaccount.name) {
        return Err(TokenError::Claims("namespace or service account is not a Kubernetes name".into()));
    }
    Ok(ServiceAccount { namespace: k8s.namespace, name: k8s.serviceaccount.name, pod: k8s.pod.map(|p| p.name) })
}
