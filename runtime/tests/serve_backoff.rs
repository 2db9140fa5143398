//! The serve loop out of file descriptors: a child process (this test,
//! run again) serves with a tiny RLIMIT_NOFILE and keeps every connection,
//! so accept fails with EMFILE while clients wait in the backlog. The loop
//! must pause between attempts (growing pauses), not spin on the error.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::process::{setrlimit, Resource, Rlimit};
use weft_runtime::serve::Server;
use weft_runtime::Drain;

const CHILD: &str = "WEFT_RUNTIME_EMFILE_CHILD";
const RUN_FOR: Duration = Duration::from_millis(1500);

fn child() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Room for three more descriptors: the limit sits just above the
        // third free descriptor number (open ones above it stay usable).
        let open: std::collections::HashSet<u64> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
            .collect();
        let third_free = (0..).filter(|n| !open.contains(n)).nth(3).unwrap();
        let max = rustix::process::getrlimit(Resource::Nofile).maximum;
        setrlimit(Resource::Nofile, Rlimit { current: Some(third_free + 1), maximum: max }).unwrap();
        let server = Server::new("test");
        let stats = server.stats();
        let held = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(server.serve(listener, Drain::never(), move |tcp, _, _| {
            held.lock().unwrap().push(tcp);
            async {}
        }));
        // On a line of its own: the harness prints the test name without a newline.
        println!("\nADDR {addr}");
        tokio::time::sleep(RUN_FOR).await;
        println!("\nSTATS {} {}", stats.accepted(), stats.accept_errors());
    });
}

#[test]
fn accept_errors_back_off_instead_of_spinning() {
    if std::env::var(CHILD).is_ok() {
        return child();
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["accept_errors_back_off_instead_of_spinning", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines().map_while(Result::ok);
    let addr: SocketAddr = lines.by_ref().find_map(|l| l.strip_prefix("ADDR ").map(|a| a.parse().unwrap())).unwrap();
    // Far more clients than the child has descriptors for; all wait in the backlog.
    let _clients: Vec<_> = (0..20).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
    let stats = lines.find_map(|l| l.strip_prefix("STATS ").map(str::to_string)).expect("child reported");
    assert!(child.wait().unwrap().success());
    let mut it = stats.split(' ').map(|n| n.parse::<u64>().unwrap());
    let (accepted, errors) = (it.next().unwrap(), it.next().unwrap());
    assert!((1..20).contains(&accepted), "accepted {accepted}: the descriptor limit did not bite");
    // 5ms doubling to 1s: about 8 attempts fit in 1.5s. A fixed 50ms pause
    // would make ~30, a loop without pause many thousands.
    assert!((3..=12).contains(&errors), "{errors} failed accepts in {RUN_FOR:?}");
}
