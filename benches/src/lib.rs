//! Benchmarks for the agent. Run on demand, never in CI, always in release:
//! `cargo bench -p ambient-benches` (criterion micro-benchmarks),
//! `scripts/bench` (the side-by-side harness in network namespaces) and
//! `scripts/bench scale` (load time, memory and update cost against mesh
//! size, [`meshgen`] and [`scale`]). The harness's figures are reported as
//! ratios to a baseline measured in the same run (direct TCP on the same
//! addresses). See `benches/README.md`.

pub mod apps;
pub mod meshgen;
pub mod nodes;
pub mod procstat;
pub mod scale;
