//! The coordinator's disk fills up during a backup: that backup fails with a one-line error
//! naming the problem, is listed `failed`, and what was stored before is intact and restores.

use fleetvault_tests::data::{hash_file, write_random_file, MIB};
use fleetvault_tests::report::{find_snapshot, snapshot_id};
use fleetvault_tests::{scratch, shell_quote, CommandSource, Coordinator};

#[test]
fn full_disk_fails_the_backup_cleanly_and_keeps_earlier_snapshots() -> anyhow::Result<()> {
    let mut coordinator = Coordinator::init_on_small_disk(64)?;
    coordinator.serve()?;
    let agent = coordinator.agent("db-01")?;
    let work = scratch("full-disk")?;
    let small = work.path().join("small.bin");
    write_random_file(&small, 8 * MIB, 11)?;
    agent.add_command_source(&CommandSource {
        name: "small".into(),
        backup_command: format!("cat {}", shell_quote(&small.to_string_lossy())),
        ..CommandSource::default()
    })?;
    agent.add_command_source(&CommandSource {
        name: "huge".into(),
        backup_command: format!("head -c {} /dev/urandom", 160 * MIB),
        ..CommandSource::default()
    })?;
    let kept = snapshot_id(&agent.backup_json("small")?)?;

    let stderr = agent.backup("huge")?.ensure_failure()?;
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_default();
    assert!(
        error.contains("No space left on device"),
        "the error should name the full disk: {stderr}"
    );
    eprintln!("full disk: {error}");

    let list = coordinator.snapshots_json(&[])?;
    let huge: Vec<_> = list.iter().filter(|s| s["source"] == "huge").collect();
    assert_eq!(huge.len(), 1, "{list:?}");
    assert_eq!(huge[0]["status"], "failed", "{}", huge[0]);
    assert_eq!(find_snapshot(&list, &kept)?["status"], "completed");

    let restored = work.path().join("restored.bin");
    agent.restore_json(&kept, Some(&restored))?;
    assert_eq!(hash_file(&restored)?, hash_file(&small)?);

    // Nothing half-written is left behind in the store's temporary directory.
    let tmp = coordinator.data_dir().join("store/tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)?.collect();
    assert!(
        left.is_empty(),
        "{} files left in {}",
        left.len(),
        tmp.display()
    );

    // A restart finds the same catalog.
    coordinator.restart()?;
    let after = coordinator.snapshots_json(&[])?;
    assert_eq!(find_snapshot(&after, &kept)?["status"], "completed");
    Ok(())
}
