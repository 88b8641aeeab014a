//! The `command` source: a shell command's stdout is the backup stream. Its stderr is kept
//! (the last few KiB) so that a failure can say why; a non-zero exit fails the backup.
//! The same process handling serves the `command` sink.

use std::io::Read;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::thread::JoinHandle;

/// The pipe size asked for a command's stdout (Linux's default `pipe-max-size`; the default
/// pipe holds 64 KiB, so every 64 KiB would wake the reader).
const PIPE_SIZE: usize = 1 << 20;

/// How much of a command's stderr is kept for error messages.
const STDERR_TAIL: usize = 4096;

/// A running shell command.
pub(crate) struct ShellCommand {
    what: &'static str,
    command: String,
    child: Child,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

impl ShellCommand {
    /// Starts `/bin/sh -c command`, with stdin and stdout as given.
    pub(crate) fn spawn(
        what: &'static str,
        command: &str,
        stdin: Stdio,
        stdout: Stdio,
    ) -> Result<Self, String> {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(command);
        Self::spawn_command(what, command, cmd, stdin, stdout)
    }

    /// Starts `cmd` (shown in errors as `shown`: never put a secret in it).
    pub(crate) fn spawn_command(
        what: &'static str,
        shown: &str,
        mut cmd: Command,
        stdin: Stdio,
        stdout: Stdio,
    ) -> Result<Self, String> {
        let command = shown;
        let mut child = cmd
            .stdin(stdin)
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {what} `{command}`: {e}"))?;
        let stderr = child.stderr.take().map(|mut err| {
            std::thread::spawn(move || {
                let mut tail = Vec::new();
                let mut buf = [0u8; 8192];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    tail.extend_from_slice(&buf[..n]);
                    if tail.len() > 2 * STDERR_TAIL {
                        tail.drain(..tail.len() - STDERR_TAIL);
                    }
                }
                tail
            })
        });
        Ok(Self {
            what,
            command: command.to_owned(),
            child,
            stderr,
        })
    }

    /// The command's stdout, when it was piped. Its pipe is widened to [`PIPE_SIZE`] where the
    /// system allows it: a dump then crosses in fewer, larger reads.
    pub(crate) fn take_stdout(&mut self) -> Option<ChildStdout> {
        let stdout = self.child.stdout.take()?;
        let _ = rustix::pipe::fcntl_setpipe_size(&stdout, PIPE_SIZE);
        Some(stdout)
    }

    /// The command's stdin, when it was piped.
    pub(crate) fn take_stdin(&mut self) -> Option<std::process::ChildStdin> {
        self.child.stdin.take()
    }

    /// Waits for the command; a non-zero exit is an error carrying its stderr.
    pub(crate) fn finish(mut self) -> Result<(), String> {
        let status = self
            .child
            .wait()
            .map_err(|e| format!("waiting for {} `{}`: {e}", self.what, self.command))?;
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        if status.success() {
            return Ok(());
        }
        let mut text = String::from_utf8_lossy(&stderr).trim().to_owned();
        if text.len() > STDERR_TAIL {
            let cut = text.len() - STDERR_TAIL;
            let cut = (cut..text.len())
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(0);
            text = format!("…{}", &text[cut..]);
        }
        let text = text.replace('\n', " | ");
        Err(format!(
            "{} `{}` failed ({status}){}",
            self.what,
            self.command,
            if text.is_empty() {
                String::new()
            } else {
                format!(": {text}")
            }
        ))
    }

    /// Whether the command has already exited (a restore tool that stopped reading).
    pub(crate) fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Kills the command (its consumer must not see a clean end of stream) and reaps it.
    pub(crate) fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ShellCommand {
    fn drop(&mut self) {
        // A command not finished or killed explicitly is killed: never leave a dump running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
