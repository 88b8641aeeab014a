//! What the operator's commands print: each builds one value that derives `Serialize`, printed
//! as JSON with `--json` or rendered for people (a table or a few lines) by [`Output::human`].
//! So the two forms cannot drift apart: they are the same value.

use fleetvault_common::protocol::{
    AgentInfo, GcReport, ReplicaStatus, RetentionDecision, VerifyResult,
};
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

/// `verify [ID]`: each snapshot checked, with what is wrong with it.
#[derive(Serialize)]
#[serde(transparent)]
pub(crate) struct Verify(Vec<VerifyRow>);

#[derive(Serialize)]
struct VerifyRow {
    id: String,
    agent: String,
    source: String,
    chunks: u64,
    ok: bool,
    damaged: Vec<String>,
    missing: Vec<String>,
    problems: Vec<String>,
}

impl Verify {
    pub(crate) fn new(results: &[VerifyResult]) -> Self {
        Self(
            results
                .iter()
                .map(|r| VerifyRow {
                    id: r.snapshot.to_string(),
                    agent: r.agent.clone(),
                    source: r.source.clone(),
                    chunks: r.chunks,
                    ok: r.damaged.is_empty() && r.missing.is_empty() && r.problems.is_empty(),
                    damaged: r.damaged.iter().map(|c| c.to_hex()).collect(),
                    missing: r.missing.iter().map(|c| c.to_hex()).collect(),
                    problems: r.problems.clone(),
                })
                .collect(),
        )
    }

    /// The snapshots found damaged.
    pub(crate) fn damaged(&self) -> usize {
        self.0.iter().filter(|r| !r.ok).count()
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

impl Output for Verify {
    fn human(&self) -> String {
        let mut out = String::new();
        for r in &self.0 {
            let state = if r.ok { "ok" } else { "DAMAGED" };
            out.push_str(&format!(
                "{}  {}/{}  {}  {state}\n",
                r.id,
                r.agent,
                r.source,
                report::plural(r.chunks, "chunk", "chunks")
            ));
            for c in &r.damaged {
                out.push_str(&format!("    damaged chunk {c} (quarantined)\n"));
            }
            for c in &r.missing {
                out.push_str(&format!("    missing chunk {c}\n"));
            }
            for p in &r.problems {
                out.push_str(&format!("    {p}\n"));
            }
        }
        out
    }
}

/// `replicas`: each configured replica, its last sync and its lag.
#[derive(Serialize)]
#[serde(transparent)]
pub(crate) struct Replicas(Vec<ReplicaRow>);

#[derive(Serialize)]
struct ReplicaRow {
    name: String,
    address: String,
    schedule: Option<String>,
    last_attempt: Option<String>,
    last_success: Option<String>,
    last_error: Option<String>,
    failures: u32,
    next_retry: Option<String>,
    lag_snapshots: u64,
    lag_bytes: u64,
    last_report: Option<serde_json::Value>,
    #[serde(skip)]
    times_ms: [Option<u64>; 3],
}

impl Replicas {
    pub(crate) fn new(list: &[ReplicaStatus]) -> Self {
        let when = |t: Option<u64>| t.map(report::rfc3339);
        Self(
            list.iter()
                .map(|s| ReplicaRow {
                    name: s.name.clone(),
                    address: s.address.clone(),
                    schedule: s.schedule.clone(),
                    last_attempt: when(s.last_attempt_ms),
                    last_success: when(s.last_success_ms),
                    last_error: s.last_error.clone(),
                    failures: s.failures,
                    next_retry: when(s.next_retry_ms),
                    lag_snapshots: s.lag_snapshots,
                    lag_bytes: s.lag_bytes,
                    last_report: s.last_report.as_ref().map(report::replica_report_json),
                    times_ms: [s.last_success_ms, s.last_attempt_ms, s.next_retry_ms],
                })
                .collect(),
        )
    }
}

impl Output for Replicas {
    fn human(&self) -> String {
        let when = |t: Option<u64>| t.map_or_else(|| "never".into(), report::format_time);
        report::table(
            [
                "NAME",
                "ADDRESS",
                "LAST SUCCESS (UTC)",
                "LAST ATTEMPT (UTC)",
                "LAG",
                "LAST ERROR",
            ],
            self.0.iter().map(|s| {
                let [success, attempt, retry] = s.times_ms;
                let error = match (&s.last_error, retry) {
                    (Some(e), Some(t)) => format!(
                        "{e} ({} failures; retry at {})",
                        s.failures,
                        report::format_time(t)
                    ),
                    (Some(e), None) => e.clone(),
                    (None, _) => "-".into(),
                };
                [
                    s.name.clone(),
                    s.address.clone(),
                    when(success),
                    when(attempt),
                    format!("{} / {}", s.lag_snapshots, report::human_bytes(s.lag_bytes)),
                    error,
                ]
            }),
        )
    }
}

/// `promote`: the peers retired and the agents to re-issue.
#[derive(Serialize)]
pub(crate) struct Promote {
    status: &'static str,
    retired_peers: Vec<String>,
    agents_to_reissue: Vec<String>,
    #[serde(skip)]
    data_dir: String,
}

impl Promote {
    pub(crate) fn new(retired: Vec<String>, agents: Vec<String>, data_dir: String) -> Self {
        Self {
            status: "completed",
            retired_peers: retired,
            agents_to_reissue: agents,
            data_dir,
        }
    }
}

impl Output for Promote {
    fn human(&self) -> String {
        let mut out = if self.retired_peers.is_empty() {
            "promoted: no peer certificates to retire\n".to_owned()
        } else {
            format!(
                "promoted: peer certificates retired (they can no longer send snapshots here): {}\n",
                self.retired_peers.join(", ")
            )
        };
        out.push_str(
            "re-issue each agent's config from this coordinator and install it on the agent:\n",
        );
        for a in &self.agents_to_reissue {
            out.push_str(&format!(
                "  fleetvault-coordinator issue-agent {a} --data-dir {} --out ./{a} --force\n",
                self.data_dir
            ));
        }
        out.push_str(
            "to seed a new replica, run `issue-peer` on it and add its [[replicas]] table here\n",
        );
        out
    }
}
