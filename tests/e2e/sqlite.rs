//! SQLite sources: a database that another process keeps writing to is backed up consistently
//! (every transaction wholly in or out), restored under a new path, and replaced in place.

use std::process::{Command, Stdio};

use fleetvault_tests::report::snapshot_id;
use fleetvault_tests::{scratch, Coordinator};

/// Creates the database, then commits transactions of two rows each until killed.
const WRITER: &str = r#"
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE IF NOT EXISTS events (batch INTEGER, part INTEGER, payload TEXT)")
db.execute("BEGIN")
for b in range(2000):
    db.execute("INSERT INTO events VALUES (?, 0, ?)", (b, "x" * 200))
    db.execute("INSERT INTO events VALUES (?, 1, ?)", (b, "y" * 200))
db.execute("COMMIT")
print("ready", flush=True)
b = 2000
while True:
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO events VALUES (?, 0, ?)", (b, "x" * 200))
    db.execute("INSERT INTO events VALUES (?, 1, ?)", (b, "y" * 200))
    db.execute("COMMIT")
    b += 1
    time.sleep(0.001)
"#;

fn query(db: &std::path::Path, sql: &str) -> anyhow::Result<String> {
    let out = Command::new("sqlite3").arg(db).arg(sql).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[test]
fn sqlite_database_being_written_is_backed_up_consistently() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("app-01")?;
    let work = scratch("sqlite")?;
    let db = work.path().join("app.db");
    let mut writer = Command::new("python3")
        .arg("-c")
        .arg(WRITER)
        .arg(&db)
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(writer.stdout.take().expect("piped")),
        &mut line,
    )?;
    anyhow::ensure!(line.trim() == "ready", "writer did not start: {line:?}");
    agent.append_config(&format!(
        "\n[[sources]]\nname = \"app\"\nkind = \"sqlite\"\npath = \"{}\"\n",
        db.display()
    ))?;
    let first = agent.backup_json("app");
    let second = agent.backup_json("app");
    let _ = writer.kill();
    let _ = writer.wait();
    let (first, second) = (first?, second?);

    for (n, report) in [(1, &first), (2, &second)] {
        let copy = work.path().join(format!("restored-{n}.db"));
        let id = snapshot_id(report)?;
        agent
            .cli("restore", &[&id, "--database", &copy.to_string_lossy()])?
            .ensure_success()?;
        assert_eq!(query(&copy, "PRAGMA integrity_check")?, "ok");
        let torn = query(
            &copy,
            "SELECT count(*) FROM (SELECT batch FROM events GROUP BY batch HAVING count(*) <> 2)",
        )?;
        assert_eq!(torn, "0", "snapshot {n} holds half a transaction");
        let rows: u64 = query(&copy, "SELECT count(*) FROM events")?.parse()?;
        assert!(rows >= 4000, "snapshot {n} lost committed rows: {rows}");
    }

    // Replacing the live file needs --replace; the original is swapped whole.
    let id1 = snapshot_id(&first)?;
    let refused = agent.cli("restore", &[&id1])?.ensure_failure()?;
    assert!(refused.contains("--replace"), "{refused}");
    agent
        .cli("restore", &[&id1, "--replace"])?
        .ensure_success()?;
    let copy1 = work.path().join("restored-1.db");
    assert_eq!(
        query(&db, "SELECT count(*), max(batch) FROM events")?,
        query(&copy1, "SELECT count(*), max(batch) FROM events")?
    );
    Ok(())
}
