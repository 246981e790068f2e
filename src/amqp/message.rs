//! A published message as the broker keeps it.
//!
//! Properties stay as the raw bytes the publisher sent (flags and list), so deliveries repeat
//! them byte for byte; the few fields the broker itself acts on are decoded once at publish.

use amq_protocol::frame::WriteContext;
use amq_protocol::protocol::basic::{gen_properties, parse_properties, AMQPProperties};
use bytes::Bytes;

use super::reply::{AmqpError, AmqpResult, ReplyCode};

/// One message, shared (behind an `Arc`) by every queue it was routed to.
#[derive(Debug, Clone)]
pub struct Message {
    /// The exchange it was published to, repeated in `basic.deliver`.
    pub exchange: String,
    /// The routing key it was published with.
    pub routing_key: String,
    /// Raw property flags and list, exactly as published.
    pub properties: Bytes,
    /// The body, possibly reassembled from several frames.
    pub body: Bytes,
    /// `delivery_mode` 2 means persistent (kept across restarts on durable queues).
    pub delivery_mode: u8,
    /// Message priority for priority queues (0 when unset).
    pub priority: u8,
    /// The per-message TTL from the `expiration` property, in milliseconds.
    pub expiration_ms: Option<u64>,
}

/// Parses an `expiration` property: a non-negative integer of milliseconds, as a string.
fn expiration(props: &AMQPProperties) -> AmqpResult<Option<u64>> {
    let Some(e) = props.expiration() else {
        return Ok(None);
    };
    e.as_str().parse::<u64>().map(Some).map_err(|_| {
        AmqpError::precondition(format!("invalid expiration '{}': no_integer", e.as_str()))
    })
}

impl Message {
    /// Builds a message from raw properties, decoding the fields the broker uses.
    pub fn from_raw(
        exchange: String,
        routing_key: String,
        properties: Bytes,
        body: Bytes,
    ) -> AmqpResult<(Message, AMQPProperties)> {
        let parsed = decode_properties(&properties)?;
        let message = Message {
            exchange,
            routing_key,
            delivery_mode: parsed.delivery_mode().unwrap_or(1),
            priority: parsed.priority().unwrap_or(0),
            expiration_ms: expiration(&parsed)?,
            properties,
            body,
        };
        Ok((message, parsed))
    }

    /// Builds a message from typed properties (the in-process publish path).
    pub fn from_properties(
        exchange: String,
        routing_key: String,
        properties: &AMQPProperties,
        body: Bytes,
    ) -> Message {
        Message {
            exchange,
            routing_key,
            delivery_mode: properties.delivery_mode().unwrap_or(1),
            priority: properties.priority().unwrap_or(0),
            // The in-process path is our own code: an unparsable expiration means none.
            expiration_ms: expiration(properties).ok().flatten(),
            properties: encode_properties(properties),
            body,
        }
    }

    /// Decodes the raw properties (for in-process consumers and the headers exchange).
    pub fn decoded_properties(&self) -> AMQPProperties {
        decode_properties(&self.properties).unwrap_or_default()
    }

    /// Bytes this message accounts for in queue length limits and memory figures.
    pub fn size(&self) -> usize {
        self.body.len()
    }

    pub fn is_persistent(&self) -> bool {
        self.delivery_mode == 2
    }
}

/// Decodes raw property flags and list; malformed properties are a 502 like RabbitMQ's.
pub fn decode_properties(raw: &[u8]) -> AmqpResult<AMQPProperties> {
    if raw.is_empty() {
        return Ok(AMQPProperties::default());
    }
    match parse_properties(raw) {
        Ok((&[], props)) => Ok(props),
        _ => Err(AmqpError::new(
            ReplyCode::SyntaxError,
            "malformed content header properties",
        )),
    }
}

/// Encodes typed properties to the raw form stored with a message.
pub fn encode_properties(props: &AMQPProperties) -> Bytes {
    let bytes = gen_properties(props)(WriteContext::from(Vec::with_capacity(32)))
        .expect("generating into a Vec cannot fail")
        .into_inner()
        .0;
    Bytes::from(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::{AMQPValue, FieldTable};

    #[test]
    fn typed_properties_round_trip_through_raw() {
        let mut headers = FieldTable::default();
        headers.insert("x-case".into(), AMQPValue::LongString("c1".into()));
        let props = AMQPProperties::default()
            .with_delivery_mode(2)
            .with_priority(3)
            .with_headers(headers)
            .with_correlation_id("abc".into());
        let m = Message::from_properties("ex".into(), "rk".into(), &props, Bytes::new());
        assert!(m.is_persistent());
        assert_eq!(m.priority, 3);
        assert_eq!(m.decoded_properties(), props);
        let (again, parsed) =
            Message::from_raw("ex".into(), "rk".into(), m.properties.clone(), Bytes::new())
                .unwrap();
        assert_eq!(parsed, props);
        assert_eq!(again.properties, m.properties);
    }

    #[test]
    fn malformed_properties_are_a_syntax_error() {
        // Flags say content-type is present, but the list is cut short.
        let err = decode_properties(&[0x80, 0x00, 10, b'a']).unwrap_err();
        assert_eq!(err.code, ReplyCode::SyntaxError);
    }
}
