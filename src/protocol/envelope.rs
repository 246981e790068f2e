//! The envelope every workflow queue carries, and the commands inside it.
//!
//! Decoding is two-step on purpose: first the envelope's shape, then the payload for the named
//! command, so a bad message is rejected with a reason that says exactly what is wrong
//! ("unknown command `foo`", "payload of `upload_case`: missing field `case_id`"). That reason
//! travels with the message to the dead-letter queue.

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A case's identity: unique across the scanned tree (its path relative to the scan root
/// with `/` replaced, see the scanner), and the key of every case record.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CaseId(pub String);

impl CaseId {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Why this id cannot name a case, if it cannot. A case id becomes a directory name on
    /// every host and a word in commands, so it is letters, digits, `.`, `_` and `-` only,
    /// does not start with `.` or `-`, and is at most 200 bytes.
    pub fn problem(&self) -> Option<String> {
        let id = &self.0;
        if id.is_empty() || id.len() > 200 {
            return Some(format!("case id '{id}' must be 1 to 200 bytes long"));
        }
        if id.starts_with('.') || id.starts_with('-') {
            return Some(format!("case id '{id}' must not start with '.' or '-'"));
        }
        if let Some(c) = id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Some(format!(
                "case id '{id}' contains {c:?}; use letters, digits, '.', '_' and '-' (rename the folder)"
            ));
        }
        None
    }
}

impl fmt::Display for CaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for CaseId {
    fn from(s: &str) -> CaseId {
        CaseId(s.to_string())
    }
}

/// Which attempt of which step of which case a worker message is about. Results that do not
/// match the case's current step and attempt are stale and change nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRef {
    pub case_id: CaseId,
    pub step: String,
    pub attempt: u32,
}

/// `new_case_found`, as the scanner (or any seed-format client) publishes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewCase {
    pub case_id: CaseId,
    pub case_path: String,
    /// The workflow to run; the configured default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// The treatment room (`G1`, `G2`) when the layout has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
}

/// `upload_case` / `download_results`: copy a directory tree between this host and a step host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferRequest {
    #[serde(flatten)]
    pub step: StepRef,
    /// The host name from config (`local` is this machine).
    pub host: String,
    /// The directory on this machine (source of an upload, destination of a download).
    pub local_dir: String,
    /// The directory on the host (destination of an upload, source of a download).
    pub remote_dir: String,
}

/// `case_upload_completed` / `results_download_completed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferDone {
    #[serde(flatten)]
    pub step: StepRef,
    pub files: u64,
    pub bytes: u64,
    /// Files already present with the same size and hash, so not sent again.
    #[serde(default)]
    pub skipped: u64,
    /// Bytes copied by this transfer (`bytes` less the files skipped); 0 from older senders.
    #[serde(default)]
    pub copied_bytes: u64,
}

/// `execute_command`: run a rendered step command on a host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecuteRequest {
    #[serde(flatten)]
    pub step: StepRef,
    pub host: String,
    /// The command line, already rendered with every placeholder shell-quoted.
    pub command: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_id: Option<u32>,
    pub timeout_secs: u64,
    /// Regexes whose first two captures are `(done, total)`, or one capture as a percentage.
    #[serde(default)]
    pub progress_patterns: Vec<String>,
    /// Output patterns that make a non-zero exit retryable (MOQUI's `No free GPU remains`).
    #[serde(default)]
    pub retryable_patterns: Vec<String>,
}

/// `execution_started`: the step's process is running (or was found running after a restart).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionStarted {
    #[serde(flatten)]
    pub step: StepRef,
    #[serde(default)]
    pub pid: Option<u32>,
    /// True when a restarted executor found the process already running.
    #[serde(default)]
    pub reattached: bool,
}

/// `execution_progress`: a parsed progress line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionProgress {
    #[serde(flatten)]
    pub step: StepRef,
    /// 0.0 to 1.0 within the step.
    pub fraction: f64,
    #[serde(default)]
    pub message: String,
}

/// `execution_succeeded`: the process exited 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionSucceeded {
    #[serde(flatten)]
    pub step: StepRef,
    pub exit_code: i32,
    /// The last part of the output (bounded).
    #[serde(default)]
    pub output_tail: String,
    #[serde(default)]
    pub duration_ms: u64,
}

/// Whether retrying can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureCategory {
    Retryable,
    Permanent,
}

/// The structured failure record, set where the failure happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureInfo {
    pub category: FailureCategory,
    /// Where: `upload`, `execute`, `download`, `dispatch`, `timeout`, ...
    pub phase: String,
    /// A stable machine-readable code: `exit_code_1`, `timed_out`, `spawn_failed`, ...
    pub code: String,
    pub detail: String,
}

/// The seed failure payload `{case_id, error_type, error_message, original_payload}`, plus the
/// step reference and structured record mqic needs to apply it exactly once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailurePayload {
    pub case_id: CaseId,
    /// `TimedOut`, `RunningError`, `TransferError`, `SpawnError`, `Cancelled`, ...
    pub error_type: String,
    pub error_message: String,
    #[serde(default)]
    pub original_payload: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureInfo>,
    #[serde(default)]
    pub output_tail: String,
}

/// `cancel_step`: abort a running step (the process group is really killed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelStep {
    #[serde(flatten)]
    pub step: StepRef,
    pub host: String,
}

/// `archive_data`: archive finished cases older than the retention age and back up the store.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ArchiveRequest {
    /// Overrides the configured retention for this run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_days: Option<u64>,
}

/// `worker_heartbeat`: a worker announces itself (seed `002`) and keeps doing so; the
/// conductor records it so `list_workers` and the dashboard show it alive or gone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerHeartbeat {
    /// Unique per worker instance: `<role>@<hostname>:<pid>`.
    pub name: String,
    pub role: String,
    pub hostname: String,
    pub pid: u32,
    pub started_at: String,
    /// `idle`, `busy`, `stopping`, or an error description.
    pub status: String,
    /// Seconds until the next heartbeat; missing three in a row means gone.
    pub interval_secs: u64,
}

/// Every command, with its payload. The serde form is exactly the envelope's
/// `{"command": ..., "payload": ...}` pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", content = "payload", rename_all = "snake_case")]
pub enum Command {
    NewCaseFound(NewCase),
    UploadCase(TransferRequest),
    CaseUploadCompleted(TransferDone),
    DownloadResults(TransferRequest),
    ResultsDownloadCompleted(TransferDone),
    FileTransferFailed(FailurePayload),
    ExecuteCommand(ExecuteRequest),
    ExecutionStarted(ExecutionStarted),
    ExecutionProgress(ExecutionProgress),
    ExecutionSucceeded(ExecutionSucceeded),
    ExecutionFailed(FailurePayload),
    CancelStep(CancelStep),
    /// Ask a curator to sample GPUs now (published on a timer).
    SystemMonitor(serde_json::Map<String, Value>),
    ArchiveData(ArchiveRequest),
    WorkerHeartbeat(WorkerHeartbeat),
}

/// The command names, in the order of [`Command`]'s variants.
pub const COMMAND_NAMES: &[&str] = &[
    "new_case_found",
    "upload_case",
    "case_upload_completed",
    "download_results",
    "results_download_completed",
    "file_transfer_failed",
    "execute_command",
    "execution_started",
    "execution_progress",
    "execution_succeeded",
    "execution_failed",
    "cancel_step",
    "system_monitor",
    "archive_data",
    "worker_heartbeat",
];

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::NewCaseFound(_) => "new_case_found",
            Command::UploadCase(_) => "upload_case",
            Command::CaseUploadCompleted(_) => "case_upload_completed",
            Command::DownloadResults(_) => "download_results",
            Command::ResultsDownloadCompleted(_) => "results_download_completed",
            Command::FileTransferFailed(_) => "file_transfer_failed",
            Command::ExecuteCommand(_) => "execute_command",
            Command::ExecutionStarted(_) => "execution_started",
            Command::ExecutionProgress(_) => "execution_progress",
            Command::ExecutionSucceeded(_) => "execution_succeeded",
            Command::ExecutionFailed(_) => "execution_failed",
            Command::CancelStep(_) => "cancel_step",
            Command::SystemMonitor(_) => "system_monitor",
            Command::ArchiveData(_) => "archive_data",
            Command::WorkerHeartbeat(_) => "worker_heartbeat",
        }
    }

    /// The case this command is about, if any.
    pub fn case_id(&self) -> Option<&CaseId> {
        match self {
            Command::NewCaseFound(p) => Some(&p.case_id),
            Command::UploadCase(p) | Command::DownloadResults(p) => Some(&p.step.case_id),
            Command::CaseUploadCompleted(p) | Command::ResultsDownloadCompleted(p) => {
                Some(&p.step.case_id)
            }
            Command::FileTransferFailed(p) | Command::ExecutionFailed(p) => Some(&p.case_id),
            Command::ExecuteCommand(p) => Some(&p.step.case_id),
            Command::ExecutionStarted(p) => Some(&p.step.case_id),
            Command::ExecutionProgress(p) => Some(&p.step.case_id),
            Command::ExecutionSucceeded(p) => Some(&p.step.case_id),
            Command::CancelStep(p) => Some(&p.step.case_id),
            Command::SystemMonitor(_) | Command::ArchiveData(_) | Command::WorkerHeartbeat(_) => {
                None
            }
        }
    }
}

/// A whole message on a workflow queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(flatten)]
    pub command: Command,
    /// ISO 8601 (RFC 3339, UTC) time the message was made.
    pub timestamp: String,
    /// Ties every message of one case run together in logs.
    pub correlation_id: String,
    pub retry_count: u32,
}

impl Envelope {
    /// A new envelope stamped now, with a fresh correlation id.
    pub fn new(command: Command) -> Envelope {
        Envelope::with_correlation(command, uuid::Uuid::new_v4().to_string())
    }

    pub fn with_correlation(command: Command, correlation_id: String) -> Envelope {
        Envelope {
            command,
            timestamp: rfc3339(SystemTime::now()),
            correlation_id,
            retry_count: 0,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serializes")
    }
}

/// A time as RFC 3339 UTC with milliseconds, the form every timestamp in mqic takes.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Why a message could not be decoded. The text goes into the dead-letter header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("not an envelope: {0}")]
    BadEnvelope(String),
    #[error("unknown command `{0}`")]
    UnknownCommand(String),
    #[error("payload of `{command}`: {reason}")]
    BadPayload { command: String, reason: String },
}

impl DecodeError {
    /// A short stable label for metrics and the dead-letter header `x-mqic-error`.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::NotJson(_) => "not_json",
            DecodeError::BadEnvelope(_) => "bad_envelope",
            DecodeError::UnknownCommand(_) => "unknown_command",
            DecodeError::BadPayload { .. } => "bad_payload",
        }
    }
}

/// The envelope's shape, before the payload is typed.
#[derive(Deserialize)]
struct RawEnvelope {
    command: String,
    payload: Value,
    #[serde(default)]
    timestamp: Option<String>,
    #[serde(default)]
    correlation_id: Option<String>,
    #[serde(default)]
    retry_count: Option<u32>,
}

/// Decodes a message body. Seed-format senders may leave out `timestamp`, `correlation_id`
/// and `retry_count`; they are filled in. `command` and `payload` are required.
pub fn decode(body: &[u8]) -> Result<Envelope, DecodeError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    let raw: RawEnvelope =
        serde_json::from_value(value).map_err(|e| DecodeError::BadEnvelope(e.to_string()))?;
    if !COMMAND_NAMES.contains(&raw.command.as_str()) {
        return Err(DecodeError::UnknownCommand(raw.command));
    }
    let tagged = serde_json::json!({ "command": raw.command, "payload": raw.payload });
    let command: Command = serde_json::from_value(tagged).map_err(|e| DecodeError::BadPayload {
        command: raw.command.clone(),
        reason: e.to_string(),
    })?;
    Ok(Envelope {
        command,
        timestamp: raw.timestamp.unwrap_or_else(|| rfc3339(SystemTime::now())),
        correlation_id: raw
            .correlation_id
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        retry_count: raw.retry_count.unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_new_case_found_decodes_with_defaults() {
        let body =
            br#"{"command":"new_case_found","payload":{"case_id":"c1","case_path":"/data/c1"}}"#;
        let env = decode(body).unwrap();
        assert_eq!(
            env.command,
            Command::NewCaseFound(NewCase {
                case_id: "c1".into(),
                case_path: "/data/c1".into(),
                workflow: None,
                room: None,
            })
        );
        assert_eq!(env.retry_count, 0);
        assert!(!env.correlation_id.is_empty());
    }

    #[test]
    fn envelope_round_trips_with_the_seed_shape() {
        let env = Envelope::new(Command::ExecutionSucceeded(ExecutionSucceeded {
            step: StepRef {
                case_id: "c1".into(),
                step: "simulate".into(),
                attempt: 2,
            },
            exit_code: 0,
            output_tail: "Total execution time: 3 seconds".into(),
            duration_ms: 3000,
        }));
        let json: Value = serde_json::from_slice(&env.to_bytes()).unwrap();
        assert_eq!(json["command"], "execution_succeeded");
        assert_eq!(json["payload"]["case_id"], "c1");
        assert_eq!(json["payload"]["attempt"], 2);
        for key in ["timestamp", "correlation_id", "retry_count"] {
            assert!(json.get(key).is_some(), "{key} present");
        }
        assert_eq!(decode(&env.to_bytes()).unwrap(), env);
    }

    #[test]
    fn every_command_name_matches_its_variant() {
        for name in COMMAND_NAMES {
            let err = decode(format!(r#"{{"command":"{name}","payload":7}}"#).as_bytes());
            assert!(
                matches!(err, Err(DecodeError::BadPayload { .. })),
                "{name}: {err:?}"
            );
        }
    }

    #[test]
    fn bad_messages_say_what_is_wrong() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "not_json"),
            (br#"{"payload":{}}"#, "bad_envelope"),
            (br#"{"command":"new_case_found"}"#, "bad_envelope"),
            (br#"{"command":"launch_missiles","payload":{}}"#, "unknown_command"),
            (
                br#"{"command":"new_case_found","payload":{"case_id":"c"}}"#,
                "bad_payload",
            ),
            (
                br#"{"command":"execute_command","payload":{"case_id":"c","step":"s","attempt":"one","host":"h","command":"x","timeout_secs":1}}"#,
                "bad_payload",
            ),
        ];
        for (body, kind) in cases {
            let err = decode(body).unwrap_err();
            assert_eq!(err.kind(), *kind, "{err}");
        }
        let err = decode(br#"{"command":"new_case_found","payload":{"case_id":"c"}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("case_path"), "{err}");
    }
}
