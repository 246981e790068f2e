//! One AMQP connection on the wire: the handshake, then a loop that reads frames, assembles
//! content, dispatches each method to its [`Channel`] and writes the replies. This is the only
//! code that touches a client socket; a writer task drains the connection's [`WireOut`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{
    access, basic, channel as chan, confirm, connection as conn, exchange, queue, tx, AMQPClass,
};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::auth;
use super::broker::Broker;
use super::channel::{Channel, Session};
use super::codec::{self, CodecError, Frame};
use super::consumer::ChannelShared;
use super::outbound::{Outbound, WireOut};
use super::reply::{AmqpError, ReplyCode, Scope};

/// The smallest frame_max a client may ask for (the spec's FRAME-MIN-SIZE, as RabbitMQ 3.x).
const FRAME_MIN_SIZE: u32 = 4096;
/// How long we wait for `close-ok` after sending `connection.close`.
const CLOSE_OK_TIMEOUT: Duration = Duration::from_secs(3);

/// What the client said it can handle in `start-ok`'s `capabilities` table.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientCapabilities {
    pub consumer_cancel_notify: bool,
    pub connection_blocked: bool,
    pub authentication_failure_close: bool,
}

impl ClientCapabilities {
    fn from_properties(props: &FieldTable) -> ClientCapabilities {
        let Some(AMQPValue::FieldTable(caps)) = props.inner().get("capabilities") else {
            return ClientCapabilities::default();
        };
        let flag = |k: &str| matches!(caps.inner().get(k), Some(AMQPValue::Boolean(true)));
        ClientCapabilities {
            consumer_cancel_notify: flag("consumer_cancel_notify"),
            connection_blocked: flag("connection.blocked"),
            authentication_failure_close: flag("authentication_failure_close"),
        }
    }
}

/// Why a connection ended, for the log.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionEnd {
    #[error("client closed the connection")]
    ClientClosed,
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("not an AMQP 0-9-1 client (protocol header {0:?})")]
    BadHeader(Vec<u8>),
    #[error("login refused: {0}")]
    LoginRefused(String),
    #[error("closed by the broker: {0}")]
    Error(AmqpError),
    #[error("missed heartbeats from client, timeout {0}s")]
    HeartbeatTimeout(u16),
    #[error("broker shutting down")]
    Shutdown,
}

/// The server properties sent in `connection.start`.
///
/// `product` is "RabbitMQ" with a 3.x version on purpose: client libraries branch on it
/// (kombu/Celery use per-channel prefetch only for RabbitMQ ≥ 3.3), and mqic implements
/// RabbitMQ's semantics, so clients behave exactly as they do against RabbitMQ. `platform`
/// and `information` say what is really answering.
fn server_properties() -> FieldTable {
    let mut caps = FieldTable::default();
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "consumer_priorities",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        caps.insert(cap.into(), AMQPValue::Boolean(true));
    }
    let mut props = FieldTable::default();
    let s = |v: &str| AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()));
    props.insert("product".into(), s("RabbitMQ"));
    props.insert("version".into(), s("3.13.7"));
    props.insert(
        "platform".into(),
        s(&format!("mqic {} (Rust)", env!("CARGO_PKG_VERSION"))),
    );
    props.insert("cluster_name".into(), s("mqic"));
    props.insert("copyright".into(), s("mqic developers"));
    props.insert(
        "information".into(),
        s("mqic: the MQI Communicator's embedded AMQP 0-9-1 broker, RabbitMQ 3.x compatible"),
    );
    props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    props
}

/// Serves one client connection until it closes. Never panics on client input.
pub async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnectionEnd>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut stream = stream;
    let mut rbuf = BytesMut::with_capacity(16 * 1024);
    let deadline = broker.limits.handshake_timeout;
    // Shutdown does not wait for handshakes to finish or time out.
    let handshake = tokio::select! {
        h = tokio::time::timeout(deadline, handshake(&mut stream, &mut rbuf, peer, &broker)) => h,
        _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => {
            return Err(ConnectionEnd::Shutdown)
        }
    };
    let opened = match handshake {
        Err(_) => return Err(ConnectionEnd::HandshakeTimeout),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(o)) => o,
    };
    broker
        .connections
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (reader, mut writer) = tokio::io::split(stream);
    let out = WireOut::new(opened.frame_max as usize);
    let writer_out = out.clone();
    let writer_task = tokio::spawn(async move {
        let mut wbuf = BytesMut::with_capacity(64 * 1024);
        loop {
            if writer_out.take(&mut wbuf) {
                if writer.write_all(&wbuf).await.is_err() {
                    writer_out.close();
                    break;
                }
                wbuf.clear();
                writer_out.after_flush();
            } else if writer_out.is_closed() {
                let _ = writer.flush().await;
                let _ = writer.shutdown().await;
                break;
            } else {
                writer_out.wait().await;
            }
        }
    });
    let mut conn = Connection {
        broker: broker.clone(),
        session: Arc::new(Session {
            connection: broker.next_connection_id(),
            user: opened.user,
            vhost: opened.vhost,
            broker: broker.clone(),
        }),
        caps: opened.caps,
        out: out.clone(),
        frame_max: opened.frame_max as usize,
        channel_max: opened.channel_max,
        channels: HashMap::new(),
        published: false,
        closing: None,
        confirm_dirty: Vec::new(),
    };
    let result = conn
        .run(reader, rbuf, opened.heartbeat, &mut shutdown)
        .await;
    conn.cleanup();
    broker
        .connections
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    out.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), writer_task).await;
    result
}

/// What the handshake settled.
struct Opened {
    user: String,
    vhost: Arc<super::broker::VHost>,
    caps: ClientCapabilities,
    frame_max: u32,
    channel_max: u16,
    heartbeat: u16,
}

async fn write_frames<S: AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &BytesMut,
) -> std::io::Result<()> {
    stream.write_all(buf).await?;
    stream.flush().await
}

async fn send_method<S: AsyncWrite + Unpin>(
    stream: &mut S,
    method: AMQPClass,
) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    codec::encode_method(&mut buf, 0, &method);
    write_frames(stream, &buf).await
}

/// Reads the next frame during the handshake (before the frame loop starts).
async fn next_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    frame_max: usize,
) -> Result<Frame, ConnectionEnd> {
    loop {
        match codec::decode_frame(buf, frame_max) {
            Ok(Some(Frame::Heartbeat { .. })) => continue,
            Ok(Some(f)) => return Ok(f),
            Ok(None) => {}
            Err(e) => return Err(ConnectionEnd::Error(codec_error(e))),
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(ConnectionEnd::ClientClosed);
        }
    }
}

/// Reads a connection-class method on channel 0 during the handshake.
async fn next_connection_method<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    frame_max: usize,
    expected: &str,
) -> Result<conn::AMQPMethod, ConnectionEnd> {
    let frame = next_frame(stream, buf, frame_max).await?;
    let unexpected = || {
        ConnectionEnd::Error(AmqpError::new(
            ReplyCode::CommandInvalid,
            format!("expected '{expected}'"),
        ))
    };
    let Frame::Method {
        channel: 0,
        payload,
        ..
    } = frame
    else {
        return Err(unexpected());
    };
    match codec::decode_method(&payload) {
        Ok(AMQPClass::Connection(m)) => Ok(m),
        Ok(_) => Err(unexpected()),
        Err(e) => Err(ConnectionEnd::Error(codec_error(e))),
    }
}

/// Sends `connection.close` during the handshake and waits briefly for close-ok.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    error: &AmqpError,
) {
    let _ = send_method(stream, close_method(error)).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match next_frame(stream, buf, 131_072).await {
                Ok(Frame::Method {
                    class_id: 10,
                    method_id: 51,
                    ..
                })
                | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

fn close_method(error: &AmqpError) -> AMQPClass {
    AMQPClass::Connection(conn::AMQPMethod::Close(conn::Close {
        reply_code: error.code.code(),
        reply_text: truncate(&error.text).into(),
        class_id: error.method.0,
        method_id: error.method.1,
    }))
}

/// Short strings hold at most 255 bytes; cut on a character boundary.
fn truncate(s: &str) -> String {
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    peer: SocketAddr,
    broker: &Broker,
) -> Result<Opened, ConnectionEnd> {
    while buf.len() < 8 {
        if stream.read_buf(buf).await? == 0 {
            return Err(ConnectionEnd::ClientClosed);
        }
    }
    let header = buf.split_to(8);
    // RabbitMQ also accepts the 0-9 header (AMQP 1 1 0 9) as 0-9-1.
    if &header[..] != codec::PROTOCOL_HEADER && &header[..] != b"AMQP\x01\x01\x00\x09" {
        let _ = write_frames(stream, &BytesMut::from(&codec::PROTOCOL_HEADER[..])).await;
        let _ = stream.shutdown().await;
        return Err(ConnectionEnd::BadHeader(header.to_vec()));
    }
    let limits = &broker.limits;
    send_method(
        stream,
        AMQPClass::Connection(conn::AMQPMethod::Start(conn::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: server_properties(),
            mechanisms: auth::MECHANISMS.into(),
            locales: "en_US".into(),
        })),
    )
    .await?;
    let frame_max = limits.frame_max as usize;
    let conn::AMQPMethod::StartOk(start_ok) =
        next_connection_method(stream, buf, frame_max, "connection.start_ok").await?
    else {
        return Err(ConnectionEnd::Error(AmqpError::new(
            ReplyCode::CommandInvalid,
            "expected 'connection.start_ok'",
        )));
    };
    let caps = ClientCapabilities::from_properties(&start_ok.client_properties);
    let mechanism = start_ok.mechanism.as_str();
    let (user, password) = match auth::parse_response(mechanism, start_ok.response.as_bytes()) {
        Ok(x) => x,
        Err(e) => {
            refuse(stream, buf, &e).await;
            return Err(ConnectionEnd::Error(e));
        }
    };
    let user = match broker.users.login(&user, &password, peer.ip()) {
        Ok(u) => u.clone(),
        Err(why) => {
            tracing::warn!(%peer, "login refused: {why}");
            if caps.authentication_failure_close {
                let e = AmqpError::connection(
                    ReplyCode::AccessRefused,
                    format!(
                        "Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
                    ),
                );
                refuse(stream, buf, &e).await;
            }
            let _ = stream.shutdown().await;
            return Err(ConnectionEnd::LoginRefused(why.to_string()));
        }
    };
    send_method(
        stream,
        AMQPClass::Connection(conn::AMQPMethod::Tune(conn::Tune {
            channel_max: limits.channel_max,
            frame_max: limits.frame_max,
            heartbeat: limits.heartbeat_secs,
        })),
    )
    .await?;
    let conn::AMQPMethod::TuneOk(tune_ok) =
        next_connection_method(stream, buf, frame_max, "connection.tune_ok").await?
    else {
        return Err(ConnectionEnd::Error(AmqpError::new(
            ReplyCode::CommandInvalid,
            "expected 'connection.tune_ok'",
        )));
    };
    if let Err(e) = validate_tune_ok(&tune_ok, limits) {
        refuse(stream, buf, &e).await;
        return Err(ConnectionEnd::Error(e));
    }
    let frame_max = tune_ok.frame_max as usize;
    let conn::AMQPMethod::Open(open) =
        next_connection_method(stream, buf, frame_max, "connection.open").await?
    else {
        return Err(ConnectionEnd::Error(AmqpError::new(
            ReplyCode::CommandInvalid,
            "expected 'connection.open'",
        )));
    };
    let vhost_name = open.virtual_host.as_str();
    let refused = if broker
        .connections
        .load(std::sync::atomic::Ordering::Relaxed)
        >= limits.max_connections
    {
        Some(AmqpError::not_allowed(format!(
            "connection refused: node connection limit ({}) is reached",
            limits.max_connections
        )))
    } else {
        match broker.vhost(vhost_name) {
            None => Some(AmqpError::not_allowed(format!(
                "vhost {vhost_name} not found"
            ))),
            Some(_) if !user.may_open(vhost_name) => Some(AmqpError::not_allowed(format!(
                "access to vhost '{vhost_name}' refused for user '{}'",
                user.name
            ))),
            Some(_) => None,
        }
    };
    if let Some(e) = refused {
        let e = e.on_method(10, 40);
        refuse(stream, buf, &e).await;
        return Err(ConnectionEnd::Error(e));
    }
    let vhost = broker.vhost(vhost_name).expect("checked above");
    send_method(
        stream,
        AMQPClass::Connection(conn::AMQPMethod::OpenOk(conn::OpenOk {})),
    )
    .await?;
    Ok(Opened {
        user: user.name.clone(),
        vhost,
        caps,
        frame_max: tune_ok.frame_max,
        channel_max: tune_ok.channel_max,
        heartbeat: tune_ok.heartbeat,
    })
}

/// RabbitMQ's `validate_negotiated_integer_value`: 0 or above the server's value is refused,
/// and frame_max below the minimum frame size.
fn validate_tune_ok(t: &conn::TuneOk, limits: &super::broker::Limits) -> Result<(), AmqpError> {
    let fail = |field: &str, kind: &str, allowed: u32, got: u32| {
        Err(AmqpError::not_allowed(format!(
            "negotiated {field} = {got} is {kind} than the {} allowed value ({allowed})",
            if kind == "higher" {
                "maximum"
            } else {
                "minimum"
            }
        ))
        .on_method(10, 31))
    };
    if t.frame_max != 0 && t.frame_max < FRAME_MIN_SIZE {
        return fail("frame_max", "lower", FRAME_MIN_SIZE, t.frame_max);
    }
    if t.frame_max == 0 || t.frame_max > limits.frame_max {
        return fail("frame_max", "higher", limits.frame_max, t.frame_max);
    }
    if t.channel_max == 0 || t.channel_max > limits.channel_max {
        return fail(
            "channel_max",
            "higher",
            limits.channel_max as u32,
            t.channel_max as u32,
        );
    }
    Ok(())
}

fn codec_error(e: CodecError) -> AmqpError {
    let code = match e {
        CodecError::TooLarge { .. }
        | CodecError::BadFrameEnd(_)
        | CodecError::UnknownFrameType(_)
        | CodecError::Malformed { .. } => ReplyCode::FrameError,
        CodecError::UnknownMethod { .. } => ReplyCode::CommandInvalid,
        CodecError::BadArguments { .. } => ReplyCode::SyntaxError,
    };
    let method = match e {
        CodecError::UnknownMethod {
            class_id,
            method_id,
        }
        | CodecError::BadArguments {
            class_id,
            method_id,
        } => (class_id, method_id),
        _ => (0, 0),
    };
    AmqpError::new(code, e).on_method(method.0, method.1)
}

/// A publish waiting for its content header and body.
struct PendingContent {
    exchange: String,
    routing_key: String,
    mandatory: bool,
    immediate: bool,
    /// Set once the header arrived.
    header: Option<(Bytes, u64)>,
    body: BytesMut,
    /// A single body frame is kept without copying.
    single: Option<Bytes>,
}

enum Slot {
    Open(Box<OpenChannel>),
    /// We sent `channel.close` and ignore everything until `close-ok`.
    Closing,
}

struct OpenChannel {
    channel: Channel,
    content: Option<PendingContent>,
}

struct Connection {
    broker: Arc<Broker>,
    session: Arc<Session>,
    caps: ClientCapabilities,
    out: Arc<WireOut>,
    frame_max: usize,
    channel_max: u16,
    channels: HashMap<u16, Slot>,
    /// Publishing connections stop being read while the memory alarm is on.
    published: bool,
    /// Set when we sent `connection.close` and wait for `close-ok`.
    closing: Option<AmqpError>,
    /// Channels that published in this input batch and may owe a confirm.
    confirm_dirty: Vec<u16>,
}

/// The outcome of one frame.
enum Step {
    Continue,
    /// The client sent `connection.close` or `close-ok`: stop.
    Done,
}

impl Connection {
    async fn run<R: AsyncRead + Unpin>(
        &mut self,
        mut reader: R,
        mut rbuf: BytesMut,
        heartbeat: u16,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), ConnectionEnd> {
        let mut alarm = self.broker.memory_alarm();
        let mut blocked = false;
        let beat = if heartbeat == 0 {
            Duration::from_secs(3600 * 24)
        } else {
            Duration::from_secs(heartbeat as u64) / 2
        };
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + beat, beat);
        let mut last_read = Instant::now();
        let mut close_deadline: Option<tokio::time::Instant> = None;
        if *alarm.borrow_and_update() {
            blocked = true;
            self.send_blocked(true);
        }
        // Frames that arrived with the handshake's last read.
        if !rbuf.is_empty() {
            if let Some(end) = self.process(&mut rbuf) {
                return end;
            }
        }
        loop {
            let paused = blocked && self.published && self.closing.is_none();
            tokio::select! {
                changed = shutdown.changed(), if self.closing.is_none() => {
                    if changed.is_err() || *shutdown.borrow() {
                        // RabbitMQ's exact text, which client logs and docs quote.
                        let e = AmqpError::new(
                            ReplyCode::ConnectionForced,
                            "broker forced connection closure with reason 'shutdown'",
                        );
                        self.start_close(e);
                        close_deadline = Some(tokio::time::Instant::now() + CLOSE_OK_TIMEOUT);
                    }
                }
                read = reader.read_buf(&mut rbuf), if !paused => {
                    if read? == 0 {
                        return if self.closing.is_some() { Ok(()) } else { Err(ConnectionEnd::ClientClosed) };
                    }
                    last_read = Instant::now();
                    if let Some(end) = self.process(&mut rbuf) {
                        return end;
                    }
                    if self.closing.is_some() && close_deadline.is_none() {
                        close_deadline = Some(tokio::time::Instant::now() + CLOSE_OK_TIMEOUT);
                    }
                }
                _ = ticker.tick(), if heartbeat != 0 => {
                    if !paused && last_read.elapsed() > Duration::from_secs(heartbeat as u64 * 2) {
                        return Err(ConnectionEnd::HeartbeatTimeout(heartbeat));
                    }
                    self.out.write(|b, _| codec::encode_heartbeat(b));
                }
                _ = self.out.drained.notified() => {
                    for slot in self.channels.values() {
                        if let Slot::Open(c) = slot {
                            c.channel.shared.redispatch([]);
                        }
                    }
                }
                changed = alarm.changed() => {
                    if changed.is_ok() {
                        let on = *alarm.borrow_and_update();
                        if on != blocked {
                            blocked = on;
                            self.send_blocked(on);
                        }
                    }
                }
                _ = sleep_until(close_deadline) => {
                    return Err(ConnectionEnd::Error(self.closing.clone().unwrap_or_else(|| AmqpError::new(ReplyCode::ConnectionForced, "close-ok not received"))));
                }
            }
            if self.out.is_closed() {
                return Err(ConnectionEnd::ClientClosed);
            }
        }
    }

    fn send_blocked(&self, on: bool) {
        if !self.caps.connection_blocked {
            return;
        }
        let method = if on {
            conn::AMQPMethod::Blocked(conn::Blocked {
                reason: "low on memory".into(),
            })
        } else {
            conn::AMQPMethod::Unblocked(conn::Unblocked {})
        };
        self.out
            .write(|b, _| codec::encode_method(b, 0, &AMQPClass::Connection(method)));
    }

    /// Handles every complete frame in `rbuf`. `Some` ends the connection.
    fn process(&mut self, rbuf: &mut BytesMut) -> Option<Result<(), ConnectionEnd>> {
        let result = loop {
            match codec::decode_frame(rbuf, self.frame_max) {
                Ok(None) => break None,
                Ok(Some(frame)) => match self.handle_frame(frame) {
                    Ok(Step::Continue) => {}
                    Ok(Step::Done) => break Some(Ok(())),
                    Err(e) => {
                        if self.closing.is_some() {
                            // Already closing: a second error just ends the connection.
                            break Some(Err(ConnectionEnd::Error(e)));
                        }
                        self.start_close(e);
                    }
                },
                Err(e) => {
                    let e = codec_error(e);
                    if self.closing.is_none() {
                        self.start_close(e.clone());
                    }
                    // The byte stream can no longer be trusted: stop reading it.
                    break Some(Err(ConnectionEnd::Error(e)));
                }
            }
        };
        self.flush_confirms();
        result
    }

    fn flush_confirms(&mut self) {
        for id in std::mem::take(&mut self.confirm_dirty) {
            if let Some(Slot::Open(c)) = self.channels.get_mut(&id) {
                c.channel.flush_confirms();
            }
        }
    }

    fn start_close(&mut self, e: AmqpError) {
        tracing::info!(
            connection = self.session.connection,
            "closing connection: {e}"
        );
        self.out
            .write(|b, _| codec::encode_method(b, 0, &close_method(&e)));
        self.closing = Some(e);
    }

    fn send(&self, channel: u16, method: AMQPClass) {
        self.out
            .write(|b, _| codec::encode_method(b, channel, &method));
    }

    fn handle_frame(&mut self, frame: Frame) -> Result<Step, AmqpError> {
        if self.closing.is_some() {
            // After connection.close only close and close-ok matter.
            if let Frame::Method {
                channel: 0,
                class_id: 10,
                method_id,
                ..
            } = frame
            {
                if method_id == 51 {
                    return Ok(Step::Done);
                }
                if method_id == 50 {
                    self.send(
                        0,
                        AMQPClass::Connection(conn::AMQPMethod::CloseOk(conn::CloseOk {})),
                    );
                    return Ok(Step::Done);
                }
            }
            return Ok(Step::Continue);
        }
        match frame {
            Frame::Heartbeat { channel: 0 } => Ok(Step::Continue),
            // RabbitMQ (`rabbit_reader:handle_frame`): heartbeats off channel 0 and content
            // on channel 0 are unexpected frames.
            Frame::Heartbeat { .. } => Err(AmqpError::new(
                ReplyCode::UnexpectedFrame,
                "heartbeat frame on a non-zero channel",
            )),
            Frame::Header { channel: 0, .. } | Frame::Body { channel: 0, .. } => Err(
                AmqpError::new(ReplyCode::UnexpectedFrame, "content frame on channel 0"),
            ),
            Frame::Method {
                channel: 0,
                payload,
                ..
            } => self.connection_method(&payload),
            Frame::Method {
                channel,
                class_id,
                method_id,
                payload,
            } => self
                .channel_method(channel, &payload)
                .map_err(|e| e.on_method(class_id, method_id))
                .map(|()| Step::Continue),
            Frame::Header {
                channel,
                class_id,
                body_size,
                properties,
            } => {
                self.content_header(channel, class_id, body_size, properties)?;
                Ok(Step::Continue)
            }
            Frame::Body { channel, payload } => {
                self.content_body(channel, payload)?;
                Ok(Step::Continue)
            }
        }
    }

    fn connection_method(&mut self, payload: &Bytes) -> Result<Step, AmqpError> {
        let method = codec::decode_method(payload).map_err(codec_error)?;
        match method {
            AMQPClass::Connection(conn::AMQPMethod::Close(c)) => {
                tracing::debug!(
                    connection = self.session.connection,
                    "client closed: {} {}",
                    c.reply_code,
                    c.reply_text
                );
                // As RabbitMQ: exclusive queues are gone (and unacked messages requeued)
                // before close-ok, so the client may rely on it once close returns.
                self.cleanup();
                self.send(
                    0,
                    AMQPClass::Connection(conn::AMQPMethod::CloseOk(conn::CloseOk {})),
                );
                Ok(Step::Done)
            }
            AMQPClass::Connection(conn::AMQPMethod::CloseOk(_)) => Ok(Step::Done),
            AMQPClass::Connection(conn::AMQPMethod::UpdateSecret(_)) => {
                self.send(
                    0,
                    AMQPClass::Connection(conn::AMQPMethod::UpdateSecretOk(
                        conn::UpdateSecretOk {},
                    )),
                );
                Ok(Step::Continue)
            }
            AMQPClass::Connection(conn::AMQPMethod::Blocked(_))
            | AMQPClass::Connection(conn::AMQPMethod::Unblocked(_)) => Ok(Step::Continue),
            // RabbitMQ's `handle_method0` catch-all.
            other => Err(AmqpError::new(
                ReplyCode::ChannelError,
                "unexpected method in connection state running",
            )
            .on_method(other.get_amqp_class_id(), other.get_amqp_method_id())),
        }
    }

    fn channel_method(&mut self, id: u16, payload: &Bytes) -> Result<(), AmqpError> {
        let class_id = u16::from_be_bytes([payload[0], payload[1]]);
        let method_id = u16::from_be_bytes([payload[2], payload[3]]);
        match self.channels.get_mut(&id) {
            None => {
                if (class_id, method_id) != (20, 10) {
                    return Err(AmqpError::new(
                        ReplyCode::ChannelError,
                        format!("expected 'channel.open' on channel {id}"),
                    ));
                }
                codec::decode_method(payload).map_err(codec_error)?;
                if id > self.channel_max {
                    return Err(AmqpError::not_allowed(format!(
                        "channel {id} is above the negotiated channel_max ({})",
                        self.channel_max
                    )));
                }
                let shared = ChannelShared::new(
                    id,
                    self.session.connection,
                    Outbound::Wire {
                        out: self.out.clone(),
                        channel: id,
                    },
                    self.caps.consumer_cancel_notify,
                );
                self.channels.insert(
                    id,
                    Slot::Open(Box::new(OpenChannel {
                        channel: Channel::new(shared, self.session.clone()),
                        content: None,
                    })),
                );
                self.send(
                    id,
                    AMQPClass::Channel(chan::AMQPMethod::OpenOk(chan::OpenOk {})),
                );
                Ok(())
            }
            Some(Slot::Closing) => {
                match (class_id, method_id) {
                    (20, 41) => {
                        self.channels.remove(&id);
                    }
                    (20, 40) => {
                        self.channels.remove(&id);
                        self.send(
                            id,
                            AMQPClass::Channel(chan::AMQPMethod::CloseOk(chan::CloseOk {})),
                        );
                    }
                    _ => {}
                }
                Ok(())
            }
            Some(Slot::Open(open)) => {
                if open.content.is_some() {
                    return Err(AmqpError::new(
                        ReplyCode::UnexpectedFrame,
                        format!("expected content header or body on channel {id}, got method {class_id}/{method_id}"),
                    ));
                }
                let method = codec::decode_method(payload).map_err(codec_error)?;
                // amq-protocol's basic.qos drops prefetch_size: read it from the payload.
                if (class_id, method_id) == (60, 10) {
                    let size = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                    if size != 0 {
                        return Err(AmqpError::not_implemented(format!(
                            "prefetch_size!=0 ({size})"
                        )));
                    }
                }
                match self.dispatch(id, method) {
                    Ok(()) => Ok(()),
                    Err(e) if e.scope == Scope::Channel => {
                        self.close_channel(id, e.on_method(class_id, method_id));
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Closes one channel with a soft error.
    fn close_channel(&mut self, id: u16, e: AmqpError) {
        tracing::debug!(
            connection = self.session.connection,
            channel = id,
            "closing channel: {e}"
        );
        if let Some(Slot::Open(mut open)) = self.channels.insert(id, Slot::Closing) {
            open.channel.close();
        }
        self.send(
            id,
            AMQPClass::Channel(chan::AMQPMethod::Close(chan::Close {
                reply_code: e.code.code(),
                reply_text: truncate(&e.text).into(),
                class_id: e.method.0,
                method_id: e.method.1,
            })),
        );
    }

    fn open_channel(&mut self, id: u16) -> &mut OpenChannel {
        match self.channels.get_mut(&id) {
            Some(Slot::Open(c)) => c,
            _ => unreachable!("dispatch is only called for open channels"),
        }
    }

    /// The one match with an arm per channel-level method.
    fn dispatch(&mut self, id: u16, method: AMQPClass) -> Result<(), AmqpError> {
        use AMQPClass as C;
        let frame_max = self.frame_max;
        let out = self.out.clone();
        let ch = &mut self.open_channel(id).channel;
        let reply = |m: AMQPClass| out.write(|b, _| codec::encode_method(b, id, &m));
        match method {
            C::Basic(basic::AMQPMethod::Publish(p)) => {
                self.published = true;
                self.open_channel(id).content = Some(PendingContent {
                    exchange: p.exchange.to_string(),
                    routing_key: p.routing_key.to_string(),
                    mandatory: p.mandatory,
                    immediate: p.immediate,
                    header: None,
                    body: BytesMut::new(),
                    single: None,
                });
            }
            C::Basic(basic::AMQPMethod::Ack(a)) => ch.basic_ack(a.delivery_tag, a.multiple)?,
            C::Basic(basic::AMQPMethod::Nack(n)) => {
                ch.basic_nack(n.delivery_tag, n.multiple, n.requeue)?
            }
            C::Basic(basic::AMQPMethod::Reject(r)) => ch.basic_reject(r.delivery_tag, r.requeue)?,
            C::Basic(basic::AMQPMethod::Qos(q)) => {
                ch.basic_qos(0, q.prefetch_count, q.global)?;
                reply(C::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})));
            }
            C::Basic(basic::AMQPMethod::Consume(c)) => {
                let started = ch.basic_consume(
                    c.queue.as_str(),
                    c.consumer_tag.as_str(),
                    c.no_ack,
                    c.exclusive,
                    c.arguments,
                )?;
                if !c.nowait {
                    reply(C::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                        consumer_tag: started.tag.as_str().into(),
                    })));
                }
                started.start();
            }
            C::Basic(basic::AMQPMethod::Cancel(c)) => {
                ch.basic_cancel(c.consumer_tag.as_str());
                if !c.nowait {
                    reply(C::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                        consumer_tag: c.consumer_tag,
                    })));
                }
            }
            C::Basic(basic::AMQPMethod::Get(g)) => {
                match ch.basic_get(g.queue.as_str(), g.no_ack)? {
                    Some(got) => out.write(|b, _| {
                        codec::encode_get_ok(
                            b,
                            id,
                            got.delivery_tag,
                            got.redelivered,
                            &got.message.exchange,
                            &got.message.routing_key,
                            got.message_count,
                            &got.message.properties,
                            &got.message.body,
                            frame_max,
                        )
                    }),
                    None => reply(C::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {}))),
                }
            }
            C::Basic(basic::AMQPMethod::Recover(r)) => {
                // recover-ok goes before the redeliveries, as RabbitMQ orders them: clients
                // (lapin) drop the deliveries they hold when recover-ok arrives.
                if r.requeue {
                    reply(C::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})));
                }
                ch.basic_recover(r.requeue)?;
            }
            C::Basic(basic::AMQPMethod::RecoverAsync(r)) => ch.basic_recover(r.requeue)?,
            C::Exchange(exchange::AMQPMethod::Declare(d)) => {
                ch.exchange_declare(
                    d.exchange.as_str(),
                    d.kind.as_str(),
                    d.passive,
                    d.durable,
                    d.auto_delete,
                    d.internal,
                    d.arguments,
                )?;
                if !d.nowait {
                    reply(C::Exchange(exchange::AMQPMethod::DeclareOk(
                        exchange::DeclareOk {},
                    )));
                }
            }
            C::Exchange(exchange::AMQPMethod::Delete(d)) => {
                ch.exchange_delete(d.exchange.as_str(), d.if_unused)?;
                if !d.nowait {
                    reply(C::Exchange(exchange::AMQPMethod::DeleteOk(
                        exchange::DeleteOk {},
                    )));
                }
            }
            C::Exchange(exchange::AMQPMethod::Bind(b)) => {
                ch.exchange_bind(
                    b.destination.as_str(),
                    b.source.as_str(),
                    b.routing_key.as_str(),
                    b.arguments,
                )?;
                if !b.nowait {
                    reply(C::Exchange(exchange::AMQPMethod::BindOk(
                        exchange::BindOk {},
                    )));
                }
            }
            C::Exchange(exchange::AMQPMethod::Unbind(u)) => {
                ch.exchange_unbind(
                    u.destination.as_str(),
                    u.source.as_str(),
                    u.routing_key.as_str(),
                    u.arguments,
                )?;
                if !u.nowait {
                    reply(C::Exchange(exchange::AMQPMethod::UnbindOk(
                        exchange::UnbindOk {},
                    )));
                }
            }
            C::Queue(queue::AMQPMethod::Declare(d)) => {
                let (name, messages, consumers) = ch.queue_declare(
                    d.queue.as_str(),
                    d.passive,
                    d.durable,
                    d.exclusive,
                    d.auto_delete,
                    d.arguments,
                )?;
                if !d.nowait {
                    reply(C::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                        queue: name.into(),
                        message_count: messages,
                        consumer_count: consumers,
                    })));
                }
            }
            C::Queue(queue::AMQPMethod::Bind(b)) => {
                ch.queue_bind(
                    b.queue.as_str(),
                    b.exchange.as_str(),
                    b.routing_key.as_str(),
                    b.arguments,
                )?;
                if !b.nowait {
                    reply(C::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})));
                }
            }
            C::Queue(queue::AMQPMethod::Unbind(u)) => {
                ch.queue_unbind(
                    u.queue.as_str(),
                    u.exchange.as_str(),
                    u.routing_key.as_str(),
                    u.arguments,
                )?;
                reply(C::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})));
            }
            C::Queue(queue::AMQPMethod::Purge(p)) => {
                let n = ch.queue_purge(p.queue.as_str())?;
                if !p.nowait {
                    reply(C::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk {
                        message_count: n,
                    })));
                }
            }
            C::Queue(queue::AMQPMethod::Delete(d)) => {
                let n = ch.queue_delete(d.queue.as_str(), d.if_unused, d.if_empty)?;
                if !d.nowait {
                    reply(C::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                        message_count: n,
                    })));
                }
            }
            C::Channel(chan::AMQPMethod::Close(_)) => {
                if let Some(Slot::Open(mut open)) = self.channels.remove(&id) {
                    open.channel.close();
                }
                reply(C::Channel(chan::AMQPMethod::CloseOk(chan::CloseOk {})));
            }
            C::Channel(chan::AMQPMethod::CloseOk(_)) => {}
            C::Channel(chan::AMQPMethod::Flow(f)) => {
                ch.flow(f.active)?;
                reply(C::Channel(chan::AMQPMethod::FlowOk(chan::FlowOk {
                    active: f.active,
                })));
            }
            C::Channel(chan::AMQPMethod::FlowOk(_)) => {}
            C::Channel(chan::AMQPMethod::Open(_)) => {
                return Err(AmqpError::new(
                    ReplyCode::ChannelError,
                    "second 'channel.open' seen",
                ))
            }
            C::Confirm(confirm::AMQPMethod::Select(s)) => {
                ch.confirm_select()?;
                if !s.nowait {
                    reply(C::Confirm(confirm::AMQPMethod::SelectOk(
                        confirm::SelectOk {},
                    )));
                }
            }
            C::Tx(tx::AMQPMethod::Select(_)) => {
                ch.tx_select()?;
                reply(C::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})));
            }
            C::Tx(tx::AMQPMethod::Commit(_)) => {
                ch.tx_commit()?;
                reply(C::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})));
            }
            C::Tx(tx::AMQPMethod::Rollback(_)) => {
                ch.tx_rollback()?;
                reply(C::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})));
            }
            C::Access(access::AMQPMethod::Request(_)) => {
                reply(C::Access(access::AMQPMethod::RequestOk(
                    access::RequestOk {},
                )));
            }
            other => {
                return Err(AmqpError::new(
                    ReplyCode::CommandInvalid,
                    format!(
                        "method {}/{} is not valid from a client",
                        other.get_amqp_class_id(),
                        other.get_amqp_method_id()
                    ),
                ))
            }
        }
        Ok(())
    }

    fn content_header(
        &mut self,
        id: u16,
        class_id: u16,
        body_size: u64,
        properties: Bytes,
    ) -> Result<(), AmqpError> {
        let max = self.broker.limits.max_message_size as u64;
        let open = match self.channels.get_mut(&id) {
            Some(Slot::Closing) => return Ok(()),
            Some(Slot::Open(open)) => open,
            None => {
                return Err(AmqpError::new(
                    ReplyCode::ChannelError,
                    format!("expected 'channel.open' on channel {id}"),
                ))
            }
        };
        let Some(content) = open.content.as_mut().filter(|c| c.header.is_none()) else {
            return Err(AmqpError::new(
                ReplyCode::UnexpectedFrame,
                format!("unexpected content header on channel {id}"),
            ));
        };
        if class_id != 60 {
            return Err(AmqpError::new(
                ReplyCode::FrameError,
                format!("content header for class {class_id}, expected 60"),
            ));
        }
        if body_size > max {
            self.close_channel(
                id,
                AmqpError::precondition(format!(
                    "message size {body_size} is larger than configured max size {max}"
                ))
                .on_method(60, 40),
            );
            return Ok(());
        }
        content.header = Some((properties, body_size));
        if body_size == 0 {
            self.complete_publish(id)?;
        }
        Ok(())
    }

    fn content_body(&mut self, id: u16, payload: Bytes) -> Result<(), AmqpError> {
        let open = match self.channels.get_mut(&id) {
            Some(Slot::Closing) => return Ok(()),
            Some(Slot::Open(open)) => open,
            None => {
                return Err(AmqpError::new(
                    ReplyCode::ChannelError,
                    format!("expected 'channel.open' on channel {id}"),
                ))
            }
        };
        let Some(content) = open.content.as_mut() else {
            return Err(AmqpError::new(
                ReplyCode::UnexpectedFrame,
                format!("unexpected content body on channel {id}"),
            ));
        };
        let Some((_, size)) = content.header.as_ref() else {
            return Err(AmqpError::new(
                ReplyCode::UnexpectedFrame,
                format!("content body before its header on channel {id}"),
            ));
        };
        let size = *size;
        let have = content.body.len() + content.single.as_ref().map_or(0, |b| b.len());
        if (have + payload.len()) as u64 > size {
            return Err(AmqpError::new(
                ReplyCode::FrameError,
                format!("content body longer than the {size} bytes its header declared"),
            ));
        }
        if have == 0 && payload.len() as u64 == size {
            content.single = Some(payload);
        } else {
            if let Some(first) = content.single.take() {
                content.body.extend_from_slice(&first);
            }
            content.body.extend_from_slice(&payload);
        }
        if payload_len(content) as u64 == size {
            self.complete_publish(id)?;
        }
        Ok(())
    }

    fn complete_publish(&mut self, id: u16) -> Result<(), AmqpError> {
        let open = self.open_channel(id);
        let content = open.content.take().expect("content in progress");
        let (properties, _) = content.header.expect("header received");
        let body = match content.single {
            Some(b) => b,
            None => content.body.freeze(),
        };
        let result = open.channel.basic_publish(
            &content.exchange,
            &content.routing_key,
            content.mandatory,
            content.immediate,
            properties,
            body,
        );
        match result {
            Ok(()) => {
                if !self.confirm_dirty.contains(&id) {
                    self.confirm_dirty.push(id);
                }
                Ok(())
            }
            Err(e) if e.scope == Scope::Channel => {
                self.close_channel(id, e.on_method(60, 40));
                Ok(())
            }
            Err(e) => Err(e.on_method(60, 40)),
        }
    }

    /// Closes every channel (requeueing unacked messages) and drops exclusive queues.
    fn cleanup(&mut self) {
        for (_, slot) in self.channels.drain() {
            if let Slot::Open(mut open) = slot {
                open.channel.close();
            }
        }
        self.broker.connection_closed(self.session.connection);
    }
}

/// Bytes of body collected so far, after the frame just added.
fn payload_len(content: &PendingContent) -> usize {
    content.body.len() + content.single.as_ref().map_or(0, |b| b.len())
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
