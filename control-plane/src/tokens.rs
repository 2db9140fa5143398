//! Join tokens: random, shown once, stored only as a SHA-256 hash.

use rand::RngCore;
use sha2::{Digest, Sha256};

const PREFIX: &str = "weft-jt-";

/// A new token with 256 bits of randomness.
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{PREFIX}{}", hex::encode(bytes))
}

/// The form the store keeps.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_are_unique_and_hash_stably() {
        let a = super::generate();
        let b = super::generate();
        assert_ne!(a, b);
        assert!(a.starts_with("weft-jt-") && a.len() == 8 + 64);
        assert_eq!(super::hash(&a), super::hash(&format!("{a}\n")));
        assert_ne!(super::hash(&a), super::hash(&b));
    }
}
