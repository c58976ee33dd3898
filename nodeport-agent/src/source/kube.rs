//! The Kubernetes source: three `kube::runtime::watcher`s (Services and EndpointSlices in every
//! namespace, this node's Node object) turned into [`SourceEvent`]s.
//!
//! Each watcher starts with a list (paginated, `limit=500`) and then watches from the list's
//! resourceVersion, following bookmarks. Its list arrives as `Init`, `InitApply`…, `InitDone`;
//! those are buffered and sent as one [`SourceEvent::Snapshot`], so objects missing from a re-list
//! are deleted downstream. A watch that fails with 410 Gone (resource version too old) makes the
//! watcher list again, which arrives as a new Snapshot. Every error is logged and retried with
//! kube's default backoff (client-go's: 800 ms doubling to 30 s, jittered, reset after 120 s of
//! health), forever: while the API server is unreachable nothing is sent, so downstream keeps
//! serving the last known state.
//!
//! The selectors are kube-proxy's, so this agent programs exactly the Services kube-proxy would:
//! see [`SERVICE_LABEL_SELECTOR`], [`SERVICE_FIELD_SELECTOR`] and
//! [`ENDPOINTSLICE_LABEL_SELECTOR`]. [`WATCHES`] describes every watch (resource, verbs,
//! selectors) so RBAC rules can be derived from this code.

use std::{borrow::Cow, fmt::Debug, path::Path, pin::pin};

use futures::StreamExt as _;
use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Config,
    config::{InferConfigError, KubeConfigOptions, Kubeconfig, KubeconfigError},
    runtime::{WatchStreamExt as _, watcher},
};
use serde::{Deserialize, Deserializer, de::DeserializeOwned};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::model::{Kind, ObjKey, Resource, SourceEvent};

/// Services that name another proxy (`service.kubernetes.io/service-proxy-name`) are that proxy's
/// to implement. kube-proxy's Service informer uses exactly this label selector (cmd/kube-proxy/app
/// /server.go, `labelSelectorNoProxyName`).
pub const SERVICE_LABEL_SELECTOR: &str = "!service.kubernetes.io/service-proxy-name";

/// Headless Services (`clusterIP: None`) are never proxied; kube-proxy filters them server-side
/// with this field selector since Kubernetes 1.32 (kubernetes/kubernetes#126769; the API server
/// supports it from 1.31, older than any version this agent supports). The semantics layer still
/// skips headless Services itself, so manifests behave the same.
pub const SERVICE_FIELD_SELECTOR: &str = "spec.clusterIP!=None";

/// EndpointSlices of headless Services (labelled `service.kubernetes.io/headless` by the
/// EndpointSlice controller) and of Services that name another proxy (the controller copies the
/// Service's labels onto its slices). This is the selector kube-proxy's shared informer factory put
/// on EndpointSlices (`!headless,!service-proxy-name`, in `labels.Selector.String()`'s key order)
/// up to Kubernetes 1.35; kube-proxy 1.36 (kubernetes/kubernetes#134623) selects only
/// `!service.kubernetes.io/headless` for slices, which differs only for slices whose Service is
/// filtered out anyway.
pub const ENDPOINTSLICE_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name";

/// One watch the Kubernetes source opens: enough to write its RBAC rule and to read what it asks
/// the API server for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watch {
    pub kind: Kind,
    /// API group: "" for the core group.
    pub group: &'static str,
    pub version: &'static str,
    /// Plural resource name, as RBAC rules and URLs spell it.
    pub resource: &'static str,
    /// Whether the resource is namespaced; namespaced ones are watched in every namespace, so all
    /// three need a ClusterRole.
    pub namespaced: bool,
    pub verbs: &'static [&'static str],
    pub label_selector: Option<&'static str>,
    pub field_selector: Option<&'static str>,
    /// Whether the watch is narrowed to this node's object (`fieldSelector=metadata.name=<node>`).
    pub this_node_only: bool,
}

impl Watch {
    /// The field selector sent for this watch on node `node_name`.
    pub fn field_selector_for(&self, node_name: &str) -> Option<String> {
        if self.this_node_only {
            Some(format!("metadata.name={node_name}"))
        } else {
            self.field_selector.map(str::to_owned)
        }
    }

    /// The watcher configuration for this watch on node `node_name`.
    pub fn config(&self, node_name: &str) -> watcher::Config {
        let mut config = watcher::Config::default();
        if let Some(labels) = self.label_selector {
            config = config.labels(labels);
        }
        if let Some(fields) = self.field_selector_for(node_name) {
            config = config.fields(&fields);
        }
        config
    }
}

const VERBS: &[&str] = &["list", "watch"];

/// Every watch [`run`] opens, in the order of [`Kind::ALL`].
pub const WATCHES: [Watch; 3] = [
    Watch {
        kind: Kind::Service,
        group: "",
        version: "v1",
        resource: "services",
        namespaced: true,
        verbs: VERBS,
        label_selector: Some(SERVICE_LABEL_SELECTOR),
        field_selector: Some(SERVICE_FIELD_SELECTOR),
        this_node_only: false,
    },
    Watch {
        kind: Kind::EndpointSlice,
        group: "discovery.k8s.io",
        version: "v1",
        resource: "endpointslices",
        namespaced: true,
        verbs: VERBS,
        label_selector: Some(ENDPOINTSLICE_LABEL_SELECTOR),
        field_selector: None,
        this_node_only: false,
    },
    Watch {
        kind: Kind::Node,
        group: "",
        version: "v1",
        resource: "nodes",
        namespaced: false,
        verbs: VERBS,
        label_selector: None,
        field_selector: None,
        this_node_only: true,
    },
];

/// The watch description for `kind`.
pub fn watch_of(kind: Kind) -> &'static Watch {
    let i = match kind {
        Kind::Service => 0,
        Kind::EndpointSlice => 1,
        Kind::Node => 2,
    };
    &WATCHES[i]
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: std::path::PathBuf,
        source: KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration: not in a cluster and no usable kubeconfig \
         ($KUBECONFIG or ~/.kube/config); pass --kubeconfig or --manifests: {0}"
    )]
    Infer(#[from] InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client from the given kubeconfig file (its current context), or, without one, kube's
/// inference: `$KUBECONFIG` / `~/.kube/config` if present, else the in-cluster service account.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let err = |source| ClientError::Kubeconfig {
                path: path.to_owned(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(err)?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(err)?
        }
        None => Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// Watches Services, EndpointSlices and the Node `node_name`, sending what they report into `tx`
/// (see the module documentation). Runs until `tx`'s receiver is dropped.
pub async fn run(client: Client, node_name: String, tx: mpsc::Sender<SourceEvent>) {
    let [services, slices, nodes] = WATCHES;
    tokio::select! {
        () = watch(
            Api::<Decoded<Service>>::all(client.clone()),
            services.config(&node_name),
            Kind::Service,
            Resource::Service,
            &tx,
        ) => {}
        () = watch(
            Api::<Decoded<EndpointSlice>>::all(client.clone()),
            slices.config(&node_name),
            Kind::EndpointSlice,
            Resource::EndpointSlice,
            &tx,
        ) => {}
        () = watch(
            Api::<Decoded<Node>>::all(client),
            nodes.config(&node_name),
            Kind::Node,
            Resource::Node,
            &tx,
        ) => {}
    }
    debug!("event receiver dropped; Kubernetes watchers stopped");
}

/// An object as listed or watched, decoded on its own: one object that does not decode (a field of
/// the wrong type, say, from an API server newer than k8s-openapi) would otherwise fail the whole
/// list it is in, and the watcher would retry that list forever without ever delivering the kind:
/// no map would be written at start, and no change of that kind would reach them later. Its
/// metadata is read as far as it can be, to name it and to follow its resourceVersion.
#[derive(Clone, Debug)]
pub struct Decoded<K> {
    meta: ObjectMeta,
    pub object: Result<K, String>,
}

impl<K> Decoded<K> {
    /// `namespace/name` (or `name`) as far as it could be read.
    pub fn key(&self) -> ObjKey {
        ObjKey::new(
            self.meta.namespace.clone().unwrap_or_default(),
            self.meta.name.clone().unwrap_or_default(),
        )
    }
}

impl<K: kube::Resource<DynamicType = ()>> kube::Resource for Decoded<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.meta
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.meta
    }
}

impl<'de, K: DeserializeOwned> Deserialize<'de> for Decoded<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        let field = |name: &str| {
            value
                .get("metadata")
                .and_then(|m| m.get(name))
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        };
        let meta = ObjectMeta {
            name: field("name"),
            namespace: field("namespace"),
            resource_version: field("resourceVersion"),
            ..ObjectMeta::default()
        };
        let object = K::deserialize(&value).map_err(|e| e.to_string());
        Ok(Self { meta, object })
    }
}

/// One watcher, until `tx` is closed.
async fn watch<K>(
    api: Api<Decoded<K>>,
    config: watcher::Config,
    kind: Kind,
    wrap: fn(K) -> Resource,
    tx: &mpsc::Sender<SourceEvent>,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + Default
        + DeserializeOwned
        + Debug
        + Send
        + 'static,
{
    let mut events = pin!(watcher(api, config).default_backoff());
    // The objects of the list under way (`None` outside one).
    let mut listing: Option<Vec<Resource>> = None;
    // An object that does not decode is not served: skipped in a list, deleted when it changes
    // (so a watched change and a re-list agree).
    let usable = |o: Decoded<K>| -> Result<K, K> {
        let key = o.key();
        match o.object {
            Ok(k) => Ok(k),
            Err(error) => {
                warn!(%kind, object = %key, %error, "ignoring an object that cannot be decoded");
                let mut k = K::default();
                *k.meta_mut() = o.meta;
                Err(k)
            }
        }
    };
    loop {
        let event = tokio::select! {
            () = tx.closed() => return,
            event = events.next() => event,
        };
        // The backoff stream retries forever; it ends only if the watcher itself ever does.
        let Some(event) = event else { return };
        let out = match event {
            Ok(watcher::Event::Init) => {
                listing = Some(Vec::new());
                None
            }
            Ok(watcher::Event::InitApply(o)) => {
                if let Ok(o) = usable(o) {
                    listing.get_or_insert_default().push(wrap(o));
                }
                None
            }
            Ok(watcher::Event::InitDone) => {
                let objects = listing.take().unwrap_or_default();
                info!(%kind, objects = objects.len(), "listed");
                if kind == Kind::Node && objects.is_empty() {
                    warn!("no Node object has this node's name (is the node name right?)");
                }
                Some(SourceEvent::Snapshot(kind, objects))
            }
            Ok(watcher::Event::Apply(o)) => match usable(o) {
                Ok(o) => {
                    let o = wrap(o);
                    debug!(%kind, key = %o.key(), "applied");
                    Some(SourceEvent::Applied(o))
                }
                Err(o) => Some(SourceEvent::Deleted(wrap(o))),
            },
            Ok(watcher::Event::Delete(o)) => {
                let o = wrap(o.object.unwrap_or_else(|_| {
                    let mut k = K::default();
                    *k.meta_mut() = o.meta;
                    k
                }));
                debug!(%kind, key = %o.key(), "deleted");
                Some(SourceEvent::Deleted(o))
            }
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                info!(%kind, detail = %status.message, "watch expired (410 Gone); listing again");
                None
            }
            Err(error) => {
                warn!(%kind, %error, "watch failed; retrying with backoff, serving the last known state");
                None
            }
        };
        if let Some(out) = out
            && tx.send(out).await.is_err()
        {
            return;
        }
    }
}
