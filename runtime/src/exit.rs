//! How a daemon ends on a fatal error: one message, one exit code.

use std::process::ExitCode;

/// Turns the daemon's result into its exit code, reporting a fatal error
/// (with its causes, `{:#}`) exactly once on stderr: as an `error:` line, or
/// as an ERROR log record when logs are JSON (so stderr stays all JSON).
pub fn exit_code<E: std::fmt::Display>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if crate::logging::is_json() {
                tracing::error!("{e:#}");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}
