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

/// Loads the file once; used at start-up, where an invalid file is fatal.
pub fn load(path: &std::path::Path) -> Result<(String, MeshConfig), ConfigErrors> {
    let cfg = weft_config::load(path)?;
    Ok((std::fs::read_to_string(path).unwrap_or_default(), cfg))
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
