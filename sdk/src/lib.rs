//! The opmesh SDK: write Kubernetes operators that reconcile only the slice
//! of objects their runtime sidecar hands them.
//!
//! The shape follows kube-runtime's `Controller`: a `reconcile(Arc<K>,
//! Arc<Ctx>) -> Result<Action, E>` function and an error policy. The
//! difference is where work comes from: the opmesh manager watches the API
//! server once, routes each key to exactly one replica, and this replica's
//! sidecar hands over the keys it owns, with their objects. The sidecar's
//! work queue has controller-runtime semantics (dedup, per-key backoff,
//! requeue-after, max concurrency).
//!
//! - [`Mesh`] — the connection to the sidecar ([`Mesh::connect`] fails fast
//!   with [`Error::NoSidecar`] if there is none).
//! - [`Controller`] — `new` / `owns` / `run`; [`run_all`] runs an
//!   operator's several controllers on one sidecar.
//! - [`Action`] — what to do after a reconcile.
//! - [`Cache`] — typed reads of the slice cache (get, list, list by owner).
//! - [`current`] — the key, subset and replica of the running reconcile.
//!
//! - [`fenced`] — wrap the `kube::Client` used for writes, so that a write
//!   after this replica lost the key or its lease fails with [`Fenced`].
//!
//! Writes go straight to the API server; wrap the client with [`fenced`]
//! inside `reconcile`.
//!
//! # Example
//!
//! ```no_run
//! use std::{sync::Arc, time::Duration};
//!
//! // The SDK re-exports the kube and k8s-openapi it is built with.
//! use opmesh_sdk::k8s_openapi::api::core::v1::ConfigMap;
//! use opmesh_sdk::{Action, Controller, Mesh, kube};
//!
//! struct Ctx {
//!     client: kube::Client,
//! }
//!
//! async fn reconcile(cm: Arc<ConfigMap>, _ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
//!     let task = opmesh_sdk::current().expect("inside reconcile");
//!     println!("{} reconciles {} in subset {}", task.runtime_id, task.key, task.subset);
//!     Ok(Action::requeue(Duration::from_secs(300)))
//! }
//!
//! #[tokio::main]
//! async fn main() -> anyhow::Result<()> {
//!     let mesh = Mesh::connect().await?; // $OPMESH_RUNTIME_SOCKET
//!     let ctx = Arc::new(Ctx { client: kube::Client::try_default().await? });
//!     Controller::<ConfigMap>::new(&mesh)
//!         .run(reconcile, opmesh_sdk::default_error_policy, ctx)
//!         .await?;
//!     Ok(())
//! }
//! ```
//!
//! A complete operator is in `sdk/examples/configmap_generator.rs`.
//!
//! # Behaviour worth knowing
//!
//! - **A deleted primary is not reconciled.** As in kube-runtime, a key whose
//!   primary object is gone is dropped; use finalizers for cleanup.
//! - **The cache holds the primary objects of this replica's keys and the
//!   objects they own** (controller ownerReferences), nothing else. Read
//!   anything else from the API server.
//! - **`Action::await_change()` from an error policy means no retry**; return
//!   [`Action::backoff`] (what [`default_error_policy`] does) or
//!   `Action::requeue(d)` to retry.
//! - **Writes are fenced** when made through [`fenced`]: a write after this
//!   replica lost the key or its lease fails; [`is_fenced`] tells such an
//!   error from others, so it is not retried.

#![warn(unreachable_pub)]

mod action;
mod cache;
mod controller;
mod error;
mod fence;
mod local;

pub use action::{Action, default_error_policy};
pub use cache::{Cache, gvk_of};
pub use controller::{
    BoundController, Controller, DEFAULT_SHUTDOWN_GRACE, DEFAULT_SOCKET, Mesh,
    OPERATOR_VERSION_ENV, SIDECAR_WAIT, SOCKET_ENV, TaskInfo, current, fenced, run_all,
};
pub use error::{Error, Result};
pub use fence::{FENCE_MARGIN, Fence, Fenced, WriteCounts, fenced_error, is_fenced};

/// The k8s-openapi crate this SDK is built with.
pub use k8s_openapi;
/// The kube crate this SDK is built with, so an operator uses the same
/// version (its `Client`, `Api` and `Error` are what the SDK takes and
/// returns).
pub use kube;
