//! Queues: ready messages in FIFO order, consumers served round-robin by priority, and the
//! dispatch loop that hands messages to consumers with credit.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol::types::{AMQPValue, FieldTable};
use parking_lot::Mutex;

use super::consumer::{ConnectionId, Consumer};
use super::message::Message;
use super::reply::{AmqpError, AmqpResult, ReplyCode};
use super::store::{BrokerStore, Op, StoredMessage};

/// Where a durable queue keeps its persistent messages: `broker.redb` under this queue id.
#[derive(Debug, Clone)]
pub struct Persist {
    pub store: Arc<BrokerStore>,
    pub id: u64,
}

/// The declared shape of a queue, compared on redeclare.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSpec {
    pub name: String,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

/// What happens to a publish when a length-limited queue is full (`x-overflow`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Overflow {
    /// Drop the oldest ready messages to make room (RabbitMQ's default).
    #[default]
    DropHead,
    /// Refuse the new message; a confirming publisher gets `basic.nack`.
    RejectPublish,
    /// As `RejectPublish`, and the refused message is dead-lettered (reason `maxlen`).
    RejectPublishDlx,
}

/// The queue arguments that change a queue's behaviour, parsed once at declare.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueArgs {
    /// `x-single-active-consumer`: only the first registered consumer receives messages; the
    /// next takes over when it goes.
    pub single_active_consumer: bool,
    /// `x-max-length`: ready messages at most.
    pub max_length: Option<u64>,
    /// `x-max-length-bytes`: ready body bytes at most.
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
    /// `x-dead-letter-exchange`: where rejected and dropped messages go.
    pub dead_letter_exchange: Option<String>,
    /// `x-dead-letter-routing-key`: their routing key there (default: their own).
    pub dead_letter_routing_key: Option<String>,
    /// `x-message-ttl`: milliseconds a message may wait in this queue.
    pub message_ttl: Option<u64>,
    /// `x-max-priority`: a priority queue; message priorities above it count as it.
    pub max_priority: Option<u8>,
    /// `x-expires`: milliseconds the queue may stay unused (no consumer, no `basic.get`, no
    /// redeclare) before it is deleted.
    pub expires: Option<u64>,
    /// `x-queue-type = quorum`: served as a durable classic queue (one node, no replication).
    pub quorum: bool,
    /// `x-consumer-timeout`: milliseconds a delivery may stay unacknowledged before the
    /// channel holding it is closed with 406. None (the default) means never: a MOQUI step
    /// can run for hours, and a broker-imposed timeout must not kill it.
    pub consumer_timeout: Option<u64>,
}

/// What became of one publish to one queue.
#[derive(Debug, Clone)]
pub enum Enqueued {
    /// Taken; `dropped` are older messages a `drop-head` limit pushed out (to dead-letter).
    Accepted { dropped: Vec<Arc<Message>> },
    /// Refused by `x-overflow = reject-publish[-dlx]`: the publisher gets `basic.nack`, and
    /// with `-dlx` the message is dead-lettered.
    Rejected { dead_letter: bool },
    /// The queue was deleted meanwhile.
    Gone,
}

/// A message waiting in (or delivered from) a queue.
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    pub message: Arc<Message>,
    /// Set once the message has been delivered and requeued.
    pub redelivered: bool,
    /// Position in the queue's arrival order, so requeued messages go back where they were.
    pub seq: u64,
    /// When it expires (the queue's `x-message-ttl` or its own `expiration`, whichever is
    /// sooner); kept when it is requeued, as in RabbitMQ.
    pub expires_at: Option<Instant>,
}

/// A durable queue keeps the bodies of its first [`IN_MEMORY`] ready messages in memory; the
/// rest wait in `broker.redb` behind a small index entry ([`Paged`]) and are read back in
/// batches when fewer than [`PAGE_IN_BELOW`] remain in memory. (Priority queues keep
/// everything in memory.)
const IN_MEMORY: usize = 2048;
const PAGE_IN_BELOW: usize = 1024;

/// A ready message past the in-memory window of a durable queue.
#[derive(Debug)]
struct Paged {
    seq: u64,
    size: u32,
    redelivered: bool,
    persistent: bool,
    expires_at: Option<Instant>,
    /// The body until the store has it on disk (always, for a non-persistent message).
    message: Option<Arc<Message>>,
}

#[derive(Debug, Default)]
struct QueueState {
    /// Ready messages in memory, in delivery order.
    ready: VecDeque<QueuedMessage>,
    /// Ready messages after `ready`, bodies paged out to the store.
    paged: VecDeque<Paged>,
    /// `paged[..strip_from]` hold no body that could be dropped.
    strip_from: usize,
    /// Bytes of every ready message (in memory and paged).
    ready_bytes: usize,
    next_seq: u64,
    consumers: Vec<Arc<Consumer>>,
    /// Round-robin cursor into `consumers`.
    cursor: usize,
    /// Delivered, not yet acked.
    unacked: usize,
    /// Messages dropped from the head by a length limit (for the management view).
    dropped: u64,
    /// Expired messages taken off the head, waiting to be dead-lettered by the sweeper
    /// (which holds the vhost the queue itself does not know).
    expired: Vec<Arc<Message>>,
    /// Auto-delete applies only to queues that have had a consumer.
    had_consumer: bool,
    /// Last declare, `basic.get` or consumer change, for `x-expires` (set at creation).
    last_used: Option<Instant>,
    deleted: bool,
    /// Message counters for the management API and Prometheus.
    counters: super::stats::QueueCounters,
}

/// A queue.
#[derive(Debug)]
pub struct Queue {
    pub spec: QueueSpec,
    pub vhost: String,
    /// The connection that owns an exclusive queue.
    pub owner: Option<ConnectionId>,
    /// The behaviour-changing arguments, parsed from `spec.arguments`.
    pub args: QueueArgs,
    /// Set for a durable queue of a broker with a store: persistent messages are written.
    pub persist: Option<Persist>,
    state: Mutex<QueueState>,
}

/// Arguments RabbitMQ accepts on `queue.declare`; the broker-core issue gives them no extra
/// semantics yet, but they are accepted and compared on redeclare like RabbitMQ does.
const KNOWN_ARGUMENTS: &[&str] = &[
    "x-message-ttl",
    "x-expires",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-overflow",
    "x-max-priority",
    "x-single-active-consumer",
    "x-queue-type",
    "x-consumer-timeout",
    "x-queue-mode",
    "x-queue-version",
    "x-queue-master-locator",
    "x-queue-leader-locator",
];

impl Queue {
    /// A queue whose arguments passed [`Queue::validate_arguments`].
    pub fn new(spec: QueueSpec, vhost: String, owner: Option<ConnectionId>) -> Arc<Queue> {
        Queue::with_store(spec, vhost, owner, None)
    }

    /// A queue whose persistent messages go to `persist` (a durable queue).
    pub fn with_store(
        spec: QueueSpec,
        vhost: String,
        owner: Option<ConnectionId>,
        persist: Option<Persist>,
    ) -> Arc<Queue> {
        let args = Queue::parse_arguments(&spec.arguments, &spec.name, &vhost).unwrap_or_default();
        Arc::new(Queue {
            spec,
            vhost,
            owner,
            args,
            persist,
            state: Mutex::new(QueueState {
                last_used: Some(Instant::now()),
                ..QueueState::default()
            }),
        })
    }

    /// Whether `message` is written to the store when it enters this queue.
    pub fn persists(&self, message: &Message) -> bool {
        self.persist.is_some() && message.is_persistent()
    }

    /// Whether this queue pages bodies out to the store.
    fn pages(&self) -> bool {
        self.persist.is_some() && self.args.max_priority.is_none()
    }

    /// Whether a message entering now goes behind the in-memory window.
    fn goes_to_paged(&self, st: &QueueState) -> bool {
        self.pages() && (!st.paged.is_empty() || st.ready.len() >= IN_MEMORY)
    }

    /// The store wrote this queue's messages up to `seq`: their bodies may leave memory.
    pub fn committed(&self, seq: u64) {
        let mut st = self.state.lock();
        let st = &mut *st;
        while let Some(p) = st.paged.get_mut(st.strip_from) {
            if p.persistent {
                if p.seq > seq {
                    break;
                }
                p.message = None;
            }
            st.strip_from += 1;
        }
    }

    /// Ready messages, in memory and paged out.
    fn ready_len(st: &QueueState) -> usize {
        st.ready.len() + st.paged.len()
    }

    /// Refills the in-memory window from the paged tail when it runs low.
    fn refill(&self, st: &mut QueueState) {
        if st.paged.is_empty() || st.ready.len() >= PAGE_IN_BELOW {
            return;
        }
        let take = (IN_MEMORY - st.ready.len()).min(st.paged.len());
        let batch: Vec<Paged> = st.paged.drain(..take).collect();
        st.strip_from = st.strip_from.saturating_sub(take);
        let missing: Vec<u64> = batch
            .iter()
            .filter(|p| p.message.is_none())
            .map(|p| p.seq)
            .collect();
        let mut loaded = match (&self.persist, missing.first(), missing.last()) {
            (Some(persist), Some(&from), Some(&to)) => {
                match persist.store.load(persist.id, from, to) {
                    Ok(v) => v.into_iter().peekable(),
                    Err(e) => {
                        tracing::error!(queue = self.name(), "cannot page messages in: {e}");
                        Vec::new().into_iter().peekable()
                    }
                }
            }
            _ => Vec::new().into_iter().peekable(),
        };
        for p in batch {
            let message = match p.message {
                Some(m) => m,
                None => {
                    while loaded.peek().is_some_and(|(seq, _)| *seq < p.seq) {
                        loaded.next();
                    }
                    match loaded.next_if(|(seq, _)| *seq == p.seq) {
                        Some((_, m)) => Arc::new(m),
                        None => {
                            // Only a failed commit leaves an entry without a stored body; its
                            // publisher was nacked.
                            tracing::error!(
                                queue = self.name(),
                                seq = p.seq,
                                "paged message missing from the store; dropped"
                            );
                            st.ready_bytes -= p.size as usize;
                            continue;
                        }
                    }
                }
            };
            st.ready.push_back(QueuedMessage {
                message,
                redelivered: p.redelivered,
                seq: p.seq,
                expires_at: p.expires_at,
            });
        }
    }

    /// Tells the store that a paged message left the queue for good.
    fn forget_paged(&self, p: &Paged) {
        if let (Some(persist), true) = (&self.persist, p.persistent) {
            persist.store.submit(Op::Remove {
                queue: persist.id,
                seq: p.seq,
            });
        }
    }

    /// Tells the store that `m` left the queue for good.
    fn forget(&self, m: &QueuedMessage) {
        if let Some(p) = &self.persist {
            if m.message.is_persistent() {
                p.store.submit(Op::Remove {
                    queue: p.id,
                    seq: m.seq,
                });
            }
        }
    }

    /// Tells the store that `m` was delivered (it comes back `redelivered` after a restart).
    fn mark_delivered(&self, m: &QueuedMessage) {
        if let Some(p) = &self.persist {
            if m.message.is_persistent() && !m.redelivered {
                p.store.submit(Op::Delivered {
                    queue: p.id,
                    seq: m.seq,
                });
            }
        }
    }

    /// Puts a message read back from the store at boot in its place.
    pub fn restore(&self, stored: StoredMessage) {
        let mut st = self.state.lock();
        let size = stored.message.size();
        st.next_seq = st.next_seq.max(stored.seq + 1);
        st.ready_bytes += size;
        let message = Arc::new(stored.message);
        let ttl = match (self.args.message_ttl, message.expiration_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // The time already spent in the queue before the restart counts.
        let waited = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
            .saturating_sub(stored.enqueued_ms);
        let expires_at =
            ttl.map(|ms| Instant::now() + Duration::from_millis(ms.saturating_sub(waited)));
        if self.goes_to_paged(&st) {
            // On disk already: only the index entry stays in memory.
            st.paged.push_back(Paged {
                seq: stored.seq,
                size: size as u32,
                redelivered: stored.redelivered,
                persistent: true,
                expires_at,
                message: None,
            });
            st.strip_from = st.paged.len();
            return;
        }
        let queued = QueuedMessage {
            message,
            redelivered: stored.redelivered,
            seq: stored.seq,
            expires_at,
        };
        self.insert_ready(&mut st, queued);
    }

    fn insert_ready(&self, st: &mut QueueState, queued: QueuedMessage) {
        match self.args.max_priority {
            None => st.ready.push_back(queued),
            Some(max) => {
                // Higher priorities first, arrival order within one priority.
                let p = queued.message.priority.min(max);
                let at = st
                    .ready
                    .partition_point(|m| m.message.priority.min(max) >= p);
                st.ready.insert(at, queued);
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// A direct reply-to queue (`amq.rabbitmq.reply-to.<id>`): hidden from listings, as
    /// RabbitMQ's are, and never bound.
    pub fn is_reply_to(&self) -> bool {
        self.spec.name.starts_with(super::channel::REPLY_TO_PREFIX)
    }

    /// Checks the queue arguments the way RabbitMQ does on declare: a bad type or value
    /// is a 406 naming the argument.
    pub fn validate_arguments(arguments: &FieldTable, queue: &str, vhost: &str) -> AmqpResult<()> {
        Queue::parse_arguments(arguments, queue, vhost).map(|_| ())
    }

    fn parse_arguments(arguments: &FieldTable, queue: &str, vhost: &str) -> AmqpResult<QueueArgs> {
        let mut args = QueueArgs::default();
        let bad = |key: &str, why: String| {
            AmqpError::precondition(format!(
                "invalid arg '{key}' for queue '{queue}' in vhost '{vhost}': {why}"
            ))
        };
        for (key, value) in arguments.inner() {
            let key = key.as_str();
            if !KNOWN_ARGUMENTS.contains(&key) {
                continue; // unknown arguments are ignored, as in RabbitMQ
            }
            match key {
                "x-queue-type" => match value {
                    AMQPValue::LongString(s) if s.as_bytes() == b"classic" => {}
                    // Served as a durable classic queue; the declare checks the properties
                    // quorum queues require and logs what is not provided.
                    AMQPValue::LongString(s) if s.as_bytes() == b"quorum" => args.quorum = true,
                    AMQPValue::LongString(s) if s.as_bytes() == b"stream" => {
                        return Err(bad(
                            key,
                            "mqic does not serve stream queues: streams are read by offset \
                             (x-stream-offset), which a classic queue cannot honour; declare a \
                             classic queue"
                                .into(),
                        ))
                    }
                    AMQPValue::LongString(s) => {
                        return Err(bad(
                            key,
                            format!(
                                "unknown queue type '{}' (mqic serves classic, and quorum as \
                                 a durable classic queue)",
                                String::from_utf8_lossy(s.as_bytes())
                            ),
                        ))
                    }
                    other => return Err(bad(key, unacceptable(other))),
                },
                "x-dead-letter-exchange" | "x-dead-letter-routing-key" => match value {
                    AMQPValue::LongString(s) => {
                        let s = String::from_utf8_lossy(s.as_bytes()).into_owned();
                        if key == "x-dead-letter-exchange" {
                            args.dead_letter_exchange = Some(s);
                        } else {
                            args.dead_letter_routing_key = Some(s);
                        }
                    }
                    other => return Err(bad(key, unacceptable(other))),
                },
                "x-max-priority" => {
                    let n = non_negative(value).map_err(|why| bad(key, why))?;
                    let max = u8::try_from(n)
                        .map_err(|_| bad(key, format!("{{value_too_large,{n}}} (at most 255)")))?;
                    args.max_priority = Some(max);
                }
                "x-expires" => {
                    let n = non_negative(value).map_err(|why| bad(key, why))?;
                    if n == 0 {
                        return Err(bad(key, "{value_zero,0}".into()));
                    }
                    args.expires = Some(n);
                }
                "x-consumer-timeout" => {
                    args.consumer_timeout = Some(non_negative(value).map_err(|why| bad(key, why))?)
                }
                "x-message-ttl" => {
                    args.message_ttl = Some(non_negative(value).map_err(|why| bad(key, why))?)
                }
                "x-single-active-consumer" => match value {
                    AMQPValue::Boolean(b) => args.single_active_consumer = *b,
                    other => return Err(bad(key, unacceptable(other))),
                },
                "x-max-length" | "x-max-length-bytes" => {
                    let n = non_negative(value).map_err(|why| bad(key, why))?;
                    if key == "x-max-length" {
                        args.max_length = Some(n);
                    } else {
                        args.max_length_bytes = Some(n);
                    }
                }
                "x-overflow" => match value {
                    AMQPValue::LongString(s) => {
                        args.overflow = match s.as_bytes() {
                            b"drop-head" => Overflow::DropHead,
                            b"reject-publish" => Overflow::RejectPublish,
                            b"reject-publish-dlx" => Overflow::RejectPublishDlx,
                            other => {
                                return Err(bad(
                                    key,
                                    format!(
                                        "{{unknown_overflow_mode,'{}'}} (drop-head, reject-publish or reject-publish-dlx)",
                                        String::from_utf8_lossy(other)
                                    ),
                                ))
                            }
                        }
                    }
                    other => return Err(bad(key, unacceptable(other))),
                },
                _ => {}
            }
        }
        if args.dead_letter_routing_key.is_some() && args.dead_letter_exchange.is_none() {
            return Err(AmqpError::precondition(format!(
                "invalid arg 'x-dead-letter-routing-key' for queue '{queue}' in vhost '{vhost}': Key x-dead-letter-routing-key is set but x-dead-letter-exchange is not"
            )));
        }
        Ok(args)
    }

    /// Enqueues a message and delivers what it can, within the queue's length limits.
    pub fn publish(self: &Arc<Self>, message: Arc<Message>) -> Enqueued {
        let mut st = self.state.lock();
        if st.deleted {
            return Enqueued::Gone;
        }
        let size = message.size();
        if self.args.overflow != Overflow::DropHead && self.is_full(&st, size) {
            return Enqueued::Rejected {
                dead_letter: self.args.overflow == Overflow::RejectPublishDlx,
            };
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        st.ready_bytes += size;
        let ttl = match (self.args.message_ttl, message.expiration_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let to_paged = self.goes_to_paged(&st);
        if let Some(p) = &self.persist {
            // Under the queue lock, so the store hears of it before any delivery or ack.
            if message.is_persistent() {
                p.store.submit(Op::Publish {
                    queue: p.id,
                    seq,
                    message: message.clone(),
                    paged: to_paged.then(|| Arc::downgrade(self)),
                });
            }
        }
        st.counters.published += 1;
        let expires_at = ttl.map(|ms| Instant::now() + Duration::from_millis(ms));
        if to_paged {
            st.paged.push_back(Paged {
                seq,
                size: size as u32,
                redelivered: false,
                persistent: message.is_persistent(),
                expires_at,
                message: Some(message),
            });
        } else {
            let queued = QueuedMessage {
                message,
                redelivered: false,
                seq,
                expires_at,
            };
            self.insert_ready(&mut st, queued);
        }
        self.dispatch_locked(&mut st);
        // A TTL of 0 means: delivered at once or expired.
        self.expire_head(&mut st, Instant::now());
        let dropped = self.drop_head_over_limits(&mut st);
        Enqueued::Accepted { dropped }
    }

    /// Takes expired messages off the head (RabbitMQ expires at the head only) into the
    /// list the sweeper dead-letters.
    fn expire_head(&self, st: &mut QueueState, now: Instant) {
        self.refill(st);
        while st
            .ready
            .front()
            .is_some_and(|m| m.expires_at.is_some_and(|t| t <= now))
        {
            let m = st.ready.pop_front().expect("checked");
            st.ready_bytes -= m.message.size();
            self.forget(&m);
            st.expired.push(m.message);
            self.refill(st);
        }
    }

    /// Expires the head now and hands over what expired (the sweeper's call).
    pub fn take_expired(&self) -> Vec<Arc<Message>> {
        let mut st = self.state.lock();
        self.expire_head(&mut st, Instant::now());
        std::mem::take(&mut st.expired)
    }

    /// Whether a message of `size` bytes would take the ready messages past a limit.
    fn is_full(&self, st: &QueueState, size: usize) -> bool {
        self.args
            .max_length
            .is_some_and(|max| Queue::ready_len(st) as u64 >= max)
            || self
                .args
                .max_length_bytes
                .is_some_and(|max| (st.ready_bytes + size) as u64 > max)
    }

    /// `drop-head`: drops the oldest ready messages until the limits hold; returns them
    /// (the caller dead-letters them outside the queue's lock).
    fn drop_head_over_limits(&self, st: &mut QueueState) -> Vec<Arc<Message>> {
        let mut out = Vec::new();
        if self.args.overflow != Overflow::DropHead {
            return out;
        }
        let over = |st: &QueueState| {
            self.args
                .max_length
                .is_some_and(|max| Queue::ready_len(st) as u64 > max)
                || self
                    .args
                    .max_length_bytes
                    .is_some_and(|max| st.ready_bytes as u64 > max)
        };
        while over(st) {
            if st.ready.is_empty() {
                // Everything in memory went already (a limit far above the window).
                self.refill(st);
            }
            let Some(dropped) = st.ready.pop_front() else {
                break;
            };
            st.ready_bytes -= dropped.message.size();
            st.dropped += 1;
            self.forget(&dropped);
            out.push(dropped.message);
        }
        out
    }

    /// Hands ready messages to consumers with credit.
    pub fn dispatch(self: &Arc<Self>) {
        let mut st = self.state.lock();
        self.dispatch_locked(&mut st);
    }

    fn dispatch_locked(self: &Arc<Self>, st: &mut QueueState) {
        self.expire_head(st, Instant::now());
        while !st.consumers.is_empty() {
            self.refill(st);
            if st.ready.is_empty() {
                break;
            }
            let pick = if self.args.single_active_consumer {
                // Only the first registered consumer is active; the others wait their turn.
                st.consumers[0].has_credit().then_some(0)
            } else {
                pick_consumer(st)
            };
            let Some(i) = pick else { break };
            let consumer = st.consumers[i].clone();
            let message = st.ready.pop_front().expect("checked non-empty");
            let size = message.message.size();
            let redelivered = message.redelivered;
            let stored = self.persist.is_some().then(|| message.clone());
            match consumer.channel.deliver(&consumer, self, message) {
                Ok(()) => {
                    if let Some(m) = stored {
                        if consumer.no_ack {
                            self.forget(&m);
                        } else {
                            self.mark_delivered(&m);
                        }
                    }
                    st.ready_bytes -= size;
                    let c = &mut st.counters;
                    c.redelivered += redelivered as u64;
                    *if consumer.no_ack {
                        &mut c.delivered_no_ack
                    } else {
                        &mut c.delivered_ack
                    } += 1;
                    if !consumer.no_ack {
                        st.unacked += 1;
                    }
                    st.cursor = i + 1;
                }
                Err(message) => {
                    // Credit was taken by another queue on the same channel meanwhile.
                    st.ready.push_front(message);
                    break;
                }
            }
        }
    }

    /// `basic.get`: the next ready message and how many remain.
    pub fn get(self: &Arc<Self>, no_ack: bool) -> Option<(QueuedMessage, u32)> {
        let mut st = self.state.lock();
        let now = Instant::now();
        st.last_used = Some(now);
        self.expire_head(&mut st, now);
        debug_assert!(!self.args.single_active_consumer, "checked by the channel");
        self.refill(&mut st);
        let message = st.ready.pop_front()?;
        st.ready_bytes -= message.message.size();
        if no_ack {
            self.forget(&message);
        } else {
            self.mark_delivered(&message);
            st.unacked += 1;
        }
        let c = &mut st.counters;
        c.redelivered += message.redelivered as u64;
        *if no_ack {
            &mut c.get_no_ack
        } else {
            &mut c.get_ack
        } += 1;
        Some((message, Queue::ready_len(&st) as u32))
    }

    /// Acknowledged messages leave the queue for good.
    pub fn acked(&self, messages: &[QueuedMessage]) {
        let mut st = self.state.lock();
        st.unacked = st.unacked.saturating_sub(messages.len());
        st.counters.acked += messages.len() as u64;
        if st.deleted {
            return; // the store dropped the whole queue
        }
        for m in messages {
            self.forget(m);
        }
    }

    /// Puts delivered messages back, in their original order, marked redelivered.
    pub fn requeue(self: &Arc<Self>, mut messages: Vec<QueuedMessage>) {
        let mut st = self.state.lock();
        st.unacked = st.unacked.saturating_sub(messages.len());
        if st.deleted {
            return;
        }
        messages.sort_by_key(|m| std::cmp::Reverse(m.seq));
        for mut m in messages {
            m.redelivered = true;
            st.ready_bytes += m.message.size();
            let at = match self.args.max_priority {
                None => st.ready.partition_point(|x| x.seq < m.seq),
                Some(max) => {
                    let p = m.message.priority.min(max);
                    st.ready.partition_point(|x| {
                        let q = x.message.priority.min(max);
                        q > p || (q == p && x.seq < m.seq)
                    })
                }
            };
            st.ready.insert(at, m);
        }
        self.dispatch_locked(&mut st);
    }

    /// Adds a consumer after the exclusivity checks RabbitMQ makes. Nothing is delivered to
    /// it until the next [`Queue::dispatch`], so the caller can reply `consume-ok` first.
    pub fn add_consumer_stopped(self: &Arc<Self>, consumer: Arc<Consumer>) -> AmqpResult<()> {
        let mut st = self.state.lock();
        if st.deleted {
            return Err(AmqpError::not_found(format!(
                "no queue '{}' in vhost '{}'",
                self.name(),
                self.vhost
            )));
        }
        if st.consumers.iter().any(|c| c.exclusive)
            || (consumer.exclusive && !st.consumers.is_empty())
        {
            return Err(AmqpError::access_refused(format!(
                "queue '{}' in vhost '{}' in exclusive use",
                self.name(),
                self.vhost
            )));
        }
        st.had_consumer = true;
        st.last_used = Some(Instant::now());
        st.consumers.push(consumer);
        Ok(())
    }

    /// Removes a consumer; returns true when the queue should now be auto-deleted.
    pub fn remove_consumer(self: &Arc<Self>, consumer: &Arc<Consumer>) -> bool {
        let mut st = self.state.lock();
        let was_active = st
            .consumers
            .first()
            .is_some_and(|c| Arc::ptr_eq(c, consumer));
        st.consumers.retain(|c| !Arc::ptr_eq(c, consumer));
        // An `x-expires` queue's unused time starts when its last consumer goes.
        st.last_used = Some(Instant::now());
        if self.args.single_active_consumer && was_active && !st.deleted {
            // The next consumer in line takes over.
            self.dispatch_locked(&mut st);
        }
        self.spec.auto_delete && st.had_consumer && st.consumers.is_empty() && !st.deleted
    }

    /// Records a use that resets the `x-expires` clock (a redeclare).
    pub fn touch(&self) {
        self.state.lock().last_used = Some(Instant::now());
    }

    /// Whether an `x-expires` queue has been unused for its whole lease at `now`.
    pub fn unused_expired(&self, now: Instant) -> bool {
        let Some(ms) = self.args.expires else {
            return false;
        };
        let st = self.state.lock();
        !st.deleted
            && st.consumers.is_empty()
            && st
                .last_used
                .is_some_and(|t| now.saturating_duration_since(t) >= Duration::from_millis(ms))
    }

    /// Empties the ready list; returns how many messages were removed.
    pub fn purge(&self) -> u32 {
        let mut st = self.state.lock();
        let n = Queue::ready_len(&st) as u32;
        for m in std::mem::take(&mut st.ready) {
            self.forget(&m);
        }
        for p in std::mem::take(&mut st.paged) {
            self.forget_paged(&p);
        }
        st.strip_from = 0;
        st.ready_bytes = 0;
        n
    }

    /// Checks `queue.delete`'s conditions, marks the queue deleted and returns the number of
    /// ready messages it held and the consumers to cancel.
    pub fn delete(&self, if_unused: bool, if_empty: bool) -> AmqpResult<(u32, Vec<Arc<Consumer>>)> {
        let mut st = self.state.lock();
        if if_unused && !st.consumers.is_empty() {
            return Err(AmqpError::precondition(format!(
                "queue '{}' in vhost '{}' in use",
                self.name(),
                self.vhost
            )));
        }
        if if_empty && Queue::ready_len(&st) > 0 {
            return Err(AmqpError::precondition(format!(
                "queue '{}' in vhost '{}' not empty",
                self.name(),
                self.vhost
            )));
        }
        st.deleted = true;
        let count = Queue::ready_len(&st) as u32;
        st.ready.clear();
        st.paged.clear();
        st.strip_from = 0;
        st.ready_bytes = 0;
        Ok((count, std::mem::take(&mut st.consumers)))
    }

    /// Ready messages (what `queue.declare-ok` reports).
    pub fn message_count(&self) -> u32 {
        Queue::ready_len(&self.state.lock()) as u32
    }

    pub fn consumer_count(&self) -> u32 {
        self.state.lock().consumers.len() as u32
    }

    /// Messages dropped from the head by a length limit so far.
    pub fn dropped(&self) -> u64 {
        self.state.lock().dropped
    }

    /// Message counters since the queue was declared (management API, Prometheus).
    pub fn counters(&self) -> super::stats::QueueCounters {
        self.state.lock().counters
    }

    /// The queue's consumers now (management API).
    pub fn consumers(&self) -> Vec<Arc<Consumer>> {
        self.state.lock().consumers.clone()
    }

    /// Messages enqueued since the queue was declared (for publish rates on the dashboard).
    pub fn published(&self) -> u64 {
        self.state.lock().next_seq
    }

    /// Ready, unacked, ready bytes: for the management view.
    pub fn stats(&self) -> (usize, usize, usize) {
        let st = self.state.lock();
        (Queue::ready_len(&st), st.unacked, st.ready_bytes)
    }

    /// Checks that `connection` may use this queue (exclusive queues are locked to their owner).
    pub fn check_access(&self, connection: ConnectionId) -> AmqpResult<()> {
        match self.owner {
            Some(owner) if owner != connection => Err(AmqpError::new(
                ReplyCode::ResourceLocked,
                format!(
                    "cannot obtain exclusive access to locked queue '{}' in vhost '{}'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
                    self.name(),
                    self.vhost
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// Picks the next consumer with credit: highest priority first, round-robin among equals.
fn pick_consumer(st: &QueueState) -> Option<usize> {
    let n = st.consumers.len();
    let mut best: Option<(usize, i32)> = None;
    for k in 0..n {
        let i = (st.cursor + k) % n;
        let c = &st.consumers[i];
        if best.is_some_and(|(_, p)| c.priority <= p) {
            continue;
        }
        if c.has_credit() {
            best = Some((i, c.priority));
        }
    }
    best.map(|(i, _)| i)
}

/// RabbitMQ's wording for an argument of the wrong type.
fn unacceptable(value: &AMQPValue) -> String {
    let kind = match value {
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) => "longstr",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Float(_) | AMQPValue::Double(_) => "float",
        AMQPValue::Timestamp(_) => "timestamp",
        AMQPValue::Void => "void",
        _ => "integer",
    };
    format!("{{unacceptable_type,{kind}}}")
}

/// An integer argument ≥ 0 of one of the types RabbitMQ accepts (b, B, s, u, I, i, l).
fn non_negative(value: &AMQPValue) -> Result<u64, String> {
    let n: i128 = match value {
        AMQPValue::ShortShortInt(v) => (*v).into(),
        AMQPValue::ShortShortUInt(v) => (*v).into(),
        AMQPValue::ShortInt(v) => (*v).into(),
        AMQPValue::ShortUInt(v) => (*v).into(),
        AMQPValue::LongInt(v) => (*v).into(),
        AMQPValue::LongUInt(v) => (*v).into(),
        AMQPValue::LongLongInt(v) => (*v).into(),
        other => return Err(unacceptable(other)),
    };
    u64::try_from(n).map_err(|_| format!("{{value_negative,{n}}}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::{auth::Users, Broker, Limits, LocalConnection};
    use amq_protocol::protocol::basic::AMQPProperties;

    fn body(n: usize) -> Vec<u8> {
        format!("body-{n:06}").into_bytes()
    }

    /// Bodies past the in-memory window leave memory once on disk and come back in order,
    /// also after a restart; purge removes paged messages from the store.
    #[test]
    fn a_long_durable_queue_pages_bodies_out_and_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.redb");
        let vhosts = ["/".to_string()];
        let total = IN_MEMORY * 3 + 17;
        let persistent = AMQPProperties::default().with_delivery_mode(2);
        {
            let broker = Broker::open(Limits::default(), Users::default(), &vhosts, &path).unwrap();
            let mut conn = LocalConnection::open(&broker, "/", "guest").unwrap();
            let mut ch = conn.channel();
            ch.queue_declare("long", true, false, false, FieldTable::default())
                .unwrap();
            for n in 0..total {
                ch.publish("", "long", false, &persistent, body(n)).unwrap();
            }
            assert!(broker.store.as_ref().unwrap().sync());
            let q = broker.vhost("/").unwrap().queue("long").unwrap();
            {
                let st = q.state.lock();
                assert_eq!(st.ready.len(), IN_MEMORY);
                assert_eq!(st.paged.len(), total - IN_MEMORY);
                assert!(
                    st.paged.iter().all(|p| p.message.is_none()),
                    "every paged body left memory once committed"
                );
            }
            assert_eq!(q.message_count() as usize, total);
            // Half of them through basic.get: in order, bodies intact.
            for n in 0..total / 2 {
                let got = ch.get("long", true).unwrap().expect("a message");
                assert_eq!(got.message.body.as_ref(), body(n).as_slice());
                assert_eq!(got.message_count as usize, total - n - 1);
            }
            broker.close_store();
        }
        let broker = Broker::open(Limits::default(), Users::default(), &vhosts, &path).unwrap();
        let q = broker.vhost("/").unwrap().queue("long").unwrap();
        assert_eq!(q.message_count() as usize, total - total / 2);
        assert_eq!(
            q.state.lock().ready.len(),
            IN_MEMORY,
            "restored into the window"
        );
        let mut conn = LocalConnection::open(&broker, "/", "guest").unwrap();
        let mut ch = conn.channel();
        for n in total / 2..total / 2 + 10 {
            let got = ch.get("long", true).unwrap().expect("a message");
            assert_eq!(got.message.body.as_ref(), body(n).as_slice());
        }
        assert_eq!(
            q.purge() as usize,
            total - total / 2 - 10,
            "purge counts paged messages"
        );
        broker.close_store();
        drop((ch, conn, q, broker));
        let broker = Broker::open(Limits::default(), Users::default(), &vhosts, &path).unwrap();
        let q = broker.vhost("/").unwrap().queue("long").unwrap();
        assert_eq!(q.message_count(), 0, "purged messages left the store");
        broker.close_store();
    }
}
