//! "Hosts" for multi-host tests: network namespaces made by the test, each
//! with `eth0` on one bridge (in a namespace of its own) and an address of
//! the test's own subnet, running real processes. Needs root and `ip`;
//! [`unsupported`] says why not, so a test can skip with that message.
//! Dropping the [`Lab`] kills its processes and removes its namespaces, even
//! when the test fails; names carry the test process's ID so parallel runs
//! do not collide.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Why namespaces cannot be used here (not root, a missing tool), if so.
pub fn unsupported(tools: &[&str]) -> Option<String> {
    if effective_uid() != 0 {
        return Some("not root (network namespaces need uid 0)".into());
    }
    for tool in std::iter::once(&"ip").chain(tools) {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output();
        if !found.is_ok_and(|o| o.status.success()) {
            return Some(format!("{tool} is not installed"));
        }
    }
    let probe = format!("weft-probe-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
    let ok = Command::new("ip").args(["netns", "add", &probe]).output().is_ok_and(|o| o.status.success());
    let _ = Command::new("ip").args(["netns", "del", &probe]).output();
    (!ok).then(|| "cannot create a network namespace (ip netns add failed)".into())
}

/// The process's effective UID, read from `/proc/self/status` (no libc here).
pub fn effective_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .unwrap_or(u32::MAX)
}

/// Runs `cmd`, panicking if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// Runs `cmd`, panicking with its output unless it succeeds; its stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The namespaces ("hosts") of one test on one bridge, and their processes.
pub struct Lab {
    prefix: String,
    /// `a.b.c` of the hosts' `a.b.c.N/24` addresses.
    subnet: String,
    pub dir: tempfile::TempDir,
    namespaces: Vec<String>,
    procs: Vec<(String, Child)>,
}

impl Lab {
    /// A bridge `br0` in namespace `br`; hosts get `subnet.N/24`.
    pub fn new(test: &str, subnet: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("weft-{}-{n}-{test}", std::process::id());
        let dir = tempfile::tempdir().expect("tempdir");
        let mut lab = Self { prefix, subnet: subnet.into(), dir, namespaces: Vec::new(), procs: Vec::new() };
        let br = lab.add_ns("br");
        ok(Command::new("ip").args(["-n", &br, "link", "add", "br0", "type", "bridge"]));
        ok(Command::new("ip").args(["-n", &br, "link", "set", "br0", "up"]));
        lab
    }

    /// The namespace name of `host`.
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    fn add_ns(&mut self, host: &str) -> String {
        let ns = self.ns(host);
        ok(Command::new("ip").args(["netns", "add", &ns]));
        self.namespaces.push(ns.clone());
        ok(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]));
        ns
    }

    /// `subnet.n`.
    pub fn ip(&self, n: u8) -> String {
        format!("{}.{n}", self.subnet)
    }

    /// A host: a namespace with `eth0` at `subnet.n/24`, its veth peer
    /// `v<n>` on the bridge.
    pub fn host(&mut self, host: &str, n: u8) {
        let ns = self.add_ns(host);
        let br = self.ns("br");
        let peer = format!("v{n}");
        ok(Command::new("ip")
            .args(["-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &peer, "netns", &br]));
        ok(Command::new("ip").args(["-n", &br, "link", "set", &peer, "master", "br0", "up"]));
        ok(Command::new("ip").args(["-n", &ns, "addr", "add", &format!("{}/24", self.ip(n)), "dev", "eth0"]));
        ok(Command::new("ip").args(["-n", &ns, "link", "set", "eth0", "up"]));
    }

    /// Starts `args` on `host` as `name`, logging to `<name>.log` in the lab's dir.
    pub fn spawn(&mut self, host: &str, name: &str, args: &[String]) {
        let log = self.log_path(name);
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(host)]).args(args);
        cmd.stdin(Stdio::null()).stdout(file.try_clone().expect("log")).stderr(file);
        cmd.env("RUST_LOG", std::env::var("WEFT_TEST_LOG").unwrap_or_else(|_| "info".into()));
        no_proxy(&mut cmd);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        self.procs.push((name.to_string(), child));
    }

    /// SIGKILLs process `name` (`ip netns exec` execs the program itself,
    /// so this is the program) and waits for it.
    pub fn kill(&mut self, name: &str) {
        let (_, child) = self.procs.iter_mut().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no process {name}"));
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Sends SIGINT to process `name` (tcpdump then writes out and exits) and waits up to 5 s.
    pub fn interrupt(&mut self, name: &str) {
        let (_, child) = self.procs.iter_mut().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no process {name}"));
        let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).output();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `args` on `host` and waits for it.
    pub fn exec(&self, host: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(host)]).args(args);
        no_proxy(&mut cmd);
        run(&mut cmd)
    }

    /// `curl` on `host`: (exit code, stdout and stderr).
    pub fn curl(&self, host: &str, extra: &[&str], url: &str) -> (i32, String) {
        let mut args = vec!["curl", "-sS", "--noproxy", "*", "--max-time", "10"];
        args.extend_from_slice(extra);
        args.push(url);
        let out = self.exec(host, &args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (out.status.code().unwrap_or(-1), text)
    }

    /// Writes `text` to `name` in the lab's dir.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// The log of process `name`.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// The last 20 lines of every process's log.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for (name, _) in &self.procs {
            let text = self.log(name);
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            all += &format!("--- {name}\n{}\n", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        all
    }

    /// Waits until `check` holds, or panics with `what` and the logs.
    pub fn wait(&self, what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The lab's directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

fn no_proxy(cmd: &mut Command) {
    for v in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"] {
        cmd.env_remove(v);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, child) in &mut self.procs {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A Python HTTP/1.1 app for namespace tests: `python3 app.py NAME PORT [BIND]`
/// answers every GET with `NAME PATH peer=<x-weft-peer-id or ->`, listening
/// on BIND (default `0.0.0.0`).
pub const HTTP_APP: &str = r#"
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
name, port = sys.argv[1], int(sys.argv[2])
bind = sys.argv[3] if len(sys.argv) > 3 else "0.0.0.0"
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = f"{name} {self.path} peer={self.headers.get('x-weft-peer-id', '-')}\n".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
ThreadingHTTPServer((bind, port), H).serve_forever()
"#;
