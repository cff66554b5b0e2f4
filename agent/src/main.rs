//! `ambient-agent`: the command line. Parses flags, sets up logging, and
//! runs the agent or the demo; errors become messages and an exit code here.

use anyhow::Context;
use clap::Parser as _;

use ambient_agent::admin::LogHandle;
use ambient_agent::cli::{Cli, Command, ProxyRole};
use ambient_agent::config::{Config, LogFormat, Mode};

/// Installs the logger; the handle changes its filter at run time.
fn init_logging(level: &str, format: LogFormat) -> anyhow::Result<LogHandle> {
    LogHandle::init(level, format).context("setting up logging")
}

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings: a background thread returns dirty pages after a
/// second, so memory freed after a burst goes back without waiting for
/// the next allocation; heap profiling built in but inactive until
/// `/debug/pprof/heap/profiling?activate=true`.
#[cfg(feature = "jemalloc")]
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: &[u8] =
    b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,prof:true,prof_active:false\0";

#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    ambient_agent::heap::tune();
    let cli = Cli::parse();
    let overrides = match cli.command {
        Command::Run(overrides) => overrides,
        Command::Proxy {
            role: ProxyRole::Ztunnel,
            mut overrides,
        } => {
            overrides.mode.get_or_insert(Mode::Istio);
            overrides
        }
        other => return runtime(None)?.block_on(other_command(other)),
    };
    let env = std::env::vars().collect();
    let (cfg, ignored) =
        Config::load_with_env(&overrides, &env).context("loading configuration")?;
    let log = init_logging(&cfg.log.level, cfg.log.format)?;
    for i in &ignored {
        tracing::warn!(var = %i.var, why = i.why, "ztunnel setting has no effect here");
    }
    runtime(cfg.worker_threads)?.block_on(run(cfg, log))
}

/// The multi-threaded runtime, with `workers` threads (else one per core).
fn runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    builder.enable_all().build().context("starting the runtime")
}

/// The agent, until SIGTERM, ctrl-c or POST /quitquitquit; then drains.
async fn run(cfg: Config, log: LogHandle) -> anyhow::Result<()> {
    tracing::info!(
        mode = ?cfg.mode,
        node = %cfg.node,
        workers = tokio::runtime::Handle::current().metrics().num_workers(),
        "starting"
    );
    let agent = ambient_agent::agent::Agent::start(cfg)
        .await
        .context("starting the agent")?;
    agent.admin().set_log_handle(log);
    tokio::select! {
        r = wait_for_signal() => r?,
        () = agent.stopped() => {}
    }
    let deadline = agent.config().drain_timeout;
    agent.drain(deadline).await;
    Ok(())
}

async fn other_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(_) | Command::Proxy { .. } => unreachable!("handled by main"),
        Command::Waypoint {
            workload,
            overrides,
        } => {
            let cfg = Config::load(&overrides).context("loading configuration")?;
            init_logging(&cfg.log.level, cfg.log.format)?;
            let waypoint = ambient_agent::waypoint::Waypoint::from_config(&cfg, &workload)
                .await
                .context("starting the waypoint")?;
            tracing::info!(addr = %waypoint.addr, "waypoint ready");
            wait_for_signal().await?;
            drop(waypoint);
            Ok(())
        }
        Command::Gateway {
            workload,
            overrides,
        } => {
            let cfg = Config::load(&overrides).context("loading configuration")?;
            init_logging(&cfg.log.level, cfg.log.format)?;
            let gateway = ambient_agent::gateway::Gateway::from_config(&cfg, &workload)
                .await
                .context("starting the gateway")?;
            tracing::info!(addrs = ?gateway.addrs, "gateway ready");
            wait_for_signal().await?;
            drop(gateway);
            Ok(())
        }
        Command::Uninstall => {
            let done = ambient_agent::capture::uninstall();
            for path in &done.removed {
                println!("removed capture from {}", path.display());
            }
            for (path, why) in &done.failed {
                eprintln!("could not remove capture from {}: {why}", path.display());
            }
            println!(
                "{} network namespaces checked, capture removed from {}",
                done.checked,
                done.removed.len()
            );
            anyhow::ensure!(
                done.failed.is_empty(),
                "capture left in {} namespaces",
                done.failed.len()
            );
            Ok(())
        }
        Command::Demo {
            bytes,
            capture,
            loopback,
        } => {
            init_logging("warn", LogFormat::Text)?;
            if loopback {
                ambient_agent::demo::loopback::run(bytes).await
            } else {
                ambient_agent::demo::run_netns(bytes, capture).await
            }
        }
        Command::PodHttp {
            addr,
            count,
            path,
            header,
        } => ambient_agent::demo::client::http_main(addr, count, path, header).await,
        Command::PodClient { addr, len, seed } => {
            ambient_agent::demo::client::main(addr, len, seed)
        }
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r.context("waiting for ctrl-c")?,
    }
    Ok(())
}
