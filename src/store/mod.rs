//! `mqic.redb`: the pipeline's state. One process owns the file (the data-dir lock), and
//! everything that must be atomic — a case's state change, its history row, the messages it
//! causes (the outbox), a GPU lease — goes into one write transaction through [`Store::write`].
//!
//! - [`tables`]: every table, typed, in one place.
//! - [`records`]: what the tables hold.
//! - Schema versioning: [`SCHEMA_VERSION`] in the `meta` table; [`Store::open`] migrates older
//!   files and refuses newer ones. `tests/fixtures/mqic-store-v1.redb` pins version 1.
//!
//! Every method blocks (redb commits fsync): async callers go through `spawn_blocking`.

pub mod records;
pub mod tables;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::protocol::events::Event;
use crate::protocol::CaseId;
use records::{
    CaseRecord, GpuKey, GpuLease, GpuPoint, GpuRecord, HistoryRow, OutboxEntry, ScannedCase,
    WorkerRecord,
};
use tables::*;

/// The schema this mqic writes. Bump it with a migration in [`migrate`] and a fixture test.
pub const SCHEMA_VERSION: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Open { path: PathBuf, source: redb::Error },
    #[error("store: {0}")]
    Redb(#[from] redb::Error),
    #[error("store record {table}/{key} is not readable: {reason}")]
    Corrupt {
        table: &'static str,
        key: String,
        reason: String,
    },
    #[error("store {path} has schema version {found}, newer than this mqic ({SCHEMA_VERSION}); upgrade mqic")]
    TooNew { path: PathBuf, found: u64 },
    #[error("backup {path}: {reason}")]
    Backup { path: PathBuf, reason: String },
    /// A write found the store not as the caller's decision assumed; the transaction aborts.
    #[error("store conflict: {0}")]
    Conflict(String),
}

macro_rules! redb_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> StoreError {
                StoreError::Redb(e.into())
            }
        }
    )*};
}
redb_err!(
    redb::TableError,
    redb::StorageError,
    redb::TransactionError,
    redb::CommitError,
    redb::DatabaseError
);

pub type StoreResult<T> = Result<T, StoreError>;

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records always serialize")
}

fn decode<T: DeserializeOwned>(table: &'static str, key: &str, bytes: &[u8]) -> StoreResult<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        table,
        key: key.to_string(),
        reason: e.to_string(),
    })
}

/// Every record of a string-keyed table, decoded.
fn decode_all<T: DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &'static str,
) -> StoreResult<Vec<T>> {
    let mut out = Vec::new();
    for row in table.iter()? {
        let (k, v) = row?;
        out.push(decode(name, k.value(), v.value())?);
    }
    Ok(out)
}

/// Copies every row of one table from a read transaction into a write transaction.
fn copy_table<K: redb::Key + 'static>(
    read: &redb::ReadTransaction,
    write: &WriteTransaction,
    def: redb::TableDefinition<K, &'static [u8]>,
) -> StoreResult<u64> {
    let src = read.open_table(def)?;
    let mut dst = write.open_table(def)?;
    let mut rows = 0;
    for row in src.iter()? {
        let (k, v) = row?;
        dst.insert(k.value(), v.value())?;
        rows += 1;
    }
    Ok(rows)
}

/// The store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (or creates) the store, creating missing tables and migrating old schemas.
    pub fn open(path: &Path) -> StoreResult<Store> {
        let db = Database::create(path).map_err(|e| StoreError::Open {
            path: path.to_path_buf(),
            source: e.into(),
        })?;
        let store = Store {
            db: Arc::new(db),
            path: path.to_path_buf(),
        };
        store.migrate()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Brings the file to [`SCHEMA_VERSION`]: creates every table, runs migrations in order.
    fn migrate(&self) -> StoreResult<()> {
        let txn = self.db.begin_write()?;
        let found = {
            let meta = txn.open_table(META)?;
            let v = meta.get("schema_version")?.map(|g| {
                let mut b = [0u8; 8];
                let raw = g.value();
                b[..raw.len().min(8)].copy_from_slice(&raw[..raw.len().min(8)]);
                u64::from_le_bytes(b)
            });
            v
        };
        if let Some(found) = found {
            if found > SCHEMA_VERSION {
                return Err(StoreError::TooNew {
                    path: self.path.clone(),
                    found,
                });
            }
        }
        for t in STR_TABLES {
            txn.open_table(*t)?;
        }
        for t in HISTORY_TABLES {
            txn.open_table(*t)?;
        }
        for t in SEQ_TABLES {
            txn.open_table(*t)?;
        }
        // Migrations go here, one `if version < N` block each, oldest first. Version 1 is the
        // first schema, so there is nothing to convert yet.
        txn.open_table(META)?
            .insert("schema_version", SCHEMA_VERSION.to_le_bytes().as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// The schema version recorded in the file.
    pub fn schema_version(&self) -> StoreResult<u64> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let v = meta.get("schema_version")?.map(|g| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&g.value()[..8]);
            u64::from_le_bytes(b)
        });
        Ok(v.unwrap_or(0))
    }

    /// Runs `f` in one write transaction and commits it durably; an error aborts it.
    pub fn write<T>(&self, f: impl FnOnce(&mut Tx<'_>) -> StoreResult<T>) -> StoreResult<T> {
        let txn = self.db.begin_write()?;
        let mut tx = Tx { txn: &txn };
        let result = f(&mut tx)?;
        txn.commit()?;
        Ok(result)
    }

    pub fn case(&self, id: &CaseId) -> StoreResult<Option<CaseRecord>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CASES)?;
        t.get(id.as_str())?
            .map(|g| decode("cases", id.as_str(), g.value()))
            .transpose()
    }

    /// Every live case (archived ones excluded).
    pub fn cases(&self) -> StoreResult<Vec<CaseRecord>> {
        let txn = self.db.begin_read()?;
        decode_all(&txn.open_table(CASES)?, "cases")
    }

    pub fn history(&self, id: &CaseId) -> StoreResult<Vec<HistoryRow>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(HISTORY)?;
        let mut out = Vec::new();
        for row in t.range((id.as_str(), 0)..=(id.as_str(), u64::MAX))? {
            let (_, v) = row?;
            out.push(decode("case_history", id.as_str(), v.value())?);
        }
        Ok(out)
    }

    /// An archived case and its history.
    pub fn archived_case(&self, id: &CaseId) -> StoreResult<Option<(CaseRecord, Vec<HistoryRow>)>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(ARCHIVED_CASES)?;
        let Some(case) = t.get(id.as_str())? else {
            return Ok(None);
        };
        let case: CaseRecord = decode("archived_cases", id.as_str(), case.value())?;
        let h = txn.open_table(ARCHIVED_HISTORY)?;
        let mut rows = Vec::new();
        for row in h.range((id.as_str(), 0)..=(id.as_str(), u64::MAX))? {
            rows.push(decode(
                "archived_case_history",
                id.as_str(),
                row?.1.value(),
            )?);
        }
        Ok(Some((case, rows)))
    }

    pub fn archived_count(&self) -> StoreResult<u64> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(ARCHIVED_CASES)?.len()?)
    }

    /// A running total kept in the meta table by [`Tx::add_counter`] (0 when never added to).
    pub fn counter(&self, name: &str) -> StoreResult<u64> {
        let txn = self.db.begin_read()?;
        read_counter(&txn.open_table(META)?, name)
    }

    pub fn gpus(&self) -> StoreResult<Vec<GpuRecord>> {
        let txn = self.db.begin_read()?;
        decode_all(&txn.open_table(GPUS)?, "gpu_resources")
    }

    /// The newest `limit` history points of a GPU (`host:index`), oldest first.
    pub fn gpu_history(&self, gpu: &str, limit: usize) -> StoreResult<Vec<GpuPoint>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(GPU_HISTORY)?;
        let mut out = Vec::new();
        for row in t.range((gpu, 0)..=(gpu, u64::MAX))?.rev().take(limit) {
            out.push(decode("gpu_history", gpu, row?.1.value())?);
        }
        out.reverse();
        Ok(out)
    }

    pub fn leases(&self) -> StoreResult<Vec<GpuLease>> {
        let txn = self.db.begin_read()?;
        decode_all(&txn.open_table(GPU_LEASES)?, "gpu_leases")
    }

    pub fn workers(&self) -> StoreResult<Vec<WorkerRecord>> {
        let txn = self.db.begin_read()?;
        decode_all(&txn.open_table(WORKERS)?, "worker_heartbeats")
    }

    /// The oldest `limit` outbox entries with their sequence numbers.
    pub fn outbox(&self, limit: usize) -> StoreResult<Vec<(u64, OutboxEntry)>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(OUTBOX)?;
        let mut out = Vec::new();
        for row in t.iter()?.take(limit) {
            let (k, v) = row?;
            let seq = k.value();
            out.push((seq, decode("outbox", &seq.to_string(), v.value())?));
        }
        Ok(out)
    }

    pub fn outbox_len(&self) -> StoreResult<u64> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(OUTBOX)?.len()?)
    }

    /// Removes published outbox entries.
    pub fn outbox_delete(&self, seqs: &[u64]) -> StoreResult<()> {
        self.write(|tx| {
            let mut t = tx.txn.open_table(OUTBOX)?;
            for s in seqs {
                t.remove(*s)?;
            }
            Ok(())
        })
    }

    /// Events after `after` (a sequence number), oldest first, at most `limit`.
    pub fn events_after(&self, after: u64, limit: usize) -> StoreResult<Vec<(u64, Event)>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(EVENTS)?;
        let mut out = Vec::new();
        for row in t.range(after.saturating_add(1)..)?.take(limit) {
            let (k, v) = row?;
            let seq = k.value();
            out.push((seq, decode("event_log", &seq.to_string(), v.value())?));
        }
        Ok(out)
    }

    /// Writes a consistent copy of every table to a new file at `path`, inside one read
    /// transaction (writers are not blocked), then checks the copy opens and matches.
    pub fn backup_to(&self, path: &Path) -> StoreResult<u64> {
        let fail = |reason: String| StoreError::Backup {
            path: path.to_path_buf(),
            reason,
        };
        if path.exists() {
            return Err(fail("the file already exists".into()));
        }
        let read = self.db.begin_read()?;
        let copy = Database::create(path).map_err(|e| fail(e.to_string()))?;
        let mut rows = 0u64;
        let w = copy.begin_write()?;
        for def in STR_TABLES {
            rows += copy_table(&read, &w, *def)?;
        }
        for def in HISTORY_TABLES {
            rows += copy_table(&read, &w, *def)?;
        }
        for def in SEQ_TABLES {
            rows += copy_table(&read, &w, *def)?;
        }
        w.commit()?;
        drop(copy);
        let check = Store::open(path).map_err(|e| fail(format!("the copy does not open: {e}")))?;
        let copied = check.cases()?.len() as u64;
        let original = read.open_table(CASES)?.len()?;
        if copied != original {
            return Err(fail(format!(
                "the copy has {copied} cases, the store {original}"
            )));
        }
        Ok(rows)
    }
}

/// One write transaction. Every change a conductor decision makes goes through one of these.
pub struct Tx<'a> {
    txn: &'a WriteTransaction,
}

impl Tx<'_> {
    pub fn case(&self, id: &CaseId) -> StoreResult<Option<CaseRecord>> {
        let t = self.txn.open_table(CASES)?;
        let v = t.get(id.as_str())?;
        v.map(|g| decode("cases", id.as_str(), g.value()))
            .transpose()
    }

    /// Every live case, as this transaction sees it.
    pub fn cases(&self) -> StoreResult<Vec<CaseRecord>> {
        decode_all(&self.txn.open_table(CASES)?, "cases")
    }

    pub fn put_case(&mut self, case: &CaseRecord) -> StoreResult<()> {
        self.txn
            .open_table(CASES)?
            .insert(case.case_id.as_str(), encode(case).as_slice())?;
        Ok(())
    }

    /// Appends a history row under the case's next sequence number (and advances it).
    pub fn push_history(&mut self, case: &mut CaseRecord, row: &HistoryRow) -> StoreResult<()> {
        let seq = case.history_seq;
        case.history_seq += 1;
        self.txn
            .open_table(HISTORY)?
            .insert((case.case_id.as_str(), seq), encode(row).as_slice())?;
        Ok(())
    }

    /// Queues a message for the relay; returns its sequence number.
    pub fn push_outbox(&mut self, entry: &OutboxEntry) -> StoreResult<u64> {
        let mut t = self.txn.open_table(OUTBOX)?;
        let seq = t.last()?.map(|(k, _)| k.value() + 1).unwrap_or(1);
        t.insert(seq, encode(entry).as_slice())?;
        Ok(seq)
    }

    /// Appends an event, dropping the oldest beyond `keep`.
    pub fn push_event(&mut self, event: &Event, keep: u64) -> StoreResult<u64> {
        let mut t = self.txn.open_table(EVENTS)?;
        let seq = t.last()?.map(|(k, _)| k.value() + 1).unwrap_or(1);
        t.insert(seq, encode(event).as_slice())?;
        while t.len()? > keep {
            if t.pop_first()?.is_none() {
                break;
            }
        }
        Ok(seq)
    }

    pub fn gpus(&self) -> StoreResult<Vec<GpuRecord>> {
        decode_all(&self.txn.open_table(GPUS)?, "gpu_resources")
    }

    pub fn put_gpu(&mut self, gpu: &GpuRecord) -> StoreResult<()> {
        self.txn
            .open_table(GPUS)?
            .insert(gpu.gpu.key().as_str(), encode(gpu).as_slice())?;
        Ok(())
    }

    pub fn leases(&self) -> StoreResult<Vec<GpuLease>> {
        decode_all(&self.txn.open_table(GPU_LEASES)?, "gpu_leases")
    }

    /// Appends a point to a GPU's history (a point at the same time replaces it) and drops
    /// the oldest beyond `keep`.
    pub fn push_gpu_point(&mut self, gpu: &str, point: &GpuPoint, keep: usize) -> StoreResult<()> {
        let mut t = self.txn.open_table(GPU_HISTORY)?;
        t.insert((gpu, point.at_ms), encode(point).as_slice())?;
        let mut keys = Vec::new();
        for row in t.range((gpu, 0)..=(gpu, u64::MAX))? {
            keys.push(row?.0.value().1);
        }
        if keys.len() > keep {
            for at in &keys[..keys.len() - keep] {
                t.remove((gpu, *at))?;
            }
        }
        Ok(())
    }

    /// Takes a lease; false if the GPU is already leased (the caller picked a busy one).
    pub fn take_lease(&mut self, lease: &GpuLease) -> StoreResult<bool> {
        let mut t = self.txn.open_table(GPU_LEASES)?;
        let key = lease.gpu.key();
        if t.get(key.as_str())?.is_some() {
            return Ok(false);
        }
        t.insert(key.as_str(), encode(lease).as_slice())?;
        Ok(true)
    }

    /// Frees a GPU if `case_id` holds it; returns whether a lease was removed.
    pub fn release_lease(&mut self, gpu: &GpuKey, case_id: &CaseId) -> StoreResult<bool> {
        let mut t = self.txn.open_table(GPU_LEASES)?;
        let key = gpu.key();
        let holder: Option<GpuLease> = t
            .get(key.as_str())?
            .map(|g| decode("gpu_leases", &key, g.value()))
            .transpose()?;
        match holder {
            Some(l) if &l.case_id == case_id => {
                t.remove(key.as_str())?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Adds `n` to a running total in the meta table (see [`Store::counter`]).
    pub fn add_counter(&mut self, name: &str, n: u64) -> StoreResult<u64> {
        let mut meta = self.txn.open_table(META)?;
        let total = read_counter(&meta, name)?.saturating_add(n);
        meta.insert(
            format!("{COUNTER_PREFIX}{name}").as_str(),
            total.to_le_bytes().as_slice(),
        )?;
        Ok(total)
    }

    pub fn put_worker(&mut self, w: &WorkerRecord) -> StoreResult<()> {
        self.txn
            .open_table(WORKERS)?
            .insert(w.name.as_str(), encode(w).as_slice())?;
        Ok(())
    }

    /// Whether the case was moved to the archive.
    pub fn is_archived(&self, id: &CaseId) -> StoreResult<bool> {
        Ok(self
            .txn
            .open_table(ARCHIVED_CASES)?
            .get(id.as_str())?
            .is_some())
    }

    /// Records a scanned case; false if it was already recorded.
    pub fn insert_scanned(&mut self, id: &CaseId, case: &ScannedCase) -> StoreResult<bool> {
        let mut t = self.txn.open_table(SCANNED)?;
        if t.get(id.as_str())?.is_some() {
            return Ok(false);
        }
        t.insert(id.as_str(), encode(case).as_slice())?;
        Ok(true)
    }

    /// Moves finished cases last changed before `before_ms` (and their history) to the
    /// archive tables; returns how many moved.
    pub fn archive_before(&mut self, before_ms: u64) -> StoreResult<u64> {
        let mut cases = self.txn.open_table(CASES)?;
        let mut old = Vec::new();
        for row in cases.iter()? {
            let (k, v) = row?;
            let c: CaseRecord = decode("cases", k.value(), v.value())?;
            if c.status.is_terminal() && c.updated_ms < before_ms {
                old.push(c);
            }
        }
        let mut history = self.txn.open_table(HISTORY)?;
        let mut archived = self.txn.open_table(ARCHIVED_CASES)?;
        let mut archived_history = self.txn.open_table(ARCHIVED_HISTORY)?;
        for c in &old {
            let id = c.case_id.as_str();
            let mut rows = Vec::new();
            for row in history.range((id, 0)..=(id, u64::MAX))? {
                let (k, v) = row?;
                rows.push((k.value().1, v.value().to_vec()));
            }
            for (seq, bytes) in &rows {
                archived_history.insert((id, *seq), bytes.as_slice())?;
                history.remove((id, *seq))?;
            }
            archived.insert(id, encode(c).as_slice())?;
            cases.remove(id)?;
        }
        Ok(old.len() as u64)
    }
}

/// Meta-table keys of the running totals.
const COUNTER_PREFIX: &str = "counter.";

fn read_counter(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
) -> StoreResult<u64> {
    let key = format!("{COUNTER_PREFIX}{name}");
    Ok(meta.get(key.as_str())?.map_or(0, |g| {
        let mut b = [0u8; 8];
        let raw = g.value();
        b[..raw.len().min(8)].copy_from_slice(&raw[..raw.len().min(8)]);
        u64::from_le_bytes(b)
    }))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::records::*;
    use super::*;
    use crate::protocol::events::Subject;

    pub(crate) fn sample_case(id: &str, status: CaseStatus, updated_ms: u64) -> CaseRecord {
        let mut c = CaseRecord::new(
            &crate::protocol::NewCase {
                case_id: id.into(),
                case_path: format!("/cases/{id}"),
                workflow: None,
                room: None,
            },
            "default",
            "corr",
            updated_ms,
        );
        c.status = status;
        c
    }

    fn row(to: CaseStatus) -> HistoryRow {
        HistoryRow {
            at_ms: 1,
            from: None,
            to,
            step: None,
            attempt: None,
            reason: "test".into(),
        }
    }

    #[test]
    fn a_write_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("mqic.redb")).unwrap();
        let err = store.write(|tx| {
            let mut c = sample_case("c1", CaseStatus::New, 5);
            tx.push_history(&mut c, &row(CaseStatus::New))?;
            tx.put_case(&c)?;
            tx.push_outbox(&OutboxEntry {
                exchange: String::new(),
                routing_key: "q".into(),
                body: "{}".into(),
                correlation_id: None,
                persistent: true,
            })?;
            Err::<(), _>(StoreError::Backup {
                path: "x".into(),
                reason: "abort".into(),
            })
        });
        assert!(err.is_err());
        assert!(store.case(&"c1".into()).unwrap().is_none());
        assert_eq!(store.outbox_len().unwrap(), 0);
        assert!(store.history(&"c1".into()).unwrap().is_empty());
    }

    #[test]
    fn leases_are_exclusive_and_released_only_by_their_holder() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("mqic.redb")).unwrap();
        let gpu = GpuKey {
            host: "local".into(),
            index: 0,
        };
        let lease = |case: &str| GpuLease {
            gpu: gpu.clone(),
            case_id: case.into(),
            step: "sim".into(),
            attempt: 1,
            taken_ms: 0,
            expires_ms: 10,
        };
        store
            .write(|tx| {
                assert!(tx.take_lease(&lease("a"))?);
                assert!(!tx.take_lease(&lease("b"))?);
                assert!(!tx.release_lease(&gpu, &"b".into())?);
                Ok(())
            })
            .unwrap();
        assert_eq!(store.leases().unwrap().len(), 1);
        store
            .write(|tx| tx.release_lease(&gpu, &"a".into()))
            .map(|released| assert!(released))
            .unwrap();
        assert!(store.leases().unwrap().is_empty());
    }

    #[test]
    fn events_are_bounded_and_outbox_is_ordered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("mqic.redb")).unwrap();
        store
            .write(|tx| {
                for i in 0..10 {
                    let e = Event {
                        subject: Subject::Case,
                        event: format!("e{i}"),
                        case_id: "c".into(),
                        step: None,
                        attempt: None,
                        status: "NEW".into(),
                        detail: String::new(),
                        timestamp: String::new(),
                    };
                    tx.push_event(&e, 4)?;
                    tx.push_outbox(&OutboxEntry {
                        exchange: String::new(),
                        routing_key: format!("q{i}"),
                        body: "{}".into(),
                        correlation_id: None,
                        persistent: true,
                    })?;
                }
                Ok(())
            })
            .unwrap();
        let events = store.events_after(0, 100).unwrap();
        assert_eq!(
            events
                .iter()
                .map(|(_, e)| e.event.as_str())
                .collect::<Vec<_>>(),
            ["e6", "e7", "e8", "e9"]
        );
        let out = store.outbox(3).unwrap();
        assert_eq!(out[0].1.routing_key, "q0");
        store
            .outbox_delete(&out.iter().map(|(s, _)| *s).collect::<Vec<_>>())
            .unwrap();
        assert_eq!(store.outbox(1).unwrap()[0].1.routing_key, "q3");
    }

    #[test]
    fn archive_moves_old_finished_cases_with_history_and_backups_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("mqic.redb")).unwrap();
        store
            .write(|tx| {
                for (id, status, t) in [
                    ("old-done", CaseStatus::Completed, 100),
                    ("old-running", CaseStatus::Processing, 100),
                    ("new-done", CaseStatus::Completed, 900),
                ] {
                    let mut c = sample_case(id, status, t);
                    tx.push_history(&mut c, &row(status))?;
                    tx.put_case(&c)?;
                }
                Ok(())
            })
            .unwrap();
        let moved = store.write(|tx| tx.archive_before(500)).unwrap();
        assert_eq!(moved, 1);
        let mut live: Vec<_> = store
            .cases()
            .unwrap()
            .into_iter()
            .map(|c| c.case_id.0)
            .collect();
        live.sort();
        assert_eq!(live, ["new-done", "old-running"]);
        assert!(store.history(&"old-done".into()).unwrap().is_empty());
        let (case, history) = store.archived_case(&"old-done".into()).unwrap().unwrap();
        assert_eq!(case.status, CaseStatus::Completed);
        assert_eq!(history.len(), 1);

        let backup = dir.path().join("backup.redb");
        let rows = store.backup_to(&backup).unwrap();
        assert!(rows >= 5, "{rows}");
        let copy = Store::open(&backup).unwrap();
        assert_eq!(copy.cases().unwrap().len(), 2);
        assert_eq!(copy.archived_count().unwrap(), 1);
        assert!(store.backup_to(&backup).is_err(), "never overwrites");
    }

    #[test]
    fn gpu_history_is_bounded_per_gpu() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("mqic.redb")).unwrap();
        let point = |at_ms| GpuPoint {
            at_ms,
            health: GpuHealth::Ok,
            utilization_pct: Some(at_ms as u32),
            memory_used_mib: None,
            temperature_c: None,
            processes: 0,
        };
        store
            .write(|tx| {
                for at in 1..=10 {
                    tx.push_gpu_point("h:0", &point(at), 4)?;
                    tx.push_gpu_point("h:1", &point(at * 100), 4)?;
                }
                tx.push_gpu_point("h:10", &point(7), 4)
            })
            .unwrap();
        let h0 = store.gpu_history("h:0", 100).unwrap();
        assert_eq!(
            h0.iter().map(|p| p.at_ms).collect::<Vec<_>>(),
            [7, 8, 9, 10]
        );
        assert_eq!(store.gpu_history("h:0", 2).unwrap()[0].at_ms, 9);
        assert_eq!(store.gpu_history("h:1", 100).unwrap().len(), 4);
        assert_eq!(store.gpu_history("h:10", 100).unwrap().len(), 1);
        assert!(store.gpu_history("h:2", 100).unwrap().is_empty());
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mqic.redb");
        {
            let db = Database::create(&path).unwrap();
            let w = db.begin_write().unwrap();
            w.open_table(META)
                .unwrap()
                .insert("schema_version", 99u64.to_le_bytes().as_slice())
                .unwrap();
            w.commit().unwrap();
        }
        let err = Store::open(&path).unwrap_err().to_string();
        assert!(err.contains("schema version 99"), "{err}");
    }

    /// The first-version fixture: `MQIC_WRITE_FIXTURE=1 cargo test --lib store::tests::v1`
    /// regenerates it (only ever for version 1). Every later mqic must open it and read it.
    #[test]
    fn v1_fixture_opens_and_reads() {
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mqic-store-v1.redb");
        if std::env::var_os("MQIC_WRITE_FIXTURE").is_some() {
            assert_eq!(
                SCHEMA_VERSION, 1,
                "the v1 fixture is written by schema 1 only"
            );
            let _ = std::fs::remove_file(&fixture);
            let store = Store::open(&fixture).unwrap();
            store
                .write(|tx| {
                    let mut c =
                        sample_case("fixture-case", CaseStatus::Completed, 1_700_000_000_000);
                    c.progress = 1.0;
                    tx.push_history(&mut c, &row(CaseStatus::New))?;
                    tx.push_history(&mut c, &row(CaseStatus::Completed))?;
                    tx.put_case(&c)?;
                    tx.put_gpu(&GpuRecord {
                        gpu: GpuKey {
                            host: "local".into(),
                            index: 0,
                        },
                        usable: true,
                        name: "fixture".into(),
                        last_seen_ms: 0,
                        state: None,
                    })?;
                    Ok(())
                })
                .unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("mqic.redb");
        std::fs::copy(&fixture, &copy).expect("tests/fixtures/mqic-store-v1.redb exists");
        let store = Store::open(&copy).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        let case = store.case(&"fixture-case".into()).unwrap().unwrap();
        assert_eq!(case.status, CaseStatus::Completed);
        assert_eq!(case.progress, 1.0);
        assert_eq!(store.history(&"fixture-case".into()).unwrap().len(), 2);
        assert_eq!(store.gpus().unwrap().len(), 1);
    }
}
