//! Runs one step attempt as a detached process on this machine, tracked on disk so that it
//! survives an mqic restart (even `kill -9`) and never starts twice.
//!
//! Each attempt owns `<attempts_root>/<case_id>/<step>/<attempt>/`:
//!
//! | file           | written by | holds                                                   |
//! |----------------|------------|---------------------------------------------------------|
//! | `request.json` | runner     | the [`ExecuteRequest`], to reattach after a restart     |
//! | `started`      | runner     | the start time (unix ms); the timeout counts from it    |
//! | `run.sh`       | runner     | the wrapper: records `pid`, runs the command, `exit`    |
//! | `output.log`   | the step   | stdout and stderr, appended (a file, never a pipe)      |
//! | `pid`          | wrapper    | the wrapper's pid, which is also its process group id   |
//! | `exit`         | wrapper    | the command's exit status                               |
//! | `cancelled`    | runner     | a cancel was asked for: the outcome is `Cancelled`      |
//! | `timed_out`    | runner     | the timeout fired: the outcome is `TimedOut`            |
//! | `spawn_failed` | runner     | why `sh` could not be started                           |
//! | `reported`     | executor   | the outcome has been published                          |
//! | `correlation_id` | executor | the id of the message that started it, for later results |
//!
//! Creating the directory is the claim (`create_dir` fails when it exists), so a redelivered
//! `execute_command` attaches to the running attempt instead of starting it again. The wrapper
//! runs in its own session (`setsid`), so it outlives mqic and its whole process group can be
//! signalled on timeout or cancel. Small files are written to a temporary name and renamed, so
//! a reader never sees half of one.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use regex::Regex;
use tokio::sync::watch;

use crate::conductor::template::shell_quote;
use crate::protocol::{CaseId, ExecuteRequest, StepRef};

const REQUEST: &str = "request.json";
const STARTED: &str = "started";
const RUN: &str = "run.sh";
const OUTPUT: &str = "output.log";
const PID: &str = "pid";
const EXIT: &str = "exit";
const CANCELLED: &str = "cancelled";
const TIMED_OUT: &str = "timed_out";
const SPAWN_FAILED: &str = "spawn_failed";
const REPORTED: &str = "reported";
/// In an attempt directory of a step run on an SSH host ([`crate::hpc::remote`]): the host's
/// name. The local runner leaves such attempts to the remote runner.
pub(crate) const REMOTE_HOST: &str = "remote_host";

/// How often a waiting handle looks at the attempt directory.
const POLL: Duration = Duration::from_millis(200);
/// How long a wrapper that has been started may take to write its pid file.
const PID_GRACE: Duration = Duration::from_secs(5);
/// How long a signalled process group gets between SIGTERM and SIGKILL.
const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(5);
/// How much of an existing log is read when attaching (progress and retryable patterns are
/// looked for there): enough for the tail and the latest progress line, never a whole
/// multi-gigabyte log.
const ATTACH_WINDOW: u64 = 1 << 20;
/// At most this much output is read per poll, so one poll stays short.
const READ_PER_POLL: usize = 8 << 20;
/// A line longer than this is matched in pieces rather than held whole.
const MAX_LINE: usize = 64 << 10;
/// File and directory names are kept well under every filesystem's limit.
const MAX_ID_LEN: usize = 200;

/// Why an attempt could not be started, attached or recorded.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// A case id or step name that cannot be a directory name (and so could escape the root).
    #[error(
        "invalid {what} `{value}`: use letters, digits, '.', '_' and '-' (at most 200), \
         not starting with '.'"
    )]
    InvalidId { what: &'static str, value: String },
    /// A progress or retryable pattern that does not compile.
    #[error("pattern `{pattern}` is not a valid regex: {reason}")]
    BadPattern { pattern: String, reason: String },
    /// The request's working directory is missing.
    #[error("workdir `{0}` is not a directory")]
    Workdir(String),
    /// `sh` could not be started for the attempt.
    #[error("cannot start the step: {0}")]
    Spawn(String),
    /// The SSH host could not start or reach the attempt.
    #[error("{detail}")]
    Remote { detail: String, retryable: bool },
    /// The attempt directory could not be read or written (a full disk, permissions).
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LocalError + '_ {
    move |source| LocalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A parsed progress line.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// 0.0 to 1.0; each one reported is larger than the one before.
    pub fraction: f64,
    /// The line it was parsed from.
    pub line: String,
}

/// How an attempt ended. Only the exit status decides success: 0 succeeded, anything else
/// failed (the original guessed from marker strings in the output and got it wrong).
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The command exited 0.
    Succeeded {
        exit_code: i32,
        /// The last `output_tail_bytes` of the output.
        tail: String,
        /// From the attempt's start to its exit.
        duration: Duration,
    },
    /// The command exited with another status.
    Failed {
        exit_code: i32,
        tail: String,
        /// A retryable pattern matched a line of the output.
        retryable: bool,
        /// A sentence for people: the code, a signal, the matched pattern.
        detail: String,
    },
    /// The step ran past its timeout and its process group was killed.
    TimedOut { tail: String },
    /// A cancel was asked for and the process group was killed.
    Cancelled { tail: String },
    /// The process is gone without an exit status (killed from outside, machine rebooted,
    /// or it never got going). Running it again may help.
    Lost { tail: String },
}

impl Outcome {
    /// The last part of the output, whatever the outcome.
    pub fn tail(&self) -> &str {
        match self {
            Outcome::Succeeded { tail, .. }
            | Outcome::Failed { tail, .. }
            | Outcome::TimedOut { tail }
            | Outcome::Cancelled { tail }
            | Outcome::Lost { tail } => tail,
        }
    }
}

/// A step attempt this process spawned. The wrapper is our child until it exits, and an
/// unreaped child answers `kill(pid, 0)` as a zombie, so its liveness comes from the reaper.
#[derive(Debug, Clone)]
struct OwnChild {
    pid: u32,
    /// Becomes `true` once the reaper has collected the wrapper's exit.
    exited: watch::Receiver<bool>,
}

/// Runs step attempts as detached processes under one root directory.
#[derive(Debug)]
pub struct LocalRunner {
    /// `<attempts_root>`, absolute, so the path the wrapper records in its environment is the
    /// same one a restarted runner compares against.
    root: PathBuf,
    /// How much output an [`Outcome`] carries.
    tail_bytes: usize,
    /// Time between SIGTERM and SIGKILL to a process group.
    kill_grace: Duration,
    /// Wrappers spawned by this runner, by attempt directory.
    own: Arc<Mutex<HashMap<PathBuf, OwnChild>>>,
}

impl LocalRunner {
    /// A runner keeping attempts under `attempts_root` (created on first start) and
    /// `output_tail_bytes` of output in memory per attempt.
    pub fn new(attempts_root: impl Into<PathBuf>, output_tail_bytes: usize) -> LocalRunner {
        let root: PathBuf = attempts_root.into();
        LocalRunner {
            root: std::path::absolute(&root).unwrap_or(root),
            tail_bytes: output_tail_bytes,
            kill_grace: DEFAULT_KILL_GRACE,
            own: Arc::default(),
        }
    }

    /// Sets the time a signalled process group gets between SIGTERM and SIGKILL.
    pub fn with_kill_grace(mut self, grace: Duration) -> LocalRunner {
        self.kill_grace = grace;
        self
    }

    /// The root all attempt directories live under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<case_id>/<step>/<attempt>`, after checking that the ids are plain names.
    pub fn attempt_dir(&self, step: &StepRef) -> Result<PathBuf, LocalError> {
        check_id("case id", step.case_id.as_str())?;
        check_id("step", &step.step)?;
        Ok(self
            .root
            .join(step.case_id.as_str())
            .join(&step.step)
            .join(step.attempt.to_string()))
    }

    /// Starts the attempt if its directory does not exist yet; otherwise attaches to it: a
    /// finished attempt gives a handle that resolves at once, a running one is watched, and one
    /// whose process is gone without an exit status resolves as [`Outcome::Lost`].
    pub async fn start_or_attach(&self, request: &ExecuteRequest) -> Result<RunHandle, LocalError> {
        let dir = self.attempt_dir(&request.step)?;
        let patterns = Patterns::compile(request)?;
        let own = self.own.lock().get(&dir).cloned();
        if let Some(own) = own {
            return Ok(self
                .handle(
                    request,
                    dir,
                    Some(own.pid),
                    Some(own.exited),
                    true,
                    patterns,
                )
                .await);
        }
        let claim = {
            let (dir, request) = (dir.clone(), request.clone());
            blocking(move || claim(&dir, &request)).await?
        };
        match claim {
            Claim::Claimed(log) => self.spawn(request, dir, log, patterns).await,
            Claim::Exists => {
                let pid = self.wait_for_pid(&dir).await?;
                Ok(self.handle(request, dir, pid, None, true, patterns).await)
            }
        }
    }

    /// Kills the process group of a running attempt: SIGTERM, then SIGKILL after the kill
    /// grace. The `cancelled` record makes every waiter (also one attached after a restart)
    /// report [`Outcome::Cancelled`]. A cancel that arrives before its attempt was started
    /// claims the attempt with that record, so it never starts (it resolves as cancelled).
    /// Returns whether a running process was signalled.
    pub async fn cancel(&self, step: &StepRef) -> Result<bool, LocalError> {
        let dir = self.attempt_dir(step)?;
        let own = self.own.lock().get(&dir).cloned();
        let pid = {
            let dir = dir.clone();
            blocking(move || -> Result<Option<u32>, LocalError> {
                if dir.join(EXIT).exists() {
                    return Ok(None);
                }
                if !dir.is_dir() {
                    let parent = dir.parent().expect("an attempt dir has parents");
                    fs::create_dir_all(parent).map_err(io_err(parent))?;
                    match fs::create_dir(&dir) {
                        Ok(()) => write_atomic(&dir, STARTED, now_ms().to_string().as_bytes())?,
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(io_err(&dir)(e)),
                    }
                }
                write_atomic(&dir, CANCELLED, now_ms().to_string().as_bytes())?;
                Ok(read_pid(&dir))
            })
            .await?
        };
        let Some(pid) = own.as_ref().map(|o| o.pid).or(pid) else {
            return Ok(false);
        };
        let alive = |dir: &Path| match &own {
            Some(o) => !*o.exited.borrow(),
            None => pid_alive(pid, dir),
        };
        if !alive(&dir) {
            return Ok(false);
        }
        tracing::info!(attempt = %label(step), pid, "cancelling a running step");
        signal_group(pid, libc::SIGTERM);
        let deadline = tokio::time::Instant::now() + self.kill_grace;
        while group_alive(pid) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if group_alive(pid) {
            signal_group(pid, libc::SIGKILL);
        }
        Ok(true)
    }

    /// Every attempt whose outcome has not been published yet, sorted by case, step and
    /// attempt: what a starting executor reattaches to. An attempt without `request.json`
    /// (mqic died right after claiming it, or a cancel came first) is listed with only its
    /// step reference, host `local` and an empty command, so it is still reported (as lost
    /// or cancelled).
    pub async fn unreported(&self) -> Result<Vec<ExecuteRequest>, LocalError> {
        let root = self.root.clone();
        blocking(move || unreported(&root)).await
    }

    /// Records that the attempt's outcome has been published, so a restart does not report
    /// it again.
    pub async fn mark_reported(&self, step: &StepRef) -> Result<(), LocalError> {
        let dir = self.attempt_dir(step)?;
        self.own.lock().remove(&dir);
        blocking(move || write_atomic(&dir, REPORTED, now_ms().to_string().as_bytes())).await
    }

    /// Spawns the wrapper of a freshly claimed attempt.
    async fn spawn(
        &self,
        request: &ExecuteRequest,
        dir: PathBuf,
        log: File,
        patterns: Patterns,
    ) -> Result<RunHandle, LocalError> {
        let spawned = (|| {
            let stderr = log.try_clone()?;
            let mut command = tokio::process::Command::new("sh");
            command
                .arg(dir.join(RUN))
                .current_dir(&dir)
                .env("MQIC_CASE_ID", request.step.case_id.as_str())
                .env("MQIC_STEP", &request.step.step)
                .env("MQIC_ATTEMPT", request.step.attempt.to_string())
                .env("MQIC_ATTEMPT_DIR", &dir)
                .stdin(Stdio::null())
                .stdout(Stdio::from(log))
                .stderr(Stdio::from(stderr));
            match request.gpu_id {
                Some(gpu) => command.env("MQIC_GPU_ID", gpu.to_string()),
                None => command.env_remove("MQIC_GPU_ID"),
            };
            // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
            // Its own session makes the wrapper immune to mqic's terminal and death, and makes
            // its pid the process group id that timeout and cancel signal.
            unsafe {
                command.pre_exec(|| {
                    if libc::setsid() == -1 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            command.spawn()
        })();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let reason = e.to_string();
                let d = dir.clone();
                let r = reason.clone();
                blocking(move || write_atomic(&d, SPAWN_FAILED, r.as_bytes())).await?;
                return Err(LocalError::Spawn(reason));
            }
        };
        let pid = child.id().unwrap_or(0);
        let (tx, exited) = watch::channel(false);
        tokio::spawn(async move {
            let _ = child.wait().await;
            let _ = tx.send(true);
        });
        self.own.lock().insert(
            dir.clone(),
            OwnChild {
                pid,
                exited: exited.clone(),
            },
        );
        tracing::info!(attempt = %label(&request.step), pid, "step started");
        Ok(self
            .handle(request, dir, Some(pid), Some(exited), false, patterns)
            .await)
    }

    /// Waits (bounded) for the pid file of an attempt someone else started. `None` when
    /// there is no pid within the grace after the attempt's start, or it failed to spawn.
    async fn wait_for_pid(&self, dir: &Path) -> Result<Option<u32>, LocalError> {
        let d = dir.to_path_buf();
        let (failed, started) = blocking(move || {
            let failed = fs::read_to_string(d.join(SPAWN_FAILED)).ok();
            (failed, started_at(&d))
        })
        .await;
        if let Some(reason) = failed {
            return Err(LocalError::Spawn(reason));
        }
        let deadline = started + PID_GRACE;
        for _ in 0..(PID_GRACE.as_millis() / 50 + 1) {
            let d = dir.to_path_buf();
            let (pid, ended) = blocking(move || {
                let ended = d.join(EXIT).exists() || d.join(CANCELLED).exists();
                (read_pid(&d), ended)
            })
            .await;
            if pid.is_some() || ended || SystemTime::now() >= deadline {
                return Ok(pid);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(None)
    }

    async fn handle(
        &self,
        request: &ExecuteRequest,
        dir: PathBuf,
        pid: Option<u32>,
        own: Option<watch::Receiver<bool>>,
        reattached: bool,
        patterns: Patterns,
    ) -> RunHandle {
        let tail_bytes = self.tail_bytes;
        let d = dir.clone();
        let (started, finished, output) = blocking(move || {
            let finished = d.join(EXIT).exists();
            let output = Output::open(d.join(OUTPUT), !reattached, tail_bytes, patterns);
            (started_at(&d), finished, output)
        })
        .await;
        let timeout = (request.timeout_secs > 0).then(|| Duration::from_secs(request.timeout_secs));
        RunHandle {
            step: request.step.clone(),
            pid,
            reattached,
            finished,
            watch: Watch {
                dir,
                pid,
                own,
                deadline: timeout.map(|t| started + t),
                started,
                kill_grace: self.kill_grace,
                output,
                ending: None,
                verified: false,
            },
        }
    }
}

/// A started or attached attempt; [`RunHandle::wait`] follows it to its end.
#[derive(Debug)]
pub struct RunHandle {
    step: StepRef,
    pid: Option<u32>,
    reattached: bool,
    finished: bool,
    watch: Watch,
}

impl RunHandle {
    /// Which attempt this handle follows.
    pub fn step(&self) -> &StepRef {
        &self.step
    }

    /// The wrapper's pid (and process group id), when known.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The attempt was already there (running or finished), not started by this call.
    pub fn reattached(&self) -> bool {
        self.reattached
    }

    /// The attempt had already exited when this handle was made.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Follows the attempt until it ends: calls `progress` for each larger progress fraction,
    /// enforces the timeout (counted from the attempt's start, so it survives a restart), and
    /// returns the outcome. Dropping the future stops watching; the process keeps running.
    pub async fn wait(self, mut progress: impl FnMut(Progress)) -> Outcome {
        let mut watch = self.watch;
        let emit = !self.finished;
        // When we spawned the wrapper, its exit wakes us at once instead of at the next tick.
        let mut exited = watch.own.clone();
        loop {
            let joined = tokio::task::spawn_blocking(move || {
                let result = watch.poll(SystemTime::now());
                (watch, result)
            })
            .await;
            let (w, (lines, outcome)) = match joined {
                Ok(r) => r,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                // The runtime is shutting down: no outcome is known, so none is claimed.
                Err(_) => return std::future::pending().await,
            };
            watch = w;
            if emit {
                lines.into_iter().for_each(&mut progress);
            }
            if let Some(outcome) = outcome {
                return outcome;
            }
            let pending_exit = exited.as_mut().filter(|rx| !*rx.borrow());
            match pending_exit {
                Some(rx) => {
                    tokio::select! {
                        _ = tokio::time::sleep(POLL) => {}
                        _ = rx.changed() => {}
                    }
                }
                None => tokio::time::sleep(POLL).await,
            }
        }
    }
}

/// Why this handle is ending the process group, and since when.
#[derive(Debug, Clone, Copy)]
enum Ending {
    TimedOut(SystemTime),
    Cancelled(SystemTime),
}

/// The state a waiting handle polls with (moved into `spawn_blocking` for each poll).
#[derive(Debug)]
struct Watch {
    dir: PathBuf,
    pid: Option<u32>,
    own: Option<watch::Receiver<bool>>,
    started: SystemTime,
    deadline: Option<SystemTime>,
    kill_grace: Duration,
    output: Output,
    ending: Option<Ending>,
    /// The wrapper was seen alive and verified as this attempt's, so its group may be
    /// signalled (never a group whose leader pid was reused by something else).
    verified: bool,
}

impl Watch {
    fn wrapper_alive(&self) -> bool {
        match (&self.own, self.pid) {
            (Some(own), _) => !*own.borrow(),
            (None, Some(pid)) => pid_alive(pid, &self.dir),
            (None, None) => false,
        }
    }

    /// One look at the attempt: new output, its exit, liveness, the timeout.
    fn poll(&mut self, now: SystemTime) -> (Vec<Progress>, Option<Outcome>) {
        let progress = self.output.read_new(READ_PER_POLL);
        let cancelled = mtime(&self.dir.join(CANCELLED));
        if self.ending.is_none() && self.dir.join(TIMED_OUT).exists() {
            // Recorded by a runner before a restart; the outcome stays TimedOut.
            self.ending = Some(Ending::TimedOut(
                mtime(&self.dir.join(TIMED_OUT)).unwrap_or(now),
            ));
        }
        if let (Some(code), None, None) = (read_exit(&self.dir), cancelled, self.ending) {
            return (progress, Some(self.exited(code)));
        }
        if !self.wrapper_alive() {
            if let (Some(pid), true) = (self.pid, self.verified) {
                let since = match (self.ending, cancelled) {
                    (Some(Ending::TimedOut(t) | Ending::Cancelled(t)), _) | (None, Some(t)) => {
                        Some(t)
                    }
                    (None, None) => None,
                };
                // The wrapper is gone but the rest of its group (a grandchild ignoring SIGTERM)
                // may not be: give it the grace, then SIGKILL, before reporting.
                if let Some(since) = since {
                    if group_alive(pid) {
                        if elapsed(since, now) < self.kill_grace {
                            return (progress, None);
                        }
                        signal_group(pid, libc::SIGKILL);
                    }
                }
            }
            let code = read_exit(&self.dir);
            self.output.read_to_end();
            let tail = self.output.tail();
            let outcome = match (cancelled, self.ending, code) {
                (Some(_), _, _) | (None, Some(Ending::Cancelled(_)), _) => {
                    Outcome::Cancelled { tail }
                }
                (None, Some(Ending::TimedOut(_)), _) => Outcome::TimedOut { tail },
                (None, None, Some(code)) => return (progress, Some(self.exited(code))),
                (None, None, None) => Outcome::Lost { tail },
            };
            return (progress, Some(outcome));
        }
        self.verified = true;
        let pid = self.pid.expect("a live wrapper has a pid");
        if self.ending.is_none() {
            if let Some(at) = cancelled {
                signal_group(pid, libc::SIGTERM);
                self.ending = Some(Ending::Cancelled(at));
            } else if self.deadline.is_some_and(|d| now >= d) {
                tracing::warn!(dir = %self.dir.display(), pid, "step timed out; killing its group");
                if let Err(e) = write_atomic(&self.dir, TIMED_OUT, now_ms().to_string().as_bytes())
                {
                    tracing::warn!(error = %e, "cannot record the timeout");
                }
                signal_group(pid, libc::SIGTERM);
                self.ending = Some(Ending::TimedOut(now));
            }
        }
        if let Some(Ending::TimedOut(since) | Ending::Cancelled(since)) = self.ending {
            if elapsed(since, now) >= self.kill_grace {
                signal_group(pid, libc::SIGKILL);
            }
        }
        (progress, None)
    }

    fn exited(&mut self, code: i32) -> Outcome {
        self.output.read_to_end();
        let tail = self.output.tail();
        if code == 0 {
            let ended = mtime(&self.dir.join(EXIT)).unwrap_or_else(SystemTime::now);
            return Outcome::Succeeded {
                exit_code: 0,
                tail,
                duration: ended.duration_since(self.started).unwrap_or_default(),
            };
        }
        let mut detail = format!("exited with code {code}");
        if (129..160).contains(&code) {
            detail.push_str(&format!(" (killed by signal {})", code - 128));
        }
        if let Some(p) = &self.output.matched_retryable {
            detail.push_str(&format!("; output matched the retryable pattern `{p}`"));
        }
        Outcome::Failed {
            exit_code: code,
            tail,
            retryable: self.output.matched_retryable.is_some(),
            detail,
        }
    }
}

/// The compiled patterns of a request.
#[derive(Debug, Default)]
pub(crate) struct Patterns {
    progress: Vec<Regex>,
    retryable: Vec<Regex>,
}

impl Patterns {
    pub(crate) fn compile(request: &ExecuteRequest) -> Result<Patterns, LocalError> {
        let compile = |list: &[String]| {
            list.iter()
                .map(|p| {
                    Regex::new(p).map_err(|e| LocalError::BadPattern {
                        pattern: p.clone(),
                        reason: e.to_string().lines().last().unwrap_or("").to_string(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Patterns {
            progress: compile(&request.progress_patterns)?,
            retryable: compile(&request.retryable_patterns)?,
        })
    }

    /// The progress fraction a line shows: `(done, total)` from two captures, a percentage
    /// from one.
    fn fraction(&self, line: &str) -> Option<f64> {
        self.progress.iter().find_map(|re| {
            let caps = re.captures(line)?;
            let num = |i: usize| caps.get(i)?.as_str().trim().parse::<f64>().ok();
            let f = if re.captures_len() >= 3 {
                let total = num(2).filter(|t| *t > 0.0)?;
                num(1)? / total
            } else {
                num(1)? / 100.0
            };
            f.is_finite().then(|| f.clamp(0.0, 1.0))
        })
    }
}

/// Follows `output.log`: complete lines go through the patterns, the last bytes are kept.
#[derive(Debug)]
pub(crate) struct Output {
    path: PathBuf,
    file: Option<File>,
    offset: u64,
    /// Reading started mid-file: the bytes up to the first line break are a fragment.
    skip_fragment: bool,
    line: Vec<u8>,
    tail: Vec<u8>,
    tail_cap: usize,
    patterns: Patterns,
    last_fraction: Option<f64>,
    /// The first retryable pattern that matched a line.
    matched_retryable: Option<String>,
}

impl Output {
    /// From the start when we started the attempt; from the last [`ATTACH_WINDOW`] bytes when
    /// attaching to one that has been running (or finished) without us.
    fn open(path: PathBuf, from_start: bool, tail_cap: usize, patterns: Patterns) -> Output {
        let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let offset = if from_start {
            0
        } else {
            len.saturating_sub(ATTACH_WINDOW.max(tail_cap as u64))
        };
        Output {
            path,
            file: None,
            offset,
            skip_fragment: offset > 0,
            line: Vec::new(),
            tail: Vec::new(),
            tail_cap,
            patterns,
            last_fraction: None,
            matched_retryable: None,
        }
    }

    /// Reads up to `limit` new bytes; returns the progress they show.
    fn read_new(&mut self, limit: usize) -> Vec<Progress> {
        let mut progress = Vec::new();
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(f) => self.file = Some(f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return progress,
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot open output");
                    return progress;
                }
            }
        }
        let mut file = self.file.take().expect("opened above");
        let mut buf = vec![0u8; 64 << 10];
        let mut read = 0;
        if let Err(e) = file.seek(SeekFrom::Start(self.offset)) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot seek output");
            self.file = Some(file);
            return progress;
        }
        while read < limit {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot read output");
                    break;
                }
            };
            read += n;
            self.offset += n as u64;
            self.consume(&buf[..n], &mut progress);
        }
        self.file = Some(file);
        progress
    }

    /// Reads everything that is left and treats a final unterminated line as a line.
    /// An output fed by [`Output::feed`] rather than read from a file (a remote log);
    /// `mid_line`: the first bytes fed may be the end of a line seen only in part.
    pub(crate) fn fed(tail_cap: usize, patterns: Patterns, mid_line: bool) -> Output {
        Output {
            path: PathBuf::new(),
            file: None,
            offset: 0,
            skip_fragment: mid_line,
            line: Vec::new(),
            tail: Vec::new(),
            tail_cap,
            patterns,
            last_fraction: None,
            matched_retryable: None,
        }
    }

    /// Takes new bytes of a fed output; returns the progress they show and the complete
    /// lines among them.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Vec<Progress> {
        let mut progress = Vec::new();
        self.consume(bytes, &mut progress);
        progress
    }

    /// A fed output has ended: a final unterminated line counts as a line.
    pub(crate) fn finish(&mut self) {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.on_line(&line, &mut Vec::new());
        }
    }

    /// The first retryable pattern that matched a line.
    pub(crate) fn matched_retryable(&self) -> Option<&str> {
        self.matched_retryable.as_deref()
    }

    fn read_to_end(&mut self) {
        for _ in 0..1024 {
            let before = self.offset;
            self.read_new(READ_PER_POLL);
            if self.offset == before {
                break;
            }
        }
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.on_line(&line, &mut Vec::new());
        }
    }

    fn consume(&mut self, mut bytes: &[u8], progress: &mut Vec<Progress>) {
        if self.skip_fragment {
            match bytes.iter().position(|b| *b == b'\n' || *b == b'\r') {
                Some(i) => {
                    bytes = &bytes[i + 1..];
                    self.skip_fragment = false;
                }
                None => return,
            }
        }
        self.tail.extend_from_slice(bytes);
        if self.tail.len() > 2 * self.tail_cap.max(4096) {
            let cut = self.tail.len() - self.tail_cap;
            self.tail.drain(..cut);
        }
        // `\r` ends a line too: progress bars redraw one line with carriage returns.
        for piece in bytes.split_inclusive(|b| *b == b'\n' || *b == b'\r') {
            match piece.last() {
                Some(b'\n' | b'\r') => {
                    self.line.extend_from_slice(&piece[..piece.len() - 1]);
                    let line = std::mem::take(&mut self.line);
                    self.on_line(&line, progress);
                }
                _ => {
                    self.line.extend_from_slice(piece);
                    if self.line.len() > MAX_LINE {
                        let line = std::mem::take(&mut self.line);
                        self.on_line(&line, progress);
                    }
                }
            }
        }
    }

    fn on_line(&mut self, line: &[u8], progress: &mut Vec<Progress>) {
        if line.is_empty() {
            return;
        }
        let line = String::from_utf8_lossy(line);
        if self.matched_retryable.is_none() {
            if let Some(re) = self.patterns.retryable.iter().find(|re| re.is_match(&line)) {
                self.matched_retryable = Some(re.as_str().to_string());
            }
        }
        if let Some(f) = self.patterns.fraction(&line) {
            if self.last_fraction.is_none_or(|last| f > last) {
                self.last_fraction = Some(f);
                progress.push(Progress {
                    fraction: f,
                    line: line.into_owned(),
                });
            }
        }
    }

    /// The last `tail_cap` bytes, starting on a character boundary.
    pub(crate) fn tail(&self) -> String {
        let mut bytes = &self.tail[self.tail.len().saturating_sub(self.tail_cap)..];
        while let Some((first, rest)) = bytes.split_first() {
            if first & 0b1100_0000 != 0b1000_0000 {
                break;
            }
            bytes = rest;
        }
        String::from_utf8_lossy(bytes).into_owned()
    }
}

/// What looking for an attempt directory found.
enum Claim {
    /// We created it: the attempt is ours to start; the log is open for appending.
    Claimed(File),
    /// It was there already.
    Exists,
}

fn claim(dir: &Path, request: &ExecuteRequest) -> Result<Claim, LocalError> {
    if dir.exists() {
        return Ok(Claim::Exists);
    }
    if let Some(w) = &request.workdir {
        if !Path::new(w).is_dir() {
            return Err(LocalError::Workdir(w.clone()));
        }
    }
    let parent = dir.parent().expect("an attempt dir has parents");
    fs::create_dir_all(parent).map_err(io_err(parent))?;
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(Claim::Exists),
        Err(e) => return Err(io_err(dir)(e)),
    }
    write_atomic(dir, STARTED, now_ms().to_string().as_bytes())?;
    let json = serde_json::to_vec_pretty(request).expect("a request always serializes");
    write_atomic(dir, REQUEST, &json)?;
    write_atomic(dir, RUN, wrapper_script(request).as_bytes())?;
    let log_path = dir.join(OUTPUT);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io_err(&log_path))?;
    Ok(Claim::Claimed(log))
}

/// The wrapper: it records its pid, runs the command with `sh -c` in the workdir, then records
/// the exit status. Every value is shell-quoted by the one quoting function.
fn wrapper_script(request: &ExecuteRequest) -> String {
    let enter = match &request.workdir {
        Some(w) => format!(
            "cd -- {q} || {{\n\
             \techo \"mqic: cannot enter the workdir\" {q} >&2\n\
             \texit_status 126\n\
             }}\n",
            q = shell_quote(w)
        ),
        None => String::new(),
    };
    format!(
        "# mqic step wrapper for {case}/{step}/{attempt}\n\
         d=\"$MQIC_ATTEMPT_DIR\"\n\
         cd \"$d\" || exit 125\n\
         echo $$ > pid.tmp && mv -f pid.tmp pid\n\
         exit_status() {{\n\
         \techo \"$1\" > \"$d/exit.tmp\" && mv -f \"$d/exit.tmp\" \"$d/exit\"\n\
         \texit \"$1\"\n\
         }}\n\
         # a cancel that arrived before the wrapper got going wins\n\
         [ -e cancelled ] && exit 130\n\
         {enter}\
         sh -c {command}\n\
         exit_status $?\n",
        case = request.step.case_id,
        step = request.step.step,
        attempt = request.step.attempt,
        command = shell_quote(&request.command),
    )
}

fn unreported(root: &Path) -> Result<Vec<ExecuteRequest>, LocalError> {
    unreported_in(root, false)
}

/// The unreported attempts under `root`: those run here (`remote` false) or those run on an
/// SSH host (`remote` true, told apart by their [`REMOTE_HOST`] record).
pub(crate) fn unreported_in(root: &Path, remote: bool) -> Result<Vec<ExecuteRequest>, LocalError> {
    let mut found = Vec::new();
    let entries = |dir: &Path| -> Result<Vec<(String, PathBuf)>, LocalError> {
        let mut out = Vec::new();
        let read = match fs::read_dir(dir) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err(dir)(e)),
        };
        for entry in read {
            let entry = entry.map_err(io_err(dir))?;
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                if let Ok(name) = entry.file_name().into_string() {
                    out.push((name, entry.path()));
                }
            }
        }
        out.sort();
        Ok(out)
    };
    for (case, case_dir) in entries(root)? {
        if check_id("case id", &case).is_err() {
            continue;
        }
        for (step, step_dir) in entries(&case_dir)? {
            if check_id("step", &step).is_err() {
                continue;
            }
            for (attempt, dir) in entries(&step_dir)? {
                let Ok(n) = attempt.parse::<u32>() else {
                    continue;
                };
                if n.to_string() != attempt
                    || dir.join(REPORTED).exists()
                    || dir.join(REMOTE_HOST).exists() != remote
                {
                    continue;
                }
                let step_ref = StepRef {
                    case_id: CaseId(case.clone()),
                    step: step.clone(),
                    attempt: n,
                };
                let request = fs::read(dir.join(REQUEST))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<ExecuteRequest>(&b).ok());
                found.push(match request {
                    Some(mut r) => {
                        r.step = step_ref;
                        r
                    }
                    None => ExecuteRequest {
                        step: step_ref,
                        host: "local".into(),
                        command: String::new(),
                        workdir: None,
                        gpu_id: None,
                        timeout_secs: 0,
                        progress_patterns: Vec::new(),
                        retryable_patterns: Vec::new(),
                    },
                });
            }
        }
    }
    Ok(found)
}

/// `case/step/attempt`, how logs name an attempt.
pub(crate) fn label(step: &StepRef) -> String {
    format!("{}/{}/{}", step.case_id, step.step, step.attempt)
}

/// A case id or step name is one plain path part: no separators, no `.`/`..`, no hidden names.
pub(crate) fn check_id(what: &'static str, value: &str) -> Result<(), LocalError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_ID_LEN
        && !value.starts_with('.')
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(LocalError::InvalidId {
            what,
            value: value.to_string(),
        })
    }
}

/// Writes a small file whole: to `<name>.tmp`, then renamed over `<name>`.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), LocalError> {
    let tmp = dir.join(format!("{name}.tmp"));
    fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    let path = dir.join(name);
    fs::rename(&tmp, &path).map_err(io_err(&path))
}

fn read_pid(dir: &Path) -> Option<u32> {
    fs::read_to_string(dir.join(PID))
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 1)
}

fn read_exit(dir: &Path) -> Option<i32> {
    fs::read_to_string(dir.join(EXIT)).ok()?.trim().parse().ok()
}

/// When the attempt started: the `started` record, else the directory's mtime.
pub(crate) fn started_at(dir: &Path) -> SystemTime {
    fs::read_to_string(dir.join(STARTED))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
        .or_else(|| mtime(dir))
        .unwrap_or_else(SystemTime::now)
}

fn mtime(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

pub(crate) fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}

fn elapsed(since: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(since).unwrap_or_default()
}

/// Whether `pid` is alive and is this attempt's wrapper. After a reboot or a long downtime
/// the pid may belong to something else entirely; where `/proc` exists the process must
/// carry this attempt's `MQIC_ATTEMPT_DIR` (a zombie's environment reads empty, so a zombie
/// counts as gone too).
fn pid_alive(pid: u32, dir: &Path) -> bool {
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if raw <= 1 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    if unsafe { libc::kill(raw, 0) } != 0
        && io::Error::last_os_error().raw_os_error() != Some(libc::EPERM)
    {
        return false;
    }
    let mut expected = b"MQIC_ATTEMPT_DIR=".to_vec();
    expected.extend_from_slice(dir.as_os_str().as_encoded_bytes());
    match fs::read(format!("/proc/{pid}/environ")) {
        Ok(env) => env.split(|b| *b == 0).any(|kv| kv == expected.as_slice()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => !Path::new("/proc/self").exists(),
        // Unreadable (another user): kill(0) said it exists, which is all we can know.
        Err(_) => true,
    }
}

/// Whether any process of the group led by `pid` is still there. A pid is never handed to a
/// new process while a group of that id exists, so this cannot see a stranger.
fn group_alive(pid: u32) -> bool {
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 to a process group only checks for existence.
    raw > 1 && unsafe { libc::kill(-raw, 0) } == 0
}

fn signal_group(pid: u32, signal: libc::c_int) {
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return;
    };
    if raw > 1 {
        // SAFETY: a negative pid signals the step's own process group (the wrapper called
        // setsid, so the group id is its pid); ESRCH when it is already gone is fine.
        unsafe { libc::kill(-raw, signal) };
    }
}

/// Runs filesystem work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    /// Every wait in these tests is bounded by this; a hang fails the test.
    const BOUND: Duration = Duration::from_secs(30);

    /// A shell snippet that waits (bounded) until `file` exists: how a test holds a step
    /// running and then lets it finish.
    fn until(file: &Path) -> String {
        format!(
            "i=0; while [ ! -e {f} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done",
            f = shell_quote(&file.display().to_string())
        )
    }

    fn request(attempt: u32, command: &str) -> ExecuteRequest {
        ExecuteRequest {
            step: StepRef {
                case_id: "case-1".into(),
                step: "simulate".into(),
                attempt,
            },
            host: "local".into(),
            command: command.into(),
            workdir: None,
            gpu_id: None,
            timeout_secs: 600,
            progress_patterns: Vec::new(),
            retryable_patterns: Vec::new(),
        }
    }

    fn runner(tmp: &tempfile::TempDir) -> LocalRunner {
        LocalRunner::new(tmp.path().join("attempts"), 4096)
            .with_kill_grace(Duration::from_millis(300))
    }

    async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
        tokio::time::timeout(BOUND, fut)
            .await
            .unwrap_or_else(|_| panic!("{what}: not done within {BOUND:?}"))
    }

    async fn poll_until(what: &str, mut check: impl FnMut() -> bool) {
        within(what, async {
            while !check() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }

    fn read_pid_file(path: &Path) -> Option<i32> {
        fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// Gone, or a zombie nobody has reaped yet (this container's init may not reap).
    fn process_gone(pid: i32) -> bool {
        // SAFETY: signal 0 only checks for existence.
        if unsafe { libc::kill(pid, 0) } != 0 {
            return true;
        }
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
    }

    #[tokio::test]
    async fn exit_zero_succeeds_with_the_output_tail_and_the_step_environment() {
        let tmp = tempfile::tempdir().unwrap();
        let workdir = tmp.path().join("work dir");
        fs::create_dir(&workdir).unwrap();
        let mut req = request(
            1,
            "echo \"$MQIC_CASE_ID $MQIC_STEP $MQIC_ATTEMPT gpu=$MQIC_GPU_ID\"; pwd; \
             echo to-stderr >&2",
        );
        req.workdir = Some(workdir.display().to_string());
        req.gpu_id = Some(2);
        let runner = runner(&tmp);
        let handle = runner.start_or_attach(&req).await.unwrap();
        assert!(!handle.reattached());
        assert!(handle.pid().is_some());
        let outcome = within("wait", handle.wait(|_| {})).await;
        let Outcome::Succeeded {
            exit_code, tail, ..
        } = outcome
        else {
            panic!("expected success, got {outcome:?}");
        };
        assert_eq!(exit_code, 0);
        assert!(tail.contains("case-1 simulate 1 gpu=2"), "{tail}");
        assert!(tail.contains(&format!("{}\n", workdir.display())), "{tail}");
        assert!(tail.contains("to-stderr"), "{tail}");
        let dir = runner.attempt_dir(&req.step).unwrap();
        assert_eq!(fs::read_to_string(dir.join(EXIT)).unwrap().trim(), "0");
        let stored: ExecuteRequest =
            serde_json::from_slice(&fs::read(dir.join(REQUEST)).unwrap()).unwrap();
        assert_eq!(stored, req);
    }

    #[tokio::test]
    async fn a_non_zero_exit_fails_with_its_code_and_is_retryable_only_on_a_pattern() {
        let tmp = tempfile::tempdir().unwrap();
        let runner = runner(&tmp);
        let mut req = request(1, "echo 'Total execution time: 3 seconds'; exit 3");
        req.retryable_patterns = vec!["No free GPU".into()];
        let outcome = within(
            "wait",
            runner.start_or_attach(&req).await.unwrap().wait(|_| {}),
        )
        .await;
        match outcome {
            Outcome::Failed {
                exit_code,
                retryable,
                detail,
                tail,
            } => {
                assert_eq!(exit_code, 3);
                assert!(!retryable);
                assert!(detail.contains("code 3"), "{detail}");
                assert!(tail.contains("Total execution time"), "{tail}");
            }
            other => panic!("expected a failure, got {other:?}"),
        }

        let mut req = request(2, "echo 'ERROR: No free GPU remains'; exit 1");
        req.retryable_patterns = vec!["No free GPU".into()];
        let outcome = within(
            "wait",
            runner.start_or_attach(&req).await.unwrap().wait(|_| {}),
        )
        .await;
        assert!(
            matches!(
                outcome,
                Outcome::Failed {
                    exit_code: 1,
                    retryable: true,
                    ..
                }
            ),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn progress_lines_report_each_larger_fraction_once() {
        let tmp = tempfile::tempdir().unwrap();
        let runner = runner(&tmp);
        let mut req = request(
            1,
            "for i in 1 3 2 3; do echo \"Generating particles for ($i of 10 batches)\"; done; \
             printf 'Generating particles for (7 of 10'; sleep 0.3; printf ' batches)\\n'; \
             printf 'Progress: 90%%\\r'; echo 'Progress: 10%'; echo done",
        );
        req.progress_patterns = vec![
            r"Generating particles for \((\d+) of (\d+) batches\)".into(),
            r"Progress: (\d+)%".into(),
        ];
        let mut seen = Vec::new();
        let outcome = within(
            "wait",
            runner
                .start_or_attach(&req)
                .await
                .unwrap()
                .wait(|p| seen.push(p)),
        )
        .await;
        assert!(matches!(outcome, Outcome::Succeeded { .. }), "{outcome:?}");
        let fractions: Vec<f64> = seen.iter().map(|p| p.fraction).collect();
        assert_eq!(fractions, vec![0.1, 0.3, 0.7, 0.9]);
        assert_eq!(seen[2].line, "Generating particles for (7 of 10 batches)");
    }

    #[tokio::test]
    async fn a_chatty_step_never_blocks_and_its_tail_stays_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let runner = runner(&tmp);
        let req = request(
            1,
            "yes 'a chatty line of Monte Carlo output' | head -c 5000000; echo; echo last-line",
        );
        let outcome = within(
            "wait",
            runner.start_or_attach(&req).await.unwrap().wait(|_| {}),
        )
        .await;
        let Outcome::Succeeded { tail, .. } = outcome else {
            panic!("expected success, got {outcome:?}");
        };
        assert!(tail.len() <= 4096, "tail of {} bytes", tail.len());
        assert!(tail.ends_with("last-line\n"), "{tail:?}");
        let log = runner.attempt_dir(&req.step).unwrap().join(OUTPUT);
        assert!(fs::metadata(log).unwrap().len() >= 5_000_000);
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_group_even_a_grandchild_ignoring_sigterm() {
        let tmp = tempfile::tempdir().unwrap();
        let runner = runner(&tmp);
        let gc = tmp.path().join("grandchild.pid");
        let mut req = request(
            1,
            &format!(
                "trap '' TERM; sleep 60 & echo $! > {}; echo started; wait",
                shell_quote(&gc.display().to_string())
            ),
        );
        req.timeout_secs = 1;
        let outcome = within(
            "wait",
            runner.start_or_attach(&req).await.unwrap().wait(|_| {}),
        )
        .await;
        assert!(
            matches!(outcome, Outcome::TimedOut { ref tail } if tail.contains("started")),
            "{outcome:?}"
        );
        let gc_pid = read_pid_file(&gc).expect("the script wrote its grandchild's pid");
        poll_until("grandchild gone", || process_gone(gc_pid)).await;

        let again = LocalRunner::new(runner.root(), 4096);
        let outcome = within(
            "reattach",
            again.start_or_attach(&req).await.unwrap().wait(|_| {}),
        )
        .await;
        assert!(matches!(outcome, Outcome::TimedOut { .. }), "{outcome:?}");
    }

    #[tokio::test]
    async fn cancel_kills_the_group_and_every_waiter_reports_cancelled() {
        let tmp = tempfile::tempdir().unwrap();
        let runner = runner(&tmp);
        let gc = tmp.path().join("grandchild.pid");
        let req = request(
            1,
            &format!(
                "sleep 60 & echo $! > {}; {}",
                shell_quote(&gc.display().to_string()),
                until(&tmp.path().join("never"))
            ),
        );
        let handle = runner.start_or_attach(&req).await.unwrap();
        let waiter = tokio::spawn(handle.wait(|_| {}));
        poll_until("grandchild started", || read_pid_file(&gc).is_some()).await;
        assert!(runner.cancel(&req.step).await.unwrap());
        let outcome = within("wait", waiter).await.unwrap();
        assert!(matches!(outcome, Outcome::Cancelled { .. }), "{outcome:?}");
        let gc_pid = read_pid_file(&gc).unwrap();
        poll_until("grandchild gone", || process_gone(gc_pid)).await;

        assert!(
            !runner.cancel(&req.step).await.unwrap(),
            "nothing left to cancel"
        );
        let again = LocalRunner::new(runner.root(), 4096);
        let outcome = within(
            "reattach",
            again.start_or_attach(&req).await.unwrap().wait(|_| {}),
        )
        .await;
        assert!(matches!(outcome, Outcome::Cancelled { .. }), "{outcome:?}");
    }

    #[tokio::test]
    async fn a_cancel_before_the_start_keeps_the_attempt_from_ever_running() {
        let tmp = tempfile::tempdir().unwrap();
        let runner = runner(&tmp);
        let ran = tmp.path().join("ran");
        let req = request(
            2,
            &format!("touch {}", shell_quote(&ran.display().to_string())),
        );
        assert!(
            !runner.cancel(&req.step).await.unwrap(),
            "nothing was running"
        );
        let listed = runner.unreported().await.unwrap();
        assert_eq!(
            listed.iter().map(|r| &r.step).collect::<Vec<_>>(),
            vec![&req.step]
        );
        let handle = runner.start_or_attach(&req).await.unwrap();
        assert!(handle.reattached());
        let outcome = within("wait", handle.wait(|_| {})).await;
        assert!(matches!(outcome, Outcome::Cancelled { .. }), "{outcome:?}");
        assert!(!ran.exists(), "the command never ran");
    }

    #[tokio::test]
    async fn starting_a_running_attempt_again_attaches_instead_of_running_it_twice() {
        let tmp = tempfile::tempdir().unwrap();
        let runner = runner(&tmp);
        let ledger = tmp.path().join("ledger");
        let go = tmp.path().join("go");
        let req = request(
            1,
            &format!(
                "echo run >> {}; {}; echo finished",
                shell_quote(&ledger.display().to_string()),
                until(&go)
            ),
        );
        let first = runner.start_or_attach(&req).await.unwrap();
        poll_until("ledger written", || ledger.exists()).await;
        let second = runner.start_or_attach(&req).await.unwrap();
        assert!(second.reattached());
        assert_eq!(second.pid(), first.pid());
        fs::write(&go, "").unwrap();
        let (a, b) = within("both waits", async {
            tokio::join!(first.wait(|_| {}), second.wait(|_| {}))
        })
        .await;
        assert!(matches!(a, Outcome::Succeeded { .. }), "{a:?}");
        assert!(matches!(b, Outcome::Succeeded { .. }), "{b:?}");
        assert_eq!(fs::read_to_string(&ledger).unwrap(), "run\n");
    }

    #[tokio::test]
    async fn a_new_runner_reattaches_to_a_running_and_to_a_finished_attempt() {
        let tmp = tempfile::tempdir().unwrap();
        let ledger = tmp.path().join("ledger");
        let go = tmp.path().join("go");
        let mut req = request(
            3,
            &format!(
                "echo run >> {}; echo 'Generating particles for (1 of 4 batches)'; {}; \
                 echo 'Generating particles for (4 of 4 batches)'",
                shell_quote(&ledger.display().to_string()),
                until(&go)
            ),
        );
        req.progress_patterns = vec![r"\((\d+) of (\d+) batches\)".into()];
        let before = runner(&tmp);
        let first = before.start_or_attach(&req).await.unwrap();
        let pid = first.pid();
        let dir = before.attempt_dir(&req.step).unwrap();
        poll_until("pid recorded", || dir.join(PID).exists()).await;
        drop(first);
        drop(before);

        let after = runner(&tmp);
        assert_eq!(after.unreported().await.unwrap(), vec![req.clone()]);
        let handle = after.start_or_attach(&req).await.unwrap();
        assert!(handle.reattached());
        assert!(!handle.is_finished());
        assert_eq!(handle.pid(), pid);
        fs::write(&go, "").unwrap();
        let mut seen = Vec::new();
        let outcome = within("wait", handle.wait(|p| seen.push(p.fraction))).await;
        assert!(matches!(outcome, Outcome::Succeeded { .. }), "{outcome:?}");
        assert_eq!(seen.last(), Some(&1.0));
        assert_eq!(fs::read_to_string(&ledger).unwrap(), "run\n");

        let later = runner(&tmp);
        let handle = later.start_or_attach(&req).await.unwrap();
        assert!(handle.is_finished());
        let mut replayed = 0;
        let again = within("finished", handle.wait(|_| replayed += 1)).await;
        assert_eq!(again.tail(), outcome.tail());
        assert_eq!(replayed, 0, "a finished attempt replays no progress");
        assert_eq!(fs::read_to_string(&ledger).unwrap(), "run\n");

        later.mark_reported(&req.step).await.unwrap();
        assert!(later.unreported().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_wrapper_killed_from_outside_is_lost() {
        let tmp = tempfile::tempdir().unwrap();
        let runner = runner(&tmp);
        let go = tmp.path().join("go");
        let req = request(1, &until(&go));
        let handle = runner.start_or_attach(&req).await.unwrap();
        let pid = handle.pid().unwrap() as i32;
        // SAFETY: SIGKILL to the wrapper alone, as an OOM killer or an admin would.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let outcome = within("wait", handle.wait(|_| {})).await;
        fs::write(&go, "").unwrap();
        assert!(matches!(outcome, Outcome::Lost { .. }), "{outcome:?}");
    }

    #[tokio::test]
    async fn an_attempt_claimed_but_never_started_is_listed_and_lost() {
        let tmp = tempfile::tempdir().unwrap();
        let runner = runner(&tmp);
        let step = request(4, "").step;
        let dir = runner.attempt_dir(&step).unwrap();
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(STARTED), "0").unwrap();
        let listed = runner.unreported().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].step, step);
        let handle = runner.start_or_attach(&listed[0]).await.unwrap();
        let outcome = within("wait", handle.wait(|_| {})).await;
        assert!(matches!(outcome, Outcome::Lost { .. }), "{outcome:?}");
    }

    #[tokio::test]
    async fn ids_that_could_escape_the_root_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let runner = runner(&tmp);
        let long = "x".repeat(201);
        for bad in [
            "", ".", "..", "../x", "a/b", "/abs", ".hidden", "a b", "a\\b", "é", &long,
        ] {
            let mut req = request(1, "touch escaped");
            req.step.case_id = CaseId(bad.to_string());
            let err = runner.start_or_attach(&req).await.err();
            assert!(
                matches!(
                    err,
                    Some(LocalError::InvalidId {
                        what: "case id",
                        ..
                    })
                ),
                "{bad:?}: {err:?}"
            );
            assert!(runner.mark_reported(&req.step).await.is_err());
            assert!(runner.cancel(&req.step).await.is_err());
            let mut req = request(1, "touch escaped");
            req.step.step = bad.to_string();
            let err = runner.start_or_attach(&req).await.err();
            assert!(
                matches!(err, Some(LocalError::InvalidId { what: "step", .. })),
                "{bad:?}: {err:?}"
            );
        }
        assert!(!tmp.path().join("x").exists());
        assert!(!runner.root().exists(), "nothing was created");
        let mut ok = request(1, "true");
        ok.step.case_id = CaseId("G1_patient-2.plan".into());
        assert!(runner.attempt_dir(&ok.step).is_ok());
    }

    #[tokio::test]
    async fn a_bad_pattern_or_missing_workdir_is_refused_before_claiming() {
        let tmp = tempfile::tempdir().unwrap();
        let runner = runner(&tmp);
        let mut req = request(1, "true");
        req.progress_patterns = vec!["(unclosed".into()];
        let err = runner.start_or_attach(&req).await.err();
        assert!(
            matches!(err, Some(LocalError::BadPattern { .. })),
            "{err:?}"
        );
        let mut req = request(1, "true");
        req.workdir = Some(tmp.path().join("missing").display().to_string());
        let err = runner.start_or_attach(&req).await.err();
        assert!(matches!(err, Some(LocalError::Workdir(_))), "{err:?}");
        assert!(!runner.attempt_dir(&req.step).unwrap().exists());
    }
}
