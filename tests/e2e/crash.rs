//! A coordinator killed with SIGKILL in the middle of a backup: after a restart the interrupted
//! snapshot is `failed` with a reason, nothing is left `running`, and the next backup succeeds.
//! Killed at two moments (just started, well into the stream), restarted each time.

use std::time::Duration;

use fleetvault_tests::data::{hash_command_output, MIB};
use fleetvault_tests::report::{find_snapshot, snapshot_id, str_field};
use fleetvault_tests::{scratch, shell_quote, wait_until, CommandSource, Coordinator};

/// A slow, deterministic 400 MiB stream: 1 MiB blocks with a pause (seconds, argv[1]) after each.
const SLOW_STREAM: &str = r#"
import random, sys, time
pause = float(sys.argv[1])
rng = random.Random(20240)
out = sys.stdout.buffer
for _ in range(400):
    out.write(rng.randbytes(1 << 20))
    out.flush()
    if pause:
        time.sleep(pause)
"#;

/// Total size of the chunk files in the store.
fn stored_bytes(coordinator: &Coordinator) -> anyhow::Result<u64> {
    let mut total = 0;
    for f in coordinator.chunk_files()? {
        // A chunk file may be renamed into place while we list: count what we can see.
        total += std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
    }
    Ok(total)
}

#[test]
fn coordinator_killed_during_backup_leaves_a_failed_snapshot_and_next_backup_succeeds(
) -> anyhow::Result<()> {
    let mut coordinator = Coordinator::start()?;
    let agent = coordinator.agent("chat-01")?;
    let work = scratch("crash")?;
    let script = work.path().join("slow_stream.py");
    std::fs::write(&script, SLOW_STREAM)?;
    let script = shell_quote(&script.to_string_lossy());
    agent.add_command_source(&CommandSource {
        name: "slow".into(),
        backup_command: format!("python3 {script} 0.01"),
        ..CommandSource::default()
    })?;

    // Kill points: as soon as data is stored, then 32 MiB further into the stream.
    let mut failed = Vec::new();
    for (cycle, grow_by) in [(1, 1), (2, 32 * MIB)] {
        let base = stored_bytes(&coordinator)?;
        let (mut backup, _stdout) = agent.spawn_backup("slow")?;
        let running = coordinator.wait_snapshot(Duration::from_secs(60), |s| {
            s["source"] == "slow" && (s["status"] == "running" || s["status"] == "pending")
        })?;
        let id = str_field(&running, "id")?.to_owned();
        wait_until("chunks to be stored", Duration::from_secs(120), || {
            Ok(stored_bytes(&coordinator)? >= base + grow_by)
        })?;

        coordinator.restart()?;
        // The agent's backup cannot complete this snapshot: wait for it to give up (or to
        // finish a new one) before looking at the catalog.
        let status = backup.wait_timeout(Duration::from_secs(180))?;
        anyhow::ensure!(
            status.is_some(),
            "cycle {cycle}: agent backup still running"
        );

        let list = coordinator.snapshots_json(&[])?;
        let snap = find_snapshot(&list, &id)?;
        assert_eq!(snap["status"], "failed", "cycle {cycle}: {snap}");
        assert!(
            snap["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "cycle {cycle}: a failed snapshot needs a reason: {snap}"
        );
        assert!(
            list.iter().all(|s| s["status"] != "running"),
            "cycle {cycle}: snapshots left running after restart: {list:?}"
        );
        failed.push(id);
    }

    let report = agent.backup_json("slow")?;
    let id = snapshot_id(&report)?;
    let (expected_hash, expected_len) = hash_command_output(&format!("python3 {script} 0"))?;
    assert_eq!(expected_len, 400 * MIB);
    let list = coordinator.snapshots_json(&[])?;
    let snap = find_snapshot(&list, &id)?;
    assert_eq!(snap["status"], "completed", "{snap}");
    assert_eq!(snap["checksum"], expected_hash.as_str(), "{snap}");

    let listed_failed = coordinator.snapshots_json(&["--status", "failed"])?;
    for id in &failed {
        find_snapshot(&listed_failed, id)?;
    }
    assert!(
        listed_failed.iter().all(|s| s["status"] == "failed"),
        "--status failed lists others: {listed_failed:?}"
    );
    Ok(())
}
