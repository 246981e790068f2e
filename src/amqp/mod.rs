//! The embedded AMQP 0-9-1 broker. Reading order: [`codec`] (bytes ↔ frames),
//! [`connection`] (one socket: handshake, frame loop), [`channel`] (the operations of one
//! channel), [`broker`] (vhosts, exchanges, queues, routing), [`queue`] and [`consumer`]
//! (dispatch and credit), [`deadletter`] (x-death and the dead-letter exchange), [`outbound`] (where deliveries go), [`store`] (`broker.redb`: durable
//! topology and persistent messages, group-committed), [`embedded`] (the same broker
//! in-process), [`server`] (listeners), [`stats`] (read-only counters and the connection
//! registry, for the management API). This module knows nothing of cases or workflows.

pub mod auth;
pub mod broker;
pub mod channel;
pub mod codec;
pub mod connection;
pub mod consumer;
pub mod deadletter;
pub mod embedded;
pub mod exchange;
pub mod message;
pub mod outbound;
pub mod queue;
pub mod reply;
pub mod server;
pub mod stats;
pub mod store;

pub use broker::{Broker, Limits};
pub use embedded::{LocalChannel, LocalConnection};
pub use outbound::{Delivery, LocalEvent};
pub use reply::{AmqpError, ReplyCode};
