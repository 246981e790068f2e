//! Broker durability: a real `mqic serve` child process on one data dir is stopped (SIGTERM)
//! and killed (SIGKILL) in the middle of a confirmed, persistent publishing load from lapin,
//! then restarted. Every message the broker confirmed must come back exactly once (or once
//! more, when its ack may not have reached the disk), in order, with its properties and body
//! intact; unconfirmed messages may be missing but never corrupted. Delivered-unacked
//! messages come back `redelivered`; transient queues and non-persistent messages do not
//! come back; durable exchanges, queues (with their arguments) and bindings do.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Confirmation};
use rand::Rng;

use crate::process::mqic;

/// A `mqic serve` on a data dir that outlives it.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(data: &Path) -> Server {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.with_extension("log"))
            .unwrap();
        let mut child = mqic()
            .args(["serve", "--amqp-listen", "127.0.0.1:0"])
            .args([
                "--web-listen",
                "127.0.0.1:0",
                "--management-listen",
                "127.0.0.1:0",
            ])
            .args(["--prometheus-listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("mqic starts");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("amqp listening on ")
            .unwrap_or_else(|| panic!("unexpected ready line {line:?}"))
            .parse()
            .unwrap();
        Server { child, addr }
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    async fn connect(&self) -> lapin::Connection {
        lapin::Connection::connect(&self.url(), lapin::ConnectionProperties::default())
            .await
            .expect("lapin connects")
    }

    /// Sends `signal` and waits for the process to end.
    fn stop(mut self, signal: &str) -> std::process::ExitStatus {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal}");
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn data_dir(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("data")
}

// ---- the messages: everything about message n follows from n --------------------------

fn properties(n: u64) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("n".into(), AMQPValue::LongLongInt(n as i64));
    headers.insert(
        "tag".into(),
        AMQPValue::LongString(LongString::from(format!("t{}", n % 7))),
    );
    headers.insert("flag".into(), AMQPValue::Boolean(n.is_multiple_of(3)));
    let mut p = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(n.to_string().into())
        .with_correlation_id(format!("c{n}").into())
        .with_priority((n % 10) as u8)
        .with_timestamp(1_700_000_000 + n)
        .with_app_id("durability".into())
        .with_headers(headers);
    if n.is_multiple_of(2) {
        p = p.with_content_type("application/octet-stream".into());
    }
    p
}

fn body(n: u64) -> Vec<u8> {
    let mut b = format!("m{n:010}").into_bytes();
    let len = 64 + (n * 37 % 700) as usize;
    b.extend((b.len()..len).map(|i| ((n as usize + i) % 251) as u8));
    b
}

/// Which message this is; panics if its properties or body are not exactly message n's.
fn check(properties_got: &BasicProperties, data: &[u8]) -> u64 {
    let n: u64 = properties_got
        .message_id()
        .as_ref()
        .expect("message_id")
        .as_str()
        .parse()
        .expect("numeric message_id");
    assert_eq!(
        properties_got,
        &properties(n),
        "message {n}: properties intact"
    );
    assert!(data == body(n).as_slice(), "message {n}: body intact");
    n
}

// ---- load and drain --------------------------------------------------------------------

/// Declares the durable queue `q` (with an argument) on a fresh channel.
async fn durable_queue(conn: &lapin::Connection, q: &str) -> (lapin::Channel, u32) {
    try_durable_queue(conn, q)
        .await
        .unwrap_or_else(|e| panic!("declare {q}: {e}"))
}

async fn try_durable_queue(
    conn: &lapin::Connection,
    q: &str,
) -> lapin::Result<(lapin::Channel, u32)> {
    let ch = conn.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(10_000_000));
    let declared = ch
        .queue_declare(
            q.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
    Ok((ch, declared.message_count()))
}

/// Awaits `fut` for at most 5 s. A client call may only hang once the broker is gone
/// (`dead` is set when the test kills it); a hang while it runs fails the test.
async fn bounded<T>(
    dead: &AtomicBool,
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    match tokio::time::timeout(Duration::from_secs(5), fut).await {
        Ok(v) => Some(v),
        Err(_) => {
            assert!(
                dead.load(Ordering::SeqCst),
                "{what} hung for 5 s while the broker was running"
            );
            None
        }
    }
}

/// Publishes messages `from..` persistently to queue `q` with confirms (window 256) until
/// `stop` is set or the connection fails; returns the confirmed numbers, in order.
async fn publish_load(
    ch: lapin::Channel,
    q: String,
    from: u64,
    stop: Arc<AtomicBool>,
    dead: Arc<AtomicBool>,
) -> Vec<u64> {
    let mut confirmed = Vec::new();
    let selected = bounded(
        &dead,
        "confirm.select",
        ch.confirm_select(ConfirmSelectOptions::default()),
    )
    .await;
    if !matches!(selected, Some(Ok(()))) {
        return confirmed;
    }
    let mut window = VecDeque::new();
    let mut n = from;
    loop {
        while window.len() >= 256 || (stop.load(Ordering::Relaxed) && !window.is_empty()) {
            let (m, confirm) = window.pop_front().unwrap();
            match bounded(&dead, "a publisher confirm", confirm).await {
                Some(Ok(Confirmation::Ack(_))) => confirmed.push(m),
                Some(Ok(other)) => panic!("message {m}: unexpected confirm {other:?}"),
                Some(Err(_)) | None => return confirmed,
            }
        }
        if stop.load(Ordering::Relaxed) {
            return confirmed;
        }
        let published = bounded(
            &dead,
            "basic.publish",
            ch.basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                &body(n),
                properties(n),
            ),
        )
        .await;
        match published {
            Some(Ok(confirm)) => window.push_back((n, confirm)),
            Some(Err(_)) | None => {
                // The connection is gone; what was confirmed before still counts.
                while let Some((m, confirm)) = window.pop_front() {
                    if let Some(Ok(Confirmation::Ack(_))) =
                        bounded(&dead, "a publisher confirm", confirm).await
                    {
                        confirmed.push(m);
                    }
                }
                return confirmed;
            }
        }
        n += 1;
    }
}

/// One delivery seen while draining.
#[derive(Debug, Clone, Copy)]
struct Seen {
    n: u64,
    redelivered: bool,
}

/// Consumes `count` messages from `q` on a channel of its own (acking each), checking every
/// one; returns them in delivery order.
async fn drain(conn: &lapin::Connection, q: &str, count: u32) -> Vec<Seen> {
    drain_until(conn, q, count, &AtomicBool::new(false)).await
}

/// [`drain`] from a broker the test may kill meanwhile (`dead`): stops early, returning what
/// it has, when the connection goes away.
async fn drain_until(
    conn: &lapin::Connection,
    q: &str,
    count: u32,
    dead: &AtomicBool,
) -> Vec<Seen> {
    let mut seen = Vec::new();
    if count == 0 {
        return seen;
    }
    let Some(Ok(ch)) = bounded(dead, "channel.open", conn.create_channel()).await else {
        return seen;
    };
    let qos = bounded(
        dead,
        "basic.qos",
        ch.basic_qos(1000, BasicQosOptions::default()),
    )
    .await;
    if !matches!(qos, Some(Ok(()))) {
        return seen;
    }
    let consume = ch.basic_consume(
        q.into(),
        "drain".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    );
    let Some(Ok(mut consumer)) = bounded(dead, "basic.consume", consume).await else {
        return seen;
    };
    while seen.len() < count as usize {
        let Some(Some(Ok(d))) = bounded(dead, "a delivery", consumer.next()).await else {
            break;
        };
        let n = check(&d.properties, &d.data);
        seen.push(Seen {
            n,
            redelivered: d.redelivered,
        });
        let acked = bounded(dead, "basic.ack", d.ack(BasicAckOptions::default())).await;
        if !matches!(acked, Some(Ok(_))) {
            break;
        }
    }
    let _ = bounded(dead, "channel.close", ch.close(200, "drained".into())).await;
    seen
}

fn assert_in_order(seen: &[Seen]) {
    for w in seen.windows(2) {
        assert!(
            w[0].n < w[1].n,
            "delivered in publish order: {} then {}",
            w[0].n,
            w[1].n
        );
    }
}

// ---- the tests --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_load_keeps_every_confirmed_message_once_in_order_intact() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(&dir);
    let server = Server::start(&data);
    let conn = server.connect().await;
    let (ch, _) = durable_queue(&conn, "durable-load").await;
    let stop = Arc::new(AtomicBool::new(false));
    let dead = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(publish_load(
        ch,
        "durable-load".into(),
        0,
        stop.clone(),
        dead.clone(),
    ));
    // Let the load run until a good number of messages are confirmed, then stop the broker.
    tokio::time::sleep(Duration::from_millis(400)).await;
    dead.store(true, Ordering::SeqCst);
    let server_status = tokio::task::spawn_blocking(move || server.stop("TERM"))
        .await
        .unwrap();
    assert!(
        server_status.success(),
        "SIGTERM is a clean exit: {server_status}"
    );
    let confirmed = load.await.unwrap();
    assert!(!confirmed.is_empty(), "some messages were confirmed");

    let server = Server::start(&data);
    let conn = server.connect().await;
    let (_ch, count) = durable_queue(&conn, "durable-load").await;
    let seen = drain(&conn, "durable-load", count).await;
    assert_eq!(seen.len(), count as usize, "every ready message delivered");
    assert_in_order(&seen);
    let got: HashSet<u64> = seen.iter().map(|s| s.n).collect();
    for n in &confirmed {
        assert!(got.contains(n), "confirmed message {n} survived SIGTERM");
    }
    assert!(
        seen.iter().all(|s| !s.redelivered),
        "nothing was delivered before"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_in_20_cycles_never_loses_a_confirmed_message() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(&dir);
    let q = "kill-loop";
    let mut rng = rand::rng();
    // Confirmed and not yet received by a drain.
    let mut owed: BTreeSet<u64> = BTreeSet::new();
    // Received by a drain whose acks may not have reached the disk: may come back once more.
    let mut unsettled: HashSet<u64> = HashSet::new();
    let mut received: HashSet<u64> = HashSet::new();
    let mut next = 0u64;
    let mut total_confirmed = 0usize;
    for cycle in 0..20 {
        let server = Server::start(&data);
        let kill_after = Duration::from_millis(rng.random_range(20..350));
        let conn = server.connect().await;
        let (_ch, count) = durable_queue(&conn, q).await;
        let dead = Arc::new(AtomicBool::new(false));
        let flag = dead.clone();
        let killer = tokio::spawn(async move {
            tokio::time::sleep(kill_after).await;
            // Set first: from here on a client call may hang.
            flag.store(true, Ordering::SeqCst);
            tokio::task::spawn_blocking(move || server.stop("KILL"))
                .await
                .unwrap()
        });
        // Drain what the last cycles left (racing the kill), then publish until killed.
        let seen = drain_until(&conn, q, count, &dead).await;
        assert_in_order(&seen);
        let complete = seen.len() == count as usize;
        for s in &seen {
            if received.contains(&s.n) {
                assert!(
                    unsettled.contains(&s.n),
                    "cycle {cycle}: message {} came back although its ack was on disk",
                    s.n
                );
                unsettled.remove(&s.n);
            } else {
                received.insert(s.n);
            }
            owed.remove(&s.n);
        }
        if complete {
            assert!(
                owed.is_empty(),
                "cycle {cycle}: confirmed messages missing after restart: {:?}",
                owed.iter().take(10).collect::<Vec<_>>()
            );
        }
        let drained: Vec<u64> = seen.iter().map(|s| s.n).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let confirmed = match bounded(&dead, "queue.declare", try_durable_queue(&conn, q)).await {
            Some(Ok((pch, _))) => publish_load(pch, q.into(), next, stop, dead.clone()).await,
            _ => Vec::new(),
        };
        killer.await.unwrap();
        if confirmed.is_empty() {
            // No confirm after the drain's acks: they may not be on disk.
            unsettled.extend(drained);
        } else {
            // A confirm covers every operation the broker took in before it, acks included.
            for n in drained {
                unsettled.remove(&n);
            }
        }
        total_confirmed += confirmed.len();
        owed.extend(confirmed.iter().copied());
        // Unconfirmed numbers are never reused, so a stale copy of one cannot pass for another.
        next += 1_000_000;
    }
    // A last start: everything owed is there.
    let server = Server::start(&data);
    let conn = server.connect().await;
    let (_ch, count) = durable_queue(&conn, q).await;
    let seen = drain(&conn, q, count).await;
    assert_eq!(seen.len(), count as usize);
    assert_in_order(&seen);
    for s in &seen {
        owed.remove(&s.n);
        if received.contains(&s.n) {
            assert!(unsettled.contains(&s.n), "message {} came back twice", s.n);
        }
    }
    assert!(owed.is_empty(), "confirmed messages lost: {owed:?}");
    assert!(total_confirmed > 0, "the load got confirms at all");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_unacked_messages_come_back_redelivered_after_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(&dir);
    let server = Server::start(&data);
    let conn = server.connect().await;
    let (ch, _) = durable_queue(&conn, "unacked").await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for n in 0..10 {
        let c = ch
            .basic_publish(
                "".into(),
                "unacked".into(),
                BasicPublishOptions::default(),
                &body(n),
                properties(n),
            )
            .await
            .unwrap();
        assert_eq!(c.await.unwrap(), Confirmation::Ack(None));
    }
    // Take 0..4 with basic.get, ack 0 and 1, leave 2 and 3 unacked.
    let cch = conn.create_channel().await.unwrap();
    let mut tags = Vec::new();
    for n in 0..4 {
        let got = cch
            .basic_get("unacked".into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
            .expect("a message");
        assert_eq!(check(&got.delivery.properties, &got.delivery.data), n);
        tags.push(got.delivery.delivery_tag);
    }
    cch.basic_ack(tags[1], BasicAckOptions { multiple: true })
        .await
        .unwrap();
    // One more confirmed publish: its confirm means the delivery marks and acks taken in
    // before it are on disk.
    let c = ch
        .basic_publish(
            "".into(),
            "unacked".into(),
            BasicPublishOptions::default(),
            &body(10),
            properties(10),
        )
        .await
        .unwrap();
    assert_eq!(c.await.unwrap(), Confirmation::Ack(None));
    tokio::task::spawn_blocking(move || server.stop("KILL"))
        .await
        .unwrap();

    let server = Server::start(&data);
    let conn = server.connect().await;
    let (_ch, count) = durable_queue(&conn, "unacked").await;
    assert_eq!(count, 9, "2..=10 are back");
    let seen = drain(&conn, "unacked", count).await;
    let got: Vec<(u64, bool)> = seen.iter().map(|s| (s.n, s.redelivered)).collect();
    let want: Vec<(u64, bool)> = (2..=10).map(|n| (n, n < 4)).collect();
    assert_eq!(got, want, "2 and 3 come back redelivered, in order");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_topology_returns_and_transient_things_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir(&dir);
    let server = Server::start(&data);
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(100));
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(3_600_000));
    ch.exchange_declare(
        "dx".into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.exchange_declare(
        "tx".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare("dq".into(), durable, args.clone())
        .await
        .unwrap();
    ch.queue_declare(
        "tq".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "dq".into(),
        "dx".into(),
        "a.*".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "tq".into(),
        "dx".into(),
        "a.*".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    // Persistent (to both queues) and non-persistent messages through the durable exchange.
    for (n, persistent) in [(1u64, true), (2, false), (3, true)] {
        let mut p = properties(n);
        if !persistent {
            p = p.with_delivery_mode(1);
        }
        let c = ch
            .basic_publish(
                "dx".into(),
                "a.b".into(),
                BasicPublishOptions::default(),
                &body(n),
                p,
            )
            .await
            .unwrap();
        assert_eq!(c.await.unwrap(), Confirmation::Ack(None));
    }
    assert!(tokio::task::spawn_blocking(move || server.stop("TERM"))
        .await
        .unwrap()
        .success());

    let server = Server::start(&data);
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    // The durable queue is back with its arguments: an equal declare passes, a different
    // one is refused as inequivalent.
    let declared = ch
        .queue_declare("dq".into(), durable, args.clone())
        .await
        .unwrap();
    assert_eq!(declared.message_count(), 2, "the two persistent messages");
    let mut other = args.clone();
    other.insert("x-max-length".into(), AMQPValue::LongLongInt(5));
    let err = ch
        .queue_declare("dq".into(), durable, other)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("inequivalent arg 'x-max-length'"),
        "{err}"
    );
    let ch = conn.create_channel().await.unwrap();
    // The transient queue and exchange are gone.
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let err = ch
        .queue_declare("tq".into(), passive, FieldTable::default())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("404") || err.to_string().contains("NOT_FOUND"),
        "{err}"
    );
    let ch = conn.create_channel().await.unwrap();
    let err = ch
        .exchange_declare(
            "tx".into(),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("404") || err.to_string().contains("NOT_FOUND"),
        "{err}"
    );
    let ch = conn.create_channel().await.unwrap();
    // The durable exchange and its binding are back: a publish to it reaches dq.
    ch.exchange_declare(
        "dx".into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "dx".into(),
        "a.c".into(),
        BasicPublishOptions::default(),
        &body(4),
        properties(4),
    )
    .await
    .unwrap();
    let seen = drain(&conn, "dq", 3).await;
    let got: Vec<u64> = seen.iter().map(|s| s.n).collect();
    assert_eq!(
        got,
        [1, 3, 4],
        "persistent ones back in order, then the new one"
    );
    drop(server);
}
