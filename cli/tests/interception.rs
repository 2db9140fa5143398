//! Transparent interception end to end, with real kernel rules: every "pod"
//! is a network namespace made by the test, joined to the others through a
//! bridge (in its own namespace), running its app (which knows nothing of
//! the mesh), its sidecar as UID 1337, and `weft init-iptables`.
//!
//! Needs root, `ip netns`, iptables, tcpdump, setpriv, curl and python3
//! (grpcio for the gRPC case); without them every test prints why and
//! passes as skipped. Namespaces are removed by a guard, even on failure,
//! and are named per test process and test so parallel runs do not collide.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use weft_testkit::bin;
use weft_testkit::mesh::ConfigFile;
use weft_testkit::netns::{self, effective_uid, ok, run};

const TD: &str = "example.org";
const PROXY_UID: &str = "1337";
const SUBNET: &str = "10.77.0";
/// A Service virtual address (no interface has it: only the rules make it reachable).
const BACKEND_VIP: &str = "10.96.0.10";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Why these tests cannot run here, if they cannot.
fn unsupported() -> Option<String> {
    netns::unsupported(&["iptables", "iptables-restore", "tcpdump", "setpriv", "curl", "python3"])
}

macro_rules! skip_unless_supported {
    () => {
        if let Some(why) = unsupported() {
            eprintln!("SKIPPED {}: {why}", module_path!());
            return;
        }
    };
}

/// The test's namespaces and processes; dropping it kills the processes and
/// removes the namespaces.
struct Lab {
    prefix: String,
    dir: tempfile::TempDir,
    namespaces: Vec<String>,
    procs: Vec<(String, Child)>,
}

impl Lab {
    fn new(test: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("weft-{}-{n}-{test}", std::process::id());
        let dir = tempfile::tempdir().expect("tempdir");
        // Readable by the sidecars (UID 1337): bundle, tokens, state dirs live here.
        set_mode(dir.path(), 0o755);
        let mut lab = Self { prefix, dir, namespaces: Vec::new(), procs: Vec::new() };
        let br = lab.add_ns("br");
        ok(Command::new("ip").args(["-n", &br, "link", "add", "br0", "type", "bridge"]));
        ok(Command::new("ip").args(["-n", &br, "link", "set", "br0", "up"]));
        lab
    }

    fn ns(&self, pod: &str) -> String {
        format!("{}-{pod}", self.prefix)
    }

    fn add_ns(&mut self, pod: &str) -> String {
        let ns = self.ns(pod);
        ok(Command::new("ip").args(["netns", "add", &ns]));
        self.namespaces.push(ns.clone());
        ok(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]));
        ns
    }

    /// A pod namespace with `eth0` at `SUBNET.host`, on the bridge.
    fn pod(&mut self, pod: &str, host: u8) -> String {
        let ns = self.add_ns(pod);
        let br = self.ns("br");
        let peer = format!("v{host}");
        ok(Command::new("ip")
            .args(["-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &peer, "netns", &br]));
        ok(Command::new("ip").args(["-n", &br, "link", "set", &peer, "master", "br0", "up"]));
        ok(Command::new("ip").args(["-n", &ns, "addr", "add", &format!("{SUBNET}.{host}/24"), "dev", "eth0"]));
        ok(Command::new("ip").args(["-n", &ns, "link", "set", "eth0", "up"]));
        // Service virtual addresses are routed out of the pod (the rules take them first).
        ok(Command::new("ip").args(["-n", &ns, "route", "add", "10.96.0.0/16", "dev", "eth0"]));
        ns
    }

    /// Starts `args` in `pod`'s namespace (as `uid` if given), logging to a file.
    fn spawn(&mut self, pod: &str, name: &str, uid: Option<&str>, args: &[String]) {
        let log = self.dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(pod)]);
        if let Some(uid) = uid {
            cmd.args(["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups"]);
        }
        cmd.args(args).stdin(Stdio::null()).stdout(file.try_clone().expect("log")).stderr(file);
        cmd.env_remove("http_proxy").env_remove("https_proxy").env_remove("HTTP_PROXY").env_remove("HTTPS_PROXY");
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        self.procs.push((name.to_string(), child));
    }

    /// Runs a command in `pod`'s namespace as root (the app's side: intercepted).
    fn exec(&self, pod: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(pod)]).args(args);
        cmd.env_remove("http_proxy").env_remove("HTTP_PROXY").env_remove("all_proxy");
        run(&mut cmd)
    }

    /// `curl` from `pod`: (exit code, body).
    fn curl(&self, pod: &str, extra: &[&str], url: &str) -> (i32, String) {
        let mut args = vec!["curl", "-sS", "--noproxy", "*", "--max-time", "10"];
        args.extend_from_slice(extra);
        args.push(url);
        let out = self.exec(pod, &args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (out.status.code().unwrap_or(-1), text)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        set_mode(&p, 0o644);
        p
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for (name, _) in &self.procs {
            let text = std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            all += &format!("--- {name}\n{}\n", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        all
    }

    /// Waits until `check` holds, or panics with `what` and the logs.
    fn wait(&self, what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // For diagnosis: every process's whole log, kept after the run.
        if let Some(keep) = std::env::var_os("WEFT_TEST_KEEP_LOGS") {
            let to = Path::new(&keep).join(&self.prefix);
            if std::fs::create_dir_all(&to).is_ok() {
                for (name, _) in &self.procs {
                    let log = format!("{name}.log");
                    let _ = std::fs::copy(self.dir.path().join(&log), to.join(&log));
                }
            }
        }
        for (_, child) in &mut self.procs {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Speaks first: a banner line on connect, then echoes.
const BANNER_APP: &str = r#"
import socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
def serve(c):
    c.sendall(b"220 weft-banner\r\n")
    while True:
        d = c.recv(4096)
        if not d:
            break
        c.sendall(d)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Reads the banner (timing it), sends a line, reads it back.
const BANNER_CLIENT: &str = r#"
import socket, sys, time
t = time.monotonic()
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=15)
banner = b""
while not banner.endswith(b"\r\n"):
    d = c.recv(100)
    if not d:
        break
    banner += d
waited = time.monotonic() - t
c.sendall(b"ping\n")
echo = b""
while not echo.endswith(b"\n"):
    d = c.recv(100)
    if not d:
        break
    echo += d
print(f"{waited:.3f} {banner.decode().strip()} {echo.decode().strip()}")
"#;

const GRPC_APP: &str = r#"
import sys, grpc
from concurrent import futures
def say(req, ctx):
    peer = dict(ctx.invocation_metadata()).get("x-weft-peer-id", "-")
    return b"grpc " + req + b" peer=" + peer.encode()
h = grpc.method_handlers_generic_handler("echo.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)})
s = grpc.server(futures.ThreadPoolExecutor(4))
s.add_generic_rpc_handlers((h,))
s.add_insecure_port("0.0.0.0:" + sys.argv[1])
s.start()
s.wait_for_termination()
"#;

const GRPC_CLIENT: &str = r#"
import sys, grpc
ch = grpc.insecure_channel(sys.argv[1], options=[("grpc.enable_http_proxy", 0)])
print(ch.unary_unary("/echo.Echo/Say")(b"hi", timeout=10).decode())
"#;

fn mesh_config(outbound_policy: &str) -> String {
    format!(
        r#"apiVersion: weft.dev/v1alpha1
kind: Mesh
metadata: {{name: mesh}}
spec: {{outboundTrafficPolicy: {outbound_policy}}}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {{name: backend}}
spec:
  port: 8080
  addresses: ["{BACKEND_VIP}"]
  subsets:
    - {{name: v1, labels: {{version: v1}}}}
    - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: weft.dev/v1alpha1
kind: HTTPRoute
metadata: {{name: backend-routes}}
spec:
  parentRefs: [{{name: backend}}]
  rules:
    - name: canary-header
      matches:
        - headers: [{{name: x-canary, value: "true"}}]
      backendRefs: [{{name: backend, subset: v2}}]
    - name: stable
      backendRefs: [{{name: backend, subset: v1}}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: no-admin}}
spec:
  targetRef: {{name: backend}}
  action: DENY
  rules:
    - to: [{{paths: ["/admin"]}}]
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {{name: echo}}
spec: {{port: 9000, protocol: tcp}}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {{name: banner}}
spec: {{port: 2525}}
---
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {{name: greeter}}
spec: {{port: 50051, protocol: grpc}}
"#
    )
}

/// A mesh pod: namespace, app, sidecar (UID 1337), interception rules.
struct PodSpec<'a> {
    pod: &'a str,
    host: u8,
    service: &'a str,
    app_port: u16,
    labels: &'a [&'a str],
    /// Run the sidecar as root without `--proxy-uid` (a misconfiguration:
    /// the rules exempt UID 1337 only, so its own connections are redirected).
    as_root: bool,
}

fn start_sidecar(lab: &mut Lab, cp_addr: &str, pki: &Path, spec: &PodSpec<'_>) {
    let id = format!("spiffe://{TD}/ns/default/sa/{}", spec.service);
    let token = ok(Command::new("ip").args(["netns", "exec", &lab.ns("cp")]).arg(bin("weft")).args([
        "token",
        "create",
        "--spiffe-id",
        &id,
        "--ttl",
        "10m",
        "--control-plane",
        cp_addr,
        "--pki",
        &pki.display().to_string(),
    ]));
    let token_file = lab.write(&format!("{}.token", spec.pod), token.trim());
    let state = lab.dir.path().join(format!("{}-state", spec.pod));
    std::fs::create_dir(&state).expect("state dir");
    std::os::unix::fs::chown(&state, Some(1337), Some(1337)).expect("chown state dir");
    let mut args = vec![
        bin("weft-proxy").display().to_string(),
        "--control-plane".into(),
        cp_addr.into(),
        "--trust-bundle".into(),
        pki.join("trust-bundle.pem").display().to_string(),
        "--token-file".into(),
        token_file.display().to_string(),
        "--state-dir".into(),
        state.display().to_string(),
        "--service".into(),
        spec.service.into(),
        "--app".into(),
        format!("127.0.0.1:{}", spec.app_port),
        "--inbound".into(),
        "0.0.0.0:15006".into(),
        "--advertise-address".into(),
        format!("{SUBNET}.{}", spec.host),
        "--outbound".into(),
        "127.0.0.1:15001".into(),
        "--admin".into(),
        "127.0.0.1:15020".into(),
    ];
    if !spec.as_root {
        // What init-iptables exempts; the sidecar checks it runs as that UID.
        args.extend(["--proxy-uid".into(), PROXY_UID.into()]);
    }
    for l in spec.labels {
        args.extend(["--label".into(), l.to_string()]);
    }
    let uid = (!spec.as_root).then_some(PROXY_UID);
    lab.spawn(spec.pod, &format!("{}-sidecar", spec.pod), uid, &args);
}

fn init_iptables(lab: &Lab, pod: &str, extra: &[&str]) -> Output {
    let weft = bin("weft").display().to_string();
    if extra.contains(&"--uninstall") {
        // Install-only flags are refused with --uninstall.
        let mut args = vec![weft.as_str(), "init-iptables"];
        args.extend_from_slice(extra);
        return lab.exec(pod, &args);
    }
    let mut args = vec![
        weft.as_str(),
        "init-iptables",
        "--proxy-uid",
        PROXY_UID,
        "--inbound-port",
        "15006",
        "--outbound-port",
        "15001",
        "--skip-inbound-ports",
        "15020",
    ];
    args.extend_from_slice(extra);
    lab.exec(pod, &args)
}

fn nat_rules(lab: &Lab, pod: &str) -> String {
    String::from_utf8_lossy(&lab.exec(pod, &["iptables", "-w", "-t", "nat", "-S"]).stdout).into_owned()
}

fn metric(lab: &Lab, pod: &str, name: &str, label: &str) -> f64 {
    let (_, text) = lab.curl(pod, &[], "http://127.0.0.1:15020/metrics");
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `weft` or `weft-proxy` with `args` (no namespace, no root needed):
/// (success, stdout + stderr).
fn cli(binary: &str, args: &[&str]) -> (bool, String) {
    let out = run(Command::new(bin(binary)).args(args));
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Lists with an empty item are refused by position rather than read as
/// shorter lists (a generated flag missing a value).
#[test]
fn init_iptables_refuses_empty_list_items_by_name() {
    for (flag, value, item) in [
        ("--skip-inbound-ports", "1,,2", "item 2 of \"1,,2\" is empty"),
        ("--skip-inbound-ports", "15020,", "item 2 of \"15020,\" is empty"),
        ("--skip-outbound-ports", ",5432", "item 1 of \",5432\" is empty"),
        ("--skip-outbound-cidrs", "10.0.0.0/8,", "item 2 of \"10.0.0.0/8,\" is empty"),
    ] {
        let (ok, text) = cli("weft", &["init-iptables", "--dry-run", flag, value]);
        assert!(!ok && text.contains(flag) && text.contains(item), "{flag} {value}: {text}");
    }
    // An empty list is still no items (the injector writes `--skip-inbound-ports ""` never, but a user may).
    let (ok, text) = cli("weft", &["init-iptables", "--dry-run", "--skip-outbound-ports", ""]);
    assert!(ok, "{text}");
}

/// Every bad flag is refused naming the flag and what is expected, before
/// any rule changes.
#[test]
fn init_iptables_flags_say_what_is_expected() {
    for (args, want) in [
        (&["--proxy-uid", "4294967295"][..], "expected a number from 0 to 4294967294"),
        (&["--proxy-uid", "abc"], "\"abc\" is not a UID"),
        (&["--proxy-uid", "0"], "--allow-root-proxy-uid"),
        (&["--outbound-port", "70000"], "a port is 1-65535"),
        (&["--inbound-port", "http"], "a port is 1-65535"),
        (&["--skip-outbound-cidrs", "10.0.0.1/8"], "the network is 10.0.0.0/8"),
        (&["--uninstall", "--proxy-uid", "5"], "'--uninstall' cannot be used with '--proxy-uid"),
        (&["--uninstall", "--skip-outbound-ports", "53"], "'--uninstall' cannot be used with '--skip-outbound-ports"),
    ] {
        let mut all = vec!["init-iptables", "--dry-run"];
        all.extend_from_slice(args);
        let (ok, text) = cli("weft", &all);
        assert!(!ok && text.contains(want), "{args:?}: {text}");
        assert!(!text.contains("invalid digit") && !text.contains("is not in 0..="), "{args:?}: {text}");
    }
    let (ok, text) = cli("weft", &["init-iptables", "--dry-run", "--proxy-uid", "0", "--allow-root-proxy-uid"]);
    assert!(ok && text.contains("--uid-owner 0"), "{text}");
    if effective_uid() != 0 {
        return eprintln!("SKIPPED the root-only cases: not root");
    }
    // Only listing is attempted (and fails), so nothing changes here.
    let out = run(Command::new(bin("weft")).args(["init-iptables", "--uninstall"]).env("PATH", "/nonexistent"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.matches("os error 2").count() == 1, "said once: {err}");
    assert!(err.contains("apt-get install iptables"), "{err}");
    let weft = bin("weft").display().to_string();
    let out = run(Command::new("setpriv").args(["--bounding-set=-net_admin", &weft, "init-iptables", "--uninstall"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("lacks the NET_ADMIN capability"), "{err}");
}

/// IPv6 is not intercepted: an IPv6 skip CIDR would exempt nothing, so it
/// is refused by name instead of being silently ignored.
#[test]
fn init_iptables_refuses_an_ipv6_skip_cidr() {
    let (ok, text) = cli("weft", &["init-iptables", "--dry-run", "--skip-outbound-cidrs", "10.0.0.0/8,fd00::/8"]);
    assert!(!ok && text.contains("fd00::/8") && text.contains("only IPv4 is intercepted"), "{text}");
    let (ok, text) = cli("weft", &["init-iptables", "--dry-run", "--skip-outbound-cidrs", "10.0.0.0/8"]);
    assert!(ok && text.contains("-A WEFT_OUTPUT -d 10.0.0.0/8 -j RETURN"), "{text}");
}

/// `--detect-timeout` outside 1ms..10s is refused with the bounds.
#[test]
fn the_detect_timeout_has_bounds() {
    for bad in ["0ms", "11s", "1h"] {
        let (ok, text) = cli("weft-proxy", &["--detect-timeout", bad]);
        assert!(!ok && text.contains("--detect-timeout") && text.contains("between 1ms and 10s"), "{bad}: {text}");
    }
    let (ok, text) = cli("weft-proxy", &["--detect-timeout", "soon"]);
    assert!(!ok && text.contains("expected a duration"), "{text}");
}

/// A sidecar told the rules' `--proxy-uid` refuses to start as another UID
/// (its own connections would be redirected back into it), in one line,
/// before it binds or attests anything.
#[test]
fn a_sidecar_refuses_to_start_as_another_uid_than_the_rules_exempt() {
    let me = effective_uid();
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let base = |uid: u32| {
        let args: Vec<String> = [
            "--trust-bundle",
            "/nonexistent/bundle.pem",
            "--state-dir",
            &state.display().to_string(),
            "--service",
            "web",
            "--app",
            "127.0.0.1:1",
            "--proxy-uid",
            &uid.to_string(),
        ]
        .map(String::from)
        .to_vec();
        args
    };
    let other = me.wrapping_add(1);
    let args = base(other);
    let (ok, text) = cli("weft-proxy", &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok, "{text}");
    let line =
        text.lines().find(|l| l.contains("--proxy-uid")).unwrap_or_else(|| panic!("no --proxy-uid error: {text}"));
    assert!(line.contains(&format!("runs as uid {me}")) && line.contains(&format!("uid {other}")), "{line}");
    assert!(!state.exists(), "nothing done before the check");
    // Its own UID passes the check (and fails later, on the missing bundle).
    let args = base(me);
    let (ok, text) = cli("weft-proxy", &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok && !text.contains("--proxy-uid") && text.contains("bundle"), "{text}");
}

/// Drives sockets from a line protocol on stdin (one reply line per command),
/// so a test can order every packet: `listen IP PORT`, `accept NAME`,
/// `connect NAME IP PORT`, `send NAME WORD`, `recv NAME`.
const SOCKET_DRIVER: &str = r#"
import socket, sys
conns, lst = {}, None
for line in sys.stdin:
    cmd, *a = line.split()
    try:
        if cmd == "listen":
            lst = socket.socket()
            lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lst.bind((a[0], int(a[1])))
            lst.listen(8)
            out = "ok"
        elif cmd == "accept":
            lst.settimeout(10)
            conns[a[0]], _ = lst.accept()
            conns[a[0]].settimeout(5)
            out = "ok"
        elif cmd == "connect":
            conns[a[0]] = socket.create_connection((a[1], int(a[2])), timeout=5)
            out = "ok"
        elif cmd == "send":
            conns[a[0]].sendall((a[1] + "\n").encode())
            out = "ok"
        elif cmd == "recv":
            got = b""
            while not got.endswith(b"\n"):
                d = conns[a[0]].recv(100)
                if not d:
                    raise ConnectionError("closed by the peer")
                got += d
            out = "got " + got.decode().strip()
    except Exception as e:
        out = f"error {type(e).__name__}: {e}"
    print(out, flush=True)
"#;

/// A [`SOCKET_DRIVER`] running in a pod.
struct Driver {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Driver {
    fn start(lab: &Lab, pod: &str, script: &Path) -> Self {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &lab.ns(pod), "python3", "-u"])
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        Self { child, stdin, stdout }
    }

    /// Sends one command; its reply line.
    fn cmd(&mut self, line: &str) -> String {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "{line}").expect("driver stdin");
        let mut reply = String::new();
        self.stdout.read_line(&mut reply).expect("driver stdout");
        reply.trim().to_string()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A connection open before the rules (in the test above: the sidecar's
/// config stream to the control plane) must survive their install. In a
/// namespace without conntrack until the nat table is loaded, the first
/// packet of such a connection after the install is picked up mid-stream as
/// a new flow; a REDIRECT then sends it to the sidecar's port, which answers
/// with a reset. That reset the control plane's streams to already running
/// sidecars whenever its next push (a mesh config reload) was that first
/// packet: every sidecar deregistered at once.
#[test]
fn connections_open_before_the_rules_are_left_alone() {
    skip_unless_supported!();
    let mut lab = Lab::new("open");
    lab.pod("peer", 1);
    lab.pod("p", 2);
    let driver = lab.write("driver.py", SOCKET_DRIVER);
    let mut peer = Driver::start(&lab, "peer", &driver);
    let mut app = Driver::start(&lab, "p", &driver);
    let peer_ip = format!("{SUBNET}.1");
    assert_eq!(peer.cmd(&format!("listen {peer_ip} 7443")), "ok");
    // `in`: the peer speaks first after the install (an arriving packet);
    // `out`: the pod's app speaks first (a leaving one).
    for name in ["in", "out"] {
        assert_eq!(app.cmd(&format!("connect {name} {peer_ip} 7443")), "ok");
        assert_eq!(peer.cmd(&format!("accept {name}")), "ok");
    }
    let out = init_iptables(&lab, "p", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    assert_eq!(peer.cmd("send in push"), "ok");
    assert_eq!(app.cmd("recv in"), "got push", "an arriving packet of an open connection was redirected");
    assert_eq!(app.cmd("send in ack"), "ok");
    assert_eq!(peer.cmd("recv in"), "got ack");
    assert_eq!(app.cmd("send out hello"), "ok");
    assert_eq!(peer.cmd("recv out"), "got hello", "a leaving packet of an open connection was redirected");
    assert_eq!(peer.cmd("send out reply"), "ok");
    assert_eq!(app.cmd("recv out"), "got reply");

    // The rules are in force for new connections: to the outbound port,
    // where nothing listens in this test.
    let refused = app.cmd(&format!("connect new {peer_ip} 7443"));
    assert!(refused.starts_with("error ConnectionRefused"), "a new connection was not redirected: {refused}");
}

#[test]
fn init_iptables_installs_once_and_uninstalls_exactly_what_it_added() {
    skip_unless_supported!();
    let mut lab = Lab::new("rules");
    lab.pod("p", 2);
    // Someone else's rule, which weft must leave alone.
    ok(Command::new("ip").args([
        "netns",
        "exec",
        &lab.ns("p"),
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "--dport",
        "4444",
        "-j",
        "RETURN",
    ]));
    let before = nat_rules(&lab, "p");
    for _ in 0..2 {
        let out = init_iptables(&lab, "p", &["--skip-outbound-ports", "5432", "--skip-outbound-cidrs", "192.0.2.0/24"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let rules = nat_rules(&lab, "p");
    assert_eq!(rules.matches("-j WEFT_OUTPUT").count(), 1, "installing twice keeps one jump:\n{rules}");
    assert_eq!(rules.matches("-j WEFT_INBOUND").count(), 1, "{rules}");
    assert!(rules.contains("--uid-owner 1337 -j RETURN"), "{rules}");
    assert!(rules.contains("-A WEFT_REDIRECT -p tcp -j REDIRECT --to-ports 15001"), "{rules}");
    assert!(rules.contains("-A WEFT_OUTPUT -d 192.0.2.0/24 -j RETURN"), "{rules}");
    assert!(rules.contains("-A WEFT_INBOUND -p tcp -m tcp --dport 15020 -j RETURN"), "{rules}");

    let out = init_iptables(&lab, "p", &["--uninstall"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(nat_rules(&lab, "p"), before, "uninstall leaves the table as it found it");
    let out = init_iptables(&lab, "p", &["--uninstall"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "uninstalling nothing succeeds");
    assert!(said.contains("nothing to remove") && !said.contains("removed"), "{said}");

    // A dry run of the uninstall lists the commands and changes nothing.
    assert!(init_iptables(&lab, "p", &[]).status.success());
    let installed = nat_rules(&lab, "p");
    let out = init_iptables(&lab, "p", &["--uninstall", "--dry-run"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for want in ["would run:", "iptables -w -t nat -D PREROUTING -p tcp -j WEFT_INBOUND", "-X WEFT_REDIRECT"] {
        assert!(said.contains(want), "no {want:?} in:\n{said}");
    }
    assert_eq!(nat_rules(&lab, "p"), installed, "a dry run changes nothing");
    let out = init_iptables(&lab, "p", &["--uninstall"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed weft's nat rules"));
    assert_eq!(nat_rules(&lab, "p"), before);

    // Not root: a clear refusal, nothing changed.
    let weft = bin("weft").display().to_string();
    let out =
        lab.exec("p", &["setpriv", "--reuid", "1337", "--regid", "1337", "--clear-groups", &weft, "init-iptables"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("must run as root"), "{err}");
    assert_eq!(nat_rules(&lab, "p"), before);
}

#[test]
fn an_app_that_knows_nothing_of_the_mesh_is_carried_over_mtls() {
    skip_unless_supported!();
    let mut lab = Lab::new("e2e");
    for (pod, host) in [
        ("cp", 1),
        ("client", 2),
        ("v1", 3),
        ("v2", 4),
        ("echo", 5),
        ("banner", 6),
        ("greeter", 7),
        ("loop", 8),
        ("ext", 9),
    ] {
        lab.pod(pod, host);
    }
    let ip = |host: u8| format!("{SUBNET}.{host}");

    // Control plane in its own namespace.
    let pki = lab.dir.path().join("pki");
    ok(Command::new(bin("weft")).args(["certs", "init", "--trust-domain", TD, "--out"]).arg(&pki));
    set_mode(&pki, 0o755);
    set_mode(&pki.join("trust-bundle.pem"), 0o644);
    let cfg = ConfigFile::new(&mesh_config("allowAny"));
    let cp_addr = format!("{}:7443", ip(1));
    let cp_args = vec![
        bin("weft-control-plane").display().to_string(),
        "--pki".into(),
        pki.display().to_string(),
        "--state-dir".into(),
        lab.dir.path().join("cp-state").display().to_string(),
        "--listen".into(),
        cp_addr.clone(),
        "--admin".into(),
        "127.0.0.1:7444".into(),
        "--config".into(),
        cfg.arg(),
    ];
    lab.spawn("cp", "control-plane", None, &cp_args);
    lab.wait("the control plane", Duration::from_secs(30), || {
        lab.curl("cp", &["-f"], "http://127.0.0.1:7444/ready").0 == 0
    });

    // Apps: they listen on the pod's address too, so that traffic without
    // the rules reaches them directly.
    let http_app = lab.write("http_app.py", netns::HTTP_APP);
    let banner_app = lab.write("banner_app.py", BANNER_APP);
    let grpc_app = lab.write("grpc_app.py", GRPC_APP);
    let py = |script: &Path, args: &[&str]| {
        let mut v = vec!["python3".to_string(), "-u".into(), script.display().to_string()];
        v.extend(args.iter().map(|s| s.to_string()));
        v
    };
    lab.spawn("v1", "v1-app", None, &py(&http_app, &["v1", "8080"]));
    lab.spawn("v2", "v2-app", None, &py(&http_app, &["v2", "8080"]));
    lab.spawn("echo", "echo-app", None, &py(&banner_app, &["9000"]));
    lab.spawn("banner", "banner-app", None, &py(&banner_app, &["2525"]));
    lab.spawn("greeter", "greeter-app", None, &py(&grpc_app, &["50051"]));
    lab.spawn("ext", "ext-app", None, &py(&http_app, &["outside", "8081"]));
    let client_app = lab.write("noop.py", "import time\ntime.sleep(3600)\n");
    lab.spawn("client", "client-app", None, &py(&client_app, &[]));

    let pods = [
        PodSpec { pod: "client", host: 2, service: "client", app_port: 8080, labels: &[], as_root: false },
        PodSpec { pod: "v1", host: 3, service: "backend", app_port: 8080, labels: &["version=v1"], as_root: false },
        PodSpec { pod: "v2", host: 4, service: "backend", app_port: 8080, labels: &["version=v2"], as_root: false },
        PodSpec { pod: "echo", host: 5, service: "echo", app_port: 9000, labels: &[], as_root: false },
        PodSpec { pod: "banner", host: 6, service: "banner", app_port: 2525, labels: &[], as_root: false },
        PodSpec { pod: "greeter", host: 7, service: "greeter", app_port: 50051, labels: &[], as_root: false },
        PodSpec { pod: "loop", host: 8, service: "looper", app_port: 8080, labels: &[], as_root: true },
    ];
    for spec in &pods {
        start_sidecar(&mut lab, &cp_addr, &pki, spec);
    }
    for spec in &pods {
        lab.wait(&format!("{} sidecar ready", spec.pod), Duration::from_secs(60), || {
            lab.curl(spec.pod, &["-f"], "http://127.0.0.1:15020/ready").0 == 0
        });
        let out = init_iptables(&lab, spec.pod, &[]);
        assert!(out.status.success(), "init-iptables in {}: {}", spec.pod, String::from_utf8_lossy(&out.stderr));
    }
    lab.wait("the client's discovery of every pod", Duration::from_secs(30), || {
        let (_, cfg) = lab.curl("client", &[], "http://127.0.0.1:15020/config");
        (3..=7).all(|h| cfg.contains(&format!("\"{}:15006\"", ip(h))))
    });

    // Plain HTTP to the backend pod's own address, captured on its link (its bridge port).
    let pcap = lab.dir.path().join("link.pcap");
    lab.spawn(
        "br",
        "tcpdump",
        None,
        &["tcpdump", "-i", "v3", "--immediate-mode", "-U", "-s", "0", "-w", &pcap.display().to_string(), "tcp"]
            .map(String::from),
    );
    // Not a fixed pause, and packets handed over as they come (libpcap
    // otherwise batches them for up to a second, and a SIGINT before that
    // left an empty capture: "18 packets received by filter, 0 captured").
    lab.wait("tcpdump to listen", Duration::from_secs(20), || {
        std::fs::read_to_string(lab.dir.path().join("tcpdump.log")).is_ok_and(|l| l.contains("listening on"))
    });
    let marker = "/plaintext-marker-7f3a";
    let (code, body) = lab.curl("client", &[], &format!("http://{}:8080{marker}", ip(3)));
    assert_eq!(code, 0, "{body}\n{}", lab.logs());
    assert!(body.starts_with(&format!("v1 {marker} peer=spiffe://{TD}/ns/default/sa/client")), "{body}");
    std::thread::sleep(Duration::from_millis(500));
    let tcpdump = lab.procs.iter_mut().find(|(n, _)| n == "tcpdump").map(|(_, c)| c.id()).expect("tcpdump");
    let _ = Command::new("kill").args(["-INT", &tcpdump.to_string()]).output();
    std::thread::sleep(Duration::from_millis(500));
    let capture = std::fs::read(&pcap).expect("capture");
    let has = |needle: &[u8]| capture.windows(needle.len()).any(|w| w == needle);
    assert!(!has(marker.as_bytes()), "the request path crossed the link in plaintext");
    assert!(!has(b"HTTP/1.1") && !has(b"x-weft-peer-id"), "plaintext HTTP on the link");
    assert!(has(&[0x17, 0x03, 0x03]), "no TLS application data records on the link ({} bytes)", capture.len());
    let summary = lab.exec("br", &["tcpdump", "-nr", &pcap.display().to_string()]);
    let summary = String::from_utf8_lossy(&summary.stdout);
    assert!(summary.contains(&format!("{}.15006", ip(3))), "traffic went to the backend's inbound port:\n{summary}");
    assert!(!summary.contains(&format!("{}.8080", ip(3))), "traffic went to the app port directly:\n{summary}");

    // Routing and authorization, through the Service's virtual address.
    let (_, body) = lab.curl("client", &[], &format!("http://{BACKEND_VIP}:8080/stable"));
    assert!(body.starts_with("v1 /stable peer="), "{body}");
    let (_, body) = lab.curl("client", &["-H", "x-canary: true"], &format!("http://{BACKEND_VIP}:8080/canary"));
    assert!(body.starts_with("v2 /canary peer="), "canary routing: {body}");
    let (_, body) =
        lab.curl("client", &["-o", "/dev/null", "-w", "%{http_code}"], &format!("http://{}:8080/admin", ip(3)));
    assert!(body.contains("403"), "authorization: {body}");
    assert!(metric(&lab, "client", "weft_proxy_intercepted_connections_total", "protocol=\"http1\"") >= 3.0);

    // gRPC (h2c, detected as HTTP/2) to the greeter pod.
    let grpc_client = lab.write("grpc_client.py", GRPC_CLIENT);
    let out = lab.exec("client", &["python3", &grpc_client.display().to_string(), &format!("{}:50051", ip(7))]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("grpc hi peer=spiffe://{TD}/ns/default/sa/client")),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // TCP: declared `protocol: tcp` (no detection), and a server-first
    // protocol behind a Service that does not say so (detection gives up
    // after --detect-timeout, 100 ms).
    let banner_client = lab.write("banner_client.py", BANNER_CLIENT);
    for (host, port, bound) in [(5u8, "9000", 2.0f64), (6, "2525", 2.0)] {
        let out = lab.exec("client", &["python3", &banner_client.display().to_string(), &ip(host), port]);
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        let waited: f64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(f64::MAX);
        assert_eq!(
            words.collect::<Vec<_>>(),
            ["220", "weft-banner", "ping"],
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(waited < bound, "the banner took {waited}s (a stall, not the detection timeout)");
    }
    assert!(metric(&lab, "client", "weft_proxy_intercepted_connections_total", "service=\"banner\"") >= 1.0);
    assert!(metric(&lab, "client", "weft_proxy_intercepted_connections_total", "protocol=\"opaque\"") >= 2.0);

    // A destination outside the mesh passes through...
    let (code, body) = lab.curl("client", &[], &format!("http://{}:8081/direct", ip(9)));
    assert_eq!((code, body.starts_with("outside /direct peer=-")), (0, true), "{body}");
    assert!(metric(&lab, "client", "weft_proxy_unknown_destinations_total", "action=\"passthrough\"") >= 1.0);

    // A sidecar whose own connections are intercepted (it runs as root, the
    // rules exempt UID 1337) refuses the first turn of the loop instead of
    // passing through into itself until it runs out of file descriptors.
    for _ in 0..2 {
        let (code, body) = lab.curl("loop", &[], &format!("http://{}:8081/looped", ip(9)));
        assert_ne!(code, 0, "a looping passthrough must fail: {body}");
    }
    let refused = metric(&lab, "loop", "weft_proxy_unknown_destinations_total", "action=\"refused_loop\"");
    let passed = metric(&lab, "loop", "weft_proxy_unknown_destinations_total", "action=\"passthrough\"");
    // One passthrough and one refusal per attempt (a little slack for the sidecar's own connections).
    assert!(refused >= 2.0 && passed < 10.0, "refused_loop {refused}, passthrough {passed}\n{}", lab.logs());
    let log = std::fs::read_to_string(lab.dir.path().join("loop-sidecar.log")).unwrap_or_default();
    let said = log.lines().filter(|l| l.contains("sidecar's own traffic is being intercepted")).count();
    assert_eq!(said, 1, "the loop is logged once, naming the cause:\n{log}");
    assert!(log.contains("--proxy-uid"), "{log}");

    // A pod whose sidecar leaves discovery (it drains after SIGTERM) is no
    // unknown destination: its address is refused, never passed through in plaintext.
    let passthrough_before = metric(&lab, "client", "weft_proxy_unknown_destinations_total", "action=\"passthrough\"");
    let v2 = lab.procs.iter().find(|(n, _)| n == "v2-sidecar").map(|(_, c)| c.id()).expect("v2 sidecar");
    ok(Command::new("kill").args(["-TERM", &v2.to_string()]));
    lab.wait("the client to see v2 leave discovery", Duration::from_secs(30), || {
        let (_, cfg) = lab.curl("client", &[], "http://127.0.0.1:15020/config");
        cfg.contains(&format!("\"{}:15006\"", ip(3))) && !cfg.contains(&format!("\"{}:15006\"", ip(4)))
    });
    let (code, body) = lab.curl("client", &[], &format!("http://{}:8080/drained", ip(4)));
    assert_ne!(code, 0, "a connection to a pod that left the mesh must be refused: {body}");
    let former = "action=\"refused_former_mesh_address\"";
    assert!(metric(&lab, "client", "weft_proxy_unknown_destinations_total", former) >= 1.0, "{}", lab.logs());
    let passthrough_after = metric(&lab, "client", "weft_proxy_unknown_destinations_total", "action=\"passthrough\"");
    assert_eq!(passthrough_after, passthrough_before, "a former mesh address was passed through");
    // ...and a plaintext client outside the mesh cannot reach a mesh app.
    let (code, _) = lab.curl("ext", &[], &format!("http://{}:8080/", ip(3)));
    assert_ne!(code, 0, "a plaintext connection to an intercepted pod must be refused");
    assert!(metric(&lab, "v1", "weft_proxy_tls_handshakes_total", "outcome=\"not_tls\"") >= 1.0);

    // ...unless the Mesh says registryOnly.
    cfg.write(&mesh_config("registryOnly"));
    lab.wait("registryOnly to refuse the outside destination", Duration::from_secs(30), || {
        lab.curl("client", &[], &format!("http://{}:8081/", ip(9))).0 != 0
    });
    assert!(metric(&lab, "client", "weft_proxy_unknown_destinations_total", "action=\"refused\"") >= 1.0);
    let (_, body) = lab.curl("client", &[], &format!("http://{}:8080/still", ip(3)));
    // Intermittent (about 1 run in 8): an empty reply here, as if the caller's
    // sidecar took the pod for an unknown destination; the logs say which path.
    assert!(body.starts_with("v1 /still peer="), "mesh services are still reachable: {body}\n{}", lab.logs());

    // Uninstalling restores direct traffic (no sidecar, no peer ID) and leaves no weft chain.
    for pod in ["client", "v1"] {
        assert!(init_iptables(&lab, pod, &["--uninstall"]).status.success());
        assert!(!nat_rules(&lab, pod).contains("WEFT"), "{}", nat_rules(&lab, pod));
    }
    let (code, body) = lab.curl("client", &[], &format!("http://{}:8080/direct", ip(3)));
    assert_eq!((code, body.trim()), (0, "v1 /direct peer=-"), "{body}");
}
