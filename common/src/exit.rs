//! Exit codes, the same for both binaries (README, "Exit codes"), along restic's lines, and
//! the one JSON document a `--json` command prints when it fails before it has a result.

use std::process::ExitCode;

use serde_json::json;

use crate::ClientError;

/// The command did what was asked.
pub const SUCCESS: u8 = 0;
/// The command failed (a backup failed, a snapshot is unknown, a file exists ...).
pub const FAILURE: u8 = 1;
/// The command line or a configuration file is wrong; nothing was done.
pub const USAGE: u8 = 2;
/// The command completed, with warnings: some files unreadable, an `after` hook failed,
/// verify found damage.
pub const WARNINGS: u8 = 3;
/// The coordinator did not answer (down, unreachable, wrong address or port).
pub const UNREACHABLE: u8 = 10;
/// The coordinator refused us (certificate unknown or revoked, wrong role).
pub const REFUSED: u8 = 11;

/// A mistake in the command line or a configuration file: exit code [`USAGE`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A command that ended with warnings after printing its result: exit code [`WARNINGS`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Warnings(pub String);

/// A failure whose record exists: its snapshot id goes into the `--json` failure document.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct FailedRecord {
    /// The failed snapshot's id.
    pub snapshot_id: String,
    /// What went wrong.
    pub message: String,
}

/// `T` in `err`: one of its contexts, its root error, or a cause in its source chain.
pub fn find<T: std::error::Error + Send + Sync + 'static>(err: &anyhow::Error) -> Option<&T> {
    err.downcast_ref::<T>()
        .or_else(|| err.chain().find_map(|c| c.downcast_ref::<T>()))
}

/// The exit code for an error: a usage error, warnings, then the coordinator's answer.
pub fn code_of(err: &anyhow::Error) -> u8 {
    if find::<UsageError>(err).is_some() {
        return USAGE;
    }
    if find::<Warnings>(err).is_some() {
        return WARNINGS;
    }
    if let Some(code) = find::<ClientError>(err).and_then(ClientError::exit_class) {
        return code;
    }
    FAILURE
}

/// Reports `err` the way every command does: one `error:` line on stderr and, with `--json`,
/// one document on stdout (`status`, `error`, and the failed record's `snapshot_id` where
/// there is one). Returns the exit code.
pub fn report_error(err: &anyhow::Error, json: bool) -> ExitCode {
    let code = code_of(err);
    let message = format!("{err:#}");
    if code == WARNINGS {
        eprintln!("warning: {message}");
    } else {
        eprintln!("error: {message}");
    }
    if json {
        let snapshot_id = find::<FailedRecord>(err).map(|f| f.snapshot_id.clone());
        let status = if code == WARNINGS {
            "completed-with-warnings"
        } else {
            "failed"
        };
        let doc = json!({
            "status": status,
            "error": message,
            "exit_code": code,
            "snapshot_id": snapshot_id,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).unwrap_or_else(|_| doc.to_string())
        );
    }
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn classified_causes_pick_the_code() {
        let usage: anyhow::Result<()> = Err(UsageError("bad".into())).context("loading agent.toml");
        assert_eq!(code_of(&usage.unwrap_err()), USAGE);
        let warn = anyhow::Error::new(Warnings("2 files unreadable".into()));
        assert_eq!(code_of(&warn), WARNINGS);
        assert_eq!(code_of(&anyhow::anyhow!("plain")), FAILURE);
    }
}
