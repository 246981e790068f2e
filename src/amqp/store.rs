//! `broker.redb`: what the broker keeps across restarts — durable exchanges, queues (with
//! their arguments) and bindings, and persistent messages on durable queues.
//!
//! One writer thread owns every write. Broker code never touches the file: it hands
//! operations to [`BrokerStore::submit`] (cheap, a push under a mutex, in the order the broker
//! performed them), and the writer drains everything pending into one write transaction per
//! fsync (`Durability::Immediate`): group commit. A [`Op::Barrier`] runs its callback once
//! the commit holding every earlier operation is on disk — publisher confirms go out that
//! way, so a confirm is never sent for a message a crash could lose. A slow disk makes
//! batches larger, never confirms earlier.
//!
//! A publish and the removal of the same message in one batch (a consumer that keeps up)
//! cancel out and never reach the file.
//!
//! Versioning follows `src/store`: [`SCHEMA_VERSION`] in the `meta` table; [`BrokerStore::open`]
//! migrates older files and refuses newer ones; `tests/fixtures/broker-store-v1.redb` pins
//! version 1.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amq_protocol::frame::WriteContext;
use amq_protocol::types::generation::gen_field_table;
use amq_protocol::types::parsing::parse_field_table;
use amq_protocol::types::FieldTable;
use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::exchange::{ExchangeKind, ExchangeSpec};
use super::message::Message;
use super::queue::{Queue, QueueSpec};

/// redb's page cache: small, so memory stays bounded however much the queues hold.
const CACHE_BYTES: usize = 16 * 1024 * 1024;

/// A writer under load stops lingering for more operations once this many are pending.
const BATCH_OPS: usize = 512;
/// The longest a writer under load lingers before committing.
const LINGER: Duration = Duration::from_millis(2);
/// A writer under load commits once a slice this long brings no new operation.
const QUIET: Duration = Duration::from_micros(500);

/// The schema this mqic writes. Bump it with a migration in [`migrate`] and a fixture test.
pub const SCHEMA_VERSION: u64 = 1;

/// `schema_version` -> u64; `next_queue_id` -> u64.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// (vhost, name) -> kind, flags, arguments.
const EXCHANGES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("exchanges");
/// (vhost, name) -> queue id, flags, arguments.
const QUEUES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("queues");
/// (vhost, source, destination kind, destination, routing key, arguments) -> nothing.
const BINDINGS: TableDefinition<&[u8], ()> = TableDefinition::new("bindings");
/// (queue id, seq) -> the message record.
const MESSAGES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("messages");
/// (queue id, seq) of messages delivered at least once: they come back `redelivered`.
const DELIVERED: TableDefinition<(u64, u64), ()> = TableDefinition::new("delivered");

#[derive(Debug, thiserror::Error)]
pub enum BrokerStoreError {
    #[error("broker store {path}: {source}")]
    Redb { path: PathBuf, source: redb::Error },
    #[error("broker store {path} has schema version {found}, newer than this mqic ({SCHEMA_VERSION}); upgrade mqic")]
    TooNew { path: PathBuf, found: u64 },
    #[error("broker store {path} is closed")]
    Closed { path: PathBuf },
    #[error("broker store {path}: record in {table} is not readable: {reason}")]
    Corrupt {
        path: PathBuf,
        table: &'static str,
        reason: String,
    },
}

type Result<T> = std::result::Result<T, BrokerStoreError>;

/// Called once the commit holding every earlier operation is on disk (`true`), or failed.
pub type BarrierFn = Box<dyn FnOnce(bool) + Send>;

/// One change for the writer.
pub enum Op {
    PutExchange {
        vhost: String,
        spec: ExchangeSpec,
    },
    DelExchange {
        vhost: String,
        name: String,
    },
    PutQueue {
        vhost: String,
        id: u64,
        spec: QueueSpec,
    },
    DelQueue {
        vhost: String,
        name: String,
        id: u64,
    },
    PutBinding(Vec<u8>),
    DelBinding(Vec<u8>),
    /// A persistent message entered durable queue `queue` at `seq`.
    Publish {
        queue: u64,
        seq: u64,
        message: Arc<Message>,
        /// A queue keeping only an index entry for this message: told once it is on disk,
        /// so it can drop the body from memory.
        paged: Option<Weak<Queue>>,
    },
    /// It left for good (acked, dropped, expired, purged, dead-lettered).
    Remove {
        queue: u64,
        seq: u64,
    },
    /// It was delivered (comes back `redelivered` after a restart).
    Delivered {
        queue: u64,
        seq: u64,
    },
    Barrier(BarrierFn),
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Barrier(_) => f.write_str("Barrier"),
            Op::Publish { queue, seq, .. } => write!(f, "Publish({queue},{seq})"),
            Op::Remove { queue, seq } => write!(f, "Remove({queue},{seq})"),
            Op::Delivered { queue, seq } => write!(f, "Delivered({queue},{seq})"),
            Op::PutExchange { vhost, spec } => write!(f, "PutExchange({vhost},{})", spec.name),
            Op::DelExchange { vhost, name } => write!(f, "DelExchange({vhost},{name})"),
            Op::PutQueue { vhost, spec, .. } => write!(f, "PutQueue({vhost},{})", spec.name),
            Op::DelQueue { vhost, name, .. } => write!(f, "DelQueue({vhost},{name})"),
            Op::PutBinding(_) => f.write_str("PutBinding"),
            Op::DelBinding(_) => f.write_str("DelBinding"),
        }
    }
}

/// A binding as stored (both ends durable).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredBinding {
    pub vhost: String,
    pub source: String,
    /// True for a queue destination, false for an exchange.
    pub to_queue: bool,
    pub destination: String,
    pub routing_key: String,
    pub arguments: FieldTable,
}

/// A message read back at boot.
#[derive(Debug)]
pub struct StoredMessage {
    pub seq: u64,
    pub message: Message,
    /// Milliseconds since the epoch when it was enqueued (for TTLs across a restart).
    pub enqueued_ms: u64,
    pub redelivered: bool,
}

/// Durable topology read back at boot, replayed through the broker's declare and bind.
#[derive(Debug, Default)]
pub struct Topology {
    pub exchanges: Vec<(String, ExchangeSpec)>,
    /// (vhost, spec, queue id)
    pub queues: Vec<(String, QueueSpec, u64)>,
    pub bindings: Vec<StoredBinding>,
}

#[derive(Default)]
struct Pending {
    ops: Vec<Op>,
    closing: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Commits so far (for tests and the benchmark).
    commits: AtomicU64,
}

/// The broker's store and its writer thread.
pub struct BrokerStore {
    path: PathBuf,
    /// `None` once closed: the file is released for the next owner.
    db: Mutex<Option<Arc<Database>>>,
    shared: Arc<Shared>,
    /// Durable queue ids by (vhost, name); ids are never reused.
    queue_ids: Mutex<HashMap<(String, String), u64>>,
    next_queue_id: AtomicU64,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for BrokerStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerStore")
            .field("path", &self.path)
            .finish()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl BrokerStore {
    /// Opens (or creates) `broker.redb`, migrating an older schema and refusing a newer one,
    /// and starts the writer thread.
    pub fn open(path: &Path) -> Result<Arc<BrokerStore>> {
        let err = |e: redb::Error| BrokerStoreError::Redb {
            path: path.to_path_buf(),
            source: e,
        };
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| err(e.into()))?;
        let next = migrate(&db, path)?;
        let store = BrokerStore {
            path: path.to_path_buf(),
            db: Mutex::new(Some(Arc::new(db))),
            shared: Arc::new(Shared {
                pending: Mutex::new(Pending::default()),
                wake: Condvar::new(),
                commits: AtomicU64::new(0),
            }),
            queue_ids: Mutex::new(HashMap::new()),
            next_queue_id: AtomicU64::new(next),
            writer: Mutex::new(None),
        };
        let db = store.open_db()?;
        let shared = store.shared.clone();
        let path_owned = store.path.clone();
        let handle = std::thread::Builder::new()
            .name("broker-store".into())
            .spawn(move || writer(db, shared, path_owned))
            .map_err(|e| err(redb::StorageError::Io(e).into()))?;
        *store.writer.lock() = Some(handle);
        Ok(Arc::new(store))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open_db(&self) -> Result<Arc<Database>> {
        self.db
            .lock()
            .clone()
            .ok_or_else(|| BrokerStoreError::Closed {
                path: self.path.clone(),
            })
    }

    fn err(&self) -> impl Fn(redb::Error) -> BrokerStoreError + '_ {
        |e| BrokerStoreError::Redb {
            path: self.path.clone(),
            source: e,
        }
    }

    fn corrupt(&self, table: &'static str, reason: impl Into<String>) -> BrokerStoreError {
        BrokerStoreError::Corrupt {
            path: self.path.clone(),
            table,
            reason: reason.into(),
        }
    }

    /// The schema version recorded in the file.
    pub fn schema_version(&self) -> Result<u64> {
        let e = self.err();
        let txn = self.open_db()?.begin_read().map_err(|x| e(x.into()))?;
        let meta = txn.open_table(META).map_err(|x| e(x.into()))?;
        let v = meta
            .get("schema_version")
            .map_err(|x| e(x.into()))?
            .map(|g| g.value());
        Ok(v.unwrap_or(0))
    }

    /// Reads the durable topology, and remembers the queue ids for [`BrokerStore::queue_id`].
    pub fn topology(&self) -> Result<Topology> {
        let e = self.err();
        let txn = self.open_db()?.begin_read().map_err(|x| e(x.into()))?;
        let mut out = Topology::default();
        {
            let t = txn.open_table(EXCHANGES).map_err(|x| e(x.into()))?;
            for row in t.iter().map_err(|x| e(x.into()))? {
                let (k, v) = row.map_err(|x| e(x.into()))?;
                let (vhost, name) = decode_name_key(k.value())
                    .ok_or_else(|| self.corrupt("exchanges", "bad key"))?;
                let spec = decode_exchange(name, v.value())
                    .ok_or_else(|| self.corrupt("exchanges", "bad record"))?;
                out.exchanges.push((vhost, spec));
            }
        }
        {
            let t = txn.open_table(QUEUES).map_err(|x| e(x.into()))?;
            let mut ids = self.queue_ids.lock();
            for row in t.iter().map_err(|x| e(x.into()))? {
                let (k, v) = row.map_err(|x| e(x.into()))?;
                let (vhost, name) =
                    decode_name_key(k.value()).ok_or_else(|| self.corrupt("queues", "bad key"))?;
                let (id, spec) = decode_queue(name, v.value())
                    .ok_or_else(|| self.corrupt("queues", "bad record"))?;
                ids.insert((vhost.clone(), spec.name.clone()), id);
                out.queues.push((vhost, spec, id));
            }
        }
        {
            let t = txn.open_table(BINDINGS).map_err(|x| e(x.into()))?;
            for row in t.iter().map_err(|x| e(x.into()))? {
                let (k, _) = row.map_err(|x| e(x.into()))?;
                out.bindings.push(
                    decode_binding(k.value()).ok_or_else(|| self.corrupt("bindings", "bad key"))?,
                );
            }
        }
        Ok(out)
    }

    /// Calls `f` with every stored message of queue `id`, in seq order.
    pub fn for_each_message(&self, id: u64, mut f: impl FnMut(StoredMessage)) -> Result<()> {
        let e = self.err();
        let txn = self.open_db()?.begin_read().map_err(|x| e(x.into()))?;
        let messages = txn.open_table(MESSAGES).map_err(|x| e(x.into()))?;
        let delivered = txn.open_table(DELIVERED).map_err(|x| e(x.into()))?;
        let mut marks = HashSet::new();
        for row in delivered
            .range((id, 0)..=(id, u64::MAX))
            .map_err(|x| e(x.into()))?
        {
            let (k, _) = row.map_err(|x| e(x.into()))?;
            marks.insert(k.value().1);
        }
        for row in messages
            .range((id, 0)..=(id, u64::MAX))
            .map_err(|x| e(x.into()))?
        {
            let (k, v) = row.map_err(|x| e(x.into()))?;
            let seq = k.value().1;
            let (message, enqueued_ms) = decode_message(v.value())
                .ok_or_else(|| self.corrupt("messages", format!("queue {id} seq {seq}")))?;
            f(StoredMessage {
                seq,
                message,
                enqueued_ms,
                redelivered: marks.contains(&seq),
            });
        }
        Ok(())
    }

    /// The stored messages of queue `id` with seqs in `from..=to`, in order (paging in).
    pub fn load(&self, id: u64, from: u64, to: u64) -> Result<Vec<(u64, Message)>> {
        let e = self.err();
        let txn = self.open_db()?.begin_read().map_err(|x| e(x.into()))?;
        let messages = txn.open_table(MESSAGES).map_err(|x| e(x.into()))?;
        let mut out = Vec::new();
        for row in messages
            .range((id, from)..=(id, to))
            .map_err(|x| e(x.into()))?
        {
            let (k, v) = row.map_err(|x| e(x.into()))?;
            let seq = k.value().1;
            let (message, _) = decode_message(v.value())
                .ok_or_else(|| self.corrupt("messages", format!("queue {id} seq {seq}")))?;
            out.push((seq, message));
        }
        Ok(out)
    }

    /// The id of durable queue `name` in `vhost`: the stored one, or a new one.
    pub fn queue_id(&self, vhost: &str, name: &str) -> u64 {
        *self
            .queue_ids
            .lock()
            .entry((vhost.to_string(), name.to_string()))
            .or_insert_with(|| self.next_queue_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Forgets a deleted queue's id (a queue declared again with its name gets a new one).
    pub fn forget_queue(&self, vhost: &str, name: &str) {
        self.queue_ids
            .lock()
            .remove(&(vhost.to_string(), name.to_string()));
    }

    /// Queues an operation for the next commit.
    pub fn submit(&self, op: Op) {
        let mut p = self.shared.pending.lock();
        let was_empty = p.ops.is_empty();
        p.ops.push(op);
        let full = p.ops.len() == BATCH_OPS;
        drop(p);
        if was_empty || full {
            self.shared.wake.notify_one();
        }
    }

    /// Queues several operations, in order, for the next commit.
    pub fn submit_all(&self, ops: impl IntoIterator<Item = Op>) {
        let mut p = self.shared.pending.lock();
        let was_empty = p.ops.is_empty();
        let before = p.ops.len();
        p.ops.extend(ops);
        let now_empty = p.ops.is_empty();
        let filled = before < BATCH_OPS && p.ops.len() >= BATCH_OPS;
        drop(p);
        if (was_empty && !now_empty) || filled {
            self.shared.wake.notify_one();
        }
    }

    /// Runs `f` once everything submitted so far is on disk.
    pub fn barrier(&self, f: impl FnOnce(bool) + Send + 'static) {
        self.submit(Op::Barrier(Box::new(f)));
    }

    /// Blocks until everything submitted so far is on disk; false if the commit failed.
    pub fn sync(&self) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        self.barrier(move |ok| {
            let _ = tx.send(ok);
        });
        rx.recv().unwrap_or(false)
    }

    /// Write transactions committed so far.
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Relaxed)
    }

    /// Commits what is pending and stops the writer (shutdown). Later submissions are lost.
    pub fn close(&self) {
        self.shared.pending.lock().closing = true;
        self.shared.wake.notify_one();
        if let Some(h) = self.writer.lock().take() {
            let _ = h.join();
        }
        // The writer has let go of its handle; this releases the file.
        self.db.lock().take();
    }
}

impl Drop for BrokerStore {
    /// A store dropped without [`BrokerStore::close`] still commits what is pending.
    fn drop(&mut self) {
        self.close();
    }
}

/// Brings the file to [`SCHEMA_VERSION`]; returns the next free queue id.
fn migrate(db: &Database, path: &Path) -> Result<u64> {
    let err = |e: redb::Error| BrokerStoreError::Redb {
        path: path.to_path_buf(),
        source: e,
    };
    let txn = db.begin_write().map_err(|e| err(e.into()))?;
    let (found, next) = {
        let meta = txn.open_table(META).map_err(|e| err(e.into()))?;
        let found = meta
            .get("schema_version")
            .map_err(|e| err(e.into()))?
            .map(|g| g.value());
        let next = meta
            .get("next_queue_id")
            .map_err(|e| err(e.into()))?
            .map(|g| g.value());
        (found, next)
    };
    if let Some(found) = found {
        if found > SCHEMA_VERSION {
            return Err(BrokerStoreError::TooNew {
                path: path.to_path_buf(),
                found,
            });
        }
    }
    txn.open_table(EXCHANGES).map_err(|e| err(e.into()))?;
    txn.open_table(BINDINGS).map_err(|e| err(e.into()))?;
    txn.open_table(MESSAGES).map_err(|e| err(e.into()))?;
    txn.open_table(DELIVERED).map_err(|e| err(e.into()))?;
    // The next queue id: past every stored one (ids are never reused).
    let mut next = next.unwrap_or(1);
    {
        let queues = txn.open_table(QUEUES).map_err(|e| err(e.into()))?;
        for row in queues.iter().map_err(|e| err(e.into()))? {
            let (_, v) = row.map_err(|e| err(e.into()))?;
            if let Some(id) = v.value().get(..8) {
                next = next.max(u64::from_le_bytes(id.try_into().expect("8 bytes")) + 1);
            }
        }
    }
    // Migrations go here, one `if version < N` block each, oldest first. Version 1 is the
    // first schema, so there is nothing to convert yet.
    {
        let mut meta = txn.open_table(META).map_err(|e| err(e.into()))?;
        meta.insert("schema_version", SCHEMA_VERSION)
            .map_err(|e| err(e.into()))?;
        meta.insert("next_queue_id", next)
            .map_err(|e| err(e.into()))?;
    }
    txn.commit().map_err(|e| err(e.into()))?;
    Ok(next)
}

/// The writer thread: drain, one transaction, fsync, release barriers; until closed.
///
/// Under load (operations arrived while the last commit ran) the writer lingers before the
/// next commit while operations keep streaming in — at most [`LINGER`], and only while
/// each [`QUIET`] slice brings more, or until [`BATCH_OPS`] are pending — so a busy
/// broker makes fewer, larger commits: each fsync and b-tree commit costs CPU that the
/// connections need on a small machine. An idle writer commits at once (a lone publisher
/// waiting for its confirm never waits for company), and a stream that stops (a
/// publisher's whole confirm window pending) is committed at once too.
fn writer(db: Arc<Database>, shared: Arc<Shared>, path: PathBuf) {
    let mut ops = Vec::new();
    let mut busy = false;
    let mut stats = WriterStats::new();
    loop {
        let closing = {
            let mut p = shared.pending.lock();
            while p.ops.is_empty() && !p.closing {
                shared.wake.wait(&mut p);
            }
            if busy {
                let deadline = Instant::now() + LINGER;
                while p.ops.len() < BATCH_OPS && !p.closing {
                    let (before, now) = (p.ops.len(), Instant::now());
                    if now >= deadline {
                        break;
                    }
                    let _ = shared.wake.wait_until(&mut p, deadline.min(now + QUIET));
                    if p.ops.len() == before {
                        break;
                    }
                }
            }
            std::mem::swap(&mut p.ops, &mut ops);
            p.closing
        };
        if !ops.is_empty() {
            let t0 = Instant::now();
            let ok = match apply(&db, &ops, &mut stats) {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(path = %path.display(), "broker store commit failed: {e}");
                    false
                }
            };
            let t1 = Instant::now();
            shared.commits.fetch_add(1, Ordering::Relaxed);
            let batch = ops.len();
            // Paging queues may now drop the bodies of what this commit wrote.
            let mut written: Vec<(Weak<Queue>, u64)> = Vec::new();
            let mut barriers = Vec::new();
            for op in ops.drain(..) {
                match op {
                    Op::Barrier(f) => barriers.push(f),
                    Op::Publish {
                        seq,
                        paged: Some(q),
                        ..
                    } if ok => match written.iter_mut().find(|(w, _)| w.ptr_eq(&q)) {
                        Some((_, max)) => *max = (*max).max(seq),
                        None => written.push((q, seq)),
                    },
                    _ => {}
                }
            }
            for (q, seq) in written {
                if let Some(q) = q.upgrade() {
                    q.committed(seq);
                }
            }
            // Barriers last, so whoever waits on one also sees the bodies paged out.
            for f in barriers {
                f(ok);
            }
            stats.batch(batch, t1 - t0, t1.elapsed());
        }
        let p = shared.pending.lock();
        if closing && p.ops.is_empty() {
            return;
        }
        busy = !p.ops.is_empty();
    }
}

/// Per-batch timings of the writer, summed and logged once a second at debug level
/// (`RUST_LOG=mqic::amqp::store=debug`): batches, operations per batch, time preparing
/// the transaction, committing it (b-tree pages and the fsync) and releasing barriers.
struct WriterStats {
    since: Instant,
    batches: u64,
    ops: u64,
    max_ops: usize,
    last_commit: Duration,
    apply: Duration,
    commit: Duration,
    release: Duration,
}

impl WriterStats {
    fn new() -> WriterStats {
        WriterStats {
            since: Instant::now(),
            batches: 0,
            ops: 0,
            max_ops: 0,
            last_commit: Duration::ZERO,
            apply: Duration::ZERO,
            commit: Duration::ZERO,
            release: Duration::ZERO,
        }
    }

    fn batch(&mut self, ops: usize, apply_and_commit: Duration, release: Duration) {
        self.batches += 1;
        self.ops += ops as u64;
        self.max_ops = self.max_ops.max(ops);
        let commit = std::mem::take(&mut self.last_commit);
        self.commit += commit;
        self.apply += apply_and_commit.saturating_sub(commit);
        self.release += release;
        let elapsed = self.since.elapsed();
        if elapsed >= Duration::from_secs(1) {
            let n = self.batches as f64;
            let ms = |d: Duration| d.as_secs_f64() * 1000.0 / n;
            tracing::debug!(
                batches = self.batches,
                ops_per_batch = format_args!("{:.1}", self.ops as f64 / n),
                max_ops = self.max_ops,
                apply_ms = format_args!("{:.3}", ms(self.apply)),
                commit_ms = format_args!("{:.3}", ms(self.commit)),
                release_ms = format_args!("{:.3}", ms(self.release)),
                busy_pct = format_args!(
                    "{:.0}",
                    (self.apply + self.commit + self.release).as_secs_f64() * 100.0
                        / elapsed.as_secs_f64()
                ),
                "broker store writer, per batch over the last second"
            );
            *self = WriterStats::new();
        }
    }
}

/// One write transaction for a batch of operations.
fn apply(
    db: &Database,
    ops: &[Op],
    stats: &mut WriterStats,
) -> std::result::Result<(), redb::Error> {
    // A message published and removed within the batch never needs to reach the file.
    let mut published = HashSet::new();
    let mut cancelled = HashSet::new();
    for op in ops {
        match op {
            Op::Publish { queue, seq, .. } => {
                published.insert((*queue, *seq));
            }
            Op::Remove { queue, seq } if published.contains(&(*queue, *seq)) => {
                cancelled.insert((*queue, *seq));
            }
            _ => {}
        }
    }
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| redb::Error::Corrupted(e.to_string()))?;
    {
        let mut exchanges = txn.open_table(EXCHANGES)?;
        let mut queues = txn.open_table(QUEUES)?;
        let mut bindings = txn.open_table(BINDINGS)?;
        let mut messages = txn.open_table(MESSAGES)?;
        let mut delivered = txn.open_table(DELIVERED)?;
        let mut meta = txn.open_table(META)?;
        let mut buf = Vec::with_capacity(1024);
        for op in ops {
            match op {
                Op::Publish {
                    queue,
                    seq,
                    message,
                    ..
                } => {
                    if cancelled.contains(&(*queue, *seq)) {
                        continue;
                    }
                    buf.clear();
                    encode_message(&mut buf, message, now_ms());
                    messages.insert((*queue, *seq), buf.as_slice())?;
                }
                Op::Remove { queue, seq } => {
                    if cancelled.contains(&(*queue, *seq)) {
                        continue;
                    }
                    messages.remove((*queue, *seq))?;
                    delivered.remove((*queue, *seq))?;
                }
                Op::Delivered { queue, seq } => {
                    if cancelled.contains(&(*queue, *seq)) {
                        continue;
                    }
                    delivered.insert((*queue, *seq), ())?;
                }
                Op::PutExchange { vhost, spec } => {
                    exchanges.insert(
                        name_key(vhost, &spec.name).as_slice(),
                        encode_exchange(spec).as_slice(),
                    )?;
                }
                Op::DelExchange { vhost, name } => {
                    exchanges.remove(name_key(vhost, name).as_slice())?;
                    bindings.retain(|k, _| {
                        decode_binding(k).is_none_or(|b| {
                            !(b.vhost == *vhost
                                && (b.source == *name || (!b.to_queue && b.destination == *name)))
                        })
                    })?;
                }
                Op::PutQueue { vhost, id, spec } => {
                    queues.insert(
                        name_key(vhost, &spec.name).as_slice(),
                        encode_queue(*id, spec).as_slice(),
                    )?;
                    let next = meta.get("next_queue_id")?.map(|g| g.value()).unwrap_or(1);
                    if *id >= next {
                        meta.insert("next_queue_id", id + 1)?;
                    }
                }
                Op::DelQueue { vhost, name, id } => {
                    let key = name_key(vhost, name);
                    // Only if the stored record is this queue (not a later one of the name).
                    let current = queues.get(key.as_slice())?.and_then(|g| {
                        g.value()
                            .get(..8)
                            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                    });
                    if current == Some(*id) {
                        queues.remove(key.as_slice())?;
                    }
                    messages.retain_in((*id, 0)..=(*id, u64::MAX), |_, _| false)?;
                    delivered.retain_in((*id, 0)..=(*id, u64::MAX), |_, _| false)?;
                    bindings.retain(|k, _| {
                        decode_binding(k).is_none_or(|b| {
                            !(b.vhost == *vhost && b.to_queue && b.destination == *name)
                        })
                    })?;
                }
                Op::PutBinding(key) => {
                    bindings.insert(key.as_slice(), ())?;
                }
                Op::DelBinding(key) => {
                    bindings.remove(key.as_slice())?;
                }
                Op::Barrier(_) => {}
            }
        }
    }
    let t = Instant::now();
    txn.commit()?;
    stats.last_commit = t.elapsed();
    Ok(())
}

// ---- encodings ------------------------------------------------------------------------

fn put_str(buf: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&s.as_bytes()[..len as usize]);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8")))
    }
    fn str(&mut self) -> Option<String> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().expect("2")) as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

fn encode_table(buf: &mut Vec<u8>, t: &FieldTable) {
    let out = gen_field_table(t)(WriteContext::from(Vec::with_capacity(16)))
        .expect("generating into a Vec cannot fail")
        .into_inner()
        .0;
    buf.extend_from_slice(&out);
}

fn decode_table(bytes: &[u8]) -> Option<FieldTable> {
    parse_field_table(bytes).ok().map(|(_, t)| t)
}

fn name_key(vhost: &str, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + vhost.len() + name.len());
    put_str(&mut k, vhost);
    put_str(&mut k, name);
    k
}

fn decode_name_key(k: &[u8]) -> Option<(String, String)> {
    let mut r = Reader(k);
    Some((r.str()?, r.str()?))
}

fn encode_exchange(spec: &ExchangeSpec) -> Vec<u8> {
    let mut buf = Vec::new();
    put_str(&mut buf, spec.kind.as_str());
    buf.push(spec.durable as u8 | (spec.auto_delete as u8) << 1 | (spec.internal as u8) << 2);
    encode_table(&mut buf, &spec.arguments);
    buf
}

fn decode_exchange(name: String, v: &[u8]) -> Option<ExchangeSpec> {
    let mut r = Reader(v);
    let kind = ExchangeKind::parse(&r.str()?).ok()?;
    let flags = r.u8()?;
    Some(ExchangeSpec {
        name,
        kind,
        durable: flags & 1 != 0,
        auto_delete: flags & 2 != 0,
        internal: flags & 4 != 0,
        arguments: decode_table(r.rest())?,
    })
}

fn encode_queue(id: u64, spec: &QueueSpec) -> Vec<u8> {
    let mut buf = Vec::new();
    buf.extend_from_slice(&id.to_le_bytes());
    buf.push(spec.durable as u8 | (spec.exclusive as u8) << 1 | (spec.auto_delete as u8) << 2);
    encode_table(&mut buf, &spec.arguments);
    buf
}

fn decode_queue(name: String, v: &[u8]) -> Option<(u64, QueueSpec)> {
    let mut r = Reader(v);
    let id = r.u64()?;
    let flags = r.u8()?;
    Some((
        id,
        QueueSpec {
            name,
            durable: flags & 1 != 0,
            exclusive: flags & 2 != 0,
            auto_delete: flags & 4 != 0,
            arguments: decode_table(r.rest())?,
        },
    ))
}

/// The key of a binding in [`BINDINGS`].
pub fn binding_key(
    vhost: &str,
    source: &str,
    to_queue: bool,
    destination: &str,
    routing_key: &str,
    arguments: &FieldTable,
) -> Vec<u8> {
    let mut k = Vec::new();
    put_str(&mut k, vhost);
    put_str(&mut k, source);
    k.push(if to_queue { b'q' } else { b'e' });
    put_str(&mut k, destination);
    put_str(&mut k, routing_key);
    encode_table(&mut k, arguments);
    k
}

fn decode_binding(k: &[u8]) -> Option<StoredBinding> {
    let mut r = Reader(k);
    let vhost = r.str()?;
    let source = r.str()?;
    let to_queue = match r.u8()? {
        b'q' => true,
        b'e' => false,
        _ => return None,
    };
    Some(StoredBinding {
        vhost,
        source,
        to_queue,
        destination: r.str()?,
        routing_key: r.str()?,
        arguments: decode_table(r.rest())?,
    })
}

/// Record version byte of a stored message (schema 1).
const MESSAGE_RECORD_V1: u8 = 1;

fn encode_message(buf: &mut Vec<u8>, m: &Message, enqueued_ms: u64) {
    buf.push(MESSAGE_RECORD_V1);
    buf.extend_from_slice(&enqueued_ms.to_le_bytes());
    put_str(buf, &m.exchange);
    put_str(buf, &m.routing_key);
    buf.extend_from_slice(&(m.properties.len() as u32).to_le_bytes());
    buf.extend_from_slice(&m.properties);
    buf.extend_from_slice(&m.body);
}

fn decode_message(v: &[u8]) -> Option<(Message, u64)> {
    let mut r = Reader(v);
    if r.u8()? != MESSAGE_RECORD_V1 {
        return None;
    }
    let enqueued_ms = r.u64()?;
    let exchange = r.str()?;
    let routing_key = r.str()?;
    let plen = r.u32()? as usize;
    let properties = Bytes::copy_from_slice(r.take(plen)?);
    let body = Bytes::copy_from_slice(r.rest());
    let (message, _) = Message::from_raw(exchange, routing_key, properties, body).ok()?;
    Some((message, enqueued_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::basic::AMQPProperties;
    use amq_protocol::types::AMQPValue;

    fn msg(body: &str) -> Arc<Message> {
        let mut h = FieldTable::default();
        h.insert("k".into(), AMQPValue::LongString(body.into()));
        let props = AMQPProperties::default()
            .with_delivery_mode(2)
            .with_headers(h)
            .with_message_id(body.into());
        Arc::new(Message::from_properties(
            "ex".into(),
            "rk".into(),
            &props,
            Bytes::copy_from_slice(body.as_bytes()),
        ))
    }

    fn queue_spec(name: &str) -> QueueSpec {
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(10));
        QueueSpec {
            name: name.into(),
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments: args,
        }
    }

    fn messages(store: &BrokerStore, id: u64) -> Vec<(u64, String, bool)> {
        let mut out = Vec::new();
        store
            .for_each_message(id, |m| {
                out.push((
                    m.seq,
                    String::from_utf8(m.message.body.to_vec()).unwrap(),
                    m.redelivered,
                ))
            })
            .unwrap();
        out
    }

    #[test]
    fn topology_and_messages_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.redb");
        let store = BrokerStore::open(&path).unwrap();
        let id = store.queue_id("/", "q");
        store.submit_all([
            Op::PutExchange {
                vhost: "/".into(),
                spec: ExchangeSpec {
                    name: "x".into(),
                    kind: ExchangeKind::Topic,
                    durable: true,
                    auto_delete: false,
                    internal: false,
                    arguments: FieldTable::default(),
                },
            },
            Op::PutQueue {
                vhost: "/".into(),
                id,
                spec: queue_spec("q"),
            },
            Op::PutBinding(binding_key(
                "/",
                "x",
                true,
                "q",
                "a.#",
                &FieldTable::default(),
            )),
            Op::Publish {
                queue: id,
                seq: 0,
                paged: None,
                message: msg("m0"),
            },
            Op::Publish {
                queue: id,
                seq: 1,
                paged: None,
                message: msg("m1"),
            },
            Op::Publish {
                queue: id,
                seq: 2,
                paged: None,
                message: msg("m2"),
            },
            Op::Delivered { queue: id, seq: 1 },
            Op::Remove { queue: id, seq: 0 },
        ]);
        assert!(store.sync());
        store.close();
        drop(store);

        let store = BrokerStore::open(&path).unwrap();
        let topo = store.topology().unwrap();
        assert_eq!(topo.exchanges.len(), 1);
        assert_eq!(topo.exchanges[0].1.kind, ExchangeKind::Topic);
        assert_eq!(topo.queues, vec![("/".into(), queue_spec("q"), id)]);
        assert_eq!(topo.bindings.len(), 1);
        assert_eq!(topo.bindings[0].routing_key, "a.#");
        assert_eq!(store.queue_id("/", "q"), id, "the stored id is kept");
        assert_ne!(store.queue_id("/", "other"), id, "ids are not reused");
        assert_eq!(
            messages(&store, id),
            vec![(1, "m1".into(), true), (2, "m2".into(), false)]
        );
        let mut props = None;
        store
            .for_each_message(id, |m| props = Some(m.message.decoded_properties()))
            .unwrap();
        assert_eq!(props.unwrap(), msg("m2").decoded_properties());
        store.close();
    }

    #[test]
    fn a_publish_removed_in_the_same_batch_never_reaches_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = BrokerStore::open(&dir.path().join("broker.redb")).unwrap();
        // Hold the writer back so both land in one batch: submit under one lock.
        store.submit_all([
            Op::Publish {
                queue: 7,
                seq: 0,
                paged: None,
                message: msg("a"),
            },
            Op::Delivered { queue: 7, seq: 0 },
            Op::Remove { queue: 7, seq: 0 },
            Op::Publish {
                queue: 7,
                seq: 1,
                paged: None,
                message: msg("b"),
            },
        ]);
        assert!(store.sync());
        assert_eq!(messages(&store, 7), vec![(1, "b".into(), false)]);
        store.close();
    }

    #[test]
    fn deleting_a_queue_removes_its_messages_and_bindings() {
        let dir = tempfile::tempdir().unwrap();
        let store = BrokerStore::open(&dir.path().join("broker.redb")).unwrap();
        let id = store.queue_id("/", "q");
        store.submit_all([
            Op::PutQueue {
                vhost: "/".into(),
                id,
                spec: queue_spec("q"),
            },
            Op::PutBinding(binding_key(
                "/",
                "amq.direct",
                true,
                "q",
                "k",
                &FieldTable::default(),
            )),
            Op::Publish {
                queue: id,
                seq: 0,
                paged: None,
                message: msg("a"),
            },
        ]);
        assert!(store.sync());
        store.submit(Op::DelQueue {
            vhost: "/".into(),
            name: "q".into(),
            id,
        });
        assert!(store.sync());
        let topo = store.topology().unwrap();
        assert!(topo.queues.is_empty() && topo.bindings.is_empty());
        assert!(messages(&store, id).is_empty());
        store.close();
    }

    #[test]
    fn barriers_wait_for_the_commit_and_commits_are_grouped() {
        let dir = tempfile::tempdir().unwrap();
        let store = BrokerStore::open(&dir.path().join("broker.redb")).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        for seq in 0..1000 {
            store.submit(Op::Publish {
                queue: 1,
                seq,
                message: msg("x"),
                paged: None,
            });
            if seq % 100 == 99 {
                let tx = tx.clone();
                store.barrier(move |ok| tx.send((seq, ok)).unwrap());
            }
        }
        let released: Vec<(u64, bool)> = (0..10).map(|_| rx.recv().unwrap()).collect();
        assert_eq!(
            released,
            (0..10).map(|i| (i * 100 + 99, true)).collect::<Vec<_>>(),
            "barriers are released in order, after success"
        );
        assert_eq!(messages(&store, 1).len(), 1000);
        assert!(store.commits() <= 1000);
        store.close();
    }

    /// The first-version fixture: `MQIC_WRITE_FIXTURE=1 cargo test --lib amqp::store::tests::v1`
    /// regenerates it through the broker (only ever for version 1). Every later mqic must open
    /// it and find its durable exchange, queue, binding and messages.
    #[test]
    fn v1_fixture_opens_with_its_topology_and_messages() {
        use crate::amqp::{auth::Users, Broker, Limits, LocalConnection};
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/broker-store-v1.redb");
        let vhosts = ["/".to_string()];
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(1000));
        if std::env::var_os("MQIC_WRITE_FIXTURE").is_some() {
            assert_eq!(
                SCHEMA_VERSION, 1,
                "the v1 fixture is written by schema 1 only"
            );
            let _ = std::fs::remove_file(&fixture);
            let broker =
                Broker::open(Limits::default(), Users::default(), &vhosts, &fixture).unwrap();
            let mut conn = LocalConnection::open(&broker, "/", "guest").unwrap();
            let mut ch = conn.channel();
            ch.exchange_declare("fx", "topic", true, false, false, FieldTable::default())
                .unwrap();
            ch.queue_declare("fq", true, false, false, args.clone())
                .unwrap();
            ch.queue_bind("fq", "fx", "f.#", FieldTable::default())
                .unwrap();
            for n in 0..3 {
                let m = msg(&format!("fixture-{n}"));
                ch.publish("fx", "f.a", false, &m.decoded_properties(), m.body.clone())
                    .unwrap();
            }
            // The first one delivered and not acked: it comes back redelivered.
            ch.get("fq", false).unwrap().expect("a message");
            broker.close_store();
        }
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("broker.redb");
        std::fs::copy(&fixture, &copy).expect("tests/fixtures/broker-store-v1.redb exists");
        let broker = Broker::open(Limits::default(), Users::default(), &vhosts, &copy).unwrap();
        assert_eq!(
            broker.store.as_ref().unwrap().schema_version().unwrap(),
            SCHEMA_VERSION
        );
        let vhost = broker.vhost("/").unwrap();
        let x = vhost.exchange("fx").expect("the durable exchange");
        assert_eq!(x.spec.kind, ExchangeKind::Topic);
        let q = vhost.queue("fq").expect("the durable queue");
        assert_eq!(q.spec.arguments, args, "with its arguments");
        assert_eq!(q.args.max_length, Some(1000));
        let routed = vhost.route("fx", "f.b", None).unwrap();
        assert_eq!(routed.len(), 1, "the binding is back");
        let mut conn = LocalConnection::open(&broker, "/", "guest").unwrap();
        let mut ch = conn.channel();
        let got: Vec<(String, bool)> = (0..3)
            .map(|_| {
                let g = ch.get("fq", true).unwrap().expect("a stored message");
                (
                    String::from_utf8(g.message.body.to_vec()).unwrap(),
                    g.redelivered,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("fixture-0".to_string(), true),
                ("fixture-1".to_string(), false),
                ("fixture-2".to_string(), false)
            ]
        );
        broker.close_store();
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.redb");
        {
            let db = Database::create(&path).unwrap();
            let w = db.begin_write().unwrap();
            w.open_table(META)
                .unwrap()
                .insert("schema_version", 99u64)
                .unwrap();
            w.commit().unwrap();
        }
        let err = BrokerStore::open(&path).unwrap_err().to_string();
        assert!(err.contains("schema version 99"), "{err}");
        assert!(err.contains("upgrade mqic"), "{err}");
    }
}
