//! The broker core: virtual hosts with their exchanges, queues and bindings, and the rules
//! RabbitMQ applies to declaring, binding, deleting and routing. Wire connections and the
//! in-process API both call these functions, so both get the same semantics.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldTable};
use parking_lot::RwLock;
use tokio::sync::watch;

use super::auth::Users;
use super::consumer::ConnectionId;
use super::exchange::{Binding, Destination, Exchange, ExchangeKind, ExchangeSpec};
use super::queue::{Persist, Queue, QueueSpec};
use super::reply::{AmqpError, AmqpResult};
use super::store::{binding_key, BrokerStore, Op};

/// Limits and wire defaults the broker enforces (from `[amqp]` in the config).
#[derive(Debug, Clone)]
pub struct Limits {
    pub frame_max: u32,
    pub channel_max: u16,
    pub heartbeat_secs: u16,
    pub max_message_size: usize,
    pub max_connections: usize,
    pub handshake_timeout: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            frame_max: 131_072,
            channel_max: 2047,
            heartbeat_secs: 60,
            max_message_size: 16 * 1024 * 1024,
            max_connections: 4096,
            handshake_timeout: std::time::Duration::from_secs(10),
        }
    }
}

/// The whole broker: shared by every connection and the in-process API.
#[derive(Debug)]
pub struct Broker {
    pub limits: Limits,
    pub users: Users,
    vhosts: RwLock<HashMap<String, Arc<VHost>>>,
    next_connection: AtomicU64,
    /// Open connections (wire and in-process), for the connection limit.
    pub connections: AtomicUsize,
    /// The resource alarms in force (memory, disk): while any is on, publishers are blocked.
    alarms: watch::Sender<Alarms>,
    /// Counters and the connection registry (management API, Prometheus).
    pub stats: super::stats::Stats,
    /// `broker.redb`, for a broker that keeps durable things across restarts.
    pub store: Option<Arc<BrokerStore>>,
}

/// The resource alarms that block publishers (`connection.blocked`), as RabbitMQ raises them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Alarms {
    /// Resident memory is above the high watermark.
    pub memory: bool,
    /// Free disk space under the data dir is below the limit.
    pub disk: bool,
}

impl Alarms {
    pub fn any(self) -> bool {
        self.memory || self.disk
    }

    /// The reason `connection.blocked` carries, in RabbitMQ's words.
    pub fn reason(self) -> &'static str {
        match (self.memory, self.disk) {
            (true, true) => "low on memory & low on disk",
            (false, true) => "low on disk",
            _ => "low on memory",
        }
    }
}

impl Broker {
    /// A broker that keeps nothing across restarts (tests, in-memory use).
    pub fn new(limits: Limits, users: Users, vhosts: &[String]) -> Arc<Broker> {
        Broker::build(limits, users, vhosts, None)
    }

    fn build(
        limits: Limits,
        users: Users,
        vhosts: &[String],
        store: Option<Arc<BrokerStore>>,
    ) -> Arc<Broker> {
        let broker = Broker {
            limits,
            users,
            vhosts: RwLock::new(HashMap::new()),
            next_connection: AtomicU64::new(1),
            connections: AtomicUsize::new(0),
            alarms: watch::channel(Alarms::default()).0,
            stats: Default::default(),
            store,
        };
        for name in vhosts {
            broker.add_vhost(name);
        }
        Arc::new(broker)
    }

    /// A broker backed by `broker.redb` at `path`: the durable topology and the persistent
    /// messages stored there are replayed through the same declare, bind and enqueue code
    /// clients reach, before any client connects.
    pub fn open(
        limits: Limits,
        users: Users,
        vhosts: &[String],
        path: &std::path::Path,
    ) -> anyhow::Result<Arc<Broker>> {
        let store = BrokerStore::open(path)?;
        let broker = Broker::build(limits, users, vhosts, Some(store.clone()));
        broker.recover(&store)?;
        Ok(broker)
    }

    /// Replays the stored topology and messages.
    fn recover(&self, store: &BrokerStore) -> anyhow::Result<()> {
        let topology = store.topology()?;
        let started = std::time::Instant::now();
        let vhost = |name: &str| {
            let v = self.vhost(name);
            if v.is_none() {
                tracing::warn!(
                    vhost = name,
                    "stored durable entity in a vhost not configured now; left in the store"
                );
            }
            v
        };
        for (vh, spec) in topology.exchanges {
            let name = spec.name.clone();
            if let Some(v) = vhost(&vh) {
                if let Err(e) = v.declare_exchange(spec, false) {
                    tracing::warn!(
                        vhost = vh,
                        exchange = name,
                        "stored exchange not restored: {e}"
                    );
                }
            }
        }
        let mut messages = 0usize;
        for (vh, spec, id) in topology.queues {
            let name = spec.name.clone();
            let Some(v) = vhost(&vh) else { continue };
            match v.declare_queue(spec, false, true, 0) {
                Ok((q, _)) => {
                    debug_assert_eq!(q.persist.as_ref().map(|p| p.id), Some(id));
                    store.for_each_message(id, |m| {
                        messages += 1;
                        q.restore(m)
                    })?;
                }
                Err(e) => {
                    tracing::warn!(vhost = vh, queue = name, "stored queue not restored: {e}")
                }
            }
        }
        for b in topology.bindings {
            let Some(v) = vhost(&b.vhost) else { continue };
            let result = if b.to_queue {
                v.bind_queue(&b.destination, &b.source, &b.routing_key, b.arguments, 0)
            } else {
                v.bind_exchange(&b.destination, &b.source, &b.routing_key, b.arguments)
            };
            if let Err(e) = result {
                tracing::warn!(
                    vhost = b.vhost,
                    source = b.source,
                    destination = b.destination,
                    "stored binding not restored: {e}"
                );
            }
        }
        if messages > 0 {
            tracing::info!(
                messages,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "broker store recovered"
            );
        }
        Ok(())
    }

    /// Commits what the store has pending and stops its writer (shutdown).
    pub fn close_store(&self) {
        if let Some(s) = &self.store {
            s.close();
        }
    }

    /// Creates a vhost with the predeclared exchanges (a no-op if it exists).
    pub fn add_vhost(&self, name: &str) -> Arc<VHost> {
        self.vhosts
            .write()
            .entry(name.to_string())
            .or_insert_with(|| VHost::new(name, self.store.clone()))
            .clone()
    }

    pub fn vhost(&self, name: &str) -> Option<Arc<VHost>> {
        self.vhosts.read().get(name).cloned()
    }

    /// Every vhost, by name (management API).
    pub fn vhosts(&self) -> Vec<Arc<VHost>> {
        let mut all: Vec<_> = self.vhosts.read().values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Whether the memory alarm is on now.
    pub fn memory_alarm_on(&self) -> bool {
        self.alarms.borrow().memory
    }

    /// Whether the disk alarm is on now.
    pub fn disk_alarm_on(&self) -> bool {
        self.alarms.borrow().disk
    }

    /// Expires messages past their TTL in every queue, every 100 ms, until shutdown: RabbitMQ
    /// expires messages even in queues nobody reads (dead-lettering them where configured).
    pub async fn sweep_expired(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let vhosts: Vec<Arc<VHost>> = self.vhosts.read().values().cloned().collect();
            for vhost in vhosts {
                vhost.sweep_expired();
            }
        }
    }

    pub fn next_connection_id(&self) -> ConnectionId {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    /// Raises or clears the memory alarm; connections react through [`Broker::alarms`].
    pub fn set_memory_alarm(&self, on: bool) {
        self.alarms.send_if_modified(|a| {
            let changed = a.memory != on;
            a.memory = on;
            changed
        });
    }

    /// Raises or clears the disk alarm; connections react through [`Broker::alarms`].
    pub fn set_disk_alarm(&self, on: bool) {
        self.alarms.send_if_modified(|a| {
            let changed = a.disk != on;
            a.disk = on;
            changed
        });
    }

    pub fn alarms(&self) -> watch::Receiver<Alarms> {
        self.alarms.subscribe()
    }

    /// Deletes the exclusive queues of a closing connection.
    pub fn connection_closed(&self, connection: ConnectionId) {
        let vhosts: Vec<_> = self.vhosts.read().values().cloned().collect();
        for vhost in vhosts {
            for q in vhost.queues_owned_by(connection) {
                let _ = vhost.delete_queue(q.name(), connection, false, false);
            }
        }
    }
}

/// A virtual host: an isolated namespace of exchanges and queues.
#[derive(Debug)]
pub struct VHost {
    pub name: String,
    exchanges: RwLock<HashMap<String, Arc<Exchange>>>,
    queues: RwLock<HashMap<String, Arc<Queue>>>,
    /// Counters of deleted queues, so vhost totals never go down.
    retired: parking_lot::Mutex<super::stats::QueueCounters>,
    store: Option<Arc<BrokerStore>>,
}

/// The exchanges every vhost starts with (RabbitMQ's `declare_default_exchanges`).
const PREDECLARED: &[(&str, ExchangeKind, bool)] = &[
    ("", ExchangeKind::Direct, false),
    ("amq.direct", ExchangeKind::Direct, false),
    ("amq.fanout", ExchangeKind::Fanout, false),
    ("amq.topic", ExchangeKind::Topic, false),
    ("amq.headers", ExchangeKind::Headers, false),
    ("amq.match", ExchangeKind::Headers, false),
    ("amq.rabbitmq.trace", ExchangeKind::Topic, true),
];

fn is_true(v: bool) -> &'static str {
    if v {
        "true"
    } else {
        "false"
    }
}

impl VHost {
    fn new(name: &str, store: Option<Arc<BrokerStore>>) -> Arc<VHost> {
        let exchanges = PREDECLARED
            .iter()
            .map(|(n, kind, internal)| {
                (
                    n.to_string(),
                    Arc::new(Exchange::new(ExchangeSpec {
                        name: n.to_string(),
                        kind: *kind,
                        durable: true,
                        auto_delete: false,
                        internal: *internal,
                        arguments: FieldTable::default(),
                    })),
                )
            })
            .collect();
        Arc::new(VHost {
            name: name.to_string(),
            exchanges: RwLock::new(exchanges),
            queues: RwLock::new(HashMap::new()),
            retired: Default::default(),
            store,
        })
    }

    /// Hands a topology change to the store, if there is one.
    fn persist(&self, op: impl FnOnce() -> Op) {
        if let Some(s) = &self.store {
            s.submit(op());
        }
    }

    /// Stores or forgets a binding whose two ends are durable.
    #[allow(clippy::too_many_arguments)]
    fn persist_binding(
        &self,
        bind: bool,
        source: &Exchange,
        to_queue: bool,
        destination: &str,
        durable_destination: bool,
        routing_key: &str,
        arguments: &FieldTable,
    ) {
        if !(source.spec.durable && durable_destination) {
            return;
        }
        self.persist(|| {
            let key = binding_key(
                &self.name,
                source.name(),
                to_queue,
                destination,
                routing_key,
                arguments,
            );
            if bind {
                Op::PutBinding(key)
            } else {
                Op::DelBinding(key)
            }
        });
    }

    fn no_exchange(&self, name: &str) -> AmqpError {
        AmqpError::not_found(format!("no exchange '{name}' in vhost '{}'", self.name))
    }

    fn no_queue(&self, name: &str) -> AmqpError {
        AmqpError::not_found(format!("no queue '{name}' in vhost '{}'", self.name))
    }

    fn default_exchange_refused() -> AmqpError {
        AmqpError::access_refused("operation not permitted on the default exchange")
    }

    pub fn exchange(&self, name: &str) -> Option<Arc<Exchange>> {
        self.exchanges.read().get(name).cloned()
    }

    pub fn exchanges(&self) -> Vec<Arc<Exchange>> {
        self.exchanges.read().values().cloned().collect()
    }

    /// Every queue of the vhost (a snapshot).
    pub fn all_queues(&self) -> Vec<Arc<Queue>> {
        self.queues.read().values().cloned().collect()
    }

    pub fn queue(&self, name: &str) -> Option<Arc<Queue>> {
        self.queues.read().get(name).cloned()
    }

    /// The queues and the counters of every queue this vhost ever had (live plus deleted),
    /// read consistently (management API, Prometheus).
    pub fn queues_and_totals(&self) -> (Vec<Arc<Queue>>, super::stats::QueueCounters) {
        let queues = self.queues.read();
        let mut totals = *self.retired.lock();
        let list: Vec<Arc<Queue>> = queues.values().cloned().collect();
        for q in &list {
            totals += q.counters();
        }
        (list, totals)
    }

    fn queues_owned_by(&self, connection: ConnectionId) -> Vec<Arc<Queue>> {
        self.queues
            .read()
            .values()
            .filter(|q| q.owner == Some(connection))
            .cloned()
            .collect()
    }

    /// `exchange.declare`.
    pub fn declare_exchange(&self, spec: ExchangeSpec, passive: bool) -> AmqpResult<()> {
        if spec.name.is_empty() {
            return Err(Self::default_exchange_refused());
        }
        if passive {
            return self
                .exchange(&spec.name)
                .map(|_| ())
                .ok_or_else(|| self.no_exchange(&spec.name));
        }
        let mut exchanges = self.exchanges.write();
        if let Some(existing) = exchanges.get(&spec.name) {
            return check_exchange_equivalence(&existing.spec, &spec, &self.name);
        }
        if spec.name.starts_with("amq.") {
            return Err(AmqpError::access_refused(format!(
                "exchange name '{}' contains reserved prefix 'amq.*'",
                spec.name
            )));
        }
        if spec.durable {
            self.persist(|| Op::PutExchange {
                vhost: self.name.clone(),
                spec: spec.clone(),
            });
        }
        exchanges.insert(spec.name.clone(), Arc::new(Exchange::new(spec)));
        Ok(())
    }

    /// `exchange.delete`; deleting a missing exchange succeeds, as in RabbitMQ.
    pub fn delete_exchange(&self, name: &str, if_unused: bool) -> AmqpResult<()> {
        if name.is_empty() {
            return Err(Self::default_exchange_refused());
        }
        if name.starts_with("amq.") {
            return Err(AmqpError::access_refused(format!(
                "deletion of system exchange '{name}' in vhost '{}' not allowed",
                self.name
            )));
        }
        let removed = {
            let mut exchanges = self.exchanges.write();
            match exchanges.get(name) {
                None => return Ok(()),
                Some(x) if if_unused && x.has_bindings() => {
                    return Err(AmqpError::precondition(format!(
                        "exchange '{name}' in vhost '{}' in use",
                        self.name
                    )))
                }
                Some(_) => exchanges.remove(name),
            }
        };
        if removed.as_ref().is_some_and(|x| x.spec.durable) {
            self.persist(|| Op::DelExchange {
                vhost: self.name.clone(),
                name: name.to_string(),
            });
        }
        if removed.is_some() {
            self.remove_destination(&Destination::Exchange(name.into()));
        }
        Ok(())
    }

    /// Removes every binding to a deleted queue or exchange, then auto-deletes exchanges
    /// that lost their last binding.
    fn remove_destination(&self, destination: &Destination) {
        let exchanges = self.exchanges();
        let mut emptied = Vec::new();
        for x in exchanges {
            let had = x.has_bindings();
            x.unbind_destination(destination);
            if had && !x.has_bindings() && x.spec.auto_delete {
                emptied.push(x.spec.name.clone());
            }
        }
        for name in emptied {
            let _ = self.delete_exchange(&name, true);
        }
    }

    /// `queue.declare`; returns the queue and whether it was created. `server_named` is set
    /// when the broker generated the name (the client sent an empty one).
    pub fn declare_queue(
        &self,
        spec: QueueSpec,
        passive: bool,
        server_named: bool,
        connection: ConnectionId,
    ) -> AmqpResult<(Arc<Queue>, bool)> {
        if passive {
            let q = self
                .queue(&spec.name)
                .ok_or_else(|| self.no_queue(&spec.name))?;
            // A responder may check that a direct reply-to requester is still there.
            if !q.is_reply_to() {
                q.check_access(connection)?;
            }
            return Ok((q, false));
        }
        if spec.name.starts_with("amq.") && !server_named {
            // RabbitMQ refuses every client-given amq.* name, even an existing amq.gen-*
            // queue's; only a passive declare may name one.
            return Err(AmqpError::access_refused(format!(
                "queue name '{}' contains reserved prefix 'amq.*'",
                spec.name
            )));
        }
        let mut queues = self.queues.write();
        if let Some(existing) = queues.get(&spec.name) {
            existing.check_access(connection)?;
            check_queue_equivalence(&existing.spec, &spec, &self.name)?;
            existing.touch();
            return Ok((existing.clone(), false));
        }
        Queue::validate_arguments(&spec.arguments, &spec.name, &self.name)?;
        let quorum = matches!(
            spec.arguments.inner().get("x-queue-type"),
            Some(AMQPValue::LongString(t)) if t.as_bytes() == b"quorum"
        );
        if quorum {
            // RabbitMQ's own refusals for properties a quorum queue cannot have.
            let refused = if spec.exclusive {
                Some("exclusive-owner")
            } else if !spec.durable {
                Some("non-durable")
            } else if spec.auto_delete {
                Some("auto-delete")
            } else {
                None
            };
            if let Some(property) = refused {
                return Err(AmqpError::precondition(format!(
                    "invalid property '{property}' for queue '{}' in vhost '{}'",
                    spec.name, self.name
                )));
            }
            tracing::info!(
                queue = %spec.name,
                vhost = %self.name,
                "x-queue-type quorum: served as a durable classic queue on this one node (no replication; x-delivery-limit and other quorum-only arguments are not enforced)"
            );
        }
        let owner = spec.exclusive.then_some(connection);
        let persist = match &self.store {
            Some(store) if spec.durable && !spec.exclusive => {
                let id = store.queue_id(&self.name, &spec.name);
                store.submit(Op::PutQueue {
                    vhost: self.name.clone(),
                    id,
                    spec: spec.clone(),
                });
                Some(Persist {
                    store: store.clone(),
                    id,
                })
            }
            _ => None,
        };
        let q = Queue::with_store(spec, self.name.clone(), owner, persist);
        queues.insert(q.name().to_string(), q.clone());
        Ok((q, true))
    }

    /// Finds a queue the connection may use (404 if missing, 405 if another's exclusive).
    pub fn usable_queue(&self, name: &str, connection: ConnectionId) -> AmqpResult<Arc<Queue>> {
        let q = self.queue(name).ok_or_else(|| self.no_queue(name))?;
        q.check_access(connection)?;
        Ok(q)
    }

    /// `queue.delete`: returns the number of ready messages it held (0 if it did not exist).
    pub fn delete_queue(
        &self,
        name: &str,
        connection: ConnectionId,
        if_unused: bool,
        if_empty: bool,
    ) -> AmqpResult<u32> {
        let Some(q) = self.queue(name) else {
            return Ok(0);
        };
        q.check_access(connection)?;
        let (count, consumers) = q.delete(if_unused, if_empty)?;
        let mut counters = q.counters();
        counters.deleted_queues = 1;
        {
            let mut queues = self.queues.write();
            if queues.get(name).is_some_and(|x| Arc::ptr_eq(x, &q)) {
                queues.remove(name);
                *self.retired.lock() += counters;
                if let (Some(store), Some(p)) = (&self.store, &q.persist) {
                    // Under the queues lock, so a redeclare gets a new id after this.
                    store.forget_queue(&self.name, name);
                    store.submit(Op::DelQueue {
                        vhost: self.name.clone(),
                        name: name.to_string(),
                        id: p.id,
                    });
                }
            }
        }
        self.remove_destination(&Destination::Queue(name.into()));
        for c in consumers {
            c.channel.cancelled_by_server(&c);
        }
        Ok(count)
    }

    fn bindable_exchange(&self, name: &str) -> AmqpResult<Arc<Exchange>> {
        if name.is_empty() {
            return Err(Self::default_exchange_refused());
        }
        self.exchange(name).ok_or_else(|| self.no_exchange(name))
    }

    /// `queue.bind`.
    pub fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
        connection: ConnectionId,
    ) -> AmqpResult<()> {
        if queue.starts_with(super::channel::REPLY_TO_PREFIX) {
            return Err(AmqpError::access_refused(format!(
                "queue '{queue}' in vhost '{}' is a direct reply-to queue: it cannot be bound",
                self.name
            )));
        }
        let q = self.usable_queue(queue, connection)?;
        let x = self.bindable_exchange(exchange)?;
        x.bind(Binding {
            destination: Destination::Queue(q.name().into()),
            routing_key: routing_key.to_string(),
            arguments: arguments.clone(),
        })?;
        self.persist_binding(
            true,
            &x,
            true,
            q.name(),
            q.persist.is_some(),
            routing_key,
            &arguments,
        );
        Ok(())
    }

    /// `queue.unbind`; unbinding a binding that does not exist succeeds.
    pub fn unbind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
        connection: ConnectionId,
    ) -> AmqpResult<()> {
        let q = self.usable_queue(queue, connection)?;
        let x = self.bindable_exchange(exchange)?;
        self.persist_binding(
            false,
            &x,
            true,
            q.name(),
            q.persist.is_some(),
            routing_key,
            &arguments,
        );
        x.unbind(&Binding {
            destination: Destination::Queue(q.name().into()),
            routing_key: routing_key.to_string(),
            arguments,
        });
        self.auto_delete_if_unbound(&x);
        Ok(())
    }

    /// `exchange.bind` (exchange-to-exchange).
    pub fn bind_exchange(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> AmqpResult<()> {
        let src = self.bindable_exchange(source)?;
        let dst = self.bindable_exchange(destination)?;
        src.bind(Binding {
            destination: Destination::Exchange(dst.name().into()),
            routing_key: routing_key.to_string(),
            arguments: arguments.clone(),
        })?;
        self.persist_binding(
            true,
            &src,
            false,
            dst.name(),
            dst.spec.durable,
            routing_key,
            &arguments,
        );
        Ok(())
    }

    /// `exchange.unbind`.
    pub fn unbind_exchange(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> AmqpResult<()> {
        let src = self.bindable_exchange(source)?;
        let dst = self.bindable_exchange(destination)?;
        self.persist_binding(
            false,
            &src,
            false,
            dst.name(),
            dst.spec.durable,
            routing_key,
            &arguments,
        );
        src.unbind(&Binding {
            destination: Destination::Exchange(dst.name().into()),
            routing_key: routing_key.to_string(),
            arguments,
        });
        self.auto_delete_if_unbound(&src);
        Ok(())
    }

    fn auto_delete_if_unbound(&self, x: &Arc<Exchange>) {
        if x.spec.auto_delete && !x.has_bindings() {
            let _ = self.delete_exchange(&x.spec.name, true);
        }
    }

    /// Routes a message: the queues it goes to, following exchange-to-exchange bindings and
    /// alternate exchanges. Publishing to a missing exchange is 404, to an internal one 403.
    pub fn route(
        &self,
        exchange: &str,
        routing_key: &str,
        headers: Option<&FieldTable>,
    ) -> AmqpResult<Vec<Arc<Queue>>> {
        if exchange.is_empty() {
            return Ok(self.queue(routing_key).into_iter().collect());
        }
        let exchanges = self.exchanges.read();
        let start = exchanges
            .get(exchange)
            .ok_or_else(|| self.no_exchange(exchange))?;
        if start.spec.internal {
            return Err(AmqpError::access_refused(format!(
                "cannot publish to internal exchange '{exchange}' in vhost '{}'",
                self.name
            )));
        }
        let mut queue_names: Vec<Arc<str>> = Vec::new();
        let mut visited: HashSet<&str> = HashSet::new();
        let mut pending: Vec<&Arc<Exchange>> = vec![start];
        let mut dests = Vec::new();
        while let Some(x) = pending.pop() {
            if !visited.insert(x.name()) {
                continue;
            }
            dests.clear();
            x.route(routing_key, headers, &mut dests);
            if dests.is_empty() {
                if let Some(alt) = x.alternate.as_deref().and_then(|a| exchanges.get(a)) {
                    pending.push(alt);
                }
                continue;
            }
            for d in dests.drain(..) {
                match d {
                    Destination::Queue(q) => {
                        if !queue_names.contains(&q) {
                            queue_names.push(q)
                        }
                    }
                    Destination::Exchange(e) => {
                        if let Some(next) = exchanges.get(&*e) {
                            pending.push(next);
                        }
                    }
                }
            }
        }
        drop(exchanges);
        let queues = self.queues.read();
        Ok(queue_names
            .iter()
            .filter_map(|n| queues.get(&**n).cloned())
            .collect())
    }
}

fn inequivalent(
    arg: &str,
    kind: &str,
    name: &str,
    vhost: &str,
    got: &str,
    current: &str,
) -> AmqpError {
    AmqpError::precondition(format!(
        "inequivalent arg '{arg}' for {kind} '{name}' in vhost '{vhost}': received '{got}' but current is '{current}'"
    ))
}

fn check_exchange_equivalence(
    current: &ExchangeSpec,
    new: &ExchangeSpec,
    vhost: &str,
) -> AmqpResult<()> {
    let n = &current.name;
    if current.kind != new.kind {
        return Err(inequivalent(
            "type",
            "exchange",
            n,
            vhost,
            new.kind.as_str(),
            current.kind.as_str(),
        ));
    }
    for (arg, got, cur) in [
        ("durable", new.durable, current.durable),
        ("auto_delete", new.auto_delete, current.auto_delete),
        ("internal", new.internal, current.internal),
    ] {
        if got != cur {
            return Err(inequivalent(
                arg,
                "exchange",
                n,
                vhost,
                is_true(got),
                is_true(cur),
            ));
        }
    }
    compare_args(
        &["alternate-exchange"],
        &current.arguments,
        &new.arguments,
        "exchange",
        n,
        vhost,
    )
}

/// Queue arguments RabbitMQ compares on redeclare.
const EQUIVALENCE_ARGS: &[&str] = &[
    "x-message-ttl",
    "x-expires",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-overflow",
    "x-max-priority",
    "x-single-active-consumer",
    "x-queue-type",
    "x-consumer-timeout",
];

fn check_queue_equivalence(current: &QueueSpec, new: &QueueSpec, vhost: &str) -> AmqpResult<()> {
    let n = &current.name;
    for (arg, got, cur) in [
        ("durable", new.durable, current.durable),
        ("exclusive", new.exclusive, current.exclusive),
        ("auto_delete", new.auto_delete, current.auto_delete),
    ] {
        if got != cur {
            return Err(inequivalent(
                arg,
                "queue",
                n,
                vhost,
                is_true(got),
                is_true(cur),
            ));
        }
    }
    compare_args(
        EQUIVALENCE_ARGS,
        &current.arguments,
        &new.arguments,
        "queue",
        n,
        vhost,
    )
}

fn compare_args(
    keys: &[&str],
    current: &FieldTable,
    new: &FieldTable,
    kind: &str,
    name: &str,
    vhost: &str,
) -> AmqpResult<()> {
    for key in keys {
        let (c, g) = (current.inner().get(*key), new.inner().get(*key));
        if !numeric_equal(c, g) {
            return Err(inequivalent(key, kind, name, vhost, &show(g), &show(c)));
        }
    }
    Ok(())
}

/// Integer arguments compare by value whatever their width (clients differ in the tag).
fn numeric_equal(a: Option<&AMQPValue>, b: Option<&AMQPValue>) -> bool {
    match (a.and_then(as_i128), b.and_then(as_i128)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

pub(crate) fn as_i128(v: &AMQPValue) -> Option<i128> {
    Some(match v {
        AMQPValue::ShortShortInt(x) => *x as i128,
        AMQPValue::ShortShortUInt(x) => *x as i128,
        AMQPValue::ShortInt(x) => *x as i128,
        AMQPValue::ShortUInt(x) => *x as i128,
        AMQPValue::LongInt(x) => *x as i128,
        AMQPValue::LongUInt(x) => *x as i128,
        AMQPValue::LongLongInt(x) => *x as i128,
        _ => return None,
    })
}

fn show(v: Option<&AMQPValue>) -> String {
    match v {
        None => "none".to_string(),
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(s)) => s.to_string(),
        Some(AMQPValue::Boolean(b)) => b.to_string(),
        Some(other) => as_i128(other).map_or_else(|| format!("{other:?}"), |n| n.to_string()),
    }
}
