//! The MongoDB restore: `mongorestore --archive` from stdin, renaming the namespaces to the
//! target database, with `--drop` for a replace (collections in the archive replace theirs).
//! Without a replace, a target database that holds any collection is refused: mongorestore
//! would merge the snapshot into it.

use std::io::Read;
use std::process::Stdio;
use std::sync::atomic::AtomicU64;

use anyhow::{anyhow, bail, Context};
use fleetvault_common::Manifest;

use super::{MongoTool, PACKAGE};
use crate::db::{require_tool, DbSource, TargetState};
use crate::pipe::Reassembler;
use crate::process::{feed_tool, ShellCommand};

/// The first bytes of a mongodump archive (0x8199e26d, little-endian).
const ARCHIVE_MAGIC: [u8; 4] = [0x6d, 0xe2, 0x99, 0x81];

/// Whether the database holds any collection or view (blocking). Without a MongoDB shell,
/// `mongodump --archive` tells: its prelude lists every collection before any data, so only
/// the prelude is read and the dump is then stopped.
pub(crate) fn inspect(db: &DbSource) -> anyhow::Result<TargetState> {
    require_tool("mongodump", PACKAGE)?;
    let tool = MongoTool::new(db)?;
    let mut cmd = tool.command("mongodump");
    cmd.arg(format!("--db={}", db.database)).arg("--archive");
    let mut child = ShellCommand::spawn_command(
        "mongodump",
        "mongodump --archive",
        cmd,
        Stdio::null(),
        Stdio::piped(),
    )
    .map_err(|e| anyhow!(e))?;
    let mut stdout = child.take_stdout().context("mongodump has no stdout")?;
    match has_collections(&mut stdout) {
        Ok(has) => {
            drop(stdout);
            child.kill();
            Ok(TargetState {
                exists: has,
                empty: !has,
                server_version: None,
            })
        }
        Err(e) => {
            drop(stdout);
            child.finish().map_err(|m| anyhow!(m))?;
            Err(e.context("reading the prelude of mongodump's archive"))
        }
    }
}

/// Whether a mongodump archive's prelude lists a collection: the magic number, a header
/// document, then one metadata document per collection up to a terminator (0xffffffff).
fn has_collections(r: &mut impl Read) -> anyhow::Result<bool> {
    let mut word = [0u8; 4];
    r.read_exact(&mut word).context("no archive")?;
    if word != ARCHIVE_MAGIC {
        bail!("not a mongodump archive (magic {word:02x?})");
    }
    r.read_exact(&mut word).context("no archive header")?;
    let len = i32::from_le_bytes(word);
    if !(5..=16 << 20).contains(&len) {
        bail!("an archive header of {len} bytes");
    }
    std::io::copy(&mut r.take(len as u64 - 4), &mut std::io::sink())?;
    r.read_exact(&mut word)
        .context("the archive ends in its prelude")?;
    Ok(word != [0xff; 4])
}

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
    if !replace && !inspect(db)?.empty {
        bail!(
            "database {:?} holds collections: add --replace to replace it (the restore would merge into it; nothing was touched)",
            db.database
        );
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prelude_tells_whether_collections_are_listed() {
        let mut empty = ARCHIVE_MAGIC.to_vec();
        empty.extend_from_slice(&[5, 0, 0, 0, 0]);
        empty.extend_from_slice(&[0xff; 4]);
        assert!(!has_collections(&mut empty.as_slice()).unwrap());
        let mut one = ARCHIVE_MAGIC.to_vec();
        one.extend_from_slice(&[5, 0, 0, 0, 0]);
        one.extend_from_slice(&[5, 0, 0, 0, 0]);
        one.extend_from_slice(&[0xff; 4]);
        assert!(has_collections(&mut one.as_slice()).unwrap());
        assert!(has_collections(&mut &b"{\"json\": 1}"[..]).is_err());
        assert!(has_collections(&mut &ARCHIVE_MAGIC[..]).is_err());
    }
}
