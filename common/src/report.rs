//! What people and scripts see: the JSON view of snapshot records and job reports, tables,
//! the detail view of one snapshot, human sizes and times. Shared by both binaries so
//! `--json` fields and columns are the same everywhere. Times in JSON are RFC 3339 (UTC);
//! people get `YYYY-MM-DD HH:MM:SS` under a header that says UTC.

use serde_json::{json, Value};

use crate::protocol::{JobReport, ReplicaReport, SnapshotRecord, SnapshotStatus};

/// The `--json` object of one snapshot.
pub fn snapshot_json(r: &SnapshotRecord) -> Value {
    let reason = match &r.status {
        SnapshotStatus::Failed { reason } => Some(reason.clone()),
        _ => None,
    };
    json!({
        "id": r.id.to_string(),
        "agent": r.agent,
        "source": r.source,
        "kind": r.kind,
        "status": r.status.name(),
        "reason": reason,
        "started_ms": r.started_ms,
        "ended_ms": r.ended_ms,
        "started": rfc3339(r.started_ms),
        "ended": r.ended_ms.map(rfc3339),
        "duration_ms": r.ended_ms.map(|e| e.saturating_sub(r.started_ms)),
        "logical_bytes": r.logical_bytes,
        "new_bytes": r.new_bytes,
        "stored_bytes": r.stored_bytes,
        "chunks": r.chunks,
        "new_chunks": r.new_chunks,
        "compression_ratio": round2(r.compression_ratio()),
        "dedup_ratio": if r.dedup_ratio().is_finite() { json!(round2(r.dedup_ratio())) } else { Value::Null },
        "checksum": r.checksum.map(hex::encode),
        "manifest_chunks": r.root.as_ref().map(|m| m.chunks.len()),
        "chunker": { "min": r.chunker.min, "avg": r.chunker.avg, "max": r.chunker.max },
        "parent": r.parent.map(|p| p.to_string()),
        "db_type": r.db_type,
        "db_version": r.db_version,
        "database": r.database,
        "job": r.job,
        "tags": r.tags,
        "protected": r.protected,
        "warnings": r.warnings,
    })
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The `--json` object of a backup or restore.
pub fn job_json(r: &JobReport) -> Value {
    // JobReport derives Serialize with plain fields; this cannot fail.
    let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
    if r.snapshot_id.is_empty() {
        // No record was made (e.g. the source does not exist): null, not "".
        v["snapshot_id"] = Value::Null;
    }
    v
}

/// The `--json` object of one replica sync (`mb_per_s`: sealed megabytes sent per second).
pub fn replica_report_json(r: &ReplicaReport) -> Value {
    json!({
        "replica": r.replica,
        "status": if r.error.is_some() { "failed" } else { "completed" },
        "snapshots": r.snapshots,
        "already_present": r.already_present,
        "chunks": r.chunks,
        "bytes": r.bytes,
        "duration_ms": r.duration_ms,
        "mb_per_s": round2(r.bytes as f64 / 1e6 / (r.duration_ms as f64 / 1000.0).max(0.001)),
        "error": r.error,
    })
}

/// One line about a replica sync.
pub fn replica_summary(r: &ReplicaReport) -> String {
    let secs = r.duration_ms as f64 / 1000.0;
    let mut line = format!(
        "{}: {} sent ({} already there), {}, {} in {secs:.1}s ({}/s)",
        r.replica,
        plural(r.snapshots, "snapshot", "snapshots"),
        r.already_present,
        plural(r.chunks, "chunk", "chunks"),
        human_bytes(r.bytes),
        human_bytes((r.bytes as f64 / secs.max(0.001)) as u64)
    );
    if let Some(e) = &r.error {
        line.push_str(&format!("; FAILED: {e}"));
    }
    line
}

/// A human one-paragraph summary of a backup or restore.
pub fn job_summary(r: &JobReport, restore: bool) -> String {
    let secs = r.duration_ms as f64 / 1000.0;
    let rate = |b: u64| human_bytes((b as f64 / secs.max(0.001)) as u64);
    let mut s = if restore {
        let into = r
            .restored_to
            .as_ref()
            .map(|t| format!(" into {t}"))
            .unwrap_or_default();
        let mut line = format!(
            "restored snapshot {} ({} of {}){into}: {} written in {:.1}s ({}/s)",
            r.snapshot_id,
            r.source,
            r.agent,
            human_bytes(r.bytes_written),
            secs,
            rate(r.bytes_written)
        );
        if let Some(safety) = &r.safety_snapshot_id {
            line.push_str(&format!("; safety snapshot of what was there: {safety}"));
        }
        line
    } else {
        format!(
            "snapshot {} of {}/{} {}: {} read, {}, {} new, {} uploaded, in {:.1}s ({}/s)",
            r.snapshot_id,
            r.agent,
            r.source,
            r.status,
            human_bytes(r.bytes_read),
            plural(r.chunks, "chunk", "chunks"),
            r.new_chunks,
            human_bytes(r.bytes_uploaded),
            secs,
            rate(r.bytes_read)
        )
    };
    if r.files_unchanged > 0 {
        s.push_str(&format!(
            ", {} not re-read",
            plural(r.files_unchanged, "unchanged file", "unchanged files")
        ));
    }
    for w in &r.warnings {
        s.push_str(&format!("\nwarning: {w}"));
    }
    s
}

/// A plain aligned table (no borders, two spaces between columns, header first): every
/// row has one cell per header, so a column can never go missing or shift.
pub fn table<const N: usize>(
    header: [&str; N],
    rows: impl IntoIterator<Item = [String; N]>,
) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(header);
    for row in rows {
        t.add_row(row);
    }
    for column in t.column_iter_mut() {
        column.set_padding((0, 2));
    }
    let mut out = String::new();
    for line in t.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A snapshot's status as people read it: `completed (damaged)` when verify found damage.
pub fn status_text(r: &SnapshotRecord) -> String {
    if r.tags.iter().any(|t| t == "damaged") {
        format!("{} (damaged)", r.status.name())
    } else {
        r.status.name().to_owned()
    }
}

fn duration_text(r: &SnapshotRecord) -> String {
    r.ended_ms
        .map(|e| format!("{:.1}s", e.saturating_sub(r.started_ms) as f64 / 1000.0))
        .unwrap_or_else(|| "-".into())
}

fn dedup_text(r: &SnapshotRecord) -> String {
    let dedup = r.dedup_ratio();
    if dedup.is_finite() {
        format!("{dedup:.1}x")
    } else {
        "all".into()
    }
}

/// Prints a snapshot listing: a JSON array of [`snapshot_json`], or [`snapshots_table`].
pub fn print_snapshots(records: &[SnapshotRecord], json: bool) -> serde_json::Result<()> {
    if json {
        let v: Vec<_> = records.iter().map(snapshot_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", snapshots_table(records));
    }
    Ok(())
}

/// The snapshot table for people.
pub fn snapshots_table(records: &[SnapshotRecord]) -> String {
    table(
        [
            "ID",
            "AGENT",
            "SOURCE",
            "KIND",
            "JOB",
            "STATUS",
            "STARTED (UTC)",
            "DURATION",
            "SIZE",
            "NEW",
            "STORED",
            "CHUNKS",
            "COMPRESSION",
            "DEDUP",
            "REASON",
        ],
        records.iter().map(|r| {
            [
                r.id.to_string(),
                r.agent.clone(),
                r.source.clone(),
                r.kind.to_string(),
                r.job.clone().unwrap_or_else(|| "-".into()),
                status_text(r),
                format_time(r.started_ms),
                duration_text(r),
                human_bytes(r.logical_bytes),
                human_bytes(r.new_bytes),
                human_bytes(r.stored_bytes),
                r.chunks.to_string(),
                format!("{:.1}x", r.compression_ratio()),
                dedup_text(r),
                match &r.status {
                    SnapshotStatus::Failed { reason } => one_line(reason),
                    _ => String::new(),
                },
            ]
        }),
    )
}

/// `text` on one line (a table cell).
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The detail view of one snapshot (`snapshot show`); `bundle` is a bundle's index with
/// each part's own status and its hooks' output, when the snapshot is a bundle.
pub fn snapshot_detail(r: &SnapshotRecord, bundle: Option<&Value>) -> String {
    let mut rows: Vec<(&str, String)> = vec![
        ("snapshot", r.id.to_string()),
        ("agent", r.agent.clone()),
        ("source", r.source.clone()),
        ("kind", r.kind.to_string()),
    ];
    if let Some(t) = &r.db_type {
        let version = r.db_version.as_deref().unwrap_or("version unknown");
        rows.push(("database type", format!("{t} ({version})")));
    }
    if let Some(d) = &r.database {
        rows.push(("database", d.clone()));
    }
    rows.push(("status", status_text(r)));
    if let SnapshotStatus::Failed { reason } = &r.status {
        rows.push(("reason", reason.clone()));
    }
    rows.push(("started", format!("{} UTC", format_time(r.started_ms))));
    rows.push(("duration", duration_text(r)));
    if let Some(j) = &r.job {
        rows.push(("job", j.clone()));
    }
    rows.push((
        "size",
        format!(
            "{} ({} bytes)",
            human_bytes(r.logical_bytes),
            r.logical_bytes
        ),
    ));
    rows.push(("new", human_bytes(r.new_bytes)));
    rows.push(("stored", human_bytes(r.stored_bytes)));
    // `new_chunks` counts the manifest's chunks too: so does this total.
    let manifest = r.root.as_ref().map_or(0, |m| m.chunks.len() as u64);
    rows.push((
        "chunks",
        format!(
            "{} ({} of the manifest), {} new to the store",
            r.chunks + manifest,
            manifest,
            r.new_chunks
        ),
    ));
    rows.push(("compression", format!("{:.2}x", r.compression_ratio())));
    rows.push(("dedup", dedup_text(r)));
    if let Some(c) = r.checksum {
        rows.push(("checksum", format!("blake3:{}", hex::encode(c))));
    }
    rows.push((
        "parent",
        r.parent
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into()),
    ));
    rows.push((
        "tags",
        if r.tags.is_empty() {
            "-".into()
        } else {
            r.tags.join(", ")
        },
    ));
    rows.push(("protected", if r.protected { "yes" } else { "no" }.into()));
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in &rows {
        out.push_str(&format!("{k:<width$}  {v}\n"));
    }
    for w in &r.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    if let Some(index) = bundle {
        out.push_str(&bundle_detail(index));
    }
    out
}

/// A bundle's index (as its agent stored it) for people: each part with its own status, each
/// hook with its outcome and output.
fn bundle_detail(index: &Value) -> String {
    let text = |v: &Value| v.as_str().unwrap_or("-").to_owned();
    let mut out = format!(
        "bundle {} (profile {})\n",
        text(&index["bundle"]),
        text(&index["profile"])
    );
    let parts = index["parts"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    out.push_str(&table(
        ["PART", "KIND", "STATUS", "SNAPSHOT", "READ", "REASON"],
        parts.iter().map(|p| {
            [
                text(&p["name"]),
                text(&p["kind"]),
                text(&p["status"]),
                text(&p["snapshot_id"]),
                p["bytes_read"]
                    .as_u64()
                    .map(human_bytes)
                    .unwrap_or_else(|| "-".into()),
                p["error"].as_str().map(one_line).unwrap_or_default(),
            ]
        }),
    ));
    for h in index["hooks"].as_array().into_iter().flatten() {
        let outcome = match (h["timed_out"].as_bool(), h["exit_code"].as_i64()) {
            (Some(true), _) => "timed out".to_owned(),
            (_, Some(0)) => "ok".to_owned(),
            (_, Some(c)) => format!("exit code {c}"),
            _ => "killed by a signal".to_owned(),
        };
        out.push_str(&format!(
            "hook {} `{}`: {outcome} in {:.1}s\n",
            text(&h["phase"]),
            text(&h["command"]),
            h["duration_ms"].as_u64().unwrap_or(0) as f64 / 1000.0
        ));
        for line in h["output"].as_str().unwrap_or("").lines() {
            out.push_str(&format!("    {line}\n"));
        }
    }
    out
}

/// `1 chunk`, `5 chunks`.
pub fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// A byte progress bar on stderr when it is a terminal, hidden otherwise.
pub fn progress_bar(total: Option<u64>) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let (bar, template) = match total {
        Some(t) => (
            indicatif::ProgressBar::new(t),
            "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        ),
        None => (
            indicatif::ProgressBar::no_length(),
            "{spinner} [{elapsed_precise}] {bytes} {bytes_per_sec} {msg}",
        ),
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

/// A spinner with the elapsed time and `message` on stderr when it is a terminal (hidden
/// otherwise), for work whose size the command does not know.
pub fn spinner(message: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
    {
        bar.set_style(style);
    }
    bar.set_message(message.to_owned());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

/// A bar counting `unit` (e.g. `snapshots verified`) on stderr when it is a terminal.
pub fn count_bar(unit: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::no_length();
    let template =
        format!("{{spinner}} [{{elapsed_precise}}] [{{wide_bar}}] {{pos}}/{{len}} {unit}");
    if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

/// `1.50 GiB`, `312.00 KiB`, `12 B` (indicatif's binary units), as a table cell.
pub fn human_bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

fn utc(ms: u64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC)
}

/// `2026-11-23 14:05:09` (UTC) from unix milliseconds, for people.
pub fn format_time(ms: u64) -> String {
    utc(ms).format("%Y-%m-%d %H:%M:%S").to_string()
}

/// `2026-11-23T14:05:09Z` from unix milliseconds: RFC 3339 with its zone, for JSON.
pub fn rfc3339(ms: u64) -> String {
    utc(ms).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_sizes_read_well() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00");
        assert_eq!(format_time(1_795_392_000_000), "2026-11-23 00:00:00");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.00 MiB");
        assert_eq!(rfc3339(1_795_392_000_000), "2026-11-23T00:00:00Z");
        assert_eq!(plural(1, "chunk", "chunks"), "1 chunk");
        assert_eq!(plural(4, "chunk", "chunks"), "4 chunks");
    }

    #[test]
    fn every_table_row_has_one_cell_per_header() {
        let out = table(
            ["ID", "STATUS", "REASON"],
            [
                ["a".to_owned(), "failed".to_owned(), "disk full".to_owned()],
                ["bb".to_owned(), "completed".to_owned(), String::new()],
            ],
        );
        let lines: Vec<_> = out.lines().collect();
        assert_eq!(lines[0], "ID  STATUS     REASON");
        assert_eq!(lines[1], "a   failed     disk full");
        assert_eq!(lines[2], "bb  completed");
    }
}
