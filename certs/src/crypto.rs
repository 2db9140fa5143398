//! The one cryptography provider of weft's TLS: rustls with *ring*. Its own
//! module so the resolver, the verifiers and the configs all depend on it,
//! and not on each other.

use rustls::crypto::CryptoProvider;

/// rustls' *ring* provider (key loading, signature verification, TLS 1.3 suites).
pub fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}
