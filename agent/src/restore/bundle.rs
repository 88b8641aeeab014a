//! What a bundle restore needs besides the plan (`restore::plan` runs it): the bundle's index
//! read from its snapshot, the database its application's configuration names, and a clone's
//! configuration rewritten under its new root.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use fleetvault_common::{Client, SnapshotId};

use super::Target;
use crate::bundle::{BundleConfig, BundleIndex};
use crate::config::{profiles, AgentConfig, DbSource, SourceKind};
use crate::process::HookLog;

/// How a bundle is restored.
#[derive(Debug, Clone, Default)]
pub(crate) struct BundleRestore {
    /// The application's files under this root instead of the original one.
    pub(crate) root: Option<PathBuf>,
    /// The database under this name instead of the original one.
    pub(crate) database: Option<String>,
    /// Replace an existing database (a safety snapshot first).
    pub(crate) replace: bool,
}

/// What a bundle restore did.
#[derive(Debug, Clone)]
pub(crate) struct RestoreReport {
    pub(crate) bundle: String,
    /// What failed, if anything (the restore is complete only without it).
    pub(crate) error: Option<String>,
    /// One line per part restored (or the one that failed), in order.
    pub(crate) parts: Vec<String>,
    pub(crate) hooks: Vec<HookLog>,
    pub(crate) config_rewritten: Option<String>,
}

/// Reads a bundle snapshot's index.
pub(crate) async fn read_index(
    client: Arc<Client>,
    snapshot: SnapshotId,
) -> anyhow::Result<BundleIndex> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let path = dir.path().join("index.json");
    super::run(client, snapshot, Target::Path(path.clone()), |_| {}).await?;
    let bytes = std::fs::read(&path).context("reading the bundle index")?;
    serde_json::from_slice(&bytes).with_context(|| format!("snapshot {snapshot}: bad bundle index"))
}

/// For a profile bundle, the database its application's configuration named at backup time:
/// read from the snapshot's own copy of that file (restored into a temporary directory), or
/// from the file on this host when no part holds it.
pub(super) async fn database_target(
    client: &Arc<Client>,
    config: &AgentConfig,
    bundle: &BundleConfig,
    index: &BundleIndex,
    old_root: Option<&Path>,
) -> anyhow::Result<Option<DbSource>> {
    let Some(profile) = &bundle.profile else {
        return Ok(None);
    };
    let root = old_root.context("the bundle has no root")?;
    let file = index
        .config_file
        .clone()
        .or_else(|| bundle.config_file.clone());
    let holder = index.parts.iter().find(|p| {
        let paths = match config.source(&p.name).map(|s| &s.kind) {
            Ok(SourceKind::Files { paths, .. }) => paths.clone(),
            _ => Vec::new(),
        };
        file.as_ref()
            .is_some_and(|f| paths.iter().any(|p| f.starts_with(p)))
    });
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let read_root = match holder.and_then(|p| p.snapshot_id.as_deref()) {
        Some(id) => {
            let target = Target::Relocated {
                dir: tmp.path().to_owned(),
                from: root.to_owned(),
            };
            super::run(client.clone(), id.parse()?, target, |_| {}).await?;
            tmp.path().to_owned()
        }
        None => root.to_owned(),
    };
    let mut e = profiles::expand(profile, &read_root, bundle.overrides.mongo_url.as_deref())?;
    bundle.overrides.apply(&mut e.database);
    if e.database.database.is_empty() {
        bail!(
            "{} is not in the bundle nor on this host: cannot tell which database to restore into",
            e.config_file.display()
        );
    }
    Ok(Some(e.database))
}

/// Rewrites the restored copy of the app's configuration for a clone; returns its path.
pub(super) fn rewrite(
    index: &BundleIndex,
    old_root: &Path,
    new_root: &Path,
    new_db: Option<&str>,
) -> anyhow::Result<Option<String>> {
    let (Some(profile), Some(file)) = (&index.profile, &index.config_file) else {
        return Ok(None);
    };
    let rel = file
        .strip_prefix(old_root)
        .with_context(|| format!("{} is not under {}", file.display(), old_root.display()))?;
    // The index comes from the snapshot's host: its path must stay below the new root, and
    // nothing on the way may be a symlink (the restored tree may hold one).
    if !rel
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)))
        || rel.as_os_str().is_empty()
    {
        bail!(
            "refusing to rewrite {}: the snapshot's configuration path leaves {}",
            file.display(),
            old_root.display()
        );
    }
    let mut at = new_root.to_path_buf();
    for c in rel.components() {
        at.push(c);
        let md =
            std::fs::symlink_metadata(&at).with_context(|| format!("checking {}", at.display()))?;
        let last = at.as_path() == new_root.join(rel);
        if md.file_type().is_symlink() || (!last && !md.is_dir()) || (last && !md.is_file()) {
            bail!(
                "refusing to rewrite {}: {} is not a plain {}",
                new_root.join(rel).display(),
                at.display(),
                if last { "file" } else { "directory" }
            );
        }
    }
    let path = new_root.join(rel);
    let old_db = index
        .parts
        .iter()
        .find_map(|p| p.database.clone())
        .unwrap_or_default();
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let out = profiles::rewrite_config(profile, &text, &old_db, new_db, old_root, new_root)?;
    // Replaced whole and durably, keeping the file's mode (it may hold secrets).
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path)?.permissions());
    let replace = fleetvault_common::durable::Replace::Yes;
    fleetvault_common::durable::write_file(&path, out.as_bytes(), mode & 0o7777, replace)
        .with_context(|| format!("replacing {}", path.display()))?;
    Ok(Some(path.display().to_string()))
}
