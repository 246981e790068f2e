//! The behaviour both buses promise, written once over `&dyn Bus` and run by the tests of
//! [`super::embedded`] and [`super::remote`] (the latter against a real mqic listener).

use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;

use crate::amqp::{Broker, LocalConnection};
use crate::bus::{BoxFuture, Bus, BusError, BusResult, Delivery, Outgoing, Subscription};
use crate::protocol::topology::{BindingSpec, ExchangeSpec, QueueSpec, Topology};

/// The longest any single step may take before the test fails.
const WAIT: Duration = Duration::from_secs(10);
const EVENTS: &str = "test.events";

fn topology() -> Topology {
    Topology {
        exchanges: vec![ExchangeSpec {
            name: EVENTS,
            kind: "topic",
        }],
        queues: ["work", "other"]
            .iter()
            .map(|q| QueueSpec {
                name: q.to_string(),
            })
            .collect(),
        bindings: vec![BindingSpec {
            queue: "work".into(),
            exchange: EVENTS,
            routing_key: "case.#",
        }],
    }
}

/// Publishes, failing the test if the outcome takes longer than [`WAIT`].
async fn publish(bus: &dyn Bus, message: Outgoing) -> BusResult<()> {
    tokio::time::timeout(WAIT, bus.publish(message))
        .await
        .expect("publish outcome within the bound")
}

pub(crate) async fn next(sub: &mut Subscription) -> Delivery {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("no delivery within the bound")
        .expect("subscription ended")
}

/// Polls `queue_depth` until it equals `want`, for at most [`WAIT`].
pub(crate) async fn depth_becomes(bus: &dyn Bus, queue: &str, want: Option<(u32, u32)>) {
    let mut last = None;
    for _ in 0..200 {
        last = Some(bus.queue_depth(queue).await.unwrap());
        if last == Some(want) {
            return;
        }
        tokio::time::sleep(WAIT / 200).await;
    }
    panic!("queue_depth({queue}) stayed {last:?}, wanted {want:?}");
}

/// Drives every future to completion concurrently on this task.
async fn join_all<T>(mut futures: Vec<BoxFuture<'_, T>>) -> Vec<T> {
    let mut done: Vec<Option<T>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, out) in futures.iter_mut().zip(done.iter_mut()) {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *out = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    done.into_iter().map(|v| v.expect("completed")).collect()
}

pub(crate) async fn publish_consume_ack(bus: &dyn Bus) {
    bus.declare(&topology()).await.unwrap();
    bus.declare(&topology())
        .await
        .expect("redeclare is idempotent");
    let mut out = Outgoing::to_queue("work", &b"{\"n\":1}"[..]);
    out.headers = vec![
        ("x-case".into(), "c1".into()),
        ("x-step".into(), "plan".into()),
    ];
    out.correlation_id = Some("corr-1".into());
    out.reply_to = Some("replies".into());
    publish(bus, out).await.unwrap();
    publish(
        bus,
        Outgoing::to_exchange(EVENTS, "case.new.c2", &b"{\"n\":2}"[..]),
    )
    .await
    .unwrap();

    let mut sub = bus.consume("work", 10).await.unwrap();
    assert_eq!(sub.queue, "work");
    let first = next(&mut sub).await;
    assert_eq!(first.body, Bytes::from_static(b"{\"n\":1}"));
    assert_eq!(
        (first.exchange.as_str(), first.routing_key.as_str()),
        ("", "work")
    );
    assert!(!first.redelivered);
    let mut headers = first.headers.clone();
    headers.sort();
    assert_eq!(
        headers,
        [
            ("x-case".to_string(), "c1".to_string()),
            ("x-step".to_string(), "plan".to_string())
        ]
    );
    assert_eq!(first.header("x-case"), Some("c1"));
    assert_eq!(first.correlation_id.as_deref(), Some("corr-1"));
    assert_eq!(first.reply_to.as_deref(), Some("replies"));
    let second = next(&mut sub).await;
    assert_eq!(second.body, Bytes::from_static(b"{\"n\":2}"));
    assert_eq!(second.exchange, EVENTS);
    assert_eq!(second.routing_key, "case.new.c2");
    assert!(second.headers.is_empty() && second.correlation_id.is_none());
    first.ack();
    second.ack();
    drop(sub);
    // Acked messages do not come back when the consumer goes away.
    depth_becomes(bus, "work", Some((0, 0))).await;
}

pub(crate) async fn unacked_come_back_redelivered(bus: &dyn Bus) {
    bus.declare(&topology()).await.unwrap();
    for body in ["a", "b"] {
        publish(bus, Outgoing::to_queue("work", body))
            .await
            .unwrap();
    }
    let mut sub = bus.consume("work", 10).await.unwrap();
    for body in ["a", "b"] {
        let d = next(&mut sub).await;
        assert_eq!((&d.body[..], d.redelivered), (body.as_bytes(), false));
    }
    drop(sub);
    let mut again = bus.consume("work", 10).await.unwrap();
    for body in ["a", "b"] {
        let d = next(&mut again).await;
        assert_eq!((&d.body[..], d.redelivered), (body.as_bytes(), true));
        d.ack();
    }
}

pub(crate) async fn nack_drops_or_requeues(bus: &dyn Bus) {
    bus.declare(&topology()).await.unwrap();
    let mut sub = bus.consume("work", 1).await.unwrap();
    publish(bus, Outgoing::to_queue("work", "doomed"))
        .await
        .unwrap();
    next(&mut sub).await.nack(false);
    publish(bus, Outgoing::to_queue("work", "retry"))
        .await
        .unwrap();
    let d = next(&mut sub).await;
    assert_eq!(
        &d.body[..],
        b"retry",
        "a nack without requeue drops the message"
    );
    d.nack(true);
    let d = next(&mut sub).await;
    assert_eq!((&d.body[..], d.redelivered), (&b"retry"[..], true));
    d.ack();
    drop(sub);
    depth_becomes(bus, "work", Some((0, 0))).await;
}

pub(crate) async fn unroutable_and_refused_publishes(bus: &dyn Bus) {
    bus.declare(&topology()).await.unwrap();
    let err = publish(bus, Outgoing::to_queue("nowhere", "x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BusError::Unroutable(to) if to.contains("nowhere")),
        "{err:?}"
    );
    let mut mandatory = Outgoing::to_exchange(EVENTS, "nobody.listens", "x");
    mandatory.mandatory = true;
    assert!(matches!(
        publish(bus, mandatory).await,
        Err(BusError::Unroutable(_))
    ));
    publish(bus, Outgoing::to_exchange(EVENTS, "nobody.listens", "x"))
        .await
        .expect("a transient event nobody is bound to is simply dropped");
    let err = publish(bus, Outgoing::to_exchange("no.such.exchange", "k", "x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BusError::Refused(why) if why.contains("404")),
        "{err:?}"
    );
    publish(bus, Outgoing::to_queue("work", "still fine"))
        .await
        .expect("publishing recovers after a channel error");
    depth_becomes(bus, "work", Some((1, 0))).await;
}

pub(crate) async fn reply_queue_round_trip(bus: &dyn Bus) {
    bus.declare(&topology()).await.unwrap();
    let mut replies = bus.reply_queue().await.unwrap();
    assert!(replies.queue.starts_with("amq.gen-"), "{}", replies.queue);
    for i in 0..2 {
        let mut out = Outgoing::to_queue(&replies.queue, format!("pong {i}"));
        out.correlation_id = Some(format!("rpc-{i}"));
        publish(bus, out).await.unwrap();
        let d = next(&mut replies).await;
        assert_eq!(d.correlation_id, Some(format!("rpc-{i}")));
        assert_eq!(d.body, Bytes::from(format!("pong {i}")));
        // Settling an auto-acked delivery is harmless: the second round still works.
        d.ack();
    }
    bus.bind(&replies.queue, EVENTS, "gpu.#").await.unwrap();
    publish(bus, Outgoing::to_exchange(EVENTS, "gpu.up.0", "gpu"))
        .await
        .unwrap();
    assert_eq!(next(&mut replies).await.routing_key, "gpu.up.0");
    assert_eq!(bus.queue_depth(&replies.queue).await.unwrap(), Some((0, 1)));
    let name = replies.queue.clone();
    drop(replies);
    depth_becomes(bus, &name, None).await;
}

pub(crate) async fn queue_depth_of_existing_and_missing(bus: &dyn Bus) {
    bus.declare(&topology()).await.unwrap();
    assert_eq!(bus.queue_depth("other").await.unwrap(), Some((0, 0)));
    for i in 0..3 {
        publish(bus, Outgoing::to_queue("other", format!("{i}")))
            .await
            .unwrap();
    }
    assert_eq!(bus.queue_depth("other").await.unwrap(), Some((3, 0)));
    assert_eq!(bus.queue_depth("missing").await.unwrap(), None);
    let mut sub = bus.consume("other", 1).await.unwrap();
    next(&mut sub).await;
    depth_becomes(bus, "other", Some((2, 1))).await;
    assert_eq!(bus.queue_depth("missing").await.unwrap(), None);
    assert!(matches!(
        bus.consume("missing", 1).await,
        Err(BusError::Refused(_))
    ));
}

pub(crate) async fn concurrent_publishes_all_confirm(bus: &dyn Bus) {
    bus.declare(&topology()).await.unwrap();
    let publishes = (0..1000)
        .map(|i| bus.publish(Outgoing::to_queue("work", format!("{i}"))))
        .collect();
    let results = tokio::time::timeout(WAIT * 3, join_all(publishes))
        .await
        .expect("1000 publishes not all confirmed within the bound");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(bus.queue_depth("work").await.unwrap(), Some((1000, 0)));
}

/// A consumer the broker cancels (its queue was deleted) ends the subscription.
pub(crate) async fn subscription_ends_when_its_queue_is_deleted(
    bus: &dyn Bus,
    broker: &Arc<Broker>,
) {
    bus.declare(&topology()).await.unwrap();
    let mut sub = bus.consume("other", 1).await.unwrap();
    let mut conn = LocalConnection::open(broker, "/", "test").unwrap();
    conn.channel().queue_delete("other").unwrap();
    let end = tokio::time::timeout(WAIT, sub.next()).await;
    assert!(matches!(end, Ok(None)), "{end:?}");
}

/// `persistent` reaches the broker as delivery_mode 2, and only then.
pub(crate) async fn persistent_sets_delivery_mode(bus: &dyn Bus, broker: &Arc<Broker>) {
    bus.declare(&topology()).await.unwrap();
    publish(bus, Outgoing::to_queue("other", "kept"))
        .await
        .unwrap();
    let mut transient = Outgoing::to_queue("other", "not kept");
    transient.persistent = false;
    publish(bus, transient).await.unwrap();
    let mut conn = LocalConnection::open(broker, "/", "test").unwrap();
    let mut ch = conn.channel();
    let kept = ch.get("other", true).unwrap().unwrap();
    assert!(kept.message.is_persistent());
    let not_kept = ch.get("other", true).unwrap().unwrap();
    assert!(!not_kept.message.is_persistent());
}
