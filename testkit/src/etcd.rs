//! Real etcd servers for the tests of `--store etcd://...`: one member or a
//! cluster, on loopback ports from [`free_addr`], data in a temp dir, each a
//! child process ([`Proc`], killed on drop). Members can be stopped (SIGKILL)
//! and started again on the same data and ports.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::{free_addr, http_get, Proc};

/// How long a member (or the cluster) may take to report healthy.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(30);

struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    /// Plain-HTTP `/health` (and `/metrics`), also when clients speak TLS.
    metrics: SocketAddr,
    proc_: Option<Proc>,
}

/// TLS on the client port: the member's certificate and key, and the CA
/// client certificates must chain to (`--client-cert-auth`). PEM files.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// An etcd cluster of one or more members.
pub struct Etcd {
    dir: TempDir,
    program: PathBuf,
    initial_cluster: String,
    members: Vec<Member>,
    tls: Option<ServerTls>,
}

/// The `etcd` binary on PATH (Debian's `etcd-server`), if installed.
pub fn binary() -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| PathBuf::from(d).join("etcd")).find(|p| p.is_file())
}

impl Etcd {
    /// Starts `members` etcd members and waits until every one is healthy;
    /// None (with a message saying so) when no `etcd` binary is installed.
    pub async fn start(members: usize) -> Option<Self> {
        Self::start_with(members, None).await
    }

    /// [`Etcd::start`], with TLS and client-certificate auth on the client port.
    pub async fn start_tls(members: usize, tls: ServerTls) -> Option<Self> {
        Self::start_with(members, Some(tls)).await
    }

    async fn start_with(members: usize, tls: Option<ServerTls>) -> Option<Self> {
        let Some(program) = binary() else {
            eprintln!("SKIPPED: no etcd binary on PATH (apt-get install etcd-server); this test needs a real etcd");
            return None;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let members: Vec<Member> = (0..members)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_addr(),
                peer: free_addr(),
                metrics: free_addr(),
                proc_: None,
            })
            .collect();
        let initial_cluster =
            members.iter().map(|m| format!("{}=http://{}", m.name, m.peer)).collect::<Vec<_>>().join(",");
        let mut etcd = Self { dir, program, initial_cluster, members, tls };
        for i in 0..etcd.members.len() {
            etcd.spawn(i);
        }
        for i in 0..etcd.members.len() {
            etcd.wait_healthy(i).await;
        }
        Some(etcd)
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let data = self.dir.path().join(&m.name);
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut args: Vec<String> = [
            "--name",
            &m.name,
            "--data-dir",
            &data.display().to_string(),
            "--listen-client-urls",
            &format!("{scheme}://{}", m.client),
            "--advertise-client-urls",
            &format!("{scheme}://{}", m.client),
            "--listen-metrics-urls",
            &format!("http://{}", m.metrics),
            "--listen-peer-urls",
            &format!("http://{}", m.peer),
            "--initial-advertise-peer-urls",
            &format!("http://{}", m.peer),
            "--initial-cluster",
            &self.initial_cluster,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            "weft-test",
            // Short elections so a stopped member is noticed quickly.
            "--heartbeat-interval",
            "100",
            "--election-timeout",
            "1000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(tls) = &self.tls {
            for (flag, path) in
                [("--cert-file", &tls.cert), ("--key-file", &tls.key), ("--trusted-ca-file", &tls.client_ca)]
            {
                args.extend([flag.to_string(), path.display().to_string()]);
            }
            args.push("--client-cert-auth".into());
        }
        let proc_ = Proc::spawn(&format!("etcd-{}", m.name), &self.program, &args, self.dir.path());
        self.members[i].proc_ = Some(proc_);
    }

    /// Waits until member `i` answers `/health` with `"health":"true"`.
    pub async fn wait_healthy(&self, i: usize) {
        let deadline = Instant::now() + HEALTHY_TIMEOUT;
        let m = &self.members[i];
        loop {
            if let Ok((200, body)) = http_get(m.metrics, "/health").await {
                if body.contains("\"true\"") {
                    return;
                }
            }
            if Instant::now() > deadline {
                let log = m.proc_.as_ref().map(|p| p.log_text()).unwrap_or_default();
                panic!("etcd member {} not healthy after {HEALTHY_TIMEOUT:?}; log:\n{log}", m.name);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `etcd://a,b,c`, as `--store` takes it.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.members.iter().map(|m| m.client.to_string()).collect::<Vec<_>>().join(","))
    }

    /// Member `i`'s client address.
    pub fn client_addr(&self, i: usize) -> SocketAddr {
        self.members[i].client
    }

    /// Kills member `i` (SIGKILL); its data stays.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc_.take() {
            p.kill();
        }
    }

    /// Starts member `i` again on its data and ports (not waiting for health).
    pub fn restart(&mut self, i: usize) {
        self.stop(i);
        self.spawn(i);
    }

    /// Kills every member.
    pub fn stop_all(&mut self) {
        for i in 0..self.members.len() {
            self.stop(i);
        }
    }

    /// Pauses every member (SIGSTOP): the processes and their leases'
    /// clocks stay, nothing answers; a paused leader expires leases when it
    /// resumes ([`Etcd::resume_all`]), unlike a restarted cluster.
    pub fn pause_all(&mut self) {
        self.signal_all("-STOP");
    }

    /// Resumes every paused member (SIGCONT).
    pub fn resume_all(&mut self) {
        self.signal_all("-CONT");
    }

    fn signal_all(&self, signal: &str) {
        for m in &self.members {
            if let Some(p) = &m.proc_ {
                let ok = std::process::Command::new("kill")
                    .args([signal, &p.pid().to_string()])
                    .status()
                    .is_ok_and(|s| s.success());
                assert!(ok, "kill {signal} {} failed", p.pid());
            }
        }
    }

    /// Starts every stopped member again and waits until all are healthy.
    pub async fn start_all(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].proc_.is_none() {
                self.spawn(i);
            }
        }
        for i in 0..self.members.len() {
            self.wait_healthy(i).await;
        }
    }
}
