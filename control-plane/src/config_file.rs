//! The mesh config file (`--config`): loaded at start, then polled. A valid change is
//! pushed to every sidecar (a new snapshot version); an invalid one is
//! rejected as a whole, logged, counted and shown by `weft status`, while the
//! last good config keeps serving.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use weft_config::{ConfigErrors, MeshConfig};

use crate::metrics::Metrics;
use crate::registry::Registry;

const POLL: Duration = Duration::from_millis(500);
/// Editors replace files by rename; a file briefly missing is not an error.
const MISSING_POLLS_BEFORE_ERROR: u32 = 4;

/// The config as the JSON the registry serves in snapshots.
pub fn to_json(cfg: &MeshConfig) -> String {
    serde_json::to_string(cfg).expect("validated config serializes")
}

/// Why the config file could not be used at start-up.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read (missing, a directory, no permission): not a
    /// config problem, so it is not reported as a rejected config.
    #[error("cannot read config file {}: {} (pass --config with an existing file)", path.display(), io_reason(source))]
    Read { path: PathBuf, source: std::io::Error },
    /// The file was read and is not a valid mesh config.
    #[error("{}: {errors}", path.display())]
    Invalid { path: PathBuf, errors: ConfigErrors },
}

/// An I/O error's reason without Rust's " (os error N)" suffix, which tells an
/// operator nothing: `No such file or directory`.
pub fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}

/// Loads the file once; used at start-up, where an unreadable or invalid file
/// is fatal. Returns the text (to notice later edits) and the config.
pub fn load(path: &std::path::Path) -> Result<(String, MeshConfig), LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read { path: path.into(), source })?;
    let cfg = weft_config::parse(&text).map_err(|errors| LoadError::Invalid { path: path.into(), errors })?;
    Ok((text, cfg))
}

/// Polls the file every 500ms for changes, forever.
pub async fn poll(path: PathBuf, mut last_text: String, registry: Arc<Registry>, metrics: Arc<Metrics>) {
    let mut missing = 0;
    loop {
        tokio::time::sleep(POLL).await;
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => {
                if missing >= MISSING_POLLS_BEFORE_ERROR {
                    // The file is back: judge it afresh, even if unchanged, so
                    // the "missing" rejection does not linger.
                    last_text.clear();
                }
                missing = 0;
                t
            }
            Err(e) => {
                missing += 1;
                if missing == MISSING_POLLS_BEFORE_ERROR {
                    let msg = format!("{}: {e}; keeping the last good config", path.display());
                    tracing::error!("{msg}");
                    metrics.config_reload("rejected");
                    registry.set_config_error(msg);
                }
                continue;
            }
        };
        if text == last_text {
            continue;
        }
        last_text = text.clone();
        match weft_config::parse(&text) {
            Ok(cfg) => {
                registry.set_mesh_config(to_json(&cfg));
                metrics.config_reload("applied");
                tracing::info!(path = %path.display(), "mesh config reloaded");
            }
            Err(errs) => {
                metrics.config_reload("rejected");
                tracing::error!(path = %path.display(), "{errs}; keeping the last good config");
                registry.set_config_error(errs.to_string());
            }
        }
    }
}
