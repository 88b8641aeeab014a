//! The checks made before a files restore writes anything: every entry's path is relative,
//! plain and never below a symlink of the snapshot ([`check_paths`]), and an in-place restore
//! stays inside the paths its source is configured with ([`check_within`]).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use anyhow::bail;
use fleetvault_common::{EntryKind, TreeManifest};

/// Refuses `tree` unless every entry lies inside one of `paths` (absolute paths, as a files
/// source is configured): what an in-place restore of a files source may write. Checked before
/// anything is written; the error names the first entry outside.
pub(crate) fn check_within(tree: &TreeManifest, paths: &[PathBuf]) -> anyhow::Result<()> {
    let mut allowed = Vec::with_capacity(paths.len());
    for p in paths {
        let mut bytes: Vec<u8> = Vec::new();
        for c in p.components() {
            match c {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(n) => {
                    if !bytes.is_empty() {
                        bytes.push(b'/');
                    }
                    bytes.extend_from_slice(n.as_bytes());
                }
                _ => bail!(
                    "configured path {} is not a plain absolute path: cannot tell what a restore may write",
                    p.display()
                ),
            }
        }
        allowed.push(bytes);
    }
    for e in &tree.entries {
        let inside = allowed.iter().any(|a| {
            a.is_empty()
                || (e.path.starts_with(a)
                    && (e.path.len() == a.len() || e.path.get(a.len()) == Some(&b'/')))
        });
        if !inside {
            bail!(
                "refusing snapshot entry /{}: it is outside the paths this source is configured with here ({}); nothing was written",
                String::from_utf8_lossy(&e.path),
                paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(())
}

/// Checks every entry's path and returns them as relative paths, or refuses the manifest.
pub(super) fn check_paths(tree: &TreeManifest) -> anyhow::Result<Vec<PathBuf>> {
    let mut links: HashSet<&[u8]> = HashSet::new();
    let mut out = Vec::with_capacity(tree.entries.len());
    for e in &tree.entries {
        let shown = String::from_utf8_lossy(&e.path);
        let refuse = |why: &str| anyhow::anyhow!("refusing snapshot entry {shown:?}: {why}");
        if e.path.is_empty() {
            return Err(refuse("empty path"));
        }
        if e.path.contains(&0) {
            return Err(refuse("NUL byte in path"));
        }
        if e.path[0] == b'/' {
            return Err(refuse("absolute path"));
        }
        let path = Path::new(OsStr::from_bytes(&e.path));
        let mut rel = PathBuf::new();
        for c in path.components() {
            match c {
                Component::Normal(n) => rel.push(n),
                _ => return Err(refuse("path has a `.` or `..` component")),
            }
        }
        // `Path::components` silently drops `.` and repeated slashes; refuse them too.
        if e.path
            .split(|&b| b == b'/')
            .any(|c| c.is_empty() || c == b".")
        {
            return Err(refuse("path has an empty or `.` component"));
        }
        for (i, &b) in e.path.iter().enumerate() {
            if b == b'/' && links.contains(&e.path[..i]) {
                return Err(refuse("path goes through a symlink of the snapshot"));
            }
        }
        if e.kind == EntryKind::Symlink {
            links.insert(&e.path);
        }
        out.push(rel);
    }
    Ok(out)
}
