//! Test support: an in-process mqic on port 0 with its own data dir, client connections
//! from the real client libraries, a raw frame client for malformed input, and the
//! `SKIP`/strict rule for tests that need an external program.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::BytesMut;
use mqic::amqp::codec::{self, Frame};
use mqic::app::App;
use mqic::config::Config;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
