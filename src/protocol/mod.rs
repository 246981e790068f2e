//! The message contract, as types: every queue, command, payload, RPC method and event the
//! workflow sends is declared here and nowhere else, so the sender and the receiver cannot
//! drift apart (the original's `results_download_completed` vs `download_completed`).
//!
//! - [`envelope`]: the seed-`000` envelope `{command, payload, timestamp, correlation_id,
//!   retry_count}` and [`Command`], one variant per command with its payload type.
//! - [`rpc`]: seed-`001` request/reply with a semver `version`.
//! - [`events`]: the topic exchanges of case/step events and of logs.
//! - [`topology`]: the queues, dead-letter queues and exchanges, declared in one place.

pub mod envelope;
pub mod events;
pub mod rpc;
pub mod topology;

pub use envelope::{
    decode, rfc3339, ArchiveRequest, CancelStep, CaseId, Command, DecodeError, Envelope,
    ExecuteRequest, ExecutionProgress, ExecutionStarted, ExecutionSucceeded, FailureCategory,
    FailureInfo, FailurePayload, NewCase, StepRef, TransferDone, TransferRequest, WorkerHeartbeat,
};
