//! What a scale run measured, and the summary of all runs: one markdown
//! table, then RSS per workload between the smallest and largest mesh and
//! the peak/steady ratios, per source.

use std::time::Duration;

use super::{mib, Source};

/// One change, installed.
#[derive(Clone, Copy, Debug)]
pub struct Change {
    /// From the file in place to `ambient_mesh_updates_total` moving.
    pub wall: Duration,
    /// `ambient_mesh_update_last_seconds` afterwards.
    pub in_agent: f64,
    /// The agent's CPU time over `wall`.
    pub agent_cpu: Duration,
    /// xDS: from the write to the control plane's "pushed" line.
    pub pushed: Option<Duration>,
}

/// Single-workload changes made one after another.
#[derive(Clone, Debug, Default)]
pub struct Series {
    pub done: Vec<Change>,
    /// The one after the last done took longer than the step timeout.
    pub timed_out: bool,
}

impl Series {
    pub fn mean_wall(&self) -> Option<Duration> {
        let n = u32::try_from(self.done.len()).ok().filter(|n| *n > 0)?;
        Some(self.done.iter().map(|c| c.wall).sum::<Duration>() / n)
    }

    pub fn max_wall(&self) -> Option<Duration> {
        self.done.iter().map(|c| c.wall).max()
    }

    /// Mean `ambient_mesh_update_last_seconds` and agent CPU per change
    /// (`None` if none was done).
    pub fn mean_in_agent_and_cpu(&self) -> Option<(f64, f64)> {
        if self.done.is_empty() {
            return None;
        }
        let n = self.done.len() as f64;
        let mean = |f: fn(&Change) -> f64| self.done.iter().map(f).sum::<f64>() / n;
        Some((mean(|c| c.in_agent), mean(|c| c.agent_cpu.as_secs_f64())))
    }
}

/// What one (size, source) run measured.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub n: usize,
    /// Agent start to the whole mesh in its metrics.
    pub ready: Duration,
    /// The agent's CPU time until then.
    pub load_cpu: Duration,
    /// RSS once settled after the load, and the peak until then.
    pub rss_loaded: u64,
    pub peak_loaded: u64,
    /// `Err(when it was installed)`: it timed out.
    pub change: Result<Change, Duration>,
    pub series: Series,
    /// RSS after the series, and the peak until then.
    pub rss_changed: u64,
    pub peak_end: u64,
    /// Idle CPU after the series, % of one core.
    pub idle_pct: f64,
}

impl Outcome {
    pub fn peak_ratio(&self) -> f64 {
        self.peak_loaded as f64 / self.rss_loaded.max(1) as f64
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Prints every run's figures (errors as failed rows) and the slopes.
pub fn summary(results: &[(usize, Source, Result<Outcome, String>)], changes: usize, idle: u64) {
    let f3 = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{:.3}", secs(d)));
    println!("\n## Scale: agent against mesh size ({changes} changes, idle {idle} s)\n");
    println!(
        "| workloads | source | ready (s) | load CPU (s) | RSS loaded (MiB) | peak (MiB) \
         | peak/steady | change wall (s) | control plane pushed at (s) | change in agent (s) \
         | change CPU (s) | changes done | change wall mean / max (s) \
         | RSS after changes (MiB) | peak at end (MiB) | idle CPU (%) |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (n, source, r) in results {
        let o = match r {
            Ok(o) => o,
            Err(e) => {
                let first = e.lines().next().unwrap_or_default();
                let short: String = first.chars().take(100).collect();
                println!("| {n} | {} | failed: {short} |", source.name());
                continue;
            }
        };
        let wall = match o.change {
            Ok(c) => format!("{:.3}", secs(c.wall)),
            Err(late) => format!("timeout ({:.1})", secs(late)),
        };
        let c = o.change.ok();
        let pushed = f3(c.and_then(|c| c.pushed));
        let in_agent = c.map_or("-".into(), |c| format!("{:.4}", c.in_agent));
        let cpu = f3(c.map(|c| c.agent_cpu));
        let timed_out = if o.series.timed_out { " (timeout)" } else { "" };
        println!(
            "| {n} | {} | {:.2} | {:.2} | {:.1} | {:.1} | {:.2} | {wall} | {pushed} | {in_agent} \
             | {cpu} | {}{timed_out} | {} / {} | {:.1} | {:.1} | {:.2} |",
            source.name(),
            secs(o.ready),
            secs(o.load_cpu),
            mib(o.rss_loaded),
            mib(o.peak_loaded),
            o.peak_ratio(),
            o.series.done.len(),
            f3(o.series.mean_wall()),
            f3(o.series.max_wall()),
            mib(o.rss_changed),
            mib(o.peak_end),
            o.idle_pct,
        );
    }
    println!();
    for source in [Source::Local, Source::Xds] {
        let ok: Vec<&Outcome> = results
            .iter()
            .filter(|(_, s, _)| *s == source)
            .filter_map(|(_, _, r)| r.as_ref().ok())
            .collect();
        let (Some(small), Some(large)) =
            (ok.iter().min_by_key(|o| o.n), ok.iter().max_by_key(|o| o.n))
        else {
            continue;
        };
        if small.n == large.n {
            continue;
        }
        let per = (large.rss_loaded as f64 - small.rss_loaded as f64) / (large.n - small.n) as f64;
        let ratios: Vec<String> = ok
            .iter()
            .map(|o| format!("{:.2} ({})", o.peak_ratio(), o.n))
            .collect();
        println!(
            "- {}: {per:.0} B of RSS per workload ({} -> {} workloads, steady after load); \
             peak/steady after load {}",
            source.name(),
            small.n,
            large.n,
            ratios.join(", ")
        );
    }
}
