//! The topic exchanges an outside client can watch: case and step events routed as
//! `case.<event>.<case_id>` / `step.<event>.<case_id>`, and log lines routed by severity
//! (`error`, `warn`, `info`), so `case.#` or `error` is one binding away.

use serde::{Deserialize, Serialize};

use super::envelope::CaseId;

/// The topic exchange of case and step events.
pub const EVENTS_EXCHANGE: &str = "mqic.events";

/// The topic exchange of log lines, routed by severity.
pub const LOGS_EXCHANGE: &str = "mqic.logs";

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Subject {
    Case,
    Step,
}

/// One event, as published on [`EVENTS_EXCHANGE`] and kept in the store's bounded event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub subject: Subject,
    /// `found`, `queued`, `pending_resource`, `dispatched`, `started`, `progress`, `succeeded`,
    /// `failed`, `retrying`, `completed`, `cancelled`, ...
    pub event: String,
    pub case_id: CaseId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// The case status after the event.
    pub status: String,
    #[serde(default)]
    pub detail: String,
    pub timestamp: String,
}

impl Event {
    /// The routing key: `case.<event>.<case_id>` or `step.<event>.<case_id>`.
    pub fn routing_key(&self) -> String {
        let subject = match self.subject {
            Subject::Case => "case",
            Subject::Step => "step",
        };
        format!("{subject}.{}.{}", self.event, self.case_id)
    }
}

/// Severities of log lines on [`LOGS_EXCHANGE`]; the routing key is the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Error,
    Warn,
    Info,
}

impl Severity {
    pub fn routing_key(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warn => "warn",
            Severity::Info => "info",
        }
    }
}

/// One log line on [`LOGS_EXCHANGE`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    pub severity: Severity,
    pub component: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case_id: Option<CaseId>,
    pub message: String,
    pub timestamp: String,
}
