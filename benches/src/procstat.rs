//! CPU time and memory of a process and its descendants, from `/proc`
//! (Linux). nginx runs a master and worker processes, HAProxy one process
//! with threads, a sidecar one process: counting the whole tree makes them
//! comparable.

use std::collections::BTreeSet;

/// Linux's `USER_HZ`: the unit of `utime`/`stime` in `/proc/<pid>/stat`,
/// 100 on every architecture Linux exposes to user space.
const TICKS_PER_SECOND: f64 = 100.0;

/// `pid` and every process below it (children of any of its threads).
pub fn tree(pid: u32) -> Vec<u32> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        if !seen.insert(p) {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else { continue };
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            todo.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        }
    }
    seen.into_iter().collect()
}

/// User + system CPU seconds used so far by the processes `pids` (threads included).
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    let (user, system) = cpu_split(pids);
    user + system
}

/// User and system CPU seconds (in that order) used so far by the processes
/// `pids`, threads included: `utime` and `stime` of `/proc/<pid>/stat`.
pub fn cpu_split(pids: &[u32]) -> (f64, f64) {
    let (user, system) = pids
        .iter()
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            // Fields after the command name (which may hold spaces), from field 3 on.
            let rest = &stat[stat.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<u64>().ok()?, f.get(12)?.parse::<u64>().ok()?))
        })
        .fold((0, 0), |(u, s), (du, ds)| (u + du, s + ds));
    (user as f64 / TICKS_PER_SECOND, system as f64 / TICKS_PER_SECOND)
}

/// Context switches so far (voluntary: the thread waited, for I/O or a
/// wake-up; plus involuntary: it was preempted) of every thread of `pids`,
/// from `/proc/<pid>/task/<tid>/status`.
pub fn context_switches(pids: &[u32]) -> u64 {
    pids.iter()
        .flat_map(|p| std::fs::read_dir(format!("/proc/{p}/task")).into_iter().flatten().flatten())
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|status| {
            status
                .lines()
                .filter(|l| l.starts_with("voluntary_ctxt_switches:") || l.starts_with("nonvoluntary_ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// A `/proc/<pid>/status` field in KiB (`VmHWM`: peak resident set, `VmRSS`: now), summed over `pids`.
pub fn status_kib(pids: &[u32], field: &str) -> u64 {
    pids.iter()
        .filter_map(|p| {
            let status = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            let line = status.lines().find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
            line[field.len() + 1..].split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}
