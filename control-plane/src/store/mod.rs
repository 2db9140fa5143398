//! Where the control plane keeps what must survive a restart: join tokens
//! (hash, SPIFFE ID, expiry, used flag). Behind a trait so that an etcd store
//! can serve several replicas; the embedded default is [`file::FileStore`],
//! the shared one [`etcd::EtcdStore`] (`--store etcd://...`).

pub mod etcd;
pub mod file;
pub mod health;
pub mod url;

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
    /// The store did not answer (etcd down or out of quorum): writes wait
    /// until it is back; what is in memory keeps serving.
    #[error("store {endpoints} is unreachable ({reason}); try again when it is back")]
    Unavailable { endpoints: String, reason: String },
    /// A compare-and-swap lost: the value changed since `expected`.
    #[error(
        "the stored mesh config is at revision {actual}, not {expected}: fetch it again (weft get config) and re-apply"
    )]
    Conflict { expected: i64, actual: i64 },
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn put_token(&self, rec: TokenRecord) -> Result<(), StoreError>;
    /// Marks the token used and returns it, atomically: two concurrent calls
    /// with one token cannot both succeed. An expired or used token is refused
    /// and stays as it is.
    async fn consume_token(&self, hash: &str, now: i64) -> Result<TokenRecord, StoreError>;
}
