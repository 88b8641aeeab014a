//! The `mongodb` sink: `mongorestore --archive` from stdin, renaming the namespaces to the
//! target database, with `--drop` for a replace (collections in the archive replace theirs).

use std::process::Stdio;
use std::sync::atomic::AtomicU64;

use anyhow::anyhow;
use fleetvault_common::Manifest;

use super::database::feed_tool;
use crate::restore::Reassembler;
use crate::source::command::ShellCommand;
use crate::source::database::{require_tool, DbSource};
use crate::source::mongodb::{MongoTool, PACKAGE};

/// Restores an archive of database `from` into `db.database` (blocking).
pub(crate) fn restore(
    db: &DbSource,
    from: &str,
    replace: bool,
    manifest: &Manifest,
    reasm: &mut Reassembler,
    written: &AtomicU64,
) -> anyhow::Result<()> {
    let Manifest::Stream(stream) = manifest else {
        return Err(anyhow!("a MongoDB snapshot holds one stream"));
    };
    require_tool("mongorestore", PACKAGE)?;
    let tool = MongoTool::new(db)?;
    let mut cmd = tool.command("mongorestore");
    cmd.arg("--archive")
        .arg(format!("--nsFrom={from}.*"))
        .arg(format!("--nsTo={}.*", db.database));
    if replace {
        cmd.arg("--drop");
    }
    let child = ShellCommand::spawn_command(
        "mongorestore",
        "mongorestore",
        cmd,
        Stdio::piped(),
        Stdio::null(),
    )
    .map_err(|e| anyhow!(e))?;
    feed_tool(child, |stdin| reasm.stream(stream, stdin, written))
}
