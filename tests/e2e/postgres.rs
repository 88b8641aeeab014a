//! PostgreSQL sources against real servers: a chat database backed up, changed and backed up
//! again (only a small part travels), restored under a new name, rolled back in place with a
//! safety snapshot, and restored onto another server; `plain` and `custom` formats; and the
//! failures an operator meets (wrong password, missing database, missing dump tool).

use fleetvault_tests::databases::Postgres;
use fleetvault_tests::report::{find_snapshot, snapshot_id, u64_field};
use fleetvault_tests::{bin, run, Coordinator, COMMAND_TIMEOUT};

/// Day one of a chat database: users, posts with non-ASCII text, reactions without a primary
/// key (a unique index), a status table without any key, a sequence, a view, a function, a
/// generated column and a large object.
pub(crate) const DAY_ONE: &str = r#"
CREATE TABLE users (id serial PRIMARY KEY, name text NOT NULL UNIQUE, created timestamptz NOT NULL);
CREATE TABLE posts (
    id bigserial PRIMARY KEY,
    user_id int NOT NULL REFERENCES users(id),
    channel text NOT NULL,
    body text NOT NULL,
    body_len int GENERATED ALWAYS AS (length(body)) STORED,
    created timestamptz NOT NULL,
    edited timestamptz
);
CREATE INDEX posts_channel_created ON posts (channel, created);
CREATE TABLE reactions (post_id bigint NOT NULL REFERENCES posts(id), user_id int NOT NULL, emoji text NOT NULL);
CREATE UNIQUE INDEX reactions_unique ON reactions (post_id, user_id, emoji);
CREATE TABLE status (user_id int, state text, seen timestamptz, extra json);
CREATE SEQUENCE invoice_numbers START 1000;
CREATE VIEW recent_posts AS SELECT id, channel, body FROM posts ORDER BY created DESC LIMIT 100;
CREATE FUNCTION post_count(c text) RETURNS bigint LANGUAGE sql AS $$ SELECT count(*) FROM posts WHERE channel = c $$;
INSERT INTO users (name, created)
  SELECT 'user-' || g || '-ünïcödé', timestamptz '2026-01-01' + g * interval '1 minute' FROM generate_series(1, 500) g;
INSERT INTO posts (user_id, channel, body, created)
  SELECT 1 + (g * 7919) % 500, 'channel-' || (g % 40),
         'post ' || g || ': ' || repeat('héllo wörld, 日本語 and more chat text ', 1 + g % 9),
         timestamptz '2026-02-01' + g * interval '13 seconds'
  FROM generate_series(1, 20000) g;
INSERT INTO reactions SELECT p, 1 + (p * 31) % 500, (ARRAY['👍', '🎉', '❤️'])[1 + p % 3] FROM generate_series(1, 20000, 3) p;
INSERT INTO status SELECT id, 'online', timestamptz '2026-03-01', '{"client": "web"}' FROM users;
SELECT nextval('invoice_numbers') FROM generate_series(1, 5);
SELECT lo_from_bytea(424242, convert_to(repeat('attachment bytes ', 1000), 'UTF8'));
"#;

/// One chat day: +1% posts, edits and deletes among the newest, every status touched, VACUUM.
pub(crate) const DAY_TWO: &str = r"
INSERT INTO posts (user_id, channel, body, created)
  SELECT 1 + (g * 104729) % 500, 'channel-' || (g % 40), 'day two post ' || g || ' ✨', timestamptz '2026-02-05' + g * interval '7 seconds'
  FROM generate_series(1, 200) g;
UPDATE posts SET body = body || ' (edited)', edited = timestamptz '2026-02-06' WHERE id BETWEEN 19900 AND 19950;
DELETE FROM reactions WHERE post_id BETWEEN 19960 AND 20000;
DELETE FROM posts WHERE id BETWEEN 19960 AND 19980;
UPDATE status SET state = 'away', seen = timestamptz '2026-03-02';
SELECT nextval('invoice_numbers') FROM generate_series(1, 3);
";

/// Runs a day's SQL, then VACUUM (which `psql -c` cannot run inside the same transaction).
fn load(pg: &Postgres, db: &str, sql: &str) -> anyhow::Result<()> {
    pg.sql(db, sql)?;
    pg.sql(db, "VACUUM").map(|_| ())
}

#[test]
fn postgres_chat_database_restores_under_a_new_name_rolls_back_and_moves_servers(
) -> anyhow::Result<()> {
    let pg_a = Postgres::start("a")?;
    let pg_b = Postgres::start("b")?;
    let coordinator = Coordinator::start()?;
    let host_a = coordinator.agent("chat-a")?;
    let host_b = coordinator.agent("chat-b")?;
    pg_a.sql("postgres", "CREATE DATABASE chat")?;
    pg_b.sql("postgres", "CREATE DATABASE chat")?;
    load(&pg_a, "chat", DAY_ONE)?;
    host_a.append_config(&pg_a.source_toml("chat", "chat", "tables"))?;
    host_b.append_config(&pg_b.source_toml("chat", "chat", "tables"))?;

    let day1 = pg_a.content("chat")?;
    let first = host_a.backup_json("chat")?;
    let id1 = snapshot_id(&first)?;
    load(&pg_a, "chat", DAY_TWO)?;
    let day2 = pg_a.content("chat")?;
    assert_ne!(day1, day2);
    let second = host_a.backup_json("chat")?;
    let id2 = snapshot_id(&second)?;
    let (read, uploaded) = (
        u64_field(&second, "bytes_read")?,
        u64_field(&second, "bytes_uploaded")?,
    );
    eprintln!(
        "postgres tables: day 2 read {read} bytes, uploaded {uploaded} (first uploaded {})",
        u64_field(&first, "bytes_uploaded")?
    );
    assert!(
        uploaded * 5 < read,
        "a chat day uploaded {uploaded} of {read} bytes: {second}"
    );

    let listed = coordinator.snapshots_json(&["--agent", "chat-a"])?;
    let rec = find_snapshot(&listed, &id2)?;
    assert_eq!(rec["db_type"], "postgres", "{rec}");
    assert_eq!(rec["database"], "chat", "{rec}");
    assert!(
        rec["db_version"]
            .as_str()
            .is_some_and(|v| v.starts_with(char::is_numeric)),
        "{rec}"
    );

    // 1. Into another database on the same server.
    host_a
        .cli("restore", &[&id2, "--database", "chat_copy", "--json"])?
        .ensure_success()?;
    assert_eq!(pg_a.content("chat_copy")?, day2, "restored copy differs");

    // The reloaded copy has another physical order; its dump is the same bytes.
    host_a.append_config(&pg_a.source_toml("chat-copy", "chat_copy", "tables"))?;
    let reloaded = host_a.backup_json("chat-copy")?;
    let again = u64_field(&reloaded, "bytes_uploaded")?;
    eprintln!("postgres tables: reloaded copy uploaded {again} bytes");
    assert!(
        again * 100 < u64_field(&first, "bytes_uploaded")?,
        "a reloaded copy uploaded {again} bytes: {reloaded}"
    );

    // A restore over a database that holds data needs --replace, and touches nothing.
    let refused = host_a.cli("restore", &[&id1])?.ensure_failure()?;
    assert!(refused.contains("--replace"), "{refused}");
    assert_eq!(pg_a.content("chat")?, day2);

    // 2. Rollback in place, after a safety snapshot of what is there.
    let rollback = host_a
        .cli("restore", &[&id1, "--replace", "--json"])?
        .ensure_success()?
        .json()?;
    let safety = rollback["safety_snapshot_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(safety.len(), 16, "no safety snapshot: {rollback}");
    assert_eq!(
        pg_a.content("chat")?,
        day1,
        "rollback did not bring day one back"
    );
    assert_eq!(
        pg_a.sql(
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'chat\\_\\_fv%'"
        )?,
        "0",
        "temporary databases left behind"
    );
    host_a
        .cli("restore", &[&safety, "--database", "chat_safety"])?
        .ensure_success()?;
    assert_eq!(
        pg_a.content("chat_safety")?,
        day2,
        "the safety snapshot is not what was replaced"
    );

    // 3. Cross-server: the operator pushes host a's snapshot into host b's source.
    let _link_b = host_b.run()?;
    coordinator.wait_agent_connected("chat-b", std::time::Duration::from_secs(60))?;
    coordinator
        .cli(&[
            "restore", &id2, "--agent", "chat-b", "--source", "chat", "--json",
        ])?
        .ensure_success()?;
    assert_eq!(pg_b.content("chat")?, day2, "cross-server restore differs");
    Ok(())
}

#[test]
fn postgres_plain_and_custom_dumps_round_trip_and_deduplicate() -> anyhow::Result<()> {
    let pg = Postgres::start("formats")?;
    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("db-01")?;
    pg.sql("postgres", "CREATE DATABASE chat")?;
    load(&pg, "chat", DAY_ONE)?;
    for format in ["plain", "custom"] {
        agent.append_config(&pg.source_toml(format, "chat", format))?;
    }
    for format in ["plain", "custom"] {
        agent.backup_json(format)?;
    }
    load(&pg, "chat", DAY_TWO)?;
    let day2 = pg.content("chat")?;
    for format in ["plain", "custom"] {
        let report = agent.backup_json(format)?;
        let (read, uploaded) = (
            u64_field(&report, "bytes_read")?,
            u64_field(&report, "bytes_uploaded")?,
        );
        eprintln!("postgres {format}: day 2 read {read} bytes, uploaded {uploaded}");
        assert!(uploaded < read, "{report}");
        let id = snapshot_id(&report)?;
        let copy = format!("chat_{format}");
        agent
            .cli("restore", &[&id, "--database", &copy])?
            .ensure_success()?;
        assert_eq!(pg.content(&copy)?, day2, "{format} restore differs");
    }
    Ok(())
}

#[test]
fn wrong_password_missing_database_and_missing_tool_fail_clearly() -> anyhow::Result<()> {
    let pg = Postgres::start("errors")?;
    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("db-01")?;
    pg.sql("postgres", "CREATE DATABASE chat")?;
    let wrong_pw = agent.conf_dir().join("wrong.pw");
    std::fs::write(&wrong_pw, "not the password\n")?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrong_pw, std::fs::Permissions::from_mode(0o600))?;
    let good = pg.source_toml("wrong-password", "chat", "tables");
    agent.append_config(&good.replace(
        &pg.password_file().display().to_string(),
        &wrong_pw.display().to_string(),
    ))?;
    agent.append_config(&pg.source_toml("missing-db", "no_such_db", "plain"))?;
    agent.append_config(&pg.source_toml("no-tool", "chat", "plain"))?;

    let cases = [
        ("wrong-password", "password authentication failed"),
        ("missing-db", "does not exist"),
    ];
    for (source, want) in cases {
        let stderr = agent.backup(source)?.ensure_failure()?;
        assert!(stderr.contains(want), "{source}: {want:?} not in {stderr}");
    }
    // The same agent on a host without the PostgreSQL client tools.
    let empty = tempfile::tempdir()?;
    let out = run(
        std::process::Command::new(bin("fleetvault-agent")?)
            .env("PATH", empty.path())
            .args(["backup", "--config"])
            .arg(agent.config())
            .args(["--source", "no-tool"]),
        COMMAND_TIMEOUT,
    )?;
    let stderr = out.ensure_failure()?;
    assert!(stderr.contains("pg_dump is not installed"), "{stderr}");

    let listed = coordinator.snapshots_json(&[])?;
    for source in ["wrong-password", "missing-db", "no-tool"] {
        let s: Vec<_> = listed.iter().filter(|s| s["source"] == source).collect();
        assert_eq!(s.len(), 1, "{source}: {listed:?}");
        assert_eq!(s[0]["status"], "failed", "{}", s[0]);
        assert!(s[0]["reason"].as_str().is_some_and(|r| !r.is_empty()));
    }
    Ok(())
}

#[test]
fn a_replace_that_fails_midway_leaves_the_database_untouched() -> anyhow::Result<()> {
    let pg = Postgres::start("fail")?;
    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("db-01")?;
    pg.sql("postgres", "CREATE DATABASE chat")?;
    load(&pg, "chat", DAY_ONE)?;
    agent.append_config(&pg.source_toml("chat", "chat", "tables"))?;
    let id = snapshot_id(&agent.backup_json("chat")?)?;
    load(&pg, "chat", DAY_TWO)?;
    let now = pg.content("chat")?;

    // Damage the largest chunk (table data) on the coordinator's disk.
    let mut chunks = coordinator.chunk_files()?;
    chunks.sort_by_key(|c| std::fs::metadata(c).map(|m| m.len()).unwrap_or(0));
    let victim = chunks.last().expect("chunks");
    let mut bytes = std::fs::read(victim)?;
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 16] {
        *b = !*b;
    }
    std::fs::write(victim, bytes)?;

    let stderr = agent
        .cli("restore", &[&id, "--replace", "--no-safety-snapshot"])?
        .ensure_failure()?;
    assert!(
        stderr.contains("damaged") && stderr.contains("not touched"),
        "{stderr}"
    );
    assert_eq!(
        pg.content("chat")?,
        now,
        "a failed restore changed the database"
    );
    assert_eq!(
        pg.sql(
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'chat\\_\\_fv%'"
        )?,
        "0",
        "the half-restored copy was left behind"
    );
    Ok(())
}
