//! Spawned tasks with an owner: dropping the handle stops the task.

use tokio::task::JoinHandle;

/// A task that is aborted when this handle is dropped.
#[derive(Debug)]
pub(crate) struct Task(JoinHandle<()>);

// === impl Task ===

impl Task {
    /// Spawns `fut`, owned by the returned handle.
    pub(crate) fn spawn(fut: impl std::future::Future<Output = ()> + Send + 'static) -> Self {
        Self(tokio::spawn(fut))
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}
