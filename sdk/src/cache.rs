//! Typed reads of the sidecar's slice cache.

use std::{any::TypeId, sync::Arc};

use kube::Resource;
use opmesh_proto::v1::{
    GetRequest, GroupVersionKind, ListRequest, runtime_service_client::RuntimeServiceClient,
};
use serde::de::DeserializeOwned;
use tonic::transport::Channel;

use crate::{
    error::{Error, Result},
    local::LocalCache,
};

/// Reads objects of the keys this replica owns from the sidecar's cache.
/// Only objects of the primary type and the owned types are there.
#[derive(Clone, Debug)]
pub struct Cache {
    client: RuntimeServiceClient<Channel>,
    /// The in-process copy, read instead of the sidecar while it is live.
    local: Option<Arc<LocalCache>>,
}

/// The opmesh wire form of `K`'s type.
pub fn gvk_of<K: Resource<DynamicType = ()>>() -> GroupVersionKind
where
    K::Scope: 'static,
{
    GroupVersionKind {
        group: K::group(&()).into_owned(),
        version: K::version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        plural: K::plural(&()).into_owned(),
        namespaced: TypeId::of::<K::Scope>() == TypeId::of::<k8s_openapi::NamespaceResourceScope>(),
    }
}

// === impl Cache ===

impl Cache {
    pub(crate) fn new(client: RuntimeServiceClient<Channel>, local: Arc<LocalCache>) -> Self {
        Self {
            client,
            local: Some(local),
        }
    }

    /// The in-process copy, if it may be read now.
    fn live(&self) -> Option<&LocalCache> {
        self.local.as_deref().filter(|l| l.is_live())
    }

    /// One object, if cached. `namespace` is `None` for cluster-scoped types.
    pub async fn get<K>(&self, namespace: Option<&str>, name: &str) -> Result<Option<K>>
    where
        K: Resource<DynamicType = ()> + DeserializeOwned,
        K::Scope: 'static,
    {
        let gvk = gvk_of::<K>();
        if let Some(local) = self.live() {
            return local
                .get(&gvk.key(), namespace.unwrap_or_default(), name)
                .map(|b| decode::<K>(&b))
                .transpose();
        }
        let resp = self
            .client
            .clone()
            .get(GetRequest {
                gvk: Some(gvk),
                namespace: namespace.unwrap_or_default().to_string(),
                name: name.to_string(),
            })
            .await?
            .into_inner();
        resp.object.map(|b| decode::<K>(&b)).transpose()
    }

    /// Every cached object of type `K`, optionally in one namespace.
    pub async fn list<K>(&self, namespace: Option<&str>) -> Result<Vec<K>>
    where
        K: Resource<DynamicType = ()> + DeserializeOwned,
        K::Scope: 'static,
    {
        self.list_where::<K>(namespace.unwrap_or_default(), "")
            .await
    }

    /// Every cached object of type `K` with an ownerReference to `owner_uid`.
    pub async fn list_owned_by<K>(&self, owner_uid: &str) -> Result<Vec<K>>
    where
        K: Resource<DynamicType = ()> + DeserializeOwned,
        K::Scope: 'static,
    {
        self.list_where::<K>("", owner_uid).await
    }

    async fn list_where<K>(&self, namespace: &str, owner_uid: &str) -> Result<Vec<K>>
    where
        K: Resource<DynamicType = ()> + DeserializeOwned,
        K::Scope: 'static,
    {
        if let Some(local) = self.live() {
            return local
                .list(&gvk_of::<K>().key(), namespace, owner_uid)
                .iter()
                .map(|b| decode::<K>(b))
                .collect();
        }
        // The sidecar pages large lists; read every page.
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let resp = self
                .client
                .clone()
                .list(ListRequest {
                    gvk: Some(gvk_of::<K>()),
                    namespace: namespace.to_string(),
                    owner_uid: owner_uid.to_string(),
                    continue_token: token,
                })
                .await?
                .into_inner();
            for b in &resp.objects {
                out.push(decode::<K>(b)?);
            }
            if resp.continue_token.is_empty() {
                return Ok(out);
            }
            token = resp.continue_token;
        }
    }
}

pub(crate) fn decode<K: Resource<DynamicType = ()> + DeserializeOwned>(bytes: &[u8]) -> Result<K> {
    serde_json::from_slice(bytes).map_err(|source| Error::Decode {
        kind: K::kind(&()).into_owned(),
        source,
    })
}
