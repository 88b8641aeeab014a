//! Finds the binaries under test beside the test executable (`target/<profile>/deps/e2e-…` →
//! `target/<profile>/fleetvault-…`), building them once per test process first.
//!
//! `cargo test` and `cargo nextest run` build the workspace's bin targets only in test mode, not
//! the executables, so the harness runs `cargo build --workspace --bins` once (cheap when they
//! are up to date) so that a test never runs a stale binary. `tests/run.sh` builds them before
//! the tests and sets `FLEETVAULT_TEST_NO_BUILD=1` to skip that step.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// `target/<profile>/`, the directory the binaries are built into.
fn profile_dir() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        if let Some(deps) = exe.parent() {
            if deps.file_name().is_some_and(|n| n == "deps") {
                if let Some(dir) = deps.parent() {
                    return dir.to_path_buf();
                }
            }
        }
    }
    workspace_root().join("target").join("debug")
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new(".."))
        .to_path_buf()
}

fn build(dir: &Path) -> Result<(), String> {
    if std::env::var_os("FLEETVAULT_TEST_NO_BUILD").is_some() {
        return Ok(());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--quiet")
        .arg("--workspace")
        .arg("--bins")
        .arg("--manifest-path")
        .arg(workspace_root().join("Cargo.toml"));
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(profile) => {
            cmd.arg("--profile").arg(profile);
        }
    }
    let status = cmd
        .status()
        .map_err(|e| format!("running `cargo build --bins`: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`cargo build --workspace --bins` failed: {status}"))
    }
}

/// The path of binary `name` (`fleetvault-coordinator` or `fleetvault-agent`).
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let dir = profile_dir();
    BUILT
        .get_or_init(|| build(&dir))
        .clone()
        .map_err(anyhow::Error::msg)?;
    let path = dir.join(name);
    anyhow::ensure!(
        path.is_file(),
        "binary {} not found (run `cargo build --workspace --bins`)",
        path.display()
    );
    Ok(path)
}
