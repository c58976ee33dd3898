//! Benchmarks of docs/BENCHMARKS.md.
//!
//! - [`agent_cost`]: the agent's own cost: time to first full sync, resident memory, and
//!   change-to-map latency of endpoint updates.
//! - [`kubeproxy`]: the rules kube-proxy would write (iptables and nftables modes) for the same
//!   Services and EndpointSlices, to compare against.
pub mod agent_cost;
pub mod kubeproxy;
