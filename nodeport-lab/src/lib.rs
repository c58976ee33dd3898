//! The lab: a kind-like Kubernetes cluster on one machine, in network namespaces, served by the
//! NodePort dataplane.
//!
//! - [`lab`]: the topology (a bridge as "the docker network", one namespace per node, pods behind
//!   veths, a client outside the cluster), one `nodeport-agent` per node, and the lifecycle
//!   (`up`, `apply`, `down`, `leftovers`).
//! - [`workload`]: the control plane as pure functions: Deployments and Services from YAML, pod
//!   placement, the EndpointSlices the EndpointSlice controller would write, and what each
//!   node's maps must then hold.
//! - [`report`]: what `cargo xtask lab` prints.
//! - [`load`]: long-lived and new connections from the client namespace, and the reliability
//!   scenarios (agent restarts and upgrades, backend churn) that run under it.
//! - The `nodeport-echo` binary is the pods' server (HTTP and UDP, answers JSON naming the node,
//!   the pod, its address and the client address it saw), and with `get` the client that pods
//!   and nodes run ([`probe`]): socket load balancing acts per process, by cgroup.
pub mod lab;
pub mod load;
pub mod probe;
pub mod report;
pub mod sys;
pub mod workload;

pub use lab::{
    Answer, ApplyReport, CLIENT_ADDR, ClientError, Config, DEFAULT_PREFIX, Lab, STATE_ROOT, down,
    leftovers, up,
};
