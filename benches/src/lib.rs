//! Benchmarks for the agent. Run on demand, never in CI, always in release:
//! `cargo bench -p ambient-benches`. Figures are reported as ratios to a
//! baseline measured in the same run (direct TCP on the same addresses).
