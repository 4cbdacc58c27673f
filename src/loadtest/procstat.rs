//! What the load test reads from `/proc`: CPU time per thread, resident memory, the fd limit.
//!
//! CPU time comes from `/proc/<pid>/task/<tid>/schedstat` (nanoseconds on the CPU) when the
//! kernel has it, else from `stat`'s `utime + stime` (clock ticks of 10 ms, USER_HZ = 100).
//! Threads are picked by name (`comm`): the hub's threads are `replhub-core-N` and
//! `replhub-source`; the load generator's are `lt-*`.
use std::collections::HashMap;
use std::fs;
use std::io;

/// Nanoseconds per clock tick of `/proc/<pid>/stat` (USER_HZ is 100 on Linux).
const NS_PER_TICK: u64 = 10_000_000;

/// Which process to look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pid {
    /// This process.
    Own,
    /// Another process.
    Other(u32),
}

impl Pid {
    fn dir(self) -> String {
        match self {
            Self::Own => "/proc/self".to_owned(),
            Self::Other(p) => format!("/proc/{p}"),
        }
    }
}

/// CPU nanoseconds of each thread (by tid) whose name passes `keep`.
pub(super) fn thread_cpu(pid: Pid, keep: &dyn Fn(&str) -> bool) -> io::Result<HashMap<u64, u64>> {
    let mut out = HashMap::new();
    for entry in fs::read_dir(format!("{}/task", pid.dir()))? {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        let path = entry.path();
        // A thread may exit while we look: skip it.
        let Ok(comm) = fs::read_to_string(path.join("comm")) else { continue };
        if !keep(comm.trim_end()) {
            continue;
        }
        let ns = match fs::read_to_string(path.join("schedstat")) {
            Ok(s) => s.split_whitespace().next().and_then(|v| v.parse().ok()),
            Err(_) => None,
        };
        let ns = match ns {
            Some(ns) => ns,
            None => match fs::read_to_string(path.join("stat")) {
                Ok(s) => stat_cpu_ticks(&s).unwrap_or(0) * NS_PER_TICK,
                Err(_) => continue,
            },
        };
        out.insert(tid, ns);
    }
    Ok(out)
}

/// `utime + stime` (fields 14 and 15) of a `stat` line; the name in parentheses may contain
/// spaces, so fields are counted after the last `)`.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    // After ")": field 3 is the state; utime is field 14, so skip 11 fields.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU nanoseconds spent between two [`thread_cpu`] samples (threads born in between count
/// from zero; threads gone by `after` are not counted).
pub(super) fn cpu_delta(before: &HashMap<u64, u64>, after: &HashMap<u64, u64>) -> u64 {
    after.iter().map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0))).sum()
}

/// Resident and peak resident memory (`VmRSS`, `VmHWM`) in bytes.
pub(super) fn rss(pid: Pid) -> io::Result<(u64, u64)> {
    let status = fs::read_to_string(format!("{}/status", pid.dir()))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// The soft limit on open files of this process (`None` if unlimited or unreadable).
pub(super) fn open_files_limit() -> Option<u64> {
    let limits = fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_threads_and_memory() {
        let me = std::thread::current();
        let name = me.name().unwrap_or("").to_owned();
        // Burn a little CPU so that even a tick-based count moves.
        let t0 = std::time::Instant::now();
        let mut x = 0u64;
        while t0.elapsed().as_millis() < 30 {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        let all = thread_cpu(Pid::Own, &|_| true).expect("own tasks");
        assert!(!all.is_empty());
        assert!(all.values().sum::<u64>() > 0, "{name}: {all:?}");
        let (rss, hwm) = rss(Pid::Own).expect("status");
        assert!(rss > 0 && hwm >= rss);
        assert!(open_files_limit().is_some_and(|n| n > 0));
        let before: HashMap<u64, u64> = [(1, 10), (2, 5)].into();
        let after: HashMap<u64, u64> = [(1, 25), (3, 7)].into();
        assert_eq!(cpu_delta(&before, &after), 22);
    }

    #[test]
    fn stat_fields_after_the_name() {
        let stat = "42 (lt client 1) S 1 2 3 4 5 6 7 8 9 10 150 25 0 0 20 0 1 0 100";
        assert_eq!(stat_cpu_ticks(stat), Some(175));
    }
}
