//! Where a channel's server-sent traffic goes: a connection's write buffer, or an in-process
//! receiver. Deliveries are encoded straight into the connection's buffer by whichever task
//! routes the message, so a publish reaches a consumer's socket without a task hop.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::sync::{mpsc, Notify};

use super::codec;
use super::message::Message;

/// A write buffer above this size means the peer is not reading fast enough: queues stop
/// handing no-ack deliveries to this connection until the writer has drained it.
const CONGESTED_BYTES: usize = 4 * 1024 * 1024;

/// The outgoing byte buffer of one wire connection, drained by its writer task.
#[derive(Debug)]
pub struct WireOut {
    buf: Mutex<BytesMut>,
    /// Wakes the writer when the buffer goes from empty to non-empty.
    wake: Notify,
    /// Wakes the connection when a congested buffer has drained, so it re-dispatches queues.
    pub drained: Notify,
    /// Set when a queue skipped one of this connection's consumers because of congestion.
    wants_drain_signal: AtomicBool,
    /// The negotiated frame_max, which bounds body frames.
    frame_max: AtomicUsize,
    /// Set when the connection is closing: the writer flushes and stops.
    closed: AtomicBool,
}

impl WireOut {
    pub fn new(frame_max: usize) -> Arc<WireOut> {
        Arc::new(WireOut {
            buf: Mutex::new(BytesMut::with_capacity(8 * 1024)),
            wake: Notify::new(),
            drained: Notify::new(),
            wants_drain_signal: AtomicBool::new(false),
            frame_max: AtomicUsize::new(frame_max),
            closed: AtomicBool::new(false),
        })
    }

    pub fn frame_max(&self) -> usize {
        self.frame_max.load(Ordering::Relaxed)
    }

    pub fn set_frame_max(&self, frame_max: usize) {
        self.frame_max.store(frame_max, Ordering::Relaxed);
    }

    /// Appends frames with `f` and wakes the writer.
    pub fn write<R>(&self, f: impl FnOnce(&mut BytesMut, usize) -> R) -> R {
        let frame_max = self.frame_max();
        let mut buf = self.buf.lock();
        let was_empty = buf.is_empty();
        let r = f(&mut buf, frame_max);
        drop(buf);
        if was_empty {
            self.wake.notify_one();
        }
        r
    }

    /// Swaps the pending bytes into `into` (which must be empty); false when nothing is pending.
    pub fn take(&self, into: &mut BytesMut) -> bool {
        let mut buf = self.buf.lock();
        if buf.is_empty() {
            return false;
        }
        std::mem::swap(&mut *buf, into);
        true
    }

    /// Waits until something is written or the connection closes.
    pub async fn wait(&self) {
        self.wake.notified().await
    }

    pub fn is_congested(&self) -> bool {
        if self.buf.lock().len() > CONGESTED_BYTES {
            self.wants_drain_signal.store(true, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// Called by the writer after a flush: tells the connection to re-dispatch if a queue
    /// held back deliveries while the buffer was congested.
    pub fn after_flush(&self) {
        if self.wants_drain_signal.load(Ordering::Relaxed)
            && self.buf.lock().len() <= CONGESTED_BYTES
        {
            self.wants_drain_signal.store(false, Ordering::Relaxed);
            self.drained.notify_one();
        }
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// A message delivered to an in-process consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub consumer_tag: String,
    pub delivery_tag: u64,
    pub redelivered: bool,
    pub message: Arc<Message>,
}

/// What an in-process channel receives, in the order a wire client would.
#[derive(Debug, Clone)]
pub enum LocalEvent {
    Deliver(Delivery),
    /// A mandatory message nobody could take (`basic.return`).
    Return {
        reply_code: u16,
        reply_text: String,
        message: Arc<Message>,
    },
    /// A publisher confirm.
    Confirm {
        delivery_tag: u64,
        multiple: bool,
        ack: bool,
    },
    /// The broker cancelled a consumer (its queue was deleted).
    Cancelled {
        consumer_tag: String,
    },
}

/// The destination of one channel's server-sent frames.
#[derive(Debug, Clone)]
pub enum Outbound {
    Wire { out: Arc<WireOut>, channel: u16 },
    Local(mpsc::UnboundedSender<LocalEvent>),
}

impl Outbound {
    pub fn deliver(
        &self,
        consumer_tag: &str,
        delivery_tag: u64,
        redelivered: bool,
        m: &Arc<Message>,
    ) {
        match self {
            Outbound::Wire { out, channel } => out.write(|buf, frame_max| {
                codec::encode_deliver(
                    buf,
                    *channel,
                    consumer_tag,
                    delivery_tag,
                    redelivered,
                    &m.exchange,
                    &m.routing_key,
                    &m.properties,
                    &m.body,
                    frame_max,
                )
            }),
            Outbound::Local(tx) => {
                let _ = tx.send(LocalEvent::Deliver(Delivery {
                    consumer_tag: consumer_tag.to_string(),
                    delivery_tag,
                    redelivered,
                    message: m.clone(),
                }));
            }
        }
    }

    pub fn basic_return(&self, reply_code: u16, reply_text: &str, m: &Arc<Message>) {
        match self {
            Outbound::Wire { out, channel } => out.write(|buf, frame_max| {
                codec::encode_return(
                    buf,
                    *channel,
                    reply_code,
                    reply_text,
                    &m.exchange,
                    &m.routing_key,
                    &m.properties,
                    &m.body,
                    frame_max,
                )
            }),
            Outbound::Local(tx) => {
                let _ = tx.send(LocalEvent::Return {
                    reply_code,
                    reply_text: reply_text.to_string(),
                    message: m.clone(),
                });
            }
        }
    }

    pub fn confirm(&self, delivery_tag: u64, multiple: bool, ack: bool) {
        match self {
            Outbound::Wire { out, channel } => out.write(|buf, _| {
                if ack {
                    codec::encode_basic_ack(buf, *channel, delivery_tag, multiple)
                } else {
                    codec::encode_basic_nack(buf, *channel, delivery_tag, multiple)
                }
            }),
            Outbound::Local(tx) => {
                let _ = tx.send(LocalEvent::Confirm {
                    delivery_tag,
                    multiple,
                    ack,
                });
            }
        }
    }

    /// Sends a method frame (wire only; in-process callers get results directly).
    pub fn method(&self, method: &amq_protocol::protocol::AMQPClass) {
        if let Outbound::Wire { out, channel } = self {
            out.write(|buf, _| codec::encode_method(buf, *channel, method));
        }
    }

    /// A server-initiated `basic.cancel`.
    pub fn cancel(&self, consumer_tag: &str) {
        match self {
            Outbound::Wire { .. } => {
                use amq_protocol::protocol::{basic, AMQPClass};
                self.method(&AMQPClass::Basic(basic::AMQPMethod::Cancel(
                    basic::Cancel {
                        consumer_tag: consumer_tag.into(),
                        nowait: true,
                    },
                )));
            }
            Outbound::Local(tx) => {
                let _ = tx.send(LocalEvent::Cancelled {
                    consumer_tag: consumer_tag.to_string(),
                });
            }
        }
    }

    pub fn is_congested(&self) -> bool {
        match self {
            Outbound::Wire { out, .. } => out.is_congested(),
            Outbound::Local(_) => false,
        }
    }
}
