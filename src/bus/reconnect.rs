//! A [`RemoteBus`] that reconnects. A broker restart or a network blip closes the
//! connection; every call after that opens a new one (and declares the topology again), so
//! the workers' own retry loops carry on instead of failing until mqic is restarted. The
//! first connection must succeed: a wrong URL or password stops start-up with one line.

use std::sync::Arc;

use tokio::sync::Mutex;

use super::{BoxFuture, Bus, BusResult, Outgoing, RemoteBus, Subscription};
use crate::protocol::topology::Topology;

/// The remote bus the pipeline uses with `broker.url`.
pub struct ReconnectingBus {
    url: String,
    described: String,
    current: Mutex<Arc<RemoteBus>>,
    /// What was declared, declared again on every new connection (exclusive queues vanish
    /// with a connection, and a restarted broker may have lost transient ones).
    topology: Mutex<Option<Topology>>,
}

impl ReconnectingBus {
    pub async fn connect(url: &str) -> BusResult<ReconnectingBus> {
        let bus = RemoteBus::connect(url).await?;
        Ok(ReconnectingBus {
            url: url.to_string(),
            described: bus.describe(),
            current: Mutex::new(Arc::new(bus)),
            topology: Mutex::new(None),
        })
    }

    /// The open connection, reconnecting first if the last one closed.
    async fn bus(&self) -> BusResult<Arc<RemoteBus>> {
        let mut current = self.current.lock().await;
        if current.is_open() {
            return Ok(current.clone());
        }
        tracing::warn!("connection to {} lost; reconnecting", self.described);
        let fresh = Arc::new(RemoteBus::connect(&self.url).await?);
        if let Some(topology) = self.topology.lock().await.as_ref() {
            fresh.declare(topology).await?;
        }
        tracing::info!("reconnected to {}", self.described);
        *current = fresh.clone();
        Ok(fresh)
    }
}

impl Bus for ReconnectingBus {
    fn declare(&self, topology: &Topology) -> BoxFuture<'_, BusResult<()>> {
        let topology = topology.clone();
        Box::pin(async move {
            *self.topology.lock().await = Some(topology.clone());
            self.bus().await?.declare(&topology).await
        })
    }

    fn publish(&self, message: Outgoing) -> BoxFuture<'_, BusResult<()>> {
        Box::pin(async move { self.bus().await?.publish(message).await })
    }

    fn consume(&self, queue: &str, prefetch: u16) -> BoxFuture<'_, BusResult<Subscription>> {
        let queue = queue.to_string();
        Box::pin(async move { self.bus().await?.consume(&queue, prefetch).await })
    }

    fn reply_queue(&self) -> BoxFuture<'_, BusResult<Subscription>> {
        Box::pin(async move { self.bus().await?.reply_queue().await })
    }

    fn bind(&self, queue: &str, exchange: &str, routing_key: &str) -> BoxFuture<'_, BusResult<()>> {
        let (q, e, k) = (
            queue.to_string(),
            exchange.to_string(),
            routing_key.to_string(),
        );
        Box::pin(async move { self.bus().await?.bind(&q, &e, &k).await })
    }

    fn queue_depth(&self, queue: &str) -> BoxFuture<'_, BusResult<Option<(u32, u32)>>> {
        let queue = queue.to_string();
        Box::pin(async move { self.bus().await?.queue_depth(&queue).await })
    }

    fn describe(&self) -> String {
        self.described.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::App;
    use crate::config::Config;
    use std::time::Duration;

    async fn broker_on(port: u16, dir: &std::path::Path) -> App {
        let mut config = Config::embedded();
        config.data_dir = dir.to_path_buf();
        config.amqp.listen = format!("127.0.0.1:{port}").parse().unwrap();
        config.management.enabled = false;
        config.prometheus.enabled = false;
        config.web.listen = "127.0.0.1:0".parse().unwrap();
        config.scanner.enabled = false;
        App::start(config).await.expect("broker starts")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_broker_is_reconnected_and_the_topology_declared_again() {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let app = broker_on(port, &dir.path().join("a")).await;
        let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2F");
        let bus = ReconnectingBus::connect(&url).await.unwrap();
        bus.declare(&crate::protocol::topology::topology())
            .await
            .unwrap();
        bus.publish(Outgoing::to_queue("archiver_queue.dlq", &b"one"[..]))
            .await
            .unwrap();
        app.shutdown().await;

        let app = broker_on(port, &dir.path().join("b")).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match bus
                .publish(Outgoing::to_queue("archiver_queue.dlq", &b"two"[..]))
                .await
            {
                Ok(()) => break,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "never reconnected: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        // The new broker knew nothing of the queue: the reconnect declared it again.
        let depth = bus.queue_depth("archiver_queue.dlq").await.unwrap();
        assert!(depth.is_some_and(|(ready, _)| ready >= 1), "{depth:?}");
        app.shutdown().await;
    }
}
