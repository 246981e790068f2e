//! The records the store keeps. Times are milliseconds since the Unix epoch (UTC) so they
//! compare across restarts and hosts; the UI formats them.

use serde::{Deserialize, Serialize};

use crate::protocol::{CaseId, FailureCategory};

/// A case's status. The one transition table is [`CaseStatus::can_become`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CaseStatus {
    /// Recorded, not yet looked at.
    New,
    /// Waiting to dispatch its next step (first dispatch, or a retry whose backoff runs).
    Queued,
    /// Its next step needs a GPU and none is free.
    PendingResource,
    /// A step is dispatched or running.
    Processing,
    Completed,
    Failed,
    Cancelled,
}

impl CaseStatus {
    pub const ALL: [CaseStatus; 7] = [
        CaseStatus::New,
        CaseStatus::Queued,
        CaseStatus::PendingResource,
        CaseStatus::Processing,
        CaseStatus::Completed,
        CaseStatus::Failed,
        CaseStatus::Cancelled,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CaseStatus::New => "NEW",
            CaseStatus::Queued => "QUEUED",
            CaseStatus::PendingResource => "PENDING_RESOURCE",
            CaseStatus::Processing => "PROCESSING",
            CaseStatus::Completed => "COMPLETED",
            CaseStatus::Failed => "FAILED",
            CaseStatus::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<CaseStatus> {
        let upper = s.to_ascii_uppercase();
        CaseStatus::ALL.into_iter().find(|c| c.name() == upper)
    }

    /// Finished: nothing more happens without an operator.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            CaseStatus::Completed | CaseStatus::Failed | CaseStatus::Cancelled
        )
    }

    /// The transition table: every allowed (from, to) pair, and nothing else.
    pub fn can_become(self, to: CaseStatus) -> bool {
        use CaseStatus::*;
        match (self, to) {
            (New, Queued | Failed | Cancelled) => true,
            (Queued, Processing | PendingResource | Failed | Cancelled) => true,
            (PendingResource, Processing | Cancelled | Failed) => true,
            (
                Processing,
                Processing | Queued | PendingResource | Completed | Failed | Cancelled,
            ) => true,
            (Failed | Cancelled, Queued) => true,
            (
                New | Queued | PendingResource | Completed | Failed | Cancelled,
                New | Queued | PendingResource | Processing | Completed | Failed | Cancelled,
            ) => false,
            (Processing, New) => false,
        }
    }
}

/// A GPU on a host: `host:index`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GpuKey {
    pub host: String,
    pub index: u32,
}

impl GpuKey {
    pub fn key(&self) -> String {
        format!("{}:{}", self.host, self.index)
    }
}

impl std::fmt::Display for GpuKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.index)
    }
}

/// The attempt of the step a case is on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRun {
    pub name: String,
    /// 1-based; a result for another attempt is stale.
    pub attempt: u32,
    pub dispatched_ms: u64,
    #[serde(default)]
    pub started_ms: Option<u64>,
    /// Past this, the step is treated as timed out and its GPU lease is reclaimed.
    pub deadline_ms: u64,
    #[serde(default)]
    pub pid: Option<u32>,
    /// 0.0 to 1.0 within the step; only increases.
    #[serde(default)]
    pub progress: f64,
    #[serde(default)]
    pub gpu: Option<GpuKey>,
}

/// How a finished step went, kept for the timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepDone {
    pub name: String,
    pub attempts: u32,
    pub started_ms: u64,
    pub finished_ms: u64,
    /// Bytes a transfer step copied (absent for other steps and older records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

/// The structured failure of a case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub category: FailureCategory,
    pub phase: String,
    pub code: String,
    pub detail: String,
    #[serde(default)]
    pub step: Option<String>,
    #[serde(default)]
    pub attempt: Option<u32>,
    /// The seed `error_type` (`RunningError`, `TimedOut`, ...).
    #[serde(default)]
    pub error_type: String,
    /// The end of the step's output, when there was one.
    #[serde(default)]
    pub output_tail: String,
}

/// A case. The conductor's state machine is the only code that changes one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseRecord {
    pub case_id: CaseId,
    pub case_path: String,
    #[serde(default)]
    pub room: Option<String>,
    pub workflow: String,
    pub status: CaseStatus,
    /// The index of the step the case is on (`steps.len()` once completed).
    pub step_index: usize,
    /// The current attempt, while a step is dispatched or running.
    #[serde(default)]
    pub step: Option<StepRun>,
    /// Attempts made of the current step so far. Attempt numbers are never reused (an
    /// attempt names its working directory on the host), so an operator retry continues the
    /// count and moves `retry_base` instead.
    #[serde(default)]
    pub attempts: u32,
    /// `attempts` when the operator last retried: the retry budget counts from here.
    #[serde(default)]
    pub retry_base: u32,
    /// When a retry's backoff ends (the case is QUEUED until then).
    #[serde(default)]
    pub retry_at_ms: Option<u64>,
    /// 0.0 to 1.0 over the whole workflow; only increases within a run.
    pub progress: f64,
    #[serde(default)]
    pub failure: Option<Failure>,
    #[serde(default)]
    pub done: Vec<StepDone>,
    /// Operator retries so far.
    #[serde(default)]
    pub manual_retries: u32,
    pub correlation_id: String,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// The next history sequence number.
    pub history_seq: u64,
}

impl CaseRecord {
    /// A case just found: NEW, at its first step, nothing run yet.
    pub fn new(
        found: &crate::protocol::NewCase,
        workflow: &str,
        correlation_id: &str,
        now_ms: u64,
    ) -> CaseRecord {
        CaseRecord {
            case_id: found.case_id.clone(),
            case_path: found.case_path.clone(),
            room: found.room.clone(),
            workflow: workflow.to_string(),
            status: CaseStatus::New,
            step_index: 0,
            step: None,
            attempts: 0,
            retry_base: 0,
            retry_at_ms: None,
            progress: 0.0,
            failure: None,
            done: Vec::new(),
            manual_retries: 0,
            correlation_id: correlation_id.to_string(),
            created_ms: now_ms,
            updated_ms: now_ms,
            history_seq: 0,
        }
    }
}

/// One transition of a case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryRow {
    pub at_ms: u64,
    #[serde(default)]
    pub from: Option<CaseStatus>,
    pub to: CaseStatus,
    #[serde(default)]
    pub step: Option<String>,
    #[serde(default)]
    pub attempt: Option<u32>,
    pub reason: String,
}

/// A GPU mqic may lease, with what the curator last saw of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuRecord {
    pub gpu: GpuKey,
    /// False when the GPU was removed from config: never leased.
    pub usable: bool,
    #[serde(default)]
    pub name: String,
    /// When a sample last saw this GPU (0: never).
    #[serde(default)]
    pub last_seen_ms: u64,
    /// The curator's view; `None` while its host has no monitoring (no NVML, no
    /// nvidia-smi, the curator off): the GPU is then leased as configured, unchecked.
    #[serde(default)]
    pub state: Option<GpuState>,
}

/// How a GPU looked in its host's last sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuHealth {
    /// In the sample, readable.
    Ok,
    /// The host was sampled and this index was not in it.
    Missing,
    /// The host's sample failed (nvidia-smi failed, timed out, the host is unreachable).
    Error,
}

impl GpuHealth {
    pub fn name(self) -> &'static str {
        match self {
            GpuHealth::Ok => "ok",
            GpuHealth::Missing => "missing",
            GpuHealth::Error => "error",
        }
    }
}

/// A compute process on a GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuProcess {
    pub pid: u32,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub used_memory_mib: Option<u64>,
    /// Not started by mqic for the GPU's lease (every process on an unleased GPU is).
    pub foreign: bool,
}

/// The curator's last sample of one GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuState {
    pub health: GpuHealth,
    /// When the sample was taken; older than the sample window, the state is stale and the
    /// GPU counts as missing.
    pub sampled_ms: u64,
    #[serde(default)]
    pub uuid: String,
    #[serde(default)]
    pub utilization_pct: Option<u32>,
    #[serde(default)]
    pub memory_used_mib: Option<u64>,
    #[serde(default)]
    pub memory_total_mib: Option<u64>,
    #[serde(default)]
    pub temperature_c: Option<u32>,
    #[serde(default)]
    pub processes: Vec<GpuProcess>,
    /// Why the sample failed, for `Error`.
    #[serde(default)]
    pub error: Option<String>,
}

impl GpuState {
    /// Free memory, when both figures are known.
    pub fn memory_free_mib(&self) -> Option<u64> {
        Some(self.memory_total_mib?.saturating_sub(self.memory_used_mib?))
    }
}

/// One point of a GPU's history, for plots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuPoint {
    pub at_ms: u64,
    pub health: GpuHealth,
    #[serde(default)]
    pub utilization_pct: Option<u32>,
    #[serde(default)]
    pub memory_used_mib: Option<u64>,
    #[serde(default)]
    pub temperature_c: Option<u32>,
    /// How many processes ran on it.
    #[serde(default)]
    pub processes: u32,
}

/// Who holds a GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuLease {
    pub gpu: GpuKey,
    pub case_id: CaseId,
    pub step: String,
    pub attempt: u32,
    pub taken_ms: u64,
    /// The lease is reclaimed after this even if nobody releases it (its holder died).
    pub expires_ms: u64,
}

/// The last heartbeat of a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub name: String,
    pub role: String,
    pub hostname: String,
    pub pid: u32,
    pub started_at: String,
    pub status: String,
    pub interval_secs: u64,
    pub last_seen_ms: u64,
}

impl WorkerRecord {
    /// Alive while fewer than three heartbeats were missed.
    pub fn alive(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_seen_ms) < self.interval_secs.max(1) * 3000
    }
}

/// A case the scanner announced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScannedCase {
    pub case_path: String,
    pub found_ms: u64,
}

/// A message decided inside a transaction, waiting to be published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub exchange: String,
    pub routing_key: String,
    /// The JSON body.
    pub body: String,
    #[serde(default)]
    pub correlation_id: Option<String>,
    /// Work messages are persistent and mandatory; events are neither.
    pub persistent: bool,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A millisecond time as RFC 3339.
pub fn ms_to_rfc3339(ms: u64) -> String {
    crate::protocol::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole transition table, written out: a change to `can_become` must change this.
    #[test]
    fn transition_table_is_exactly_this() {
        use CaseStatus::*;
        let allowed: &[(CaseStatus, &[CaseStatus])] = &[
            (New, &[Queued, Failed, Cancelled]),
            (Queued, &[PendingResource, Processing, Failed, Cancelled]),
            (PendingResource, &[Processing, Failed, Cancelled]),
            (
                Processing,
                &[
                    Queued,
                    PendingResource,
                    Processing,
                    Completed,
                    Failed,
                    Cancelled,
                ],
            ),
            (Completed, &[]),
            (Failed, &[Queued]),
            (Cancelled, &[Queued]),
        ];
        for (from, tos) in allowed {
            for to in CaseStatus::ALL {
                assert_eq!(
                    from.can_become(to),
                    tos.contains(&to),
                    "{} -> {}",
                    from.name(),
                    to.name()
                );
            }
        }
        for s in CaseStatus::ALL {
            assert_eq!(CaseStatus::parse(s.name()), Some(s));
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.name())
            );
        }
    }
}
