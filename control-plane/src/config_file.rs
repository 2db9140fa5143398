//! The mesh config file (`--config`): loaded at start, then watched. A valid
//! change is pushed to every sidecar (a new snapshot version); an invalid one
//! is rejected as a whole, logged, counted and shown by `weft status`, while
//! the last good config keeps serving.
//!
//! Changes are noticed by change notification (inotify on Linux, through the
//! `notify` crate) on the file's directory, so that an editor's or a config
//! management tool's rename over the file is seen; the file is also read
//! every [`FALLBACK_POLL`] in case notifications are lost or unsupported
//! (network file systems), and every [`POLL`] when no watch could be set up.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use weft_config::{ConfigErrors, MeshConfig};

use crate::metrics::Metrics;
use crate::registry::Registry;

/// The poll interval without change notification.
pub const POLL: Duration = Duration::from_millis(500);
/// The poll interval beside change notification, a safety net.
pub const FALLBACK_POLL: Duration = Duration::from_secs(5);
/// After a notification, how long the file must stay quiet (no further
/// event, and the same contents read twice this far apart) before it is
/// judged: an editor or `cat >` writing in place fires on the first bytes,
/// and a file cut at a `---` is still valid YAML that would silently drop
/// every later document (an AuthorizationPolicy, say) until the next read.
const SETTLE: Duration = Duration::from_millis(50);
/// The longest a file that keeps changing is waited for before it is read
/// as it stands (a writer appending for longer is judged, then re-read).
const SETTLE_MAX: Duration = Duration::from_secs(2);
/// Editors replace files by rename; a file missing for less than this is not an error.
const MISSING_GRACE: Duration = Duration::from_secs(2);

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

/// Watches the file's directory; the returned watcher must be kept (dropping
/// it ends the notifications). `None` when the platform refuses a watch.
fn watch_dir(path: &Path, wake: Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let name = path.file_name()?.to_os_string();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let handler = move |res: notify::Result<notify::Event>| {
        // Any event for the file (or an error, to be safe) means: read it.
        if res.map(|e| e.paths.iter().any(|p| p.file_name() == Some(&name))).unwrap_or(true) {
            wake.notify_one();
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "no change notification for the config file; polling every {POLL:?}");
            return None;
        }
    };
    if let Err(e) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the config file's directory; polling every {POLL:?}");
        return None;
    }
    Some(watcher)
}

/// Waits until no change notification has come for [`SETTLE`] (at most
/// [`SETTLE_MAX`]).
async fn settle(wake: &Notify) {
    let deadline = tokio::time::Instant::now() + SETTLE_MAX;
    while tokio::time::timeout(SETTLE, wake.notified()).await.is_ok() && tokio::time::Instant::now() < deadline {}
}

/// The file's contents once two reads [`SETTLE`] apart agree (at most
/// [`SETTLE_MAX`]), so a write in progress is not judged half done.
async fn read_settled(path: &Path) -> std::io::Result<String> {
    let deadline = tokio::time::Instant::now() + SETTLE_MAX;
    let mut text = tokio::fs::read_to_string(path).await?;
    loop {
        tokio::time::sleep(SETTLE).await;
        let again = tokio::fs::read_to_string(path).await?;
        if again == text || tokio::time::Instant::now() >= deadline {
            return Ok(again);
        }
        text = again;
    }
}

/// Watches the file for changes, forever: on change notification, and by
/// polling as a fallback (see the module docs).
pub async fn poll(path: PathBuf, mut last_text: String, registry: Arc<Registry>, metrics: Arc<Metrics>) {
    let wake = Arc::new(Notify::new());
    let watcher = watch_dir(&path, wake.clone());
    let interval = if watcher.is_some() { FALLBACK_POLL } else { POLL };
    let mut missing_since: Option<tokio::time::Instant> = None;
    let mut reported_missing = false;
    loop {
        // While the file is missing, look often enough to report it in time.
        let wait = if missing_since.is_some() { POLL } else { interval };
        tokio::select! {
            _ = wake.notified() => settle(&wake).await,
            _ = tokio::time::sleep(wait) => {}
        }
        let text = match read_settled(&path).await {
            Ok(t) => {
                if reported_missing {
                    // The file is back: judge it afresh, even if unchanged, so
                    // the "missing" rejection does not linger.
                    last_text.clear();
                }
                missing_since = None;
                reported_missing = false;
                t
            }
            Err(e) => {
                let since = *missing_since.get_or_insert_with(tokio::time::Instant::now);
                if !reported_missing && since.elapsed() >= MISSING_GRACE {
                    reported_missing = true;
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
