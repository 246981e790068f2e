//! The AMQP handshake, before the frame loop: protocol header, `connection.start` and
//! SASL login, tune and its validation, `connection.open` with the vhost and limit checks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::protocol::{connection as conn, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{close_method, codec_error, ConnectionEnd};
use crate::amqp::auth;
use crate::amqp::broker::{Broker, Limits, VHost};
use crate::amqp::codec::{self, Frame};
use crate::amqp::reply::{AmqpError, ReplyCode};

/// The smallest frame_max a client may ask for (the spec's FRAME-MIN-SIZE, as RabbitMQ 3.x).
const FRAME_MIN_SIZE: u32 = 4096;

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

/// What the handshake settled.
pub(super) struct Opened {
    pub(super) user: String,
    pub(super) vhost: Arc<VHost>,
    pub(super) caps: ClientCapabilities,
    pub(super) frame_max: u32,
    pub(super) channel_max: u16,
    pub(super) heartbeat: u16,
    /// What the client said about itself (shown by the management API).
    pub(super) client_properties: amq_protocol::types::FieldTable,
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

pub(super) async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
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
        client_properties: start_ok.client_properties,
    })
}

/// RabbitMQ's `validate_negotiated_integer_value`: 0 or above the server's value is refused,
/// and frame_max below the minimum frame size.
fn validate_tune_ok(t: &conn::TuneOk, limits: &Limits) -> Result<(), AmqpError> {
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
