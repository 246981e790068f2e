//! Test support: an in-process mqic on port 0 with its own data dir, client connections
//! from the real client libraries, a raw frame client for malformed input, and the
//! `SKIP`/strict rule for tests that need an external program.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use amqprs::callbacks::{ChannelCallback, ConnectionCallback};
use bytes::BytesMut;
use mqic::amqp::codec::{self, Frame};
use mqic::app::App;
use mqic::config::Config;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// A running mqic for one test.
pub struct TestServer {
    pub app: App,
    pub addr: SocketAddr,
    pub dir: TempDir,
}

impl TestServer {
    /// Starts mqic on the embedded defaults, AMQP on 127.0.0.1:0.
    pub async fn start() -> TestServer {
        TestServer::start_with(|_| {}).await
    }

    /// Starts mqic after `tweak` has adjusted the config.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::embedded();
        config.data_dir = dir.path().join("data");
        config.amqp.listen = "127.0.0.1:0".parse().unwrap();
        config.management.listen = "127.0.0.1:0".parse().unwrap();
        config.prometheus.listen = "127.0.0.1:0".parse().unwrap();
        config.web.listen = "127.0.0.1:0".parse().unwrap();
        tweak(&mut config);
        let app = App::start(config).await.expect("mqic starts");
        let addr = app.amqp_addr;
        TestServer { app, addr, dir }
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    pub async fn lapin(&self) -> lapin::Connection {
        lapin::Connection::connect(&self.url(), lapin::ConnectionProperties::default())
            .await
            .expect("lapin connects")
    }

    pub async fn amqprs(&self) -> amqprs::connection::Connection {
        let args = amqprs::connection::OpenConnectionArguments::new(
            "127.0.0.1",
            self.addr.port(),
            "guest",
            "guest",
        );
        amqprs::connection::Connection::open(&args)
            .await
            .expect("amqprs connects")
    }

    pub async fn stop(self) {
        self.app.shutdown().await;
    }
}

/// True when the program is on PATH. Otherwise prints `SKIP <test>: <program> not found`
/// and returns false, or fails the test when `MQIC_TEST_STRICT=1`.
pub fn have_program(test: &str, program: &str) -> bool {
    if which(program).is_some() {
        return true;
    }
    skip(test, &format!("{program} not found"));
    false
}

pub fn skip(test: &str, why: &str) {
    if std::env::var("MQIC_TEST_STRICT").as_deref() == Ok("1") {
        panic!("{test}: {why} (MQIC_TEST_STRICT=1 forbids skipping)");
    }
    println!("SKIP {test}: {why}");
}

pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Waits for `cond` to hold, polling; panics with `what` after 10 s.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A hand-driven AMQP client for the cases real libraries cannot produce (bad headers,
/// malformed or oversized frames, exact tune values).
pub struct RawClient {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        RawClient {
            stream: TcpStream::connect(addr).await.expect("tcp connect"),
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    pub async fn send_method(&mut self, channel: u16, method: amq_protocol::protocol::AMQPClass) {
        let mut b = BytesMut::new();
        codec::encode_method(&mut b, channel, &method);
        self.send(&b).await;
    }

    /// Reads raw bytes until the peer closes or 5 s pass.
    pub async fn read_to_end(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(5), self.stream.read_to_end(&mut out)).await;
        out
    }

    /// The next frame (skipping heartbeats), or None when the peer closed.
    pub async fn frame(&mut self) -> Option<Frame> {
        loop {
            match codec::decode_frame(&mut self.buf, 1 << 20).expect("server sends valid frames") {
                Some(Frame::Heartbeat { .. }) => continue,
                Some(f) => return Some(f),
                None => {}
            }
            let n =
                tokio::time::timeout(Duration::from_secs(10), self.stream.read_buf(&mut self.buf))
                    .await
                    .expect("server answers within 10 s")
                    .ok()?;
            if n == 0 {
                return None;
            }
        }
    }

    /// The next method, decoded.
    pub async fn method(&mut self) -> Option<(u16, amq_protocol::protocol::AMQPClass)> {
        loop {
            if let Frame::Method {
                channel, payload, ..
            } = self.frame().await?
            {
                return Some((
                    channel,
                    codec::decode_method(&payload).expect("valid method"),
                ));
            }
        }
    }

    /// Runs the handshake as guest/guest with the given tune-ok values; returns the
    /// server's tune.
    pub async fn handshake(
        &mut self,
        channel_max: u16,
        frame_max: u32,
        heartbeat: u16,
    ) -> amq_protocol::protocol::connection::Tune {
        use amq_protocol::protocol::{connection as c, AMQPClass};
        use amq_protocol::types::{AMQPValue, FieldTable};
        self.send(codec::PROTOCOL_HEADER).await;
        let Some((0, AMQPClass::Connection(c::AMQPMethod::Start(_)))) = self.method().await else {
            panic!("expected connection.start");
        };
        let mut caps = FieldTable::default();
        caps.insert(
            "authentication_failure_close".into(),
            AMQPValue::Boolean(true),
        );
        caps.insert("connection.blocked".into(), AMQPValue::Boolean(true));
        caps.insert("consumer_cancel_notify".into(), AMQPValue::Boolean(true));
        let mut props = FieldTable::default();
        props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        self.send_method(
            0,
            AMQPClass::Connection(c::AMQPMethod::StartOk(c::StartOk {
                client_properties: props,
                mechanism: "PLAIN".into(),
                response: "\0guest\0guest".into(),
                locale: "en_US".into(),
            })),
        )
        .await;
        let Some((0, AMQPClass::Connection(c::AMQPMethod::Tune(tune)))) = self.method().await
        else {
            panic!("expected connection.tune");
        };
        self.send_method(
            0,
            AMQPClass::Connection(c::AMQPMethod::TuneOk(c::TuneOk {
                channel_max,
                frame_max,
                heartbeat,
            })),
        )
        .await;
        tune
    }

    /// Sends connection.open for "/" and expects open-ok.
    pub async fn open(&mut self) {
        use amq_protocol::protocol::{connection as c, AMQPClass};
        self.send_method(
            0,
            AMQPClass::Connection(c::AMQPMethod::Open(c::Open {
                virtual_host: "/".into(),
            })),
        )
        .await;
        match self.method().await {
            Some((0, AMQPClass::Connection(c::AMQPMethod::OpenOk(_)))) => {}
            other => panic!("expected open-ok, got {other:?}"),
        }
    }

    /// Expects `connection.close` with this reply code; returns its text.
    pub async fn expect_connection_close(&mut self, code: u16) -> String {
        use amq_protocol::protocol::{connection as c, AMQPClass};
        loop {
            match self.method().await {
                Some((0, AMQPClass::Connection(c::AMQPMethod::Close(close)))) => {
                    assert_eq!(close.reply_code, code, "close text: {}", close.reply_text);
                    return close.reply_text.to_string();
                }
                Some(_) => continue,
                None => panic!("connection dropped without connection.close {code}"),
            }
        }
    }
}

// ---- Helpers added for tests/it/basic.rs -------------------------------------------------

/// Awaits `fut`, panicking with `what` after 5 s.
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after 5 s waiting for: {what}"))
}

/// A content-carrying method (`basic.deliver`, `get-ok`, `return`) as the raw client saw it.
#[derive(Debug)]
pub struct RawContent {
    pub channel: u16,
    pub method: amq_protocol::protocol::AMQPClass,
    pub class_id: u16,
    pub body_size: u64,
    /// Property flags and list exactly as received.
    pub properties: bytes::Bytes,
    pub body: Vec<u8>,
    /// Payload size of each body frame, in order.
    pub body_frames: Vec<usize>,
}

impl RawClient {
    /// Connects, runs the handshake with this frame_max (no heartbeats) and opens "/".
    pub async fn connected(addr: SocketAddr, frame_max: u32) -> RawClient {
        let mut c = RawClient::connect(addr).await;
        c.handshake(2047, frame_max, 0).await;
        c.open().await;
        c
    }

    /// Sends `method` on `channel` and returns the next method the server sends.
    pub async fn call(
        &mut self,
        channel: u16,
        method: amq_protocol::protocol::AMQPClass,
    ) -> amq_protocol::protocol::AMQPClass {
        self.send_method(channel, method).await;
        match self.method().await {
            Some((ch, m)) if ch == channel => m,
            other => panic!("expected a reply on channel {channel}, got {other:?}"),
        }
    }

    /// Opens a channel and expects open-ok.
    pub async fn open_channel(&mut self, channel: u16) {
        use amq_protocol::protocol::{channel as chan, AMQPClass};
        match self
            .call(
                channel,
                AMQPClass::Channel(chan::AMQPMethod::Open(chan::Open {})),
            )
            .await
        {
            AMQPClass::Channel(chan::AMQPMethod::OpenOk(_)) => {}
            other => panic!("expected channel.open-ok, got {other:?}"),
        }
    }

    /// Sends `basic.publish`, a content header carrying `properties` verbatim (flags and
    /// list) and `body` cut into body frames of at most `frame_max - 8` bytes.
    #[allow(clippy::too_many_arguments)]
    pub async fn publish_raw(
        &mut self,
        channel: u16,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        immediate: bool,
        properties: &[u8],
        body: &[u8],
        frame_max: usize,
    ) {
        use amq_protocol::protocol::{basic, AMQPClass};
        use bytes::BufMut;
        let mut b = BytesMut::new();
        codec::encode_method(
            &mut b,
            channel,
            &AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: exchange.into(),
                routing_key: routing_key.into(),
                mandatory,
                immediate,
            })),
        );
        b.put_u8(codec::FRAME_HEADER);
        b.put_u16(channel);
        b.put_u32((12 + properties.len()) as u32);
        b.put_u16(60);
        b.put_u16(0);
        b.put_u64(body.len() as u64);
        b.extend_from_slice(properties);
        b.put_u8(codec::FRAME_END);
        for part in body.chunks(frame_max - codec::FRAME_OVERHEAD) {
            b.put_u8(codec::FRAME_BODY);
            b.put_u16(channel);
            b.put_u32(part.len() as u32);
            b.extend_from_slice(part);
            b.put_u8(codec::FRAME_END);
        }
        self.send(&b).await;
    }

    /// The next frame, which must be a method; content methods come with their header and body.
    pub async fn content(&mut self) -> RawContent {
        use amq_protocol::protocol::{basic, AMQPClass};
        let Some(Frame::Method {
            channel, payload, ..
        }) = self.frame().await
        else {
            panic!("expected a method frame");
        };
        let method = codec::decode_method(&payload).expect("valid method");
        if !matches!(
            method,
            AMQPClass::Basic(
                basic::AMQPMethod::Deliver(_)
                    | basic::AMQPMethod::GetOk(_)
                    | basic::AMQPMethod::Return(_)
            )
        ) {
            panic!("expected a content-carrying method, got {method:?}");
        }
        let Some(Frame::Header {
            channel: hch,
            class_id,
            body_size,
            properties,
        }) = self.frame().await
        else {
            panic!("expected a content header after {method:?}");
        };
        assert_eq!(hch, channel, "content header on the method's channel");
        let mut body = Vec::with_capacity(body_size as usize);
        let mut body_frames = Vec::new();
        while (body.len() as u64) < body_size {
            match self.frame().await {
                Some(Frame::Body {
                    channel: bch,
                    payload,
                }) => {
                    assert_eq!(bch, channel, "body frame on the method's channel");
                    body_frames.push(payload.len());
                    body.extend_from_slice(&payload);
                }
                other => panic!("expected a body frame, got {other:?}"),
            }
        }
        assert_eq!(
            body.len() as u64,
            body_size,
            "body matches the header's size"
        );
        RawContent {
            channel,
            method,
            class_id,
            body_size,
            properties,
            body,
            body_frames,
        }
    }

    /// Expects `channel.close` with this reply code on `channel`; answers close-ok and
    /// returns the reply text.
    pub async fn expect_channel_close(&mut self, channel: u16, code: u16) -> String {
        use amq_protocol::protocol::{channel as chan, AMQPClass};
        loop {
            match self.method().await {
                Some((ch, AMQPClass::Channel(chan::AMQPMethod::Close(close)))) if ch == channel => {
                    assert_eq!(close.reply_code, code, "close text: {}", close.reply_text);
                    self.send_method(
                        channel,
                        AMQPClass::Channel(chan::AMQPMethod::CloseOk(chan::CloseOk {})),
                    )
                    .await;
                    return close.reply_text.to_string();
                }
                Some(_) => continue,
                None => panic!("connection dropped without channel.close {code}"),
            }
        }
    }
}

// ---- Helpers added for tests/it/handshake.rs ---------------------------------------------

impl RawClient {
    /// The next frame, heartbeats included. `Ok(None)` when the peer closed (EOF or reset),
    /// `Err` when no complete frame arrived within `within`.
    pub async fn next_frame_within(
        &mut self,
        within: Duration,
    ) -> Result<Option<Frame>, tokio::time::error::Elapsed> {
        tokio::time::timeout(within, async {
            loop {
                if let Some(f) =
                    codec::decode_frame(&mut self.buf, 1 << 20).expect("server sends valid frames")
                {
                    return Some(f);
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
    }

    /// Waits up to `within` for the peer to close the socket (EOF or reset). Returns every
    /// byte received before the close (buffered ones included), or `None` while still open.
    pub async fn wait_closed(&mut self, within: Duration) -> Option<Vec<u8>> {
        let mut all = self.buf.split().to_vec();
        let stream = &mut self.stream;
        let closed = tokio::time::timeout(within, async {
            let mut chunk = [0u8; 4096];
            loop {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => all.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        closed.ok().map(|()| all)
    }
}

// ---- Helpers added for tests/it/topology.rs ----------------------------------------------

/// The reply code and text of a lapin error that the broker raised with `channel.close` or
/// `connection.close`. Panics on any other kind of error.
pub fn lapin_reply(e: &lapin::Error) -> (u16, String) {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(err) => (err.get_id(), err.get_message().to_string()),
        other => panic!("expected an AMQP error from the broker, got {other:?}"),
    }
}

/// Asserts that `result` is the broker's error `code`; returns its reply text.
pub fn expect_lapin_error<T>(what: &str, result: lapin::Result<T>, code: u16) -> String {
    match result {
        Ok(_) => panic!("{what}: expected AMQP error {code}, got Ok"),
        Err(e) => {
            let (got, text) = lapin_reply(&e);
            assert_eq!(got, code, "{what}: reply text {text}");
            text
        }
    }
}

/// Asserts that `result` is the broker's error `code` with exactly the reply `text`.
pub fn expect_lapin_reply<T>(what: &str, result: lapin::Result<T>, code: u16, text: &str) {
    let got = expect_lapin_error(what, result, code);
    assert_eq!(got, text, "{what}");
}

// ---- amqprs callbacks, shared by tests/it/basic.rs and tests/it/topology.rs ---------------

/// What amqprs callbacks report, forwarded to the test.
#[derive(Debug, PartialEq)]
pub enum Ev {
    ConnectionClose(u16, String),
    Blocked(String),
    Unblocked,
    ChannelClose(u16, String),
    Cancel(String),
    Ack(u64, bool),
    Nack(u64, bool),
    Return(u16, String, Vec<u8>),
}

/// An amqprs connection and channel callback that forwards every event to a channel.
/// The traits are `#[async_trait]`; these are the methods that macro would generate.
#[derive(Clone)]
pub struct Events(mpsc::UnboundedSender<Ev>);

type Fut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
type AmqprsResult<T> = Result<T, amqprs::error::Error>;

pub fn events() -> (Events, mpsc::UnboundedReceiver<Ev>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Events(tx), rx)
}

impl Events {
    fn ready<'a, T: Send + 'a>(&self, ev: Ev, value: T) -> Fut<'a, T> {
        let _ = self.0.send(ev);
        Box::pin(std::future::ready(value))
    }
}

impl ConnectionCallback for Events {
    fn close<'l0, 'l1, 'at>(
        &'l0 mut self,
        _: &'l1 amqprs::connection::Connection,
        close: amqprs::Close,
    ) -> Fut<'at, AmqprsResult<()>>
    where
        'l0: 'at,
        'l1: 'at,
        Self: 'at,
    {
        let ev = Ev::ConnectionClose(close.reply_code(), close.reply_text().clone());
        self.ready(ev, Ok(()))
    }

    fn blocked<'l0, 'l1, 'at>(
        &'l0 mut self,
        _: &'l1 amqprs::connection::Connection,
        reason: String,
    ) -> Fut<'at, ()>
    where
        'l0: 'at,
        'l1: 'at,
        Self: 'at,
    {
        self.ready(Ev::Blocked(reason), ())
    }

    fn unblocked<'l0, 'l1, 'at>(
        &'l0 mut self,
        _: &'l1 amqprs::connection::Connection,
    ) -> Fut<'at, ()>
    where
        'l0: 'at,
        'l1: 'at,
        Self: 'at,
    {
        self.ready(Ev::Unblocked, ())
    }

    fn secret_updated<'l0, 'l1, 'at>(
        &'l0 mut self,
        _: &'l1 amqprs::connection::Connection,
    ) -> Fut<'at, ()>
    where
        'l0: 'at,
        'l1: 'at,
        Self: 'at,
    {
        Box::pin(std::future::ready(()))
    }
}

impl ChannelCallback for Events {
    fn close<'l0, 'l1, 'at>(
        &'l0 mut self,
        _: &'l1 amqprs::channel::Channel,
        close: amqprs::CloseChannel,
    ) -> Fut<'at, AmqprsResult<()>>
    where
        'l0: 'at,
        'l1: 'at,
        Self: 'at,
    {
        let ev = Ev::ChannelClose(close.reply_code(), close.reply_text().clone());
        self.ready(ev, Ok(()))
    }

    fn cancel<'l0, 'l1, 'at>(
        &'l0 mut self,
        _: &'l1 amqprs::channel::Channel,
        cancel: amqprs::Cancel,
    ) -> Fut<'at, AmqprsResult<()>>
    where
        'l0: 'at,
        'l1: 'at,
        Self: 'at,
    {
        self.ready(Ev::Cancel(cancel.consumer_tag().clone()), Ok(()))
    }

    fn flow<'l0, 'l1, 'at>(
        &'l0 mut self,
        _: &'l1 amqprs::channel::Channel,
        active: bool,
    ) -> Fut<'at, AmqprsResult<bool>>
    where
        'l0: 'at,
        'l1: 'at,
        Self: 'at,
    {
        Box::pin(std::future::ready(Ok(active)))
    }

    fn publish_ack<'l0, 'l1, 'at>(
        &'l0 mut self,
        _: &'l1 amqprs::channel::Channel,
        ack: amqprs::Ack,
    ) -> Fut<'at, ()>
    where
        'l0: 'at,
        'l1: 'at,
        Self: 'at,
    {
        self.ready(Ev::Ack(ack.delivery_tag(), ack.mutiple()), ())
    }

    fn publish_nack<'l0, 'l1, 'at>(
        &'l0 mut self,
        _: &'l1 amqprs::channel::Channel,
        nack: amqprs::Nack,
    ) -> Fut<'at, ()>
    where
        'l0: 'at,
        'l1: 'at,
        Self: 'at,
    {
        self.ready(Ev::Nack(nack.delivery_tag(), nack.multiple()), ())
    }

    fn publish_return<'l0, 'l1, 'at>(
        &'l0 mut self,
        _: &'l1 amqprs::channel::Channel,
        ret: amqprs::Return,
        _props: amqprs::BasicProperties,
        content: Vec<u8>,
    ) -> Fut<'at, ()>
    where
        'l0: 'at,
        'l1: 'at,
        Self: 'at,
    {
        let ev = Ev::Return(ret.reply_code(), ret.reply_text().clone(), content);
        self.ready(ev, ())
    }
}

pub async fn next_ev(rx: &mut mpsc::UnboundedReceiver<Ev>) -> Ev {
    within("an amqprs callback", rx.recv())
        .await
        .expect("callback channel open")
}

/// Opens an amqprs channel whose callback events (server-side closes among them) are
/// reported on the returned receiver.
pub async fn amqprs_watched_channel(
    conn: &amqprs::connection::Connection,
) -> (amqprs::channel::Channel, mpsc::UnboundedReceiver<Ev>) {
    let (cb, rx) = events();
    let ch = conn
        .open_channel(None)
        .await
        .expect("amqprs opens a channel");
    ch.register_callback(cb)
        .await
        .expect("amqprs registers the callback");
    (ch, rx)
}

/// Waits (5 s at most) for the server to close the watched channel, passing over any other
/// callback event; asserts the code and returns the text.
pub async fn expect_amqprs_close(
    what: &str,
    events: &mut mpsc::UnboundedReceiver<Ev>,
    code: u16,
) -> String {
    let (got, text) = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.recv().await {
                Some(Ev::ChannelClose(got, text)) => return Some((got, text)),
                Some(_) => continue,
                None => return None,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: no channel.close within 5 s"))
    .unwrap_or_else(|| panic!("{what}: channel dispatcher ended without channel.close"));
    assert_eq!(got, code, "{what}: reply text {text}");
    text
}

// ---- client sequences shared by the test files -------------------------------------------

/// Declares a queue with lapin (default options and arguments); returns the name the broker
/// gave it.
pub async fn declare_queue(ch: &lapin::Channel, name: &str) -> String {
    ch.queue_declare(
        name.into(),
        lapin::options::QueueDeclareOptions::default(),
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("declare queue {name}: {e}"))
    .name()
    .to_string()
}

/// Puts `ch` in confirm mode, publishes `body` to `exchange` with `key` and waits (5 s at
/// most) for the broker's confirm. `Err` is the channel error a refused publish raised.
pub async fn publish_confirmed(
    ch: &lapin::Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
) -> lapin::Result<lapin::Confirmation> {
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    let confirm = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            lapin::options::BasicPublishOptions::default(),
            body,
            lapin::BasicProperties::default(),
        )
        .await
        .expect("publish");
    within("the publisher confirm", confirm).await
}

/// With amqprs: declares `queue`, publishes `body` to it through the default exchange and
/// consumes it (auto-ack, tag "c"); returns the consumer's receiver.
pub async fn amqprs_publish_and_consume(
    ch: &amqprs::channel::Channel,
    queue: &str,
    body: &[u8],
) -> mpsc::UnboundedReceiver<amqprs::channel::ConsumerMessage> {
    use amqprs::channel::{BasicConsumeArguments, BasicPublishArguments, QueueDeclareArguments};
    let (name, _, _) = ch
        .queue_declare(QueueDeclareArguments::new(queue))
        .await
        .unwrap()
        .unwrap();
    ch.basic_publish(
        amqprs::BasicProperties::default(),
        body.to_vec(),
        BasicPublishArguments::new("", &name),
    )
    .await
    .unwrap();
    let (_tag, rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new(&name, "c")
                .auto_ack(true)
                .finish(),
        )
        .await
        .unwrap();
    rx
}
