//! Waiting for the signals that stop a weft daemon.

/// Waits for SIGTERM or Ctrl-C (SIGINT) and names which one came
/// (`"SIGTERM"` or `"interrupted"`, for the shutdown log line).
///
/// # Errors
/// The SIGTERM handler could not be installed (an I/O error from the OS).
pub async fn shutdown_signal() -> std::io::Result<&'static str> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    Ok(tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = term.recv() => "SIGTERM",
    })
}
