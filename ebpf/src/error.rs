//! The one error type of the crate: what failed, on which object.

use std::io;
use std::net::IpAddr;
use std::path::PathBuf;

/// Why loading or attaching the capture failed.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The kernel refused an object (verifier, missing feature, no privilege).
    #[error("loading eBPF object {object}: {source}")]
    Load {
        object: &'static str,
        #[source]
        source: aya::EbpfError,
    },
    /// A program could not be loaded, attached or detached.
    #[error("eBPF program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A link could not be inspected.
    #[error("eBPF link of {program}: {source}")]
    Link {
        program: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    /// BPF_LINK_DETACH failed.
    #[error("detaching the link of {program}: {source}")]
    Detach {
        program: &'static str,
        #[source]
        source: io::Error,
    },
    /// A map is missing from an object or an update failed.
    #[error("eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    /// The pod's network namespace could not be opened or entered.
    #[error("network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A cgroup could not be found or opened.
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// No cgroup v2 hierarchy is mounted (cgroup programs need one).
    #[error("no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup)")]
    NoCgroup2,
    /// The clsact qdisc could not be added (legacy tc attach).
    #[error("adding the clsact qdisc on {interface}: {source}")]
    Qdisc {
        interface: String,
        #[source]
        source: aya::programs::tc::TcError,
    },
    /// The clsact qdisc this crate added could not be removed.
    #[error("removing the clsact qdisc on {interface}: {source}")]
    QdiscDelete {
        interface: String,
        #[source]
        source: io::Error,
    },
    /// The pod has no address to capture for.
    #[error("the pod has no IP address")]
    NoPodAddress,
    /// The address or network namespace is already attached by this capture.
    #[error("already attached: {0}")]
    AlreadyAttached(String),
    /// An address given twice in one pod, or of an unusable kind.
    #[error("unusable pod address {0}")]
    BadAddress(IpAddr),
    /// The helper thread that enters the network namespace died.
    #[error("the network namespace thread panicked")]
    ThreadPanicked,
}
