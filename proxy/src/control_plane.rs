//! The control-plane replicas a sidecar talks to (`--control-plane`), and
//! how it moves between them.
//!
//! `--control-plane` takes one or more `host:port` entries, comma-separated;
//! a host may be a DNS name with several addresses (each is a replica).
//! Entries are resolved again at every (re)connect, so DNS changes are
//! followed. The sidecar starts on a random replica (spreading sidecars over
//! replicas) and stays on it while it answers; when a call to it fails (the
//! config stream ends or cannot open, a renewal cannot reach it) that replica
//! is left and the next attempt, after a jittered exponential [`Backoff`],
//! goes to another one. The config watch and SVID renewal share one
//! [`ControlPlanes`], so both fail over together.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;

/// A `--control-plane` value that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneAddrError {
    #[error("--control-plane is empty; give host:port, or several separated by commas (cp1:7443,cp2:7443)")]
    Empty,
    #[error("--control-plane entry {0:?} is not host:port (e.g. 10.0.0.5:7443 or cp.mesh.internal:7443)")]
    NotHostPort(String),
    /// An empty item (`a,,b`, a trailing comma) or a repeated replica.
    #[error("--control-plane: {0}")]
    List(#[from] weft_intercept::ListError),
    #[error("--control-plane {entries}: no entry resolves to an address ({reason})")]
    Unresolved { entries: String, reason: String },
}

/// Jittered exponential backoff: each delay is the current step times a
/// random factor in [0.5, 1.5); the step doubles after each use up to `cap`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    step: Duration,
}

impl Backoff {
    /// Starts at `base`, never above `cap` (before jitter).
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap, step: base }
    }

    /// The next delay to wait, with jitter; the following one doubles.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.step.mul_f64(rand::rng().random_range(0.5..1.5));
        self.step = (self.step * 2).min(self.cap);
        d
    }

    /// Back to `base` (after a success).
    pub fn reset(&mut self) {
        self.step = self.base;
    }
}

/// A first start's wait for any control-plane replica to answer
/// (`--control-plane-wait`): every failed round is logged with when the next
/// try comes and how long is left, then retried after a jittered backoff
/// (0.5 s doubling to 10 s); once `wait` has passed the last error is returned.
#[derive(Debug)]
pub struct FirstContact {
    deadline: tokio::time::Instant,
    wait: Duration,
    backoff: Backoff,
}

impl FirstContact {
    /// Starts the clock: retries stop `wait` from now.
    pub fn new(wait: Duration) -> Self {
        Self {
            deadline: tokio::time::Instant::now() + wait,
            wait,
            backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(10)),
        }
    }

    /// After a round where no replica of `replicas` answered (`err`): Ok
    /// after sleeping the next backoff when time is left, else Err(err).
    pub async fn retry_or_give_up<E: std::fmt::Display>(&mut self, replicas: &str, err: E) -> Result<(), E> {
        let now = tokio::time::Instant::now();
        let left = self.deadline.saturating_duration_since(now);
        if left.is_zero() {
            if !self.wait.is_zero() {
                tracing::warn!(
                    control_plane = %replicas,
                    error = %err,
                    "no control-plane replica answered within --control-plane-wait {}; giving up",
                    humantime::format_duration(self.wait)
                );
            }
            return Err(err);
        }
        let delay = self.backoff.next_delay().min(left);
        tracing::warn!(
            control_plane = %replicas,
            error = %err,
            retry_in_ms = delay.as_millis() as u64,
            gives_up_in_s = left.as_secs(),
            "no control-plane replica answered on first start; retrying (bounded by --control-plane-wait)"
        );
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Choice {
    /// The replica in use, while it answers.
    current: Option<SocketAddr>,
    /// The replica that failed last, avoided by the next choice.
    failed: Option<SocketAddr>,
    /// The replica in use has answered a call (it can be "lost"; one that
    /// never answered was only unreachable).
    answered: bool,
}

/// The replicas of `--control-plane` and the one in use.
#[derive(Debug)]
pub struct ControlPlanes {
    entries: Vec<String>,
    choice: Mutex<Choice>,
}

impl ControlPlanes {
    /// Parses `cp1:7443,cp2:7443` (spaces around entries are ignored) with
    /// the list syntax of every weft list flag
    /// ([`weft_intercept::distinct_list_items`]): an empty entry (`a,,b`, a
    /// trailing comma) is refused by its position, and so is a repeat.
    pub fn parse(list: &str) -> Result<Self, ControlPlaneAddrError> {
        let entries: Vec<String> = weft_intercept::distinct_list_items(list)?.into_iter().map(str::to_string).collect();
        if entries.is_empty() {
            return Err(ControlPlaneAddrError::Empty);
        }
        for e in &entries {
            let port_ok =
                e.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(ControlPlaneAddrError::NotHostPort(e.clone()));
            }
        }
        Ok(Self { entries, choice: Mutex::new(Choice::default()) })
    }

    /// The entries as given, comma-separated (for messages).
    pub fn describe(&self) -> String {
        self.entries.join(",")
    }

    /// The entries as given, in order.
    pub fn entries(&self) -> &[String] {
        &self.entries
    }

    /// The first entry, unresolved: where a channel goes before any choice.
    pub fn first_entry(&self) -> &str {
        &self.entries[0]
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Choice> {
        self.choice.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The replica in use, if one has been chosen.
    pub fn current(&self) -> Option<SocketAddr> {
        self.lock().current
    }

    /// Every address of every entry (DNS names resolved now), in entry
    /// order, without repeats. Entries that do not resolve are skipped.
    pub async fn resolve(&self) -> Result<Vec<SocketAddr>, ControlPlaneAddrError> {
        let mut out = Vec::new();
        let mut reason = String::new();
        for e in &self.entries {
            match tokio::net::lookup_host(e.as_str()).await {
                Ok(addrs) => {
                    for a in addrs {
                        if !out.contains(&a) {
                            out.push(a);
                        }
                    }
                }
                Err(err) => reason = format!("{e}: {err}"),
            }
        }
        if out.is_empty() {
            return Err(ControlPlaneAddrError::Unresolved { entries: self.describe(), reason });
        }
        Ok(out)
    }

    /// The replica to call: the one in use while it is still listed, else
    /// another (see [`choose`]), which becomes the one in use.
    pub async fn pick(&self) -> Result<SocketAddr, ControlPlaneAddrError> {
        let addrs = self.resolve().await?;
        let mut c = self.lock();
        let chosen = choose(&addrs, c.current, c.failed, rand::rng().random_range(0..usize::MAX))
            .expect("resolve returns at least one address");
        if c.current != Some(chosen) {
            tracing::info!(control_plane = %chosen, "using control-plane replica");
            c.answered = false;
        }
        c.current = Some(chosen);
        Ok(chosen)
    }

    /// A call to `addr` failed because the replica is gone or unreachable:
    /// leave it (if it is still the one in use) so the next pick moves on.
    pub fn failed(&self, addr: SocketAddr) {
        let mut c = self.lock();
        c.failed = Some(addr);
        if c.current == Some(addr) {
            c.current = None;
            if std::mem::take(&mut c.answered) {
                tracing::warn!(control_plane = %addr, "control-plane replica lost; moving to another");
            } else {
                // It never answered (e.g. the first entry is down at start): nothing was lost.
                tracing::warn!(control_plane = %addr, "control-plane replica {addr} unreachable; trying another");
            }
        }
    }

    /// A call to `addr` succeeded: while it stays the one in use, a later
    /// failure is a replica lost rather than one never reached.
    pub fn answered(&self, addr: SocketAddr) {
        let mut c = self.lock();
        if c.current == Some(addr) {
            c.answered = true;
        }
    }
}

/// Which of `addrs` to use: `current` while it is listed; otherwise one of
/// the others than `failed` (all of them when that is the only one), the
/// `r`-th modulo their number. `None` only when `addrs` is empty.
pub fn choose(
    addrs: &[SocketAddr],
    current: Option<SocketAddr>,
    failed: Option<SocketAddr>,
    r: usize,
) -> Option<SocketAddr> {
    if let Some(c) = current.filter(|c| addrs.contains(c)) {
        return Some(c);
    }
    let others: Vec<SocketAddr> = addrs.iter().copied().filter(|a| Some(*a) != failed).collect();
    let pool = if others.is_empty() { addrs } else { &others[..] };
    (!pool.is_empty()).then(|| pool[r % pool.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_one_or_several_entries() {
        assert_eq!(ControlPlanes::parse("127.0.0.1:7443").unwrap().describe(), "127.0.0.1:7443");
        let cps = ControlPlanes::parse(" cp1:7443, cp2.mesh:7453 ").unwrap();
        assert_eq!(cps.describe(), "cp1:7443,cp2.mesh:7453");
        assert_eq!(cps.first_entry(), "cp1:7443");
        assert!(matches!(ControlPlanes::parse(" "), Err(ControlPlaneAddrError::Empty)));
        // The shared list syntax: empty items and repeats refused by position.
        let e = ControlPlanes::parse("127.0.0.1:21111,,127.0.0.1:21121").unwrap_err().to_string();
        assert!(e.starts_with("--control-plane: item 2 of \"127.0.0.1:21111,,127.0.0.1:21121\" is empty"), "{e}");
        let e = ControlPlanes::parse("cp1:7443,").unwrap_err().to_string();
        assert!(e.contains("item 2 of"), "{e}");
        let e = ControlPlanes::parse("cp1:7443,cp2:7443,cp1:7443").unwrap_err().to_string();
        assert!(e.contains("item 3 of") && e.contains("repeats \"cp1:7443\" (item 1)"), "{e}");
        assert!(matches!(ControlPlanes::parse("cp1"), Err(ControlPlaneAddrError::NotHostPort(e)) if e == "cp1"));
        assert!(matches!(ControlPlanes::parse("cp1:7443,:80"), Err(ControlPlaneAddrError::NotHostPort(_))));
        assert!(matches!(ControlPlanes::parse("cp1:99999"), Err(ControlPlaneAddrError::NotHostPort(_))));
        assert!(ControlPlanes::parse("[::1]:7443").is_ok());
    }

    #[test]
    fn stays_on_the_replica_in_use_and_leaves_a_failed_one() {
        let list = [a("10.0.0.1:1"), a("10.0.0.2:1"), a("10.0.0.3:1")];
        // Stays while listed, whatever the random draw.
        for r in 0..5 {
            assert_eq!(choose(&list, Some(list[1]), None, r), Some(list[1]));
        }
        // After list[1] failed, never list[1] again while others exist.
        for r in 0..10 {
            let c = choose(&list, None, Some(list[1]), r).unwrap();
            assert_ne!(c, list[1]);
        }
        // The random draw spreads first choices over all replicas.
        let firsts: std::collections::HashSet<_> = (0..3).map(|r| choose(&list, None, None, r).unwrap()).collect();
        assert_eq!(firsts.len(), 3);
        // A single replica is retried even though it failed.
        assert_eq!(choose(&list[..1], None, Some(list[0]), 7), Some(list[0]));
        // A replica no longer listed (DNS changed) is left.
        assert_ne!(choose(&list[..2], Some(list[2]), None, 0), Some(list[2]));
        assert_eq!(choose(&[], None, None, 0), None);
    }

    #[tokio::test]
    async fn failing_over_moves_to_the_other_replica_and_stays() {
        let cps = ControlPlanes::parse("127.0.0.1:1001,127.0.0.1:1002").unwrap();
        let first = cps.pick().await.unwrap();
        assert_eq!(cps.pick().await.unwrap(), first, "stays while it answers");
        cps.failed(first);
        let second = cps.pick().await.unwrap();
        assert_ne!(second, first, "moves to the other replica");
        // A late failure report about the old replica changes nothing.
        cps.failed(first);
        assert_eq!(cps.pick().await.unwrap(), second);
        assert_eq!(cps.current(), Some(second));
    }

    #[tokio::test]
    async fn a_dns_name_stands_for_all_its_addresses() {
        let cps = ControlPlanes::parse("localhost:7443").unwrap();
        let addrs = cps.resolve().await.unwrap();
        assert!(!addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 7443), "{addrs:?}");
        let bad = ControlPlanes::parse("no-such-host.invalid:7443").unwrap();
        assert!(matches!(bad.resolve().await, Err(ControlPlaneAddrError::Unresolved { .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn first_contact_retries_until_its_wait_is_spent() {
        let start = tokio::time::Instant::now();
        let mut fc = FirstContact::new(Duration::from_secs(3));
        let mut rounds = 0;
        while fc.retry_or_give_up("cp:1", "down").await.is_ok() {
            rounds += 1;
        }
        assert!(rounds >= 3, "retried {rounds} times");
        let spent = start.elapsed();
        assert!(spent >= Duration::from_secs(3) && spent < Duration::from_secs(4), "{spent:?}");
        let mut none = FirstContact::new(Duration::ZERO);
        assert_eq!(none.retry_or_give_up("cp:1", "down").await, Err("down"), "0s gives up at once");
    }

    #[test]
    fn backoff_grows_jittered_to_its_cap_and_resets() {
        let (base, cap) = (Duration::from_millis(100), Duration::from_millis(800));
        let mut b = Backoff::new(base, cap);
        let mut steps = Vec::new();
        for _ in 0..6 {
            steps.push(b.next_delay());
        }
        let expected = [100, 200, 400, 800, 800, 800];
        for (d, step) in steps.iter().zip(expected) {
            let step = Duration::from_millis(step);
            assert!(*d >= step.mul_f64(0.5) && *d < step.mul_f64(1.5), "{d:?} outside jitter of {step:?}");
        }
        b.reset();
        assert!(b.next_delay() < base.mul_f64(1.5));
    }
}
