//! Watch tasks: one per resource type (shared by every mesh that declares
//! it), one for Namespaces and one for OperatorMeshes. Each feeds the core.

use std::{collections::HashSet, sync::Arc};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, ResourceExt as _,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::watcher,
};
use tokio::{sync::mpsc, task::JoinHandle};

use crate::{core::Input, crd::OperatorMesh, selector::Labels};

/// Identifies an object of one type: `(namespace, name)`.
pub type ObjName = (String, String);

/// A resource type the manager watches, as declared by runtimes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gvk {
    /// API group; empty for core.
    pub group: String,
    /// API version.
    pub version: String,
    /// Kind.
    pub kind: String,
    /// Plural resource name.
    pub plural: String,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
}

/// A task that is aborted when this handle is dropped, so every watch has
/// an owner that stops it.
#[derive(Debug)]
pub struct Task(JoinHandle<()>);

/// What a watch reports to the core.
#[derive(Debug)]
pub enum WatchEvent<K> {
    /// The object exists in this state.
    Apply(Arc<K>),
    /// The object is gone.
    Delete(Arc<K>),
    /// A (re)list finished; objects not in the set are gone.
    Relisted(HashSet<ObjName>),
    /// The watch failed and is retrying with backoff; why, as the API
    /// server said it.
    Failed(String),
}

// === impl Gvk ===

impl Gvk {
    /// The key used to index watches and stores: `group/version/Kind`.
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.group, self.version, self.kind)
    }

    /// `apiVersion` as written in objects.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(&self.group, &self.version, &self.kind),
            &self.plural,
        )
    }
}

impl From<&opmesh_proto::v1::GroupVersionKind> for Gvk {
    fn from(g: &opmesh_proto::v1::GroupVersionKind) -> Self {
        Self {
            group: g.group.clone(),
            version: g.version.clone(),
            kind: g.kind.clone(),
            plural: g.plural.clone(),
            namespaced: g.namespaced,
        }
    }
}

impl From<&Gvk> for opmesh_proto::v1::GroupVersionKind {
    fn from(g: &Gvk) -> Self {
        Self {
            group: g.group.clone(),
            version: g.version.clone(),
            kind: g.kind.clone(),
            plural: g.plural.clone(),
            namespaced: g.namespaced,
        }
    }
}

// === impl Task ===

impl Task {
    /// Spawns `fut`, owned by the returned handle.
    pub fn spawn(fut: impl std::future::Future<Output = ()> + Send + 'static) -> Self {
        Self(tokio::spawn(fut))
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Watches every object of `gvk` in the cluster.
pub fn objects(client: Client, gvk: Gvk, core: mpsc::Sender<Input>) -> Task {
    let api: Api<DynamicObject> = Api::all_with(client, &gvk.api_resource());
    let key = gvk.key();
    Task(tokio::spawn(async move {
        let events = watcher(api, watcher::Config::default().any_semantic());
        forward(events, core, move |ev| Input::Object {
            gvk: key.clone(),
            event: ev,
        })
        .await;
    }))
}

/// Watches Namespaces, for their labels.
pub fn namespaces(client: Client, core: mpsc::Sender<Input>) -> Task {
    let api: Api<Namespace> = Api::all(client);
    Task(tokio::spawn(async move {
        forward(
            watcher(api, watcher::Config::default()),
            core,
            |ev: WatchEvent<Namespace>| Input::Namespace(ev.map(|ns| ns.labels().clone())),
        )
        .await;
    }))
}

/// Watches OperatorMeshes, in one namespace or all.
pub fn meshes(client: Client, namespace: Option<&str>, core: mpsc::Sender<Input>) -> Task {
    let api: Api<OperatorMesh> = match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    Task(tokio::spawn(async move {
        forward(watcher(api, watcher::Config::default()), core, Input::Mesh).await;
    }))
}

impl<K> WatchEvent<K> {
    fn map<L>(self, f: impl Fn(&K) -> L) -> WatchEvent<(ObjName, L)>
    where
        K: kube::Resource,
    {
        let wrap = |o: Arc<K>| Arc::new((name_of(o.as_ref()), f(&o)));
        match self {
            WatchEvent::Apply(o) => WatchEvent::Apply(wrap(o)),
            WatchEvent::Delete(o) => WatchEvent::Delete(wrap(o)),
            WatchEvent::Relisted(s) => WatchEvent::Relisted(s),
            WatchEvent::Failed(e) => WatchEvent::Failed(e),
        }
    }
}

/// Namespace labels keyed by name, as the core receives them.
pub type NamespaceLabels = (ObjName, Labels);

/// `(namespace, name)` of an object; namespace is empty when cluster-scoped.
pub fn name_of<K: kube::Resource>(o: &K) -> ObjName {
    (o.namespace().unwrap_or_default(), o.name_any())
}

async fn forward<K, S>(events: S, core: mpsc::Sender<Input>, wrap: impl Fn(WatchEvent<K>) -> Input)
where
    K: kube::Resource + Clone + std::fmt::Debug + Send + 'static,
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    // The watcher retries on its own with backoff; errors are logged and
    // passed on, so the core can report them in the mesh's status.
    let events = events.inspect_err(|e| tracing::warn!(error = %e, "watch error; retrying"));
    let mut events = std::pin::pin!(kube::runtime::WatchStreamExt::default_backoff(events));
    let mut listing: HashSet<ObjName> = HashSet::new();
    while let Some(ev) = events.next().await {
        let out = match ev {
            Ok(watcher::Event::Init) => {
                listing.clear();
                None
            }
            Ok(watcher::Event::InitApply(o)) => {
                listing.insert(name_of(&o));
                Some(WatchEvent::Apply(Arc::new(o)))
            }
            Ok(watcher::Event::InitDone) => {
                Some(WatchEvent::Relisted(std::mem::take(&mut listing)))
            }
            Ok(watcher::Event::Apply(o)) => Some(WatchEvent::Apply(Arc::new(o))),
            Ok(watcher::Event::Delete(o)) => Some(WatchEvent::Delete(Arc::new(o))),
            Err(e) => Some(WatchEvent::Failed(e.to_string())),
        };
        if let Some(ev) = out
            && core.send(wrap(ev)).await.is_err()
        {
            return; // the core is gone; so is the manager
        }
    }
}
