//! Thread-per-core through the real accept loop: with three workers, the
//! connections a listener accepts are handed out round robin (each listener
//! its own, whatever the others accept in between), each handler
//! runs (and does its I/O) on its worker's own thread, and a drain still
//! waits for connections running on the other workers. One test in this
//! binary: `workers::start` is once per process.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_runtime::serve::Server;
use weft_runtime::{drain, workers};

const LIMIT: Duration = Duration::from_secs(5);

#[test]
fn connections_are_spread_over_the_workers_and_drained_from_each() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        workers::start(3, "test-worker").unwrap();
        assert_eq!(workers::count(), 3);
        assert!(matches!(workers::start(2, "again"), Err(workers::StartError::AlreadyStarted)));
        let strays = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|c| c.trim() == "again")
            .count();
        assert_eq!(strays, 0, "a refused second start left worker threads running");

        let (trigger, d) = drain::channel();
        // (worker index, thread name) of each handler; the handler answers with its index.
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut addrs = Vec::new();
        for _ in 0..2 {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.push(listener.local_addr().unwrap());
            let record = seen.clone();
            tokio::spawn(Server::new("test").serve(listener, d.clone(), move |mut tcp, _, _| {
                let record = record.clone();
                async move {
                    let index = workers::index();
                    let name = std::thread::current().name().unwrap_or_default().to_string();
                    record.lock().unwrap().push((index, name));
                    let _ = tcp.write_all(&[index as u8]).await;
                    // Held until the client closes: the drain below must wait for it.
                    let mut rest = Vec::new();
                    let _ = tcp.read_to_end(&mut rest).await;
                }
            }));
        }
        drop(d);

        let mut clients = Vec::new();
        let mut answered = [Vec::new(), Vec::new()];
        // One connection to the first listener, two to the second, three times:
        // one round robin shared by both would give the first the same worker each time.
        for which in [0, 1, 1, 0, 1, 1, 0, 1, 1] {
            let mut c = TcpStream::connect(addrs[which]).await.unwrap();
            let mut b = [0u8; 1];
            tokio::time::timeout(LIMIT, c.read_exact(&mut b)).await.expect("answer in time").unwrap();
            answered[which].push(b[0] as usize);
            clients.push(c);
        }
        let all = HashSet::from([0, 1, 2]);
        assert_eq!(answered[0].iter().copied().collect::<HashSet<_>>(), all, "{answered:?}");
        assert_eq!(answered[1][..3].iter().copied().collect::<HashSet<_>>(), all, "{answered:?}");
        assert_eq!(answered[1][3..].iter().copied().collect::<HashSet<_>>(), all, "{answered:?}");
        for (index, name) in seen.lock().unwrap().iter() {
            // Worker 0 is this (the main) thread; the others are the started threads.
            let want = if *index == 0 {
                std::thread::current().name().unwrap_or_default().to_string()
            } else {
                "test-worker".into()
            };
            assert_eq!(name, &want, "worker {index} ran on the wrong thread");
        }

        // A drain waits for the connections open on every worker...
        let drained = tokio::spawn(trigger.drain(LIMIT));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!drained.is_finished(), "drain finished with connections still open");
        // ...and ends once each has closed.
        drop(clients);
        let finished = tokio::time::timeout(LIMIT, drained).await.expect("drain returns").unwrap();
        assert!(finished, "drain timed out although every connection ended");
    });
}
