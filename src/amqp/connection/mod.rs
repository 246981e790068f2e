//! One AMQP connection on the wire: the handshake (`handshake.rs`), then a loop that reads
//! frames, assembles content (`content.rs`), dispatches each method to its [`Channel`]
//! (`dispatch.rs`) and writes the replies. This is the only code that touches a client socket;
//! a writer task drains the connection's [`WireOut`].

mod content;
mod dispatch;
mod handshake;

use content::PendingContent;
use handshake::handshake;
pub use handshake::ClientCapabilities;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{channel as chan, connection as conn, AMQPClass};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::broker::Broker;
use super::channel::{Channel, Session};
use super::codec::{self, CodecError, Frame};
use super::consumer::ChannelShared;
use super::outbound::{Outbound, WireOut};
use super::reply::{AmqpError, ReplyCode, Scope};
use super::stats::ConnectionInfo;

/// How long we wait for `close-ok` after sending `connection.close`.
const CLOSE_OK_TIMEOUT: Duration = Duration::from_secs(3);
/// How often channels are checked for deliveries past their queue's `x-consumer-timeout`.
const ACK_TIMEOUT_CHECK: Duration = Duration::from_secs(1);

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
    let connection_id = broker.next_connection_id();
    let info = broker.stats.register(ConnectionInfo::new(
        connection_id,
        Some(peer),
        &opened.user,
        &opened.vhost.name,
        opened.client_properties.clone(),
        (opened.frame_max, opened.channel_max, opened.heartbeat),
    ));
    let (reader, mut writer) = tokio::io::split(stream);
    let out = WireOut::new(opened.frame_max as usize);
    let writer_out = out.clone();
    let writer_info = info.clone();
    let writer_task = tokio::spawn(async move {
        let mut wbuf = BytesMut::with_capacity(64 * 1024);
        loop {
            if writer_out.take(&mut wbuf) {
                if writer.write_all(&wbuf).await.is_err() {
                    writer_out.close();
                    break;
                }
                writer_info
                    .send_oct
                    .fetch_add(wbuf.len() as u64, std::sync::atomic::Ordering::Relaxed);
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
            connection: connection_id,
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
        info,
    };
    let result = conn
        .run(reader, rbuf, opened.heartbeat, &mut shutdown)
        .await;
    conn.cleanup();
    broker.stats.unregister(connection_id);
    broker
        .connections
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    out.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), writer_task).await;
    result
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
    /// This connection in the broker's registry (management API).
    info: Arc<ConnectionInfo>,
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
        let mut alarm = self.broker.alarms();
        let mut blocked = false;
        let beat = if heartbeat == 0 {
            Duration::from_secs(3600 * 24)
        } else {
            Duration::from_secs(heartbeat as u64) / 2
        };
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + beat, beat);
        let mut last_read = Instant::now();
        let mut close_deadline: Option<tokio::time::Instant> = None;
        let mut ack_check = tokio::time::interval(ACK_TIMEOUT_CHECK);
        ack_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let alarms = *alarm.borrow_and_update();
        if alarms.any() {
            blocked = true;
            self.send_blocked(Some(alarms.reason()));
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
                    let n = read?;
                    if n == 0 {
                        return if self.closing.is_some() { Ok(()) } else { Err(ConnectionEnd::ClientClosed) };
                    }
                    self.info.recv_oct.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
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
                _ = self.info.close_requested.notified(), if self.closing.is_none() => {
                    // An operator closed it (management API), as RabbitMQ does.
                    let e = AmqpError::new(
                        ReplyCode::ConnectionForced,
                        "Closed via management plugin",
                    );
                    self.start_close(e);
                    close_deadline = Some(tokio::time::Instant::now() + CLOSE_OK_TIMEOUT);
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
                        let alarms = *alarm.borrow_and_update();
                        if alarms.any() != blocked {
                            blocked = alarms.any();
                            self.send_blocked(blocked.then(|| alarms.reason()));
                        }
                    }
                }
                _ = ack_check.tick(), if self.closing.is_none() => self.close_overdue_channels(),
                _ = sleep_until(close_deadline) => {
                    return Err(ConnectionEnd::Error(self.closing.clone().unwrap_or_else(|| AmqpError::new(ReplyCode::ConnectionForced, "close-ok not received"))));
                }
            }
            if self.out.is_closed() {
                return Err(ConnectionEnd::ClientClosed);
            }
        }
    }

    /// Sends `connection.blocked` with the reason, or `connection.unblocked` for `None`.
    fn send_blocked(&self, reason: Option<&str>) {
        if !self.caps.connection_blocked {
            return;
        }
        let method = if let Some(reason) = reason {
            conn::AMQPMethod::Blocked(conn::Blocked {
                reason: reason.into(),
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
                self.info.add_channel(&shared);
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
                match self.dispatch(id, method, payload) {
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

    /// Closes, with RabbitMQ's 406, every channel holding a delivery past its queue's
    /// `x-consumer-timeout`; its unacknowledged messages go back to their queues.
    fn close_overdue_channels(&mut self) {
        let now = Instant::now();
        let overdue: Vec<(u16, u64)> = self
            .channels
            .iter()
            .filter_map(|(id, slot)| match slot {
                Slot::Open(c) => c.channel.shared.overdue(now).map(|ms| (*id, ms)),
                Slot::Closing => None,
            })
            .collect();
        for (id, ms) in overdue {
            tracing::warn!(
                connection = self.session.connection,
                channel = id,
                timeout_ms = ms,
                "consumer acknowledgement timed out (x-consumer-timeout): closing the channel"
            );
            self.close_channel(
                id,
                AmqpError::precondition(format!(
                    "delivery acknowledgement on channel {id} timed out. Timeout value used: {ms} ms. This timeout value can be configured, see consumers doc guide to learn more"
                )),
            );
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

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
