//! The process metrics Prometheus users expect of any exporter
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_virtual_memory_bytes`, `process_start_time_seconds`,
//! `process_open_fds`, `process_max_fds`), read from `/proc/self` when
//! scraped. ztunnel exports the last two; the others are the Prometheus
//! client libraries' standard set.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// One reading of the process's resources.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Reading {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub start_time_seconds: f64,
    pub open_fds: u64,
    pub max_fds: u64,
}

impl Reading {
    /// Reads `/proc/self`; a part that cannot be read stays 0.
    pub fn now() -> Reading {
        let mut r = Reading::default();
        let ticks = clock_ticks();
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            if let Some(f) = stat_fields(&stat) {
                let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
                // Fields after the command, 0-based from `state` (field 3).
                let (utime, stime) = (field(11).unwrap_or(0), field(12).unwrap_or(0));
                r.cpu_seconds = (utime + stime) as f64 / ticks;
                r.virtual_bytes = field(20).unwrap_or(0);
                r.resident_bytes = field(21).unwrap_or(0) * page_size();
                if let Some(start) = field(19) {
                    r.start_time_seconds = boot_time() + start as f64 / ticks;
                }
            }
        }
        // `/proc/self/fd` lists the directory's own descriptor too.
        r.open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count().saturating_sub(1) as u64)
            .unwrap_or(0);
        r.max_fds = max_fds();
        r
    }
}

/// The fields of `/proc/self/stat` after `pid (comm)`: the command may hold
/// spaces and parentheses, so split after its last `)`.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().collect())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).unwrap_or(4096)
}

fn boot_time() -> f64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

fn max_fds() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        0
    }
}

/// The metrics, registered once and set from a [`Reading`] per scrape.
#[derive(Debug, Default)]
pub struct ProcessMetrics {
    cpu_seconds: Counter<f64, AtomicU64>,
    resident_bytes: Gauge,
    virtual_bytes: Gauge,
    start_time_seconds: Gauge<f64, AtomicU64>,
    open_fds: Gauge,
    max_fds: Gauge,
}

impl ProcessMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            self.cpu_seconds.clone(),
        );
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            self.resident_bytes.clone(),
        );
        registry.register(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            self.virtual_bytes.clone(),
        );
        registry.register(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            self.start_time_seconds.clone(),
        );
        registry.register(
            "process_open_fds",
            "Number of open file descriptors",
            self.open_fds.clone(),
        );
        registry.register(
            "process_max_fds",
            "Maximum number of open file descriptors",
            self.max_fds.clone(),
        );
    }

    /// Sets every metric from `r`.
    pub fn set(&self, r: &Reading) {
        let behind = r.cpu_seconds - self.cpu_seconds.get();
        if behind > 0.0 {
            self.cpu_seconds.inc_by(behind);
        }
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.resident_bytes.set(int(r.resident_bytes));
        self.virtual_bytes.set(int(r.virtual_bytes));
        self.start_time_seconds.set(r.start_time_seconds);
        self.open_fds.set(int(r.open_fds));
        self.max_fds.set(int(r.max_fds));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_names_with_spaces_and_parentheses_do_not_shift_fields() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 4 0 1234 \
                    5000000 300 18446744073709551615";
        let f = stat_fields(stat).expect("fields");
        assert_eq!(f[0], "S");
        assert_eq!((f[11], f[12]), ("7", "3"));
        assert_eq!((f[19], f[20], f[21]), ("1234", "5000000", "300"));
    }

    #[test]
    fn reads_this_process() {
        let before = Reading::now();
        // Spin for 100 ms of this thread's CPU time (several clock ticks).
        let spun = std::time::Instant::now();
        let mut x = 0u64;
        while spun.elapsed() < std::time::Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        let file = std::fs::File::open("/proc/self/stat").expect("open");
        let after = Reading::now();
        assert!(
            after.cpu_seconds >= before.cpu_seconds + 0.05,
            "{before:?} {after:?}"
        );
        assert!(after.resident_bytes > 1 << 20, "{after:?}");
        assert!(after.virtual_bytes >= after.resident_bytes, "{after:?}");
        assert!(
            after.open_fds >= 3 && after.open_fds <= after.max_fds,
            "{after:?}"
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        assert!(
            after.start_time_seconds > now - 3600.0 && after.start_time_seconds <= now + 1.0,
            "{after:?} now {now}"
        );
        drop(file);
    }
}
