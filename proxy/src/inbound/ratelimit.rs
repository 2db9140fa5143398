//! Local rate limits: token buckets per RateLimit (and per caller identity
//! when asked). Excess requests get 429 with `Retry-After`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use weft_certs::SpiffeId;
use weft_config::{glob_match, MeshConfig, Named, RateLimitKey, RateLimitSpec};

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Debug)]
pub struct RateLimiter {
    limits: Vec<Named<RateLimitSpec>>,
    buckets: Mutex<HashMap<(usize, String), Bucket>>,
}

impl RateLimiter {
    pub fn new(cfg: &MeshConfig, service: &str) -> Self {
        let limits = cfg.rate_limits.iter().filter(|r| r.spec.target_ref.name == service).cloned().collect();
        Self { limits, buckets: Mutex::new(HashMap::new()) }
    }

    /// Whether `other` enforces exactly the same limits.
    pub fn same_limits(&self, other: &RateLimiter) -> bool {
        serde_json::to_string(&self.limits).ok() == serde_json::to_string(&other.limits).ok()
    }

    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// Takes a token from every limit that applies; on refusal returns the
    /// limit's name and how long until a token is available.
    pub fn check(&self, peer: &SpiffeId, path: Option<&str>, now: Instant) -> Result<(), (String, Duration)> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        for (i, l) in self.limits.iter().enumerate() {
            let s = &l.spec;
            if !s.paths.is_empty() && !path.is_some_and(|p| s.paths.iter().any(|g| glob_match(g, p))) {
                continue;
            }
            let key = match s.per {
                RateLimitKey::Service => String::new(),
                RateLimitKey::Identity => peer.to_string(),
            };
            let capacity = if s.burst == 0 { s.requests_per_second.ceil().max(1.0) } else { f64::from(s.burst) };
            let b = buckets.entry((i, key)).or_insert(Bucket { tokens: capacity, last: now });
            let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
            b.tokens = (b.tokens + elapsed * s.requests_per_second).min(capacity);
            b.last = now;
            if b.tokens >= 1.0 {
                b.tokens -= 1.0;
            } else {
                let wait = (1.0 - b.tokens) / s.requests_per_second;
                return Err((l.name.clone(), Duration::from_secs_f64(wait)));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per: &str) -> RateLimiter {
        let cfg = weft_config::parse(&format!(
            "apiVersion: weft.dev/v1alpha1\nkind: Service\nmetadata: {{name: api}}\nspec: {{}}\n---\napiVersion: weft.dev/v1alpha1\nkind: RateLimit\nmetadata: {{name: rl}}\nspec: {{targetRef: {{name: api}}, requestsPerSecond: 10, burst: 5, per: {per}, paths: ['/limited/*']}}\n"
        ))
        .unwrap();
        RateLimiter::new(&cfg, "api")
    }

    #[test]
    fn bucket_refuses_then_recovers() {
        let l = limiter("service");
        let peer = SpiffeId::parse("spiffe://td/a").unwrap();
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(l.check(&peer, Some("/limited/x"), t0).is_ok());
        }
        let (name, wait) = l.check(&peer, Some("/limited/x"), t0).unwrap_err();
        assert_eq!(name, "rl");
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
        // Other paths are not limited.
        assert!(l.check(&peer, Some("/free"), t0).is_ok());
        // After 200ms at 10/s two tokens are back.
        let t1 = t0 + Duration::from_millis(200);
        assert!(l.check(&peer, Some("/limited/x"), t1).is_ok());
        assert!(l.check(&peer, Some("/limited/x"), t1).is_ok());
        assert!(l.check(&peer, Some("/limited/x"), t1).is_err());
    }

    #[test]
    fn per_identity_buckets() {
        let l = limiter("identity");
        let (a, b) = (SpiffeId::parse("spiffe://td/a").unwrap(), SpiffeId::parse("spiffe://td/b").unwrap());
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(l.check(&a, Some("/limited/x"), t0).is_ok());
        }
        assert!(l.check(&a, Some("/limited/x"), t0).is_err());
        assert!(l.check(&b, Some("/limited/x"), t0).is_ok(), "b has its own bucket");
    }
}
