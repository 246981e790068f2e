//! Codec micro-benchmark: the hand-written hot path against `amq-protocol` on the same
//! input, measured in one run so the ratio holds on a noisy machine. Run with
//! `cargo bench --bench codec`.

use std::hint::black_box;
use std::time::Instant;

use amq_protocol::frame::{gen_frame, AMQPContentHeader, AMQPFrame, WriteContext};
use amq_protocol::protocol::{basic, parse_class, AMQPClass};
use bytes::{Bytes, BytesMut};
use mqic::amqp::codec;

const N: u32 = 1_000_000;

fn time(label: &str, mut f: impl FnMut()) -> f64 {
    for _ in 0..N / 10 {
        f();
    }
    let t = Instant::now();
    for _ in 0..N {
        f();
    }
    let ns = t.elapsed().as_nanos() as f64 / N as f64;
    println!("{label:<48} {ns:>8.1} ns/op");
    ns
}

fn main() {
    // basic.publish as a client sends it.
    let publish = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
        exchange: "amq.topic".into(),
        routing_key: "case.new.c-2026-0042".into(),
        mandatory: false,
        immediate: false,
    }));
    let mut frame = BytesMut::new();
    codec::encode_method(&mut frame, 1, &publish);
    let Some(codec::Frame::Method { payload, .. }) =
        codec::decode_frame(&mut frame, 131_072).unwrap()
    else {
        unreachable!()
    };
    let ours = time("decode basic.publish: hand-written", || {
        black_box(codec::decode_method(black_box(&payload)).unwrap());
    });
    let theirs = time("decode basic.publish: amq-protocol", || {
        black_box(parse_class(black_box(payload.as_ref())).unwrap());
    });
    println!("  ratio amq-protocol/hand-written: {:.2}x", theirs / ours);

    // basic.deliver + content header + one 512-byte body frame.
    let body = Bytes::from(vec![b'x'; 512]);
    let props = basic::AMQPProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    let raw_props = mqic::amqp::message::encode_properties(&props);
    let mut out = BytesMut::with_capacity(4096);
    let ours = time("encode deliver+header+body: hand-written", || {
        out.clear();
        codec::encode_deliver(
            &mut out,
            1,
            "amq.ctag-1",
            42,
            false,
            "amq.topic",
            "case.new.c1",
            &raw_props,
            &body,
            131_072,
        );
        black_box(&out);
    });
    let frames = [
        AMQPFrame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: "amq.ctag-1".into(),
                delivery_tag: 42,
                redelivered: false,
                exchange: "amq.topic".into(),
                routing_key: "case.new.c1".into(),
            })),
        ),
        AMQPFrame::Header(
            1,
            AMQPContentHeader {
                class_id: 60,
                body_size: 512,
                properties: props.clone(),
            },
        ),
        AMQPFrame::Body(1, body.to_vec()),
    ];
    let theirs = time("encode deliver+header+body: amq-protocol", || {
        let mut all = Vec::with_capacity(4096);
        for f in &frames {
            all = gen_frame(f)(WriteContext::from(all))
                .unwrap()
                .into_inner()
                .0;
        }
        black_box(all);
    });
    println!("  ratio amq-protocol/hand-written: {:.2}x", theirs / ours);
}
