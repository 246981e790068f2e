//! The one match with an arm per channel-level method: decode has happened, the channel is
//! open and not mid-content; each arm calls the [`Channel`](crate::amqp::channel::Channel)
//! operation and writes the reply unless `nowait`.

use bytes::Bytes;

use super::content::PendingContent;
use super::{Connection, Slot};
use crate::amqp::codec;
use crate::amqp::reply::{AmqpError, ReplyCode};
use amq_protocol::protocol::{
    access, basic, channel as chan, confirm, exchange, queue, tx, AMQPClass,
};

impl Connection {
    /// The one match with an arm per channel-level method.
    /// `payload` is the raw method, for the one field `amq-protocol` does not decode.
    pub(super) fn dispatch(
        &mut self,
        id: u16,
        method: AMQPClass,
        payload: &Bytes,
    ) -> Result<(), AmqpError> {
        use AMQPClass as C;
        let frame_max = self.frame_max;
        let out = self.out.clone();
        let ch = &mut self.open_channel(id).channel;
        let reply = |m: AMQPClass| out.write(|b, _| codec::encode_method(b, id, &m));
        match method {
            C::Basic(basic::AMQPMethod::Publish(p)) => {
                self.published = true;
                self.open_channel(id).content = Some(PendingContent::new(
                    p.exchange.to_string(),
                    p.routing_key.to_string(),
                    p.mandatory,
                    p.immediate,
                ));
            }
            C::Basic(basic::AMQPMethod::Ack(a)) => ch.basic_ack(a.delivery_tag, a.multiple)?,
            C::Basic(basic::AMQPMethod::Nack(n)) => {
                ch.basic_nack(n.delivery_tag, n.multiple, n.requeue)?
            }
            C::Basic(basic::AMQPMethod::Reject(r)) => ch.basic_reject(r.delivery_tag, r.requeue)?,
            C::Basic(basic::AMQPMethod::Qos(q)) => {
                ch.basic_qos(
                    codec::qos_prefetch_size(payload),
                    q.prefetch_count,
                    q.global,
                )?;
                reply(C::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})));
            }
            C::Basic(basic::AMQPMethod::Consume(c)) => {
                let started = ch.basic_consume(
                    c.queue.as_str(),
                    c.consumer_tag.as_str(),
                    c.no_ack,
                    c.exclusive,
                    c.arguments,
                )?;
                if !c.nowait {
                    reply(C::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                        consumer_tag: started.tag.as_str().into(),
                    })));
                }
                started.start();
            }
            C::Basic(basic::AMQPMethod::Cancel(c)) => {
                ch.basic_cancel(c.consumer_tag.as_str());
                if !c.nowait {
                    reply(C::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                        consumer_tag: c.consumer_tag,
                    })));
                }
            }
            C::Basic(basic::AMQPMethod::Get(g)) => {
                match ch.basic_get(g.queue.as_str(), g.no_ack)? {
                    Some(got) => out.write(|b, _| {
                        codec::encode_get_ok(
                            b,
                            id,
                            got.delivery_tag,
                            got.redelivered,
                            &got.message.exchange,
                            &got.message.routing_key,
                            got.message_count,
                            &got.message.properties,
                            &got.message.body,
                            frame_max,
                        )
                    }),
                    None => reply(C::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {}))),
                }
            }
            C::Basic(basic::AMQPMethod::Recover(r)) => {
                // recover-ok goes before the redeliveries, as RabbitMQ orders them: clients
                // (lapin) drop the deliveries they hold when recover-ok arrives.
                if r.requeue {
                    reply(C::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})));
                }
                ch.basic_recover(r.requeue)?;
            }
            C::Basic(basic::AMQPMethod::RecoverAsync(r)) => ch.basic_recover(r.requeue)?,
            C::Exchange(exchange::AMQPMethod::Declare(d)) => {
                ch.exchange_declare(
                    d.exchange.as_str(),
                    d.kind.as_str(),
                    d.passive,
                    d.durable,
                    d.auto_delete,
                    d.internal,
                    d.arguments,
                )?;
                if !d.nowait {
                    reply(C::Exchange(exchange::AMQPMethod::DeclareOk(
                        exchange::DeclareOk {},
                    )));
                }
            }
            C::Exchange(exchange::AMQPMethod::Delete(d)) => {
                ch.exchange_delete(d.exchange.as_str(), d.if_unused)?;
                if !d.nowait {
                    reply(C::Exchange(exchange::AMQPMethod::DeleteOk(
                        exchange::DeleteOk {},
                    )));
                }
            }
            C::Exchange(exchange::AMQPMethod::Bind(b)) => {
                ch.exchange_bind(
                    b.destination.as_str(),
                    b.source.as_str(),
                    b.routing_key.as_str(),
                    b.arguments,
                )?;
                if !b.nowait {
                    reply(C::Exchange(exchange::AMQPMethod::BindOk(
                        exchange::BindOk {},
                    )));
                }
            }
            C::Exchange(exchange::AMQPMethod::Unbind(u)) => {
                ch.exchange_unbind(
                    u.destination.as_str(),
                    u.source.as_str(),
                    u.routing_key.as_str(),
                    u.arguments,
                )?;
                if !u.nowait {
                    reply(C::Exchange(exchange::AMQPMethod::UnbindOk(
                        exchange::UnbindOk {},
                    )));
                }
            }
            C::Queue(queue::AMQPMethod::Declare(d)) => {
                let (name, messages, consumers) = ch.queue_declare(
                    d.queue.as_str(),
                    d.passive,
                    d.durable,
                    d.exclusive,
                    d.auto_delete,
                    d.arguments,
                )?;
                if !d.nowait {
                    reply(C::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                        queue: name.into(),
                        message_count: messages,
                        consumer_count: consumers,
                    })));
                }
            }
            C::Queue(queue::AMQPMethod::Bind(b)) => {
                ch.queue_bind(
                    b.queue.as_str(),
                    b.exchange.as_str(),
                    b.routing_key.as_str(),
                    b.arguments,
                )?;
                if !b.nowait {
                    reply(C::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})));
                }
            }
            C::Queue(queue::AMQPMethod::Unbind(u)) => {
                ch.queue_unbind(
                    u.queue.as_str(),
                    u.exchange.as_str(),
                    u.routing_key.as_str(),
                    u.arguments,
                )?;
                reply(C::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})));
            }
            C::Queue(queue::AMQPMethod::Purge(p)) => {
                let n = ch.queue_purge(p.queue.as_str())?;
                if !p.nowait {
                    reply(C::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk {
                        message_count: n,
                    })));
                }
            }
            C::Queue(queue::AMQPMethod::Delete(d)) => {
                let n = ch.queue_delete(d.queue.as_str(), d.if_unused, d.if_empty)?;
                if !d.nowait {
                    reply(C::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                        message_count: n,
                    })));
                }
            }
            C::Channel(chan::AMQPMethod::Close(_)) => {
                if let Some(Slot::Open(mut open)) = self.channels.remove(&id) {
                    open.channel.close();
                }
                reply(C::Channel(chan::AMQPMethod::CloseOk(chan::CloseOk {})));
            }
            C::Channel(chan::AMQPMethod::CloseOk(_)) => {}
            C::Channel(chan::AMQPMethod::Flow(f)) => {
                ch.flow(f.active)?;
                reply(C::Channel(chan::AMQPMethod::FlowOk(chan::FlowOk {
                    active: f.active,
                })));
            }
            C::Channel(chan::AMQPMethod::FlowOk(_)) => {}
            C::Channel(chan::AMQPMethod::Open(_)) => {
                return Err(AmqpError::new(
                    ReplyCode::ChannelError,
                    "second 'channel.open' seen",
                ))
            }
            C::Confirm(confirm::AMQPMethod::Select(s)) => {
                ch.confirm_select()?;
                if !s.nowait {
                    reply(C::Confirm(confirm::AMQPMethod::SelectOk(
                        confirm::SelectOk {},
                    )));
                }
            }
            C::Tx(tx::AMQPMethod::Select(_)) => {
                ch.tx_select()?;
                reply(C::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})));
            }
            C::Tx(tx::AMQPMethod::Commit(_)) => {
                ch.tx_commit()?;
                reply(C::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})));
            }
            C::Tx(tx::AMQPMethod::Rollback(_)) => {
                ch.tx_rollback()?;
                reply(C::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})));
            }
            C::Access(access::AMQPMethod::Request(_)) => {
                reply(C::Access(access::AMQPMethod::RequestOk(
                    access::RequestOk {},
                )));
            }
            other => {
                return Err(AmqpError::new(
                    ReplyCode::CommandInvalid,
                    format!(
                        "method {}/{} is not valid from a client",
                        other.get_amqp_class_id(),
                        other.get_amqp_method_id()
                    ),
                ))
            }
        }
        Ok(())
    }
}
