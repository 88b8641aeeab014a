//! Restoring what a compromised host backed up: its dumps are real snapshots whose content is
//! hostile (made by a doctored dump tool on that host's PATH). Restoring them must never run
//! a command on the restoring host (psql `\!`, mariadb `system`, sqlite3 `.shell`), nor
//! merge into or drop a database that holds data without `--replace`; database names are only
//! names (never connection strings), up to PostgreSQL's 63 bytes, and a MySQL password cannot
//! inject client options.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fleetvault_tests::databases::{MariaDb, Postgres, DB_PASSWORD};
use fleetvault_tests::report::snapshot_id;
use fleetvault_tests::{bin, run, scratch, Agent, Output, COMMAND_TIMEOUT};

/// A directory of stand-in tools: `(name, shell script)`, executable.
fn tools(dir: &Path, scripts: &[(&str, String)]) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let bin_dir = dir.join("bin");
    std::fs::create_dir_all(&bin_dir)?;
    for (name, script) in scripts {
        let p = bin_dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{script}"))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(bin_dir)
}

/// A stand-in for `tool` that prints `dump` instead of dumping, and runs the real tool for
/// `--version` and `--help` (the stand-in's directory is first on PATH: dropping it finds
/// the real one).
fn doctored_dump_tool(tool: &str, dump: &Path) -> String {
    format!(
        "for a in \"$@\"; do case \"$a\" in --version|--help) PATH=\"${{PATH#*:}}\" exec {tool} \"$@\";; esac; done\ncat '{}'\n",
        dump.display()
    )
}

/// `fleetvault-agent SUB --config … ARGS` with `tools` first on PATH.
fn agent_with_tools(
    agent: &Agent,
    tools: &Path,
    sub: &str,
    args: &[&str],
) -> anyhow::Result<Output> {
    let path = format!(
        "{}:{}",
        tools.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    run(
        Command::new(bin("fleetvault-agent")?)
            .arg(sub)
            .arg("--config")
            .arg(agent.config())
            .args(args)
            .env("PATH", path),
        COMMAND_TIMEOUT,
    )
}

/// Backs up `source` with `tools` first on PATH; the snapshot id.
fn hostile_backup(agent: &Agent, tools: &Path, source: &str) -> anyhow::Result<String> {
    let out = agent_with_tools(agent, tools, "backup", &["--source", source, "--json"])?
        .ensure_success()?;
    snapshot_id(&out.json()?)
}

fn assert_no_marker(markers: &[&Path]) {
    for m in markers {
        assert!(
            !m.exists(),
            "a restore ran a command from the dump: {} exists",
            m.display()
        );
    }
}

#[test]
fn hostile_postgres_dumps_cannot_run_commands_on_the_restoring_host() -> anyhow::Result<()> {
    let work = scratch("hostile-pg")?;
    let (m1, m2) = (work.path().join("marker-1"), work.path().join("marker-2"));
    let dump = work.path().join("dump.sql");
    // Its own \restrict key, left at once; a command on a line of its own and after SQL.
    std::fs::write(
        &dump,
        format!(
            "--\n-- PostgreSQL database dump\n--\n\n\\restrict evilkey\n\nCREATE TABLE stolen (a int);\n\\unrestrict evilkey\n\\! touch {}\nSELECT 1; \\! touch {}\n\n\\unrestrict evilkey\n",
            m1.display(),
            m2.display()
        ),
    )?;
    let fake = tools(
        work.path(),
        &[("pg_dump", doctored_dump_tool("pg_dump", &dump))],
    )?;
    let pg = Postgres::start("hostile")?;
    pg.sql("postgres", "CREATE DATABASE evil")?;
    let coordinator = fleetvault_tests::Coordinator::start()?;
    let evil = coordinator.agent("evil-01")?;
    let victim = coordinator.agent("victim-01")?;
    evil.append_config(&pg.source_toml("plain", "evil", "plain"))?;
    evil.append_config(&pg.source_toml("tables", "evil", "tables"))?;
    victim.append_config(&pg.source_toml("app", "app", "plain"))?;
    victim.append_config(&pg.source_toml("app-tables", "app_tables", "tables"))?;
    let plain = hostile_backup(&evil, &fake, "plain")?;
    let tables = hostile_backup(&evil, &fake, "tables")?;

    // Pushed to another host, as an operator moving a database between servers would.
    let _link = victim.run()?;
    coordinator.wait_agent_connected("victim-01", Duration::from_secs(60))?;
    for (id, source, db) in [
        (&plain, "app", "app"),
        (&tables, "app-tables", "app_tables"),
    ] {
        let out = coordinator.cli(&["restore", id, "--agent", "victim-01", "--source", source])?;
        let stderr = out.ensure_failure()?;
        assert_no_marker(&[&m1, &m2]);
        assert!(
            stderr.contains("restricted"),
            "{source}: the refusal does not say why: {stderr}"
        );
        assert_eq!(
            pg.sql(
                "postgres",
                &format!("SELECT count(*) FROM pg_database WHERE datname = '{db}'")
            )?,
            "0",
            "{source}: the failed restore left its database"
        );
    }
    Ok(())
}

#[test]
fn hostile_mariadb_dump_cannot_run_commands_nor_drop_a_database_without_replace(
) -> anyhow::Result<()> {
    let work = scratch("hostile-maria")?;
    let (m1, m2) = (work.path().join("marker-1"), work.path().join("marker-2"));
    let dump = work.path().join("dump.sql");
    std::fs::write(
        &dump,
        format!(
            "CREATE TABLE stolen (a int);\nsystem touch {}\n\\! touch {}\nTHIS IS NOT SQL;\n",
            m1.display(),
            m2.display()
        ),
    )?;
    let fake = tools(
        work.path(),
        &[("mariadb-dump", doctored_dump_tool("mariadb-dump", &dump))],
    )?;
    let db = MariaDb::start("hostile")?;
    db.sql(None, "CREATE DATABASE evil")?;
    // A database that holds only an event: not empty.
    db.sql(None, "CREATE DATABASE shop")?;
    db.sql(
        Some("shop"),
        "CREATE EVENT nightly ON SCHEDULE EVERY 1 DAY DO SELECT 1",
    )?;
    let coordinator = fleetvault_tests::Coordinator::start()?;
    let agent = coordinator.agent("maria-01")?;
    agent.append_config(&db.source_toml("evil", "evil"))?;
    let id = hostile_backup(&agent, &fake, "evil")?;

    let refused = agent
        .cli("restore", &[&id, "--database", "shop"])?
        .ensure_failure()?;
    assert!(refused.contains("--replace"), "{refused}");
    assert_no_marker(&[&m1, &m2]);
    assert_eq!(
        db.sql(
            None,
            "SELECT EVENT_NAME FROM information_schema.EVENTS WHERE EVENT_SCHEMA = 'shop'"
        )?,
        "nightly",
        "a restore without --replace touched database shop"
    );

    let stderr = agent
        .cli("restore", &[&id, "--database", "fresh"])?
        .ensure_failure()?;
    assert_no_marker(&[&m1, &m2]);
    assert!(stderr.contains("sandbox"), "{stderr}");
    assert_eq!(
        db.sql(
            None,
            "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = 'fresh'"
        )?,
        "0"
    );
    Ok(())
}

#[test]
fn hostile_sqlite_dump_cannot_run_commands_on_the_restoring_host() -> anyhow::Result<()> {
    let work = scratch("hostile-sqlite")?;
    let (m1, m2) = (work.path().join("marker-1"), work.path().join("marker-2"));
    let dump = work.path().join("dump.sql");
    std::fs::write(
        &dump,
        format!(
            "BEGIN TRANSACTION;\nCREATE TABLE stolen (a);\n.shell touch {}\n.system touch {}\nCOMMIT;\n",
            m1.display(),
            m2.display()
        ),
    )?;
    let script = format!(
        "last=; for a in \"$@\"; do last=\"$a\"; done\nif [ \"$last\" = .dump ]; then cat '{}'; exit 0; fi\nPATH=\"${{PATH#*:}}\" exec sqlite3 \"$@\"\n",
        dump.display()
    );
    let fake = tools(work.path(), &[("sqlite3", script)])?;
    let source_db = work.path().join("evil.db");
    run(
        Command::new("sqlite3")
            .arg(&source_db)
            .arg("CREATE TABLE x (a)"),
        COMMAND_TIMEOUT,
    )?
    .ensure_success()?;
    let coordinator = fleetvault_tests::Coordinator::start()?;
    let agent = coordinator.agent("sqlite-01")?;
    agent.append_config(&format!(
        "\n[[sources]]\nname = \"evil\"\nkind = \"sqlite\"\npath = \"{}\"\n",
        source_db.display()
    ))?;
    let id = hostile_backup(&agent, &fake, "evil")?;
    let target = work.path().join("copy.db");
    let stderr = agent
        .cli("restore", &[&id, "--database", target.to_str().unwrap()])?
        .ensure_failure()?;
    assert_no_marker(&[&m1, &m2]);
    assert!(stderr.contains("safe mode"), "{stderr}");
    assert!(!target.exists(), "the failed restore left {target:?}");
    Ok(())
}

/// A BSON document of string fields.
fn bson(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (k, v) in fields {
        body.push(0x02);
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(&(v.len() as i32 + 1).to_le_bytes());
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    let mut doc = ((body.len() + 5) as i32).to_le_bytes().to_vec();
    doc.extend_from_slice(&body);
    doc.push(0);
    doc
}

/// A mongodump archive whose prelude lists `collections` of database `db`.
fn archive(db: &str, collections: &[&str]) -> Vec<u8> {
    let mut a = vec![0x6d, 0xe2, 0x99, 0x81];
    a.extend(bson(&[("version", "0.1"), ("tool_version", "stand-in")]));
    for c in collections {
        a.extend(bson(&[("db", db), ("collection", c), ("metadata", "{}")]));
    }
    a.extend_from_slice(&[0xff; 4]);
    a
}

#[test]
fn mongodb_restore_without_replace_is_refused_into_a_database_holding_collections(
) -> anyhow::Result<()> {
    // No mongod exists here: stand-ins for mongodump (an archive listing one collection, or
    // none for database "fresh") and mongorestore (records its calls).
    let work = scratch("hostile-mongo")?;
    let (full, empty) = (work.path().join("full"), work.path().join("empty"));
    std::fs::write(&full, archive("chat", &["messages"]))?;
    std::fs::write(&empty, archive("fresh", &[]))?;
    let calls = work.path().join("mongorestore-calls");
    let fake = tools(
        work.path(),
        &[
            (
                "mongodump",
                format!(
                    "case \" $* \" in *\" --version \"*) echo 'mongodump version: stand-in'; exit 0;; esac\nfor a in \"$@\"; do [ \"$a\" = --db=fresh ] && exec cat '{}'; done\nexec cat '{}'\n",
                    empty.display(),
                    full.display()
                ),
            ),
            (
                "mongorestore",
                format!(
                    "case \" $* \" in *\" --version \"*) echo 'mongorestore version: stand-in'; exit 0;; esac\necho \"$*\" >> '{}'\ncat > /dev/null\n",
                    calls.display()
                ),
            ),
        ],
    )?;
    let coordinator = fleetvault_tests::Coordinator::start()?;
    let agent = coordinator.agent("mongo-01")?;
    agent.append_config(
        "\n[[sources]]\nname = \"chat\"\nkind = \"mongodb\"\nuri = \"mongodb://127.0.0.1:1\"\ndatabase = \"chat\"\n",
    )?;
    let id = hostile_backup(&agent, &fake, "chat")?;
    let refused = agent_with_tools(&agent, &fake, "restore", &[&id, "--database", "chat_copy"])?
        .ensure_failure()?;
    assert!(
        refused.contains("not empty") && refused.contains("--replace"),
        "{refused}"
    );
    assert!(
        !calls.exists(),
        "mongorestore ran: {}",
        std::fs::read_to_string(&calls).unwrap_or_default()
    );
    agent_with_tools(&agent, &fake, "restore", &[&id, "--database", "fresh"])?.ensure_success()?;
    let called = std::fs::read_to_string(&calls)?;
    assert!(called.contains("--nsTo=fresh.*"), "{called}");
    Ok(())
}

const ROWS: &str = "CREATE TABLE items (id int PRIMARY KEY, name text);
INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 100) g;";

#[test]
fn postgres_names_of_63_bytes_restore_and_replace() -> anyhow::Result<()> {
    let pg = Postgres::start("long")?;
    let name = format!("{:x<63}", "a_database_with_a_name_at_postgres_limit_");
    let other = format!("{:y<63}", "another_database_at_the_limit_");
    assert_eq!((name.len(), other.len()), (63, 63));
    pg.sql("postgres", &format!("CREATE DATABASE \"{name}\""))?;
    pg.sql(&name, ROWS)?;
    let before = pg.content(&name)?;
    let coordinator = fleetvault_tests::Coordinator::start()?;
    let agent = coordinator.agent("long-01")?;
    agent.append_config(&pg.source_toml("long", &name, "tables"))?;
    let id = snapshot_id(&agent.backup_json("long")?)?;
    pg.sql(&name, "DELETE FROM items WHERE id > 10")?;

    agent
        .cli("restore", &[&id, "--replace"])?
        .ensure_success()?;
    assert_eq!(pg.content(&name)?, before, "the replace did not restore it");
    agent
        .cli("restore", &[&id, "--database", &other])?
        .ensure_success()?;
    assert_eq!(pg.content(&other)?, before);
    assert_eq!(
        pg.sql(
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname LIKE '%\\_\\_fv\\_%'"
        )?,
        "0",
        "temporary databases left behind"
    );
    let too_long = format!("{other}z");
    let refused = agent
        .cli("restore", &[&id, "--database", &too_long])?
        .ensure_failure()?;
    assert!(refused.contains("64 bytes"), "{refused}");
    Ok(())
}

#[test]
fn postgres_database_names_are_never_connection_strings() -> anyhow::Result<()> {
    let pg = Postgres::start("conninfo")?;
    pg.sql("postgres", "CREATE DATABASE shop")?;
    pg.sql("shop", ROWS)?;
    let before = pg.content("shop")?;
    let coordinator = fleetvault_tests::Coordinator::start()?;
    let agent = coordinator.agent("names-01")?;
    agent.append_config(&pg.source_toml("streamed", "shop", "custom"))?;
    agent.append_config("restore_jobs = 1\n")?;
    agent.append_config(&pg.source_toml("parallel", "shop", "custom"))?;
    agent.append_config("restore_jobs = 2\n")?;
    for (source, name) in [
        ("streamed", "dbname=postgres"),
        ("parallel", "dbname=postgres application_name=x"),
    ] {
        let id = snapshot_id(&agent.backup_json(source)?)?;
        agent
            .cli("restore", &[&id, "--database", name])?
            .ensure_success()?;
        // psql -d expands a name as a connection string too: the test names it as one.
        let as_conninfo = format!("dbname='{name}'");
        assert_eq!(
            pg.content(&as_conninfo)?,
            before,
            "{source}: not restored into {name:?}"
        );
        assert_eq!(
            pg.sql(
                "postgres",
                "SELECT count(*) FROM pg_tables WHERE tablename = 'items'"
            )?,
            "0",
            "{source}: {name:?} was read as a connection string: restored into postgres"
        );
    }
    Ok(())
}

#[test]
fn a_line_break_in_a_mysql_password_injects_no_client_option() -> anyhow::Result<()> {
    let db = MariaDb::start("pwinject")?;
    db.sql(None, "CREATE DATABASE shop")?;
    let work = scratch("pwinject")?;
    let pw = work.path().join("pw");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&pw)?;
        write!(
            f,
            "wrong\npassword={DB_PASSWORD}\ninit-command=CREATE DATABASE injected #"
        )?;
    }
    let coordinator = fleetvault_tests::Coordinator::start()?;
    let agent = coordinator.agent("pw-01")?;
    agent.append_config(&format!(
        "\n[[sources]]\nname = \"shop\"\nkind = \"mysql\"\ndatabase = \"shop\"\nhost = \"{}\"\nuser = \"root\"\npassword_file = \"{}\"\n",
        db.socket().display(),
        pw.display()
    ))?;
    let _ = agent.backup("shop")?;
    assert_eq!(
        db.sql(
            None,
            "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = 'injected'"
        )?,
        "0",
        "the password's second line was read as client options"
    );
    let refused = agent.backup("shop")?.ensure_failure()?;
    assert!(refused.contains("Access denied"), "{refused}");
    Ok(())
}
