//! Consumers and the part of a channel that queues touch: delivery tags, unacked messages and
//! prefetch credit.
//!
//! Lock order: a queue's state, then a channel's delivery state, then the connection's write
//! buffer. Channel code never takes a queue lock while holding its delivery state.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::outbound::Outbound;
use super::queue::{Queue, QueuedMessage};
use super::reply::{AmqpError, AmqpResult};

/// Identifies a connection (wire or in-process) for exclusive-queue ownership.
pub type ConnectionId = u64;

/// One `basic.consume` subscription.
#[derive(Debug)]
pub struct Consumer {
    pub tag: String,
    pub queue: Arc<Queue>,
    pub channel: Arc<ChannelShared>,
    /// No-ack consumers get messages without holding them as unacked.
    pub no_ack: bool,
    pub exclusive: bool,
    /// Per-consumer prefetch (`basic.qos global=false` in force at consume time), 0 = unlimited.
    pub prefetch: u32,
    /// `x-priority`: higher-priority consumers are served first while they have credit.
    pub priority: i32,
    /// The arguments given at consume time (shown by the management API).
    pub arguments: amq_protocol::types::FieldTable,
    unacked: AtomicU32,
}

impl Consumer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tag: String,
        queue: Arc<Queue>,
        channel: Arc<ChannelShared>,
        no_ack: bool,
        exclusive: bool,
        prefetch: u32,
        priority: i32,
        arguments: amq_protocol::types::FieldTable,
    ) -> Arc<Consumer> {
        Arc::new(Consumer {
            tag,
            queue,
            channel,
            no_ack,
            exclusive,
            prefetch,
            priority,
            arguments,
            unacked: AtomicU32::new(0),
        })
    }

    /// Whether this consumer could take one more message now (checked under the queue lock).
    pub fn has_credit(&self) -> bool {
        let ch = &self.channel;
        if ch.closed.load(Ordering::Relaxed) {
            return false;
        }
        if self.no_ack {
            return !ch.out.is_congested();
        }
        (self.prefetch == 0 || self.unacked.load(Ordering::Relaxed) < self.prefetch)
            && ch.has_global_credit()
    }

    /// Takes one unit of credit; undone by [`ChannelShared::settle`].
    fn reserve(&self) -> bool {
        if self.no_ack {
            return true;
        }
        let ch = &self.channel;
        let global = ch.global_prefetch.load(Ordering::Relaxed);
        if global > 0
            && ch
                .unacked_total
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < global).then_some(n + 1)
                })
                .is_err()
        {
            return false;
        }
        if global == 0 {
            ch.unacked_total.fetch_add(1, Ordering::AcqRel);
        }
        self.unacked.fetch_add(1, Ordering::AcqRel);
        true
    }
}

/// A delivered message the client has not yet acknowledged.
#[derive(Debug)]
pub struct Unacked {
    pub delivery_tag: u64,
    pub queue: Arc<Queue>,
    pub message: QueuedMessage,
    /// The consumer it went to (`None` for `basic.get`).
    pub consumer: Option<Arc<Consumer>>,
    /// When the queue's `x-consumer-timeout` runs out for this delivery.
    pub deadline: Option<Instant>,
}

#[derive(Debug, Default)]
struct DeliveryState {
    /// Tags start at 1 and only grow, per channel.
    last_tag: u64,
    /// Sorted by tag.
    unacked: VecDeque<Unacked>,
}

/// The shared half of a channel: what queues need to deliver to it.
#[derive(Debug)]
pub struct ChannelShared {
    pub id: u16,
    pub connection: ConnectionId,
    pub out: Outbound,
    /// The client advertised `consumer_cancel_notify`, so it may receive `basic.cancel`.
    pub cancel_notify: bool,
    deliveries: Mutex<DeliveryState>,
    unacked_total: AtomicU32,
    /// `basic.qos global=true`: a limit shared by the channel's consumers, 0 = unlimited.
    global_prefetch: AtomicU32,
    /// Set once the channel is closing: queues stop delivering to it.
    closed: AtomicBool,
    /// Set once a delivery with an `x-consumer-timeout` deadline was recorded, so channels
    /// on queues without one never scan their unacked messages.
    timed: AtomicBool,
    /// The channel's consumers by tag. Queues remove entries when they cancel a consumer.
    consumers: Mutex<HashMap<String, Arc<Consumer>>>,
    /// Publisher confirms, for the management API: the channel is in confirm mode, the last
    /// publish sequence number, and the highest one confirmed (acked or nacked) on the wire.
    confirm_mode: AtomicBool,
    published: AtomicU64,
    confirmed: Arc<AtomicU64>,
}

impl ChannelShared {
    pub fn new(
        id: u16,
        connection: ConnectionId,
        out: Outbound,
        cancel_notify: bool,
    ) -> Arc<ChannelShared> {
        Arc::new(ChannelShared {
            id,
            connection,
            out,
            cancel_notify,
            deliveries: Mutex::new(DeliveryState::default()),
            unacked_total: AtomicU32::new(0),
            global_prefetch: AtomicU32::new(0),
            closed: AtomicBool::new(false),
            timed: AtomicBool::new(false),
            consumers: Mutex::new(HashMap::new()),
            confirm_mode: AtomicBool::new(false),
            published: AtomicU64::new(0),
            confirmed: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn set_confirm_mode(&self) {
        self.confirm_mode.store(true, Ordering::Relaxed);
    }

    pub fn confirm_mode(&self) -> bool {
        self.confirm_mode.load(Ordering::Relaxed)
    }

    pub fn note_published(&self, seq: u64) {
        self.published.store(seq, Ordering::Relaxed);
    }

    /// The counter that confirm senders raise to the highest tag they put on the wire.
    pub fn confirmed_counter(&self) -> Arc<AtomicU64> {
        self.confirmed.clone()
    }

    /// Publishes not yet confirmed to the client (waiting for their batch or the disk).
    pub fn unconfirmed(&self) -> u64 {
        let published = self.published.load(Ordering::Relaxed);
        published.saturating_sub(self.confirmed.load(Ordering::Relaxed))
    }

    fn has_global_credit(&self) -> bool {
        let global = self.global_prefetch.load(Ordering::Relaxed);
        global == 0 || self.unacked_total.load(Ordering::Relaxed) < global
    }

    pub fn set_global_prefetch(&self, n: u32) {
        self.global_prefetch.store(n, Ordering::Relaxed);
    }

    pub fn mark_closed(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }

    /// Read-only views for the management API.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Delivered, not yet acknowledged messages on this channel.
    pub fn unacked_count(&self) -> usize {
        self.deliveries.lock().unacked.len()
    }

    /// `basic.qos global=true` in force (0 = unlimited).
    pub fn global_prefetch(&self) -> u32 {
        self.global_prefetch.load(Ordering::Relaxed)
    }

    /// The channel's consumers now.
    pub fn consumers(&self) -> Vec<Arc<Consumer>> {
        self.consumers.lock().values().cloned().collect()
    }

    /// Reserves credit and delivers `message` to `consumer`. Called with the queue locked;
    /// returns the message back when the consumer has no credit after all.
    pub(super) fn deliver(
        &self,
        consumer: &Arc<Consumer>,
        queue: &Arc<Queue>,
        message: QueuedMessage,
    ) -> Result<(), QueuedMessage> {
        if !consumer.reserve() {
            return Err(message);
        }
        let mut d = self.deliveries.lock();
        d.last_tag += 1;
        let tag = d.last_tag;
        self.out
            .deliver(&consumer.tag, tag, message.redelivered, &message.message);
        if !consumer.no_ack {
            let deadline = self.deadline(queue);
            d.unacked.push_back(Unacked {
                delivery_tag: tag,
                queue: queue.clone(),
                message,
                consumer: Some(consumer.clone()),
                deadline,
            });
        }
        Ok(())
    }

    /// Records a `basic.get` delivery and returns its tag. The caller sends `get-ok`.
    pub(super) fn record_get(
        &self,
        queue: &Arc<Queue>,
        message: &QueuedMessage,
        no_ack: bool,
        send: impl FnOnce(u64),
    ) {
        let mut d = self.deliveries.lock();
        d.last_tag += 1;
        let tag = d.last_tag;
        send(tag);
        if !no_ack {
            self.unacked_total.fetch_add(1, Ordering::AcqRel);
            let deadline = self.deadline(queue);
            d.unacked.push_back(Unacked {
                delivery_tag: tag,
                queue: queue.clone(),
                message: message.clone(),
                consumer: None,
                deadline,
            });
        }
    }

    /// The acknowledgement deadline of a delivery from `queue` made now, if it has one.
    fn deadline(&self, queue: &Queue) -> Option<Instant> {
        let ms = queue.args.consumer_timeout?;
        self.timed.store(true, Ordering::Relaxed);
        Some(Instant::now() + Duration::from_millis(ms))
    }

    /// The `x-consumer-timeout` (ms) of an unacknowledged delivery past its deadline at
    /// `now`, if any: the connection then closes this channel with 406, as RabbitMQ does.
    pub fn overdue(&self, now: Instant) -> Option<u64> {
        if !self.timed.load(Ordering::Relaxed) {
            return None;
        }
        let d = self.deliveries.lock();
        d.unacked
            .iter()
            .find(|u| u.deadline.is_some_and(|t| t <= now))
            .and_then(|u| u.queue.args.consumer_timeout)
    }

    /// Removes the unacked messages an ack, nack or reject names, returning their credit.
    /// `multiple` with tag 0 means every outstanding message.
    pub fn settle(&self, delivery_tag: u64, multiple: bool) -> AmqpResult<Vec<Unacked>> {
        let mut d = self.deliveries.lock();
        let taken: Vec<Unacked> = if multiple {
            let end = if delivery_tag == 0 {
                d.unacked.len()
            } else {
                d.unacked
                    .partition_point(|u| u.delivery_tag <= delivery_tag)
            };
            d.unacked.drain(..end).collect()
        } else {
            match d
                .unacked
                .binary_search_by_key(&delivery_tag, |u| u.delivery_tag)
            {
                Ok(i) => d.unacked.remove(i).into_iter().collect(),
                Err(_) => Vec::new(),
            }
        };
        drop(d);
        if taken.is_empty() && !(multiple && delivery_tag == 0) {
            return Err(AmqpError::precondition(format!(
                "unknown delivery tag {delivery_tag}"
            )));
        }
        self.release_credit(&taken);
        Ok(taken)
    }

    /// Takes every unacked message (channel close, `basic.recover`).
    pub fn settle_all(&self) -> Vec<Unacked> {
        let taken: Vec<Unacked> = self.deliveries.lock().unacked.drain(..).collect();
        self.release_credit(&taken);
        taken
    }

    fn release_credit(&self, taken: &[Unacked]) {
        for u in taken {
            if let Some(c) = &u.consumer {
                c.unacked.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.unacked_total
            .fetch_sub(taken.len() as u32, Ordering::AcqRel);
    }

    pub fn add_consumer(&self, consumer: Arc<Consumer>) {
        self.consumers.lock().insert(consumer.tag.clone(), consumer);
    }

    pub fn has_consumer(&self, tag: &str) -> bool {
        self.consumers.lock().contains_key(tag)
    }

    pub fn remove_consumer(&self, tag: &str) -> Option<Arc<Consumer>> {
        self.consumers.lock().remove(tag)
    }

    pub fn take_consumers(&self) -> Vec<Arc<Consumer>> {
        self.consumers.lock().drain().map(|(_, c)| c).collect()
    }

    /// The queue deleted this consumer: forget it and tell the client if it can hear it.
    pub(super) fn cancelled_by_server(&self, consumer: &Consumer) {
        if self.consumers.lock().remove(&consumer.tag).is_some() && self.cancel_notify {
            self.out.cancel(&consumer.tag);
        }
    }

    /// Re-dispatches every queue this channel consumes from (credit was returned).
    pub fn redispatch(&self, also: impl IntoIterator<Item = Arc<Queue>>) {
        let mut queues: Vec<Arc<Queue>> = self
            .consumers
            .lock()
            .values()
            .map(|c| c.queue.clone())
            .collect();
        queues.extend(also);
        queues.sort_by_key(|q| Arc::as_ptr(q) as usize);
        queues.dedup_by_key(|q| Arc::as_ptr(q) as usize);
        for q in queues {
            q.dispatch();
        }
    }
}
