//! Log lines on the `mqic.logs` topic exchange, routed by severity (`error`, `warn`,
//! `info`), so a lab tool can bind `error` and hear about failures without reading files.
//! A tracing layer copies mqic's own events (those the log filter lets through) into a
//! bounded channel; the pipeline publishes them. When the channel is full, or publishing
//! fails, lines are dropped: the log exchange must never slow down or loop back into the
//! logging it reports.

use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::{Event as TraceEvent, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

use crate::bus::{Bus, Outgoing};
use crate::protocol::events::{LogLine, Severity, LOGS_EXCHANGE};
use crate::protocol::{rfc3339, CaseId};
use crate::workers::{stopped, Shutdown};

/// Lines waiting to be published; beyond this they are dropped.
const BACKLOG: usize = 1024;

static RECEIVER: Mutex<Option<mpsc::Receiver<LogLine>>> = Mutex::new(None);

/// The tracing layer: install it with the process's subscriber (the CLI does).
pub struct LogLayer {
    tx: mpsc::Sender<LogLine>,
}

/// Makes the layer and parks its receiver for [`take_receiver`].
pub fn layer() -> LogLayer {
    let (tx, rx) = mpsc::channel(BACKLOG);
    *RECEIVER.lock() = Some(rx);
    LogLayer { tx }
}

/// The receiving end of the layer installed in this process, once.
pub fn take_receiver() -> Option<mpsc::Receiver<LogLine>> {
    RECEIVER.lock().take()
}

#[derive(Default)]
struct Fields {
    message: String,
    case: Option<String>,
    rest: Vec<String>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "case" => self.case = Some(format!("{value:?}").trim_matches('"').to_string()),
            name => self.rest.push(format!("{name}={value:?}")),
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "case" => self.case = Some(value.to_string()),
            name => self.rest.push(format!("{name}={value}")),
        }
    }
}

impl<S: Subscriber> Layer<S> for LogLayer {
    fn on_event(&self, event: &TraceEvent<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        if !meta.target().starts_with("mqic") || meta.target().starts_with("mqic::logbus") {
            return;
        }
        let severity = match *meta.level() {
            Level::ERROR => Severity::Error,
            Level::WARN => Severity::Warn,
            Level::INFO => Severity::Info,
            _ => return,
        };
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut message = fields.message;
        if !fields.rest.is_empty() {
            message = format!("{message} {}", fields.rest.join(" "));
        }
        let _ = self.tx.try_send(LogLine {
            severity,
            component: meta.target().to_string(),
            case_id: fields.case.map(CaseId),
            message,
            timestamp: rfc3339(SystemTime::now()),
        });
    }
}

/// Publishes log lines until shutdown.
pub async fn publish(
    bus: Arc<dyn Bus>,
    mut lines: mpsc::Receiver<LogLine>,
    mut shutdown: Shutdown,
) {
    loop {
        let line = tokio::select! {
            l = lines.recv() => l,
            _ = stopped(&mut shutdown) => return,
        };
        let Some(line) = line else { return };
        let body = serde_json::to_vec(&line).expect("log lines serialize");
        let _ = bus
            .publish(Outgoing::to_exchange(
                LOGS_EXCHANGE,
                line.severity.routing_key(),
                body,
            ))
            .await;
    }
}
