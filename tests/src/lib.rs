//! The end-to-end harness: real `fleetvault-coordinator` and `fleetvault-agent` processes in
//! temporary directories, driven through their command lines the way an operator drives them.
//!
//! - [`Coordinator`] owns a data dir (`init`), a `serve` child on a port chosen here (so that a
//!   restart comes back on the same address the agents' configs name), and its logs.
//! - [`Agent`] owns an `issue-agent` output dir whose `agent.toml` gets sources appended, runs
//!   one-shot agent commands, and starts `fleetvault-agent run` as an [`AgentProcess`].
//! - [`data`] makes deterministic test data (seeded xorshift) and hashes streams; [`tree`] builds
//!   a file tree with every awkward case and compares two trees entry by entry.
//!
//! Every guard kills its child and removes its temp dir on `Drop` (set `FLEETVAULT_TEST_KEEP=1`
//! to keep the dirs), and prints the tail of its logs to the test's captured stderr, which the
//! test runner shows only when the test fails. Readiness is a line on the child's stderr or a
//! state polled through the CLI, never a sleep.

mod agent;
mod bins;
mod coordinator;
pub mod data;
pub mod databases;
mod process;
pub mod report;
pub mod tree;

pub use agent::{Agent, AgentProcess, CommandSource};
pub use bins::bin;
pub use coordinator::Coordinator;
pub use process::{run, run_to_file, shell_quote, Output, Proc, COMMAND_TIMEOUT};

/// Polls `done` every 100 ms until it returns true; fails after `timeout`, naming `what`.
/// (Polling an observable state is the harness's only use of sleep.)
pub fn wait_until(
    what: &str,
    timeout: std::time::Duration,
    mut done: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if done()? {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A fresh scratch directory for test data (kept with `FLEETVAULT_TEST_KEEP=1`).
pub fn scratch(prefix: &str) -> anyhow::Result<Scratch> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("fv-{prefix}-"))
        .tempdir()?;
    Ok(Scratch { dir: Some(dir) })
}

/// A temporary directory that can be kept for debugging.
pub struct Scratch {
    dir: Option<tempfile::TempDir>,
}

impl Scratch {
    /// The directory.
    pub fn path(&self) -> &std::path::Path {
        match &self.dir {
            Some(d) => d.path(),
            // `dir` is only taken in `Drop`.
            None => std::path::Path::new("/nonexistent"),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(d) = self.dir.take() {
            keep_or_remove(d);
        }
    }
}

/// Removes a temp dir, or keeps it (and says where) when `FLEETVAULT_TEST_KEEP` is set.
/// Read-only directories in test trees are made writable first, so that removal works for a
/// non-root user too.
pub(crate) fn keep_or_remove(dir: tempfile::TempDir) {
    if std::env::var_os("FLEETVAULT_TEST_KEEP").is_some() {
        eprintln!("kept {}", dir.keep().display());
        return;
    }
    tree::make_writable(dir.path());
    drop(dir);
}
