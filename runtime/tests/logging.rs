//! Logging and fatal errors as an operator sees them: the test runs itself
//! again as a child process whose stderr is a file (not a terminal), as it is
//! under systemd, `weft up` or a log collector.

use std::process::{Command, Stdio};

const CHILD: &str = "WEFT_RUNTIME_LOG_CHILD";
const FATAL: &str = "cannot listen on 127.0.0.1:1: permission denied";

/// Runs `test` of this binary in a child with `CHILD=<mode>`; its stderr.
fn child_stderr(test: &str, mode: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stderr");
    let status = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, mode)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&path).unwrap())
        .status()
        .unwrap();
    assert!(status.success(), "child failed: {status}");
    std::fs::read_to_string(&path).unwrap()
}

/// In the child: log a line and end with a fatal error, as a daemon would.
fn act_as_daemon(format: &str) {
    weft_runtime::init_logging(format);
    tracing::info!(listener = "inbound", "listening");
    tracing::warn!("something to look at");
    let code = weft_runtime::exit_code(Err::<(), _>(std::io::Error::other(FATAL)));
    assert_eq!(code, std::process::ExitCode::FAILURE);
}

#[test]
fn human_logs_to_a_file_have_no_colour_codes_and_the_fatal_error_once() {
    if let Ok(mode) = std::env::var(CHILD) {
        return act_as_daemon(&mode);
    }
    let err = child_stderr("human_logs_to_a_file_have_no_colour_codes_and_the_fatal_error_once", "human");
    assert!(err.contains("listening") && err.contains("something to look at"), "{err}");
    assert!(!err.contains("\x1b["), "ANSI escape codes in a log file: {err:?}");
    assert_eq!(err.matches(FATAL).count(), 1, "the fatal error must be reported once: {err}");
    assert!(err.contains(&format!("error: {FATAL}")), "{err}");
}

#[test]
fn json_logs_stay_json_including_the_fatal_error() {
    if let Ok(mode) = std::env::var(CHILD) {
        return act_as_daemon(&mode);
    }
    let err = child_stderr("json_logs_stay_json_including_the_fatal_error", "json");
    assert!(!err.contains("\x1b["), "ANSI escape codes in a log file: {err:?}");
    assert_eq!(err.matches(FATAL).count(), 1, "the fatal error must be reported once: {err}");
    // Skip whatever the test harness itself may print; every log line is JSON.
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with('{')).collect();
    assert!(lines.len() >= 3, "{err}");
    assert!(lines.iter().any(|l| l.contains("\"ERROR\"") && l.contains(FATAL)), "{err}");
}
