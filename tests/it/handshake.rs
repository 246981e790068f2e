//! The wire layer as clients see it: protocol header, `connection.start` properties, SASL
//! (PLAIN, AMQPLAIN, configured users, failures), tune validation, the handshake timeout,
//! vhosts, heartbeats, connection and channel close in both directions, `channel.flow`,
//! channel numbers, the connection limit, malformed input and TLS.
//!
//! Expected behaviour is RabbitMQ 3.x's (`rabbit_reader.erl`, `rabbit_channel.erl`), as
//! summarised in `shared/reference/amqp-broker.md` §1.1, §1.7 and §1.8.

use std::time::Duration;

use amq_protocol::protocol::{basic, channel as chan, connection as c, queue, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable as RawTable, LongString};
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use mqic::amqp::codec::{self, Frame};
use mqic::config::{TlsConfig, UserConfig};

use crate::support::{amqprs_publish_and_consume, publish_confirmed, RawClient, TestServer};

/// The nine capabilities RabbitMQ 3.x advertises, all `t` (boolean true).
const CAPABILITIES: [&str; 9] = [
    "publisher_confirms",
    "exchange_exchange_bindings",
    "basic.nack",
    "consumer_cancel_notify",
    "connection.blocked",
    "consumer_priorities",
    "authentication_failure_close",
    "per_consumer_qos",
    "direct_reply_to",
];

const WAIT: Duration = Duration::from_secs(5);

// ---- helpers ------------------------------------------------------------------------------

/// Sends the 0-9-1 header and expects `connection.start`.
async fn begin(raw: &mut RawClient) -> c::Start {
    raw.send(codec::PROTOCOL_HEADER).await;
    match raw.method().await {
        Some((0, AMQPClass::Connection(c::AMQPMethod::Start(start)))) => start,
        other => panic!("expected connection.start, got {other:?}"),
    }
}

/// A `start-ok` with this mechanism and response; the client properties advertise
/// `authentication_failure_close` only when asked to.
fn start_ok(mechanism: &str, response: &[u8], auth_failure_close: bool) -> AMQPClass {
    let mut caps = RawTable::default();
    caps.insert(
        "authentication_failure_close".into(),
        AMQPValue::Boolean(auth_failure_close),
    );
    let mut props = RawTable::default();
    props.insert("product".into(), AMQPValue::LongString("raw".into()));
    props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    AMQPClass::Connection(c::AMQPMethod::StartOk(c::StartOk {
        client_properties: props,
        mechanism: mechanism.into(),
        response: LongString::from(response.to_vec()),
        locale: "en_US".into(),
    }))
}

/// Connects, sends the header, expects `connection.start` and answers it with this
/// `start-ok`.
async fn send_start_ok(
    server: &TestServer,
    mechanism: &str,
    response: &[u8],
    auth_failure_close: bool,
) -> RawClient {
    let mut raw = RawClient::connect(server.addr).await;
    begin(&mut raw).await;
    raw.send_method(0, start_ok(mechanism, response, auth_failure_close))
        .await;
    raw
}

/// The AMQPLAIN response: a field table of LOGIN and PASSWORD longstrs, without the 4-byte
/// table length.
fn amqplain_response(login: &str, password: &str) -> Vec<u8> {
    let mut t = Vec::new();
    for (k, v) in [("LOGIN", login), ("PASSWORD", password)] {
        t.push(k.len() as u8);
        t.extend_from_slice(k.as_bytes());
        t.push(b'S');
        t.extend_from_slice(&(v.len() as u32).to_be_bytes());
        t.extend_from_slice(v.as_bytes());
    }
    t
}

/// After `start-ok`: expects tune, answers tune-ok with the server's values and no heartbeat,
/// sends `connection.open` for `vhost` and returns the server's answer.
async fn tune_and_open(raw: &mut RawClient, vhost: &str) -> Option<(u16, AMQPClass)> {
    let tune = match raw.method().await {
        Some((0, AMQPClass::Connection(c::AMQPMethod::Tune(t)))) => t,
        other => panic!("expected connection.tune, got {other:?}"),
    };
    raw.send_method(
        0,
        AMQPClass::Connection(c::AMQPMethod::TuneOk(c::TuneOk {
            channel_max: tune.channel_max,
            frame_max: tune.frame_max,
            heartbeat: 0,
        })),
    )
    .await;
    raw.send_method(
        0,
        AMQPClass::Connection(c::AMQPMethod::Open(c::Open {
            virtual_host: vhost.into(),
        })),
    )
    .await;
    raw.method().await
}

/// Like [`tune_and_open`], but expects the server to answer `connection.open` with
/// `connection.close`, and returns it.
async fn open_refused(raw: &mut RawClient, vhost: &str) -> c::Close {
    match tune_and_open(raw, vhost).await {
        Some((0, AMQPClass::Connection(c::AMQPMethod::Close(close)))) => close,
        other => panic!("expected connection.close at open of {vhost:?}, got {other:?}"),
    }
}

/// Expects `connection.close` on channel 0 and returns it.
async fn connection_close(raw: &mut RawClient) -> c::Close {
    loop {
        match raw.method().await {
            Some((0, AMQPClass::Connection(c::AMQPMethod::Close(close)))) => return close,
            Some(_) => continue,
            None => panic!("connection dropped without connection.close"),
        }
    }
}

/// Answers the server's `connection.close` with close-ok (the server may already have stopped
/// reading) and waits for it to close the socket.
async fn answer_close(raw: &mut RawClient) {
    use tokio::io::AsyncWriteExt;
    let close_ok = method_bytes(
        0,
        &AMQPClass::Connection(c::AMQPMethod::CloseOk(c::CloseOk {})),
    );
    let _ = raw.stream.write_all(&close_ok).await;
    let rest = raw
        .wait_closed(WAIT)
        .await
        .expect("server closes the socket after connection.close");
    assert!(rest.is_empty(), "nothing after connection.close: {rest:?}");
}

/// A raw client logged in as guest on "/", no heartbeats.
async fn raw_open(server: &TestServer) -> RawClient {
    let mut raw = RawClient::connect(server.addr).await;
    raw.handshake(2047, 131_072, 0).await;
    raw.open().await;
    raw
}

fn channel_open() -> AMQPClass {
    AMQPClass::Channel(chan::AMQPMethod::Open(chan::Open {}))
}

fn queue_declare(name: &str, passive: bool) -> AMQPClass {
    AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
        queue: name.into(),
        passive,
        durable: false,
        exclusive: false,
        auto_delete: false,
        nowait: false,
        arguments: RawTable::default(),
    }))
}

/// The reply code of an AMQP error lapin reports, if it is one.
fn amqp_code(err: &lapin::Error) -> Option<u16> {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

/// Declares a queue, publishes one message with a confirm and consumes it back.
async fn lapin_round_trip(conn: &lapin::Connection, queue: &str) {
    let ch = conn.create_channel().await.expect("channel opens");
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("queue.declare");
    let confirm = publish_confirmed(&ch, "", queue, b"still here")
        .await
        .expect("confirm");
    assert!(confirm.is_ack());
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "round-trip".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let delivery = tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("delivery within 5 s")
        .expect("consumer open")
        .expect("delivery");
    assert_eq!(delivery.data, b"still here");
    ch.close(200, "done".into()).await.expect("channel.close");
}

fn lapin_url(server: &TestServer, user: &str, password: &str, vhost: &str) -> String {
    format!("amqp://{user}:{password}@{}/{vhost}", server.addr)
}

async fn lapin_connect(url: &str) -> lapin::Result<lapin::Connection> {
    lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await
}

// ---- 1. protocol header -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_protocol_header_gets_amqp_0_9_1_header_and_close() {
    let server = TestServer::start().await;
    for header in [
        &b"AMQP\x00\x00\x09\x00"[..], // 0-9-0
        b"AMQP\x01\x01\x00\x0a",      // 0-10
        b"HTTP/1.1",
    ] {
        let mut raw = RawClient::connect(server.addr).await;
        raw.send(header).await;
        let got = raw
            .wait_closed(WAIT)
            .await
            .unwrap_or_else(|| panic!("socket still open after header {header:?}"));
        assert_eq!(got, codec::PROTOCOL_HEADER, "reply to header {header:?}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_0_9_header_is_treated_as_0_9_1() {
    let server = TestServer::start().await;
    let mut raw = RawClient::connect(server.addr).await;
    raw.send(b"AMQP\x01\x01\x00\x09").await;
    match raw.method().await {
        Some((0, AMQPClass::Connection(c::AMQPMethod::Start(s)))) => {
            assert_eq!((s.version_major, s.version_minor), (0, 9));
        }
        other => panic!("expected connection.start, got {other:?}"),
    }
    drop(raw);
    server.stop().await;
}

// ---- 2. connection.start ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_start_advertises_properties_capabilities_and_mechanisms() {
    let server = TestServer::start().await;
    let mut raw = RawClient::connect(server.addr).await;
    let start = begin(&mut raw).await;
    assert_eq!((start.version_major, start.version_minor), (0, 9));
    let props = start.server_properties.inner();
    for key in [
        "product",
        "version",
        "platform",
        "cluster_name",
        "copyright",
        "information",
    ] {
        assert!(
            matches!(props.get(key), Some(AMQPValue::LongString(_))),
            "server property {key} must be a longstr ('S'), got {:?}",
            props.get(key)
        );
    }
    let Some(AMQPValue::FieldTable(caps)) = props.get("capabilities") else {
        panic!(
            "capabilities must be a table, got {:?}",
            props.get("capabilities")
        );
    };
    for cap in CAPABILITIES {
        assert_eq!(
            caps.inner().get(cap),
            Some(&AMQPValue::Boolean(true)),
            "capability {cap}"
        );
    }
    assert!(
        !props.contains_key("host"),
        "RabbitMQ does not send 'host' (errata §23)"
    );
    let mechanisms = String::from_utf8(start.mechanisms.as_bytes().to_vec()).unwrap();
    let mechanisms: Vec<&str> = mechanisms.split(' ').collect();
    assert!(mechanisms.contains(&"PLAIN"), "mechanisms {mechanisms:?}");
    assert!(
        mechanisms.contains(&"AMQPLAIN"),
        "mechanisms {mechanisms:?}"
    );
    let locales = String::from_utf8(start.locales.as_bytes().to_vec()).unwrap();
    assert!(
        locales.split(' ').any(|l| l == "en_US"),
        "locales {locales}"
    );

    // amqprs unwraps every capability as a bool and product/version/cluster_name as longstrs:
    // a wrong type would panic inside Connection::open.
    let conn = server.amqprs().await;
    let p = conn.server_properties();
    let product = match props.get("product") {
        Some(AMQPValue::LongString(s)) => String::from_utf8(s.as_bytes().to_vec()).unwrap(),
        _ => unreachable!(),
    };
    assert_eq!(p.product(), product);
    assert_ne!(p.version(), "unknown");
    assert_ne!(p.cluster_name(), "unknown");
    let caps = p.capabilities();
    assert!(caps.publisher_confirms());
    assert!(caps.exchange_exchange_bindings());
    assert!(caps.basic_nack());
    assert!(caps.consumer_cancel_notify());
    assert!(caps.connection_blocked());
    assert!(caps.consumer_priorities());
    assert!(caps.authentication_failure_close());
    assert!(caps.per_consumer_qos());
    assert!(caps.direct_reply_to());
    conn.close().await.unwrap();
    drop(raw);
    server.stop().await;
}

// ---- 3. PLAIN and AMQPLAIN ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_amqplain_both_log_in() {
    let server = TestServer::start().await;

    // PLAIN and AMQPLAIN (a field table without its length prefix), exact bytes.
    for (mechanism, response) in [
        ("PLAIN", b"\0guest\0guest".to_vec()),
        ("AMQPLAIN", amqplain_response("guest", "guest")),
    ] {
        let mut raw = send_start_ok(&server, mechanism, &response, true).await;
        match tune_and_open(&mut raw, "/").await {
            Some((0, AMQPClass::Connection(c::AMQPMethod::OpenOk(_)))) => {}
            other => panic!("{mechanism}: expected open-ok, got {other:?}"),
        }
        raw.open_channel(1).await;
    }

    // The same through the client libraries: lapin PLAIN (its default) and AMQPLAIN,
    // amqprs AMQPLAIN.
    let conn = server.lapin().await;
    lapin_round_trip(&conn, "plain-q").await;
    conn.close(200, "bye".into()).await.unwrap();
    let url = format!("{}?auth_mechanism=amqplain", server.url());
    let conn = lapin_connect(&url).await.expect("lapin AMQPLAIN login");
    lapin_round_trip(&conn, "amqplain-q").await;
    conn.close(200, "bye".into()).await.unwrap();
    let mut args =
        amqprs::connection::OpenConnectionArguments::new("127.0.0.1", server.addr.port(), "", "");
    args.credentials(amqprs::security::SecurityCredentials::new_amqplain(
        "guest", "guest",
    ));
    let conn = amqprs::connection::Connection::open(&args)
        .await
        .expect("amqprs AMQPLAIN login");
    assert!(conn.is_open());
    conn.close().await.unwrap();
    server.stop().await;
}

// ---- 4. configured users ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_user_with_salted_hash_logs_in_and_wrong_password_is_refused() {
    let hash = mqic::amqp::auth::hash_password("s3cret pass");
    let server = TestServer::start_with(move |config| {
        config.amqp.users.push(UserConfig {
            name: "alice".into(),
            password_hash: hash,
            tags: vec![],
            vhosts: vec!["/".into()],
        });
    })
    .await;
    let conn = lapin_connect(&lapin_url(&server, "alice", "s3cret%20pass", "%2f"))
        .await
        .expect("alice logs in");
    lapin_round_trip(&conn, "alice-q").await;
    conn.close(200, "bye".into()).await.unwrap();

    for (user, password) in [("alice", "wrong"), ("alice", "s3cret"), ("mallory", "x")] {
        let err = lapin_connect(&lapin_url(&server, user, password, "%2f"))
            .await
            .err()
            .unwrap_or_else(|| panic!("{user}:{password} must be refused"));
        // lapin advertises authentication_failure_close, so it gets connection.close 403.
        assert_eq!(amqp_code(&err), Some(403), "{user}:{password}: {err}");
    }
    // Guest still works next to the configured user.
    let guest = server.lapin().await;
    guest.close(200, "bye".into()).await.unwrap();
    server.stop().await;
}

// ---- 5. auth failures ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failure_close_capability_gets_403_close() {
    let server = TestServer::start().await;
    for (mechanism, response) in [
        ("PLAIN", b"\0guest\0nope".to_vec()),
        ("AMQPLAIN", amqplain_response("guest", "nope")),
    ] {
        let mut raw = send_start_ok(&server, mechanism, &response, true).await;
        let close = connection_close(&mut raw).await;
        assert_eq!(close.reply_code, 403, "{close:?}");
        assert_eq!(
            close.reply_text.as_str(),
            format!(
                "ACCESS_REFUSED - Login was refused using authentication mechanism {mechanism}. \
                 For details see the broker logfile."
            )
        );
        answer_close(&mut raw).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failure_without_capability_just_closes_the_socket() {
    let server = TestServer::start().await;
    let mut raw = send_start_ok(&server, "PLAIN", b"\0guest\0nope", false).await;
    let rest = raw.wait_closed(WAIT).await.expect("socket closed");
    assert!(
        rest.is_empty(),
        "no frame (no connection.close) for a client without authentication_failure_close: {rest:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_mechanism_gets_503_and_malformed_response_502() {
    let server = TestServer::start().await;
    let mut raw = send_start_ok(&server, "EXTERNAL", b"", true).await;
    let close = connection_close(&mut raw).await;
    assert_eq!(close.reply_code, 503, "{close:?}");
    assert_eq!(
        close.reply_text.as_str(),
        "COMMAND_INVALID - unknown authentication mechanism 'EXTERNAL'"
    );
    answer_close(&mut raw).await;

    let mut raw = send_start_ok(&server, "PLAIN", b"guest-without-nuls", true).await;
    let close = connection_close(&mut raw).await;
    assert_eq!(close.reply_code, 502, "{close:?}");
    answer_close(&mut raw).await;
    server.stop().await;
}

// ---- 6. tune ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tune_proposes_rabbitmq_defaults() {
    let server = TestServer::start().await;
    let mut raw = RawClient::connect(server.addr).await;
    let tune = raw.handshake(2047, 131_072, 60).await;
    assert_eq!(tune.frame_max, 131_072);
    assert_eq!(tune.channel_max, 2047);
    assert_eq!(tune.heartbeat, 60);
    raw.open().await;
    raw.open_channel(1).await;
    drop(raw);
    // The smallest legal frame_max and a small channel_max are accepted.
    let mut raw = RawClient::connect(server.addr).await;
    raw.handshake(1, 4096, 0).await;
    raw.open().await;
    raw.open_channel(1).await;
    drop(raw);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tune_ok_out_of_range_gets_530() {
    let server = TestServer::start().await;
    for (channel_max, frame_max, field) in [
        (2047, 131_073, "frame_max"),
        (2047, 1 << 20, "frame_max"),
        (2047, 0, "frame_max"),
        (2047, 4095, "frame_max"),
        (2047, 512, "frame_max"),
        (0, 131_072, "channel_max"),
        (2048, 131_072, "channel_max"),
        (u16::MAX, 131_072, "channel_max"),
    ] {
        let mut raw = RawClient::connect(server.addr).await;
        raw.handshake(channel_max, frame_max, 0).await;
        let text = raw.expect_connection_close(530).await;
        assert!(
            text.starts_with("NOT_ALLOWED - negotiated ") && text.contains(field),
            "channel_max {channel_max} frame_max {frame_max}: {text}"
        );
        answer_close(&mut raw).await;
    }
    server.stop().await;
}

// ---- 7. handshake timeout -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_timeout_drops_silent_clients() {
    let server = TestServer::start_with(|config| config.amqp.handshake_timeout_secs = 1).await;

    // Connects and sends nothing at all.
    let mut silent = RawClient::connect(server.addr).await;
    // Sends only the protocol header and never answers connection.start.
    let mut header_only = RawClient::connect(server.addr).await;
    begin(&mut header_only).await;
    // Completes the handshake in time: the timeout no longer applies.
    let mut done = raw_open(&server).await;

    let got = silent
        .wait_closed(WAIT)
        .await
        .expect("silent client disconnected");
    assert!(got.is_empty(), "{got:?}");
    header_only
        .wait_closed(WAIT)
        .await
        .expect("header-only client disconnected");

    tokio::time::sleep(Duration::from_millis(500)).await;
    done.open_channel(1).await;
    drop(done);
    server.stop().await;
}

// ---- 8. vhosts ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_open_checks_vhost_existence_and_user_access() {
    let hash = mqic::amqp::auth::hash_password("pw");
    let server = TestServer::start_with(move |config| {
        config.amqp.vhosts = vec!["/".into(), "lab".into()];
        config.amqp.users.push(UserConfig {
            name: "labuser".into(),
            password_hash: hash,
            tags: vec![],
            vhosts: vec!["lab".into()],
        });
    })
    .await;

    // A vhost that does not exist.
    let mut raw = send_start_ok(&server, "PLAIN", b"\0guest\0guest", true).await;
    let close = open_refused(&mut raw, "nope").await;
    assert_eq!(close.reply_code, 530);
    assert_eq!(
        close.reply_text.as_str(),
        "NOT_ALLOWED - vhost nope not found"
    );
    assert_eq!((close.class_id, close.method_id), (10, 40));
    answer_close(&mut raw).await;

    // The configured vhost opens for a user allowed on it.
    let conn = lapin_connect(&lapin_url(&server, "labuser", "pw", "lab"))
        .await
        .expect("labuser opens lab");
    lapin_round_trip(&conn, "lab-q").await;
    conn.close(200, "bye".into()).await.unwrap();

    // Users whose vhost list lacks it are refused.
    let mut raw = send_start_ok(&server, "PLAIN", b"\0guest\0guest", true).await;
    let close = open_refused(&mut raw, "lab").await;
    assert_eq!(close.reply_code, 530);
    assert_eq!(
        close.reply_text.as_str(),
        "NOT_ALLOWED - access to vhost 'lab' refused for user 'guest'"
    );
    answer_close(&mut raw).await;
    let err = lapin_connect(&lapin_url(&server, "labuser", "pw", "%2f"))
        .await
        .expect_err("labuser may not open /");
    assert_eq!(amqp_code(&err), Some(530), "{err}");
    server.stop().await;
}

// ---- 9. heartbeats ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sends_heartbeat_frames() {
    let server = TestServer::start().await;
    let mut raw = RawClient::connect(server.addr).await;
    raw.handshake(2047, 131_072, 1).await;
    raw.open().await;
    for n in 0..2 {
        match raw.next_frame_within(Duration::from_secs(3)).await {
            // Type 8, channel 0, size 0, frame-end: the 8-byte heartbeat.
            Ok(Some(Frame::Heartbeat { channel: 0 })) => {}
            other => panic!("heartbeat {n}: expected a heartbeat frame, got {other:?}"),
        }
    }
    drop(raw);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_dropped_after_two_missed_intervals() {
    let server = TestServer::start().await;
    let mut raw = RawClient::connect(server.addr).await;
    raw.handshake(2047, 131_072, 1).await;
    raw.open().await;
    // Within the first interval the connection is alive and beating.
    match raw.next_frame_within(Duration::from_secs(3)).await {
        Ok(Some(Frame::Heartbeat { channel: 0 })) => {}
        other => panic!("expected a heartbeat first, got {other:?}"),
    }
    // Then, with nothing coming from us, the server gives up (no close frame needed).
    raw.wait_closed(WAIT)
        .await
        .expect("server drops a client that sends no heartbeats");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeating_client_stays_connected() {
    let server = TestServer::start().await;
    let mut raw = RawClient::connect(server.addr).await;
    raw.handshake(2047, 131_072, 1).await;
    raw.open().await;
    let mut beats = Vec::new();
    let mut hb = bytes::BytesMut::new();
    codec::encode_heartbeat(&mut hb);
    // 3.5 intervals of heartbeats from our side, reading the server's as they come.
    let until = tokio::time::Instant::now() + Duration::from_millis(3500);
    while tokio::time::Instant::now() < until {
        raw.send(&hb).await;
        match raw.next_frame_within(Duration::from_millis(400)).await {
            Ok(Some(f)) => beats.push(f),
            Ok(None) => panic!("server closed a connection that sends heartbeats"),
            Err(_) => {}
        }
    }
    assert!(
        beats.iter().all(|f| *f == Frame::Heartbeat { channel: 0 }),
        "{beats:?}"
    );
    assert!(!beats.is_empty(), "server heartbeats arrived meanwhile");
    raw.open_channel(1).await;
    drop(raw);
    server.stop().await;
}

// ---- 10. connection.close -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connection_close_gets_close_ok() {
    let server = TestServer::start().await;
    let mut raw = raw_open(&server).await;
    raw.open_channel(1).await;
    raw.send_method(
        0,
        AMQPClass::Connection(c::AMQPMethod::Close(c::Close {
            reply_code: 200,
            reply_text: "bye".into(),
            class_id: 0,
            method_id: 0,
        })),
    )
    .await;
    match raw.method().await {
        Some((0, AMQPClass::Connection(c::AMQPMethod::CloseOk(_)))) => {}
        other => panic!("expected connection.close-ok, got {other:?}"),
    }
    raw.wait_closed(WAIT)
        .await
        .expect("server closes the socket after close-ok");
    // Through lapin too.
    let conn = server.lapin().await;
    conn.close(200, "bye".into()).await.expect("lapin close");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_connection_forced_320() {
    let server = TestServer::start().await;
    let mut raw = raw_open(&server).await;
    raw.open_channel(1).await;
    let lapin_conn = server.lapin().await;
    let stopping = tokio::spawn(server.stop());
    let close = connection_close(&mut raw).await;
    assert_eq!(close.reply_code, 320, "{close:?}");
    assert_eq!(
        close.reply_text.as_str(),
        "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"
    );
    raw.send_method(
        0,
        AMQPClass::Connection(c::AMQPMethod::CloseOk(c::CloseOk {})),
    )
    .await;
    raw.wait_closed(WAIT).await.expect("socket closed");
    // lapin answers close-ok by itself; shutdown then completes without waiting out its
    // drain deadline.
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("shutdown finishes once clients answered close-ok")
        .unwrap();
    assert!(!lapin_conn.status().connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_clients_mid_handshake() {
    // Default handshake timeout (10 s): shutdown must not sit it out.
    let server = TestServer::start().await;
    let mut silent = RawClient::connect(server.addr).await;
    let mut header_only = RawClient::connect(server.addr).await;
    begin(&mut header_only).await;
    tokio::time::timeout(WAIT, server.stop())
        .await
        .expect("shutdown finishes without waiting for handshakes to time out");
    silent
        .wait_closed(WAIT)
        .await
        .expect("silent client closed");
    header_only
        .wait_closed(WAIT)
        .await
        .expect("header-only client closed");
}

// ---- 11. channel.close --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_channel_close_gets_close_ok_and_number_is_reusable() {
    let server = TestServer::start().await;
    let mut raw = raw_open(&server).await;
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Channel(chan::AMQPMethod::Close(chan::Close {
            reply_code: 200,
            reply_text: "bye".into(),
            class_id: 0,
            method_id: 0,
        })),
    )
    .await;
    match raw.method().await {
        Some((1, AMQPClass::Channel(chan::AMQPMethod::CloseOk(_)))) => {}
        other => panic!("expected channel.close-ok on 1, got {other:?}"),
    }
    raw.open_channel(1).await;
    drop(raw);
    // lapin's channel close.
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    ch.close(200, "bye".into()).await.expect("channel close-ok");
    assert!(conn.status().connected());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_error_closes_only_that_channel() {
    let server = TestServer::start().await;

    // lapin: a passive declare of a missing queue fails with 404 on its channel only.
    let conn = server.lapin().await;
    let ch1 = conn.create_channel().await.unwrap();
    let ch2 = conn.create_channel().await.unwrap();
    let err = ch1
        .queue_declare(
            "missing".into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("passive declare of a missing queue fails");
    assert_eq!(amqp_code(&err), Some(404), "{err}");
    assert!(!ch1.status().connected());
    ch2.queue_declare(
        "present".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("the other channel still works");
    assert!(conn.status().connected());
    lapin_round_trip(&conn, "after-404").await;

    // Raw: the exact close, and everything on the closed channel ignored until close-ok.
    let mut raw = raw_open(&server).await;
    raw.open_channel(1).await;
    raw.open_channel(2).await;
    raw.send_method(1, queue_declare("missing", true)).await;
    match raw.method().await {
        Some((1, AMQPClass::Channel(chan::AMQPMethod::Close(close)))) => {
            assert_eq!(close.reply_code, 404);
            assert_eq!(
                close.reply_text.as_str(),
                "NOT_FOUND - no queue 'missing' in vhost '/'"
            );
            assert_eq!((close.class_id, close.method_id), (50, 10));
        }
        other => panic!("expected channel.close 404 on 1, got {other:?}"),
    }
    // Ignored: the channel is closing. Had it been processed, "ignored-q" would exist, and
    // the publish (method, header, body) would have put a message in "ch2-q" or failed.
    raw.send_method(1, queue_declare("ignored-q", false)).await;
    raw.publish_raw(1, "", "ch2-q", false, false, &[0, 0], b"dropped", 131_072)
        .await;
    raw.send_method(2, queue_declare("ch2-q", false)).await;
    match raw.method().await {
        Some((2, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)))) => {
            assert_eq!(ok.queue.as_str(), "ch2-q")
        }
        other => panic!("expected only declare-ok on channel 2, got {other:?}"),
    }
    raw.send_method(
        1,
        AMQPClass::Channel(chan::AMQPMethod::CloseOk(chan::CloseOk {})),
    )
    .await;
    raw.open_channel(1).await;
    raw.send_method(1, queue_declare("ignored-q", true)).await;
    let text = raw.expect_channel_close(1, 404).await;
    assert!(text.contains("ignored-q"), "{text}");
    raw.send_method(2, queue_declare("ch2-q", true)).await;
    match raw.method().await {
        Some((2, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)))) => {
            assert_eq!(
                ok.message_count, 0,
                "the publish on the closing channel was dropped"
            )
        }
        other => panic!("expected declare-ok on channel 2, got {other:?}"),
    }
    drop(raw);
    conn.close(200, "bye".into()).await.unwrap();
    server.stop().await;
}

// ---- 12. channel.flow ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_flow_true_is_acknowledged_false_is_540() {
    let server = TestServer::start().await;
    let mut raw = raw_open(&server).await;
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Channel(chan::AMQPMethod::Flow(chan::Flow { active: true })),
    )
    .await;
    match raw.method().await {
        Some((1, AMQPClass::Channel(chan::AMQPMethod::FlowOk(ok)))) => assert!(ok.active),
        other => panic!("expected channel.flow-ok, got {other:?}"),
    }
    raw.send_method(
        1,
        AMQPClass::Channel(chan::AMQPMethod::Flow(chan::Flow { active: false })),
    )
    .await;
    let close = connection_close(&mut raw).await;
    assert_eq!(close.reply_code, 540, "{close:?}");
    assert_eq!(close.reply_text.as_str(), "NOT_IMPLEMENTED - active=false");
    assert_eq!((close.class_id, close.method_id), (20, 20));
    answer_close(&mut raw).await;
    server.stop().await;
}

// ---- 13. channel numbers ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_above_negotiated_channel_max_is_530() {
    let server = TestServer::start().await;
    let mut raw = RawClient::connect(server.addr).await;
    raw.handshake(2, 131_072, 0).await;
    raw.open().await;
    raw.open_channel(1).await;
    raw.open_channel(2).await;
    // Channel 3 is above channel_max 2 (and would be a third channel of at most 2).
    raw.send_method(3, channel_open()).await;
    let text = raw.expect_connection_close(530).await;
    assert!(
        text.starts_with("NOT_ALLOWED - ") && text.contains("channel_max"),
        "{text}"
    );
    answer_close(&mut raw).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_channel_open_and_method_on_unopened_channel_are_504() {
    let server = TestServer::start().await;
    let mut raw = raw_open(&server).await;
    raw.open_channel(1).await;
    raw.send_method(1, channel_open()).await;
    let text = raw.expect_connection_close(504).await;
    assert_eq!(text, "CHANNEL_ERROR - second 'channel.open' seen");
    answer_close(&mut raw).await;

    let mut raw = raw_open(&server).await;
    raw.send_method(5, queue_declare("q", false)).await;
    let text = raw.expect_connection_close(504).await;
    assert!(
        text.starts_with("CHANNEL_ERROR - expected 'channel.open'"),
        "{text}"
    );
    answer_close(&mut raw).await;
    server.stop().await;
}

// ---- 14. connection limit -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_above_max_connections_are_refused_with_530() {
    let server = TestServer::start_with(|config| config.amqp.max_connections = 2).await;
    let first = server.lapin().await;
    let second = server.lapin().await;
    let broker = server.app.broker.clone();
    crate::support::eventually("two connections counted", || {
        broker
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
            == 2
    })
    .await;

    let mut raw = send_start_ok(&server, "PLAIN", b"\0guest\0guest", true).await;
    let close = open_refused(&mut raw, "/").await;
    assert_eq!(close.reply_code, 530, "{close:?}");
    assert!(
        close.reply_text.as_str().contains("connection limit"),
        "{close:?}"
    );
    assert_eq!((close.class_id, close.method_id), (10, 40));
    answer_close(&mut raw).await;
    let err = lapin_connect(&server.url())
        .await
        .expect_err("third lapin connection refused");
    assert_eq!(amqp_code(&err), Some(530), "{err}");

    // The existing connections are unaffected; closing one makes room.
    lapin_round_trip(&second, "limit-q").await;
    first.close(200, "bye".into()).await.unwrap();
    crate::support::eventually("one connection left", || {
        broker
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    })
    .await;
    let third = server.lapin().await;
    third.close(200, "bye".into()).await.unwrap();
    second.close(200, "bye".into()).await.unwrap();
    server.stop().await;
}

// ---- 15. malformed input ------------------------------------------------------------------

/// Opens a lapin connection, then a raw one with channel 1 open (frame_max 4096), sends
/// `bytes` and expects `connection.close` with `code`; the lapin connection must still work.
async fn malformed_closes_only_that_connection(bytes: &[u8], code: u16) -> String {
    let server = TestServer::start().await;
    let bystander = server.lapin().await;
    let mut raw = RawClient::connect(server.addr).await;
    raw.handshake(2047, 4096, 0).await;
    raw.open().await;
    raw.open_channel(1).await;
    raw.send(bytes).await;
    let text = raw.expect_connection_close(code).await;
    answer_close(&mut raw).await;
    assert!(bystander.status().connected());
    lapin_round_trip(&bystander, "bystander-q").await;
    let later = server.lapin().await;
    lapin_round_trip(&later, "later-q").await;
    later.close(200, "bye".into()).await.unwrap();
    bystander.close(200, "bye".into()).await.unwrap();
    server.stop().await;
    text
}

fn method_bytes(channel: u16, method: &AMQPClass) -> Vec<u8> {
    let mut b = bytes::BytesMut::new();
    codec::encode_method(&mut b, channel, method);
    b.to_vec()
}

/// A frame with this type, channel and payload, and the right frame-end.
fn frame(frame_type: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![frame_type];
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f.push(codec::FRAME_END);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_frame_type_is_501() {
    let text = malformed_closes_only_that_connection(&frame(9, 0, b""), 501).await;
    assert!(text.starts_with("FRAME_ERROR"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_above_frame_max_is_501_from_its_header() {
    // Only the 7-byte header, declaring a 1 MiB body frame against frame_max 4096.
    let mut header = vec![codec::FRAME_BODY, 0, 1];
    header.extend_from_slice(&(1u32 << 20).to_be_bytes());
    let text = malformed_closes_only_that_connection(&header, 501).await;
    assert!(text.starts_with("FRAME_ERROR"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frame_end_is_501() {
    let mut bytes = frame(codec::FRAME_HEARTBEAT, 0, b"");
    *bytes.last_mut().unwrap() = 0xAB;
    let text = malformed_closes_only_that_connection(&bytes, 501).await;
    assert!(text.starts_with("FRAME_ERROR"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_class_or_method_is_503() {
    // Class 99 does not exist; on an open channel.
    let text =
        malformed_closes_only_that_connection(&frame(codec::FRAME_METHOD, 1, &[0, 99, 0, 1]), 503)
            .await;
    assert!(text.starts_with("COMMAND_INVALID"), "{text}");
    // A known class with an unknown method (queue.99).
    malformed_closes_only_that_connection(&frame(codec::FRAME_METHOD, 1, &[0, 50, 0, 99]), 503)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_method_arguments_are_502() {
    // queue.declare: ticket, then a shortstr claiming 5 bytes with only 1 present.
    let payload = [0, 50, 0, 10, 0, 0, 5, b'a'];
    let text =
        malformed_closes_only_that_connection(&frame(codec::FRAME_METHOD, 1, &payload), 502).await;
    assert!(text.starts_with("SYNTAX_ERROR"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_body_without_publish_is_505() {
    let text =
        malformed_closes_only_that_connection(&frame(codec::FRAME_BODY, 1, b"stray"), 505).await;
    assert!(text.starts_with("UNEXPECTED_FRAME"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_header_without_publish_is_505() {
    // class 60, weight 0, body size 5, no properties.
    let mut payload = vec![0, 60, 0, 0];
    payload.extend_from_slice(&5u64.to_be_bytes());
    payload.extend_from_slice(&[0, 0]);
    let text =
        malformed_closes_only_that_connection(&frame(codec::FRAME_HEADER, 1, &payload), 505).await;
    assert!(text.starts_with("UNEXPECTED_FRAME"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_between_publish_and_content_header_is_505() {
    let mut bytes = method_bytes(
        1,
        &AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: "q".into(),
            mandatory: false,
            immediate: false,
        })),
    );
    bytes.extend(method_bytes(1, &queue_declare("q", false)));
    let text = malformed_closes_only_that_connection(&bytes, 505).await;
    assert!(text.starts_with("UNEXPECTED_FRAME"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_on_a_non_zero_channel_is_505() {
    // RabbitMQ: a heartbeat frame on a channel other than 0 is an unexpected frame.
    let text =
        malformed_closes_only_that_connection(&frame(codec::FRAME_HEARTBEAT, 1, b""), 505).await;
    assert!(text.starts_with("UNEXPECTED_FRAME"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_frame_on_channel_zero_is_505() {
    let text =
        malformed_closes_only_that_connection(&frame(codec::FRAME_BODY, 0, b"stray"), 505).await;
    assert!(text.starts_with("UNEXPECTED_FRAME"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_method_on_channel_zero_is_504() {
    // RabbitMQ's handle_method0 catch-all: "unexpected method in connection state running".
    let text =
        malformed_closes_only_that_connection(&method_bytes(0, &queue_declare("q", false)), 504)
            .await;
    assert_eq!(
        text,
        "CHANNEL_ERROR - unexpected method in connection state running"
    );
}

// ---- 16. TLS ------------------------------------------------------------------------------

/// Starts a server with an AMQPS listener on a fresh self-signed certificate for localhost
/// and 127.0.0.1 (PEM files in the test's temp dir); returns it and the certificate PEM.
async fn tls_server() -> (TestServer, String) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("self-signed certificate");
    let cert_pem = certified.cert.pem();
    let key_pem = certified.signing_key.serialize_pem();
    let pem = cert_pem.clone();
    let server = TestServer::start_with(move |config| {
        let dir = config
            .data_dir
            .parent()
            .expect("data dir inside the test dir")
            .to_path_buf();
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, &cert_pem).unwrap();
        std::fs::write(&key, &key_pem).unwrap();
        config.amqp.tls = Some(TlsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            cert,
            key,
        });
    })
    .await;
    (server, pem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_round_trip_with_lapin() {
    let (server, pem) = tls_server().await;
    let addr = server.app.amqps_addr.expect("AMQPS listener bound");
    assert_ne!(addr, server.addr);
    let conn = lapin::DefaultConnectionBuilder::new()
        .unwrap()
        .with_uri_str(format!("amqps://guest:guest@127.0.0.1:{}/%2f", addr.port()))
        .with_tls_config(lapin::tcp::OwnedTLSConfig {
            identity: None,
            cert_chain: Some(pem),
        })
        .connect()
        .await
        .expect("lapin connects over TLS");
    lapin_round_trip(&conn, "tls-q").await;
    conn.close(200, "bye".into()).await.unwrap();

    // Plain AMQP bytes on the TLS port do not get an AMQP session.
    let mut raw = RawClient::connect(addr).await;
    raw.send(codec::PROTOCOL_HEADER).await;
    let got = raw
        .wait_closed(WAIT)
        .await
        .expect("TLS port drops plain AMQP");
    assert!(!got.starts_with(b"AMQP") && got.len() < 64, "{got:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_round_trip_with_amqprs() {
    let (server, _pem) = tls_server().await;
    let addr = server.app.amqps_addr.expect("AMQPS listener bound");
    let ca = server.dir.path().join("cert.pem");
    let mut args = amqprs::connection::OpenConnectionArguments::new(
        "127.0.0.1",
        addr.port(),
        "guest",
        "guest",
    );
    args.tls_adaptor(
        amqprs::tls::TlsAdaptor::without_client_auth(Some(&ca), "localhost".into())
            .expect("TLS adaptor"),
    );
    let conn = amqprs::connection::Connection::open(&args)
        .await
        .expect("amqprs connects over TLS");
    let ch = conn.open_channel(None).await.unwrap();
    let mut rx = amqprs_publish_and_consume(&ch, "tls-amqprs", b"over tls").await;
    let msg = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("delivery within 5 s")
        .unwrap();
    assert_eq!(msg.content.unwrap(), b"over tls");
    ch.close().await.unwrap();
    conn.close().await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_tls_handshakes() {
    let (server, _pem) = tls_server().await;
    let addr = server.app.amqps_addr.expect("AMQPS listener bound");
    // Opens TCP to the TLS port and never sends a ClientHello.
    let mut silent = RawClient::connect(addr).await;
    tokio::time::timeout(WAIT, server.stop())
        .await
        .expect("shutdown finishes without waiting for the TLS handshake to time out");
    silent
        .wait_closed(WAIT)
        .await
        .expect("silent client closed");
}
