//! `ambient-agent`: the command line. Parses flags, sets up logging, and
//! runs the agent or the demo; errors become messages and an exit code here.

use anyhow::Context;
use clap::{Parser, Subcommand};

use ambient_agent::admin::LogHandle;
use ambient_agent::capture::CaptureMode;
use ambient_agent::config::{Config, LogFormat, Overrides};

/// Node-level ambient mesh agent: mutual-TLS HBONE tunnels between
/// workloads, identity and L4 policy, without sidecars.
#[derive(Parser, Debug)]
#[command(name = "ambient-agent", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent: serve the local workloads of this node.
    ///
    /// With no configuration at all the agent runs on its embedded default:
    /// local mode, an empty mesh and a freshly generated CA.
    Run(Overrides),
    /// Build a small mesh on this machine (2 node and 3 pod network
    /// namespaces, needs root), send traffic between pods through the
    /// agents, print who talked to whom and what the wire saw, clean up.
    Demo {
        /// Bytes each demo client sends.
        #[arg(long, default_value_t = 1 << 20)]
        bytes: usize,
        /// Capture backend the agents use.
        #[arg(long, value_enum, default_value_t = CaptureMode::Nft)]
        capture: CaptureMode,
        /// Run without namespaces or root: two agents on 127.x addresses,
        /// capture stood in for.
        #[arg(long)]
        loopback: bool,
    },
    /// The demo's client application, run by the demo inside a pod.
    #[command(hide = true)]
    PodClient {
        addr: std::net::SocketAddr,
        len: usize,
        seed: u8,
    },
}

/// Installs the logger; the handle changes its filter at run time.
fn init_logging(level: &str, format: LogFormat) -> anyhow::Result<LogHandle> {
    LogHandle::init(level, format).context("setting up logging")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tune_allocator();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(overrides) => {
            let cfg = Config::load(&overrides).context("loading configuration")?;
            let log = init_logging(&cfg.log.level, cfg.log.format)?;
            let agent = ambient_agent::agent::Agent::start(cfg)
                .await
                .context("starting the agent")?;
            agent.admin().set_log_handle(log);
            // SIGTERM, ctrl-c or POST /quitquitquit.
            tokio::select! {
                r = wait_for_signal() => r?,
                () = agent.stopped() => {}
            }
            let deadline = agent.config().drain_timeout;
            agent.drain(deadline).await;
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
        Command::PodClient { addr, len, seed } => {
            ambient_agent::demo::client::main(addr, len, seed)
        }
    }
}

/// Keeps glibc from handing the copy path's large buffers (HTTP/2 frames up
/// to 1 MiB, 256 KiB socket reads) back to the kernel after every use: with
/// the default, adaptive thresholds each one is mapped, page-faulted in and
/// unmapped again, a few percent of the agent's CPU under load. Free memory
/// above 4 MiB at the top of a heap is still returned.
fn tune_allocator() {
    // SAFETY: mallopt only sets allocator parameters; called before the
    // agent allocates in earnest.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20);
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
