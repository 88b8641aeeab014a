//! Named background tasks under one tracker and one cancellation token: a stage of the daemon
//! (its sessions, or its schedulers and what they start) is stopped as a whole, under a
//! deadline, and the tasks that did not stop in time are named in the log.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

/// One stage's tasks. Clones share the stage.
#[derive(Clone, Default)]
pub(crate) struct Tasks {
    tracker: TaskTracker,
    token: CancellationToken,
    running: Arc<Mutex<BTreeMap<u64, String>>>,
    next: Arc<AtomicU64>,
}

impl Tasks {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Cancelled when the stage stops: long-running tasks select on it.
    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Runs `task` in the stage, known by `name` until it returns.
    pub(crate) fn spawn(
        &self,
        name: impl Into<String>,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, name.into());
        let done = Done {
            running: self.running.clone(),
            id,
        };
        self.tracker.spawn(async move {
            let _done = done;
            task.await;
        });
    }

    /// Cancels the stage and waits up to `deadline` for its tasks; logs, naming them, those
    /// still running then (they are left to the runtime's end). Returns whether all stopped.
    pub(crate) async fn stop(&self, stage: &str, deadline: Duration) -> bool {
        self.token.cancel();
        self.tracker.close();
        if tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok()
        {
            return true;
        }
        let names: Vec<String> = self.lock().values().cloned().collect();
        warn!(stage, ?deadline, tasks = ?names, "tasks still running after the shutdown deadline");
        false
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, String>> {
        self.running.lock().expect("tasks lock")
    }
}

/// Removes a task's name when it ends, whether it returned, panicked or was dropped.
struct Done {
    running: Arc<Mutex<BTreeMap<u64, String>>>,
    id: u64,
}

impl Drop for Done {
    fn drop(&mut self) {
        self.running.lock().expect("tasks lock").remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_names_what_did_not_stop_and_forgets_what_did() {
        let tasks = Tasks::new();
        let token = tasks.token().clone();
        tasks.spawn("polite", async move { token.cancelled().await });
        tasks.spawn("stubborn", std::future::pending());
        tasks.spawn("quick", async {});
        assert!(!tasks.stop("test", Duration::from_millis(200)).await);
        let left: Vec<String> = tasks.lock().values().cloned().collect();
        assert_eq!(left, ["stubborn"]);

        let tasks = Tasks::new();
        let token = tasks.token().clone();
        tasks.spawn("polite", async move { token.cancelled().await });
        assert!(tasks.stop("test", Duration::from_secs(5)).await);
        assert!(tasks.lock().is_empty());
    }
}
