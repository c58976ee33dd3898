//! Benchmarks of docs/BENCHMARKS.md.
//!
//! - [`agent_cost`]: the agent's own cost: time to first full sync, resident memory, and
//!   change-to-map latency of endpoint updates.
pub mod agent_cost;
