//! [`EmbeddedBus`]: the [`Bus`] on mqic's own broker in the same process, over
//! [`LocalConnection`] channels instead of TCP. It goes through the same channel operations a
//! wire client reaches, so confirms, returns, prefetch and requeue-on-close behave alike.
//!
//! A [`LocalChannel`] is driven through `&mut` and delivers its events to one receiver, so
//! every channel that outlives a call is owned by a task: one publisher task (confirm mode)
//! and one task per subscription. Declares and binds are synchronous broker calls and run on
//! a control channel under a lock.

use std::sync::Arc;

use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::{AMQPValue, FieldTable};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use super::confirm::PendingConfirms;
use super::{Acker, BoxFuture, Bus, BusError, BusResult, Delivery, Outgoing, Settle, Subscription};
use crate::amqp::outbound::{self, LocalEvent};
use crate::amqp::{AmqpError, Broker, LocalChannel, LocalConnection};
use crate::protocol::topology::Topology;

/// The user the bus's connection is recorded under (in-process connections are trusted).
const USER: &str = "mqic";

/// Deliveries a no-ack or unlimited-prefetch subscription buffers before the broker side
/// waits for the reader.
const UNBOUNDED_BUFFER: usize = 256;

/// A publish handed to the publisher task, with where its outcome goes.
type PublishRequest = (Outgoing, oneshot::Sender<BusResult<()>>);

/// An in-process handle to the broker. Create it inside a Tokio runtime (it spawns the
/// publisher task); dropping it stops that task and deletes its reply queues.
#[derive(Debug)]
pub struct EmbeddedBus {
    /// Read directly for [`Bus::queue_depth`]: no channel operation reports it passively.
    broker: Arc<Broker>,
    /// The vhost this bus's connection is bound to, for looking up queues.
    vhost: String,
    /// The connection all channels come from (it owns the exclusive reply queues), shared
    /// with the publisher task, which opens a fresh channel after a channel error.
    control: Arc<Mutex<Control>>,
    /// Publishes go to the one task that owns the confirm-mode channel.
    publishes: mpsc::UnboundedSender<PublishRequest>,
}

#[derive(Debug)]
struct Control {
    /// Dropping it deletes the exclusive queues it declared, as a closing wire connection does.
    connection: LocalConnection,
    /// For declare and bind. Any error closes a channel, so it is replaced after one.
    channel: LocalChannel,
}

impl Control {
    fn run<T>(
        &mut self,
        op: impl FnOnce(&mut LocalChannel) -> Result<T, AmqpError>,
    ) -> BusResult<T> {
        op(&mut self.channel).map_err(|e| {
            self.channel = self.connection.channel();
            refused(e)
        })
    }
}

fn refused(e: AmqpError) -> BusError {
    BusError::Refused(e.to_string())
}

impl EmbeddedBus {
    /// Opens an in-process connection to `vhost` of `broker`.
    pub fn new(broker: Arc<Broker>, vhost: &str) -> Result<EmbeddedBus, BusError> {
        let mut connection = LocalConnection::open(&broker, vhost, USER).map_err(refused)?;
        let channel = connection.channel();
        let control = Arc::new(Mutex::new(Control {
            connection,
            channel,
        }));
        let (publishes, requests) = mpsc::unbounded_channel();
        tokio::spawn(publisher(control.clone(), requests));
        Ok(EmbeddedBus {
            broker,
            vhost: vhost.to_string(),
            control,
            publishes,
        })
    }

    /// Opens a channel that consumes `queue` (or a new exclusive, auto-delete, server-named
    /// queue when `None`, consumed with auto-ack) and hands it to its own task.
    fn subscribe(&self, queue: Option<&str>, prefetch: u16) -> BusResult<Subscription> {
        let mut channel = self.control.lock().connection.channel();
        let (name, no_ack) = match queue {
            Some(q) => (q.to_string(), false),
            None => {
                let (name, _, _) = channel
                    .queue_declare("", false, true, true, FieldTable::default())
                    .map_err(refused)?;
                (name, true)
            }
        };
        if !no_ack {
            channel.qos(prefetch).map_err(refused)?;
        }
        channel
            .consume(&name, "", no_ack, FieldTable::default())
            .map_err(refused)?;
        let buffer = match (no_ack, prefetch) {
            (false, p) if p > 0 => p as usize,
            _ => UNBOUNDED_BUFFER,
        };
        let (tx, rx) = mpsc::channel(buffer);
        tokio::spawn(serve_subscription(channel, no_ack, tx));
        Ok(Subscription::new(name, rx))
    }
}

/// Owns the confirm-mode channel: publishes each request, then settles waiting publishes
/// as the channel's confirms and returns arrive. Ends when the bus is dropped.
async fn publisher(
    control: Arc<Mutex<Control>>,
    mut requests: mpsc::UnboundedReceiver<PublishRequest>,
) {
    let mut current: Option<(LocalChannel, PendingConfirms)> = None;
    loop {
        tokio::select! {
            request = requests.recv() => {
                let Some((message, reply)) = request else { break };
                let (channel, pending) = match current.as_mut() {
                    Some(open) => open,
                    None => {
                        let mut channel = control.lock().connection.channel();
                        if let Err(e) = channel.confirm_select() {
                            let _ = reply.send(Err(refused(e)));
                            continue;
                        }
                        current.insert((channel, PendingConfirms::default()))
                    }
                };
                let Some(seq) = pending.register(&message, reply) else {
                    current = None;
                    continue;
                };
                let properties = properties(&message);
                let published = channel.publish(
                    &message.exchange,
                    &message.routing_key,
                    message.mandatory,
                    &properties,
                    message.body.clone(),
                );
                match published {
                    Ok(()) => {
                        // Returns and confirms are usually raised during the publish itself.
                        while let Some(event) = channel.try_next_event() {
                            settle_publishes(pending, event);
                        }
                    }
                    Err(e) => {
                        // The error closed the channel: nothing on it will be confirmed.
                        pending.abandon(seq, refused(e.clone()));
                        pending.close(refused(e));
                        current = None;
                    }
                }
            }
            Some(event) = async {
                match current.as_mut() {
                    Some((channel, _)) => channel.next_event().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some((_, pending)) = current.as_mut() {
                    settle_publishes(pending, event);
                }
            }
        }
    }
}

fn settle_publishes(pending: &mut PendingConfirms, event: LocalEvent) {
    match event {
        LocalEvent::Confirm {
            delivery_tag,
            multiple,
            ack,
        } => pending.confirmed(delivery_tag, multiple, ack),
        LocalEvent::Return { message, .. } => {
            pending.returned(&message.exchange, &message.routing_key, &message.body)
        }
        LocalEvent::Deliver(_) | LocalEvent::Cancelled { .. } => {}
    }
}

/// The AMQP properties of an outgoing message.
fn properties(message: &Outgoing) -> AMQPProperties {
    let mut p = AMQPProperties::default();
    if !message.headers.is_empty() {
        let mut table = FieldTable::default();
        for (k, v) in &message.headers {
            table.insert(k.clone().into(), AMQPValue::LongString(v.clone().into()));
        }
        p = p.with_headers(table);
    }
    if let Some(c) = &message.correlation_id {
        p = p.with_correlation_id(c.clone().into());
    }
    if let Some(r) = &message.reply_to {
        p = p.with_reply_to(r.clone().into());
    }
    if message.persistent {
        p = p.with_delivery_mode(2);
    }
    p
}

/// Owns one consuming channel: forwards deliveries, applies settlements, and closes the
/// channel (the broker requeues what is unacked) when the subscription is dropped or the
/// broker cancels the consumer.
async fn serve_subscription(mut channel: LocalChannel, no_ack: bool, tx: mpsc::Sender<Delivery>) {
    let (settle_tx, mut settle_rx) = mpsc::unbounded_channel();
    loop {
        tokio::select! {
            // Settlements first: an ack sent just before the subscription is dropped must
            // reach the broker before the close requeues the message.
            biased;
            Some((tag, settle)) = settle_rx.recv() => {
                if no_ack {
                    continue;
                }
                let result = match settle {
                    Settle::Ack => channel.ack(tag, false),
                    Settle::Nack { requeue } => channel.nack(tag, false, requeue),
                };
                if let Err(e) = result {
                    tracing::warn!("settling delivery {tag} failed, subscription ends: {e}");
                    break;
                }
            }
            _ = tx.closed() => break,
            event = channel.next_event() => match event {
                Some(LocalEvent::Deliver(d)) => {
                    let acker = Acker::new(d.delivery_tag, settle_tx.clone());
                    if tx.send(delivery(d, acker)).await.is_err() {
                        break;
                    }
                }
                Some(LocalEvent::Cancelled { .. }) | None => break,
                Some(LocalEvent::Confirm { .. } | LocalEvent::Return { .. }) => {}
            },
        }
    }
}

fn delivery(d: outbound::Delivery, acker: Acker) -> Delivery {
    let props = d.message.decoded_properties();
    let headers = props
        .headers()
        .iter()
        .flat_map(|t| t.inner())
        .filter_map(|(k, v)| {
            let v = match v {
                AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok()?,
                AMQPValue::ShortString(s) => s.to_string(),
                _ => return None,
            };
            Some((k.to_string(), v))
        })
        .collect();
    Delivery::new(
        d.message.body.clone(),
        d.message.exchange.clone(),
        d.message.routing_key.clone(),
        d.redelivered,
        headers,
        props.correlation_id().as_ref().map(|s| s.to_string()),
        props.reply_to().as_ref().map(|s| s.to_string()),
        acker,
    )
}

impl Bus for EmbeddedBus {
    fn declare(&self, topology: &Topology) -> BoxFuture<'_, BusResult<()>> {
        let result = (|| -> BusResult<()> {
            let mut control = self.control.lock();
            for x in &topology.exchanges {
                control.run(|c| {
                    c.exchange_declare(x.name, x.kind, true, false, false, FieldTable::default())
                })?;
            }
            for q in &topology.queues {
                control
                    .run(|c| c.queue_declare(&q.name, true, false, false, FieldTable::default()))?;
            }
            for b in &topology.bindings {
                control.run(|c| {
                    c.queue_bind(&b.queue, b.exchange, b.routing_key, FieldTable::default())
                })?;
            }
            Ok(())
        })();
        Box::pin(std::future::ready(result))
    }

    fn publish(&self, message: Outgoing) -> BoxFuture<'_, BusResult<()>> {
        Box::pin(async move {
            message.validate()?;
            let (reply, outcome) = oneshot::channel();
            let closed = || BusError::Closed("embedded publisher stopped".into());
            self.publishes
                .send((message, reply))
                .map_err(|_| closed())?;
            outcome.await.unwrap_or_else(|_| Err(closed()))
        })
    }

    fn consume(&self, queue: &str, prefetch: u16) -> BoxFuture<'_, BusResult<Subscription>> {
        Box::pin(std::future::ready(self.subscribe(Some(queue), prefetch)))
    }

    fn reply_queue(&self) -> BoxFuture<'_, BusResult<Subscription>> {
        Box::pin(std::future::ready(self.subscribe(None, 0)))
    }

    fn bind(&self, queue: &str, exchange: &str, routing_key: &str) -> BoxFuture<'_, BusResult<()>> {
        let result = self
            .control
            .lock()
            .run(|c| c.queue_bind(queue, exchange, routing_key, FieldTable::default()));
        Box::pin(std::future::ready(result))
    }

    fn queue_depth(&self, queue: &str) -> BoxFuture<'_, BusResult<Option<(u32, u32)>>> {
        let depth = self
            .broker
            .vhost(&self.vhost)
            .and_then(|v| v.queue(queue))
            .map(|q| (q.message_count(), q.consumer_count()));
        Box::pin(std::future::ready(Ok(depth)))
    }

    fn describe(&self) -> String {
        "embedded".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::auth::Users;
    use crate::amqp::broker::Limits;
    use crate::bus::contract;

    fn broker() -> Arc<Broker> {
        Broker::new(Limits::default(), Users::default(), &["/".to_string()])
    }

    fn bus() -> EmbeddedBus {
        EmbeddedBus::new(broker(), "/").unwrap()
    }

    #[tokio::test]
    async fn publish_consume_ack() {
        contract::publish_consume_ack(&bus()).await;
    }

    #[tokio::test]
    async fn unacked_come_back_redelivered() {
        contract::unacked_come_back_redelivered(&bus()).await;
    }

    #[tokio::test]
    async fn nack_drops_or_requeues() {
        contract::nack_drops_or_requeues(&bus()).await;
    }

    #[tokio::test]
    async fn unroutable_and_refused_publishes() {
        contract::unroutable_and_refused_publishes(&bus()).await;
    }

    #[tokio::test]
    async fn reply_queue_round_trip() {
        contract::reply_queue_round_trip(&bus()).await;
    }

    #[tokio::test]
    async fn queue_depth_of_existing_and_missing() {
        contract::queue_depth_of_existing_and_missing(&bus()).await;
    }

    #[tokio::test]
    async fn concurrent_publishes_all_confirm() {
        contract::concurrent_publishes_all_confirm(&bus()).await;
    }

    #[tokio::test]
    async fn persistent_sets_delivery_mode() {
        let broker = broker();
        let bus = EmbeddedBus::new(broker.clone(), "/").unwrap();
        contract::persistent_sets_delivery_mode(&bus, &broker).await;
    }

    #[tokio::test]
    async fn unknown_vhost_is_refused_and_describe_is_fixed() {
        let err = EmbeddedBus::new(broker(), "nope").unwrap_err();
        assert!(matches!(err, BusError::Refused(_)), "{err:?}");
        assert_eq!(bus().describe(), "embedded");
    }

    #[tokio::test]
    async fn subscription_ends_when_its_queue_is_deleted() {
        let broker = broker();
        let bus = EmbeddedBus::new(broker.clone(), "/").unwrap();
        contract::subscription_ends_when_its_queue_is_deleted(&bus, &broker).await;
    }
}
