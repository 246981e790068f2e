//! Topology: exchanges, queues and bindings as RabbitMQ 3.x manages them (reference §1.2,
//! §1.3, §1.7), driven through lapin and amqprs. Routing is observed with `basic.get` and
//! consumers; errors by the reply code (and RabbitMQ's text where it is known) of the
//! `channel.close` the broker sends.

use amqprs::channel::{
    BasicCancelArguments, BasicConsumeArguments, BasicGetArguments, BasicPublishArguments,
    Channel as AmqprsChannel, ExchangeDeclareArguments, ExchangeDeleteArguments,
    QueueBindArguments, QueueDeclareArguments, QueueUnbindArguments,
};
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};

use crate::support::{
    amqprs_watched_channel, declare_queue, expect_amqprs_close, expect_lapin_error,
    expect_lapin_reply, lapin_reply, publish_confirmed, within, TestServer,
};

const ACCESS_REFUSED: u16 = 403;
const NOT_FOUND: u16 = 404;
const RESOURCE_LOCKED: u16 = 405;
const PRECONDITION_FAILED: u16 = 406;

// ---- lapin helpers ------------------------------------------------------------------------

async fn channel(conn: &Connection) -> Channel {
    conn.create_channel().await.expect("lapin opens a channel")
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn longstr(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

async fn declare_exchange(ch: &Channel, name: &str, kind: ExchangeKind) {
    ch.exchange_declare(
        name.into(),
        kind,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("declare exchange {name}: {e}"));
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str, args: FieldTable) {
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        args,
    )
    .await
    .unwrap_or_else(|e| panic!("bind {queue} to {exchange} with {key:?}: {e}"));
}

/// Publishes and waits until the frames are written; the connection handles its frames in
/// order, so a later method on the same connection sees the message routed.
async fn publish_props(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &str,
    properties: BasicProperties,
) {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body.as_bytes(),
        properties,
    )
    .await
    .unwrap_or_else(|e| panic!("publish to {exchange:?} with {key:?}: {e}"));
}

async fn publish(ch: &Channel, exchange: &str, key: &str, body: &str) {
    publish_props(ch, exchange, key, body, BasicProperties::default()).await;
}

/// Takes every ready message of `queue` with `basic.get` (no-ack); returns the bodies in
/// queue order.
async fn drain(ch: &Channel, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap_or_else(|e| panic!("basic.get {queue}: {e}"))
    {
        out.push(String::from_utf8(m.delivery.data).unwrap());
    }
    out
}

async fn queue_exists(conn: &Connection, name: &str) -> bool {
    let ch = channel(conn).await;
    match ch
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
    {
        Ok(_) => {
            let _ = ch.close(200, "ok".into()).await;
            true
        }
        Err(e) => {
            assert_eq!(lapin_reply(&e).0, NOT_FOUND, "{e}");
            false
        }
    }
}

async fn exchange_exists(conn: &Connection, name: &str) -> bool {
    let ch = channel(conn).await;
    match ch
        .exchange_declare(
            name.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
    {
        Ok(()) => {
            let _ = ch.close(200, "ok".into()).await;
            true
        }
        Err(e) => {
            assert_eq!(lapin_reply(&e).0, NOT_FOUND, "{e}");
            false
        }
    }
}

// ---- amqprs helpers -----------------------------------------------------------------------

async fn rs_declare_queue(ch: &AmqprsChannel, args: QueueDeclareArguments) -> (String, u32, u32) {
    ch.queue_declare(args)
        .await
        .expect("amqprs queue.declare")
        .expect("declare-ok (not nowait)")
}

async fn rs_bind(ch: &AmqprsChannel, queue: &str, exchange: &str, key: &str) {
    ch.queue_bind(QueueBindArguments::new(queue, exchange, key))
        .await
        .unwrap_or_else(|e| panic!("bind {queue} to {exchange} with {key:?}: {e}"));
}

async fn rs_publish(ch: &AmqprsChannel, exchange: &str, key: &str, body: &str) {
    ch.basic_publish(
        amqprs::BasicProperties::default(),
        body.as_bytes().to_vec(),
        BasicPublishArguments::new(exchange, key),
    )
    .await
    .unwrap_or_else(|e| panic!("publish to {exchange:?} with {key:?}: {e}"));
}

/// Starts an auto-ack consumer; returns its tag and its delivery receiver.
async fn rs_consume(
    ch: &AmqprsChannel,
    queue: &str,
    tag: &str,
) -> (
    String,
    tokio::sync::mpsc::UnboundedReceiver<amqprs::channel::ConsumerMessage>,
) {
    ch.basic_consume_rx(
        BasicConsumeArguments::new(queue, tag)
            .auto_ack(true)
            .finish(),
    )
    .await
    .unwrap_or_else(|e| panic!("consume {queue} as {tag}: {e}"))
}

async fn rs_drain(ch: &AmqprsChannel, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some((_, _, body)) = ch
        .basic_get(BasicGetArguments::new(queue).no_ack(true).finish())
        .await
        .unwrap_or_else(|e| panic!("basic.get {queue}: {e}"))
    {
        out.push(String::from_utf8(body).unwrap());
    }
    out
}

// ---- Exchanges ----------------------------------------------------------------------------

/// Scenario 1. The predeclared exchanges exist. `""` is checked by publishing through it:
/// RabbitMQ refuses even a passive declare of the default exchange (errata §14,
/// `rabbit_channel` calls `check_not_default_exchange` for passive declares too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predeclared_exchanges_exist() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = channel(&conn).await;
    for (name, kind) in [
        ("amq.direct", ExchangeKind::Direct),
        ("amq.fanout", ExchangeKind::Fanout),
        ("amq.topic", ExchangeKind::Topic),
        ("amq.headers", ExchangeKind::Headers),
        ("amq.match", ExchangeKind::Headers),
    ] {
        ch.exchange_declare(
            name.into(),
            kind.clone(),
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("passive declare of {name}: {e}"));
        // Redeclaring with the same (durable) shape is also fine; amq.* is only reserved
        // for creation.
        ch.exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("equivalent redeclare of {name}: {e}"));
    }

    // The default exchange routes to the queue named by the routing key.
    let q = declare_queue(&ch, "via-default").await;
    publish(&ch, "", &q, "to the default exchange").await;
    assert_eq!(drain(&ch, &q).await, ["to the default exchange"]);

    let ch2 = channel(&conn).await;
    expect_lapin_reply(
        "passive declare of the default exchange",
        ch2.exchange_declare(
            "".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await,
        ACCESS_REFUSED,
        "ACCESS_REFUSED - operation not permitted on the default exchange",
    );
    conn.close(200, "bye".into()).await.unwrap();
    server.stop().await;
}

/// Scenario 2, direct: exact routing-key match, several queues per key, several keys per queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_exchange_routes_by_exact_key() {
    let server = TestServer::start().await;
    let conn = server.amqprs().await;
    let ch = conn.open_channel(None).await.unwrap();
    ch.exchange_declare(ExchangeDeclareArguments::new("dx", "direct"))
        .await
        .unwrap();
    for q in ["d1", "d2", "d3"] {
        rs_declare_queue(&ch, QueueDeclareArguments::new(q)).await;
    }
    rs_bind(&ch, "d1", "dx", "k1").await;
    rs_bind(&ch, "d2", "dx", "k1").await;
    rs_bind(&ch, "d2", "dx", "k2").await;
    rs_bind(&ch, "d3", "amq.direct", "k1").await;
    rs_publish(&ch, "dx", "k1", "m1").await;
    rs_publish(&ch, "dx", "k2", "m2").await;
    rs_publish(&ch, "dx", "K1", "wrong case").await;
    rs_publish(&ch, "dx", "k1.x", "longer key").await;
    rs_publish(&ch, "amq.direct", "k1", "m3").await;
    assert_eq!(rs_drain(&ch, "d1").await, ["m1"]);
    assert_eq!(rs_drain(&ch, "d2").await, ["m1", "m2"]);
    assert_eq!(rs_drain(&ch, "d3").await, ["m3"]);
    ch.close().await.unwrap();
    conn.close().await.unwrap();
    server.stop().await;
}

/// Scenario 2, fanout: every bound queue gets a copy whatever the keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_exchange_copies_to_every_bound_queue() {
    let server = TestServer::start().await;
    let conn = server.amqprs().await;
    let ch = conn.open_channel(None).await.unwrap();
    ch.exchange_declare(ExchangeDeclareArguments::new("fx", "fanout"))
        .await
        .unwrap();
    for q in ["f1", "f2", "f3", "unbound"] {
        rs_declare_queue(&ch, QueueDeclareArguments::new(q)).await;
    }
    rs_bind(&ch, "f1", "fx", "").await;
    rs_bind(&ch, "f2", "fx", "some.key").await;
    rs_bind(&ch, "f3", "amq.fanout", "x").await;
    rs_publish(&ch, "fx", "anything", "a").await;
    rs_publish(&ch, "fx", "", "b").await;
    rs_publish(&ch, "amq.fanout", "whatever", "c").await;
    assert_eq!(rs_drain(&ch, "f1").await, ["a", "b"]);
    assert_eq!(rs_drain(&ch, "f2").await, ["a", "b"]);
    assert_eq!(rs_drain(&ch, "f3").await, ["c"]);
    assert!(rs_drain(&ch, "unbound").await.is_empty());
    ch.close().await.unwrap();
    conn.close().await.unwrap();
    server.stop().await;
}

/// Scenario 2, topic: `*` is exactly one word, `#` zero or more (also zero at the end, in the
/// middle, and the empty key for `#`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_exchange_matches_star_and_hash() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = channel(&conn).await;
    declare_exchange(&ch, "tx", ExchangeKind::Topic).await;
    for (q, pattern) in [
        ("star", "case.*.done"),
        ("tail", "case.#"),
        ("all", "#"),
        ("middle", "a.#.z"),
        ("exact", "case"),
    ] {
        declare_queue(&ch, q).await;
        bind(&ch, q, "tx", pattern, FieldTable::default()).await;
    }
    for key in [
        "case.c1.done",
        "case",
        "case.c1.c2.done",
        "case.done",
        "a.z",
        "a.b.c.z",
        "a.b.c",
        "other",
        "",
    ] {
        publish(&ch, "tx", key, key).await;
    }
    assert_eq!(drain(&ch, "star").await, ["case.c1.done"]);
    assert_eq!(
        drain(&ch, "tail").await,
        ["case.c1.done", "case", "case.c1.c2.done", "case.done"],
        "'case.#' matches 'case' itself (# is zero words)"
    );
    assert_eq!(
        drain(&ch, "all").await,
        [
            "case.c1.done",
            "case",
            "case.c1.c2.done",
            "case.done",
            "a.z",
            "a.b.c.z",
            "a.b.c",
            "other",
            ""
        ]
    );
    assert_eq!(drain(&ch, "middle").await, ["a.z", "a.b.c.z"]);
    assert_eq!(drain(&ch, "exact").await, ["case"]);
    conn.close(200, "bye".into()).await.unwrap();
    server.stop().await;
}

/// Scenario 2, headers: `x-match` all (the default) and any, typed values compared by value
/// as RabbitMQ does (`PV == DV`: integer widths do not matter, a string is not a number), a
/// void binding value meaning "present", and `x-` keys ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_exchange_all_any_and_typed_values() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = channel(&conn).await;
    declare_exchange(&ch, "hx", ExchangeKind::Headers).await;
    let bindings = [
        (
            "h-all",
            table(&[
                ("x-match", longstr("all")),
                ("format", longstr("pdf")),
                ("type", longstr("report")),
            ]),
        ),
        (
            "h-default",
            table(&[("format", longstr("pdf")), ("type", longstr("report"))]),
        ),
        (
            "h-any",
            table(&[
                ("x-match", longstr("any")),
                ("format", longstr("pdf")),
                ("type", longstr("report")),
            ]),
        ),
        (
            "h-typed",
            table(&[
                ("x-match", longstr("all")),
                ("n", AMQPValue::LongInt(5)),
                ("flag", AMQPValue::Boolean(true)),
                ("x-ignored", longstr("not compared")),
            ]),
        ),
        ("h-present", table(&[("seen", AMQPValue::Void)])),
    ];
    for (q, args) in &bindings {
        declare_queue(&ch, q).await;
        bind(&ch, q, "hx", "ignored-key", args.clone()).await;
    }
    let messages = [
        (
            "pdf-report",
            table(&[
                ("format", longstr("pdf")),
                ("type", longstr("report")),
                ("extra", longstr("y")),
            ]),
        ),
        ("pdf-only", table(&[("format", longstr("pdf"))])),
        ("log", table(&[("type", longstr("log"))])),
        (
            "n5-long",
            table(&[
                ("n", AMQPValue::LongLongInt(5)),
                ("flag", AMQPValue::Boolean(true)),
            ]),
        ),
        (
            "n6",
            table(&[
                ("n", AMQPValue::LongInt(6)),
                ("flag", AMQPValue::Boolean(true)),
            ]),
        ),
        (
            "n5-string",
            table(&[("n", longstr("5")), ("flag", AMQPValue::Boolean(true))]),
        ),
        (
            "n5-flag-false",
            table(&[
                ("n", AMQPValue::LongInt(5)),
                ("flag", AMQPValue::Boolean(false)),
            ]),
        ),
        ("seen", table(&[("seen", longstr("any value"))])),
    ];
    for (body, headers) in messages {
        publish_props(
            &ch,
            "hx",
            "",
            body,
            BasicProperties::default().with_headers(headers),
        )
        .await;
    }
    publish(&ch, "hx", "", "no-headers").await;
    assert_eq!(drain(&ch, "h-all").await, ["pdf-report"]);
    assert_eq!(drain(&ch, "h-default").await, ["pdf-report"]);
    assert_eq!(drain(&ch, "h-any").await, ["pdf-report", "pdf-only"]);
    assert_eq!(drain(&ch, "h-typed").await, ["n5-long"]);
    assert_eq!(drain(&ch, "h-present").await, ["seen"]);

    // An x-match value RabbitMQ does not know is refused when binding.
    let ch2 = channel(&conn).await;
    let text = expect_lapin_error(
        "bind with x-match=some",
        ch2.queue_bind(
            "h-all".into(),
            "hx".into(),
            "".into(),
            QueueBindOptions::default(),
            table(&[("x-match", longstr("some"))]),
        )
        .await,
        PRECONDITION_FAILED,
    );
    assert!(text.contains("Invalid x-match field value"), "{text}");
    conn.close(200, "bye".into()).await.unwrap();
    server.stop().await;
}

/// Scenario 3. Passive declare of a missing exchange is 404; the durable, auto-delete and
/// internal flags are accepted; publishing to an internal exchange is 403; an auto-delete
/// exchange goes away when its last binding is removed (and not before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_passive_flags_internal_and_auto_delete() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = channel(&conn).await;
    expect_lapin_reply(
        "passive declare of a missing exchange",
        ch.exchange_declare(
            "no-such-exchange".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await,
        NOT_FOUND,
        "NOT_FOUND - no exchange 'no-such-exchange' in vhost '/'",
    );

    let ch = channel(&conn).await;
    let flags = ExchangeDeclareOptions {
        durable: true,
        auto_delete: true,
        internal: true,
        ..Default::default()
    };
    for _ in 0..2 {
        // The second declare is an equivalent redeclare.
        ch.exchange_declare(
            "flagged".into(),
            ExchangeKind::Fanout,
            flags,
            FieldTable::default(),
        )
        .await
        .expect("durable + auto-delete + internal is accepted");
    }
    assert!(exchange_exists(&conn, "flagged").await);

    // An internal exchange can still be the destination of an exchange-to-exchange binding.
    declare_queue(&ch, "behind-internal").await;
    bind(&ch, "behind-internal", "flagged", "", FieldTable::default()).await;
    ch.exchange_bind(
        "flagged".into(),
        "amq.fanout".into(),
        "".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish(&ch, "amq.fanout", "", "through amq.fanout").await;
    assert_eq!(drain(&ch, "behind-internal").await, ["through amq.fanout"]);

    let pch = channel(&conn).await;
    expect_lapin_reply(
        "publish to an internal exchange",
        publish_confirmed(&pch, "flagged", "", b"refused").await,
        ACCESS_REFUSED,
        "ACCESS_REFUSED - cannot publish to internal exchange 'flagged' in vhost '/'",
    );
    assert!(drain(&ch, "behind-internal").await.is_empty());

    // Auto-delete: two bindings; the exchange survives the first unbind, not the second.
    declare_exchange_with(&ch, "ad-x", ExchangeKind::Direct, true).await;
    declare_queue(&ch, "ad-q1").await;
    declare_queue(&ch, "ad-q2").await;
    bind(&ch, "ad-q1", "ad-x", "k", FieldTable::default()).await;
    bind(&ch, "ad-q2", "ad-x", "k", FieldTable::default()).await;
    ch.queue_unbind(
        "ad-q1".into(),
        "ad-x".into(),
        "k".into(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    assert!(exchange_exists(&conn, "ad-x").await, "one binding left");
    ch.queue_unbind(
        "ad-q2".into(),
        "ad-x".into(),
        "k".into(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    assert!(
        !exchange_exists(&conn, "ad-x").await,
        "auto-delete exchange is gone with its last binding"
    );

    // Deleting the last bound queue removes the binding, and so the exchange too.
    declare_exchange_with(&ch, "ad-y", ExchangeKind::Fanout, true).await;
    declare_queue(&ch, "ad-q3").await;
    bind(&ch, "ad-q3", "ad-y", "", FieldTable::default()).await;
    ch.queue_delete("ad-q3".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    assert!(!exchange_exists(&conn, "ad-y").await);

    // An auto-delete exchange that never had a binding stays.
    declare_exchange_with(&ch, "ad-unused", ExchangeKind::Topic, true).await;
    assert!(exchange_exists(&conn, "ad-unused").await);
    conn.close(200, "bye".into()).await.unwrap();
    server.stop().await;
}

async fn declare_exchange_with(ch: &Channel, name: &str, kind: ExchangeKind, auto_delete: bool) {
    ch.exchange_declare(
        name.into(),
        kind,
        ExchangeDeclareOptions {
            auto_delete,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("declare exchange {name}: {e}"));
}

/// Scenario 4. `alternate-exchange`: what the exchange cannot route goes to the AE's queues;
/// what it can route does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alternate_exchange_takes_unroutable_messages() {
    let server = TestServer::start().await;
    let conn = server.amqprs().await;
    let ch = conn.open_channel(None).await.unwrap();
    ch.exchange_declare(ExchangeDeclareArguments::new("ae", "fanout"))
        .await
        .unwrap();
    let mut args = amqprs::FieldTable::new();
    args.insert(
        "alternate-exchange".try_into().unwrap(),
        amqprs::FieldValue::from("ae"),
    );
    ch.exchange_declare(
        ExchangeDeclareArguments::new("with-ae", "direct")
            .arguments(args)
            .finish(),
    )
    .await
    .unwrap();
    rs_declare_queue(&ch, QueueDeclareArguments::new("routed")).await;
    rs_declare_queue(&ch, QueueDeclareArguments::new("unroutable")).await;
    rs_bind(&ch, "routed", "with-ae", "known").await;
    rs_bind(&ch, "unroutable", "ae", "").await;
    rs_publish(&ch, "with-ae", "known", "m1").await;
    rs_publish(&ch, "with-ae", "unknown", "m2").await;
    rs_publish(&ch, "with-ae", "", "m3").await;
    assert_eq!(rs_drain(&ch, "routed").await, ["m1"]);
    assert_eq!(rs_drain(&ch, "unroutable").await, ["m2", "m3"]);
    ch.close().await.unwrap();
    conn.close().await.unwrap();
    server.stop().await;
}

/// Scenario 5. `exchange.delete if-unused` on an exchange with bindings is 406; deleting a
/// missing exchange succeeds; a plain delete removes it with its bindings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_delete_if_unused_and_missing() {
    let server = TestServer::start().await;
    let conn = server.amqprs().await;
    let (ch, mut closes) = amqprs_watched_channel(&conn).await;
    ch.exchange_declare(ExchangeDeclareArguments::new("busy", "direct"))
        .await
        .unwrap();
    rs_declare_queue(&ch, QueueDeclareArguments::new("bq")).await;
    rs_bind(&ch, "bq", "busy", "k").await;
    let mut del = ExchangeDeleteArguments::new("busy");
    del.if_unused = true;
    assert!(ch.exchange_delete(del).await.is_err());
    let text = expect_amqprs_close("delete if-unused", &mut closes, PRECONDITION_FAILED).await;
    assert_eq!(
        text,
        "PRECONDITION_FAILED - exchange 'busy' in vhost '/' in use"
    );

    let (ch, _closes) = amqprs_watched_channel(&conn).await;
    // An unused exchange goes with if-unused.
    ch.exchange_declare(ExchangeDeclareArguments::new("idle", "topic"))
        .await
        .unwrap();
    let mut del = ExchangeDeleteArguments::new("idle");
    del.if_unused = true;
    ch.exchange_delete(del).await.unwrap();
    ch.exchange_delete(ExchangeDeleteArguments::new("never-declared"))
        .await
        .expect("deleting a missing exchange succeeds");
    ch.exchange_delete(ExchangeDeleteArguments::new("busy"))
        .await
        .unwrap();
    // Its binding went with it: nothing routes to bq any more, and the exchange is gone.
    let (ch2, mut closes2) = amqprs_watched_channel(&conn).await;
    assert!(ch2
        .exchange_declare(
            ExchangeDeclareArguments::new("busy", "direct")
                .passive(true)
                .finish()
        )
        .await
        .is_err());
    expect_amqprs_close("passive declare after delete", &mut closes2, NOT_FOUND).await;
    rs_publish(&ch, "", "bq", "direct to bq").await;
    assert_eq!(rs_drain(&ch, "bq").await, ["direct to bq"]);
    ch.close().await.unwrap();
    conn.close().await.unwrap();
    server.stop().await;
}

/// Scenario 6. Exchange-to-exchange bindings carry messages (with the source's routing
/// rules) until they are unbound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_to_exchange_bind_and_unbind() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = channel(&conn).await;
    declare_exchange(&ch, "e2e.src", ExchangeKind::Topic).await;
    declare_exchange(&ch, "e2e.mid", ExchangeKind::Fanout).await;
    declare_exchange(&ch, "e2e.dst", ExchangeKind::Direct).await;
    declare_queue(&ch, "e2e.q").await;
    declare_queue(&ch, "e2e.direct-q").await;
    bind(&ch, "e2e.q", "e2e.mid", "", FieldTable::default()).await;
    bind(
        &ch,
        "e2e.direct-q",
        "e2e.dst",
        "orders.new",
        FieldTable::default(),
    )
    .await;
    ch.exchange_bind(
        "e2e.mid".into(),
        "e2e.src".into(),
        "orders.*".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    // Chained: src -> dst, which routes by the original key.
    ch.exchange_bind(
        "e2e.dst".into(),
        "e2e.src".into(),
        "#".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish(&ch, "e2e.src", "orders.new", "new order").await;
    publish(&ch, "e2e.src", "orders.old", "old order").await;
    publish(&ch, "e2e.src", "invoices.new", "invoice").await;
    assert_eq!(drain(&ch, "e2e.q").await, ["new order", "old order"]);
    assert_eq!(drain(&ch, "e2e.direct-q").await, ["new order"]);

    ch.exchange_unbind(
        "e2e.mid".into(),
        "e2e.src".into(),
        "orders.*".into(),
        ExchangeUnbindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish(&ch, "e2e.src", "orders.new", "after unbind").await;
    assert!(
        drain(&ch, "e2e.q").await.is_empty(),
        "unbound: nothing flows"
    );
    assert_eq!(drain(&ch, "e2e.direct-q").await, ["after unbind"]);

    // The default exchange cannot be either end of an exchange-to-exchange binding.
    for (dst, src) in [("", "e2e.src"), ("e2e.mid", "")] {
        let ch = channel(&conn).await;
        expect_lapin_reply(
            "exchange.bind with the default exchange",
            ch.exchange_bind(
                dst.into(),
                src.into(),
                "k".into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await,
            ACCESS_REFUSED,
            "ACCESS_REFUSED - operation not permitted on the default exchange",
        );
    }
    // A missing source or destination is 404.
    let ch = channel(&conn).await;
    expect_lapin_error(
        "exchange.bind from a missing exchange",
        ch.exchange_bind(
            "e2e.mid".into(),
            "e2e.missing".into(),
            "k".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await,
        NOT_FOUND,
    );
    conn.close(200, "bye".into()).await.unwrap();
    server.stop().await;
}

/// Scenario 7. Reserved names, the default exchange, unknown types, inequivalent redeclares
/// and publishing to a missing exchange. Each error closes its channel, so each case gets a
/// fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_names_and_default_exchange_rules() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let opts = ExchangeDeclareOptions::default();
    let none = FieldTable::default;

    let ch = channel(&conn).await;
    expect_lapin_reply(
        "declare amq.foo",
        ch.exchange_declare("amq.foo".into(), ExchangeKind::Direct, opts, none())
            .await,
        ACCESS_REFUSED,
        "ACCESS_REFUSED - exchange name 'amq.foo' contains reserved prefix 'amq.*'",
    );

    let ch = channel(&conn).await;
    expect_lapin_reply(
        "delete amq.direct",
        ch.exchange_delete("amq.direct".into(), ExchangeDeleteOptions::default())
            .await,
        ACCESS_REFUSED,
        "ACCESS_REFUSED - deletion of system exchange 'amq.direct' in vhost '/' not allowed",
    );

    let default_refused = "ACCESS_REFUSED - operation not permitted on the default exchange";
    let ch = channel(&conn).await;
    expect_lapin_reply(
        "declare the default exchange",
        ch.exchange_declare("".into(), ExchangeKind::Direct, opts, none())
            .await,
        ACCESS_REFUSED,
        default_refused,
    );
    let ch = channel(&conn).await;
    expect_lapin_reply(
        "delete the default exchange",
        ch.exchange_delete("".into(), ExchangeDeleteOptions::default())
            .await,
        ACCESS_REFUSED,
        default_refused,
    );
    let ch = channel(&conn).await;
    declare_queue(&ch, "rq").await;
    expect_lapin_reply(
        "bind to the default exchange",
        ch.queue_bind(
            "rq".into(),
            "".into(),
            "rq".into(),
            QueueBindOptions::default(),
            none(),
        )
        .await,
        ACCESS_REFUSED,
        default_refused,
    );
    let ch = channel(&conn).await;
    expect_lapin_reply(
        "unbind from the default exchange",
        ch.queue_unbind("rq".into(), "".into(), "rq".into(), none())
            .await,
        ACCESS_REFUSED,
        default_refused,
    );

    let ch = channel(&conn).await;
    expect_lapin_reply(
        "unknown exchange type",
        ch.exchange_declare(
            "typed".into(),
            ExchangeKind::Custom("x-no-such-type".into()),
            opts,
            none(),
        )
        .await,
        PRECONDITION_FAILED,
        "PRECONDITION_FAILED - unknown exchange type 'x-no-such-type'",
    );

    let ch = channel(&conn).await;
    declare_exchange(&ch, "shape", ExchangeKind::Direct).await;
    expect_lapin_reply(
        "redeclare with another type",
        ch.exchange_declare("shape".into(), ExchangeKind::Fanout, opts, none())
            .await,
        PRECONDITION_FAILED,
        "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'shape' in vhost '/': received 'fanout' but current is 'direct'",
    );
    let ch = channel(&conn).await;
    expect_lapin_reply(
        "redeclare durable",
        ch.exchange_declare(
            "shape".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            none(),
        )
        .await,
        PRECONDITION_FAILED,
        "PRECONDITION_FAILED - inequivalent arg 'durable' for exchange 'shape' in vhost '/': received 'true' but current is 'false'",
    );
    // The failed redeclares changed nothing: an equivalent one is still fine.
    let ch = channel(&conn).await;
    declare_exchange(&ch, "shape", ExchangeKind::Direct).await;

    // Publishing to a missing exchange closes the channel with 404; the confirm reports it.
    let ch = channel(&conn).await;
    expect_lapin_reply(
        "publish to a missing exchange",
        publish_confirmed(&ch, "no-such-exchange", "k", b"lost").await,
        NOT_FOUND,
        "NOT_FOUND - no exchange 'no-such-exchange' in vhost '/'",
    );
    assert!(
        ch.basic_get("rq".into(), BasicGetOptions::default())
            .await
            .is_err(),
        "the channel is closed"
    );
    // The connection itself is fine.
    let ch = channel(&conn).await;
    declare_queue(&ch, "still-usable").await;
    conn.close(200, "bye".into()).await.unwrap();
    server.stop().await;
}

// ---- Queues -------------------------------------------------------------------------------

/// Scenario 8. Passive declare of a missing queue is 404; an empty name gets a server name
/// `amq.gen-…`; creating a queue named `amq.…` is 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_passive_server_named_and_reserved() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = channel(&conn).await;
    expect_lapin_reply(
        "passive declare of a missing queue",
        ch.queue_declare(
            "no-such-queue".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await,
        NOT_FOUND,
        "NOT_FOUND - no queue 'no-such-queue' in vhost '/'",
    );

    let ch = channel(&conn).await;
    let a = declare_queue(&ch, "").await;
    let b = declare_queue(&ch, "").await;
    assert!(a.starts_with("amq.gen-"), "{a}");
    assert!(b.starts_with("amq.gen-"), "{b}");
    assert_ne!(a, b, "each server-named queue is new");
    assert!(queue_exists(&conn, &a).await);
    publish(&ch, "", &a, "to a server-named queue").await;
    assert_eq!(drain(&ch, &a).await, ["to a server-named queue"]);

    expect_lapin_reply(
        "declare amq.x",
        ch.queue_declare(
            "amq.x".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await,
        ACCESS_REFUSED,
        "ACCESS_REFUSED - queue name 'amq.x' contains reserved prefix 'amq.*'",
    );
    assert!(!queue_exists(&conn, "amq.x").await);

    // Even an existing server-named queue may only be named by a passive declare.
    let ch = channel(&conn).await;
    let passive = ch
        .queue_declare(
            a.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(passive.name().as_str(), a);
    expect_lapin_reply(
        "redeclare amq.gen-*",
        ch.queue_declare(
            a.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await,
        ACCESS_REFUSED,
        &format!("ACCESS_REFUSED - queue name '{a}' contains reserved prefix 'amq.*'"),
    );
    conn.close(200, "bye".into()).await.unwrap();
    server.stop().await;
}

/// Scenario 9. Redeclaring with other flags or arguments is 406 "inequivalent arg"; an
/// identical redeclare is fine and reports the ready messages and all consumers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_redeclare_equivalence_and_counts() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = channel(&conn).await;
    let args = || table(&[("x-max-length", AMQPValue::LongInt(10))]);
    let declare = |ch: Channel, durable: bool, args: FieldTable| async move {
        ch.queue_declare(
            "eq".into(),
            QueueDeclareOptions {
                durable,
                ..Default::default()
            },
            args,
        )
        .await
    };
    let q = declare(ch.clone(), false, args()).await.unwrap();
    assert_eq!((q.message_count(), q.consumer_count()), (0, 0));
    for i in 0..3 {
        publish(&ch, "", "eq", &format!("m{i}")).await;
    }
    let q = declare(ch.clone(), false, args()).await.unwrap();
    assert_eq!((q.message_count(), q.consumer_count()), (3, 0));
    // The same limit in a wider integer type is the same argument.
    let q = declare(
        ch.clone(),
        false,
        table(&[("x-max-length", AMQPValue::LongLongInt(10))]),
    )
    .await
    .unwrap();
    assert_eq!(q.message_count(), 3);

    // A consumer with prefetch 1 holds one message unacked: 2 ready, 1 consumer.
    let cch = channel(&conn).await;
    cch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut consumer = cch
        .basic_consume(
            "eq".into(),
            "holder".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let first = within("the first delivery", consumer.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.data, b"m0");
    let q = declare(ch.clone(), false, args()).await.unwrap();
    assert_eq!((q.message_count(), q.consumer_count()), (2, 1));

    expect_lapin_reply(
        "redeclare durable",
        declare(channel(&conn).await, true, args()).await,
        PRECONDITION_FAILED,
        "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'eq' in vhost '/': received 'true' but current is 'false'",
    );
    let text = expect_lapin_error(
        "redeclare with another x-max-length",
        declare(
            channel(&conn).await,
            false,
            table(&[("x-max-length", AMQPValue::LongInt(20))]),
        )
        .await,
        PRECONDITION_FAILED,
    );
    assert!(
        text.starts_with(
            "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'eq' in vhost '/'"
        ),
        "{text}"
    );
    let text = expect_lapin_error(
        "redeclare without x-max-length",
        declare(channel(&conn).await, false, FieldTable::default()).await,
        PRECONDITION_FAILED,
    );
    assert!(text.contains("inequivalent arg 'x-max-length'"), "{text}");
    let text = expect_lapin_error(
        "redeclare exclusive",
        channel(&conn)
            .await
            .queue_declare(
                "eq".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                args(),
            )
            .await,
        PRECONDITION_FAILED,
    );
    assert!(text.contains("inequivalent arg 'exclusive'"), "{text}");

    // Nothing changed: the consumer still holds m0 and the rest is ready. (On `ch`: lapin
    // closes a dropped open channel in the background, and if that runs into conn.close
    // below, the close fails with InvalidChannelState.)
    let q = declare(ch.clone(), false, args()).await.unwrap();
    assert_eq!((q.message_count(), q.consumer_count()), (2, 1));
    conn.close(200, "bye".into()).await.unwrap();
    server.stop().await;
}

/// Scenario 10. An unbound queue stops receiving; unbinding a binding that does not exist is
/// fine; binding a missing queue is 404. A named queue bound with an empty key is bound with
/// the empty key (the "last queue" shortcut applies only when the queue name is empty too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_bind_and_unbind() {
    let server = TestServer::start().await;
    let conn = server.amqprs().await;
    let (ch, mut closes) = amqprs_watched_channel(&conn).await;
    ch.exchange_declare(ExchangeDeclareArguments::new("bx", "direct"))
        .await
        .unwrap();
    rs_declare_queue(&ch, QueueDeclareArguments::new("bound")).await;
    rs_bind(&ch, "bound", "bx", "k").await;
    rs_publish(&ch, "bx", "k", "before").await;
    assert_eq!(rs_drain(&ch, "bound").await, ["before"]);
    ch.queue_unbind(QueueUnbindArguments::new("bound", "bx", "k"))
        .await
        .unwrap();
    rs_publish(&ch, "bx", "k", "after").await;
    assert!(rs_drain(&ch, "bound").await.is_empty());

    // Unbinding again, or a key never bound, succeeds and leaves the channel open.
    ch.queue_unbind(QueueUnbindArguments::new("bound", "bx", "k"))
        .await
        .expect("unbinding a missing binding succeeds");
    ch.queue_unbind(QueueUnbindArguments::new("bound", "bx", "never"))
        .await
        .expect("unbinding a missing binding succeeds");
    assert!(closes.try_recv().is_err(), "no channel.close");

    // The empty routing key with a named queue (declared last on this channel).
    rs_declare_queue(&ch, QueueDeclareArguments::new("empty-key")).await;
    rs_bind(&ch, "empty-key", "bx", "").await;
    rs_publish(&ch, "bx", "", "empty key").await;
    rs_publish(&ch, "bx", "empty-key", "queue name as key").await;
    assert_eq!(rs_drain(&ch, "empty-key").await, ["empty key"]);
    ch.queue_unbind(QueueUnbindArguments::new("empty-key", "bx", ""))
        .await
        .unwrap();
    rs_publish(&ch, "bx", "", "after unbind").await;
    assert!(rs_drain(&ch, "empty-key").await.is_empty());

    assert!(ch
        .queue_bind(QueueBindArguments::new("no-such-queue", "bx", "k"))
        .await
        .is_err());
    let text = expect_amqprs_close("bind a missing queue", &mut closes, NOT_FOUND).await;
    assert_eq!(text, "NOT_FOUND - no queue 'no-such-queue' in vhost '/'");

    let (ch, mut closes) = amqprs_watched_channel(&conn).await;
    assert!(ch
        .queue_bind(QueueBindArguments::new("bound", "no-such-exchange", "k"))
        .await
        .is_err());
    let text = expect_amqprs_close("bind to a missing exchange", &mut closes, NOT_FOUND).await;
    assert_eq!(
        text,
        "NOT_FOUND - no exchange 'no-such-exchange' in vhost '/'"
    );
    conn.close().await.unwrap();
    server.stop().await;
}

/// Scenario 11. Purge and delete report counts; if-unused and if-empty are enforced with 406;
/// deleting a missing queue succeeds with 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_purge_and_delete() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = channel(&conn).await;
    declare_queue(&ch, "pq").await;
    for i in 0..3 {
        publish(&ch, "", "pq", &format!("m{i}")).await;
    }
    let purged = ch
        .queue_purge("pq".into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    assert_eq!(purged, 3);
    assert!(drain(&ch, "pq").await.is_empty());
    let purged = ch
        .queue_purge("pq".into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    assert_eq!(purged, 0);

    for i in 0..2 {
        publish(&ch, "", "pq", &format!("n{i}")).await;
    }
    expect_lapin_reply(
        "delete if-empty with messages",
        channel(&conn)
            .await
            .queue_delete(
                "pq".into(),
                QueueDeleteOptions {
                    if_empty: true,
                    ..Default::default()
                },
            )
            .await,
        PRECONDITION_FAILED,
        "PRECONDITION_FAILED - queue 'pq' in vhost '/' not empty",
    );

    let cch = channel(&conn).await;
    declare_queue(&cch, "used").await;
    // Held until the end: dropping a lapin consumer cancels it.
    let _consumer = cch
        .basic_consume(
            "used".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    expect_lapin_reply(
        "delete if-unused with a consumer",
        channel(&conn)
            .await
            .queue_delete(
                "used".into(),
                QueueDeleteOptions {
                    if_unused: true,
                    ..Default::default()
                },
            )
            .await,
        PRECONDITION_FAILED,
        "PRECONDITION_FAILED - queue 'used' in vhost '/' in use",
    );
    assert!(queue_exists(&conn, "used").await);

    let deleted = ch
        .queue_delete("pq".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    assert_eq!(
        deleted, 2,
        "delete-ok counts the messages that went with it"
    );
    assert!(!queue_exists(&conn, "pq").await);
    let deleted = ch
        .queue_delete("pq".into(), QueueDeleteOptions::default())
        .await
        .expect("deleting a missing queue succeeds");
    assert_eq!(deleted, 0);
    // if-empty and if-unused are fine when they hold.
    declare_queue(&ch, "tidy").await;
    let deleted = ch
        .queue_delete(
            "tidy".into(),
            QueueDeleteOptions {
                if_empty: true,
                if_unused: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(deleted, 0);
    assert!(!queue_exists(&conn, "tidy").await);
    conn.close(200, "bye".into()).await.unwrap();
    server.stop().await;
}

/// Scenario 12. After a server-named declare, queue "" in bind, consume, purge, get, unbind
/// and delete means that queue (and an empty bind key means its name); with nothing declared
/// on the channel, queue "" is 404 "no previously declared queue".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_queue_name_means_the_last_declared_queue() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let no_previous = "NOT_FOUND - no previously declared queue";

    let ch = channel(&conn).await;
    expect_lapin_reply(
        "basic.get \"\" with nothing declared",
        ch.basic_get("".into(), BasicGetOptions::default()).await,
        NOT_FOUND,
        no_previous,
    );
    let ch = channel(&conn).await;
    expect_lapin_reply(
        "queue.bind \"\" with nothing declared",
        ch.queue_bind(
            "".into(),
            "amq.direct".into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await,
        NOT_FOUND,
        no_previous,
    );
    let ch = channel(&conn).await;
    expect_lapin_reply(
        "queue.purge \"\" with nothing declared",
        ch.queue_purge("".into(), QueuePurgeOptions::default())
            .await,
        NOT_FOUND,
        no_previous,
    );
    let ch = channel(&conn).await;
    expect_lapin_reply(
        "queue.delete \"\" with nothing declared",
        ch.queue_delete("".into(), QueueDeleteOptions::default())
            .await,
        NOT_FOUND,
        no_previous,
    );
    let ch = channel(&conn).await;
    expect_lapin_reply(
        "basic.consume \"\" with nothing declared",
        ch.basic_consume(
            "".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await,
        NOT_FOUND,
        no_previous,
    );

    let ch = channel(&conn).await;
    let name = declare_queue(&ch, "").await;
    assert!(name.starts_with("amq.gen-"), "{name}");
    // Empty queue and empty key: bound with the queue's name as the key.
    bind(&ch, "", "amq.direct", "", FieldTable::default()).await;
    // Empty queue, real key.
    bind(&ch, "", "amq.topic", "t.#", FieldTable::default()).await;
    publish(&ch, "amq.direct", &name, "by name").await;
    publish(&ch, "amq.direct", "", "empty key").await;
    publish(&ch, "amq.topic", "t.x", "by topic").await;
    let purged = ch
        .queue_purge("".into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    assert_eq!(purged, 2, "'by name' and 'by topic'");

    publish(&ch, "amq.direct", &name, "for get").await;
    let got = ch
        .basic_get("".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a message for basic.get \"\"");
    assert_eq!(got.delivery.data, b"for get");

    let mut consumer = ch
        .basic_consume(
            "".into(),
            "empty-name".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    publish(&ch, "amq.topic", "t.y", "for the consumer").await;
    let d = within("delivery to the consumer of \"\"", consumer.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.data, b"for the consumer");
    ch.basic_cancel("empty-name".into(), BasicCancelOptions::default())
        .await
        .unwrap();

    // Unbind "" with the empty key removes the binding made with the shortcut.
    ch.queue_unbind(
        "".into(),
        "amq.direct".into(),
        "".into(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish(&ch, "amq.direct", &name, "not routed").await;
    publish(&ch, "amq.topic", "t.z", "still routed").await;
    let deleted = ch
        .queue_delete("".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    assert_eq!(deleted, 1, "only 'still routed' was left");
    assert!(!queue_exists(&conn, &name).await);
    conn.close(200, "bye".into()).await.unwrap();
    server.stop().await;
}

/// Scenario 13. Another connection gets 405 on every use of an exclusive queue; the queue is
/// deleted when its connection closes, before close-ok, so a passive declare right after is 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_queue_is_locked_to_its_connection() {
    let server = TestServer::start().await;
    let owner = server.lapin().await;
    let och = channel(&owner).await;
    let q = och
        .queue_declare(
            "excl".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.name().as_str(), "excl");
    // The owner uses it freely.
    bind(&och, "excl", "amq.fanout", "", FieldTable::default()).await;
    publish(&och, "amq.fanout", "", "for the owner").await;
    assert_eq!(drain(&och, "excl").await, ["for the owner"]);

    let other = server.amqprs().await;
    /// Asserts that `result` failed because the broker closed the watched channel with
    /// 405 RESOURCE_LOCKED for the exclusive queue "excl".
    async fn expect_locked<T, E>(
        what: &str,
        result: Result<T, E>,
        closes: &mut tokio::sync::mpsc::UnboundedReceiver<crate::support::Ev>,
    ) {
        assert!(result.is_err(), "{what}: expected an error");
        let text = expect_amqprs_close(what, closes, RESOURCE_LOCKED).await;
        let locked =
            "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue 'excl' in vhost '/'";
        assert!(text.starts_with(locked), "{what}: {text}");
    }

    let (ch, mut closes) = amqprs_watched_channel(&other).await;
    let result = ch.queue_declare(QueueDeclareArguments::new("excl")).await;
    expect_locked("declare", result, &mut closes).await;

    let (ch, mut closes) = amqprs_watched_channel(&other).await;
    let result = ch
        .queue_declare(QueueDeclareArguments::new("excl").passive(true).finish())
        .await;
    expect_locked("passive declare", result, &mut closes).await;

    let (ch, mut closes) = amqprs_watched_channel(&other).await;
    let result = ch
        .basic_consume_rx(BasicConsumeArguments::new("excl", "thief"))
        .await;
    expect_locked("consume", result, &mut closes).await;

    let (ch, mut closes) = amqprs_watched_channel(&other).await;
    let result = ch.basic_get(BasicGetArguments::new("excl")).await;
    expect_locked("get", result, &mut closes).await;

    let (ch, mut closes) = amqprs_watched_channel(&other).await;
    let result = ch
        .queue_bind(QueueBindArguments::new("excl", "amq.direct", "k"))
        .await;
    expect_locked("bind", result, &mut closes).await;

    let (ch, mut closes) = amqprs_watched_channel(&other).await;
    let mut del = amqprs::channel::QueueDeleteArguments::new("excl");
    del.if_unused = false;
    let result = ch.queue_delete(del).await;
    expect_locked("delete", result, &mut closes).await;

    // The owner still has it, and closing the owner deletes it.
    publish(&och, "", "excl", "still here").await;
    assert_eq!(drain(&och, "excl").await, ["still here"]);
    owner.close(200, "bye".into()).await.unwrap();
    // RabbitMQ deletes exclusive queues before it sends close-ok.
    let vhost = server.app.broker.vhost("/").unwrap();
    assert!(vhost.queue("excl").is_none(), "deleted before close-ok");

    let (ch, mut closes) = amqprs_watched_channel(&other).await;
    assert!(ch
        .queue_declare(QueueDeclareArguments::new("excl").passive(true).finish())
        .await
        .is_err());
    let text = expect_amqprs_close("passive declare after close", &mut closes, NOT_FOUND).await;
    assert_eq!(text, "NOT_FOUND - no queue 'excl' in vhost '/'");
    // And its binding went with it.
    let ch = other.open_channel(None).await.unwrap();
    rs_declare_queue(&ch, QueueDeclareArguments::new("excl")).await;
    rs_publish(&ch, "amq.fanout", "", "after the owner left").await;
    assert!(rs_drain(&ch, "excl").await.is_empty());
    other.close().await.unwrap();
    server.stop().await;
}

/// Scenario 14. An auto-delete queue is deleted when its last consumer is cancelled or its
/// channel closes, not while a consumer remains, and never if it had no consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_delete_queue_goes_with_its_last_consumer() {
    let server = TestServer::start().await;
    let conn = server.amqprs().await;
    let ch = conn.open_channel(None).await.unwrap();
    let exists = |name: &'static str| {
        let conn = &conn;
        async move {
            let (ch, mut closes) = amqprs_watched_channel(conn).await;
            match ch
                .queue_declare(QueueDeclareArguments::new(name).passive(true).finish())
                .await
            {
                Ok(Some((_, _, consumers))) => {
                    ch.close().await.unwrap();
                    Some(consumers)
                }
                Ok(None) => unreachable!("not nowait"),
                Err(_) => {
                    expect_amqprs_close("passive declare", &mut closes, NOT_FOUND).await;
                    None
                }
            }
        }
    };

    rs_declare_queue(&ch, QueueDeclareArguments::transient_autodelete("ad")).await;
    let (c1, _rx1) = rs_consume(&ch, "ad", "c1").await;
    let (c2, _rx2) = rs_consume(&ch, "ad", "c2").await;
    assert_eq!(exists("ad").await, Some(2));
    ch.basic_cancel(BasicCancelArguments::new(&c1))
        .await
        .unwrap();
    assert_eq!(exists("ad").await, Some(1), "one consumer left");
    ch.basic_cancel(BasicCancelArguments::new(&c2))
        .await
        .unwrap();
    assert_eq!(exists("ad").await, None, "deleted with its last consumer");

    // Never consumed (only basic.get): never auto-deleted.
    rs_declare_queue(&ch, QueueDeclareArguments::transient_autodelete("ad-get")).await;
    rs_publish(&ch, "", "ad-get", "m").await;
    assert_eq!(rs_drain(&ch, "ad-get").await, ["m"]);
    assert_eq!(exists("ad-get").await, Some(0));

    // The last consumer goes away with its channel.
    let cch = conn.open_channel(None).await.unwrap();
    rs_declare_queue(&cch, QueueDeclareArguments::transient_autodelete("ad-chan")).await;
    let (_c, _rx) = rs_consume(&cch, "ad-chan", "c").await;
    assert_eq!(exists("ad-chan").await, Some(1));
    cch.close().await.unwrap();
    assert_eq!(exists("ad-chan").await, None);

    // A non-auto-delete queue stays after its consumer leaves.
    rs_declare_queue(&ch, QueueDeclareArguments::new("plain")).await;
    let (c, _rx) = rs_consume(&ch, "plain", "c").await;
    ch.basic_cancel(BasicCancelArguments::new(&c))
        .await
        .unwrap();
    assert_eq!(exists("plain").await, Some(0));
    ch.close().await.unwrap();
    conn.close().await.unwrap();
    server.stop().await;
}

/// Scenario 15. `x-queue-type`: classic is accepted; quorum is served as a durable classic
/// queue, refused with RabbitMQ's own 406 for properties a quorum queue cannot have; stream
/// and unknown types are refused with a 406 that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_types_are_served_honestly() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = channel(&conn).await;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for kind in ["classic", "quorum"] {
        for _ in 0..2 {
            ch.queue_declare(
                format!("{kind}-q").as_str().into(),
                durable,
                table(&[("x-queue-type", longstr(kind))]),
            )
            .await
            .unwrap_or_else(|e| panic!("x-queue-type {kind} is accepted: {e}"));
        }
    }
    // A quorum queue works like any other queue.
    publish(&ch, "", "quorum-q", "q1").await;
    assert_eq!(drain(&ch, "quorum-q").await, ["q1"]);
    // Redeclaring with another type is inequivalent, as in RabbitMQ.
    let text = expect_lapin_error(
        "quorum as classic",
        channel(&conn)
            .await
            .queue_declare(
                "quorum-q".into(),
                durable,
                table(&[("x-queue-type", longstr("classic"))]),
            )
            .await,
        PRECONDITION_FAILED,
    );
    assert!(text.contains("inequivalent arg 'x-queue-type'"), "{text}");
    // Properties a quorum queue cannot have.
    for (options, property) in [
        (QueueDeclareOptions::default(), "non-durable"),
        (
            QueueDeclareOptions {
                durable: true,
                exclusive: true,
                ..Default::default()
            },
            "exclusive-owner",
        ),
        (
            QueueDeclareOptions {
                durable: true,
                auto_delete: true,
                ..Default::default()
            },
            "auto-delete",
        ),
    ] {
        let text = expect_lapin_error(
            property,
            channel(&conn)
                .await
                .queue_declare(
                    "bad-quorum".into(),
                    options,
                    table(&[("x-queue-type", longstr("quorum"))]),
                )
                .await,
            PRECONDITION_FAILED,
        );
        assert_eq!(
            text,
            format!(
                "PRECONDITION_FAILED - invalid property '{property}' for queue 'bad-quorum' in vhost '/'"
            )
        );
        assert!(!queue_exists(&conn, "bad-quorum").await);
    }
    for (kind, why) in [
        ("stream", "does not serve stream queues"),
        ("fancy", "unknown queue type 'fancy'"),
    ] {
        let name = format!("{kind}-q");
        let text = expect_lapin_error(
            kind,
            channel(&conn)
                .await
                .queue_declare(
                    name.as_str().into(),
                    durable,
                    table(&[("x-queue-type", longstr(kind))]),
                )
                .await,
            PRECONDITION_FAILED,
        );
        assert!(
            text.starts_with(&format!(
                "PRECONDITION_FAILED - invalid arg 'x-queue-type' for queue '{name}' in vhost '/': "
            )),
            "{text}"
        );
        assert!(text.contains(why), "{text}");
        assert!(text.contains("classic"), "says what is served: {text}");
        assert!(!queue_exists(&conn, &name).await);
    }
    conn.close(200, "bye".into()).await.unwrap();
    server.stop().await;
}
