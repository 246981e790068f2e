//! Where a sampling command runs. The curator asks a [`CommandRunner`] to run `nvidia-smi`
//! (and to read the process table) on a host: [`LocalCommandRunner`] runs it on this machine;
//! an SSH host plugs in its own runner (an exec channel on its session) behind the same trait.
//!
//! The command is an argument vector, never a shell string: nothing from a sample or a
//! config value is interpreted by a shell here. A runner that must go through a shell (SSH
//! exec takes one string) quotes each argument with `conductor::template::shell_quote`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::process::Stdio;
use std::time::Duration;

/// A boxed future, so the trait stays object-safe (`Arc<dyn CommandRunner>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a finished command left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// The exit code; `None` when a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Why a command gave no output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// The program does not exist on the host (spawn said ENOENT, or a shell said 127).
    #[error("{0} not found")]
    NotFound(String),
    #[error("{program} did not finish within {after:?}")]
    TimedOut { program: String, after: Duration },
    /// The host cannot be reached, or the command could not be started for another reason.
    #[error("{0}")]
    Failed(String),
}

/// Runs one command on one host and collects its output.
///
/// Implementations: [`LocalCommandRunner`]; the SSH backend implements it with an exec
/// channel on its reused session (quote `argv` for the remote shell, map exit status 127 to
/// [`RunError::NotFound`], an unreachable host to [`RunError::Failed`]).
pub trait CommandRunner: Send + Sync {
    /// The host this runner reaches, for messages.
    fn host(&self) -> &str;

    /// Runs `argv[0]` with the rest as arguments; gives up after `timeout` (the process is
    /// killed). A non-zero exit is an `Ok` output, not an error: the caller judges it.
    fn run<'a>(
        &'a self,
        argv: &'a [String],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<CommandOutput, RunError>>;
}

/// Runs commands on this machine as child processes (no shell).
#[derive(Debug, Clone)]
pub struct LocalCommandRunner {
    host: String,
}

impl LocalCommandRunner {
    pub fn new(host: impl Into<String>) -> LocalCommandRunner {
        LocalCommandRunner { host: host.into() }
    }
}

impl CommandRunner for LocalCommandRunner {
    fn host(&self) -> &str {
        &self.host
    }

    fn run<'a>(
        &'a self,
        argv: &'a [String],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<CommandOutput, RunError>> {
        Box::pin(async move {
            let Some((program, args)) = argv.split_first() else {
                return Err(RunError::Failed("empty command".into()));
            };
            let child = tokio::process::Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn();
            let child = match child {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(RunError::NotFound(program.clone()))
                }
                Err(e) => return Err(RunError::Failed(format!("cannot run {program}: {e}"))),
            };
            match tokio::time::timeout(timeout, child.wait_with_output()).await {
                Err(_) => Err(RunError::TimedOut {
                    program: program.clone(),
                    after: timeout,
                }),
                Ok(Err(e)) => Err(RunError::Failed(format!("{program}: {e}"))),
                Ok(Ok(out)) => Ok(CommandOutput {
                    code: out.status.code(),
                    stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                }),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn runs_without_a_shell_and_reports_exit_codes() {
        let r = LocalCommandRunner::new("local");
        let out = r
            .run(
                &argv(&["sh", "-c", "echo out; echo err >&2; exit 3"]),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert_eq!(out.code, Some(3));
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
        // An argument is one argument: `$(...)` is text, not a command.
        let out = r
            .run(&argv(&["echo", "$(touch pwned)"]), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(out.stdout, "$(touch pwned)\n");
    }

    #[tokio::test]
    async fn a_missing_program_and_a_timeout_are_told_apart() {
        let r = LocalCommandRunner::new("local");
        let err = r
            .run(&argv(&["mqic-no-such-program"]), Duration::from_secs(10))
            .await
            .unwrap_err();
        assert_eq!(err, RunError::NotFound("mqic-no-such-program".into()));
        let err = r
            .run(&argv(&["sleep", "30"]), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, RunError::TimedOut { .. }), "{err}");
    }
}
