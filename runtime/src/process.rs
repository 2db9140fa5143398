//! A child weft process, as `weft up` and the end-to-end tests run them:
//! output to a log file, ready when its admin endpoint's `/ready` answers
//! 200, stopped with SIGTERM (drain) and then SIGKILL after a timeout, and
//! killed if dropped while still running.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

/// How often exits and readiness are polled.
const POLL: Duration = Duration::from_millis(20);

/// Why a child process could not be started or did not become ready.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start {}: {source}", program.display())]
    Spawn { program: PathBuf, source: std::io::Error },
    #[error("cannot open the log file {}: {source}", path.display())]
    Log { path: PathBuf, source: std::io::Error },
    #[error("{name} exited during start-up ({status}); see {}", log.display())]
    Exited { name: String, status: ExitStatus, log: PathBuf },
    #[error("{name} not ready after {after:?} (its /ready did not answer 200); see {}", log.display())]
    NotReady { name: String, after: Duration, log: PathBuf },
}

/// A running (or exited, not yet dropped) child process.
#[derive(Debug)]
pub struct Process {
    name: String,
    log: PathBuf,
    child: Child,
    status: Option<ExitStatus>,
}

impl Process {
    /// Starts `cmd` (program, arguments and environment as the caller set
    /// them) with stdin from /dev/null and stdout and stderr appended to `log`.
    /// `name` identifies it in errors (e.g. `"backend-proxy"`).
    ///
    /// # Errors
    /// The log file cannot be opened, or the program cannot be started.
    pub fn spawn(name: impl Into<String>, mut cmd: Command, log: impl Into<PathBuf>) -> Result<Self, ProcessError> {
        let log = log.into();
        let log_err = |source| ProcessError::Log { path: log.clone(), source };
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).map_err(log_err)?;
        let err = out.try_clone().map_err(log_err)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| ProcessError::Spawn { program: PathBuf::from(cmd.get_program()), source })?;
        Ok(Self { name: name.into(), log, child, status: None })
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The OS process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log file's path.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// What the process has written so far (empty if the log cannot be read).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit status once the process has exited; `None` while it runs.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Whether the process has not exited yet.
    pub fn running(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// Sends SIGTERM (weft daemons drain, then exit).
    pub fn send_term(&mut self) {
        if self.running() {
            if let Some(pid) = Pid::from_raw(self.child.id() as i32) {
                let _ = kill_process(pid, Signal::TERM);
            }
        }
    }

    /// SIGKILL and reap; nothing gets a chance to clean up.
    pub fn kill(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit, blocking the
    /// thread. `None` if it still runs (it is not killed).
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.send_term();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exit_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Resolves with the exit status when the process exits.
    pub async fn exited(&mut self) -> ExitStatus {
        loop {
            if let Some(s) = self.exit_status() {
                return s;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the process exits or `deadline` passes, then kills it if
    /// it still runs. The exit status if it exited by itself.
    pub async fn wait_or_kill(&mut self, deadline: Instant) -> Option<ExitStatus> {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.exited()).await {
            Ok(s) => Some(s),
            Err(_) => {
                tracing::warn!(name = %self.name, "did not stop in time; killing");
                self.kill();
                None
            }
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `timeout`.
    pub async fn stop(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.send_term();
        self.wait_or_kill(Instant::now() + timeout).await
    }

    /// Waits until `GET http://<admin>/ready` answers 200.
    ///
    /// # Errors
    /// [`ProcessError::Exited`] if the process exits first,
    /// [`ProcessError::NotReady`] after `timeout`.
    pub async fn wait_ready(&mut self, admin: SocketAddr, timeout: Duration) -> Result<(), ProcessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if ready(admin).await {
                return Ok(());
            }
            if let Some(status) = self.exit_status() {
                return Err(ProcessError::Exited { name: self.name.clone(), status, log: self.log.clone() });
            }
            if Instant::now() >= deadline {
                return Err(ProcessError::NotReady { name: self.name.clone(), after: timeout, log: self.log.clone() });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Stops every process: SIGTERM to all at once, then waits for them within
/// one shared `timeout`, killing whichever is still running after it.
pub async fn stop_all(procs: &mut [Process], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    for p in procs.iter_mut() {
        p.send_term();
    }
    for p in procs.iter_mut() {
        p.wait_or_kill(deadline).await;
    }
}

/// Whether `GET /ready` on `admin` answers 200 (each step bounded, so a
/// process that accepts but never answers does not stall the caller).
async fn ready(admin: SocketAddr) -> bool {
    const STEP: Duration = Duration::from_secs(2);
    let get = async {
        let tcp = tokio::net::TcpStream::connect(admin).await.ok()?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.ok()?;
        tokio::spawn(conn);
        let req = http::Request::get("/ready")
            .header(http::header::HOST, admin.to_string())
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .ok()?;
        Some(send.send_request(req).await.ok()?.status())
    };
    matches!(tokio::time::timeout(STEP, get).await, Ok(Some(http::StatusCode::OK)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn output_goes_to_the_log_and_the_exit_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let mut p =
            Process::spawn("echo", sh("echo hello; echo oops >&2; exit 3"), dir.path().join("echo.log")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while p.running() {
            assert!(Instant::now() < deadline, "sh did not exit");
            std::thread::sleep(POLL);
        }
        assert_eq!(p.exit_status().unwrap().code(), Some(3));
        assert_eq!(p.log_text(), "hello\noops\n");
    }

    #[test]
    fn a_missing_program_is_a_spawn_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = Process::spawn("x", Command::new("/nonexistent/weft-x"), dir.path().join("x.log")).unwrap_err();
        assert!(matches!(err, ProcessError::Spawn { .. }) && err.to_string().contains("/nonexistent/weft-x"), "{err}");
    }

    #[tokio::test]
    async fn stop_sends_sigterm_first_and_kills_a_process_that_ignores_it() {
        let dir = tempfile::tempdir().unwrap();
        // Exits 0 on SIGTERM.
        let mut polite =
            Process::spawn("polite", sh("trap 'exit 0' TERM; while :; do sleep 0.05; done"), dir.path().join("p.log"))
                .unwrap();
        // Ignores SIGTERM.
        let mut stubborn =
            Process::spawn("stubborn", sh("trap '' TERM; while :; do sleep 0.05; done"), dir.path().join("s.log"))
                .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await; // let the traps be set
        let status = polite.stop(Duration::from_secs(5)).await.expect("exits on SIGTERM");
        assert!(status.success(), "{status}");
        let started = Instant::now();
        assert!(stubborn.stop(Duration::from_millis(300)).await.is_none(), "ignored SIGTERM yet exited by itself");
        assert!(!stubborn.running());
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn wait_ready_reports_an_exit_during_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Process::spawn("crasher", sh("echo 'bad flag'; exit 2"), dir.path().join("c.log")).unwrap();
        let admin = crate::ports::pick_loopback_addr(|_| true).unwrap();
        let err = p.wait_ready(admin, Duration::from_secs(10)).await.unwrap_err();
        assert!(matches!(err, ProcessError::Exited { .. }), "{err}");
        assert!(err.to_string().contains("crasher exited") && err.to_string().contains("c.log"), "{err}");
    }

    #[tokio::test]
    async fn wait_ready_waits_for_200_on_ready() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let mut p = Process::spawn("sleeper", sh("sleep 30"), dir.path().join("r.log")).unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = l.local_addr().unwrap();
        // Not ready twice, then ready.
        tokio::spawn(async move {
            for status in ["503 Service Unavailable", "503 Service Unavailable", "200 OK"].into_iter().cycle() {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let resp = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        p.wait_ready(admin, Duration::from_secs(10)).await.unwrap();
        let err = Process::spawn("sleeper2", sh("sleep 30"), dir.path().join("r2.log"))
            .unwrap()
            .wait_ready(crate::ports::pick_loopback_addr(|_| true).unwrap(), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, ProcessError::NotReady { .. }), "{err}");
        drop(p); // killed on drop
    }
}
