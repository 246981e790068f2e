//! The bus the workflow talks through. [`Bus`] has two implementations with the same
//! semantics (confirmed publishes, manual acks, redelivery of what was not acked when a
//! consumer goes away):
//! - [`embedded::EmbeddedBus`]: an in-process handle to mqic's own broker, no TCP.
//! - [`remote::RemoteBus`]: the `amqprs` client, to mqic or to any RabbitMQ (`broker.url`).
//!
//! The workflow knows nothing of frames, and the broker knows nothing of cases.

mod confirm;
#[cfg(test)]
mod contract;
pub mod embedded;
pub mod reconnect;
pub mod remote;
pub(crate) mod url;

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::protocol::topology::Topology;

pub use embedded::EmbeddedBus;
pub use reconnect::ReconnectingBus;
pub use remote::RemoteBus;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The connection or channel is gone; the caller reconnects.
    #[error("bus closed: {0}")]
    Closed(String),
    /// The broker refused an operation (a reply code and text).
    #[error("broker refused: {0}")]
    Refused(String),
    /// The broker nacked a publish (it was not stored).
    #[error("publish not confirmed by the broker")]
    Nacked,
    /// A publish could not be routed to any queue (mandatory publishes only).
    #[error("message to {0} was not routed to any queue")]
    Unroutable(String),
}

pub type BusResult<T> = Result<T, BusError>;

/// A message to publish. Bodies are JSON; headers are string-valued.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outgoing {
    pub exchange: String,
    pub routing_key: String,
    pub body: Bytes,
    pub headers: Vec<(String, String)>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    /// delivery_mode 2: kept across a broker restart on a durable queue.
    pub persistent: bool,
    /// Refuse (as [`BusError::Unroutable`]) when no queue receives it.
    pub mandatory: bool,
}

impl Outgoing {
    /// A persistent, mandatory JSON message to a queue through the default exchange.
    pub fn to_queue(queue: &str, body: impl Into<Bytes>) -> Outgoing {
        Outgoing {
            exchange: String::new(),
            routing_key: queue.to_string(),
            body: body.into(),
            persistent: true,
            mandatory: true,
            ..Outgoing::default()
        }
    }

    /// A transient message to an exchange (events, logs): dropped when nobody is bound.
    pub fn to_exchange(exchange: &str, routing_key: &str, body: impl Into<Bytes>) -> Outgoing {
        Outgoing {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            body: body.into(),
            ..Outgoing::default()
        }
    }

    /// Refuses what AMQP cannot carry: names and short-string properties over 255 bytes.
    pub(crate) fn validate(&self) -> BusResult<()> {
        let short = [
            ("exchange", Some(self.exchange.as_str())),
            ("routing key", Some(self.routing_key.as_str())),
            ("correlation_id", self.correlation_id.as_deref()),
            ("reply_to", self.reply_to.as_deref()),
        ];
        let headers = self
            .headers
            .iter()
            .map(|(k, _)| ("header name", Some(k.as_str())));
        for (what, value) in short.into_iter().chain(headers) {
            if value.is_some_and(|v| v.len() > 255) {
                return Err(BusError::Refused(format!(
                    "{what} is longer than 255 bytes"
                )));
            }
        }
        Ok(())
    }
}

/// How a delivery is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    Ack,
    Nack { requeue: bool },
}

/// Settles one delivery on the channel it came from. Dropping a delivery without settling
/// it leaves it unacked until the subscription ends, when the broker redelivers it.
#[derive(Debug)]
pub struct Acker {
    tag: u64,
    tx: mpsc::UnboundedSender<(u64, Settle)>,
}

impl Acker {
    pub fn new(tag: u64, tx: mpsc::UnboundedSender<(u64, Settle)>) -> Acker {
        Acker { tag, tx }
    }
}

/// A message received from a queue.
#[derive(Debug)]
pub struct Delivery {
    pub body: Bytes,
    pub exchange: String,
    pub routing_key: String,
    pub redelivered: bool,
    /// String-valued headers (others are left out).
    pub headers: Vec<(String, String)>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    acker: Acker,
}

impl Delivery {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        body: Bytes,
        exchange: String,
        routing_key: String,
        redelivered: bool,
        headers: Vec<(String, String)>,
        correlation_id: Option<String>,
        reply_to: Option<String>,
        acker: Acker,
    ) -> Delivery {
        Delivery {
            body,
            exchange,
            routing_key,
            redelivered,
            headers,
            correlation_id,
            reply_to,
            acker,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn ack(self) {
        let _ = self.acker.tx.send((self.acker.tag, Settle::Ack));
    }

    pub fn nack(self, requeue: bool) {
        let _ = self
            .acker
            .tx
            .send((self.acker.tag, Settle::Nack { requeue }));
    }
}

/// A stream of deliveries from one queue. It ends (`None`) when the channel or connection
/// is lost; unacked deliveries then go back to the queue.
#[derive(Debug)]
pub struct Subscription {
    /// The queue's name (the server-generated one for [`Bus::reply_queue`]).
    pub queue: String,
    rx: mpsc::Receiver<Delivery>,
}

impl Subscription {
    pub fn new(queue: String, rx: mpsc::Receiver<Delivery>) -> Subscription {
        Subscription { queue, rx }
    }

    pub async fn next(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }
}

/// What the workflow needs from a message broker.
pub trait Bus: Send + Sync + 'static {
    /// Declares exchanges, queues and bindings (idempotent).
    fn declare(&self, topology: &Topology) -> BoxFuture<'_, BusResult<()>>;

    /// Publishes and resolves once the broker has confirmed the message.
    fn publish(&self, message: Outgoing) -> BoxFuture<'_, BusResult<()>>;

    /// Consumes `queue` with manual acks and at most `prefetch` unacked deliveries.
    fn consume(&self, queue: &str, prefetch: u16) -> BoxFuture<'_, BusResult<Subscription>>;

    /// Declares an exclusive, server-named queue and consumes it with auto-ack: where RPC
    /// replies come back. Bind it with [`Bus::bind`] to watch an exchange.
    fn reply_queue(&self) -> BoxFuture<'_, BusResult<Subscription>>;

    /// Binds a queue to an exchange.
    fn bind(&self, queue: &str, exchange: &str, routing_key: &str) -> BoxFuture<'_, BusResult<()>>;

    /// Ready messages and consumers of a queue, or `None` if it does not exist.
    fn queue_depth(&self, queue: &str) -> BoxFuture<'_, BusResult<Option<(u32, u32)>>>;

    /// A short description for logs: `embedded` or the URL without its password.
    fn describe(&self) -> String;
}
