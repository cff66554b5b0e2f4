//! Benchmarks for the agent. Run on demand, never in CI, always in release:
//! `cargo bench -p ambient-benches` (criterion micro-benchmarks) and
//! `scripts/bench` (the side-by-side harness in network namespaces). Figures
//! are reported as ratios to a baseline measured in the same run (direct
//! TCP on the same addresses). See `benches/README.md`.

pub mod apps;
pub mod procstat;
