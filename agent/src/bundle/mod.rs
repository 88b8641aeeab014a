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
//!
//! This module owns the backup side, the index and `fleetvault-agent bundles`; the restore
//! side is decided by `restore::plan`, with its helpers in `restore::bundle`. May import
//! `config`, `process` and `backup`; never `restore`.

use std::path::PathBuf;
use std::sync::Arc;

use fleetvault_common::protocol::{Begin, Progress};
use fleetvault_common::{Client, JobReport};
use serde::{Deserialize, Serialize};

use crate::config::{AgentConfig, Hook, SourceConfig, SourceKind};
pub(crate) use crate::config::{BundleConfig, BUNDLE_KIND as KIND};
use crate::process::{self as hooks, HookLog};

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

pub(crate) fn vars(b: &BundleConfig) -> Vec<(&'static str, String)> {
    vec![
        ("FLEETVAULT_BUNDLE", b.name.clone()),
        ("FLEETVAULT_PARTS", b.parts.join(" ")),
    ]
}

/// Two failures (a part's, then an `after` hook's) in one line.
pub(crate) fn both(first: Option<String>, then: Option<String>) -> Option<String> {
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
