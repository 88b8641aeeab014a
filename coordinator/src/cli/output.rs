//! What the operator's commands print: each builds one value that derives `Serialize`, printed
//! as JSON with `--json` or rendered for people (a table or a few lines) by [`Output::human`].
//! So the two forms cannot drift apart: they are the same value.

use fleetvault_common::protocol::{AgentInfo, GcReport, RetentionDecision};
use fleetvault_common::report;
use serde::Serialize;

/// A command's result.
pub(crate) trait Output: Serialize {
    /// The text for people, ending with a newline.
    fn human(&self) -> String;
}

/// Prints `out` as pretty JSON or as its human form.
pub(crate) fn emit(json: bool, out: &impl Output) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(out)?);
    } else {
        print!("{}", out.human());
    }
    Ok(())
}

/// `agents`: every agent the coordinator knows.
#[derive(Serialize)]
#[serde(transparent)]
pub(crate) struct Agents(pub(crate) Vec<AgentRow>);

#[derive(Serialize)]
pub(crate) struct AgentRow {
    name: String,
    connected: bool,
    last_seen_ms: u64,
    last_seen: String,
    version: String,
    sources: Vec<SourceRow>,
    last_backup: Option<LastBackupRow>,
    #[serde(skip)]
    started_ms: Option<u64>,
}

#[derive(Serialize)]
struct SourceRow {
    name: String,
    kind: String,
}

#[derive(Serialize)]
struct LastBackupRow {
    id: String,
    source: String,
    status: String,
    reason: Option<String>,
    started: String,
}

impl From<&AgentInfo> for AgentRow {
    fn from(a: &AgentInfo) -> Self {
        Self {
            name: a.name.clone(),
            connected: a.connected,
            last_seen_ms: a.last_seen_ms,
            last_seen: report::rfc3339(a.last_seen_ms),
            version: a.version.clone(),
            sources: a
                .sources
                .iter()
                .map(|s| SourceRow {
                    name: s.name.clone(),
                    kind: s.kind.clone(),
                })
                .collect(),
            last_backup: a.last_backup.as_ref().map(|l| LastBackupRow {
                id: l.snapshot.to_string(),
                source: l.source.clone(),
                status: l.status.name().to_owned(),
                reason: match &l.status {
                    fleetvault_common::SnapshotStatus::Failed { reason } => Some(reason.clone()),
                    _ => None,
                },
                started: report::rfc3339(l.started_ms),
            }),
            started_ms: a.last_backup.as_ref().map(|l| l.started_ms),
        }
    }
}

impl Output for Agents {
    fn human(&self) -> String {
        report::table(
            [
                "NAME",
                "STATE",
                "LAST SEEN (UTC)",
                "VERSION",
                "LAST BACKUP",
                "SOURCES",
            ],
            self.0.iter().map(|a| {
                let sources: Vec<String> = a
                    .sources
                    .iter()
                    .map(|s| format!("{} ({})", s.name, s.kind))
                    .collect();
                let last = match (&a.last_backup, a.started_ms) {
                    (Some(l), Some(started)) => format!(
                        "{} {} {} {}",
                        l.id,
                        l.source,
                        l.status,
                        report::format_time(started)
                    ),
                    _ => "-".into(),
                };
                [
                    a.name.clone(),
                    if a.connected { "connected" } else { "offline" }.to_owned(),
                    report::format_time(a.last_seen_ms),
                    a.version.clone(),
                    last,
                    sources.join(", "),
                ]
            }),
        )
    }
}

/// `protect`, `unprotect` and `delete`: one snapshot changed.
#[derive(Serialize)]
pub(crate) struct SnapshotChanged {
    status: &'static str,
    snapshot_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    protected: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deleted: Option<bool>,
}

impl SnapshotChanged {
    pub(crate) fn protected(snapshot: impl ToString, on: bool) -> Self {
        Self {
            status: "completed",
            snapshot_id: snapshot.to_string(),
            protected: Some(on),
            deleted: None,
        }
    }

    pub(crate) fn deleted(snapshot: impl ToString) -> Self {
        Self {
            status: "completed",
            snapshot_id: snapshot.to_string(),
            protected: None,
            deleted: Some(true),
        }
    }
}

impl Output for SnapshotChanged {
    fn human(&self) -> String {
        let id = &self.snapshot_id;
        match self.protected {
            Some(true) => format!("snapshot {id} protected\n"),
            Some(false) => format!("snapshot {id} unprotected\n"),
            None => format!(
                "snapshot {id} deleted; run `fleetvault-coordinator gc` to free its chunks\n"
            ),
        }
    }
}

/// `forget JOB [--dry-run]`: what retention keeps and forgets.
#[derive(Serialize)]
#[serde(transparent)]
pub(crate) struct Forget {
    rows: Vec<ForgetRow>,
    #[serde(skip)]
    dry_run: bool,
}

#[derive(Serialize)]
struct ForgetRow {
    id: String,
    agent: String,
    source: String,
    started: String,
    keep: bool,
    reasons: Vec<String>,
    #[serde(skip)]
    started_ms: u64,
}

impl Forget {
    pub(crate) fn new(decisions: &[RetentionDecision], dry_run: bool) -> Self {
        let rows = decisions
            .iter()
            .map(|d| ForgetRow {
                id: d.snapshot.to_string(),
                agent: d.agent.clone(),
                source: d.source.clone(),
                started: report::rfc3339(d.started_ms),
                keep: d.keep,
                reasons: d.reasons.clone(),
                started_ms: d.started_ms,
            })
            .collect();
        Self { rows, dry_run }
    }
}

impl Output for Forget {
    fn human(&self) -> String {
        let verb = if self.dry_run {
            "would forget"
        } else {
            "forgotten"
        };
        report::table(
            ["ID", "AGENT", "SOURCE", "STARTED (UTC)", "DECISION"],
            self.rows.iter().map(|d| {
                [
                    d.id.clone(),
                    d.agent.clone(),
                    d.source.clone(),
                    report::format_time(d.started_ms),
                    if d.keep {
                        format!("keep ({})", d.reasons.join(", "))
                    } else {
                        verb.to_owned()
                    },
                ]
            }),
        )
    }
}

/// `gc`: what a collection freed and kept.
#[derive(Serialize)]
pub(crate) struct Gc {
    live_chunks: u64,
    deleted_chunks: u64,
    freed_bytes: u64,
    young_chunks: u64,
    duration_ms: u64,
    unreadable: Vec<String>,
}

impl From<&GcReport> for Gc {
    fn from(r: &GcReport) -> Self {
        Self {
            live_chunks: r.live_chunks,
            deleted_chunks: r.deleted_chunks,
            freed_bytes: r.freed_bytes,
            young_chunks: r.young_chunks,
            duration_ms: r.duration_ms,
            unreadable: r.unreadable.iter().map(|id| id.to_string()).collect(),
        }
    }
}

impl Output for Gc {
    fn human(&self) -> String {
        let mut out = format!(
            "gc: {} deleted, {} freed; {} live, {} unreferenced but younger than the minimum age; {:.1}s\n",
            report::plural(self.deleted_chunks, "chunk", "chunks"),
            report::human_bytes(self.freed_bytes),
            self.live_chunks,
            self.young_chunks,
            self.duration_ms as f64 / 1000.0
        );
        for id in &self.unreadable {
            out.push_str(&format!("    snapshot {id}: manifest unreadable; every chunk its agent references was kept (run verify)\n"));
        }
        out
    }
}
