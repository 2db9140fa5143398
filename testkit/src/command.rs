//! Running a command to completion with a time limit, for tests of the
//! binaries' exit status and output.

use std::process::{Command, ExitStatus, Stdio};
use std::time::Instant;

use crate::control_plane::CALL_TIMEOUT;

/// What a finished process printed.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    /// Standard output as text; empty if it was not valid UTF-8.
    pub stdout: String,
    /// Standard error, likewise.
    pub stderr: String,
}

/// Runs `cmd` (stdin closed) to completion and captures its output; kills it
/// and panics with its stderr if it runs longer than [`CALL_TIMEOUT`].
pub fn run(cmd: &mut Command) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let deadline = Instant::now() + CALL_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still running after {CALL_TIMEOUT:?}; stderr:\n{}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    Output {
        status,
        stdout: std::fs::read_to_string(&out).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err).unwrap_or_default(),
    }
}
