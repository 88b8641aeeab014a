//! MongoDB sources: `mongodump --archive` backed up, restored under another database name and
//! replaced with `--drop`. MongoDB has no Debian package: the scenario is `#[ignore]`d, so the
//! runner reports it as skipped; `cargo nextest run --run-ignored all` runs it where the tools
//! are on PATH, and it fails naming any that is missing.

use std::process::Command;
use std::time::Duration;

use fleetvault_tests::report::snapshot_id;
use fleetvault_tests::{scratch, Coordinator, Proc};

pub(crate) fn installed(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

pub(crate) fn mongosh(uri: &str, js: &str) -> anyhow::Result<String> {
    let out = Command::new("mongosh")
        .args(["--quiet", uri, "--eval", js])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A `mongod` on a free port with its data under `dir`, answering pings; and its URI.
pub(crate) fn start_mongod(dir: &std::path::Path) -> anyhow::Result<(Proc, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let data = dir.join("mongo-data");
    std::fs::create_dir(&data)?;
    let mongod = Proc::spawn(
        Command::new("mongod").arg("--dbpath").arg(&data).args([
            "--bind_ip",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ]),
        "mongod",
        &dir.join("mongod.log"),
        &dir.join("mongod.stdout"),
    )?;
    let uri = format!("mongodb://127.0.0.1:{port}");
    fleetvault_tests::wait_until("mongod", Duration::from_secs(60), || {
        Ok(mongosh(&uri, "db.runCommand({ping: 1}).ok").is_ok())
    })?;
    Ok((mongod, uri))
}

/// Fails, naming them, when a MongoDB tool is missing: an ignored test that is asked to run
/// must run, not pass without checking anything.
pub(crate) fn require_mongo_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = ["mongod", "mongodump", "mongorestore", "mongosh"]
        .into_iter()
        .filter(|t| !installed(t))
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "this test needs {} on PATH (MongoDB has no Debian package)",
        missing.join(", ")
    );
    Ok(())
}

#[test]
#[ignore = "needs mongod, mongodump, mongorestore and mongosh on PATH (no Debian package)"]
fn mongodb_database_restores_under_a_new_name() -> anyhow::Result<()> {
    require_mongo_tools()?;
    let work = scratch("mongo")?;
    let (mongod, uri) = start_mongod(work.path())?;
    mongosh(
        &format!("{uri}/chat"),
        "for (let i = 0; i < 1000; i++) db.messages.insertOne({i, text: 'héllo ' + i})",
    )?;

    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("rocket-01")?;
    agent.append_config(&format!(
        "\n[[sources]]\nname = \"chat\"\nkind = \"mongodb\"\nuri = \"{uri}\"\ndatabase = \"chat\"\n"
    ))?;
    let id = snapshot_id(&agent.backup_json("chat")?)?;
    agent
        .cli("restore", &[&id, "--database", "chat_copy"])?
        .ensure_success()?;
    let count = mongosh(&format!("{uri}/chat_copy"), "db.messages.countDocuments()")?;
    assert_eq!(count, "1000");
    mongosh(
        &format!("{uri}/chat"),
        "db.messages.deleteMany({i: {$gte: 500}})",
    )?;
    agent
        .cli("restore", &[&id, "--replace"])?
        .ensure_success()?;
    assert_eq!(
        mongosh(&format!("{uri}/chat"), "db.messages.countDocuments()")?,
        "1000"
    );
    drop(mongod);
    Ok(())
}
