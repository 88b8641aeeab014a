//! MariaDB (and MySQL) sources against real servers: backed up, changed and backed up again,
//! restored under a new name, rolled back with a safety snapshot, restored onto another
//! server; and a MySQL snapshot refused by a PostgreSQL source, which stays untouched.

use fleetvault_tests::databases::{MariaDb, Postgres};
use fleetvault_tests::report::{find_snapshot, snapshot_id, u64_field};
use fleetvault_tests::Coordinator;

pub(crate) const DAY_ONE: &str = r"
CREATE TABLE users (id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(100) NOT NULL UNIQUE) CHARACTER SET utf8mb4;
CREATE TABLE posts (
    id BIGINT AUTO_INCREMENT PRIMARY KEY,
    user_id INT NOT NULL,
    body TEXT NOT NULL,
    created DATETIME NOT NULL,
    INDEX posts_user (user_id),
    FOREIGN KEY (user_id) REFERENCES users(id)
) CHARACTER SET utf8mb4;
CREATE TABLE status (user_id INT, state VARCHAR(20)) CHARACTER SET utf8mb4;
CREATE VIEW recent AS SELECT id, body FROM posts WHERE id > 1000;
CREATE FUNCTION shout(s TEXT) RETURNS TEXT DETERMINISTIC RETURN UPPER(s);
INSERT INTO users (name) SELECT CONCAT('user-', seq, '-ünï') FROM seq_1_to_300;
INSERT INTO posts (user_id, body, created)
  SELECT 1 + seq % 300, CONCAT('post ', seq, ' héllo 日本語 ', REPEAT('chat text ', 1 + seq % 7)),
         '2026-02-01' + INTERVAL seq MINUTE
  FROM seq_1_to_8000;
INSERT INTO status SELECT id, 'online' FROM users;
";

const DAY_TWO: &str = r"
INSERT INTO posts (user_id, body, created)
  SELECT 1 + seq % 300, CONCAT('day two ', seq), '2026-02-09' + INTERVAL seq MINUTE FROM seq_1_to_80;
UPDATE posts SET body = CONCAT(body, ' (edited)') WHERE id BETWEEN 7950 AND 7990;
DELETE FROM posts WHERE id BETWEEN 7991 AND 8000;
UPDATE status SET state = 'away';
";

#[test]
fn mariadb_database_restores_under_a_new_name_rolls_back_and_moves_servers() -> anyhow::Result<()> {
    let db_a = MariaDb::start("a")?;
    let db_b = MariaDb::start("b")?;
    let coordinator = Coordinator::start()?;
    let host_a = coordinator.agent("shop-a")?;
    let host_b = coordinator.agent("shop-b")?;
    db_a.sql(None, "CREATE DATABASE shop")?;
    db_b.sql(None, "CREATE DATABASE shop")?;
    db_a.sql(Some("shop"), DAY_ONE)?;
    host_a.append_config(&db_a.source_toml("shop", "shop"))?;
    host_b.append_config(&db_b.source_toml("shop", "shop"))?;

    let day1 = db_a.content("shop")?;
    let id1 = snapshot_id(&host_a.backup_json("shop")?)?;
    db_a.sql(Some("shop"), DAY_TWO)?;
    let day2 = db_a.content("shop")?;
    assert_ne!(day1, day2);
    let second = host_a.backup_json("shop")?;
    let id2 = snapshot_id(&second)?;
    let (read, uploaded) = (
        u64_field(&second, "bytes_read")?,
        u64_field(&second, "bytes_uploaded")?,
    );
    eprintln!("mariadb: day 2 read {read} bytes, uploaded {uploaded}");
    assert!(
        uploaded * 3 < read,
        "a day uploaded {uploaded} of {read} bytes: {second}"
    );
    let rec = find_snapshot(&coordinator.snapshots_json(&[])?, &id2)?.clone();
    assert_eq!(rec["db_type"], "mysql", "{rec}");
    assert!(
        rec["db_version"]
            .as_str()
            .is_some_and(|v| v.contains("MariaDB")),
        "{rec}"
    );

    host_a
        .cli("restore", &[&id2, "--database", "shop_copy"])?
        .ensure_success()?;
    assert_eq!(db_a.content("shop_copy")?, day2, "restored copy differs");

    let refused = host_a.cli("restore", &[&id1])?.ensure_failure()?;
    assert!(refused.contains("--replace"), "{refused}");
    let rollback = host_a
        .cli("restore", &[&id1, "--replace", "--json"])?
        .ensure_success()?
        .json()?;
    assert!(rollback["safety_snapshot_id"].is_string(), "{rollback}");
    assert_eq!(
        db_a.content("shop")?,
        day1,
        "rollback did not bring day one back"
    );

    let _link_b = host_b.run()?;
    coordinator.wait_agent_connected("shop-b", std::time::Duration::from_secs(60))?;
    coordinator
        .cli(&["restore", &id2, "--agent", "shop-b", "--source", "shop"])?
        .ensure_success()?;
    assert_eq!(db_b.content("shop")?, day2, "cross-server restore differs");
    Ok(())
}

#[test]
fn mysql_snapshot_is_refused_by_a_postgres_source_and_nothing_is_touched() -> anyhow::Result<()> {
    let maria = MariaDb::start("x")?;
    let pg = Postgres::start("x")?;
    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("mixed")?;
    maria.sql(None, "CREATE DATABASE app")?;
    maria.sql(
        Some("app"),
        "CREATE TABLE t (id INT PRIMARY KEY); INSERT INTO t VALUES (1), (2)",
    )?;
    pg.sql("postgres", "CREATE DATABASE app")?;
    pg.sql(
        "app",
        "CREATE TABLE kept (id int PRIMARY KEY); INSERT INTO kept VALUES (7)",
    )?;
    agent.append_config(&maria.source_toml("maria", "app"))?;
    agent.append_config(&pg.source_toml("pg", "app", "tables"))?;
    let id = snapshot_id(&agent.backup_json("maria")?)?;
    let before = pg.content("app")?;
    for args in [
        vec![id.as_str(), "--source", "pg"],
        vec![id.as_str(), "--source", "pg", "--replace"],
    ] {
        let stderr = agent.cli("restore", &args)?.ensure_failure()?;
        assert!(stderr.contains("across kinds is refused"), "{stderr}");
    }
    assert_eq!(
        pg.content("app")?,
        before,
        "the PostgreSQL target was touched"
    );
    let snapshots = coordinator.snapshots_json(&["--source", "pg"])?;
    assert!(
        snapshots.is_empty(),
        "a safety snapshot was taken: {snapshots:?}"
    );
    Ok(())
}
