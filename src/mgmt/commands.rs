//! The operator commands of the command line: `mqic status`, `cases`, `case`, `retry`,
//! `cancel` (request/reply RPC to the running daemon's conductor), `queues` (the management
//! API) and `publish` (a validated envelope straight to a queue). Each prints a table, or
//! JSON with `--json`; every failure is one line (the caller prints it) and a non-zero exit.

use std::time::Duration;

use anyhow::{anyhow, bail};
use serde_json::{json, Value};

use crate::bus::url::{redact, BrokerUrl};
use crate::bus::{Bus, Outgoing, RemoteBus};
use crate::protocol::rpc::{Method, Status};
use crate::store::records::ms_to_rfc3339;

/// How long a command waits for the daemon's answer.
const RPC_TIMEOUT: Duration = Duration::from_secs(15);

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

async fn connect(broker: &str) -> anyhow::Result<RemoteBus> {
    RemoteBus::connect(broker).await.map_err(|e| {
        anyhow!(
            "cannot reach the mqic daemon at {} (is `mqic serve` running?): {e}",
            redact(broker)
        )
    })
}

/// One RPC to the daemon: the reply's payload, or its failure as an error.
pub fn rpc(broker: &str, method: Method, payload: Value) -> anyhow::Result<Value> {
    runtime()?.block_on(async {
        let bus = connect(broker).await?;
        let reply = crate::conductor::rpc::call(&bus, method, payload, RPC_TIMEOUT).await;
        bus.close().await;
        let reply = reply.map_err(|e| anyhow!("{}: {e}", method.name()))?;
        match reply.status {
            Status::Success => Ok(reply.payload),
            Status::Failure => {
                let why = reply.payload["error"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| reply.payload.to_string());
                bail!("{}: {why}", method.name())
            }
        }
    })
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A plain-text table: a header row, then rows, columns padded to their widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(cell);
                s.push_str(&" ".repeat(widths[i] - cell.chars().count() + 2));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn percent(v: &Value) -> String {
    v.as_f64()
        .map(|p| format!("{:.0}%", p * 100.0))
        .unwrap_or_else(|| "-".into())
}

/// `mqic status`.
pub fn status(broker: &str, as_json: bool) -> anyhow::Result<()> {
    let st = rpc(broker, Method::GetStatus, json!({}))?;
    if as_json {
        return print_json(&st);
    }
    let cases = st["cases"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    let rows = vec![
        vec!["version".into(), s(&st["version"])],
        vec![
            "cases".into(),
            format!(
                "{} in the store, {} archived",
                s(&st["total_cases"]),
                s(&st["archived_cases"])
            ),
        ],
        vec!["by status".into(), cases],
        vec![
            "gpus".into(),
            format!(
                "{} usable, {} leased",
                s(&st["gpus"]),
                s(&st["gpus_leased"])
            ),
        ],
        vec!["workers alive".into(), s(&st["workers_alive"])],
        vec!["outbox".into(), s(&st["outbox"])],
    ];
    print!("{}", table(&["MQIC", "STATUS"], &rows));
    Ok(())
}

/// `mqic cases [--status S]`.
pub fn cases(broker: &str, status: Option<&str>, limit: u64, as_json: bool) -> anyhow::Result<()> {
    let mut payload = json!({ "limit": limit });
    if let Some(st) = status {
        payload["status"] = json!(st.to_ascii_uppercase());
    }
    let list = rpc(broker, Method::ListCases, payload)?;
    if as_json {
        return print_json(&list);
    }
    let rows: Vec<Vec<String>> = list
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|c| {
            vec![
                s(&c["case_id"]),
                s(&c["status"]),
                s(&c["workflow"]),
                s(&c["step"]),
                s(&c["attempt"]),
                percent(&c["progress"]),
                s(&c["updated"]),
            ]
        })
        .collect();
    if rows.is_empty() {
        println!("no cases");
        return Ok(());
    }
    print!(
        "{}",
        table(
            &["CASE", "STATUS", "WORKFLOW", "STEP", "ATTEMPT", "PROGRESS", "UPDATED"],
            &rows
        )
    );
    Ok(())
}

fn ms(v: &Value) -> String {
    v.as_u64().map(ms_to_rfc3339).unwrap_or_else(|| "-".into())
}

/// `mqic case ID`: the case, its finished steps and its history.
pub fn case(broker: &str, id: &str, as_json: bool) -> anyhow::Result<()> {
    let got = rpc(broker, Method::GetCase, json!({ "case_id": id }))?;
    if as_json {
        return print_json(&got);
    }
    let c = &got["case"];
    let mut rows = vec![
        vec!["case".into(), s(&c["case_id"])],
        vec!["status".into(), s(&c["status"])],
        vec!["workflow".into(), s(&c["workflow"])],
        vec!["path".into(), s(&c["case_path"])],
        vec!["progress".into(), percent(&c["progress"])],
        vec!["created".into(), ms(&c["created_ms"])],
        vec!["updated".into(), ms(&c["updated_ms"])],
    ];
    if let Some(step) = c["step"].as_object() {
        rows.push(vec![
            "step".into(),
            format!(
                "{} attempt {} ({})",
                s(&step["name"]),
                s(&step["attempt"]),
                percent(&step["progress"])
            ),
        ]);
    }
    if got["archived"] == true {
        rows.push(vec!["archived".into(), "yes".into()]);
    }
    if let Some(f) = c["failure"].as_object() {
        rows.push(vec![
            "failure".into(),
            format!(
                "{} in {} ({}): {}",
                s(&f["category"]),
                s(&f["phase"]),
                s(&f["code"]),
                s(&f["detail"])
            ),
        ]);
    }
    print!("{}", table(&["FIELD", "VALUE"], &rows));
    let done: Vec<Vec<String>> = c["done"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|d| {
            let secs = d["finished_ms"].as_u64().unwrap_or(0) as f64 / 1000.0
                - d["started_ms"].as_u64().unwrap_or(0) as f64 / 1000.0;
            vec![s(&d["name"]), s(&d["attempts"]), format!("{secs:.1}s")]
        })
        .collect();
    if !done.is_empty() {
        println!();
        print!("{}", table(&["STEP DONE", "ATTEMPTS", "DURATION"], &done));
    }
    let history: Vec<Vec<String>> = got["history"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|h| {
            vec![
                ms(&h["at_ms"]),
                format!("{} -> {}", s(&h["from"]), s(&h["to"])),
                s(&h["step"]),
                s(&h["attempt"]),
                s(&h["reason"]),
            ]
        })
        .collect();
    if !history.is_empty() {
        println!();
        print!(
            "{}",
            table(&["AT", "TRANSITION", "STEP", "ATTEMPT", "REASON"], &history)
        );
    }
    Ok(())
}

/// `mqic retry ID` / `mqic cancel ID`.
pub fn change(broker: &str, method: Method, id: &str, as_json: bool) -> anyhow::Result<()> {
    let answer = rpc(broker, method, json!({ "case_id": id }))?;
    if as_json {
        return print_json(&answer);
    }
    println!(
        "case {} is now {}",
        s(&answer["case_id"]),
        s(&answer["status"])
    );
    Ok(())
}

/// `mqic queues`: from the management API, with the credentials of `broker`.
pub fn queues(broker: &str, management: &str, as_json: bool) -> anyhow::Result<()> {
    let url = BrokerUrl::parse(broker).map_err(|e| anyhow!("--broker: {e}"))?;
    let list = runtime()?.block_on(super::client::get_json(
        management,
        "/api/queues",
        &url.user,
        &url.password,
    ))?;
    if as_json {
        return print_json(&list);
    }
    let items = list.as_array().map(Vec::as_slice).unwrap_or_default();
    let many_vhosts = items.iter().any(|q| {
        q["vhost"]
            != items
                .first()
                .map(|f| f["vhost"].clone())
                .unwrap_or_default()
    });
    let rate = |q: &Value, k: &str| {
        q["message_stats"][k]["rate"]
            .as_f64()
            .map(|r| format!("{r:.1}"))
            .unwrap_or_else(|| "0.0".into())
    };
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|q| {
            let mut row = vec![];
            if many_vhosts {
                row.push(s(&q["vhost"]));
            }
            row.extend([
                s(&q["name"]),
                s(&q["messages_ready"]),
                s(&q["messages_unacknowledged"]),
                s(&q["consumers"]),
                rate(q, "publish_details"),
                rate(q, "deliver_get_details"),
            ]);
            row
        })
        .collect();
    let mut headers = vec![];
    if many_vhosts {
        headers.push("VHOST");
    }
    headers.extend(["QUEUE", "READY", "UNACKED", "CONSUMERS", "IN/S", "OUT/S"]);
    print!("{}", table(&headers, &rows));
    Ok(())
}

/// `mqic publish QUEUE JSON`: the JSON must be a valid workflow envelope (seed format;
/// missing `timestamp`, `correlation_id` and `retry_count` are filled in). It goes to the
/// queue persistent and mandatory: a queue that does not exist is an error.
pub fn publish(broker: &str, queue: &str, body: &str, as_json: bool) -> anyhow::Result<()> {
    if queue.is_empty() || queue.len() > 255 {
        bail!("the queue name must be 1 to 255 bytes");
    }
    let envelope = crate::protocol::envelope::decode(body.as_bytes())
        .map_err(|e| anyhow!("not a valid message envelope ({}): {e}", e.kind()))?;
    let bytes = envelope.to_bytes();
    runtime()?.block_on(async {
        let bus = connect(broker).await?;
        let sent = bus.publish(Outgoing::to_queue(queue, bytes)).await;
        bus.close().await;
        sent.map_err(|e| match e {
            crate::bus::BusError::Unroutable(_) => {
                anyhow!("no queue named '{queue}'; nothing was published")
            }
            other => anyhow!("publish to '{queue}' failed: {other}"),
        })
    })?;
    if as_json {
        return print_json(&json!({
            "queue": queue,
            "command": envelope.command.name(),
            "correlation_id": envelope.correlation_id,
        }));
    }
    println!(
        "published {} to {queue} (correlation_id {})",
        envelope.command.name(),
        envelope.correlation_id
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_columns() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["é".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    LONGER\nxyz  1\né    22\n");
    }
}
