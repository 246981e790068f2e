//! Every table of `mqic.redb`, in one place. Values are JSON-encoded records (see
//! [`super::records`]); each record carries what it needs to migrate, and the whole file has
//! a schema version in [`META`].

use redb::TableDefinition;

/// `schema_version` -> u64 as 8 little-endian bytes. Nothing else lives here yet.
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// case id -> [`super::records::CaseRecord`]: the current state of every live case.
pub const CASES: TableDefinition<&str, &[u8]> = TableDefinition::new("cases");

/// (case id, sequence) -> [`super::records::HistoryRow`]: every transition of a case, with
/// its time and reason, in order.
pub const HISTORY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("case_history");

/// gpu key (`host:index`) -> [`super::records::GpuRecord`]: GPUs mqic may lease.
pub const GPUS: TableDefinition<&str, &[u8]> = TableDefinition::new("gpu_resources");

/// (gpu key, sample time ms) -> [`super::records::GpuPoint`]: each GPU's recent samples,
/// for plots; the curator keeps the newest `curator.history_len` per GPU.
pub const GPU_HISTORY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("gpu_history");

/// gpu key -> [`super::records::GpuLease`]: who holds a GPU and until when. A row here is
/// the lease; deleting it frees the GPU.
pub const GPU_LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("gpu_leases");

/// worker name -> [`super::records::WorkerRecord`]: the last heartbeat of each worker.
pub const WORKERS: TableDefinition<&str, &[u8]> = TableDefinition::new("worker_heartbeats");

/// case id -> [`super::records::ScannedCase`]: every case the scanner has announced, so no
/// case is announced twice, across restarts.
pub const SCANNED: TableDefinition<&str, &[u8]> = TableDefinition::new("scanned_cases");

/// sequence -> [`super::records::OutboxEntry`]: messages decided in a transaction and not
/// yet confirmed by the broker. The relay publishes them in order and deletes them.
pub const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");

/// sequence -> [`crate::protocol::events::Event`]: the last N events, for the dashboard.
pub const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("event_log");

/// case id -> [`super::records::CaseRecord`]: finished cases moved out by the archiver.
pub const ARCHIVED_CASES: TableDefinition<&str, &[u8]> = TableDefinition::new("archived_cases");

/// (case id, sequence) -> [`super::records::HistoryRow`] of archived cases.
pub const ARCHIVED_HISTORY: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("archived_case_history");

/// The key-string/value-bytes tables, for the backup copy.
pub const STR_TABLES: &[TableDefinition<&str, &[u8]>] = &[
    META,
    CASES,
    GPUS,
    GPU_LEASES,
    WORKERS,
    SCANNED,
    ARCHIVED_CASES,
];

/// The (string, number) tables, for the backup copy.
pub const HISTORY_TABLES: &[TableDefinition<(&str, u64), &[u8]>] =
    &[HISTORY, ARCHIVED_HISTORY, GPU_HISTORY];

/// The sequence-keyed tables, for the backup copy.
pub const SEQ_TABLES: &[TableDefinition<u64, &[u8]>] = &[OUTBOX, EVENTS];
