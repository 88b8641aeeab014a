//! The SQLite restore: the dump is loaded into a new file beside the target, synced, and
//! renamed over it only when the load succeeded, so a failed restore leaves the target as it
//! was. Stop the application first: a replaced database file must not be open elsewhere.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicU64;

use anyhow::{anyhow, Context};
use fleetvault_common::{durable, Manifest};

use crate::db::{DbSource, TargetState};
use crate::pipe::Reassembler;
use crate::process::{feed_tool, ShellCommand};

/// Whether the target file exists and holds any table.
pub(crate) fn inspect(db: &DbSource) -> anyhow::Result<TargetState> {
    let path = Path::new(&db.database);
    let exists = path.exists();
    let empty = if exists {
        let out = Command::new("sqlite3")
            .arg("-readonly")
            .arg(not_an_option(path))
            .arg("SELECT COUNT(*) FROM sqlite_master")
            .output()
            .context("running sqlite3")?;
        if !out.status.success() {
            return Err(anyhow!(
                "{} is not a readable SQLite database: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        String::from_utf8_lossy(&out.stdout).trim() == "0"
    } else {
        true
    };
    Ok(TargetState {
        exists,
        empty,
        server_version: None,
    })
}

/// `path`, made to start with `./` when it is relative, so that it is never taken for an option.
fn not_an_option(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        Path::new(".").join(path)
    }
}

/// Restores a dump into the file `db.database` (blocking).
pub(crate) fn restore(
    db: &DbSource,
    manifest: &Manifest,
    reasm: &mut Reassembler,
    written: &AtomicU64,
) -> anyhow::Result<()> {
    let Manifest::Stream(stream) = manifest else {
        return Err(anyhow!("a SQLite snapshot holds one stream"));
    };
    let target = PathBuf::from(&db.database);
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    target
        .file_name()
        .with_context(|| format!("{} is not a file path", target.display()))?;
    // sqlite3 loads into a new file beside the target (a 0-byte file is an empty database),
    // which replaces the target only once whole and durable; 0644 as sqlite3 would create it.
    let tmp = durable::NewFile::create(&target, 0o644)?;
    // -safe: the dump may come from another (compromised) host; safe mode refuses the dot
    // commands and SQL functions that run programs or touch other files (.shell, .system,
    // .output, .load, ATTACH, writefile(), …) and stops at the first one.
    let mut cmd = Command::new("sqlite3");
    cmd.args(["-safe", "-bail"]).arg(tmp.temp_path());
    let child =
        ShellCommand::spawn_command("sqlite3", "sqlite3", cmd, Stdio::piped(), Stdio::null())
            .map_err(|e| anyhow!(e))?;
    if let Err(e) = feed_tool(child, |stdin| reasm.stream(stream, stdin, written)) {
        return Err(e.context(format!(
            "restore into {} failed; it was not touched",
            target.display()
        )));
    }
    // The old database's journal files belong to the old file: never pair them with the new.
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut p = target.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
    tmp.commit(durable::Replace::Yes)
        .with_context(|| format!("replacing {}", target.display()))?;
    Ok(())
}
