//! Jobs pushed by the coordinator to running agents: a backup on one agent, its restore on
//! another (cross-server restore), and agents that reconnect by themselves after the
//! coordinator restarts.

use std::time::Duration;

use fleetvault_tests::report::{find_snapshot, snapshot_id};
use fleetvault_tests::tree::{build_odd_tree, ensure_same, restored_path, scan, ODD_TREE_EXCLUDE};
use fleetvault_tests::{scratch, Coordinator};

#[test]
fn pushed_backup_restores_on_another_agent_and_links_survive_a_coordinator_restart(
) -> anyhow::Result<()> {
    let mut coordinator = Coordinator::start()?;
    let a = coordinator.agent("chat-a")?;
    let b = coordinator.agent("chat-b")?;
    let work = scratch("push")?;
    let tree_a = work.path().join("a/data");
    let tree_b = work.path().join("b/data");
    let stats = build_odd_tree(&tree_a, 11)?;
    build_odd_tree(&tree_b, 12)?;
    a.add_files_source("files", &[&tree_a], &[ODD_TREE_EXCLUDE])?;
    b.add_files_source("files", &[&tree_b], &[ODD_TREE_EXCLUDE])?;
    let mut expected = scan(&tree_a)?;
    for rel in &stats.excluded {
        expected.remove(rel.as_os_str().as_encoded_bytes());
    }

    let _run_a = a.run()?;
    let _run_b = b.run()?;
    coordinator.wait_agent_connected("chat-a", Duration::from_secs(60))?;
    coordinator.wait_agent_connected("chat-b", Duration::from_secs(60))?;
    let agents = coordinator.agents_json()?;
    let listed_a = agents.iter().find(|x| x["name"] == "chat-a");
    assert!(
        listed_a.is_some_and(|x| x["sources"].as_array().is_some_and(|s| s
            .iter()
            .any(|s| s["name"] == "files" && s["kind"] == "files"))),
        "chat-a should report its files source: {agents:?}"
    );

    let report = coordinator.push_backup("chat-a", "files")?;
    assert_eq!(report["status"], "completed", "{report}");
    let id = snapshot_id(&report)?;
    let snap = coordinator.snapshots_json(&["--agent", "chat-a"])?;
    assert_eq!(find_snapshot(&snap, &id)?["status"], "completed");

    // chat-a's tree, restored on chat-b.
    let target = work.path().join("restored-on-b");
    coordinator.push_restore(&id, "chat-b", Some(&target.to_string_lossy()))?;
    ensure_same(&expected, &scan(&restored_path(&target, &tree_a))?)?;

    // Crash and restart the coordinator: chat-b's link comes back by itself.
    coordinator.restart()?;
    coordinator.wait_agent_connected("chat-b", Duration::from_secs(60))?;
    let report = coordinator.push_backup("chat-b", "files")?;
    assert_eq!(report["status"], "completed", "{report}");
    let id_b = snapshot_id(&report)?;
    let snap = coordinator.snapshots_json(&["--agent", "chat-b", "--source", "files"])?;
    assert_eq!(find_snapshot(&snap, &id_b)?["status"], "completed");
    Ok(())
}
