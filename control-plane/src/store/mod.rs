//! Where the control plane keeps what must survive a restart: join tokens
//! (hash, SPIFFE ID, expiry, used flag). Behind a trait so that an etcd store
//! can serve several replicas; the embedded default is [`file::FileStore`].

pub mod file;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// A join token as stored: never the token itself, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Hex SHA-256 of the token.
    pub hash: String,
    pub spiffe_id: String,
    /// Expiry, seconds since the Unix epoch.
    pub expires_at: i64,
    /// Set once the token has been exchanged for an SVID.
    pub used: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unknown join token")]
    UnknownToken,
    #[error("join token expired")]
    ExpiredToken,
    #[error("join token was already used")]
    UsedToken,
    #[error("store {path}: {reason}")]
    Backend { path: String, reason: String },
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn put_token(&self, rec: TokenRecord) -> Result<(), StoreError>;
    /// Marks the token used and returns it, atomically: two concurrent calls
    /// with one token cannot both succeed. An expired or used token is refused
    /// and stays as it is.
    async fn consume_token(&self, hash: &str, now: i64) -> Result<TokenRecord, StoreError>;
}
