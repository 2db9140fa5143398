//! A second proxy for the load harness to compare against: two nginx
//! processes doing what two weft sidecars do (plain HTTP in, mutual TLS 1.3
//! with keep-alive between them, plain HTTP to the app), with the very SVIDs
//! the sidecars hold. The server side checks the client's chain; the client
//! side does not check the server's (nginx can only match DNS names, and an
//! SVID has none); neither checks SPIFFE IDs, keeps per-request metrics or
//! applies policy, so nginx does somewhat less work than weft.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use weft_testkit::{free_addr, Proc};

/// Where nginx is, if it is installed (Debian: `apt-get install nginx-light`).
pub fn binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"].into_iter().map(PathBuf::from).find(|p| p.is_file())
}

/// Both nginx processes; killed on drop.
pub struct Pair {
    /// Where the load goes (the client-side nginx).
    pub entry: SocketAddr,
    /// The server side's mutual-TLS listener.
    pub tls: SocketAddr,
    pub client: Proc,
    pub server: Proc,
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
    let spawn = |name: &str, conf: String| {
        let path = dir.join(format!("nginx-{name}.conf"));
        std::fs::write(&path, conf).expect("write nginx config");
        let args = ["-p", &dir.display().to_string(), "-c", &path.display().to_string()].map(String::from);
        Proc::spawn(&format!("nginx-{name}"), nginx, &args, dir)
    };
    let server = spawn("server", server_conf);
    let client = spawn("client", client_conf);
    Pair { entry, tls, client, server }
}
