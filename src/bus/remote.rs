//! [`RemoteBus`]: the [`Bus`] over the network with the `amqprs` client, to mqic or to any
//! RabbitMQ (`broker.url`).
//!
//! Channels: one confirm-mode channel for all publishes (a lock keeps the order in which
//! publishes are numbered equal to the order the broker sees them), one control channel for
//! declares and binds, one channel per subscription, and a throwaway channel per
//! `queue_depth` (a passive declare of a missing queue closes its channel). A channel the
//! broker closed is reopened on next use; a lost connection is not: every call then fails
//! with [`BusError::Closed`] and subscriptions end, and the caller connects again.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use amqprs::callbacks::{ChannelCallback, ConnectionCallback};
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicNackArguments, BasicPublishArguments,
    BasicQosArguments, Channel, ConfirmSelectArguments, ConsumerMessage, ExchangeDeclareArguments,
    QueueBindArguments, QueueDeclareArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{
    Ack, BasicProperties, Cancel, Close, CloseChannel, FieldTable, FieldValue, Nack, Return,
};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use super::confirm::PendingConfirms;
use super::url::{redact, BrokerUrl};
use super::{Acker, BoxFuture, Bus, BusError, BusResult, Delivery, Outgoing, Settle, Subscription};
use crate::protocol::topology::Topology;

/// How long opening the TCP connection and the AMQP handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long closing a channel may take before it is left to the connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deliveries a no-ack or unlimited-prefetch subscription buffers for its reader.
const UNBOUNDED_BUFFER: usize = 256;

/// A connection to an AMQP 0-9-1 broker.
pub struct RemoteBus {
    /// Heartbeats and the socket live here; every channel is opened on it.
    connection: Connection,
    /// The confirm-mode channel; `None` until first use or after it was lost.
    publisher: tokio::sync::Mutex<Option<Publisher>>,
    /// amqprs matches a reply to its request by method, so a channel may have only one
    /// request in flight: declares and binds take turns on this one.
    control: tokio::sync::Mutex<Option<Opened>>,
    /// The URL with its password masked, for logs and errors.
    described: String,
}

impl std::fmt::Debug for RemoteBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteBus")
            .field("url", &self.described)
            .finish_non_exhaustive()
    }
}

/// A channel and the reason the broker gave if it closed it.
struct Opened {
    channel: Channel,
    /// Filled by the channel's callback when the broker closes the channel.
    closed: CloseReason,
}

struct Publisher {
    /// The confirm-mode channel.
    opened: Opened,
    /// Shared with the channel's callback, which settles them.
    confirms: Arc<Mutex<PendingConfirms>>,
}

/// `channel.close` reply code and text, recorded by the channel's callback before amqprs
/// fails the request that caused the close (amqprs itself reports only "channel closed").
type CloseReason = Arc<Mutex<Option<(u16, String)>>>;

/// Maps a failed channel operation to a [`BusError`]: refused when the broker closed the
/// channel with a reason, closed otherwise (the connection is gone).
fn failed(closed: &CloseReason, e: amqprs::error::Error) -> BusError {
    match &*closed.lock() {
        Some((code, text)) => BusError::Refused(format!("{code} {text}")),
        None => BusError::Closed(e.to_string()),
    }
}

/// amqprs answers `None` to a `queue.declare` only with `no_wait`, which this bus never sets.
fn no_answer() -> amqprs::error::Error {
    amqprs::error::Error::ChannelUseError("queue.declare got no declare-ok".into())
}

/// amqprs panics on names longer than a short string; refuse them first.
fn short_name(what: &str, name: &str) -> BusResult<()> {
    if name.len() > 255 {
        return Err(BusError::Refused(format!(
            "{what} is longer than 255 bytes"
        )));
    }
    Ok(())
}

async fn open_channel(
    connection: &Connection,
    confirms: Option<Arc<Mutex<PendingConfirms>>>,
) -> BusResult<Opened> {
    let channel = connection
        .open_channel(None)
        .await
        .map_err(|e| BusError::Closed(e.to_string()))?;
    let closed = CloseReason::default();
    channel
        .register_callback(ChannelEvents {
            closed: closed.clone(),
            confirms,
        })
        .await
        .map_err(|e| BusError::Closed(e.to_string()))?;
    Ok(Opened { channel, closed })
}

async fn close_channel(channel: Channel) {
    if channel.is_open() {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.close()).await;
    }
}

impl Opened {
    /// The open channel in `slot`, opening a fresh one if there is none or it was closed.
    async fn ensure<'a>(
        slot: &'a mut Option<Opened>,
        connection: &Connection,
    ) -> BusResult<&'a Opened> {
        if slot.as_ref().is_some_and(|o| o.channel.is_open()) {
            return Ok(slot.as_ref().expect("checked"));
        }
        Ok(slot.insert(open_channel(connection, None).await?))
    }
}

impl Publisher {
    async fn open(connection: &Connection) -> BusResult<Publisher> {
        let confirms = Arc::new(Mutex::new(PendingConfirms::default()));
        let opened = open_channel(connection, Some(confirms.clone())).await?;
        opened
            .channel
            .confirm_select(ConfirmSelectArguments::new(false))
            .await
            .map_err(|e| failed(&opened.closed, e))?;
        Ok(Publisher { opened, confirms })
    }

    fn usable(&self) -> bool {
        self.opened.channel.is_open() && !self.confirms.lock().is_closed()
    }
}

impl RemoteBus {
    /// Connects to `amqp://[user[:password]@]host[:port][/vhost][?heartbeat=N]`, read as
    /// RabbitMQ reads its URIs: percent-decoded parts (`%2F` is `/`), port 5672, guest/guest
    /// and vhost `/` by default, heartbeats every 60 s. `amqps://` is refused (this build's
    /// AMQP client has no TLS). Errors never contain the password.
    pub async fn connect(url: &str) -> Result<RemoteBus, BusError> {
        let target = BrokerUrl::parse(url)?;
        let described = redact(url);
        let mut args =
            OpenConnectionArguments::new(&target.host, target.port, &target.user, &target.password);
        args.virtual_host(&target.vhost).heartbeat(target.heartbeat);
        let connection = match tokio::time::timeout(CONNECT_TIMEOUT, Connection::open(&args)).await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(BusError::Closed(format!(
                    "cannot connect to {described}: {e}"
                )))
            }
            Err(_) => {
                return Err(BusError::Closed(format!(
                    "cannot connect to {described}: no answer within {CONNECT_TIMEOUT:?}"
                )))
            }
        };
        connection
            .register_callback(ConnectionEvents {
                described: described.clone(),
            })
            .await
            .map_err(|e| BusError::Closed(e.to_string()))?;
        Ok(RemoteBus {
            connection,
            publisher: tokio::sync::Mutex::new(None),
            control: tokio::sync::Mutex::new(None),
            described,
        })
    }

    /// Closes the connection politely (`connection.close`); subscriptions end.
    pub async fn close(&self) {
        if self.connection.is_open() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.connection.clone().close()).await;
        }
    }

    /// Whether the connection is still up (a lost one is never reopened by this bus).
    pub fn is_open(&self) -> bool {
        self.connection.is_open()
    }

    async fn send(&self, message: Outgoing) -> BusResult<()> {
        message.validate()?;
        let properties = properties(&message);
        let (reply, outcome) = oneshot::channel();
        {
            let mut slot = self.publisher.lock().await;
            if !slot.as_ref().is_some_and(Publisher::usable) {
                *slot = Some(Publisher::open(&self.connection).await?);
            }
            let publisher = slot.as_ref().expect("just opened");
            // Registered before sending, so the confirm can never arrive first.
            let registered = publisher.confirms.lock().register(&message, reply);
            if let Some(seq) = registered {
                let args = BasicPublishArguments::new(&message.exchange, &message.routing_key)
                    .mandatory(message.mandatory)
                    .finish();
                let sent = publisher
                    .opened
                    .channel
                    .basic_publish(properties, message.body.to_vec(), args)
                    .await;
                if let Err(e) = sent {
                    publisher
                        .confirms
                        .lock()
                        .abandon(seq, BusError::Closed(e.to_string()));
                    *slot = None;
                }
            }
        }
        outcome
            .await
            .unwrap_or_else(|_| Err(BusError::Closed("publisher channel closed".into())))
    }

    /// Consumes `queue` with manual acks, or (`None`) a new exclusive, auto-delete,
    /// server-named queue with auto-ack, on a channel of its own.
    async fn subscribe(&self, queue: Option<&str>, prefetch: u16) -> BusResult<Subscription> {
        if let Some(q) = queue {
            short_name("queue name", q)?;
        }
        let Opened { channel, closed } = open_channel(&self.connection, None).await?;
        let started = async {
            let (name, no_ack) = match queue {
                Some(q) => (q.to_string(), false),
                None => {
                    let declared = channel
                        .queue_declare(
                            QueueDeclareArguments::new("")
                                .exclusive(true)
                                .auto_delete(true)
                                .finish(),
                        )
                        .await?;
                    match declared {
                        Some((name, _, _)) => (name, true),
                        None => return Err(no_answer()),
                    }
                }
            };
            if !no_ack {
                channel
                    .basic_qos(BasicQosArguments::new(0, prefetch, false))
                    .await?;
            }
            let consume = BasicConsumeArguments::new(&name, "")
                .manual_ack(!no_ack)
                .finish();
            let (_tag, messages) = channel.basic_consume_rx(consume).await?;
            Ok((name, no_ack, messages))
        }
        .await;
        let (name, no_ack, messages) = match started {
            Ok(s) => s,
            Err(e) => {
                let err = failed(&closed, e);
                close_channel(channel).await;
                return Err(err);
            }
        };
        let buffer = match (no_ack, prefetch) {
            (false, p) if p > 0 => p as usize,
            _ => UNBOUNDED_BUFFER,
        };
        let (tx, rx) = mpsc::channel(buffer);
        tokio::spawn(serve_subscription(channel, messages, no_ack, tx));
        Ok(Subscription::new(name, rx))
    }

    async fn declare_all(&self, topology: &Topology) -> BusResult<()> {
        let mut slot = self.control.lock().await;
        let Opened { channel, closed } = Opened::ensure(&mut slot, &self.connection).await?;
        for x in &topology.exchanges {
            let args = ExchangeDeclareArguments::new(x.name, x.kind)
                .durable(true)
                .finish();
            channel
                .exchange_declare(args)
                .await
                .map_err(|e| failed(closed, e))?;
        }
        for q in &topology.queues {
            short_name("queue name", &q.name)?;
            let args = QueueDeclareArguments::durable_client_named(&q.name);
            channel
                .queue_declare(args)
                .await
                .map_err(|e| failed(closed, e))?;
        }
        for b in &topology.bindings {
            let args = QueueBindArguments::new(&b.queue, b.exchange, b.routing_key);
            channel
                .queue_bind(args)
                .await
                .map_err(|e| failed(closed, e))?;
        }
        Ok(())
    }

    async fn bind_queue(&self, queue: &str, exchange: &str, routing_key: &str) -> BusResult<()> {
        short_name("queue name", queue)?;
        short_name("exchange name", exchange)?;
        short_name("routing key", routing_key)?;
        let mut slot = self.control.lock().await;
        let Opened { channel, closed } = Opened::ensure(&mut slot, &self.connection).await?;
        channel
            .queue_bind(QueueBindArguments::new(queue, exchange, routing_key))
            .await
            .map_err(|e| failed(closed, e))
    }

    async fn depth(&self, queue: &str) -> BusResult<Option<(u32, u32)>> {
        short_name("queue name", queue)?;
        let Opened { channel, closed } = open_channel(&self.connection, None).await?;
        let declared = channel
            .queue_declare(QueueDeclareArguments::new(queue).passive(true).finish())
            .await;
        match declared {
            Ok(Some((_, messages, consumers))) => {
                close_channel(channel).await;
                Ok(Some((messages, consumers)))
            }
            Ok(None) => Err(failed(&closed, no_answer())),
            Err(e) => match *closed.lock() {
                Some((404, _)) => Ok(None),
                _ => Err(failed(&closed, e)),
            },
        }
    }
}

/// The amqprs properties of an outgoing message.
fn properties(message: &Outgoing) -> BasicProperties {
    let mut p = BasicProperties::default();
    if !message.headers.is_empty() {
        let mut table = FieldTable::new();
        for (k, v) in &message.headers {
            let name = k.clone().try_into().expect("validated: at most 255 bytes");
            table.insert(name, FieldValue::from(v.clone()));
        }
        p.with_headers(table);
    }
    if let Some(c) = &message.correlation_id {
        p.with_correlation_id(c);
    }
    if let Some(r) = &message.reply_to {
        p.with_reply_to(r);
    }
    if message.persistent {
        p.with_persistence(true);
    }
    p
}

/// Owns one consuming channel: forwards deliveries, applies settlements, and closes the
/// channel (the broker requeues what is unacked) when the subscription is dropped. When the
/// broker closes the channel or the connection, amqprs ends `messages` and the subscription
/// ends with it.
async fn serve_subscription(
    channel: Channel,
    mut messages: mpsc::UnboundedReceiver<ConsumerMessage>,
    no_ack: bool,
    tx: mpsc::Sender<Delivery>,
) {
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
                let sent = match settle {
                    Settle::Ack => channel.basic_ack(BasicAckArguments::new(tag, false)).await,
                    Settle::Nack { requeue } => {
                        channel
                            .basic_nack(BasicNackArguments::new(tag, false, requeue))
                            .await
                    }
                };
                if let Err(e) = sent {
                    tracing::warn!("settling delivery {tag} failed, subscription ends: {e}");
                    break;
                }
            }
            _ = tx.closed() => break,
            message = messages.recv() => {
                let Some(message) = message else { break };
                let Some(d) = delivery(message, &settle_tx) else { continue };
                if tx.send(d).await.is_err() {
                    break;
                }
            }
        }
    }
    close_channel(channel).await;
}

fn delivery(
    message: ConsumerMessage,
    settle_tx: &mpsc::UnboundedSender<(u64, Settle)>,
) -> Option<Delivery> {
    let deliver = message.deliver?;
    let props = message.basic_properties?;
    let body = message.content?;
    let mut headers: Vec<(String, String)> = props
        .headers()
        .map(|t| {
            t.as_ref()
                .iter()
                .filter_map(|(k, v)| match v {
                    FieldValue::S(s) => Some((k.to_string(), s.to_string())),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    // The wire table is unordered in amqprs; a stable order keeps both buses alike.
    headers.sort();
    Some(Delivery::new(
        body.into(),
        deliver.exchange().clone(),
        deliver.routing_key().clone(),
        deliver.redelivered(),
        headers,
        props.correlation_id().cloned(),
        props.reply_to().cloned(),
        Acker::new(deliver.delivery_tag(), settle_tx.clone()),
    ))
}

impl Bus for RemoteBus {
    fn declare(&self, topology: &Topology) -> BoxFuture<'_, BusResult<()>> {
        let topology = topology.clone();
        Box::pin(async move { self.declare_all(&topology).await })
    }

    fn publish(&self, message: Outgoing) -> BoxFuture<'_, BusResult<()>> {
        Box::pin(self.send(message))
    }

    fn consume(&self, queue: &str, prefetch: u16) -> BoxFuture<'_, BusResult<Subscription>> {
        let queue = queue.to_string();
        Box::pin(async move { self.subscribe(Some(&queue), prefetch).await })
    }

    fn reply_queue(&self) -> BoxFuture<'_, BusResult<Subscription>> {
        Box::pin(self.subscribe(None, 0))
    }

    fn bind(&self, queue: &str, exchange: &str, routing_key: &str) -> BoxFuture<'_, BusResult<()>> {
        let (queue, exchange, routing_key) = (
            queue.to_string(),
            exchange.to_string(),
            routing_key.to_string(),
        );
        Box::pin(async move { self.bind_queue(&queue, &exchange, &routing_key).await })
    }

    fn queue_depth(&self, queue: &str) -> BoxFuture<'_, BusResult<Option<(u32, u32)>>> {
        let queue = queue.to_string();
        Box::pin(async move { self.depth(&queue).await })
    }

    fn describe(&self) -> String {
        self.described.clone()
    }
}

/// The future type `async_trait` expects from callback methods.
type CallbackFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Receives what the broker sends on its own on one channel: its close, and for the
/// publisher channel the confirms and returns. Dropped when amqprs stops the channel
/// (closed by either side, or the connection lost), which fails what still waits.
struct ChannelEvents {
    /// Where the broker's close reason goes, read by whoever's request failed.
    closed: CloseReason,
    /// The publishes waiting on this channel (publisher channel only).
    confirms: Option<Arc<Mutex<PendingConfirms>>>,
}

impl ChannelEvents {
    fn confirms(&self, f: impl FnOnce(&mut PendingConfirms)) {
        if let Some(c) = &self.confirms {
            f(&mut c.lock());
        }
    }
}

impl Drop for ChannelEvents {
    fn drop(&mut self) {
        self.confirms(|c| c.close(BusError::Closed("publisher channel closed".into())));
    }
}

// The trait is declared with `async_trait`; these are its desugared signatures.
impl ChannelCallback for ChannelEvents {
    fn close<'s, 'c, 'f>(
        &'s mut self,
        _channel: &'c Channel,
        close: CloseChannel,
    ) -> CallbackFuture<'f, Result<(), amqprs::error::Error>>
    where
        's: 'f,
        'c: 'f,
        Self: 'f,
    {
        let (code, text) = (close.reply_code(), close.reply_text().clone());
        tracing::debug!("broker closed a channel: {code} {text}");
        // A channel error closes the channel for every publish on it, and the broker does
        // not say which publish caused it: all that still wait fail with its reason.
        self.confirms(|c| c.close(BusError::Refused(format!("{code} {text}"))));
        *self.closed.lock() = Some((code, text));
        Box::pin(std::future::ready(Ok(())))
    }

    fn cancel<'s, 'c, 'f>(
        &'s mut self,
        _channel: &'c Channel,
        cancel: Cancel,
    ) -> CallbackFuture<'f, Result<(), amqprs::error::Error>>
    where
        's: 'f,
        'c: 'f,
        Self: 'f,
    {
        // Accepting it makes amqprs drop the consumer, which ends the subscription.
        tracing::info!("broker cancelled consumer {}", cancel.consumer_tag());
        Box::pin(std::future::ready(Ok(())))
    }

    fn flow<'s, 'c, 'f>(
        &'s mut self,
        _channel: &'c Channel,
        _active: bool,
    ) -> CallbackFuture<'f, Result<bool, amqprs::error::Error>>
    where
        's: 'f,
        'c: 'f,
        Self: 'f,
    {
        Box::pin(std::future::ready(Ok(true)))
    }

    fn publish_ack<'s, 'c, 'f>(
        &'s mut self,
        _channel: &'c Channel,
        ack: Ack,
    ) -> CallbackFuture<'f, ()>
    where
        's: 'f,
        'c: 'f,
        Self: 'f,
    {
        self.confirms(|c| c.confirmed(ack.delivery_tag(), ack.mutiple(), true));
        Box::pin(std::future::ready(()))
    }

    fn publish_nack<'s, 'c, 'f>(
        &'s mut self,
        _channel: &'c Channel,
        nack: Nack,
    ) -> CallbackFuture<'f, ()>
    where
        's: 'f,
        'c: 'f,
        Self: 'f,
    {
        self.confirms(|c| c.confirmed(nack.delivery_tag(), nack.multiple(), false));
        Box::pin(std::future::ready(()))
    }

    fn publish_return<'s, 'c, 'f>(
        &'s mut self,
        _channel: &'c Channel,
        ret: Return,
        _basic_properties: BasicProperties,
        content: Vec<u8>,
    ) -> CallbackFuture<'f, ()>
    where
        's: 'f,
        'c: 'f,
        Self: 'f,
    {
        self.confirms(|c| c.returned(ret.exchange(), ret.routing_key(), &content));
        Box::pin(std::future::ready(()))
    }
}

/// Logs what the broker says about the whole connection.
struct ConnectionEvents {
    /// Names the broker in log lines, without the password.
    described: String,
}

impl ConnectionCallback for ConnectionEvents {
    fn close<'s, 'c, 'f>(
        &'s mut self,
        _connection: &'c Connection,
        close: Close,
    ) -> CallbackFuture<'f, Result<(), amqprs::error::Error>>
    where
        's: 'f,
        'c: 'f,
        Self: 'f,
    {
        tracing::warn!(broker = %self.described, "broker closed the connection: {close}");
        Box::pin(std::future::ready(Ok(())))
    }

    fn blocked<'s, 'c, 'f>(
        &'s mut self,
        _connection: &'c Connection,
        reason: String,
    ) -> CallbackFuture<'f, ()>
    where
        's: 'f,
        'c: 'f,
        Self: 'f,
    {
        tracing::warn!(broker = %self.described, "broker blocked publishing: {reason}");
        Box::pin(std::future::ready(()))
    }

    fn unblocked<'s, 'c, 'f>(&'s mut self, _connection: &'c Connection) -> CallbackFuture<'f, ()>
    where
        's: 'f,
        'c: 'f,
        Self: 'f,
    {
        tracing::info!(broker = %self.described, "broker unblocked publishing");
        Box::pin(std::future::ready(()))
    }

    fn secret_updated<'s, 'c, 'f>(
        &'s mut self,
        _connection: &'c Connection,
    ) -> CallbackFuture<'f, ()>
    where
        's: 'f,
        'c: 'f,
        Self: 'f,
    {
        Box::pin(std::future::ready(()))
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::net::TcpListener;
    use tokio::sync::watch;

    use super::*;
    use crate::amqp::broker::Limits;
    use crate::amqp::{server, Broker};
    use crate::bus::contract;
    use crate::config::Config;

    /// A real mqic AMQP listener on a free loopback port, stopped when dropped.
    struct Server {
        broker: Arc<Broker>,
        addr: SocketAddr,
        shutdown: watch::Sender<bool>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.shutdown.send(true);
        }
    }

    impl Server {
        async fn start() -> Server {
            let broker = Broker::new(
                Limits::default(),
                Config::default().users(),
                &["/".to_string()],
            );
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (shutdown, rx) = watch::channel(false);
            tokio::spawn(server::run(listener, None, broker.clone(), rx));
            Server {
                broker,
                addr,
                shutdown,
            }
        }

        fn url(&self) -> String {
            format!("amqp://guest:guest@{}/%2F", self.addr)
        }

        async fn bus(&self) -> RemoteBus {
            RemoteBus::connect(&self.url()).await.unwrap()
        }
    }

    #[tokio::test]
    async fn publish_consume_ack() {
        let s = Server::start().await;
        contract::publish_consume_ack(&s.bus().await).await;
    }

    #[tokio::test]
    async fn unacked_come_back_redelivered() {
        let s = Server::start().await;
        contract::unacked_come_back_redelivered(&s.bus().await).await;
    }

    #[tokio::test]
    async fn nack_drops_or_requeues() {
        let s = Server::start().await;
        contract::nack_drops_or_requeues(&s.bus().await).await;
    }

    #[tokio::test]
    async fn unroutable_and_refused_publishes() {
        let s = Server::start().await;
        contract::unroutable_and_refused_publishes(&s.bus().await).await;
    }

    #[tokio::test]
    async fn reply_queue_round_trip() {
        let s = Server::start().await;
        contract::reply_queue_round_trip(&s.bus().await).await;
    }

    #[tokio::test]
    async fn queue_depth_of_existing_and_missing() {
        let s = Server::start().await;
        contract::queue_depth_of_existing_and_missing(&s.bus().await).await;
    }

    #[tokio::test]
    async fn concurrent_publishes_all_confirm() {
        let s = Server::start().await;
        contract::concurrent_publishes_all_confirm(&s.bus().await).await;
    }

    #[tokio::test]
    async fn persistent_sets_delivery_mode() {
        let s = Server::start().await;
        contract::persistent_sets_delivery_mode(&s.bus().await, &s.broker).await;
    }

    #[tokio::test]
    async fn subscription_ends_when_its_queue_is_deleted() {
        let s = Server::start().await;
        contract::subscription_ends_when_its_queue_is_deleted(&s.bus().await, &s.broker).await;
    }

    #[tokio::test]
    async fn losing_the_connection_ends_subscriptions_and_fails_calls() {
        let s = Server::start().await;
        let bus = s.bus().await;
        bus.declare(&crate::protocol::topology::topology())
            .await
            .unwrap();
        let mut sub = bus
            .consume(crate::protocol::topology::CONDUCTOR_QUEUE, 1)
            .await
            .unwrap();
        let _ = s.shutdown.send(true);
        let end = tokio::time::timeout(Duration::from_secs(10), sub.next()).await;
        assert!(matches!(end, Ok(None)), "{end:?}");
        let err = bus
            .publish(Outgoing::to_queue(
                crate::protocol::topology::CONDUCTOR_QUEUE,
                "x",
            ))
            .await
            .unwrap_err();
        assert!(matches!(err, BusError::Closed(_)), "{err:?}");
        assert!(!bus.is_open());
    }

    #[tokio::test]
    async fn wrong_password_is_an_error_that_hides_it() {
        let s = Server::start().await;
        let url = format!("amqp://guest:hunter2@{}/%2F", s.addr);
        let err = RemoteBus::connect(&url).await.unwrap_err();
        let text = err.to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("guest:***@"), "{text}");
    }

    #[tokio::test]
    async fn describe_masks_the_password() {
        let s = Server::start().await;
        let bus = s.bus().await;
        assert_eq!(bus.describe(), format!("amqp://guest:***@{}/%2F", s.addr));
        bus.close().await;
        assert!(!bus.is_open());
    }
}
