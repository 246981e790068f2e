//! The conductor's request/reply methods (seed `001`), answered from the store. `retry_case`
//! and `cancel_case` go through the same state machine as everything else, so the CLI, the
//! dashboard and a pika script get the same rules.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Value};

use super::driver::{Applied, Conductor};
use super::machine::{Input, Rejected};
use crate::bus::{Bus, Delivery, Outgoing};
use crate::protocol::rpc::{parse_request, Method, Reply, RPC_QUEUE};
use crate::protocol::topology::ARCHIVER_QUEUE;
use crate::protocol::{ArchiveRequest, CaseId, Command};
use crate::store::records::{ms_to_rfc3339, now_ms, CaseRecord, CaseStatus};
use crate::workers::{self, Shutdown, WorkerStatus};

/// A one-line summary of a case, for lists.
pub fn case_summary(c: &CaseRecord) -> Value {
    json!({
        "case_id": c.case_id,
        "status": c.status.name(),
        "workflow": c.workflow,
        "step": c.step.as_ref().map(|r| r.name.clone()),
        "attempt": c.step.as_ref().map(|r| r.attempt),
        "progress": c.progress,
        "updated": ms_to_rfc3339(c.updated_ms),
        "created": ms_to_rfc3339(c.created_ms),
        "failure": c.failure.as_ref().map(|f| json!({
            "category": f.category, "phase": f.phase, "code": f.code, "detail": f.detail,
            "step": f.step, "attempt": f.attempt,
        })),
    })
}

fn case_id(payload: &Value) -> Result<CaseId, String> {
    payload
        .get("case_id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(CaseId::from)
        .ok_or_else(|| "payload needs a `case_id` string".to_string())
}

/// Answers one method. Blocking (store reads and writes).
pub fn answer(conductor: &Conductor, method: Method, payload: &Value) -> Result<Value, String> {
    let store = &conductor.store;
    let e = |e: crate::store::StoreError| e.to_string();
    match method {
        Method::GetStatus => {
            let cases = store.cases().map_err(e)?;
            let mut by_status: BTreeMap<&str, u64> =
                CaseStatus::ALL.iter().map(|s| (s.name(), 0)).collect();
            for c in &cases {
                *by_status.entry(c.status.name()).or_default() += 1;
            }
            let now = now_ms();
            let workers = store.workers().map_err(e)?;
            let gpus = store.gpus().map_err(e)?;
            Ok(json!({
                "version": env!("CARGO_PKG_VERSION"),
                "cases": by_status,
                "total_cases": cases.len(),
                "archived_cases": store.archived_count().map_err(e)?,
                "gpus": gpus.iter().filter(|g| g.usable).count(),
                "gpus_passing_checks": gpus
                    .iter()
                    .filter(|g| conductor.plan.gpu_policy.refusal(g, now).is_none())
                    .count(),
                "gpus_leased": store.leases().map_err(e)?.len(),
                "workers_alive": workers.iter().filter(|w| w.alive(now)).count(),
                "outbox": store.outbox_len().map_err(e)?,
            }))
        }
        Method::ListCases => {
            let filter = match payload.get("status").and_then(Value::as_str) {
                Some(s) => {
                    Some(CaseStatus::parse(s).ok_or_else(|| format!("unknown status `{s}`"))?)
                }
                None => None,
            };
            let limit = payload.get("limit").and_then(Value::as_u64).unwrap_or(1000) as usize;
            let mut cases = store.cases().map_err(e)?;
            cases.retain(|c| filter.is_none_or(|f| c.status == f));
            cases.sort_by_key(|c| std::cmp::Reverse(c.updated_ms));
            Ok(Value::Array(
                cases.iter().take(limit).map(case_summary).collect(),
            ))
        }
        Method::GetCase => {
            let id = case_id(payload)?;
            if let Some(case) = store.case(&id).map_err(e)? {
                let history = store.history(&id).map_err(e)?;
                return Ok(json!({"case": case, "history": history, "archived": false}));
            }
            match store.archived_case(&id).map_err(e)? {
                Some((case, history)) => {
                    Ok(json!({"case": case, "history": history, "archived": true}))
                }
                None => Err(format!("no case `{id}`")),
            }
        }
        Method::RetryCase | Method::CancelCase => {
            let id = case_id(payload)?;
            let input = if method == Method::RetryCase {
                Input::Retry
            } else {
                Input::Cancel
            };
            match conductor.apply(&id, input).map_err(e)? {
                Applied::Changed(status) => Ok(json!({"case_id": id, "status": status.name()})),
                Applied::Rejected(Rejected::NotAllowed(why)) => Err(why),
                Applied::Rejected(other) => Err(other.to_string()),
                Applied::NoSuchCase => Err(format!("no case `{id}`")),
            }
        }
        Method::ListGpus => {
            // `{"history": N}` adds each GPU's last N samples, for plots.
            let history = payload.get("history").and_then(Value::as_u64).unwrap_or(0) as usize;
            let leases = store.leases().map_err(e)?;
            let now = now_ms();
            let mut out = Vec::new();
            for g in store.gpus().map_err(e)? {
                let lease = leases.iter().find(|l| l.gpu == g.gpu);
                let refusal = conductor.plan.gpu_policy.refusal(&g, now);
                let mut row = json!({
                    "gpu": g.gpu.key(), "host": g.gpu.host, "index": g.gpu.index,
                    "usable": g.usable, "name": g.name,
                    "leased_by": lease.map(|l| json!({
                        "case_id": l.case_id, "step": l.step, "attempt": l.attempt,
                        "since": ms_to_rfc3339(l.taken_ms), "expires": ms_to_rfc3339(l.expires_ms),
                    })),
                    "leasable": lease.is_none() && refusal.is_none(),
                    "not_leasable_because": refusal.map(|r| r.to_string()),
                    "last_seen": (g.last_seen_ms > 0).then(|| ms_to_rfc3339(g.last_seen_ms)),
                    "monitored": g.state.is_some(),
                });
                if let Some(s) = &g.state {
                    let fields = json!({
                        "status": s.health.name(), "uuid": s.uuid,
                        "utilization_pct": s.utilization_pct,
                        "memory_used_mib": s.memory_used_mib,
                        "memory_total_mib": s.memory_total_mib,
                        "memory_free_mib": s.memory_free_mib(),
                        "temperature_c": s.temperature_c,
                        "sampled": ms_to_rfc3339(s.sampled_ms),
                        "error": s.error,
                        "processes": s.processes,
                        "foreign_processes": s.processes.iter().filter(|p| p.foreign).count(),
                    });
                    merge(&mut row, fields);
                }
                if history > 0 {
                    let points = store.gpu_history(&g.gpu.key(), history).map_err(e)?;
                    merge(&mut row, json!({ "history": points }));
                }
                out.push(row);
            }
            Ok(Value::Array(out))
        }
        Method::ListWorkers => {
            let now = now_ms();
            Ok(Value::Array(
                store
                    .workers()
                    .map_err(e)?
                    .into_iter()
                    .map(|w| {
                        json!({
                            "name": w.name, "role": w.role, "hostname": w.hostname, "pid": w.pid,
                            "status": w.status, "started_at": w.started_at,
                            "last_seen": ms_to_rfc3339(w.last_seen_ms), "alive": w.alive(now),
                        })
                    })
                    .collect(),
            ))
        }
        Method::ListTasks => Ok(Value::Array(
            store
                .cases()
                .map_err(e)?
                .into_iter()
                .filter(|c| c.status == CaseStatus::Processing)
                .filter_map(|c| {
                    let r = c.step.as_ref()?;
                    Some(json!({
                        "case_id": c.case_id, "step": r.name, "attempt": r.attempt,
                        "dispatched": ms_to_rfc3339(r.dispatched_ms),
                        "started": r.started_ms.map(ms_to_rfc3339),
                        "pid": r.pid, "progress": r.progress,
                        "gpu": r.gpu.as_ref().map(|g| g.key()),
                        "deadline": ms_to_rfc3339(r.deadline_ms),
                    }))
                })
                .collect(),
        )),
        Method::ArchiveData => {
            let request: ArchiveRequest = serde_json::from_value(if payload.is_null() {
                json!({})
            } else {
                payload.clone()
            })
            .map_err(|e| format!("payload: {e}"))?;
            conductor
                .enqueue(ARCHIVER_QUEUE, Command::ArchiveData(request))
                .map_err(e)?;
            Ok(json!({"queued": true}))
        }
    }
}

/// Adds the fields of object `extra` to object `row`.
fn merge(row: &mut Value, extra: Value) {
    if let (Value::Object(row), Value::Object(extra)) = (row, extra) {
        row.extend(extra);
    }
}

/// Answers requests on the RPC queue until shutdown.
pub async fn run(
    conductor: Arc<Conductor>,
    bus: Arc<dyn Bus>,
    status: Arc<WorkerStatus>,
    mut shutdown: Shutdown,
) {
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        let mut sub = match bus.consume(RPC_QUEUE, 16).await {
            Ok(s) => {
                status.set("idle");
                s
            }
            Err(err) => {
                status.set(format!("cannot consume {RPC_QUEUE}: {err}"));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = workers::stopped(&mut shutdown) => return,
                }
                backoff = (backoff * 2).min(std::time::Duration::from_secs(10));
                continue;
            }
        };
        loop {
            let delivery = tokio::select! {
                d = sub.next() => d,
                _ = workers::stopped(&mut shutdown) => return,
            };
            let Some(delivery) = delivery else { break };
            serve_one(&conductor, bus.as_ref(), delivery).await;
        }
    }
}

async fn serve_one(conductor: &Arc<Conductor>, bus: &dyn Bus, delivery: Delivery) {
    let reply = match parse_request(&delivery.body) {
        Err((err, session)) => Reply::failure(err.to_string(), session),
        Ok((method, request)) => {
            let c = conductor.clone();
            let payload = request.payload.clone();
            let result = tokio::task::spawn_blocking(move || answer(&c, method, &payload))
                .await
                .unwrap_or_else(|e| Err(format!("internal error: {e}")));
            match result {
                Ok(v) => Reply::success(v, request.session_id),
                Err(why) => Reply::failure(why, request.session_id),
            }
        }
    };
    let Some(reply_to) = delivery.reply_to.clone().filter(|r| !r.is_empty()) else {
        tracing::warn!(
            "RPC request without reply_to; answered nowhere: {:?}",
            reply.payload
        );
        delivery.ack();
        return;
    };
    let out = Outgoing {
        exchange: String::new(),
        routing_key: reply_to,
        body: Bytes::from(serde_json::to_vec(&reply).expect("replies serialize")),
        correlation_id: delivery.correlation_id.clone(),
        ..Outgoing::default()
    };
    if let Err(e) = bus.publish(out).await {
        tracing::warn!("cannot send an RPC reply: {e}");
    }
    delivery.ack();
}

/// The client side: sends one request through `bus` and waits for its reply (at most
/// `timeout`). The CLI uses this; so can any tool with a bus.
pub async fn call(
    bus: &dyn Bus,
    method: Method,
    payload: Value,
    timeout: std::time::Duration,
) -> Result<Reply, String> {
    let mut replies = bus.reply_queue().await.map_err(|e| e.to_string())?;
    let correlation = uuid::Uuid::new_v4().to_string();
    let request = crate::protocol::rpc::Request::new(method, payload);
    let out = Outgoing {
        exchange: crate::protocol::rpc::RPC_EXCHANGE.to_string(),
        routing_key: method.routing_key(),
        body: Bytes::from(serde_json::to_vec(&request).expect("requests serialize")),
        correlation_id: Some(correlation.clone()),
        reply_to: Some(replies.queue.clone()),
        mandatory: true,
        ..Outgoing::default()
    };
    bus.publish(out).await.map_err(|e| match e {
        crate::bus::BusError::Unroutable(_) => {
            "no conductor is listening (is `mqic serve` running on this broker?)".to_string()
        }
        other => other.to_string(),
    })?;
    let wait = async {
        while let Some(d) = replies.next().await {
            if d.correlation_id.as_deref() == Some(correlation.as_str()) {
                return serde_json::from_slice::<Reply>(&d.body)
                    .map_err(|e| format!("malformed reply: {e}"));
            }
        }
        Err("the connection closed before the reply came".to_string())
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| format!("no reply within {timeout:?}"))?
}
