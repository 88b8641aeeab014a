//! `serve` stops cleanly: SIGTERM and SIGINT end it with exit status 0, with an agent connected,
//! and what was stored before is there after the next start.

use fleetvault_tests::report::{find_snapshot, snapshot_id};
use fleetvault_tests::{CommandSource, Coordinator};

#[test]
fn serve_exits_cleanly_on_sigterm_and_sigint() -> anyhow::Result<()> {
    let mut coordinator = Coordinator::start()?;
    let agent = coordinator.agent("chat-01")?;
    agent.add_command_source(&CommandSource {
        name: "config".into(),
        backup_command: "printf 'SiteURL=https://chat.example.com\\n'".into(),
        ..CommandSource::default()
    })?;
    let id = snapshot_id(&agent.backup_json("config")?)?;
    let _link = agent.run()?;

    let status = coordinator.stop()?;
    assert!(status.success(), "serve exited with {status} on SIGTERM");

    coordinator.serve()?;
    let list = coordinator.snapshots_json(&[])?;
    assert_eq!(find_snapshot(&list, &id)?["status"], "completed");
    let status = coordinator.stop_with("INT")?;
    assert!(status.success(), "serve exited with {status} on SIGINT");
    Ok(())
}

#[test]
fn catalog_rebuilt_from_the_store_lists_the_same_snapshots() -> anyhow::Result<()> {
    use fleetvault_tests::CommandSource;
    let mut coordinator = fleetvault_tests::Coordinator::start()?;
    let agent = coordinator.agent("db-01")?;
    agent.add_command_source(&CommandSource {
        name: "dump".into(),
        backup_command: "head -c 3000000 /dev/urandom".into(),
        ..CommandSource::default()
    })?;
    for _ in 0..3 {
        agent.backup_json("dump")?;
    }
    let ids = |list: Vec<serde_json::Value>| -> Vec<String> {
        let mut v: Vec<String> = list
            .iter()
            .filter(|s| s["status"] == "completed")
            .map(|s| s["id"].as_str().unwrap_or("").to_owned())
            .collect();
        v.sort();
        v
    };
    let before = ids(coordinator.snapshots_json(&[])?);
    // Refused while serving (sled's lock), then done with the coordinator stopped.
    let busy = coordinator.cli(&["rebuild-catalog"])?.ensure_failure()?;
    assert!(busy.contains("stop"), "{busy}");
    coordinator.stop()?;
    coordinator.cli(&["rebuild-catalog"])?.ensure_success()?;
    coordinator.serve()?;
    assert_eq!(ids(coordinator.snapshots_json(&[])?), before);
    // Backups go on against the rebuilt catalog.
    let again = agent.backup_json("dump")?;
    assert!(again["status"] == "completed", "{again}");
    Ok(())
}
