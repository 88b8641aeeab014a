//! A PostgreSQL server that accepts TCP connections only over TLS, as managed databases do:
//! a source with `sslmode = "verify-full"` and the server's CA backs up and restores a chat
//! database; `sslmode = "disable"` and `verify-full` with the wrong CA fail with an error that
//! says why.

use std::path::Path;

use fleetvault_tests::databases::Postgres;
use fleetvault_tests::report::snapshot_id;
use fleetvault_tests::Coordinator;

use crate::postgres::DAY_ONE;

/// A `[[sources]]` table connecting over TCP to `localhost` with `sslmode`.
fn tls_source(pg: &Postgres, name: &str, sslmode: &str, root_cert: Option<&Path>) -> String {
    let root = root_cert
        .map(|p| format!("sslrootcert = \"{}\"\n", p.display()))
        .unwrap_or_default();
    format!(
        "\n[[sources]]\nname = \"{name}\"\nkind = \"postgres\"\ndatabase = \"chat\"\nhost = \"localhost\"\nport = {}\nuser = \"postgres\"\npassword_file = \"{}\"\nsslmode = \"{sslmode}\"\n{root}",
        pg.port(),
        pg.password_file().display()
    )
}

#[test]
fn postgres_requiring_tls_round_trips_with_verify_full_and_refuses_the_rest() -> anyhow::Result<()>
{
    let (pg, ca_pem) = Postgres::start_tls_only("tls")?;
    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("db-01")?;
    pg.sql("postgres", "CREATE DATABASE chat")?;
    pg.sql("chat", DAY_ONE)?;
    let db_ca = agent.conf_dir().join("db-ca.pem");
    std::fs::write(&db_ca, ca_pem)?;
    // Another CA than the one that signed the server's certificate: the fleet's own.
    let wrong_ca = agent.conf_dir().join("ca.pem");
    assert!(wrong_ca.is_file());
    agent.append_config(&tls_source(&pg, "verified", "verify-full", Some(&db_ca)))?;
    agent.append_config(&tls_source(&pg, "encrypted", "require", None))?;
    agent.append_config(&tls_source(&pg, "plaintext", "disable", None))?;
    agent.append_config(&tls_source(&pg, "wrong-ca", "verify-full", Some(&wrong_ca)))?;
    let before = pg.content("chat")?;

    // verify-full: backup (agent connection and pg_dump) and restore (psql, COPY) over TLS.
    let id = snapshot_id(&agent.backup_json("verified")?)?;
    agent
        .cli("restore", &[&id, "--database", "chat_copy"])?
        .ensure_success()?;
    assert_eq!(
        pg.content("chat_copy")?,
        before,
        "verify-full restore differs"
    );
    // require: encrypted without checking the certificate, as libpq does.
    snapshot_id(&agent.backup_json("encrypted")?)?;

    let stderr = agent.backup("plaintext")?.ensure_failure()?;
    eprintln!("sslmode = disable: {stderr}");
    assert!(
        stderr.contains("no encryption") && stderr.contains("the server requires TLS: set sslmode"),
        "{stderr}"
    );
    let stderr = agent.backup("wrong-ca")?.ensure_failure()?;
    eprintln!("verify-full, wrong CA: {stderr}");
    assert!(
        stderr.contains("UnknownIssuer") && stderr.contains("is not signed by sslrootcert"),
        "{stderr}"
    );
    // The failed restore path too: verify-full with the wrong CA refuses to restore.
    let wrong = agent.conf_dir().join("agent.toml");
    let text = std::fs::read_to_string(&wrong)?;
    std::fs::write(
        &wrong,
        text.replace(
            &db_ca.display().to_string(),
            &wrong_ca.display().to_string(),
        ),
    )?;
    let stderr = agent
        .cli("restore", &[&id, "--database", "chat_again"])?
        .ensure_failure()?;
    assert!(stderr.contains("UnknownIssuer"), "{stderr}");
    assert_eq!(
        pg.sql(
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname = 'chat_again'"
        )?,
        "0"
    );
    Ok(())
}
