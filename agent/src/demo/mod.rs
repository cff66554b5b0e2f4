//! `ambient-agent demo`: the agent's main job on the embedded default,
//! shown end to end on this machine.
//!
//! - [`netns`] (default, needs root): two node namespaces and three pods,
//!   real capture, two agents, traffic between pods, the wire watched;
//! - [`loopback`] (no privilege): two agents on 127.x addresses with capture
//!   stood in for.

pub mod client;
pub mod loopback;
mod netns;
pub mod topology;

pub use netns::run as run_netns;
