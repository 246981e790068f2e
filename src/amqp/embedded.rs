//! The in-process API: the workflow declares, publishes and consumes on mqic's own broker
//! without TCP, through the same [`Channel`] operations a wire client reaches. Acks, requeue
//! on close, prefetch and confirms therefore behave exactly as on the wire.

use std::sync::Arc;

use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::FieldTable;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::broker::Broker;
use super::channel::{Channel, Got, Session};
use super::consumer::ChannelShared;
use super::message::Message;
use super::outbound::{LocalEvent, Outbound};
use super::reply::{AmqpError, AmqpResult, Scope};
use super::stats::ConnectionInfo;

/// An in-process connection: owns exclusive queues and closes them when dropped.
#[derive(Debug)]
pub struct LocalConnection {
    session: Arc<Session>,
    next_channel: u16,
    /// This connection in the broker's registry (management API).
    info: Arc<ConnectionInfo>,
}

impl LocalConnection {
    /// Opens a connection to `vhost` as `user` (trusted: no password, it is our own process).
    pub fn open(broker: &Arc<Broker>, vhost: &str, user: &str) -> AmqpResult<LocalConnection> {
        let vhost = broker
            .vhost(vhost)
            .ok_or_else(|| AmqpError::not_allowed(format!("vhost {vhost} not found")))?;
        let id = broker.next_connection_id();
        let info = broker.stats.register(ConnectionInfo::new(
            id,
            None,
            user,
            &vhost.name,
            FieldTable::default(),
            (0, u16::MAX, 0),
        ));
        Ok(LocalConnection {
            session: Arc::new(Session {
                connection: id,
                user: user.to_string(),
                vhost,
                broker: broker.clone(),
            }),
            next_channel: 0,
            info,
        })
    }

    /// Opens a channel.
    pub fn channel(&mut self) -> LocalChannel {
        self.next_channel = self.next_channel.wrapping_add(1).max(1);
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = ChannelShared::new(
            self.next_channel,
            self.session.connection,
            Outbound::Local(tx),
            true,
        );
        self.info.add_channel(&shared);
        LocalChannel {
            channel: Channel::new(shared, self.session.clone()),
            events: rx,
            closed: None,
        }
    }
}

impl Drop for LocalConnection {
    fn drop(&mut self) {
        let broker = &self.session.broker;
        // In-process connections are not clients: they do not count against max_connections.
        broker.connection_closed(self.session.connection);
        broker.stats.unregister(self.session.connection);
    }
}

/// An in-process channel. A channel-level error closes it, as on the wire.
#[derive(Debug)]
pub struct LocalChannel {
    channel: Channel,
    events: mpsc::UnboundedReceiver<LocalEvent>,
    closed: Option<AmqpError>,
}

impl LocalChannel {
    fn op<T>(&mut self, f: impl FnOnce(&mut Channel) -> AmqpResult<T>) -> AmqpResult<T> {
        if let Some(e) = &self.closed {
            return Err(e.clone());
        }
        let result = f(&mut self.channel);
        if let Err(e) = &result {
            if e.scope == Scope::Channel || e.scope == Scope::Connection {
                self.channel.close();
                self.closed = Some(e.clone());
            }
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    pub fn exchange_declare(
        &mut self,
        name: &str,
        kind: &str,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    ) -> AmqpResult<()> {
        self.op(|c| {
            c.exchange_declare(name, kind, false, durable, auto_delete, internal, arguments)
        })
    }

    /// Declares a queue; returns (name, ready messages, consumers).
    pub fn queue_declare(
        &mut self,
        name: &str,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        arguments: FieldTable,
    ) -> AmqpResult<(String, u32, u32)> {
        self.op(|c| c.queue_declare(name, false, durable, exclusive, auto_delete, arguments))
    }

    pub fn queue_bind(
        &mut self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> AmqpResult<()> {
        self.op(|c| c.queue_bind(queue, exchange, routing_key, arguments))
    }

    pub fn queue_delete(&mut self, queue: &str) -> AmqpResult<u32> {
        self.op(|c| c.queue_delete(queue, false, false))
    }

    pub fn confirm_select(&mut self) -> AmqpResult<()> {
        self.op(|c| c.confirm_select())
    }

    pub fn qos(&mut self, prefetch_count: u16) -> AmqpResult<()> {
        self.op(|c| c.basic_qos(0, prefetch_count, false))
    }

    /// Publishes a message; with confirms on, the confirm arrives as a [`LocalEvent`].
    pub fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        properties: &AMQPProperties,
        body: impl Into<Bytes>,
    ) -> AmqpResult<()> {
        let message = Message::from_properties(
            exchange.to_string(),
            routing_key.to_string(),
            properties,
            body.into(),
        );
        let headers = properties.headers().clone();
        self.op(|c| {
            let result = c.publish_message(Arc::new(message), mandatory, headers);
            c.flush_confirms();
            result
        })
    }

    /// Starts a consumer; deliveries arrive through [`LocalChannel::next_event`].
    pub fn consume(
        &mut self,
        queue: &str,
        tag: &str,
        no_ack: bool,
        arguments: FieldTable,
    ) -> AmqpResult<String> {
        let consumer = self.op(|c| c.basic_consume(queue, tag, no_ack, false, arguments))?;
        let tag = consumer.tag.clone();
        consumer.start();
        Ok(tag)
    }

    pub fn cancel(&mut self, tag: &str) -> AmqpResult<()> {
        self.op(|c| {
            c.basic_cancel(tag);
            Ok(())
        })
    }

    pub fn get(&mut self, queue: &str, no_ack: bool) -> AmqpResult<Option<Got>> {
        self.op(|c| c.basic_get(queue, no_ack))
    }

    pub fn ack(&mut self, delivery_tag: u64, multiple: bool) -> AmqpResult<()> {
        self.op(|c| c.basic_ack(delivery_tag, multiple))
    }

    pub fn nack(&mut self, delivery_tag: u64, multiple: bool, requeue: bool) -> AmqpResult<()> {
        self.op(|c| c.basic_nack(delivery_tag, multiple, requeue))
    }

    /// The next delivery, return, confirm or cancellation.
    pub async fn next_event(&mut self) -> Option<LocalEvent> {
        self.events.recv().await
    }

    /// An event if one is already waiting.
    pub fn try_next_event(&mut self) -> Option<LocalEvent> {
        self.events.try_recv().ok()
    }
}

impl Drop for LocalChannel {
    fn drop(&mut self) {
        if self.closed.is_none() {
            self.channel.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::auth::Users;
    use crate::amqp::broker::Limits;

    fn broker() -> Arc<Broker> {
        Broker::new(Limits::default(), Users::default(), &["/".to_string()])
    }

    fn deliveries(ch: &mut LocalChannel) -> Vec<(u64, bool, Bytes)> {
        let mut out = Vec::new();
        while let Some(e) = ch.try_next_event() {
            if let LocalEvent::Deliver(d) = e {
                out.push((d.delivery_tag, d.redelivered, d.message.body.clone()));
            }
        }
        out
    }

    #[test]
    fn publish_consume_ack_and_requeue_on_close() {
        let b = broker();
        let mut conn = LocalConnection::open(&b, "/", "mqic").unwrap();
        let mut ch = conn.channel();
        ch.queue_declare("work", false, false, false, FieldTable::default())
            .unwrap();
        for i in 0..3u8 {
            ch.publish("", "work", false, &AMQPProperties::default(), vec![i])
                .unwrap();
        }
        let mut consumer = conn.channel();
        consumer.qos(2).unwrap();
        consumer
            .consume("work", "c1", false, FieldTable::default())
            .unwrap();
        let got = deliveries(&mut consumer);
        assert_eq!(got.len(), 2, "prefetch 2 holds the third back");
        consumer.ack(got[0].0, false).unwrap();
        let more = deliveries(&mut consumer);
        assert_eq!(more.len(), 1);
        assert_eq!(more[0].2, Bytes::from(vec![2u8]));
        drop(consumer); // closes: messages 1 and 2 go back, redelivered
        let mut again = conn.channel();
        let got = again.get("work", true).unwrap().unwrap();
        assert!(got.redelivered);
        assert_eq!(got.message.body, Bytes::from(vec![1u8]));
        assert_eq!(got.message_count, 1);
    }

    #[test]
    fn unknown_tag_closes_the_channel() {
        let b = broker();
        let mut conn = LocalConnection::open(&b, "/", "mqic").unwrap();
        let mut ch = conn.channel();
        let err = ch.ack(99, false).unwrap_err();
        assert_eq!(err.code, crate::amqp::reply::ReplyCode::PreconditionFailed);
        assert!(ch
            .queue_declare("q", false, false, false, FieldTable::default())
            .is_err());
    }
}
