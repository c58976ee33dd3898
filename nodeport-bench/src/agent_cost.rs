//! The agent's own cost (docs/BENCHMARKS.md): time to first full sync and resident memory at
//! 1,000 and 10,000 services, and change-to-map latency (p50, p99) of endpoint updates.
