//! `/metrics` in the Prometheus text exposition format 0.0.4: `rabbitmq_`-named broker
//! metrics with RabbitMQ's names and per-object labels (`vhost`, `queue`), so RabbitMQ
//! Grafana dashboards work, and `mqic_` workflow metrics from the case store.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::Mgmt;
use crate::amqp::stats::{Counters, QueueCounters};
use crate::conductor::driver::{TRANSFER_BYTES_DOWNLOAD, TRANSFER_BYTES_UPLOAD};
use crate::store::records::{now_ms, CaseStatus, GpuState};

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) of the step-duration histogram buckets.
const STEP_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0,
];

/// A text-format writer: one `# HELP`/`# TYPE` header per family, then its samples.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else if v.is_nan() {
        "NaN".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

impl Exposition {
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", number(value));
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

struct QueueRow {
    vhost: String,
    queue: String,
    ready: u64,
    unacked: u64,
    ready_bytes: u64,
    consumers: u64,
    counters: QueueCounters,
}

/// Renders every metric (reads the store: call from a blocking task).
pub fn render(m: &Mgmt) -> String {
    let mut e = Exposition::default();
    broker_metrics(m, &mut e);
    if let Some(store) = &m.store {
        if let Err(err) = workflow_metrics(store, &mut e) {
            tracing::warn!("metrics: cannot read the store: {err}");
            e.single(
                "mqic_store_readable",
                "gauge",
                "1 when the case store could be read for this scrape.",
                0.0,
            );
        } else {
            e.single(
                "mqic_store_readable",
                "gauge",
                "1 when the case store could be read for this scrape.",
                1.0,
            );
        }
    }
    e.finish()
}

fn broker_metrics(m: &Mgmt, e: &mut Exposition) {
    let k = &m.broker.stats.counters;
    let connections = m.broker.stats.connections();
    let channels: usize = connections.iter().map(|c| c.channels().len()).sum();
    let mut rows = Vec::new();
    let mut totals = QueueCounters::default();
    for v in m.broker.vhosts() {
        let (queues, t) = v.queues_and_totals();
        totals += t;
        for q in queues {
            let (ready, unacked, bytes) = q.stats();
            rows.push(QueueRow {
                vhost: v.name.clone(),
                queue: q.name().to_string(),
                ready: ready as u64,
                unacked: unacked as u64,
                ready_bytes: bytes as u64,
                consumers: q.consumer_count() as u64,
                counters: q.counters(),
            });
        }
    }
    rows.sort_by(|a, b| (&a.vhost, &a.queue).cmp(&(&b.vhost, &b.queue)));
    let consumers: u64 = rows.iter().map(|r| r.consumers).sum();

    e.family(
        "rabbitmq_build_info",
        "untyped",
        "mqic build information (RabbitMQ-compatible metric names).",
    );
    e.sample(
        "rabbitmq_build_info",
        &[
            ("rabbitmq_version", super::RABBITMQ_COMPAT_VERSION),
            ("product_name", super::PRODUCT_NAME),
            ("product_version", super::PRODUCT_VERSION),
        ],
        1.0,
    );
    e.family(
        "rabbitmq_identity_info",
        "untyped",
        "Node and cluster identity, for joining series.",
    );
    e.sample(
        "rabbitmq_identity_info",
        &[
            ("rabbitmq_node", &m.node),
            ("rabbitmq_cluster", &m.node),
            ("rabbitmq_cluster_permanent_id", &m.node),
            ("rabbitmq_endpoint", "per-object"),
        ],
        1.0,
    );
    e.single(
        "rabbitmq_connections",
        "gauge",
        "Connections currently open (network and in-process).",
        connections.len() as f64,
    );
    e.single(
        "rabbitmq_channels",
        "gauge",
        "Channels currently open.",
        channels as f64,
    );
    e.single(
        "rabbitmq_consumers",
        "gauge",
        "Consumers currently connected.",
        consumers as f64,
    );
    e.single(
        "rabbitmq_queues",
        "gauge",
        "Queues available.",
        rows.len() as f64,
    );
    let c = |x: &std::sync::atomic::AtomicU64| Counters::get(x) as f64;
    e.single(
        "rabbitmq_connections_opened_total",
        "counter",
        "Total number of connections opened.",
        c(&k.connections_opened),
    );
    e.single(
        "rabbitmq_connections_closed_total",
        "counter",
        "Total number of connections closed or terminated.",
        c(&k.connections_closed),
    );
    e.single(
        "rabbitmq_channels_opened_total",
        "counter",
        "Total number of channels opened.",
        c(&k.channels_opened),
    );
    e.single(
        "rabbitmq_channels_closed_total",
        "counter",
        "Total number of channels closed.",
        c(&k.channels_closed),
    );
    e.single(
        "rabbitmq_queues_declared_total",
        "counter",
        "Total number of queues declared.",
        c(&k.queues_declared),
    );
    e.single(
        "rabbitmq_queues_created_total",
        "counter",
        "Total number of queues created.",
        c(&k.queues_created),
    );
    e.single(
        "rabbitmq_queues_deleted_total",
        "counter",
        "Total number of queues deleted.",
        totals.deleted_queues as f64,
    );

    type Pick = fn(&QueueRow) -> f64;
    let per_queue: &[(&str, &str, &str, Pick)] = &[
        (
            "rabbitmq_queue_messages_ready",
            "gauge",
            "Messages ready to be delivered to consumers.",
            |r| r.ready as f64,
        ),
        (
            "rabbitmq_queue_messages_unacked",
            "gauge",
            "Messages delivered to consumers but not yet acknowledged.",
            |r| r.unacked as f64,
        ),
        (
            "rabbitmq_queue_messages",
            "gauge",
            "Sum of ready and unacknowledged messages.",
            |r| (r.ready + r.unacked) as f64,
        ),
        (
            "rabbitmq_queue_messages_ready_bytes",
            "gauge",
            "Size in bytes of ready messages.",
            |r| r.ready_bytes as f64,
        ),
        (
            "rabbitmq_queue_consumers",
            "gauge",
            "Consumers on a queue.",
            |r| r.consumers as f64,
        ),
        (
            "rabbitmq_queue_messages_published_total",
            "counter",
            "Total number of messages published to queues.",
            |r| r.counters.published as f64,
        ),
        (
            "rabbitmq_queue_messages_delivered_total",
            "counter",
            "Total number of messages delivered to consumers (consume and get).",
            |r| r.counters.delivered_total() as f64,
        ),
        (
            "rabbitmq_queue_messages_delivered_ack_total",
            "counter",
            "Total number of messages delivered to consumers in manual acknowledgement mode.",
            |r| (r.counters.delivered_ack + r.counters.get_ack) as f64,
        ),
        (
            "rabbitmq_queue_messages_acked_total",
            "counter",
            "Total number of messages acknowledged by consumers.",
            |r| r.counters.acked as f64,
        ),
        (
            "rabbitmq_queue_messages_redelivered_total",
            "counter",
            "Total number of messages redelivered to consumers.",
            |r| r.counters.redelivered as f64,
        ),
    ];
    for (name, kind, help, pick) in per_queue {
        e.family(name, kind, help);
        for r in &rows {
            e.sample(name, &[("vhost", &r.vhost), ("queue", &r.queue)], pick(r));
        }
    }

    let proto = [("protocol", "amqp091")];
    let global: &[(&str, &str, f64)] = &[
        ("rabbitmq_global_messages_received_total", "Total number of messages received from publishers.", c(&k.received)),
        ("rabbitmq_global_messages_routed_total", "Total number of messages routed to queues.", c(&k.routed)),
        ("rabbitmq_global_messages_unroutable_dropped_total", "Total number of messages published as non-mandatory into an exchange and dropped as unroutable.", c(&k.unroutable_dropped)),
        ("rabbitmq_global_messages_unroutable_returned_total", "Total number of messages published as mandatory into an exchange and returned to the publisher as unroutable.", c(&k.unroutable_returned)),
        ("rabbitmq_global_messages_delivered_total", "Total number of messages delivered to consumers.", totals.delivered_total() as f64),
        ("rabbitmq_global_messages_delivered_consume_manual_ack_total", "Total number of messages delivered to consumers using basic.consume with manual acknowledgment.", totals.delivered_ack as f64),
        ("rabbitmq_global_messages_delivered_consume_auto_ack_total", "Total number of messages delivered to consumers using basic.consume with automatic acknowledgment.", totals.delivered_no_ack as f64),
        ("rabbitmq_global_messages_delivered_get_manual_ack_total", "Total number of messages delivered to consumers using basic.get with manual acknowledgment.", totals.get_ack as f64),
        ("rabbitmq_global_messages_delivered_get_auto_ack_total", "Total number of messages delivered to consumers using basic.get with automatic acknowledgment.", totals.get_no_ack as f64),
        ("rabbitmq_global_messages_acknowledged_total", "Total number of messages acknowledged by consumers.", totals.acked as f64),
        ("rabbitmq_global_messages_redelivered_total", "Total number of messages redelivered to consumers.", totals.redelivered as f64),
    ];
    for (name, help, value) in global {
        e.family(name, "counter", help);
        e.sample(name, &proto, *value);
    }
    e.family(
        "rabbitmq_global_consumers",
        "gauge",
        "Current number of consumers.",
    );
    e.sample("rabbitmq_global_consumers", &proto, consumers as f64);

    if let Some(rss) = crate::memory::resident_bytes() {
        e.single(
            "rabbitmq_process_resident_memory_bytes",
            "gauge",
            "Memory used in bytes.",
            rss as f64,
        );
    }
    if let Some(w) = &m.memory {
        e.single(
            "rabbitmq_resident_memory_limit_bytes",
            "gauge",
            "Memory high watermark in bytes.",
            w.limit() as f64,
        );
    }
    e.single(
        "rabbitmq_alarms_memory_used_watermark",
        "gauge",
        "1 if the memory alarm is in effect, 0 otherwise.",
        m.broker.memory_alarm_on() as u8 as f64,
    );
    e.single(
        "rabbitmq_alarms_free_disk_space_watermark",
        "gauge",
        "1 if the free disk space alarm is in effect, 0 otherwise.",
        m.broker.disk_alarm_on() as u8 as f64,
    );
    let (fd_used, fd_total) = super::api::fds();
    e.single(
        "rabbitmq_process_open_fds",
        "gauge",
        "Open file descriptors.",
        fd_used as f64,
    );
    e.single(
        "rabbitmq_process_max_fds",
        "gauge",
        "Open file descriptors limit.",
        fd_total as f64,
    );
    e.single(
        "rabbitmq_erlang_uptime_seconds",
        "gauge",
        "Node uptime (mqic has no Erlang VM; this is the process uptime).",
        m.started.elapsed().as_secs_f64(),
    );
}

fn workflow_metrics(
    store: &crate::store::Store,
    e: &mut Exposition,
) -> Result<(), crate::store::StoreError> {
    let cases = store.cases()?;
    let mut by_status: BTreeMap<&str, u64> =
        CaseStatus::ALL.iter().map(|s| (s.name(), 0)).collect();
    // Finished steps of the cases in the store: name -> durations (seconds).
    let mut steps: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut retries = 0u64;
    for c in &cases {
        *by_status.entry(c.status.name()).or_default() += 1;
        retries += c.manual_retries as u64;
        for d in &c.done {
            steps
                .entry(d.name.clone())
                .or_default()
                .push(d.finished_ms.saturating_sub(d.started_ms) as f64 / 1000.0);
        }
    }
    e.family(
        "mqic_cases",
        "gauge",
        "Cases in the store by status (archived cases are counted in mqic_cases_archived).",
    );
    for (status, n) in &by_status {
        e.sample("mqic_cases", &[("status", status)], *n as f64);
    }
    e.single(
        "mqic_cases_archived",
        "gauge",
        "Cases moved to the archive.",
        store.archived_count()? as f64,
    );
    e.single(
        "mqic_case_manual_retries",
        "gauge",
        "Operator retries of the cases in the store.",
        retries as f64,
    );
    e.family(
        "mqic_step_duration_seconds",
        "histogram",
        "Duration of finished workflow steps (first start to finish, all attempts) of the cases in the store; archiving a case removes its steps.",
    );
    for (step, durations) in &steps {
        for bound in STEP_BUCKETS {
            let cumulative = durations.iter().filter(|d| **d <= *bound).count();
            e.sample(
                "mqic_step_duration_seconds_bucket",
                &[("step", step), ("le", &number(*bound))],
                cumulative as f64,
            );
        }
        e.sample(
            "mqic_step_duration_seconds_bucket",
            &[("step", step), ("le", "+Inf")],
            durations.len() as f64,
        );
        e.sample(
            "mqic_step_duration_seconds_sum",
            &[("step", step)],
            durations.iter().sum(),
        );
        e.sample(
            "mqic_step_duration_seconds_count",
            &[("step", step)],
            durations.len() as f64,
        );
    }
    let gpus = store.gpus()?;
    let leases = store.leases()?;
    e.family("mqic_gpus", "gauge", "GPUs known to mqic, by state.");
    e.sample(
        "mqic_gpus",
        &[("state", "usable")],
        gpus.iter().filter(|g| g.usable).count() as f64,
    );
    e.sample(
        "mqic_gpus",
        &[("state", "unusable")],
        gpus.iter().filter(|g| !g.usable).count() as f64,
    );
    e.sample("mqic_gpus", &[("state", "leased")], leases.len() as f64);
    // Per GPU, what the curator last sampled (GPUs without a sample have no series).
    type Pick = fn(&GpuState) -> Option<f64>;
    let per_gpu: [(&str, &str, Pick); 4] = [
        (
            "mqic_gpu_utilization_percent",
            "GPU utilization in the curator's last sample, in percent.",
            |s| s.utilization_pct.map(f64::from),
        ),
        (
            "mqic_gpu_memory_used_bytes",
            "GPU memory in use in the curator's last sample.",
            |s| s.memory_used_mib.map(|m| (m << 20) as f64),
        ),
        (
            "mqic_gpu_memory_total_bytes",
            "GPU memory in total in the curator's last sample.",
            |s| s.memory_total_mib.map(|m| (m << 20) as f64),
        ),
        (
            "mqic_gpu_temperature_celsius",
            "GPU temperature in the curator's last sample.",
            |s| s.temperature_c.map(f64::from),
        ),
    ];
    for (name, help, pick) in per_gpu {
        let values: Vec<(String, String, f64)> = gpus
            .iter()
            .filter_map(|g| {
                let value = pick(g.state.as_ref()?)?;
                Some((g.gpu.host.clone(), g.gpu.index.to_string(), value))
            })
            .collect();
        if values.is_empty() {
            continue;
        }
        e.family(name, "gauge", help);
        for (host, index, value) in &values {
            e.sample(name, &[("host", host), ("index", index)], *value);
        }
    }
    let now = now_ms();
    let workers = store.workers()?;
    e.family(
        "mqic_workers",
        "gauge",
        "Workers that sent heartbeats, by liveness.",
    );
    e.sample(
        "mqic_workers",
        &[("state", "alive")],
        workers.iter().filter(|w| w.alive(now)).count() as f64,
    );
    e.sample(
        "mqic_workers",
        &[("state", "missing")],
        workers.iter().filter(|w| !w.alive(now)).count() as f64,
    );
    e.family(
        "mqic_transfer_bytes_total",
        "counter",
        "Bytes copied by transfer steps (upload to the step host, download of results), kept in the store across restarts; files already in place count nothing.",
    );
    for (direction, counter) in [
        ("upload", TRANSFER_BYTES_UPLOAD),
        ("download", TRANSFER_BYTES_DOWNLOAD),
    ] {
        e.sample(
            "mqic_transfer_bytes_total",
            &[("direction", direction)],
            store.counter(counter)? as f64,
        );
    }
    e.single(
        "mqic_outbox_messages",
        "gauge",
        "Workflow messages decided but not yet published.",
        store.outbox_len()? as f64,
    );
    Ok(())
}

/// `GET /metrics` (and `/metrics/per-object`, the same per-object data).
pub async fn metrics(State(m): State<Arc<Mgmt>>) -> Response {
    match tokio::task::spawn_blocking(move || render(&m)).await {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("metrics failed: {e}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_help_are_escaped() {
        let mut e = Exposition::default();
        e.family("x_total", "counter", "a \\ b\nc");
        e.sample("x_total", &[("queue", "q\"1\\\n")], 3.0);
        e.sample("x_total", &[], 0.5);
        let text = e.finish();
        assert_eq!(
            text,
            "# HELP x_total a \\\\ b\\nc\n# TYPE x_total counter\nx_total{queue=\"q\\\"1\\\\\\n\"} 3\nx_total 0.5\n"
        );
        assert_eq!(number(f64::INFINITY), "+Inf");
    }
}
