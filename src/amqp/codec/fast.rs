//! Hand-written encoders and decoders for the methods on the message hot path.
//!
//! Everything here must produce exactly the bytes `amq-protocol` would (the tests below check
//! that); it only skips the generic machinery.

use amq_protocol::protocol::{basic, AMQPClass};
use bytes::{BufMut, Bytes, BytesMut};

use super::{FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_METHOD, FRAME_OVERHEAD};

/// Decodes a hot-path method. `None` means "not a hot-path method, use the generic parser";
/// `Some(None)` means the arguments are malformed.
pub(super) fn decode(class_id: u16, method_id: u16, payload: &[u8]) -> Option<Option<AMQPClass>> {
    match (class_id, method_id) {
        (60, 40) => Some(decode_publish(&payload[4..])),
        (60, 80) => Some(decode_ack(&payload[4..])),
        _ => None,
    }
}

fn short_str(input: &mut &[u8]) -> Option<String> {
    let (&len, rest) = input.split_first()?;
    let len = len as usize;
    if rest.len() < len {
        return None;
    }
    let s = std::str::from_utf8(&rest[..len]).ok()?.to_owned();
    *input = &rest[len..];
    Some(s)
}

fn decode_publish(mut input: &[u8]) -> Option<AMQPClass> {
    if input.len() < 2 {
        return None;
    }
    input = &input[2..]; // ticket, deprecated
    let exchange = short_str(&mut input)?;
    let routing_key = short_str(&mut input)?;
    let [bits] = input else { return None };
    Some(AMQPClass::Basic(basic::AMQPMethod::Publish(
        basic::Publish {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            mandatory: bits & 1 != 0,
            immediate: bits & 2 != 0,
        },
    )))
}

fn decode_ack(input: &[u8]) -> Option<AMQPClass> {
    let [t0, t1, t2, t3, t4, t5, t6, t7, bits] = *input else {
        return None;
    };
    Some(AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
        delivery_tag: u64::from_be_bytes([t0, t1, t2, t3, t4, t5, t6, t7]),
        multiple: bits & 1 != 0,
    })))
}

/// A method that carries content: what precedes the header and body frames.
#[derive(Debug, Clone, Copy)]
pub enum ContentMethod<'a> {
    Deliver {
        consumer_tag: &'a str,
        delivery_tag: u64,
        redelivered: bool,
        exchange: &'a str,
        routing_key: &'a str,
    },
    GetOk {
        delivery_tag: u64,
        redelivered: bool,
        exchange: &'a str,
        routing_key: &'a str,
        message_count: u32,
    },
    Return {
        reply_code: u16,
        reply_text: &'a str,
        exchange: &'a str,
        routing_key: &'a str,
    },
}

fn put_short_str(out: &mut BytesMut, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(255)];
    out.put_u8(bytes.len() as u8);
    out.extend_from_slice(bytes);
}

/// Writes frame type and channel, reserves the size, and returns where the size goes.
fn begin_frame(out: &mut BytesMut, frame_type: u8, channel: u16) -> usize {
    out.put_u8(frame_type);
    out.put_u16(channel);
    let at = out.len();
    out.put_u32(0);
    at
}

fn end_frame(out: &mut BytesMut, size_at: usize) {
    let size = (out.len() - size_at - 4) as u32;
    out[size_at..size_at + 4].copy_from_slice(&size.to_be_bytes());
    out.put_u8(FRAME_END);
}

/// Appends the method, content header and body frames of one message.
///
/// `properties` are the raw property flags and list as the publisher sent them; `frame_max`
/// is the negotiated frame size, which bounds each body frame.
pub fn encode_content(
    out: &mut BytesMut,
    channel: u16,
    method: ContentMethod<'_>,
    properties: &[u8],
    body: &Bytes,
    frame_max: usize,
) {
    out.reserve(64 + properties.len() + body.len() + FRAME_OVERHEAD * 3);
    let at = begin_frame(out, FRAME_METHOD, channel);
    out.put_u16(60);
    match method {
        ContentMethod::Deliver {
            consumer_tag,
            delivery_tag,
            redelivered,
            exchange,
            routing_key,
        } => {
            out.put_u16(60);
            put_short_str(out, consumer_tag);
            out.put_u64(delivery_tag);
            out.put_u8(redelivered as u8);
            put_short_str(out, exchange);
            put_short_str(out, routing_key);
        }
        ContentMethod::GetOk {
            delivery_tag,
            redelivered,
            exchange,
            routing_key,
            message_count,
        } => {
            out.put_u16(71);
            out.put_u64(delivery_tag);
            out.put_u8(redelivered as u8);
            put_short_str(out, exchange);
            put_short_str(out, routing_key);
            out.put_u32(message_count);
        }
        ContentMethod::Return {
            reply_code,
            reply_text,
            exchange,
            routing_key,
        } => {
            out.put_u16(50);
            out.put_u16(reply_code);
            put_short_str(out, reply_text);
            put_short_str(out, exchange);
            put_short_str(out, routing_key);
        }
    }
    end_frame(out, at);

    let at = begin_frame(out, FRAME_HEADER, channel);
    out.put_u16(60);
    out.put_u16(0);
    out.put_u64(body.len() as u64);
    if properties.is_empty() {
        out.put_u16(0);
    } else {
        out.extend_from_slice(properties);
    }
    end_frame(out, at);

    let chunk = frame_max.saturating_sub(FRAME_OVERHEAD).max(1);
    for part in body.chunks(chunk) {
        out.put_u8(FRAME_BODY);
        out.put_u16(channel);
        out.put_u32(part.len() as u32);
        out.extend_from_slice(part);
        out.put_u8(FRAME_END);
    }
}

/// Shorthand for a `basic.deliver` with its content.
#[allow(clippy::too_many_arguments)]
pub fn encode_deliver(
    out: &mut BytesMut,
    channel: u16,
    consumer_tag: &str,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &str,
    routing_key: &str,
    properties: &[u8],
    body: &Bytes,
    frame_max: usize,
) {
    encode_content(
        out,
        channel,
        ContentMethod::Deliver {
            consumer_tag,
            delivery_tag,
            redelivered,
            exchange,
            routing_key,
        },
        properties,
        body,
        frame_max,
    );
}

/// Shorthand for a `basic.get-ok` with its content.
#[allow(clippy::too_many_arguments)]
pub fn encode_get_ok(
    out: &mut BytesMut,
    channel: u16,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &str,
    routing_key: &str,
    message_count: u32,
    properties: &[u8],
    body: &Bytes,
    frame_max: usize,
) {
    encode_content(
        out,
        channel,
        ContentMethod::GetOk {
            delivery_tag,
            redelivered,
            exchange,
            routing_key,
            message_count,
        },
        properties,
        body,
        frame_max,
    );
}

/// Shorthand for a `basic.return` with its content.
#[allow(clippy::too_many_arguments)]
pub fn encode_return(
    out: &mut BytesMut,
    channel: u16,
    reply_code: u16,
    reply_text: &str,
    exchange: &str,
    routing_key: &str,
    properties: &[u8],
    body: &Bytes,
    frame_max: usize,
) {
    encode_content(
        out,
        channel,
        ContentMethod::Return {
            reply_code,
            reply_text,
            exchange,
            routing_key,
        },
        properties,
        body,
        frame_max,
    );
}

/// Appends a `basic.ack` (a publisher confirm).
pub fn encode_basic_ack(out: &mut BytesMut, channel: u16, delivery_tag: u64, multiple: bool) {
    let at = begin_frame(out, FRAME_METHOD, channel);
    out.put_u16(60);
    out.put_u16(80);
    out.put_u64(delivery_tag);
    out.put_u8(multiple as u8);
    end_frame(out, at);
}

/// Appends a `basic.nack` (a negative publisher confirm).
pub fn encode_basic_nack(out: &mut BytesMut, channel: u16, delivery_tag: u64, multiple: bool) {
    let at = begin_frame(out, FRAME_METHOD, channel);
    out.put_u16(60);
    out.put_u16(120);
    out.put_u64(delivery_tag);
    out.put_u8(multiple as u8 | 2); // requeue bit set, as RabbitMQ sends it
    end_frame(out, at);
}

#[cfg(test)]
mod tests {
    use super::super::{decode_frame, encode_method, Frame};
    use super::*;
    use amq_protocol::frame::{gen_frame, AMQPContentHeader, AMQPFrame, WriteContext};

    fn reference(frames: &[AMQPFrame]) -> Vec<u8> {
        let mut all = Vec::new();
        for f in frames {
            let bytes = gen_frame(f)(WriteContext::from(Vec::new()))
                .unwrap()
                .into_inner()
                .0;
            all.extend_from_slice(&bytes);
        }
        all
    }

    #[test]
    fn deliver_matches_amq_protocol_bytes() {
        let body = Bytes::from(vec![7u8; 300]);
        let mut ours = BytesMut::new();
        // Properties: content-type "text/plain" only.
        let mut props = vec![0x80, 0x00, 10];
        props.extend_from_slice(b"text/plain");
        encode_deliver(
            &mut ours, 5, "ctag", 42, true, "ex", "rk", &props, &body, 136,
        );
        let theirs = reference(&[
            AMQPFrame::Method(
                5,
                AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                    consumer_tag: "ctag".into(),
                    delivery_tag: 42,
                    redelivered: true,
                    exchange: "ex".into(),
                    routing_key: "rk".into(),
                })),
            ),
            AMQPFrame::Header(
                5,
                AMQPContentHeader {
                    class_id: 60,
                    body_size: 300,
                    properties: basic::AMQPProperties::default()
                        .with_content_type("text/plain".into()),
                },
            ),
            AMQPFrame::Body(5, vec![7u8; 128]),
            AMQPFrame::Body(5, vec![7u8; 128]),
            AMQPFrame::Body(5, vec![7u8; 44]),
        ]);
        assert_eq!(&ours[..], &theirs[..]);
    }

    #[test]
    fn publish_and_ack_decode_like_amq_protocol() {
        for method in [
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: "amq.topic".into(),
                routing_key: "case.new.42".into(),
                mandatory: true,
                immediate: false,
            })),
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: u64::MAX - 1,
                multiple: true,
            })),
        ] {
            let mut buf = BytesMut::new();
            encode_method(&mut buf, 1, &method);
            let Some(Frame::Method { payload, .. }) = decode_frame(&mut buf, 4096).unwrap() else {
                panic!("not a method");
            };
            assert_eq!(super::super::decode_method(&payload).unwrap(), method);
        }
    }

    #[test]
    fn confirms_match_amq_protocol_bytes() {
        let mut ours = BytesMut::new();
        encode_basic_ack(&mut ours, 2, 9, true);
        encode_basic_nack(&mut ours, 2, 10, false);
        let theirs = reference(&[
            AMQPFrame::Method(
                2,
                AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                    delivery_tag: 9,
                    multiple: true,
                })),
            ),
            AMQPFrame::Method(
                2,
                AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                    delivery_tag: 10,
                    multiple: false,
                    requeue: true,
                })),
            ),
        ]);
        assert_eq!(&ours[..], &theirs[..]);
    }

    #[test]
    fn truncated_publish_is_malformed() {
        assert_eq!(decode(60, 40, &[0, 60, 0, 40, 0, 0, 9, b'a']), Some(None));
        assert_eq!(decode(60, 80, &[0, 60, 0, 80, 0, 0, 0]), Some(None));
        assert_eq!(decode(50, 10, &[0, 50, 0, 10]), None);
    }
}
