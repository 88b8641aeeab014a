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
