//! MySQL and MariaDB: the client tools with the source's credentials in a private option file
//! (`--defaults-extra-file`), never in argv; shared by the dump ([`dump`]) and the restore
//! ([`restore`]).
//!
//! May import `config`, `pipe`, `process` and `db`.

pub(crate) mod dump;
pub(crate) mod restore;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{anyhow, bail, Context};

use crate::db::{require_tool, secret_dir, write_secret, DbSource};

/// A MariaDB/MySQL client tool with the source's credentials in a private option file.
pub(crate) struct MyTool {
    /// Holds the option file; removed on drop.
    _dir: tempfile::TempDir,
    options: PathBuf,
}

/// The first of `names` that is installed.
fn pick(names: &[&'static str], package: &str) -> anyhow::Result<&'static str> {
    let mut last = None;
    for n in names {
        match require_tool(n, package) {
            Ok(_) => return Ok(n),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("no tool to try")))
}

/// The dump tool's name (`mariadb-dump`, else `mysqldump`).
pub(crate) fn dump_program() -> anyhow::Result<&'static str> {
    pick(
        &["mariadb-dump", "mysqldump"],
        "the MariaDB or MySQL client (Debian: mariadb-client)",
    )
}

/// The client's name (`mariadb`, else `mysql`).
pub(crate) fn client_program() -> anyhow::Result<&'static str> {
    pick(
        &["mariadb", "mysql"],
        "the MariaDB or MySQL client (Debian: mariadb-client)",
    )
}

impl MyTool {
    pub(crate) fn new(db: &DbSource) -> anyhow::Result<Self> {
        let dir = secret_dir()?;
        let options = dir.path().join("client.cnf");
        let mut text = String::from("[client]\n");
        if let Some(h) = &db.host {
            if h.starts_with('/') {
                text.push_str(&format!("socket={}\n", option_value("host", h)?));
            } else {
                text.push_str(&format!("host={}\n", option_value("host", h)?));
            }
        }
        if let Some(p) = db.port {
            text.push_str(&format!("port={p}\n"));
        }
        if let Some(u) = &db.user {
            text.push_str(&format!("user={}\n", option_value("user", u)?));
        }
        if let Some(pw) = db.password()? {
            text.push_str(&format!("password={}\n", option_value("password", &pw)?));
        }
        write_secret(&options, &text)?;
        Ok(Self { _dir: dir, options })
    }

    /// `program --defaults-extra-file=…` (that option must come first).
    pub(crate) fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.arg(format!("--defaults-extra-file={}", self.options.display()));
        cmd
    }

    /// Runs one SQL statement with the client, returning its tab-separated output.
    pub(crate) fn query(&self, database: Option<&str>, sql: &str) -> anyhow::Result<String> {
        let mut cmd = self.command(client_program()?);
        cmd.args(["--batch", "--skip-column-names", "-e", sql]);
        if let Some(d) = database {
            cmd.arg("--").arg(d);
        }
        let out = cmd.output().context("running the MariaDB client")?;
        if !out.status.success() {
            bail!(
                "{}",
                String::from_utf8_lossy(&out.stderr)
                    .trim()
                    .replace('\n', " | ")
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The longest host, user or password written to an option file (bytes, before escaping).
const OPTION_VALUE_MAX: usize = 1024;

/// A quoted option-file value: the client's option parser reads `\\`, `\"`, `\n` and `\r`
/// back, so a value stays one value on one line, whatever it holds (a line break in a password
/// or host must never start another option).
fn option_value(what: &str, value: &str) -> anyhow::Result<String> {
    if value.contains('\0') {
        bail!("the MySQL {what} holds a NUL byte, which the client cannot be given");
    }
    // The client reads option files in lines of at most 4 KiB: the rest of a longer line
    // would be read as another option.
    if value.len() > OPTION_VALUE_MAX {
        bail!(
            "the MySQL {what} is {} bytes long; the client takes at most {OPTION_VALUE_MAX}",
            value.len()
        );
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('"');
    Ok(out)
}

/// `` `name` `` with embedded backticks doubled.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_values_stay_one_value_on_one_line() {
        let v = option_value("password", "a\"b\\c\nhost=evil\r#x").unwrap();
        assert_eq!(v, "\"a\\\"b\\\\c\\nhost=evil\\r#x\"");
        assert!(!v.contains('\n') && !v.contains('\r'));
        assert!(option_value("password", "a\0b").is_err());
        let long = "p".repeat(OPTION_VALUE_MAX + 1);
        assert!(format!("{:#}", option_value("password", &long).unwrap_err()).contains("at most"));
    }
}
