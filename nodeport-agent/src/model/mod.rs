//! Cluster state as the agent sees it, and what it means for this node's maps.
//!
//! `cluster` holds the objects (Services, EndpointSlices, this Node) fed by the sources
//! (Kubernetes watchers or a manifests directory) as `SourceEvent`s; `desired` turns them into
//! the map state kube-proxy's rules would give, as pure functions.
pub mod cluster;

pub use cluster::{ClusterState, Kind, ObjKey, Resource, SourceEvent};
pub mod desired;
pub mod validate;
