//! RabbitMQ queue extensions, driven by real clients: `x-single-active-consumer` and
//! `x-max-length` / `x-max-length-bytes` with the `x-overflow` modes. (Dead-lettering, TTLs
//! and durability arrive with the rest of the durability issue.)

use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

use crate::support::{expect_lapin_error, TestServer};

fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

async fn declare(
    ch: &lapin::Channel,
    name: &str,
    arguments: FieldTable,
) -> lapin::Result<lapin::Queue> {
    ch.queue_declare(name.into(), QueueDeclareOptions::default(), arguments)
        .await
}

/// Publishes with confirms on; true for `basic.ack`, false for `basic.nack`.
async fn publish_acked(ch: &lapin::Channel, queue: &str, body: &[u8]) -> bool {
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        )
        .await
        .unwrap();
    let confirmation = tokio::time::timeout(Duration::from_secs(10), confirm)
        .await
        .expect("a confirm within 10 s")
        .unwrap();
    confirmation.is_ack()
}

async fn drain(ch: &lapin::Channel, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        out.push(String::from_utf8(m.delivery.data.clone()).unwrap());
    }
    out
}

#[tokio::test]
async fn max_length_drop_head_keeps_the_newest_messages() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    declare(&ch, "ml", args(&[("x-max-length", AMQPValue::LongInt(3))]))
        .await
        .unwrap();
    for i in 1..=5 {
        assert!(
            publish_acked(&ch, "ml", format!("m{i}").as_bytes()).await,
            "drop-head acks every publish"
        );
    }
    assert_eq!(drain(&ch, "ml").await, ["m3", "m4", "m5"]);
    server.stop().await;
}

#[tokio::test]
async fn max_length_bytes_drops_from_the_head_by_body_size() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    declare(
        &ch,
        "mlb",
        args(&[("x-max-length-bytes", AMQPValue::ShortUInt(10))]),
    )
    .await
    .unwrap();
    for body in ["aaaa", "bbbb", "cccc"] {
        assert!(publish_acked(&ch, "mlb", body.as_bytes()).await);
    }
    assert_eq!(drain(&ch, "mlb").await, ["bbbb", "cccc"]);
    server.stop().await;
}

#[tokio::test]
async fn reject_publish_nacks_the_publisher_when_the_queue_is_full() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for (queue, mode) in [("rp", "reject-publish"), ("rpd", "reject-publish-dlx")] {
        declare(
            &ch,
            queue,
            args(&[
                ("x-max-length", AMQPValue::LongLongInt(2)),
                ("x-overflow", text(mode)),
            ]),
        )
        .await
        .unwrap();
        assert!(publish_acked(&ch, queue, b"one").await);
        assert!(publish_acked(&ch, queue, b"two").await);
        assert!(
            !publish_acked(&ch, queue, b"three").await,
            "{mode}: nacked when full"
        );
        assert_eq!(drain(&ch, queue).await, ["one", "two"]);
        assert!(
            publish_acked(&ch, queue, b"four").await,
            "{mode}: room again after the drain"
        );
        assert_eq!(drain(&ch, queue).await, ["four"]);
    }
    server.stop().await;
}

#[tokio::test]
async fn length_arguments_of_the_wrong_type_or_value_are_refused_naming_the_argument() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let cases: Vec<(&str, FieldTable, &str)> = vec![
        ("bad1", args(&[("x-max-length", text("ten"))]), "invalid arg 'x-max-length' for queue 'bad1' in vhost '/': {unacceptable_type,longstr}"),
        ("bad2", args(&[("x-max-length", AMQPValue::LongInt(-1))]), "invalid arg 'x-max-length' for queue 'bad2' in vhost '/': {value_negative,-1}"),
        ("bad3", args(&[("x-overflow", text("explode"))]), "invalid arg 'x-overflow'"),
        ("bad4", args(&[("x-single-active-consumer", text("yes"))]), "invalid arg 'x-single-active-consumer' for queue 'bad4' in vhost '/': {unacceptable_type,longstr}"),
        ("bad5", args(&[("x-max-length-bytes", AMQPValue::Double(1.5))]), "invalid arg 'x-max-length-bytes'"),
    ];
    for (name, arguments, want) in cases {
        let ch = conn.create_channel().await.unwrap();
        let text = expect_lapin_error(name, declare(&ch, name, arguments).await, 406);
        assert!(text.contains(want), "{name}: {text}");
    }
    server.stop().await;
}

#[tokio::test]
async fn single_active_consumer_serves_one_consumer_and_the_next_takes_over() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let setup = conn.create_channel().await.unwrap();
    declare(
        &setup,
        "sac",
        args(&[("x-single-active-consumer", AMQPValue::Boolean(true))]),
    )
    .await
    .unwrap();
    let first = conn.create_channel().await.unwrap();
    let second = conn.create_channel().await.unwrap();
    for ch in [&first, &second] {
        ch.basic_qos(100, BasicQosOptions::default()).await.unwrap();
    }
    let mut a = first
        .basic_consume(
            "sac".into(),
            "a".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut b = second
        .basic_consume(
            "sac".into(),
            "b".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let declared = declare(
        &setup,
        "sac",
        args(&[("x-single-active-consumer", AMQPValue::Boolean(true))]),
    )
    .await
    .unwrap();
    assert_eq!(
        declared.consumer_count(),
        2,
        "declare-ok counts every consumer"
    );
    for i in 0..6 {
        setup
            .basic_publish(
                "".into(),
                "sac".into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap();
    }
    let mut got_a = Vec::new();
    while got_a.len() < 6 {
        let d = tokio::time::timeout(Duration::from_secs(10), a.next())
            .await
            .expect("the active consumer gets every message")
            .unwrap()
            .unwrap();
        got_a.push(d);
    }
    // Nothing reached the waiting consumer.
    assert!(tokio::time::timeout(Duration::from_millis(300), b.next())
        .await
        .is_err());
    // The active consumer acks two and goes away: the four unacked go to the next in line.
    got_a[1]
        .acker
        .ack(lapin::options::BasicAckOptions { multiple: true })
        .await
        .unwrap();
    first.close(200, "bye".into()).await.unwrap();
    let mut got_b = Vec::new();
    while got_b.len() < 4 {
        let d = tokio::time::timeout(Duration::from_secs(10), b.next())
            .await
            .expect("the next consumer takes over")
            .unwrap()
            .unwrap();
        assert!(d.redelivered);
        got_b.push(String::from_utf8(d.data.clone()).unwrap());
    }
    assert_eq!(got_b, ["m2", "m3", "m4", "m5"]);
    let text = expect_lapin_error(
        "basic.get on a single-active-consumer queue",
        setup
            .basic_get("sac".into(), BasicGetOptions::default())
            .await,
        405,
    );
    assert!(text.contains("single active consumer"), "{text}");
    server.stop().await;
}
