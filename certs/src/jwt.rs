//! JWT-SVIDs (SPIFFE JWT-SVID standard): ES256 (ECDSA P-256, SHA-256)
//! signatures in JWS compact serialization, the JWK Set that carries the
//! signing keys (the trust domain's JWT bundle), and validation.
//!
//! Built on `ring` (already weft's TLS crypto) with a hand-written JWS: the
//! format is three base64url parts, and only ES256 is ever produced or
//! accepted, so there is no algorithm negotiation to get wrong (`alg: none`,
//! HMAC-with-a-public-key and the like are refused by construction).

use std::path::Path;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use serde_json::{json, Map, Value};

use crate::error::{CertError, Result};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::svid::unix_secs;

/// The only JWS algorithm weft signs and accepts.
pub const ALG: &str = "ES256";
/// Default JWT-SVID lifetime.
pub const DEFAULT_JWT_SVID_TTL: Duration = Duration::from_secs(300);
/// `spiffe_refresh_hint` of the JWK Set, seconds.
pub const REFRESH_HINT_SECS: u64 = 300;
const PEM_LABEL: &str = "PRIVATE KEY";

/// The control plane's JWT-SVID signing key (ECDSA P-256) and its key ID.
pub struct JwtSigner {
    key: EcdsaKeyPair,
    kid: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("JwtSigner").field("kid", &self.kid).finish()
    }
}

impl JwtSigner {
    /// A fresh key; returns the signer and its PKCS#8 DER.
    pub fn generate() -> Result<(Self, Vec<u8>)> {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| CertError::JwtKey("could not generate a key".into()))?;
        let der = doc.as_ref().to_vec();
        Ok((Self::from_pkcs8(&der)?, der))
    }

    /// A signer from an unencrypted PKCS#8 ECDSA P-256 key.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self> {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
            .map_err(|e| CertError::JwtKey(format!("not a PKCS#8 ECDSA P-256 key: {e}")))?;
        let kid = thumbprint(key.public_key().as_ref())?;
        Ok(Self { key, kid, rng })
    }

    /// A signer from a PEM `PRIVATE KEY` block (unencrypted PKCS#8 ECDSA P-256),
    /// as [`JwtSigner::load_or_create`] writes it.
    pub fn from_pem(bytes: &[u8]) -> Result<Self> {
        let block = pem::parse(bytes).map_err(|e| CertError::JwtKey(format!("bad PEM: {e}")))?;
        if block.tag() != PEM_LABEL {
            return Err(CertError::JwtKey(format!("expected a {PEM_LABEL} block, found {}", block.tag())));
        }
        Self::from_pkcs8(block.contents())
    }

    /// Loads the key kept at `path` (PEM PKCS#8), or makes one and writes it
    /// there with mode 0600 when the file does not exist yet.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => Self::from_pem(&bytes).map_err(|e| match e {
                CertError::JwtKey(m) => CertError::bad_file(path, m),
                e => e,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (signer, der) = Self::generate()?;
                let block = pem::Pem::new(PEM_LABEL, der);
                let text = pem::encode_config(&block, pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF));
                crate::pki::write_file(path, text.as_bytes(), true)?;
                tracing::info!(path = %path.display(), kid = %signer.kid, "generated the JWT-SVID signing key");
                Ok(signer)
            }
            Err(e) => Err(CertError::io(path, e)),
        }
    }

    /// The key ID: the RFC 7638 JWK thumbprint (SHA-256, base64url).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK (`use: jwt-svid`, with `kid` and `alg`).
    pub fn jwk(&self) -> Value {
        let (x, y) =
            coordinates(self.key.public_key().as_ref()).expect("ring P-256 public keys are uncompressed points");
        json!({
            "kty": "EC",
            "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(x),
            "y": URL_SAFE_NO_PAD.encode(y),
            "kid": self.kid,
            "use": "jwt-svid",
            "alg": ALG,
        })
    }

    /// The JWT bundle: a JWK Set holding this key, as JSON bytes.
    pub fn jwks(&self, sequence: u64) -> Vec<u8> {
        let set = json!({
            "keys": [self.jwk()],
            "spiffe_sequence": sequence,
            "spiffe_refresh_hint": REFRESH_HINT_SECS,
        });
        serde_json::to_vec(&set).expect("JSON values serialize")
    }

    /// Signs a JWT-SVID for `sub` and `audience`, valid for `ttl` from `now`;
    /// returns the compact JWS and its `exp`.
    pub fn sign(&self, sub: &SpiffeId, audience: &[String], ttl: Duration, now: SystemTime) -> Result<(String, i64)> {
        if audience.is_empty() || audience.iter().any(|a| a.is_empty()) {
            return Err(CertError::JwtKey("a JWT-SVID needs at least one non-empty audience".into()));
        }
        let iat = unix_secs(now);
        let exp = unix_secs(now + ttl);
        let header = json!({ "alg": ALG, "kid": self.kid, "typ": "JWT" });
        let claims = json!({ "sub": sub.as_str(), "aud": audience, "exp": exp, "iat": iat });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).expect("JSON values serialize")),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("JSON values serialize"))
        );
        let sig = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|_| CertError::JwtKey("ECDSA signing failed".into()))?;
        Ok((format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())), exp))
    }
}

/// Splits an uncompressed P-256 point (0x04 || x || y) into x and y.
fn coordinates(point: &[u8]) -> Option<(&[u8], &[u8])> {
    match point {
        [0x04, rest @ ..] if rest.len() == 64 => Some(rest.split_at(32)),
        _ => None,
    }
}

/// RFC 7638 thumbprint of a P-256 public key.
fn thumbprint(point: &[u8]) -> Result<String> {
    let (x, y) =
        coordinates(point).ok_or_else(|| CertError::JwtKey("public key is not an uncompressed P-256 point".into()))?;
    // Members in lexicographic order, no whitespace (RFC 7638 §3).
    let canonical = format!(
        r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(x),
        URL_SAFE_NO_PAD.encode(y)
    );
    Ok(URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes())))
}

/// Why a JWT-SVID was not accepted; the message is meant for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("unsupported token algorithm {0:?}: only ES256 is accepted")]
    Algorithm(String),
    #[error("token header 'typ' should be 'JWT' or 'JOSE', not {0:?}")]
    Type(String),
    #[error("token has no key ID ('kid' header)")]
    NoKeyId,
    #[error("no JWT authority with key ID {0:?} in the bundle of {1}")]
    UnknownKey(String, String),
    #[error("token signature is invalid")]
    Signature,
    #[error("token has no valid 'sub' claim: {0}")]
    Subject(String),
    #[error("no JWT bundle for trust domain {0:?}")]
    TrustDomain(String),
    #[error("token audience {got:?} does not include {want:?}")]
    Audience { got: Vec<String>, want: String },
    #[error("token has no valid 'exp' claim")]
    NoExpiry,
    #[error("token has expired")]
    Expired,
    #[error("invalid JWT bundle: {0}")]
    Bundle(String),
}

/// A trust domain's JWT authorities (public keys by key ID).
#[derive(Debug, Clone)]
pub struct JwtBundle {
    trust_domain: TrustDomain,
    keys: Vec<(String, Vec<u8>)>,
}

/// What a valid JWT-SVID says.
#[derive(Debug, Clone)]
pub struct ValidatedJwt {
    pub spiffe_id: SpiffeId,
    pub claims: Map<String, Value>,
}

fn decode_part(s: &str, what: &str) -> std::result::Result<Vec<u8>, JwtError> {
    URL_SAFE_NO_PAD.decode(s).map_err(|e| JwtError::Malformed(format!("{what} is not base64url: {e}")))
}

fn json_object(bytes: &[u8], what: &str) -> std::result::Result<Map<String, Value>, JwtError> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(JwtError::Malformed(format!("{what} is not a JSON object"))),
        Err(e) => Err(JwtError::Malformed(format!("{what} is not JSON: {e}"))),
    }
}

impl JwtBundle {
    /// Parses a JWK Set (RFC 7517). EC P-256 keys with a `kid` are used;
    /// keys of other types, or whose `use` is set to something other than
    /// `jwt-svid`, are skipped.
    pub fn parse(trust_domain: TrustDomain, jwks: &[u8]) -> std::result::Result<Self, JwtError> {
        let set = json_object(jwks, "JWK Set").map_err(|e| JwtError::Bundle(e.to_string()))?;
        let keys = set
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| JwtError::Bundle("JWK Set has no 'keys' array".into()))?;
        let mut out = Vec::new();
        for k in keys {
            let field = |name: &str| k.get(name).and_then(Value::as_str);
            if field("kty") != Some("EC") || field("crv") != Some("P-256") {
                continue;
            }
            if matches!(field("use"), Some(u) if u != "jwt-svid") {
                continue;
            }
            let kid = field("kid").ok_or_else(|| JwtError::Bundle("a JWT authority has no 'kid'".into()))?;
            let coord = |name: &str| {
                field(name)
                    .and_then(|v| URL_SAFE_NO_PAD.decode(v).ok())
                    .filter(|b| b.len() == 32)
                    .ok_or_else(|| JwtError::Bundle(format!("key {kid:?}: bad '{name}' coordinate")))
            };
            let mut point = vec![0x04];
            point.extend(coord("x")?);
            point.extend(coord("y")?);
            out.push((kid.to_string(), point));
        }
        Ok(Self { trust_domain, keys: out })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The key IDs of the bundle's authorities.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(k, _)| k.as_str())
    }

    /// Validates a JWT-SVID as the JWT-SVID standard says: ES256 signature
    /// by an authority of this bundle, `sub` a SPIFFE ID of this trust
    /// domain, `aud` containing `audience`, `exp` in the future.
    pub fn validate(
        &self,
        token: &str,
        audience: &str,
        now: SystemTime,
    ) -> std::result::Result<ValidatedJwt, JwtError> {
        let parts: Vec<&str> = token.trim().split('.').collect();
        let [h, p, s] = parts.as_slice() else {
            return Err(JwtError::Malformed(format!("expected 3 dot-separated parts, found {}", parts.len())));
        };
        let header = json_object(&decode_part(h, "header")?, "header")?;
        match header.get("alg") {
            Some(Value::String(a)) if a == ALG => {}
            Some(Value::String(a)) => return Err(JwtError::Algorithm(a.clone())),
            other => return Err(JwtError::Algorithm(other.map(|v| v.to_string()).unwrap_or_default())),
        }
        match header.get("typ") {
            None | Some(Value::Null) => {}
            Some(Value::String(t)) if t == "JWT" || t == "JOSE" => {}
            Some(t) => return Err(JwtError::Type(t.to_string())),
        }
        let kid = header.get("kid").and_then(Value::as_str).ok_or(JwtError::NoKeyId)?;
        let claims = json_object(&decode_part(p, "payload")?, "payload")?;

        // The subject picks the bundle (as go-spiffe does), then the kid the key.
        let sub = claims.get("sub").and_then(Value::as_str).ok_or_else(|| JwtError::Subject("missing".into()))?;
        let spiffe_id = SpiffeId::parse(sub).map_err(|e| JwtError::Subject(e.to_string()))?;
        if spiffe_id.trust_domain() != &self.trust_domain {
            return Err(JwtError::TrustDomain(spiffe_id.trust_domain().to_string()));
        }
        let (_, point) = self
            .keys
            .iter()
            .find(|(k, _)| k == kid)
            .ok_or_else(|| JwtError::UnknownKey(kid.to_string(), self.trust_domain.id_string()))?;
        let sig = decode_part(s, "signature")?;
        let signing_input = &token.trim()[..h.len() + 1 + p.len()];
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
            .verify(signing_input.as_bytes(), &sig)
            .map_err(|_| JwtError::Signature)?;

        let aud: Vec<String> = match claims.get("aud") {
            Some(Value::String(a)) => vec![a.clone()],
            Some(Value::Array(list)) => list.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
            _ => Vec::new(),
        };
        if !aud.iter().any(|a| a == audience) {
            return Err(JwtError::Audience { got: aud, want: audience.to_string() });
        }
        let exp = claims.get("exp").and_then(Value::as_f64).filter(|e| e.is_finite()).ok_or(JwtError::NoExpiry)?;
        if exp <= unix_secs(now) as f64 {
            return Err(JwtError::Expired);
        }
        Ok(ValidatedJwt { spiffe_id, claims })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn id() -> SpiffeId {
        SpiffeId::parse("spiffe://example.org/ns/default/sa/web").unwrap()
    }

    fn bundle_of(signer: &JwtSigner) -> JwtBundle {
        JwtBundle::parse(td(), &signer.jwks(1)).unwrap()
    }

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    #[test]
    fn signs_and_validates() {
        let (signer, _) = JwtSigner::generate().unwrap();
        let now = SystemTime::now();
        let aud = vec!["api".to_string(), "other".to_string()];
        let (token, exp) = signer.sign(&id(), &aud, DEFAULT_JWT_SVID_TTL, now).unwrap();
        assert_eq!(exp, unix_secs(now) + 300);
        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').next().unwrap()).unwrap()).unwrap();
        assert_eq!(header, json!({"alg": "ES256", "kid": signer.kid(), "typ": "JWT"}));
        let v = bundle_of(&signer).validate(&token, "other", now).unwrap();
        assert_eq!(v.spiffe_id, id());
        assert_eq!(v.claims["aud"], json!(["api", "other"]));
        assert_eq!(v.claims["exp"], json!(exp));
        assert_eq!(v.claims["iat"], json!(unix_secs(now)));
    }

    #[test]
    fn refuses_what_it_should() {
        let (signer, _) = JwtSigner::generate().unwrap();
        let (other, _) = JwtSigner::generate().unwrap();
        let now = SystemTime::now();
        let bundle = bundle_of(&signer);
        let (token, _) = signer.sign(&id(), &["api".into()], Duration::from_secs(60), now).unwrap();

        assert!(matches!(bundle.validate(&token, "nope", now), Err(JwtError::Audience { .. })));
        let later = now + Duration::from_secs(61);
        assert_eq!(bundle.validate(&token, "api", later).unwrap_err(), JwtError::Expired);
        // Signed by a key the bundle does not hold.
        let (foreign, _) = other.sign(&id(), &["api".into()], Duration::from_secs(60), now).unwrap();
        assert!(matches!(bundle.validate(&foreign, "api", now), Err(JwtError::UnknownKey(..))));
        // Claims changed after signing.
        let parts: Vec<&str> = token.split('.').collect();
        let evil = b64(&json!({"sub": "spiffe://example.org/ns/default/sa/admin", "aud": ["api"], "exp": 9e9}));
        let tampered = format!("{}.{evil}.{}", parts[0], parts[2]);
        assert_eq!(bundle.validate(&tampered, "api", now).unwrap_err(), JwtError::Signature);
        // alg none, and a header naming a symmetric algorithm.
        for alg in ["none", "HS256"] {
            let h = b64(&json!({"alg": alg, "kid": signer.kid()}));
            let t = format!("{h}.{}.", parts[1]);
            assert!(matches!(bundle.validate(&t, "api", now), Err(JwtError::Algorithm(_))), "{alg}");
        }
        // Another trust domain's subject.
        let (t, _) = signer
            .sign(&SpiffeId::parse("spiffe://evil.org/x").unwrap(), &["api".into()], Duration::from_secs(60), now)
            .unwrap();
        assert!(matches!(bundle.validate(&t, "api", now), Err(JwtError::TrustDomain(_))));
        assert!(matches!(bundle.validate("a.b", "api", now), Err(JwtError::Malformed(_))));
        assert!(signer.sign(&id(), &[], Duration::from_secs(60), now).is_err());
    }

    #[test]
    fn jwks_has_the_spiffe_shape() {
        let (signer, _) = JwtSigner::generate().unwrap();
        let set: Value = serde_json::from_slice(&signer.jwks(7)).unwrap();
        assert_eq!(set["spiffe_sequence"], json!(7));
        let key = &set["keys"][0];
        assert_eq!((key["kty"].as_str(), key["crv"].as_str()), (Some("EC"), Some("P-256")));
        assert_eq!((key["use"].as_str(), key["alg"].as_str()), (Some("jwt-svid"), Some("ES256")));
        assert_eq!(key["kid"].as_str(), Some(signer.kid()));
        assert_eq!(URL_SAFE_NO_PAD.decode(key["x"].as_str().unwrap()).unwrap().len(), 32);
        assert_eq!(signer.kid().len(), 43, "base64url SHA-256");
        let b = bundle_of(&signer);
        assert_eq!(b.key_ids().collect::<Vec<_>>(), vec![signer.kid()]);
    }

    #[test]
    fn key_is_persisted_0600_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwt-signing-key.pem");
        let a = JwtSigner::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = JwtSigner::load_or_create(&path).unwrap();
        assert_eq!(a.kid(), b.kid());
        let (t, _) = a.sign(&id(), &["x".into()], Duration::from_secs(60), SystemTime::now()).unwrap();
        bundle_of(&b).validate(&t, "x", SystemTime::now()).unwrap();
        std::fs::write(&path, "not pem").unwrap();
        let err = JwtSigner::load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("jwt-signing-key.pem"), "{err}");
    }
}
