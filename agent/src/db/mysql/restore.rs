//! The MySQL/MariaDB restore: a dump piped into the `mariadb` client, in the target database.
//!
//! MariaDB cannot rename a database, so a replace drops and recreates the target, then
//! restores (the safety snapshot taken before is the way back); a restore into a database
//! that did not exist drops it again when it fails.

use std::process::Stdio;
use std::sync::atomic::AtomicU64;

use anyhow::{anyhow, bail, Context};
use fleetvault_common::Manifest;

use super::{client_program, quote_ident, MyTool};
use crate::db::{DbSource, TargetState};
use crate::pipe::Reassembler;
use crate::process::{feed_tool, ShellCommand};

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
                 (SELECT COUNT(*) FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = {name}) + \
                 (SELECT COUNT(*) FROM information_schema.EVENTS WHERE EVENT_SCHEMA = {name})"
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

/// Whether `program` knows `--sandbox` (MariaDB 10.5.25, 10.6.18, 10.11.8, 11.0.6 and later),
/// which refuses the client commands that run programs or touch files (`system`, `\!`,
/// `source`, `tee`, `pager`, …).
fn require_sandbox(program: &str) -> anyhow::Result<()> {
    static KNOWN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let known = *KNOWN.get_or_init(|| {
        std::process::Command::new(program)
            .arg("--help")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--sandbox"))
    });
    if !known {
        bail!(
            "{program} has no --sandbox option, so it cannot refuse the commands (such as `system` or \\! to run a shell command) a dump may hold: restoring needs the MariaDB client 10.5.25, 10.6.18, 10.11.8, 11.0.6 or later (nothing was touched)"
        );
    }
    Ok(())
}

/// Restores a dump into `db.database` (blocking). A database that holds anything is
/// replaced only with `replace`; the client runs in sandbox mode, so no client command in the
/// dump runs a program or touches a file on this host.
pub(crate) fn restore(
    db: &DbSource,
    replace: bool,
    manifest: &Manifest,
    reasm: &mut Reassembler,
    written: &AtomicU64,
) -> anyhow::Result<()> {
    let Manifest::Stream(stream) = manifest else {
        return Err(anyhow!("a MySQL snapshot holds one stream"));
    };
    let program = client_program()?;
    require_sandbox(program)?;
    let tool = MyTool::new(db)?;
    let state = inspect(db)?;
    let name = quote_ident(&db.database);
    if state.exists && !state.empty && !replace {
        bail!(
            "database {name} exists and is not empty: add --replace to replace it (nothing was touched)"
        );
    }
    if state.exists && !state.empty {
        tool.query(None, &format!("DROP DATABASE {name}"))
            .with_context(|| format!("dropping {name} to replace it"))?;
    }
    if !state.exists || !state.empty {
        tool.query(None, &format!("CREATE DATABASE {name}"))
            .with_context(|| format!("creating {name}"))?;
    }
    let mut cmd = tool.command(program);
    cmd.arg("--sandbox").arg("--").arg(&db.database);
    let child =
        ShellCommand::spawn_command("mariadb", "mariadb", cmd, Stdio::piped(), Stdio::null())
            .map_err(|e| anyhow!(e))?;
    let result = feed_tool(child, |stdin| reasm.stream(stream, stdin, written));
    if let Err(e) = result {
        let state = if state.exists && !state.empty {
            format!("database {name} is partly restored; its previous content is in the safety snapshot, if one was taken")
        } else if state.exists {
            // It was there before (empty): never dropped by a restore that did not create it.
            format!("database {name}, empty before, is partly restored")
        } else {
            let _ = tool.query(None, &format!("DROP DATABASE IF EXISTS {name}"));
            format!("the partly restored database {name} was dropped")
        };
        return Err(e.context(format!("restore into {name} failed; {state}")));
    }
    Ok(())
}
