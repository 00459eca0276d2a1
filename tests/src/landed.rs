//! Watches the example operator's writes land on the apiserver, in the
//! order they landed: every ConfigMap it generates and every
//! ConfigMapGenerator status names the reconcile that wrote it last, and
//! each change of that name is one landed write.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client, ResourceExt as _,
    api::DynamicObject,
    runtime::watcher::{self, Event},
};

use crate::{history::Landed, mesh::generator_resource};

/// The ConfigMap annotation the example operator sets to its reconcile id.
const WRITTEN_BY: &str = "example.opmesh.io/written-by";
/// The label naming a generated ConfigMap's generator.
const GENERATOR: &str = "example.opmesh.io/generator";

#[derive(Default)]
struct Log {
    landed: Vec<Landed>,
    /// The last writer seen per object (kind, namespace, name).
    last: HashMap<(&'static str, String, String), String>,
    /// Watches that had to list again after the first, and may have
    /// missed writes meanwhile.
    relists: usize,
    /// What the watches reported before each of those lists.
    relist_causes: Vec<String>,
    /// The highest resourceVersion seen on a generator.
    generator_rv: u64,
}

/// The writes landed so far in a set of namespaces, while it lives.
pub struct WriteLog {
    log: Arc<Mutex<Log>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

// === impl WriteLog ===

impl WriteLog {
    /// Starts watching generated ConfigMaps and generator statuses in
    /// `namespaces`.
    pub fn start(client: &Client, namespaces: &[String]) -> Self {
        let log = Arc::new(Mutex::new(Log::default()));
        let namespaces: Arc<BTreeSet<String>> = Arc::new(namespaces.iter().cloned().collect());
        let cms: Api<ConfigMap> = Api::all(client.clone());
        let generators: Api<DynamicObject> = Api::all_with(client.clone(), &generator_resource());
        let config = watcher::Config::default().labels(GENERATOR);
        let cm_task = follow(
            cms,
            config,
            log.clone(),
            namespaces.clone(),
            |log, ns, cm| {
                let generator = cm.labels().get(GENERATOR).cloned().unwrap_or_default();
                let writer = cm.annotations().get(WRITTEN_BY).cloned();
                record(log, "configmap", ns, &cm.name_any(), &generator, writer, cm);
            },
        );
        let config = watcher::Config::default();
        let status_task = follow(generators, config, log.clone(), namespaces, |log, ns, g| {
            let writer = g.data["status"]["writtenBy"].as_str().map(str::to_string);
            if let Some(rv) = g
                .metadata
                .resource_version
                .as_deref()
                .and_then(|v| v.parse().ok())
            {
                let mut l = lock(log);
                l.generator_rv = l.generator_rv.max(rv);
            }
            let name = g.name_any();
            record(log, "status", ns, &name, &name, writer, g);
        });
        Self {
            log,
            tasks: vec![cm_task, status_task],
        }
    }

    /// The writes landed so far, each keyed by its generator.
    pub fn landed(&self) -> Vec<Landed> {
        lock(&self.log).landed.clone()
    }

    /// The highest resourceVersion seen on any generator: once it passes a
    /// write's, every status write that landed before that write is in
    /// [`WriteLog::landed`].
    pub fn generator_rv(&self) -> u64 {
        lock(&self.log).generator_rv
    }

    /// How many times a watch had to list again; writes in between may be
    /// missing.
    pub fn relists(&self) -> usize {
        lock(&self.log).relists
    }

    /// The errors the watches reported before each list after the first.
    pub fn relist_causes(&self) -> Vec<String> {
        lock(&self.log).relist_causes.clone()
    }
}

impl Drop for WriteLog {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Watches `api` and hands every object in `namespaces` to `seen`,
/// counting the watch's lists after the first.
fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
    log: Arc<Mutex<Log>>,
    namespaces: Arc<BTreeSet<String>>,
    seen: impl Fn(&Mutex<Log>, &str, &K) + Send + 'static,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    tokio::spawn(async move {
        let mut events = watcher::watcher(api, config).boxed();
        let mut inits = 0usize;
        let mut last_error = None;
        while let Some(ev) = events.next().await {
            match ev {
                Ok(Event::Init) => {
                    inits += 1;
                    if inits > 1 {
                        let mut log = lock(&log);
                        log.relists += 1;
                        log.relist_causes.push(
                            last_error
                                .take()
                                .unwrap_or_else(|| "no error reported".to_string()),
                        );
                    }
                }
                Err(e) => last_error = Some(e.to_string()),
                Ok(Event::Apply(o) | Event::InitApply(o)) => {
                    let ns = o.meta().namespace.clone().unwrap_or_default();
                    if namespaces.contains(&ns) {
                        seen(&log, &ns, &o);
                    }
                }
                Ok(_) => {}
            }
        }
    })
}

fn lock(log: &Mutex<Log>) -> std::sync::MutexGuard<'_, Log> {
    log.lock().unwrap_or_else(|e| e.into_inner())
}

/// Records a write if the object's writer changed.
fn record<K: kube::Resource>(
    log: &Mutex<Log>,
    kind: &'static str,
    ns: &str,
    name: &str,
    generator: &str,
    writer: Option<String>,
    obj: &K,
) {
    let Some(writer) = writer else {
        return;
    };
    let Some(rv) = obj
        .meta()
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
    else {
        return;
    };
    let mut log = lock(log);
    let last = log
        .last
        .insert((kind, ns.to_string(), name.to_string()), writer.clone());
    if last.as_deref() != Some(writer.as_str()) {
        log.landed.push(Landed {
            key: format!("{ns}/{generator}"),
            resource_version: rv,
            writer,
        });
    }
}
