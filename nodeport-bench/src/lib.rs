//! Benchmarks of docs/BENCHMARKS.md.
//!
//! - [`agent_cost`]: the agent's own cost: time to first full sync, resident memory, and
//!   change-to-map latency of endpoint updates.
//! - [`kubeproxy`]: the rules kube-proxy would write (iptables and nftables modes) for the same
//!   Services and EndpointSlices, to compare against.
//! - [`run`]: client → nodeIP:nodePort → pod for the direct path, ours (XDP, TC) and kube-proxy
//!   (iptables, nftables) in one lab and one run: [`scenario`] (the objects), [`dataplane`]
//!   (switching a lab between them), [`load`] (the load generator), [`report`] (medians, ratios,
//!   the markdown section and the plot).
pub mod agent_cost;
pub mod dataplane;
pub mod kubeproxy;
pub mod load;
pub mod report;
pub mod run;
pub mod scenario;
