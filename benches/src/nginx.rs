//! A second proxy for the load harness to compare against: two nginx
//! processes doing what two weft sidecars do (plain HTTP in, mutual TLS 1.3
//! with keep-alive between them, plain HTTP to the app), with the very SVIDs
//! the sidecars hold. The server side checks the client's chain; the client
//! side does not check the server's (nginx can only match DNS names, and an
//! SVID has none); neither checks SPIFFE IDs, keeps per-request metrics or
//! applies policy, so nginx does somewhat less work than weft.
//!
//! [`start_stream`] starts the TCP equivalent (the `stream` module) for the
//! bulk-transfer row, where this nginx has that module ([`stream_module`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use weft_testkit::{free_addr, Proc};

/// Where nginx is, if it is installed (Debian: `apt-get install nginx-light`).
pub fn binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"].into_iter().map(PathBuf::from).find(|p| p.is_file())
}

/// Both nginx processes; stopped on drop.
pub struct Pair {
    /// Where the load goes (the client-side nginx).
    pub entry: SocketAddr,
    /// The server side's mutual-TLS listener.
    pub tls: SocketAddr,
    pub client: Proc,
    pub server: Proc,
}

impl Drop for Pair {
    /// SIGTERM to each master, which stops its workers: killing the master
    /// alone (what dropping a [`Proc`] does) left the workers running,
    /// orphaned, with their listening sockets, into the next run.
    fn drop(&mut self) {
        for side in [&mut self.client, &mut self.server] {
            side.terminate(std::time::Duration::from_secs(5));
        }
    }
}

/// One side's SVID: its chain, key and the trust bundle, as files.
pub struct Identity<'a> {
    pub chain: &'a Path,
    pub key: &'a Path,
    /// Trust anchors for verifying the peer (used by the server side).
    pub bundle: &'a Path,
}

/// Starts the pair in `dir`: client-side on a free port → server-side (mTLS)
/// → `app`, two worker processes each (as the sidecars have two threads).
pub fn start(nginx: &Path, dir: &Path, app: SocketAddr, client: Identity<'_>, server: Identity<'_>) -> Pair {
    let (entry, tls) = (free_addr(), free_addr());
    let common = |name: &str| {
        format!(
            "worker_processes 2;\nuser root;\npid {dir}/{name}.pid;\nerror_log {dir}/{name}.err warn;\ndaemon off;\n\
             events {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  \
             client_body_temp_path {dir}/{name}-body;\n  proxy_temp_path {dir}/{name}-proxy;\n  \
             fastcgi_temp_path {dir}/{name}-fcgi;\n  uwsgi_temp_path {dir}/{name}-uwsgi;\n  scgi_temp_path {dir}/{name}-scgi;\n  \
             keepalive_requests 1000000;\n",
            dir = dir.display()
        )
    };
    let server_conf = format!(
        "{}  upstream app {{ server {app}; keepalive 128; }}\n  server {{\n    listen {tls} ssl;\n    \
         ssl_protocols TLSv1.3;\n    ssl_certificate {};\n    ssl_certificate_key {};\n    \
         ssl_client_certificate {};\n    ssl_verify_client on;\n    ssl_verify_depth 3;\n    \
         ssl_session_tickets off;\n    ssl_session_cache off;\n    location / {{ proxy_pass http://app; \
         proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n",
        common("server"),
        server.chain.display(),
        server.key.display(),
        server.bundle.display()
    );
    let client_conf = format!(
        "{}  upstream peer {{ server {tls}; keepalive 128; }}\n  server {{\n    listen {entry};\n    \
         location / {{ proxy_pass https://peer; proxy_http_version 1.1; proxy_set_header Connection \"\"; \
         proxy_ssl_protocols TLSv1.3; proxy_ssl_certificate {}; proxy_ssl_certificate_key {}; \
         proxy_ssl_verify off; proxy_ssl_session_reuse off; }}\n  }}\n}}\n",
        common("client"),
        client.chain.display(),
        client.key.display(),
    );
    spawn_pair(nginx, dir, "", (server_conf, client_conf), entry, tls)
}

/// Where this nginx's `stream` module (TCP relaying) is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamModule {
    /// Compiled in (`--with-stream`).
    BuiltIn,
    /// A dynamic module to `load_module` (`--with-stream=dynamic`, file present).
    Dynamic(PathBuf),
    /// Neither: Debian's nginx-light is built with `--with-stream=dynamic`
    /// but ships no module file (the `libnginx-mod-stream` package has it).
    Missing,
}

/// Whether `nginx` can relay TCP, from `nginx -V` and the module directory.
pub fn stream_module(nginx: &Path) -> StreamModule {
    let Ok(out) = std::process::Command::new(nginx).arg("-V").output() else { return StreamModule::Missing };
    // nginx prints its build flags on stderr.
    let flags = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    if flags.split_whitespace().any(|f| f == "--with-stream") {
        return StreamModule::BuiltIn;
    }
    if flags.split_whitespace().any(|f| f == "--with-stream=dynamic") {
        let modules = flags
            .split_whitespace()
            .find_map(|f| f.strip_prefix("--modules-path="))
            .map_or_else(|| PathBuf::from("/usr/lib/nginx/modules"), PathBuf::from);
        let so = modules.join("ngx_stream_module.so");
        if so.is_file() {
            return StreamModule::Dynamic(so);
        }
    }
    StreamModule::Missing
}

/// Starts a `stream` pair in `dir`: client side on a free port → server
/// side (mutual TLS 1.3 with the SVIDs; the server checks the client's
/// chain, as in [`start`]) → `app`, one TCP connection's bytes relayed.
/// `module` is what [`stream_module`] found (not `Missing`).
pub fn start_stream(
    nginx: &Path,
    dir: &Path,
    module: &StreamModule,
    app: SocketAddr,
    client: Identity<'_>,
    server: Identity<'_>,
) -> Pair {
    let (entry, tls) = (free_addr(), free_addr());
    let load = match module {
        StreamModule::Dynamic(so) => format!("load_module {};\n", so.display()),
        _ => String::new(),
    };
    let common = |name: &str| {
        format!(
            "{load}worker_processes 2;\nuser root;\npid {dir}/{name}.pid;\nerror_log {dir}/{name}.err warn;\n\
             daemon off;\nevents {{ worker_connections 4096; }}\n",
            dir = dir.display()
        )
    };
    let server_conf = format!(
        "{}stream {{\n  server {{\n    listen {tls} ssl;\n    ssl_protocols TLSv1.3;\n    \
         ssl_certificate {};\n    ssl_certificate_key {};\n    ssl_client_certificate {};\n    \
         ssl_verify_client on;\n    ssl_verify_depth 3;\n    ssl_session_tickets off;\n    proxy_pass {app};\n  }}\n}}\n",
        common("stream-server"),
        server.chain.display(),
        server.key.display(),
        server.bundle.display()
    );
    let client_conf = format!(
        "{}stream {{\n  server {{\n    listen {entry};\n    proxy_pass {tls};\n    proxy_ssl on;\n    \
         proxy_ssl_protocols TLSv1.3;\n    proxy_ssl_certificate {};\n    proxy_ssl_certificate_key {};\n    \
         proxy_ssl_verify off;\n    proxy_ssl_session_reuse off;\n  }}\n}}\n",
        common("stream-client"),
        client.chain.display(),
        client.key.display(),
    );
    spawn_pair(nginx, dir, "stream-", (server_conf, client_conf), entry, tls)
}

/// Writes the two configs (server side, client side) to `dir` as
/// `nginx-{prefix}server.conf` and `nginx-{prefix}client.conf` and starts
/// an nginx on each.
fn spawn_pair(
    nginx: &Path,
    dir: &Path,
    prefix: &str,
    (server_conf, client_conf): (String, String),
    entry: SocketAddr,
    tls: SocketAddr,
) -> Pair {
    let spawn = |side: &str, conf: String| {
        let name = format!("nginx-{prefix}{side}");
        let path = dir.join(format!("{name}.conf"));
        std::fs::write(&path, conf).expect("write nginx config");
        let args = ["-p", &dir.display().to_string(), "-c", &path.display().to_string()].map(String::from);
        Proc::spawn(&name, nginx, &args, dir)
    };
    let server = spawn("server", server_conf);
    let client = spawn("client", client_conf);
    Pair { entry, tls, client, server }
}
