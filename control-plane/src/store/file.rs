//! The embedded store: one JSON file in the state directory, rewritten
//! atomically (write to a temp file, fsync, rename) on every change.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::{Store, StoreError, TokenRecord};

const FILE_NAME: &str = "store.json";
/// Used and expired tokens are kept this long (so "already used" can be told
/// apart from "unknown"), then pruned.
const KEEP_SPENT_SECS: i64 = 7 * 86400;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Contents {
    tokens: Vec<TokenRecord>,
}

pub struct FileStore {
    path: PathBuf,
    contents: Mutex<Contents>,
}

impl FileStore {
    /// Opens (or creates) the store in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let backend = |path: &Path, reason: String| StoreError::Backend { path: path.display().to_string(), reason };
        std::fs::create_dir_all(state_dir).map_err(|e| backend(state_dir, e.to_string()))?;
        let path = state_dir.join(FILE_NAME);
        let contents = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| backend(&path, format!("corrupt store file: {e}")))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Contents::default(),
            Err(e) => return Err(backend(&path, e.to_string())),
        };
        Ok(Self { path, contents: Mutex::new(contents) })
    }

    fn save(&self, contents: &Contents) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(contents).expect("store contents serialize");
        weft_certs::pki::write_file(&self.path, &bytes, true)
            .map_err(|e| StoreError::Backend { path: self.path.display().to_string(), reason: e.to_string() })
    }
}

#[async_trait]
impl Store for FileStore {
    async fn put_token(&self, rec: TokenRecord) -> Result<(), StoreError> {
        let mut c = self.contents.lock().await;
        let now = rec.expires_at.min(weft_certs::svid::unix_secs(std::time::SystemTime::now()));
        c.tokens.retain(|t| t.expires_at + KEEP_SPENT_SECS > now);
        c.tokens.push(rec);
        self.save(&c)
    }

    async fn consume_token(&self, hash: &str, now: i64) -> Result<TokenRecord, StoreError> {
        let mut c = self.contents.lock().await;
        let rec = c.tokens.iter_mut().find(|t| t.hash == hash).ok_or(StoreError::UnknownToken)?;
        if rec.used {
            return Err(StoreError::UsedToken);
        }
        if rec.expires_at <= now {
            return Err(StoreError::ExpiredToken);
        }
        rec.used = true;
        let out = rec.clone();
        if let Err(e) = self.save(&c) {
            // Not persisted: do not hand out an SVID for it either.
            if let Some(r) = c.tokens.iter_mut().find(|t| t.hash == hash) {
                r.used = false;
            }
            return Err(e);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(hash: &str, expires_at: i64) -> TokenRecord {
        TokenRecord { hash: hash.into(), spiffe_id: "spiffe://td/a".into(), expires_at, used: false }
    }

    #[tokio::test]
    async fn tokens_are_single_use_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let now = weft_certs::svid::unix_secs(std::time::SystemTime::now());
        {
            let s = FileStore::open(dir.path()).unwrap();
            s.put_token(rec("a", now + 60)).await.unwrap();
            s.put_token(rec("b", now - 1)).await.unwrap();
            s.put_token(rec("c", now + 60)).await.unwrap();
            assert_eq!(s.consume_token("a", now).await.unwrap().spiffe_id, "spiffe://td/a");
            assert!(matches!(s.consume_token("a", now).await, Err(StoreError::UsedToken)));
            assert!(matches!(s.consume_token("b", now).await, Err(StoreError::ExpiredToken)));
            assert!(matches!(s.consume_token("zz", now).await, Err(StoreError::UnknownToken)));
        }
        let s = FileStore::open(dir.path()).unwrap();
        assert!(matches!(s.consume_token("a", now).await, Err(StoreError::UsedToken)));
        assert!(s.consume_token("c", now).await.is_ok());
        let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        assert!(!text.contains("token\":"), "only hashes are stored");
    }

    #[test]
    fn corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"{not json").unwrap();
        let err = FileStore::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("store.json") && err.contains("corrupt"), "{err}");
    }
}
