//! The [`Agent`] guard: an `issue-agent` output dir (agent.toml, ca.pem, agent.pem, agent.key),
//! sources appended to agent.toml, one-shot agent commands, and `run` as an [`AgentProcess`].

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

use crate::process::{run, run_to_file, Output, Proc, COMMAND_TIMEOUT};
use crate::{bin, Coordinator};

/// The line `fleetvault-agent run` logs once connected and registered.
const CONNECTED_LINE: &str = "connected to coordinator";

/// An issued agent: its config dir, logs, and the commands an operator runs on its host.
pub struct Agent {
    name: String,
    conf_dir: PathBuf,
    logs: PathBuf,
    runs: std::cell::Cell<u32>,
    root: Option<tempfile::TempDir>,
}

/// A `kind = "command"` source.
#[derive(Clone, Debug, Default)]
pub struct CommandSource {
    /// Source name.
    pub name: String,
    /// Shell command whose stdout is backed up.
    pub backup_command: String,
    /// Shell command that receives a restored stream on stdin.
    pub restore_command: Option<String>,
    /// `[min, avg, max]` chunk sizes.
    pub chunk_sizes: Option<[u32; 3]>,
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl Agent {
    /// `issue-agent NAME --out DIR` against `coordinator`'s data dir.
    pub(crate) fn issue(coordinator: &Coordinator, name: &str) -> anyhow::Result<Self> {
        let root = tempfile::Builder::new()
            .prefix(&format!("fv-agent-{name}-"))
            .tempdir()?;
        let conf_dir = root.path().join("conf");
        let logs = root.path().join("logs");
        std::fs::create_dir(&logs)?;
        eprintln!("agent {name} dir {}", root.path().display());
        coordinator
            .cli(&[
                "issue-agent",
                name,
                "--out",
                conf_dir.to_str().context("temp path is not UTF-8")?,
            ])?
            .ensure_success()?;
        let agent = Self {
            name: name.to_owned(),
            conf_dir,
            logs,
            runs: std::cell::Cell::new(0),
            root: Some(root),
        };
        anyhow::ensure!(
            agent.config().is_file(),
            "issue-agent did not write {}",
            agent.config().display()
        );
        Ok(agent)
    }

    /// `issue-agent NAME --out DIR --force` into this agent's own config dir: a new
    /// certificate and key replace the old ones (and the coordinator stops accepting those).
    /// The sources appended to agent.toml are lost with it.
    pub fn reissue(&self, coordinator: &Coordinator) -> anyhow::Result<Output> {
        coordinator.cli(&[
            "issue-agent",
            &self.name,
            "--out",
            self.conf_dir.to_str().context("temp path is not UTF-8")?,
            "--force",
        ])
    }

    /// The agent's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The directory `issue-agent` wrote (agent.toml and its PEM files).
    pub fn conf_dir(&self) -> &Path {
        &self.conf_dir
    }

    /// `agent.toml`.
    pub fn config(&self) -> PathBuf {
        self.conf_dir.join("agent.toml")
    }

    /// Appends raw TOML to agent.toml.
    pub fn append_config(&self, text: &str) -> anyhow::Result<()> {
        let path = self.config();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        f.write_all(text.as_bytes())?;
        Ok(())
    }

    /// Adds a `kind = "files"` source.
    pub fn add_files_source(
        &self,
        name: &str,
        paths: &[&Path],
        exclude: &[&str],
    ) -> anyhow::Result<()> {
        let paths: Vec<String> = paths
            .iter()
            .map(|p| p.to_str().map(toml_str).context("source path is not UTF-8"))
            .collect::<anyhow::Result<_>>()?;
        let mut s = format!(
            "\n[[sources]]\nname = {}\nkind = \"files\"\npaths = [{}]\n",
            toml_str(name),
            paths.join(", ")
        );
        if !exclude.is_empty() {
            let ex: Vec<String> = exclude.iter().map(|e| toml_str(e)).collect();
            let _ = writeln!(s, "exclude = [{}]", ex.join(", "));
        }
        self.append_config(&s)
    }

    /// Adds a `kind = "command"` source.
    pub fn add_command_source(&self, src: &CommandSource) -> anyhow::Result<()> {
        let mut s = format!(
            "\n[[sources]]\nname = {}\nkind = \"command\"\nbackup_command = {}\n",
            toml_str(&src.name),
            toml_str(&src.backup_command)
        );
        if let Some(r) = &src.restore_command {
            let _ = writeln!(s, "restore_command = {}", toml_str(r));
        }
        if let Some([min, avg, max]) = src.chunk_sizes {
            let _ = writeln!(s, "chunk_sizes = [{min}, {avg}, {max}]");
        }
        self.append_config(&s)
    }

    fn command(&self, sub: &str) -> anyhow::Result<Command> {
        let mut cmd = Command::new(bin("fleetvault-agent")?);
        cmd.arg(sub).arg("--config").arg(self.config());
        Ok(cmd)
    }

    /// Runs `fleetvault-agent SUB --config agent.toml ARGS`.
    pub fn cli(&self, sub: &str, args: &[&str]) -> anyhow::Result<Output> {
        run(self.command(sub)?.args(args), COMMAND_TIMEOUT)
    }

    /// `backup --source S --json`, whatever its outcome.
    pub fn backup(&self, source: &str) -> anyhow::Result<Output> {
        self.cli("backup", &["--source", source, "--json"])
    }

    /// `backup --source S --json`; must exit 0 and report `completed`.
    pub fn backup_json(&self, source: &str) -> anyhow::Result<Value> {
        let out = self.backup(source)?.ensure_success()?;
        let v = out.json()?;
        anyhow::ensure!(
            v["status"] == "completed",
            "backup of {source} is not completed: {v}"
        );
        Ok(v)
    }

    /// Starts `backup --source S --json` in the background (stdout to a file in the logs dir).
    pub fn spawn_backup(&self, source: &str) -> anyhow::Result<(Proc, PathBuf)> {
        let n = self.next_run();
        let stdout = self.logs.join(format!("backup-{source}-{n}.json"));
        let proc = Proc::spawn(
            self.command("backup")?.args(["--source", source, "--json"]),
            &format!("agent {} backup {source} #{n}", self.name),
            &self.logs.join(format!("backup-{source}-{n}.log")),
            &stdout,
        )?;
        Ok((proc, stdout))
    }

    /// `snapshots --json`.
    pub fn snapshots_json(&self) -> anyhow::Result<Vec<Value>> {
        match self
            .cli("snapshots", &["--json"])?
            .ensure_success()?
            .json()?
        {
            Value::Array(a) => Ok(a),
            other => bail!("snapshots --json printed a non-array: {other}"),
        }
    }

    /// `restore ID [--target T] --json`, whatever its outcome.
    pub fn restore(&self, id: &str, target: Option<&Path>) -> anyhow::Result<Output> {
        let mut cmd = self.command("restore")?;
        cmd.arg(id).arg("--json");
        if let Some(t) = target {
            cmd.arg("--target").arg(t);
        }
        run(&mut cmd, COMMAND_TIMEOUT)
    }

    /// `restore ID [--target T] --json`; must exit 0.
    pub fn restore_json(&self, id: &str, target: Option<&Path>) -> anyhow::Result<Value> {
        self.restore(id, target)?.ensure_success()?.json()
    }

    /// `restore ID --target -` with stdout written to the new file `out`.
    pub fn restore_to_stdout(&self, id: &str, out: &Path) -> anyhow::Result<Output> {
        run_to_file(
            self.command("restore")?.arg(id).arg("--target").arg("-"),
            out,
            COMMAND_TIMEOUT,
        )
    }

    fn next_run(&self) -> u32 {
        let n = self.runs.get() + 1;
        self.runs.set(n);
        n
    }

    /// Starts `fleetvault-agent run` and waits until it logs that it is connected.
    pub fn run(&self) -> anyhow::Result<AgentProcess> {
        let n = self.next_run();
        let proc = Proc::spawn(
            &mut self.command("run")?,
            &format!("agent {} run #{n}", self.name),
            &self.logs.join(format!("run-{n}.log")),
            &self.logs.join(format!("run-{n}.stdout")),
        )?;
        proc.wait_for_line(CONNECTED_LINE, Duration::from_secs(60))?;
        Ok(AgentProcess { proc })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(root) = self.root.take() {
            crate::keep_or_remove(root);
        }
    }
}

/// A running `fleetvault-agent run`, killed on `Drop`.
pub struct AgentProcess {
    proc: Proc,
}

impl AgentProcess {
    /// The underlying process.
    pub fn process(&mut self) -> &mut Proc {
        &mut self.proc
    }
}
