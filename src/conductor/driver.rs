//! The conductor's driver: it turns worker messages, operator requests and the passage of
//! time into [`Input`]s, asks the state machine, and applies each decision — the case, its
//! history rows, GPU leases and outbox messages — in one store transaction. After a crash
//! nothing is lost: decisions are either wholly in the store or not at all, the relay
//! publishes whatever the outbox still holds, and [`Conductor::recover`] re-sends the
//! command of every step in flight (workers recognise an attempt they already ran).

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::Notify;

use super::machine::{decide, Ctx, Effect, Input, Rejected};
use super::plan::Plan;
use crate::bus::Bus;
use crate::config::{HostConfig, StepKind};
use crate::protocol::events::EVENTS_EXCHANGE;
use crate::protocol::topology::{
    CONDUCTOR_QUEUE, CONTROL_EXCHANGE, FILE_TRANSFER_QUEUE, REMOTE_EXECUTOR_QUEUE,
};
use crate::protocol::{CaseId, Command, Envelope, FailureCategory, FailurePayload, NewCase};
use crate::store::records::{
    now_ms, CaseRecord, CaseStatus, Failure, GpuKey, GpuRecord, HistoryRow, OutboxEntry,
    ScannedCase, WorkerRecord,
};
use crate::store::{Store, StoreResult, Tx};
use crate::workers::{self, Handled, Shutdown, WorkerStatus};

/// The conductor: the store, the plan, and the signals to the relay and the ticker.
pub struct Conductor {
    pub store: Store,
    pub plan: Arc<Plan>,
    event_log_len: u64,
    /// Wakes the outbox relay after a commit that queued messages.
    pub outbox_ready: Arc<Notify>,
    /// Wakes the ticker when a GPU was freed, so waiting cases get it at once.
    pub gpu_freed: Arc<Notify>,
}

/// What applying an input did.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    Changed(CaseStatus),
    Rejected(Rejected),
    NoSuchCase,
}

impl Conductor {
    pub fn new(store: Store, plan: Arc<Plan>, event_log_len: u64) -> Arc<Conductor> {
        Arc::new(Conductor {
            store,
            plan,
            event_log_len,
            outbox_ready: Arc::new(Notify::new()),
            gpu_freed: Arc::new(Notify::new()),
        })
    }

    /// Start-up: records the configured GPUs, reclaims leases nobody holds, and re-sends
    /// the command of every step in flight (its result may have been lost in a crash).
    /// Returns how many steps were re-sent.
    pub fn recover(&self, hosts: &[HostConfig]) -> StoreResult<usize> {
        let now = now_ms();
        let resent = self.store.write(|tx| {
            let configured: Vec<GpuKey> = hosts
                .iter()
                .flat_map(|h| {
                    h.gpus.iter().map(|i| GpuKey {
                        host: h.name.clone(),
                        index: *i,
                    })
                })
                .collect();
            let known = tx.gpus()?;
            for existing in &known {
                if !configured.contains(&existing.gpu) && existing.usable {
                    tx.put_gpu(&GpuRecord {
                        usable: false,
                        ..existing.clone()
                    })?;
                }
            }
            // What the curator saw survives a restart: a stale state keeps the GPU from
            // being leased until the first new sample, instead of trusting it blindly.
            for gpu in &configured {
                let seen = known.iter().find(|g| &g.gpu == gpu);
                tx.put_gpu(&GpuRecord {
                    gpu: gpu.clone(),
                    usable: true,
                    name: seen.map(|g| g.name.clone()).unwrap_or_default(),
                    last_seen_ms: seen.map(|g| g.last_seen_ms).unwrap_or(0),
                    state: seen.and_then(|g| g.state.clone()),
                })?;
            }
            reclaim_orphan_leases(tx)?;
            let mut resent = 0;
            for mut case in tx.cases()? {
                if case.status != CaseStatus::Processing {
                    continue;
                }
                // While mqic was down nobody could report; give in-flight steps the grace
                // period to report again before their deadline reclaims the lease.
                if let Some(run) = case.step.as_mut() {
                    let floor = now + self.plan.lease_grace_ms;
                    if run.deadline_ms < floor {
                        run.deadline_ms = floor;
                        tx.put_case(&case)?;
                    }
                }
                let (Some(run), Some(workflow)) = (&case.step, self.plan.workflow(&case.workflow))
                else {
                    continue;
                };
                let Some(def) = workflow.steps.get(case.step_index) else {
                    continue;
                };
                let command = super::machine::render_for_recovery(&self.plan, &case, def, run);
                let queue = if def.is_transfer() {
                    FILE_TRANSFER_QUEUE
                } else {
                    REMOTE_EXECUTOR_QUEUE
                };
                push_command(tx, queue, command, &case.correlation_id)?;
                resent += 1;
            }
            Ok(resent)
        })?;
        self.outbox_ready.notify_one();
        Ok(resent)
    }

    /// Records a newly found case (once: a second announcement changes nothing) and starts
    /// it, in one transaction. Returns whether it was new.
    pub fn admit(&self, new: &NewCase, correlation_id: &str) -> StoreResult<bool> {
        self.admit_scanned(new, correlation_id, false)
    }

    /// As [`Conductor::admit`], also recording the case as scanned when `scanned` is set
    /// (the scanner's announcement and the case's creation are one transaction).
    pub fn admit_scanned(
        &self,
        new: &NewCase,
        correlation_id: &str,
        scanned: bool,
    ) -> StoreResult<bool> {
        let now = now_ms();
        let created = self.store.write(|tx| {
            let existing = tx.case(&new.case_id)?;
            if let Some(existing) = &existing {
                if existing.case_path != new.case_path {
                    tracing::warn!(
                        case = %new.case_id,
                        "{} has the same case id as {}; it is not started (rename one folder)",
                        new.case_path,
                        existing.case_path
                    );
                }
            }
            let fresh_scan = !scanned
                || tx.insert_scanned(
                    &new.case_id,
                    &ScannedCase {
                        case_path: new.case_path.clone(),
                        found_ms: now,
                    },
                )?;
            if !fresh_scan || existing.is_some() {
                return Ok(false);
            }
            if tx.is_archived(&new.case_id)? {
                // Its attempt directories still exist on the hosts; starting again at
                // attempt 1 would find the old results. An operator renames the folder.
                tracing::warn!(case = %new.case_id, "new_case_found for an archived case; ignored");
                return Ok(false);
            }
            let workflow = new
                .workflow
                .clone()
                .unwrap_or_else(|| self.plan.default_workflow.clone());
            let mut case = CaseRecord::new(new, &workflow, correlation_id, now);
            tx.push_history(
                &mut case,
                &HistoryRow {
                    at_ms: now,
                    from: None,
                    to: CaseStatus::New,
                    step: None,
                    attempt: None,
                    reason: format!("found at {}", new.case_path),
                },
            )?;
            tx.put_case(&case)?;
            self.apply_in(tx, &new.case_id, Input::Found, now)?;
            Ok(true)
        })?;
        if created {
            self.outbox_ready.notify_one();
        }
        Ok(created)
    }

    /// Applies one input to one case, in one transaction.
    pub fn apply(&self, id: &CaseId, input: Input) -> StoreResult<Applied> {
        let now = now_ms();
        let (applied, freed) = self.store.write(|tx| self.apply_in(tx, id, input, now))?;
        if matches!(applied, Applied::Changed(_)) {
            self.outbox_ready.notify_one();
        }
        if freed {
            self.gpu_freed.notify_one();
        }
        Ok(applied)
    }

    fn apply_in(
        &self,
        tx: &mut Tx<'_>,
        id: &CaseId,
        input: Input,
        now: u64,
    ) -> StoreResult<(Applied, bool)> {
        let Some(case) = tx.case(id)? else {
            return Ok((Applied::NoSuchCase, false));
        };
        let ctx = Ctx {
            now_ms: now,
            jitter: rand::rng().random::<f64>(),
            free_gpu: self.free_gpu(tx, &case, now)?,
        };
        let decision = match decide(&case, input, &self.plan, &ctx) {
            Ok(d) => d,
            Err(r) => return Ok((Applied::Rejected(r), false)),
        };
        let mut case = decision.case;
        // Whether this decision freed a GPU: the ticker then re-drives waiting cases at once.
        let mut freed = false;
        for row in &decision.history {
            tx.push_history(&mut case, row)?;
        }
        for effect in decision.effects {
            match effect {
                Effect::Send { queue, command } => {
                    push_command(tx, queue, command, &case.correlation_id)?
                }
                Effect::Event(event) => {
                    tx.push_event(&event, self.event_log_len)?;
                    tx.push_outbox(&OutboxEntry {
                        exchange: EVENTS_EXCHANGE.to_string(),
                        routing_key: event.routing_key(),
                        body: serde_json::to_string(&event).expect("events serialize"),
                        correlation_id: Some(case.correlation_id.clone()),
                        persistent: false,
                    })?;
                }
                Effect::TakeGpu(lease) => {
                    // free_gpu looked in this same transaction, so the GPU is free; if not,
                    // the whole decision is aborted rather than run without a lease.
                    if !tx.take_lease(&lease)? {
                        return Err(crate::store::StoreError::Conflict(format!(
                            "GPU {} is already leased",
                            lease.gpu
                        )));
                    }
                }
                Effect::Cancel(cancel) => {
                    // Durably to one executor, and to every live one on the control exchange
                    // (with several executors only the broadcast is sure to reach the right
                    // one); killing an attempt twice is harmless.
                    push_command(
                        tx,
                        REMOTE_EXECUTOR_QUEUE,
                        Command::CancelStep(cancel.clone()),
                        &case.correlation_id,
                    )?;
                    let routing_key = format!("cancel.{}", cancel.host);
                    let envelope = Envelope::with_correlation(
                        Command::CancelStep(cancel),
                        case.correlation_id.clone(),
                    );
                    tx.push_outbox(&OutboxEntry {
                        exchange: CONTROL_EXCHANGE.to_string(),
                        routing_key,
                        body: String::from_utf8(envelope.to_bytes()).expect("JSON is UTF-8"),
                        correlation_id: Some(case.correlation_id.clone()),
                        persistent: false,
                    })?;
                }
                Effect::ReleaseGpu(gpu) => {
                    freed |= tx.release_lease(&gpu, &case.case_id)?;
                }
                Effect::Transferred { kind, bytes } => {
                    tx.add_counter(transfer_counter(kind), bytes)?;
                }
            }
        }
        tx.put_case(&case)?;
        Ok((Applied::Changed(case.status), freed))
    }

    /// A usable, unleased GPU on the host of the case's current step, if that step needs one.
    fn free_gpu(&self, tx: &Tx<'_>, case: &CaseRecord, now: u64) -> StoreResult<Option<GpuKey>> {
        let Some(workflow) = self.plan.workflow(&case.workflow) else {
            return Ok(None);
        };
        let next = match case.status {
            CaseStatus::Processing => case.step_index + 1,
            _ => case.step_index,
        };
        // A Processing case that succeeds moves to the next step; any other status
        // dispatches the current one. Offer a GPU for whichever step that is.
        let candidates = [case.step_index, next];
        let Some(def) = candidates
            .iter()
            .filter_map(|i| workflow.steps.get(*i))
            .find(|d| d.config.gpu)
        else {
            return Ok(None);
        };
        let leased: Vec<GpuKey> = tx.leases()?.into_iter().map(|l| l.gpu).collect();
        let gpus = self.leasable(tx.gpus()?, &leased, now);
        Ok(gpus.into_iter().find(|g| g.host == def.config.host))
    }

    /// The GPUs that may be leased now, in order: configured, not leased, and passing the
    /// lease rule (seen in the last sample, not in error, no process on it, enough free
    /// memory; without monitoring data, as configured).
    fn leasable(&self, gpus: Vec<GpuRecord>, leased: &[GpuKey], now: u64) -> Vec<GpuKey> {
        let mut out: Vec<GpuKey> = gpus
            .into_iter()
            .filter(|g| !leased.contains(&g.gpu))
            .filter(|g| match self.plan.gpu_policy.refusal(g, now) {
                None => true,
                Some(why) => {
                    tracing::trace!(gpu = %g.gpu, "not leasable: {why}");
                    false
                }
            })
            .map(|g| g.gpu)
            .collect();
        out.sort();
        out
    }

    /// Ticks every unfinished case that may have something due; returns how many changed.
    pub fn tick_all(&self) -> StoreResult<usize> {
        let now = now_ms();
        let mut cases = self.store.cases()?;
        // Longest-waiting first, so a free GPU goes to the case that has waited longest.
        cases.sort_by_key(|c| c.updated_ms);
        let leased: Vec<GpuKey> = self.store.leases()?.into_iter().map(|l| l.gpu).collect();
        let any_free = !self.leasable(self.store.gpus()?, &leased, now).is_empty();
        let mut changed = 0;
        for case in cases {
            let due = match case.status {
                CaseStatus::New => true,
                CaseStatus::Queued => case.retry_at_ms.is_none_or(|t| t <= now),
                CaseStatus::PendingResource => any_free,
                CaseStatus::Processing => case.step.as_ref().is_some_and(|r| r.deadline_ms <= now),
                _ => false,
            };
            if due && matches!(self.apply(&case.case_id, Input::Tick)?, Applied::Changed(_)) {
                changed += 1;
            }
        }
        if changed > 0 {
            self.store.write(reclaim_orphan_leases)?;
        }
        Ok(changed)
    }

    /// Maps one worker message to an input (or a record) and applies it.
    pub fn handle(&self, envelope: &Envelope) -> Result<(), String> {
        let (id, input) = match &envelope.command {
            Command::NewCaseFound(new) => {
                let created = self
                    .admit(new, &envelope.correlation_id)
                    .map_err(|e| e.to_string())?;
                if !created {
                    tracing::info!(case = %new.case_id, "new_case_found for a known case; ignored");
                }
                return Ok(());
            }
            Command::WorkerHeartbeat(hb) => {
                let record = WorkerRecord {
                    name: hb.name.clone(),
                    role: hb.role.clone(),
                    hostname: hb.hostname.clone(),
                    pid: hb.pid,
                    started_at: hb.started_at.clone(),
                    status: hb.status.clone(),
                    interval_secs: hb.interval_secs,
                    last_seen_ms: now_ms(),
                };
                return self
                    .store
                    .write(|tx| tx.put_worker(&record))
                    .map_err(|e| e.to_string());
            }
            Command::ExecutionStarted(s) => (
                s.step.case_id.clone(),
                Input::Started {
                    step: s.step.step.clone(),
                    attempt: s.step.attempt,
                    pid: s.pid,
                },
            ),
            Command::ExecutionProgress(p) => (
                p.step.case_id.clone(),
                Input::Progress {
                    step: p.step.step.clone(),
                    attempt: p.step.attempt,
                    fraction: p.fraction,
                },
            ),
            Command::ExecutionSucceeded(s) => (
                s.step.case_id.clone(),
                Input::Succeeded {
                    step: s.step.step.clone(),
                    attempt: s.step.attempt,
                    detail: format!(
                        "exit {} after {:.1}s",
                        s.exit_code,
                        s.duration_ms as f64 / 1000.0
                    ),
                    bytes: None,
                },
            ),
            Command::CaseUploadCompleted(d) | Command::ResultsDownloadCompleted(d) => (
                d.step.case_id.clone(),
                Input::Succeeded {
                    step: d.step.step.clone(),
                    attempt: d.step.attempt,
                    detail: format!(
                        "{} files, {} bytes ({} already there, {} bytes copied)",
                        d.files, d.bytes, d.skipped, d.copied_bytes
                    ),
                    bytes: Some(d.copied_bytes),
                },
            ),
            Command::ExecutionFailed(f) | Command::FileTransferFailed(f) => {
                let transfer = matches!(envelope.command, Command::FileTransferFailed(_));
                (f.case_id.clone(), failed_input(f, transfer))
            }
            other => return Err(format!("`{}` is not a conductor command", other.name())),
        };
        match self.apply(&id, input).map_err(|e| e.to_string())? {
            Applied::Changed(_) => {}
            Applied::Rejected(Rejected::Unchanged) => {}
            Applied::Rejected(r) => {
                tracing::info!(case = %id, "{} ignored: {r}", envelope.command.name())
            }
            Applied::NoSuchCase => {
                tracing::warn!(case = %id, "{} for an unknown case; ignored", envelope.command.name())
            }
        }
        Ok(())
    }
}

/// The store counters (see [`Store::counter`]) summing the bytes transfer steps copied.
pub const TRANSFER_BYTES_UPLOAD: &str = "transfer_bytes.upload";
pub const TRANSFER_BYTES_DOWNLOAD: &str = "transfer_bytes.download";

fn transfer_counter(kind: StepKind) -> &'static str {
    match kind {
        StepKind::Download => TRANSFER_BYTES_DOWNLOAD,
        _ => TRANSFER_BYTES_UPLOAD,
    }
}

fn failed_input(f: &FailurePayload, transfer: bool) -> Input {
    let failure = match &f.failure {
        Some(info) => Failure {
            category: info.category,
            phase: info.phase.clone(),
            code: info.code.clone(),
            detail: info.detail.clone(),
            step: f.step.clone(),
            attempt: f.attempt,
            error_type: f.error_type.clone(),
            output_tail: f.output_tail.clone(),
        },
        // A seed-format failure without the structured record: transfers are worth a retry,
        // a failed execution is not (exit codes are not guessed at).
        None => Failure {
            category: if transfer {
                FailureCategory::Retryable
            } else {
                FailureCategory::Permanent
            },
            phase: if transfer { "transfer" } else { "execute" }.into(),
            code: to_snake(&f.error_type),
            detail: f.error_message.clone(),
            step: f.step.clone(),
            attempt: f.attempt,
            error_type: f.error_type.clone(),
            output_tail: f.output_tail.clone(),
        },
    };
    Input::Failed {
        step: f.step.clone(),
        attempt: f.attempt,
        failure,
    }
}

fn to_snake(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn push_command(
    tx: &mut Tx<'_>,
    queue: &str,
    command: Command,
    correlation_id: &str,
) -> StoreResult<()> {
    let envelope = Envelope::with_correlation(command, correlation_id.to_string());
    tx.push_outbox(&OutboxEntry {
        exchange: String::new(),
        routing_key: queue.to_string(),
        body: String::from_utf8(envelope.to_bytes()).expect("JSON is UTF-8"),
        correlation_id: Some(correlation_id.to_string()),
        persistent: true,
    })?;
    Ok(())
}

/// Deletes leases whose holder no longer holds them: the case is gone, finished, or on
/// another step or attempt (its holder died without releasing). Returns how many.
fn reclaim_orphan_leases(tx: &mut Tx<'_>) -> StoreResult<usize> {
    let mut reclaimed = 0;
    for lease in tx.leases()? {
        let held = tx.case(&lease.case_id)?.is_some_and(|c| {
            c.step.as_ref().is_some_and(|r| {
                r.gpu.as_ref() == Some(&lease.gpu)
                    && r.name == lease.step
                    && r.attempt == lease.attempt
            })
        });
        if !held {
            tracing::warn!(gpu = %lease.gpu, case = %lease.case_id, "reclaiming a GPU lease its holder no longer holds");
            tx.release_lease(&lease.gpu, &lease.case_id)?;
            reclaimed += 1;
        }
    }
    Ok(reclaimed)
}

/// The conductor's queue worker: consumes `conductor_queue` until shutdown.
pub async fn run(
    conductor: Arc<Conductor>,
    bus: Arc<dyn Bus>,
    status: Arc<WorkerStatus>,
    shutdown: Shutdown,
) {
    workers::consume(
        bus,
        CONDUCTOR_QUEUE,
        64,
        status,
        shutdown,
        move |envelope, delivery| {
            let conductor = conductor.clone();
            async move {
                let outcome =
                    tokio::task::spawn_blocking(move || conductor.handle(&envelope)).await;
                match outcome {
                    Ok(Ok(())) => (Handled::Ack, Some(delivery)),
                    Ok(Err(reason)) if reason.contains("is not a conductor command") => {
                        (Handled::Reject(reason), Some(delivery))
                    }
                    Ok(Err(reason)) => {
                        tracing::error!("conductor could not apply a message: {reason}");
                        (Handled::Retry, Some(delivery))
                    }
                    Err(e) => {
                        tracing::error!("conductor task failed: {e}");
                        (Handled::Retry, Some(delivery))
                    }
                }
            }
        },
    )
    .await
}

/// Ticks cases every `every` and whenever a GPU is freed, until shutdown.
pub async fn ticker(conductor: Arc<Conductor>, every: Duration, mut shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = conductor.gpu_freed.notified() => {}
            _ = workers::stopped(&mut shutdown) => return,
        }
        let c = conductor.clone();
        match tokio::task::spawn_blocking(move || c.tick_all()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!("conductor tick failed: {e}"),
            Err(e) => tracing::error!("conductor tick task failed: {e}"),
        }
    }
}

impl Conductor {
    /// Queues a command for a work queue through the outbox (no case involved).
    pub fn enqueue(&self, queue: &str, command: Command) -> StoreResult<()> {
        let correlation = uuid::Uuid::new_v4().to_string();
        self.store
            .write(|tx| push_command(tx, queue, command, &correlation))?;
        self.outbox_ready.notify_one();
        Ok(())
    }
}
