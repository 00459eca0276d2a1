//! Watchers as streams: objects of one type, Namespaces, OperatorMeshes.
//!
//! Like kube-runtime's `watcher()`, a stream knows nothing of who reads it:
//! the coordinator's driver forwards it. Each stream retries with backoff
//! forever and reports failures as items, so the reader can show them.

use std::{collections::HashSet, sync::Arc};

use futures::{Stream, StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, ResourceExt as _,
    runtime::{WatchStreamExt as _, watcher},
};

use crate::{crd::OperatorMesh, gvk::Gvk, object::RawObject, policy::Labels};

/// Identifies an object of one type: `(namespace, name)`.
pub(crate) type ObjName = (String, String);

/// Namespace labels keyed by name, as the coordinator receives them.
pub(crate) type NamespaceLabels = (ObjName, Labels);

/// What a watch reports.
#[derive(Debug)]
pub(crate) enum WatchEvent<K> {
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

/// Every object of `gvk` in the cluster, each with `apiVersion` and `kind`
/// in its JSON (list items lack them), added here on the watch's task
/// rather than on the coordinator's.
pub(crate) fn objects(
    client: Client,
    gvk: &Gvk,
) -> impl Stream<Item = WatchEvent<RawObject>> + Send + 'static {
    let (api_version, kind) = (gvk.api_version(), gvk.kind.clone());
    let api: Api<RawObject> = Api::all_with(client, &gvk.api_resource());
    let typed =
        move |o: Arc<RawObject>| Arc::new(Arc::unwrap_or_clone(o).with_types(&api_version, &kind));
    events(watcher(api, watcher::Config::default().any_semantic())).map(move |ev| match ev {
        WatchEvent::Apply(o) => WatchEvent::Apply(typed(o)),
        WatchEvent::Delete(o) => WatchEvent::Delete(typed(o)),
        other => other,
    })
}

/// Finds `t` in the API server's discovery: its plural and scope.
pub(crate) async fn resolve(client: &Client, t: &crate::crd::TypeRef) -> Result<Gvk, kube::Error> {
    let (group, version) = t
        .api_version
        .rsplit_once('/')
        .unwrap_or(("", t.api_version.as_str()));
    let gvk = kube::api::GroupVersionKind::gvk(group, version, &t.kind);
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk).await?;
    Ok(Gvk {
        group: resource.group,
        version: resource.version,
        kind: resource.kind,
        plural: resource.plural,
        namespaced: caps.scope == kube::discovery::Scope::Namespaced,
    })
}

/// Namespaces, for their labels.
pub(crate) fn namespaces(
    client: Client,
) -> impl Stream<Item = WatchEvent<NamespaceLabels>> + Send + 'static {
    let api: Api<Namespace> = Api::all(client);
    events(watcher(api, watcher::Config::default())).map(|ev| {
        ev.map(|ns: &Namespace| {
            let labels = ns.labels().clone();
            (name_of(ns), labels)
        })
    })
}

/// OperatorMeshes, in one namespace or all.
pub(crate) fn meshes(
    client: Client,
    namespace: Option<&str>,
) -> impl Stream<Item = WatchEvent<OperatorMesh>> + Send + 'static {
    let api: Api<OperatorMesh> = match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    events(watcher(api, watcher::Config::default()))
}

/// `(namespace, name)` of an object; namespace is empty when cluster-scoped.
pub(crate) fn name_of<K: kube::Resource>(o: &K) -> ObjName {
    (o.namespace().unwrap_or_default(), o.name_any())
}

// === impl WatchEvent ===

impl<K> WatchEvent<K> {
    fn map<L>(self, f: impl Fn(&K) -> L) -> WatchEvent<L> {
        match self {
            WatchEvent::Apply(o) => WatchEvent::Apply(Arc::new(f(&o))),
            WatchEvent::Delete(o) => WatchEvent::Delete(Arc::new(f(&o))),
            WatchEvent::Relisted(s) => WatchEvent::Relisted(s),
            WatchEvent::Failed(e) => WatchEvent::Failed(e),
        }
    }
}

/// Turns a kube watcher into [`WatchEvent`]s: a relist ends with the set of
/// names it saw, and errors (after which the watcher backs off and retries)
/// become [`WatchEvent::Failed`].
fn events<K, S>(watch: S) -> impl Stream<Item = WatchEvent<K>> + Send + 'static
where
    K: kube::Resource + Clone + std::fmt::Debug + Send + Sync + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    let watch = watch
        .inspect_err(|e| tracing::warn!(error = %e, "watch error; retrying"))
        .default_backoff();
    let mut listing: HashSet<ObjName> = HashSet::new();
    watch
        .map(move |ev| match ev {
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
        })
        .filter_map(futures::future::ready)
}
