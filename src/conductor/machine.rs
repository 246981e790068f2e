//! The case state machine: `(case, input, plan, now) -> (case, history, effects)`, pure.
//! No I/O and no clock: the driver passes the time, a jitter sample and the GPU it could
//! lease, applies the decision in one store transaction, and publishes the effects through
//! the outbox. Every status change goes through [`Decider::transition`], which checks the
//! one transition table ([`CaseStatus::can_become`]) and writes the history row.

use crate::config::{ExitPolicy, StepKind};
use crate::protocol::events::{Event, Subject};
use crate::protocol::topology::{FILE_TRANSFER_QUEUE, REMOTE_EXECUTOR_QUEUE};
use crate::protocol::{
    CancelStep, Command, ExecuteRequest, FailureCategory, StepRef, TransferRequest,
};
use crate::store::records::{
    ms_to_rfc3339, CaseRecord, CaseStatus, Failure, GpuKey, GpuLease, HistoryRow, StepDone, StepRun,
};

use super::plan::{Plan, StepDef, WorkflowDef};

/// What happened to a case.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The case was just recorded (status NEW).
    Found,
    /// Time passed: retry backoffs end, deadlines pass, waiting cases look for a GPU.
    Tick,
    Started {
        step: String,
        attempt: u32,
        pid: Option<u32>,
    },
    Progress {
        step: String,
        attempt: u32,
        fraction: f64,
    },
    Succeeded {
        step: String,
        attempt: u32,
        detail: String,
        /// Bytes a transfer step copied (None for other steps).
        bytes: Option<u64>,
    },
    /// A step failed. Seed-format senders may leave out the step and attempt.
    Failed {
        step: Option<String>,
        attempt: Option<u32>,
        failure: Failure,
    },
    /// An operator retries a FAILED or CANCELLED case.
    Retry,
    /// An operator cancels a case.
    Cancel,
}

/// The world as the driver sees it when it asks for a decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Ctx {
    pub now_ms: u64,
    /// A uniform sample in `[0, 1)` for backoff jitter.
    pub jitter: f64,
    /// A GPU the case may lease now, on the host of its next step, if it needs one.
    pub free_gpu: Option<GpuKey>,
}

/// Something the driver must do, in the same transaction as the state change.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Publish a command to a work queue (through the outbox).
    Send {
        queue: &'static str,
        command: Command,
    },
    /// Publish an event (and keep it in the event log).
    Event(Event),
    TakeGpu(GpuLease),
    ReleaseGpu(GpuKey),
    /// Tell every executor to kill a step attempt (on the control exchange).
    Cancel(CancelStep),
    /// Add to the store's running total of bytes transferred in this direction.
    Transferred {
        kind: StepKind,
        bytes: u64,
    },
}

/// A decision: the case after the input, the history rows to append, what to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub case: CaseRecord,
    pub history: Vec<HistoryRow>,
    pub effects: Vec<Effect>,
}

/// Why an input changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// A result for another step or attempt than the current one (a duplicate or a late
    /// message): ignored, never applied twice.
    #[error("stale: {0}")]
    Stale(String),
    /// The operation is not possible in the case's status.
    #[error("{0}")]
    NotAllowed(String),
    /// Nothing to do (a tick before a deadline, progress that did not grow).
    #[error("unchanged")]
    Unchanged,
}

/// Decides what `input` does to `case`.
pub fn decide(
    case: &CaseRecord,
    input: Input,
    plan: &Plan,
    ctx: &Ctx,
) -> Result<Decision, Rejected> {
    let workflow = plan.workflow(&case.workflow);
    let mut d = Decider {
        case: case.clone(),
        history: Vec::new(),
        effects: Vec::new(),
        ctx,
        plan,
    };
    let Some(workflow) = workflow else {
        return match input {
            Input::Found | Input::Tick | Input::Retry
                if !case.status.is_terminal() || input == Input::Retry =>
            {
                if case.status.is_terminal() {
                    d.transition(CaseStatus::Queued, "retried by operator")?;
                }
                d.fail(Failure {
                    category: FailureCategory::Permanent,
                    phase: "dispatch".into(),
                    code: "no_workflow".into(),
                    detail: format!("workflow '{}' is not configured", case.workflow),
                    step: None,
                    attempt: None,
                    error_type: "ConfigError".into(),
                    output_tail: String::new(),
                })?;
                Ok(d.finish())
            }
            Input::Cancel => {
                d.cancel()?;
                Ok(d.finish())
            }
            _ => Err(Rejected::Stale(format!(
                "case {} has no workflow '{}'",
                case.case_id, case.workflow
            ))),
        };
    };
    // The workflow may have lost steps in a config change while the case was under way.
    if case.step_index >= workflow.steps.len() && !case.status.is_terminal() {
        if input == Input::Cancel {
            d.cancel()?;
        } else {
            d.fail(Failure {
                category: FailureCategory::Permanent,
                phase: "dispatch".into(),
                code: "workflow_changed".into(),
                detail: format!(
                    "workflow '{}' has {} steps now; the case was at step {}",
                    workflow.name,
                    workflow.steps.len(),
                    case.step_index + 1
                ),
                step: None,
                attempt: None,
                error_type: "ConfigError".into(),
                output_tail: String::new(),
            })?;
        }
        return Ok(d.finish());
    }
    match input {
        Input::Found => {
            if case.status != CaseStatus::New {
                return Err(Rejected::Stale(format!(
                    "case {} is already known",
                    case.case_id
                )));
            }
            d.transition(
                CaseStatus::Queued,
                &format!("accepted for workflow {}", workflow.name),
            )?;
            if let Some(problem) = case.case_id.problem() {
                d.fail(Failure {
                    category: FailureCategory::Permanent,
                    phase: "intake".into(),
                    code: "invalid_case_id".into(),
                    detail: problem,
                    step: None,
                    attempt: None,
                    error_type: "InvalidCaseId".into(),
                    output_tail: String::new(),
                })?;
                return Ok(d.finish());
            }
            d.dispatch(workflow)?;
        }
        Input::Tick => d.tick(workflow)?,
        Input::Started { step, attempt, pid } => {
            d.current(&step, attempt)?;
            let run = d.case.step.as_mut().expect("checked by current");
            if run.started_ms.is_some() && run.pid == pid {
                return Err(Rejected::Unchanged);
            }
            if run.started_ms.is_none() {
                // The timeout counts from the start, not from the dispatch: an attempt may
                // wait for an executor slot first (the executor times the process itself).
                run.started_ms = Some(ctx.now_ms);
                let def = &workflow.steps[d.case.step_index];
                run.deadline_ms = ctx.now_ms + def.config.timeout_secs * 1000 + plan.lease_grace_ms;
            }
            run.pid = pid;
            let reason = match pid {
                Some(p) => format!("step {step} attempt {attempt} started (pid {p})"),
                None => format!("step {step} attempt {attempt} started"),
            };
            d.transition(CaseStatus::Processing, &reason)?;
            d.event(Subject::Step, "started", Some((&step, attempt)), "");
        }
        Input::Progress {
            step,
            attempt,
            fraction,
        } => {
            d.current(&step, attempt)?;
            let fraction = fraction.clamp(0.0, 1.0);
            let run = d.case.step.as_mut().expect("checked by current");
            if fraction <= run.progress {
                return Err(Rejected::Unchanged);
            }
            run.progress = fraction;
            let overall = (d.case.step_index as f64 + fraction) / workflow.steps.len() as f64;
            d.case.progress = d.case.progress.max(overall);
            d.case.updated_ms = ctx.now_ms;
            d.event(
                Subject::Step,
                "progress",
                Some((&step, attempt)),
                &format!("{:.0}%", fraction * 100.0),
            );
        }
        Input::Succeeded {
            step,
            attempt,
            detail,
            bytes,
        } => {
            d.current(&step, attempt)?;
            d.release_gpu();
            let run = d.case.step.take().expect("checked by current");
            let kind = workflow.steps[d.case.step_index].config.kind;
            let bytes = bytes.filter(|_| matches!(kind, StepKind::Upload | StepKind::Download));
            if let Some(bytes) = bytes {
                d.effects.push(Effect::Transferred { kind, bytes });
            }
            d.case.done.push(StepDone {
                name: run.name.clone(),
                attempts: run.attempt,
                started_ms: run.started_ms.unwrap_or(run.dispatched_ms),
                finished_ms: ctx.now_ms,
                bytes,
            });
            d.case.step_index += 1;
            d.case.attempts = 0;
            d.case.retry_base = 0;
            let overall = d.case.step_index as f64 / workflow.steps.len() as f64;
            d.case.progress = d.case.progress.max(overall);
            d.event(Subject::Step, "succeeded", Some((&step, attempt)), &detail);
            if d.case.step_index >= workflow.steps.len() {
                d.case.progress = 1.0;
                d.transition(
                    CaseStatus::Completed,
                    &format!("step {step} succeeded; workflow complete"),
                )?;
            } else {
                d.note(&format!("step {step} attempt {attempt} succeeded"));
                d.dispatch(workflow)?;
            }
        }
        Input::Failed {
            step,
            attempt,
            failure,
        } => {
            // Seed-format senders may name only the step, only the attempt, or neither;
            // whatever they name must match the attempt in flight.
            let run = match (&d.case.step, d.case.status) {
                (Some(r), CaseStatus::Processing) => r.clone(),
                _ => {
                    return Err(Rejected::Stale(format!(
                        "failure for case {} which is {}",
                        case.case_id,
                        case.status.name()
                    )))
                }
            };
            d.current(
                step.as_deref().unwrap_or(&run.name),
                attempt.unwrap_or(run.attempt),
            )?;
            let def = &workflow.steps[d.case.step_index];
            d.step_failed(def, failure)?;
        }
        Input::Retry => {
            if !matches!(case.status, CaseStatus::Failed | CaseStatus::Cancelled) {
                return Err(Rejected::NotAllowed(format!(
                    "case {} is {}; only FAILED or CANCELLED cases can be retried",
                    case.case_id,
                    case.status.name()
                )));
            }
            d.case.failure = None;
            d.case.retry_base = d.case.attempts;
            d.case.retry_at_ms = None;
            d.case.manual_retries += 1;
            d.transition(CaseStatus::Queued, "retried by operator")?;
            d.dispatch(workflow)?;
        }
        Input::Cancel => {
            if let Some(run) = &case.step {
                let def = &workflow.steps[case.step_index];
                if !def.is_transfer() {
                    d.effects.push(Effect::Cancel(CancelStep {
                        step: StepRef {
                            case_id: case.case_id.clone(),
                            step: run.name.clone(),
                            attempt: run.attempt,
                        },
                        host: def.config.host.clone(),
                    }));
                }
            }
            d.cancel()?;
        }
    }
    Ok(d.finish())
}

/// Exponential backoff with jitter: `initial * 2^(attempt-1)`, capped, scaled by
/// `1 ± jitter`. `sample` is uniform in `[0, 1)`.
pub fn backoff_ms(policy: &crate::config::RetryPolicy, attempt: u32, sample: f64) -> u64 {
    let exp = policy.backoff_initial_secs * 2f64.powi(attempt.saturating_sub(1).min(30) as i32);
    let capped = exp.min(policy.backoff_max_secs);
    let scale = 1.0 + policy.jitter * (2.0 * sample - 1.0);
    (capped * scale * 1000.0).max(0.0) as u64
}

struct Decider<'a> {
    case: CaseRecord,
    history: Vec<HistoryRow>,
    effects: Vec<Effect>,
    ctx: &'a Ctx,
    plan: &'a Plan,
}

impl Decider<'_> {
    fn finish(self) -> Decision {
        Decision {
            case: self.case,
            history: self.history,
            effects: self.effects,
        }
    }

    /// The one place a status changes: checked against the table, recorded, announced.
    fn transition(&mut self, to: CaseStatus, reason: &str) -> Result<(), Rejected> {
        let from = self.case.status;
        if !from.can_become(to) {
            return Err(Rejected::NotAllowed(format!(
                "case {} cannot go from {} to {}",
                self.case.case_id,
                from.name(),
                to.name()
            )));
        }
        self.case.status = to;
        self.case.updated_ms = self.ctx.now_ms;
        let (step, attempt) = match &self.case.step {
            Some(r) => (Some(r.name.clone()), Some(r.attempt)),
            None => (None, None),
        };
        self.history.push(HistoryRow {
            at_ms: self.ctx.now_ms,
            from: Some(from),
            to,
            step,
            attempt,
            reason: reason.to_string(),
        });
        if from != to {
            let event = to.name().to_ascii_lowercase();
            self.event(Subject::Case, &event, None, reason);
        }
        Ok(())
    }

    /// A history row without a status change (e.g. a step finished and the next begins).
    fn note(&mut self, reason: &str) {
        let status = self.case.status;
        self.history.push(HistoryRow {
            at_ms: self.ctx.now_ms,
            from: Some(status),
            to: status,
            step: self.case.step.as_ref().map(|r| r.name.clone()),
            attempt: self.case.step.as_ref().map(|r| r.attempt),
            reason: reason.to_string(),
        });
    }

    fn event(&mut self, subject: Subject, event: &str, step: Option<(&str, u32)>, detail: &str) {
        self.effects.push(Effect::Event(Event {
            subject,
            event: event.to_string(),
            case_id: self.case.case_id.clone(),
            step: step.map(|(s, _)| s.to_string()),
            attempt: step.map(|(_, a)| a),
            status: self.case.status.name().to_string(),
            detail: detail.to_string(),
            timestamp: ms_to_rfc3339(self.ctx.now_ms),
        }));
    }

    /// Checks that a worker result is about the attempt in flight.
    fn current(&self, step: &str, attempt: u32) -> Result<(), Rejected> {
        match &self.case.step {
            Some(r)
                if self.case.status == CaseStatus::Processing
                    && r.name == step
                    && r.attempt == attempt =>
            {
                Ok(())
            }
            Some(r) => Err(Rejected::Stale(format!(
                "result for {step} attempt {attempt}, but case {} is on {} attempt {} ({})",
                self.case.case_id,
                r.name,
                r.attempt,
                self.case.status.name()
            ))),
            None => Err(Rejected::Stale(format!(
                "result for {step} attempt {attempt}, but case {} has no step in flight ({})",
                self.case.case_id,
                self.case.status.name()
            ))),
        }
    }

    fn release_gpu(&mut self) {
        if let Some(gpu) = self.case.step.as_mut().and_then(|r| r.gpu.take()) {
            self.effects.push(Effect::ReleaseGpu(gpu));
        }
    }

    /// Sends the current step: leases a GPU first if it needs one, or waits for one.
    fn dispatch(&mut self, workflow: &WorkflowDef) -> Result<(), Rejected> {
        let def = &workflow.steps[self.case.step_index];
        let now = self.ctx.now_ms;
        let gpu = if def.config.gpu {
            match &self.ctx.free_gpu {
                Some(g) if g.host == def.config.host => Some(g.clone()),
                _ => {
                    if self.case.status != CaseStatus::PendingResource {
                        self.transition(
                            CaseStatus::PendingResource,
                            &format!(
                                "step {} waits for a GPU on {}",
                                def.config.name, def.config.host
                            ),
                        )?;
                    }
                    return Ok(());
                }
            }
        } else {
            None
        };
        self.case.attempts += 1;
        let attempt = self.case.attempts;
        let deadline = now + def.config.timeout_secs * 1000 + self.plan.lease_grace_ms;
        if let Some(g) = &gpu {
            self.effects.push(Effect::TakeGpu(GpuLease {
                gpu: g.clone(),
                case_id: self.case.case_id.clone(),
                step: def.config.name.clone(),
                attempt,
                taken_ms: now,
                expires_ms: deadline,
            }));
        }
        self.case.step = Some(StepRun {
            name: def.config.name.clone(),
            attempt,
            dispatched_ms: now,
            started_ms: None,
            deadline_ms: deadline,
            pid: None,
            progress: 0.0,
            gpu: gpu.clone(),
        });
        self.case.retry_at_ms = None;
        let command = self.render(def, attempt, gpu.as_ref().map(|g| g.index));
        let queue = if def.is_transfer() {
            FILE_TRANSFER_QUEUE
        } else {
            REMOTE_EXECUTOR_QUEUE
        };
        self.effects.push(Effect::Send { queue, command });
        let on_gpu = gpu.map(|g| format!(" on GPU {g}")).unwrap_or_default();
        self.transition(
            CaseStatus::Processing,
            &format!(
                "step {} attempt {attempt} dispatched{on_gpu}",
                def.config.name
            ),
        )?;
        let name = def.config.name.clone();
        self.event(Subject::Step, "dispatched", Some((&name, attempt)), "");
        Ok(())
    }

    /// The command that runs one attempt of a step, with every placeholder filled in.
    fn render(&self, def: &StepDef, attempt: u32, gpu: Option<u32>) -> Command {
        let values = self.plan.values(&self.case, def, attempt, gpu);
        let step = StepRef {
            case_id: self.case.case_id.clone(),
            step: def.config.name.clone(),
            attempt,
        };
        let host = def.config.host.clone();
        match def.config.kind {
            StepKind::Upload => Command::UploadCase(TransferRequest {
                step,
                host,
                local_dir: def.source.render_path(&values),
                remote_dir: def.dest.render_path(&values),
            }),
            StepKind::Download => Command::DownloadResults(TransferRequest {
                step,
                host,
                local_dir: def.dest.render_path(&values),
                remote_dir: def.source.render_path(&values),
            }),
            StepKind::Execute | StepKind::Local => Command::ExecuteCommand(ExecuteRequest {
                step,
                host,
                command: def
                    .command
                    .as_ref()
                    .map(|t| t.render_shell(&values))
                    .unwrap_or_default(),
                workdir: Some(def.workdir.render_path(&values)),
                gpu_id: gpu,
                timeout_secs: def.config.timeout_secs,
                progress_patterns: def.config.progress.clone(),
                retryable_patterns: def.config.retryable_patterns.clone(),
            }),
        }
    }

    fn tick(&mut self, workflow: &WorkflowDef) -> Result<(), Rejected> {
        let now = self.ctx.now_ms;
        match self.case.status {
            CaseStatus::New => {
                self.transition(
                    CaseStatus::Queued,
                    &format!("accepted for workflow {}", workflow.name),
                )?;
                self.dispatch(workflow)
            }
            CaseStatus::Queued => {
                if self.case.retry_at_ms.is_some_and(|t| t > now) {
                    return Err(Rejected::Unchanged);
                }
                self.dispatch(workflow)
            }
            CaseStatus::PendingResource => {
                if self.ctx.free_gpu.is_none() {
                    return Err(Rejected::Unchanged);
                }
                self.dispatch(workflow)
            }
            CaseStatus::Processing => {
                let Some(run) = &self.case.step else {
                    return Err(Rejected::Unchanged);
                };
                if run.deadline_ms > now {
                    return Err(Rejected::Unchanged);
                }
                let def = &workflow.steps[self.case.step_index];
                let detail = format!(
                    "no result {}s after dispatch (timeout {}s plus grace); lease reclaimed",
                    (now - run.dispatched_ms) / 1000,
                    def.config.timeout_secs
                );
                if !def.is_transfer() {
                    self.effects.push(Effect::Cancel(CancelStep {
                        step: StepRef {
                            case_id: self.case.case_id.clone(),
                            step: run.name.clone(),
                            attempt: run.attempt,
                        },
                        host: def.config.host.clone(),
                    }));
                }
                self.step_failed(
                    def,
                    Failure {
                        category: FailureCategory::Retryable,
                        phase: "timeout".into(),
                        code: "deadline_passed".into(),
                        detail,
                        step: None,
                        attempt: None,
                        error_type: "TimedOut".into(),
                        output_tail: String::new(),
                    },
                )
            }
            CaseStatus::Completed | CaseStatus::Failed | CaseStatus::Cancelled => {
                Err(Rejected::Unchanged)
            }
        }
    }

    /// A step attempt failed: retry it after a backoff if that can help and the budget
    /// allows, otherwise fail the case with the structured reason.
    fn step_failed(&mut self, def: &StepDef, mut failure: Failure) -> Result<(), Rejected> {
        self.release_gpu();
        let run = self.case.step.take();
        let attempt = run
            .as_ref()
            .map(|r| r.attempt)
            .unwrap_or(self.case.attempts);
        failure.step = Some(def.config.name.clone());
        failure.attempt = Some(attempt);
        if failure.code.starts_with("exit_code_")
            && def.config.nonzero_exit == ExitPolicy::Retryable
        {
            failure.category = FailureCategory::Retryable;
        }
        if failure.category == FailureCategory::Permanent
            && def.retryable_output(&failure.output_tail)
        {
            failure.category = FailureCategory::Retryable;
        }
        let name = def.config.name.clone();
        self.event(
            Subject::Step,
            "failed",
            Some((&name, attempt)),
            &failure.detail,
        );
        let budget = def.config.retry.max_attempts;
        let used = self.case.attempts - self.case.retry_base.min(self.case.attempts);
        if failure.category == FailureCategory::Retryable && used < budget {
            let delay = backoff_ms(&def.config.retry, used, self.ctx.jitter);
            self.case.retry_at_ms = Some(self.ctx.now_ms + delay);
            // The run is gone, so the history row names the step explicitly.
            self.case.step = None;
            self.transition(
                CaseStatus::Queued,
                &format!(
                    "step {name} attempt {attempt} failed ({}: {}); retry {} of {} in {:.1}s",
                    failure.code,
                    failure.detail,
                    used + 1,
                    budget,
                    delay as f64 / 1000.0
                ),
            )?;
            if let Some(last) = self.history.last_mut() {
                last.step = Some(name);
                last.attempt = Some(attempt);
            }
            Ok(())
        } else {
            let why = if failure.category == FailureCategory::Retryable {
                format!("retry budget of {budget} attempts used up")
            } else {
                "not retryable".to_string()
            };
            let reason = format!(
                "step {name} attempt {attempt} failed ({}: {}); {why}",
                failure.code, failure.detail
            );
            self.fail_with(failure, &reason)?;
            if let Some(last) = self.history.last_mut() {
                last.step = Some(name);
                last.attempt = Some(attempt);
            }
            Ok(())
        }
    }

    fn fail(&mut self, failure: Failure) -> Result<(), Rejected> {
        let reason = format!("{}: {}", failure.code, failure.detail);
        self.fail_with(failure, &reason)
    }

    fn fail_with(&mut self, failure: Failure, reason: &str) -> Result<(), Rejected> {
        self.release_gpu();
        self.case.step = None;
        self.case.failure = Some(failure);
        self.case.retry_at_ms = None;
        self.transition(CaseStatus::Failed, reason)
    }

    fn cancel(&mut self) -> Result<(), Rejected> {
        if self.case.status.is_terminal() {
            return Err(Rejected::NotAllowed(format!(
                "case {} is {}; only unfinished cases can be cancelled",
                self.case.case_id,
                self.case.status.name()
            )));
        }
        self.release_gpu();
        self.case.step = None;
        self.case.retry_at_ms = None;
        self.transition(CaseStatus::Cancelled, "cancelled by operator")
    }
}

/// The command of a step attempt already in flight, rendered again (after a restart, when
/// its message may have been lost). Workers recognise the attempt and do not run it twice.
pub fn render_for_recovery(
    plan: &Plan,
    case: &CaseRecord,
    def: &StepDef,
    run: &StepRun,
) -> Command {
    let ctx = Ctx {
        now_ms: 0,
        jitter: 0.0,
        free_gpu: None,
    };
    let d = Decider {
        case: case.clone(),
        history: Vec::new(),
        effects: Vec::new(),
        ctx: &ctx,
        plan,
    };
    d.render(def, run.attempt, run.gpu.as_ref().map(|g| g.index))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::store::records::CaseStatus::*;

    const CONFIG: &str = r#"
data_dir = "/data"
[[hosts]]
name = "local"
gpus = [0, 1]
[[workflows.default.steps]]
name = "upload"
kind = "upload"
timeout_secs = 50
[[workflows.default.steps]]
name = "simulate"
kind = "execute"
gpu = true
timeout_secs = 100
command = "moqui --case {case_id} --gpu {gpu_id} --in {case_dir}"
retryable_patterns = ["No free GPU remains"]
retry = { max_attempts = 3, backoff_initial_secs = 10, backoff_max_secs = 25, jitter = 0.0 }
[[workflows.default.steps]]
name = "download"
kind = "download"
"#;

    fn plan() -> Plan {
        let mut p = Plan::from_config(&Config::from_toml(CONFIG, "test").unwrap());
        p.lease_grace_ms = 5_000;
        p
    }

    fn gpu(i: u32) -> GpuKey {
        GpuKey {
            host: "local".into(),
            index: i,
        }
    }

    fn new_case() -> CaseRecord {
        let found = crate::protocol::NewCase {
            case_id: "c1".into(),
            case_path: "/data/cases/patient one".into(),
            workflow: None,
            room: None,
        };
        CaseRecord::new(&found, "default", "corr", 0)
    }

    /// A case and a clock: feeds inputs, keeps the decisions.
    struct Run {
        plan: Plan,
        case: CaseRecord,
        now: u64,
        free_gpu: Option<GpuKey>,
        last: Option<Decision>,
    }

    impl Run {
        fn new() -> Run {
            Run {
                plan: plan(),
                case: new_case(),
                now: 1_000,
                free_gpu: Some(gpu(0)),
                last: None,
            }
        }

        fn feed(&mut self, input: Input) -> Result<&Decision, Rejected> {
            let ctx = Ctx {
                now_ms: self.now,
                jitter: 0.5,
                free_gpu: self.free_gpu.clone(),
            };
            let d = decide(&self.case, input, &self.plan, &ctx)?;
            self.case = d.case.clone();
            self.last = Some(d);
            Ok(self.last.as_ref().unwrap())
        }

        fn ok(&mut self, input: Input) -> Decision {
            self.feed(input.clone())
                .unwrap_or_else(|e| panic!("{input:?}: {e}"))
                .clone()
        }

        fn succeed(&mut self, step: &str) -> Decision {
            let attempt = self.case.step.as_ref().unwrap().attempt;
            self.ok(Input::Succeeded {
                step: step.into(),
                attempt,
                detail: String::new(),
                bytes: None,
            })
        }

        fn fail(&mut self, code: &str, category: FailureCategory, tail: &str) -> Decision {
            let run = self.case.step.clone().unwrap();
            self.ok(Input::Failed {
                step: Some(run.name),
                attempt: Some(run.attempt),
                failure: Failure {
                    category,
                    phase: "execute".into(),
                    code: code.into(),
                    detail: "boom".into(),
                    step: None,
                    attempt: None,
                    error_type: "RunningError".into(),
                    output_tail: tail.into(),
                },
            })
        }
    }

    fn sends(d: &Decision) -> Vec<&Command> {
        d.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Send { command, .. } => Some(command),
                _ => None,
            })
            .collect()
    }

    fn has(d: &Decision, want: &Effect) -> bool {
        d.effects.contains(want)
    }

    fn statuses(d: &Decision) -> Vec<CaseStatus> {
        d.history.iter().map(|h| h.to).collect()
    }

    #[test]
    fn a_case_runs_every_step_and_holds_a_gpu_only_for_the_gpu_step() {
        let mut r = Run::new();
        let d = r.ok(Input::Found);
        assert_eq!(statuses(&d), [Queued, Processing]);
        match sends(&d)[..] {
            [Command::UploadCase(t)] => {
                assert_eq!(t.local_dir, "/data/cases/patient one");
                assert_eq!(t.remote_dir, "/data/work/local/c1/input");
                assert_eq!((t.step.step.as_str(), t.step.attempt), ("upload", 1));
            }
            ref other => panic!("{other:?}"),
        }
        assert!(!d.effects.iter().any(|e| matches!(e, Effect::TakeGpu(_))));

        let d = r.succeed("upload");
        assert!(d.effects.iter().any(|e| matches!(e, Effect::TakeGpu(l) if l.gpu == gpu(0) && l.expires_ms == 1_000 + 105_000)));
        match sends(&d)[..] {
            [Command::ExecuteCommand(x)] => {
                assert_eq!(
                    x.command,
                    "moqui --case c1 --gpu 0 --in '/data/cases/patient one'"
                );
                assert_eq!(x.gpu_id, Some(0));
                assert_eq!(x.timeout_secs, 100);
                assert_eq!(x.workdir.as_deref(), Some("/data/work/local/c1"));
            }
            ref other => panic!("{other:?}"),
        }
        assert_eq!(r.case.status, Processing);
        assert!((r.case.progress - 1.0 / 3.0).abs() < 1e-9);

        r.now += 10;
        r.ok(Input::Started {
            step: "simulate".into(),
            attempt: 1,
            pid: Some(42),
        });
        assert_eq!(r.case.step.as_ref().unwrap().pid, Some(42));
        r.ok(Input::Progress {
            step: "simulate".into(),
            attempt: 1,
            fraction: 0.5,
        });
        assert!((r.case.progress - 0.5).abs() < 1e-9);
        assert_eq!(
            r.feed(Input::Progress {
                step: "simulate".into(),
                attempt: 1,
                fraction: 0.4,
            })
            .unwrap_err(),
            Rejected::Unchanged,
            "progress never goes backwards"
        );

        let d = r.succeed("simulate");
        assert!(has(&d, &Effect::ReleaseGpu(gpu(0))));
        assert!(
            matches!(sends(&d)[..], [Command::DownloadResults(t)] if t.local_dir == "/data/results/c1" && t.remote_dir == "/data/work/local/c1/output")
        );
        let d = r.succeed("download");
        assert_eq!(r.case.status, Completed);
        assert_eq!(r.case.progress, 1.0);
        assert_eq!(r.case.done.len(), 3);
        assert!(statuses(&d).ends_with(&[Completed]));
    }

    #[test]
    fn a_gpu_step_waits_for_a_free_gpu_and_gets_it_on_a_tick() {
        let mut r = Run::new();
        r.ok(Input::Found);
        r.free_gpu = None;
        let d = r.succeed("upload");
        assert_eq!(r.case.status, PendingResource);
        assert!(sends(&d).is_empty());
        assert_eq!(r.feed(Input::Tick).unwrap_err(), Rejected::Unchanged);
        r.free_gpu = Some(gpu(1));
        let d = r.ok(Input::Tick);
        assert_eq!(r.case.status, Processing);
        assert!(d
            .effects
            .iter()
            .any(|e| matches!(e, Effect::TakeGpu(l) if l.gpu == gpu(1))));
        assert!(matches!(sends(&d)[..], [Command::ExecuteCommand(x)] if x.gpu_id == Some(1)));
    }

    #[test]
    fn retryable_failures_back_off_exponentially_then_fail_with_the_reason() {
        let mut r = Run::new();
        r.ok(Input::Found);
        r.succeed("upload");
        let d = r.fail("lost", FailureCategory::Retryable, "");
        assert!(has(&d, &Effect::ReleaseGpu(gpu(0))));
        assert_eq!(r.case.status, Queued);
        assert_eq!(r.case.retry_at_ms, Some(r.now + 10_000));
        r.now += 9_999;
        assert_eq!(r.feed(Input::Tick).unwrap_err(), Rejected::Unchanged);
        r.now += 1;
        let d = r.ok(Input::Tick);
        assert!(matches!(sends(&d)[..], [Command::ExecuteCommand(x)] if x.step.attempt == 2));
        r.fail("lost", FailureCategory::Retryable, "");
        assert_eq!(r.case.retry_at_ms, Some(r.now + 20_000), "doubled");
        r.now += 20_000;
        r.ok(Input::Tick);
        let d = r.fail("lost", FailureCategory::Retryable, "");
        assert_eq!(r.case.status, Failed);
        assert!(has(&d, &Effect::ReleaseGpu(gpu(0))));
        let f = r.case.failure.as_ref().unwrap();
        assert_eq!(
            (f.code.as_str(), f.step.as_deref(), f.attempt),
            ("lost", Some("simulate"), Some(3))
        );
        assert!(d
            .history
            .last()
            .unwrap()
            .reason
            .contains("retry budget of 3 attempts used up"));
    }

    #[test]
    fn exit_codes_are_permanent_unless_the_output_or_policy_says_otherwise() {
        let mut r = Run::new();
        r.ok(Input::Found);
        r.succeed("upload");
        r.fail(
            "exit_code_1",
            FailureCategory::Permanent,
            "FATAL ERROR: bad input",
        );
        assert_eq!(r.case.status, Failed);
        assert_eq!(
            r.case.failure.as_ref().unwrap().category,
            FailureCategory::Permanent
        );

        let mut r = Run::new();
        r.ok(Input::Found);
        r.succeed("upload");
        r.fail(
            "exit_code_1",
            FailureCategory::Permanent,
            "No free GPU remains after BeamLayerMultiGpu filtering",
        );
        assert_eq!(
            r.case.status, Queued,
            "the configured pattern makes it retryable"
        );

        let mut r = Run::new();
        r.plan.workflows.get_mut("default").unwrap().steps[1]
            .config
            .nonzero_exit = crate::config::ExitPolicy::Retryable;
        r.ok(Input::Found);
        r.succeed("upload");
        r.fail("exit_code_3", FailureCategory::Permanent, "");
        assert_eq!(r.case.status, Queued);
    }

    #[test]
    fn transfer_steps_record_and_count_their_bytes() {
        let mut r = Run::new();
        r.ok(Input::Found);
        let d = r.ok(Input::Succeeded {
            step: "upload".into(),
            attempt: 1,
            detail: String::new(),
            bytes: Some(1234),
        });
        assert!(d.effects.contains(&Effect::Transferred {
            kind: StepKind::Upload,
            bytes: 1234
        }));
        assert_eq!(r.case.done[0].bytes, Some(1234));
        // A step that moves nothing counts nothing, whatever its result says.
        let d = r.ok(Input::Succeeded {
            step: "simulate".into(),
            attempt: 1,
            detail: String::new(),
            bytes: Some(99),
        });
        assert!(!d
            .effects
            .iter()
            .any(|e| matches!(e, Effect::Transferred { .. })));
        assert_eq!(r.case.done[1].bytes, None);
    }

    #[test]
    fn duplicate_and_stale_results_change_nothing() {
        let mut r = Run::new();
        r.ok(Input::Found);
        r.succeed("upload");
        let dup = Input::Succeeded {
            step: "upload".into(),
            attempt: 1,
            detail: String::new(),
            bytes: None,
        };
        assert!(matches!(r.feed(dup).unwrap_err(), Rejected::Stale(_)));
        r.fail("lost", FailureCategory::Retryable, "");
        r.now += 10_000;
        r.ok(Input::Tick);
        let late = Input::Succeeded {
            step: "simulate".into(),
            attempt: 1,
            detail: String::new(),
            bytes: None,
        };
        assert!(matches!(r.feed(late).unwrap_err(), Rejected::Stale(_)));
        let late_start = Input::Started {
            step: "simulate".into(),
            attempt: 1,
            pid: None,
        };
        assert!(matches!(
            r.feed(late_start).unwrap_err(),
            Rejected::Stale(_)
        ));
        assert_eq!(r.case.step.as_ref().unwrap().attempt, 2);
        assert!(matches!(
            r.feed(Input::Found).unwrap_err(),
            Rejected::Stale(_)
        ));
    }

    #[test]
    fn a_seed_failure_naming_only_a_step_must_name_the_current_one() {
        let mut r = Run::new();
        r.ok(Input::Found);
        r.succeed("upload");
        let failure = Failure {
            category: FailureCategory::Permanent,
            phase: "execute".into(),
            code: "running_error".into(),
            detail: "x".into(),
            step: None,
            attempt: None,
            error_type: "RunningError".into(),
            output_tail: String::new(),
        };
        let wrong = Input::Failed {
            step: Some("upload".into()),
            attempt: None,
            failure: failure.clone(),
        };
        assert!(matches!(r.feed(wrong).unwrap_err(), Rejected::Stale(_)));
        let wrong_attempt = Input::Failed {
            step: None,
            attempt: Some(7),
            failure: failure.clone(),
        };
        assert!(matches!(
            r.feed(wrong_attempt).unwrap_err(),
            Rejected::Stale(_)
        ));
        r.ok(Input::Failed {
            step: None,
            attempt: None,
            failure,
        });
        assert_eq!(r.case.status, Failed);
    }

    #[test]
    fn an_unsafe_case_id_fails_at_intake_and_a_shrunk_workflow_fails_in_flight_cases() {
        for bad in ["Patient 1", "-rf", ".hidden", "a/b", "x;y"] {
            let mut r = Run::new();
            r.case.case_id = bad.into();
            let d = r.ok(Input::Found);
            assert_eq!(r.case.status, Failed, "{bad}");
            assert_eq!(r.case.failure.as_ref().unwrap().code, "invalid_case_id");
            assert!(sends(&d).is_empty(), "{bad}: nothing is dispatched");
        }
        let mut r = Run::new();
        r.ok(Input::Found);
        r.succeed("upload");
        r.plan
            .workflows
            .get_mut("default")
            .unwrap()
            .steps
            .truncate(1);
        r.ok(Input::Tick);
        assert_eq!(r.case.status, Failed);
        assert_eq!(r.case.failure.as_ref().unwrap().code, "workflow_changed");
    }

    #[test]
    fn the_timeout_counts_from_the_start_not_the_dispatch() {
        let mut r = Run::new();
        r.ok(Input::Found);
        r.succeed("upload");
        r.now += 50_000;
        r.ok(Input::Started {
            step: "simulate".into(),
            attempt: 1,
            pid: Some(1),
        });
        assert_eq!(r.case.step.as_ref().unwrap().deadline_ms, r.now + 105_000);
    }

    #[test]
    fn a_step_past_its_deadline_is_cancelled_its_lease_reclaimed_and_retried() {
        let mut r = Run::new();
        r.ok(Input::Found);
        r.succeed("upload");
        let deadline = r.case.step.as_ref().unwrap().deadline_ms;
        r.now = deadline - 1;
        assert_eq!(r.feed(Input::Tick).unwrap_err(), Rejected::Unchanged);
        r.now = deadline;
        let d = r.ok(Input::Tick);
        assert!(has(&d, &Effect::ReleaseGpu(gpu(0))));
        assert!(d.effects.iter().any(
            |e| matches!(e, Effect::Cancel(c) if c.step.step == "simulate" && c.step.attempt == 1)
        ));
        assert!(sends(&d).is_empty());
        assert_eq!(r.case.status, Queued);
        assert!(d.history.last().unwrap().reason.contains("deadline_passed"));
    }

    #[test]
    fn cancel_works_in_every_unfinished_phase_and_frees_the_gpu() {
        // Queued, waiting for a retry.
        let mut r = Run::new();
        r.ok(Input::Found);
        r.succeed("upload");
        r.fail("lost", FailureCategory::Retryable, "");
        let d = r.ok(Input::Cancel);
        assert_eq!(r.case.status, Cancelled);
        assert!(sends(&d).is_empty());

        // Waiting for a GPU.
        let mut r = Run::new();
        r.ok(Input::Found);
        r.free_gpu = None;
        r.succeed("upload");
        assert_eq!(r.case.status, PendingResource);
        r.ok(Input::Cancel);
        assert_eq!(r.case.status, Cancelled);

        // During a transfer: no process to kill.
        let mut r = Run::new();
        r.ok(Input::Found);
        let d = r.ok(Input::Cancel);
        assert!(sends(&d).is_empty());
        assert_eq!(r.case.status, Cancelled);

        // During execution: the process is killed and the GPU released.
        let mut r = Run::new();
        r.ok(Input::Found);
        r.succeed("upload");
        let d = r.ok(Input::Cancel);
        assert!(d.effects.iter().any(|e| matches!(e, Effect::Cancel(_))));
        assert!(has(&d, &Effect::ReleaseGpu(gpu(0))));
        assert!(r.case.step.is_none());

        // A cancelled step's late result is stale; a finished case cannot be cancelled.
        let late = Input::Succeeded {
            step: "simulate".into(),
            attempt: 1,
            detail: String::new(),
            bytes: None,
        };
        assert!(matches!(r.feed(late).unwrap_err(), Rejected::Stale(_)));
        assert!(matches!(
            r.feed(Input::Cancel).unwrap_err(),
            Rejected::NotAllowed(_)
        ));

        // A NEW case can be cancelled before it starts.
        let mut r = Run::new();
        r.ok(Input::Cancel);
        assert_eq!(r.case.status, Cancelled);
    }

    #[test]
    fn retry_resumes_at_the_failed_step_with_a_fresh_budget() {
        let mut r = Run::new();
        r.ok(Input::Found);
        assert!(matches!(
            r.feed(Input::Retry).unwrap_err(),
            Rejected::NotAllowed(_)
        ));
        r.succeed("upload");
        r.fail("exit_code_2", FailureCategory::Permanent, "");
        assert_eq!(r.case.status, Failed);
        let progress = r.case.progress;
        let d = r.ok(Input::Retry);
        assert_eq!(statuses(&d), [Queued, Processing]);
        assert!(
            matches!(sends(&d)[..], [Command::ExecuteCommand(x)] if x.step.step == "simulate" && x.step.attempt == 2),
            "attempt numbers are never reused: the host keeps attempt 1's directory"
        );
        assert!(r.case.failure.is_none());
        assert_eq!(r.case.manual_retries, 1);
        assert_eq!(r.case.progress, progress, "progress kept");
        r.fail("lost", FailureCategory::Retryable, "");
        assert_eq!(
            r.case.status, Queued,
            "a fresh budget after the operator's retry"
        );
        r.now += 10_000;
        r.ok(Input::Tick);
        r.succeed("simulate");
        r.succeed("download");
        assert_eq!(r.case.status, Completed);
        assert!(matches!(
            r.feed(Input::Retry).unwrap_err(),
            Rejected::NotAllowed(_)
        ));
    }

    #[test]
    fn an_unknown_workflow_fails_the_case_with_a_reason() {
        let mut r = Run::new();
        r.case.workflow = "nope".into();
        r.ok(Input::Found);
        assert_eq!(r.case.status, Failed);
        assert_eq!(r.case.failure.as_ref().unwrap().code, "no_workflow");
    }

    #[test]
    fn history_rows_name_every_transition_in_order() {
        let mut r = Run::new();
        let mut rows = r.ok(Input::Found).history;
        rows.extend(r.succeed("upload").history);
        rows.extend(r.fail("lost", FailureCategory::Retryable, "").history);
        for w in rows.windows(2) {
            assert_eq!(w[0].to, w[1].from.unwrap(), "{w:?}");
            assert!(w[0].from.unwrap().can_become(w[0].to) || w[0].from == Some(w[0].to));
        }
        assert!(rows.iter().all(|h| !h.reason.is_empty()));
    }

    #[test]
    fn backoff_is_exponential_capped_and_jittered_within_bounds() {
        let p = crate::config::RetryPolicy {
            max_attempts: 5,
            backoff_initial_secs: 2.0,
            backoff_max_secs: 10.0,
            jitter: 0.25,
        };
        assert_eq!(backoff_ms(&p, 1, 0.5), 2_000);
        assert_eq!(backoff_ms(&p, 2, 0.5), 4_000);
        assert_eq!(backoff_ms(&p, 3, 0.5), 8_000);
        assert_eq!(backoff_ms(&p, 4, 0.5), 10_000);
        assert_eq!(backoff_ms(&p, 1, 0.0), 1_500);
        assert!(backoff_ms(&p, 1, 0.999_999) <= 2_500);
        assert_eq!(backoff_ms(&p, 100, 0.5), 10_000);
    }
}
