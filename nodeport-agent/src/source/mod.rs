//! Where cluster state comes from: Kubernetes watchers (`kube`) or a directory of manifests
//! (`manifests`). Both send the same [`SourceEvent`](crate::model::SourceEvent)s into one
//! `tokio::sync::mpsc` channel, so everything downstream (the `ClusterState`, the semantics, the
//! map writer) is one pipeline whichever source feeds it.
//!
//! Both sources begin with a [`Snapshot`](crate::model::SourceEvent::Snapshot) of every kind they
//! serve (Service, EndpointSlice, Node), so the consumer can hold back writing the maps until
//! `ClusterState::synced(&Kind::ALL)`; both re-send snapshots whenever they re-read everything
//! (a watcher's re-list, a changed manifests directory), and objects missing from a snapshot are
//! deleted. A source never sends anything that means "forget everything" on an error: while the
//! API server is unreachable nothing is sent, so the last known state keeps being served.

pub mod kube;
pub mod manifests;
