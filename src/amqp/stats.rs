//! Read-only statistics for the management API and Prometheus: counters bumped on the hot
//! paths (relaxed atomics, no locks), per-queue message counters, and the registry of open
//! connections with their channels. Nothing here changes what the broker does.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::AddAssign;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use amq_protocol::types::FieldTable;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::consumer::{ChannelShared, ConnectionId};

/// Broker-wide counters (monotonic, since start).
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages published (before routing).
    pub received: AtomicU64,
    /// Published messages that reached at least one queue.
    pub routed: AtomicU64,
    /// Unroutable messages dropped (not mandatory).
    pub unroutable_dropped: AtomicU64,
    /// Unroutable mandatory messages returned to the publisher.
    pub unroutable_returned: AtomicU64,
    pub connections_opened: AtomicU64,
    pub connections_closed: AtomicU64,
    pub channels_opened: AtomicU64,
    pub channels_closed: AtomicU64,
    /// `queue.declare` calls that succeeded (created or not).
    pub queues_declared: AtomicU64,
    pub queues_created: AtomicU64,
}

impl Counters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// One queue's message counters (kept under the queue's lock, so they cost nothing extra).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueCounters {
    /// Messages enqueued.
    pub published: u64,
    /// Delivered to consumers that must ack.
    pub delivered_ack: u64,
    /// Delivered to `no_ack` consumers.
    pub delivered_no_ack: u64,
    /// Taken with `basic.get`, to be acked.
    pub get_ack: u64,
    /// Taken with `basic.get` `no_ack`.
    pub get_no_ack: u64,
    /// Settled for good by the client (acked, or rejected without requeue).
    pub acked: u64,
    /// Delivered again after a requeue.
    pub redelivered: u64,
    /// Queues these counters add up (1 per deleted queue in a vhost's retired totals).
    pub deleted_queues: u64,
}

impl AddAssign for QueueCounters {
    fn add_assign(&mut self, o: QueueCounters) {
        self.published += o.published;
        self.delivered_ack += o.delivered_ack;
        self.delivered_no_ack += o.delivered_no_ack;
        self.get_ack += o.get_ack;
        self.get_no_ack += o.get_no_ack;
        self.acked += o.acked;
        self.redelivered += o.redelivered;
        self.deleted_queues += o.deleted_queues;
    }
}

impl QueueCounters {
    /// Every delivery (consume and get, with and without ack).
    pub fn delivered_total(&self) -> u64 {
        self.delivered_ack + self.delivered_no_ack + self.get_ack + self.get_no_ack
    }
}

/// An open connection, as the management API lists it.
#[derive(Debug)]
pub struct ConnectionInfo {
    pub id: ConnectionId,
    /// The peer address for network connections (what `DELETE /api/connections/{name}`
    /// names).
    pub name: String,
    /// None for in-process connections.
    pub peer: Option<SocketAddr>,
    pub user: String,
    pub vhost: String,
    pub client_properties: FieldTable,
    pub connected_at_ms: u64,
    pub frame_max: u32,
    pub channel_max: u16,
    pub heartbeat: u16,
    pub recv_oct: AtomicU64,
    pub send_oct: AtomicU64,
    channels: Mutex<Vec<Weak<ChannelShared>>>,
    /// Notified when an operator closes the connection (`DELETE /api/connections/{name}`).
    pub close_requested: Notify,
}

impl ConnectionInfo {
    pub fn new(
        id: ConnectionId,
        peer: Option<SocketAddr>,
        user: &str,
        vhost: &str,
        client_properties: FieldTable,
        limits: (u32, u16, u16),
    ) -> ConnectionInfo {
        let name = match peer {
            Some(p) => p.to_string(),
            None => format!("<mqic.{id}> (in-process)"),
        };
        ConnectionInfo {
            id,
            name,
            peer,
            user: user.to_string(),
            vhost: vhost.to_string(),
            client_properties,
            connected_at_ms: crate::store::records::now_ms(),
            frame_max: limits.0,
            channel_max: limits.1,
            heartbeat: limits.2,
            recv_oct: AtomicU64::new(0),
            send_oct: AtomicU64::new(0),
            channels: Mutex::new(Vec::new()),
            close_requested: Notify::new(),
        }
    }

    /// Records a newly opened channel (closed ones are forgotten as they are noticed).
    pub fn add_channel(&self, channel: &Arc<ChannelShared>) {
        let mut list = self.channels.lock();
        list.retain(|w| w.upgrade().is_some_and(|c| !c.is_closed()));
        list.push(Arc::downgrade(channel));
    }

    /// The channels open now.
    pub fn channels(&self) -> Vec<Arc<ChannelShared>> {
        self.channels
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|c| !c.is_closed())
            .collect()
    }

    /// True for in-process (direct) connections.
    pub fn is_direct(&self) -> bool {
        self.peer.is_none()
    }
}

/// Counters plus the connection registry; one per broker.
#[derive(Debug, Default)]
pub struct Stats {
    pub counters: Counters,
    connections: Mutex<BTreeMap<ConnectionId, Arc<ConnectionInfo>>>,
}

impl Stats {
    /// Registers an open connection; [`Stats::unregister`] removes it.
    pub fn register(&self, info: ConnectionInfo) -> Arc<ConnectionInfo> {
        let info = Arc::new(info);
        self.connections.lock().insert(info.id, info.clone());
        Counters::bump(&self.counters.connections_opened);
        info
    }

    pub fn unregister(&self, id: ConnectionId) {
        if self.connections.lock().remove(&id).is_some() {
            Counters::bump(&self.counters.connections_closed);
        }
    }

    /// Open connections, oldest first.
    pub fn connections(&self) -> Vec<Arc<ConnectionInfo>> {
        self.connections.lock().values().cloned().collect()
    }

    pub fn connection(&self, id: ConnectionId) -> Option<Arc<ConnectionInfo>> {
        self.connections.lock().get(&id).cloned()
    }
}
