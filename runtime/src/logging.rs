//! `tracing` logs on stderr, in the format the operator chose.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

static JSON: AtomicBool = AtomicBool::new(false);

/// Sets up `tracing` logs on stderr: human-readable, or one JSON object per
/// line with `format == "json"`. `RUST_LOG` overrides the default `info`
/// level. Colour (ANSI escapes) only when stderr is a terminal, so log files
/// and collectors get plain text.
///
/// # Panics
/// When a global `tracing` subscriber is already set (call it once, first thing).
pub fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if format == "json" {
        JSON.store(true, Ordering::Relaxed);
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Whether [`init_logging`] set up JSON logs (then stderr carries only JSON lines).
pub fn is_json() -> bool {
    JSON.load(Ordering::Relaxed)
}
