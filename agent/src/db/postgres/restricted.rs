//! A dump fed to `psql` runs in psql's restricted mode, so that no meta-command in it (`\!`
//! runs a shell command, `\copy … program`, `\o |cmd`, `\i`, …) is ever executed: a
//! snapshot may come from a compromised host, and its dump is restored on another.
//!
//! [`Restricted`] writes `\restrict KEY` with a fresh random key before the first byte of the
//! dump; psql then refuses every backslash command but `\unrestrict KEY`, which the dump cannot
//! know. A dump made by pg_dump 13.22/14.19/15.14/16.10/17.6 or later carries its own
//! `\restrict K` (after the header comments) and `\unrestrict K` lines: psql would refuse
//! them under our key, so exactly those two lines are left out. Every other line passes
//! through unchanged, whatever it holds.

use std::io::{self, Write};

use anyhow::{bail, Context};

/// The oldest psql of each major version that knows `\restrict` (13 and older majors than
/// these need the listed minor release; 18 and later have it from the start).
const RESTRICT_SINCE: [(u32, u32); 5] = [(13, 22), (14, 19), (15, 14), (16, 10), (17, 6)];

/// Whether psql `version` (`psql (PostgreSQL) 15.18 (Debian …)`) knows `\restrict`.
fn knows_restrict(version: &str) -> Option<bool> {
    let v = version
        .split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))?;
    let mut parts = v.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next().and_then(|m| m.parse().ok()).unwrap_or(0);
    Some(match RESTRICT_SINCE.iter().find(|(m, _)| *m == major) {
        Some((_, since)) => minor >= *since,
        None => major >= 18,
    })
}

/// Refuses a psql that cannot refuse meta-commands: a dump it loaded could run commands here.
pub(crate) fn require_restrict() -> anyhow::Result<()> {
    static VERSION: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    let version = VERSION
        .get_or_init(|| {
            crate::db::require_tool(
                "psql",
                "the PostgreSQL client tools (Debian: postgresql-client)",
            )
            .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)?;
    match knows_restrict(&version) {
        Some(true) => Ok(()),
        _ => bail!(
            "{version} cannot refuse the meta-commands (such as \\! to run a shell command) a dump may hold: restoring a plain or tables dump needs psql 17.6, 16.10, 15.14, 14.19, 13.22 or later (\\restrict); upgrade the PostgreSQL client tools (nothing was touched)"
        ),
    }
}

/// A fresh key for `\restrict` (alphanumeric, as psql and pg_dump expect).
fn fresh_key() -> anyhow::Result<String> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(hex::encode(bytes))
}

/// Lines longer than this are never a pg_dump `\restrict`/`\unrestrict` line (keys are short).
const KEY_LINE_MAX: usize = 256;

/// What a line of SQL is, as far as it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineKind {
    /// Whitespace only.
    Blank,
    /// Whitespace, then one `-`.
    Dash,
    /// Whitespace, then `--`.
    Comment,
    /// Anything else.
    Other,
}

impl LineKind {
    fn then(self, b: u8) -> Self {
        match (self, b) {
            (LineKind::Comment | LineKind::Other, _) => self,
            (LineKind::Blank, b'-') => LineKind::Dash,
            (LineKind::Blank, b) if b.is_ascii_whitespace() => LineKind::Blank,
            (LineKind::Dash, b'-') => LineKind::Comment,
            _ => LineKind::Other,
        }
    }
}

/// Writes a dump to psql inside restricted mode (see the module docs).
pub(crate) struct Restricted<W: Write> {
    out: W,
    /// The dump's own key, from its `\restrict` line.
    dump_key: Option<Vec<u8>>,
    /// Only comments and blank lines so far: where pg_dump puts its `\restrict` line.
    preamble: bool,
    /// The next byte starts a line.
    line_start: bool,
    /// A line starting with a backslash, held until its end (at most [`KEY_LINE_MAX`]).
    held: Vec<u8>,
    /// The current line is held.
    holding: bool,
    /// What the current line is, as far as it was read (for `preamble`).
    line_kind: LineKind,
}

impl<W: Write> Restricted<W> {
    /// Enters restricted mode on `out` with a fresh key.
    pub(crate) fn new(mut out: W) -> anyhow::Result<Self> {
        let key = fresh_key()?;
        out.write_all(format!("\\restrict {key}\n").as_bytes())
            .context("writing to psql")?;
        Ok(Self {
            out,
            dump_key: None,
            preamble: true,
            line_start: true,
            held: Vec::new(),
            holding: false,
            line_kind: LineKind::Blank,
        })
    }

    /// Writes what is still held (a last line without its newline).
    pub(crate) fn finish(mut self) -> io::Result<()> {
        if self.holding {
            let held = std::mem::take(&mut self.held);
            self.out.write_all(&held)?;
        }
        self.out.flush()
    }

    /// A held line, complete with its newline: dropped when it is the dump's own
    /// `\restrict`/`\unrestrict` line, else written.
    fn end_held(&mut self) -> io::Result<()> {
        let line = std::mem::take(&mut self.held);
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        let key_of = |prefix: &[u8]| {
            text.strip_prefix(prefix)
                .filter(|k| !k.is_empty() && k.iter().all(u8::is_ascii_alphanumeric))
        };
        if self.preamble && self.dump_key.is_none() {
            if let Some(k) = key_of(b"\\restrict ") {
                self.dump_key = Some(k.to_vec());
                self.preamble = false;
                return Ok(());
            }
        }
        self.preamble = false;
        if let (Some(k), Some(d)) = (key_of(b"\\unrestrict "), &self.dump_key) {
            if k == d.as_slice() {
                return Ok(());
            }
        }
        self.out.write_all(&line)
    }
}

impl<W: Write> Write for Restricted<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut rest = data;
        while !rest.is_empty() {
            if self.line_start {
                self.line_start = false;
                self.line_kind = LineKind::Blank;
                self.holding = rest[0] == b'\\';
            }
            let end = rest.iter().position(|&b| b == b'\n');
            let piece = &rest[..end.map_or(rest.len(), |e| e + 1)];
            rest = &rest[piece.len()..];
            if self.preamble && !self.holding {
                // A line that is neither blank nor a `--` comment ends the preamble.
                for &b in piece {
                    self.line_kind = self.line_kind.then(b);
                    if matches!(self.line_kind, LineKind::Comment | LineKind::Other) {
                        break;
                    }
                }
                if self.line_kind == LineKind::Other {
                    self.preamble = false;
                }
            }
            if self.holding {
                self.held.extend_from_slice(piece);
                if end.is_some() {
                    self.holding = false;
                    self.end_held()?;
                } else if self.held.len() > KEY_LINE_MAX {
                    // Too long to be a key line: written as it is, with the rest of the line.
                    self.holding = false;
                    self.preamble = false;
                    let held = std::mem::take(&mut self.held);
                    self.out.write_all(&held)?;
                }
            } else {
                self.out.write_all(piece)?;
            }
            if end.is_some() {
                self.line_start = true;
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `input` through a [`Restricted`] in pieces of `step` bytes; what psql is given.
    fn through(input: &[u8], step: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut r = Restricted::new(&mut out).unwrap();
        for piece in input.chunks(step) {
            r.write_all(piece).unwrap();
        }
        r.finish().unwrap();
        out
    }

    fn body(out: &[u8]) -> &[u8] {
        let first = out.iter().position(|&b| b == b'\n').unwrap();
        assert!(out.starts_with(b"\\restrict "), "no \\restrict first");
        assert_eq!(first, "\\restrict ".len() + 48, "key of 48 hex digits");
        &out[first + 1..]
    }

    #[test]
    fn a_pg_dump_keeps_everything_but_its_own_key_lines() {
        let dump = b"--\n-- PostgreSQL database dump\n--\n\n\\restrict abc123\n\nSET x = 1;\nCOPY public.t (a) FROM stdin;\n\\\\restrict x\n\\restrict abc123\n\\.\n\n--\n-- PostgreSQL database dump complete\n--\n\n\\unrestrict abc123\n\n";
        let want = b"--\n-- PostgreSQL database dump\n--\n\n\nSET x = 1;\nCOPY public.t (a) FROM stdin;\n\\\\restrict x\n\\restrict abc123\n\\.\n\n--\n-- PostgreSQL database dump complete\n--\n\n\n";
        for step in [1, 2, 3, 7, 64, dump.len()] {
            let out = through(dump, step);
            assert_eq!(body(&out), want, "step {step}");
        }
    }

    #[test]
    fn hostile_meta_commands_reach_psql_under_our_key() {
        // A dump without \restrict of its own, or one that tries to leave ours.
        for dump in [
            &b"\\! touch /tmp/x\n"[..],
            b"SELECT 1;\n\\restrict k\n\\unrestrict k\n\\! id\n",
            b"-- c\n\\restrict k\n\\unrestrict k\n\\! id\n",
            b"SELECT 1; \\! id",
        ] {
            let out = through(dump, 5);
            let body = body(&out);
            assert!(
                body.windows(4).any(|w| w == b"\\! i" || w == b"\\! t"),
                "{}",
                String::from_utf8_lossy(body)
            );
            if dump.starts_with(b"-- c") {
                // Its own \restrict k is dropped, so its \unrestrict k is too: the \! stays.
                assert_eq!(body, b"-- c\n\\! id\n");
            }
        }
        // Ours is a fresh key each time.
        assert_ne!(through(b"", 1), through(b"", 1));
    }

    #[test]
    fn only_psql_with_restrict_is_accepted() {
        assert_eq!(
            knows_restrict("psql (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"),
            Some(true)
        );
        assert_eq!(knows_restrict("psql (PostgreSQL) 15.13"), Some(false));
        assert_eq!(knows_restrict("psql (PostgreSQL) 17.6"), Some(true));
        assert_eq!(knows_restrict("psql (PostgreSQL) 18.0"), Some(true));
        assert_eq!(knows_restrict("psql (PostgreSQL) 12.22"), Some(false));
        assert_eq!(knows_restrict("psql"), None);
    }
}
