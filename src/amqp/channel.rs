//! One AMQP channel's operations, independent of the wire: declare, bind, publish, consume,
//! acknowledge, qos, confirms and transactions. The wire connection decodes a method and calls
//! one of these; the in-process API calls the same functions, so both behave alike.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use amq_protocol::types::FieldTable;
use bytes::Bytes;

use super::broker::{as_i128, Broker, VHost};
use super::consumer::{ChannelShared, ConnectionId, Consumer, Unacked};
use super::deadletter::DeathReason;
use super::exchange::{ExchangeKind, ExchangeSpec};
use super::message::Message;
use super::queue::{Enqueued, Queue, QueueSpec, QueuedMessage};
use super::reply::{AmqpError, AmqpResult, ReplyCode};
use super::stats::Counters;

/// What a channel knows about the connection it lives on.
#[derive(Debug)]
pub struct Session {
    pub connection: ConnectionId,
    pub user: String,
    pub vhost: Arc<VHost>,
    pub broker: Arc<Broker>,
}

/// A message taken with `basic.get`.
#[derive(Debug, Clone)]
pub struct Got {
    pub delivery_tag: u64,
    pub redelivered: bool,
    pub message: Arc<Message>,
    /// Ready messages left in the queue.
    pub message_count: u32,
}

/// A consumer that has been registered but not started: the caller sends `consume-ok`
/// first and then calls [`NewConsumer::start`], so no delivery overtakes the reply.
#[must_use]
pub struct NewConsumer {
    pub tag: String,
    queue: Arc<Queue>,
}

impl NewConsumer {
    pub fn start(self) {
        self.queue.dispatch();
    }
}

#[derive(Debug, Default)]
enum Mode {
    #[default]
    Plain,
    Confirm(Confirms),
    Tx(TxBuffer),
}

/// Publisher-confirm sequence state. Acks are coalesced: a run of successful publishes is
/// confirmed with one `multiple` ack when the connection has processed its input batch.
///
/// A batch that wrote a persistent message to a durable queue is confirmed only once the
/// store's commit holding it is on disk: its confirms go out through a store barrier. While
/// any such barrier is outstanding, later confirms take the same way, so they stay in order
/// (a `multiple` ack never covers a message still on its way to disk).
#[derive(Debug, Default)]
struct Confirms {
    /// Sequence number of the last publish.
    last: u64,
    /// Highest sequence number that is confirmed but not yet told to the client.
    pending_ack: Option<u64>,
    /// Everything up to here has been acked or nacked on the wire (or handed to a barrier).
    told_upto: u64,
    /// The pending batch holds a message that must be on disk before it is confirmed.
    needs_disk: bool,
    /// Store barriers handed confirms and not yet run.
    outstanding: Arc<AtomicUsize>,
}

impl Confirms {
    /// Sends confirm frames `(tag, multiple, ack)` now, or after the store's next commit
    /// when the batch needs the disk or earlier confirms are still waiting for it.
    fn emit(&mut self, shared: &ChannelShared, broker: &Broker, frames: Vec<(u64, bool, bool)>) {
        let needs_disk = std::mem::take(&mut self.needs_disk);
        match &broker.store {
            Some(store) if needs_disk || self.outstanding.load(Ordering::Acquire) > 0 => {
                self.outstanding.fetch_add(1, Ordering::AcqRel);
                let outstanding = self.outstanding.clone();
                let out = shared.out.clone();
                let confirmed = shared.confirmed_counter();
                store.barrier(move |ok| {
                    for (tag, multiple, ack) in frames {
                        // A failed commit: the publisher hears nack, never a false ack.
                        out.confirm(tag, multiple, ack && ok);
                        confirmed.fetch_max(tag, Ordering::Relaxed);
                    }
                    outstanding.fetch_sub(1, Ordering::AcqRel);
                });
            }
            _ => {
                let confirmed = shared.confirmed_counter();
                for (tag, multiple, ack) in frames {
                    shared.out.confirm(tag, multiple, ack);
                    confirmed.fetch_max(tag, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Work held back until `tx.commit`.
#[derive(Debug, Default)]
struct TxBuffer {
    publishes: Vec<PendingPublish>,
    settles: Vec<Settle>,
}

#[derive(Debug)]
struct PendingPublish {
    message: Arc<Message>,
    mandatory: bool,
    headers: Option<FieldTable>,
}

#[derive(Debug, Clone, Copy)]
enum Settle {
    Ack {
        tag: u64,
        multiple: bool,
    },
    Nack {
        tag: u64,
        multiple: bool,
        requeue: bool,
    },
}

/// One open channel.
#[derive(Debug)]
pub struct Channel {
    pub shared: Arc<ChannelShared>,
    pub session: Arc<Session>,
    /// The last queue this channel declared, used when a later method names queue "".
    last_queue: Option<String>,
    /// `basic.qos global=false`: the prefetch given to consumers created afterwards.
    consumer_prefetch: u32,
    mode: Mode,
    /// Direct reply-to: the hidden queue behind this channel's `amq.rabbitmq.reply-to`
    /// consumer, whose name replaces `reply_to = amq.rabbitmq.reply-to` on publish.
    reply_queue: Option<String>,
}

/// The pseudo-queue a requester consumes from for direct reply-to.
pub const REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// The prefix of the names direct reply-to gives requesters (`amq.rabbitmq.reply-to.<id>`).
pub const REPLY_TO_PREFIX: &str = "amq.rabbitmq.reply-to.";

fn queue_name_err() -> AmqpError {
    AmqpError::not_found("no previously declared queue")
}

impl Channel {
    pub fn new(shared: Arc<ChannelShared>, session: Arc<Session>) -> Channel {
        Counters::bump(&session.broker.stats.counters.channels_opened);
        Channel {
            shared,
            session,
            last_queue: None,
            consumer_prefetch: 0,
            mode: Mode::Plain,
            reply_queue: None,
        }
    }

    fn vhost(&self) -> &VHost {
        &self.session.vhost
    }

    fn conn(&self) -> ConnectionId {
        self.session.connection
    }

    /// Resolves queue "" to the last declared queue.
    fn queue_name(&self, name: &str) -> AmqpResult<String> {
        if name.is_empty() {
            self.last_queue.clone().ok_or_else(queue_name_err)
        } else {
            Ok(name.to_string())
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn exchange_declare(
        &mut self,
        name: &str,
        kind: &str,
        passive: bool,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    ) -> AmqpResult<()> {
        let kind = if passive {
            ExchangeKind::parse(kind).unwrap_or(ExchangeKind::Direct)
        } else {
            ExchangeKind::parse(kind)?
        };
        self.vhost().declare_exchange(
            ExchangeSpec {
                name: name.to_string(),
                kind,
                durable,
                auto_delete,
                internal,
                arguments,
            },
            passive,
        )
    }

    pub fn exchange_delete(&mut self, name: &str, if_unused: bool) -> AmqpResult<()> {
        self.vhost().delete_exchange(name, if_unused)
    }

    pub fn exchange_bind(
        &mut self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> AmqpResult<()> {
        self.vhost()
            .bind_exchange(destination, source, routing_key, arguments)
    }

    pub fn exchange_unbind(
        &mut self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> AmqpResult<()> {
        self.vhost()
            .unbind_exchange(destination, source, routing_key, arguments)
    }

    /// `queue.declare`: returns (name, ready messages, consumers).
    #[allow(clippy::too_many_arguments)]
    pub fn queue_declare(
        &mut self,
        name: &str,
        passive: bool,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        arguments: FieldTable,
    ) -> AmqpResult<(String, u32, u32)> {
        let server_named = name.is_empty() && !passive;
        let name = if name.is_empty() {
            if passive {
                self.queue_name("")?
            } else {
                format!("amq.gen-{}", random_suffix())
            }
        } else {
            if name.len() > 255 {
                return Err(AmqpError::precondition(
                    "queue name is longer than 255 bytes",
                ));
            }
            name.replace(['\r', '\n'], "")
        };
        let (q, created) = self.vhost().declare_queue(
            QueueSpec {
                name,
                durable: durable && !exclusive,
                exclusive,
                auto_delete,
                arguments,
            },
            passive,
            server_named,
            self.conn(),
        )?;
        let counters = &self.session.broker.stats.counters;
        Counters::bump(&counters.queues_declared);
        if created {
            Counters::bump(&counters.queues_created);
        }
        self.last_queue = Some(q.name().to_string());
        Ok((q.name().to_string(), q.message_count(), q.consumer_count()))
    }

    pub fn queue_bind(
        &mut self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> AmqpResult<()> {
        let routing_key = self.routing_key_shortcut(queue, routing_key);
        let queue = self.queue_name(queue)?;
        self.vhost()
            .bind_queue(&queue, exchange, &routing_key, arguments, self.conn())
    }

    /// RabbitMQ's `expand_routing_key_shortcut`: an empty routing key together with an empty
    /// queue name means "the last declared queue's name"; a named queue keeps its empty key.
    fn routing_key_shortcut(&self, queue: &str, routing_key: &str) -> String {
        match (queue.is_empty() && routing_key.is_empty(), &self.last_queue) {
            (true, Some(last)) => last.clone(),
            _ => routing_key.to_string(),
        }
    }

    pub fn queue_unbind(
        &mut self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> AmqpResult<()> {
        let routing_key = self.routing_key_shortcut(queue, routing_key);
        let queue = self.queue_name(queue)?;
        self.vhost()
            .unbind_queue(&queue, exchange, &routing_key, arguments, self.conn())
    }

    pub fn queue_purge(&mut self, queue: &str) -> AmqpResult<u32> {
        let queue = self.queue_name(queue)?;
        Ok(self.vhost().usable_queue(&queue, self.conn())?.purge())
    }

    pub fn queue_delete(
        &mut self,
        queue: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> AmqpResult<u32> {
        let queue = self.queue_name(queue)?;
        self.vhost()
            .delete_queue(&queue, self.conn(), if_unused, if_empty)
    }

    pub fn basic_qos(
        &mut self,
        prefetch_size: u32,
        prefetch_count: u16,
        global: bool,
    ) -> AmqpResult<()> {
        if prefetch_size != 0 {
            return Err(AmqpError::not_implemented(format!(
                "prefetch_size!=0 ({prefetch_size})"
            )));
        }
        if global {
            self.shared.set_global_prefetch(prefetch_count as u32);
            self.shared.redispatch([]);
        } else {
            self.consumer_prefetch = prefetch_count as u32;
        }
        Ok(())
    }

    /// `basic.consume`: registers the consumer; start it after replying.
    pub fn basic_consume(
        &mut self,
        queue: &str,
        tag: &str,
        no_ack: bool,
        exclusive: bool,
        arguments: FieldTable,
    ) -> AmqpResult<NewConsumer> {
        let q = if queue == REPLY_TO {
            self.reply_to_queue(no_ack)?
        } else {
            let queue = self.queue_name(queue)?;
            self.vhost().usable_queue(&queue, self.conn())?
        };
        let tag = if tag.is_empty() {
            format!("amq.ctag-{}", random_suffix())
        } else {
            tag.to_string()
        };
        if self.shared.has_consumer(&tag) {
            return Err(AmqpError::not_allowed(format!(
                "attempt to reuse consumer tag '{tag}'"
            )));
        }
        let priority = match arguments.inner().get("x-priority") {
            None => 0,
            Some(v) => as_i128(v)
                .and_then(|p| i32::try_from(p).ok())
                .ok_or_else(|| {
                    AmqpError::precondition(
                        "invalid arg 'x-priority' for consumer: expected an integer",
                    )
                })?,
        };
        let consumer = Consumer::new(
            tag.clone(),
            q.clone(),
            self.shared.clone(),
            no_ack,
            exclusive,
            self.consumer_prefetch,
            priority,
            arguments,
        );
        self.shared.add_consumer(consumer.clone());
        if let Err(e) = q.add_consumer_stopped(consumer) {
            self.shared.remove_consumer(&tag);
            return Err(e);
        }
        if q.name().starts_with(REPLY_TO_PREFIX) {
            self.reply_queue = Some(q.name().to_string());
        }
        Ok(NewConsumer { tag, queue: q })
    }

    /// Direct reply-to: a consumer on `amq.rabbitmq.reply-to` gets a hidden queue of its
    /// own (exclusive to this connection, deleted with the consumer) that responders reach
    /// through the default exchange by the name the broker writes into `reply_to`.
    fn reply_to_queue(&mut self, no_ack: bool) -> AmqpResult<Arc<Queue>> {
        if !no_ack {
            return Err(AmqpError::precondition("reply consumer cannot acknowledge"));
        }
        if self.reply_queue.is_some() {
            return Err(AmqpError::precondition("reply consumer already set"));
        }
        let (q, _) = self.vhost().declare_queue(
            QueueSpec {
                name: format!("{REPLY_TO_PREFIX}{}", random_suffix()),
                durable: false,
                exclusive: true,
                auto_delete: true,
                arguments: FieldTable::default(),
            },
            false,
            true,
            self.conn(),
        )?;
        Ok(q)
    }

    /// `basic.cancel`: cancelling an unknown tag is fine, as in RabbitMQ.
    pub fn basic_cancel(&mut self, tag: &str) {
        if let Some(consumer) = self.shared.remove_consumer(tag) {
            self.drop_consumer(&consumer);
        }
    }

    fn drop_consumer(&mut self, consumer: &Arc<Consumer>) {
        if self.reply_queue.as_deref() == Some(consumer.queue.name()) {
            self.reply_queue = None;
        }
        if consumer.queue.remove_consumer(consumer) {
            let _ = self
                .vhost()
                .delete_queue(consumer.queue.name(), self.conn(), false, false);
        }
    }

    /// `basic.get`.
    pub fn basic_get(&mut self, queue: &str, no_ack: bool) -> AmqpResult<Option<Got>> {
        let queue = self.queue_name(queue)?;
        let q = self.vhost().usable_queue(&queue, self.conn())?;
        if q.args.single_active_consumer {
            return Err(AmqpError::new(
                ReplyCode::ResourceLocked,
                format!(
                    "queue '{}' in vhost '{}' has single active consumer enabled: basic.get is not allowed",
                    q.name(),
                    q.vhost
                ),
            ));
        }
        let Some((m, count)) = q.get(no_ack) else {
            return Ok(None);
        };
        let mut got = None;
        self.shared.record_get(&q, &m, no_ack, |tag| {
            got = Some(Got {
                delivery_tag: tag,
                redelivered: m.redelivered,
                message: m.message.clone(),
                message_count: count,
            })
        });
        Ok(got)
    }

    /// `basic.publish` with its assembled content.
    pub fn basic_publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        immediate: bool,
        properties: Bytes,
        body: Bytes,
    ) -> AmqpResult<()> {
        if immediate {
            return Err(AmqpError::not_implemented("immediate=true"));
        }
        if body.len() > self.session.broker.limits.max_message_size {
            return Err(AmqpError::precondition(format!(
                "message size {} is larger than configured max size {}",
                body.len(),
                self.session.broker.limits.max_message_size
            )));
        }
        let (mut message, props) = Message::from_raw(
            exchange.to_string(),
            routing_key.to_string(),
            properties,
            body,
        )?;
        if props
            .reply_to()
            .as_ref()
            .is_some_and(|r| r.as_str() == REPLY_TO)
        {
            // Direct reply-to: the responder gets this channel's reply queue name.
            let Some(reply_queue) = &self.reply_queue else {
                return Err(AmqpError::precondition(
                    "fast reply consumer does not exist",
                ));
            };
            let props = props.clone().with_reply_to(reply_queue.as_str().into());
            message.properties = super::message::encode_properties(&props);
        }
        if let Some(user_id) = props.user_id() {
            if user_id.as_str() != self.session.user {
                return Err(AmqpError::precondition(format!(
                    "user_id property set to '{}' but authenticated user was '{}'",
                    user_id, self.session.user
                )));
            }
        }
        if let Some(expiration) = props.expiration() {
            if expiration.as_str().parse::<u64>().is_err() {
                return Err(AmqpError::precondition(format!(
                    "invalid expiration '{expiration}'"
                )));
            }
        }
        let headers = props.headers().clone();
        self.publish_message(Arc::new(message), mandatory, headers)
    }

    /// Publishes a message built in-process (or already validated).
    pub fn publish_message(
        &mut self,
        message: Arc<Message>,
        mandatory: bool,
        headers: Option<FieldTable>,
    ) -> AmqpResult<()> {
        if let Mode::Tx(tx) = &mut self.mode {
            // The exchange must exist now; routing happens at commit.
            if !message.exchange.is_empty()
                && self.session.vhost.exchange(&message.exchange).is_none()
            {
                return Err(AmqpError::not_found(format!(
                    "no exchange '{}' in vhost '{}'",
                    message.exchange, self.session.vhost.name
                )));
            }
            tx.publishes.push(PendingPublish {
                message,
                mandatory,
                headers,
            });
            return Ok(());
        }
        let seq = match &mut self.mode {
            Mode::Confirm(c) => {
                c.last += 1;
                self.shared.note_published(c.last);
                Some(c.last)
            }
            _ => None,
        };
        let (rejected, stored) = self.route_and_enqueue(&message, mandatory, headers.as_ref())?;
        if let (Some(seq), Mode::Confirm(c)) = (seq, &mut self.mode) {
            c.needs_disk |= stored;
            if rejected {
                // A full `reject-publish` queue refused it: acks coalesced so far go out
                // first, then this one message is nacked.
                let mut frames = Vec::with_capacity(2);
                if let Some(acked) = c.pending_ack.take() {
                    frames.push((acked, acked - c.told_upto > 1, true));
                }
                frames.push((seq, false, false));
                c.told_upto = seq;
                c.emit(&self.shared, &self.session.broker, frames);
            } else {
                c.pending_ack = Some(seq);
            }
        }
        Ok(())
    }

    /// Routes and enqueues. Returns whether a queue refused the message (`x-overflow`
    /// `reject-publish`), which a confirming publisher hears as `basic.nack`, and whether a
    /// durable queue wrote it to the store (its confirm waits for the disk).
    fn route_and_enqueue(
        &self,
        message: &Arc<Message>,
        mandatory: bool,
        headers: Option<&FieldTable>,
    ) -> AmqpResult<(bool, bool)> {
        let queues = self
            .session
            .vhost
            .route(&message.exchange, &message.routing_key, headers)?;
        let mut routed = false;
        let mut rejected = false;
        let mut stored = false;
        let vhost = &self.session.vhost;
        for q in &queues {
            match q.publish(message.clone()) {
                Enqueued::Accepted { dropped } => {
                    routed = true;
                    stored |= q.persists(message);
                    if !dropped.is_empty() {
                        vhost.dead_letter(q, dropped, DeathReason::Maxlen);
                    }
                }
                Enqueued::Rejected { dead_letter } => {
                    routed = true;
                    rejected = true;
                    if dead_letter {
                        vhost.dead_letter(q, vec![message.clone()], DeathReason::Maxlen);
                    }
                }
                Enqueued::Gone => {}
            }
        }
        let counters = &self.session.broker.stats.counters;
        Counters::bump(&counters.received);
        Counters::bump(match (routed, mandatory) {
            (true, _) => &counters.routed,
            (false, true) => &counters.unroutable_returned,
            (false, false) => &counters.unroutable_dropped,
        });
        // A reply to a requester that has gone counts as routed, as in RabbitMQ (delivery
        // to direct reply-to is at most once).
        let reply = message.exchange.is_empty() && message.routing_key.starts_with(REPLY_TO_PREFIX);
        if !routed && mandatory && !reply {
            self.shared
                .out
                .basic_return(ReplyCode::NoRoute.code(), "NO_ROUTE", message);
        }
        Ok((rejected, stored))
    }

    /// Sends the coalesced publisher confirm, if any. Called after each input batch.
    pub fn flush_confirms(&mut self) {
        if let Mode::Confirm(c) = &mut self.mode {
            if let Some(seq) = c.pending_ack.take() {
                let multiple = seq - c.told_upto > 1;
                c.told_upto = seq;
                c.emit(
                    &self.shared,
                    &self.session.broker,
                    vec![(seq, multiple, true)],
                );
            }
        }
    }

    pub fn basic_ack(&mut self, tag: u64, multiple: bool) -> AmqpResult<()> {
        self.settle(Settle::Ack { tag, multiple })
    }

    pub fn basic_nack(&mut self, tag: u64, multiple: bool, requeue: bool) -> AmqpResult<()> {
        self.settle(Settle::Nack {
            tag,
            multiple,
            requeue,
        })
    }

    pub fn basic_reject(&mut self, tag: u64, requeue: bool) -> AmqpResult<()> {
        self.settle(Settle::Nack {
            tag,
            multiple: false,
            requeue,
        })
    }

    fn settle(&mut self, settle: Settle) -> AmqpResult<()> {
        if let Mode::Tx(tx) = &mut self.mode {
            tx.settles.push(settle);
            return Ok(());
        }
        self.apply_settle(settle)
    }

    fn apply_settle(&self, settle: Settle) -> AmqpResult<()> {
        let (tag, multiple, requeue) = match settle {
            Settle::Ack { tag, multiple } => (tag, multiple, None),
            Settle::Nack {
                tag,
                multiple,
                requeue,
            } => (tag, multiple, Some(requeue)),
        };
        let taken = self.shared.settle(tag, multiple)?;
        if requeue == Some(false) {
            // Rejected without requeue: dead-lettered where the queue says so.
            let mut by_queue: Vec<(Arc<Queue>, Vec<Arc<Message>>)> = Vec::new();
            for u in &taken {
                match by_queue.iter_mut().find(|(q, _)| Arc::ptr_eq(q, &u.queue)) {
                    Some((_, list)) => list.push(u.message.message.clone()),
                    None => by_queue.push((u.queue.clone(), vec![u.message.message.clone()])),
                }
            }
            let queues = finish(taken, false);
            for (q, messages) in by_queue {
                self.vhost()
                    .dead_letter(&q, messages, DeathReason::Rejected);
            }
            self.shared.redispatch(queues);
            return Ok(());
        }
        let queues = finish(taken, requeue == Some(true));
        self.shared.redispatch(queues);
        Ok(())
    }

    /// `basic.recover` (and `recover-async`): requeue everything unacked.
    pub fn basic_recover(&mut self, requeue: bool) -> AmqpResult<()> {
        if !requeue {
            return Err(AmqpError::not_implemented("requeue=false"));
        }
        let taken = self.shared.settle_all();
        let queues = finish(taken, true);
        self.shared.redispatch(queues);
        Ok(())
    }

    /// `channel.flow`: RabbitMQ only accepts active=true from clients, and a channel never
    /// stops, so there is nothing to change.
    pub fn flow(&mut self, active: bool) -> AmqpResult<()> {
        if !active {
            return Err(AmqpError::not_implemented("active=false"));
        }
        Ok(())
    }

    pub fn confirm_select(&mut self) -> AmqpResult<()> {
        match self.mode {
            Mode::Tx(_) => Err(AmqpError::precondition(
                "cannot switch from tx to confirm mode",
            )),
            Mode::Confirm(_) => Ok(()),
            Mode::Plain => {
                self.mode = Mode::Confirm(Confirms::default());
                self.shared.set_confirm_mode();
                Ok(())
            }
        }
    }

    pub fn tx_select(&mut self) -> AmqpResult<()> {
        match self.mode {
            Mode::Confirm(_) => Err(AmqpError::precondition(
                "cannot switch from confirm to tx mode",
            )),
            Mode::Tx(_) => Ok(()),
            Mode::Plain => {
                self.mode = Mode::Tx(TxBuffer::default());
                Ok(())
            }
        }
    }

    pub fn tx_commit(&mut self) -> AmqpResult<()> {
        let Mode::Tx(tx) = &mut self.mode else {
            return Err(AmqpError::precondition("channel is not transactional"));
        };
        let tx = std::mem::take(tx);
        let mut stored = false;
        for p in &tx.publishes {
            stored |= self
                .route_and_enqueue(&p.message, p.mandatory, p.headers.as_ref())?
                .1;
        }
        for s in tx.settles {
            self.apply_settle(s)?;
        }
        if let (true, Some(store)) = (stored, &self.session.broker.store) {
            // commit-ok promises the persistent messages are on disk.
            if !store.sync() {
                return Err(AmqpError::new(
                    ReplyCode::InternalError,
                    "the broker store could not commit the transaction",
                ));
            }
        }
        Ok(())
    }

    pub fn tx_rollback(&mut self) -> AmqpResult<()> {
        let Mode::Tx(tx) = &mut self.mode else {
            return Err(AmqpError::precondition("channel is not transactional"));
        };
        *tx = TxBuffer::default();
        Ok(())
    }

    /// Closes the channel: consumers are cancelled and unacked messages requeued.
    pub fn close(&mut self) {
        Counters::bump(&self.session.broker.stats.counters.channels_closed);
        self.shared.mark_closed();
        for consumer in self.shared.take_consumers() {
            self.drop_consumer(&consumer);
        }
        let taken = self.shared.settle_all();
        for q in finish(taken, true) {
            q.dispatch();
        }
    }
}

/// Acks (drops) or requeues settled messages per queue; returns the queues touched.
fn finish(taken: Vec<Unacked>, requeue: bool) -> Vec<Arc<Queue>> {
    let mut by_queue: Vec<(Arc<Queue>, Vec<QueuedMessage>)> = Vec::new();
    for u in taken {
        match by_queue.iter_mut().find(|(q, _)| Arc::ptr_eq(q, &u.queue)) {
            Some((_, list)) => list.push(u.message),
            None => by_queue.push((u.queue, vec![u.message])),
        }
    }
    let mut touched = Vec::with_capacity(by_queue.len());
    for (q, list) in by_queue {
        if requeue {
            q.requeue(list);
        } else {
            q.acked(&list);
        }
        touched.push(q);
    }
    touched
}

/// A random suffix for server-generated names (`amq.gen-…`, `amq.ctag-…`).
pub fn random_suffix() -> String {
    use base64::Engine;
    let bytes: [u8; 16] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
