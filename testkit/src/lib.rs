//! Support for weft's end-to-end tests: the real binaries as child processes
//! (killed on drop), free loopback ports, a control plane with fresh PKI,
//! sidecars, and small real servers (HTTP, gRPC echo, TCP echo).

pub mod command;
pub mod control_plane;
pub mod etcd;
pub mod mesh;
pub mod netns;
pub mod servers;

pub use command::{run, Output};
pub use control_plane::{client_tls, svid_from, within, Pki, CALL_TIMEOUT};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Path of a workspace binary next to the running test (target/<profile>/,
/// the parent of a test's deps/ dir) or next to the running binary itself
/// (e.g. target/release/weft-load).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let own_dir = exe.parent().expect("executable has a directory");
    let candidates: Vec<PathBuf> =
        [own_dir.parent(), Some(own_dir)].into_iter().flatten().map(|d| d.join(name)).collect();
    candidates.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| {
        panic!("{name} not found in {candidates:?}: build the binaries first (cargo build --workspace --bins)")
    })
}

/// A free loopback address for a child process to listen on: outside the
/// ephemeral range (see [`weft_runtime::ports`]) and claimed across the test
/// processes nextest runs side by side, so no two tests are handed one port.
pub fn free_addr() -> SocketAddr {
    weft_runtime::ports::pick_loopback_addr(claim_port).expect("a free loopback port")
}

/// Claims `port` for this test run with a file under the temp dir, created
/// exclusively; claims older than [`CLAIM_TTL`] are left-overs of finished runs.
fn claim_port(port: u16) -> bool {
    const CLAIM_TTL: Duration = Duration::from_secs(30 * 60);
    let dir = std::env::temp_dir().join("weft-test-ports");
    if std::fs::create_dir_all(&dir).is_err() {
        return true;
    }
    let path = dir.join(port.to_string());
    let create = || std::fs::OpenOptions::new().write(true).create_new(true).open(&path).is_ok();
    if create() {
        return true;
    }
    let stale = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .map(|t| t.elapsed().unwrap_or_default() > CLAIM_TTL)
        .unwrap_or(false);
    stale && std::fs::remove_file(&path).is_ok() && create()
}

/// A child process that is killed when dropped; its output goes to a log
/// file. weft-runtime's [`Process`](weft_runtime::process::Process) (SIGTERM,
/// exits, logs), started the tests' way.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    process: weft_runtime::process::Process,
}

impl Proc {
    /// Starts `program` with `RUST_LOG` from `WEFT_TEST_LOG` (default `info`),
    /// logging to `<log_dir>/<name>.log`; panics if it cannot start.
    pub fn spawn(name: &str, program: &Path, args: &[String], log_dir: &Path) -> Self {
        let log = log_dir.join(format!("{name}.log"));
        let mut cmd = Command::new(program);
        cmd.args(args).env("RUST_LOG", std::env::var("WEFT_TEST_LOG").unwrap_or_else(|_| "info".into()));
        let process = weft_runtime::process::Process::spawn(name, cmd, &log).unwrap_or_else(|e| panic!("{e}"));
        Self { name: name.into(), log, process }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.process.terminate(timeout)
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.process.running()
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }
}

/// GETs `http://addr/path` with a plain HTTP/1.1 client; (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_get_host(addr, &addr.to_string(), path).await
}

/// How long a started process (control plane, sidecar) may take to answer
/// `/ready`: 20 s (a debug build on a busy CI machine), or
/// `WEFT_TEST_READY_TIMEOUT` seconds, which `benches/callgrind-pair.sh` sets
/// for processes under valgrind. Panics on a value that is not a whole
/// number of seconds above 0.
pub fn ready_timeout() -> Duration {
    ready_timeout_from(std::env::var("WEFT_TEST_READY_TIMEOUT").ok().as_deref())
}

fn ready_timeout_from(value: Option<&str>) -> Duration {
    match value.map(|v| (v, v.trim().parse::<u64>())) {
        None => Duration::from_secs(20),
        Some((_, Ok(secs))) if secs > 0 => Duration::from_secs(secs),
        Some((v, _)) => panic!("WEFT_TEST_READY_TIMEOUT={v:?}: give whole seconds above 0 (default 20)"),
    }
}

/// Polls `http://addr/path` until it answers 200, or panics after `timeout`
/// with the process log to explain why.
pub async fn wait_ok(addr: SocketAddr, path: &str, timeout: Duration, proc_: Option<&Proc>) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok((200, _)) = http_get(addr, path).await {
            return;
        }
        if Instant::now() > deadline {
            let log = proc_.map(|p| p.log_text()).unwrap_or_default();
            panic!("http://{addr}{path} not OK after {timeout:?}; log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A running control plane: its log (and, from [`ControlPlane::start`], its PKI
/// and state) in a temp dir. More of it (start-up on a given PKI, gRPC
/// clients) is in [`control_plane`].
pub struct ControlPlane {
    pub dir: tempfile::TempDir,
    pub pki: PathBuf,
    pub state: PathBuf,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub extra_args: Vec<String>,
    pub proc_: Proc,
}

impl ControlPlane {
    /// `weft certs init` + `weft-control-plane`, waiting until ready.
    pub async fn start(trust_domain: &str, extra_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = dir.path().join("pki");
        let st = Command::new(bin("weft"))
            .args(["certs", "init", "--trust-domain", trust_domain, "--out"])
            .arg(&pki)
            .output()
            .expect("run weft certs init");
        assert!(st.status.success(), "weft certs init: {}", String::from_utf8_lossy(&st.stderr));
        let state = dir.path().join("cp-state");
        let extra_args = extra_args.iter().map(|s| s.to_string()).collect();
        Self::launch(dir, pki, state, extra_args).await
    }

    fn spawn(dir: &Path, pki: &Path, state: &Path, addr: SocketAddr, admin: SocketAddr, extra: &[String]) -> Proc {
        let mut args = vec![
            "--pki".to_string(),
            pki.display().to_string(),
            "--state-dir".into(),
            state.display().to_string(),
            "--listen".into(),
            addr.to_string(),
            "--admin".into(),
            admin.to_string(),
        ];
        args.extend(extra.iter().cloned());
        Proc::spawn("control-plane", &bin("weft-control-plane"), &args, dir)
    }

    /// Starts the control plane again on the same addresses and state.
    pub async fn restart(&mut self) {
        self.proc_.kill();
        self.proc_ = Self::spawn(self.dir.path(), &self.pki, &self.state, self.addr, self.admin, &self.extra_args);
        wait_ok(self.admin, "/ready", ready_timeout(), Some(&self.proc_)).await;
    }

    /// Starts the control plane again on the same addresses and state and
    /// waits only until its admin port answers (its /ready may say 503, e.g.
    /// while its store is down).
    pub async fn restart_unready(&mut self) {
        self.proc_.kill();
        self.proc_ = Self::spawn(self.dir.path(), &self.pki, &self.state, self.addr, self.admin, &self.extra_args);
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_get(self.admin, "/live").await.is_err() {
            assert!(
                Instant::now() < deadline,
                "control plane not answering on {}; log:\n{}",
                self.admin,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A join token from `weft token create`, written to a file; returns the path.
    pub fn token_file(&self, spiffe_id: &str) -> PathBuf {
        let out = Command::new(bin("weft"))
            .args(["token", "create", "--spiffe-id", spiffe_id, "--ttl", "10m", "--control-plane"])
            .arg(self.addr.to_string())
            .arg("--pki")
            .arg(&self.pki)
            .output()
            .expect("run weft token create");
        assert!(out.status.success(), "weft token create: {}", String::from_utf8_lossy(&out.stderr));
        let token = String::from_utf8(out.stdout).expect("utf8 token");
        let name = spiffe_id.rsplit('/').next().unwrap_or("token");
        let path = self.dir.path().join(format!("{name}-{}.token", free_addr().port()));
        std::fs::write(&path, token.trim()).expect("write token");
        path
    }

    pub fn trust_bundle(&self) -> PathBuf {
        self.pki.join("trust-bundle.pem")
    }
}

/// A running `weft-proxy`.
pub struct Sidecar {
    pub service: String,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    pub upstreams: Vec<(String, SocketAddr)>,
    pub state_dir: PathBuf,
    pub args: Vec<String>,
    pub proc_: Proc,
}

/// What a sidecar fronts.
pub struct SidecarSpec<'a> {
    pub service: &'a str,
    pub app: SocketAddr,
    pub upstreams: &'a [&'a str],
    pub labels: &'a [&'a str],
    pub extra_args: &'a [&'a str],
}

impl<'a> SidecarSpec<'a> {
    /// A plain sidecar for `service` fronting `app`: no upstreams, labels or extra flags.
    pub fn new(service: &'a str, app: SocketAddr) -> Self {
        Self { service, app, upstreams: &[], labels: &[], extra_args: &[] }
    }
}

impl Sidecar {
    /// Attests with a fresh token for `spiffe://<td>/ns/default/sa/<service>` and waits until ready.
    pub async fn start(cp: &ControlPlane, td: &str, spec: SidecarSpec<'_>) -> Self {
        let token = cp.token_file(&format!("spiffe://{td}/ns/default/sa/{}", spec.service));
        let (inbound, outbound, admin) = (free_addr(), free_addr(), free_addr());
        let state_dir = cp.dir.path().join(format!("sidecar-{}-{}", spec.service, admin.port()));
        // `--control-plane` in `extra_args` (several replicas) replaces `cp`'s address.
        let cp_flag = if spec.extra_args.contains(&"--control-plane") {
            vec![]
        } else {
            vec!["--control-plane".to_string(), cp.addr.to_string()]
        };
        let mut args = cp_flag;
        args.extend([
            "--trust-bundle".into(),
            cp.trust_bundle().display().to_string(),
            "--token-file".into(),
            token.display().to_string(),
            "--state-dir".into(),
            state_dir.display().to_string(),
            "--service".into(),
            spec.service.into(),
            "--app".into(),
            spec.app.to_string(),
            "--inbound".into(),
            inbound.to_string(),
            "--outbound".into(),
            outbound.to_string(),
            "--admin".into(),
            admin.to_string(),
        ]);
        let mut upstreams = Vec::new();
        for name in spec.upstreams {
            let addr = free_addr();
            args.extend(["--upstream".into(), format!("{name}={addr}")]);
            upstreams.push((name.to_string(), addr));
        }
        for l in spec.labels {
            args.extend(["--label".into(), l.to_string()]);
        }
        args.extend(spec.extra_args.iter().map(|s| s.to_string()));
        let name = format!("sidecar-{}-{}", spec.service, admin.port());
        let proc_ = Proc::spawn(&name, &bin("weft-proxy"), &args, cp.dir.path());
        wait_ok(admin, "/ready", ready_timeout(), Some(&proc_)).await;
        Self { service: spec.service.into(), inbound, outbound, admin, upstreams, state_dir, args, proc_ }
    }

    pub fn upstream(&self, name: &str) -> SocketAddr {
        self.upstreams.iter().find(|(n, _)| n == name).map(|(_, a)| *a).expect("declared upstream")
    }

    /// The sidecar's /metrics text.
    pub async fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").await.map(|(_, b)| b).unwrap_or_default()
    }

    /// Waits until this sidecar's discovery shows `n` endpoints for `service`.
    pub async fn wait_endpoints(&self, service: &str, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let (_, body) = http_get(self.admin, "/config").await.unwrap_or_default();
            let count = count_endpoints(&body, service);
            if count == n {
                return;
            }
            assert!(Instant::now() < deadline, "{service}: {count} endpoints, want {n}; /config:\n{body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Counts `"address"` entries under `"<service>": [...]` in a /config dump.
fn count_endpoints(config_json: &str, service: &str) -> usize {
    let key = format!("\"{service}\": [");
    let Some(start) = config_json.find(&key) else {
        return 0;
    };
    let rest = &config_json[start + key.len()..];
    let end = rest.find(']').unwrap_or(rest.len());
    rest[..end].matches("\"address\"").count()
}

/// Sums the values of every sample of `metric` whose labels contain all of `labels`.
pub fn metric_sum(text: &str, metric: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// GETs `path` from `addr` with `Host: <host>` over a fresh HTTP/1.1
/// connection; (status, body). For requests routed by a sidecar's outbound.
pub async fn http_get_host(addr: SocketAddr, host: &str, path: &str) -> std::io::Result<(u16, String)> {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", host)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(std::io::Error::other)?;
    let resp = send.send_request(req).await.map_err(std::io::Error::other)?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(std::io::Error::other)?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Polls `/metrics` on `admin` until the sum of `metric` over samples with
/// all of `labels` reaches `at_least`; returns it, or panics after `timeout`.
pub async fn wait_metric(admin: SocketAddr, metric: &str, labels: &[&str], at_least: f64, timeout: Duration) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let text = http_get(admin, "/metrics").await.map(|(_, b)| b).unwrap_or_default();
        let v = metric_sum(&text, metric, labels);
        if v >= at_least {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{metric}{labels:?} = {v}, want >= {at_least} within {timeout:?}; /metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Sidecar {
    /// Starts this sidecar's binary again with the same arguments (after
    /// [`Proc::kill`] or [`Proc::terminate`]), optionally without its join
    /// token, and waits until it is ready.
    pub async fn respawn(&mut self, cp: &ControlPlane, with_token: bool) {
        self.proc_.kill();
        if !with_token {
            if let Some(i) = self.args.iter().position(|a| a == "--token-file") {
                self.args.drain(i..i + 2);
            }
        }
        let name = format!("sidecar-{}-{}", self.service, self.admin.port());
        self.proc_ = Proc::spawn(&name, &bin("weft-proxy"), &self.args, cp.dir.path());
        wait_ok(self.admin, "/ready", ready_timeout(), Some(&self.proc_)).await;
    }
}

/// Peak resident set size (VmHWM) of a process, in KiB, from /proc.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_timeout_is_20_s_unless_the_environment_gives_whole_seconds() {
        assert_eq!(ready_timeout_from(None), Duration::from_secs(20));
        assert_eq!(ready_timeout_from(Some("120")), Duration::from_secs(120));
        assert_eq!(ready_timeout_from(Some(" 5 ")), Duration::from_secs(5));
        for bad in ["0", "", "2.5", "-1", "20s"] {
            let err = std::panic::catch_unwind(|| ready_timeout_from(Some(bad))).expect_err(bad);
            let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(msg.contains("WEFT_TEST_READY_TIMEOUT") && msg.contains("whole seconds"), "{bad:?}: {msg}");
        }
    }
}
