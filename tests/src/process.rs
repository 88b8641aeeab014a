//! Child processes: one-shot commands with a timeout ([`run`]), and long-lived children
//! ([`Proc`]) whose stderr is copied line by line into a log file and offered to
//! [`Proc::wait_for_line`], which is how the harness knows a server is ready.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long a one-shot command may run before the harness kills it and fails the test
/// (generous: it only turns a hang into a readable error before nextest's slow-timeout).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(240);

/// The environment every child gets: no colours in logs, no data dir from the caller's shell.
fn prepare(cmd: &mut Command) {
    cmd.env("NO_COLOR", "1")
        .env_remove("FLEETVAULT_DATA_DIR")
        .stdin(Stdio::null());
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// What a finished one-shot command left behind.
#[derive(Debug)]
pub struct Output {
    /// The command line, for messages.
    pub command: String,
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output (lossy UTF-8); empty when it went to a file.
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
}

impl Output {
    /// Whether the command exited 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Fails, showing the command and its stderr, unless it exited 0.
    pub fn ensure_success(self) -> anyhow::Result<Self> {
        if !self.success() {
            bail!("command failed: {self}");
        }
        Ok(self)
    }

    /// Fails unless it exited non-zero with a one-line `error: …` on stderr; returns stderr.
    pub fn ensure_failure(self) -> anyhow::Result<String> {
        if self.success() {
            bail!("command succeeded but should have failed: {self}");
        }
        let last = self.stderr.lines().last().unwrap_or("");
        if !self.stderr.lines().any(|l| l.starts_with("error: ")) {
            bail!("no `error: …` line on stderr (last line {last:?}): {self}");
        }
        Ok(self.stderr)
    }

    /// Stdout parsed as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("stdout is not JSON: {self}"))
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` exited with {}", self.command, self.status)?;
        if !self.stdout.is_empty() {
            write!(f, "\n--- stdout ---\n{}", tail(&self.stdout, 60))?;
        }
        write!(f, "\n--- stderr ---\n{}", tail(&self.stderr, 60))
    }
}

/// The last `n` lines of `text`.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `cmd` to completion (stdin empty, stdout and stderr captured), killing it after
/// `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    prepare(cmd);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    finish(cmd, timeout)
}

/// Runs `cmd` to completion with its stdout written to a new file `stdout` (for outputs too
/// big to hold in memory), killing it after `timeout`.
pub fn run_to_file(cmd: &mut Command, stdout: &Path, timeout: Duration) -> anyhow::Result<Output> {
    prepare(cmd);
    let file = File::create(stdout).with_context(|| format!("creating {}", stdout.display()))?;
    cmd.stdout(file).stderr(Stdio::piped());
    finish(cmd, timeout)
}

fn finish(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let command = describe(cmd);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting `{command}`"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(timeout) {
        Ok(out) => out,
        Err(_) => {
            let _ = send_signal(pid, "KILL");
            // Grandchildren may still hold the pipes: do not wait for them forever.
            let stderr = match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(o)) => String::from_utf8_lossy(&o.stderr).into_owned(),
                _ => String::new(),
            };
            bail!(
                "`{command}` did not finish within {timeout:?}; killed it\n--- stderr ---\n{}",
                tail(&stderr, 60)
            );
        }
    }
    .with_context(|| format!("waiting for `{command}`"))?;
    Ok(Output {
        command,
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Sends `signal` (e.g. `TERM`) to `pid` with `sh`'s `kill` builtin.
fn send_signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = Command::new("sh")
        .arg("-c")
        .arg("kill -s \"$1\" \"$2\"")
        .arg("sh")
        .arg(signal)
        .arg(pid.to_string())
        .status()
        .context("running sh -c kill")?;
    anyhow::ensure!(status.success(), "kill -s {signal} {pid} failed");
    Ok(())
}

/// Quotes `s` for `sh`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A long-lived child process, killed on `Drop`. Its stderr goes to `log` (line by line, as it
/// arrives) and to [`Proc::wait_for_line`]; its stdout to a file of its own.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    lines: Receiver<String>,
}

impl Proc {
    /// Starts `cmd` as `name`, logging stderr to `log` and stdout to `stdout`.
    pub fn spawn(cmd: &mut Command, name: &str, log: &Path, stdout: &Path) -> anyhow::Result<Self> {
        prepare(cmd);
        let out = File::create(stdout).with_context(|| format!("creating {}", stdout.display()))?;
        let mut log_file =
            File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let command = describe(cmd);
        let _ = writeln!(log_file, "$ {command}");
        let mut child = cmd
            .stdout(out)
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting `{command}`"))?;
        let stderr = child.stderr.take().context("child has no stderr pipe")?;
        let (tx, lines) = mpsc::channel();
        // The pump ends at EOF, when the child (and every process holding its stderr) exits.
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let _ = log_file.write_all(&buf);
                        let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                        // Nobody listening any more is fine: the log still gets the line.
                        let _ = tx.send(line);
                    }
                }
            }
        });
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_path_buf(),
            lines,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Path of the stderr log.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The stderr log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until a stderr line contains `needle` and returns it; fails if the process closes
    /// stderr (exits) first or `timeout` passes.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => bail!(
                    "{} did not log {needle:?} within {timeout:?}\n--- {} ---\n{}",
                    self.name,
                    self.log.display(),
                    tail(&self.log_text(), 40)
                ),
                Err(RecvTimeoutError::Disconnected) => bail!(
                    "{} exited before logging {needle:?}\n--- {} ---\n{}",
                    self.name,
                    self.log.display(),
                    tail(&self.log_text(), 40)
                ),
            }
        }
    }

    /// Sends `signal` (a name such as `TERM`) with the shell's `kill` builtin (always there,
    /// unlike procps' kill(1) on a minimal system).
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        send_signal(self.pid(), signal)
    }

    /// Polls until the process exits or `timeout` passes (`None`).
    pub fn wait_timeout(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let Some(child) = self.child.as_mut() else {
            bail!("{} was already reaped", self.name);
        };
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut() {
            // An already exited child makes kill() fail; wait() still reaps it.
            let _ = child.kill();
            child
                .wait()
                .with_context(|| format!("reaping {}", self.name))?;
        }
        Ok(())
    }

    /// Sends `signal` (e.g. `TERM`), then returns the exit status, or an error if it does not
    /// exit within `timeout`.
    pub fn stop_with(&mut self, signal: &str, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.signal(signal)?;
        match self.wait_timeout(timeout)? {
            Some(status) => Ok(status),
            None => bail!(
                "{} did not exit within {timeout:?} of SIG{signal}\n--- {} ---\n{}",
                self.name,
                self.log.display(),
                tail(&self.log_text(), 40)
            ),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.kill9();
        // Captured by the test runner: shown only when the test fails.
        eprintln!(
            "--- {} log ({}) ---\n{}",
            self.name,
            self.log.display(),
            tail(&self.log_text(), 40)
        );
    }
}
