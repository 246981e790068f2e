//! Request/reply (seed `001`): `{command, payload, version, session_id?}` answered on the
//! request's `reply_to`, with its `correlation_id`, by `{status, payload, version,
//! session_id?}`. An unknown method or an unsupported major version is a `failure` reply,
//! never silence: a caller always hears back.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The protocol version this mqic speaks. Requests with another major version are refused.
pub const VERSION: &str = "1.0.0";

/// The exchange RPC requests are published to, with routing key `methods.<name>`.
pub const RPC_EXCHANGE: &str = "mqic.rpc";

/// The queue the conductor answers requests from.
pub const RPC_QUEUE: &str = "mqic.rpc.conductor";

/// The methods the conductor answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    GetStatus,
    ListCases,
    GetCase,
    RetryCase,
    CancelCase,
    ListGpus,
    ListWorkers,
    ListTasks,
    ArchiveData,
}

impl Method {
    pub const ALL: &'static [Method] = &[
        Method::GetStatus,
        Method::ListCases,
        Method::GetCase,
        Method::RetryCase,
        Method::CancelCase,
        Method::ListGpus,
        Method::ListWorkers,
        Method::ListTasks,
        Method::ArchiveData,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::GetStatus => "get_status",
            Method::ListCases => "list_cases",
            Method::GetCase => "get_case",
            Method::RetryCase => "retry_case",
            Method::CancelCase => "cancel_case",
            Method::ListGpus => "list_gpus",
            Method::ListWorkers => "list_workers",
            Method::ListTasks => "list_tasks",
            Method::ArchiveData => "archive_data",
        }
    }

    pub fn parse(name: &str) -> Option<Method> {
        Method::ALL.iter().copied().find(|m| m.name() == name)
    }

    /// The routing key a request for this method is published with.
    pub fn routing_key(self) -> String {
        format!("methods.{}", self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub command: String,
    #[serde(default)]
    pub payload: Value,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
}

impl Request {
    pub fn new(method: Method, payload: Value) -> Request {
        Request {
            command: method.name().to_string(),
            payload,
            version: VERSION.to_string(),
            session_id: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Success,
    Failure,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub status: Status,
    pub payload: Value,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
}

impl Reply {
    pub fn success(payload: Value, session_id: Option<String>) -> Reply {
        Reply {
            status: Status::Success,
            payload,
            version: VERSION.to_string(),
            session_id,
        }
    }

    /// A failure reply; the payload is `{"error": message}`.
    pub fn failure(message: impl Into<String>, session_id: Option<String>) -> Reply {
        Reply {
            status: Status::Failure,
            payload: serde_json::json!({ "error": message.into() }),
            version: VERSION.to_string(),
            session_id,
        }
    }
}

/// Why a request cannot be served, before any method runs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request is not valid: {0}")]
    Malformed(String),
    #[error("unsupported protocol version {got} (this mqic speaks {VERSION})")]
    Version { got: String },
    #[error("unknown method `{0}`")]
    UnknownMethod(String),
}

/// Parses a request and checks its version and method. The request is returned alongside
/// the error where it parsed, so the failure reply can carry its `session_id`.
pub fn parse_request(body: &[u8]) -> Result<(Method, Request), (RequestError, Option<String>)> {
    let request: Request =
        serde_json::from_slice(body).map_err(|e| (RequestError::Malformed(e.to_string()), None))?;
    let session = request.session_id.clone();
    let major = |v: &str| v.split('.').next().map(str::to_string);
    if major(&request.version).is_none_or(|m| Some(m) != major(VERSION)) {
        return Err((
            RequestError::Version {
                got: request.version.clone(),
            },
            session,
        ));
    }
    match Method::parse(&request.command) {
        Some(m) => Ok((m, request)),
        None => Err((
            RequestError::UnknownMethod(request.command.clone()),
            session,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_for_version_and_method() {
        let ok = br#"{"command":"get_status","payload":{},"version":"1.4.0","session_id":"s"}"#;
        assert_eq!(parse_request(ok).unwrap().0, Method::GetStatus);
        let v2 = br#"{"command":"get_status","payload":{},"version":"2.0.0","session_id":"s"}"#;
        let (err, session) = parse_request(v2).unwrap_err();
        assert!(matches!(err, RequestError::Version { .. }));
        assert_eq!(session.as_deref(), Some("s"));
        let unknown = br#"{"command":"reboot","version":"1.0.0"}"#;
        assert!(matches!(
            parse_request(unknown).unwrap_err().0,
            RequestError::UnknownMethod(_)
        ));
        assert!(matches!(
            parse_request(b"{}").unwrap_err().0,
            RequestError::Malformed(_)
        ));
    }
}
