//! Application bundles: an app's database, files and config backed up together behind
//! ordered hooks, and restored (or cloned) together.
//!
//! ```text
//! backup:  before hooks ─▶ part 1 ─▶ part 2 … (stop at a failure) ─▶ after hooks (always)
//!          ─▶ the bundle snapshot: kind `bundle`, its content the index (JSON) below
//! restore: index ─▶ restore-before hooks ─▶ the database (where the snapshot's copy of
//!          the app's config says) ─▶ the file parts in order ─▶ a clone's config rewritten
//!          ─▶ restore-after hooks (always)
//! ```
//!
//! Each part is an ordinary snapshot of its source, tagged `bundle:NAME`; the bundle
//! snapshot is taken last, so it has the newest id and exists only if every part completed
//! (a failed bundle is recorded `failed` with the reason). Its index lists the parts with
//! their snapshot ids, status and sizes, and every hook's output.

pub(crate) mod hooks;
pub(crate) mod profiles;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use fleetvault_common::protocol::{Begin, Progress, RestoreOptions};
use fleetvault_common::{Client, JobReport, SnapshotId};
use serde::{Deserialize, Serialize};

use crate::config::{AgentConfig, SourceConfig, SourceKind};
use hooks::{Hook, HookLog};

/// The source kind (and snapshot kind) of a bundle snapshot.
pub(crate) const KIND: &str = "bundle";

/// A configured bundle.
#[derive(Debug, Clone)]
pub(crate) struct BundleConfig {
    pub(crate) name: String,
    /// Source names, in backup and restore order.
    pub(crate) parts: Vec<String>,
    pub(crate) before: Vec<Hook>,
    pub(crate) after: Vec<Hook>,
    pub(crate) profile: Option<String>,
    /// The application's directory (profiles; optional otherwise): `--root` moves it.
    pub(crate) root: Option<PathBuf>,
    /// The application's configuration file, rewritten by a clone.
    pub(crate) config_file: Option<PathBuf>,
    /// A profile's overrides of the database its application's configuration names.
    pub(crate) overrides: crate::config::DbOverrides,
}

/// One part in the index.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PartRecord {
    pub(crate) name: String,
    pub(crate) kind: String,
    pub(crate) snapshot_id: Option<String>,
    pub(crate) status: String,
    pub(crate) error: Option<String>,
    pub(crate) bytes_read: u64,
    pub(crate) bytes_uploaded: u64,
    pub(crate) chunks: u64,
    pub(crate) new_chunks: u64,
    pub(crate) files_unchanged: u64,
    /// The database name, for database parts.
    pub(crate) database: Option<String>,
}

/// The content of a bundle snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct BundleIndex {
    pub(crate) bundle: String,
    pub(crate) profile: Option<String>,
    pub(crate) root: Option<PathBuf>,
    pub(crate) config_file: Option<PathBuf>,
    pub(crate) parts: Vec<PartRecord>,
    pub(crate) hooks: Vec<HookLog>,
}

impl BundleIndex {
    /// The JSON object shown by `--json`.
    pub(crate) fn json(
        &self,
        id: Option<&str>,
        status: &str,
        error: Option<&str>,
    ) -> serde_json::Value {
        serde_json::json!({
            "snapshot_id": id,
            "bundle": self.bundle,
            "status": status,
            "error": error,
            "profile": self.profile,
            "parts": self.parts,
            "hooks": self.hooks,
        })
    }
}

fn vars(b: &BundleConfig) -> Vec<(&'static str, String)> {
    vec![
        ("FLEETVAULT_BUNDLE", b.name.clone()),
        ("FLEETVAULT_PARTS", b.parts.join(" ")),
    ]
}

/// Two failures (a part's, then an `after` hook's) in one line.
fn both(first: Option<String>, then: Option<String>) -> Option<String> {
    match (first, then) {
        (Some(f), Some(a)) => Some(format!("{f}; and {a}")),
        (f, a) => f.or(a),
    }
}

type SharedProgress = Arc<dyn Fn(Progress) + Send + Sync>;

/// What a bundle backup did: its index, the bundle snapshot's report if it was committed,
/// and what failed (a part or a hook; an `after` hook can fail after the commit).
pub(crate) struct Outcome {
    pub(crate) index: BundleIndex,
    pub(crate) committed: Option<JobReport>,
    pub(crate) error: Option<String>,
}

/// Backs up `bundle`: hooks and parts in order, then the bundle snapshot.
pub(crate) async fn backup(
    client: Arc<Client>,
    config: &AgentConfig,
    bundle: &BundleConfig,
    job: Option<String>,
    progress: SharedProgress,
) -> Outcome {
    let mut index = BundleIndex {
        bundle: bundle.name.clone(),
        profile: bundle.profile.clone(),
        root: bundle.root.clone(),
        config_file: bundle.config_file.clone(),
        parts: Vec::new(),
        hooks: Vec::new(),
    };
    let base = vars(bundle);
    let (logs, mut failure) = hooks::run_all(&bundle.before, "before", &base, true).await;
    index.hooks.extend(logs);
    let mut current = String::new();
    let mut done: u64 = 0;
    if failure.is_none() {
        for name in &bundle.parts {
            current = name.clone();
            let Ok(source) = config.source(name) else {
                failure = Some(format!("part {name} is not a source of this agent"));
                break;
            };
            let p = progress.clone();
            let tags = vec![format!("bundle:{}", bundle.name)];
            let result =
                crate::backup::run_tagged(client.clone(), source, job.clone(), tags, move |pr| {
                    p(Progress {
                        bytes: done + pr.bytes,
                        total: None,
                    })
                })
                .await;
            match result {
                Ok(r) => {
                    done += r.bytes_read;
                    index.parts.push(part_record(source, Some(&r), None));
                }
                Err(e) => {
                    let e = format!("{e:#}");
                    index.parts.push(part_record(source, None, Some(&e)));
                    failure = Some(format!("part {name}: {e}"));
                    break;
                }
            }
        }
    }
    let mut after_vars = base.clone();
    after_vars.push(("FLEETVAULT_PART", current));
    let ids: Vec<&str> = index
        .parts
        .iter()
        .filter_map(|p| p.snapshot_id.as_deref())
        .collect();
    after_vars.push(("FLEETVAULT_SNAPSHOT_IDS", ids.join(" ")));
    let status = if failure.is_none() { "ok" } else { "failed" };
    after_vars.push(("FLEETVAULT_STATUS", status.into()));
    let (logs, after_failure) = hooks::run_all(&bundle.after, "after", &after_vars, false).await;
    index.hooks.extend(logs);
    if let Some(reason) = failure {
        let reason = both(Some(reason), after_failure).unwrap_or_default();
        record_failed(&client, bundle, &reason).await;
        return Outcome {
            index,
            committed: None,
            error: Some(reason),
        };
    }
    let bytes = match serde_json::to_vec_pretty(&index) {
        Ok(b) => b,
        Err(e) => {
            return Outcome {
                index,
                committed: None,
                error: Some(e.to_string()),
            }
        }
    };
    let source = SourceConfig {
        name: bundle.name.clone(),
        kind: SourceKind::Inline {
            kind: KIND,
            bytes: Arc::new(bytes),
        },
        chunker: fleetvault_common::ChunkerParams::default(),
        zstd_level: fleetvault_common::chunk::DEFAULT_ZSTD_LEVEL,
    };
    // The catalog lists the parts with the bundle; each part's own record has its sizes.
    let mut tags = vec![KIND.to_owned()];
    tags.extend(bundle.profile.iter().map(|p| format!("profile:{p}")));
    tags.extend(index.parts.iter().map(|p| {
        format!(
            "part:{}={}",
            p.name,
            p.snapshot_id.as_deref().unwrap_or("-")
        )
    }));
    let committed = crate::backup::run_tagged(client, &source, job, tags, |_| {}).await;
    match committed {
        Ok(r) => Outcome {
            error: after_failure.map(|a| {
                format!(
                    "bundle {} completed as snapshot {}, but {a}",
                    bundle.name, r.snapshot_id
                )
            }),
            committed: Some(r),
            index,
        },
        Err(e) => Outcome {
            index,
            committed: None,
            error: Some(format!("{e:#}")),
        },
    }
}

fn part_record(source: &SourceConfig, r: Option<&JobReport>, error: Option<&str>) -> PartRecord {
    PartRecord {
        name: source.name.clone(),
        kind: source.kind_name().to_owned(),
        snapshot_id: r.map(|r| r.snapshot_id.clone()),
        status: if r.is_some() { "completed" } else { "failed" }.into(),
        error: error.map(str::to_owned),
        bytes_read: r.map_or(0, |r| r.bytes_read),
        bytes_uploaded: r.map_or(0, |r| r.bytes_uploaded),
        chunks: r.map_or(0, |r| r.chunks),
        new_chunks: r.map_or(0, |r| r.new_chunks),
        files_unchanged: r.map_or(0, |r| r.files_unchanged),
        database: match &source.kind {
            SourceKind::Database(db) => Some(db.database.clone()),
            _ => None,
        },
    }
}

/// Lists a failed bundle in the catalog, with the reason.
async fn record_failed(client: &Client, bundle: &BundleConfig, reason: &str) {
    let begin = Begin {
        source: bundle.name.clone(),
        kind: KIND.into(),
        chunker: fleetvault_common::ChunkerParams::default(),
        job: None,
        tags: vec![KIND.into()],
    };
    if let Ok((snapshot, _)) = client.begin(begin).await {
        if let Err(e) = client.abort(snapshot, reason.to_owned()).await {
            tracing::warn!(error = %e, "cannot record the failed bundle");
        }
    }
}

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
    crate::restore::run(
        client,
        snapshot,
        crate::restore::Target::Path(path.clone()),
        |_| {},
    )
    .await?;
    let bytes = std::fs::read(&path).context("reading the bundle index")?;
    serde_json::from_slice(&bytes).with_context(|| format!("snapshot {snapshot}: bad bundle index"))
}

/// Restores bundle snapshot `snapshot` into this agent's bundle of the same name: hooks,
/// every part in order, hooks; a clone's configuration rewritten last.
pub(crate) async fn restore(
    client: Arc<Client>,
    config: &AgentConfig,
    snapshot: SnapshotId,
    how: &BundleRestore,
) -> anyhow::Result<RestoreReport> {
    let index = read_index(client.clone(), snapshot).await?;
    let bundle = config.bundle(&index.bundle).with_context(|| {
        format!(
            "snapshot {snapshot} is bundle {:?}: restore it on an agent whose agent.toml has that bundle",
            index.bundle
        )
    })?;
    let old_root = index.root.clone().or_else(|| bundle.root.clone());
    if how.root.is_some() && old_root.is_none() {
        bail!(
            "bundle {} has no `root`: --root cannot move it",
            bundle.name
        );
    }
    for p in &index.parts {
        config
            .source(&p.name)
            .with_context(|| format!("bundle {}: part {}", bundle.name, p.name))?;
    }
    let mut report = RestoreReport {
        bundle: bundle.name.clone(),
        error: None,
        parts: Vec::new(),
        hooks: Vec::new(),
        config_rewritten: None,
    };
    let mut v = vars(bundle);
    v.push(("FLEETVAULT_SNAPSHOT_ID", snapshot.to_string()));
    let (logs, mut failure) = hooks::run_all(&bundle.before, "restore-before", &v, true).await;
    report.hooks.extend(logs);
    let mut current = String::new();
    // The database first, then the files in their order (data, config, …): the database
    // goes where the snapshot's own copy of the application's configuration says.
    let mut order: Vec<&PartRecord> = index.parts.iter().filter(|p| p.kind != "files").collect();
    order.extend(index.parts.iter().filter(|p| p.kind == "files"));
    let target = if failure.is_none() {
        match database_target(&client, config, bundle, &index, old_root.as_deref()).await {
            Ok(t) => t,
            Err(e) => {
                failure = Some(format!("finding the database to restore into: {e:#}"));
                None
            }
        }
    } else {
        None
    };
    if failure.is_none() {
        for part in order {
            current = part.name.clone();
            match restore_part(
                &client,
                config,
                part,
                target.as_ref(),
                old_root.as_deref(),
                how,
            )
            .await
            {
                Ok(r) => {
                    let safety = r
                        .safety_snapshot_id
                        .map(|s| format!(" (safety snapshot {s})"))
                        .unwrap_or_default();
                    report.parts.push(format!(
                        "part {}: completed into {}{safety}",
                        part.name,
                        r.restored_to.unwrap_or_default()
                    ));
                }
                Err(e) => {
                    let e = format!("part {}: {e:#}", part.name);
                    report.parts.push(format!("{e} (failed)"));
                    failure = Some(e);
                    break;
                }
            }
        }
    }
    if failure.is_none() {
        if let (Some(new_root), Some(old_root)) = (&how.root, &old_root) {
            match rewrite(&index, old_root, new_root, how.database.as_deref()) {
                Ok(path) => report.config_rewritten = path,
                Err(e) => failure = Some(format!("rewriting the clone's configuration: {e:#}")),
            }
        }
    }
    v.push(("FLEETVAULT_PART", current));
    v.push((
        "FLEETVAULT_STATUS",
        if failure.is_none() { "ok" } else { "failed" }.into(),
    ));
    let (logs, after_failure) = hooks::run_all(&bundle.after, "restore-after", &v, false).await;
    failure = both(failure, after_failure);
    report.hooks.extend(logs);
    report.error = failure;
    Ok(report)
}

/// For a profile bundle, the database its application's configuration named at backup time:
/// read from the snapshot's own copy of that file (restored into a temporary directory), or
/// from the file on this host when no part holds it.
async fn database_target(
    client: &Arc<Client>,
    config: &AgentConfig,
    bundle: &BundleConfig,
    index: &BundleIndex,
    old_root: Option<&Path>,
) -> anyhow::Result<Option<crate::config::DbSource>> {
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
            let target = crate::restore::Target::Relocated {
                dir: tmp.path().to_owned(),
                from: root.to_owned(),
            };
            crate::restore::run(client.clone(), id.parse()?, target, |_| {}).await?;
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

async fn restore_part(
    client: &Arc<Client>,
    config: &AgentConfig,
    part: &PartRecord,
    database: Option<&crate::config::DbSource>,
    old_root: Option<&Path>,
    how: &BundleRestore,
) -> anyhow::Result<JobReport> {
    let id: SnapshotId = part
        .snapshot_id
        .as_deref()
        .context("the part has no snapshot")?
        .parse()?;
    let source = config.source(&part.name)?;
    match &source.kind {
        SourceKind::Files { paths, .. } => {
            let target = match (&how.root, old_root) {
                (Some(new_root), Some(old_root)) => crate::restore::Target::Relocated {
                    dir: new_root.clone(),
                    from: old_root.to_owned(),
                },
                // In place: only inside what this host backs up under that part's name (the
                // snapshot may come from another, compromised host).
                _ => crate::restore::Target::InPlace {
                    paths: paths.clone(),
                },
            };
            crate::restore::run(client.clone(), id, target, |_| {}).await
        }
        _ => {
            let options = RestoreOptions {
                source: Some(part.name.clone()),
                database: how.database.clone(),
                replace: how.replace,
                no_safety_snapshot: false,
                target: None,
            };
            let rec = crate::restore::read_record(client, id).await?;
            let mut config = config.clone();
            if let (Some(db), SourceKind::Database(_)) = (database, &source.kind) {
                if let Some(s) = config.sources.iter_mut().find(|s| s.name == part.name) {
                    s.kind = SourceKind::Database(db.clone());
                }
            }
            crate::restore::run_into_plain(client.clone(), &config, rec, &options, |_| {}).await
        }
    }
}

/// Rewrites the restored copy of the app's configuration for a clone; returns its path.
fn rewrite(
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

/// A connection string with its password replaced.
fn redact_uri(uri: &str) -> String {
    match (uri.find("://"), uri.rfind('@')) {
        (Some(s), Some(at)) if at > s => match uri[s + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &uri[..s + 3], &uri[at..]),
            None => uri.to_owned(),
        },
        _ => uri.to_owned(),
    }
}

/// The text form of [`describe`].
pub(crate) fn describe_text(b: &serde_json::Value) -> String {
    let mut out = format!("bundle {}", b["name"].as_str().unwrap_or(""));
    if let Some(p) = b["profile"].as_str() {
        out.push_str(&format!(
            " (profile {p}, root {})",
            b["root"].as_str().unwrap_or("-")
        ));
    }
    out.push('\n');
    for h in b["before"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  before: {} (timeout {} s)\n",
            h["command"].as_str().unwrap_or(""),
            h["timeout_secs"]
        ));
    }
    for p in b["parts"].as_array().into_iter().flatten() {
        let what = match p["kind"].as_str().unwrap_or("") {
            "files" => p["paths"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default(),
            "missing" => "not a source of this agent".into(),
            _ if p["database"].is_string() => format!(
                "database {} on {}{} as {}, password {}",
                p["database"].as_str().unwrap_or(""),
                p["host"].as_str().unwrap_or("the default host"),
                p["port"]
                    .as_u64()
                    .map(|n| format!(":{n}"))
                    .unwrap_or_default(),
                p["user"].as_str().unwrap_or("the default user"),
                p["password"].as_str().unwrap_or("")
            ),
            _ => String::new(),
        };
        out.push_str(&format!(
            "  part {} ({}): {what}\n",
            p["name"].as_str().unwrap_or(""),
            p["kind"].as_str().unwrap_or("")
        ));
    }
    for h in b["after"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  after: {} (timeout {} s)\n",
            h["command"].as_str().unwrap_or(""),
            h["timeout_secs"]
        ));
    }
    out
}

/// The lines `fleetvault-agent bundles` prints for one bundle (no secrets).
pub(crate) fn describe(config: &AgentConfig, b: &BundleConfig) -> serde_json::Value {
    let parts: Vec<serde_json::Value> = b
        .parts
        .iter()
        .map(|p| match config.source(p) {
            Ok(s) => match &s.kind {
                SourceKind::Files { paths, exclude } => serde_json::json!({
                    "name": p, "kind": "files", "paths": paths, "exclude": exclude,
                }),
                SourceKind::Database(db) => serde_json::json!({
                    "name": p, "kind": db.engine.kind_name(), "database": db.database,
                    "host": db.host, "port": db.port, "user": db.user,
                    "uri": db.uri.as_deref().map(redact_uri),
                    "password": if db.password.is_some() || db.password_file.is_some() { "(set, not shown)" } else { "(none)" },
                }),
                _ => serde_json::json!({ "name": p, "kind": s.kind_name() }),
            },
            Err(_) => serde_json::json!({ "name": p, "kind": "missing" }),
        })
        .collect();
    let hooks = |h: &[Hook]| -> Vec<serde_json::Value> {
        h.iter()
            .map(|h| serde_json::json!({"command": h.command, "timeout_secs": h.timeout.as_secs()}))
            .collect()
    };
    serde_json::json!({
        "name": b.name,
        "profile": b.profile,
        "root": b.root,
        "config_file": b.config_file,
        "parts": parts,
        "before": hooks(&b.before),
        "after": hooks(&b.after),
    })
}
