//! A third data plane for the load harness: two HAProxy processes doing what
//! two weft sidecars do (plain HTTP/1.1 in, mutual TLS 1.3 between them,
//! plain HTTP/1.1 to the app), speaking HTTP/2 between the two instances
//! (as the sidecars do), with the sidecars' own SVIDs. Both sides verify the
//! peer's chain against the trust bundle; neither checks SPIFFE IDs (HAProxy
//! can match DNS names only), keeps per-route metrics or applies policy.
//!
//! [`start_tcp`] starts the same pair in TCP mode, for the bulk-transfer
//! row: the bytes of one connection relayed through both instances, with
//! the same mutual TLS 1.3 between them (what a weft `--upstream` tunnel
//! does, less the HTTP/2 framing and the policy), or with none (plain TCP
//! both hops: what relaying alone costs on the machine).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use weft_testkit::{free_addr, Proc};

use crate::nginx::Identity;

/// Where haproxy is, if it is installed (Debian: `apt-get install haproxy`).
pub fn binary() -> Option<PathBuf> {
    ["/usr/sbin/haproxy", "/usr/bin/haproxy"].into_iter().map(PathBuf::from).find(|p| p.is_file())
}

/// Both HAProxy processes; killed on drop.
pub struct Pair {
    /// Where the load goes (the client-side HAProxy).
    pub entry: SocketAddr,
    /// The server side's mutual-TLS listener.
    pub tls: SocketAddr,
    pub client: Proc,
    pub server: Proc,
}

/// HAProxy wants the chain and its key in one PEM file.
fn combined_pem(dir: &Path, name: &str, id: &Identity<'_>) -> std::io::Result<PathBuf> {
    let path = dir.join(format!("{name}.pem"));
    let mut pem = std::fs::read(id.chain)?;
    if !pem.ends_with(b"\n") {
        pem.push(b'\n');
    }
    pem.extend(std::fs::read(id.key)?);
    std::fs::write(&path, pem)?;
    Ok(path)
}

/// Starts the pair in `dir`: client side on a free port → server side (mTLS,
/// h2) → `app`, two threads each (one per core here, as HAProxy would pick).
pub fn start(
    haproxy: &Path,
    dir: &Path,
    app: SocketAddr,
    client: Identity<'_>,
    server: Identity<'_>,
) -> std::io::Result<Pair> {
    let (entry, tls) = (free_addr(), free_addr());
    let common = "global\n  nbthread 2\n  maxconn 4096\n  ssl-server-verify required\n\
                  defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  \
                  timeout http-keep-alive 60s\n  http-reuse always\n  option http-keep-alive\n";
    let server_conf = format!(
        "{common}frontend mtls\n  bind {tls} ssl crt {} ca-file {} verify required alpn h2 ssl-min-ver TLSv1.3\n  \
         default_backend app\nbackend app\n  server app {app}\n",
        combined_pem(dir, "haproxy-server", &server)?.display(),
        server.bundle.display()
    );
    let client_conf = format!(
        "{common}frontend plain\n  bind {entry}\n  default_backend peer\nbackend peer\n  \
         server peer {tls} ssl crt {} ca-file {} verify required alpn h2 ssl-min-ver TLSv1.3 no-ssl-reuse\n",
        combined_pem(dir, "haproxy-client", &client)?.display(),
        client.bundle.display()
    );
    spawn_pair(haproxy, dir, "haproxy", (server_conf, client_conf), entry, tls)
}

/// Between the two instances of a [`start_tcp`] pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Mutual TLS 1.3 with the sidecars' SVIDs, both sides verifying the
    /// peer's chain against the trust bundle.
    MutualTls,
    /// Plain TCP: the relaying alone, no cryptography.
    Plain,
}

/// Starts a TCP-mode pair in `dir`: client side on a free port → server side
/// (`hop`) → `app`, one connection's bytes relayed through HAProxy's own
/// buffers (no `splice`, which TLS could not use anyway). `name` tells its
/// files from another pair's in the same `dir`.
pub fn start_tcp(
    haproxy: &Path,
    dir: &Path,
    name: &str,
    app: SocketAddr,
    hop: Hop,
    client: Identity<'_>,
    server: Identity<'_>,
) -> std::io::Result<Pair> {
    let (entry, tls) = (free_addr(), free_addr());
    let common = "global\n  nbthread 2\n  maxconn 4096\n  ssl-server-verify required\n\
                  defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n";
    let (bind_tls, server_tls) = match hop {
        Hop::MutualTls => (
            format!(
                " ssl crt {} ca-file {} verify required ssl-min-ver TLSv1.3",
                combined_pem(dir, &format!("{name}-server"), &server)?.display(),
                server.bundle.display()
            ),
            format!(
                " ssl crt {} ca-file {} verify required ssl-min-ver TLSv1.3 no-ssl-reuse",
                combined_pem(dir, &format!("{name}-client"), &client)?.display(),
                client.bundle.display()
            ),
        ),
        Hop::Plain => (String::new(), String::new()),
    };
    let server_conf = format!(
        "{common}frontend hop\n  bind {tls}{bind_tls}\n  default_backend app\nbackend app\n  server app {app}\n"
    );
    let client_conf = format!(
        "{common}frontend plain\n  bind {entry}\n  default_backend peer\nbackend peer\n  server peer {tls}{server_tls}\n"
    );
    spawn_pair(haproxy, dir, name, (server_conf, client_conf), entry, tls)
}

/// Writes the two configs (server side, client side) to `dir` as
/// `{name}-server.cfg` and `{name}-client.cfg` and starts an HAProxy on each.
fn spawn_pair(
    haproxy: &Path,
    dir: &Path,
    name: &str,
    (server_conf, client_conf): (String, String),
    entry: SocketAddr,
    tls: SocketAddr,
) -> std::io::Result<Pair> {
    let spawn = |side: &str, conf: String| -> std::io::Result<Proc> {
        let path = dir.join(format!("{name}-{side}.cfg"));
        std::fs::write(&path, conf)?;
        let args = ["-db", "-f", &path.display().to_string()].map(String::from);
        Ok(Proc::spawn(&format!("{name}-{side}"), haproxy, &args, dir))
    };
    let server = spawn("server", server_conf)?;
    let client = spawn("client", client_conf)?;
    Ok(Pair { entry, tls, client, server })
}
