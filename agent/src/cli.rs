//! The `ambient-agent` command line, in the library so that whatever runs
//! the binary (the DaemonSet manifest, tests) can be checked against the
//! flags it really accepts.

use clap::{Parser, Subcommand};

use crate::capture::CaptureMode;
use crate::config::Overrides;

/// Node-level ambient mesh agent: mutual-TLS HBONE tunnels between
/// workloads, identity and L4 policy, without sidecars.
#[derive(Parser, Debug)]
#[command(name = "ambient-agent", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent: serve the local workloads of this node.
    ///
    /// With no configuration at all the agent runs on its embedded default:
    /// local mode, an empty mesh and a freshly generated CA.
    Run(Overrides),
    /// ztunnel's command line (`proxy ztunnel`, as Istio's ztunnel chart
    /// runs it): the agent in Istio mode, configured by ztunnel's
    /// environment variables.
    Proxy {
        /// The proxy role; only ztunnel's is served.
        #[arg(value_enum, default_value_t = ProxyRole::Ztunnel)]
        role: ProxyRole,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Build a small mesh on this machine (2 node and 6 pod network
    /// namespaces, needs root), send traffic between pods through the
    /// agents and HTTP through a waypoint, print who talked to whom and
    /// what the wire saw, clean up.
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
    /// Remove the agent's capture from every network namespace of this
    /// host (pods' and named ones). Stopping the agent leaves capture in
    /// place on purpose, so pods fail closed until an agent serves them
    /// again; run this to take the agent off a node for good. Needs root.
    Uninstall,
    /// Run the reference waypoint: terminate HBONE as mesh workload
    /// `--workload`, apply the mesh's HTTP routes (403 deny, weighted
    /// subsets) to HTTP/1.1 requests, and forward each over HBONE.
    Waypoint {
        /// The waypoint's workload uid in the mesh.
        #[arg(long)]
        workload: String,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Run an east-west gateway: terminate double HBONE from other
    /// networks as mesh workload `--workload` and splice each stream,
    /// unopened, to an endpoint of the named service on this network.
    Gateway {
        /// The gateway's workload uid in the mesh.
        #[arg(long)]
        workload: String,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// The demo's HTTP client, run by the demo inside a pod.
    #[command(hide = true)]
    PodHttp {
        addr: std::net::SocketAddr,
        count: usize,
        path: String,
        header: Option<String>,
    },
    /// The demo's client application, run by the demo inside a pod.
    #[command(hide = true)]
    PodClient {
        addr: std::net::SocketAddr,
        len: usize,
        seed: u8,
    },
}

/// The roles `ambient-agent proxy` takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyRole {
    Ztunnel,
}

/// Every environment variable `ambient-agent run` reads: its flags' own
/// and those configuration defaults come from.
pub fn run_env_vars() -> Vec<String> {
    use clap::CommandFactory as _;
    let cli = Cli::command();
    let mut vars: Vec<String> = cli
        .find_subcommand("run")
        .into_iter()
        .flat_map(|run| run.get_arguments())
        .filter_map(|arg| arg.get_env())
        .map(|env| env.to_string_lossy().into_owned())
        .collect();
    vars.extend(crate::config::DEFAULT_ENV.iter().map(|v| v.to_string()));
    vars
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_flags_parse_and_unknown_ones_are_refused() {
        let cli = Cli::try_parse_from(["ambient-agent", "run", "--config", "/etc/a.yaml"])
            .expect("parses");
        let Command::Run(o) = cli.command else {
            panic!("not run: {cli:?}");
        };
        assert_eq!(o.config, Some("/etc/a.yaml".into()));
        assert!(Cli::try_parse_from(["ambient-agent", "run", "--confg", "x"]).is_err());
    }

    #[test]
    fn ztunnels_arguments_parse() {
        // Istio's ztunnel chart: `args: ["proxy", "ztunnel"]`.
        let cli = Cli::try_parse_from(["ambient-agent", "proxy", "ztunnel"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Proxy {
                role: ProxyRole::Ztunnel,
                ..
            }
        ));
        assert!(Cli::try_parse_from(["ambient-agent", "proxy", "waypoint"]).is_err());
    }

    #[test]
    fn env_vars_include_flags_and_defaults() {
        let vars = run_env_vars();
        for v in ["AMBIENT_NODE", "AMBIENT_CONFIG", "NODE_NAME", "INSTANCE_IP"] {
            assert!(vars.iter().any(|x| x == v), "{v} not in {vars:?}");
        }
    }
}
