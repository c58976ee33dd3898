//! The objects the agent watches, kept by kind and key. Both sources (Kubernetes watchers and the
//! manifests directory) feed the same `SourceEvent`s, so everything downstream is one pipeline.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::ResourceExt;

/// Namespace and name of an object (namespace empty for cluster-scoped objects like Node).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjKey {
    pub namespace: String,
    pub name: String,
}

impl ObjKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    pub fn of<K: ResourceExt>(obj: &K) -> Self {
        Self::new(obj.namespace().unwrap_or_default(), obj.name_any())
    }
}

impl fmt::Display for ObjKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}", self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        })
    }
}

/// One watched object.
// Objects are moved once from a source into the state; boxing them would only add allocations.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Resource {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Node(Node),
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Service(_) => Kind::Service,
            Resource::EndpointSlice(_) => Kind::EndpointSlice,
            Resource::Node(_) => Kind::Node,
        }
    }

    pub fn key(&self) -> ObjKey {
        match self {
            Resource::Service(o) => ObjKey::of(o),
            Resource::EndpointSlice(o) => ObjKey::of(o),
            Resource::Node(o) => ObjKey::of(o),
        }
    }
}

/// What a source reports.
#[derive(Clone, Debug, PartialEq)]
pub enum SourceEvent {
    /// Every object of a kind, as listed (a watcher's initial list or re-list, or a rescan of the
    /// manifests): objects of that kind missing from it are deleted.
    Snapshot(Kind, Vec<Resource>),
    /// An object was created or changed.
    Applied(Resource),
    /// An object was deleted.
    Deleted(Resource),
}

/// Everything watched, by kind and key; plus which kinds have delivered a first snapshot (no map
/// is written before all have: a partial view would delete services that are merely unseen).
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub services: BTreeMap<ObjKey, Service>,
    pub slices: BTreeMap<ObjKey, EndpointSlice>,
    pub nodes: BTreeMap<ObjKey, Node>,
    synced: BTreeSet<Kind>,
}

impl ClusterState {
    /// Applies an event; returns whether anything changed.
    pub fn apply(&mut self, event: SourceEvent) -> bool {
        match event {
            SourceEvent::Snapshot(kind, objects) => {
                self.synced.insert(kind);
                let mut fresh = ClusterState::default();
                for o in objects.into_iter().filter(|o| o.kind() == kind) {
                    fresh.upsert(o);
                }
                match kind {
                    Kind::Service => replace(&mut self.services, fresh.services),
                    Kind::EndpointSlice => replace(&mut self.slices, fresh.slices),
                    Kind::Node => replace(&mut self.nodes, fresh.nodes),
                }
            }
            SourceEvent::Applied(o) => self.upsert(o),
            SourceEvent::Deleted(o) => {
                let key = o.key();
                match o.kind() {
                    Kind::Service => self.services.remove(&key).is_some(),
                    Kind::EndpointSlice => self.slices.remove(&key).is_some(),
                    Kind::Node => self.nodes.remove(&key).is_some(),
                }
            }
        }
    }

    fn upsert(&mut self, o: Resource) -> bool {
        let key = o.key();
        match o {
            Resource::Service(s) => self.services.insert(key, s.clone()).as_ref() != Some(&s),
            Resource::EndpointSlice(s) => self.slices.insert(key, s.clone()).as_ref() != Some(&s),
            Resource::Node(n) => self.nodes.insert(key, n.clone()).as_ref() != Some(&n),
        }
    }

    /// Whether every kind in `kinds` has delivered its first snapshot.
    pub fn synced(&self, kinds: &[Kind]) -> bool {
        kinds.iter().all(|k| self.synced.contains(k))
    }
}

fn replace<V: PartialEq>(old: &mut BTreeMap<ObjKey, V>, new: BTreeMap<ObjKey, V>) -> bool {
    let changed = *old != new;
    *old = new;
    changed
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn svc(ns: &str, name: &str) -> Resource {
        Resource::Service(Service {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        })
    }

    #[test]
    fn snapshot_replaces_its_kind_and_marks_it_synced() {
        let mut s = ClusterState::default();
        assert!(!s.synced(&[Kind::Service]));
        assert!(s.apply(SourceEvent::Snapshot(
            Kind::Service,
            vec![svc("a", "x"), svc("a", "y")]
        )));
        assert!(s.synced(&[Kind::Service]));
        assert!(!s.synced(&Kind::ALL));
        // A re-list that omits y deletes it.
        assert!(s.apply(SourceEvent::Snapshot(Kind::Service, vec![svc("a", "x")])));
        assert_eq!(
            s.services.keys().collect::<Vec<_>>(),
            [&ObjKey::new("a", "x")]
        );
        // The same list again changes nothing.
        assert!(!s.apply(SourceEvent::Snapshot(Kind::Service, vec![svc("a", "x")])));
        assert!(s.apply(SourceEvent::Deleted(svc("a", "x"))));
        assert!(!s.apply(SourceEvent::Deleted(svc("a", "x"))));
        assert!(s.apply(SourceEvent::Applied(svc("b", "z"))));
        assert!(!s.apply(SourceEvent::Applied(svc("b", "z"))));
    }
}
