//! Files that must survive a crash whole: the one way fleetvault writes a file outside the
//! chunk store (which has its own batched variant in `coordinator/src/store/`).
//!
//! The bytes go to a new temporary file beside the target (created with `O_EXCL`, so a symlink
//! planted there is never followed), which is fsynced, moved over the target name (or linked
//! to it when nothing may be replaced), and then the directory is fsynced. A crash leaves the
//! old file or the new one under the name, never a partial one; an error removes the
//! temporary file. Every error names the path it concerns and keeps the `io::ErrorKind`, so a
//! full disk still reads as one.

use std::fs::{File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Whether a commit may replace a file already under the target name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    /// Replace it atomically (a symlink under the name is replaced, never followed).
    Yes,
    /// Fail with `AlreadyExists` instead.
    No,
}

/// A file being written under a temporary name beside `path`; it appears under `path` only on
/// [`NewFile::commit`], and is removed if dropped before that.
pub struct NewFile {
    tmp: tempfile::NamedTempFile,
    path: PathBuf,
}

impl NewFile {
    /// Creates the temporary file in `path`'s directory with exactly `mode`, whatever the
    /// umask. Its name is short, so any name the filesystem accepts can be the target.
    pub fn create(path: &Path, mode: u32) -> io::Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix(".fv")
            .suffix(".tmp")
            .tempfile_in(parent(path))
            .map_err(|e| context(e, "creating a temporary file for", path))?;
        tmp.as_file()
            .set_permissions(Permissions::from_mode(mode))
            .map_err(|e| context(e, "setting the mode of", tmp.path()))?;
        Ok(Self {
            tmp,
            path: path.to_owned(),
        })
    }

    /// The temporary file's path, for a tool that writes the file itself.
    pub fn temp_path(&self) -> &Path {
        self.tmp.path()
    }

    /// fsyncs the file, moves it under its name and fsyncs the directory.
    pub fn commit(self, replace: Replace) -> io::Result<()> {
        let Self { tmp, path } = self;
        tmp.as_file()
            .sync_all()
            .map_err(|e| context(e, "syncing", tmp.path()))?;
        let placed = match replace {
            Replace::Yes => tmp.persist(&path),
            Replace::No => tmp.persist_noclobber(&path),
        };
        // On failure the returned temporary file is dropped, which removes it.
        placed.map_err(|e| context(e.error, "creating", &path))?;
        sync_dir(parent(&path))
    }
}

impl Write for NewFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        #[allow(clippy::disallowed_methods)] // delegating `Write` itself: callers use write_all
        self.tmp.as_file_mut().write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tmp.as_file_mut().flush()
    }
}

/// Writes `bytes` to `path` with exactly `mode`, durably (see the module doc).
pub fn write_file(path: &Path, bytes: &[u8], mode: u32, replace: Replace) -> io::Result<()> {
    let mut file = NewFile::create(path, mode)?;
    file.write_all(bytes)
        .map_err(|e| context(e, "writing", file.temp_path()))?;
    file.commit(replace)
}

/// Moves `from` (a file or a whole directory) to `to` in the same filesystem, replacing a
/// file at `to`, and fsyncs both directories.
pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
    #[allow(clippy::disallowed_methods)] // this module is where renames outside the store live
    std::fs::rename(from, to).map_err(|e| context(e, "moving into", to))?;
    sync_dir(parent(to))?;
    if parent(from) != parent(to) {
        sync_dir(parent(from))?;
    }
    Ok(())
}

/// fsyncs a directory, so that creations, renames and removals in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| context(e, "syncing directory", dir))
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

fn context(e: io::Error, doing: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{doing} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn write_file_sets_the_exact_mode_and_replaces_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.key");
        write_file(&path, b"one", 0o600, Replace::No).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        let err = write_file(&path, b"two", 0o600, Replace::No).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        assert!(err.to_string().contains("agent.key"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"one");

        write_file(&path, b"two", 0o640, Replace::Yes).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        // Nothing temporary is left behind, after a success or a refusal.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_symlink_under_the_name_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::write(&outside, b"keep").unwrap();
        let path = dir.path().join("config");
        std::os::unix::fs::symlink(&outside, &path).unwrap();
        write_file(&path, b"new", 0o600, Replace::Yes).unwrap();
        assert_eq!(fs::read(&outside).unwrap(), b"keep");
        assert!(!fs::symlink_metadata(&path).unwrap().is_symlink());
    }

    #[test]
    fn a_dropped_file_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = NewFile::create(&dir.path().join("x"), 0o600).unwrap();
        file.write_all(b"partial").unwrap();
        drop(file);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
