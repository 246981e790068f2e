//! RabbitMQ queue extensions, driven by real clients: `x-single-active-consumer`,
//! `x-max-length` / `x-max-length-bytes` with the `x-overflow` modes, dead-lettering with
//! `x-death`, TTLs, priorities, `x-expires`, `x-consumer-timeout`, direct reply-to and the
//! disk alarm.

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

fn s(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        other => panic!("not a string: {other:?}"),
    }
}

/// The `x-death` entries of a dead-lettered message: (queue, reason, count, exchange,
/// routing-keys), newest first; each entry also has a `time`.
fn x_death(props: &BasicProperties) -> Vec<(String, String, i64, String, Vec<String>)> {
    let headers = props.headers().as_ref().expect("headers");
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        panic!("no x-death in {headers:?}");
    };
    deaths
        .as_slice()
        .iter()
        .map(|d| {
            let AMQPValue::FieldTable(t) = d else {
                panic!("{d:?}")
            };
            let t = t.inner();
            assert!(
                matches!(t.get("time"), Some(AMQPValue::Timestamp(ts)) if *ts > 1_600_000_000),
                "{t:?}"
            );
            let count = match t.get("count") {
                Some(AMQPValue::LongLongInt(n)) => *n,
                other => panic!("count {other:?}"),
            };
            let AMQPValue::FieldArray(keys) = &t["routing-keys"] else {
                panic!()
            };
            (
                s(&t["queue"]),
                s(&t["reason"]),
                count,
                s(&t["exchange"]),
                keys.as_slice().iter().map(s).collect(),
            )
        })
        .collect()
}

fn header(props: &BasicProperties, name: &str) -> String {
    s(props
        .headers()
        .as_ref()
        .unwrap()
        .inner()
        .get(name)
        .unwrap_or_else(|| panic!("no {name}")))
}

/// The next message in `queue` through `basic.get` (polled, at most 2 s), acked by the
/// broker on delivery when `no_ack`.
async fn get(ch: &lapin::Channel, queue: &str, no_ack: bool) -> lapin::message::BasicGetMessage {
    for _ in 0..200 {
        if let Some(m) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack })
            .await
            .unwrap()
        {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("nothing arrived in {queue}");
}

async fn get_one(ch: &lapin::Channel, queue: &str) -> lapin::message::BasicGetMessage {
    get(ch, queue, true).await
}

async fn get_one_manual(ch: &lapin::Channel, queue: &str) -> lapin::message::BasicGetMessage {
    get(ch, queue, false).await
}

async fn dlx_setup(ch: &lapin::Channel) {
    ch.exchange_declare(
        "dlx".into(),
        lapin::ExchangeKind::Direct,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare(ch, "dlq", FieldTable::default()).await.unwrap();
    ch.queue_bind(
        "dlq".into(),
        "dlx".into(),
        "work".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_message_nacked_without_requeue_is_dead_lettered_with_its_x_death() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    dlx_setup(&ch).await;
    declare(
        &ch,
        "work",
        args(&[("x-dead-letter-exchange", text("dlx"))]),
    )
    .await
    .unwrap();
    let mut app = FieldTable::default();
    app.insert("app".into(), text("kept"));
    ch.basic_publish(
        "".into(),
        "work".into(),
        BasicPublishOptions::default(),
        b"payload",
        BasicProperties::default()
            .with_headers(app)
            .with_correlation_id("c-7".into()),
    )
    .await
    .unwrap();
    // Taken with manual ack, then nacked without requeue.
    let m = get_one_manual(&ch, "work").await;
    m.delivery
        .acker
        .nack(lapin::options::BasicNackOptions {
            requeue: false,
            multiple: false,
        })
        .await
        .unwrap();
    let dead = get_one(&ch, "dlq").await;
    assert_eq!(dead.delivery.data, b"payload");
    assert_eq!(dead.delivery.exchange.as_str(), "dlx");
    assert_eq!(dead.delivery.routing_key.as_str(), "work");
    let props = &dead.delivery.properties;
    assert_eq!(
        x_death(props),
        [(
            "work".to_string(),
            "rejected".to_string(),
            1,
            "".to_string(),
            vec!["work".to_string()]
        )]
    );
    for (h, v) in [
        ("x-first-death-reason", "rejected"),
        ("x-first-death-queue", "work"),
        ("x-first-death-exchange", ""),
        ("x-last-death-reason", "rejected"),
        ("x-last-death-queue", "work"),
        ("x-last-death-exchange", ""),
    ] {
        assert_eq!(header(props, h), v, "{h}");
    }
    assert!(ch
        .basic_get("work".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .is_none());

    // The first message's headers and properties survive dead-lettering too.
    ch.basic_publish(
        "".into(),
        "work".into(),
        BasicPublishOptions::default(),
        b"third",
        {
            let mut app = FieldTable::default();
            app.insert("app".into(), text("kept"));
            BasicProperties::default()
                .with_headers(app)
                .with_correlation_id("c-7".into())
        },
    )
    .await
    .unwrap();
    let m = get_one_manual(&ch, "work").await;
    m.delivery
        .acker
        .reject(lapin::options::BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    let dead = get_one(&ch, "dlq").await;
    assert_eq!(header(&dead.delivery.properties, "app"), "kept");
    assert_eq!(
        dead.delivery
            .properties
            .correlation_id()
            .as_ref()
            .unwrap()
            .as_str(),
        "c-7"
    );
    server.stop().await;
}

#[tokio::test]
async fn length_limits_dead_letter_with_reason_maxlen_and_routing_key_override() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    dlx_setup(&ch).await;
    declare(
        &ch,
        "short",
        args(&[
            ("x-max-length", AMQPValue::LongInt(1)),
            ("x-dead-letter-exchange", text("dlx")),
            ("x-dead-letter-routing-key", text("work")),
        ]),
    )
    .await
    .unwrap();
    assert!(publish_acked(&ch, "short", b"old").await);
    assert!(publish_acked(&ch, "short", b"new").await);
    let dead = get_one(&ch, "dlq").await;
    assert_eq!(dead.delivery.data, b"old");
    assert_eq!(
        dead.delivery.routing_key.as_str(),
        "work",
        "x-dead-letter-routing-key"
    );
    assert_eq!(
        x_death(&dead.delivery.properties),
        [(
            "short".to_string(),
            "maxlen".to_string(),
            1,
            "".to_string(),
            vec!["short".to_string()]
        )]
    );
    assert_eq!(drain(&ch, "short").await, ["new"]);

    declare(
        &ch,
        "full",
        args(&[
            ("x-max-length", AMQPValue::LongInt(1)),
            ("x-overflow", text("reject-publish-dlx")),
            ("x-dead-letter-exchange", text("dlx")),
            ("x-dead-letter-routing-key", text("work")),
        ]),
    )
    .await
    .unwrap();
    assert!(publish_acked(&ch, "full", b"kept").await);
    assert!(
        !publish_acked(&ch, "full", b"refused").await,
        "the publisher is nacked"
    );
    let dead = get_one(&ch, "dlq").await;
    assert_eq!(
        dead.delivery.data, b"refused",
        "and the refused message is dead-lettered"
    );
    assert_eq!(
        header(&dead.delivery.properties, "x-first-death-reason"),
        "maxlen"
    );
    server.stop().await;
}

#[tokio::test]
async fn dying_again_in_the_same_queue_counts_up_and_moves_the_entry_first() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    // work and retry dead-letter into each other through the default exchange.
    declare(
        &ch,
        "work",
        args(&[
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("retry")),
        ]),
    )
    .await
    .unwrap();
    declare(
        &ch,
        "retry",
        args(&[
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("work")),
        ]),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        "work".into(),
        BasicPublishOptions::default(),
        b"m",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    for queue in ["work", "retry", "work"] {
        let m = get_one_manual(&ch, queue).await;
        m.delivery
            .acker
            .nack(lapin::options::BasicNackOptions {
                requeue: false,
                multiple: false,
            })
            .await
            .unwrap();
    }
    let m = get_one(&ch, "retry").await;
    assert_eq!(
        x_death(&m.delivery.properties),
        [
            (
                "work".to_string(),
                "rejected".to_string(),
                2,
                "".to_string(),
                vec!["work".to_string()]
            ),
            (
                "retry".to_string(),
                "rejected".to_string(),
                1,
                "".to_string(),
                vec!["retry".to_string()]
            ),
        ]
    );
    assert_eq!(
        header(&m.delivery.properties, "x-first-death-queue"),
        "work"
    );
    assert_eq!(header(&m.delivery.properties, "x-last-death-queue"), "work");
    server.stop().await;
}

#[tokio::test]
async fn a_missing_dead_letter_exchange_drops_and_a_routing_key_alone_is_refused() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    declare(
        &ch,
        "orphan",
        args(&[("x-dead-letter-exchange", text("nowhere"))]),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        "orphan".into(),
        BasicPublishOptions::default(),
        b"m",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let m = get_one_manual(&ch, "orphan").await;
    m.delivery
        .acker
        .nack(lapin::options::BasicNackOptions {
            requeue: false,
            multiple: false,
        })
        .await
        .unwrap();
    assert!(
        drain(&ch, "orphan").await.is_empty(),
        "dropped, not requeued"
    );
    let text = expect_lapin_error(
        "routing key without exchange",
        declare(
            &ch,
            "half",
            args(&[("x-dead-letter-routing-key", text("k"))]),
        )
        .await,
        406,
    );
    assert!(text.contains("x-dead-letter-exchange is not"), "{text}");
    server.stop().await;
}

#[tokio::test]
async fn queue_ttl_expires_messages_into_the_dead_letter_exchange() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    dlx_setup(&ch).await;
    declare(
        &ch,
        "ttlq",
        args(&[
            ("x-message-ttl", AMQPValue::LongInt(50)),
            ("x-dead-letter-exchange", text("dlx")),
            ("x-dead-letter-routing-key", text("work")),
        ]),
    )
    .await
    .unwrap();
    for body in [&b"first"[..], b"second"] {
        ch.basic_publish(
            "".into(),
            "ttlq".into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    // Nobody reads ttlq: the broker expires them on its own.
    for want in [&b"first"[..], b"second"] {
        let dead = get_one(&ch, "dlq").await;
        assert_eq!(dead.delivery.data, want);
        assert_eq!(
            x_death(&dead.delivery.properties),
            [(
                "ttlq".to_string(),
                "expired".to_string(),
                1,
                "".to_string(),
                vec!["ttlq".to_string()]
            )]
        );
    }
    assert!(drain(&ch, "ttlq").await.is_empty());

    // Read in time, a message is delivered as usual.
    declare(
        &ch,
        "slow-ttl",
        args(&[("x-message-ttl", AMQPValue::LongInt(60_000))]),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        "slow-ttl".into(),
        BasicPublishOptions::default(),
        b"fresh",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    assert_eq!(get_one(&ch, "slow-ttl").await.delivery.data, b"fresh");
    server.stop().await;
}

#[tokio::test]
async fn per_message_expiration_is_moved_into_x_death_and_without_a_dlx_the_message_is_dropped() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    dlx_setup(&ch).await;
    declare(
        &ch,
        "px",
        args(&[
            ("x-dead-letter-exchange", text("dlx")),
            ("x-dead-letter-routing-key", text("work")),
        ]),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        "px".into(),
        BasicPublishOptions::default(),
        b"short-lived",
        BasicProperties::default().with_expiration("30".into()),
    )
    .await
    .unwrap();
    let dead = get_one(&ch, "dlq").await;
    assert_eq!(dead.delivery.data, b"short-lived");
    assert!(
        dead.delivery.properties.expiration().is_none(),
        "the expiration does not follow the message"
    );
    let headers = dead.delivery.properties.headers().as_ref().unwrap();
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        panic!()
    };
    let AMQPValue::FieldTable(entry) = &deaths.as_slice()[0] else {
        panic!()
    };
    assert_eq!(s(&entry.inner()["original-expiration"]), "30");
    assert_eq!(s(&entry.inner()["reason"]), "expired");

    declare(&ch, "no-dlx", FieldTable::default()).await.unwrap();
    ch.basic_publish(
        "".into(),
        "no-dlx".into(),
        BasicPublishOptions::default(),
        b"gone",
        BasicProperties::default().with_expiration("20".into()),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(drain(&ch, "no-dlx").await.is_empty(), "expired and dropped");
    server.stop().await;
}

#[tokio::test]
async fn an_invalid_expiration_or_ttl_is_a_406() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    declare(&ch, "q", FieldTable::default()).await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = ch
        .basic_publish(
            "".into(),
            "q".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default().with_expiration("soon".into()),
        )
        .await;
    let result = match confirm {
        Ok(c) => tokio::time::timeout(Duration::from_secs(10), c)
            .await
            .expect("an answer"),
        Err(e) => Err(e),
    };
    let text = expect_lapin_error("expiration 'soon'", result, 406);
    assert!(text.contains("invalid expiration 'soon'"), "{text}");
    let ch = conn.create_channel().await.unwrap();
    let text = expect_lapin_error(
        "negative ttl",
        declare(
            &ch,
            "neg",
            args(&[("x-message-ttl", AMQPValue::LongInt(-5))]),
        )
        .await,
        406,
    );
    assert!(text.contains("invalid arg 'x-message-ttl'"), "{text}");
    server.stop().await;
}

#[tokio::test]
async fn a_priority_queue_delivers_higher_priorities_first_and_caps_at_its_maximum() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    declare(
        &ch,
        "prio",
        args(&[("x-max-priority", AMQPValue::ShortShortUInt(5))]),
    )
    .await
    .unwrap();
    for (body, priority) in [
        ("p1", Some(1)),
        ("p5", Some(5)),
        ("p3", Some(3)),
        ("none", None),
        ("p9", Some(9)),
        ("p3b", Some(3)),
    ] {
        let props = match priority {
            Some(p) => BasicProperties::default().with_priority(p),
            None => BasicProperties::default(),
        };
        ch.basic_publish(
            "".into(),
            "prio".into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            props,
        )
        .await
        .unwrap();
    }
    // 9 counts as 5, after the earlier 5; equal priorities keep their order; none is 0.
    // The publishes went before this declare on the same channel, so all six are queued.
    let queued = declare(
        &ch,
        "prio",
        args(&[("x-max-priority", AMQPValue::ShortShortUInt(5))]),
    )
    .await
    .unwrap();
    assert_eq!(queued.message_count(), 6);
    let order = drain(&ch, "prio").await;
    assert_eq!(order, ["p5", "p9", "p3", "p3b", "p1", "none"]);

    // A requeued message goes back to its place among its priority.
    for (body, p) in [("low", 1u8), ("high", 4)] {
        ch.basic_publish(
            "".into(),
            "prio".into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default().with_priority(p),
        )
        .await
        .unwrap();
    }
    let high = get_one_manual(&ch, "prio").await;
    assert_eq!(high.delivery.data, b"high");
    high.delivery
        .acker
        .nack(lapin::options::BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await
        .unwrap();
    assert_eq!(drain(&ch, "prio").await, ["high", "low"]);

    let text = expect_lapin_error(
        "x-max-priority 300",
        declare(
            &ch,
            "prio-big",
            args(&[("x-max-priority", AMQPValue::ShortUInt(300))]),
        )
        .await,
        406,
    );
    assert!(text.contains("invalid arg 'x-max-priority'"), "{text}");
    server.stop().await;
}

// ---- x-expires, x-consumer-timeout, direct reply-to, the disk alarm -------------------------

/// Whether `name` exists, by a passive declare on a throwaway channel.
async fn exists(conn: &lapin::Connection, name: &str) -> bool {
    let ch = conn.create_channel().await.unwrap();
    let found = ch
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok();
    if found {
        let _ = ch.close(200, "bye".into()).await;
    }
    found
}

/// Whether `name` disappears within 5 s.
async fn gone(conn: &lapin::Connection, name: &str) -> bool {
    for _ in 0..100 {
        if !exists(conn, name).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn x_expires_deletes_a_queue_once_unused_and_consumers_keep_it() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    let lease = || args(&[("x-expires", AMQPValue::LongInt(300))]);
    declare(&ch, "idle", lease()).await.unwrap();
    declare(&ch, "watched", lease()).await.unwrap();
    ch.basic_publish(
        "".into(),
        "idle".into(),
        BasicPublishOptions::default(),
        b"lost with the queue",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let reader = conn.create_channel().await.unwrap();
    let _consumer = reader
        .basic_consume(
            "watched".into(),
            "w".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // The unused queue goes (publishing does not count as use); the consumed one stays.
    assert!(
        gone(&conn, "idle").await,
        "an unused x-expires queue is deleted"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(exists(&conn, "watched").await, "a consumer keeps it");
    // Once its last consumer goes, the lease starts again.
    reader
        .basic_cancel("w".into(), Default::default())
        .await
        .unwrap();
    assert!(gone(&conn, "watched").await, "deleted once unused again");
    for (value, why) in [
        (AMQPValue::LongInt(0), "{value_zero,0}"),
        (AMQPValue::LongInt(-5), "{value_negative,-5}"),
        (text("300"), "{unacceptable_type,longstr}"),
    ] {
        let ch = conn.create_channel().await.unwrap();
        let err = expect_lapin_error(
            "bad x-expires",
            declare(&ch, "bad-exp", args(&[("x-expires", value)])).await,
            406,
        );
        assert_eq!(
            err,
            format!("PRECONDITION_FAILED - invalid arg 'x-expires' for queue 'bad-exp' in vhost '/': {why}")
        );
    }
    server.stop().await;
}

/// Consumes `queue` with manual acks on a raw channel 1 and reads the first delivery.
async fn raw_consume_one(server: &TestServer, queue: &str) -> crate::support::RawClient {
    use amq_protocol::protocol::{basic, AMQPClass};
    let mut raw = crate::support::RawClient::connected(server.addr, 131_072).await;
    raw.open_channel(1).await;
    let reply = raw
        .call(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: queue.into(),
                consumer_tag: "slow".into(),
                no_local: false,
                no_ack: false,
                exclusive: false,
                nowait: false,
                arguments: FieldTable::default(),
            })),
        )
        .await;
    assert!(
        matches!(reply, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_))),
        "{reply:?}"
    );
    let delivery = raw.content().await;
    assert_eq!(delivery.body, b"work");
    raw
}

#[tokio::test]
async fn x_consumer_timeout_closes_the_channel_and_requeues_but_there_is_no_default() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    declare(
        &ch,
        "timed",
        args(&[("x-consumer-timeout", AMQPValue::LongInt(500))]),
    )
    .await
    .unwrap();
    declare(&ch, "untimed", FieldTable::default())
        .await
        .unwrap();
    for q in ["timed", "untimed"] {
        assert!(publish_acked_on(&ch, q, b"work").await);
    }
    let mut slow = raw_consume_one(&server, "timed").await;
    let text = slow.expect_channel_close(1, 406).await;
    assert_eq!(
        text,
        "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. Timeout value used: 500 ms. This timeout value can be configured, see consumers doc guide to learn more"
    );
    let back = get(&ch, "timed", true).await;
    assert!(
        back.delivery.redelivered,
        "the unacked delivery is requeued"
    );
    // Without x-consumer-timeout a delivery may stay unacked as long as the step runs.
    let mut patient = raw_consume_one(&server, "untimed").await;
    assert!(
        patient
            .next_frame_within(Duration::from_millis(2500))
            .await
            .is_err(),
        "no frame (no channel.close) while a delivery is held without a timeout"
    );
    let ch = conn.create_channel().await.unwrap();
    let err = expect_lapin_error(
        "negative timeout",
        declare(
            &ch,
            "bad-timeout",
            args(&[("x-consumer-timeout", AMQPValue::LongInt(-1))]),
        )
        .await,
        406,
    );
    assert!(err.contains("'x-consumer-timeout'"), "{err}");
    drop((slow, patient));
    server.stop().await;
}

async fn publish_acked_on(ch: &lapin::Channel, queue: &str, body: &[u8]) -> bool {
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    publish_acked(ch, queue, body).await
}

#[tokio::test]
async fn direct_reply_to_routes_replies_to_the_requesting_channel() {
    let server = TestServer::start().await;
    let requester = server.lapin().await;
    let responder = server.lapin().await;
    let resp = responder.create_channel().await.unwrap();
    declare(&resp, "rpc", FieldTable::default()).await.unwrap();

    // Publishing with reply_to = amq.rabbitmq.reply-to needs the reply consumer first (a raw
    // client reads the channel.close deterministically).
    let mut raw = crate::support::RawClient::connected(server.addr, 131_072).await;
    raw.open_channel(1).await;
    let props = mqic::amqp::message::encode_properties(
        &amq_protocol::protocol::basic::AMQPProperties::default()
            .with_reply_to("amq.rabbitmq.reply-to".into()),
    );
    raw.publish_raw(1, "", "rpc", false, false, &props, b"early", 131_072)
        .await;
    assert_eq!(
        raw.expect_channel_close(1, 406).await,
        "PRECONDITION_FAILED - fast reply consumer does not exist"
    );
    drop(raw);
    let req = requester.create_channel().await.unwrap();
    let err = expect_lapin_error(
        "acking reply consumer",
        req.basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "r".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await,
        406,
    );
    assert_eq!(
        err,
        "PRECONDITION_FAILED - reply consumer cannot acknowledge"
    );

    let req = requester.create_channel().await.unwrap();
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut replies = req
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "replies".into(),
            no_ack,
            FieldTable::default(),
        )
        .await
        .unwrap();
    req.basic_publish(
        "".into(),
        "rpc".into(),
        BasicPublishOptions::default(),
        b"question",
        BasicProperties::default()
            .with_reply_to("amq.rabbitmq.reply-to".into())
            .with_correlation_id("c-1".into()),
    )
    .await
    .unwrap();

    let request = get(&resp, "rpc", true).await;
    let reply_to = request
        .delivery
        .properties
        .reply_to()
        .as_ref()
        .expect("reply_to kept")
        .to_string();
    assert!(
        reply_to.starts_with("amq.rabbitmq.reply-to.") && reply_to.len() > 22,
        "rewritten to a name of its own: {reply_to}"
    );
    // A responder may check the requester is there; binding the name is refused.
    assert!(exists(&responder, &reply_to).await);
    let ch = responder.create_channel().await.unwrap();
    let err = expect_lapin_error(
        "bind reply queue",
        ch.queue_bind(
            reply_to.as_str().into(),
            "amq.direct".into(),
            "k".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await,
        403,
    );
    assert!(err.contains("direct reply-to"), "{err}");

    resp.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = resp
        .basic_publish(
            "".into(),
            reply_to.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"answer",
            BasicProperties::default().with_correlation_id("c-1".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(confirm, lapin::Confirmation::Ack(None));
    let reply = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .expect("the reply arrives")
        .unwrap()
        .unwrap();
    assert_eq!(reply.data, b"answer");
    assert_eq!(reply.routing_key.as_str(), reply_to);

    // One reply consumer per channel.
    let err = expect_lapin_error(
        "second reply consumer",
        req.basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "again".into(),
            no_ack,
            FieldTable::default(),
        )
        .await,
        406,
    );
    assert_eq!(err, "PRECONDITION_FAILED - reply consumer already set");

    // After the requester has gone, a mandatory reply still counts as routed (no return).
    requester.close(200, "bye".into()).await.unwrap();
    assert!(
        gone(&responder, &reply_to).await,
        "the reply queue goes with its requester"
    );
    let confirm = resp
        .basic_publish(
            "".into(),
            reply_to.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"late",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(confirm, lapin::Confirmation::Ack(None), "no basic.return");
    server.stop().await;
}

#[tokio::test]
async fn low_disk_space_blocks_publishers_until_it_clears() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let mut events = conn.events_listener();
    server.app.disk.set_limit(u64::MAX);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("connection.blocked within 10 s")
            .unwrap()
        {
            lapin::Event::ConnectionBlocked(reason) => {
                assert_eq!(reason, "low on disk");
                break;
            }
            _ => continue,
        }
    }
    server.app.disk.set_limit(0);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("connection.unblocked within 10 s")
            .unwrap()
        {
            lapin::Event::ConnectionUnblocked => break,
            _ => continue,
        }
    }
    server.stop().await;
}
