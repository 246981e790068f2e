//! Runs step attempts on SSH hosts, detached, so that they survive an mqic restart and are
//! never started twice; the counterpart of [`crate::hpc::local`] for `kind = "ssh"` hosts.
//!
//! Two directories per attempt:
//!
//! - here, `<attempts_root>/<case_id>/<step>/<attempt>/` (the local runner's root): `started`,
//!   `request.json`, `remote_host` (the host's name, which keeps the local runner away), and
//!   later the executor's `correlation_id` and `reported`. Creating it is the claim.
//! - on the host, `<work_root>/.mqic-attempts/<case_id>/<step>/<attempt>/`: `run.sh` (the
//!   wrapper), `pid` (the wrapper's pid, also its session and process group id),
//!   `output.log` (stdout and stderr), `exit` (the exit status), and `cancelled` /
//!   `timed_out` when mqic ends it.
//!
//! The wrapper is started with `setsid` and its output goes to a file, so it outlives the SSH
//! channel, the session, and mqic. A handle polls the host (one command per poll: the exit
//! file, whether the wrapper and its group live, and the new output), streams the output's
//! lines to the log, parses progress, and enforces the timeout by signalling the whole
//! remote process group (SIGTERM, then SIGKILL after the grace). Every value in every command
//! goes through [`shell_quote`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::conductor::template::shell_quote;
use crate::hpc::local::{
    check_id, io_err, label, now_ms, started_at, unreported_in, write_atomic, LocalError, Outcome,
    Output, Patterns, Progress, REMOTE_HOST,
};
use crate::hpc::ssh::{SshError, SshHost};
use crate::protocol::{ExecuteRequest, StepRef};

const REQUEST: &str = "request.json";
const STARTED: &str = "started";
/// Where attempts live under a host's work root.
pub const REMOTE_ATTEMPTS: &str = ".mqic-attempts";
/// How often a handle polls the host once a step has run a while.
const POLL: Duration = Duration::from_millis(500);
/// The first pause between polls; doubled after each poll up to [`POLL`], so a short step
/// is seen to end within tens of milliseconds.
const FIRST_POLL: Duration = Duration::from_millis(25);
/// A poll that has not answered in this time counts as the host being unreachable.
const POLL_TIMEOUT: Duration = Duration::from_secs(30);
/// After a timeout that fired while the host was unreachable, the group is killed once the
/// host answers again, trying this long at most.
const LATE_KILL_FOR: Duration = Duration::from_secs(3600);
/// How often that late kill is tried.
const LATE_KILL_EVERY: Duration = Duration::from_secs(5);
/// At most this much new output is fetched per poll.
const READ_PER_POLL: u64 = 4 << 20;
/// When attaching to a running attempt, this much of the existing log is read.
const ATTACH_WINDOW: u64 = 1 << 20;
/// How long a signalled group gets between SIGTERM and SIGKILL.
const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(5);
/// Output lines logged per poll at most (the whole output stays in the remote log).
const LINES_PER_POLL: usize = 200;

/// One host the runner may start steps on.
struct RemoteHost {
    ssh: Arc<SshHost>,
    /// `<work_root>/.mqic-attempts`.
    attempts: PathBuf,
}

/// Starts, attaches to and cancels step attempts on SSH hosts.
pub struct RemoteRunner {
    root: PathBuf,
    hosts: HashMap<String, RemoteHost>,
    tail_bytes: usize,
    kill_grace: Duration,
}

impl std::fmt::Debug for RemoteRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteRunner")
            .field("root", &self.root)
            .field("hosts", &self.hosts.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn remote_err(e: SshError) -> LocalError {
    LocalError::Remote {
        retryable: e.is_retryable(),
        detail: e.to_string(),
    }
}

impl RemoteRunner {
    /// A runner keeping its records under `attempts_root` (the local runner's root) for the
    /// given hosts: `(name, ssh, work_root)`.
    pub fn new(
        attempts_root: impl Into<PathBuf>,
        hosts: Vec<(String, Arc<SshHost>, PathBuf)>,
        output_tail_bytes: usize,
    ) -> RemoteRunner {
        let root: PathBuf = attempts_root.into();
        RemoteRunner {
            root: std::path::absolute(&root).unwrap_or(root),
            hosts: hosts
                .into_iter()
                .map(|(name, ssh, work_root)| {
                    (
                        name,
                        RemoteHost {
                            ssh,
                            attempts: work_root.join(REMOTE_ATTEMPTS),
                        },
                    )
                })
                .collect(),
            tail_bytes: output_tail_bytes,
            kill_grace: DEFAULT_KILL_GRACE,
        }
    }

    /// Sets the time a signalled process group gets between SIGTERM and SIGKILL.
    pub fn with_kill_grace(mut self, grace: Duration) -> RemoteRunner {
        self.kill_grace = grace;
        self
    }

    /// Whether `host` is one of this runner's hosts.
    pub fn serves(&self, host: &str) -> bool {
        self.hosts.contains_key(host)
    }

    /// The local record directory of an attempt (the same place the local runner uses).
    pub fn attempt_dir(&self, step: &StepRef) -> Result<PathBuf, LocalError> {
        check_id("case id", step.case_id.as_str())?;
        check_id("step", &step.step)?;
        Ok(self
            .root
            .join(step.case_id.as_str())
            .join(&step.step)
            .join(step.attempt.to_string()))
    }

    /// The attempt's directory on its host.
    pub fn remote_dir(&self, host: &str, step: &StepRef) -> Result<String, LocalError> {
        check_id("case id", step.case_id.as_str())?;
        check_id("step", &step.step)?;
        let h = self.host(host)?;
        let dir = h
            .attempts
            .join(step.case_id.as_str())
            .join(&step.step)
            .join(step.attempt.to_string());
        dir.to_str()
            .map(str::to_string)
            .ok_or_else(|| LocalError::Remote {
                detail: format!("work root of `{host}` is not valid UTF-8"),
                retryable: false,
            })
    }

    fn host(&self, name: &str) -> Result<&RemoteHost, LocalError> {
        self.hosts.get(name).ok_or_else(|| LocalError::Remote {
            detail: format!("`{name}` is not an ssh host"),
            retryable: false,
        })
    }

    /// Starts the attempt on its host unless it was claimed already; otherwise attaches to it
    /// (running, finished, or gone).
    pub async fn start_or_attach(
        &self,
        request: &ExecuteRequest,
    ) -> Result<RemoteHandle, LocalError> {
        let host = self.host(&request.host)?;
        let dir = self.attempt_dir(&request.step)?;
        let remote = self.remote_dir(&request.host, &request.step)?;
        let patterns = Patterns::compile(request)?;
        let claimed = {
            let (dir, request) = (dir.clone(), request.clone());
            tokio::task::spawn_blocking(move || claim(&dir, &request))
                .await
                .map_err(|e| LocalError::Spawn(format!("blocking task failed: {e}")))??
        };
        let mut pid = None;
        if claimed {
            let script = wrapper_script(request, &remote);
            let command = start_command(&remote, request.workdir.as_deref());
            let out = host
                .ssh
                .run(&command, script.as_bytes())
                .await
                .map_err(remote_err)?;
            let text = out.stdout_lossy();
            let last = text.lines().last().unwrap_or("").to_string();
            if let Some(p) = last.strip_prefix("started ") {
                pid = p.trim().parse().ok();
                tracing::info!(attempt = %label(&request.step), host = %request.host, pid = ?pid, "step started on the host");
            } else if last == "exists" {
                tracing::warn!(attempt = %label(&request.step), "the attempt was already on the host; attaching");
            } else if last == "noworkdir" {
                return Err(LocalError::Workdir(
                    request.workdir.clone().unwrap_or_default(),
                ));
            } else {
                return Err(LocalError::Remote {
                    detail: format!(
                        "cannot start the step on `{}` (status {:?}): {}",
                        request.host,
                        out.status,
                        out.stderr_lossy().trim()
                    ),
                    retryable: false,
                });
            }
        }
        let started = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || started_at(&dir))
                .await
                .unwrap_or_else(|_| SystemTime::now())
        };
        let local_log = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || LocalLog::open(&dir))
                .await
                .map_err(|e| LocalError::Spawn(format!("blocking task failed: {e}")))?
        };
        let mut handle = RemoteHandle {
            ssh: host.ssh.clone(),
            local_log,
            step: request.step.clone(),
            remote,
            pid,
            reattached: !claimed,
            finished: false,
            started,
            deadline: (request.timeout_secs > 0)
                .then(|| started + Duration::from_secs(request.timeout_secs)),
            kill_grace: self.kill_grace,
            output: Output::fed(self.tail_bytes, patterns, !claimed),
            offset: 0,
            ending: None,
            first: None,
        };
        if !claimed {
            // One look now: the pid, whether it finished, and where to start reading.
            let state = handle.poll_state(None).await.map_err(remote_err)?;
            handle.pid = state.pid;
            handle.finished = state.exit.is_some() && !state.wrapper_alive;
            handle.offset = state
                .size
                .saturating_sub(ATTACH_WINDOW.max(self.tail_bytes as u64));
            handle.output = Output::fed(
                self.tail_bytes,
                Patterns::compile(request)?,
                handle.offset > 0,
            );
        }
        Ok(handle)
    }

    /// Marks the attempt cancelled on its host and sends SIGTERM to its process group (the
    /// handle watching it sends SIGKILL after the grace). Returns whether a running group was
    /// signalled.
    pub async fn cancel(&self, host: &str, step: &StepRef) -> Result<bool, LocalError> {
        let h = self.host(host)?;
        let remote = self.remote_dir(host, step)?;
        let d = shell_quote(&remote);
        let command = format!(
            "d={d}; mkdir -p -- \"$d\" && date +%s > \"$d/cancelled\" || exit 1; \
             pid=$(cat \"$d/pid\" 2>/dev/null); \
             if [ -n \"$pid\" ] && [ ! -e \"$d/exit\" ] && kill -TERM \"-$pid\" 2>/dev/null; \
             then echo signalled; else echo idle; fi"
        );
        let out = h.ssh.run(&command, &[]).await.map_err(remote_err)?;
        Ok(out.stdout_lossy().trim() == "signalled")
    }

    /// Attempts on SSH hosts whose outcome has not been published.
    pub async fn unreported(&self) -> Result<Vec<ExecuteRequest>, LocalError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || unreported_in(&root, true))
            .await
            .map_err(|e| LocalError::Spawn(format!("blocking task failed: {e}")))?
    }
}

/// Claims the attempt here: true when this call created its record directory.
fn claim(dir: &Path, request: &ExecuteRequest) -> Result<bool, LocalError> {
    if dir.exists() {
        return Ok(false);
    }
    let parent = dir.parent().expect("an attempt dir has parents");
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(io_err(dir)(e)),
    }
    write_atomic(dir, REMOTE_HOST, request.host.as_bytes())?;
    write_atomic(dir, STARTED, now_ms().to_string().as_bytes())?;
    let json = serde_json::to_vec_pretty(request).expect("a request always serializes");
    write_atomic(dir, REQUEST, &json)?;
    Ok(true)
}

/// The command that claims the remote directory, writes the wrapper (from stdin), starts it
/// detached, and prints `started <pid>`, `exists` or `noworkdir`. The whole background job
/// has its stdio redirected (and `exec`s into `setsid`): a shell holding the channel's pipes
/// would keep the SSH channel, and so this call, open until the step ends.
fn start_command(remote: &str, workdir: Option<&str>) -> String {
    let check = match workdir {
        Some(w) => format!(
            "if [ ! -d {w} ]; then cat > /dev/null; echo noworkdir; exit 0; fi; ",
            w = shell_quote(w)
        ),
        None => String::new(),
    };
    format!(
        "{check}d={d}; mkdir -p -- \"${{d%/*}}\" || exit 1; \
         if mkdir -- \"$d\" 2>/dev/null; then \
           cat > \"$d/run.sh\" || exit 1; \
           (cd \"$d\" && exec setsid sh \"$d/run.sh\") < /dev/null >> \"$d/output.log\" 2>&1 & \
           i=0; while [ ! -s \"$d/pid\" ] && [ ! -e \"$d/exit\" ] && [ $i -lt 500 ]; do \
             sleep 0.01; i=$((i+1)); done; \
           echo \"started $(cat \"$d/pid\" 2>/dev/null)\"; \
         else cat > /dev/null; echo exists; fi",
        d = shell_quote(remote)
    )
}

/// The wrapper on the host: records its pid, runs the command with `sh -c` in the workdir,
/// records the exit status. Its pid is its session's and process group's id (`setsid`).
fn wrapper_script(request: &ExecuteRequest, remote: &str) -> String {
    let enter = match &request.workdir {
        Some(w) => format!(
            "cd -- {q} || {{ echo \"mqic: cannot enter the workdir\" {q} >&2; exit_status 126; }}\n",
            q = shell_quote(w)
        ),
        None => String::new(),
    };
    let gpu = match request.gpu_id {
        Some(g) => format!("export MQIC_GPU_ID={}\n", shell_quote(&g.to_string())),
        None => "unset MQIC_GPU_ID\n".to_string(),
    };
    format!(
        "# mqic step wrapper for {label}\n\
         d={d}\n\
         cd \"$d\" || exit 125\n\
         echo $$ > pid.tmp && mv -f pid.tmp pid\n\
         exit_status() {{ echo \"$1\" > \"$d/exit.tmp\" && mv -f \"$d/exit.tmp\" \"$d/exit\"; exit \"$1\"; }}\n\
         [ -e cancelled ] && exit 130\n\
         export MQIC_CASE_ID={case} MQIC_STEP={step} MQIC_ATTEMPT={attempt} MQIC_ATTEMPT_DIR=\"$d\"\n\
         {gpu}{enter}sh -c {command}\n\
         exit_status $?\n",
        label = label(&request.step),
        d = shell_quote(remote),
        case = shell_quote(request.step.case_id.as_str()),
        step = shell_quote(&request.step.step),
        attempt = request.step.attempt,
        command = shell_quote(&request.command),
    )
}

/// What one poll of the host found.
#[derive(Debug, Default)]
struct State {
    exit: Option<i32>,
    pid: Option<u32>,
    wrapper_alive: bool,
    group_alive: bool,
    cancelled: bool,
    timed_out: bool,
    size: u64,
    output: Vec<u8>,
}

/// The command that reports an attempt's state and its output from `offset` (`None`: none).
/// The group counts as alive while a member is not a zombie: killed members reparented to an
/// init that is slow to reap them (a container's) must not keep it "alive" forever.
fn poll_command(remote: &str, offset: Option<u64>) -> String {
    let read = match offset {
        Some(off) => format!(
            "tail -c +{} \"$d/output.log\" 2>/dev/null | head -c {READ_PER_POLL}",
            off + 1
        ),
        None => String::new(),
    };
    format!(
        "d={d}; pid=$(cat \"$d/pid\" 2>/dev/null); \
         echo \"exit=$(cat \"$d/exit\" 2>/dev/null)\"; echo \"pid=$pid\"; \
         alive=0; group=0; \
         if [ -n \"$pid\" ]; then \
           if kill -0 \"$pid\" 2>/dev/null && tr '\\000' ' ' < /proc/\"$pid\"/cmdline 2>/dev/null | grep -qF \"$d/run.sh\"; then alive=1; fi; \
           if ps -eo pgid=,stat= 2>/dev/null | awk -v p=\"$pid\" '$1 == p && $2 !~ /^Z/ {{ n++ }} END {{ exit n == 0 }}'; then group=1; fi; \
         fi; \
         echo \"alive=$alive\"; echo \"group=$group\"; \
         [ -e \"$d/cancelled\" ] && echo cancelled=1; [ -e \"$d/timed_out\" ] && echo timed_out=1; \
         echo \"size=$(stat -c %s \"$d/output.log\" 2>/dev/null || echo 0)\"; echo ---; {read}",
        d = shell_quote(remote)
    )
}

fn parse_state(stdout: &[u8]) -> Option<State> {
    let split = stdout.windows(5).position(|w| w == b"\n---\n")?;
    let head = String::from_utf8_lossy(&stdout[..split]);
    let mut state = State {
        output: stdout[split + 5..].to_vec(),
        ..State::default()
    };
    for line in head.lines() {
        let (k, v) = line.split_once('=')?;
        match k {
            "exit" => state.exit = v.trim().parse().ok(),
            "pid" => state.pid = v.trim().parse().ok().filter(|p| *p > 1),
            "alive" => state.wrapper_alive = v == "1",
            "group" => state.group_alive = v == "1",
            "cancelled" => state.cancelled = true,
            "timed_out" => state.timed_out = true,
            "size" => state.size = v.trim().parse().unwrap_or(0),
            _ => {}
        }
    }
    Some(state)
}

#[derive(Debug, Clone, Copy)]
enum Ending {
    TimedOut(SystemTime),
    Cancelled(SystemTime),
}

/// A started or attached remote attempt; [`RemoteHandle::wait`] follows it to its end.
pub struct RemoteHandle {
    ssh: Arc<SshHost>,
    /// The attempt's `output.log` here, which the dashboard's live tail reads.
    local_log: Option<LocalLog>,
    step: StepRef,
    remote: String,
    pid: Option<u32>,
    reattached: bool,
    finished: bool,
    started: SystemTime,
    deadline: Option<SystemTime>,
    kill_grace: Duration,
    output: Output,
    offset: u64,
    ending: Option<Ending>,
    /// When the host was first found unreachable in a row of failed polls.
    first: Option<SystemTime>,
}

impl std::fmt::Debug for RemoteHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteHandle")
            .field("step", &self.step)
            .field("remote", &self.remote)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl RemoteHandle {
    pub fn step(&self) -> &StepRef {
        &self.step
    }

    /// The wrapper's pid on the host (its process group id), when known.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    pub fn reattached(&self) -> bool {
        self.reattached
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The attempt's directory on the host.
    pub fn remote_dir(&self) -> &str {
        &self.remote
    }

    async fn poll_state(&self, offset: Option<u64>) -> Result<State, SshError> {
        let command = poll_command(&self.remote, offset);
        let out = match tokio::time::timeout(POLL_TIMEOUT, self.ssh.run(&command, &[])).await {
            Ok(out) => out?,
            Err(_) => {
                return Err(SshError::Unreachable {
                    host: self.ssh.name().to_string(),
                    target: self.ssh.target().describe(),
                    detail: format!("no answer to a poll within {POLL_TIMEOUT:?}"),
                })
            }
        };
        parse_state(&out.stdout).ok_or_else(|| SshError::Channel {
            host: self.ssh.name().to_string(),
            detail: format!(
                "unexpected answer polling {} (status {:?}): {}",
                self.remote,
                out.status,
                out.stderr_lossy().trim()
            ),
        })
    }

    async fn signal(&self, signal: &str, marker: Option<&str>) {
        let Some(pid) = self.pid else { return };
        let mark = marker
            .map(|m| format!("date +%s > \"$d/{m}\"; "))
            .unwrap_or_default();
        let command = format!(
            "d={d}; {mark}kill -{signal} -{pid} 2>/dev/null; true",
            d = shell_quote(&self.remote)
        );
        if let Err(e) = self.ssh.run(&command, &[]).await {
            tracing::warn!(attempt = %label(&self.step), error = %e, "cannot signal the step");
        }
    }

    /// Follows the attempt until it ends: calls `progress` for each larger fraction, logs its
    /// output lines, enforces the timeout (counted from the attempt's start, so it survives a
    /// restart). While the host is unreachable it keeps trying: the step runs on regardless.
    /// Dropping the future stops watching; the remote process keeps running.
    pub async fn wait(mut self, mut progress: impl FnMut(Progress)) -> Outcome {
        let emit = !self.finished;
        let mut pause = FIRST_POLL;
        loop {
            let state = match self.poll_state(Some(self.offset)).await {
                Ok(s) => {
                    self.first = None;
                    s
                }
                Err(e) if e.is_retryable() => {
                    let now = SystemTime::now();
                    let since = *self.first.get_or_insert(now);
                    if since == now {
                        tracing::warn!(attempt = %label(&self.step), error = %e, "cannot poll the step; retrying");
                    }
                    // The timeout holds while the host is away: the step is reported timed
                    // out now, and its group is killed once the host answers again.
                    let overdue = match self.ending {
                        None => self.deadline.is_some_and(|d| now >= d),
                        Some(Ending::TimedOut(t) | Ending::Cancelled(t)) => {
                            now.duration_since(t).unwrap_or_default() >= self.kill_grace * 2
                        }
                    };
                    if overdue {
                        tracing::warn!(attempt = %label(&self.step), error = %e,
                            "step timed out while its host is unreachable; it will be killed once the host answers");
                        self.late_kill();
                        self.output.finish();
                        let tail = format!(
                            "{}\nmqic: timed out while the host was unreachable: {e}",
                            self.output.tail()
                        );
                        return match self.ending {
                            Some(Ending::Cancelled(_)) => Outcome::Cancelled { tail },
                            _ => Outcome::TimedOut { tail },
                        };
                    }
                    let mut wait = POLL * 4;
                    if let (Some(d), None) = (self.deadline, self.ending) {
                        wait = wait.min(d.duration_since(now).unwrap_or_default().max(FIRST_POLL));
                    }
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Err(e) => {
                    return Outcome::Lost {
                        tail: format!("{}\nmqic: {e}", self.output.tail()),
                    }
                }
            };
            if self.pid.is_none() {
                self.pid = state.pid;
            }
            if let Some(log) = &mut self.local_log {
                log.append(self.offset, &state.output, &self.step);
            }
            self.offset += state.output.len() as u64;
            let found = self.output.feed(&state.output);
            if emit {
                log_lines(&self.step, &state.output);
                found.into_iter().for_each(&mut progress);
            }
            let now = SystemTime::now();
            if self.ending.is_none() && state.timed_out {
                self.ending = Some(Ending::TimedOut(now));
            }
            let more = state.output.len() as u64 >= READ_PER_POLL;
            if let (Some(code), false, None) = (state.exit, state.cancelled, self.ending) {
                if !more {
                    return self.exited(code);
                }
                continue;
            }
            if !state.wrapper_alive {
                if more {
                    continue;
                }
                let since = match (self.ending, state.cancelled) {
                    (Some(Ending::TimedOut(t) | Ending::Cancelled(t)), _) => Some(t),
                    (None, true) => {
                        self.ending = Some(Ending::Cancelled(now));
                        Some(now)
                    }
                    (None, false) => None,
                };
                if let Some(since) = since {
                    if state.group_alive {
                        if now.duration_since(since).unwrap_or_default() < self.kill_grace {
                            tokio::time::sleep(POLL).await;
                            continue;
                        }
                        self.signal("KILL", None).await;
                        continue;
                    }
                }
                self.output.finish();
                let tail = self.output.tail();
                return match (state.cancelled, self.ending, state.exit) {
                    (true, _, _) | (false, Some(Ending::Cancelled(_)), _) => {
                        Outcome::Cancelled { tail }
                    }
                    (false, Some(Ending::TimedOut(_)), _) => Outcome::TimedOut { tail },
                    (false, None, Some(code)) => self.exited(code),
                    (false, None, None) => Outcome::Lost { tail },
                };
            }
            if self.ending.is_none() {
                if state.cancelled {
                    self.signal("TERM", None).await;
                    self.ending = Some(Ending::Cancelled(now));
                } else if self.deadline.is_some_and(|d| now >= d) {
                    tracing::warn!(attempt = %label(&self.step), "step timed out; killing its process group on the host");
                    self.signal("TERM", Some("timed_out")).await;
                    self.ending = Some(Ending::TimedOut(now));
                }
            }
            if let Some(Ending::TimedOut(since) | Ending::Cancelled(since)) = self.ending {
                if now.duration_since(since).unwrap_or_default() >= self.kill_grace {
                    self.signal("KILL", None).await;
                }
            }
            if !more {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(POLL);
            }
        }
    }

    /// Kills the attempt's process group once its host answers again (in the background,
    /// for up to [`LATE_KILL_FOR`]): marks it timed out, sends SIGTERM, and SIGKILL after
    /// the grace. Only while its wrapper is still the process with the recorded pid.
    fn late_kill(&self) {
        let (ssh, step, grace) = (self.ssh.clone(), self.step.clone(), self.kill_grace);
        let d = shell_quote(&self.remote);
        // SIGTERM only to the group of the wrapper still running; SIGKILL to that group
        // after the grace (the wrapper itself may be gone by then).
        let term = format!(
            "d={d}; [ -e \"$d/exit\" ] && exit 0; pid=$(cat \"$d/pid\" 2>/dev/null); \
             [ -n \"$pid\" ] || exit 0; \
             tr '\\000' ' ' < /proc/\"$pid\"/cmdline 2>/dev/null | grep -qF \"$d/run.sh\" || exit 0; \
             date +%s > \"$d/timed_out\"; kill -TERM -\"$pid\" 2>/dev/null; echo signalled"
        );
        let kill = format!(
            "d={d}; pid=$(cat \"$d/pid\" 2>/dev/null); [ -n \"$pid\" ] && kill -KILL -\"$pid\" 2>/dev/null; true"
        );
        tokio::spawn(async move {
            let give_up = tokio::time::Instant::now() + LATE_KILL_FOR;
            while tokio::time::Instant::now() < give_up {
                match tokio::time::timeout(POLL_TIMEOUT, ssh.run(&term, &[])).await {
                    Ok(Ok(out)) => {
                        if out.stdout_lossy().trim() == "signalled" {
                            tracing::info!(attempt = %label(&step), "the host answers again; the timed-out step was signalled");
                            tokio::time::sleep(grace).await;
                            let _ = tokio::time::timeout(POLL_TIMEOUT, ssh.run(&kill, &[])).await;
                        }
                        return;
                    }
                    Ok(Err(e)) if !e.is_retryable() => {
                        tracing::warn!(attempt = %label(&step), error = %e, "cannot kill the timed-out step");
                        return;
                    }
                    _ => tokio::time::sleep(LATE_KILL_EVERY).await,
                }
            }
            tracing::warn!(attempt = %label(&step), "the host did not come back; the timed-out step was not killed");
        });
    }

    fn exited(&mut self, code: i32) -> Outcome {
        self.output.finish();
        let tail = self.output.tail();
        if code == 0 {
            return Outcome::Succeeded {
                exit_code: 0,
                tail,
                duration: SystemTime::now()
                    .duration_since(self.started)
                    .unwrap_or_default(),
            };
        }
        let mut detail = format!("exited with code {code} on the host");
        if (129..160).contains(&code) {
            detail.push_str(&format!(" (killed by signal {})", code - 128));
        }
        let retryable = self.output.matched_retryable().map(str::to_string);
        if let Some(p) = &retryable {
            detail.push_str(&format!("; output matched the retryable pattern `{p}`"));
        }
        Outcome::Failed {
            exit_code: code,
            tail,
            retryable: retryable.is_some(),
            detail,
        }
    }
}

/// The local copy of a remote attempt's output: `output.log` in the attempt's record
/// directory, where the local runner writes its own steps' output, so the dashboard shows the
/// live tail of SSH steps too. It holds the remote log's bytes from its start; bytes already
/// there (from before a restart) are not written again.
struct LocalLog {
    file: std::fs::File,
    len: u64,
}

impl LocalLog {
    /// Opens (or creates) the log; `None` (and a warning) when it cannot be.
    fn open(dir: &Path) -> Option<LocalLog> {
        let path = dir.join(LOCAL_OUTPUT);
        let opened = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|file| Ok((file.metadata()?.len(), file)));
        match opened {
            Ok((len, file)) => Some(LocalLog { file, len }),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot open the local copy of the step's output");
                None
            }
        }
    }

    /// Appends what of `bytes` (the remote log from `offset`) lies past what is here.
    fn append(&mut self, offset: u64, bytes: &[u8], step: &StepRef) {
        use std::io::Write;
        let end = offset + bytes.len() as u64;
        if end <= self.len {
            return;
        }
        let skip = self.len.saturating_sub(offset) as usize;
        match self.file.write_all(&bytes[skip..]) {
            Ok(()) => self.len = end,
            Err(e) => {
                tracing::warn!(attempt = %label(step), error = %e, "cannot write the local copy of the step's output");
            }
        }
    }
}

/// The local copy's name in the attempt's record directory (as the local runner names it).
const LOCAL_OUTPUT: &str = "output.log";

/// Sends a step's output lines to the log (and so to the `mqic.logs` exchange).
fn log_lines(step: &StepRef, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    let text = String::from_utf8_lossy(bytes);
    for line in text
        .split(['\n', '\r'])
        .filter(|l| !l.is_empty())
        .take(LINES_PER_POLL)
    {
        tracing::info!(target: "mqic::step_output", case = %step.case_id, step = %step.step, attempt = step.attempt, "{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_poll_answer_is_parsed_with_output_bytes_kept_whole() {
        let s = parse_state(
            b"exit=\npid=4242\nalive=1\ngroup=1\ncancelled=1\nsize=12\n---\nline 1\n---\nx",
        )
        .unwrap();
        assert_eq!(s.exit, None);
        assert_eq!(s.pid, Some(4242));
        assert!(s.wrapper_alive && s.group_alive && s.cancelled && !s.timed_out);
        assert_eq!(s.size, 12);
        assert_eq!(s.output, b"line 1\n---\nx");
        let s = parse_state(b"exit=3\npid=\nalive=0\ngroup=0\nsize=0\n---\n").unwrap();
        assert_eq!((s.exit, s.pid, s.wrapper_alive), (Some(3), None, false));
        assert!(parse_state(b"garbage").is_none());
    }

    #[test]
    fn every_value_in_the_scripts_is_quoted() {
        let req = ExecuteRequest {
            step: StepRef {
                case_id: "c1".into(),
                step: "simulate".into(),
                attempt: 2,
            },
            host: "gpu1".into(),
            command: "echo $(touch pwned); echo 'q'".into(),
            workdir: Some("/w/$(touch pwned2)".into()),
            gpu_id: Some(1),
            timeout_secs: 5,
            progress_patterns: vec![],
            retryable_patterns: vec![],
        };
        let script = wrapper_script(&req, "/r/a b/c1/simulate/2");
        assert!(script.contains("d='/r/a b/c1/simulate/2'"), "{script}");
        assert!(script.contains("cd -- '/w/$(touch pwned2)'"), "{script}");
        assert!(script.contains(&format!("sh -c {}", shell_quote(&req.command))));
        let start = start_command("/r/x'y", req.workdir.as_deref());
        assert!(start.contains(&shell_quote("/r/x'y")), "{start}");
        assert!(start.contains("[ ! -d '/w/$(touch pwned2)' ]"), "{start}");
    }
}
