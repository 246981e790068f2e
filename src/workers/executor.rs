//! The executor worker: takes `execute_command` and `cancel_step` from
//! `remote_executor_queue`, runs each step attempt through [`LocalRunner`], and tells the
//! conductor `execution_started`, `execution_progress` and exactly one result per attempt.
//!
//! A job is tracked on disk by the runner, never by holding a broker delivery: the message is
//! acked as soon as the attempt is started (or attached), because RabbitMQ's consumer timeout
//! (30 minutes by default) would otherwise cancel the consumer in the middle of an hours-long
//! MOQUI run. The result is published with a confirm, retried until it is confirmed, and only
//! then recorded as reported; a restart (even after `kill -9`) reattaches to every attempt not
//! yet reported, so each one is reported, and none is run twice.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::bus::{Bus, Delivery};
use crate::config::pipeline::ExecutorConfig;
use crate::hpc::local::{label, LocalError, LocalRunner, Outcome, Progress, RunHandle};
use crate::hpc::remote::{RemoteHandle, RemoteRunner};
use crate::protocol::topology::{CONDUCTOR_QUEUE, CONTROL_EXCHANGE, REMOTE_EXECUTOR_QUEUE};
use crate::protocol::{
    Command, Envelope, ExecuteRequest, ExecutionProgress, ExecutionStarted, ExecutionSucceeded,
    FailureCategory, FailureInfo, FailurePayload, StepRef,
};
use crate::workers::{self, stopped, Handled, Shutdown, WorkerStatus};

/// The host name steps run on this machine under.
pub const LOCAL_HOST: &str = "local";

/// The file in an attempt directory holding the correlation id of the message that started
/// it, so results published after a restart still carry it.
const CORRELATION_FILE: &str = "correlation_id";
/// Progress is published at most this often per attempt (the latest value wins).
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// How long the watchers get to wind down after shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// Runs the executor until shutdown. Running steps are left running when it stops: the next
/// start reattaches to them.
pub async fn run(
    bus: Arc<dyn Bus>,
    runner: Arc<LocalRunner>,
    config: ExecutorConfig,
    status: Arc<WorkerStatus>,
    shutdown: Shutdown,
) {
    run_with_remote(bus, runner, None, config, status, shutdown).await
}

/// [`run`], with steps for SSH hosts run through `remote`.
pub async fn run_with_remote(
    bus: Arc<dyn Bus>,
    runner: Arc<LocalRunner>,
    remote: Option<Arc<RemoteRunner>>,
    config: ExecutorConfig,
    status: Arc<WorkerStatus>,
    shutdown: Shutdown,
) {
    let max_parallel = config.max_parallel.max(1);
    let executor = Arc::new(Executor {
        bus: bus.clone(),
        runner,
        remote,
        permits: Arc::new(Semaphore::new(usize::from(max_parallel))),
        active: Mutex::new(HashMap::new()),
        tasks: Mutex::new(JoinSet::new()),
        status: status.clone(),
        shutdown: shutdown.clone(),
    });
    // Listen for cancels first, so one sent while attempts are being reattached is heard.
    let control = tokio::spawn(executor.clone().listen_for_cancels());
    executor.reattach_unreported().await;
    let handler = executor.clone();
    workers::consume(
        bus,
        REMOTE_EXECUTOR_QUEUE,
        max_parallel,
        status,
        shutdown,
        move |envelope, delivery| {
            let executor = handler.clone();
            async move { executor.handle(envelope, delivery).await }
        },
    )
    .await;
    control.abort();
    let mut tasks = std::mem::take(&mut *executor.tasks.lock());
    let drained =
        tokio::time::timeout(DRAIN, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!("executor watchers did not stop in time; leaving them");
    }
}

/// An attempt's identity, for the set of attempts being watched.
type AttemptKey = (String, String, u32);

fn key(step: &StepRef) -> AttemptKey {
    (step.case_id.0.clone(), step.step.clone(), step.attempt)
}

/// Where an attempt taken on by this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Its delivery waits for a permit.
    Waiting,
    /// Its process runs (or has ended and the result is being published).
    Running,
}

/// What the message handler and the per-attempt watchers share.
struct Executor {
    bus: Arc<dyn Bus>,
    runner: Arc<LocalRunner>,
    /// Runs the steps of `ssh` hosts (their records share the local runner's root).
    remote: Option<Arc<RemoteRunner>>,
    /// One permit per running attempt, `max_parallel` in all.
    permits: Arc<Semaphore>,
    /// Attempts a task in this process has taken on; a duplicate `execute_command` for one
    /// of them is only acked.
    active: Mutex<HashMap<AttemptKey, Phase>>,
    /// The watchers, so shutdown can wait for them to let go.
    tasks: Mutex<JoinSet<()>>,
    status: Arc<WorkerStatus>,
    shutdown: Shutdown,
}

impl Executor {
    /// Hears `cancel_step` on the control exchange (every executor does, so the one running
    /// the attempt gets it), resubscribing when the bus drops, until shutdown.
    async fn listen_for_cancels(self: Arc<Self>) {
        let mut shutdown = self.shutdown.clone();
        loop {
            let subscribed = async {
                let sub = self.bus.reply_queue().await?;
                self.bus
                    .bind(&sub.queue, CONTROL_EXCHANGE, "cancel.#")
                    .await?;
                Ok::<_, crate::bus::BusError>(sub)
            };
            let mut sub = match subscribed.await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for cancels; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = workers::stopped(&mut shutdown) => return,
                    }
                }
            };
            loop {
                let delivery = tokio::select! {
                    d = sub.next() => d,
                    _ = workers::stopped(&mut shutdown) => return,
                };
                let Some(delivery) = delivery else { break };
                match crate::protocol::decode(&delivery.body).map(|e| e.command) {
                    Ok(Command::CancelStep(cancel)) if self.runs_on(&cancel.host) => {
                        self.cancel(cancel)
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("bad control message ignored: {e}"),
                }
            }
        }
    }

    /// Whether steps for `host` run through this executor.
    fn runs_on(&self, host: &str) -> bool {
        host == LOCAL_HOST || self.remote.as_ref().is_some_and(|r| r.serves(host))
    }

    /// Starts or attaches to an attempt on its host.
    async fn start_or_attach(&self, request: &ExecuteRequest) -> Result<AnyHandle, LocalError> {
        match &self.remote {
            Some(remote) if request.host != LOCAL_HOST && remote.serves(&request.host) => {
                remote.start_or_attach(request).await.map(AnyHandle::Remote)
            }
            _ => self
                .runner
                .start_or_attach(request)
                .await
                .map(AnyHandle::Local),
        }
    }

    /// Kills an attempt's process group, in a task of its own.
    fn cancel(&self, cancel: crate::protocol::CancelStep) {
        let runner = self.runner.clone();
        let remote = self.remote.clone();
        self.spawn(async move {
            let cancelled = match remote {
                Some(r) if cancel.host != LOCAL_HOST && r.serves(&cancel.host) => {
                    r.cancel(&cancel.host, &cancel.step).await
                }
                _ => runner.cancel(&cancel.step).await,
            };
            match cancelled {
                Ok(true) => {}
                Ok(false) => tracing::info!(attempt = %label(&cancel.step), "nothing to cancel"),
                Err(e) => {
                    tracing::warn!(attempt = %label(&cancel.step), error = %e, "cannot cancel")
                }
            }
        });
    }

    async fn handle(
        self: Arc<Self>,
        envelope: Envelope,
        delivery: Delivery,
    ) -> (Handled, Option<Delivery>) {
        let outcome = match envelope.command {
            Command::ExecuteCommand(request) => {
                return self
                    .execute(request, envelope.correlation_id, delivery)
                    .await;
            }
            Command::CancelStep(cancel) => {
                self.cancel(cancel);
                Handled::Ack
            }
            other => Handled::Reject(format!(
                "`{}` is not handled on {REMOTE_EXECUTOR_QUEUE}",
                other.name()
            )),
        };
        (outcome, Some(delivery))
    }

    /// Starts (or attaches to) an attempt in a task of its own, which holds the delivery
    /// unacked until a permit is free and acks it once the attempt runs. The consume loop
    /// goes on meanwhile, so a `cancel_step` is never stuck behind a step waiting for room.
    async fn execute(
        self: Arc<Self>,
        request: ExecuteRequest,
        correlation_id: String,
        delivery: Delivery,
    ) -> (Handled, Option<Delivery>) {
        if !self.runs_on(&request.host) {
            let failure = failure(
                &request,
                "SpawnError",
                format!(
                    "unknown host `{}`: only `{LOCAL_HOST}` and the configured ssh hosts run steps",
                    request.host
                ),
                FailureCategory::Permanent,
                "unknown_host",
                String::new(),
            );
            let sent = self
                .publish_once(Command::ExecutionFailed(failure), &correlation_id)
                .await;
            return (
                if sent { Handled::Ack } else { Handled::Retry },
                Some(delivery),
            );
        }
        let key = key(&request.step);
        {
            let mut active = self.active.lock();
            match active.get(&key) {
                // Already followed here, and tracked on disk: that watcher reports it.
                Some(Phase::Running) => return (Handled::Ack, Some(delivery)),
                // Not on disk yet: the duplicate stays unacked (the broker gives it back if
                // this process dies before the first copy is claimed).
                Some(Phase::Waiting) => return (Handled::Kept, None),
                None => {
                    active.insert(key.clone(), Phase::Waiting);
                }
            }
        }
        self.refresh_status();
        let executor = self.clone();
        self.spawn(async move {
            executor.start(request, correlation_id, delivery).await;
            executor.active.lock().remove(&key);
            executor.refresh_status();
        });
        (Handled::Kept, None)
    }

    async fn start(&self, request: ExecuteRequest, correlation_id: String, delivery: Delivery) {
        let mut shutdown = self.shutdown.clone();
        let permit = tokio::select! {
            p = self.permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = stopped(&mut shutdown) => {
                delivery.nack(true);
                return;
            }
        };
        match self.start_or_attach(&request).await {
            Ok(handle) => {
                // From here the attempt is tracked on disk, not by the delivery.
                delivery.ack();
                self.follow(request, handle, Some(correlation_id)).await;
                drop(permit);
            }
            Err(e) => {
                // Nothing is running, so the failure is reported here; if that publish fails
                // the message is requeued and the same error is found (and sent) again.
                tracing::warn!(attempt = %label(&request.step), error = %e, "cannot start");
                let failure = start_failure(&request, &e);
                if self
                    .publish_once(Command::ExecutionFailed(failure), &correlation_id)
                    .await
                {
                    self.mark_reported(&request.step).await;
                    delivery.ack();
                } else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    delivery.nack(true);
                }
            }
        }
    }

    /// Reattaches to every attempt whose outcome was never published, before consuming.
    async fn reattach_unreported(self: &Arc<Self>) {
        let mut requests = match self.runner.unreported().await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot list unreported attempts");
                return;
            }
        };
        if let Some(remote) = &self.remote {
            match remote.unreported().await {
                Ok(r) => requests.extend(r),
                Err(e) => tracing::error!(error = %e, "cannot list unreported remote attempts"),
            }
        }
        for request in requests {
            match self.start_or_attach(&request).await {
                Ok(handle) => {
                    // Already running, so it runs whether or not a permit is free.
                    let permit = self.permits.clone().try_acquire_owned().ok();
                    tracing::info!(
                        attempt = %label(&request.step),
                        finished = handle.is_finished(),
                        "reattached to a step"
                    );
                    self.watch(request, handle, permit);
                }
                Err(e) => {
                    let executor = self.clone();
                    let failure = start_failure(&request, &e);
                    self.spawn(async move {
                        let correlation = executor.correlation(&request.step).await;
                        if executor
                            .publish_until_confirmed(
                                Command::ExecutionFailed(failure),
                                correlation.as_deref(),
                            )
                            .await
                        {
                            executor.mark_reported(&request.step).await;
                        }
                    });
                }
            }
        }
        self.refresh_status();
    }

    /// Follows an attempt found at start-up in its own task until its result is published.
    fn watch(
        self: &Arc<Self>,
        request: ExecuteRequest,
        handle: AnyHandle,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let key = key(&request.step);
        self.active.lock().insert(key.clone(), Phase::Waiting);
        let executor = self.clone();
        self.spawn(async move {
            executor.follow(request, handle, None).await;
            drop(permit);
            executor.active.lock().remove(&key);
            executor.refresh_status();
        });
    }

    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock();
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
    }

    async fn follow(
        &self,
        request: ExecuteRequest,
        handle: AnyHandle,
        correlation_id: Option<String>,
    ) {
        let step = request.step.clone();
        if let Some(phase) = self.active.lock().get_mut(&key(&step)) {
            *phase = Phase::Running;
        }
        self.refresh_status();
        let correlation = match correlation_id {
            Some(c) => {
                self.remember_correlation(&step, &c).await;
                Some(c)
            }
            None => self.correlation(&step).await,
        };
        let correlation = correlation.as_deref();
        // `execution_started` is published alongside the wait, not before it: while the
        // broker is unreachable the step's timeout must still be enforced.
        let started = (!handle.is_finished()).then(|| {
            Command::ExecutionStarted(ExecutionStarted {
                step: step.clone(),
                pid: handle.pid(),
                reattached: handle.reattached(),
            })
        });
        let announce = async {
            match started {
                Some(command) => self.publish_until_confirmed(command, correlation).await,
                None => true,
            }
        };
        let (progress_tx, mut progress_rx) = watch::channel(None::<Progress>);
        let progress_loop = async {
            loop {
                if progress_rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
                let latest = progress_rx.borrow_and_update().clone();
                if let Some(p) = latest {
                    let command = Command::ExecutionProgress(ExecutionProgress {
                        step: step.clone(),
                        fraction: p.fraction,
                        message: p.line,
                    });
                    if let Err(e) = workers::send_command(
                        self.bus.as_ref(),
                        CONDUCTOR_QUEUE,
                        command,
                        correlation,
                    )
                    .await
                    {
                        tracing::debug!(error = %e, "progress not published");
                    }
                }
                tokio::time::sleep(PROGRESS_INTERVAL).await;
            }
        };
        let mut shutdown = self.shutdown.clone();
        let waited = async {
            // The result goes out only after `execution_started` was confirmed.
            let (outcome, announced) = tokio::join!(
                handle.wait(move |p| {
                    progress_tx.send_replace(Some(p));
                }),
                announce
            );
            announced.then_some(outcome)
        };
        let outcome = tokio::select! {
            outcome = waited => match outcome {
                Some(o) => o,
                None => return,
            },
            _ = progress_loop => return,
            // The step keeps running; the next start reattaches to it.
            _ = stopped(&mut shutdown) => return,
        };
        tracing::info!(attempt = %label(&step), outcome = outcome_name(&outcome), "step ended");
        if self
            .publish_until_confirmed(result_command(&request, outcome), correlation)
            .await
        {
            self.mark_reported(&step).await;
        }
    }

    /// Publishes once; false (logged) when the broker did not confirm it.
    async fn publish_once(&self, command: Command, correlation_id: &str) -> bool {
        match workers::send_command(
            self.bus.as_ref(),
            CONDUCTOR_QUEUE,
            command,
            Some(correlation_id),
        )
        .await
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot publish to {CONDUCTOR_QUEUE}");
                false
            }
        }
    }

    /// Publishes with backoff until the broker confirms; false only when shutdown came first.
    async fn publish_until_confirmed(
        &self,
        command: Command,
        correlation_id: Option<&str>,
    ) -> bool {
        let mut shutdown = self.shutdown.clone();
        let mut backoff = Duration::from_millis(200);
        let mut failures = 0u64;
        loop {
            if *shutdown.borrow() {
                return false;
            }
            let sent = tokio::select! {
                r = workers::send_command(
                    self.bus.as_ref(), CONDUCTOR_QUEUE, command.clone(), correlation_id,
                ) => r,
                _ = stopped(&mut shutdown) => return false,
            };
            match sent {
                Ok(()) => return true,
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::warn!(
                            command = command.name(),
                            failures,
                            error = %e,
                            "cannot publish; retrying"
                        );
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stopped(&mut shutdown) => return false,
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    async fn mark_reported(&self, step: &StepRef) {
        if let Err(e) = self.runner.mark_reported(step).await {
            // An attempt refused before it was claimed has no directory to mark.
            if !matches!(e, LocalError::InvalidId { .. }) {
                tracing::debug!(attempt = %label(step), error = %e, "cannot mark it reported");
            }
        }
    }

    async fn remember_correlation(&self, step: &StepRef, correlation_id: &str) {
        let Ok(dir) = self.runner.attempt_dir(step) else {
            return;
        };
        let id = correlation_id.to_string();
        let _ = tokio::task::spawn_blocking(move || {
            let path = dir.join(CORRELATION_FILE);
            if !path.exists() && dir.is_dir() {
                let tmp = dir.join(format!("{CORRELATION_FILE}.tmp"));
                let _ = std::fs::write(&tmp, id).and_then(|()| std::fs::rename(&tmp, &path));
            }
        })
        .await;
    }

    async fn correlation(&self, step: &StepRef) -> Option<String> {
        let dir = self.runner.attempt_dir(step).ok()?;
        tokio::task::spawn_blocking(move || read_correlation(&dir))
            .await
            .ok()?
    }

    fn refresh_status(&self) {
        let (running, waiting) = {
            let active = self.active.lock();
            let running = active.values().filter(|p| **p == Phase::Running).count();
            (running, active.len() - running)
        };
        let mut status = match running {
            0 => "idle".to_string(),
            1 => "running 1 step".to_string(),
            n => format!("running {n} steps"),
        };
        if waiting > 0 {
            status.push_str(&format!(", {waiting} waiting"));
        }
        self.status.set(status);
    }
}

/// A local or a remote attempt, followed the same way.
enum AnyHandle {
    Local(RunHandle),
    Remote(RemoteHandle),
}

impl AnyHandle {
    fn is_finished(&self) -> bool {
        match self {
            AnyHandle::Local(h) => h.is_finished(),
            AnyHandle::Remote(h) => h.is_finished(),
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            AnyHandle::Local(h) => h.pid(),
            AnyHandle::Remote(h) => h.pid(),
        }
    }

    fn reattached(&self) -> bool {
        match self {
            AnyHandle::Local(h) => h.reattached(),
            AnyHandle::Remote(h) => h.reattached(),
        }
    }

    async fn wait(self, progress: impl FnMut(Progress)) -> Outcome {
        match self {
            AnyHandle::Local(h) => h.wait(progress).await,
            AnyHandle::Remote(h) => h.wait(progress).await,
        }
    }
}

fn read_correlation(dir: &Path) -> Option<String> {
    let id = std::fs::read_to_string(dir.join(CORRELATION_FILE)).ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_string())
}

fn outcome_name(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Succeeded { .. } => "succeeded",
        Outcome::Failed { .. } => "failed",
        Outcome::TimedOut { .. } => "timed_out",
        Outcome::Cancelled { .. } => "cancelled",
        Outcome::Lost { .. } => "lost",
    }
}

/// The one result message an attempt's outcome becomes.
pub fn result_command(request: &ExecuteRequest, outcome: Outcome) -> Command {
    let (error_type, message, category, code, detail, tail) = match outcome {
        Outcome::Succeeded {
            exit_code,
            tail,
            duration,
        } => {
            return Command::ExecutionSucceeded(ExecutionSucceeded {
                step: request.step.clone(),
                exit_code,
                output_tail: tail,
                duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            });
        }
        Outcome::Failed {
            exit_code,
            tail,
            retryable,
            detail,
        } => (
            "RunningError",
            format!("step `{}` {detail}", request.step.step),
            if retryable {
                FailureCategory::Retryable
            } else {
                FailureCategory::Permanent
            },
            format!("exit_code_{exit_code}"),
            detail,
            tail,
        ),
        Outcome::TimedOut { tail } => (
            "TimedOut",
            format!(
                "step `{}` ran past its timeout of {} s and was killed",
                request.step.step, request.timeout_secs
            ),
            FailureCategory::Retryable,
            "timed_out".to_string(),
            format!("timeout {} s", request.timeout_secs),
            tail,
        ),
        Outcome::Cancelled { tail } => (
            "Cancelled",
            format!("step `{}` was cancelled", request.step.step),
            FailureCategory::Permanent,
            "cancelled".to_string(),
            String::new(),
            tail,
        ),
        Outcome::Lost { tail } => (
            "Lost",
            format!(
                "step `{}`: its process is gone without an exit status",
                request.step.step
            ),
            FailureCategory::Retryable,
            "lost".to_string(),
            "killed from outside, the machine restarted, or it never started".to_string(),
            tail,
        ),
    };
    let mut payload = failure(request, error_type, message, category, &code, detail);
    payload.output_tail = tail;
    Command::ExecutionFailed(payload)
}

/// The failure reported when an attempt could not be started or attached at all.
fn start_failure(request: &ExecuteRequest, error: &LocalError) -> FailurePayload {
    let category = match error {
        // The disk or the filesystem: another try may well work.
        LocalError::Io { .. } => FailureCategory::Retryable,
        // An unreachable host may come back; a refused key or login will not.
        LocalError::Remote {
            retryable: true, ..
        } => FailureCategory::Retryable,
        LocalError::Remote {
            retryable: false, ..
        }
        | LocalError::InvalidId { .. }
        | LocalError::BadPattern { .. }
        | LocalError::Workdir(_)
        | LocalError::Spawn(_) => FailureCategory::Permanent,
    };
    let code = match error {
        LocalError::Remote {
            retryable: true, ..
        } => "host_unreachable",
        _ => "spawn_failed",
    };
    failure(
        request,
        "SpawnError",
        format!("step `{}` could not be started: {error}", request.step.step),
        category,
        code,
        error.to_string(),
    )
}

fn failure(
    request: &ExecuteRequest,
    error_type: &str,
    error_message: String,
    category: FailureCategory,
    code: &str,
    detail: String,
) -> FailurePayload {
    FailurePayload {
        case_id: request.step.case_id.clone(),
        error_type: error_type.to_string(),
        error_message,
        original_payload: serde_json::to_value(request).unwrap_or_default(),
        step: Some(request.step.step.clone()),
        attempt: Some(request.step.attempt),
        failure: Some(FailureInfo {
            category,
            phase: "execute".to_string(),
            code: code.to_string(),
            detail,
        }),
        output_tail: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap as Map;
    use std::future::Future;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use tokio::sync::mpsc;

    use crate::bus::{Acker, BoxFuture, BusError, BusResult, Outgoing, Settle, Subscription};
    use crate::conductor::template::shell_quote;
    use crate::protocol::topology::{dead_letter_queue, Topology};
    use crate::protocol::{decode, CancelStep, CaseId, NewCase};

    const BOUND: Duration = Duration::from_secs(30);

    /// A bus that records what is published and delivers what the test sends.
    #[derive(Default)]
    struct FakeBus {
        published: Mutex<Vec<Outgoing>>,
        /// How many publishes to refuse before accepting again.
        refuse: AtomicUsize,
        inbox: Mutex<Option<mpsc::Receiver<Delivery>>>,
    }

    impl Bus for FakeBus {
        fn declare(&self, _: &Topology) -> BoxFuture<'_, BusResult<()>> {
            Box::pin(async { Ok(()) })
        }
        fn publish(&self, message: Outgoing) -> BoxFuture<'_, BusResult<()>> {
            Box::pin(async move {
                let refused = self
                    .refuse
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if refused {
                    return Err(BusError::Closed("refused by the test".into()));
                }
                self.published.lock().push(message);
                Ok(())
            })
        }
        fn consume(&self, queue: &str, _: u16) -> BoxFuture<'_, BusResult<Subscription>> {
            let queue = queue.to_string();
            Box::pin(async move {
                match self.inbox.lock().take() {
                    Some(rx) => Ok(Subscription::new(queue, rx)),
                    None => Err(BusError::Closed("already consumed".into())),
                }
            })
        }
        fn reply_queue(&self) -> BoxFuture<'_, BusResult<Subscription>> {
            Box::pin(async { Err(BusError::Refused("not in this fake".into())) })
        }
        fn bind(&self, _: &str, _: &str, _: &str) -> BoxFuture<'_, BusResult<()>> {
            Box::pin(async { Ok(()) })
        }
        fn queue_depth(&self, _: &str) -> BoxFuture<'_, BusResult<Option<(u32, u32)>>> {
            Box::pin(async { Ok(None) })
        }
        fn describe(&self) -> String {
            "fake".into()
        }
    }

    /// One running executor over a [`FakeBus`].
    struct Harness {
        bus: Arc<FakeBus>,
        deliver: mpsc::Sender<Delivery>,
        settles_tx: mpsc::UnboundedSender<(u64, Settle)>,
        settles_rx: mpsc::UnboundedReceiver<(u64, Settle)>,
        settled: Map<u64, Settle>,
        next_tag: u64,
        status: Arc<WorkerStatus>,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Harness {
        fn start(root: &Path, max_parallel: u16) -> Harness {
            let bus = Arc::new(FakeBus::default());
            let (deliver, rx) = mpsc::channel(64);
            *bus.inbox.lock() = Some(rx);
            let (settles_tx, settles_rx) = mpsc::unbounded_channel();
            let (stop, shutdown) = watch::channel(false);
            let status = WorkerStatus::new();
            let runner =
                Arc::new(LocalRunner::new(root, 4096).with_kill_grace(Duration::from_millis(300)));
            let config = ExecutorConfig {
                max_parallel,
                output_tail_bytes: 4096,
            };
            let task = tokio::spawn(run(bus.clone(), runner, config, status.clone(), shutdown));
            Harness {
                bus,
                deliver,
                settles_tx,
                settles_rx,
                settled: Map::new(),
                next_tag: 0,
                status,
                stop,
                task,
            }
        }

        async fn send(&mut self, command: Command, correlation: &str) -> u64 {
            self.next_tag += 1;
            let envelope = Envelope::with_correlation(command, correlation.into());
            let delivery = Delivery::new(
                Bytes::from(envelope.to_bytes()),
                String::new(),
                REMOTE_EXECUTOR_QUEUE.into(),
                false,
                Vec::new(),
                Some(correlation.into()),
                None,
                Acker::new(self.next_tag, self.settles_tx.clone()),
            );
            self.deliver.send(delivery).await.unwrap();
            self.next_tag
        }

        async fn settled(&mut self, tag: u64) -> Settle {
            within("settle", async {
                loop {
                    if let Some(s) = self.settled.get(&tag) {
                        return *s;
                    }
                    let (t, s) = self.settles_rx.recv().await.unwrap();
                    self.settled.insert(t, s);
                }
            })
            .await
        }

        fn is_settled(&mut self, tag: u64) -> bool {
            while let Ok((t, s)) = self.settles_rx.try_recv() {
                self.settled.insert(t, s);
            }
            self.settled.contains_key(&tag)
        }

        /// Envelopes published to the conductor so far.
        fn to_conductor(&self) -> Vec<Envelope> {
            self.bus
                .published
                .lock()
                .iter()
                .filter(|m| m.routing_key == CONDUCTOR_QUEUE)
                .map(|m| decode(&m.body).unwrap())
                .collect()
        }

        /// Waits for the first envelope to the conductor whose command is `name`.
        async fn published(&self, name: &str) -> Envelope {
            within(name, async {
                loop {
                    if let Some(e) = self
                        .to_conductor()
                        .into_iter()
                        .find(|e| e.command.name() == name)
                    {
                        return e;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
        }

        async fn status_is(&self, expected: &str) {
            within(expected, async {
                while self.status.get() != expected {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
        }

        async fn stop(self) {
            self.stop.send(true).unwrap();
            within("executor stop", self.task).await.unwrap();
        }
    }

    async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
        tokio::time::timeout(BOUND, fut)
            .await
            .unwrap_or_else(|_| panic!("{what}: not done within {BOUND:?}"))
    }

    fn until(file: &Path) -> String {
        format!(
            "i=0; while [ ! -e {f} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done",
            f = shell_quote(&file.display().to_string())
        )
    }

    fn request(attempt: u32, command: String) -> ExecuteRequest {
        ExecuteRequest {
            step: StepRef {
                case_id: "case-7".into(),
                step: "simulate".into(),
                attempt,
            },
            host: LOCAL_HOST.into(),
            command,
            workdir: None,
            gpu_id: Some(0),
            timeout_secs: 600,
            progress_patterns: vec![r"\((\d+) of (\d+) batches\)".into()],
            retryable_patterns: Vec::new(),
        }
    }

    fn ledger_then_wait(ledger: &Path, go: &Path) -> String {
        format!(
            "echo run >> {}; echo 'Generating particles for (1 of 2 batches)'; {}; echo finished",
            shell_quote(&ledger.display().to_string()),
            until(go)
        )
    }

    fn failure_of(envelope: &Envelope) -> &FailurePayload {
        match &envelope.command {
            Command::ExecutionFailed(f) => f,
            other => panic!("expected execution_failed, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_step_is_acked_at_start_then_reported_once_with_its_correlation_id() {
        let tmp = tempfile::tempdir().unwrap();
        let (ledger, go) = (tmp.path().join("ledger"), tmp.path().join("go"));
        let mut h = Harness::start(&tmp.path().join("attempts"), 4);
        let req = request(1, ledger_then_wait(&ledger, &go));
        let tag = h.send(Command::ExecuteCommand(req.clone()), "corr-1").await;
        assert_eq!(
            h.settled(tag).await,
            Settle::Ack,
            "acked while the step still runs"
        );
        assert!(!go.exists());

        let started = h.published("execution_started").await;
        assert_eq!(started.correlation_id, "corr-1");
        let Command::ExecutionStarted(s) = &started.command else {
            unreachable!()
        };
        assert_eq!(s.step, req.step);
        assert!(!s.reattached);
        assert!(s.pid.is_some());
        let progress = h.published("execution_progress").await;
        let Command::ExecutionProgress(p) = &progress.command else {
            unreachable!()
        };
        assert_eq!(p.fraction, 0.5);
        h.status_is("running 1 step").await;

        std::fs::write(&go, "").unwrap();
        let done = h.published("execution_succeeded").await;
        assert_eq!(done.correlation_id, "corr-1");
        let Command::ExecutionSucceeded(r) = &done.command else {
            unreachable!()
        };
        assert_eq!(r.exit_code, 0);
        assert!(r.output_tail.contains("finished"), "{}", r.output_tail);
        h.status_is("idle").await;
        let reported = tmp.path().join("attempts/case-7/simulate/1/reported");
        within("reported", async {
            while !reported.exists() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let results = h
            .to_conductor()
            .iter()
            .filter(|e| {
                matches!(
                    e.command,
                    Command::ExecutionSucceeded(_) | Command::ExecutionFailed(_)
                )
            })
            .count();
        assert_eq!(results, 1);
        h.stop().await;
    }

    #[tokio::test]
    async fn a_non_zero_exit_is_a_structured_running_error() {
        let tmp = tempfile::tempdir().unwrap();
        let mut h = Harness::start(&tmp.path().join("attempts"), 4);
        let req = request(2, "echo 'MOQUI: dose grid error'; exit 3".into());
        h.send(Command::ExecuteCommand(req.clone()), "corr-2").await;
        let failed = h.published("execution_failed").await;
        let f = failure_of(&failed);
        assert_eq!(f.case_id, CaseId::from("case-7"));
        assert_eq!(f.error_type, "RunningError");
        assert_eq!((f.step.as_deref(), f.attempt), (Some("simulate"), Some(2)));
        assert_eq!(f.original_payload, serde_json::to_value(&req).unwrap());
        assert!(f.output_tail.contains("dose grid error"));
        let info = f.failure.as_ref().unwrap();
        assert_eq!(info.code, "exit_code_3");
        assert_eq!(info.phase, "execute");
        assert_eq!(info.category, FailureCategory::Permanent);
        h.stop().await;
    }

    #[tokio::test]
    async fn an_unknown_host_fails_permanently_and_other_commands_are_dead_lettered() {
        let tmp = tempfile::tempdir().unwrap();
        let mut h = Harness::start(&tmp.path().join("attempts"), 4);
        let mut req = request(1, "true".into());
        req.host = "gpu-server".into();
        let tag = h.send(Command::ExecuteCommand(req), "corr-3").await;
        assert_eq!(h.settled(tag).await, Settle::Ack);
        let failed = h.published("execution_failed").await;
        let info = failure_of(&failed).failure.clone().unwrap();
        assert_eq!(
            (info.code.as_str(), info.category),
            ("unknown_host", FailureCategory::Permanent)
        );

        let stray = Command::NewCaseFound(NewCase {
            case_id: "c".into(),
            case_path: "/x".into(),
            workflow: None,
            room: None,
        });
        let tag = h.send(stray, "corr-4").await;
        assert_eq!(h.settled(tag).await, Settle::Ack);
        let dlq = dead_letter_queue(REMOTE_EXECUTOR_QUEUE);
        assert!(h.bus.published.lock().iter().any(|m| m.routing_key == dlq));
        h.stop().await;
    }

    #[tokio::test]
    async fn a_duplicate_execute_is_acked_without_a_second_run() {
        let tmp = tempfile::tempdir().unwrap();
        let (ledger, go) = (tmp.path().join("ledger"), tmp.path().join("go"));
        let mut h = Harness::start(&tmp.path().join("attempts"), 4);
        let req = request(1, ledger_then_wait(&ledger, &go));
        let first = h.send(Command::ExecuteCommand(req.clone()), "corr-5").await;
        assert_eq!(h.settled(first).await, Settle::Ack);
        let second = h.send(Command::ExecuteCommand(req.clone()), "corr-5").await;
        assert_eq!(h.settled(second).await, Settle::Ack);
        std::fs::write(&go, "").unwrap();
        h.published("execution_succeeded").await;
        assert_eq!(std::fs::read_to_string(&ledger).unwrap(), "run\n");
        let started = h
            .to_conductor()
            .iter()
            .filter(|e| e.command.name() == "execution_started")
            .count();
        assert_eq!(started, 1);

        // Once reported, a redelivery reports the same result again (and runs nothing).
        h.status_is("idle").await;
        let third = h.send(Command::ExecuteCommand(req), "corr-5").await;
        assert_eq!(h.settled(third).await, Settle::Ack);
        within("second report", async {
            while h
                .to_conductor()
                .iter()
                .filter(|e| e.command.name() == "execution_succeeded")
                .count()
                < 2
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert_eq!(std::fs::read_to_string(&ledger).unwrap(), "run\n");
        h.stop().await;
    }

    #[tokio::test]
    async fn a_restarted_executor_reattaches_and_reports_without_running_again() {
        let tmp = tempfile::tempdir().unwrap();
        let (ledger, go) = (tmp.path().join("ledger"), tmp.path().join("go"));
        let root = tmp.path().join("attempts");
        let mut h = Harness::start(&root, 4);
        let req = request(1, ledger_then_wait(&ledger, &go));
        h.send(Command::ExecuteCommand(req.clone()), "corr-6").await;
        let started = h.published("execution_started").await;
        let Command::ExecutionStarted(s) = &started.command else {
            unreachable!()
        };
        let pid = s.pid.unwrap() as i32;
        h.stop().await;
        // SAFETY: signal 0 only checks that the step is still there.
        assert_eq!(
            unsafe { libc::kill(pid, 0) },
            0,
            "stopping the executor left the step running"
        );

        let h = Harness::start(&root, 4);
        let again = h.published("execution_started").await;
        assert_eq!(again.correlation_id, "corr-6");
        let Command::ExecutionStarted(s) = &again.command else {
            unreachable!()
        };
        assert!(s.reattached);
        assert_eq!(s.pid, Some(pid as u32));
        std::fs::write(&go, "").unwrap();
        let done = h.published("execution_succeeded").await;
        assert_eq!(done.correlation_id, "corr-6");
        assert_eq!(std::fs::read_to_string(&ledger).unwrap(), "run\n");
        h.stop().await;
    }

    #[tokio::test]
    async fn cancel_step_kills_the_step_and_reports_cancelled() {
        let tmp = tempfile::tempdir().unwrap();
        let mut h = Harness::start(&tmp.path().join("attempts"), 4);
        let req = request(1, until(&tmp.path().join("never")));
        h.send(Command::ExecuteCommand(req.clone()), "corr-7").await;
        h.published("execution_started").await;
        let cancel = Command::CancelStep(CancelStep {
            step: req.step.clone(),
            host: LOCAL_HOST.into(),
        });
        let tag = h.send(cancel, "corr-7").await;
        assert_eq!(h.settled(tag).await, Settle::Ack);
        let failed = h.published("execution_failed").await;
        let f = failure_of(&failed);
        assert_eq!(f.error_type, "Cancelled");
        assert_eq!(f.failure.as_ref().unwrap().code, "cancelled");
        h.stop().await;
    }

    #[tokio::test]
    async fn a_result_is_published_again_until_the_broker_confirms_it() {
        let tmp = tempfile::tempdir().unwrap();
        let go = tmp.path().join("go");
        let mut h = Harness::start(&tmp.path().join("attempts"), 4);
        let req = request(1, until(&go));
        h.send(Command::ExecuteCommand(req), "corr-8").await;
        h.published("execution_started").await;
        h.bus.refuse.store(3, Ordering::SeqCst);
        std::fs::write(&go, "").unwrap();
        h.published("execution_succeeded").await;
        assert_eq!(
            h.bus.refuse.load(Ordering::SeqCst),
            0,
            "the refused publishes were retried"
        );
        h.stop().await;
    }

    #[tokio::test]
    async fn max_parallel_holds_further_deliveries_unacked() {
        let tmp = tempfile::tempdir().unwrap();
        let (go1, go2) = (tmp.path().join("go1"), tmp.path().join("go2"));
        let (ledger1, ledger2) = (tmp.path().join("l1"), tmp.path().join("l2"));
        let mut h = Harness::start(&tmp.path().join("attempts"), 1);
        let first = h
            .send(
                Command::ExecuteCommand(request(1, ledger_then_wait(&ledger1, &go1))),
                "a",
            )
            .await;
        assert_eq!(h.settled(first).await, Settle::Ack);
        let second = h
            .send(
                Command::ExecuteCommand(request(2, ledger_then_wait(&ledger2, &go2))),
                "b",
            )
            .await;
        h.status_is("running 1 step, 1 waiting").await;
        assert!(!h.is_settled(second), "held while no permit is free");
        assert!(!ledger2.exists());
        std::fs::write(&go1, "").unwrap();
        assert_eq!(h.settled(second).await, Settle::Ack);
        std::fs::write(&go2, "").unwrap();
        within("both done", async {
            while h
                .to_conductor()
                .iter()
                .filter(|e| e.command.name() == "execution_succeeded")
                .count()
                < 2
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        h.stop().await;
    }

    #[test]
    fn every_outcome_maps_to_one_result_with_a_stable_code() {
        let req = request(4, "x".into());
        let cases = [
            (
                Outcome::Failed {
                    exit_code: 1,
                    tail: "t".into(),
                    retryable: true,
                    detail: "d".into(),
                },
                "RunningError",
                "exit_code_1",
                FailureCategory::Retryable,
            ),
            (
                Outcome::TimedOut { tail: "t".into() },
                "TimedOut",
                "timed_out",
                FailureCategory::Retryable,
            ),
            (
                Outcome::Cancelled { tail: "t".into() },
                "Cancelled",
                "cancelled",
                FailureCategory::Permanent,
            ),
            (
                Outcome::Lost { tail: "t".into() },
                "Lost",
                "lost",
                FailureCategory::Retryable,
            ),
        ];
        for (outcome, error_type, code, category) in cases {
            let Command::ExecutionFailed(f) = result_command(&req, outcome) else {
                panic!()
            };
            assert_eq!(f.error_type, error_type);
            let info = f.failure.unwrap();
            assert_eq!(
                (info.code.as_str(), info.category, info.phase.as_str()),
                (code, category, "execute")
            );
            assert_eq!(f.output_tail, "t");
            assert_eq!(f.attempt, Some(4));
        }
        let ok = Outcome::Succeeded {
            exit_code: 0,
            tail: "t".into(),
            duration: Duration::from_millis(1500),
        };
        let Command::ExecutionSucceeded(s) = result_command(&req, ok) else {
            panic!()
        };
        assert_eq!(
            (s.exit_code, s.duration_ms, s.step),
            (0, 1500, req.step.clone())
        );
        let spawn = start_failure(&req, &LocalError::Spawn("no sh".into()));
        assert_eq!(spawn.error_type, "SpawnError");
        assert_eq!(spawn.failure.unwrap().code, "spawn_failed");
    }
}
