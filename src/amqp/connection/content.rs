//! Content assembly: a `basic.publish` waits for its content header and body frames, which
//! are checked against the header's size and the message size limit, then published.

use bytes::{Bytes, BytesMut};

use super::{Connection, Slot};
use crate::amqp::reply::{AmqpError, ReplyCode, Scope};

/// A publish waiting for its content header and body.
pub(super) struct PendingContent {
    exchange: String,
    routing_key: String,
    mandatory: bool,
    immediate: bool,
    /// Set once the header arrived.
    header: Option<(Bytes, u64)>,
    body: BytesMut,
    /// A single body frame is kept without copying.
    single: Option<Bytes>,
}

impl PendingContent {
    pub(super) fn new(
        exchange: String,
        routing_key: String,
        mandatory: bool,
        immediate: bool,
    ) -> Self {
        PendingContent {
            exchange,
            routing_key,
            mandatory,
            immediate,
            header: None,
            body: BytesMut::new(),
            single: None,
        }
    }
}

/// Bytes of body collected so far, after the frame just added.
fn payload_len(content: &PendingContent) -> usize {
    content.body.len() + content.single.as_ref().map_or(0, |b| b.len())
}

impl Connection {
    pub(super) fn content_header(
        &mut self,
        id: u16,
        class_id: u16,
        body_size: u64,
        properties: Bytes,
    ) -> Result<(), AmqpError> {
        let max = self.broker.limits.max_message_size as u64;
        let open = match self.channels.get_mut(&id) {
            Some(Slot::Closing) => return Ok(()),
            Some(Slot::Open(open)) => open,
            None => {
                return Err(AmqpError::new(
                    ReplyCode::ChannelError,
                    format!("expected 'channel.open' on channel {id}"),
                ))
            }
        };
        let Some(content) = open.content.as_mut().filter(|c| c.header.is_none()) else {
            return Err(AmqpError::new(
                ReplyCode::UnexpectedFrame,
                format!("unexpected content header on channel {id}"),
            ));
        };
        if class_id != 60 {
            return Err(AmqpError::new(
                ReplyCode::FrameError,
                format!("content header for class {class_id}, expected 60"),
            ));
        }
        if body_size > max {
            self.close_channel(
                id,
                AmqpError::precondition(format!(
                    "message size {body_size} is larger than configured max size {max}"
                ))
                .on_method(60, 40),
            );
            return Ok(());
        }
        content.header = Some((properties, body_size));
        if body_size == 0 {
            self.complete_publish(id)?;
        }
        Ok(())
    }

    pub(super) fn content_body(&mut self, id: u16, payload: Bytes) -> Result<(), AmqpError> {
        let open = match self.channels.get_mut(&id) {
            Some(Slot::Closing) => return Ok(()),
            Some(Slot::Open(open)) => open,
            None => {
                return Err(AmqpError::new(
                    ReplyCode::ChannelError,
                    format!("expected 'channel.open' on channel {id}"),
                ))
            }
        };
        let Some(content) = open.content.as_mut() else {
            return Err(AmqpError::new(
                ReplyCode::UnexpectedFrame,
                format!("unexpected content body on channel {id}"),
            ));
        };
        let Some((_, size)) = content.header.as_ref() else {
            return Err(AmqpError::new(
                ReplyCode::UnexpectedFrame,
                format!("content body before its header on channel {id}"),
            ));
        };
        let size = *size;
        let have = content.body.len() + content.single.as_ref().map_or(0, |b| b.len());
        if (have + payload.len()) as u64 > size {
            return Err(AmqpError::new(
                ReplyCode::FrameError,
                format!("content body longer than the {size} bytes its header declared"),
            ));
        }
        if have == 0 && payload.len() as u64 == size {
            content.single = Some(payload);
        } else {
            if let Some(first) = content.single.take() {
                content.body.extend_from_slice(&first);
            }
            content.body.extend_from_slice(&payload);
        }
        if payload_len(content) as u64 == size {
            self.complete_publish(id)?;
        }
        Ok(())
    }

    fn complete_publish(&mut self, id: u16) -> Result<(), AmqpError> {
        let open = self.open_channel(id);
        let content = open.content.take().expect("content in progress");
        let (properties, _) = content.header.expect("header received");
        let body = match content.single {
            Some(b) => b,
            None => content.body.freeze(),
        };
        let result = open.channel.basic_publish(
            &content.exchange,
            &content.routing_key,
            content.mandatory,
            content.immediate,
            properties,
            body,
        );
        match result {
            Ok(()) => {
                if !self.confirm_dirty.contains(&id) {
                    self.confirm_dirty.push(id);
                }
                Ok(())
            }
            Err(e) if e.scope == Scope::Channel => {
                self.close_channel(id, e.on_method(60, 40));
                Ok(())
            }
            Err(e) => Err(e.on_method(60, 40)),
        }
    }
}
