//! The basic class and what hangs off it: properties, large bodies, mandatory/immediate,
//! consume/cancel/get, ack/nack/reject/recover, qos, requeue on close, round-robin,
//! publisher confirms, transactions, the memory alarm and the in-process API.
//! Each test asserts what a client observes (lapin, amqprs, or exact bytes via RawClient),
//! against RabbitMQ 3.x behaviour (docs/reference: amqp-broker.md §1.4, 1.5, 1.7, 1.8).

use std::time::Duration;

use amq_protocol::protocol::{basic, connection as conn, queue, AMQPClass};
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicGetArguments, BasicPublishArguments,
    BasicQosArguments, ConfirmSelectArguments, QueueDeclareArguments,
};
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, DecimalValue, FieldArray, FieldTable, LongString};
use lapin::BasicProperties;
use mqic::amqp::{LocalConnection, LocalEvent};

use crate::support::{
    declare_queue, events, eventually, lapin_reply, next_ev, within, Ev, RawClient, TestServer,
};

// ---- helpers --------------------------------------------------------------------------------

/// The reply code of an AMQP error reported by lapin.
fn code_of(e: &lapin::Error) -> u16 {
    lapin_reply(e).0
}

fn text_of(e: &lapin::Error) -> String {
    lapin_reply(e).1
}

/// Ready messages in a queue, as a client sees them (passive declare's message_count).
async fn ready_count(ch: &lapin::Channel, name: &str) -> u32 {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}

/// (ready, unacked) as the broker holds them.
fn stats(server: &TestServer, name: &str) -> (usize, usize) {
    let q = server
        .app
        .broker
        .vhost("/")
        .unwrap()
        .queue(name)
        .expect("queue exists");
    let (ready, unacked, _) = q.stats();
    (ready, unacked)
}

async fn publish(ch: &lapin::Channel, routing_key: &str, body: &[u8]) {
    ch.basic_publish(
        "".into(),
        routing_key.into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default(),
    )
    .await
    .unwrap();
}

async fn consume(ch: &lapin::Channel, queue: &str, tag: &str) -> lapin::Consumer {
    ch.basic_consume(
        queue.into(),
        tag.into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap()
}

async fn next(c: &mut lapin::Consumer) -> lapin::message::Delivery {
    within("a delivery", c.next())
        .await
        .expect("consumer still open")
        .expect("delivery, not an error")
}

/// Asserts that no delivery (and no cancellation) arrives for a while.
async fn nothing_more(c: &mut lapin::Consumer) {
    if let Ok(got) = tokio::time::timeout(Duration::from_millis(300), c.next()).await {
        panic!("expected no further delivery, got {got:?}");
    }
}

/// Everything that arrives until the consumer has been idle for 300 ms.
async fn drain(c: &mut lapin::Consumer) -> Vec<lapin::message::Delivery> {
    let mut out = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(300), c.next()).await {
        out.push(d);
    }
    out
}

async fn get(ch: &lapin::Channel, queue: &str) -> Option<lapin::message::BasicGetMessage> {
    ch.basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
}

/// A body whose bytes depend on their position, so reordering or loss shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
        .collect()
}

async fn amqprs_declare(ch: &amqprs::channel::Channel, name: &str) {
    ch.queue_declare(QueueDeclareArguments::new(name))
        .await
        .unwrap();
}

async fn amqprs_publish(ch: &amqprs::channel::Channel, routing_key: &str, body: &[u8]) {
    ch.basic_publish(
        amqprs::BasicProperties::default(),
        body.to_vec(),
        BasicPublishArguments::new("", routing_key),
    )
    .await
    .unwrap();
}

// ---- raw frame building for the byte-exact property test -------------------------------------

fn shortstr(out: &mut Vec<u8>, s: &str) {
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

fn longstr(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// A tagged field value.
fn val(tag: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(payload);
    v
}

/// A field table (length-prefixed), keys in the order given.
fn table(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut inner = Vec::new();
    for (k, v) in entries {
        shortstr(&mut inner, k);
        inner.extend_from_slice(v);
    }
    let mut out = (inner.len() as u32).to_be_bytes().to_vec();
    out.extend(inner);
    out
}

/// A field array with a 4-byte byte length, as RabbitMQ encodes it.
fn array(values: &[Vec<u8>]) -> Vec<u8> {
    let inner: Vec<u8> = values.concat();
    let mut out = (inner.len() as u32).to_be_bytes().to_vec();
    out.extend(inner);
    out
}

/// The property flags and list of a message with all 14 basic properties set and a headers
/// table holding every field type RabbitMQ knows, keys deliberately not sorted.
fn all_properties_raw() -> Vec<u8> {
    let s = |text: &str| {
        let mut b = Vec::new();
        longstr(&mut b, text.as_bytes());
        b
    };
    let nested = table(&[
        ("zz-last-first", val(b'S', &s("nested"))),
        (
            "deeper",
            val(b'F', &table(&[("x", val(b'x', &s("\0\x01\x7f\u{ff}")))])),
        ),
        ("aa", val(b'b', &[0x80])),
    ]);
    let arr = array(&[
        val(b'I', &(-7i32).to_be_bytes()),
        val(b'S', &s("two")),
        val(b'A', &array(&[val(b't', &[0]), val(b'V', &[])])),
        val(
            b'F',
            &table(&[
                ("k2", val(b'u', &7u16.to_be_bytes())),
                ("k1", val(b'V', &[])),
            ]),
        ),
        val(b'd', &f64::MIN_POSITIVE.to_be_bytes()),
    ]);
    let mut decimal = vec![3u8];
    decimal.extend_from_slice(&123_456u32.to_be_bytes());
    let headers = table(&[
        ("zulu-t", val(b't', &[1])),
        ("yankee-b", val(b'b', &(-5i8).to_be_bytes())),
        ("xray-B", val(b'B', &[250])),
        ("whiskey-s", val(b's', &(-1234i16).to_be_bytes())),
        ("victor-u", val(b'u', &65_000u16.to_be_bytes())),
        ("uniform-I", val(b'I', &(-123_456_789i32).to_be_bytes())),
        ("tango-i", val(b'i', &4_000_000_000u32.to_be_bytes())),
        (
            "sierra-l",
            val(b'l', &(-9_000_000_000_000_000_000i64).to_be_bytes()),
        ),
        ("romeo-f", val(b'f', &1.5f32.to_be_bytes())),
        ("quebec-d", val(b'd', &(-2.25f64).to_be_bytes())),
        ("papa-D", val(b'D', &decimal)),
        ("oscar-S", val(b'S', &s("long string \u{e9}\u{4e2d}"))),
        ("november-A", val(b'A', &arr)),
        ("mike-T", val(b'T', &1_700_000_000u64.to_be_bytes())),
        ("lima-F", val(b'F', &nested)),
        ("kilo-x", val(b'x', &s("\u{de}\u{ad}"))),
        ("juliet-V", val(b'V', &[])),
        ("alpha-after-juliet", val(b'S', &s(""))),
    ]);
    let mut p = Vec::new();
    p.extend_from_slice(&0xFFFCu16.to_be_bytes()); // all 14 property bits
    shortstr(&mut p, "application/x-mqic"); // content-type
    shortstr(&mut p, "gzip"); // content-encoding
    p.extend_from_slice(&headers); // headers
    p.push(2); // delivery-mode
    p.push(7); // priority
    shortstr(&mut p, "corr-1"); // correlation-id
    shortstr(&mut p, "reply.here"); // reply-to
    shortstr(&mut p, "600000"); // expiration
    shortstr(&mut p, "msg-42"); // message-id
    p.extend_from_slice(&1_700_000_123u64.to_be_bytes()); // timestamp
    shortstr(&mut p, "mqic.test"); // type
    shortstr(&mut p, "guest"); // user-id
    shortstr(&mut p, "basic-it"); // app-id
    shortstr(&mut p, "cluster-x"); // cluster-id
    p
}

fn raw_declare(name: &str) -> AMQPClass {
    AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
        queue: name.into(),
        passive: false,
        durable: false,
        exclusive: false,
        auto_delete: false,
        nowait: false,
        arguments: FieldTable::default(),
    }))
}

fn raw_consume(queue: &str, tag: &str, no_ack: bool) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
        queue: queue.into(),
        consumer_tag: tag.into(),
        no_local: false,
        no_ack,
        exclusive: false,
        nowait: false,
        arguments: FieldTable::default(),
    }))
}

// ---- 1. properties --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_properties_and_every_field_type_round_trip_byte_exact() {
    let server = TestServer::start().await;
    let mut raw = RawClient::connected(server.addr, 131_072).await;
    raw.open_channel(1).await;
    assert!(matches!(
        raw.call(1, raw_declare("props")).await,
        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(_))
    ));
    let props = all_properties_raw();
    raw.publish_raw(1, "", "props", false, false, &props, b"get me", 131_072)
        .await;
    raw.publish_raw(1, "", "props", false, false, &props, b"consume me", 131_072)
        .await;

    // basic.get returns the first one with the properties exactly as sent.
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
            queue: "props".into(),
            no_ack: true,
        })),
    )
    .await;
    let got = raw.content().await;
    let AMQPClass::Basic(basic::AMQPMethod::GetOk(ok)) = &got.method else {
        panic!("expected get-ok, got {:?}", got.method);
    };
    assert_eq!(ok.message_count, 1);
    assert_eq!(got.class_id, 60);
    assert_eq!(got.body, b"get me");
    assert_eq!(
        &got.properties[..],
        &props[..],
        "get-ok properties byte-exact"
    );

    // basic.deliver repeats them too.
    assert!(matches!(
        raw.call(1, raw_consume("props", "raw-c", true)).await,
        AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_))
    ));
    let delivered = raw.content().await;
    assert!(matches!(
        delivered.method,
        AMQPClass::Basic(basic::AMQPMethod::Deliver(_))
    ));
    assert_eq!(delivered.body, b"consume me");
    assert_eq!(
        &delivered.properties[..],
        &props[..],
        "deliver properties byte-exact"
    );

    // A real client decodes every value (lapin reads the same message from a new queue).
    let lapin = server.lapin().await;
    let ch = lapin.create_channel().await.unwrap();
    declare_queue(&ch, "props-lapin").await;
    raw.publish_raw(1, "", "props-lapin", false, false, &props, b"x", 131_072)
        .await;
    eventually("message routed", || stats(&server, "props-lapin").0 == 1).await;
    let m = get(&ch, "props-lapin").await.expect("a message");
    let p = &m.properties;
    assert_eq!(p.user_id().as_ref().unwrap().as_str(), "guest");
    assert_eq!(p.cluster_id().as_ref().unwrap().as_str(), "cluster-x");
    assert_eq!(*p.timestamp(), Some(1_700_000_123));
    let h = p.headers().as_ref().unwrap().inner();
    assert_eq!(h.len(), 18);
    assert_eq!(h["tango-i"], AMQPValue::LongUInt(4_000_000_000));
    assert_eq!(
        h["sierra-l"],
        AMQPValue::LongLongInt(-9_000_000_000_000_000_000)
    );
    assert_eq!(
        h["papa-D"],
        AMQPValue::DecimalValue(DecimalValue {
            scale: 3,
            value: 123_456
        })
    );
    assert_eq!(h["juliet-V"], AMQPValue::Void);
    drop(raw); // the server need not wait for a close-ok that will not come
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_round_trips_all_fourteen_properties() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "props14").await;
    let mut inner = FieldTable::default();
    inner.insert("z".into(), AMQPValue::LongString("zed".into()));
    inner.insert("a".into(), AMQPValue::Boolean(false));
    let mut headers = FieldTable::default();
    headers.insert("t".into(), AMQPValue::Boolean(true));
    headers.insert("b".into(), AMQPValue::ShortShortInt(-1));
    headers.insert("B".into(), AMQPValue::ShortShortUInt(200));
    headers.insert("s".into(), AMQPValue::ShortInt(-300));
    headers.insert("u".into(), AMQPValue::ShortUInt(60_000));
    headers.insert("I".into(), AMQPValue::LongInt(-70_000));
    headers.insert("i".into(), AMQPValue::LongUInt(3_000_000_000));
    headers.insert("l".into(), AMQPValue::LongLongInt(i64::MIN));
    headers.insert("f".into(), AMQPValue::Float(0.25));
    headers.insert("d".into(), AMQPValue::Double(1e300));
    headers.insert(
        "D".into(),
        AMQPValue::DecimalValue(DecimalValue { scale: 2, value: 5 }),
    );
    headers.insert("S".into(), AMQPValue::LongString("text".into()));
    headers.insert(
        "A".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![
            AMQPValue::LongInt(1),
            AMQPValue::FieldTable(inner.clone()),
        ])),
    );
    headers.insert("T".into(), AMQPValue::Timestamp(42));
    headers.insert("F".into(), AMQPValue::FieldTable(inner));
    headers.insert("x".into(), AMQPValue::ByteArray(vec![0u8, 255].into()));
    headers.insert("V".into(), AMQPValue::Void);
    let props = BasicProperties::default()
        .with_content_type("text/plain".into())
        .with_content_encoding("identity".into())
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_priority(9)
        .with_correlation_id("corr".into())
        .with_reply_to("replies".into())
        .with_expiration("60000".into())
        .with_message_id("id-1".into())
        .with_timestamp(1_700_000_000)
        .with_type("kind".into())
        .with_user_id("guest".into())
        .with_app_id("app".into())
        .with_cluster_id("cluster".into());
    ch.basic_publish(
        "".into(),
        "props14".into(),
        BasicPublishOptions::default(),
        b"body",
        props.clone(),
    )
    .await
    .unwrap();
    let mut consumer = consume(&ch, "props14", "c").await;
    let d = next(&mut consumer).await;
    assert_eq!(d.properties, props);
    assert_eq!(d.data, b"body");
    conn.close(200, "bye".into()).await.unwrap();
    server.stop().await;
}

// ---- 2. bodies larger than frame_max ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_split_at_frame_max_and_reassembled_raw() {
    let server = TestServer::start().await;
    const FM: usize = 131_072;
    let mut raw = RawClient::connected(server.addr, FM as u32).await;
    raw.open_channel(1).await;
    raw.call(1, raw_declare("big")).await;
    let bodies = [
        pattern(1 << 20),
        pattern(FM - 8),
        Vec::new(),
        pattern(FM - 7),
    ];
    for b in &bodies {
        // The client cuts at frame_max - 8: full-size frames must be accepted.
        raw.publish_raw(1, "", "big", false, false, &[0, 0], b, FM)
            .await;
    }
    raw.call(1, raw_consume("big", "c", true)).await;
    for b in &bodies {
        let got = raw.content().await;
        assert_eq!(got.body_size, b.len() as u64);
        assert!(got.body == *b, "body of {} bytes intact", b.len());
        let expected: Vec<usize> = b.chunks(FM - 8).map(<[u8]>::len).collect();
        assert_eq!(got.body_frames, expected, "frames for {} bytes", b.len());
    }

    // A consumer that negotiated a smaller frame_max gets smaller frames.
    assert!(matches!(
        raw.call(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                consumer_tag: "c".into(),
                nowait: false,
            })),
        )
        .await,
        AMQPClass::Basic(basic::AMQPMethod::CancelOk(_))
    ));
    let mut small = RawClient::connected(server.addr, 4096).await;
    small.open_channel(1).await;
    small.call(1, raw_consume("big", "small", true)).await;
    raw.publish_raw(1, "", "big", false, false, &[0, 0], &bodies[0], FM)
        .await;
    let got = small.content().await;
    assert!(got.body == bodies[0]);
    assert!(got.body_frames.iter().all(|&n| n <= 4096 - 8));
    assert_eq!(got.body_frames.len(), (1usize << 20).div_ceil(4088));
    drop(raw); // the server need not wait for a close-ok that will not come
    drop(small);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_between_lapin_and_amqprs() {
    let server = TestServer::start().await;
    let lapin = server.lapin().await;
    let lch = lapin.create_channel().await.unwrap();
    declare_queue(&lch, "to-amqprs").await;
    declare_queue(&lch, "to-lapin").await;
    let amqprs = server.amqprs().await;
    let ach = amqprs.open_channel(None).await.unwrap();

    let big = pattern(1 << 20);
    publish(&lch, "to-amqprs", &big).await;
    let (_, mut rx) = ach
        .basic_consume_rx(
            BasicConsumeArguments::new("to-amqprs", "a")
                .auto_ack(true)
                .finish(),
        )
        .await
        .unwrap();
    let m = within("amqprs delivery", rx.recv()).await.unwrap();
    assert!(m.content.unwrap() == big, "lapin → amqprs intact");

    let other = pattern(131_072 * 3 + 5);
    amqprs_publish(&ach, "to-lapin", &other).await;
    amqprs_publish(&ach, "to-lapin", b"").await;
    let mut c = consume(&lch, "to-lapin", "l").await;
    let d = next(&mut c).await;
    assert!(d.data == other, "amqprs → lapin intact");
    let d2 = next(&mut c).await;
    assert!(d2.data.is_empty(), "empty body");
    server.stop().await;
}

// ---- 3. mandatory, immediate, size limit ----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mandatory_unroutable_is_returned_before_the_confirm_lapin() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = ch
        .basic_publish(
            "".into(),
            "nowhere".into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            b"lost",
            BasicProperties::default().with_correlation_id("r1".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "an unroutable message is still acked");
    let ret = confirm
        .take_message()
        .expect("basic.return arrived before the ack");
    assert_eq!(ret.reply_code, 312);
    assert_eq!(ret.reply_text.as_str(), "NO_ROUTE");
    assert_eq!(ret.delivery.routing_key.as_str(), "nowhere");
    assert_eq!(ret.delivery.data, b"lost");
    assert_eq!(
        ret.delivery
            .properties
            .correlation_id()
            .as_ref()
            .unwrap()
            .as_str(),
        "r1"
    );
    // Not mandatory: silently dropped, no return.
    let confirm = ch
        .basic_publish(
            "".into(),
            "nowhere".into(),
            BasicPublishOptions::default(),
            b"dropped",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(confirm, lapin::Confirmation::Ack(None));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mandatory_unroutable_reaches_the_amqprs_return_callback() {
    let server = TestServer::start().await;
    let conn = server.amqprs().await;
    let ch = conn.open_channel(None).await.unwrap();
    let (cb, mut rx) = events();
    ch.register_callback(cb).await.unwrap();
    ch.basic_publish(
        amqprs::BasicProperties::default(),
        b"bounce".to_vec(),
        BasicPublishArguments::new("amq.direct", "nobody")
            .mandatory(true)
            .finish(),
    )
    .await
    .unwrap();
    assert_eq!(
        next_ev(&mut rx).await,
        Ev::Return(312, "NO_ROUTE".into(), b"bounce".to_vec())
    );
    conn.close().await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_publish_closes_the_connection_540() {
    let server = TestServer::start().await;
    let conn = server.amqprs().await;
    let (cb, mut rx) = events();
    conn.register_callback(cb).await.unwrap();
    let ch = conn.open_channel(None).await.unwrap();
    amqprs_declare(&ch, "imm").await;
    let _ = ch
        .basic_publish(
            amqprs::BasicProperties::default(),
            b"now".to_vec(),
            BasicPublishArguments::new("", "imm")
                .immediate(true)
                .finish(),
        )
        .await;
    match next_ev(&mut rx).await {
        Ev::ConnectionClose(540, text) => {
            assert_eq!(text, "NOT_IMPLEMENTED - immediate=true")
        }
        other => panic!("expected connection.close 540, got {other:?}"),
    }
    // Same on the raw wire.
    let mut raw = RawClient::connected(server.addr, 131_072).await;
    raw.open_channel(1).await;
    raw.publish_raw(1, "", "imm", false, true, &[0, 0], b"now", 131_072)
        .await;
    raw.expect_connection_close(540).await;
    drop(raw); // the server need not wait for a close-ok that will not come
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_over_max_message_size_closes_the_channel_406() {
    let server = TestServer::start_with(|c| c.amqp.max_message_size = 1024).await;
    let conn = server.amqprs().await;
    let ch = conn.open_channel(None).await.unwrap();
    amqprs_declare(&ch, "small").await;
    ch.confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    let (cb, mut rx) = events();
    ch.register_callback(cb).await.unwrap();
    // Exactly the limit is fine.
    amqprs_publish(&ch, "small", &[7u8; 1024]).await;
    assert_eq!(next_ev(&mut rx).await, Ev::Ack(1, false));
    amqprs_publish(&ch, "small", &[7u8; 1025]).await;
    assert_eq!(
        next_ev(&mut rx).await,
        Ev::ChannelClose(
            406,
            "PRECONDITION_FAILED - message size 1025 is larger than configured max size 1024"
                .into()
        )
    );
    // The connection survives; only the accepted message is in the queue.
    let ch2 = conn.open_channel(None).await.unwrap();
    let (_, count, _) = ch2
        .queue_declare(QueueDeclareArguments::new("small").passive(true).finish())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(count, 1);
    server.stop().await;
}

// ---- 4. consume ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_consumer_tag_gets_a_server_generated_tag() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "tags").await;
    let c1 = consume(&ch, "tags", "").await;
    let c2 = consume(&ch, "tags", "").await;
    assert!(c1.tag().as_str().starts_with("amq.ctag-"), "{}", c1.tag());
    assert!(c2.tag().as_str().starts_with("amq.ctag-"), "{}", c2.tag());
    assert_ne!(c1.tag(), c2.tag());
    let amqprs = server.amqprs().await;
    let ach = amqprs.open_channel(None).await.unwrap();
    let (tag, _rx) = ach
        .basic_consume_rx(BasicConsumeArguments::new("tags", ""))
        .await
        .unwrap();
    assert!(tag.starts_with("amq.ctag-"), "{tag}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reusing_a_consumer_tag_closes_the_connection_530() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "dup").await;
    let _first = consume(&ch, "dup", "same").await;
    // The same tag on another channel is fine: tags are per channel.
    let ch2 = conn.create_channel().await.unwrap();
    let _other = consume(&ch2, "dup", "same").await;
    let err = ch
        .basic_consume(
            "dup".into(),
            "same".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), 530, "{err}");
    assert!(err.is_amqp_hard_error());
    assert_eq!(
        text_of(&err),
        "NOT_ALLOWED - attempt to reuse consumer tag 'same'"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_consume_conflicts_are_403() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "shared").await;
    declare_queue(&ch, "mine").await;
    let exclusive = BasicConsumeOptions {
        exclusive: true,
        ..Default::default()
    };
    let _c = consume(&ch, "shared", "plain").await;
    let ch2 = conn.create_channel().await.unwrap();
    let err = ch2
        .basic_consume(
            "shared".into(),
            "excl".into(),
            exclusive,
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), 403, "{err}");
    assert!(err.is_amqp_soft_error());
    assert_eq!(
        text_of(&err),
        "ACCESS_REFUSED - queue 'shared' in vhost '/' in exclusive use"
    );

    let _e = ch
        .basic_consume(
            "mine".into(),
            "excl".into(),
            exclusive,
            FieldTable::default(),
        )
        .await
        .unwrap();
    let ch3 = conn.create_channel().await.unwrap();
    let err = ch3
        .basic_consume(
            "mine".into(),
            "second".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), 403, "{err}");
    // A soft error: the connection and the first channel still work.
    publish(&ch, "mine", b"still here").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ack_consumer_gets_messages_that_need_no_ack() {
    let server = TestServer::start().await;
    let conn = server.amqprs().await;
    let ch = conn.open_channel(None).await.unwrap();
    amqprs_declare(&ch, "noack").await;
    let consumer_ch = conn.open_channel(None).await.unwrap();
    let (_, mut rx) = consumer_ch
        .basic_consume_rx(
            BasicConsumeArguments::new("noack", "na")
                .auto_ack(true)
                .finish(),
        )
        .await
        .unwrap();
    for i in 0..5u8 {
        amqprs_publish(&ch, "noack", &[i]).await;
    }
    for i in 0..5u8 {
        let m = within("no-ack delivery", rx.recv()).await.unwrap();
        assert_eq!(m.content.unwrap(), vec![i]);
        assert_eq!(m.deliver.unwrap().delivery_tag(), i as u64 + 1);
    }
    assert_eq!(stats(&server, "noack"), (0, 0), "nothing held unacked");
    // Closing the consumer's channel requeues nothing.
    consumer_ch.close().await.unwrap();
    let (_, count, consumers) = ch
        .queue_declare(QueueDeclareArguments::new("noack").passive(true).finish())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((count, consumers), (0, 0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_consumer_gets_the_messages() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "prio").await;
    let with_priority = |p: i32| {
        let mut args = FieldTable::default();
        args.insert("x-priority".into(), AMQPValue::LongInt(p));
        args
    };
    let low_ch = conn.create_channel().await.unwrap();
    let mut low = low_ch
        .basic_consume(
            "prio".into(),
            "low".into(),
            BasicConsumeOptions::default(),
            with_priority(0),
        )
        .await
        .unwrap();
    let high_ch = conn.create_channel().await.unwrap();
    let mut high = high_ch
        .basic_consume(
            "prio".into(),
            "high".into(),
            BasicConsumeOptions::default(),
            with_priority(10),
        )
        .await
        .unwrap();
    for i in 0..10u8 {
        publish(&ch, "prio", &[i]).await;
    }
    for i in 0..10u8 {
        let d = next(&mut high).await;
        assert_eq!(d.data, vec![i]);
    }
    nothing_more(&mut low).await;

    // Once the high-priority consumer has no credit left, the low one is served.
    high_ch
        .basic_cancel("high".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    let ch4 = conn.create_channel().await.unwrap();
    ch4.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut high2 = ch4
        .basic_consume(
            "prio".into(),
            "high2".into(),
            BasicConsumeOptions::default(),
            with_priority(5),
        )
        .await
        .unwrap();
    publish(&ch, "prio", b"a").await;
    publish(&ch, "prio", b"b").await;
    assert_eq!(next(&mut high2).await.data, b"a");
    assert_eq!(next(&mut low).await.data, b"b");
    server.stop().await;
}

// ---- 5. cancel ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_cancel_stops_deliveries() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "cancelme").await;
    let mut c = consume(&ch, "cancelme", "c").await;
    publish(&ch, "cancelme", b"one").await;
    let d = next(&mut c).await;
    d.ack(BasicAckOptions::default()).await.unwrap();
    ch.basic_cancel("c".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    assert!(
        within("consumer stream ends", c.next()).await.is_none(),
        "a cancelled consumer's stream ends"
    );
    publish(&ch, "cancelme", b"two").await;
    assert_eq!(ready_count(&ch, "cancelme").await, 1, "not delivered");
    let m = get(&ch, "cancelme").await.unwrap();
    assert_eq!(m.data, b"two");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_queue_cancels_its_consumers() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "doomed").await;
    let cch = conn.create_channel().await.unwrap();
    let mut c = consume(&cch, "doomed", "lapin-c").await;

    let amqprs = server.amqprs().await;
    let ach = amqprs.open_channel(None).await.unwrap();
    let (cb, mut rx) = events();
    ach.register_callback(cb).await.unwrap();
    let (_tag, _deliveries) = ach
        .basic_consume_rx(BasicConsumeArguments::new("doomed", "amqprs-c"))
        .await
        .unwrap();

    let deleted = ch
        .queue_delete("doomed".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    assert_eq!(deleted, 0);
    assert!(
        within("lapin consumer cancelled", c.next()).await.is_none(),
        "lapin (consumer_cancel_notify) sees its consumer end"
    );
    assert_eq!(next_ev(&mut rx).await, Ev::Cancel("amqprs-c".into()));
    // The channels stay usable.
    declare_queue(&cch, "after").await;
    amqprs_declare(&ach, "after").await;
    server.stop().await;
}

// ---- 6. basic.get ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_get_reports_remaining_messages_and_get_empty() {
    let server = TestServer::start().await;
    let conn = server.amqprs().await;
    let ch = conn.open_channel(None).await.unwrap();
    amqprs_declare(&ch, "getq").await;
    assert!(ch
        .basic_get(BasicGetArguments::new("getq"))
        .await
        .unwrap()
        .is_none());
    for b in [b"m0", b"m1", b"m2"] {
        amqprs_publish(&ch, "getq", b).await;
    }
    for (i, remaining) in [2u32, 1, 0].into_iter().enumerate() {
        let (ok, _, body) = ch
            .basic_get(BasicGetArguments::new("getq").no_ack(true).finish())
            .await
            .unwrap()
            .expect("a message");
        assert_eq!(ok.message_count(), remaining);
        assert_eq!(body, format!("m{i}").into_bytes());
        assert!(!ok.redelivered());
    }
    assert!(ch
        .basic_get(BasicGetArguments::new("getq"))
        .await
        .unwrap()
        .is_none());
    // A get without no_ack is held until acked.
    amqprs_publish(&ch, "getq", b"held").await;
    let (ok, _, _) = ch
        .basic_get(BasicGetArguments::new("getq"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stats(&server, "getq"), (0, 1));
    ch.basic_ack(BasicAckArguments::new(ok.delivery_tag(), false))
        .await
        .unwrap();
    amqprs_declare(&ch, "sync").await; // a round trip, so the ack was processed
    assert_eq!(stats(&server, "getq"), (0, 0));
    server.stop().await;
}

// ---- 7. ack / nack / reject / recover ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_multiple_covers_up_to_and_including_the_tag() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "multi").await;
    for i in 0..5u8 {
        publish(&ch, "multi", &[i]).await;
    }
    let cch = conn.create_channel().await.unwrap();
    let mut c = consume(&cch, "multi", "c").await;
    let mut tags = Vec::new();
    for i in 0..5u8 {
        let d = next(&mut c).await;
        assert_eq!(d.data, vec![i]);
        tags.push(d.delivery_tag);
    }
    assert_eq!(tags, vec![1, 2, 3, 4, 5], "tags start at 1 per channel");
    cch.basic_ack(3, BasicAckOptions { multiple: true })
        .await
        .unwrap();
    eventually("three acked", || stats(&server, "multi") == (0, 2)).await;
    cch.close(200, "bye".into()).await.unwrap();
    assert_eq!(ready_count(&ch, "multi").await, 2);
    for i in 3..5u8 {
        let m = get(&ch, "multi").await.unwrap();
        assert_eq!(m.data, vec![i]);
        assert!(m.redelivered);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_and_reject_requeue_or_drop() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "nq").await;
    for b in [b"a", b"b", b"c"] {
        publish(&ch, "nq", b).await;
    }
    let mut c = consume(&ch, "nq", "c").await;
    let a = next(&mut c).await;
    let b = next(&mut c).await;
    let cc = next(&mut c).await;
    assert!(!a.redelivered && !b.redelivered && !cc.redelivered);
    a.nack(BasicNackOptions {
        multiple: false,
        requeue: true,
    })
    .await
    .unwrap();
    let a2 = next(&mut c).await;
    assert_eq!(a2.data, b"a");
    assert!(
        a2.redelivered,
        "nack+requeue redelivers with redelivered=true"
    );
    assert_eq!(a2.delivery_tag, 4);
    b.reject(BasicRejectOptions { requeue: true })
        .await
        .unwrap();
    let b2 = next(&mut c).await;
    assert_eq!(b2.data, b"b");
    assert!(
        b2.redelivered,
        "reject+requeue redelivers with redelivered=true"
    );
    // Without requeue the messages are dropped.
    cc.reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    ch.basic_nack(
        b2.delivery_tag,
        BasicNackOptions {
            multiple: true,
            requeue: false,
        },
    )
    .await
    .unwrap();
    nothing_more(&mut c).await;
    assert_eq!(stats(&server, "nq"), (0, 0));
    assert_eq!(ready_count(&ch, "nq").await, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_delivery_tag_closes_the_channel_406() {
    let server = TestServer::start().await;
    let conn = server.amqprs().await;
    let ch = conn.open_channel(None).await.unwrap();
    let (cb, mut rx) = events();
    ch.register_callback(cb).await.unwrap();
    ch.basic_ack(BasicAckArguments::new(99, false))
        .await
        .unwrap();
    assert_eq!(
        next_ev(&mut rx).await,
        Ev::ChannelClose(406, "PRECONDITION_FAILED - unknown delivery tag 99".into())
    );
    // A soft error: the connection is still open.
    let ch2 = conn.open_channel(None).await.unwrap();
    amqprs_declare(&ch2, "alive").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_ack_closes_the_channel_406() {
    let server = TestServer::start().await;
    let conn = server.amqprs().await;
    let ch = conn.open_channel(None).await.unwrap();
    amqprs_declare(&ch, "twice").await;
    amqprs_publish(&ch, "twice", b"x").await;
    let (cb, mut rx) = events();
    ch.register_callback(cb).await.unwrap();
    let (ok, _, _) = ch
        .basic_get(BasicGetArguments::new("twice"))
        .await
        .unwrap()
        .unwrap();
    let tag = ok.delivery_tag();
    ch.basic_ack(BasicAckArguments::new(tag, false))
        .await
        .unwrap();
    ch.basic_ack(BasicAckArguments::new(tag, false))
        .await
        .unwrap();
    assert_eq!(
        next_ev(&mut rx).await,
        Ev::ChannelClose(
            406,
            format!("PRECONDITION_FAILED - unknown delivery tag {tag}")
        )
    );
    assert_eq!(stats(&server, "twice"), (0, 0), "the first ack counted");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_requeue_redelivers_unacked() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "rec").await;
    publish(&ch, "rec", b"r0").await;
    publish(&ch, "rec", b"r1").await;
    let mut c = consume(&ch, "rec", "c").await;
    let first: Vec<_> = [next(&mut c).await, next(&mut c).await].into();
    assert!(first.iter().all(|d| !d.redelivered));
    ch.basic_recover(BasicRecoverOptions { requeue: true })
        .await
        .unwrap();
    let again = [next(&mut c).await, next(&mut c).await];
    assert_eq!(again[0].data, b"r0");
    assert_eq!(again[1].data, b"r1");
    assert!(again.iter().all(|d| d.redelivered));
    assert_eq!(
        (again[0].delivery_tag, again[1].delivery_tag),
        (3, 4),
        "redeliveries get new tags"
    );
    ch.basic_ack(4, BasicAckOptions { multiple: true })
        .await
        .unwrap();
    eventually("all acked", || stats(&server, "rec") == (0, 0)).await;
    server.stop().await;
}

// ---- 8. qos ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_consumer_prefetch_is_enforced() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "pf").await;
    for i in 0..10u8 {
        publish(&ch, "pf", &[i]).await;
    }
    let cch = conn.create_channel().await.unwrap();
    cch.basic_qos(3, BasicQosOptions { global: false })
        .await
        .unwrap();
    let mut c = consume(&cch, "pf", "c").await;
    let held = drain(&mut c).await;
    assert_eq!(held.len(), 3, "exactly prefetch_count unacked");
    assert_eq!(stats(&server, "pf"), (7, 3));
    held[0].ack(BasicAckOptions::default()).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!(d.data, vec![3]);
    nothing_more(&mut c).await;
    d.ack(BasicAckOptions { multiple: true }).await.unwrap();
    let more = drain(&mut c).await;
    assert_eq!(
        more.iter().map(|d| d.data[0]).collect::<Vec<_>>(),
        vec![4, 5, 6]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_prefetch_is_shared_by_the_channels_consumers() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "g1").await;
    declare_queue(&ch, "g2").await;
    let cch = conn.create_channel().await.unwrap();
    cch.basic_qos(4, BasicQosOptions { global: true })
        .await
        .unwrap();
    let mut c1 = consume(&cch, "g1", "c1").await;
    let mut c2 = consume(&cch, "g2", "c2").await;
    for i in 0..10u8 {
        publish(&ch, "g1", &[i]).await;
        publish(&ch, "g2", &[i]).await;
    }
    eventually("credit used up", || {
        let (r1, u1) = stats(&server, "g1");
        let (r2, u2) = stats(&server, "g2");
        r1 + r2 == 16 && u1 + u2 == 4
    })
    .await;
    let got1 = drain(&mut c1).await;
    let got2 = drain(&mut c2).await;
    assert_eq!(got1.len() + got2.len(), 4, "4 shared by two consumers");
    let first = got1.first().or(got2.first()).unwrap();
    cch.basic_ack(first.delivery_tag, BasicAckOptions::default())
        .await
        .unwrap();
    let after = drain(&mut c1).await.len() + drain(&mut c2).await.len();
    assert_eq!(after, 1, "one ack frees one delivery");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_size_is_not_implemented_540() {
    let server = TestServer::start().await;
    let conn = server.amqprs().await;
    let (cb, mut rx) = events();
    conn.register_callback(cb).await.unwrap();
    let ch = conn.open_channel(None).await.unwrap();
    ch.basic_qos(BasicQosArguments::new(0, 10, false))
        .await
        .unwrap();
    let _ = ch.basic_qos(BasicQosArguments::new(4096, 10, false)).await;
    match next_ev(&mut rx).await {
        Ev::ConnectionClose(540, text) => {
            assert_eq!(text, "NOT_IMPLEMENTED - prefetch_size!=0 (4096)")
        }
        other => panic!("expected connection.close 540, got {other:?}"),
    }
    server.stop().await;
}

// ---- 9. requeue on close --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_messages_are_requeued_in_order_when_the_channel_closes() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "rq").await;
    for i in 0..6u8 {
        publish(&ch, "rq", &[i]).await;
    }
    let cch = conn.create_channel().await.unwrap();
    cch.basic_qos(4, BasicQosOptions::default()).await.unwrap();
    let mut c = consume(&cch, "rq", "c").await;
    let held = drain(&mut c).await;
    assert_eq!(held.len(), 4);
    held[1].ack(BasicAckOptions::default()).await.unwrap();
    // The freed credit brings the next message; 5 stays in the queue.
    assert_eq!(next(&mut c).await.data, vec![4]);
    cch.close(200, "bye".into()).await.unwrap();
    let mut seen = Vec::new();
    while let Some(m) = get(&ch, "rq").await {
        seen.push((m.data[0], m.redelivered));
    }
    assert_eq!(
        seen,
        vec![(0, true), (2, true), (3, true), (4, true), (5, false)],
        "requeued messages go back to their original places"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_messages_are_requeued_in_order_when_the_connection_closes() {
    let server = TestServer::start().await;
    let lapin = server.lapin().await;
    let ch = lapin.create_channel().await.unwrap();
    declare_queue(&ch, "cq").await;
    for i in 0..5u8 {
        publish(&ch, "cq", &[i]).await;
    }
    // A graceful close (amqprs).
    let amqprs = server.amqprs().await;
    let ach = amqprs.open_channel(None).await.unwrap();
    let (_, mut rx) = ach
        .basic_consume_rx(BasicConsumeArguments::new("cq", "a"))
        .await
        .unwrap();
    for i in 0..5u8 {
        let m = within("delivery", rx.recv()).await.unwrap();
        assert_eq!(m.content.unwrap(), vec![i]);
    }
    assert_eq!(stats(&server, "cq"), (0, 5));
    amqprs.close().await.unwrap();
    eventually("requeued after close", || stats(&server, "cq") == (5, 0)).await;

    // An abrupt one (the socket just goes away), after taking three of them.
    let mut raw = RawClient::connected(server.addr, 131_072).await;
    raw.open_channel(1).await;
    raw.call(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: 3,
            global: false,
        })),
    )
    .await;
    raw.call(1, raw_consume("cq", "raw", false)).await;
    for i in 0..3u8 {
        let d = raw.content().await;
        assert_eq!(d.body, vec![i]);
        let AMQPClass::Basic(basic::AMQPMethod::Deliver(deliver)) = d.method else {
            panic!("expected deliver");
        };
        assert!(deliver.redelivered);
    }
    drop(raw);
    eventually("requeued after drop", || stats(&server, "cq") == (5, 0)).await;
    let mut seen = Vec::new();
    while let Some(m) = get(&ch, "cq").await {
        assert!(m.redelivered);
        seen.push(m.data[0]);
    }
    assert_eq!(seen, vec![0, 1, 2, 3, 4]);
    server.stop().await;
}

// ---- 10. round robin ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_consumers_get_round_robin_delivery() {
    let server = TestServer::start().await;
    let conn = server.amqprs().await;
    let ch = conn.open_channel(None).await.unwrap();
    amqprs_declare(&ch, "rr").await;
    let (_, mut a) = ch
        .basic_consume_rx(BasicConsumeArguments::new("rr", "a"))
        .await
        .unwrap();
    let (_, mut b) = ch
        .basic_consume_rx(BasicConsumeArguments::new("rr", "b"))
        .await
        .unwrap();
    for i in 0..10u8 {
        amqprs_publish(&ch, "rr", &[i]).await;
    }
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    for _ in 0..5 {
        got_a.push(within("a", a.recv()).await.unwrap().content.unwrap()[0]);
        got_b.push(within("b", b.recv()).await.unwrap().content.unwrap()[0]);
    }
    let (even, odd) = if got_a[0] == 0 {
        (got_a, got_b)
    } else {
        (got_b, got_a)
    };
    assert_eq!(even, vec![0, 2, 4, 6, 8]);
    assert_eq!(odd, vec![1, 3, 5, 7, 9]);
    server.stop().await;
}

// ---- 11. publisher confirms -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_confirms_ack_every_publish_in_order() {
    let server = TestServer::start().await;
    let conn = server.amqprs().await;
    let ch = conn.open_channel(None).await.unwrap();
    amqprs_declare(&ch, "conf").await;
    let (cb, mut rx) = events();
    ch.register_callback(cb).await.unwrap();
    ch.confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    const N: u64 = 200;
    for i in 0..N {
        let rk = if i % 7 == 3 { "unroutable" } else { "conf" };
        amqprs_publish(&ch, rk, &i.to_be_bytes()).await;
    }
    let mut confirmed = 0;
    while confirmed < N {
        match next_ev(&mut rx).await {
            Ev::Ack(tag, multiple) => {
                assert!(tag > confirmed, "acks go forward: {tag} after {confirmed}");
                if !multiple {
                    assert_eq!(tag, confirmed + 1, "a single ack leaves no hole");
                }
                confirmed = tag;
            }
            other => panic!("expected basic.ack, got {other:?}"),
        }
    }
    assert_eq!(confirmed, N);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_publishes_is_all_confirmed() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "burst").await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirms = Vec::new();
    for i in 0..2000u32 {
        confirms.push(
            ch.basic_publish(
                "".into(),
                "burst".into(),
                BasicPublishOptions::default(),
                &i.to_be_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap(),
        );
    }
    for c in confirms {
        assert_eq!(
            within("confirm", c).await.unwrap(),
            lapin::Confirmation::Ack(None)
        );
    }
    assert!(ch.wait_for_confirms().await.unwrap().is_empty());
    assert_eq!(ready_count(&ch, "burst").await, 2000);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_and_tx_modes_exclude_each_other_406() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let tx = conn.create_channel().await.unwrap();
    tx.tx_select().await.unwrap();
    let err = tx
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), 406, "{err}");
    assert_eq!(
        text_of(&err),
        "PRECONDITION_FAILED - cannot switch from tx to confirm mode"
    );
    let confirm = conn.create_channel().await.unwrap();
    confirm
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let err = confirm.tx_select().await.unwrap_err();
    assert_eq!(code_of(&err), 406, "{err}");
    assert_eq!(
        text_of(&err),
        "PRECONDITION_FAILED - cannot switch from confirm to tx mode"
    );
    server.stop().await;
}

// ---- 12. transactions -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_publishes_are_invisible_until_commit_and_rollback_discards() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "txq").await;
    let txc = conn.create_channel().await.unwrap();
    txc.tx_select().await.unwrap();
    for i in 0..3u8 {
        publish(&txc, "txq", &[i]).await;
    }
    // A round trip on the tx channel: the publishes have been processed, yet not routed.
    assert_eq!(ready_count(&txc, "txq").await, 0);
    assert_eq!(ready_count(&ch, "txq").await, 0);
    txc.tx_commit().await.unwrap();
    assert_eq!(ready_count(&ch, "txq").await, 3);
    publish(&txc, "txq", b"x").await;
    publish(&txc, "txq", b"y").await;
    txc.tx_rollback().await.unwrap();
    txc.tx_commit().await.unwrap(); // nothing left to commit
    assert_eq!(ready_count(&ch, "txq").await, 3);
    let order: Vec<u8> = [
        get(&ch, "txq").await.unwrap().data[0],
        get(&ch, "txq").await.unwrap().data[0],
        get(&ch, "txq").await.unwrap().data[0],
    ]
    .into();
    assert_eq!(order, vec![0, 1, 2]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_acks_take_effect_at_commit() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "txa").await;
    for b in [b"a", b"b", b"c"] {
        publish(&ch, "txa", b).await;
    }
    // Ack inside a rolled-back transaction: the ack never happened.
    let t1 = conn.create_channel().await.unwrap();
    t1.tx_select().await.unwrap();
    let m = t1
        .basic_get("txa".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.data, b"a");
    t1.basic_ack(m.delivery_tag, BasicAckOptions::default())
        .await
        .unwrap();
    assert_eq!(stats(&server, "txa"), (2, 1), "the ack waits for commit");
    t1.tx_rollback().await.unwrap();
    t1.close(200, "bye".into()).await.unwrap();
    assert_eq!(ready_count(&ch, "txa").await, 3, "requeued on close");

    // Ack then commit: the message is gone.
    let t2 = conn.create_channel().await.unwrap();
    t2.tx_select().await.unwrap();
    let m = t2
        .basic_get("txa".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.data, b"a");
    assert!(m.redelivered);
    t2.basic_ack(m.delivery_tag, BasicAckOptions::default())
        .await
        .unwrap();
    t2.tx_commit().await.unwrap();
    assert_eq!(stats(&server, "txa"), (2, 0));
    t2.close(200, "bye".into()).await.unwrap();
    assert_eq!(ready_count(&ch, "txa").await, 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_commit_or_rollback_on_a_non_tx_channel_is_406() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    let err = ch.tx_commit().await.unwrap_err();
    assert_eq!(code_of(&err), 406, "{err}");
    assert_eq!(
        text_of(&err),
        "PRECONDITION_FAILED - channel is not transactional"
    );
    let ch = conn.create_channel().await.unwrap();
    let err = ch.tx_rollback().await.unwrap_err();
    assert_eq!(code_of(&err), 406, "{err}");
    server.stop().await;
}

// ---- 13. memory alarm -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_alarm_blocks_publishers_until_it_clears() {
    let server = TestServer::start().await;
    // lapin advertises the connection.blocked capability and reports it as events.
    let lapin = server.lapin().await;
    let mut lapin_events = lapin.events_listener();
    let ch = lapin.create_channel().await.unwrap();
    declare_queue(&ch, "held").await;
    // amqprs does not advertise connection.blocked (amqprs 2.1.5 sends only
    // consumer_cancel_notify), so like RabbitMQ we must not notify it.
    let amqprs = server.amqprs().await;
    let (cb, mut amqprs_events) = events();
    amqprs.register_callback(cb).await.unwrap();
    // The raw client advertises the capability and shows the broker stop reading.
    let mut raw = RawClient::connected(server.addr, 131_072).await;
    raw.open_channel(1).await;
    raw.publish_raw(1, "", "held", false, false, &[0, 0], b"before", 131_072)
        .await;
    eventually("first message routed", || stats(&server, "held").0 == 1).await;

    server.app.memory.set_limit(1);
    loop {
        match within("lapin connection.blocked", lapin_events.next())
            .await
            .unwrap()
        {
            lapin::Event::ConnectionBlocked(reason) => {
                assert_eq!(reason, "low on memory");
                break;
            }
            _ => continue,
        }
    }
    assert!(lapin.status().blocked());
    match within("raw connection.blocked", raw.method()).await {
        Some((0, AMQPClass::Connection(conn::AMQPMethod::Blocked(b)))) => {
            assert_eq!(b.reason.as_str(), "low on memory")
        }
        other => panic!("expected connection.blocked, got {other:?}"),
    }
    // A connection that has published is no longer read: this message waits.
    raw.publish_raw(1, "", "held", false, false, &[0, 0], b"during", 131_072)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        stats(&server, "held").0,
        1,
        "publish not read while blocked"
    );

    server.app.memory.set_limit(u64::MAX);
    loop {
        match within("lapin connection.unblocked", lapin_events.next())
            .await
            .unwrap()
        {
            lapin::Event::ConnectionUnblocked => break,
            _ => continue,
        }
    }
    match within("raw connection.unblocked", raw.method()).await {
        Some((0, AMQPClass::Connection(conn::AMQPMethod::Unblocked(_)))) => {}
        other => panic!("expected connection.unblocked, got {other:?}"),
    }
    eventually("held message arrives", || stats(&server, "held").0 == 2).await;
    assert_eq!(get(&ch, "held").await.unwrap().data, b"before");
    assert_eq!(get(&ch, "held").await.unwrap().data, b"during");
    assert!(
        amqprs_events.try_recv().is_err(),
        "no blocked/unblocked for a client without the capability"
    );
    drop(raw); // the server need not wait for a close-ok that will not come
    server.stop().await;
}

// ---- 14. in-process API ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_and_wire_clients_interoperate() {
    let server = TestServer::start().await;
    let mut local = LocalConnection::open(&server.app.broker, "/", "guest").unwrap();
    let mut lch = local.channel();
    lch.queue_declare("to-wire", false, false, false, FieldTable::default())
        .unwrap();
    lch.queue_declare("to-local", false, false, false, FieldTable::default())
        .unwrap();

    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    let mut wire = consume(&ch, "to-wire", "wire").await;
    lch.publish(
        "",
        "to-wire",
        false,
        &BasicProperties::default().with_correlation_id("from-local".into()),
        b"in-process says hi".to_vec(),
    )
    .unwrap();
    let d = next(&mut wire).await;
    assert_eq!(d.data, b"in-process says hi");
    assert_eq!(
        d.properties.correlation_id().as_ref().unwrap().as_str(),
        "from-local"
    );
    d.ack(BasicAckOptions::default()).await.unwrap();

    let tag = lch
        .consume("to-local", "local", false, FieldTable::default())
        .unwrap();
    assert_eq!(tag, "local");
    let mut headers = FieldTable::default();
    headers.insert(
        "who".into(),
        AMQPValue::LongString(LongString::from("lapin")),
    );
    ch.basic_publish(
        "".into(),
        "to-local".into(),
        BasicPublishOptions::default(),
        b"wire says hi",
        BasicProperties::default().with_headers(headers.clone()),
    )
    .await
    .unwrap();
    let event = within("in-process delivery", lch.next_event())
        .await
        .unwrap();
    let LocalEvent::Deliver(delivery) = event else {
        panic!("expected a delivery, got {event:?}");
    };
    assert_eq!(delivery.consumer_tag, "local");
    assert_eq!(&delivery.message.body[..], b"wire says hi");
    assert_eq!(
        delivery.message.decoded_properties().headers().as_ref(),
        Some(&headers)
    );
    lch.ack(delivery.delivery_tag, false).unwrap();
    assert_eq!(stats(&server, "to-local"), (0, 0));
    drop(lch);
    drop(local);
    server.stop().await;
}
