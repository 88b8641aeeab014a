//! What people and scripts see: the JSON view of snapshot records and job reports, the
//! aligned table, human sizes and times. Shared by both binaries so `--json` fields are the
//! same everywhere.

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
        "started": format_time(r.started_ms),
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
    serde_json::to_value(r).unwrap_or(Value::Null)
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
        "{}: {} snapshots sent ({} already there), {} chunks, {} in {secs:.1}s ({}/s)",
        r.replica,
        r.snapshots,
        r.already_present,
        r.chunks,
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
            "snapshot {} of {}/{} {}: {} read, {} chunks, {} new, {} uploaded, in {:.1}s ({}/s)",
            r.snapshot_id,
            r.agent,
            r.source,
            r.status,
            human_bytes(r.bytes_read),
            r.chunks,
            r.new_chunks,
            human_bytes(r.bytes_uploaded),
            secs,
            rate(r.bytes_read)
        )
    };
    if r.files_unchanged > 0 {
        s.push_str(&format!(
            ", {} unchanged files not re-read",
            r.files_unchanged
        ));
    }
    for w in &r.warnings {
        s.push_str(&format!("\nwarning: {w}"));
    }
    s
}

/// The aligned snapshot table for people.
pub fn snapshots_table(records: &[SnapshotRecord]) -> String {
    let header = [
        "ID",
        "AGENT",
        "SOURCE",
        "KIND",
        "STATUS",
        "STARTED (UTC)",
        "DURATION",
        "SIZE",
        "NEW",
        "STORED",
        "CHUNKS",
        "DEDUP",
        "REASON",
    ];
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            let reason = match &r.status {
                SnapshotStatus::Failed { reason } => reason.clone(),
                _ => String::new(),
            };
            let dedup = r.dedup_ratio();
            vec![
                r.id.to_string(),
                r.agent.clone(),
                r.source.clone(),
                r.kind.clone(),
                r.job.clone().unwrap_or_else(|| "-".into()),
                if r.tags.iter().any(|t| t == "damaged") {
                    format!("{} (damaged)", r.status.name())
                } else {
                    r.status.name().to_owned()
                },
                format_time(r.started_ms),
                r.ended_ms
                    .map(|e| format!("{:.1}s", e.saturating_sub(r.started_ms) as f64 / 1000.0))
                    .unwrap_or_else(|| "-".into()),
                human_bytes(r.logical_bytes),
                human_bytes(r.new_bytes),
                human_bytes(r.stored_bytes),
                r.chunks.to_string(),
                format!("{:.1}x", r.compression_ratio()),
                if dedup.is_finite() {
                    format!("{dedup:.1}x")
                } else {
                    "all".into()
                },
                reason,
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.iter().map(|s| s.to_string()).collect());
    for row in rows {
        line(row);
    }
    out
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

/// `1.5 GiB`, `312 KiB`, `12 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The civil date (year, month, day) of a day number (days since 1970-01-01), by Howard
/// Hinnant's days-from-civil inverse.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `2026-11-23 14:05:09` (UTC) from unix milliseconds.
pub fn format_time(ms: u64) -> String {
    let secs = ms / 1000;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_sizes_read_well() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00");
        assert_eq!(format_time(1_795_392_000_000), "2026-11-23 00:00:00");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }
}
