//! The `mysql` sink: a dump piped into the `mariadb` client, in the target database.
//!
//! MariaDB cannot rename a database, so a replace drops and recreates the target, then
//! restores (the safety snapshot taken before is the way back); a restore into a database
//! that did not exist drops it again when it fails.

use std::process::Stdio;
use std::sync::atomic::AtomicU64;

use anyhow::{anyhow, Context};
use fleetvault_common::Manifest;

use super::database::{feed_tool, TargetState};
use crate::restore::Reassembler;
use crate::source::command::ShellCommand;
use crate::source::database::DbSource;
use crate::source::mysql::{client_program, quote_ident, MyTool};

fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// Whether the target database exists and holds anything.
pub(crate) fn inspect(db: &DbSource) -> anyhow::Result<TargetState> {
    let tool = MyTool::new(db)?;
    let name = literal(&db.database);
    let out = tool
        .query(
            None,
            &format!(
                "SELECT VERSION(), \
                 (SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = {name}), \
                 (SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = {name}) + \
                 (SELECT COUNT(*) FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = {name})"
            ),
        )
        .context("connecting to the MySQL/MariaDB server")?;
    let fields: Vec<&str> = out.trim().split('\t').collect();
    let [version, exists, objects] = fields[..] else {
        return Err(anyhow!("unexpected answer from the server: {out:?}"));
    };
    Ok(TargetState {
        exists: exists == "1",
        empty: objects == "0",
        server_version: Some(version.to_owned()),
    })
}

/// Restores a dump into `db.database` (blocking).
pub(crate) fn restore(
    db: &DbSource,
    manifest: &Manifest,
    reasm: &mut Reassembler,
    written: &AtomicU64,
) -> anyhow::Result<()> {
    let Manifest::Stream(stream) = manifest else {
        return Err(anyhow!("a MySQL snapshot holds one stream"));
    };
    let tool = MyTool::new(db)?;
    let state = inspect(db)?;
    let name = quote_ident(&db.database);
    if state.exists && !state.empty {
        tool.query(None, &format!("DROP DATABASE {name}"))
            .with_context(|| format!("dropping {name} to replace it"))?;
    }
    if !state.exists || !state.empty {
        tool.query(None, &format!("CREATE DATABASE {name}"))
            .with_context(|| format!("creating {name}"))?;
    }
    let mut cmd = tool.command(client_program()?);
    cmd.arg("--").arg(&db.database);
    let child =
        ShellCommand::spawn_command("mariadb", "mariadb", cmd, Stdio::piped(), Stdio::null())
            .map_err(|e| anyhow!(e))?;
    let result = feed_tool(child, |stdin| reasm.stream(stream, stdin, written));
    if let Err(e) = result {
        let state = if state.exists && !state.empty {
            format!("database {name} is partly restored; its previous content is in the safety snapshot, if one was taken")
        } else {
            let _ = tool.query(None, &format!("DROP DATABASE IF EXISTS {name}"));
            format!("the partly restored database {name} was dropped")
        };
        return Err(e.context(format!("restore into {name} failed; {state}")));
    }
    Ok(())
}
