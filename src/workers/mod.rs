//! The workers: every background job of the pipeline is one, with a name, a status the
//! dashboard shows, and a cooperative shutdown.
//!
//! - [`scanner`]: finds ready cases in the watched folder and announces each once.
//! - [`executor`]: runs step commands (the local backend in [`crate::hpc::local`]).
//! - [`transfer`]: uploads cases to a step host and downloads results, verified by SHA-256.
//! - [`archiver`]: moves old finished cases to the archive tables and backs up the store.
//! - [`curator`]: samples GPUs on `system_monitor` and records their state for the lease rule.
//!
//! [`consume`] is the one loop every queue worker runs: it (re)subscribes with backoff,
//! decodes envelopes, dead-letters what does not decode (to `<queue>.dlq`, with the reason in
//! a header, logged once) and hands the rest to the worker.

pub mod archiver;
pub mod curator;
pub mod executor;
pub mod scanner;
pub mod transfer;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::bus::{Bus, BusError, Delivery, Outgoing};
use crate::protocol::topology::{
    dead_letter_queue, DEAD_LETTER_KIND_HEADER, DEAD_LETTER_QUEUE_HEADER, DEAD_LETTER_REASON_HEADER,
};
use crate::protocol::{self, Command, Envelope};

/// The shutdown signal every worker watches: `true` means stop.
pub type Shutdown = watch::Receiver<bool>;

/// Waits until shutdown is signalled (or the sender is gone).
pub async fn stopped(shutdown: &mut Shutdown) {
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// What a worker is doing, for `list_workers` and the dashboard.
#[derive(Debug, Default)]
pub struct WorkerStatus {
    state: Mutex<String>,
}

impl WorkerStatus {
    pub fn new() -> Arc<WorkerStatus> {
        Arc::new(WorkerStatus {
            state: Mutex::new("starting".into()),
        })
    }

    pub fn set(&self, state: impl Into<String>) {
        *self.state.lock() = state.into();
    }

    pub fn get(&self) -> String {
        self.state.lock().clone()
    }
}

/// Publishes an envelope to a queue, confirmed.
pub async fn send(bus: &dyn Bus, queue: &str, envelope: &Envelope) -> Result<(), BusError> {
    let mut out = Outgoing::to_queue(queue, envelope.to_bytes());
    out.correlation_id = Some(envelope.correlation_id.clone());
    bus.publish(out).await
}

/// Publishes a command to a queue in a fresh envelope, keeping a correlation id if given.
pub async fn send_command(
    bus: &dyn Bus,
    queue: &str,
    command: Command,
    correlation_id: Option<&str>,
) -> Result<(), BusError> {
    let envelope = match correlation_id {
        Some(c) => Envelope::with_correlation(command, c.to_string()),
        None => Envelope::new(command),
    };
    send(bus, queue, &envelope).await
}

/// Moves a delivery to `<queue>.dlq` with why, then acks it. If the dead-letter publish
/// fails the delivery is nacked with requeue, so nothing is ever lost.
pub async fn dead_letter(bus: &dyn Bus, queue: &str, delivery: Delivery, kind: &str, reason: &str) {
    tracing::warn!(queue, kind, reason, "dead-lettering a message");
    let mut out = Outgoing::to_queue(&dead_letter_queue(queue), delivery.body.clone());
    out.headers = vec![
        (DEAD_LETTER_REASON_HEADER.to_string(), reason.to_string()),
        (DEAD_LETTER_KIND_HEADER.to_string(), kind.to_string()),
        (DEAD_LETTER_QUEUE_HEADER.to_string(), queue.to_string()),
    ];
    out.correlation_id = delivery.correlation_id.clone();
    match bus.publish(out).await {
        Ok(()) => delivery.ack(),
        Err(e) => {
            tracing::error!(queue, error = %e, "cannot dead-letter; leaving the message queued");
            delivery.nack(true);
        }
    }
}

/// A message whose handling failed this many times is dead-lettered.
pub const MAX_HANDLING_FAILURES: u32 = 5;

fn body_key(body: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut h);
    h.finish()
}

/// What a worker does with one decoded message.
pub enum Handled {
    /// Done: ack it.
    Ack,
    /// The worker cannot handle this command on this queue: dead-letter it with the reason.
    Reject(String),
    /// Try again later (a store or bus hiccup): requeue it.
    Retry,
    /// The worker took the delivery over and settles it itself.
    Kept,
}

/// Consumes `queue` until shutdown, (re)subscribing with backoff when the bus drops, and
/// calls `handle` for each envelope that decodes. The handler gets the delivery too (for
/// `reply_to` and for [`Handled::Kept`]).
pub async fn consume<F, Fut>(
    bus: Arc<dyn Bus>,
    queue: &str,
    prefetch: u16,
    status: Arc<WorkerStatus>,
    mut shutdown: Shutdown,
    mut handle: F,
) where
    F: FnMut(Envelope, Delivery) -> Fut,
    Fut: std::future::Future<Output = (Handled, Option<Delivery>)>,
{
    let mut backoff = Duration::from_millis(100);
    // How often each message (by body) failed to be handled: one that keeps failing is
    // dead-lettered instead of being retried forever.
    let mut failures: HashMap<u64, u32> = HashMap::new();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let mut sub = match bus.consume(queue, prefetch).await {
            Ok(s) => {
                backoff = Duration::from_millis(100);
                status.set("idle");
                s
            }
            Err(e) => {
                status.set(format!("cannot consume {queue}: {e}"));
                tracing::warn!(queue, error = %e, "cannot consume; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopped(&mut shutdown) => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        loop {
            let delivery = tokio::select! {
                d = sub.next() => d,
                _ = stopped(&mut shutdown) => return,
            };
            let Some(delivery) = delivery else {
                tracing::warn!(queue, "subscription ended; resubscribing");
                break;
            };
            let envelope = match protocol::decode(&delivery.body) {
                Ok(e) => e,
                Err(e) => {
                    dead_letter(bus.as_ref(), queue, delivery, e.kind(), &e.to_string()).await;
                    continue;
                }
            };
            let key = body_key(&delivery.body);
            let (outcome, delivery) = handle(envelope, delivery).await;
            match (outcome, delivery) {
                (Handled::Ack, Some(d)) => {
                    failures.remove(&key);
                    d.ack()
                }
                (Handled::Retry, Some(d)) => {
                    let n = failures.entry(key).or_insert(0);
                    *n += 1;
                    if *n >= MAX_HANDLING_FAILURES {
                        failures.remove(&key);
                        let reason = format!(
                            "could not be handled after {MAX_HANDLING_FAILURES} attempts (see the log)"
                        );
                        dead_letter(bus.as_ref(), queue, d, "handling_failed", &reason).await;
                        continue;
                    }
                    if failures.len() > 10_000 {
                        failures.clear();
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    d.nack(true)
                }
                (Handled::Reject(reason), Some(d)) => {
                    dead_letter(bus.as_ref(), queue, d, "unexpected_command", &reason).await
                }
                (Handled::Kept, _) | (_, None) => {}
            }
        }
    }
}
