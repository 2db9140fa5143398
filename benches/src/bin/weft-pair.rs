//! A weft sidecar pair held up for profiling (issue 10): one control plane,
//! an HTTP app behind the `api` sidecar, a TCP sink behind the `bulk`
//! sidecar, and the `web` sidecar calling both. Prints the addresses to load
//! and the sidecars' PIDs and admin listeners (`key=value` lines), optionally measures a TCP
//! transfer through web's `--upstream bulk` tunnel, then waits until stdin
//! closes. With `--tcp-bytes` it also prints the CPU milliseconds each of
//! `web` and `bulk` used during the tunnel transfer (`/proc/<pid>/stat`;
//! steadier than MB/s on a shared machine). `benches/callgrind.sh` runs it with the sidecars under
//! `valgrind --tool=callgrind` to count instructions per request.
//!
//! ```sh
//! target/release/weft-pair [--tcp-bytes BYTES] < /dev/null   # measure and exit
//! ```

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_testkit::servers;
use weft_testkit::{ControlPlane, Sidecar, SidecarSpec};

const TD: &str = "example.org";

/// A TCP sink: reads until the writer shuts down, then answers the byte
/// count (8 bytes, big-endian).
async fn sink() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = l.accept().await else { continue };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut got = 0u64;
                while let Ok(n @ 1..) = tcp.read(&mut buf).await {
                    got += n as u64;
                }
                let _ = tcp.write_u64(got).await;
            });
        }
    });
    addr
}

/// MB/s (10^6 bytes) of one `bytes`-long upload through `addr` to the sink.
async fn transfer(addr: SocketAddr, bytes: u64) -> std::io::Result<f64> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    let start = Instant::now();
    let chunk = vec![0x5au8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        tcp.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    tcp.shutdown().await?;
    let got = tcp.read_u64().await?;
    if got != bytes {
        return Err(std::io::Error::other(format!("the sink got {got} of {bytes} bytes")));
    }
    Ok(bytes as f64 / 1e6 / start.elapsed().as_secs_f64())
}

fn main() -> std::process::ExitCode {
    let mut tcp_bytes = 0u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next().and_then(|v| v.parse().ok())) {
            ("--tcp-bytes", Some(n)) => tcp_bytes = n,
            _ => {
                eprintln!("usage: weft-pair [--tcp-bytes BYTES]");
                return std::process::ExitCode::from(2);
            }
        }
    }
    if std::env::var_os("WEFT_TEST_LOG").is_none() {
        std::env::set_var("WEFT_TEST_LOG", "warn,weft_control_plane=info");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async move {
        let cp = ControlPlane::start(TD, &[]).await;
        let app = servers::http("api").await;
        let sink = sink().await;
        let web_app = servers::http("web").await;
        let api = Sidecar::start(&cp, TD, SidecarSpec::new("api", app.addr)).await;
        let bulk = Sidecar::start(&cp, TD, SidecarSpec::new("bulk", sink)).await;
        let web_spec =
            SidecarSpec { service: "web", app: web_app.addr, upstreams: &["bulk"], labels: &[], extra_args: &[] };
        let web = Sidecar::start(&cp, TD, web_spec).await;
        for s in ["api", "bulk"] {
            web.wait_endpoints(s, 1, Duration::from_secs(60)).await;
        }
        println!("outbound={}", web.outbound);
        println!("tunnel={}", web.upstream("bulk"));
        println!("sink={sink}");
        // `pids=` last: scripts wait for it, and then have the lines above.
        println!("admins={} {} {}", web.admin, api.admin, bulk.admin);
        println!("pids={} {} {}", web.proc_.pid(), api.proc_.pid(), bulk.proc_.pid());
        if tcp_bytes > 0 {
            let sidecars = [("web", web.proc_.pid()), ("bulk", bulk.proc_.pid())];
            for (name, addr) in [("direct", sink), ("tunnel", web.upstream("bulk"))] {
                let cpu0 = sidecars.map(|(_, p)| weft_benches::procstat::cpu_seconds(&[p]));
                match transfer(addr, tcp_bytes).await {
                    Ok(mbs) => println!("tcp_{name}_mb_s={mbs:.0}"),
                    Err(e) => println!("tcp_{name}_error={e}"),
                }
                if name == "tunnel" {
                    for ((who, p), c0) in sidecars.into_iter().zip(cpu0) {
                        let ms = (weft_benches::procstat::cpu_seconds(&[p]) - c0) * 1000.0;
                        println!("tcp_tunnel_cpu_ms_{who}={ms:.0}");
                    }
                }
            }
        }
        // Held until stdin closes (the script's end), so the sidecars stay up.
        let _ = tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink())).await;
        drop((web, api, bulk, cp));
    });
    std::process::ExitCode::SUCCESS
}
