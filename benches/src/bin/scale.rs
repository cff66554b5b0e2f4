//! `scale`: what a big mesh costs the agent. For each mesh size
//! (`--sizes`, in workloads; with N/10 services of 10 endpoints and 1,000
//! L4 authorization policies, see `ambient_benches::meshgen`) and each
//! source of it — the mesh file in local mode, and Delta xDS from
//! `ambient-control-plane` serving the same file in Istio mode — one
//! `ambient-agent` process runs on loopback for a node no workload is on
//! (it serves no pod, so only the mesh state is measured), and this
//! reports:
//!
//! - time to ready: agent start until its `/metrics` show the whole mesh,
//!   and the agent's CPU time until then;
//! - its RSS 2 s after the load, and the peak so far (`VmHWM`);
//! - one workload changed (its service account; the file replaced
//!   atomically): wall time from the write until `ambient_mesh_updates_total`
//!   moves, the agent's own `ambient_mesh_update_last_seconds`, its CPU
//!   time in between (over xDS also when the control plane pushed it);
//! - its RSS after `--changes` more single-workload changes (each a
//!   different workload marked unhealthy, each awaited in turn);
//! - its idle CPU over `--idle-secs` after that, as % of one core.
//!
//! Then a markdown table of every run, bytes of RSS per workload between
//! the smallest and largest size, and peak/steady ratios. Needs no root.
//! Run with `scripts/bench scale`; see `benches/README.md`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ambient_benches::meshgen::{self, Edits, POLICIES};
use ambient_benches::scale::report::{self, Change, Outcome, Series};
use ambient_benches::scale::setup::{self, AgentPorts, ControlPlane, CP_POLL};
use ambient_benches::scale::{self as sc, mib, MeshMetrics, Proc, Source};
use anyhow::{bail, Context};
use clap::Parser;

/// How often `/metrics` is read while waiting for an update.
const POLL: Duration = Duration::from_millis(50);
/// How long `/healthz/ready` is still watched once the mesh is loaded.
const READY_GRACE: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(about = "Agent load time, memory, update cost and idle CPU against mesh size")]
struct Args {
    /// Mesh sizes, in workloads (multiples of 100, at least 1000).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,50000,100000")]
    sizes: Vec<usize>,
    /// Where the agent gets the mesh from.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "local,xds")]
    sources: Vec<Source>,
    /// Seconds of idle CPU measured after the changes.
    #[arg(long, default_value_t = 30)]
    idle_secs: u64,
    /// Single-workload changes made one after another before RSS and idle
    /// CPU are measured again.
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// Seconds a change may take to be installed before it counts as
    /// timed out (the rest of that run's changes are then skipped).
    #[arg(long, default_value_t = 60)]
    step_timeout: u64,
    /// Seconds the control plane's start, the agent's initial load and a
    /// timed-out change's late arrival may take before the run fails.
    #[arg(long, default_value_t = 900)]
    load_timeout: u64,
    /// Local mode: the agent's `meshPollInterval`, in milliseconds (its
    /// default is 1 s).
    #[arg(long, default_value_t = 1000)]
    mesh_poll_ms: u64,
    /// Seconds to let the agent settle after loading before reading its RSS.
    #[arg(long, default_value_t = 2)]
    settle_secs: u64,
    /// The agent's log filter.
    #[arg(long, default_value = "warn")]
    agent_log: String,
    /// `ambient-agent` binary [default: next to this one].
    #[arg(long)]
    agent: Option<PathBuf>,
    /// `ambient-control-plane` binary [default: next to this one].
    #[arg(long)]
    control_plane: Option<PathBuf>,
}

struct Bins {
    agent: PathBuf,
    control_plane: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    sc::stop_on_signals();
    for &n in &args.sizes {
        meshgen::check_size(n).map_err(anyhow::Error::msg)?;
    }
    if cfg!(debug_assertions) {
        eprintln!("warning: debug build; figures are only meaningful in release");
    }
    let bins = Bins {
        agent: sibling(args.agent.as_ref(), "ambient-agent")?,
        control_plane: sibling(args.control_plane.as_ref(), "ambient-control-plane")?,
    };
    println!(
        "scale: sizes {:?}, sources {:?}, {} changes, idle {} s, step timeout {} s; \
         agent meshPollInterval {} ms, control plane file poll {} ms, /metrics polled every {} ms",
        args.sizes,
        args.sources,
        args.changes,
        args.idle_secs,
        args.step_timeout,
        args.mesh_poll_ms,
        CP_POLL.as_millis(),
        POLL.as_millis()
    );
    println!(
        "(each write waits a spread fraction of the file's poll interval first, so a change \
         waits half an interval on average for the poll; a wall time is that plus the work)"
    );
    let mut results = Vec::new();
    for &n in &args.sizes {
        if sc::interrupted() {
            break;
        }
        let started = Instant::now();
        let base = meshgen::mesh_yaml(n, &Edits::default());
        println!(
            "\n== {n} workloads, {} services, {POLICIES} policies: mesh file {:.1} MB (generated in {:.2} s)",
            meshgen::services(n),
            base.len() as f64 / 1e6,
            started.elapsed().as_secs_f64()
        );
        for &source in &args.sources {
            if sc::interrupted() {
                break;
            }
            println!("-- {n} workloads from the {}", source.name());
            let result = run(&args, &bins, n, source, &base).map_err(|e| format!("{e:#}"));
            if let Err(e) = &result {
                println!("   FAILED: {e}");
            }
            results.push((n, source, result));
        }
    }
    report::summary(&results, args.changes, args.idle_secs);
    let failed = results.iter().filter(|r| r.2.is_err()).count();
    if failed > 0 {
        bail!("{failed} run(s) failed");
    }
    Ok(())
}

/// `given`, or `name` next to this binary; it must exist.
fn sibling(given: Option<&PathBuf>, name: &str) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory for this binary")?
            .join(name),
    };
    if !path.exists() {
        bail!(
            "{} is missing: build it in release (scripts/bench scale does)",
            path.display()
        );
    }
    Ok(path)
}

/// One agent, its mesh source and the state of its file. Fields drop in
/// order: the processes before the directory they use.
struct Bench<'a> {
    args: &'a Args,
    n: usize,
    agent: Proc,
    cp: Option<ControlPlane>,
    ports: AgentPorts,
    mesh: PathBuf,
    /// How often the mesh file is read by whoever reads it.
    file_poll: Duration,
    edits: Edits,
    /// Changes made so far.
    changes: u32,
    _dir: tempfile::TempDir,
}

/// Measures `n` workloads from `source`, the mesh file starting as `base`.
fn run(args: &Args, bins: &Bins, n: usize, source: Source, base: &str) -> anyhow::Result<Outcome> {
    let dir = tempfile::Builder::new()
        .prefix("ambient-scale-")
        .tempdir()
        .context("making a temporary directory")?;
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(&mesh, base).context("writing the mesh file")?;
    let load_timeout = Duration::from_secs(args.load_timeout);
    let cp = match source {
        Source::Local => None,
        Source::Xds => Some(setup::start_control_plane(
            &bins.control_plane,
            dir.path(),
            &mesh,
            load_timeout,
        )?),
    };
    let ports = AgentPorts::free()?;
    let mesh_poll = Duration::from_millis(args.mesh_poll_ms);
    let config = dir.path().join("agent.yaml");
    let settings = cp.as_ref().map(|c| &c.settings);
    let yaml = setup::agent_config(&ports, &args.agent_log, &mesh, mesh_poll, settings);
    std::fs::write(&config, yaml).context("writing the agent's config")?;
    let started = Instant::now();
    let agent = setup::spawn_agent(&bins.agent, &config, &dir.path().join("agent.log"))?;
    let mut bench = Bench {
        args,
        n,
        agent,
        cp,
        ports,
        mesh,
        file_poll: setup::file_poll(source, mesh_poll),
        edits: Edits::default(),
        changes: 0,
        _dir: dir,
    };
    bench.measure(started)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl Bench<'_> {
    fn measure(&mut self, started: Instant) -> anyhow::Result<Outcome> {
        let n = self.n;
        let (ready, load_cpu, probe) = self.wait_loaded(started)?;
        println!(
            "   loaded in {:.2} s (/healthz/ready 200 at {}), agent CPU {:.2} s",
            secs(ready),
            probe.map_or("-".into(), |p| format!("{:.2} s", secs(p))),
            secs(load_cpu)
        );
        sc::nap(Duration::from_secs(self.args.settle_secs))?;
        let (rss_loaded, peak_loaded) = (self.agent.rss()?, self.agent.peak_rss()?);
        println!(
            "   RSS {} s after: {:.1} MiB, peak {:.1} MiB",
            self.args.settle_secs,
            mib(rss_loaded),
            mib(peak_loaded)
        );

        let first = n / 2;
        let change = self.change(|e| {
            e.service_account.insert(first, "sa-changed".into());
        })?;
        match change {
            Ok(c) => println!(
                "   one change (service account of {}): installed {:.3} s after the write{}, \
                 in agent {:.4} s, agent CPU {:.3} s",
                meshgen::uid(first),
                secs(c.wall),
                c.pushed.map_or(String::new(), |p| format!(
                    " (pushed by the control plane at {:.3} s)",
                    secs(p)
                )),
                c.in_agent,
                secs(c.agent_cpu)
            ),
            Err(late) => println!(
                "   one change: TIMED OUT (over {} s; installed after {:.1} s); no more changes",
                self.args.step_timeout,
                secs(late)
            ),
        }

        // Each a different workload (never `first`), marked unhealthy.
        let changes = self.args.changes.min(n / 10);
        let step = n / changes.max(1);
        let mut series = Series {
            timed_out: change.is_err(),
            ..Series::default()
        };
        let t = Instant::now();
        for k in 0..changes {
            if series.timed_out {
                break;
            }
            match self.change(|e| {
                e.unhealthy.insert(k * step + 1);
            })? {
                Ok(c) => series.done.push(c),
                Err(late) => {
                    println!(
                        "   change {} TIMED OUT (installed after {:.1} s)",
                        k + 1,
                        secs(late)
                    );
                    series.timed_out = true;
                }
            }
        }
        // As after the load: what the last change freed is handed back
        // just after it is installed, so RSS is read once that is done.
        sc::nap(Duration::from_secs(self.args.settle_secs))?;
        let (rss_changed, peak_end) = (self.agent.rss()?, self.agent.peak_rss()?);
        let f3 = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{:.3} s", secs(d)));
        let per_change = series
            .mean_in_agent_and_cpu()
            .map_or(String::new(), |(a, c)| {
                format!("; per change in agent {a:.4} s, agent CPU {c:.3} s")
            });
        println!(
            "   {} of {changes} changes in {:.1} s (wall mean {}, max {}{per_change}); \
             RSS after {:.1} MiB, peak {:.1} MiB",
            series.done.len(),
            secs(t.elapsed()),
            f3(series.mean_wall()),
            f3(series.max_wall()),
            mib(rss_changed),
            mib(peak_end)
        );

        let idle = Duration::from_secs(self.args.idle_secs);
        let cpu0 = self.agent.cpu()?;
        let cp0 = self.cp.as_ref().map(|c| c.proc.cpu()).transpose()?;
        sc::nap(idle)?;
        self.agent.check_alive()?;
        let idle_pct = 100.0 * secs(self.agent.cpu()? - cpu0) / secs(idle);
        let cp_idle = match (&self.cp, cp0) {
            (Some(c), Some(c0)) => format!(
                " (control plane {:.2} %)",
                100.0 * secs(c.proc.cpu()? - c0) / secs(idle)
            ),
            _ => String::new(),
        };
        println!(
            "   idle {} s: agent {idle_pct:.2} % of a core{cp_idle}",
            self.args.idle_secs
        );
        Ok(Outcome {
            n,
            ready,
            load_cpu,
            rss_loaded,
            peak_loaded,
            change,
            series,
            rss_changed,
            peak_end,
            idle_pct,
        })
    }

    /// Waits for the whole mesh in the agent's metrics. Returns when it
    /// was there and the agent's CPU time then; and when `/healthz/ready`
    /// first said 200, if it did by then or within `READY_GRACE` after.
    fn wait_loaded(
        &mut self,
        started: Instant,
    ) -> anyhow::Result<(Duration, Duration, Option<Duration>)> {
        let deadline = started + Duration::from_secs(self.args.load_timeout);
        let want = (
            self.n as u64,
            meshgen::services(self.n) as u64,
            POLICIES as u64,
        );
        let mut probe = None;
        let mut loaded = None;
        loop {
            self.agent.check_alive()?;
            if probe.is_none()
                && sc::http_get(self.ports.readiness_addr(), "/healthz/ready")
                    .is_ok_and(|(s, _)| s == 200)
            {
                probe = Some(started.elapsed());
            }
            if let Some((at, cpu)) = loaded {
                if probe.is_some() || started.elapsed() > at + READY_GRACE {
                    return Ok((at, cpu, probe));
                }
                sc::nap(POLL)?;
                continue;
            }
            let last = match MeshMetrics::scrape(self.ports.metrics_addr()) {
                Ok(m) if (m.workloads, m.services, m.policies) == want => {
                    loaded = Some((started.elapsed(), self.agent.cpu()?));
                    continue;
                }
                Ok(m) => format!("{m:?}"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!(
                    "mesh not loaded after {} s; last /metrics: {last}",
                    self.args.load_timeout
                );
            }
            sc::nap(POLL)?;
        }
    }

    /// Applies `edit` to the mesh file (replaced atomically) and waits for
    /// the agent to install the result. `Err(when it was installed)` if
    /// that took longer than `--step-timeout`: it is still waited for (up
    /// to `--load-timeout`), so that what follows starts from a quiet agent.
    fn change(
        &mut self,
        edit: impl FnOnce(&mut Edits),
    ) -> anyhow::Result<Result<Change, Duration>> {
        edit(&mut self.edits);
        let text = meshgen::mesh_yaml(self.n, &self.edits);
        let metrics = self.ports.metrics_addr();
        let before = MeshMetrics::scrape(metrics)?;
        if let Some(cp) = &self.cp {
            while cp.stderr.try_recv().is_ok() {}
        }
        // Written at a spread phase of the reader's poll (the golden
        // ratio's multiples, mod 1): one change after another would
        // otherwise always land just after a poll and wait a whole interval.
        self.changes += 1;
        let phase = (f64::from(self.changes) * 0.618_033_988_7).fract();
        sc::nap(self.file_poll.mul_f64(phase))?;
        let cpu0 = self.agent.cpu()?;
        sc::write_atomic(&self.mesh, &text)?;
        let written = Instant::now();
        let timeout = Duration::from_secs(self.args.step_timeout);
        let give_up = Duration::from_secs(self.args.load_timeout);
        loop {
            self.agent.check_alive()?;
            if let Ok(m) = MeshMetrics::scrape(metrics) {
                if m.updates > before.updates {
                    let wall = written.elapsed();
                    if wall > timeout {
                        return Ok(Err(wall));
                    }
                    let pushed = self.cp.as_ref().and_then(|cp| {
                        cp.stderr
                            .try_iter()
                            .find(|(at, line)| *at >= written && line.starts_with("mesh changed"))
                            .map(|(at, _)| at - written)
                    });
                    return Ok(Ok(Change {
                        wall,
                        in_agent: m.update_last_seconds,
                        agent_cpu: self.agent.cpu()? - cpu0,
                        pushed,
                    }));
                }
            }
            if written.elapsed() > give_up {
                bail!(
                    "a change not installed after {} s (--load-timeout)",
                    self.args.load_timeout
                );
            }
            sc::nap(POLL)?;
        }
    }
}
