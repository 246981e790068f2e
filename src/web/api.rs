//! The dashboard's JSON API. Case, GPU and worker data come from the conductor's RPC handlers
//! ([`rpc::answer`]), so the dashboard, the CLI and a pika script see the same thing and
//! Retry / Cancel go through the same state machine. Queue depths come from the broker.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::Web;
use crate::conductor::rpc;
use crate::protocol::rpc::Method;

/// Runs one RPC method on a blocking thread.
pub async fn call(web: &Arc<Web>, method: Method, payload: Value) -> Result<Value, String> {
    let conductor = web.conductor.clone();
    tokio::task::spawn_blocking(move || rpc::answer(&conductor, method, &payload))
        .await
        .unwrap_or_else(|e| Err(format!("internal error: {e}")))
}

/// An RPC failure as an HTTP answer: an unknown case is 404, a bad argument 400, anything
/// else (a transition the state machine refused, a store error) 409 with the reason.
fn failure(why: String) -> Response {
    let status = if why.starts_with("no case") {
        StatusCode::NOT_FOUND
    } else if why.starts_with("unknown status") || why.starts_with("payload") {
        StatusCode::BAD_REQUEST
    } else if why.starts_with("internal error") {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::CONFLICT
    };
    (status, Json(json!({ "error": why }))).into_response()
}

fn answer(result: Result<Value, String>) -> Response {
    match result {
        Ok(v) => Json(v).into_response(),
        Err(why) => failure(why),
    }
}

/// `GET /ui/api/overview`: what the overview page and the hub's snapshots show.
pub async fn overview(State(web): State<Arc<Web>>) -> Response {
    answer(web.hub.overview(&web).await)
}

#[derive(Deserialize)]
pub struct CaseQuery {
    status: Option<String>,
    q: Option<String>,
    limit: Option<u64>,
}

/// `GET /ui/api/cases?status=S&q=TEXT&limit=N`: newest first; `q` matches case id,
/// workflow, step or failure text, case-insensitively.
pub async fn cases(State(web): State<Arc<Web>>, Query(query): Query<CaseQuery>) -> Response {
    let mut payload = json!({ "limit": query.limit.unwrap_or(1000).min(10_000) });
    if let Some(s) = query.status.filter(|s| !s.is_empty()) {
        payload["status"] = json!(s);
    }
    let result = call(&web, Method::ListCases, payload).await.map(|v| {
        let needle = query.q.unwrap_or_default().to_lowercase();
        if needle.is_empty() {
            return v;
        }
        let rows = v.as_array().cloned().unwrap_or_default();
        Value::Array(
            rows.into_iter()
                .filter(|r| r.to_string().to_lowercase().contains(&needle))
                .collect(),
        )
    });
    answer(result)
}

/// `GET /ui/api/cases/{id}`: the record, its history and a one-line summary.
pub async fn case(State(web): State<Arc<Web>>, Path(id): Path<String>) -> Response {
    answer(case_detail(&web, &id).await)
}

pub async fn case_detail(web: &Arc<Web>, id: &str) -> Result<Value, String> {
    let mut v = call(web, Method::GetCase, json!({ "case_id": id })).await?;
    if let Ok(record) = serde_json::from_value(v["case"].clone()) {
        v["summary"] = rpc::case_summary(&record);
    }
    Ok(v)
}

#[derive(Deserialize)]
pub struct LogQuery {
    bytes: Option<u64>,
}

/// `GET /ui/api/cases/{id}/log?bytes=N`: the tail of the current (or last) attempt's log.
pub async fn log(
    State(web): State<Arc<Web>>,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Response {
    let max = q.bytes.unwrap_or(16 * 1024).min(1024 * 1024);
    let web2 = web.clone();
    let result = tokio::task::spawn_blocking(move || {
        let (attempt, path) = super::logtail::locate(&web2, &id)?;
        let (text, size) = match &path {
            Some(p) => super::logtail::read_tail(p, max).unwrap_or_default(),
            None => (String::new(), 0),
        };
        Ok::<_, String>(json!({ "attempt": attempt, "text": text, "size": size }))
    })
    .await
    .unwrap_or_else(|e| Err(format!("internal error: {e}")));
    answer(result)
}

/// `POST /ui/api/cases/{id}/retry`: the RPC's `retry_case`.
pub async fn retry(State(web): State<Arc<Web>>, Path(id): Path<String>) -> Response {
    let result = call(&web, Method::RetryCase, json!({ "case_id": id })).await;
    web.hub.poke();
    answer(result)
}

/// `POST /ui/api/cases/{id}/cancel`: the RPC's `cancel_case`.
pub async fn cancel(State(web): State<Arc<Web>>, Path(id): Path<String>) -> Response {
    let result = call(&web, Method::CancelCase, json!({ "case_id": id })).await;
    web.hub.poke();
    answer(result)
}

/// `GET /ui/api/gpus`: `list_gpus`, plus the samples the hub kept.
pub async fn gpus(State(web): State<Arc<Web>>) -> Response {
    answer(
        call(&web, Method::ListGpus, Value::Null)
            .await
            .map(|gpus| json!({ "gpus": gpus, "history": web.hub.gpu_history() })),
    )
}

/// `GET /ui/api/workers`: `list_workers` (heartbeats).
pub async fn workers(State(web): State<Arc<Web>>) -> Response {
    answer(call(&web, Method::ListWorkers, Value::Null).await)
}

/// `GET /ui/api/queues`: every queue of the shown vhosts.
pub async fn queues(State(web): State<Arc<Web>>) -> Response {
    Json(web.hub.queues(&web)).into_response()
}

/// `GET /ui/api/connections`: the open AMQP connections and their channels.
pub async fn connections(State(web): State<Arc<Web>>) -> Response {
    Json(web.hub.connections(&web)).into_response()
}
