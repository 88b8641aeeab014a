//! Garbage collection is safe while backups run (docs/architecture.md rule 9): collections run in a loop
//! while the same data is deleted and backed up again (every chunk a dedup hit of a snapshot
//! that was just deleted) and fresh data arrives; afterwards every completed snapshot restores
//! to its checksum. A coordinator killed in the middle of a collection loses nothing either.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleetvault_tests::data::{hash_file, write_random_file, MIB};
use fleetvault_tests::report::{snapshot_id, str_field};
use fleetvault_tests::{
    bin, run, scratch, shell_quote, Agent, CommandSource, Coordinator, COMMAND_TIMEOUT,
};

fn coordinator_with_gc_age_zero() -> anyhow::Result<Coordinator> {
    let mut c = Coordinator::init()?;
    let config = c.data_dir().join("coordinator.toml");
    let mut text = std::fs::read_to_string(&config)?;
    text.push_str("gc_min_age_secs = 0\n");
    std::fs::write(&config, text)?;
    c.serve()?;
    Ok(c)
}

/// Restores every completed snapshot and compares it with its recorded checksum.
fn every_snapshot_restores(
    c: &Coordinator,
    agent: &Agent,
    work: &std::path::Path,
) -> anyhow::Result<usize> {
    let list = c.snapshots_json(&["--status", "completed"])?;
    for s in &list {
        let id = str_field(s, "id")?;
        let out = work.join(format!("check-{id}.bin"));
        agent.restore_to_stdout(id, &out)?.ensure_success()?;
        assert_eq!(
            hash_file(&out)?,
            str_field(s, "checksum")?,
            "snapshot {id} differs"
        );
        std::fs::remove_file(&out)?;
    }
    Ok(list.len())
}

fn sources(agent: &Agent, fixed: &std::path::Path) -> anyhow::Result<()> {
    agent.add_command_source(&CommandSource {
        name: "fixed".into(),
        backup_command: format!("cat {}", shell_quote(&fixed.to_string_lossy())),
        ..CommandSource::default()
    })?;
    agent.add_command_source(&CommandSource {
        name: "fresh".into(),
        backup_command: format!("head -c {} /dev/urandom", 2 * MIB),
        ..CommandSource::default()
    })
}

#[test]
fn gc_in_a_loop_never_breaks_running_backups_or_dedup_hits() -> anyhow::Result<()> {
    let coordinator = coordinator_with_gc_age_zero()?;
    let agent = coordinator.agent("db-01")?;
    let work = scratch("gc")?;
    let fixed = work.path().join("fixed.bin");
    write_random_file(&fixed, 8 * MIB, 99)?;
    sources(&agent, &fixed)?;

    let stop = Arc::new(AtomicBool::new(false));
    let (data_dir, stop2) = (coordinator.data_dir().to_path_buf(), stop.clone());
    let collector = std::thread::spawn(move || -> anyhow::Result<u64> {
        let mut freed = 0;
        while !stop2.load(Ordering::Relaxed) {
            let r = run(
                std::process::Command::new(bin("fleetvault-coordinator")?)
                    .args(["gc", "--json", "--data-dir"])
                    .arg(&data_dir),
                COMMAND_TIMEOUT,
            )?
            .ensure_success()?
            .json()?;
            freed += r["deleted_chunks"].as_u64().unwrap_or(0);
        }
        Ok(freed)
    });
    for _ in 0..6 {
        let id = snapshot_id(&agent.backup_json("fixed")?)?;
        // Its chunks become garbage; the next backup of the same data dedups against them.
        coordinator.cli(&["delete", &id])?.ensure_success()?;
        agent.backup_json("fixed")?;
        agent.backup_json("fresh")?;
    }
    stop.store(true, Ordering::Relaxed);
    let freed_in_loop = collector.join().expect("gc thread")?;
    eprintln!("collections during the backups deleted {freed_in_loop} chunks");
    // Whether the loop freed anything depends on timing (a deleted snapshot's chunks are
    // referenced again by the next backup of the same data); one more deletion and a final
    // collection must.
    let fresh = coordinator.snapshots_json(&["--source", "fresh"])?;
    coordinator
        .cli(&["delete", str_field(&fresh[0], "id")?])?
        .ensure_success()?;
    let r = coordinator
        .cli(&["gc", "--json"])?
        .ensure_success()?
        .json()?;
    assert!(r["deleted_chunks"].as_u64().unwrap_or(0) > 0, "{r}");
    let n = every_snapshot_restores(&coordinator, &agent, work.path())?;
    assert_eq!(n, 11);
    Ok(())
}

#[test]
fn coordinator_killed_during_gc_loses_nothing() -> anyhow::Result<()> {
    let mut coordinator = coordinator_with_gc_age_zero()?;
    let agent = coordinator.agent("db-01")?;
    let work = scratch("gc-kill")?;
    let fixed = work.path().join("fixed.bin");
    write_random_file(&fixed, 4 * MIB, 7)?;
    sources(&agent, &fixed)?;
    let mut garbage = Vec::new();
    for _ in 0..4 {
        garbage.push(snapshot_id(&agent.backup_json("fresh")?)?);
    }
    agent.backup_json("fixed")?;
    agent.backup_json("fresh")?;
    for id in &garbage {
        coordinator.cli(&["delete", id])?.ensure_success()?;
    }
    let before = coordinator.chunk_files()?.len();
    // A collection that dies after two deletions (test-only fault switch), as a crash would.
    coordinator.stop()?;
    std::env::set_var("FLEETVAULT_FAULT_GC_ABORT_AFTER", "2");
    let served = coordinator.serve();
    std::env::remove_var("FLEETVAULT_FAULT_GC_ABORT_AFTER");
    served?;
    let data_dir = coordinator.data_dir().to_path_buf();
    let gc = std::thread::spawn(move || {
        run(
            std::process::Command::new(bin("fleetvault-coordinator")?)
                .args(["gc", "--data-dir"])
                .arg(&data_dir),
            COMMAND_TIMEOUT,
        )
    });
    let serve = coordinator.serve_process().expect("was serving");
    serve.wait_for_line("fault switch", Duration::from_secs(30))?;
    let _ = coordinator.kill9();
    let middle = coordinator.chunk_files()?.len();
    assert!(middle < before, "nothing was deleted before the crash");
    coordinator.serve()?;
    let out = gc.join().expect("gc thread")?;
    assert!(
        !out.success(),
        "the faulty collection should have died: {out}"
    );
    let r = coordinator
        .cli(&["gc", "--json"])?
        .ensure_success()?
        .json()?;
    assert!(r["deleted_chunks"].as_u64().unwrap_or(0) > 0, "{r}");
    assert_eq!(
        every_snapshot_restores(&coordinator, &agent, work.path())?,
        2
    );
    Ok(())
}
