//! The outbox relay: publishes what the conductor decided, in order, each confirmed by the
//! broker before it is deleted from the store. A crash between the publish and the delete
//! sends a message twice, never zero times; receivers ignore duplicates.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::driver::Conductor;
use crate::bus::{Bus, BusError, Outgoing};
use crate::workers::{self, Shutdown, WorkerStatus};

/// How many entries one pass reads.
const BATCH: usize = 256;

/// Runs until shutdown, then makes one last pass so decided messages are not left behind.
pub async fn run(
    conductor: Arc<Conductor>,
    bus: Arc<dyn Bus>,
    status: Arc<WorkerStatus>,
    mut shutdown: Shutdown,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let wake = conductor.outbox_ready.notified();
        match pass(&conductor, bus.as_ref()).await {
            Ok(0) => {
                status.set("idle");
                backoff = Duration::from_millis(50);
                tokio::select! {
                    _ = wake => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = workers::stopped(&mut shutdown) => break,
                }
            }
            Ok(n) => {
                status.set(format!("published {n}"));
                backoff = Duration::from_millis(50);
                if *shutdown.borrow() {
                    break;
                }
            }
            Err(e) => {
                status.set(format!("cannot publish: {e}"));
                tracing::warn!("outbox relay: {e}; retrying in {backoff:?}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = workers::stopped(&mut shutdown) => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), pass(&conductor, bus.as_ref())).await;
}

/// Publishes one batch; returns how many were published and deleted.
async fn pass(conductor: &Arc<Conductor>, bus: &dyn Bus) -> Result<usize, String> {
    let store = conductor.store.clone();
    let batch = tokio::task::spawn_blocking(move || store.outbox(BATCH))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if batch.is_empty() {
        return Ok(0);
    }
    let mut done = Vec::with_capacity(batch.len());
    let mut error = None;
    for (seq, entry) in batch {
        let message = Outgoing {
            exchange: entry.exchange.clone(),
            routing_key: entry.routing_key.clone(),
            body: Bytes::from(entry.body.into_bytes()),
            headers: Vec::new(),
            correlation_id: entry.correlation_id.clone(),
            reply_to: None,
            persistent: entry.persistent,
            mandatory: entry.persistent,
        };
        match bus.publish(message).await {
            Ok(()) => done.push(seq),
            // Events go to a topic exchange nobody may be bound to: not an error.
            Err(BusError::Unroutable(_)) if !entry.persistent => done.push(seq),
            Err(e) => {
                error = Some(format!("{} to {}: {e}", entry.exchange, entry.routing_key));
                break;
            }
        }
    }
    let n = done.len();
    if n > 0 {
        let store = conductor.store.clone();
        tokio::task::spawn_blocking(move || store.outbox_delete(&done))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    match error {
        Some(e) if n == 0 => Err(e),
        _ => Ok(n),
    }
}
