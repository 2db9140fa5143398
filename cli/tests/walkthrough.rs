//! The README's "A walk through, by hand", run as written: the shell block is
//! read from README.md (so the two cannot drift) and run by bash in a fresh
//! directory, with one change only: the `cargo build` line is left out and
//! PATH points at the binaries this test run built. Step 5's batch of
//! requests must all succeed (the example sends 10 % to subset v2, so v2 must
//! be started), nothing may be written outside the scratch directory, and the
//! stop line must end every process the walk-through started.
//!
//! The README's ports are fixed, so the test claims them the way testkit's
//! `free_addr` does (other tests then pick other ports) and takes a lock
//! file so two runs of it never overlap; nextest also runs it alone in its
//! test group (.config/nextest.toml).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BUILD_LINE: &str = "cargo build --release --workspace --bins && export PATH=$PWD/target/release:$PATH";

/// The shell block under "## A walk through, by hand".
fn walkthrough_block() -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).expect("README");
    let section = &readme[readme.find("## A walk through, by hand").expect("walk-through section")..];
    let start = section.find("```sh\n").expect("a ```sh block") + "```sh\n".len();
    let end = start + section[start..].find("```").expect("end of block");
    section[start..end].to_string()
}

/// The loopback ports the block names (listen addresses, and the dashboard's).
fn ports(block: &str) -> Vec<u16> {
    let mut ports: Vec<u16> = block
        .split("127.0.0.1:")
        .skip(1)
        .filter_map(|rest| rest.chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// A lock held while the walk-through runs: a file created exclusively,
/// removed on drop; one older than 10 minutes is a crashed run's.
struct Lock(PathBuf);

impl Lock {
    fn take() -> Self {
        let path = std::env::temp_dir().join("weft-walkthrough.lock");
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if std::fs::OpenOptions::new().write(true).create_new(true).open(&path).is_ok() {
                return Self(path);
            }
            let stale = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(600));
            if stale {
                let _ = std::fs::remove_file(&path);
            }
            assert!(Instant::now() < deadline, "{} held for 10 minutes", path.display());
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Claims `ports` in testkit's claim directory, so tests picking free ports
/// in parallel leave them alone, and waits until each is free to bind.
fn claim_and_wait_free(ports: &[u16]) {
    let dir = std::env::temp_dir().join("weft-test-ports");
    let _ = std::fs::create_dir_all(&dir);
    for p in ports {
        let _ = std::fs::OpenOptions::new().write(true).create_new(true).open(dir.join(p.to_string()));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    for &p in ports {
        while std::net::TcpListener::bind(("127.0.0.1", p)).is_err() {
            assert!(Instant::now() < deadline, "port {p}, which the README's walk-through uses, stays busy");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// Pids of live processes whose working directory is inside `dir`: what the
/// walk-through started (they all run in its scratch directory).
fn processes_in(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cwd) = std::fs::read_link(entry.path().join("cwd")) else { continue };
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .is_ok_and(|s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')));
        if cwd.starts_with(dir) && !zombie {
            pids.push(pid);
        }
    }
    pids
}

/// Kills whatever the walk-through left running, even when the test fails.
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in processes_in(&self.0) {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
    }
}

/// Every `*.log` the walk-through wrote, for failure messages.
fn logs(dir: &Path) -> String {
    let mut out = String::new();
    for entry in walk(dir) {
        if entry.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&entry).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("--- {}\n", entry.display()));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            files.extend(walk(&p));
        } else {
            files.push(p);
        }
    }
    files
}

#[test]
fn readme_walkthrough_works_as_written() {
    let block = walkthrough_block();
    assert_eq!(block.matches(BUILD_LINE).count(), 1, "the build line the test skips:\n{block}");
    let script = block.replacen(BUILD_LINE, "", 1);
    let stop_line = script.lines().last().expect("a last line").to_string();
    assert!(stop_line.starts_with("kill "), "the block ends with the line that stops what it started: {stop_line}");

    let _lock = Lock::take();
    claim_and_wait_free(&ports(&block));
    let root = tempfile::tempdir().expect("tempdir");
    let (start_dir, tmp) = (root.path().join("start"), root.path().join("tmp"));
    std::fs::create_dir_all(&start_dir).expect("mkdir");
    std::fs::create_dir_all(&tmp).expect("mkdir");
    let _reaper = Reaper(root.path().to_path_buf());
    std::fs::write(root.path().join("walkthrough.sh"), &script).expect("write script");

    let bin_dir = weft_testkit::bin("weft").parent().expect("bin dir").to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let mut bash = Command::new("bash")
        .arg(root.path().join("walkthrough.sh"))
        .current_dir(&start_dir)
        .env("PATH", path)
        .env("TMPDIR", &tmp)
        .env_remove("WEFT_PKI")
        .env_remove("WEFT_CONTROL_PLANE")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(root.path().join("stdout")).expect("stdout file"))
        .stderr(std::fs::File::create(root.path().join("stderr")).expect("stderr file"))
        .spawn()
        .expect("run bash");
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(s) = bash.try_wait().expect("wait bash") {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = bash.kill();
            let _ = bash.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(root.path().join("stdout")).unwrap_or_default();
    let stderr = std::fs::read_to_string(root.path().join("stderr")).unwrap_or_default();
    let context = || format!("stdout:\n{stdout}\nstderr:\n{stderr}\nlogs:\n{}", logs(root.path()));
    assert!(status.is_some(), "the walk-through did not finish within 4 minutes\n{}", context());

    // Step 5's batch: `uniq -c` lines of "<count> <status>".
    let counts: Vec<(u32, String)> = stdout
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace().rev();
            let code = words.next()?;
            let n = words.next()?.parse().ok()?;
            (code.len() == 3 && code.chars().all(|c| c.is_ascii_digit())).then(|| (n, code.to_string()))
        })
        .collect();
    assert_eq!(counts, vec![(100, "200".to_string())], "step 5: every request answered 200\n{}", context());
    assert!(stdout.contains("backend v1") || stdout.contains("backend v2"), "step 5's curl\n{}", context());
    assert!(stdout.contains("valid ("), "weft validate ran\n{}", context());
    assert!(!stdout.contains("warning:"), "weft status/validate found nothing to warn about\n{}", context());
    assert!(
        stdout.contains("spiffe://example.org/ns/default/sa/backend"),
        "weft status lists the sidecars\n{}",
        context()
    );

    // Nothing was written where bash started, only in the scratch directory.
    assert_eq!(std::fs::read_dir(&start_dir).expect("start dir").count(), 0, "files written outside the scratch dir");
    let scratch: Vec<PathBuf> = std::fs::read_dir(&tmp).expect("tmp").flatten().map(|e| e.path()).collect();
    assert_eq!(scratch.len(), 1, "one scratch directory: {scratch:?}");
    assert!(scratch[0].join("pki/issuer.key").is_file(), "the keys are in the scratch directory");

    // The stop line ended every process the walk-through started.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !processes_in(root.path()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let left = processes_in(root.path());
    assert!(left.is_empty(), "still running after `{stop_line}`: pids {left:?}\n{}", context());
}
