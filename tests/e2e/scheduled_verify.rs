//! `verify_schedule` verifies every completed snapshot by itself: a chunk damaged on the
//! coordinator's disk gets its snapshot tagged `damaged` (as the operator's `verify` tags it)
//! without any command, whether the schedule was there at start or added by SIGHUP.

use std::time::Duration;

use fleetvault_tests::data::{write_random_file, MIB};
use fleetvault_tests::report::snapshot_id;
use fleetvault_tests::{
    scratch, shell_quote, wait_until, Agent, CommandSource, Coordinator, Scratch,
};
use serde_json::Value;

/// Every two seconds.
const EVERY_2S: &str = "verify_schedule = \"*/2 * * * * *\"\n";

/// A completed backup of 4 MiB of random data by a new agent; returns its snapshot id.
fn back_up(coordinator: &Coordinator) -> anyhow::Result<(Agent, Scratch, String)> {
    let agent = coordinator.agent("db-01")?;
    let work = scratch("sched-verify")?;
    let data = work.path().join("dump.bin");
    write_random_file(&data, 4 * MIB, 7)?;
    agent.add_command_source(&CommandSource {
        name: "dump".into(),
        backup_command: format!("cat {}", shell_quote(&data.to_string_lossy())),
        ..CommandSource::default()
    })?;
    let id = snapshot_id(&agent.backup_json("dump")?)?;
    Ok((agent, work, id))
}

fn is_damaged(s: &Value) -> bool {
    s["tags"]
        .as_array()
        .is_some_and(|t| t.iter().any(|t| t == "damaged"))
}

/// Waits (no command but `snapshots`) until snapshot `id` is tagged `damaged`, and checks the
/// log says a scheduled verification did it.
fn wait_tagged_by_schedule(coordinator: &Coordinator, id: &str) -> anyhow::Result<()> {
    let s =
        coordinator.wait_snapshot(Duration::from_secs(60), |s| s["id"] == id && is_damaged(s))?;
    let warnings = s["warnings"].to_string();
    assert!(warnings.contains("verify: chunk"), "{s}");
    let serve = coordinator.serve_process().expect("serving");
    wait_until(
        "the scheduled verification's log line",
        Duration::from_secs(20),
        || {
            Ok(serve.log_text().lines().any(|l| {
                l.contains("scheduled verification finished")
                    && l.contains("snapshots=1")
                    && l.contains("damaged=1")
            }))
        },
    )?;
    assert!(
        serve.log_text().contains("scheduled verification starting"),
        "{}",
        serve.log_text()
    );
    Ok(())
}

#[test]
fn a_scheduled_verification_tags_a_damaged_snapshot_without_any_command() -> anyhow::Result<()> {
    let mut coordinator = Coordinator::init()?;
    coordinator.append_config(EVERY_2S)?;
    coordinator.serve()?;
    let (_agent, _work, id) = back_up(&coordinator)?;
    coordinator.damage_largest_chunk()?;
    wait_tagged_by_schedule(&coordinator, &id)
}

#[test]
fn a_verify_schedule_added_by_sighup_runs() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let (_agent, _work, id) = back_up(&coordinator)?;
    coordinator.damage_largest_chunk()?;
    let serve = coordinator.serve_process().expect("serving");
    coordinator.append_config(EVERY_2S)?;
    serve.signal("HUP")?;
    let line = serve.wait_for_line("configuration reloaded", Duration::from_secs(20))?;
    assert!(line.contains("*/2 * * * * *"), "{line}");
    wait_tagged_by_schedule(&coordinator, &id)
}
